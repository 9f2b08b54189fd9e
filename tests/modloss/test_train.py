"""The training protocol on real (subsets of) Fashion-MNIST and the regression datasets."""

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

import modloss.train
from modloss.data import Splits, TensorPair
from modloss.metrics import kept_members
from modloss.records import EpochRecord, RunResult
from modloss.train import (
    StopTraining,
    TrainConfig,
    build_model,
    fit,
    paper_lr,
)
from modloss.uncertainty import ece

MODEL = "16-M-64-H"
EPOCHS = 3


@pytest.fixture(scope="module")
def config(data_dir: Path) -> dict[str, Any]:
    return {
        "model": MODEL,
        "lam": 0.95,
        "epochs": EPOCHS,
        "subset": 1000,
        "data_dir": str(data_dir),
    }


@pytest.fixture(scope="module")
def run(config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, Path]:
    """One uninterrupted run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("run")
    return fit(config, out_dir=out), out


def _without_timing(history: list[EpochRecord]) -> list[dict]:
    return [entry.model_dump(exclude={"seconds"}) for entry in history]


# --------------------------------------------------------------------------- configuration


def test_paper_learning_rates() -> None:
    assert paper_lr("1-M-1024-H", 0.0) == 0.02
    assert paper_lr("256-M-4-H", 0.95) == 5.15
    assert paper_lr("256-M-4-H", 0.99) == paper_lr("256-M-4-H", 1.0) == 1.536
    assert paper_lr("16-M-64-H", 0.9) == 0.32 and paper_lr("16-M-64-H", 1.0) == 0.096
    assert paper_lr("64-M-16-H", 0.5) == 1.28 and paper_lr("64-M-16-H", 0.99) == 0.384
    assert paper_lr("CNN-10", 0.97) == 0.06 and paper_lr("CNN-10", 1.0) == 0.02
    assert paper_lr("DN-64-6-16", 0.5) == 0.1
    with pytest.raises(ValueError, match=r"at lam=0.7; pass lr explicitly"):
        paper_lr("256-M-4-H", 0.7)
    with pytest.raises(ValueError, match=r"CNN-10 exist at lam in \{0, 0.5, 0.8, 0.9, 0.95, 0.97"):
        paper_lr("CNN-10", 0.3)


@pytest.mark.parametrize(
    ("changes", "key", "fragment"),
    [
        ({"lam": 1.5}, "lam", "less than or equal to 1"),
        ({"lam": math.nan}, "lam", "finite"),
        ({"lr": -0.1}, "lr", "greater than 0"),
        ({"lr": math.inf}, "lr", "finite"),
        ({"lam": 0.7}, "lr", "pass lr explicitly"),
        ({"epochs": 0}, "epochs", "greater than or equal to 1"),
        ({"batch_size": 0}, "batch_size", "greater than or equal to 1"),
        ({"model": "resnet"}, "model", "allowed: 1-M-1024-H, 16-M-64-H"),
        ({"dataset": "svhn"}, "dataset", "allowed: fashion-mnist, cifar10"),
        ({"milestones": [5, 3]}, "milestones", "strictly increasing"),
        ({"milestones": [0, 3]}, "milestones", "positive"),
        ({"device": "tpu"}, "device", "allowed: cpu, cuda"),
        ({"learning_rate": 0.1}, "learning_rate", "Extra inputs are not permitted"),
    ],
)
def test_bad_config_names_the_key(changes: dict, key: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        TrainConfig.model_validate({"model": "256-M-4-H", "lam": 0.95, **changes})
    errors = info.value.errors()
    assert [e["loc"] for e in errors] == [(key,)]
    assert fragment in errors[0]["msg"]


def test_config_holds_the_learning_rate_it_runs_with() -> None:
    config = TrainConfig(model="256-M-4-H", lam=0.95)
    assert config.lr == 5.15
    assert TrainConfig.model_validate(config.model_dump()) == config
    assert TrainConfig(model="256-M-4-H", lam=0.7, lr=1.0).lr == 1.0


def test_every_lambda_of_a_trial_starts_from_the_same_weights() -> None:
    independent = build_model(TrainConfig(model=MODEL, lam=0.0)).state_dict()
    joint = build_model(TrainConfig(model=MODEL, lam=1.0)).state_dict()
    other_trial = build_model(TrainConfig(model=MODEL, lam=0.0, trial=1)).state_dict()
    assert all(torch.equal(independent[k], joint[k]) for k in independent)
    assert not torch.equal(independent["hidden.weight"], other_trial["hidden.weight"])


# --------------------------------------------------------------------------- a run


def test_fit_reports_selection_on_validation_and_saves_logits(
    run: tuple[RunResult, Path],
) -> None:
    results, out = run
    history = results.history
    assert results.status == "finished" and results.epochs_completed == EPOCHS
    assert [e.epoch for e in history] == list(range(1, EPOCHS + 1))
    val_errors = [e.val.error for e in history]
    assert results.best_epoch == 1 + val_errors.index(min(val_errors))
    assert results.val_error == min(val_errors)
    assert results.test_error == history[results.best_epoch - 1].test.error
    assert results.final_test_error == history[-1].test.error
    assert results.test_error < 0.5  # 16 small MLPs on 1000 images, 3 epochs
    for split in ("train", "val", "test"):
        for name in (
            "loss",
            "ambiguity",
            "error",
            "member_error_min",
            "entropy_mean",
            "dominance_gap",
        ):
            assert math.isfinite(getattr(getattr(history[-1], split), name))
        assert len(getattr(history[-1], split).member_errors) == 16
    assert history[0].train.loss > history[-1].train.loss
    assert RunResult.read(out / "results.json") == results

    test = torch.load(out / "test_logits.pt", weights_only=True)
    val = torch.load(out / "val_logits.pt", weights_only=True)
    assert test["eta"].shape == (16, 1000, 10) and val["eta"].shape == (16, 1000, 10)
    assert test["epoch"] == val["epoch"] == results.best_epoch
    saved_error = (test["eta"].mean(0).argmax(-1) != test["target"]).float().mean().item()
    assert saved_error == pytest.approx(results.test_error)
    # The best epoch's calibration comes from the same natural parameters as the logits.
    probs = torch.softmax(test["eta"].mean(0), dim=-1)
    assert results.test_ece == pytest.approx(ece(probs, test["target"]), abs=1e-6)
    brier = (probs - torch.nn.functional.one_hot(test["target"], 10)).square().sum(-1).mean()
    assert results.test_brier == pytest.approx(brier.item(), abs=1e-6)
    best = history[results.best_epoch - 1]
    assert (results.val_ece, results.val_brier) == (best.val.ece, best.val.brier)
    for entry in history:  # the collusion signal: train diversity beyond held-out diversity
        assert entry.diversity_gap == pytest.approx(entry.train.ambiguity - entry.val.ambiguity)
    # Validation error with 90% of the members dropped: the 2 of 16 members drawn from the
    # trial's own seed, from the same validation logits.
    kept = kept_members(16, modloss.train._KEPT_SEED + 0)
    wrong = val["eta"][kept].mean(0).argmax(-1) != val["target"]
    assert results.val_dropped_error == pytest.approx(wrong.double().mean().item())
    assert results.val_dropped_error == best.val.dropped_error
    assert all(e.val.dropped_error is not None for e in history)
    assert all(e.train.dropped_error is None and e.test.dropped_error is None for e in history)


def test_resume_reproduces_an_uninterrupted_run(
    run: tuple[RunResult, Path], config: dict, tmp_path: Path
) -> None:
    results, out = run
    fit({**config, "epochs": 2}, out_dir=tmp_path)
    resumed = fit(config, out_dir=tmp_path)
    assert resumed.status == "finished" and resumed.resumed_from == [2]
    assert _without_timing(resumed.history) == _without_timing(results.history)
    same = torch.load(out / "test_logits.pt", weights_only=True)["eta"]
    assert torch.equal(torch.load(tmp_path / "test_logits.pt", weights_only=True)["eta"], same)


def test_a_resumed_run_recomputes_best_logits_it_did_not_keep(config: dict, tmp_path: Path) -> None:
    # No learning after epoch 1 (lr * 1e-30 is below the weights' precision), so epoch 1
    # stays the best, and a run cut after epoch 2 resumes past its best epoch.
    frozen = {**config, "milestones": [1], "gamma": 1e-30}
    whole = fit(frozen, out_dir=tmp_path / "whole")
    assert whole.best_epoch == 1

    def cut(result: RunResult, out: Path | None) -> None:
        if result.epochs_completed == 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        fit(frozen, [cut], out_dir=tmp_path / "cut")
    # Only the checkpoint is written per epoch; the logits wait for the run's end.
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == [
        "checkpoint.pt",
        "results.json",
    ]
    resumed = fit(frozen, out_dir=tmp_path / "cut")
    assert resumed.best_epoch == 1 and resumed.status == "finished"
    for name in ("test_logits.pt", "val_logits.pt"):
        expected = torch.load(tmp_path / "whole" / name, weights_only=True)
        got = torch.load(tmp_path / "cut" / name, weights_only=True)
        assert got["epoch"] == 1 and torch.equal(got["eta"], expected["eta"])


def test_a_finished_run_is_returned_without_training(
    run: tuple[RunResult, Path], config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    results, out = run

    def no_data(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished run must not load data")

    monkeypatch.setattr(modloss.train, "load_splits", no_data)
    assert fit(config, out_dir=out) == results
    with pytest.raises(ValueError, match="lam=0.95, not 0.5"):
        fit({**config, "lam": 0.5}, out_dir=out)


def test_the_test_set_never_influences_selection(
    run: tuple[RunResult, Path], config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    results, _ = run
    real_load = modloss.train.load_splits

    def shuffled_test_labels(*args: Any, **kwargs: Any) -> Splits:
        splits = real_load(*args, **kwargs)
        g = torch.Generator().manual_seed(0)
        noise = torch.randint(10, splits.test.y.shape, generator=g)
        return Splits(**{**vars(splits), "test": TensorPair(splits.test.x, noise)})

    monkeypatch.setattr(modloss.train, "load_splits", shuffled_test_labels)
    corrupted = fit(config)
    assert corrupted.best_epoch == results.best_epoch
    for clean, noisy in zip(results.history, corrupted.history, strict=True):
        assert noisy.val.error == clean.val.error
    assert corrupted.test_error > 0.8  # labels are noise: the test error says so...
    assert results.test_error < 0.5  # ...but selection did not move


def test_divergence_ends_the_run_without_raising(config: dict, tmp_path: Path) -> None:
    results = fit({**config, "lr": 1e6}, out_dir=tmp_path)
    assert results.status == "diverged"
    assert 1 <= results.diverged_epoch <= EPOCHS
    assert len(results.history) == results.diverged_epoch - 1

    def reject(constant: str) -> None:
        raise ValueError(f"results.json holds {constant}")

    on_disk = json.loads((tmp_path / "results.json").read_text(), parse_constant=reject)
    assert on_disk["status"] == "diverged"
    assert fit({**config, "lr": 1e6}, out_dir=tmp_path) == results  # not retried


def test_callbacks_see_each_checkpoint_and_can_stop_the_run(
    run: tuple[RunResult, Path], config: dict, tmp_path: Path
) -> None:
    seen: list[tuple[int, int | None, Path | None]] = []

    def record(result: RunResult, out_dir: Path | None) -> None:
        epoch = result.history[-1].epoch
        on_disk = RunResult.read(out_dir / "results.json")
        assert on_disk == result and on_disk.epochs_completed == epoch  # written before
        seen.append((epoch, result.best_epoch, out_dir))
        if epoch == 2:
            raise StopTraining

    stopped = fit(config, [record], out_dir=tmp_path)
    assert stopped.status == "stopped" and stopped.epochs_completed == 2
    assert [s[0] for s in seen] == [1, 2] and seen[0][2] == tmp_path
    assert seen[1][1] == stopped.best_epoch

    def stop(result: RunResult, out_dir: Path | None) -> None:
        raise StopTraining

    # Continues from epoch 3; a stop at the last epoch leaves the run finished, not stopped.
    continued = fit(config, [stop], out_dir=tmp_path)
    assert continued.status == "finished"
    assert _without_timing(continued.history) == _without_timing(run[0].history)


@pytest.mark.parametrize(("dataset", "epochs"), [("diabetes", 15), ("poisson-glm", 3)])
def test_regression_families_train_end_to_end(dataset: str, epochs: int) -> None:
    config = {"model": MODEL, "dataset": dataset, "lam": 0.5, "lr": 0.01, "epochs": epochs}
    results = fit({**config, "subset": 2000})
    history = results.history
    assert results.status == "finished"
    assert results.model_args["in_features"] in (10, 20)
    assert results.model_args["num_classes"] == 1
    assert history[-1].train.loss < history[0].train.loss
    assert history[-1].val.loss < history[0].val.loss
    assert history[-1].val.entropy_mean is None  # categorical only
    # error is the ensemble's RMSE, below that of predicting the mean (diabetes: std 1).
    if dataset == "diabetes":
        assert history[-1].val.error < 1.0
