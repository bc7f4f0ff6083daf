"""Emotion over time (`comp-predict --timeline`): utterances cut where the speech is, predicted as one
conversation when the model learnt conversations, with each utterance's modalities and reasons.

Unit tests check the rules on plain numbers (segmentation, context, windows, options). One module fixture
trains a small ComP on eight generated clips in four two-utterance conversations (the REAL offline preset:
Whisper base, silero-vad, MiniLM, Haar + mini-Xception) and follows a generated recording of five utterances
with known pauses through the CLI; a copy of the checkpoint that says it was trained on one-utterance
conversations, and a recording without an audio track, cover the other branches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.errors import ConfigError
from demo import media
from pipeline.timeline.context import plan_context, sliding_windows, window_owner
from pipeline.timeline.options import TimelineOptions
from pipeline.timeline.segment import ENVELOPE_S, Utterance, cut_utterances, fixed_utterances, margin_for, widen

OPTS = TimelineOptions(max_utterance_s=20.0, min_silence_s=0.5, pad_s=0.0)


def _envelope(duration_s: float, dips: tuple[float, ...] = ()) -> np.ndarray:
    env = np.full(int(np.ceil(duration_s / ENVELOPE_S)), 0.3, np.float32)
    for t in dips:
        env[int(t / ENVELOPE_S)] = 0.001
    return env


def _spans(utterances) -> list[tuple[float, float]]:
    return [(u.start_s, u.end_s) for u in utterances]


# ------------------------------------------------------------------------------------ segmentation

def test_pauses_shorter_than_min_silence_stay_inside_an_utterance():
    speech = [(1.0, 2.0), (2.3, 3.0), (5.0, 6.0)]
    got = cut_utterances(speech, [], _envelope(8), 8.0, OPTS)
    assert _spans(got) == [(1.0, 3.0), (5.0, 6.0)]
    assert [u.end_cut for u in got] == ["pause", "pause"]


def test_long_speech_is_split_at_its_longest_pause_not_at_a_fixed_length():
    # 30 s of speech with pauses of 0.3 s at 12 s and 0.2 s at 16 s (both shorter than min_silence)
    speech = [(0.0, 12.0), (12.3, 16.0), (16.2, 30.0)]
    got = cut_utterances(speech, [], _envelope(30), 30.0, OPTS)
    assert _spans(got) == [(0.0, 12.0), (12.3, 30.0)]
    assert got[0].end_cut == "split-pause"
    assert all(u.duration_s <= OPTS.max_utterance_s for u in got)


def test_long_speech_without_a_pause_is_split_between_asr_segments_else_at_its_quietest():
    speech = [(0.0, 30.0)]
    by_asr = cut_utterances(speech, [(0.0, 13.46), (13.46, 30.0)], _envelope(30, dips=(13.45,)), 30.0, OPTS)
    assert _spans(by_asr) == [(0.0, 13.46), (13.46, 30.0)] and by_asr[0].end_cut == "split-asr"
    quiet = cut_utterances(speech, [], _envelope(30, dips=(17.23,)), 30.0, OPTS)
    assert quiet[0].end_cut == "split-quiet" and abs(quiet[0].end_s - 17.25) < 1e-6
    # an hour of unbroken speech: every piece within the limit and at least half of it (but the last)
    hour = cut_utterances([(0.0, 3600.0)], [], _envelope(3600), 3600.0, OPTS)
    assert all(10.0 - 1e-6 <= u.duration_s <= 20.0 + 1e-6 for u in hour[:-1])
    assert hour[0].start_s == 0.0 and hour[-1].end_s == 3600.0
    assert all(a.end_s == b.start_s for a, b in zip(hour, hour[1:]))  # nothing between pieces is lost


def test_speech_only_whisper_heard_is_an_utterance_too():
    got = cut_utterances([(1.0, 2.0)], [(1.1, 1.9), (5.0, 7.0)], _envelope(9), 9.0, OPTS)
    assert _spans(got) == [(1.0, 2.0), (5.0, 7.0)]


def test_padding_never_reaches_past_the_middle_of_a_pause_nor_the_recording():
    opts = TimelineOptions(pad_s=0.5, min_silence_s=0.5)
    got = cut_utterances([(0.2, 2.0), (2.6, 4.0), (9.0, 9.9)], [], _envelope(10), 10.0, opts)
    assert _spans(got) == [(0.0, 2.3), (2.3, 4.5), (8.5, 10.0)]


def test_the_margin_follows_the_training_clips_and_never_reaches_a_neighbour():
    """Audio features pool silence too, so each utterance is extracted with as much recording around its
    speech as the model's training clips had (half their median non-speech time a side), never past the
    middle of the pause to a neighbour, nor outside the recording; the reported boundaries do not move."""
    opts = TimelineOptions()  # pad 0.1 s
    meta = {"clips": {"clips": 1440, "median_non_speech_s": 1.8}}
    assert margin_for(meta, opts)[0] == 0.9 and "training clips" in margin_for(meta, opts)[1]
    assert margin_for({"clips": {"median_non_speech_s": 9.0}}, opts)[0] == 1.5  # capped
    assert margin_for({"clips": {"median_non_speech_s": 0.05}}, opts)[0] == opts.pad_s  # never under the pad
    assert margin_for({}, opts) == (opts.pad_s, margin_for({}, opts)[1])  # older checkpoints: the pad alone
    assert margin_for(meta, TimelineOptions(margin_s=0.3))[0] == 0.3  # the caller's choice wins
    with pytest.raises(ConfigError):
        TimelineOptions(margin_s=2.0)
    utts = [Utterance(1.0, 2.0, "pause"), Utterance(2.4, 5.0, "split-pause"), Utterance(5.0, 6.0, "pause"),
            Utterance(9.0, 9.8, "pause")]
    got = widen(utts, margin_s=1.0, pad_s=0.1, duration_s=10.0)
    # 0.9 s more a side, but: 0 at the start; the middle of 2.0-2.4 between the first two; the shared 5.0
    # of a split; the middle of 6.0-9.0; the end of the recording
    assert got == [(0.1, 2.2), (2.2, 5.0), (5.0, 6.9), (8.1, 10.0)]
    assert widen(utts, margin_s=0.1, pad_s=0.1, duration_s=10.0) == [(u.start_s, u.end_s) for u in utts]


def test_training_records_how_much_silence_its_clips_held():
    from types import SimpleNamespace

    from comp.train import clip_summary

    data = SimpleNamespace(status=np.array(["ok", "ok", "ok", "error"]), duration_s=np.array([4.0, 3.0, 2.0, 9.0]),
                           diagnostics={"speech_ratio": np.array([0.5, 0.0, 0.75, 0.1])})
    # 2.0 and 0.5 s of non-speech (a clip with no speech heard and an error row left out)
    assert clip_summary(data) == {"clips": 3, "median_duration_s": 3.0, "median_non_speech_s": 1.25}
    assert "median_non_speech_s" not in clip_summary(SimpleNamespace(**{**vars(data), "diagnostics": {}}))


def test_fixed_pieces_only_for_recordings_without_audio():
    assert _spans(fixed_utterances(25.0, 10.0)) == [(0.0, 10.0), (10.0, 20.0), (20.0, 25.0)]
    assert _spans(fixed_utterances(22.0, 10.0)) == [(0.0, 10.0), (10.0, 22.0)]  # a 2 s tail joins the last
    assert _spans(fixed_utterances(3.0, 10.0)) == [(0.0, 3.0)]


class _BlockASR:
    """An ASR stand-in that records the audio it is handed and reports as speech every 10 ms louder than
    -26 dBFS, in the block's own time (as the real extractor does)."""

    def __init__(self) -> None:
        self.blocks: list[int] = []  # samples per block, in order

    def extract(self, clips):
        from extractors.asr import RESULT_KEY, ASRResult

        for clip in clips:
            self.blocks.append(len(clip.audio))
            frame = 160
            n = len(clip.audio) // frame
            loud = np.sqrt(np.mean(clip.audio[: n * frame].reshape(n, frame) ** 2, axis=1)) > 0.05
            edges = np.flatnonzero(np.diff(np.concatenate([[0], loud.astype(np.int8), [0]])))
            clip.shared[RESULT_KEY] = ASRResult(speech=[(a * 0.01, b * 0.01) for a, b in edges.reshape(-1, 2)])
        return [None] * len(clips)


