"""Packed trials: each group of a pack trains as its config's own run would."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from modloss.losses import modular_loss
from modloss.pack import PackedSGD, PackedStrategy
from modloss.records import RunResult
from modloss.train import TrainConfig, build_model, build_optimizer, fit, fit_pack

# Every setting a pack may fuse differs between these three points.
POINTS = [
    {"lam": 0.0, "lr": 0.3, "momentum": 0.9, "weight_decay": 0.0},
    {"lam": 0.5, "lr": 0.1, "momentum": 0.0, "weight_decay": 1e-3, "milestones": [1]},
    {"lam": 1.0, "lr": 0.05, "momentum": 0.5, "weight_decay": 5e-4, "nesterov": True},
]
# The groups of a pack share some settings (PackedSGD then steps with numbers, as torch's SGD):
# Table 2's case (only the learning rate differs), and one where every setting is shared.
SHARED = {
    "lr": [{"lam": lam, "lr": lr, "momentum": 0.9} for lam, lr in ((0.0, 0.3), (1.0, 0.1))],
    "all": [{"lam": lam, "lr": 0.2, "momentum": 0.9, "weight_decay": 1e-3} for lam in (0.0, 1.0)],
}
TINY = {  # the paper's models on a small synthetic input (8 features or a 1x8x8 image)
    "1-M-1024-H": {"in_features": 8},
    "16-M-64-H": {"in_features": 8},
    "64-M-16-H": {"in_features": 8},
    "256-M-4-H": {"in_features": 8},
    "CNN-10": {"in_channels": 1, "channels": [4, 8], "strides": [1, 2], "num_members": 3},
}
STEPS = 5
ERROR_TOL = 0.002  # float32 rounding of a batched matmul over 2 epochs


def _configs(base: dict[str, Any], points: list[dict[str, Any]]) -> list[TrainConfig]:
    return [TrainConfig.model_validate({**base, **point}) for point in points]


@pytest.mark.parametrize(
    ("name", "points"),
    [(name, POINTS) for name in TINY] + [("16-M-64-H", points) for points in SHARED.values()],
    ids=[*TINY, *(f"16-M-64-H-shared-{key}" for key in SHARED)],
)
def test_packed_steps_equal_unpacked_steps_in_float64(
    name: str, points: list[dict[str, Any]]
) -> None:
    configs = _configs(
        {"model": name, "model_overrides": TINY[name], "milestones": [3], "gamma": 0.5}, points
    )
    alone = [build_model(c).double() for c in configs]
    alone_sgd = [build_optimizer(c, m) for c, m in zip(configs, alone, strict=True)]
    shadows = [build_model(c).double() for c in configs]
    shadow_sgd = [build_optimizer(c, m) for c, m in zip(configs, shadows, strict=True)]
    run = PackedStrategy()
    lams = [c.lam for c in configs]
    pack = run.prepare_pack(
        shadows, torch.device("cpu"), family="categorical", lams=lams, num_classes=10
    )
    assert pack.num_members == len(points) * alone[0].num_members
    optimizer = PackedSGD(pack.parameters(), [o for o, _ in shadow_sgd], alone[0].num_members)
    initial = [{k: v.clone() for k, v in run.group_state(g).items()} for g in range(len(points))]
    shape = (16, 8) if name != "CNN-10" else (16, 1, 8, 8)
    gen = torch.Generator().manual_seed(0)
    run.start_epoch()
    for _ in range(STEPS):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        y = torch.randint(10, (16,), generator=gen)
        loss = run.step_loss(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for config, model, (sgd, schedule), (_, shadow_schedule) in zip(
            configs, alone, alone_sgd, shadow_sgd, strict=True
        ):
            sgd.zero_grad()
            modular_loss(model(x), y, config.lam).backward()
            sgd.step()
            schedule.step()
            shadow_schedule.step()
    for g, model in enumerate(alone):
        packed = run.group_state(g)
        for key, value in model.state_dict().items():
            assert (value - initial[g][key]).abs().max() > 0 or "running" in key
            assert (packed[key] - value).abs().max() < 1e-10, (g, key)


@pytest.fixture(scope="module")
def base(data_dir: Path) -> dict[str, Any]:
    return {"model": "16-M-64-H", "epochs": 2, "subset": 1000, "data_dir": str(data_dir)}


@pytest.fixture(scope="module")
def alone(base: dict[str, Any]) -> list[RunResult]:
    return [fit({**base, **point}) for point in POINTS]


def _max_error_gap(packed: RunResult, alone: RunResult) -> float:
    assert packed.status == alone.status == "finished"
    assert packed.best_epoch == alone.best_epoch
    assert len(packed.history) == len(alone.history)
    gaps = [abs(packed.test_error - alone.test_error), abs(packed.val_error - alone.val_error)]
    for a, b in zip(packed.history, alone.history, strict=True):
        gaps += [abs(getattr(a, s).error - getattr(b, s).error) for s in ("train", "val", "test")]
        gaps.append(abs(a.val.dropped_error - b.val.dropped_error))  # the same kept members
        assert a.lr == b.lr
    return max(gaps)


def test_pack_matches_unpacked_runs_on_fashion_mnist(
    base: dict[str, Any], alone: list[RunResult], tmp_path: Path
) -> None:
    outs = [tmp_path / f"point{g}" for g in range(len(POINTS))]
    packed = fit_pack([{**base, **point} for point in POINTS], outs)
    gaps = [_max_error_gap(p, a) for p, a in zip(packed, alone, strict=True)]
    print(f"max |packed - unpacked| error: {max(gaps):.5f}")
    assert max(gaps) <= ERROR_TOL
    for out, result, point in zip(outs, packed, POINTS, strict=True):
        stored = json.loads((out / "results.json").read_text())
        assert stored["config"]["lam"] == point["lam"] and stored["best_epoch"] == result.best_epoch
        logits = torch.load(out / "test_logits.pt", weights_only=True)
        assert logits["eta"].shape[0] == 16 and logits["epoch"] == result.best_epoch
        assert (out / "checkpoint.pt").is_file() and (out / "val_logits.pt").is_file()


def test_resumed_pack_equals_uninterrupted_pack(base: dict[str, Any], tmp_path: Path) -> None:
    configs = [{**base, **point, "epochs": 3} for point in POINTS]
    outs = [tmp_path / f"point{g}" for g in range(len(POINTS))]
    fit_pack([{**c, "epochs": 2} for c in configs], outs)
    resumed = fit_pack(configs, outs)
    straight = fit_pack(configs)
    for r, s in zip(resumed, straight, strict=True):
        assert r.resumed_from == [2] and r.status == "finished"
        assert [e.model_dump(exclude={"seconds"}) for e in r.history] == [
            e.model_dump(exclude={"seconds"}) for e in s.history
        ]


def test_diverging_point_leaves_the_pack(
    base: dict[str, Any], alone: list[RunResult], tmp_path: Path
) -> None:
    absurd = {**POINTS[1], "lr": 1e12}
    outs = [tmp_path / f"point{g}" for g in range(3)]
    packed = fit_pack([{**base, **p} for p in (POINTS[0], absurd, POINTS[2])], outs)
    own = fit({**base, **absurd})
    assert own.status == "diverged"
    assert packed[1].status == "diverged" and packed[1].diverged_epoch == own.diverged_epoch
    assert json.loads((outs[1] / "results.json").read_text())["status"] == "diverged"
    assert max(_max_error_gap(packed[g], alone[g]) for g in (0, 2)) <= ERROR_TOL


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"batch_size": 50}, "batch_size"),
        ({"model": "64-M-16-H"}, "model"),
        ({"trial": 1}, "trial"),
    ],
)
def test_non_fusible_difference_is_refused(
    base: dict[str, Any], change: dict[str, Any], key: str
) -> None:
    with pytest.raises(ValueError, match=rf"non-fusible key '{key}'"):
        fit_pack([base, {**base, **change}])
