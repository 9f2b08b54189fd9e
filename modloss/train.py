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

import json
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from torch import Tensor, nn
from tqdm.auto import tqdm

from modloss.data import (
    DATASETS,
    DeviceLoader,
    Splits,
    TensorPair,
    load_splits,
    random_crop_flip,
)
from modloss.losses import modular_loss
from modloss.metrics import EpochMetrics, evaluate
from modloss.models import EnsembleModel, create_model, list_models

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

CHECKPOINT_FILE = "checkpoint.pt"
RESULTS_FILE = "results.json"
TEST_LOGITS_FILE = "test_logits.pt"
VAL_LOGITS_FILE = "val_logits.pt"

_MLP_LAMS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0)
_CNN_LAMS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.97, 0.99, 1.0)
_DENSENET_LAMS = (0.0, 0.5, 0.9, 1.0)


def _presets(lams: tuple[float, ...], lr: float, joint_lr: float, joint_from: float) -> dict:
    return {lam: joint_lr if lam >= joint_from else lr for lam in lams}


# The reference scripts' tuned learning rates (REFERENCE.md). The MLP rates grow with M
# because the modular loss averages over members (1/M per-member gradient).
PAPER_LRS: dict[str, dict[float, float]] = {
    "1-M-1024-H": _presets(_MLP_LAMS, 0.02, 0.02, 1.0),
    "16-M-64-H": _presets(_MLP_LAMS, 0.32, 0.096, 0.99),
    "64-M-16-H": _presets(_MLP_LAMS, 1.28, 0.384, 0.99),
    "256-M-4-H": _presets(_MLP_LAMS, 5.15, 1.536, 0.99),
    "CNN-10": _presets(_CNN_LAMS, 0.06, 0.02, 1.0),
    "DN-100-12-4": _presets(_DENSENET_LAMS, 0.1, 0.1, 1.0),
    "DN-82-8-8": _presets(_DENSENET_LAMS, 0.1, 0.1, 1.0),
    "DN-64-6-16": _presets(_DENSENET_LAMS, 0.1, 0.1, 1.0),
}
# The paper augments (random crop + flip) the CIFAR datasets only.
_AUGMENTED_BY_DEFAULT = frozenset({"cifar10", "cifar100"})
# Config keys that may change when a run is resumed: where it runs, where its data sits,
# and how far it goes.
_RESUMABLE_KEYS = frozenset({"epochs", "device", "data_dir"})
# Seed streams derived from the trial; kept apart so init and shuffling never share draws.
_INIT_STREAM, _SHUFFLE_STREAM = 0, 1


def paper_lr(model: str, lam: float) -> float:
    """The paper's learning rate for ``model`` trained at ``lam``.

    Raises ``ValueError`` for a model or lambda the paper did not tune, asking for an
    explicit learning rate.
    """
    if model not in PAPER_LRS:
        raise ValueError(
            f"no paper learning rate for model {model!r}; pass lr explicitly "
            f"(presets exist for {', '.join(PAPER_LRS)})"
        )
    for preset_lam, lr in PAPER_LRS[model].items():
        if math.isclose(lam, preset_lam, abs_tol=1e-9):
            return lr
    lams = ", ".join(f"{v:g}" for v in PAPER_LRS[model])
    raise ValueError(
        f"no paper learning rate for model {model!r} at lam={lam:g}; pass lr explicitly "
        f"(presets for {model} exist at lam in {{{lams}}})"
    )


def _seed(trial: int, stream: int) -> int:
    return 2 * trial + stream


