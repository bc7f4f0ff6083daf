"""The training report: PNG figures and one self-contained `report.html` (figures embedded as data URIs).

What it shows, from the run records the training loop writes (format in `write_report`):
learning curves (train loss, validation primary metric, stage switch marked), the accuracy of each modality's
own head over epochs (the modality balance ComP is about), the coordinator's modality weights over epochs, the
test confusion matrix (classification), the mean ± std summary over seeds and folds, one row per run, and
ComP against the baselines, with a sentence in words wherever a baseline beats it.
"""

from __future__ import annotations

import base64
import functools
import html
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from comp.metrics import higher_is_better, metric_names, primary_metric, summarize  # noqa: E402
from comp.results import BaselineResult, EpochRecord, RunRecord, Summary  # noqa: E402
from comp.selection import SELECTED_ON_TEST, SELECTED_ON_VAL  # noqa: E402
from core.atomic import write_text  # noqa: E402
from core.clip import MODALITIES  # noqa: E402

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
COLOURS = {"audio": "#1f77b4", "text": "#d62728", "visual": "#2ca02c", "fused": "#444444"}
DPI = 110


# ----------------------------------------------------------------------------------------------- helpers

def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    try:
        v = float(x)
    except (TypeError, ValueError):
        return html.escape(str(x))
    return "NaN" if math.isnan(v) else f"{v:.{digits}f}"


