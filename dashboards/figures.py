"""The paper's figures from a sweep's tidy tables (:class:`dashboards.data.SweepData`).

Every builder returns a :class:`matplotlib.figure.Figure` (drawn with Agg, no pyplot
state) and never raises for missing data: absent configurations are listed in a note on
the figure, and a figure with nothing to draw says so.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dashboards.data import SweepData, first_trials, fmt_lam
from modloss.config import PAPER_LRS
from modloss.names import OOD_SCORES, ood_metric

__all__ = [
    "EMPTY",
    "FIGURES",
    "fig2_test_error",
    "fig3_losses",
    "fig4_robustness",
    "fig5_specialists",
    "fig7_error_curves",
    "fig10_confusion",
    "fig_calibration",
    "fig_collusion",
    "fig_ood",
    "fig_pareto",
    "fig_reliability",
    "fig_shift",
    "focus_model",
    "missing_cells",
    "non_dominated",
]

# The configuration the paper uses for its single-model figures (Fig. 10, Table 6).
PAPER_FOCUS = ("DN-64-6-16", "256-M-4-H")


def _sorted_models(data: SweepData, models: Iterable[str]) -> list[str]:
    return sorted(set(models), key=lambda m: (data.members(m), m))


def focus_model(data: SweepData, models: Iterable[str]) -> str | None:
    """The paper's model for single-configuration figures if present, else the largest
    ensemble (most members) in the sweep."""
    present = _sorted_models(data, models)
    for name in PAPER_FOCUS:
        if name in present:
            return name
    return present[-1] if present else None


def missing_cells(data: SweepData) -> list[tuple[str, float]]:
    """(model, lam) cells of the sweep's grid (models x lambdas seen) without a result."""
    runs = data.runs
    if runs.empty:
        return []
    have = set(map(tuple, data.done[["model", "lam"]].drop_duplicates().to_numpy()))
    return [
        (m, lam)
        for m in _sorted_models(data, runs["model"])
        for lam in sorted(runs["lam"].unique())
        if (m, lam) not in have
    ]


def _mean_se(frame: pd.DataFrame, keys: list[str], value: str) -> pd.DataFrame:
    """Mean, standard error (sample std / sqrt n; NaN for one trial) and n per group."""
    grouped = frame.groupby(keys)[value]
    out = grouped.agg(["mean", "std", "count"]).reset_index()
    out["se"] = out["std"] / np.sqrt(out["count"])
    return out.rename(columns={"count": "n"})


def _note(fig: Figure, gaps: list[str], info: list[str] = ()) -> list[str]:
    """Lines under the plot, gaps in the data in red and plain information in grey;
    returns every line drawn (for :func:`_bottom_margin`)."""
    lines = [(textwrap.shorten(g, 150), "firebrick") for g in gaps[:6]]
    if len(gaps) > 6:
        lines.append((f"(+{len(gaps) - 6} more)", "firebrick"))
    lines += [(textwrap.shorten(i, 150), "dimgrey") for i in info]
    step = 0.16 / fig.get_figheight()  # one line of x-small text, in figure fraction
    for row, (text, color) in enumerate(reversed(lines)):
        fig.text(0.01, 0.005 + row * step, text, fontsize="x-small", color=color, va="bottom")
    return [text for text, _ in lines]


EMPTY = "empty"  # the label of a figure that only says why it has nothing to draw


def _empty_figure(title: str, reason: str) -> Figure:
    fig = Figure(figsize=(6.4, 2.4))
    fig.set_label(EMPTY)
    fig.text(0.5, 0.62, title, ha="center", fontsize="large")
    fig.text(0.5, 0.38, reason, ha="center", color="firebrick", wrap=True)
    return fig


def _missing_note(cells: list[tuple[str, float]], what: str = "no result") -> list[str]:
    if not cells:
        return []
    listed = ", ".join(f"{m} λ={fmt_lam(lam)}" for m, lam in cells)
    return [f"missing ({what}): {listed}"]


def _lam_axis(ax, data: SweepData) -> None:
    """The same λ range on every panel: the sweep's, whatever a panel has data for."""
    lams = data.runs["lam"] if len(data.runs) else []
    if len(lams):
        lo, hi = float(min(lams)), float(max(lams))
        pad = 0.05 * max(hi - lo, 0.1)
        ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel("λ")


