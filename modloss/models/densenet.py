"""Ensembles of DenseNet-BC networks (the paper's CIFAR-100 models, Section 4.3, Table 4),
built as bamos/densenet.pytorch builds one member."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modloss.layers import (
    EnsembleBatchNorm2d,
    EnsembleConv2d,
    EnsembleLinear,
    SharedInputConv2d,
    check_positive,
    normal_,
)
from modloss.models._base import EnsembleModel, MemberSelection
from modloss.models._registry import build_model, register_model

__all__ = ["EnsembleDenseNet"]


class _Bottleneck(nn.Module):
    """BN-ReLU-Conv1x1 to 4k, BN-ReLU-Conv3x3 to k, concatenated to each member's input."""

    def __init__(
        self, num_members: int, in_channels: int, growth_rate: int, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.bn1 = EnsembleBatchNorm2d(num_members, in_channels)
        self.conv1 = EnsembleConv2d(
            num_members, in_channels, 4 * growth_rate, 1, bias=False, generator=generator
        )
        self.bn2 = EnsembleBatchNorm2d(num_members, 4 * growth_rate)
        self.conv2 = EnsembleConv2d(
            num_members, 4 * growth_rate, growth_rate, 3, padding=1, bias=False, generator=generator
        )

    def forward(self, x: Tensor, members: Tensor | None) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x, members)), members)
        out = self.conv2(F.relu(self.bn2(out, members)), members)  # (N, M'*k, H, W)
        n, _, h, w = x.shape
        m = x.shape[1] // self.in_channels
        # Concatenate within each member. Activations are channels-last (see forward of
        # EnsembleDenseNet), so in memory they are (N, H, W, M', C): free views.
        x = x.permute(0, 2, 3, 1).reshape(n, h, w, m, -1)  # (N, H, W, M', C)
        out = out.permute(0, 2, 3, 1).reshape(n, h, w, m, -1)  # (N, H, W, M', k)
        out = torch.cat([x, out], dim=4).view(n, h, w, -1)  # (N, H, W, M'*(C+k))
        return out.permute(0, 3, 1, 2)  # (N, M'*(C+k), H, W), channels-last


class _Transition(nn.Module):
    """BN-ReLU-Conv1x1 to ``out_channels``, then 2x2 average pooling."""

    def __init__(
        self, num_members: int, in_channels: int, out_channels: int, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.bn = EnsembleBatchNorm2d(num_members, in_channels)
        self.conv = EnsembleConv2d(
            num_members, in_channels, out_channels, 1, bias=False, generator=generator
        )

    def forward(self, x: Tensor, members: Tensor | None) -> Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x, members)), members), 2)