def _mean_std(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return "–"
    return f"{_fmt(entry.get('mean'))} ± {_fmt(entry.get('std'))}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "run"


def _stage_switch(history: Sequence[EpochRecord]) -> int | None:
    """The first epoch of stage 2, if the run reached it."""
    return next((h.epoch for h in history if h.stage == 2), None)


def _series(runs: Sequence[RunRecord], get: Callable[[EpochRecord], float | None]) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, nan-mean over runs of get(epoch record)) aligned by epoch number."""
    table: dict[int, list[float]] = {}
    for run in runs:
        for h in run.history:
            v = get(h)
            if v is not None:
                table.setdefault(h.epoch, []).append(float(v))
    if not table:
        return np.zeros(0), np.zeros(0)
    epochs = np.array(sorted(table))
    with np.errstate(all="ignore"):
        means = np.array([np.nanmean(table[e]) if np.any(np.isfinite(table[e])) else np.nan for e in epochs])
    return epochs, means


def _mark_switch(ax, runs: Sequence[RunRecord]) -> None:
    switches = sorted({s for s in (_stage_switch(r.history) for r in runs) if s is not None})
    for i, s in enumerate(switches):
        ax.axvline(s - 0.5, color="grey", linestyle="--", linewidth=1, label="stage 2 starts" if i == 0 else None)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _run_label(run: RunRecord) -> str:
    return f"fold {run.fold} / seed {run.seed}"


# ----------------------------------------------------------------------------------------------- figures

def plot_learning_curves(runs: Sequence[RunRecord], metric: str, path: Path) -> Path:
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    legend = len(runs) <= 10
    for run in runs:
        ep = [h.epoch for h in run.history]
        line, = ax_loss.plot(ep, [h.train_loss for h in run.history], linewidth=1,
                             label=_run_label(run) if legend else None)
        vals = [h.val.get(metric, np.nan) for h in run.history]
        ax_val.plot(ep, vals, linewidth=1, color=line.get_color())
        best = run.best_epoch
        if best is not None:
            at = [v for e, v in zip(ep, vals) if e == best]
            if at:
                ax_val.plot([best], at, "o", color=line.get_color(), markersize=5)
    for ax in (ax_loss, ax_val):
        _mark_switch(ax, runs)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_loss.set_ylabel("train loss")
    ax_loss.set_title("training loss")
    where = SELECTED_ON_TEST if _paper_protocol(runs) else SELECTED_ON_VAL
    ax_val.set_ylabel(f"{where} {metric}")
    ax_val.set_title(f"{where} {metric} (dot = selected epoch)")
    if legend:
        ax_loss.legend(fontsize=7)
    return _save(fig, path)


def plot_modality_heads(runs: Sequence[RunRecord], metric: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in MODALITIES:
        ep, mean = _series(runs, functools.partial(_head_score, modality=m, metric=metric))
        if len(ep):
            ax.plot(ep, mean, label=f"{m} head", color=COLOURS[m])
    ep, mean = _series(runs, functools.partial(_fused_score, metric=metric))
    if len(ep):
        ax.plot(ep, mean, label="fused (ComP)", color=COLOURS["fused"], linestyle=":")
    _mark_switch(ax, runs)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"val {metric} (mean over runs)")
    ax.set_title("per-modality head accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _head_score(h: EpochRecord, *, modality: str, metric: str) -> float | None:
    return h.val_heads.get(modality, {}).get(metric)


def _fused_score(h: EpochRecord, *, metric: str) -> float | None:
    return h.val.get(metric)


def _coordinator_weight(h: EpochRecord, *, modality: str) -> float | None:
    return h.coordinator.get(modality) if h.coordinator else None


def plot_coordinator(runs: Sequence[RunRecord], path: Path) -> Path | None:
    if not any(h.coordinator for r in runs for h in r.history):
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for m in MODALITIES:
        ep, mean = _series(runs, functools.partial(_coordinator_weight, modality=m))
        if len(ep):
            ax.plot(ep, mean, label=m, color=COLOURS[m])
    _mark_switch(ax, runs)
    ax.set_xlabel("epoch")
    ax.set_ylabel("coordinator weight (mean over runs)")
    ax.set_title("coordinator modality weights")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_confusion(runs: Sequence[RunRecord], label_names: Sequence[str], path: Path) -> Path | None:
    mats = [np.asarray(r.confusion, dtype=np.int64) for r in runs if r.confusion]
    if not mats:
        return None
    total = np.sum(mats, axis=0)
    with np.errstate(all="ignore"):
        share = total / np.maximum(total.sum(axis=1, keepdims=True), 1)
    n = len(total)
    names = list(label_names) if len(label_names) == n else [str(i) for i in range(n)]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * n, 0.8 + 0.7 * n))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{total[i, j]}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test confusion (sum over {len(mats)} run(s))")
    return _save(fig, path)


# -------------------------------------------------------------------------------------------------- html

def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{html.escape(alt)} ({html.escape(path.name)})</figcaption></figure>')


def _summary_table(summary: Mapping[str, Mapping[str, Any]], primary: str) -> str:
    rows = []
    for k, v in summary.items():
        name = f"<b>{html.escape(k)}</b> (selection)" if k == primary else html.escape(k)
        rows.append([name, _mean_std(v), str(v.get("n", ""))])
    return _table(["metric", "mean ± std", "n"], rows, "summary")


def _runs_table(runs: Sequence[RunRecord], metrics: Sequence[str]) -> str:
    rows = []
    for r in runs:
        rows.append([html.escape(str(r.fold)), html.escape(str(r.seed)), html.escape(r.condition),
                     html.escape(str(r.best_epoch)), html.escape(r.selected_on)]
                    + [_fmt(r.test.get(m)) for m in metrics])
    return _table(["fold", "seed", "condition", "best epoch", "selected on"] + list(metrics), rows, "runs")


def _heads_table(runs: Sequence[RunRecord], metrics: Sequence[str]) -> str:
    rows = []
    for m in MODALITIES:
        s = summarize([r.test_heads.get(m) or {} for r in runs])
        if any(s.get(k, {}).get("n") for k in metrics):
            rows.append([html.escape(m)] + [_mean_std(s.get(k)) for k in metrics])
    if not rows:
        return "<p>No per-modality test scores were recorded.</p>"
    return _table(["head"] + list(metrics), rows, "heads")


def compare_baselines(summary: Summary, baselines: Mapping[str, Summary], primary: str,
                      condition: str | None = None) -> tuple[str, list[str]]:
    """(HTML table ComP vs baselines, sentences naming each metric where a baseline beats ComP).

    `summary` is ComP's and each baseline's summary ({name: summary}) is compared with it; `condition` (a
    missingness condition such as random:0.3) is named in the sentences when given."""
    metrics = [k for k in summary] + [k for b in baselines.values() for k in b if k not in summary]
    metrics = list(dict.fromkeys(metrics))
    rows = [[html.escape(k)] + [_mean_std(summary.get(k))] +
            [_mean_std(b.get(k)) for b in baselines.values()] for k in metrics]
    table = _table(["metric", "ComP"] + list(baselines), rows, "baselines")
    scope = ("Pooled over the conditions" if condition == "pooled" else f"Under {condition}") if condition else ""
    where = f"{scope}, the" if scope else "The"
    sentences = []
    for name, theirs in baselines.items():
        wins = []
        for k in metrics:
            ours, other = (summary.get(k) or {}).get("mean"), (theirs.get(k) or {}).get("mean")
            if ours is None or other is None or not (math.isfinite(ours) and math.isfinite(other)):
                continue
            if (other > ours) if higher_is_better(k) else (other < ours):
                wins.append(f"{k} ({_fmt(other)} vs {_fmt(ours)})")
        if wins:
            lead = "including the selection metric " + primary if any(w.startswith(primary + " ") for w in wins) \
                else "but not on the selection metric " + primary
            sentences.append(f"{where} baseline “{name}” beats ComP on {', '.join(wins)} — {lead}.")
    if not sentences and baselines:
        sentences.append(f"{scope}, no baseline beats ComP on any metric." if scope
                         else "No baseline beats ComP on any metric.")
    best = _best_baseline(summary, baselines, primary)
    if best:
        sentences.append(best)
    return table, sentences


def _best_baseline(summary: Summary, baselines: Mapping[str, Summary], primary: str) -> str | None:
    """One sentence: the strongest baseline on the selection metric and ComP's margin over it."""
    scored = [(name, (b.get(primary) or {}).get("mean")) for name, b in baselines.items()]
    scored = [(n, v) for n, v in scored if v is not None and math.isfinite(v)]
    ours = (summary.get(primary) or {}).get("mean")
    if not scored or ours is None or not math.isfinite(ours):
        return None
    sign = 1.0 if higher_is_better(primary) else -1.0
    name, value = max(scored, key=lambda nv: sign * nv[1])
    margin = sign * (ours - value)
    verdict = "ComP is ahead by" if margin > 0 else "ComP trails it by" if margin < 0 else "a tie,"
    return (f"Strongest baseline on {primary}: “{name}” with {_fmt(value)}; ComP has {_fmt(ours)} "
            f"({verdict} {_fmt(abs(margin))}).")


