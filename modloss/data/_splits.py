"""Train / val / test splits: the seeded validation hold-out and train-only normalisation."""

import dataclasses
import os
from typing import NamedTuple

import torch
from torch import Tensor

from modloss.data._files import DatasetInfo, dataset_info
from modloss.data._readers import load_raw


class TensorPair(NamedTuple):
    x: Tensor
    y: Tensor


@dataclasses.dataclass(frozen=True)
class Splits:
    """Normalised train / val / test tensors on one device.

    `x_mean` / `x_std` (per channel, or per feature of tabular data) were computed on `train`
    alone and applied to all three splits; `y_mean` / `y_std` likewise for Gaussian targets
    (None otherwise), so predictions map back to the original units as `y * y_std + y_mean`.
    `train_index` and `val_index` index the raw training pool (`load_raw(...).x_train`).
    """

    train: TensorPair
    val: TensorPair
    test: TensorPair
    info: DatasetInfo
    x_mean: Tensor
    x_std: Tensor
    y_mean: Tensor | None
    y_std: Tensor | None
    train_index: Tensor
    val_index: Tensor


def holdout_split(num_train: int, val_size: int, *, trial: int) -> tuple[Tensor, Tensor]:
    """(train_index, val_index) of a training pool of `num_train` examples: a random
    permutation seeded by `trial` whose first `val_size` entries are held out for validation.
    Both stay in permuted order, so a prefix of `train_index` is a random subset."""
    if not 0 <= val_size < num_train:
        raise ValueError(f"val_size={val_size}: expected 0 <= val_size < {num_train}")
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(trial))
    return order[val_size:], order[:val_size]


def _standardise(
    train: Tensor, others: list[Tensor], dims: tuple[int, ...]
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Standardises `train` and `others` in place with the statistics of `train` over `dims`."""
    std, mean = torch.std_mean(train, dim=dims, correction=0, keepdim=True)
    # A channel constant over a small subset would divide by zero; leave it centred only.
    std = torch.where(std > 0, std, torch.ones_like(std))
    for t in [train, *others]:
        t.sub_(mean).div_(std)
    return [train, *others], mean.flatten(), std.flatten()


def load_splits(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    val_size: int | None = None,
    trial: int = 0,
    subset: int | None = None,
    device: str | torch.device = "cpu",
    download: bool = True,
) -> Splits:
    """Train / val / test splits of dataset `name`, normalised, on `device`.

    The training pool is split by `holdout_split(num_train, val_size, trial=trial)`
    (`val_size=None`: `info.default_val_size`, 10,000 for the image datasets as in the
    paper). Images become float32 in [0, 1], then every split is standardised per channel
    (per feature for tabular data) with the mean and std of the training split alone; so are
    Gaussian targets. Categorical targets are int64 (N,), regression targets float32 (N, K).

    `subset` (smoke tests) keeps the first `subset` examples of the shuffled training split,
    and caps validation and test at `subset` examples each (validation: a prefix of the
    held-out part; test: the first `subset` test examples); it is an upper bound, so a subset
    larger than a split keeps that split whole.
    """
    info = dataset_info(name)
    val_size = info.default_val_size if val_size is None else val_size
    if subset is not None and subset < 1:
        raise ValueError(f"subset={subset}: expected a positive number of examples or None")
    if trial < 0:
        raise ValueError(f"trial={trial}: expected a non-negative integer")
    train_index, val_index = holdout_split(info.num_train, val_size, trial=trial)
    raw = load_raw(name, data_dir=data_dir, download=download)
    x_test, y_test = raw.x_test, raw.y_test
    if subset is not None:
        train_index, val_index = train_index[:subset], val_index[:subset]
        x_test, y_test = x_test[:subset], y_test[:subset]
    device = torch.device(device)

    def features(x: Tensor) -> Tensor:
        # Moved in the compact stored dtype (uint8 for images), converted on the device; always
        # a fresh tensor, since _standardise works in place.
        x = x.to(device).to(torch.float32, copy=True)
        return x.div_(255.0) if raw.x_train.dtype == torch.uint8 else x

    dims = tuple(d for d in range(raw.x_train.dim()) if d != 1)
    xs, x_mean, x_std = _standardise(
        features(raw.x_train[train_index]),
        [features(raw.x_train[val_index]), features(x_test)],
        dims,
    )
    ys = [raw.y_train[train_index], raw.y_train[val_index], y_test]
    ys = [y.to(device) for y in ys]
    y_mean = y_std = None
    if info.family == "categorical":
        ys = [y.long() for y in ys]
    else:
        ys = [y.to(torch.float32, copy=True) for y in ys]
        if info.family == "gaussian":
            ys, y_mean, y_std = _standardise(ys[0], ys[1:], (0,))
    return Splits(
        train=TensorPair(xs[0], ys[0]),
        val=TensorPair(xs[1], ys[1]),
        test=TensorPair(xs[2], ys[2]),
        info=info,
        x_mean=x_mean,
        x_std=x_std,
        y_mean=y_mean,
        y_std=y_std,
        train_index=train_index,
        val_index=val_index,
    )
