"""The ``modloss`` command line.

``modloss`` itself provides ``train`` and ``analyze``. Other layers of the project add
their commands through the ``modloss.commands`` entry-point group (each entry point is a
callable that receives this Typer app), so that this package never imports Ray or MLflow.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import typer

app = typer.Typer(
    name="modloss",
    help="Jointly trained neural-network ensembles: train, analyse, sweep.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _load_plugins() -> None:
    for ep in entry_points(group="modloss.commands"):
        ep.load()(app)


def main() -> None:
    _load_plugins()
    app()
