"""Accuracy metrics of a cost model: errors, rank correlation, and what a search cares about.

``mape`` returns a fraction (0.1 = 10 %); reports multiply by 100. Lower values are better for every
quantity here (energy, latency), so "top k" means the k lowest.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _pair(pred, true) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64).ravel()
    true = np.asarray(true, dtype=np.float64).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"pred and true differ in length: {pred.size} vs {true.size}")
    return pred, true


def mape(pred: Sequence[float], true: Sequence[float]) -> float:
    """Mean absolute percentage error, as a fraction: mean(|pred - true| / |true|)."""
    pred, true = _pair(pred, true)
    if pred.size == 0:
        return float("nan")
    return float(np.mean(np.abs(pred - true) / np.abs(true)))


def spearman(pred: Sequence[float], true: Sequence[float]) -> float:
    """Spearman rank correlation (ties get average ranks); NaN for fewer than 2 points or a constant."""
    from scipy.stats import spearmanr

    pred, true = _pair(pred, true)
    if pred.size < 2 or np.all(pred == pred[0]) or np.all(true == true[0]):
        return float("nan")
    return float(spearmanr(pred, true).statistic)


def kendall(pred: Sequence[float], true: Sequence[float]) -> float:
    from scipy.stats import kendalltau

    pred, true = _pair(pred, true)
    if pred.size < 2:
        return float("nan")
    return float(kendalltau(pred, true).statistic)


def top_k_recall(pred: Sequence[float], true: Sequence[float], k: int) -> float:
    """Fraction of the true k lowest that are among the predicted k lowest (ties by index)."""
    pred, true = _pair(pred, true)
    k = min(int(k), pred.size)
    if k <= 0:
        return float("nan")
    predicted = set(np.argsort(pred, kind="stable")[:k].tolist())
    actual = set(np.argsort(true, kind="stable")[:k].tolist())
    return len(predicted & actual) / k


def best_regret(pred: Sequence[float], true: Sequence[float], k: int = 1) -> float:
    """How much worse (fraction) the truly best of the predicted top k is than the true optimum:
    0 when measuring the model's k favourites finds the best candidate."""
    pred, true = _pair(pred, true)
    if pred.size == 0:
        return float("nan")
    chosen = np.argsort(pred, kind="stable")[: max(1, min(k, pred.size))]
    return float(true[chosen].min() / true.min() - 1.0)


def summary(pred: Sequence[float], true: Sequence[float], k: int = 10) -> dict[str, float]:
    """mape, spearman, kendall, top_k_recall, regret@1 and regret@k in one dict."""
    return {"n": int(np.asarray(true).size), "mape": mape(pred, true), "spearman": spearman(pred, true),
            "kendall": kendall(pred, true), "k": int(k), "top_k_recall": top_k_recall(pred, true, k),
            "regret_at_1": best_regret(pred, true, 1), "regret_at_k": best_regret(pred, true, k)}
