"""Whether and how far a recording's utterances are predicted as one conversation.

ComP attends over the utterances of a conversation. A checkpoint trained where every conversation was one
utterance (clips without a `conversation`, e.g. a folder of labelled clips) never learnt what other
utterances mean, so its utterances are predicted alone, as `comp-predict` predicts a clip. A checkpoint
trained on multi-utterance conversations gets the recording as one conversation, in windows of at most
`max_len` utterances: the model's `max_len`, lowered to the longest conversation it was trained on (more
context than it ever saw is not what it learnt to read). A longer recording uses overlapping windows
(`sliding_windows`), and each utterance takes its answer from the window where it has the most context
on both sides (`window_owner`).

What the checkpoint was trained on comes from its meta (`conversations`, written by comp-train), else from
the split sizes in the `metrics.json` beside it (older checkpoints); when neither says, context is not used.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContextPlan:
    """`used`: the recording is predicted as one conversation; `max_len`: utterances per window (1 when not
    used); `why`: one sentence naming what the checkpoint was trained on."""

    used: bool
    why: str
    max_len: int


def trained_conversations(meta: Mapping[str, Any], checkpoint: Path | None) -> tuple[dict[str, int] | None, str]:
    """({"conversations", "utterances", "longest"?, "multi_utterance"?}, where it was read) or (None, "")."""
    summary = meta.get("conversations")
    if isinstance(summary, Mapping) and "utterances" in summary:
        return {k: int(v) for k, v in summary.items()}, "checkpoint"
    if checkpoint is None:
        return None, ""
    metrics = Path(checkpoint).parent / "metrics.json"
    try:
        splits = json.loads(metrics.read_text(encoding="utf-8")).get("splits") or {}
    except (OSError, ValueError, AttributeError):
        return None, ""
    run = str((meta.get("metrics") or {}).get("fold") or "")
    plans = [splits[run]] if run in splits else list(splits.values())
    train = [p.get("train") for p in plans if isinstance(p, Mapping) and isinstance(p.get("train"), Mapping)]
    if not train:
        return None, ""
    clips = sum(int(t.get("clips", 0)) for t in train)
    convs = sum(int(t.get("conversations", 0)) for t in train)
    return {"conversations": convs, "utterances": clips, "multi_utterance": int(clips > convs)}, str(metrics)


def plan_context(meta: Mapping[str, Any], checkpoint: Path | None = None) -> ContextPlan:
    """Decide from the checkpoint's meta (and its run folder) whether to predict with conversation context."""
    model = (meta.get("train_config") or {}).get("model") or {}
    max_len = int(model.get("max_len") or 1)
    summary, where = trained_conversations(meta, checkpoint)
    if summary is None:
        return ContextPlan(False, "the checkpoint does not record how long its training conversations were, "
                                  "so each utterance is predicted alone, as comp-predict predicts a clip", 1)
    source = "" if where == "checkpoint" else f" (from {where})"
    if summary.get("multi_utterance", 0) <= 0:
        return ContextPlan(False, f"trained on {summary['utterances']} clips, each its own one-utterance "
                                  f"conversation{source}: the model never learnt to use other utterances, so "
                                  "each utterance is predicted alone, as comp-predict predicts a clip", 1)
    longest = summary.get("longest")
    size = max(2, min(max_len, longest) if longest else max_len)
    bound = (f"its max_len {max_len}" if not longest or max_len <= longest
             else f"the longest conversation it was trained on ({longest}; max_len {max_len})")
    return ContextPlan(True, f"trained on {summary['conversations']} conversations of {summary['utterances']} "
                             f"utterances, {summary['multi_utterance']} of them multi-utterance{source}: the "
                             f"utterances are predicted as one conversation, at most {size} at a time "
                             f"({bound})", size)


def sliding_windows(n: int, size: int) -> list[tuple[int, int]]:
    """[start, end) utterance ranges of at most `size` covering range(n), each starting half a window after
    the previous (the last one ends at n). One window when n <= size; none when n == 0."""
    if n <= 0:
        return []
    if n <= size:
        return [(0, n)]
    hop = max(1, size // 2)
    starts = list(range(0, n - size, hop)) + [n - size]
    return [(s, s + size) for s in starts]


def window_owner(windows: list[tuple[int, int]], n: int) -> list[int]:
    """For each utterance, the index of the window where it is farthest from a window edge that is not the
    recording's own start or end (the most context on both sides); ties go to the earlier window."""
    owner = []
    for i in range(n):
        best, best_margin = -1, -1
        for w, (a, b) in enumerate(windows):
            if not a <= i < b:
                continue
            left = i - a if a > 0 else n  # the recording's own edge limits nothing
            right = b - 1 - i if b < n else n
            margin = min(left, right)
            if margin > best_margin:
                best, best_margin = w, margin
        owner.append(best)
    return owner
