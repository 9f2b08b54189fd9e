"""A trial's Tune reports, derived from its :class:`modloss.records.RunResult` without
renaming: the run's summary metrics (:data:`modloss.names.SUMMARY_METRICS`, so
``val_error`` and ``test_error`` are the values at the best-validation epoch so far) and
the latest epoch's point of every per-epoch curve (``epoch/...``). A packed trial reports
each of its points' reports under ``points``."""

from __future__ import annotations

import math
from typing import Any

from modloss.names import SUMMARY_METRICS
from modloss.records import RunResult

__all__ = [
    "METRIC",
    "MODE",
    "OBJECTIVES",
    "OWN_KEY",
    "POINTS_KEY",
    "epoch_report",
    "own_values",
    "pack_report",
    "summary_report",
]

METRIC = "val_error"  # model selection only ever sees validation
MODE = "min"
# The summary metrics a search may minimise (search.objectives): the validation ones, all
# lower-is-better, all at the best-validation epoch.
OBJECTIVES = tuple(name for name in SUMMARY_METRICS if name.startswith("val_"))
POINTS_KEY = "points"  # a packed trial's reports: one per point, in pack order
OWN_KEY = "own"  # an unfinished run's own values of the OBJECTIVES its summary hides


def epoch_report(result: RunResult) -> dict[str, Any]:
    """The report after each epoch: ``epoch``, ``status``, the summary so far (NaN where
    there is no value yet) and the curves' latest points."""
    report: dict[str, Any] = {"epoch": result.epochs_completed, "status": result.status}
    for name in SUMMARY_METRICS:
        value = getattr(result, name)
        report[name] = math.nan if value is None else value
    if result.history:
        report.update(result.history[-1].curves())
    return report


def summary_report(result: RunResult) -> dict[str, Any]:
    """The trial's closing report (``summary: True``). Searchers read their objectives
    from the last report (Optuna its every objective, at the best-validation epoch), so a
    run that did not finish has none (NaN); its own values stay under ``OWN_KEY``, for
    the results table and MLflow (:func:`own_values`)."""
    report = {**epoch_report(result), "summary": True}
    if result.status != "finished":
        report[OWN_KEY] = {name: report[name] for name in OBJECTIVES}
        report.update(dict.fromkeys(OBJECTIVES, math.nan))
    return report


def own_values(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` with the run's own summary values (``RunResult.summary``, as in
    results.json), also those :func:`summary_report` hides from searchers."""
    return {**report, **report.get(OWN_KEY, {})}


def pack_report(results: list[RunResult], *, summary: bool = False) -> dict[str, Any]:
    """A packed trial's report: every point's own report (its epoch report, or its summary)
    under ``points``; for Tune, the pack's epoch and the best ``val_error`` of its points."""
    points = [summary_report(r) if summary else epoch_report(r) for r in results]
    values = [p[METRIC] for p in points if math.isfinite(p[METRIC])]
    report = {
        "epoch": max(r.epochs_completed for r in results),
        METRIC: min(values, default=math.nan),
        POINTS_KEY: points,
    }
    return {**report, "summary": True} if summary else report
