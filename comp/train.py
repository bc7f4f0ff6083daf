"""The training loop and the evaluation protocol (docs/model.md §3, §6).

One *run* = one held-out fold (or the fixed split) x one seed: two stages on one Adam optimizer, an evaluation
pass per epoch, and an epoch selected on a metric. The *protocol* runs every fold x seed, scores the selected
weights on the test conversations under every missingness condition, and writes the outputs.

Two selection protocols share the code:

* clean (default): the epoch is chosen on validation conversations only, with fixed seeded masks; the test set
  is scored once, after training, with the selected weights. Results are mean +- std over seeds and folds.
* faithful (`quirks.test_selection`): the paper's protocol. The evaluation split *is* the test split, its masks
  are redrawn for every batch of every epoch, test batches are shuffled (batch-pooled prototypes make
  predictions depend on the batch), and the epoch with the best test score is reported. Every number it
  produces is labelled "test (paper protocol)".

Several processes (`parallel`, see comp.parallel): data parallel runs (DDP; `batch_size` stays the global
batch) or the fold x seed runs fanned out over the ranks. Rank 0 alone writes checkpoints and outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from comp.config import MODALITY_ORDER, TrainConfig
from comp.seeding import deterministic, mask_rng, seed_everything
from pipeline.devices import resolve_device

log = logging.getLogger(__name__)

SELECTED_ON_VAL = "val"
SELECTED_ON_TEST = "test (paper protocol)"
SELECTED_REFIT = "refit on train+val, the selected number of epochs (no held-out score)"
REFIT_NAME = "refit.pt"
LOWER_IS_BETTER = frozenset({"mae", "mse", "rmse", "loss"})


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, no usable data); the message says what to change."""


class TrainHooks(Protocol):
    """Progress callbacks; the CLI passes a tqdm implementation, the library only logs."""

    def run_started(self, label: str, epochs: int) -> None: ...
    def epoch_started(self, epoch: int, stage: int, n_batches: int) -> None: ...
    def batch_done(self, loss: float) -> None: ...
    def epoch_done(self, entry: dict) -> None: ...
    def run_done(self, records: list[dict]) -> None: ...


class NullHooks:
    def run_started(self, label: str, epochs: int) -> None:
        pass

    def epoch_started(self, epoch: int, stage: int, n_batches: int) -> None:
        pass

    def batch_done(self, loss: float) -> None:
        pass

    def epoch_done(self, entry: dict) -> None:
        pass

    def run_done(self, records: list[dict]) -> None:
        pass


# ------------------------------------------------------------------------------------------- evaluation

@dataclass
class EvalResult:
    """Predictions of one pass over an evaluation split (labelled utterances only) and their scores."""

    y_true: np.ndarray  # [n] class index or value
    logits: np.ndarray  # [n, C] fused
    head_logits: dict[str, np.ndarray]  # modality -> [n, C]
    weight_sum: np.ndarray | None  # [3] coordinator weights summed over valid utterances (stage 2)
    weight_count: int
    metrics: dict[str, float] = field(default_factory=dict)
    heads: dict[str, dict[str, float]] = field(default_factory=dict)
    loss: float = math.nan  # the fused prediction's task loss (comp.selection.fused_loss)

    @property
    def coordinator(self) -> dict[str, float] | None:
        if self.weight_sum is None or self.weight_count == 0:
            return None
        return {m: float(w) for m, w in zip(MODALITY_ORDER, self.weight_sum / self.weight_count)}


def _score(result: EvalResult, task: str, label_names: Sequence[str], errors_on: str = "all") -> EvalResult:
    from comp.metrics import score
    from comp.selection import fused_loss

    result.metrics = score(task, result.y_true, result.logits, label_names, errors_on=errors_on)
    result.loss = fused_loss(task, result.y_true, result.logits)
    result.heads = {m: score(task, result.y_true, result.head_logits[m], label_names, errors_on=errors_on)
                    for m in MODALITY_ORDER}
    return result


def pool_results(results: Sequence[EvalResult], task: str, label_names: Sequence[str],
                 errors_on: str = "all") -> EvalResult:
    """One result over the union of several passes (fixed conditions pooled)."""
    sums = [r.weight_sum for r in results if r.weight_sum is not None]
    pooled = EvalResult(
        y_true=np.concatenate([r.y_true for r in results]),
        logits=np.concatenate([r.logits for r in results]),
        head_logits={m: np.concatenate([r.head_logits[m] for r in results]) for m in MODALITY_ORDER},
        weight_sum=np.sum(sums, axis=0) if sums else None,
        weight_count=sum(r.weight_count for r in results if r.weight_sum is not None))
    return _score(pooled, task, label_names, errors_on)


