"""Sweeps as Ray Jobs: ``modloss submit``, ``modloss jobs`` and ``modloss logs``.

``submit`` uploads a local folder (the current one: the project) as the job's
working_dir and runs
``modloss sweep SPACE --address auto --tracking-uri URI`` on the head node, so the sweep
driver lives on the cluster and survives the laptop going to sleep. All three commands
talk to the dashboard's job API (port 8265) through ``JobSubmissionClient``; when the
cluster has token authentication on, the token (``--token`` or ``$RAY_AUTH_TOKEN``) is
sent as a bearer header.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TextIO

import typer

from orchestration.guards import check_tracking_uri

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

__all__ = [
    "CLUSTER_TRACKING_URI",
    "DEFAULT_ADDRESS",
    "WORKING_DIR_EXCLUDES",
    "follow_logs",
    "job_client",
    "register",
    "sweep_entrypoint",
    "submit_sweep",
]

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# The tracking server as the cluster's nodes reach it (the compose service).
CLUSTER_TRACKING_URI = "http://mlflow:5000"
# gitwildmatch patterns relative to the working_dir. Anchored with a leading slash:
# a bare "data" would also drop the modloss/data package. Ray applies .gitignore too;
# these hold even where the checkout has none.
WORKING_DIR_EXCLUDES = [
    "/.git/",
    "/.venv/",
    "/data/",
    "/runs/",
    "/mlruns/",
    "/ray_results/",
    "/test-artifacts/",
    "/build/",
    "/dist/",
    "*.db",
    "__pycache__/",
    ".env",
]

_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def job_client(address: str = DEFAULT_ADDRESS, *, token: str | None = None) -> JobSubmissionClient:
    """A client for the job API at ``address``, authenticated with ``token`` if given."""
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)


def sweep_entrypoint(
    space: str,
    *,
    tracking_uri: str | None = None,
    storage: str | None = None,
    extra_args: Sequence[str] = (),
) -> str:
    """The shell command the job runs on the head node.

    Without ``tracking_uri`` / ``storage`` the head node's own ``$MLFLOW_TRACKING_URI`` and
    ``$MODLOSS_STORAGE_PATH`` are used (docker-compose.yml sets both), falling back to the
    compose MLflow service and a folder inside the job's working_dir.
    """
    args = [shlex.join(["modloss", "sweep", space, "--address", "auto"])]
    args.append(
        "--tracking-uri "
        + (
            shlex.quote(tracking_uri)
            if tracking_uri
            else f'"${{MLFLOW_TRACKING_URI:-{CLUSTER_TRACKING_URI}}}"'
        )
    )
    args.append(
        "--storage "
        + (shlex.quote(storage) if storage else '"${MODLOSS_STORAGE_PATH:-ray_results}"')
    )
    if extra_args:
        args.append(shlex.join(extra_args))
    return " ".join(args)


def _space_in_working_dir(space: Path, working_dir: Path) -> str:
    space = space.resolve()
    if not space.is_file():
        raise FileNotFoundError(f"search space {space} does not exist")
    try:
        return space.relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        raise ValueError(
            f"search space {space} is outside the uploaded working_dir {working_dir}; "
            "put it under the project (e.g. search_spaces/)"
        ) from None


def submit_sweep(
    client: JobSubmissionClient,
    space: str | Path,
    *,
    tracking_uri: str | None = None,
    storage: str | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    working_dir: str | Path = ".",
    submission_id: str | None = None,
) -> str:
    """Submit ``modloss sweep SPACE`` as a Ray Job; returns the submission id."""
    working_dir = Path(working_dir)
    relative_space = _space_in_working_dir(Path(space), working_dir)
    stem = re.sub(r"[^A-Za-z0-9_-]", "-", Path(space).stem)
    runtime_env: dict = {
        "working_dir": str(working_dir.resolve()),
        "excludes": WORKING_DIR_EXCLUDES,
    }
    if env:
        runtime_env["env_vars"] = dict(env)
    entrypoint = sweep_entrypoint(
        relative_space, tracking_uri=tracking_uri, storage=storage, extra_args=extra_args
    )
    return client.submit_job(
        entrypoint=entrypoint,
        submission_id=submission_id or f"modloss-{stem}-{time.strftime('%Y%m%d-%H%M%S')}",
        runtime_env=runtime_env,
        metadata={"space": relative_space},
    )


def follow_logs(client: JobSubmissionClient, job_id: str, out: TextIO = sys.stdout) -> str:
    """Stream a job's logs to ``out`` until it ends; returns its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    # The log stream closes when the driver exits, a moment before the status settles.
    status = str(client.get_job_status(job_id).value)
    deadline = time.monotonic() + 30
    while status not in _TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id).value)
    return status


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--env")
        env[key] = value
    return env


