"""Ray Train runs of one modloss configuration on several workers: data parallel (DDP) or
module parallel (the paper's section 3.3), with per-epoch checkpoints from which a failed
worker group restarts.

Strategies (``DistributedConfig.strategy``):

- ``"ddp"``: every worker holds the whole ensemble; each takes a disjoint slice of every
  globally shuffled batch (same loader seed on every worker) and DDP averages the parameter
  gradients: ``P`` floats per step. BatchNorm normalises each slice on its own, so a model
  with BatchNorm trains as with "ghost" batch norm over ``batch_size / W`` examples; models
  without it train exactly as :func:`modloss.train.fit`.
- ``"module"``: worker ``r`` holds members ``member_shard(M, W, r)`` and the whole batch; one
  all-reduce of ``B x K`` floats per step gives the ensemble natural parameter and each
  worker back-propagates Eq. 8 locally (:func:`modloss.parallel.module_parallel_loss`). Same
  results as :func:`modloss.train.fit` for every model, BatchNorm included.

The per-worker loop follows ``fit``'s protocol (seeds from the trial, SGD with momentum and
milestones, selection on validation only, results of the same shape). Metrics and the
results are identical on every worker (per-epoch metrics are merged across workers; val and
test natural parameters are gathered, an evaluation cost only); rank 0 writes results and
logits into each checkpoint, and in module-parallel runs every worker adds its shard. Only
rank 0's metrics reach Ray.

With Ray Tune (Ray 2.60, Train V2), :func:`train_trial` is the trial function: it builds and
fits one ``TorchTrainer`` named after the trial id, so a retried trial finds its run and
resumes from its last checkpoint; ``TuneReportCallback`` forwards the workers' reports to
Tune, and MLflow logging stays on the driver (the sweep's tracking callback). Multi-node
runs need a ``storage_path`` every node can reach.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from modloss.losses import modular_loss
from modloss.metrics import NEAR_CHANCE_FRACTION, EpochMetrics
from modloss.parallel import (
    Communicator,
    count_ddp_traffic,
    load_member_slice,
    member_shard,
    merge_member_states,
    module_parallel_loss,
    shard_batch,
)

# fit's own builders, so that a distributed run pairs with fit's runs (same initial
# weights, same batches, same augmentation draws).
from modloss.train import (
    RESULTS_FILE,
    TEST_LOGITS_FILE,
    VAL_LOGITS_FILE,
    TrainConfig,
    build_loader,
    build_model,
    build_optimizer,
    build_splits,
    initial_results,
)
from orchestration.spaces import Distributed, trial_summary
from orchestration.storage import linked_checkpoint

if TYPE_CHECKING:
    from ray.train import Checkpoint
    from ray.train.torch import TorchTrainer

__all__ = [
    "STATE_FILE",
    "DistributedConfig",
    "WorkerCallback",
    "fit_distributed",
    "load_model_state",
    "load_results",
    "make_trainer",
    "run_name",
    "train_trial",
    "train_worker",
]

STATE_FILE = "state-rank{rank}.pt"  # a worker's model, optimiser and loader state
TRAIN_RUNS_DIR = "train_runs"  # next to the Tune trials, when no storage path is given
CHECKPOINTS_TO_KEEP = 2

DistributedConfig = Distributed
"""How a run is spread over Ray Train workers: ``strategy`` (``ddp`` | ``module``),
``num_workers``, ``gpus_per_worker`` (0: CPUs and gloo; 1: one GPU each and NCCL, and
``TrainConfig.device`` is ignored), ``cpus_per_worker``, ``max_failures`` (worker-group
restarts from the last checkpoint; -1: unlimited). The ``distributed:`` section of a search
space."""

WorkerCallback = Callable[[int, dict[str, Any], int], None]
"""``callback(epoch, metrics, rank)``, called on every worker after the epoch's report."""


# --- driver side -------------------------------------------------------------------------


def run_name(trial_id: str) -> str:
    """The Train run of Tune trial ``trial_id``: deterministic, so a retry resumes it."""
    return f"train-{trial_id}"


