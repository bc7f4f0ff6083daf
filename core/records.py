"""The feature store's records: what a store holds, as the extraction run, the importer and training see it.

`ClipRecord` is one row (a clip and its modalities, each a vector or the reason it is absent), `StoreHeader`
the file-level attributes (task, labels, what produced each modality, the extraction spec), and `StoreData`
the whole store in memory, column by column, as training reads it. The HDF5 layout that holds them is
`pipeline.store`. The extraction spec is identified by `spec_hash`, the sha256 of its canonical JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.clip import MODALITIES
from core.errors import CompError

TASKS = ("classification", "regression")
# The reason of a modality whose source held an all-zero vector: the public pre-extracted sets mark "absent"
# that way (no face found, ...). Recorded absent; training may feed it as a zero input (docs/model.md §9.18).
ZERO_VECTOR_REASON = "zero-vector (absent in source)"


class StoreError(CompError, RuntimeError):
    """The store cannot be read or written as asked; the message says why and what to do."""


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def spec_hash(spec: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of an extraction spec."""
    return hashlib.sha256(canonical_json(spec).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ModalityInfo:
    """What produced one modality's vectors; stored as attributes of `modalities/<name>`."""

    dim: int
    encoder: str = ""
    layers: str = ""
    pooling: str = ""


@dataclass(frozen=True)
class StoreHeader:
    """File-level attributes. Exactly one of `extraction_spec` (extracted) and `source` (imported) is set."""

    task: str
    label_names: tuple[str, ...]
    modalities: Mapping[str, ModalityInfo]
    extraction_spec: Mapping[str, Any] | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise StoreError(f"task must be one of {TASKS}, got {self.task!r}")
        if set(self.modalities) != set(MODALITIES):
            raise StoreError(f"modalities must be exactly {MODALITIES}, got {sorted(self.modalities)}")
        if (self.extraction_spec is None) == (self.source is None):
            raise StoreError("a store has either an extraction_spec (extracted) or a source (imported)")

    @property
    def spec_hash(self) -> str:
        return spec_hash(self.extraction_spec) if self.extraction_spec is not None else ""


@dataclass
class ModalityValue:
    """One modality of one clip: a vector when present, else None and the reason."""

    features: np.ndarray | None
    reason: str = ""

    def __post_init__(self) -> None:
        if self.features is None and not self.reason:
            raise StoreError("an absent modality needs a reason")
        if self.features is not None and self.reason:
            raise StoreError(f"a present modality has no reason (got {self.reason!r})")


@dataclass
class ClipRecord:
    """One row of the store."""

    id: str
    modalities: Mapping[str, ModalityValue]
    source: str = ""
    conversation: str = ""
    position: int = 0
    speaker: str = ""
    label: str = ""
    value: float = math.nan
    split: str = ""
    fold: int = 0
    duration_s: float = math.nan
    transcript: str = ""
    status: str = "ok"
    diagnostics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.id:
            raise StoreError("a clip needs a non-empty id")
        if not self.conversation:
            self.conversation = self.id  # a clip with no conversation is its own conversation
        if self.status not in ("ok", "error"):
            raise StoreError(f"status must be 'ok' or 'error', got {self.status!r}")
        if self.split not in ("train", "val", "test", ""):
            raise StoreError(f"split must be train/val/test or empty, got {self.split!r}")
        missing = set(MODALITIES) - set(self.modalities)
        if missing:
            raise StoreError(f"clip {self.id}: no entry for modality {sorted(missing)}")


@dataclass
class StoreData:
    """The whole store in memory, as comp-train and the baselines read it (done rows only)."""

    header: StoreHeader
    spec_hash: str
    ids: np.ndarray
    source: np.ndarray
    conversation: np.ndarray
    position: np.ndarray
    speaker: np.ndarray
    label: np.ndarray
    value: np.ndarray
    split: np.ndarray
    fold: np.ndarray
    duration_s: np.ndarray
    transcript: np.ndarray
    status: np.ndarray
    features: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    reason: dict[str, np.ndarray]
    diagnostics: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray) -> "StoreData":
        """Rows `index` (boolean mask or integer positions) as a new StoreData."""
        take = lambda a: a[index]  # noqa: E731
        return StoreData(
            header=self.header,
            spec_hash=self.spec_hash,
            ids=take(self.ids), source=take(self.source), conversation=take(self.conversation),
            position=take(self.position), speaker=take(self.speaker), label=take(self.label),
            value=take(self.value), split=take(self.split), fold=take(self.fold),
            duration_s=take(self.duration_s), transcript=take(self.transcript), status=take(self.status),
            features={m: take(v) for m, v in self.features.items()},
            present={m: take(v) for m, v in self.present.items()},
            reason={m: take(v) for m, v in self.reason.items()},
            diagnostics={k: take(v) for k, v in self.diagnostics.items()},
        )

    def usable(self) -> "StoreData":
        """Rows whose clip decoded (status ok); error rows carry no features."""
        return self.subset(self.status == "ok")
