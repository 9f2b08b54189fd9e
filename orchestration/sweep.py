"""``modloss sweep``: a search space run as one Ray Tune experiment, tracked in MLflow.

The trainable is :func:`train_trial`, a plain function around :func:`modloss.train.fit`:
fit checkpoints every epoch into a local folder, and the per-epoch callback hands that
folder to Tune as the trial's checkpoint with the epoch's metrics. A restarted trial (a
retry after a failure, or a resumed sweep) copies its last Tune checkpoint back and fit
resumes from it. The experiment lives at ``STORAGE/NAME`` (NAME: the space's name), so
``--resume`` finds it again. A Tune experiment cannot grow its grid, so grid points that an
edited space adds on ``--resume`` run as a further Tune experiment in that folder
(``STORAGE/NAME/extension-N``, recorded by :func:`orchestration.guards.record_extension`),
under the same MLflow parent run; the results table covers them all.

With ``pack: true`` a trial is a pack of grid points (:meth:`SearchSpace.packs`) trained by
:func:`modloss.train.fit_pack`, each point's run in its own subfolder
(:data:`modloss.names.POINT_FOLDER`) of the trial's folder; the whole folder is the trial's
checkpoint, and each report carries every point's report (``points``).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modloss.names import (
    CHECKPOINT_FILE,
    POINT_FOLDER,
    RESULTS_CSV,
    RESULTS_FILE,
    ROBUSTNESS_CSV,
    ROBUSTNESS_PNG,
    SUMMARY_METRICS,
)
from orchestration import guards
from orchestration.compat import shutdown_own_ray, start_local_ray
from orchestration.reports import METRIC, MODE, epoch_report, pack_report, summary_report
from orchestration.spaces import (
    Asha,
    GridSearch,
    LrTable,
    Range,
    SearchSpace,
    SpaceError,
    load_space,
)
from orchestration.tracking import (
    DEFAULT_TRACKING_URI,
    SweepRecord,
    analysis_tables,
    point_name,
    trial_points,
    trial_status,
    ui_hint,
)

if TYPE_CHECKING:
    import pandas as pd
    from ray.tune.experiment import Trial

__all__ = [
    "DEFAULT_STORAGE",
    "RESULTS_CSV",
    "SweepOutcome",
    "results_table",
    "run_sweep",
    "train_trial",
]

DEFAULT_STORAGE = "ray_results"
# results.csv: a point's coordinates and status, then its summary metrics, named as in
# results.json (modloss.records.RunResult) and in MLflow, then its Ray trial and its index
# in that trial's pack (0 when not packed).
TABLE_COLUMNS = ["model", "lam", "trial", "lr", "status", *SUMMARY_METRICS, "trial_id", "point"]
# Summary metrics in results.csv that the printed table leaves out, to stay readable.
_CSV_ONLY = ("val_ece", "test_ece", "val_brier", "test_brier")


def train_trial(config: dict[str, Any]) -> None:
    """Tune trainable: ``modloss.train.fit`` of ``config["train"]``, checkpointed each epoch,
    the last epoch's checkpoint with the analysis artifacts, then a summary report.

    Ends normally for a diverged run (status ``diverged`` in its last report). A packed
    trial (``config["pack"]``) is :func:`_train_pack`'s.
    """
    from ray import tune

    from modloss.records import RunResult
    from modloss.train import TrainConfig, fit
    from orchestration.storage import linked_checkpoint

    if "distributed" in config:  # one Ray Train run per trial, on several workers
        from orchestration.distributed import train_trial as train_distributed

        train_distributed(config, artifacts=lambda out, train: _analysis_artifacts([out], [train]))
        return

    # Ray logs every persisted checkpoint at INFO: one line per trial and epoch.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    if "pack" in config:
        _train_pack(config)
        return
    train = TrainConfig.model_validate(config["train"])
    out_dir = _restored_folder([Path()])
    try:

        def report(result: RunResult, out: Path | None) -> None:
            if result.status == "diverged":
                return  # its folder is analysed and reported below
            if result.status == "finished":
                # Finished: fit has written the best epoch's logits. The analyses go in this
                # report's checkpoint, since a scheduler may end the trial right here (ASHA
                # stops every trial that reaches max_t, before the summary).
                _analysis_artifacts([out], [train])
            tune.report(epoch_report(result), checkpoint=linked_checkpoint(out))

        result = fit(train, [report], out_dir=out_dir)
        final = None  # a finished run's folder is checkpointed already, analyses included
        if result.status != "finished":  # diverged: analyse what it saved
            _analysis_artifacts([out_dir], [train])
            final = linked_checkpoint(out_dir)
        tune.report(summary_report(result), checkpoint=final)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _train_pack(config: dict[str, Any]) -> None:
    """Tune trainable of a packed trial: ``modloss.train.fit_pack`` of ``config["pack"]``,
    point g's run in subfolder ``POINT_FOLDER`` g. One report per epoch of the pack, with
    every point's epoch report and the whole folder as checkpoint; a point that finished or
    diverged that epoch gets its analysis artifacts first. Then a summary report."""
    import torch
    from ray import tune

    from modloss.records import RunResult
    from modloss.train import TrainConfig, build_splits, fit_pack
    from orchestration.storage import linked_checkpoint

    trains = [TrainConfig.model_validate(c) for c in config["pack"]]

    @functools.cache
    def cpu_splits() -> Any:  # the points' splits are the same: loaded once for the analyses
        return build_splits(trains[0], torch.device("cpu"))

    folders = [Path(POINT_FOLDER.format(point=g)) for g in range(len(trains))]
    out_dir = _restored_folder(folders)
    runs = [out_dir / folder for folder in folders]

    def ended(run: Path) -> bool:
        path = run / RESULTS_FILE
        return path.is_file() and RunResult.read(path).status != "running"

    # Points that ended before the restored checkpoint have their analyses in it already;
    # they are written once, since the checkpoint's files are hard links of these.
    analysed = {g for g, run in enumerate(runs) if ended(run)}

    def report(results: list[RunResult]) -> None:
        done = [
            g
            for g, result in enumerate(results)
            if result.status in ("finished", "diverged") and g not in analysed
        ]
        if done:  # the points that ended this epoch, analysed together
            _analysis_artifacts([runs[g] for g in done], [trains[g] for g in done], cpu_splits())
            analysed.update(done)
        tune.report(pack_report(results), checkpoint=linked_checkpoint(out_dir))

    try:
        results = fit_pack(trains, runs, on_epoch=report)
        tune.report(pack_report(results, summary=True))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _restored_folder(runs: list[Path]) -> Path:
    """A new scratch folder for fit, holding a copy of the trial's last Tune checkpoint if
    it has one; ``runs``: where in it fit's run folders are. Tune's checkpoint is
    authoritative, so a restarted trial starts from a copy of it (or from nothing), never
    from a stale local folder. The caller removes the folder."""
    from ray import tune

    from orchestration.storage import drop_corrupt_checkpoint

    out_dir = Path(tempfile.mkdtemp(prefix=f"modloss-{tune.get_context().get_trial_id()}-"))
    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            checkpoint.to_directory(str(out_dir))
            drop_corrupt_checkpoint(out_dir, runs)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return out_dir


def _analysis_artifacts(out_dirs: list[Path], trains: list[Any], splits: Any = None) -> None:
    """Small summaries of the best epoch's saved logits of each run (``trains[g]``'s, in
    ``out_dirs[g]``: one run, or the points of a pack that ended together), written next to
    fit's files so that the final checkpoint carries them: the robustness curve (Fig. 4),
    the tables of :func:`orchestration.tracking.analysis_tables` and the uncertainty
    analyses of :func:`_uncertainty_artifacts` (temperature, rotation shift, OOD,
    reliability). Computed here, in the trial's worker, rather than on the driver, whose
    event loop schedules every trial. ``splits``: the runs' on the CPU, if already loaded."""
    from modloss.analysis import load_logits, plot_robustness, robustness

    ended = []  # (folder, config, test logits, title) of the categorical runs with logits
    for out_dir, train in zip(out_dirs, trains, strict=True):
        for name, table in analysis_tables(out_dir).items():
            table.to_csv(out_dir / name, index=False)
        try:
            logits = load_logits(out_dir, "test")
        except FileNotFoundError:  # diverged in its first epoch
            continue
        if logits.family != "categorical":
            continue
        title = f"{train.model}, λ={train.lam:g}, trial {train.trial} (epoch {logits.epoch})"
        ended.append((out_dir, train, logits, title))
        if logits.eta.shape[0] >= 2:
            frame = robustness(logits.eta, logits.target)
            frame.to_csv(out_dir / ROBUSTNESS_CSV, index=False)
            plot_robustness({f"λ={train.lam:g}": frame}, out_dir / ROBUSTNESS_PNG, title=title)
    _uncertainty_artifacts(ended, splits)


