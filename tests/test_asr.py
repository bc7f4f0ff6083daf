"""Whisper ASR (packaged Whisper base) with its no-speech and decoding-loop guard, long-form decoding, and the
shared whisper-encoder features."""

from __future__ import annotations

import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from core.clip import SAMPLE_RATE, ClipInput
from extractors import asr, base, vad
from extractors.asr import RESULT_KEY, WhisperASR
from extractors.audio import WhisperEncoderFeatures
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


FALLBACK = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]  # the presets' temperature fallback (whisper.transcribe's)
SENTENCES = ["The weather was bright and sunny this morning.", "My brother bought a new bicycle yesterday.",
             "Please close the window before you leave.", "The library opens at nine on weekdays.",
             "We planted tomatoes in the garden last spring.", "Her favourite colour has always been green.",
             "The train to the city was late again today.", "Dinner will be ready in about twenty minutes."]
KEYWORDS = ["sunny", "bicycle", "window", "library", "tomatoes", "green", "train", "dinner"]


def level(audio: np.ndarray, rms_db: float) -> np.ndarray:
    return (audio / np.sqrt(np.mean(audio.astype(np.float64) ** 2)) * 10 ** (rms_db / 20)).astype(np.float32)


@pytest.fixture(scope="module")
def whisper_asr() -> WhisperASR:
    """The packaged Whisper base, converted on first use (shared cache) and loaded once for the module."""
    return base.build("whisper", {"model": MODEL, "language": "en", "temperatures": FALLBACK})


