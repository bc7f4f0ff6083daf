"""The one shape of a progress hook, shared by extraction, import, training and prediction.

The library reports progress by calling `hook(task, done, total, detail)`: `task` names the unit of work
being counted ("clips", "importing", "fold1-seed0 epoch 3/40 (stage 1)"), `done` of `total` units are
finished, and `detail` is a short note for the display ("loss 0.734"). A new `task` string starts a new count.
The library never draws anything itself; the CLIs pass a terminal adapter (`pipeline.cli.progress`).
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Called after each unit of work (and once with done=0 when the count starts)."""

    def __call__(self, task: str, done: int, total: int, detail: str = "") -> None: ...


def no_progress(task: str, done: int, total: int, detail: str = "") -> None:
    """The hook of a caller that wants no progress reports."""
