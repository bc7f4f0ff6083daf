"""Whisper ASR with a guard against hallucinated text, sharing one encoder pass with the audio features.

Per clip, text is missing (and `clip.text_reason` says why) when:

    no audio                        "no-audio: <audio_reason>"
    level below silence_rms_db      "silent"
    too little speech for the VAD   "asr-no-speech"      in every window: under min_speech_s seconds, or under
                                                         min_speech_ratio of its 30 ms frames
    Whisper hears no speech         "asr-no-speech"      in every window: no_speech_prob > threshold AND
                                                         avg_logprob < threshold (whisper.transcribe's skip rule)
    every window loops              "asr-hallucination"  gzip compression ratio of the text above the threshold
                                                         after any temperature fallback (such windows are
                                                         dropped from longer clips)
    blanks or punctuation only      "asr-empty"

Audio longer than 30 s is cut into windows of at most 30 s, each cut placed at the quietest 100 ms of the
last WINDOW_SEARCH_S seconds so that words are rarely split. Each window's log-mel goes through the encoder
once, with every hidden state captured (the blocks are run here, exactly as `AudioEncoder.forward` does); the
per-layer frame sums over the frames that cover real audio go to `clip.shared[SHARED_KEY]` for the
`whisper-encoder` audio extractor, and the last state is handed to `whisper.decode`, whose DecodingTask skips
the encoder for an input shaped [n_audio_ctx, n_audio_state] (`_get_audio_features`). Windows of several
clips are batched through the encoder and the decoder together.
"""

from __future__ import annotations

import logging
import math
import os
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from extractors import vad
from extractors.base import SAMPLE_RATE, ClipInput, Extractor, ExtractorOutput, register
from extractors.packaged import (
    PACKAGED_PREFIX,
    ModelUnavailableError,
    file_sha256,
    read_manifest,
    resolve_model,
    unavailable,
)
from pipeline.configuration import ConfigError

logger = logging.getLogger(__name__)

WINDOW_S = 30  # seconds of audio per Whisper window (whisper.audio.CHUNK_LENGTH)
WINDOW_SAMPLES = WINDOW_S * SAMPLE_RATE  # 480000 samples
SAMPLES_PER_FRAME = 320  # encoder frames: 1500 per 30 s window = 50 per second (hop 160, conv stride 2)
WINDOW_SEARCH_S = 5.0  # long audio: search this many seconds before each 30 s mark for the quietest cut
CUT_FRAME_S = 0.1  # granularity of that search
SHARED_KEY = "whisper_encoder"  # clip.shared entry holding EncoderStats
DIAGNOSTICS = ("asr_no_speech_prob", "asr_avg_logprob", "asr_compression_ratio", "speech_ratio")


@dataclass(frozen=True)
class WhisperConfig:
    """Settings of the `whisper` ASR extractor (every one changes the transcript or whether there is one)."""

    model: str = "base"  # openai-whisper name ("base"), a local .pt, or "packaged:whisper-base" (offline)
    language: str | None = None  # e.g. "en"; None detects it per 30 s window
    no_speech_threshold: float = 0.6  # whisper.transcribe's defaults for its no-speech skip rule ...
    logprob_threshold: float = -1.0  # ... which needs both a high no-speech prob and a low mean logprob
    compression_ratio_threshold: float = 2.4  # gzip ratio above this = repetition loop = hallucination
    min_speech_ratio: float = 0.02  # VAD, per 30 s window: fraction of 30 ms frames that look like speech ...
    min_speech_s: float = 0.2  # ... and their total duration; a window short of either is not transcribed
    silence_rms_db: float = -60.0  # dBFS; quieter clips are "silent"
    beam_size: int | None = None  # None = greedy (temperature 0)
    temperatures: tuple[float, ...] = (0.0,)  # more than one = whisper's fallback for failed windows
    batch_windows: int = 8  # 30 s windows per encoder/decoder batch

    def __post_init__(self) -> None:
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ConfigError("temperatures must be a non-empty list of values >= 0, e.g. [0.0]")
        if self.batch_windows < 1:
            raise ConfigError(f"batch_windows must be >= 1, got {self.batch_windows}")
        if not 0.0 <= self.min_speech_ratio <= 1.0:
            raise ConfigError(f"min_speech_ratio must be in [0, 1], got {self.min_speech_ratio}")
        if self.min_speech_s < 0:
            raise ConfigError(f"min_speech_s must be >= 0, got {self.min_speech_s}")
        if self.beam_size is not None and self.beam_size < 1:
            raise ConfigError(f"beam_size must be >= 1 or null, got {self.beam_size}")


# ------------------------------------------------------------------------------------- model loading

