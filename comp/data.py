"""From the feature store to model batches: conversations, evaluation plans, normalisation, batching.

ComP sees a whole conversation at a time (docs/model.md §1): rows of the store are grouped by `conversation`
and ordered by `position`. Unlabelled rows (classification label "" / regression value NaN) stay in their
conversation as context and are predicted, but they take no part in the loss or the scores (`labelled`).

Evaluation plans (`plan_folds`); `TrainConfig.plan` names one, or `auto` takes the first that the store has:

1. `folds`: the store has `fold` > 0 (IEMOCAP sessions, RAVDESS actor groups): leave one fold out; validation
   conversations are held out of the training folds with a seed, never taken from the test fold;
2. `split`: the store has `split` values (CMU-MOSI): its train/val/test; without val rows, val is held out of train;
3. `random`: a seeded split by conversation into train/val/test, stratified by class (a conversation counts
   as its most frequent label), so that a small set keeps every class in every part where it can.

Validation held out of training (`TrainConfig.val_by`): when the evaluation is speaker-independent (no test
speaker speaks in the training conversations) and every conversation names its speaker(s), `auto` holds out
whole speakers (conversations that share a speaker stay together), so that selection is not made on voices
the model trained on; otherwise it holds out conversations at random. `speaker` insists (and also makes the
random split speaker-independent); `conversation` never groups.

`paper_protocol=True` gives the released code's view instead (docs/model.md §2.4, §6.3): no validation set,
the test conversations double as "val", and the store's own val split is left unused.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from comp.batch import ComPBatch
from comp.config import TrainConfig
from core.clip import MODALITIES as MODALITY_ORDER
from core.errors import CompError
from core.records import ZERO_VECTOR_REASON, StoreData

log = logging.getLogger(__name__)

STD_FLOOR = 1e-6  # a dimension with a smaller spread on the training rows is constant: leave it unscaled
VAL_STREAM = 7919  # numpy seed-sequence stream of the validation hold-out (apart from masks and init)


class DataError(CompError, ValueError):
    """The store cannot be used as asked; the message says why and what to do."""


# --------------------------------------------------------------------------------------- conversations

@dataclass(frozen=True, eq=False)
class Conversation:
    """One conversation's utterances in order; arrays share their first axis (length L).

    From `build_conversations`, `features` are read-only views (row blocks) of one array per modality that
    holds every conversation; `pack` batches straight from that array instead of copying it."""

    id: str
    clip_ids: np.ndarray  # object [L]
    features: Mapping[str, np.ndarray]  # modality -> float32 [L, D_m], zeros where absent
    present: np.ndarray  # bool [L, 3] in MODALITY_ORDER
    targets: np.ndarray  # int64 class index or float32 value [L]; 0 where unlabelled
    labelled: np.ndarray  # bool [L]
    fold: int = 0
    split: str = ""

    def __len__(self) -> int:
        return len(self.clip_ids)

    def with_present(self, present: np.ndarray) -> "Conversation":
        """A copy whose presence flags are `present`; features of absent modalities are zeroed."""
        present = np.asarray(present, dtype=bool)
        feats = {m: np.where(present[:, i:i + 1], self.features[m], np.float32(0))
                 for i, m in enumerate(MODALITY_ORDER)}
        return dataclasses.replace(self, features=feats, present=present)


def encode_targets(data: StoreData) -> tuple[np.ndarray, np.ndarray]:
    """(targets, labelled) per row: class index (int64) or value (float32); 0 where unlabelled."""
    if data.header.task == "classification":
        names = list(data.header.label_names)
        if not names:
            raise DataError("the store is a classification store with no label_names; re-import or re-extract "
                            "it with labels")
        index = {name: i for i, name in enumerate(names)}
        labels = np.asarray(data.label, dtype=object)
        labelled = np.array([lab != "" for lab in labels], dtype=bool)
        unknown = sorted({str(lab) for lab in labels[labelled] if lab not in index})
        if unknown:
            raise DataError(f"labels {unknown[:5]} are not among the store's label_names {names}; fix the "
                            "labels or the label_names of the store")
        targets = np.array([index.get(lab, 0) for lab in labels], dtype=np.int64)
        return targets, labelled
    values = np.asarray(data.value, dtype=np.float32)
    labelled = np.isfinite(values)
    return np.where(labelled, values, np.float32(0)).astype(np.float32), labelled


def build_conversations(data: StoreData, *, zero_vectors_present: bool = False) -> list[Conversation]:
    """Group the store's usable rows by conversation (sorted by id), utterances by (position, clip id).

    `zero_vectors_present` (docs/model.md §9.18, the released code's data path): a modality the store records
    absent because its source held an all-zero vector is fed as present, with its zero features, so simulated
    masks treat it like any other present input. Other absences stay absent.

    The features are held once: every conversation's `features[m]` is a read-only view of one float32
    [N, D_m] array per modality in conversation order. That array is `data.features[m]` itself when the
    store's usable rows already come in that order with zeros where absent (as `read_store` gives them), else
    one reordered copy.
    """
    usable = data.status == "ok"
    n_error = int(np.count_nonzero(~usable))
    stored = data.features
    if n_error:
        log.info("leaving out %d clip(s) that could not be decoded (status error)", n_error)
        data = dataclasses.replace(data, features={}).usable()  # the features are gathered once, below
    if len(data) == 0:
        raise DataError("the store has no usable clips; run comp-extract (or comp-import) first")
    targets, labelled = encode_targets(data)
    conv = data.conversation.astype(str)
    order = np.lexsort((data.ids.astype(str), data.position, conv))
    conv = conv[order]
    present = np.stack([data.present[m] for m in MODALITY_ORDER], axis=1)[order]
    if zero_vectors_present:
        zero = np.stack([np.asarray(data.reason[m]).astype(str) == ZERO_VECTOR_REASON for m in MODALITY_ORDER],
                        axis=1)[order]
        if zero.any():
            log.info("feeding %d all-zero source vector(s) as present inputs (zero_vectors_present)",
                     int(zero.sum()))
        present = present | zero
    rows = np.flatnonzero(usable)[order]  # stored row of each utterance, in conversation order
    feats = {m: _in_conversation_order(stored[m], rows, present[:, i]) for i, m in enumerate(MODALITY_ORDER)}
    ids, targets, labelled = data.ids[order], targets[order], labelled[order]
    fold, split = data.fold[order], data.split[order].astype(str)
    starts = np.flatnonzero(np.r_[True, conv[1:] != conv[:-1]])
    ends = np.r_[starts[1:], len(conv)]
    out = []
    for a, b in zip(starts, ends):
        name = str(conv[a])
        if np.any(fold[a:b] != fold[a]):
            raise DataError(f"conversation {name!r} has clips in different folds {sorted(set(fold[a:b]))}; a "
                            "conversation must lie in one fold")
        if np.any(split[a:b] != split[a]):
            raise DataError(f"conversation {name!r} has clips in different splits {sorted(set(split[a:b]))}; "
                            "a conversation must lie in one split")
        out.append(Conversation(id=name, clip_ids=ids[a:b], features={m: _read_only(f[a:b]) for m, f in feats.items()},
                                present=present[a:b], targets=targets[a:b], labelled=labelled[a:b],
                                fold=int(fold[a]), split=str(split[a])))
    return out


def _in_conversation_order(stored: np.ndarray, rows: np.ndarray, present: np.ndarray) -> np.ndarray:
    """float32 [len(rows), D]: `stored[rows]` with zeros where `present` is False; `stored` itself when that
    is already so (no copy), else one gathered copy."""
    if (len(rows) == len(stored) and np.array_equal(rows, np.arange(len(stored)))
            and stored.dtype == np.float32 and stored.flags.c_contiguous and not stored[~present].any()):
        return stored
    out = np.asarray(stored[rows], dtype=np.float32)
    out[~present] = 0  # zeros where absent, whatever the store holds there (never read without `present`)
    return out


def _read_only(view: np.ndarray) -> np.ndarray:
    view.flags.writeable = False  # the conversations share one array: a write into one would reach the others
    return view


def select(conversations: Sequence[Conversation], ids: Sequence[str]) -> list[Conversation]:
    """The conversations named by `ids`, in the order of `ids`."""
    by_id = {c.id: c for c in conversations}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(f"unknown conversation id(s) {missing[:5]}")
    return [by_id[i] for i in ids]


# --------------------------------------------------------------------------------------- normalisation

@dataclass(frozen=True, eq=False)
class Normalizer:
    """Per-dimension standardisation fitted on present training rows; absent rows stay exactly zero.

    Fit it on the training conversations only: statistics of validation or test rows would leak into
    training. `identity` keeps the raw features (the released code's data path)."""

    mean: Mapping[str, np.ndarray]
    std: Mapping[str, np.ndarray]

    @classmethod
    def identity(cls, dims: Mapping[str, int]) -> "Normalizer":
        """No scaling (mean 0, std 1): features reach the model as stored (docs/model.md §9.17)."""
        return cls({m: np.zeros(dims[m], np.float32) for m in MODALITY_ORDER},
                   {m: np.ones(dims[m], np.float32) for m in MODALITY_ORDER})

    @property
    def is_identity(self) -> bool:
        """True when it changes nothing (mean 0, std 1 everywhere)."""
        return all(not self.mean[m].any() and bool(np.all(self.std[m] == 1)) for m in MODALITY_ORDER)

    @classmethod
    def fit(cls, conversations: Sequence[Conversation]) -> "Normalizer":
        if not conversations:
            raise DataError("cannot fit feature normalisation on zero conversations")
        mean, std = {}, {}
        for i, m in enumerate(MODALITY_ORDER):
            rows = np.concatenate([c.features[m][c.present[:, i]] for c in conversations]).astype(np.float64)
            dim = conversations[0].features[m].shape[1]
            if len(rows) == 0:
                log.warning("no training clip has %s; its features are left unscaled", m)
                mean[m], std[m] = np.zeros(dim, np.float32), np.ones(dim, np.float32)
                continue
            s = rows.std(axis=0)
            mean[m] = rows.mean(axis=0).astype(np.float32)
            std[m] = np.where(s < STD_FLOOR, 1.0, s).astype(np.float32)
        return cls(mean, std)

    def transform(self, features: Mapping[str, np.ndarray], present: np.ndarray) -> dict[str, np.ndarray]:
        """Standardise `features` (modality -> [..., D]); rows where `present[..., i]` is False become 0."""
        present = np.asarray(present, dtype=bool)
        return {m: np.where(present[..., i:i + 1], (features[m] - self.mean[m]) / self.std[m],
                            np.float32(0)).astype(np.float32)
                for i, m in enumerate(MODALITY_ORDER)}

    def apply(self, conversations: Sequence[Conversation]) -> list[Conversation]:
        """Standardised copies of `conversations` (training standardises per batch instead: `pack`)."""
        return [dataclasses.replace(c, features=self.transform(c.features, c.present)) for c in conversations]

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, for the checkpoint's JSON meta."""
        return {"mean": {m: self.mean[m].tolist() for m in MODALITY_ORDER},
                "std": {m: self.std[m].tolist() for m in MODALITY_ORDER}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Normalizer":
        try:
            mean = {m: np.asarray(data["mean"][m], dtype=np.float32) for m in MODALITY_ORDER}
            std = {m: np.asarray(data["std"][m], dtype=np.float32) for m in MODALITY_ORDER}
        except (KeyError, TypeError) as err:
            raise DataError(f"normaliser record lacks {err}; it needs mean/std for {MODALITY_ORDER}") from None
        for m in MODALITY_ORDER:
            if mean[m].shape != std[m].shape or mean[m].ndim != 1 or np.any(std[m] <= 0):
                raise DataError(f"normaliser record for {m} is malformed (shapes {mean[m].shape}/{std[m].shape}, "
                                "std must be positive)")
        return cls(mean, std)


# ------------------------------------------------------------------------------------------------ plans

@dataclass(frozen=True)
class FoldPlan:
    """Which conversations train, select and test one run. `val_is_test`: the paper's protocol."""

    name: str  # the held-out fold ("1".."K") or "split"
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    val_is_test: bool = False


@dataclass(frozen=True)
class _Table:
    """One entry per conversation of the usable rows, conversation ids sorted."""

    names: np.ndarray  # str [K]
    fold: np.ndarray  # int [K]
    split: np.ndarray  # str [K]
    has_label: np.ndarray  # bool [K]
    speakers: tuple[frozenset[str], ...]  # [K] the speakers of each conversation ("" left out)
    stratum: np.ndarray  # int [K] most frequent class of the conversation's labelled rows (regression: 0)


def _conversation_table(data: StoreData) -> _Table:
    data = data.usable()
    targets, labelled = encode_targets(data)
    conv = data.conversation.astype(str)
    names, inverse = np.unique(conv, return_inverse=True)
    first = np.full(len(names), -1)
    first[inverse[::-1]] = np.arange(len(conv))[::-1]
    fold, split = data.fold[first], data.split.astype(str)[first]
    if np.any(data.fold != fold[inverse]) or np.any(data.split.astype(str) != split[inverse]):
        bad = names[np.unique(inverse[(data.fold != fold[inverse]) | (data.split.astype(str) != split[inverse])])]
        raise DataError(f"conversation(s) {bad[:5].tolist()} have clips in different folds or splits; a "
                        "conversation must lie in one fold and one split")
    has_label = np.zeros(len(names), dtype=bool)
    np.logical_or.at(has_label, inverse, labelled)
    speakers: list[set[str]] = [set() for _ in names]
    for k, speaker in zip(inverse, data.speaker.astype(str)):
        if speaker:
            speakers[k].add(speaker)
    stratum = np.zeros(len(names), dtype=np.int64)
    if data.header.task == "classification":
        counts = np.zeros((len(names), len(data.header.label_names)), dtype=np.int64)
        np.add.at(counts, (inverse[labelled], targets[labelled]), 1)
        stratum = counts.argmax(axis=1)
    return _Table(names, fold, split, has_label, tuple(frozenset(s) for s in speakers), stratum)


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


def speaker_groups(speakers: Sequence[frozenset[str]]) -> np.ndarray | None:
    """Group index per conversation, conversations that share a speaker in one group; None when any
    conversation has no speaker (then nothing can be held out by speaker)."""
    if not speakers or any(not s for s in speakers):
        return None
    parent = list(range(len(speakers)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, names in enumerate(speakers):
        for name in names:
            if name in owner:
                parent[find(i)] = find(owner[name])
            else:
                owner[name] = i
    roots = [find(i) for i in range(len(speakers))]
    return np.unique(roots, return_inverse=True)[1]


def _by_speaker(table: _Table, pool: np.ndarray, others: np.ndarray, how: str, where: str) -> np.ndarray | None:
    """Speaker groups of the `pool` conversations when validation is to be held out by speaker, else None.

    auto: by speaker when every conversation has a speaker, the evaluation part (`others`) shares no speaker
    with the pool (a speaker-independent protocol) and the pool holds at least two speaker groups.
    """
    if how == "conversation":
        return None
    speakers = [table.speakers[i] for i in np.flatnonzero(pool)]
    groups = speaker_groups(speakers)
    outside = frozenset().union(*(table.speakers[i] for i in np.flatnonzero(others)))
    independent = groups is not None and not outside & frozenset().union(*speakers)
    if groups is not None and independent and groups.max() >= 1:
        return groups
    if how == "speaker":
        why = ("some conversations have no speaker" if groups is None else
               "the training conversations share speakers with the test ones" if not independent else
               "the training conversations all share one speaker group")
        raise DataError(f"{where}: val_by=speaker, but {why}; set val_by=conversation (or auto)")
    if groups is not None and not independent:
        log.info("%s: test speakers also speak in training, so validation is held out by conversation", where)
    return None


def _hold_out(pool: np.ndarray, fraction: float, rng: np.random.Generator, where: str,
              groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out): a seeded `fraction` of `pool` (at least one when fraction > 0, at least one kept).

    With `groups` (one group index per pool entry, e.g. speakers), whole groups are held out: groups in a
    seeded order until at least `fraction` of the pool is held out, always keeping one group.
    """
    if fraction <= 0:
        return pool, pool[:0]
    if len(pool) < 2:
        raise DataError(f"{where}: only {len(pool)} labelled training conversation(s), so none can be held out "
                        "for validation; add conversations or set val_fraction=0 (the last epoch is then kept)")
    n_val = min(max(1, _round(fraction * len(pool))), len(pool) - 1)
    if groups is None:
        perm = rng.permutation(len(pool))
        return np.sort(pool[perm[n_val:]]), np.sort(pool[perm[:n_val]])
    held = np.zeros(len(pool), dtype=bool)
    order = rng.permutation(int(groups.max()) + 1)
    for g in order[:-1]:  # the last group in the order always trains
        if held.sum() >= n_val:
            break
        held |= groups == g
    return np.sort(pool[~held]), np.sort(pool[held])


def _parse_folds(spec: str, available: Sequence[int]) -> list[int]:
    text = str(spec).strip().lower()
    if text == "all":
        return list(available)
    try:
        wanted = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DataError(f"folds {spec!r}: use 'all' or fold numbers separated by commas, e.g. 1,3") from None
    unknown = sorted(set(wanted) - set(available))
    if not wanted or unknown:
        raise DataError(f"folds {spec!r}: the store has folds {list(available)}; {unknown or 'none'} requested "
                        "do not exist")
    return sorted(set(wanted))


def plan_folds(data: StoreData, cfg: TrainConfig, *, paper_protocol: bool = False) -> list[FoldPlan]:
    """The runs' train/val/test conversation ids (see the module docstring for the plans and `cfg.plan`)."""
    table = _conversation_table(data)
    if len(table.names) == 0:
        raise DataError("the store has no usable clips; run comp-extract (or comp-import) first")
    has_folds, has_split = bool(np.any(table.fold > 0)), bool(np.any(table.split != ""))
    plan = cfg.plan
    if plan == "auto":
        plan = "folds" if has_folds else "split" if has_split else "random"
    if plan != "folds" and str(cfg.folds).strip().lower() != "all":
        raise DataError(f"folds={cfg.folds!r} was asked for, but the run uses the {plan} plan; leave folds at "
                        "'all'" + (" or set plan=folds" if has_folds else ""))
    if plan == "folds":
        if not has_folds:
            raise DataError("plan=folds, but the store has no fold values; use plan=split or plan=random")
        return _plan_leave_one_fold_out(table, cfg, paper_protocol)
    if plan == "split":
        if not has_split:
            raise DataError("plan=split, but the store has no split values; use plan=folds or plan=random")
        return [_plan_store_split(table, cfg, paper_protocol)]
    return [_plan_random_split(table, cfg, paper_protocol)]


def _plan_leave_one_fold_out(table: _Table, cfg: TrainConfig, paper_protocol: bool) -> list[FoldPlan]:
    names, fold, has_label = table.names, table.fold, table.has_label
    available = sorted(int(f) for f in set(fold.tolist()) if f > 0)
    if len(available) < 2:
        raise DataError(f"the store has a single fold ({available[0]}); leave-one-fold-out needs at least two. "
                        "Set fold to 0 for every clip to get a random split instead")
    unfolded = names[fold <= 0]
    if len(unfolded):
        log.info("%d conversation(s) have fold 0: they are used for training in every fold", len(unfolded))
    plans = []
    for k in _parse_folds(cfg.folds, available):
        test = names[fold == k]
        rest = names[fold != k]
        if paper_protocol:
            plans.append(FoldPlan(str(k), tuple(rest), tuple(test), tuple(test), val_is_test=True))
            continue
        pool = (fold != k) & has_label
        groups = _by_speaker(table, pool, fold == k, cfg.val_by, f"fold {k}")
        rng = np.random.default_rng([int(cfg.seed), VAL_STREAM, k])
        _, val = _hold_out(names[pool], cfg.val_fraction, rng, f"fold {k}", groups)
        train = np.setdiff1d(rest, val)
        plans.append(FoldPlan(str(k), tuple(train), tuple(val), tuple(test)))
        _warn_unlabelled(f"fold {k}", test, names, has_label)
    return plans


def _plan_store_split(table: _Table, cfg: TrainConfig, paper_protocol: bool) -> FoldPlan:
    names, split, has_label = table.names, table.split, table.has_label
    unsplit = names[split == ""]
    if len(unsplit):
        raise DataError(f"{len(unsplit)} conversation(s) (e.g. {unsplit[0]!r}) have no split while others do; "
                        "give every clip train/val/test, or none (a random split is made then)")
    train, val, test = names[split == "train"], names[split == "val"], names[split == "test"]
    if len(test) == 0 or len(train) == 0:
        raise DataError(f"the store's split has {len(train)} train and {len(test)} test conversations; both are "
                        "needed")
    if paper_protocol:
        if len(val):
            log.info("paper protocol: the store's %d val conversation(s) are not used (as in the released code)",
                     len(val))
        return FoldPlan("split", tuple(train), tuple(test), tuple(test), val_is_test=True)
    if len(val) == 0:
        rng = np.random.default_rng([int(cfg.seed), VAL_STREAM, 0])
        pool = (split == "train") & has_label
        groups = _by_speaker(table, pool, split == "test", cfg.val_by, "split")
        _, val = _hold_out(names[pool], cfg.val_fraction, rng, "split", groups)
        train = np.setdiff1d(train, val)
    _warn_unlabelled("split", test, names, has_label)
    return FoldPlan("split", tuple(train), tuple(val), tuple(test))


def _plan_random_split(table: _Table, cfg: TrainConfig, paper_protocol: bool) -> FoldPlan:
    names, has_label = table.names, table.has_label
    pool = names[has_label]
    n = len(pool)
    n_val = 0 if (paper_protocol or cfg.val_fraction <= 0) else max(1, _round(cfg.val_fraction * n))
    n_test = max(1, _round(cfg.test_fraction * n))
    need = 2 + (n_val > 0)
    if n < need:
        raise DataError(f"the store has no split or fold, so comp-train splits it by conversation into "
                        f"train/{'val/' if n_val else ''}test, which needs at least {need} labelled conversations; "
                        f"it has {n} (a clip without a conversation counts as one). Add labelled clips, or set "
                        "split/fold in the store")
    while n_test + n_val > n - 1:  # keep at least one for training; shrink the larger part first
        if n_test >= n_val and n_test > 1:
            n_test -= 1
        else:
            n_val -= 1
    rng = np.random.default_rng([int(cfg.seed), VAL_STREAM, 0])
    if cfg.val_by == "speaker":
        test, val = _speaker_random_split(table, has_label, n_test, n_val, rng)
    else:
        order = pool[_stratified_order(table.stratum[has_label], rng)]
        test, val = np.sort(order[:n_test]), np.sort(order[n_test:n_test + n_val])
    train = np.setdiff1d(names, np.concatenate([test, val]))  # unlabelled conversations join training
    if paper_protocol:
        return FoldPlan("split", tuple(train), tuple(test), tuple(test), val_is_test=True)
    return FoldPlan("split", tuple(train), tuple(val), tuple(test))


def _stratified_order(stratum: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seeded order of the entries in which every prefix holds each stratum (class) in proportion.

    Systematic sampling: the i-th of a stratum's n_s entries (in random order) gets the key (i + u_s) / n_s
    with one random offset u_s per stratum; sorting by key interleaves the strata, so the first n_test entries
    (test) and the next n_val (validation) hold each class about in its share, and every class with at least
    three conversations reaches train, validation and test.
    """
    keys = np.empty(len(stratum))
    for s in np.unique(stratum):
        members = np.flatnonzero(stratum == s)
        keys[rng.permutation(members)] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.argsort(keys, kind="stable")


def _speaker_random_split(table: _Table, has_label: np.ndarray, n_test: int, n_val: int,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(test, val) made of whole speaker groups, at least `n_test` / `n_val` conversations each."""
    groups = speaker_groups(table.speakers)
    if groups is None or groups.max() < 1 + (n_val > 0):
        raise DataError("val_by=speaker: a speaker-independent random split needs a speaker for every "
                        "conversation and at least three speaker groups; set val_by=conversation")
    part = np.zeros(len(table.names), dtype=int)  # 0 train, 1 test, 2 val
    order = rng.permutation(int(groups.max()) + 1)
    for g in order[:-1]:  # the last group in the order always trains
        if np.count_nonzero(has_label & (part == 1)) < n_test:
            part[groups == g] = 1
        elif np.count_nonzero(has_label & (part == 2)) < n_val:
            part[groups == g] = 2
        else:
            break
    return np.sort(table.names[(part == 1) & has_label]), np.sort(table.names[(part == 2) & has_label])


def _warn_unlabelled(where: str, test: np.ndarray, names: np.ndarray, has_label: np.ndarray) -> None:
    if len(test) and not np.any(has_label[np.isin(names, test)]):
        log.warning("%s: no test conversation has a label; its scores will be NaN", where)


# --------------------------------------------------------------------------------------------- batching

@dataclass(frozen=True, eq=False)
class Batch:
    """A `ComPBatch` plus what maps its predictions back: clip ids (None at padding) and scored rows."""

    batch: ComPBatch
    clip_ids: np.ndarray  # object [B, S]
    labelled: torch.Tensor  # bool [B, S]: real utterances with a label (loss and scores)
    conversation_ids: tuple[str, ...]

    def with_present(self, present: torch.Tensor) -> "Batch":
        """A copy with presence flags `present` [B, S, 3]; features of absent modalities are zeroed."""
        feats = {}
        for i, m in enumerate(MODALITY_ORDER):
            x = self.batch.features[m]
            if x.device.type == "cpu":  # numpy's where is several times faster than torch ops on a busy CPU
                keep = present[..., i:i + 1].cpu().numpy()
                feats[m] = torch.from_numpy(np.where(keep, x.numpy(), np.zeros((), x.numpy().dtype)))
            else:
                feats[m] = x * present[..., i:i + 1].to(device=x.device, dtype=x.dtype)
        return dataclasses.replace(self, batch=_replace(self.batch, features=feats, present=present))


def _replace(obj: Any, **changes: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **changes)
    return obj._replace(**changes)  # a NamedTuple


@dataclass(frozen=True, eq=False)
class PackedConversations:
    """Conversations laid end to end as rows of shared feature arrays, plus one padding row, built once.

    The features are not copied: `rows[m]` says which row of `features[m]` each utterance is, and each batch
    gathers its rows, standardises them with `normalizer` and zeroes absent modalities (`present`)."""

    conversations: tuple[Conversation, ...]
    offsets: np.ndarray  # int64 [C]
    lengths: np.ndarray  # int64 [C]
    features: Mapping[str, np.ndarray]  # float32 [R_m, D_m]: the arrays the rows point into (shared)
    rows: Mapping[str, np.ndarray]  # int64 [N + 1] row of features[m] per utterance; the padding row's is 0
    present: np.ndarray  # bool [N + 1, 3]; False on the padding row
    targets: np.ndarray  # [N + 1]
    labelled: np.ndarray  # bool [N + 1]
    clip_ids: np.ndarray  # object [N + 1]
    normalizer: Normalizer | None = None  # standardises each batch; None: features as held

    def __len__(self) -> int:
        return len(self.conversations)

    def with_present(self, present: np.ndarray) -> "PackedConversations":
        """The same conversations with presence flags `present` (bool [N, 3], utterances in order); batches
        zero the features of modalities that are absent there."""
        present = np.asarray(present, dtype=bool)
        if present.shape != (len(self.present) - 1, len(MODALITY_ORDER)):
            raise ValueError(f"present must be [{len(self.present) - 1}, {len(MODALITY_ORDER)}], got "
                             f"{present.shape}")
        return dataclasses.replace(self, present=np.concatenate([present, np.zeros((1, present.shape[1]), bool)]))

    def gather(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Features of the utterances at `index` (any int shape [...], N = padding): float32 [..., D_m],
        standardised, zeros where absent."""
        present = self.present[index]
        out = {}
        for i, m in enumerate(MODALITY_ORDER):
            keep = present[..., i]
            x = self.features[m][self.rows[m][index[keep]]]  # present rows only; the shared array is never written
            if self.normalizer is not None:
                x -= self.normalizer.mean[m]
                x /= self.normalizer.std[m]
            out[m] = np.zeros(index.shape + x.shape[1:], dtype=np.float32)
            out[m][keep] = x
        return out


def _rows_of(views: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """(array, row index per stacked row) when every view is a block of whole rows of one float32
    C-contiguous array (as `build_conversations` makes them), else None."""
    base = views[0].base
    if not (isinstance(base, np.ndarray) and base.ndim == 2 and base.dtype == np.float32
            and base.flags.c_contiguous and len(base) and base.strides[0] > 0):
        return None
    origin, row_bytes = base.__array_interface__["data"][0], base.strides[0]
    starts = np.empty(len(views), dtype=np.int64)
    for k, v in enumerate(views):
        if v.base is not base or v.ndim != 2 or v.shape[1] != base.shape[1] or v.strides != base.strides:
            return None
        offset = v.__array_interface__["data"][0] - origin
        if offset % row_bytes or not 0 <= offset // row_bytes <= len(base) - len(v):
            return None
        starts[k] = offset // row_bytes
    lengths = np.array([len(v) for v in views], dtype=np.int64)
    rows = np.repeat(starts - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(int(lengths.sum()))
    return base, rows


def pack(conversations: Sequence[Conversation] | PackedConversations,
         normalizer: Normalizer | None = None) -> PackedConversations:
    """Lay the conversations end to end once, so that every batch is one gather per array.

    Features that are views of one array (`build_conversations`) are indexed, not copied; others are
    concatenated once. `normalizer` standardises every batch (None or the identity: features as held).
    """
    norm = None if normalizer is None or normalizer.is_identity else normalizer
    if isinstance(conversations, PackedConversations):
        if norm is not None and conversations.normalizer is not None and conversations.normalizer is not norm:
            raise DataError("these conversations are already packed with another normaliser")
        return conversations if norm is None else dataclasses.replace(conversations, normalizer=norm)
    if not conversations:
        raise DataError("no conversations to batch")
    convs = tuple(conversations)
    lengths = np.array([len(c) for c in convs], dtype=np.int64)
    offsets = np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64)

    def flat(get, pad_value, dtype=None) -> np.ndarray:
        arr = np.concatenate([get(c) for c in convs])
        pad = np.full((1,) + arr.shape[1:], pad_value, dtype=arr.dtype if dtype is None else dtype)
        return np.concatenate([arr, pad])

    features, rows = {}, {}
    for m in MODALITY_ORDER:
        shared = _rows_of([c.features[m] for c in convs])
        if shared is None:  # conversations made some other way: one copy, in order
            features[m] = np.concatenate([np.asarray(c.features[m], dtype=np.float32) for c in convs])
            shared = (features[m], np.arange(len(features[m]), dtype=np.int64))
        features[m], rows[m] = shared[0], np.r_[shared[1], 0].astype(np.int64)
    return PackedConversations(
        conversations=convs, offsets=offsets, lengths=lengths, features=features, rows=rows,
        present=flat(lambda c: c.present, False), targets=flat(lambda c: c.targets, 0),
        labelled=flat(lambda c: c.labelled, False),
        clip_ids=flat(lambda c: np.asarray(c.clip_ids, dtype=object), None, object), normalizer=norm)


def iterate_batches(conversations: Sequence[Conversation] | PackedConversations, batch_size: int,
                    shuffle: bool, rng: np.random.Generator | torch.Generator | None = None) -> Iterator[Batch]:
    """Batches of `batch_size` conversations, padded to the batch's longest conversation.

    Pass a `PackedConversations` (from `pack`) to avoid re-flattening every epoch. `rng` orders the
    conversations when `shuffle` (numpy or torch generator). Each batch's features are fresh arrays.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    packed = pack(conversations)
    n = len(packed)
    if not shuffle:
        order = np.arange(n)
    elif isinstance(rng, torch.Generator):
        order = torch.randperm(n, generator=rng).numpy()
    elif rng is not None:
        order = rng.permutation(n)
    else:
        raise ValueError("shuffle=True needs an rng")
    pad_row = len(packed.present) - 1
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        lengths = packed.lengths[idx]
        steps = np.arange(int(lengths.max()))
        valid = steps[None, :] < lengths[:, None]
        rows = np.where(valid, packed.offsets[idx][:, None] + steps[None, :], pad_row)
        b = ComPBatch(features={m: torch.from_numpy(x) for m, x in packed.gather(rows).items()},
                      present=torch.from_numpy(packed.present[rows]), valid=torch.from_numpy(valid),
                      targets=torch.from_numpy(packed.targets[rows]),
                      labelled=torch.from_numpy(packed.labelled[rows]))
        yield Batch(batch=b, clip_ids=packed.clip_ids[rows], labelled=b.labelled,
                    conversation_ids=tuple(packed.conversations[i].id for i in idx))
