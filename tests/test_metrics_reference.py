"""ptlab's metrics against independent implementations (scikit-learn, scipy, pandas) on random
labels, including splits that miss one of the task's classes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import f1_score, matthews_corrcoef

from ptlab.metrics import compute_metrics

SEEDS = range(20)


def draw(seed: int, classes: int, missing: bool):
    """Random predictions and labels over `classes` classes; `missing`: the labels never hold the
    last class (a small validation split), though predictions may."""
    rng = np.random.default_rng(seed)
    size = int(rng.integers(5, 60))
    labels = rng.integers(0, classes - 1 if missing else classes, size)
    preds = rng.integers(0, classes, size)
    return preds, labels


@pytest.mark.parametrize("missing", [False, True], ids=["all-classes", "a-class-missing"])
@pytest.mark.parametrize("classes", [2, 3])
def test_f1_macro_f1_and_mcc_equal_scikit_learns_over_every_class_of_the_task(classes, missing):
    verbalizers = [f"c{i}" for i in range(classes)]
    for seed in SEEDS:
        preds, labels = draw(seed, classes, missing)
        ours = compute_metrics(["f1", "macro_f1", "mcc", "f1a"], preds, labels, verbalizers)
        macro = f1_score(labels, preds, labels=range(classes), average="macro", zero_division=0)
        assert ours["macro_f1"] == pytest.approx(macro, abs=1e-12)
        if classes == 2:
            binary = f1_score(labels, preds, pos_label=1, zero_division=0)
            assert ours["f1"] == pytest.approx(binary, abs=1e-12)
            assert ours["f1a"] == pytest.approx(binary, abs=1e-12)
            assert ours["mcc"] == pytest.approx(matthews_corrcoef(labels, preds), abs=1e-12)


def test_macro_f1_counts_a_class_the_split_lacks_as_zero_unlike_scikit_learns_default():
    preds, labels = np.array([0, 1, 1, 0]), np.array([0, 1, 1, 0])  # class 2 in neither
    assert compute_metrics(["macro_f1"], preds, labels, ["a", "b", "c"])["macro_f1"] == pytest.approx(2 / 3)
    assert f1_score(labels, preds, average="macro") == 1.0  # scikit-learn's default: the labels present


def test_pearson_and_spearman_equal_scipys_and_are_zero_on_constant_input():
    verbalizers = [f"{i / 5:.1f}" for i in range(26)]  # STS-B's
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        size = int(rng.integers(5, 60))
        preds = rng.integers(0, 8, size)  # few classes: many ties in the ranks
        targets = np.round(rng.uniform(0, 5, size), 1)
        targets[: size // 3] = targets[0]  # tied targets too
        ours = compute_metrics(["pearson", "spearman"], preds, [0] * size, verbalizers, target_values=targets)
        values = np.array([float(verbalizers[p]) for p in preds])
        assert ours["pearson"] == pytest.approx(stats.pearsonr(values, targets).statistic, abs=1e-12)
        assert ours["spearman"] == pytest.approx(stats.spearmanr(values, targets).statistic, abs=1e-12)
    constant = compute_metrics(["pearson", "spearman"], [3] * 6, [0] * 6, verbalizers,
                               target_values=[0.5, 1.0, 2.0, 3.5, 4.0, 1.5])  # fmt: skip
    assert constant == {"pearson": 0.0, "spearman": 0.0}


def test_multirc_em_is_the_share_of_questions_with_every_answer_right():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        size = int(rng.integers(5, 60))
        groups = [f"q{g}" for g in rng.integers(0, 8, size)]
        preds, labels = rng.integers(0, 2, size), rng.integers(0, 2, size)
        ours = compute_metrics(["em"], preds, labels, ["False", "True"], groups=groups)["em"]
        frame = pd.DataFrame({"question": groups, "right": preds == labels})
        assert ours == pytest.approx(frame.groupby("question")["right"].all().mean(), abs=1e-12)
