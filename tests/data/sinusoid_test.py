"""Sinusoid tasks: Finn et al.'s ranges, the sine itself, and determinism per (seed, index)."""

import numpy as np
import pytest

from ftlab.data import sinusoid


def test_tasks_follow_the_paper_ranges_and_the_sine():
    t = sinusoid.sample(0, 3, num_tasks=2000, shots=10, query_shots=5)
    amp, phase = t["task"]["amplitude"], t["task"]["phase"]
    assert t["support"]["x"].shape == (2000, 10, 1) and t["query"]["y"].shape == (2000, 5, 1)
    assert 0.1 <= amp.min() < 0.2 and 4.9 < amp.max() <= 5.0
    assert 0.0 <= phase.min() < 0.05 and np.pi - 0.05 < phase.max() <= np.pi
    for part in ("support", "query"):
        x, y = t[part]["x"], t[part]["y"]
        assert -5.0 <= x.min() < -4.9 and 4.9 < x.max() <= 5.0
        expected = amp[:, None, None] * np.sin(x - phase[:, None, None])
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_batches_are_a_function_of_seed_and_index():
    a = sinusoid.sample(1, 5, num_tasks=3, shots=4, query_shots=4)
    b = sinusoid.sample(1, 5, num_tasks=3, shots=4, query_shots=4)
    c = sinusoid.sample(1, 6, num_tasks=3, shots=4, query_shots=4)
    np.testing.assert_array_equal(a["support"]["x"], b["support"]["x"])
    assert not np.array_equal(a["support"]["x"], c["support"]["x"])
    with pytest.raises(ValueError, match="shots=0; expected a positive integer"):
        sinusoid.sample(0, 0, num_tasks=1, shots=0, query_shots=1)
