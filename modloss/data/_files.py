"""The dataset catalogue and getting its files onto disk, downloaded and MD5-checked."""

import dataclasses
import hashlib
import http.client
import json
import os
import urllib.request
from pathlib import Path
from typing import Literal, NamedTuple

import platformdirs

Family = Literal["categorical", "gaussian", "poisson"]

DATA_DIR_ENV = "MODLOSS_DATA_DIR"
DOWNLOAD_TIMEOUT_S = 60.0
# Verified digests survive the process, so that every Ray trial does not re-hash 170 MB.
MD5_CACHE_FILE: Path | None = platformdirs.user_cache_path("modloss") / "verified-md5.json"


class FileSpec(NamedTuple):
    """One published file: `name` relative to the dataset folder, its MD5 and size in bytes."""

    name: str
    md5: str
    size: int


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is and where its files come from.

    `num_classes` is K: the number of classes, or of regression outputs. `num_train` is the
    training pool before the validation hold-out. Files are fetched from `base_url + name`
    into `<data dir>/<folder>/`; replace an entry of `DATASETS` (`dataclasses.replace`) to
    use a mirror. `extracted` names the folder an archive unpacks to, accepted in its place.
    Datasets without `files` are built in memory and ignore the data directory.
    """

    name: str
    family: Family
    num_classes: int
    input_shape: tuple[int, ...]
    num_train: int
    num_test: int
    default_val_size: int
    files: tuple[FileSpec, ...] = ()
    base_url: str | None = None
    folder: str | None = None
    extracted: str | None = None


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        family="categorical",
        num_classes=10,
        input_shape=(1, 28, 28),
        num_train=60_000,
        num_test=10_000,
        default_val_size=10_000,
        files=(
            FileSpec("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", 26_421_880),
            FileSpec("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", 29_515),
            FileSpec("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", 4_422_102),
            FileSpec("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", 5_148),
        ),
        base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        folder="fashion-mnist",
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        family="categorical",
        num_classes=10,
        input_shape=(3, 32, 32),
        num_train=50_000,
        num_test=10_000,
        default_val_size=10_000,
        files=(
            FileSpec("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", 170_498_071),
        ),
        base_url="https://www.cs.toronto.edu/~kriz/",
        folder="cifar10",
        extracted="cifar-10-batches-py",
    ),
    "cifar100": DatasetInfo(
        name="cifar100",
        family="categorical",
        num_classes=100,
        input_shape=(3, 32, 32),
        num_train=50_000,
        num_test=10_000,
        default_val_size=10_000,
        files=(
            FileSpec("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", 169_001_437),
        ),
        base_url="https://www.cs.toronto.edu/~kriz/",
        folder="cifar100",
        extracted="cifar-100-python",
    ),
    # 442 patients: a fixed 92 for test, then 50 of the remaining 350 held out per trial.
    "diabetes": DatasetInfo(
        name="diabetes",
        family="gaussian",
        num_classes=1,
        input_shape=(10,),
        num_train=350,
        num_test=92,
        default_val_size=50,
    ),
    "poisson-glm": DatasetInfo(
        name="poisson-glm",
        family="poisson",
        num_classes=1,
        input_shape=(20,),
        num_train=10_000,
        num_test=5_000,
        default_val_size=2_000,
    ),
    # The in-distribution data's usual out-of-distribution pair (MNIST vs Fashion-MNIST).
    "mnist": DatasetInfo(
        name="mnist",
        family="categorical",
        num_classes=10,
        input_shape=(1, 28, 28),
        num_train=60_000,
        num_test=10_000,
        default_val_size=10_000,
        files=(
            FileSpec("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 9_912_422),
            FileSpec("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 28_881),
            FileSpec("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 1_648_877),
            FileSpec("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 4_542),
        ),
        base_url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        folder="mnist",
    ),
}


class ChecksumError(ValueError):
    """A dataset file whose MD5 differs from the published one."""


def dataset_info(name: str) -> DatasetInfo:
    """`DATASETS[name]`, with an error listing the known names."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: `data_dir`, else $MODLOSS_DATA_DIR, else a per-user cache folder."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    return platformdirs.user_cache_path("modloss") / "datasets"


