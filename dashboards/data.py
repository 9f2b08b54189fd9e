"""A sweep's tracked runs, read back from MLflow into tidy tables.

The names read here are the ones ``orchestration.tracking`` writes: a parent run per sweep
(tag ``modloss.role = sweep``, ``sweep_id``), one child run per trial (tags ``model``,
``num_members``, ``lam``, ``trial``, ``status``; summary metrics ``best_epoch``,
``val_error``, ``test_error`` ... at the best-validation epoch; per-epoch curves
``epoch/...`` with step = epoch; the selected epoch's uncertainty scalars ``temperature``,
``test_nll_scaled``, ``ood_auroc_msp`` ...) and the per-trial CSV artifacts
(``robustness.csv``, ``specialists.csv``, ``member_entropy.csv``, ``confusion.csv``,
``shift.csv``, ``reliability.csv``). Anything missing (a trial
still running, an artifact never written) becomes absent rows, never an error: the report
shows the gap.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from modloss.names import (
    CONFUSION_CSV,
    MEMBER_ENTROPY_CSV,
    NUM_MEMBERS_TAG,
    OOD_DATASET_TAG,
    PARENT_TAG,
    RELIABILITY_CSV,
    ROBUSTNESS_CSV,
    ROLE_TAG,
    SELECTED_EPOCH_METRICS,
    SHIFT_CSV,
    SPECIALISTS_CSV,
    SUMMARY_METRICS,
    SWEEP_ID_TAG,
    SWEEP_ROLE,
    curve,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = [
    "CURVE_METRICS",
    "ExperimentNotFound",
    "SweepData",
    "load_sweep",
]

# One value per run: the summary and the selected epoch's uncertainty scalars.
RUN_METRICS = (*SUMMARY_METRICS, *SELECTED_EPOCH_METRICS)
RUN_COLUMNS = [
    "run_id", "model", "num_members", "lam", "trial", "status", "ood_dataset", *RUN_METRICS
]  # fmt: skip
# Fig. 3: the test losses at the best-validation epoch (column: per-epoch curve).
LOSS_METRICS = {"ensemble_nll": curve("test_ensemble_nll"), "member_nll": curve("test_member_nll")}
# Learner collusion: the members' diversity (ambiguity, Eq. 6) on their training batches and
# on held-out validation data at the best-validation epoch.
DIVERSITY_METRICS = {
    "train_ambiguity": curve("train_ambiguity"),
    "val_ambiguity": curve("val_ambiguity"),
}
SHIFT_COLUMNS = ("angle", "accuracy", "nll", "ece", "member_accuracy", "member_ece")
RELIABILITY_COLUMNS = ("lower", "upper", "count", "confidence", "accuracy")
# Fig. 7: error over epochs, ensemble and members (column: per-epoch curve).
CURVE_METRICS = {
    name: curve(name)
    for name in (
        "test_error",
        "test_member_error_min",
        "test_member_error_mean",
        "test_member_error_max",
    )
}
# Trial outcomes whose best-validation test error is a result.
DONE = ("finished", "diverged")
_FETCH_THREADS = 8


class ExperimentNotFound(LookupError):
    """No such MLflow experiment (the message lists the ones that exist)."""


def _empty(*columns: str) -> pd.DataFrame:
    return pd.DataFrame(columns=list(columns))


@dataclass
class SweepData:
    """Everything the report draws, as tidy frames keyed by ``model``, ``lam``, ``trial``."""

    experiment: str
    experiment_id: str | None = None
    tracking_uri: str = ""
    sweep_id: str | None = None
    parent_run_id: str | None = None
    runs: pd.DataFrame = field(default_factory=lambda: _empty(*RUN_COLUMNS))
    # model, lam, trial, ensemble_nll, member_nll
    losses: pd.DataFrame = field(
        default_factory=lambda: _empty("model", "lam", "trial", *LOSS_METRICS)
    )
    # model, lam, trial, train_ambiguity, val_ambiguity (at the best epoch)
    diversity: pd.DataFrame = field(
        default_factory=lambda: _empty("model", "lam", "trial", *DIVERSITY_METRICS)
    )
    # model, lam, trial, angle, accuracy, nll, ece, member_... (test set rotated by angle)
    shift: pd.DataFrame = field(
        default_factory=lambda: _empty("model", "lam", "trial", *SHIFT_COLUMNS)
    )
    # model, lam, trial, lower, upper, count, confidence, accuracy (test reliability bins)
    reliability: pd.DataFrame = field(
        default_factory=lambda: _empty("model", "lam", "trial", *RELIABILITY_COLUMNS)
    )
    # model, lam, trial, epoch, *CURVE_METRICS
    curves: pd.DataFrame = field(
        default_factory=lambda: _empty("model", "lam", "trial", "epoch", *CURVE_METRICS)
    )
    # model, lam, trial, dropped, accuracy (drop-k scheme, mean over draws)
    robustness: pd.DataFrame = field(
        default_factory=lambda: _empty("model", "lam", "trial", "dropped", "accuracy")
    )
    # model, lam, trial, class, random_member, specialist_member, random_subset, specialist_subset
    specialists: pd.DataFrame = field(
        default_factory=lambda: _empty(
            "model",
            "lam",
            "trial",
            "class",
            "random_member",
            "specialist_member",
            "random_subset",
            "specialist_subset",
        )
    )
    # model, lam, trial, member, entropy (mean predictive entropy on the test set, nats)
    entropy: pd.DataFrame = field(
        default_factory=lambda: _empty("model", "lam", "trial", "member", "entropy")
    )
    # model, lam, trial, member, true, predicted, count
    confusion: pd.DataFrame = field(
        default_factory=lambda: _empty(
            "model", "lam", "trial", "member", "true", "predicted", "count"
        )
    )

    # One line per (model, lam, trial) that had more than one run (counted once).
    duplicates: list[str] = field(default_factory=list)

    @property
    def done(self) -> pd.DataFrame:
        """Runs with a result: finished or diverged, with a best-validation test error."""
        runs = self.runs
        ok = runs["status"].isin(DONE) & runs["test_error"].notna()
        return runs[ok]

    def members(self, model: str) -> int:
        """The ensemble size of ``model``, from its runs' logged model configuration (tag
        ``num_members``); 1 for a model with no such run."""
        sizes = self.runs.loc[self.runs["model"] == model, "num_members"].dropna()
        return int(sizes.iloc[0]) if len(sizes) else 1


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def _find_experiment(client: MlflowClient, name: str, tracking_uri: str):
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments(max_results=1000))
        available = ", ".join(repr(n) for n in names) or "none"
        raise ExperimentNotFound(
            f"no MLflow experiment named {name!r} at {tracking_uri}; "
            f"available experiments: {available}"
        )
    return experiment


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    if name in frame.columns:
        return frame[name]
    return pd.Series([None] * len(frame), index=frame.index, dtype=object)


def _child_runs(experiment_id: str, parent_run_id: str | None) -> pd.DataFrame:
    import mlflow

    # Without a parent (runs logged by hand), every run that has the trial tags counts.
    query = "" if parent_run_id is None else f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    frame = mlflow.search_runs([experiment_id], filter_string=query)
    frame = frame[_column(frame, "tags.model").notna() & _column(frame, "tags.lam").notna()]
    runs = pd.DataFrame(
        {
            "run_id": _column(frame, "run_id"),
            "model": _column(frame, "tags.model"),
            "num_members": pd.to_numeric(
                _column(frame, f"tags.{NUM_MEMBERS_TAG}"), errors="coerce"
            ),
            "lam": pd.to_numeric(_column(frame, "tags.lam"), errors="coerce"),
            "trial": pd.to_numeric(_column(frame, "tags.trial"), errors="coerce"),
            "status": _column(frame, "tags.status").fillna("unknown"),
            "ood_dataset": _column(frame, f"tags.{OOD_DATASET_TAG}"),
        }
    )
    for metric in RUN_METRICS:
        runs[metric] = pd.to_numeric(_column(frame, f"metrics.{metric}"), errors="coerce")
    runs = runs.dropna(subset=["lam", "trial"]).astype({"trial": int})
    return runs.sort_values(["model", "lam", "trial"], kind="stable").reset_index(drop=True)


def unique_trials(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """``runs`` with one run per (model, lam, trial), a finished one where there is one, and
    a line naming each (model, lam, trial) that had several runs and the runs left out."""
    key = ["model", "lam", "trial"]
    has_result = runs["status"].isin(DONE) & runs["test_error"].notna()
    ranked = runs.assign(_rank=~has_result).sort_values([*key, "_rank"], kind="stable")
    keep = ~ranked.duplicated(key)
    lines = []
    for (model, lam, trial), group in ranked[ranked.duplicated(key, keep=False)].groupby(key):
        kept, *dropped = group["run_id"].tolist()
        lines.append(
            f"{model} λ={lam:g} trial {trial} has {len(group)} runs: counted once (run {kept}), "
            f"left out {', '.join(dropped)}"
        )
    unique = ranked[keep].drop(columns="_rank").sort_index()
    return unique.reset_index(drop=True), lines


def _parent_run(experiment_id: str, sweep_id: str | None) -> pd.Series | None:
    import mlflow

    query = f"tags.`{ROLE_TAG}` = '{SWEEP_ROLE}'"
    if sweep_id is not None:
        query += f" and tags.{SWEEP_ID_TAG} = '{sweep_id}'"
    parents = mlflow.search_runs([experiment_id], filter_string=query, order_by=["start_time DESC"])
    if parents.empty:
        if sweep_id is not None:
            raise ExperimentNotFound(f"no sweep with sweep_id {sweep_id!r} in this experiment")
        return None
    return parents.iloc[0]


def _fetch_all(fn: Callable, items: list) -> list:
    if not items:
        return []
    with ThreadPoolExecutor(_FETCH_THREADS) as pool:
        return list(pool.map(fn, items))


def _histories(client: MlflowClient, runs: pd.DataFrame, metrics: dict[str, str]) -> pd.DataFrame:
    """Per-epoch values of the curves ``metrics`` (column -> MLflow metric) for ``runs``:
    model, lam, trial, epoch, *columns."""

    def fetch(row: dict) -> pd.DataFrame:
        series = {}
        for column, metric in metrics.items():
            points = client.get_metric_history(row["run_id"], metric)
            series[column] = pd.Series({p.step: p.value for p in points}, dtype=float)
        frame = pd.DataFrame(series).rename_axis("epoch").reset_index()
        return frame.assign(model=row["model"], lam=row["lam"], trial=row["trial"])

    frames = [f for f in _fetch_all(fetch, runs.to_dict("records")) if len(f)]
    columns = ["model", "lam", "trial", "epoch", *metrics]
    if not frames:
        return _empty(*columns)
    return pd.concat(frames, ignore_index=True)[columns]


def _artifact_tables(
    client: MlflowClient, runs: pd.DataFrame, name: str, workdir: Path
) -> pd.DataFrame:
    """The CSV artifact ``name`` of every run that has one, tagged with model, lam, trial."""

    def fetch(row: dict) -> pd.DataFrame | None:
        available = {f.path for f in client.list_artifacts(row["run_id"])}
        if name not in available:
            return None
        dst = workdir / row["run_id"]
        dst.mkdir(exist_ok=True)
        path = client.download_artifacts(row["run_id"], name, str(dst))
        frame = pd.read_csv(path)
        return frame.assign(model=row["model"], lam=row["lam"], trial=row["trial"])

    frames = [f for f in _fetch_all(fetch, runs.to_dict("records")) if f is not None]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _at_best_epoch(
    client: MlflowClient, done: pd.DataFrame, metrics: dict[str, str]
) -> pd.DataFrame:
    """The curves ``metrics`` (column -> MLflow metric) at each run's best epoch."""
    history = _histories(client, done, metrics)
    best = done[["model", "lam", "trial", "best_epoch"]].rename(columns={"best_epoch": "epoch"})
    merged = history.merge(best, on=["model", "lam", "trial", "epoch"])
    return merged[["model", "lam", "trial", *metrics]]


