"""The paper's training protocol as one plain function, :func:`fit`.

SGD with momentum (optionally Nesterov), weight decay and step learning-rate milestones;
the paper's per-model, per-lambda learning rates as presets (:func:`paper_lr`); model
selection on the validation error only, with the test error reported at the best-validation
epoch and at the final epoch; atomic per-epoch checkpoints that resume bit-exactly on the
CPU; divergence (a non-finite metric) ends a run with status ``"diverged"`` instead of an
exception.

Pairing: the initial weights and the order of the training batches are seeded from the
trial alone, never from lambda, so within a trial every lambda starts from the same weights
and sees the same batches (the paper's paired comparison). The validation split of trial i
is seeded by i in :func:`modloss.data.load_splits`.

Train metrics are accumulated from the training forward passes themselves (detached, in
train mode, while the weights move during the epoch) rather than from a second pass over
the training set; validation and test metrics come from an eval-mode pass after the epoch.
The validation ``dropped_error`` (90% of the members dropped at random) comes from that
pass's logits too; its kept members are drawn once per run from a seed derived from the
trial alone, so they are the same members every epoch, on every rank, for every lambda.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from modloss.config import PAPER_LRS, TrainConfig, paper_lr
from modloss.data import (
    DATASETS,
    DeviceLoader,
    Splits,
    TensorPair,
    load_splits,
    random_crop_flip,
)
from modloss.files import check_writable_dir, load_checkpoint
from modloss.metrics import dropped_error, kept_members
from modloss.models import EnsembleModel, create_model
from modloss.names import CHECKPOINT_FILE, RESULTS_FILE, TEST_LOGITS_FILE, VAL_LOGITS_FILE
from modloss.pack import PackedSGD, PackedStrategy, check_fusible
from modloss.records import EpochRecord, RunResult
from modloss.strategies import Strategy, make_strategy

__all__ = [
    "CHECKPOINT_FILE",
    "PAPER_LRS",
    "RESULTS_FILE",
    "TEST_LOGITS_FILE",
    "VAL_LOGITS_FILE",
    "Callback",
    "StopTraining",
    "TrainConfig",
    "build_loader",
    "build_model",
    "build_optimizer",
    "build_splits",
    "fit",
    "fit_pack",
    "initial_results",
    "paper_lr",
]

# The paper augments (random crop + flip) the CIFAR datasets only.
_AUGMENTED_BY_DEFAULT = frozenset({"cifar10", "cifar100"})
# Config keys that may change when a run is resumed: where it runs, where its data sits,
# and how far it goes.
_RESUMABLE_KEYS = frozenset({"epochs", "device", "data_dir"})
# Seed streams derived from the trial; kept apart so init and shuffling never share draws.
_INIT_STREAM, _SHUFFLE_STREAM = 0, 1
# The members kept by the validation dropped_error are drawn from a seed of their own,
# above every 2 * trial + stream (so they are the same for every λ of a trial).
_KEPT_SEED = 2**62


def _seed(trial: int, stream: int) -> int:
    return 2 * trial + stream


class StopTraining(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raise from a callback to end the run cleanly with status ``"stopped"``."""


Callback = Callable[[RunResult, Path | None], None]


def build_model(config: TrainConfig) -> EnsembleModel:
    """The untrained model of ``config``, its initial weights seeded by the trial alone.

    The registered models are sized for their paper dataset; input size (``in_features`` /
    ``in_channels``) and ``num_classes`` are adapted to ``config.dataset`` unless
    ``model_overrides`` sets them, so that e.g. an MLP trains on "diabetes" as is.
    """
    seed = _seed(config.trial, _INIT_STREAM)
    model = create_model(config.model, seed=seed, **config.model_overrides)
    info = DATASETS[config.dataset]
    wanted = {"num_classes": info.num_classes}
    if "in_features" in model.config:
        wanted["in_features"] = math.prod(info.input_shape)
    if "in_channels" in model.config and len(info.input_shape) == 3:
        wanted["in_channels"] = info.input_shape[0]
    adapt = {
        key: value
        for key, value in wanted.items()
        if model.config[key] != value and key not in config.model_overrides
    }
    if adapt:
        model = create_model(config.model, seed=seed, **config.model_overrides, **adapt)
    return model


def build_splits(config: TrainConfig, device: torch.device) -> Splits:
    """The train / validation / test splits of ``config`` on ``device``: its dataset,
    subset and validation size, the validation split seeded by the trial."""
    return load_splits(
        config.dataset,
        data_dir=config.data_dir,
        val_size=config.val_size,
        trial=config.trial,
        subset=config.subset,
        device=device,
    )


