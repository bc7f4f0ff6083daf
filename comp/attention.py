"""Modality-specific layers and the masked multi-head self-attention block (docs/model.md §4.2).

Every layer here holds one set of weights per modality, stacked on a leading axis, so the three modality
streams run as one batched matmul (`baddbmm`) instead of three calls. Streams are packed [M, N, D]
(modality, real utterance, feature): no position-wise work is spent on padding; `Layout` scatters rows into
the padded [M, B, L, D] grid only for attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class ModalityLinear(nn.Module):
    """`n` independent Linear(in, out) layers applied to the matching slice of the leading axis."""

    def __init__(self, n: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.n, self.in_features, self.out_features = n, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n, 1, out_features)) if bias else None
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation, per modality
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[1:-1]
        flat = x.reshape(self.n, -1, self.in_features)
        out = torch.bmm(flat, self.weight) if self.bias is None else torch.baddbmm(self.bias, flat, self.weight)
        return out.reshape(self.n, *lead, self.out_features)


class ModalityMlp(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout, one per modality (the released code's `Mlp`)."""

    def __init__(self, n: int, in_features: int, hidden: int, out_features: int, drop: float) -> None:
        super().__init__()
        self.fc1 = ModalityLinear(n, in_features, hidden)
        self.fc2 = ModalityLinear(n, hidden, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Mlp(nn.Module):
    """The single-stream version of `ModalityMlp` (router, decoders)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


@dataclass(frozen=True)
class Layout:
    """Where packed rows live in the padded batch.

    Position-wise layers run on packed rows [M, N, C] (real utterances only, row-major over (conversation,
    utterance)); only attention scatters them into the padded [M, B, L, C] grid it needs for masking.
    """

    index: torch.Tensor  # long [N]: flat position b * L + s of each packed row
    batch: int
    length: int
    key_mask: torch.Tensor  # bool [M,B,L]: True where the modality is present (a key that may be attended)

    @classmethod
    def from_valid(cls, valid: torch.Tensor, key_mask: torch.Tensor) -> "Layout":
        return cls(valid.flatten().nonzero().squeeze(1), valid.shape[0], valid.shape[1], key_mask)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[M,N,C] packed -> [M,B,L,C] with zeros on padding."""
        m, _, c = x.shape
        grid = x.new_zeros(m, self.batch * self.length, c).index_copy(1, self.index, x)
        return grid.view(m, self.batch, self.length, c)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[M,B,L,C] -> [M,N,C] (real utterances only)."""
        return x.reshape(x.shape[0], -1, x.shape[-1]).index_select(1, self.index)

    def doubled(self) -> "Layout":
        """Layout of [rows; other rows] stacked on N, i.e. the batch seen twice (shared + private branches)."""
        return Layout(torch.cat((self.index, self.index + self.batch * self.length)), 2 * self.batch,
                      self.length, torch.cat((self.key_mask, self.key_mask), dim=1))


class MaskedSelfAttention(nn.Module):
    """One modality-specific MSA layer: `o = softmax(q k^T / sqrt(d_h), keys masked) v`, returns `o + Mlp(o)`.

    As released: no output projection, no LayerNorm; only keys are masked, so a missing utterance still
    queries its present neighbours (the "seamless reconstruction" of §9.15). A query with no valid key gets
    o = 0 (the released code's NaN -> 0), computed without ever producing a NaN so gradients stay finite.
    """

    def __init__(self, n: int, dim: int, heads: int, drop: float, attn_drop: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = ModalityLinear(n, dim, 3 * dim)  # q, k, v fused: same parameter count as three Linear(D, D)
        self.attn_drop = attn_drop
        self.mlp = ModalityMlp(n, dim, dim, dim, drop)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        """x [M,N,D] packed rows -> [M,N,D]."""
        m, _, dim = x.shape
        b, length = layout.batch, layout.length
        qkv = layout.pad(self.qkv(x)).view(m, b, length, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5)  # each [M,B,H,L,dh]
        key_mask = layout.key_mask
        any_key = key_mask.any(dim=-1)  # [M,B]
        # Conversations with no valid key attend everywhere (finite), then get zeroed: the NaN -> 0 rule.
        allowed = key_mask | ~any_key[..., None]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, :, None, None, :],
                                           dropout_p=self.attn_drop if self.training else 0.0)
        o = o * any_key[:, :, None, None, None].to(o.dtype)
        o = layout.pack(o.transpose(2, 3).reshape(m, b, length, dim))
        return o + self.mlp(o)


class ModalityBlock(nn.Module):
    """`layers` masked MSA layers with a residual each: x <- x + MSA_u(x) (the released `Block`)."""

    def __init__(self, n: int, dim: int, heads: int, layers: int, drop: float, attn_drop: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MaskedSelfAttention(n, dim, heads, drop, attn_drop) for _ in range(layers))

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x, layout)
        return x
