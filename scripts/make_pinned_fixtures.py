"""Write the pinned fixtures of tests/test_pinned_formats.py into tests/data/pinned/.

Run it only when a file format or a spec is meant to change (and say so in the commit): the fixtures are what
an earlier comp-mer wrote, and the test checks that this one still reads them and means the same by them.

    python scripts/make_pinned_fixtures.py

Writes: `extracted.h5` (three generated clips through the fake extractors of tests/fake_extractors.py),
`synthetic.h5` (a small generated store with splits), `run/` (a tiny comp-train run on it: best.pt,
metrics.json, config.yaml) and `pinned.json` (the extraction spec of every preset, the hashes, and the
predictions of best.pt on every clip of synthetic.h5).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "pinned"
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pinned_support as support  # noqa: E402  (tests/pinned_support.py: what the test recomputes)


def main() -> None:
    import torch

    torch.set_num_threads(1)  # as the test suite runs (tests/conftest.py)
    from fake_extractors import fake_config_dict, make_media

    from demo.synthetic import make_synthetic_store
    from pipeline.extract import run_extraction
    from pipeline.extract_config import config_from_dict
    from pipeline.inputs import collect_inputs

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        clips = Path(tmp) / "clips"
        make_media(clips, ["angry/a.mp4", "sad/b.mp4", "sad/c.wav"])
        items = collect_inputs(clips, labels_from_folders=True)
        run_extraction(items, OUT / "extracted.h5", config_from_dict(fake_config_dict()), device="cpu",
                       overwrite=True)
    (OUT / "extracted.h5.missing.csv").unlink(missing_ok=True)
    make_synthetic_store(OUT / "synthetic.h5", n_conversations=10, utterances=(2, 5), dims=support.SYNTHETIC_DIMS,
                         splits=True, seed=3)
    run = OUT / "run"
    shutil.rmtree(run, ignore_errors=True)
    support.train_tiny(OUT / "synthetic.h5", run)
    for leftover in ("report.html", "train.log"):
        (run / leftover).unlink(missing_ok=True)
    for png in run.glob("*.png"):
        png.unlink()
    shutil.rmtree(run / "runs", ignore_errors=True)
    pinned = {
        "presets": support.preset_specs(),
        "offline_spec_hash": support.offline_spec_hash(),
        "extracted": support.store_digest(OUT / "extracted.h5"),
        "synthetic": support.store_digest(OUT / "synthetic.h5"),
        "checkpoint": support.checkpoint_digest(run / "best.pt"),
        "predictions": support.predictions(run / "best.pt", OUT / "synthetic.h5"),
    }
    (OUT / "pinned.json").write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
