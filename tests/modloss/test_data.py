"""modloss.data: readers against real Fashion-MNIST and hand-written files in the real CIFAR
formats, checksums, downloads from a local server, splits, normalisation, the loader and the
augmentation."""

import dataclasses
import functools
import gzip
import hashlib
import io
import os
import pickle
import socket
import struct
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import modloss.data._files as files_module
from modloss.data import (
    DATASETS,
    ChecksumError,
    DeviceLoader,
    FileSpec,
    holdout_split,
    load_raw,
    load_splits,
    random_crop_flip,
    resolve_data_dir,
)

# --------------------------------------------------------------------------- real Fashion-MNIST


@pytest.fixture(scope="session")
def fmnist_raw(data_dir: Path):
    return load_raw("fashion-mnist", data_dir=data_dir, download=False)


@pytest.fixture(scope="session")
def fmnist(data_dir: Path):
    return load_splits("fashion-mnist", data_dir=data_dir, trial=0, download=False)


def test_fashion_mnist_raw_has_published_counts(fmnist_raw) -> None:
    assert fmnist_raw.x_train.shape == (60_000, 1, 28, 28)
    assert fmnist_raw.x_test.shape == (10_000, 1, 28, 28)
    assert fmnist_raw.x_train.dtype == torch.uint8
    assert torch.equal(torch.bincount(fmnist_raw.y_train), torch.full((10,), 6_000))
    assert torch.equal(torch.bincount(fmnist_raw.y_test), torch.full((10,), 1_000))
    # Real images: dark background with bright garments, not a constant or a misread header.
    assert fmnist_raw.x_train[:, :, 0, 0].float().mean() < 5
    assert fmnist_raw.x_train.max() == 255


def test_fashion_mnist_splits_shapes_and_types(fmnist) -> None:
    assert fmnist.train.x.shape == (50_000, 1, 28, 28)
    assert fmnist.val.x.shape == (10_000, 1, 28, 28)
    assert fmnist.test.x.shape == (10_000, 1, 28, 28)
    for part in (fmnist.train, fmnist.val, fmnist.test):
        assert part.x.dtype == torch.float32
        assert part.y.dtype == torch.int64
        assert part.y.min() >= 0 and part.y.max() <= 9
    assert fmnist.info.input_shape == (1, 28, 28) and fmnist.info.num_classes == 10
    assert fmnist.info.family == "categorical"


