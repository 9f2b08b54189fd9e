"""The paper's post-hoc analyses of a trained ensemble, from its saved member logits.

Every analysis takes member natural parameters ``eta`` of shape ``(M, N, K)`` (categorical
logits) and integer targets ``(N,)``, as saved by :func:`modloss.train.fit` at the
best-validation epoch (``test_logits.pt``, ``val_logits.pt``). Sub-ensembles are 0/1 member
masks ``(R, M)``; a sub-ensemble's prediction is the argmax of its members' summed logits
(the argmax of the mean, i.e. of the normalised geometric mean, without the division), so R
sub-ensembles cost one ``(R, M) @ (M, N*K)`` product, never a loop over members.

- :func:`robustness` (Fig. 4): accuracy with members dropped at random.
- :func:`specialists` (Fig. 5, section 4.1): one-vs-all F1 of random vs selected members
  and sub-ensembles.
- :func:`entropy_stats` (Table 6), :func:`confusion_matrices` (Fig. 10) and
  :func:`dominance_report` (section 4.2): how the members differ.

:func:`run_analysis` runs one of them on a run directory, writes its figure there and
returns the table the ``modloss analyze`` command prints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor

from modloss.metrics import NEAR_CHANCE_FRACTION, member_entropy
from modloss.names import (
    RESULTS_FILE,
    ROBUSTNESS_CSV,
    ROBUSTNESS_PNG,
    TEST_LOGITS_FILE,
    VAL_LOGITS_FILE,
)

__all__ = [
    "ANALYSES",
    "AnalysisResult",
    "SavedLogits",
    "binary_f1",
    "confusion_matrices",
    "dominance_report",
    "entropy_stats",
    "load_logits",
    "plot_robustness",
    "robustness",
    "run_analysis",
    "specialists",
]

# Section 4.1: specialists are the best of 200 random 20-member sub-ensembles.
SUBSET_SIZE, CANDIDATES = 20, 200
# Elements of the (R, N, K) intermediate per matrix product: 64 MB of float32, enough
# rows for the product to run at full speed (160 rows at N*K = 100,000), bounded in memory.
_CHUNK_ELEMENTS = 2**24


class SavedLogits(NamedTuple):
    eta: Tensor  # (M, N, K)
    target: Tensor  # (N,)
    epoch: int
    family: str


def load_logits(run_dir: str | Path, split: str = "test") -> SavedLogits:
    """The member logits ``fit`` saved for ``split`` ("test" or "val") in ``run_dir``."""
    files = {"test": TEST_LOGITS_FILE, "val": VAL_LOGITS_FILE}
    if split not in files:
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    path = Path(run_dir) / files[split]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} the out_dir of a finished fit?")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return SavedLogits(saved["eta"].float(), saved["target"], saved["epoch"], saved["family"])


def _ensemble_correct(eta: Tensor, target: Tensor, masks: Tensor) -> Tensor:
    """Whether each masked sub-ensemble classifies each example correctly: ``(R, N)`` bool."""
    return _ensemble_predictions(eta, masks) == target


def _ensemble_predictions(eta: Tensor, masks: Tensor) -> Tensor:
    """Class predicted by each sub-ensemble ``masks`` ``(R, M)`` for each example: ``(R, N)``."""
    m, n, k = eta.shape
    flat = eta.reshape(m, n * k)
    rows = max(1, _CHUNK_ELEMENTS // (n * k))
    # max(-1).indices: the first maximum, as argmax, but faster over a short last dimension.
    out = [
        (chunk.to(eta.dtype) @ flat).view(-1, n, k).max(-1).indices  # (r, N)
        for chunk in masks.split(rows)
    ]
    return torch.cat(out)


def _random_subsets(rows: int, num_members: int, size: int, generator: torch.Generator) -> Tensor:
    """``rows`` masks ``(rows, M)``, each with exactly ``size`` members chosen uniformly."""
    ranks = torch.rand(rows, num_members, generator=generator).argsort(1).argsort(1)
    return ranks < size


# --------------------------------------------------------------------------- robustness


def robustness(
    eta: Tensor,
    target: Tensor,
    *,
    draws: int = 20,
    drop_counts: list[int] | None = None,
    keep_probs: tuple[float, ...] = (0.9, 0.75, 0.5, 0.25, 0.1, 0.05),
    seed: int = 0,
) -> pd.DataFrame:
    """Ensemble accuracy with members removed at random, ``draws`` draws per setting.

    Two schemes: ``"drop_k"`` removes exactly k members for each k in ``drop_counts``
    (default: about 33 values from 0 to M-1); ``"bernoulli"`` keeps each member
    independently with probability p for each p in ``keep_probs``, and a draw that would
    keep no member keeps one chosen at random instead (an empty ensemble has no prediction).

    Returns one row per draw: ``scheme``, ``keep_prob`` (NaN for drop_k), ``dropped``
    (members actually removed), ``draw``, ``accuracy``, ``error``.
    """
    m = eta.shape[0]
    if drop_counts is None:
        drop_counts = sorted({round(i * (m - 1) / 32) for i in range(33)})
    bad = [k for k in drop_counts if not 0 <= k < m]
    if bad:
        raise ValueError(f"drop_counts {bad}: expected 0 <= k < M = {m}")
    if any(not 0 < p <= 1 for p in keep_probs):
        raise ValueError(f"keep_probs {keep_probs}: expected probabilities in (0, 1]")
    g = torch.Generator().manual_seed(seed)
    drop_masks = torch.cat([_random_subsets(draws, m, m - k, g) for k in drop_counts])
    probs = torch.tensor(keep_probs, dtype=torch.float64).repeat_interleave(draws)  # (P*draws,)
    keep = torch.rand(len(probs), m, generator=g) < probs.unsqueeze(1)
    forced = torch.randint(m, (len(probs),), generator=g)
    empty = ~keep.any(1)
    keep[empty.nonzero().squeeze(1), forced[empty]] = True
    masks = torch.cat([drop_masks, keep])
    accuracy = _ensemble_correct(eta, target, masks).float().mean(1)
    frame = pd.DataFrame(
        {
            "scheme": ["drop_k"] * len(drop_masks) + ["bernoulli"] * len(keep),
            "keep_prob": [math.nan] * len(drop_masks) + probs.tolist(),
            "dropped": (m - masks.sum(1)).tolist(),
            "draw": list(range(draws)) * (len(drop_counts) + len(keep_probs)),
            "accuracy": accuracy.tolist(),
        }
    )
    frame["error"] = 1 - frame["accuracy"]
    return frame


def robustness_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and std of accuracy per setting (k dropped, or keep probability)."""
    drop = frame[frame.scheme == "drop_k"].groupby("dropped").accuracy.agg(["mean", "std"])
    drop.index = [f"drop {k}" for k in drop.index]
    bern = frame[frame.scheme == "bernoulli"].groupby("keep_prob")
    bern = bern.agg(dropped=("dropped", "mean"), mean=("accuracy", "mean"), std=("accuracy", "std"))
    bern.index = [
        f"keep p={p:g} (~{d:.0f} dropped)" for p, d in zip(bern.index, bern.dropped, strict=True)
    ]
    return pd.concat([drop, bern[["mean", "std"]]]).rename(
        columns={"mean": "accuracy", "std": "accuracy_std"}
    )


