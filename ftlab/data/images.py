"""Small labelled image sets shipped inside installed packages, with seeded label subsets.

    splits = images.load("digits", test_fraction=0.2, seed=0)
    idx = images.label_subset(splits["train"].label, fraction=0.01, seed=0)  # >= 1 per class
    x, y = splits["train"].images[idx], splits["train"].label[idx]

Data sets (add one by adding a loader to `DATASETS`):
    digits: scikit-learn's bundled `load_digits` (UCI optdigits): 1,797 grey 8x8 images, 10
            classes of 174-183 images, pixel values 0-16 (scaled here to [0, 1]). Nothing is
            downloaded: the CSV is inside the scikit-learn wheel.

Splits are stratified (each class is split in the same proportion) and a pure function of the
seed. Label subsets are drawn per class, so every class keeps at least one label, and the subsets
of one seed are nested: the 1% subset lies inside the 10% subset, which lies inside 100%.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

__all__ = ["Split", "DATASETS", "load", "label_subset"]


class Split(NamedTuple):
    """One split of an image data set.

    Attributes:
      images: float32 ``[n, height, width]`` with values in [0, 1].
      label: int32 ``[n]`` class indices.
      index: int64 ``[n]`` row of each example in the full data set (for provenance and tests).
    """

    images: np.ndarray
    label: np.ndarray
    index: np.ndarray


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn import datasets  # noqa: PLC0415 - optional dependency, imported on use
    except ImportError:
        raise ImportError(
            "the digits data set comes with scikit-learn, which is not installed; "
            "`pip install 'ftlab[data]'` (or `pip install scikit-learn`)."
        ) from None
    digits = datasets.load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int32)


# name -> loader returning (images [n, h, w] float32 in [0, 1], labels [n] int32 in 0..C-1)
DATASETS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {"digits": _load_digits}


def load(name: str = "digits", *, test_fraction: float = 0.2, seed: int = 0) -> dict[str, Split]:
    """Loads a data set and splits it into ``{"train": Split, "test": Split}``, stratified.

    Args:
      name: a key of `DATASETS`.
      test_fraction: share of each class that goes to the test split, in (0, 1); each class
        puts ``round(test_fraction * n_class)`` examples (at least one) in test.
      seed: the split's seed; the same seed gives the same split on every machine.

    Returns:
      Train and test splits; examples within a split are in their original data set order.

    Raises:
      ValueError: an unknown ``name`` or a ``test_fraction`` outside (0, 1).

    >>> splits = load("digits", test_fraction=0.2, seed=0)
    >>> splits["train"].images.shape, splits["test"].images.shape
    ((1438, 8, 8), (359, 8, 8))
    """
    if name not in DATASETS:
        raise ValueError(f"name={name!r}; known image data sets: {sorted(DATASETS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction}: expected a value in (0, 1)")
    images, labels = DATASETS[name]()
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test.append(members[: max(1, round(test_fraction * len(members)))])
    is_test = np.zeros(len(labels), bool)
    is_test[np.concatenate(test)] = True
    return {
        name: Split(images[idx], labels[idx], idx)
        for name, idx in (("train", np.flatnonzero(~is_test)), ("test", np.flatnonzero(is_test)))
    }


def label_subset(label: np.ndarray, *, fraction: float, seed: int) -> np.ndarray:
    """Indices of a labelled subset: ``max(1, round(fraction * n_c))`` examples of each class c.

    Each class is permuted once by ``np.random.default_rng([seed, c])`` and the subset takes a
    prefix of that permutation, so for one seed smaller fractions give subsets of larger ones.

    Args:
      label: int ``[n]`` class of each example.
      fraction: share of each class to keep, in (0, 1].
      seed: the subset's seed.

    Returns:
      Sorted int64 indices into ``label``.

    Raises:
      ValueError: ``fraction`` outside (0, 1].

    >>> label_subset(np.array([0, 0, 0, 1, 1, 1]), fraction=0.01, seed=0).size
    2
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction {fraction}: expected a value in (0, 1]")
    label = np.asarray(label)
    keep = []
    for c in np.unique(label):
        members = np.random.default_rng([seed, int(c)]).permutation(np.flatnonzero(label == c))
        keep.append(members[: max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(keep))
