"""The names a run is known by outside Python: its folder's files, the artifacts derived
from them, MLflow tags and metric names. modloss, orchestration and dashboards import them
from here instead of repeating the literals. No torch, Ray or MLflow import.
"""

from __future__ import annotations

__all__ = [
    "ANALYSIS_TABLES",
    "CHECKPOINT_FILE",
    "CONFUSION_CSV",
    "CURVE_PREFIX",
    "MEMBER_ENTROPY_CSV",
    "NUM_MEMBERS_TAG",
    "OOD_CSV",
    "OOD_DATASET_TAG",
    "OOD_SCORES",
    "PARENT_TAG",
    "POINT_FOLDER",
    "POINT_TAG",
    "RESULTS_CSV",
    "ROLE_TAG",
    "RELIABILITY_CSV",
    "RELIABILITY_PNG",
    "RESULTS_FILE",
    "ROBUSTNESS_CSV",
    "ROBUSTNESS_PNG",
    "SELECTED_EPOCH_FILE",
    "SELECTED_EPOCH_METRICS",
    "SHIFT_ANGLE",
    "SHIFT_CSV",
    "SHARD_CHECKPOINT_FILE",
    "SPECIALISTS_CSV",
    "SWEEP_ID_TAG",
    "SWEEP_ROLE",
    "SUMMARY_METRICS",
    "TEST_LOGITS_FILE",
    "TRIAL_ID_TAG",
    "TRIAL_ARTIFACTS",
    "UNCERTAINTY_FILES",
    "VAL_LOGITS_FILE",
    "curve",
    "ood_metric",
    "shift_metric",
]

# --- a run folder (modloss.train.fit's out_dir)
RESULTS_FILE = "results.json"  # modloss.records.RunResult, rewritten each epoch
CHECKPOINT_FILE = "checkpoint.pt"  # single-device and DDP runs (rank 0 writes it)
SHARD_CHECKPOINT_FILE = "checkpoint-rank{rank}.pt"  # module parallel: one per rank
TEST_LOGITS_FILE = "test_logits.pt"  # member natural parameters at the best epoch
VAL_LOGITS_FILE = "val_logits.pt"

# --- analyses of a run's saved logits (files of the folder and artifacts of its run)
ROBUSTNESS_CSV = "robustness.csv"
ROBUSTNESS_PNG = "robustness.png"
MEMBER_ENTROPY_CSV = "member_entropy.csv"
CONFUSION_CSV = "confusion.csv"
SPECIALISTS_CSV = "specialists.csv"
ANALYSIS_TABLES = (MEMBER_ENTROPY_CSV, CONFUSION_CSV, SPECIALISTS_CSV)
# Uncertainty at the selected (best-validation) epoch (modloss.uncertainty.selected_epoch):
SHIFT_CSV = "shift.csv"  # shift_curve: one row per rotation angle
OOD_CSV = "ood.csv"  # ood_report: one row per OOD score, with the OOD dataset's name
RELIABILITY_CSV = "reliability.csv"  # reliability_bins of the test logits
RELIABILITY_PNG = "reliability.png"  # plot_reliability of the test logits
SELECTED_EPOCH_FILE = "selected_epoch.json"  # {"epoch", "ood_dataset", "metrics": {...}}
UNCERTAINTY_FILES = (SHIFT_CSV, OOD_CSV, RELIABILITY_CSV, RELIABILITY_PNG, SELECTED_EPOCH_FILE)
# The files of a trial that become artifacts of its MLflow child run. The best epoch's saved
# logits are too large to keep: the trial summarises them into the robustness curve and the
# analysis tables that `modloss report` reads (Fig. 4, 5, 10, Table 6).
TRIAL_ARTIFACTS = (
    RESULTS_FILE,
    ROBUSTNESS_PNG,
    ROBUSTNESS_CSV,
    *ANALYSIS_TABLES,
    *UNCERTAINTY_FILES,
)

# --- a sweep
RESULTS_CSV = "results.csv"  # one row per trial (per point of a packed trial)
# A packed trial (modloss.train.fit_pack of several grid points) keeps each point's run
# folder in this subfolder of its folder, point = the point's index in the trial's pack.
POINT_FOLDER = "point{point}"

# --- metrics
# The summary of a run (modloss.records.RunResult fields of the same names): one value
# per run, in results.json, results.csv, the Tune summary report and the MLflow child run.
SUMMARY_METRICS = (
    "best_epoch",
    "val_error",
    "test_error",
    "val_ece",
    "test_ece",
    "val_brier",
    "test_brier",
    "val_dropped_error",
    "final_test_error",
    "epochs_completed",
)
# The OOD scores of modloss.uncertainty.ood_scores, and the rotation (degrees) whose
# shifted metrics are logged as scalars (the whole curve is SHIFT_CSV).
OOD_SCORES = ("msp", "entropy", "mutual_information")
SHIFT_ANGLE = 90


def ood_metric(measure: str, score: str) -> str:
    """``"ood_<auroc|fpr95>_<score>"``, e.g. ``ood_metric("auroc", "msp") == "ood_auroc_msp"``."""
    return f"ood_{measure}_{score}"


def shift_metric(name: str, angle: int = SHIFT_ANGLE) -> str:
    """``"rotated<angle>_<name>"``, e.g. ``shift_metric("accuracy") == "rotated90_accuracy"``."""
    return f"rotated{angle}_{name}"


# Scalars at the selected epoch (SELECTED_EPOCH_FILE's "metrics"; one value per MLflow child
# run, step 0): the fitted temperature; the ensemble's test NLL before scaling and its test
# NLL / ECE after (its ECE before is the summary's test_ece); AUROC and FPR at 95% TPR of
# each OOD score; ensemble accuracy, NLL and ECE on the test set rotated by SHIFT_ANGLE.
SELECTED_EPOCH_METRICS = (
    "temperature",
    "test_nll",
    "test_nll_scaled",
    "test_ece_scaled",
    *(ood_metric(measure, score) for measure in ("auroc", "fpr95") for score in OOD_SCORES),
    *(shift_metric(name) for name in ("accuracy", "nll", "ece")),
)
# Per-epoch curves are named "epoch/<split>_<metric>" (MLflow: step = epoch).
CURVE_PREFIX = "epoch/"


def curve(name: str) -> str:
    """The per-epoch curve of ``name``, e.g. ``curve("val_error") == "epoch/val_error"``."""
    return f"{CURVE_PREFIX}{name}"


# --- MLflow tags. A child run (one per trial, or per point of a packed trial) also has the
# tags model, lam, trial, lr (TrainConfig's field names) and status (RunResult's).
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag
ROLE_TAG = "modloss.role"  # "sweep" on a sweep's parent run
SWEEP_ROLE = "sweep"
SWEEP_ID_TAG = "sweep_id"  # parent and children
TRIAL_ID_TAG = "trial_id"  # a child's Ray Tune trial id
POINT_TAG = "point"  # a child's index among its Ray trial's points (0 when not packed)
NUM_MEMBERS_TAG = "num_members"  # a child's model_args["num_members"]
OOD_DATASET_TAG = "ood_dataset"  # a child's OOD set: "mnist" or the sklearn-digits fallback
