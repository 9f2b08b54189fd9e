"""The batched layers against per-member loops of ordinary PyTorch layers (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modloss.layers import (
    EnsembleBatchNorm2d,
    EnsembleConv2d,
    EnsembleLinear,
    SharedInputConv2d,
    SharedInputLinear,
)

M, N = 3, 5
SUBSET = torch.tensor([2, 0])  # out of order: outputs follow the given order


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Small kernels on cores shared with other processes: OpenMP threads waiting on each
    # other made DenseNet steps 10-100x slower than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("members", [None, SUBSET])
def test_ensemble_linear_is_a_loop_of_linears(bias, members):
    layer = EnsembleLinear(M, 4, 6, bias=bias).double()
    chosen = range(M) if members is None else members.tolist()
    x = torch.randn(len(chosen), N, 4, dtype=torch.float64)
    expected = torch.stack(
        [
            F.linear(x[i], layer.weight[j].T, None if layer.bias is None else layer.bias[j])
            for i, j in enumerate(chosen)
        ]
    )
    torch.testing.assert_close(layer(x, members), expected)


@pytest.mark.parametrize("members", [None, SUBSET])
def test_shared_input_linear_is_a_loop_of_linears_on_one_input(members):
    layer = SharedInputLinear(M, 4, 6).double()
    chosen = range(M) if members is None else members.tolist()
    x = torch.randn(N, 4, dtype=torch.float64)
    expected = torch.stack([F.linear(x, layer.weight[j], layer.bias[j]) for j in chosen])
    torch.testing.assert_close(layer(x, members), expected)


@pytest.mark.parametrize("members", [None, SUBSET])
@pytest.mark.parametrize(("stride", "padding"), [(1, 0), (2, 1)])
def test_ensemble_conv_is_a_loop_of_convs(members, stride, padding):
    layer = EnsembleConv2d(M, 2, 4, 3, stride=stride, padding=padding).double()
    chosen = range(M) if members is None else members.tolist()
    x = torch.randn(N, len(chosen) * 2, 7, 7, dtype=torch.float64)
    per_member = x.view(N, len(chosen), 2, 7, 7)
    expected = torch.cat(
        [
            F.conv2d(per_member[:, i], layer.weight[j], layer.bias[j], stride, padding)
            for i, j in enumerate(chosen)
        ],
        dim=1,
    )
    torch.testing.assert_close(layer(x, members), expected)


@pytest.mark.parametrize("members", [None, SUBSET])
def test_shared_input_conv_is_a_loop_of_convs_on_one_input(members):
    layer = SharedInputConv2d(M, 2, 4, 3, padding=1, bias=False).double()
    chosen = range(M) if members is None else members.tolist()
    x = torch.randn(N, 2, 6, 6, dtype=torch.float64)
    expected = torch.cat([F.conv2d(x, layer.weight[j], padding=1) for j in chosen], dim=1)
    torch.testing.assert_close(layer(x, members), expected)


def _reference_bns(layer: EnsembleBatchNorm2d) -> list[nn.BatchNorm2d]:
    """One nn.BatchNorm2d per member, holding that member's parameters and statistics."""
    bns = []
    for j in range(layer.num_members):
        bn = nn.BatchNorm2d(layer.num_features).double()
        with torch.no_grad():
            bn.weight.copy_(layer.weight[j])
            bn.bias.copy_(layer.bias[j])
            bn.running_mean.copy_(layer.running_mean[j])
            bn.running_var.copy_(layer.running_var[j])
        bns.append(bn)
    return bns


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("members", [None, SUBSET])
def test_ensemble_batch_norm_is_per_member_batch_norm(training, members):
    layer = EnsembleBatchNorm2d(M, 4).double()
    with torch.no_grad():  # distinct members, so a mix-up between them shows
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.normal_()
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    bns = _reference_bns(layer)
    layer.train(training)
    chosen = range(M) if members is None else members.tolist()
    x = torch.randn(N, len(chosen) * 4, 3, 3, dtype=torch.float64) * 3 + 1
    per_member = x.view(N, len(chosen), 4, 3, 3)
    expected = torch.cat(
        [bns[j].train(training)(per_member[:, i]) for i, j in enumerate(chosen)], dim=1
    )
    torch.testing.assert_close(layer(x, members), expected)
    # Running statistics: the selected members' move like their own BatchNorm2d's, the
    # others' stay where they were.
    for j in range(M):
        torch.testing.assert_close(layer.running_mean[j], bns[j].running_mean)
        torch.testing.assert_close(layer.running_var[j], bns[j].running_var)


def test_selected_members_backpropagate_into_their_own_slices_only():
    layers = [
        EnsembleLinear(M, 3, 2),
        SharedInputLinear(M, 3, 2),
        EnsembleConv2d(M, 2, 2, 3, padding=1),
        EnsembleBatchNorm2d(M, 2),
    ]
    inputs = [
        torch.randn(2, N, 3),
        torch.randn(N, 3),
        torch.randn(N, 4, 4, 4),
        torch.randn(N, 4, 4, 4),
    ]
    for layer, x in zip(layers, inputs, strict=True):
        layer.double()
        x = x.double().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, layer=layer: layer(x, SUBSET[:2]), (x,))
        layer.zero_grad()
        out = layer(x, SUBSET[:2])
        (out * torch.randn_like(out)).sum().backward()
        for name, p in layer.named_parameters():
            assert p.grad[1].abs().max() == 0, f"{type(layer).__name__}.{name}: member 1"
            assert p.grad[0].abs().max() > 0 and p.grad[2].abs().max() > 0, name


@pytest.mark.parametrize(
    ("layer", "fan_in"),
    [
        (EnsembleLinear(256, 4, 10), 4),
        (SharedInputLinear(64, 784, 16), 784),
        (EnsembleConv2d(10, 32, 64, 3), 32 * 9),
        (SharedInputConv2d(10, 3, 32, 3), 27),
    ],
    ids=["linear", "shared-linear", "conv", "shared-conv"],
)
def test_default_init_uses_one_members_fan_in(layer, fan_in):
    # nn.Linear / nn.Conv2d of one member: U(-1/sqrt(fan_in), 1/sqrt(fan_in)). A fan-in of
    # the whole batched layer (M times larger) would shrink the bound by sqrt(M).
    bound = 1 / math.sqrt(fan_in)
    for p in (layer.weight, layer.bias):
        assert p.abs().max() <= bound
        assert p.abs().max() > 0.9 * bound


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: EnsembleLinear(0, 3, 2), "num_members"),
        (lambda: SharedInputLinear(2, 3, -1), "out_features"),
        (lambda: EnsembleConv2d(2, 3, 4, 3, padding=-1), "padding"),
        (lambda: EnsembleConv2d(2, 3, 4, 0), "kernel_size"),
        (lambda: EnsembleBatchNorm2d(2, True), "num_features"),
    ],
)
def test_bad_arguments_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("members", [None, SUBSET])
@pytest.mark.parametrize("shared", [False, True])
def test_conv_forward_each_is_forward_member_by_member(members, shared):
    cls = SharedInputConv2d if shared else EnsembleConv2d
    layer = cls(M, 2, 4, 3, stride=2, padding=1).double()
    m = M if members is None else len(members)
    x = torch.randn(N, 2 if shared else m * 2, 7, 7, dtype=torch.float64)
    xs = [x] * m if shared else list(x.view(N, m, 2, 7, 7).unbind(1))
    expected = layer(x, members)
    torch.testing.assert_close(torch.cat(layer.forward_each(xs, members), dim=1), expected)
