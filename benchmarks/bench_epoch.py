"""Where an epoch of the paper's Fashion-MNIST MLPs goes: SGD steps, training metrics,
evaluation forward, evaluation metrics and the checkpoint write, as ratios measured in the
same run.

The epoch follows ``modloss.train.fit``: 500 SGD steps of batch 100 over the 50,000 training
images, :class:`modloss.metrics.EpochMetrics` updated from each step's own forward output
and the softmax its loss computed (``modular_loss_and_softmax``), then an eval-mode forward
over validation and test (10,000 each, batches of 1,000) with their metrics, then
``torch.save`` of the model and optimizer state. Each part is timed on
its own. The baseline is "plain SGD steps + evaluation forward", the work an epoch cannot
skip: the same 500 steps with ``modular_loss``, which keeps no softmax, on a second copy of
the model, each plain step timed right after the epoch's step (keeping the softmax costs the
loss a fresh buffer, counted in the epoch's "sgd"). The goal
is ``epoch / baseline <= 1.25`` with every metric included. Repetitions of the
models are interleaved and the median of each part is reported, so a slow spell of a shared
machine hits every model alike. Speed is never asserted in tests.

    python benchmarks/bench_epoch.py                          # 1 thread, 3 repetitions
    python benchmarks/bench_epoch.py --threads 2 --clock cpu  # CPU time (a shared machine)
    python benchmarks/bench_epoch.py --models 256-M-4-H --repeats 1
    PYTHONPATH=/path/to/other/checkout python benchmarks/bench_epoch.py   # compare code

Prints the modloss it measured, a markdown table (seconds, and each part / baseline), then
the same rows as JSON lines.
"""

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

import modloss
from modloss.data import DeviceLoader, load_splits
from modloss.losses import modular_loss, modular_loss_and_softmax
from modloss.metrics import EpochMetrics

MODELS = ("1-M-1024-H", "16-M-64-H", "64-M-16-H", "256-M-4-H")
LAM = 0.95  # any lam in (0, 1) costs the same; the paper's best 256-M-4-H setting
LR = 0.01  # small enough that no model diverges during the measured epochs
BATCH, EVAL_BATCH = 100, 1000
GOAL = 1.25
PARTS = ("sgd", "train_metrics", "eval_forward", "eval_metrics", "checkpoint")


def _timed(clock: Callable[[], float], sync: Callable[[], None]) -> Callable:
    def time_it(f: Callable[[], object]) -> tuple[object, float]:
        sync()
        start = clock()
        out = f()
        sync()
        return out, clock() - start

    return time_it


def _start(name: str, splits, device: str) -> tuple:
    model = modloss.create_model(name, seed=0).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    generator = torch.Generator(device=device).manual_seed(0)
    return model, optimizer, DeviceLoader(*splits.train, BATCH, shuffle=True, generator=generator)


def epoch(name: str, splits, device: str, clock, steps: int | None, folder: Path) -> dict:
    """Seconds of each part of one epoch of model ``name``, and of its plain SGD steps."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    time_it = _timed(clock, sync)
    model, optimizer, loader = _start(name, splits, device)
    plain_model, plain_optimizer, _ = _start(name, splits, device)
    seconds = dict.fromkeys((*PARTS, "plain_sgd"), 0.0)

    model.train()
    plain_model.train()
    metrics = EpochMetrics("categorical", LAM)
    for i, (x, y) in enumerate(loader):
        if steps is not None and i == steps:
            break

        def forward(x=x, y=y):
            eta = model(x)  # (M, B, K)
            return eta, *modular_loss_and_softmax(eta, y, LAM)

        def backward(loss, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def plain_step(x=x, y=y):
            backward(modular_loss(plain_model(x), y, LAM), plain_optimizer)

        # As in fit (Strategy.step_loss): the metrics read the loss's softmax between the
        # forward and the backward pass.
        (eta, loss, softmax), spent = time_it(forward)
        seconds["sgd"] += spent
        update = partial(metrics.update, eta.detach(), y, softmax=softmax)
        seconds["train_metrics"] += time_it(update)[1]
        seconds["sgd"] += time_it(partial(backward, loss))[1]
        seconds["plain_sgd"] += time_it(plain_step)[1]  # interleaved: a slow spell hits both
    seconds["train_metrics"] += time_it(metrics.compute)[1]

    model.eval()
    with torch.no_grad():
        for x, y in (splits.val, splits.test):
            metrics = EpochMetrics("categorical", LAM)
            for start in range(0, len(x), EVAL_BATCH):
                batch = slice(start, start + EVAL_BATCH)
                eta, spent = time_it(partial(model, x[batch]))
                seconds["eval_forward"] += spent
                seconds["eval_metrics"] += time_it(partial(metrics.update, eta, y[batch]))[1]
            seconds["eval_metrics"] += time_it(metrics.compute)[1]

    def save() -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        torch.save(state, folder / "checkpoint.pt")

    seconds["checkpoint"] = time_it(save)[1]
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="epochs per model (median)")
    parser.add_argument("--steps", type=int, default=None, help="SGD steps (default: 500)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--data-dir", default=None, help="default: $MODLOSS_DATA_DIR")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: perf_counter (default); cpu: this process's CPU time, for a machine "
        "shared with other jobs (with --threads 1; it leaves out the checkpoint's disk wait)",
    )
    args = parser.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU work only")
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    splits = load_splits("fashion-mnist", data_dir=args.data_dir, device=args.device)

    times: dict[str, list[dict]] = {name: [] for name in args.models}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:  # warm-up: allocator, kernels, page cache
            epoch(name, splits, args.device, clock, 5, Path(folder))
        for _ in range(args.repeats):
            for name in args.models:
                times[name].append(
                    epoch(name, splits, args.device, clock, args.steps, Path(folder))
                )

    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU, torch.set_num_threads({args.threads})"
    )
    steps = args.steps or len(splits.train.y) // BATCH
    print(
        f"modloss from {Path(modloss.__file__).parent}; torch {torch.__version__}, {device}, "
        f"{args.clock} clock, median of {args.repeats}; {steps} steps, "
        f"eval {len(splits.val.y)} + {len(splits.test.y)}; "
        "ratio = part / baseline, baseline = plain_sgd + eval_forward\n"
    )
    header = ["model", *PARTS, "epoch", "plain_sgd", "baseline", "epoch/baseline", f"<= {GOAL}"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    for name in args.models:
        part = {p: statistics.median(t[p] for t in times[name]) for p in (*PARTS, "plain_sgd")}
        base = part["plain_sgd"] + part["eval_forward"]
        total = sum(part[p] for p in PARTS)
        cells = [f"{part[p]:.3f} s ({part[p] / base:.2f})" for p in PARTS]
        ok = "yes" if total / base <= GOAL else "NO"
        print(
            f"| {name} | " + " | ".join(cells) + f" | {total:.3f} s | {part['plain_sgd']:.3f} s "
            f"| {base:.3f} s | "
            f"{total / base:.2f} | {ok} |"
        )
        rows.append(dict(model=name, seconds=part, baseline=base, ratio=total / base))
    print()
    for row in rows:
        print(json.dumps(dict(row, device=args.device, threads=args.threads, clock=args.clock)))


if __name__ == "__main__":
    main()
