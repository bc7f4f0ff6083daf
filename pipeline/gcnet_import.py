"""Import the public pre-extracted sets of GCNet / SDR-GNN / MoMKE / ComP into a feature store.

Input (docs/model.md §2.2-2.3): a label pickle (a list; IEMOCAP: videoIDs, videoLabels, videoSpeakers,
videoSentences, trainVid, testVid; CMU-MOSI/MOSEI: the same with valVid before testVid) and one folder of
utterance-level vectors per modality, `<folder>/<utterance>.npy` of shape (D,) or (1, D). IEMOCAP faces are a
folder `<utterance>/` holding one file per speaker (`compress_F.npy`, `compress_M.npy`); the utterance uses
its own speaker's face. CMU folders may also hold a folder `<utterance>/`, whose arrays are averaged, as the
reference loaders do.

These sets write an all-zero vector where a modality is absent (no face found, ...), and the reference
loaders feed those zeros to the model as if they were features. The store keeps the rule "missing is
explicit": a zero vector becomes present=False with reason "zero-vector (absent in source)"; the `faithful`
variant feeds it to the model as a present zero input again (`zero_vectors_present`, docs/model.md §9.18).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.clip import MODALITIES
from core.errors import CompError
from core.progress import Progress
from core.records import ZERO_VECTOR_REASON, ClipRecord, ModalityInfo, ModalityValue, StoreHeader
from pipeline.safe_pickle import safe_load
from pipeline.store import write_store

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("iemocap4", "iemocap6", "cmumosi", "cmumosei")
LABEL_NAMES: Mapping[str, tuple[str, ...]] = {
    # class-index order of the pickles; IEMOCAP-4 "happy" is happy + excited merged
    "iemocap4": ("happy", "sad", "neutral", "angry"),
    "iemocap6": ("happy", "sad", "neutral", "angry", "excited", "frustrated"),
}
ZERO_REASON = ZERO_VECTOR_REASON
MISSING_REASON = "missing-file"
UNREADABLE_REASON = "unreadable"
NONFINITE_REASON = "non-finite values in source"
CMU_VALUE_RANGE = (-3.0, 3.0)  # sentiment scale of CMU-MOSI/MOSEI
MOSEI_MIN_UTTERANCES = 5000  # MOSI has 2,199 utterances, MOSEI about 22,856: tells them apart by size

# What the folder names of the public sets stand for (GCNet feature_extraction/): layers, pooling.
KNOWN_FOLDERS: Mapping[str, tuple[str, str]] = {
    "wav2vec-large-c-UTT": ("wav2vec large, context network c", "utterance mean"),
    "wav2vec-large-z-UTT": ("wav2vec large, feature encoder z", "utterance mean"),
    "deberta-large-4-UTT": ("microsoft/deberta-large, sum of the last 4 hidden layers", "token mean"),
    "manet_UTT": ("MA-Net (RAF-DB), concatenation of two 512-d branches", "mean over face frames"),
}
EXAMPLE_FOLDERS = {"audio": "wav2vec-large-c-UTT", "text": "deberta-large-4-UTT", "visual": "manet_UTT"}
_SESSION = re.compile(r"^Ses(\d{2})")



class GcnetImportError(CompError, ValueError):
    """The input cannot be imported as given; the message names the file and says what to do."""


# ------------------------------------------------------------------------------------------- labels

@dataclass(frozen=True)
class Utterance:
    """One row to import, as the label pickle describes it."""

    id: str
    conversation: str
    position: int
    speaker: str
    transcript: str
    label: str = ""
    value: float = math.nan
    split: str = ""
    fold: int = 0


@dataclass(frozen=True)
class LabelSet:
    """The label pickle, flattened to one entry per utterance in conversation order."""

    dataset: str
    utterances: tuple[Utterance, ...]

    @property
    def task(self) -> str:
        return "classification" if self.dataset in LABEL_NAMES else "regression"

    @property
    def label_names(self) -> tuple[str, ...]:
        return LABEL_NAMES.get(self.dataset, ())


def _text(x: Any) -> str:
    """A transcript as str. Python-2 pickles read as latin1 turn UTF-8 text into mojibake; undo that."""
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8")
        except UnicodeDecodeError:
            return x.decode("latin1")
    s = str(x)
    if not s.isascii():
        try:
            return s.encode("latin1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass
    return s


def _label_kind(values: Sequence[Any]) -> str:
    """'int', 'float' or 'other' for a pickle's labels (numpy or Python numbers)."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iu":
        return "int"
    if arr.dtype.kind == "f":
        return "float"
    return "other"


