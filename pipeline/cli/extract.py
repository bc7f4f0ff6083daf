"""comp-extract: turn a folder of clips (or a manifest) into a feature store, resumably.

Exit status: 0 when the run finished with at least one clip extracted (clips that failed are recorded in the
store and the failures file, they do not fail the run); 1 when not a single clip could be extracted; 2 for a
systemic failure (no inputs, unwritable output, a store of another spec or of older rules, a model or setting
that cannot be used), with one line on stderr (the traceback too with -v).

Several processes: under `torchrun --nproc_per_node N` (or `--nproc N`, which launches the N processes itself)
every rank extracts its share of the clips on its own device (cuda:LOCAL_RANK) and rank 0 merges the parts
into the one store (pipeline.extract.run_sharded_extraction). Only rank 0 prints the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from core.config import apply_overrides, dump_yaml
from core.distributed import (
    DistEnv,
    DistributedError,
    PeerError,
    device_for_rank,
    env_from_os,
    process_group,
    run_on_main,
)
from core.errors import ConfigError
from pipeline.cli import HelpFormatter
from pipeline.cli.launch import launch_local, strip_option
from pipeline.cli.logs import DETAILED, cli_logging, level_for, quiet_transformers
from pipeline.cli.progress import TqdmProgress

EPILOG = """examples:
  comp-extract videos/ --out feats.h5 --preset offline
      every clip below videos/ (any file FFmpeg finds audio or footage in: mp4 mkv flv m4a wav ...; images,
      subtitles and text files are skipped and counted), with models that ship in pip packages
  comp-extract videos/ --out feats.h5 --labels-from-folders
      videos/angry/a.mp4 gets label "angry"; the default preset loads Whisper, wav2vec2 and DeBERTa from the hub
  comp-extract media/ --manifest clips.csv --out feats.h5 --device cuda --batch-size 16
      columns: path (relative to media/), and optionally id, label, value, conversation, position, speaker, split, fold
  comp-extract videos/ --out feats.h5 --set decode.fps=4 --set audio.config.layers=last
      change one setting; a different setting is a different spec, so write to a new file or pass --overwrite
  comp-extract videos/ --out feats.h5 --retry-failed
      rerun only the clips recorded as errors (a plain rerun resumes an interrupted run)
  comp-extract videos/ --out feats.h5 --nproc 4
      four processes on this machine (one per GPU with --device auto); same as torchrun --nproc_per_node 4
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv-endpoint host0:29500 -m pipeline.cli.extract videos/ --out feats.h5
      several machines: INPUT and --out on a file system every machine sees
  comp-extract --preset offline --print-config > my-extract.yaml
      write the resolved settings, edit them, then use --config my-extract.yaml
