"""Agreement metrics against scipy and a brute-force pair loop."""

import itertools

import numpy as np
import pytest
from scipy import stats

from ftlab.posttrain import metrics


def test_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 4, size=200).astype(float)  # many ties
    y = x + rng.normal(0, 2, size=200)
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], rel=1e-12)
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], rel=1e-12)
    np.testing.assert_array_equal(metrics.rankdata(x), stats.rankdata(x))
    assert np.isnan(metrics.pearson(np.ones(3), [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="same length"):
        metrics.pearson([1.0, 2.0], [1.0, 2.0, 3.0])


def test_pairwise_accuracy_counts_every_pair_once_and_ties_as_half():
    rng = np.random.default_rng(1)
    targets = rng.uniform(-4, 4, size=60)
    scores = np.round(targets + rng.normal(0, 2, size=60))  # rounded: tied scores occur
    right, count = 0.0, 0
    for i, j in itertools.combinations(range(60), 2):
        if abs(targets[i] - targets[j]) >= 1.0:
            hi, lo = (i, j) if targets[i] > targets[j] else (j, i)
            count += 1
            right += 1.0 if scores[hi] > scores[lo] else 0.5 if scores[hi] == scores[lo] else 0.0
    got, n = metrics.pairwise_accuracy(scores, targets, min_difference=1.0, chunk=7)
    assert n == count
    assert got == pytest.approx(right / count, rel=1e-12)
    assert metrics.pairwise_accuracy(targets, targets)[0] == 1.0
    assert metrics.pairwise_accuracy(-targets, targets)[0] == 0.0
    with pytest.raises(ValueError, match="min_difference=0"):
        metrics.pairwise_accuracy(scores, targets, min_difference=0)
