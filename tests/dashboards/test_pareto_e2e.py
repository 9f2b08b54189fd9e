"""The λ–robustness Pareto search end to end, small: ``fmnist_pareto.yaml`` cut to 6 trials
of 2 epochs on a Fashion-MNIST subset, run by ``run_sweep`` (a real local Ray, Optuna's
multi-objective TPE, a real SQLite MLflow store), then the report built from that store.
The front the report draws must be the non-dominated set of the tracked trials."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from dashboards.data import load_sweep
from dashboards.figures import PARETO_GID, fig_pareto
from dashboards.report import build_report
from modloss.names import RESULTS_FILE, curve
from modloss.records import RunResult
from orchestration.sweep import run_sweep

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "pareto_e2e"
SAMPLES, EPOCHS = 6, 2


@pytest.fixture(scope="module")
def sweep(data_dir: Path, tmp_path_factory) -> tuple[object, str, Path]:
    """The sweep's outcome, its tracking URI and its working folder."""
    work = tmp_path_factory.mktemp("pareto")
    space = yaml.safe_load((ROOT / "search_spaces" / "fmnist_pareto.yaml").read_text())
    space["search"]["num_samples"] = SAMPLES
    space.update(
        name=EXPERIMENT, epochs=EPOCHS, subset=1000, max_concurrent=2, data_dir=str(data_dir)
    )
    path = work / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    outcome = run_sweep(path, tracking_uri=uri, storage=work / "ray", out=io.StringIO())
    return outcome, uri, work


def test_each_trial_reports_both_objectives_of_its_best_epoch(sweep):
    outcome, uri, work = sweep
    table = outcome.table
    assert outcome.status == "FINISHED" and len(table) == SAMPLES
    assert (table.status == "finished").all()
    assert table.lam.between(0, 1).all() and table.lam.nunique() == SAMPLES
    client = MlflowClient(uri)
    runs = {r.data.tags["trial_id"]: r for r in client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{outcome.record.parent_run_id}'",
    )}  # fmt: skip
    for row in table.itertuples():
        run = runs[row.trial_id]
        stored = client.download_artifacts(run.info.run_id, RESULTS_FILE, str(work))
        best = RunResult.model_validate(json.loads(Path(stored).read_text()))
        selected = best.history[best.best_epoch - 1].val
        # What Optuna was told (the summary, as results.csv and MLflow hold it) is the
        # selected epoch's pair of validation errors.
        assert (row.val_error, row.val_dropped_error) == (selected.error, selected.dropped_error)
        assert run.data.metrics["val_dropped_error"] == row.val_dropped_error
        history = client.get_metric_history(run.info.run_id, curve("val_dropped_error"))
        assert len(history) == EPOCHS


def test_the_drawn_front_is_the_non_dominated_set_of_the_trials(sweep, tmp_path):
    _, uri, _ = sweep
    data = load_sweep(EXPERIMENT, tracking_uri=uri)
    report = build_report(data, tmp_path)
    assert "fig_pareto" not in report.empty
    assert report.figures["fig_pareto"].stat().st_size > 10_000
    fig = fig_pareto(data)  # what build_report drew into fig_pareto.png
    (front,) = [
        np.asarray(line.get_xydata(), dtype=float)
        for ax in fig.axes
        for line in ax.lines
        if line.get_gid() == PARETO_GID
    ]
    trials = 100 * data.done[["val_error", "val_dropped_error"]].to_numpy(float)
    assert len(trials) == SAMPLES and len(front) >= 1
    on_front = {tuple(p) for p in front}
    assert on_front <= {tuple(t) for t in trials}  # every drawn point is a trial
    for p in front:  # no trial dominates a drawn point
        assert not any((t <= p).all() and (t < p).any() for t in trials), p
    for t in trials:  # and every trial left out is dominated by one
        if tuple(t) not in on_front:
            assert any((p <= t).all() and (p < t).any() for p in front), t
