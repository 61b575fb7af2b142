"""Rotten Tomatoes: counts, fixed splits, baselines."""

import collections
import hashlib

import numpy as np
import pandas as pd
import pytest

from ftlab.data import rotten_tomatoes


@pytest.fixture(scope="module")
def sentiment():
    return rotten_tomatoes.load()


def _fingerprint(split):
    return hashlib.sha256("\n".join(split.text).encode()).hexdigest()[:16]


def test_sentiment_counts(sentiment):
    assert {k: len(v.text) for k, v in sentiment.items()} == {
        "train": 10246,
        "validation": 1281,
        "test": 1281,
    }
    labels = np.concatenate([s.label for s in sentiment.values()])
    assert len(labels) == 12808
    assert labels.sum() == 7403  # fresh
    assert labels.dtype == np.int32
    for s in sentiment.values():
        assert len(s.text) == len(s.label)
    assert rotten_tomatoes.LABEL_NAMES["sentiment"][1] == "fresh"


def test_splits_partition_the_file(sentiment):
    # Texts repeat in the file (56 duplicate snippets), so compare as multisets of (text, label).
    df = pd.read_csv(rotten_tomatoes.data_path())
    df = df[df.category.isin(["fresh", "rotten"])]
    want = collections.Counter(zip(df.text, (df.category == "fresh").astype(int), strict=True))
    got = collections.Counter(
        (t, int(y)) for s in sentiment.values() for t, y in zip(s.text, s.label, strict=True)
    )
    assert got == want


def test_splits_deterministic(sentiment):
    again = rotten_tomatoes.load()
    for name in rotten_tomatoes.SPLITS:
        assert again[name].text == sentiment[name].text
        np.testing.assert_array_equal(again[name].label, sentiment[name].label)
    # Pinned, so a numpy or file change that moves rows between splits is caught.
    assert _fingerprint(sentiment["validation"]) == "3ca91c6ac2519c55"
    assert _fingerprint(sentiment["test"]) == "40401876aa53e046"
    other = rotten_tomatoes.load(seed=1)
    assert other["test"].text != sentiment["test"].text


def test_limit_takes_a_prefix_of_each_split(sentiment):
    small = rotten_tomatoes.load(limit=50)
    for name in rotten_tomatoes.SPLITS:
        assert small[name].text == sentiment[name].text[:50]
        np.testing.assert_array_equal(small[name].label, sentiment[name].label[:50])


def test_majority_baseline(sentiment):
    every = rotten_tomatoes.Split(
        text=[t for s in sentiment.values() for t in s.text],
        label=np.concatenate([s.label for s in sentiment.values()]),
    )
    assert rotten_tomatoes.majority_baseline(every) == pytest.approx(0.578, abs=5e-4)
    assert 0.55 < rotten_tomatoes.majority_baseline(sentiment["test"]) < 0.61


def test_subjectivity_task():
    splits = rotten_tomatoes.load(task="subjectivity")
    labels = np.concatenate([s.label for s in splits.values()])
    # 13,905 rows, less 14 plot rows whose text is empty in the file.
    assert len(labels) == 13891
    assert labels.sum() == 1097 - 14
    assert rotten_tomatoes.LABEL_NAMES["subjectivity"] == ("review", "plot")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="task='sentimnet'"):
        rotten_tomatoes.load(task="sentimnet")
    with pytest.raises(ValueError, match="test_fraction"):
        rotten_tomatoes.load(validation_fraction=0.5, test_fraction=0.5)