def _all_labels(video_labels: Mapping[str, Sequence[Any]]) -> list[Any]:
    return [x for labels in video_labels.values() for x in np.asarray(labels).reshape(-1).tolist()]


def _check_layout(items: Any, path: Path) -> None:
    if not isinstance(items, (list, tuple)) or len(items) not in (6, 7):
        got = f"a {type(items).__name__} of {len(items)} items" if isinstance(items, (list, tuple)) \
            else f"a {type(items).__name__}"
        raise GcnetImportError(
            f"{path}: expected a list of 6 items (IEMOCAP: videoIDs, videoLabels, videoSpeakers, videoSentences, "
            f"trainVid, testVid) or 7 items (CMU-MOSI/MOSEI: ... trainVid, valVid, testVid); got {got}")
    for i, name in enumerate(("videoIDs", "videoLabels", "videoSpeakers", "videoSentences")):
        if not isinstance(items[i], Mapping):
            raise GcnetImportError(f"{path}: item {i} ({name}) should map video id -> list, "
                                   f"got {type(items[i]).__name__}")


def detect_dataset(items: Sequence[Any], path: Path, requested: str | None = None) -> str:
    """Which public set a label pickle is: 6 vs 7 items, int vs float labels, number of classes.

    `requested` (from --dataset) overrides the detection but must agree with what the pickle holds.
    """
    _check_layout(items, path)
    labels = _all_labels(items[1])
    if not labels:
        raise GcnetImportError(f"{path}: videoLabels holds no labels")
    kind = _label_kind(labels)
    if kind == "float" and len(items) == 6 and all(float(x).is_integer() for x in labels):
        kind = "int"  # IEMOCAP class ids stored as floats
    family = "iemocap" if len(items) == 6 else "cmu"
    if family == "iemocap" and kind != "int":
        raise GcnetImportError(f"{path}: 6 items (IEMOCAP layout) but labels are {kind}, not class ids")
    if family == "cmu" and kind != "float":
        raise GcnetImportError(f"{path}: 7 items (CMU layout) but labels are {kind}, not float sentiment values")
    if requested is not None and requested not in DATASETS:
        raise GcnetImportError(f"unknown dataset {requested!r}; choose one of {', '.join(DATASETS)}")

    if family == "iemocap":
        top = int(max(labels))
        if min(labels) < 0 or top >= len(LABEL_NAMES["iemocap6"]):
            raise GcnetImportError(f"{path}: class ids range {int(min(labels))}..{top}; IEMOCAP-4/6 use 0..3 / 0..5")
        detected = "iemocap6" if top >= len(LABEL_NAMES["iemocap4"]) else "iemocap4"
        if requested is None:
            return detected
        if not requested.startswith("iemocap"):
            raise GcnetImportError(f"{path} is an IEMOCAP pickle (6 items, class ids); --dataset {requested} "
                                   "does not fit it: use iemocap4 or iemocap6")
        if requested == "iemocap4" and detected == "iemocap6":
            raise GcnetImportError(f"{path}: class ids go up to {top}, so this is the 6-class pickle; "
                                   "use --dataset iemocap6 (or the 4-way pickle)")
        if requested == "iemocap6" and detected == "iemocap4":
            log.warning("%s: no class id above 3, yet --dataset iemocap6 was given; using the 6 names", path)
        return requested

    if requested is not None:
        if not requested.startswith("cmu"):
            raise GcnetImportError(f"{path} is a CMU pickle (7 items, float labels); --dataset {requested} "
                                   "does not fit it: use cmumosi or cmumosei")
        return requested
    name = path.name.lower()
    if "mosei" in name:
        return "cmumosei"
    if "mosi" in name:
        return "cmumosi"
    detected = "cmumosei" if len(labels) >= MOSEI_MIN_UTTERANCES else "cmumosi"
    log.info("%s: guessed %s from its %d utterances; pass --dataset to say otherwise", path, detected, len(labels))
    return detected


