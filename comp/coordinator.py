"""Coordinator (paper eqs. 12-14) and fusion head (eq. 15).

The router reads the three modality streams and weighs them per utterance; the head classifies the
weighted concatenation through a ReLU residual (`h = F + Dropout(ReLU(proj1(F)))`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from comp.attention import Mlp


def concat_modalities(x: torch.Tensor) -> torch.Tensor:
    """[M,N,D] -> [N,M*D] in modality order (a | t | v)."""
    m, n, d = x.shape
    return x.transpose(0, 1).reshape(n, m * d)


class Coordinator(nn.Module):
    """Soft per-utterance modality weights: softmax(router([x_a, x_t, x_v]))."""

    def __init__(self, n: int, dim: int, drop: float) -> None:
        super().__init__()
        self.router = Mlp(n * dim, dim, n, drop)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M,N,D] -> (fused [N,M*D], weights [N,M])."""
        weights = torch.softmax(self.router(concat_modalities(x)), dim=-1)
        return concat_modalities(x * weights.t()[..., None]), weights


class FusionHead(nn.Module):
    """The fused classifier/regressor on the concatenated modality streams."""

    def __init__(self, in_features: int, n_outputs: int, drop: float) -> None:
        super().__init__()
        self.proj1 = nn.Linear(in_features, in_features)
        self.head = nn.Linear(in_features, n_outputs)
        self.drop = nn.Dropout(drop)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.head(fused + self.drop(F.relu(self.proj1(fused))))
