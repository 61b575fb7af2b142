"""Digits: a stratified, seeded, disjoint split; per-class label subsets that are nested."""

import numpy as np
import pytest
from sklearn import datasets

from ftlab.data import images


@pytest.fixture(scope="module")
def splits():
    return images.load("digits", test_fraction=0.2, seed=0)


def test_split_is_disjoint_complete_and_equals_the_source(splits):
    tr, te = splits["train"], splits["test"]
    assert tr.images.shape == (1438, 8, 8) and te.images.shape == (359, 8, 8)
    assert tr.images.dtype == np.float32 and tr.label.dtype == np.int32
    assert not set(tr.index) & set(te.index)
    assert sorted(np.concatenate([tr.index, te.index])) == list(range(1797))
    digits = datasets.load_digits()
    for split in (tr, te):
        np.testing.assert_array_equal(split.images, digits.images[split.index] / 16.0)
        np.testing.assert_array_equal(split.label, digits.target[split.index])
        assert 0.0 <= split.images.min() and split.images.max() <= 1.0


def test_split_is_stratified_and_a_function_of_the_seed(splits):
    total = np.bincount(datasets.load_digits().target)
    np.testing.assert_array_equal(
        np.bincount(splits["test"].label), np.maximum(1, np.round(0.2 * total))
    )
    again = images.load("digits", test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(again["test"].index, splits["test"].index)
    other = images.load("digits", test_fraction=0.2, seed=1)
    assert set(other["test"].index) != set(splits["test"].index)


def test_label_subsets_keep_every_class_and_are_nested(splits):
    label = splits["train"].label
    counts = np.bincount(label)
    subsets = {f: images.label_subset(label, fraction=f, seed=3) for f in (0.01, 0.1, 1.0)}
    for f, idx in subsets.items():
        np.testing.assert_array_equal(
            np.bincount(label[idx], minlength=10), np.maximum(1, np.round(f * counts))
        )
    assert subsets[0.01].size == 10 and subsets[1.0].size == label.size
    assert set(subsets[0.01]) <= set(subsets[0.1]) <= set(subsets[1.0])
    np.testing.assert_array_equal(images.label_subset(label, fraction=0.1, seed=3), subsets[0.1])
    assert set(images.label_subset(label, fraction=0.1, seed=4)) != set(subsets[0.1])


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="fashion.*known image data sets: \\['digits'\\]"):
        images.load("fashion")
    with pytest.raises(ValueError, match="test_fraction=1.0"):
        images.load("digits", test_fraction=1.0)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"label fraction {bad}"):
            images.label_subset(np.zeros(4, np.int32), fraction=bad, seed=0)
