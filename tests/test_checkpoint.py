"""Checkpoints: plain tensors + JSON meta, loaded with the restricted unpickler only."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from comp.checkpoint import CheckpointError, build_model_from_checkpoint, load_checkpoint, meta_to_json, save_checkpoint
from comp.config import ModelConfig, TrainConfig
from core.config import to_dict

DIMS = {"audio": 6, "text": 5, "visual": 4}


class _Payload:
    """Unpickling this object would create a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tiny_cfg() -> TrainConfig:
    return TrainConfig(model=ModelConfig(hidden=8, depth=2, heads=2, prompt_dim=4, n_prototypes=2, max_len=12))


def _meta(cfg: TrainConfig, dims=DIMS) -> dict:
    return {"train_config": to_dict(cfg), "task": "classification", "label_names": ["a", "b", "c"],
            "input_dims": dims, "n_outputs": 3}


def _model(cfg: TrainConfig, dims=DIMS):
    from comp.model import ComP

    torch.manual_seed(0)
    return ComP(cfg.model, dims, 3, "classification").eval()


def _batch():
    from comp.batch import ComPBatch

    g = torch.Generator().manual_seed(1)
    feats = {m: torch.randn(2, 5, d, generator=g) for m, d in DIMS.items()}
    present = torch.ones(2, 5, 3, dtype=torch.bool)
    present[0, 1, 2] = False
    feats["visual"][0, 1] = 0
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 3:] = False
    return ComPBatch(features=feats, present=present, valid=valid, targets=None)


def test_plain_file_loads_with_weights_only(tmp_path):
    """A saved checkpoint opens with torch.load(weights_only=True) and keeps its meta."""
    path = save_checkpoint(tmp_path / "c.pt", {"w": torch.ones(2)}, {"n_outputs": 2, "x": [1.5]})
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "comp-checkpoint"
    assert isinstance(payload["meta"], str)
    assert torch.equal(payload["state_dict"]["w"], torch.ones(2))


def test_pickle_payload_in_raw_pickle_is_rejected_without_running(tmp_path):
    """A raw pickle whose unpickling would create a file is refused and the file is never created."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": "comp-checkpoint", "x": _Payload(str(marker))}))
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_pickle_payload_in_torch_zip_is_rejected_without_running(tmp_path):
    """A torch.save zip carrying a code-running object is refused and the object never runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "comp-checkpoint", "format_version": 1, "meta": "{}",
                "state_dict": {"w": torch.ones(1)}, "extra": _Payload(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    """Saving over an existing checkpoint replaces it whole and leaves no temporary file behind."""
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.zeros(3)}, _meta(_tiny_cfg()))
    save_checkpoint(path, {"w": torch.ones(3)}, _meta(_tiny_cfg()))
    state, _ = load_checkpoint(path)
    assert torch.equal(state["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["c.pt"]


def test_meta_is_json_with_numpy_values():
    """Numpy arrays and scalars in meta become plain JSON lists and numbers."""
    import json

    import numpy as np

    text = meta_to_json({"mean": np.arange(3, dtype=np.float32), "n": np.int64(4), "bad": float("nan")})
    assert json.loads(text) == {"mean": [0.0, 1.0, 2.0], "n": 4, "bad": None}


def test_round_trip_gives_same_predictions(tmp_path):
    """A model rebuilt from its checkpoint predicts exactly what the saved model predicted."""
    cfg = _tiny_cfg()
    model = _model(cfg)
    batch = _batch()
    with torch.inference_mode():
        before = model(batch, stage=2).logits
    save_checkpoint(tmp_path / "m.pt", model, _meta(cfg))
    rebuilt, meta = build_model_from_checkpoint(tmp_path / "m.pt", "cpu")
    with torch.inference_mode():
        after = rebuilt(batch, stage=2).logits
    assert meta["label_names"] == ["a", "b", "c"]
    assert torch.equal(before, after)


def test_mismatched_dims_are_refused_with_reason(tmp_path):
    """Weights saved for other modality dims than the meta claims are refused, naming the mismatch."""
    cfg = _tiny_cfg()
    model = _model(cfg)
    save_checkpoint(tmp_path / "m.pt", model, _meta(cfg, dims={"audio": 7, "text": 5, "visual": 4}))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        build_model_from_checkpoint(tmp_path / "m.pt", "cpu")


def test_mismatched_config_is_refused_with_reason(tmp_path):
    """Weights saved from a different architecture than the stored config are refused."""
    cfg = _tiny_cfg()
    model = _model(cfg)
    other = TrainConfig(model=ModelConfig(hidden=8, depth=4, heads=2, prompt_dim=4, n_prototypes=2, max_len=12))
    save_checkpoint(tmp_path / "m.pt", model, _meta(other))
    with pytest.raises(CheckpointError, match="missing"):
        build_model_from_checkpoint(tmp_path / "m.pt", "cpu")


def test_expected_dims_mismatch_is_refused(tmp_path):
    """A caller whose features have other dims than the checkpoint's gets a clear refusal."""
    cfg = _tiny_cfg()
    save_checkpoint(tmp_path / "m.pt", _model(cfg), _meta(cfg))
    with pytest.raises(CheckpointError, match="modality dims"):
        build_model_from_checkpoint(tmp_path / "m.pt", "cpu", expect_input_dims={"audio": 6, "text": 5, "visual": 9})


def test_unknown_config_key_is_refused(tmp_path):
    """A checkpoint whose config has keys this version does not know is refused."""
    cfg = _tiny_cfg()
    meta = _meta(cfg)
    meta["train_config"]["mystery"] = 1
    save_checkpoint(tmp_path / "m.pt", _model(cfg), meta)
    with pytest.raises(CheckpointError, match="mystery"):
        build_model_from_checkpoint(tmp_path / "m.pt", "cpu")