@dataclass(frozen=True)
class LoadedWhisper:
    """An openai-whisper model plus what identifies its weights."""

    model: Any  # whisper.model.Whisper
    ref: str  # as configured
    path: str  # the checkpoint file
    weights_sha256: str

    @property
    def key(self) -> str:
        """Identifies the weights, so shared encoder states are only reused for the same model."""
        return self.weights_sha256


_LOADED: dict[tuple[str, str], LoadedWhisper] = {}


def _checkpoint_of(ref: str) -> tuple[str, str]:
    """(checkpoint path or whisper model name, sha256 of its weights) for a model reference."""
    import whisper

    if ref.startswith(PACKAGED_PREFIX):
        path = Path(resolve_model(ref))
        manifest = read_manifest(path)  # the state digest does not depend on torch's file format, unlike the file
        return str(path), (manifest or {}).get("state_sha256") or file_sha256(path)
    path = Path(ref).expanduser()
    if path.is_file():
        return str(path.resolve()), file_sha256(path)
    if ref in whisper._MODELS:
        return ref, whisper._MODELS[ref].split("/")[-2]  # the URL carries the file's sha256
    raise ModelUnavailableError(
        f"Whisper model {ref!r} is neither a file nor one of {whisper.available_models()}; "
        "use `--preset offline` (model: packaged:whisper-base) or a local .pt path")


def load_whisper(ref: str, device: torch.device | str = "cpu") -> LoadedWhisper:
    """Load an openai-whisper model once per (reference, device); later calls share it."""
    import whisper

    device = torch.device(device)
    cache_key = (ref, str(device))
    if cache_key not in _LOADED:
        source, sha = _checkpoint_of(ref)
        try:
            model = whisper.load_model(source, device=device)
        except (OSError, RuntimeError) as err:  # urllib errors are OSErrors; checksum mismatch a RuntimeError
            raise unavailable(ref, err) from err
        model.eval()
        if source in whisper._MODELS:  # where whisper.load_model put the download
            root = Path(os.getenv("XDG_CACHE_HOME", Path.home() / ".cache")) / "whisper"
            source = str(root / Path(whisper._MODELS[source]).name)
        _LOADED[cache_key] = LoadedWhisper(model, ref, source, sha)
    return _LOADED[cache_key]


# --------------------------------------------------------------------------------------- windowing

def split_windows(n_samples: int, audio: np.ndarray | None = None) -> list[tuple[int, int]]:
    """[start, end) sample ranges of at most 30 s covering the audio, cut at quiet points when `audio` is given."""
    windows, start = [], 0
    cut_frame = int(CUT_FRAME_S * SAMPLE_RATE)
    while n_samples - start > WINDOW_SAMPLES:
        end = start + WINDOW_SAMPLES
        if audio is not None:
            lo = end - int(WINDOW_SEARCH_S * SAMPLE_RATE)
            frames = audio[lo:end].astype(np.float64).reshape(-1, cut_frame)
            end = lo + int(np.argmin(np.mean(frames**2, axis=1))) * cut_frame + cut_frame // 2
        windows.append((start, end))
        start = end
    windows.append((start, n_samples))
    return windows


def real_frames(n_samples: int, n_audio_ctx: int = 1500) -> int:
    """Encoder frames that cover real audio in a window of `n_samples` (the rest covers zero padding)."""
    return max(1, min(n_audio_ctx, math.ceil(n_samples / SAMPLES_PER_FRAME)))


# ----------------------------------------------------------------------------------------- encoder

@dataclass
class EncoderStats:
    """Per-hidden-state sums over the encoder frames that cover a clip's real audio (all windows)."""

    model_key: str
    layer_sums: np.ndarray  # float64 [n_audio_layer + 1, n_audio_state]; index 0 = input to the first block
    n_frames: int

    def layer_means(self) -> torch.Tensor:
        return torch.from_numpy(self.layer_sums / self.n_frames)


def encode_mels(model: Any, mels: torch.Tensor) -> list[torch.Tensor]:
    """Every hidden state of Whisper's encoder for a batch of log-mels [B, n_mels, 3000].

    Returns n_audio_layer + 1 tensors [B, n_audio_ctx, n_audio_state]: the input to the first block, then each
    block's output, the last one after `ln_post` (the encoder output the decoder attends to), mirroring
    `AudioEncoder.forward` step by step.
    """
    enc = model.encoder
    x = F.gelu(enc.conv1(mels))
    x = F.gelu(enc.conv2(x))
    x = x.permute(0, 2, 1)
    x = (x + enc.positional_embedding).to(x.dtype)
    states = [x]
    for block in enc.blocks:
        x = block(x)
        states.append(x)
    states[-1] = enc.ln_post(x)
    return states


