"""In-process decoding with PyAV: audio at 16 kHz, sampled frames, explicit reasons, clean errors."""

from __future__ import annotations

import numpy as np
import pytest

from core.clip import SAMPLE_RATE
from demo.media import (
    AudioTrack,
    VideoTrack,
    corrupt_file,
    corrupt_packets,
    face_image,
    lfs_pointer,
    make_clip,
    truncate_file,
    write_clip,
    write_tracks,
)
from pipeline.decode import DecodeConfig, DecodeError, decode_clip, probe, resample_audio, sample_times

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
    """Empty, random, corrupted, truncated and text files raise DecodeError with a short reason (the caller
    names the file, so the reason does not repeat the path)."""
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
    assert str(path) not in str(info.value) and 0 < len(str(info.value)) < 120


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


def test_video_shorter_than_audio_keeps_its_last_frame_on_screen(tmp_path):
    """When the video stream ends 2 s before the audio, its last frame stays on screen (as players show it)."""
    frames = [np.full((48, 64, 3), 20 * i, np.uint8) for i in range(10)]  # 1 s of video, brightness = index
    audio = np.zeros(3 * SAMPLE_RATE, np.float32)  # 3 s of audio
    path = write_clip(tmp_path / "short video.mp4", audio=audio, frames=frames, fps=10, duration_s=3.0)
    clip = decode_clip(path, "sv", DecodeConfig(fps=2.0))
    assert clip.frames is not None and len(clip.frames) == 6
    index = np.round(clip.frames[:, 24, 32, 0] / 20.0)
    assert list(index) == [2, 7, 9, 9, 9, 9]  # 0.25 s, 0.75 s, then the last frame (0.9 s) to the end


# ------------------------------------------------------------------------------ what a player shows

def _marker(height: int = 48, width: int = 80) -> np.ndarray:
    """An image that differs under every turn and mirror: a bright top-left block, a mid top-right one."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 3] = 250
    image[: height // 4, -width // 4:] = 120
    return image


@pytest.mark.parametrize("rotation,hflip,vflip", [(90, False, False), (-90, False, False), (180, False, False),
                                                  (0, True, False), (0, False, True), (90, True, False),
                                                  (90, False, True), (-90, True, False)])
def test_display_matrix_turns_frames_as_a_player_shows_them(tmp_path, rotation, hflip, vflip):
    """Frames stored sideways or mirrored with a display matrix reach the detectors as a player shows them."""
    upright = _marker()
    path = write_tracks(tmp_path / "phone.mp4",
                        video=[VideoTrack(upright, rotation=rotation, hflip=hflip, vflip=vflip, n_frames=3)])
    clip = decode_clip(path, "phone", DecodeConfig(fps=2.0))
    assert clip.frames.shape[1:] == upright.shape
    assert np.abs(clip.frames[0].astype(int) - upright).mean() < 3.0


def test_sideways_face_is_found_upright(tmp_path):
    """A face stored sideways with a 90 degree display matrix is found in every sampled frame."""
    from extractors.faces import HaarFaceDetector

    face = face_image(size=(160, 120))
    path = write_tracks(tmp_path / "portrait.mp4", video=[VideoTrack(face, rotation=90, fps=5, n_frames=20)])
    clip = decode_clip(path, "portrait", DecodeConfig(fps=2.0))
    detector = HaarFaceDetector()
    assert len(clip.frames) == 8 and all(detector.detect(f) for f in clip.frames)


def test_still_picture_is_shown_for_the_whole_clip(tmp_path):
    """A video stream of one frame beside 4.6 s of audio gives that frame at every sampled time."""
    audio = np.zeros(int(4.6 * SAMPLE_RATE), np.float32)
    path = write_tracks(tmp_path / "still.mkv", video=[VideoTrack(_marker(), n_frames=1)],
                        audio=[AudioTrack(audio)])
    clip = decode_clip(path, "still", DecodeConfig(fps=2.0))
    assert clip.frames_reason == "" and len(clip.frames) == 9
    assert all(np.abs(f.astype(int) - _marker()).mean() < 3.0 for f in clip.frames)


def test_slideshow_frames_stay_until_the_next_one(tmp_path):
    """Pictures 5 s apart: each sampled time gets the picture on screen then, to the end of the clip."""
    slides = [np.full((48, 64, 3), 60 * (i + 1), np.uint8) for i in range(3)]  # at 0, 5 and 10 s
    path = write_tracks(tmp_path / "slides.mp4", video=[VideoTrack(slides, fps=1, n_frames=3)],
                        audio=[AudioTrack(np.zeros(14 * SAMPLE_RATE, np.float32))])
    clip = decode_clip(path, "slides", DecodeConfig(fps=1.0))
    shown = np.round(clip.frames[:, 24, 32, 0] / 60.0).astype(int)
    expected = [min(3, int(t) + 1) for t in clip.frame_times_s]  # the slide shown at each frame's time
    assert len(clip.frames) == 14 and list(shown) == expected and shown[-1] == 3


def test_thumbnail_before_the_video_is_passed_over(tmp_path):
    """A one-picture thumbnail stream before the real video (Matroska, no flags) is not taken for the video."""
    face = face_image(size=(160, 120))
    thumbnail = VideoTrack(np.zeros((120, 160, 3), np.uint8), codec="mjpeg", n_frames=1, fps=1)
    path = write_tracks(tmp_path / "thumb.mkv", video=[thumbnail, VideoTrack(face, fps=10)],
                        audio=[AudioTrack(np.zeros(2 * SAMPLE_RATE, np.float32))])
    clip = decode_clip(path, "thumb")
    assert probe(path)["video_stream"] == 1
    assert len(clip.frames) == 4 and all(np.abs(f.astype(int) - face).mean() < 12 for f in clip.frames)


def test_default_thumbnail_of_one_frame_is_passed_over(tmp_path):
    """A one-frame picture stream flagged default (mp4 counts its frames) loses to the real footage."""
    face = face_image(size=(160, 120))
    thumbnail = VideoTrack(np.zeros((120, 160, 3), np.uint8), codec="png", n_frames=1, fps=1, default=True)
    path = write_tracks(tmp_path / "thumb.mp4", video=[thumbnail, VideoTrack(face, default=False)],
                        audio=[AudioTrack(np.zeros(2 * SAMPLE_RATE, np.float32))])
    assert probe(path)["video_stream"] == 1
    assert np.abs(decode_clip(path, "t").frames[0].astype(int) - face).mean() < 12


def test_cover_art_alone_is_no_video(tmp_path):
    """Audio with cover art only (an attached picture) has no video, and its reason says why."""
    import cv2

    ok, png = cv2.imencode(".png", _marker())
    path = write_tracks(tmp_path / "song.mkv", audio=[AudioTrack(0.1 * np.ones(SAMPLE_RATE, np.float32))],
                        attachments=[("cover.png", "image/png", png.tobytes())])
    clip = decode_clip(path, "song")
    assert clip.frames is None and clip.frames_reason.startswith("no-video-stream: only a still picture")
    assert clip.audio is not None


def _tone_bursts(seconds: float = 2.0, hz: float = 220.0) -> np.ndarray:
    """A voice-like signal: 200 ms tone bursts with 200 ms pauses (strongly modulated)."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * hz * t) * ((t % 0.4) < 0.2)).astype(np.float32)


