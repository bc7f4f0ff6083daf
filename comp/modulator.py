"""Dynamic gradient modulator (GM, paper eqs. 10-11; docs/model.md §4.5).

Per modality u and utterance i, with errors E (how wrong head u is on i) and Delta^{uv} = E^u - E^v:

    W^u_i = 1/2 * sum_{v != u} (sum_j Delta^{uv}_j - Delta^{uv}_i) / sum_j Delta^{uv}_j

and the gradient of the prototype layer M^u is rescaled instance-wise by W^u before the optimizer step.

* faithful layout (time-axis prototypes): M^u is fc1 of Mlp(S, c, c), one column per time slot; W is averaged
  over the batch per slot (valid utterances only, no valid -> 1) and scales the slot's column, exactly as the
  released `gradient_weight` intended (its name lookup never matched, §9.1, so it stays off in faithful).
* clean layout (instance prototypes): M^u is the instance -> prototype assignment Linear(D, c). Its gradient
  is sum_i z_i g_i^T over instances i (g_i = gradient of instance i's assignment logits), so scaling instance
  rows gives sum_i W_i z_i g_i^T: the same per-instance modulation, applied after backward as a correction
  (identical to an identity-forward, W-scaled-backward op on the logits, restricted to M as in eq. 11).
  The sum over j is over the batch's valid utterances; |sum Delta| ~ 0 gives W = 1, and W is clipped to
  [0, cfg.modulator_max] (the raw ratio explodes or flips sign when sum Delta nears 0).
"""

from __future__ import annotations

import torch

from comp.batch import ComPBatch, ComPOutput
from comp.config import ModelConfig
from comp.prompts import TimeAxisPrototypes
from comp.propagation import OTHERS
from core.clip import MODALITIES

RELEASED_EPS = 1e-10  # denominator guard of the released gradient_weight_single
GUARD_REL = 1e-6  # clean: |sum Delta| below this fraction of sum |Delta| counts as zero


def modality_errors(head_logits: dict[str, torch.Tensor], targets: torch.Tensor, task: str,
                    kind: str) -> torch.Tensor:
    """E [3,B,S] of each modality head on each utterance.

    Classification, "true_class_prob": E = |1 - softmax(logits)_y|, bounded in [0, 1] and comparable across
    modalities whose logits have different scales. "class_index" is the released |logit_y - y|, which compares
    a raw logit to the class *index* (so class 3 "wants" a logit of 3): kept only for faithful ablations.
    Regression: E = |prediction - y|.
    """
    logits = torch.stack([head_logits[u] for u in MODALITIES]).detach().float()  # [3,B,S,C]
    if task == "regression":
        return (logits[..., 0] - targets.float()).abs()
    y = targets.long().clamp_min(0)
    idx = y[None, ..., None].expand(logits.shape[0], -1, -1, 1)
    if kind == "class_index":
        return (logits.gather(-1, idx)[..., 0] - y.float()).abs()
    if kind == "true_class_prob":
        return (1 - torch.softmax(logits, dim=-1).gather(-1, idx)[..., 0]).abs()
    raise ValueError(f"unknown modulator_error {kind!r}; use true_class_prob or class_index")


def instance_weights(errors: torch.Tensor, rows: torch.Tensor, guard: bool,
                     clip: tuple[float, float] | None) -> torch.Tensor:
    """W [3,B,S] from errors [3,B,S] over rows [B,S] (eq. 10). Rows outside `rows` get W = 1.

    guard=False reproduces the released arithmetic ((sum - d) / (sum + 1e-10)); guard=True sets W = 1 for a
    pair whose sum of differences is ~0 relative to the differences themselves.
    """
    r = rows.to(errors.dtype)
    pair_w = []
    for u, others in enumerate(OTHERS):
        ws = []
        for v in others:
            delta = (errors[u] - errors[v]) * r
            total = delta.sum()
            if guard:
                if total.abs() <= GUARD_REL * delta.abs().sum() or total.abs() < 1e-12:
                    ws.append(torch.ones_like(delta))
                    continue
                ws.append((total - delta) / total)
            else:
                ws.append((total - delta) / (total + RELEASED_EPS))
        pair_w.append(0.5 * (ws[0] + ws[1]))
    w = torch.stack(pair_w)
    if clip is not None:
        w = w.clamp(*clip)
    return torch.where(rows[None], w, torch.ones_like(w))


