"""`comp-import gcnet ...`: turn a public pre-extracted feature set into a feature store.

Only argument parsing, logging set-up, the tqdm bar and the printed summary live here; the conversion is
`pipeline.gcnet_import.import_gcnet`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from core.clip import MODALITIES
from core.records import StoreError
from pipeline.cli import CliError, HelpFormatter
from pipeline.cli.logs import cli_logging, level_for
from pipeline.cli.progress import TqdmProgress
from pipeline.gcnet_import import DATASETS, GcnetImportError, import_gcnet

log = logging.getLogger("comp-import")

EPILOG = """\
examples:
  comp-import gcnet --labels IEMOCAP/IEMOCAP_features_raw_4way.pkl \\
      --audio IEMOCAP/features/wav2vec-large-c-UTT --text IEMOCAP/features/deberta-large-4-UTT \\
      --visual IEMOCAP/features/manet_UTT --out iemocap4.h5
  comp-import gcnet --labels CMUMOSI/CMUMOSI_features_raw_2way.pkl \\
      --audio CMUMOSI/features/wav2vec-large-c-UTT --text CMUMOSI/features/deberta-large-4-UTT \\
      --visual CMUMOSI/features/manet_UTT --out mosi.h5 --dataset cmumosi
  comp-train iemocap4.h5 --out runs/iemo --preset iemocap4

The label pickle is read with a restricted unpickler that refuses anything but plain data.
All-zero vectors (how these sets mark an absent modality) are stored as absent with a reason.
"""



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="comp-import", formatter_class=HelpFormatter, epilog=EPILOG,
                                description="Import public pre-extracted feature sets into a feature store.")
    sub = p.add_subparsers(dest="command", metavar="SOURCE", required=True)
    g = sub.add_parser("gcnet", formatter_class=HelpFormatter, epilog=EPILOG,
                       help="GCNet / SDR-GNN / MoMKE / ComP sets (IEMOCAP-4/6, CMU-MOSI, CMU-MOSEI)",
                       description="Import a GCNet-format set: a label pickle and one folder of utterance-level "
                                   ".npy vectors per modality.")
    g.add_argument("--labels", type=Path, required=True, metavar="PKL",
                   help="label pickle, e.g. IEMOCAP_features_raw_4way.pkl or CMUMOSI_features_raw_2way.pkl")
    g.add_argument("--audio", type=Path, required=True, metavar="DIR", help="audio folder, e.g. wav2vec-large-c-UTT")
    g.add_argument("--text", type=Path, required=True, metavar="DIR", help="text folder, e.g. deberta-large-4-UTT")
    g.add_argument("--visual", type=Path, required=True, metavar="DIR", help="face folder, e.g. manet_UTT")
    g.add_argument("--out", type=Path, required=True, metavar="FILE.h5", help="feature store to write")
    g.add_argument("--dataset", choices=DATASETS, default=None,
                   help="which set this is; detected from the pickle when not given, checked against it when given")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    verb = g.add_mutually_exclusive_group()
    verb.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bar or summary")
    verb.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _check_paths(args: argparse.Namespace) -> None:
    if not args.labels.is_file():
        raise CliError(f"--labels {args.labels}: no such file")
    for m in MODALITIES:
        d = getattr(args, m)
        if not d.is_dir():
            raise CliError(f"--{m} {d}: no such folder")
    if args.out.exists() and not args.overwrite:
        raise CliError(f"--out {args.out} already exists; pass --overwrite to replace it or choose another file")
    if args.out.suffix.lower() not in (".h5", ".hdf5"):
        raise CliError(f"--out {args.out}: the feature store is an HDF5 file; name it *.h5")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with cli_logging(level_for(args.quiet, args.verbose), "%(levelname)s: %(message)s"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    progress = TqdmProgress("utt", enabled=not args.quiet)
    try:
        _check_paths(args)
        summary = import_gcnet(args.labels, {"audio": args.audio, "text": args.text, "visual": args.visual},
                               args.out, dataset=args.dataset, overwrite=args.overwrite, progress=progress)
    except (CliError, GcnetImportError, StoreError) as err:
        progress.close()
        print(f"comp-import: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"comp-import: interrupted; {args.out} is incomplete or absent: rerun with --overwrite",
              file=sys.stderr)
        return 130
    if not args.quiet:
        print("\n".join(summary.lines()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
