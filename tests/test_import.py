"""comp-import gcnet: label pickles, feature folders, absent vectors, the restricted unpickler, the CLI."""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli.importer import main
from pipeline.gcnet_import import ZERO_REASON, GcnetImportError, import_gcnet, read_label_pickle
from pipeline.safe_pickle import UnsafePickleError, safe_load, safe_loads
from pipeline.store import read_store

# ------------------------------------------------------------------------------------------ fake sets

IEMO_VIDS = {
    "Ses01F_impro01": ["Ses01F_impro01_F000", "Ses01F_impro01_M000", "Ses01F_impro01_F001"],
    "Ses03M_script02": ["Ses03M_script02_M000", "Ses03M_script02_F000"],
}
IEMO_SPEAKERS = {"Ses01F_impro01": ["F", "M", "F"], "Ses03M_script02": ["M", "F"]}
IEMO_LABELS4 = {"Ses01F_impro01": [0, 3, 2], "Ses03M_script02": [1, 0]}
IEMO_SENTENCES = {"Ses01F_impro01": ["Hello there.", "Go away!", "Fine."],
                  "Ses03M_script02": np.array(["I miss her.", "Café time."])}


def vec(seed: int, dim: int) -> np.ndarray:
    """A distinct non-zero float32 vector per seed."""
    return (np.arange(dim, dtype=np.float32) + 1) * (seed + 1) / 10


def _dump(path: Path, items: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(items, protocol=2))  # protocol 2: how the Python-2 era files are written
    return path


def make_iemocap(root: Path, labels: dict | None = None) -> dict[str, Path]:
    """IEMOCAP-like set: .npy audio (D,) and text (1, D), faces as <utt>/compress_{F,M}.npy."""
    labels = labels or IEMO_LABELS4
    pkl = _dump(root / "IEMOCAP_features_raw_4way.pkl",
                [IEMO_VIDS, labels, IEMO_SPEAKERS, IEMO_SENTENCES,
                 {"Ses01F_impro01"}, {"Ses03M_script02"}])
    dirs = {m: root / "features" / name for m, name in
            (("audio", "wav2vec-large-c-UTT"), ("text", "deberta-large-4-UTT"), ("visual", "manet_UTT"))}
    for d in dirs.values():
        d.mkdir(parents=True)
    utts = [u for v in IEMO_VIDS.values() for u in v]
    for i, u in enumerate(utts):
        np.save(dirs["audio"] / f"{u}.npy", vec(i, 4))
        np.save(dirs["text"] / f"{u}.npy", vec(10 + i, 5)[None, :])
        face = dirs["visual"] / u
        face.mkdir()
        np.save(face / "compress_F.npy", vec(20 + i, 3))
        np.save(face / "compress_M.npy", vec(40 + i, 3))
    # the ways these sets lack a modality: an all-zero vector, no file, a broken file
    np.save(dirs["audio"] / "Ses01F_impro01_M000.npy", np.zeros(4, np.float32))
    os.remove(dirs["text"] / "Ses03M_script02_F000.npy")
    (dirs["text"] / "Ses01F_impro01_F001.npy").write_bytes(b"not a numpy file")
    np.save(dirs["visual"] / "Ses03M_script02_M000" / "compress_M.npy", np.zeros(3, np.float32))
    return {"labels": pkl, **dirs}


CMU_VIDS = {"vidA": ["vidA_1", "vidA_2"], "vidB": ["vidB_1"], "vidC": ["vidC_1", "vidC_2"]}
CMU_LABELS = {"vidA": [1.4, -0.6], "vidB": np.array([2.8], dtype=np.float32), "vidC": [0.0, -3.0]}


def make_cmu(root: Path, name: str = "CMUMOSI_features_raw_2way.pkl") -> dict[str, Path]:
    """CMU-like set: 7-item pickle with train/val/test vids; one face stored as a folder of arrays."""
    pkl = _dump(root / name, [CMU_VIDS, CMU_LABELS, {v: [""] * len(u) for v, u in CMU_VIDS.items()},
                              {v: [f"said {x}" for x in u] for v, u in CMU_VIDS.items()},
                              {"vidA"}, {"vidB"}, {"vidC"}])
    dirs = {m: root / m for m in ("audio", "text", "visual")}
    for d in dirs.values():
        d.mkdir(parents=True)
    for i, u in enumerate(u for v in CMU_VIDS.values() for u in v):
        np.save(dirs["audio"] / f"{u}.npy", vec(i, 6))
        np.save(dirs["text"] / f"{u}.npy", vec(10 + i, 7))
        np.save(dirs["visual"] / f"{u}.npy", vec(20 + i, 2)[None, :])
    os.remove(dirs["visual"] / "vidC_2.npy")
    (dirs["visual"] / "vidC_2").mkdir()
    np.save(dirs["visual"] / "vidC_2" / "frame_0.npy", np.array([1.0, 2.0], np.float32))
    np.save(dirs["visual"] / "vidC_2" / "frame_1.npy", np.array([3.0, 6.0], np.float32))
    return {"labels": pkl, **dirs}


