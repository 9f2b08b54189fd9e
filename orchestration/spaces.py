"""Search spaces: the schema of ``search_spaces/*.yaml`` and its expansion into trials.

A space holds two kinds of keys, all at the top level of the file:

- the settings every trial shares: :class:`modloss.config.TrainConfig`'s fields (``dataset``,
  ``epochs``, ``batch_size``, ``momentum``, ``milestones``, ...; all but the swept ``model``,
  ``lam``, ``lr``, ``trial`` and ``device``, which follows ``resources.gpus``), with
  TrainConfig's own defaults and validation;
- sweep dimensions and scheduling: ``models``, ``lam``, ``lr``, ``trials`` (whose values
  have TrainConfig's field types), ``search``, ``scheduler``, ``resources``,
  ``max_concurrent``, ``max_failures``, ``distributed``, ``pack`` (a grid's points that
  differ only in :data:`modloss.pack.FUSIBLE_KEYS` trained as one Ray trial each, see
  :meth:`SearchSpace.packs`).

Where validation happens: :func:`load_space` (``SearchSpace.model_validate``) checks the
file and builds every grid point (for a sampled search, every model at the ends of the
ranges) as a TrainConfig, once, before Ray starts; :meth:`SearchSpace.grid` returns those
validated configs. A Tune trial rebuilds its TrainConfig from the dict it is handed, in
its own process (deserialisation; its device is checked there), and the MLflow logger
resolves each trial's learning rate with :func:`train_config` (a sampled trial's first
validation). Errors name the file, the key, the bad value and what is allowed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    RootModel,
    Tag,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from modloss.config import TrainConfig
from orchestration.reports import METRIC, OBJECTIVES

__all__ = [
    "SETTINGS",
    "Asha",
    "Distributed",
    "GridSearch",
    "LrTable",
    "NoScheduler",
    "OptunaSearch",
    "Range",
    "Resources",
    "SearchSpace",
    "SpaceError",
    "load_space",
    "train_config",
]

# The TrainConfig fields every trial of a space shares: all but those the sweep sets (from
# models, lam, lr, trials) and the device, which follows resources.gpus.
SETTINGS = tuple(
    k for k in TrainConfig.model_fields if k not in {"model", "lam", "lr", "trial", "device"}
)


def _field_type(name: str, annotation: Any = None) -> Any:
    """TrainConfig's type of field ``name``, bounds and validators included."""
    field = TrainConfig.model_fields[name]
    return Annotated[annotation or field.annotation, *field.metadata]


Lam = _field_type("lam")
Lr = _field_type("lr", float)  # a space spells TrainConfig's lr=None (the preset) 'paper'
Model = _field_type("model")
Trial = _field_type("trial")


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("expected a number, not a boolean")
    return v


Number = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
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
            _refuse_unknown(data, list(cls.model_fields))
        return data


def _refuse_unknown(data: dict, allowed: list[str]) -> None:
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ValueError(
            f"unknown key {', '.join(repr(k) for k in unknown)}; allowed keys: {', '.join(allowed)}"
        )


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
    """A uniform λ interval; its ends are TrainConfig λs."""

    low: Lam
    high: Lam

    @model_validator(mode="after")
    def _uniform(self) -> LamRange:
        if self.log:
            raise ValueError("a λ range must be uniform (log: false)")
        return self


class LrRange(Range):
    """A learning-rate interval; its ends are TrainConfig learning rates."""

    low: Lr
    high: Lr


_LamKey = Annotated[
    Annotated[Literal["default"], Tag("default-key")] | Annotated[Lam, Tag("λ-key")],
    Discriminator(lambda k: "default-key" if k == "default" else "λ-key"),
]