def test_a_long_recording_is_transcribed_block_by_block_and_nothing_is_lost_between_blocks(tmp_path):
    """What keeps an hour within memory: the audio reaches the ASR in blocks of at most asr_block_s, cut in
    pauses, back to back; speech found in a block lands at its time in the recording."""
    from types import SimpleNamespace

    from core.clip import SAMPLE_RATE
    from pipeline.timeline.speech import find_speech

    rng = np.random.default_rng(3)
    truth, parts, t = [], [], 0.0
    while t < 150.0:  # bursts of 1.2-2.5 s of tone between pauses of 0.6-1.4 s, AAC in an m4a
        pause, burst = rng.uniform(0.6, 1.4), rng.uniform(1.2, 2.5)
        parts.append(media.noise(pause, level=0.002, seed=len(parts)))
        tone = np.arange(int(burst * SAMPLE_RATE)) / SAMPLE_RATE
        parts.append((0.3 * np.sin(2 * np.pi * 220 * tone)).astype(np.float32))
        truth.append((t + pause, t + pause + burst))
        t += pause + burst
    parts.append(media.silence(1.0))
    audio = np.concatenate(parts)
    path = media.write_clip(tmp_path / "long.m4a", audio=audio, frames=None)
    asr = _BlockASR()
    got = find_speech(SimpleNamespace(extractors={"asr": asr}), path,
                      TimelineOptions(asr_block_s=60.0, block_search_s=10.0))

    assert len(asr.blocks) == 3 and max(asr.blocks) <= 60 * SAMPLE_RATE
    assert abs(sum(asr.blocks) - len(audio)) <= 0.05 * SAMPLE_RATE  # back to back, none decoded twice
    assert len(got.envelope) == pytest.approx(len(audio) / SAMPLE_RATE / ENVELOPE_S, abs=2)
    cuts = np.cumsum(asr.blocks[:-1]) / SAMPLE_RATE
    assert not any(a - 0.05 < c < b + 0.05 for c in cuts for a, b in truth)  # no burst is cut in two
    assert len(got.speech) == len(truth)
    for (a, b), (fa, fb) in zip(truth, got.speech):
        assert abs(fa - a) < 0.05 and abs(fb - b) < 0.05


