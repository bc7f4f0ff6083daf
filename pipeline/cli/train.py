"""`comp-train FEATS.h5 --out DIR`: train and evaluate ComP on a feature store.

The CLI resolves one `TrainConfig` (a preset or a YAML file, then `--set` overrides, then the short flags),
checks the store, and hands everything to `pipeline.train.run_training`; the only things that live here are the
argument parsing, logging set-up, and the tqdm progress bar (the library itself only logs).

Several processes: under `torchrun --nproc_per_node N` (or with `--nproc N`, which launches them itself) the
ranks train each run together with DistributedDataParallel, or with `--fan-out` split the fold x seed runs
between them (comp.parallel). Rank 0 writes the outputs and the log; the others only report warnings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from comp.config import TrainConfig
from core.config import apply_overrides, load_yaml
from core.distributed import DistEnv, DistributedError
from core.errors import ConfigError
from pipeline.cli import CliError, HelpFormatter
from pipeline.cli.logs import cli_logging, level_for
from pipeline.cli.progress import TqdmProgress
from pipeline.presets import available_presets, preset_path

log = logging.getLogger("comp-train")

PRESETS = tuple(available_presets("train"))

EPILOG = """\
examples:
  comp-train feats.h5 --out runs/demo --preset small
  comp-train iemocap4.h5 --out runs/iemo --preset iemocap4 --missing random:0.3 --seeds 3
  comp-train iemocap4.h5 --out runs/paper --preset iemocap4 --variant faithful --missing random:0.5
  comp-train mosi.h5 --out runs/mosi --preset cmumosi --missing fixed:a,t,v,at,av,tv,atv
  comp-train feats.h5 --out runs/x --config my.yaml --set model.hidden=128 --set lr=3e-4 --folds 1,2
  comp-train iemocap4.h5 --out runs/ddp --preset iemocap4 --nproc 2
      two processes train every run together (DDP, one GPU each); batch_size stays the global batch
  comp-train iemocap4.h5 --out runs/all --preset iemocap4 --seeds 7 --fan-out --nproc 4
      the 5 folds x 7 seeds are split over 4 processes; rank 0 writes the one metrics.json and report
  torchrun --nproc_per_node 8 -m pipeline.cli.train iemocap4.h5 --out runs/big --fan-out

