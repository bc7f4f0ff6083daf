"""Small deterministic extractors for orchestration tests (a plugin: `plugins: [fake_extractors]`).

Each derives its vector from the decoded media only, so two runs over the same files give equal values
whatever the batching. `fail_on` makes the extractor raise for clip ids containing that text;
`delay_s` slows every clip down (for the kill test).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.clip import ClipInput
from extractors.base import Extractor, ExtractorOutput, register


@dataclass(frozen=True)
class FakeConfig:
    fail_on: str = ""
    delay_s: float = 0.0


class _Fake(Extractor):
    config_cls = FakeConfig
    dim = 0

    @property
    def feature_dim(self) -> int:
        return self.dim

    def spec(self) -> dict:
        return {"encoder": self.name, "layers": "none", "pooling": "mean", "version": 1}

    def extract(self, clips: Sequence[ClipInput]) -> list[ExtractorOutput]:
        out = []
        for clip in clips:
            if self.config.fail_on and self.config.fail_on in clip.clip_id:
                raise RuntimeError(f"fake {self.stage} failure on {clip.clip_id}")
            if self.config.delay_s:
                time.sleep(self.config.delay_s)
            out.append(self.one(clip))
        return out

    def one(self, clip: ClipInput) -> ExtractorOutput:
        raise NotImplementedError


@register
class FakeASR(_Fake):
    name, stage = "fake-asr", "asr"

    def one(self, clip: ClipInput) -> ExtractorOutput:
        if clip.audio is None:
            return ExtractorOutput(None, clip.audio_reason, transcript="")
        energy = float(np.sqrt(np.mean(clip.audio ** 2)))
        if energy < 1e-4:
            return ExtractorOutput(None, "asr-no-speech", {"asr_no_speech_prob": 0.99}, transcript="")
        return ExtractorOutput(None, "", {"asr_no_speech_prob": 0.01, "speech_ratio": 1.0},
                               transcript=f"energy {energy:.4f} samples {clip.audio.size}")


@register
class FakeAudio(_Fake):
    name, stage, dim = "fake-audio", "audio", 4

    def one(self, clip: ClipInput) -> ExtractorOutput:
        if clip.audio is None:
            return ExtractorOutput(None, clip.audio_reason)
        a = clip.audio
        return ExtractorOutput(np.array([a.mean(), a.std(), np.abs(a).max(), a.size / 16000], np.float32))


@register
class FakeText(_Fake):
    name, stage, dim = "fake-text", "text", 3

    def one(self, clip: ClipInput) -> ExtractorOutput:
        if clip.text_reason or not clip.transcript:
            return ExtractorOutput(None, clip.text_reason or "asr-empty")
        t = clip.transcript
        return ExtractorOutput(np.array([len(t), t.count("0"), zlib.crc32(t.encode()) % 1000], np.float32))


@register
class FakeVisual(_Fake):
    name, stage, dim = "fake-visual", "visual", 5

    def one(self, clip: ClipInput) -> ExtractorOutput:
        if clip.frames is None:
            return ExtractorOutput(None, clip.frames_reason)
        f = clip.frames.astype(np.float32) / 255.0
        n = len(f)
        vec = np.array([*f.mean(axis=(0, 1, 2)), f.std(), n], np.float32)
        return ExtractorOutput(vec, "", {"frames_sampled": n, "frames_with_face": n})


def fake_config_dict(**overrides) -> dict:
    """An ExtractionConfig as plain data using the fake extractors (stage settings merge into `config`)."""
    data = {
        "plugins": ["fake_extractors"],
        "asr": {"name": "fake-asr", "config": {}},
        "audio": {"name": "fake-audio", "config": {}},
        "text": {"name": "fake-text", "config": {}},
        "visual": {"name": "fake-visual", "config": {}},
        "decode": {"fps": 2.0, "max_frames": 4, "max_side": 64},
        "batch_size": 4,
        "num_workers": 2,
        "commit_every": 8,
    }
    for key, value in overrides.items():
        if key in ("asr", "audio", "text", "visual"):
            data[key]["config"].update(value)
        else:
            data[key] = value
    return data


def make_media(folder, names, *, seconds: float = 1.0):
    """Short noise+face clips at folder/<name> (.wav names are audio-only); returns their paths."""
    from pathlib import Path

    from demo.media import make_clip

    paths = []
    for i, name in enumerate(names):
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        audio_only = path.suffix.lower() in (".wav", ".flac", ".mp3")
        make_clip(path, audio="noise", face=True, video=not audio_only,
                  duration_s=seconds + 0.25 * (i % 4), seed=i)
        paths.append(path)
    return paths