def _uncertainty_artifacts(ended: list[tuple[Path, Any, Any, str]], splits: Any = None) -> None:
    """:func:`modloss.uncertainty.selected_epochs` of the best-validation epochs of
    ``ended`` (folder, config, test logits, title): each run's model rebuilt from its
    checkpoint's ``best_model``, the models packed (:func:`modloss.pack.pack_models`) so
    that each data pass serves them all, the splits reloaded on the CPU unless given (the
    analyses are a few forward passes). A module-parallel run (one checkpoint shard per
    rank, no whole model) gets none."""
    import torch

    from modloss.analysis import load_logits
    from modloss.files import load_checkpoint
    from modloss.pack import pack_models
    from modloss.train import build_model, build_splits
    from modloss.uncertainty import selected_epochs

    runs, models = [], []
    for out_dir, train, test, title in ended:
        path = out_dir / CHECKPOINT_FILE
        best = load_checkpoint(path).get("best_model") if path.is_file() else None
        if best is None:
            continue
        model = build_model(train)
        model.load_state_dict(best)
        runs.append((out_dir, train, test, title))
        models.append(model)
    if not runs:
        return
    if splits is None:
        splits = build_splits(runs[0][1], torch.device("cpu"))
    vals = [load_logits(out_dir, "val") for out_dir, *_ in runs]
    selected_epochs(
        models[0] if len(models) == 1 else pack_models(models),
        splits,
        [(val.eta, val.target) for val in vals],
        [(test.eta, test.target) for _, _, test, _ in runs],
        [out_dir for out_dir, *_ in runs],
        epochs=[test.epoch for _, _, test, _ in runs],
        data_dir=runs[0][1].data_dir,
        titles=[title for *_, title in runs],
    )


