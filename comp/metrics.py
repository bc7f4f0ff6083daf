"""Scores of the protocol (docs/model.md §7), by name, plus the mean ± std summary over runs.

Classification: ``acc`` (overall accuracy, the papers' "ACC"/"WA"), ``ua`` (unweighted accuracy = mean recall over
the classes present in the truth), ``wf1`` (support-weighted F1). The confusion matrix is separate (`confusion`).

Regression (sentiment in [-3, 3]): ``mae`` and ``corr`` (Pearson r) on all labelled utterances, as MMSA does
(`errors_on="all"`, the clean variant), or on the utterances with y != 0 only, as the released ComP code does
(`errors_on="non0"`, the faithful variant, switch `nonzero_mae_corr`); ``acc2_non0``/``f1_non0``: positive vs
negative on utterances with y != 0, predictions thresholded at 0 (y > 0 vs p > 0) - the numbers the papers
report; ``acc2_has0``/``f1_has0``: every utterance, with the MMSA convention that zero counts as positive
(y >= 0 vs p >= 0). F1 is support-weighted, as in the released code and MMSA.

Model selection (`primary_metric`): the paper selects IEMOCAP on ACC and CMU on weighted F1 (non-zero). The clean
variant selects classification on ``wf1`` instead of ``acc``: on the user's own, usually imbalanced, clips a
model that predicts the majority class has a high ACC but a low weighted F1. Regression uses ``f1_non0`` in both
variants, the figure the papers report. Degenerate inputs (no rows, one class, constant predictions) give NaN
for the scores that are undefined there, never an exception.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

CLASSIFICATION_METRICS = ("acc", "ua", "wf1")
REGRESSION_METRICS = ("mae", "corr", "acc2_non0", "f1_non0", "acc2_has0", "f1_has0")
LOWER_IS_BETTER = frozenset({"mae"})


def metric_names(task: str) -> tuple[str, ...]:
    if task == "classification":
        return CLASSIFICATION_METRICS
    if task == "regression":
        return REGRESSION_METRICS
    raise ValueError(f"task must be classification or regression, got {task!r}")


def primary_metric(task: str, variant: str = "clean") -> str:
    """The metric that selects the epoch (see the module docstring for why)."""
    metric_names(task)
    if task == "classification":
        return "acc" if variant == "faithful" else "wf1"
    return "f1_non0"


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def is_improvement(metric: str, new: float, best: float | None) -> bool:
    """True when `new` beats `best` on `metric` (NaN never beats anything; anything beats None/NaN)."""
    if new is None or not math.isfinite(new):
        return False
    if best is None or not math.isfinite(best):
        return True
    return new < best if not higher_is_better(metric) else new > best


def predictions(task: str, y_pred_or_logits: np.ndarray) -> np.ndarray:
    """Class indices from logits [n, C] (or indices [n]); values [n] from [n] or [n, 1]."""
    y = np.asarray(y_pred_or_logits)
    if task == "classification":
        return y.argmax(axis=-1) if y.ndim == 2 else y.astype(np.int64)
    return y.reshape(len(y), -1)[:, 0].astype(np.float64) if y.ndim == 2 else y.astype(np.float64)


def score(task: str, y_true: np.ndarray, y_pred_or_logits: np.ndarray,
          label_names: Sequence[str] = (), *, errors_on: str = "all") -> dict[str, float]:
    """Every metric of `task` by name. Rows without a label (class < 0, value NaN) are left out.

    `errors_on` (regression): "all" computes MAE and Corr on every labelled utterance, "non0" on those with
    y != 0 (the released code's subset)."""
    if errors_on not in ("all", "non0"):
        raise ValueError(f"errors_on must be 'all' or 'non0', got {errors_on!r}")
    metric_names(task)
    y_true = np.asarray(y_true)
    y_pred = predictions(task, y_pred_or_logits)
    if len(y_true) != len(y_pred):
        raise ValueError(f"score: {len(y_true)} targets but {len(y_pred)} predictions")
    if task == "classification":
        keep = y_true >= 0
        return _classification(y_true[keep].astype(np.int64), y_pred[keep])
    keep = np.isfinite(y_true.astype(np.float64))
    return _regression(y_true[keep].astype(np.float64), y_pred[keep], errors_on)


def _classification(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    if len(y) == 0:
        return {k: math.nan for k in CLASSIFICATION_METRICS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on classes never predicted; zero_division says what to do
        return {
            "acc": float(accuracy_score(y, p)),
            "ua": float(recall_score(y, p, labels=np.unique(y), average="macro", zero_division=0)),
            "wf1": float(f1_score(y, p, average="weighted", zero_division=0)),
        }


def pearson(y: np.ndarray, p: np.ndarray) -> float:
    """Pearson r; NaN when either side is constant or there are fewer than two rows."""
    if len(y) < 2:
        return math.nan
    yc, pc = y - y.mean(), p - p.mean()
    denom = math.sqrt(float(np.dot(yc, yc)) * float(np.dot(pc, pc)))
    return float(np.dot(yc, pc) / denom) if denom > 0 else math.nan


def _binary(truth: np.ndarray, guess: np.ndarray) -> tuple[float, float]:
    if len(truth) == 0:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accuracy_score(truth, guess)), float(f1_score(truth, guess, average="weighted",
                                                                     zero_division=0))


def _regression(y: np.ndarray, p: np.ndarray, errors_on: str = "all") -> dict[str, float]:
    non0 = y != 0
    ye, pe = (y[non0], p[non0]) if errors_on == "non0" else (y, p)
    out = {"mae": float(np.mean(np.abs(ye - pe))) if len(ye) else math.nan, "corr": pearson(ye, pe)}
    out["acc2_non0"], out["f1_non0"] = _binary(y[non0] > 0, p[non0] > 0)
    out["acc2_has0"], out["f1_has0"] = _binary(y >= 0, p >= 0)  # MMSA: zero is on the positive side
    return out


def confusion(y_true: np.ndarray, y_pred_or_logits: np.ndarray, n_classes: int) -> list[list[int]]:
    """[n_classes x n_classes] counts, rows = truth, columns = prediction; unlabelled rows (< 0) left out."""
    y = np.asarray(y_true)
    p = predictions("classification", y_pred_or_logits)
    keep = y >= 0
    return confusion_matrix(y[keep], p[keep], labels=np.arange(n_classes)).astype(int).tolist()


def summarize(results: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {mean, std, n}} over runs (seeds x folds); NaN results are left out, std is the sample std."""
    names: list[str] = []
    for r in results:
        names.extend(k for k in r if k not in names)
    out = {}
    for k in names:
        vals = np.array([float(r[k]) for r in results if k in r and r[k] is not None], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        out[k] = {"mean": float(vals.mean()) if len(vals) else math.nan,
                  "std": float(vals.std(ddof=1)) if len(vals) > 1 else (0.0 if len(vals) else math.nan),
                  "n": int(len(vals))}
    return out