def _bottom_margin(fig: Figure, notes: list[str], *, top: float = 1.0) -> None:
    """tight_layout leaving room for the note lines under the axes."""
    bottom = (0.1 + 0.16 * len(notes)) / fig.get_figheight() if notes else 0
    fig.tight_layout(rect=(0, bottom, 1, top))


# --------------------------------------------------------------------------- Fig. 2


def fig2_test_error(data: SweepData) -> Figure:
    """Ensemble test error (at the best-validation epoch) against λ, one line per
    configuration: mean and standard error over trials."""
    done = data.done
    if done.empty:
        return _empty_figure("Fig. 2: test error vs λ", "no finished runs yet")
    stats = _mean_se(done, ["model", "lam"], "test_error")
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    for model in _sorted_models(data, stats["model"]):
        s = stats[stats["model"] == model].sort_values("lam")
        ax.errorbar(
            s["lam"],
            100 * s["mean"],
            yerr=100 * s["se"].fillna(0),
            marker="o",
            capsize=3,
            label=model,
        )
    _lam_axis(ax, data)
    ax.set_ylabel("test error (%)")
    ax.set_title("Ensemble test error vs λ (mean ± s.e. over trials)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    single = stats[stats["n"] < 2]
    info = [f"{len(single)} point(s) from a single trial: no error bar"] if len(single) else []
    notes = _note(fig, _missing_note(missing_cells(data)), info)
    _bottom_margin(fig, notes)
    return fig


# --------------------------------------------------------------------------- Fig. 3


def fig3_losses(data: SweepData) -> Figure:
    """Test cross-entropy of the ensemble and the mean member cross-entropy against λ,
    one panel per configuration (the paper shows 256-M-4-H)."""
    losses = data.losses.dropna(subset=["ensemble_nll", "member_nll"], how="all")
    if losses.empty:
        return _empty_figure("Fig. 3: ensemble and member loss vs λ", "no test losses logged")
    models = _sorted_models(data, losses["model"])
    fig = Figure(figsize=(4.2 * len(models), 3.8))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models, strict=True):
        frame = losses[losses["model"] == model]
        for column, label in (
            ("ensemble_nll", "ensemble loss"),
            ("member_nll", "mean member loss"),
        ):
            s = _mean_se(frame.dropna(subset=[column]), ["lam"], column).sort_values("lam")
            ax.errorbar(
                s["lam"], s["mean"], yerr=s["se"].fillna(0), marker="o", capsize=3, label=label
            )
        ax.set_title(model)
        _lam_axis(ax, data)
        ax.set_ylabel("test cross-entropy (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    notes = _note(fig, _missing_note(missing_cells(data)))
    _bottom_margin(fig, notes)
    return fig


# --------------------------------------------------------------------------- Fig. 4


def fig4_robustness(data: SweepData) -> Figure:
    """Test accuracy with k members dropped at random (mean over draws, then trials),
    one line per λ, one panel per configuration."""
    curves = data.robustness
    if curves.empty:
        return _empty_figure(
            "Fig. 4: robustness to dropped members", "no robustness.csv artifacts logged"
        )
    models = _sorted_models(data, curves["model"])
    fig = Figure(figsize=(4.6 * len(models), 3.9))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models, strict=True):
        frame = curves[curves["model"] == model]
        for lam in sorted(frame["lam"].unique()):
            s = _mean_se(frame[frame["lam"] == lam], ["dropped"], "accuracy").sort_values("dropped")
            ax.plot(s["dropped"], 100 * s["mean"], marker=".", label=f"λ={fmt_lam(lam)}")
            ax.fill_between(
                s["dropped"],
                100 * (s["mean"] - s["se"].fillna(0)),
                100 * (s["mean"] + s["se"].fillna(0)),
                alpha=0.2,
            )
        ax.set_title(f"{model} ({data.members(model)} members)")
        ax.set_xlabel("members dropped at random")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    expected = {(m, lam) for m, lam in map(tuple, data.done[["model", "lam"]].to_numpy())}
    have = set(map(tuple, curves[["model", "lam"]].drop_duplicates().to_numpy()))
    lacking = sorted(c for c in expected - have if data.members(c[0]) > 1)
    notes = _note(fig, _missing_note(lacking, "no robustness curve"))
    _bottom_margin(fig, notes)
    return fig


