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
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from comp.config import TrainConfig
from comp.results import BaselineResult, EpochRecord, RunRecord
from comp.seeding import deterministic, mask_rng, seed_everything
from comp.selection import SELECTED_ON_LAST, SELECTED_ON_TEST, SELECTED_ON_VAL, SELECTED_REFIT
from core import __version__
from core.clip import MODALITIES
from core.devices import resolve_device
from core.errors import CompError
from core.progress import Progress, no_progress

log = logging.getLogger(__name__)


class TrainingError(CompError, RuntimeError):
    """Training cannot go on (diverged, no usable data); the message says what to change."""


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
        return {m: float(w) for m, w in zip(MODALITIES, self.weight_sum / self.weight_count)}


def _score(result: EvalResult, task: str, label_names: Sequence[str], errors_on: str = "all") -> EvalResult:
    from comp.metrics import score
    from comp.selection import fused_loss

    result.metrics = score(task, result.y_true, result.logits, label_names, errors_on=errors_on)
    result.loss = fused_loss(task, result.y_true, result.logits)
    result.heads = {m: score(task, result.y_true, result.head_logits[m], label_names, errors_on=errors_on)
                    for m in MODALITIES}
    return result


def pool_results(results: Sequence[EvalResult], task: str, label_names: Sequence[str],
                 errors_on: str = "all") -> EvalResult:
    """One result over the union of several passes (fixed conditions pooled)."""
    sums = [r.weight_sum for r in results if r.weight_sum is not None]
    pooled = EvalResult(
        y_true=np.concatenate([r.y_true for r in results]),
        logits=np.concatenate([r.logits for r in results]),
        head_logits={m: np.concatenate([r.head_logits[m] for r in results]) for m in MODALITIES},
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
    heads: dict[str, list[np.ndarray]] = {m: [] for m in MODALITIES}
    with torch.inference_mode():
        for item in batches:
            batch = item.batch.to(device)
            with autocast():
                out = model(batch, stage)
            rows = item.labelled.to(device)
            ys.append(batch.targets[rows].cpu().numpy())
            fused.append(out.logits[rows].float().cpu().numpy())
            for m in MODALITIES:
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
    records: list[RunRecord]  # one per condition, the main one last
    selection_metric: str
    selection_score: float
    state_dict: dict[str, torch.Tensor]
    normalizer: Any  # comp.data.Normalizer
    input_dims: dict[str, int]
    n_outputs: int
    selection_loss: float = math.nan  # validation loss at the selected epoch (breaks ties between runs)
    stage: int = 2  # the forward stage of the selected epoch: the stage that predicts with these weights

    @property
    def main_record(self) -> RunRecord:
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


@dataclass
class RunData:
    """One run's conversations as training and evaluation consume them: packed with the normaliser fitted on
    the training conversations (applied per batch, so the features are held once), and (clean protocol)
    masked once per evaluation condition."""

    label: str  # "fold <name> seed <seed>", for the log and the progress display
    normalizer: Any  # comp.data.Normalizer
    train: Any  # comp.data.PackedConversations
    val: list[Any]  # val conversations as stored (comp.data.Conversation; standardised per batch); [] without any
    test: list[Any]  # test conversations as stored
    val_sets: dict[str, Any]  # clean: condition label -> packed val conversations under its fixed mask
    eval_packed: Any  # faithful: the packed evaluation (test) conversations, masked afresh per batch; else None
    splits: dict[str, dict]  # "train"/"val"/"test" -> comp.selection.split_sizes

    @property
    def input_dims(self) -> dict[str, int]:
        return {m: int(self.train.features[m].shape[1]) for m in MODALITIES}


def prepare_run(conversations: Sequence[Any], plan: Any, cfg: TrainConfig, missing: Missingness, *, task: str,
                label_names: Sequence[str], label: str) -> RunData:
    """Select the plan's conversations, fit the normaliser on the training ones (§9.17: the released code
    feeds the features as stored), pack them, and fix the validation masks (clean protocol)."""
    from comp.data import Normalizer, pack, select
    from comp.selection import split_sizes

    q = cfg.model.resolved
    paper = bool(q.test_selection)
    train_c = select(conversations, plan.train)
    if q.raw_features:
        normalizer = Normalizer.identity({m: int(train_c[0].features[m].shape[1]) for m in MODALITIES})
    else:
        normalizer = Normalizer.fit(train_c)
    train_packed = pack(train_c, normalizer)  # standardised per batch: the features are held once
    val_c = select(conversations, plan.val) if plan.val else []
    test_c = select(conversations, plan.test)
    if not train_packed.labelled[:-1].any():
        raise TrainingError(f"{label}: no labelled training utterance; label the clips in the store")
    splits = {name: split_sizes(convs, task, label_names)
              for name, convs in (("train", train_c), ("val", [] if paper else val_c), ("test", test_c))}
    return RunData(label=label, normalizer=normalizer, train=train_packed, val=val_c, test=test_c,
                   val_sets={} if paper else fixed_mask_sets(val_c, missing, cfg.seed, normalizer),
                   eval_packed=pack(val_c, normalizer) if (paper and val_c) else None, splits=splits)


def fixed_mask_sets(conversations: Sequence[Any], missing: Missingness, seed: int,
                    normalizer: Any) -> dict[str, Any]:
    """Clean protocol: per condition, the conversations under a fixed mask seeded by the base seed (every
    seed and model sees the same masks), packed. Faithful redraws masks per batch instead."""
    from comp.data import pack
    from comp.masks import mask_packed

    if not conversations:
        return {}
    packed = pack(conversations, normalizer)  # row indices into the held features; conditions change flags only
    return {c.label: mask_packed(packed, c, seed)[0] for c in missing.conditions}


@dataclass
class Fitter:
    """The model and what updates it: the (possibly data-parallel) step, the optimizer, AMP, the modulator."""

    model: torch.nn.Module
    step: Callable[..., Any]  # (batch, stage) -> (loss, named loss terms, model output)
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], Any]
    scaler: Any  # torch.amp.GradScaler or None
    modulator: Any  # comp.modulator.GradientModulator (or its synced form) or None
    parallel: Any  # comp.parallel.Parallel when data parallel, else None


