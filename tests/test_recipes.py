"""comp-prepare: dataset trees in their published layouts become manifests that comp-extract reads."""

import csv

import pytest
from fake_extractors import fake_config_dict

from pipeline.cli.prepare import main as prepare_main
from pipeline.inputs import read_manifest
from pipeline.recipes import PrepareError, ravdess


def _touch(path, data=b"RIFF"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _rows(csv_path):
    with open(csv_path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def ravdess_tree(root, actors=(1, 2, 17, 21), kinds=("03",), channel="01"):
    """Every recording of the given actors in the release's folder layout, as empty stand-in files."""
    for a in actors:
        for emotion in range(1, 9):
            for intensity in ((1,) if emotion == 1 else (1, 2)):
                for statement in (1, 2):
                    for rep in (1, 2):
                        code = f"{channel}-{emotion:02d}-{intensity:02d}-{statement:02d}-{rep:02d}-{a:02d}"
                        for kind in kinds:
                            ext = "wav" if kind == "03" else "mp4"
                            folder = (root / "Audio_Speech_Actors_01-24" if kind == "03"
                                      else root / f"Video_Speech_Actor_{a:02d}") / f"Actor_{a:02d}"
                            _touch(folder / f"{kind}-{code}.{ext}")
    return root


def test_ravdess_codes_become_labels_speakers_splits_and_folds(tmp_path):
    """Each file-name field lands in its column: emotion, actor, actor-independent split and fold, intensity."""
    prepared = ravdess.prepare(ravdess_tree(tmp_path))
    rows = {r.id: r for r in prepared.rows}
    assert len(rows) == 4 * 60 and not prepared.skipped and not prepared.notes[1:]
    r = rows["03-01-04-02-01-02-17"]
    assert (r.label, r.speaker, r.split, r.fold) == ("sad", "Actor_17", "val", 5)
    assert r.meta == {"intensity": "strong", "statement": "Kids are talking by the door", "repetition": "02",
                      "channel": "speech", "sex": "male"}
    assert r.path == "Audio_Speech_Actors_01-24/Actor_17/03-01-04-02-01-02-17.wav"
    assert {rows[i].split for i in rows if i.endswith("-01")} == {"train"}
    assert {rows[i].split for i in rows if i.endswith("-21")} == {"test"}
    assert {rows[i].fold for i in rows if i.endswith("-21")} == {6}
    labels = {r.label for r in prepared.rows}
    assert labels == set(ravdess.EMOTIONS.values())
    assert sum(r.label == "neutral" for r in prepared.rows) == 4 * 4  # neutral has no strong intensity


def test_ravdess_prefers_audio_visual_then_video_with_separate_audio(tmp_path):
    """auto takes 01 (audio-visual); without it the video-only 02 with the 03 wav as audio_path; --media audio
    takes only wavs."""
    ravdess_tree(tmp_path / "av", actors=(3,), kinds=("01", "02", "03"))
    rows = ravdess.prepare(tmp_path / "av").rows
    assert all(r.id.startswith("01-") and r.path.endswith(".mp4") and not r.audio_path for r in rows)
    ravdess_tree(tmp_path / "split", actors=(3,), kinds=("02", "03"))
    rows = ravdess.prepare(tmp_path / "split").rows
    assert all(r.path.split("/")[-1].startswith("02-") and r.audio_path.split("/")[-1].startswith("03-")
               and r.audio_path.endswith(r.path.split("/")[-1][3:-4] + ".wav") for r in rows)
    rows = ravdess.prepare(tmp_path / "av", media="audio").rows
    assert len(rows) == 60 and all(r.path.endswith(".wav") for r in rows)


def test_ravdess_media_kind_absent_is_listed_not_fatal(tmp_path):
    """--media video on a tree where one recording has only its wav: that one is skipped with the reason."""
    ravdess_tree(tmp_path, actors=(3,), kinds=("02",))
    _touch(tmp_path / "extra" / "03-01-05-01-01-01-04.wav")
    prepared = ravdess.prepare(tmp_path, media="video")
    assert len(prepared.rows) == 60
    assert [(s.id, s.reason) for s in prepared.skipped] == [("01-05-01-01-01-04", "no video file (has: audio)")]
    assert any(n.startswith("no speech recordings of actor(s) 01, 02, 04, 05") for n in prepared.notes)
    assert ravdess.prepare(tmp_path, media="auto").notes[0] == "Actor_04: 1 of 60 speech recordings"


def test_ravdess_song_is_its_own_channel(tmp_path):
    """Song files (vocal channel 02) are left out of the default speech manifest and kept with channel=song."""
    ravdess_tree(tmp_path, actors=(5,), channel="02")
    with pytest.raises(PrepareError, match="no RAVDESS speech recording"):
        ravdess.prepare(tmp_path)
    assert {r.meta["channel"] for r in ravdess.prepare(tmp_path, channel="song").rows} == {"song"}


def test_not_a_ravdess_tree_is_one_clear_sentence(tmp_path):
    """A folder without RAVDESS-coded files names what it looked for."""
    _touch(tmp_path / "clips" / "happy_01.wav")
    with pytest.raises(PrepareError, match="Actor_XX"):
        ravdess.prepare(tmp_path)
    with pytest.raises(PrepareError, match="not a folder"):
        ravdess.prepare(tmp_path / "nope")


def test_comp_prepare_writes_a_manifest_comp_extract_reads(tmp_path, capsys):
    """The CSV lists the used columns plus meta_*; pipeline.inputs reads it back with paths under ROOT."""
    root = ravdess_tree(tmp_path / "RAVDESS", actors=(1, 24))
    out = tmp_path / "clips.csv"
    assert prepare_main(["ravdess", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "120 clips" in printed and "train 60" in printed and "test 60" in printed
    rows = _rows(out)
    assert list(rows[0])[:6] == ["path", "id", "label", "speaker", "split", "fold"]
    assert "meta_intensity" in rows[0] and "audio_path" not in rows[0]
    items = read_manifest(out, root)
    assert len(items) == 120 and all(i.path.is_file() for i in items)
    item = next(i for i in items if i.id == "03-01-08-02-02-02-24")
    assert (item.label, item.speaker, item.split, item.fold) == ("surprised", "Actor_24", "test", 6)


def test_comp_prepare_exits_2_with_the_reason(tmp_path, capsys):
    """A wrong tree: exit status 2 and the sentence on stderr, no manifest written."""
    (tmp_path / "empty").mkdir()
    out = tmp_path / "clips.csv"
    assert prepare_main(["ravdess", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "no RAVDESS speech recording" in capsys.readouterr().err
    assert not out.exists()


def test_prepared_ravdess_extracts_and_trains_actor_independently(tmp_path):
    """Generated speech in a RAVDESS tree → comp-prepare → comp-extract (fake extractors) → a store whose
    split keeps the test actors out of training and whose validation actors are held out by speaker."""
    import yaml

    from comp.config import TrainConfig
    from comp.data import plan_folds
    from pipeline.cli.extract import main as extract_main
    from pipeline.media import noise, write_clip
    from pipeline.store import read_store

    root = tmp_path / "RAVDESS"
    for a in (1, 2, 3, 9, 17, 21):
        for emotion in (1, 3):
            path = root / f"Actor_{a:02d}" / f"03-01-{emotion:02d}-01-01-01-{a:02d}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_clip(path, audio=noise(0.6, level=0.01 * emotion, seed=a), frames=None)
    manifest = tmp_path / "clips.csv"
    assert prepare_main(["ravdess", str(root), "--out", str(manifest), "-q"]) == 0
    config = tmp_path / "fake.yaml"
    config.write_text(yaml.safe_dump(fake_config_dict()), encoding="utf-8")
    store = tmp_path / "feats.h5"
    assert extract_main([str(root), "--manifest", str(manifest), "--out", str(store), "--config", str(config),
                         "-q"]) == 0
    data = read_store(store)
    assert sorted(set(data.label.astype(str))) == ["happy", "neutral"]
    assert set(data.speaker.astype(str)) == {f"Actor_{a:02d}" for a in (1, 2, 3, 9, 17, 21)}
    plan, = plan_folds(data, TrainConfig(plan="split"))
    ids = dict(zip(data.conversation.astype(str), data.speaker.astype(str)))
    assert {ids[c] for c in plan.test} == {"Actor_21"} and {ids[c] for c in plan.val} == {"Actor_17"}
    folds = plan_folds(data, TrainConfig(plan="folds", val_fraction=0.3))
    for p in folds:
        assert not {ids[c] for c in p.val} & {ids[c] for c in p.train}
