"""Dutt et al.'s coupled losses: 'LL' and 'SM' are independent training with the learning
rate divided by M, 'FC' is the modular loss at lam = 1 (the paper's appendix)."""

import pytest
import torch
import torch.nn.functional as F

from modloss.dutt import COUPLED_METHODS, coupled_loss
from modloss.losses import REDUCTIONS, modular_loss

M, N, D, K = 4, 8, 5, 3


def ensemble_data(seed=0):
    """A tiny ensemble of M linear classifiers: weights ``(M, D, K)``, inputs, targets."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(M, D, K, generator=g, dtype=torch.float64)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    target = torch.randint(0, K, (N,), generator=g)
    return weight, x, target


def logits(weight, x):
    return torch.einsum("nd,mdk->mnk", x, weight)  # (M, N, K)


def independent_loss(eta, target):
    """Each member trained on its own cross-entropy: the sum of the M member losses."""
    return sum(F.cross_entropy(e, target) for e in eta)


def grad_of(loss_fn, weight, x, target):
    weight = weight.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_fn(logits(weight, x), target), weight)
    return grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ll_and_sm_have_the_same_value_and_gradient(reduction):
    weight, x, target = ensemble_data()
    w_ll, w_sm = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    ll = coupled_loss(logits(w_ll, x), target, "LL", reduction=reduction)
    sm = coupled_loss(logits(w_sm, x), target, "SM", reduction=reduction)
    torch.testing.assert_close(ll, sm)
    grad_out = torch.randn(ll.shape, dtype=torch.float64)
    ll.backward(grad_out)
    sm.backward(grad_out)
    torch.testing.assert_close(w_ll.grad, w_sm.grad)


@pytest.mark.parametrize("method", ("LL", "SM"))
def test_independent_training_has_m_times_the_gradient(method):
    weight, x, target = ensemble_data()
    coupled = grad_of(lambda e, t: coupled_loss(e, t, method), weight, x, target)
    independent = grad_of(independent_loss, weight, x, target)
    torch.testing.assert_close(independent, M * coupled)
    # and each member's gradient involves only its own weights: members do not interact
    for j in range(M):
        alone = grad_of(
            lambda e, t, j=j: F.cross_entropy(e[j], t), weight, x, target
        )  # member j's own loss
        torch.testing.assert_close(coupled[j], alone[j] / M)


@pytest.mark.parametrize("method", ("LL", "SM"))
def test_sgd_with_ll_or_sm_is_independent_sgd_at_lr_over_m(method):
    weight, x, target = ensemble_data()
    coupled, independent = weight.clone(), weight.clone()
    lr = 0.5
    for _ in range(5):
        coupled -= lr * grad_of(lambda e, t: coupled_loss(e, t, method), coupled, x, target)
        independent -= (lr / M) * grad_of(independent_loss, independent, x, target)
    torch.testing.assert_close(coupled, independent)
    assert not torch.allclose(coupled, weight)  # the steps did move the weights


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fc_is_the_modular_loss_at_lam_1_and_ll_at_lam_0(reduction):
    weight, x, target = ensemble_data()
    for method, lam in (("FC", 1.0), ("LL", 0.0), ("SM", 0.0)):
        w_dutt, w_mod = weight.clone().requires_grad_(), weight.clone().requires_grad_()
        dutt = coupled_loss(logits(w_dutt, x), target, method, reduction=reduction)
        ours = modular_loss(logits(w_mod, x), target, lam, reduction=reduction)
        torch.testing.assert_close(dutt, ours)
        grad_out = torch.randn(ours.shape, dtype=torch.float64)
        dutt.backward(grad_out)
        ours.backward(grad_out)
        torch.testing.assert_close(w_dutt.grad, w_mod.grad)


def test_fc_couples_the_members():
    weight, x, target = ensemble_data()
    # Moving member 0 changes member 1's FC gradient, but not its LL gradient.
    moved = weight.clone()
    moved[0] += torch.randn(D, K, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for method, coupled in (("FC", True), ("LL", False)):
        before = grad_of(lambda e, t, m=method: coupled_loss(e, t, m), weight, x, target)
        after = grad_of(lambda e, t, m=method: coupled_loss(e, t, m), moved, x, target)
        assert torch.allclose(before[1], after[1]) is not coupled


def test_bad_arguments_are_refused():
    weight, x, target = ensemble_data()
    eta = logits(weight, x)
    with pytest.raises(ValueError, match=r"method must be one of \('LL', 'SM', 'FC'\), got 'll'"):
        coupled_loss(eta, target, "ll")
    with pytest.raises(ValueError, match=r"reduction must be one of .* got 'max'"):
        coupled_loss(eta, target, "FC", reduction="max")
    with pytest.raises(ValueError, match=r"eta must have shape \(M, N, K\)"):
        coupled_loss(eta[0], target, "LL")
    with pytest.raises(ValueError, match=r"target holds class indices outside \[0, K\)"):
        coupled_loss(eta, target + K, "SM")
    assert COUPLED_METHODS == ("LL", "SM", "FC")
