"""The docker-compose cluster for real (`make cluster-test`): a sweep submitted to it, a
worker killed mid-trial, a restart, its security properties. The tests share one stack
(tests/cluster/conftest.py) and run in file order; later ones use the earlier ones' runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import ViewType

from modloss.names import RESULTS_FILE, curve

if TYPE_CHECKING:
    from tests.cluster.conftest import Stack

ROOT = Path(__file__).resolve().parents[2]
MODLOSS = str(Path(sys.executable).with_name("modloss"))
SMOKE = "search_spaces/fmnist_smoke.yaml"
KILL_SPACE = "tests/cluster/cluster_kill.yaml"
SUBMIT_TIMEOUT_S = 480

# Ray's own record of each trial, read on the head node from the shared storage volume.
PROBE = """
import json, sys
from ray.tune import ExperimentAnalysis
keys = ("hostname", "training_iteration", "iterations_since_restore", "epoch", "summary")
trials = ExperimentAnalysis(sys.argv[1]).trials
print("TRIALS " + json.dumps([
    {"trial_id": t.trial_id, "status": t.status, "num_failures": t.num_failures,
     **{k: (t.last_result or {}).get(k) for k in keys}} for t in trials]))
"""


def _env(stack: Stack, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return env


def _submit(stack: Stack, space: str, token: str | None, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [MODLOSS, "submit", space, "--address", stack.ray_address],
        cwd=ROOT,
        env=_env(stack, token),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=SUBMIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"modloss submit ran over {SUBMIT_TIMEOUT_S} s:\n{out[-3000:]}{err[-3000:]}")
    return process.returncode, out, err


def _runs(client: MlflowClient, experiment: str) -> tuple[list, list]:
    """(parent runs, child runs) of an experiment, deleted ones included."""
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def _ray_trials(stack: Stack, experiment: str) -> list[dict]:
    """Each trial's Ray Tune state (status, failures, last result) from the storage volume,
    read by a Ray job on the head node."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(
        stack.ray_address, headers={"Authorization": f"Bearer {stack.token}"}
    )
    path = f"/mnt/ray-storage/{experiment}"
    job = client.submit_job(entrypoint=f"python -c {shlex.quote(PROBE)} {path}")
    deadline = time.monotonic() + 180
    while str(client.get_job_status(job).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, "the probe job did not end within 180 s"
        time.sleep(1)
    logs = client.get_job_logs(job)
    line = next((ln for ln in logs.splitlines() if ln.startswith("TRIALS ")), None)
    assert line is not None, logs[-3000:]
    return json.loads(line[len("TRIALS ") :])


def _hostname(container: str) -> str:
    return subprocess.run(
        ["docker", "inspect", "-f", "{{.Config.Hostname}}", container],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def _assert_settled(client: MlflowClient, experiment: str, num_trials: int) -> list:
    """One FINISHED parent and one FINISHED child per trial, none duplicated."""
    parents, children = _runs(client, experiment)
    assert [p.info.status for p in parents] == ["FINISHED"]
    trial_ids = [c.data.tags.get("trial_id") for c in children]
    assert len(children) == num_trials and len(set(trial_ids)) == num_trials, trial_ids
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert [c.info.status for c in children] == ["FINISHED"] * num_trials
    assert [c.data.tags.get("status") for c in children] == ["finished"] * num_trials
    return children


# --- 4. security, before anything ran ---------------------------------------------------


def test_published_ports_listen_on_loopback_only(stack: Stack):
    lines = stack.compose("ps", "--format", "json").stdout.splitlines()
    published = [json.loads(line) for line in lines if line.strip()]
    ports = {
        (p["URL"], p["PublishedPort"])
        for c in published
        for p in c.get("Publishers") or []
        if p.get("PublishedPort")
    }
    assert ports == {("127.0.0.1", stack.mlflow_port), ("127.0.0.1", stack.ray_port)}
    # What the host's kernel says: every listener on those ports is bound to 127.0.0.1.
    listeners = subprocess.run(
        ["ss", "-Hltn"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for port in (stack.mlflow_port, stack.ray_port):
        local = [ln.split()[3] for ln in listeners if ln.split()[3].endswith(f":{port}")]
        assert local == [f"127.0.0.1:{port}"], (port, local)


def test_submit_without_the_token_is_refused_in_one_line(stack: Stack):
    for token in (None, "0" * 64):
        code, out, err = _finish(_submit(stack, SMOKE, token))
        assert code == 2, (code, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert re.match(r"error: .*(token|Unauthorized|Forbidden).*--token", lines[0]), lines[0]
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    with pytest.raises(AuthenticationError):
        JobSubmissionClient(stack.ray_address).list_jobs()


# --- 1. a submitted sweep ---------------------------------------------------------------


def test_submitted_sweep_tracks_every_trial_on_both_workers(stack: Stack, tmp_path: Path):
    with stack.timed("sweep 1"):
        code, out, err = _finish(_submit(stack, SMOKE, stack.token))
    assert code == 0, (out[-3000:], err[-3000:])
    assert re.search(r"job modloss-fmnist_smoke-\S+: SUCCEEDED", err), err[-2000:]

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    children = _assert_settled(client, "fmnist_smoke", 6)
    for child in children:
        assert child.info.artifact_uri.startswith("mlflow-artifacts:"), child.info.artifact_uri
        epochs = [m.step for m in client.get_metric_history(child.info.run_id, curve("val_error"))]
        assert epochs == [1, 2, 3]
        local = client.download_artifacts(child.info.run_id, RESULTS_FILE, str(tmp_path))
        results = json.loads(Path(local).read_text())
        assert results["status"] == "finished" and results["epochs_completed"] == 3
        assert child.data.tags["model"] == results["config"]["model"]
    # The runs are in PostgreSQL (the server has no other store).
    count = stack.compose(
        "exec", "-T", "postgres", "psql", "-U", "mlflow", "-d", "mlflow", "-tAc",
        "select count(*) from runs",
    ).stdout.strip()  # fmt: skip
    assert count == "7"

    trials = _ray_trials(stack, "fmnist_smoke")
    workers = {_hostname(c) for c in stack.container_ids("ray-worker-cpu")}
    assert len(workers) == 2
    assert len(trials) == 6 and all(t["status"] == "TERMINATED" for t in trials)
    assert {t["hostname"] for t in trials} == workers


# --- 2. a worker dies mid-trial ---------------------------------------------------------


def test_a_killed_worker_trial_resumes_on_the_other_from_its_checkpoint(stack: Stack):
    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    process = _submit(stack, KILL_SPACE, stack.token)
    victim_container = stack.container_ids("ray-worker-cpu")[0]
    survivor = {_hostname(c) for c in stack.container_ids("ray-worker-cpu")} - {
        _hostname(victim_container)
    }
    epochs = yaml.safe_load((ROOT / KILL_SPACE).read_text())["epochs"]
    # Both trials (one per worker) are under way: 2 or more of their epochs reported.
    deadline = time.monotonic() + 300
    steps: dict[str, int] = {}
    while not (len(steps) == 2 and min(steps.values()) >= 2):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"trials did not reach epoch 2 in time: {steps}"
        time.sleep(0.5)
        if client.get_experiment_by_name("cluster_kill") is None:
            continue
        steps = {
            c.data.tags["trial_id"]: max(
                (m.step for m in client.get_metric_history(c.info.run_id, curve("val_error"))),
                default=0,
            )
            for c in _runs(client, "cluster_kill")[1]
        }
    assert max(steps.values()) < epochs, f"too late to kill a worker mid-trial: {steps}"
    subprocess.run(["docker", "kill", victim_container], check=True, capture_output=True)
    stack.killed.append(victim_container)

    with stack.timed("sweep 2 after the kill"):
        code, out, err = _finish(process)
    assert code == 0, (out[-3000:], err[-3000:])
    assert re.search(r"job modloss-cluster_kill-\S+: SUCCEEDED", err), err[-2000:]
    state = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Running}} {{.RestartCount}}", victim_container],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert state == ["false", "0"], "the killed worker came back: the retry may have used it"

    children = _assert_settled(client, "cluster_kill", 2)
    trials = {t["trial_id"]: t for t in _ray_trials(stack, "cluster_kill")}
    failed = [t for t in trials.values() if t["num_failures"] == 1]
    assert len(failed) == 1, trials
    victim = failed[0]
    other = next(t for t in trials.values() if t is not victim)
    assert other["num_failures"] == 0
    # Both ended on the surviving worker: the retry too.
    assert victim["hostname"] in survivor and other["hostname"] in survivor, trials
    # The retry restored the checkpoint of the last epoch reported before the kill: the
    # iterations before that restore are the epochs it did not run again.
    restored_at = victim["training_iteration"] - victim["iterations_since_restore"]
    assert steps[victim["trial_id"]] <= restored_at < epochs, (steps, victim)
    run = next(c for c in children if c.data.tags["trial_id"] == victim["trial_id"])
    assert run.data.tags["starts"] == "2" and run.data.tags["failures"] == "1"
    history = [m.step for m in client.get_metric_history(run.info.run_id, curve("val_error"))]
    assert history == list(range(1, epochs + 1))


# --- 3. restart -------------------------------------------------------------------------


def test_runs_survive_a_restart_and_the_report_is_rebuilt(stack: Stack, tmp_path: Path):
    client = MlflowClient(tracking_uri=stack.mlflow_uri)

    def snapshot() -> dict[str, tuple]:
        out = {}
        for name in ("fmnist_smoke", "cluster_kill"):
            for run in sum(_runs(client, name), []):
                metrics = tuple(sorted(run.data.metrics.items()))
                out[run.info.run_id] = (name, run.info.status, metrics)
        return out

    before = snapshot()
    assert len(before) == 7 + 3
    stack.collect_logs("before-restart")  # the Ray session logs go with the containers
    with stack.timed("restart: down"):
        stack.compose("down", "--timeout", "20", timeout=180)
    assert not stack.container_ids("ray-head")
    stack.killed.clear()
    with stack.timed("restart: up"):
        stack.up()
    assert snapshot() == before

    out = tmp_path / "report"
    with stack.timed("report"):
        result = subprocess.run(
            [MODLOSS, "report", "--experiment", "fmnist_smoke", "--tracking-uri",
             stack.mlflow_uri, "--out", str(out)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 runs (6 with results)" in result.stdout, result.stdout
    html = (out / "report.html").read_text()
    assert "256-M-4-H" in html and "16-M-64-H" in html
    assert len(list(out.glob("*.png"))) >= 3 and list(out.glob("*.csv"))


# --- 4. no secret in any log ------------------------------------------------------------


def test_logs_hold_neither_the_token_nor_the_password(stack: Stack):
    stack.collect_logs("end")
    folders = [p for p in (ROOT / "test-artifacts" / "cluster").iterdir() if p.is_dir()]
    files = [f for folder in folders for f in folder.iterdir()]
    # compose + head + the surviving worker before the restart, compose + head + 2 workers now
    assert len(files) >= 3 + 4, files
    assert sum(f.stat().st_size for f in files) > 10_000
    secrets = (stack.token.encode(), stack.password.encode())
    leaks = [str(f.relative_to(ROOT)) for f in files if any(s in f.read_bytes() for s in secrets)]
    assert not leaks, f"a secret appears in {leaks}"
