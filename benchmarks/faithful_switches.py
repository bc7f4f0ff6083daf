"""What each data-path switch of the `faithful` variant changes (docs/model.md §9.17-9.19), in numbers.

The released ComP code feeds the features as stored (`raw_features`), feeds all-zero source vectors as present
inputs (`zero_vectors_present`) and runs in fp32 (`fp32`). On a GCNet-layout store (`comp-import gcnet ...`,
e.g. the public IEMOCAP-4 set or a semi-real one built from its label pickle) this prints:

1. the data: each modality's raw scale (spread of the per-dimension means and standard deviations of the
   present rows) and how many all-zero source vectors it holds;
2. training: test accuracy of the selected epoch (paper protocol: selected on test, as the released code
   reports) of `faithful` and of `faithful` with one switch flipped, per seed and mean ± SD over seeds;
3. precision: on the store's batches, a `faithful` model under bf16 autocast (what `fp32=false` does on CUDA;
   on CPU the same bf16 kernels are emulated) against fp32 - logit and loss differences, the share of
   utterances whose predicted class changes, and the step time of each.

    python benchmarks/faithful_switches.py iemocap4.h5 --missing random:0.4 --seeds 5 --epochs 30 \\
        --stage-epochs 15 --folds 5 --set model.hidden=32 --set model.max_len=110
    python benchmarks/faithful_switches.py iemocap4.h5 --only precision      # part 3 alone (seconds)

Real data is not part of the repository; point it at a store you imported.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLIPS = {  # name -> overrides on top of faithful
    "faithful (released data path)": [],
    "+ standardised features (raw_features=false)": ["model.quirks.raw_features=false"],
    "+ zero vectors absent (zero_vectors_present=false)": ["model.quirks.zero_vectors_present=false"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", help="feature store (GCNet layout imported with comp-import gcnet)")
    p.add_argument("--preset", default="iemocap4", help="training preset the runs start from")
    p.add_argument("--missing", default="random:0.4")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--stage-epochs", type=int, default=15)
    p.add_argument("--folds", default="5", help="held-out folds (the released code's fold 5 by default)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--only", choices=("data", "training", "precision"), action="append",
                   help="run only these parts (repeatable; default: all)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace, extra: list[str]):
    from comp.config import TrainConfig
    from core.config import apply_overrides, load_yaml
    from pipeline.presets import preset_path

    base = load_yaml(TrainConfig, preset_path("train", args.preset))
    flags = ["model.variant='faithful'", f"epochs={args.epochs}", f"stage_epochs={args.stage_epochs}",
             f"missing={args.missing!r}", f"seeds={args.seeds}", "device='cpu'", f"folds={args.folds!r}",
             "save_run_checkpoints=false", "baselines=false", f"num_threads={args.threads}"]
    return apply_overrides(base, flags + list(args.overrides) + extra)


def data_lines(data) -> list[str]:
    from core.records import ZERO_VECTOR_REASON

    lines = ["data: per modality, spread of the per-dimension mean / std over present rows; all-zero vectors"]
    for m in ("audio", "text", "visual"):
        rows = data.features[m][data.present[m]].astype(np.float64)
        mean, std = rows.mean(0), rows.std(0)
        zeros = int(np.count_nonzero(np.asarray(data.reason[m]).astype(str) == ZERO_VECTOR_REASON))
        lines.append(f"  {m:6s} dim {rows.shape[1]:5d}: mean in [{mean.min():+.3f}, {mean.max():+.3f}], "
                     f"std in [{std.min():.3f}, {std.max():.3f}] (max/min {std.max() / max(std.min(), 1e-6):.3g}); "
                     f"zero vectors {zeros} of {len(data.ids)}")
    return lines


def training_lines(args: argparse.Namespace, data) -> list[str]:
    from comp.train import train_protocol

    lines = [f"training: test acc of the selected epoch (selected on test), {args.missing}, folds {args.folds}, "
             f"{args.seeds} seed(s), {args.epochs} epochs (stage 1: {args.stage_epochs})"]
    for name, extra in FLIPS.items():
        t0 = time.perf_counter()
        result = train_protocol(data, build_config(args, extra))
        accs = [r.test["acc"] for r in result.runs if r.condition == result.main_condition]
        sd = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
        lines.append(f"  {name:<52} {np.mean(accs):.4f} ± {sd:.4f}   per seed "
                     + " ".join(f"{a:.3f}" for a in accs) + f"   ({time.perf_counter() - t0:.0f}s)")
        print(lines[-1], flush=True)
    return lines


def precision_lines(args: argparse.Namespace, data, n_batches: int = 6) -> list[str]:
    """bf16 autocast against fp32 on the same weights and batches (stage 2, eval and one train step)."""
    import torch

    from comp.data import Normalizer, build_conversations, iterate_batches, pack
    from comp.losses import comp_loss
    from comp.masks import mask_batch, parse_missing
    from comp.model import ComP

    cfg = build_config(args, [])
    q = cfg.model.resolved
    convs = build_conversations(data, zero_vectors_present=bool(q.zero_vectors_present))
    dims = {m: int(convs[0].features[m].shape[1]) for m in ("audio", "text", "visual")}
    if not q.raw_features:
        convs = Normalizer.fit(convs).apply(convs)
    task = data.header.task
    n_out = len(data.header.label_names) if task == "classification" else 1
    torch.manual_seed(0)
    model = ComP(cfg.model, dims, n_out, task)
    rng = np.random.default_rng(0)
    spec = parse_missing(args.missing)
    batches = [mask_batch(b, spec, rng)[0].batch for _, b in
               zip(range(n_batches), iterate_batches(pack(convs), cfg.batch_size, shuffle=True, rng=rng))]
    bf16 = lambda: torch.autocast(device_type="cpu", dtype=torch.bfloat16)  # noqa: E731
    stats = {"logit": [], "loss": [], "flip": [], "n": 0, "t32": 0.0, "t16": 0.0}
    model.eval()
    for batch in batches:
        with torch.no_grad():
            out32 = model(batch, 2)
            with bf16():
                out16 = model(batch, 2)
        rows = batch.valid
        a, b = out32.logits[rows].float(), out16.logits[rows].float()
        stats["logit"].append(float((a - b).abs().max()))
        stats["flip"].append(int((a.argmax(-1) != b.argmax(-1)).sum()))
        stats["n"] += int(rows.sum())
    model.train()
    for batch in batches:
        for key, ctx in (("t32", contextlib.nullcontext), ("t16", bf16)):
            torch.manual_seed(1)
            t0 = time.perf_counter()
            with ctx():
                out = model(batch, 2)
                loss, _ = comp_loss(out, batch, cfg.model, task, 2)
            loss.backward()
            stats[key] += time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            stats.setdefault(key + "_loss", []).append(float(loss.detach()))
    rel = [abs(x - y) / abs(x) for x, y in zip(stats["t32_loss"], stats["t16_loss"])]
    return ["precision: faithful model (fresh weights), bf16 autocast vs fp32, stage 2, "
            f"{len(batches)} batches / {stats['n']} utterances",
            f"  max |logit difference| {max(stats['logit']):.4f}; predicted class changed for "
            f"{sum(stats['flip'])} of {stats['n']} utterances ({100 * sum(stats['flip']) / stats['n']:.2f} %)",
            f"  training loss relative difference: mean {np.mean(rel):.2e}, max {max(rel):.2e}",
            f"  forward+backward time per batch: fp32 {1000 * stats['t32'] / len(batches):.0f} ms, "
            f"bf16 {1000 * stats['t16'] / len(batches):.0f} ms (CPU; on CUDA bf16 is the fast one)"]


def main(argv: list[str] | None = None) -> int:
    import torch

    from pipeline.store import read_store

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = args.only or ["data", "training", "precision"]
    data = read_store(args.store)
    out: list[str] = []
    if "data" in parts:
        out += data_lines(data)
        print("\n".join(out), flush=True)
    if "precision" in parts:
        lines = precision_lines(args, data)
        print("\n".join(lines), flush=True)
        out += lines
    if "training" in parts:
        out += training_lines(args, data)
    print("\n" + "\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
