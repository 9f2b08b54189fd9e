"""The shipped search spaces validate and expand to the paper's grids."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from orchestration.spaces import GridSearch, SpaceError, load_space

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"

SHIPPED = sorted(p.name for p in SPACES.glob("*.yaml"))


def test_every_paper_experiment_has_a_space():
    assert {
        "fmnist_table2.yaml",
        "fmnist_robustness.yaml",
        "cifar10_cnn.yaml",
        "cifar100_densenet.yaml",
        "fmnist_optuna.yaml",
        "fmnist_smoke.yaml",
    } <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_space_validates(name):
    space = load_space(SPACES / name)
    assert space.name == name.removesuffix(".yaml")  # --resume finds it by this name
    if isinstance(space.search, GridSearch):
        grid = space.grid()
        assert len(grid) == len(space.models) * len(space.lam) * len(space.trial_ids)
        assert all(cfg["lr"] > 0 for cfg in grid)  # every lr concrete, as it will be logged


@pytest.mark.parametrize(
    ("name", "trials", "epochs"),
    [
        ("fmnist_table2.yaml", 4 * 7 * 5, 200),
        ("fmnist_robustness.yaml", 3 * 5, 200),
        ("cifar10_cnn.yaml", 8 * 5, 400),
        ("cifar100_densenet.yaml", 3 * 4 * 3, 300),
    ],
)
def test_paper_grids(name, trials, epochs):
    grid = load_space(SPACES / name).grid()
    assert len(grid) == trials
    assert {cfg["epochs"] for cfg in grid} == {epochs}
    assert len({(c["model"], c["lam"], c["trial"]) for c in grid}) == trials


def test_paper_learning_rates_reach_the_trials():
    lrs = {
        (c["model"], c["lam"]): c["lr"] for c in load_space(SPACES / "fmnist_table2.yaml").grid()
    }
    assert lrs["1-M-1024-H", 0.5] == 0.02
    assert lrs["256-M-4-H", 0.95] == 5.15
    assert lrs["256-M-4-H", 0.99] == lrs["256-M-4-H", 1.0] == 1.536
    cnn = {c["lam"]: c["lr"] for c in load_space(SPACES / "cifar10_cnn.yaml").grid()}
    assert cnn[1.0] == 0.02 and {cnn[lam] for lam in cnn if lam < 1} == {0.06}


def test_densenet_recipe():
    cfg = load_space(SPACES / "cifar100_densenet.yaml").grid()[0]
    assert (cfg["batch_size"], cfg["lr"], cfg["weight_decay"]) == (64, 0.1, 1e-4)
    assert cfg["milestones"] == [150, 225] and math.isclose(cfg["gamma"], 0.1)


def test_optuna_space_is_sampled():
    space = load_space(SPACES / "fmnist_optuna.yaml")
    assert space.search.type == "optuna" and space.scheduler.type == "asha"
    with pytest.raises(ValueError, match="no grid"):
        space.grid()


def test_gpu_fraction_sets_the_device(make_space):
    space = load_space(make_space(resources={"cpus": 1, "gpus": 0.25}))
    assert {cfg["device"] for cfg in space.grid()} == {"cuda"}


def test_overrides_replace_top_level_keys():
    space = load_space(SPACES / "fmnist_smoke.yaml", name="other", max_concurrent=None)
    assert space.name == "other" and space.max_concurrent == 2


def test_paper_preset_needs_a_tuned_lambda(make_space):
    path = make_space(lam=[0.97])
    with pytest.raises(SpaceError, match=r"lam=0\.97"):
        load_space(path)
