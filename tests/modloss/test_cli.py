"""The ``modloss train`` and ``modloss analyze`` commands, through Typer's runner and once as
a real subprocess on real Fashion-MNIST."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import modloss.train
from modloss import cli
from modloss.analysis import ANALYSES
from modloss.config import TrainConfig
from modloss.records import RunResult
from modloss.train import build_model, initial_results

runner = CliRunner()
SMALL = ["--model", "16-M-64-H", "--lam", "0.95", "--epochs", "2", "--subset", "1000"]


@pytest.fixture(scope="module")
def run_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli-run")
    result = runner.invoke(
        cli.app, ["train", *SMALL, "--data-dir", str(data_dir), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    return out


def test_analysis_names_match_the_library() -> None:
    assert tuple(ANALYSES) == cli._ANALYSES


def test_every_train_config_field_is_an_option_described_by_the_field() -> None:
    command = typer.main.get_command(cli.app).commands["train"]
    options = {p.name: p for p in command.params if p.name not in ("out", "strategy")}
    assert options.keys() == TrainConfig.model_fields.keys()
    for name, field in TrainConfig.model_fields.items():
        option = options[name]
        assert field.description and option.help == field.description, name
        assert option.required == field.is_required(), name
        if not field.is_required():
            default = json.loads(option.default) if name == "model_overrides" else option.default
            assert default == field.default, name
    shown = runner.invoke(cli.app, ["train", "--help"], terminal_width=200).output
    assert "[default: 200]" in shown and "[default: no-nesterov]" in shown


def test_every_option_reaches_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    given = {
        "model": "16-M-64-H",
        "model_overrides": {"hidden": 8},
        "dataset": "cifar10",
        "lam": 0.5,
        "lr": 0.3,
        "momentum": 0.5,
        "weight_decay": 1e-4,
        "nesterov": True,
        "milestones": [1, 2],
        "gamma": 0.5,
        "batch_size": 64,
        "eval_batch_size": 500,
        "epochs": 3,
        "trial": 2,
        "val_size": 2000,
        "subset": 3000,
        "augment": True,
        "data_dir": "/elsewhere",
        "device": "cpu",
    }
    assert given.keys() == TrainConfig.model_fields.keys()
    args = ["--nesterov", "--augment", "--milestones", "1", "--milestones", "2"]
    for key, value in given.items():
        if key not in ("nesterov", "augment", "milestones"):
            text = json.dumps(value) if isinstance(value, dict) else str(value)
            args += [f"--{key.replace('_', '-')}", text]
    seen: list[TrainConfig] = []

    def record(config: TrainConfig, **kwargs: Any) -> RunResult:
        seen.append(config)
        return initial_results(config, build_model(config), kwargs["strategy"])

    monkeypatch.setattr(modloss.train, "fit", record)
    result = runner.invoke(cli.app, ["train", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert seen[0].model_dump() == given


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--model", "256-M-4-H", "--lam", "1.5"], "lam: Input should be less than or equal to 1"),
        (["--model", "resnet"], "model: unknown model 'resnet'; allowed: 1-M-1024-H"),
        (["--model", "256-M-4-H", "--lam", "0.7"], "lr: no paper learning rate"),
        (
            ["--model", "256-M-4-H", "--epochs", "0"],
            "epochs: Input should be greater than or equal to 1",
        ),
        (["--model", "256-M-4-H", "--dataset", "svhn"], "allowed: fashion-mnist, cifar10"),
        (["--model", "256-M-4-H", "--milestones", "5", "--milestones", "2"], "strictly increasing"),
        (["--model", "256-M-4-H", "--epochs", "3", "--milestones", "3"], "below epochs (3)"),
        (["--model", "256-M-4-H", "--model-overrides", "{hidden: 8}"], "'{hidden: 8}' is not JSON"),
        (["--model", "256-M-4-H", "--model-overrides", "[8]"], "model_overrides: Input should be"),
    ],
)
def test_bad_input_fails_cleanly_before_any_compute(
    args: list[str], fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_compute(*a: Any, **k: Any) -> None:
        raise AssertionError("bad input must be rejected before fit")

    monkeypatch.setattr(modloss.train, "fit", no_compute)
    result = runner.invoke(cli.app, ["train", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == cli.EXIT_BAD_INPUT
    assert fragment in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_train_writes_results_and_a_rerun_does_not_train_again(
    run_dir: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished" and len(results["history"]) == 2
    assert {"test_error", "best_epoch", "config"} <= results.keys()
    assert results["config"]["lr"] == 0.32  # the paper's preset, logged as used
    assert (run_dir / "test_logits.pt").is_file() and (run_dir / "checkpoint.pt").is_file()

    def no_data(*a: Any, **k: Any) -> None:
        raise AssertionError("a finished run must not load data")

    monkeypatch.setattr(modloss.train, "load_splits", no_data)
    args = ["train", *SMALL, "--data-dir", str(data_dir), "--out", str(run_dir)]
    again = runner.invoke(cli.app, args)
    assert again.exit_code == 0, again.output
    assert "resuming from" in again.output
    assert f'"test_error": {results["test_error"]}' in again.output


def test_rerun_with_another_config_is_refused(run_dir: Path, data_dir: Path) -> None:
    args = [
        "train",
        *SMALL[:-4],
        "--lam",
        "0.5",
        "--lr",
        "0.1",
        "--epochs",
        "2",
        "--out",
        str(run_dir),
    ]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == cli.EXIT_BAD_INPUT
    assert "lam=0.95, not 0.5" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("analysis", list(ANALYSES))
def test_analyze_prints_a_table_and_writes_a_png(run_dir: Path, analysis: str) -> None:
    result = runner.invoke(cli.app, ["analyze", analysis, str(run_dir)])
    assert result.exit_code == 0, result.output
    assert f"figure: {run_dir / analysis}.png" in result.output
    assert (run_dir / f"{analysis}.png").read_bytes()[:4] == b"\x89PNG"
    assert "epoch: " in result.output


def test_analyze_rejects_unknown_analyses_and_empty_dirs(tmp_path: Path) -> None:
    bad = runner.invoke(cli.app, ["analyze", "nope", str(tmp_path)])
    assert bad.exit_code == cli.EXIT_BAD_INPUT and "allowed: robustness" in bad.output
    empty = runner.invoke(cli.app, ["analyze", "dominance", str(tmp_path)])
    assert empty.exit_code == cli.EXIT_BAD_INPUT and "test_logits.pt not found" in empty.output


def test_the_installed_command_trains_on_real_fashion_mnist(data_dir: Path, tmp_path: Path) -> None:
    command = Path(sys.executable).parent / "modloss"
    out = tmp_path / "run"
    args = ["train", "--model", "16-M-64-H", "--lam", "0.95", "--epochs", "2", "--subset", "5000"]
    proc = subprocess.run(
        [str(command), *args, "--data-dir", str(data_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "finished" and results["best_epoch"] in (1, 2)
    assert results["test_error"] < 0.35  # chance is 0.9
    assert results["config"]["subset"] == 5000 and len(results["history"]) == 2
    assert (out / "test_logits.pt").is_file() and (out / "checkpoint.pt").is_file()
