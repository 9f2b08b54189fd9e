"""Forward + backward of the categorical modular loss: `modloss.modular_loss` against baselines.

Baselines, measured in the same run on the same tensors:

- naive: `F.log_softmax` over the last dimension + `gather` for the member NLLs, and
  `F.cross_entropy` of the mean logits, combined as `lam * ensemble + (1 - lam) * members`;
- logsumexp: plain autograd through `torch.logsumexp` over the last dimension.

The headline shape is (256, 100, 10): the 256-M-4-H ensemble on a Fashion-MNIST batch of 100.
Reported times are the median of `torch.utils.benchmark` blocked runs, best of `--repeats`. On
CPU they are the process's CPU time rather than wall time, which other processes on a shared
machine inflate far less; ratios are baseline / modloss.

    .venv/bin/python benchmarks/bench_loss.py [--device cpu] [--threads 1] [--repeats 5]
"""

import argparse
import time

import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark
from torch import Tensor

from modloss import modular_loss

LAM = 0.95
SHAPES = ((256, 100, 10), (64, 100, 10), (16, 100, 10), (1, 100, 10))


def naive_loss(eta: Tensor, target: Tensor, lam: float) -> Tensor:
    m, n, _ = eta.shape
    logp = F.log_softmax(eta, dim=-1)  # (M, N, K)
    members = -logp.gather(2, target.view(1, n, 1).expand(m, n, 1)).mean()
    return lam * F.cross_entropy(eta.mean(0), target) + (1 - lam) * members


def logsumexp_loss(eta: Tensor, target: Tensor, lam: float) -> Tensor:
    eta_bar = eta.mean(0)  # (N, K)
    target_logit = eta_bar.gather(1, target.unsqueeze(1)).squeeze(1)
    members = torch.logsumexp(eta, -1).mean(0) - target_logit
    ensemble = torch.logsumexp(eta_bar, -1) - target_logit
    return (lam * ensemble + (1 - lam) * members).mean()


def modloss_loss(eta: Tensor, target: Tensor, lam: float) -> Tensor:
    return modular_loss(eta, target, lam)


VARIANTS = {"modloss": modloss_loss, "naive": naive_loss, "logsumexp": logsumexp_loss}


def time_step(fn, eta: Tensor, target: Tensor, threads: int, repeats: int) -> float:
    """Seconds for one forward + backward (median of a blocked run, best of `repeats`)."""
    timer = benchmark.Timer(
        "torch.autograd.grad(fn(eta, target, lam), eta)",
        globals={"torch": torch, "fn": fn, "eta": eta, "target": target, "lam": LAM},
        num_threads=threads,
        timer=time.process_time if eta.device.type == "cpu" else time.perf_counter,
    )
    return min(timer.blocked_autorange(min_run_time=0.2).median for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)

    clock = "CPU time" if device.type == "cpu" else "wall time"
    print(f"forward + backward, lam = {LAM}, float32, {device}, {args.threads} thread(s), {clock}")
    header = f"{'(M, N, K)':>15}" + "".join(f"{name + ' us':>14}" for name in VARIANTS)
    header += f"{'naive/modloss':>15}{'logsumexp/modloss':>19}"
    print(header)
    for shape in SHAPES:
        eta = torch.randn(shape, generator=generator).to(device).requires_grad_()
        target = torch.randint(0, shape[2], shape[1:2], generator=generator).to(device)
        seconds = {
            name: time_step(fn, eta, target, args.threads, args.repeats)
            for name, fn in VARIANTS.items()
        }
        row = f"{str(shape):>15}" + "".join(f"{s * 1e6:14.1f}" for s in seconds.values())
        row += f"{seconds['naive'] / seconds['modloss']:15.1f}"
        row += f"{seconds['logsumexp'] / seconds['modloss']:19.1f}"
        print(row)


if __name__ == "__main__":
    main()
