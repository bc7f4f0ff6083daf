"""comp-predict: emotion and modality status for raw clips, from a comp-train checkpoint.

Exit status: 0 when every clip was predicted, 1 when some clip could not be (its object says why),
2 for a usage error or a checkpoint that cannot be honoured (one line on stderr says why).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from core.clip import MODALITIES
from pipeline.cli import HelpFormatter
from pipeline.cli.logs import cli_logging, level_for, quiet_transformers
from pipeline.cli.progress import TqdmProgress
from pipeline.timeline.options import TimelineOptions as TimelineDefaults

PROGRESS_FROM = 4  # clips: below this a bar is more noise than help
TIMELINE_LOG_EVERY_S = 30.0  # off a terminal, a timeline's progress line at most this often
TIMELINE_UNITS = {"asr": "s", "utterances": "utt", "model": "window", "decode": "file"}  # per timeline stage

EPILOG = """examples:
  comp-predict clip.mp4 --model runs/iemocap4
  comp-predict clips/ more.mp4 --model runs/iemocap4/best.pt --out predictions.jsonl
  comp-predict clip.mp4 --model runs/iemocap4 --format table
  comp-predict interview.mp4 --model runs/iemocap4 --timeline --plot timeline.png

One clip prints one JSON object; several print JSON Lines (one object per clip). Each object holds the
prediction (label and per-class probabilities, or a value for regression), which modalities were present
(and why not, when absent), the transcript, ASR and face diagnostics, the checkpoint and its extraction spec
hash, and the time spent decoding, extracting and running the model.

--timeline follows emotion through a long recording (an interview, a session, a meeting): the recording is
cut into utterances where its speech is (silero-vad and Whisper's timestamps; pauses of at least
--min-silence seconds between utterances, none longer than --max-utterance seconds), each utterance is
extracted like a training clip, and the utterances are predicted as one conversation when the model was
trained on multi-utterance conversations (in windows of at most its max_len; the object's "context" says
which and why). One JSON object per recording, its "utterances" holding start and end (seconds), transcript,
modalities and prediction; --format table prints one row per utterance. A recording without speech (or
audio) is cut every --max-utterance seconds, so that the face is still followed.

