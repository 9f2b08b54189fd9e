"""How :func:`modloss.train.fit` computes a step, evaluates and checkpoints in one process:
on one device (:class:`SingleDevice`), data parallel (:class:`DataParallel`, DDP) or module
parallel (:class:`ModuleParallel`, the paper's section 3.3).

A strategy is the only part of the loop that knows about other processes. It runs in the
default ``torch.distributed`` process group, set up by whoever launched the processes:
``torchrun`` (``modloss train --strategy module``, see :func:`init_process_group`) or Ray
Train (:mod:`orchestration.distributed`). Outside an initialised group every strategy is a
world of one, and equals :class:`SingleDevice`.

- ``ddp``: every rank holds the whole ensemble and takes a disjoint slice of every globally
  shuffled batch (the same loader seed everywhere); DDP averages the parameter gradients,
  ``P`` floats per step. BatchNorm normalises each slice on its own ("ghost" batch norm over
  ``batch_size / W`` examples); models without it train exactly as on one device.
- ``module``: rank ``r`` holds members ``member_shard(M, W, r)`` and the whole batch; one
  all-reduce of ``B x K`` floats per step gives the ensemble natural parameter and each
  rank back-propagates Eq. 8 locally. The same results as one device for every model.

Every rank ends an epoch with the same metrics and results: training metrics are merged
across ranks, and validation and test natural parameters are gathered (an evaluation cost
only). Rank 0 writes the results and logits; each rank writes the checkpoint of what it
holds (:attr:`Strategy.checkpoint_file`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from modloss.losses import modular_loss_and_softmax
from modloss.metrics import EpochMetrics, evaluate
from modloss.models import EnsembleModel
from modloss.names import (
    CHECKPOINT_FILE,
    RESULTS_FILE,
    SHARD_CHECKPOINT_FILE,
    TEST_LOGITS_FILE,
    VAL_LOGITS_FILE,
)
from modloss.parallel import (
    Communicator,
    count_ddp_traffic,
    load_member_slice,
    member_shard,
    merge_member_states,
    module_parallel_loss,
    shard_batch,
)

__all__ = [
    "STRATEGIES",
    "DataParallel",
    "ModuleParallel",
    "SingleDevice",
    "Strategy",
    "init_process_group",
    "load_model_state",
    "make_strategy",
]


class Strategy:
    """One process's part of a run (see the module docstring). Subclasses override the
    training step, the merge of training metrics and the gathering of evaluations."""

    name = "single"

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.comm = Communicator()  # per-step training traffic
        self.eval_comm = Communicator()  # per-epoch metrics and evaluation
        self.rank, self.world = self.comm.rank, self.comm.world_size
        self._device = None if device is None else torch.device(device)

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's results and logits."""
        return self.rank == 0

    def device(self, requested: str) -> torch.device:
        """This process's device for a config asking for ``requested``: with several
        processes on CUDA, the GPU of this process's local rank."""
        if self._device is not None:
            return self._device
        device = torch.device(requested)
        if device.type == "cuda" and self.world > 1 and device.index is None:
            local = int(os.environ.get("LOCAL_RANK", self.rank % torch.cuda.device_count()))
            return torch.device("cuda", local)
        return device

    # --- the model

    def prepare(
        self,
        full: EnsembleModel,
        device: torch.device,
        *,
        family: str,
        lam: float,
        num_classes: int,
    ) -> EnsembleModel:
        """This process's part of the freshly built ``full`` ensemble, on ``device``, to be
        trained with the modular loss of ``family`` at ``lam``."""
        self.family, self.lam, self.num_classes = family, lam, num_classes
        self.num_members = full.num_members
        self.model = full.to(device)
        self.net: nn.Module = self.model
        return self.model

    # --- training

    def start_epoch(self) -> None:
        self.metrics = EpochMetrics(self.family, self.lam)
        self.comm.reset()
        self.steps = 0

    def step_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The loss to back-propagate for one global batch; records its metrics."""
        eta = self.net(x)  # (M, B, K)
        self.steps += 1
        return self._recorded_loss(eta, y, self.lam, self.metrics)

    def _recorded_loss(self, eta: Tensor, y: Tensor, lam: float, metrics: EpochMetrics) -> Tensor:
        """The modular loss of ``eta`` at ``lam``, its batch added to ``metrics`` from the
        softmax the loss computed: the metrics' own would cost as much again."""
        loss, softmax = modular_loss_and_softmax(eta, y, lam, family=self.family)
        metrics.update(eta.detach(), y, softmax=softmax)
        return loss

    def train_metrics(self) -> dict[str, Any]:
        """The epoch's training metrics (the same on every rank)."""
        return self.metrics.compute()

    def _merged_metrics(self, *, over: str) -> dict[str, Any]:
        """The epoch's metrics from every rank's running sums: ``over="examples"`` (DDP:
        disjoint slices of the batches) or ``"members"`` (module parallel: member shards)."""
        mine = {k: v.cpu() for k, v in self.metrics.state().items()}
        parts = self.agree(mine)
        merged = EpochMetrics.merged(parts, over=over, family=self.family, lam=self.lam)
        return merged.compute()

    def comm_floats_per_step(self) -> float | None:
        """Floats handed to collectives per step this epoch (None on one process)."""
        return None if self.world == 1 else self.comm.floats / max(self.steps, 1)

    # --- evaluation

    @torch.no_grad()
    def evaluate(
        self, x: Tensor, y: Tensor, *, batch_size: int, keep_eta: bool
    ) -> tuple[dict[str, Any], Tensor | None]:
        """Metrics of the whole ensemble on ``(x, y)`` and, with ``keep_eta``, its
        ``(M, N, K)`` natural parameters on the host."""
        if self.world == 1:  # streamed: the natural parameters are kept only if asked for
            kw = {"family": self.family, "lam": self.lam, "batch_size": batch_size}
            return evaluate(self.model, x, y, keep_eta=keep_eta, **kw)
        self.model.eval()
        return self._gathered_metrics(self._gather(x, batch_size), y, batch_size, keep_eta)

    def _gather(self, x: Tensor, batch_size: int) -> Tensor:
        """The whole ensemble's ``(M, N, K)`` natural parameters on ``x``, on every rank."""
        raise NotImplementedError

    def _gathered_metrics(
        self, eta: Tensor, y: Tensor, batch_size: int, keep_eta: bool
    ) -> tuple[dict[str, Any], Tensor | None]:
        metrics = EpochMetrics(self.family, self.lam)
        for start in range(0, len(y), batch_size):
            metrics.update(eta[:, start : start + batch_size], y[start : start + batch_size])
        return metrics.compute(), eta.cpu() if keep_eta else None

    def _forward(self, x: Tensor, batch_size: int) -> Tensor:
        outs = [self.model(x[s : s + batch_size]) for s in range(0, len(x), batch_size)]
        if outs:
            return torch.cat(outs, dim=1)
        return torch.zeros(self.model.num_members, 0, self.num_classes, device=x.device)

    # --- the groups of a run: one here, several in a pack (modloss.pack.PackedStrategy)

    def group_train_metrics(self) -> list[dict[str, Any] | None]:
        """The epoch's training metrics of each group."""
        return [self.train_metrics()]

    def group_evaluate(
        self,
        x: Tensor,
        y: Tensor,
        *,
        batch_size: int,
        keep_eta: bool,
        groups: list[int] | None = None,
    ) -> list[tuple[dict[str, Any], Tensor | None] | None]:
        """:meth:`evaluate` of each group in ``groups`` (default: those not frozen)."""
        return [self.evaluate(x, y, batch_size=batch_size, keep_eta=keep_eta)]

    def group_state(self, g: int) -> dict[str, Tensor]:
        """The ``state_dict`` of group ``g`` (views of this process's model)."""
        return self.model.state_dict()

    def load_group_state(self, g: int, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict(state)

    def freeze(self, g: int) -> None:
        """Leave group ``g`` out of the loss and the metrics (it diverged or stopped); a
        run of one group ends instead."""

    # --- checkpoints

    @property
    def checkpoint_file(self) -> str:
        """The checkpoint this process writes and resumes from."""
        return CHECKPOINT_FILE

    @property
    def writes_checkpoint(self) -> bool:
        return self.is_main

    def own_files(self, folder: Path) -> list[Path]:
        """The files of ``folder`` this process wrote (what it uploads as its part of a
        distributed checkpoint)."""
        names = [self.checkpoint_file] if self.writes_checkpoint else []
        if self.is_main:
            names += [RESULTS_FILE, TEST_LOGITS_FILE, VAL_LOGITS_FILE]
        return [folder / n for n in dict.fromkeys(names) if (folder / n).is_file()]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def agree(self, value: object) -> list[object]:
        """Every rank's ``value``, in rank order."""
        return self.eval_comm.all_gather_object(value)


class SingleDevice(Strategy):
    """The whole ensemble and every batch in this process."""


class DataParallel(Strategy):
    """DDP over example slices of each batch (see the module docstring)."""

    name = "ddp"

    def prepare(self, full: EnsembleModel, device: torch.device, **loss: Any) -> EnsembleModel:
        model = super().prepare(full, device, **loss)
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                forward_sync_buffers=False,  # BatchNorm buffers: synced before evaluation
            )
            count_ddp_traffic(self.net, self.comm)
        return model

    def step_loss(self, x: Tensor, y: Tensor) -> Tensor:
        x, y, weight = shard_batch(x, y, self.rank, self.world)
        eta = self.net(x)  # (M, B_r, K)
        self.steps += 1
        if not len(y):  # an empty slice still joins DDP's all-reduce, with a zero gradient
            return eta.sum()
        return self._recorded_loss(eta, y, self.lam, self.metrics) * weight

    def train_metrics(self) -> dict[str, Any]:
        return self._merged_metrics(over="examples")

    def _gather(self, x: Tensor, batch_size: int) -> Tensor:
        for buffer in self.model.buffers():  # rank 0's BatchNorm statistics everywhere
            self.eval_comm.broadcast(buffer, src=0)
        lo, hi = (len(x) * r // self.world for r in (self.rank, self.rank + 1))
        return self.eval_comm.all_gather(self._forward(x[lo:hi], batch_size), dim=1)


class ModuleParallel(Strategy):
    """Members sharded over the ranks, one all-reduce of ``B x K`` per step."""

    name = "module"

    def prepare(self, full: EnsembleModel, device: torch.device, **loss: Any) -> EnsembleModel:
        super().prepare(full, "cpu", **loss)
        if full.num_members < self.world:
            raise ValueError(
                f"strategy 'module' needs at most as many processes ({self.world}) as the "
                f"model has members ({full.num_members})"
            )
        members = member_shard(full.num_members, self.world, self.rank)
        shard = type(full)(**{**full.config, "num_members": len(members)}, seed=0)
        self.model = load_member_slice(shard, full.state_dict(), members).to(device)
        self.net = self.model
        return self.model

    def step_loss(self, x: Tensor, y: Tensor) -> Tensor:
        eta = self.net(x)  # (M_r, B, K)
        out = module_parallel_loss(
            eta, y, self.lam, num_members=self.num_members, comm=self.comm, family=self.family
        )
        self.metrics.update(eta.detach(), y, eta_bar=out.eta_bar)  # the ensemble's, all ranks'
        self.steps += 1
        return out.objective

    def train_metrics(self) -> dict[str, Any]:
        return self._merged_metrics(over="members")

    def _gather(self, x: Tensor, batch_size: int) -> Tensor:
        return self.eval_comm.all_gather(self._forward(x, batch_size), dim=0)  # (M, N, K)

    @property
    def checkpoint_file(self) -> str:
        return CHECKPOINT_FILE if self.world == 1 else SHARD_CHECKPOINT_FILE.format(rank=self.rank)

    @property
    def writes_checkpoint(self) -> bool:
        return True


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (SingleDevice, DataParallel, ModuleParallel)
}


