"""Whisper ASR that keeps every word spoken and nothing Whisper invents, sharing one encoder pass with the
audio features.

Per clip, text is missing (and `clip.text_reason` says why) when:

    no audio                        "no-audio: <audio_reason>"
    digital silence                 "silent"             (extractors.vad: no sample above two 16-bit steps)
    no speech heard                 "asr-no-speech"      in every window: where silero-vad (judged relative to
                                                         the recording) hears min_speech_s of speech, Whisper's
                                                         skip rule (no_speech_prob > threshold AND avg_logprob <
                                                         threshold); where it hears none, Whisper's scores must
                                                         both say speech (no_speech_prob < threshold AND
                                                         avg_logprob >= threshold)
    every window is a decoding loop "asr-hallucination"  see below
    blanks or punctuation only      "asr-empty"

Two detectors, so that neither alone loses speech or lets noise through: silero-vad misses some shouted or
laughing speech (RAVDESS's strong happy/fearful takes; Whisper's no-speech probability ~0.1 there), and
Whisper's own rule lets "you" / "Thank you." through on hiss and quiet music (no-speech probability > 0.6
but mean logprob just above -1). A window the VAD finds silent needs both of Whisper's scores to say speech.

Decoding follows `whisper.transcribe`: timestamps on, the temperature fallback (a window whose text is too
repetitive, compression ratio > threshold, or too unlikely, avg_logprob < threshold, is decoded again at the
next temperature), and timestamp-driven seeking inside a window: when the text stops at a timestamp before
the window's end (an unfinished last segment, or speech the VAD hears after the last segment), the window is
decoded again from that timestamp, so no speech inside a window is lost. Text is not conditioned on the
previous window (a known way for one loop to spread).

Hallucination. A high compression ratio is not evidence on its own: speech that repeats ("I'm fine. I'm
fine.") compresses well too. A window's text is dropped as a decoding loop only when, after the fallback, it
is still over the compression threshold AND it is more text than its speech could hold: more than
MAX_CHARS_PER_SPEECH_S characters per second of VAD speech in the window (people speak about 15, rarely 25),
or the decoder ran to its token limit without ending. Speech said twice keeps a normal rate and ends.

Whisper also drops words: speech that repeats is often written once ("I love you so much." for six times
said), and a window can stop early. A window whose kept text is far too short for its speech (under
MIN_CHARS_PER_SPEECH_S characters per second of VAD speech) or that was a decoding loop is decoded again
chunk by chunk, each chunk one stretch of VAD speech (faster-whisper's VAD-chunked decoding), and the
chunks' text replaces the window's when it is longer.

Level: Whisper gets a soft clip raised to a fixed peak (`whisper_audio`), so soft speech is heard as well
as loud speech.

Windows: audio longer than 30 s is cut into windows of at most 30 s, each cut in a pause the VAD found in the
last WINDOW_SEARCH_S seconds before the 30 s mark (else at the quietest 100 ms there), so no speech falls
between windows. Each window's log-mel goes through the encoder once, with every hidden state captured (the
blocks are run here, exactly as `AudioEncoder.forward` does); the per-layer frame sums over the frames that
cover real audio go to `clip.shared[SHARED_KEY]` for the `whisper-encoder` audio extractor, and the last
state is handed to `whisper.decode`, whose DecodingTask skips the encoder for an input shaped
[n_audio_ctx, n_audio_state] (`_get_audio_features`). Only a window decoded again from a timestamp inside it
is encoded a second time. Windows of several clips are batched through the encoder and the decoder.

The transcript's segments (start and end in seconds of the clip, text, scores) and the VAD's speech
segments stay in `clip.shared[RESULT_KEY]` (an `ASRResult`) for callers that cut utterances.
"""

from __future__ import annotations

