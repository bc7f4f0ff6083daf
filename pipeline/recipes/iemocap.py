"""IEMOCAP (Busso et al. 2008, Language Resources and Evaluation 42(4)), the full release `IEMOCAP_full_release`.

Layout per session (`Session1` ... `Session5`):

    dialog/EmoEvaluation/<dialogue>.txt     "[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5, 2.5, 2.5]"
    dialog/transcriptions/<dialogue>.txt    "Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me."
    dialog/avi/DivX/<dialogue>.avi          the dialogue video, both actors in one frame
    sentences/wav/<dialogue>/<utterance>.wav  each utterance's audio, already cut

Each utterance becomes a time segment of its dialogue's video (`start`/`end` from EmoEvaluation, no cutting
beforehand) with its own sentence wav as `audio_path` (the speaking actor's cut, so the other actor's voice
stays out); conversation = dialogue, position = order of start time, speaker = session + the utterance's
gender letter (`Ses01F_impro01_M003` → `Ses01M`), fold = session.

The speaking actor's face: the frame shows both actors side by side; the actor whose gender letter names the
dialogue (`Ses01F_...`: the female actor) sits in the left half, the other in the right half (as the public
IEMOCAP face pipelines crop it). Each row's `crop` names that half, so face detection only sees the speaker.

Labels (the literature's maps, as in GCNet's IEMOCAP-4/6 sets): `classes=4`: neutral, happy (= happy + excited),
sad, angry; `classes=6`: happy, sad, neutral, angry, excited, frustrated. Utterances with other labels
(surprise, fear, disgust, other, xxx = no agreement) are left out like in those sets, or kept as unlabelled
context with `context="all"`.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.recipes import ManifestRow, Prepared, PrepareError, Skipped, relpath

FOUR = {"neu": "neutral", "hap": "happy", "exc": "happy", "sad": "sad", "ang": "angry"}
SIX = {"hap": "happy", "sad": "sad", "neu": "neutral", "ang": "angry", "exc": "excited", "fru": "frustrated"}
LEFT_HALF, RIGHT_HALF = "0,0,0.5,1", "0.5,0,1,1"

_EVAL = re.compile(r"^\[(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\]\s+(Ses\d\d[FM]_\S+_([FM])\d+)\s+(\w+)")
_TRANSCRIPT = re.compile(r"^(Ses\d\d[FM]_\S+_[FM]\d+)\s+\[[^\]]*\]:\s*(.*)$")


def _sessions(root: Path) -> list[Path]:
    found = sorted(p for p in root.glob("Session[1-5]") if p.is_dir())
    if not found:
        found = sorted(p for p in root.rglob("Session[1-5]") if p.is_dir() and (p / "dialog").is_dir())
    return found


def _transcripts(folder: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob("*.txt")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            match = _TRANSCRIPT.match(line.strip())
            if match:
                out[match.group(1)] = match.group(2).strip()
    return out


def prepare(root: Path, *, classes: int = 4, context: str = "labelled") -> Prepared:
    """Every IEMOCAP utterance below `root` as a segment of its dialogue video (see the module docstring).

    Raises PrepareError naming what is missing when `root` holds no `Session*/dialog/EmoEvaluation`.
    """
    root = Path(root)
    if classes not in (4, 6):
        raise PrepareError(f"classes must be 4 or 6, got {classes}")
    if context not in ("labelled", "all"):
        raise PrepareError(f"context must be labelled or all, got {context!r}")
    label_map = FOUR if classes == 4 else SIX
    sessions = _sessions(root)
    if not sessions:
        raise PrepareError(f"{root} holds no IEMOCAP session: expected Session1 ... Session5 folders with "
                           "dialog/EmoEvaluation/*.txt (point ROOT at IEMOCAP_full_release)")
    rows: list[ManifestRow] = []
    skipped: list[Skipped] = []
    notes: list[str] = []
    for session in sessions:
        n_session = int(session.name[-1])
        evaluation = session / "dialog" / "EmoEvaluation"
        if not evaluation.is_dir():
            notes.append(f"{relpath(session, root)}: no dialog/EmoEvaluation folder; session left out")
            continue
        transcripts = _transcripts(session / "dialog" / "transcriptions")
        for label_file in sorted(evaluation.glob("Ses*.txt")):
            dialogue = label_file.stem
            video = session / "dialog" / "avi" / "DivX" / f"{dialogue}.avi"
            utterances = []
            for line in label_file.read_text(encoding="utf-8", errors="replace").splitlines():
                match = _EVAL.match(line.strip())
                if match:
                    utterances.append((float(match.group(1)), float(match.group(2)), match.group(3),
                                       match.group(4), match.group(5)))
            utterances.sort(key=lambda u: (u[0], u[2]))
            position = 0
            for start, end, name, letter, code in utterances:
                label = label_map.get(code, "")
                if not label and context == "labelled":
                    continue
                if not video.is_file():
                    skipped.append(Skipped(name, f"dialogue video {relpath(video, root)} is not in the tree"))
                    continue
                wav = session / "sentences" / "wav" / dialogue / f"{name}.wav"
                rows.append(ManifestRow(
                    path=relpath(video, root), audio_path=relpath(wav, root) if wav.is_file() else "",
                    start=start, end=end, crop=LEFT_HALF if letter == dialogue[5] else RIGHT_HALF,
                    id=name, label=label, conversation=dialogue, position=position,
                    speaker=f"Ses{n_session:02d}{letter}", fold=n_session,
                    meta={"emotion_code": code, "transcript": transcripts.get(name, ""),
                          "kind": "improvised" if "_impro" in dialogue else "scripted"}))
                position += 1
    if not rows and not skipped:
        raise PrepareError(f"{root}: the EmoEvaluation files list no utterance with a {classes}-class label")
    no_audio = sum(1 for r in rows if not r.audio_path)
    if no_audio:
        notes.append(f"{no_audio} utterance(s) have no sentences/wav file: their audio is cut from the video")
    return Prepared(f"iemocap{classes}", rows, skipped, notes)