missing modalities:
  natural        only what the extractor could not measure (the store's present flags)
  random:R       the GCNet/ComP protocol on top of natural (missing rate R in 0..0.7; never resurrects)
  fixed:LIST     evaluate each listed condition (a, t, v, at, ...) and their pool; training sees all of them

variants:
  clean      the paper as written; epoch chosen on validation data; fixed, seeded test masks; mean +- std
  faithful   the released code, quirks included; epoch chosen on the TEST set with test masks redrawn each
             epoch (the paper's protocol) - numbers are labelled "selected on test (paper protocol)"

saved model: best.pt is one named run (fold, seed) at one epoch. Clean: only stage-2 epochs (the fused head
  is trained in stage 2), the best validation score, ties broken by the lower validation loss, then the later
  epoch; across seeds and folds the run with the best validation score (then loss; then the earlier run).
  The summary and report.html name it, with its validation and test scores and the split sizes.

outputs in --out: best.pt, runs/*.pt, refit.pt (--refit), metrics.json, config.yaml, train.log, report.html
"""


DEFAULTS = TrainConfig()


def _from_config(value: object) -> str:
    return f"(default: the preset's or config's, else {value})"



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="comp-train", description="Train and evaluate ComP (cross-modal prompting) on a feature store.",
        formatter_class=HelpFormatter, epilog=EPILOG)
    p.add_argument("store", type=Path, help="feature store written by comp-extract or comp-import")
    p.add_argument("--out", type=Path, required=True, help="output folder (created; files in it are replaced)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=PRESETS, default=None,
                     help="a training preset from configs/train-<name>.yaml (default: the built-in defaults)")
    src.add_argument("--config", type=Path, default=None, help="a YAML TrainConfig file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. model.hidden=128 or lr=3e-4 (repeatable)")
    p.add_argument("--variant", choices=("clean", "faithful"), default=None,
                   help=f"model/protocol variant {_from_config(DEFAULTS.model.variant)}")
    p.add_argument("--missing", default=None, metavar="SPEC",
                   help=f"natural | random:R | fixed:a,t,v,at,av,tv,atv {_from_config(DEFAULTS.missing)}")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"total epochs, stage 1 + stage 2 {_from_config(DEFAULTS.epochs)}")
    p.add_argument("--stage-epochs", type=int, default=None,
                   help="stage-1 epochs (default: the preset's or config's, scaled to --epochs when only that is "
                        f"given, else {DEFAULTS.stage_epochs})")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"number of seeds: seed, seed+1, ... {_from_config(DEFAULTS.seeds)}")
    p.add_argument("--folds", default=None,
                   help=f"held-out folds to run: all or a list like 1,3 {_from_config(DEFAULTS.folds)}")
    p.add_argument("--device", default=None, help=f"auto | cpu | cuda | cuda:N {_from_config(DEFAULTS.device)}")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"conversations per batch {_from_config(DEFAULTS.batch_size)}")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=None,
                   help="fit the simple baselines on the same splits and masks (default: on, unless the preset or "
                        "config says baselines: false)")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="after selection, also retrain the run saved to best.pt on train+val for its selected number "
                        f"of epochs and write refit.pt, which has no held-out score {_from_config('off')}")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N processes on this machine (like torchrun --nproc_per_node N; one GPU each)")
    p.add_argument("--fan-out", action="store_true",
                   help="with several processes: split the fold x seed runs between them instead of training "
                        "each run data parallel")
    verb = p.add_mutually_exclusive_group()
    verb.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bar")
    verb.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--log-file", type=Path, default=None, help="log file (default: OUT/train.log)")
    return p


# the short flags and the config keys they set (applied after --set, so they win)
SHORT_FLAGS = {"variant": "model.variant", "missing": "missing", "epochs": "epochs", "stage_epochs": "stage_epochs",
               "seeds": "seeds", "folds": "folds", "device": "device", "batch_size": "batch_size",
               "baselines": "baselines", "refit": "refit"}


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the flags describe: preset/file, then --set, then the short flags."""
    if args.config is not None:
        if not args.config.is_file():
            raise CliError(f"--config {args.config}: no such file")
        cfg = load_yaml(TrainConfig, args.config)
    elif args.preset is not None:
        cfg = load_yaml(TrainConfig, preset_path("train", args.preset))
    else:
        cfg = TrainConfig()
    cfg = apply_overrides(cfg, args.overrides)
    flags = {key: getattr(args, flag) for flag, key in SHORT_FLAGS.items() if getattr(args, flag) is not None}
    if args.epochs is not None and args.stage_epochs is None:  # keep the preset's stage-1 share of the schedule
        share = cfg.stage_epochs / cfg.epochs if cfg.epochs else 0.5
        # leave at least one stage-2 epoch: the fused prediction is trained in stage 2 only
        flags["stage_epochs"] = min(max(args.epochs - 1, 0), round(args.epochs * share))
    # JSON is YAML: strings stay strings, so "1,3" or "random:0.3" are never read as something else
    cfg = apply_overrides(cfg, [f"{key}={json.dumps(value)}" for key, value in flags.items()])
    if cfg.batch_size < 1:
        raise CliError("batch size must be >= 1")
    if cfg.epochs < 1:
        raise CliError("epochs must be >= 1")
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    from core.distributed import env_from_os

    try:
        env = env_from_os()
        if args.nproc < 1:
            raise CliError("--nproc must be >= 1")
        if args.nproc > 1 and env.is_distributed:
            raise CliError("--nproc inside a torchrun job: use one or the other")
        cfg = resolve_config(args)
        from comp.masks import parse_missing
        from core.devices import resolve_device
        from core.records import StoreError
        from pipeline.store import read_header

        try:
            parse_missing(cfg.missing)
        except ValueError as err:
            raise CliError(f"--missing {cfg.missing!r}: {err}") from None
        try:
            resolve_device(cfg.device)
        except ValueError as err:
            raise CliError(str(err)) from None
        if not args.store.is_file():
            raise CliError(f"{args.store}: no such feature store (write one with comp-extract or comp-import)")
        try:
            read_header(args.store)
        except (StoreError, OSError) as err:
            raise CliError(f"{args.store}: not a readable feature store: {err}") from None
        if args.out.exists() and not args.out.is_dir():
            raise CliError(f"--out {args.out}: exists and is not a folder")
    except (CliError, ConfigError, DistributedError) as err:
        parser.print_usage(sys.stderr)
        print(f"comp-train: error: {err}", file=sys.stderr)
        return 2

    if args.nproc > 1:
        from pipeline.cli.launch import launch_local, strip_option

        return launch_local("pipeline.cli.train", strip_option(argv, "--nproc"), args.nproc)

    args.out.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        logs = cli_logging(level_for(args.quiet, args.verbose), "%(message)s", args.log_file or args.out / "train.log",
                           file_level=logging.DEBUG if args.verbose else logging.INFO)
    else:  # rank 0 writes train.log and reports progress; the others only warn
        logs = cli_logging(level_for(True, args.verbose), env.tag + "%(message)s")
    with logs:
        return _train(args, cfg, env)


def _train(args: argparse.Namespace, cfg: TrainConfig, env: DistEnv) -> int:
    from comp.parallel import start
    from comp.train import TrainingError
    from core.distributed import PeerError
    from core.records import StoreError
    from pipeline.train import run_training

    progress = TqdmProgress("batch", enabled=not args.quiet and env.is_main)
    try:
        with start(cfg.device, env, fan_out=args.fan_out) as parallel:
            run_training(args.store, cfg, args.out, progress=progress, parallel=parallel)
    except PeerError as err:
        if env.is_main:
            log.error("comp-train: %s", err)
        return 2
    except (StoreError, TrainingError, ConfigError, DistributedError) as err:
        log.error("comp-train: %s", err)
        return 2
    except KeyboardInterrupt:
        if env.is_main:
            log.error("comp-train: interrupted; per-run checkpoints already written are in %s", args.out / "runs")
        return 130
    return 0  # the summary was logged by run_training (console and train.log)


if __name__ == "__main__":
    sys.exit(main())