def evaluate(model: torch.nn.Module, batches, *, stage: int, task: str, label_names: Sequence[str],
             device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager],
             errors_on: str = "all") -> EvalResult:
    """Predict every batch (eval mode, no autograd) and score the labelled utterances (`errors_on`: see
    comp.metrics.score)."""
    model.eval()
    ys, fused, weight_sum, weight_count = [], [], None, 0
    heads: dict[str, list[np.ndarray]] = {m: [] for m in MODALITY_ORDER}
    with torch.inference_mode():
        for item in batches:
            batch = item.batch.to(device)
            with autocast():
                out = model(batch, stage)
            rows = item.labelled.to(device)
            ys.append(batch.targets[rows].cpu().numpy())
            fused.append(out.logits[rows].float().cpu().numpy())
            for m in MODALITY_ORDER:
                heads[m].append(out.head_logits[m][rows].float().cpu().numpy())
            if out.weights is not None:
                valid = batch.valid
                w = out.weights[valid].float().sum(dim=0).cpu().numpy()
                weight_sum = w if weight_sum is None else weight_sum + w
                weight_count += int(valid.sum())
    n_out = model.n_outputs if hasattr(model, "n_outputs") else (fused[0].shape[-1] if fused else 1)
    empty = np.zeros((0, n_out), dtype=np.float32)
    result = EvalResult(
        y_true=np.concatenate(ys) if ys else np.zeros(0),
        logits=np.concatenate(fused) if fused else empty,
        head_logits={m: np.concatenate(v) if v else empty for m, v in heads.items()},
        weight_sum=weight_sum, weight_count=weight_count)
    return _score(result, task, label_names, errors_on)


# ------------------------------------------------------------------------------------------ missingness

@dataclass(frozen=True)
class Missingness:
    """How a run removes modalities: for training batches, and for each evaluation condition.

    natural: nothing beyond the store's flags. random:R: the protocol mask, redrawn per training batch.
    fixed:C1,C2,..: each training utterance gets one of the conditions at random (the model sees them all);
    evaluation scores each condition and, when there are several, their pool.
    """

    spec: Any  # comp.masks.MissingSpec

    @property
    def conditions(self) -> list[Any]:
        return self.spec.runs() if self.spec.kind == "fixed" else [self.spec]

    @property
    def labels(self) -> list[str]:
        labels = [c.label for c in self.conditions]
        return labels + ["pooled"] if len(labels) > 1 else labels

    @property
    def main_label(self) -> str:
        """The condition whose score selects the epoch and summarises the run."""
        return self.labels[-1]

    def train_batch(self, item, rng: np.random.Generator):
        from comp.masks import combine, condition_mask, mask_batch

        if self.spec.kind != "fixed" or len(self.spec.conditions) == 1:
            return mask_batch(item, self.spec, rng)[0]
        valid = item.batch.valid.numpy()
        natural = item.batch.present.numpy()
        pick = rng.integers(0, len(self.spec.conditions), size=int(valid.sum()))
        table = np.stack([condition_mask(c, 1)[0] for c in self.spec.conditions])
        simulated = np.zeros_like(natural)
        simulated[valid] = table[pick]
        mask, _ = combine(natural, simulated)
        return item.with_present(torch.from_numpy(mask))


# ------------------------------------------------------------------------------------------------- runs

@dataclass
class RunOutcome:
    """One fold x seed: a record per condition (`records`), the selected weights, and what rebuilds them."""

    fold: str
    seed: int
    records: list[dict]
    selection_metric: str
    selection_score: float
    state_dict: dict[str, torch.Tensor]
    normalizer: Any  # comp.data.Normalizer
    input_dims: dict[str, int]
    n_outputs: int
    selection_loss: float = math.nan  # validation loss at the selected epoch (breaks ties between runs)
    stage: int = 2  # the forward stage of the selected epoch: the stage that predicts with these weights

    @property
    def main_record(self) -> dict:
        return self.records[-1]

    @property
    def name(self) -> str:
        """The run's name, also its checkpoint's under runs/."""
        return run_name(self.fold, self.seed)


def run_name(fold: str, seed: int) -> str:
    return f"fold{fold}-seed{seed}"


def _autocast_factory(device: torch.device, cfg: TrainConfig) -> tuple[Callable[[], Any], Any]:
    """(autocast context factory, GradScaler or None): AMP on CUDA only, never with the fp32 quirk (§9.19,
    the released code runs in full precision); fp16 needs loss scaling."""
    if device.type != "cuda" or not cfg.amp or cfg.model.resolved.fp32:
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast(device_type="cuda", dtype=dtype)), scaler


def _selection_metric(cfg: TrainConfig, task: str) -> str:
    from comp.metrics import metric_names, primary_metric

    metric = cfg.selection_metric or primary_metric(task, cfg.model.variant)
    if metric not in metric_names(task):
        raise TrainingError(f"selection_metric {metric!r} is not a {task} metric; use one of "
                            f"{list(metric_names(task))} or leave it empty")
    return metric


def _n_outputs(task: str, label_names: Sequence[str]) -> int:
    return len(label_names) if task == "classification" else 1


