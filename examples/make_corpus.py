"""Generate a small labelled video corpus for the demo and the tests.

    python examples/make_corpus.py OUT_DIR [--n-per-class 12] [--seed 0]

THIS CORPUS IS GENERATED. It shows that the pipeline works end to end (decode, ASR, embeddings, missing
modalities, training, prediction); it says nothing about recognising emotion in real recordings.

Each clip is 2-4 s of speech synthesised by espeak-ng over a still face image (scikit-image), muxed into an
mp4 by PyAV. The class shows in every modality, on purpose and synthetically:

- words: each class has its own sentences (happy ones about good news, angry ones about being lied to, ...);
- delivery: pitch, speed and loudness differ per class (happy high and quick, sad low, slow and quiet, angry
  loud and fast, neutral in between), with seeded jitter;
- look: happy clips show scikit-image's smiling astronaut (mirrored at random); the other classes show
  Labeled-Faces-in-the-Wild thumbnails from disjoint sets of people, darkened for sad, contrast-stretched
  for angry, unchanged for neutral. The look is a synthetic cue (identity and brightness), not a facial
  expression.

Some clips miss a modality for real, as recordings do: `noaudio` clips have no audio track (audio and text
absent), `silent` clips have a silent audio track (audio and text absent), `noface` clips show a scene with
no face (visual absent). Each split gets some, the held-out test split included.

Output: OUT_DIR/clips/<id>.mp4 and OUT_DIR/manifest.csv with the columns path, id, label, split,
conversation (every clip is its own conversation). The same seed gives the same corpus.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from demo import media  # noqa: E402

CLASSES: tuple[str, ...] = ("happy", "sad", "angry", "neutral")
MISSING_KINDS: tuple[str, ...] = ("noaudio", "silent", "noface")
MANIFEST = "manifest.csv"
CORPUS_INFO = "corpus.json"  # the generator's arguments: a rerun with the same ones can skip the work
MIN_DURATION_S = 2.0
TAIL_S = 0.3  # silence after the last word

SENTENCES: dict[str, tuple[str, ...]] = {
    "happy": ("What a lovely surprise, I love it!", "We won the game, this is amazing!",
              "Thank you so much, I feel great!", "This is the best day ever!",
              "I got the job, I am so happy!", "Everything worked out, how wonderful!"),
    "sad": ("I miss her so much.", "Nobody came, I feel so alone.", "I lost my job today.",
            "He is never coming back.", "I tried, but it was not enough.", "Everything feels empty now."),
    "angry": ("Stop it right now, I am furious!", "This is completely unacceptable!",
              "How dare you lie to me again!", "Get out of my office now!",
              "I told you a hundred times, listen!", "You ruined everything, I hate this!"),
    "neutral": ("The meeting is at three o'clock.", "Please put the report on the desk.",
                "The train leaves from platform two.", "The store opens at nine.",
                "I will send you the file tomorrow.", "Today is cloudy with a light wind."),
}

# espeak-ng delivery per class: (pitch 0-99, speed words/min, amplitude 0-200), each jittered per clip
DELIVERY: dict[str, tuple[int, int, int]] = {
    "happy": (75, 180, 130), "sad": (25, 120, 70), "angry": (55, 200, 190), "neutral": (45, 155, 100),
}
JITTER = (6, 12, 10)


@dataclass(frozen=True)
class CorpusClip:
    """One generated clip as the manifest lists it, plus how it was made."""

    path: str  # relative to the corpus folder
    id: str
    label: str
    split: str
    missing: str  # "" or one of MISSING_KINDS
    text: str


def _splits(n: int) -> list[str]:
    """Per class: about 60 % train, 15 % val, 25 % test (at least one of each when n >= 3)."""
    n_test = max(1, round(0.25 * n)) if n >= 3 else 0
    n_val = max(1, round(0.15 * n)) if n >= 3 else 0
    return ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test


def _missing_plan(splits: Sequence[str], class_index: int) -> list[str]:
    """Which clips of one class lose a modality: in train two kinds, in test one kind, rotating over classes."""
    plan = [""] * len(splits)
    first = {s: splits.index(s) for s in ("train", "test") if s in splits}
    if "train" in first and splits.count("train") >= 4:
        plan[first["train"]] = MISSING_KINDS[class_index % 3]
        plan[first["train"] + 1] = MISSING_KINDS[(class_index + 1) % 3]
    if "test" in first:
        plan[first["test"]] = MISSING_KINDS[class_index % 3]
    return plan


class _Looks:
    """The face image of each class (see the module docstring); LFW people are split between classes."""

    def __init__(self, classes: Sequence[str], rng: np.random.Generator) -> None:
        people = [i for i in range(100) if i not in (4, 30)]  # the two LFW thumbnails Haar finds no face in
        others = [c for c in classes if c != "happy"]
        order = rng.permutation(people)
        self.pools = {c: order[k::len(others)].tolist() for k, c in enumerate(others)}
        self.rng = rng

    def image(self, label: str, k: int) -> np.ndarray:
        if label == "happy":
            face = media.face_image("astronaut")
            return np.ascontiguousarray(face[:, ::-1]) if self.rng.random() < 0.5 else face
        pool = self.pools[label]
        face = media.face_image("lfw", index=pool[k % len(pool)]).astype(np.float32)
        if label == "sad":
            face = face * 0.55
        elif label == "angry":
            face = (face - 128.0) * 1.6 + 128.0
        return np.clip(face, 0, 255).round().astype(np.uint8)


def make_corpus(out_dir: str | Path, *, n_per_class: int = 12, seed: int = 0,
                classes: Sequence[str] = CLASSES, log: bool = False) -> list[CorpusClip]:
    """Write the corpus and its manifest under `out_dir`; returns the manifest rows."""
    unknown = [c for c in classes if c not in SENTENCES]
    if unknown:
        raise ValueError(f"no sentences for class(es) {unknown}; known: {list(SENTENCES)}")
    if n_per_class < 1:
        raise ValueError("n_per_class must be >= 1")
    out = Path(out_dir)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    looks = _Looks(classes, rng)
    rows: list[CorpusClip] = []
    splits = _splits(n_per_class)
    for c, label in enumerate(classes):
        plan = _missing_plan(splits, c)
        sentences = [SENTENCES[label][i] for i in rng.permutation(len(SENTENCES[label]))]
        for k in range(n_per_class):
            missing = plan[k]
            clip_id = f"{label}_{k:02d}" + (f"_{missing}" if missing else "")
            path = out / "clips" / f"{clip_id}.mp4"
            text = sentences[k % len(sentences)]
            pitch, speed, amplitude = (int(base + rng.integers(-j, j + 1)) for base, j in zip(DELIVERY[label], JITTER))
            image = looks.image(label, k)
            if missing == "noface":
                image = media.no_face_image(("coffee", "rocket", "noise")[k % 3], seed=seed + k)
            if missing in ("noaudio", "silent"):
                duration = float(rng.uniform(MIN_DURATION_S, 3.5))
                media.make_clip(path, audio=None if missing == "noaudio" else "silent", image=image,
                                duration_s=duration)
                text = ""
            else:
                speech = media.speak(text, pitch=pitch, speed=speed, amplitude=amplitude)
                duration = max(MIN_DURATION_S, len(speech) / media.SAMPLE_RATE + TAIL_S)
                media.write_clip(path, audio=speech, frames=image, duration_s=duration)
            rows.append(CorpusClip(path=f"clips/{clip_id}.mp4", id=clip_id, label=label, split=splits[k],
                                   missing=missing, text=text))
            if log:
                print(f"  {clip_id:<22} {splits[k]:<5} {duration:.1f} s  {text or '(' + missing + ')'}")
    write_manifest(out / MANIFEST, rows)
    (out / CORPUS_INFO).write_text(json.dumps({"n_per_class": n_per_class, "seed": seed,
                                               "classes": list(classes),
                                               "clips": [asdict(r) for r in rows]}, indent=1) + "\n")
    return rows


def write_manifest(path: Path, rows: Sequence[CorpusClip]) -> None:
    """The manifest comp-extract reads (`--manifest`): path, id, label, split, conversation."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(("path", "id", "label", "split", "conversation"))
        for r in rows:
            out.writerow((r.path, r.id, r.label, r.split, r.id))


