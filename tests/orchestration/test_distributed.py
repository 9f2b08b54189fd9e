"""orchestration.distributed: Ray Train runs on two CPU workers (gloo) reproduce
``modloss.train.fit``, survive a worker killed mid-run, and run as the trials of a sweep.

Tiny models on a 32-example subset of the real Fashion-MNIST keep each run to seconds of
compute; Ray's start-up and worker scheduling dominate.
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import pytest
import ray
import ray.train
import torch
from mlflow import MlflowClient

from modloss.names import CHECKPOINT_FILE, RESULTS_FILE, SHARD_CHECKPOINT_FILE
from modloss.records import EpochRecord
from modloss.strategies import load_model_state
from modloss.train import TrainConfig, fit
from orchestration.distributed import (
    DistributedConfig,
    fit_distributed,
    load_results,
    make_trainer,
    run_name,
)
from orchestration.sweep import run_sweep

pytestmark = pytest.mark.slow  # real Ray, real data, real MLflow

B, K = 16, 10  # batch size, Fashion-MNIST classes
# Tiny DenseNet-BC ensemble (4 members) and MLP ensemble; lr low enough that float32
# rounding differences between one process and two stay at rounding level over the run.
DENSENET = {"model": "DN-100-12-4", "model_overrides": {"depth": 10, "growth_rate": 4}}
MLP = {"model": "16-M-64-H", "model_overrides": {"hidden": 4}}
COMMON = {
    "dataset": "fashion-mnist",
    "subset": 32,
    "batch_size": B,
    "eval_batch_size": 32,
    "lam": 0.5,
    "lr": 0.02,
    "weight_decay": 1e-4,
}
# Train's controller collects the workers' reports (and registers their checkpoints) when it
# polls them; poll often, and let a dying worker wait a few polls, so that "the last
# checkpoint" is deterministically epoch 2's.
POLL_S, DIE_AFTER_S = 0.25, 2.0
COMPARED = ("train.loss", "train.member_nll", "val.loss", "test.loss", "val.error")


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(data_dir: Path):
    """One local Ray instance for the module."""
    # Functions defined in this module (worker callbacks) travel to the workers by value.
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        runtime_env={
            "env_vars": {"OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(POLL_S)}
        },
    )
    yield
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _config(model: dict, epochs: int, data_dir: Path) -> TrainConfig:
    return TrainConfig(**model, **COMMON, epochs=epochs, data_dir=str(data_dir))


def _value(record: EpochRecord, key: str) -> float:
    split, name = key.split(".")
    return getattr(getattr(record, split), name)


def _assert_history_matches_fit(history: list[EpochRecord], reference: list[EpochRecord]) -> None:
    assert [e.epoch for e in history] == [e.epoch for e in reference]
    for got, want in zip(history, reference, strict=True):
        for key in COMPARED:
            assert _value(got, key) == pytest.approx(_value(want, key), rel=1e-4, abs=1e-6), key
        assert got.train.member_errors == pytest.approx(want.train.member_errors)


def test_module_parallel_run_equals_fit_and_resumes_after_a_worker_dies(tmp_path, data_dir):
    """Rank 1 dies right after epoch 2's checkpoint; Train restarts the worker group,
    which resumes at epoch 3 (not epoch 1) and ends exactly where fit does."""
    config = _config(DENSENET, 3, data_dir)
    marker = tmp_path / "killed-once"

    def die_once(epoch: int, metrics: dict, rank: int) -> None:
        if rank == 1 and epoch == 2 and not marker.exists():
            marker.touch()
            time.sleep(DIE_AFTER_S)
            os._exit(1)

    spec = DistributedConfig(strategy="module", num_workers=2, max_failures=1)
    trainer = make_trainer(
        config, spec, name="module", storage_path=tmp_path / "runs", worker_callbacks=[die_once]
    )
    checkpoint = trainer.fit().checkpoint
    results = load_results(checkpoint)
    assert marker.exists()
    assert results.status == "finished" and results.strategy == "module"
    assert results.resumed_from == [2]
    assert [e.epoch for e in results.history] == [1, 2, 3]

    reference = fit(config, out_dir=tmp_path / "fit")
    _assert_history_matches_fit(results.history, reference.history)
    for key in ("best_epoch", "val_error", "test_error", "params"):
        assert getattr(results, key) == getattr(reference, key)
    fit_model = torch.load(tmp_path / "fit" / CHECKPOINT_FILE, weights_only=True)["model"]
    merged = load_model_state(checkpoint.path)
    # Exact in exact arithmetic; float32 sums in another order (grouped convolutions over 2
    # members instead of 4, the all-reduce) leave ~1e-5 after six steps.
    for name, tensor in fit_model.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-4, rtol=1e-4, msg=name)
    # One all-reduce of the batch's B x K ensemble natural parameters per step.
    assert {e.comm_floats_per_step for e in results.history} == {B * K}


def _fail_after_epoch_1(
    config: TrainConfig, spec: DistributedConfig, storage: Path, name: str
) -> None:
    """Run ``name`` until rank 0 dies right after epoch 1's checkpoint; with no restarts
    (max_failures=0) the run fails for good."""
    marker = storage / f"{name}-killed-once"

    def die_once(epoch: int, metrics: dict, rank: int) -> None:
        if rank == 0 and epoch == 1 and not marker.exists():
            marker.touch()
            time.sleep(DIE_AFTER_S)
            os._exit(1)

    with pytest.raises(ray.train.WorkerGroupError):
        fit_distributed(config, spec, storage_path=storage, name=name, worker_callbacks=[die_once])
    assert marker.exists()


def test_ddp_run_equals_fit_and_a_failed_run_resumes_under_its_name(tmp_path, data_dir):
    """Each worker takes half of every shuffled batch; DDP all-reduces one float per
    parameter per step and, without BatchNorm, trains exactly as fit. A run that failed
    for good (max_failures=0) resumes from its last checkpoint when fit again under the
    same name, which is how a retried Tune trial continues its Train run."""
    config = _config(MLP, 2, data_dir)
    spec = DistributedConfig(strategy="ddp", num_workers=2)
    _fail_after_epoch_1(config, spec, tmp_path, "ddp")
    results = fit_distributed(config, spec, storage_path=tmp_path, name="ddp")
    assert results.status == "finished" and results.strategy == "ddp"
    assert results.resumed_from == [1]
    reference = fit(config)
    _assert_history_matches_fit(results.history, reference.history)
    assert {e.comm_floats_per_step for e in results.history} == {results.params}


def test_a_run_whose_newest_checkpoint_is_corrupt_starts_over(tmp_path, data_dir):
    """A Train run that failed after its checkpoint was damaged (a truncated copy, a full
    disk) is not stuck on it: fit again under its name, it trains from scratch and ends as
    fit does. (How a retried or resumed distributed sweep trial continues its Train run.)"""
    config = _config(MLP, 2, data_dir)
    spec = DistributedConfig(strategy="ddp", num_workers=2)
    _fail_after_epoch_1(config, spec, tmp_path, "ddp")
    newest = sorted((tmp_path / "ddp").glob(f"epoch-*/{CHECKPOINT_FILE}"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    results = fit_distributed(config, spec, storage_path=tmp_path, name="ddp")
    assert results.status == "finished" and results.resumed_from == []
    _assert_history_matches_fit(results.history, fit(config).history)


def test_sweep_runs_each_trial_of_a_distributed_space_on_ray_train(
    mlflow_server, make_space, tmp_path
):
    """``modloss sweep`` on a space with a ``distributed:`` section: the Tune trial function
    fits a TorchTrainer named after the trial, the workers' per-epoch reports reach Tune
    (TuneReportCallback) and the driver's MLflow logger, then the trial's summary."""
    space = make_space(
        name="distributed-e2e",
        models=[DENSENET["model"]],
        model_overrides=DENSENET["model_overrides"],
        lam=[COMMON["lam"]],
        lr=COMMON["lr"],
        epochs=2,
        subset=COMMON["subset"],
        batch_size=B,
        distributed={"strategy": "module", "num_workers": 2},
    )
    outcome = run_sweep(space, tracking_uri=mlflow_server, storage=tmp_path, out=io.StringIO())
    assert outcome.status == "FINISHED"
    [row] = outcome.table.itertuples()
    assert (row.status, row.epochs_completed) == ("finished", 2)
    run = tmp_path / "distributed-e2e" / "train_runs" / run_name(row.trial_id)
    assert {p.name for p in (run / "epoch-0002-finished").iterdir()} >= {
        RESULTS_FILE,
        SHARD_CHECKPOINT_FILE.format(rank=0),
        SHARD_CHECKPOINT_FILE.format(rank=1),
    }
    client = MlflowClient(mlflow_server)
    [child] = client.search_runs(
        [client.get_experiment_by_name("distributed-e2e").experiment_id],
        filter_string=f"tags.trial_id = '{row.trial_id}'",
    )
    floats = client.get_metric_history(child.info.run_id, "epoch/comm_floats_per_step")
    assert sorted((m.step, m.value) for m in floats) == [(1, B * K), (2, B * K)]
    assert child.data.metrics["test_error"] == pytest.approx(row.test_error)
    assert "results.json" in {a.path for a in client.list_artifacts(child.info.run_id)}


def test_module_strategy_needs_at_least_one_member_per_worker(tmp_path, data_dir):
    config = _config(DENSENET, 1, data_dir)
    spec = DistributedConfig(strategy="module", num_workers=8)
    with pytest.raises(ValueError, match="num_workers"):
        make_trainer(config, spec, name="x", storage_path=tmp_path)
