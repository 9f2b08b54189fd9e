"""The ``modloss`` command line.

``modloss`` itself provides ``train`` and ``analyze``. Other layers of the project add
their commands through the ``modloss.commands`` entry-point group (each entry point is a
callable that receives this Typer app), so that this package never imports Ray or MLflow.
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

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


@app.command()
def train(
    model: Annotated[str, typer.Option(help="Registered model name, e.g. 256-M-4-H.")],
    out: Annotated[Path, typer.Option(help="Run directory; re-running with it resumes.")],
    lam: Annotated[
        float | None, typer.Option(help="Modular-loss lambda in [0, 1]. (default: 1)")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs to train. (default: 200)")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset name. (default: fashion-mnist)")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate. (default: the paper's for model and lam)")
    ] = None,
    trial: Annotated[
        int | None, typer.Option(help="Trial: seeds the split, init and batch order. (default: 0)")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size. (default: 100)")] = None,
    subset: Annotated[
        int | None, typer.Option(help="Use at most this many examples per split (smoke runs).")
    ] = None,
    momentum: Annotated[float | None, typer.Option(help="SGD momentum. (default: 0.9)")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay. (default: 0)")] = None,
    nesterov: Annotated[bool | None, typer.Option(help="Nesterov momentum. (default: no)")] = None,
    milestone: Annotated[
        list[int] | None, typer.Option(help="Epoch at which lr is multiplied by gamma; repeatable.")
    ] = None,
    gamma: Annotated[float | None, typer.Option(help="LR decay factor. (default: 0.1)")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Dataset folder. (default: $MODLOSS_DATA_DIR or cache)")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:N or mps. (default: cpu)")
    ] = None,
    strategy: Annotated[
        str,
        typer.Option(
            help="single, or under torchrun (one process per rank): ddp (data parallel) or "
            "module (members split across ranks, the paper's section 3.3)."
        ),
    ] = "single",
) -> None:
    """Train one ensemble with the paper's protocol; writes OUT/results.json, the
    checkpoint and the test/validation logits of the best-validation epoch."""
    from modloss.names import CHECKPOINT_FILE
    from modloss.strategies import STRATEGIES, make_strategy
    from modloss.train import TrainConfig, fit

    given: dict[str, Any] = {
        "model": model,
        "lam": lam,
        "epochs": epochs,
        "dataset": dataset,
        "lr": lr,
        "trial": trial,
        "batch_size": batch_size,
        "subset": subset,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "nesterov": nesterov,
        "milestones": milestone,
        "gamma": gamma,
        "data_dir": None if data_dir is None else str(data_dir),
        "device": device,
    }
    try:
        config = TrainConfig.model_validate({k: v for k, v in given.items() if v is not None})
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
