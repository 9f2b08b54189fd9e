"""Wall time of a sweep against the same trials run bare (goal: sweep <= 1.15x bare).

The sweep is ``modloss sweep`` of a search space (default: the smoke space) as a user runs
it: a local Ray started for it, one checkpoint per trial and epoch, MLflow tracking into a
SQLite file. The baseline, measured in the same run, is every trial of the same grid run
one after the other in this process with ``modloss.train.fit`` (no Ray, no MLflow, no
checkpoints), torch on as many threads as the space gives each trial (Ray sets that for
the sweep's trials; on a busy machine one thread per core used is also the fastest).
``--serial`` runs the sweep one trial at a time, so the ratio is what Ray, the checkpoints
and MLflow cost; by default the sweep runs as written (smoke: two trials at a time).
``--epochs`` and ``--subset`` scale the space up to see how its fixed costs amortise.

    .venv/bin/python benchmarks/bench_sweep.py [--space search_spaces/fmnist_smoke.yaml]
        [--serial] [--epochs N] [--subset N]
"""

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml

from modloss.train import fit
from orchestration.spaces import load_space
from orchestration.sweep import run_sweep

GOAL = 1.15
ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MODLOSS_DATA_DIR") or ROOT.parent / "shared/data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces/fmnist_smoke.yaml")
    parser.add_argument("--serial", action="store_true", help="one trial at a time")
    parser.add_argument("--epochs", type=int, help="override the space's epochs")
    parser.add_argument("--subset", type=int, help="override the space's subset")
    args = parser.parse_args()
    os.environ.setdefault("MODLOSS_DATA_DIR", str(DATA_DIR))
    tmp = tempfile.TemporaryDirectory()
    space_file = Path(tmp.name, args.space.name)
    edited = yaml.safe_load(args.space.read_text())
    overrides = {
        "max_concurrent": 1 if args.serial else None,
        "epochs": args.epochs,
        "subset": args.subset,
    }
    edited.update({k: v for k, v in overrides.items() if v is not None})
    space_file.write_text(yaml.safe_dump(edited))
    space = load_space(space_file)
    grid = space.grid()

    torch.set_num_threads(max(1, int(space.resources.cpus)))

    start = time.perf_counter()
    for config in grid:
        results = fit(config)
        assert results["status"] == "finished", results["status"]
    bare = time.perf_counter() - start

    with tmp:
        os.chdir(tmp.name)  # the default MLflow store and Ray storage land here
        start = time.perf_counter()
        outcome = run_sweep(space_file, out=io.StringIO())
        swept = time.perf_counter() - start
    assert set(outcome.table.status) == {"finished"}, outcome.table

    ratio = swept / bare
    mode = "one trial at a time" if args.serial else f"max_concurrent {space.max_concurrent}"
    print(
        f"space: {space_file.name} ({mode}, {space.epochs} epochs, subset {space.subset}), "
        f"{len(grid)} trials, {os.cpu_count()} CPUs"
    )
    print(f"torch threads per trial: {torch.get_num_threads()}")
    print(f"bare fit, one after another: {bare:7.1f} s")
    print(f"modloss sweep (Ray + MLflow): {swept:7.1f} s")
    print(f"ratio sweep / bare: {ratio:.2f} (goal <= {GOAL}) {'OK' if ratio <= GOAL else 'MISSED'}")


if __name__ == "__main__":
    main()
