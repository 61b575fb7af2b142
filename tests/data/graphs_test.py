"""The Drosophila connectome as shipped in graspologic's wheel: shapes, classes, checks."""

import numpy as np
import pytest

from ftlab.data import graphs


def test_both_hemispheres_load_with_their_cell_types():
    left = graphs.load("drosophila_left")
    assert left.adjacency.shape == (209, 209) and left.classes == ("K", "I", "O", "P")
    assert np.bincount(left.labels).tolist() == [101, 21, 29, 58]
    assert int(left.adjacency.sum()) == 25322 and int((left.adjacency > 0).sum()) == 7425
    right = graphs.load("drosophila_right")
    assert np.bincount(right.labels).tolist() == [100, 21, 29, 63]


def test_a_changed_file_or_unknown_name_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="dataset='cora' is unknown; choose one of"):
        graphs.load("cora")
    monkeypatch.setitem(graphs.SHA256, "left_cell_labels.csv", "0" * 64)
    with pytest.raises(ValueError, match=r"left_cell_labels\.csv: sha256 is a7336"):
        graphs.load("drosophila_left")
    assert graphs.load("drosophila_left", check_hash=False).labels.shape == (209,)


def test_label_subset_takes_k_per_class_and_all_of_a_small_class():
    labels = np.array([0] * 5 + [1] * 2 + [2] * 4)
    idx = graphs.label_subset(labels, per_class=3, seed=0)
    assert np.bincount(labels[idx]).tolist() == [3, 2, 3]
    assert np.array_equal(idx, graphs.label_subset(labels, per_class=3, seed=0))
    with pytest.raises(ValueError, match="per_class=0"):
        graphs.label_subset(labels, per_class=0, seed=0)
