"""Finding the clips of an extraction run: a folder tree, one media file, or a manifest CSV.

Every clip becomes a `ClipItem`: the media path, a unique id and the row metadata the feature store keeps
(label, value, conversation, position, speaker, split, fold).

- Folder: every file below the root (recursively, following links; hidden files and folders are not looked
  at) with a common media extension (`MEDIA_EXTENSIONS`: a broken one becomes an error row that says why,
  e.g. a Git LFS pointer), and every other file that FFmpeg opens with an audio stream or with a video
  stream that is footage rather than a still picture, an attached picture or a text "video" (FFmpeg opens
  .png, .jpg, .srt and plain text too). Every other file is skipped by kind (`SKIP_KINDS`) and reported
  (`Inputs.skipped`, the run's summary), never dropped in silence.
  id = path relative to the root as laid out (a link is not resolved: git-annex and DataLad datasets are
  links into .git/annex), without extension, with "/" separators; source = the relative path.
- Manifest: a CSV with a `path` column (relative to the input root, or absolute) and the optional columns
  id, label, value, conversation, position, speaker, split, fold, and per clip: `audio_path` (its audio from
  that file, taken whole), `start`/`end` (seconds: the clip is that segment of `path`, decoded by seeking) and
  `crop` (x0,y0,x1,y1 as fractions: the part of the frame showing the speaker). Columns named `meta_*` are
  informational and ignored. Missing `id` -> the folder rule above, plus `@start-end` for a segment.
- `labels_from_folders`: label = name of the folder that holds the file (e.g. `angry/clip01.mp4`).

Task of the store (`infer_task`): "regression" when any clip has a `value` (labels, if any, stay in the
`label` column; `label_names` is empty); otherwise "classification", with `label_names` = the sorted unique
non-empty labels. An unlabelled set is "classification" with no label names (features only, e.g. for
prediction or for labelling later). The CLI's `--task` forces one when a manifest has both columns.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import CompError

log = logging.getLogger(__name__)

# Files with these extensions are clips without a probe (one that fails to decode is an error row saying why);
# files with any other name are clips when FFmpeg finds audio or footage in them.
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".flv", ".m4v", ".mpg", ".mpeg", ".ts", ".mts",
                    ".wmv", ".3gp", ".ogv")
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus", ".wma", ".aiff", ".aif")
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + AUDIO_EXTENSIONS
IMAGE_DEMUXERS = ("image2",)  # plus every FFmpeg demuxer named *_pipe (png_pipe, jpeg_pipe, ...): still images
SKIP_KINDS = {  # why a file in a folder is not a clip
    "not-media": "not media FFmpeg can read",
    "still-image": "a still image, no audio",
    "subtitles": "subtitles or data, no audio or video",
    "git-lfs-pointer": "a Git LFS pointer, not the media (git lfs pull)",
    "missing-content": "a link to content that is not here (datalad get / git annex get)",
    "empty": "an empty file",
}
QUICK_PROBE = {"probesize": "65536", "analyzeduration": "0"}  # FFmpeg options: read 64 KB, not 5 MB
PROBE_THREADS = 4  # files probed at once while a folder is searched (FFmpeg reads headers; mostly I/O)
NOT_CLIPS = {  # files people pass as INPUT by mistake: what they are and which command wants them
    b"\x89HDF\r\n\x1a\n": "an HDF5 file (a feature store?), not media: comp-train takes a store "
                             "(comp-train FEATS.h5 --out RUN)",
    b"PK\x03\x04": "a zip archive (a PyTorch checkpoint?), not media: comp-predict takes a trained model "
                   "(comp-predict CLIP --model RUN/best.pt)",
}
MANIFEST_COLUMNS = ("path", "audio_path", "start", "end", "crop", "id", "label", "value", "conversation", "position",
                    "speaker", "split", "fold")
SPLITS = ("train", "val", "test", "")
META_PREFIX = "meta_"  # informational manifest columns (e.g. comp-prepare's meta_intensity): not read


class InputError(CompError, ValueError):
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
    audio_path: Path | None = None  # the clip's audio from this file instead of `path` (taken whole)
    start_s: float | None = None  # a segment of `path`: from here (seconds) ...
    end_s: float | None = None  # ... to here; None = the file's start / end
    crop: tuple[float, float, float, float] | None = None  # (x0, y0, x1, y1) of the frame, as fractions

    @property
    def is_segment(self) -> bool:
        return self.start_s is not None or self.end_s is not None


@dataclass
class Inputs:
    """The clips of a run and the files of its folder that are not clips: {kind: [relative paths]}."""

    items: list[ClipItem]
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skipped_summary(self, examples: int = 3) -> str:
        """One line: "2 still-image (a.png, b.jpg), 1 git-lfs-pointer (c.mp4)"; "" when nothing was skipped."""
        parts = []
        for kind, paths in sorted(self.skipped.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            shown = ", ".join(paths[:examples]) + (", ..." if len(paths) > examples else "")
            parts.append(f"{len(paths)} {kind} ({shown})")
        return ", ".join(parts)


def is_media(path: Path) -> bool:
    """A common media extension: a clip whatever it holds (other files: `clip_kind` decides)."""
    return path.suffix.lower() in MEDIA_EXTENSIONS


def not_a_clip(path: Path) -> str:
    """What a file given as INPUT is when it is a store or checkpoint rather than media ("" otherwise)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return ""
    return next((what for magic, what in NOT_CLIPS.items() if head.startswith(magic)), "")