def build_optimizer(
    config: TrainConfig, model: nn.Module
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.MultiStepLR]:
    """The paper's optimiser for ``config``: SGD with its momentum and weight decay, and
    the learning rate divided by ``gamma`` at each of ``milestones`` (stepped per epoch)."""
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(
        optimizer, config.milestones, config.gamma
    )


def build_loader(config: TrainConfig, train: TensorPair, device: torch.device) -> DeviceLoader:
    """The shuffled training batches of ``config`` on ``device``, seeded by the trial alone
    (the same batches for every lambda), with crop+flip where the paper augments. Its
    ``generator`` is the loader's state to checkpoint."""
    generator = torch.Generator(device=device).manual_seed(_seed(config.trial, _SHUFFLE_STREAM))
    augment = config.dataset in _AUGMENTED_BY_DEFAULT if config.augment is None else config.augment
    return DeviceLoader(
        *train,
        config.batch_size,
        shuffle=True,
        augment=random_crop_flip if augment else None,
        generator=generator,
    )


def fit(
    config: TrainConfig | dict[str, Any],
    callbacks: Iterable[Callback] = (),
    *,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    strategy: Strategy | str = "single",
) -> RunResult:
    """Train ``config`` and return its :class:`~modloss.records.RunResult`.

    This is the one epoch loop of modloss: one device, DDP or module parallel is only the
    ``strategy`` (a name of :data:`modloss.strategies.STRATEGIES` or a
    :class:`~modloss.strategies.Strategy`), which computes each step's loss and gradients,
    merges the training metrics and gathers the evaluations across the processes of the
    default ``torch.distributed`` group (``torchrun`` or Ray Train set it up).

    With ``out_dir``, each epoch writes the checkpoint (``checkpoint.pt``; per rank for
    module parallel) and ``results.json`` atomically, and when the run ends (finished,
    diverged or stopped) the member natural parameters of its best-validation epoch on the
    test and validation sets (``test_logits.pt``, ``val_logits.pt``: dicts with ``eta``
    ``(M, N, K)``, ``target``, ``epoch``, ``split``, ``family``), before the checkpoint that
    says so. Until then they are kept in memory: an epoch's checkpoint holds the best
    weights, not the logits (100 MB for 256 members on 5,000 images), so it stays cheap to
    copy. Calling ``fit`` again with the same ``out_dir`` resumes from the checkpoint (only
    ``epochs``, ``device`` and ``data_dir`` may differ), recomputing the best epoch's logits
    from its weights if this process did not see that epoch; a run that already reached
    ``epochs``, or diverged, is returned as stored without loading any data.

    Each callback is called as ``callback(result, out_dir)`` after each epoch's checkpoint
    is written (``result.history[-1]`` is that epoch), and once more when the run diverges
    (``result.status == "diverged"``). A callback raising :class:`StopTraining` ends the run
    with status ``"stopped"`` (a later ``fit`` on the same ``out_dir`` continues it); any
    other exception propagates to the caller, the checkpoint of that epoch already on disk.
    """
    config = config if isinstance(config, TrainConfig) else TrainConfig.model_validate(config)
    run = strategy if isinstance(strategy, Strategy) else make_strategy(strategy)
    return _fit([config], [out_dir], callbacks, progress, run)[0]


def fit_pack(
    configs: Sequence[TrainConfig | dict[str, Any]],
    out_dirs: Sequence[str | os.PathLike[str] | None] | None = None,
    callbacks: Iterable[Callback] = (),
    *,
    progress: bool = False,
    on_epoch: Callable[[list[RunResult]], None] | None = None,
) -> list[RunResult]:
    """Train ``configs`` as one packed model on one device (:mod:`modloss.pack`) and return
    their results, each equal (up to rounding) to :func:`fit` of that config alone.

    The configs may differ only in :data:`~modloss.pack.FUSIBLE_KEYS` (else ``ValueError``
    naming the key): every run sees the same batches and starts from its own weights. Each
    run keeps its own best epoch, status and files in ``out_dirs[g]`` (the same files as
    :func:`fit`, so either function resumes them); a run that diverges or is stopped by a
    callback leaves the pack and the others go on. Calling ``fit_pack`` again with the same
    ``out_dirs`` resumes the unfinished runs, which must be at the same epoch.

    ``callbacks`` are called per run, as by :func:`fit`; ``on_epoch(results)``, once per
    epoch of the pack, after every run's callbacks, with every run's result in ``configs``
    order (e.g. to checkpoint all the folders together).
    """
    configs = [c if isinstance(c, TrainConfig) else TrainConfig.model_validate(c) for c in configs]
    check_fusible(configs)
    dirs = [None] * len(configs) if out_dirs is None else list(out_dirs)
    if len(dirs) != len(configs):
        raise ValueError(f"out_dirs: {len(dirs)} folders for {len(configs)} configs")
    given = [Path(d).resolve() for d in dirs if d is not None]
    if len(set(given)) != len(given):
        raise ValueError(f"out_dirs: every run needs its own folder, got {dirs}")
    return _fit(configs, dirs, callbacks, progress, PackedStrategy(), on_epoch)