def build_fitter(cfg: TrainConfig, input_dims: dict[str, int], n_outputs: int, task: str, device: torch.device,
                 seed: int, parallel: Any) -> Fitter:
    """A fresh ComP on `device` and its optimizer; `parallel` (data parallel) wraps the step in DDP."""
    from comp.model import ComP

    model = ComP(cfg.model, input_dims, n_outputs, task).to(device)
    loss_fn = functools.partial(_loss, cfg=cfg, task=task)
    step: Callable[..., Any] = functools.partial(_forward_loss, model, loss_fn)
    if parallel is not None:
        step = parallel.training_step(model, loss_fn)
        parallel.reseed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    autocast, scaler = _autocast_factory(device, cfg)
    modulator = None
    if cfg.model.resolved.gradient_modulator:
        from comp.modulator import GradientModulator

        modulator = (parallel.modulator(model, cfg.model, task) if parallel is not None
                     else GradientModulator(model, cfg.model, task))
    return Fitter(model, step, optimizer, autocast, scaler, modulator, parallel)


def _forward_loss(model: torch.nn.Module, loss_fn: Callable[..., Any], batch: Any, stage: int):
    out = model(batch, stage)
    return (*loss_fn(out, batch, stage), out)


def train_epoch(fitter: Fitter, run: RunData, cfg: TrainConfig, missing: Missingness, *, epoch: int, stage: int,
                rng: np.random.Generator, order_rng: np.random.Generator, device: torch.device,
                progress: Progress) -> tuple[float, dict[str, float]]:
    """One pass over the training conversations in shuffled batches, each masked as `missing` says.
    Returns (mean loss, mean of each named loss term) over the batches (over every rank's share)."""
    from comp.data import iterate_batches

    ddp = fitter.parallel is not None
    n_batches = math.ceil(len(run.train) / cfg.batch_size)
    task_name = f"{run.label} epoch {epoch + 1}/{cfg.epochs} (stage {stage})"
    progress(task_name, 0, n_batches)
    (fitter.step if ddp else fitter.model).train()
    loss_sum, parts_sum = 0.0, {}
    if ddp:
        batches = (item.batch for item in fitter.parallel.local_batches(run.train, cfg.batch_size, order_rng,
                                                                        missing, rng))
    else:
        batches = (missing.train_batch(item, rng).batch
                   for item in iterate_batches(run.train, cfg.batch_size, shuffle=True, rng=order_rng))
    for done, cpu_batch in enumerate(batches, start=1):
        value, parts = _train_step(fitter, cpu_batch.to(device), stage, f"{run.label}, epoch {epoch + 1}")
        loss_sum += value
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v
        progress(task_name, done, n_batches, f"loss {value:.3f}")
    if ddp:  # the epoch's loss over every rank's share, not rank 0's alone
        means = fitter.parallel.mean_over_ranks({"": loss_sum, **parts_sum})
        loss_sum = means.pop("")
        parts_sum = means
    return loss_sum / max(1, n_batches), {k: v / max(1, n_batches) for k, v in parts_sum.items()}


