"""Whether a clip holds any sound, and where its speech is: digital silence and silero-vad.

- silence: a clip is "silent" when no sample rises above SILENT_PEAK, two steps of 16-bit PCM (digital
  silence, dithered or not). That is the only level rule: a quiet voice is still a voice, and whether a
  recording holds speech is decided relative to the recording, by the voice activity detector.
- speech: silero-vad (MIT; its PyPI wheel ships the weights and needs only torch) scores every 32 ms of
  16 kHz audio; `get_speech_timestamps_from_probs` turns the scores into speech segments with silero's
  defaults (threshold 0.5, segments of at least 250 ms, 100 ms of silence to end one, 30 ms padding). The
  clip is first scaled to a fixed peak (PEAK_TARGET), so a soft-spoken recording at -60 dBFS is scored like
  a loud one: the decision depends on the shape of the sound (voice against noise floor), not its level.

Steady noise (hiss, hum, fans, room tone), clicks and instrumental music score far below the threshold
(benchmarks/asr_guard.py lists 13 kinds at three levels); speech scores near 1.
"""

from __future__ import annotations

import importlib.metadata
import threading
from typing import Any

import numpy as np
import torch

from core.clip import SAMPLE_RATE, ClipInput

SILENT_PEAK = 2.0 / 32768  # full scale = 1.0; a clip that never exceeds two 16-bit steps holds nothing
PEAK_TARGET = 0.5  # the clip's peak is scaled to this before the VAD scores it
VAD_FRAME = 512  # samples per silero score at 16 kHz (32 ms)
DEFAULT_THRESHOLD = 0.5  # silero's default speech probability threshold

_MODEL: Any = None
_LOCK = threading.Lock()


def is_silent(audio: np.ndarray) -> bool:
    """True for an empty clip or digital silence (no sample above SILENT_PEAK)."""
    return audio.size == 0 or float(np.max(np.abs(audio))) <= SILENT_PEAK


def rms_db(audio: np.ndarray) -> float:
    """RMS level of a float waveform in dBFS (full scale = 1.0); -inf for digital silence or no samples."""
    if audio.size == 0:
        return float("-inf")
    power = float(np.mean(np.square(audio, dtype=np.float64)))
    return 10.0 * np.log10(power) if power > 0 else float("-inf")


def audio_unusable_reason(clip: ClipInput) -> str:
    """Why a clip's audio cannot be used at all: its decoder's reason, "silent", or "" when it is usable."""
    if clip.audio is None:
        return clip.audio_reason or "no-audio"
    if clip.audio_reason:
        return clip.audio_reason
    if is_silent(clip.audio):
        return "silent"
    return ""


def identity() -> dict[str, str]:
    """What identifies the detector in an extraction spec (its package version pins the shipped weights)."""
    return {"vad": "silero-vad", "vad_version": importlib.metadata.version("silero-vad")}


def _model() -> Any:
    """silero-vad's TorchScript model, loaded once. Importing silero_vad sets torch's thread count to 1;
    the caller's setting is put back."""
    global _MODEL
    with _LOCK:
        if _MODEL is None:
            threads = torch.get_num_threads()
            from silero_vad import load_silero_vad

            _MODEL = load_silero_vad()
            torch.set_num_threads(threads)
    return _MODEL


def speech_probabilities(audio: np.ndarray) -> np.ndarray:
    """silero-vad's speech probability for every VAD_FRAME samples of `audio` (mono float32, 16 kHz), after
    scaling the clip to PEAK_TARGET. Returns float32 [ceil(n / VAD_FRAME)]."""
    if audio.size == 0:
        return np.zeros(0, np.float32)
    peak = float(np.max(np.abs(audio)))
    scaled = audio * (PEAK_TARGET / peak) if peak > 0 else audio
    model = _model()
    with _LOCK, torch.inference_mode():
        model.reset_states()
        probs = model.audio_forward(torch.from_numpy(np.ascontiguousarray(scaled, np.float32))[None], SAMPLE_RATE)
    return probs[0].float().numpy()


def speech_segments(audio: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> list[tuple[int, int]]:
    """Speech in `audio` as [start, end) sample ranges (silero's segmentation of its scores)."""
    from silero_vad import get_speech_timestamps_from_probs

    if is_silent(audio):
        return []
    probs = speech_probabilities(audio)
    stamps = get_speech_timestamps_from_probs(probs.tolist(), sampling_rate=SAMPLE_RATE, threshold=threshold,
                                              audio_length_samples=len(audio))
    return [(int(s["start"]), int(s["end"])) for s in stamps]


def speech_seconds(segments: list[tuple[int, int]], start: int = 0, end: int | None = None) -> float:
    """Seconds of speech of `segments` inside the sample range [start, end)."""
    total = 0
    for a, b in segments:
        lo, hi = max(a, start), min(b, end) if end is not None else b
        total += max(0, hi - lo)
    return total / SAMPLE_RATE
