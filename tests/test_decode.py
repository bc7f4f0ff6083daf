"""In-process decoding with PyAV: audio at 16 kHz, sampled frames, explicit reasons, clean errors."""

from __future__ import annotations

import numpy as np
import pytest

from extractors.base import SAMPLE_RATE
from pipeline.decode import DecodeConfig, DecodeError, decode_clip, probe, resample_audio, sample_times
from pipeline.media import corrupt_file, corrupt_packets, make_clip, truncate_file, write_clip

AAC_FRAME = 1024  # samples; AAC rounds the stream up to whole frames


@pytest.fixture(scope="module")
def av_clip(tmp_path_factory):
    """A 3 s clip with noise audio and a face, 10 fps."""
    return make_clip(tmp_path_factory.mktemp("decode") / "clip.mp4", audio="noise", duration_s=3.0)


def test_audio_length_matches_duration(av_clip):
    """Decoded audio is mono float32 at 16 kHz and as long as the clip (within one AAC frame)."""
    clip = decode_clip(av_clip, "clip")
    assert clip.audio.dtype == np.float32 and clip.audio.ndim == 1
    assert abs(len(clip.audio) - 3.0 * SAMPLE_RATE) <= AAC_FRAME
    assert clip.audio_reason == "" and clip.duration_s == pytest.approx(3.0, abs=0.1)


def test_frames_sampled_at_configured_rate(av_clip):
    """fps=2 over 3 s gives 6 RGB frames at the centres of equal spans."""
    clip = decode_clip(av_clip, "clip", DecodeConfig(fps=2.0))
    assert clip.frames.shape == (6, 120, 160, 3) and clip.frames.dtype == np.uint8
    assert clip.frames_reason == ""
    expected = (np.arange(6) + 0.5) * clip.duration_s / 6
    assert np.all(np.abs(clip.frame_times_s - expected) <= 0.1 + 1e-6)  # one 10-fps frame of slack
    assert np.all(clip.frame_times_s <= expected + 1e-6)  # the frame on screen at the target, never a later one


def test_sampled_frames_are_the_ones_on_screen(tmp_path):
    """Each sampled frame is the frame shown at its timestamp (frames carry their index as brightness)."""
    frames = [np.full((48, 64, 3), 10 * i, np.uint8) for i in range(20)]  # 2 s at 10 fps
    path = write_clip(tmp_path / "ramp.mp4", audio=None, frames=frames, fps=10)
    clip = decode_clip(path, "ramp", DecodeConfig(fps=2.0))
    index = np.round(clip.frames[:, 24, 32, 0] / 10.0)
    assert np.array_equal(index, np.round(clip.frame_times_s * 10))
    assert len(clip.frames) == 4


def test_max_frames_caps_a_long_clip(tmp_path):
    """A 35 s clip yields at most max_frames frames, spread over the whole clip."""
    path = make_clip(tmp_path / "long.mp4", audio="silent", duration_s=35.0, size=(64, 48), fps=5)
    clip = decode_clip(path, "long", DecodeConfig(fps=2.0, max_frames=32))
    assert len(clip.frames) == 32
    assert clip.frame_times_s[0] < 1.0 and clip.frame_times_s[-1] > 33.0
    assert np.all(np.diff(clip.frame_times_s) > 0)
    assert abs(len(clip.audio) - 35 * SAMPLE_RATE) <= AAC_FRAME


def test_large_frames_are_scaled_down(tmp_path):
    """Frames larger than max_side are scaled down with their aspect ratio kept."""
    path = make_clip(tmp_path / "big.mp4", audio=None, duration_s=1.0, size=(320, 240))
    clip = decode_clip(path, "big", DecodeConfig(max_side=160))
    assert clip.frames.shape[1:] == (120, 160, 3)


def test_no_audio_stream_is_a_reason(tmp_path):
    """A video without an audio stream gives audio=None with reason no-audio-stream."""
    clip = decode_clip(make_clip(tmp_path / "mute.mp4", audio=None, duration_s=1.0), "mute")
    assert clip.audio is None and clip.audio_reason == "no-audio-stream"
    assert clip.frames is not None and len(clip.frames) == 2


def test_audio_only_file_has_no_frames(tmp_path):
    """An audio-only wav gives frames=None with reason no-video-stream, and its full audio."""
    path = make_clip(tmp_path / "voice.wav", audio="noise", duration_s=1.5, video=False)
    clip = decode_clip(path, "voice")
    assert clip.frames is None and clip.frame_times_s is None and clip.frames_reason == "no-video-stream"
    assert len(clip.audio) == pytest.approx(1.5 * SAMPLE_RATE, abs=2)


