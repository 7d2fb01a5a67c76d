"""One atomic writer for every file the framework produces: a kill or a full disk never leaves half a file.

The content goes to a temp file in the destination's folder, is fsynced, renamed over the destination, and the
folder is fsynced so the rename itself survives a crash; on any failure the temp file is removed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """``with atomic_open(p, "w") as f: f.write(...)``: ``p`` appears whole, or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, **kw) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str, **kw) + "\n")


def atomic_savez(path: str | os.PathLike, **arrays) -> Path:
    import numpy as np

    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)
