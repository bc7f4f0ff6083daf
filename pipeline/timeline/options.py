"""Settings of `comp-predict --timeline`: how a long recording is cut into utterances."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from core.config import from_dict
from core.errors import ConfigError

MAX_MARGIN_S = 1.5  # seconds of recording around an utterance's speech, per side, at most


@dataclass(frozen=True)
class TimelineOptions:
    """How a recording becomes utterances (all in seconds).

    Speech is what the voice-activity detector (silero-vad) hears plus what Whisper transcribed where the
    detector heard nothing. Stretches of speech less than `min_silence_s` apart are one utterance; an utterance
    longer than `max_utterance_s` is split at its longest pause, else at the boundary of two ASR segments, else
    at its quietest 100 ms (searched in the second half of the allowed length, so no piece is shorter than
    half of it except a last one). Each utterance is widened by `pad_s` on both sides (never into the
    neighbour's half of the pause), so that the first and last sounds of a word are not clipped.
    `margin_s`: what the extractors get of the recording around each utterance's speech, per side (the
    reported start/end do not move): None follows the checkpoint (half the median non-speech time of its
    training clips, capped at MAX_MARGIN_S), as audio features pool silence too; never into the neighbour's
    half of the pause.
    `asr_block_s`: the recording is transcribed block by block (cut at the quietest 100 ms of the block's
    last `block_search_s`), so that an hour of audio is never held in memory at once.
    """

    max_utterance_s: float = 20.0
    min_silence_s: float = 0.5
    pad_s: float = 0.1
    margin_s: float | None = None
    asr_block_s: float = 120.0  # 4 Whisper windows of 30 s: one encoder batch (8 windows: ~0.4 GB more at peak)
    block_search_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.max_utterance_s >= 1.0:
            raise ConfigError(f"max_utterance_s must be >= 1 second, got {self.max_utterance_s}")
        if not 0.0 < self.min_silence_s < self.max_utterance_s:
            raise ConfigError(f"min_silence_s must be > 0 and < max_utterance_s, got {self.min_silence_s}")
        if not 0.0 <= self.pad_s <= 1.0:
            raise ConfigError(f"pad_s must be in [0, 1] seconds, got {self.pad_s}")
        if self.margin_s is not None and not 0.0 <= self.margin_s <= MAX_MARGIN_S:
            raise ConfigError(f"margin_s must be in [0, {MAX_MARGIN_S:g}] seconds or None (the checkpoint's), "
                              f"got {self.margin_s}")
        if not self.asr_block_s >= 60.0:
            raise ConfigError(f"asr_block_s must be >= 60 seconds, got {self.asr_block_s}")
        if not 1.0 <= self.block_search_s < self.asr_block_s / 2:
            raise ConfigError(f"block_search_s must be >= 1 and < asr_block_s / 2, got {self.block_search_s}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "TimelineOptions":
        """Options from plain data; an unknown key is a ConfigError that lists the allowed ones."""
        return from_dict(cls, data, "timeline")
