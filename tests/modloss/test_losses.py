"""The modular loss against slow references: per-member loops over `torch.distributions`, the
exponential-family form of Eq. (9, 10), the KL forms of Eq. (4, 6) and the gradient of Eq. (8)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.distributions import Categorical, Independent, Normal, Poisson, kl_divergence

from modloss.losses import (
    FAMILIES,
    LOG_TINY,
    REDUCTIONS,
    LossParts,
    ModularLoss,
    combine,
    member_nll,
    modular_loss,
    modular_loss_and_softmax,
    predict,
)

M, N, K = 4, 6, 3
LAMS = (0.0, 0.3, 0.9, 1.0)


def make(family, m=M, n=N, k=K, dtype=torch.float64, seed=0):
    """Member natural parameters ``(m, n, k)`` spread enough that members disagree, and a
    target of the family."""
    g = torch.Generator().manual_seed(seed)
    eta = 1.5 * torch.randn(m, n, k, generator=g, dtype=dtype)
    if family == "categorical":
        target = torch.randint(0, k, (n,), generator=g)
    elif family == "gaussian":
        target = torch.randn(n, k, generator=g, dtype=dtype)
    else:
        target = torch.poisson(torch.full((n, k), 2.0, dtype=dtype), generator=g)
    return eta, target


# --------------------------------------------------------------------------- references


def dist(eta_j, family):
    """q(y | eta_j) for ``eta_j`` of shape (N, K), one distribution per example."""
    if family == "categorical":
        return Categorical(logits=eta_j)
    if family == "gaussian":
        return Independent(Normal(eta_j, torch.ones_like(eta_j)), 1)
    return Independent(Poisson(eta_j.exp()), 1)


def ref_nll(eta_j, target, family):
    return -dist(eta_j, family).log_prob(target)  # (N,)


def ref_terms(eta, target, family):
    """Per-example (ensemble NLL, mean member NLL, mean_j KL(q_bar || q_j)) from a loop over
    members."""
    eta_bar = eta.mean(0)
    members = sum(ref_nll(e, target, family) for e in eta) / len(eta)
    ambiguity = sum(kl_divergence(dist(eta_bar, family), dist(e, family)) for e in eta) / len(eta)
    return ref_nll(eta_bar, target, family), members, ambiguity


def log_partition(eta, family):
    if family == "categorical":
        return torch.log(torch.exp(eta).sum(-1))
    if family == "gaussian":
        return 0.5 * (eta**2).sum(-1)
    return torch.exp(eta).sum(-1)


def mean_of(eta, family):
    """Inverse link: the gradient of A."""
    if family == "categorical":
        return torch.exp(eta) / torch.exp(eta).sum(-1, keepdim=True)
    if family == "gaussian":
        return eta
    return torch.exp(eta)


def statistic(target, family, k=K):
    """Sufficient statistic y: one-hot for categorical."""
    if family == "categorical":
        return F.one_hot(target, k).to(torch.float64)
    return target


def log_base(target, family, k=K):
    if family == "categorical":
        return torch.zeros(target.shape[0], dtype=torch.float64)
    if family == "gaussian":
        return -0.5 * (target**2).sum(-1) - 0.5 * k * math.log(2 * math.pi)
    return -torch.lgamma(target + 1).sum(-1)


def nef_nll(eta, target, family, k=K):
    """Eq. (9) per example: A(eta) - eta . y - ln h(y)."""
    y = statistic(target, family, k)
    return log_partition(eta, family) - (eta * y).sum(-1) - log_base(target, family, k)


def reduce(x, reduction):
    return {"none": x, "mean": x.mean(), "sum": x.sum()}[reduction]


# --------------------------------------------------------------------------- equations


@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_eq4_eq6_eq7_and_eq10_agree(family, lam):
    eta, target = make(family)
    got = modular_loss(eta, target, lam, family=family, reduction="none")
    eta_bar = eta.mean(0)
    ensemble, members, ambiguity = ref_terms(eta, target, family)

    eq7 = lam * ensemble + (1 - lam) * members
    eq6 = members - lam * ambiguity
    eq10 = (
        lam * nef_nll(eta_bar, target, family)
        + (1 - lam) * sum(nef_nll(e, target, family) for e in eta) / M
    )
    for expected in (eq7, eq6, eq10):
        torch.testing.assert_close(got, expected)
    if family == "categorical":
        # Eq. (4) with the one-hot data distribution p: KL(p || q) = sum_k p log(p / q)
        p = statistic(target, family)

        def kl_data(e):
            q = mean_of(e, family)
            return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)

        eq4 = lam * kl_data(eta_bar) + (1 - lam) * sum(kl_data(e) for e in eta) / M
        torch.testing.assert_close(got, eq4)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_parts_match_a_per_member_loop(family, reduction):
    eta, target = make(family)
    lam = 0.7
    loss, parts = modular_loss(
        eta, target, lam, family=family, reduction=reduction, return_parts=True
    )
    ensemble, members, ambiguity = ref_terms(eta, target, family)
    assert isinstance(parts, LossParts)
    torch.testing.assert_close(parts.ensemble, reduce(ensemble, reduction))
    torch.testing.assert_close(parts.members, reduce(members, reduction))
    torch.testing.assert_close(parts.ambiguity, reduce(ambiguity, reduction))
    torch.testing.assert_close(loss, reduce(lam * ensemble + (1 - lam) * members, reduction))
    torch.testing.assert_close(loss, parts.members - lam * parts.ambiguity)
    assert not any(p.requires_grad for p in parts)


@pytest.mark.parametrize("family", FAMILIES)
def test_ambiguity_is_the_nef_closed_form_and_ignores_the_target(family):
    eta, target = make(family)
    _, other = make(family, seed=1)
    eta_bar = eta.mean(0)
    y_bar = mean_of(eta_bar, family)
    # KL(q_bar || q_j) = A(eta_j) - A(eta_bar) - (eta_j - eta_bar) . y_bar
    closed = (
        sum(
            log_partition(e, family)
            - log_partition(eta_bar, family)
            - ((e - eta_bar) * y_bar).sum(-1)
            for e in eta
        )
        / M
    )
    amb = modular_loss(eta, target, 0.5, family=family, reduction="none", return_parts=True)[1]
    amb_other = modular_loss(eta, other, 0.5, family=family, reduction="none", return_parts=True)[1]
    torch.testing.assert_close(amb.ambiguity, closed)
    torch.testing.assert_close(amb_other.ambiguity, amb.ambiguity)
    assert (amb.ambiguity > 0).all()  # members disagree, so every KL is positive


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_is_eq8(family, lam, reduction):
    eta, target = make(family)
    eta.requires_grad_()
    loss = modular_loss(eta, target, lam, family=family, reduction=reduction)
    weight = torch.randn(N, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0)
    (grad,) = torch.autograd.grad(loss, eta, weight)

    with torch.no_grad():
        y_hat = mean_of(eta, family)  # (M, N, K)
        y_bar = mean_of(eta.mean(0), family)
        y = statistic(target, family)
        per_example = (y_hat - y - lam * (y_hat - y_bar)) / M  # Eq. (8)
        scale = {"none": weight, "mean": torch.tensor(1.0 / N), "sum": torch.tensor(1.0)}
        expected = per_example * scale[reduction].view(-1, 1)
    torch.testing.assert_close(grad, expected)


def independent_losses(eta, target, family):
    """Each member's own mean loss from torch.nn.functional, (M,)."""
    losses = []
    for e in eta:
        if family == "categorical":
            losses.append(F.cross_entropy(e, target))
        elif family == "gaussian":
            var = torch.ones_like(e)
            losses.append(
                F.gaussian_nll_loss(e, target, var, full=True, reduction="none").sum(-1).mean()
            )
        else:
            # full=True would use Stirling's approximation of ln y!; add the exact one.
            nll = F.poisson_nll_loss(e, target, log_input=True, full=False, reduction="none")
            losses.append((nll + torch.lgamma(target + 1)).sum(-1).mean())
    return torch.stack(losses)