def _trial_name(trial: Trial) -> str:
    pack = trial.config.get("pack")
    if pack is None:
        return point_name(trial.config["train"])
    return f"{pack[0]['model']}_pack{len(pack)}_t{pack[0]['trial']}"


def _trial_dirname(trial: Trial) -> str:
    return f"{_trial_name(trial)}_{trial.trial_id}"


def param_space(space: SearchSpace, points: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Tune's param_space: every trial's TrainConfig under ``"train"`` (and the space's
    ``distributed:`` section under ``"distributed"``), or with ``pack: true``, every trial's
    pack of TrainConfigs under ``"pack"``. A grid search runs ``points`` (grid points of the
    space; default all of them)."""
    from ray import tune

    if space.pack:
        return {"pack": tune.grid_search(_longest_first(space.packs(points)))}
    # A distributed: section travels with every trial (orchestration.distributed).
    extra = {"distributed": space.distributed.model_dump()} if space.distributed else {}
    if isinstance(space.search, GridSearch):
        grid = space.grid() if points is None else points
        return {"train": tune.grid_search(_longest_first(grid)), **extra}

    def choice(values: list[Any]) -> Any:
        return values[0] if len(values) == 1 else tune.choice(values)

    def sampled(r: Range) -> Any:
        return tune.loguniform(r.low, r.high) if r.log else tune.uniform(r.low, r.high)

    assert not isinstance(space.lr, LrTable)  # refused by the schema for sampled spaces
    lam = sampled(space.lam) if isinstance(space.lam, Range) else choice(list(space.lam))
    # A number, or None for the paper preset (TrainConfig resolves it per model and λ).
    lr = sampled(space.lr) if isinstance(space.lr, Range) else space.lr_for("", 0.0)
    train = {
        **space.base_config(),
        "model": choice(list(space.models)),
        "lam": lam,
        "lr": lr,
        "trial": choice(space.trial_ids),
    }
    return {"train": train, **extra}


def _longest_first(grid: list[Any]) -> list[Any]:
    """The grid (or its packs) with the ensembles of most members first (stable otherwise):
    Tune starts
    trials in grid order, and ending on the short trials rather than a long one running
    alone shortens the sweep (smoke: 256-member trials take about twice a 16-member one's
    time). Member count is a proxy for cost within a model family only."""
    from modloss.models import num_members

    def members(cfg: dict[str, Any] | list[dict[str, Any]]) -> int:
        if isinstance(cfg, list):  # a pack: its points share the model
            return len(cfg) * members(cfg[0])
        return num_members(cfg["model"], **(cfg.get("model_overrides") or {}))

    return sorted(grid, key=lambda c: -members(c))


def _tune_config(space: SearchSpace) -> Any:
    from ray import tune

    search_alg, num_samples = None, 1
    metric, mode = METRIC, MODE
    if not isinstance(space.search, GridSearch):
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        samplers = {"tpe": optuna.samplers.TPESampler, "nsga2": optuna.samplers.NSGAIISampler}
        sampler = samplers[space.search.sampler](seed=space.search.seed)
        objectives = space.objectives
        if len(objectives) == 1:
            search_alg, metric = OptunaSearch(sampler=sampler), objectives[0]
        else:
            # Ray's OptunaSearch holds several objectives itself: a TuneConfig metric
            # would replace them by one (and the schema refuses ASHA, which needs one).
            modes = [MODE] * len(objectives)
            search_alg = OptunaSearch(sampler=sampler, metric=objectives, mode=modes)
            metric = mode = None
        num_samples = space.search.num_samples
    scheduler = None
    if isinstance(space.scheduler, Asha):
        from ray.tune.schedulers import ASHAScheduler

        max_t = space.scheduler.max_t or space.epochs
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_t,
            grace_period=space.scheduler.grace_period,
            reduction_factor=space.scheduler.reduction_factor,
            # A trial that trains all its epochs ends itself, after its summary report
            # (training_iteration epochs + 1); ASHA only stops it for a budget below that.
            stop_last_trials=max_t < space.epochs,
        )
    return tune.TuneConfig(
        metric=metric,
        mode=mode,
        search_alg=search_alg,
        scheduler=scheduler,
        num_samples=num_samples,
        max_concurrent_trials=space.max_concurrent,
        trial_name_creator=_trial_name,
        trial_dirname_creator=_trial_dirname,
        reuse_actors=True,  # a worker imports torch and modloss once, not once per trial
    )


def results_table(trials: list[Trial]) -> pd.DataFrame:
    """One row per trial (per point of a packed trial): its coordinates, status and test
    error at the best-validation epoch."""
    import pandas as pd

    rows = []
    for trial in trials:
        for point, (cfg, last) in enumerate(trial_points(trial)):
            rows.append(
                {
                    "model": cfg["model"],
                    "lam": cfg["lam"],
                    "trial": cfg["trial"],
                    "lr": cfg["lr"] if cfg["lr"] is not None else _paper_lr(cfg),
                    "status": trial_status(trial.status, last, cfg["epochs"]),
                    **{name: last.get(name) for name in SUMMARY_METRICS},
                    "trial_id": trial.trial_id,
                    "point": point,
                }
            )
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    return table.sort_values(["model", "lam", "trial"], kind="stable").reset_index(drop=True)


def sweep_status(table: pd.DataFrame | None, num_trials: int) -> str:
    """The sweep's MLflow status: KILLED until every trial (each of ``num_trials`` rows:
    points, of a packed sweep) has ended, then FAILED if one failed, else FINISHED."""
    if table is None or len(table) < num_trials:
        return "KILLED"  # the searcher had not even created every trial
    if table["status"].isin(["interrupted", "pending"]).any():
        return "KILLED"
    return "FAILED" if (table["status"] == "failed").any() else "FINISHED"


def _num_trials(space: SearchSpace) -> int:
    """The sweep's trials, as the results table counts them: a packed trial's points each."""
    grid = isinstance(space.search, GridSearch)
    return len(space.points()) if grid else space.search.num_samples


def _paper_lr(cfg: dict[str, Any]) -> float:
    from modloss.train import paper_lr

    return paper_lr(cfg["model"], cfg["lam"])


@dataclass(frozen=True)
class SweepOutcome:
    """What ``run_sweep`` produced: the results table, its CSV, the MLflow parent run and
    the parent's final status (FINISHED | FAILED | KILLED)."""

    table: pd.DataFrame
    csv: Path
    record: SweepRecord
    status: str


