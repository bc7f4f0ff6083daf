"""MELD (Poria et al. 2019, ACL; github.com/declare-lab/MELD), the raw release `MELD.Raw`.

Layout: three label files `train_sent_emo.csv`, `dev_sent_emo.csv`, `test_sent_emo.csv` (columns Sr No.,
Utterance, Speaker, Emotion, Sentiment, Dialogue_ID, Utterance_ID, Season, Episode, StartTime, EndTime) and
three video folders `train_splits/`, `dev_splits_complete/`, `output_repeated_splits_test/` holding
`dia<Dialogue_ID>_utt<Utterance_ID>.mp4`, anywhere below the root (the release nests them in train/, dev/,
test/ folders).

conversation = split + dialogue (dialogue ids restart in each split), position = Utterance_ID, speaker = the
character's name, label = Emotion (neutral, joy, sadness, anger, surprise, fear, disgust) or, with
`label="sentiment"`, Sentiment (positive, neutral, negative); split = the official train/dev/test. Rows whose
video is absent from the tree (the release lacks a few) are listed, not fatal. The characters speak in every
split, so MELD is not speaker-independent: comp-train then holds validation out by conversation.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.recipes import ManifestRow, Prepared, PrepareError, Skipped, relpath

SPLITS = {"train": ("train_sent_emo.csv", "train_splits", "train"),
          "dev": ("dev_sent_emo.csv", "dev_splits_complete", "val"),
          "test": ("test_sent_emo.csv", "output_repeated_splits_test", "test")}
COLUMNS = ("Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID")


def _find_file(root: Path, name: str) -> Path | None:
    found = sorted(root.rglob(name))
    return found[0] if found else None


def _find_dir(root: Path, name: str) -> Path | None:
    found = sorted(p for p in root.rglob(name) if p.is_dir())
    return found[0] if found else None


def prepare(root: Path, *, label: str = "emotion") -> Prepared:
    """Every labelled MELD utterance below `root` (see the module docstring). Raises PrepareError naming the
    label file or video folder that is missing."""
    root = Path(root)
    if label not in ("emotion", "sentiment"):
        raise PrepareError(f"label must be emotion or sentiment, got {label!r}")
    missing = [name for csv_name, folder, _ in SPLITS.values() for name in (csv_name, folder + "/")
               if (_find_file(root, csv_name) if name == csv_name else _find_dir(root, folder)) is None]
    if missing:
        raise PrepareError(f"{root} is not a complete MELD.Raw tree: missing {', '.join(missing)}")
    rows, skipped = [], []
    for part, (csv_name, folder, split) in SPLITS.items():
        csv_path, video_dir = _find_file(root, csv_name), _find_dir(root, folder)
        with open(csv_path, newline="", encoding="utf-8-sig", errors="replace") as fh:  # type: ignore[arg-type]
            reader = csv.DictReader(fh)
            absent = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if absent:
                raise PrepareError(f"{csv_path}: missing column(s) {', '.join(absent)}")
            for row in reader:
                dia, utt = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
                clip = f"{part}/dia{dia}_utt{utt}"
                video = video_dir / f"dia{dia}_utt{utt}.mp4"  # type: ignore[operator]
                if not video.is_file():
                    skipped.append(Skipped(clip, f"video {relpath(video, root)} is not in the tree"))
                    continue
                rows.append(ManifestRow(
                    path=relpath(video, root), id=clip,
                    label=(row["Emotion"] if label == "emotion" else row["Sentiment"]).strip().lower(),
                    conversation=f"{part}/dia{dia}", position=utt, speaker=row["Speaker"].strip(), split=split,
                    meta={"transcript": row["Utterance"].strip(),
                          ("sentiment" if label == "emotion" else "emotion"):
                              (row["Sentiment"] if label == "emotion" else row["Emotion"]).strip().lower()}))
    return Prepared("meld", rows, skipped, [])
