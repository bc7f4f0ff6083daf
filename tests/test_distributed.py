"""Several processes (torch.distributed, gloo on CPU): sharded extraction and its merge, a killed rank, DDP
training and its building blocks, and fold/seed fan-out. Every multi-process case runs 2 real processes."""

from __future__ import annotations

import json
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

from demo.synthetic import make_synthetic_store
from pipeline.cli.launch import child_environment, free_port, strip_option
from pipeline.extract import part_path, parts_dir_for, run_extraction, shard_items
from pipeline.extract_config import config_from_dict
from pipeline.inputs import ClipItem, collect_inputs
from pipeline.store import StoreWriter, read_store

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def _extract_cmd(root: Path, out: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli.extract", str(root), "--out", str(out), "--config", str(config),
            "--device", "cpu", "-q"]


def _write_config(path: Path, **overrides) -> Path:
    path.write_text(yaml.safe_dump(fake_config_dict(**overrides)), encoding="utf-8")
    return path


def _rows(data) -> dict[str, tuple]:
    """{id: (status, transcript, present flags, reasons, features)} of a store."""
    mods = ("audio", "text", "visual")
    return {clip_id: (data.status[i], data.transcript[i], tuple(bool(data.present[m][i]) for m in mods),
                      tuple(data.reason[m][i] for m in mods), [data.features[m][i] for m in mods])
            for i, clip_id in enumerate(data.ids)}


