"""Generated feature stores with known structure, for tests, benchmarks and baseline checks.

The generator is built so that the things ComP is about can be measured on it:

* **Each modality carries only part of the label.** For classification, every modality sees the class only
  through a coarse grouping of the classes (for 4 classes: audio tells {0,1} from {2,3}, text {0,2} from
  {1,3}, visual {0,3} from {1,2}; for K classes, classes are paired at random, a different pairing per
  modality). One modality alone can at best tell a class from its partner; any two resolve it. Each
  modality's group is a prototype in a random subspace of its feature space, plus isotropic noise.
  For regression the target is the sum of three factors, one seen by each modality.
* **Conversations matter** when `conversation_offset > 0`: a per-conversation latent skews the class
  prior and moves the conversation's baseline inside each modality's class subspace (classification), or
  shifts the value and the features with it (regression). A single utterance is then ambiguous, and a
  model that also sees the other utterances of its conversation (their mean, say) does better.
* **Natural missingness** is explicit, as the extractors record it: present=False, zero vector, and a reason
  such as "no-face" or "asr-no-speech"; never all three modalities of an utterance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np

from core.clip import MODALITIES
from core.records import ClipRecord, ModalityInfo, ModalityValue, StoreHeader, canonical_json
from pipeline.store import write_store

log = logging.getLogger(__name__)

DEFAULT_DIMS: Mapping[str, int] = MappingProxyType({"audio": 16, "text": 24, "visual": 12})
DEFAULT_SIGNAL: Mapping[str, float] = MappingProxyType({"audio": 0.6, "text": 0.6, "visual": 0.6})
DEFAULT_MISSING: Mapping[str, float] = MappingProxyType({"audio": 0.1, "text": 0.1, "visual": 0.1})
EMOTION_NAMES = ("happy", "sad", "neutral", "angry", "excited", "frustrated", "surprised", "fearful", "disgusted")
MISSING_REASONS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "audio": ("no-audio-stream", "silent"),
    "text": ("asr-no-speech", "asr-empty"),
    "visual": ("no-face", "too-few-face-frames: 2/32"),
})
SIGNAL_SCALE = 2.5  # half the distance between two group prototypes at signal 1.0, in units of feature noise 1.0
VALUE_SCALE = 1.2  # std of the regression target before clipping (offset 0): few values reach the clip
VALUE_RANGE = (-3.0, 3.0)  # CMU sentiment scale
SPLIT_SHARES = (0.7, 0.1, 0.2)  # train / val / test share of conversations
DURATION_RANGE_S = (1.0, 8.0)

# IEMOCAP-4 as docs/model.md §2.2 counts it: conversations and utterances per session (fold)
IEMOCAP_SESSIONS = ((28, 1085), (30, 1023), (32, 1151), (30, 1031), (31, 1241))
IEMOCAP_DIMS: Mapping[str, int] = MappingProxyType({"audio": 512, "text": 1024, "visual": 1024})
IEMOCAP_MAX_UTTERANCES = 110
IEMOCAP_MIN_UTTERANCES = 6


def class_names(n_classes: int) -> tuple[str, ...]:
    """Emotion names for the first classes, then class<k>."""
    return tuple(EMOTION_NAMES[k] if k < len(EMOTION_NAMES) else f"class{k}" for k in range(n_classes))


def modality_groups(n_classes: int, rng: np.random.Generator, tries: int = 200) -> np.ndarray:
    """[3, K] group id of each class as each modality sees it.

    Classes are paired (a random pairing per modality); a modality cannot tell the two classes of a pair
    apart. Among `tries` random pairings, the one where no pair of classes is merged by more than one
    modality wins, so any two modalities identify the class. With 2 classes nothing can be paired away:
    every modality sees the class, and only the noise makes it partial.
    """
    if n_classes <= 2:
        return np.tile(np.arange(n_classes), (len(MODALITIES), 1))
    best, best_score = None, None
    for _ in range(tries):
        groups = np.empty((len(MODALITIES), n_classes), dtype=np.int64)
        for m in range(len(MODALITIES)):
            perm = rng.permutation(n_classes)
            groups[m, perm] = np.arange(n_classes) // 2
        # merged[a, b]: how many modalities cannot tell class a from class b
        merged = sum((g[:, None] == g[None, :]).astype(int) for g in groups)
        merged -= len(MODALITIES) * np.eye(n_classes, dtype=int)
        score = (merged.max(), merged.sum())  # worst pair first, then how much is merged overall
        if best_score is None or score < best_score:
            best, best_score = groups, score
        if merged.max() <= 1:
            break
    return best


def _orthonormal(dim: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[k, dim] orthonormal rows: a random k-dimensional subspace of R^dim."""
    q, _ = np.linalg.qr(rng.standard_normal((dim, k)))
    return q.T.astype(np.float32)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sample_classes(conv: np.ndarray, mood: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Class of each utterance, drawn from its conversation's prior softmax(mood)."""
    cum = np.cumsum(_softmax(mood)[conv], axis=1)
    u = rng.random(len(conv))[:, None]
    return np.minimum((u > cum).sum(axis=1), mood.shape[1] - 1)


def _natural_missing(n: int, rates: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """[n, 3] absent flags; an utterance never loses all three (one of them is put back at random)."""
    absent = rng.random((n, len(rates))) < np.asarray(rates)[None, :]
    all_gone = np.flatnonzero(absent.all(axis=1))
    absent[all_gone, rng.integers(0, len(rates), len(all_gone))] = False
    return absent


def _check(dims: Mapping[str, int], signal: Mapping[str, float], missing: Mapping[str, float], n_classes: int,
           task: str, noise: float, offset: float) -> None:
    for name, mapping in (("dims", dims), ("modality_signal", signal), ("natural_missing", missing)):
        if set(mapping) != set(MODALITIES):
            raise ValueError(f"{name} needs exactly the keys {MODALITIES}, got {sorted(mapping)}")
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be classification or regression, got {task!r}")
    if task == "classification" and n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    need = 2 if task == "regression" else math.ceil(n_classes / 2) if n_classes > 2 else 2
    for m in MODALITIES:
        if dims[m] < need:
            raise ValueError(f"dims[{m!r}] = {dims[m]} is too small: the signal needs {need} dimensions")
        if not 0.0 <= missing[m] < 1.0:
            raise ValueError(f"natural_missing[{m!r}] must be in [0, 1), got {missing[m]}")
        if signal[m] < 0:
            raise ValueError(f"modality_signal[{m!r}] must be >= 0, got {signal[m]}")
    if noise < 0 or offset < 0:
        raise ValueError(f"noise and conversation_offset must be >= 0, got {noise} and {offset}")


def _generate(path: Path, *, conversations: Sequence[str], lengths: Sequence[int], conv_folds: np.ndarray,
              conv_splits: np.ndarray, dims: Mapping[str, int], n_classes: int, task: str,
              signal: Mapping[str, float], noise: float, missing: Mapping[str, float], offset: float,
              rng: np.random.Generator, source: str, overwrite: bool) -> Path:
    n_conv = len(conversations)
    conv = np.repeat(np.arange(n_conv), lengths)
    position = np.concatenate([np.arange(n) for n in lengths])
    n = len(conv)

    feats: dict[str, np.ndarray] = {}
    if task == "classification":
        mood = rng.standard_normal((n_conv, n_classes)) * offset  # the per-conversation latent
        y = _sample_classes(conv, mood, rng)
        groups = modality_groups(n_classes, rng)
        for i, m in enumerate(MODALITIES):
            g = int(groups[i].max()) + 1
            # a centred simplex: every two groups equally far apart, half-distance SIGNAL_SCALE * signal
            protos = (np.eye(g) - 1.0 / g) * (math.sqrt(2.0) * SIGNAL_SCALE * signal[m])
            basis = _orthonormal(dims[m], g, rng)
            # the same latent also moves the conversation's baseline inside the class subspace (a speaker's
            # neutral is someone else's sad): one utterance alone is ambiguous, its conversation resolves it
            baseline = mood @ (rng.standard_normal((n_classes, g)) / math.sqrt(n_classes))
            scale = SIGNAL_SCALE * signal[m]
            feats[m] = ((protos[groups[i][y]] + scale * baseline[conv]) @ basis).astype(np.float32)
        labels = np.array(class_names(n_classes), dtype=object)[y]
        values = np.full(n, np.nan, dtype=np.float32)
    else:
        factors = rng.standard_normal((n, len(MODALITIES)))
        shift = (rng.standard_normal(n_conv) * offset)[conv]
        values = np.clip(VALUE_SCALE * (factors.sum(axis=1) / math.sqrt(len(MODALITIES)) + shift),
                         *VALUE_RANGE).astype(np.float32)
        for i, m in enumerate(MODALITIES):
            basis = _orthonormal(dims[m], 2, rng)
            latent = np.stack([factors[:, i], shift], axis=1)  # its own factor, and the conversation's shift
            feats[m] = (SIGNAL_SCALE * signal[m] * latent @ basis).astype(np.float32)
        labels = np.full(n, "", dtype=object)
    for m in MODALITIES:
        feats[m] += (noise * rng.standard_normal((n, dims[m]))).astype(np.float32)

    absent = _natural_missing(n, [missing[m] for m in MODALITIES], rng)
    reason_pick = rng.integers(0, 2, size=(n, len(MODALITIES)))
    speakers = rng.choice(np.array(["F", "M"], dtype=object), size=n)
    durations = rng.uniform(*DURATION_RANGE_S, size=n).astype(np.float32)

    records = []
    for r in range(n):
        mods = {}
        for i, m in enumerate(MODALITIES):
            if absent[r, i]:
                mods[m] = ModalityValue(None, MISSING_REASONS[m][reason_pick[r, i] % len(MISSING_REASONS[m])])
            else:
                mods[m] = ModalityValue(feats[m][r])
        c = conv[r]
        records.append(ClipRecord(
            id=f"{conversations[c]}_u{position[r]:03d}", modalities=mods, conversation=conversations[c],
            position=int(position[r]), speaker=str(speakers[r]), label=str(labels[r]), value=float(values[r]),
            split=str(conv_splits[c]), fold=int(conv_folds[c]), duration_s=float(durations[r])))

    header = StoreHeader(
        task=task, label_names=class_names(n_classes) if task == "classification" else (),
        modalities={m: ModalityInfo(dim=int(dims[m]), encoder="synthetic-gaussian") for m in MODALITIES},
        source=source)
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    write_store(path, header, records, overwrite=True)
    log.debug("wrote synthetic store %s: %d utterances in %d conversations", path, n, n_conv)
    return path


def _assign_folds(n_conv: int, folds: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(n_conv, dtype=np.int64)
    if folds:
        out[rng.permutation(n_conv)] = np.arange(n_conv) % folds + 1
    return out


def _assign_splits(n_conv: int, rng: np.random.Generator) -> np.ndarray:
    n_val = max(1, round(SPLIT_SHARES[1] * n_conv))
    n_test = max(1, round(SPLIT_SHARES[2] * n_conv))
    names = np.array(["val"] * n_val + ["test"] * n_test + ["train"] * (n_conv - n_val - n_test), dtype=object)
    out = np.empty(n_conv, dtype=object)
    out[rng.permutation(n_conv)] = names
    return out


def make_synthetic_store(path: str | Path, *, n_conversations: int = 40, utterances: tuple[int, int] = (3, 12),
                         dims: Mapping[str, int] = DEFAULT_DIMS, n_classes: int = 4,
                         task: str = "classification", modality_signal: Mapping[str, float] = DEFAULT_SIGNAL,
                         noise: float = 1.0, natural_missing: Mapping[str, float] = DEFAULT_MISSING,
                         conversation_offset: float = 0.0, folds: int = 0, splits: bool = False, seed: int = 0,
                         overwrite: bool = True) -> Path:
    """Write a generated feature store to `path` and return the path.

    `utterances` is the inclusive range of conversation lengths. `modality_signal` scales how far apart the
    class groups (or the factor) lie in each modality, against feature noise of std `noise`.
    `conversation_offset` is the strength of the per-conversation latent (0: labels independent of the
    conversation). `folds=K` puts conversations into folds 1..K (balanced); `splits=True` gives them
    train/val/test (70/10/20 %). The same arguments and `seed` give the same file contents.
    """
    lo, hi = utterances
    if not 1 <= lo <= hi:
        raise ValueError(f"utterances must be a range (min, max) with 1 <= min <= max, got {utterances}")
    if n_conversations < 1 or folds < 0 or folds > n_conversations:
        raise ValueError(f"need n_conversations >= 1 and 0 <= folds <= n_conversations, "
                         f"got {n_conversations} and {folds}")
    if splits and n_conversations < 3:
        raise ValueError("splits=True needs at least 3 conversations (one per split)")
    _check(dims, modality_signal, natural_missing, n_classes, task, noise, conversation_offset)
    params = dict(n_conversations=n_conversations, utterances=[lo, hi], dims=dict(dims), n_classes=n_classes,
                  task=task, modality_signal=dict(modality_signal), noise=noise,
                  natural_missing=dict(natural_missing), conversation_offset=conversation_offset, folds=folds,
                  splits=splits, seed=seed)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, size=n_conversations)
    conv_folds = _assign_folds(n_conversations, folds, rng)
    conv_splits = _assign_splits(n_conversations, rng) if splits else np.full(n_conversations, "", dtype=object)
    return _generate(Path(path), conversations=[f"synth{c:04d}" for c in range(n_conversations)], lengths=lengths,
                     conv_folds=conv_folds, conv_splits=conv_splits, dims=dims, n_classes=n_classes, task=task,
                     signal=modality_signal, noise=noise, missing=natural_missing, offset=conversation_offset,
                     rng=rng, source="synthetic:" + canonical_json(params), overwrite=overwrite)


def partition_lengths(total: int, parts: int, rng: np.random.Generator, *, low: int, high: int) -> np.ndarray:
    """`parts` random conversation lengths in [low, high] that sum to `total`."""
    if not low * parts <= total <= high * parts:
        raise ValueError(f"cannot split {total} utterances into {parts} conversations of {low}..{high}")
    weights = rng.gamma(2.0, size=parts)
    raw = low + (total - low * parts) * weights / weights.sum()
    lengths = np.minimum(np.floor(raw).astype(np.int64), high)
    while (short := total - lengths.sum()) > 0:  # hand out the remainder where there is room, largest first
        room = np.flatnonzero(lengths < high)
        order = room[np.argsort(-(raw[room] - lengths[room]), kind="stable")]
        lengths[order[:short]] += 1
    return lengths


def make_iemocap_sized_store(path: str | Path, seed: int = 0, *, overwrite: bool = True) -> Path:
    """A store the size of IEMOCAP-4 (docs/model.md §2.2), for speed benchmarks.

    151 conversations in 5 folds (sessions of 28/30/32/30/31 conversations, 1085/1023/1151/1031/1241
    utterances, 5,531 in all), the longest conversation exactly 110 utterances, dims 512/1024/1024, 4 classes.
    """
    rng = np.random.default_rng(seed)
    conversations, lengths, folds = [], [], []
    longest_in = int(np.argmax([u for _, u in IEMOCAP_SESSIONS]))
    for s, (n_conv, n_utt) in enumerate(IEMOCAP_SESSIONS):
        if s == longest_in:  # pin one conversation at the maximum, so the padded length is IEMOCAP's
            rest = partition_lengths(n_utt - IEMOCAP_MAX_UTTERANCES, n_conv - 1, rng,
                                     low=IEMOCAP_MIN_UTTERANCES, high=IEMOCAP_MAX_UTTERANCES)
            sess = np.insert(rest, rng.integers(0, n_conv), IEMOCAP_MAX_UTTERANCES)
        else:
            sess = partition_lengths(n_utt, n_conv, rng, low=IEMOCAP_MIN_UTTERANCES, high=IEMOCAP_MAX_UTTERANCES)
        lengths.extend(sess.tolist())
        conversations.extend(f"Ses{s + 1:02d}_synth{c:03d}" for c in range(n_conv))
        folds.extend([s + 1] * n_conv)
    n_conv = len(conversations)
    return _generate(Path(path), conversations=conversations, lengths=lengths, conv_folds=np.array(folds),
                     conv_splits=np.full(n_conv, "", dtype=object), dims=IEMOCAP_DIMS, n_classes=4,
                     task="classification", signal=DEFAULT_SIGNAL, noise=1.0, missing=DEFAULT_MISSING, offset=0.0,
                     rng=rng, source="synthetic:" + canonical_json({"iemocap_sized": True, "seed": seed}),
                     overwrite=overwrite)