def test_non_ascii_path_with_spaces(tmp_path):
    """Paths with spaces and non-ASCII characters decode."""
    folder = tmp_path / "dossier été"
    path = make_clip(folder / "clip ñ 音声.mp4", audio="noise", duration_s=1.0)
    clip = decode_clip(path, "x")
    assert clip.audio is not None and clip.frames is not None
    assert probe(path)["has_audio"]


@pytest.mark.parametrize("damage", ["zero-bytes", "garbage", "corrupt", "truncated", "text"])
def test_undecodable_file_raises_decode_error(tmp_path, damage):
    """Empty, random, corrupted, truncated and text files raise DecodeError with a short reason."""
    path = tmp_path / "bad.mp4"
    if damage == "zero-bytes":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif damage == "corrupt":
        make_clip(path, audio="noise", duration_s=1.0)
        corrupt_file(path)
    elif damage == "truncated":
        truncate_file(make_clip(path, audio="noise", duration_s=1.0))
    else:
        path = tmp_path / "notes.txt"
        path.write_text("not a video\n" * 50)
    with pytest.raises(DecodeError) as info:
        decode_clip(path, "bad")
    assert str(path) in str(info.value) and len(str(info.value)) < len(str(path)) + 120


def test_missing_file_raises_decode_error(tmp_path):
    """A path that does not exist raises DecodeError saying so."""
    with pytest.raises(DecodeError, match="no such file"):
        decode_clip(tmp_path / "nope.mp4", "nope")


def test_too_short_clip_gets_a_reason(tmp_path):
    """A clip shorter than min_duration_s keeps its streams out with a too-short reason."""
    path = make_clip(tmp_path / "short.mp4", audio="noise", duration_s=0.5)
    clip = decode_clip(path, "short", DecodeConfig(min_duration_s=1.0))
    assert clip.audio is None and clip.frames is None
    assert clip.audio_reason.startswith("too-short") and clip.frames_reason.startswith("too-short")


def test_probe_reports_streams_and_codecs(av_clip):
    """probe lists duration, streams and codecs without decoding."""
    info = probe(av_clip)
    assert info["has_audio"] and info["has_video"]
    assert info["codecs"] == {"audio": "aac", "video": "h264"}
    assert info["duration_s"] == pytest.approx(3.0, abs=0.1)


def test_sample_times_bounds():
    """At least one frame for a very short clip; never more than max_frames."""
    cfg = DecodeConfig(fps=2.0, max_frames=8)
    assert len(sample_times(0.2, cfg)) == 1
    assert len(sample_times(100.0, cfg)) == 8


def test_resample_keeps_pitch_and_length():
    """Resampling a 440 Hz tone from 44.1 kHz to 16 kHz keeps its frequency and duration."""
    t = np.arange(44_100) / 44_100
    out = resample_audio(np.sin(2 * np.pi * 440 * t).astype(np.float32), 44_100)
    assert abs(len(out) - SAMPLE_RATE) <= 32
    peak = np.argmax(np.abs(np.fft.rfft(out))) * SAMPLE_RATE / len(out)
    assert peak == pytest.approx(440, abs=2)


def test_config_rejects_other_sample_rates():
    """The sample rate is fixed by the extractor contract."""
    with pytest.raises(ValueError, match="16000"):
        DecodeConfig(sample_rate=22_050)


def test_audio_failing_mid_way_is_a_reason_not_an_error(tmp_path):
    """Garbage in the middle of the AAC stream drops the audio with a decode-error reason; frames survive."""
    path = corrupt_packets(make_clip(tmp_path / "bad audio.mp4", audio="noise", duration_s=3.0), "audio")
    clip = decode_clip(path, "bad-audio")
    assert clip.audio is None and clip.audio_reason.startswith("decode-error: ")
    assert clip.frames is not None and clip.frames_reason == ""


def test_video_shorter_than_audio_is_not_padded_with_copies(tmp_path):
    """When the video stream ends 2 s before the audio, no frames are invented for the missing part."""
    frames = [np.full((48, 64, 3), 100, np.uint8)] * 10  # 1 s of video
    audio = np.zeros(3 * SAMPLE_RATE, np.float32)  # 3 s of audio
    path = write_clip(tmp_path / "short video.mp4", audio=audio, frames=frames, fps=10, duration_s=3.0)
    clip = decode_clip(path, "sv", DecodeConfig(fps=2.0))
    assert clip.frames is not None and len(clip.frames) == 2
    assert np.all(clip.frame_times_s <= 1.0)
