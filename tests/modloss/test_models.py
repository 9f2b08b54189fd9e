"""Every registered model, parametrised over the registry: a model is tested the moment it
is registered. Inputs are small (DenseNets at 8x8) to keep the suite fast."""

import copy
import math

import pytest
import torch
from torch import Tensor

import modloss
from modloss.layers import EnsembleBatchNorm2d, EnsembleConv2d
from modloss.models import (
    EnsembleCNN,
    EnsembleDenseNet,
    EnsembleMLP,
    EnsembleModel,
    create_model,
    list_models,
    num_members,
    register_model,
)

# Exact parameter counts. MLPs and CNN-10 are the counts of the paper's code; the DenseNets
# are bamos/densenet.pytorch's DenseNet-BC (bias-free convs) with a per-member linear head.
PARAMS = {
    "1-M-1024-H": 814_090,
    "16-M-64-H": 814_240,
    "64-M-16-H": 814_720,
    "256-M-4-H": 816_640,
    "CNN-10": 2_790_500,
    "DN-100-12-4": 3_200_128,
    "DN-82-8-8": 2_132_448,
    "DN-64-6-16": 1_685_056,
}

MODELS = list_models()


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


def _input(model: EnsembleModel, n: int = 2) -> Tensor:
    """A small batch the model accepts."""
    if isinstance(model, EnsembleMLP):
        return torch.randn(n, 1, 28, 28)  # flattened to 784 by the model
    if isinstance(model, EnsembleCNN):
        return torch.randn(n, 3, 32, 32)  # unpadded convs: 32 -> 3x3 final map
    if isinstance(model, EnsembleDenseNet):
        return torch.randn(n, 3, 8, 8)  # global pooling: any size >= 4
    raise AssertionError(f"add a small input for {type(model).__name__} to _input")


