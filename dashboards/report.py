"""The report: the paper's figures as PNGs, its tables, and one self-contained HTML page.

The HTML embeds every figure as a base64 ``data:`` URI and every table as HTML, so the
single file can be mailed, archived or opened from an MLflow artifact view. The same
files are logged under ``report/`` on the sweep's parent run.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from dashboards.data import SweepData, fmt_lam
from dashboards.figures import EMPTY, FIGURES, missing_cells
from dashboards.tables import MISSING, TABLES, status_counts

__all__ = ["IMAGE_CHECK", "REPORT_HTML", "Report", "build_report", "figure_png", "log_report"]

REPORT_HTML = "report.html"
ARTIFACT_PATH = "report"
_DPI = 110

CAPTIONS = {
    "fig2_test_error": (
        "Ensemble test error at the best-validation epoch against λ, mean and standard error "
        "over trials. Paper: joint training (high λ) helps most when members are small "
        "(256-M-4-H), with a small rise at λ = 1."
    ),
    "fig3_losses": (
        "Test cross-entropy of the ensemble and mean cross-entropy of its members at the "
        "best-validation epoch. Paper (256-M-4-H): the mean member loss rises sharply as λ → 1."
    ),
    "fig4_robustness": (
        "Test accuracy with k members removed at random (20 draws per k, averaged, then mean "
        "and standard error over trials). Paper: λ = 0.99 keeps its accuracy with ~90% of "
        "the members dropped about as well as λ = 1 with ~50%."
    ),
    "fig5_specialists": (
        "Mean F1 over the 10 one-vs-all problems of a random single member / random "
        "sub-ensemble against the one selected per problem on the validation split and "
        "scored on test. Paper: the gap grows with λ."
    ),
    "fig7_error_curves": (
        "Test error over epochs of the ensemble and of its members (mean and min-max band), "
        "one trial per cell. Paper (CIFAR-10 CNN, λ = 1): one member is far better than the "
        "rest (module dominance)."
    ),
    "fig10_confusion": (
        "Row-normalised test confusion matrices (x predicted, y true) of evenly spaced "
        "members of one trial. Paper (DN-64-6-16): strong diagonals at λ = 0, vertical "
        "banding at λ = 1."
    ),
    "fig_calibration": (
        "Test expected calibration error (15 bins) and test NLL of the ensemble at the "
        "best-validation epoch against λ, mean and standard error over trials; dashed: after "
        "temperature scaling fitted on the validation NLL."
    ),
    "fig_reliability": (
        "Reliability diagrams of the ensemble on the test set at the best-validation epoch "
        "(accuracy per bin of top-label confidence; the diagonal is perfect calibration), "
        "one trial, at λ = 0, 0.95 and 1."
    ),
    "fig_collusion": (
        "The members' diversity (ambiguity, Eq. 6: mean member NLL minus ensemble NLL) on "
        "their own training batches and on held-out validation data at the best-validation "
        "epoch. Diversity that does not carry over to held-out data is learner collusion "
        "(Jeffares et al.): expected to open up as λ → 1."
    ),
    "fig_shift": (
        "Ensemble accuracy and ECE on the test set rotated by 0 to 180 degrees (Ovadia et "
        "al.'s rotation shift), mean and standard error over trials."
    ),
    "fig_ood": (
        "AUROC of telling out-of-distribution digits (MNIST, or scikit-learn's 8x8 digits "
        "upscaled when MNIST is absent; the set is named under the plot) from the test set "
        "by maximum softmax probability, predictive entropy and mutual information. 0.5 is "
        "chance."
    ),
    "fig_pareto": (
        "Validation error against validation error with 90% of the members dropped at random "
        "(the kept members drawn once per trial seed), both at the best-validation epoch, one "
        "point per trial coloured by λ. Black: the non-dominated trials (the Pareto front). "
        "Stars: the trial nearest each of the paper's λ (0, 0.5, 0.8, 0.9, 0.95, 0.99, 1; "
        "within 0.05), labelled with its own λ. Paper (Fig. 4): λ = 0.99 keeps its accuracy "
        "with ~90% of the members dropped about as well as λ = 1 with ~50%."
    ),
    "table2_mlp": (
        "Fashion-MNIST test error of one large MLP and of 256 small ones (≈815K parameters each)."
    ),
    "table5_densenet": "CIFAR-100 test error of the DenseNet ensembles, by λ.",
    "table6_entropy": (
        "Per-member mean predictive entropy on the test set (nats): min, max, mean and std "
        "over members, one trial."
    ),
    "error_by_configuration": (
        "Every configuration of the sweep: test error at the best-validation epoch."
    ),
    "metrics_by_configuration": (
        "Every metric of the sweep's finished runs per configuration and λ, mean ± standard "
        "error over trials: the summary at the best-validation epoch, test NLL and train / "
        "held-out diversity there, and the selected epoch's temperature, scaled test NLL "
        "and ECE, OOD AUROC / FPR95 and the metrics at 90 degrees of rotation."
    ),
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #555; font-size: 0.9em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption, .caption { color: #444; font-size: 0.9em; max-width: 900px; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } .missing { color: #b22222; }
"""
# Lets a headless browser (and the tests) check that every figure decoded.
IMAGE_CHECK = """
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((img) => !(img.complete && img.naturalWidth > 0));
  document.body.dataset.images = String(images.length);
  document.body.dataset.brokenImages = String(broken.length);
  document.body.dataset.imagesChecked = "true";
});
"""


