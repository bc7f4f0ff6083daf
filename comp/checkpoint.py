"""Checkpoints that are safe to open: tensors for the weights, one JSON string for everything else.

A checkpoint is a `torch.save`d plain dict::

    {"format": "comp-checkpoint", "format_version": 1,
     "meta": "<JSON: train_config, task, label_names, input_dims, n_outputs, normalizer,
               extraction_spec, spec_hash, source, metrics, ...>",
     "state_dict": {name: Tensor}}

It is read with `torch.load(..., weights_only=True)` only, so a file carrying a pickled object (a tampered or
foreign checkpoint) is refused by the restricted unpickler before any of its code can run. Writes go to a
temporary file that is renamed over the target, so a crash never leaves half a checkpoint under the real name.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.atomic import atomic_open
from core.errors import CompError

log = logging.getLogger(__name__)

FORMAT = "comp-checkpoint"
FORMAT_VERSION = 1
REQUIRED_META = ("train_config", "task", "label_names", "input_dims", "n_outputs")


class CheckpointError(CompError, RuntimeError):
    """A checkpoint that cannot be used; the message says why."""


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"checkpoint meta: {type(obj).__name__} is not JSON-serialisable")


def _clean_floats(obj: Any) -> Any:
    """NaN/inf are not JSON; store them as None so the file stays readable by any JSON parser."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {k: _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_floats(v) for v in obj]
    return obj


def meta_to_json(meta: Mapping[str, Any]) -> str:
    """The canonical JSON text of checkpoint meta (numpy arrays and scalars become lists and numbers)."""
    plain = json.loads(json.dumps(meta, default=_json_default))
    return json.dumps(_clean_floats(plain), ensure_ascii=False, allow_nan=False)


def save_checkpoint(path: str | Path, model: nn.Module | Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write weights + meta atomically to `path`; `model` may also be a state dict."""
    path = Path(path)
    state = model.state_dict() if isinstance(model, nn.Module) else model
    weights = {str(k): v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "meta": meta_to_json(meta),
               "state_dict": weights}
    with atomic_open(path, "wb") as fh:
        torch.save(payload, fh)
    return path


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def file_kind(path: str | Path) -> str:
    """What a file is by its first bytes: "hdf5" (a feature store), "zip" (torch.save's format), "pickle"
    (older torch.save files, raw pickles), "empty" or "other"."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head:
        return "empty"
    if head == HDF5_SIGNATURE:
        return "hdf5"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "other"


def _refusal(err: BaseException) -> str:
    """Why the restricted unpickler refused a file, in our words. PyTorch's own message suggests loading with
    weights_only=False, which is exactly what must never be done with a file of unknown origin: not repeated."""
    match = re.search(r"GLOBAL (\S+)", str(err))
    if match:
        return (f"it refers to {match.group(1)}, which is neither a tensor nor plain data (such a reference "
                "can run code)")
    return "its contents are not plain tensors and data, or it is damaged"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, meta) of a checkpoint; refuses anything that is not a plain-tensor comp checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    kind = file_kind(path)
    if kind == "hdf5":
        raise CheckpointError(f"{path}: this is an HDF5 file (a feature store, as comp-extract and comp-import "
                              "write), not a checkpoint; checkpoints are the best.pt files comp-train writes")
    if kind in ("empty", "other"):
        what = "an empty file" if kind == "empty" else "not a file torch.save wrote"
        raise CheckpointError(f"{path}: not a checkpoint ({what}); checkpoints are the best.pt files comp-train "
                              "writes")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - the restricted unpickler raises several types
        raise CheckpointError(
            f"{path}: refused to load: {_refusal(err)}. Only plain-tensor checkpoints written by comp-train are "
            "accepted.") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a comp-train checkpoint (no '{FORMAT}' marker)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {payload.get('format_version')!r}; this "
                              f"comp-mer reads version {FORMAT_VERSION}. Retrain with this version.")
    try:
        meta = json.loads(payload["meta"])
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: checkpoint meta is missing or not valid JSON ({err})") from None
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: checkpoint has no tensor state_dict")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: checkpoint meta lacks {missing}")
    return state, meta


def _state_mismatch(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> str:
    """A readable reason why `got` cannot be loaded into a model whose state is `expected` ('' if it can)."""
    reasons = []
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing:
        reasons.append(f"{len(missing)} weight(s) missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        reasons.append(f"{len(unexpected)} unexpected weight(s) (e.g. {', '.join(unexpected[:3])})")
    shapes = [f"{k}: {tuple(got[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in got and tuple(got[k].shape) != tuple(v.shape)]
    if shapes:
        reasons.append(f"{len(shapes)} shape mismatch(es) ({'; '.join(shapes[:3])})")
    return "; ".join(reasons)


def build_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu", *,
                                expect_input_dims: Mapping[str, int] | None = None):
    """(ComP in eval mode on `device`, meta). Refuses a checkpoint whose config, dims or weights disagree."""
    from comp.config import TrainConfig
    from comp.model import ComP
    from core.config import from_dict
    from core.errors import ConfigError

    state, meta = load_checkpoint(path, map_location="cpu")
    try:
        cfg = from_dict(TrainConfig, meta["train_config"])
    except ConfigError as err:
        raise CheckpointError(f"{path}: its training config does not fit this comp-mer: {err}") from None
    dims = {str(k): int(v) for k, v in meta["input_dims"].items()}
    if expect_input_dims is not None:
        want = {str(k): int(v) for k, v in expect_input_dims.items()}
        if want != dims:
            raise CheckpointError(f"{path}: the model was trained on modality dims {dims}, but the features "
                                  f"here have {want}; use a checkpoint trained on the same extractors")
    try:
        model = ComP(cfg.model, dims, int(meta["n_outputs"]), str(meta["task"]))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot build the model its meta describes: {err}") from None
    reason = _state_mismatch(model.state_dict(), state)
    if reason:
        raise CheckpointError(f"{path}: the weights do not match the model its config describes: {reason}")
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return model, meta
