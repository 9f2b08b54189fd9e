"""Distributed training of an ensemble in plain ``torch.distributed``: module parallelism
(the paper's section 3.3) and data parallelism (DDP with a sharded on-device loader).

Module parallelism. Rank ``r`` holds members ``shard`` of an ``M``-member ensemble and the
whole batch. It computes its members' natural parameters ``eta_j`` ``(M_r, B, K)``; one
all-reduce of their sum, ``B x K`` floats whatever the size of the network, gives every rank
the ensemble natural parameter ``eta_bar = (1/M) sum_j eta_j``. The modular loss's gradient
with respect to one member (Eq. 8),

    dL/d eta_j = (1/M) (y_hat_j - y - lam (y_hat_j - y_bar)),

needs only ``eta_j`` and ``y_bar = f^-1(eta_bar)``, so each rank back-propagates locally and
no parameter gradient is ever exchanged. :func:`module_parallel_loss` builds the local
objective whose autograd gradient is exactly Eq. 8: the ensemble term sees ``eta_bar`` with
the other ranks' members detached, the member term only the local members.

Data parallelism. Every rank iterates the same globally shuffled batches (same
``torch.Generator`` seed) and keeps a disjoint contiguous slice of each (:func:`shard_batch`),
then DDP averages the parameter gradients (``P`` floats per step, ``P`` the parameter count).
With a batch-mean loss the result equals single-process training, except for BatchNorm,
which normalises each shard with that shard's statistics ("ghost" batch norm over
``B / W`` examples) instead of the whole batch's.

:class:`Communicator` wraps the collectives and counts the floats they carry, so that the two
schemes' traffic can be measured rather than asserted; :func:`count_ddp_traffic` does the same
for DDP's gradient buckets.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from modloss.losses import member_nll

__all__ = [
    "Communicator",
    "ShardLoss",
    "count_ddp_traffic",
    "ddp_floats_per_step",
    "load_member_slice",
    "member_shard",
    "member_shards",
    "merge_member_states",
    "module_parallel_floats_per_step",
    "module_parallel_loss",
    "shard_batch",
    "sharded_batches",
]


class Communicator:
    """The collectives of one process group, counting what they carry.

    ``floats`` is the number of tensor elements handed to collectives (the payload; a ring
    all-reduce moves about ``2 (W - 1) / W`` times that per rank, the same factor for every
    scheme) and ``calls`` the number of collectives. With ``group=None`` the default group is
    used; outside an initialised process group the communicator acts as a world of one.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.floats = 0
        self.calls = 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    def reset(self) -> None:
        self.floats = 0
        self.calls = 0

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the group in place and return it."""
        self.floats += tensor.numel()
        self.calls += 1
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor: Tensor, dim: int = 0) -> Tensor:
        """Concatenate every rank's ``tensor`` along ``dim`` in rank order.

        Shapes may differ along ``dim`` (uneven shards); every other dimension must agree.
        """
        self.floats += tensor.numel()
        self.calls += 1
        if self.world_size == 1:
            return tensor
        sizes = torch.zeros(self.world_size, dtype=torch.int64, device=tensor.device)
        sizes[self.rank] = tensor.shape[dim]
        dist.all_reduce(sizes, group=self.group)
        moved = tensor.movedim(dim, 0).contiguous()
        width = int(sizes.max())
        padded = moved.new_zeros((width, *moved.shape[1:]))
        padded[: moved.shape[0]] = moved
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        out = torch.cat([p[: int(s)] for p, s in zip(parts, sizes.tolist(), strict=True)])
        return out.movedim(0, dim)

    def all_gather_object(self, obj: object) -> list[object]:
        """Every rank's picklable ``obj``, in rank order (small per-epoch records; not
        counted in ``floats``)."""
        self.calls += 1
        if self.world_size == 1:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, tensor: Tensor, src: int = 0) -> Tensor:
        """Overwrite ``tensor`` with rank ``src``'s copy, in place."""
        self.floats += tensor.numel()
        self.calls += 1
        if self.world_size > 1:
            dist.broadcast(tensor, src=src, group=self.group)
        return tensor


# --- module parallelism -----------------------------------------------------------------


def member_shards(num_members: int, world_size: int) -> list[range]:
    """Contiguous member ranges of each rank; the first ``M % W`` ranks get one more."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if num_members < world_size:
        raise ValueError(
            f"num_members ({num_members}) must be >= world_size ({world_size}): "
            "every rank needs at least one member"
        )
    base, extra = divmod(num_members, world_size)
    shards, start = [], 0
    for r in range(world_size):
        stop = start + base + (r < extra)
        shards.append(range(start, stop))
        start = stop
    return shards


def member_shard(num_members: int, world_size: int, rank: int) -> range:
    """The members held by ``rank``: see :func:`member_shards`."""
    return member_shards(num_members, world_size)[rank]


def load_member_slice(
    shard_model: nn.Module, full_state: Mapping[str, Tensor], members: range
) -> nn.Module:
    """Load members ``members`` of a full ensemble's ``state_dict`` into ``shard_model``
    (the same architecture built with ``num_members=len(members)``) and return it.

    Every parameter and buffer of a modloss ensemble has the member dimension first, so the
    slice is ``[members.start:members.stop]`` of each tensor.
    """
    if members.step != 1 or len(members) != shard_model.num_members:
        raise ValueError(
            f"members {members} must be a contiguous range of "
            f"shard_model.num_members={shard_model.num_members} members"
        )
    shard_model.load_state_dict({k: v[members.start : members.stop] for k, v in full_state.items()})
    return shard_model


def merge_member_states(shard_states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Inverse of :func:`load_member_slice`: the full ensemble's ``state_dict`` from every
    rank's shard, in rank order."""
    return {k: torch.cat([s[k] for s in shard_states]) for k in shard_states[0]}