def fit_run(conversations: Sequence[Any], plan: Any, cfg: TrainConfig, seed: int, *, task: str,
            label_names: Sequence[str], device: torch.device, hooks: TrainHooks | None = None,
            parallel: Any = None) -> RunOutcome:
    """Train one model on `plan.train`, select an epoch, score `plan.test` under every condition.

    `parallel` (a comp.parallel.Parallel with `data_parallel`): every rank of the job calls this together;
    each trains on its share of every batch and all of them return the same outcome.
    """
    from comp.data import Normalizer, iterate_batches, pack, select
    from comp.masks import mask_conversations, parse_missing
    from comp.model import ComP

    hooks = hooks or NullHooks()
    ddp = parallel is not None and parallel.data_parallel
    q = cfg.model.resolved
    paper = bool(q.test_selection)
    missing = Missingness(parse_missing(cfg.missing))
    metric = _selection_metric(cfg, task)
    errors_on = "non0" if q.nonzero_mae_corr else "all"  # §9.20: where regression MAE/Corr are computed
    label = f"fold {plan.name} seed {seed}"

    train_c = select(conversations, plan.train)
    if q.raw_features:  # §9.17: the released code feeds the features as stored
        normalizer = Normalizer.identity({m: int(train_c[0].features[m].shape[1]) for m in MODALITY_ORDER})
    else:
        normalizer = Normalizer.fit(train_c)
    train_packed = pack(normalizer.apply(train_c))
    val_c = normalizer.apply(select(conversations, plan.val)) if plan.val else []
    test_c = normalizer.apply(select(conversations, plan.test))
    if not train_packed.labelled[:-1].any():
        raise TrainingError(f"{label}: no labelled training utterance; label the clips in the store")

    # Clean protocol: fixed, seeded masks on val and test (the base seed: every seed and model sees the
    # same test masks). Faithful: masks are redrawn per batch at every evaluation instead.
    def fixed_sets(convs):
        if not convs:
            return {}
        return {c.label: pack(mask_conversations(convs, c, cfg.seed)[0]) for c in missing.conditions}

    val_sets = {} if paper else fixed_sets(val_c)
    eval_packed = pack(val_c) if (paper and val_c) else None

    seed_everything(seed)
    rng = mask_rng(seed)
    order_rng = np.random.default_rng([seed, 1])
    input_dims = {m: int(train_packed.features[m].shape[1]) for m in MODALITY_ORDER}
    n_outputs = _n_outputs(task, label_names)
    model = ComP(cfg.model, input_dims, n_outputs, task).to(device)

    def forward_loss(batch, stage: int):
        out = model(batch, stage)
        return (*_loss(out, batch, cfg, task, stage), out)

    step = forward_loss  # (batch, stage) -> (loss, parts, output)
    if ddp:
        step = parallel.training_step(model, lambda out, batch, stage: _loss(out, batch, cfg, task, stage))
        parallel.reseed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    autocast, scaler = _autocast_factory(device, cfg)
    modulator = None
    if q.gradient_modulator:
        from comp.modulator import GradientModulator

        modulator = parallel.modulator(model, cfg.model, task) if ddp else GradientModulator(model, cfg.model, task)

    def evaluate_conditions(stage: int) -> dict[str, EvalResult]:
        results: dict[str, EvalResult] = {}
        for cond in missing.conditions:
            if paper:
                # the released protocol: shuffled batches (prototypes depend on the batch), fresh masks
                from comp.masks import mask_batch

                batches = (mask_batch(item, cond, rng)[0]
                           for item in iterate_batches(eval_packed, cfg.batch_size, shuffle=True, rng=order_rng))
            else:
                batches = iterate_batches(val_sets[cond.label], cfg.batch_size, shuffle=False)
            results[cond.label] = evaluate(model, batches, stage=stage, task=task, label_names=label_names,
                                           device=device, autocast=autocast, errors_on=errors_on)
        if len(missing.conditions) > 1:
            results["pooled"] = pool_results(list(results.values()), task, label_names, errors_on)
        return results

    n_batches = math.ceil(len(train_packed) / cfg.batch_size)
    has_val = bool(val_c)
    history: dict[str, list[dict]] = {c: [] for c in missing.labels}
    best_epoch = {c: -1 for c in missing.labels}
    best_score: dict[str, float | None] = {c: None for c in missing.labels}
    best: dict[str, Candidate | None] = {c: None for c in missing.labels}
    best_state: dict[str, torch.Tensor] | None = None
    from comp.metrics import is_improvement
    from comp.selection import Candidate, better_epoch, split_sizes

    splits = {name: split_sizes(convs, task, label_names)
              for name, convs in (("train", train_c), ("val", [] if paper else val_c), ("test", test_c))}

    hooks.run_started(label, cfg.epochs)
    log.info("%s: %d train / %d val / %d test conversations, %d epochs (stage 1: %d), %s, device %s",
             label, len(train_packed), len(val_c), len(test_c), cfg.epochs, cfg.stage_epochs,
             missing.spec.label, device)
    for epoch in range(cfg.epochs):
        stage = 1 if epoch < cfg.stage_epochs else 2
        hooks.epoch_started(epoch, stage, n_batches)
        t0 = time.perf_counter()
        (step if ddp else model).train()
        loss_sum, parts_sum = 0.0, {}
        if ddp:
            batches = (item.batch for item in parallel.local_batches(train_packed, cfg.batch_size, order_rng,
                                                                     missing, rng))
        else:
            batches = (missing.train_batch(item, rng).batch
                       for item in iterate_batches(train_packed, cfg.batch_size, shuffle=True, rng=order_rng))
        for cpu_batch in batches:
            batch = cpu_batch.to(device)
            with autocast():
                loss, parts, out = step(batch, stage)
            if not torch.isfinite(loss):
                raise TrainingError(f"{label}, epoch {epoch + 1}: the loss became {float(loss)} ({parts}); lower "
                                    "the learning rate (--set lr=...) or turn AMP off (--set amp=false)")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                # the modulator runs on scaled gradients: it rescales them (and the retained activation
                # gradient it uses is scaled alike), so the loss scale cancels
                scaler.scale(loss).backward()
            else:
                loss.backward()
            if modulator is not None and stage == 2:
                modulator.apply(out, batch)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if ddp:
                parallel.sync_buffers(model)
            value = float(loss.detach())
            loss_sum += value
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v
            hooks.batch_done(value)
        if ddp:  # the epoch's loss over every rank's share, not rank 0's alone
            means = parallel.mean_over_ranks({"": loss_sum, **parts_sum})
            loss_sum = means.pop("")
            parts_sum = means
        train_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        results = evaluate_conditions(stage) if (has_val or paper) else {}
        eval_seconds = time.perf_counter() - t1
        for cond in missing.labels:
            res = results.get(cond)
            entry = {"epoch": epoch + 1, "stage": stage, "train_loss": loss_sum / max(1, n_batches),
                     "train_parts": {k: v / max(1, n_batches) for k, v in parts_sum.items()},
                     "val": res.metrics if res else {}, "val_heads": res.heads if res else {},
                     "coordinator": res.coordinator if res else None,
                     "seconds": train_seconds, "eval_seconds": eval_seconds}
            # clean: a stage-1 epoch is never selected (its fused head is untrained); faithful: as released
            eligible = paper or stage == 2
            entry["val_loss"] = res.loss if res else None
            entry["selectable"] = eligible
            history[cond].append(entry)
            value_ = res.metrics.get(metric) if res else None
            if res is None:  # no validation data: the last epoch is kept
                chosen = eligible
            elif paper:
                chosen = is_improvement(metric, value_, best_score[cond])
            else:
                cand = Candidate(value_, res.loss, epoch)
                chosen = eligible and better_epoch(metric, cand, best[cond])
                if chosen:
                    best[cond] = cand
            if chosen:
                if res is not None:
                    best_score[cond] = value_
                best_epoch[cond] = epoch
                if cond == missing.main_label:
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        main = history[missing.main_label][-1]
        where = "test" if paper else "val"
        log.info("%s epoch %d/%d (stage %d): loss %.4f, %s %s %s, %s loss %s%s (%.1fs + %.1fs eval)", label,
                 epoch + 1, cfg.epochs, stage, main["train_loss"], where, metric, _fmt(main["val"].get(metric)),
                 where, _fmt_loss(main["val_loss"]), "" if main["selectable"] else " (fused head untrained)",
                 train_seconds, eval_seconds)
        hooks.epoch_done(main)

    if best_state is None:  # no epoch produced a finite selection score: keep the last weights
        log.warning("%s: no epoch gave a finite %s; keeping the last epoch", label, metric)
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for cond in missing.labels:
            best_epoch[cond] = cfg.epochs - 1
    model.load_state_dict(best_state)
    sel_stage = 1 if best_epoch[missing.main_label] < cfg.stage_epochs else 2

    # The test set: scored once, with the selected weights (clean). The paper protocol already scored it
    # every epoch and reports the selected epoch's numbers.
    if paper or not test_c:
        tests = None
    else:
        test_sets = fixed_sets(test_c)
        tests = {}
        for cond in missing.conditions:
            tests[cond.label] = evaluate(model, iterate_batches(test_sets[cond.label], cfg.batch_size, shuffle=False),
                                         stage=sel_stage, task=task, label_names=label_names, device=device,
                                         autocast=autocast, errors_on=errors_on)
        if len(missing.conditions) > 1:
            tests["pooled"] = pool_results(list(tests.values()), task, label_names, errors_on)

    records = []
    for cond in missing.labels:
        ep = best_epoch[missing.main_label] if not paper else best_epoch[cond]
        chosen = history[cond][ep] if history[cond] else {}
        if paper:
            test_metrics, test_heads, confusion = chosen.get("val", {}), chosen.get("val_heads", {}), None
        elif tests is None:
            test_metrics, test_heads, confusion = {}, {}, None
        else:
            res = tests[cond]
            test_metrics, test_heads = res.metrics, res.heads
            confusion = _confusion(task, res, n_outputs)
        records.append({
            "fold": plan.name, "seed": seed, "run": run_name(plan.name, seed), "condition": cond,
            "best_epoch": ep + 1, "selected_stage": sel_stage,
            "selected_on": SELECTED_ON_TEST if paper else (SELECTED_ON_VAL if has_val else "last epoch (no val)"),
            "selection_metric": metric, "val": {} if paper else chosen.get("val", {}),
            "val_loss": None if paper else chosen.get("val_loss"), "history": history[cond],
            "test": test_metrics, "test_heads": test_heads, "confusion": confusion, "splits": splits,
            "label_names": list(label_names), "task": task, "variant": cfg.model.variant})
    main = records[-1]
    log.info("%s: selected epoch %d (stage %d) on %s; test %s", label, main["best_epoch"], sel_stage,
             main["selected_on"], ", ".join(f"{k} {_fmt(v)}" for k, v in main["test"].items()) or "-")
    hooks.run_done(records)
    score = best_score[missing.main_label]
    chosen_loss = history[missing.main_label][best_epoch[missing.main_label]].get("val_loss")
    return RunOutcome(fold=plan.name, seed=seed, records=records, selection_metric=metric,
                      selection_score=float("nan") if score is None else float(score), state_dict=best_state,
                      normalizer=normalizer, input_dims=input_dims, n_outputs=n_outputs,
                      selection_loss=math.nan if chosen_loss is None else float(chosen_loss), stage=sel_stage)