def run_import(paths: dict[str, Path], out: Path, **kw):
    return import_gcnet(paths["labels"], {m: paths[m] for m in ("audio", "text", "visual")}, out, **kw)


@pytest.fixture
def iemocap(tmp_path):
    paths = make_iemocap(tmp_path / "iemo")
    summary = run_import(paths, tmp_path / "iemo.h5")
    return paths, summary, read_store(tmp_path / "iemo.h5")


@pytest.fixture
def cmu(tmp_path):
    paths = make_cmu(tmp_path / "cmu")
    summary = run_import(paths, tmp_path / "cmu.h5")
    return paths, summary, read_store(tmp_path / "cmu.h5")


# ------------------------------------------------------------------------------------------- IEMOCAP

def test_iemocap_rows_match_the_pickle(iemocap):
    """Ids, conversations, positions, speakers, labels, folds, transcripts come from the pickle exactly."""
    _, _, data = iemocap
    assert data.header.source == "gcnet:iemocap4" and data.header.task == "classification"
    assert data.header.label_names == ("happy", "sad", "neutral", "angry")
    assert data.ids.tolist() == [u for v in IEMO_VIDS.values() for u in v]
    assert data.conversation.tolist() == ["Ses01F_impro01"] * 3 + ["Ses03M_script02"] * 2
    assert data.position.tolist() == [0, 1, 2, 0, 1]
    assert data.speaker.tolist() == ["F", "M", "F", "M", "F"]
    assert data.label.tolist() == ["happy", "angry", "neutral", "sad", "happy"]
    assert data.fold.tolist() == [1, 1, 1, 3, 3]
    assert data.split.tolist() == [""] * 5
    assert data.transcript.tolist() == ["Hello there.", "Go away!", "Fine.", "I miss her.", "Café time."]
    assert np.isnan(data.value).all()


def test_iemocap_features_exact(iemocap):
    """Present audio and text vectors are the files' values, (1, D) files flattened."""
    _, _, data = iemocap
    assert data.present["audio"].tolist() == [True, False, True, True, True]
    for i in (0, 2, 3, 4):
        np.testing.assert_array_equal(data.features["audio"][i], vec(i, 4))
    assert data.present["text"].tolist() == [True, True, False, True, False]
    for i in (0, 1, 3):
        np.testing.assert_array_equal(data.features["text"][i], vec(10 + i, 5))


def test_iemocap_face_is_the_speakers_own(iemocap):
    """Each utterance takes compress_F or compress_M according to its speaker."""
    _, _, data = iemocap
    expected = {0: vec(20, 3), 1: vec(41, 3), 2: vec(22, 3), 4: vec(24, 3)}  # F, M, F, -, F
    for i, v in expected.items():
        np.testing.assert_array_equal(data.features["visual"][i], v)


def test_zero_vectors_are_absent_with_reason(iemocap):
    """All-zero source vectors become present=False with the zero-vector reason."""
    _, _, data = iemocap
    assert data.reason["audio"][1] == ZERO_REASON
    assert not data.present["visual"][3] and data.reason["visual"][3] == ZERO_REASON
    assert data.present["visual"].tolist() == [True, True, True, False, True]


def test_missing_and_unreadable_files_have_reasons(iemocap):
    """A missing file says missing-file; a broken one says unreadable with the error."""
    _, summary, data = iemocap
    assert data.reason["text"][4] == "missing-file"
    assert data.reason["text"][2].startswith("unreadable: ")
    assert summary.absent["text"] == {"missing-file": 1, "unreadable": 1}
    assert summary.present == {"audio": 4, "text": 3, "visual": 4}
    assert summary.dims == {"audio": 4, "text": 5, "visual": 3}


