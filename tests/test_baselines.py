"""The linear baselines beside ComP: same folds, seeds and test masks; context helps where it should."""

from __future__ import annotations

import json

import numpy as np
import pytest

import comp.masks as masks_mod
from comp.baselines import BASELINES, conversation_rows, run_baselines
from comp.config import ModelConfig, TrainConfig
from comp.data import Conversation
from comp.metrics import CLASSIFICATION_METRICS, REGRESSION_METRICS
from comp.train import train_protocol
from demo.synthetic import make_synthetic_store
from pipeline.cli.train import main as train_main
from pipeline.store import read_store

TINY = ModelConfig(hidden=16, depth=2, heads=2, prompt_dim=4, n_prototypes=3, drop_rate=0.1, max_len=24)
NAMES = [b.name for b in BASELINES]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("bl") / "small.h5"
    return read_store(make_synthetic_store(path, n_conversations=24, utterances=(3, 8), seed=4))


def test_context_baseline_beats_context_free_when_the_conversation_matters(tmp_path):
    """With a per-conversation latent, the conversation mean lifts the linear model's weighted F1."""
    store = make_synthetic_store(tmp_path / "conv.h5", n_conversations=120, utterances=(6, 12),
                                 conversation_offset=2.0, folds=3, seed=1)
    result = run_baselines(data=read_store(store), cfg=TrainConfig(missing="random:0.3"))
    context = result["linear+mask+context"].summary["wf1"]["mean"]
    assert context > result["linear+mask"].summary["wf1"]["mean"] + 0.03
    assert context > result["linear"].summary["wf1"]["mean"] + 0.03


def test_baselines_score_the_loops_masked_test_sets(small, monkeypatch):
    """Every masked val/test set the baselines score is one the training loop scores, mask for mask."""
    calls: dict[str, list[dict]] = {"loop": [], "baselines": []}
    who = {"now": "loop"}
    original = masks_mod.test_mask  # both the loop's packed sets and the baselines' conversations draw here

    def recording(spec, ids, natural, seed):
        mask, absent = original(spec, ids, natural, seed)
        ids = np.asarray(ids).astype(str)
        order = np.argsort(ids)
        calls[who["now"]].append({"key": (spec.label, seed, tuple(ids[order])), "present": mask[order]})
        return mask, absent

    monkeypatch.setattr(masks_mod, "test_mask", recording)
    cfg = TrainConfig(model=TINY, epochs=1, stage_epochs=0, batch_size=8, missing="random:0.5", seeds=2,
                      baselines=False)
    train_protocol(small, cfg)
    who["now"] = "baselines"
    run_baselines(data=small, cfg=cfg)
    loop = {c["key"]: c["present"] for c in calls["loop"]}
    assert calls["baselines"] and len(loop) == 2  # one val and one test set (one plan, masks seeded by cfg.seed)
    for call in calls["baselines"]:
        assert call["key"] in loop
        np.testing.assert_array_equal(call["present"], loop[call["key"]])
    natural = np.concatenate([small.present[m][:, None] for m in ("audio", "text", "visual")], axis=1)
    assert sum(int(c["present"].sum()) for c in calls["baselines"]) < natural.sum()  # masks removed something


def test_runs_follow_the_loops_plans_seeds_and_conditions(small):
    """One record per fold x seed x condition, named as the loop names them, pooled last = the summary."""
    cfg = TrainConfig(missing="fixed:a,at", seeds=2, val_fraction=0.2)
    result = run_baselines(data=small, cfg=cfg)
    assert list(result) == NAMES
    for b in result.values():
        assert [(r.seed, r.condition) for r in b.runs] == \
            [(s, c) for s in (66, 67) for c in ("fixed:a", "fixed:at", "pooled")]
        assert b.summary == b.summary_by_condition["pooled"]
        assert {r.selected_on for r in b.runs} == {"val"}


def test_a_modality_absent_everywhere_leaves_only_the_intercept(small):
    """Under fixed:a the text-only baseline sees zero vectors and predicts one class (UA = 1 / #classes)."""
    result = run_baselines(data=small, cfg=TrainConfig(missing="fixed:a"))
    test = result["text"].runs[0].test
    labels = small.label[np.isin(small.conversation, _test_conversations(small))]
    assert test["ua"] == pytest.approx(1.0 / len(set(labels.tolist())))


def _test_conversations(data):
    from comp.data import plan_folds

    return list(plan_folds(data, TrainConfig())[0].test)


def test_faithful_variant_selects_on_the_paper_plan(small):
    """Under the faithful variant the regularisation is chosen on the plan's val = test set, and says so."""
    cfg = TrainConfig(model=ModelConfig(variant="faithful"))
    result = run_baselines(data=small, cfg=cfg)
    assert {r.selected_on for b in result.values() for r in b.runs} == {"test (paper protocol)"}