def test_options_reject_unknown_keys_and_bad_values():
    assert TimelineOptions.from_mapping({"max_utterance_s": 12}).max_utterance_s == 12.0
    with pytest.raises(ConfigError, match="unknown key.*max_utterance"):
        TimelineOptions.from_mapping({"max_utterance": 12})
    with pytest.raises(ConfigError):
        TimelineOptions(max_utterance_s=0.5)
    with pytest.raises(ConfigError):
        TimelineOptions(min_silence_s=30.0)


# ------------------------------------------------------------------------------------ context

def _meta(conversations=None, max_len=150) -> dict:
    meta = {"train_config": {"model": {"max_len": max_len}}, "metrics": {"fold": "split"}}
    if conversations is not None:
        meta["conversations"] = conversations
    return meta


def test_context_is_used_only_for_models_trained_on_conversations(tmp_path):
    single = plan_context(_meta({"conversations": 40, "utterances": 40, "longest": 1, "multi_utterance": 0}))
    assert not single.used and single.max_len == 1 and "one-utterance" in single.why
    unknown = plan_context(_meta(), tmp_path / "best.pt")
    assert not unknown.used and "does not record" in unknown.why
    multi = plan_context(_meta({"conversations": 10, "utterances": 400, "longest": 110, "multi_utterance": 10}))
    assert multi.used and multi.max_len == 110 and "110" in multi.why
    capped = plan_context(_meta({"conversations": 10, "utterances": 400, "longest": 300, "multi_utterance": 10},
                                max_len=150))
    assert capped.used and capped.max_len == 150
    # older checkpoints: the split sizes comp-train wrote beside them
    (tmp_path / "metrics.json").write_text(json.dumps(
        {"splits": {"split": {"train": {"clips": 60, "conversations": 6}}}}))
    old = plan_context(_meta(max_len=65), tmp_path / "best.pt")
    assert old.used and old.max_len == 65 and "metrics.json" in old.why


