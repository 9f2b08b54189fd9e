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
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
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
from modloss.models import EnsembleModel, create_model
from modloss.names import CHECKPOINT_FILE, RESULTS_FILE, TEST_LOGITS_FILE, VAL_LOGITS_FILE
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
    out = Path(out_dir) if out_dir is not None else None
    saved = _load_checkpoint(out, config, run) if out is not None else None
    if saved is not None and saved["result"].is_complete(config.epochs):
        return saved["result"]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    device = run.device(config.device)
    splits = build_splits(config, device)
    family = splits.info.family
    full = build_model(config)
    result = initial_results(config, full, run)
    model = run.prepare(
        full, device, family=family, lam=config.lam, num_classes=splits.info.num_classes
    )
    optimizer, scheduler = build_optimizer(config, model)
    loader = build_loader(config, splits.train, device)
    generator = loader.generator
    best_model = None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        _set_rng_state(saved["rng"], generator)
        best_model = saved["best_model"]
        stored = saved["result"]
        result = stored.model_copy(
            update={
                "config": config.model_dump(),
                "status": "running",
                "resumed_from": [*stored.resumed_from, stored.epochs_completed],
            }
        )
    best_logits: dict[str, dict[str, Any]] = {}  # split -> saved dict, from this process
    eval_size = config.eval_batch_size

    def recompute() -> dict[str, dict[str, Any]]:
        """The best epoch's logits from its weights (a resumed run that did not see it)."""
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best_model)
        logits = {}
        for split, pair in (("test", splits.test), ("val", splits.val)):
            eta = run.evaluate(*pair, batch_size=eval_size, keep_eta=True)[1]
            logits[split] = _logits(eta, pair, result.best_epoch, split, family)
        model.load_state_dict(current)
        return logits

    def write(logits: bool) -> None:
        if out is None:
            return
        if logits:
            _write_logits(out, result, best_logits, recompute, run)
        _write_state(out, result, model, optimizer, scheduler, generator, best_model, run)

    start = result.epochs_completed
    bar = tqdm(
        total=config.epochs * len(loader),
        initial=start * len(loader),
        disable=not progress or not run.is_main,
        unit="batch",
        desc=f"{config.model} lam={config.lam:g}",
    )
    for epoch in range(start + 1, config.epochs + 1):
        tic = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        train = _train_epoch(run, loader, optimizer, bar)
        scheduler.step()
        record = None
        if _finite(train):
            val, val_eta = run.evaluate(*splits.val, batch_size=eval_size, keep_eta=True)
            improved = result.best_epoch is None or val["error"] < result.val_error
            test, test_eta = run.evaluate(*splits.test, batch_size=eval_size, keep_eta=improved)
            record = EpochRecord(
                epoch=epoch,
                lr=lr,
                seconds=time.perf_counter() - tic,
                train=train,
                val=val,
                test=test,
                diversity_gap=train["ambiguity"] - val["ambiguity"],
                comm_floats_per_step=run.comm_floats_per_step(),
            )
        if record is None or not record.is_finite():
            result.status, result.diverged_epoch = "diverged", epoch
            break
        result.history.append(record)
        result.epochs_completed = epoch
        result.final_test_error = record.test.error
        if improved:
            result.best_epoch, result.val_error, result.test_error = (
                epoch,
                val["error"],
                test["error"],
            )
            # The same natural parameters as the saved logits (categorical; else None).
            result.val_ece, result.test_ece = val.get("ece"), test.get("ece")
            result.val_brier, result.test_brier = val.get("brier"), test.get("brier")
            best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if run.is_main:
                best_logits = {"test": _logits(test_eta, splits.test, epoch, "test", family)}
                best_logits["val"] = _logits(val_eta, splits.val, epoch, "val", family)
        if epoch == config.epochs:
            result.status = "finished"
        bar.set_postfix(val_error=f"{val['error']:.4f}", best_epoch=result.best_epoch)
        write(logits=result.status == "finished")
        try:
            for callback in callbacks:
                callback(result, out)
        except StopTraining:
            if result.status != "finished":
                result.status = "stopped"
            break
    bar.close()
    if result.status in ("diverged", "stopped"):
        write(logits=True)
    if result.status == "diverged":
        for callback in callbacks:
            callback(result, out)
    return result


def _train_epoch(
    run: Strategy, loader: DeviceLoader, optimizer: torch.optim.Optimizer, bar: tqdm
) -> dict[str, Any]:
    """One pass of SGD over ``loader``; the metrics come from the same forward passes."""
    run.net.train()
    run.start_epoch()
    for x, y in loader:
        loss = run.step_loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update()
    return run.train_metrics()


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
    found = path.exists()
    if not all(run.agree(found)):
        if any(run.agree(found)):
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
