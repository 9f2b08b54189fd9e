"""Time one SGD training step (forward, modular loss, backward, momentum update) of the
batched ensembles against the obvious alternatives, as ratios measured in the same run.

Repetitions of the cases being compared are interleaved and the median is reported, so a
slow spell of a shared machine hits every case alike. Speed is never asserted in tests.

    python benchmarks/bench_step.py                  # CPU, full run (a few minutes)
    python benchmarks/bench_step.py --quick          # fewer repetitions, small batches
    python benchmarks/bench_step.py --threads 1 --clock cpu   # CPU shared with other jobs
    python benchmarks/bench_step.py --device cuda

Prints a markdown table (``ratio`` = this row's step time / the ``vs`` row's step time),
then the same rows as JSON lines.
"""

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

import modloss
from modloss.models import EnsembleDenseNet

LAM = 0.95  # any lam in (0, 1) costs the same; the paper's best 256-M-4-H setting
LR = 0.01


@dataclass
class Case:
    model: str
    implementation: str
    batch: int
    step: Callable[[], None]
    vs: str | None = None  # key of the row this one is compared with
    goal: str = ""

    @property
    def key(self) -> str:
        return f"{self.model} / {self.implementation}"


def _trainer(
    params: Iterable[Tensor], forward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor
) -> Callable[[], None]:
    """One SGD step of ``forward`` on the batch ``(x, y)`` under the modular loss."""
    optimizer = torch.optim.SGD(list(params), lr=LR, momentum=0.9)

    def step() -> None:
        loss = modloss.modular_loss(forward(x), y, LAM)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _batch(shape: tuple[int, ...], batch: int, classes: int, device: str) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=generator)
    y = torch.randint(0, classes, (batch,), generator=generator)
    return x.to(device), y.to(device)


def _modloss_case(name: str, batch: int, shape: tuple[int, ...], device: str, **kw) -> Case:
    model = modloss.create_model(name, seed=0).to(device)
    x, y = _batch(shape, batch, model.num_classes, device)
    return Case(name, "modloss", batch, _trainer(model.parameters(), model, x, y), **kw)


def _mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def mlp_cases(batch: int, device: str) -> list[Case]:
    base = "1-M-1024-H / modloss"
    cases = [
        _modloss_case("1-M-1024-H", batch, (784,), device),
        _modloss_case("16-M-64-H", batch, (784,), device, vs=base),
        _modloss_case("64-M-16-H", batch, (784,), device, vs=base, goal="<= 1.1"),
        _modloss_case("256-M-4-H", batch, (784,), device, vs=base, goal="<= 1.3"),
    ]
    m, h = 256, 4
    x, y = _batch((784,), batch, 10, device)
    torch.manual_seed(0)
    members = nn.ModuleList(_mlp(h) for _ in range(m)).to(device)

    def loop(x: Tensor) -> Tensor:
        return torch.stack([member(x) for member in members])  # (M, N, K)

    params, buffers = stack_module_state(list(members))
    template = copy.deepcopy(members[0]).to("meta")

    def one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(template, (p, b), (x,))

    batched = vmap(one, in_dims=(0, 0, None))

    # The paper's code: (M, in, out) weights; the input broadcasts over members in matmul.
    w1 = torch.stack([mlp[0].weight.T for mlp in members]).detach().requires_grad_()
    b1 = torch.stack([mlp[0].bias[None] for mlp in members]).detach().requires_grad_()
    w2 = torch.stack([mlp[2].weight.T for mlp in members]).detach().requires_grad_()
    b2 = torch.stack([mlp[2].bias[None] for mlp in members]).detach().requires_grad_()

    def broadcast(x: Tensor) -> Tensor:
        return torch.matmul(F.relu(torch.matmul(x, w1) + b1), w2) + b2  # (M, N, K)

    name = f"{m}-M-{h}-H"
    cases += [
        Case(name, "Python loop over members", batch, _trainer(members.parameters(), loop, x, y)),
        Case(
            name,
            "torch.func.vmap",
            batch,
            _trainer(params.values(), lambda x: batched(params, buffers, x), x, y),
        ),
        Case(
            name,
            "broadcast matmul (paper's code)",
            batch,
            _trainer([w1, b1, w2, b2], broadcast, x, y),
        ),
    ]
    for case in cases[4:]:
        case.vs = base
    return cases


