"""Kill ``modloss sweep`` midway, finish it with ``--resume``: every trial ends exactly once,
no child run is duplicated and none is left RUNNING."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from ray import tune

from modloss.names import curve

pytestmark = pytest.mark.slow

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
