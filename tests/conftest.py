"""Shared fixtures: the real dataset directory, an MD5 cache kept out of the user's home, and
a real ``mlflow server`` on 127.0.0.1 (SQLite store, proxied artifacts)."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import modloss.data._files

REPO = Path(__file__).resolve().parents[1]
SERVER_START_S = 120  # a cold mlflow server on a busy 2-core machine takes ~25 s


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """$MODLOSS_DATA_DIR, else `<repo>/../shared/data`; fails (never skips) when the real
    Fashion-MNIST files are not there, since the smoke tests are meaningless without them."""
    root = Path(os.environ.get("MODLOSS_DATA_DIR") or REPO.parent / "shared" / "data")
    folder = root / "fashion-mnist"
    if not folder.is_dir():
        pytest.fail(
            f"real Fashion-MNIST not found at {folder}: set MODLOSS_DATA_DIR to a directory "
            "holding fashion-mnist/*.gz (see ../shared/data/README.md)"
        )
    return root


@pytest.fixture(scope="session", autouse=True)
def _md5_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests record verified MD5s in a temporary file rather than the user's cache folder."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("md5-cache") / "verified-md5.json"
        mp.setattr(modloss.data._files, "MD5_CACHE_FILE", path)
        yield


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
