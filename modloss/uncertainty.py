"""Uncertainty of a trained ensemble at its selected epoch: temperature scaling, accuracy
and calibration under rotation, out-of-distribution detection, reliability diagrams.

The functions take member natural parameters ``eta`` of shape ``(M, N, K)`` (categorical
logits, as :func:`modloss.train.fit` saves them for the best-validation epoch) and integer
targets ``(N,)``, or a model and images for the two that need new forward passes
(:func:`shift_curve`, :func:`ood_report`). The ensemble predicts ``softmax(eta_bar)``,
``eta_bar = mean_j eta_j`` (:func:`modloss.losses.combine`); ECE is
:mod:`modloss.metrics`' (15 equal-width bins of the top-label confidence, torchmetrics'
binning). Nothing here imports Ray or MLflow.

- :func:`temperature_scale`: one temperature for the ensemble logits, fitted on validation.
- :func:`shift_curve`: Ovadia et al.'s rotation shift, 0 to 180 degrees.
- :func:`ood_scores`, :func:`auroc`, :func:`fpr_at_tpr`, :func:`ood_report`: MNIST (or
  scikit-learn's 8x8 digits when MNIST is absent) against the in-distribution test set.
- :func:`reliability_bins`, :func:`plot_reliability`: the reliability diagram.
- :func:`selected_epoch`: all of the above for one run's selected epoch, written as files;
  :func:`selected_epochs` for the runs of a pack, with the data passes shared.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from modloss.data import Splits, load_raw, rotate
from modloss.metrics import ECE_BINS, calibration_gaps, confidence_bins, evaluate_groups
from modloss.names import (
    OOD_CSV,
    OOD_SCORES,
    RELIABILITY_CSV,
    RELIABILITY_PNG,
    SELECTED_EPOCH_FILE,
    SHIFT_ANGLE,
    SHIFT_CSV,
    ood_metric,
    shift_metric,
)

__all__ = [
    "OOD_FALLBACK",
    "ROTATIONS",
    "TemperatureFit",
    "auroc",
    "ece",
    "fpr_at_tpr",
    "ood_images",
    "ood_report",
    "ood_reports",
    "ood_scores",
    "plot_reliability",
    "reliability_bins",
    "selected_epoch",
    "selected_epochs",
    "shift_curve",
    "shift_curves",
    "temperature_scale",
]

ROTATIONS = tuple(range(0, 181, 15))
OOD_FALLBACK = "sklearn-digits-8x8-upscaled"
_LBFGS_ITERATIONS = 100


def _check_logits(eta: object, target: object, name: str = "eta") -> tuple[Tensor, Tensor]:
    if not isinstance(eta, Tensor) or eta.dim() != 3 or not eta.is_floating_point():
        got = (tuple(eta.shape), eta.dtype) if isinstance(eta, Tensor) else type(eta).__name__
        raise ValueError(f"{name} must be floating-point logits (M, N, K), got {got}")
    n = eta.shape[1]
    if not isinstance(target, Tensor) or target.dtype != torch.int64 or target.shape != (n,):
        got = (tuple(target.shape), target.dtype) if isinstance(target, Tensor) else target
        raise ValueError(f"target for {name} must be int64 classes of shape ({n},), got {got}")
    return eta, target


def ece(probs: Tensor, target: Tensor, n_bins: int = ECE_BINS) -> float:
    """Top-label l1 expected calibration error of predicted probabilities ``(N, K)``:

        ECE = sum_b |sum_{i in b} (conf_i - [pred_i = y_i])| / N,  conf_i = max_k p_ik

    over ``n_bins`` equal-width confidence bins (:func:`modloss.metrics.confidence_bins`),
    equal to torchmetrics' ``MulticlassCalibrationError(norm="l1")``.
    """
    conf, pred = probs.max(-1)
    # Binned in float32, as torchmetrics bins: float64 edges differ from its by an ulp.
    gaps = calibration_gaps(conf.float(), pred == target, n_bins)
    return gaps.abs().sum().item() / len(target)


def _nll(logits: Tensor, target: Tensor) -> float:
    return F.cross_entropy(logits.double(), target).item()


# --------------------------------------------------------------------------- temperature


class TemperatureFit(NamedTuple):
    """:func:`temperature_scale`'s result: ``temperature`` and the test NLL / ECE of the
    ensemble before (``T = 1``) and after dividing its mean logits by it."""

    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float


def temperature_scale(
    val_eta: Tensor, val_target: Tensor, test_eta: Tensor, test_target: Tensor
) -> TemperatureFit:
    """Temperature scaling of the ensemble (Guo et al. 2017), fitted on validation.

    The ensemble's scaled prediction is ``softmax(eta_bar / T)``; ``T`` minimises the
    validation NLL

        T* = argmin_T (1/N) sum_i [log sum_k exp(eta_bar_ik / T) - eta_bar_iy / T],

    a smooth one-dimensional problem (convex in ``1 / T``), solved by L-BFGS with a strong
    Wolfe line search over ``log T`` (so ``T > 0``), in float64, from ``T = 1``. Scaling
    leaves every argmax, hence the error, unchanged. Returns ``T*`` and the test NLL and ECE
    before and after.
    """
    val_eta, val_target = _check_logits(val_eta, val_target, "val_eta")
    test_eta, test_target = _check_logits(test_eta, test_target, "test_eta")
    val_bar = val_eta.double().mean(0)  # (N, K)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=_LBFGS_ITERATIONS, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(val_bar / log_t.exp(), val_target)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = log_t.exp().item()
    test_bar = test_eta.double().mean(0)
    return TemperatureFit(
        temperature=t,
        nll_before=_nll(test_bar, test_target),
        nll_after=_nll(test_bar / t, test_target),
        ece_before=ece(test_bar.softmax(-1), test_target),
        ece_after=ece((test_bar / t).softmax(-1), test_target),
    )


# --------------------------------------------------------------------------- shift


def shift_curve(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    fill: float | Tensor = 0.0,
    angles: tuple[float, ...] = ROTATIONS,
    batch_size: int = 1000,
) -> pd.DataFrame:
    """Accuracy, NLL, Brier score and ECE of the ensemble and of the mean member on ``x``
    rotated by each of ``angles`` (degrees, counter-clockwise; Ovadia et al.'s rotated-MNIST
    shift, 0 to 180 in steps of 15 by default).

    Each rotated copy is made on ``x``'s device (:func:`modloss.data.rotate`, outside pixels
    ``fill``: for standardised images ``-splits.x_mean / splits.x_std``, the standardised
    black) and evaluated in eval mode without gradients (:func:`modloss.metrics.evaluate`).
    The ensemble predicts ``softmax(eta_bar)``; the member columns are the means over members
    of each member's own accuracy, NLL, Brier score and ECE.

    Returns one row per angle: ``angle``, ``accuracy``, ``nll``, ``brier``, ``ece``,
    ``member_accuracy``, ``member_nll``, ``member_brier``, ``member_ece``.
    """
    kw = {"fill": fill, "angles": angles, "batch_size": batch_size}
    return shift_curves(model, x, y, groups=1, **kw)[0]


def shift_curves(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    groups: int,
    fill: float | Tensor = 0.0,
    angles: tuple[float, ...] = ROTATIONS,
    batch_size: int = 1000,
) -> list[pd.DataFrame]:
    """:func:`shift_curve` of each of the ``groups`` equal member groups of ``model`` (a
    pack, :func:`modloss.pack.pack_models`): each angle's copy of ``x`` is rotated once and
    passed once through the whole pack (:func:`modloss.metrics.evaluate_groups`)."""
    rows: list[list[dict[str, float]]] = [[] for _ in range(groups)]
    lams = [1.0] * groups  # the loss entries are not read
    for angle in angles:
        shifted = rotate(x, float(angle), fill=fill)
        per_group = evaluate_groups(
            model, shifted, y, family="categorical", lams=lams, batch_size=batch_size
        )
        for g, (m, _) in enumerate(per_group):
            rows[g].append(
                {
                    "angle": angle,
                    "accuracy": 1.0 - m["error"],
                    "nll": m["ensemble_nll"],
                    "brier": m["brier"],
                    "ece": m["ece"],
                    "member_accuracy": 1.0 - m["member_error_mean"],
                    "member_nll": m["member_nll"],
                    "member_brier": m["member_brier"],
                    "member_ece": m["member_ece"],
                }
            )
    return [pd.DataFrame(r) for r in rows]


# --------------------------------------------------------------------------- OOD


def ood_scores(eta: Tensor) -> dict[str, Tensor]:
    """Three out-of-distribution scores per example, each ``(N,)``, higher = more unusual:

    - ``"msp"``: minus the maximum softmax probability of the ensemble,
      ``-max_k softmax(eta_bar)_k`` (Hendrycks & Gimpel);
    - ``"entropy"``: the predictive entropy of the ensemble, ``H[softmax(eta_bar)]``;
    - ``"mutual_information"``: ``H[(1/M) sum_j p_j] - (1/M) sum_j H[p_j]`` with
      ``p_j = softmax(eta_j)``: the information the member index carries about the class
      (Jensen: >= 0, zero when the members agree). Its first term uses the arithmetic mean
      of the members' probabilities, as the usual definition (and torch-uncertainty) does,
      not the ensemble's normalised geometric mean.
    """
    if not isinstance(eta, Tensor) or eta.dim() != 3:
        raise ValueError(f"eta must be logits (M, N, K), got {getattr(eta, 'shape', eta)}")
    eta = eta.double()
    log_bar = torch.log_softmax(eta.mean(0), -1)  # (N, K)
    logp = torch.log_softmax(eta, -1)  # (M, N, K)
    log_mean = torch.logsumexp(logp, 0) - math.log(eta.shape[0])  # log (1/M) sum_j p_j

    def entropy(logq: Tensor) -> Tensor:
        return -(logq.exp() * logq).sum(-1)

    return {
        "msp": -log_bar.amax(-1).exp(),
        "entropy": entropy(log_bar),
        "mutual_information": (entropy(log_mean) - entropy(logp).mean(0)).clamp_min(0),
    }


def auroc(in_scores: Tensor, out_scores: Tensor) -> float:
    """Area under the ROC curve of telling OOD (positive) from in-distribution by the score:

        AUROC = P(s_out > s_in) + P(s_out = s_in) / 2,

    the Mann-Whitney statistic, from the average ranks of all scores (ties share a rank).
    """
    scores = torch.cat([in_scores, out_scores]).double()
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value: the ranks before it, plus (count + 1) / 2.
    before = torch.cumsum(counts, 0) - counts
    ranks = (before + (counts + 1) / 2).double()[inverse]
    n_in, n_out = len(in_scores), len(out_scores)
    if n_in == 0 or n_out == 0:
        raise ValueError(f"auroc needs both kinds of example, got {n_in} in and {n_out} out")
    u = ranks[n_in:].sum().item() - n_out * (n_out + 1) / 2
    return u / (n_in * n_out)


def fpr_at_tpr(in_scores: Tensor, out_scores: Tensor, tpr: float = 0.95) -> float:
    """False-positive rate at ``tpr`` true-positive rate, OOD the positive class: with the
    threshold ``t`` the largest score such that a fraction >= ``tpr`` of the OOD scores is
    ``>= t``, the fraction of in-distribution scores ``>= t`` (FPR95 for ``tpr = 0.95``)."""
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr!r}")
    ordered = out_scores.double().sort(descending=True).values
    threshold = ordered[math.ceil(tpr * len(ordered) - 1e-9) - 1]
    return (in_scores.double() >= threshold).double().mean().item()


def ood_images(
    splits: Splits, *, data_dir: str | os.PathLike[str] | None = None
) -> tuple[Tensor, str]:
    """Out-of-distribution test images for ``splits`` (28x28 grey images), standardised with
    the in-distribution training statistics ``splits.x_mean`` / ``splits.x_std``, on the
    splits' device, and the name of their dataset.

    MNIST's 10,000 test images when its four IDX files are in the data directory (read and
    MD5-checked like Fashion-MNIST's, never downloaded here); otherwise scikit-learn's
    bundled 1,797 8x8 digits, scaled from 0..16 to [0, 1] and upsampled bilinearly to 28x28,
    named :data:`OOD_FALLBACK`.
    """
    if tuple(splits.info.input_shape) != (1, 28, 28):
        raise ValueError(
            f"splits hold {splits.info.name} images of shape {splits.info.input_shape}; the "
            "digit OOD sets are 28x28 grey images, for (Fashion-)MNIST-shaped data"
        )
    try:
        x, name = load_raw("mnist", data_dir=data_dir, download=False).x_test / 255.0, "mnist"
    except FileNotFoundError:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError(
                "no MNIST files and no scikit-learn for its bundled digits: put MNIST under "
                "<data dir>/mnist/ or pip install scikit-learn"
            ) from err
        digits = torch.from_numpy(load_digits().images).float().unsqueeze(1) / 16  # (N, 1, 8, 8)
        x = F.interpolate(digits, size=(28, 28), mode="bilinear", align_corners=False)
        name = OOD_FALLBACK
    device = splits.x_mean.device
    x = x.to(device)
    return (x - splits.x_mean.view(1, -1, 1, 1)) / splits.x_std.view(1, -1, 1, 1), name


@torch.no_grad()
def _forward(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    was_training = model.training
    model.eval()
    eta = torch.cat([model(x[s : s + batch_size]) for s in range(0, len(x), batch_size)], 1)
    model.train(was_training)
    return eta  # (M, N, K)


def ood_report(
    model: nn.Module,
    splits: Splits,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 1000,
) -> pd.DataFrame:
    """AUROC and FPR at 95% TPR of each :func:`ood_scores` score, in-distribution the test
    split of ``splits``, out-of-distribution :func:`ood_images` (MNIST, else the upscaled
    scikit-learn digits). One row per score: ``score``, ``auroc``, ``fpr95``,
    ``ood_dataset``, ``num_in``, ``num_out``."""
    test_eta = _forward(model, splits.test.x, batch_size)
    return ood_reports(model, splits, [test_eta], data_dir=data_dir, batch_size=batch_size)[0]


def ood_reports(
    model: nn.Module,
    splits: Splits,
    test_etas: list[Tensor],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 1000,
) -> list[pd.DataFrame]:
    """:func:`ood_report` of each of the ``len(test_etas)`` equal member groups of
    ``model`` (a pack), given each group's logits on ``splits.test`` (those that
    :func:`modloss.train.fit` saved at the selected epoch: no new forward pass); the OOD
    images are loaded once and passed once through the whole pack."""
    x_out, name = ood_images(splits, data_dir=data_dir)
    out_eta = _forward(model, x_out, batch_size)  # (G*M, N_out, K)
    size = out_eta.shape[0] // len(test_etas)
    reports = []
    for g, test_eta in enumerate(test_etas):
        scores_in = ood_scores(test_eta)
        scores_out = ood_scores(out_eta[g * size : (g + 1) * size])
        rows = [
            {
                "score": key,
                "auroc": auroc(scores_in[key], scores_out[key]),
                "fpr95": fpr_at_tpr(scores_in[key], scores_out[key]),
                "ood_dataset": name,
                "num_in": test_eta.shape[1],
                "num_out": len(x_out),
            }
            for key in scores_in
        ]
        reports.append(pd.DataFrame(rows))
    return reports


# --------------------------------------------------------------------------- reliability


def reliability_bins(eta: Tensor, target: Tensor, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """The ensemble's reliability table: per equal-width bin of the top-label confidence of
    ``softmax(eta_bar)``, ``lower``, ``upper``, ``count``, mean ``confidence`` and
    ``accuracy`` (NaN for an empty bin). Confidences of exactly 1 go to the last bin here;
    the ECE, ``sum_b count_b |accuracy_b - confidence_b| / N``, is :func:`ece`'s, which
    keeps them apart as torchmetrics does."""
    eta, target = _check_logits(eta, target)
    conf, pred = eta.double().mean(0).softmax(-1).max(-1)
    index = confidence_bins(conf.float(), n_bins).clamp_(max=n_bins - 1)
    count = torch.bincount(index, minlength=n_bins).double()
    total_conf = torch.bincount(index, conf, minlength=n_bins)
    total_acc = torch.bincount(index, (pred == target).double(), minlength=n_bins)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    return pd.DataFrame(
        {
            "lower": edges[:-1].numpy(),
            "upper": edges[1:].numpy(),
            "count": count.long().numpy(),
            "confidence": (total_conf / count).numpy(),
            "accuracy": (total_acc / count).numpy(),
        }
    )


def plot_reliability(
    eta: Tensor,
    target: Tensor,
    path: str | os.PathLike[str],
    *,
    n_bins: int = ECE_BINS,
    title: str | None = None,
) -> Path:
    """Write the ensemble's reliability diagram to ``path`` (PNG): per bin of
    :func:`reliability_bins`, the accuracy as a bar over the bin, the gap to the mean
    confidence shaded, the diagonal of perfect calibration, and the ECE in the title."""
    table = reliability_bins(eta, target, n_bins)
    value = ece(eta.double().mean(0).softmax(-1).float(), target, n_bins)
    fig = Figure(figsize=(4.5, 4.5))  # no pyplot: the Agg canvas, no display needed
    ax = fig.add_subplot()
    width = table["upper"] - table["lower"]
    filled = table["count"] > 0
    ax.bar(
        table["lower"][filled],
        table["accuracy"][filled],
        width[filled],
        align="edge",
        edgecolor="black",
        label="accuracy",
    )
    ax.bar(
        table["lower"][filled],
        (table["confidence"] - table["accuracy"])[filled],
        width[filled],
        bottom=table["accuracy"][filled],
        align="edge",
        color="tab:red",
        alpha=0.3,
        label="gap to confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    ax.set_title(f"{title + ': ' if title else ''}ECE {value:.4f} ({n_bins} bins)")
    ax.legend(loc="upper left")
    path = Path(path)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return path


# --------------------------------------------------------------------------- one run


def selected_epoch(
    model: nn.Module,
    splits: Splits,
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    out_dir: str | os.PathLike[str],
    *,
    epoch: int,
    data_dir: str | os.PathLike[str] | None = None,
    title: str | None = None,
) -> dict[str, float]:
    """Every analysis of this module for one run at its selected epoch, written into
    ``out_dir`` under the names of :mod:`modloss.names`.

    ``model`` holds the selected epoch's weights and ``val`` / ``test`` are the
    ``(eta, target)`` it produced (the logits :func:`modloss.train.fit` saves), so the
    temperature, the reliability diagram and the OOD report's in-distribution scores need no
    new forward pass; the shift curve runs the model on ``splits.test`` rotated, and the
    OOD report on :func:`ood_images`.

    Writes ``shift.csv`` (:func:`shift_curve`), ``ood.csv`` (:func:`ood_report`),
    ``reliability.csv`` / ``reliability.png`` (the test logits' diagram) and
    ``selected_epoch.json``: ``{"epoch", "ood_dataset", "metrics"}``, the metrics being
    :data:`modloss.names.SELECTED_EPOCH_METRICS`, which it also returns.
    """
    kw = {"epochs": [epoch], "data_dir": data_dir, "titles": [title]}
    return selected_epochs(model, splits, [val], [test], [out_dir], **kw)[0]


def selected_epochs(
    model: nn.Module,
    splits: Splits,
    vals: list[tuple[Tensor, Tensor]],
    tests: list[tuple[Tensor, Tensor]],
    out_dirs: list[str | os.PathLike[str]],
    *,
    epochs: list[int],
    data_dir: str | os.PathLike[str] | None = None,
    titles: list[str | None] | None = None,
    batch_size: int = 1000,
) -> list[dict[str, float]]:
    """:func:`selected_epoch` of each run of a pack: ``model``'s G equal member groups
    (:func:`modloss.pack.pack_models` of the runs' selected-epoch models; G = ``len(vals)``)
    are the runs, run g's files go to ``out_dirs[g]``. The data passes are shared: each
    rotated copy of the test set and the OOD images are made once and passed once through
    the whole pack."""
    groups = len(vals)
    titles = [None] * groups if titles is None else titles
    fill = -splits.x_mean / splits.x_std  # the standardised black, per channel
    kw = {"data_dir": data_dir, "batch_size": batch_size}
    x, y = splits.test
    shifts = shift_curves(model, x, y, groups=groups, fill=fill, batch_size=batch_size)
    oods = ood_reports(model, splits, [eta for eta, _ in tests], **kw)
    results = []
    for g in range(groups):
        out = Path(out_dirs[g])
        shift, ood, test = shifts[g], oods[g], tests[g]
        fit = temperature_scale(*vals[g], *test)
        shift.to_csv(out / SHIFT_CSV, index=False)
        ood.to_csv(out / OOD_CSV, index=False)
        reliability_bins(*test).to_csv(out / RELIABILITY_CSV, index=False)
        plot_reliability(*test, out / RELIABILITY_PNG, title=titles[g])

        at_angle = shift[shift["angle"] == SHIFT_ANGLE]
        by_score = ood.set_index("score")
        metrics = {
            "temperature": fit.temperature,
            "test_nll": fit.nll_before,
            "test_nll_scaled": fit.nll_after,
            "test_ece_scaled": fit.ece_after,
            **{
                ood_metric(measure, score): float(by_score.loc[score, measure])
                for measure in ("auroc", "fpr95")
                for score in OOD_SCORES
            },
            **{
                shift_metric(name): float(at_angle[name].iloc[0])
                for name in ("accuracy", "nll", "ece")
                if len(at_angle)
            },
        }
        record = {"epoch": epochs[g], "ood_dataset": str(ood["ood_dataset"].iloc[0])}
        (out / SELECTED_EPOCH_FILE).write_text(json.dumps({**record, "metrics": metrics}, indent=1))
        results.append(metrics)
    return results