def _split_of(items: Sequence[Any], path: Path) -> dict[str, str]:
    """Conversation id -> 'train'/'val'/'test' from the CMU pickle's vid sets."""
    out: dict[str, str] = {}
    for split, vids in zip(("train", "val", "test"), items[4:7]):
        for vid in vids:
            vid = _text(vid)
            if vid in out:
                raise GcnetImportError(f"{path}: video {vid} is in both {out[vid]}Vid and {split}Vid")
            out[vid] = split
    return out


def _session(vid: str, path: Path) -> int:
    m = _SESSION.match(vid)
    if not m or not 1 <= int(m.group(1)) <= 5:
        raise GcnetImportError(f"{path}: cannot read the IEMOCAP session from video id {vid!r} "
                               "(expected Ses01..Ses05 at the start); is this an IEMOCAP pickle?")
    return int(m.group(1))


def read_label_pickle(path: str | Path, dataset: str | None = None) -> LabelSet:
    """Read and check a label pickle with the restricted unpickler; one `Utterance` per row."""
    path = Path(path)
    if not path.is_file():
        raise GcnetImportError(f"{path}: no such label pickle (expected e.g. IEMOCAP_features_raw_4way.pkl)")
    try:
        items = safe_load(path)
    except Exception as err:  # UnsafePickleError included: its message names the refused global
        raise GcnetImportError(f"{path}: cannot read the label pickle: {err}") from err
    dataset = detect_dataset(items, path, dataset)
    video_ids, video_labels, video_speakers, video_sentences = items[:4]
    iemocap = dataset in LABEL_NAMES
    split_of = {} if iemocap else _split_of(items, path)
    names = LABEL_NAMES.get(dataset, ())

    rows: list[Utterance] = []
    seen: dict[str, str] = {}
    unsplit = 0
    for vid in sorted(video_ids, key=_text):
        conv = _text(vid)
        ids = [_text(u) for u in video_ids[vid]]
        columns = {"videoLabels": video_labels, "videoSpeakers": video_speakers, "videoSentences": video_sentences}
        for cname, column in columns.items():
            if vid not in column or len(column[vid]) != len(ids):
                have = len(column[vid]) if vid in column else "no entry"
                raise GcnetImportError(f"{path}: video {conv} has {len(ids)} utterance ids but {cname} has {have}")
        labels = np.asarray(video_labels[vid]).reshape(-1).tolist()
        if not iemocap and conv not in split_of:
            unsplit += 1
        for pos, utt in enumerate(ids):
            if utt in seen:
                raise GcnetImportError(f"{path}: utterance {utt} appears in videos {seen[utt]} and {conv}")
            seen[utt] = conv
            common = dict(id=utt, conversation=conv, position=pos, speaker=_text(video_speakers[vid][pos]),
                          transcript=_text(video_sentences[vid][pos]))
            if iemocap:
                rows.append(Utterance(**common, label=names[int(labels[pos])], fold=_session(conv, path)))
            else:
                value = float(labels[pos])
                if not math.isfinite(value):
                    raise GcnetImportError(f"{path}: utterance {utt} has a non-finite label {value}")
                if not CMU_VALUE_RANGE[0] <= value <= CMU_VALUE_RANGE[1]:
                    log.warning("%s: utterance %s has sentiment %.3f outside [-3, 3]", path, utt, value)
                rows.append(Utterance(**common, value=value, split=split_of.get(conv, "")))
    if unsplit:
        log.warning("%s: %d videos are in none of trainVid/valVid/testVid; their split is left empty", path, unsplit)
    return LabelSet(dataset=dataset, utterances=tuple(rows))


# ----------------------------------------------------------------------------------------- features

@dataclass
class _Loaded:
    vector: np.ndarray | None  # the raw vector (zeros included), None when it could not be read
    reason: str  # "" when vector is a usable feature
    files: tuple[Path, ...] = ()


