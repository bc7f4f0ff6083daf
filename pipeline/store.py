"""The feature store: one columnar HDF5 file shared by comp-extract, comp-import, comp-train and comp-predict.

Layout (schema "comp-features", version 1)::

    attrs: schema, schema_version, created_with, extraction_spec (JSON) + spec_hash | source,
           task ("classification" | "regression"), label_names (JSON list)
    clips/{id, source, conversation, position, speaker, label, value, split, fold, duration_s,
           transcript, status, done}                         one row per clip, all length N
    modalities/{audio,text,visual}/{features [N,D] f32, present [N] bool, reason [N] str}
           attrs: encoder, dim, layers, pooling
    diagnostics/<name> [N] f32                                optional per-clip numbers (NaN = not measured)

Crash safety. HDF5 files are not safe against `kill -9` while open for writing, so the store file is never
modified in place: new rows go to a journal folder next to it (`<file>.journal/`, one `.npz` chunk per batch,
each written to a temporary name and renamed), and `commit()` rewrites the store into a temporary file and
renames it over the old one. At any instant the store is either the old or the new complete file, and every
journal chunk is either absent or complete. Rows are keyed by clip id: a committed row replaces an earlier row
with the same id (this is how `--retry-failed` redoes error rows), so a rerun after a crash can never
duplicate a clip.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import h5py
import numpy as np

from core import __version__
from core.atomic import atomic_open, atomic_path
from core.clip import MODALITIES
from core.records import ClipRecord, ModalityInfo, StoreData, StoreError, StoreHeader, canonical_json

log = logging.getLogger(__name__)

SCHEMA = "comp-features"
SCHEMA_VERSION = 1
STRING_COLUMNS = ("id", "source", "conversation", "speaker", "label", "split", "transcript", "status")
CLIP_COLUMNS = STRING_COLUMNS + ("position", "value", "fold", "duration_s", "done")
_STR = h5py.string_dtype(encoding="utf-8")


# ----------------------------------------------------------------------------------------------- reading

def _read_str(ds: h5py.Dataset) -> np.ndarray:
    return np.array(ds.asstr()[()], dtype=object) if len(ds) else np.array([], dtype=object)


def _read_features(ds: h5py.Dataset, done: np.ndarray, all_done: bool) -> np.ndarray:
    """float32 [n_done, D], read straight into one array: training holds this array, not a copy of it."""
    arr = np.empty(ds.shape, dtype=np.float32)
    if arr.size:
        ds.read_direct(arr)  # converts on read when the file holds another float type
    return arr if all_done else arr[done]


def read_header(path: str | Path) -> StoreHeader:
    """File-level attributes only (cheap)."""
    with _open_read(path) as f:
        return _header_from(f, path)


def _open_read(path: str | Path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such feature store")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise StoreError(f"{path}: not a readable HDF5 file ({err})") from err


def _header_from(f: h5py.File, path: str | Path) -> StoreHeader:
    if f.attrs.get("schema") != SCHEMA:
        raise StoreError(f"{path}: not a comp-mer feature store (schema attribute is {f.attrs.get('schema')!r})")
    version = int(f.attrs.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        raise StoreError(f"{path}: schema_version {version}, this comp-mer reads {SCHEMA_VERSION}")
    mods = {}
    for m in MODALITIES:
        a = f[f"modalities/{m}"].attrs
        mods[m] = ModalityInfo(int(a["dim"]), str(a.get("encoder", "")), str(a.get("layers", "")),
                               str(a.get("pooling", "")))
    spec = f.attrs.get("extraction_spec")
    return StoreHeader(
        task=str(f.attrs["task"]),
        label_names=tuple(json.loads(f.attrs.get("label_names", "[]"))),
        modalities=mods,
        extraction_spec=json.loads(spec) if spec is not None else None,
        source=str(f.attrs["source"]) if "source" in f.attrs else None,
    )


def read_store(path: str | Path, *, include_pending_warning: bool = True) -> StoreData:
    """Load every committed, done row of the store.

    Features come back as one float32 [N, D] array per modality with zeros where the modality is absent;
    rows keep the store's order."""
    path = Path(path)
    if include_pending_warning and _journal_dir(path).exists() and any(_journal_dir(path).glob("*.npz")):
        log.warning("%s has uncommitted extraction results in %s; rerun the same comp-extract command "
                    "to finish it", path, _journal_dir(path))
    with _open_read(path) as f:
        header = _header_from(f, path)
        c = f["clips"]
        done = c["done"][()].astype(bool)
        cols: dict[str, np.ndarray] = {}
        for name in STRING_COLUMNS:
            cols[name] = _read_str(c[name])[done]
        for name in ("position", "fold"):
            cols[name] = c[name][()].astype(np.int64)[done]
        for name in ("value", "duration_s"):
            cols[name] = c[name][()].astype(np.float32)[done]
        all_done = bool(done.all())
        feats, present, reason = {}, {}, {}
        for m in MODALITIES:
            g = f[f"modalities/{m}"]
            present[m] = g["present"][()].astype(bool)[done]
            feats[m] = _read_features(g["features"], done, all_done)
            feats[m][~present[m]] = 0  # the contract's zeros where absent, whatever a writer left there
            reason[m] = _read_str(g["reason"])[done]
        diags = {k: f["diagnostics"][k][()].astype(np.float32)[done] for k in f.get("diagnostics", {})}
    return StoreData(header=header, spec_hash=header.spec_hash, ids=cols["id"], source=cols["source"],
                     conversation=cols["conversation"], position=cols["position"], speaker=cols["speaker"],
                     label=cols["label"], value=cols["value"], split=cols["split"], fold=cols["fold"],
                     duration_s=cols["duration_s"], transcript=cols["transcript"], status=cols["status"],
                     features=feats, present=present, reason=reason, diagnostics=diags)