def _loss(out, batch, cfg: TrainConfig, task: str, stage: int):
    from comp.losses import comp_loss

    return comp_loss(out, batch, cfg.model, task, stage)


def _confusion(task: str, res: EvalResult, n_outputs: int) -> list[list[int]] | None:
    if task != "classification" or len(res.y_true) == 0:
        return None
    from comp.metrics import confusion

    return confusion(res.y_true, res.logits, n_outputs)


def _fmt(value: Any) -> str:
    return "nan" if value is None or not math.isfinite(float(value)) else f"{float(value):.4f}"


def _fmt_loss(value: Any) -> str:
    """Four significant digits: a validation loss near 0 still shows which epoch is lower."""
    return "nan" if value is None or not math.isfinite(float(value)) else f"{float(value):.4g}"


# --------------------------------------------------------------------------------------------- protocol

@dataclass
class ProtocolResult:
    """Every run's records, the summary over runs, and the selected best run."""

    runs: list[dict]
    summary: dict[str, dict[str, float]]
    summary_by_condition: dict[str, dict[str, dict[str, float]]]
    best: RunOutcome | None
    main_condition: str
    selected_on: str
    baselines: dict | None = None
    out_dir: Path | None = None
    splits: dict[str, dict[str, dict]] = field(default_factory=dict)  # fold -> train/val/test -> sizes
    warnings: list[str] = field(default_factory=list)  # splits too small to select or score on
    n_runs: int = 0
    refit: RunOutcome | None = None

    def summary_text(self) -> str:
        """The console summary: test scores over runs, the run saved to best.pt, split sizes, warnings."""
        lines = [f"test ({self.main_condition}, selected on {self.selected_on}), mean +- std over "
                 f"{next(iter(self.summary.values()), {}).get('n', 0)} run(s):"]
        for k, v in self.summary.items():
            lines.append(f"  {k:<10} {_fmt(v['mean'])} +- {_fmt(v['std'])}")
        lines += self.saved_model_lines()
        lines += [f"warning: {w}" for w in self.warnings]
        if self.out_dir is not None:
            lines.append(f"outputs in {self.out_dir}")
        return "\n".join(lines)

    def saved_model_lines(self) -> list[str]:
        """Which run and epoch best.pt (and refit.pt) hold, with their scores, and the sizes of its splits."""
        if self.best is None:
            return []
        rec = self.best.main_record
        metric = self.best.selection_metric
        epochs = len(rec["history"])
        lines = [f"best.pt    run {self.best.name}, epoch {rec['best_epoch']} of {epochs} (stage {self.best.stage})"
                 + (f", the best of {self.n_runs} runs on {rec['selected_on']} {metric}, then {rec['selected_on']} loss"
                    if self.n_runs > 1 else "")]
        val = rec.get("val") or {}
        scores = []
        if val:
            scores.append(f"val {metric} {_fmt(val.get(metric))}, loss {_fmt_loss(rec.get('val_loss'))}")
        if rec.get("test"):
            scores.append(f"{'test' if self.selected_on == SELECTED_ON_VAL else self.selected_on} "
                          + ", ".join(f"{k} {_fmt(v)}" for k, v in rec["test"].items()))
        if scores:
            lines.append("           " + "; ".join(scores))
        from comp.selection import format_sizes

        sizes = self.splits.get(self.best.fold) or {}
        for i, (split, info) in enumerate(sizes.items()):
            head = f"splits{' (fold ' + self.best.fold + ')' if len(self.splits) > 1 else ''}" if i == 0 else ""
            lines.append(f"{head:<10} {split:<5} {format_sizes(info)}")
        if sizes and any(info.get("per_class") for info in sizes.values()):
            lines.append(" " * 11 + "(per class: clips/conversations)")
        if self.refit is not None:
            r = self.refit.main_record
            lines.append(f"refit.pt   run {self.best.name} retrained on train+val "
                         f"({self.refit.records[-1]['splits']['train']['clips']} clips) for {r['best_epoch']} "
                         "epochs; no held-out score")
        return lines


