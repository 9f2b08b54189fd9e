"""The post-hoc analyses on synthetic logits whose answers are known."""

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from modloss.analysis import (
    ANALYSES,
    binary_f1,
    confusion_matrices,
    dominance_report,
    entropy_stats,
    load_logits,
    robustness,
    run_analysis,
    specialists,
)

K = 10
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _one_hot_logits(pred: torch.Tensor, scale: float = 10.0) -> torch.Tensor:
    """Logits (..., K) that predict ``pred`` with confidence set by ``scale``."""
    return scale * torch.nn.functional.one_hot(pred, K).float()


def _dominated(m: int = 8, n: int = 500, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One perfect, confident member among near-uniform noise members."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(K, (n,), generator=g)
    eta = 0.1 * torch.randn(m, n, K, generator=g)
    star = 3
    eta[star] = _one_hot_logits(target)
    return eta, target, star


def _noisy_copies(target: torch.Tensor, m: int, flip: float, seed: int) -> torch.Tensor:
    """m members, each right except on an independent random ``flip`` fraction."""
    g = torch.Generator().manual_seed(seed)
    wrong = torch.rand(m, len(target), generator=g) < flip
    pred = torch.where(
        wrong, (target + torch.randint(1, K, (m, len(target)), generator=g)) % K, target
    )
    return _one_hot_logits(pred, 1.0)


def test_confusion_matrices_match_a_slow_loop() -> None:
    g = torch.Generator().manual_seed(1)
    eta, target = torch.randn(5, 300, K, generator=g), torch.randint(K, (300,), generator=g)
    expected = torch.zeros(5, K, K, dtype=torch.long)
    for j in range(5):
        for i in range(300):
            expected[j, target[i], eta[j, i].argmax()] += 1
    assert torch.equal(confusion_matrices(eta, target), expected)


def test_binary_f1_matches_a_slow_loop() -> None:
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randint(K, (4, 200), generator=g), torch.randint(K, (200,), generator=g)
    f1 = binary_f1(pred, target, K)
    for r in range(4):
        for c in range(K):
            tp = ((pred[r] == c) & (target == c)).sum().item()
            fp = ((pred[r] == c) & (target != c)).sum().item()
            fn = ((pred[r] != c) & (target == c)).sum().item()
            expected = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
            assert f1[r, c].item() == pytest.approx(expected)


def test_identical_members_give_a_flat_robustness_curve() -> None:
    g = torch.Generator().manual_seed(3)
    target = torch.randint(K, (400,), generator=g)
    member = torch.randn(400, K, generator=g)
    eta = member.expand(16, -1, -1).clone()
    single = (member.argmax(-1) == target).float().mean().item()
    frame = robustness(eta, target, draws=5)
    assert frame.accuracy.to_numpy() == pytest.approx(single)


def test_robustness_axes_and_never_an_empty_ensemble() -> None:
    eta, target, _ = _dominated(m=8)
    frame = robustness(eta, target, draws=20, drop_counts=[0, 3, 7], keep_probs=(0.01,))
    drop = frame[frame.scheme == "drop_k"]
    # x axis: the number of members removed, exactly k for every draw of k.
    assert sorted(drop.dropped.unique()) == [0, 3, 7]
    assert (drop.groupby("dropped").size() == 20).all()
    # Keeping each of 8 members with p = 0.01 would usually keep none: one is forced.
    bern = frame[frame.scheme == "bernoulli"]
    assert (bern.dropped <= 7).all() and bern.accuracy.notna().all()
    assert (frame.error == 1 - frame.accuracy).all()
    # With one perfect member, dropping more members can only lose it more often.
    means = drop.groupby("dropped").accuracy.mean()
    assert means.loc[0] == 1.0 and means.is_monotonic_decreasing and means.loc[7] < 0.6


def test_robustness_draws_differ_within_a_setting() -> None:
    eta, target, _ = _dominated(m=8)
    drop = robustness(eta, target, draws=20, drop_counts=[4], keep_probs=())
    # Half of the draws of 4 out of 8 members keep the perfect member (accuracy 1), half not.
    assert 0.2 < (drop.accuracy == 1.0).mean() < 0.8


def test_specialists_are_found_on_validation_and_scored_on_test() -> None:
    """Member c answers class c perfectly and guesses elsewhere: a specialist for problem c."""
    g = torch.Generator().manual_seed(4)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        target = torch.randint(K, (n,), generator=g)
        guess = torch.randint(K, (K, n), generator=g)
        members = torch.arange(K).unsqueeze(1)
        # Member c: exact on class c (says c iff the label is c), otherwise a non-c guess.
        pred = torch.where(
            target == members, members, torch.where(guess == members, (guess + 1) % K, guess)
        )
        return _one_hot_logits(pred), target

    val_eta, val_target = split(2000)
    test_eta, test_target = split(2000)
    frame = specialists(val_eta, val_target, test_eta, test_target, subset_size=3, candidates=50)
    assert list(frame.columns) == [
        "random_member",
        "specialist_member",
        "random_subset",
        "specialist_subset",
    ]
    assert frame.specialist_member.to_numpy() == pytest.approx(1.0)
    assert (frame.random_member < 0.5).all()
    assert (frame.specialist_subset >= frame.random_subset).all()


def test_entropy_stats_follow_table_6() -> None:
    n = 100
    uniform = torch.zeros(1, n, K)
    confident = _one_hot_logits(torch.zeros(1, n, dtype=torch.long), 50.0)
    stats = entropy_stats(torch.cat([uniform, confident, uniform]))
    assert list(stats.index) == ["min", "max", "mean", "std"]
    assert stats["min"] == pytest.approx(0.0, abs=1e-6)
    assert stats["max"] == pytest.approx(math.log(K))
    assert stats["mean"] == pytest.approx(2 * math.log(K) / 3)
    assert stats["std"] == pytest.approx(torch.tensor([math.log(K), 0, math.log(K)]).std().item())


def test_dominance_report_finds_the_dominant_member() -> None:
    eta, target, star = _dominated(m=8)
    frame, summary = dominance_report(eta, target)
    assert summary["best_member"] == star and summary["most_influential"] == star
    assert summary["ensemble_error"] == 0.0 and summary["dominance_gap"] == 0.0
    assert summary["members_near_chance"] == 7
    assert frame.ensemble_error_without[star] > 0.7  # the rest cannot replace it


def test_independent_members_make_the_ensemble_beat_its_best_member() -> None:
    target = torch.randint(K, (2000,), generator=torch.Generator().manual_seed(5))
    eta = _noisy_copies(target, m=9, flip=0.3, seed=6)
    _, summary = dominance_report(eta, target)
    assert summary["dominance_gap"] > 0.15
    assert summary["members_near_chance"] == 0


def _fake_run(tmp_path: Path) -> Path:
    for split, seed in (("val", 7), ("test", 8)):
        target = torch.randint(K, (300,), generator=torch.Generator().manual_seed(seed))
        eta = _noisy_copies(target, m=24, flip=0.4, seed=seed)
        payload = {
            "eta": eta,
            "target": target,
            "epoch": 5,
            "split": split,
            "family": "categorical",
        }
        torch.save(payload, tmp_path / f"{split}_logits.pt")
    return tmp_path


@pytest.mark.parametrize("name", list(ANALYSES))
def test_run_analysis_writes_a_png_and_returns_a_table(tmp_path: Path, name: str) -> None:
    result = run_analysis(name, _fake_run(tmp_path))
    assert isinstance(result.table, pd.DataFrame) and len(result.table) > 0
    assert result.figure == tmp_path / f"{name}.png"
    assert result.figure.read_bytes()[:8] == PNG_MAGIC
    assert result.summary["epoch"] == 5


def test_run_analysis_rejects_unknown_names_and_missing_logits(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allowed: robustness, specialists"):
        run_analysis("nope", tmp_path)
    with pytest.raises(FileNotFoundError, match="test_logits.pt"):
        load_logits(tmp_path)
