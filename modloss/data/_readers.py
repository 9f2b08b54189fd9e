"""Readers of the stored formats (gzip IDX, CIFAR pickle archives) and the tabular datasets."""

import gzip
import io
import math
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from modloss.data._files import DatasetInfo, dataset_info, fetch_files, resolve_data_dir

# Inside each CIFAR archive's top folder: (training pickles, test pickles, label key).
_CIFAR_LAYOUT: dict[str, tuple[tuple[str, ...], tuple[str, ...], bytes]] = {
    "cifar10": (tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels"),
    "cifar100": (("train",), ("test",), b"fine_labels"),
}
# The test split of the datasets that have none is drawn once with this seed, whatever the trial.
_FIXED_SPLIT_SEED = 0
_GLM_SEED = 1234
_GLM_BIAS = 0.5
_GLM_WEIGHT_SCALE = 0.25


class RawData(NamedTuple):
    """A dataset as stored, on the CPU: images uint8 (N, C, H, W), tabular float64 (N, F);
    labels int64 (N,), regression targets float64 (N, K)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def _read_idx(path: Path, magic: int, shape: tuple[int, ...]) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise ValueError(f"{path}: not a complete gzip file ({err})") from err
    header_len = 4 * (1 + len(shape))  # magic, then one big-endian uint32 per dimension
    header = tuple(int(v) for v in np.frombuffer(raw[: header_len - header_len % 4], dtype=">u4"))
    expected = (magic, *shape)
    if header != expected or len(raw) != header_len + math.prod(shape):
        raise ValueError(
            f"{path}: IDX header {header} with {len(raw) - header_len} data bytes, expected "
            f"header {expected} with {math.prod(shape)} data bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape).copy()


def _read_idx_dataset(info: DatasetInfo, folder: Path, download: bool) -> RawData:
    """Fashion-MNIST and MNIST: the same four gzip IDX files."""
    fetch_files(info, folder, download)
    pixels = info.input_shape[1:]
    arrays = []
    for split, n in (("train", info.num_train), ("t10k", info.num_test)):
        images = _read_idx(folder / f"{split}-images-idx3-ubyte.gz", 2051, (n, *pixels))
        labels = _read_idx(folder / f"{split}-labels-idx1-ubyte.gz", 2049, (n,))
        if labels.max(initial=0) >= info.num_classes:
            raise ValueError(f"{folder / split}-labels-idx1-ubyte.gz: label >= {info.num_classes}")
        arrays += [torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()]
    return RawData(*arrays)


class _ArrayUnpickler(pickle.Unpickler):
    """Loads CIFAR batches while refusing every global but numpy arrays: an unverified pickle
    could otherwise run arbitrary code."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return super().find_class(module, name)


def _parse_cifar_batch(
    blob: bytes, where: str, label_key: bytes, num_classes: int
) -> tuple[Tensor, Tensor]:
    expected = (
        f"a pickled dict with b'data' uint8 (n, 3072) and {label_key!r} (n ints < {num_classes})"
    )
    try:
        batch = _ArrayUnpickler(io.BytesIO(blob), encoding="bytes").load()
        data, labels = batch[b"data"], np.asarray(batch[label_key], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: not a CIFAR batch ({err!r}); expected {expected}") from err
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3072
        and labels.shape == (data.shape[0],)
        and (labels.size == 0 or (labels.min() >= 0 and labels.max() < num_classes))
    ):
        shape = getattr(data, "shape", None)
        raise ValueError(f"{where}: data {shape} / labels {labels.shape}; expected {expected}")
    # CIFAR rows hold the 1024 red, then green, then blue pixels, each plane row-major.
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels)