def make_trainer(
    train: TrainConfig,
    spec: DistributedConfig,
    *,
    name: str,
    storage_path: str | Path,
    callbacks: Sequence[Any] = (),
    worker_callbacks: Sequence[WorkerCallback] = (),
) -> TorchTrainer:
    """The ``TorchTrainer`` of one run; ``callbacks`` are Ray Train callbacks (e.g. Tune's
    ``TuneReportCallback``), ``worker_callbacks`` run inside every worker."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if spec.strategy == "module":
        members = build_model(train).num_members
        if members < spec.num_workers:
            raise ValueError(
                f"strategy 'module' needs num_workers ({spec.num_workers}) <= the number of "
                f"members ({members}) of {train.model}"
            )
    resources = {"CPU": spec.cpus_per_worker}
    if spec.gpus_per_worker > 0:
        resources["GPU"] = spec.gpus_per_worker
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "train": train.model_dump(),
            "distributed": spec.model_dump(),
            "callbacks": list(worker_callbacks),
        },
        scaling_config=ScalingConfig(
            num_workers=spec.num_workers,
            use_gpu=spec.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
            callbacks=list(callbacks),
        ),
    )


def fit_distributed(
    train: TrainConfig | dict[str, Any],
    spec: DistributedConfig | dict[str, Any],
    *,
    storage_path: str | Path,
    name: str,
    worker_callbacks: Sequence[WorkerCallback] = (),
) -> dict[str, Any]:
    """Train ``train`` on Ray Train workers and return ``fit``-shaped results.

    Running it again with the same ``storage_path`` and ``name`` resumes the run from its
    last checkpoint.
    """
    train = train if isinstance(train, TrainConfig) else TrainConfig.model_validate(train)
    spec = spec if isinstance(spec, DistributedConfig) else DistributedConfig.model_validate(spec)
    trainer = make_trainer(
        train, spec, name=name, storage_path=storage_path, worker_callbacks=worker_callbacks
    )
    return load_results(trainer.fit().checkpoint)


def train_trial(
    config: dict[str, Any], *, artifacts: Callable[[Path, TrainConfig], None] | None = None
) -> None:
    """Ray Tune trial function of a distributed trial: one ``TorchTrainer`` per trial.

    ``config``: ``train`` (a ``TrainConfig`` dict), ``distributed`` (a
    ``DistributedConfig`` dict) and optionally ``storage_path`` for the Train runs (shared
    storage for multi-node clusters; default: ``train_runs/`` beside the trials). Per-epoch
    metrics reach Tune through ``TuneReportCallback``; the last report is the summary the
    sweep reads, with the run's ``results.json`` and best-epoch logits as the trial's
    checkpoint, after ``artifacts(folder, train)`` (if given) has added its files there.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    train = TrainConfig.model_validate(config["train"])
    spec = DistributedConfig.model_validate(config["distributed"])
    context = tune.get_context()
    storage = config.get("storage_path") or Path(context.get_trial_dir()).parent / TRAIN_RUNS_DIR
    trainer = make_trainer(
        train,
        spec,
        name=run_name(context.get_trial_id()),
        storage_path=storage,
        callbacks=[TuneReportCallback()],
    )
    checkpoint = trainer.fit().checkpoint
    results = load_results(checkpoint)
    summary = trial_summary(results)
    with tempfile.TemporaryDirectory() as tmp, checkpoint.as_directory() as saved:
        for file in (RESULTS_FILE, TEST_LOGITS_FILE, VAL_LOGITS_FILE):
            if (Path(saved) / file).is_file():
                shutil.copy(Path(saved) / file, Path(tmp) / file)
        if artifacts is not None:
            artifacts(Path(tmp), train)
        tune.report(summary, checkpoint=linked_checkpoint(Path(tmp)))


def load_results(checkpoint: Checkpoint | str | Path) -> dict[str, Any]:
    """The ``results.json`` of a run's checkpoint (a Ray ``Checkpoint`` or a folder)."""
    if isinstance(checkpoint, str | Path):
        return json.loads((Path(checkpoint) / RESULTS_FILE).read_text())
    with checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / RESULTS_FILE).read_text())


def load_model_state(folder: str | Path) -> dict[str, Tensor]:
    """The whole ensemble's ``state_dict`` from a checkpoint folder: rank 0's replica for
    ``ddp``, the workers' member shards merged for ``module``."""
    folder = Path(folder)
    results = json.loads((folder / RESULTS_FILE).read_text())
    dist_spec = DistributedConfig.model_validate(results["distributed"])
    ranks = range(dist_spec.num_workers) if dist_spec.strategy == "module" else range(1)
    states = [
        torch.load(folder / STATE_FILE.format(rank=r), map_location="cpu", weights_only=True)
        for r in ranks
    ]
    return merge_member_states([s["model"] for s in states])