def plot_robustness(
    frames: Mapping[str, pd.DataFrame], path: str | Path, *, title: str = ""
) -> Path:
    """Accuracy (mean and std over draws) against the number of members dropped; one line
    per labelled frame (e.g. one per lambda), Bernoulli draws as points at their mean count."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for label, frame in frames.items():
        drop = frame[frame.scheme == "drop_k"].groupby("dropped").accuracy.agg(["mean", "std"])
        prefix = f"{label}: " if label else ""
        line = ax.plot(drop.index, drop["mean"], label=f"{prefix}drop k members")[0]
        ax.fill_between(
            drop.index,
            drop["mean"] - drop["std"],
            drop["mean"] + drop["std"],
            color=line.get_color(),
            alpha=0.2,
        )
        bern = frame[frame.scheme == "bernoulli"].groupby("keep_prob")
        bern = bern.agg(
            dropped=("dropped", "mean"), mean=("accuracy", "mean"), std=("accuracy", "std")
        )
        ax.errorbar(
            bern.dropped,
            bern["mean"],
            yerr=bern["std"],
            fmt="o",
            color=line.get_color(),
            label=f"{prefix}keep each member with probability p",
        )
    ax.set_xlabel("members dropped")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "Robustness to dropping members")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    # Fixed margins: tight_layout measures every text extent, a third of the plot's time.
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.92)
    fig.savefig(path, dpi=120)
    return Path(path)


# --------------------------------------------------------------------------- specialists


def binary_f1(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """F1 of each of R predictors ``pred`` ``(R, N)`` on each one-vs-all problem: ``(R, K)``.

    For class c the positives are ``pred == c``; F1 = 2 TP / (predicted + actual positives),
    0 when both are zero. Counted with one bincount over ``R*K`` cells.
    """
    r, k = pred.shape[0], num_classes
    cell = pred + k * torch.arange(r).unsqueeze(1)  # (R, N): candidate-major class cell
    predicted = torch.bincount(cell.flatten(), minlength=r * k).view(r, k)
    hits = torch.bincount(cell[pred == target].flatten(), minlength=r * k).view(r, k)
    actual = torch.bincount(target, minlength=k)  # (K,)
    denom = predicted + actual
    return torch.where(denom > 0, 2 * hits / denom.clamp_min(1), torch.zeros(()))


def specialists(
    val_eta: Tensor,
    val_target: Tensor,
    test_eta: Tensor,
    test_target: Tensor,
    *,
    subset_size: int = SUBSET_SIZE,
    candidates: int = CANDIDATES,
    seed: int = 0,
) -> pd.DataFrame:
    """One-vs-all F1 of random vs validation-selected members and sub-ensembles (Fig. 5).

    For each class c the binary prediction of a member or sub-ensemble is "its multiclass
    argmax is c". Single members: every member is a candidate; ``random_member`` is the
    expected test F1 of a member drawn uniformly (the mean over members) and
    ``specialist_member`` the test F1 of the member with the best validation F1. Sub-ensembles:
    ``candidates`` random subsets of ``subset_size`` members, shared by all classes;
    ``random_subset`` is their mean test F1, ``specialist_subset`` the test F1 of the one
    with the best validation F1.

    The paper splits the test set in half for selection and scoring. Here selection uses the
    run's own validation split (held out from training, seeded by the trial) and scoring
    the whole test set, so no test example influences the choice. Returns one row per class.
    """
    m, _, k = test_eta.shape
    if not 1 <= subset_size <= m:
        raise ValueError(f"subset_size={subset_size}: expected 1 <= subset_size <= M = {m}")
    if val_eta.shape[0] != m:
        raise ValueError(f"val_eta has {val_eta.shape[0]} members, test_eta {m}")
    g = torch.Generator().manual_seed(seed)
    subsets = _random_subsets(candidates, m, subset_size, g)  # (C, M)
    scores = {}
    for name, eta, target in (("val", val_eta, val_target), ("test", test_eta, test_target)):
        scores[name, "member"] = binary_f1(eta.argmax(-1), target, k)  # (M, K)
        scores[name, "subset"] = binary_f1(_ensemble_predictions(eta, subsets), target, k)
    columns = {}
    for kind in ("member", "subset"):
        chosen = scores["val", kind].argmax(0)  # (K,) best candidate per class
        columns[f"random_{kind}"] = scores["test", kind].mean(0).tolist()
        columns[f"specialist_{kind}"] = scores["test", kind][chosen, torch.arange(k)].tolist()
    return pd.DataFrame(columns, index=pd.RangeIndex(k, name="class"))


def plot_specialists(frame: pd.DataFrame, path: str | Path, *, title: str = "") -> Path:
    """Grouped bars of the four F1 columns per one-vs-all problem, and their mean."""
    table = pd.concat([frame, frame.mean().to_frame("mean").T])
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    width = 0.8 / len(table.columns)
    for i, column in enumerate(table.columns):
        xs = [j + (i - (len(table.columns) - 1) / 2) * width for j in range(len(table))]
        ax.bar(xs, table[column], width=width, label=column.replace("_", " "))
    ax.set_xticks(range(len(table)), [str(c) for c in table.index])
    ax.set_xlabel("one-vs-all problem (class)")
    ax.set_ylabel("test F1")
    ax.set_title(title or "Specialist members and sub-ensembles")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


# --------------------------------------------------------------------------- member statistics


def entropy_stats(eta: Tensor) -> pd.Series:
    """Table 6: min / max / mean / std over members of each member's mean predictive entropy
    (nats) on the given examples; std is the sample standard deviation (n - 1)."""
    per_member = member_entropy(eta).mean(1)  # (M,)
    std = per_member.std().item() if len(per_member) > 1 else math.nan
    return pd.Series(
        {
            "min": per_member.min().item(),
            "max": per_member.max().item(),
            "mean": per_member.mean().item(),
            "std": std,
        },
        name="entropy",
    )


def plot_entropy(eta: Tensor, path: str | Path, *, title: str = "") -> Path:
    """Each member's mean predictive entropy, sorted, against the uniform maximum log K."""
    per_member = member_entropy(eta).mean(1).sort().values
    fig = Figure(figsize=(6.4, 4))
    ax = fig.subplots()
    ax.plot(range(len(per_member)), per_member.tolist(), marker=".", linestyle="none")
    ax.axhline(math.log(eta.shape[-1]), color="grey", linestyle="--", label="uniform (log K)")
    ax.set_xlabel("member (sorted by entropy)")
    ax.set_ylabel("mean predictive entropy (nats)")
    ax.set_title(title or "Per-member output entropy")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def confusion_matrices(eta: Tensor, target: Tensor) -> Tensor:
    """Confusion matrix of every member: ``(M, K, K)`` counts, rows true class, columns
    predicted class; one bincount over ``M*K*K`` cells."""
    m, n, k = eta.shape
    pred = eta.argmax(-1)  # (M, N)
    cell = torch.arange(m).unsqueeze(1) * k * k + target * k + pred  # (M, N)
    return torch.bincount(cell.flatten(), minlength=m * k * k).view(m, k, k)


