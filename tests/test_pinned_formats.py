"""Files an earlier comp-mer wrote (tests/data/pinned, made by scripts/make_pinned_fixtures.py) still load
and mean the same: extraction presets resolve to the same settings and spec hashes, stores read as the same
columns, a checkpoint rebuilds the same model and predicts the same, and training writes the same metrics."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pinned_support as support
import pytest

PINNED = Path(__file__).parent / "data" / "pinned"


@pytest.fixture(scope="module")
def pinned() -> dict[str, Any]:
    return json.loads((PINNED / "pinned.json").read_text(encoding="utf-8"))


def test_every_preset_resolves_to_its_pinned_settings(pinned: dict[str, Any]) -> None:
    """Each configs/extract-*.yaml, filled in with its extractors' defaults, gives the pinned canonical JSON."""
    now = support.preset_specs()
    assert sorted(now) == sorted(pinned["presets"])
    for name, entry in now.items():
        assert entry["config"] == pinned["presets"][name]["config"], name
        assert entry["hash"] == pinned["presets"][name]["hash"], name


def test_presets_round_trip_through_yaml(tmp_path: Path) -> None:
    """A resolved preset written as YAML reads back as the same config."""
    from core.config import dump_yaml, load_yaml
    from pipeline.extract_config import ExtractionConfig, available_presets, load_preset, with_stage_defaults

    for name in available_presets():
        cfg = with_stage_defaults(load_preset(name))
        dump_yaml(cfg, tmp_path / f"{name}.yaml")
        assert load_yaml(ExtractionConfig, tmp_path / f"{name}.yaml") == cfg


@pytest.mark.slow
def test_offline_preset_spec_hash_is_pinned(pinned: dict[str, Any]) -> None:
    """The offline preset's full extraction spec (models loaded) hashes as before, on any machine: packaged
    models are recorded by name and content hash, not by where pip installed them."""
    assert support.offline_spec_hash() == pinned["offline_spec_hash"]


@pytest.mark.parametrize("name", ["extracted", "synthetic"])
def test_store_reads_as_pinned(pinned: dict[str, Any], name: str) -> None:
    """The header, the spec hash and every column of a pinned store read as they did."""
    assert support.store_digest(PINNED / f"{name}.h5") == pinned[name]


def test_extracted_store_spec_is_reproduced_by_its_extractors(pinned: dict[str, Any]) -> None:
    """Rebuilding the extractors from a pinned store's spec gives the same spec hash (no re-extraction)."""
    from pipeline.extract import Extraction
    from pipeline.store import read_header

    header = read_header(PINNED / "extracted.h5")
    extraction = Extraction.from_spec(header.extraction_spec, "cpu")
    assert extraction.spec_hash == header.spec_hash == pinned["extracted"]["stored_spec_hash"]


def test_pinned_store_accepts_new_rows_of_its_spec(tmp_path: Path) -> None:
    """A store written earlier is appended to, not refused, by a writer with its own header."""
    from pipeline.store import StoreWriter, read_header, read_store

    path = tmp_path / "extracted.h5"
    shutil.copy(PINNED / "extracted.h5", path)
    before = read_store(path)
    with StoreWriter(path, read_header(path)) as writer:
        writer.add(list(_records(before))[:1])
    assert len(read_store(path)) == len(before)


def _records(data: Any) -> Any:
    from pipeline.extract import records_from_store

    return records_from_store(data)


def test_checkpoint_loads_as_pinned(pinned: dict[str, Any]) -> None:
    """The pinned checkpoint's meta, config (round-tripped) and weights are read as they were written."""
    digest = support.checkpoint_digest(PINNED / "run" / "best.pt")
    assert digest == pinned["checkpoint"]
    assert digest["train_config_round_trip"] == digest["train_config"]


def test_checkpoint_predicts_as_pinned(pinned: dict[str, Any]) -> None:
    """The pinned checkpoint gives the pinned logits for every clip of the store it was trained on."""
    now = support.predictions(PINNED / "run" / "best.pt", PINNED / "synthetic.h5")
    assert sorted(now) == sorted(pinned["predictions"])
    for clip, logits in now.items():
        assert logits == pytest.approx(pinned["predictions"][clip], rel=1e-5, abs=1e-6), clip


def test_training_writes_the_pinned_metrics_and_config(tmp_path: Path) -> None:
    """The same tiny run writes metrics.json with the same structure and numbers, and the same config.yaml."""
    support.train_tiny(PINNED / "synthetic.h5", tmp_path)
    assert (tmp_path / "config.yaml").read_text() == (PINNED / "run" / "config.yaml").read_text()
    now = support.strip_timings(json.loads((tmp_path / "metrics.json").read_text()))
    then = support.strip_timings(json.loads((PINNED / "run" / "metrics.json").read_text()))
    _assert_same(now, then, "metrics")


def _assert_same(now: Any, then: Any, where: str) -> None:
    """Equal structure and strings; numbers equal to float tolerance."""
    if isinstance(then, dict):
        assert isinstance(now, dict) and list(now) == list(then), f"{where}: keys {list(now)} vs {list(then)}"
        for k in then:
            _assert_same(now[k], then[k], f"{where}.{k}")
    elif isinstance(then, list):
        assert isinstance(now, list) and len(now) == len(then), f"{where}: length"
        for i, (a, b) in enumerate(zip(now, then)):
            _assert_same(a, b, f"{where}[{i}]")
    elif isinstance(then, float) and not isinstance(now, bool) and isinstance(now, (int, float)):
        assert math.isclose(now, then, rel_tol=1e-5, abs_tol=1e-7), f"{where}: {now} vs {then}"
    else:
        assert now == then and type(now) is type(then), f"{where}: {now!r} vs {then!r}"
