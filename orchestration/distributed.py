"""Ray Train runs of one modloss configuration on several workers, data parallel (DDP) or
module parallel (the paper's section 3.3), with per-epoch checkpoints from which a failed
worker group restarts.

The training is :func:`modloss.train.fit` with a :mod:`modloss.strategies` strategy, the
same loop that ``torchrun -m modloss train --strategy ...`` runs without Ray. Ray Train sets
up the process group and the devices; :func:`train_worker` restores the last checkpoint
into a local folder, calls ``fit`` and reports each epoch with the files this worker wrote
(rank 0: results, logits and its checkpoint; module parallel: every rank its member shard).

With Ray Tune (Ray 2.60, Train V2), :func:`train_trial` is the trial function: it builds and
fits one ``TorchTrainer`` named after the trial id, so a retried trial finds its run and
resumes from its last checkpoint; ``TuneReportCallback`` forwards rank 0's reports to Tune,
and MLflow logging stays on the driver (the sweep's tracking callback). Multi-node runs
need a ``storage_path`` every node can reach.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modloss.names import RESULTS_FILE
from modloss.records import RunResult
from modloss.train import TrainConfig, build_model
from orchestration.reports import epoch_report, summary_report
from orchestration.spaces import Distributed
from orchestration.storage import drop_corrupt_checkpoint, linked_checkpoint

if TYPE_CHECKING:
    from ray.train import Checkpoint
    from ray.train.torch import TorchTrainer

__all__ = [
    "DistributedConfig",
    "WorkerCallback",
    "fit_distributed",
    "load_results",
    "make_trainer",
    "run_name",
    "train_trial",
    "train_worker",
]

TRAIN_RUNS_DIR = "train_runs"  # next to the Tune trials, when no storage path is given
CHECKPOINTS_TO_KEEP = 2

DistributedConfig = Distributed
"""How a run is spread over Ray Train workers: ``strategy`` (``ddp`` | ``module``),
``num_workers``, ``gpus_per_worker`` (0: CPUs and gloo; 1: one GPU each and NCCL, and
``TrainConfig.device`` is ignored), ``cpus_per_worker``, ``max_failures`` (worker-group
restarts from the last checkpoint; -1: unlimited). The ``distributed:`` section of a search
space."""

WorkerCallback = Callable[[int, dict[str, Any], int], None]
"""``callback(epoch, report, rank)``, called on every worker after the epoch's report."""


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
) -> RunResult:
    """Train ``train`` on Ray Train workers and return its result.

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
    reports reach Tune through ``TuneReportCallback``; the last report is the summary the
    sweep reads, with the run's folder (results, best-epoch logits) as the trial's
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
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.to_directory(tmp)
        result = RunResult.read(Path(tmp) / RESULTS_FILE)
        if artifacts is not None:
            artifacts(Path(tmp), train)
        tune.report(summary_report(result), checkpoint=linked_checkpoint(Path(tmp)))


def load_results(checkpoint: Checkpoint | str | Path) -> RunResult:
    """The result of a run's checkpoint (a Ray ``Checkpoint`` or a folder)."""
    if isinstance(checkpoint, str | Path):
        return RunResult.read(Path(checkpoint) / RESULTS_FILE)
    with checkpoint.as_directory() as folder:
        return RunResult.read(Path(folder) / RESULTS_FILE)


def train_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train loop of one worker: ``fit`` with the run's strategy, restored from
    the last checkpoint, each epoch reported with this worker's part of its checkpoint."""
    import ray.train
    import ray.train.torch
    import torch

    from modloss.strategies import make_strategy
    from modloss.train import fit

    config = TrainConfig.model_validate(loop_config["train"])
    spec = DistributedConfig.model_validate(loop_config["distributed"])
    callbacks: Sequence[WorkerCallback] = loop_config.get("callbacks", ())
    device = ray.train.torch.get_device() if spec.gpus_per_worker > 0 else torch.device("cpu")
    strategy = make_strategy(spec.strategy, device=device)

    def report(result: RunResult, folder: Path | None) -> None:
        metrics = epoch_report(result)
        with tempfile.TemporaryDirectory() as tmp:
            for path in strategy.own_files(folder):
                os.link(path, Path(tmp) / path.name)
            checkpoint = ray.train.Checkpoint.from_directory(tmp) if os.listdir(tmp) else None
            ray.train.report(
                metrics,
                checkpoint=checkpoint,
                checkpoint_dir_name=f"epoch-{result.epochs_completed:04d}-{result.status}",
            )
        for callback in callbacks:
            callback(result.epochs_completed, metrics, strategy.rank)

    out = Path(tempfile.mkdtemp(prefix="modloss-train-"))
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            checkpoint.to_directory(str(out))
            drop_corrupt_checkpoint(out)
        fit(config, [report], out_dir=out, strategy=strategy)
    finally:
        shutil.rmtree(out, ignore_errors=True)
