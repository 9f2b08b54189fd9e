"""Where the tool meets the outside world: bad files, URIs, resources, concurrent sweeps,
edited resumes, corrupt checkpoints inside a sweep, listening addresses.

Every refusal is checked for its exit code, a one-line message naming the bad value or path
(and never a credential), no traceback, and that nothing already computed or logged is lost,
duplicated or left RUNNING. Real parts only: real Ray, real MLflow, real Fashion-MNIST.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import ray
import typer
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

import dashboards.cli
import modloss.cli
import orchestration.cli
import orchestration.jobs
from dashboards.data import load_sweep
from modloss.names import CHECKPOINT_FILE, curve
from orchestration.guards import EXTENSIONS_FILE, SPACE_FILE
from orchestration.tracking import RECORD_FILE

ROOT = Path(__file__).resolve().parents[2]
MODLOSS = str(Path(sys.executable).with_name("modloss"))
SMOKE = yaml.safe_load((ROOT / "search_spaces" / "fmnist_smoke.yaml").read_text())
BAD_INPUT = 2
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    for register in (orchestration.cli.register, dashboards.cli.register):
        register(app)
    orchestration.jobs.register(app)
    return app


def write_space(folder: Path, data_dir: Path, name: str, **changes) -> Path:
    space = {**SMOKE, "name": name, "data_dir": str(data_dir), **changes}
    path = folder / f"{name}-{len(list(folder.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def assert_one_line_refusal(code: int, output: str, *named: str, secret: str = "") -> None:
    """Exit 2, one ``error:`` line naming every string of ``named``, no traceback."""
    assert code == BAD_INPUT, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for text in named:
        assert text in errors[0], output
    if secret:
        assert secret not in output, output


# --------------------------------------------------------------------------- URIs, no Ray

URI_CASES = [
    ("unknown-scheme", "foo://bar", ["foo://bar", "unknown scheme"]),
    ("db-driver-missing", "mysql://me:s3cret@127.0.0.1:1/db", ["not installed", "MySQLdb"]),
    (
        "postgresql-default-driver",
        "postgresql://me:s3cret@127.0.0.1:1/db",
        ["psycopg", "+psycopg2"],
    ),
    (
        "db-unreachable",
        "postgresql+psycopg2://me:s3cret@127.0.0.1:1/db",
        ["127.0.0.1:1", "not reachable"],
    ),
    ("http-credentials", "http://me:s3cret@127.0.0.1:1", ["me:***@127.0.0.1:1", "not reachable"]),
    ("sqlite-read-only", "sqlite:////sys/mlflow.db", ["/sys", "not writable"]),
    ("sqlite-two-slashes", "sqlite://mlflow.db", ["three slashes"]),
    ("plus-on-http", "http+foo://127.0.0.1:5000", ["unknown scheme"]),
]


@pytest.mark.parametrize(("case", "uri", "named"), URI_CASES, ids=[c[0] for c in URI_CASES])
def test_sweep_refuses_bad_tracking_uri_before_ray(
    app, tmp_path, data_dir, monkeypatch, case, uri, named
):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, data_dir, "uri")
    result = CliRunner().invoke(app, ["sweep", str(space), "--tracking-uri", uri])
    assert_one_line_refusal(result.exit_code, result.output, *named, secret="s3cret")
    assert not ray.is_initialized()
    assert not (tmp_path / "ray_results").exists()


def test_sqlite_store_that_is_a_folder_or_not_a_database(app, tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, data_dir, "uri")
    (tmp_path / "adir.db").mkdir()
    (tmp_path / "text.db").write_text("not a database")
    for db, named in (("adir.db", "not a readable, writable file"), ("text.db", "not an SQLite")):
        uri = f"sqlite:///{tmp_path / db}"
        result = CliRunner().invoke(app, ["sweep", str(space), "--tracking-uri", uri])
        assert_one_line_refusal(result.exit_code, result.output, db, named)
    assert (tmp_path / "text.db").read_text() == "not a database"  # left as it was
    assert not ray.is_initialized()


def _run(args: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MODLOSS, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("uri", ["http://127.0.0.1:1", "foo://bar"], ids=["refused", "scheme"])
def test_report_refuses_bad_tracking_uri_in_seconds(tmp_path, uri):
    tic = time.monotonic()
    done = _run(["report", "--experiment", "x", "--out", "rep", "--tracking-uri", uri], tmp_path)
    assert time.monotonic() - tic < 30
    assert_one_line_refusal(done.returncode, done.stderr, uri)
    assert not (tmp_path / "rep").exists()


def test_submit_refuses_unknown_scheme_before_contacting_the_cluster(app, tmp_path):
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump(SMOKE))
    args = ["submit", str(space), "--working-dir", str(tmp_path), "--tracking-uri", "foo://bar"]
    result = CliRunner().invoke(app, [*args, "--address", "http://127.0.0.1:1"])
    assert_one_line_refusal(result.exit_code, result.output, "foo://bar", "unknown scheme")


def test_ui_on_a_busy_port_exits_non_zero(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        done = _run(["ui", "--tracking-uri", uri, "--port", str(port)], tmp_path, timeout=120)
    assert_one_line_refusal(done.returncode, done.stderr, str(port), "in use")


@pytest.mark.parametrize(
    "uri", ["foo://bar", "http://me:s3cret@127.0.0.1:1"], ids=["scheme", "unreachable"]
)
def test_ui_checks_the_tracking_uri(tmp_path, uri):
    done = _run(["ui", "--tracking-uri", uri, "--port", "1"], tmp_path, timeout=120)
    assert_one_line_refusal(done.returncode, done.stderr, secret="s3cret")


# --------------------------------------------------------------------------- files, no Ray


def _train(out: Path, data_dir: Path, epochs: int = 1):
    args = ["train", "--model", "16-M-64-H", "--lam", "0.5", "--subset", "200"]
    args += ["--epochs", str(epochs), "--data-dir", str(data_dir), "--out", str(out)]
    return CliRunner().invoke(modloss.cli.app, args)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    result = _train(out, data_dir)
    assert result.exit_code == 0, result.output
    return out


def test_train_out_that_is_a_file(tmp_path, data_dir):
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    result = _train(out, data_dir)
    assert_one_line_refusal(result.exit_code, result.output, str(out), "is a file")
    assert out.read_text() == "keep me"


def test_train_out_that_cannot_be_written_is_refused_before_an_epoch(data_dir):
    tic = time.monotonic()
    result = _train(Path("/sys/modloss-run"), data_dir, epochs=50)
    assert_one_line_refusal(result.exit_code, result.output, "/sys/modloss-run", "not writable")
    assert time.monotonic() - tic < 10  # 50 epochs were not trained first


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_train_resume_from_a_damaged_checkpoint_names_the_file(trained_run, data_dir, damage):
    run = trained_run.parent / f"run-{damage}"
    subprocess.run(["cp", "-r", str(trained_run), str(run)], check=True)
    checkpoint = run / CHECKPOINT_FILE
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(
        {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"x" * 1000}[damage]
    )
    results = (run / "results.json").read_text()
    result = _train(run, data_dir, epochs=2)
    assert_one_line_refusal(result.exit_code, result.output, str(checkpoint))
    assert "PytorchStreamReader" not in result.output
    assert (run / "results.json").read_text() == results  # the damaged run is not overwritten
    assert checkpoint.stat().st_size == len(
        {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"x" * 1000}[damage]
    )


@pytest.mark.parametrize("out", ["file", "/sys/modloss-report"], ids=["file", "read-only"])
def test_report_out_folder_is_checked_first(tmp_path, out):
    path = tmp_path / "taken" if out == "file" else Path(out)
    if out == "file":
        path.write_text("keep me")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    done = _run(
        ["report", "--experiment", "x", "--out", str(path), "--tracking-uri", uri], tmp_path
    )
    assert_one_line_refusal(done.returncode, done.stderr, str(path))


STORAGE_CASES = [
    ("storage-is-a-file", "file", "is a file"),
    ("read-only", "/sys/rr", "not writable"),
]


@pytest.mark.parametrize(
    ("case", "storage", "named"), STORAGE_CASES, ids=[c[0] for c in STORAGE_CASES]
)
def test_sweep_storage_is_checked_before_ray(
    app, tmp_path, data_dir, monkeypatch, case, storage, named
):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "taken" if storage == "file" else Path(storage)
    if storage == "file":
        path.write_text("keep me")
    space = write_space(tmp_path, data_dir, "storage")
    result = CliRunner().invoke(app, ["sweep", str(space), "--storage", str(path)])
    assert_one_line_refusal(result.exit_code, result.output, str(path), named)
    assert not ray.is_initialized() and not (tmp_path / "mlflow.db").exists()


# A file of the experiment folder, damaged; a Tuner's saved state (tuner.pkl) is all that
# --resume needs to get as far as reading them.
EXPERIMENT_FILE_CASES = [
    ("record-truncated", RECORD_FILE, '{"sweep_id": "ab12', ["cannot be read", "restore it"]),
    ("record-not-a-record", RECORD_FILE, "[1, 2]", ["cannot be read", "restore it"]),
    ("space-truncated", SPACE_FILE, '{"epochs": ', ["cannot be read", "restore it"]),
    ("extensions-truncated", EXTENSIONS_FILE, '[{"name": "ext', ["cannot be read"]),
    ("extensions-not-a-list", EXTENSIONS_FILE, '{"name": 1}', ["not a list of extensions"]),
]


@pytest.mark.parametrize(
    ("case", "name", "text", "named"),
    EXPERIMENT_FILE_CASES,
    ids=[c[0] for c in EXPERIMENT_FILE_CASES],
)
def test_resume_refuses_a_damaged_file_of_the_experiment_before_ray(
    app, tmp_path, data_dir, monkeypatch, case, name, text, named
):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, data_dir, "damaged")
    exp_dir = tmp_path / "ray_results" / "damaged"
    exp_dir.mkdir(parents=True)
    (exp_dir / "tuner.pkl").write_bytes(b"")
    (exp_dir / name).write_text(text)
    result = CliRunner().invoke(app, ["sweep", str(space), "--resume"])
    assert_one_line_refusal(result.exit_code, result.output, str(exp_dir / name), *named)
    assert (exp_dir / name).read_text() == text  # left for the user to restore
    assert not ray.is_initialized() and not (tmp_path / "mlflow.db").exists()


def test_sweep_refuses_a_damaged_data_file_before_ray(app, tmp_path, data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "data" / "fashion-mnist"
    bad.parent.mkdir()
    subprocess.run(["cp", "-r", str(data_dir / "fashion-mnist"), str(bad.parent)], check=True)
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not the dataset")
    space = write_space(tmp_path, bad.parent, "data")
    result = CliRunner().invoke(app, ["sweep", str(space)])
    assert_one_line_refusal(result.exit_code, result.output, "t10k-labels-idx1-ubyte.gz", "bytes")
    assert not ray.is_initialized() and not (tmp_path / "mlflow.db").exists()


def test_sweep_refuses_missing_data_that_cannot_be_downloaded_there(
    app, tmp_path, data_dir, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, Path("/sys/no-data"), "nodata")
    result = CliRunner().invoke(app, ["sweep", str(space)])
    assert_one_line_refusal(result.exit_code, result.output, "/sys/no-data", "not writable")
    assert not ray.is_initialized()


# --------------------------------------------------------------------------- resources (Ray)


@pytest.fixture(scope="module")
def small_ray():
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False)
    yield
    ray.shutdown()


RESOURCE_CASES = [
    ("cpus-64", {"resources": {"cpus": 64}}, ["64 CPU", "2 CPU"]),
    ("gpu-fraction", {"resources": {"cpus": 1, "gpus": 0.5}}, ["0.5 GPU", "0 GPU"]),
    ("two-gpus", {"resources": {"cpus": 1, "gpus": 2}}, ["2 GPU"]),
    (
        "distributed-workers",
        {"distributed": {"num_workers": 4, "cpus_per_worker": 1}},
        ["5 CPU in all", "the cluster has 2"],  # 4 workers + the trial's own CPU
    ),
]


@pytest.mark.timeout(120)  # today's code waits forever for the resources
@pytest.mark.parametrize(
    ("case", "change", "named"), RESOURCE_CASES, ids=[c[0] for c in RESOURCE_CASES]
)
def test_trial_larger_than_the_cluster_is_refused(
    app, small_ray, tmp_path, data_dir, monkeypatch, case, change, named
):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path, data_dir, f"res-{case}", **change)
    result = CliRunner().invoke(app, ["sweep", str(space)])
    assert_one_line_refusal(result.exit_code, result.output, "resources", *named)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name(f"res-{case}")
    assert exp is None or client.search_runs([exp.experiment_id]) == []  # no run, none RUNNING
    assert not list((tmp_path / "ray_results").glob(f"res-{case}/experiment_state-*"))


# --------------------------------------------------------------------------- duplicates


def test_report_counts_each_trial_once_and_names_duplicates(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("dupes")
    parent = client.create_run(exp, tags={"modloss.role": "sweep", "sweep_id": "s1"})
    pid = parent.info.run_id
    ids = []
    for lam, error in ((0.0, 0.2), (0.0, 0.2), (1.0, 0.3)):  # λ=0 logged twice
        tags = {"mlflow.parentRunId": pid, "model": "16-M-64-H", "lam": repr(lam)}
        run = client.create_run(exp, tags={**tags, "trial": "0", "status": "finished"})
        client.log_metric(run.info.run_id, "test_error", error)
        client.set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
    data = load_sweep("dupes", tracking_uri=uri)
    assert len(data.runs) == 2
    assert sorted(data.runs.lam) == [0.0, 1.0]
    (line,) = data.duplicates
    assert "16-M-64-H λ=0 trial 0 has 2 runs" in line
    assert {ids[0], ids[1]} <= set(line.replace(",", " ").replace(")", " ").split())


def test_concurrent_creation_of_a_new_sqlite_store(tmp_path):
    code = (
        "import sys\nfrom orchestration.guards import with_store_lock\n"
        "from orchestration.tracking import SweepTracker\nuri = sys.argv[1]\n"
        "tracker = with_store_lock(uri, SweepTracker, uri, sys.argv[2])\n"
        "tracker.client.create_experiment(sys.argv[2])\n"
    )
    uri = f"sqlite:///{tmp_path}/new.db"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri, f"e{i}"], stderr=subprocess.PIPE, text=True
        )
        for i in range(3)
    ]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    names = {e.name for e in MlflowClient(uri).search_experiments()}
    assert {"e0", "e1", "e2"} <= names


# --------------------------------------------------------------------------- a killed sweep

KILL_LAMS = [0.0, 1.0]
KILL_EPOCHS = 4


def _mlflow_runs(client: MlflowClient, name: str) -> tuple[list, list]:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return [], []
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _listening(pids: set[int]) -> dict[tuple[int, str], str]:
    out = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    out[(pid, f"{c.laddr.ip}:{c.laddr.port}")] = " ".join(proc.cmdline())[:60]
        except psutil.Error:
            pass
    return out


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _tree(pid: int) -> set[int]:
    try:
        proc = psutil.Process(pid)
        return {pid, *(c.pid for c in proc.children(recursive=True))}
    except psutil.Error:
        return set()


@pytest.fixture(scope="module")
def killed_sweep(tmp_path_factory, data_dir, mlflow_server):
    """A CLI sweep killed with SIGKILL while its first trial trains; what was seen on the way."""
    root = tmp_path_factory.mktemp("killed")
    name = "hardening-killed"
    space = write_space(
        root, data_dir, name, models=["16-M-64-H"], lam=KILL_LAMS, epochs=KILL_EPOCHS,
        subset=2000, max_concurrent=1,
    )  # fmt: skip
    flags = ["--tracking-uri", mlflow_server, "--storage", str(root / "store")]
    log = (root / "first.log").open("w")
    driver = subprocess.Popen(
        [MODLOSS, "sweep", str(space), *flags], cwd=root, stdout=log, stderr=subprocess.STDOUT
    )
    client = MlflowClient(mlflow_server)
    deadline = time.monotonic() + 300
    while True:  # until the first trial has logged an epoch
        assert driver.poll() is None, (root / "first.log").read_text()
        assert time.monotonic() < deadline, "no epoch logged in time"
        _, children = _mlflow_runs(client, name)
        if any(client.get_metric_history(r.info.run_id, curve("val_error")) for r in children):
            break
        time.sleep(0.3)
    tree = _tree(driver.pid)
    # Frozen from here to the kill, so the trial cannot finish meanwhile: the kill comes
    # with the trial unfinished and its first epoch's checkpoint written.
    _signal(tree, signal.SIGSTOP)
    listening = _listening(tree)
    second = _run(["sweep", str(space), *flags], root, timeout=120)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    _signal(tree - {driver.pid}, signal.SIGCONT)
    log.close()
    time.sleep(3)
    left = {pid for pid in tree if psutil.pid_exists(pid) and pid != driver.pid}
    exp_dir = root / "store" / name
    damaged = []
    for checkpoint in exp_dir.glob(f"*/checkpoint_*/{CHECKPOINT_FILE}"):
        results = checkpoint.with_name("results.json")
        if results.is_file() and '"status": "finished"' not in results.read_text():
            checkpoint.write_bytes(checkpoint.read_bytes()[:100])
            damaged.append(checkpoint)
    return {
        "root": root, "space": space, "flags": flags, "name": name, "exp_dir": exp_dir,
        "listening": listening, "second": second, "left": left, "damaged": damaged,
        "client": client,
    }  # fmt: skip


@pytest.fixture(scope="module")
def resumed(killed_sweep):
    k = killed_sweep
    done = _run(["sweep", str(k["space"]), *k["flags"], "--resume"], k["root"], timeout=600)
    return done


def test_every_socket_of_a_local_sweep_listens_on_loopback(killed_sweep):
    listening = killed_sweep["listening"]
    assert len(listening) >= 5  # GCS, raylet, agents, workers, driver
    exposed = {k: v for k, v in listening.items() if k[1].rsplit(":", 1)[0] not in LOOPBACK}
    assert exposed == {}


def test_a_second_sweep_into_the_same_experiment_is_refused(killed_sweep):
    second = killed_sweep["second"]
    assert_one_line_refusal(second.returncode, second.stderr, "in use by another modloss sweep")
    assert "pid" in second.stderr


def test_resume_after_sigkill_is_not_blocked_and_cleans_up_stale_ray(killed_sweep, resumed):
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    left = killed_sweep["left"]
    if left:  # the killed driver's agents outlived it: the resume stopped them, by PID
        assert "stopped Ray processes left by a killed driver" in resumed.stderr
        assert not any(psutil.pid_exists(pid) for pid in left)


def test_corrupt_checkpoint_in_a_sweep_restarts_the_trial(killed_sweep, resumed):
    damaged = killed_sweep["damaged"]
    assert damaged, "no unfinished trial had a checkpoint at the kill"
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for path in damaged:
        assert path.name in resumed.stdout + resumed.stderr
    assert "starts over from scratch" in resumed.stdout + resumed.stderr


def test_resumed_sweep_lost_and_duplicated_nothing(killed_sweep, resumed):
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    parents, children = _mlflow_runs(killed_sweep["client"], killed_sweep["name"])
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(float(r.data.params["lam"]) for r in children) == KILL_LAMS
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
        history = killed_sweep["client"].get_metric_history(run.info.run_id, curve("val_error"))
        assert sorted(m.step for m in history) == list(range(1, KILL_EPOCHS + 1))
    table = pd.read_csv(killed_sweep["exp_dir"] / "results.csv")
    assert sorted(table.lam) == KILL_LAMS and set(table.status) == {"finished"}


EDITS = [
    ("epochs", {"epochs": KILL_EPOCHS + 1}, ["epochs", f"{KILL_EPOCHS} -> {KILL_EPOCHS + 1}"]),
    ("lam-changed", {"lam": [0.0, 0.5]}, ["lam"]),
    ("lam-removed", {"lam": KILL_LAMS[:1]}, ["lam"]),
    ("lam-added-and-epochs", {"lam": [*KILL_LAMS, 0.5], "epochs": KILL_EPOCHS + 1}, ["epochs"]),
    ("model-added-and-subset", {"models": ["16-M-64-H", "256-M-4-H"], "subset": 1000}, ["subset"]),
    ("subset", {"subset": 1000}, ["subset", "2000 -> 1000"]),
    ("model", {"models": ["256-M-4-H"]}, ["models"]),
    ("momentum", {"momentum": 0.5}, ["momentum", "0.9 -> 0.5"]),
]


@pytest.mark.parametrize(("case", "change", "named"), EDITS, ids=[c[0] for c in EDITS])
def test_resume_with_an_edited_space_names_what_changed(
    killed_sweep, resumed, data_dir, case, change, named
):
    k = killed_sweep
    before = (k["exp_dir"] / "results.csv").read_text()
    parents, children = _mlflow_runs(k["client"], k["name"])
    first = {"models": ["16-M-64-H"], "lam": KILL_LAMS, "epochs": KILL_EPOCHS, "subset": 2000}
    edited = write_space(k["root"], data_dir, k["name"], max_concurrent=1, **{**first, **change})
    done = _run(["sweep", str(edited), *k["flags"], "--resume"], k["root"], timeout=120)
    assert_one_line_refusal(done.returncode, done.stderr, "--resume", *named)
    assert (k["exp_dir"] / "results.csv").read_text() == before
    after_parents, after_children = _mlflow_runs(k["client"], k["name"])
    assert [r.info.run_id for r in after_children] == [r.info.run_id for r in children]
    assert {r.info.status for r in after_parents + after_children} == {"FINISHED"}


# --------------------------------------------------------------------------- failing fast


@pytest.mark.timeout(400)
def test_the_same_error_in_every_trial_stops_the_sweep_with_the_whole_error(
    tmp_path, data_dir, mlflow_server
):
    # Files of the right size (so the pre-check passes) and the wrong content: every trial
    # fails its MD5 check.
    bad = tmp_path / "data" / "fashion-mnist"
    bad.mkdir(parents=True)
    for f in (data_dir / "fashion-mnist").glob("*.gz"):
        with (bad / f.name).open("wb") as out:
            out.truncate(f.stat().st_size)
    name = "hardening-failfast"
    space = write_space(
        tmp_path, bad.parent, name, models=["16-M-64-H"], lam=[0.0, 0.5, 1.0], epochs=1,
        max_concurrent=1, max_failures=1,
    )  # fmt: skip
    flags = ["--tracking-uri", mlflow_server, "--storage", str(tmp_path / "store")]
    done = _run(["sweep", str(space), *flags], tmp_path, timeout=380)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" in done.stderr and "MD5" in done.stderr  # the error in full
    assert "so the sweep stopped" in done.stderr
    for flag in (*flags, "--resume"):
        assert flag in done.stderr  # the hint names every flag needed to resume
    parents, children = _mlflow_runs(MlflowClient(mlflow_server), name)
    assert len(children) == 2  # the third trial never started
    assert "RUNNING" not in {r.info.status for r in parents + children}
