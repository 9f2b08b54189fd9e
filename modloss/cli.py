"""The ``modloss`` command line.

``modloss`` itself provides ``train`` and ``analyze``. Other layers of the project add
their commands through the ``modloss.commands`` entry-point group (each entry point is a
callable that receives this Typer app), so that this package never imports Ray or MLflow.

``train`` has one option per :class:`modloss.config.TrainConfig` field, generated from the
field: its description is the help, its default the default; TrainConfig validates.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import typer
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from modloss.config import TrainConfig

app = typer.Typer(
    name="modloss",
    help="Jointly trained neural-network ensembles: train, analyse, sweep.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Exit status for input rejected before any compute (click uses 2 for usage errors too).
EXIT_BAD_INPUT = 2
# The keys of modloss.analysis.ANALYSES, repeated so that `modloss --help` need not import
# torch, pandas and matplotlib (a test keeps the two in step).
_ANALYSES = ("robustness", "specialists", "entropy", "confusion", "dominance")


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _describe(err: ValidationError) -> str:
    lines = [f"invalid configuration ({err.error_count()} problem(s)):"]
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "config"
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {message} (got {problem['input']!r})")
    return "\n".join(lines)


def _config_option(name: str, field: FieldInfo) -> inspect.Parameter:
    """The option of TrainConfig field ``name``: its description as help, its default."""
    kind, default = field.annotation, field.default
    if get_origin(kind) in (Union, UnionType):  # X | None: None is a default, not a type
        kind = next(a for a in get_args(kind) if a is not type(None))
    extra: dict[str, Any] = {}
    if get_origin(kind) is dict:  # a mapping on the command line is a JSON object
        kind, default, extra = str, json.dumps(default), {"metavar": "JSON"}
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[kind | None, typer.Option(help=field.description, **extra)],
        default=inspect.Parameter.empty if field.is_required() else default,
    )


def _with_config_options(command: Callable[..., None]) -> Callable[..., None]:
    """``command(*, out, **config)`` with an option for every TrainConfig field."""
    signature = inspect.signature(command, eval_str=True)
    own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    fields = [_config_option(n, f) for n, f in TrainConfig.model_fields.items()]
    command.__signature__ = signature.replace(parameters=[*own, *fields])
    command.__annotations__ = {p.name: p.annotation for p in [*own, *fields]}
    return command


@app.command()
@_with_config_options
def train(
    *,
    out: Annotated[Path, typer.Option(help="Run directory; re-running with it resumes.")],
    strategy: Annotated[
        str,
        typer.Option(
            help="single, or under torchrun (one process per rank): ddp (data parallel) or "
            "module (members split across ranks, the paper's section 3.3)."
        ),
    ] = "single",
    **given: Any,
) -> None:
    """Train one ensemble with the paper's protocol; writes OUT/results.json, the
    checkpoint and the test/validation logits of the best-validation epoch."""
    from modloss.names import CHECKPOINT_FILE
    from modloss.strategies import STRATEGIES, make_strategy
    from modloss.train import fit

    try:
        given["model_overrides"] = json.loads(given["model_overrides"])
        config = TrainConfig.model_validate({k: v for k, v in given.items() if v is not None})
    except json.JSONDecodeError as err:
        raise _fail(
            f"model_overrides: {err.doc!r} is not JSON ({err}); allowed: an object"
        ) from None
    except ValidationError as err:
        raise _fail(_describe(err)) from None
    if strategy not in STRATEGIES:
        raise _fail(f"--strategy {strategy!r}: allowed: {', '.join(STRATEGIES)}")
    run = make_strategy(strategy)
    if run.is_main and (out / CHECKPOINT_FILE).is_file():
        typer.echo(f"resuming from {out / CHECKPOINT_FILE}", err=True)
    try:
        result = fit(config, out_dir=out, progress=True, strategy=run)
    except (ValueError, FileNotFoundError) as err:  # a foreign out dir, missing data files
        raise _fail(str(err)) from None
    if run.is_main:
        typer.echo(
            json.dumps(result.model_dump(mode="json", exclude={"history", "config"}), indent=1)
        )
    if result.status == "diverged":
        raise typer.Exit(1)


@app.command()
def analyze(
    analysis: Annotated[str, typer.Argument(help=f"One of: {', '.join(_ANALYSES)}.")],
    run_dir: Annotated[Path, typer.Argument(help="The --out directory of a train run.")],
    seed: Annotated[int, typer.Option(help="Seed of the random member draws.")] = 0,
) -> None:
    """Analyse the saved logits of a run: prints a table, writes RUN_DIR/ANALYSIS.png."""
    from modloss.analysis import run_analysis

    try:
        result = run_analysis(analysis, run_dir, seed=seed)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from None
    for key, value in result.summary.items():
        typer.echo(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    typer.echo(result.table.to_string(max_rows=40, float_format=lambda v: f"{v:.4f}"))
    typer.echo(f"figure: {result.figure}")


def _load_plugins() -> None:
    for ep in entry_points(group="modloss.commands"):
        ep.load()(app)


def main() -> None:
    _load_plugins()
    app()
