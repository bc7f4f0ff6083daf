"""Which hidden layers make a feature, and how frames or tokens are averaged into one vector.

A layer spec names hidden states counted like Hugging Face's `output_hidden_states` (index 0 is the
embedding/input output, index L the last layer, negative indices count from the end):

    "last"          the last hidden state
    "sum-last-4"    sum of the last 4 (GCNet's DeBERTa protocol: layer_ids [-4, -3, -2, -1])
    "mean-last-4"   mean of the last 4
    "sum-all", "mean-all"   every hidden state, index 0 included
    [2, 3] / (2, 3) sum of the listed hidden states (negative indices allowed)

Pooling is a mean over real frames or tokens only: padding (and, for text, special tokens) never enters it.
Both the layer combination and the mean are linear, so they commute, which lets callers accumulate frame sums
chunk by chunk and divide once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

LayerSpec = str | tuple[int, ...]

_NAMED = re.compile(r"^(sum|mean)-(last-(\d+)|all)$")


def parse_layers(spec: LayerSpec, n_states: int) -> tuple[list[int], str]:
    """(non-negative hidden-state indices, "sum" | "mean") for a spec over `n_states` hidden states."""
    if isinstance(spec, str):
        if spec == "last":
            return [n_states - 1], "sum"
        match = _NAMED.match(spec)
        if not match:
            raise ValueError(f"layer spec {spec!r}: use 'last', 'sum-last-N', 'mean-last-N', 'sum-all', "
                             "'mean-all' or a list of hidden-state indices")
        op = match.group(1)
        if match.group(2) == "all":
            return list(range(n_states)), op
        count = int(match.group(3))
        if not 1 <= count <= n_states:
            raise ValueError(f"layer spec {spec!r}: the model has {n_states} hidden states (0..{n_states - 1})")
        return list(range(n_states - count, n_states)), op
    indices = []
    for i in spec:
        if not -n_states <= i < n_states:
            raise ValueError(f"layer index {i} out of range: the model has {n_states} hidden states "
                             f"(0..{n_states - 1}, or negative from the end)")
        indices.append(i % n_states)
    if not indices:
        raise ValueError("an empty layer list selects nothing")
    return indices, "sum"


def validate_layers(spec: LayerSpec) -> None:
    """Reject a malformed spec early (config time), before the model's depth is known."""
    if isinstance(spec, str):
        if spec != "last" and not _NAMED.match(spec):
            parse_layers(spec, 1)  # raises with the usage message
    elif not spec:
        raise ValueError("an empty layer list selects nothing")


def check_depth(spec: LayerSpec, n_states: int, key: str = "layers") -> None:
    """Raise ConfigError (naming `key`) when the spec does not fit a model with `n_states` hidden states."""
    from core.errors import ConfigError

    try:
        parse_layers(spec, n_states)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from err


def describe_layers(spec: LayerSpec) -> str:
    """The spec as one string for the store's attributes."""
    return spec if isinstance(spec, str) else "sum:" + ",".join(str(i) for i in spec)


def combine_layers(hidden_states: Sequence[torch.Tensor] | torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """Sum or mean of the selected hidden states (a sequence, or a tensor whose first axis is the state)."""
    indices, op = parse_layers(spec, len(hidden_states))
    out = hidden_states[indices[0]].clone() if len(indices) > 1 else hidden_states[indices[0]]
    for i in indices[1:]:
        out = out + hidden_states[i]
    return out / len(indices) if op == "mean" else out


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum over the positions where `mask` is true ([B, T, D], [B, T] -> [B, D] float64, [B] counts)."""
    weights = mask.to(torch.float64).unsqueeze(-1)
    return (values.to(torch.float64) * weights).sum(dim=1), mask.sum(dim=1)