class EnsembleDenseNet(EnsembleModel):
    """M DenseNet-BC networks (bottleneck layers, compression 0.5), as bamos/densenet.pytorch.

    Per member: a 3x3 stem convolution to ``2 * growth_rate`` channels; three dense blocks
    of ``(depth - 4) // 6`` bottleneck layers, with a transition (BN-ReLU-Conv1x1 to
    ``floor(C / 2)`` channels, 2x2 average pooling) between blocks; then BN-ReLU, global
    average pooling and a linear layer. Convolutions have no bias.

    The stem of all members is one ordinary convolution on the shared image, the other
    convolutions are grouped (``groups=M``), batch norm is per member.

    Initialisation as the reference code, per member: convolutions He-normal with one
    member's fan-out (std ``sqrt(2 / (k * k * out_channels))``), batch norm weight 1 and
    bias 0, linear weight ``nn.Linear``'s default and bias 0.

    Args:
        num_members: M.
        depth: ``6 n + 4`` for n bottleneck layers per dense block.
        growth_rate: k.
        in_channels: image channels.
        num_classes: K.
        seed: initialisation seed (see :meth:`EnsembleModel.reset_parameters`).

    Shape:
        input ``(N, in_channels, H, W)`` with H, W >= 4 (two 2x2 poolings); output ``(M', N, K)``.
    """

    def __init__(
        self,
        num_members: int,
        depth: int,
        growth_rate: int,
        in_channels: int = 3,
        num_classes: int = 100,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__(num_members, num_classes)
        check_positive("depth", depth)
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6 n + 4 with n >= 1 (10, 16, ..., 100), got {depth}")
        check_positive("growth_rate", growth_rate)
        check_positive("in_channels", in_channels)
        self.config = dict(
            num_members=num_members,
            depth=depth,
            growth_rate=growth_rate,
            in_channels=in_channels,
            num_classes=num_classes,
        )
        # Placeholder draws, replaced by reset_parameters(seed): the global RNG stays untouched.
        scratch = torch.Generator()
        layers_per_block = (depth - 4) // 6
        channels = 2 * growth_rate
        self.stem = SharedInputConv2d(
            num_members, in_channels, channels, 3, padding=1, bias=False, generator=scratch
        )
        blocks: list[nn.Module] = []
        for block in range(3):
            for _ in range(layers_per_block):
                blocks.append(_Bottleneck(num_members, channels, growth_rate, scratch))
                channels += growth_rate
            if block < 2:
                blocks.append(_Transition(num_members, channels, channels // 2, scratch))
                channels //= 2
        self.blocks = nn.ModuleList(blocks)
        self.bn = EnsembleBatchNorm2d(num_members, channels)
        self.head = EnsembleLinear(num_members, channels, num_classes, generator=scratch)
        self.reset_parameters(seed)

    def _init_member(self, j: int, generator: torch.Generator) -> None:
        super()._init_member(j, generator)
        for module in self.modules():
            if isinstance(module, EnsembleConv2d):
                fan_out = module.out_channels * module.kernel_size**2
                normal_(module.weight[j], math.sqrt(2.0 / fan_out), generator)
        with torch.no_grad():
            self.head.bias[j] = 0.0

    def forward(self, x: Tensor, members: MemberSelection = None) -> Tensor:
        index = self._member_index(members)
        # Channels-last throughout: oneDNN's grouped convolutions with few channels per
        # member are several times faster in that layout (3x3 to k = 6: ~5x on CPU).
        x = self.stem(x.contiguous(memory_format=torch.channels_last), index)  # (N, M'*2k, H, W)
        for block in self.blocks:
            x = block(x, index)
        x = F.relu(self.bn(x, index)).mean((2, 3))  # (N, M'*C) global average pool
        x = x.view(x.shape[0], -1, self.head.in_features).transpose(0, 1)  # (M', N, C)
        return self.head(x, index)  # (M', N, K)


def _paper_densenet(
    num_members: int, depth: int, growth_rate: int, seed: int | None, overrides: dict
) -> EnsembleDenseNet:
    defaults = dict(num_members=num_members, depth=depth, growth_rate=growth_rate)
    return build_model(EnsembleDenseNet, defaults | dict(num_classes=100), seed, overrides)


@register_model("DN-100-12-4")
def densenet_100_12_4(*, seed: int | None = None, **overrides) -> EnsembleDenseNet:
    """Four DenseNet-BC (depth 100, k = 12) for CIFAR-100."""
    return _paper_densenet(4, 100, 12, seed, overrides)


@register_model("DN-82-8-8")
def densenet_82_8_8(*, seed: int | None = None, **overrides) -> EnsembleDenseNet:
    """Eight DenseNet-BC (depth 82, k = 8) for CIFAR-100."""
    return _paper_densenet(8, 82, 8, seed, overrides)


@register_model("DN-64-6-16")
def densenet_64_6_16(*, seed: int | None = None, **overrides) -> EnsembleDenseNet:
    """Sixteen DenseNet-BC (depth 64, k = 6) for CIFAR-100."""
    return _paper_densenet(16, 64, 6, seed, overrides)
