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
    from demo.media import noise, write_clip
    from pipeline.cli.extract import main as extract_main
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


# ---------------------------------------------------------------------------------------------- CREMA-D

def test_cremad_names_become_labels_and_an_actor_independent_split(tmp_path):
    """ActorID_Sentence_Emotion_Level: six labels, speaker = actor, folds by actor, flv with the wav as audio."""
    from pipeline.recipes import cremad

    for actor in (1001, 1004, 1005, 1091):
        for emotion in cremad.EMOTIONS:
            _touch(tmp_path / "AudioWAV" / f"{actor}_DFA_{emotion}_XX.wav")
            if actor != 1091:
                _touch(tmp_path / "VideoFlash" / f"{actor}_DFA_{emotion}_XX.flv")
    (tmp_path / "VideoDemographics.csv").write_text("ActorID,Age,Sex,Race,Ethnicity\n1004,27,Female,Asian,Not\n")
    prepared = cremad.prepare(tmp_path)
    rows = {r.id: r for r in prepared.rows}
    assert len(rows) == 24 and {r.label for r in rows.values()} == set(cremad.EMOTIONS.values())
    r = rows["1004_DFA_HAP_XX"]
    assert (r.path, r.audio_path, r.speaker) == ("VideoFlash/1004_DFA_HAP_XX.flv", "AudioWAV/1004_DFA_HAP_XX.wav",
                                                 "1004")
    assert r.meta["sex"] == "female" and r.meta["level"] == "unspecified"
    assert (rows["1005_DFA_SAD_XX"].split, rows["1005_DFA_SAD_XX"].fold) == ("test", 5)
    assert (rows["1004_DFA_SAD_XX"].split, rows["1091_DFA_SAD_XX"].split) == ("val", "train")
    assert rows["1091_DFA_ANG_XX"].path == "AudioWAV/1091_DFA_ANG_XX.wav" and not rows["1091_DFA_ANG_XX"].audio_path
    assert prepared.notes == ["6 clip(s) have only their audio file"]
    video = cremad.prepare(tmp_path, media="video")
    assert len(video.rows) == 18 and {s.reason for s in video.skipped} == {"no video file (has: audio)"}


def test_cremad_wrong_tree_names_both_folders(tmp_path):
    """No AudioWAV/VideoFlash files: the sentence says which folders and which names it expected."""
    from pipeline.recipes import cremad

    (tmp_path / "AudioWAV").mkdir()
    with pytest.raises(PrepareError, match=r"AudioWAV/\*\.wav and/or VideoFlash/\*\.flv"):
        cremad.prepare(tmp_path)


# ------------------------------------------------------------------------------------------------- MELD

MELD_HEADER = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"


def meld_tree(root, drop=()):
    parts = {"train": "train_splits", "dev": "dev_splits_complete", "test": "output_repeated_splits_test"}
    for part, folder in parts.items():
        lines = [MELD_HEADER]
        for dia in (0, 1):
            for utt, (speaker, emotion, sentiment) in enumerate([("Joey", "joy", "positive"),
                                                                 ("Rachel", "anger", "negative"),
                                                                 ("Joey", "neutral", "neutral")]):
                lines.append(f'{len(lines)},"Oh, {part} {dia} {utt}",{speaker},{emotion},{sentiment},{dia},{utt},'
                             f"1,1,00:00:01,00:00:02\n")
                if (part, dia, utt) not in drop:
                    _touch(root / "MELD.Raw" / part / folder / f"dia{dia}_utt{utt}.mp4")
        _touch(root / "MELD.Raw" / part / f"{part}_sent_emo.csv", "".join(lines).encode())


def test_meld_dialogues_become_conversations_in_the_official_split(tmp_path):
    """conversation = split + dialogue, position = utterance, speaker = character, label = emotion or
    sentiment; an absent video is listed."""
    from pipeline.recipes import meld

    meld_tree(tmp_path, drop={("dev", 1, 2)})
    prepared = meld.prepare(tmp_path)
    rows = {r.id: r for r in prepared.rows}
    assert len(rows) == 17 and [s.id for s in prepared.skipped] == ["dev/dia1_utt2"]
    r = rows["test/dia1_utt1"]
    assert (r.conversation, r.position, r.speaker, r.label, r.split) == ("test/dia1", 1, "Rachel", "anger", "test")
    assert r.path == "MELD.Raw/test/output_repeated_splits_test/dia1_utt1.mp4"
    assert r.meta == {"transcript": "Oh, test 1 1", "sentiment": "negative"}
    assert rows["dev/dia0_utt0"].split == "val" and rows["train/dia0_utt0"].conversation == "train/dia0"
    assert {r.label for r in meld.prepare(tmp_path, label="sentiment").rows} == {"positive", "negative", "neutral"}


