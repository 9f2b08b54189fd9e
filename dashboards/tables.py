"""The paper's tables from a sweep's tidy tables, as display frames.

Each builder returns a :class:`pandas.DataFrame` of strings ready for HTML: measured cells
as ``mean ± s.e.`` over trials (with the trial count), the paper's number beside them where
the paper has one, and ``—`` wherever the sweep has no result for a cell.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from dashboards.data import SweepData, first_trials, fmt_lam
from dashboards.figures import focus_model

__all__ = [
    "MISSING",
    "TABLES",
    "error_by_configuration",
    "metrics_by_configuration",
    "table2_mlp",
    "table5_densenet",
    "table6_entropy",
]

MISSING = "—"

# Table 2 rows: label, model, lambda (None: any lambda; an ensemble of one member trains
# the same at every lambda), the paper's test error in percent.
TABLE2_ROWS = [
    ("1-M-1024-H", "1-M-1024-H", None, 10.2),
    ("256-M-4-H (independent, λ = 0)", "256-M-4-H", 0.0, 16.3),
    ("256-M-4-H (joint, λ = 1)", "256-M-4-H", 1.0, 10.5),
    ("256-M-4-H (λ = 0.95)", "256-M-4-H", 0.95, 10.3),
]
TABLE5_MODELS = ["DN-100-12-4", "DN-82-8-8", "DN-64-6-16"]
TABLE5_LAMS = [0.0, 0.5, 0.9, 1.0]
TABLE5_PAPER = {
    "DN-100-12-4": [17.8, 18.8, 20.3, 22.1],
    "DN-82-8-8": [19.9, 20.0, 22.4, 25.7],
    "DN-64-6-16": [25.0, 23.5, 25.9, 29.6],
}
# Table 6 (1 trial of DN-64-6-16): rows min, max, mean, std; columns lambda 0, .5, .9, 1.
TABLE6_PAPER = {
    0.0: [1.0271, 1.0772, 1.0439, 0.0135],
    0.5: [0.9957, 1.0576, 1.0205, 0.0195],
    0.9: [1.0625, 2.4385, 1.8681, 0.3673],
    1.0: [0.1394, 2.2232, 0.9895, 0.6446],
}
_LAM_TOL = 1e-9


def _percent(errors: pd.Series) -> str:
    """``mean ± s.e.`` in percent over trials, with n; ``—`` when empty."""
    values = errors.dropna().to_numpy(dtype=float)
    if len(values) == 0:
        return MISSING
    mean = 100 * values.mean()
    if len(values) == 1:
        return f"{mean:.2f}% (n=1)"
    se = 100 * values.std(ddof=1) / math.sqrt(len(values))
    return f"{mean:.2f}% ± {se:.2f} (n={len(values)})"


def _select(done: pd.DataFrame, model: str, lam: float | None) -> pd.Series:
    rows = done[done["model"] == model]
    if lam is not None:
        rows = rows[np.isclose(rows["lam"].astype(float), lam, atol=_LAM_TOL)]
    return rows["test_error"]


def error_by_configuration(data: SweepData) -> pd.DataFrame:
    """Every configuration x λ of the sweep: test error at the best-validation epoch."""
    runs = data.runs
    if runs.empty:
        return pd.DataFrame({"": ["no runs"]})
    done = data.done
    lams = sorted(runs["lam"].unique())
    models = sorted(runs["model"].unique(), key=lambda m: (data.members(m), m))
    table = pd.DataFrame(
        [[_percent(_select(done, m, lam)) for lam in lams] for m in models],
        index=pd.Index(models, name="model"),
        columns=[f"λ={fmt_lam(lam)}" for lam in lams],
    )
    return table


def _mean_se(values: pd.Series) -> str:
    """``mean ± s.e. (n=...)`` of a metric over trials, 4 significant digits; ``—`` if none."""
    values = values.dropna().to_numpy(dtype=float)
    if len(values) == 0:
        return MISSING
    if len(values) == 1:
        return f"{values[0]:.4g} (n=1)"
    se = values.std(ddof=1) / math.sqrt(len(values))
    return f"{values.mean():.4g} ± {se:.2g} (n={len(values)})"


def metrics_by_configuration(data: SweepData) -> pd.DataFrame:
    """Every metric logged per run (the summary at the best-validation epoch, the test NLL
    and the members' train / held-out diversity there, the selected epoch's uncertainty
    scalars), one row per (model, λ): mean ± s.e. over trials."""
    done = data.done
    if done.empty:
        return pd.DataFrame({"": ["no finished runs"]})
    key = ["model", "lam", "trial"]
    frame = done.merge(data.losses, on=key, how="left").merge(data.diversity, on=key, how="left")
    frame = frame.rename(columns={"ensemble_nll": "test_ensemble_nll"})
    frame = frame.rename(columns={"member_nll": "test_member_nll"})
    skip = {*key, "run_id", "num_members", "status", "ood_dataset", "epochs_completed"}
    metrics = [c for c in frame.columns if c not in skip and frame[c].notna().any()]
    models = sorted(frame["model"].unique(), key=lambda m: (data.members(m), m))
    rows = []
    for model in models:
        for lam in sorted(frame.loc[frame["model"] == model, "lam"].unique()):
            cell = frame[(frame["model"] == model) & (frame["lam"] == lam)]
            rows.append(
                {"model": model, "λ": fmt_lam(lam), **{m: _mean_se(cell[m]) for m in metrics}}
            )
    return pd.DataFrame(rows).set_index(["model", "λ"])


def table2_mlp(data: SweepData) -> pd.DataFrame:
    """Table 2: one large MLP against 256 small ones at λ = 0, 1 and 0.95."""
    done = data.done
    rows = []
    for label, model, lam, paper in TABLE2_ROWS:
        rows.append(
            {
                "architecture": label,
                "test error": _percent(_select(done, model, lam)),
                "paper": f"{paper:.1f}%",
            }
        )
    return pd.DataFrame(rows).set_index("architecture")


def table5_densenet(data: SweepData) -> pd.DataFrame:
    """Table 5: DenseNet ensembles on CIFAR-100 at λ = 0, 0.5, 0.9, 1 (paper in brackets)."""
    done = data.done
    table = {}
    for j, lam in enumerate(TABLE5_LAMS):
        column = []
        for model in TABLE5_MODELS:
            measured = _percent(_select(done, model, lam))
            column.append(f"{measured} [paper {TABLE5_PAPER[model][j]:.1f}%]")
        table[f"λ={fmt_lam(lam)}"] = column
    return pd.DataFrame(table, index=pd.Index(TABLE5_MODELS, name="model"))


def table6_entropy(data: SweepData, *, model: str | None = None) -> pd.DataFrame:
    """Table 6: min / max / mean / std over members of each member's mean predictive
    entropy on the test set, one trial of one configuration, per λ."""
    entropy = data.entropy
    if model is None:
        model = (
            focus_model(data, entropy["model"])
            if not entropy.empty
            else focus_model(data, data.runs.model)
        )
    stats = ["min", "max", "mean", "std"]
    lams = set(data.runs.loc[data.runs["model"] == model, "lam"])
    if model == "DN-64-6-16":
        lams |= set(TABLE6_PAPER)
    columns = {}
    frame = entropy[entropy["model"] == model] if model is not None else entropy.iloc[:0]
    frame = first_trials(frame) if not frame.empty else frame
    for lam in sorted(lams):
        cell = frame[np.isclose(frame["lam"].astype(float), lam, atol=_LAM_TOL)]["entropy"]
        if len(cell):
            values = cell.astype(float)
            numbers = [values.min(), values.max(), values.mean(), values.std(ddof=1)]
            column = [MISSING if math.isnan(v) else f"{v:.4f}" for v in numbers]
        else:
            column = [MISSING] * 4
        if model == "DN-64-6-16" and lam in TABLE6_PAPER:
            column = [
                f"{c} [paper {p:.4f}]" for c, p in zip(column, TABLE6_PAPER[lam], strict=True)
            ]
        columns[f"λ={fmt_lam(lam)}"] = column
    index = pd.Index([f"{s}(H[q_i])" for s in stats], name=model or "model")
    return pd.DataFrame(columns, index=index) if columns else pd.DataFrame(index=index)


def status_counts(data: SweepData) -> pd.DataFrame:
    """How many runs are in each state."""
    if data.runs.empty:
        return pd.DataFrame({"runs": [0]}, index=pd.Index(["total"], name="status"))
    counts = data.runs["status"].value_counts().rename("runs").rename_axis("status")
    return pd.concat([counts, pd.Series({"total": len(data.runs)}, name="runs")]).to_frame()


TABLES = {
    "table2_mlp": ("Table 2", table2_mlp),
    "table5_densenet": ("Table 5", table5_densenet),
    "table6_entropy": ("Table 6", table6_entropy),
    "error_by_configuration": ("Test error by configuration", error_by_configuration),
    "metrics_by_configuration": ("Every metric by configuration", metrics_by_configuration),
}