# --- worker side ---------------------------------------------------------------------------


def train_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train loop of one worker (see the module docstring)."""
    import ray.train
    import ray.train.torch

    config = TrainConfig.model_validate(loop_config["train"])
    spec = DistributedConfig.model_validate(loop_config["distributed"])
    callbacks: Iterable[WorkerCallback] = loop_config.get("callbacks", ())
    context = ray.train.get_context()
    device = ray.train.torch.get_device() if spec.gpus_per_worker > 0 else torch.device("cpu")
    worker = _Worker(config, spec, context.get_world_rank(), context.get_world_size(), device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            worker.load(Path(folder))
    for epoch in range(worker.results["epochs_completed"] + 1, config.epochs + 1):
        if worker.results["status"] in ("finished", "diverged"):
            break
        metrics = worker.run_epoch(epoch)
        with tempfile.TemporaryDirectory() as tmp:
            wrote = worker.save(Path(tmp))
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp) if wrote else None,
                checkpoint_dir_name=f"epoch-{epoch:04d}",
            )
        for callback in callbacks:
            callback(epoch, metrics, worker.rank)


class _Worker:
    """One rank's share of a run: its model (replica or member shard), optimiser, loader,
    and the run's results (the same on every rank)."""

    def __init__(
        self,
        config: TrainConfig,
        spec: DistributedConfig,
        rank: int,
        world: int,
        device: torch.device,
    ) -> None:
        self.config, self.spec, self.rank, self.world, self.device = (
            config,
            spec,
            rank,
            world,
            device,
        )
        self.comm = Communicator()  # per-step training traffic
        self.eval_comm = Communicator()  # per-epoch metrics and evaluation
        self.splits = build_splits(config, device)
        self.family = self.splits.info.family
        full = build_model(config)  # the same initial weights on every rank
        self.num_members = full.num_members
        self.module_parallel = spec.strategy == "module"
        if self.module_parallel:
            members = member_shard(full.num_members, world, rank)
            shard = type(full)(**{**full.config, "num_members": len(members)}, seed=0)
            self.model = load_member_slice(shard, full.state_dict(), members).to(device)
            self.net: nn.Module = self.model
        else:
            self.model = full.to(device)
            self.net = self.model
            if world > 1:
                self.net = nn.parallel.DistributedDataParallel(
                    self.model,
                    device_ids=[device.index] if device.type == "cuda" else None,
                    forward_sync_buffers=False,  # BatchNorm buffers: synced before evaluation
                )
                count_ddp_traffic(self.net, self.comm)
        self.optimizer, self.scheduler = build_optimizer(config, self.model)
        self.loader = build_loader(config, self.splits.train, device)
        self.generator = self.loader.generator
        self.results: dict[str, Any] = {
            **initial_results(config, full),
            "distributed": spec.model_dump(),
            "resumed_from": [],  # epochs_completed at each restart from a checkpoint
        }
        self.best_logits: dict[str, dict[str, Any]] = {}

    # --- one epoch

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch, evaluate, update the results; the epoch's scalar metrics."""
        tic = time.perf_counter()
        entry: dict[str, Any] = {"epoch": epoch, "lr": self.scheduler.get_last_lr()[0]}
        train, floats_per_step = self._train_epoch()
        entry.update({f"train_{k}": v for k, v in train.items()})
        entry["train_comm_floats_per_step"] = floats_per_step
        improved = False
        if _finite(entry):
            val, val_eta = self._evaluate(*self.splits.val)
            test, test_eta = self._evaluate(*self.splits.test)
            entry.update({f"val_{k}": v for k, v in val.items()})
            entry.update({f"test_{k}": v for k, v in test.items()})
            best = self.results["best_val_error"]
            improved = best is None or val["error"] < best
        entry["epoch_seconds"] = time.perf_counter() - tic
        results = self.results
        if not _finite(entry):
            results.update(status="diverged", diverged_epoch=epoch)
        else:
            results["history"].append(entry)
            results["epochs_completed"] = epoch
            results["final_test_error"] = entry["test_error"]
            if improved:
                results.update(
                    best_epoch=epoch, best_val_error=entry["val_error"], test_error=test["error"]
                )
                if self.rank == 0:
                    for split, eta, pair in (
                        ("test", test_eta, self.splits.test),
                        ("val", val_eta, self.splits.val),
                    ):
                        self.best_logits[split] = {
                            "eta": eta.cpu(),
                            "target": pair.y.cpu(),
                            "epoch": epoch,
                            "split": split,
                            "family": self.family,
                        }
            if epoch == self.config.epochs:
                results["status"] = "finished"
        metrics = {k: v for k, v in entry.items() if not isinstance(v, list)}
        metrics.update(
            epoch=epoch,
            status=results["status"],
            best_epoch=results["best_epoch"],
            best_val_error=results["best_val_error"],
            best_test_error=results["test_error"],
        )
        return metrics

    def _train_epoch(self) -> tuple[dict[str, Any], float]:
        lam, family = self.config.lam, self.family
        self.net.train()
        members = EpochMetrics(family, lam)  # this rank's members (module) or slice (ddp)
        ensemble = EpochMetrics(family, lam)  # module: the ensemble, from the all-reduced mean
        self.comm.reset()
        steps = 0
        for x, y in self.loader:
            if self.module_parallel:
                eta = self.net(x)  # (M_r, B, K)
                out = module_parallel_loss(
                    eta, y, lam, num_members=self.num_members, comm=self.comm, family=family
                )
                loss = out.objective
                ensemble.update(out.eta_bar.unsqueeze(0), y)
            else:
                x, y, weight = shard_batch(x, y, self.rank, self.world)
                eta = self.net(x)  # (M, B_r, K)
                # An empty slice still joins DDP's all-reduce, with a zero gradient.
                loss = modular_loss(eta, y, lam, family=family) * weight if len(y) else eta.sum()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if len(y):
                members.update(eta.detach(), y)
            steps += 1
        self.scheduler.step()
        parts = self.eval_comm.all_gather_object(
            (members.compute() if members.count else None, members.count)
        )
        if self.module_parallel:
            metrics = _merge_member_shards([p for p, _ in parts], ensemble.compute(), lam)
        else:
            metrics = _merge_example_shards(parts, family, lam, self.splits.info.num_classes)
        return metrics, self.comm.floats / max(steps, 1)

    @torch.no_grad()
    def _evaluate(self, x: Tensor, y: Tensor) -> tuple[dict[str, Any], Tensor]:
        """Metrics of the whole ensemble on ``(x, y)`` and its ``(M, N, K)`` natural
        parameters, gathered from every rank (members for module, examples for ddp)."""
        self.model.eval()
        if self.module_parallel:
            eta = self._forward(x)  # (M_r, N, K)
            full = self.eval_comm.all_gather(eta, dim=0)  # (M, N, K)
        else:
            for buffer in self.model.buffers():  # rank 0's BatchNorm statistics everywhere
                self.eval_comm.broadcast(buffer, src=0)
            lo, hi = (len(x) * r // self.world for r in (self.rank, self.rank + 1))
            full = self.eval_comm.all_gather(self._forward(x[lo:hi]), dim=1)  # (M, N, K)
        metrics = EpochMetrics(self.family, self.config.lam)
        size = self.config.eval_batch_size
        for start in range(0, len(y), size):
            metrics.update(full[:, start : start + size], y[start : start + size])
        return metrics.compute(), full

    def _forward(self, x: Tensor) -> Tensor:
        size = self.config.eval_batch_size
        outs = [self.model(x[s : s + size]) for s in range(0, len(x), size)]
        if outs:
            return torch.cat(outs, dim=1)
        k = self.splits.info.num_classes
        return torch.zeros(self.model.num_members, 0, k, device=self.device)

    # --- checkpoints

    def save(self, folder: Path) -> bool:
        """Write this rank's part of the checkpoint; whether it wrote anything."""
        wrote = False
        if self.module_parallel or self.rank == 0:
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "loader_rng": self.generator.get_state(),
            }
            torch.save(state, folder / STATE_FILE.format(rank=self.rank))
            wrote = True
        if self.rank == 0:
            (folder / RESULTS_FILE).write_text(json.dumps(self.results, indent=1))
            for split, file in (("test", TEST_LOGITS_FILE), ("val", VAL_LOGITS_FILE)):
                if split in self.best_logits:
                    torch.save(self.best_logits[split], folder / file)
        return wrote

    def load(self, folder: Path) -> None:
        """Resume from a checkpoint folder written by :meth:`save` on every rank."""
        results = json.loads((folder / RESULTS_FILE).read_text())
        saved = DistributedConfig.model_validate(results["distributed"])
        if self.module_parallel and saved.num_workers != self.world:
            raise ValueError(
                f"checkpoint {folder} holds {saved.num_workers} member shards; resume it "
                f"with num_workers={saved.num_workers}, not {self.world}"
            )
        rank = self.rank if self.module_parallel else 0
        state = torch.load(
            folder / STATE_FILE.format(rank=rank), map_location=self.device, weights_only=True
        )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["loader_rng"].cpu())
        results["resumed_from"].append(results["epochs_completed"])
        self.results = results
        if self.rank == 0:
            for split, file in (("test", TEST_LOGITS_FILE), ("val", VAL_LOGITS_FILE)):
                if (folder / file).is_file():
                    self.best_logits[split] = torch.load(folder / file, weights_only=False)