def checkpoint_meta(outcome: RunOutcome, cfg: TrainConfig, data) -> dict:
    """Everything comp-predict needs besides the weights (the store contract: spec, labels, dims)."""
    from pipeline import __version__

    header = data.header
    return {
        "train_config": _to_dict(cfg), "task": header.task, "label_names": list(header.label_names),
        "input_dims": outcome.input_dims, "n_outputs": outcome.n_outputs,
        "normalizer": outcome.normalizer.to_dict(),
        "extraction_spec": dict(header.extraction_spec) if header.extraction_spec is not None else None,
        "spec_hash": data.spec_hash, "source": header.source,
        "modalities": {m: {"dim": i.dim, "encoder": i.encoder, "layers": i.layers, "pooling": i.pooling}
                       for m, i in header.modalities.items()},
        "stage": outcome.stage,  # the forward stage the weights were selected (and are to predict) at
        "conversations": conversation_summary(data),  # bounds the context of comp-predict --timeline
        "metrics": run_summary(outcome),
        "created_with": f"comp-mer {__version__}",
    }


def conversation_summary(data) -> dict[str, int]:
    """How long the store's conversations are, over its usable clips: {"conversations", "utterances",
    "longest", "multi_utterance" (conversations of more than one utterance)}. A model trained where every
    conversation is one utterance never learnt to use the context of others."""
    conv = np.asarray(data.conversation)[np.asarray(data.status) == "ok"].astype(str)
    counts = np.unique(conv, return_counts=True)[1] if conv.size else np.zeros(0, int)
    return {"conversations": int(counts.size), "utterances": int(counts.sum()),
            "longest": int(counts.max()) if counts.size else 0, "multi_utterance": int(np.sum(counts > 1))}


