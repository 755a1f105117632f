"""Files written whole or not at all: each goes to a temporary name beside its target, is
flushed to disk, then renamed into place, so a run interrupted at any point (and the rerun
that resumes it) finds either the previous file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
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