def test_normalisation_statistics_come_from_the_training_split_only(fmnist, fmnist_raw) -> None:
    std, mean = torch.std_mean(fmnist.train.x, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, torch.zeros(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(std, torch.ones(1), atol=1e-4, rtol=0)

    pool = fmnist_raw.x_train.double() / 255
    train_mean = pool[fmnist.train_index].mean()
    with_val_mean = pool.mean()  # what a leak of the validation images would give
    assert abs(train_mean - with_val_mean) > 1e-4  # the check below can tell them apart
    assert abs(fmnist.x_mean.double().item() - train_mean) < 1e-6
    assert abs(fmnist.x_std.double().item() - pool[fmnist.train_index].std(correction=0)) < 1e-6

    # val and test went through the same transform, with the training statistics.
    expected_val = (pool[fmnist.val_index] - fmnist.x_mean.double()) / fmnist.x_std.double()
    torch.testing.assert_close(fmnist.val.x.double(), expected_val, atol=1e-5, rtol=0)
    expected_test = (fmnist_raw.x_test.double() / 255 - fmnist.x_mean.double()) / fmnist.x_std
    torch.testing.assert_close(fmnist.test.x.double(), expected_test, atol=1e-5, rtol=0)
    assert torch.equal(fmnist.train.y, fmnist_raw.y_train[fmnist.train_index])


def test_validation_split_is_seeded_by_trial_and_disjoint(fmnist) -> None:
    train0, val0 = holdout_split(60_000, 10_000, trial=0)
    again_train0, again_val0 = holdout_split(60_000, 10_000, trial=0)
    _, val1 = holdout_split(60_000, 10_000, trial=1)
    assert torch.equal(val0, again_val0) and torch.equal(train0, again_train0)
    assert not torch.equal(val0.sort().values, val1.sort().values)
    assert len(set(val0.tolist()) & set(val1.tolist())) < 3_000  # ~1/6 overlap expected
    assert not set(train0.tolist()) & set(val0.tolist())
    assert sorted(train0.tolist() + val0.tolist()) == list(range(60_000))
    assert torch.equal(fmnist.train_index, train0) and torch.equal(fmnist.val_index, val0)


def test_subset_takes_prefixes_of_the_shuffled_splits(data_dir: Path, fmnist) -> None:
    small = load_splits("fashion-mnist", data_dir=data_dir, subset=500, download=False)
    assert len(small.train.x) == len(small.val.x) == len(small.test.x) == 500
    assert torch.equal(small.train_index, fmnist.train_index[:500])
    assert torch.equal(small.val_index, fmnist.val_index[:500])
    assert torch.equal(small.test.y, fmnist.test.y[:500])
    # The subset is normalised with its own training statistics, as a real run on it would be.
    torch.testing.assert_close(small.train.x.mean(), torch.tensor(0.0), atol=1e-4, rtol=0)


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="'svhn'.*cifar10"):
        load_splits("svhn")
    with pytest.raises(ValueError, match="val_size=60000"):
        load_splits("fashion-mnist", val_size=60_000)
    with pytest.raises(ValueError, match="subset=0"):
        load_splits("fashion-mnist", subset=0)


def test_data_dir_resolution_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODLOSS_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("MODLOSS_DATA_DIR")
    assert resolve_data_dir().name == "datasets" and "modloss" in str(resolve_data_dir())


# --------------------------------------------------------------------------- MD5 cache


def test_md5_is_hashed_once_per_file_version(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"x" * 1000)
    monkeypatch.setattr(files_module, "MD5_CACHE_FILE", tmp_path / "md5.json")
    monkeypatch.setattr(files_module, "_md5_memo", {})
    calls: list[Path] = []
    real_hash = files_module._hash_file
    monkeypatch.setattr(files_module, "_hash_file", lambda p: calls.append(p) or real_hash(p))

    expected = hashlib.md5(b"x" * 1000).hexdigest()
    assert files_module._file_md5(path) == expected
    assert files_module._file_md5(path) == expected
    monkeypatch.setattr(files_module, "_md5_memo", {})  # a new process: only the sidecar file
    assert files_module._file_md5(path) == expected
    assert len(calls) == 1

    path.write_bytes(b"y" * 1000)  # same size, new contents and mtime
    os.utime(path, ns=(1, 1))
    assert files_module._file_md5(path) == hashlib.md5(b"y" * 1000).hexdigest()
    assert len(calls) == 2


# --------------------------------------------------------------------------- fake Fashion-MNIST

FAKE_TRAIN, FAKE_TEST = 12, 5


def _idx_gz(magic: int, array: np.ndarray) -> bytes:
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def _fake_fashion_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", FAKE_TRAIN), ("t10k", FAKE_TEST)):
        out[f"{split}-images-idx3-ubyte.gz"] = _idx_gz(2051, rng.integers(0, 256, (n, 28, 28)))
        out[f"{split}-labels-idx1-ubyte.gz"] = _idx_gz(2049, np.arange(n) % 10)
    return out


def _specs(blobs: dict[str, bytes]) -> tuple[FileSpec, ...]:
    return tuple(FileSpec(n, hashlib.md5(b).hexdigest(), len(b)) for n, b in blobs.items())


def _patch_dataset(monkeypatch: pytest.MonkeyPatch, name: str, **changes: object) -> None:
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(DATASETS[name], **changes))


