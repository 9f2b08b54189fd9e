"""The docker-compose stack for tests/cluster/, built and brought up once per session.

`make cluster-test` runs these tests (`pytest tests/cluster`); a plain `pytest` (or
`make test`) does not collect them: they need Docker, build images and take minutes.

The stack is the real one: docker-compose.yml plus docker-compose.offline.yml (images
built on a local Debian base, CPU torch, Debian's PostgreSQL), postgres, mlflow, ray-head
and two CPU workers of one CPU each, under its own compose project name, with a
throw-away env file (random token and password, mode 0600, deleted afterwards) and
random free ports on 127.0.0.1. The tests talk to it through those ports only; `docker`
itself is used to kill, stop and inspect containers. Whatever happens, the fixture ends
with `docker compose down -v` and checks that no container of the project is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "modloss-clustertest"
ARTIFACTS = ROOT / "test-artifacts" / "cluster"  # git-ignored: collected logs
WORKERS = 2
UP_TIMEOUT_S = 300


TIMINGS: dict[str, float] = {}  # seconds by step, shown at the end of the session


def pytest_terminal_summary(terminalreporter) -> None:
    if TIMINGS:
        shown = ", ".join(f"{k} {v:.0f} s" for k, v in TIMINGS.items())
        terminalreporter.write_line(f"cluster timings: {shown}")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Collected only when the command line names tests/cluster (or a file in it)."""
    here = Path(__file__).parent.resolve()
    if collection_path.resolve() == here or here in collection_path.resolve().parents:
        named = [Path(a.split("::")[0]).resolve() for a in config.args]
        if not any(p == here or here in p.parents for p in named):
            return True
    return None


def _compose_binary() -> str:
    found = Path(sys.executable).with_name("docker-compose")
    binary = str(found) if found.is_file() else shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose (Compose v2) not found: run `make cluster-test`")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    """The running stack: its compose command, ports and (never printed) secrets."""

    env_file: Path
    token: str = field(repr=False)
    password: str = field(repr=False)
    mlflow_port: int
    ray_port: int
    data_dir: Path
    compose_cmd: list[str]
    killed: list[str] = field(default_factory=list)  # container ids killed by a test
    timings: dict[str, float] = field(default_factory=lambda: TIMINGS)

    @contextlib.contextmanager
    def timed(self, label: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self.timings[label] = time.monotonic() - start

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def ray_address(self) -> str:
        return f"http://127.0.0.1:{self.ray_port}"

    def compose(self, *args: str, timeout: float = 600, check: bool = True):
        result = subprocess.run(
            [*self.compose_cmd, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"docker compose {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def container_ids(self, service: str) -> list[str]:
        out = self.compose("ps", "-q", service).stdout
        return sorted(out.split())

    def ray_api(self, path: str) -> dict:
        request = urllib.request.Request(
            self.ray_address + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def alive_nodes(self) -> list[dict]:
        nodes = self.ray_api("/api/v0/nodes?detail=1")["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def up(self) -> None:
        """`up -d --wait` (every health check passes), then Ray sees the head and both
        workers alive."""
        self.compose(
            "up", "-d", "--no-build", "--wait", "--wait-timeout", str(UP_TIMEOUT_S),
            "--scale", "ray-worker=0", "--scale", f"ray-worker-cpu={WORKERS}",
            timeout=UP_TIMEOUT_S + 60,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            try:
                if len(self.alive_nodes()) == WORKERS + 1:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Ray did not report {WORKERS + 1} alive nodes within 120 s")
            time.sleep(2)

    def collect_logs(self, label: str) -> Path:
        """`docker compose logs` of every service, and each running Ray container's Ray
        session logs, into ARTIFACTS/label/."""
        folder = ARTIFACTS / label
        folder.mkdir(parents=True, exist_ok=True)
        logs = self.compose("logs", "--no-color", "--timestamps", check=False)
        (folder / "compose.log").write_text(logs.stdout + logs.stderr)
        for service in ("ray-head", "ray-worker-cpu"):
            for cid in self.container_ids(service):
                if cid in self.killed:
                    continue
                out = subprocess.run(
                    ["docker", "exec", cid, "sh", "-c",
                     "find /tmp/ray/session_latest/logs -type f -exec cat {} +"],
                    capture_output=True, timeout=120,
                )  # fmt: skip
                (folder / f"ray-{service}-{cid[:12]}.log").write_bytes(out.stdout)
        return folder


def _write_env_file(path: Path, values: dict[str, str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in values.items())


def _prerequisites() -> dict[str, str]:
    """.ci/cluster-prereqs.sh: Docker, dockerd, the base image, the CPU torch wheel."""
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "cluster-prereqs.sh")],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if result.returncode != 0:
        pytest.fail(f".ci/cluster-prereqs.sh failed:\n{result.stderr[-4000:]}")
    return dict(line.split("=", 1) for line in result.stdout.split() if "=" in line)


@pytest.fixture(scope="session")
def stack(data_dir: Path) -> Iterator[Stack]:
    prereqs = _prerequisites()
    tmp = Path(tempfile.mkdtemp(prefix="modloss-cluster-"))
    env_file = tmp / ".env"
    token, password = secrets.token_hex(32), secrets.token_hex(24)
    mlflow_port, ray_port = _free_port(), _free_port()
    _write_env_file(
        env_file,
        {
            "RAY_AUTH_TOKEN": token,
            "POSTGRES_PASSWORD": password,
            "MODLOSS_BASE_IMAGE": prereqs["MODLOSS_BASE_IMAGE"],
            "MODLOSS_IMAGE": "modloss:offline",
            "BIND_ADDRESS": "127.0.0.1",
            "MLFLOW_PORT": str(mlflow_port),
            "RAY_DASHBOARD_PORT": str(ray_port),
            "MODLOSS_HOST_DATA_DIR": str(data_dir.resolve()),
            "RAY_WORKER_NUM_CPUS": "1",
            "RAY_SHM_SIZE": "1gb",
            "MLFLOW_WORKERS": "2",
        },
    )
    compose_cmd = [
        _compose_binary(), "--project-name", PROJECT, "--env-file", str(env_file),
        "-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "docker-compose.offline.yml"),
        "--profile", "cpu",
    ]  # fmt: skip
    s = Stack(env_file, token, password, mlflow_port, ray_port, data_dir, compose_cmd)
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    try:
        s.compose("down", "-v", "--remove-orphans", timeout=180)  # a previous run's leftovers
        # One build of the project image serves mlflow and every Ray node.
        with s.timed("build"):
            s.compose("build", "postgres", "mlflow", timeout=1800)
        with s.timed("up"):
            s.up()
        yield s
    finally:
        try:
            s.collect_logs("final")
        finally:
            with s.timed("down -v"):
                down = s.compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False)
            shutil.rmtree(tmp, ignore_errors=True)
            left = subprocess.run(
                ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                capture_output=True, text=True,
            ).stdout.split()  # fmt: skip
            assert down.returncode == 0, down.stderr[-2000:]
            assert not left, f"containers of {PROJECT} left after down -v: {left}"
