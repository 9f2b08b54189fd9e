"""Real parts for the orchestration tests: an ``mlflow server`` on 127.0.0.1 (SQLite store,
proxied artifacts) and small search spaces derived from the smoke space (real Fashion-MNIST
through the shared ``data_dir`` fixture)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SPACES = ROOT / "search_spaces"
SERVER_START_S = 120  # a cold mlflow server on a busy 2-core machine takes ~25 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> str:
    """URI of a real MLflow tracking server, shared by the session's tests."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (root / "server.log").open("w")
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start:\n{(root / 'server.log').read_text()}"
                )
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


@pytest.fixture
def make_space(tmp_path: Path, data_dir: Path):
    """``make_space(base="fmnist_smoke.yaml", **changes)``: a copy of a shipped space with
    top-level keys replaced, reading the real Fashion-MNIST of ``data_dir``."""
    count = 0

    def make(base: str = "fmnist_smoke.yaml", **changes) -> Path:
        nonlocal count
        count += 1
        space = yaml.safe_load((SPACES / base).read_text())
        space.update({"data_dir": str(data_dir), **changes})
        path = tmp_path / f"space{count}.yaml"
        path.write_text(yaml.safe_dump(space, sort_keys=False))
        return path

    return make