def _cnn(channels=(32, 64, 64, 128, 128), strides=(1, 2, 1, 2, 1)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out, stride in zip((3, *channels[:-1]), channels, strides, strict=True):
        layers += [nn.Conv2d(c_in, c_out, 3, stride), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def cnn_cases(batch: int, device: str) -> list[Case]:
    ours = _modloss_case("CNN-10", batch, (3, 32, 32), device)
    x, y = _batch((3, 32, 32), batch, 10, device)
    torch.manual_seed(0)
    # Channels-last, as ours: oneDNN's CPU convolutions are faster in it (~15% on this step).
    members = nn.ModuleList(_cnn() for _ in range(10)).to(device, memory_format=torch.channels_last)

    def loop(x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return torch.stack([member(x) for member in members])  # (M, N, K)

    step = _trainer(members.parameters(), loop, x, y)
    return [ours, Case("CNN-10", "loop over 10 CNNs", batch, step, vs=ours.key, goal=">= 4")]


def densenet_cases(batch: int, device: str) -> list[Case]:
    ours = _modloss_case("DN-64-6-16", batch, (3, 32, 32), device)
    x, y = _batch((3, 32, 32), batch, 100, device)
    members = nn.ModuleList(
        EnsembleDenseNet(1, depth=64, growth_rate=6, seed=j) for j in range(16)
    ).to(device)

    def loop(x: Tensor) -> Tensor:
        return torch.cat([member(x) for member in members])  # (M, N, K)

    step = _trainer(members.parameters(), loop, x, y)
    return [ours, Case("DN-64-6-16", "loop over 16 DenseNets", batch, step, vs=ours.key)]


def measure(
    cases: list[Case], reps: int, device: str, clock: Callable[[], float]
) -> dict[str, float]:
    """Median seconds per step of each case, repetitions interleaved across cases."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {case.key: [] for case in cases}
    for case in cases:  # warm-up: allocator, kernel selection, optimizer state
        case.step()
        case.step()
    for _ in range(reps):
        for case in cases:
            sync()
            start = clock()
            case.step()
            sync()
            times[case.key].append(clock() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="few repetitions, small batches")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=("mlp", "cnn", "densenet"),
        default=("mlp", "cnn", "densenet"),
        help="groups of cases to run (default: all)",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time, for a machine shared with other "
        "jobs (use with --threads 1, where it is not inflated by threads waiting on each other)",
    )
    args = parser.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU steps only")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    # (cases, repetitions); CPU DenseNet and CNN steps take seconds, hence smaller batches.
    quick = args.quick
    dn_batch = 64 if cuda else (4 if quick else 16)
    # (cases, repetitions); CPU CNN and DenseNet steps take seconds, hence smaller batches.
    groups = {
        "mlp": lambda: (mlp_cases(100, args.device), 20 if quick else 200),
        "cnn": lambda: (cnn_cases(20 if quick else 100, args.device), 3 if quick else 9),
        "densenet": lambda: (densenet_cases(dn_batch, args.device), 3 if quick else 7),
    }
    rows = []
    for group in args.only:
        cases, reps = groups[group]()
        seconds = measure(cases, reps, args.device, clock)
        for case in cases:
            ms = seconds[case.key] * 1e3
            ratio = seconds[case.key] / seconds[case.vs] if case.vs else None
            rows.append(
                dict(
                    model=case.model,
                    implementation=case.implementation,
                    batch=case.batch,
                    ms=round(ms, 3),
                    vs=case.vs,
                    ratio=None if ratio is None else round(ratio, 3),
                    goal=case.goal,
                    reps=reps,
                )
            )
    device = torch.cuda.get_device_name() if cuda else f"CPU, torch.set_num_threads({args.threads})"
    print(
        f"torch {torch.__version__}, {device}, {args.clock} clock, lam {LAM}, "
        "median of interleaved repetitions\n"
    )
    print("| model | implementation | batch | ms / step | vs | ratio | goal |")
    print("| --- | --- | ---: | ---: | --- | ---: | --- |")
    for row in rows:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
        print(
            f"| {row['model']} | {row['implementation']} | {row['batch']} | {row['ms']:.2f} "
            f"| {row['vs'] or ''} | {ratio} | {row['goal']} |"
        )
    print()
    for row in rows:
        print(json.dumps(dict(row, device=args.device, threads=args.threads, clock=args.clock)))


if __name__ == "__main__":
    main()
