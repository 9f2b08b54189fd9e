"""Wall time of a sweep against the same trials run bare (goal: sweep <= 1.15x bare).

The sweep is ``modloss sweep`` of a search space (default: the smoke space) as a user runs
it: a local Ray started for it, one checkpoint per trial and epoch, MLflow tracking into a
SQLite file. The baseline, measured in the same run, is every trial of the same grid run
one after the other in this process with ``modloss.train.fit`` (no Ray, no MLflow, no
checkpoints); torch there uses every core. The sweep runs the space as written (smoke: one
core per trial, two at a time); ``--serial`` runs it one trial at a time on every core
instead, which isolates what Ray, the checkpoints and MLflow cost.

    .venv/bin/python benchmarks/bench_sweep.py [--space search_spaces/fmnist_smoke.yaml] [--serial]
"""

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

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
    parser.add_argument("--serial", action="store_true", help="one trial at a time, all cores")
    args = parser.parse_args()
    os.environ.setdefault("MODLOSS_DATA_DIR", str(DATA_DIR))
    space_file = args.space.resolve()
    grid = load_space(space_file).grid()
    tmp = tempfile.TemporaryDirectory()
    if args.serial:
        space = yaml.safe_load(space_file.read_text())
        space.update(max_concurrent=1, resources={"cpus": os.cpu_count()})
        space_file = Path(tmp.name, space_file.name)
        space_file.write_text(yaml.safe_dump(space))

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
    mode = "serial, all cores per trial" if args.serial else "as written"
    print(f"space: {space_file.name} ({mode}), {len(grid)} trials, {os.cpu_count()} CPUs")
    print(f"bare fit, one after another: {bare:7.1f} s")
    print(f"modloss sweep (Ray + MLflow): {swept:7.1f} s")
    print(f"ratio sweep / bare: {ratio:.2f} (goal <= {GOAL}) {'OK' if ratio <= GOAL else 'MISSED'}")


if __name__ == "__main__":
    main()
