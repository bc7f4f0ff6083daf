"""examples/make_corpus.py: the generated demo corpus (manifest, labels, splits, deliberately missing modalities)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.decode import decode_clip, probe

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load_make_corpus():
    spec = importlib.util.spec_from_file_location("make_corpus", EXAMPLES / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_corpus"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


make_corpus = _load_make_corpus()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[dict[str, str]]]:
    """4 classes x 4 clips: enough for train/val/test in every class and each missing kind in test."""
    out = tmp_path_factory.mktemp("corpus")
    assert make_corpus.main([str(out), "--n-per-class", "4", "--seed", "3"]) == 0
    with open(out / "manifest.csv", newline="") as fh:
        return out, list(csv.DictReader(fh))


def _rows(rows, kind):
    return [r for r in rows if r["id"].endswith("_" + kind)]


def test_manifest_lists_every_clip_with_label_split_and_conversation(corpus):
    """manifest.csv has one row per class x clip, with an existing path, a known label and a split."""
    out, rows = corpus
    assert len(rows) == 4 * 4
    assert list(rows[0]) == ["path", "id", "label", "split", "conversation"]
    assert {r["label"] for r in rows} == set(make_corpus.CLASSES)
    assert len({r["id"] for r in rows}) == len(rows)
    assert all((out / r["path"]).is_file() for r in rows)
    assert all(r["conversation"] == r["id"] for r in rows)


def test_every_class_has_train_val_and_test_clips(corpus):
    """Each class is split into train, val and test, so the test clips are held out for prediction."""
    _, rows = corpus
    for label in make_corpus.CLASSES:
        assert {r["split"] for r in rows if r["label"] == label} == {"train", "val", "test"}


def test_default_size_puts_each_missing_kind_in_train_and_test():
    """With the default 12 clips per class, train and test both contain every kind of missing modality."""
    splits = make_corpus._splits(12)
    kinds = {"train": set(), "test": set()}
    for c in range(len(make_corpus.CLASSES)):
        for split, missing in zip(splits, make_corpus._missing_plan(splits, c)):
            if missing and split in kinds:
                kinds[split].add(missing)
    assert kinds == {"train": set(make_corpus.MISSING_KINDS), "test": set(make_corpus.MISSING_KINDS)}


def test_noaudio_clips_really_have_no_audio_track(corpus):
    """Clips marked noaudio have a video stream and no audio stream."""
    out, rows = corpus
    clips = _rows(rows, "noaudio")
    assert clips
    for r in clips:
        info = probe(out / r["path"])
        assert info["has_video"] and not info["has_audio"]


def test_silent_clips_have_an_audio_track_with_only_silence(corpus):
    """Clips marked silent carry an audio track whose samples are all (near) zero."""
    out, rows = corpus
    clips = _rows(rows, "silent")
    assert clips
    for r in clips:
        clip = decode_clip(out / r["path"], r["id"])
        assert clip.audio is not None and clip.audio.size > 16000
        assert float(np.abs(clip.audio).max()) < 1e-3


def test_noface_clips_show_no_face_and_the_others_do(corpus):
    """The Haar detector finds no face in noface clips and a face in every sampled frame of a complete clip."""
    from extractors.faces import HaarConfig, build_detector

    detector = build_detector("haar", HaarConfig())
    out, rows = corpus
    noface = _rows(rows, "noface")
    assert noface
    for r in noface:
        frames = decode_clip(out / r["path"], r["id"]).frames
        assert frames is not None and all(len(detector.detect(f)) == 0 for f in frames)
    for r in [r for r in rows if not r["id"].rsplit("_", 1)[-1].isalpha()]:  # complete clips end in a number
        frames = decode_clip(out / r["path"], r["id"]).frames
        assert all(len(detector.detect(f)) >= 1 for f in frames), r["id"]


def test_complete_clips_carry_speech_of_two_to_four_seconds(corpus):
    """Complete clips have an audible speech track and last 2-4 s (loud enough for ASR)."""
    out, rows = corpus
    complete = [r for r in rows if not r["id"].rsplit("_", 1)[-1].isalpha()]
    for r in complete:
        clip = decode_clip(out / r["path"], r["id"])
        assert 2.0 <= clip.duration_s <= 4.2
        assert float(np.sqrt(np.mean(clip.audio ** 2))) > 0.01


def test_delivery_differs_by_class(corpus):
    """Sad speech is slower and quieter than angry speech (the class shows in the voice, by design)."""
    out, rows = corpus
    info = json.loads((out / "corpus.json").read_text())
    assert info["seed"] == 3
    rms = {}
    for label in ("sad", "angry"):
        clips = [r for r in rows if r["label"] == label and not r["id"].rsplit("_", 1)[-1].isalpha()]
        rms[label] = np.mean([np.sqrt(np.mean(decode_clip(out / r["path"], r["id"]).audio ** 2)) for r in clips])
    assert rms["sad"] < rms["angry"]


def test_same_seed_gives_the_same_corpus_and_another_seed_does_not(corpus, tmp_path):
    """Generation is deterministic by seed: same manifest, sentences and audio; a new seed changes them."""
    out, rows = corpus
    again = make_corpus.make_corpus(tmp_path / "again", n_per_class=4, seed=3)
    assert [(c.id, c.label, c.split, c.text) for c in again] == \
        [(c["id"], c["label"], c["split"], c["text"]) for c in json.loads((out / "corpus.json").read_text())["clips"]]
    first = rows[2]
    a = decode_clip(out / first["path"], first["id"]).audio
    b = decode_clip(tmp_path / "again" / first["path"], first["id"]).audio
    assert a is not None and np.array_equal(a, b)
    other = make_corpus.make_corpus(tmp_path / "other", n_per_class=4, seed=4)
    assert [c.text for c in other] != [c.text for c in again]


def test_corpus_is_complete_detects_a_finished_corpus_only(corpus, tmp_path):
    """The demo's skip check accepts the finished corpus and rejects other arguments or a lost clip."""
    out, rows = corpus
    assert make_corpus.corpus_is_complete(out, n_per_class=4, seed=3)
    assert not make_corpus.corpus_is_complete(out, n_per_class=4, seed=9)
    assert not make_corpus.corpus_is_complete(tmp_path, n_per_class=4, seed=3)
