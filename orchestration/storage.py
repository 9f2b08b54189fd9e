"""Ray Tune's experiment storage on a local folder, with every file written atomically.

Tune copies its experiment state (and each checkpoint) from a staging folder into the
storage folder in a background thread, file by file, in place. A driver killed during one
of those copies leaves a truncated ``experiment_state-*.json`` that ``Tuner.restore`` cannot
read, and with a checkpoint every epoch such copies are frequent. Here each file is
written under a temporary name and renamed into place when complete, so the storage
folder only ever holds whole files: the previous version or the new one.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

__all__ = ["atomic_local_filesystem", "drop_corrupt_checkpoint", "linked_checkpoint"]


class _RenameOnClose(io.RawIOBase):
    """A binary file that appears at ``path`` only once closed, and only if every write
    succeeded (a failed one leaves ``path`` as it was and no temporary file)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed in close())
        self._failed = False

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        try:
            return self._file.write(data)
        except BaseException:  # e.g. a full disk: the file stays the previous version
            self._failed = True
            raise

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        if not self.closed:
            try:
                self._file.close()  # flushes: may fail too
            except OSError:
                self._failed = True
                raise
            finally:
                if self._failed:
                    Path(self._tmp).unlink(missing_ok=True)
                else:
                    os.replace(self._tmp, self._path)
                super().close()


class _AtomicLocalHandler(pafs.FSSpecHandler):
    def __init__(self) -> None:
        super().__init__(LocalFileSystem(auto_mkdir=True))

    def open_output_stream(self, path: str, metadata: dict | None) -> pa.NativeFile:
        return pa.PythonFile(_RenameOnClose(path), mode="w")

    # Every instance is the same local filesystem. (The base class compares fsspec tokens,
    # which differ between threads; Tune persists checkpoints from the trial's thread, and
    # pyarrow only calls copy_file between equal filesystems: else it copies the bytes.)
    def __eq__(self, other: object) -> bool:
        return isinstance(other, _AtomicLocalHandler)

    def __hash__(self) -> int:
        return hash(_AtomicLocalHandler)

    def copy_file(self, src: str, dest: str) -> None:
        """A hard link where the filesystem allows one, else a copy; renamed into place.

        Tune copies each checkpoint folder into storage; a link costs nothing whatever the
        size (a trial's logits are 100 MB). Sharing the inode is safe as long as nothing
        rewrites the source in place: ``modloss.train.fit`` and this filesystem only ever
        replace files whole, so a linked checkpoint keeps the content it was taken with.
        """
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{dest}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            os.link(src, tmp)
        except OSError:  # another filesystem, or links unsupported
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)

    def __reduce__(self) -> tuple:  # Ray pickles the filesystem into the experiment
        return (_AtomicLocalHandler, ())


def atomic_local_filesystem() -> pafs.FileSystem:
    """A pyarrow filesystem over local paths whose writes are all-or-nothing. Copies within
    it (a checkpoint folder made with it, into storage on it) are hard links when possible."""
    return pafs.PyFileSystem(_AtomicLocalHandler())


def linked_checkpoint(folder: Path) -> Any:
    """A Tune checkpoint of ``folder`` on this filesystem, so that Tune hard links its files
    into the sweep's storage instead of copying them. Only for folders whose files are never
    rewritten in place once reported (``fit`` replaces its files whole; the analysis
    artifacts and a distributed trial's copied results are written once)."""
    from ray import tune

    return tune.Checkpoint(str(folder), filesystem=atomic_local_filesystem())


def drop_corrupt_checkpoint(folder: Path, runs: Sequence[Path] = (Path(),)) -> None:
    """A restored checkpoint folder with a checkpoint file that cannot be read is never
    used: it is emptied, with a warning naming the file, and the trial starts over from
    scratch (Tune keeps one checkpoint per trial, so there is no older one to fall back on).

    ``runs``: where ``fit``'s run folders are in ``folder`` (a pack's points, each in its
    subfolder; one unreadable point restarts them all, since a pack resumes together).
    Every checkpoint file is checked (``checkpoint.pt``, a module-parallel run's per-rank
    shards): each worker of a distributed run restores the whole folder, so every rank
    reaches the same decision without a collective, and ``fit`` never sees some ranks
    resume while others start over."""
    from modloss.files import PathError, load_checkpoint
    from modloss.names import CHECKPOINT_FILE, SHARD_CHECKPOINT_FILE

    for run in runs:
        shards = sorted((folder / run).glob(SHARD_CHECKPOINT_FILE.format(rank="*")))
        for path in [folder / run / CHECKPOINT_FILE, *shards]:
            try:
                if path.exists():
                    load_checkpoint(path)
            except PathError as err:
                warning = f"warning: {err}; this trial starts over from scratch"
                print(warning, file=sys.stderr, flush=True)
                shutil.rmtree(folder)
                folder.mkdir()
                return