def _robustness_curves(table: pd.DataFrame) -> pd.DataFrame:
    if table.empty or "scheme" not in table.columns:
        return _empty("model", "lam", "trial", "dropped", "accuracy")
    drop = table[table["scheme"] == "drop_k"]
    return drop.groupby(["model", "lam", "trial", "dropped"], as_index=False)["accuracy"].mean()


def first_trials(runs: pd.DataFrame) -> pd.DataFrame:
    """The lowest-numbered trial of each (model, lam): the "single trial" figures use it."""
    if runs.empty:
        return runs
    first = runs.groupby(["model", "lam"])["trial"].transform("min")
    return runs[runs["trial"] == first]


def load_sweep(experiment: str, *, tracking_uri: str, sweep_id: str | None = None) -> SweepData:
    """Read the latest sweep (or sweep ``sweep_id``) of MLflow experiment ``experiment``.

    Raises :class:`ExperimentNotFound` naming the experiments that do exist.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = _find_experiment(client, experiment, tracking_uri)
    with _tracking_uri(tracking_uri):
        parent = _parent_run(exp.experiment_id, sweep_id)
        parent_id = None if parent is None else parent["run_id"]
        runs, duplicates = unique_trials(_child_runs(exp.experiment_id, parent_id))
    data = SweepData(
        duplicates=duplicates,
        experiment=experiment,
        experiment_id=exp.experiment_id,
        tracking_uri=tracking_uri,
        sweep_id=None if parent is None else parent.get(f"tags.{SWEEP_ID_TAG}"),
        parent_run_id=parent_id,
        runs=runs,
    )
    done = data.done
    data.losses = _at_best_epoch(client, done, LOSS_METRICS)
    data.diversity = _at_best_epoch(client, done, DIVERSITY_METRICS)
    data.curves = _histories(client, first_trials(runs), CURVE_METRICS)
    with tempfile.TemporaryDirectory(prefix="modloss-report-") as tmp:
        workdir = Path(tmp)
        data.robustness = _robustness_curves(
            _artifact_tables(client, done, ROBUSTNESS_CSV, workdir)
        )
        specialists = _artifact_tables(client, done, SPECIALISTS_CSV, workdir)
        if not specialists.empty:
            data.specialists = specialists
        single = first_trials(done)
        entropy = _artifact_tables(client, single, MEMBER_ENTROPY_CSV, workdir)
        if not entropy.empty:
            data.entropy = entropy
        confusion = _artifact_tables(client, single, CONFUSION_CSV, workdir)
        if not confusion.empty:
            data.confusion = confusion
        shift = _artifact_tables(client, done, SHIFT_CSV, workdir)
        if not shift.empty:
            data.shift = shift
        reliability = _artifact_tables(client, single, RELIABILITY_CSV, workdir)
        if not reliability.empty:
            data.reliability = reliability
    return data


def fmt_lam(lam: float) -> str:
    return f"{lam:g}"