def test_modality_info_from_folder_names(iemocap):
    """The encoder is the folder name; known folders get their layers and pooling."""
    _, _, data = iemocap
    audio = data.header.modalities["audio"]
    assert (audio.dim, audio.encoder) == (4, "wav2vec-large-c-UTT")
    assert audio.layers == "wav2vec large, context network c" and audio.pooling == "utterance mean"
    assert data.header.modalities["visual"].encoder == "manet_UTT"


def test_six_class_pickle_detected(tmp_path):
    """Class ids above 3 make the pickle IEMOCAP-6, with the six names."""
    labels = {"Ses01F_impro01": [4, 5, 2], "Ses03M_script02": [1, 0]}
    paths = make_iemocap(tmp_path / "i6", labels=labels)
    summary = run_import(paths, tmp_path / "i6.h5")
    data = read_store(tmp_path / "i6.h5")
    assert summary.dataset == "iemocap6" and data.header.source == "gcnet:iemocap6"
    assert data.label.tolist() == ["excited", "frustrated", "neutral", "sad", "happy"]


def test_dataset_flag_must_fit_the_pickle(tmp_path):
    """--dataset iemocap4 on a 6-class pickle, or cmumosi on IEMOCAP, is refused with a hint."""
    labels = {"Ses01F_impro01": [4, 5, 2], "Ses03M_script02": [1, 0]}
    paths = make_iemocap(tmp_path / "i6", labels=labels)
    with pytest.raises(GcnetImportError, match="iemocap6"):
        read_label_pickle(paths["labels"], "iemocap4")
    with pytest.raises(GcnetImportError, match="use iemocap4 or iemocap6"):
        read_label_pickle(paths["labels"], "cmumosi")


def test_wrong_dim_names_the_file(tmp_path):
    """A vector whose dim differs from the folder's first one is an error naming that file."""
    paths = make_iemocap(tmp_path / "iemo")
    bad = paths["audio"] / "Ses03M_script02_M000.npy"
    np.save(bad, vec(3, 9))
    with pytest.raises(GcnetImportError, match=r"Ses03M_script02_M000\.npy.*dim 9"):
        run_import(paths, tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()


# ----------------------------------------------------------------------------------------------- CMU

def test_cmu_rows_values_and_splits(cmu):
    """CMU rows are regression values with splits from trainVid/valVid/testVid and fold 0."""
    _, summary, data = cmu
    assert data.header.source == "gcnet:cmumosi" and data.header.task == "regression"
    assert data.header.label_names == ()
    assert data.ids.tolist() == ["vidA_1", "vidA_2", "vidB_1", "vidC_1", "vidC_2"]
    assert data.conversation.tolist() == ["vidA", "vidA", "vidB", "vidC", "vidC"]
    assert data.position.tolist() == [0, 1, 0, 0, 1]
    np.testing.assert_array_equal(data.value, np.array([1.4, -0.6, 2.8, 0.0, -3.0], np.float32))
    assert data.label.tolist() == [""] * 5 and data.speaker.tolist() == [""] * 5
    assert data.split.tolist() == ["train", "train", "val", "test", "test"]
    assert data.fold.tolist() == [0] * 5
    assert summary.splits == {"train": 2, "val": 1, "test": 2}


def test_cmu_face_folder_is_averaged(cmu):
    """A CMU utterance stored as a folder of arrays gets their mean; plain files are exact."""
    _, _, data = cmu
    np.testing.assert_array_equal(data.features["visual"][4], np.array([2.0, 4.0], np.float32))
    np.testing.assert_array_equal(data.features["visual"][0], vec(20, 2))
    np.testing.assert_array_equal(data.features["text"][3], vec(13, 7))
    assert all(data.present[m].all() for m in ("audio", "text", "visual"))


def test_cmu_mosei_detected_from_file_name(tmp_path):
    """A 7-item pickle named *MOSEI* is imported as cmumosei."""
    paths = make_cmu(tmp_path / "cmu", name="CMUMOSEI_features_raw_2way.pkl")
    assert run_import(paths, tmp_path / "m.h5").dataset == "cmumosei"


# ------------------------------------------------------------------------------------ safe unpickling

class _Payload:
    """Pickles as a call of `func(*args)`, the shape of a code-execution pickle."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_malicious_pickle_refused_without_running(tmp_path):
    """An os.system payload inside a valid-looking list is refused by name and never runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([{"v": ["u"]}, _Payload(os.system, f"touch {marker}")], protocol=2))
    with pytest.raises(UnsafePickleError, match=r"system"):
        safe_load(path)
    assert not marker.exists()


