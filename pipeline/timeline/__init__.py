"""Emotion over time for long recordings (`comp-predict --timeline`): utterances cut where the speech is,
predicted as one conversation, with a table and a plot.

    from pipeline.timeline import predict_timeline, TimelineOptions
    result = predict_timeline(predictor, "interview.mp4", options=TimelineOptions(max_utterance_s=15))

Modules: `options` (settings), `speech` (where the speech is), `segment` (utterance boundaries), `context`
(conversation context and windows), `run` (the orchestration), `plot` (probability over time). The names
below load on first use, so that `comp-predict --help` does not import torch.
"""

from __future__ import annotations

from typing import Any

from pipeline.timeline.options import TimelineOptions

__all__ = ["STAGES", "TimelineError", "TimelineOptions", "options_from", "predict_timeline", "plot_timeline"]


def __getattr__(name: str) -> Any:
    if name in ("STAGES", "TimelineError", "options_from", "predict_timeline"):
        from pipeline.timeline import run

        return getattr(run, name)
    if name == "plot_timeline":
        from pipeline.timeline.plot import plot_timeline

        return plot_timeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