# --------------------------------------------------------------------------- Fig. 5

_F1_SERIES = {
    "member": (("random_member", "random"), ("specialist_member", "selected on validation")),
    "subset": (("random_subset", "random"), ("specialist_subset", "selected on validation")),
}


def fig5_specialists(data: SweepData) -> Figure:
    """Mean one-vs-all F1 of random vs validation-selected single members (left) and
    sub-ensembles (right) against λ; one row per configuration."""
    spec = data.specialists
    if spec.empty:
        return _empty_figure("Fig. 5: specialists", "no specialists.csv artifacts logged")
    columns = [c for pair in _F1_SERIES.values() for c, _ in pair]
    # Mean over the one-vs-all problems of each trial, then mean ± s.e. over trials.
    per_trial = spec.groupby(["model", "lam", "trial"], as_index=False)[columns].mean()
    models = _sorted_models(data, per_trial["model"])
    sizes = spec.groupby("model")["subset_size"].first() if "subset_size" in spec else {}
    fig = Figure(figsize=(9, 3.4 * len(models)))
    axes = fig.subplots(len(models), 2, squeeze=False)
    for row, model in zip(axes, models, strict=True):
        frame = per_trial[per_trial["model"] == model]
        size = f"s of {int(sizes[model])}" if model in sizes else "s"
        for ax, (kind, series) in zip(row, _F1_SERIES.items(), strict=True):
            for column, label in series:
                s = _mean_se(frame, ["lam"], column).sort_values("lam")
                ax.errorbar(
                    s["lam"], s["mean"], yerr=s["se"].fillna(0), marker="o", capsize=3, label=label
                )
            what = "single member" if kind == "member" else f"sub-ensemble{size}"
            ax.set_title(f"{model}: {what}")
            _lam_axis(ax, data)
            ax.set_ylabel("mean one-vs-all test F1")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    expected = {(m, lam) for m, lam in map(tuple, data.done[["model", "lam"]].to_numpy())}
    have = set(map(tuple, spec[["model", "lam"]].drop_duplicates().to_numpy()))
    notes = _note(fig, _missing_note(sorted(expected - have), "no specialists table"))
    _bottom_margin(fig, notes)
    return fig


# --------------------------------------------------------------------------- Fig. 7


def fig7_error_curves(data: SweepData) -> Figure:
    """Ensemble test error and the members' test errors (mean, min-max band) over epochs
    for one trial of each configuration: rows are configurations, columns λ."""
    curves = first_trials(data.curves.dropna(subset=["test_error"]))
    if curves.empty:
        return _empty_figure("Fig. 7: error over epochs", "no per-epoch metrics logged")
    models = _sorted_models(data, curves["model"])
    lams = sorted(data.runs["lam"].unique()) if len(data.runs) else sorted(curves["lam"].unique())
    fig = Figure(figsize=(2.6 * len(lams) + 0.6, 2.3 * len(models) + 0.5))
    axes = fig.subplots(len(models), len(lams), squeeze=False, sharey=True)
    for i, model in enumerate(models):
        for j, lam in enumerate(lams):
            ax = axes[i][j]
            s = curves[(curves["model"] == model) & (curves["lam"] == lam)].sort_values("epoch")
            if s.empty:
                ax.text(
                    0.5,
                    0.5,
                    "missing",
                    ha="center",
                    va="center",
                    color="firebrick",
                    transform=ax.transAxes,
                )
            else:
                epoch = s["epoch"]
                if s["test_member_error_min"].notna().any():
                    ax.fill_between(
                        epoch,
                        100 * s["test_member_error_min"],
                        100 * s["test_member_error_max"],
                        alpha=0.25,
                        color="C1",
                        label="members (min-max)",
                    )
                    ax.plot(
                        epoch, 100 * s["test_member_error_mean"], color="C1", label="members (mean)"
                    )
                ax.plot(epoch, 100 * s["test_error"], color="C0", lw=2, label="ensemble")
            if i == 0:
                ax.set_title(f"λ={fmt_lam(lam)}", fontsize="small")
            if j == 0:
                ax.set_ylabel(f"{model}\ntest error (%)", fontsize="small")
            if i == len(models) - 1:
                ax.set_xlabel("epoch", fontsize="small")
            ax.tick_params(labelsize="x-small")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:
        if len(ax.get_legend_handles_labels()[0]) > len(handles):
            handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=3, fontsize="x-small")
    trials = sorted(curves["trial"].unique())
    info = [f"one trial per cell (trial {', '.join(str(t) for t in trials)})"]
    notes = _note(fig, [], info)
    _bottom_margin(fig, notes, top=1 - 0.35 / fig.get_figheight())
    return fig


