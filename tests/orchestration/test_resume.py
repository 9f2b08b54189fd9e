"""Kill ``modloss sweep`` midway, finish it with ``--resume``: every trial ends exactly once,
no child run is duplicated and none is left RUNNING. Resume a sweep whose space gained grid
points: they run, once each, under the same parent run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from ray import tune

from dashboards.data import load_sweep
from modloss.names import curve

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MODLOSS = str(Path(sys.executable).with_name("modloss"))
EPOCHS = 2
# Three trials one at a time: the kill lands after the first finishes, and the third cannot
# also have finished in the moment between noticing that and the signal.
LAMS = [0.0, 0.5, 1.0]
RUN_TIMEOUT_S = 600


def _runs(client: MlflowClient, experiment: str) -> tuple[object, list]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None, []
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return (parents[0] if parents else None), children


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_killed_sweep_is_finished_by_resume(mlflow_server, make_space, tmp_path, sig):
    name = f"resume-{sig.name.lower()}"
    space = make_space(
        name=name, models=["16-M-64-H"], lam=LAMS, epochs=EPOCHS, subset=500, max_concurrent=1
    )
    command = [MODLOSS, "sweep", str(space), "--tracking-uri", mlflow_server]
    client = MlflowClient(mlflow_server)
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    first = None
    while first is None:
        assert driver.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(0.5)
        _, children = _runs(client, name)
        first = next((r for r in children if r.data.tags.get("status") == "finished"), None)
    driver.send_signal(sig)
    code = driver.wait(timeout=120)
    log.close()

    parent, children = _runs(client, name)
    if sig == signal.SIGINT:
        assert code == 130  # interrupted: finish it with --resume
        assert parent.info.status == "KILLED"
        assert "RUNNING" not in {r.info.status for r in children}
    else:
        assert code == -signal.SIGKILL
    finished = [r for r in children if r.data.tags.get("status") == "finished"]
    assert len(finished) < len(LAMS)  # the kill came before the sweep could finish

    resumed = subprocess.run(
        [*command, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    parent, children = _runs(client, name)
    assert parent.info.status == "FINISHED"
    assert len(children) == len(LAMS)  # one child per trial, none duplicated
    assert sorted(float(r.data.params["lam"]) for r in children) == LAMS
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, curve("val_error"))]
        assert sorted(steps) == list(range(1, EPOCHS + 1))  # no epoch logged twice
    # The trial that had finished trained no epoch again. After SIGKILL, Ray's snapshot may
    # predate its end: then it restarts from its last checkpoint, which fit sees complete,
    # and its only report after the restore is the closing summary.
    exp_dir = tmp_path / "ray_results" / name
    starts = {r.data.tags["trial_id"]: r.data.tags["starts"] for r in children}
    trial_id = first.data.tags["trial_id"]
    (trial,) = [t for t in tune.ExperimentAnalysis(str(exp_dir)).trials if t.trial_id == trial_id]
    assert starts[trial_id] == "1" or trial.last_result["iterations_since_restore"] == 1
    if sig == signal.SIGINT:
        assert starts[trial_id] == "1"
    table = pd.read_csv(exp_dir / "results.csv")
    assert sorted(table.lam) == LAMS and set(table.status) == {"finished"}


# --------------------------------------------------------------------------- added points

GROW_EPOCHS = 2


def _grow_space(folder: Path, data_dir: Path, **changes) -> Path:
    """The space of the growing sweep: one model, 300 images, one trial at a time."""
    space = yaml.safe_load((ROOT / "search_spaces" / "fmnist_smoke.yaml").read_text())
    space.update(
        {
            "name": "grow", "models": ["16-M-64-H"], "lam": [0.0, 1.0], "trials": 1,
            "epochs": GROW_EPOCHS, "subset": 300, "max_concurrent": 1, "data_dir": str(data_dir),
            **changes,
        }
    )  # fmt: skip
    path = folder / f"grow-{len(list(folder.glob('grow-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def _points_once(exp_dir: Path, client: MlflowClient, expected: list[tuple[float, int]]) -> list:
    """The table and MLflow hold each (λ, trial) of ``expected`` exactly once, finished,
    under one FINISHED parent, nothing RUNNING; returns the child runs."""
    table = pd.read_csv(exp_dir / "results.csv")
    assert sorted(zip(table.lam, table.trial, strict=True)) == sorted(expected)
    assert set(table.status) == {"finished"} and table.trial_id.is_unique
    parent, children = _runs(client, "grow")
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    coords = sorted((float(r.data.params["lam"]), int(r.data.params["trial"])) for r in children)
    assert coords == sorted(expected)  # one child per point, none duplicated
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["trial_id"] for r in children} == set(table.trial_id)
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, curve("val_error"))]
        assert sorted(steps) == list(range(1, GROW_EPOCHS + 1))  # no epoch logged twice
    return children


def test_resume_runs_the_grid_points_an_edited_space_adds(tmp_path, data_dir):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_dir = tmp_path / "ray_results" / "grow"

    def sweep(space: Path, *flags: str) -> subprocess.CompletedProcess:
        command = [MODLOSS, "sweep", str(space), "--tracking-uri", uri, *flags]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    first = sweep(_grow_space(tmp_path, data_dir))
    assert first.returncode == 0, first.stdout + first.stderr
    stored = _points_once(exp_dir, client, [(0.0, 0), (1.0, 0)])

    # A λ added: only that point runs, as a further experiment under the same parent.
    more_lam = _grow_space(tmp_path, data_dir, lam=[0.0, 0.5, 1.0])
    grown = sweep(more_lam, "--resume")
    assert grown.returncode == 0, grown.stdout + grown.stderr
    message = "--resume: the space adds 1 grid point (lam: 0.5); running them after the stored 2"
    assert message in grown.stdout
    assert "3 of 3 trials started" in grown.stdout
    after = _points_once(exp_dir, client, [(0.0, 0), (0.5, 0), (1.0, 0)])
    assert {r.info.run_id for r in stored} < {r.info.run_id for r in after}  # kept, not rerun

    # The same file again: nothing new runs, nothing is duplicated.
    again = sweep(more_lam, "--resume")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "adds" not in again.stdout and "3 of 3 trials started" in again.stdout
    assert {r.info.run_id for r in _points_once(exp_dir, client, [(0, 0), (0.5, 0), (1, 0)])} == {
        r.info.run_id for r in after
    }

    # Points added together with another change: refused, naming the other key.
    before = (exp_dir / "results.csv").read_text()
    edited = _grow_space(tmp_path, data_dir, lam=[0.0, 0.5, 0.8, 1.0], epochs=GROW_EPOCHS + 1)
    refused = sweep(edited, "--resume")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    (error,) = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert "epochs" in error and f"{GROW_EPOCHS} -> {GROW_EPOCHS + 1}" in error
    assert (exp_dir / "results.csv").read_text() == before
    _points_once(exp_dir, client, [(0.0, 0), (0.5, 0), (1.0, 0)])

    # A second trial of every λ: a third experiment, its driver killed while it runs.
    more_trials = _grow_space(tmp_path, data_dir, lam=[0.0, 0.5, 1.0], trials=2)
    log = (tmp_path / "killed.log").open("w")
    driver = subprocess.Popen(
        [MODLOSS, "sweep", str(more_trials), "--tracking-uri", uri, "--resume"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not any(r.data.params.get("trial") == "1" for r in _runs(client, "grow")[1]):
        assert driver.poll() is None, (tmp_path / "killed.log").read_text()
        assert time.monotonic() < deadline, "no added trial started in time"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    log.close()
    assert "the space adds 3 grid points (trial: 1)" in (tmp_path / "killed.log").read_text()
    finished = [r for r in _runs(client, "grow")[1] if r.data.tags.get("status") == "finished"]
    assert len(finished) < 6  # the kill came before the added points had all run

    resumed = sweep(more_trials, "--resume")  # the added points are recorded: none is added
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "adds" not in resumed.stdout and "6 of 6 trials started" in resumed.stdout
    expected = [(lam, t) for lam in (0.0, 0.5, 1.0) for t in (0, 1)]
    children = _points_once(exp_dir, client, expected)
    assert {r.info.run_id for r in after} < {r.info.run_id for r in children}
    assert sorted(p.name for p in exp_dir.glob("extension-*")) == ["extension-1", "extension-2"]

    report = load_sweep("grow", tracking_uri=uri)  # `modloss report` sees one sweep of 6
    assert len(report.runs) == 6 and not report.duplicates


def test_killed_packed_sweep_is_finished_by_resume(mlflow_server, make_space, tmp_path):
    """``--pack``: two packed Ray trials (one per trial seed) of two points each, one at a
    time; SIGKILL once a point has finished, then --resume: every point ends exactly once."""
    name = "resume-packed"
    lams, trials = [0.0, 1.0], 2
    space = make_space(
        name=name, models=["16-M-64-H"], lam=lams, trials=trials, epochs=EPOCHS, subset=500,
        max_concurrent=1,
    )  # fmt: skip
    command = [MODLOSS, "sweep", str(space), "--tracking-uri", mlflow_server, "--pack"]
    client = MlflowClient(mlflow_server)
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        assert driver.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, "no point finished in time"
        time.sleep(0.5)
        _, children = _runs(client, name)
        if any(r.data.tags.get("status") == "finished" for r in children):
            break
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=120)
    log.close()
    _, children = _runs(client, name)
    assert sum(r.data.tags.get("status") == "finished" for r in children) < len(lams) * trials

    resumed = subprocess.run(
        [*command, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "4 of 4 points started, in 2 packed Ray trials (4 finished)" in resumed.stdout

    parent, children = _runs(client, name)
    assert parent.info.status == "FINISHED"
    points = sorted((r.data.tags["trial_id"], r.data.tags["point"]) for r in children)
    assert len(points) == len(set(points)) == len(lams) * trials  # none duplicated
    assert len({trial_id for trial_id, _ in points}) == trials
    assert sorted((float(r.data.params["lam"]), r.data.params["trial"]) for r in children) == [
        (lam, str(t)) for lam in lams for t in range(trials)
    ]
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, curve("val_error"))]
        assert sorted(steps) == list(range(1, EPOCHS + 1))  # no epoch logged twice
    table = pd.read_csv(tmp_path / "ray_results" / name / "results.csv")
    assert len(table) == len(lams) * trials and set(table.status) == {"finished"}