def clip_kind(path: Path) -> str:
    """"" when `path` is a clip (FFmpeg finds audio, or video that is footage); else a key of SKIP_KINDS."""
    from pipeline.decode import lfs_pointer

    if path.is_symlink() and not path.exists():
        return "missing-content"
    try:
        if path.stat().st_size == 0:
            return "empty"
    except OSError:
        return "not-media"
    if lfs_pointer(path):
        return "git-lfs-pointer"
    kind = _probe_kind(path, QUICK_PROBE)  # headers only: enough to see most clips
    return kind and _probe_kind(path, {})  # a file is only skipped after FFmpeg's full probe


def _probe_kind(path: Path, options: dict[str, str]) -> str:
    import av

    from pipeline.decode import choose_stream

    try:
        with av.open(str(path), mode="r", options=options) as container:
            fmt = container.format.name
            if choose_stream(container, "audio") is not None:
                return ""
            image = fmt in IMAGE_DEMUXERS or fmt.endswith("_pipe")
            if container.streams.video and not image and choose_stream(container, "video") is not None:
                return ""
            if container.streams.video:
                return "still-image"
            if container.streams.subtitles or container.streams.data:
                return "subtitles"
            return "not-media"
    except (av.FFmpegError, UnicodeDecodeError, OSError, ValueError):
        return "not-media"


def _absolute(path: Path) -> Path:
    """The absolute path as laid out: "." and ".." are folded, links are not followed."""
    return Path(os.path.abspath(path))


def _relative(path: Path, root: Path) -> str:
    try:
        return _absolute(path).relative_to(_absolute(root)).as_posix()
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


def _walk(root: Path) -> list[Path]:
    """Every non-hidden file below `root` as laid out, following linked folders once (no loops)."""
    found: list[Path] = []
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / f for f in files if not f.startswith(".")]
    return sorted(found)