class TrainConfig(BaseModel):
    """Everything one training run depends on; validated once, logged as validated.

    ``lr=None`` is replaced by :func:`paper_lr` during validation, so the logged config
    holds the learning rate actually used. ``val_size=None`` takes the dataset's default
    (10,000 for the image datasets, as in the paper); ``augment=None`` augments exactly the
    datasets the paper augments (CIFAR). ``eval_batch_size`` only affects speed and memory.
    """

    model_config = ConfigDict(extra="forbid")

    model: str
    model_overrides: dict[str, Any] = {}
    dataset: str = "fashion-mnist"
    lam: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False)
    lr: float | None = Field(None, gt=0.0, allow_inf_nan=False, validate_default=True)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    nesterov: bool = False
    milestones: list[int] = []
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    batch_size: int = Field(100, ge=1)
    eval_batch_size: int = Field(1000, ge=1)
    epochs: int = Field(200, ge=1)
    trial: int = Field(0, ge=0)
    val_size: int | None = Field(None, ge=1)
    subset: int | None = Field(None, ge=1)
    augment: bool | None = None
    data_dir: str | None = None
    device: str = "cpu"

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in list_models():
            raise ValueError(f"unknown model {value!r}; allowed: {', '.join(list_models())}")
        return value

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in DATASETS:
            raise ValueError(f"unknown dataset {value!r}; allowed: {', '.join(DATASETS)}")
        return value

    @field_validator("lr")
    @classmethod
    def _preset_lr(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None or "model" not in info.data or "lam" not in info.data:
            return value  # an invalid model or lam is reported on its own key
        return paper_lr(info.data["model"], info.data["lam"])

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if any(m < 1 for m in value) or any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError(f"{value}: expected strictly increasing positive epochs")
        return value

    @field_validator("device")
    @classmethod
    def _available_device(cls, value: str) -> str:
        try:
            device = torch.device(value)
        except RuntimeError as err:
            raise ValueError(f"{value!r} is not a device; allowed: cpu, cuda, cuda:N, mps") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{value!r}: CUDA is not available here; allowed: cpu")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"{value!r}: only {torch.cuda.device_count()} CUDA device(s)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"{value!r}: MPS is not available here; allowed: cpu")
        if device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"{value!r}: allowed: cpu, cuda, cuda:N, mps")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: Nesterov momentum needs momentum > 0")
        if self.augment and len(DATASETS[self.dataset].input_shape) != 3:
            raise ValueError(f"augment: dataset {self.dataset!r} is not an image dataset")
        return self


