"""Downstream metrics of CTAL's three tasks (numpy in, float out).

emotion (IEMOCAP, 4 classes): WA = `weighted_accuracy`, UA = `unweighted_accuracy`.
sentiment (CMU-MOSEI, regression on [-3, 3]): `mae`, `pearson_corr`, `acc2`, `f1_weighted`, `acc7`,
following the MulT/CTAL evaluation code (binary metrics on non-zero labels only).
speaker (verification): `eer` over trial scores.
"""

import numpy as np
from sklearn.metrics import f1_score, roc_curve


def _check(*arrays, numeric: bool = True) -> list[np.ndarray]:
    out = [np.asarray(a) for a in arrays]
    for a in out:
        if a.ndim != 1:
            raise ValueError(f"expected 1-D arrays, got shape {a.shape}")
        if a.size == 0:
            raise ValueError("expected non-empty arrays")
        if numeric and not np.issubdtype(a.dtype, np.number) and a.dtype != bool:
            raise ValueError(f"expected numeric arrays, got dtype {a.dtype}")
        if np.issubdtype(a.dtype, np.number) and not np.all(np.isfinite(a)):
            raise ValueError("arrays contain NaN or infinite values")
    if len({len(a) for a in out}) != 1:
        raise ValueError(f"arrays differ in length: {[len(a) for a in out]}")
    return out


def weighted_accuracy(y_true, y_pred) -> float:
    """IEMOCAP "WA": plain accuracy over all utterances (classes weighted by their frequency)."""
    y_true, y_pred = _check(y_true, y_pred, numeric=False)
    return float(np.mean(y_true == y_pred))


def unweighted_accuracy(y_true, y_pred) -> float:
    """IEMOCAP "UA": mean per-class recall over the classes present in y_true (balanced accuracy)."""
    y_true, y_pred = _check(y_true, y_pred, numeric=False)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


def mae(y_true, y_pred) -> float:
    """MOSEI mean absolute error of the sentiment score."""
    y_true, y_pred = _check(y_true, y_pred)
    return float(np.mean(np.abs(y_true.astype(np.float64) - y_pred)))


def pearson_corr(y_true, y_pred) -> float:
    """MOSEI "Corr": Pearson correlation; NaN when either side is constant (undefined)."""
    y_true, y_pred = _check(y_true, y_pred)
    x, y = y_true - y_true.mean(dtype=np.float64), y_pred - y_pred.mean(dtype=np.float64)
    denom = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denom) if denom > 0 else float("nan")


def _nonzero_binary(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = _check(y_true, y_pred)
    nonzero = y_true != 0
    if not nonzero.any():
        raise ValueError("all true labels are 0: the non-zero binary split is empty")
    # MulT/CTAL convention: truth > 0 positive, < 0 negative; a prediction of exactly 0 counts negative.
    return y_true[nonzero] > 0, y_pred[nonzero] > 0


def acc2(y_true, y_pred) -> float:
    """MOSEI "Acc-2" (non-zero): on samples with y_true != 0, accuracy of positive (>0) vs negative.

    Predictions are positive when > 0, else negative (so a prediction of 0 is negative).
    """
    truth, pred = _nonzero_binary(y_true, y_pred)
    return float(np.mean(truth == pred))


def f1_weighted(y_true, y_pred) -> float:
    """MOSEI "F1": support-weighted F1 of the same non-zero positive/negative split as `acc2`."""
    truth, pred = _nonzero_binary(y_true, y_pred)
    return float(f1_score(truth, pred, average="weighted", zero_division=0))


def acc7(y_true, y_pred) -> float:
    """MOSEI "Acc-7": accuracy after rounding both sides and clipping to [-3, 3].

    np.round rounds halves to even, as in the MulT evaluation code.
    """
    y_true, y_pred = _check(y_true, y_pred)
    return float(np.mean(np.clip(np.round(y_true), -3, 3) == np.clip(np.round(y_pred), -3, 3)))


def eer(labels, scores) -> float:
    """Speaker verification equal error rate.

    labels: 1 (or True) for target trials, 0 for non-target; scores: higher means more likely target.
    The ROC is walked from strict to lenient thresholds and linearly interpolated where the false
    positive rate meets the false negative rate.
    """
    labels, scores = _check(labels, scores)
    if not np.isin(labels, [0, 1]).all():
        raise ValueError("labels must be 0/1")
    if labels.min() == labels.max():
        raise ValueError("eer needs both target (1) and non-target (0) trials")
    fpr, tpr, _ = roc_curve(labels.astype(int), scores, drop_intermediate=False)
    fnr = 1.0 - tpr
    gap = fnr - fpr  # starts at 1 (nothing accepted), ends at -1 (everything accepted)
    i = int(np.argmax(gap <= 0))
    t = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))
