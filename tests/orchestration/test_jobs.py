"""``modloss submit / jobs / logs`` against a real Ray head with token authentication, the
sweep tracked to a real MLflow server whose backend store is a real PostgreSQL.

Nothing is faked: ``ray start --head`` on 127.0.0.1 (free ports, its own temp dir),
PostgreSQL from Debian's ``postgresql`` package started by the fixture (initdb + pg_ctl as
the ``postgres`` user when run as root), ``mlflow server`` on it, and the smoke space run
as a Ray Job through the installed ``modloss`` command. Missing PostgreSQL binaries fail
the tests: CI installs them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestration.jobs import (
    WORKING_DIR_EXCLUDES,
    follow_logs,
    job_client,
    submit_sweep,
    sweep_entrypoint,
)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SMOKE = "search_spaces/fmnist_smoke.yaml"
START_S = 180  # cold starts on a busy 2-core machine
SWEEP_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _descendants(pid: int) -> list[tuple[int, str]]:
    """Every live process below ``pid`` as (pid, start time), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in glob.glob("/proc/[0-9]*"):
        child = int(entry.rsplit("/", 1)[1])
        fields = _stat(child)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            fields = _stat(child)
            if fields is not None:
                out.append((child, fields[19]))  # field 22 of stat: start time
                todo.append(child)
    return out


def _stop(proc: subprocess.Popen, grace_s: float = 60) -> None:
    """SIGTERM the process we started; then SIGKILL, by pid, any process it had started
    that is still alive (the same process: its start time is checked, not just the pid)."""
    family = _descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid, started in family:
        fields = _stat(pid)
        if fields is not None and fields[19] == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, headers: dict | None = None) -> None:
    deadline = time.monotonic() + START_S
    while True:
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=3) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not come up:\n{log.read_text()[-5000:]}")
        time.sleep(1)


# --------------------------------------------------------------------------- PostgreSQL


