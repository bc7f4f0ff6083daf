"""comp-prepare: a dataset tree in its published layout → a manifest CSV for `comp-extract --manifest`.

Exit status 0 when a manifest was written (clips whose media is absent are listed on stderr and in
`<out>.skipped.csv`, they do not fail the command); 2 when the tree is not the dataset (one sentence says what
is missing) or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections import Counter
from pathlib import Path

from core.atomic import atomic_open
from pipeline.cli import HelpFormatter
from pipeline.cli.logs import cli_logging, level_for
from pipeline.recipes import Prepared, PrepareError, recipes, write_manifest

log = logging.getLogger("comp-prepare")

EPILOG = """\
examples:
  comp-prepare ravdess ~/data/RAVDESS --out ravdess.csv
  comp-extract ~/data/RAVDESS --manifest ravdess.csv --out ravdess.h5 --preset offline
  comp-train ravdess.h5 --out runs/ravdess --preset small                 # leave-four-actors-out folds
  comp-train ravdess.h5 --out runs/ravdess --preset small --set plan=split   # actors 1-16 / 17-20 / 21-24

The manifest's paths are relative to ROOT: pass the same ROOT to comp-extract. Columns comp-extract does
not read start with meta_ (e.g. meta_intensity): filter on them before extracting if you want a subset.
"""


DATASETS = {
    "ravdess": ("RAVDESS: 24 actors, 8 emotions, file-name codes",
                "RAVDESS (audio-only 03-*.wav, audio-visual 01-*.mp4, video-only 02-*.mp4). Label, intensity, "
                "statement and actor come from the file-name code; speaker = actor; split: actors 1-16 train, "
                "17-20 val, 21-24 test; fold: six groups of four actors."),
    "cremad": ("CREMA-D: 91 actors, 6 emotions, AudioWAV/ and VideoFlash/",
               "CREMA-D (AudioWAV/*.wav, VideoFlash/*.flv, ActorID_Sentence_Emotion_Level). speaker = actor; no "
               "official split, so an actor-independent one: fold = (ActorID - 1001) mod 5 + 1, split: fold 5 "
               "test, fold 4 val, the rest train."),
    "meld": ("MELD: Friends dialogues, 7 emotions or 3 sentiments, official split",
             "MELD.Raw (train/dev/test_sent_emo.csv and the dia<D>_utt<U>.mp4 folders). conversation = dialogue, "
             "position = utterance, speaker = character, the official train/dev/test split."),
    "iemocap": ("IEMOCAP full release: utterances as segments of the dialogue videos, fold = session",
                "IEMOCAP_full_release (Session*/dialog/EmoEvaluation, transcriptions, avi/DivX, sentences/wav). "
                "Each utterance is a time segment of its dialogue video with its own sentence wav as audio and "
                "the speaking actor's half of the frame as crop; conversation = dialogue, fold = session."),
    "mosi": ("CMU-MOSI in the MMSA layout (label.csv, Raw/)", "CMU-MOSI, MMSA layout: regression in [-3, 3]."),
    "mosei": ("CMU-MOSEI in the MMSA layout (label.csv, Raw/)", "CMU-MOSEI, MMSA layout: regression in [-3, 3]."),
    "sims": ("CH-SIMS in the MMSA layout (label.csv, Raw/); Mandarin",
             "CH-SIMS, MMSA layout: regression in [-1, 1]. Mandarin: use a Chinese or multilingual text encoder."),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="comp-prepare", formatter_class=HelpFormatter, epilog=EPILOG,
                                description="Turn a dataset tree in its published layout into a manifest CSV "
                                            "(labels, speakers, conversations, splits) for comp-extract.")
    sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    parsers = {name: sub.add_parser(name, formatter_class=HelpFormatter, epilog=EPILOG, help=short,
                                    description=long) for name, (short, long) in DATASETS.items()}
    r = parsers["ravdess"]
    r.add_argument("--channel", choices=["speech", "song", "both"], default="speech", help="which recordings")
    r.add_argument("--media", choices=["auto", "av", "audio", "video"], default="auto",
                   help="auto: the audio-visual mp4 when there is one, else video-only with the wav as its audio, "
                        "else the wav")
    parsers["cremad"].add_argument("--media", choices=["auto", "av", "audio", "video"], default="auto",
                                   help="auto: the flv with the wav as its audio when both exist, else the one there")
    parsers["meld"].add_argument("--label", choices=["emotion", "sentiment"], default="emotion",
                                 help="which annotation becomes the label")
    parsers["iemocap"].add_argument("--classes", type=int, choices=[4, 6], default=4,
                                    help="4: neutral, happy (+excited), sad, angry; 6: adds excited and frustrated")
    parsers["iemocap"].add_argument("--context", choices=["labelled", "all"], default="labelled",
                                    help="all: keep utterances outside the label map as unlabelled context")
    for name in ("mosi", "mosei", "sims"):
        parsers[name].add_argument("--label-column", default="label",
                                   help="the label.csv column that becomes the value (label_T/A/V in CH-SIMS)")
    for sp in parsers.values():
        sp.add_argument("root", metavar="ROOT", type=Path, help="the dataset folder, as downloaded and unpacked")
        sp.add_argument("--out", metavar="CSV", type=Path, required=True, help="manifest to write")
        sp.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return p


def _options(args: argparse.Namespace) -> dict:
    skip = {"dataset", "root", "out", "quiet"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def _summary(prepared: Prepared, out: Path, columns: list[str]) -> str:
    rows = prepared.rows
    lines = [f"manifest   {out}  ({len(rows)} clips; columns {', '.join(columns)})"]
    labels = Counter(r.label for r in rows if r.label)
    if labels:
        lines.append("labels     " + ", ".join(f"{k} {v}" for k, v in sorted(labels.items())))
    speakers = {r.speaker for r in rows if r.speaker}
    if speakers:
        lines.append(f"speakers   {len(speakers)}")
    splits = Counter(r.split for r in rows if r.split)
    if splits:
        lines.append("split      " + ", ".join(f"{k} {splits[k]}" for k in ("train", "val", "test") if k in splits))
    folds = Counter(r.fold for r in rows if r.fold)
    if folds:
        lines.append("folds      " + ", ".join(f"{k}: {v}" for k, v in sorted(folds.items())))
    if prepared.skipped:
        lines.append(f"skipped    {len(prepared.skipped)} (listed in {out}.skipped.csv)")
    return "\n".join(lines)


def _write_skipped(prepared: Prepared, out: Path) -> None:
    path = out.with_name(out.name + ".skipped.csv")
    if not prepared.skipped:
        path.unlink(missing_ok=True)
        return
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "reason"])
        writer.writerows((s.id, s.reason) for s in prepared.skipped)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with cli_logging(level_for(args.quiet, False), "%(levelname)s %(message)s"):
        try:
            prepared = recipes()[args.dataset](args.root, **_options(args))
        except PrepareError as err:
            log.error("%s", err)
            return 2
        for note in prepared.notes:
            log.warning("%s", note)
        for s in prepared.skipped[:10]:
            log.warning("skipped %s: %s", s.id, s.reason)
        if len(prepared.skipped) > 10:
            log.warning("... and %d more skipped", len(prepared.skipped) - 10)
        columns = write_manifest(prepared.rows, args.out)
        _write_skipped(prepared, args.out)
        if not args.quiet:
            print(_summary(prepared, args.out, columns), file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