def run_summary(outcome: RunOutcome) -> dict:
    """The saved run as metrics.json, the checkpoint and the report name it: run, epoch, stage and scores."""
    rec = outcome.main_record
    return {"run": outcome.name, "fold": outcome.fold, "seed": outcome.seed, "condition": rec["condition"],
            "best_epoch": rec["best_epoch"], "stage": outcome.stage, "selected_on": rec["selected_on"],
            "selection_metric": outcome.selection_metric, "selection_score": outcome.selection_score,
            "val": rec.get("val") or {}, "val_loss": rec.get("val_loss"), "test": rec["test"],
            "held_out_score": bool(rec.get("val") or rec["test"])}


def _to_dict(cfg: TrainConfig) -> dict:
    from pipeline.configuration import to_dict

    return to_dict(cfg)


def train_protocol(data, cfg: TrainConfig, *, hooks: TrainHooks | None = None,
                   run_dir: Path | None = None, parallel: Any = None) -> ProtocolResult:
    """Every planned fold x seed. Per-run checkpoints go to `run_dir` as each run finishes.

    `parallel` (comp.parallel.Parallel): call on every rank. Data parallel: the ranks train each run together
    and rank 0 saves the checkpoints. Fan-out: rank r trains runs r, r + N, ... (in plan order) and saves
    their checkpoints; every rank returns all runs' records, rank 0 alone holds the best run's weights.
    """
    from comp.checkpoint import save_checkpoint
    from comp.data import DataError, build_conversations, plan_folds
    from comp.masks import parse_missing
    from comp.metrics import summarize

    try:
        device = parallel.device if parallel is not None else resolve_device(cfg.device)
        missing = Missingness(parse_missing(cfg.missing))
        paper = bool(cfg.model.resolved.test_selection)
        conversations = build_conversations(data, zero_vectors_present=bool(cfg.model.resolved.zero_vectors_present))
        plans = plan_folds(data, cfg, paper_protocol=paper)
    except (DataError, ValueError) as err:
        raise TrainingError(str(err)) from None
    task, label_names = data.header.task, list(data.header.label_names)
    longest = max(len(c) for c in conversations)
    if cfg.model.resolved.batch_prototypes and longest > cfg.model.max_len:
        raise TrainingError(f"the longest conversation has {longest} utterances but model.max_len is "
                            f"{cfg.model.max_len}; raise it (--set model.max_len={longest})")
    if not paper and cfg.stage_epochs >= cfg.epochs:
        raise TrainingError(f"stage_epochs ({cfg.stage_epochs}) must be below epochs ({cfg.epochs}): the fused "
                            "prediction is trained in stage 2 only, so a run without stage 2 has no model to save")
    if cfg.refit and (paper or not all(p.val for p in plans)):
        raise TrainingError("refit retrains on train+val for the epochs selected on validation data, but this "
                            + ("variant selects on the test set" if paper else "protocol has no validation split "
                               "(val_fraction is 0)") + "; drop --refit")
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    splits, warnings = _split_report(conversations, plans, task, label_names, paper)
    log.info("%d conversations, %d clips; %s; %d run(s): folds %s x %d seed(s); variant %s; selection on %s",
             len(conversations), sum(len(c) for c in conversations), task, len(plans) * cfg.seeds,
             ",".join(p.name for p in plans), cfg.seeds, cfg.model.variant,
             SELECTED_ON_TEST if paper else SELECTED_ON_VAL)
    if paper:
        log.warning("faithful variant: epochs are selected on the TEST set with test masks redrawn every epoch "
                    "(the paper's protocol); its numbers are optimistic and labelled 'test (paper protocol)'")
    for warning in warnings:
        log.warning("%s", warning)

    pairs = [(plan, cfg.seed + i) for plan in plans for i in range(cfg.seeds)]
    fan_out = parallel is not None and parallel.fan_out and parallel.world_size > 1
    mine = [k for k in range(len(pairs)) if not fan_out or k % parallel.world_size == parallel.rank]
    writes = parallel is None or fan_out or parallel.is_main
    records_by_run: dict[int, list[dict]] = {}
    best: RunOutcome | None = None
    best_index = -1
    guard = deterministic(device) if cfg.deterministic else contextlib.nullcontext()
    error: Exception | None = None
    with guard:
        try:
            for k in mine:
                plan, seed = pairs[k]
                outcome = fit_run(conversations, plan, cfg, seed, task=task, label_names=label_names,
                                  device=device, hooks=hooks, parallel=None if fan_out else parallel)
                records_by_run[k] = outcome.records
                if run_dir is not None and cfg.save_run_checkpoints and writes:
                    save_checkpoint(Path(run_dir) / f"fold{plan.name}-seed{seed}.pt", outcome.state_dict,
                                    checkpoint_meta(outcome, cfg, data))
                if best is None or _better_run(outcome, k, best, best_index):
                    best, best_index = outcome, k
                else:
                    outcome.state_dict = {}  # free the weights of runs that are not the best
        except Exception as err:  # noqa: BLE001 - fan-out: re-raised on this rank, reported to the others
            if not fan_out:
                raise
            error = err
    if fan_out:
        best, records_by_run = _gather_fan_out(parallel, error, best, best_index, records_by_run)
    runs = [r for k in sorted(records_by_run) for r in records_by_run[k]]
    by_condition = {c: summarize([r["test"] for r in runs if r["condition"] == c]) for c in missing.labels}
    return ProtocolResult(runs=runs, summary=by_condition[missing.main_label], summary_by_condition=by_condition,
                          best=best, main_condition=missing.main_label,
                          selected_on=SELECTED_ON_TEST if paper else SELECTED_ON_VAL, splits=splits,
                          warnings=warnings, n_runs=len(pairs))