def _train_step(fitter: Fitter, batch: Any, stage: int, where: str) -> tuple[float, dict[str, float]]:
    """Forward, backward (loss-scaled under fp16 AMP), the modulator in stage 2, one optimizer step."""
    with fitter.autocast():
        loss, parts, out = fitter.step(batch, stage)
    if not torch.isfinite(loss):
        raise TrainingError(f"{where}: the loss became {float(loss)} ({parts}); lower the learning rate "
                            "(--set lr=...) or turn AMP off (--set amp=false)")
    fitter.optimizer.zero_grad(set_to_none=True)
    if fitter.scaler is not None:
        # the modulator runs on scaled gradients: it rescales them (and the retained activation gradient it
        # uses is scaled alike), so the loss scale cancels
        fitter.scaler.scale(loss).backward()
    else:
        loss.backward()
    if fitter.modulator is not None and stage == 2:
        fitter.modulator.apply(out, batch)
    if fitter.scaler is not None:
        fitter.scaler.step(fitter.optimizer)
        fitter.scaler.update()
    else:
        fitter.optimizer.step()
    if fitter.parallel is not None:
        fitter.parallel.sync_buffers(fitter.model)
    return float(loss.detach()), parts


@dataclass(frozen=True)
class Scoring:
    """How one run scores its predictions: task, labels, device, AMP and where regression errors count."""

    task: str
    label_names: Sequence[str]
    device: torch.device
    autocast: Callable[[], Any]
    errors_on: str  # "all" or "non0" (§9.20)

    def evaluate(self, model: torch.nn.Module, batches, stage: int) -> EvalResult:
        return evaluate(model, batches, stage=stage, task=self.task, label_names=self.label_names,
                        device=self.device, autocast=self.autocast, errors_on=self.errors_on)

    def pool(self, results: dict[str, EvalResult]) -> dict[str, EvalResult]:
        """`results` plus, with several conditions, their pool under "pooled"."""
        if len(results) > 1:
            results["pooled"] = pool_results(list(results.values()), self.task, self.label_names, self.errors_on)
        return results


def evaluate_conditions(model: torch.nn.Module, run: RunData, cfg: TrainConfig, missing: Missingness,
                        scoring: Scoring, stage: int, *, rng: np.random.Generator,
                        order_rng: np.random.Generator) -> dict[str, EvalResult]:
    """The epoch's evaluation under every condition. Clean: the validation conversations under their fixed
    masks. Faithful (the released protocol): the test conversations in shuffled batches (prototypes depend
    on the batch) with masks drawn afresh."""
    from comp.data import iterate_batches
    from comp.masks import mask_batch

    results: dict[str, EvalResult] = {}
    for cond in missing.conditions:
        if run.eval_packed is not None:
            batches = (mask_batch(item, cond, rng)[0]
                       for item in iterate_batches(run.eval_packed, cfg.batch_size, shuffle=True, rng=order_rng))
        else:
            batches = iterate_batches(run.val_sets[cond.label], cfg.batch_size, shuffle=False)
        results[cond.label] = scoring.evaluate(model, batches, stage)
    return scoring.pool(results)


