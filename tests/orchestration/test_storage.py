"""The sweep's storage filesystem: whole-file writes, and checkpoints linked, not copied;
a restored checkpoint that cannot be read is never used."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from modloss.names import CHECKPOINT_FILE, SHARD_CHECKPOINT_FILE
from orchestration.storage import atomic_local_filesystem, drop_corrupt_checkpoint


def _replace(path: Path, data: bytes) -> None:  # how fit and Tune rewrite a file
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_a_written_file_appears_only_when_complete(tmp_path: Path) -> None:
    fs = atomic_local_filesystem()
    target = tmp_path / "state" / "experiment_state.json"
    stream = fs.open_output_stream(str(target))
    stream.write(b'{"half": ')
    assert not target.exists()  # a driver killed now leaves the previous version
    stream.write(b"1}")
    stream.close()
    assert target.read_bytes() == b'{"half": 1}'
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary left


_FAILING_WRITE = """
import resource, signal, sys
from orchestration.storage import atomic_local_filesystem

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, a write fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    with atomic_local_filesystem().open_output_stream(sys.argv[1]) as stream:  # closes
        stream.write(b"x" * 100_000)
except OSError as exc:
    print("refused:", exc)
"""


def test_a_failed_write_leaves_the_previous_file(tmp_path: Path) -> None:
    """A write that fails (here the OS refuses it: a file size limit, as a full disk
    does) leaves the previous complete file in place, and no temporary file."""
    import subprocess
    import sys

    target = tmp_path / "experiment_state.json"
    target.write_bytes(b'{"complete": true}')
    done = subprocess.run(
        [sys.executable, "-c", _FAILING_WRITE, str(target)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout  # the write did fail
    assert target.read_bytes() == b'{"complete": true}'
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_checkpoint_is_linked_into_storage_and_keeps_its_content(tmp_path: Path) -> None:
    fs = atomic_local_filesystem()
    source = tmp_path / "trial"
    source.mkdir()
    (source / "test_logits.pt").write_bytes(b"logits of epoch 3")
    (source / "checkpoint.pt").write_bytes(b"weights of epoch 3")
    storage = tmp_path / "storage" / "checkpoint_000002"
    pafs.copy_files(str(source), str(storage), source_filesystem=fs, destination_filesystem=fs)

    linked = storage / "test_logits.pt"
    assert linked.stat().st_ino == (source / "test_logits.pt").stat().st_ino  # no bytes copied
    _replace(source / "checkpoint.pt", b"weights of epoch 4")  # training goes on
    assert (storage / "checkpoint.pt").read_bytes() == b"weights of epoch 3"
    assert sorted(p.name for p in storage.iterdir()) == ["checkpoint.pt", "test_logits.pt"]


def test_a_checkpoint_is_copied_where_links_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: str, dst: str) -> None:
        raise OSError(18, "Invalid cross-device link")  # EXDEV: storage on another disk

    monkeypatch.setattr(os, "link", no_links)
    fs = atomic_local_filesystem()
    source = tmp_path / "trial"
    source.mkdir()
    (source / "results.json").write_bytes(b"{}")
    storage = tmp_path / "storage"
    pafs.copy_files(str(source), str(storage), source_filesystem=fs, destination_filesystem=fs)
    copied = storage / "results.json"
    assert copied.read_bytes() == b"{}"
    assert copied.stat().st_ino != (source / "results.json").stat().st_ino


def test_instances_from_any_thread_are_one_filesystem() -> None:
    # Tune persists checkpoints from the trial's thread with a filesystem unpickled in
    # another; pyarrow only calls copy_file (a link) between filesystems that are equal.
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(atomic_local_filesystem).result()
    assert atomic_local_filesystem().equals(other)


CORRUPT = {"truncated": lambda data: data[: len(data) // 2], "empty": lambda data: b""}


@pytest.mark.parametrize("damage", sorted(CORRUPT))
@pytest.mark.parametrize("damaged", [CHECKPOINT_FILE, SHARD_CHECKPOINT_FILE.format(rank=1)])
def test_a_restored_folder_with_a_corrupt_checkpoint_file_is_emptied(
    tmp_path: Path, capsys: pytest.CaptureFixture, damaged: str, damage: str
) -> None:
    # A module-parallel run restores every rank's shard on every rank: one bad shard
    # must make all ranks start over, not just its own.
    folder = tmp_path / "restored"
    folder.mkdir()
    names = [CHECKPOINT_FILE, *(SHARD_CHECKPOINT_FILE.format(rank=r) for r in (0, 1))]
    for name in names:
        torch.save({"epoch": 2, "model": {"w": torch.ones(3)}}, folder / name)
    (folder / "results.json").write_text("{}")
    path = folder / damaged
    path.write_bytes(CORRUPT[damage](path.read_bytes()))
    drop_corrupt_checkpoint(folder)
    assert folder.is_dir() and list(folder.iterdir()) == []  # nothing of it is used
    err = capsys.readouterr().err
    assert str(path) in err and "starts over from scratch" in err


def test_a_restored_folder_whose_checkpoints_read_is_kept(tmp_path: Path) -> None:
    folder = tmp_path / "restored"
    folder.mkdir()
    torch.save({"epoch": 2}, folder / SHARD_CHECKPOINT_FILE.format(rank=0))
    (folder / "results.json").write_text("{}")
    drop_corrupt_checkpoint(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint-rank0.pt",
        "results.json",
    ]