def test_sliding_windows_cover_every_utterance_with_the_most_context():
    assert sliding_windows(0, 4) == [] and sliding_windows(3, 4) == [(0, 3)]
    for n, size in [(5, 2), (10, 4), (11, 4), (150, 150), (151, 150), (1000, 110)]:
        windows = sliding_windows(n, size)
        assert all(b - a == size for a, b in windows) and windows[0][0] == 0 and windows[-1][1] == n
        owner = window_owner(windows, n)
        for i, w in enumerate(owner):
            a, b = windows[w]
            assert a <= i < b
            margin = min(i - a if a else n, b - 1 - i if b < n else n)
            for a2, b2 in windows:  # no other window gives the utterance more context on its short side
                if a2 <= i < b2:
                    assert min(i - a2 if a2 else n, b2 - 1 - i if b2 < n else n) <= margin
    assert window_owner(sliding_windows(10, 4), 10) == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]


# ------------------------------------------------------------------------------------ end to end

LABELS = ("happy", "sad")
DELIVERY = {"happy": dict(pitch=75, speed=185, amplitude=130), "sad": dict(pitch=25, speed=120, amplitude=70)}
TEXT = {"happy": ("What a lovely surprise!", "We won, this is amazing!", "I love it, thank you!",
                  "Great news for all of us!"),
        "sad": ("I miss her so much.", "Nobody came today.", "Everything feels empty.", "I lost my best friend.")}
SPLITS = ("train", "train", "val", "test")
# the recording: (label, sentence index, face shown?, pause after it in seconds)
SCRIPT = (("happy", 0, True, 1.2), ("sad", 1, True, 1.5), ("happy", 2, False, 1.0), ("sad", 2, True, 1.3),
          ("happy", 1, True, 0.8))


