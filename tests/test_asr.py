"""Whisper ASR (packaged Whisper base) with its no-speech guard, and the shared whisper-encoder features."""

from __future__ import annotations

import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from extractors import asr, base
from extractors.asr import WhisperASR
from extractors.audio import WhisperEncoderFeatures
from extractors.base import SAMPLE_RATE, ClipInput
from extractors.packaged import ModelUnavailableError

MODEL = "packaged:whisper-base"
pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng for speech")


def speak(text: str, folder: Path, name: str) -> np.ndarray:
    """espeak-ng speech as float32 at 16 kHz."""
    import librosa
    import soundfile

    wav = folder / f"{name}.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
    audio, rate = soundfile.read(wav, dtype="float32")
    return librosa.resample(audio, orig_sr=rate, target_sr=SAMPLE_RATE).astype(np.float32)


def make_clip(audio: np.ndarray | None, clip_id: str = "c", audio_reason: str = "") -> ClipInput:
    duration = 0.0 if audio is None else len(audio) / SAMPLE_RATE
    return ClipInput(clip_id, audio, audio_reason, None, "no-video-stream", duration)


def white_noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def words(text: str) -> list[str]:
    return "".join(ch.lower() if ch.isalnum() else " " for ch in text).split()


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    folder = tmp_path_factory.mktemp("speech")
    return {"hello": speak("hello world this is a test of the offline transcription system", folder, "hello"),
            "spring": speak("this second sentence is about the lovely weather in spring", folder, "spring")}


@pytest.fixture(scope="module")
def whisper_asr() -> WhisperASR:
    """The packaged Whisper base, converted on first use (shared cache) and loaded once for the module."""
    return base.build("whisper", {"model": MODEL, "language": "en"})


@pytest.fixture(scope="module")
def batch(whisper_asr: WhisperASR, speech: dict[str, np.ndarray]) -> dict[str, tuple[ClipInput, object]]:
    """One ASR call over every case, so windows of several clips share encoder and decoder batches."""
    gap = np.zeros(28 * SAMPLE_RATE, np.float32)
    clips = [
        make_clip(speech["hello"], "speech"),
        make_clip(np.zeros(2 * SAMPLE_RATE, np.float32), "silence"),
        make_clip(white_noise(3.0), "noise"),
        make_clip(None, "no-audio", audio_reason="no-audio-stream"),
        make_clip(np.concatenate([speech["hello"], gap, speech["spring"]]), "long"),
    ]
    outputs = whisper_asr.extract(clips)
    return {c.clip_id: (c, o) for c, o in zip(clips, outputs)}


def test_transcribes_espeak_speech(batch: dict) -> None:
    """The converted packaged Whisper base transcribes an espeak-ng clip with the spoken words."""
    clip, out = batch["speech"]
    assert {"hello", "world", "test", "offline", "transcription", "system"} <= set(words(out.transcript))
    assert clip.transcript == out.transcript and clip.text_reason == "" and out.reason == ""
    assert out.diagnostics["asr_no_speech_prob"] < 0.5 and out.diagnostics["speech_ratio"] > 0.3


def test_silence_gives_no_text(batch: dict) -> None:
    """Digital silence has no transcript, reason 'silent' (Whisper would say 'you')."""
    clip, out = batch["silence"]
    assert (out.transcript, out.reason, clip.transcript, clip.text_reason) == ("", "silent", "", "silent")


def test_white_noise_gives_no_text(batch: dict) -> None:
    """White noise gives no transcript: the VAD finds no speech, so nothing hallucinated becomes text."""
    clip, out = batch["noise"]
    assert (out.transcript, out.reason, clip.text_reason) == ("", "asr-no-speech", "asr-no-speech")
    assert out.diagnostics["speech_ratio"] < 0.02


def test_no_audio_reason_propagates(batch: dict) -> None:
    """A clip without audio gets text reason 'no-audio: <audio_reason>'."""
    clip, out = batch["no-audio"]
    assert (out.reason, clip.text_reason, clip.transcript) == ("no-audio: no-audio-stream",) * 2 + ("",)


def test_long_audio_is_transcribed_window_by_window(batch: dict) -> None:
    """Speech in both 30 s windows of a 35 s clip ends up in the transcript, in order."""
    _, out = batch["long"]
    said = words(out.transcript)
    assert {"hello", "system", "second", "sentence"} <= set(said) and said.index("system") < said.index("second")


def test_whisper_no_speech_rule_without_vad(whisper_asr: WhisperASR) -> None:
    """With the VAD off, Whisper's own rule (high no-speech prob and low logprob) still rejects white noise."""
    ex = WhisperASR({"model": MODEL, "language": "en", "min_speech_ratio": 0.0, "min_speech_s": 0.0})
    assert ex.model is whisper_asr.model  # loaded once per process
    out = ex.extract([make_clip(white_noise(3.0))])[0]
    assert (out.transcript, out.reason) == ("", "asr-no-speech")
    assert out.diagnostics["asr_no_speech_prob"] > 0.6 and out.diagnostics["asr_avg_logprob"] < -1.0


