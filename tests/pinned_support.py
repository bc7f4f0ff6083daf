"""What tests/test_pinned_formats.py recomputes and scripts/make_pinned_fixtures.py recorded: the resolved
extraction presets, digests of stores and checkpoints, and a checkpoint's predictions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

SYNTHETIC_DIMS = {"audio": 6, "text": 5, "visual": 4}
TIMING_KEYS = frozenset({"seconds", "eval_seconds"})  # metrics.json entries that measure time, not results


def canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256(text: str | bytes) -> str:
    return hashlib.sha256(text.encode("utf-8") if isinstance(text, str) else text).hexdigest()


def preset_specs() -> dict[str, dict[str, Any]]:
    """Every extraction preset resolved with its extractors' defaults: {name: {"config", "hash"}}."""
    from core.config import to_dict
    from pipeline.extract_config import available_presets, load_preset, with_stage_defaults

    out = {}
    for name in available_presets():
        resolved = to_dict(with_stage_defaults(load_preset(name)))
        out[name] = {"config": resolved, "hash": sha256(canonical(resolved))}
    return out


def offline_spec_hash() -> str:
    """The full extraction spec hash of the offline preset (loads its packaged models)."""
    from pipeline.extract import Extraction
    from pipeline.extract_config import load_preset

    return Extraction.from_config(load_preset("offline"), "cpu").spec_hash


def store_digest(path: Path) -> dict[str, Any]:
    """The header and a hash of every column of a store, as read_store gives them."""
    import h5py

    from pipeline.store import read_store

    data = read_store(path)
    h = data.header
    columns = hashlib.sha256()
    for name in ("ids", "source", "conversation", "speaker", "label", "split", "transcript", "status"):
        columns.update(canonical([str(v) for v in getattr(data, name)]).encode())
    for name in ("position", "fold", "value", "duration_s"):
        columns.update(np.ascontiguousarray(getattr(data, name)).tobytes())
    for m in sorted(data.features):
        columns.update(np.ascontiguousarray(data.features[m], dtype=np.float32).tobytes())
        columns.update(np.ascontiguousarray(data.present[m], dtype=bool).tobytes())
        columns.update(canonical([str(v) for v in data.reason[m]]).encode())
    for k in sorted(data.diagnostics):
        columns.update(k.encode() + np.ascontiguousarray(data.diagnostics[k], dtype=np.float32).tobytes())
    with h5py.File(path, "r") as f:
        stored_hash = str(f.attrs["spec_hash"]) if "spec_hash" in f.attrs else ""
    return {"task": h.task, "label_names": list(h.label_names), "source": h.source,
            "modalities": {m: [i.dim, i.encoder, i.layers, i.pooling] for m, i in sorted(h.modalities.items())},
            "spec_hash": data.spec_hash, "stored_spec_hash": stored_hash, "rows": len(data),
            "columns_sha256": columns.hexdigest()}


def checkpoint_digest(path: Path) -> dict[str, Any]:
    """A checkpoint's meta (hashed, and the fields that rebuild the model) and a hash of its weights."""
    from comp.checkpoint import load_checkpoint
    from comp.config import TrainConfig
    from core.config import from_dict, to_dict

    state, meta = load_checkpoint(path)
    weights = hashlib.sha256()
    for name in sorted(state):
        weights.update(name.encode() + state[name].numpy().tobytes())
    return {"meta_sha256": sha256(canonical(meta)), "train_config": meta["train_config"],
            "train_config_round_trip": to_dict(from_dict(TrainConfig, meta["train_config"])),
            "stage": meta["stage"], "input_dims": meta["input_dims"], "n_outputs": meta["n_outputs"],
            "state_sha256": weights.hexdigest()}


def predictions(checkpoint: Path, store: Path) -> dict[str, list[float]]:
    """The checkpoint's fused logits for every clip of `store`, each clip alone (as comp-predict runs it)."""
    import torch

    from comp.batch import ComPBatch
    from comp.checkpoint import build_model_from_checkpoint
    from comp.data import Normalizer
    from pipeline.store import read_store

    model, meta = build_model_from_checkpoint(checkpoint, "cpu")
    normalizer = Normalizer.from_dict(meta["normalizer"])
    data = read_store(store)
    order = ("audio", "text", "visual")
    out = {}
    with torch.inference_mode():
        for i, clip_id in enumerate(data.ids):
            present = np.array([[[bool(data.present[m][i]) for m in order]]])
            raw = {m: np.where(present[..., k:k + 1], data.features[m][i].reshape(1, 1, -1), np.float32(0))
                   for k, m in enumerate(order)}
            feats = normalizer.transform(raw, present)
            batch = ComPBatch(features={m: torch.from_numpy(np.ascontiguousarray(feats[m], np.float32))
                                        for m in order},
                              present=torch.from_numpy(present), valid=torch.ones(1, 1, dtype=torch.bool))
            out[str(clip_id)] = model(batch, stage=int(meta["stage"])).logits[0, 0].float().tolist()
    return out


def tiny_config() -> Any:
    from comp.config import ModelConfig, TrainConfig

    return TrainConfig(model=ModelConfig(hidden=8, depth=2, heads=2, prompt_dim=4, n_prototypes=3, drop_rate=0.1),
                       epochs=3, stage_epochs=1, batch_size=4, lr=3e-3, seeds=2, missing="fixed:a,tv,atv",
                       device="cpu", num_threads=1)


def train_tiny(store: Path, out: Path) -> None:
    """A tiny comp-train run (two seeds, three fixed conditions, baselines) into `out`."""
    from pipeline.train import run_training

    run_training(store, tiny_config(), out)


def strip_timings(obj: Any) -> Any:
    """metrics.json without the entries that measure time."""
    if isinstance(obj, dict):
        return {k: strip_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timings(v) for v in obj]
    return obj