def scan_folder(root: str | Path, *, labels_from_folders: bool = False) -> Inputs:
    """Every clip below `root` (recursive, sorted by path) and every file skipped, by kind."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    paths = _walk(root)
    with ThreadPoolExecutor(max_workers=PROBE_THREADS) as pool:
        kinds = list(pool.map(lambda p: "" if is_media(p) else clip_kind(p), paths))
    items: list[ClipItem] = []
    skipped: dict[str, list[str]] = {}
    for p, kind in zip(paths, kinds):
        source = _relative(p, root)
        if kind:
            skipped.setdefault(kind, []).append(source)
            continue
        label = _folder_label(p, root) if labels_from_folders else ""
        items.append(ClipItem(id=_id_from_source(source), path=p, source=source, label=label))
    check_unique_ids(items)
    return Inputs(items, skipped)


def discover_folder(root: str | Path, *, labels_from_folders: bool = False) -> list[ClipItem]:
    """Every clip below `root` (see `scan_folder`); skipped files are logged as a warning."""
    found = scan_folder(root, labels_from_folders=labels_from_folders)
    if found.skipped:
        log.warning("%s: %d file(s) are not clips and were skipped: %s", root,
                    sum(map(len, found.skipped.values())), found.skipped_summary())
    return found.items


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


def _parse_seconds(text: str, where: str, column: str) -> float | None:
    if text.strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{where}: {column} {text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"{where}: {column} {text!r} must be a number of seconds >= 0")
    return value


def _parse_crop(text: str, where: str) -> tuple[float, float, float, float] | None:
    if text.strip() == "":
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{where}: crop {text!r} must be x0,y0,x1,y1 (fractions of the frame, e.g. 0,0,0.5,1 "
                         "for the left half)") from None
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise InputError(f"{where}: crop {text!r} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return x0, y0, x1, y1


def _segment_id(source: str, start_s: float | None, end_s: float | None) -> str:
    """Default id of a segment: the file's id plus its span, so that segments of one file stay apart."""
    span = f"{start_s or 0:g}-{'' if end_s is None else f'{end_s:g}'}"
    return f"{_id_from_source(source)}@{span}"


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
        start_s = _parse_seconds(row.get("start", ""), where, "start")
        end_s = _parse_seconds(row.get("end", ""), where, "end")
        if start_s is not None and end_s is not None and end_s <= start_s:
            raise InputError(f"{where}: end {end_s:g} s must come after start {start_s:g} s")
        audio_path = None
        if row.get("audio_path"):
            audio_path = Path(row["audio_path"])
            if not audio_path.is_absolute():
                audio_path = root / audio_path
        segment = start_s is not None or end_s is not None
        items.append(ClipItem(
            id=row.get("id") or (_segment_id(source, start_s, end_s) if segment else _id_from_source(source)),
            path=path,
            source=source,
            label=label,
            value=_parse_float(row.get("value", ""), where),
            conversation=row.get("conversation", ""),
            position=_parse_int(row.get("position", ""), where, "position"),
            speaker=row.get("speaker", ""),
            split=split,
            fold=_parse_int(row.get("fold", ""), where, "fold"),
            audio_path=audio_path,
            start_s=start_s,
            end_s=end_s,
            crop=_parse_crop(row.get("crop", ""), where),
        ))
    if not items:
        raise InputError(f"{manifest}: lists no clips")
    check_unique_ids(items)
    return items


def gather_inputs(input_path: str | Path, *, manifest: str | Path | None = None,
                  labels_from_folders: bool = False) -> Inputs:
    """The clips of a run: a manifest (paths relative to `input_path`), a folder tree, or one media file.

    Raises InputError when there is no clip: an empty folder (naming what was skipped), a store or
    checkpoint given as INPUT (saying which command wants it), a path that does not exist.
    """
    input_path = Path(input_path)
    if manifest is not None:
        return Inputs(read_manifest(manifest, input_path, labels_from_folders=labels_from_folders))
    if input_path.is_dir():
        found = scan_folder(input_path, labels_from_folders=labels_from_folders)
        if not found.items:
            detail = f"; skipped {found.skipped_summary()}" if found.skipped else ""
            raise InputError(f"{input_path}: no clips found (no file with audio or video){detail}")
        return found
    if input_path.is_file():
        what = not_a_clip(input_path)
        if what:
            raise InputError(f"{input_path} is {what}")
        if labels_from_folders:
            raise InputError("--labels-from-folders needs a folder as INPUT")
        return Inputs([ClipItem(id=input_path.stem, path=input_path, source=input_path.name)])
    if input_path.is_symlink():
        raise InputError(f"{input_path}: {SKIP_KINDS['missing-content']}")
    raise InputError(f"{input_path}: no such file or folder")


def collect_inputs(input_path: str | Path, *, manifest: str | Path | None = None,
                   labels_from_folders: bool = False) -> list[ClipItem]:
    """`gather_inputs`' clips; what a folder holds besides clips is logged as a warning."""
    found = gather_inputs(input_path, manifest=manifest, labels_from_folders=labels_from_folders)
    if found.skipped:
        log.warning("%s: %d file(s) are not clips and were skipped: %s", input_path,
                    sum(map(len, found.skipped.values())), found.skipped_summary())
    return found.items


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
