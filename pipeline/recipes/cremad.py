"""CREMA-D (Cao et al. 2014, IEEE Trans. Affective Computing 5(4); github.com/CheyneyComputerScience/CREMA-D).

Layout: `AudioWAV/<ActorID>_<Sentence>_<Emotion>_<Level>.wav` (16 kHz mono) and `VideoFlash/<same name>.flv`
(the video with its own audio), e.g. `1001_DFA_ANG_XX`; optionally `VideoDemographics.csv` (ActorID, Age, Sex,
Race, Ethnicity). 91 actors (1001-1091), 12 sentences, six emotions, four levels:

    ANG angry, DIS disgust, FEA fear, HAP happy, NEU neutral, SAD sad
    LO low, MD medium, HI high, XX unspecified

Media (`media="auto"`): the flv for the picture with the wav as `audio_path` when both exist, because the wav
is the release's own 16 kHz audio track; the flv alone, or the wav alone, when only one exists.

Split (CREMA-D has none; this one is actor-independent and fixed by the actor number): fold =
(ActorID - 1001) mod 5 + 1, five folds of 18-19 actors; split: fold 5 test, fold 4 validation, the rest train.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from pipeline.recipes import ManifestRow, Prepared, PrepareError, Skipped, relpath

EMOTIONS = {"ANG": "angry", "DIS": "disgust", "FEA": "fear", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
LEVELS = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified"}
N_FOLDS = 5
MEDIA = ("auto", "av", "audio", "video")

_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")


def fold_of(actor: int) -> int:
    return (actor - 1001) % N_FOLDS + 1


def split_of(actor: int) -> str:
    return {N_FOLDS: "test", N_FOLDS - 1: "val"}.get(fold_of(actor), "train")


def _find(root: Path, name: str) -> Path | None:
    direct = root / name
    if direct.is_dir():
        return direct
    found = sorted(p for p in root.rglob(name) if p.is_dir())
    return found[0] if found else None


def _demographics(root: Path) -> dict[str, dict[str, str]]:
    path = next(iter(sorted(root.rglob("VideoDemographics.csv"))), None)
    if path is None:
        return {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return {row["ActorID"].strip(): row for row in csv.DictReader(fh) if row.get("ActorID")}


def prepare(root: Path, *, media: str = "auto") -> Prepared:
    """Every CREMA-D clip below `root` (see the module docstring). Raises PrepareError when neither
    `AudioWAV/` nor `VideoFlash/` holds a file named ActorID_Sentence_Emotion_Level."""
    root = Path(root)
    if media not in MEDIA:
        raise PrepareError(f"media must be one of {', '.join(MEDIA)}, got {media!r}")
    audio_dir, video_dir = _find(root, "AudioWAV"), _find(root, "VideoFlash")
    files: dict[str, dict[str, Path]] = {}
    for kind, folder, ext in (("audio", audio_dir, ".wav"), ("video", video_dir, ".flv")):
        if folder is None:
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() == ext and _NAME.match(path.stem):
                files.setdefault(path.stem, {})[kind] = path
    if not files:
        raise PrepareError(f"{root} holds no CREMA-D clip: expected AudioWAV/*.wav and/or VideoFlash/*.flv named "
                           "ActorID_Sentence_Emotion_Level (e.g. AudioWAV/1001_DFA_ANG_XX.wav); found "
                           f"{'AudioWAV/ ' if audio_dir else ''}{'VideoFlash/ ' if video_dir else ''}"
                           f"{'' if audio_dir or video_dir else 'neither folder'}".rstrip())
    people = _demographics(root)
    rows, skipped = [], []
    for name in sorted(files):
        actor, sentence, emotion, level = _NAME.match(name).groups()  # type: ignore[union-attr]
        have = files[name]
        if emotion not in EMOTIONS or level not in LEVELS:
            skipped.append(Skipped(name, f"unknown emotion {emotion!r} or level {level!r} in the name"))
            continue
        if media == "auto":
            main = have.get("video") or have["audio"]
            audio = have.get("audio") if "video" in have else None
        elif media == "av":
            main, audio = have.get("video"), have.get("audio")
            if main is None or audio is None:
                skipped.append(Skipped(name, f"media av needs the flv and the wav (has: {', '.join(sorted(have))})"))
                continue
        else:
            main, audio = have.get(media), None
            if main is None:
                skipped.append(Skipped(name, f"no {media} file (has: {', '.join(sorted(have))})"))
                continue
        meta = {"sentence": sentence, "level": LEVELS[level]}
        person = people.get(actor)
        if person:
            meta["sex"] = person.get("Sex", "").strip().lower()
            meta["age"] = person.get("Age", "").strip()
        rows.append(ManifestRow(path=relpath(main, root), audio_path=relpath(audio, root) if audio else "",
                                id=name, label=EMOTIONS[emotion], speaker=actor, split=split_of(int(actor)),
                                fold=fold_of(int(actor)), meta=meta))
    notes = []
    if media == "auto":
        only = {k: sum(1 for h in files.values() if set(h) == {k}) for k in ("audio", "video")}
        notes += [f"{n} clip(s) have only their {k} file" for k, n in only.items() if n]
    return Prepared("cremad", rows, skipped, notes)