@pytest.fixture
def fake_fashion(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Small files in the real format, registered as Fashion-MNIST's published files."""
    blobs = _fake_fashion_files()
    _patch_dataset(
        monkeypatch,
        "fashion-mnist",
        files=_specs(blobs),
        num_train=FAKE_TRAIN,
        num_test=FAKE_TEST,
        default_val_size=2,
    )
    return blobs


def _write(folder: Path, blobs: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1, and its base URL."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    root = tmp_path / "served"
    root.mkdir()
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_missing_files_are_downloaded_and_verified(
    fake_fashion: dict[str, bytes],
    http_root: tuple[Path, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    served, url = http_root
    _write(served, fake_fashion)
    _patch_dataset(monkeypatch, "fashion-mnist", base_url=url)
    data_dir = tmp_path / "data"
    raw = load_raw("fashion-mnist", data_dir=data_dir)
    folder = data_dir / "fashion-mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(fake_fashion)  # no .part left
    assert all((folder / n).read_bytes() == b for n, b in fake_fashion.items())
    assert raw.x_train.shape == (FAKE_TRAIN, 1, 28, 28)
    assert torch.equal(raw.y_test, torch.arange(FAKE_TEST) % 10)


def test_download_with_wrong_md5_leaves_nothing_behind(
    fake_fashion: dict[str, bytes],
    http_root: tuple[Path, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    served, url = http_root
    _write(served, {**fake_fashion, "t10k-labels-idx1-ubyte.gz": b"not the published file"})
    _patch_dataset(monkeypatch, "fashion-mnist", base_url=url)
    expected = DATASETS["fashion-mnist"].files[3].md5
    with pytest.raises(ChecksumError, match=f"t10k-labels-idx1-ubyte.gz.*expected {expected}"):
        load_raw("fashion-mnist", data_dir=tmp_path / "data")
    assert not (tmp_path / "data" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list((tmp_path / "data" / "fashion-mnist").glob("*.part"))


def test_offline_error_lists_files_md5s_and_destination(
    fake_fashion: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    _patch_dataset(monkeypatch, "fashion-mnist", base_url=f"http://127.0.0.1:{port}/")
    present = "train-labels-idx1-ubyte.gz"
    _write(tmp_path / "fashion-mnist", {present: fake_fashion[present]})
    with pytest.raises(FileNotFoundError) as err:
        load_raw("fashion-mnist", data_dir=tmp_path)
    message = str(err.value)
    assert str(tmp_path / "fashion-mnist") in message and "MODLOSS_DATA_DIR" in message
    for spec in DATASETS["fashion-mnist"].files:
        assert (spec.name in message) == (spec.name != present)
        assert (spec.md5 in message) == (spec.name != present)


def test_download_false_lists_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="8d4fb7e6c68d591d4c3dfef9ec88bf0d"):
        load_raw("fashion-mnist", data_dir=tmp_path, download=False)


def test_truncated_gzip_names_the_file_and_expected_checksum(
    fake_fashion: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    name = "train-images-idx3-ubyte.gz"
    truncated = fake_fashion[name][: len(fake_fashion[name]) // 2]
    _write(tmp_path / "fashion-mnist", {**fake_fashion, name: truncated})
    expected = hashlib.md5(fake_fashion[name]).hexdigest()
    with pytest.raises(ChecksumError, match=f"{name}: MD5 .* expected MD5 {expected}"):
        load_raw("fashion-mnist", data_dir=tmp_path, download=False)

    # Even a file whose checksum matches (a wrong table, say) is refused with a clear message.
    files = tuple(
        FileSpec(s.name, hashlib.md5(truncated).hexdigest(), len(truncated))
        if s.name == name
        else s
        for s in DATASETS["fashion-mnist"].files
    )
    _patch_dataset(monkeypatch, "fashion-mnist", files=files)
    with pytest.raises(ValueError, match=f"{name}: not a complete gzip file"):
        load_raw("fashion-mnist", data_dir=tmp_path, download=False)


def test_idx_header_mismatch_is_reported(
    fake_fashion: dict[str, bytes], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    name = "t10k-labels-idx1-ubyte.gz"
    wrong = _idx_gz(2051, np.zeros(FAKE_TEST))  # an image magic number in a label file
    blobs = {**fake_fashion, name: wrong}
    _patch_dataset(monkeypatch, "fashion-mnist", files=_specs(blobs))
    _write(tmp_path / "fashion-mnist", blobs)
    with pytest.raises(ValueError, match=rf"{name}: IDX header \(2051, 5\).*\(2049, 5\)"):
        load_raw("fashion-mnist", data_dir=tmp_path, download=False)


# --------------------------------------------------------------------------- fake CIFAR


def _cifar_batch(rng: np.random.Generator, n: int, label_keys: dict[bytes, int]) -> bytes:
    batch: dict[bytes, object] = {
        b"batch_label": b"fake batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [b"img.png"] * n,
    }
    for key, classes in label_keys.items():
        batch[key] = rng.integers(0, classes, n).tolist()
    return pickle.dumps(batch, protocol=2)


def _fake_cifar(name: str) -> dict[str, bytes]:
    """Member path (with the real top folder) -> pickled batch, as in the real archives."""
    rng = np.random.default_rng(1)
    if name == "cifar10":
        keys = {b"labels": 10}
        members = {f"data_batch_{i}": 6 for i in range(1, 6)} | {"test_batch": 8}
        top, meta = "cifar-10-batches-py", "batches.meta"
    else:
        keys = {b"fine_labels": 100, b"coarse_labels": 20}
        members = {"train": 30, "test": 8}
        top, meta = "cifar-100-python", "meta"
    blobs = {f"{top}/{m}": _cifar_batch(rng, n, keys) for m, n in members.items()}
    blobs[f"{top}/{meta}"] = pickle.dumps({b"label_names": []}, protocol=2)
    return blobs


def _tar_gz(blobs: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def _fake_cifar_archive(
    name: str, monkeypatch: pytest.MonkeyPatch, folder: Path
) -> dict[str, bytes]:
    blobs = _fake_cifar(name)
    archive = _tar_gz(blobs)
    filename = DATASETS[name].files[0].name
    (folder / DATASETS[name].folder).mkdir(parents=True)
    (folder / DATASETS[name].folder / filename).write_bytes(archive)
    spec = FileSpec(filename, hashlib.md5(archive).hexdigest(), len(archive))
    _patch_dataset(monkeypatch, name, files=(spec,), num_train=30, num_test=8, default_val_size=6)
    return blobs


def _unpickle(blob: bytes) -> dict:
    return pickle.loads(blob, encoding="bytes")


def test_cifar10_archive_is_read_in_batch_order_with_channel_planes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    blobs = _fake_cifar_archive("cifar10", monkeypatch, tmp_path)
    raw = load_raw("cifar10", data_dir=tmp_path, download=False)
    batches = [_unpickle(blobs[f"cifar-10-batches-py/data_batch_{i}"]) for i in range(1, 6)]
    data = np.concatenate([b[b"data"] for b in batches])
    assert raw.x_train.shape == (30, 3, 32, 32) and raw.x_train.dtype == torch.uint8
    # Row layout: 1024 red, 1024 green, 1024 blue values, each plane row-major.
    i, c, r, col = 13, 2, 5, 7
    assert raw.x_train[i, c, r, col] == data[i, c * 1024 + r * 32 + col]
    assert raw.y_train.tolist() == sum((b[b"labels"] for b in batches), [])
    assert raw.y_test.tolist() == _unpickle(blobs["cifar-10-batches-py/test_batch"])[b"labels"]


def test_cifar100_uses_fine_labels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blobs = _fake_cifar_archive("cifar100", monkeypatch, tmp_path)
    raw = load_raw("cifar100", data_dir=tmp_path, download=False)
    train = _unpickle(blobs["cifar-100-python/train"])
    assert raw.y_train.tolist() == train[b"fine_labels"] != train[b"coarse_labels"]
    assert torch.equal(raw.x_train.reshape(30, -1), torch.from_numpy(train[b"data"]))
    assert raw.y_test.tolist() == _unpickle(blobs["cifar-100-python/test"])[b"fine_labels"]


def test_cifar_archive_with_wrong_md5_names_file_and_checksum(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_cifar_archive("cifar10", monkeypatch, tmp_path)
    _patch_dataset(
        monkeypatch, "cifar10", files=(DATASETS["cifar10"].files[0]._replace(md5="0" * 32),)
    )
    with pytest.raises(
        ChecksumError, match=f"cifar-10-python.tar.gz: MD5 .*expected MD5 {'0' * 32}"
    ):
        load_raw("cifar10", data_dir=tmp_path, download=False)


def test_cifar_splits_are_normalised_per_channel(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _fake_cifar_archive("cifar10", monkeypatch, tmp_path)
    splits = load_splits("cifar10", data_dir=tmp_path, trial=3, download=False)
    assert splits.train.x.shape == (24, 3, 32, 32) and splits.val.x.shape == (6, 3, 32, 32)
    std, mean = torch.std_mean(splits.train.x, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(3), atol=1e-5, rtol=0)
    assert splits.x_mean.shape == (3,)


def _extract(blobs: dict[str, bytes], folder: Path) -> None:
    for name, blob in blobs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(blob)


def test_cifar_extracted_folder_is_read_and_validated(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _patch_dataset(monkeypatch, "cifar100", num_train=30, num_test=8)
    folder = tmp_path / "cifar100"
    blobs = _fake_cifar("cifar100")
    _extract(blobs, folder)
    raw = load_raw("cifar100", data_dir=tmp_path, download=False)
    assert raw.x_train.shape == (30, 3, 32, 32) and raw.x_test.shape == (8, 3, 32, 32)

    bad = _unpickle(blobs["cifar-100-python/test"])
    bad[b"data"] = bad[b"data"][:, :3000]
    (folder / "cifar-100-python/test").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(ValueError, match=r"cifar-100-python/test: data \(8, 3000\)"):
        load_raw("cifar100", data_dir=tmp_path, download=False)

    (folder / "cifar-100-python/test").unlink()
    with pytest.raises(FileNotFoundError, match="cifar-100-python/test"):
        load_raw("cifar100", data_dir=tmp_path, download=False)


def test_cifar_extracted_folder_with_wrong_totals_or_code_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _patch_dataset(monkeypatch, "cifar10", num_train=31, num_test=8)
    _extract(_fake_cifar("cifar10"), tmp_path / "cifar10")
    with pytest.raises(ValueError, match="30 training and 8 test images, expected 31 and 8"):
        load_raw("cifar10", data_dir=tmp_path, download=False)

    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, ("echo pwned",))

    batch = tmp_path / "cifar10/cifar-10-batches-py/test_batch"
    batch.write_bytes(pickle.dumps({b"data": Exploit()}, protocol=2))
    with pytest.raises(ValueError, match="test_batch: not a CIFAR batch.*refusing global"):
        load_raw("cifar10", data_dir=tmp_path, download=False)


# --------------------------------------------------------------------------- tabular datasets


def test_diabetes_is_standardised_gaussian_data() -> None:
    splits = load_splits("diabetes", trial=0)
    other = load_splits("diabetes", trial=1)
    assert splits.info.family == "gaussian" and splits.info.input_shape == (10,)
    assert splits.train.x.shape == (300, 10) and splits.val.x.shape == (50, 10)
    assert splits.test.y.shape == (92, 1) and splits.train.y.dtype == torch.float32
    for tensor in (splits.train.x, splits.train.y):
        std, mean = torch.std_mean(tensor, dim=0, correction=0)
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
        torch.testing.assert_close(std, torch.ones_like(std), atol=1e-5, rtol=0)
    # The test split is fixed whatever the trial; the validation split is not.
    raw = load_raw("diabetes")
    assert splits.y_mean is not None and splits.y_std is not None
    torch.testing.assert_close(
        splits.test.y * splits.y_std + splits.y_mean, raw.y_test.float(), atol=1e-3, rtol=0
    )
    torch.testing.assert_close(other.test.y * other.y_std + other.y_mean, raw.y_test.float())
    assert not torch.equal(splits.val_index, other.val_index)


def test_poisson_glm_counts_are_fixed_and_learnable() -> None:
    first, second = load_raw("poisson-glm"), load_raw("poisson-glm")
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    splits = load_splits("poisson-glm")
    assert splits.info.family == "poisson" and splits.y_mean is None
    y = splits.train.y
    assert y.shape == (8_000, 1) and torch.equal(y, y.round()) and y.min() >= 0
    assert 1.0 < y.mean() < 5.0
    # The counts depend on the inputs: a linear fit of log(y + 1/2) on x generalises to test.
    x1 = torch.cat([splits.train.x, torch.ones(len(y), 1)], 1).double()
    w = torch.linalg.lstsq(x1, (y + 0.5).log().double()).solution
    pred = torch.cat([splits.test.x, torch.ones(len(splits.test.x), 1)], 1).double() @ w
    target = (splits.test.y + 0.5).log().double()
    assert torch.corrcoef(torch.cat([pred, target], 1).T)[0, 1] > 0.6


# --------------------------------------------------------------------------- DeviceLoader


def test_shuffled_epoch_covers_every_example_once() -> None:
    x, y = torch.arange(1_003).float().unsqueeze(1), torch.arange(1_003)
    loader = DeviceLoader(x, y, 100, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert len(loader) == 11
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert [len(b) for b, _ in batches] == [100] * 10 + [3]
        seen = torch.cat([b for _, b in batches])
        assert torch.equal(seen.sort().values, y)
        assert all(torch.equal(bx.squeeze(1).long(), by) for bx, by in batches)  # pairs kept
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1])


def test_shuffle_is_deterministic_given_the_generator() -> None:
    x, y = torch.randn(500, 3), torch.arange(500)

    def order(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.cat([b for _, b in DeviceLoader(x, y, 64, shuffle=True, generator=g)])

    assert torch.equal(order(7), order(7))
    assert not torch.equal(order(7), order(8))


def test_drop_last_and_unshuffled_order() -> None:
    x, y = torch.arange(250).float(), torch.arange(250)
    dropped = DeviceLoader(x, y, 100, shuffle=True, drop_last=True)
    assert len(dropped) == 2 and [len(b) for b, _ in dropped] == [100, 100]
    ordered = DeviceLoader(x, y, 100)
    assert torch.equal(torch.cat([b for _, b in ordered]), y)


def test_loader_applies_augmentation_with_its_generator() -> None:
    x = torch.arange(64).float().view(64, 1, 1, 1).expand(64, 2, 16, 16).contiguous()
    y = torch.arange(64)
    g = torch.Generator().manual_seed(0)
    loader = DeviceLoader(x, y, 16, shuffle=True, augment=random_crop_flip, generator=g)
    batches = list(loader)
    augmented = torch.cat([b for b, _ in batches])
    labels = torch.cat([b for _, b in batches])
    assert torch.equal(augmented[:, :, 8, 8], labels.float().unsqueeze(1).expand(64, 2))
    assert (augmented == 0).any()  # some crops shifted padding into view


def test_loader_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="x has 3 examples but y has 2"):
        DeviceLoader(torch.zeros(3), torch.zeros(2), 1)
    with pytest.raises(ValueError, match="batch_size=0"):
        DeviceLoader(torch.zeros(3), torch.zeros(3), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_and_augmentation_never_sync_the_host() -> None:
    x = torch.randn(1_000, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (1_000,), device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    loader = DeviceLoader(x, y, 100, shuffle=True, augment=random_crop_flip, generator=g)
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = list(loader)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(batches) == 10


# --------------------------------------------------------------------------- random_crop_flip


def _all_crops(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Slow reference: every pad-crop-flip of one (C, H, W) image."""
    _, h, w = image.shape
    padded = F.pad(image, (padding,) * 4)
    out = []
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out += [crop, crop.flip(-1)]
    return out


@pytest.mark.parametrize("padding", [0, 2, 4])
def test_random_crop_flip_matches_a_per_image_reference(padding: int) -> None:
    x = torch.rand(40, 3, 10, 12) + 0.5  # distinct positive values: matches are unambiguous
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=padding)
    assert out.shape == x.shape and out.dtype == x.dtype
    chosen = []
    for image, result in zip(x, out, strict=True):
        matches = [i for i, c in enumerate(_all_crops(image, padding)) if torch.equal(c, result)]
        assert len(matches) == 1
        chosen.append(matches[0])
    assert {i % 2 for i in chosen} == {0, 1}  # both flipped and unflipped images
    if padding:
        assert len({i // 2 for i in chosen}) > 5  # many different offsets


def test_random_crop_flip_pads_with_zeros_and_is_seeded() -> None:
    x = torch.ones(200, 1, 8, 8)
    out = random_crop_flip(x, torch.Generator().manual_seed(1), padding=4)
    assert set(out.unique().tolist()) == {0.0, 1.0}
    # Visible ones form an h x w rectangle with h, w in 4..8, touching two image borders.
    rows, cols = out[:, 0].amax(2).sum(1), out[:, 0].amax(1).sum(1)
    assert torch.equal(out[:, 0].sum((1, 2)), rows * cols) and rows.min() >= 4
    again = random_crop_flip(x, torch.Generator().manual_seed(1), padding=4)
    assert torch.equal(out, again)
    with pytest.raises(ValueError, match="expected \\(N, C, H, W\\)"):
        random_crop_flip(torch.ones(8, 8))
