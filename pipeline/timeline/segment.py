"""Utterances of a long recording from where its speech is: pure functions on seconds, no media or models.

The speech comes from `pipeline.timeline.run` (silero-vad's speech segments and Whisper's timestamped
segments, as the ASR extractor keeps them); this module only decides where one utterance ends and the next
begins (`TimelineOptions` describes the rules).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.timeline.options import MAX_MARGIN_S, TimelineOptions

ENVELOPE_S = 0.1  # seconds per value of the loudness envelope (RMS of each 100 ms of audio)

Span = tuple[float, float]  # (start, end) in seconds of the recording


@dataclass(frozen=True)
class Utterance:
    """One utterance: [start_s, end_s) in seconds of the recording, padded; `end_cut` says why it ends there:
    "pause" (silence of at least min_silence_s follows), "split-pause" / "split-asr" / "split-quiet" (longer
    than max_utterance_s: split at a shorter pause, between two ASR segments, at the quietest 100 ms) or
    "fixed" (the recording has no usable audio: cut every max_utterance_s)."""

    start_s: float
    end_s: float
    end_cut: str

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def speech_regions(vad_speech: Sequence[Span], asr_segments: Sequence[Span]) -> list[Span]:
    """The recording's speech: the detector's segments, plus each ASR segment that overlaps none of them
    (speech the detector missed: shouting and laughter score low in silero-vad, see extractors.asr).
    Sorted by start; may overlap (`merge_regions` joins them)."""
    speech = sorted((float(a), float(b)) for a, b in vad_speech if b > a)
    extra = [(float(a), float(b)) for a, b in asr_segments
             if b > a and not any(sa < b and a < sb for sa, sb in speech)]
    return sorted(speech + extra)


def merge_regions(regions: Sequence[Span], min_silence_s: float) -> list[tuple[Span, list[Span]]]:
    """Regions closer than `min_silence_s` joined: [((start, end), [the shorter pauses inside it])]."""
    out: list[tuple[Span, list[Span]]] = []
    for a, b in sorted(regions):
        if out and a - out[-1][0][1] < min_silence_s:
            (start, end), gaps = out[-1]
            if a > end:
                gaps.append((end, a))
            out[-1] = ((start, max(end, b)), gaps)
        else:
            out.append(((a, b), []))
    return out


def quietest(envelope: np.ndarray, lo: float, hi: float) -> float:
    """Middle of the quietest ENVELOPE_S frame inside [lo, hi] seconds (the middle of the range without one)."""
    first, last = int(np.ceil(lo / ENVELOPE_S)), int(np.floor(hi / ENVELOPE_S))  # frames wholly inside
    last = min(last, len(envelope))
    if last <= first:
        return (lo + hi) / 2
    k = first + int(np.argmin(envelope[first:last]))
    return (k + 0.5) * ENVELOPE_S


def split_long(span: Span, gaps: Sequence[Span], asr_bounds: Sequence[float], envelope: np.ndarray,
               max_s: float) -> list[tuple[Span, str]]:
    """A region of speech in pieces of at most `max_s` seconds: [((start, end), how the piece ends)].

    Each cut lies in the second half of the allowed length after the previous one: in the longest pause
    there (the piece ends where the pause begins, the next starts where it ends), else at the ASR segment
    boundary there with the quietest 100 ms around it, else at the quietest 100 ms there.
    """
    start, end = span
    pieces: list[tuple[Span, str]] = []
    cur = start
    while end - cur > max_s:
        lo, hi = cur + max_s / 2, cur + max_s
        inside = [(max(a, lo), min(b, hi)) for a, b in gaps if b > lo and a < hi]
        inside = [g for g in inside if g[1] > g[0]]
        if inside:
            a, b = max(inside, key=lambda g: g[1] - g[0])
            pieces.append(((cur, a), "split-pause"))
            cur = b
            continue
        bounds = [t for t in asr_bounds if lo <= t <= hi]
        if bounds:
            cut = min(bounds, key=lambda t: float(np.mean(_around(envelope, t))))
            kind = "split-asr"
        else:
            cut, kind = quietest(envelope, lo, hi), "split-quiet"
        pieces.append(((cur, cut), kind))
        cur = cut
    pieces.append(((cur, end), "pause"))
    return pieces


def _around(envelope: np.ndarray, t: float) -> np.ndarray:
    k = int(t / ENVELOPE_S)
    window = envelope[max(0, k - 1):k + 2]
    return window if window.size else np.zeros(1)


def _widened(spans: Sequence[Span], by_s: float, duration_s: float) -> list[Span]:
    """Spans (in time order) widened by `by_s` on each side, never past the middle of the pause to a
    neighbour, nor outside [0, duration_s]; spans that touch (a split inside speech) keep their shared
    boundary."""
    out: list[Span] = []
    for i, (a, b) in enumerate(spans):
        prev_end = spans[i - 1][1] if i else None
        next_start = spans[i + 1][0] if i + 1 < len(spans) else None
        lo = 0.0 if prev_end is None else max(prev_end, (prev_end + a) / 2)
        hi = duration_s if next_start is None else min(next_start, (b + next_start) / 2)
        out.append((round(max(lo, a - by_s, 0.0), 3), round(min(hi, b + by_s, duration_s), 3)))
    return out


def pad(pieces: Sequence[tuple[Span, str]], pad_s: float, duration_s: float) -> list[Utterance]:
    """Pieces widened by `pad_s` on each side (`_widened`: never into a neighbour's half of the pause)."""
    spans = _widened([span for span, _ in pieces], pad_s, duration_s)
    return [Utterance(a, b, kind) for (a, b), (_, kind) in zip(spans, pieces)]


def cut_utterances(vad_speech: Sequence[Span], asr_segments: Sequence[Span], envelope: np.ndarray,
                   duration_s: float, options: TimelineOptions) -> list[Utterance]:
    """The recording's utterances in time order (see `TimelineOptions`). `envelope`: RMS of each ENVELOPE_S
    of the recording (float [ceil(duration_s / ENVELOPE_S)]), where long speech is split at its quietest."""
    regions = [(max(0.0, a), min(duration_s, b)) for a, b in speech_regions(vad_speech, asr_segments)]
    regions = [r for r in regions if r[1] > r[0]]
    bounds = sorted({float(t) for a, b in asr_segments for t in (a, b)})
    pieces: list[tuple[Span, str]] = []
    for span, gaps in merge_regions(regions, options.min_silence_s):
        inner = [t for t in bounds if span[0] < t < span[1]]
        pieces += split_long(span, gaps, inner, envelope, options.max_utterance_s)
    return pad(pieces, options.pad_s, duration_s)


def margin_for(meta: Mapping[str, Any], options: TimelineOptions) -> tuple[float, str]:
    """(seconds of recording around each utterance's speech, per side, given to the extractors; why)."""
    if options.margin_s is not None:
        return options.margin_s, "set by the caller"
    non_speech = (meta.get("clips") or {}).get("median_non_speech_s")
    if non_speech is None:
        return options.pad_s, "the checkpoint does not say how much silence its training clips held"
    margin = min(MAX_MARGIN_S, max(options.pad_s, float(non_speech) / 2))
    return round(margin, 3), (f"half the median non-speech time of the checkpoint's training clips "
                              f"({float(non_speech):g} s), so each utterance is extracted like them")


def widen(utterances: Sequence[Utterance], margin_s: float, pad_s: float, duration_s: float) -> list[Span]:
    """The stretch of recording each utterance is extracted from: the utterance (already padded by `pad_s`)
    widened to `margin_s` around its speech, by the same rule as the pad (`_widened`)."""
    return _widened([(u.start_s, u.end_s) for u in utterances], max(0.0, margin_s - pad_s), duration_s)


def fixed_utterances(duration_s: float, max_s: float) -> list[Utterance]:
    """A recording without usable audio (nothing to follow): pieces of `max_s` seconds, the last one shorter
    (joined to the one before when under half of `max_s`)."""
    n = max(1, int(np.ceil(duration_s / max_s - 1e-9)))
    edges = [min(duration_s, k * max_s) for k in range(n)] + [duration_s]
    if n > 1 and edges[-1] - edges[-2] < max_s / 2:
        del edges[-2]
    return [Utterance(round(a, 3), round(b, 3), "fixed") for a, b in zip(edges[:-1], edges[1:])]
