"""Files written whole or not at all: each goes to a temporary name beside its target, is
flushed to disk, then renamed into place, so a run interrupted at any point (and the rerun
that resumes it) finds either the previous file or the new one, never half of one. And one
writer at a time where two would undo each other (:func:`exclusive`)."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np


@contextmanager
def replaced_whole(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content into; it replaces ``path`` on success."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def save_npz_whole(path: str | Path, compressed: bool = False, **arrays) -> Path:
    with replaced_whole(path) as fh:
        (np.savez_compressed if compressed else np.savez)(fh, **arrays)
    return Path(path)


def write_json_whole(path: str | Path, obj, indent: int | None = 2) -> Path:
    with replaced_whole(path) as fh:
        fh.write(json.dumps(obj, indent=indent, default=str).encode())
    return Path(path)


class Busy(RuntimeError):
    """Another process holds the lock; ``holder`` is what it wrote there (its pid and host)."""

    def __init__(self, lock_path: Path, holder: str):
        super().__init__(f"{lock_path} is held by {holder or 'another process'}")
        self.lock_path, self.holder = lock_path, holder


@contextmanager
def exclusive(lock_path: str | Path, refuse: Callable[[Busy], Exception] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if absent) for the block, or raise at once
    :class:`Busy` (or what ``refuse`` makes of it: the caller's own error). The lock goes with its
    process, so a killed one leaves nothing to clear."""
    import socket

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            busy = Busy(lock_path, fh.read().strip())
            raise (refuse(busy) if refuse else busy) from None
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
            fh.flush()
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
