"""Loader overhead as a share of a Fashion-MNIST 1-M-1024-H training epoch (goal: <= 5%).

Baseline, measured in the same run: the same number of SGD steps on one pre-sliced batch, so
that the difference is what `DeviceLoader` (shuffle + per-batch gather) adds. Also reported:
the loader iterated alone, the batched CIFAR crop+flip per epoch, and the costs of loading the
dataset (MD5 cold vs cached, full `load_splits`).

    .venv/bin/python benchmarks/bench_loader.py [--repeats 3] [--device cpu]
"""

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

import modloss.data._files as files_module
from modloss import create_model
from modloss.data import DeviceLoader, load_splits, random_crop_flip

BATCH_SIZE = 100  # the paper's Fashion-MNIST recipe
LR, MOMENTUM = 0.02, 0.9  # the 1-M-1024-H preset
GOAL = 0.05
CHUNK = 25  # steps per timed chunk
DATA_DIR = Path(os.environ.get("MODLOSS_DATA_DIR") or Path(__file__).parents[2] / "shared/data")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[..., object], device: torch.device, *args: object) -> float:
    _sync(device)
    start = time.perf_counter()
    fn(*args)
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="training epochs measured")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    rows: list[tuple[str, str]] = []
    images = DATA_DIR / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    files_module._md5_memo.clear()
    cold = _timed(lambda: files_module._hash_file(images), device)
    files_module._file_md5(images)
    cached = _timed(lambda: files_module._file_md5(images), device)
    rows += [
        (f"MD5 of {images.name} ({images.stat().st_size / 1e6:.0f} MB), hashed", f"{cold:.3f} s"),
        ("MD5 of the same file, cached (path, size, mtime)", f"{cached * 1e6:.0f} us"),
    ]
    load_s = _timed(lambda: load_splits("fashion-mnist", data_dir=DATA_DIR, device=device), device)
    splits = load_splits("fashion-mnist", data_dir=DATA_DIR, device=device)
    rows.append(("load_splits('fashion-mnist'), MD5s cached", f"{load_s:.2f} s"))

    model = create_model("1-M-1024-H", seed=0).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        # With one member the modular loss is plain cross-entropy, whatever lam.
        F.cross_entropy(model(x).mean(0), y).backward()
        opt.step()

    g = torch.Generator(device=device).manual_seed(0)
    loader = DeviceLoader(*splits.train, BATCH_SIZE, shuffle=True, generator=g)
    fixed = (splits.train.x[:BATCH_SIZE].clone(), splits.train.y[:BATCH_SIZE].clone())

    def loader_alone() -> None:
        for _ in loader:
            pass

    cifar = torch.randn(BATCH_SIZE, 3, 32, 32, device=device)

    def augment_epoch() -> None:  # a CIFAR epoch: 50,000 / 100 batches
        for _ in range(500):
            random_crop_flip(cifar, g)

    for _ in range(CHUNK):  # warm-up: allocator, kernels, momentum buffers
        step(*fixed)

    # Chunks of loader steps alternate with chunks of fixed-batch steps, and the paired
    # differences are compared: on a shared machine, bursts of load last seconds and move
    # whole-epoch timings by tens of percent, but hit both halves of a pair alike.
    def steps(batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for _ in range(CHUNK):
            step(*next(batches))

    pairs: list[tuple[float, float]] = []
    epochs, alone, augment = [], [], []
    for _ in range(args.repeats):
        shuffled, same = iter(loader), itertools.repeat(fixed)
        epoch_s = 0.0
        for k in range(len(loader) // CHUNK):
            if k % 2:  # alternate which half goes first, so slow drifts cancel
                f_s = _timed(steps, device, same)
                l_s = _timed(steps, device, shuffled)
            else:
                l_s = _timed(steps, device, shuffled)
                f_s = _timed(steps, device, same)
            pairs.append((l_s, f_s))
            epoch_s += l_s
        epochs.append(epoch_s)
        alone.append(_timed(loader_alone, device))
        augment.append(_timed(augment_epoch, device))
    chunk_s = statistics.median(l_s for l_s, _ in pairs)
    share = statistics.median(l_s - f_s for l_s, f_s in pairs) / chunk_s
    epoch_s = min(epochs)
    rows += [
        (f"epoch with DeviceLoader ({len(loader)} steps, shuffled)", f"{epoch_s:.2f} s (best)"),
        (f"{CHUNK} steps: loader / pre-sliced batch", f"{chunk_s:.3f} s (median)"),
        (
            "loader overhead share (median paired difference)",
            f"{share:+.1%} (goal <= {GOAL:.0%})",
        ),
        ("loader iterated alone / epoch", f"{min(alone) / epoch_s:.2%}"),
        ("CIFAR crop+flip, 500 batches of 100", f"{min(augment) * 1e3:.0f} ms"),
    ]
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.repeats} epochs, {len(pairs)} chunk pairs\n")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