def _baseline_summaries(baselines: Mapping[str, BaselineResult], condition: str,
                        main_condition: str) -> dict[str, Summary]:
    """Each baseline's summary under `condition`: its summary_by_condition, else its runs of that condition,
    else (main condition only) its overall summary."""
    out = {}
    for name, b in baselines.items():
        if condition in b.summary_by_condition:
            out[name] = b.summary_by_condition[condition]
        elif any(r.condition == condition for r in b.runs):
            out[name] = summarize([r.test for r in b.runs if r.condition == condition])
        elif condition == main_condition:
            out[name] = b.summary
    return out


def _baselines_section(runs: Sequence[RunRecord], summary: Summary, baselines: Mapping[str, BaselineResult],
                       primary: str) -> str:
    """ComP and every baseline side by side, one table per missingness condition (the main one first)."""
    conditions = list(dict.fromkeys(r.condition for r in runs))
    main = conditions[-1] if conditions else ""
    parts = ["<h2>ComP vs baselines</h2><p>Test scores, mean ± std over the same folds, seeds and test masks. "
             "Baselines are linear models (scikit-learn) with the regularisation chosen on the same "
             "validation data as ComP:</p><ul>"]
    for name, b in baselines.items():
        desc = b.description
        parts.append(f"<li><b>{html.escape(name)}</b>{': ' + html.escape(str(desc)) if desc else ''}</li>")
    parts.append("</ul>")
    for cond in [main] + [c for c in conditions if c != main]:
        ours = summary if cond == main else summarize([r.test for r in runs if r.condition == cond])
        theirs = _baseline_summaries(baselines, cond, main)
        if not theirs:
            continue
        named = cond if len(conditions) > 1 or cond not in ("", "natural") else None
        table, sentences = compare_baselines(ours, theirs, primary, named)
        title = f"Condition {html.escape(cond)}" + (" (main)" if cond == main and len(conditions) > 1 else "")
        parts.append(f"<h3>{title}</h3>" + table + "".join(f"<p>{html.escape(t)}</p>" for t in sentences))
    return "".join(parts)


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}td:first-child{text-align:left}figure{display:inline-block;margin:0.5em}
img{max-width:100%}.note{background:#fff4d6;border-left:4px solid #e0a800;padding:0.5em 1em}"""


def _saved_section(saved: Mapping[str, Any]) -> str:
    """Which run and epoch best.pt holds, its validation and test scores, the split sizes, refit.pt, warnings."""
    parts = ["<h2>Saved model</h2>"]
    best = saved.get("best")
    if best:
        metric = best.get("selection_metric", "")
        n_runs = int(saved.get("n_runs") or 1)
        how = (f", the best of {n_runs} runs on {html.escape(str(best.get('selected_on')))} "
               f"{html.escape(str(metric))} (ties: lower validation loss, then the earlier run)"
               if n_runs > 1 else "")
        parts.append(f"<p><code>best.pt</code> holds run <b>{html.escape(str(best.get('run')))}</b> at epoch "
                     f"<b>{html.escape(str(best.get('best_epoch')))}</b> (stage {html.escape(str(best.get('stage')))})"
                     f"{how}.</p>")
        val, test = best.get("val") or {}, best.get("test") or {}
        names = list(dict.fromkeys([*val, *test]))
        rows = []
        if val:
            rows.append(["validation"] + [_fmt(val.get(k)) for k in names] + [_fmt(best.get("val_loss"))])
        if test:
            rows.append(["test"] + [_fmt(test.get(k)) for k in names] + ["–"])
        if rows:
            parts.append(_table(["split"] + names + ["loss"], rows, "saved"))
    splits = saved.get("splits") or {}
    fold = str(best.get("fold")) if best else next(iter(splits), None)
    sizes = splits.get(fold) or {}
    if sizes:
        classes = list(dict.fromkeys(c for info in sizes.values() for c in (info.get("per_class") or {})))
        rows = [[html.escape(name), str(info.get("clips")), str(info.get("conversations"))]
                + [f"{info['per_class'][c]['clips']} / {info['per_class'][c]['conversations']}"
                   if c in (info.get("per_class") or {}) else "–" for c in classes]
                for name, info in sizes.items()]
        title = f"Splits of fold {html.escape(fold)}" if len(splits) > 1 else "Splits"
        parts.append(f"<h3>{title}</h3>" + _table(["split", "clips", "conversations"]
                                                  + [f"{c} (clips / conv.)" for c in classes], rows, "splits"))
    refit = saved.get("refit")
    if refit:
        parts.append(f"<p><code>refit.pt</code>: run {html.escape(str(refit.get('refit_of')))} retrained on "
                     f"train+val for {html.escape(str(refit.get('best_epoch')))} epochs. Nothing was held out for "
                     "it: it has no validation or test score of its own.</p>")
    parts += [f'<p class="note">{html.escape(w)}</p>' for w in saved.get("warnings") or []]
    return "".join(parts)


def _paper_protocol(runs: Sequence[RunRecord]) -> bool:
    """Whether the runs selected on the test set (faithful's released protocol)."""
    return any(r.selected_on == SELECTED_ON_TEST for r in runs)


def write_report(out_dir: Path, runs: Sequence[RunRecord], summary: Summary,
                 baselines: Mapping[str, BaselineResult] | None = None, *,
                 saved: Mapping[str, Any] | None = None) -> Path:
    """Write the figures and `report.html` into `out_dir`; returns the HTML path.

    `runs` are every run's records (comp.results.RunRecord), `summary` ComP's test summary on the main
    condition, `baselines` the baselines' results on the same runs (comp.baselines), shown side by side
    with ComP per condition. saved = {"best": comp.train.run_summary of the
    run in best.pt, "n_runs", "splits": {fold: {split: comp.selection.split_sizes}}, "warnings": [str],
    "refit": the refit.pt summary or None} names the saved model.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not runs:
        raise ValueError("write_report needs at least one run record")
    task = runs[0].task
    paper = _paper_protocol(runs)
    primary = primary_metric(task, "faithful" if paper else "clean")
    head_metric = "acc" if task == "classification" else "acc2_non0"
    label_names = runs[0].label_names
    metrics = [m for m in metric_names(task) if any(m in r.test for r in runs)] or \
        list(metric_names(task))

    parts = [f"<h1>ComP training report</h1><p>Task: {html.escape(task)}; {len(runs)} run(s); "
             f"epochs selected on <b>{'the test set (paper protocol)' if paper else 'validation data'}</b> by "
             f"<b>{html.escape(primary)}</b>.</p>"]
    if paper:
        parts.append('<p class="note">The epoch of each run was chosen on the test set, with test masks redrawn '
                     "every epoch, as the released code does. These numbers are optimistic; use the clean "
                     "protocol for an honest estimate.</p>")
    parts.append("<h2>Summary (test, mean ± std over seeds and folds)</h2>" + _summary_table(summary, primary))
    if saved:
        parts.append(_saved_section(saved))
    if baselines:
        parts.append(_baselines_section(runs, summary, baselines, primary))

    conditions = list(dict.fromkeys(r.condition for r in runs))
    for cond in conditions:
        group = [r for r in runs if r.condition == cond]
        suffix = "" if len(conditions) == 1 else "_" + _slug(cond)
        parts.append(f"<h2>Condition: {html.escape(cond)}</h2>")
        if len(conditions) > 1:
            parts.append(_summary_table(summarize([r.test for r in group]), primary))
        figures = [(plot_learning_curves(group, primary, out_dir / f"learning_curves{suffix}.png"),
                    "learning curves"),
                   (plot_modality_heads(group, head_metric, out_dir / f"modality_heads{suffix}.png"),
                    f"per-modality head {head_metric} on validation data")]
        coord = plot_coordinator(group, out_dir / f"coordinator{suffix}.png")
        if coord is not None:
            figures.append((coord, "coordinator weights"))
        if task == "classification":
            conf = plot_confusion(group, label_names, out_dir / f"confusion{suffix}.png")
            if conf is not None:
                figures.append((conf, "test confusion matrix"))
        parts.append("".join(_img(p, alt) for p, alt in figures))
        if coord is None:
            parts.append("<p>No coordinator weights were recorded (the runs did not reach stage 2).</p>")
        parts.append("<h3>Per-modality heads on test</h3>" + _heads_table(group, metrics))
        parts.append("<h3>Runs</h3>" + _runs_table(group, metrics))

    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>ComP report</title><style>{CSS}</style>'
            f"</head><body>{''.join(parts)}</body></html>")
    path = out_dir / REPORT_NAME
    write_text(path, page)
    log.info("report written to %s", path)
    return path
