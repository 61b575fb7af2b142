"""How well scores agree with human ratings: Pearson, Spearman, pairwise accuracy (numpy).

A reward model is checked against people the way Hutto & Gilbert (2014) checked VADER: the
correlation of its scores with the mean human rating of each text, and the share of pairs of
texts that it orders as the raters did.
"""

from __future__ import annotations

import numpy as np

__all__ = ["agreement", "pairwise_accuracy", "pearson", "rankdata", "spearman"]


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 1 or x.shape != y.shape or len(x) < 2:
        raise ValueError(
            f"expected two 1-D arrays of the same length >= 2; got {x.shape} and {y.shape}."
        )
    return x, y


def pearson(x, y) -> float:
    """Pearson's r: ``cov(x, y) / (std(x) std(y))``; nan when either is constant.

    >>> pearson([1, 2, 3], [2, 4, 7])
    0.9933992677987828
    """
    x, y = _pair(x, y)
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    return float(np.sum(dx * dy) / denom) if denom > 0 else float("nan")


def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties getting the mean of the ranks they span (as `scipy.stats.rankdata`).

    >>> rankdata([10, 30, 20, 20]).tolist()
    [1.0, 4.0, 2.5, 2.5]
    """
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # start of each run of equal values, and the mean rank of the run
    starts = np.flatnonzero(np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]]))
    ends = np.concatenate([starts[1:], [len(x)]])
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho: Pearson's r of the ranks (ties averaged).

    >>> spearman([1, 2, 3], [2, 4, 70])
    1.0
    """
    x, y = _pair(x, y)
    return pearson(rankdata(x), rankdata(y))


def pairwise_accuracy(
    scores, targets, *, min_difference: float = 1.0, chunk: int = 1024
) -> tuple[float, int]:
    """Share of pairs whose targets differ by at least ``min_difference`` that scores order so.

    Every unordered pair ``(i, j)`` with ``targets[i] - targets[j] >= min_difference`` counts
    once: 1 if ``scores[i] > scores[j]``, 1/2 for a tie of the scores (as an AUC counts ties),
    0 otherwise. All pairs, not a sample, in chunks of ``chunk`` rows.

    Args:
        scores: ``[n]`` predictions.
        targets: ``[n]`` reference values (mean human ratings).
        min_difference: The smallest target difference that makes a pair; must be positive.
        chunk: Rows compared at a time (memory ``chunk x n``).

    Returns:
        ``(accuracy, number of pairs)``; accuracy is nan when there is no pair.

    >>> pairwise_accuracy([0.1, 0.5, 0.5], [0.0, 2.0, 3.0])
    (0.8333333333333334, 3)
    """
    s, t = _pair(scores, targets)
    if min_difference <= 0:
        raise ValueError(f"min_difference={min_difference} must be positive, so pairs are ordered.")
    right, count = 0.0, 0
    for a in range(0, len(s), chunk):
        better = (t[a : a + chunk, None] - t[None, :]) >= min_difference
        diff = s[a : a + chunk, None] - s[None, :]
        right += np.sum(better & (diff > 0)) + 0.5 * np.sum(better & (diff == 0))
        count += int(np.sum(better))
    return (float(right / count) if count else float("nan")), count


def agreement(scores, targets, *, min_difference: float = 1.0) -> dict[str, float]:
    """``{"pearson", "spearman", "pairwise_accuracy", "pairs"}`` of scores against targets."""
    accuracy, pairs = pairwise_accuracy(scores, targets, min_difference=min_difference)
    return {
        "pearson": pearson(scores, targets),
        "spearman": spearman(scores, targets),
        "pairwise_accuracy": accuracy,
        "pairs": float(pairs),
    }
