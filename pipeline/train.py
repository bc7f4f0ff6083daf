"""A comp-train run: read the feature store, train and evaluate (comp.train), write the run folder.

The run folder (`out_dir`): `config.yaml` (the resolved TrainConfig), `runs/<fold>-<seed>.pt` (every run's
selected weights), `best.pt` (the saved run), `refit.pt` (with `refit`), `metrics.json` (every run's records,
the summaries, the baselines) and `report.html` with its figures. The model and its training get the store's
contents in memory; only this module reads and writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from comp.baselines import run_baselines
from comp.checkpoint import save_checkpoint
from comp.config import TrainConfig
from comp.train import (
    ProtocolResult,
    RunOutcome,
    checkpoint_meta,
    refit_run,
    run_summary,
    train_protocol,
)
from core.atomic import write_text
from core.config import dump_yaml
from core.progress import Progress
from pipeline.report import write_report
from pipeline.store import read_store

log = logging.getLogger(__name__)

RUNS_DIR = "runs"  # per-run checkpoints under the run folder
REFIT_NAME = "refit.pt"  # the model retrained on train+val (`refit`)


def run_training(store: str | Path, cfg: TrainConfig, out_dir: str | Path, *,
                 progress: Progress | None = None, parallel: Any = None) -> ProtocolResult:
    """comp-train: read the store, run the protocol, write best.pt, runs/, metrics.json, config.yaml, report.

    With `parallel` every rank calls this; rank 0 writes the outputs (fan-out: each rank also writes the
    per-run checkpoints of its runs) and the other ranks return their result without writing.
    """
    main = parallel is None or parallel.is_main
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        dump_yaml(cfg, out / "config.yaml")
    data = read_store(store)
    log.info("store %s: %s, labels %s, dims %s", store, data.header.task, list(data.header.label_names),
             {m: i.dim for m, i in data.header.modalities.items()})

    def save_run(outcome: RunOutcome) -> None:
        if cfg.save_run_checkpoints:
            save_checkpoint(out / RUNS_DIR / f"{outcome.name}.pt", outcome.state_dict,
                            checkpoint_meta(outcome, cfg, data))

    result = train_protocol(data, cfg, progress=progress, on_run=save_run, parallel=parallel)
    result.out_dir = out
    ddp = parallel is not None and parallel.data_parallel
    if cfg.refit and (ddp or result.best is not None):  # fan-out: rank 0 alone holds the best run
        result.refit = refit_run(data, cfg, result.best, progress=progress, parallel=parallel if ddp else None)
    if not main:
        return result
    best = run_summary(result.best) if result.best is not None else None
    refit = None
    if result.best is not None:
        save_checkpoint(out / "best.pt", result.best.state_dict, checkpoint_meta(result.best, cfg, data))
    if result.refit is not None:
        refit_cfg = dataclasses.replace(cfg, epochs=result.refit.main_record.best_epoch)
        meta = checkpoint_meta(result.refit, refit_cfg, data)
        meta["metrics"]["refit_of"] = result.best.name
        refit = meta["metrics"]
        save_checkpoint(out / REFIT_NAME, result.refit.state_dict, meta)
    if cfg.baselines:
        log.info("fitting the baselines on the same splits and masks")
        result.baselines = run_baselines(data=data, cfg=cfg)
    metrics = {
        "task": data.header.task, "label_names": list(data.header.label_names), "variant": cfg.model.variant,
        "missing": cfg.missing, "condition": result.main_condition, "selected_on": result.selected_on,
        "selection_metric": result.best.selection_metric if result.best else None,
        "best_run": best, "refit": refit, "splits": result.splits, "warnings": result.warnings,
        "summary": result.summary, "summary_by_condition": result.summary_by_condition,
        "runs": [r.to_dict() for r in result.runs],
        "baselines": ({k: b.to_dict() for k, b in result.baselines.items()} if result.baselines is not None
                      else None),
    }
    _write_json(out / "metrics.json", metrics)
    saved = {"best": best, "n_runs": result.n_runs, "splits": result.splits, "warnings": result.warnings,
             "refit": refit}
    write_report(out, result.runs, result.summary, result.baselines, saved=saved)
    log.info("%s", result.summary_text())
    return result


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating, np.integer)):
        return _json_safe(obj.item())
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(_json_safe(data), indent=1, allow_nan=False))