class StopTraining(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Raise from a callback to end the run cleanly with status ``"stopped"``."""


Callback = Callable[[int, dict[str, float], Path | None], None]


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
) -> dict[str, Any]:
    """Train ``config`` and return its results (a JSON-able dict).

    With ``out_dir``, each epoch writes ``checkpoint.pt`` and ``results.json`` atomically,
    and when the run ends (finished, diverged or stopped) the member natural parameters of
    its best-validation epoch on the test and validation sets (``test_logits.pt``,
    ``val_logits.pt``: dicts with ``eta`` ``(M, N, K)``, ``target``, ``epoch``, ``split``,
    ``family``), before the checkpoint that says so. Until then they are kept in memory: an
    epoch's checkpoint holds the best weights, not the logits (100 MB for 256 members on
    5,000 images), so it stays cheap to copy. Calling ``fit`` again with the same
    ``out_dir`` resumes from the checkpoint (only ``epochs``, ``device`` and ``data_dir``
    may differ), recomputing the best epoch's logits from its weights if this process did
    not see that epoch; a run that already reached ``epochs``, or diverged, is returned as
    stored without loading any data.

    Each callback is called as ``callback(epoch, metrics, out_dir)`` after the epoch's
    checkpoint is written, with the epoch's scalar metrics plus ``epoch``, ``best_epoch``,
    ``best_val_error`` and ``best_test_error`` (test error at the best-validation epoch so
    far). A callback raising :class:`StopTraining` ends the run with status ``"stopped"``
    (a later ``fit`` on the same ``out_dir`` continues it); any other exception propagates
    to the caller, the checkpoint of that epoch already on disk.

    Results: ``status`` (``finished`` | ``diverged`` | ``stopped``), ``best_epoch``,
    ``best_val_error``, ``test_error`` (at ``best_epoch``), ``final_test_error``,
    ``diverged_epoch``, ``epochs_completed``, ``params``, ``model_config`` (the model's
    constructor arguments), ``config`` and ``history`` (one dict per completed epoch; see
    :mod:`modloss.metrics` for the metric names).
    """
    config = config if isinstance(config, TrainConfig) else TrainConfig.model_validate(config)
    out = Path(out_dir) if out_dir is not None else None
    saved = _load_checkpoint(out, config) if out is not None else None
    if saved is not None and _is_complete(saved["results"], config):
        return saved["results"]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    device = torch.device(config.device)
    splits = build_splits(config, device)
    family = splits.info.family
    model = build_model(config).to(device)
    optimizer, scheduler = build_optimizer(config, model)
    loader = build_loader(config, splits.train, device)
    generator = loader.generator
    results = initial_results(config, model)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        _set_rng_state(saved["rng"], generator)
        results = {**saved["results"], "config": config.model_dump(), "status": "running"}
    best_model = saved["best_model"] if saved is not None else None
    best_logits: dict[str, dict[str, Any]] = {}  # split -> saved dict, from this process

    def recompute() -> dict[str, dict[str, Any]]:
        """The best epoch's logits from its weights (a resumed run that did not see it)."""
        best = build_model(config).to(device)
        best.load_state_dict(best_model)
        kw = {"family": family, "lam": config.lam, "batch_size": config.eval_batch_size}
        logits = {}
        for split, pair in (("test", splits.test), ("val", splits.val)):
            eta = evaluate(best, *pair, keep_eta=True, **kw)[1]
            logits[split] = _logits(eta, pair, results["best_epoch"], split, family)
        return logits

    start = results["epochs_completed"]
    bar = tqdm(
        total=config.epochs * len(loader),
        initial=start * len(loader),
        disable=not progress,
        unit="batch",
        desc=f"{config.model} lam={config.lam:g}",
    )
    for epoch in range(start + 1, config.epochs + 1):
        tic = time.perf_counter()
        entry: dict[str, Any] = {"epoch": epoch, "lr": scheduler.get_last_lr()[0]}
        train = _train_epoch(model, loader, optimizer, family, config.lam, bar)
        scheduler.step()
        entry.update(_prefixed("train", train))
        if _finite(entry):
            eval_kw = {"family": family, "lam": config.lam, "batch_size": config.eval_batch_size}
            val, val_eta = evaluate(model, *splits.val, keep_eta=True, **eval_kw)
            improved = results["best_epoch"] is None or val["error"] < results["best_val_error"]
            test, test_eta = evaluate(model, *splits.test, keep_eta=improved, **eval_kw)
            entry.update(_prefixed("val", val))
            entry.update(_prefixed("test", test))
        entry["epoch_seconds"] = time.perf_counter() - tic
        if not _finite(entry):
            results.update(status="diverged", diverged_epoch=epoch)
            break
        results["history"].append(entry)
        results["epochs_completed"] = epoch
        results["final_test_error"] = entry["test_error"]
        if improved:
            results.update(best_epoch=epoch, best_val_error=val["error"], test_error=test["error"])
            best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_logits = {"test": _logits(test_eta, splits.test, epoch, "test", family)}
            best_logits["val"] = _logits(val_eta, splits.val, epoch, "val", family)
        if epoch == config.epochs:
            results["status"] = "finished"
        bar.set_postfix(val_error=f"{val['error']:.4f}", best_epoch=results["best_epoch"])
        if out is not None:
            if results["status"] == "finished":
                _write_logits(out, results, best_logits, recompute)
            _write_state(out, results, model, optimizer, scheduler, generator, best_model)
        try:
            _run_callbacks(callbacks, epoch, entry, results, out)
        except StopTraining:
            if results["status"] != "finished":
                results["status"] = "stopped"
            break
    bar.close()
    if out is not None and results["status"] in ("diverged", "stopped"):
        _write_logits(out, results, best_logits, recompute)
        _write_state(out, results, model, optimizer, scheduler, generator, best_model)
    return results