def fake_decode(text: str, compression_ratio: float) -> object:
    def decode(model: object, features: torch.Tensor, options: object) -> list:
        assert features.shape[1:] == (1500, 512)  # encoder output, never a mel: decode skips the encoder
        return [types.SimpleNamespace(text=text, language="en", no_speech_prob=0.01, avg_logprob=-0.2,
                                      compression_ratio=compression_ratio) for _ in features]
    return decode


def test_repetition_loop_is_rejected(whisper_asr: WhisperASR, speech: dict,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A transcript whose compression ratio exceeds the threshold is missing with 'asr-hallucination'."""
    import whisper

    monkeypatch.setattr(whisper, "decode", fake_decode("Thank you. " * 20, 4.1))
    out = whisper_asr.extract([make_clip(speech["hello"])])[0]
    assert (out.transcript, out.reason) == ("", "asr-hallucination")


def test_punctuation_only_is_empty(whisper_asr: WhisperASR, speech: dict,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A transcript of blanks and punctuation is missing with 'asr-empty'."""
    import whisper

    monkeypatch.setattr(whisper, "decode", fake_decode(" ... ", 1.0))
    out = whisper_asr.extract([make_clip(speech["hello"])])[0]
    assert (out.transcript, out.reason) == ("", "asr-empty")


def test_encoder_runs_once_for_asr_and_audio_features(whisper_asr: WhisperASR, speech: dict) -> None:
    """ASR then whisper-encoder runs the encoder once; features equal a fresh encoder run on the same audio."""
    features = WhisperEncoderFeatures({"model": MODEL, "layers": "mean-all"})
    runs = []
    hook = whisper_asr.model.encoder.conv1.register_forward_hook(lambda *_: runs.append(1))
    try:
        clip = make_clip(speech["hello"])
        whisper_asr.extract([clip])
        shared = features.extract([clip])[0].features
        assert len(runs) == 1
        direct = features.extract([make_clip(speech["hello"])])[0].features
        assert len(runs) == 2
    finally:
        hook.remove()
    assert shared.shape == (512,) and features.feature_dim == 512
    np.testing.assert_allclose(shared, direct, atol=1e-5, rtol=1e-4)


def test_encoder_states_match_whisper_encoder(whisper_asr: WhisperASR, speech: dict) -> None:
    """The hidden states captured here end in exactly what whisper's AudioEncoder returns."""
    model = whisper_asr.model
    mel = asr.log_mel(model, speech["hello"], torch.device("cpu"))[None]
    with torch.inference_mode():
        states = asr.encode_mels(model, mel)
        reference = model.encoder(mel)
    assert len(states) == model.dims.n_audio_layer + 1
    torch.testing.assert_close(states[-1], reference)


def test_whisper_encoder_pools_real_frames_only(whisper_asr: WhisperASR, speech: dict) -> None:
    """The vector is the mean of the selected state over the 50-per-second frames that cover the audio."""
    features = WhisperEncoderFeatures({"model": MODEL, "layers": "last"})
    audio = speech["hello"]
    vector = features.extract([make_clip(audio)])[0].features
    mel = asr.log_mel(whisper_asr.model, audio, torch.device("cpu"))[None]
    with torch.inference_mode():
        out = whisper_asr.model.encoder(mel)[0]
    n = int(np.ceil(len(audio) / 320))
    np.testing.assert_allclose(vector, out[:n].mean(0).numpy(), atol=1e-5, rtol=1e-4)
    assert not np.allclose(vector, out.mean(0).numpy(), atol=1e-3)


def test_whisper_encoder_missing_reasons(whisper_asr: WhisperASR) -> None:
    """whisper-encoder is absent with the decoder's reason when there is no audio, 'silent' on silence."""
    features = WhisperEncoderFeatures({"model": MODEL})
    out = features.extract([make_clip(None, audio_reason="no-audio-stream"),
                            make_clip(np.zeros(SAMPLE_RATE, np.float32))])
    assert [(o.features, o.reason) for o in out] == [(None, "no-audio-stream"), (None, "silent")]


def test_windows_cut_at_quiet_points() -> None:
    """Audio over 30 s is split into windows of at most 30 s, cut in the quietest stretch before each mark."""
    audio = white_noise(70.0)
    audio[int(27.0 * SAMPLE_RATE):int(27.3 * SAMPLE_RATE)] = 0.0  # a pause 3 s before the 30 s mark
    windows = asr.split_windows(len(audio), audio)
    assert windows[0][0] == 0 and windows[-1][1] == len(audio)
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    assert all(end - start <= asr.WINDOW_SAMPLES for start, end in windows)
    assert 27.0 * SAMPLE_RATE <= windows[0][1] <= 27.3 * SAMPLE_RATE


def test_spec_names_weights_and_thresholds(whisper_asr: WhisperASR) -> None:
    """The spec pins the checkpoint by hash and records every threshold that decides whether text exists."""
    spec = whisper_asr.spec()
    assert len(spec["checkpoint_sha256"]) == 64 and spec["encoder"] == MODEL
    assert (spec["no_speech_threshold"], spec["logprob_threshold"], spec["compression_ratio_threshold"]) == \
        (0.6, -1.0, 2.4)


def test_unknown_whisper_model_is_one_clear_error() -> None:
    """A Whisper name that is neither a file nor an openai-whisper model says how to run offline."""
    with pytest.raises(ModelUnavailableError, match="--preset offline"):
        WhisperASR({"model": "no-such-whisper"})