def score_test(model: torch.nn.Module, run: RunData, cfg: TrainConfig, missing: Missingness, scoring: Scoring,
               stage: int) -> dict[str, EvalResult]:
    """Clean protocol: the test conversations, scored once with the selected weights under every condition."""
    from comp.data import iterate_batches

    test_sets = fixed_mask_sets(run.test, missing, cfg.seed, run.normalizer)
    return scoring.pool({cond.label: scoring.evaluate(
        model, iterate_batches(test_sets[cond.label], cfg.batch_size, shuffle=False), stage)
        for cond in missing.conditions})


class EpochSelection:
    """The selected epoch of each condition as the epochs come in (comp.selection), and the weights of the
    main condition's. Clean: the best validation metric, then the lower validation loss, then the later
    epoch, stage-2 epochs only. Faithful: the first epoch with a strictly better score, any stage. Without
    validation data the last (eligible) epoch."""

    def __init__(self, labels: Sequence[str], main_label: str, metric: str, paper: bool) -> None:
        self.main_label, self.metric, self.paper = main_label, metric, paper
        self.history: dict[str, list[EpochRecord]] = {c: [] for c in labels}
        self.best_epoch = {c: -1 for c in labels}  # 0-based
        self.best_score: dict[str, float | None] = {c: None for c in labels}
        self._best: dict[str, Any] = {c: None for c in labels}  # comp.selection.Candidate
        self.best_state: dict[str, torch.Tensor] | None = None

    def add(self, cond: str, entry: EpochRecord, res: EvalResult | None, model: torch.nn.Module) -> None:
        """Record `entry` (epoch `entry.epoch`, scored `res`) and keep it if it is the better epoch."""
        from comp.metrics import is_improvement
        from comp.selection import Candidate, better_epoch

        epoch = entry.epoch - 1
        self.history[cond].append(entry)
        value = res.metrics.get(self.metric) if res else None
        if res is None:
            chosen = entry.selectable
        elif self.paper:
            chosen = is_improvement(self.metric, value, self.best_score[cond])
        else:
            cand = Candidate(value, res.loss, epoch)
            chosen = entry.selectable and better_epoch(self.metric, cand, self._best[cond])
            if chosen:
                self._best[cond] = cand
        if not chosen:
            return
        if res is not None:
            self.best_score[cond] = value
        self.best_epoch[cond] = epoch
        if cond == self.main_label:
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def finish(self, model: torch.nn.Module, label: str, epochs: int) -> None:
        """Load the selected weights into `model`; no epoch with a finite score keeps the last one."""
        if self.best_state is None:
            log.warning("%s: no epoch gave a finite %s; keeping the last epoch", label, self.metric)
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            for cond in self.best_epoch:
                self.best_epoch[cond] = epochs - 1
        model.load_state_dict(self.best_state)

    def epoch_of(self, cond: str) -> int:
        """The 0-based epoch whose scores `cond` reports: the main condition's weights (clean, one model is
        saved) or its own selected epoch (faithful)."""
        return self.best_epoch[cond] if self.paper else self.best_epoch[self.main_label]


