"""Energy and spectral-shape checks that decide whether a clip holds speech at all, before any model runs.

Whisper hallucinates text ("Thank you.", "you") on silence and noise, and its own no-speech score does not
always catch it (on digital silence it is confident in "you"). Two cheap checks run first:

- loudness: the clip's RMS level in dBFS; below `silence_rms_db` the clip is "silent";
- a frame-level voice activity estimate: a 30 ms frame counts as speech when it is above the loudness floor
  AND either harmonic (low spectral flatness in 100-4000 Hz, as voiced speech is) or well above the clip's
  own noise floor (speech is modulated, steady noise is not). White or pink noise scores ~0, speech ~0.7.
"""

from __future__ import annotations

import numpy as np

from extractors.base import SAMPLE_RATE, ClipInput

FRAME_S = 0.03  # seconds per analysis frame
BAND_HZ = (100.0, 4000.0)  # where voiced speech carries its harmonics
MAX_FLATNESS = 0.3  # spectral flatness below this is "harmonic" (white noise ~0.58, voiced speech ~0.03)
FLOOR_PERCENTILE = 10.0  # the clip's noise floor: this percentile of frame levels
ABOVE_FLOOR_DB = 10.0  # a frame this far above the floor counts as speech whatever its spectrum
_EPS = 1e-12


def rms_db(audio: np.ndarray) -> float:
    """RMS level of a float waveform in dBFS (full scale = 1.0); -inf for digital silence or no samples."""
    if audio.size == 0:
        return float("-inf")
    power = float(np.mean(np.square(audio, dtype=np.float64)))
    return 10.0 * np.log10(power) if power > 0 else float("-inf")


def is_silent(audio: np.ndarray, silence_rms_db: float) -> bool:
    """True for digital silence, an empty clip, or a level below `silence_rms_db` dBFS."""
    return rms_db(audio) < silence_rms_db


def _frames(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    size = int(round(FRAME_S * sample_rate))
    n = len(audio) // size
    return audio[: n * size].reshape(n, size).astype(np.float64)


def speech_frames(audio: np.ndarray, silence_rms_db: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """One bool per 30 ms frame: does it look like speech (see the module docstring)."""
    frames = _frames(audio, sample_rate)
    if len(frames) == 0:
        return np.zeros(0, dtype=bool)
    level_db = 10.0 * np.log10(np.mean(frames**2, axis=1) + _EPS)
    window = np.hanning(frames.shape[1])
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2 + _EPS
    freqs = np.fft.rfftfreq(frames.shape[1], 1.0 / sample_rate)
    band = power[:, (freqs >= BAND_HZ[0]) & (freqs <= BAND_HZ[1])]
    flatness = np.exp(np.mean(np.log(band), axis=1)) / np.mean(band, axis=1)
    floor_db = np.percentile(level_db, FLOOR_PERCENTILE)
    loud = level_db > silence_rms_db
    voiced = (flatness < MAX_FLATNESS) | (level_db > floor_db + ABOVE_FLOOR_DB)
    return loud & voiced


def speech_ratio(audio: np.ndarray, silence_rms_db: float, sample_rate: int = SAMPLE_RATE) -> float:
    """Fraction of 30 ms frames that look like speech; 0.0 for audio under 30 ms."""
    frames = speech_frames(audio, silence_rms_db, sample_rate)
    return float(frames.mean()) if len(frames) else 0.0


def has_speech(audio: np.ndarray, silence_rms_db: float, min_ratio: float, min_seconds: float,
               sample_rate: int = SAMPLE_RATE) -> bool:
    """At least `min_seconds` of speech-like frames, making up at least `min_ratio` of the audio."""
    frames = speech_frames(audio, silence_rms_db, sample_rate)
    if len(frames) == 0:
        return False
    return frames.sum() * FRAME_S >= min_seconds and frames.mean() >= min_ratio


def audio_unusable_reason(clip: ClipInput, silence_rms_db: float) -> str:
    """Why a clip's audio cannot be used at all: its decoder's reason, "silent", or "" when it is usable."""
    if clip.audio is None:
        return clip.audio_reason or "no-audio"
    if clip.audio_reason:
        return clip.audio_reason
    if is_silent(clip.audio, silence_rms_db):
        return "silent"
    return ""
