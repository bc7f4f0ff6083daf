"""Utterance-level speech embeddings (stage "audio"): a Hugging Face speech encoder, or Whisper's encoder.

`hf-audio` loads any wav2vec2-style encoder (wav2vec2, HuBERT, WavLM, data2vec-audio) by hub id or local
folder with AutoFeatureExtractor + AutoModel. Each clip is normalised on its own, cut into chunks of at most
`chunk_s` seconds (long audio would exhaust memory), and the selected hidden states are averaged over real
frames only. Models whose feature extractor has `return_attention_mask=False` (wav2vec2-base and other
group-norm models) change their output when zero padding is added, and must not be given an attention mask,
so their chunks are only batched with chunks of the same length; the others are padded and masked.

`whisper-encoder` averages Whisper's encoder hidden states over the frames that cover real audio (50 per
second). The ASR extractor leaves per-layer sums in `clip.shared`; without them (ASR not run, or another
Whisper) the encoder runs here, on the same cached model instance.

Audio is absent with the clip's `audio_reason` when there is none, and "silent" for digital silence
(extractors.vad: a quiet voice is still audio).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.clip import SAMPLE_RATE, ClipInput
from core.errors import ConfigError
from extractors import asr, vad
from extractors.base import Extractor, ExtractorOutput, register
from extractors.packaged import hf_identity, load_hf
from extractors.pooling import LayerSpec, check_depth, combine_layers, describe_layers, masked_sum, validate_layers

logger = logging.getLogger(__name__)

POOLING = "mean over real frames"
RULES_VERSION = 2  # which clips are "silent", and how Whisper's input is scaled and windowed (extraction spec)


def _missing(reason: str) -> ExtractorOutput:
    return ExtractorOutput(features=None, reason=reason)


def _check_layers(layers: LayerSpec) -> None:
    try:
        validate_layers(layers)
    except ValueError as err:
        raise ConfigError(f"layers: {err}") from err


# ------------------------------------------------------------------------------------------ hf-audio

@dataclass(frozen=True)
class HFAudioConfig:
    """Settings of the `hf-audio` extractor."""

    model: str = "facebook/wav2vec2-base"  # hub id or local folder (config, weights, preprocessor_config.json)
    revision: str | None = None  # hub branch, tag or commit
    layers: LayerSpec = "last"  # see extractors.pooling
    chunk_s: float = 20.0  # seconds per forward pass; longer audio is chunked
    min_chunk_s: float = 1.0  # a shorter tail joins the previous chunk instead of standing alone
    batch_size: int = 8  # chunks per forward pass

    def __post_init__(self) -> None:
        _check_layers(self.layers)
        if self.chunk_s <= 0 or not 0 <= self.min_chunk_s <= self.chunk_s:
            raise ConfigError(f"need chunk_s > 0 and 0 <= min_chunk_s <= chunk_s, got {self.chunk_s}, "
                              f"{self.min_chunk_s}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


def chunk_bounds(n_samples: int, chunk: int, min_chunk: int) -> list[tuple[int, int]]:
    """[start, end) ranges of `chunk` samples; a tail under `min_chunk` is merged into the previous range."""
    bounds = [(s, min(s + chunk, n_samples)) for s in range(0, n_samples, chunk)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_chunk:
        bounds[-2:] = [(bounds[-2][0], n_samples)]
    return bounds


@register
class HFAudioEncoder(Extractor):
    """Mean-pooled hidden states of a Hugging Face speech encoder (wav2vec2 family)."""

    name = "hf-audio"
    stage = "audio"
    config_cls = HFAudioConfig

    def __init__(self, config: HFAudioConfig | dict[str, Any], device: torch.device | str = "cpu") -> None:
        super().__init__(config, device)
        config = self.config
        from transformers import AutoFeatureExtractor, AutoModel

        self.feature_extractor = load_hf(AutoFeatureExtractor, config.model, config.revision)
        self.model = load_hf(AutoModel, config.model, config.revision).to(self.device).eval()
        if not hasattr(self.model, "_get_feat_extract_output_lengths"):
            raise ConfigError(f"audio.model {config.model!r} is a {type(self.model).__name__}; hf-audio needs a "
                              "wav2vec2-style encoder (wav2vec2, HuBERT, WavLM, data2vec-audio)")
        self.sampling_rate = getattr(self.feature_extractor, "sampling_rate", SAMPLE_RATE)
        if self.sampling_rate != SAMPLE_RATE:
            raise ConfigError(f"audio.model {config.model!r} expects {self.sampling_rate} Hz audio; "
                              f"the pipeline decodes at {SAMPLE_RATE} Hz")
        self.use_attention_mask = bool(getattr(self.feature_extractor, "return_attention_mask", False))
        self.n_states = self.model.config.num_hidden_layers + 1
        check_depth(config.layers, self.n_states)
        self.identity = hf_identity(config.model, config.revision)

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def spec(self) -> dict[str, Any]:
        c = self.config
        fe = self.feature_extractor
        return {
            "extractor": self.name,
            "rules": RULES_VERSION,
            "encoder": c.model,
            **self.identity,
            "layers": describe_layers(c.layers),
            "pooling": POOLING,
            "sample_rate": SAMPLE_RATE,
            "do_normalize": bool(getattr(fe, "do_normalize", False)),
            "attention_mask": self.use_attention_mask,
            "chunk_s": c.chunk_s,
            "min_chunk_s": c.min_chunk_s,
            "silent_peak": vad.SILENT_PEAK,
            "dim": self.feature_dim,
        }

    def info(self) -> dict[str, str]:
        return {"encoder": self.config.model, "layers": describe_layers(self.config.layers), "pooling": POOLING}

    def _frames(self, n_samples: int | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.model._get_feat_extract_output_lengths(torch.as_tensor(n_samples)))

    def extract(self, clips: Sequence[ClipInput]) -> list[ExtractorOutput]:
        c = self.config
        outputs: list[ExtractorOutput | None] = [None] * len(clips)
        chunks: list[tuple[int, np.ndarray]] = []
        chunk, min_chunk = int(c.chunk_s * SAMPLE_RATE), int(c.min_chunk_s * SAMPLE_RATE)
        for i, clip in enumerate(clips):
            reason = vad.audio_unusable_reason(clip)
            if not reason and int(self._frames(len(clip.audio))) < 1:
                reason = f"too-short: {len(clip.audio)} samples"
            if reason:
                outputs[i] = _missing(reason)
                continue
            # normalised per clip, before chunking, so that a clip's chunks share one scale
            values = self.feature_extractor(clip.audio, sampling_rate=SAMPLE_RATE,
                                            return_tensors="np")["input_values"][0].astype(np.float32)
            chunks += [(i, values[s:e]) for s, e in chunk_bounds(len(values), chunk, min_chunk)]

        sums: dict[int, torch.Tensor] = {}
        counts: dict[int, int] = defaultdict(int)
        for batch in self._batches(chunks):
            pooled, n_frames = self._forward([values for _, values in batch])
            for (i, _), vec, n in zip(batch, pooled, n_frames):
                sums[i] = sums[i] + vec if i in sums else vec
                counts[i] += int(n)
        for i in sums:
            outputs[i] = ExtractorOutput(features=(sums[i] / counts[i]).to(torch.float32).numpy())
        return outputs  # type: ignore[return-value]

    def _batches(self, chunks: list[tuple[int, np.ndarray]]) -> Iterator[list[tuple[int, np.ndarray]]]:
        """Length-sorted batches (padded and masked) or equal-length batches (models that must not see padding)."""
        size = self.config.batch_size
        if self.use_attention_mask:
            ordered = sorted(chunks, key=lambda item: len(item[1]))
            for first in range(0, len(ordered), size):
                yield ordered[first:first + size]
            return
        by_length: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
        for item in chunks:
            by_length[len(item[1])].append(item)
        for group in by_length.values():
            for first in range(0, len(group), size):
                yield group[first:first + size]

    def _forward(self, batch: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-chunk sums of the combined hidden states over real frames, and the real frame counts."""
        lengths = torch.tensor([len(v) for v in batch])
        inputs = torch.zeros(len(batch), int(lengths.max()))
        for j, values in enumerate(batch):
            inputs[j, : len(values)] = torch.from_numpy(values)
        kwargs: dict[str, Any] = {"output_hidden_states": True}
        if self.use_attention_mask:
            kwargs["attention_mask"] = (torch.arange(inputs.shape[1])[None, :] < lengths[:, None]).long()
            kwargs["attention_mask"] = kwargs["attention_mask"].to(self.device)
        with torch.inference_mode():
            out = self.model(inputs.to(self.device), **kwargs)
            hidden = combine_layers(out.hidden_states, self.config.layers)  # [B, F, D]
            frames = self._frames(lengths).to(self.device)
            mask = torch.arange(hidden.shape[1], device=self.device)[None, :] < frames[:, None]
            pooled, n_frames = masked_sum(hidden, mask)
        return pooled.cpu(), n_frames.cpu()


