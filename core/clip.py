"""The clip as the extractors see it, and the names every layer shares: modalities and extraction stages.

A decoded clip (`ClipInput`) is mono float32 audio at SAMPLE_RATE and a few RGB frames, plus what earlier
extractors found out about it. MODALITIES is the order of every per-modality axis (store columns, the
model's [.., 3] masks); STAGES the order the extractors run in, ASR first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000  # Hz; every audio array handed to an extractor is mono float32 at this rate
MODALITIES: tuple[str, ...] = ("audio", "text", "visual")  # the index order of every [..., 3] axis
STAGES: tuple[str, ...] = ("asr", *MODALITIES)  # extraction order: ASR first, its transcript feeds text


@dataclass
class ClipInput:
    """A decoded clip plus what earlier extractors found out about it."""

    clip_id: str
    audio: np.ndarray | None  # float32 [n_samples] at SAMPLE_RATE, or None
    audio_reason: str  # "" when audio is usable, else why not ("no-audio-stream", "silent", "decode-error: ...")
    frames: np.ndarray | None  # uint8 RGB [T, H, W, 3] sampled frames, or None
    frames_reason: str  # "" when frames exist, else why not ("no-video-stream", "decode-error: ...")
    duration_s: float
    frame_times_s: np.ndarray | None = None  # [T] timestamps of `frames`
    transcript: str | None = None  # set by the ASR extractor; None until then
    text_reason: str = ""  # set by the ASR extractor when there is no usable transcript
    shared: dict[str, Any] = field(default_factory=dict)  # cross-extractor cache (e.g. Whisper encoder states)
