"""RAVDESS (Livingstone & Russo 2018, PLoS ONE 13(5): e0196391; zenodo.org/record/1188976).

Layout: 24 actors, one folder each (`Actor_01` ... `Actor_24`), inside any of the release's zip folders
(`Audio_Speech_Actors_01-24/`, `Audio_Song_Actors_01-24/`, `Video_Speech_Actor_XX/`, `Video_Song_Actor_XX/`) or
directly under the root. Every file is named by a 7-part code, `MM-VC-EE-II-SS-RR-AA.ext`:

    MM modality        01 audio-visual (.mp4), 02 video-only (.mp4), 03 audio-only (.wav)
    VC vocal channel   01 speech, 02 song
    EE emotion         01 neutral, 02 calm, 03 happy, 04 sad, 05 angry, 06 fearful, 07 disgust, 08 surprised
    II intensity       01 normal, 02 strong (neutral has normal only)
    SS statement       01 "Kids are talking by the door", 02 "Dogs are sitting by the door"
    RR repetition      01, 02
    AA actor           01-24 (odd male, even female)

One recording (VC-EE-II-SS-RR-AA) can exist as up to three files. `media="auto"` takes the audio-visual mp4
when there is one; otherwise the video-only mp4 with the wav as its `audio_path` when both exist; otherwise
whichever one exists. `audio`/`video`/`av` take only that kind. speaker = actor; RAVDESS has no conversations.

Splits (actor-independent; no official split exists):
- `split`: actors 1-16 train, 17-20 validation, 21-24 test;
- `fold`: six folds of four consecutive actors (1-4 → 1, ..., 21-24 → 6) for leave-four-actors-out
  cross-validation (`comp-train --set plan=folds`; validation is then held out by actor inside the training folds).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from pipeline.recipes import ManifestRow, Prepared, PrepareError, Skipped, relpath

EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fearful",
            "07": "disgust", "08": "surprised"}
INTENSITIES = {"01": "normal", "02": "strong"}
STATEMENTS = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}
CHANNELS = {"01": "speech", "02": "song"}
MEDIA = ("auto", "av", "audio", "video")
N_ACTORS = 24
SPEECH_PER_ACTOR = 60  # 1 neutral x 2 statements x 2 repetitions + 7 emotions x 2 intensities x 2 x 2
TRAIN_ACTORS, VAL_ACTORS = range(1, 17), range(17, 21)  # the rest (21-24) test
ACTORS_PER_FOLD = 4

_CODE = re.compile(r"^(0[1-3])-(0[12])-(0[1-8])-(0[12])-(0[12])-(0[12])-(\d\d)\.(wav|mp4)$", re.IGNORECASE)
_KIND = {"01": "av", "02": "video", "03": "audio"}


def split_of(actor: int) -> str:
    if actor in TRAIN_ACTORS:
        return "train"
    return "val" if actor in VAL_ACTORS else "test"


def fold_of(actor: int) -> int:
    return (actor - 1) // ACTORS_PER_FOLD + 1


def prepare(root: Path, *, channel: str = "speech", media: str = "auto") -> Prepared:
    """Every RAVDESS recording below `root` as a manifest row (see the module docstring).

    `channel`: speech | song | both. `media`: auto | av | audio | video. Raises PrepareError when `root`
    holds no file named by the RAVDESS code, or when no recording has the asked-for media.
    """
    root = Path(root)
    if not root.is_dir():
        raise PrepareError(f"{root}: not a folder; point ROOT at the RAVDESS folder that holds the Actor_XX folders")
    if channel not in ("speech", "song", "both"):
        raise PrepareError(f"channel must be speech, song or both, got {channel!r}")
    if media not in MEDIA:
        raise PrepareError(f"media must be one of {', '.join(MEDIA)}, got {media!r}")

    recordings: dict[str, dict[str, Path]] = defaultdict(dict)  # VC-EE-II-SS-RR-AA -> kind -> file
    for path in sorted(root.rglob("*")):
        match = _CODE.match(path.name)
        if match is None or not path.is_file() or any(p.startswith(".") for p in path.relative_to(root).parts):
            continue
        modality, vc = match.group(1), match.group(2)
        if channel != "both" and CHANNELS[vc] != channel:
            continue
        key = "-".join(match.groups()[1:7])
        recordings[key].setdefault(_KIND[modality], path)
    if not recordings:
        raise PrepareError(
            f"{root} holds no RAVDESS {'' if channel == 'both' else channel + ' '}recording (files named by the "
            "7-part code, e.g. Actor_01/03-01-01-01-01-01-01.wav or 01-01-03-02-01-01-12.mp4); point ROOT at the "
            "folder that holds the Actor_XX folders (or the release's Audio_Speech_Actors_01-24 folder)")

    rows: list[ManifestRow] = []
    skipped: list[Skipped] = []
    for key in sorted(recordings, key=lambda k: (int(k[-2:]), k)):
        files = recordings[key]
        vc, emotion, intensity, statement, repetition, actor = key.split("-")
        chosen = _choose(files, media)
        if chosen is None:
            have = ", ".join(sorted(files))
            skipped.append(Skipped(key, f"no {media} file (has: {have})"))
            continue
        path, audio_path = chosen
        actor_n = int(actor)
        rows.append(ManifestRow(
            path=relpath(path, root), audio_path=relpath(audio_path, root) if audio_path else "",
            id=path.stem,
            label=EMOTIONS[emotion], speaker=f"Actor_{actor}", split=split_of(actor_n), fold=fold_of(actor_n),
            meta={"intensity": INTENSITIES[intensity], "statement": STATEMENTS[statement],
                  "repetition": repetition, "channel": CHANNELS[vc], "sex": "male" if actor_n % 2 else "female"}))
    if not rows:
        raise PrepareError(f"{root}: {len(recordings)} RAVDESS recordings, but none as {media} files; "
                           f"use --media auto")
    return Prepared("ravdess", rows, skipped, _notes(rows, channel))


def _choose(files: dict[str, Path], media: str) -> tuple[Path, Path | None] | None:
    """(media file, separate audio file or None) for one recording, or None when `media` is not there."""
    if media != "auto":
        return (files[media], None) if media in files else None
    if "av" in files:
        return files["av"], None
    if "video" in files:
        return files["video"], files.get("audio")
    return files["audio"], None


def _notes(rows: list[ManifestRow], channel: str) -> list[str]:
    """One line per actor whose speech recordings are incomplete, and one for actors absent altogether."""
    notes = []
    per_actor: dict[str, int] = defaultdict(int)
    for r in rows:
        if r.meta["channel"] == "speech":
            per_actor[r.speaker] += 1
    if channel in ("speech", "both"):
        for actor in range(1, N_ACTORS + 1):
            name = f"Actor_{actor:02d}"
            n = per_actor.get(name, 0)
            if 0 < n < SPEECH_PER_ACTOR:
                notes.append(f"{name}: {n} of {SPEECH_PER_ACTOR} speech recordings")
        absent = [f"{a:02d}" for a in range(1, N_ACTORS + 1) if f"Actor_{a:02d}" not in per_actor]
        if absent:
            notes.append(f"no speech recordings of actor(s) {', '.join(absent)}")
    return notes
