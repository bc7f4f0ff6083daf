"""Where the YAML presets in `configs/` live: `<kind>-<name>.yaml` for kind "extract" or "train"."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from core.errors import ConfigError

CONFIGS_ENV = "COMP_MER_CONFIGS"  # optional folder searched first


def configs_dirs() -> list[Path]:
    """Folders searched for preset files, first match wins."""
    dirs = []
    if os.environ.get(CONFIGS_ENV):
        dirs.append(Path(os.environ[CONFIGS_ENV]))
    dirs.append(Path(__file__).resolve().parent.parent / "configs")  # source checkout / editable install
    dirs.append(Path(sys.prefix) / "share" / "comp-mer" / "configs")  # data files of a wheel install
    return dirs


def available_presets(kind: str) -> list[str]:
    names = set()
    for folder in configs_dirs():
        if folder.is_dir():
            names.update(p.name[len(kind) + 1:-len(".yaml")] for p in folder.glob(f"{kind}-*.yaml"))
    return sorted(names)


def preset_path(kind: str, name: str) -> Path:
    for folder in configs_dirs():
        path = folder / f"{kind}-{name}.yaml"
        if path.is_file():
            return path
    raise ConfigError(f"no {kind} preset {name!r}; available: {available_presets(kind)} "
                      f"(searched {', '.join(str(d) for d in configs_dirs())})")
