#!/usr/bin/env bash
# GPU checks in one call: the NCCL/DDP training path (torchrun, one rank per GPU) against a plain
# single-process CUDA run on the same IEMOCAP-sized synthetic store, fold 5, 2 epochs (1 per stage).
# Prints wall times, seconds per epoch and test metrics of both. Needs: torch with CUDA, h5py, sklearn,
# matplotlib, pyyaml, tqdm (no extraction packages). Usage: bash benchmarks/gpu_checks.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/comp-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
python3 -c "from demo.synthetic import make_iemocap_sized_store as m; m('$out/store.h5')"
common=("$out/store.h5" --folds 5 --epochs 2 --stage-epochs 1 --no-baselines -q --device "${DEVICE:-cuda}")
t0=$(date +%s.%N)
python3 -m pipeline.cli.train "${common[@]}" --out "$out/plain"
t1=$(date +%s.%N)
torchrun --standalone --nproc_per_node 1 -m pipeline.cli.train "${common[@]}" --out "$out/ddp"
t2=$(date +%s.%N)
python3 - "$out" "$t0" "$t1" "$t2" <<'PY'
import json, sys
out, t0, t1, t2 = sys.argv[1], *map(float, sys.argv[2:])
for name, wall in (("plain", t1 - t0), ("ddp-nccl-1rank", t2 - t1)):
    m = json.load(open(f"{out}/{'plain' if name == 'plain' else 'ddp'}/metrics.json"))
    s, hist = m["summary"], m["runs"][0]["history"]
    epochs = " ".join(f"s{h['stage']} {h['seconds']:.2f}+{h['eval_seconds']:.2f}s" for h in hist)
    print(f"{name:16s} wall {wall:6.1f} s  acc {s['acc']['mean']:.4f}  wf1 {s['wf1']['mean']:.4f}  "
          f"epochs (train+eval): {epochs}")
PY
