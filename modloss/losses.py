"""The modular loss (Eq. 4) of an ensemble of M members, its parts, and the three families.

Every function takes member natural parameters ``eta`` of shape ``(M, N, K)``: M members,
N examples, K outputs. A family is a natural exponential family

    q(y | eta) = h(y) exp(eta . y - A(eta)),    NLL(eta; y) = A(eta) - eta . y - ln h(y),

whose mean is the inverse link ``y_hat = grad A(eta)``:

===========  =====================  =====================  ===========================  ==========
family       eta                    A(eta)                 ln h(y)                      y_hat
===========  =====================  =====================  ===========================  ==========
categorical  logits                 log sum_k exp(eta_k)   0 (y one-hot)                softmax
gaussian     means, unit variance   |eta|^2 / 2            -|y|^2 / 2 - (K/2) ln 2 pi   identity
poisson      log-rates              sum_k exp(eta_k)       -sum_k ln(y_k!)              exp
===========  =====================  =====================  ===========================  ==========

The ensemble is the normalised geometric mean of its members, which is the same family with
the mean natural parameter ``eta_bar`` (Eq. 2, 3): :func:`combine` returns ``eta_bar`` and
:func:`predict` the ensemble's mean ``y_bar = grad A(eta_bar)``.

The categorical loss is the hot path of training: with 256 members of 10 classes a naive
loss (softmax over a last dimension of 10) costs more than the network's matmuls. Its
forward and backward are one :class:`torch.autograd.Function` that works on a
``(K, M + 1, N)`` copy of ``eta`` (members and ensemble side by side, classes leading, so
every reduction over classes is over the leading dimension) and applies the closed-form
gradient of Eq. (8).
"""

import math
import numbers
from typing import Literal, NamedTuple, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = [
    "FAMILIES",
    "LOG_TINY",
    "REDUCTIONS",
    "CategoricalSoftmax",
    "LossParts",
    "ModularLoss",
    "check_choice",
    "check_eta",
    "check_target",
    "combine",
    "member_nll",
    "modular_loss",
    "modular_loss_and_softmax",
    "predict",
    "reduce_loss",
]

FAMILIES = ("categorical", "gaussian", "poisson")
REDUCTIONS = ("none", "mean", "sum")

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
# Softmax numerators below exp(-40) are raised to it. An exp that returns denormals
# (below ~1e-38) ran 36x slower on this project's CPUs, and squares of them 6x: the logits
# of a confident network. A numerator under exp(-40) ~ 4e-18 changes the partition sum
# s = sum_k exp(t_k) >= 1 by less than half a float32 ulp, so the clamp leaves the loss as
# it was, and moves a probability (and so a gradient) by at most 4e-18.
LOG_TINY = -40.0


class LossParts(NamedTuple):
    """The terms of the modular loss, reduced like the loss (``(N,)`` each for ``"none"``)
    and detached: values to log. (Differentiable, ``ensemble`` and ``members`` are
    :func:`modular_loss` at ``lam = 1`` and ``lam = 0``.)

    ``loss = members - lam * ambiguity = lam * ensemble + (1 - lam) * members``.
    """

    ensemble: Tensor
    """NLL of the ensemble ``q(y | eta_bar)``."""
    members: Tensor
    """Mean over members of the member NLLs, ``(1/M) sum_j NLL(eta_j)``."""
    ambiguity: Tensor
    """``(1/M) sum_j KL(q_bar || q_j) = members - ensemble`` (Eq. 6); target independent."""


class CategoricalSoftmax(NamedTuple):
    """The softmax that the categorical modular loss computes of every member and of the
    ensemble, classes leading: row ``j < M`` of the middle dimension is member j, row ``M``
    the ensemble ``eta_bar``. Detached; per-batch metrics read it instead of computing the
    softmax a second time (:meth:`modloss.metrics.EpochMetrics.update`)."""

    shifted: Tensor
    """``(K, M + 1, N)``: the logits minus their maximum over classes (``<= 0``, exactly 0
    at the maxima). Not used by the backward pass: its reader may overwrite it."""
    numerators: Tensor
    """``(K, M + 1, N)``: ``exp(max(shifted, LOG_TINY))``. Read by the backward pass: do
    not modify it."""
    total: Tensor
    """``(M + 1, N)``: ``numerators`` summed over classes."""