def _split_report(conversations: Sequence[Any], plans: Sequence[Any], task: str, label_names: Sequence[str],
                  paper: bool) -> tuple[dict[str, dict], list[str]]:
    """({fold: {"train"|"val"|"test": sizes}}, the warnings of comp.selection.split_warnings for every fold)."""
    from comp.data import select
    from comp.selection import split_sizes, split_warnings

    splits, warnings = {}, []
    for plan in plans:
        parts = {"train": plan.train, "test": plan.test} if paper else \
            {"train": plan.train, "val": plan.val, "test": plan.test}
        splits[plan.name] = {k: split_sizes(select(conversations, ids), task, label_names) for k, ids in parts.items()}
        warnings += split_warnings(splits[plan.name], f"fold {plan.name}" if len(plans) > 1 else "")
    return splits, warnings


def _gather_fan_out(parallel: Any, error: Exception | None, best: RunOutcome | None, best_index: int,
                    records_by_run: dict[int, list[dict]]) -> tuple[RunOutcome | None, dict[int, list[dict]]]:
    """Every rank's run records on every rank; on rank 0, the best run over all ranks (else None).

    The best is chosen as one process would (comp.selection): ties that survive the validation loss go to the
    earlier run in plan order, whichever rank trained it.
    """
    from pipeline.distributed import agree, all_gather, gather_to_main

    agree(parallel.job, error)
    merged: dict[int, list[dict]] = {}
    for part in all_gather(parallel.job, records_by_run):
        merged.update(part)
    if best is not None:  # weights travel on the CPU; rank 0 may have another (or no) GPU
        best.state_dict = {k: v.detach().cpu() for k, v in best.state_dict.items()}
    candidates = gather_to_main(parallel.job, (best_index, best) if best is not None else None)
    overall: RunOutcome | None = None
    overall_index = -1
    if candidates is not None:
        for k, outcome in sorted((c for c in candidates if c is not None), key=lambda c: c[0]):
            if overall is None or _better_run(outcome, k, overall, overall_index):
                overall, overall_index = outcome, k
    return overall, merged


def _better_run(new: RunOutcome, new_index: int, best: RunOutcome, best_index: int) -> bool:
    """The run-selection rule of comp.selection (score, then validation loss, then plan order)."""
    from comp.selection import Candidate, better_run

    return better_run(new.selection_metric, Candidate(new.selection_score, new.selection_loss, new_index),
                      Candidate(best.selection_score, best.selection_loss, best_index))


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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=1, allow_nan=False), encoding="utf-8")
    tmp.replace(path)


