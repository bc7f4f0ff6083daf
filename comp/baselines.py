"""Simple baselines fitted beside ComP in every comp-train run, to tell when the model earns its complexity.

Every baseline is a scikit-learn linear model (logistic regression for classification, ridge regression for
regression) fitted on exactly what the training loop (`comp.train.fit_run`) uses:

* the same evaluation plans (`comp.data.plan_folds`, the paper protocol's plan for the faithful variant) and
  seeds (cfg.seed + i);
* the same feature normalisation (`comp.data.Normalizer` fitted on the training conversations);
* the same validation and test masks (`comp.masks.mask_conversations` with the base seed cfg.seed), scored
  per condition and pooled over several fixed conditions under the loop's condition names;
* training rows masked like the loop's training batches, but with one draw per seed (from
  `comp.seeding.mask_rng(seed)`) instead of a fresh draw per batch and epoch.

The regularisation strength C (ridge: alpha = 1 / C) is chosen on the plan's validation conversations with
the loop's selection metric, from `C_GRID`; without validation conversations C = `DEFAULT_C`. Under the
faithful variant the plan's validation set is its test set, as it is for ComP ("test (paper protocol)").

Feature sets (`BASELINES`):

* ``linear``: the three modalities' normalised features concatenated, absent ones zero;
* ``linear+mask``: plus the three presence bits;
* ``linear+mask+context``: plus, per modality, the mean of the normalised features over the utterances of
  the same conversation where that modality is present after masking (the utterance itself included; zero
  when none is) - the cheapest possible use of the conversation ComP attends over;
* ``audio`` / ``text`` / ``visual``: one modality's features alone. An utterance without it gets the zero
  vector (the training mean), so its prediction comes from the intercept alone.

Cost: each modality's normalised features are first projected on their top `MAX_COMPONENTS` principal
directions (PCA on the present training rows, orthonormal, no whitening; a modality with fewer dimensions is
kept whole). Since the Normalizer already centres those rows and the directions are orthonormal, an
L2-penalised linear model on the projection is the same model restricted to that subspace, and absent rows
stay zero. It turns fits on IEMOCAP-sized embeddings (512 + 1024 + 1024 dimensions) from minutes into seconds.
The fits also run on one BLAS/OpenMP thread (`threadpoolctl`): the problems are small, and on a machine
busy with other work, threads spin-waiting on each other made them about 20 times slower.

Presence bits and context columns are standardised on the training rows (StandardScaler) so that the L2
penalty treats them like the normalised features. Only labelled utterances are fitted and scored; unlabelled
ones still count in their conversation's context. Solvers are deterministic, so seeds whose training masks
coincide (``natural``) are fitted once and the result is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.dummy import DummyClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from comp import masks
from comp.config import TrainConfig
from comp.data import Conversation, FoldPlan, Normalizer, build_conversations, plan_folds, select
from comp.metrics import confusion, is_improvement, metric_names, primary_metric, score, summarize
from comp.results import BaselineResult, BaselineRun
from comp.seeding import mask_rng
from comp.selection import SELECTED_ON_TEST, SELECTED_ON_VAL
from core.clip import MODALITIES
from core.records import StoreData

log = logging.getLogger(__name__)

C_GRID = (0.003, 0.03, 0.3, 3.0)  # ascending: on a tie the stronger regularisation is kept
DEFAULT_C = 1.0  # when the plan has no validation conversations to choose C on
MAX_COMPONENTS = 128  # principal directions kept per modality (see the module docstring)
MAX_ITER = 300  # lbfgs iterations per fit; warm starts along C_GRID make later fits converge in far fewer
NO_VAL = f"no val (C={DEFAULT_C:g})"


@dataclass(frozen=True)
class BaselineSpec:
    """Which columns a baseline's design matrix has."""

    name: str
    modalities: tuple[str, ...]
    mask_bits: bool
    context: bool
    description: str


BASELINES: tuple[BaselineSpec, ...] = (
    BaselineSpec("linear", MODALITIES, False, False,
                 "linear model on the concatenated modalities, absent ones zero"),
    BaselineSpec("linear+mask", MODALITIES, True, False, "linear + the three presence bits"),
    BaselineSpec("linear+mask+context", MODALITIES, True, True,
                 "linear+mask + each modality's mean over the present utterances of the conversation"),
    *(BaselineSpec(m, (m,), False, False, f"{m} features alone (absent: intercept only)") for m in MODALITIES),
)


# ------------------------------------------------------------------------------------------ row blocks