# --------------------------------------------------------------------------- validation
# Public for the other losses of this package (modloss.dutt): the same checks, same messages.


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _check_lam(lam: object) -> float:
    """``lam`` as a float, or ``ValueError`` unless it is one finite real number in [0, 1]."""
    if isinstance(lam, Tensor):
        if lam.numel() != 1:
            raise ValueError(
                f"lam must be a single number, got a tensor of shape {tuple(lam.shape)}"
            )
        if lam.dtype == torch.bool or lam.is_complex():
            raise ValueError(f"lam must be a real number in [0, 1], got a {lam.dtype} tensor")
        lam = lam.item()
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise ValueError(f"lam must be a real number in [0, 1], got {type(lam).__name__} {lam!r}")
    value = float(lam)
    if not math.isfinite(value):
        raise ValueError(f"lam must be a finite number in [0, 1], got {value}")
    if value > 1.0:
        raise ValueError(
            f"lam must be in [0, 1], got {value}: with lam > 1 the loss is unbounded below "
            "while the ensemble NLL grows without bound (Theorem 1)"
        )
    if value < 0.0:
        raise ValueError(
            f"lam must be in [0, 1], got {value}: lam interpolates between independent "
            "(0) and joint (1) training"
        )
    return value


def check_eta(eta: object) -> Tensor:
    if not isinstance(eta, Tensor):
        raise ValueError(f"eta must be a tensor of shape (M, N, K), got {type(eta).__name__}")
    if eta.ndim != 3:
        raise ValueError(
            f"eta must have shape (M, N, K) = (members, examples, outputs), "
            f"got {eta.ndim}-d shape {tuple(eta.shape)}"
        )
    if eta.shape[0] == 0:
        raise ValueError(f"eta has no members: shape {tuple(eta.shape)} has M = 0")
    if eta.shape[2] == 0:
        raise ValueError(f"eta has no outputs: shape {tuple(eta.shape)} has K = 0")
    if not eta.is_floating_point():
        raise ValueError(f"eta must be a floating-point tensor, got dtype {eta.dtype}")
    return eta


def check_target(eta: Tensor, target: object, family: str) -> Tensor:
    """The target in the shape the family's code reads: ``(N,)`` int64 class indices for
    categorical, ``(N, K)`` values of ``eta``'s dtype otherwise."""
    if not isinstance(target, Tensor):
        raise ValueError(f"target must be a tensor, got {type(target).__name__}")
    _, n, k = eta.shape
    if family == "categorical":
        if target.dtype != torch.int64:
            raise ValueError(
                f"target must hold int64 class indices for family='categorical', "
                f"got dtype {target.dtype}"
            )
        if target.shape != (n,):
            raise ValueError(
                f"target must have shape (N,) = ({n},) to match eta of shape "
                f"{tuple(eta.shape)}, got {tuple(target.shape)}"
            )
        # On an accelerator the check would cost a device-to-host sync on every call; there
        # an out-of-range index trips the device-side assert of the gather instead.
        if target.device.type == "cpu" and n > 0:
            bounds = torch.aminmax(target)
            low, high = int(bounds.min), int(bounds.max)
            if low < 0 or high >= k:
                raise ValueError(
                    f"target holds class indices outside [0, K) = [0, {k}): min {low}, max {high}"
                )
        return target
    if target.dtype == torch.bool or target.is_complex():
        raise ValueError(
            f"target must hold real values for family={family!r}, got dtype {target.dtype}"
        )
    if target.shape == (n,) and k == 1:
        target = target.unsqueeze(1)
    if target.shape != (n, k):
        allowed = f"(N, K) = ({n}, {k})" + (f" or (N,) = ({n},)" if k == 1 else "")
        raise ValueError(
            f"target must have shape {allowed} to match eta of shape {tuple(eta.shape)}, "
            f"got {tuple(target.shape)}"
        )
    return target.to(eta.dtype)