# --- merging per-epoch training metrics ------------------------------------------------------


def _merge_example_shards(
    parts: list[tuple[dict[str, Any] | None, int]], family: str, lam: float, num_classes: int
) -> dict[str, Any]:
    """DDP: each rank's metrics over its slices of the batches, weighted by example count.

    Every metric is a mean over examples (regression errors: the root of one), so the
    weighted means are the metrics of the whole epoch. ``members_near_chance`` needs the
    chance level, known for categorical targets only.
    """
    present = [(p, n) for p, n in parts if p is not None]
    total = sum(n for _, n in present)

    def mean(key: str, squared: bool = False) -> Tensor:
        values = [torch.tensor(p[key], dtype=torch.float64) for p, _ in present]
        weights = [n / total for _, n in present]
        if squared:
            return sum(w * v.square() for v, w in zip(values, weights, strict=True)).sqrt()
        return sum(w * v for v, w in zip(values, weights, strict=True))

    regression = family != "categorical"
    member_errors = mean("member_errors", squared=regression)
    chance = 1 - 1 / num_classes  # a uniform guess
    return _compose(
        float(mean("ensemble_nll")),
        float(mean("member_nll")),
        lam,
        error=float(mean("error", squared=regression)),
        member_errors=member_errors,
        member_entropy=None if regression else mean("member_entropy"),
        members_near_chance=(
            None if regression else int((member_errors >= NEAR_CHANCE_FRACTION * chance).sum())
        ),
    )