class _Run:
    """One run's part of the loop: its result, best weights and logits, and the model,
    optimiser and scheduler its checkpoint holds (in a pack: a copy of its group)."""

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike[str] | None) -> None:
        self.config = config
        self.out = Path(out_dir) if out_dir is not None else None
        self.saved: dict[str, Any] | None = None
        self.result: RunResult | None = None
        self.best_model: dict[str, Tensor] | None = None
        self.best_logits: dict[str, dict[str, Any]] = {}  # split -> saved dict, this process
        self.kept: Tensor | None = None  # the members of the validation dropped_error

    def build(self, model: EnsembleModel) -> None:
        self.model = model
        self.optimizer, self.scheduler = build_optimizer(self.config, model)
        if self.saved is None:
            return
        self.model.load_state_dict(self.saved["model"])
        self.optimizer.load_state_dict(self.saved["optimizer"])
        self.scheduler.load_state_dict(self.saved["scheduler"])
        self.best_model = self.saved["best_model"]
        stored = self.saved["result"]
        self.result = stored.model_copy(
            update={
                "config": self.config.model_dump(),
                "status": "running",
                "resumed_from": [*stored.resumed_from, stored.epochs_completed],
            }
        )


def _fit(
    configs: list[TrainConfig],
    out_dirs: list[str | os.PathLike[str] | None],
    callbacks: Iterable[Callback],
    progress: bool,
    run: Strategy,
    on_epoch: Callable[[list[RunResult]], None] | None = None,
) -> list[RunResult]:
    """The loop of :func:`fit` (one run) and :func:`fit_pack` (a pack of runs)."""
    runs = [_Run(c, d) for c, d in zip(configs, out_dirs, strict=True)]
    for r in runs:
        r.saved = _load_checkpoint(r.out, r.config, run) if r.out is not None else None
        if r.saved is not None and r.saved["result"].is_complete(r.config.epochs):
            r.result = r.saved["result"]
    todo = [r for r in runs if r.result is None]
    if not todo:
        return [r.result for r in runs]
    starts = [r.saved["result"].epochs_completed if r.saved else 0 for r in todo]
    if len(set(starts)) > 1:
        raise ValueError(
            f"out_dirs: the unfinished runs are at different epochs {starts}; "
            "resume them one by one with fit"
        )
    for r in todo:
        if r.out is not None:
            r.out.mkdir(parents=True, exist_ok=True)

    lead, packed = todo[0].config, isinstance(run, PackedStrategy)
    device = run.device(lead.device)
    splits = build_splits(lead, device)
    family, num_classes = splits.info.family, splits.info.num_classes
    fulls = [build_model(r.config) for r in todo]
    for r, full in zip(todo, fulls, strict=True):
        r.result = initial_results(r.config, full, run)
        # Global member ids, drawn before a strategy shards the members.
        r.kept = kept_members(full.num_members, _KEPT_SEED + r.config.trial)
    if not packed:
        kw = {"family": family, "lam": lead.lam, "num_classes": num_classes}
        fulls = [run.prepare(fulls[0], device, **kw)]
    for r, full in zip(todo, fulls, strict=True):
        r.build(full)
    if packed:
        lams = [r.config.lam for r in todo]
        model = run.prepare_pack(fulls, device, family=family, lams=lams, num_classes=num_classes)
        shadows = [r.optimizer for r in todo]
        optimizer = PackedSGD(model.parameters(), shadows, fulls[0].num_members)
    else:
        model, optimizer = fulls[0], todo[0].optimizer
    loader = build_loader(lead, splits.train, device)
    generator = loader.generator
    if todo[0].saved is not None:
        _set_rng_state(todo[0].saved["rng"], generator)  # the same in every run of a pack
    eval_size = lead.eval_batch_size
    val_target = splits.val.y.cpu()  # the kept validation logits are on the host

    def recompute(i: int) -> dict[str, dict[str, Any]]:
        """The best epoch's logits of run i from its weights (a resumed run that did not
        see that epoch)."""
        r = todo[i]
        current = {k: v.detach().clone() for k, v in run.group_state(i).items()}
        run.load_group_state(i, r.best_model)
        logits = {}
        for split, pair in (("test", splits.test), ("val", splits.val)):
            out = run.group_evaluate(*pair, batch_size=eval_size, keep_eta=True, groups=[i])
            logits[split] = _logits(out[i][1], pair, r.result.best_epoch, split, family)
        run.load_group_state(i, current)
        return logits

    def write(i: int, logits: bool) -> None:
        r = todo[i]
        if r.out is None:
            return
        if logits:
            _write_logits(r.out, r.result, r.best_logits, lambda: recompute(i), run)
        if packed:
            r.model.load_state_dict(run.group_state(i))
            optimizer.export(i)
        _write_state(
            r.out, r.result, r.model, r.optimizer, r.scheduler, generator, r.best_model, run
        )

    live = list(range(len(todo)))

    def leave(i: int) -> None:
        """Run i diverged or was stopped: write it and take it out of training."""
        write(i, logits=True)
        if todo[i].result.status == "diverged":
            for callback in callbacks:
                callback(todo[i].result, todo[i].out)
        live.remove(i)
        run.freeze(i)
        if packed:
            optimizer.freeze(i)

    start = starts[0]
    bar = tqdm(
        total=lead.epochs * len(loader),
        initial=start * len(loader),
        disable=not progress or not run.is_main,
        unit="batch",
        desc=f"{lead.model} lam={lead.lam:g}" if len(todo) == 1 else f"{lead.model} x{len(todo)}",
    )
    for epoch in range(start + 1, lead.epochs + 1):
        tic = time.perf_counter()
        lrs = [r.scheduler.get_last_lr()[0] for r in todo]
        trains = _train_epoch(run, loader, optimizer, bar)
        with warnings.catch_warnings():
            # In a pack, PackedSGD steps for the runs' own SGDs, which torch then believes
            # never stepped ("lr_scheduler.step() before optimizer.step()"): not so here.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            for i in live:
                todo[i].scheduler.step()
        finite = [i for i in live if _finite(trains[i])]
        improved, vals, tests = {}, {}, {}
        if finite:
            vals = run.group_evaluate(*splits.val, batch_size=eval_size, keep_eta=True)
            for i in finite:
                val, val_eta = vals[i]  # every member's logits, gathered on every rank
                val["dropped_error"] = dropped_error(val_eta, val_target, todo[i].kept, family)
                best = todo[i].result
                improved[i] = best.best_epoch is None or vals[i][0]["error"] < best.val_error
            keep = any(improved.values())
            tests = run.group_evaluate(*splits.test, batch_size=eval_size, keep_eta=keep)
        for i in list(live):
            r, result = todo[i], todo[i].result
            record = None
            if i in improved:
                (val, val_eta), (test, test_eta) = vals[i], tests[i]
                record = EpochRecord(
                    epoch=epoch,
                    lr=lrs[i],
                    seconds=time.perf_counter() - tic,
                    train=trains[i],
                    val=val,
                    test=test,
                    diversity_gap=trains[i]["ambiguity"] - val["ambiguity"],
                    comm_floats_per_step=run.comm_floats_per_step(),
                )
            if record is None or not record.is_finite():
                result.status, result.diverged_epoch = "diverged", epoch
                leave(i)
                continue
            result.history.append(record)
            result.epochs_completed = epoch
            result.final_test_error = record.test.error
            if improved[i]:
                result.best_epoch, result.val_error, result.test_error = (
                    epoch,
                    val["error"],
                    test["error"],
                )
                # The same natural parameters as the saved logits (categorical; else None).
                result.val_ece, result.test_ece = val.get("ece"), test.get("ece")
                result.val_brier, result.test_brier = val.get("brier"), test.get("brier")
                result.val_dropped_error = val["dropped_error"]
                r.best_model = {k: v.detach().clone() for k, v in run.group_state(i).items()}
                if run.is_main:
                    r.best_logits = {"test": _logits(test_eta, splits.test, epoch, "test", family)}
                    r.best_logits["val"] = _logits(val_eta, splits.val, epoch, "val", family)
            if epoch == lead.epochs:
                result.status = "finished"
            bar.set_postfix(val_error=f"{val['error']:.4f}", best_epoch=result.best_epoch)
            write(i, logits=result.status == "finished")
            try:
                for callback in callbacks:
                    callback(result, r.out)
            except StopTraining:
                if result.status != "finished":
                    result.status = "stopped"
                    leave(i)
        if on_epoch is not None:
            on_epoch([r.result for r in runs])
        if not live:
            break
    bar.close()
    return [r.result for r in runs]