# --------------------------------------------------------------------------- per example


def reduce_loss(x: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    return x


class _CategoricalModularLoss(torch.autograd.Function):
    """Categorical modular loss, with the per-example ensemble NLL and ambiguity as
    non-differentiable by-products.

    Per example, with ``A`` the logsumexp over classes and ``q = softmax``:

        ensemble  = A(eta_bar) - eta_bar[y]
        ambiguity = (1/M) sum_j A(eta_j) - A(eta_bar)
        loss      = ensemble + (1 - lam) * ambiguity

    and the backward is Eq. (8), ``w (q_j - e_y - lam (q_j - q_bar)) / M`` with ``w`` the
    example's weight in the reduction, from the softmax numerators kept by the forward pass.
    With a list ``keep``, the forward appends its :class:`CategoricalSoftmax` to it.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        eta: Tensor,
        target: Tensor,
        lam: float,
        reduction: str,
        keep: list[CategoricalSoftmax] | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        m, n, k = eta.shape
        # Half-precision logits are reduced in float32, as torch's own softmax does.
        work = torch.promote_types(eta.dtype, torch.float32)
        # Classes lead so that every reduction over them runs over the leading dimension:
        # on CPU that is ~5x faster than over a contiguous last dimension of 10.
        z = eta.new_empty((k, m + 1, n), dtype=work)
        members = z.narrow(1, 0, m)  # (K, M, N)
        members.copy_(eta.permute(2, 0, 1))
        eta_bar = torch.mean(members, dim=1, out=z.select(1, m))  # (K, N), Eq. (3)
        target_logit = eta_bar.gather(0, target.view(1, n)).view(n)
        shift = z.amax(0)  # (M + 1, N)
        z.sub_(shift)  # shifted logits
        # Kept apart from the numerators only when asked for: a second (K, M + 1, N) buffer
        # costs the plain loss a third more on CPU (page faults of fresh memory).
        numerators = (z.clamp(min=LOG_TINY) if keep is not None else z.clamp_(min=LOG_TINY)).exp_()
        total = numerators.sum(0)  # (M + 1, N)
        log_partition = total.log().add_(shift)  # A(eta_j) for j < M, then A(eta_bar)
        ensemble = log_partition[m] - target_logit
        ambiguity = log_partition[:m].mean(0).sub_(log_partition[m])
        loss = reduce_loss(torch.add(ensemble, ambiguity, alpha=1.0 - lam), reduction)
        ctx.save_for_backward(numerators, total, target)
        if keep is not None:
            keep.append(CategoricalSoftmax(z, numerators, total))
        ctx.lam, ctx.reduction, ctx.dtype = lam, reduction, eta.dtype
        ensemble, ambiguity = ensemble.to(eta.dtype), ambiguity.to(eta.dtype)
        ctx.mark_non_differentiable(ensemble, ambiguity)
        return loss.to(eta.dtype), ensemble, ambiguity

    @staticmethod
    @once_differentiable
    def backward(
        ctx: FunctionCtx, grad_loss: Tensor, *_: Tensor
    ) -> tuple[Tensor, None, None, None, None]:
        z, total, target = ctx.saved_tensors
        k, m1, n = z.shape
        m, lam = m1 - 1, ctx.lam
        weight = grad_loss.to(z.dtype) / m  # (), or (N,) for reduction="none"
        if ctx.reduction == "mean":
            weight = weight / n
        # w (lam q_bar - e_y) / M, shared by all members
        common = z[:, m] * ((lam * weight) / total[m])  # (K, N)
        common.scatter_add_(0, target.view(1, n), weight.neg().expand(1, n))
        scale = ((1.0 - lam) * weight) / total[:m]  # (M, N): w (1 - lam) q_j / (M exp_j)
        grad = torch.addcmul(common.unsqueeze(1), z[:, :m], scale)  # (K, M, N)
        # A permuted view: matmul backward reads it with a transposed-operand flag, so a
        # contiguous copy here would only cost time.
        return grad.permute(1, 2, 0).to(ctx.dtype), None, None, None, None


def _gaussian_parts(eta: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    eta_bar = eta.mean(0)  # (N, K)
    k = eta.shape[2]
    ensemble = 0.5 * (target - eta_bar).square().sum(-1) + k * _HALF_LOG_2PI
    # KL(q_bar || q_j) = |eta_j - eta_bar|^2 / 2: a sum of squares, no cancellation
    ambiguity = 0.5 * (eta - eta_bar).square().mean(0).sum(-1)
    return ensemble, ambiguity


def _poisson_parts(eta: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    eta_bar = eta.mean(0)  # (N, K)
    rate = eta_bar.exp()
    ensemble = (rate - eta_bar * target + torch.lgamma(target + 1)).sum(-1)
    # KL(q_bar || q_j) = exp(eta_bar) (expm1(d) - d), d = eta_j - eta_bar: each term is
    # >= 0 as computed, and expm1 keeps the precision that the equivalent
    # exp(eta_j) - exp(eta_bar) - exp(eta_bar) d loses when members agree.
    d = eta - eta_bar
    ambiguity = (rate * (torch.expm1(d) - d).mean(0)).sum(-1)
    return ensemble, ambiguity


# --------------------------------------------------------------------------- public API


def combine(eta: Tensor) -> Tensor:
    """Ensemble natural parameter ``eta_bar = (1/M) sum_j eta_j`` (Eq. 3): ``(M, N, K) ->
    (N, K)``. The ensemble distribution is ``q(y | eta_bar)``, the normalised geometric mean
    of the members' distributions (Eq. 2)."""
    return check_eta(eta).mean(0)


def predict(eta: Tensor, family: str = "categorical") -> Tensor:
    """Ensemble mean ``y_bar = grad A(eta_bar)``: ``(M, N, K) -> (N, K)``.

    Softmax of the mean logits (categorical), the mean of the member means (gaussian), or
    the exponential of the mean log-rate, i.e. the geometric mean of the rates (poisson).
    """
    family = check_choice("family", family, FAMILIES)
    eta_bar = combine(eta)
    if family == "categorical":
        return eta_bar.softmax(-1)
    if family == "poisson":
        return eta_bar.exp()
    return eta_bar


def member_nll(eta: Tensor, target: Tensor, family: str = "categorical") -> Tensor:
    """Full NLL of each member on each example, ``(M, N)``: ``A(eta_j) - eta_j . y - ln h(y)``,
    constants included and summed over the K outputs of a regression target.

    Args:
        eta: member natural parameters ``(M, N, K)``.
        target: ``(N,)`` int64 class indices (categorical); ``(N, K)`` values, or ``(N,)``
            when ``K == 1`` (gaussian, poisson).
        family: ``"categorical"``, ``"gaussian"`` or ``"poisson"``.
    """
    family = check_choice("family", family, FAMILIES)
    eta = check_eta(eta)
    target = check_target(eta, target, family)
    m, n, _ = eta.shape
    if family == "categorical":
        # logsumexp over a leading class dimension: see _CategoricalModularLoss.forward
        log_partition = torch.logsumexp(eta.permute(2, 0, 1).contiguous(), dim=0)  # (M, N)
        index = target.view(1, n, 1).expand(m, n, 1)
        return log_partition - eta.gather(2, index).squeeze(2)
    if family == "gaussian":
        return 0.5 * (target - eta).square().sum(-1) + eta.shape[2] * _HALF_LOG_2PI
    return (eta.exp() - eta * target + torch.lgamma(target + 1)).sum(-1)


@overload
def modular_loss(
    eta: Tensor,
    target: Tensor,
    lam: float,
    *,
    family: str = ...,
    reduction: str = ...,
    return_parts: Literal[False] = ...,
) -> Tensor: ...


@overload
def modular_loss(
    eta: Tensor,
    target: Tensor,
    lam: float,
    *,
    family: str = ...,
    reduction: str = ...,
    return_parts: Literal[True],
) -> tuple[Tensor, LossParts]: ...


def modular_loss(
    eta: Tensor,
    target: Tensor,
    lam: float,
    *,
    family: str = "categorical",
    reduction: str = "mean",
    return_parts: bool = False,
) -> Tensor | tuple[Tensor, LossParts]:
    r"""Modular loss of an ensemble (Eq. 4, 6, 7).

    With member natural parameters ``eta_j`` and their mean ``eta_bar`` (Eq. 3), per example

        L_lam = lam * NLL(eta_bar) + (1 - lam) * (1/M) sum_j NLL(eta_j)              (7)

    which is Eq. (4), ``lam KL(p || q_bar) + (1 - lam) (1/M) sum_j KL(p || q_j)``, up to the
    entropy of the data distribution ``p``. By the ambiguity decomposition it is also

        L_lam = (1/M) sum_j NLL(eta_j) - lam * (1/M) sum_j KL(q_bar || q_j)           (6)

    with the target-independent ambiguity ``(1/M) sum_j KL(q_bar || q_j) = (1/M) sum_j
    A(eta_j) - A(eta_bar)``. ``lam = 0`` trains the members independently (each gradient
    scaled by 1/M), ``lam = 1`` trains the ensemble as one network. The gradient for
    member ``j`` has the same form in every family (Eq. 8):

        dL_lam / d eta_j = (1/M) (y_hat_j - y - lam (y_hat_j - y_bar))                 (8)

    with ``y_hat_j = grad A(eta_j)`` and ``y_bar = grad A(eta_bar)``; ``reduction="mean"``
    divides it by N.

    Args:
        eta: member natural parameters ``(M, N, K)``: logits (categorical), means
            (gaussian, unit variance: Negative Correlation Learning), log-rates (poisson).
        target: ``(N,)`` int64 class indices (categorical); ``(N, K)`` values, or ``(N,)``
            when ``K == 1`` (gaussian, poisson). Class indices are range-checked only for
            CPU tensors: elsewhere that would cost a device-to-host sync per call.
        lam: weight of the ensemble NLL, a finite number in [0, 1]; ``lam > 1`` makes the
            loss unbounded below (Theorem 1).
        family: ``"categorical"``, ``"gaussian"`` or ``"poisson"``.
        reduction: ``"mean"`` or ``"sum"`` over examples, or ``"none"``.
        return_parts: also return the :class:`LossParts` (ensemble NLL, mean member NLL,
            ambiguity), reduced like the loss and detached: by-products of the same forward
            pass, for logging.

    Returns:
        The loss, a scalar or ``(N,)`` for ``reduction="none"``; with ``return_parts``,
        ``(loss, LossParts(ensemble, members, ambiguity))``.

    Shape:
        - eta: ``(M, N, K)``
        - target: ``(N,)`` or ``(N, K)``
        - output: ``()``, or ``(N,)`` with ``reduction="none"``

    The categorical gradient is computed in closed form and is not differentiable twice.

    Examples::

        >>> eta = torch.randn(16, 32, 10, requires_grad=True)  # 16 members, 32 examples
        >>> target = torch.randint(0, 10, (32,))
        >>> loss = modular_loss(eta, target, lam=0.9)
        >>> loss.backward()
        >>> loss, parts = modular_loss(eta.detach(), target, 0.9, return_parts=True)
        >>> torch.allclose(loss, parts.members - 0.9 * parts.ambiguity)
        True
    """
    loss, ensemble, ambiguity = _modular_loss(eta, target, lam, family, reduction, None)
    if not return_parts:
        return loss
    parts = LossParts(
        ensemble=reduce_loss(ensemble, reduction),
        members=reduce_loss(ensemble + ambiguity, reduction),
        ambiguity=reduce_loss(ambiguity, reduction),
    )
    return loss, parts


def modular_loss_and_softmax(
    eta: Tensor,
    target: Tensor,
    lam: float,
    *,
    family: str = "categorical",
    reduction: str = "mean",
) -> tuple[Tensor, CategoricalSoftmax | None]:
    """:func:`modular_loss` and the :class:`CategoricalSoftmax` it computed on the way, for
    the metrics of the same batch; ``None`` where it computes none (a lone member, whose
    loss is one ``cross_entropy``, and the regression families)."""
    keep: list[CategoricalSoftmax] = []
    loss = _modular_loss(eta, target, lam, family, reduction, keep)[0]
    return loss, keep[0] if keep else None


def _modular_loss(
    eta: Tensor,
    target: Tensor,
    lam: float,
    family: str,
    reduction: str,
    keep: list[CategoricalSoftmax] | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The loss and the per-example (detached) ensemble NLL and ambiguity; the categorical
    loss of several members appends its softmax to ``keep``."""
    lam = _check_lam(lam)
    family = check_choice("family", family, FAMILIES)
    reduction = check_choice("reduction", reduction, REDUCTIONS)
    eta = check_eta(eta)
    target = check_target(eta, target, family)
    if family == "categorical" and eta.shape[0] == 1:
        # A lone member is its own ensemble, with no ambiguity: one fused cross_entropy.
        ensemble = F.cross_entropy(eta[0], target, reduction="none")
        loss = reduce_loss(ensemble, reduction)
        ensemble = ensemble.detach()
        ambiguity = torch.zeros_like(ensemble)
    elif family == "categorical":
        loss, ensemble, ambiguity = _CategoricalModularLoss.apply(eta, target, lam, reduction, keep)
    else:
        parts = _gaussian_parts if family == "gaussian" else _poisson_parts
        ensemble, ambiguity = parts(eta, target)
        # members = ensemble + ambiguity, so L = members - lam * ambiguity (Eq. 6) is:
        loss = reduce_loss(torch.add(ensemble, ambiguity, alpha=1.0 - lam), reduction)
        ensemble, ambiguity = ensemble.detach(), ambiguity.detach()
    return loss, ensemble, ambiguity


class ModularLoss(nn.Module):
    r"""Modular loss of an ensemble: :func:`modular_loss` as a module.

    Per example, with ``eta_bar = (1/M) sum_j eta_j`` (Eq. 3),

        L_lam = lam KL(p || q_bar) + (1 - lam) (1/M) sum_j KL(p || q_j)                (4)
              = lam NLL(eta_bar) + (1 - lam) (1/M) sum_j NLL(eta_j) + C                (7)
              = (1/M) sum_j NLL(eta_j) - lam (1/M) sum_j KL(q_bar || q_j)  (+ C)       (6)

        dL_lam / d eta_j = (1/M) (y_hat_j - y - lam (y_hat_j - y_bar))                 (8)

    Args:
        lam: weight of the ensemble NLL, a finite number in [0, 1] (0: independent
            training, 1: joint training; ``lam > 1`` is unbounded below, Theorem 1).
        family: ``"categorical"`` (logits), ``"gaussian"`` (unit-variance means) or
            ``"poisson"`` (log-rates).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the N examples.

    Shape:
        - eta: ``(M, N, K)`` member natural parameters
        - target: ``(N,)`` int64 classes (categorical); ``(N, K)``, or ``(N,)`` when
          ``K == 1``, values (gaussian, poisson)
        - output: ``()``, or ``(N,)`` with ``reduction="none"``

    Examples::

        >>> criterion = ModularLoss(0.95)
        >>> eta = torch.randn(256, 100, 10, requires_grad=True)
        >>> criterion(eta, torch.randint(0, 10, (100,))).backward()
    """

    def __init__(self, lam: float, *, family: str = "categorical", reduction: str = "mean") -> None:
        super().__init__()
        self.lam = _check_lam(lam)
        self.family = check_choice("family", family, FAMILIES)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def forward(self, eta: Tensor, target: Tensor) -> Tensor:
        return modular_loss(eta, target, self.lam, family=self.family, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, family={self.family!r}, reduction={self.reduction!r}"