class ShardLoss(NamedTuple):
    """What :func:`module_parallel_loss` returns; all but ``objective`` are detached."""

    objective: Tensor  # scalar to back-propagate: the full loss's gradients for local members
    eta_bar: Tensor  # (N, K) ensemble natural parameter, the same on every rank
    ensemble_nll: Tensor  # (N,) NLL of the ensemble
    member_nll: Tensor  # (M_r, N) NLL of each local member


def module_parallel_loss(
    eta: Tensor,
    target: Tensor,
    lam: float,
    *,
    num_members: int,
    comm: Communicator,
    family: str = "categorical",
    reduction: str = "mean",
) -> ShardLoss:
    """The modular loss of one rank's members, with one all-reduce of ``B x K`` floats.

    Args:
        eta: ``(M_r, B, K)`` natural parameters of this rank's members.
        target: the batch's targets, the same on every rank (see ``modular_loss``).
        lam: the modular-loss weight.
        num_members: ``M``, the size of the whole ensemble.
        comm: the group whose ranks hold the other members.
        family, reduction: as for ``modular_loss`` (``"mean"`` over the batch or ``"sum"``).

    The local objective is ``lam NLL(eta_bar) + (1 - lam) (1/M) sum_{j local} NLL(eta_j)``
    with ``eta_bar`` built from the all-reduced sum in which only the local members carry
    gradient (weight ``1/M``). Its gradient with respect to a local ``eta_j`` is
    ``(1/M) (lam (y_bar - y) + (1 - lam) (y_hat_j - y))``, which is Eq. 8; summed over ranks
    the gradients are those of ``modular_loss`` on all ``M`` members. Its value is not the
    modular loss (every rank counts the ensemble term); ``ensemble_nll`` and ``member_nll``
    give the parts for metrics.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    local = eta.sum(0)  # (B, K)
    total = comm.all_reduce(local.detach().clone())  # (B, K): the only per-step traffic
    # Value: the all-reduced total; gradient: 1/M to the local members only.
    eta_bar = (total + (local - local.detach())) / num_members  # (B, K)
    ensemble = member_nll(eta_bar.unsqueeze(0), target, family)[0]  # (B,)
    members = member_nll(eta, target, family)  # (M_r, B)
    per_example = lam * ensemble + (1 - lam) * members.sum(0) / num_members  # (B,)
    objective = per_example.mean() if reduction == "mean" else per_example.sum()
    return ShardLoss(objective, eta_bar.detach(), ensemble.detach(), members.detach())


def module_parallel_floats_per_step(batch_size: int, num_classes: int) -> int:
    """Floats each rank hands to collectives per module-parallel step: ``B x K``."""
    return batch_size * num_classes


# --- data parallelism ---------------------------------------------------------------------


def shard_batch(x: Tensor, y: Tensor, rank: int, world_size: int) -> tuple[Tensor, Tensor, float]:
    """Rank ``rank``'s contiguous slice of a global batch, and the weight of its loss.

    DDP averages the ranks' gradients, which equals the gradient of the global batch mean
    only when the shards are equal; multiplying each shard's mean loss by
    ``weight = W n_r / n`` makes it exact for uneven shards too.
    """
    n = x.shape[0]
    bounds = [n * r // world_size for r in range(world_size + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    return x[lo:hi], y[lo:hi], world_size * (hi - lo) / n


def sharded_batches(
    batches: Iterable[tuple[Tensor, Tensor]], rank: int, world_size: int
) -> Iterator[tuple[Tensor, Tensor, float]]:
    """Every rank's slice of each global batch of ``batches`` (see :func:`shard_batch`).

    ``batches`` must yield the same batches on every rank: a ``DeviceLoader`` whose shuffle
    generator has the same seed everywhere.
    """
    for x, y in batches:
        yield shard_batch(x, y, rank, world_size)


def count_ddp_traffic(ddp_model: nn.parallel.DistributedDataParallel, comm: Communicator) -> None:
    """Make ``ddp_model`` all-reduce its gradient buckets through a hook that adds each
    bucket's size to ``comm.floats`` (DDP's own reducer bypasses Python collectives)."""

    # No annotations: DDP checks them at run time, where postponed ones are strings.
    def hook(state, bucket):
        state.floats += bucket.buffer().numel()
        state.calls += 1
        return default_hooks.allreduce_hook(ddp_model.process_group, bucket)

    ddp_model.register_comm_hook(comm, hook)


def ddp_floats_per_step(model: nn.Module) -> int:
    """Floats DDP all-reduces per step: one per trainable parameter."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
