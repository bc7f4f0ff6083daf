"""Prototypes and prompt generation (PG, docs/model.md §4.4, paper eqs. 6-8).

Two ways to build the c prototypes of each modality:

* `TimeAxisPrototypes` (faithful, `batch_prototypes`): the released code's Mlp(S -> c -> c) over the time axis
  of every conversation padded to S slots, giving c prototypes per conversation that are then pooled over the
  whole mini-batch, so a prediction depends on which other conversations share its batch.
* `InstancePrototypes` (clean): the paper's "compression over instances" made batch-independent at inference.
  A learned instance -> prototype assignment (a bias-free Linear(D, c), softmax over the *present* instances
  of the batch, per prototype) pools the batch into c vectors, then GELU, a c-by-c mixing layer and dropout
  (the paper's "n-by-c linear, GeLU, c-by-c linear, dropout", with the first layer made size-free). Training
  updates an EMA bank kept as a buffer; eval mode uses only the bank, so a conversation's prediction never
  depends on the rest of the batch. The assignment logits are what the gradient modulator rescales.

`PromptGenerator` turns features + prototypes into one p-dim prompt per utterance:
`P = [MLP_p](FFN1(softmax(cos(Z, A)) A) + FFN2(Z))`, zeroed where the modality is absent when masking is on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from comp.attention import ModalityLinear, ModalityMlp


class TimeAxisPrototypes(nn.Module):
    """Released-code prototypes: Mlp(S, c, c) along the time axis, c per conversation, pooled over the batch."""

    def __init__(self, n: int, max_len: int, n_prototypes: int, drop: float) -> None:
        super().__init__()
        self.max_len = max_len
        self.proj_n = ModalityMlp(n, max_len, n_prototypes, n_prototypes, drop)

    @property
    def modulated_weight(self) -> nn.Parameter:
        """The n-by-c first layer the paper's modulator acts on, laid out [M, S, c] (column s = slot s)."""
        return self.proj_n.fc1.weight

    def forward(self, z: torch.Tensor, slot_mask: torch.Tensor | None) -> torch.Tensor:
        """z [M,B,S,D] over all max_len slots; slot_mask [M,B,S] zeroes slots (None = keep all) -> [M,B*c,D]."""
        m, b, s, d = z.shape
        if s != self.max_len:
            raise ValueError(f"time-axis prototypes need exactly max_len={self.max_len} slots, got {s}")
        if slot_mask is not None:
            z = z * slot_mask[..., None].to(z.dtype)
        protos = self.proj_n(z.transpose(2, 3))  # [M,B,D,c]
        return protos.transpose(2, 3).reshape(m, -1, d)


class InstancePrototypes(nn.Module):
    """Clean prototypes: softmax-over-present-instances assignment, c-by-c mix, EMA bank for inference."""

    def __init__(self, n: int, dim: int, n_prototypes: int, drop: float, ema: float) -> None:
        super().__init__()
        self.ema = ema
        # no bias: a per-prototype constant cancels in a softmax taken over instances
        self.assign = ModalityLinear(n, dim, n_prototypes, bias=False)
        self.mix = ModalityLinear(n, n_prototypes, n_prototypes)
        self.drop = nn.Dropout(drop)
        self.register_buffer("bank", torch.zeros(n, n_prototypes, dim))
        self.register_buffer("bank_filled", torch.zeros(n, dtype=torch.bool))

    @property
    def modulated_weight(self) -> nn.Parameter:
        """The instance -> prototype layer the modulator acts on, laid out [M, D, c]."""
        return self.assign.weight

    def forward(self, z: torch.Tensor, member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z [M,N,D] packed rows, member bool [M,N] (rows allowed to shape prototypes) -> (A [M,c,D], logits).

        In eval mode A is the bank and logits is None; in training A comes from the batch (with gradients),
        the bank is updated, and the assignment logits [M,N,c] are returned for the gradient modulator.
        """
        if not self.training:
            return self.bank.to(z.dtype), None
        m = z.shape[0]
        logits = self.assign(z)  # [M,N,c]
        keep = member[..., None]
        has_member = keep.any(dim=1, keepdim=True)  # [M,1,1]
        # softmax over the batch's member instances, per prototype; finite even when a modality has none
        weights = torch.softmax(logits.masked_fill(~keep, torch.finfo(logits.dtype).min), dim=1)
        weights = weights * (keep & has_member).to(weights.dtype)
        pooled = torch.bmm(weights.transpose(1, 2), z)  # [M,c,D]
        protos = self.drop(self.mix(F.gelu(pooled).transpose(1, 2)).transpose(1, 2))
        self._update_bank(protos.detach(), has_member.view(m))
        return protos, logits

    @torch.no_grad()
    def _update_bank(self, protos: torch.Tensor, has_member: torch.Tensor) -> None:
        protos = protos.to(self.bank.dtype)
        blended = torch.where(self.bank_filled[:, None, None], self.ema * self.bank + (1 - self.ema) * protos, protos)
        self.bank.copy_(torch.where(has_member[:, None, None], blended, self.bank))
        self.bank_filled |= has_member


class PromptGenerator(nn.Module):
    """One PG block: a p-dim prompt per utterance from its similarity to the prototypes (eqs. 7-8)."""

    def __init__(self, n: int, dim: int, prompt_dim: int, drop: float, outer_mlp: bool) -> None:
        super().__init__()
        self.proj_d = ModalityMlp(n, dim, prompt_dim, prompt_dim, drop)  # FFN1 on the prototype mixture
        self.proj_prompt = ModalityLinear(n, dim, prompt_dim)  # FFN2, the residual path from Z
        self.proj_out = ModalityMlp(n, prompt_dim, prompt_dim, prompt_dim, drop) if outer_mlp else None  # MLP_p

    def forward(self, z: torch.Tensor, prototypes: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        """z [M,N,D] packed rows, prototypes [M,K,D] (K = c, or B*c when pooled), present [M,N] or None
        -> prompts [M,N,p]."""
        zn = F.normalize(z, dim=-1, eps=1e-8)
        an = F.normalize(prototypes, dim=-1, eps=1e-8)
        sim = torch.softmax(torch.bmm(zn, an.transpose(1, 2)), dim=-1)  # [M,N,K]
        prompt = self.proj_d(torch.bmm(sim, prototypes)) + self.proj_prompt(z)
        if self.proj_out is not None:
            prompt = self.proj_out(prompt)
        if present is not None:
            prompt = prompt * present[..., None].to(prompt.dtype)
        return prompt
