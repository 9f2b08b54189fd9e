"""Ensembles of small VGG-style CNNs with global average pooling (the paper's CIFAR-10
models, Section 4.2, Table 3)."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modloss.layers import EnsembleConv2d, EnsembleLinear, SharedInputConv2d, check_positive
from modloss.models._base import EnsembleModel, MemberSelection
from modloss.models._registry import build_model, register_model

__all__ = ["EnsembleCNN"]


class EnsembleCNN(EnsembleModel):
    """M CNNs: unpadded ``kernel_size`` convolutions with bias and ReLU (no batch norm),
    global average pooling, then a linear layer to ``num_classes``.

    The first convolution of all members is one ordinary convolution on the shared image;
    the others are grouped convolutions (``groups=M``); on CPU, a loop over members is faster
    and is used instead (same parameters, same results). Initialisation is ``nn.Conv2d`` /
    ``nn.Linear``'s default per member, as in the paper's code.

    Args:
        num_members: M.
        channels: output channels of each convolution of one member.
        strides: stride of each convolution (same length as ``channels``).
        in_channels: image channels.
        num_classes: K.
        kernel_size: of every convolution.
        seed: initialisation seed (see :meth:`EnsembleModel.reset_parameters`).

    Shape:
        input ``(N, in_channels, H, W)``, large enough for the unpadded convolutions
        (Table 3's CNN needs H, W >= 21; CIFAR's 32 leaves a 3x3 map); output ``(M', N, K)``.
    """

    def __init__(
        self,
        num_members: int,
        channels: Sequence[int] = (32, 64, 64, 128, 128),
        strides: Sequence[int] = (1, 2, 1, 2, 1),
        in_channels: int = 3,
        num_classes: int = 10,
        kernel_size: int = 3,
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__(num_members, num_classes)
        channels, strides = tuple(channels), tuple(strides)
        if not channels or len(channels) != len(strides):
            raise ValueError(
                f"channels and strides must be non-empty and of equal length, "
                f"got channels={channels}, strides={strides}"
            )
        for c in channels:
            check_positive("channels", c)
        check_positive("in_channels", in_channels)
        self.config = dict(
            num_members=num_members,
            channels=channels,
            strides=strides,
            in_channels=in_channels,
            num_classes=num_classes,
            kernel_size=kernel_size,
        )
        # Placeholder draws, replaced by reset_parameters(seed): the global RNG stays untouched.
        scratch = torch.Generator()
        convs: list[EnsembleConv2d] = []
        for i, (c_in, c_out, stride) in enumerate(
            zip((in_channels, *channels[:-1]), channels, strides, strict=True)
        ):
            layer = SharedInputConv2d if i == 0 else EnsembleConv2d
            convs.append(
                layer(num_members, c_in, c_out, kernel_size, stride=stride, generator=scratch)
            )
        self.convs = nn.ModuleList(convs)
        self.head = EnsembleLinear(num_members, channels[-1], num_classes, generator=scratch)
        self.reset_parameters(seed)

    # None: grouped convolutions except on CPU, where a loop over members is faster (see
    # EnsembleConv2d.forward_each); True / False force one path (tests compare the two).
    grouped_convs: bool | None = None

    def forward(self, x: Tensor, members: MemberSelection = None) -> Tensor:
        index = self._member_index(members)
        # Channels-last: oneDNN's convolutions, grouped or not, are faster in that layout.
        x = x.contiguous(memory_format=torch.channels_last)
        grouped = self.grouped_convs
        if grouped is None:
            grouped = x.device.type != "cpu"
        if grouped:
            for conv in self.convs:
                x = F.relu(conv(x, index))  # (N, M'*C, H', W')
            n = x.shape[0]
            x = x.mean((2, 3))  # (N, M'*C) global average pool
            x = x.view(n, -1, self.convs[-1].out_channels).transpose(0, 1)  # (M', N, C)
        else:
            m = self.num_members if index is None else len(index)
            xs = [x] * m  # every member's first convolution reads the same image
            for conv in self.convs:
                xs = [F.relu(y) for y in conv.forward_each(xs, index)]  # M' x (N, C, H', W')
            x = torch.stack([y.mean((2, 3)) for y in xs])  # (M', N, C) global average pool
        return self.head(x, index)  # (M', N, K)


@register_model("CNN-10")
def cnn_10(*, seed: int | None = None, **overrides) -> EnsembleCNN:
    """Ten Table-3 CNNs for CIFAR-10: 279,050 parameters each, 2,790,500 in all."""
    defaults = dict(num_members=10, in_channels=3, num_classes=10)
    return build_model(EnsembleCNN, defaults, seed, overrides)