@pytest.mark.parametrize("func", [eval, getattr, subprocess.Popen, __import__], ids=lambda f: f.__name__)
def test_other_code_globals_refused(func):
    """Other globals that run code (eval, getattr, Popen, __import__) are refused too."""
    data = pickle.dumps(_Payload(func, "x"), protocol=2)
    with pytest.raises(UnsafePickleError, match=func.__name__):
        safe_loads(data)


def test_safe_load_reads_plain_data(tmp_path):
    """Sets, numpy arrays of numbers and strings, and numpy scalars load through the allow-list."""
    items = [{"a": np.array([1.5, 2.5], np.float32)}, {"b"}, np.array(["x", "yz"]), np.float64(0.25), (1, None)]
    path = _dump(tmp_path / "ok.pkl", items)
    out = safe_load(path)
    np.testing.assert_array_equal(out[0]["a"], items[0]["a"])
    assert out[1] == {"b"} and out[2].tolist() == ["x", "yz"] and out[3] == 0.25 and out[4] == (1, None)


# ------------------------------------------------------------------------------------------------ CLI

def _argv(paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["gcnet", "--labels", str(paths["labels"]), "--audio", str(paths["audio"]), "--text", str(paths["text"]),
            "--visual", str(paths["visual"]), "--out", str(out), *extra]


def test_cli_imports_and_prints_summary(tmp_path, capsys):
    """comp-import gcnet writes the store and prints utterance and per-modality counts."""
    paths = make_iemocap(tmp_path / "iemo")
    out = tmp_path / "iemo.h5"
    assert main(_argv(paths, out)) == 0
    text = capsys.readouterr().out
    assert "5 utterances in 2 conversations" in text
    assert "zero-vector (absent in source): 1" in text and "missing-file: 1" in text
    assert len(read_store(out)) == 5


def test_cli_existing_output_needs_overwrite(tmp_path, capsys):
    """A second run onto the same file exits 2 unless --overwrite is given."""
    paths = make_cmu(tmp_path / "cmu")
    out = tmp_path / "cmu.h5"
    assert main(_argv(paths, out, "-q")) == 0
    assert main(_argv(paths, out, "-q")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(_argv(paths, out, "-q", "--overwrite", "--dataset", "cmumosi")) == 0


def test_cli_bad_folder_exits_2(tmp_path, capsys):
    """A missing feature folder is exit 2 with a message naming the flag."""
    paths = make_cmu(tmp_path / "cmu")
    paths["text"] = tmp_path / "nowhere"
    assert main(_argv(paths, tmp_path / "x.h5", "-q")) == 2
    assert "--text" in capsys.readouterr().err


def test_cli_refuses_malicious_labels(tmp_path, capsys):
    """The CLI reports a refused pickle global with exit 2, and the payload never runs."""
    paths = make_cmu(tmp_path / "cmu")
    marker = tmp_path / "pwned"
    paths["labels"].write_bytes(pickle.dumps(_Payload(os.system, f"touch {marker}"), protocol=2))
    assert main(_argv(paths, tmp_path / "x.h5", "-q")) == 2
    assert "refusing to load global" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "x.h5").exists()


def test_zero_vectors_fed_as_present_only_when_asked(iemocap):
    """zero_vectors_present (faithful, §9.18): an all-zero source vector is a present zero input; a missing or
    unreadable file stays absent. Off (clean): every one of them is absent."""
    from comp.data import build_conversations

    _, _, data = iemocap
    strict = {c.id: c for c in build_conversations(data)}
    fed = {c.id: c for c in build_conversations(data, zero_vectors_present=True)}
    zero = [("Ses01F_impro01", 1, 0), ("Ses03M_script02", 0, 2)]  # (conversation, position, modality index)
    absent = [("Ses03M_script02", 1, 1), ("Ses01F_impro01", 2, 1)]  # missing file, unreadable file
    for conv, pos, m in zero:
        assert not strict[conv].present[pos, m]
        assert fed[conv].present[pos, m]
        assert not np.any(fed[conv].features[("audio", "text", "visual")[m]][pos])
    for conv, pos, m in absent:
        assert not strict[conv].present[pos, m] and not fed[conv].present[pos, m]
    n_strict = sum(int(c.present.sum()) for c in strict.values())
    assert sum(int(c.present.sum()) for c in fed.values()) == n_strict + len(zero)
