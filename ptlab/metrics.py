"""Task metrics computed from predicted and gold class indices (GLUE / SuperGLUE definitions)."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np


def accuracy(preds: np.ndarray, labels: np.ndarray, **_) -> float:
    return float((preds == labels).mean())


def _f1(preds: np.ndarray, labels: np.ndarray, positive: int) -> float:
    tp = float(((preds == positive) & (labels == positive)).sum())
    fp = float(((preds == positive) & (labels != positive)).sum())
    fn = float(((preds != positive) & (labels == positive)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def f1(preds: np.ndarray, labels: np.ndarray, **_) -> float:
    """Binary F1 of class 1 (MRPC, QQP)."""
    return _f1(preds, labels, positive=1)


def macro_f1(preds: np.ndarray, labels: np.ndarray, num_classes: int, **_) -> float:
    """Unweighted mean of per-class F1 over every class of the task (CB), a class absent from both
    labels and predictions counting 0, so a split's score does not depend on which classes it holds."""
    return float(np.mean([_f1(preds, labels, c) for c in range(num_classes)]))


def mcc(preds: np.ndarray, labels: np.ndarray, **_) -> float:
    """Matthews correlation for binary labels (CoLA); 0 when a margin is empty."""
    tp = float(((preds == 1) & (labels == 1)).sum())
    tn = float(((preds == 0) & (labels == 0)).sum())
    fp = float(((preds == 1) & (labels == 0)).sum())
    fn = float(((preds == 0) & (labels == 1)).sum())
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else float((tp * tn - fp * fn) / denom)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """0 for a constant side (max == min: a std of equal floats can come out at 1e-17, not 0)."""
    if x.max() == x.min() or y.max() == y.min():
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def pearson(pred_values: np.ndarray, target_values: np.ndarray, **_) -> float:
    """Pearson's r; 0 when either side is constant."""
    return _pearson(pred_values, target_values)


def spearman(pred_values: np.ndarray, target_values: np.ndarray, **_) -> float:
    """Spearman's rho: Pearson's r of the average ranks; 0 when either side is constant."""
    from scipy.stats import rankdata  # here: composing a config checks metric names, without scipy

    return _pearson(rankdata(pred_values), rankdata(target_values))  # ties share their mean rank


def multirc_f1a(preds: np.ndarray, labels: np.ndarray, **_) -> float:
    """F1 over all answer options (MultiRC's F1a)."""
    return _f1(preds, labels, positive=1)


def multirc_em(preds: np.ndarray, labels: np.ndarray, groups: Sequence[str], **_) -> float:
    """Fraction of questions whose answer options are all labelled correctly."""
    correct: Dict[str, bool] = defaultdict(lambda: True)
    for pred, label, group in zip(preds, labels, groups):
        correct[group] &= bool(pred == label)
    return float(np.mean(list(correct.values())))


METRICS: Dict[str, Callable[..., float]] = {
    "acc": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "mcc": mcc,
    "pearson": pearson,
    "spearman": spearman,
    "f1a": multirc_f1a,
    "em": multirc_em,
}


def compute_metrics(
    names: List[str],
    preds: Sequence[int],
    labels: Sequence[int],
    verbalizers: List[str],
    groups: Optional[Sequence[str]] = None,
    target_values: Optional[Sequence[float]] = None,
) -> Dict[str, float]:
    """All requested metrics; regression metrics read the predicted verbalizer as a number."""
    preds_arr, labels_arr = np.asarray(preds), np.asarray(labels)
    extra = {"num_classes": len(verbalizers), "groups": groups}
    if target_values is not None and target_values[0] is not None:
        numeric = np.array([float(v) for v in verbalizers])
        extra["pred_values"] = numeric[np.clip(preds_arr, 0, len(numeric) - 1)]
        extra["target_values"] = np.asarray(target_values, dtype=float)
    return {name: METRICS[name](preds=preds_arr, labels=labels_arr, **extra) for name in names}