def test_meld_incomplete_tree_names_what_is_missing(tmp_path):
    from pipeline.recipes import meld

    meld_tree(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "MELD.Raw" / "dev" / "dev_splits_complete")
    (tmp_path / "MELD.Raw" / "test" / "test_sent_emo.csv").unlink()
    with pytest.raises(PrepareError, match="missing dev_splits_complete/, test_sent_emo.csv"):
        meld.prepare(tmp_path)


# ---------------------------------------------------------------------------------------------- IEMOCAP

def iemocap_tree(root, *, with_video=True):
    """Session1 with one dialogue Ses01F_impro01 (lead F) and Session2 with Ses02M_script01 (lead M)."""
    dialogues = {
        "Ses01F_impro01": [(8.5, 10.0, "Ses01F_impro01_M001", "exc"), (6.2901, 8.2357, "Ses01F_impro01_F000", "neu"),
                           (10.5, 12.0, "Ses01F_impro01_F001", "xxx"), (12.5, 14.0, "Ses01F_impro01_M002", "fru")],
        "Ses02M_script01": [(1.0, 2.5, "Ses02M_script01_F000", "ang"), (3.0, 4.0, "Ses02M_script01_M000", "sad")],
    }
    for dialogue, utts in dialogues.items():
        session = root / f"Session{dialogue[4]}"
        lines = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""]
        transcript = []
        for start, end, name, code in utts:
            lines += [f"[{start:.4f} - {end:.4f}]\t{name}\t{code}\t[2.5000, 2.5000, 2.5000]", "C-E2:\tNeutral;\t()", ""]
            transcript.append(f"{name} [{start:08.4f}-{end:08.4f}]: words of {name}.")
            _touch(session / "sentences" / "wav" / dialogue / f"{name}.wav")
        transcript.append("M: [BREATHING]")
        _touch(session / "dialog" / "EmoEvaluation" / f"{dialogue}.txt", "\n".join(lines).encode())
        _touch(session / "dialog" / "transcriptions" / f"{dialogue}.txt", "\n".join(transcript).encode())
        if with_video:
            _touch(session / "dialog" / "avi" / "DivX" / f"{dialogue}.avi")
    return root


def test_iemocap_utterances_are_segments_with_the_speakers_half_and_own_audio(tmp_path):
    """Each utterance: a [start, end] segment of its dialogue video, its sentence wav as audio, position by
    start time, speaker = session + letter, fold = session, the lead actor (the dialogue's letter) on the left."""
    from pipeline.recipes import iemocap

    prepared = iemocap.prepare(iemocap_tree(tmp_path / "IEMOCAP_full_release"))
    rows = {r.id: r for r in prepared.rows}
    assert list(rows) == ["Ses01F_impro01_F000", "Ses01F_impro01_M001", "Ses02M_script01_F000",
                          "Ses02M_script01_M000"]  # xxx and fru are outside the 4-class map
    r = rows["Ses01F_impro01_F000"]
    assert (r.start, r.end, r.position, r.speaker, r.fold, r.label) == (6.2901, 8.2357, 0, "Ses01F", 1, "neutral")
    assert r.path == "Session1/dialog/avi/DivX/Ses01F_impro01.avi"
    assert r.audio_path == "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav"
    assert r.meta["transcript"] == "words of Ses01F_impro01_F000."
    assert rows["Ses01F_impro01_M001"].label == "happy" and rows["Ses01F_impro01_M001"].position == 1
    assert (r.crop, rows["Ses01F_impro01_M001"].crop) == (iemocap.LEFT_HALF, iemocap.RIGHT_HALF)
    assert (rows["Ses02M_script01_M000"].crop, rows["Ses02M_script01_F000"].crop) == \
        (iemocap.LEFT_HALF, iemocap.RIGHT_HALF)


