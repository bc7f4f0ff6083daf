"""ComP and the baselines on real recordings: the RAVDESS speech set, actor-independent.

Data (not part of the project; never commit it): the RAVDESS speech recordings, 1,440 wav files of 24 actors
(Livingstone & Russo 2018, CC BY-NC-SA 4.0, zenodo.org/record/1188976). A public copy of the audio is the
GitHub repository syildizn/RavdessSounds (folder RavdessDataSet/Actor_XX), e.g.

    git clone https://github.com/syildizn/RavdessSounds /data/RavdessSounds
    python benchmarks/real_ravdess.py --root /data/RavdessSounds/RavdessDataSet

Steps: comp-prepare ravdess → comp-extract (preset offline by default) → comp-train (preset small by default)
on the fixed actor split (actors 1-16 train, 17-20 validation, 21-24 test) and, with --folds, leave-four-
actors-out cross-validation (six folds; validation actors held out of the training folds). Prints ACC / UA /
WF1 of ComP and the baselines (mean ± std over seeds, and folds), per-class recall, and the extraction and
training times.

The store is named by the extraction spec's hash and reused while the spec is unchanged (a rerun only
trains); a changed spec (other preset, other package versions, other decoding rules) extracts anew.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def run(cmd: list[str], log: Path) -> float:
    """Run one project command, its output appended to `log`; returns its wall time in seconds."""
    t0 = time.perf_counter()
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def cli(name: str) -> list[str]:
    return [sys.executable, "-m", f"pipeline.cli.{name}"]


def spec_hash_of(preset: str) -> str:
    """The extraction spec hash the preset resolves to on this machine (loads the extractors once)."""
    from pipeline.extract import Extraction
    from pipeline.extract_config import load_preset, with_stage_defaults

    return Extraction.from_config(with_stage_defaults(load_preset(preset)), "cpu").spec_hash


def fmt(entry: dict | None) -> str:
    if not entry or entry.get("mean") is None:
        return "   -          "
    return f"{entry['mean']:.3f} ± {entry['std'] or 0.0:.3f}"


def per_class_recall(confusions: list[list[list[int]] | None], n: int) -> np.ndarray:
    total = np.zeros((n, n))
    for c in confusions:
        if c is not None:
            total += np.asarray(c)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(total) / total.sum(axis=1)


def report(title: str, metrics: dict, seconds: float) -> list[str]:
    labels = metrics["label_names"]
    runs = [r for r in metrics["runs"] if r["condition"] == metrics["condition"]]
    lines = [f"\n## {title}: {len(runs)} run(s), selected on {metrics['selected_on']}, training {seconds:.0f} s",
             f"{'model':<22} {'ACC':<14} {'UA':<14} {'WF1':<14} " + " ".join(f"{n[:7]:>7}" for n in labels)]
    rows = [("ComP " + metrics["variant"], metrics["summary"], [r.get("confusion") for r in runs])]
    for name, b in (metrics.get("baselines") or {}).items():
        b_runs = [r for r in b["runs"] if r["condition"] == metrics["condition"]]
        rows.append((name, b["summary"], [r.get("confusion") for r in b_runs]))
    for name, summary, confusions in rows:
        recall = per_class_recall(confusions, len(labels))
        lines.append(f"{name:<22} {fmt(summary.get('acc'))} {fmt(summary.get('ua'))} {fmt(summary.get('wf1'))} "
                     + " ".join(f"{x:7.3f}" for x in recall))
    if metrics.get("best_run"):
        lines.append(f"best.pt: fold {metrics['best_run']['fold']} seed {metrics['best_run']['seed']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="RAVDESS folder holding Actor_01 ... Actor_24")
    p.add_argument("--work", type=Path, default=Path("/tmp/comp-mer-ravdess"), help="stores, runs and logs")
    p.add_argument("--extract-preset", default="offline", help="comp-extract preset")
    p.add_argument("--train-preset", default="small", help="comp-train preset")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--folds", action="store_true", help="also run leave-four-actors-out cross-validation")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra comp-train setting (repeatable), e.g. epochs=80")
    p.add_argument("--tag", default="", help="suffix of the run folders (to keep several variants apart)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = work / "benchmark.log"
    manifest = work / "clips.csv"
    run(cli("prepare") + ["ravdess", str(args.root), "--out", str(manifest), "-q"], log)

    digest = spec_hash_of(args.extract_preset)[:12]
    store = work / f"ravdess-{args.extract_preset}-{digest}.h5"
    had_store = store.exists()
    extract_s = run(cli("extract") + [str(args.root), "--manifest", str(manifest), "--out", str(store),
                                      "--preset", args.extract_preset, "-q"], log)
    import h5py

    with h5py.File(store, "r") as f:
        duration = float(np.sum(f["clips/duration_s"][:]))
        present = {m: int(np.sum(f[f"modalities/{m}/present"][:])) for m in ("audio", "text", "visual")}
        n = len(f["clips/id"])
    lines = [f"# RAVDESS speech, {n} clips, {duration / 3600:.2f} h of audio; store {store.name}",
             f"extraction: {'reused the store' if had_store else f'{extract_s:.0f} s'} "
             f"(real-time factor {extract_s / duration:.3f} for this call); present: "
             + ", ".join(f"{m} {k}/{n}" for m, k in present.items())]

    plans = [("split", "fixed split (actors 1-16 / 17-20 / 21-24)")]
    if args.folds:
        plans.append(("folds", "leave-four-actors-out (6 folds)"))
    for plan, title in plans:
        out = work / f"runs-{plan}{args.tag}"
        sets = [f"plan={plan}", f"seeds={args.seeds}", *args.overrides]
        seconds = run(cli("train") + [str(store), "--out", str(out), "--preset", args.train_preset, "-q"]
                      + [x for s in sets for x in ("--set", s)], log)
        metrics = json.loads((out / "metrics.json").read_text())
        lines += report(title, metrics, seconds)
    text = "\n".join(lines)
    print(text)
    (work / f"result{args.tag}.txt").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