@pytest.fixture(scope="module")
def batch(whisper_asr: WhisperASR, speech: dict[str, np.ndarray]) -> dict[str, tuple[ClipInput, object]]:
    """One ASR call over every case, so windows of several clips share encoder and decoder batches."""
    from demo.media import speak as espeak

    gap = np.zeros(int(0.6 * SAMPLE_RATE), np.float32)
    eight = np.concatenate([np.concatenate([espeak(s, speed=130), gap]) for s in SENTENCES])  # 32 s
    said_again = np.concatenate([espeak("I love you so much.", speed=150), gap] * 6)  # 12 s, one line six times
    clips = [
        make_clip(speech["hello"], "speech"),
        make_clip(np.zeros(2 * SAMPLE_RATE, np.float32), "silence"),
        make_clip(white_noise(3.0), "noise"),
        make_clip(None, "no-audio", audio_reason="no-audio-stream"),
        make_clip(np.concatenate([speech["hello"], np.zeros(28 * SAMPLE_RATE, np.float32), speech["spring"]]),
                  "long"),
        make_clip(eight, "eight"),
        make_clip(said_again, "said-again"),
        make_clip(level(speech["spring"], -64.0), "quiet"),  # RAVDESS's soft calm/sad speech is this quiet
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


@pytest.mark.slow
def test_long_form_keeps_every_sentence_with_timestamps(batch: dict) -> None:
    """Eight sentences over 32 s (two windows) all reach the transcript, in order; their timestamped segments
    stay in clip.shared for callers, inside the clip and in time order."""
    clip, out = batch["eight"]
    said = words(out.transcript)
    assert out.reason == "" and all(k in said for k in KEYWORDS)
    assert [said.index(k) for k in KEYWORDS] == sorted(said.index(k) for k in KEYWORDS)
    segments = clip.shared[RESULT_KEY].segments
    assert len(segments) >= 6 and " ".join(s.text for s in segments) == out.transcript
    assert all(0 <= s.start_s < s.end_s <= clip.duration_s + 0.02 for s in segments)
    assert all(a.start_s <= b.start_s for a, b in zip(segments, segments[1:]))


@pytest.mark.slow
def test_speech_said_again_is_kept_every_time(batch: dict) -> None:
    """One line said six times is transcribed six times: Whisper writes it once, which is far too little text
    for 8 s of speech, so the window is decoded again chunk by chunk."""
    _, out = batch["said-again"]
    assert out.reason == "" and words(out.transcript).count("love") == 6


@pytest.mark.slow
def test_quiet_speech_is_speech(batch: dict) -> None:
    """Speech at -64 dBFS RMS (peaks near -40 dBFS, as RAVDESS's soft calm and sad clips) keeps its text."""
    _, out = batch["quiet"]
    assert out.reason == "" and {"weather", "spring"} <= set(words(out.transcript))


def test_whisper_no_speech_rule_without_vad(whisper_asr: WhisperASR) -> None:
    """With the VAD gate off, Whisper's own rule (high no-speech prob and low logprob) still rejects white noise."""
    ex = WhisperASR({"model": MODEL, "language": "en", "min_speech_s": 0.0})
    assert ex.model is whisper_asr.model  # loaded once per process
    out = ex.extract([make_clip(white_noise(3.0))])[0]
    assert (out.transcript, out.reason) == ("", "asr-no-speech")
    assert out.diagnostics["asr_no_speech_prob"] > 0.6 and out.diagnostics["asr_avg_logprob"] < -1.0


def fake_decode(text: str, compression_ratio: float, n_tokens: int | None = None) -> object:
    """whisper.decode returning `text` for every window: its tokens, framed by timestamps 0 s and 30 s."""
    def decode(model: object, features: torch.Tensor, options: object) -> list:
        assert features.shape[1:] == (1500, 512)  # encoder output, never a mel: decode skips the encoder
        tokenizer = whisper_tokenizer()
        body = tokenizer.encode(" " + text)
        tokens = [tokenizer.timestamp_begin] + body + [tokenizer.timestamp_begin + 1500]  # to the window end
        if n_tokens is not None:
            tokens = (tokens * n_tokens)[:n_tokens]
        return [types.SimpleNamespace(text=text, language="en", no_speech_prob=0.01, avg_logprob=-0.2,
                                      compression_ratio=compression_ratio, tokens=tokens, temperature=0.0)
                for _ in features]
    return decode


def whisper_tokenizer() -> object:
    import whisper.tokenizer

    return whisper.tokenizer.get_tokenizer(True, num_languages=99)


def test_repetition_loop_is_rejected(whisper_asr: WhisperASR, speech: dict,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A transcript over the compression threshold AND denser than any speech (200 characters for about 3 s of
    speech) is a decoding loop: missing with 'asr-hallucination', also after the chunk-by-chunk retry."""
    import whisper

    monkeypatch.setattr(whisper, "decode", fake_decode("Thank you. " * 20, 4.1))
    clip = make_clip(speech["hello"])
    out = whisper_asr.extract([clip])[0]
    assert (out.transcript, out.reason) == ("", "asr-hallucination")
    assert clip.shared[RESULT_KEY].dropped and clip.shared[RESULT_KEY].dropped[0][0] == "decoding-loop"


def test_speech_that_repeats_is_not_a_loop(whisper_asr: WhisperASR, speech: dict,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The same compression ratio over 25 s of speech is speech said again (a plausible rate, decoding ended):
    the text is kept, where the old rule dropped it."""
    import whisper

    text = "I am fine. I am fine. Leave me alone. Leave me alone. It does not matter. It does not matter."
    monkeypatch.setattr(whisper, "decode", fake_decode(text, 2.6))
    long_speech = np.concatenate([speech["hello"], speech["spring"]] * 3)[: 25 * SAMPLE_RATE]
    out = whisper_asr.extract([make_clip(long_speech)])[0]
    assert (out.transcript, out.reason) == (text, "")


def test_speech_the_vad_misses_is_kept_on_whisper_confidence(whisper_asr: WhisperASR, speech: dict,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Speech silero-vad does not hear (it misses some shouted takes) keeps its text when Whisper's scores both
    say speech; white noise in the same position, where Whisper's own skip rule alone would not suffice on
    hiss and music, still gets none."""
    monkeypatch.setattr(vad, "speech_segments", lambda audio, threshold=0.5: [])
    clips = [make_clip(speech["hello"], "missed"), make_clip(white_noise(3.0), "noise")]
    out = whisper_asr.extract(clips)
    assert out[0].reason == "" and {"test", "transcription"} <= set(words(out[0].transcript))
    assert (out[1].transcript, out[1].reason) == ("", "asr-no-speech")


def test_decoding_loop_evidence() -> None:
    """Over the compression threshold alone is not a loop; with text denser than speech or a decode that ran
    to the token limit it is."""
    loop = asr.decoding_loop
    assert not loop("a b " * 40, 1.9, 80, 0.5, 2.4, 224)  # under the threshold: never a loop
    assert loop("Thank you. " * 20, 4.1, 60, 1.0, 2.4, 224)  # 220 characters in 1 s of speech
    assert not loop("Thank you. " * 20, 4.1, 60, 20.0, 2.4, 224)  # the same over 20 s of speech: said again
    assert loop("Thank you. " * 20, 4.1, 224, 20.0, 2.4, 224)  # never ended: a loop


def test_timestamp_segments_read_as_whisper_transcribe_does() -> None:
    """Consecutive timestamps close segments; an unfinished last segment says where to decode again."""
    tb = 1000
    done, next_pos = asr.timestamp_segments([tb, 1, 2, tb + 50, tb + 50, 3, tb + 120], tb)
    assert (done, next_pos) == ([(0, 50, [1, 2]), (50, 120, [3])], None)  # single timestamp ending: finished
    cut, next_pos = asr.timestamp_segments([tb, 1, tb + 50, tb + 50, 3, 4], tb)
    assert (cut, next_pos) == ([(0, 50, [1])], 50)  # "3 4" never closed: decode again from 1 s
    plain, next_pos = asr.timestamp_segments([tb, 5, 6, tb + 80], tb)
    assert (plain, next_pos) == ([(0, 80, [5, 6])], None)


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
    assert np.max(np.abs(audio)) > vad.PEAK_TARGET  # loud enough to reach the encoder as it is
    vector = features.extract([make_clip(audio)])[0].features
    mel = asr.log_mel(whisper_asr.model, audio, torch.device("cpu"))[None]
    with torch.inference_mode():
        out = whisper_asr.model.encoder(mel)[0]
    n = int(np.ceil(len(audio) / 320))
    np.testing.assert_allclose(vector, out[:n].mean(0).numpy(), atol=1e-5, rtol=1e-4)
    assert not np.allclose(vector, out.mean(0).numpy(), atol=1e-3)


def test_whisper_encoder_missing_reasons(whisper_asr: WhisperASR, speech: dict) -> None:
    """whisper-encoder is absent with the decoder's reason when there is no audio, 'silent' on digital
    silence (dithered too); a voice at -64 dBFS is audio."""
    features = WhisperEncoderFeatures({"model": MODEL})
    dither = np.random.default_rng(0).integers(-1, 2, SAMPLE_RATE).astype(np.float32) / 32768
    out = features.extract([make_clip(None, audio_reason="no-audio-stream"),
                            make_clip(np.zeros(SAMPLE_RATE, np.float32)), make_clip(dither),
                            make_clip(level(speech["hello"], -64.0))])
    assert [(o.features, o.reason) for o in out[:3]] == [(None, "no-audio-stream"), (None, "silent"),
                                                           (None, "silent")]
    assert out[3].features is not None and out[3].reason == ""


def test_windows_cut_in_pauses_the_vad_found() -> None:
    """With speech segments, a long clip is cut in the middle of the longest pause before each 30 s mark."""
    n = 65 * SAMPLE_RATE
    speech = [(0, 26 * SAMPLE_RATE), (int(27.5 * SAMPLE_RATE), 40 * SAMPLE_RATE), (41 * SAMPLE_RATE, n)]
    windows = asr.split_windows(n, white_noise(65.0), speech)
    assert windows[0] == (0, int(26.75 * SAMPLE_RATE))
    assert all(end - start <= asr.WINDOW_SAMPLES for start, end in windows) and windows[-1][1] == n


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
    assert spec["rules"] == asr.RULES_VERSION and spec["vad"] == "silero-vad" and spec["vad_version"]


def test_noise_music_and_room_tone_get_no_text(whisper_asr: WhisperASR) -> None:
    """Every kind of non-speech sound (noise, hum, fan, room tone, typing, rain, music) at a quiet and a loud
    level gets no text, and its audio stays present (it is not silence)."""
    from demo.media import NOISE_KINDS, noise_variant

    clips = [make_clip(noise_variant(kind, 4.0, level_db=db, seed=1), f"{kind}@{db}")
             for kind in NOISE_KINDS for db in (-55.0, -15.0)]
    outputs = whisper_asr.extract(clips)
    texts = {c.clip_id: (o.transcript, o.reason) for c, o in zip(clips, outputs)}
    assert all(t == ("", "asr-no-speech") for t in texts.values()), texts
    assert all(vad.audio_unusable_reason(c) == "" for c in clips)


def test_unknown_whisper_model_is_one_clear_error() -> None:
    """A Whisper name that is neither a file nor an openai-whisper model says how to run offline."""
    with pytest.raises(ModelUnavailableError, match="--preset offline"):
        WhisperASR({"model": "no-such-whisper"})
