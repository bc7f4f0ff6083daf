"""Atomic file replacement: a reader sees the old file or the whole new one, never a part.

Every file comp-mer writes for others to read (the feature store and its journal, checkpoints, metrics.json,
reports, manifests, failure lists, converted model weights) goes through here: the content is written to a
hidden temp file beside the target, flushed to disk, and renamed over it (POSIX rename is atomic within one
file system); a failure or an interrupt removes the temp file and leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (no-op where directories cannot be opened, e.g. Windows)."""
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


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` for the caller (or a library such as h5py) to write; on a clean exit
    the file is fsynced and renamed over `path`. The temp name starts with "." and ends in ".tmp", so globs
    for the target's suffix do not see it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """`open(path, mode, **kwargs)` whose content replaces `path` only when the block exits cleanly.
    `mode` is "w" (text; pass encoding/newline as for open) or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def write_text(path: str | Path, text: str) -> Path:
    """Replace `path` atomically with `text` (UTF-8)."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)
