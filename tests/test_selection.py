"""Which epoch and which run become best.pt (comp.selection, docs/model.md §6.3), refit.pt, and what is said.

The training-loop tests script the validation scores and losses the loop sees (the real evaluation runs, then
its numbers are replaced epoch by epoch), so each rule is checked on exactly the ties it is about, and the
saved weights are compared with a snapshot of the chosen epoch.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import comp.train as train_mod
from comp.config import ModelConfig, TrainConfig
from comp.results import RunRecord
from comp.selection import Candidate, better_epoch, better_run, fused_loss, split_sizes, split_warnings
from comp.train import RunOutcome, TrainingError, train_protocol
from demo.synthetic import make_synthetic_store
from pipeline.store import read_store
from pipeline.train import run_training

TINY = ModelConfig(hidden=16, depth=2, heads=2, prompt_dim=4, n_prototypes=3, drop_rate=0.1, max_len=24)


def _cfg(**kw) -> TrainConfig:
    base = dict(model=TINY, epochs=6, stage_epochs=3, batch_size=8, lr=3e-3, baselines=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("selection") / "s.h5"
    return make_synthetic_store(path, n_conversations=24, utterances=(3, 8), seed=1)


@pytest.fixture(scope="module")
def data(store):
    return read_store(store)


# ------------------------------------------------------------------------------------------- the rules

def test_epoch_ties_go_to_lower_loss_then_later_epoch():
    a = Candidate(1.0, 0.30, 4)
    assert better_epoch("wf1", Candidate(1.0, 0.20, 5), a)  # same score, lower loss
    assert not better_epoch("wf1", Candidate(1.0, 0.40, 5), a)  # same score, higher loss
    assert better_epoch("wf1", Candidate(1.0, 0.30, 5), a)  # full tie: the later epoch
    assert not better_epoch("wf1", Candidate(0.9, 0.01, 5), a)  # the score comes first
    assert better_epoch("mae", Candidate(0.5, 9.0, 5), Candidate(0.7, 0.1, 4))  # lower is better for mae
    assert not better_epoch("wf1", Candidate(math.nan, 0.0, 5), a)  # NaN never beats a score
    assert better_epoch("wf1", Candidate(0.1, math.nan, 5), Candidate(math.nan, 0.1, 4))


def test_run_ties_go_to_lower_loss_then_earlier_run():
    a = Candidate(1.0, 0.30, 1)
    assert better_run("wf1", Candidate(1.0, 0.20, 2), a)
    assert not better_run("wf1", Candidate(1.0, 0.30, 2), a)  # full tie: the earlier run stays
    assert better_run("wf1", Candidate(1.0, 0.30, 0), a)  # (order is plan order, whoever trained it)


def test_fused_loss_is_cross_entropy_and_mse_over_labelled_rows():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    y = np.array([0, 1, -1])
    want = torch.nn.functional.cross_entropy(torch.tensor(logits[:2]), torch.tensor(y[:2])).item()
    assert fused_loss("classification", y, logits) == pytest.approx(want, rel=1e-12)
    assert fused_loss("regression", np.array([1.0, np.nan, -1.0]), np.array([[0.5], [9.0], [0.0]])) == \
        pytest.approx((0.25 + 1.0) / 2)
    assert math.isnan(fused_loss("classification", np.array([-1]), np.zeros((1, 3))))


def test_split_warnings_name_small_splits_and_missing_classes(data):
    from comp.data import build_conversations

    convs = build_conversations(data)
    names = list(data.header.label_names)
    big = split_sizes(convs, "classification", names)
    assert big["clips"] == len(data.ids) and sum(n["clips"] for n in big["per_class"].values()) == big["labelled"]
    assert split_warnings({"train": big, "val": big, "test": big}) == []
    one = split_sizes(convs[:1], "classification", names)
    msgs = split_warnings({"train": big, "val": one, "test": big})
    assert len(msgs) == 1 and "validation split" in msgs[0] and "--set val_fraction" in msgs[0]
    absent = [c for c, n in one["per_class"].items() if n["clips"] == 0]
    assert absent and all(c in msgs[0] for c in absent)
    assert "cannot learn" in split_warnings({"train": one, "val": big, "test": big})[0]


# ------------------------------------------------------------------------------ the loop, scripted

def _script(monkeypatch, scores, losses):
    """Replace the validation metric and loss of the first len(scores) evaluations; snapshot the weights."""
    real = train_mod.evaluate
    seen = {"n": 0, "states": []}

    def scripted(model, batches, **kw):
        res = real(model, batches, **kw)
        i = seen["n"]
        seen["n"] += 1
        if i < len(scores):
            res.metrics = {**res.metrics, "wf1": scores[i], "acc": scores[i]}
            res.loss = losses[i]
            seen["states"].append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return res

    monkeypatch.setattr(train_mod, "evaluate", scripted)
    return seen


def _fit(data, cfg):
    from comp.data import build_conversations, plan_folds

    plan = plan_folds(data, cfg)[0]
    return train_mod.fit_run(build_conversations(data), plan, cfg, cfg.seed, task="classification",
                             label_names=list(data.header.label_names), device=torch.device("cpu"))


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_validation_ties_across_epochs_go_to_lower_loss_then_later(data, monkeypatch):
    seen = _script(monkeypatch, [0.2, 0.2, 0.2, 0.8, 1.0, 1.0], [1, 1, 1, 0.2, 0.3, 0.6])
    out = _fit(data, _cfg())
    assert out.main_record.best_epoch == 5  # wf1 1.0 at epochs 5 and 6: epoch 5 has the lower loss
    assert _same(out.state_dict, seen["states"][4])

    seen = _script(monkeypatch, [0.2, 0.2, 0.2, 1.0, 1.0, 1.0], [1, 1, 1, 0.4, 0.3, 0.3])
    out = _fit(data, _cfg())
    assert out.main_record.best_epoch == 6  # epochs 5 and 6 tie on wf1 and loss: the later one
    assert out.selection_loss == pytest.approx(0.3) and out.stage == 2
    assert _same(out.state_dict, seen["states"][5])


def test_ties_across_the_stage_switch_never_pick_a_stage1_epoch(data, monkeypatch):
    # stage 1 (epochs 1-3) ties stage 2 on wf1 with a far lower loss: still a stage-2 epoch
    seen = _script(monkeypatch, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [0.01, 0.01, 0.01, 0.9, 0.5, 0.7])
    out = _fit(data, _cfg())
    assert out.main_record.best_epoch == 5 and out.main_record.selected_stage == 2
    assert _same(out.state_dict, seen["states"][4])
    # stage 1 even scores better: still never chosen, and the test set is scored at stage 2
    _script(monkeypatch, [1.0, 1.0, 1.0, 0.4, 0.6, 0.5], [0.1, 0.1, 0.1, 0.5, 0.5, 0.5])
    out = _fit(data, _cfg())
    assert out.main_record.best_epoch == 5 and out.stage == 2
    assert [h.selectable for h in out.main_record.history] == [False] * 3 + [True] * 3


def test_faithful_keeps_the_released_rule(data, monkeypatch):
    """Paper protocol: the first epoch with a strictly better test score, whatever the stage."""
    _script(monkeypatch, [0.5, 1.0, 1.0, 1.0, 0.7, 1.0], [1, 1, 0.1, 0.1, 0.1, 0.1])
    faithful = ModelConfig(**{**TINY.__dict__, "variant": "faithful"})
    out = _fit(data, _cfg(model=faithful))
    assert out.main_record.best_epoch == 2 and out.stage == 1


def test_clean_needs_a_stage2_epoch(data):
    with pytest.raises(TrainingError, match="stage_epochs"):
        train_protocol(data, _cfg(epochs=3, stage_epochs=3))


# ------------------------------------------------------------------------------------ runs -> best.pt

def _fake_runs(monkeypatch, table):
    """fit_run replaced: run (fold, seed) gets the validation (score, loss) of `table`."""
    def fake(conversations, plan, cfg, seed, **kw):
        score, loss = table[(plan.name, seed)]
        rec = RunRecord(fold=plan.name, seed=seed, run=f"fold{plan.name}-seed{seed}", condition="natural",
                        best_epoch=4, selected_stage=2, selected_on="val", selection_metric="wf1",
                        val={"wf1": score}, val_loss=loss, history=[], test={"wf1": 0.5}, test_heads={},
                        confusion=None, splits={}, label_names=[], task="classification", variant="clean")
        return RunOutcome(fold=plan.name, seed=seed, records=[rec], selection_metric="wf1", selection_score=score,
                          state_dict={"w": torch.tensor([float(seed)])}, normalizer=None, input_dims={},
                          n_outputs=4, selection_loss=loss)

    monkeypatch.setattr(train_mod, "fit_run", fake)


def test_best_run_is_the_best_on_validation_not_the_first(data, monkeypatch):
    _fake_runs(monkeypatch, {("split", 66): (0.9, 0.1), ("split", 67): (1.0, 0.5), ("split", 68): (1.0, 0.2)})
    result = train_protocol(data, _cfg(seeds=3))
    assert (result.best.seed, result.best.name) == (68, "foldsplit-seed68")  # ties on wf1: lower loss
    _fake_runs(monkeypatch, {("split", 66): (0.9, 0.1), ("split", 67): (1.0, 0.2), ("split", 68): (1.0, 0.2)})
    assert train_protocol(data, _cfg(seeds=3)).best.seed == 67  # a full tie: the earlier run


def test_best_run_across_folds_compares_validation_scores(tmp_path, monkeypatch):
    folded = read_store(make_synthetic_store(tmp_path / "f.h5", n_conversations=12, utterances=(2, 4), folds=3))
    table = {(f, s): (0.5, 0.5) for f in "123" for s in (66, 67)}
    table[("2", 67)] = (0.8, 0.9)
    table[("3", 66)] = (0.8, 0.4)
    _fake_runs(monkeypatch, table)
    result = train_protocol(folded, _cfg(seeds=2))
    assert result.best.name == "fold3-seed66"


# ----------------------------------------------------------------------- outputs: say it, refit.pt

def test_outputs_name_the_saved_run_its_scores_and_the_splits(store, tmp_path):
    from comp.checkpoint import load_checkpoint

    out = tmp_path / "o"
    result = run_training(store, _cfg(seeds=2, epochs=4, stage_epochs=2), out)
    metrics = json.loads((out / "metrics.json").read_text())
    best = metrics["best_run"]
    run = next(r for r in metrics["runs"] if r["run"] == best["run"])
    assert best["best_epoch"] == run["best_epoch"] > 2 and best["stage"] == 2
    assert best["val"] == run["val"] and best["test"] == run["test"] and best["held_out_score"]
    state, meta = load_checkpoint(out / "best.pt")
    twin, _ = load_checkpoint(out / "runs" / f"{best['run']}.pt")
    assert _same(state, twin) and meta["metrics"]["run"] == best["run"] and meta["stage"] == 2
    sizes = metrics["splits"]["split"]
    assert set(sizes) == {"train", "val", "test"} and sum(s["conversations"] for s in sizes.values()) == 24
    text = result.summary_text()
    assert f"best.pt    run {best['run']}, epoch {best['best_epoch']} of 4 (stage 2)" in text
    assert "val wf1" in text and "test acc" in text and "val   " in text and "(per class: clips/conversations)" in text
    html = (out / "report.html").read_text()
    assert best["run"] in html and "Saved model" in html and "clips / conv." in html


def test_small_validation_split_warns_in_one_sentence(tmp_path, caplog):
    small = make_synthetic_store(tmp_path / "small.h5", n_conversations=8, utterances=(1, 1), seed=2)
    result = run_training(small, _cfg(epochs=3, stage_epochs=1), tmp_path / "o")
    val = [w for w in result.warnings if "validation split" in w]
    assert len(val) == 1 and val[0].count(". ") == 0 and val[0].endswith(".")
    assert f"warning: {val[0]}" in result.summary_text()
    assert any(val[0] in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_refit_retrains_on_train_and_val_for_the_selected_epochs(store, tmp_path, monkeypatch):
    from comp.checkpoint import load_checkpoint
    from comp.data import plan_folds

    fits = []
    real = train_mod.fit_run

    def spy(conversations, plan, cfg, seed, **kw):
        fits.append((plan, cfg.epochs, seed))
        return real(conversations, plan, cfg, seed, **kw)

    monkeypatch.setattr(train_mod, "fit_run", spy)
    cfg = _cfg(seeds=2, epochs=4, stage_epochs=2, refit=True)
    result = run_training(store, cfg, tmp_path / "o")
    assert len(fits) == 3
    plan = plan_folds(read_store(store), cfg)[0]
    refit_plan, epochs, seed = fits[-1]
    assert set(refit_plan.train) == set(plan.train) | set(plan.val) and not refit_plan.val and not refit_plan.test
    assert epochs == result.best.main_record.best_epoch and seed == result.best.seed
    _, meta = load_checkpoint(tmp_path / "o" / "refit.pt")
    m = meta["metrics"]
    assert m["refit_of"] == result.best.name and m["held_out_score"] is False and not m["val"] and not m["test"]
    assert "no held-out score" in m["selected_on"] and meta["train_config"]["epochs"] == epochs
    assert "refit.pt" in result.summary_text() and "no held-out score" in result.summary_text()
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["refit"]["refit_of"] == result.best.name


def test_refit_is_refused_without_validation_selection(data):
    faithful = ModelConfig(**{**TINY.__dict__, "variant": "faithful"})
    with pytest.raises(TrainingError, match="refit"):
        train_protocol(data, _cfg(model=faithful, refit=True))
    with pytest.raises(TrainingError, match="refit"):
        train_protocol(data, _cfg(val_fraction=0.0, refit=True))


def test_predictor_predicts_at_the_checkpoints_stage():
    """A checkpoint selected at stage 1 (faithful can) predicts at stage 1, as its run evaluated it."""
    from comp.batch import ComPBatch
    from comp.model import ComP
    from pipeline.predict import Predictor

    torch.manual_seed(0)
    model = ComP(TINY, {"audio": 4, "text": 5, "visual": 3}, 3, "classification").eval()
    batch = ComPBatch(features={"audio": torch.randn(1, 1, 4), "text": torch.randn(1, 1, 5),
                                "visual": torch.randn(1, 1, 3)},
                      present=torch.ones(1, 1, 3, dtype=torch.bool), valid=torch.ones(1, 1, dtype=torch.bool))
    meta = {"task": "classification", "label_names": ["a", "b", "c"], "input_dims": {"audio": 4, "text": 5,
            "visual": 3}, "spec_hash": "x"}
    for stage in (1, 2):
        p = Predictor(model, {**meta, "stage": stage}, None, None, None, torch.device("cpu"))
        with torch.no_grad():
            want = model(batch, stage).logits[0, 0]
        assert torch.equal(p.logits(batch), want)
    with torch.no_grad():
        assert not torch.allclose(model(batch, 1).logits, model(batch, 2).logits)