_md5_memo: dict[str, str] = {}


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _load_md5_cache() -> dict[str, str]:
    if MD5_CACHE_FILE is None:
        return {}
    try:
        cache = json.loads(MD5_CACHE_FILE.read_text())
    except (OSError, ValueError):
        return {}  # absent or half-written by a crashed process: re-hashing is the fallback
    return cache if isinstance(cache, dict) else {}


def _still_current(key: str) -> bool:
    path = Path(key.rsplit("|", 2)[0])
    try:
        return _stat_key(path) == key
    except OSError:
        return False


def _remember_md5(path: Path, digest: str) -> None:
    key = _stat_key(path)
    _md5_memo[key] = digest
    if MD5_CACHE_FILE is None:
        return
    # Entries of replaced or deleted files are dropped so the file stays a few lines long.
    cache = {k: v for k, v in _load_md5_cache().items() if _still_current(k)}
    cache[key] = digest
    tmp = MD5_CACHE_FILE.with_name(f"{MD5_CACHE_FILE.name}.{os.getpid()}.tmp")
    try:
        MD5_CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(cache, indent=0))
        os.replace(tmp, MD5_CACHE_FILE)
    except OSError:
        tmp.unlink(missing_ok=True)  # a read-only home only costs a re-hash next time


def _hash_file(path: Path) -> str:
    md5 = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
    return md5.hexdigest()


def _file_md5(path: Path) -> str:
    """MD5 of `path`, remembered by (path, size, mtime) in-process and in `MD5_CACHE_FILE`."""
    key = _stat_key(path)
    digest = _md5_memo.get(key) or _load_md5_cache().get(key)
    if digest is None:
        digest = _hash_file(path)
        _remember_md5(path, digest)
    else:
        _md5_memo[key] = digest
    return digest


def _verify(path: Path, spec: FileSpec) -> None:
    digest = _file_md5(path)
    if digest != spec.md5:
        size = path.stat().st_size
        raise ChecksumError(
            f"{path}: MD5 {digest} ({size:,} bytes), expected MD5 {spec.md5} ({spec.size:,} "
            "bytes); the file is corrupt or truncated: delete it to download it again"
        )


def _download(url: str, dest: Path, spec: FileSpec) -> None:
    # A per-process temporary name: concurrent trials may fetch the same file.
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    md5 = hashlib.md5()
    try:
        with (
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
            part.open("wb") as out,
        ):
            while chunk := response.read(1 << 20):
                md5.update(chunk)
                out.write(chunk)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if md5.hexdigest() != spec.md5:
        part.unlink()
        raise ChecksumError(f"download of {url} has MD5 {md5.hexdigest()}, expected {spec.md5}")
    os.replace(part, dest)
    _remember_md5(dest, spec.md5)


def _missing_message(info: DatasetInfo, folder: Path, missing: list[FileSpec], why: str) -> str:
    lines = [
        f"dataset {info.name!r}: {len(missing)} file(s) missing from {folder} ({why}).",
        f"Put these files there (or set {DATA_DIR_ENV} / data_dir to a directory holding "
        f"{info.folder}/):",
    ]
    lines += [
        f"  {s.name}  {s.size:,} bytes  MD5 {s.md5}  from {info.base_url}{s.name}" for s in missing
    ]
    if info.extracted is not None:
        lines.append(f"  (or, instead of the archive, its extracted folder {info.extracted}/)")
    return "\n".join(lines)


def fetch_files(info: DatasetInfo, folder: Path, download: bool) -> None:
    """Make every file of `info` present in `folder` (downloading what is missing) and verified."""
    missing = [s for s in info.files if not (folder / s.name).is_file()]
    if missing and not download:
        raise FileNotFoundError(_missing_message(info, folder, missing, "download=False"))
    for spec in missing:
        url = f"{info.base_url}{spec.name}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _download(url, folder / spec.name, spec)
        except (OSError, http.client.HTTPException) as err:  # URLError is an OSError
            left = [s for s in info.files if not (folder / s.name).is_file()]
            why = f"download from {url} failed: {err}"
            raise FileNotFoundError(_missing_message(info, folder, left, why)) from err
    for spec in info.files:
        _verify(folder / spec.name, spec)