def fit_run(conversations: Sequence[Any], plan: Any, cfg: TrainConfig, seed: int, *, task: str,
            label_names: Sequence[str], device: torch.device, progress: Progress | None = None,
            parallel: Any = None) -> RunOutcome:
    """Train one model on `plan.train`, select an epoch, score `plan.test` under every condition.

    `parallel` (a comp.parallel.Parallel with `data_parallel`): every rank of the job calls this together;
    each trains on its share of every batch and all of them return the same outcome.
    """
    from comp.masks import parse_missing

    progress = progress or no_progress
    ddp = parallel is not None and parallel.data_parallel
    paper = bool(cfg.model.resolved.test_selection)
    missing = Missingness(parse_missing(cfg.missing))
    metric = _selection_metric(cfg, task)
    label = f"fold {plan.name} seed {seed}"
    run = prepare_run(conversations, plan, cfg, missing, task=task, label_names=label_names, label=label)

    seed_everything(seed)
    rng = mask_rng(seed)
    order_rng = np.random.default_rng([seed, 1])
    n_outputs = _n_outputs(task, label_names)
    fitter = build_fitter(cfg, run.input_dims, n_outputs, task, device, seed, parallel if ddp else None)
    # §9.20: where regression MAE/Corr are computed
    scoring = Scoring(task, label_names, device, fitter.autocast,
                      "non0" if cfg.model.resolved.nonzero_mae_corr else "all")
    selection = EpochSelection(missing.labels, missing.main_label, metric, paper)
    log.info("%s: %d train / %d val / %d test conversations, %d epochs (stage 1: %d), %s, device %s",
             label, len(run.train), len(run.val), len(run.test), cfg.epochs, cfg.stage_epochs,
             missing.spec.label, device)
    for epoch in range(cfg.epochs):
        stage = 1 if epoch < cfg.stage_epochs else 2
        t0 = time.perf_counter()
        train_loss, train_parts = train_epoch(fitter, run, cfg, missing, epoch=epoch, stage=stage, rng=rng,
                                              order_rng=order_rng, device=device, progress=progress)
        train_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        results = (evaluate_conditions(fitter.model, run, cfg, missing, scoring, stage, rng=rng,
                                       order_rng=order_rng) if (run.val or paper) else {})
        eval_seconds = time.perf_counter() - t1
        for cond in missing.labels:
            res = results.get(cond)
            entry = EpochRecord(
                epoch=epoch + 1, stage=stage, train_loss=train_loss, train_parts=train_parts,
                val=res.metrics if res else {}, val_heads=res.heads if res else {},
                coordinator=res.coordinator if res else None, seconds=train_seconds, eval_seconds=eval_seconds,
                val_loss=res.loss if res else None,
                # clean: a stage-1 epoch is never selected (its fused head is untrained); faithful: as released
                selectable=paper or stage == 2)
            selection.add(cond, entry, res, fitter.model)
        _log_epoch(selection.history[missing.main_label][-1], label, cfg.epochs, metric, paper)

    selection.finish(fitter.model, label, cfg.epochs)
    sel_stage = 1 if selection.best_epoch[missing.main_label] < cfg.stage_epochs else 2
    # The paper protocol scored the test set every epoch and reports the selected epoch's numbers.
    tests = None if paper or not run.test else score_test(fitter.model, run, cfg, missing, scoring, sel_stage)
    records = [_run_record(selection, cond, tests, run, plan.name, seed, sel_stage, n_outputs, cfg, task,
                           label_names, has_val=bool(run.val)) for cond in missing.labels]
    main = records[-1]
    log.info("%s: selected epoch %d (stage %d) on %s; test %s", label, main.best_epoch, sel_stage,
             main.selected_on, ", ".join(f"{k} {_fmt(v)}" for k, v in main.test.items()) or "-")
    score = selection.best_score[missing.main_label]
    chosen_loss = selection.history[missing.main_label][selection.best_epoch[missing.main_label]].val_loss
    return RunOutcome(fold=plan.name, seed=seed, records=records, selection_metric=metric,
                      selection_score=float("nan") if score is None else float(score),
                      state_dict=selection.best_state, normalizer=run.normalizer, input_dims=run.input_dims,
                      n_outputs=n_outputs, selection_loss=math.nan if chosen_loss is None else float(chosen_loss),
                      stage=sel_stage)


def _log_epoch(entry: EpochRecord, label: str, epochs: int, metric: str, paper: bool) -> None:
    where = "test" if paper else "val"
    log.info("%s epoch %d/%d (stage %d): loss %.4f, %s %s %s, %s loss %s%s (%.1fs + %.1fs eval)", label,
             entry.epoch, epochs, entry.stage, entry.train_loss, where, metric, _fmt(entry.val.get(metric)),
             where, _fmt_loss(entry.val_loss), "" if entry.selectable else " (fused head untrained)",
             entry.seconds, entry.eval_seconds)


