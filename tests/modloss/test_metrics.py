"""Per-epoch metrics against slow per-member references, and the dominance signal."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modloss.metrics import NEAR_CHANCE_FRACTION, EpochMetrics, evaluate, member_entropy

M, N, K = 6, 240, 10


def _categorical(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(M, N, K, generator=g), torch.randint(K, (N,), generator=g)


def _computed(eta: torch.Tensor, target: torch.Tensor, family: str, lam: float, batches: int = 1):
    acc = EpochMetrics(family, lam)
    for e, t in zip(eta.chunk(batches, dim=1), target.chunk(batches), strict=True):
        acc.update(e, t)
    return acc.compute()


def test_categorical_metrics_match_a_per_member_loop() -> None:
    eta, target = _categorical()
    lam = 0.7
    got = _computed(eta, target, "categorical", lam)
    ensemble_nll = F.cross_entropy(eta.mean(0), target).item()
    members = [F.cross_entropy(eta[j], target).item() for j in range(M)]
    member_errors = [(eta[j].argmax(-1) != target).float().mean().item() for j in range(M)]
    entropies = [member_entropy(eta[j : j + 1]).mean().item() for j in range(M)]
    # Ambiguity (Eq. 6) is the mean KL divergence of each member from the ensemble.
    log_bar = torch.log_softmax(eta.mean(0), -1)
    kl = [
        (log_bar.exp() * (log_bar - torch.log_softmax(eta[j], -1))).sum(-1).mean().item()
        for j in range(M)
    ]

    assert got["ensemble_nll"] == pytest.approx(ensemble_nll, rel=1e-5)
    assert got["member_nll"] == pytest.approx(sum(members) / M, rel=1e-5)
    assert got["loss"] == pytest.approx(lam * ensemble_nll + (1 - lam) * sum(members) / M, rel=1e-5)
    assert got["ambiguity"] == pytest.approx(sum(kl) / M, rel=1e-4)
    assert got["error"] == pytest.approx((eta.mean(0).argmax(-1) != target).float().mean().item())
    assert got["member_errors"] == pytest.approx(member_errors)
    assert got["member_error_min"] == pytest.approx(min(member_errors))
    assert got["member_error_max"] == pytest.approx(max(member_errors))
    assert got["member_error_mean"] == pytest.approx(sum(member_errors) / M)
    assert got["member_entropy"] == pytest.approx(entropies, rel=1e-5)
    assert got["entropy_mean"] == pytest.approx(sum(entropies) / M, rel=1e-5)


@pytest.mark.parametrize("family", ["categorical", "gaussian", "poisson"])
def test_batched_accumulation_equals_one_pass(family: str) -> None:
    eta, target = _categorical(1)
    if family != "categorical":
        eta, target = (
            eta[..., :2] / 4,
            torch.rand(N, 2, generator=torch.Generator().manual_seed(9)).mul(3).round(),
        )
    whole = _computed(eta, target, family, 0.5, batches=1)
    batched = _computed(eta, target, family, 0.5, batches=7)
    assert whole.keys() == batched.keys()
    for key, value in whole.items():
        # float32 sums in a different order: ambiguity (a difference of two) loses digits.
        assert batched[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("family", ["gaussian", "poisson"])
def test_regression_error_is_the_ensemble_rmse(family: str) -> None:
    g = torch.Generator().manual_seed(2)
    eta, target = (
        0.3 * torch.randn(M, N, 1, generator=g),
        torch.rand(N, 1, generator=g).mul(4).round(),
    )
    inverse_link = torch.exp if family == "poisson" else (lambda t: t)
    got = _computed(eta, target, family, 1.0)
    rmse = (inverse_link(eta.mean(0)) - target).square().mean().sqrt().item()
    member_rmse = (inverse_link(eta) - target).square().mean((1, 2)).sqrt()
    assert got["error"] == pytest.approx(rmse, rel=1e-5)
    assert got["member_errors"] == pytest.approx(member_rmse.tolist(), rel=1e-5)
    assert "entropy_mean" not in got  # entropy is reported for categorical targets only
    # "Chance" for regression is the constant predictor: no member beats it by 10% here.
    chance = target.std(correction=0).item()
    expected = int((member_rmse >= NEAR_CHANCE_FRACTION * chance).sum())
    assert got["members_near_chance"] == expected


def test_dominance_signal_separates_dominated_from_independent_ensembles() -> None:
    _, target = _categorical(3)
    g = torch.Generator().manual_seed(4)
    # Dominated: one confident perfect member, the rest near-uniform noise.
    dominated = 0.1 * torch.randn(M, N, K, generator=g)
    dominated[2] = 10 * F.one_hot(target, K).float()
    # Independent: every member right on a different random 70% of the examples.
    wrong = torch.rand(M, N, generator=g) < 0.3
    pred = torch.where(wrong, (target + torch.randint(1, K, (M, N), generator=g)) % K, target)
    independent = F.one_hot(pred, K).float()

    dom = _computed(dominated, target, "categorical", 1.0)
    ind = _computed(independent, target, "categorical", 1.0)
    assert dom["dominance_gap"] == 0.0 and dom["best_member"] == 2
    assert dom["members_near_chance"] == M - 1
    assert ind["dominance_gap"] > 0.15 and ind["members_near_chance"] == 0


class _Linear(nn.Module):
    """A 3-member linear ensemble (M, N, K) with a dropout that only acts in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 5, K, generator=torch.Generator().manual_seed(5)))
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nf,mfk->mnk", self.drop(x), self.weight)


def test_evaluate_is_batched_gradient_free_and_in_eval_mode() -> None:
    model = _Linear().train()
    x = torch.randn(103, 5, generator=torch.Generator().manual_seed(6))
    y = torch.randint(K, (103,), generator=torch.Generator().manual_seed(7))
    small, eta_small = evaluate(
        model, x, y, family="categorical", lam=1.0, batch_size=10, keep_eta=True
    )
    whole, eta_whole = evaluate(
        model, x, y, family="categorical", lam=1.0, batch_size=1000, keep_eta=True
    )
    assert model.training  # restored
    assert eta_small.shape == (3, 103, K) and not eta_small.requires_grad
    torch.testing.assert_close(eta_small, eta_whole)  # eval mode: dropout off, deterministic
    assert small["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    reference = F.cross_entropy(eta_whole.mean(0), y).item()
    assert whole["ensemble_nll"] == pytest.approx(reference, rel=1e-5)
    assert evaluate(model, x, y, family="categorical", lam=1.0)[1] is None


def test_compute_without_updates_is_an_error() -> None:
    with pytest.raises(ValueError, match="before any update"):
        EpochMetrics("categorical", 1.0).compute()


def test_member_entropy_bounds() -> None:
    uniform = torch.zeros(2, 4, K)
    assert member_entropy(uniform) == pytest.approx(torch.full((2, 4), math.log(K)))
