"""Time one SGD step of a pack of G runs (:mod:`modloss.pack`) against G unpacked steps of
the same runs, as ratios measured in the same run.

The packed and unpacked repetitions are interleaved and the median is reported, so a slow
spell of a shared machine hits both alike. The clock is this process's CPU time, on one
thread by default (a CPU shared with other jobs).

    python benchmarks/bench_pack.py              # every paper MLP, G in 1 2 7
    python benchmarks/bench_pack.py --quick      # fewer repetitions

Prints a markdown table (``speed-up`` = G unpacked steps / one packed step), then JSON lines.
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from modloss.losses import modular_loss
from modloss.pack import PackedSGD, PackedStrategy
from modloss.train import TrainConfig, build_model, build_optimizer

MODELS = ("1-M-1024-H", "16-M-64-H", "64-M-16-H", "256-M-4-H")
GROUPS = (1, 2, 7)
BATCH = 100  # the paper's batch size
LAMS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0)  # a lambda sweep: the points of a pack


def _configs(model: str, groups: int) -> list[TrainConfig]:
    return [TrainConfig(model=model, lam=LAMS[g], lr=0.01 * (g + 1)) for g in range(groups)]


def _unpacked(configs: list[TrainConfig], x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    runs = [(c, m, build_optimizer(c, m)[0]) for c in configs for m in [build_model(c)]]

    def step() -> None:
        for config, model, optimizer in runs:
            loss = modular_loss(model(x), y, config.lam)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


def _packed(configs: list[TrainConfig], x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    models = [build_model(c) for c in configs]
    shadows = [build_optimizer(c, m)[0] for c, m in zip(configs, models, strict=True)]
    run = PackedStrategy()
    lams = [c.lam for c in configs]
    pack = run.prepare_pack(
        models, torch.device("cpu"), family="categorical", lams=lams, num_classes=10
    )
    optimizer = PackedSGD(pack.parameters(), shadows, models[0].num_members)
    run.start_epoch()

    def step() -> None:
        loss = run.step_loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _seconds(step: Callable[[], None], steps: int) -> float:
    tic = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - tic) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reps, steps = (5, 2) if args.quick else (11, 4)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, 784, generator=gen), torch.randint(10, (BATCH,), generator=gen)
    rows = []
    for model in MODELS:
        for groups in GROUPS:
            configs = _configs(model, groups)
            cases = {"packed": _packed(configs, x, y), "unpacked": _unpacked(configs, x, y)}
            for step in cases.values():
                _seconds(step, 2)  # warm-up
            times: dict[str, list[float]] = {name: [] for name in cases}
            for rep in range(reps):
                order = list(cases) if rep % 2 == 0 else list(cases)[::-1]
                for name in order:
                    times[name].append(_seconds(cases[name], steps))
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
    print(f"CPU, {args.threads} thread(s), batch {BATCH}, process CPU time, median of {reps}\n")
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