# --------------------------------------------------------------------------- Fig. 10


def fig10_confusion(data: SweepData, *, model: str | None = None, members: int = 4) -> Figure:
    """Row-normalised test confusion matrices (x predicted, y true) of ``members`` evenly
    spaced members of one trial, one row per λ (the paper: DN-64-6-16)."""
    conf = data.confusion
    if model is None and not conf.empty:
        model = focus_model(data, conf["model"])
    if conf.empty or model is None:
        return _empty_figure("Fig. 10: member confusion matrices", "no confusion.csv artifacts")
    conf = conf[conf["model"] == model]
    if conf.empty:
        return _empty_figure("Fig. 10: member confusion matrices", f"no confusion data for {model}")
    lams = sorted(conf["lam"].unique())
    k = int(max(conf["true"].max(), conf["predicted"].max())) + 1
    present = sorted(int(j) for j in conf["member"].unique())
    count = min(len(present), members)
    picks = {round(i * (len(present) - 1) / max(1, count - 1)) for i in range(count)}
    shown = [present[i] for i in sorted(picks)]
    fig = Figure(figsize=(2.3 * len(shown) + 0.8, 2.3 * len(lams) + 0.6))
    axes = fig.subplots(len(lams), len(shown), squeeze=False)
    image = None
    for i, lam in enumerate(lams):
        frame = conf[conf["lam"] == lam]
        trial = int(frame["trial"].min())
        frame = frame[frame["trial"] == trial]
        for j, member in enumerate(shown):
            cells = frame[frame["member"] == member]
            matrix = np.zeros((k, k))
            np.add.at(
                matrix,
                (cells["true"].astype(int), cells["predicted"].astype(int)),
                cells["count"].to_numpy(float),
            )
            rates = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
            ax = axes[i][j]
            image = ax.imshow(rates, vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"member {member}", fontsize="small")
            if j == 0:
                ax.set_ylabel(f"λ={fmt_lam(lam)}\ntrue", fontsize="small")
            if i == len(lams) - 1:
                ax.set_xlabel("predicted", fontsize="small")
    fig.suptitle(f"{model}: per-member test confusion matrices", fontsize="medium")
    expected = set(data.done.loc[data.done["model"] == model, "lam"])
    lacking = [(model, lam) for lam in sorted(expected - set(lams))]
    notes = _note(fig, _missing_note(lacking, "no matrices"))
    fig.tight_layout(rect=(0, 0.06 if notes else 0, 0.9, 1))
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), fraction=0.03, label="fraction of true class")
    return fig


# --------------------------------------------------------------------------- uncertainty


def _lacking(data: SweepData, frame: pd.DataFrame, what: str) -> list[str]:
    """Notes naming the grid's (model, lam) cells without a result, then those with a
    result but no rows in ``frame``."""
    expected = set(map(tuple, data.done[["model", "lam"]].drop_duplicates().to_numpy()))
    have = set(map(tuple, frame[["model", "lam"]].drop_duplicates().to_numpy()))
    return _missing_note(missing_cells(data)) + _missing_note(sorted(expected - have), what)


def _by_lam(ax, data: SweepData, frame: pd.DataFrame, column: str, label: str, **style) -> None:
    s = _mean_se(frame.dropna(subset=[column]), ["lam"], column).sort_values("lam")
    if len(s):
        ax.errorbar(
            s["lam"], s["mean"], yerr=s["se"].fillna(0), marker="o", capsize=3, label=label, **style
        )


