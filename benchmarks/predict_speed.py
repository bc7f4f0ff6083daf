"""How long comp-predict takes: cold (process start to first result) and warm (per clip, models loaded).

    python benchmarks/predict_speed.py [--model examples/out/run] [--seconds 5] [--threads 2] [--repeats 5]

The clip is generated (espeak-ng speech over a face, `--seconds` long). Cold runs the installed `comp-predict`
in a fresh process, so it includes interpreter start, imports and every model load. Warm builds one
`Predictor` and predicts the same clip `--repeats` times after a first, discarded call, reporting the decode /
extract / model split that comp-predict itself measures. The target for the offline preset: warm under 1.5 s
for a 5 s clip on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = ROOT / "examples" / "out" / "run"
TEXT = ("I got the job today, I can hardly believe it. We are going to celebrate tonight with all our "
        "friends, and it will be wonderful.")


def comp_predict() -> list[str]:
    script = Path(sys.executable).parent / "comp-predict"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from pipeline.cli.predict import main; sys.exit(main())"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="run folder or checkpoint (make demo writes one)")
    p.add_argument("--seconds", type=float, default=5.0, help="clip length")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target assumes 2 cores)")
    p.add_argument("--repeats", type=int, default=5, help="warm predictions measured")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = p.parse_args()
    if not args.model.exists():
        sys.exit(f"{args.model}: no checkpoint; run `make demo` first or pass --model RUN")

    import torch

    from demo import media
    from pipeline.predict import Predictor

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="comp-bench-") as tmp:
        clip = media.make_clip(Path(tmp) / "clip.mp4", text=TEXT, face=True, duration_s=args.seconds)

        t0 = time.perf_counter()
        proc = subprocess.run([*comp_predict(), str(clip), "--model", str(args.model), "--device", args.device,
                               "--threads", str(args.threads), "-q"], capture_output=True, text=True)
        cold = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"comp-predict failed ({proc.returncode}): {proc.stderr.strip()}")
        first = json.loads(proc.stdout)

        t0 = time.perf_counter()
        predictor = Predictor.from_checkpoint(args.model, device=args.device)
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        next(predictor.predict_paths([clip]))  # first call: lazy initialisation, not measured as warm
        first_in_process = time.perf_counter() - t0
        walls, parts = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = next(predictor.predict_paths([clip])).to_dict()
            walls.append(time.perf_counter() - t0)
            parts.append(result["timings_ms"])

    spec = predictor.meta.get("extraction_spec", {})
    models = ", ".join(f"{s}={spec.get(s, {}).get('name', '?')}" for s in ("asr", "audio", "text", "visual"))
    print(f"checkpoint   {predictor.checkpoint}  ({models})")
    print(f"clip         {args.seconds:.1f} s generated speech + face; torch threads {args.threads}; "
          f"device {predictor.device}; cpu cores visible {os.cpu_count()}")
    print(f"cold         {cold:.2f} s  (fresh comp-predict process: start, imports, model loads, one clip; "
          f"answer {first['prediction']['label'] if first['prediction'] else None})")
    print(f"in-process   load {load:.2f} s, first clip {first_in_process:.2f} s")
    med = statistics.median(walls)
    split = {k: statistics.median(p.get(k, 0.0) for p in parts) for k in ("decode", "extract", "model")}
    print(f"warm         median {med:.3f} s, min {min(walls):.3f} s over {len(walls)} clips  "
          f"(decode {split['decode']:.0f} ms, extract {split['extract']:.0f} ms, model {split['model']:.0f} ms)")
    print(f"target       warm < 1.5 s: {'met' if med < 1.5 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
