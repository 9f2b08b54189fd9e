"""Time one SGD step of a pack of G runs (:mod:`modloss.pack`) against G unpacked steps of
the same runs, as ratios measured in the same run; with ``--table2``, whole epochs of
``fit`` and ``fit_pack`` and the paper's full Table 2 grid estimated from them.

The packed and unpacked repetitions are interleaved and the median is reported, so a slow
spell of a shared machine hits both alike. On the CPU the clock is this process's CPU time,
on one thread by default (a CPU shared with other jobs); on CUDA it is wall time after a
synchronize.

    python benchmarks/bench_pack.py                       # every paper MLP, G in 1 2 7
    python benchmarks/bench_pack.py --quick               # fewer repetitions
    python benchmarks/bench_pack.py --device cuda --compile
    python benchmarks/bench_pack.py --table2 --device cuda

Prints a markdown table (``speed-up`` = G unpacked steps / one packed step), then JSON lines.
The ``--table2`` table times the second epoch (the first warms up) of ``fit`` of one λ and of
``fit_pack`` of Table 2's seven λ on full Fashion-MNIST (``$MODLOSS_DATA_DIR``; 500 steps,
10,000 validation and 10,000 test images, every metric and the best-epoch bookkeeping, no
files written), and estimates the full grid (4 MLPs x 7 λ x 5 trials x 200 epochs) as
20 packs x 200 packed epochs, against 140 runs x 200 unpacked epochs one after another.
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from modloss.pack import PackedSGD, PackedStrategy
from modloss.strategies import SingleDevice
from modloss.train import TrainConfig, build_model, build_optimizer, fit, fit_pack, paper_lr

MODELS = ("1-M-1024-H", "16-M-64-H", "64-M-16-H", "256-M-4-H")
GROUPS = (1, 2, 7)
BATCH = 100  # the paper's batch size
LAMS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0)  # a lambda sweep: the points of a pack
TABLE2_TRIALS, TABLE2_EPOCHS = 5, 200  # the paper's Table 2 protocol


def _configs(model: str, groups: int) -> list[TrainConfig]:
    return [TrainConfig(model=model, lam=LAMS[g], lr=0.01 * (g + 1)) for g in range(groups)]


def _unpacked(configs: list[TrainConfig], x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """G runs stepped one after another as ``fit`` steps each: the loss and the batch's
    training metrics (what a packed step also does, per group)."""
    runs = []
    for config in configs:
        model = build_model(config)
        run = SingleDevice()
        model = run.prepare(model, x.device, family="categorical", lam=config.lam, num_classes=10)
        runs.append((run, build_optimizer(config, model)[0]))
        run.start_epoch()

    def step() -> None:
        for run, optimizer in runs:
            loss = run.step_loss(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


def _packed(
    configs: list[TrainConfig], x: torch.Tensor, y: torch.Tensor, *, compiled: bool = False
) -> Callable[[], None]:
    models = [build_model(c) for c in configs]
    shadows = [build_optimizer(c, m)[0] for c, m in zip(configs, models, strict=True)]
    run = PackedStrategy()
    lams = [c.lam for c in configs]
    pack = run.prepare_pack(models, x.device, family="categorical", lams=lams, num_classes=10)
    optimizer = PackedSGD(pack.parameters(), shadows, models[0].num_members)
    if compiled:  # the packed forward only: the loss and metrics stay eager
        run.net = torch.compile(pack)
    run.start_epoch()

    def step() -> None:
        loss = run.step_loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _seconds(step: Callable[[], None], steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        tic = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - tic) / steps
    tic = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - tic) / steps


def _epoch_seconds(configs: list[TrainConfig]) -> float:
    """The second epoch's wall time of ``fit`` (one config) or ``fit_pack`` (several)."""
    results = [fit(configs[0])] if len(configs) == 1 else fit_pack(configs)
    return max(r.history[-1].seconds for r in results)  # one pass: equal within a pack


def table2(device: str, subset: int | None) -> None:
    """Whole epochs of fit and fit_pack, and the full Table 2 grid estimated from them."""
    rows, hours = [], {"packed": 0.0, "unpacked": 0.0}
    for model in MODELS:
        configs = [
            TrainConfig(
                model=model,
                lam=lam,
                lr=paper_lr(model, lam),
                epochs=2,
                device=device,
                subset=subset,
            )
            for lam in LAMS
        ]
        unpacked = _epoch_seconds(configs[:1])  # one λ: the rates do not depend on λ
        packed = _epoch_seconds(configs)
        runs = TABLE2_TRIALS * TABLE2_EPOCHS
        hours["unpacked"] += runs * len(LAMS) * unpacked / 3600
        hours["packed"] += runs * packed / 3600
        rows.append(
            {
                "model": model,
                "unpacked_epoch_s": unpacked,
                "packed_epoch_s": packed,
                "throughput_ratio": len(LAMS) * unpacked / packed,
            }
        )
    where = device if subset is None else f"{device}, subset {subset}"
    print(f"Table 2 ({where}): second-epoch wall time, 7 λ per pack\n")
    print("| model | unpacked epoch s | packed epoch s (7 λ) | throughput packed ÷ unpacked |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['unpacked_epoch_s']:.3f} | {r['packed_epoch_s']:.3f} "
            f"| {r['throughput_ratio']:.2f}x |"
        )
    print(
        f"\nfull Table 2 grid (140 runs x {TABLE2_EPOCHS} epochs), estimated: "
        f"packed {60 * hours['packed']:.1f} min, unpacked {60 * hours['unpacked']:.1f} min "
        "(one run at a time)\n"
    )
    for r in rows:
        print(json.dumps(r))
    print(json.dumps({"table2_minutes": {k: 60 * v for k, v in hours.items()}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--compile", action="store_true", help="torch.compile the packed forward")
    parser.add_argument("--table2", action="store_true", help="epochs and the Table 2 estimate")
    parser.add_argument("--subset", type=int, help="with --table2: training images (a check)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.table2:
        table2(args.device, args.subset)
        return
    device = torch.device(args.device)
    reps, steps = (5, 2) if args.quick else (11, 4)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, 784, generator=gen), torch.randint(10, (BATCH,), generator=gen)
    x, y = x.to(device), y.to(device)
    rows = []
    for model in MODELS:
        for groups in GROUPS:
            configs = _configs(model, groups)
            cases = {
                "packed": _packed(configs, x, y, compiled=args.compile),
                "unpacked": _unpacked(configs, x, y),
            }
            for step in cases.values():
                _seconds(step, 2, device)  # warm-up (and compilation)
            times: dict[str, list[float]] = {name: [] for name in cases}
            for rep in range(reps):
                order = list(cases) if rep % 2 == 0 else list(cases)[::-1]
                for name in order:
                    times[name].append(_seconds(cases[name], steps, device))
            packed, unpacked = (statistics.median(times[n]) for n in ("packed", "unpacked"))
            rows.append(
                {
                    "model": model,
                    "groups": groups,
                    "packed_ms": 1e3 * packed,
                    "unpacked_ms": 1e3 * unpacked,
                    "speedup": unpacked / packed,
                }
            )
    clock = "wall time" if device.type == "cuda" else f"{args.threads} thread(s), process CPU time"
    compiled = ", packed forward compiled" if args.compile else ""
    print(f"{args.device}, {clock}, batch {BATCH}{compiled}, median of {reps}\n")
    print("| model | G | packed step ms | G unpacked steps ms | speed-up |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['groups']} | {r['packed_ms']:.2f} | {r['unpacked_ms']:.2f} "
            f"| {r['speedup']:.2f}x |"
        )
    print()
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
