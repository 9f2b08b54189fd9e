"""End to end, in process: real Ray Tune, real ``modloss.train.fit`` on real Fashion-MNIST,
a real MLflow server. Each sweep is the smoke space made smaller."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from modloss.names import (
    OOD_CSV,
    OOD_DATASET_TAG,
    OOD_SCORES,
    RESULTS_FILE,
    SELECTED_EPOCH_FILE,
    SELECTED_EPOCH_METRICS,
    SHIFT_CSV,
    TRIAL_ARTIFACTS,
    curve,
)
from modloss.records import RunResult
from modloss.uncertainty import OOD_FALLBACK, ROTATIONS
from orchestration.reports import OBJECTIVES, summary_report
from orchestration.spaces import load_space
from orchestration.sweep import _analysis_artifacts, _tune_config, param_space, run_sweep

pytestmark = pytest.mark.slow

EPOCHS = 2


def _children(client: MlflowClient, parent_run_id: str, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )


def test_smoke_sweep_is_tracked_in_mlflow(local_ray, mlflow_server, make_space, tmp_path, capsys):
    space = make_space(name="smoke-e2e", epochs=EPOCHS, subset=1000, lam=[0.0, 1.0])
    out = io.StringIO()
    outcome = run_sweep(space, tracking_uri=mlflow_server, storage=tmp_path / "ray", out=out)

    assert outcome.status == "FINISHED"
    table = outcome.table
    assert len(table) == 4 and set(table.status) == {"finished"}
    assert set(zip(table.model, table.lam, strict=True)) == {
        (m, lam) for m in ("16-M-64-H", "256-M-4-H") for lam in (0.0, 1.0)
    }
    assert (table.test_error < 0.9).all()  # learned something in two epochs on 1,000 images
    pd.testing.assert_frame_equal(pd.read_csv(outcome.csv), table, check_dtype=False)
    assert "4 finished" in out.getvalue()
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert progress and all("/4 done" in line for line in progress)  # out of the whole grid
    # A trial's own start and end count in its line (Ray changes its status only after).
    ends = [line for line in progress if "] finished " in line]
    assert [line.split("]")[0].split()[-4] for line in ends] == ["1/4", "2/4", "3/4", "4/4"]
    assert all(" 0 running]" not in line for line in progress if "] start " in line)

    client = MlflowClient(mlflow_server)
    parent = client.get_run(outcome.record.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert "results.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = _children(client, parent.info.run_id, "smoke-e2e")
    assert len(children) == 4
    for run in children:
        params, tags = run.data.params, run.data.tags
        row = table[table.trial_id == tags["trial_id"]].iloc[0]
        assert (params["model"], float(params["lam"])) == (row.model, row.lam)
        assert float(params["lr"]) == row.lr and params["epochs"] == str(EPOCHS)
        assert tags["status"] == "finished" and run.info.status == "FINISHED"
        assert tags["sweep_id"] == outcome.record.sweep_id
        for key in ("train_loss", "val_error", "test_error"):
            history = client.get_metric_history(run.info.run_id, curve(key))
            assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
        assert run.data.metrics["test_error"] == pytest.approx(row.test_error)
        assert tags["num_members"] == {"16-M-64-H": "16", "256-M-4-H": "256"}[row.model]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert set(TRIAL_ARTIFACTS) <= artifacts
        # The selected epoch's uncertainty scalars are metrics of the run, as in its JSON.
        files = tmp_path / "artifacts" / run.info.run_id
        files.mkdir(parents=True)
        record = json.loads(
            Path(
                client.download_artifacts(run.info.run_id, SELECTED_EPOCH_FILE, str(files))
            ).read_text()
        )
        assert record["epoch"] == run.data.metrics["best_epoch"]
        assert set(record["metrics"]) == set(SELECTED_EPOCH_METRICS)
        for name in SELECTED_EPOCH_METRICS:
            assert run.data.metrics[name] == pytest.approx(record["metrics"][name], rel=1e-12)
        assert run.data.metrics["temperature"] > 0
        ood = pd.read_csv(client.download_artifacts(run.info.run_id, OOD_CSV, str(files)))
        assert list(ood["score"]) == list(OOD_SCORES)
        assert set(ood["ood_dataset"]) == {tags[OOD_DATASET_TAG]} == {record["ood_dataset"]}


def test_mlflow_test_error_is_the_best_epochs_when_the_best_epoch_is_not_the_last(
    local_ray, mlflow_server, make_space, tmp_path
):
    """The name ``test_error`` means one number everywhere: the test error at the
    best-validation epoch, in results.json, results.csv and MLflow (one value per run);
    the per-epoch curve is ``epoch/test_error``. An lr of 10 makes 16 small MLPs overshoot
    on 500 images, so their best epoch (2 or 3 of 4) is not the last."""
    space = make_space(
        name="best-not-last", models=["16-M-64-H"], lam=[0.0, 1.0], lr=10.0, epochs=4, subset=500
    )
    outcome = run_sweep(space, tracking_uri=mlflow_server, storage=tmp_path, out=io.StringIO())
    assert outcome.status == "FINISHED"
    csv = pd.read_csv(outcome.csv).set_index("trial_id")
    client = MlflowClient(mlflow_server)
    runs = _children(client, outcome.record.parent_run_id, "best-not-last")
    assert len(runs) == 2
    for run in runs:
        run_id, trial_id = run.info.run_id, run.data.tags["trial_id"]
        path = client.download_artifacts(run_id, RESULTS_FILE, str(tmp_path / trial_id))
        result = RunResult.read(path)
        assert result.best_epoch < result.epochs_completed == 4  # the premise
        assert result.test_error != result.final_test_error
        logged = client.get_metric_history(run_id, "test_error")
        assert [m.value for m in logged] == [result.test_error]  # exactly one value
        assert csv.loc[trial_id, "test_error"] == pytest.approx(result.test_error, abs=0)
        assert run.data.metrics["val_error"] == result.val_error == csv.loc[trial_id, "val_error"]
        assert run.data.metrics["best_epoch"] == result.best_epoch
        curve_points = client.get_metric_history(run_id, curve("test_error"))
        by_epoch = {m.step: m.value for m in curve_points}
        assert by_epoch[result.best_epoch] == result.test_error
        assert by_epoch[4] == result.final_test_error


def test_absurd_learning_rate_is_recorded_as_diverged(
    local_ray, mlflow_server, make_space, tmp_path
):
    space = make_space(
        name="diverge-e2e",
        models=["16-M-64-H"],
        lam=[0.5, 1.0],
        lr={"16-M-64-H": {0.5: 1.0e12, "default": 0.096}},
        epochs=EPOCHS,
        subset=500,
    )
    outcome = run_sweep(space, tracking_uri=mlflow_server, storage=tmp_path, out=io.StringIO())

    assert outcome.status == "FINISHED"  # a diverged trial ends normally
    statuses = dict(zip(outcome.table.lam, outcome.table.status, strict=True))
    assert statuses == {0.5: "diverged", 1.0: "finished"}
    client = MlflowClient(mlflow_server)
    runs = _children(client, outcome.record.parent_run_id, "diverge-e2e")
    by_lam = {float(r.data.params["lam"]): r for r in runs}
    assert by_lam[0.5].data.tags["status"] == "diverged"
    assert by_lam[1.0].data.tags["status"] == "finished"
    assert {r.info.status for r in runs} == {"FINISHED"}
    finished = client.get_metric_history(by_lam[1.0].info.run_id, curve("val_error"))
    assert len(finished) == EPOCHS


def test_optuna_search_with_asha(local_ray, mlflow_server, make_space, tmp_path):
    space = make_space(
        name="optuna-e2e",
        models=["16-M-64-H"],
        lam={"low": 0.0, "high": 1.0},
        lr={"low": 0.01, "high": 0.5, "log": True},
        epochs=EPOCHS,
        subset=300,
        search={"type": "optuna", "num_samples": 3, "seed": 0},
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
    )
    outcome = run_sweep(space, tracking_uri=mlflow_server, storage=tmp_path, out=io.StringIO())

    table = outcome.table
    assert outcome.status == "FINISHED" and len(table) == 3
    assert set(table.status) <= {"finished", "stopped"}
    assert table.lam.between(0, 1).all() and table.lam.nunique() == 3
    assert table.lr.between(0.01, 0.5).all()
    client = MlflowClient(mlflow_server)
    runs = _children(client, outcome.record.parent_run_id, "optuna-e2e")
    logged = {r.data.tags["trial_id"]: float(r.data.params["lr"]) for r in runs}
    assert logged == dict(zip(table.trial_id, table.lr, strict=True))  # what ran is logged
    # ASHA stops every trial that reaches max_t = epochs, at its last epoch's report: a
    # finished trial still has its analyses and its last epoch's results.
    finished = [r for r in runs if r.data.tags["status"] == "finished"]
    assert finished
    for run in finished:
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"robustness.png", "specialists.csv", "results.json"} <= artifacts
        path = client.download_artifacts(run.info.run_id, "results.json", str(tmp_path))
        assert json.loads(Path(path).read_text())["epochs_completed"] == EPOCHS


def _result(status: str, val_error: float, val_dropped_error: float) -> RunResult:
    return RunResult(
        status=status,
        best_epoch=1,
        val_error=val_error,
        test_error=0.3,
        val_dropped_error=val_dropped_error,
        final_test_error=0.3,
        diverged_epoch=None if status == "finished" else 2,
        epochs_completed=2,
        params=1,
        model_args={"num_members": 64},
        config={},
    )


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_optuna_is_told_both_objectives_of_the_summary(make_space, sampler):
    """What a multi-objective sweep hands Ray's OptunaSearch, driven as Tune drives it:
    both objectives of each trial's last report (the summary, best-validation epoch), and
    none for a run that did not finish."""
    import optuna

    search = {"type": "optuna", "sampler": sampler, "num_samples": 2, "seed": 0,
              "objectives": ["val_error", "val_dropped_error"]}  # fmt: skip
    space = load_space(make_space(base="fmnist_pareto.yaml", search=search))
    config = _tune_config(space)
    assert (config.metric, config.mode) == (None, None)  # one TuneConfig metric replaces both
    searcher = config.search_alg
    assert searcher.set_search_properties(config.metric, config.mode, param_space(space))
    for trial, result in (
        ("a", _result("finished", 0.2, 0.5)),
        ("b", _result("diverged", 0.1, 0.1)),
    ):
        assert 0 <= searcher.suggest(trial)["train"]["lam"] <= 1
        searcher.on_trial_complete(trial, result=summary_report(result))
    study = searcher._ot_study
    kind = {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler}[sampler]
    assert isinstance(study.sampler, kind)
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE] * 2
    finished, diverged = study.trials
    assert finished.values == [0.2, 0.5]
    # Optuna refuses the NaN objectives (Ray logs it): the sampler learns nothing from it.
    assert diverged.state != optuna.trial.TrialState.COMPLETE and diverged.values is None
    # Every objective of an unfinished run is NaN, not only val_error: a searcher is told
    # none of them (with one finite, a single-objective search on it would learn from it).
    unfinished = summary_report(_result("diverged", 0.1, 0.1))
    assert all(math.isnan(unfinished[name]) for name in OBJECTIVES)


def test_crashing_trial_is_failed_not_left_running(
    local_ray, mlflow_server, make_space, tmp_path, data_dir
):
    # Corrupt dataset files of the right size (a wrong size is refused before the sweep):
    # fit raises inside the trial, on every attempt.
    data = tmp_path / "corrupt-data" / "fashion-mnist"
    data.mkdir(parents=True)
    for real in (data_dir / "fashion-mnist").glob("*.gz"):
        with (data / real.name).open("wb") as f:
            f.truncate(real.stat().st_size)
    space = make_space(
        name="crash-e2e",
        models=["16-M-64-H"],
        lam=[0.5],
        epochs=1,
        data_dir=str(data.parent),
        max_failures=1,
    )
    outcome = run_sweep(space, tracking_uri=mlflow_server, storage=tmp_path, out=io.StringIO())

    assert outcome.status == "FAILED" and list(outcome.table.status) == ["failed"]
    client = MlflowClient(mlflow_server)
    (run,) = _children(client, outcome.record.parent_run_id, "crash-e2e")
    assert run.info.status == "FAILED" and run.data.tags["status"] == "failed"
    assert run.data.tags["failures"] == "1"  # retried once (max_failures), then failed
    assert "corrupt" in run.data.tags["error"]  # the trial's own exception, recorded
    assert client.get_run(outcome.record.parent_run_id).info.status == "FAILED"


def test_trial_analyses_at_the_selected_epoch(data_dir, tmp_path):
    """The trial's uncertainty analyses describe its best-validation epoch: the temperature
    is temperature_scale's on the saved logits, the unrotated shift point is the logged
    test accuracy and NLL at the best epoch, and the OOD table names its dataset."""
    from modloss.analysis import load_logits
    from modloss.train import TrainConfig, fit
    from modloss.uncertainty import temperature_scale

    config = TrainConfig.model_validate(
        {"model": "16-M-64-H", "lam": 0.5, "epochs": 2, "subset": 600, "data_dir": str(data_dir)}
    )
    result = fit(config, out_dir=tmp_path)
    _analysis_artifacts([tmp_path], [config])

    record = json.loads((tmp_path / SELECTED_EPOCH_FILE).read_text())
    assert record["epoch"] == result.best_epoch
    val, test = load_logits(tmp_path, "val"), load_logits(tmp_path, "test")
    fitted = temperature_scale(val.eta, val.target, test.eta, test.target)
    metrics = record["metrics"]
    assert metrics["temperature"] == fitted.temperature
    assert metrics["test_nll_scaled"] == fitted.nll_after <= fitted.nll_before
    assert metrics["test_ece_scaled"] == fitted.ece_after
    best = result.history[result.best_epoch - 1].test
    assert metrics["test_nll"] == pytest.approx(best.ensemble_nll, rel=1e-5)

    shift = pd.read_csv(tmp_path / SHIFT_CSV)
    assert tuple(shift["angle"]) == ROTATIONS
    upright = shift.iloc[0]
    assert upright["accuracy"] == pytest.approx(1 - result.test_error, abs=1e-9)
    assert upright["nll"] == pytest.approx(best.ensemble_nll, rel=1e-5)
    assert metrics["rotated90_accuracy"] == shift.set_index("angle").loc[90, "accuracy"]
    # Rotating Fashion-MNIST hurts: upside down is worse than upright.
    assert shift.set_index("angle").loc[180, "accuracy"] < upright["accuracy"]

    ood = pd.read_csv(tmp_path / OOD_CSV)
    assert list(ood["score"]) == list(OOD_SCORES)
    expected = "mnist" if (data_dir / "mnist" / "t10k-images-idx3-ubyte.gz").is_file() else None
    assert set(ood["ood_dataset"]) == {expected or OOD_FALLBACK} == {record["ood_dataset"]}
    assert ood["auroc"].between(0, 1).all() and ood["fpr95"].between(0, 1).all()