def test_iemocap_six_classes_and_unlabelled_context(tmp_path):
    """classes=6 keeps excited and frustrated apart; context=all keeps xxx as an unlabelled utterance."""
    from pipeline.recipes import iemocap

    root = iemocap_tree(tmp_path)
    six = {r.id: r.label for r in iemocap.prepare(root, classes=6).rows}
    assert six["Ses01F_impro01_M001"] == "excited" and six["Ses01F_impro01_M002"] == "frustrated"
    everything = {r.id: r for r in iemocap.prepare(root, context="all").rows}
    assert everything["Ses01F_impro01_F001"].label == "" and everything["Ses01F_impro01_F001"].position == 2


def test_iemocap_missing_videos_are_listed_and_no_session_is_an_error(tmp_path):
    from pipeline.recipes import iemocap

    prepared = iemocap.prepare(iemocap_tree(tmp_path / "a", with_video=False))
    assert not prepared.rows and len(prepared.skipped) == 4
    assert "Session1/dialog/avi/DivX/Ses01F_impro01.avi" in prepared.skipped[0].reason
    with pytest.raises(PrepareError, match="IEMOCAP_full_release"):
        iemocap.prepare(tmp_path / "a" / "Session1" / "dialog")


# ------------------------------------------------------------------------------------------------- MMSA

def mmsa_tree(root, header="video_id,clip_id,text,label,label_T,label_A,label_V,annotation,mode"):
    lines = [header,
             "03bSnISJMiM,11,a lot of sad parts,-1.8,,,,Negative,train",
             "03bSnISJMiM,2,this movie was great,2.4,,,,Positive,valid",
             "0h-zjBukYpk,1,it was okay,0.0,,,,Neutral,test",
             "0h-zjBukYpk,3,absent clip,1.0,,,,Positive,test"]
    _touch(root / "label.csv", ("\n".join(lines) + "\n").encode())
    for video, clip in (("03bSnISJMiM", 11), ("03bSnISJMiM", 2), ("0h-zjBukYpk", 1)):
        _touch(root / "Raw" / video / f"{clip}.mp4")
    return root


def test_mmsa_rows_are_regression_values_with_the_official_split(tmp_path):
    """value = label, conversation = video, position = clip number, valid → val; an absent mp4 is listed."""
    from pipeline.recipes import mmsa

    prepared = mmsa.prepare(mmsa_tree(tmp_path / "MOSI"), dataset="mosi")
    rows = {r.id: r for r in prepared.rows}
    assert list(rows) == ["03bSnISJMiM_11", "03bSnISJMiM_2", "0h-zjBukYpk_1"]
    r = rows["03bSnISJMiM_2"]
    assert (r.value, r.conversation, r.position, r.split, r.speaker) == (2.4, "03bSnISJMiM", 2, "val", "03bSnISJMiM")
    assert r.path == "Raw/03bSnISJMiM/2.mp4" and r.meta["transcript"] == "this movie was great"
    assert rows["0h-zjBukYpk_1"].value == 0.0  # a zero label is a value, not "unlabelled"
    assert [s.id for s in prepared.skipped] == ["0h-zjBukYpk_3"]


def test_mmsa_sims_warns_about_range_and_language(tmp_path):
    """CH-SIMS: no speaker, values outside [-1, 1] noted, and the text-encoder advice."""
    from pipeline.recipes import mmsa

    prepared = mmsa.prepare(mmsa_tree(tmp_path), dataset="sims")
    assert all(r.speaker == "" for r in prepared.rows)
    assert any("outside [-1, 1]" in n for n in prepared.notes) and any("Mandarin" in n for n in prepared.notes)


def test_mmsa_missing_columns_are_named(tmp_path):
    from pipeline.recipes import mmsa

    mmsa_tree(tmp_path, header="video_id,clip,text,label,label_T,label_A,label_V,annotation,mode")
    with pytest.raises(PrepareError, match="missing column.*clip_id"):
        mmsa.prepare(tmp_path)
    with pytest.raises(PrepareError, match="no label.csv"):
        mmsa.prepare(tmp_path / "Raw")


def test_every_dataset_has_a_recipe_and_a_command():
    """comp-prepare lists exactly the registered recipes."""
    from pipeline.cli.prepare import DATASETS
    from pipeline.recipes import recipes

    assert set(DATASETS) == set(recipes()) == {"ravdess", "cremad", "meld", "iemocap", "mosi", "mosei", "sims"}
