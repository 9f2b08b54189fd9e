"""Wall time of a sweep against the same trials run bare (goal: sweep <= 1.15x bare).

The sweep is ``modloss sweep`` of a search space (default: the smoke space) as a user runs
it: a local Ray started for it, one checkpoint per trial and epoch, MLflow tracking into a
SQLite file. The baseline, measured in the same run, is every trial of the same grid run
one after the other in this process with ``modloss.train.fit`` (no Ray, no MLflow, no
checkpoints), torch on as many threads as the space gives each trial (as Ray sets it for
the sweep's trials).
``--serial`` runs the sweep one trial at a time, so the ratio is what Ray, the checkpoints
and MLflow cost; by default the sweep runs as written (smoke: two trials at a time).
``--epochs`` and ``--subset`` scale the space up to see how its fixed costs amortise.
For reference (no goal), the same trials are also timed bare on every core the sweep's
concurrent trials use together (smoke: 2 threads), the fastest a single process does them.

``--pack`` measures packed trials instead (goal: packed <= 0.75x unpacked): the space swept
unpacked (one Ray trial per grid point) and packed (``pack: true``: one Ray trial per
(model, trial), its λ points trained together by ``modloss.train.fit_pack``), one after
the other in the same run, each as ``modloss sweep`` runs it. Table 2's shape:

    .venv/bin/python benchmarks/bench_sweep.py --pack --space search_spaces/fmnist_table2.yaml \
        --trials 1 --epochs 2 --subset 1000

    .venv/bin/python benchmarks/bench_sweep.py [--space search_spaces/fmnist_smoke.yaml]
        [--serial] [--epochs N] [--subset N] [--trials N] [--pack]
"""

import argparse
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from modloss.train import fit
from orchestration.spaces import load_space
from orchestration.sweep import run_sweep

GOAL = 1.15
PACK_GOAL = 0.75
ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MODLOSS_DATA_DIR") or ROOT.parent / "shared/data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces/fmnist_smoke.yaml")
    parser.add_argument("--serial", action="store_true", help="one trial at a time")
    parser.add_argument("--epochs", type=int, help="override the space's epochs")
    parser.add_argument("--subset", type=int, help="override the space's subset")
    parser.add_argument("--trials", type=int, help="override the space's trials (a count)")
    parser.add_argument("--pack", action="store_true", help="packed vs unpacked sweep")
    parser.add_argument(
        "--repeats", type=int, default=1, help="--pack: sweep pairs, in ABBA order; medians"
    )
    args = parser.parse_args()
    os.environ.setdefault("MODLOSS_DATA_DIR", str(DATA_DIR))
    tmp = tempfile.TemporaryDirectory()
    space_file = Path(tmp.name, args.space.name)
    edited = yaml.safe_load(args.space.read_text())
    overrides = {
        "max_concurrent": 1 if args.serial else None,
        "epochs": args.epochs,
        "subset": args.subset,
        "trials": args.trials,
    }
    edited.update({k: v for k, v in overrides.items() if v is not None})
    if args.pack:
        with tmp:
            _packed_vs_unpacked(edited, Path(tmp.name), args.repeats)
        return
    space_file.write_text(yaml.safe_dump(edited))
    space = load_space(space_file)
    grid = space.grid()

    per_trial = max(1, int(space.resources.cpus))
    concurrent = min(space.max_concurrent or len(grid), len(grid))
    all_cores = min(os.cpu_count() or 1, per_trial * concurrent)
    bare = _bare(grid, per_trial)
    # For reference: one process given every core the sweep's trials use together.
    bare_all = _bare(grid, all_cores) if all_cores > per_trial else None
    torch.set_num_threads(per_trial)  # the driver's own torch work (building models) too

    with tmp:
        os.chdir(tmp.name)  # the default MLflow store and Ray storage land here
        start = time.perf_counter()
        outcome = run_sweep(space_file, out=io.StringIO())
        swept = time.perf_counter() - start
    assert set(outcome.table.status) == {"finished"}, outcome.table

    ratio = swept / bare
    mode = "one trial at a time" if args.serial else f"max_concurrent {space.max_concurrent}"
    print(
        f"space: {space_file.name} ({mode}, {space.epochs} epochs, subset {grid[0]['subset']}), "
        f"{len(grid)} trials, {os.cpu_count()} CPUs"
    )
    print(f"bare fit, one after another, {per_trial} torch thread(s): {bare:7.1f} s")
    if bare_all is not None:
        print(f"bare fit, one after another, {all_cores} torch threads: {bare_all:7.1f} s")
    print(f"modloss sweep (Ray + MLflow): {swept:7.1f} s")
    print(f"ratio sweep / bare: {ratio:.2f} (goal <= {GOAL}) {'OK' if ratio <= GOAL else 'MISSED'}")
    if bare_all is not None:
        print(f"ratio sweep / bare on {all_cores} threads (no goal): {swept / bare_all:.2f}")


def _packed_vs_unpacked(edited: dict, folder: Path, repeats: int) -> None:
    """Sweep the space unpacked and packed, ``repeats`` times each in ABBA order (the
    machine's load drifts), each sweep in its own folder; print the ratio of the medians."""
    times: dict[str, list[float]] = {"unpacked": [], "packed": []}
    spaces = {}
    load = os.getloadavg()[0]  # the machine's other users
    order = [p for r in range(repeats) for p in ((False, True) if r % 2 == 0 else (True, False))]
    for run, pack in enumerate(order):
        mode = "packed" if pack else "unpacked"
        space_file = folder / f"{mode}{run}" / "space.yaml"
        space_file.parent.mkdir()
        space_file.write_text(yaml.safe_dump({**edited, "pack": pack}))
        spaces[mode] = load_space(space_file)
        os.chdir(space_file.parent)  # the default MLflow store and Ray storage land here
        start = time.perf_counter()
        outcome = run_sweep(space_file, out=io.StringIO())
        times[mode].append(time.perf_counter() - start)
        assert set(outcome.table.status) == {"finished"}, outcome.table
    seconds = {mode: statistics.median(t) for mode, t in times.items()}
    space = spaces["packed"]
    points, packs = len(space.grid()), len(space.packs())
    cpus = space.resources.cpus
    print(
        f"space: {space.name} ({len(space.models)} models x {len(space.lam)} λ x "
        f"{len(space.trial_ids)} trial(s) = {points} points; {space.epochs} epochs, subset "
        f"{space.base_config()['subset']}), {os.cpu_count()} CPUs, {cpus:g} cpu(s) per Ray "
        f"trial = torch threads, max_concurrent {space.max_concurrent}, load average "
        f"{load:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    for mode, trials in (("unpacked", points), ("packed", packs)):
        each = ", ".join(f"{t:.1f}" for t in times[mode])
        print(f"{mode} sweep, {trials} Ray trials: median {seconds[mode]:7.1f} s ({each})")
    ratio = seconds["packed"] / seconds["unpacked"]
    verdict = "OK" if ratio <= PACK_GOAL else "MISSED"
    print(f"ratio packed / unpacked: {ratio:.2f} (goal <= {PACK_GOAL}) {verdict}")


def _bare(grid: list[dict], threads: int) -> float:
    """Seconds to fit every trial of ``grid`` one after another on ``threads`` threads."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    for config in grid:
        result = fit(config)
        assert result.status == "finished", result.status
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
