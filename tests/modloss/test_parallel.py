"""modloss.parallel: module-parallel (section 3.3) and data-parallel training on two gloo
processes give the gradients and SGD steps of single-process training, and module
parallelism communicates B x K floats per step.

One ``torch.multiprocessing`` spawn runs every distributed scenario (process start-up is the
expensive part); each rank saves what it computed and the tests compare it with the same
computation done here in one process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from modloss.data import DeviceLoader
from modloss.losses import FAMILIES, modular_loss
from modloss.models import EnsembleDenseNet, EnsembleMLP
from modloss.parallel import (
    Communicator,
    count_ddp_traffic,
    ddp_floats_per_step,
    load_member_slice,
    member_shard,
    member_shards,
    merge_member_states,
    module_parallel_floats_per_step,
    module_parallel_loss,
    shard_batch,
    sharded_batches,
)

WORLD = 2
LAM = 0.7
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 1e-4
STEPS = 3
B, K = 4, 10  # batch size, classes
N = 10  # DDP examples: batches of 4, 4, 2 exercise uneven shards
ATOL = 1e-5


def _densenet(num_members: int = 4) -> EnsembleDenseNet:
    return EnsembleDenseNet(num_members, depth=10, growth_rate=4, num_classes=K, seed=0)


def _mlp(num_members: int = 3) -> EnsembleMLP:
    return EnsembleMLP(num_members, hidden=8, in_features=12, num_classes=K, seed=0)


def _images(steps: int = STEPS) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(B, 3, 8, 8, generator=g), torch.randint(0, K, (B,), generator=g))
        for _ in range(steps)
    ]


def _vectors() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(N, 12, generator=g), torch.randint(0, K, (N,), generator=g)


def _module_scenario(name: str) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """DenseNet: 4 members over 2 ranks, 3 steps; MLP: 3 members (uneven shards), 1 step."""
    if name == "mp_densenet":
        return _densenet(), _images()
    x, y = _vectors()
    return _mlp(), [(x[:B], y[:B])]


def _loader(x: Tensor, y: Tensor) -> DeviceLoader:
    return DeviceLoader(x, y, B, shuffle=True, generator=torch.Generator().manual_seed(3))


def _sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


# --- what each rank runs ------------------------------------------------------------------


def _module_parallel(full: nn.Module, batches: list[tuple[Tensor, Tensor]], rank: int) -> dict:
    """Train this rank's member shard with module_parallel_loss for len(batches) steps."""
    shard = member_shard(full.num_members, WORLD, rank)
    model = type(full)(**{**full.config, "num_members": len(shard)}, seed=1)
    load_member_slice(model, full.state_dict(), shard)
    optimizer = _sgd(model)
    comm = Communicator()
    out: dict = {"floats": [], "calls": []}
    for step, (x, y) in enumerate(batches):
        comm.reset()
        loss = module_parallel_loss(model(x), y, LAM, num_members=full.num_members, comm=comm)
        out["floats"].append(comm.floats)
        out["calls"].append(comm.calls)
        optimizer.zero_grad()
        loss.objective.backward()
        if step == 0:
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
            out["eta_bar"] = loss.eta_bar
        optimizer.step()
    out["state"] = model.state_dict()
    with torch.no_grad():
        out["gathered_eta"] = comm.all_gather(model.eval()(batches[0][0]))  # (M, B, K)
    return out


