"""Missing-modality masks: the shared IMER protocol's generator, fixed conditions, and how masks are applied.

A mask is a bool array [..., 3] in `MODALITIES` (audio, text, visual); True = the modality is kept.
Simulated masks are always ANDed with the store's natural `present` flags, so a modality the data lacks is
never brought back. Three conditions (`--missing`):

* ``natural``: the data as extracted, nothing removed;
* ``random:R``: the protocol of docs/model.md §3.2 (CPM-Nets / GCNet `random_mask`) at missing rate R;
* ``fixed:at`` (letters a=audio, t=text, v=visual): keep exactly those modalities for every utterance;
  ``fixed:a,t,at`` asks for several conditions, one run each (`MissingSpec.runs`).

Test masks are a function of (seed, set of clip ids) only, so every run and every model (ComP and the baselines)
sees the same mask on the same clip, whatever the batching or row order. Training masks are redrawn for every
batch from the run's Generator; the faithful protocol redraws test masks per batch too (`mask_batch`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from core.clip import MODALITIES

if TYPE_CHECKING:
    from comp.data import Batch, Conversation, PackedConversations

log = logging.getLogger(__name__)

MAX_RANDOM_RATE = 0.7  # the protocol's largest missing rate (realised as 2/3: one modality per utterance)
MIN_ROWS = 32  # random_mask corrects its ratio on at least this many rows (as the released code does)
TOLERANCE = 0.005  # |mean(mask) - (1 - MR)| the ratio correction stops at
MAX_TRIES = 10_000  # a safety net: stop and keep the closest draw rather than loop forever
LETTERS = {"a": "audio", "t": "text", "v": "visual"}
LETTERS_BY_MODALITY = {m: k for k, m in LETTERS.items()}
CONDITIONS = ("a", "t", "v", "at", "av", "tv", "atv")


# ------------------------------------------------------------------------------------------- generators

def random_mask(view_num: int, n: int, missing_rate: float, rng: np.random.Generator) -> np.ndarray:
    """bool [n, view_num]: the protocol's random missing pattern at `missing_rate` (docs/model.md §3.2).

    Every row keeps at least one view. MR >= 1 - 1/view_num (MR 0.7 for three views) gives exactly one view
    per row (a realised rate of 2/3). Otherwise the draw is repeated until the kept fraction is within 0.005
    of 1 - MR, computed on max(n, 32) rows; the first n rows are returned.
    """
    if view_num < 2:
        raise ValueError(f"random_mask needs at least 2 views, got {view_num}")
    if not 0.0 <= missing_rate < 1.0:
        raise ValueError(f"missing rate must be in [0, 1), got {missing_rate}")
    if n <= 0:
        return np.zeros((0, view_num), dtype=bool)
    one_rate = 1.0 - missing_rate
    eye = np.eye(view_num, dtype=bool)
    if one_rate <= 1.0 / view_num:
        return eye[rng.integers(0, view_num, size=n)]
    if one_rate == 1.0:
        return np.ones((n, view_num), dtype=bool)
    rows = max(n, MIN_ROWS)
    cells = view_num * rows
    # Same float expressions as the original, so int(100 * ratio) truncates exactly as it does there.
    one_num = view_num * rows * one_rate - rows
    # On fewer than 34 rows some rates have no kept-count within the tolerance and the original never stops;
    # there the closest reachable fraction is accepted instead.
    nearest = round(one_rate * cells)
    tolerance = max(TOLERANCE, min(abs(k / cells - one_rate) for k in (nearest - 1, nearest, nearest + 1)) + 1e-9)
    best, best_error = None, np.inf
    for _ in range(MAX_TRIES):
        preserve = eye[rng.integers(0, view_num, size=rows)]
        ratio = one_num / cells
        extra = rng.integers(0, 100, size=(rows, view_num)) < int(ratio * 100)
        overlap = int(np.count_nonzero(extra & preserve))
        if overlap >= one_num:  # the original divides by zero or goes negative here; draw again
            continue
        one_num_iter = one_num / (1 - overlap / one_num)
        ratio = one_num_iter / cells
        extra = rng.integers(0, 100, size=(rows, view_num)) < int(ratio * 100)
        matrix = extra | preserve
        error = abs(one_rate - np.count_nonzero(matrix) / cells)
        if error < best_error:
            best, best_error = matrix, error
        if error < tolerance:
            return matrix[:n]
    log.warning("random_mask: no draw within %.3f of keep-rate %.3f on %d rows after %d tries; using the "
                "closest (off by %.4f)", TOLERANCE, one_rate, rows, MAX_TRIES, best_error)
    return best[:n]


def condition_mask(condition: str, n: int) -> np.ndarray:
    """bool [n, 3]: keep exactly the modalities named by `condition` (letters of a, t, v, e.g. "at")."""
    keep = _normalise_condition(condition)
    row = np.array([LETTERS_BY_MODALITY[m] in keep for m in MODALITIES], dtype=bool)
    return np.broadcast_to(row, (n, len(MODALITIES))).copy()



def _normalise_condition(condition: str) -> str:
    """Letters in a, t, v order ("ta" -> "at"); a clear error for anything else."""
    cond = condition.strip().lower()
    if not cond or set(cond) - set(LETTERS) or len(set(cond)) != len(cond):
        raise ValueError(f"fixed condition {condition!r}: use one or more distinct letters of a (audio), "
                         f"t (text), v (visual), e.g. one of {', '.join(CONDITIONS)}")
    return "".join(k for k in "atv" if k in cond)


# ------------------------------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class MissingSpec:
    """A parsed `--missing` value. `conditions` holds one or more fixed conditions (kind "fixed")."""

    kind: Literal["natural", "random", "fixed"]
    rate: float = 0.0
    conditions: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """The run record's "condition" string: natural | random:0.3 | fixed:at (| fixed:a,t for several)."""
        if self.kind == "natural":
            return "natural"
        if self.kind == "random":
            return f"random:{self.rate:g}"
        return "fixed:" + ",".join(self.conditions)

    def runs(self) -> list["MissingSpec"]:
        """One spec per trained model: a fixed spec with several conditions splits into one per condition."""
        if self.kind == "fixed" and len(self.conditions) > 1:
            return [MissingSpec("fixed", conditions=(c,)) for c in self.conditions]
        return [self]

    def simulate(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """bool [n, 3]: the simulated pattern for n utterances, before it meets the natural flags."""
        if self.kind == "natural":
            return np.ones((n, len(MODALITIES)), dtype=bool)
        if self.kind == "random":
            return random_mask(len(MODALITIES), n, self.rate, rng)
        if len(self.conditions) != 1:
            raise ValueError(f"{self.label} names {len(self.conditions)} conditions; train and test one at a "
                             "time (MissingSpec.runs())")
        return condition_mask(self.conditions[0], n)


def parse_missing(spec: str) -> MissingSpec:
    """`natural`, `random:R` (0 <= R <= 0.7) or `fixed:C[,C...]` with C from a, t, v, at, av, tv, atv."""
    text = str(spec).strip()
    hint = ("use 'natural', 'random:R' with R in [0, 0.7] (e.g. random:0.3), or 'fixed:' followed by "
            f"one or more of {','.join(CONDITIONS)} (e.g. fixed:at)")
    kind, _, arg = text.partition(":")
    kind = kind.strip().lower()
    if kind == "natural" and not arg:
        return MissingSpec("natural")
    if kind == "random" and arg:
        try:
            rate = float(arg)
        except ValueError:
            raise ValueError(f"missing {spec!r}: {arg!r} is not a number; {hint}") from None
        if not 0.0 <= rate <= MAX_RANDOM_RATE:
            raise ValueError(f"missing {spec!r}: rate {rate} is outside [0, {MAX_RANDOM_RATE}] (every utterance "
                             f"must keep at least one modality); {hint}")
        return MissingSpec("random", rate=rate)
    if kind == "fixed" and arg:
        try:
            conds = tuple(dict.fromkeys(_normalise_condition(c) for c in arg.split(",")))
        except ValueError as err:
            raise ValueError(f"missing {spec!r}: {err}; {hint}") from None
        return MissingSpec("fixed", conditions=conds)
    raise ValueError(f"missing {spec!r} is not understood; {hint}")


# ------------------------------------------------------------------------------------------- application

def combine(natural: np.ndarray, simulated: np.ndarray) -> tuple[np.ndarray, int]:
    """(natural AND simulated, number of rows left with no modality at all). Such rows are kept: the model
    masks them; the count is for the log and the report."""
    mask = np.logical_and(natural, simulated)
    return mask, int(np.count_nonzero(~mask.any(axis=-1)))


def stable_seed(seed: int, ids: Sequence[str]) -> int:
    """A 128-bit seed from (seed, the set of clip ids): independent of row order and of the process."""
    h = hashlib.sha256(f"comp-test-mask:{int(seed)}".encode())
    for clip in sorted(ids):
        h.update(b"\0" + str(clip).encode("utf-8"))
    return int.from_bytes(h.digest()[:16], "little")


def test_mask(spec: MissingSpec, ids: Sequence[str], natural: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
    """(bool [n, 3] mask for clips `ids` whose natural flags are `natural` [n, 3], all-absent count).

    The simulated pattern is drawn once for the whole set, in sorted-id order, from a Generator seeded by
    (seed, ids): the same clip gets the same mask in every run, model and batching.
    """
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise ValueError("test_mask: clip ids must be unique")
    order = np.argsort(np.array(ids, dtype=object), kind="stable")
    rng = np.random.default_rng(stable_seed(seed, ids))
    drawn = spec.simulate(len(ids), rng)
    simulated = np.empty_like(drawn)
    simulated[order] = drawn  # row k of the draw belongs to the k-th smallest id
    return combine(np.asarray(natural, dtype=bool), simulated)


def mask_conversations(conversations: Sequence["Conversation"], spec: MissingSpec,
                       seed: int) -> tuple[list["Conversation"], int]:
    """Apply the fixed, seeded test masks to whole conversations (clean protocol). Returns the masked
    conversations (absent features zeroed) and how many utterances were left with no modality."""
    if spec.kind == "natural" or not conversations:
        return list(conversations), sum(int(np.count_nonzero(~c.present.any(axis=1))) for c in conversations)
    ids = np.concatenate([c.clip_ids for c in conversations])
    natural = np.concatenate([c.present for c in conversations])
    mask, all_absent = test_mask(spec, ids.tolist(), natural, seed)
    bounds = np.cumsum([0] + [len(c) for c in conversations])
    out = [c.with_present(mask[a:b]) for c, a, b in zip(conversations, bounds[:-1], bounds[1:])]
    if all_absent:
        log.info("%s: %d of %d test utterances have no modality left (kept; the model masks them)",
                 spec.label, all_absent, len(ids))
    return out, all_absent


def mask_packed(packed: "PackedConversations", spec: MissingSpec, seed: int) -> tuple["PackedConversations", int]:
    """`mask_conversations` for packed conversations: the same fixed, seeded masks, as presence flags only
    (batches zero the removed features), so no feature is copied. Returns (masked, all-absent count)."""
    natural = packed.present[:-1]
    if spec.kind == "natural":
        return packed, int(np.count_nonzero(~natural.any(axis=1)))
    mask, all_absent = test_mask(spec, packed.clip_ids[:-1].tolist(), natural, seed)
    if all_absent:
        log.info("%s: %d of %d test utterances have no modality left (kept; the model masks them)",
                 spec.label, all_absent, len(natural))
    return packed.with_present(mask), all_absent


def mask_batch(batch: "Batch", spec: MissingSpec, rng: np.random.Generator) -> tuple["Batch", int]:
    """A fresh simulated mask for one batch (training; test batches of the faithful protocol).

    Drawn over the batch's real utterances only (padding takes no part in the rate), ANDed with the natural
    flags; features of removed modalities are zeroed. Returns (masked batch, all-absent count).
    """
    valid = batch.batch.valid.cpu().numpy()
    natural = batch.batch.present.cpu().numpy()
    if spec.kind == "natural":
        return batch, int(np.count_nonzero(valid & ~natural.any(axis=-1)))
    simulated = np.zeros_like(natural)
    simulated[valid] = spec.simulate(int(np.count_nonzero(valid)), rng)
    mask, _ = combine(natural, simulated)
    all_absent = int(np.count_nonzero(valid & ~mask.any(axis=-1)))
    return batch.with_present(torch.from_numpy(mask).to(batch.batch.present.device)), all_absent


# A name that pytest would otherwise collect as a test function when imported into a test module.
test_mask.__test__ = False  # type: ignore[attr-defined]

__all__ = ["MissingSpec", "parse_missing", "random_mask", "condition_mask", "combine", "stable_seed",
           "test_mask", "mask_conversations", "mask_packed", "mask_batch", "CONDITIONS"]
