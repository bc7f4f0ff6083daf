"""Decode a media file in-process with PyAV: mono 16 kHz audio and a few RGB frames sampled over time.

No ffmpeg binary and no torchaudio: PyAV's wheel carries the FFmpeg libraries. Audio and video are read in two
passes over the file so that the video pass can seek past long stretches it does not sample while the audio
pass still sees every packet. Only sampled frames are converted to RGB (and scaled by swscale on the way);
the rest are decoded and dropped.

What cannot be decoded is reported, not raised, per modality: a missing stream gives `no-audio-stream` /
`no-video-stream`, a stream that fails gives `decode-error: <FFmpeg text>`. A file that cannot be opened at
all, or where no stream decodes, raises `DecodeError`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from extractors.base import SAMPLE_RATE, ClipInput

log = logging.getLogger(__name__)

NOT_MEDIA_FORMATS = frozenset({"tty"})  # FFmpeg demuxers that accept plain text files as "video"
SEEK_GAP_S = 4.0  # seconds; seek instead of decoding through when the next sample is further ahead than this


class DecodeError(RuntimeError):
    """The file cannot be decoded at all (missing, empty, truncated, corrupt, not media)."""


@dataclass(frozen=True)
class DecodeConfig:
    """How a clip is turned into arrays. Changing any field changes the features (it is part of the spec)."""

    fps: float = 2.0  # frames sampled per second of video
    max_frames: int = 32  # at most this many frames per clip, spread uniformly over long clips
    max_side: int = 640  # pixels; larger frames are scaled down (aspect kept) before they reach detectors
    sample_rate: int = SAMPLE_RATE  # Hz; fixed by the extractor contract
    min_duration_s: float = 0.0  # clips shorter than this get no frames and no audio ("too-short: ...")

    def __post_init__(self) -> None:
        if self.fps <= 0:
            raise ValueError("decode.fps must be > 0")
        if self.max_frames < 1:
            raise ValueError("decode.max_frames must be >= 1")
        if self.max_side < 16:
            raise ValueError("decode.max_side must be >= 16 pixels")
        if self.sample_rate != SAMPLE_RATE:
            raise ValueError(f"decode.sample_rate is fixed at {SAMPLE_RATE} Hz by the extractor contract")
        if self.min_duration_s < 0:
            raise ValueError("decode.min_duration_s must be >= 0")


def _ffmpeg_text(err: BaseException) -> str:
    """FFmpeg's own message without PyAV's errno/filename decoration, on one line."""
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(str(text).split())


def _open(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise DecodeError(f"{path}: no such file")
    if path.is_dir():
        raise DecodeError(f"{path}: is a directory, not a media file")
    if path.stat().st_size == 0:
        raise DecodeError(f"{path}: empty file (0 bytes)")
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, UnicodeDecodeError, OSError) as err:
        raise DecodeError(f"{path}: cannot open: {_ffmpeg_text(err)}") from err
    fmt = container.format.name
    if fmt in NOT_MEDIA_FORMATS:
        container.close()
        raise DecodeError(f"{path}: not a media file (FFmpeg reads it as {fmt!r} text)")
    return container


def _seconds(value: int | None, time_base: Any) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def _duration(container: av.container.InputContainer) -> float | None:
    """Container duration, else the longest stream duration; None when the file does not say."""
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    spans = [_seconds(s.duration, s.time_base) for s in container.streams if s.duration]
    spans = [s for s in spans if s]
    return max(spans) if spans else None


def probe(path: str | Path) -> dict[str, Any]:
    """Streams and duration of a media file without decoding it."""
    path = Path(path)
    with _open(path) as container:
        audio = container.streams.audio[0] if container.streams.audio else None
        video = container.streams.video[0] if container.streams.video else None
        info: dict[str, Any] = {
            "duration_s": _duration(container),
            "format": container.format.name,
            "has_audio": audio is not None,
            "has_video": video is not None,
            "codecs": {},
        }
        if audio is not None:
            info["codecs"]["audio"] = audio.codec_context.name
            info["sample_rate"] = audio.codec_context.sample_rate
            info["channels"] = audio.codec_context.channels
        if video is not None:
            info["codecs"]["video"] = video.codec_context.name
            info["width"], info["height"] = video.codec_context.width, video.codec_context.height
            rate = video.average_rate or video.guessed_rate
            info["fps"] = float(rate) if rate else None
        return info


def resample_audio(samples: np.ndarray, sample_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 `samples` at `sample_rate` -> mono float32 at `target_rate`, with FFmpeg's resampler."""
    samples = np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1)
    if sample_rate == target_rate:
        return samples[0].copy()
    frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
    frame.sample_rate = sample_rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target_rate)
    out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def decode_audio(path: Path) -> np.ndarray:
    """All audio of the first audio stream as mono float32 at 16 kHz. Raises av.FFmpegError on failure."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    with av.open(str(path), mode="r") as container:
        stream = container.streams.audio[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            frame.pts = None  # let the resampler count samples itself; broken pts must not stall it
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
        chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    return np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)


def sample_times(duration_s: float, cfg: DecodeConfig) -> np.ndarray:
    """Target times: `fps` per second, at least 1, at most `max_frames`, at the centres of equal spans."""
    n = max(1, min(cfg.max_frames, math.floor(duration_s * cfg.fps + 1e-6)))
    return (np.arange(n) + 0.5) * (duration_s / n)


def _scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_frames(path: Path, targets: np.ndarray, max_side: int) -> tuple[np.ndarray, np.ndarray]:
    """For each target time, the last frame shown at or before it (the first frame for early targets).

    Returns uint8 RGB [T, H, W, 3] and their times [T] (seconds from the stream start). Targets after the
    last frame has left the screen get nothing, so a video stream shorter than the clip gives fewer frames
    rather than copies of its last one. Raises av.FFmpegError on failure.
    """
    frames: list[np.ndarray] = []
    times: list[float] = []
    with av.open(str(path), mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start = _seconds(stream.start_time, stream.time_base) or 0.0
        size = _scaled_size(stream.codec_context.width, stream.codec_context.height, max_side)
        rate = stream.average_rate or stream.guessed_rate
        period = 1.0 / float(rate) if rate else 0.5  # seconds a frame stays on screen when it does not say

        def take(frame: av.VideoFrame, t: float) -> None:
            rgb = frame.reformat(width=size[0], height=size[1], format="rgb24")
            frames.append(rgb.to_ndarray())
            times.append(t)

        k = 0
        previous: tuple[av.VideoFrame, float] | None = None
        position = 0.0  # time of the last decoded frame
        seeked_for = -1  # index of the target the last seek aimed at; never seek twice for one target
        while k < len(targets):
            if targets[k] - position > SEEK_GAP_S and seeked_for != k and stream.time_base is not None:
                seeked_for = k
                try:  # jump to the key frame before the target; decoding continues from there
                    container.seek(int((targets[k] + start) / stream.time_base), stream=stream, backward=True)
                    previous = None
                except av.FFmpegError as err:
                    log.debug("%s: seek failed (%s); decoding through", path, _ffmpeg_text(err))
            for frame in container.decode(stream):
                t = (frame.time if frame.time is not None else position) - start
                position = t
                while k < len(targets) and t > targets[k]:
                    # This frame comes after target k: the previous one was on screen at target k.
                    take(*(previous if previous is not None else (frame, t)))
                    k += 1
                previous = (frame, t)
                if k >= len(targets) or (targets[k] - t > SEEK_GAP_S and seeked_for != k):
                    break
            else:
                # End of stream: the last frame covers the targets that fall while it is still shown.
                if previous is not None:
                    last, t_last = previous
                    shown = _seconds(last.duration, last.time_base) or period
                    while k < len(targets) and targets[k] <= t_last + shown + 1e-6:
                        take(last, t_last)
                        k += 1
                break
    if not frames:
        return np.zeros((0, size[1], size[0], 3), np.uint8), np.zeros(0, np.float32)
    return np.stack(frames), np.asarray(times, dtype=np.float32)


def decode_clip(path: str | Path, clip_id: str, cfg: DecodeConfig | None = None) -> ClipInput:
    """Decode one clip into the extractors' input; per-modality failures become reasons, see module doc."""
    cfg = cfg or DecodeConfig()
    path = Path(path)
    with _open(path) as container:
        has_audio = bool(container.streams.audio)
        has_video = bool(container.streams.video)
        duration = _duration(container)
    if not has_audio and not has_video:
        raise DecodeError(f"{path}: no audio or video stream")

    audio: np.ndarray | None = None
    audio_reason = "no-audio-stream"
    if has_audio:
        try:
            audio = decode_audio(path)
            audio_reason = ""
            if audio.size == 0:
                audio, audio_reason = None, "decode-error: the audio stream has no decodable samples"
        except av.FFmpegError as err:
            audio, audio_reason = None, f"decode-error: {_ffmpeg_text(err)}"
            log.warning("%s: audio decode failed: %s", path, audio_reason)
    if duration is None or duration <= 0:
        duration = audio.size / SAMPLE_RATE if audio is not None else 0.0

    frames: np.ndarray | None = None
    frame_times: np.ndarray | None = None
    frames_reason = "no-video-stream"
    if has_video:
        try:
            frames, frame_times = decode_frames(path, sample_times(duration, cfg), cfg.max_side)
            frames_reason = ""
            if len(frames) == 0:
                frames, frame_times = None, None
                frames_reason = "decode-error: the video stream has no decodable frames"
        except av.FFmpegError as err:
            frames, frame_times, frames_reason = None, None, f"decode-error: {_ffmpeg_text(err)}"
            log.warning("%s: video decode failed: %s", path, frames_reason)

    if audio is None and frames is None and (audio_reason.startswith("decode-error") or
                                             frames_reason.startswith("decode-error")):
        reasons = "; ".join(r for r in (audio_reason, frames_reason) if r.startswith("decode-error"))
        raise DecodeError(f"{path}: nothing decodes ({reasons})")

    if duration < cfg.min_duration_s:
        reason = f"too-short: {duration:.2f}s < {cfg.min_duration_s:g}s"
        audio, frames, frame_times = None, None, None
        audio_reason = audio_reason or reason
        frames_reason = frames_reason or reason

    return ClipInput(
        clip_id=clip_id,
        audio=audio,
        audio_reason=audio_reason,
        frames=frames,
        frames_reason=frames_reason,
        duration_s=float(duration),
        frame_times_s=frame_times,
    )