@pytest.mark.parametrize("family", FAMILIES)
def test_lam0_is_the_mean_of_independent_member_losses(family):
    eta, target = make(family)
    eta.requires_grad_()
    got = modular_loss(eta, target, 0.0, family=family)
    expected = independent_losses(eta, target, family).mean()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(
        torch.autograd.grad(got, eta)[0], torch.autograd.grad(expected, eta)[0]
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_lam1_is_the_nll_of_the_mean(family):
    eta, target = make(family)
    eta.requires_grad_()
    got = modular_loss(eta, target, 1.0, family=family)
    expected = independent_losses(eta.mean(0, keepdim=True), target, family)[0]
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(
        torch.autograd.grad(got, eta)[0], torch.autograd.grad(expected, eta)[0]
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_gradcheck(family, reduction):
    eta, target = make(family, m=3, n=4, k=3)
    eta.requires_grad_()
    assert gradcheck(
        lambda e: modular_loss(e, target, 0.7, family=family, reduction=reduction), (eta,)
    )


@pytest.mark.parametrize("lam", (0.0, 1.0))
def test_gradcheck_categorical_edges(lam):
    for m in (1, 2):
        eta, target = make("categorical", m=m, n=3, k=4)
        eta.requires_grad_()
        assert gradcheck(lambda e, t=target: modular_loss(e, t, lam, reduction="sum"), (eta,))


# --------------------------------------------------------------------------- Theorem 1


def theorem1_sequence(family, target, ls, m=3, k=K):
    """H^l of the proof of Theorem 1: eta_1 = u_l, eta_2 = M v_l - u_l, the rest 0, the same
    for every example, with A(v_l) - v_l . mu -> inf and the same for u_l, faster."""
    n = target.shape[0]
    for l in ls:
        if family == "categorical":
            c = int(target[0])  # a class with mu_c > 0
            v = -l * F.one_hot(torch.tensor(c), k).double()
            u = -(l**2) * F.one_hot(torch.tensor(c), k).double()
        elif family == "gaussian":
            v, u = torch.full((k,), float(l)), torch.full((k,), float(l**2))
        else:
            v, u = torch.full((k,), float(l)), torch.full((k,), 2.0 * l)
        eta = torch.zeros(m, k, dtype=torch.float64)
        eta[0], eta[1] = u, m * v - u
        yield eta.unsqueeze(1).expand(m, n, k)


@pytest.mark.parametrize(
    ("family", "ls"),
    [
        ("categorical", (4, 8, 16, 32, 64)),
        ("gaussian", (2, 4, 8, 16, 32)),
        ("poisson", (2, 4, 6, 8, 10)),
    ],
)
def test_theorem1_lam_above_one_is_unbounded_below(family, ls):
    _, target = make(family, n=8)
    ensemble, above, at_most_one = [], [], {0.5: [], 1.0: []}
    for eta in theorem1_sequence(family, target, ls):
        _, parts = modular_loss(eta, target, 1.0, family=family, return_parts=True)
        ensemble.append(parts.ensemble.item())
        # The API refuses lam > 1, so L_lam comes from the parts via Eq. (6).
        above.append((parts.members - 1.5 * parts.ambiguity).item())
        for lam, values in at_most_one.items():
            values.append(modular_loss(eta, target, lam, family=family).item())
    ensemble, above = np.array(ensemble), np.array(above)
    assert (np.diff(ensemble) > 0).all()  # the ensemble NLL grows ...
    assert (np.diff(above) < 0).all()  # ... while the lam = 1.5 loss falls,
    assert above[-1] < -10 * ensemble[-1]  # and faster than the NLL grows: no lower bound
    for values in at_most_one.values():
        values = np.array(values)
        assert (values >= ensemble - 1e-9).all()  # L_lam >= NLL(eta_bar) for lam <= 1
        assert (np.diff(values) > 0).all()


# --------------------------------------------------------------------------- categorical path


def naive_categorical(eta, target, lam):
    """Per-example loss with log_softmax over the last dimension (float64 reference)."""
    m, n, _ = eta.shape
    member = -F.log_softmax(eta, -1).gather(2, target.view(1, n, 1).expand(m, n, 1))
    ensemble = F.cross_entropy(eta.mean(0), target, reduction="none")
    return lam * ensemble + (1 - lam) * member.squeeze(2).mean(0)


def test_categorical_float32_at_paper_scale_matches_float64():
    g = torch.Generator().manual_seed(0)
    eta = (3 * torch.randn(256, 100, 10, generator=g)).requires_grad_()
    target = torch.randint(0, 10, (100,), generator=g)
    loss = modular_loss(eta, target, 0.95)
    (grad,) = torch.autograd.grad(loss, eta)
    eta64 = eta.detach().double().requires_grad_()
    ref = naive_categorical(eta64, target, 0.95).mean()
    (ref_grad,) = torch.autograd.grad(ref, eta64)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-10)


def test_categorical_is_stable_for_extreme_logits():
    eta, target = make("categorical", dtype=torch.float32)
    # Logits of 1e4 and members offset by +-1e3: exp would overflow without max shifts.
    eta = eta * 1e4 + torch.tensor([-1e3, 0.0, 1e3, 2e3]).view(M, 1, 1)
    eta.requires_grad_()
    loss, parts = modular_loss(eta, target, 0.5, reduction="none", return_parts=True)
    (grad,) = torch.autograd.grad(loss.sum(), eta)
    eta64 = eta.detach().double().requires_grad_()
    ref = naive_categorical(eta64, target, 0.5)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-2)
    torch.testing.assert_close(grad.double(), torch.autograd.grad(ref.sum(), eta64)[0])
    assert torch.isfinite(parts.ambiguity).all()