def _read_cifar_members(archive: Path, names: list[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    try:
        # Stream mode: one pass through the gzip, no random access over 170 MB.
        with tarfile.open(archive, "r|gz") as tar:
            for member in tar:
                if member.name in names and member.isfile():
                    handle = tar.extractfile(member)
                    if handle is not None:
                        found[member.name] = handle.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{archive}: not a complete tar.gz archive ({err})") from err
    absent = [n for n in names if n not in found]
    if absent:
        raise ValueError(f"{archive}: members {absent} are missing; expected {names}")
    return found


def _read_cifar(info: DatasetInfo, folder: Path, download: bool) -> RawData:
    """CIFAR-10 / CIFAR-100 (fine labels) from the archive or its extracted folder.

    The archive, when present (or once downloaded), is MD5-checked and read without
    extracting. An extracted folder has no published per-file checksums: it is used only when
    the archive is absent, and then validated strictly instead (every batch file present, each
    a dict holding uint8 data of shape (n, 3072) and n labels in range, the totals equal to
    `info.num_train` / `info.num_test`), and unpickled with only numpy arrays allowed.
    """
    train_names, test_names, label_key = _CIFAR_LAYOUT[info.name]
    names = [f"{info.extracted}/{n}" for n in train_names + test_names]
    archive, extracted = folder / info.files[0].name, folder / str(info.extracted)
    if archive.is_file() or not extracted.is_dir():
        fetch_files(info, folder, download)
        blobs = _read_cifar_members(archive, names)
        where = {n: f"{archive}:{n}" for n in names}
    else:
        absent = [n for n in names if not (folder / n).is_file()]
        if absent:
            raise FileNotFoundError(f"{extracted}: files {absent} are missing; expected {names}")
        blobs = {n: (folder / n).read_bytes() for n in names}
        where = {n: str(folder / n) for n in names}
    parts = [_parse_cifar_batch(blobs[n], where[n], label_key, info.num_classes) for n in names]
    train, test = parts[: len(train_names)], parts[len(train_names) :]
    x_train, y_train = (torch.cat(t) for t in zip(*train, strict=True))
    x_test, y_test = (torch.cat(t) for t in zip(*test, strict=True))
    if (len(x_train), len(x_test)) != (info.num_train, info.num_test):
        raise ValueError(
            f"{folder}: {len(x_train)} training and {len(x_test)} test images, expected "
            f"{info.num_train} and {info.num_test}"
        )
    return RawData(x_train, y_train, x_test, y_test)


def _fixed_test_split(x: Tensor, y: Tensor, info: DatasetInfo) -> RawData:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(_FIXED_SPLIT_SEED))
    test, train = order[: info.num_test], order[info.num_test :]
    return RawData(x[train], y[train], x[test], y[test])


def _read_diabetes(info: DatasetInfo, folder: Path, download: bool) -> RawData:
    try:
        from sklearn.datasets import load_diabetes
    except ImportError as err:
        raise ImportError(
            "dataset 'diabetes' is read from the copy bundled with scikit-learn, which is not "
            "installed: pip install scikit-learn"
        ) from err
    x, y = load_diabetes(return_X_y=True, scaled=False)
    x, y = torch.from_numpy(x), torch.from_numpy(y).unsqueeze(1)  # (442, 10), (442, 1)
    if len(x) != info.num_train + info.num_test:
        raise ValueError(f"scikit-learn's diabetes data has {len(x)} rows, expected 442")
    return _fixed_test_split(x, y, info)


def _make_poisson_glm(info: DatasetInfo, folder: Path, download: bool) -> RawData:
    """Counts y ~ Poisson(exp(x . w + b)), x ~ N(0, I), w and every draw from a fixed seed."""
    g = torch.Generator().manual_seed(_GLM_SEED)
    n, (features,) = info.num_train + info.num_test, info.input_shape
    w = _GLM_WEIGHT_SCALE * torch.randn(features, 1, generator=g, dtype=torch.float64)
    x = torch.randn(n, features, generator=g, dtype=torch.float64)
    y = torch.poisson((x @ w + _GLM_BIAS).exp(), generator=g)  # (n, 1)
    return _fixed_test_split(x, y, info)


_READERS: dict[str, Callable[[DatasetInfo, Path, bool], RawData]] = {
    "fashion-mnist": _read_idx_dataset,
    "mnist": _read_idx_dataset,
    "cifar10": _read_cifar,
    "cifar100": _read_cifar,
    "diabetes": _read_diabetes,
    "poisson-glm": _make_poisson_glm,
}


def load_raw(
    name: str, *, data_dir: str | os.PathLike[str] | None = None, download: bool = True
) -> RawData:
    """Dataset `name` as stored (CPU tensors, not normalised, training pool not yet split).

    Files are taken from `<resolve_data_dir(data_dir)>/<info.folder>/`, downloaded there when
    missing (unless `download=False`) and MD5-checked. Raises `FileNotFoundError` listing the
    files, their MD5s and URLs when they are missing and cannot be fetched; `ChecksumError`
    naming the file and the expected MD5 when one is corrupt; `ValueError` when a file's
    contents do not have the documented format.
    """
    info = dataset_info(name)
    folder = resolve_data_dir(data_dir) / (info.folder or "")
    return _READERS[name](info, folder, download)
