"""``modloss report``: the paper's figures and tables from a tracked sweep."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register", "report"]


def report(
    experiment: Annotated[str, typer.Option(help="MLflow experiment (the sweep's name).")],
    out: Annotated[Path, typer.Option(help="Folder for the PNGs, CSVs and report.html.")],
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking URI. [default: $MLFLOW_TRACKING_URI or sqlite]"),
    ] = None,
    sweep_id: Annotated[
        str | None, typer.Option(help="Sweep to report on. [default: the latest]")
    ] = None,
    log: Annotated[
        bool, typer.Option(help="Also log the files under report/ on the sweep's parent run.")
    ] = True,
) -> None:
    """Regenerate Figs. 2, 3, 4, 5, 7, 10, the uncertainty figures (calibration, reliability,
    collusion, rotation shift, OOD) and Tables 2, 5, 6 from a sweep's MLflow runs."""
    from dashboards.data import ExperimentNotFound, load_sweep
    from dashboards.report import ARTIFACT_PATH, build_report, log_report
    from modloss.files import check_writable_dir
    from orchestration.guards import DEFAULT_TRACKING_URI, GuardError, check_tracking_uri

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    try:
        check_writable_dir(out, what="report folder")
        check_tracking_uri(uri)
        data = load_sweep(experiment, tracking_uri=uri, sweep_id=sweep_id)
    except (ExperimentNotFound, GuardError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    for duplicate in data.duplicates:
        typer.echo(f"warning: {duplicate}", err=True)
    built = build_report(data, out)
    typer.echo(f"{len(data.runs)} runs ({len(data.done)} with results) -> {built.html}")
    if built.empty:
        typer.echo(f"nothing to draw yet for: {', '.join(built.empty)}", err=True)
    if log:
        if log_report(data, built):
            typer.echo(f"logged to run {data.parent_run_id} under {ARTIFACT_PATH}/")
        else:
            typer.echo("no sweep parent run found: report not logged to MLflow", err=True)


def register(app: typer.Typer) -> None:
    """Entry point of the ``modloss.commands`` group: adds ``report``."""
    app.command("report")(report)