def _data_parallel(model: nn.Module, x: Tensor, y: Tensor, rank: int) -> dict:
    """One epoch of DDP over this rank's slices of the shared loader's batches."""
    ddp = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
    comm = Communicator()
    count_ddp_traffic(ddp, comm)
    optimizer = _sgd(ddp)
    floats = []
    for xs, ys, weight in sharded_batches(_loader(x, y), rank, WORLD):
        comm.reset()
        loss = modular_loss(ddp(xs), ys, LAM) * weight
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        floats.append(comm.floats)
    return {"state": model.state_dict(), "floats": floats}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, y = _vectors()
        results = {
            "mp_densenet": _module_parallel(*_module_scenario("mp_densenet"), rank),
            "mp_mlp": _module_parallel(*_module_scenario("mp_mlp"), rank),
            "ddp_mlp": _data_parallel(_mlp(), x, y, rank),
            "ddp_densenet": _data_parallel(_densenet(), *_stacked_images(), rank),
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _stacked_images() -> tuple[Tensor, Tensor]:
    batches = _images()
    return torch.cat([b[0] for b in batches])[:N], torch.cat([b[1] for b in batches])[:N]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("parallel")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# --- the single-process references ----------------------------------------------------------


def _single_module_run(full: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> dict:
    optimizer = _sgd(full)
    out: dict = {}
    for step, (x, y) in enumerate(batches):
        eta = full(x)
        loss = modular_loss(eta, y, LAM)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            out["grads"] = {n: p.grad.clone() for n, p in full.named_parameters()}
            out["eta_bar"] = eta.detach().mean(0)
        optimizer.step()
    out["state"] = full.state_dict()
    with torch.no_grad():
        out["eta"] = full.eval()(batches[0][0])
    return out


def _single_data_run(model: nn.Module, x: Tensor, y: Tensor, *, ghost: bool = False) -> dict:
    """SGD over the shared loader's batches; with ``ghost``, each batch's loss is computed
    slice by slice as the ranks do (BatchNorm sees one slice at a time)."""
    optimizer = _sgd(model)
    for xb, yb in _loader(x, y):
        optimizer.zero_grad()
        if ghost:
            for rank in range(WORLD):
                xs, ys, weight = shard_batch(xb, yb, rank, WORLD)
                (modular_loss(model(xs), ys, LAM) * weight / WORLD).backward()
        else:
            modular_loss(model(xb), yb, LAM).backward()
        optimizer.step()
    return model.state_dict()


def _max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# --- module parallelism ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mp_densenet", "mp_mlp"])
def test_module_parallel_member_gradients_equal_single_device(ranks, name):
    full, batches = _module_scenario(name)
    reference = _single_module_run(full, batches)
    shards = member_shards(full.num_members, WORLD)
    for rank, shard in enumerate(shards):
        got = ranks[rank][name]["grads"]
        for param, grad in got.items():
            want = reference["grads"][param][shard.start : shard.stop]
            torch.testing.assert_close(grad, want, atol=ATOL, rtol=0, msg=f"{rank} {param}")
        torch.testing.assert_close(
            ranks[rank][name]["eta_bar"], reference["eta_bar"], atol=ATOL, rtol=0
        )


@pytest.mark.parametrize("name", ["mp_densenet", "mp_mlp"])
def test_module_parallel_sgd_steps_equal_single_device(ranks, name):
    """Momentum, weight decay and per-member BatchNorm statistics included: after the steps
    the merged shards are the single-process model, and gathering the shards' outputs
    gives the full ensemble's (M, B, K)."""
    full, batches = _module_scenario(name)
    reference = _single_module_run(full, batches)
    merged = merge_member_states([r[name]["state"] for r in ranks])
    assert _max_diff(merged, reference["state"]) < ATOL
    for r in ranks:
        torch.testing.assert_close(r[name]["gathered_eta"], reference["eta"], atol=ATOL, rtol=0)


def test_module_parallel_communicates_b_times_k_floats_per_step(ranks):
    """One all-reduce of B x K floats per step, against DDP's one float per parameter."""
    for r in ranks:
        assert r["mp_densenet"]["floats"] == [B * K] * STEPS
        assert r["mp_densenet"]["calls"] == [1] * STEPS
        assert r["mp_densenet"]["floats"][0] == module_parallel_floats_per_step(B, K)
        params = ddp_floats_per_step(_densenet())
        assert r["ddp_densenet"]["floats"] == [params] * len(r["ddp_densenet"]["floats"])
        assert params > 100 * B * K


# --- data parallelism -----------------------------------------------------------------------


def test_ddp_with_sharded_loader_equals_single_process_mlp(ranks):
    """Without BatchNorm, DDP over per-rank slices of the shared shuffled batches (uneven:
    4, 4, 2 examples split 2/2, 2/2, 1/1) is single-process SGD."""
    reference = _single_data_run(_mlp(), *_vectors())
    for r in ranks:
        assert _max_diff(r["ddp_mlp"]["state"], reference) < ATOL


def test_ddp_densenet_equals_single_process_with_batchnorm_per_shard(ranks):
    """In train mode each rank normalises with its own slice's statistics, so DDP is exactly
    single-process training whose BatchNorm sees each 1/W slice of a batch separately
    ("ghost" batch norm): equal to it, and measurably different from full-batch BatchNorm
    at these tiny slices (use module parallelism for exact full-batch statistics)."""
    ghost = _single_data_run(_densenet(), *_stacked_images(), ghost=True)
    plain = _single_data_run(_densenet(), *_stacked_images())
    params = [name for name, _ in _densenet().named_parameters()]
    for r in ranks:
        got = r["ddp_densenet"]["state"]
        assert max((got[k] - ghost[k]).abs().max().item() for k in params) < ATOL
        assert max((got[k] - plain[k]).abs().max().item() for k in params) > 100 * ATOL


# --- single-process properties --------------------------------------------------------------


class _SimulatedComm(Communicator):
    """A rank of a simulated group: all_reduce adds the other ranks' (known) sums."""

    def __init__(self, others: Tensor) -> None:
        super().__init__()
        self.others = others

    def all_reduce(self, tensor: Tensor) -> Tensor:
        self.floats += tensor.numel()
        return tensor.add_(self.others)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_module_parallel_loss_gradient_is_eq8(family, lam):
    """Per shard, autograd of the local objective gives Eq. 8 for the shard's members,
    for every family, in float64: (1/M)(y_hat_j - y - lam (y_hat_j - y_bar)) / B."""
    m, n, k = 5, 6, 3
    g = torch.Generator().manual_seed(0)
    eta = torch.randn(m, n, k, generator=g, dtype=torch.float64)
    if family == "categorical":
        target = torch.randint(0, k, (n,), generator=g)
        y = nn.functional.one_hot(target, k).double()
        inverse_link = lambda e: e.softmax(-1)  # noqa: E731
    elif family == "gaussian":
        target = y = torch.randn(n, k, generator=g, dtype=torch.float64)
        inverse_link = lambda e: e  # noqa: E731
    else:
        target = y = torch.poisson(torch.full((n, k), 2.0, dtype=torch.float64), generator=g)
        inverse_link = torch.exp
    y_hat, y_bar = inverse_link(eta), inverse_link(eta.mean(0))
    eq8 = (y_hat - y - lam * (y_hat - y_bar)) / (m * n)
    full = eta.clone().requires_grad_()
    modular_loss(full, target, lam, family=family).backward()
    torch.testing.assert_close(full.grad, eq8)
    for shard in member_shards(m, 2):
        local = eta[shard.start : shard.stop].clone().requires_grad_()
        others = eta.sum(0) - local.detach().sum(0)
        comm = _SimulatedComm(others)
        out = module_parallel_loss(local, target, lam, num_members=m, comm=comm, family=family)
        out.objective.backward()
        torch.testing.assert_close(local.grad, eq8[shard.start : shard.stop])
        torch.testing.assert_close(out.eta_bar, eta.mean(0))
        assert comm.floats == n * k


def test_member_shards_split_contiguously_and_evenly():
    assert member_shards(16, 4) == [range(0, 4), range(4, 8), range(8, 12), range(12, 16)]
    assert member_shards(5, 2) == [range(0, 3), range(3, 5)]
    with pytest.raises(ValueError, match="num_members"):
        member_shards(2, 3)


def test_load_member_slice_gives_the_selected_members_outputs_and_merge_inverts_it():
    full = _densenet().train()
    x = _images(1)[0][0]
    shards = member_shards(4, 2)
    parts = []
    for shard in shards:
        part = load_member_slice(_densenet(len(shard)), full.state_dict(), shard)
        torch.testing.assert_close(part(x), full(x, members=list(shard)))
        parts.append(part.state_dict())
    assert _max_diff(merge_member_states(parts), full.state_dict()) == 0


def test_shard_batch_weights_make_uneven_shards_average_to_the_batch_mean():
    x = torch.arange(5.0)
    pieces = [shard_batch(x, x, r, 2) for r in range(2)]
    assert [p[0].tolist() for p in pieces] == [[0.0, 1.0], [2.0, 3.0, 4.0]]
    # DDP averages the ranks' gradients: (sum_r weight_r * mean_r) / W is the batch mean.
    assert sum(w * xs.mean() for xs, _, w in pieces) / 2 == pytest.approx(x.mean().item())
