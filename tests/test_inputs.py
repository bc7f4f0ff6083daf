"""Finding clips: folder recursion, manifests, labels from folders, ids and the store's task."""

import math
from pathlib import Path

import pytest

from pipeline.inputs import InputError, collect_inputs, discover_folder, infer_task, read_manifest


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_folder_is_searched_recursively_for_media_only(tmp_path):
    """Every media extension below the root is a clip; other files and hidden folders are not."""
    for name in ("a.mp4", "sub/b.MKV", "sub/deep/c.wav", "d.flac", "e.mp3", "f.avi", "g.mov", "h.webm",
                 "notes.txt", ".hidden/x.mp4", "sub/.y.mp4"):
        touch(tmp_path / name)
    ids = [it.id for it in discover_folder(tmp_path)]
    assert ids == ["a", "d", "e", "f", "g", "h", "sub/b", "sub/deep/c"]


def test_id_and_source_are_relative_paths(tmp_path):
    """id is the relative path without extension, source keeps the extension."""
    touch(tmp_path / "s1" / "clip.one.mp4")
    (item,) = discover_folder(tmp_path)
    assert (item.id, item.source) == ("s1/clip.one", "s1/clip.one.mp4")


def test_labels_from_folders(tmp_path):
    """--labels-from-folders labels a clip with its parent folder's name."""
    touch(tmp_path / "angry" / "a.mp4")
    touch(tmp_path / "happy" / "sub" / "b.mp4")
    items = discover_folder(tmp_path, labels_from_folders=True)
    assert {it.id: it.label for it in items} == {"angry/a": "angry", "happy/sub/b": "sub"}


def test_labels_from_folders_refuses_a_clip_at_the_root(tmp_path):
    """A clip with no class folder is an error that says how to lay files out."""
    touch(tmp_path / "a.mp4")
    with pytest.raises(InputError, match="class folder"):
        discover_folder(tmp_path, labels_from_folders=True)


def test_non_ascii_and_space_names(tmp_path):
    """Names with spaces and non-ASCII characters keep their exact text in the id."""
    touch(tmp_path / "émotions joie" / "clip 01 – ça.mp4")
    (item,) = discover_folder(tmp_path, labels_from_folders=True)
    assert (item.id, item.label) == ("émotions joie/clip 01 – ça", "émotions joie")


def test_duplicate_ids_are_refused(tmp_path):
    """a.mp4 and a.wav would share the id 'a': refused with the id named."""
    touch(tmp_path / "a.mp4")
    touch(tmp_path / "a.wav")
    with pytest.raises(InputError, match="duplicate clip id.*'a'"):
        discover_folder(tmp_path)


def test_manifest_with_all_columns(tmp_path):
    """Every manifest column reaches the clip item; paths are relative to the input root."""
    touch(tmp_path / "media" / "x.mp4")
    csv = tmp_path / "clips.csv"
    csv.write_text("path,id,label,value,conversation,position,speaker,split,fold\n"
                   "x.mp4,utt1,happy,0.5,dlg7,3,F,train,2\n", encoding="utf-8")
    (item,) = read_manifest(csv, tmp_path / "media")
    assert (item.id, item.path, item.source, item.label, item.value, item.conversation, item.position,
            item.speaker, item.split, item.fold) == (
        "utt1", tmp_path / "media" / "x.mp4", "x.mp4", "happy", 0.5, "dlg7", 3, "F", "train", 2)


def test_manifest_without_id_uses_the_path_rule(tmp_path):
    """Without an id column the id is the path relative to the root, without extension."""
    csv = tmp_path / "m.csv"
    csv.write_text("path\nsub/y.mp4\n", encoding="utf-8")
    (item,) = collect_inputs(tmp_path, manifest=csv)
    assert (item.id, math.isnan(item.value), item.split, item.fold) == ("sub/y", True, "", 0)


@pytest.mark.parametrize("text, match", [
    ("file\nx.mp4\n", "needs a 'path' column"),
    ("path,mood\nx.mp4,a\n", "unknown column"),
    ("path,split\nx.mp4,dev\n", "split 'dev'"),
    ("path,value\nx.mp4,high\n", "not a number"),
    ("path,id\nx.mp4,a\ny.mp4,a\n", "duplicate clip id"),
])
def test_manifest_errors_are_clear(tmp_path, text, match):
    """A malformed manifest is an InputError naming the problem."""
    csv = tmp_path / "m.csv"
    csv.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=match):
        read_manifest(csv)


def test_empty_folder_is_an_error(tmp_path):
    """A folder with no media is a systemic error, not an empty store."""
    with pytest.raises(InputError, match="no media files"):
        collect_inputs(tmp_path)


def test_task_inference(tmp_path):
    """Class labels -> classification with sorted names; values -> regression; nothing -> unlabelled."""
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\na.mp4,sad\nb.mp4,angry\nc.mp4,sad\n", encoding="utf-8")
    assert infer_task(read_manifest(csv)) == ("classification", ("angry", "sad"))
    csv.write_text("path,value\na.mp4,1.5\nb.mp4,-2\n", encoding="utf-8")
    assert infer_task(read_manifest(csv)) == ("regression", ())
    csv.write_text("path\na.mp4\n", encoding="utf-8")
    assert infer_task(read_manifest(csv)) == ("classification", ())
