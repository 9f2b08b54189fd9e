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
    "RESULTS_CSV",
    "RESULTS_FILE",
    "ROBUSTNESS_CSV",
    "ROBUSTNESS_PNG",
    "SHARD_CHECKPOINT_FILE",
    "SPECIALISTS_CSV",
    "SUMMARY_METRICS",
    "TAGS",
    "TEST_LOGITS_FILE",
    "TRIAL_ARTIFACTS",
    "VAL_LOGITS_FILE",
    "curve",
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
# The files of a trial that become artifacts of its MLflow child run.
TRIAL_ARTIFACTS = (RESULTS_FILE, ROBUSTNESS_PNG, ROBUSTNESS_CSV, *ANALYSIS_TABLES)

# --- a sweep
RESULTS_CSV = "results.csv"  # one row per trial, columns named as below

# --- metrics
# The summary of a run (modloss.records.RunResult fields of the same names): one value
# per run, in results.json, results.csv, the Tune summary report and the MLflow child run.
SUMMARY_METRICS = ("best_epoch", "val_error", "test_error", "final_test_error", "epochs_completed")
# Per-epoch curves are named "epoch/<split>_<metric>" (MLflow: step = epoch).
CURVE_PREFIX = "epoch/"


def curve(name: str) -> str:
    """The per-epoch curve of ``name``, e.g. ``curve("val_error") == "epoch/val_error"``."""
    return f"{CURVE_PREFIX}{name}"


# --- MLflow tags of a child run (one per trial) and of the sweep's parent run
TAGS = {
    "parent": "mlflow.parentRunId",
    "role": "modloss.role",
    "sweep_id": "sweep_id",
    "trial_id": "trial_id",
    "model": "model",
    "num_members": "num_members",
    "lam": "lam",
    "trial": "trial",
    "lr": "lr",
    "status": "status",
    "starts": "starts",
    "failures": "failures",
    "error": "error",
}