def test_single_member_is_cross_entropy_with_no_ambiguity():
    eta, target = make("categorical", m=1)
    eta.requires_grad_()
    for lam in LAMS:
        loss, parts = modular_loss(eta, target, lam, return_parts=True)
        expected = F.cross_entropy(eta[0], target)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(
            torch.autograd.grad(loss, eta)[0], torch.autograd.grad(expected, eta)[0]
        )
        assert parts.ambiguity.item() == 0.0


def test_non_contiguous_eta_gives_the_same_loss_and_gradient():
    eta, target = make("categorical")
    strided = eta.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not strided.is_contiguous()
    dense = eta.clone().requires_grad_()
    loss_s, loss_d = modular_loss(strided, target, 0.8), modular_loss(dense, target, 0.8)
    torch.testing.assert_close(loss_s, loss_d)
    torch.testing.assert_close(
        torch.autograd.grad(loss_s, strided)[0], torch.autograd.grad(loss_d, dense)[0]
    )


def test_loss_and_softmax_is_the_loss_and_the_softmax_of_members_and_ensemble():
    eta, target = make("categorical", m=5, n=7, k=4, dtype=torch.float32)
    eta = (eta * 30).requires_grad_()  # confident: some numerators clamped to exp(LOG_TINY)
    loss, softmax = modular_loss_and_softmax(eta, target, 0.7)
    ref = modular_loss(eta, target, 0.7)
    assert torch.equal(loss, ref)
    assert torch.equal(torch.autograd.grad(loss, eta)[0], torch.autograd.grad(ref, eta)[0])
    logits = torch.cat([eta, eta.mean(0, keepdim=True)]).detach().permute(2, 0, 1)  # (K, M+1, N)
    torch.testing.assert_close(softmax.shifted, logits - logits.amax(0))
    assert (softmax.shifted.amax(0) == 0).all()
    assert (softmax.shifted < LOG_TINY).any()
    assert torch.equal(softmax.numerators, softmax.shifted.clamp(min=LOG_TINY).exp())
    torch.testing.assert_close(softmax.total, softmax.numerators.sum(0))
    torch.testing.assert_close(softmax.numerators / softmax.total, logits.softmax(0))
    assert modular_loss_and_softmax(eta[:1], target, 0.7)[1] is None  # cross_entropy
    gaussian, values = make("gaussian")
    assert modular_loss_and_softmax(gaussian, values, 0.7, family="gaussian")[1] is None


