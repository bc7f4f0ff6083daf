"""The HTML/PNG report from fabricated run records."""

import re

from comp.metrics import summarize
from comp.results import BaselineResult, EpochRecord, RunRecord
from pipeline.report import write_report

LABELS = ["neu", "hap", "sad"]


def fake_run(fold, seed, shift=0.0, condition="random:0.3"):
    history = []
    for epoch in range(6):
        stage = 1 if epoch < 3 else 2
        history.append(EpochRecord(
            epoch=epoch, stage=stage, train_loss=2.0 - 0.2 * epoch, train_parts={},
            val={"acc": 0.4 + 0.05 * epoch, "ua": 0.35 + 0.05 * epoch, "wf1": 0.38 + 0.05 * epoch + shift},
            val_heads={m: {"acc": 0.3 + 0.03 * epoch + k * 0.05, "ua": 0.3, "wf1": 0.3}
                       for k, m in enumerate(("audio", "text", "visual"))},
            coordinator={"audio": 0.2, "text": 0.5, "visual": 0.3} if stage == 2 else None,
            seconds=1.0, eval_seconds=0.1, val_loss=1.0, selectable=stage == 2))
    return RunRecord(fold=fold, seed=seed, run=f"fold{fold}-seed{seed}", condition=condition, best_epoch=5,
                     selected_stage=2, selected_on="val", selection_metric="wf1", val=history[4].val, val_loss=1.0,
                     history=history, test={"acc": 0.61 + shift, "ua": 0.58, "wf1": 0.60 + shift},
                     test_heads={m: {"acc": 0.5, "ua": 0.45, "wf1": 0.48} for m in ("audio", "text", "visual")},
                     confusion=[[5, 1, 0], [2, 6, 1], [0, 1, 4]], splits={}, label_names=LABELS,
                     task="classification", variant="clean")


def baseline(summary, description="", by_condition=None):
    return BaselineResult(description=description, seconds=0.0, summary=summary,
                          summary_by_condition=by_condition or {})


def test_report_writes_html_with_tables_and_figures(tmp_path):
    """report.html holds the summary and run tables and embeds PNGs that also exist on disk."""
    runs = [fake_run("1", 66), fake_run("2", 66, shift=0.02)]
    summary = summarize([r.test for r in runs])
    path = write_report(tmp_path / "out", runs, summary)
    page = path.read_text(encoding="utf-8")
    assert path.name == "report.html"
    for name in ("learning_curves.png", "modality_heads.png", "coordinator.png", "confusion.png"):
        png = tmp_path / "out" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert name in page
    assert page.count("data:image/png;base64,") == 4
    assert "0.6200 ± 0.0141" in page  # wf1 mean ± sample std of 0.60 and 0.62
    assert re.search(r"<td>1</td><td>66</td><td>random:0.3</td><td>5</td><td>val</td>", page)


def test_report_says_in_words_when_a_baseline_beats_comp(tmp_path):
    """A baseline with a higher wf1 is named in a sentence next to the side-by-side table."""
    runs = [fake_run("split", 66)]
    summary = summarize([r.test for r in runs])
    baselines = {"late-fusion MLP": baseline({"acc": {"mean": 0.70, "std": 0.0, "n": 1},
                                              "wf1": {"mean": 0.69, "std": 0.0, "n": 1}}),
                 "majority": baseline({"acc": {"mean": 0.3, "std": 0.0, "n": 1}})}
    page = write_report(tmp_path, runs, summary, baselines).read_text(encoding="utf-8")
    assert "<th>late-fusion MLP</th>" in page and "<th>majority</th>" in page
    assert "“late-fusion MLP” beats ComP on acc (0.7000 vs 0.6100), wf1 (0.6900 vs 0.6000)" in page
    assert "including the selection metric wf1" in page
    assert "“majority” beats" not in page


def test_report_separates_conditions_and_flags_test_selection(tmp_path):
    """Runs under two conditions get their own figures; paper-protocol selection carries a warning."""
    runs = [fake_run("1", 66, condition="fixed:a"), fake_run("1", 66, condition="fixed:at")]
    for r in runs:
        r.selected_on = "test (paper protocol)"
    page = write_report(tmp_path, runs, summarize([r.test for r in runs])).read_text(encoding="utf-8")
    assert (tmp_path / "learning_curves_fixed_a.png").exists() and (tmp_path / "confusion_fixed_at.png").exists()
    assert "chosen on the test set" in page


def test_report_compares_baselines_per_condition(tmp_path):
    """Each condition gets its own ComP-vs-baseline table, and a win under one condition is named with it."""
    runs = [fake_run("1", 66, condition="fixed:a"), fake_run("1", 66, shift=0.1, condition="fixed:at"),
            fake_run("1", 66, shift=0.05, condition="pooled")]
    by_cond = {"fixed:a": {"wf1": {"mean": 0.65, "std": 0.0, "n": 1}},
               "fixed:at": {"wf1": {"mean": 0.65, "std": 0.0, "n": 1}},
               "pooled": {"wf1": {"mean": 0.64, "std": 0.0, "n": 1}}}
    baselines = {"linear": baseline(by_cond["pooled"], "a linear model", by_cond)}
    page = write_report(tmp_path, runs, summarize([runs[-1].test]), baselines).read_text(encoding="utf-8")
    assert "<h3>Condition pooled (main)</h3>" in page and "<h3>Condition fixed:a</h3>" in page
    assert "Under fixed:a, the baseline “linear” beats ComP on wf1 (0.6500 vs 0.6000)" in page
    assert "Under fixed:at, no baseline beats ComP on any metric." in page
    assert "Strongest baseline on wf1: “linear” with 0.6400; ComP has 0.6500 (ComP is ahead by 0.0100)." in page
    assert "a linear model" in page