def test_default_audio_track_is_used_not_the_first(tmp_path):
    """A silent, non-default first audio track and the default second one with the sound: the second is used."""
    voice = _tone_bursts()
    path = write_tracks(tmp_path / "tracks.mp4", audio=[AudioTrack(np.zeros_like(voice), default=False),
                                                        AudioTrack(voice, default=True)])
    clip = decode_clip(path, "tracks")
    assert probe(path)["audio_stream"] == 1 and np.sqrt(np.mean(clip.audio ** 2)) > 0.1


def test_commentary_track_is_not_the_clip_audio(tmp_path):
    """A default commentary track (FFmpeg's `comment` disposition) loses to the programme's audio."""
    voice = _tone_bursts()
    path = write_tracks(tmp_path / "comment.mkv", audio=[
        AudioTrack(np.zeros_like(voice), default=True, dispositions=("comment",)), AudioTrack(voice)])
    assert probe(path)["audio_stream"] == 1 and np.sqrt(np.mean(decode_clip(path, "c").audio ** 2)) > 0.1


def _stereo(left: np.ndarray, right: np.ndarray, tmp_path, name: str) -> np.ndarray:
    path = write_tracks(tmp_path / name, audio=[AudioTrack(np.stack([left, right]), codec="pcm_s16le")])
    return decode_clip(path, name).audio


@pytest.mark.parametrize("right", ["inverted", "silent", "noise", "half-inverted"])
def test_stereo_mix_keeps_a_voice_each_channel_or_one_carries(tmp_path, right):
    """The mono mix keeps the voice: R = -L does not cancel it, a silent or noise-only R does not halve
    or bury it (the mix stays the left channel at its level)."""
    voice = _tone_bursts()
    other = {"inverted": -voice, "silent": np.zeros_like(voice), "half-inverted": -0.5 * voice,
             "noise": (0.05 * np.random.default_rng(0).standard_normal(len(voice))).astype(np.float32)}[right]
    mono = _stereo(voice, other, tmp_path, f"{right}.wav")
    level = np.sqrt(np.mean(voice ** 2))
    assert np.corrcoef(mono, voice)[0, 1] > 0.99
    assert np.sqrt(np.mean(mono ** 2)) > (0.7 if right == "half-inverted" else 0.95) * level


def test_stereo_mix_keeps_two_voices(tmp_path):
    """Two different voices, one per channel (two lapel microphones), both stay in the mix."""
    low, high = _tone_bursts(hz=180.0), _tone_bursts(hz=410.0)
    mono = _stereo(low, high, tmp_path, "two.wav")
    assert np.corrcoef(mono, low)[0, 1] > 0.6 and np.corrcoef(mono, high)[0, 1] > 0.6


def test_git_lfs_pointer_says_so(tmp_path):
    """A Git LFS pointer where the media should be is a decode error that says how to fetch the media."""
    with pytest.raises(DecodeError, match="Git LFS pointer.*git lfs pull"):
        decode_clip(lfs_pointer(tmp_path / "clip.mp4"), "clip")


def test_dangling_annex_link_says_so(tmp_path):
    """A git-annex link whose content was never fetched says so (not just 'no such file')."""
    link = tmp_path / "clip.mp4"
    link.symlink_to(tmp_path / ".git" / "annex" / "objects" / "Xx" / "SHA256E-s1--abc.mp4")
    with pytest.raises(DecodeError, match="git-annex"):
        decode_clip(link, "clip")