# ----------------------------------------------------------------------------------------------- writing

def _journal_dir(path: Path) -> Path:
    return path.with_name(path.name + ".journal")


def _records_to_columns(records: Sequence[ClipRecord], header: StoreHeader) -> dict[str, np.ndarray]:
    n = len(records)
    cols: dict[str, np.ndarray] = {name: np.array([getattr(r, name) for r in records], dtype=object)
                                   for name in STRING_COLUMNS}
    cols["position"] = np.array([r.position for r in records], dtype=np.int64)
    cols["fold"] = np.array([r.fold for r in records], dtype=np.int64)
    cols["value"] = np.array([r.value for r in records], dtype=np.float32)
    cols["duration_s"] = np.array([r.duration_s for r in records], dtype=np.float32)
    cols["done"] = np.ones(n, dtype=bool)
    for m in MODALITIES:
        dim = header.modalities[m].dim
        feats = np.zeros((n, dim), dtype=np.float32)
        present = np.zeros(n, dtype=bool)
        reasons = np.empty(n, dtype=object)
        for i, r in enumerate(records):
            mv = r.modalities[m]
            reasons[i] = mv.reason
            if mv.features is not None:
                vec = np.asarray(mv.features, dtype=np.float32).reshape(-1)
                if vec.shape[0] != dim:
                    raise StoreError(f"clip {r.id}: {m} vector has dim {vec.shape[0]}, the store expects {dim}")
                if not np.all(np.isfinite(vec)):
                    raise StoreError(f"clip {r.id}: {m} vector has non-finite values")
                feats[i] = vec
                present[i] = True
        cols[f"{m}/features"] = feats
        cols[f"{m}/present"] = present
        cols[f"{m}/reason"] = reasons
    names = sorted({k for r in records for k in r.diagnostics})
    for k in names:
        cols[f"diag/{k}"] = np.array([float(r.diagnostics.get(k, math.nan)) for r in records], dtype=np.float32)
    return cols


def _columns_from_store(data: StoreData) -> dict[str, np.ndarray]:
    cols = {name: getattr(data, "ids" if name == "id" else name) for name in STRING_COLUMNS}
    for name in ("position", "fold", "value", "duration_s"):
        cols[name] = getattr(data, name)
    cols["done"] = np.ones(len(data), dtype=bool)
    for m in MODALITIES:
        cols[f"{m}/features"] = data.features[m]
        cols[f"{m}/present"] = data.present[m]
        cols[f"{m}/reason"] = data.reason[m]
    for k, v in data.diagnostics.items():
        cols[f"diag/{k}"] = v
    return cols