def run_sweep(
    space_file: str | Path,
    *,
    address: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    storage: str | Path | None = None,
    max_concurrent: int | None = None,
    resume: bool = False,
    pack: bool = False,
    out=sys.stdout,
) -> SweepOutcome:
    """Run (or with ``resume``, finish) the sweep of ``space_file`` (with ``pack``, packed
    as by ``pack: true`` in the space).

    Everything that can be checked without Ray is checked before Ray starts: the space,
    the experiment folder, the tracking store. Raises :class:`SpaceError` or
    :class:`orchestration.tracking.TrackingError` for those.
    """
    space = load_space(
        space_file, name=experiment, max_concurrent=max_concurrent, pack=pack or None
    )
    exp_dir = Path(storage or DEFAULT_STORAGE).resolve() / space.name
    # Checks that create nothing first: a refused sweep leaves no storage folder behind.
    guards.check_tracking_uri(_tracking_uri(tracking_uri, SweepRecord.load(exp_dir)))
    if address is None:  # a cluster's trials read the data on their own nodes
        guards.check_data(space)
    with guards.sweep_lock(exp_dir):  # one driver per experiment folder at a time
        return _run_locked(space, Path(space_file), exp_dir, address, tracking_uri, resume, out)


def _run_locked(
    space: SearchSpace,
    space_file: Path,
    exp_dir: Path,
    address: str | None,
    tracking_uri: str | None,
    resume: bool,
    out: Any,
) -> SweepOutcome:
    record = SweepRecord.load(exp_dir)
    tracking_uri = _tracking_uri(tracking_uri, record)
    started = _experiment_started(exp_dir)
    if resume and not started:
        raise SpaceError(f"nothing to resume: no Ray Tune experiment at {exp_dir}")
    if not resume and started:
        raise SpaceError(
            f"{exp_dir} already holds experiment {space.name!r}: finish it with --resume, "
            "or pick another --experiment name or --storage folder"
        )
    added = guards.check_resumed_space(exp_dir, space) if resume else []
    if added:
        print(guards.added_message(space, added), file=out, flush=True)

    import ray

    from orchestration.tracking import SweepTracker

    # Checkpointing every epoch with num_to_keep=1 makes Tune snapshot the experiment each
    # epoch (what lets --resume after a killed driver lose at most one epoch); Tune warns.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Each snapshot copies every trial's Ray logs too; the metrics are in MLflow already
    # (and ExperimentAnalysis need not warn that those logs are missing).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    own_ray = not ray.is_initialized()
    if own_ray and address is None:
        guards.clean_stale_ray()
    # Opening a new SQLite store runs MLflow's schema migrations (seconds); ray.init mostly
    # waits on its own processes, so let the store be created meanwhile. Only the store:
    # the parent run is still created after Ray is up, so a failed ray.init leaves none.
    with ThreadPoolExecutor(1) as pool:
        opened = pool.submit(
            guards.with_store_lock, tracking_uri, SweepTracker, tracking_uri, space.name
        )
        if own_ray:
            start = start_local_ray if address is None else ray.init
            start(address=address, include_dashboard=False)
        tracker = opened.result()
    try:
        guards.check_resources(space, can_grow=address is not None)
        if not resume:
            guards.save_space(exp_dir, space)
        elif added:
            guards.record_extension(exp_dir, space, added)
        record = tracker.start(exp_dir, params=_space_params(space), space_file=space_file)
        table, csv = None, exp_dir / RESULTS_CSV
        try:
            parts = _parts(exp_dir)
            for part, points in parts:
                _tuner(space, part, record, points, resume=_experiment_started(part)).fit()
                if _interrupted(part):  # Ctrl-C or FailFast: the rest waits for --resume
                    break
            table = results_table([trial for part, _ in parts for trial in _trials(part)])
            table.to_csv(csv, index=False)
        finally:
            # Also after a second Ctrl-C (KeyboardInterrupt): no run is left RUNNING.
            status = sweep_status(table, _num_trials(space))
            tracker.finish(record, table, csv if table is not None else None, status)
    finally:
        if own_ray:
            shutdown_own_ray()
    _print_table(table, csv, out, _num_trials(space))
    print(f"MLflow: {ui_hint(record)}", file=out)
    return SweepOutcome(table, csv, record, status)


