"""Batched ensemble layers: the same layer of M members evaluated by one kernel call.

Every parameter and buffer keeps the member dimension first, ``(M, ...)``, so member ``j``'s
weights are ``tensor[j]`` in every layer: a model can copy, select or re-initialise one
member without knowing which layers it has (see :class:`modloss.models.EnsembleModel`).

Activation layouts:

- linear layers: members first, ``(M, N, F)``;
- conv and batch-norm layers: ``(N, M*C, H, W)``, each member's ``C`` channels side by side,
  which is the layout a grouped convolution with ``groups=M`` reads and writes;
- the shared-input layers read the ensemble's input once, ``(N, F)`` or ``(N, C, H, W)``,
  with one ordinary matmul/conv that has M times the outputs, instead of repeating the input.

Every ``forward`` takes ``members``: ``None`` for all members, or a 1-D int64 tensor of
member indices (on the parameters' device); only those members are computed, in that order.
Models turn user-facing selections (lists, bool masks) into that tensor.

Initialisation is per member (``reset_member(j, generator)``), with fan-in and fan-out of
one member, so a member's initial weights do not depend on how many members share the layer.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EnsembleBatchNorm2d",
    "EnsembleConv2d",
    "EnsembleLinear",
    "SharedInputConv2d",
    "SharedInputLinear",
]


def check_positive(name: str, value: int) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive int (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def uniform_(t: Tensor, bound: float, generator: torch.Generator | None) -> None:
    """Fill ``t`` from U(-bound, bound). Draws on the CPU so that a seed gives the same
    weights whatever device the model lives on."""
    with torch.no_grad():
        t.copy_(torch.empty(t.shape).uniform_(-bound, bound, generator=generator))


def normal_(t: Tensor, std: float, generator: torch.Generator | None) -> None:
    """Fill ``t`` from N(0, std^2), drawn on the CPU (see :func:`uniform_`)."""
    with torch.no_grad():
        t.copy_(torch.empty(t.shape).normal_(0.0, std, generator=generator))


def _select(t: Tensor, members: Tensor | None) -> Tensor:
    return t if members is None else t.index_select(0, members)


class EnsembleLinear(nn.Module):
    """M independent affine maps applied with one batched matmul (``torch.baddbmm``).

    Args:
        num_members: M.
        in_features, out_features: of one member.
        bias: whether each member has a bias.
        generator: draws the initial weights (default: the global RNG).

    Shape:
        - weight ``(M, in_features, out_features)``, bias ``(M, out_features)``
        - input ``(M', N, in_features)``, output ``(M', N, out_features)``, where ``M'`` is
          the number of selected members.

    Initialisation matches ``nn.Linear`` applied to one member: weight and bias from
    U(-1/sqrt(in_features), 1/sqrt(in_features)).
    """

    def __init__(
        self,
        num_members: int,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_positive("num_members", num_members)
        check_positive("in_features", in_features)
        check_positive("out_features", out_features)
        self.num_members = num_members
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num_members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_members, out_features)) if bias else None
        for j in range(num_members):
            self.reset_member(j, generator)

    def reset_member(self, j: int, generator: torch.Generator | None = None) -> None:
        # nn.Linear's kaiming_uniform_(a=sqrt(5)) reduces to this bound.
        bound = 1.0 / math.sqrt(self.in_features)
        uniform_(self.weight[j], bound, generator)
        if self.bias is not None:
            uniform_(self.bias[j], bound, generator)

    def forward(self, x: Tensor, members: Tensor | None = None) -> Tensor:
        weight = _select(self.weight, members)
        if self.bias is None:
            return torch.bmm(x, weight)
        return torch.baddbmm(_select(self.bias, members).unsqueeze(1), x, weight)

    def extra_repr(self) -> str:
        return (
            f"num_members={self.num_members}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )


class SharedInputLinear(nn.Module):
    """First linear layer of M members that all see the same input: one ``F.linear`` with
    ``M * out_features`` outputs, so the input is read once and never repeated.

    Args:
        num_members: M.
        in_features, out_features: of one member.
        bias: whether each member has a bias.
        generator: draws the initial weights (default: the global RNG).

    Shape:
        - weight ``(M, out_features, in_features)``: member j's rows of one
          ``(M * out_features, in_features)`` ``nn.Linear`` weight; bias ``(M, out_features)``
        - input ``(N, in_features)``, output ``(M', N, out_features)`` (a transposed view)

    Initialisation as :class:`EnsembleLinear` (``nn.Linear`` of one member).
    """

    def __init__(
        self,
        num_members: int,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_positive("num_members", num_members)
        check_positive("in_features", in_features)
        check_positive("out_features", out_features)
        self.num_members = num_members
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num_members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_members, out_features)) if bias else None
        for j in range(num_members):
            self.reset_member(j, generator)

    def reset_member(self, j: int, generator: torch.Generator | None = None) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        uniform_(self.weight[j], bound, generator)
        if self.bias is not None:
            uniform_(self.bias[j], bound, generator)

    def forward(self, x: Tensor, members: Tensor | None = None) -> Tensor:
        weight = _select(self.weight, members)
        bias = None if self.bias is None else _select(self.bias, members).flatten()
        m = weight.shape[0]
        out = F.linear(x, weight.flatten(0, 1), bias)  # (N, M'*out)
        return out.view(x.shape[0], m, self.out_features).transpose(0, 1)  # (M', N, out)

    def extra_repr(self) -> str:
        return (
            f"num_members={self.num_members}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )


class EnsembleConv2d(nn.Module):
    """M independent 2-d convolutions as one grouped convolution (``groups=M``).

    Args:
        num_members: M.
        in_channels, out_channels: of one member.
        kernel_size, stride, padding: as ``nn.Conv2d`` (square kernels).
        bias: whether each member has a bias.
        generator: draws the initial weights (default: the global RNG).

    Shape:
        - weight ``(M, out_channels, in_channels, k, k)``, bias ``(M, out_channels)``
        - input ``(N, M' * in_channels, H, W)``, output ``(N, M' * out_channels, H', W')``

    Initialisation matches ``nn.Conv2d`` of one member: weight and bias from
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with ``fan_in = in_channels * k * k``.
    """

    # The shared-input subclass convolves an input that all members read.
    _shared_input = False

    def __init__(
        self,
        num_members: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_positive("num_members", num_members)
        check_positive("in_channels", in_channels)
        check_positive("out_channels", out_channels)
        check_positive("kernel_size", kernel_size)
        check_positive("stride", stride)
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative int, got {padding!r}")
        self.num_members = num_members
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.weight = nn.Parameter(
            torch.empty(num_members, out_channels, in_channels, kernel_size, kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(num_members, out_channels)) if bias else None
        for j in range(num_members):
            self.reset_member(j, generator)

    def reset_member(self, j: int, generator: torch.Generator | None = None) -> None:
        # nn.Conv2d's kaiming_uniform_(a=sqrt(5)) with one member's (ungrouped) fan-in.
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size**2)
        uniform_(self.weight[j], bound, generator)
        if self.bias is not None:
            uniform_(self.bias[j], bound, generator)

    def forward(self, x: Tensor, members: Tensor | None = None) -> Tensor:
        weight = _select(self.weight, members)
        bias = None if self.bias is None else _select(self.bias, members).flatten()
        groups = 1 if self._shared_input else weight.shape[0]
        return F.conv2d(
            x, weight.flatten(0, 1), bias, self.stride, self.padding, groups=groups
        )  # (N, M'*out, H', W')

    def forward_each(self, xs: list[Tensor], members: Tensor | None = None) -> list[Tensor]:
        """The same convolutions member by member, on a list of per-member tensors.

        ``xs[i]`` is the ``(N, in_channels, H, W)`` input of the i-th selected member (for
        the shared-input layer, every entry may be the same image); returns the
        ``(N, out_channels, H', W')`` outputs in the same order. On CPU this is faster than
        :meth:`forward`: oneDNN's grouped convolution costs about as much as M separate
        ones, its wide shared-input one (3 -> M*32 channels) ~3x more, and M contiguous
        per-member tensors avoid slicing the ``(N, M*C, H, W)`` layout.
        """
        chosen = range(self.num_members) if members is None else members.tolist()
        # unbind: one view per member, whose gradients backward stacks into weight.grad once.
        weights = self.weight.unbind(0)
        biases = [None] * self.num_members if self.bias is None else self.bias.unbind(0)
        return [
            F.conv2d(x, weights[j], biases[j], self.stride, self.padding)
            for x, j in zip(xs, chosen, strict=True)
        ]

    def extra_repr(self) -> str:
        return (
            f"num_members={self.num_members}, in_channels={self.in_channels}, "
            f"out_channels={self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}"
        )


class SharedInputConv2d(EnsembleConv2d):
    """First convolution of M members that all see the same image: one ordinary
    convolution with ``M * out_channels`` filters, so the input is read once.

    Arguments, weight layout and initialisation as :class:`EnsembleConv2d`.

    Shape:
        input ``(N, in_channels, H, W)``, output ``(N, M' * out_channels, H', W')``.
    """

    _shared_input = True


class EnsembleBatchNorm2d(nn.Module):
    """Per-member batch normalisation: ``BatchNorm2d`` over the ``M * C`` channels of
    ``(N, M*C, H, W)`` normalises each member's channels with that member's statistics.

    Args:
        num_members: M.
        num_features: C, channels of one member.
        eps, momentum: as ``nn.BatchNorm2d``.

    Shape:
        - weight, bias, running_mean, running_var ``(M, C)``
        - input and output ``(N, M' * C, H, W)``

    With a member selection in training mode, only the selected members' running
    statistics are updated.
    """

    def __init__(
        self, num_members: int, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1
    ) -> None:
        super().__init__()
        check_positive("num_members", num_members)
        check_positive("num_features", num_features)
        self.num_members = num_members
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.empty(num_members, num_features))
        self.bias = nn.Parameter(torch.empty(num_members, num_features))
        self.register_buffer("running_mean", torch.empty(num_members, num_features))
        self.register_buffer("running_var", torch.empty(num_members, num_features))
        for j in range(num_members):
            self.reset_member(j)

    def reset_member(self, j: int, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.weight[j] = 1.0
            self.bias[j] = 0.0
            self.running_mean[j] = 0.0
            self.running_var[j] = 1.0

    def forward(self, x: Tensor, members: Tensor | None = None) -> Tensor:
        if members is None:
            # Flat views share storage, so F.batch_norm updates the (M, C) buffers in place.
            return F.batch_norm(
                x,
                self.running_mean.view(-1),
                self.running_var.view(-1),
                self.weight.view(-1),
                self.bias.view(-1),
                self.training,
                self.momentum,
                self.eps,
            )
        mean = self.running_mean.index_select(0, members)  # (M', C) copies
        var = self.running_var.index_select(0, members)
        out = F.batch_norm(
            x,
            mean.view(-1),
            var.view(-1),
            self.weight.index_select(0, members).flatten(),
            self.bias.index_select(0, members).flatten(),
            self.training,
            self.momentum,
            self.eps,
        )
        if self.training:
            # F.batch_norm updated the copies; write them back to the selected members.
            with torch.no_grad():
                self.running_mean[members] = mean
                self.running_var[members] = var
        return out

    def extra_repr(self) -> str:
        return (
            f"num_members={self.num_members}, num_features={self.num_features}, "
            f"eps={self.eps}, momentum={self.momentum}"
        )