def log_mel(model: Any, window: np.ndarray, device: torch.device) -> torch.Tensor:
    """Whisper's log-mel of one window, padded to 30 s exactly as `whisper.transcribe` does."""
    import whisper

    mel = whisper.log_mel_spectrogram(torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32)),
                                      model.dims.n_mels, padding=WINDOW_SAMPLES, device=device)
    return whisper.pad_or_trim(mel, whisper.audio.N_FRAMES)


@dataclass
class EncoderWindow:
    clip: int  # index into the batch of clips
    samples: np.ndarray
    decode: bool  # False: the window is encoded (for audio features) but too speech-free to transcribe
    result: Any = None  # whisper DecodingResult
    features: torch.Tensor | None = None  # encoder output, kept only until decoded


def encode_windows(loaded: LoadedWhisper, windows: Sequence[EncoderWindow], n_clips: int,
                   batch_windows: int, on_batch: Any = None) -> list[EncoderStats | None]:
    """Run the encoder once per window (batched), summing hidden states over real frames per clip.

    `on_batch(windows_of_batch)` is called after each batch while the windows' `features` are set, so the
    decoder can run before the next batch and memory stays bounded by one batch.
    """
    model, device = loaded.model, next(loaded.model.parameters()).device
    dims = model.dims
    sums: list[np.ndarray | None] = [None] * n_clips
    counts = [0] * n_clips
    for first in range(0, len(windows), batch_windows):
        batch = windows[first:first + batch_windows]
        with torch.inference_mode():
            mels = torch.stack([log_mel(model, w.samples, device) for w in batch])
            states = torch.stack(encode_mels(model, mels))  # [L+1, B, n_ctx, D]
            lengths = torch.tensor([real_frames(len(w.samples), dims.n_audio_ctx) for w in batch], device=device)
            mask = torch.arange(dims.n_audio_ctx, device=device)[None, :] < lengths[:, None]  # [B, n_ctx]
            layer_sums = torch.einsum("lbtd,bt->lbd", states, mask.to(states.dtype)).double()  # [L+1, B, D]
        for j, w in enumerate(batch):
            contribution = layer_sums[:, j].cpu().numpy()
            sums[w.clip] = contribution if sums[w.clip] is None else sums[w.clip] + contribution
            counts[w.clip] += int(lengths[j])
            w.features = states[-1, j] if w.decode else None
        if on_batch is not None:
            on_batch(batch)
        for w in batch:
            w.features = None
    return [EncoderStats(loaded.key, s, c) if s is not None else None for s, c in zip(sums, counts)]


def clip_windows(clip_index: int, audio: np.ndarray, config: WhisperConfig) -> list[EncoderWindow]:
    """The clip's 30 s windows; those where the VAD finds too little speech are encoded but not decoded."""
    windows = []
    for start, end in split_windows(len(audio), audio):
        samples = audio[start:end]
        speechy = vad.has_speech(samples, config.silence_rms_db, config.min_speech_ratio, config.min_speech_s)
        windows.append(EncoderWindow(clip_index, samples, decode=speechy))
    return windows


# ------------------------------------------------------------------------------------------- guard

_BLANK = set(string.whitespace + string.punctuation + "。、，！？…「」『』-—")


def is_blank(text: str) -> bool:
    return all(ch in _BLANK for ch in text)


# --------------------------------------------------------------------------------------- extractor

