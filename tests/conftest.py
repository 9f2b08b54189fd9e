"""Shared fixtures: the real dataset directory, and an MD5 cache kept out of the user's home."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import modloss.data._files

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """$MODLOSS_DATA_DIR, else `<repo>/../shared/data`; fails (never skips) when the real
    Fashion-MNIST files are not there, since the smoke tests are meaningless without them."""
    root = Path(os.environ.get("MODLOSS_DATA_DIR") or REPO.parent / "shared" / "data")
    folder = root / "fashion-mnist"
    if not folder.is_dir():
        pytest.fail(
            f"real Fashion-MNIST not found at {folder}: set MODLOSS_DATA_DIR to a directory "
            "holding fashion-mnist/*.gz (see ../shared/data/README.md)"
        )
    return root


@pytest.fixture(scope="session", autouse=True)
def _md5_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests record verified MD5s in a temporary file rather than the user's cache folder."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("md5-cache") / "verified-md5.json"
        mp.setattr(modloss.data._files, "MD5_CACHE_FILE", path)
        yield