import logging
import math
import os
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core.clip import SAMPLE_RATE, ClipInput
from core.errors import ConfigError
from extractors import vad
from extractors.base import Extractor, ExtractorOutput, register
from extractors.packaged import (
    PACKAGED_PREFIX,
    ModelUnavailableError,
    file_sha256,
    read_manifest,
    resolve_model,
    unavailable,
)

logger = logging.getLogger(__name__)

RULES_VERSION = 2  # bump when a rule above changes which text a clip gets (part of the extraction spec)
WINDOW_S = 30  # seconds of audio per Whisper window (whisper.audio.CHUNK_LENGTH)
WINDOW_SAMPLES = WINDOW_S * SAMPLE_RATE  # 480000 samples
SAMPLES_PER_FRAME = 320  # encoder frames: 1500 per 30 s window = 50 per second (hop 160, conv stride 2)
SAMPLES_PER_TIMESTAMP = 320  # Whisper's timestamp tokens step 0.02 s (whisper.transcribe's time_precision)
WINDOW_SEARCH_S = 5.0  # long audio: search this many seconds before each 30 s mark for a pause to cut in
CUT_FRAME_S = 0.1  # granularity of the quiet-point search
MAX_CHARS_PER_SPEECH_S = 30.0  # more text per second of speech than anyone says: a decoding loop
MIN_CHARS_PER_SPEECH_S = 6.0  # less text than this per second of speech: words were left out ...
MIN_SPARSE_SPEECH_S = 3.0  # ... judged on windows with at least this much speech
CHUNK_GAP_S = 0.5  # re-decoding speech chunk by chunk: VAD segments closer than this form one chunk
MIN_SEEK_S = 1.0  # seek again inside a window only when the text stopped at least this far into it ...
MAX_SEEKS = 8  # ... and at most this many times per window
SHARED_KEY = "whisper_encoder"  # clip.shared entry holding EncoderStats
RESULT_KEY = "asr"  # clip.shared entry holding the ASRResult
DIAGNOSTICS = ("asr_no_speech_prob", "asr_avg_logprob", "asr_compression_ratio", "speech_ratio")


@dataclass(frozen=True)
class WhisperConfig:
    """Settings of the `whisper` ASR extractor (every one changes the transcript or whether there is one)."""

    model: str = "base"  # openai-whisper name ("base"), a local .pt, or "packaged:whisper-base" (offline)
    language: str | None = None  # e.g. "en"; None detects it per 30 s window
    no_speech_threshold: float = 0.6  # whisper.transcribe's defaults for its no-speech skip rule ...
    logprob_threshold: float = -1.0  # ... which needs both a high no-speech prob and a low mean logprob
    compression_ratio_threshold: float = 2.4  # gzip ratio above this: decode again hotter, then loop check
    vad_threshold: float = vad.DEFAULT_THRESHOLD  # silero-vad speech probability threshold
    min_speech_s: float = 0.25  # seconds of VAD speech for a window to count as heard by the VAD
    beam_size: int | None = None  # None = greedy at temperature 0
    temperatures: tuple[float, ...] = (0.0,)  # more than one = whisper's fallback for failed windows
    best_of: int | None = None  # candidates sampled at temperatures > 0 (whisper.transcribe's CLI: 5)
    batch_windows: int = 8  # 30 s windows per encoder/decoder batch

    def __post_init__(self) -> None:
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ConfigError("temperatures must be a non-empty list of values >= 0, e.g. [0.0]")
        if self.batch_windows < 1:
            raise ConfigError(f"batch_windows must be >= 1, got {self.batch_windows}")
        if not 0.0 < self.vad_threshold < 1.0:
            raise ConfigError(f"vad_threshold must be in (0, 1), got {self.vad_threshold}")
        if self.min_speech_s < 0:
            raise ConfigError(f"min_speech_s must be >= 0, got {self.min_speech_s}")
        if self.beam_size is not None and self.beam_size < 1:
            raise ConfigError(f"beam_size must be >= 1 or null, got {self.beam_size}")
        if self.best_of is not None and self.best_of < 1:
            raise ConfigError(f"best_of must be >= 1 or null, got {self.best_of}")