def _train_epoch(
    run: Strategy, loader: DeviceLoader, optimizer: torch.optim.Optimizer, bar: tqdm
) -> list[dict[str, Any] | None]:
    """One pass of SGD over ``loader``; the metrics come from the same forward passes."""
    run.net.train()
    run.start_epoch()
    for x, y in loader:
        loss = run.step_loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update()
    return run.group_train_metrics()


def initial_results(config: TrainConfig, model: EnsembleModel, run: Strategy) -> RunResult:
    """The result of a run of ``config`` before its first epoch, trained with ``run``."""
    return RunResult(
        status="running",
        best_epoch=None,
        val_error=None,
        test_error=None,
        final_test_error=None,
        diverged_epoch=None,
        epochs_completed=0,
        params=sum(p.numel() for p in model.parameters()),
        model_args=model.config,
        config=config.model_dump(),
        strategy=run.name,
        world_size=run.world,
    )


def _finite(metrics: dict[str, Any]) -> bool:
    values = [
        v for value in metrics.values() for v in (value if isinstance(value, list) else [value])
    ]
    return all(math.isfinite(v) for v in values if v is not None)


# --------------------------------------------------------------------------- checkpoints


def _logits(eta: Tensor, pair: Any, epoch: int, split: str, family: str) -> dict[str, Any]:
    return {"eta": eta, "target": pair.y.cpu(), "epoch": epoch, "split": split, "family": family}