def _merge_member_shards(
    parts: list[dict[str, Any] | None], ensemble: dict[str, Any], lam: float
) -> dict[str, Any]:
    """Module parallel: the ensemble's metrics from the all-reduced mean (the same on every
    rank), the members' from each rank's shard, in member order."""
    member_errors = torch.tensor([e for p in parts for e in p["member_errors"]])
    sizes = [len(p["member_errors"]) for p in parts]
    member_nll = sum(p["member_nll"] * m for p, m in zip(parts, sizes, strict=True)) / sum(sizes)
    entropy = [e for p in parts for e in p.get("member_entropy", [])]
    return _compose(
        ensemble["ensemble_nll"],
        member_nll,
        lam,
        error=ensemble["error"],
        member_errors=member_errors,
        member_entropy=torch.tensor(entropy) if entropy else None,
        # Every rank's chance level comes from the same (whole-batch) targets.
        members_near_chance=sum(p["members_near_chance"] for p in parts),
    )


def _compose(
    ensemble_nll: float,
    member_nll: float,
    lam: float,
    *,
    error: float,
    member_errors: Tensor,
    member_entropy: Tensor | None,
    members_near_chance: int | None,
) -> dict[str, Any]:
    """``EpochMetrics.compute``'s dictionary, from merged parts."""
    out: dict[str, Any] = {
        "loss": lam * ensemble_nll + (1 - lam) * member_nll,
        "ensemble_nll": ensemble_nll,
        "member_nll": member_nll,
        "ambiguity": member_nll - ensemble_nll,
        "error": error,
        "member_error_min": member_errors.min().item(),
        "member_error_mean": member_errors.mean().item(),
        "member_error_max": member_errors.max().item(),
        "member_errors": member_errors.tolist(),
        "best_member": int(member_errors.argmin()),
        "dominance_gap": member_errors.min().item() - error,
    }
    if members_near_chance is not None:
        out["members_near_chance"] = members_near_chance
    if member_entropy is not None:
        out["entropy_mean"] = member_entropy.mean().item()
        out["member_entropy"] = member_entropy.tolist()
    return out


def _finite(entry: dict[str, Any]) -> bool:
    values = [
        v for value in entry.values() for v in (value if isinstance(value, list) else [value])
    ]
    return all(math.isfinite(v) for v in values)
