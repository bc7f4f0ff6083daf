"""The packages' layers point down only: the import-linter contract in pyproject.toml holds, and breaks on an
upward import (the contract is checked against a copy of the packages with one such import added)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "extractors", "comp", "pipeline", "demo")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    """Run lint-imports on the packages under `tree` with the project's contract."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=300)


def test_the_layer_contract_holds():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(("module", "upward"), [
    ("comp/model.py", "import pipeline.store"),  # the model reading files
    ("comp/train.py", "from pipeline import report"),  # training writing the run folder
    ("extractors/base.py", "import pipeline.decode"),  # an extractor decoding media itself
    ("extractors/text.py", "from comp import config"),  # extractors and the model are independent
    ("comp/losses.py", "import extractors.base"),
    ("core/records.py", "import comp.metrics"),  # core rests on nothing of the project
])
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n{upward}  # noqa\n", encoding="utf-8")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "BROKEN" in done.stdout and module.replace("/", ".").removesuffix(".py") in done.stdout