@dataclass(frozen=True)
class ASRSegment:
    """One timestamped piece of the transcript (whisper.transcribe's segment)."""

    start_s: float  # seconds from the start of the clip
    end_s: float
    text: str
    avg_logprob: float  # of the window decode it came from
    no_speech_prob: float
    compression_ratio: float
    temperature: float


@dataclass
class ASRResult:
    """What the ASR found in one clip: the kept segments, the dropped ones, and the VAD's speech."""

    segments: list[ASRSegment] = field(default_factory=list)
    dropped: list[tuple[str, ASRSegment]] = field(default_factory=list)  # (reason, segment)
    speech: list[tuple[float, float]] = field(default_factory=list)  # VAD speech (start_s, end_s)
    language: str | None = None

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments if s.text).strip()


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

def split_windows(n_samples: int, audio: np.ndarray | None = None,
                  speech: Sequence[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """[start, end) sample ranges of at most 30 s covering the audio.

    Each cut lies in the last WINDOW_SEARCH_S seconds before the 30 s mark: in the middle of the longest pause
    between `speech` segments there, else (no speech given, or speech all through) at the quietest 100 ms of
    `audio`, else at the mark.
    """
    windows, start = [], 0
    cut_frame = int(CUT_FRAME_S * SAMPLE_RATE)
    while n_samples - start > WINDOW_SAMPLES:
        end = start + WINDOW_SAMPLES
        lo = end - int(WINDOW_SEARCH_S * SAMPLE_RATE)
        gap = _longest_pause(speech, lo, end) if speech is not None else None
        if gap is not None:
            end = (gap[0] + gap[1]) // 2
        elif audio is not None:
            frames = audio[lo:end].astype(np.float64).reshape(-1, cut_frame)
            end = lo + int(np.argmin(np.mean(frames**2, axis=1))) * cut_frame + cut_frame // 2
        windows.append((start, end))
        start = end
    windows.append((start, n_samples))
    return windows


def _longest_pause(speech: Sequence[tuple[int, int]], lo: int, hi: int) -> tuple[int, int] | None:
    """The longest stretch of [lo, hi) outside every speech segment, or None when speech covers it all."""
    edges = [lo] + [x for a, b in sorted(speech) if b > lo and a < hi for x in (max(a, lo), min(b, hi))] + [hi]
    pauses = [(edges[i], edges[i + 1]) for i in range(0, len(edges) - 1, 2) if edges[i + 1] > edges[i]]
    return max(pauses, key=lambda g: g[1] - g[0]) if pauses else None


def clip_speech(clip: ClipInput, threshold: float) -> list[tuple[int, int]]:
    """The clip's VAD speech segments (samples), computed once per clip and kept in `clip.shared`."""
    key = f"vad_speech_{threshold:g}"
    if key not in clip.shared:
        clip.shared[key] = vad.speech_segments(clip.audio, threshold)
    return clip.shared[key]


def clip_split(clip: ClipInput, threshold: float) -> list[tuple[int, int]]:
    """The clip's 30 s windows; the VAD is run only for audio longer than one window."""
    n = len(clip.audio)
    if n <= WINDOW_SAMPLES:
        return [(0, n)]
    return split_windows(n, clip.audio, clip_speech(clip, threshold))


def whisper_audio(clip: ClipInput) -> np.ndarray:
    """The clip's audio as Whisper's encoder gets it: a clip whose peak is under vad.PEAK_TARGET is raised to it.

    Whisper's log-mel floors the power at 1e-10 (-100 dB) before it normalises to the window's maximum, so a
    recording at -64 dBFS keeps only ~40 of the 80 dB its log-mel can hold and is misheard; raised, it keeps
    them all. Louder clips are left as they are (their log-mel is already relative to their own peak).
    """
    if "whisper_audio" not in clip.shared:
        peak = float(np.max(np.abs(clip.audio))) if clip.audio.size else 0.0
        gain = vad.PEAK_TARGET / peak if 0 < peak < vad.PEAK_TARGET else 1.0
        clip.shared["whisper_audio"] = clip.audio * np.float32(gain) if gain != 1.0 else clip.audio
    return clip.shared["whisper_audio"]


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
    decode: bool  # False: the window is encoded (for audio features) but holds no speech to transcribe
    start: int = 0  # first sample of the window in the clip
    stats: bool = True  # False: a window decoded again from a timestamp inside it (no audio-feature sums)
    vad_speech: bool = True  # the VAD heard at least min_speech_s of speech in it
    result: Any = None  # whisper DecodingResult (after temperature fallback)
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
            if w.stats:
                contribution = layer_sums[:, j].cpu().numpy()
                sums[w.clip] = contribution if sums[w.clip] is None else sums[w.clip] + contribution
                counts[w.clip] += int(lengths[j])
            w.features = states[-1, j] if w.decode else None
        if on_batch is not None:
            on_batch(batch)
        for w in batch:
            w.features = None
    return [EncoderStats(loaded.key, s, c) if s is not None else None for s, c in zip(sums, counts)]


# ------------------------------------------------------------------------------------------- guard

_BLANK = set(string.whitespace + string.punctuation + "。、，！？…「」『』-—")


def is_blank(text: str) -> bool:
    return all(ch in _BLANK for ch in text)


def decoding_loop(text: str, compression_ratio: float, n_tokens: int, speech_s: float, threshold: float,
                  sample_len: int) -> bool:
    """True when a window's text is a decoding loop rather than speech that repeats (see the module doc)."""
    if compression_ratio <= threshold:
        return False
    too_dense = len(text.strip()) > MAX_CHARS_PER_SPEECH_S * max(speech_s, CUT_FRAME_S)
    return too_dense or n_tokens >= sample_len


def finished_early(w: "EncoderWindow", offset: int, speech: Sequence[tuple[int, int]], min_speech_s: float,
                   unfinished_at: int | None) -> bool:
    """Decode `w` again from `offset` (samples into it)? Always after an unfinished last segment (whisper.transcribe
    seeks there); after finished text only when the VAD hears speech that starts after the text ended (Whisper's
    end timestamps come early, so speech running on from the last segment is that segment's, not new speech)."""
    if unfinished_at is not None:
        return True
    end = w.start + len(w.samples)
    later = [(max(a, w.start + offset), min(b, end)) for a, b in speech if w.start + offset <= a < end]
    return vad.speech_seconds(later) >= min_speech_s


def timestamp_segments(tokens: Sequence[int],
                       timestamp_begin: int) -> tuple[list[tuple[int, int, list[int]]], int | None]:
    """whisper.transcribe's reading of a timestamped decode: ([(start_pos, end_pos, text tokens)], next_pos).

    Positions count 0.02 s steps from the window start. next_pos is where to decode again (the start of an
    unfinished last segment), or None when the window was finished.
    """
    is_ts = [t >= timestamp_begin for t in tokens]
    single_ending = len(tokens) >= 2 and is_ts[-2:] == [False, True]
    consecutive = [i + 1 for i in range(len(tokens) - 1) if is_ts[i] and is_ts[i + 1]]
    out: list[tuple[int, int, list[int]]] = []
    if consecutive:
        slices = consecutive + ([len(tokens)] if single_ending else [])
        last = 0
        for cut in slices:
            piece = list(tokens[last:cut])
            out.append((piece[0] - timestamp_begin, piece[-1] - timestamp_begin,
                        [t for t in piece if t < timestamp_begin]))
            last = cut
        if single_ending:
            return out, None
        return out, tokens[last - 1] - timestamp_begin
    stamps = [t for t in tokens if t >= timestamp_begin]
    end = stamps[-1] - timestamp_begin if stamps and stamps[-1] != timestamp_begin else None
    text = [t for t in tokens if t < timestamp_begin]
    if text:
        out.append((0, end if end is not None else -1, text))  # -1: the end of the window
    return out, None


# --------------------------------------------------------------------------------------- extractor

@register
class WhisperASR(Extractor):
    """openai-whisper transcription with a no-speech and decoding-loop guard (stage "asr")."""

    name = "whisper"
    stage = "asr"
    config_cls = WhisperConfig

    def __init__(self, config: WhisperConfig | dict[str, Any], device: torch.device | str = "cpu") -> None:
        super().__init__(config, device)
        config = self.config
        self.loaded = load_whisper(config.model, self.device)
        self.model = self.loaded.model
        self.sample_len = self.model.dims.n_text_ctx // 2  # DecodingOptions' default

    @property
    def feature_dim(self) -> int:
        return 0

    def spec(self) -> dict[str, Any]:
        c = self.config
        return {
            "extractor": self.name,
            "rules": RULES_VERSION,
            "encoder": c.model,
            "checkpoint_sha256": self.loaded.weights_sha256,
            "layers": "",
            "pooling": "",
            "sample_rate": SAMPLE_RATE,
            "language": c.language,
            "no_speech_threshold": c.no_speech_threshold,
            "logprob_threshold": c.logprob_threshold,
            "compression_ratio_threshold": c.compression_ratio_threshold,
            "max_chars_per_speech_s": MAX_CHARS_PER_SPEECH_S,
            **vad.identity(),
            "vad_threshold": c.vad_threshold,
            "min_speech_s": c.min_speech_s,
            "silent_peak": vad.SILENT_PEAK,
            "beam_size": c.beam_size,
            "best_of": c.best_of,
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
            reason = vad.audio_unusable_reason(clip)
            if reason == "silent":
                diagnostics[i]["speech_ratio"] = 0.0
                outputs[i] = self._missing(clip, reason, diagnostics[i])
                continue
            if reason:
                outputs[i] = self._missing(clip, f"no-audio: {reason}", diagnostics[i])
                continue
            speech = clip_speech(clip, c.vad_threshold)
            diagnostics[i]["speech_ratio"] = vad.speech_seconds(speech) / max(len(clip.audio) / SAMPLE_RATE, 1e-9)
            clip.shared[RESULT_KEY] = ASRResult(speech=[(a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in speech])
            for start, end in clip_split(clip, c.vad_threshold):
                speechy = vad.speech_seconds(speech, start, end) >= c.min_speech_s
                windows.append(EncoderWindow(i, whisper_audio(clip)[start:end], decode=True, start=start,
                                             vad_speech=speechy))

        decoded: list[EncoderWindow] = []

        def on_batch(batch: Sequence[EncoderWindow]) -> None:
            self._decode(batch)
            decoded.extend(w for w in batch if w.result is not None)

        stats = encode_windows(self.loaded, windows, len(clips), c.batch_windows, on_batch=on_batch)
        self._seek_within(clips, decoded)
        groups = {(w.clip, w.start): [w] for w in decoded if w.stats}
        for w in decoded:
            if not w.stats:
                owner = max((k for k in groups if k[0] == w.clip and k[1] <= w.start), key=lambda k: k[1])
                groups[owner].append(w)
        judged = {key: self._window_segments(clips[key[0]], ws) for key, ws in groups.items()}
        self._redecode_by_chunks(clips, groups, judged)
        for i, clip in enumerate(clips):
            if stats[i] is not None:
                clip.shared[SHARED_KEY] = stats[i]
            if outputs[i] is None:
                mine = sorted((k for k in judged if k[0] == i), key=lambda k: k[1])
                outputs[i] = self._judge(clip, [judged[k] for k in mine], [w for w in decoded if w.clip == i],
                                         diagnostics[i])
        return outputs  # type: ignore[return-value]

    # -- decoding -------------------------------------------------------------------------------------

    def _options(self, temperature: float) -> Any:
        import whisper

        c = self.config
        return whisper.DecodingOptions(
            task="transcribe", language=c.language, temperature=temperature,
            beam_size=c.beam_size if temperature == 0 else None,
            best_of=c.best_of if temperature > 0 else None,
            without_timestamps=False, fp16=False)

    def _needs_fallback(self, result: Any) -> bool:
        """whisper.transcribe's rule: retry a window that is too repetitive or too unlikely, unless silent."""
        c = self.config
        if result.no_speech_prob > c.no_speech_threshold and result.avg_logprob < c.logprob_threshold:
            return False
        return result.compression_ratio > c.compression_ratio_threshold or result.avg_logprob < c.logprob_threshold

    def _decode(self, batch: Sequence[EncoderWindow]) -> None:
        """Decode the batch's windows from their precomputed encoder output (no second encoder pass)."""
        import whisper

        pending = [w for w in batch if w.decode]
        for temperature in self.config.temperatures:
            if not pending:
                break
            options = self._options(temperature)
            # openai-whisper's beam search (and best-of-n sampling) mixes up the windows of a batch: one at a time
            size = 1 if (options.beam_size or 1) > 1 or (options.best_of or 1) > 1 else len(pending)
            for first in range(0, len(pending), size):
                group = pending[first:first + size]
                features = torch.stack([w.features for w in group])
                with torch.inference_mode(), torch.random.fork_rng(devices=[]):
                    torch.manual_seed(0)  # sampling at temperature > 0 gives the same text on every run
                    results = whisper.decode(self.model, features, options)
                for w, r in zip(group, results):
                    w.result = r
            pending = [w for w in pending if self._needs_fallback(w.result)]

    def _seek_within(self, clips: Sequence[ClipInput], decoded: list[EncoderWindow]) -> None:
        """Decode again from the last timestamp of every window whose text stopped early while the VAD still
        hears speech after it (whisper.transcribe's seeking, kept inside the window)."""
        c = self.config
        tokenizer = self._tokenizer()
        todo = list(decoded)
        for _ in range(MAX_SEEKS):
            again: list[EncoderWindow] = []
            for w in todo:
                pos = self._resume_at(w, tokenizer.timestamp_begin)
                if pos is None:
                    continue
                offset = pos * SAMPLES_PER_TIMESTAMP
                rest = w.samples[offset:]
                if not finished_early(w, offset, clip_speech(clips[w.clip], c.vad_threshold), c.min_speech_s,
                                      timestamp_segments(w.result.tokens, tokenizer.timestamp_begin)[1]):
                    continue
                again.append(EncoderWindow(w.clip, rest, decode=True, start=w.start + offset, stats=False))
            if not again:
                return
            encode_windows(self.loaded, again, len(clips), c.batch_windows, on_batch=self._decode)
            again = [w for w in again if w.result is not None]
            decoded.extend(again)
            todo = again

    def _resume_at(self, w: EncoderWindow, timestamp_begin: int) -> int | None:
        """The timestamp position (0.02 s steps) to decode `w` again from, or None when it is done."""
        if self._skipped(w):
            return None
        pieces, next_pos = timestamp_segments(w.result.tokens, timestamp_begin)
        if next_pos is None:  # finished: decode again only when the VAD hears speech after the last segment
            ends = [end for _, end, _ in pieces if end > 0]
            next_pos = max(ends) if ends else None
        if next_pos is None or next_pos * SAMPLES_PER_TIMESTAMP < MIN_SEEK_S * SAMPLE_RATE:
            return None
        if next_pos * SAMPLES_PER_TIMESTAMP >= len(w.samples) - int(CUT_FRAME_S * SAMPLE_RATE):
            return None
        return next_pos

    def _tokenizer(self) -> Any:
        import whisper.tokenizer

        return whisper.tokenizer.get_tokenizer(self.model.is_multilingual, num_languages=self.model.num_languages)

    # -- guard ------------------------------------------------------------------------------------------

    def _skipped(self, w: EncoderWindow) -> bool:
        """No speech in the window's decode. Where the VAD heard speech: whisper.transcribe's skip rule (a high
        no-speech probability AND a low mean logprob). Where it heard none, Whisper must say speech on both
        of its scores (no-speech probability under its threshold AND mean logprob over its threshold):
        shouted or laughing speech the VAD misses scores ~0.1 there, noise, hum and music 0.66 and up."""
        c, r = self.config, w.result
        if w.vad_speech:
            return r.no_speech_prob > c.no_speech_threshold and r.avg_logprob < c.logprob_threshold
        return not (r.no_speech_prob < c.no_speech_threshold and r.avg_logprob >= c.logprob_threshold)

    def _missing(self, clip: ClipInput, reason: str, diagnostics: dict[str, float]) -> ExtractorOutput:
        clip.transcript, clip.text_reason = "", reason
        return ExtractorOutput(features=None, reason=reason, diagnostics=diagnostics, transcript="")

    def _segments(self, w: EncoderWindow, timestamp_begin: int) -> list[ASRSegment]:
        """The window's decode as segments in clip seconds; an unfinished last segment is left to the seek."""
        r = w.result
        pieces, next_pos = timestamp_segments(r.tokens, timestamp_begin)
        tokenizer = self._tokenizer()
        segments = []
        for start, end, text_tokens in pieces:
            end_samples = len(w.samples) if end < 0 else end * SAMPLES_PER_TIMESTAMP
            segments.append(ASRSegment(
                start_s=(w.start + start * SAMPLES_PER_TIMESTAMP) / SAMPLE_RATE,
                end_s=(w.start + end_samples) / SAMPLE_RATE,
                text=tokenizer.decode(text_tokens).strip(), avg_logprob=float(r.avg_logprob),
                no_speech_prob=float(r.no_speech_prob), compression_ratio=float(r.compression_ratio),
                temperature=float(r.temperature)))
        return segments

    def _window_segments(self, clip: ClipInput, ws: list[EncoderWindow]) -> "WindowText":
        """The text of one window (its first decode and the decodes seeking inside it), judged."""
        c = self.config
        timestamp_begin = self._tokenizer().timestamp_begin
        speech = clip_speech(clip, c.vad_threshold)
        ws = sorted(ws, key=lambda w: w.start)
        out = WindowText(start=ws[0].start, end=ws[0].start + len(ws[0].samples))
        out.speech_s = vad.speech_seconds(speech, out.start, out.end)
        for k, w in enumerate(ws):
            if self._skipped(w):
                continue
            out.heard = True
            segments = self._segments(w, timestamp_begin)
            if k + 1 < len(ws):  # decoded again from the next start on: this decode's text before it only
                cut = ws[k + 1].start
                segments = [s for s in segments if s.start_s * SAMPLE_RATE < cut - 1
                            and s.end_s * SAMPLE_RATE <= cut + SAMPLES_PER_TIMESTAMP]
            speech_s = vad.speech_seconds(speech, w.start, w.start + len(w.samples))
            if decoding_loop(w.result.text, w.result.compression_ratio, len(w.result.tokens), speech_s,
                             c.compression_ratio_threshold, self.sample_len):
                out.loop = True
                out.dropped += segments
                continue
            out.segments += [s for s in segments if s.text]
        return out

    def _redecode_by_chunks(self, clips: Sequence[ClipInput], groups: dict, judged: dict) -> None:
        """Decode again, one VAD speech chunk at a time, every window that looped or left words out."""
        c = self.config
        chunks: list[EncoderWindow] = []
        for key, text in judged.items():
            chars = sum(len(s.text) for s in text.segments)
            sparse = text.speech_s >= MIN_SPARSE_SPEECH_S and chars < MIN_CHARS_PER_SPEECH_S * text.speech_s
            if not (text.loop or (text.heard and sparse)):
                continue
            clip = clips[key[0]]
            speech = [(max(a, text.start), min(b, text.end)) for a, b in clip_speech(clip, c.vad_threshold)
                      if b > text.start and a < text.end]
            for a, b in _merge(speech, int(CHUNK_GAP_S * SAMPLE_RATE)):
                chunks.append(EncoderWindow(key[0], whisper_audio(clip)[a:b], decode=True, start=a, stats=False))
        if not chunks:
            return
        encode_windows(self.loaded, chunks, len(clips), c.batch_windows, on_batch=self._decode)
        for key, text in judged.items():
            mine = [w for w in chunks if w.clip == key[0] and text.start <= w.start < text.end]
            if not mine:
                continue
            redone = self._window_segments(clips[key[0]], mine[:1])
            for w in mine[1:]:
                more = self._window_segments(clips[key[0]], [w])
                redone.segments += more.segments
                redone.dropped += more.dropped
                redone.heard = redone.heard or more.heard
            if sum(len(s.text) for s in redone.segments) > sum(len(s.text) for s in text.segments):
                text.dropped += text.segments
                text.segments, text.loop = redone.segments, redone.loop and not redone.segments
                text.heard = text.heard or redone.heard

    def _judge(self, clip: ClipInput, texts: list["WindowText"], windows: list[EncoderWindow],
               diagnostics: dict[str, float]) -> ExtractorOutput:
        """Turn a clip's judged windows into its transcript or the reason it has none."""
        result: ASRResult = clip.shared.setdefault(RESULT_KEY, ASRResult())
        rs = [w.result for w in sorted(windows, key=lambda w: w.start) if w.result is not None]
        if not rs:
            return self._missing(clip, "asr-no-speech", diagnostics)
        diagnostics["asr_no_speech_prob"] = float(np.mean([r.no_speech_prob for r in rs]))
        diagnostics["asr_avg_logprob"] = float(np.mean([r.avg_logprob for r in rs]))
        diagnostics["asr_compression_ratio"] = float(max(r.compression_ratio for r in rs))
        clip.shared["asr_raw_text"] = " ".join(r.text.strip() for r in rs)
        result.language = rs[0].language
        result.segments = sorted((s for t in texts for s in t.segments), key=lambda s: s.start_s)
        result.dropped = [("decoding-loop" if t.loop else "replaced", s) for t in texts for s in t.dropped]
        if not any(t.heard for t in texts):
            return self._missing(clip, "asr-no-speech", diagnostics)
        if not result.segments and any(t.loop for t in texts):
            return self._missing(clip, "asr-hallucination", diagnostics)
        text = result.text
        if is_blank(text):
            return self._missing(clip, "asr-empty", diagnostics)
        clip.transcript, clip.text_reason = text, ""
        return ExtractorOutput(features=None, reason="", diagnostics=diagnostics, transcript=text)


@dataclass
class WindowText:
    """One window's transcript as judged: kept and dropped segments, whether it looped or was heard."""

    start: int
    end: int
    speech_s: float = 0.0
    heard: bool = False  # some decode of it passed Whisper's no-speech rule
    loop: bool = False  # a decode of it was a decoding loop
    segments: list[ASRSegment] = field(default_factory=list)
    dropped: list[ASRSegment] = field(default_factory=list)


def _merge(segments: Sequence[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Segments closer than `gap` samples joined; none longer than one window."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(segments):
        if out and a - out[-1][1] < gap and b - out[-1][0] <= WINDOW_SAMPLES:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, min(b, a + WINDOW_SAMPLES)))
    return out
