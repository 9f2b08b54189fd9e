"""The distributed strategies of fit's one loop, without Ray: ``torchrun -m modloss train``
with two CPU processes (gloo) reproduces a single-process fit, and resumes from its
per-rank checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modloss.names import CHECKPOINT_FILE, RESULTS_FILE, SHARD_CHECKPOINT_FILE, TEST_LOGITS_FILE
from modloss.records import RunResult
from modloss.strategies import load_model_state, make_strategy
from modloss.train import fit

pytestmark = pytest.mark.slow  # two processes per run

B, K = 16, 10
MODEL = "16-M-64-H"  # no model overrides: `modloss train` runs it as registered
OPTIONS = {"subset": 32, "batch-size": B, "lam": 0.5, "lr": 0.02, "weight-decay": 1e-4}


def _torchrun(out: Path, strategy: str, epochs: int, model: str, data_dir: Path) -> RunResult:
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [str(torchrun), "--nproc-per-node", "2", "-m", "modloss", "train"]
    args += ["--model", model, "--out", str(out), "--strategy", strategy, "--epochs", str(epochs)]
    for key, value in OPTIONS.items():
        args += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MODLOSS_DATA_DIR": str(data_dir)}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{") :])  # printed by rank 0 only
    assert summary["strategy"] == strategy and summary["world_size"] == 2
    return RunResult.read(out / RESULTS_FILE)


def _reference(model: str, epochs: int, data_dir: Path, out: Path) -> RunResult:
    config = {
        "model": model,
        "epochs": epochs,
        "data_dir": str(data_dir),
        "subset": 32,
        "batch_size": B,
        "lam": 0.5,
        "lr": 0.02,
        "weight_decay": 1e-4,
    }
    return fit(config, out_dir=out)


def _assert_same_run(got: RunResult, want: RunResult) -> None:
    assert (got.status, got.best_epoch, got.params) == (want.status, want.best_epoch, want.params)
    assert [e.epoch for e in got.history] == [e.epoch for e in want.history]
    for a, b in zip(got.history, want.history, strict=True):
        for split in ("train", "val", "test"):
            sa, sb = getattr(a, split), getattr(b, split)
            assert sa.loss == pytest.approx(sb.loss, rel=1e-5, abs=1e-6), split
            assert sa.error == pytest.approx(sb.error, abs=1e-9), split
            assert sa.member_errors == pytest.approx(sb.member_errors, abs=1e-9), split
        # The same global members kept, whichever rank holds them.
        assert a.val.dropped_error == pytest.approx(b.val.dropped_error, abs=1e-9)


def test_module_parallel_under_torchrun_equals_one_process_and_resumes(tmp_path, data_dir):
    """Two ranks of eight members each: the same history as one process within 1e-5, the
    same weights after merging the shards; stopped after epoch 1 and resumed to epoch 2."""
    out = tmp_path / "module"
    _torchrun(out, "module", 1, MODEL, data_dir)
    assert {p.name for p in out.iterdir()} >= {
        SHARD_CHECKPOINT_FILE.format(rank=0),
        SHARD_CHECKPOINT_FILE.format(rank=1),
    }
    assert not (out / CHECKPOINT_FILE).exists()
    got = _torchrun(out, "module", 2, MODEL, data_dir)  # resumes at epoch 2
    assert got.resumed_from == [1] and got.epochs_completed == 2
    want = _reference(MODEL, 2, data_dir, tmp_path / "single")
    _assert_same_run(got, want)
    reference = load_model_state(tmp_path / "single")
    merged = load_model_state(out)
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-5, rtol=1e-5, msg=name)
    logits = torch.load(out / TEST_LOGITS_FILE, weights_only=True)
    assert logits["eta"].shape[0] == 16 and logits["epoch"] == got.best_epoch


def test_ddp_under_torchrun_equals_one_process(tmp_path, data_dir):
    """Each rank takes half of every batch; without BatchNorm, exactly fit's run."""
    got = _torchrun(tmp_path / "ddp", "ddp", 2, MODEL, data_dir)
    want = _reference(MODEL, 2, data_dir, tmp_path / "single")
    _assert_same_run(got, want)
    assert {e.comm_floats_per_step for e in got.history} == {got.params}


def test_strategies_are_one_process_outside_a_process_group():
    for name in ("single", "ddp", "module"):
        strategy = make_strategy(name)
        assert (strategy.rank, strategy.world, strategy.is_main) == (0, 1, True)
    with pytest.raises(ValueError, match="unknown strategy 'hybrid'; allowed: single, ddp"):
        make_strategy("hybrid")
