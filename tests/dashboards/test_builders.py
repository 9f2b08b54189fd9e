"""Figure and table builders on a synthetic sweep, complete and partial."""

from __future__ import annotations

import base64
import io
import math
import re

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from dashboards.data import SweepData, first_trials
from dashboards.figures import (
    FIGURES,
    PARETO_GID,
    fig2_test_error,
    fig4_robustness,
    fig10_confusion,
    fig_ood,
    fig_pareto,
    fig_reliability,
    fig_shift,
    focus_model,
    missing_cells,
    non_dominated,
)
from dashboards.report import build_report
from dashboards.tables import (
    MISSING,
    TABLES,
    error_by_configuration,
    metrics_by_configuration,
    table2_mlp,
    table5_densenet,
    table6_entropy,
)
from modloss.names import OOD_SCORES, ood_metric

MODELS = {"16-M-64-H": 16, "256-M-4-H": 256}
LAMS = [0.0, 0.95, 1.0]
TRIALS = [0, 1, 2]
K = 10


def _error(model: str, lam: float, trial: int) -> float:
    return 0.10 + 0.02 * lam + 0.01 * trial + (0.05 if model == "256-M-4-H" else 0.0)


def synthetic_sweep(drop: set[tuple[str, float]] = frozenset()) -> SweepData:
    """Every model x lambda x trial, except the (model, lam) cells in ``drop``, which only
    have a still-running run."""
    rng = np.random.default_rng(0)
    runs, losses, curves, robust, spec, entropy, confusion = [], [], [], [], [], [], []
    diversity, shift, reliability = [], [], []
    for model, m in MODELS.items():
        for lam in LAMS:
            for trial in TRIALS:
                key = {"model": model, "lam": lam, "trial": trial}
                running = (model, lam) in drop
                err = _error(model, lam, trial)
                runs.append(
                    {
                        "run_id": f"{model}-{lam}-{trial}",
                        **key,
                        "num_members": m,
                        "status": "running" if running else "finished",
                        "best_epoch": math.nan if running else 3,
                        "val_error": math.nan if running else err,
                        "val_dropped_error": math.nan if running else err + 0.3 * (1 - lam),
                        "test_error": math.nan if running else err,
                        "final_test_error": math.nan if running else err + 0.01,
                        "test_ece": math.nan if running else 0.02 + 0.1 * lam,
                        "test_ece_scaled": math.nan if running else 0.01 + 0.01 * lam,
                        "test_nll_scaled": math.nan if running else 0.25 + lam,
                        "temperature": math.nan if running else 1.0 + lam + 0.1 * trial,
                        **{
                            ood_metric("auroc", score): math.nan if running else 0.6 + 0.1 * i
                            for i, score in enumerate(OOD_SCORES)
                        },
                        "ood_dataset": None if running else "sklearn-digits-8x8-upscaled",
                    }
                )
                for epoch in (1, 2, 3):
                    curves.append(
                        {
                            **key,
                            "epoch": epoch,
                            "test_error": err + 0.1 / epoch,
                            "test_member_error_min": err + 0.05,
                            "test_member_error_mean": err + 0.2,
                            "test_member_error_max": err + 0.4,
                        }
                    )
                if running:
                    continue
                losses.append({**key, "ensemble_nll": 0.3 + lam, "member_nll": 0.5 + 2 * lam})
                diversity.append({**key, "train_ambiguity": 0.2 + lam, "val_ambiguity": 0.2})
                for angle in range(0, 181, 15):
                    accuracy = (1 - err) * (1 - angle / 360)
                    shift.append({**key, "angle": angle, "accuracy": accuracy, "ece": angle / 900})
                for b in range(15):
                    reliability.append(
                        {
                            **key,
                            "lower": b / 15,
                            "upper": (b + 1) / 15,
                            "count": 0 if b < 5 else 10 * b,
                            "confidence": (b + 0.5) / 15,
                            "accuracy": (b + 0.5) / 15 - 0.05 * lam,
                        }
                    )
                for dropped in (0, m // 2, m - 1):
                    robust.append({**key, "dropped": dropped, "accuracy": 1 - err - dropped / m})
                for c in range(K):
                    spec.append(
                        {
                            **key,
                            "class": c,
                            "random_member": 0.5,
                            "specialist_member": 0.6 + 0.1 * lam,
                            "random_subset": 0.7,
                            "specialist_subset": 0.75 + 0.1 * lam,
                        }
                    )
                for member in range(m):
                    entropy.append({**key, "member": member, "entropy": 1.0 + 0.01 * member})
                for member in (0, m - 1):
                    for true in range(K):
                        counts = rng.integers(0, 20, size=K)
                        counts[true] += 300
                        for pred in range(K):
                            confusion.append(
                                {
                                    **key,
                                    "member": member,
                                    "true": true,
                                    "predicted": pred,
                                    "count": int(counts[pred]),
                                }
                            )
    return SweepData(
        experiment="synthetic",
        runs=pd.DataFrame(runs),
        losses=pd.DataFrame(losses),
        curves=pd.DataFrame(curves),
        robustness=pd.DataFrame(robust),
        specialists=pd.DataFrame(spec),
        entropy=pd.DataFrame(entropy),
        confusion=pd.DataFrame(confusion),
        diversity=pd.DataFrame(diversity),
        shift=pd.DataFrame(shift),
        reliability=pd.DataFrame(reliability),
    )


@pytest.fixture(scope="module")
def full() -> SweepData:
    return synthetic_sweep()


@pytest.fixture(scope="module")
def partial() -> SweepData:
    return synthetic_sweep(drop={("256-M-4-H", 0.95), ("16-M-64-H", 0.0)})


def _note_text(fig) -> str:
    return "\n".join(t.get_text() for t in fig.texts)


def test_fig2_plots_mean_and_standard_error_over_trials(full):
    fig = fig2_test_error(full)
    ax = fig.axes[0]
    container = {c.get_label(): c for c in ax.containers}["256-M-4-H"]
    line, _, (bars,) = container
    expected = [100 * np.mean([_error("256-M-4-H", lam, t) for t in TRIALS]) for lam in LAMS]
    np.testing.assert_allclose(line.get_xdata().astype(float), LAMS)
    np.testing.assert_allclose(line.get_ydata().astype(float), expected)
    # Error bar half-length: sample std over trials / sqrt(n) (errors 0.01 apart -> std 0.01).
    segments = bars.get_segments()
    half = [(seg[1][1] - seg[0][1]) / 2 for seg in segments]
    np.testing.assert_allclose(half, [100 * 0.01 / math.sqrt(3)] * 3)
    assert "missing" not in _note_text(fig)


def test_fig2_marks_missing_cells_instead_of_failing(partial):
    fig = fig2_test_error(partial)
    note = _note_text(fig)
    assert "256-M-4-H λ=0.95" in note and "16-M-64-H λ=0" in note
    container = {c.get_label(): c for c in fig.axes[0].containers}["256-M-4-H"]
    np.testing.assert_allclose(container[0].get_xdata().astype(float), [0.0, 1.0])


def test_missing_cells_lists_the_grid_holes(partial, full):
    assert missing_cells(full) == []
    assert missing_cells(partial) == [("16-M-64-H", 0.0), ("256-M-4-H", 0.95)]


def test_robustness_figure_has_one_line_per_lambda_and_notes_gaps(partial):
    fig = fig4_robustness(partial)
    panel = {ax.get_title(): ax for ax in fig.axes}["256-M-4-H (256 members)"]
    assert sorted(line.get_label() for line in panel.get_lines()) == ["λ=0", "λ=1"]
    line = {ln.get_label(): ln for ln in panel.get_lines()}["λ=0"]
    np.testing.assert_allclose(line.get_xdata(), [0, 128, 255])
    expected = [
        100 * np.mean([1 - _error("256-M-4-H", 0.0, t) - d / 256 for t in TRIALS])
        for d in (0, 128, 255)
    ]
    np.testing.assert_allclose(line.get_ydata(), expected)


def test_confusion_figure_shows_row_normalised_matrices_per_lambda(full):
    fig = fig10_confusion(full)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == len(LAMS) * 2  # two members logged per run
    for image in images:
        rates = np.asarray(image.get_array())
        np.testing.assert_allclose(rates.sum(1), 1.0)
        assert (np.diag(rates) > 0.5).all()


def test_every_builder_survives_an_empty_sweep(tmp_path):
    empty = SweepData(experiment="nothing yet")
    for _, build in FIGURES.values():
        fig = build(empty)
        assert "no " in _note_text(fig)
    assert build_report(empty, tmp_path).empty == list(FIGURES)
    for _, build in TABLES.values():
        assert isinstance(build(empty), pd.DataFrame)


def test_table2_fills_measured_cells_and_dashes_the_rest(partial):
    table = table2_mlp(partial)
    assert table.loc["1-M-1024-H", "test error"] == MISSING  # not in this sweep
    assert table.loc["256-M-4-H (λ = 0.95)", "test error"] == MISSING  # still running
    joint = [_error("256-M-4-H", 1.0, t) for t in TRIALS]
    se = 100 * np.std(joint, ddof=1) / math.sqrt(3)
    assert table.loc["256-M-4-H (joint, λ = 1)", "test error"] == (
        f"{100 * np.mean(joint):.2f}% ± {se:.2f} (n=3)"
    )
    assert table.loc["256-M-4-H (joint, λ = 1)", "paper"] == "10.5%"


def test_table5_without_densenets_is_all_dashes_with_paper_values(full):
    table = table5_densenet(full)
    assert table.shape == (3, 4)
    assert all(cell.startswith(MISSING) for cell in table.to_numpy().ravel())
    assert table.loc["DN-64-6-16", "λ=0.5"] == f"{MISSING} [paper 23.5%]"


def test_error_by_configuration_covers_the_grid(partial):
    table = error_by_configuration(partial)
    assert list(table.columns) == ["λ=0", "λ=0.95", "λ=1"]
    assert table.loc["256-M-4-H", "λ=0.95"] == MISSING
    assert table.loc["16-M-64-H", "λ=1"].endswith("(n=3)")


def test_table6_entropy_stats_over_members_of_one_trial(full):
    table = table6_entropy(full)
    assert table.index.name == "256-M-4-H"  # the largest ensemble when DN-64-6-16 is absent
    values = 1.0 + 0.01 * np.arange(256)
    assert table.loc["min(H[q_i])", "λ=1"] == f"{values.min():.4f}"
    assert table.loc["max(H[q_i])", "λ=1"] == f"{values.max():.4f}"
    assert table.loc["std(H[q_i])", "λ=1"] == f"{values.std(ddof=1):.4f}"


def test_focus_model_prefers_the_papers_then_the_largest():
    # Member counts come from the runs' logged model configuration, not from the names:
    # "mlp" has 128 members here, so it is the largest ensemble.
    sizes = {"DN-64-6-16": 16, "DN-100-12-4": 4, "16-M-64-H": 16, "64-M-16-H": 64, "mlp": 128}
    runs = pd.DataFrame({"model": list(sizes), "num_members": list(sizes.values())})
    data = SweepData(experiment="sizes", runs=runs)
    assert focus_model(data, ["DN-64-6-16", "DN-100-12-4"]) == "DN-64-6-16"
    assert focus_model(data, ["16-M-64-H", "64-M-16-H"]) == "64-M-16-H"
    assert focus_model(data, ["16-M-64-H", "mlp"]) == "mlp"
    assert focus_model(data, []) is None
    assert [data.members(m) for m in ("64-M-16-H", "mlp", "not-run")] == [64, 128, 1]


def test_first_trials_keeps_the_lowest_trial_per_cell(full):
    picked = first_trials(full.runs)
    assert set(picked["trial"]) == {0}
    assert len(picked) == len(MODELS) * len(LAMS)


def test_report_is_one_self_contained_html_with_every_figure(partial, tmp_path):
    report = build_report(partial, tmp_path)
    assert report.empty == []
    page = report.html.read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == len(FIGURES) == len(report.figures)
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    # Nothing fetched from elsewhere: no external scripts, stylesheets or images.
    assert all(s.startswith("data:") for s in re.findall(r'\ssrc="([^"]+)"', page))
    assert "<link" not in page and "@import" not in page
    assert "<table" in page and 'class="missing"' in page
    assert "256-M-4-H λ=0.95" in page
    for path in [*report.figures.values(), *report.tables.values()]:
        assert path.is_file() and path.stat().st_size > 0


def _errorbar_lines(ax) -> dict:
    """The (x, y) points of each labelled errorbar series of ``ax``, by label."""
    return {
        c.get_label(): np.asarray(c.lines[0].get_xydata(), dtype=float)
        for c in ax.containers
        if hasattr(c, "has_xerr")
    }


def test_ood_figure_plots_each_scores_auroc_over_trials_and_names_the_set(partial):
    fig = fig_ood(partial)
    ax = fig.axes[0]  # 16-M-64-H, whose λ=0 has no result
    lines = _errorbar_lines(ax)
    assert set(lines) == {score.replace("_", " ") for score in OOD_SCORES}
    assert list(lines["msp"][:, 0]) == [0.95, 1.0]
    np.testing.assert_allclose(lines["entropy"][:, 1], [0.7, 0.7])
    text = _note_text(fig)
    assert "OOD set: sklearn-digits-8x8-upscaled" in text
    assert "16-M-64-H λ=0" in text


def test_reliability_figure_shows_the_three_lambdas_and_marks_the_missing_one(partial):
    fig = fig_reliability(partial)
    assert len(fig.axes) == 2 * 3  # two models x λ in {0, 0.95, 1}
    titles = [ax.get_title() for ax in fig.axes]
    assert "256-M-4-H λ=1: ECE≈0.050" in titles
    assert "missing (no reliability bins): 16-M-64-H λ=0, 256-M-4-H λ=0.95" in _note_text(fig)


def test_shift_figure_has_accuracy_and_ece_per_angle_and_lambda(full):
    fig = fig_shift(full)
    accuracy = fig.axes[0]  # 16-M-64-H, top row
    lines = _errorbar_lines(accuracy)
    assert list(lines) == ["λ=0", "λ=0.95", "λ=1"]
    x, y = lines["λ=0"][:, 0], lines["λ=0"][:, 1]
    assert list(x) == list(range(0, 181, 15))
    mean_error = np.mean([_error("16-M-64-H", 0.0, t) for t in TRIALS])
    np.testing.assert_allclose(y, (1 - mean_error) * (1 - x / 360))


def test_metrics_by_configuration_has_every_metric_as_mean_and_standard_error(partial):
    table = metrics_by_configuration(partial)
    assert ("16-M-64-H", "0") not in table.index  # no finished run there
    cell = table.loc[("256-M-4-H", "1"), "temperature"]
    temps = np.array([2.0 + 0.1 * t for t in TRIALS])
    se = temps.std(ddof=1) / math.sqrt(len(temps))
    assert cell == f"{temps.mean():.4g} ± {se:.2g} (n=3)"
    for column in ("test_error", "test_ece", "test_ensemble_nll", "train_ambiguity"):
        assert column in table.columns
    assert table.loc[("16-M-64-H", "1"), "ood_auroc_msp"] == "0.6 ± 0 (n=3)"


def _slow_front(points: np.ndarray) -> set[int]:
    """The rows no other row dominates, by the definition, one pair at a time."""
    front = set()
    for i, p in enumerate(points):
        if not any(all(q <= p) and any(q < p) for j, q in enumerate(points) if j != i):
            front.add(i)
    return front


def test_non_dominated_keeps_exactly_the_pareto_front():
    points = np.array([[1, 5], [2, 2], [3, 1], [2, 3], [4, 4], [1, 5], [0.5, 6], [3, 1.5]])
    front = non_dominated(points)
    # [2, 3] is dominated by [2, 2] (equal in one objective), [4, 4] by [2, 2], [3, 1.5] by
    # [3, 1]; the two equal [1, 5] dominate neither each other nor are dominated.
    assert np.flatnonzero(front).tolist() == [0, 1, 2, 5, 6]
    rng = np.random.default_rng(1)
    for _ in range(20):
        cloud = rng.integers(0, 6, size=(30, 2)).astype(float)  # many ties
        assert set(np.flatnonzero(non_dominated(cloud))) == _slow_front(cloud)
    with_nan = np.array([[np.nan, 0.0], [1.0, 1.0]])
    assert non_dominated(with_nan).tolist() == [False, True]


def drawn_fronts(fig) -> dict[str, np.ndarray]:
    """Each panel's drawn Pareto front: its title, and the (x, y) points of its front line."""
    return {
        ax.get_title(): np.asarray(line.get_xydata(), dtype=float)
        for ax in fig.axes
        for line in ax.lines
        if line.get_gid() == PARETO_GID
    }


def test_pareto_figure_draws_each_configurations_non_dominated_trials(full):
    fig = fig_pareto(full)
    fronts = drawn_fronts(fig)
    assert set(fronts) == {f"{m} ({n} members)" for m, n in MODELS.items()}
    for model, members in MODELS.items():
        runs = full.done[full.done["model"] == model]
        points = 100 * runs[["val_error", "val_dropped_error"]].to_numpy(float)
        want = points[sorted(_slow_front(points))]
        got = fronts[f"{model} ({members} members)"]
        assert sorted(map(tuple, got)) == sorted(map(tuple, want))
    # λ 0, 0.95 and 1 are in the sweep and starred; 0.5 ... 0.9 have no trial within 0.05.
    stars = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert sorted(stars) == ["0", "0", "0.95", "0.95", "1", "1"]
    assert "λ=0.5" in _note_text(fig) and "λ=0.95" not in _note_text(fig)
