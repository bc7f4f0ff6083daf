"""Dataset recipes: a dataset tree in its published layout → a manifest CSV that `comp-extract --manifest` reads.

A recipe knows one dataset's layout (file-name codes, label files, folders) and turns it into `ManifestRow`s:
the media path relative to the dataset root, a unique id, the label (or regression value), the speaker, the
conversation and position, the official split or folds, and informational `meta_*` columns that comp-extract
passes over (e.g. RAVDESS intensity). Recipes never decode media; they only read names and label files.

Each recipe returns a `Prepared`: the rows, plus the rows it could not use and why (a media file absent from
the tree is listed, not fatal). A tree that is not the dataset at all raises `PrepareError` with one sentence
naming what is missing.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.atomic import atomic_open
from core.errors import CompError

MANIFEST_COLUMNS = ("path", "audio_path", "start", "end", "crop", "id", "label", "value", "conversation",
                    "position", "speaker", "split", "fold")
META_PREFIX = "meta_"  # informational columns: kept in the manifest, not read by comp-extract


class PrepareError(CompError, ValueError):
    """The tree is not the dataset the recipe expects; the message names what is missing."""


@dataclass(frozen=True)
class ManifestRow:
    """One clip of a manifest. `start`/`end` (seconds) cut a segment out of a longer file; NaN = whole file."""

    path: str  # relative to the dataset root, "/" separators
    id: str
    label: str = ""
    value: float = math.nan
    conversation: str = ""
    position: int = 0
    speaker: str = ""
    split: str = ""
    fold: int = 0
    audio_path: str = ""  # a separate audio file for this clip (relative to the root), "" = the clip's own audio
    start: float = math.nan
    end: float = math.nan
    crop: str = ""  # "x0,y0,x1,y1": the part of the frame that shows this clip's speaker, as fractions
    meta: dict[str, str] = field(default_factory=dict)  # written as meta_<key> columns


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ManifestRow) if f.name in MANIFEST_COLUMNS}


@dataclass(frozen=True)
class Skipped:
    """A clip the recipe knows of but cannot use (its media file is absent, its label unusable, ...)."""

    id: str
    reason: str


@dataclass
class Prepared:
    """A recipe's result: the usable rows and the skipped ones, plus notes for the user (one line each)."""

    dataset: str
    rows: list[ManifestRow]
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


Recipe = Callable[..., Prepared]


def relpath(path: Path, root: Path) -> str:
    """`path` relative to `root` with "/" separators, without resolving symlinks (ids follow the user's layout)."""
    return Path(os.path.relpath(path, root)).as_posix()


def _format(value: object) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def _is_default(row: ManifestRow, column: str) -> bool:
    value, default = getattr(row, column), _DEFAULTS[column]
    if isinstance(default, float):
        return math.isnan(value) if math.isnan(default) else value == default
    return value == default


def write_manifest(rows: Sequence[ManifestRow], out: Path) -> list[str]:
    """Write `rows` as CSV to `out` atomically; returns the columns written.

    Only columns some row uses are written (`path` and `id` always), in MANIFEST_COLUMNS order, then the
    `meta_*` columns sorted by name.
    """
    used = [c for c in MANIFEST_COLUMNS
            if c in ("path", "id") or any(not _is_default(r, c) for r in rows)]
    meta = sorted({k for r in rows for k in r.meta})
    out = Path(out)
    with atomic_open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(used + [META_PREFIX + k for k in meta])
        for r in rows:
            writer.writerow([_format(getattr(r, c)) for c in used] + [r.meta.get(k, "") for k in meta])
    return used + [META_PREFIX + k for k in meta]


def recipes() -> dict[str, Recipe]:
    """Every recipe by dataset name (imported lazily so that one recipe's imports never break another)."""
    import functools

    from pipeline.recipes import cremad, iemocap, meld, mmsa, ravdess

    return {"ravdess": ravdess.prepare, "cremad": cremad.prepare, "meld": meld.prepare, "iemocap": iemocap.prepare,
            **{name: functools.partial(mmsa.prepare, dataset=name) for name in mmsa.DATASETS}}