def _assert_same_rows(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for clip_id, (status, transcript, present, reasons, feats) in want.items():
        assert got[clip_id][:4] == (status, transcript, present, reasons), clip_id
        for a, b in zip(got[clip_id][4], feats):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- extraction

def test_shard_split_is_a_stable_partition():
    """Every clip lands in exactly one share, the same one whatever the input order, and shares are even."""
    items = [ClipItem(id=f"c{i:02d}", path=Path(f"/nonexistent/c{i:02d}.mp4")) for i in range(11)]
    shares = shard_items(items, 3)
    assert sorted(it.id for s in shares for it in s) == sorted(it.id for it in items)
    assert shard_items(list(reversed(items)), 3) == shares
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_two_ranks_write_the_same_store_as_one_process(tmp_path):
    """comp-extract --nproc 2 stores every clip once, with one process's features, flags, reasons, transcripts."""
    make_media(tmp_path / "in", [f"c{i}.mp4" for i in range(9)] + ["speech.wav"], seconds=0.5)
    config = _write_config(tmp_path / "fake.yaml")
    reference = tmp_path / "ref.h5"
    run_extraction(collect_inputs(tmp_path / "in"), reference, config_from_dict(fake_config_dict()), device="cpu")
    out = tmp_path / "two.h5"
    done = subprocess.run([*_extract_cmd(tmp_path / "in", out, config), "--nproc", "2"], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = read_store(out)
    assert len(set(data.ids.tolist())) == len(data.ids) == 10
    _assert_same_rows(_rows(data), _rows(read_store(reference)))
    assert not parts_dir_for(out).exists()


def _part_progress(part: Path) -> int:
    """Rows a rank's part holds so far, committed or journaled (tolerates a file being replaced)."""
    ids: set[str] = set()
    try:
        ids.update(read_store(part, include_pending_warning=False).ids.tolist())
    except Exception:  # noqa: BLE001 - mid-rename or not created yet; the next poll sees it
        pass
    journal = part.with_name(part.name + ".journal")
    for chunk in journal.glob("*.npz") if journal.exists() else ():
        meta = StoreWriter._chunk_meta(chunk)
        ids.update(meta["ids"] if meta else [])
    return len(ids)


def test_killed_rank_then_rerun_gives_every_clip_exactly_once(tmp_path):
    """SIGKILL one rank mid-run, rerun with the same N: every clip once, values as an uninterrupted run."""
    names = [f"s{i:02d}.mp4" for i in range(14)]
    make_media(tmp_path / "in", names, seconds=0.5)
    config = _write_config(tmp_path / "slow.yaml", asr={"delay_s": 0.15}, batch_size=1, commit_every=2)
    out = tmp_path / "f.h5"
    cmd = _extract_cmd(tmp_path / "in", out, config)
    port = free_port()
    base = _env(COMP_DIST_TIMEOUT_S="30")
    ranks = [subprocess.Popen(cmd, env=child_environment(r, 2, port, base), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for r in range(2)]
    victim = part_path(out, 1, 2)
    deadline = time.monotonic() + 60
    while _part_progress(victim) < 2 and ranks[1].poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    ranks[1].send_signal(signal.SIGKILL)
    ranks[1].wait()
    assert ranks[1].returncode == -signal.SIGKILL, ranks[1].stderr.read().decode()
    assert 2 <= _part_progress(victim) < 7  # killed part-way through its share of 7
    try:  # rank 0 finishes its share, then fails at the barrier (its peer is gone)
        ranks[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        ranks[0].kill()
        ranks[0].wait()
    assert ranks[0].returncode != 0
    assert parts_dir_for(out).is_dir()  # the interrupted run's parts wait for the rerun

    rerun = subprocess.run([*cmd, "--nproc", "2"], env=_env(), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    data = read_store(out)
    assert sorted(data.ids.tolist()) == sorted(n[:-4] for n in names)  # every clip, exactly once
    reference = tmp_path / "ref.h5"
    run_extraction(collect_inputs(tmp_path / "in"), reference, config_from_dict(fake_config_dict()), device="cpu")
    _assert_same_rows(_rows(data), _rows(read_store(reference)))
    assert not parts_dir_for(out).exists()


def test_one_process_rerun_folds_the_parts_of_an_interrupted_job(tmp_path):
    """Rows a killed distributed run left in its parts are merged by a plain rerun, not extracted again."""
    from core.records import StoreHeader
    from pipeline.extract import Extraction

    make_media(tmp_path / "in", [f"c{i}.mp4" for i in range(5)], seconds=0.5)
    cfg = config_from_dict(fake_config_dict())
    extraction = Extraction.from_config(cfg, "cpu")
    items = collect_inputs(tmp_path / "in")
    header = StoreHeader("classification", (), extraction.header_modalities, extraction_spec=extraction.spec)
    out = tmp_path / "f.h5"
    part = StoreWriter(part_path(out, 1, 2), header)
    part.add(list(extraction.extract_paths(items[:2])))  # journaled by "rank 1", never merged
    summary = run_extraction(items, out, cfg, device="cpu", extraction=extraction)
    assert (summary.processed, summary.skipped, len(read_store(out))) == (3, 2, 5)
    assert not parts_dir_for(out).exists()


# ---------------------------------------------------------------------------------- DDP building blocks

def test_rank_shares_partition_a_batch_and_keep_every_field(tmp_path):
    """The ranks' shares cover each conversation of a batch once, with its features, flags and labels."""
    from comp.data import build_conversations, iterate_batches, pack
    from comp.parallel import share_rows, take_conversations

    store = make_synthetic_store(tmp_path / "s.h5", n_conversations=7, utterances=(2, 6), seed=2)
    full = next(iterate_batches(pack(build_conversations(read_store(store))), 7, shuffle=False))
    shares = [take_conversations(full, share_rows(7, r, 2)) for r in range(2)]
    assert sum((s.conversation_ids for s in shares), ()) == full.conversation_ids
    for share, rows in zip(shares, (share_rows(7, 0, 2), share_rows(7, 1, 2))):
        length = share.batch.valid.shape[1]
        assert bool(full.batch.valid[rows, length:].sum() == 0)  # only padding was cut
        for name in ("present", "valid", "targets", "labelled"):
            want = getattr(full.batch, name)
            assert want is None or bool((getattr(share.batch, name) == want[rows, :length]).all()), name
        assert all(bool((share.batch.features[m] == f[rows, :length]).all()) for m, f in full.batch.features.items())


def _ddp_worker(store: str, out_dir: str) -> None:
    """Run by each of 2 ranks: DDP gradient vs one process, modulator weights, bank sync, weights in step."""
    import torch

    from comp.batch import ComPOutput
    from comp.config import ModelConfig, Quirks
    from comp.data import Normalizer, build_conversations, iterate_batches, pack
    from comp.model import ComP
    from comp.modulator import GradientModulator
    from comp.parallel import share_rows, start, take_conversations
    from comp.train import _loss
    from core.distributed import env_from_os

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    env = env_from_os()
    # stage-1 reconstruction off: its clean form divides by a sum over the batch, which no per-rank mean
    # reproduces (the one deliberate difference, see docs/distributed.md); the other stage-1 terms are means
    cfg = ModelConfig(hidden=16, depth=2, heads=2, prompt_dim=4, n_prototypes=3, drop_rate=0.0, max_len=24,
                      quirks=Quirks(stage1_reconstruction=False))
    convs = build_conversations(read_store(store))
    convs = Normalizer.fit(convs).apply(convs)
    full = next(iterate_batches(pack(convs), 8, shuffle=False))  # 8 conversations of equal length
    mine = take_conversations(full, share_rows(8, env.rank, 2))
    dims = {m: full.batch.features[m].shape[-1] for m in full.batch.features}
    report: dict = {}
    with start("cpu", env) as parallel:
        # 1. a stage-1 step: DDP's averaged gradient equals one process's gradient on the whole batch
        torch.manual_seed(0)
        single = ComP(cfg, dims, 4, "classification")
        loss, _ = _loss(single(full.batch, 1), full.batch, 1, cfg=_Cfg(cfg), task="classification")
        loss.backward()
        torch.manual_seed(0)
        model = ComP(cfg, dims, 4, "classification")
        step = parallel.training_step(model, lambda o, b, s: _loss(o, b, s, cfg=_Cfg(cfg), task="classification"))
        step.train()
        loss, _, _ = step(mine.batch, 1)
        loss.backward()
        diffs = [float((p.grad - q.grad).abs().max()) for p, q in zip(model.parameters(), single.parameters())
                 if q.grad is not None]
        report["grad_max_diff"] = max(diffs)
        report["unused_grads_none"] = all(p.grad is None for p, q in zip(model.parameters(), single.parameters())
                                          if q.grad is None)
        # 2. modulator weights from a rank's share equal those of the whole batch
        gen = torch.Generator().manual_seed(5)
        heads = {m: torch.randn(*full.batch.valid.shape, 4, generator=gen) for m in ("audio", "text", "visual")}
        rows = torch.as_tensor(share_rows(8, env.rank, 2))
        length = mine.batch.valid.shape[1]
        out_full = ComPOutput(logits=heads["audio"], head_logits=heads, weights=None)
        out_mine = ComPOutput(logits=heads["audio"][rows, :length],
                              head_logits={m: h[rows, :length] for m, h in heads.items()}, weights=None)
        w_full = GradientModulator(model, cfg, "classification").weights(out_full, full.batch)[:, rows, :length]
        w_mine = parallel.modulator(model, cfg, "classification").weights(out_mine, mine.batch)
        report["modulator_max_diff"] = float((w_full - w_mine).abs().max())
        # 3. the prototype bank: averaged over the ranks that filled it
        bank = model.prototypes.bank
        bank.fill_(float(env.rank + 1))
        model.prototypes.bank_filled.copy_(torch.tensor([True, env.rank == 1, env.rank == 0]))
        parallel.sync_buffers(model)
        report["bank"] = [float(bank[i].mean()) for i in range(3)]
        report["bank_filled"] = model.prototypes.bank_filled.tolist()
        # 4. a few stage-2 steps with the synced modulator: the weights stay identical on every rank
        modulator = parallel.modulator(model, cfg, "classification")
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            loss, _, out = step(mine.batch, 2)
            loss.backward()
            modulator.apply(out, mine.batch)
            optimizer.step()
            parallel.sync_buffers(model)
        checksum = torch.cat([t.detach().flatten() for t in model.state_dict().values() if t.is_floating_point()])
        report["checksum"] = checksum.tolist()
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(report), encoding="utf-8")


class _Cfg:
    """The part of TrainConfig the loss reads."""

    def __init__(self, model) -> None:
        self.model = model


@pytest.fixture(scope="module")
def ddp_reports(tmp_path_factory):
    """The 2-rank worker's reports, rank by rank."""
    folder = tmp_path_factory.mktemp("ddp")
    store = make_synthetic_store(folder / "eq.h5", n_conversations=8, utterances=(6, 6), seed=4,
                                 natural_missing={"audio": 0.0, "text": 0.0, "visual": 0.0})
    code = f"import test_distributed as t; t._ddp_worker({str(store)!r}, {str(folder)!r})"
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", code], env=child_environment(r, 2, port, _env()),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def test_ddp_gradient_equals_one_process_on_the_whole_batch(ddp_reports):
    """A stage-1 DDP step on two halves of a batch gives the gradient one process gets on the whole batch."""
    for report in ddp_reports:
        assert report["grad_max_diff"] < 1e-5
        assert report["unused_grads_none"]  # stage-2 modules keep grad None, as in one process


def test_synced_modulator_weights_equal_whole_batch_weights(ddp_reports):
    """Each rank's modulator weights are those of its rows computed over the whole batch."""
    assert all(r["modulator_max_diff"] < 1e-6 for r in ddp_reports)


def test_prototype_bank_is_averaged_over_ranks_that_filled_it(ddp_reports):
    """Bank sync: both filled -> mean 1.5; only one rank filled -> that rank's value; flags OR-ed."""
    for report in ddp_reports:
        assert report["bank"] == [1.5, 2.0, 1.0]
        assert report["bank_filled"] == [True, True, True]


def test_weights_stay_identical_across_ranks_with_the_modulator(ddp_reports):
    """After stage-2 steps with the synced modulator and bank sync, both ranks hold the same weights."""
    np.testing.assert_array_equal(ddp_reports[0]["checksum"], ddp_reports[1]["checksum"])


# --------------------------------------------------------------------------------------------- training

TRAIN_ARGS = ["--set", "model.hidden=32", "--set", "model.depth=2", "--set", "model.prompt_dim=4",
              "--set", "model.n_prototypes=4", "--set", "model.drop_rate=0.1", "--set", "lr=3e-3",
              "--set", "weight_decay=0", "--set", "val_fraction=0.2", "--set", "test_fraction=0.25",
              "--set", "num_threads=1", "--batch-size", "8", "--no-baselines", "--device", "cpu", "-q"]


def _train(store: Path, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "pipeline.cli.train", str(store), "--out", str(out), *TRAIN_ARGS, *extra]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads((out / "metrics.json").read_text())


def test_ddp_training_reaches_single_process_metrics(tmp_path):
    """Two DDP ranks (same seed, same global batch) learn as one process does: test accuracy within 0.1.

    The runs are not bit-identical (each rank's loss is a mean over its share, prototypes pool over a share,
    dropout streams differ), so the tolerance is about 2 binomial standard deviations of accuracy on the
    ~100 test utterances; both must also be far above chance (0.25), so an untrained run cannot pass.
    """
    sig = {"audio": 0.8, "text": 0.8, "visual": 0.8}
    store = make_synthetic_store(tmp_path / "learn.h5", n_conversations=60, utterances=(4, 10), modality_signal=sig,
                                 natural_missing={"audio": 0.1, "text": 0.1, "visual": 0.1}, seed=3)
    schedule = ["--epochs", "12", "--stage-epochs", "6"]
    one = _train(store, tmp_path / "one", *schedule)["runs"][0]
    two = _train(store, tmp_path / "two", *schedule, "--nproc", "2")["runs"][0]
    assert one["test"]["acc"] > 0.7 and two["test"]["acc"] > 0.7
    assert abs(one["test"]["acc"] - two["test"]["acc"]) <= 0.1
    # same initial weights, batches and masks: the first epoch's loss agrees closely
    first_one, first_two = one["history"][0]["train_loss"], two["history"][0]["train_loss"]
    assert abs(first_one - first_two) < 0.05 * first_one


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in ("seconds", "eval_seconds")}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def test_fan_out_gives_the_run_records_of_a_sequential_run(tmp_path):
    """2 folds x 1 seed over 2 processes: the same metrics.json (timings aside), best run and refit as in sequence."""
    import torch

    from comp.checkpoint import load_checkpoint

    store = make_synthetic_store(tmp_path / "folds.h5", n_conversations=24, utterances=(3, 8), folds=2, seed=1)
    schedule = ["--epochs", "3", "--stage-epochs", "1", "--refit"]
    sequential = _train(store, tmp_path / "seq", *schedule)
    fanned = _train(store, tmp_path / "fan", *schedule, "--fan-out", "--nproc", "2")
    assert [(r["fold"], r["seed"]) for r in fanned["runs"]] == [("1", 66), ("2", 66)]
    assert _without_timings(fanned) == _without_timings(sequential)
    assert sorted(p.name for p in (tmp_path / "fan" / "runs").glob("*.pt")) == ["fold1-seed66.pt", "fold2-seed66.pt"]
    assert (tmp_path / "fan" / "best.pt").is_file()
    assert fanned["refit"]["refit_of"] == fanned["best_run"]["run"]
    one, _ = load_checkpoint(tmp_path / "seq" / "refit.pt")
    two, _ = load_checkpoint(tmp_path / "fan" / "refit.pt")
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_strip_option_removes_the_launcher_flag():
    """The relaunched ranks do not see --nproc again, in either spelling."""
    assert strip_option(["a", "--nproc", "2", "--fan-out", "--nproc=3", "b"], "--nproc") == ["a", "--fan-out", "b"]