def _read_npy(path: Path) -> np.ndarray:
    """One utterance-level vector: shape (D,) or (1, D)."""
    arr = np.load(path, allow_pickle=False)
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"array of dtype {arr.dtype}, expected numbers")
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise GcnetImportError(f"{path}: shape {arr.shape}; expected an utterance-level vector (D,) or (1, D). "
                               "Point the importer at the *-UTT folders, not the frame-level ones")
    return arr.astype(np.float32)


def _speaker_files(files: list[Path], speaker: str) -> list[Path] | None:
    """The files of `speaker` when the folder holds per-speaker files (`compress_F.npy`), else None."""
    tagged = [f for f in files if "_" in f.stem and len(tag := f.stem.rsplit("_", 1)[1]) == 1 and tag.isalpha()]
    if not speaker or not tagged:
        return None
    return [f for f in tagged if f.stem.rsplit("_", 1)[1] == speaker]


def load_utterance(folder: Path, utterance: str, speaker: str = "") -> _Loaded:
    """The vector of one utterance in one modality folder, or why there is none."""
    single = folder / f"{utterance}.npy"
    sub = folder / utterance
    if single.is_file():
        files = [single]
    elif sub.is_dir():
        files = sorted(sub.glob("*.npy"))
        own = _speaker_files(files, speaker)
        if own is not None:
            if not own:
                return _Loaded(None, f"{MISSING_REASON}: {utterance}/ has no file for speaker {speaker}")
            files = own
        if not files:
            return _Loaded(None, f"{MISSING_REASON}: {utterance}/ holds no .npy")
    else:
        return _Loaded(None, MISSING_REASON)
    try:
        vectors = [_read_npy(f) for f in files]
        vector = vectors[0] if len(vectors) == 1 else np.mean(np.stack(vectors), axis=0)
    except GcnetImportError:
        raise
    except Exception as err:  # a truncated or foreign file: record it and go on
        return _Loaded(None, f"{UNREADABLE_REASON}: {type(err).__name__}: {err}", tuple(files))
    if not np.all(np.isfinite(vector)):
        return _Loaded(vector, NONFINITE_REASON, tuple(files))
    if not np.any(vector):
        return _Loaded(vector, ZERO_REASON, tuple(files))
    return _Loaded(vector, "", tuple(files))


def describe_folder(folder: Path, dim: int) -> ModalityInfo:
    """ModalityInfo for a public feature folder; layers/pooling from its name where it is a known one."""
    name = folder.name
    layers, pooling = KNOWN_FOLDERS.get(name, ("", "utterance-level (as in source)" if name.endswith("UTT") else ""))
    return ModalityInfo(dim=dim, encoder=name, layers=layers, pooling=pooling)


# ------------------------------------------------------------------------------------------- import

@dataclass
class ImportSummary:
    """What an import wrote: counts for the CLI to print and for tests to check."""

    dataset: str
    out: Path
    utterances: int
    conversations: int
    dims: dict[str, int]
    present: dict[str, int]
    absent: dict[str, Counter] = field(default_factory=dict)  # modality -> reason code -> count
    splits: Counter = field(default_factory=Counter)
    folds: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        out = [f"imported {self.dataset}: {self.utterances} utterances in {self.conversations} conversations "
               f"-> {self.out}"]
        if self.folds:
            out.append("utterances per fold (session): "
                       + ", ".join(f"{k}: {v}" for k, v in sorted(self.folds.items())))
        if any(self.splits):
            order = {"train": 0, "val": 1, "test": 2, "": 3}
            out.append("utterances per split: " + ", ".join(
                f"{k or '(none)'}: {v}" for k, v in sorted(self.splits.items(), key=lambda kv: order[kv[0]])))
        for m in MODALITIES:
            absent = self.absent.get(m, Counter())
            detail = ", ".join(f"{k}: {v}" for k, v in absent.most_common()) or "none"
            out.append(f"{m:6s} dim {self.dims[m]:5d}  present {self.present[m]}  absent {sum(absent.values())}"
                       f" ({detail})")
        return out


