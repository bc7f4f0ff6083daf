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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="comp-prepare", formatter_class=HelpFormatter, epilog=EPILOG,
                                description="Turn a dataset tree in its published layout into a manifest CSV "
                                            "(labels, speakers, conversations, splits) for comp-extract.")
    sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    r = sub.add_parser("ravdess", formatter_class=HelpFormatter, epilog=EPILOG,
                       help="RAVDESS: 24 actors, 8 emotions, file-name codes",
                       description="RAVDESS (audio-only 03-*.wav, audio-visual 01-*.mp4, video-only 02-*.mp4). "
                                   "Label, intensity, statement and actor come from the file-name code; "
                                   "speaker = actor; split: actors 1-16 train, 17-20 val, 21-24 test; fold: six "
                                   "groups of four actors.")
    r.add_argument("--channel", choices=["speech", "song", "both"], default="speech", help="which recordings")
    r.add_argument("--media", choices=["auto", "av", "audio", "video"], default="auto",
                   help="auto: the audio-visual mp4 when there is one, else video-only with the wav as its audio, "
                        "else the wav")
    for sp in (r,):
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
    with open(path, "w", newline="", encoding="utf-8") as fh:
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
