"""The tracking pieces on their own: trial outcomes, metric selection, the store check and
the reconciliation that leaves no run RUNNING (against a real MLflow server)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mlflow import MlflowClient

from modloss.names import PARENT_TAG, POINT_TAG, SUMMARY_METRICS, TRIAL_ID_TAG
from modloss.records import EpochRecord, RunResult, SplitMetrics
from orchestration.reports import OBJECTIVES, POINTS_KEY, epoch_report, summary_report
from orchestration.spaces import train_config
from orchestration.tracking import (
    SweepRecord,
    SweepTracker,
    TrackingError,
    TrialLogger,
    check_tracking_uri,
    epoch_metrics,
    trial_points,
    trial_status,
)


@pytest.mark.parametrize(
    ("ray_status", "last", "expected"),
    [
        ("TERMINATED", {"summary": True, "status": "finished", "epoch": 3}, "finished"),
        ("TERMINATED", {"summary": True, "status": "diverged", "epoch": 1}, "diverged"),
        ("TERMINATED", {"status": "running", "epoch": 1}, "stopped"),  # ASHA, early
        ("TERMINATED", {"status": "running", "epoch": 3}, "finished"),  # ASHA at max_t
        ("ERROR", {"status": "running", "epoch": 2}, "failed"),
        ("ERROR", {"status": "diverged", "epoch": 1}, "diverged"),  # a packed point, before
        ("RUNNING", {"status": "diverged", "epoch": 1}, "diverged"),  # its pack failed or
        ("PENDING", {"status": "diverged", "epoch": 1}, "diverged"),  # was interrupted
        ("RUNNING", {"status": "running", "epoch": 2}, "interrupted"),
        ("PAUSED", {"status": "running", "epoch": 2}, "interrupted"),
        ("PENDING", {}, "pending"),
    ],
)
def test_trial_status(ray_status, last, expected):
    assert trial_status(ray_status, last, 3) == expected


def _split(error: float) -> SplitMetrics:
    return SplitMetrics(
        loss=0.5,
        ensemble_nll=0.4,
        member_nll=0.6,
        ambiguity=0.2,
        error=error,
        member_error_min=error,
        member_error_mean=error + 0.1,
        member_error_max=0.9,
        member_errors=[error, 0.9],
        best_member=0,
        dominance_gap=0.0,
        members_near_chance=1,
    )


def test_epoch_metrics_are_the_latest_curves_of_a_tune_report():
    """Per-epoch curves reach MLflow as ``epoch/...``; the summary metrics of the same
    report (``val_error``: the best epoch's) and Ray's own keys do not."""
    record = EpochRecord(
        epoch=2,
        lr=0.1,
        seconds=1.5,
        train=_split(0.3),
        val=_split(0.2),
        test=_split(0.25),
        diversity_gap=0.0,
    )
    result = RunResult(
        status="running",
        best_epoch=1,
        val_error=0.1,
        test_error=0.15,
        final_test_error=0.25,
        diverged_epoch=None,
        epochs_completed=2,
        params=10,
        model_args={"num_members": 2},
        config={},
        history=[record],
    )
    report = {**epoch_report(result), "training_iteration": 2, "pid": 123, "done": False}
    curves = epoch_metrics(report)
    assert curves == record.curves()
    assert curves["epoch/val_error"] == 0.2 and report["val_error"] == 0.1
    assert curves["epoch/test_member_error_max"] == 0.9 and curves["epoch/lr"] == 0.1
    assert not set(curves) & {*SUMMARY_METRICS, "training_iteration", "pid", "epoch"}


def test_local_store_checks(tmp_path):
    check_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(TrackingError, match="does not exist"):
        check_tracking_uri(f"sqlite:///{tmp_path}/missing/mlflow.db")
    with pytest.raises(TrackingError, match="sqlite"):
        check_tracking_uri(str(tmp_path / "mlruns"))


def test_finish_leaves_no_run_running(mlflow_server, tmp_path):
    tracker = SweepTracker(mlflow_server, "finish-reconcile")
    record = tracker.start(tmp_path, params={"name": "finish-reconcile"})
    assert SweepRecord.load(tmp_path) == record  # what --resume reads back
    client = MlflowClient(mlflow_server)
    parent_tag = {"mlflow.parentRunId": record.parent_run_id}
    ids = {}
    for trial_id in ("t0", "t1", "t2", "gone"):
        run = client.create_run(record.experiment_id, tags={**parent_tag, "trial_id": trial_id})
        ids[trial_id] = run.info.run_id
    client.set_terminated(ids["t0"], "FINISHED")
    table = pd.DataFrame(
        {"trial_id": ["t0", "t1", "t2"], "status": ["finished", "interrupted", "failed"]}
    )
    tracker.finish(record, table, None, "KILLED")

    status = {t: client.get_run(i).info.status for t, i in ids.items()}
    assert status == {"t0": "FINISHED", "t1": "KILLED", "t2": "FAILED", "gone": "KILLED"}
    assert client.get_run(ids["t1"]).data.tags["status"] == "interrupted"
    assert client.get_run(record.parent_run_id).info.status == "KILLED"
    assert tracker.start(tmp_path, params={}) == record  # resuming reopens the same parent
    reopened = client.get_run(record.parent_run_id)
    assert reopened.info.status == "RUNNING" and reopened.data.tags["status"] == "running"


def test_a_restarted_trial_logs_the_params_a_killed_driver_left_unlogged(mlflow_server, tmp_path):
    """A driver killed between creating a point's run and logging its params leaves a run
    with tags only; the trial's next start must give that same run its params, not a second
    run (the run is what users compare in the MLflow UI)."""
    from ray.tune.experiment import Trial

    record = SweepTracker(mlflow_server, "params-after-kill").start(tmp_path, params={})
    client = MlflowClient(mlflow_server)
    config = train_config({"model": "16-M-64-H", "lam": 0.5, "trial": 1, "epochs": 2})
    trial = Trial("trainable", config={"train": config}, trial_id="kill0", stub=True)
    tags = {PARENT_TAG: record.parent_run_id, TRIAL_ID_TAG: "kill0", POINT_TAG: "0"}
    bare = client.create_run(record.experiment_id, tags=tags)  # the kill came here

    TrialLogger(record).on_trial_start(0, [], trial)

    runs = client.search_runs([record.experiment_id], f"tags.`{TRIAL_ID_TAG}` = 'kill0'")
    assert [r.info.run_id for r in runs] == [bare.info.run_id]
    params = runs[0].data.params
    assert (params["lam"], params["trial"], params["lr"]) == ("0.5", "1", "0.32")
    assert params["epochs"] == "2" and runs[0].info.status == "RUNNING"


def _failed_pack(
    mlflow_server: str, tmp_path: Path, name: str, error: str
) -> tuple[SweepRecord, MlflowClient, Any]:
    """A real (stub) Ray trial of a pack of two points whose first diverged in epoch 1
    before the pack failed with ``error``, logged by a TrialLogger from start to error."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    record = SweepTracker(mlflow_server, name).start(tmp_path, params={})
    pack = [train_config({"model": "1-M-1024-H", "lam": lam, "trial": 0}) for lam in (0.0, 1.0)]
    storage = StorageContext(str(tmp_path / "ray"), "exp", trial_dir_name=name)
    trial = Trial("trainable", config={"pack": pack}, trial_id=name, storage=storage, stub=True)
    logger = TrialLogger(record)
    logger.on_trial_start(0, [], trial)
    diverged = summary_report(_diverged(0.9))  # what the pack reported for that point
    trial.update_last_result({POINTS_KEY: [diverged, {"epoch": 2, "status": "running"}]})
    Path(trial.local_path).mkdir(parents=True)
    trial.handle_error(RuntimeError(error))  # what Ray does, then this:
    logger.on_trial_error(0, [], trial)
    return record, MlflowClient(mlflow_server), trial


def test_a_failed_pack_keeps_the_outcome_of_a_point_that_had_diverged(
    local_ray, mlflow_server, tmp_path
):
    """A pack that fails after one of its points diverged: that point's run ends diverged
    (FINISHED, with its summary), the others failed with the error."""
    record, client, _ = _failed_pack(mlflow_server, tmp_path, "pack0", "out of memory in epoch 2")

    runs = client.search_runs([record.experiment_id], f"tags.`{TRIAL_ID_TAG}` = 'pack0'")
    by_point = {int(r.data.tags[POINT_TAG]): r for r in runs}
    assert by_point[0].data.tags["status"] == "diverged"
    assert by_point[0].info.status == "FINISHED"
    assert by_point[0].data.metrics["val_error"] == 0.9  # its own, not the searcher's NaN
    assert by_point[0].data.metrics["test_error"] == 0.95
    assert by_point[1].data.tags["status"] == "failed"
    assert by_point[1].info.status == "FAILED"
    assert "out of memory in epoch 2" in by_point[1].data.tags["error"]


def _diverged(val_error: float) -> RunResult:
    return RunResult(
        status="diverged",
        best_epoch=1,
        val_error=val_error,
        test_error=0.95,
        final_test_error=0.95,
        diverged_epoch=2,
        epochs_completed=1,
        params=10,
        model_args={"num_members": 2},
        config={},
    )


def test_a_diverged_runs_own_values_reach_the_table_and_mlflow_not_the_searcher():
    """The closing report hides a diverged run's objectives from searchers (NaN), but the
    results table and the child run read its own values, as results.json has them."""
    from ray.tune.experiment import Trial

    report = summary_report(_diverged(0.4))
    assert all(math.isnan(report[name]) for name in OBJECTIVES)  # what searchers read
    trial = Trial("trainable", config={"train": {}}, trial_id="own00", stub=True)
    trial.update_last_result(report)
    ((_, last),) = trial_points(trial)
    assert last["val_error"] == 0.4 and last["test_error"] == 0.95
    pack = Trial("trainable", config={"pack": [{}, {}]}, trial_id="own01", stub=True)
    pack.update_last_result({POINTS_KEY: [report, epoch_report(_diverged(0.3))]})
    assert [last["val_error"] for _, last in trial_points(pack)] == [0.4, 0.3]


def test_a_resumed_trial_leaves_closed_runs_closed_and_clears_a_stale_error(
    local_ray, mlflow_server, tmp_path
):
    """After a restore (a new TrialLogger, as Ray unpickles it): a run already closed with
    its outcome is not reopened nor given its summary twice; a failed run that starts
    again loses its old error."""
    record, client, trial = _failed_pack(mlflow_server, tmp_path, "pack1", "worker died")

    resumed = TrialLogger(record)  # the restored sweep: the pack starts again
    resumed.on_trial_start(0, [], trial)
    runs = {
        int(r.data.tags[POINT_TAG]): r
        for r in client.search_runs([record.experiment_id], f"tags.`{TRIAL_ID_TAG}` = 'pack1'")
    }
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["status"] == "diverged"
    assert runs[0].data.tags["starts"] == "1"
    assert runs[1].info.status == "RUNNING" and "error" not in runs[1].data.tags
    assert runs[1].data.tags["starts"] == "2"

    finished = {**summary_report(_diverged(0.5)), "status": "finished"}
    trial.update_last_result({POINTS_KEY: [summary_report(_diverged(0.9)), finished]})
    resumed.on_trial_complete(0, [], trial)
    for point, run in runs.items():
        history = client.get_metric_history(run.info.run_id, "test_error")
        assert len(history) == 1, (point, history)  # each summary logged once
    after = client.get_run(runs[1].info.run_id)
    assert after.info.status == "FINISHED" and after.data.tags["status"] == "finished"
