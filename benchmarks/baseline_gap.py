"""Does ComP earn its complexity? ComP (clean) against the linear baselines on a store where context matters.

The store is generated with a per-conversation latent (`conversation_offset`): one utterance alone is
ambiguous, its conversation resolves it, so the `linear+mask+context` baseline (a linear model plus each
modality's conversation mean) beats the context-free ones. ComP attends over the whole conversation and
should at least match it when trained long enough. Both are fitted on the same plans (leave one of `--folds`
conversation folds out, validation held out of the rest), seeds and test masks; ComP's epoch and the
baselines' C are chosen on validation. Results are mean ± std over folds x seeds.

Prints test acc/ua/wf1 for ComP (fused and per-modality heads) and every baseline, ComP's selected epoch and
stage, and its best validation score per stage. `--set KEY=VALUE` changes the TrainConfig (e.g.
`--set model.quirks.prompt_mask=false`), so each diagnosis experiment is one command line; `--experiment NAME`
runs one of the named variants in `EXPERIMENTS` instead (the ones the baseline-gap investigation used).

    python benchmarks/baseline_gap.py [--epochs 100] [--stage-epochs 30] [--missing natural] [--set k=v ...]
    python benchmarks/baseline_gap.py --experiment all     # every named variant, one after the other
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The small preset's model (configs/train-small.yaml), one seed, no checkpoints.
BASE = ["model.hidden=64", "model.depth=2", "model.heads=2", "model.drop_rate=0.3", "model.prompt_dim=8",
        "model.n_prototypes=4", "batch_size=8", "lr=1e-3", "weight_decay=1e-4", "save_run_checkpoints=false",
        "baselines=false"]

# Named diagnosis variants: overrides on top of BASE and the command line.
EXPERIMENTS: dict[str, list[str]] = {
    "clean": [],
    "epochs-x1.5": ["epochs=__EPOCHS15__"],
    "stage1-only": ["stage_epochs=__EPOCHS__"],
    "no-dropout": ["model.drop_rate=0.0"],
    "lr3e-3": ["lr=3e-3"],
    "no-prompt-mask": ["model.quirks.prompt_mask=false"],
    "no-modulator": ["model.quirks.gradient_modulator=false"],
    "no-stage1-rec": ["model.quirks.stage1_reconstruction=false"],
    "no-fuse-absent": ["model.quirks.fuse_absent=false"],
    "batch-prototypes": ["model.quirks.batch_prototypes=true", "model.max_len=16"],
    "hidden128-depth4": ["model.hidden=128", "model.depth=4"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conversations", type=int, default=120, help="conversations in the generated store")
    p.add_argument("--utterances", type=int, nargs=2, default=(6, 12), help="conversation length range")
    p.add_argument("--offset", type=float, default=2.0, help="strength of the per-conversation latent")
    p.add_argument("--store-seed", type=int, default=1, help="seed of the generated store")
    p.add_argument("--folds", type=int, default=3,
                   help="conversation folds of the store (leave-one-fold-out); 0 = one seeded train/val/test split")
    p.add_argument("--run-folds", default="all", help="which held-out folds to run: all or a list like 1,3")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--stage-epochs", type=int, default=30)
    p.add_argument("--missing", default="natural", help="natural | random:R | fixed:...")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--experiment", default=None,
                   help=f"one or more (comma-separated) of {', '.join(EXPERIMENTS)}, or 'all' (run one after "
                        "the other; the baselines are fitted once)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, extra: list[str]):
    from comp.config import TrainConfig
    from core.config import apply_overrides

    flags = [f"epochs={args.epochs}", f"stage_epochs={args.stage_epochs}", f"missing={args.missing!r}",
             f"seeds={args.seeds}", "device='cpu'", f"folds={args.run_folds!r}"]
    extra = [e.replace("__EPOCHS__", str(args.epochs)).replace("__EPOCHS15__", str(round(1.5 * args.epochs)))
             for e in extra]
    return apply_overrides(TrainConfig(), BASE + flags + list(args.overrides) + extra)


def _fmt(entry) -> str:
    if not entry or entry.get("mean") is None or not math.isfinite(entry["mean"]):
        return "   nan        "
    return f"{entry['mean']:.4f} ± {entry['std']:.4f}"


def comp_lines(name: str, result, seconds: float) -> list[str]:
    """ComP's fused test scores, per-head test scores, and where its selected epoch lies."""
    from comp.metrics import summarize

    main = [r for r in result.runs if r.condition == result.main_condition]
    lines = [f"{'ComP ' + name:<28} " + "  ".join(_fmt(result.summary.get(k)) for k in ("acc", "ua", "wf1"))
             + f"   ({seconds:.0f}s)"]
    for m in ("audio", "text", "visual"):
        heads = summarize([r.test_heads.get(m) or {} for r in main])
        lines.append(f"{'  head ' + m:<28} " + "  ".join(_fmt(heads.get(k)) for k in ("acc", "ua", "wf1")))
    for r in main:
        hist = r.history
        metric = r.selection_metric
        best = {}
        for h in hist:
            v = h.val.get(metric)
            if v is not None and math.isfinite(v) and v > best.get(h.stage, (-1.0, 0))[0]:
                best[h.stage] = (v, h.epoch)
        per_stage = ", ".join(f"stage {s}: {v:.4f} @ epoch {e}" for s, (v, e) in sorted(best.items()))
        last = hist[-1]
        lines.append(f"  fold {r.fold} seed {r.seed}: selected epoch {r.best_epoch} (stage "
                     f"{hist[r.best_epoch - 1].stage}); best val {metric} {per_stage}; last epoch val "
                     f"{last.val.get(metric, float('nan')):.4f}, loss {last.train_loss:.3f}")
    return lines