def _write_logits(
    out: Path,
    result: RunResult,
    kept: dict[str, dict[str, Any]],
    recompute: Callable[[], dict[str, dict[str, Any]]],
    run: Strategy,
) -> None:
    """Write the best epoch's logits unless ``out`` already holds them (a resumed run).

    Every process takes part in a recomputation (it gathers the members' outputs); rank 0
    writes the files."""
    epoch = result.best_epoch
    if epoch is None:  # diverged in its first epoch: nothing to save
        return
    files = {"test": out / TEST_LOGITS_FILE, "val": out / VAL_LOGITS_FILE}
    need = None
    if run.is_main:  # rank 0 decides: only its folder is sure to hold the run's logits
        saved = all(_saved_epoch(path) == epoch for path in files.values())
        need = "write" if kept else "nothing" if saved else "recompute"
    need = run.agree(need)[0]
    if need == "recompute":
        kept = recompute()
    if need != "nothing" and run.is_main:
        for split, path in files.items():
            _atomic_save(kept[split], path)


def _saved_epoch(path: Path) -> int | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "loader": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loader"].to(generator.get_state().device))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_state(
    out: Path,
    result: RunResult,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    best_model: dict[str, torch.Tensor] | None,
    run: Strategy,
) -> None:
    """This process's checkpoint, then (rank 0) results.json; a barrier keeps the ranks'
    checkpoints of one folder at the same epoch."""
    if run.writes_checkpoint:
        checkpoint = {
            "results": result.model_dump(mode="json"),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(generator),
            "best_model": best_model,
        }
        _atomic_save(checkpoint, out / run.checkpoint_file)
    run.barrier()
    if run.is_main:
        _atomic_write_text(result.to_json(), out / RESULTS_FILE)


def _load_checkpoint(out: Path, config: TrainConfig, run: Strategy) -> dict[str, Any] | None:
    path = check_writable_dir(out, what="run folder") / run.checkpoint_file
    found = run.agree(path.exists())  # every rank's answer, from one collective
    if not all(found):
        if any(found):
            raise ValueError(f"{out}: some ranks have their checkpoint and others not")
        return None
    saved = load_checkpoint(path)
    saved["result"] = RunResult.model_validate(saved.pop("results"))
    stored, current = saved["result"].config, config.model_dump()
    for key in sorted(set(stored) | set(current)):
        if key not in _RESUMABLE_KEYS and stored.get(key) != current.get(key):
            raise ValueError(
                f"{out} holds a run with {key}={stored.get(key)!r}, not {current.get(key)!r}; "
                f"use another out_dir (only {', '.join(sorted(_RESUMABLE_KEYS))} may change "
                "on resume)"
            )
    if run.name == "module" and saved["result"].world_size != run.world:
        raise ValueError(
            f"{out} holds {saved['result'].world_size} member shards; resume it with "
            f"{saved['result'].world_size} processes, not {run.world}"
        )
    epochs = run.agree(saved["result"].epochs_completed)
    if len(set(epochs)) > 1:
        raise ValueError(f"{out}: the ranks' checkpoints are at different epochs {epochs}")
    return saved