@dataclass(frozen=True, eq=False)
class Rows:
    """Per-utterance arrays of a list of (normalised, masked) conversations, in conversation order."""

    features: Mapping[str, np.ndarray]  # modality -> float32 [n, D_m], zero where absent
    context: Mapping[str, np.ndarray]  # modality -> float32 [n, D_m]: conversation mean of present rows
    present: np.ndarray  # bool [n, 3]
    targets: np.ndarray  # [n]
    labelled: np.ndarray  # bool [n]


def conversation_rows(conversations: Sequence[Conversation]) -> Rows:
    """Stack conversations' utterances and compute each modality's conversation mean over present rows."""
    feats = {m: np.concatenate([c.features[m] for c in conversations]) for m in MODALITIES}
    present = np.concatenate([c.present for c in conversations])
    lengths = np.array([len(c) for c in conversations])
    owner = np.repeat(np.arange(len(conversations)), lengths)
    context = {}
    for i, m in enumerate(MODALITIES):
        keep = present[:, i]
        sums = np.zeros((len(conversations), feats[m].shape[1]), dtype=np.float64)
        np.add.at(sums, owner[keep], feats[m][keep])
        counts = np.bincount(owner[keep], minlength=len(conversations))[:, None]
        means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        context[m] = means[owner].astype(np.float32)
    return Rows(features=feats, context=context, present=present,
                targets=np.concatenate([c.targets for c in conversations]),
                labelled=np.concatenate([c.labelled for c in conversations]))


def principal_directions(conversations: Sequence[Conversation],
                          max_components: int = MAX_COMPONENTS) -> dict[str, np.ndarray | None]:
    """Per modality, orthonormal rows [k, D] spanning the top-k principal directions of the present rows
    (None: the modality has at most `max_components` dimensions, or too few rows, and is kept whole)."""
    out: dict[str, np.ndarray | None] = {}
    for i, m in enumerate(MODALITIES):
        rows = np.concatenate([c.features[m][c.present[:, i]] for c in conversations])
        k = min(max_components, len(rows) - 1)
        if rows.shape[1] <= max_components or k < 1:
            out[m] = None
            continue
        pca = PCA(n_components=k, svd_solver="randomized", random_state=0).fit(rows)
        out[m] = pca.components_.astype(np.float32)
    return out


def project(conversations: Sequence[Conversation],
            directions: Mapping[str, np.ndarray | None]) -> list[Conversation]:
    """Conversations with each modality's features on `directions` (no centring: absent rows stay zero)."""
    return [dataclasses.replace(c, features={m: c.features[m] if directions[m] is None
                                             else c.features[m] @ directions[m].T for m in MODALITIES})
            for c in conversations]


def design(rows: Rows, spec: BaselineSpec) -> tuple[np.ndarray, np.ndarray]:
    """(normalised feature columns, extra columns to standardise) of the labelled rows."""
    lab = rows.labelled
    base = np.concatenate([rows.features[m][lab] for m in spec.modalities], axis=1)
    extra = []
    if spec.mask_bits:
        extra.append(rows.present[lab].astype(np.float32))
    if spec.context:
        extra.extend(rows.context[m][lab] for m in spec.modalities)
    more = np.concatenate(extra, axis=1) if extra else np.zeros((int(lab.sum()), 0), np.float32)
    return base, more


# ------------------------------------------------------------------------------------------------ masks

def train_conversations(conversations: Sequence[Conversation], spec: masks.MissingSpec,
                        rng: np.random.Generator) -> list[Conversation]:
    """Training conversations with one simulated mask draw (as `Missingness.train_batch` draws per batch).

    Several fixed conditions: each utterance gets one of them at random. The draw is ANDed with the
    natural flags; features of removed modalities are zeroed."""
    if spec.kind == "natural":
        return list(conversations)
    natural = np.concatenate([c.present for c in conversations])
    n = len(natural)
    if spec.kind == "fixed" and len(spec.conditions) > 1:
        table = np.stack([masks.condition_mask(c, 1)[0] for c in spec.conditions])
        simulated = table[rng.integers(0, len(spec.conditions), size=n)]
    else:
        simulated = spec.simulate(n, rng)
    mask, _ = masks.combine(natural, simulated)
    bounds = np.cumsum([0] + [len(c) for c in conversations])
    return [c.with_present(mask[a:b]) for c, a, b in zip(conversations, bounds[:-1], bounds[1:])]


def evaluation_sets(conversations: Sequence[Conversation], spec: masks.MissingSpec,
                    seed: int) -> dict[str, list[Conversation]]:
    """Condition label -> the conversations under that condition's fixed test mask (the loop's `fixed_sets`)."""
    if not conversations:
        return {}
    return {cond.label: masks.mask_conversations(conversations, cond, seed)[0] for cond in _conditions(spec)}


