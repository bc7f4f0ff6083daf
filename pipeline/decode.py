"""Decode a media file in-process with PyAV: mono 16 kHz audio and a few RGB frames sampled over time.

No ffmpeg binary and no torchaudio: PyAV's wheel carries the FFmpeg libraries. Audio and video are read in two
passes over the file so that the video pass can seek past long stretches it does not sample while the audio
pass still sees every packet. Only sampled frames are converted to RGB (and scaled by swscale on the way);
the rest are decoded and dropped.

What a player would show and play is what the extractors get (the rules are versioned by RULES_VERSION, which
is part of the extraction spec):

- streams: of several audio or video streams, attached pictures and thumbnails (FFmpeg's `attached_pic` /
  `timed_thumbnails` dispositions, or a video stream of a single frame) and audio meant for other audiences
  (`comment`, `visual_impaired`, `descriptions`) are passed over unless nothing else is there; of the rest,
  the one with the `default` disposition, else FFmpeg's best stream (`av_find_best_stream`), else the first;
- orientation: the display matrix a frame carries (phone videos store frames sideways and say how to turn
  them) is applied to the sampled frames, rotations and mirrorings alike;
- stills: a frame stays on screen until the next one or the end of the clip, so a video stream of one frame
  (or a slideshow) gives a frame for every sampled time;
- channels: see `mix_channels` (a phase-inverted channel must not cancel the voice).

What cannot be decoded is reported, not raised, per modality: a missing stream gives `no-audio-stream` /
`no-video-stream`, a stream that fails gives `decode-error: <FFmpeg text>`. A file that cannot be opened at
all, or where no stream decodes, raises `DecodeError` (its message does not repeat the path; callers name it).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from core.clip import SAMPLE_RATE, ClipInput
from core.errors import CompError

log = logging.getLogger(__name__)

RULES_VERSION = 2  # bump when a rule above changes what a clip decodes to (part of the extraction spec)
NOT_MEDIA_FORMATS = frozenset({"tty"})  # FFmpeg demuxers that accept plain text files as "video"
SEEK_GAP_S = 4.0  # seconds; seek instead of decoding through when the next sample is further ahead than this
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"  # what a Git LFS clone leaves without `lfs pull`
LFS_POINTER_MAX_BYTES = 1024  # pointer files are ~130 bytes
PICTURE_DISPOSITIONS = ("attached_pic", "timed_thumbnails")  # FFmpeg's flags for cover art and thumbnails
SIDE_AUDIO_DISPOSITIONS = ("comment", "visual_impaired", "descriptions")  # commentary, audio description
FRAME_S = 0.03  # seconds per analysis frame of the channel mix
SILENT_PEAK = 1.0 / 32768  # one step of 16-bit PCM: a channel that never exceeds it holds nothing
STEADY_SPREAD_DB = 6.0  # a channel whose frame levels spread less than this holds a steady sound only ...
MODULATED_SPREAD_DB = 15.0  # ... and is left out of the mix when another channel's spread exceeds this
ANTI_PHASE = -0.2  # a channel correlated below this with the reference channel is inverted before mixing


class DecodeError(CompError, RuntimeError):
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


def lfs_pointer(path: Path) -> bool:
    """True when `path` is a Git LFS pointer file (the media was never fetched: `git lfs pull`)."""
    try:
        if path.stat().st_size > LFS_POINTER_MAX_BYTES:
            return False
        with open(path, "rb") as fh:
            return fh.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX
    except OSError:
        return False


def unreadable_reason(path: Path) -> str:
    """Why `path` cannot be media before FFmpeg is asked ("" when it may be): missing, a dangling link, ..."""
    if path.is_symlink() and not path.exists():
        return ("a link to content that is not here (a git-annex/DataLad dataset without its data: "
                "`datalad get` or `git annex get` fetches it)")
    if not path.exists():
        return "no such file"
    if path.is_dir():
        return "is a directory, not a media file"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    if lfs_pointer(path):
        return "a Git LFS pointer, not the media itself (the dataset was cloned without its LFS files: `git lfs pull`)"
    return ""


def _open(path: Path) -> av.container.InputContainer:
    reason = unreadable_reason(path)
    if reason:
        raise DecodeError(reason)
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, UnicodeDecodeError, OSError) as err:
        raise DecodeError(f"cannot open: {_ffmpeg_text(err)}") from err
    fmt = container.format.name
    if fmt in NOT_MEDIA_FORMATS:
        container.close()
        raise DecodeError(f"not a media file (FFmpeg reads it as {fmt!r} text)")
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


# ------------------------------------------------------------------------------------ stream choice

def _flagged(stream: av.stream.Stream, names: tuple[str, ...]) -> bool:
    disposition = stream.disposition
    return any(disposition & getattr(av.stream.Disposition, n) for n in names)


def is_picture(stream: av.stream.Stream) -> bool:
    """A video stream that is cover art or a thumbnail, not footage: FFmpeg flags it, or it holds one frame."""
    return _flagged(stream, PICTURE_DISPOSITIONS) or stream.frames == 1


def choose_stream(container: av.container.InputContainer, kind: str) -> av.stream.Stream | None:
    """The audio or video stream a player would use (see the module doc); None when there is none.

    Video streams that are only pictures are never chosen (a file with nothing else has no video).
    """
    streams = list(container.streams.audio if kind == "audio" else container.streams.video)
    if kind == "video":
        candidates = [s for s in streams if not is_picture(s)]
    else:
        candidates = [s for s in streams if not _flagged(s, SIDE_AUDIO_DISPOSITIONS)] or streams
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    defaults = [s for s in candidates if s.disposition & av.stream.Disposition.default]
    if len(defaults) == 1:
        return defaults[0]
    pool = defaults or candidates
    try:
        best = container.streams.best(kind)
    except (av.FFmpegError, ValueError):
        best = None
    return best if best is not None and any(best.index == s.index for s in pool) else pool[0]


def _picture_only(container: av.container.InputContainer) -> bool:
    return bool(container.streams.video) and all(is_picture(s) for s in container.streams.video)


def probe(path: str | Path) -> dict[str, Any]:
    """Streams and duration of a media file without decoding it (the streams `decode_clip` would use)."""
    path = Path(path)
    with _open(path) as container:
        audio = choose_stream(container, "audio")
        video = choose_stream(container, "video")
        info: dict[str, Any] = {
            "duration_s": _duration(container),
            "format": container.format.name,
            "has_audio": audio is not None,
            "has_video": video is not None,
            "streams": {"audio": len(container.streams.audio), "video": len(container.streams.video)},
            "codecs": {},
        }
        if audio is not None:
            info["audio_stream"] = audio.index
            info["codecs"]["audio"] = audio.codec_context.name
            info["sample_rate"] = audio.codec_context.sample_rate
            info["channels"] = audio.codec_context.channels
        if video is not None:
            info["video_stream"] = video.index
            info["codecs"]["video"] = video.codec_context.name
            info["width"], info["height"] = video.codec_context.width, video.codec_context.height
            rate = video.average_rate or video.guessed_rate
            info["fps"] = float(rate) if rate else None
        return info


# ------------------------------------------------------------------------------------------- audio

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


def _frame_levels_db(x: np.ndarray) -> np.ndarray:
    """Level in dB of each FRAME_S frame of every channel: [C, n_frames] (at least one frame)."""
    size = int(FRAME_S * SAMPLE_RATE)
    n = max(1, x.shape[1] // size)
    frames = np.zeros((x.shape[0], n * size), np.float64)
    frames[:, : min(x.shape[1], n * size)] = x[:, : n * size]
    power = np.mean(frames.reshape(x.shape[0], n, size) ** 2, axis=2)
    return 10.0 * np.log10(power + 1e-20)


def mix_channels(x: np.ndarray, names: tuple[str, ...] = ()) -> np.ndarray:
    """Channels [C, n] float32 -> mono [n]: the mean of the channels that carry sound, polarity-aligned.

    A plain mean (FFmpeg's downmix) cancels a voice recorded in anti-phase (R = -L, a miswired microphone)
    and halves one that is on a single channel. Here:

    - channels that hold nothing (never above one 16-bit step) and LFE are left out;
    - a channel whose level stays steady (frame levels spread < STEADY_SPREAD_DB between their 10th and 95th
      percentiles: hiss, hum, an unplugged input) is left out when another channel is modulated (spread >
      MODULATED_SPREAD_DB, as speech with its pauses is);
    - each remaining channel is inverted when it is anti-correlated with the most modulated one.

    The spread is a channel's own dynamic range, so the decision does not depend on the recording's level.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1 or x.shape[0] == 1:
        return np.ascontiguousarray(x.reshape(-1))
    keep = [c for c in range(x.shape[0])
            if float(np.max(np.abs(x[c]), initial=0.0)) > SILENT_PEAK
            and not (c < len(names) and names[c] == "LFE")]
    if not keep:
        return np.ascontiguousarray(x.mean(axis=0))
    levels = _frame_levels_db(x[keep])
    spread = np.percentile(levels, 95, axis=1) - np.percentile(levels, 10, axis=1)
    if spread.max() > MODULATED_SPREAD_DB:
        kept = [(c, s) for c, s in zip(keep, spread) if s >= STEADY_SPREAD_DB]
        keep = [c for c, _ in kept]
        spread = np.array([s for _, s in kept])
    reference = x[keep[int(np.argmax(spread))]].astype(np.float64)
    mono = np.zeros(x.shape[1], np.float64)
    for c in keep:
        channel = x[c].astype(np.float64)
        denominator = math.sqrt(float(np.dot(channel, channel)) * float(np.dot(reference, reference)))
        correlation = float(np.dot(channel, reference)) / denominator if denominator > 0 else 0.0
        mono += -channel if correlation < ANTI_PHASE else channel
    return (mono / len(keep)).astype(np.float32)


def decode_audio(path: Path, stream_index: int | None = None, start_s: float | None = None,
                 end_s: float | None = None) -> np.ndarray:
    """The audio of one stream (default: `choose_stream`'s) as mono float32 at 16 kHz, mixed by `mix_channels`.

    `start_s`/`end_s` (seconds from the stream's start, None = the beginning/end) keep only that stretch: the
    decoder seeks to the packet before `start_s` instead of reading what comes before, and stops after
    `end_s`. Raises av.FFmpegError on failure.
    """
    chunks: list[np.ndarray] = []
    first_s: float | None = None  # stream time of the first sample kept before trimming
    with av.open(str(path), mode="r") as container:
        stream = container.streams[stream_index] if stream_index is not None else choose_stream(container, "audio")
        if stream is None:
            raise av.error.StreamNotFoundError(0, "no audio stream")
        stream.thread_type = "AUTO"
        origin = _seconds(stream.start_time, stream.time_base) or 0.0
        timed = start_s is not None and start_s > 0 and _seek(container, stream, origin + start_s, path)
        # FFmpeg's resampler keeps the channels (planar float); they are mixed here, not averaged by FFmpeg
        resampler = av.AudioResampler(format="fltp", rate=SAMPLE_RATE)
        names: tuple[str, ...] = ()
        for frame in container.decode(stream):
            t = frame.time - origin if frame.time is not None else None
            if timed and t is None:  # no timestamps to trim by: decode it all and count samples instead
                return decode_audio(path, stream.index, None, None)[_sample_range(start_s, end_s)]
            if end_s is not None and t is not None and t >= end_s:
                break
            if first_s is None:
                first_s = t if timed and t is not None else 0.0
            frame.pts = None  # let the resampler count samples itself; broken pts must not stall it
            names = names or tuple(ch.name for ch in frame.layout.channels)
            chunks.extend(f.to_ndarray() for f in resampler.resample(frame))
        chunks.extend(f.to_ndarray() for f in resampler.resample(None))
    if not chunks:
        return np.zeros(0, np.float32)
    width = min(c.shape[0] for c in chunks)  # a layout change mid-stream keeps the channels all frames have
    audio = mix_channels(np.concatenate([c[:width] for c in chunks], axis=1), names)
    if start_s is None and end_s is None:
        return audio
    offset = round(((start_s or 0.0) - (first_s or 0.0)) * SAMPLE_RATE)  # samples decoded before start_s
    length = None if end_s is None else round((end_s - (start_s or 0.0)) * SAMPLE_RATE)
    return np.ascontiguousarray(audio[max(0, offset):][:length])


def _sample_range(start_s: float | None, end_s: float | None) -> slice:
    return slice(round((start_s or 0.0) * SAMPLE_RATE), None if end_s is None else round(end_s * SAMPLE_RATE))


def _seek(container: av.container.InputContainer, stream: av.stream.Stream, t: float, path: Path) -> bool:
    """Seek `stream` to the key frame or packet at or before stream time `t` (seconds); False when it cannot."""
    if stream.time_base is None:
        return False
    try:
        container.seek(int(t / stream.time_base), stream=stream, backward=True)
        return True
    except av.FFmpegError as err:
        log.debug("%s: seek failed (%s); decoding from the start", path, _ffmpeg_text(err))
        return False


# ------------------------------------------------------------------------------------------- video

def sample_times(duration_s: float, cfg: DecodeConfig) -> np.ndarray:
    """Target times: `fps` per second, at least 1, at most `max_frames`, at the centres of equal spans."""
    n = max(1, min(cfg.max_frames, math.floor(duration_s * cfg.fps + 1e-6)))
    return (np.arange(n) + 0.5) * (duration_s / n)


def _scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def display_matrix(frame: av.VideoFrame) -> tuple[int, int, int, int] | None:
    """The orientation part (a, b, c, d) of the frame's display matrix as signs -1/0/1, or None when absent.

    FFmpeg's display matrix maps a stored pixel (x, y) (y downwards) to its displayed place
    x' = a*x + c*y, y' = b*x + d*y (libavutil/display.h). A matrix that is not a quarter turn (with or
    without a mirror) is snapped to the nearest one.
    """
    for data in frame.side_data:
        if data.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
            m = np.frombuffer(bytes(data), "<i4").astype(np.float64) / 65536.0
            a, b, c, d = m[0], m[1], m[3], m[4]
            if abs(a) + abs(d) >= abs(b) + abs(c):  # no axis swap
                return int(np.sign(a)) or 1, 0, 0, int(np.sign(d)) or 1
            return 0, int(np.sign(b)) or 1, int(np.sign(c)) or 1, 0
    return None


def orient(image: np.ndarray, matrix: tuple[int, int, int, int] | None) -> np.ndarray:
    """`image` [H, W, 3] as displayed under `display_matrix`'s (a, b, c, d): rotated and/or mirrored."""
    if matrix is None or matrix == (1, 0, 0, 1):
        return image
    a, b, c, d = matrix
    if a == 0:  # x' = c*y, y' = b*x: rows become columns
        out = image.transpose(1, 0, 2)
        if b < 0:
            out = out[::-1]
        if c < 0:
            out = out[:, ::-1]
    else:
        out = image
        if a < 0:
            out = out[:, ::-1]
        if d < 0:
            out = out[::-1]
    return np.ascontiguousarray(out)


Crop = tuple[float, float, float, float]  # (x0, y0, x1, y1): a part of the displayed frame, as fractions


def crop_image(image: np.ndarray, crop: Crop | None) -> np.ndarray:
    """The part `crop` of `image` [H, W, 3] (fractions of the width and height, of the frame as displayed)."""
    if crop is None:
        return image
    h, w = image.shape[:2]
    x0, y0, x1, y1 = crop
    rows = slice(round(y0 * h), max(round(y0 * h) + 1, round(y1 * h)))
    cols = slice(round(x0 * w), max(round(x0 * w) + 1, round(x1 * w)))
    return np.ascontiguousarray(image[rows, cols])


def decode_frames(path: Path, targets: np.ndarray, max_side: int, stream_index: int | None = None,
                  crop: Crop | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each target time, the frame on screen then: the last one shown at or before it.

    A frame stays on screen until the next one, and the last one until the end of the clip (a still picture
    or a video stream shorter than the audio keeps showing its last frame, as players do); targets before the
    first frame get the first. Frames are turned as their display matrix says, then cut to `crop`, whose
    longest side is at most `max_side` pixels. Returns uint8 RGB [T, H, W, 3] and the times the frames
    appeared [T] (seconds from the stream start). Raises av.FFmpegError on failure.
    """
    frames: list[np.ndarray] = []
    times: list[float] = []
    with av.open(str(path), mode="r") as container:
        stream = container.streams[stream_index] if stream_index is not None else choose_stream(container, "video")
        if stream is None:
            raise av.error.StreamNotFoundError(0, "no video stream")
        stream.thread_type = "AUTO"
        start = _seconds(stream.start_time, stream.time_base) or 0.0
        width, height = stream.codec_context.width, stream.codec_context.height
        part = max(crop[2] - crop[0], crop[3] - crop[1]) if crop is not None else 1.0
        # the crop's longest side within max_side, whichever way the display matrix turns the frame
        size = _scaled_size(width, height, max(16, round(max_side / part)))

        def take(frame: av.VideoFrame, t: float) -> None:
            rgb = frame.reformat(width=size[0], height=size[1], format="rgb24")
            frames.append(crop_image(orient(rgb.to_ndarray(), display_matrix(frame)), crop))
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
                # End of stream: the last frame stays on screen to the end of the clip.
                if previous is not None:
                    while k < len(targets):
                        take(*previous)
                        k += 1
                break
    if not frames:
        return np.zeros((0, size[1], size[0], 3), np.uint8), np.zeros(0, np.float32)
    return np.stack(frames), np.asarray(times, dtype=np.float32)


# -------------------------------------------------------------------------------------------- clips

def decode_clip(path: str | Path, clip_id: str, cfg: DecodeConfig | None = None, *,
                start_s: float | None = None, end_s: float | None = None, audio_path: str | Path | None = None,
                crop: Crop | None = None) -> ClipInput:
    """Decode one clip into the extractors' input; per-modality failures become reasons, see module doc.

    A segment: `start_s`/`end_s` (seconds from the start of `path`; None = its start/end) make the clip that
    stretch of the file, decoded by seeking. `audio_path`: the clip's audio comes from that file instead
    (taken whole: a separate recording of this clip). `crop`: the part of the frame the extractors see.
    Raises DecodeError when nothing can be decoded (or the segment lies outside the media).
    """
    cfg = cfg or DecodeConfig()
    path = Path(path)
    segment = start_s is not None or end_s is not None
    with _open(path) as container:
        audio_stream = choose_stream(container, "audio")
        video_stream = choose_stream(container, "video")
        audio_index = audio_stream.index if audio_stream is not None else None
        video_index = video_stream.index if video_stream is not None else None
        picture_only = _picture_only(container)
        duration = _duration(container)
    audio_file = path
    if audio_path is not None:
        audio_file = Path(audio_path)
        try:
            with _open(audio_file) as container:
                stream = choose_stream(container, "audio")
                audio_index = stream.index if stream is not None else None
        except DecodeError as err:  # the clip's own audio file cannot be read: the clip fails, saying which file
            raise DecodeError(f"audio file {audio_file}: {err}") from err
    if audio_index is None and video_index is None:
        raise DecodeError("only a still picture, no audio or video to extract" if picture_only
                          else "no audio or video stream")
    if segment:
        start_s = max(0.0, start_s or 0.0)
        if duration is not None and start_s >= duration:
            raise DecodeError(f"the segment starts at {start_s:.2f} s, after the end of the media ({duration:.2f} s)")
        if end_s is not None and duration is not None and end_s > duration + 0.5:
            log.warning("%s: the segment ends at %.2f s, after the end of the media (%.2f s); cut there",
                        path, end_s, duration)
        end_s = min(end_s, duration) if end_s is not None and duration is not None else end_s
    own_audio = audio_path is None

    audio: np.ndarray | None = None
    audio_reason = "no-audio-stream"
    if audio_index is not None:
        try:
            audio = decode_audio(audio_file, audio_index, *((start_s, end_s) if own_audio else (None, None)))
            audio_reason = ""
            if audio.size == 0:
                audio, audio_reason = None, "decode-error: the audio stream has no decodable samples"
        except av.FFmpegError as err:
            audio, audio_reason = None, f"decode-error: {_ffmpeg_text(err)}"
            log.warning("%s: audio decode failed: %s", audio_file, audio_reason)
    if segment:
        end = end_s if end_s is not None else duration
        if end is None and audio is not None and own_audio:
            end = start_s + audio.size / SAMPLE_RATE
        duration = (end - start_s) if end is not None else None
    if duration is None or duration <= 0:
        duration = audio.size / SAMPLE_RATE if audio is not None else 0.0

    frames: np.ndarray | None = None
    frame_times: np.ndarray | None = None
    frames_reason = "no-video-stream: only a still picture (cover art or thumbnail)" if picture_only \
        else "no-video-stream"
    if video_index is not None:
        offset = start_s if segment else 0.0
        try:
            frames, frame_times = decode_frames(path, sample_times(duration, cfg) + offset, cfg.max_side,
                                                video_index, crop)
            frame_times = frame_times - np.float32(offset)
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
        raise DecodeError(f"nothing decodes ({reasons})")

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