def test_bfloat16_logits_are_reduced_in_float32():
    eta, target = make("categorical", dtype=torch.float32)
    low = eta.bfloat16().requires_grad_()
    loss = modular_loss(low, target, 0.9)
    (grad,) = torch.autograd.grad(loss, low)
    assert loss.dtype == grad.dtype == torch.bfloat16
    eta32 = low.detach().float().requires_grad_()
    ref = modular_loss(eta32, target, 0.9)
    torch.testing.assert_close(loss.float(), ref, rtol=1e-2, atol=0)
    torch.testing.assert_close(
        grad.float(), torch.autograd.grad(ref, eta32)[0], rtol=2e-2, atol=1e-4
    )


def test_categorical_gradient_is_not_silently_differentiated_twice():
    eta, target = make("categorical")
    eta.requires_grad_()
    weight = torch.ones((), dtype=torch.float64, requires_grad=True)
    loss = modular_loss(eta, target, 0.5)
    (grad,) = torch.autograd.grad(loss, eta, weight, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_matches_cpu(family):
    eta, target = make(family, m=8, n=16, k=5)
    eta.requires_grad_()
    cpu = modular_loss(eta, target, 0.8, family=family)
    gpu_eta = eta.detach().cuda().requires_grad_()
    gpu = modular_loss(gpu_eta, target.cuda(), 0.8, family=family)
    torch.testing.assert_close(gpu.cpu(), cpu)
    torch.testing.assert_close(
        torch.autograd.grad(gpu, gpu_eta)[0].cpu(), torch.autograd.grad(cpu, eta)[0]
    )


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("family", FAMILIES)
def test_member_nll_matches_distributions(family):
    eta, target = make(family)
    expected = torch.stack([ref_nll(e, target, family) for e in eta])
    torch.testing.assert_close(member_nll(eta, target, family), expected)


@pytest.mark.parametrize("family", ("gaussian", "poisson"))
def test_single_output_target_may_drop_its_last_dimension(family):
    eta, target = make(family, k=1)
    for fn in (
        lambda t: modular_loss(eta, t, 0.6, family=family, reduction="none"),
        lambda t: member_nll(eta, t, family),
    ):
        torch.testing.assert_close(fn(target[:, 0]), fn(target))


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_is_the_mean_of_the_normalised_geometric_mean(family):
    eta, _ = make(family)
    assert torch.equal(combine(eta), eta.mean(0))
    got = predict(eta, family)
    if family == "categorical":
        # Eq. (2): Z^-1 prod_j q_j^(1/M)
        probs = mean_of(eta, family)
        geo = torch.prod(probs ** (1 / M), dim=0)
        expected = geo / geo.sum(-1, keepdim=True)
    elif family == "gaussian":
        expected = sum(eta) / M  # arithmetic mean of the member means
    else:
        expected = torch.prod(eta.exp() ** (1 / M), dim=0)  # geometric mean of the rates
    torch.testing.assert_close(got, expected)


def test_module_is_the_functional():
    for family in FAMILIES:
        eta, target = make(family)
        for reduction in REDUCTIONS:
            criterion = ModularLoss(0.4, family=family, reduction=reduction)
            expected = modular_loss(eta, target, 0.4, family=family, reduction=reduction)
            torch.testing.assert_close(criterion(eta, target), expected)
    assert repr(ModularLoss(0.9)) == "ModularLoss(lam=0.9, family='categorical', reduction='mean')"


def test_lam_may_be_an_int_a_numpy_scalar_or_a_one_element_tensor():
    eta, target = make("categorical")
    expected = modular_loss(eta, target, 0.25)
    for lam in (np.float32(0.25), torch.tensor(0.25), torch.tensor([0.25])):
        torch.testing.assert_close(modular_loss(eta, target, lam), expected)
    torch.testing.assert_close(modular_loss(eta, target, 1), modular_loss(eta, target, 1.0))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("lam", "message"),
    [
        (1.5, r"lam must be in \[0, 1\], got 1.5: .*unbounded below.*Theorem 1"),
        (1.0000001, r"Theorem 1"),
        (-0.1, r"lam must be in \[0, 1\], got -0.1"),
        (float("nan"), r"lam must be a finite number in \[0, 1\], got nan"),
        (float("inf"), r"finite.*got inf"),
        (True, r"lam must be a real number in \[0, 1\], got bool True"),
        ("0.5", r"got str '0.5'"),
        (0.5j, r"got complex"),
        (None, r"got NoneType"),
        (torch.tensor([0.1, 0.2]), r"lam must be a single number, got a tensor of shape \(2,\)"),
        (torch.tensor(True), r"torch.bool"),
        (torch.tensor(2.0), r"Theorem 1"),
    ],
)
def test_bad_lam_is_refused(lam, message):
    eta, target = make("categorical")
    with pytest.raises(ValueError, match=message):
        modular_loss(eta, target, lam)
    with pytest.raises(ValueError, match=message):
        ModularLoss(lam)