def _reason_code(reason: str) -> str:
    return reason if reason in (ZERO_REASON, NONFINITE_REASON) else reason.split(":", 1)[0]


def import_gcnet(labels: str | Path, folders: Mapping[str, str | Path], out: str | Path, *,
                 dataset: str | None = None, overwrite: bool = False,
                 progress: Progress | None = None) -> ImportSummary:
    """Convert one public pre-extracted set into the feature store at `out`.

    `folders` maps each of audio/text/visual to its feature folder. Dims come from the first readable file
    of each folder; a later vector of another dim is an error naming the file. `progress("importing", done,
    total)` is called after each utterance (the CLI draws a bar with it). Nothing is written unless every input checks.
    """
    out = Path(out)
    if set(folders) != set(MODALITIES):
        raise GcnetImportError(f"need one feature folder for each of {MODALITIES}, got {sorted(folders)}")
    dirs = {m: Path(folders[m]) for m in MODALITIES}
    for m, d in dirs.items():
        if not d.is_dir():
            raise GcnetImportError(f"--{m} {d}: no such folder (expected e.g. .../features/{EXAMPLE_FOLDERS[m]})")
    if out.exists() and not overwrite:
        raise GcnetImportError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")

    label_set = read_label_pickle(labels, dataset)
    rows = label_set.utterances
    dims: dict[str, int] = {}
    first_file: dict[str, Path] = {}
    values: dict[str, list[_Loaded]] = {m: [] for m in MODALITIES}
    for i, utt in enumerate(rows):
        for m in MODALITIES:
            loaded = load_utterance(dirs[m], utt.id, utt.speaker)
            if loaded.vector is not None:
                dim = loaded.vector.shape[0]
                if m not in dims:
                    dims[m], first_file[m] = dim, loaded.files[0]
                elif dim != dims[m]:
                    raise GcnetImportError(
                        f"{loaded.files[0]}: {m} vector has dim {dim}, but {first_file[m]} (the first file read) has "
                        f"dim {dims[m]}; all files of one folder must come from the same encoder")
            values[m].append(loaded)
        if progress is not None:
            progress("importing", i + 1, len(rows))

    for m in MODALITIES:
        if m not in dims:
            reasons = Counter(_reason_code(v.reason) for v in values[m])
            raise GcnetImportError(f"--{m} {dirs[m]}: no readable vector for any of the {len(rows)} utterances "
                                   f"({dict(reasons)}); is it the right folder for this label pickle?")
        missing = sum(v.reason.startswith(MISSING_REASON) for v in values[m])
        if missing > len(rows) // 2:
            log.warning("--%s %s: %d of %d utterances have no file; is it the right folder?", m, dirs[m],
                        missing, len(rows))

    header = StoreHeader(task=label_set.task, label_names=label_set.label_names,
                         modalities={m: describe_folder(dirs[m], dims[m]) for m in MODALITIES},
                         source=f"gcnet:{label_set.dataset}")
    records = []
    for i, utt in enumerate(rows):
        mods = {m: ModalityValue(None if values[m][i].reason else values[m][i].vector, values[m][i].reason)
                for m in MODALITIES}
        records.append(ClipRecord(id=utt.id, modalities=mods, conversation=utt.conversation, position=utt.position,
                                  speaker=utt.speaker, label=utt.label, value=utt.value, split=utt.split,
                                  fold=utt.fold, transcript=utt.transcript))
    # `out` is new or may be replaced (checked above); overwrite also drops a journal an interrupted run left
    write_store(out, header, records, overwrite=True)

    summary = ImportSummary(
        dataset=label_set.dataset, out=out, utterances=len(rows),
        conversations=len({u.conversation for u in rows}), dims=dims,
        present={m: sum(not v.reason for v in values[m]) for m in MODALITIES},
        absent={m: Counter(_reason_code(v.reason) for v in values[m] if v.reason) for m in MODALITIES},
        splits=Counter(u.split for u in rows) if label_set.task == "regression" else Counter(),
        folds=Counter(u.fold for u in rows if u.fold))
    log.debug("; ".join(summary.lines()))
    return summary
