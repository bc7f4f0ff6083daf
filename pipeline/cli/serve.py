"""comp-serve: a trained checkpoint behind HTTP, with a page to try clips in a browser.

The model and its extractors load once; clips are then predicted one at a time (a bounded queue in front),
with the same code and output as comp-predict. Exit status: 0 after a clean shutdown (Ctrl-C), 2 for a usage
error or a checkpoint that cannot be honoured (one line on stderr says why).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pipeline.cli import HelpFormatter
from pipeline.cli.logs import cli_logging, level_for, quiet_transformers
from pipeline.serve.limits import MB, ServeLimits

DEFAULTS = ServeLimits()

EPILOG = f"""examples:
  comp-serve --model runs/iemocap4                      # then open http://127.0.0.1:8000/
  comp-serve --model runs/iemocap4 --port 9000 --max-upload-mb 50
  curl -F file=@clip.mp4 http://127.0.0.1:8000/predict  # the comp-predict JSON
  curl -F file=@talk.mp4 'http://127.0.0.1:8000/predict?timeline=1'

endpoints: GET / (the page), GET /health, GET /model, POST /predict (multipart field "file"; ?timeline=1),
POST /jobs + GET /jobs/ID/events (server-sent progress) + GET /jobs/ID (what the page uses).

refusals are JSON {{"error": ...}}: 413 upload or clip too long, 415 not media FFmpeg can read, 422 no "file"
field or a clip with nothing to predict from, 503 + Retry-After when {DEFAULTS.max_queued} clips already wait.
Uploads go to a private temporary folder (mode 0700) under a generated name and are deleted once processed.
The server listens on 127.0.0.1 (this machine only) unless --host says otherwise; it has no authentication,
so do not expose it to a network you do not trust."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="comp-serve", description=__doc__.split("\n")[0], epilog=EPILOG,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", "-m", required=True, metavar="RUN",
                   help="run folder written by comp-train (holding best.pt) or a checkpoint file")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 listens on every interface")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="torch CPU threads, 0 = torch's default")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULTS.max_upload_bytes / MB, metavar="MB",
                   help="largest upload; a larger one is cut off as it streams in (413)")
    p.add_argument("--max-duration", type=float, default=DEFAULTS.max_duration_s, metavar="S",
                   help="longest clip for a plain prediction, in seconds (413)")
    p.add_argument("--max-timeline-duration", type=float, default=DEFAULTS.max_timeline_duration_s, metavar="S",
                   help="longest recording for ?timeline=1, in seconds (413)")
    p.add_argument("--queue", type=int, default=DEFAULTS.max_queued, metavar="N",
                   help="clips that may wait behind the one being processed; more get 503 + Retry-After")
    p.add_argument("--tmp", metavar="DIR", help="where the private upload folder is made (default: the system "
                                                "temporary folder, $TMPDIR)")
    verbosity = p.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr")
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        limits = ServeLimits(max_upload_bytes=int(args.max_upload_mb * MB), max_duration_s=args.max_duration,
                             max_timeline_duration_s=args.max_timeline_duration, max_queued=args.queue)
    except ValueError as err:
        parser.error(str(err))
    quiet_transformers()
    level = logging.ERROR if args.quiet else level_for(False, args.verbose, default=logging.INFO)
    with cli_logging(level, "%(asctime)s %(levelname)s %(name)s: %(message)s"):
        return _run(args, limits)


def _run(args: argparse.Namespace, limits: ServeLimits) -> int:
    import torch
    import uvicorn

    from pipeline.predict import PredictError, Predictor
    from pipeline.serve.app import create_app

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        predictor = Predictor.from_checkpoint(args.model, device=args.device)
    except PredictError as err:
        print(f"comp-serve: error: {err}", file=sys.stderr)
        return 2
    app = create_app(predictor, limits, upload_parent=args.tmp)
    log = logging.getLogger("comp-serve")
    log.info("serving %s on http://%s:%d/", predictor.checkpoint, args.host, args.port)
    # one process: the models are in memory once, and the job queue is what orders the clients
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="warning" if args.quiet else "info",
                timeout_graceful_shutdown=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
