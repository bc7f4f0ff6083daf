"""Metrics of the protocol on hand-computed cases, degenerate inputs, and the summary over runs."""

import math

import numpy as np
import pytest

from comp.metrics import confusion, is_improvement, primary_metric, score, summarize


def test_classification_scores_on_a_hand_computed_case():
    """acc 3/4; UA = mean(2/3, 1); weighted F1 = (3 * 0.8 + 1 * 2/3) / 4."""
    s = score("classification", np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1]), ["a", "b"])
    assert s["acc"] == pytest.approx(0.75)
    assert s["ua"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["wf1"] == pytest.approx((3 * 0.8 + 2 / 3) / 4)


def test_classification_takes_logits():
    """Logits [n, C] are scored through their argmax."""
    logits = np.array([[2.0, 0.1, 0.0], [0.0, 0.2, 3.0], [0.0, 1.0, 0.5]])
    assert score("classification", np.array([0, 2, 2]), logits)["acc"] == pytest.approx(2 / 3)


def test_ua_ignores_classes_absent_from_the_truth():
    """A wrongly predicted class that never occurs does not drag UA down with an undefined recall."""
    s = score("classification", np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]))
    assert s["ua"] == pytest.approx((0.5 + 1.0) / 2)


def test_regression_scores_on_a_hand_computed_case():
    """MAE over all rows; binary scores on y != 0, and on all rows with zero counted positive (MMSA)."""
    y = np.array([1.0, -1.0, 0.0, 2.0, -0.5])
    p = np.array([0.5, -2.0, -0.3, -1.0, 0.0])
    s = score("regression", y, p)
    assert s["mae"] == pytest.approx((0.5 + 1 + 0.3 + 3 + 0.5) / 5)
    # non0: truth T F T F vs pred T F F F (p = 0 is not > 0)
    assert s["acc2_non0"] == pytest.approx(3 / 4)
    assert s["f1_non0"] == pytest.approx(0.5 * (2 / 3) + 0.5 * 0.8)
    # has0 (y >= 0, p >= 0): truth T F T T F vs pred T F F F T
    assert s["acc2_has0"] == pytest.approx(2 / 5)
    assert s["f1_has0"] == pytest.approx(0.4)  # T: P 1/2, R 1/3 -> 0.4; F: P 1/3, R 1/2 -> 0.4


def test_zero_label_and_zero_prediction_count_as_positive_in_has0():
    """MMSA's acc2_has0: y = 0 and p = 0 are both on the positive side, so they agree."""
    s = score("regression", np.array([0.0, -1.0]), np.array([0.0, -1.0]))
    assert s["acc2_has0"] == 1.0
    assert score("regression", np.array([0.0, 1.0]), np.array([-0.1, 1.0]))["acc2_has0"] == 0.5


def test_mae_and_corr_on_all_rows_or_on_the_nonzero_subset():
    """errors_on="all" (clean, MMSA) scores every labelled row; "non0" (faithful, released code) drops y = 0."""
    y = np.array([1.0, 0.0, -2.0, 0.0, 3.0])
    p = np.array([2.0, 5.0, -1.0, -4.0, 1.0])
    every, non0 = score("regression", y, p), score("regression", y, p, errors_on="non0")
    assert every["mae"] == pytest.approx((1 + 5 + 1 + 4 + 2) / 5)
    assert non0["mae"] == pytest.approx((1 + 1 + 2) / 3)
    assert every["corr"] == pytest.approx(np.corrcoef(y, p)[0, 1])
    assert non0["corr"] == pytest.approx(np.corrcoef(y[y != 0], p[y != 0])[0, 1])
    assert {k: every[k] for k in ("acc2_non0", "f1_non0", "acc2_has0")} == \
        {k: non0[k] for k in ("acc2_non0", "f1_non0", "acc2_has0")}
    with pytest.raises(ValueError, match="errors_on"):
        score("regression", y, p, errors_on="zero")


def test_corr_is_pearson():
    """A linear relation gives r = +1 / -1; a known case matches the textbook formula."""
    y = np.array([-2.0, -0.5, 0.4, 1.0, 3.0])
    assert score("regression", y, 2 * y + 1)["corr"] == pytest.approx(1.0)
    assert score("regression", y, -y)["corr"] == pytest.approx(-1.0)
    p = np.array([1.0, 2.0, 0.0, 2.0, 3.0])
    yc, pc = y - y.mean(), p - p.mean()
    assert score("regression", y, p)["corr"] == pytest.approx((yc @ pc) / math.sqrt((yc @ yc) * (pc @ pc)))


def test_degenerate_inputs_give_nan_not_errors():
    """Constant predictions give corr NaN; no rows give NaN everywhere; one class still scores."""
    y = np.array([1.0, -1.0, 2.0])
    assert math.isnan(score("regression", y, np.zeros(3))["corr"])
    assert all(math.isnan(v) for v in score("regression", np.zeros(0), np.zeros(0)).values())
    assert all(math.isnan(v) for v in score("classification", np.zeros(0, int), np.zeros(0, int)).values())
    s = score("classification", np.array([1, 1, 1]), np.array([1, 1, 0]))
    assert s["acc"] == pytest.approx(2 / 3) and s["ua"] == pytest.approx(2 / 3)
    assert math.isnan(score("regression", np.zeros(4), np.ones(4))["acc2_non0"])


def test_unlabelled_rows_are_left_out():
    """Class -1 / value NaN rows do not count."""
    assert score("classification", np.array([0, -1, 1]), np.array([0, 1, 0]))["acc"] == pytest.approx(0.5)
    assert score("regression", np.array([1.0, np.nan]), np.array([0.0, 5.0]))["mae"] == pytest.approx(1.0)


def test_primary_metrics_and_direction():
    """Selection metrics are documented choices; lower MAE is an improvement."""
    assert primary_metric("classification") == "wf1"
    assert primary_metric("classification", "faithful") == "acc"
    assert primary_metric("regression") == "f1_non0"
    assert is_improvement("mae", 0.5, 0.7) and not is_improvement("wf1", 0.5, 0.7)
    assert not is_improvement("acc", float("nan"), 0.1) and is_improvement("acc", 0.1, None)


def test_confusion_counts():
    """Rows are the truth, columns the prediction, every class listed."""
    assert confusion(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3) == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_summarize_mean_std_n():
    """Sample std over runs; NaN runs are dropped from that metric only."""
    s = summarize([{"acc": 0.5, "ua": float("nan")}, {"acc": 0.7, "ua": 0.4}])
    assert s["acc"]["mean"] == pytest.approx(0.6) and s["acc"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert s["acc"]["n"] == 2 and s["ua"] == {"mean": 0.4, "std": 0.0, "n": 1}
