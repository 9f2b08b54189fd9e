"""Search spaces: the schema of ``search_spaces/*.yaml`` and its expansion into trials.

A space is validated completely before Ray starts: the YAML itself, every field, the model
and dataset names against the ``modloss`` registries, and (for grid searches) every trial's
:class:`modloss.train.TrainConfig`. Errors name the file, the key, the bad value and what is
allowed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "Asha",
    "Distributed",
    "GridSearch",
    "LrTable",
    "NoScheduler",
    "OptunaSearch",
    "Optimizer",
    "Range",
    "Resources",
    "SearchSpace",
    "SpaceError",
    "load_space",
]


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("expected a number, not a boolean")
    return v


def _lam_in_unit(v: float) -> float:
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        raise ValueError("λ must be a number in [0, 1] (λ > 1 is pathological, Theorem 1)")
    return v


Number = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
Lam = Annotated[float, BeforeValidator(_not_bool), AfterValidator(_lam_in_unit)]
Positive = Annotated[Number, Field(gt=0.0)]
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]


class SpaceError(ValueError):
    """A search space that cannot run; the message says where and why."""


class _Section(BaseModel):
    """Strict base: unknown keys are named together with the allowed ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                raise ValueError(
                    f"unknown key {', '.join(repr(k) for k in unknown)}; "
                    f"allowed keys: {', '.join(cls.model_fields)}"
                )
        return data


class Range(_Section):
    """A continuous interval sampled by the search algorithm (``log``: log-uniform)."""

    low: Number
    high: Number
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be smaller than high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


class LamRange(Range):
    """A uniform λ interval inside [0, 1]."""

    @model_validator(mode="after")
    def _in_unit(self) -> LamRange:
        if self.log or self.low < 0 or self.high > 1:
            raise ValueError("a λ range must be uniform (log: false) and inside [0, 1]")
        return self


class LrTable(BaseModel):
    """Learning rate per model, optionally per λ: ``{model: lr | {λ: lr, default: lr}}``."""

    model_config = ConfigDict(frozen=True)

    entries: dict[str, dict[str, float]]

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, data: Any) -> Any:
        if isinstance(data, dict) and "entries" not in data:
            return {"entries": {str(m): _lr_row(m, row) for m, row in data.items()}}
        return data

    def lookup(self, model: str, lam: float) -> float | None:
        row = self.entries.get(model, {})
        for key, lr in row.items():
            if key != "default" and math.isclose(float(key), lam, abs_tol=1e-9):
                return lr
        return row.get("default")


class GridSearch(_Section):
    """Every combination of models x λ x trials, each run once."""

    type: Literal["grid"] = "grid"


class OptunaSearch(_Section):
    """Optuna TPE over the ranges (and lists, as categorical choices) of the space."""

    type: Literal["optuna"]
    num_samples: PositiveInt
    seed: NonNegativeInt = 0


class NoScheduler(_Section):
    """Every trial runs all its epochs."""

    type: Literal["none"] = "none"


class Asha(_Section):
    """Asynchronous successive halving on validation error, budgets in epochs."""

    type: Literal["asha"]
    grace_period: PositiveInt = 1
    reduction_factor: Annotated[Number, Field(gt=1.0)] = 3.0
    max_t: PositiveInt | None = None  # defaults to the space's epochs