class LrTable(RootModel[dict[str, dict[_LamKey, Lr]]]):
    """Learning rate per model, optionally per λ: ``{model: lr | {λ: lr, default: lr}}``."""

    model_config = ConfigDict(frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _rows(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {str(m): r if isinstance(r, dict) else {"default": r} for m, r in data.items()}
        return data

    def lookup(self, model: str, lam: float) -> float | None:
        row = self.root.get(model, {})
        for key, lr in row.items():
            if key != "default" and math.isclose(key, lam, abs_tol=1e-9):
                return lr
        return row.get("default")


class GridSearch(_Section):
    """Every combination of models x λ x trials, each run once."""

    type: Literal["grid"] = "grid"


class OptunaSearch(_Section):
    """Optuna over the ranges (and lists, as categorical choices) of the space, minimising
    each of ``objectives`` (trial summary metrics, validation only). ``sampler``: ``tpe``
    (with several objectives Optuna's multi-objective TPE) or ``nsga2`` (NSGA-II)."""

    type: Literal["optuna"]
    num_samples: PositiveInt
    seed: NonNegativeInt = 0
    sampler: Literal["tpe", "nsga2"] = "tpe"
    objectives: Annotated[list[str], Field(min_length=1)] = [METRIC]

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in OBJECTIVES:
                raise ValueError(
                    f"{name!r} is not a metric a search may minimise; allowed: "
                    f"{', '.join(OBJECTIVES)} (validation only: selection never sees test)"
                )
        if len(set(v)) < len(v):
            raise ValueError(f"an objective is listed twice: {v}")
        return v


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
    """Resources per Ray trial (with ``pack: true``, per pack: all its points train on
    them together); a GPU fraction lets several small trials share one GPU."""

    cpus: Positive = 1.0
    gpus: Annotated[Number, Field(ge=0.0)] = 0.0

    @field_validator("gpus")
    @classmethod
    def _whole_or_fraction(cls, v: float) -> float:
        if v > 1 and not float(v).is_integer():
            raise ValueError("gpus must be 0, a fraction in (0, 1], or a whole number of GPUs")
        return v


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
_TAGS = {
    *("preset", "value", "range", "table", "list", "count", "grid", "optuna", "none", "asha"),
    *("default-key", "λ-key"),
}

LamSpec = Annotated[
    Annotated[Annotated[list[Lam], Field(min_length=1)], Tag("list")]
    | Annotated[LamRange, Tag("range")],
    Discriminator(lambda v: "range" if isinstance(v, dict | Range) else "list"),
]
LrSpec = Annotated[
    Annotated[Literal["paper"], Tag("preset")]
    | Annotated[Lr, Tag("value")]
    | Annotated[LrRange, Tag("range")]
    | Annotated[LrTable, Tag("table")],
    Discriminator(_lr_kind),
]
TrialsSpec = Annotated[
    Annotated[PositiveInt, Tag("count")]
    | Annotated[Annotated[list[Trial], Field(min_length=1)], Tag("list")],
    Discriminator(lambda v: "list" if isinstance(v, list) else "count"),
]


class SearchSpace(_Section):
    """One experiment: what to train (models x λ x lr x trials, the other TrainConfig
    fields shared) and how to schedule it."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)]
    description: str = ""
    models: Annotated[list[Model], Field(min_length=1)]
    lam: LamSpec
    lr: LrSpec = "paper"
    trials: TrialsSpec = 1
    search: Annotated[GridSearch | OptunaSearch, Field(discriminator="type")] = GridSearch()
    scheduler: Annotated[NoScheduler | Asha, Field(discriminator="type")] = NoScheduler()
    resources: Resources = Resources()
    max_concurrent: PositiveInt | None = None
    max_failures: NonNegativeInt = 1
    distributed: Distributed | None = None
    pack: bool = False
    # The file's SETTINGS keys as written; validated as part of every trial's TrainConfig.
    settings: dict[str, Any] = {}

    _configs: list[TrainConfig] = PrivateAttr(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        own = [k for k in cls.model_fields if k != "settings"]
        _refuse_unknown(data, [*own, *SETTINGS])
        shared = {k: v for k, v in data.items() if k in SETTINGS}
        return {**{k: v for k, v in data.items() if k in own}, "settings": shared}

    @model_serializer(mode="wrap")
    def _flat(self, handler: Any) -> dict[str, Any]:
        """The space as a file would hold it, every shared setting as validated."""
        data = handler(self)
        data.pop("settings", None)
        if not data.get("pack"):  # as spaces were before the key: a sweep recorded then resumes
            data.pop("pack", None)
        return {**data, **{k: v for k, v in self.base_config().items() if k != "device"}}

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
            unknown = [m for m in self.lr.root if m not in self.models]
            if unknown:
                raise ValueError(f"lr: table rows for models not in models: {unknown}")
            for model in self.models:
                for lam in self.lam:
                    if self.lr.lookup(model, lam) is None:
                        raise ValueError(
                            f"lr: no learning rate for model {model} at λ={lam} "
                            "(add that λ or a 'default' to its row)"
                        )
        if self.pack:
            _check_packable(self)
        self._configs = _train_configs(self.points())
        if isinstance(self.scheduler, Asha) and len(self.objectives) > 1:
            raise ValueError(
                f"scheduler: ASHA stops trials on one metric, but search.objectives has "
                f"{len(self.objectives)} ({', '.join(self.objectives)}); use scheduler type "
                "'none' for a multi-objective search"
            )
        if isinstance(self.scheduler, Asha):
            max_t = self.scheduler.max_t or self.epochs
            if max_t > self.epochs or self.scheduler.grace_period > max_t:
                raise ValueError(
                    f"scheduler: need grace_period ({self.scheduler.grace_period}) <= max_t "
                    f"({max_t}) <= epochs ({self.epochs})"
                )
        return self

    @property
    def trial_ids(self) -> list[int]:
        return list(range(self.trials)) if isinstance(self.trials, int) else list(self.trials)

    @property
    def objectives(self) -> list[str]:
        """The summary metrics the search minimises (a grid has none to choose by but
        :data:`orchestration.reports.METRIC`)."""
        return [METRIC] if isinstance(self.search, GridSearch) else list(self.search.objectives)

    @property
    def device(self) -> str:
        return "cuda" if self.resources.gpus > 0 else "cpu"

    @property
    def epochs(self) -> int:
        """Every trial's epochs (a shared setting): the schedulers' budget."""
        return self._configs[0].epochs

    def base_config(self) -> dict[str, Any]:
        """The TrainConfig fields every trial shares, as validated, and the device."""
        return {k: getattr(self._configs[0], k) for k in SETTINGS} | {"device": self.device}

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
        return [
            {**self.settings, "model": m, "lam": lam, "trial": t, "lr": lr or self.lr_for(m, lam)}
            for m in self.models
            for t in trials
            for lam in lams
            for lr in lrs
        ]

    def grid(self) -> list[dict[str, Any]]:
        """Every trial of a grid search as its full TrainConfig dict, validated once, when
        the space was."""
        if not isinstance(self.search, GridSearch):
            raise ValueError(f"search type {self.search.type!r} has no grid")
        return [{**cfg.model_dump(), "device": self.device} for cfg in self._configs]

    def packs(self, points: list[dict[str, Any]] | None = None) -> list[list[dict[str, Any]]]:
        """``points`` (grid points; default the whole grid) in packs: the points that agree
        on every setting but the fusible ones (:data:`modloss.pack.FUSIBLE_KEYS`: λ, lr,
        ...), in grid order, one pack per Ray trial (``pack: true``); else every point its
        own pack of one."""
        points = self.grid() if points is None else points
        if not self.pack:
            return [[point] for point in points]
        import json

        from modloss.pack import FUSIBLE_KEYS  # torch: only once a sweep runs

        packs: dict[str, list[dict[str, Any]]] = {}
        for point in points:
            shared = {k: v for k, v in point.items() if k not in FUSIBLE_KEYS}
            packs.setdefault(json.dumps(shared, sort_keys=True), []).append(point)
        return list(packs.values())


def _check_packable(space: SearchSpace) -> None:
    """``pack: true`` needs every point known up front and each trained on one device."""
    if not isinstance(space.search, GridSearch):
        raise ValueError(
            f"pack: true needs search.type 'grid', not {space.search.type!r}: a searcher "
            "picks one point per trial as it goes, so there is no set of points to pack"
        )
    if isinstance(space.scheduler, Asha):
        raise ValueError(
            "pack: true cannot run with scheduler.type 'asha': ASHA stops trials one by one "
            "and a packed trial trains several points at once; use scheduler.type 'none'"
        )
    if space.distributed is not None:
        raise ValueError(
            "pack: true cannot run with a distributed: section: a pack trains on one "
            "device; remove one of the two"
        )


def _validated(config: dict[str, Any]) -> TrainConfig:
    # On any machine: the device is checked where the trial runs, not here.
    return TrainConfig.model_validate({**config, "device": "cpu"})


def _train_configs(points: list[dict[str, Any]]) -> list[TrainConfig]:
    """``points`` as TrainConfigs; the problems of all of them at once, each once (a bad
    shared setting is the same problem at every point)."""
    configs, problems = [], []
    for point in points:
        try:
            configs.append(_validated(point))
        except ValidationError as exc:
            problems += [line for line in _error_lines(exc) if line not in problems]
    if problems:
        raise ValueError("\n  ".join(problems))
    return configs


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
        line = f"{_loc(e['loc'])}: {e.get('input')!r}: {msg}" if e["loc"] else msg
        if line not in lines:
            lines.append(line)
    return lines


def train_config(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's :class:`modloss.train.TrainConfig` as a dict (``lr`` resolved), validated on
    any machine: the device is checked where the trial runs, not here."""
    return {**_validated(config).model_dump(), "device": config.get("device", "cpu")}


def load_space(path: str | Path, **overrides: Any) -> SearchSpace:
    """Read and validate a search-space YAML file; ``overrides`` replace top-level keys.

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
        return SearchSpace.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: invalid search space", *_error_lines(exc)]
        raise SpaceError("\n  ".join(lines)) from None