def _conditions(spec: masks.MissingSpec) -> list[masks.MissingSpec]:
    return spec.runs() if spec.kind == "fixed" else [spec]


def condition_labels(spec: masks.MissingSpec) -> list[str]:
    """The loop's record names: each condition, plus "pooled" when there are several (last = main)."""
    labels = [c.label for c in _conditions(spec)]
    return labels + ["pooled"] if len(labels) > 1 else labels


# ------------------------------------------------------------------------------------------------ models

class _Model:
    """One baseline's regressor or classifier along C_GRID, with its own scaler for the extra columns."""

    def __init__(self, task: str, n_outputs: int) -> None:
        self.task, self.n_outputs = task, n_outputs
        self.scaler: StandardScaler | None = None
        self.estimator: Any = None

    def prepare(self, base: np.ndarray, extra: np.ndarray) -> np.ndarray:
        if extra.shape[1] == 0:
            return base
        if self.scaler is None:
            self.scaler = StandardScaler().fit(extra)
        return np.concatenate([base, self.scaler.transform(extra).astype(np.float32)], axis=1)

    def fit(self, x: np.ndarray, y: np.ndarray, c: float) -> None:
        if self.task == "regression":
            self.estimator = Ridge(alpha=1.0 / c).fit(x, y)
            return
        if len(np.unique(y)) < 2:
            log.warning("only one class among the labelled training utterances; the baseline predicts it")
            self.estimator = DummyClassifier(strategy="most_frequent").fit(x, y)
            return
        if not isinstance(self.estimator, LogisticRegression):
            self.estimator = LogisticRegression(C=c, max_iter=MAX_ITER, warm_start=True)
        self.estimator.set_params(C=c)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            self.estimator.fit(x, y)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            log.debug("logistic regression (C=%g) stopped at max_iter=%d before converging", c, MAX_ITER)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class indices (classification) or values (regression)."""
        return np.asarray(self.estimator.predict(x))


def _predict_sets(model: _Model, sets: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  labels: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(targets, predictions) per condition, plus "pooled" over all of them (as `pool_results`)."""
    out = {label: (y, model.predict(x) if len(y) else np.zeros(0)) for label, (x, y) in sets.items()}
    if "pooled" in labels:
        out["pooled"] = (np.concatenate([y for y, _ in out.values()]),
                         np.concatenate([p for _, p in out.values()]))
    return out


