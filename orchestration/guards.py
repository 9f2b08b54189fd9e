"""Checks between a sweep and the outside world, each done before any compute.

- :func:`check_tracking_uri`: the one pre-check of an MLflow tracking URI (``sweep``,
  ``report``, ``submit``, ``ui``), per scheme; credentials never appear in a message.
- :func:`sweep_lock`: one sweep per experiment folder at a time (an OS file lock, so a
  killed driver never leaves it held); :func:`with_store_lock` serialises the creation of a
  new SQLite store.
- :func:`check_resumed_space`: ``--resume`` with an edited space names what changed, or
  returns the grid points it adds (:func:`record_extension` records them).
- :func:`check_resources`: a trial that can never be placed is refused, not waited on.
- :func:`stale_ray_processes` / :func:`clean_stale_ray`: the Ray processes a killed driver
  left behind (a local Ray bound to 127.0.0.1 is :func:`orchestration.compat.start_local_ray`).

This module imports neither Ray nor MLflow at import time (``modloss report`` uses it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from orchestration.spaces import SearchSpace

__all__ = [
    "DEFAULT_TRACKING_URI",
    "PROBE_TIMEOUT_S",
    "GuardError",
    "TrackingError",
    "check_data",
    "check_port_free",
    "check_resources",
    "added_message",
    "check_resumed_space",
    "check_tracking_uri",
    "clean_stale_ray",
    "damaged_file",
    "read_json",
    "redact",
    "load_extensions",
    "record_extension",
    "save_space",
    "stale_ray_processes",
    "sweep_lock",
    "write_json",
    "with_store_lock",
]

PROBE_TIMEOUT_S = 5.0  # well within the 10 s a user waits for an answer
SPACE_FILE = "modloss_space.json"  # in the Ray experiment folder
# Grid points added to a sweep by an edited space, each run as a further Tune experiment.
EXTENSIONS_FILE = "modloss_extensions.json"
# The keys whose values a grid's points are made of: a resume may add values to them.
_GRID_KEYS = ("models", "lam", "lr", "trials")
# A joined cluster may autoscale: wait this long for room for one trial before refusing.
RESOURCE_WAIT_S = float(os.environ.get("MODLOSS_RESOURCE_WAIT_S", "120"))
_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
# Drivers to suggest; SQLAlchemy 2.1's default for postgresql:// is psycopg 3, not psycopg2.
_DB_DRIVERS = {
    "postgresql": "postgresql+psycopg2",
    "mysql": "mysql+pymysql",
    "mssql": "mssql+pyodbc",
}
_SCHEMES = ("http", "https", "sqlite", *_DB_PORTS, "databricks", "databricks-uc", "uc")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
T = TypeVar("T")


class GuardError(ValueError):
    """Input refused before any compute; the message is one line saying what to do."""


class TrackingError(GuardError, RuntimeError):
    """The tracking store cannot be used; the message says which and why."""


# --------------------------------------------------------------------------- tracking URIs


def redact(uri: str) -> str:
    """``uri`` with any password (``user:secret@host``, ``?password=``) replaced by ***."""
    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    query = re.sub(r"(?i)((?:password|passwd|pwd|token)=)[^&]*", r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def check_tracking_uri(uri: str, *, timeout: float = PROBE_TIMEOUT_S, local: bool = True) -> None:
    """Refuse, within ``timeout`` seconds, a tracking URI MLflow could not write to.

    http(s): the server answers ``/health``; sqlite: the folder exists and is writable (and
    an existing database is a readable file); postgresql / mysql / mssql: the SQLAlchemy
    driver is installed and the host accepts connections; databricks: a host is configured.
    Plain folders and ``file:`` (refused by MLflow 3) and unknown schemes are refused.
    ``local=False`` (a URI as a remote cluster reaches it): the scheme only.
    """
    shown = redact(uri)
    scheme = urlsplit(uri).scheme.lower()
    base = scheme.split("+", 1)[0]
    if base in ("", "file"):
        raise TrackingError(
            f"tracking URI {shown}: MLflow 3 refuses plain folder stores; "
            f"use e.g. {DEFAULT_TRACKING_URI}"
        )
    if base not in _SCHEMES or ("+" in scheme and base not in _DB_PORTS):
        raise TrackingError(
            f"tracking URI {shown}: unknown scheme {scheme!r}; allowed: {', '.join(_SCHEMES)} "
            "(databases as e.g. postgresql+psycopg2://)"
        )
    if not local:
        return
    if base in ("http", "https"):
        _check_http(uri, shown, timeout)
    elif base == "sqlite":
        _check_sqlite(uri, shown)
    elif base in _DB_PORTS:
        _check_database(uri, shown, base, timeout)
    elif not (os.environ.get("DATABRICKS_HOST") or Path("~/.databrickscfg").expanduser().is_file()):
        raise TrackingError(
            f"tracking URI {shown}: no Databricks host configured (set DATABRICKS_HOST and "
            "DATABRICKS_TOKEN, or write ~/.databrickscfg)"
        )


def _check_http(uri: str, shown: str, timeout: float) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            pass
    except urllib.error.HTTPError as exc:
        hint = " (MLflow 3 refuses Host names not in its --allowed-hosts)" * (exc.code == 403)
        raise TrackingError(
            f"tracking server {shown} answered HTTP {exc.code} {exc.reason} on /health{hint}"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"MLflow tracking server {shown} is not reachable within {timeout:g} s ({reason}); "
            f"start it, or track locally with --tracking-uri {DEFAULT_TRACKING_URI}"
        ) from None


def _check_sqlite(uri: str, shown: str) -> None:
    if not uri.startswith("sqlite:///"):
        raise TrackingError(f"tracking URI {shown}: expected sqlite:///PATH (three slashes)")
    db = Path(uri.removeprefix("sqlite:///")).resolve()
    folder = db.parent
    if not folder.is_dir():
        raise TrackingError(f"tracking URI {shown}: folder {folder} does not exist; create it")
    if db.exists() and (not db.is_file() or not os.access(db, os.R_OK | os.W_OK)):
        raise TrackingError(f"tracking URI {shown}: {db} is not a readable, writable file")
    if db.is_file() and db.stat().st_size > 0:
        with db.open("rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise TrackingError(
                    f"tracking URI {shown}: {db} is not an SQLite database; pass another path"
                )
    from modloss.files import PathError, check_writable_dir

    try:
        check_writable_dir(folder, what="tracking store folder")
    except PathError as err:
        raise TrackingError(f"tracking URI {shown}: {err}") from None


def _check_database(uri: str, shown: str, base: str, timeout: float) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(uri)
        url.get_dialect().import_dbapi()
    except (ImportError, NoSuchModuleError) as exc:
        raise TrackingError(
            f"tracking URI {shown}: its database driver is not installed ({exc}); install "
            f"it, or name an installed driver (e.g. {_DB_DRIVERS[base]}://)"
        ) from None
    except ArgumentError as exc:
        raise TrackingError(f"tracking URI {shown}: malformed ({exc})") from None
    host, port = url.host or "localhost", url.port or _DB_PORTS[base]
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise TrackingError(
            f"tracking URI {shown}: database {host}:{port} is not reachable within "
            f"{timeout:g} s ({exc.strerror or exc}); start it or fix the host and port"
        ) from None


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """Refuse a port something already listens on (e.g. for ``modloss ui``)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise GuardError(
                f"port {port} on {host} is in use ({exc.strerror}): pass another --port"
            ) from None