@dataclass
class Report:
    """Paths of what :func:`build_report` wrote."""

    html: Path
    figures: dict[str, Path] = field(default_factory=dict)
    tables: dict[str, Path] = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)  # figures with nothing to draw yet


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _table_html(table: pd.DataFrame) -> str:
    # The row labels become the first column: one header row, not pandas' two.
    text = table.reset_index().to_html(index=False, escape=True, na_rep=MISSING, border=0)
    return text.replace(f"<td>{MISSING}</td>", f'<td class="missing">{MISSING}</td>')


def _run_link(data: SweepData) -> str:
    uri = data.tracking_uri
    if data.parent_run_id is None:
        return "no sweep parent run"
    if uri.startswith(("http://", "https://")) and data.experiment_id is not None:
        url = f"{uri.rstrip('/')}/#/experiments/{data.experiment_id}/runs/{data.parent_run_id}"
        return f'<a href="{html.escape(url)}">{html.escape(data.parent_run_id)}</a>'
    return html.escape(data.parent_run_id)


def build_report(data: SweepData, out_dir: str | Path) -> Report:
    """Write every figure (PNG), table (CSV) and the HTML page into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(html=out / REPORT_HTML)
    sections = []

    for key, (label, build) in FIGURES.items():
        fig = build(data)
        if fig.get_label() == EMPTY:
            report.empty.append(key)
        png = figure_png(fig)
        path = out / f"{key}.png"
        path.write_bytes(png)
        report.figures[key] = path
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        sections.append(
            f'<section id="{key}"><h2>{html.escape(label)}</h2><figure>'
            f'<img src="{uri}" alt="{html.escape(label)}">'
            f"<figcaption>{html.escape(CAPTIONS[key])}</figcaption></figure></section>"
        )

    for key, (label, build) in TABLES.items():
        table = build(data)
        path = out / f"{key}.csv"
        table.to_csv(path)
        report.tables[key] = path
        sections.append(
            f'<section id="{key}"><h2>{html.escape(label)}</h2>'
            f'<p class="caption">{html.escape(CAPTIONS[key])}</p>{_table_html(table)}</section>'
        )

    missing = missing_cells(data)
    missing_html = (
        "<p>Every configuration of the sweep has a result.</p>"
        if not missing
        else '<p class="missing">No result yet for: '
        + html.escape(", ".join(f"{m} λ={fmt_lam(lam)}" for m, lam in missing))
        + "</p>"
    )
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>modloss report: {html.escape(data.experiment)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{html.escape(data.experiment)}</h1>
<p class="meta">Sweep {html.escape(data.sweep_id or "-")} &middot; parent run {_run_link(data)}
&middot; tracking {html.escape(data.tracking_uri)} &middot; generated {generated}</p>
<section id="status"><h2>Runs</h2>{_table_html(status_counts(data))}{missing_html}</section>
{"".join(sections)}
<script>{IMAGE_CHECK}</script>
</body>
</html>
"""
    report.html.write_text(page, encoding="utf-8")
    return report


def log_report(data: SweepData, report: Report) -> bool:
    """Log the report's files under ``report/`` on the sweep's parent run; False when the
    sweep has no parent run to attach them to."""
    if data.parent_run_id is None:
        return False
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=data.tracking_uri)
    for path in [report.html, *report.figures.values(), *report.tables.values()]:
        client.log_artifact(data.parent_run_id, str(path), artifact_path=ARTIFACT_PATH)
    return True
