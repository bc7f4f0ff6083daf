"""Knowledge propagation (KP, paper eqs. 3-5, 9; docs/model.md §4.4).

Each modality's features are concatenated with the prompts of the *other two* modalities, projected back to
D, passed through the modality-specific masked self-attention block and (for the first block) projected out
again to [features, prompt from v, prompt from w].
"""

from __future__ import annotations

import torch
from torch import nn

from comp.attention import Layout, ModalityBlock, ModalityLinear, ModalityMlp

# For modality index u, the two others in the released order: a <- (t, v), t <- (a, v), v <- (a, t).
OTHERS: tuple[tuple[int, int], ...] = ((1, 2), (0, 2), (0, 1))


def cross_prompts(prompts: torch.Tensor) -> torch.Tensor:
    """prompts [3,...,p] of each modality -> [3,...,2p]: row u holds the prompts of the other two."""
    index = torch.tensor(OTHERS, device=prompts.device)  # [3,2]
    gathered = prompts[index]  # [3,2,...,p]
    return torch.cat((gathered[:, 0], gathered[:, 1]), dim=-1)


class KnowledgePropagation(nn.Module):
    """One KP block: in-projection of [Z, P_v, P_w], m masked MSA layers, optional back-projection."""

    def __init__(self, n: int, dim: int, prompt_dim: int, heads: int, layers: int, drop: float,
                 attn_drop: float, back_projection: bool) -> None:
        super().__init__()
        self.dim, self.prompt_dim = dim, prompt_dim
        self.in_proj = ModalityLinear(n, dim + 2 * prompt_dim, dim)
        self.block = ModalityBlock(n, dim, heads, layers, drop, attn_drop)
        self.out_proj = ModalityMlp(n, dim, dim, dim + 2 * prompt_dim, drop) if back_projection else None

    def forward(self, z: torch.Tensor, others: torch.Tensor, layout: Layout,
                project_back: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z [M,N,D], others [M,N,2p] -> (features [M,N,D], prompts back [M,N,2p] or None)."""
        g = self.block(self.in_proj(torch.cat((z, others), dim=-1)), layout)
        if not project_back or self.out_proj is None:
            return g, None
        out = self.out_proj(g)
        return out[..., : self.dim], out[..., self.dim:]