def _run_record(selection: EpochSelection, cond: str, tests: dict[str, EvalResult] | None, run: RunData,
                fold: str, seed: int, sel_stage: int, n_outputs: int, cfg: TrainConfig, task: str,
                label_names: Sequence[str], *, has_val: bool) -> RunRecord:
    """The record of condition `cond`: the selected epoch, its validation scores and the test scores."""
    paper = selection.paper
    ep = selection.epoch_of(cond)
    chosen = selection.history[cond][ep] if selection.history[cond] else None
    confusion = None
    if paper:  # the selection data is the test set
        test, test_heads = (chosen.val, chosen.val_heads) if chosen else ({}, {})
    elif tests is None:
        test, test_heads = {}, {}
    else:
        test, test_heads = tests[cond].metrics, tests[cond].heads
        confusion = _confusion(task, tests[cond], n_outputs)
    return RunRecord(
        fold=fold, seed=seed, run=run_name(fold, seed), condition=cond, best_epoch=ep + 1,
        selected_stage=sel_stage,
        selected_on=SELECTED_ON_TEST if paper else (SELECTED_ON_VAL if has_val else SELECTED_ON_LAST),
        selection_metric=selection.metric, val={} if paper or chosen is None else chosen.val,
        val_loss=None if paper or chosen is None else chosen.val_loss, history=selection.history[cond],
        test=test, test_heads=test_heads, confusion=confusion, splits=run.splits, label_names=list(label_names),
        task=task, variant=cfg.model.variant)


def _loss(out, batch, stage: int, *, cfg: TrainConfig, task: str):
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

    runs: list[RunRecord]
    summary: dict[str, dict[str, float]]
    summary_by_condition: dict[str, dict[str, dict[str, float]]]
    best: RunOutcome | None
    main_condition: str
    selected_on: str
    baselines: dict[str, BaselineResult] | None = None
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
        epochs = len(rec.history)
        lines = [f"best.pt    run {self.best.name}, epoch {rec.best_epoch} of {epochs} (stage {self.best.stage})"
                 + (f", the best of {self.n_runs} runs on {rec.selected_on} {metric}, then {rec.selected_on} loss"
                    if self.n_runs > 1 else "")]
        scores = []
        if rec.val:
            scores.append(f"val {metric} {_fmt(rec.val.get(metric))}, loss {_fmt_loss(rec.val_loss)}")
        if rec.test:
            scores.append(f"{'test' if self.selected_on == SELECTED_ON_VAL else self.selected_on} "
                          + ", ".join(f"{k} {_fmt(v)}" for k, v in rec.test.items()))
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
                         f"({r.splits['train']['clips']} clips) for {r.best_epoch} epochs; no held-out score")
        return lines


def checkpoint_meta(outcome: RunOutcome, cfg: TrainConfig, data) -> dict:
    """Everything comp-predict needs besides the weights (the store contract: spec, labels, dims)."""
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
        "clips": clip_summary(data),  # how much non-speech its clips held: the timeline extracts alike
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


def clip_summary(data) -> dict[str, float | int]:
    """What the store's usable clips were like around their speech: {"clips", "median_duration_s",
    "median_non_speech_s" (clip length minus the VAD's speech seconds, from the `speech_ratio` diagnostic;
    omitted when the store has none)}. Audio features pool the whole clip, silence included, so a model
    trained on clips with a second of silence around the speech reads tight utterance cuts differently."""
    ok = np.asarray(data.status) == "ok"
    duration = np.asarray(data.duration_s, dtype=float)[ok]
    out: dict[str, float | int] = {"clips": int(ok.sum())}
    if np.isfinite(duration).any():
        out["median_duration_s"] = round(float(np.nanmedian(duration)), 3)
    ratio = data.diagnostics.get("speech_ratio")
    if ratio is not None:
        ratio = np.asarray(ratio, dtype=float)[ok]
        usable = np.isfinite(ratio) & (ratio > 0) & np.isfinite(duration)
        if usable.any():
            out["median_non_speech_s"] = round(float(np.median(duration[usable] * (1 - ratio[usable]))), 3)
    return out


