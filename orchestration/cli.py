"""The ``sweep`` and ``ui`` commands, plugged into ``modloss`` through the
``modloss.commands`` entry-point group."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register", "sweep", "ui"]

# Exit codes: 2 for input that was refused before anything ran (as click does for usage
# errors), 1 for a sweep with failed trials, 130 for an interrupted one.
EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


def sweep(
    space: Annotated[Path, typer.Argument(help="Search-space YAML (see search_spaces/).")],
    address: Annotated[
        str | None,
        typer.Option(help="Join this Ray cluster (e.g. auto); default: a local Ray for the run."),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI; default sqlite:///mlflow.db in this folder."),
    ] = None,
    experiment: Annotated[
        str | None,
        typer.Option(
            help="Experiment name (Ray folder and MLflow experiment); default: the space's name."
        ),
    ] = None,
    storage: Annotated[
        Path | None, typer.Option(help="Folder of Ray experiments; default ./ray_results.")
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option(min=1, help="At most this many trials at once.")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Finish an interrupted sweep; finished trials are not rerun.")
    ] = False,
    pack: Annotated[
        bool,
        typer.Option(
            "--pack",
            help="Pack the grid, as `pack: true` in the space: the points that differ only in "
            "λ and lr (fusible settings) train as one Ray trial.",
        ),
    ] = False,
) -> None:
    """Run a search space as a Ray Tune sweep, tracked in MLflow; print the results table."""
    from orchestration.failfast import stopped
    from orchestration.guards import GuardError
    from orchestration.spaces import SpaceError
    from orchestration.sweep import run_sweep

    hint = "finish it with: " + _resume_command(
        space, address, tracking_uri, experiment, storage, max_concurrent, pack
    )
    try:
        outcome = run_sweep(
            space,
            address=address,
            tracking_uri=tracking_uri,
            experiment=experiment,
            storage=storage,
            max_concurrent=max_concurrent,
            resume=resume,
            pack=pack,
        )
    except (SpaceError, GuardError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        outcome = None
    if outcome is None or outcome.status == "KILLED":
        stop = stopped()
        if stop is not None:  # FailFast, not the user, interrupted it
            typer.echo(f"error: {stop}, so the sweep stopped; the error in full:", err=True)
            typer.echo(stop.error, err=True)
            typer.echo(f"trials not run stay pending: fix the cause, then {hint}", err=True)
            raise typer.Exit(EXIT_FAILED)
        typer.echo(f"interrupted; {hint}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    if outcome.status == "FAILED":
        typer.echo("some trials failed (status 'failed' in the table)", err=True)
        raise typer.Exit(EXIT_FAILED)


def _resume_command(space: Path, *options: object) -> str:
    """The command that resumes this sweep: every option given, then --resume."""
    import shlex

    names = ("--address", "--tracking-uri", "--experiment", "--storage", "--max-concurrent")
    args = ["modloss", "sweep", str(space)]
    *valued, pack = options
    for name, value in zip(names, valued, strict=True):
        if value is not None:
            args += [name, str(value)]
    if pack:
        args.append("--pack")
    return shlex.join([*args, "--resume"])


def ui(
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="The MLflow store to browse; default sqlite:///mlflow.db here."),
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port on 127.0.0.1; default 5000.")
    ] = None,
) -> None:
    """Start the MLflow UI on 127.0.0.1 for a tracking store (default: this folder's), and
    print the runs table of each of its experiments."""
    from mlflow import MlflowClient

    from orchestration.guards import (
        DEFAULT_TRACKING_URI,
        GuardError,
        check_port_free,
        check_tracking_uri,
        redact,
    )
    from orchestration.tracking import UI_PORT, runs_url

    port = port or UI_PORT
    tracking_uri = tracking_uri or DEFAULT_TRACKING_URI
    server = (
        tracking_uri
        if tracking_uri.startswith(("http://", "https://"))
        else f"http://127.0.0.1:{port}"
    )
    try:
        check_tracking_uri(tracking_uri)
        if server != tracking_uri:
            check_port_free(port)
    except GuardError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    experiments = MlflowClient(tracking_uri).search_experiments(max_results=1000)
    for exp in sorted(experiments, key=lambda e: e.name):
        if exp.name != "Default":  # MLflow's own, empty unless runs were logged by hand
            typer.echo(f"{exp.name}: runs table at {runs_url(redact(server), exp.experiment_id)}")
    if server == tracking_uri:
        typer.echo(f"{redact(tracking_uri)} is already an MLflow server: open it in a browser")
        return
    beside = Path(sys.executable).with_name("mlflow")  # this environment's mlflow first
    mlflow = str(beside) if beside.is_file() else shutil.which("mlflow") or "mlflow"
    command = [
        mlflow, "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    typer.echo(f"MLflow UI for {redact(tracking_uri)} at {server} (Ctrl-C stops it)")
    sys.stdout.flush()
    os.execv(mlflow, command)  # the UI takes this process's place (and its signals)


def register(app: typer.Typer) -> None:
    """Entry point of the ``modloss.commands`` group: adds ``sweep`` and ``ui``."""
    app.command("sweep")(sweep)
    app.command("ui")(ui)