# ----------------------------------------------------------------------------------- whisper-encoder

@dataclass(frozen=True)
class WhisperEncoderConfig:
    """Settings of the `whisper-encoder` extractor."""

    model: str = "base"  # as in the ASR config; "packaged:whisper-base" offline
    layers: LayerSpec = "mean-all"  # over the 7 hidden states of base: conv/positional input + 6 blocks
    vad_threshold: float = vad.DEFAULT_THRESHOLD  # where audio over 30 s is cut (as the ASR's windows)
    batch_windows: int = 8  # 30 s windows per encoder batch when the encoder runs here

    def __post_init__(self) -> None:
        _check_layers(self.layers)
        if self.batch_windows < 1:
            raise ConfigError(f"batch_windows must be >= 1, got {self.batch_windows}")


@register
class WhisperEncoderFeatures(Extractor):
    """Whisper encoder hidden states, mean over the frames of real audio (shared with the ASR pass)."""

    name = "whisper-encoder"
    stage = "audio"
    config_cls = WhisperEncoderConfig

    def __init__(self, config: WhisperEncoderConfig | dict[str, Any], device: torch.device | str = "cpu") -> None:
        super().__init__(config, device)
        config = self.config
        self.loaded = asr.load_whisper(config.model, self.device)
        self.n_states = self.loaded.model.dims.n_audio_layer + 1
        check_depth(config.layers, self.n_states)

    @property
    def feature_dim(self) -> int:
        return int(self.loaded.model.dims.n_audio_state)

    def spec(self) -> dict[str, Any]:
        c = self.config
        return {
            "extractor": self.name,
            "rules": RULES_VERSION,
            "encoder": c.model,
            "checkpoint_sha256": self.loaded.weights_sha256,
            "layers": describe_layers(c.layers),
            "pooling": POOLING,
            "sample_rate": SAMPLE_RATE,
            "window_s": asr.WINDOW_S,
            "window_search_s": asr.WINDOW_SEARCH_S,
            **vad.identity(),
            "vad_threshold": c.vad_threshold,
            "silent_peak": vad.SILENT_PEAK,
            "dim": self.feature_dim,
        }

    def info(self) -> dict[str, str]:
        return {"encoder": self.config.model, "layers": describe_layers(self.config.layers), "pooling": POOLING}

    def extract(self, clips: Sequence[ClipInput]) -> list[ExtractorOutput]:
        c = self.config
        outputs: list[ExtractorOutput | None] = [None] * len(clips)
        to_encode: list[int] = []
        for i, clip in enumerate(clips):
            reason = vad.audio_unusable_reason(clip)
            if reason:
                outputs[i] = _missing(reason)
                continue
            stats = clip.shared.get(asr.SHARED_KEY)
            if not (isinstance(stats, asr.EncoderStats) and stats.model_key == self.loaded.key):
                to_encode.append(i)
        if to_encode:
            windows = [asr.EncoderWindow(k, asr.whisper_audio(clips[i])[s:e], decode=False, start=s)
                       for k, i in enumerate(to_encode)
                       for s, e in asr.clip_split(clips[i], c.vad_threshold)]
            for i, stats in zip(to_encode, asr.encode_windows(self.loaded, windows, len(to_encode),
                                                               c.batch_windows)):
                clips[i].shared[asr.SHARED_KEY] = stats
        for i, clip in enumerate(clips):
            if outputs[i] is None:
                stats = clip.shared[asr.SHARED_KEY]
                vector = combine_layers(stats.layer_means(), c.layers)
                outputs[i] = ExtractorOutput(features=vector.to(torch.float32).numpy())
        return outputs  # type: ignore[return-value]
