"""comp-predict's console surface without real models: the table, the progress bar, and what --model says
when it is given something that is not a model. (The real-model behaviour is in test_predict.py.)"""

from __future__ import annotations

import io
import os
import pickle
import sys

import pytest
import torch

from pipeline.cli import predict as cli
from pipeline.cli.predict import display_names, format_table


def _result(clip: str, label: str | None = "sad", p: float = 0.91, error: str = "", **absent: str) -> dict:
    mods = {m: ({"present": False, "reason": absent[m]} if m in absent else {"present": True})
            for m in ("audio", "text", "visual")}
    out = {"clip": clip, "modalities": mods, "transcript": "I miss her so much.",
           "prediction": None if label is None else {"label": label, "probs": {label: p, "other": 1 - p}}}
    if error:
        out["error"] = error
    return out


def test_table_names_clips_relative_to_their_folder():
    names = display_names(["videos/angry/clip0.mp4", "videos/sad/clip0.mp4", "videos/sad/clip1.mp4"])
    assert names == ["angry/clip0.mp4", os.path.join("sad", "clip0.mp4"), os.path.join("sad", "clip1.mp4")]
    assert display_names(["a/x.mp4", "b/x.mp4"]) == [os.path.join("a", "x.mp4"), os.path.join("b", "x.mp4")]
    assert display_names(["videos/sad/clip0.mp4"]) == ["clip0.mp4"]
    table = format_table([_result("videos/angry/clip0.mp4"), _result("videos/sad/clip0.mp4")])
    assert "angry/clip0.mp4" in table and "sad/clip0.mp4" in table


def test_table_keeps_errors_out_of_p_and_reasons_whole():
    rows = [_result("v/ok.mp4", text="no-audio: no-audio-stream", audio="no-audio-stream"),
            _result("v/bad.mp4", label=None, error="not predicted: decode-error: cannot decode v/bad.mp4: "
                                                      "Invalid data found when processing input",
                    **{m: "decode-error: cannot decode v/bad.mp4: Invalid data found when processing input"
                       for m in ("audio", "text", "visual")})]
    lines = format_table(rows).splitlines()
    header = lines[0].split()
    assert header == ["clip", "prediction", "p", "audio", "text", "visual", "transcript", "error"]
    p_col = lines[0].index(" p ") + 1
    assert lines[2][p_col:p_col + 4].strip() == "0.91"
    assert lines[3][p_col:p_col + 4].strip() == "-"  # the error is not in the p column ...
    assert lines[3].endswith("Invalid data found when processing input")  # ... but whole, in its own
    assert "no: no-audio: no-audio-stream" in lines[2] and "…" not in lines[2]
    assert lines[3].count("no: decode-error ") == 3  # the detail is in the error column, once
    assert "error" not in format_table(rows[:1]).splitlines()[0]  # no error column when nothing failed


class _Fake:
    """A Predictor stand-in: each clip's result after a moment."""

    def __init__(self, *a, **k) -> None:
        pass

    def predict_paths(self, items):
        for item in items:
            yield type("P", (), {"to_dict": lambda self, c=str(item.path): _result(c)})()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("n, bar", [(2, False), (6, True)])
def test_progress_for_more_than_a_few_clips_clears_itself(tmp_path, monkeypatch, n, bar):
    from pipeline.predict import Predictor

    clips = [tmp_path / f"c{i}.mp4" for i in range(n)]
    for c in clips:
        c.write_bytes(b"x")
    monkeypatch.setattr(Predictor, "from_checkpoint", classmethod(lambda cls, *a, **k: _Fake()))
    err = _Tty()
    monkeypatch.setattr(sys, "stderr", err)
    out = tmp_path / "p.jsonl"
    assert cli.main([*map(str, clips), "--model", "x", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == n
    raw = err.getvalue()
    assert ("predicting" in raw) == bar
    screen = []
    for line in raw.split("\n"):  # what stays on each line after its carriage returns
        cells: list[str] = []
        for part in line.split("\r"):
            cells[: len(part)] = list(part)
        screen.append("".join(cells).rstrip())
    assert not any("predicting" in s for s in screen), screen  # the bar cleared itself
    assert screen[0].startswith(f"comp-predict: {n} prediction(s) written to")


def test_model_pointing_at_a_feature_store_says_what_it_is(tmp_path, capsys):
    from demo.synthetic import make_synthetic_store

    store = make_synthetic_store(tmp_path / "feats.h5", n_conversations=3, utterances=(1, 2))
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x")
    assert cli.main([str(clip), "--model", str(store)]) == 2
    err = capsys.readouterr().err
    assert "feature store" in err and "--model wants the run folder" in err and "best.pt" in err
    assert "weights_only" not in err
    assert cli.main([str(clip), "--model", str(clip)]) == 2
    assert "media file" in capsys.readouterr().err


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("write", [
    lambda p: torch.save({"x": _Payload()}, p),
    lambda p: p.write_bytes(pickle.dumps({"x": _Payload()})),
    lambda p: p.write_text("hello"),
    lambda p: p.write_bytes(b""),
])
def test_refusals_never_suggest_weights_only_false(tmp_path, capsys, write):
    bad = tmp_path / "model.pt"
    write(bad)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"x")
    assert cli.main([str(clip), "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "weights_only" not in err and "--model wants" in err
