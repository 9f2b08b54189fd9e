"""MLflow tracking of a sweep, all of it from the driver process.

One parent run per sweep and one nested child run per trial (tag ``mlflow.parentRunId``),
or per point of a packed trial (tag ``point``: its index in the trial's pack).
Every write goes through :class:`TrialLogger`, a Ray Tune callback that runs in the
driver, or :class:`SweepTracker`, which the driver calls before and after the Tuner: one
process writes, so a SQLite store never sees concurrent writers. Per-epoch metrics go in
one ``log_batch`` per epoch, step = epoch. A resumed sweep finds its parent run in the Ray
experiment directory (``mlflow_sweep.json``) and each trial's children by their ``trial_id``
and ``point`` tags, so resuming adds no runs; reconciling the children with Ray's trial
states at the end leaves no run RUNNING after a crash, a failed trial or an interrupted
driver.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ray.tune import Callback

from modloss.names import (
    CONFUSION_CSV,
    CURVE_PREFIX,
    MEMBER_ENTROPY_CSV,
    NUM_MEMBERS_TAG,
    OOD_DATASET_TAG,
    PARENT_TAG,
    POINT_FOLDER,
    POINT_TAG,
    ROLE_TAG,
    SELECTED_EPOCH_FILE,
    SELECTED_EPOCH_METRICS,
    SPECIALISTS_CSV,
    SUMMARY_METRICS,
    SWEEP_ID_TAG,
    SWEEP_ROLE,
    TRIAL_ARTIFACTS,
    TRIAL_ID_TAG,
    curve,
)
from orchestration.guards import (
    DEFAULT_TRACKING_URI,
    TrackingError,
    check_tracking_uri,
    damaged_file,
    read_json,
    write_json,
)
from orchestration.reports import POINTS_KEY, own_values

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from ray.tune.experiment import Trial

__all__ = [
    "DEFAULT_TRACKING_URI",
    "RECORD_FILE",
    "SweepRecord",
    "SweepTracker",
    "TrackingError",
    "TrialLogger",
    "analysis_tables",
    "runs_url",
    "ui_hint",
    "check_tracking_uri",
    "epoch_metrics",
    "error_text",
    "point_name",
    "trial_points",
    "trial_status",
]

RECORD_FILE = "mlflow_sweep.json"  # in the Ray experiment directory
# A trial's outcome -> the MLflow status of its run.
_RUN_STATUS = {
    "finished": "FINISHED",
    "diverged": "FINISHED",
    "stopped": "FINISHED",
    "failed": "FAILED",
    "interrupted": "KILLED",
    "pending": "KILLED",
}
_FINAL = ("finished", "diverged")  # a point's outcomes that no restart changes


def analysis_tables(directory: Path) -> dict[str, pd.DataFrame]:
    """CSV tables (by file name) from the logits ``fit`` saved in ``directory``:
    ``member_entropy.csv`` (each member's mean test entropy), ``confusion.csv`` (each
    member's test confusion counts, non-zero cells) and, for two or more members,
    ``specialists.csv`` (one-vs-all F1, random vs selected on validation). Empty when the
    logits are missing or not categorical."""
    import pandas as pd

    from modloss.analysis import SUBSET_SIZE, confusion_matrices, load_logits, specialists
    from modloss.metrics import member_entropy

    try:
        test, val = load_logits(directory, "test"), load_logits(directory, "val")
    except FileNotFoundError:
        return {}
    if test.family != "categorical":
        return {}
    m = test.eta.shape[0]
    entropy = member_entropy(test.eta).mean(1)  # (M,)
    counts = confusion_matrices(test.eta, test.target)  # (M, K, K)
    member, true, predicted = counts.nonzero(as_tuple=True)
    tables = {
        MEMBER_ENTROPY_CSV: pd.DataFrame({"member": range(m), "entropy": entropy.tolist()}),
        CONFUSION_CSV: pd.DataFrame(
            {
                "member": member.tolist(),
                "true": true.tolist(),
                "predicted": predicted.tolist(),
                "count": counts[member, true, predicted].tolist(),
            }
        ),
    }
    if m > 1:
        size = min(SUBSET_SIZE, max(1, m // 2))  # as `modloss analyze specialists`
        frame = specialists(val.eta, val.target, test.eta, test.target, subset_size=size)
        tables[SPECIALISTS_CSV] = frame.reset_index().assign(subset_size=size)
    return tables


UI_PORT = 5000  # modloss ui's default


def runs_url(server: str, experiment_id: str) -> str:
    """The runs table of an experiment in the MLflow UI at ``server``, its trials sorted by
    ``test_error`` (the best-validation epoch's), best first. MLflow 3.17 opens an
    experiment on its GenAI overview (traces) page instead; sorting by a metric also lists
    the child runs rather than the parent run collapsed."""
    sort = "orderByKey=metrics.%60test_error%60&orderByAsc=true"
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{sort}"


def ui_hint(record: SweepRecord) -> str:
    """Where to see a sweep's runs: the runs table's URL on a tracking server, or for a
    local store, the ``modloss ui`` command and the URL it serves."""
    if urlparse(record.tracking_uri).scheme in ("http", "https"):
        return f"runs table at {runs_url(record.tracking_uri, record.experiment_id)}"
    url = runs_url(f"http://127.0.0.1:{UI_PORT}", record.experiment_id)
    return f"`modloss ui --tracking-uri {record.tracking_uri}`, then open {url}"


def trial_status(ray_status: str, last_result: Mapping[str, Any] | None, epochs: int) -> str:
    """A trial's outcome: finished | diverged | stopped (early, by the scheduler) | failed |
    interrupted | pending."""
    last = last_result or {}
    if last.get("status") == "diverged":  # whatever became of the trial after: a packed
        return "diverged"  # point can diverge before its pack fails or is interrupted
    if ray_status == "ERROR":
        return "failed"
    if ray_status == "TERMINATED":
        if last.get("status") in ("finished", "diverged"):
            return last["status"]
        # A scheduler may stop a trial at its last epoch, before the closing summary.
        return "finished" if last.get("epoch") == epochs else "stopped"
    return "interrupted" if last else "pending"


def trial_points(
    trial: Trial, report: Mapping[str, Any] | None = None
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """A trial's points (TrainConfig dicts) with each one's part of ``report`` (default: the
    trial's latest): an unpacked trial is one point and the whole report; a packed trial
    (``config["pack"]``) has its points in pack order, each with its own report. Each
    report has the point's own summary values (:func:`orchestration.reports.own_values`)."""
    last = trial.last_result if report is None else report
    last = last or {}
    pack = trial.config.get("pack")
    if pack is None:
        return [(trial.config["train"], own_values(last))]
    reports = last.get(POINTS_KEY) or [{}] * len(pack)
    return [(config, own_values(r)) for config, r in zip(pack, reports, strict=True)]


def point_name(config: Mapping[str, Any]) -> str:
    """A point's name: its model, λ and trial (an unpacked trial's name, a child run's)."""
    return f"{config['model']}_lam{config['lam']:.4g}_t{config['trial']}"


def error_text(trial: Trial) -> str:
    """A failed trial's error log, from the file Ray writes on the driver before calling
    the callbacks (the copy in storage is synced later)."""
    path = trial.error_file
    if path is not None and Path(path).is_file():
        return Path(path).read_text()
    return trial.get_error() or "unknown error"


def epoch_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The per-epoch curves (``epoch/...``) of a Tune report of modloss."""
    return {
        k: float(v)
        for k, v in result.items()
        if k.startswith(CURVE_PREFIX) and isinstance(v, int | float) and not isinstance(v, bool)
    }


def _resolved(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """A point's config with its lr resolved: a sampled point on the paper's preset has
    none yet (grid points arrive validated, lr resolved)."""
    from orchestration.spaces import train_config

    return train_config(config) if config.get("lr") is None else config


def _params(config: Mapping[str, Any]) -> dict[str, str]:
    # MLflow params are strings of at most 6000 characters; nested values as JSON.
    out = {}
    for k, v in config.items():
        out[k] = json.dumps(v) if isinstance(v, dict | list) else str(v)
    return {k: v[:6000] for k, v in out.items()}


@dataclass(frozen=True)
class SweepRecord:
    """What a resumed sweep needs to find its MLflow runs again."""

    sweep_id: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str

    @classmethod
    def load(cls, exp_dir: Path) -> SweepRecord | None:
        """The record in ``exp_dir``; None if there is none. One that cannot be read is
        refused (a new parent run in its place would split the sweep in two)."""
        path = exp_dir / RECORD_FILE
        if not path.is_file():
            return None
        what = "the sweep's MLflow parent run"
        data = read_json(path, what)
        try:
            return cls(**data)
        except TypeError:
            raise damaged_file(path, what, "not a sweep record") from None

    def save(self, exp_dir: Path) -> None:
        write_json(exp_dir / RECORD_FILE, asdict(self))


def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _children(
    client: MlflowClient, record: SweepRecord, trial_id: str | None = None
) -> dict[tuple[str, int], Any]:
    """The sweep's child runs (of one trial, with ``trial_id``) by trial id and point (a run
    without a point tag is point 0: from before packing existed)."""
    query = f"tags.`{PARENT_TAG}` = '{record.parent_run_id}'"
    if trial_id is not None:
        query += f" and tags.`{TRIAL_ID_TAG}` = '{trial_id}'"
    runs = client.search_runs([record.experiment_id], filter_string=query, max_results=50_000)
    return {
        (r.data.tags[TRIAL_ID_TAG], int(r.data.tags.get(POINT_TAG, 0))): r
        for r in runs
        if TRIAL_ID_TAG in r.data.tags
    }


class SweepTracker:
    """The sweep's parent run: opened before the Tuner starts, closed after it returns."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client = _client(tracking_uri)

    def start(
        self, exp_dir: Path, *, params: Mapping[str, Any], space_file: Path | None = None
    ) -> SweepRecord:
        """Reopen the parent run recorded in ``exp_dir``, or create one and record it."""
        record = SweepRecord.load(exp_dir)
        if record is not None:
            self.client.update_run(record.parent_run_id, status="RUNNING")
            self.client.set_tag(record.parent_run_id, "status", "running")  # not the last end's
            return record
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = (
            exp.experiment_id if exp is not None else self.client.create_experiment(self.experiment)
        )
        sweep_id = uuid.uuid4().hex[:12]
        run = self.client.create_run(
            exp_id,
            run_name=self.experiment,
            tags={SWEEP_ID_TAG: sweep_id, ROLE_TAG: SWEEP_ROLE, "ray_experiment": str(exp_dir)},
        )
        from mlflow.entities import Param

        self.client.log_batch(
            run.info.run_id, params=[Param(k, v) for k, v in _params(params).items()]
        )
        if space_file is not None:
            self.client.log_artifact(run.info.run_id, str(space_file))
        record = SweepRecord(sweep_id, self.tracking_uri, exp_id, run.info.run_id)
        record.save(exp_dir)
        return record

    def finish(
        self, record: SweepRecord, table: pd.DataFrame | None, csv: Path | None, status: str
    ) -> None:
        """Bring every child run in line with its trial's status in ``table``, attach the
        results CSV and close the parent run with ``status``."""
        children = _children(self.client, record)
        for row in [] if table is None else table.to_dict("records"):
            run = children.pop((row["trial_id"], int(row.get("point", 0))), None)
            if run is not None:
                self._settle(run, row["status"])
        for run in children.values():  # no result table: the driver was interrupted
            if run.info.status == "RUNNING":
                self._settle(run, "interrupted")
        if csv is not None and csv.is_file():
            self.client.log_artifact(record.parent_run_id, str(csv))
        self.client.set_tag(record.parent_run_id, "status", status.lower())
        self.client.set_terminated(record.parent_run_id, status)

    def _settle(self, run: Any, status: str) -> None:
        expected = _RUN_STATUS[status]
        if run.data.tags.get("status") != status:
            self.client.set_tag(run.info.run_id, "status", status)
        if run.info.status != expected:
            self.client.set_terminated(run.info.run_id, expected)


class TrialLogger(Callback):
    """Ray Tune callback (driver side) writing one nested child run per trial (per point of
    a packed trial).

    Ray pickles the callbacks of a Tuner into its experiment state and restores them on
    ``Tuner.restore``; only the constructor's arguments survive that, everything else is
    rebuilt from MLflow.
    """

    def __init__(self, record: SweepRecord) -> None:
        self.record = record
        self._client: MlflowClient | None = None
        self._runs: dict[str, list[str]] = {}  # trial id -> run id of each point
        self._closed: set[str] = set()  # runs closed with their outcome before a restore
        self._last_step: dict[tuple[str, int], int] = {}  # (trial id, point) -> epoch

    def __getstate__(self) -> dict[str, Any]:
        return {"record": self.record}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["record"])

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = _client(self.record.tracking_uri)
        return self._client

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        existing = _children(self.client, self.record, trial.trial_id)
        run_ids = []
        for point, (config, _) in enumerate(trial_points(trial)):
            run, key = existing.get((trial.trial_id, point)), (trial.trial_id, point)
            if run is None:
                run_ids.append(self._create(trial, point, config))
                self._last_step[key] = 0
                continue
            run_id = run.info.run_id
            history = self.client.get_metric_history(run_id, curve("val_error"))
            self._last_step[key] = max((m.step for m in history), default=0)
            run_ids.append(run_id)
            if run.info.status == "FINISHED" and run.data.tags.get("status") in _FINAL:
                # Closed with its outcome (a driver killed before Tune's next snapshot, or
                # a diverged point of a pack that failed later): left as it is.
                self._closed.add(run_id)
                continue
            self.client.update_run(run_id, status="RUNNING")
            self._log_params(run_id, config, logged=run.data.params)
            starts = int(run.data.tags.get("starts", "1")) + 1
            self.client.set_tag(run_id, "starts", str(starts))
            self.client.set_tag(run_id, "status", "running")
            if "error" in run.data.tags:  # a failed run that starts again
                self.client.delete_tag(run_id, "error")
        self._runs[trial.trial_id] = run_ids

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ):
        from mlflow.entities import Metric

        if result.get("summary"):  # the closing summary: logged by on_trial_complete
            return
        now = int(time.time() * 1000)
        run_ids = self._run_ids(trial)
        for point, (_, report) in enumerate(trial_points(trial, result)):
            # A point's epochs logged before a restore, or not new (it left its pack), are
            # skipped.
            step, key = report.get("epoch"), (trial.trial_id, point)
            if step is None or step <= self._last_step.get(key, 0):
                continue
            metrics = [Metric(k, v, now, int(step)) for k, v in epoch_metrics(report).items()]
            self.client.log_batch(run_ids[point], metrics=metrics, synchronous=True)
            self._last_step[key] = int(step)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        self._close(trial, "TERMINATED")

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        for run_id in self._run_ids(trial):
            if run_id not in self._closed:
                self.client.set_tag(run_id, "failures", str(trial.num_failures))

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        self._close(trial, "ERROR")

    def _close(self, trial: Trial, ray_status: str) -> None:
        """End the run of each of the trial's points with its outcome: a point that ended
        (finished, or diverged, also in a pack that failed later) gets its summary metrics
        and files, a failed one the error."""
        from mlflow.entities import Metric

        packed = "pack" in trial.config
        error = error_text(trial)[-5000:] if ray_status == "ERROR" else ""
        for point, ((config, last), run_id) in enumerate(
            zip(trial_points(trial), self._run_ids(trial), strict=True)
        ):
            if run_id in self._closed:
                continue
            status = trial_status(ray_status, last, config["epochs"])
            if status == "failed":
                self.client.set_tag(run_id, "status", status)
                self.client.set_tag(run_id, "error", error)
                self.client.set_terminated(run_id, "FAILED")
                continue
            now = int(time.time() * 1000)
            summary = {
                k: float(last[k])
                for k in SUMMARY_METRICS
                if isinstance(last.get(k), int | float) and math.isfinite(last[k])
            }
            metrics = [Metric(k, v, now, 0) for k, v in summary.items()]
            self.client.log_batch(run_id, metrics=metrics)
            folder = POINT_FOLDER.format(point=point) if packed else ""
            self._log_checkpoint_files(run_id, trial, folder)
            self.client.set_tag(run_id, "status", status)  # last: the run is complete
            self.client.set_terminated(run_id, "FINISHED")

    def _create(self, trial: Trial, point: int, config: Mapping[str, Any]) -> str:
        from modloss.models import num_members

        config = _resolved(config)
        members = num_members(config["model"], **(config.get("model_overrides") or {}))
        tags = {
            PARENT_TAG: self.record.parent_run_id,
            SWEEP_ID_TAG: self.record.sweep_id,
            TRIAL_ID_TAG: trial.trial_id,
            POINT_TAG: str(point),
            "model": config["model"],
            NUM_MEMBERS_TAG: str(members),
            "lam": repr(config["lam"]),
            "trial": str(config["trial"]),
            "lr": repr(config["lr"]),
            "status": "running",
            "starts": "1",
        }
        run_name = point_name(config)  # an unpacked trial's name
        run = self.client.create_run(self.record.experiment_id, run_name=run_name, tags=tags)
        self._log_params(run.info.run_id, config)
        return run.info.run_id

    def _log_params(
        self, run_id: str, config: Mapping[str, Any], logged: Mapping[str, str] | None = None
    ) -> None:
        """Log the point's config as the run's params, those not ``logged`` yet (a driver
        killed between creating a run and logging its params leaves a run without them)."""
        from mlflow.entities import Param

        logged = logged or {}
        params = _params(_resolved(config))
        missing = [Param(k, v) for k, v in params.items() if k not in logged]
        if missing:
            self.client.log_batch(run_id, params=missing)

    def _run_ids(self, trial: Trial) -> list[str]:
        """The run of each of the trial's points."""
        if trial.trial_id not in self._runs:  # e.g. a restored trial that never restarted
            existing = _children(self.client, self.record, trial.trial_id)
            runs = [existing.get((trial.trial_id, p)) for p in range(len(trial_points(trial)))]
            if None in runs:
                self.on_trial_start(0, [], trial)
            else:
                self._runs[trial.trial_id] = [run.info.run_id for run in runs]
        return self._runs[trial.trial_id]

    def _log_checkpoint_files(self, run_id: str, trial: Trial, folder: str = "") -> None:
        """Copy the few files worth keeping out of ``folder`` (a packed point's) of the
        trial's last checkpoint (which may be large, and on any filesystem Ray supports) and
        attach them to its run."""
        import pyarrow.fs as pafs

        checkpoint = trial.checkpoint
        if checkpoint is None:
            return
        fs = checkpoint.filesystem
        with tempfile.TemporaryDirectory() as tmp:
            root = f"{checkpoint.path}/{folder}" if folder else checkpoint.path
            for name in TRIAL_ARTIFACTS:
                source = f"{root}/{name}"
                if fs.get_file_info(source).type == pafs.FileType.File:
                    pafs.copy_files(source, f"{tmp}/{name}", source_filesystem=fs)
                    self.client.log_artifact(run_id, f"{tmp}/{name}")
            selected = Path(tmp) / SELECTED_EPOCH_FILE
            if selected.is_file():
                self._log_selected_epoch(run_id, json.loads(selected.read_text()))

    def _log_selected_epoch(self, run_id: str, record: Mapping[str, Any]) -> None:
        """The scalars of the trial's uncertainty analyses at its selected epoch
        (``selected_epoch.json``) as metrics of its run, step 0, and the OOD set as a tag."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = record.get("metrics", {})
        metrics = [
            Metric(k, float(values[k]), now, 0)
            for k in SELECTED_EPOCH_METRICS
            if isinstance(values.get(k), int | float) and math.isfinite(values[k])
        ]
        self.client.log_batch(run_id, metrics=metrics)
        if "ood_dataset" in record:
            self.client.set_tag(run_id, OOD_DATASET_TAG, str(record["ood_dataset"]))
