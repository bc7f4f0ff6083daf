"""Resuming: reruns skip finished clips, other specs are refused, --overwrite, --retry-failed, kill -9."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from fake_extractors import fake_config_dict, make_media

from core.records import StoreError, StoreHeader
from demo.media import corrupt_file, make_clip
from pipeline.extract import Extraction, run_extraction
from pipeline.extract_config import config_from_dict
from pipeline.inputs import collect_inputs
from pipeline.store import StoreWriter, read_store

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def fake_cfg(**overrides):
    return config_from_dict(fake_config_dict(**overrides))


def run(root, out, cfg=None, **kwargs):
    return run_extraction(collect_inputs(root), out, cfg or fake_cfg(), device="cpu", **kwargs)


def by_id(data):
    """{id: (status, audio, text, visual vectors)} of a store, for comparing runs."""
    return {clip_id: (data.status[i], *(data.features[m][i].tolist() for m in ("audio", "text", "visual")))
            for i, clip_id in enumerate(data.ids)}


@pytest.fixture()
def media(tmp_path):
    make_media(tmp_path / "in", [f"c{i}.mp4" for i in range(5)])
    return tmp_path / "in"


def test_rerun_skips_every_finished_clip(media, tmp_path):
    """Rerunning the same extraction extracts nothing and leaves the rows as they were."""
    run(media, tmp_path / "f.h5")
    before = by_id(read_store(tmp_path / "f.h5"))
    summary = run(media, tmp_path / "f.h5")
    assert (summary.processed, summary.skipped, summary.ok) == (0, 5, 5)
    assert by_id(read_store(tmp_path / "f.h5")) == before


def test_new_clips_are_added_to_an_existing_store(media, tmp_path):
    """Clips added to the folder after a run are the only ones extracted by the next run."""
    run(media, tmp_path / "f.h5")
    make_media(media, ["new.mp4"])
    summary = run(media, tmp_path / "f.h5")
    assert (summary.processed, len(read_store(tmp_path / "f.h5"))) == (1, 6)


def test_different_spec_is_refused(media, tmp_path):
    """A rerun with another decode setting refuses to mix features and suggests --overwrite."""
    run(media, tmp_path / "f.h5")
    with pytest.raises(StoreError, match="different extraction spec.*--overwrite"):
        run(media, tmp_path / "f.h5", fake_cfg(decode={"fps": 1.0, "max_frames": 4, "max_side": 64}))


def test_overwrite_starts_fresh(media, tmp_path):
    """--overwrite discards the old store (other spec) and writes every clip with the new one."""
    run(media, tmp_path / "f.h5")
    new = fake_cfg(decode={"fps": 1.0, "max_frames": 1, "max_side": 64})
    summary = run(media, tmp_path / "f.h5", new, overwrite=True)
    data = read_store(tmp_path / "f.h5")
    assert (summary.processed, len(data)) == (5, 5)
    assert data.header.extraction_spec["decode"]["max_frames"] == 1
    assert (data.features["visual"][:, 4] == 1).all()  # one frame sampled per clip now


def test_retry_failed_redoes_only_error_rows(media, tmp_path):
    """--retry-failed re-extracts the clips recorded as errors (now fixed) and nothing else."""
    corrupt_file(media / "c1.mp4")
    run(media, tmp_path / "f.h5")
    before = by_id(read_store(tmp_path / "f.h5"))
    assert before["c1"][0] == "error"
    make_clip(media / "c1.mp4", audio="noise", face=True, duration_s=1.0)
    assert run(media, tmp_path / "f.h5").processed == 0  # a plain rerun leaves errors alone
    summary = run(media, tmp_path / "f.h5", retry_failed=True)
    after = by_id(read_store(tmp_path / "f.h5"))
    assert (summary.processed, after["c1"][0], len(after)) == (1, "ok", 5)
    assert {k: v for k, v in after.items() if k != "c1"} == {k: v for k, v in before.items() if k != "c1"}


def test_journaled_rows_of_a_crashed_run_are_kept(media, tmp_path):
    """Rows journaled but never committed (a crash) are committed by the rerun, not extracted again."""
    cfg = fake_cfg()
    extraction = Extraction.from_config(cfg, "cpu")
    items = collect_inputs(media)
    header = StoreHeader("classification", (), extraction.header_modalities, extraction_spec=extraction.spec)
    writer = StoreWriter(tmp_path / "f.h5", header)
    writer.add(list(extraction.extract_paths(items[:2])))  # journaled; the "crash" skips commit()
    summary = run(media, tmp_path / "f.h5", cfg, extraction=extraction)
    assert (summary.processed, summary.skipped, len(read_store(tmp_path / "f.h5"))) == (3, 2, 5)


def _progress(out: Path) -> set[str]:
    """Ids committed or journaled so far (tolerates a file being replaced while it is read)."""
    ids: set[str] = set()
    journal = out.with_name(out.name + ".journal")
    try:
        ids.update(read_store(out, include_pending_warning=False).ids.tolist())
    except Exception:  # noqa: BLE001 - mid-rename; the next poll sees it
        pass
    for chunk in journal.glob("*.npz") if journal.exists() else ():
        meta = StoreWriter._chunk_meta(chunk)  # None once a commit has folded and removed the chunk
        if meta is not None:
            ids.update(meta["ids"])
    return ids


@pytest.mark.slow
def test_kill_9_then_rerun_gives_every_clip_exactly_once(tmp_path):
    """comp-extract killed with SIGKILL mid-run, then rerun: each clip once, values as an uninterrupted run."""
    names = [f"s{i:02d}.mp4" for i in range(30)]
    make_media(tmp_path / "in", names, seconds=0.5)
    config = tmp_path / "slow.yaml"
    data = fake_config_dict(asr={"delay_s": 0.08}, batch_size=2, commit_every=6)
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    out = tmp_path / "f.h5"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pipeline.cli.extract", str(tmp_path / "in"), "--out", str(out),
           "--config", str(config), "--device", "cpu", "-q"]

    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(_progress(out)) < 8 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done_before = _progress(out)
    assert 8 <= len(done_before) < 30
    committed_before = by_id(read_store(out, include_pending_warning=False))
    assert len(committed_before) >= 6  # at least one commit (every 6 clips) happened before the kill

    rerun = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    data = read_store(out)
    assert sorted(data.ids.tolist()) == sorted(n[:-4] for n in names)  # every clip, exactly once
    after = by_id(data)
    assert all(after[k] == v for k, v in committed_before.items())  # earlier rows intact

    reference = tmp_path / "ref.h5"
    run_extraction(collect_inputs(tmp_path / "in"), reference, config_from_dict(fake_config_dict()), device="cpu")
    expected = by_id(read_store(reference))
    assert after.keys() == expected.keys()
    for clip_id, values in expected.items():
        assert after[clip_id][0] == values[0]
        for got, want in zip(after[clip_id][1:], values[1:]):
            np.testing.assert_allclose(got, want, rtol=0, atol=0)
    assert not out.with_name(out.name + ".journal").exists()
