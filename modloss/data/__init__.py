"""Datasets for the paper's experiments: MD5-checked readers, per-channel normalisation, the
seeded validation hold-out, and an on-device loader with batched augmentation.

Files live under a data directory (`resolve_data_dir`: argument, else $MODLOSS_DATA_DIR, else a
per-user cache folder), one folder per dataset:

    <dir>/fashion-mnist/train-images-idx3-ubyte.gz   and the other three .gz files
    <dir>/mnist/train-images-idx3-ubyte.gz           likewise (out-of-distribution tests)
    <dir>/cifar10/cifar-10-python.tar.gz             or the extracted cifar-10-batches-py/
    <dir>/cifar100/cifar-100-python.tar.gz           or the extracted cifar-100-python/

Missing files are downloaded from `DatasetInfo.base_url` and MD5-checked. "diabetes" (the copy
bundled with scikit-learn) and "poisson-glm" (generated from a fixed seed) need no files; they
exist so that the Gaussian (NCL) and Poisson families are exercised end to end.

Typical use:

    splits = load_splits("fashion-mnist", trial=0, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    for x, y in DeviceLoader(*splits.train, 100, shuffle=True, generator=g):
        ...
"""

from modloss.data._files import (
    DATASETS,
    ChecksumError,
    DatasetInfo,
    FileSpec,
    dataset_info,
    resolve_data_dir,
)
from modloss.data._loader import DeviceLoader, random_crop_flip, rotate
from modloss.data._readers import RawData, load_raw
from modloss.data._splits import Splits, TensorPair, holdout_split, load_splits

__all__ = [
    "DATASETS",
    "ChecksumError",
    "DatasetInfo",
    "DeviceLoader",
    "FileSpec",
    "RawData",
    "Splits",
    "TensorPair",
    "dataset_info",
    "holdout_split",
    "load_raw",
    "load_splits",
    "random_crop_flip",
    "resolve_data_dir",
    "rotate",
]
