"""The shipped search spaces validate and expand to the paper's grids."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from modloss.config import TrainConfig
from orchestration.spaces import GridSearch, SearchSpace, SpaceError, load_space

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


def test_pareto_space_minimises_error_and_dropped_error():
    space = load_space(SPACES / "fmnist_pareto.yaml")
    assert space.objectives == ["val_error", "val_dropped_error"]
    assert space.scheduler.type == "none" and space.lam.low == 0 and space.lam.high == 1
    assert load_space(SPACES / "fmnist_optuna.yaml").objectives == ["val_error"]  # default
    assert load_space(SPACES / "fmnist_smoke.yaml").objectives == ["val_error"]  # a grid's


OPTUNA = {"type": "optuna", "num_samples": 2}


@pytest.mark.parametrize(
    ("search", "scheduler", "named"),
    [
        ({**OPTUNA, "objectives": ["val_error", "test_error"]}, None,
         ["search.objectives", "'test_error'", "allowed: val_error,", "val_dropped_error"]),
        ({**OPTUNA, "objectives": ["val_error", "val_error"]}, None, ["listed twice"]),
        ({**OPTUNA, "objectives": []}, None, ["search.objectives", "at least 1"]),
        ({**OPTUNA, "sampler": "cmaes"}, None, ["search.sampler", "'cmaes'", "'tpe'", "'nsga2'"]),
        ({**OPTUNA, "objectives": ["val_error", "val_dropped_error"]},
         {"type": "asha", "grace_period": 1},
         ["ASHA", "2 (val_error, val_dropped_error)", "'none'"]),
    ],
)  # fmt: skip
def test_bad_objectives_and_samplers_are_refused(make_space, search, scheduler, named):
    changes = {"search": search} | ({"scheduler": scheduler} if scheduler else {})
    with pytest.raises(SpaceError) as err:
        load_space(make_space(**changes))
    for text in named:
        assert text in str(err.value)


def test_asha_keeps_a_single_objective(make_space):
    changes = {"search": {**OPTUNA, "objectives": ["val_ece"]}, "scheduler": {"type": "asha"}}
    assert load_space(make_space(**changes)).objectives == ["val_ece"]


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


# A valid value other than TrainConfig's default for every setting a space shares.
SETTING_VALUES = dict(
    model_overrides={"hidden": 8},
    dataset="cifar10",
    momentum=0.5,
    weight_decay=1e-4,
    nesterov=True,
    milestones=[1, 2],
    gamma=0.5,
    batch_size=64,
    eval_batch_size=500,
    epochs=3,
    val_size=2000,
    subset=3000,
    augment=True,
    data_dir="/elsewhere",
)


def test_every_train_config_setting_reaches_every_trial(make_space):
    swept = {"model", "lam", "lr", "trial", "device"}
    assert SETTING_VALUES.keys() == TrainConfig.model_fields.keys() - swept
    assert all(v != TrainConfig.model_fields[k].default for k, v in SETTING_VALUES.items())
    grid = load_space(make_space(**SETTING_VALUES)).grid()
    assert len(grid) == 6
    assert all({k: cfg[k] for k in SETTING_VALUES} == SETTING_VALUES for cfg in grid)


@pytest.mark.parametrize(
    "bad",
    [
        {"momentum": 1.0},
        {"gamma": 0},
        {"eval_batch_size": 0},
        {"milestones": [2, 1]},
        {"milestones": [1, 3]},  # epochs is 3: the last never acts
        {"nesterov": True, "momentum": 0.0},
        {"augment": True, "dataset": "diabetes"},
        {"val_size": "many"},
    ],
)
def test_a_bad_setting_gets_train_configs_own_error_once(make_space, bad):
    with pytest.raises(ValidationError) as own:
        TrainConfig(model="16-M-64-H", lam=0.95, epochs=3, **bad)
    (problem,) = own.value.errors()
    message = problem["msg"].removeprefix("Value error, ")
    with pytest.raises(SpaceError) as err:
        load_space(make_space(**bad))
    assert str(err.value).count(message) == 1  # one problem, not one per trial


@pytest.mark.parametrize("value", [-0.01, 0.0, 0.5, 1.0, 1.01, math.inf, math.nan])
@pytest.mark.parametrize("key", ["lam", "lr"])
def test_lam_and_lr_bounds_are_train_configs(make_space, key, value):
    point = {"lam": 0.95, "lr": 0.1, key: value}
    try:
        TrainConfig(model="16-M-64-H", **point)
        allowed = True
    except ValidationError:
        allowed = False
    space = make_space(lam=[point["lam"]], lr=point["lr"])
    if allowed:
        assert {cfg[key] for cfg in load_space(space).grid()} == {value}
    else:
        with pytest.raises(SpaceError, match=rf"\n  {key}(\[0\])?: "):
            load_space(space)


def test_a_grid_point_is_validated_once(monkeypatch):
    from orchestration.sweep import param_space

    calls = []
    validate = TrainConfig.model_validate.__func__

    def counted(cls, obj, **kwargs):
        calls.append(obj)
        return validate(cls, obj, **kwargs)

    monkeypatch.setattr(TrainConfig, "model_validate", classmethod(counted))
    space = load_space(SPACES / "fmnist_table2.yaml")
    assert len(calls) == len(space.points()) == 140
    space.grid()
    param_space(space)
    assert len(calls) == 140


@pytest.mark.parametrize("name", SHIPPED)
def test_a_dumped_space_is_the_same_space(name):
    space = load_space(SPACES / name)
    dumped = space.model_dump(mode="json")
    assert set(TrainConfig.model_fields) - {"model", "lam", "lr", "trial", "device"} <= set(dumped)
    again = SearchSpace.model_validate(dumped)
    assert again.model_dump(mode="json") == dumped
    if isinstance(space.search, GridSearch):
        assert again.grid() == space.grid()


def test_table2_packs_into_one_trial_per_model_and_trial():
    """pack: true groups the points that differ only in fusible settings (λ and its lr)."""
    space = load_space(SPACES / "fmnist_table2.yaml")
    packs = space.packs()
    assert space.pack and len(packs) == 4 * 5 and {len(p) for p in packs} == {7}
    for pack in packs:
        assert len({(p["model"], p["trial"]) for p in pack}) == 1
        assert [p["lam"] for p in pack] == space.lam
    assert sorted(map(str, (p for pack in packs for p in pack))) == sorted(map(str, space.grid()))
    unpacked = load_space(SPACES / "fmnist_table2.yaml", pack=False).packs()
    assert len(unpacked) == 140 and {len(p) for p in unpacked} == {1}


def test_pack_is_part_of_the_space_a_resume_checks(tmp_path):
    """An unpacked space is recorded without the key, as before ``pack`` existed (so those
    sweeps still resume); resuming it packed is refused, naming the key."""
    import json

    from orchestration.guards import SPACE_FILE, GuardError, check_resumed_space, save_space

    plain = load_space(SPACES / "fmnist_table2.yaml", pack=False)
    save_space(tmp_path, plain)
    assert "pack" not in json.loads((tmp_path / SPACE_FILE).read_text())
    check_resumed_space(tmp_path, plain)
    with pytest.raises(GuardError, match="pack: None -> True"):
        check_resumed_space(tmp_path, load_space(SPACES / "fmnist_table2.yaml"))