# --------------------------------------------------------------------------- locks


@contextlib.contextmanager
def sweep_lock(exp_dir: Path) -> Iterator[None]:
    """Hold the experiment folder's lock for the block, or refuse at once if another driver
    holds it. The lock is an ``flock`` on ``STORAGE/.NAME.lock``: the kernel releases it when
    its process ends, however it ends, so a killed driver never leaves it stuck."""
    from filelock import FileLock, Timeout

    from modloss.files import PathError, check_writable_dir

    try:
        check_writable_dir(exp_dir.parent, what="sweep storage")
    except PathError as err:
        raise GuardError(str(err)) from None
    exp_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(exp_dir.parent / f".{exp_dir.name}.lock")
    owner = exp_dir.parent / f".{exp_dir.name}.owner"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = owner.read_text().strip() if owner.is_file() else "another process"
        raise GuardError(
            f"{exp_dir} is in use by another modloss sweep ({holder}); wait for it to end "
            "(then --resume if it was interrupted), or pick another --experiment or --storage"
        ) from None
    try:
        owner.write_text(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        yield
    finally:
        lock.release()


def with_store_lock(uri: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` after opening ``uri``; for SQLite the first open (which creates the
    schema, and fails when two processes migrate one new file at once) is serialised by a
    lock file next to the database."""
    if not uri.startswith("sqlite:///"):
        return fn(*args)
    from filelock import FileLock
    from mlflow import MlflowClient

    db = Path(uri.removeprefix("sqlite:///")).resolve()
    with FileLock(db.with_name(f".{db.name}.lock")):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    return fn(*args)


# --------------------------------------------------------------------------- resume


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out or {prefix: {}}
    return {prefix: value}


def _space_dump(space: SearchSpace) -> dict[str, Any]:
    return space.model_dump(mode="json", exclude={"description", "name"})


def damaged_file(path: Path, what: str, why: str) -> GuardError:
    """The one-line refusal of a sweep's bookkeeping file ``path`` (``what`` it holds) that
    cannot be used, and what to do."""
    return GuardError(
        f"{path} ({what}) cannot be read ({why}): restore it from a copy, or run the space "
        "as a new sweep (--experiment NEW_NAME)"
    )


def read_json(path: Path, what: str) -> Any:
    """``path``'s JSON, or :func:`damaged_file` when it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise damaged_file(path, what, getattr(exc, "strerror", None) or str(exc)) from None


def write_json(path: Path, data: Any) -> None:
    """Write ``path`` atomically: a kill leaves the old file or the new, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def save_space(exp_dir: Path, space: SearchSpace) -> None:
    """Record the space a sweep starts with, for :func:`check_resumed_space`."""
    write_json(exp_dir / SPACE_FILE, _space_dump(space))


def load_extensions(exp_dir: Path) -> list[dict[str, Any]]:
    """The experiment's extensions, oldest first: each ``{"name", "points", "space"}``, a
    Tune experiment at ``exp_dir/NAME`` that runs the grid ``points`` an edited ``space``
    added (see :func:`record_extension`)."""
    path = exp_dir / EXTENSIONS_FILE
    if not path.is_file():
        return []
    extensions = read_json(path, "the sweep's added grid points")
    if not isinstance(extensions, list) or not all(
        isinstance(e, dict) and {"name", "points", "space"} <= set(e) for e in extensions
    ):
        raise damaged_file(path, "the sweep's added grid points", "not a list of extensions")
    return extensions


def record_extension(exp_dir: Path, space: SearchSpace, points: list[dict[str, Any]]) -> str:
    """Record that ``space`` adds the grid ``points`` to the sweep in ``exp_dir``; returns
    the name of the Tune experiment that runs them. One atomic write records both the points
    and the space, so from then on the stored space is ``space`` and every ``--resume``
    runs the points, whenever a kill comes."""
    extensions = load_extensions(exp_dir)
    name = f"extension-{len(extensions) + 1}"
    entry = {"name": name, "points": points, "space": _space_dump(space)}
    write_json(exp_dir / EXTENSIONS_FILE, [*extensions, entry])
    return name


def _stored_space(exp_dir: Path) -> dict[str, Any] | None:
    """The space the sweep runs now: the latest extension's, else the one it started with."""
    extensions = load_extensions(exp_dir)
    if extensions:
        return extensions[-1]["space"]
    path = exp_dir / SPACE_FILE
    return read_json(path, "the space the sweep started with") if path.is_file() else None


def check_resumed_space(exp_dir: Path, space: SearchSpace) -> list[dict[str, Any]]:
    """The grid points ``space`` adds to the sweep in ``exp_dir`` (none when it is the
    stored space). Any other change is refused, naming every key that changed: a resumed
    Tune experiment runs its stored grid, whatever the file now says, so only points that
    a grid gained can run, as a further experiment. A sweep started before spaces were
    recorded is not checked."""
    stored = _stored_space(exp_dir)
    if stored is None:
        print(
            f"warning: {exp_dir / SPACE_FILE} missing: cannot check the space against the sweep's",
            file=sys.stderr,
        )
        return []
    before, now = _flat(stored), _flat(_space_dump(space))
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    if not changed:
        return []
    added = _added_points(stored, space, changed)
    if added:
        return added
    shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
    hint = (
        "only adding grid points (models, lam, lr, trials) can be resumed; restore the file, "
        "or run the new space as a new sweep (--experiment NEW_NAME)"
    )
    raise GuardError(f"--resume: the space differs from the one {exp_dir} runs ({shown}); {hint}")


def _added_points(
    stored: dict[str, Any], space: SearchSpace, changed: list[str]
) -> list[dict[str, Any]]:
    """The grid points of ``space`` beyond the stored space's, when it keeps all of those
    and differs only in the sweep's dimensions; else none."""
    from pydantic import ValidationError

    from orchestration.spaces import GridSearch, SearchSpace

    if any(k.split(".", 1)[0] not in _GRID_KEYS for k in changed):
        return []
    if not isinstance(space.search, GridSearch):
        return []
    try:
        before = SearchSpace.model_validate({**stored, "name": space.name}).grid()
    except ValidationError:  # stored by another version of the schema: refused as a change
        return []
    now = space.grid()
    if any(point not in now for point in before):  # a point removed or changed
        return []
    return [point for point in now if point not in before]


def added_message(space: SearchSpace, added: list[dict[str, Any]]) -> str:
    """What ``--resume`` says when ``space`` adds the grid points ``added``: how many, the
    values they bring along each dimension, and how many points were stored before."""
    stored = [p for p in space.grid() if p not in added]
    values = []
    for key in ("model", "lam", "trial"):
        old = {p[key] for p in stored}
        new = [v for v in dict.fromkeys(p[key] for p in added) if v not in old]
        if new:
            values.append(f"{key}: {', '.join(f'{v:g}' if key == 'lam' else str(v) for v in new)}")
    return (
        f"--resume: the space adds {len(added)} grid point{'s' * (len(added) != 1)} "
        f"({'; '.join(values)}); "
        f"running them after the stored {len(stored)}"
    )


# --------------------------------------------------------------------------- data


def check_data(space: SearchSpace) -> None:
    """Refuse dataset files that cannot be right (wrong size) and a data folder that a
    missing file could not be downloaded into, before any trial loads them."""
    from modloss.data import dataset_info, resolve_data_dir
    from modloss.files import PathError, check_writable_dir

    settings = space.base_config()
    info = dataset_info(settings["dataset"])
    folder = resolve_data_dir(settings["data_dir"]) / info.folder
    if not info.files or (info.extracted is not None and (folder / info.extracted).is_dir()):
        return
    for spec in info.files:
        path = folder / spec.name
        if path.is_file() and path.stat().st_size != spec.size:
            raise GuardError(
                f"data file {path} has {path.stat().st_size:,} bytes, not {spec.size:,}: "
                f"delete it (it is downloaded again) or replace it with {info.base_url}{spec.name}"
            )
        if not path.exists():
            try:
                check_writable_dir(folder, what=f"data folder (for the missing {spec.name})")
            except PathError as err:
                raise GuardError(str(err)) from None


# --------------------------------------------------------------------------- resources


def _trial_bundles(space: SearchSpace) -> list[dict[str, float]]:
    """What one trial occupies: the trial's own bundle, plus a distributed trial's workers."""
    trial = {"CPU": space.resources.cpus, "GPU": space.resources.gpus}
    if space.distributed is None:
        return [trial]
    d = space.distributed
    worker = {"CPU": d.cpus_per_worker, "GPU": d.gpus_per_worker}
    return [trial] + [worker] * d.num_workers


def _shortfall(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> str | None:
    for bundle in bundles:
        if not any(all(n.get(k, 0.0) >= v for k, v in bundle.items()) for n in nodes):
            return f"a bundle of {_fmt(bundle)} fits on no node"
    for key in ("CPU", "GPU"):
        need = sum(b.get(key, 0.0) for b in bundles)
        have = sum(n.get(key, 0.0) for n in nodes)
        if need > have:
            return f"{need:g} {key} in all, the cluster has {have:g}"
    return None


def _fmt(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in resources.items() if v) or "nothing"


def check_resources(space: SearchSpace, *, can_grow: bool, wait_s: float = RESOURCE_WAIT_S) -> None:
    """Refuse a space whose trial can never be placed on the connected Ray cluster (names the
    request and what each node has). A cluster that can grow (one joined by ``--address``,
    which may autoscale) gets ``wait_s`` seconds to make room, with a message saying so."""
    import ray

    bundles = _trial_bundles(space)

    def nodes() -> list[dict[str, float]]:
        return [n["Resources"] for n in ray.nodes() if n.get("Alive")]

    problem = _shortfall(bundles, nodes())
    if problem is not None and can_grow:
        print(
            f"the cluster cannot place a trial yet ({problem}); waiting up to {wait_s:g} s for "
            "it to grow (MODLOSS_RESOURCE_WAIT_S)",
            file=sys.stderr,
            flush=True,
        )
        deadline = time.monotonic() + wait_s
        while problem is not None and time.monotonic() < deadline:
            time.sleep(2.0)
            problem = _shortfall(bundles, nodes())
    if problem is not None:
        have = "; ".join(f"{n.get('CPU', 0.0):g} CPU, {n.get('GPU', 0.0):g} GPU" for n in nodes())
        waited = f" after waiting {wait_s:g} s" if can_grow else ""
        raise GuardError(
            f"resources: a trial asks for {' + '.join(_fmt(b) for b in bundles)} ({problem}); "
            f"the cluster's nodes have {have or 'nothing'}{waited}: lower resources in the space "
            "or use a larger cluster"
        )


# --------------------------------------------------------------------------- local Ray


def stale_ray_processes() -> list[Any]:
    """Ray agents and workers whose raylet is gone (a killed driver's local Ray leaves its
    agents running, listening): ``ray::`` processes whose parent is no raylet. Processes of
    a live cluster (children of its raylet) are never listed."""
    import psutil

    stale = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if not cmdline or not cmdline[0].startswith("ray::"):
                continue
            parent = proc.parent()
            if parent is None or "raylet" not in parent.name():
                stale.append(proc)
        except psutil.Error:
            continue
    return stale


def clean_stale_ray(out: Any = sys.stderr) -> list[int]:
    """Stop :func:`stale_ray_processes` (SIGTERM, then SIGKILL after 3 s; they ignore
    SIGTERM); those this user may not signal are listed with their PIDs. Returns the PIDs
    stopped."""
    import psutil

    stale = stale_ray_processes()
    if not stale:
        return []
    stopped, refused = [], []
    for proc in stale:
        try:
            proc.send_signal(signal.SIGTERM)
            stopped.append(proc)
        except psutil.AccessDenied:
            refused.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(stopped, timeout=3)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=3)
    pids = sorted(p.pid for p in stopped)
    if pids:
        print(f"stopped Ray processes left by a killed driver: PIDs {pids}", file=out)
    if refused:
        print(f"Ray processes left by a killed driver, not ours to stop: PIDs {refused}", file=out)
    return pids