@dataclass
class Postgres:
    port: int
    password: str
    database: str = "mlflow"
    user: str = "postgres"

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def query(self, sql: str) -> list[tuple]:
        import psycopg2

        with psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=self.database,
        ) as conn, conn.cursor() as cur:  # fmt: skip
            cur.execute(sql)
            return cur.fetchall()


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=os.path.getmtime)
    path = found[-1] if found else shutil.which(name)
    if path is None:
        pytest.fail(
            f"PostgreSQL's {name} not found: install Debian's postgresql package "
            "(apt-get install postgresql); CI does"
        )
    return path


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster on a free 127.0.0.1 port, password authentication."""
    import psycopg2

    as_root = os.geteuid() == 0
    run_as = ["runuser", "-u", "postgres", "--"] if as_root else []
    root = Path(tempfile.mkdtemp(prefix="modloss-pg-"))  # /tmp: traversable by postgres
    data, pwfile, log = root / "data", root / "pw", root / "postgres.log"
    pg = Postgres(port=free_port(), password=secrets.token_hex(16))
    pwfile.write_text(pg.password)
    if as_root:
        shutil.chown(root, "postgres")
        shutil.chown(pwfile, "postgres")
    initdb = [_pg_bin("initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}"]
    initdb += ["--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8"]
    subprocess.run([*run_as, *initdb], check=True, capture_output=True, timeout=START_S)
    options = f"-p {pg.port} -k {root} -c listen_addresses=127.0.0.1"
    pg_ctl = [*run_as, _pg_bin("pg_ctl"), "-D", str(data), "-l", str(log)]
    subprocess.run([*pg_ctl, "-o", options, "-w", "-t", str(START_S), "start"], check=True)
    try:
        conn = psycopg2.connect(
            host="127.0.0.1", port=pg.port, user="postgres", password=pg.password, dbname="postgres"
        )
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {pg.database}")
        conn.close()
        yield pg
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], check=False, timeout=START_S)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_on_postgres(postgres: Postgres, tmp_path_factory) -> Iterator[str]:
    """``mlflow server`` with the PostgreSQL backend store and a served artifact folder."""
    root = tmp_path_factory.mktemp("mlflow-pg")
    port = free_port()
    log = root / "server.log"
    command = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", postgres.uri,
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{uri}/health", proc, log)
        yield uri
    finally:
        _stop(proc, grace_s=20)


# --------------------------------------------------------------------------- Ray


@dataclass
class RayHead:
    address: str
    token: str
    temp_dir: Path


@pytest.fixture(scope="module")
def ray_head(data_dir: Path) -> Iterator[RayHead]:
    """``ray start --head --block`` on 127.0.0.1 with token authentication on."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: socket paths
    token = secrets.token_hex(32)
    dashboard_port = free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    command = [
        str(BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1",
        "--port", str(free_port()),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--dashboard-agent-listen-port", str(free_port()),
        "--num-cpus", "2", "--num-gpus", "0",
        "--temp-dir", str(temp_dir),
    ]  # fmt: skip
    log = temp_dir / "ray-start.log"
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        auth = {"Authorization": f"Bearer {token}"}
        _wait_http(f"{address}/api/jobs/", proc, log, headers=auth)
        yield RayHead(address, token, temp_dir)
    finally:
        _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cli(*args: str, token: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed ``modloss`` command, as a user runs it (no Ray auth mode in its env)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run(
        [str(BIN / "modloss"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


@dataclass
class Submitted:
    result: subprocess.CompletedProcess
    job_id: str
    tracking_uri: str


@pytest.fixture(scope="module")
def submitted(ray_head: RayHead, mlflow_on_postgres: str, data_dir: Path, tmp_path_factory):
    """The smoke sweep submitted with ``modloss submit`` and followed to its end."""
    storage = tmp_path_factory.mktemp("ray-storage")
    result = _cli(
        "submit", SMOKE,
        "--address", ray_head.address,
        "--tracking-uri", mlflow_on_postgres,
        "--storage", str(storage),
        "--env", f"MODLOSS_DATA_DIR={data_dir}",
        token=ray_head.token,
        timeout=SWEEP_S,
    )  # fmt: skip
    match = re.search(r"submitted (\S+) to", result.stderr)
    assert match, result.stdout[-3000:] + result.stderr[-3000:]
    return Submitted(result, match[1], mlflow_on_postgres)


@pytest.mark.slow
def test_submit_runs_the_smoke_sweep_as_a_ray_job(submitted: Submitted):
    result = submitted.result
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert f"job {submitted.job_id}: SUCCEEDED" in result.stderr
    # The job's own output was streamed back: the sweep's results table.
    assert "fmnist_smoke/results.csv" in result.stdout
    assert "256-M-4-H" in result.stdout and "16-M-64-H" in result.stdout


@pytest.mark.slow
def test_sweep_runs_land_in_mlflow_on_postgres(submitted: Submitted, postgres: Postgres):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=submitted.tracking_uri)
    experiment = client.get_experiment_by_name("fmnist_smoke")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("modloss.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    cells = {(r.data.tags["model"], float(r.data.tags["lam"])) for r in children}
    assert cells == {(m, lam) for m in ("16-M-64-H", "256-M-4-H") for lam in (0.0, 0.95, 1.0)}
    assert {r.info.status for r in children} == {"FINISHED"}
    assert all(0 < r.data.metrics["test_error"] < 0.9 for r in children)
    # The same runs, read straight from PostgreSQL: the server really stores them there.
    (count,) = postgres.query(
        f"SELECT count(*) FROM runs WHERE experiment_id = {experiment.experiment_id}"
    )[0]
    assert count == 7
    steps = postgres.query(
        "SELECT max(step) FROM metrics WHERE key = 'epoch/val_error' "
        f"AND run_uuid = '{children[0].info.run_id}'"
    )
    assert steps == [(3,)]


@pytest.mark.slow
def test_jobs_and_logs_show_the_submission(submitted: Submitted, ray_head: RayHead):
    listing = _cli("jobs", "--address", ray_head.address, token=ray_head.token)
    assert listing.returncode == 0, listing.stderr
    (line,) = [ln for ln in listing.stdout.splitlines() if submitted.job_id in ln]
    assert "SUCCEEDED" in line and SMOKE in line
    logs = _cli("logs", submitted.job_id, "--address", ray_head.address, token=ray_head.token)
    assert logs.returncode == 0, logs.stderr
    assert "fmnist_smoke/results.csv" in logs.stdout


def test_the_job_api_refuses_requests_without_the_token(ray_head: RayHead):
    for token in (None, "not-the-token"):
        result = _cli("jobs", "--address", ray_head.address, token=token)
        assert result.returncode != 0
        assert re.search(r"(?i)authenticat|unauthori|forbidden", result.stderr), result.stderr


def test_working_dir_upload_keeps_the_package_and_drops_the_venv(ray_head: RayHead):
    """What `submit` uploads, seen from inside a job on the cluster: the project's packages
    (including modloss/data, which a bare "data" exclude would drop), no .venv or .git."""
    client = job_client(ray_head.address, token=ray_head.token)
    probe = (
        'python -c "import os, modloss.data; '
        "print('FILE', os.path.relpath(modloss.data.__file__)); print('LS', sorted(os.listdir()))\""
    )
    job_id = client.submit_job(
        entrypoint=probe, runtime_env={"working_dir": str(ROOT), "excludes": WORKING_DIR_EXCLUDES}
    )
    with open(os.devnull, "w") as devnull:
        assert follow_logs(client, job_id, out=devnull) == "SUCCEEDED"
    logs = client.get_job_logs(job_id)
    assert "FILE modloss/data/__init__.py" in logs
    listing = re.search(r"LS (\[.*\])", logs)[1]
    for present in ("'modloss'", "'orchestration'", "'dashboards'", "'search_spaces'"):
        assert present in listing
    for absent in ("'.venv'", "'.git'", "'mlruns'"):
        assert absent not in listing


def test_entrypoint_defaults_to_the_head_nodes_environment():
    command = sweep_entrypoint("search_spaces/a b.yaml", extra_args=["--max-concurrent", "1"])
    assert command.startswith("modloss sweep 'search_spaces/a b.yaml' --address auto ")
    assert '--tracking-uri "${MLFLOW_TRACKING_URI:-http://mlflow:5000}"' in command
    assert '--storage "${MODLOSS_STORAGE_PATH:-ray_results}"' in command
    assert command.endswith("--max-concurrent 1")
    explicit = sweep_entrypoint("s.yaml", tracking_uri="http://h:1", storage="/mnt/x y")
    assert "--tracking-uri http://h:1 --storage '/mnt/x y'" in explicit


def test_a_space_outside_the_project_is_refused(tmp_path):
    space = tmp_path / "elsewhere.yaml"
    space.write_text("name: x\n")
    with pytest.raises(ValueError, match="outside the uploaded working_dir"):
        submit_sweep(None, space, working_dir=ROOT)  # refused before any request
    with pytest.raises(FileNotFoundError):
        submit_sweep(None, ROOT / "search_spaces" / "no-such-space.yaml", working_dir=ROOT)
