"""Few-shot episodes and class splits; the sklearn digits; the synthetic font glyphs."""

import numpy as np
import pytest

from ftlab.data import fewshot


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory):
    """A small glyph set rendered twice: once into a fresh cache, once read back from it."""
    cache = tmp_path_factory.mktemp("glyph_cache")
    kw = dict(size=12, num_classes=12, instances=6)
    first = fewshot.load_glyphs(**kw, cache_dir=cache)
    assert len(list(cache.glob("glyphs_*.npz"))) == 1
    return (
        first,
        fewshot.load_glyphs(**kw, cache_dir=cache),
        fewshot.load_glyphs(**kw, cache_dir=None),
    )


def _fake_images(classes=10, instances=20):
    # Every pixel encodes (class, instance), so episodes can be traced back to their source.
    c, i = np.meshgrid(np.arange(classes), np.arange(instances), indexing="ij")
    return np.broadcast_to((1000 * c + i)[:, :, None, None], (classes, instances, 2, 3)).astype(
        np.float32
    )


def test_episode_shapes_labels_and_sources():
    images = _fake_images()
    ids = np.array([1, 3, 4, 6, 8, 9])
    ep = fewshot.sample_episodes(images, ids, 7, 3, num_tasks=4, ways=5, shots=2, query=3)
    assert ep["support"]["x"].shape == (4, 10, 2, 3)
    assert ep["query"]["x"].shape == (4, 15, 2, 3)
    assert ep["support"]["y"].dtype == np.int32
    for t in range(4):
        # Labels are 0..N-1, K (or Q) of each; the N classes are distinct members of the split.
        assert sorted(ep["support"]["y"][t].tolist()) == sorted(list(range(5)) * 2)
        assert sorted(ep["query"]["y"][t].tolist()) == sorted(list(range(5)) * 3)
        assert len(set(ep["classes"][t].tolist())) == 5
        assert set(ep["classes"][t].tolist()) <= set(ids.tolist())
        src = {}
        for part in ("support", "query"):
            code = ep[part]["x"][t, :, 0, 0].astype(int)
            cls, inst = code // 1000, code % 1000
            # Each example with label j comes from the class that has label j.
            np.testing.assert_array_equal(cls, ep["classes"][t][ep[part]["y"][t]])
            for c, i in zip(cls, inst, strict=True):
                src.setdefault(c, []).append(i)
        # Support and query instances of a class are distinct.
        assert all(len(v) == len(set(v)) == 5 for v in src.values())


def test_label_order_varies_between_episodes():
    ep = fewshot.sample_episodes(
        _fake_images(), np.arange(5), 0, 0, num_tasks=50, ways=5, shots=1, query=1
    )
    # All 5 classes in every episode, but not always with the same labels.
    assert all(sorted(c) == list(range(5)) for c in ep["classes"].tolist())
    assert len({tuple(c) for c in ep["classes"].tolist()}) > 10


def test_sampling_is_deterministic_per_seed_and_index():
    images = _fake_images()
    kw = dict(num_tasks=3, ways=5, shots=1, query=2)
    a = fewshot.sample_episodes(images, np.arange(10), 1, 5, **kw)
    b = fewshot.sample_episodes(images, np.arange(10), 1, 5, **kw)
    c = fewshot.sample_episodes(images, np.arange(10), 1, 6, **kw)
    d = fewshot.sample_episodes(images, np.arange(10), 2, 5, **kw)
    np.testing.assert_array_equal(a["query"]["x"], b["query"]["x"])
    np.testing.assert_array_equal(a["classes"], b["classes"])
    assert not np.array_equal(a["query"]["x"], c["query"]["x"])
    assert not np.array_equal(a["query"]["x"], d["query"]["x"])
    x1 = fewshot.sample_batch(images, np.arange(3), 0, 1, batch_size=16)
    x2 = fewshot.sample_batch(images, np.arange(3), 0, 1, batch_size=16)
    np.testing.assert_array_equal(x1["x"], x2["x"])
    np.testing.assert_array_equal(x1["x"][:, 0, 0] // 1000, x1["y"])


def test_split_classes_is_a_disjoint_seeded_partition():
    train, test = fewshot.split_classes(300, num_train=200, seed=0)
    assert len(train) == 200 and len(test) == 100
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted([*train.tolist(), *test.tolist()]) == list(range(300))
    again, _ = fewshot.split_classes(300, num_train=200, seed=0)
    other, _ = fewshot.split_classes(300, num_train=200, seed=1)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(train, other)
    # Test episodes only ever see test classes.
    ep = fewshot.sample_episodes(
        np.zeros((300, 4, 1, 1)), test, 0, 0, num_tasks=20, ways=5, shots=1, query=1
    )
    assert set(ep["classes"].ravel().tolist()) <= set(test.tolist())


def test_bad_episode_requests_name_the_problem():
    images = _fake_images(classes=6, instances=4)
    with pytest.raises(ValueError, match="ways=5 but the split has only 3 classes"):
        fewshot.sample_episodes(images, np.arange(3), 0, 0, num_tasks=1, ways=5, shots=1, query=1)
    with pytest.raises(ValueError, match="shots \\+ query = 5 but each class has 4"):
        fewshot.sample_episodes(images, np.arange(6), 0, 0, num_tasks=1, ways=5, shots=2, query=3)
    with pytest.raises(ValueError, match="num_train=10"):
        fewshot.split_classes(10, num_train=10, seed=0)


def test_digits_are_the_sklearn_digits_class_major():
    from sklearn import datasets

    d = fewshot.load_digits()
    raw = datasets.load_digits()
    assert d.images.shape == (10, 174, 8, 8) and not d.synthetic
    for c in (0, 7):
        np.testing.assert_array_equal(d.images[c], raw.images[raw.target == c][:174] / 16.0)


def test_glyphs_are_deterministic_cached_and_distinct(glyphs):
    first, cached, fresh = glyphs
    assert first.synthetic and first.images.shape == (12, 6, 12, 12)
    np.testing.assert_array_equal(first.images, cached.images)
    np.testing.assert_array_equal(first.images, fresh.images)  # re-rendered without the cache
    assert first.names == cached.names and len(set(first.names)) == 12
    assert 0.0 <= first.images.min() and first.images.max() <= 1.0
    # No blank instance; instances of a class differ (fonts, jitter).
    assert (first.images.reshape(12, 6, -1).max(-1) > 0.5).all()
    assert not np.array_equal(first.images[0, 0], first.images[0, 1])
    # Classes really differ: each class's mean image is nearer its own instances than any other
    # class's mean is, on average (a nearest-centroid classifier beats chance by far).
    means = first.images.mean(1).reshape(12, -1)
    flat = first.images.reshape(12 * 6, -1)
    dist = ((flat[:, None] - means[None]) ** 2).sum(-1)
    acc = np.mean(dist.argmin(1) == np.repeat(np.arange(12), 6))
    assert acc > 0.6
    assert min(np.abs(means[i] - means[j]).sum() for i in range(12) for j in range(i + 1, 12)) > 1.0
