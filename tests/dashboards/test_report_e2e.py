"""``modloss report`` on a real sweep: a small version of the smoke space run with
``modloss sweep`` (local Ray, real Fashion-MNIST) into a real ``mlflow server``, the report
built from the server, logged back to the sweep's parent run, and opened in headless
Chromium, which must decode every figure. The screenshot is kept under test-artifacts/.

Chromium is Debian's ``chromium`` package; a machine without it fails these tests (CI
installs it).
"""

from __future__ import annotations

import base64
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dashboards.figures import FIGURES
from orchestration.tracking import runs_url

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ARTIFACTS = ROOT / "test-artifacts" / "dashboards"
EXPERIMENT = "report_e2e"
SWEEP_S = 900
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=10000",
]


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("headless Chromium not found: apt-get install chromium (CI installs it)")
    return path


def browser(*args: str) -> str:
    """Run headless Chromium with a throwaway profile; returns its stdout."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        result = subprocess.run(
            [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def image_check(html: Path) -> dict[str, str]:
    """The data-* attributes the report's script sets on <body> once the page has loaded:
    how many <img> there are and how many failed to decode."""
    dom = browser("--dump-dom", html.as_uri())
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:2000]
    return dict(re.findall(r'data-([\w-]+)="([^"]*)"', body[1]))


def _modloss(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return subprocess.run(
        [str(BIN / "modloss"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def sweep_run(mlflow_server: str, data_dir: Path, tmp_path_factory) -> tuple[str, str]:
    """A 4-trial version of the smoke space (2 models x lambda 0 and 1, 2 epochs), run
    with `modloss sweep` and tracked to the server: the server and what the sweep printed."""
    work = tmp_path_factory.mktemp("sweep")
    space = yaml.safe_load((ROOT / "search_spaces" / "fmnist_smoke.yaml").read_text())
    space.update(name=EXPERIMENT, lam=[0.0, 1.0], epochs=2, subset=2000, data_dir=str(data_dir))
    path = work / "space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    result = _modloss(
        "sweep", str(path), "--tracking-uri", mlflow_server, "--storage", str(work / "ray"),
        cwd=work, timeout=SWEEP_S,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return mlflow_server, result.stdout


@pytest.fixture(scope="module")
def sweep(sweep_run: tuple[str, str]) -> str:
    return sweep_run[0]


@pytest.fixture(scope="module")
def report(sweep: str, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    result = _modloss(
        "report", "--experiment", EXPERIMENT, "--tracking-uri", sweep, "--out", str(out),
        cwd=out,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "logged to run" in result.stdout
    # Every figure has data: the trials' CSV artifacts (robustness, specialists, entropy,
    # confusion, shift, reliability) and selected-epoch metrics were all logged and read back.
    assert "nothing to draw yet" not in result.stderr, result.stderr
    return out


@pytest.mark.slow
def test_every_figure_renders_in_a_browser(report: Path):
    html = report / "report.html"
    check = image_check(html)
    assert check.get("images-checked") == "true", check
    assert check["images"] == str(len(FIGURES))
    assert check["broken-images"] == "0"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    browser("--window-size=1280,6000", f"--screenshot={shot}", html.as_uri())
    assert shot.is_file() and shot.stat().st_size > 50_000
    shutil.copy(html, ARTIFACTS / "report.html")


def test_the_image_check_catches_a_broken_figure(tmp_path):
    """The browser check above can fail: a figure whose data does not decode is counted."""
    from matplotlib.figure import Figure

    from dashboards.report import IMAGE_CHECK, figure_png

    good = base64.b64encode(figure_png(Figure(figsize=(1, 1)))).decode()
    truncated = good[:16]
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><body>"
        f'<img src="data:image/png;base64,{truncated}">'
        f'<img src="data:image/png;base64,{good}">'
        f"<script>{IMAGE_CHECK}</script></body></html>"
    )
    check = image_check(page)
    assert (check["images"], check["broken-images"]) == ("2", "1")


@pytest.mark.slow
def test_the_printed_mlflow_url_shows_the_trials_best_first(sweep_run: tuple[str, str]):
    """What the README's MLflow walk-through describes: the URL `modloss sweep` prints
    opens the experiment's runs table (not MLflow 3's GenAI overview), with every trial
    listed, best test error (the best-validation epoch's) first."""
    from mlflow import MlflowClient

    server, printed = sweep_run
    client = MlflowClient(tracking_uri=server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    url = runs_url(server, experiment.experiment_id)
    assert f"MLflow: runs table at {url}\n" in printed
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser("--window-size=1600,900", f"--screenshot={ARTIFACTS / 'mlflow_runs.png'}", url)
    dom = browser("--window-size=1600,900", "--dump-dom", url)
    assert "Training runs" in dom and "Overview" in dom  # the runs tab, beside the overview
    children = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("modloss.role") != "sweep"
    ]
    assert len(children) == 4
    best_first = sorted(children, key=lambda r: r.data.metrics["test_error"])
    positions = [dom.index(f">{r.info.run_name}<") for r in best_first]
    assert positions == sorted(positions), [r.info.run_name for r in best_first]


@pytest.mark.slow
def test_report_numbers_are_the_tracked_runs(report: Path, sweep: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=sweep)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("modloss.role") != "sweep"
    ]
    assert len(runs) == 4
    table = pd.read_csv(report / "error_by_configuration.csv", index_col="model")
    for run in runs:
        tags, error = run.data.tags, run.data.metrics["test_error"]
        cell = table.loc[tags["model"], f"λ={float(tags['lam']):g}"]
        assert cell == f"{100 * error:.2f}% (n=1)"
    table2 = pd.read_csv(report / "table2_mlp.csv", index_col="architecture")
    assert table2.loc["1-M-1024-H", "test error"] == "—"  # not in this sweep
    assert table2.loc["256-M-4-H (λ = 0.95)", "test error"] == "—"
    joint = [r for r in runs if r.data.tags["model"] == "256-M-4-H" and r.data.tags["lam"] == "1.0"]
    assert table2.loc["256-M-4-H (joint, λ = 1)", "test error"] == (
        f"{100 * joint[0].data.metrics['test_error']:.2f}% (n=1)"
    )
    assert "Every configuration of the sweep has a result." in (report / "report.html").read_text()
    # The metrics table carries each run's selected-epoch scalars as logged in MLflow.
    metrics = pd.read_csv(
        report / "metrics_by_configuration.csv", index_col=["model", "λ"], dtype={"λ": str}
    )
    for run in runs:
        tags, logged = run.data.tags, run.data.metrics
        row = metrics.loc[(tags["model"], f"{float(tags['lam']):g}")]
        for name in ("temperature", "test_ece_scaled", "ood_auroc_msp", "rotated90_accuracy"):
            assert row[name] == f"{logged[name]:.4g} (n=1)"
    entropy = pd.read_csv(report / "table6_entropy.csv", index_col=0)
    assert entropy.index.name == "256-M-4-H"
    assert list(entropy.columns) == ["λ=0", "λ=1"]
    assert not (entropy == "—").to_numpy().any()
    # Mean member entropy lies between 0 and log K (10 classes).
    assert 0 < float(entropy.loc["mean(H[q_i])", "λ=1"]) < math.log(10)


@pytest.mark.slow
def test_report_is_logged_on_the_sweeps_parent_run(report: Path, sweep: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=sweep)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (parent,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`modloss.role` = 'sweep'"
    )
    logged = {Path(f.path).name for f in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report.html", *(f"{key}.png" for key in FIGURES)} <= logged


@pytest.mark.slow
def test_unknown_experiment_lists_the_available_ones(sweep: str, tmp_path):
    result = _modloss(
        "report", "--experiment", "no-such-sweep", "--tracking-uri", sweep,
        "--out", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert "no MLflow experiment named 'no-such-sweep'" in result.stderr
    assert f"'{EXPERIMENT}'" in result.stderr
    assert not (tmp_path / "report.html").exists()
