"""`comp-predict --timeline --plot FILE`: probability per class over the recording's time, as a PNG.

Top: each class's probability at every utterance (a point at its middle, joined by lines; regression: the
value), each utterance shaded over its span, an utterance that could not be predicted shaded red. Bottom:
one row per modality, a bar over each utterance, green where the modality was present and red where it was
missing (its reason code written in the bar when there is room). Drawn with matplotlib's
object API on an Agg canvas (no window, no global pyplot state).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

MODALITIES = ("audio", "text", "visual")
PRESENT, MISSING, FAILED = "#4caf50", "#e53935", "#e53935"  # green, red, red


def plot_timeline(result: Mapping[str, Any], out: str | Path, *, title: str | None = None) -> Path:
    """Draw `result` (predict_timeline's object) to `out` (PNG); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    rows = list(result.get("utterances") or [])
    duration = float(result.get("duration_s") or max([r["end"] for r in rows], default=1.0))
    fig = Figure(figsize=(min(40.0, max(8.0, duration / 20.0)), 5.0), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for r in rows:
        top.axvspan(r["start"], r["end"], color=FAILED if r.get("prediction") is None else "0.5",
                    alpha=0.25 if r.get("prediction") is None else 0.12, linewidth=0)
    mids = [(r["start"] + r["end"]) / 2 for r in rows]
    preds = [r.get("prediction") for r in rows]  # None breaks the line: nothing is drawn across a gap
    first = next((p for p in preds if p), None)
    if first is not None and "probs" in first:
        for name in first["probs"]:
            top.plot(mids, [p["probs"][name] if p else float("nan") for p in preds], marker="o",
                     markersize=3, linewidth=1.2, label=name)
        top.set_ylim(-0.02, 1.02)
        top.set_ylabel("probability")
        top.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    elif first is not None:
        top.plot(mids, [p["value"] if p else float("nan") for p in preds], marker="o", markersize=3)
        top.set_ylabel("value")
    context = result.get("context") or {}
    top.set_title(title or f"{Path(str(result.get('clip', ''))).name}: {len(rows)} utterances, conversation "
                           f"context {'used' if context.get('used') else 'not used'}", fontsize=10)

    for k, m in enumerate(MODALITIES):
        y = len(MODALITIES) - 1 - k
        for r in rows:
            entry = (r.get("modalities") or {}).get(m) or {}
            width = r["end"] - r["start"]
            present = bool(entry.get("present"))
            bottom.broken_barh([(r["start"], width)], (y + 0.1, 0.8), facecolors=PRESENT if present else MISSING,
                               edgecolor="white", linewidth=0.3)
            if not present and width > duration / 40:
                code = str(entry.get("reason", "")).split(":", 1)[0]
                bottom.text(r["start"] + width / 2, y + 0.5, code, ha="center", va="center", fontsize=6,
                            color="white", clip_on=True)
    bottom.set_yticks([len(MODALITIES) - 1 - k + 0.5 for k in range(len(MODALITIES))], list(MODALITIES))
    bottom.set_ylim(0, len(MODALITIES))
    bottom.set_xlim(0, duration)
    bottom.set_xlabel("time (s)")
    bottom.set_title("modalities: green present, red missing (reason)", fontsize=8, loc="left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