def _concat(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    parts = [p for p in parts if len(p["id"])]
    if not parts:
        return {}
    keys = set().union(*parts)
    out = {}
    for k in keys:
        pieces = []
        for p in parts:
            if k in p:
                pieces.append(p[k])
            else:  # a diagnostic one part lacks: not measured there
                pieces.append(np.full(len(p["id"]), math.nan, dtype=np.float32))
        out[k] = np.concatenate(pieces)
    return out


def _write_file(path: Path, header: StoreHeader, cols: dict[str, np.ndarray]) -> None:
    """Write a complete store to `path` (a temporary name; the caller renames it)."""
    n = len(cols["id"]) if cols else 0
    with h5py.File(path, "w") as f:
        f.attrs["schema"] = SCHEMA
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["created_with"] = f"comp-mer {__version__}"
        if header.extraction_spec is not None:
            f.attrs["extraction_spec"] = canonical_json(header.extraction_spec)
            f.attrs["spec_hash"] = header.spec_hash
        else:
            f.attrs["source"] = header.source
        f.attrs["task"] = header.task
        f.attrs["label_names"] = json.dumps(list(header.label_names), ensure_ascii=False)
        c = f.create_group("clips")
        for name in STRING_COLUMNS:
            c.create_dataset(name, data=cols[name].astype(object) if n else np.array([], dtype=object),
                             dtype=_STR, maxshape=(None,))
        for name, dt in (("position", np.int64), ("fold", np.int64), ("value", np.float32),
                         ("duration_s", np.float32)):
            c.create_dataset(name, data=cols[name].astype(dt) if n else np.zeros(0, dt), maxshape=(None,))
        for m in MODALITIES:
            info = header.modalities[m]
            g = f.create_group(f"modalities/{m}")
            g.attrs.update({"encoder": info.encoder, "dim": info.dim, "layers": info.layers,
                            "pooling": info.pooling})
            feats = cols[f"{m}/features"] if n else np.zeros((0, info.dim), np.float32)
            g.create_dataset("features", data=feats.astype(np.float32), maxshape=(None, info.dim),
                             chunks=(max(1, min(n, 1024)), info.dim) if n else None)
            g.create_dataset("present", data=cols[f"{m}/present"] if n else np.zeros(0, bool), maxshape=(None,))
            g.create_dataset("reason", data=cols[f"{m}/reason"].astype(object) if n else np.array([], object),
                             dtype=_STR, maxshape=(None,))
        d = f.create_group("diagnostics")
        for k in sorted(k for k in cols if k.startswith("diag/")):
            d.create_dataset(k[len("diag/"):], data=cols[k].astype(np.float32), maxshape=(None,))
        # `done` last: a reader of a half-written file (never the committed one) sees no rows.
        c.create_dataset("done", data=cols["done"] if n else np.zeros(0, bool), maxshape=(None,))
        f.flush()


class StoreWriter:
    """Crash-safe appender for one store file. The single writer: use one per file, in one process.

    `add()` journals a batch of rows atomically; `commit()` folds the journal into the store file with an
    atomic rename. A rerun after `kill -9` calls `committed_ids()`/`journaled_ids()` to skip finished clips,
    and the next `commit()` picks up whatever the killed run had journaled.
    """

    def __init__(self, path: str | Path, header: StoreHeader, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.header = header
        self.journal = _journal_dir(self.path)
        if overwrite:
            if self.path.exists():
                self.path.unlink()
            shutil.rmtree(self.journal, ignore_errors=True)
        if self.path.exists():
            existing = read_header(self.path)
            self._check_compatible(existing)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._replace_with({})
        self.journal.mkdir(exist_ok=True)
        for chunk in self.journal.glob("*.npz"):
            meta = self._chunk_meta(chunk)
            if meta is not None and meta.get("spec_hash", "") != header.spec_hash:
                raise StoreError(f"{self.path}: its journal holds rows from a different extraction spec; "
                                 f"delete {self.journal} or pass --overwrite")

    def _check_compatible(self, existing: StoreHeader) -> None:
        if existing.spec_hash != self.header.spec_hash or existing.source != self.header.source:
            raise StoreError(
                f"{self.path} was written with a different extraction spec (hash {existing.spec_hash[:12] or '-'}"
                f" vs {self.header.spec_hash[:12] or '-'}); features from different settings must not be mixed. "
                "Pass --overwrite to redo it, or write to a new file.")
        if existing.task != self.header.task or tuple(existing.label_names) != tuple(self.header.label_names):
            if existing.label_names and self.header.label_names:
                raise StoreError(f"{self.path} has labels {list(existing.label_names)} ({existing.task}); "
                                 f"this run has {list(self.header.label_names)} ({self.header.task}). "
                                 "Pass --overwrite or write to a new file.")
        for m in MODALITIES:
            if existing.modalities[m].dim != self.header.modalities[m].dim:
                raise StoreError(f"{self.path}: {m} dim {existing.modalities[m].dim} != "
                                 f"{self.header.modalities[m].dim}")

    # -- what is already there -------------------------------------------------------------------
    def committed_status(self) -> dict[str, str]:
        """clip id -> status for every committed row."""
        with _open_read(self.path) as f:
            c = f["clips"]
            done = c["done"][()].astype(bool)
            ids = _read_str(c["id"])[done]
            status = _read_str(c["status"])[done]
        return dict(zip(ids.tolist(), status.tolist()))

    @staticmethod
    def _chunk_meta(chunk: Path) -> dict | None:
        try:
            with np.load(chunk, allow_pickle=False) as z:
                return json.loads(str(z["__meta__"]))
        except Exception:  # a chunk that cannot be read was never completed: ignore it
            return None

    def journaled_status(self) -> dict[str, str]:
        """clip id -> status for every row in complete journal chunks."""
        out: dict[str, str] = {}
        for chunk in sorted(self.journal.glob("*.npz")):
            meta = self._chunk_meta(chunk)
            if meta is not None:
                out.update(zip(meta["ids"], meta["status"]))
        return out

    def known_status(self) -> dict[str, str]:
        status = self.committed_status()
        status.update(self.journaled_status())
        return status

    # -- writing ---------------------------------------------------------------------------------
    def add(self, records: Sequence[ClipRecord]) -> None:
        """Journal a batch of finished rows (atomic: all of the batch or none of it)."""
        if not records:
            return
        cols = _records_to_columns(records, self.header)
        meta = {"ids": [r.id for r in records], "status": [r.status for r in records],
                "spec_hash": self.header.spec_hash}
        arrays = {k.replace("/", "__"): (v.astype(str) if v.dtype == object else v) for k, v in cols.items()}
        arrays["__meta__"] = np.array(json.dumps(meta))
        with atomic_open(self.journal / f"{uuid.uuid4().hex}.npz", "wb") as fh:
            np.savez(fh, **arrays)

    def _read_chunk(self, chunk: Path) -> dict[str, np.ndarray] | None:
        try:
            with np.load(chunk, allow_pickle=False) as z:
                cols = {k.replace("__", "/"): z[k] for k in z.files if k != "__meta__"}
        except Exception:
            log.warning("ignoring unreadable journal chunk %s", chunk)
            return None
        for name in STRING_COLUMNS:
            cols[name] = cols[name].astype(object)
        for m in MODALITIES:
            cols[f"{m}/reason"] = cols[f"{m}/reason"].astype(object)
        return cols

    def commit(self) -> int:
        """Fold the journal into the store file atomically; returns the number of rows committed."""
        chunks = sorted(self.journal.glob("*.npz"), key=lambda p: p.stat().st_mtime_ns)
        if not chunks:
            return 0
        new_parts = [c for c in (self._read_chunk(p) for p in chunks) if c is not None]
        new = _concat(new_parts)
        if new:
            # later rows win over earlier rows with the same id, inside the journal too
            _, last = np.unique(new["id"][::-1], return_index=True)
            keep = np.sort(len(new["id"]) - 1 - last)
            new = {k: v[keep] for k, v in new.items()}
            old = read_store(self.path, include_pending_warning=False)
            old_cols = _columns_from_store(old)
            old_keep = ~np.isin(old_cols["id"].astype(str), new["id"].astype(str))
            old_cols = {k: v[old_keep] for k, v in old_cols.items()}
            merged = _concat([old_cols, new]) or new
            self._replace_with(merged)
        for p in chunks:
            p.unlink(missing_ok=True)
        return len(new["id"]) if new else 0

    def _replace_with(self, cols: dict[str, np.ndarray]) -> None:
        with atomic_path(self.path) as tmp:
            _write_file(tmp, self.header, cols)

    def close(self) -> None:
        self.commit()
        try:
            self.journal.rmdir()
        except OSError:
            pass

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_store(path: str | Path, header: StoreHeader, records: Iterable[ClipRecord], *,
                overwrite: bool = False) -> None:
    """Write `records` to a store in one go (import, tests)."""
    with StoreWriter(path, header, overwrite=overwrite) as w:
        w.add(list(records))
