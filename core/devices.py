"""`--device auto|cpu|cuda|cuda:N`, the same for every command."""

from __future__ import annotations

import torch

from core.errors import ConfigError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` -> the first CUDA device when there is one, else the CPU; `cuda[:N]` is checked to exist.

    Raises ConfigError with a message that says what to use instead."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise ConfigError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev
