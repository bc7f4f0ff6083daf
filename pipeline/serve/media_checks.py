"""What an upload must pass before it reaches the models: FFmpeg can open it, it holds audio or video, and it
is not longer than the server accepts. Only headers and packets are read (PyAV), nothing is decoded."""

from __future__ import annotations

from pathlib import Path

import av

from pipeline.decode import DecodeError, choose_stream, probe
from pipeline.serve.uploads import UploadError


def demuxed_duration(path: str | Path, stop_after_s: float) -> float | None:
    """The end time of the last packet of the streams decode would use, read packet by packet without
    decoding (for files whose header states no duration, e.g. a browser's MediaRecorder WebM). Stops once
    past `stop_after_s`. None when no packet carries a time."""
    end: float | None = None
    with av.open(str(path), mode="r") as container:
        streams = [s for s in (choose_stream(container, "audio"), choose_stream(container, "video")) if s]
        if not streams:
            return None
        for packet in container.demux(streams):
            if packet.pts is None or packet.time_base is None:
                continue
            t = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            end = t if end is None else max(end, t)
            if end > stop_after_s:
                break
    return end


def check_clip(path: str | Path, filename: str, *, max_duration_s: float, limit_flag: str) -> dict:
    """The probe of an uploaded clip (pipeline.decode.probe), or UploadError: 415 when FFmpeg cannot read it
    or it holds neither audio nor video, 413 when it lasts longer than `max_duration_s`, 422 when its length
    cannot be told. `limit_flag` names the comp-serve option that sets the limit, for the message."""
    try:
        info = probe(path)
    except DecodeError as err:
        raise UploadError(415, f"{filename}: not a media file this server can read ({err})") from None
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as err:
        raise UploadError(415, f"{filename}: not a media file this server can read ({type(err).__name__}: "
                               f"{' '.join(str(err).split())})") from None
    if not info["has_audio"] and not info["has_video"]:
        raise UploadError(415, f"{filename}: holds no audio or video stream ({info['format']})")
    duration = info["duration_s"]
    stated = bool(duration)
    if not stated:  # packets are read only up to the limit, so past it the length is "more than the limit"
        try:
            duration = demuxed_duration(path, max_duration_s)
        except (av.FFmpegError, OSError, ValueError) as err:
            raise UploadError(415, f"{filename}: its packets cannot be read ({type(err).__name__}: {err})") from None
    if duration is None:
        raise UploadError(422, f"{filename}: cannot tell how long it lasts (no duration and no timed packets)")
    if duration > max_duration_s:
        length = f"lasts {duration:.1f} s" if stated else f"lasts more than {max_duration_s:g} s (timed by its packets)"
        raise UploadError(413, f"{filename} {length}; this server accepts up to {max_duration_s:g} s ({limit_flag})")
    info["duration_s"] = float(duration)
    return info
