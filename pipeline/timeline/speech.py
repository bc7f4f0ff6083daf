"""Where a long recording's speech is: its audio transcribed block by block by the checkpoint's own ASR.

The recording's audio is decoded one block at a time (`TimelineOptions.asr_block_s`, seeking with
`pipeline.decode.decode_audio`), each block cut on a 100 ms grid where the 200 ms around the cut are the
quietest of the block's last `block_search_s` seconds, and handed to the ASR extractor the checkpoint was
trained with, as a clip of its own. That extractor (`extractors.asr`) keeps the VAD's speech segments
(silero-vad) and Whisper's timestamped segments in `clip.shared[RESULT_KEY]`; an ASR without them (or one
that fails on a block) leaves the block to silero-vad alone. Only one block of audio is in memory at a
time; what is kept of the whole recording is its speech segments and a loudness envelope (one float per
100 ms: 144 kB for an hour).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np

from core.clip import SAMPLE_RATE, ClipInput
from core.progress import Progress
from extractors import vad
from extractors.asr import RESULT_KEY, ASRResult
from pipeline.decode import DecodeError, decode_audio, probe
from pipeline.timeline.options import TimelineOptions
from pipeline.timeline.segment import ENVELOPE_S, Span

log = logging.getLogger(__name__)

FRAME = int(round(ENVELOPE_S * SAMPLE_RATE))  # samples per envelope value


@dataclass
class SpeechMap:
    """What the recording holds: its duration, speech (VAD) and transcript segments in seconds, a loudness
    envelope (RMS per ENVELOPE_S), and why there is no audio to follow ("" when there is)."""

    duration_s: float
    has_video: bool
    speech: list[Span] = field(default_factory=list)
    asr_segments: list[Span] = field(default_factory=list)
    envelope: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    audio_reason: str = ""
    asr_fallbacks: list[str] = field(default_factory=list)  # blocks the ASR failed on (VAD used there)


def envelope_of(audio: np.ndarray) -> np.ndarray:
    """RMS of each FRAME samples (a last partial frame counts as a frame): float32 [ceil(n / FRAME)]."""
    n = len(audio)
    padded = np.pad(audio.astype(np.float32), (0, (-n) % FRAME))
    return np.sqrt(np.mean(padded.reshape(-1, FRAME) ** 2, axis=1)).astype(np.float32)


def block_cut(audio: np.ndarray, search_s: float) -> int:
    """Where to end a block: a multiple of FRAME in the last `search_s` seconds of `audio`, where the two
    frames around it are the quietest (so the cut lies in a pause when there is one)."""
    env = envelope_of(audio[: len(audio) - len(audio) % FRAME])
    first = max(1, len(env) - int(search_s / ENVELOPE_S))
    pairs = env[first - 1:-1] ** 2 + env[first:] ** 2  # energy of frames k-1 and k around boundary k
    return (first + int(np.argmin(pairs))) * FRAME


def find_speech(extraction: Any, path: Path, options: TimelineOptions,
                progress: Progress | None = None) -> SpeechMap:
    """The recording's SpeechMap. `progress("decode", 0|1, 1)` around opening the file, then
    `progress("asr", seconds done, seconds total)` after each block.
    Raises DecodeError when the file cannot be opened or holds neither audio nor video."""
    if progress is not None:
        progress("decode", 0, 1)
    info = probe(path)
    if not info["has_audio"] and not info["has_video"]:
        raise DecodeError("no audio or video stream")
    if progress is not None:
        progress("decode", 1, 1)
    duration = info["duration_s"]
    out = SpeechMap(duration_s=float(duration or 0.0), has_video=bool(info["has_video"]))
    if not info["has_audio"]:
        out.audio_reason = "no-audio-stream"
        return out
    total = int(math.ceil(duration)) if duration else 0
    if progress is not None:
        progress("asr", 0, total)
    block = int(options.asr_block_s * SAMPLE_RATE)
    start = 0  # samples from the start of the recording; always a multiple of FRAME
    envelopes: list[np.ndarray] = []
    peak = 0.0
    while True:
        t0 = start / SAMPLE_RATE
        try:
            audio = decode_audio(path, info.get("audio_stream"), t0, t0 + options.asr_block_s)
        except av.FFmpegError as err:
            if start == 0:
                out.audio_reason = f"decode-error: {' '.join(str(err).split())}"
                return out
            log.warning("%s: audio decode stopped at %.1f s: %s", path, t0, err)
            break
        last = len(audio) < block - FRAME or (duration is not None and t0 + options.asr_block_s >= duration)
        if not last:
            audio = audio[: block_cut(audio, options.block_search_s)]
        if len(audio):
            peak = max(peak, float(np.max(np.abs(audio))))
            _transcribe_block(extraction, path, audio, t0, out)
            envelopes.append(envelope_of(audio) if last else envelope_of(audio)[: len(audio) // FRAME])
        start += len(audio)
        if progress is not None:
            done = int(start / SAMPLE_RATE)
            if total:  # the file's stated duration and the decoded samples can differ by a fraction
                done = total if last else min(done, total)
            progress("asr", done, total)
        if last or not len(audio):
            break
    out.envelope = np.concatenate(envelopes) if envelopes else np.zeros(0, np.float32)
    heard = start / SAMPLE_RATE
    out.duration_s = max(out.duration_s, heard) if duration else heard
    if start == 0:
        out.audio_reason = "decode-error: the audio stream has no decodable samples"
    elif peak <= vad.SILENT_PEAK:
        out.audio_reason = "silent"
    return out


def _transcribe_block(extraction: Any, path: Path, audio: np.ndarray, t0: float, out: SpeechMap) -> None:
    """Run the ASR extractor on one block; its speech and segments, shifted by t0, go into `out`."""
    clip = ClipInput(clip_id=f"{path}@{t0:.1f}", audio=audio, audio_reason="", frames=None,
                     frames_reason="not decoded: finding speech", duration_s=len(audio) / SAMPLE_RATE)
    result = None
    try:
        extraction.extractors["asr"].extract([clip])
        result = clip.shared.get(RESULT_KEY)
    except Exception as err:  # noqa: BLE001 - one block's failure must not lose the rest; the VAD covers it
        log.warning("%s: the ASR failed on %.1f-%.1f s (%s: %s); speech there from the VAD alone", path, t0,
                    t0 + clip.duration_s, type(err).__name__, err)
        out.asr_fallbacks.append(f"{t0:.1f}-{t0 + clip.duration_s:.1f} s: {type(err).__name__}")
    finally:
        clip.shared.clear()
    if isinstance(result, ASRResult):
        out.speech += [(t0 + a, t0 + b) for a, b in result.speech]
        out.asr_segments += [(t0 + s.start_s, t0 + s.end_s) for s in result.segments]
    else:  # no ASR result: silent block, or an ASR that keeps no segments
        out.speech += [(t0 + a / SAMPLE_RATE, t0 + b / SAMPLE_RATE) for a, b in vad.speech_segments(audio)]
