"""Finding the clips of an extraction run: a folder tree, one media file, or a manifest CSV.

Every clip becomes a `ClipItem`: the media path, a unique id and the row metadata the feature store keeps
(label, value, conversation, position, speaker, split, fold).

- Folder: every file with a media extension below the root, recursively (hidden files and folders skipped).
  id = path relative to the root, without extension, with "/" separators; source = the relative path.
- Manifest: a CSV with a `path` column (relative to the input root, or absolute) and the optional columns
  id, label, value, conversation, position, speaker, split, fold; columns named `meta_*` are informational and
  ignored. Missing `id` -> the folder rule above.
- `labels_from_folders`: label = name of the folder that holds the file (e.g. `angry/clip01.mp4`).

Task of the store (`infer_task`): "regression" when any clip has a `value` (labels, if any, stay in the
`label` column; `label_names` is empty); otherwise "classification", with `label_names` = the sorted unique
non-empty labels. An unlabelled set is "classification" with no label names (features only, e.g. for
prediction or for labelling later). The CLI's `--task` forces one when a manifest has both columns.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3")
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + AUDIO_EXTENSIONS
MANIFEST_COLUMNS = ("path", "id", "label", "value", "conversation", "position", "speaker", "split", "fold")
SPLITS = ("train", "val", "test", "")
META_PREFIX = "meta_"  # informational manifest columns (e.g. comp-prepare's meta_intensity): not read


class InputError(ValueError):
    """The inputs cannot be turned into a list of clips; the message says what to fix."""


@dataclass(frozen=True)
class ClipItem:
    """One clip to extract: where its media is and the metadata its store row carries."""

    id: str
    path: Path
    source: str = ""  # media path relative to the input root (as stored in the `source` column)
    label: str = ""
    value: float = math.nan
    conversation: str = ""
    position: int = 0
    speaker: str = ""
    split: str = ""
    fold: int = 0


def is_media(path: Path) -> bool:
    return path.suffix.lower() in MEDIA_EXTENSIONS


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:  # outside the root (absolute manifest path): keep it whole
        return path.as_posix()


def _id_from_source(source: str) -> str:
    dot = source.rfind(".")
    slash = source.rfind("/")
    return source[:dot] if dot > slash + 1 else source


def _folder_label(path: Path, root: Path) -> str:
    rel = Path(_relative(path, root))
    if len(rel.parts) < 2:
        raise InputError(f"--labels-from-folders: {path} is not inside a class folder under {root}; "
                         "put each clip in a folder named after its label (e.g. angry/clip.mp4)")
    return rel.parts[-2]


def discover_folder(root: str | Path, *, labels_from_folders: bool = False) -> list[ClipItem]:
    """Every media file below `root` (recursive, sorted), as clips."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    paths = sorted(p for p in root.rglob("*")
                   if p.is_file() and is_media(p)
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    items = []
    for p in paths:
        source = _relative(p, root)
        label = _folder_label(p, root) if labels_from_folders else ""
        items.append(ClipItem(id=_id_from_source(source), path=p, source=source, label=label))
    check_unique_ids(items)
    return items


def _parse_float(text: str, where: str) -> float:
    if text.strip() == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{where}: value {text!r} is not a number") from None


def _parse_int(text: str, where: str, column: str) -> int:
    if text.strip() == "":
        return 0
    try:
        return int(float(text)) if float(text).is_integer() else int(text)
    except ValueError:
        raise InputError(f"{where}: {column} {text!r} is not an integer") from None


def read_manifest(manifest: str | Path, root: str | Path | None = None, *,
                  labels_from_folders: bool = False) -> list[ClipItem]:
    """Clips listed in a manifest CSV; relative paths are resolved against `root` (default: the CSV's folder)."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise InputError(f"{manifest}: no such manifest file")
    root = Path(root) if root is not None else manifest.parent
    if root.is_file():
        root = root.parent
    with open(manifest, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in columns:
            raise InputError(f"{manifest}: needs a 'path' column (found {columns}); "
                             f"allowed columns: {list(MANIFEST_COLUMNS)}")
        unknown = sorted(c for c in set(columns) - set(MANIFEST_COLUMNS) if not c.startswith(META_PREFIX))
        if unknown:
            raise InputError(f"{manifest}: unknown column(s) {unknown}; allowed: {list(MANIFEST_COLUMNS)}")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    items = []
    for line, row in enumerate(rows, start=2):
        where = f"{manifest}:{line}"
        if not row.get("path"):
            raise InputError(f"{where}: empty path")
        path = Path(row["path"])
        if not path.is_absolute():
            path = root / path
        source = _relative(path, root)
        split = row.get("split", "")
        if split not in SPLITS:
            raise InputError(f"{where}: split {split!r} must be one of train, val, test or empty")
        label = row.get("label", "")
        if labels_from_folders and not label:
            label = _folder_label(path, root)
        items.append(ClipItem(
            id=row.get("id") or _id_from_source(source),
            path=path,
            source=source,
            label=label,
            value=_parse_float(row.get("value", ""), where),
            conversation=row.get("conversation", ""),
            position=_parse_int(row.get("position", ""), where, "position"),
            speaker=row.get("speaker", ""),
            split=split,
            fold=_parse_int(row.get("fold", ""), where, "fold"),
        ))
    if not items:
        raise InputError(f"{manifest}: lists no clips")
    check_unique_ids(items)
    return items


def collect_inputs(input_path: str | Path, *, manifest: str | Path | None = None,
                   labels_from_folders: bool = False) -> list[ClipItem]:
    """The clips of a run: a manifest (paths relative to `input_path`), a folder tree, or one media file."""
    input_path = Path(input_path)
    if manifest is not None:
        return read_manifest(manifest, input_path, labels_from_folders=labels_from_folders)
    if input_path.is_dir():
        items = discover_folder(input_path, labels_from_folders=labels_from_folders)
        if not items:
            raise InputError(f"{input_path}: no media files found (looked for {', '.join(MEDIA_EXTENSIONS)})")
        return items
    if input_path.is_file():
        if labels_from_folders:
            raise InputError("--labels-from-folders needs a folder as INPUT")
        return [ClipItem(id=input_path.stem, path=input_path, source=input_path.name)]
    raise InputError(f"{input_path}: no such file or folder")


def check_unique_ids(items: Sequence[ClipItem]) -> None:
    """Raise InputError naming the clip ids that occur more than once."""
    counts = Counter(item.id for item in items)
    dups = sorted(i for i, n in counts.items() if n > 1)
    if dups:
        examples = ", ".join(repr(d) for d in dups[:5])
        raise InputError(f"{len(dups)} duplicate clip id(s): {examples}"
                         f"{' ...' if len(dups) > 5 else ''}; ids come from the path without extension "
                         "(e.g. a.mp4 and a.wav collide) or from the manifest's id column: make them unique")


def infer_task(items: Sequence[ClipItem], task: str | None = None) -> tuple[str, tuple[str, ...]]:
    """(task, label_names) of the store these clips make; `task` forces one (see the module docstring)."""
    label_names = tuple(sorted({item.label for item in items if item.label}))
    has_values = any(not math.isnan(item.value) for item in items)
    if task is None:
        task = "regression" if has_values else "classification"
    if task == "regression":
        if not has_values:
            raise InputError("task regression needs a 'value' column in the manifest")
        return "regression", ()
    if task != "classification":
        raise InputError(f"task must be classification or regression, got {task!r}")
    return "classification", label_names