def fig_calibration(data: SweepData) -> Figure:
    """Test ECE (left) and test NLL (right) of the ensemble at the best-validation epoch
    against λ, one line per configuration, dashed after temperature scaling."""
    done = data.done
    if done.empty or done["test_ece"].isna().all():
        return _empty_figure("Calibration vs λ", "no test_ece logged by any finished run")
    losses = data.losses
    fig = Figure(figsize=(10, 4.2))
    ece_ax, nll_ax = fig.subplots(1, 2)
    for i, model in enumerate(_sorted_models(data, done["model"])):
        runs, color = done[done["model"] == model], f"C{i}"
        _by_lam(ece_ax, data, runs, "test_ece", model, color=color)
        _by_lam(ece_ax, data, runs, "test_ece_scaled", f"{model}, T-scaled", color=color, ls="--")
        _by_lam(nll_ax, data, losses[losses["model"] == model], "ensemble_nll", model, color=color)
        _by_lam(nll_ax, data, runs, "test_nll_scaled", f"{model}, T-scaled", color=color, ls="--")
    for ax, ylabel in ((ece_ax, "test ECE (15 bins)"), (nll_ax, "test NLL (nats)")):
        _lam_axis(ax, data)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    ece_ax.set_title("Ensemble ECE vs λ (mean ± s.e.)")
    nll_ax.set_title("Ensemble NLL vs λ (mean ± s.e.)")
    gaps = _missing_note(missing_cells(data))
    if done["temperature"].isna().all():
        gaps.append("missing: no temperature-scaled metrics (selected_epoch.json) logged")
    notes = _note(fig, gaps)
    _bottom_margin(fig, notes)
    return fig


RELIABILITY_LAMS = (0.0, 0.95, 1.0)


def fig_reliability(data: SweepData) -> Figure:
    """Reliability diagrams of the ensemble on the test set at λ = 0, 0.95 and 1 (one trial,
    rows are configurations): accuracy per confidence bin against the diagonal."""
    rel = data.reliability
    if rel.empty:
        return _empty_figure("Reliability diagrams", "no reliability.csv artifacts logged")
    models = _sorted_models(data, rel["model"])
    fig = Figure(figsize=(3.2 * len(RELIABILITY_LAMS) + 0.4, 3.0 * len(models) + 0.5))
    axes = fig.subplots(len(models), len(RELIABILITY_LAMS), squeeze=False)
    lacking = []
    for i, model in enumerate(models):
        for j, lam in enumerate(RELIABILITY_LAMS):
            ax = axes[i][j]
            cell = rel[(rel["model"] == model) & np.isclose(rel["lam"].astype(float), lam)]
            cell = cell[cell["trial"] == cell["trial"].min()] if len(cell) else cell
            filled = cell[cell["count"] > 0]
            ax.plot([0, 1], [0, 1], "k--", lw=1)
            if filled.empty:
                lacking.append((model, lam))
                ax.text(0.5, 0.5, "missing", ha="center", color="firebrick")
            else:
                ax.bar(
                    filled["lower"],
                    filled["accuracy"],
                    filled["upper"] - filled["lower"],
                    align="edge",
                    edgecolor="black",
                )
                n = filled["count"].sum()
                gap = (filled["count"] * (filled["accuracy"] - filled["confidence"]).abs()).sum()
                ax.set_title(f"{model} λ={fmt_lam(lam)}: ECE≈{gap / n:.3f}", fontsize="small")
            ax.set(xlim=(0, 1), ylim=(0, 1))
            ax.set_xlabel("confidence", fontsize="small")
            ax.set_ylabel("accuracy", fontsize="small")
            ax.tick_params(labelsize="x-small")
    notes = _note(fig, _missing_note(lacking, "no reliability bins"), ["one trial per cell"])
    _bottom_margin(fig, notes)
    return fig


