"""The typed records of a training run: one :class:`SplitMetrics` per split and epoch, one
:class:`EpochRecord` per epoch, one :class:`RunResult` per run.

``results.json`` is ``RunResult``'s JSON serialisation, and every other view of a run (the
Tune reports, the MLflow child run, ``results.csv``, the report) is derived from these
records without renaming (:mod:`modloss.names` holds the derived names):

- ``val_error`` and ``test_error`` always mean the errors at the best-validation epoch
  (:attr:`RunResult.val_error`, :attr:`RunResult.test_error`);
- a per-epoch value lives in ``history[i].<split>.<metric>`` in results.json, and is
  called ``epoch/<split>_<metric>`` (e.g. ``epoch/val_error``) where it is flattened into
  a curve (:meth:`EpochRecord.curves`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from modloss.names import CURVE_PREFIX, SUMMARY_METRICS

__all__ = ["SPLITS", "EpochRecord", "RunResult", "SplitMetrics", "Status"]

SPLITS = ("train", "val", "test")
Status = Literal["running", "finished", "diverged", "stopped"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class SplitMetrics(_Record):
    """The metrics of the ensemble and its members on one split in one epoch.

    Training metrics come from the training forward passes themselves (train mode, while
    the weights move during the epoch); validation and test metrics from an eval-mode pass
    after the epoch. See :mod:`modloss.metrics` for how each is computed.
    """

    loss: float = Field(description="Modular loss: lam * ensemble_nll + (1 - lam) * member_nll.")
    ensemble_nll: float = Field(description="Mean NLL of the ensemble prediction.")
    member_nll: float = Field(description="Mean over members of each member's mean NLL.")
    ambiguity: float = Field(description="member_nll - ensemble_nll (Eq. 6), the diversity.")
    error: float = Field(
        description="Ensemble error: misclassification rate (categorical) or RMSE."
    )
    member_error_min: float = Field(description="Error of the best member.")
    member_error_mean: float = Field(description="Mean of the members' errors.")
    member_error_max: float = Field(description="Error of the worst member.")
    member_errors: list[float] = Field(description="Each member's error, in member order.")
    best_member: int = Field(description="Index of the member with the lowest error.")
    dominance_gap: float = Field(
        description="member_error_min - error: near zero when one module carries the ensemble."
    )
    brier: float | None = Field(
        None, description="Brier score of the ensemble prediction, summed over classes."
    )
    ece: float | None = Field(
        None, description="Top-label ECE of the ensemble prediction, 15 equal-width bins."
    )
    member_brier: float | None = Field(None, description="Mean over members of their Brier.")
    member_ece: float | None = Field(None, description="Mean over members of their ECE.")
    disagreement: float | None = Field(
        None, description="Mean fraction of members whose class differs from the ensemble's."
    )
    dropped_error: float | None = Field(
        None,
        description="Validation only: the ensemble error of the members kept when 90% are "
        "dropped at random (modloss.metrics.kept_members; the same members every epoch).",
    )
    members_near_chance: int | None = Field(
        None, description="Members whose error is within 10% of chance level."
    )
    entropy_mean: float | None = Field(
        None, description="Mean over members of the mean predictive entropy (nats; categorical)."
    )
    member_entropy: list[float] | None = Field(
        None, description="Each member's mean predictive entropy (nats; categorical)."
    )

    def scalars(self) -> dict[str, float]:
        """The scalar metrics (no per-member vectors, no missing values)."""
        return {
            k: float(v)
            for k, v in self.model_dump().items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }


class EpochRecord(_Record):
    """One completed epoch of a run."""

    epoch: int = Field(description="The epoch, counted from 1.")
    lr: float = Field(description="The learning rate used during the epoch.")
    seconds: float = Field(description="Wall time of the epoch: training and evaluation.")
    train: SplitMetrics = Field(description="Metrics of the epoch's training batches.")
    val: SplitMetrics = Field(description="Metrics on the validation split after the epoch.")
    test: SplitMetrics = Field(description="Metrics on the test split after the epoch.")
    diversity_gap: float = Field(
        description="train.ambiguity - val.ambiguity: diversity the members show on their "
        "training batches beyond what carries over to held-out data (learner collusion)."
    )
    comm_floats_per_step: float | None = Field(
        None,
        description="Floats a rank handed to collectives per training step (distributed "
        "runs only): B x K for module parallel, the parameter count for DDP.",
    )

    def curves(self) -> dict[str, float]:
        """This epoch's point of every per-epoch curve: ``epoch/<split>_<metric>``,
        ``epoch/lr``, ``epoch/seconds`` (and ``epoch/comm_floats_per_step``)."""
        out = {
            f"{CURVE_PREFIX}lr": self.lr,
            f"{CURVE_PREFIX}seconds": self.seconds,
            f"{CURVE_PREFIX}diversity_gap": self.diversity_gap,
        }
        if self.comm_floats_per_step is not None:
            out[f"{CURVE_PREFIX}comm_floats_per_step"] = self.comm_floats_per_step
        for split in SPLITS:
            for key, value in getattr(self, split).scalars().items():
                out[f"{CURVE_PREFIX}{split}_{key}"] = value
        return out

    def is_finite(self) -> bool:
        return all(math.isfinite(v) for v in self.curves().values())


class RunResult(_Record):
    """A training run: its configuration, outcome, selected epoch and history.

    Model selection only ever sees validation: ``best_epoch`` is the epoch of lowest
    validation error, and ``val_error`` / ``test_error`` are that epoch's errors.
    """

    status: Status = Field(
        description="running | finished (all epochs) | diverged (a non-finite metric) | "
        "stopped (by a callback; fit on the same folder continues it)."
    )
    best_epoch: int | None = Field(description="The epoch of lowest validation error.")
    val_error: float | None = Field(description="Validation error at best_epoch.")
    test_error: float | None = Field(description="Test error at best_epoch.")
    val_ece: float | None = Field(None, description="Validation ECE at best_epoch.")
    test_ece: float | None = Field(None, description="Test ECE at best_epoch.")
    val_brier: float | None = Field(None, description="Validation Brier score at best_epoch.")
    test_brier: float | None = Field(None, description="Test Brier score at best_epoch.")
    val_dropped_error: float | None = Field(
        None, description="Validation error with 90% of the members dropped, at best_epoch."
    )
    final_test_error: float | None = Field(description="Test error at the last epoch completed.")
    diverged_epoch: int | None = Field(description="The epoch whose metrics were not finite.")
    epochs_completed: int = Field(description="Epochs trained and recorded in history.")
    params: int = Field(description="Trainable parameters of the whole ensemble.")
    model_args: dict[str, Any] = Field(
        description="The model's constructor arguments (num_members among them)."
    )
    config: dict[str, Any] = Field(description="The validated TrainConfig the run ran with.")
    strategy: str = Field("single", description="single | ddp | module (how it was trained).")
    world_size: int = Field(1, description="Processes that trained it.")
    resumed_from: list[int] = Field(
        [], description="epochs_completed each time the run resumed from a checkpoint."
    )
    history: list[EpochRecord] = Field([], description="One record per completed epoch.")

    @property
    def num_members(self) -> int:
        return int(self.model_args["num_members"])

    def summary(self) -> dict[str, float]:
        """The run's summary metrics (:data:`modloss.names.SUMMARY_METRICS`) that have a
        value: what results.csv and the MLflow child run hold under these same names."""
        values = {name: getattr(self, name) for name in SUMMARY_METRICS}
        return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}

    def is_complete(self, epochs: int) -> bool:
        """Nothing left to train for a run of ``epochs`` epochs."""
        return self.status == "diverged" or (
            self.status == "finished" and self.epochs_completed >= epochs
        )

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), allow_nan=False)

    @classmethod
    def read(cls, path: str | Path) -> RunResult:
        """The run of a ``results.json`` file."""
        return cls.model_validate_json(Path(path).read_text())