exit status: 0 every clip (utterance) predicted; 1 some clip or utterance could not be (undecodable, or no
modality present: its object says why); 2 usage error, or a checkpoint this installation cannot honour (one
line says why)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="comp-predict", description=__doc__.split("\n")[0], epilog=EPILOG,
                                formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="CLIP", help="media files and/or folders (searched recursively)")
    p.add_argument("--model", "-m", required=True, metavar="RUN",
                   help="run folder written by comp-train (holding best.pt) or a checkpoint file")
    p.add_argument("--out", "-o", metavar="FILE",
                   help="write the JSON (Lines) here instead of stdout (default: stdout)")
    p.add_argument("--format", choices=("json", "table"), default="json",
                   help="json: one object per clip; table: a short human-readable table")
    timeline = p.add_argument_group("emotion over time (long recordings)")
    timeline.add_argument("--timeline", action="store_true",
                          help="one object per recording with a prediction per utterance (see below)")
    timeline.add_argument("--plot", metavar="PNG",
                          help="draw probability per class over time, utterances shaded and missing "
                               "modalities marked, to this PNG file (implies --timeline; one recording only)")
    timeline.add_argument("--max-utterance", type=float, default=TimelineDefaults.max_utterance_s, metavar="S",
                          help="longest utterance in seconds; longer speech is split at its longest pause "
                               "(default: %(default)g)")
    timeline.add_argument("--min-silence", type=float, default=TimelineDefaults.min_silence_s, metavar="S",
                          help="a pause at least this long (seconds) ends an utterance (default: %(default)g)")
    timeline.add_argument("--margin", type=_margin, default=None, metavar="S|auto",
                          help="seconds of recording around each utterance's speech given to the extractors "
                               "(the reported start/end stay on the speech); auto: as much as the model's "
                               "training clips had (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="torch CPU threads, 0 = torch's default (default: 0)")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    return p


def _cell(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _prediction_cells(pred: dict[str, Any] | None) -> tuple[str, str]:
    """The table's prediction and p cells: label and its probability, a regression value, or dashes."""
    if pred is None:
        return "-", "-"
    if "label" in pred:
        return pred["label"], f"{pred['probs'][pred['label']]:.2f}"
    return f"{pred['value']:.3f}", ""


def _modality_cell(entry: dict[str, Any], error: str = "") -> str:
    """"yes", or "no: " + the reason; a reason the error column already spells out shows its code only."""
    if entry.get("present"):
        return "yes"
    reason = str(entry.get("reason", ""))
    return f"no: {reason.split(':', 1)[0] if reason and reason in error else reason}"


def display_names(clips: Sequence[str]) -> list[str]:
    """The clips' paths relative to the folder they all lie in, so that angry/clip0.mp4 and sad/clip0.mp4
    stay apart; one clip: its file name."""
    if len(clips) == 1:
        return [Path(clips[0]).name]
    paths = [Path(c) for c in clips]
    try:
        root = os.path.commonpath([str(p.parent) for p in paths])
    except ValueError:  # absolute and relative paths mixed
        paths = [p.resolve() for p in paths]
        root = os.path.commonpath([str(p.parent) for p in paths])
    return [os.path.relpath(p, root) for p in paths]


# widths of the cells (text longer than this ends in "…"): a modality cell holds "no: " + the longest reason
# code with its detail ("no: no-audio: no-audio-stream", "no: too-few-face-frames: 12/32"); errors are not cut
LIMITS = {"clip": 48, "prediction": 12, "p": 4, "audio": 36, "text": 36, "visual": 36, "transcript": 40}


def format_table(results: Sequence[dict[str, Any]], names: Sequence[str] | None = None) -> str:
    """A short fixed-width table: clip, prediction, its probability (rounded; the JSON keeps full precision),
    each modality, transcript, and the error of each clip that could not be predicted (only when there is one).
    `names` label the rows (default: the paths relative to their common folder, `display_names`)."""
    names = list(names) if names is not None else display_names([r["clip"] for r in results])
    header = ["clip", "prediction", "p", *MODALITIES, "transcript"]
    errors = any(r.get("prediction") is None for r in results)
    if errors:
        header.append("error")
    rows = []
    for name, r in zip(names, results):
        label, conf = _prediction_cells(r.get("prediction"))
        mods, error = r["modalities"], str(r.get("error", ""))
        row = [name, label, conf, *(_modality_cell(mods[m], error) for m in MODALITIES),
               r.get("transcript", "")]
        if errors:
            row.append(r.get("error", ""))
        rows.append(row)
    cells = [[_cell(v, LIMITS.get(h, 10_000)) for v, h in zip(row, header)] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


TIMELINE_LIMITS = {**LIMITS, "transcript": 60}


def format_timeline_table(result: dict[str, Any]) -> str:
    """One recording's timeline as a heading (recording, utterances, whether conversation context was used and
    why) and one row per utterance: start, end, prediction, p, each modality, transcript, error."""
    context = result.get("context") or {}
    rows = result.get("utterances") or []
    head = (f"{result['clip']}: {len(rows)} utterances in {result.get('duration_s') or 0:.1f} s; conversation "
            f"context {'used' if context.get('used') else 'not used'}: {context.get('why', '')}")
    if result.get("error"):
        return f"{result['clip']}: not predicted: {result['error']}"
    header = ["start", "end", "prediction", "p", *MODALITIES, "transcript"]
    errors = any(r.get("prediction") is None for r in rows)
    if errors:
        header.append("error")
    body = []
    for r in rows:
        label, conf = _prediction_cells(r.get("prediction"))
        error = str(r.get("error", ""))
        row = [f"{r['start']:.2f}", f"{r['end']:.2f}", label, conf,
               *(_modality_cell(r["modalities"][m], error) for m in MODALITIES),
               r.get("transcript", "")]
        if errors:
            row.append(error)
        body.append(row)
    cells = [[_cell(v, TIMELINE_LIMITS.get(h, 10_000)) for v, h in zip(row, header)] for row in [header, *body]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([head, *lines])


def _write(results: list[dict[str, Any]], fmt: str, stream: TextIO, *, lines: bool) -> None:
    if fmt == "table":
        stream.write(format_table(results) + "\n")
    elif lines:
        for r in results:
            stream.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        stream.write(json.dumps(results[0], ensure_ascii=False, indent=2) + "\n")


def _margin(text: str) -> float | None:
    """--margin: seconds, or "auto" (None: the checkpoint's)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or 'auto', got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_transformers()
    level = logging.ERROR if args.quiet else level_for(False, args.verbose, default=logging.WARNING)
    with cli_logging(level, "%(levelname)s %(name)s: %(message)s"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()

    import torch

    from core.errors import ConfigError
    from pipeline.inputs import InputError
    from pipeline.predict import PredictError, Predictor, collect_clips
    from pipeline.timeline.options import TimelineOptions

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    timeline = args.timeline or args.plot is not None
    try:
        options = TimelineOptions(max_utterance_s=args.max_utterance, min_silence_s=args.min_silence,
                                  margin_s=args.margin)
        clips = collect_clips(args.inputs)
        if args.plot is not None and len(clips) > 1:
            raise PredictError(f"--plot draws one recording; {len(clips)} were given (plot them one at a time)")
        predictor = Predictor.from_checkpoint(args.model, device=args.device)
    except (PredictError, InputError, ConfigError) as err:
        print(f"comp-predict: error: {err}", file=sys.stderr)
        return 2
    log = logging.getLogger("comp-predict")
    log.info("models ready in %.2f s", time.perf_counter() - t_start)

    if timeline:
        return _run_timeline(args, predictor, clips, options)
    out_path = Path(args.out) if args.out else None
    many = len(clips) > 1
    results: list[dict[str, Any]] = []
    failed = 0
    stream: TextIO = sys.stdout
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        stream = open(out_path, "w", encoding="utf-8")
    bar = TqdmProgress("clip", enabled=not args.quiet, min_total=PROGRESS_FROM)
    try:
        bar("predicting", 0, len(clips))
        for done, pred in enumerate(predictor.predict_paths(clips), start=1):
            result = pred.to_dict()
            results.append(result)
            if result["prediction"] is None:
                failed += 1
                log.warning("%s: %s", result["clip"], result.get("error", "not predicted"))
            if args.format == "json" and many:  # JSON Lines stream as clips finish
                with bar.lifted(stream):  # lifts the bar when both share a terminal
                    stream.write(json.dumps(result, ensure_ascii=False) + "\n")
                    stream.flush()
            bar("predicting", done, len(clips))
        bar.close()
        if args.format == "table" or not many:
            _write(results, args.format, stream, lines=many)
    finally:
        bar.close()
        if out_path is not None:
            stream.close()
    if out_path is not None and not args.quiet:
        print(f"comp-predict: {len(results)} prediction(s) written to {out_path}", file=sys.stderr)
    return 1 if failed else 0


def _run_timeline(args: argparse.Namespace, predictor: Any, clips: Sequence[Any], options: Any) -> int:
    """--timeline: one object per recording (JSON, JSON Lines for several, or a table per recording)."""
    from pipeline.timeline import TimelineError, plot_timeline, predict_timeline

    log = logging.getLogger("comp-predict")
    out_path = Path(args.out) if args.out else None
    stream: TextIO = sys.stdout
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        stream = open(out_path, "w", encoding="utf-8")
    failed = 0
    try:
        for k, item in enumerate(clips):
            bar = TqdmProgress("step", enabled=not args.quiet, units=TIMELINE_UNITS, log_every_s=TIMELINE_LOG_EVERY_S,
                               echo="comp-predict: ")
            try:
                result = predict_timeline(predictor, item.path, options=options, progress=bar)
            except TimelineError as err:
                result = {"clip": str(item.path), "error": f"not predicted: {err}", "utterances": []}
                log.warning("%s: %s", item.path, result["error"])
            finally:
                bar.close()
            not_predicted = [u for u in result["utterances"] if u.get("prediction") is None]
            if "error" in result or not_predicted:
                failed += 1
            for u in not_predicted:
                log.warning("%s: %.2f-%.2f s: %s", item.path, u["start"], u["end"], u.get("error", "not predicted"))
            if args.format == "table":
                stream.write(("\n" if k else "") + format_timeline_table(result) + "\n")
            elif len(clips) > 1:
                stream.write(json.dumps(result, ensure_ascii=False) + "\n")
            else:
                stream.write(json.dumps(result, ensure_ascii=False, indent=2) + "\n")
            stream.flush()
            if args.plot is not None and "error" not in result:
                plot_timeline(result, args.plot)
                if not args.quiet:
                    print(f"comp-predict: timeline plot written to {args.plot}", file=sys.stderr)
    finally:
        if out_path is not None:
            stream.close()
    if out_path is not None and not args.quiet:
        print(f"comp-predict: {len(clips)} timeline(s) written to {out_path}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
