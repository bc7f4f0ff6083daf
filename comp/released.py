"""Parameter names of the authors' released ComP model mapped onto this project's modules.

The released model (docs/model.md §4.2) keeps one `nn.Linear` per modality (`a_in_proj.0`, `shared_enc_t.fc1`,
`block1.blocks.0.Transformer_v.q`, `prop_former_a_1.proj_n.fc1`, ...) where `comp.model.ComP` stacks the three
modalities on a leading axis (`ModalityLinear`, weight [3, in, out]) and fuses q, k, v into one projection.
`released_slots` names, for every released parameter of a `faithful` model, the piece of a project parameter
that holds it; `load_released` copies a released state dict in, `read_released` reads any per-parameter
tensor (weights, gradients) back in the released layout. Used to check the model against numbers produced by
the released code, and to load its checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from comp.model import ComP
from core.clip import MODALITIES

LETTERS = ("a", "t", "v")  # released modality suffixes, in MODALITIES (audio, text, visual)
QKV = ("q", "k", "v")  # column blocks of the fused attention projection


@dataclass(frozen=True)
class Slot:
    """Where one released tensor lives: project parameter `param`, modality `index` on its leading axis
    (None for a plain nn.Linear), output columns `cols` (None = all)."""

    param: str
    index: int | None = None
    cols: tuple[int, int] | None = None

    def read(self, full: torch.Tensor) -> torch.Tensor:
        """The released-layout piece of `full` (a project parameter, or a tensor of its shape)."""
        if self.index is None:
            return full
        piece = full[self.index]
        lo, hi = self.cols if self.cols is not None else (0, piece.shape[-1])
        if self.param.endswith(".bias"):
            return piece[0, lo:hi]  # [1, out] -> [out]
        return piece[:, lo:hi].t()  # [in, out] -> nn.Linear's [out, in]

    def write(self, full: torch.Tensor, value: torch.Tensor) -> None:
        """Copy a released-layout `value` into its piece of `full`, in place."""
        with torch.no_grad():
            if self.index is None:
                full.copy_(value)
                return
            piece = full[self.index]
            lo, hi = self.cols if self.cols is not None else (0, piece.shape[-1])
            if self.param.endswith(".bias"):
                piece[0, lo:hi].copy_(value)
            else:
                piece[:, lo:hi].copy_(value.t())


def _linear(out: dict[str, Slot], released: str, ours: str, index: int | None = None,
            cols: tuple[int, int] | None = None) -> None:
    for kind in ("weight", "bias"):
        out[f"{released}.{kind}"] = Slot(f"{ours}.{kind}", index, cols)


def _mlp(out: dict[str, Slot], released: str, ours: str, index: int | None = None) -> None:
    for k in ("fc1", "fc2"):
        _linear(out, f"{released}.{k}", f"{ours}.{k}", index)


def released_slots(model: ComP) -> dict[str, Slot]:
    """Released parameter name -> `Slot`, for a faithful-layout model (time-axis prototypes, disentangling
    branch, unused modules built). Raises ValueError for a model whose switches change the parameter set."""
    q = model.quirks
    if not (q.batch_prototypes and q.disentangle and q.unused_params and q.projected_reconstruction) \
            or q.outer_prompt_mlp:
        raise ValueError("only a model with the released parameter set maps onto the released names "
                         "(faithful switches batch_prototypes, disentangle, unused_params, projected_reconstruction "
                         "on, outer_prompt_mlp off)")
    dim = model.cfg.hidden
    slots: dict[str, Slot] = {}
    for i, u in enumerate(LETTERS):
        name = MODALITIES[i]
        _linear(slots, f"{u}_in_proj.0", f"in_proj.{name}")
        _mlp(slots, f"shared_enc_{u}", "shared_enc", i)
        _mlp(slots, f"private_enc_{u}", "private_enc", i)
        _mlp(slots, f"dec_{u}", f"decoders.{name}")
        _linear(slots, f"nlp_head_{u}", "heads", i)
        for b in (1, 2):
            for layer in range(len(getattr(model, f"kp{b}").block.layers)):
                src, dst = f"block{b}.blocks.{layer}.Transformer_{u}", f"kp{b}.block.layers.{layer}"
                for j, p in enumerate(QKV):
                    _linear(slots, f"{src}.{p}", f"{dst}.qkv", i, (j * dim, (j + 1) * dim))
                _mlp(slots, f"{src}.mlp", f"{dst}.mlp", i)
            _linear(slots, f"prop_proj_{u}_{b}", f"kp{b}.in_proj", i)
            _mlp(slots, f"prop_proj_rev_{u}_{b}", f"kp{b}.out_proj", i)
            _mlp(slots, f"prop_former_{u}_{b}.proj_d", f"pg{b}.proj_d", i)
            _linear(slots, f"prop_former_{u}_{b}.proj_prompt", f"pg{b}.proj_prompt", i)
        _mlp(slots, f"prop_former_{u}_1.proj_n", "prototypes.proj_n", i)
        _mlp(slots, f"prop_former_{u}_2.proj_n", "unused_proj_n", i)
    _linear(slots, "proj1", "fusion.proj1")
    _linear(slots, "nlp_head", "fusion.head")
    _mlp(slots, "router", "coordinator.router")
    return slots


def load_released(model: ComP, params: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Copy released parameters (released names -> arrays) into `model`. Every released name must be given
    with its released shape and every project parameter must be covered; otherwise ValueError."""
    slots = released_slots(model)
    missing, extra = sorted(set(slots) - set(params)), sorted(set(params) - set(slots))
    if missing or extra:
        raise ValueError(f"released parameters do not match the model: missing {missing[:5]}, unknown {extra[:5]}")
    own = dict(model.named_parameters())
    covered: dict[str, int] = {}
    for name, slot in slots.items():
        full = own[slot.param]
        value = torch.as_tensor(np.asarray(params[name]), dtype=full.dtype)
        if tuple(slot.read(full).shape) != tuple(value.shape):
            raise ValueError(f"{name}: released shape {tuple(value.shape)}, model expects "
                             f"{tuple(slot.read(full).shape)}")
        slot.write(full, value)
        covered[slot.param] = covered.get(slot.param, 0) + value.numel()
    short = [n for n, p in own.items() if covered.get(n, 0) != p.numel()]
    if short:
        raise ValueError(f"model parameters not fully covered by the released ones: {short[:5]}")


def read_released(model: ComP, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-parameter tensors of `model` (e.g. {name: p.grad}) in the released names and layouts; parameters
    absent from `tensors` (or None there) are left out."""
    out = {}
    for name, slot in released_slots(model).items():
        full = tensors.get(slot.param)
        if full is not None:
            out[name] = slot.read(full)
    return out