class Resources(_Section):
    """Resources per trial; a GPU fraction lets several small trials share one GPU."""

    cpus: Positive = 1.0
    gpus: Annotated[Number, Field(ge=0.0)] = 0.0

    @field_validator("gpus")
    @classmethod
    def _whole_or_fraction(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError("gpus must be 0, a fraction in (0, 1], or a whole number of GPUs")
        return v


class Optimizer(_Section):
    """SGD settings shared by every trial (the paper's recipes differ only here)."""

    momentum: Annotated[Number, Field(ge=0.0, lt=1.0)] = 0.9
    weight_decay: Annotated[Number, Field(ge=0.0)] = 0.0
    nesterov: bool = False
    milestones: list[PositiveInt] = []
    gamma: Annotated[Number, Field(gt=0.0, le=1.0)] = 0.1


class Distributed(_Section):
    """Ray Train settings: each trial trains on ``num_workers`` workers with
    ``gpus_per_worker`` GPUs each (0: CPUs, gloo), data parallel (``ddp``) or module
    parallel (``module``: members split across workers, the paper's section 3.3);
    ``max_failures`` worker-group restarts from the last checkpoint within a trial (-1:
    unlimited). :mod:`orchestration.distributed` runs it (as ``DistributedConfig``)."""

    strategy: Literal["ddp", "module"] = "ddp"
    num_workers: PositiveInt = 2
    gpus_per_worker: Annotated[Number, Field(ge=0.0)] = 0.0
    cpus_per_worker: Positive = 1.0
    max_failures: Annotated[int, Field(ge=-1, strict=True)] = 0

    @field_validator("gpus_per_worker")
    @classmethod
    def _zero_or_one(cls, v: float) -> float:
        # A worker trains on one device; NCCL refuses two ranks sharing a GPU.
        if v not in (0.0, 1.0):
            raise ValueError("must be 0 (CPU workers) or 1; use num_workers for more GPUs")
        return v


def _lr_kind(v: Any) -> str:
    if isinstance(v, str):
        return "preset"
    if isinstance(v, Range) or isinstance(v, dict) and set(v) <= {"low", "high", "log"}:
        return "range"
    return "table" if isinstance(v, dict | LrTable) else "value"


# The tags below appear in pydantic's error locations; they are not keys of the file.
_TAGS = {"preset", "value", "range", "table", "list", "count", "grid", "optuna", "none", "asha"}

LamSpec = Annotated[
    Annotated[Annotated[list[Lam], Field(min_length=1)], Tag("list")]
    | Annotated[LamRange, Tag("range")],
    Discriminator(lambda v: "range" if isinstance(v, dict | Range) else "list"),
]
LrSpec = Annotated[
    Annotated[Literal["paper"], Tag("preset")]
    | Annotated[Positive, Tag("value")]
    | Annotated[Range, Tag("range")]
    | Annotated[LrTable, Tag("table")],
    Discriminator(_lr_kind),
]
TrialsSpec = Annotated[
    Annotated[PositiveInt, Tag("count")]
    | Annotated[Annotated[list[NonNegativeInt], Field(min_length=1)], Tag("list")],
    Discriminator(lambda v: "list" if isinstance(v, list) else "count"),
]


class SearchSpace(_Section):
    """One experiment: what to train (models x λ x lr x trials) and how to schedule it."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)]
    description: str = ""
    dataset: str = "fashion-mnist"
    models: Annotated[list[str], Field(min_length=1)]
    lam: LamSpec
    lr: LrSpec = "paper"
    trials: TrialsSpec = 1
    epochs: PositiveInt
    batch_size: PositiveInt = 100
    val_size: PositiveInt | None = None  # None: the dataset's default (10,000 for images)
    subset: PositiveInt | None = None
    augment: bool | None = None  # None: as the paper (CIFAR only)
    data_dir: str | None = None
    model_overrides: dict[str, Any] = {}
    optimizer: Optimizer = Optimizer()
    search: Annotated[GridSearch | OptunaSearch, Field(discriminator="type")] = GridSearch()
    scheduler: Annotated[NoScheduler | Asha, Field(discriminator="type")] = NoScheduler()
    resources: Resources = Resources()
    max_concurrent: PositiveInt | None = None
    max_failures: NonNegativeInt = 1
    distributed: Distributed | None = None

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from modloss.data import DATASETS

        if v not in DATASETS:
            raise ValueError(f"unknown dataset; allowed: {', '.join(DATASETS)}")
        return v

    @field_validator("models")
    @classmethod
    def _known_models(cls, v: list[str]) -> list[str]:
        from modloss.models import list_models

        known = list_models()
        bad = [m for m in v if m not in known]
        if bad:
            raise ValueError(f"unknown model {', '.join(bad)}; allowed: {', '.join(known)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SearchSpace:
        grid = isinstance(self.search, GridSearch)
        if grid and isinstance(self.lam, Range):
            raise ValueError("lam: a range needs search.type 'optuna'; a grid needs a list")
        if grid and isinstance(self.lr, Range):
            raise ValueError("lr: a range needs search.type 'optuna'; a grid needs values")
        if self.lr == "paper" and isinstance(self.lam, Range):
            raise ValueError(
                "lr: the 'paper' preset exists only at the paper's λ values; with a λ range "
                "give a number or a range"
            )
        if isinstance(self.lr, LrTable) and not grid:
            raise ValueError(
                "lr: a table needs search.type 'grid'; when Optuna samples the model or λ, "
                "give a number, a range or 'paper'"
            )
        if isinstance(self.lr, LrTable):
            unknown = [m for m in self.lr.entries if m not in self.models]
            if unknown:
                raise ValueError(f"lr: table rows for models not in models: {unknown}")
            for model in self.models:
                for lam in self.lam:
                    if self.lr.lookup(model, lam) is None:
                        raise ValueError(
                            f"lr: no learning rate for model {model} at λ={lam} "
                            "(add that λ or a 'default' to its row)"
                        )
        if isinstance(self.scheduler, Asha):
            max_t = self.scheduler.max_t or self.epochs
            if max_t > self.epochs or self.scheduler.grace_period > max_t:
                raise ValueError(
                    f"scheduler: need grace_period ({self.scheduler.grace_period}) <= max_t "
                    f"({max_t}) <= epochs ({self.epochs})"
                )
        late = [m for m in self.optimizer.milestones if m >= self.epochs]
        if late:
            raise ValueError(f"optimizer.milestones {late} must be below epochs ({self.epochs})")
        return self

    @property
    def trial_ids(self) -> list[int]:
        return list(range(self.trials)) if isinstance(self.trials, int) else list(self.trials)

    @property
    def device(self) -> str:
        return "cuda" if self.resources.gpus > 0 else "cpu"

    def base_config(self) -> dict[str, Any]:
        """The TrainConfig fields every trial shares."""
        return {
            "dataset": self.dataset,
            "model_overrides": dict(self.model_overrides),
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "val_size": self.val_size,
            "subset": self.subset,
            "augment": self.augment,
            "data_dir": self.data_dir,
            "device": self.device,
            **self.optimizer.model_dump(),
        }

    def lr_for(self, model: str, lam: float) -> float | None:
        """The learning rate of a (model, λ) point; None for the paper preset (TrainConfig
        resolves it) and for a sampled range."""
        if isinstance(self.lr, LrTable):
            return self.lr.lookup(model, lam)
        if isinstance(self.lr, Range) or self.lr == "paper":
            return None
        return float(self.lr)

    def points(self) -> list[dict[str, Any]]:
        """Unvalidated trial configs: every grid point in a stable order, or for a sampled
        space, every model at the ends of the ranges."""
        lams = [self.lam.low, self.lam.high] if isinstance(self.lam, Range) else self.lam
        lrs = [self.lr.low, self.lr.high] if isinstance(self.lr, Range) else [None]
        grid = isinstance(self.search, GridSearch)
        trials = self.trial_ids if grid else self.trial_ids[:1]
        base = self.base_config()
        return [
            {**base, "model": m, "lam": lam, "trial": t, "lr": lr or self.lr_for(m, lam)}
            for m in self.models
            for t in trials
            for lam in lams
            for lr in lrs
        ]

    def grid(self) -> list[dict[str, Any]]:
        """Every trial of a grid search as its full TrainConfig dict."""
        if not isinstance(self.search, GridSearch):
            raise ValueError(f"search type {self.search.type!r} has no grid")
        return [train_config(p) for p in self.points()]


def _lr_row(model: Any, row: Any) -> dict[str, float]:
    where = f"lr table row {model!r}"
    if not isinstance(row, dict):
        row = {"default": row}
    out: dict[str, float] = {}
    for key, lr in row.items():
        if key != "default":
            try:
                lam = float(key)
            except (TypeError, ValueError):
                lam = math.nan
            if not 0.0 <= lam <= 1.0:
                raise ValueError(f"{where}: key {key!r} must be a λ in [0, 1] or 'default'")
            key = repr(lam)
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not (0 < lr < math.inf):
            raise ValueError(f"{where}, {key}: learning rate {lr!r} must be a positive number")
        out[str(key)] = float(lr)
    return out


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TAGS:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _error_lines(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        # Errors between keys (empty location) name their keys in the message.
        line = f"  {_loc(e['loc'])}: {e.get('input')!r}: {msg}" if e["loc"] else f"  {msg}"
        if line not in lines:
            lines.append(line)
    return lines


def train_config(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's :class:`modloss.train.TrainConfig` as a dict (``lr`` resolved), validated on
    any machine: the device is checked where the trial runs, not here."""
    from modloss.train import TrainConfig

    checked = TrainConfig.model_validate({**config, "device": "cpu"}).model_dump()
    return {**checked, "device": config.get("device", "cpu")}


def _check_train_configs(space: SearchSpace) -> str | None:
    for cfg in space.points():
        try:
            train_config(cfg)
        except ValidationError as exc:
            point = f"model={cfg['model']} lam={cfg['lam']} trial={cfg['trial']} lr={cfg['lr']}"
            lines = [f"trial ({point}) is not a valid modloss.train.TrainConfig:"]
            return "\n".join(lines + _error_lines(exc))
    return None


def load_space(path: str | Path, **overrides: Any) -> SearchSpace:
    """Read, validate and check a search-space YAML file; ``overrides`` replace top-level keys.

    Raises:
        SpaceError: with the file, the key, the bad value and what is allowed.
    """
    path = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SpaceError(f"{path}: cannot read search space: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path}: malformed YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: a search space must be a mapping of keys, got {data!r}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as exc:
        raise SpaceError("\n".join([f"{path}: invalid search space", *_error_lines(exc)])) from None
    problem = _check_train_configs(space)
    if problem is not None:
        raise SpaceError(f"{path}: {problem}")
    return space