"""

log = logging.getLogger("comp-extract")
LOG_EVERY_S = 30.0  # off a terminal, a progress line at most this often


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="comp-extract",
        description="Decode clips, run ASR and the audio/text/face encoders, and write one feature store "
                    "(HDF5) with every missing modality and its reason. Rerunning the same command resumes.",
        formatter_class=HelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("input", nargs="?", metavar="INPUT",
                   help="a folder of clips (searched recursively), one media file, or the root the manifest's "
                        "paths are relative to")
    p.add_argument("--out", metavar="FEATS.h5", help="the feature store to write or resume")
    p.add_argument("--manifest", metavar="CSV", help="CSV listing the clips (column 'path' required)")
    p.add_argument("--labels-from-folders", action="store_true",
                   help="label each clip with the name of the folder that holds it")
    p.add_argument("--task", choices=["auto", "classification", "regression"], default="auto",
                   help="auto: regression when the manifest has values, else classification")
    p.add_argument("--preset", default="default",
                   help="named settings in configs/extract-<name>.yaml: default (hub models) or offline "
                        "(weights from pip packages)")
    p.add_argument("--config", metavar="FILE", help="a YAML extraction config (replaces --preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. decode.fps=4 or visual.config.min_face_frames=3 (repeatable)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, help="clips per model batch (default: from the config)")
    p.add_argument("--num-workers", type=int, help="decoding threads ahead of the models (default: from the config)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing store at --out and start fresh")
    p.add_argument("--retry-failed", action="store_true", help="redo the clips recorded with status error")
    p.add_argument("--threads", type=int, default=default_threads(), metavar="N",
                   help="torch CPU threads for the models (intra-op). The default, half the CPU cores this "
                        "process may use (here %(default)s), leaves the other half to the decoding threads; "
                        "on a machine shared with other jobs, 1 is often fastest")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="extract with N processes on this machine (one per GPU with --device auto/cuda), like "
                        "torchrun --nproc_per_node N; a rerun with the same N resumes")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only warnings and the summary; no progress bar")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    p.add_argument("--log-file", metavar="FILE", help="also write the full (debug) log here")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p


def default_threads() -> int:
    """Half the CPU cores this process may run on, at least 1 (`--threads`' default)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def _set_threads(threads: int, env: DistEnv) -> None:
    """torch intra-op threads: `threads` for one process, split among the ranks of a local launch."""
    import torch

    if threads < 1:
        raise ValueError("--threads must be >= 1")
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if env.is_distributed else 1
    torch.set_num_threads(max(1, threads // max(1, ranks_here)))


def _logging(args: argparse.Namespace, env: DistEnv) -> contextlib.AbstractContextManager:
    """Console (and file) logging for the run. In a distributed job ranks other than 0 only report warnings
    (their info would repeat rank 0's) and write their log file next to rank 0's, with a `.rank<r>` suffix."""
    level = level_for(args.quiet, args.verbose)
    if not env.is_main and not args.verbose:
        level = logging.WARNING
    log_file = None
    if args.log_file:
        log_file = Path(args.log_file if env.is_main else f"{args.log_file}.rank{env.rank}")
    if not args.verbose:
        quiet_transformers()
    return cli_logging(level, env.tag + (DETAILED if args.verbose else "%(levelname)s %(message)s"), log_file)


def _resolve_config(args: argparse.Namespace):
    from core.clip import STAGES
    from pipeline.extract_config import StageConfig, load_config, load_preset, with_stage_defaults

    cfg = load_config(args.config) if args.config else load_preset(args.preset)
    overrides = list(args.overrides)
    if args.batch_size is not None:
        overrides.append(f"batch_size={args.batch_size}")
    if args.num_workers is not None:
        overrides.append(f"num_workers={args.num_workers}")
    # Plugins and extractor names first (another extractor starts from its own defaults), then every
    # extractor key is filled in so that --set can reach each of them.
    first = [o for o in overrides if _key(o) == "plugins" or _key(o).endswith(".name")]
    cfg = apply_overrides(cfg, first)
    renamed = {_key(o).split(".")[0] for o in first if _key(o).endswith(".name")}
    cfg = replace(cfg, **{s: StageConfig(cfg.stage(s).name, {}) for s in renamed if s in STAGES})
    cfg = with_stage_defaults(cfg)
    return apply_overrides(cfg, [o for o in overrides if o not in first])


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        env = env_from_os()
    except DistributedError as err:
        print(f"comp-extract: error: {err}", file=sys.stderr)
        return 2
    with _logging(args, env):
        return _main(args, argv, parser, env)


def _main(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser, env: DistEnv) -> int:
    try:
        if args.nproc != 1 and not args.print_config:
            return _launch(args, argv, parser)
        return _run(args, parser, env)
    except KeyboardInterrupt:
        if env.is_main:
            print("comp-extract: interrupted; what was extracted is saved, rerun the same command to resume",
                  file=sys.stderr)
        return 130
    except Exception as err:  # systemic failure: one clear line, the traceback only with -v
        from core.records import StoreError
        from pipeline.extract import ExtractionError
        from pipeline.inputs import InputError

        known = (ConfigError, InputError, StoreError, ExtractionError, DistributedError)
        if isinstance(err, PeerError) and not env.is_main:
            return 2  # rank 0 reports the failing rank's error; saying it N times helps nobody
        if args.verbose or not isinstance(err, known):
            log.error("traceback:", exc_info=True)
        print(f"comp-extract: error: {env.tag}{err}", file=sys.stderr)
        return 2


def _launch(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser) -> int:
    """--nproc N: check what can be checked once, then run N ranks of this command (torchrun's way)."""
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    if args.input is None or args.out is None:
        parser.error("INPUT and --out are required (unless --print-config)")
    _resolve_config(args)  # a bad setting is reported once, not by every rank
    from pipeline.extract import check_writable

    check_writable(args.out)
    return launch_local("pipeline.cli.extract", strip_option(argv, "--nproc"), args.nproc)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser, env: DistEnv) -> int:
    cfg = _resolve_config(args)
    if args.print_config:
        sys.stdout.write(dump_yaml(cfg))
        return 0
    if args.input is None or args.out is None:
        parser.error("INPUT and --out are required (unless --print-config)")
    if env.is_distributed:
        return _run_rank(args, cfg, env)

    from pipeline.extract import check_writable, resolve_device, run_extraction
    from pipeline.inputs import gather_inputs

    if args.threads < 1:
        parser.error("--threads must be >= 1")
    _set_threads(args.threads, env)
    inputs = gather_inputs(args.input, manifest=args.manifest, labels_from_folders=args.labels_from_folders)
    items = inputs.items
    check_writable(args.out)
    device = resolve_device(args.device)
    log.info("%d clips from %s; device %s, %d CPU threads; writing %s", len(items), args.manifest or args.input,
             device, args.threads, args.out)
    if inputs.skipped:
        log.warning("%d file(s) in %s are not clips and were skipped: %s", sum(map(len, inputs.skipped.values())),
                    args.input, inputs.skipped_summary())
    bar = TqdmProgress("clip", enabled=not args.quiet, log_every_s=LOG_EVERY_S)
    redirect = contextlib.nullcontext()
    if bar.enabled and bar.tty:
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm()
    try:
        with redirect:
            summary = run_extraction(items, args.out, cfg, device=device, overwrite=args.overwrite,
                                     retry_failed=args.retry_failed, progress=bar,
                                     task=None if args.task == "auto" else args.task)
    finally:
        bar.close()
    summary.skipped_files = inputs.skipped_summary()
    return _report(summary, args)


def _report(summary, args: argparse.Namespace) -> int:
    """Print the summary; exit status 1 when not a single clip of the inputs was extracted."""
    print(summary.table())
    if args.log_file:
        print(f"log        {args.log_file}")
    if summary.ok == 0:
        print(f"comp-extract: error: not a single clip could be extracted ({summary.error} errors); the reasons "
              f"are in {summary.failures_path}", file=sys.stderr)
        return 1
    return 0


def _run_rank(args: argparse.Namespace, cfg, env: DistEnv) -> int:
    """One rank of a distributed extraction: rank 0 lists the clips, every rank extracts its share."""
    import torch

    from pipeline.extract import run_sharded_extraction
    from pipeline.inputs import gather_inputs

    _set_threads(args.threads, env)
    device = device_for_rank(args.device, env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with process_group(env, backend="gloo") as job:  # only small control messages travel between ranks
        inputs = run_on_main(job, lambda: gather_inputs(args.input, manifest=args.manifest,
                                                        labels_from_folders=args.labels_from_folders))
        items = inputs.items
        if env.is_main:
            log.info("%d clips from %s; %d processes; writing %s", len(items), args.manifest or args.input,
                     env.world_size, args.out)
        bar = TqdmProgress("clip", enabled=env.is_main and not args.quiet, log_every_s=LOG_EVERY_S)
        redirect = contextlib.nullcontext()
        if bar.enabled and bar.tty:
            from tqdm.contrib.logging import logging_redirect_tqdm

            redirect = logging_redirect_tqdm()
        try:
            with redirect:
                summary = run_sharded_extraction(items, args.out, cfg, job, device=device,
                                                 overwrite=args.overwrite, retry_failed=args.retry_failed,
                                                 progress=bar if env.is_main else None,
                                                 task=None if args.task == "auto" else args.task)
        finally:
            bar.close()
    if env.is_main:
        summary.skipped_files = inputs.skipped_summary()
        return _report(summary, args)
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
