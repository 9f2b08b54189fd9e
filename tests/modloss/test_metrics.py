"""Per-epoch metrics against slow per-member references and torchmetrics, their exact
merging over example slices and member shards, and the dominance signal."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassCalibrationError

from modloss.losses import modular_loss_and_softmax
from modloss.metrics import (
    ECE_BINS,
    MEMBER_KEYS,
    NEAR_CHANCE_FRACTION,
    EpochMetrics,
    calibration_gaps,
    confidence_bins,
    dropped_error,
    evaluate,
    evaluate_groups,
    kept_members,
    member_entropy,
)

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


def test_evaluate_groups_gives_each_group_of_a_pack_its_own_evaluate() -> None:
    """One pass over the data for a pack of G groups: group g's metrics and logits are
    those of its members evaluated alone, at its own lambda; groups not asked for: None."""
    model = _Linear()  # 3 members: 3 groups of 1
    x = torch.randn(57, 5, generator=torch.Generator().manual_seed(8))
    y = torch.randint(K, (57,), generator=torch.Generator().manual_seed(9))
    lams = [0.0, 0.5, 1.0]
    packed = evaluate_groups(
        model, x, y, family="categorical", lams=lams, batch_size=10, keep_eta=True, groups=[0, 2]
    )
    assert packed[1] is None and model.training
    for g in (0, 2):
        alone = _Linear()
        alone.weight = nn.Parameter(model.weight[g : g + 1].detach().clone())
        metrics, eta = evaluate(
            alone, x, y, family="categorical", lam=lams[g], batch_size=10, keep_eta=True
        )
        torch.testing.assert_close(packed[g][1], eta)
        assert packed[g][0].keys() == metrics.keys()
        for key, value in metrics.items():
            assert packed[g][0][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    with pytest.raises(ValueError, match="3 members do not split into 2 groups"):
        evaluate_groups(model, x, y, family="categorical", lams=[0.0, 1.0])


def test_compute_without_updates_is_an_error() -> None:
    with pytest.raises(ValueError, match="before any update"):
        EpochMetrics("categorical", 1.0).compute()


def test_member_entropy_bounds() -> None:
    uniform = torch.zeros(2, 4, K)
    assert member_entropy(uniform) == pytest.approx(torch.full((2, 4), math.log(K)))


# --------------------------------------------------------------------------- calibration


def _ece_reference(probs: torch.Tensor, target: torch.Tensor) -> float:
    metric = MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=ECE_BINS, norm="l1")
    return metric(probs, target).item()


def _brier_loop(probs: torch.Tensor, target: torch.Tensor) -> float:
    total = 0.0
    for i in range(len(target)):
        for k in range(probs.shape[1]):
            total += (probs[i, k].item() - float(k == target[i].item())) ** 2
    return total / len(target)


def test_calibration_and_disagreement_match_torchmetrics_and_loops() -> None:
    eta, target = _categorical(11)
    got = _computed(eta, target, "categorical", 0.5, batches=5)
    ensemble = eta.mean(0).softmax(-1)
    members = eta.softmax(-1)
    assert got["ece"] == pytest.approx(_ece_reference(ensemble, target), abs=1e-6)
    member_ece = [_ece_reference(members[j], target) for j in range(M)]
    assert got["member_ece"] == pytest.approx(sum(member_ece) / M, abs=1e-6)
    assert got["brier"] == pytest.approx(_brier_loop(ensemble, target), rel=1e-5)
    member_brier = [_brier_loop(members[j], target) for j in range(M)]
    assert got["member_brier"] == pytest.approx(sum(member_brier) / M, rel=1e-5)
    pred = eta.mean(0).argmax(-1)
    fractions = [sum(int(eta[j, i].argmax() != pred[i]) for j in range(M)) / M for i in range(N)]
    assert got["disagreement"] == pytest.approx(sum(fractions) / N)


def test_one_member_ece_equals_torchmetrics_on_that_member() -> None:
    eta, target = _categorical(12)
    got = _computed(eta[3:4], target, "categorical", 1.0)
    assert got["member_ece"] == pytest.approx(_ece_reference(eta[3].softmax(-1), target), abs=1e-6)
    assert got["ece"] == pytest.approx(got["member_ece"], abs=1e-12)
    assert got["disagreement"] == 0.0


def test_confidences_on_bin_edges_fall_in_the_bin_above_as_in_torchmetrics() -> None:
    edges = torch.linspace(0, 1, ECE_BINS + 1)
    below = torch.nextafter(edges, torch.zeros(()))
    assert confidence_bins(edges).tolist() == list(range(ECE_BINS + 1))
    assert confidence_bins(below[1:]).tolist() == list(range(ECE_BINS))
    # Top-label confidences on and just below every edge above 1/K, correct on the edges
    # and wrong just below: binning one slot off mixes the two and changes the ECE.
    k = 20
    conf = torch.cat([edges[1:], below[2:]])
    correct = torch.cat([torch.ones(ECE_BINS), torch.zeros(ECE_BINS - 1)])
    probs = torch.cat([conf.unsqueeze(1), ((1 - conf) / (k - 1)).unsqueeze(1).expand(-1, k - 1)], 1)
    target = torch.where(correct.bool(), 0, 1)
    gaps = calibration_gaps(conf, correct)
    assert gaps.abs().sum().item() / len(conf) == pytest.approx(
        _ece_reference(probs, target), abs=1e-6
    )
    off_by_one = calibration_gaps(torch.nextafter(conf, torch.zeros(())), correct)
    assert off_by_one.abs().sum().item() / len(conf) != pytest.approx(
        _ece_reference(probs, target), abs=1e-3
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_bins", [1, 2, 7, 10, 15, 20, 100])
def test_bins_are_torchmetrics_bucketize_near_every_edge(n_bins: int, dtype) -> None:
    edges = torch.linspace(0, 1, n_bins + 1, dtype=dtype)
    near, below, above = [edges], edges, edges
    for _ in range(64):  # the 64 floats on either side of every edge
        below = torch.nextafter(below, torch.zeros((), dtype=dtype))
        above = torch.nextafter(above, torch.ones((), dtype=dtype))
        near += [below, above]
    spread = torch.rand(10_000, dtype=dtype, generator=torch.Generator().manual_seed(5))
    conf = torch.cat([*near, spread]).clamp(0, 1)
    expected = torch.bucketize(conf, edges, right=True) - 1  # torchmetrics' binning
    assert torch.equal(confidence_bins(conf, n_bins), expected)


def test_saturated_confidence_is_binned_as_torchmetrics_does() -> None:
    eta, target = _categorical(13)
    # A float32 softmax of the first 40 rounds to a top probability of exactly 1, and every
    # other one of them is wrong; the next 40 are right with a confidence just below 1. So
    # merging the saturated ones into the last bin would change the ECE.
    first = torch.arange(40)
    eta[:, first, (target[:40] + first % 2) % K] += 40
    eta[:, first + 40, target[40:80]] += 8
    got = _computed(eta, target, "categorical", 1.0, batches=3)
    ensemble = eta.mean(0).softmax(-1)
    assert (ensemble.amax(-1) == 1).sum() == 40
    assert got["ece"] == pytest.approx(_ece_reference(ensemble, target), abs=1e-6)


def test_non_finite_logits_give_non_finite_metrics_instead_of_an_error() -> None:
    eta, target = _categorical(14)
    eta[0, 3, 2] = float("nan")
    got = _computed(eta, target, "categorical", 1.0)
    assert math.isnan(got["member_ece"]) and math.isnan(got["ensemble_nll"])


# --------------------------------------------------------------------------- merging


def _assert_same_metrics(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        # float32 batch sums in another order: ambiguity (a difference of two) loses digits.
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def _state(eta, target, family: str, eta_bar=None, batches: int = 2) -> dict:
    acc = EpochMetrics(family, 0.5)
    chunks = eta_bar.chunk(batches) if eta_bar is not None else [None] * batches
    for e, t, b in zip(eta.chunk(batches, dim=1), target.chunk(batches), chunks, strict=True):
        acc.update(e, t, eta_bar=b)
    return acc.state()


def _family_data(family: str):
    eta, target = _categorical(21)
    if family != "categorical":
        g = torch.Generator().manual_seed(22)
        eta, target = eta[..., :2] / 4, torch.rand(N, 2, generator=g).mul(3).round()
    return eta, target


@pytest.mark.parametrize("family", ["categorical", "gaussian", "poisson"])
def test_merging_example_slices_equals_the_whole_epoch(family: str) -> None:
    eta, target = _family_data(family)
    whole = _computed(eta, target, family, 0.5)
    bounds = [0, 17, 17, 130, N]  # uneven slices, one empty rank
    parts = [
        _state(eta[:, lo:hi], target[lo:hi], family, batches=1) if hi > lo else {}
        for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]
    merged = EpochMetrics.merged(parts, over="examples", family=family, lam=0.5)
    assert merged.count == N
    _assert_same_metrics(merged.compute(), whole)


@pytest.mark.parametrize("family", ["categorical", "gaussian", "poisson"])
def test_merging_member_shards_equals_the_whole_epoch(family: str) -> None:
    eta, target = _family_data(family)
    whole = _computed(eta, target, family, 0.5)
    eta_bar = eta.mean(0)  # what the all-reduce gives every rank
    shards = [eta[:1], eta[1:4], eta[4:]]
    parts = [_state(shard, target, family, eta_bar) for shard in shards]
    merged = EpochMetrics.merged(parts, over="members", family=family, lam=0.5)
    got = merged.compute()
    _assert_same_metrics(got, whole)
    assert set(EpochMetrics(family, 0.5).state()) == set()
    member_keys = {key for key in parts[0] if parts[0][key].shape[:1] == (len(shards[1]),)}
    assert member_keys <= MEMBER_KEYS


# 300 members: each batch fills a chunk of its own; M: the batches are joined first.
@pytest.mark.parametrize("m", [1, M, 300])
def test_metrics_from_the_loss_softmax_equal_their_own(m: int) -> None:
    g = torch.Generator().manual_seed(31)
    eta, target = 2 * torch.randn(m, N, K, generator=g), torch.randint(K, (N,), generator=g)
    eta[:, :8] *= 40  # confident: numerators below exp(LOG_TINY), clamped by both
    own, shared = EpochMetrics("categorical", 0.6), EpochMetrics("categorical", 0.6)
    for e, t in zip(eta.chunk(4, dim=1), target.chunk(4), strict=True):
        own.update(e, t)
        _, softmax = modular_loss_and_softmax(e, t, 0.6)
        assert (softmax is None) == (m == 1)  # a lone member's loss is one cross_entropy
        shared.update(e, t, softmax=softmax)
    _assert_same_metrics(shared.compute(), own.compute())


def test_a_softmax_of_another_batch_or_with_eta_bar_is_refused() -> None:
    eta, target = _categorical(32)
    _, softmax = modular_loss_and_softmax(eta, target, 0.5)
    acc = EpochMetrics("categorical", 0.5)
    with pytest.raises(ValueError, match=r"softmax has shape \(10, 7, 240\), expected"):
        acc.update(eta[:, :100], target[:100], softmax=softmax)
    with pytest.raises(ValueError, match="eta_bar or softmax, not both"):
        acc.update(eta, target, eta_bar=eta.mean(0), softmax=softmax)
    with pytest.raises(ValueError, match="softmax is for family='categorical'"):
        EpochMetrics("gaussian", 0.5).update(eta, eta.mean(0), softmax=softmax)


def test_bad_arguments_name_the_argument() -> None:
    eta, target = _categorical()
    acc = EpochMetrics("categorical", 0.5)
    with pytest.raises(ValueError, match="eta_bar must have shape"):
        acc.update(eta, target, eta_bar=eta.mean(0)[:5])
    with pytest.raises(ValueError, match="eta must be a tensor"):
        acc.update(eta[0], target)
    with pytest.raises(ValueError, match="family must be one of"):
        EpochMetrics("bernoulli", 0.5)
    with pytest.raises(ValueError, match="lam must be"):
        EpochMetrics("categorical", 1.5)
    with pytest.raises(ValueError, match="over must be"):
        EpochMetrics.merged(
            [_state(eta, target, "categorical")], over="ranks", family="categorical", lam=0.5
        )


def test_an_empty_batch_gives_a_zero_state_that_merges_away() -> None:
    eta, target = _categorical(23)
    empty = EpochMetrics("categorical", 0.5)
    empty.update(eta[:, :0], target[:0])
    state = empty.state()
    assert set(state) == set(_state(eta, target, "categorical"))
    assert all((value == 0).all() for value in state.values())
    parts = [state, _state(eta, target, "categorical")]
    merged = EpochMetrics.merged(parts, over="examples", family="categorical", lam=0.5)
    _assert_same_metrics(merged.compute(), _computed(eta, target, "categorical", 0.5))


@pytest.mark.parametrize(
    ("members", "kept"), [(1, 1), (6, 1), (10, 1), (11, 2), (16, 2), (30, 3), (256, 26)]
)
def test_kept_members_keep_a_tenth_rounded_up_drawn_by_the_seed(members: int, kept: int) -> None:
    ids = kept_members(members, seed=3)
    assert len(ids) == kept and len(set(ids.tolist())) == kept
    assert ids.tolist() == sorted(ids.tolist()) and ids.min() >= 0 and ids.max() < members
    assert torch.equal(ids, kept_members(members, seed=3))  # reproducible
    if members >= 16:  # another seed, another draw (C(16, 2) = 120 subsets)
        assert not torch.equal(ids, kept_members(members, seed=4))


def test_kept_members_cover_every_member_over_seeds() -> None:
    seen = torch.cat([kept_members(16, seed) for seed in range(200)])
    assert set(seen.tolist()) == set(range(16))  # uniform, not a fixed prefix


def _slow_dropped_error(eta: torch.Tensor, target: torch.Tensor, kept: list[int]) -> float:
    wrong = 0
    for i in range(eta.shape[1]):
        mean = sum(eta[j, i] for j in kept) / len(kept)
        wrong += int(int(mean.argmax()) != int(target[i]))
    return wrong / eta.shape[1]


def test_dropped_error_matches_a_loop_over_the_kept_members() -> None:
    eta, target = _categorical()
    for kept in ([2], [0, 5], [1, 3, 4]):
        got = dropped_error(eta, target, torch.tensor(kept))
        assert got == pytest.approx(_slow_dropped_error(eta, target, kept), abs=1e-12)
    # Keeping every member gives the ensemble's own error; one member, that member's.
    metrics = _computed(eta, target, "categorical", 0.5)
    assert dropped_error(eta, target, torch.arange(M)) == pytest.approx(metrics["error"])
    assert dropped_error(eta, target, torch.tensor([4])) == pytest.approx(
        metrics["member_errors"][4]
    )


@pytest.mark.parametrize("family", ["gaussian", "poisson"])
def test_regression_dropped_error_is_the_rmse_of_the_kept_members(family: str) -> None:
    g = torch.Generator().manual_seed(1)
    eta, y = 0.3 * torch.randn(M, N, 2, generator=g), torch.rand(N, 2, generator=g)
    kept = torch.tensor([1, 4])
    metrics = _computed(eta[kept], y, family, 0.5)
    assert dropped_error(eta, y, kept, family) == pytest.approx(metrics["error"], rel=1e-6)