def _look(label: str, k: int) -> np.ndarray:
    return media.face_image("astronaut") if label == "happy" else media.face_image("lfw", index=k + 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Eight clips in four two-utterance conversations -> comp-extract (offline) -> comp-train (small)."""
    from pipeline.cli import extract as extract_cli
    from pipeline.cli import train as train_cli

    root = tmp_path_factory.mktemp("timeline")
    clips = root / "clips"
    rows = ["path,label,conversation,position,split"]
    for k in range(4):
        for pos, label in enumerate(LABELS if k % 2 == 0 else LABELS[::-1]):
            name = f"{label}{k}.mp4"
            media.make_clip(clips / name, text=TEXT[label][k], image=_look(label, k), **DELIVERY[label])
            rows.append(f"{name},{label},c{k},{pos},{SPLITS[k]}")
    (clips / "manifest.csv").write_text("\n".join(rows) + "\n")
    feats = root / "feats.h5"
    assert extract_cli.main([str(clips), "--manifest", str(clips / "manifest.csv"), "--preset", "offline",
                             "--out", str(feats), "--device", "cpu", "-q"]) == 0
    run = root / "run"
    assert train_cli.main([str(feats), "--out", str(run), "--preset", "small", "--seeds", "1", "--no-baselines",
                           "--device", "cpu", "-q"]) == 0
    turns = [media.Turn(TEXT[label][k], _look(label, k) if face else media.no_face_image(), pause, **DELIVERY[label])
             for label, k, face, pause in SCRIPT]
    recording = root / "recording.mp4"
    spans = media.write_conversation(recording, turns)
    return {"root": root, "run": run, "recording": recording, "spans": spans}


@pytest.fixture(scope="module")
def timeline(trained) -> dict:
    """comp-predict --timeline --plot on the recording, the model's forward passes counted and the
    utterances' extracted records kept."""
    from pipeline.cli import predict as cli
    from pipeline.cli.progress import TqdmProgress
    from pipeline.predict import Predictor

    lengths: list[int] = []
    records: list = []
    forward, predict_record = Predictor.conversation_logits, Predictor.predict_record
    mp = pytest.MonkeyPatch()

    def counted(self, batch):
        lengths.append(int(batch.valid.shape[1]))
        return forward(self, batch)

    def kept(self, record, **kwargs):
        records.append(record)
        return predict_record(self, record, **kwargs)

    progress: list[tuple[str, int, int]] = []
    bar_call = TqdmProgress.__call__

    def seen(self, stage, done, total, detail=""):
        progress.append((stage, done, total))
        return bar_call(self, stage, done, total, detail)

    mp.setattr(Predictor, "conversation_logits", counted)
    mp.setattr(Predictor, "predict_record", kept)
    mp.setattr(TqdmProgress, "__call__", seen)
    out, plot = trained["root"] / "timeline.json", trained["root"] / "timeline.png"
    try:
        code = cli.main([str(trained["recording"]), "--model", str(trained["run"]), "--timeline", "--plot", str(plot),
                         "--out", str(out), "--device", "cpu", "-q"])
    finally:
        mp.undo()
    return {"code": code, "result": json.loads(out.read_text(encoding="utf-8")), "plot": plot, "lengths": lengths,
            "records": records, "progress": progress}


@pytest.fixture(scope="module")
def single(trained, tmp_path_factory) -> Path:
    """The same weights in a checkpoint that says it was trained on one-utterance conversations."""
    from comp.checkpoint import load_checkpoint, save_checkpoint

    state, meta = load_checkpoint(trained["run"] / "best.pt")
    meta["conversations"] = {"conversations": 8, "utterances": 8, "longest": 1, "multi_utterance": 0}
    return save_checkpoint(tmp_path_factory.mktemp("single") / "best.pt", state, meta)


@pytest.mark.slow
def test_utterance_boundaries_follow_the_speech(trained, timeline):
    assert timeline["code"] == 0
    got = [(u["start"], u["end"]) for u in timeline["result"]["utterances"]]
    truth = trained["spans"]
    assert len(got) == len(truth), (got, truth)
    for (a, b), (ta, tb) in zip(got, truth):
        assert abs(a - ta) <= 0.3 and abs(b - tb) <= 0.3, (got, truth)
    assert timeline["result"]["segmentation"]["from"] == "speech"


@pytest.mark.slow
def test_each_utterance_gets_the_label_it_was_spoken_with(timeline):
    rows = timeline["result"]["utterances"]
    assert [u["prediction"]["label"] for u in rows] == [label for label, *_ in SCRIPT]
    for u in rows:
        assert set(u["prediction"]["probs"]) == set(LABELS)
        assert u["prediction"]["probs"][u["prediction"]["label"]] > 0.5
        assert u["transcript"].strip()


@pytest.mark.slow
def test_a_model_trained_on_conversations_predicts_the_recording_as_one_in_windows(timeline):
    result = timeline["result"]
    context = result["context"]
    # trained on conversations of two utterances: windows of two, half a window apart, over five utterances
    assert context["used"] and context["max_len"] == 2 and context["windows"] == 4, context
    assert "4 conversations" in context["why"] and "multi-utterance" in context["why"]
    assert timeline["lengths"] == [2, 2, 2, 2]  # the model ran on each window as one conversation, nothing alone


@pytest.mark.slow
def test_utterances_are_extracted_with_the_margin_their_training_clips_had(trained, timeline):
    from comp.checkpoint import load_checkpoint

    _, meta = load_checkpoint(trained["run"] / "best.pt")
    seg = timeline["result"]["segmentation"]
    assert seg["margin_s"] == margin_for(meta, TimelineOptions())[0] and "training clips" in seg["margin_why"]
    assert meta["clips"]["clips"] == 8 and meta["clips"]["median_non_speech_s"] > 0
    # the records the model saw are longer than the reported utterances by that margin, where there was room
    durations = [r.duration_s for r in timeline["records"]]
    reported = [u["end"] - u["start"] for u in timeline["result"]["utterances"]]
    assert all(d >= r - 0.05 for d, r in zip(durations, reported)) and sum(durations) > sum(reported) + 0.5


@pytest.mark.slow
def test_a_missing_modality_is_reported_with_its_reason(timeline):
    rows = timeline["result"]["utterances"]
    faceless = rows[2]
    # no face in the turn; its margin may hold a frame of the previous speaker's face, too few to count
    assert not faceless["modalities"]["visual"]["present"]
    assert faceless["modalities"]["visual"]["reason"].startswith(("no-face", "too-few-face-frames"))
    assert faceless["modalities"]["audio"]["present"] and faceless["modalities"]["text"]["present"]
    assert faceless["prediction"] is not None and "error" not in faceless
    assert all(u["modalities"]["visual"]["present"] for k, u in enumerate(rows) if k != 2)


@pytest.mark.slow
def test_cli_json_table_and_plot(timeline):
    from pipeline.cli.predict import format_timeline_table

    result = timeline["result"]
    assert set(result) >= {"clip", "duration_s", "context", "utterances", "model", "version"}
    assert 15.0 < result["duration_s"] < 16.0
    assert result["model"]["task"] == "classification"
    table = format_timeline_table(result).splitlines()
    assert "5 utterances" in table[0] and "context used" in table[0]
    assert table[1].split()[:4] == ["start", "end", "prediction", "p"]
    body = table[3:]
    assert len(body) == 5
    assert "no: no-face" in body[2] or "no: too-few-face-frames" in body[2]
    assert body[0].split()[:3] == [f"{result['utterances'][0]['start']:.2f}",
                                   f"{result['utterances'][0]['end']:.2f}", "happy"]
    assert timeline["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # progress: each stage in order, counting up to its total
    progress = timeline["progress"]
    stages = [s for k, (s, _, _) in enumerate(progress) if k == 0 or progress[k - 1][0] != s]
    assert stages == ["decode", "asr", "utterances", "model"]
    last = {s: (d, t) for s, d, t in progress}
    assert last["asr"] == (16, 16) and last["utterances"] == (5, 5) and last["model"] == (4, 4)


@pytest.mark.slow
def test_a_model_trained_on_single_utterances_predicts_each_alone(single, timeline):
    from pipeline.predict import Predictor
    from pipeline.timeline.context import plan_context
    from pipeline.timeline.run import _predict

    predictor = Predictor.from_checkpoint(single, device="cpu")
    plan = plan_context(predictor.meta, predictor.checkpoint)
    assert not plan.used and "one-utterance" in plan.why
    lengths: list[int] = []
    forward = predictor.conversation_logits
    predictor.conversation_logits = lambda batch: lengths.append(int(batch.valid.shape[1])) or forward(batch)
    records = timeline["records"]
    assert len(records) == 5
    predictions, windows = _predict(predictor, records, plan, lambda *a: None)
    assert windows == 0 and lengths == [1] * 5  # every utterance alone
    alone = [p.prediction["probs"] for p in predictions]
    with_context = [u["prediction"]["probs"] for u in timeline["result"]["utterances"]]
    assert any(abs(a["happy"] - c["happy"]) > 1e-6 for a, c in zip(alone, with_context))  # context acted


@pytest.mark.slow
def test_a_recording_without_audio_is_followed_by_its_face(trained, single, capsys):
    from pipeline.cli import predict as cli

    video = trained["root"] / "silent-film.mp4"
    media.write_conversation(video, [media.Turn("One two three.", _look("sad", 0), 20.0)], audio=False)
    code = cli.main([str(video), "--model", str(single), "--timeline", "--max-utterance", "10",
                     "--format", "table", "--device", "cpu", "-q"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].startswith(f"{video}: 2 utterances") and "context not used" in out[0]
    rows = out[3:]
    assert len(rows) == 2, out  # ~21.6 s in pieces of 10 s, the short tail joined to the last
    assert rows[0].split()[:2] == ["0.00", "10.00"] and rows[1].split()[0] == "10.00"
    for row in rows:
        assert "no: no-audio-stream" in row and "no: no-audio: no-audio-stream" in row
        assert row.split()[2] in LABELS
