"""Training speed and memory on an IEMOCAP-sized store (151 conversations, 5,531 utterances, 512/1024/1024).

Fold 5 held out (sessions 1-4 train), D=256, depth 4, batch 16, both variants, a few epochs each; prints
seconds per epoch for stage 1 and stage 2 (training pass and evaluation pass) and the peak resident memory.
Each configuration runs in its own subprocess so that peak RSS (ru_maxrss) does not mix between them. On CUDA
(when present) it also runs with AMP and reports torch.cuda.max_memory_allocated.

Reference: the released ComP code takes about 16 s/epoch and 2.7 GB on a 2-core machine (target: a third of
the time and under 1 GB). No assertions: it prints a table.

    python benchmarks/train_speed.py [--epochs 4] [--threads 0] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One configuration; prints a JSON line with timings and peaks."""
    import resource

    import numpy as np
    import torch

    from comp.config import ModelConfig, TrainConfig
    from comp.data import build_conversations, plan_folds
    from comp.seeding import deterministic
    from comp.train import fit_run
    from core.devices import resolve_device
    from pipeline.store import read_store

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = TrainConfig(model=ModelConfig(variant=args.variant, hidden=256, depth=4, heads=2, drop_rate=0.5,
                                        max_len=150),
                      epochs=args.epochs, stage_epochs=args.epochs // 2, batch_size=16, lr=1e-4, weight_decay=1e-5,
                      folds="5", device=str(device), amp=args.amp, baselines=False)
    data = read_store(args.store)
    conversations = build_conversations(data)
    plan = plan_folds(data, cfg, paper_protocol=bool(cfg.model.resolved.test_selection))[0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with deterministic(device):
        outcome = fit_run(conversations, plan, cfg, cfg.seed, task=data.header.task,
                          label_names=list(data.header.label_names), device=device)
    hist = outcome.records[-1].to_dict()["history"]

    def per_stage(stage: int, key: str) -> float:
        vals = [h[key] for h in hist if h["stage"] == stage]
        vals = vals[1:] if len(vals) > 1 else vals  # the first epoch of a stage pays one-off warm-up
        return float(np.mean(vals)) if vals else float("nan")

    out = {"variant": args.variant, "device": str(device), "amp": bool(args.amp and device.type == "cuda"),
           "threads": torch.get_num_threads(), "train_convs": len(plan.train),
           "s1_train": per_stage(1, "seconds"), "s1_eval": per_stage(1, "eval_seconds"),
           "s2_train": per_stage(2, "seconds"), "s2_eval": per_stage(2, "eval_seconds"),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "cuda_peak_mb": (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None}
    print("RESULT " + json.dumps(out), flush=True)


def run_one(store: Path, variant: str, device: str, amp: bool, epochs: int, threads: int) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", "--store", str(store), "--variant", variant, "--device", device,
           "--epochs", str(epochs), "--threads", str(threads)] + (["--amp"] if amp else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"[{variant} {device} amp={amp}] failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4, help="epochs per configuration (half in stage 1)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--device", default="auto", help="auto: CPU always, plus CUDA when present; or cpu / cuda")
    p.add_argument("--store", type=Path, default=None, help="reuse an existing IEMOCAP-sized store")
    p.add_argument("--variants", default="clean,faithful")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="clean", help=argparse.SUPPRESS)
    p.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    from demo.synthetic import make_iemocap_sized_store

    tmp = tempfile.TemporaryDirectory()
    store = args.store or make_iemocap_sized_store(Path(tmp.name) / "iemocap_sized.h5", seed=0)
    devices = ["cpu"] if args.device in ("auto", "cpu") else []
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        devices.append("cuda")
    rows = []
    for device in devices:
        for variant in args.variants.split(","):
            for amp in ([False, True] if device == "cuda" else [False]):
                r = run_one(store, variant, device, amp, args.epochs, args.threads)
                if r:
                    rows.append(r)
                    print(json.dumps(r), file=sys.stderr, flush=True)
    print(f"\nIEMOCAP-sized store (5,531 utts), fold 5 held out, D=256, batch 16, {args.epochs} epochs; "
          f"cpu count {os.cpu_count()}")
    head = f"{'variant':<9} {'device':<6} {'amp':<5} {'thr':>3} {'s1 train':>9} {'s1 eval':>8} " \
           f"{'s2 train':>9} {'s2 eval':>8} {'s1 epoch':>9} {'s2 epoch':>9} {'peak RSS':>9} {'CUDA peak':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        cuda = f"{r['cuda_peak_mb']:.0f} MB" if r["cuda_peak_mb"] is not None else "-"
        print(f"{r['variant']:<9} {r['device']:<6} {str(r['amp']):<5} {r['threads']:>3} {r['s1_train']:>8.2f}s "
              f"{r['s1_eval']:>7.2f}s {r['s2_train']:>8.2f}s {r['s2_eval']:>7.2f}s "
              f"{r['s1_train'] + r['s1_eval']:>8.2f}s {r['s2_train'] + r['s2_eval']:>8.2f}s "
              f"{r['peak_rss_mb']:>6.0f} MB {cuda:>10}")
    print("reference (released code, 2-core CPU): ~16 s/epoch, 2.7 GB; target <= 5.3 s/epoch, < 1 GB")


if __name__ == "__main__":
    main()