def _train_epoch(
    model: EnsembleModel,
    loader: DeviceLoader,
    optimizer: torch.optim.Optimizer,
    family: str,
    lam: float,
    bar: tqdm,
) -> dict[str, Any]:
    """One pass of SGD over ``loader``; the metrics come from the same forward passes."""
    model.train()
    metrics = EpochMetrics(family, lam)
    for x, y in loader:
        eta = model(x)  # (M, B, K)
        loss = modular_loss(eta, y, lam, family=family)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        metrics.update(eta.detach(), y)
        bar.update()
    return metrics.compute()


def initial_results(config: TrainConfig, model: EnsembleModel) -> dict[str, Any]:
    """The results dict of a run before its first epoch (see :func:`fit` for the keys)."""
    return {
        "status": "running",
        "best_epoch": None,
        "best_val_error": None,
        "test_error": None,
        "final_test_error": None,
        "diverged_epoch": None,
        "epochs_completed": 0,
        "params": sum(p.numel() for p in model.parameters()),
        "model_config": model.config,
        "config": config.model_dump(),
        "history": [],
    }


def _is_complete(results: dict[str, Any], config: TrainConfig) -> bool:
    if results["status"] == "diverged":
        return True
    return results["status"] == "finished" and results["epochs_completed"] >= config.epochs


def _prefixed(split: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {f"{split}_{key}": value for key, value in metrics.items()}


def _finite(entry: dict[str, Any]) -> bool:
    values = [
        v for value in entry.values() for v in (value if isinstance(value, list) else [value])
    ]
    return all(math.isfinite(v) for v in values)


def _run_callbacks(
    callbacks: Iterable[Callback],
    epoch: int,
    entry: dict[str, Any],
    results: dict[str, Any],
    out: Path | None,
) -> None:
    metrics = {k: v for k, v in entry.items() if not isinstance(v, list)}
    metrics.update(
        best_epoch=results["best_epoch"],
        best_val_error=results["best_val_error"],
        best_test_error=results["test_error"],
    )
    for callback in callbacks:
        callback(epoch, metrics, out)


# --------------------------------------------------------------------------- checkpoints


def _logits(eta: Tensor, pair: Any, epoch: int, split: str, family: str) -> dict[str, Any]:
    return {"eta": eta, "target": pair.y.cpu(), "epoch": epoch, "split": split, "family": family}


def _write_logits(
    out: Path,
    results: dict[str, Any],
    kept: dict[str, dict[str, Any]],
    recompute: Callable[[], dict[str, dict[str, Any]]],
) -> None:
    """Write the best epoch's logits unless ``out`` already holds them (a resumed run)."""
    epoch = results["best_epoch"]
    if epoch is None:  # diverged in its first epoch: nothing to save
        return
    files = {"test": out / TEST_LOGITS_FILE, "val": out / VAL_LOGITS_FILE}
    if not kept and all(_saved_epoch(path) == epoch for path in files.values()):
        return
    logits = kept or recompute()
    for split, path in files.items():
        _atomic_save(logits[split], path)


def _saved_epoch(path: Path) -> int | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(obj, allow_nan=False))
    os.replace(tmp, path)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "loader": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_state(
    out: Path,
    results: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    best_model: dict[str, torch.Tensor] | None,
) -> None:
    checkpoint = {
        "results": results,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(generator),
        "best_model": best_model,
    }
    _atomic_save(checkpoint, out / CHECKPOINT_FILE)
    _atomic_write_json(results, out / RESULTS_FILE)


def _load_checkpoint(out: Path, config: TrainConfig) -> dict[str, Any] | None:
    from modloss.files import check_writable_dir, load_checkpoint

    path = check_writable_dir(out, what="run folder") / CHECKPOINT_FILE
    if not path.exists():
        return None
    saved = load_checkpoint(path)
    stored, current = saved["results"]["config"], config.model_dump()
    for key in sorted(set(stored) | set(current)):
        if key not in _RESUMABLE_KEYS and stored.get(key) != current.get(key):
            raise ValueError(
                f"{out} holds a run with {key}={stored.get(key)!r}, not {current.get(key)!r}; "
                f"use another out_dir (only {', '.join(sorted(_RESUMABLE_KEYS))} may change "
                "on resume)"
            )
    return saved