def fig_collusion(data: SweepData) -> Figure:
    """Learner collusion: the members' diversity (ambiguity, Eq. 6) on their training batches
    and on held-out validation data at the best-validation epoch, against λ."""
    div = data.diversity.dropna(subset=["train_ambiguity", "val_ambiguity"], how="all")
    if div.empty:
        return _empty_figure("Train vs held-out diversity", "no ambiguity curves logged")
    models = _sorted_models(data, div["model"])
    fig = Figure(figsize=(4.4 * len(models), 3.9))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models, strict=True):
        frame = div[div["model"] == model]
        _by_lam(ax, data, frame, "train_ambiguity", "train (its own batches)")
        _by_lam(ax, data, frame, "val_ambiguity", "held-out (validation)")
        ax.set_title(model)
        _lam_axis(ax, data)
        ax.set_ylabel("ambiguity (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    notes = _note(fig, _lacking(data, div, "no ambiguity at the best epoch"))
    _bottom_margin(fig, notes)
    return fig


def fig_shift(data: SweepData) -> Figure:
    """Ensemble test accuracy (top) and ECE (bottom) on the test set rotated by 0 to 180
    degrees, one line per λ, one column per configuration (mean ± s.e. over trials)."""
    shift = data.shift
    if shift.empty:
        return _empty_figure("Accuracy and ECE under rotation", "no shift.csv artifacts logged")
    models = _sorted_models(data, shift["model"])
    fig = Figure(figsize=(4.6 * len(models), 6.6))
    axes = fig.subplots(2, len(models), squeeze=False, sharex=True)
    for j, model in enumerate(models):
        frame = shift[shift["model"] == model]
        for row, (column, ylabel) in enumerate(
            (("accuracy", "test accuracy"), ("ece", "test ECE"))
        ):
            ax = axes[row][j]
            for lam in sorted(frame["lam"].unique()):
                s = _mean_se(frame[frame["lam"] == lam], ["angle"], column).sort_values("angle")
                ax.errorbar(s["angle"], s["mean"], yerr=s["se"].fillna(0), marker=".",
                            capsize=2, label=f"λ={fmt_lam(lam)}")  # fmt: skip
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(model)
                ax.legend(fontsize="x-small")
            else:
                ax.set_xlabel("rotation (degrees)")
    notes = _note(fig, _lacking(data, shift, "no shift curve"))
    _bottom_margin(fig, notes)
    return fig


def fig_ood(data: SweepData) -> Figure:
    """AUROC of telling the OOD digits from the test set by each score (max softmax,
    predictive entropy, mutual information) against λ, one panel per configuration."""
    done = data.done
    columns = {score: ood_metric("auroc", score) for score in OOD_SCORES}
    if done.empty or done[list(columns.values())].isna().all().all():
        return _empty_figure("OOD detection vs λ", "no ood_auroc_* metrics logged")
    models = _sorted_models(data, done["model"])
    fig = Figure(figsize=(4.4 * len(models), 3.9))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models, strict=True):
        runs = done[done["model"] == model]
        for score, column in columns.items():
            _by_lam(ax, data, runs, column, score.replace("_", " "))
        ax.axhline(0.5, color="grey", lw=1, ls=":")
        ax.set_title(model)
        _lam_axis(ax, data)
        ax.set_ylabel("OOD AUROC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    logged = done.dropna(subset=[columns["msp"]])
    datasets = sorted(data.runs.get("ood_dataset", pd.Series(dtype=str)).dropna().unique())
    info = [f"OOD set: {', '.join(datasets)}"] if datasets else []
    notes = _note(fig, _lacking(data, logged, "no OOD metrics"), info)
    _bottom_margin(fig, notes)
    return fig


# --------------------------------------------------------------------------- Pareto front

PARETO_OBJECTIVES = ("val_error", "val_dropped_error")  # search_spaces/fmnist_pareto.yaml's
PAPER_LAMS = tuple(PAPER_LRS["16-M-64-H"])  # the paper's MLP grid (Table 2): 0, 0.5, ..., 1
# A paper λ is marked on the trial nearest to it only if that trial is this close.
PAPER_LAM_TOLERANCE = 0.05
PARETO_GID = "pareto_front"  # the gid of each panel's front line: what the tests read back


def non_dominated(values: np.ndarray) -> np.ndarray:
    """Which rows of ``values`` ``(n, d)`` no other row dominates, all objectives
    minimised: row i is dominated when some row is <= it in every column and < in one.
    Rows with a NaN are neither on the front nor dominate. Equal rows are all kept."""
    values = np.asarray(values, dtype=float)
    ok = ~np.isnan(values).any(axis=1)
    a, b = values[:, None, :], values[None, :, :]  # (n, 1, d) against (1, n, d)
    dominates = (b <= a).all(-1) & (b < a).any(-1) & ok[None, :]  # [i, j]: j dominates i
    return ok & ~dominates.any(1)


def fig_pareto(data: SweepData) -> Figure:
    """Validation error against validation error with 90% of the members dropped at the
    best-validation epoch, one point per trial coloured by λ, one panel per configuration;
    the non-dominated trials joined as a staircase, and the trials nearest the paper's λ
    values marked with a star and their own λ."""
    done = data.done
    if done.empty or any(c not in done or done[c].isna().all() for c in PARETO_OBJECTIVES):
        return _empty_figure(
            "Pareto front: error vs dropped-member error", "no val_dropped_error logged"
        )
    runs = done.dropna(subset=list(PARETO_OBJECTIVES))
    models = _sorted_models(data, runs["model"])
    fig = Figure(figsize=(5.2 * len(models) + 0.8, 4.6))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    unmarked = []
    for ax, model in zip(axes, models, strict=True):
        frame = runs[runs["model"] == model]
        x, y = (100 * frame[c].to_numpy(float) for c in PARETO_OBJECTIVES)
        lam = frame["lam"].to_numpy(float)
        front = non_dominated(np.column_stack([x, y]))
        points = ax.scatter(x, y, c=lam, cmap="viridis", vmin=0, vmax=1, s=28)
        order = np.argsort(x[front], kind="stable")
        ax.plot(
            x[front][order],
            y[front][order],
            color="black",
            drawstyle="steps-post",
            marker="o",
            mfc="none",
            ms=9,
            gid=PARETO_GID,
            label="Pareto front",
        )
        marked: set[int] = set()  # one star per trial, however many paper λ it is nearest
        for paper in PAPER_LAMS:
            nearest = int(np.argmin(np.abs(lam - paper)))
            if abs(lam[nearest] - paper) > PAPER_LAM_TOLERANCE:
                unmarked.append(f"{model} λ={fmt_lam(paper)}")
                continue
            if nearest in marked:
                continue
            star = (x[nearest], y[nearest])
            label = None if marked else "nearest a paper λ (its λ)"
            ax.scatter(
                *star,
                marker="*",
                s=260,
                facecolors="none",
                edgecolors="firebrick",
                linewidths=1.2,
                label=label,
                zorder=3,
            )
            ax.annotate(
                f"{lam[nearest]:.3g}",
                star,
                xytext=(5, 5),
                textcoords="offset points",
                fontsize="x-small",
                color="firebrick",
            )
            marked.add(nearest)
        ax.set_title(f"{model} ({data.members(model)} members)")
        ax.set_xlabel("validation error (%)")
        ax.set_ylabel("validation error, 90% of members dropped (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    far = f"paper λ without a trial within {PAPER_LAM_TOLERANCE:g}: {', '.join(unmarked)}"
    notes = _note(fig, _missing_note(missing_cells(data)), [far] if unmarked else [])
    fig.colorbar(points, ax=axes[-1], label="λ", fraction=0.05)  # within tight_layout's grid
    _bottom_margin(fig, notes)
    return fig


FIGURES = {
    "fig2_test_error": ("Fig. 2: test error vs λ", fig2_test_error),
    "fig3_losses": ("Fig. 3: ensemble and member loss vs λ", fig3_losses),
    "fig4_robustness": ("Fig. 4: robustness to dropped members", fig4_robustness),
    "fig5_specialists": ("Fig. 5: specialist members and sub-ensembles", fig5_specialists),
    "fig7_error_curves": ("Fig. 7: ensemble and member error over epochs", fig7_error_curves),
    "fig10_confusion": ("Fig. 10: per-member confusion matrices", fig10_confusion),
    "fig_calibration": ("Calibration: ECE and NLL vs λ", fig_calibration),
    "fig_reliability": ("Reliability diagrams at λ = 0, 0.95, 1", fig_reliability),
    "fig_collusion": ("Learner collusion: train vs held-out diversity", fig_collusion),
    "fig_shift": ("Accuracy and ECE under rotation", fig_shift),
    "fig_ood": ("Out-of-distribution detection vs λ", fig_ood),
    "fig_pareto": ("Pareto front: error vs error with 90% of members dropped", fig_pareto),
}
