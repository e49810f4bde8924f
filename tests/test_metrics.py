"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from ptlab.config.schema import TaskConfig
from ptlab.data.examples import Example
from ptlab.metrics import compute_metrics
from ptlab.training.evaluate import baseline_metrics


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


def examples(labels, values=None):
    return [
        Example([1], label, target_value=(values or [None] * len(labels))[i])
        for i, label in enumerate(labels)
    ]


def test_the_floor_is_the_majority_class_in_every_metric_of_the_task():
    cola = TaskConfig(
        name="cola", template="{s}", verbalizers=["no", "yes"], metrics=["mcc", "acc"], main_metric="mcc"
    )
    assert baseline_metrics(cola, examples([1, 1, 0, 1])) == {
        "name": "majority class",
        "mcc": 0.0,
        "acc": 0.75,
    }
    cb = TaskConfig(name="cb", template="{s}", verbalizers=["e", "c", "n"], metrics=["acc", "macro_f1"],
                    main_metric="acc")  # fmt: skip
    floor = baseline_metrics(cb, examples([0, 0, 1, 2, 2, 2]))
    assert floor["acc"] == pytest.approx(0.5) and floor["macro_f1"] == pytest.approx(
        (2 * 3 / (2 * 3 + 3)) / 3
    )


def test_the_floor_of_a_regression_task_is_the_mean_predictor():
    stsb = TaskConfig(name="stsb", template="{s}", verbalizers=["0.0", "1.0", "2.0", "3.0"],
                      metrics=["pearson", "spearman", "acc"], main_metric="pearson")  # fmt: skip
    values = [0.0, 1.0, 3.0, 3.0]  # mean 1.75: the constant prediction is "2.0", class 2
    floor = baseline_metrics(stsb, examples([0, 1, 3, 3], values))
    assert floor == {"name": "mean predictor", "pearson": 0.0, "spearman": 0.0, "acc": 0.0}


def test_a_constant_prediction_correlates_exactly_zero_even_where_floats_round():
    metrics = compute_metrics(["pearson"], [11] * 7, [0] * 7, [f"{i / 5:.1f}" for i in range(26)],
                              target_values=[0.1, 4.2, 2.2, 3.3, 1.9, 0.0, 5.0])  # fmt: skip
    assert metrics["pearson"] == 0.0