def make_strategy(name: str, device: torch.device | str | None = None) -> Strategy:
    """The strategy called ``name`` (single | ddp | module) for this process."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; allowed: {', '.join(STRATEGIES)}")
    if name != "single" and not dist.is_initialized() and "WORLD_SIZE" in os.environ:
        init_process_group()
    return STRATEGIES[name](device)


def init_process_group() -> None:
    """Join the process group ``torchrun`` describes in the environment: NCCL when this
    process has a GPU, gloo otherwise."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def load_model_state(folder: str | Path) -> dict[str, Tensor]:
    """The whole ensemble's ``state_dict`` from a run folder: its checkpoint, or for a
    module-parallel run the member shards of every rank, merged in rank order."""
    folder = Path(folder)
    if (folder / CHECKPOINT_FILE).is_file():
        return torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)["model"]
    shards, rank = [], 0
    while (folder / SHARD_CHECKPOINT_FILE.format(rank=rank)).is_file():
        path = folder / SHARD_CHECKPOINT_FILE.format(rank=rank)
        shards.append(torch.load(path, map_location="cpu", weights_only=True)["model"])
        rank += 1
    if not shards:
        raise FileNotFoundError(f"{folder}: no {CHECKPOINT_FILE} or {SHARD_CHECKPOINT_FILE}")
    return merge_member_states(shards)