@register
class WhisperASR(Extractor):
    """openai-whisper transcription with a no-speech/hallucination guard (stage "asr")."""

    name = "whisper"
    stage = "asr"
    config_cls = WhisperConfig

    def __init__(self, config: WhisperConfig | dict[str, Any], device: torch.device | str = "cpu") -> None:
        super().__init__(config, device)
        config = self.config
        self.loaded = load_whisper(config.model, self.device)
        self.model = self.loaded.model

    @property
    def feature_dim(self) -> int:
        return 0

    def spec(self) -> dict[str, Any]:
        c = self.config
        return {
            "extractor": self.name,
            "encoder": c.model,
            "checkpoint_sha256": self.loaded.weights_sha256,
            "layers": "",
            "pooling": "",
            "sample_rate": SAMPLE_RATE,
            "language": c.language,
            "no_speech_threshold": c.no_speech_threshold,
            "logprob_threshold": c.logprob_threshold,
            "compression_ratio_threshold": c.compression_ratio_threshold,
            "min_speech_ratio": c.min_speech_ratio,
            "min_speech_s": c.min_speech_s,
            "silence_rms_db": c.silence_rms_db,
            "beam_size": c.beam_size,
            "temperatures": list(c.temperatures),
            "window_s": WINDOW_S,
            "window_search_s": WINDOW_SEARCH_S,
        }

    def info(self) -> dict[str, str]:
        return {"encoder": self.config.model, "layers": "", "pooling": ""}

    def extract(self, clips: Sequence[ClipInput]) -> list[ExtractorOutput]:
        c = self.config
        outputs: list[ExtractorOutput | None] = [None] * len(clips)
        diagnostics = [dict.fromkeys(DIAGNOSTICS, float("nan")) for _ in clips]
        windows: list[EncoderWindow] = []
        for i, clip in enumerate(clips):
            reason = vad.audio_unusable_reason(clip, c.silence_rms_db)
            if reason == "silent":
                diagnostics[i]["speech_ratio"] = 0.0
                outputs[i] = self._missing(clip, reason, diagnostics[i])
                continue
            if reason:
                outputs[i] = self._missing(clip, f"no-audio: {reason}", diagnostics[i])
                continue
            diagnostics[i]["speech_ratio"] = vad.speech_ratio(clip.audio, c.silence_rms_db)
            windows += clip_windows(i, clip.audio, c)

        stats = encode_windows(self.loaded, windows, len(clips), c.batch_windows, on_batch=self._decode)
        for i, clip in enumerate(clips):
            if stats[i] is not None:
                clip.shared[SHARED_KEY] = stats[i]
            if outputs[i] is None:
                outputs[i] = self._judge(clip, [w for w in windows if w.clip == i], diagnostics[i])
        return outputs  # type: ignore[return-value]

    # -- decoding -------------------------------------------------------------------------------------

    def _options(self, temperature: float) -> Any:
        import whisper

        return whisper.DecodingOptions(
            task="transcribe", language=self.config.language, temperature=temperature,
            beam_size=self.config.beam_size if temperature == 0 else None,
            without_timestamps=True, fp16=False)

    def _needs_fallback(self, result: Any) -> bool:
        c = self.config
        if result.no_speech_prob > c.no_speech_threshold:
            return False  # whisper.transcribe does not retry a window it will skip as silent
        return result.compression_ratio > c.compression_ratio_threshold or result.avg_logprob < c.logprob_threshold

    def _decode(self, batch: Sequence[EncoderWindow]) -> None:
        """Decode the batch's windows from their precomputed encoder output (no second encoder pass)."""
        import whisper

        pending = [w for w in batch if w.decode]
        for temperature in self.config.temperatures:
            if not pending:
                break
            features = torch.stack([w.features for w in pending])
            with torch.inference_mode():
                results = whisper.decode(self.model, features, self._options(temperature))
            for w, r in zip(pending, results):
                w.result = r
            pending = [w for w in pending if self._needs_fallback(w.result)]

    # -- guard ------------------------------------------------------------------------------------------

    def _missing(self, clip: ClipInput, reason: str, diagnostics: dict[str, float]) -> ExtractorOutput:
        clip.transcript, clip.text_reason = "", reason
        return ExtractorOutput(features=None, reason=reason, diagnostics=diagnostics, transcript="")

    def _judge(self, clip: ClipInput, windows: list[EncoderWindow],
               diagnostics: dict[str, float]) -> ExtractorOutput:
        """Turn a clip's decoded windows into its transcript or the reason it has none."""
        c = self.config
        decoded = [w.result for w in windows if w.result is not None]
        if not decoded:
            return self._missing(clip, "asr-no-speech", diagnostics)
        diagnostics["asr_no_speech_prob"] = float(np.mean([r.no_speech_prob for r in decoded]))
        diagnostics["asr_avg_logprob"] = float(np.mean([r.avg_logprob for r in decoded]))
        diagnostics["asr_compression_ratio"] = float(max(r.compression_ratio for r in decoded))
        clip.shared["asr_raw_text"] = " ".join(r.text.strip() for r in decoded)
        clip.shared["asr_language"] = decoded[0].language

        speech = [r for r in decoded
                  if not (r.no_speech_prob > c.no_speech_threshold and r.avg_logprob < c.logprob_threshold)]
        if not speech:
            return self._missing(clip, "asr-no-speech", diagnostics)
        kept = [r for r in speech if r.compression_ratio <= c.compression_ratio_threshold]
        if not kept:
            return self._missing(clip, "asr-hallucination", diagnostics)
        text = " ".join(r.text.strip() for r in kept).strip()
        if is_blank(text):
            return self._missing(clip, "asr-empty", diagnostics)
        clip.transcript, clip.text_reason = text, ""
        return ExtractorOutput(features=None, reason="", diagnostics=diagnostics, transcript=text)
