"""The extractor contract and registry.

A clip flows through the extractors in a fixed order, ASR first: `asr` sets the transcript (or the reason
there is none), then `audio`, `text` and `visual` each turn the clip into one vector or a reason for absence.
Extractors work on batches of clips so that models can batch; they never touch files or the store.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from core.clip import STAGES, ClipInput
from core.config import from_dict


@dataclass
class ExtractorOutput:
    """One extractor's result for one clip."""

    features: np.ndarray | None  # float32 [feature_dim]; None when absent (then `reason` says why)
    reason: str = ""
    diagnostics: dict[str, float] = field(default_factory=dict)
    transcript: str | None = None  # ASR only


class Extractor(abc.ABC):
    """Base of every extractor. Subclasses set `name`, `stage` and `config_cls` and register themselves."""

    name: ClassVar[str]
    stage: ClassVar[str]  # one of STAGES
    config_cls: ClassVar[type]

    def __init__(self, config: Any = None, device: torch.device | str = "cpu") -> None:
        """`config`: an instance of `config_cls`, a plain mapping (checked strictly), or None for defaults."""
        if config is None:
            config = self.config_cls()
        elif not isinstance(config, self.config_cls):
            config = from_dict(self.config_cls, config, self.stage)
        self.config = config
        self.device = torch.device(device)

    @property
    @abc.abstractmethod
    def feature_dim(self) -> int:
        """Length of the vector this extractor produces (0 for ASR)."""

    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """Every resolved setting that changes a feature value (model id/path and hash, layers, pooling...)."""

    @abc.abstractmethod
    def extract(self, clips: Sequence[ClipInput]) -> list[ExtractorOutput]:
        """One output per clip, in order. Never raises for one bad clip: returns a reason instead."""

    def info(self) -> dict[str, str]:
        """Short descriptions stored as the modality's attributes (encoder, layers, pooling)."""
        spec = self.spec()
        return {k: str(spec.get(k, "")) for k in ("encoder", "layers", "pooling")}


REGISTRY: dict[str, type[Extractor]] = {}


def register(cls: type[Extractor]) -> type[Extractor]:
    """Class decorator: make an extractor nameable from configs and the CLI."""
    if cls.stage not in STAGES:
        raise ValueError(f"{cls.__name__}.stage must be one of {STAGES}")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two extractors named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


def available(stage: str | None = None) -> list[str]:
    """Registered extractor names (for one stage when given)."""
    _import_builtin()
    return sorted(n for n, c in REGISTRY.items() if stage is None or c.stage == stage)


def build(name: str, config: Any, device: torch.device | str = "cpu", **kwargs: Any) -> Extractor:
    """Instantiate a registered extractor by name."""
    _import_builtin()
    if name not in REGISTRY:
        raise KeyError(f"unknown extractor {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name](config, device, **kwargs)


_BUILTIN_MODULES = ("extractors.asr", "extractors.audio", "extractors.text", "extractors.visual")


def _import_builtin() -> None:
    import importlib

    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)

