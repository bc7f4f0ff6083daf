"""Speed-up of N processes over 1 (torch.distributed) for extraction and training, on this machine.

* extraction: `comp-extract --nproc 1` vs `--nproc N` on generated clips, with the fake extractors of the
  tests (decoding is the real work; `--preset offline` runs the packaged models instead);
* training, data parallel: `comp-train` on an IEMOCAP-sized synthetic store (151 conversations, 5,531
  utterances), fold 5, D=256, batch 16 (the global batch in both cases), a couple of epochs; seconds per
  training epoch and per evaluation pass from metrics.json, plus the command's wall time;
* training, fan-out: 2 folds x 1 seed as independent runs, `--fan-out --nproc N` vs one process.

On CPU the single process gets every core and each of the N ranks 1/N of them (OMP_NUM_THREADS), so the
comparison is at equal hardware. `--device cuda` runs the GPU version (one GPU per rank; needs N GPUs for
the DDP case). No assertions: it prints a table.

    python benchmarks/distributed_speed.py [--nproc 2] [--device cpu|cuda] [--epochs 2] [--clips 48]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _run(cmd: list[str]) -> tuple[float, str]:
    """(wall seconds, stdout) of a command that must succeed."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return wall, done.stdout


def bench_extraction(args: argparse.Namespace, tmp: Path) -> list[tuple[str, float, float]]:
    import yaml
    from fake_extractors import fake_config_dict, make_media

    clips = tmp / "clips"
    make_media(clips, [f"clip{i:03d}.mp4" for i in range(args.clips)], seconds=args.seconds)
    if args.preset == "fake":
        config = tmp / "fake.yaml"
        config.write_text(yaml.safe_dump(fake_config_dict(num_workers=1)), encoding="utf-8")
        source = ["--config", str(config)]
    else:
        source = ["--preset", args.preset]
    rows = []
    for n in (1, args.nproc):
        out = tmp / f"feats-{n}.h5"
        wall, stdout = _run([sys.executable, "-m", "pipeline.cli.extract", str(clips), "--out", str(out), *source,
                             "--device", args.device, "-q", "--nproc", str(n)])
        found = re.search(r"^time\s+([\d.]+) s", stdout, re.M)
        rows.append((f"extract --nproc {n}", wall, float(found.group(1)) if found else float("nan")))
    return rows


def bench_training(args: argparse.Namespace, tmp: Path) -> list[tuple[str, float, float, float]]:
    from demo.synthetic import make_iemocap_sized_store

    store = make_iemocap_sized_store(tmp / "iemocap.h5")
    common = [sys.executable, "-m", "pipeline.cli.train", str(store), "--no-baselines", "-q", "--device", args.device,
              "--set", "model.hidden=256", "--set", "model.depth=4", "--set", "model.max_len=150",
              "--batch-size", "16", "--set", "save_run_checkpoints=false"]
    rows = []
    for label, extra in (("train DDP", ["--folds", "5", "--epochs", str(args.epochs),
                                        "--stage-epochs", str(args.epochs // 2)]),
                         ("train fan-out 2 folds", ["--folds", "1,2", "--epochs", "1", "--stage-epochs", "0",
                                                    "--fan-out"])):
        for n in (1, args.nproc):
            out = tmp / f"{label.replace(' ', '-')}-{n}"
            wall, _ = _run([*common, "--out", str(out), *extra, "--nproc", str(n)])
            history = json.loads((out / "metrics.json").read_text())["runs"][0]["history"]
            train_s = sum(h["seconds"] for h in history) / len(history)
            eval_s = sum(h["eval_seconds"] for h in history) / len(history)
            rows.append((f"{label} --nproc {n}", wall, train_s, eval_s))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes to compare with one")
    p.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per rank)")
    p.add_argument("--clips", type=int, default=48, help="generated clips for the extraction benchmark")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each generated clip")
    p.add_argument("--preset", default="fake", help="fake (test extractors) or an extraction preset such as offline")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the DDP training benchmark")
    p.add_argument("--skip-extract", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args()
    sys.path[:0] = [str(TESTS), str(ROOT)]
    print(f"machine: {os.cpu_count()} CPU cores; device {args.device}; {args.nproc} processes vs 1")
    with tempfile.TemporaryDirectory(prefix="comp-dist-bench-") as folder:
        tmp = Path(folder)
        if not args.skip_extract:
            rows = bench_extraction(args, tmp)
            print(f"\nextraction, {args.clips} clips of ~{args.seconds:g} s ({args.preset} extractors)")
            print(f"{'':<24} {'command s':>10} {'run s':>8}")
            for name, wall, run_s in rows:
                print(f"{name:<24} {wall:>10.1f} {run_s:>8.1f}")
            print(f"speed-up: {rows[0][1] / rows[1][1]:.2f}x command, {rows[0][2] / rows[1][2]:.2f}x run "
                  "(run: from the start of extraction to the merged store)")
        if not args.skip_train:
            rows = bench_training(args, tmp)
            print("\ntraining, IEMOCAP-sized synthetic store (D=256, depth 4, global batch 16)")
            print(f"{'':<30} {'command s':>10} {'train s/epoch':>14} {'eval s/epoch':>13}")
            for name, wall, train_s, eval_s in rows:
                print(f"{name:<30} {wall:>10.1f} {train_s:>14.2f} {eval_s:>13.2f}")
            ddp, fan = rows[:2], rows[2:]
            print(f"speed-up DDP: {ddp[0][2] / ddp[1][2]:.2f}x per training epoch, "
                  f"{ddp[0][1] / ddp[1][1]:.2f}x command")
            print(f"speed-up fan-out: {fan[0][1] / fan[1][1]:.2f}x command (2 independent runs)")


if __name__ == "__main__":
    main()
