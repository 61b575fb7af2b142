"""Hutto & Gilbert's human ratings: counts, joins, the Rotten Tomatoes split, the baselines."""

import numpy as np
import pytest

from ftlab.data import ratings, rotten_tomatoes
from ftlab.posttrain import metrics


@pytest.fixture(scope="module")
def movies():
    return ratings.load("movies")


def test_every_source_loads_with_its_raters(movies):
    assert len(movies.text) == ratings.COUNTS["movies"] == 10_605
    assert movies.text[0].startswith("The Rock is destined to be the 21st Century's new")
    assert "Münch's genuine insight" in " ".join(movies.text)  # UTF-8, not Latin-1
    counts = np.array([len(r) for r in movies.ratings])
    assert (counts.min(), counts.max()) == (15, 29)
    # movie means are the means of the listed ratings
    np.testing.assert_allclose([r.mean() for r in movies.ratings], movies.mean, atol=1e-6)
    amazon = ratings.load("amazon", check_hash=False)  # its ratings file has a BOM, other order
    assert len(amazon.ids) == 3_708 and amazon.ids[0] == "1_1"
    assert all(len(r) == 20 for r in amazon.ratings)
    np.testing.assert_allclose([r.mean() for r in amazon.ratings], amazon.mean, atol=1e-6)
    with pytest.raises(ValueError, match="source='imdb'"):
        ratings.load("imdb")
    with pytest.raises(FileNotFoundError, match="vadersentiment==3.3.2"):
        ratings.load(archive="/nonexistent/vaderSentiment-3.3.2.tar.gz")


def test_split_follows_rotten_tomatoes(movies):
    parts = ratings.split_movies(movies, seed=0)
    assert sum(len(p) for p in parts.values()) == 10_605
    assert not set(parts["train"]) & (set(parts["test"]) | set(parts["validation"]))
    rt = rotten_tomatoes.load(task="sentiment", seed=0)
    rt_side = {}
    for name in ("train", "validation", "test"):
        for text in rt[name].text:
            rt_side.setdefault(ratings.normalize(text), set()).add(name)
    matched = 0
    for name, idx in parts.items():
        for i in idx:
            sides = rt_side.get(ratings.normalize(movies.text[i]))
            if sides is not None:
                matched += 1
                assert name in sides
                if name == "train":  # no train snippet is a held-out review of the other task
                    assert sides == {"train"}
    assert matched == 10_453
    chosen, rejected = ratings.pairs(movies.mean[parts["train"]], min_difference=1.0,
                                     num_pairs=1000, seed=0)  # fmt: skip
    assert np.all(movies.mean[parts["train"]][chosen] - movies.mean[parts["train"]][rejected] >= 1)
    small = np.array([0.0, 1.5, 0.8, -2.0])
    c, r = ratings.pairs(small, min_difference=1.0)
    every = [(0, 3), (1, 0), (1, 3), (2, 3)]
    assert sorted(zip(c.tolist(), r.tolist(), strict=True)) == every
    # drawn pairs are uniform over every pair
    c, r = ratings.pairs(small, min_difference=1.0, num_pairs=40_000, seed=1)
    drawn = list(zip(c.tolist(), r.tolist(), strict=True))
    freq = [drawn.count(p) / len(drawn) for p in every]
    np.testing.assert_allclose(freq, 0.25, atol=0.01)
    assert len(set(drawn)) == 4


def test_vader_and_a_single_rater_reproduce_the_issue_numbers(movies):
    vader = metrics.agreement(ratings.vader_scores(movies.text), movies.mean, min_difference=1.0)
    assert round(vader["pearson"], 3) == 0.427
    assert round(vader["spearman"], 3) == 0.441
    assert round(vader["pairwise_accuracy"], 2) == 0.70
    one, rest = ratings.held_out_rater(movies, seed=0)
    assert round(metrics.pearson(one, rest), 2) == 0.89
