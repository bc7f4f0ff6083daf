"""Finding clips: folder recursion, manifests, labels from folders, ids and the store's task."""

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from demo.media import AudioTrack, VideoTrack, lfs_pointer, write_clip, write_tracks
from pipeline.inputs import (
    InputError,
    collect_inputs,
    discover_folder,
    gather_inputs,
    infer_task,
    read_manifest,
    scan_folder,
)


@lru_cache(maxsize=1)
def _tiny_wav() -> bytes:
    """0.1 s of audio: folders are searched by content, so every test clip must be real media."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = write_clip(Path(tmp) / "t.wav", audio=np.full(1600, 0.1, np.float32), frames=None)
        return path.read_bytes()


def touch(path: Path) -> Path:
    """A real (tiny) clip at `path`, whatever its extension says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_tiny_wav())
    return path


def test_folder_is_searched_recursively_for_media_only(tmp_path):
    """Every media file below the root is a clip, whatever its extension; text files and hidden folders are not."""
    for name in ("a.mp4", "sub/b.MKV", "sub/deep/c.wav", "d.flac", "e.mp3", "f.avi", "g.mov", "h.webm",
                 "i.m4a", "j.flv", "k.unusual", ".hidden/x.mp4", "sub/.y.mp4", ".hidden.mp4"):
        touch(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a clip\n" * 20)
    found = scan_folder(tmp_path)
    assert [it.id for it in found.items] == ["a", "d", "e", "f", "g", "h", "i", "j", "k", "sub/b", "sub/deep/c"]
    assert found.skipped == {"not-media": ["notes.txt"]}


def test_files_that_are_not_clips_are_counted_by_kind(tmp_path):
    """Files without a media extension are clips when FFmpeg finds audio or footage in them (CREMA-D's .flv,
    a .m4a, a video without extension); still images, subtitles, text, LFS pointers, empty files and dangling
    links are skipped and named. Media extensions are clips whatever they hold (their decode error says why)."""
    import cv2

    write_tracks(tmp_path / "video.flv", video=[VideoTrack(np.zeros((48, 64, 3), np.uint8), n_frames=5)])
    (tmp_path / "video.flv").rename(tmp_path / "video.stream")
    write_tracks(tmp_path / "voice.mkv", audio=[AudioTrack(np.zeros(1600, np.float32))])
    (tmp_path / "voice.mkv").rename(tmp_path / "voice.mka")
    cv2.imwrite(str(tmp_path / "poster.png"), np.zeros((48, 64, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "poster.jpg"), np.zeros((48, 64, 3), np.uint8))
    (tmp_path / "clip.srt").write_text("1\n00:00:01,000 --> 00:00:02,000\nhello\n")
    (tmp_path / "README").write_text("a dataset\n")
    lfs_pointer(tmp_path / "weights.bin")
    lfs_pointer(tmp_path / "lfs.mp4")
    (tmp_path / "empty.dat").write_bytes(b"")
    (tmp_path / "annexed.dat").symlink_to(tmp_path / ".git" / "annex" / "objects" / "SHA256E-s9--x.dat")
    found = gather_inputs(tmp_path)
    assert [it.id for it in found.items] == ["lfs", "video", "voice"]
    assert found.skipped == {"still-image": ["poster.jpg", "poster.png"], "subtitles": ["clip.srt"],
                             "not-media": ["README"], "git-lfs-pointer": ["weights.bin"], "empty": ["empty.dat"],
                             "missing-content": ["annexed.dat"]}
    assert "1 git-lfs-pointer (weights.bin)" in found.skipped_summary()


def test_a_folder_of_only_skipped_files_names_them(tmp_path):
    """A folder with no clip is an error that says what was there instead."""
    lfs_pointer(tmp_path / "a.dat")
    with pytest.raises(InputError, match="no clips found.*git-lfs-pointer \\(a.dat\\)"):
        collect_inputs(tmp_path)


def test_linked_clips_keep_the_path_as_laid_out(tmp_path):
    """git-annex/DataLad layout: a clip linking into .git/annex gets its id, label and duplicate check from the
    link's own path, not from the hashed target; linked folders are searched too."""
    target = touch(tmp_path / ".git" / "annex" / "objects" / "Ab" / "SHA256E-s1--0123.mp4")
    (tmp_path / "happy").mkdir()
    (tmp_path / "happy" / "annexed_clip.mp4").symlink_to(target)
    (tmp_path / "sad").mkdir()
    (tmp_path / "sad" / "same_content.mp4").symlink_to(target)  # annex stores equal content once
    (tmp_path / "angry").symlink_to(touch(tmp_path.parent / f"{tmp_path.name}-elsewhere" / "a.mp4").parent)
    items = discover_folder(tmp_path, labels_from_folders=True)
    assert [(it.id, it.label, it.source) for it in items] == [
        ("angry/a", "angry", "angry/a.mp4"), ("happy/annexed_clip", "happy", "happy/annexed_clip.mp4"),
        ("sad/same_content", "sad", "sad/same_content.mp4")]


def test_a_store_or_checkpoint_as_input_says_which_command_wants_it(tmp_path):
    """An HDF5 store or a torch checkpoint passed as INPUT is refused with what it is and where it goes."""
    import h5py
    import torch

    with h5py.File(tmp_path / "feats.h5", "w") as f:
        f.attrs["x"] = 1
    torch.save({"w": torch.zeros(1)}, tmp_path / "best.pt")
    with pytest.raises(InputError, match="feats.h5 is an HDF5 file.*comp-train"):
        collect_inputs(tmp_path / "feats.h5")
    with pytest.raises(InputError, match="best.pt is .*checkpoint.*comp-predict"):
        collect_inputs(tmp_path / "best.pt")


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
    with pytest.raises(InputError, match="no clips found"):
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
