"""Which epoch of a run and which run of a protocol become the saved model (docs/model.md §6.3).

Rules of the clean protocol:

* **Eligible epochs.** Only stage-2 epochs: in stage 1 the fused prediction head is not trained, so its
  validation score says nothing about the model that would be saved (and a stage-1 checkpoint predicts with
  an untrained fusion). A clean run must therefore have at least one stage-2 epoch.
* **Epochs within a run.** The best validation selection metric wins; equal scores (frequent on small
  validation sets: wf1 1.0 for many epochs) are broken by the lower validation loss of the fused prediction
  (cross-entropy, or MSE for regression), which still carries information when the metric has saturated;
  what is still equal goes to the later epoch.
* **Runs (seeds, folds).** The same key: the best validation selection metric, then the lower validation
  loss. Seeds of one fold share their validation conversations and masks, so this compares like with like.
  Across folds the validation sets differ; the fold winners are compared by the same validation score
  anyway, which picks *a* good model to save but is no estimate of how good it is (the test scores are).
  What is still equal goes to the earlier run in plan order (fold, then seed), whichever process trained it.

`faithful` keeps the released code's rule: the first epoch with a strictly better test score, every stage.

Also here: split sizes per class and the warnings when a split is too small to select or score on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from comp.metrics import higher_is_better

# What a run's epoch (and a baseline's C) was selected on, as metrics.json and the report show it
SELECTED_ON_VAL = "val"
SELECTED_ON_TEST = "test (paper protocol)"  # faithful: the released code selects on the test set
SELECTED_ON_LAST = "last epoch (no val)"  # clean without validation conversations
SELECTED_REFIT = "refit on train+val, the selected number of epochs (no held-out score)"

MIN_SPLIT_CLIPS = 10  # below this many labelled clips a split selects (val) or scores (test) on noise
REL_TOL = 1e-9  # scores this close are a tie (the same counts can round differently when pooled)


@dataclass(frozen=True)
class Candidate:
    """An epoch or a run as selection sees it: its validation score and loss, and its place in order."""

    score: float  # the selection metric on validation data (NaN: undefined)
    loss: float  # the fused prediction's validation loss (NaN: undefined)
    order: int  # epoch number, or the run's index in plan order


def _key(metric: str, c: Candidate) -> tuple[float, float]:
    """Larger is better on both entries; undefined values rank below every defined one."""
    score = c.score if c.score is not None and math.isfinite(c.score) else -math.inf
    if score != -math.inf and not higher_is_better(metric):
        score = -score
    loss = -c.loss if c.loss is not None and math.isfinite(c.loss) else -math.inf
    return score, loss


def _compare(metric: str, a: Candidate, b: Candidate) -> int:
    """+1 when `a` is better than `b` on (score, loss), -1 when worse, 0 for a tie."""
    for x, y in zip(_key(metric, a), _key(metric, b)):
        if x == y or (math.isfinite(x) and math.isfinite(y) and math.isclose(x, y, rel_tol=REL_TOL, abs_tol=1e-12)):
            continue
        return 1 if x > y else -1
    return 0


def better_epoch(metric: str, new: Candidate, best: Candidate | None) -> bool:
    """True when epoch `new` replaces `best`: better score, else lower loss, else it is the later epoch."""
    if best is None:
        return True
    c = _compare(metric, new, best)
    return c > 0 or (c == 0 and new.order > best.order)


def better_run(metric: str, new: Candidate, best: Candidate | None) -> bool:
    """True when run `new` replaces `best`: better score, else lower loss, else it comes earlier in plan order."""
    if best is None:
        return True
    c = _compare(metric, new, best)
    return c > 0 or (c == 0 and new.order < best.order)


def fused_loss(task: str, y_true: np.ndarray, logits: np.ndarray) -> float:
    """Mean cross-entropy (classification; logits [n, C], classes [n]) or MSE (regression; [n] or [n, 1]) over
    labelled rows (class >= 0, finite value): the task loss of the fused prediction. NaN when no row is labelled."""
    y = np.asarray(y_true)
    z = np.asarray(logits, dtype=np.float64)
    if task == "classification":
        keep = y >= 0
        if not keep.any():
            return math.nan
        z, y = z[keep], y[keep].astype(np.int64)
        top = z.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
        return float(np.mean(log_norm - z[np.arange(len(y)), y]))
    y = y.astype(np.float64)
    keep = np.isfinite(y)
    if not keep.any():
        return math.nan
    pred = z.reshape(len(z), -1)[:, 0]
    return float(np.mean((pred[keep] - y[keep]) ** 2))


# ---------------------------------------------------------------------------------------- split sizes

def split_sizes(conversations: Sequence[Any], task: str, label_names: Sequence[str]) -> dict[str, Any]:
    """{"clips", "conversations", "labelled", "per_class": {label: {"clips", "conversations"}}} of a split.

    `conversations` are comp.data.Conversation; a conversation counts once under every class it contains.
    `per_class` is empty for regression.
    """
    clips = sum(len(c) for c in conversations)
    labelled = sum(int(np.sum(c.labelled)) for c in conversations)
    per_class: dict[str, dict[str, int]] = {}
    if task == "classification":
        for k, name in enumerate(label_names):
            n_clips = sum(int(np.sum(c.labelled & (c.targets == k))) for c in conversations)
            n_conv = sum(bool(np.any(c.labelled & (c.targets == k))) for c in conversations)
            per_class[str(name)] = {"clips": n_clips, "conversations": n_conv}
    return {"clips": clips, "conversations": len(conversations), "labelled": labelled, "per_class": per_class}


def split_warnings(sizes: Mapping[str, Mapping[str, Any]], where: str = "") -> list[str]:
    """One sentence per split of one plan ({"train"|"val"|"test": split_sizes(...)}) that is too small.

    train: a class with no clip (the model cannot learn it). val: fewer than MIN_SPLIT_CLIPS labelled clips or
    a class missing (the epoch and run are picked on noise). test: the same (the test scores are rough).
    """
    out = []
    prefix = f"{where}: " if where else ""
    train = sizes.get("train") or {}
    absent = [c for c, n in (train.get("per_class") or {}).items() if n["clips"] == 0]
    if train and absent:
        out.append(f"{prefix}the training split has no clip of {', '.join(absent)}, so the model cannot learn "
                   f"{'it' if len(absent) == 1 else 'them'}; add labelled clips of every class.")
    for split, role, advice in (
            ("val", "too small to select the epoch and the saved run on",
             "add clips, raise val_fraction (--set val_fraction=0.3) or give the store a val split, and compare "
             "with --refit"),
            ("test", "too small to score on: read the test numbers as rough",
             "add clips or raise test_fraction (--set test_fraction=0.3)")):
        s = sizes.get(split)
        if not s or not s.get("conversations"):
            continue
        absent = [c for c, n in (s.get("per_class") or {}).items() if n["clips"] == 0]
        if s["labelled"] >= MIN_SPLIT_CLIPS and not absent:
            continue
        what = f"{s['labelled']} labelled clip{'s' if s['labelled'] != 1 else ''}"
        if absent:
            what += f" and no {', '.join(absent)}"
        out.append(f"{prefix}the {'validation' if split == 'val' else 'test'} split has {what}: {role}; "
                   f"{advice}.")
    return out


def format_sizes(sizes: Mapping[str, Any]) -> str:
    """'9 clips in 9 conversations; angry 3/3, happy 3/3 (clips/conversations)' for one split."""
    text = f"{sizes['clips']} clips in {sizes['conversations']} conversations"
    per_class = sizes.get("per_class") or {}
    if per_class:
        text += "; " + ", ".join(f"{c} {n['clips']}/{n['conversations']}" for c, n in per_class.items())
    return text
