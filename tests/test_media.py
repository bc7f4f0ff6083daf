"""Synthetic media: espeak-ng speech, scikit-image faces, PyAV-muxed clips."""

from __future__ import annotations

import numpy as np
import pytest

from core.clip import SAMPLE_RATE
from demo.media import corrupt_file, face_image, make_clip, no_face_image, speak, write_clip
from pipeline.decode import decode_clip, probe


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def test_speak_returns_voiced_audio_at_16k():
    """espeak-ng speech comes back as float32 mono at 16 kHz, about a second per few words, clearly audible."""
    audio = speak("Hello world")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 0.4 * SAMPLE_RATE < len(audio) < 3 * SAMPLE_RATE
    assert _rms(audio) > 0.02


def test_speak_rate_changes_length():
    """A slower speaking rate gives a longer utterance."""
    assert len(speak("one two three four", speed=100)) > 1.3 * len(speak("one two three four", speed=220))


def test_speak_error_carries_espeak_message():
    """An unknown voice fails with espeak-ng's own error text in the exception."""
    with pytest.raises(RuntimeError, match="voice does not exist"):
        speak("hello", voice="zzunknownvoice")


def test_speech_clip_has_audible_audio(tmp_path):
    """A speech clip decodes to audio that is not silent."""
    clip = decode_clip(make_clip(tmp_path / "speech.mp4", text="Testing one two three"), "speech")
    assert clip.audio is not None and _rms(clip.audio) > 0.02


def test_silent_clip_is_silent(tmp_path):
    """A silent clip decodes to (near) digital silence."""
    clip = decode_clip(make_clip(tmp_path / "silent.mp4", audio="silent", duration_s=1.0), "silent")
    assert clip.audio is not None and np.abs(clip.audio).max() < 1e-3


def test_noise_clip_is_loud(tmp_path):
    """A noise clip decodes to audio at about the requested level."""
    clip = decode_clip(make_clip(tmp_path / "noise.mp4", audio="noise", duration_s=1.0), "noise")
    assert 0.05 < _rms(clip.audio) < 0.2


def test_clip_without_audio_has_no_audio_stream(tmp_path):
    """audio=None writes a file with a video stream only."""
    info = probe(make_clip(tmp_path / "mute.mp4", audio=None, duration_s=1.0))
    assert info["has_video"] and not info["has_audio"]


def test_audio_only_clip_has_no_video_stream(tmp_path):
    """video=False writes an audio-only wav."""
    info = probe(make_clip(tmp_path / "voice.wav", text="Audio only", video=False))
    assert info["has_audio"] and not info["has_video"] and info["codecs"]["audio"] == "pcm_s16le"


def test_write_clip_pads_to_duration_with_even_size(tmp_path):
    """An odd-sized image is cropped to even sides and shown for the whole requested duration."""
    image = np.zeros((41, 63, 3), np.uint8)
    info = probe(write_clip(tmp_path / "odd.mp4", audio=None, frames=image, fps=10, duration_s=2.0))
    assert (info["width"], info["height"]) == (62, 40)
    assert info["duration_s"] == pytest.approx(2.0, abs=0.11)


def test_face_and_no_face_images_have_requested_size():
    """Images come out as uint8 RGB with the (width, height) asked for."""
    for image in (face_image(size=(160, 120)), face_image("lfw", size=(160, 120), index=3),
                  no_face_image(size=(160, 120)), no_face_image("noise", size=(160, 120))):
        assert image.shape == (120, 160, 3) and image.dtype == np.uint8


def test_corrupt_file_keeps_the_header(tmp_path):
    """corrupt_file keeps the first bytes of the original and changes the rest."""
    path = make_clip(tmp_path / "c.mp4", audio="noise", duration_s=1.0)
    original = path.read_bytes()
    corrupted = corrupt_file(path, keep_bytes=32).read_bytes()
    assert corrupted[:32] == original[:32] and corrupted[32:] != original[32:]


def test_noise_variants_have_their_level_and_differ():
    """Every non-speech kind is generated at the asked RMS level, deterministic per seed."""
    from demo.media import NOISE_KINDS, noise_variant

    sounds = {kind: noise_variant(kind, 1.0, level_db=-30.0) for kind in NOISE_KINDS}
    for kind, x in sounds.items():
        assert x.dtype == np.float32 and len(x) == 16_000
        assert 20 * np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2))) == pytest.approx(-30.0, abs=0.5), kind
    assert np.array_equal(noise_variant("rain", 1.0, seed=3), noise_variant("rain", 1.0, seed=3))
    assert not np.allclose(sounds["white"], sounds["pink"])


def test_stored_for_display_undoes_the_display_turn():
    """Turning the stored frame as PyAV documents (counter-clockwise, then mirror) gives the picture back."""
    from demo.media import stored_for_display

    image = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3)
    for rotation in (0, 90, 180, -90):
        for hflip in (False, True):
            shown = np.rot90(stored_for_display(image, rotation, hflip), k=rotation // 90)
            assert np.array_equal(shown[:, ::-1] if hflip else shown, image)