def run_summary(outcome: RunOutcome) -> dict:
    """The saved run as metrics.json, the checkpoint and the report name it: run, epoch, stage and scores."""
    rec = outcome.main_record
    return {"run": outcome.name, "fold": outcome.fold, "seed": outcome.seed, "condition": rec.condition,
            "best_epoch": rec.best_epoch, "stage": outcome.stage, "selected_on": rec.selected_on,
            "selection_metric": outcome.selection_metric, "selection_score": outcome.selection_score,
            "val": rec.val, "val_loss": rec.val_loss, "test": rec.test, "held_out_score": bool(rec.val or rec.test)}


def _to_dict(cfg: TrainConfig) -> dict:
    from core.config import to_dict

    return to_dict(cfg)


def train_protocol(data, cfg: TrainConfig, *, progress: Progress | None = None,
                   on_run: Callable[[RunOutcome], None] | None = None, parallel: Any = None) -> ProtocolResult:
    """Every planned fold x seed. `on_run(outcome)` is called as each run finishes, on the process that keeps
    its outputs (the pipeline saves the run's checkpoint there).

    `parallel` (comp.parallel.Parallel): call on every rank. Data parallel: the ranks train each run together
    and rank 0 calls `on_run`. Fan-out: rank r trains runs r, r + N, ... (in plan order) and calls `on_run` for
    them; every rank returns all runs' records, rank 0 alone holds the best run's weights.
    """
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
    records_by_run: dict[int, list[RunRecord]] = {}
    best: RunOutcome | None = None
    best_index = -1
    guard = deterministic(device) if cfg.deterministic else contextlib.nullcontext()
    error: Exception | None = None
    with guard:
        try:
            for k in mine:
                plan, seed = pairs[k]
                outcome = fit_run(conversations, plan, cfg, seed, task=task, label_names=label_names,
                                  device=device, progress=progress, parallel=None if fan_out else parallel)
                records_by_run[k] = outcome.records
                if on_run is not None and writes:
                    on_run(outcome)
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
    by_condition = {c: summarize([r.test for r in runs if r.condition == c]) for c in missing.labels}
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
                    records_by_run: dict[int, list[RunRecord]]) -> tuple[RunOutcome | None, dict[int, list[RunRecord]]]:
    """Every rank's run records on every rank; on rank 0, the best run over all ranks (else None).

    The best is chosen as one process would (comp.selection): ties that survive the validation loss go to the
    earlier run in plan order, whichever rank trained it.
    """
    from core.distributed import agree, all_gather, gather_to_main

    agree(parallel.job, error)
    merged: dict[int, list[RunRecord]] = {}
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


def refit_run(data, cfg: TrainConfig, best: RunOutcome, *, progress: Progress | None = None,
              parallel: Any = None) -> RunOutcome:
    """`--refit`: retrain the saved run (its fold and seed) on its train+val conversations for the number of
    epochs selected on validation, keeping the last epoch. Nothing is held out for selection and the test split
    is not scored, so the outcome has no held-out score (its records say so)."""
    from comp.data import FoldPlan, build_conversations, plan_folds

    conversations = build_conversations(data)
    plan = next(p for p in plan_folds(data, cfg) if p.name == best.fold)
    epochs = int(best.main_record.best_epoch)
    merged = FoldPlan(plan.name, tuple(sorted(set(plan.train) | set(plan.val))), (), ())
    refit_cfg = dataclasses.replace(cfg, epochs=epochs)
    device = parallel.device if parallel is not None else resolve_device(cfg.device)
    log.info("refit: run %s on train+val (%d conversations) for %d epochs", best.name, len(merged.train), epochs)
    guard = deterministic(device) if cfg.deterministic else contextlib.nullcontext()
    with guard:
        outcome = fit_run(conversations, merged, refit_cfg, best.seed, task=data.header.task,
                          label_names=list(data.header.label_names), device=device, progress=progress,
                          parallel=parallel)
    for rec in outcome.records:
        rec.selected_on = SELECTED_REFIT
    return outcome
