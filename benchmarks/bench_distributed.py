"""Distributed training of the ensembles: module parallelism (the paper's section 3.3)
against data parallelism (DDP), as counts and ratios measured in the same run.

1. Floats each worker hands to collectives per SGD step, for DN-100-12-4 and DN-64-6-16
   (B = 64, K = 100): analytic (B x K for module parallelism, one per parameter for DDP)
   and measured by the counting communicator / DDP comm hook of ``modloss.parallel`` on one
   real step of each model on 2 gloo workers (8x8 inputs keep the CPU step short; neither
   count depends on the image size).
2. Step time on 2 CPU workers (gloo, one thread each): module-parallel and DDP steps of a
   small DenseNet ensemble against the same step in one single-threaded process.
3. With ``--device``: one device, the grouped DN-100-12-4 step against a loop over its
   members as separate models, and a short run on synthetic data in CIFAR-100's format
   (uint8 32x32 RGB, 100 classes, crop+flip augmentation on the device).

    python benchmarks/bench_distributed.py            # sections 1-2 (CPU, a few minutes)
    python benchmarks/bench_distributed.py --quick    # fewer repetitions
    python benchmarks/bench_distributed.py --device cuda   # adds section 3 on the GPU

Speed is never asserted in tests; on a shared machine read the ratios, not the times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from modloss.data import DeviceLoader, random_crop_flip
from modloss.losses import modular_loss
from modloss.models import EnsembleDenseNet, create_model
from modloss.parallel import (
    Communicator,
    count_ddp_traffic,
    ddp_floats_per_step,
    load_member_slice,
    member_shard,
    module_parallel_floats_per_step,
    module_parallel_loss,
    shard_batch,
)

WORLD = 2
BATCH, CLASSES = 64, 100  # the paper's CIFAR-100 recipe
PAPER_MODELS = ("DN-100-12-4", "DN-64-6-16")
LAM, LR, MOMENTUM, WEIGHT_DECAY = 0.5, 0.1, 0.9, 1e-4
# Section 2's small ensemble: 4 members of DenseNet-BC depth 16, k = 8, on 16x16 images.
SMALL = {"num_members": 4, "depth": 16, "growth_rate": 8, "num_classes": CLASSES}
SMALL_IMAGE, SMALL_BATCH = 16, 32
CIFAR_TRAIN = 50_000  # images per CIFAR-100 epoch, to extrapolate section 3's run


def _sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def _batch(n: int, size: int, seed: int = 0, device: str = "cpu") -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    return x.to(device), torch.randint(0, CLASSES, (n,), generator=g).to(device)


def _module_step(model: nn.Module, optimizer, comm: Communicator, num_members: int):
    def step(x: Tensor, y: Tensor) -> None:
        out = module_parallel_loss(model(x), y, LAM, num_members=num_members, comm=comm)
        optimizer.zero_grad(set_to_none=True)
        out.objective.backward()
        optimizer.step()

    return step


def _ddp_step(ddp: nn.Module, optimizer, rank: int):
    def step(x: Tensor, y: Tensor) -> None:
        xs, ys, weight = shard_batch(x, y, rank, WORLD)
        loss = modular_loss(ddp(xs), ys, LAM) * weight
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _shard_model(full: nn.Module, rank: int) -> nn.Module:
    members = member_shard(full.num_members, WORLD, rank)
    shard = type(full)(**{**full.config, "num_members": len(members)}, seed=0)
    return load_member_slice(shard, full.state_dict(), members)


def _median_time(step: Callable[[Tensor, Tensor], None], batch, reps: int) -> float:
    step(*batch)  # warm-up
    times = []
    for _ in range(reps):
        if dist.is_initialized():
            dist.barrier()  # both ranks start together: a step's time includes waiting
        tic = time.perf_counter()
        step(*batch)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def _worker(rank: int, init: str, out: str, reps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    try:
        counts = {}
        for name in PAPER_MODELS:
            full = create_model(name, seed=0)
            batch = _batch(BATCH, 8)
            comm = Communicator()
            shard = _shard_model(full, rank)
            _module_step(shard, _sgd(shard), comm, full.num_members)(*batch)
            ddp_comm = Communicator()
            ddp = nn.parallel.DistributedDataParallel(full, forward_sync_buffers=False)
            count_ddp_traffic(ddp, ddp_comm)
            _ddp_step(ddp, _sgd(ddp), rank)(*batch)
            counts[name] = {"module": comm.floats, "ddp": ddp_comm.floats}
        full = EnsembleDenseNet(**SMALL, seed=0)
        batch = _batch(SMALL_BATCH, SMALL_IMAGE)
        shard = _shard_model(full, rank)
        module_step = _module_step(shard, _sgd(shard), Communicator(), full.num_members)
        ddp = nn.parallel.DistributedDataParallel(full, forward_sync_buffers=False)
        ddp_step = _ddp_step(ddp, _sgd(ddp), rank)
        times = {"module": [], "ddp": []}
        for _ in range(3):  # interleaved, so a slow spell of the machine hits both
            times["module"].append(_median_time(module_step, batch, reps))
            times["ddp"].append(_median_time(ddp_step, batch, reps))
        result = {"counts": counts, "times": {k: statistics.median(v) for k, v in times.items()}}
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def two_workers(reps: int) -> dict:
    """Sections 1 and 2 on 2 gloo processes; rank 0's view (rank 1's counts are equal)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(f"{tmp}/init", tmp, reps), nprocs=WORLD, join=True)
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(WORLD)]
    assert ranks[0]["counts"] == ranks[1]["counts"]
    return ranks[0]