@pytest.mark.parametrize(
    ("eta", "message"),
    [
        (torch.zeros(6, 3), r"eta must have shape \(M, N, K\).*got 2-d shape \(6, 3\)"),
        (torch.zeros(2, 2, 6, 3), r"got 4-d shape"),
        (torch.zeros(0, 6, 3), r"eta has no members: shape \(0, 6, 3\) has M = 0"),
        (torch.zeros(2, 6, 0), r"eta has no outputs"),
        (torch.zeros(2, 6, 3, dtype=torch.int64), r"floating-point.*torch.int64"),
        ([[[0.0]]], r"eta must be a tensor.*got list"),
    ],
)
def test_bad_eta_is_refused(eta, message):
    target = torch.zeros(6, dtype=torch.int64)
    for call in (
        lambda: modular_loss(eta, target, 0.5),
        lambda: member_nll(eta, target),
        lambda: combine(eta),
        lambda: predict(eta),
    ):
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize(
    ("family", "target", "message"),
    [
        ("categorical", torch.zeros(6), r"int64 class indices.*got dtype torch.float32"),
        ("categorical", torch.zeros(6, dtype=torch.int32), r"int64.*torch.int32"),
        ("categorical", torch.zeros(7, dtype=torch.int64), r"shape \(N,\) = \(6,\).*got \(7,\)"),
        ("categorical", torch.zeros(6, 1, dtype=torch.int64), r"got \(6, 1\)"),
        (
            "categorical",
            torch.tensor([0, 1, 2, 3, 0, 1]),
            r"outside \[0, K\) = \[0, 3\): min 0, max 3",
        ),
        ("categorical", torch.tensor([0, -1, 2, 1, 0, 1]), r"outside .*min -1, max 2"),
        ("gaussian", torch.zeros(6, 4), r"shape \(N, K\) = \(6, 3\).*got \(6, 4\)"),
        ("gaussian", torch.zeros(6), r"shape \(N, K\) = \(6, 3\) to match.*got \(6,\)"),
        ("poisson", torch.zeros(6, 3, dtype=torch.bool), r"real values.*torch.bool"),
        ("poisson", [0.0] * 6, r"target must be a tensor, got list"),
    ],
)
def test_bad_target_is_refused(family, target, message):
    eta = torch.zeros(2, 6, 3)
    with pytest.raises(ValueError, match=message):
        modular_loss(eta, target, 0.5, family=family)
    with pytest.raises(ValueError, match=message):
        member_nll(eta, target, family)


def test_unknown_family_or_reduction_is_refused():
    eta, target = make("categorical")
    families = r"family must be one of \('categorical', 'gaussian', 'poisson'\), got 'bernoulli'"
    reductions = r"reduction must be one of \('none', 'mean', 'sum'\), got 'max'"
    with pytest.raises(ValueError, match=families):
        modular_loss(eta, target, 0.5, family="bernoulli")
    with pytest.raises(ValueError, match=families):
        ModularLoss(0.5, family="bernoulli")
    with pytest.raises(ValueError, match=families):
        predict(eta, "bernoulli")
    with pytest.raises(ValueError, match=families):
        member_nll(eta, target, "bernoulli")
    with pytest.raises(ValueError, match=reductions):
        modular_loss(eta, target, 0.5, reduction="max")
    with pytest.raises(ValueError, match=reductions):
        ModularLoss(0.5, reduction="max")