def paired_line(result, baselines: dict, name: str = "linear+mask+context", metric: str = "wf1") -> str:
    """ComP minus the baseline on `metric`, per fold x seed (same test conversations and masks) and on average."""
    theirs = {(r.fold, r.seed): r.test.get(metric) for r in baselines[name].runs
              if r.condition == result.main_condition}
    diffs = [(r.fold, r.seed, r.test[metric] - theirs[(r.fold, r.seed)]) for r in result.runs
             if r.condition == result.main_condition and (r.fold, r.seed) in theirs]
    if not diffs:
        return f"  paired vs {name}: no common runs"
    values = [d for _, _, d in diffs]
    return (f"  paired ComP - {name} ({metric}): mean {sum(values) / len(values):+.4f}; per run "
            + ", ".join(f"f{f}/s{s} {d:+.4f}" for f, s, d in diffs))


def main(argv: list[str] | None = None) -> int:
    import torch

    from comp.baselines import run_baselines
    from comp.train import train_protocol
    from demo.synthetic import make_synthetic_store
    from pipeline.store import read_store

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    names = list(EXPERIMENTS) if args.experiment == "all" else (args.experiment or "clean").split(",")
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        print(f"unknown experiment {unknown[0]!r}; use one of {', '.join(EXPERIMENTS)} or all", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        store = make_synthetic_store(Path(tmp) / "conv.h5", n_conversations=args.conversations,
                                     utterances=tuple(args.utterances), conversation_offset=args.offset,
                                     folds=args.folds, seed=args.store_seed)
        data = read_store(store)
        print(f"store: {args.conversations} conversations, {len(data)} utterances, conversation_offset "
              f"{args.offset}, {args.folds} folds (running {args.run_folds}); missing {args.missing}; "
              f"{args.epochs} epochs (stage 1: {args.stage_epochs})")
        cfg0 = build_config(args, [])
        t0 = time.perf_counter()
        baselines = run_baselines(data=data, cfg=cfg0)
        base_seconds = time.perf_counter() - t0
        header = f"{'model':<28} {'acc':^14}  {'ua':^14}  {'wf1':^14}"
        print(header)
        print("-" * len(header))
        for name, b in baselines.items():
            print(f"{name:<28} " + "  ".join(_fmt(b.summary.get(k)) for k in ("acc", "ua", "wf1")))
        print(f"  (all baselines: {base_seconds:.1f}s)")
        for name in names:
            cfg = build_config(args, EXPERIMENTS[name])
            t0 = time.perf_counter()
            result = train_protocol(data, cfg)
            print("\n".join(comp_lines(name, result, time.perf_counter() - t0)))
            print(paired_line(result, baselines), flush=True)
        context = baselines["linear+mask+context"].summary["wf1"]["mean"]
        print(f"context baseline wf1 {context:.4f}: ComP should match it (see the ComP rows above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
