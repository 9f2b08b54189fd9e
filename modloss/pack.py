"""Packed trials: the runs of G configs that differ only in fusible settings, trained as one
batched model of ``G x M`` members (HFTA's idea, REFERENCE.md "Peers").

Group ``g`` of the pack is members ``[g*M, (g+1)*M)``, initialised as config g's own run.
Groups share no parameter: the shared-input first layer is one matmul with ``G*M`` outputs
but per-member weights, so the sum of the groups' modular losses gives each group exactly
its own gradient. :class:`PackedSGD` then applies each group's own SGD settings.
:func:`modloss.train.fit_pack` runs the pack through the one epoch loop of modloss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from modloss.config import TrainConfig
from modloss.metrics import EpochMetrics, evaluate_groups
from modloss.models import EnsembleModel
from modloss.parallel import merge_member_states
from modloss.strategies import SingleDevice

__all__ = ["FUSIBLE_KEYS", "PackedSGD", "PackedStrategy", "check_fusible", "pack_models"]

# The settings that may differ between the runs of a pack: the loss and the optimiser.
FUSIBLE_KEYS = frozenset(
    {"lam", "lr", "momentum", "weight_decay", "nesterov", "milestones", "gamma"}
)
# The torch.optim.SGD settings PackedSGD reads per group.
FUSED_SGD_KEYS = ("lr", "momentum", "weight_decay", "nesterov")


def check_fusible(configs: Sequence[TrainConfig]) -> None:
    """Raise ``ValueError`` naming the first non-fusible key in which ``configs`` differ."""
    if not configs:
        raise ValueError("configs: a pack needs at least one config")
    dumps = [c.model_dump() for c in configs]
    for key in dumps[0]:
        values = [d[key] for d in dumps]
        if key not in FUSIBLE_KEYS and any(v != values[0] for v in values):
            raise ValueError(
                f"configs differ in the non-fusible key {key!r} ({values}); only "
                f"{', '.join(sorted(FUSIBLE_KEYS))} may differ within a pack"
            )


def pack_models(models: Sequence[EnsembleModel]) -> EnsembleModel:
    """One model of ``G*M`` members whose group g is a copy of ``models[g]`` (the same
    architecture, dtype and device, ``M`` members each)."""
    first = models[0]
    config = {**first.config, "num_members": sum(m.num_members for m in models)}
    reference = next(first.parameters())
    pack = type(first)(**config, seed=0).to(device=reference.device, dtype=reference.dtype)
    pack.load_state_dict(merge_member_states([m.state_dict() for m in models]))
    return pack.train(first.training)


class PackedSGD(torch.optim.Optimizer):
    """``torch.optim.SGD`` (momentum, Nesterov, weight decay added to the gradient, no
    dampening) on the parameters of a pack, with group g's learning rate, momentum, weight
    decay and Nesterov flag read at every step from ``shadows[g]``, a ``torch.optim.SGD`` over
    config g's own model (its scheduler sets its learning rate; its state is what group g's
    checkpoint holds, see :meth:`export`).

    A zero momentum buffer stands for torch's "no buffer yet": with no dampening the first
    step ``buf = 0 * momentum + grad`` is ``grad`` exactly, as torch's ``clone(grad)``.
    """

    def __init__(self, params: Any, shadows: Sequence[torch.optim.SGD], group_size: int) -> None:
        super().__init__(params, {})
        self.shadows, self.group_size = list(shadows), group_size
        self.live = [True] * len(self.shadows)
        self._vectors: dict[tuple[Any, ...], Tensor] = {}  # _factor's per-member tensors
        for k, p in enumerate(self.param_groups[0]["params"]):
            parts = []
            for shadow in self.shadows:
                own = shadow.param_groups[0]["params"][k]
                buf = shadow.state.get(own, {}).get("momentum_buffer")
                parts.append(torch.zeros_like(own, device=p.device) if buf is None else buf)
            self.state[p]["momentum_buffer"] = torch.cat(parts).to(p)  # (G*M, ...)

    def _values(self, key: str) -> tuple[Any, ...]:
        """Each group's ``key`` now; a frozen (diverged or stopped) group's lr is 0."""
        values = tuple(s.param_groups[0][key] for s in self.shadows)
        if key == "lr":
            return tuple(v if live else 0.0 for v, live in zip(values, self.live, strict=True))
        return values

    def _factor(self, values: tuple[Any, ...], ref: Tensor) -> float | Tensor:
        """``values`` (one per group) as a float when the groups share it, so that the step
        is torch.optim.SGD's own arithmetic; else each group's value repeated over its
        members, shaped to broadcast on ``ref`` (made once per value, device and shape)."""
        if len(set(values)) == 1:
            return float(values[0])
        key = (values, ref.dtype, ref.device, ref.ndim)
        if key not in self._vectors:
            per = torch.tensor([float(v) for v in values], dtype=ref.dtype, device=ref.device)
            shape = (-1, *[1] * (ref.ndim - 1))
            self._vectors[key] = per.repeat_interleave(self.group_size).view(shape)
        return self._vectors[key]

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        hyper = {key: self._values(key) for key in FUSED_SGD_KEYS}
        nesterov = set(hyper["nesterov"])
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                continue
            d_p = p.grad
            if set(hyper["weight_decay"]) != {0}:
                d_p = _axpy(d_p, self._factor(hyper["weight_decay"], p), p)
            momentum = self._factor(hyper["momentum"], p)
            buf = self.state[p]["momentum_buffer"]
            buf.mul_(momentum).add_(d_p)
            if nesterov == {True}:
                d_p = _axpy(d_p, momentum, buf)
            elif nesterov == {False, True}:
                mask = self._factor(hyper["nesterov"], p).bool()
                d_p = torch.where(mask, _axpy(d_p, momentum, buf), buf)
            elif set(hyper["momentum"]) != {0}:
                d_p = buf
            lr = self._factor(hyper["lr"], p)
            if isinstance(lr, float):
                p.add_(d_p, alpha=-lr)
            else:
                p.addcmul_(lr, d_p, value=-1.0)

    def freeze(self, g: int) -> None:
        """Stop updating group ``g``."""
        self.live[g] = False

    def export(self, g: int) -> None:
        """Copy group g's momentum buffers into ``shadows[g]``'s state."""
        lo, hi = g * self.group_size, (g + 1) * self.group_size
        shadow = self.shadows[g]
        params = zip(self.param_groups[0]["params"], shadow.param_groups[0]["params"], strict=True)
        for p, own in params:
            buf = self.state[p]["momentum_buffer"][lo:hi]
            shadow.state[own]["momentum_buffer"] = buf.detach().clone().to(own.device)


def _axpy(x: Tensor, factor: float | Tensor, y: Tensor) -> Tensor:
    """``x + factor * y``, ``factor`` a number or a per-member tensor."""
    return x.add(y, alpha=factor) if isinstance(factor, float) else x.addcmul(factor, y)


class PackedStrategy(SingleDevice):
    """One process training a pack: one forward per batch, the sum of the groups' modular
    losses, metrics per group. The ``group_*`` methods return one entry per group, ``None``
    for a frozen group (diverged or stopped: out of the loss and the metrics)."""

    name = "pack"

    def prepare_pack(
        self,
        models: Sequence[EnsembleModel],
        device: torch.device,
        *,
        family: str,
        lams: Sequence[float],
        num_classes: int,
    ) -> EnsembleModel:
        """The pack of ``models`` (group g trained at ``lams[g]``) on ``device``."""
        self.family, self.lams, self.num_classes = family, list(lams), num_classes
        self.group_size = models[0].num_members
        self.live = [True] * len(models)
        self.model = pack_models(models).to(device)
        self.net = self.model
        self.num_members = self.model.num_members
        return self.model

    def _slice(self, g: int) -> slice:
        return slice(g * self.group_size, (g + 1) * self.group_size)

    def freeze(self, g: int) -> None:
        self.live[g] = False

    def start_epoch(self) -> None:
        self.comm.reset()
        self.steps = 0
        self.group_metrics = [
            EpochMetrics(self.family, lam) if live else None
            for lam, live in zip(self.lams, self.live, strict=True)
        ]

    def step_loss(self, x: Tensor, y: Tensor) -> Tensor:
        eta = self.net(x)  # (G*M, B, K)
        self.steps += 1
        loss = eta.new_zeros(())
        for g, metrics in enumerate(self.group_metrics):
            if metrics is not None:
                eta_g = eta[self._slice(g)]  # (M, B, K)
                loss = loss + self._recorded_loss(eta_g, y, self.lams[g], metrics)
        return loss

    def group_train_metrics(self) -> list[dict[str, Any] | None]:
        return [None if m is None else m.compute() for m in self.group_metrics]

    @torch.no_grad()
    def group_evaluate(
        self,
        x: Tensor,
        y: Tensor,
        *,
        batch_size: int,
        keep_eta: bool,
        groups: list[int] | None = None,
    ) -> list[tuple[dict[str, Any], Tensor | None] | None]:
        wanted = [g for g, live in enumerate(self.live) if live] if groups is None else groups
        kw = {"family": self.family, "lams": self.lams, "batch_size": batch_size}
        return evaluate_groups(self.model, x, y, keep_eta=keep_eta, groups=wanted, **kw)

    def group_state(self, g: int) -> dict[str, Tensor]:
        return {k: v[self._slice(g)] for k, v in self.model.state_dict().items()}

    def load_group_state(self, g: int, state: dict[str, Tensor]) -> None:
        for k, v in self.model.state_dict().items():
            v[self._slice(g)] = state[k].to(v)
