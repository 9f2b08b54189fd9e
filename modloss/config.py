"""The settings of one training run, :class:`TrainConfig`, and the paper's learning rates.

:class:`TrainConfig` is the one definition of every training setting: its fields' types,
bounds, defaults and descriptions are the options of ``modloss train`` (:mod:`modloss.cli`)
and the per-trial settings of a search space (``orchestration.spaces``), which reuse the
field types (``lam``, ``lr``, ``model``, ``trial``) for their sweep dimensions.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from modloss.data import DATASETS
from modloss.models import list_models

__all__ = ["PAPER_LRS", "TrainConfig", "paper_lr"]

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


def _known_model(value: str) -> str:
    if value not in list_models():
        raise ValueError(f"unknown model {value!r}; allowed: {', '.join(list_models())}")
    return value


class TrainConfig(BaseModel):
    """Everything one training run depends on; validated once, logged as validated.

    ``lr=None`` is replaced by :func:`paper_lr` during validation, so the logged config
    holds the learning rate actually used.
    """

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, AfterValidator(_known_model)] = Field(
        description="Registered model name, e.g. 256-M-4-H."
    )
    model_overrides: dict[str, Any] = Field(
        {}, description='Arguments replacing the registered model\'s, e.g. {"hidden": 8}.'
    )
    dataset: str = Field("fashion-mnist", description="Dataset name.")
    lam: float = Field(
        1.0, ge=0.0, le=1.0, allow_inf_nan=False, description="Modular-loss lambda in [0, 1]."
    )
    lr: float | None = Field(
        None,
        gt=0.0,
        allow_inf_nan=False,
        validate_default=True,
        description="Learning rate; unset: the paper's for model and lam.",
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum in [0, 1).")
    weight_decay: float = Field(0.0, ge=0.0, allow_inf_nan=False, description="Weight decay.")
    nesterov: bool = Field(False, description="Nesterov momentum (needs momentum > 0).")
    milestones: list[int] = Field(
        [], description="Epochs after which lr is multiplied by gamma; increasing, below epochs."
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="Learning-rate decay factor in (0, 1].")
    batch_size: int = Field(100, ge=1, description="Training batch size.")
    eval_batch_size: int = Field(
        1000, ge=1, description="Evaluation batch size (speed and memory only)."
    )
    epochs: int = Field(200, ge=1, description="Epochs to train.")
    trial: int = Field(
        0, ge=0, description="Trial: seeds the validation split, the init and the batch order."
    )
    val_size: int | None = Field(
        None, ge=1, description="Validation examples held out; unset: the dataset's (10,000)."
    )
    subset: int | None = Field(
        None, ge=1, description="Use at most this many examples per split (smoke runs)."
    )
    augment: bool | None = Field(
        None, description="Random crop + flip; unset: as the paper (the CIFAR datasets only)."
    )
    data_dir: str | None = Field(
        None, description="Dataset folder; unset: $MODLOSS_DATA_DIR or the cache."
    )
    device: str = Field("cpu", description="cpu, cuda, cuda:N or mps.")

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
        late = [m for m in self.milestones if m >= self.epochs]
        if late:
            # The schedule steps after each epoch: a milestone at or past the last never acts.
            raise ValueError(f"milestones: {late} must be below epochs ({self.epochs})")
        return self
