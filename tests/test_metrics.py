import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score,
                             mean_absolute_error)

from ctal import metrics


def _classes(seed: int, n: int = 500):
    rng = np.random.default_rng(seed)
    y_true = rng.choice(4, size=n, p=[0.5, 0.2, 0.2, 0.1])  # imbalanced, as IEMOCAP's 4 classes
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, 4, n))
    return y_true, y_pred


def _sentiment(seed: int, n: int = 400):
    rng = np.random.default_rng(seed)
    y_true = np.round(rng.uniform(-3, 3, n) * 3) / 3  # MOSEI labels are averages of 3 annotators
    y_true[:40] = 0.0
    y_pred = y_true + rng.normal(0, 1.0, n)
    y_pred[:5] = 0.0  # zero predictions count as negative
    return y_true, y_pred


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_sklearn(seed):
    y_true, y_pred = _classes(seed)
    assert metrics.weighted_accuracy(y_true, y_pred) == pytest.approx(accuracy_score(y_true, y_pred))
    ua = balanced_accuracy_score(y_true, y_pred)
    assert metrics.unweighted_accuracy(y_true, y_pred) == pytest.approx(ua)


def test_label_names_work_for_accuracy():
    y_true = np.array(["neu", "hap", "ang", "sad", "neu"])
    y_pred = np.array(["neu", "neu", "ang", "sad", "neu"])
    assert metrics.weighted_accuracy(y_true, y_pred) == pytest.approx(0.8)
    assert metrics.unweighted_accuracy(y_true, y_pred) == pytest.approx(0.75)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sentiment_metrics_match_references(seed):
    y_true, y_pred = _sentiment(seed)
    assert metrics.mae(y_true, y_pred) == pytest.approx(mean_absolute_error(y_true, y_pred))
    assert metrics.pearson_corr(y_true, y_pred) == pytest.approx(pearsonr(y_true, y_pred)[0])
    nz = y_true != 0
    truth, pred = y_true[nz] > 0, y_pred[nz] > 0
    assert metrics.acc2(y_true, y_pred) == pytest.approx(accuracy_score(truth, pred))
    assert metrics.f1_weighted(y_true, y_pred) == pytest.approx(f1_score(truth, pred, average="weighted"))
    r = lambda y: np.clip(np.round(y), -3, 3)  # noqa: E731
    assert metrics.acc7(y_true, y_pred) == pytest.approx(accuracy_score(r(y_true), r(y_pred)))


def test_binary_split_conventions():
    y_true = np.array([0.0, 1.0, -1.0, 2.0, -0.4])
    y_pred = np.array([5.0, 0.0, -2.0, 0.1, 0.3])
    # zero truth is dropped; pred 0 is negative → [F, T, T, F]
    assert metrics.acc2(y_true, y_pred) == pytest.approx(0.5)
    assert metrics.acc7(np.array([3.6, -2.5, 0.5]), np.array([3.0, -2.0, 0.0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-zero"):
        metrics.acc2(np.zeros(3), np.ones(3))


def _eer_brute_force(labels, scores):
    """EER by sweeping every threshold (accept score >= thr); midpoint where |FAR - FRR| is smallest."""
    best = (np.inf, None)
    for thr in np.concatenate([np.unique(scores), [np.inf]]):
        accept = scores >= thr
        far = np.mean(accept[labels == 0])
        frr = np.mean(~accept[labels == 1])
        best = min(best, (abs(far - frr), (far + frr) / 2), key=lambda b: b[0])
    return best[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eer_matches_threshold_sweep(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 2000)
    scores = rng.normal(0, 1, 2000) + 1.5 * labels
    # the sweep is exact only up to one step of the empirical ROC
    assert metrics.eer(labels, scores) == pytest.approx(_eer_brute_force(labels, scores), abs=2e-3)
    assert 0.15 < metrics.eer(labels, scores) < 0.30  # two unit Gaussians 1.5 apart: EER ≈ 0.227


def test_eer_edge_cases():
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert metrics.eer(labels, np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])) == 0.0
    assert metrics.eer(labels, np.array([0.7, 0.8, 0.9, 0.1, 0.2, 0.3])) == 1.0
    assert metrics.eer(labels, np.full(6, 0.5)) == pytest.approx(0.5)  # all tied: chance
    with pytest.raises(ValueError, match="both"):
        metrics.eer(np.ones(4), np.arange(4.0))


@pytest.mark.parametrize("fn", [metrics.weighted_accuracy, metrics.unweighted_accuracy, metrics.mae,
                                metrics.pearson_corr, metrics.acc2, metrics.f1_weighted, metrics.acc7,
                                metrics.eer])
def test_inputs_are_validated(fn):
    with pytest.raises(ValueError, match="length"):
        fn(np.array([0, 1, 1]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="non-empty"):
        fn(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="NaN"):
        fn(np.array([0, 1]), np.array([np.nan, 1.0]))


def test_pearson_of_constant_prediction_is_nan():
    assert np.isnan(metrics.pearson_corr(np.array([1.0, 2.0, 3.0]), np.zeros(3)))