@contextlib.contextmanager
def _reported_errors() -> Iterator[None]:
    """Turn the job API's failures into one-line errors (exit status 2)."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as err:
        # Ray's message runs over several lines (a blank one, then advice about Ray's own
        # token files); its first line says what was wrong.
        reason = (str(err.message).strip().splitlines() or ["authentication failed"])[0]
        typer.echo(
            f"error: {reason}: pass the cluster's token with --token or $RAY_AUTH_TOKEN",
            err=True,
        )
        raise typer.Exit(2) from None
    except (ConnectionError, RuntimeError, ValueError, FileNotFoundError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def _format_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


Address = Annotated[
    str,
    typer.Option(
        "--address", envvar="RAY_API_SERVER_ADDRESS", help="The Ray dashboard / job API URL."
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="RAY_AUTH_TOKEN",
        show_default=False,
        help="Ray auth token for clusters with RAY_AUTH_MODE=token (default: $RAY_AUTH_TOKEN).",
    ),
]


def submit(
    ctx: typer.Context,
    space: Annotated[Path, typer.Argument(help="Search-space YAML inside the project.")],
    address: Address = DEFAULT_ADDRESS,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            help="MLflow tracking URI as the cluster's nodes reach it. "
            "[default: the head node's $MLFLOW_TRACKING_URI, else http://mlflow:5000]"
        ),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Ray Tune storage folder on the cluster (shared by all nodes). "
            "[default: the head node's $MODLOSS_STORAGE_PATH]"
        ),
    ] = None,
    token: Token = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="KEY=VALUE for the job (repeatable).")
    ] = None,
    working_dir: Annotated[
        Path, typer.Option(help="Folder uploaded as the job's working_dir; holds SPACE.")
    ] = Path("."),
    follow: Annotated[bool, typer.Option(help="Stream the job's logs until it ends.")] = True,
) -> None:
    """Submit a sweep to a Ray cluster as a Ray Job and stream its logs.

    Extra arguments after -- go to `modloss sweep` (e.g. -- --resume).
    """
    with _reported_errors():
        if tracking_uri is not None:  # as the cluster reaches it: its scheme only, from here
            check_tracking_uri(tracking_uri, local=False)
        client = job_client(address, token=token)
        job_id = submit_sweep(
            client,
            space,
            tracking_uri=tracking_uri,
            storage=storage,
            extra_args=ctx.args,
            env=_parse_env(env or []),
            working_dir=working_dir,
        )
    typer.echo(f"submitted {job_id} to {address}", err=True)
    if not follow:
        typer.echo(job_id)
        return
    try:
        with _reported_errors():
            status = follow_logs(client, job_id)
    except KeyboardInterrupt:
        typer.echo(
            f"stopped following; {job_id} keeps running on the cluster "
            f"(modloss logs {job_id} --follow to reattach)",
            err=True,
        )
        raise typer.Exit(130) from None
    typer.echo(f"job {job_id}: {status}", err=True)
    if status != "SUCCEEDED":
        raise typer.Exit(1)


def jobs(address: Address = DEFAULT_ADDRESS, token: Token = None) -> None:
    """List the cluster's jobs, newest last."""
    with _reported_errors():
        details = job_client(address, token=token).list_jobs()
    details.sort(key=lambda j: j.start_time or 0)
    if not details:
        typer.echo("no jobs")
        return
    rows = [("SUBMISSION ID", "STATUS", "STARTED", "ENDED", "SPACE")]
    for job in details:
        rows.append(
            (
                job.submission_id or job.job_id or "-",
                str(job.status.value),
                _format_time(job.start_time),
                _format_time(job.end_time),
                (job.metadata or {}).get("space", job.entrypoint or ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        typer.echo(
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
        )


def logs(
    job_id: Annotated[str, typer.Argument(help="Submission id, as `modloss jobs` lists it.")],
    address: Address = DEFAULT_ADDRESS,
    token: Token = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")
    ] = False,
) -> None:
    """Show a job's logs."""
    with _reported_errors():
        client = job_client(address, token=token)
        if follow:
            typer.echo(f"job {job_id}: {follow_logs(client, job_id)}", err=True)
        else:
            typer.echo(client.get_job_logs(job_id), nl=False)


def register(app: typer.Typer) -> None:
    """Entry point of the ``modloss.commands`` group: adds submit, jobs and logs."""
    app.command(
        "submit",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(submit)
    app.command("jobs")(jobs)
    app.command("logs")(logs)