def _score_sets(model: _Model, sets: Mapping[str, tuple[np.ndarray, np.ndarray]], task: str,
                labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Scores per condition, plus "pooled" over all of them (predictions concatenated, as `pool_results`)."""
    return {label: score(task, y, p) for label, (y, p) in _predict_sets(model, sets, labels).items()}


# ------------------------------------------------------------------------------------------------- runs

def _fit_baseline(spec: BaselineSpec, train: Rows, val: Mapping[str, Rows], test: Mapping[str, Rows], *,
                  task: str, n_outputs: int, metric: str, labels: Sequence[str],
                  selected_on: str) -> dict[str, Any]:
    """Fit one baseline along C_GRID, choose C on validation, score the test conditions."""
    model = _Model(task, n_outputs)
    base, extra = design(train, spec)
    x_train = model.prepare(base, extra)
    y_train = train.targets[train.labelled]

    def matrices(sets: Mapping[str, Rows]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {k: (model.prepare(*design(r, spec)), r.targets[r.labelled]) for k, r in sets.items()}

    val_m, test_m = matrices(val), matrices(test)
    main = labels[-1]
    grid = C_GRID if val_m else (DEFAULT_C,)
    best_c, best_score, best_tests, best_confusion = grid[0], None, None, None
    for c in grid:
        model.fit(x_train, y_train, c)
        value = _score_sets(model, val_m, task, labels)[main][metric] if val_m else math.nan
        if best_tests is None or is_improvement(metric, value, best_score):
            best_c, best_score = c, (value if math.isfinite(value) else best_score)
            predicted = _predict_sets(model, test_m, labels)
            best_tests = {k: score(task, y, p) for k, (y, p) in predicted.items()}
            best_confusion = ({k: confusion(y, p, n_outputs) if len(y) else None for k, (y, p) in predicted.items()}
                              if task == "classification" else None)
    return {"C": best_c, "val_score": best_score, "selected_on": selected_on if val_m else NO_VAL,
            "tests": best_tests, "confusion": best_confusion}


def _mask_key(conversations: Sequence[Conversation]) -> str:
    h = hashlib.sha256()
    for c in conversations:
        h.update(np.ascontiguousarray(c.present).tobytes())
    return h.hexdigest()


def run_baselines(*, data: StoreData, cfg: TrainConfig) -> dict[str, BaselineResult]:
    """Fit and score every baseline on the training loop's folds, seeds and masks: {name: its result}, the
    summary on the main condition as ComP's. The caller stores them in metrics.json."""
    task = data.header.task
    label_names = list(data.header.label_names)
    n_outputs = len(label_names) if task == "classification" else 1
    spec = masks.parse_missing(cfg.missing)
    paper = bool(cfg.model.resolved.test_selection)
    metric = cfg.selection_metric or primary_metric(task, cfg.model.variant)
    if metric not in metric_names(task):
        raise ValueError(f"selection_metric {metric!r} is not a {task} metric; use one of "
                         f"{list(metric_names(task))} or leave it empty")
    labels = condition_labels(spec)
    conversations = build_conversations(data)
    plans = plan_folds(data, cfg, paper_protocol=paper)
    selected_on = SELECTED_ON_TEST if paper else SELECTED_ON_VAL

    runs: dict[str, list[BaselineRun]] = {b.name: [] for b in BASELINES}
    seconds = {b.name: 0.0 for b in BASELINES}
    with threadpool_limits(limits=1):
        for plan in plans:
            _run_plan(plan, conversations, cfg, spec, task, n_outputs, metric, labels, selected_on, runs,
                      seconds)

    out: dict[str, BaselineResult] = {}
    for b in BASELINES:
        by_condition = {c: summarize([r.test for r in runs[b.name] if r.condition == c]) for c in labels}
        out[b.name] = BaselineResult(description=b.description, seconds=seconds[b.name],
                                     summary=by_condition[labels[-1]], summary_by_condition=by_condition,
                                     runs=runs[b.name])
        log.info("baseline %-20s %s %s (%.1fs)", b.name, metric,
                 _fmt_mean(by_condition[labels[-1]].get(metric)), seconds[b.name])
    return out


def _run_plan(plan: FoldPlan, conversations: Sequence[Conversation], cfg: TrainConfig, spec: masks.MissingSpec,
              task: str, n_outputs: int, metric: str, labels: Sequence[str], selected_on: str,
              runs: dict[str, list[BaselineRun]], seconds: dict[str, float]) -> None:
    """Every seed x baseline of one plan; results appended to `runs`, fit time added to `seconds`."""
    train_c = select(conversations, plan.train)
    normalizer = Normalizer.fit(train_c)
    train_n = normalizer.apply(train_c)
    directions = principal_directions(train_n)
    train_n = project(train_n, directions)
    val_c = project(normalizer.apply(select(conversations, plan.val)), directions) if plan.val else []
    test_c = project(normalizer.apply(select(conversations, plan.test)), directions)
    val_rows = {k: conversation_rows(v) for k, v in evaluation_sets(val_c, spec, cfg.seed).items()}
    test_rows = {k: conversation_rows(v) for k, v in evaluation_sets(test_c, spec, cfg.seed).items()}
    if not np.concatenate([c.labelled for c in train_c]).any():
        raise ValueError(f"fold {plan.name}: no labelled training utterance; label the clips in the store")
    cache: dict[tuple[str, str], dict[str, Any]] = {}
    for i in range(cfg.seeds):
        seed = cfg.seed + i
        masked = train_conversations(train_n, spec, mask_rng(seed))
        key = _mask_key(masked)
        train_rows = None
        for b in BASELINES:
            fit = cache.get((b.name, key))
            if fit is None:  # a new training mask (always, except where masks coincide, e.g. natural)
                train_rows = train_rows or conversation_rows(masked)
                t0 = time.perf_counter()
                fit = _fit_baseline(b, train_rows, val_rows, test_rows, task=task, n_outputs=n_outputs,
                                    metric=metric, labels=labels, selected_on=selected_on)
                seconds[b.name] += time.perf_counter() - t0
                cache[(b.name, key)] = fit
            for cond in labels:
                runs[b.name].append(BaselineRun(fold=plan.name, seed=seed, condition=cond, C=fit["C"],
                                                selected_on=fit["selected_on"], val_score=fit["val_score"],
                                                test=fit["tests"][cond],
                                                confusion=fit["confusion"][cond] if fit["confusion"] else None))


def _fmt_mean(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None or not math.isfinite(entry["mean"]):
        return "nan"
    return f"{entry['mean']:.4f} +- {entry['std']:.4f}"


__all__ = ["BASELINES", "BaselineSpec", "C_GRID", "run_baselines", "conversation_rows", "design",
           "evaluation_sets", "train_conversations", "condition_labels", "principal_directions", "project"]