def _run_baselines(data, cfg: TrainConfig, out_dir: Path) -> dict | None:
    """The baselines hook: comp.baselines.run_baselines when that module exists, else nothing."""
    import importlib
    import importlib.util

    if not cfg.baselines or importlib.util.find_spec("comp.baselines") is None:
        return None
    module = importlib.import_module("comp.baselines")
    if not hasattr(module, "run_baselines"):
        return None
    log.info("fitting the baselines on the same splits and masks")
    return module.run_baselines(data=data, cfg=cfg, out_dir=out_dir)


def run_training(store: str | Path, cfg: TrainConfig, out_dir: str | Path, *,
                 hooks: TrainHooks | None = None, parallel: Any = None) -> ProtocolResult:
    """comp-train: read the store, run the protocol, write best.pt, runs/, metrics.json, config.yaml, report.

    With `parallel` every rank calls this; rank 0 writes the outputs (fan-out: each rank also writes the
    per-run checkpoints of its runs) and the other ranks return their result without writing.
    """
    from comp.checkpoint import save_checkpoint
    from pipeline.configuration import dump_yaml
    from pipeline.store import read_store

    main = parallel is None or parallel.is_main
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if main:
        dump_yaml(cfg, out / "config.yaml")
    data = read_store(store)
    log.info("store %s: %s, labels %s, dims %s", store, data.header.task, list(data.header.label_names),
             {m: i.dim for m, i in data.header.modalities.items()})
    result = train_protocol(data, cfg, hooks=hooks, run_dir=out / "runs", parallel=parallel)
    result.out_dir = out
    ddp = parallel is not None and parallel.data_parallel
    if cfg.refit and (ddp or result.best is not None):  # fan-out: rank 0 alone holds the best run
        result.refit = refit_run(data, cfg, result.best, hooks=hooks, parallel=parallel if ddp else None)
    if not main:
        return result
    best = run_summary(result.best) if result.best is not None else None
    refit = None
    if result.best is not None:
        save_checkpoint(out / "best.pt", result.best.state_dict, checkpoint_meta(result.best, cfg, data))
    if result.refit is not None:
        refit_cfg = dataclasses.replace(cfg, epochs=result.refit.main_record["best_epoch"])
        meta = checkpoint_meta(result.refit, refit_cfg, data)
        meta["metrics"]["refit_of"] = result.best.name
        refit = meta["metrics"]
        save_checkpoint(out / REFIT_NAME, result.refit.state_dict, meta)
    result.baselines = _run_baselines(data, cfg, out)
    metrics = {
        "task": data.header.task, "label_names": list(data.header.label_names), "variant": cfg.model.variant,
        "missing": cfg.missing, "condition": result.main_condition, "selected_on": result.selected_on,
        "selection_metric": result.best.selection_metric if result.best else None,
        "best_run": best, "refit": refit, "splits": result.splits, "warnings": result.warnings,
        "summary": result.summary, "summary_by_condition": result.summary_by_condition,
        "runs": result.runs, "baselines": result.baselines,
    }
    _write_json(out / "metrics.json", metrics)
    try:
        from comp.report import write_report
    except ImportError:
        log.warning("comp.report is not available; no report.html written")
    else:
        saved = {"best": best, "n_runs": result.n_runs, "splits": result.splits, "warnings": result.warnings,
                 "refit": refit}
        write_report(out, result.runs, result.summary, result.baselines, saved=saved)
    log.info("%s", result.summary_text())
    return result


def refit_run(data, cfg: TrainConfig, best: RunOutcome, *, hooks: TrainHooks | None = None,
              parallel: Any = None) -> RunOutcome:
    """`--refit`: retrain the saved run (its fold and seed) on its train+val conversations for the number of
    epochs selected on validation, keeping the last epoch. Nothing is held out for selection and the test split
    is not scored, so the outcome has no held-out score (its records say so)."""
    from comp.data import FoldPlan, build_conversations, plan_folds

    conversations = build_conversations(data)
    plan = next(p for p in plan_folds(data, cfg) if p.name == best.fold)
    epochs = int(best.main_record["best_epoch"])
    merged = FoldPlan(plan.name, tuple(sorted(set(plan.train) | set(plan.val))), (), ())
    refit_cfg = dataclasses.replace(cfg, epochs=epochs)
    device = parallel.device if parallel is not None else resolve_device(cfg.device)
    log.info("refit: run %s on train+val (%d conversations) for %d epochs", best.name, len(merged.train), epochs)
    guard = deterministic(device) if cfg.deterministic else contextlib.nullcontext()
    with guard:
        outcome = fit_run(conversations, merged, refit_cfg, best.seed, task=data.header.task,
                          label_names=list(data.header.label_names), device=device, hooks=hooks, parallel=parallel)
    for rec in outcome.records:
        rec["selected_on"] = SELECTED_REFIT
    return outcome
