"""Clips that are parts of files: time segments (seeking), a separate audio file, and a crop of the frame."""

import csv

import numpy as np
import pytest
import yaml
from fake_extractors import fake_config_dict

from demo.media import write_clip
from pipeline.decode import DecodeError, decode_clip
from pipeline.inputs import InputError, read_manifest

FPS = 10
SR = 16_000


def stepped_clip(path, seconds: int, *, audio: bool = True, size=(64, 48)):
    """Second k of the clip: frames of grey level 10 + 6k, a 440 Hz tone of amplitude 0.02 (k + 1)."""
    w, h = size
    frames = np.stack([np.full((h, w, 3), 10 + 6 * (i // FPS), np.uint8) for i in range(seconds * FPS)])
    t = np.arange(seconds * SR) / SR
    tone = (0.02 * (np.floor(t) + 1) * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return write_clip(path, audio=tone if audio else None, frames=frames, fps=FPS, duration_s=seconds)


def second_of(frames: np.ndarray) -> np.ndarray:
    """Which second of `stepped_clip` each frame shows, from its grey level."""
    return np.round((frames.reshape(len(frames), -1).mean(axis=1) - 10) / 6).astype(int)


def amplitude(x: np.ndarray) -> float:
    return float(np.sqrt(2 * np.mean(np.square(x, dtype=np.float64))))


def test_a_segment_is_that_stretch_of_the_file(tmp_path):
    """start/end cut both streams: the audio and the sampled frames come from [start, end) only."""
    path = stepped_clip(tmp_path / "long.mp4", 8)
    clip = decode_clip(path, "seg", start_s=3.0, end_s=5.0)
    assert clip.duration_s == pytest.approx(2.0)
    assert abs(len(clip.audio) - 2 * SR) <= 0.05 * SR
    first, last = clip.audio[SR // 10: SR // 2], clip.audio[-SR // 2: -SR // 10]
    assert amplitude(first) == pytest.approx(0.08, rel=0.15)  # second 3
    assert amplitude(last) == pytest.approx(0.10, rel=0.15)  # second 4
    assert set(second_of(clip.frames)) == {3, 4} and np.all(np.diff(second_of(clip.frames)) >= 0)
    assert np.all((clip.frame_times_s >= -0.11) & (clip.frame_times_s < 2.0))


def test_a_late_segment_is_reached_by_seeking(tmp_path):
    """A segment near the end of a 40 s file gets its own content (the decoder seeks instead of failing)."""
    path = stepped_clip(tmp_path / "long.mp4", 40, size=(32, 24))
    clip = decode_clip(path, "late", start_s=36.0, end_s=38.0)
    assert set(second_of(clip.frames)) == {36, 37}
    assert amplitude(clip.audio[SR // 10: SR // 2]) == pytest.approx(0.74, rel=0.15)


def test_a_segment_past_the_end_fails_and_one_running_over_is_cut(tmp_path):
    path = stepped_clip(tmp_path / "short.mp4", 3)
    with pytest.raises(DecodeError, match="after the end of the media"):
        decode_clip(path, "x", start_s=10.0, end_s=12.0)
    clip = decode_clip(path, "y", start_s=2.0, end_s=9.0)
    assert clip.duration_s == pytest.approx(1.0, abs=0.1)


def test_open_ended_segments(tmp_path):
    """Only start: to the end of the file; only end: from its beginning."""
    path = stepped_clip(tmp_path / "c.mp4", 4)
    assert decode_clip(path, "a", start_s=3.0).duration_s == pytest.approx(1.0, abs=0.1)
    head = decode_clip(path, "b", end_s=1.0)
    assert head.duration_s == pytest.approx(1.0) and abs(len(head.audio) - SR) <= 0.05 * SR


def test_audio_path_gives_a_video_without_sound_its_audio(tmp_path):
    """A video-only file plus a separate wav (RAVDESS 02 + 03, CREMA-D flv + wav): audio from the wav, whole."""
    video = stepped_clip(tmp_path / "video_only.mp4", 2, audio=False)
    t = np.arange(2 * SR) / SR
    wav = write_clip(tmp_path / "voice.wav", audio=(0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32),
                     frames=None)
    assert decode_clip(video, "v").audio_reason == "no-audio-stream"
    clip = decode_clip(video, "v", audio_path=wav)
    assert clip.audio_reason == "" and amplitude(clip.audio) == pytest.approx(0.3, rel=0.05)
    assert clip.frames is not None
    with pytest.raises(DecodeError, match="audio file .*missing.wav"):
        decode_clip(video, "v", audio_path=tmp_path / "missing.wav")


def test_crop_shows_only_the_speakers_half(tmp_path):
    """crop 0,0,0.5,1 keeps the left half (white here), 0.5,0,1,1 the right half (black)."""
    frame = np.zeros((48, 96, 3), np.uint8)
    frame[:, :48] = 255
    path = write_clip(tmp_path / "two.mp4", audio=None, frames=frame, fps=FPS, duration_s=1.0)
    left = decode_clip(path, "l", crop=(0.0, 0.0, 0.5, 1.0)).frames
    right = decode_clip(path, "r", crop=(0.5, 0.0, 1.0, 1.0)).frames
    assert left.shape[1:3] == (48, 48) and left[:, :, 2:-2].min() > 200
    assert right.shape[1:3] == (48, 48) and right[:, :, 2:-2].max() < 50


def _manifest(tmp_path, rows, header):
    path = tmp_path / "clips.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_manifest_reads_segments_audio_paths_and_crops(tmp_path):
    """The columns arrive in the clip items; segments without an id get unique ones."""
    m = _manifest(tmp_path, [["d.mp4", "", "0", "2.5", "0,0,0.5,1"], ["d.mp4", "", "2.5", "", ""],
                             ["e.mp4", "e.wav", "", "", ""]], ["path", "audio_path", "start", "end", "crop"])
    a, b, c = read_manifest(m, tmp_path)
    assert (a.id, a.start_s, a.end_s, a.crop) == ("d@0-2.5", 0.0, 2.5, (0.0, 0.0, 0.5, 1.0))
    assert (b.id, b.start_s, b.end_s, b.is_segment) == ("d@2.5-", 2.5, None, True)
    assert (c.id, c.audio_path, c.is_segment) == ("e", tmp_path / "e.wav", False)


@pytest.mark.parametrize("row, message", [
    (["d.mp4", "3", "2", ""], "must come after start"),
    (["d.mp4", "-1", "2", ""], "seconds >= 0"),
    (["d.mp4", "x", "", ""], "not a number of seconds"),
    (["d.mp4", "", "", "0,0,1.5,1"], "0 <= x0 < x1 <= 1"),
    (["d.mp4", "", "", "left"], "x0,y0,x1,y1"),
])
def test_manifest_refuses_impossible_segments_and_crops(tmp_path, row, message):
    m = _manifest(tmp_path, [row], ["path", "start", "end", "crop"])
    with pytest.raises(InputError, match=message):
        read_manifest(m, tmp_path)


def test_extract_segments_of_one_file_resume_and_fail_alone(tmp_path, capsys):
    """Three segments of one file become three rows (own ids, durations, content); a segment past the end is
    an error row with its reason; a rerun extracts nothing new."""
    from pipeline.cli.extract import main as extract_main
    from pipeline.store import read_store

    stepped_clip(tmp_path / "media" / "talk.mp4", 6)
    m = _manifest(tmp_path, [["talk.mp4", "u1", "0", "2"], ["talk.mp4", "u2", "2", "3.5"],
                             ["talk.mp4", "u3", "3.5", "6"], ["talk.mp4", "u4", "9", "10"]],
                  ["path", "id", "start", "end"])
    config = tmp_path / "fake.yaml"
    config.write_text(yaml.safe_dump(fake_config_dict()), encoding="utf-8")
    args = [str(tmp_path / "media"), "--manifest", str(m), "--out", str(tmp_path / "f.h5"), "--config", str(config),
            "-q"]
    assert extract_main(args) == 0
    data = read_store(tmp_path / "f.h5")
    rows = dict(zip(data.ids.astype(str), range(len(data))))
    assert set(rows) == {"u1", "u2", "u3", "u4"}
    assert [round(float(data.duration_s[rows[k]]), 1) for k in ("u1", "u2", "u3")] == [2.0, 1.5, 2.5]
    assert data.status[rows["u4"]] == "error"
    audio = data.features["audio"]
    assert not np.allclose(audio[rows["u1"]], audio[rows["u3"]])  # different stretches, different content
    capsys.readouterr()
    assert extract_main(args) == 0
    assert "this run: 0 extracted, 4 already done" in capsys.readouterr().out
    assert len(read_store(tmp_path / "f.h5")) == 4
