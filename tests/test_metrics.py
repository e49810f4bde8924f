"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from ptlab.metrics import compute_metrics


def test_binary_metrics_by_hand():
    preds, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    # tp=2 fp=1 fn=1 tn=2
    metrics = compute_metrics(["acc", "f1", "mcc", "macro_f1"], preds, labels, ["no", "yes"])
    assert metrics["acc"] == pytest.approx(4 / 6)
    assert metrics["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert metrics["mcc"] == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_mcc_is_zero_for_constant_predictions():
    assert compute_metrics(["mcc"], [1, 1, 1], [0, 1, 1], ["a", "b"])["mcc"] == 0.0


def test_regression_metrics_read_verbalizers_as_numbers():
    verbalizers = ["0.0", "1.0", "2.0", "3.0"]
    preds = [0, 1, 2, 3, 3]
    targets = [0.1, 0.9, 2.2, 2.9, 2.9]
    metrics = compute_metrics(["pearson", "spearman"], preds, [0] * 5, verbalizers, target_values=targets)
    assert metrics["pearson"] > 0.99
    # ranks with ties: preds [1,2,3,4.5,4.5], targets [1,2,3,4.5,4.5] -> rho 1
    assert metrics["spearman"] == pytest.approx(1.0)


def test_multirc_exact_match_needs_every_answer_of_a_question_right():
    preds, labels, groups = [1, 0, 1, 1], [1, 0, 0, 1], ["q1", "q1", "q2", "q2"]
    metrics = compute_metrics(["f1a", "em"], preds, labels, ["False", "True"], groups=groups)
    assert metrics["em"] == 0.5
    assert metrics["f1a"] == pytest.approx(2 * 2 / (2 * 2 + 1))
