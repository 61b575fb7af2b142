"""Deterministic, resumable batching."""

import numpy as np
import pytest

from ftlab.data import batching

N = 23
ARRAYS = {
    "x": np.arange(N, dtype=np.int32),
    "y": np.arange(N * 2, dtype=np.float32).reshape(N, 2),
}


def test_steps_per_epoch_drops_remainder_and_names_sizes():
    assert batching.steps_per_epoch(23, 5) == 4
    assert batching.steps_per_epoch(20, 5) == 4
    with pytest.raises(ValueError, match=r"batch_size=30.*23 rows"):
        batching.steps_per_epoch(23, 30)


def test_same_step_same_batch():
    a = batching.train_batch(ARRAYS, 7, batch_size=4, seed=3)
    b = batching.train_batch(dict(ARRAYS), 7, batch_size=4, seed=3)
    for k in ARRAYS:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["x"].shape == (4,) and a["y"].shape == (4, 2)
    # Rows stay aligned across keys.
    np.testing.assert_array_equal(a["y"][:, 0], 2 * a["x"])
    c = batching.train_batch(ARRAYS, 7, batch_size=4, seed=4)
    assert not np.array_equal(a["x"], c["x"])


def test_epoch_visits_every_example_once():
    spe = batching.steps_per_epoch(20, 5)
    arrays = {"x": np.arange(20)}
    for epoch in range(2):
        seen = np.concatenate(
            [
                batching.train_batch(arrays, epoch * spe + s, batch_size=5, seed=0)["x"]
                for s in range(spe)
            ]
        )
        np.testing.assert_array_equal(np.sort(seen), np.arange(20))
    first = batching.train_batch(arrays, 0, batch_size=5, seed=0)["x"]
    second_epoch = batching.train_batch(arrays, spe, batch_size=5, seed=0)["x"]
    assert not np.array_equal(first, second_epoch)  # reshuffled per epoch


def test_epoch_with_remainder_has_no_repeats():
    spe = batching.steps_per_epoch(N, 5)
    seen = np.concatenate(
        [batching.train_batch(ARRAYS, s, batch_size=5, seed=1)["x"] for s in range(spe)]
    )
    assert len(seen) == len(set(seen.tolist())) == 20


def test_mismatched_lengths_are_named():
    with pytest.raises(ValueError, match="'b': 3"):
        batching.train_batch({"a": np.zeros(4), "b": np.zeros(3)}, 0, batch_size=2, seed=0)


@pytest.mark.parametrize("batch_size", [5, 23, 30])
def test_eval_batches_cover_everything_once(batch_size):
    batches = list(batching.eval_batches(ARRAYS, batch_size=batch_size))
    assert len(batches) == -(-N // batch_size)
    for b in batches:
        assert b["x"].shape == (batch_size,) and b["y"].shape == (batch_size, 2)
        assert b["mask"].dtype == np.float32
    mask = np.concatenate([b["mask"] for b in batches])
    x = np.concatenate([b["x"] for b in batches])
    np.testing.assert_array_equal(x[mask == 1], np.arange(N))
    assert mask.sum() == N
    np.testing.assert_array_equal(x[mask == 0], 0)  # padding repeats row 0
    np.testing.assert_array_equal(mask, np.arange(len(mask)) < N)


def test_process_slices_concatenate_to_global_batch():
    batch = batching.train_batch(ARRAYS, 2, batch_size=8, seed=0)
    parts = [batching.process_slice(batch, process_index=i, process_count=4) for i in range(4)]
    for k in batch:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), batch[k])
    assert parts[0]["x"].shape == (2,)
    with pytest.raises(ValueError, match="8 rows.*3 processes"):
        batching.process_slice(batch, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index=4"):
        batching.process_slice(batch, process_index=4, process_count=4)
