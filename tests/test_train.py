"""The training loop and protocol: stages, selection, determinism, outputs, and that ComP learns."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import comp.train as train_mod
from comp.config import ModelConfig, TrainConfig
from comp.selection import SELECTED_ON_TEST
from comp.train import train_protocol
from demo.synthetic import make_synthetic_store
from pipeline.store import read_store
from pipeline.train import run_training

TINY = ModelConfig(hidden=16, depth=2, heads=2, prompt_dim=4, n_prototypes=3, drop_rate=0.1, max_len=24)


def _cfg(**kw) -> TrainConfig:
    base = dict(model=TINY, epochs=4, stage_epochs=2, batch_size=8, lr=3e-3, baselines=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "s.h5"
    return make_synthetic_store(path, n_conversations=24, utterances=(3, 8), seed=1)


@pytest.fixture(scope="module")
def data(store):
    return read_store(store)


def test_stage_switch_happens_at_stage_epochs(data):
    """History epochs before stage_epochs are stage 1, the rest stage 2, with coordinator weights only in 2."""
    result = train_protocol(data, _cfg(epochs=5, stage_epochs=2))
    history = result.runs[0].history
    assert [h.stage for h in history] == [1, 1, 2, 2, 2]
    assert [h.coordinator is None for h in history] == [True, True, False, False, False]
    assert math.isclose(sum(history[-1].coordinator.values()), 1.0, rel_tol=1e-4)


def test_clean_selection_never_sees_test_before_the_end(data, monkeypatch):
    """Clean protocol: every per-epoch evaluation covers validation conversations only; test comes last, once."""
    from comp.data import plan_folds

    plan = plan_folds(data, _cfg())[0]
    calls: list[set[str]] = []
    real = train_mod.evaluate

    def spy(model, batches, **kw):
        items = list(batches)
        calls.append({c for it in items for c in it.conversation_ids})
        return real(model, iter(items), **kw)

    monkeypatch.setattr(train_mod, "evaluate", spy)
    result = train_protocol(data, _cfg(epochs=4, stage_epochs=2))
    assert len(calls) == 4 + 1
    assert all(c <= set(plan.val) for c in calls[:-1])
    assert calls[-1] == set(plan.test)
    assert result.runs[0].selected_on == "val"


def test_selected_epoch_is_best_on_validation(data):
    """Clean: the best epoch is the stage-2 epoch with the highest validation metric, then the lowest loss, then
    the latest; its validation scores are recorded beside the test scores."""
    result = train_protocol(data, _cfg(epochs=5, stage_epochs=2))
    run = result.runs[0]
    metric = run.selection_metric
    keys = [(h.val[metric], -h.val_loss, h.epoch) for h in run.history if h.stage == 2]
    assert run.best_epoch == max(keys)[2]
    assert [h.selectable for h in run.history] == [False, False, True, True, True]
    assert run.val == run.history[run.best_epoch - 1].val and run.selected_stage == 2


def test_faithful_selects_on_test_and_says_so(data):
    """Faithful: the test numbers are those of the epoch best on the test set, labelled as the paper protocol."""
    cfg = _cfg(model=ModelConfig(**{**TINY.__dict__, "variant": "faithful"}), epochs=4, stage_epochs=2)
    result = train_protocol(data, cfg)
    run = result.runs[0]
    assert run.selected_on == SELECTED_ON_TEST == result.selected_on
    scores = [h.val[run.selection_metric] for h in run.history]
    assert run.best_epoch == int(np.nanargmax(scores)) + 1
    assert run.test == run.history[run.best_epoch - 1].val


def test_fixed_conditions_give_one_record_each_and_a_pool(data):
    """fixed:a,at gives a record per condition plus a pooled one, each with its own summary."""
    result = train_protocol(data, _cfg(epochs=2, stage_epochs=1, missing="fixed:a,at"))
    assert [r.condition for r in result.runs] == ["fixed:a", "fixed:at", "pooled"]
    assert set(result.summary_by_condition) == {"fixed:a", "fixed:at", "pooled"}
    assert result.main_condition == "pooled"


def test_random_missing_never_resurrects_natural_absence(data, monkeypatch):
    """Training batches under random:R keep every naturally absent modality absent."""
    seen = []
    real = train_mod.Missingness.train_batch

    def spy(self, item, rng):
        out = real(self, item, rng)
        seen.append((item.batch.present.numpy().copy(), out.batch.present.numpy().copy()))
        return out

    monkeypatch.setattr(train_mod.Missingness, "train_batch", spy)
    train_protocol(data, _cfg(epochs=1, stage_epochs=0, missing="random:0.5"))
    natural = np.concatenate([n.reshape(-1, 3) for n, _ in seen])
    masked = np.concatenate([m.reshape(-1, 3) for _, m in seen])
    assert not np.any(masked & ~natural)
    assert masked.sum() < natural.sum()


def _numbers(path):
    """metrics.json without wall-clock fields."""
    data = json.loads(path.read_text())
    for run in data["runs"]:
        for h in run["history"]:
            h.pop("seconds"), h.pop("eval_seconds")
    return data


def test_same_seed_gives_identical_metrics(store, tmp_path):
    """Two trainings with the same seed write identical metrics.json numbers."""
    cfg = _cfg(epochs=3, stage_epochs=1, seeds=2)
    run_training(store, cfg, tmp_path / "a")
    run_training(store, cfg, tmp_path / "b")
    a, b = _numbers(tmp_path / "a" / "metrics.json"), _numbers(tmp_path / "b" / "metrics.json")
    assert a == b
    assert a["summary"]["acc"]["n"] == 2


def test_best_checkpoint_reproduces_test_predictions(store, tmp_path):
    """best.pt rebuilds a model whose test score equals the one recorded for the best run."""
    import contextlib

    from comp.checkpoint import build_model_from_checkpoint
    from comp.data import Normalizer, build_conversations, iterate_batches, plan_folds, select
    from comp.train import evaluate

    cfg = _cfg(epochs=3, stage_epochs=1)
    result = run_training(store, cfg, tmp_path / "o")
    model, meta = build_model_from_checkpoint(tmp_path / "o" / "best.pt", "cpu")
    data = read_store(store)
    plan = plan_folds(data, cfg)[0]
    norm = Normalizer.from_dict(meta["normalizer"])
    test = norm.apply(select(build_conversations(data), plan.test))
    res = evaluate(model, iterate_batches(test, 8, shuffle=False), stage=2 if result.runs[0].best_epoch > 1 else 1,
                   task=meta["task"], label_names=meta["label_names"], device="cpu", autocast=contextlib.nullcontext)
    assert res.metrics == pytest.approx(result.runs[0].test)
    assert meta["source"] == data.header.source and meta["input_dims"] == {"audio": 16, "text": 24, "visual": 12}


def test_comp_learns_and_fusion_beats_each_modality(tmp_path):
    """On data where each modality tells a class only from its partner, fused ComP beats chance and every head."""
    sig = {"audio": 0.8, "text": 0.8, "visual": 0.8}
    path = make_synthetic_store(tmp_path / "learn.h5", n_conversations=60, utterances=(4, 10), modality_signal=sig,
                                natural_missing={"audio": 0.1, "text": 0.1, "visual": 0.1}, seed=3)
    cfg = TrainConfig(model=ModelConfig(hidden=32, depth=2, heads=2, prompt_dim=4, n_prototypes=4, drop_rate=0.1),
                      epochs=20, stage_epochs=10, batch_size=8, lr=3e-3, weight_decay=0.0, baselines=False,
                      val_fraction=0.2, test_fraction=0.25, seed=66)
    run = train_protocol(read_store(path), cfg).runs[0]
    fused = run.test["acc"]
    assert fused > 0.25 + 0.4  # chance is 0.25 (4 balanced classes)
    # one modality alone can at best tell a class from its partner: a 0.5 ceiling; stage 1 heads are uni-modal
    stage1_best = max(h.val_heads[m]["acc"] for h in run.history if h.stage == 1 for m in h.val_heads)
    assert fused > stage1_best + 0.2
    # stage-2 heads are not uni-modal (the prompts carry the other modalities), so no margin over them
    for m, head in run.test_heads.items():
        assert fused > head["acc"], m


def _features_seen(data, cfg, monkeypatch) -> np.ndarray:
    """Every present audio row that reached the model during training and evaluation."""
    from comp.model import ComP

    seen = []
    real = ComP.forward

    def spy(self, batch, stage):
        present = (batch.present[..., 0] & batch.valid).numpy()
        seen.append(batch.features["audio"].numpy()[present])
        return real(self, batch, stage)

    monkeypatch.setattr(ComP, "forward", spy)
    train_protocol(data, cfg)
    return np.concatenate(seen)


@pytest.mark.parametrize("variant", ["faithful", "clean"])
def test_raw_features_switch_decides_what_the_model_sees(data, monkeypatch, variant):
    """raw_features (§9.17): faithful feeds the stored vectors unchanged; clean standardises them per dimension
    with statistics of the training conversations (so no stored vector reaches its model unchanged)."""
    cfg = _cfg(model=ModelConfig(**{**TINY.__dict__, "variant": variant}), epochs=2, stage_epochs=1)
    seen = _features_seen(data, cfg, monkeypatch)
    stored = data.features["audio"][data.present["audio"]]
    matches = (np.abs(seen[:, None, :] - stored[None, :, :]).max(-1) == 0).any(1)
    if variant == "faithful":
        assert matches.all()
    else:
        assert not matches.any()
        assert abs(float(seen.mean())) < 0.5 * abs(float(stored.mean())) + 0.2


def test_fp32_switch_turns_mixed_precision_off():
    """fp32 (§9.19): faithful never autocasts, even on CUDA with amp on; clean autocasts in bf16 there."""
    import contextlib

    import torch

    from comp.config import Quirks

    cuda = torch.device("cuda")
    faithful = TrainConfig(model=ModelConfig(variant="faithful"))
    assert train_mod._autocast_factory(cuda, faithful) == (contextlib.nullcontext, None)
    autocast, scaler = train_mod._autocast_factory(cuda, TrainConfig(model=ModelConfig(variant="clean")))
    assert scaler is None and isinstance(autocast(), torch.autocast)
    flipped = TrainConfig(model=ModelConfig(variant="clean", quirks=Quirks(fp32=True)))
    assert train_mod._autocast_factory(cuda, flipped) == (contextlib.nullcontext, None)


def test_gradient_modulator_acts_in_the_training_loop(data):
    """Clean: the loop applies the modulator in stage 2, so its training differs from the same run with the
    modulator switched off; stage 1 (where it never acts) is identical."""
    from comp.config import Quirks

    def history(on: bool):
        model = ModelConfig(**{**TINY.__dict__, "quirks": Quirks(gradient_modulator=on)})
        return train_protocol(data, _cfg(model=model, epochs=3, stage_epochs=1)).runs[0].history

    on, off = history(True), history(False)
    assert on[0].train_loss == off[0].train_loss and on[0].val == off[0].val
    assert on[-1].train_loss != off[-1].train_loss


def test_normalizer_is_fitted_on_training_conversations_only(data):
    """Clean: the standardisation statistics are those of the present training rows; validation and test
    conversations (made very different here) do not leak into them."""
    from comp.data import Normalizer, build_conversations, plan_folds, select

    cfg = _cfg(epochs=2, stage_epochs=1)
    plan = plan_folds(data, cfg)[0]
    shifted = data.features["audio"].copy()
    held_out = np.isin(data.conversation.astype(str), list(plan.val) + list(plan.test))
    shifted[held_out] += 100.0
    import dataclasses
    moved = dataclasses.replace(data, features={**data.features, "audio": shifted})
    outcome = train_protocol(moved, cfg).best
    expected = Normalizer.fit(select(build_conversations(moved), plan.train))
    for m in ("audio", "text", "visual"):
        np.testing.assert_allclose(outcome.normalizer.mean[m], expected.mean[m], rtol=1e-6)
        np.testing.assert_allclose(outcome.normalizer.std[m], expected.std[m], rtol=1e-6)
    assert float(np.abs(outcome.normalizer.mean["audio"]).max()) < 50


def test_faithful_test_batches_are_masked_afresh_every_epoch(data, monkeypatch):
    """Faithful (paper protocol): every test batch gets a random mask at the run's missing rate, redrawn at
    every epoch, as the released code does."""
    from comp.model import ComP

    seen: list[np.ndarray] = []
    real = ComP.forward

    def spy(self, batch, stage):
        if not self.training:
            seen.append((batch.present & batch.valid[..., None]).numpy()[batch.valid.numpy()])
        return real(self, batch, stage)

    monkeypatch.setattr(ComP, "forward", spy)
    cfg = _cfg(model=ModelConfig(**{**TINY.__dict__, "variant": "faithful"}), epochs=3, stage_epochs=1,
               missing="random:0.5")
    train_protocol(data, cfg)
    per_epoch = len(seen) // 3
    masks = [np.concatenate(seen[i * per_epoch:(i + 1) * per_epoch]) for i in range(3)]
    natural = np.stack([data.present[m] for m in ("audio", "text", "visual")], axis=1).mean()
    for m in masks:
        assert m.mean() < natural - 0.25  # about half of what the data has is removed
    assert not np.array_equal(masks[0], masks[1])


def test_progress_counts_every_batch_of_every_epoch(data):
    """Training reports progress through the one hook shape: per epoch a task counted 0..n_batches with the loss."""
    calls: list[tuple] = []
    result = train_protocol(data, _cfg(epochs=3, stage_epochs=1), progress=lambda *a: calls.append(a))
    tasks = list(dict.fromkeys(c[0] for c in calls))
    assert len(tasks) == 3 * result.n_runs
    assert tasks[:3] == [f"fold {result.runs[0].fold} seed {result.runs[0].seed} epoch {e}/3 (stage {s})"
                         for e, s in ((1, 1), (2, 2), (3, 2))]
    for task in tasks:
        counts = [c for c in calls if c[0] == task]
        total = counts[0][2]
        assert total >= 1 and [c[1] for c in counts] == list(range(total + 1))
        assert all(len(c) == 4 and c[3].startswith("loss ") for c in counts[1:])


def test_training_holds_the_features_once(data, monkeypatch):
    """Training, validation and test sets all index the store's own feature arrays (a store in conversation
    order lends them); no standardised or masked copy of the features is made."""
    import comp.data as data_mod

    packed = []
    real_pack = data_mod.pack

    def spy(conversations, normalizer=None):
        packed.append(real_pack(conversations, normalizer))
        return packed[-1]

    def no_copies(self, conversations):
        raise AssertionError("training made standardised copies of the features")

    monkeypatch.setattr(data_mod, "pack", spy)
    monkeypatch.setattr(data_mod.Normalizer, "apply", no_copies)
    monkeypatch.setattr(data_mod.Conversation, "with_present", no_copies)
    train_protocol(data, _cfg(epochs=2, stage_epochs=1, missing="fixed:a,at"))
    assert len({id(p) for p in packed}) >= 3  # train, val, test and their masked sets
    for m in ("audio", "text", "visual"):
        assert all(p.features[m] is data.features[m] for p in packed)