def test_regression_store_gets_regression_metrics(tmp_path):
    """A regression store is fitted with ridge and scored with the regression metric names."""
    store = make_synthetic_store(tmp_path / "reg.h5", task="regression", n_conversations=20, utterances=(3, 8),
                                 seed=2)
    result = run_baselines(data=read_store(store), cfg=TrainConfig())
    assert set(result["linear"].summary) == set(REGRESSION_METRICS)
    assert result["linear"].summary["corr"]["mean"] > 0.5


def test_context_is_the_mean_over_present_utterances_after_masking():
    """Each modality's context averages only the conversation's rows where that modality is present."""
    feats = {"audio": np.array([[1.0], [3.0], [100.0]], np.float32),
             "text": np.array([[2.0], [0.0], [4.0]], np.float32),
             "visual": np.zeros((3, 1), np.float32)}
    present = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0]], bool)
    conv = Conversation(id="c", clip_ids=np.array(["x", "y", "z"], object), features=feats, present=present,
                        targets=np.zeros(3, np.int64), labelled=np.ones(3, bool)).with_present(present)
    rows = conversation_rows([conv])
    np.testing.assert_allclose(rows.context["audio"][:, 0], [2.0, 2.0, 2.0])
    np.testing.assert_allclose(rows.context["text"][:, 0], [3.0, 3.0, 3.0])
    np.testing.assert_allclose(rows.context["visual"][:, 0], [0.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    store = make_synthetic_store(root / "s.h5", n_conversations=16, utterances=(3, 6), seed=2)
    out = root / "out"
    code = train_main([str(store), "--out", str(out), "--epochs", "2", "--stage-epochs", "1", "-q",
                       "--set", "model.hidden=16", "--set", "model.depth=2", "--set", "model.prompt_dim=4",
                       "--set", "model.n_prototypes=3", "--batch-size", "8", "--baselines"])
    assert code == 0
    return out


def test_metrics_json_baselines_use_comps_metric_names(cli_run):
    """comp-train --baselines stores every baseline in metrics.json with ComP's metric names."""
    metrics = json.loads((cli_run / "metrics.json").read_text())
    assert list(metrics["baselines"]) == NAMES
    assert set(metrics["summary"]) == set(CLASSIFICATION_METRICS)
    for b in metrics["baselines"].values():
        assert set(b["summary"]) == set(metrics["summary"])
        assert all(set(r["test"]) == set(metrics["summary"]) for r in b["runs"])


def test_report_shows_comp_beside_the_baselines(cli_run):
    """report.html has the side-by-side table with every baseline and a sentence comparing them."""
    page = (cli_run / "report.html").read_text(encoding="utf-8")
    assert "ComP vs baselines" in page
    for name in NAMES:
        assert f"<th>{name}</th>" in page
    assert "Strongest baseline on wf1" in page


@pytest.mark.slow
def test_comp_clean_matches_the_context_baseline_when_trained_long_enough(tmp_path):
    """Where the label depends on the conversation, ComP (clean, 100 epochs) reaches the context baseline."""
    store = make_synthetic_store(tmp_path / "conv.h5", n_conversations=120, utterances=(6, 12),
                                 conversation_offset=2.0, seed=1)
    data = read_store(store)
    model = ModelConfig(hidden=64, depth=2, heads=2, drop_rate=0.3, prompt_dim=8, n_prototypes=4)
    cfg = TrainConfig(model=model, epochs=100, stage_epochs=30, batch_size=8, lr=1e-3, weight_decay=1e-4,
                      device="cpu", baselines=False, save_run_checkpoints=False)
    baselines = run_baselines(data=data, cfg=cfg)
    context = baselines["linear+mask+context"].summary["wf1"]["mean"]
    context_free = baselines["linear+mask"].summary["wf1"]["mean"]
    comp = train_protocol(data, cfg).summary["wf1"]["mean"]
    assert context > context_free + 0.03  # the conversation carries label information here
    assert comp >= context - 0.03, (comp, context)


def test_runs_carry_the_confusion_their_scores_come_from(small):
    """Each classification run keeps its test confusion matrix: it counts every test utterance once, its
    diagonal gives the run's ACC and its per-class recalls average to the run's UA."""
    result = run_baselines(data=small, cfg=TrainConfig(missing="fixed:a,at"))
    n_test = int(np.isin(small.conversation, _test_conversations(small)).sum())
    for b in result.values():
        for r in b.runs:
            cm = np.asarray(r.confusion)
            assert cm.sum() == (2 * n_test if r.condition == "pooled" else n_test)
            assert np.trace(cm) / cm.sum() == pytest.approx(r.test["acc"])
            rows = cm.sum(axis=1) > 0
            assert np.mean(np.diag(cm)[rows] / cm.sum(axis=1)[rows]) == pytest.approx(r.test["ua"])