def _calibrate_batch_norm(model: EnsembleModel, x: Tensor) -> None:
    """Set running statistics to the batch statistics of ``x``, so that eval mode sees
    normalised activations (at init they would grow ~1000x through a DenseNet)."""
    bns = [m for m in model.modules() if isinstance(m, EnsembleBatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(x)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum


@pytest.fixture(scope="module", params=MODELS)
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(name) -> EnsembleModel:
    """Built once per name; tests that change it work on a deep copy."""
    return create_model(name, seed=0)


def test_registry_holds_the_papers_models():
    assert set(PARAMS) <= set(MODELS)
    assert list_models("DN-*") == ["DN-64-6-16", "DN-82-8-8", "DN-100-12-4"]
    assert list_models("*-H") == ["1-M-1024-H", "16-M-64-H", "64-M-16-H", "256-M-4-H"]
    assert modloss.create_model is create_model


def test_parameter_count(name, model):
    assert name in PARAMS, f"state the exact parameter count of {name} in PARAMS"
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_forward_returns_finite_member_natural_parameters(model):
    x = _input(model, n=3)
    eta = model.eval()(x)
    assert eta.shape == (model.num_members, 3, model.num_classes)
    assert eta.dtype == torch.float32
    assert torch.isfinite(eta).all()


def test_every_member_of_every_parameter_gets_a_gradient(model):
    model = model.train()
    model.zero_grad()
    eta = model(_input(model, n=8))
    (eta * torch.randn_like(eta)).sum().backward()
    for param_name, p in model.named_parameters():
        per_member = p.grad.flatten(1).abs().amax(1)  # (M,)
        assert (per_member > 0).all(), f"{param_name}: members {per_member.eq(0).nonzero()}"
    model.zero_grad(set_to_none=True)


def test_members_do_not_interact(model):
    """Member j's output moves only member j's parameters: no mixing across members."""
    if model.num_members == 1:
        pytest.skip("one member")
    model = model.train()
    model.zero_grad()
    j = model.num_members - 1
    eta = model(_input(model, n=4))
    (eta[j] * torch.randn_like(eta[j])).sum().backward()
    for param_name, p in model.named_parameters():
        others = torch.cat([p.grad[:j], p.grad[j + 1 :]])
        assert others.abs().max() == 0, param_name
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_member_equivalence(model, training):
    """Member j copied into a standalone one-member model computes what it computes inside
    the ensemble, and (in training) moves its batch-norm statistics the same way."""
    model = copy.deepcopy(model)
    x = _input(model)
    if training:
        model.train()
    else:
        _calibrate_batch_norm(model, x)
        model.eval()
    members = sorted({0, model.num_members // 2, model.num_members - 1})
    singles = [model.member(j) for j in members]
    with torch.no_grad():
        eta = model(x)
        for j, single in zip(members, singles, strict=True):
            assert single.num_members == 1 and single.training == training
            torch.testing.assert_close(single(x)[0], eta[j], rtol=1e-5, atol=1e-5)
    state = model.state_dict()
    for j, single in zip(members, singles, strict=True):
        for key, value in single.state_dict().items():
            torch.testing.assert_close(value[0], state[key][j], rtol=1e-5, atol=1e-6)


def test_member_subset_is_the_ensemble_of_those_members(model):
    """Dropping members removes exactly their contribution: the combined (mean, Eq. 3)
    natural parameter over a subset is the mean of those members' standalone outputs."""
    model = copy.deepcopy(model)
    x = _input(model)
    _calibrate_batch_norm(model, x)
    model.eval()
    m = model.num_members
    subset = [m - 1, 0] if m > 1 else [0]  # out of order: outputs follow the given order
    mask = torch.zeros(m, dtype=torch.bool)
    mask[subset] = True
    with torch.no_grad():
        full = model(x)
        eta = model(x, members=subset)
        standalone = torch.stack([model.member(j)(x)[0] for j in subset])
        masked = model(x, members=mask)
    assert eta.shape == (len(subset), 2, model.num_classes)
    torch.testing.assert_close(eta, full[subset], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eta.mean(0), standalone.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked, full[sorted(subset)], rtol=1e-5, atol=1e-5)


def test_training_a_subset_leaves_the_other_members_statistics(model):
    if not any(isinstance(m, EnsembleBatchNorm2d) for m in model.modules()):
        pytest.skip("no batch norm")
    model = copy.deepcopy(model).train()
    before = {k: v.clone() for k, v in model.named_buffers()}
    model(_input(model), members=[1])
    for key, value in model.named_buffers():
        torch.testing.assert_close(value[0], before[key][0], rtol=0, atol=0)
        assert not torch.equal(value[1], before[key][1]), key


def test_same_seed_same_weights_other_seed_other_weights(name):
    model, again, other = (create_model(name, seed=s) for s in (0, 0, 1))
    state, other_state = model.state_dict(), other.state_dict()
    for key, value in again.state_dict().items():
        assert torch.equal(value, state[key]), key
    first = next(k for k, v in model.named_parameters() if v.ndim > 2)
    for j in range(model.num_members):  # every member's first layer is re-drawn
        assert not torch.equal(state[first][j], other_state[first][j])


def test_member_init_does_not_depend_on_the_ensemble_size(name):
    """Member j's initial weights depend on (seed, j) only: a smaller ensemble built with
    the same seed holds the first members of a larger one."""
    model = create_model(name, seed=0)
    if model.num_members == 1:
        pytest.skip("one member")
    state = model.state_dict()
    for key, value in create_model(name, seed=0, num_members=2).state_dict().items():
        assert torch.equal(value, state[key][:2]), key


def test_seed_none_follows_the_global_rng_and_a_seed_leaves_it_alone():
    torch.manual_seed(3)
    a = create_model("16-M-64-H")
    torch.manual_seed(3)
    b = create_model("16-M-64-H")
    assert torch.equal(a.hidden.weight, b.hidden.weight)
    rng = torch.get_rng_state()
    create_model("16-M-64-H", seed=5)
    assert torch.equal(torch.get_rng_state(), rng)


def test_mlp_init_is_nn_linear_default_per_member():
    model = create_model("256-M-4-H", seed=0)
    # Bounds 1/sqrt(fan_in) of one member: 784 inputs, then 4 hidden units.
    assert math.isclose(model.hidden.weight.abs().max().item(), 1 / 28, rel_tol=1e-3)
    assert math.isclose(model.head.weight.abs().max().item(), 1 / 2, rel_tol=1e-2)


def test_densenet_init_is_he_fan_out_per_member():
    model = create_model("DN-64-6-16", seed=0)
    conv = model.blocks[0].conv2  # 3x3 convolution to k = 6 channels of each member
    assert isinstance(conv, EnsembleConv2d) and conv.weight.shape[1:] == (6, 24, 3, 3)
    std = conv.weight.std().item()
    assert math.isclose(std, math.sqrt(2 / (9 * 6)), rel_tol=0.05)
    bns = [m for m in model.modules() if isinstance(m, EnsembleBatchNorm2d)]
    assert all(bool((bn.weight == 1).all() and (bn.bias == 0).all()) for bn in bns)
    assert (model.head.bias == 0).all()
    assert model.head.weight.abs().max() <= 1 / math.sqrt(model.head.in_features)


@pytest.mark.parametrize("members", [None, [4, 1]])
def test_cnn_grouped_and_per_member_convolutions_agree(members):
    """The two paths of EnsembleCNN (grouped convolutions off CPU, a loop over members on
    CPU) give the same outputs and gradients, so CPU tests cover the other path too."""
    model = EnsembleCNN(5, channels=(4, 8), strides=(1, 2), seed=0).double()
    x = torch.randn(3, 3, 9, 9, dtype=torch.float64)
    results = []
    for grouped in (True, False):
        model.grouped_convs = grouped
        model.zero_grad(set_to_none=True)
        out = model(x, members)
        out.square().sum().backward()
        results.append((out, {k: p.grad for k, p in model.named_parameters()}))
    torch.testing.assert_close(results[0], results[1])


def test_overrides_and_generic_builders():
    model = create_model("256-M-4-H", seed=0, num_classes=3, in_features=20)
    assert model(torch.randn(5, 20)).shape == (256, 5, 3)
    cnn = EnsembleCNN(2, channels=(8, 16), strides=(1, 2), in_channels=1, num_classes=4)
    assert cnn(torch.randn(3, 1, 9, 9)).shape == (2, 3, 4)
    dn = EnsembleDenseNet(3, depth=10, growth_rate=4, in_channels=1, num_classes=5, seed=0)
    assert dn(torch.randn(2, 1, 8, 8)).shape == (3, 2, 5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: create_model("256-M-5-H"), "unknown model '256-M-5-H'"),
        (lambda: create_model("CNN-10", depth=3), r"unknown override\(s\) \['depth'\]"),
        (lambda: create_model("1-M-1024-H", seed=1.5), "seed"),
        (lambda: EnsembleDenseNet(2, depth=20, growth_rate=4), "depth must be 6 n"),
        (lambda: EnsembleCNN(2, channels=(8, 16), strides=(1,)), "equal length"),
        (lambda: EnsembleMLP(2, hidden=0), "hidden"),
        (lambda: register_model("CNN-10")(lambda **kw: None), "already registered"),
    ],
)
def test_bad_arguments_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([4], r"indices in \[0, 4\)"),
        ([-1], r"indices in \[0, 4\)"),
        ([1, 1], "repeat"),
        ([], "no member"),
        (torch.zeros(4, dtype=torch.bool), "no member"),
        (torch.ones(3, dtype=torch.bool), r"shape \(4,\)"),
        ([0.5], "1-D sequence"),
    ],
)
def test_bad_member_selections_are_refused(members, message):
    model = EnsembleMLP(4, hidden=2, in_features=3)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(2, 3), members=members)
    with pytest.raises(ValueError, match="j must be an int in"):
        model.member(4)


def test_num_members_is_the_built_models_member_count() -> None:
    for name in list_models():
        assert num_members(name) == create_model(name, seed=0).num_members, name
    assert num_members("256-M-4-H", num_members=3, hidden=2) == 3  # overrides apply
    assert num_members("256-M-4-H") == 256  # not the remembered overridden one