def confusion_summary(matrices: Tensor) -> pd.DataFrame:
    """Per member: error, lowest and highest per-class recall, and the share of all
    predictions going to its most-predicted class (vertical banding in Fig. 10)."""
    counts = matrices.double()
    total = counts.sum((1, 2))  # (M,)
    recall = counts.diagonal(dim1=1, dim2=2) / counts.sum(2).clamp_min(1)  # (M, K)
    predicted = counts.sum(1)  # (M, K) column sums
    return pd.DataFrame(
        {
            "error": (1 - counts.diagonal(dim1=1, dim2=2).sum(1) / total).tolist(),
            "recall_min": recall.min(1).values.tolist(),
            "recall_max": recall.max(1).values.tolist(),
            "top_predicted_class": predicted.argmax(1).tolist(),
            "top_predicted_share": (predicted.max(1).values / total).tolist(),
        },
        index=pd.RangeIndex(len(matrices), name="member"),
    )


def plot_confusion(matrices: Tensor, path: str | Path, *, max_members: int = 16) -> Path:
    """Row-normalised confusion matrices of up to ``max_members`` evenly spaced members."""
    m = len(matrices)
    shown = sorted(
        {round(i * (m - 1) / max(1, max_members - 1)) for i in range(min(m, max_members))}
    )
    cols = math.ceil(math.sqrt(len(shown)))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(2.4 * cols, 2.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    rates = matrices.double() / matrices.sum(2, keepdim=True).clamp_min(1)
    for ax in axes.flat[len(shown) :]:
        ax.set_axis_off()
    for ax, j in zip(axes.flat, shown, strict=False):
        ax.imshow(rates[j].numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"member {j}", fontsize="small")
        ax.set_xlabel("predicted", fontsize="x-small")
        ax.set_ylabel("true", fontsize="x-small")
        ax.tick_params(labelsize="xx-small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


def dominance_report(eta: Tensor, target: Tensor) -> tuple[pd.DataFrame, dict[str, float]]:
    """Module dominance (section 4.2): each member's error alone and the ensemble's error
    without it (leave-one-out), plus a summary.

    Summary: ``ensemble_error``, ``best_member``, ``best_member_error``, ``dominance_gap``
    (best member's error minus the ensemble's: near zero when one member carries the
    ensemble), ``members_near_chance`` (error at least 90% of chance, 1 - 1/K),
    ``most_influential`` (the member whose removal raises the ensemble error most) and
    ``influence`` (that rise), ``chance``.
    """
    m, _, k = eta.shape
    total = eta.sum(0)  # (N, K)
    ensemble_error = (total.argmax(-1) != target).double().mean().item()
    member_error = (eta.argmax(-1) != target).double().mean(1)  # (M,)
    if m > 1:
        loo_error = ((total - eta).argmax(-1) != target).double().mean(1)  # (M,)
    else:
        loo_error = torch.full((1,), math.nan, dtype=torch.float64)
    chance = 1 - 1 / k
    frame = pd.DataFrame(
        {
            "error": member_error.tolist(),
            "ensemble_error_without": loo_error.tolist(),
            "near_chance": (member_error >= NEAR_CHANCE_FRACTION * chance).tolist(),
        },
        index=pd.RangeIndex(m, name="member"),
    )
    best = int(member_error.argmin())
    influence = loo_error - ensemble_error
    most = int(influence.nan_to_num(-math.inf).argmax())
    summary = {
        "ensemble_error": ensemble_error,
        "best_member": best,
        "best_member_error": member_error[best].item(),
        "dominance_gap": member_error[best].item() - ensemble_error,
        "members_near_chance": int(frame.near_chance.sum()),
        "most_influential": most,
        "influence": influence[most].item(),
        "chance": chance,
    }
    return frame, summary


def plot_dominance(
    frame: pd.DataFrame, summary: Mapping[str, float], path: str | Path, *, title: str = ""
) -> Path:
    """Member errors (sorted) against the ensemble error and chance level."""
    errors = frame.error.sort_values().to_numpy()
    fig = Figure(figsize=(6.4, 4))
    ax = fig.subplots()
    ax.plot(range(len(errors)), errors, marker=".", linestyle="none", label="member alone")
    ax.axhline(summary["ensemble_error"], color="C1", label="ensemble")
    ax.axhline(summary["chance"], color="grey", linestyle="--", label="chance")
    ax.set_xlabel("member (sorted by error)")
    ax.set_ylabel("test error")
    ax.set_ylim(0, 1)
    ax.set_title(title or "Module dominance")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


# --------------------------------------------------------------------------- on a run directory


class AnalysisResult(NamedTuple):
    table: pd.DataFrame
    summary: dict[str, Any]
    figure: Path


def _categorical(run_dir: Path, split: str = "test") -> SavedLogits:
    saved = load_logits(run_dir, split)
    if saved.family != "categorical":
        raise ValueError(f"{run_dir}: the analyses need a categorical run, not {saved.family!r}")
    return saved


def _title(run_dir: Path, what: str) -> str:
    try:
        config = json.loads((run_dir / RESULTS_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError):
        return what
    return f"{what}: {config['model']}, lam={config['lam']:g}"


def _run_robustness(run_dir: Path, seed: int) -> AnalysisResult:
    saved = _categorical(run_dir)
    frame = robustness(saved.eta, saved.target, seed=seed)
    frame.to_csv(run_dir / ROBUSTNESS_CSV, index=False)
    label = _title(run_dir, "robustness")
    figure = plot_robustness({"": frame}, run_dir / ROBUSTNESS_PNG, title=label)
    return AnalysisResult(robustness_summary(frame), {"epoch": saved.epoch}, figure)


def _run_specialists(run_dir: Path, seed: int) -> AnalysisResult:
    val, test = _categorical(run_dir, "val"), _categorical(run_dir)
    # The paper's 20-member sub-ensembles (of 256); half the members for smaller ensembles.
    size = min(SUBSET_SIZE, max(1, test.eta.shape[0] // 2))
    frame = specialists(val.eta, val.target, test.eta, test.target, subset_size=size, seed=seed)
    figure = plot_specialists(frame, run_dir / "specialists.png", title=_title(run_dir, "F1"))
    summary = {"epoch": test.epoch, "subset_size": size, **frame.mean().to_dict()}
    return AnalysisResult(frame, summary, figure)


def _run_entropy(run_dir: Path, seed: int) -> AnalysisResult:
    saved = _categorical(run_dir)
    stats = entropy_stats(saved.eta)
    title = _title(run_dir, "entropy")
    figure = plot_entropy(saved.eta, run_dir / "entropy.png", title=title)
    return AnalysisResult(stats.to_frame(), {"epoch": saved.epoch}, figure)


def _run_confusion(run_dir: Path, seed: int) -> AnalysisResult:
    saved = _categorical(run_dir)
    matrices = confusion_matrices(saved.eta, saved.target)
    figure = plot_confusion(matrices, run_dir / "confusion.png")
    return AnalysisResult(confusion_summary(matrices), {"epoch": saved.epoch}, figure)


def _run_dominance(run_dir: Path, seed: int) -> AnalysisResult:
    saved = _categorical(run_dir)
    frame, summary = dominance_report(saved.eta, saved.target)
    title = _title(run_dir, "dominance")
    figure = plot_dominance(frame, summary, run_dir / "dominance.png", title=title)
    return AnalysisResult(frame, {"epoch": saved.epoch, **summary}, figure)


ANALYSES: dict[str, Callable[[Path, int], AnalysisResult]] = {
    "robustness": _run_robustness,
    "specialists": _run_specialists,
    "entropy": _run_entropy,
    "confusion": _run_confusion,
    "dominance": _run_dominance,
}


def run_analysis(name: str, run_dir: str | Path, *, seed: int = 0) -> AnalysisResult:
    """Run analysis ``name`` (a key of :data:`ANALYSES`) on the saved test (and, for
    specialists, validation) logits of ``run_dir``; writes ``<name>.png`` there."""
    if name not in ANALYSES:
        raise ValueError(f"unknown analysis {name!r}; allowed: {', '.join(ANALYSES)}")
    return ANALYSES[name](Path(run_dir), seed)