def single_process_time(reps: int) -> float:
    torch.set_num_threads(1)
    model = EnsembleDenseNet(**SMALL, seed=0)
    optimizer = _sgd(model)

    def step(x: Tensor, y: Tensor) -> None:
        loss = modular_loss(model(x), y, LAM)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    batch = _batch(SMALL_BATCH, SMALL_IMAGE)
    return statistics.median(_median_time(step, batch, reps) for _ in range(3))


# --- section 3: one device -------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_step_time(step: Callable[[], None], device: torch.device, reps: int) -> float:
    step()
    _sync(device)
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def grouped_vs_loop(device: torch.device, batch: int, reps: int) -> dict[str, float]:
    """DN-100-12-4: one grouped model against its members as separate models in a loop,
    the same modular loss over the stacked natural parameters."""
    model = create_model("DN-100-12-4", seed=0).to(device)
    members = nn.ModuleList(model.member(j) for j in range(model.num_members))
    x, y = _batch(batch, 32, device=str(device))
    grouped_opt, loop_opt = _sgd(model), _sgd(members)

    def grouped() -> None:
        loss = modular_loss(model(x), y, LAM)
        grouped_opt.zero_grad(set_to_none=True)
        loss.backward()
        grouped_opt.step()

    def loop() -> None:
        eta = torch.cat([m(x) for m in members])  # (M, B, K)
        loss = modular_loss(eta, y, LAM)
        loop_opt.zero_grad(set_to_none=True)
        loss.backward()
        loop_opt.step()

    times = {"grouped": [], "loop": []}
    for _ in range(3):
        times["grouped"].append(_device_step_time(grouped, device, reps))
        times["loop"].append(_device_step_time(loop, device, reps))
    return {k: statistics.median(v) for k, v in times.items()}


def cifar_format_run(device: torch.device, images: int, epochs: int) -> dict[str, float]:
    """A short DN-100-12-4 run on random uint8 32x32 RGB images with 100 classes, through
    the same on-device path as CIFAR-100 (normalise, shuffle, crop+flip, modular loss)."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=g)
    x = raw.to(device).float() / 255.0
    std, mean = torch.std_mean(x, dim=(0, 2, 3), keepdim=True)
    x = (x - mean) / std
    y = torch.randint(0, CLASSES, (images,), generator=g).to(device)
    model = create_model("DN-100-12-4", seed=0).to(device)
    optimizer = _sgd(model)
    loader = DeviceLoader(
        x,
        y,
        BATCH,
        shuffle=True,
        augment=random_crop_flip,
        generator=torch.Generator(device=device).manual_seed(1),
    )
    epoch_times, losses = [], []
    for _ in range(epochs):
        _sync(device)
        tic = time.perf_counter()
        total = torch.zeros((), device=device)
        for xb, yb in loader:
            loss = modular_loss(model(xb), yb, LAM)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach()
        _sync(device)
        epoch_times.append(time.perf_counter() - tic)
        losses.append(total.item() / len(loader))
    per_image = min(epoch_times) / images
    return {
        "epoch_seconds": min(epoch_times),
        "images_per_second": 1 / per_image,
        "cifar100_epoch_seconds": per_image * CIFAR_TRAIN,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--device", help="also run section 3 on this device (e.g. cuda)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    reps = 3 if args.quick else 10
    report: dict = {}

    measured = two_workers(reps)
    print(f"## Floats per worker per step (B={BATCH}, K={CLASSES}, {WORLD} workers)\n")
    print(
        "| model | params P | DDP analytic | DDP measured | module analytic "
        "| module measured | DDP / module |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    report["floats"] = {}
    for name in PAPER_MODELS:
        model = create_model(name, seed=0)
        ddp_analytic = ddp_floats_per_step(model)
        module_analytic = module_parallel_floats_per_step(BATCH, CLASSES)
        got = measured["counts"][name]
        print(
            f"| {name} | {ddp_analytic:,} | {ddp_analytic:,} | {got['ddp']:,} "
            f"| {module_analytic:,} | {got['module']:,} | {got['ddp'] / got['module']:.0f}x |"
        )
        report["floats"][name] = {
            "params": ddp_analytic,
            "ddp_analytic": ddp_analytic,
            "ddp_measured": got["ddp"],
            "module_analytic": module_analytic,
            "module_measured": got["module"],
        }

    single = single_process_time(reps)
    times = measured["times"]
    print(f"\n## Step time, {WORLD} CPU workers vs one process (1 thread each)\n")
    print(f"DenseNet-BC ensemble {SMALL}, batch {SMALL_BATCH}, {SMALL_IMAGE}x{SMALL_IMAGE}\n")
    print("| case | median step | ratio to one process |")
    print("| --- | ---: | ---: |")
    for case, t in (("one process", single), ("DDP", times["ddp"]), ("module", times["module"])):
        print(f"| {case} | {t * 1e3:.1f} ms | {t / single:.2f} |")
    report["step_seconds"] = {"single": single, **times}

    if args.device:
        device = torch.device(args.device)
        batch = 8 if args.quick and device.type == "cpu" else BATCH
        pair = grouped_vs_loop(device, batch, 2 if args.quick else 10)
        print(f"\n## DN-100-12-4 on one {device.type} device, batch {batch}\n")
        print("| case | median step | ratio to grouped |")
        print("| --- | ---: | ---: |")
        for case in ("grouped", "loop"):
            print(f"| {case} | {pair[case] * 1e3:.1f} ms | {pair[case] / pair['grouped']:.2f} |")
        images = 256 if args.quick else 5120
        run = cifar_format_run(device, images, 1 if args.quick else 2)
        print(f"\nCIFAR-100-format run, {images} synthetic images: {run}")
        report["device"] = {"name": str(device), "batch": batch, **pair, "run": run}

    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