def _parts(exp_dir: Path) -> list[tuple[Path, list[dict[str, Any]] | None]]:
    """The sweep's Tune experiments in the order they run, each with the grid points it
    runs when it starts (None: all of the space's): the one at ``exp_dir``, then one per
    extension of the grid recorded by :func:`orchestration.guards.record_extension`."""
    extensions = guards.load_extensions(exp_dir)
    return [(exp_dir, None), *((exp_dir / e["name"], e["points"]) for e in extensions)]


def _trials(part: Path) -> list[Trial]:
    """The trials of the Tune experiment at ``part``: none before it saved its first state
    (a driver killed as it started one)."""
    from ray import tune

    if not any(part.glob("experiment_state-*.json")):
        return []
    return tune.ExperimentAnalysis(str(part)).trials


def _interrupted(part: Path) -> bool:
    """Whether the Tune experiment at ``part`` stopped before all its trials ended."""
    from orchestration.failfast import stopped

    if stopped() is not None:
        return True
    return bool(results_table(_trials(part))["status"].isin(["interrupted", "pending"]).any())


def _tuner(
    space: SearchSpace,
    exp_dir: Path,
    record: SweepRecord,
    points: list[dict[str, Any]] | None,
    *,
    resume: bool,
) -> Any:
    """The Tuner of the Tune experiment at ``exp_dir``: restored (``resume``), or new,
    running the grid ``points`` (None: all of the space's)."""
    from ray import tune

    from orchestration.failfast import FailFast
    from orchestration.progress import ProgressPrinter
    from orchestration.storage import atomic_local_filesystem
    from orchestration.tracking import TrialLogger

    trainable = tune.with_resources(
        train_trial, {"cpu": space.resources.cpus, "gpu": space.resources.gpus}
    )
    filesystem = atomic_local_filesystem()
    if resume:
        # The restored Tuner brings back its callbacks and configs from the experiment.
        return tune.Tuner.restore(
            str(exp_dir),
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
    total = _num_trials(space) if points is None else len(points)
    run_config = tune.RunConfig(
        name=exp_dir.name,
        storage_path=str(exp_dir.parent),
        storage_filesystem=filesystem,
        callbacks=[TrialLogger(record), ProgressPrinter(total=total), FailFast()],
        failure_config=tune.FailureConfig(max_failures=space.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        verbose=0,
    )
    params = param_space(space, points)
    if space.distributed is not None:  # the trials' Ray Train runs live in the experiment
        params["storage_path"] = str(exp_dir / "train_runs")
    return tune.Tuner(
        trainable,
        param_space=params,
        tune_config=_tune_config(space),
        run_config=run_config,
    )


def _tracking_uri(given: str | None, record: SweepRecord | None) -> str:
    if record is None:
        return given or DEFAULT_TRACKING_URI
    if given is not None and given != record.tracking_uri:
        raise SpaceError(
            f"this sweep is tracked at {record.tracking_uri}, not {given}; resume it there"
        )
    return record.tracking_uri


def _experiment_started(exp_dir: Path) -> bool:
    from ray.tune import Tuner

    return exp_dir.is_dir() and Tuner.can_restore(str(exp_dir))


def _space_params(space: SearchSpace) -> dict[str, Any]:
    return space.model_dump(mode="json", exclude={"description"})


def _print_table(table: pd.DataFrame, csv: Path, out: Any, num_trials: int) -> None:
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_rows", 500):
        shown = [c for c in table.columns if c not in ("trial_id", "point", *_CSV_ONLY)]
        text = table[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}")
    print(text, file=out)
    counts = ", ".join(f"{n} {s}" for s, n in table["status"].value_counts().items())
    started = f"{len(table)} of {num_trials} trials started"
    packs = table["trial_id"].nunique()
    if packs < len(table):  # a trial of the table is a point
        started = f"{len(table)} of {num_trials} points started, in {packs} packed Ray trials"
    print(f"\n{started} ({counts}); table: {csv}", file=out)