class GradientModulator:
    """Rescales the prototype layer's gradient per instance; call after backward, before optimizer.step()."""

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, task: str) -> None:
        q = cfg.resolved
        self.model, self.cfg, self.task = model, cfg, task
        self.enabled = bool(q.gradient_modulator)
        self.error_kind = q.modulator_error
        self.per_slot = isinstance(model.prototypes, TimeAxisPrototypes)

    def rows(self, batch: ComPBatch) -> torch.Tensor:
        """bool [B,S]: the utterances whose errors enter the batch sums (an unlabelled one has no error)."""
        rows = batch.scored
        if self.per_slot and self.task == "regression":  # released code: only utterances with a non-zero label
            rows = rows & (batch.targets != 0)
        return rows

    def weights_from(self, errors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """W [3,B,S] from errors [3,B,S] over `rows`: the released arithmetic per slot, guarded and clipped
        in the clean layout."""
        if self.per_slot:
            return instance_weights(errors, rows, guard=False, clip=None)
        return instance_weights(errors, rows, guard=True, clip=(0.0, self.cfg.modulator_max))

    def weights(self, out: ComPOutput, batch: ComPBatch) -> torch.Tensor:
        """Per-instance W [3,B,S] for this batch (exposed for inspection and tests)."""
        errors = modality_errors(out.head_logits, batch.targets, self.task, self.error_kind)
        return self.weights_from(errors, self.rows(batch))

    @staticmethod
    def scale_slots(param: torch.nn.Parameter, w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Per-slot layout: multiply column s of the time-axis weight's gradient by the mean W of slot s over
        `rows` (1 where no utterance); returns the slot means [3,S]."""
        r = rows.to(w.dtype)
        n = r.sum(0)  # [S]
        slot_w = torch.where(n > 0, (w * r).sum(1) / n.clamp_min(1), torch.ones_like(w[:, 0]))
        full = torch.ones(param.shape[:2], dtype=param.grad.dtype, device=param.grad.device)
        full[:, : slot_w.shape[1]] = slot_w
        param.grad.mul_(full[..., None])  # [3,S,c]: column s of the released [c,S] weight
        return slot_w

    def target(self, out: ComPOutput, batch: ComPBatch) -> torch.nn.Parameter | None:
        """The parameter to modulate now, or None: off, stage 1 (no coordinator output), no targets, no grad."""
        if not self.enabled or out.weights is None or batch.targets is None:
            return None
        param = self.model.prototypes.modulated_weight
        return param if param.grad is not None else None

    def apply(self, out: ComPOutput, batch: ComPBatch) -> dict[str, float]:
        """Modulate the gradient in place; returns summary numbers ({} when off or in stage 1)."""
        param = self.target(out, batch)
        if param is None:
            return {}
        w = self.weights(out, batch)
        if self.per_slot:
            used = self.scale_slots(param, w, self.rows(batch))
        else:
            logits = out.aux.get("assign_logits")
            if logits is None or logits.grad is None:
                return {}
            z = out.aux["assign_input"].float()  # [3,N,D] packed valid rows
            g = logits.grad.float()  # [3,N,c]
            used = w[:, batch.valid]  # [3,N], same row-major order as the packed rows
            correction = torch.bmm((z * (used - 1)[..., None]).transpose(1, 2), g)  # sum_i (W_i - 1) z_i g_i^T
            param.grad.add_(correction.to(param.grad.dtype))
        stats: dict[str, float] = {}
        if used.numel() == 0:
            return stats
        for i, u in enumerate(MODALITIES):
            stats[f"gm_w_mean_{u}"] = float(used[i].mean())
            stats[f"gm_w_min_{u}"] = float(used[i].min())
            stats[f"gm_w_max_{u}"] = float(used[i].max())
        return stats
