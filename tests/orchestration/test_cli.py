"""``modloss sweep`` refuses bad input before anything runs: no Ray, no MLflow run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import ray
import typer
from mlflow import MlflowClient
from typer.testing import CliRunner

from orchestration.cli import EXIT_BAD_INPUT, register
from orchestration.tracking import runs_url

SMOKE = Path(__file__).resolve().parents[2] / "search_spaces" / "fmnist_smoke.yaml"

# (case id, top-level changes to the smoke space or the raw file text, what the error names)
BAD_SPACES = [
    ("lam>1", {"lam": [0.5, 1.5]}, ["lam[1]", "1.5", "less than or equal to 1"]),
    ("lam<0", {"lam": [-0.1]}, ["lam[0]", "-0.1", "greater than or equal to 0"]),
    ("lam-nan", "name: x\nmodels: [16-M-64-H]\nlam: [.nan]\nepochs: 1\n", ["lam[0]", "nan"]),
    ("unknown-model", {"models": ["16-M-64-H", "17-M-3-H"]}, ["models", "17-M-3-H", "allowed"]),
    ("unknown-dataset", {"dataset": "mnist-digits"}, ["dataset", "mnist-digits", "allowed"]),
    ("negative-lr", {"lr": -0.1}, ["lr", "-0.1", "greater than 0"]),
    ("zero-epochs", {"epochs": 0}, ["epochs", "0", "greater than or equal to 1"]),
    ("malformed-yaml", "name: x\nlam: [0, 1\nepochs: 2\n", ["malformed YAML", "line"]),
    ("unknown-key", {"lamda": [0.5]}, ["lamda", "unknown key", "allowed keys"]),
    ("gpus>1-fraction", {"resources": {"cpus": 1, "gpus": 1.5}}, ["resources", "1.5", "fraction"]),
    ("negative-cpus", {"resources": {"cpus": -1}}, ["resources.cpus", "-1"]),
    ("unknown-search", {"search": {"type": "random"}}, ["search", "random", "grid", "optuna"]),
    ("asha-budget", {"scheduler": {"type": "asha", "grace_period": 9}}, ["grace_period", "9"]),
    ("lr-table-hole", {"lr": {"16-M-64-H": {0.0: 0.3}}}, ["lr", "16-M-64-H", "default"]),
    ("lr-preset-typo", {"lr": "paperr"}, ["lr", "paperr", "paper"]),
    ("untuned-lambda", {"lam": [0.97]}, ["lam=0.97", "lr explicitly"]),
    ("zero-trials", {"trials": 0}, ["trials", "0"]),
    ("range-in-grid", {"lam": {"low": 0, "high": 1}}, ["lam", "optuna"]),
    ("not-a-mapping", "- just\n- a list\n", ["mapping"]),
    ("optimizer-section", {"optimizer": {"momentum": 0.5}}, ["'optimizer'", "unknown", "momentum"]),
    ("bad-setting", {"momentum": 1.0}, ["momentum", "1.0", "less than 1"]),
    ("late-milestone", {"milestones": [2, 5]}, ["milestones", "[5]", "below epochs (3)"]),
    (
        "test-objective",
        {"search": {"type": "optuna", "num_samples": 2, "objectives": ["test_error"]}},
        ["search.objectives", "test_error", "val_error"],
    ),
    (
        "asha-multi-objective",
        {
            "search": {"type": "optuna", "num_samples": 2, "objectives": ["val_error", "val_ece"]},
            "scheduler": {"type": "asha"},
        },
        ["ASHA", "val_ece", "'none'"],
    ),
    ("pack-asha", {"pack": True, "scheduler": {"type": "asha"}}, ["pack: true", "'asha'"]),
    (
        "pack-optuna",
        {"pack": True, "search": {"type": "optuna", "num_samples": 2}},
        ["pack: true", "'grid'", "'optuna'"],
    ),
    ("pack-distributed", {"pack": True, "distributed": {}}, ["pack: true", "distributed:"]),
]


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_entry_point_registers_the_commands():
    (ep,) = [ep for ep in entry_points(group="modloss.commands") if ep.name == "orchestration"]
    app = typer.Typer()
    ep.load()(app)
    assert {c.name for c in app.registered_commands} == {"sweep", "ui"}


@pytest.mark.parametrize(("case", "change", "named"), BAD_SPACES, ids=[c[0] for c in BAD_SPACES])
def test_bad_space_is_refused_before_anything_runs(
    app, make_space, tmp_path, monkeypatch, case, change, named
):
    monkeypatch.chdir(tmp_path)  # the default MLflow store and Ray storage would land here
    if isinstance(change, str):
        path = tmp_path / "bad.yaml"
        path.write_text(change)
    else:
        path = make_space(**change)
    result = CliRunner().invoke(app, ["sweep", str(path)])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    for text in [str(path), *named]:
        assert text in result.output
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "ray_results").exists()


def test_pack_flag_is_checked_with_the_space(app, make_space, tmp_path, monkeypatch):
    """--pack makes the space packed: an ASHA space is then refused, as with pack: true."""
    monkeypatch.chdir(tmp_path)
    path = make_space(scheduler={"type": "asha"})
    result = CliRunner().invoke(app, ["sweep", str(path), "--pack"])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert "pack: true cannot run with scheduler.type 'asha'" in result.output
    assert not ray.is_initialized() and not (tmp_path / "ray_results").exists()


def test_negative_max_concurrent_is_refused(app):
    result = CliRunner().invoke(app, ["sweep", str(SMOKE), "--max-concurrent", "0"])
    assert result.exit_code == EXIT_BAD_INPUT and "max-concurrent" in result.output


def test_missing_space_file(app, tmp_path):
    result = CliRunner().invoke(app, ["sweep", str(tmp_path / "nope.yaml")])
    assert result.exit_code == EXIT_BAD_INPUT and "nope.yaml" in result.output


@pytest.mark.parametrize("server", ["refusing", "silent"])
def test_unreachable_tracking_server_fails_fast(app, tmp_path, monkeypatch, server):
    monkeypatch.chdir(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        if server == "silent":
            sock.listen()  # accepts connections into the backlog, never answers
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
        if server == "refusing":
            sock.close()
        tic = time.monotonic()
        result = CliRunner().invoke(app, ["sweep", str(SMOKE), "--tracking-uri", uri])
        elapsed = time.monotonic() - tic
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert uri in result.output and "not reachable" in result.output
    assert elapsed < 10
    assert not ray.is_initialized()
    assert not (tmp_path / "ray_results").exists()


def test_resume_without_an_experiment(app, tmp_path):
    result = CliRunner().invoke(app, ["sweep", str(SMOKE), "--resume", "--storage", str(tmp_path)])
    assert result.exit_code == EXIT_BAD_INPUT and "nothing to resume" in result.output
    assert not ray.is_initialized()


@pytest.mark.slow
def test_ui_serves_the_store_on_localhost(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    modloss = str(Path(sys.executable).with_name("modloss"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment_id = MlflowClient(uri).create_experiment("fmnist_smoke")
    proc = subprocess.Popen(
        [modloss, "ui", "--tracking-uri", uri, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines = []
        while not lines or "MLflow UI for" not in lines[-1]:
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines)  # ended before announcing the UI
        # The runs table, not MLflow 3's GenAI overview page, of every experiment in the store.
        runs_table = runs_url(f"http://127.0.0.1:{port}", experiment_id)
        assert runs_table.startswith(f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs")
        assert f"fmnist_smoke: runs table at {runs_table}\n" in lines
        assert f"at http://127.0.0.1:{port} " in lines[-1]
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.5)
        assert (tmp_path / "mlflow.db").is_file()  # it serves the store it was given
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