def corpus_is_complete(out_dir: str | Path, *, n_per_class: int, seed: int,
                       classes: Sequence[str] = CLASSES) -> bool:
    """True when `out_dir` holds a corpus made with these arguments and all its clips exist."""
    out = Path(out_dir)
    try:
        info = json.loads((out / CORPUS_INFO).read_text())
    except (OSError, ValueError):
        return False
    if (info.get("n_per_class"), info.get("seed"), info.get("classes")) != (n_per_class, seed, list(classes)):
        return False
    return (out / MANIFEST).is_file() and all((out / c["path"]).is_file() for c in info.get("clips", []))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " (generated; see the docstring)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out_dir", help="folder to write clips/ and manifest.csv into")
    p.add_argument("--n-per-class", type=int, default=12, help="clips per class")
    p.add_argument("--seed", type=int, default=0, help="seed for sentences, delivery jitter and looks")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = make_corpus(args.out_dir, n_per_class=args.n_per_class, seed=args.seed, log=True)
    counts = {s: sum(r.split == s for r in rows) for s in ("train", "val", "test")}
    print(f"{len(rows)} clips in {args.out_dir} ({counts['train']} train, {counts['val']} val, "
          f"{counts['test']} test; {sum(bool(r.missing) for r in rows)} missing a modality) "
          f"in {time.perf_counter() - t0:.1f} s. Generated data: a pipeline check, not emotion recognition.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
