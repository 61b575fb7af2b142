"""Feature caches: rows come back in order whatever the batching, and a cache is read only for
the key it was written for."""

import numpy as np
import pytest

from ftlab.core import tensorfile
from ftlab.data import features


def _mean_of_real(batch):
    # A stand-in for a masked encoder: depends on real positions only, records the length seen.
    mask = batch["attention_mask"]
    mean = (batch["input_ids"] * mask).sum(1) / mask.sum(1)
    return np.stack([mean, np.full(len(mask), mask.shape[1])], axis=1)


def test_compute_cuts_padding_and_keeps_row_order():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 11)
    mask = (np.arange(40) < lengths[:, None]).astype(np.int32)
    arrays = {"input_ids": rng.integers(1, 100, (11, 40)) * mask, "attention_mask": mask}
    full = features.compute(_mean_of_real, arrays, batch_size=4)
    cut = features.compute(
        _mean_of_real,
        arrays,
        batch_size=4,
        lengths=lengths,
        sequence_keys=("input_ids", "attention_mask"),
        multiple=8,
    )
    np.testing.assert_array_equal(cut[:, 0], full[:, 0])
    assert set(full[:, 1]) == {40} and set(cut[:, 1]) < {8, 16, 24, 32, 40}
    assert np.all(cut[:, 1] >= lengths)


def test_load_refuses_another_key_naming_what_changed(tmp_path):
    trunk = {"w": np.ones((2, 3), np.float32)}
    inputs = {"train": {"input_ids": np.arange(6).reshape(2, 3)}}
    key = features.cache_key(trunk=trunk, inputs=inputs, settings={"batch_size": 4})
    cached = {"train": np.arange(4, dtype=np.float32).reshape(2, 2)}
    features.save(tmp_path / "f.safetensors", cached, key=key)
    np.testing.assert_array_equal(
        features.load(tmp_path / "f.safetensors", key=key)["train"], cached["train"]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["f.safetensors"]  # no temporary left
    other = features.cache_key(
        trunk={"w": np.zeros((2, 3), np.float32)}, inputs=inputs, settings={"batch_size": 8}
    )
    with pytest.raises(features.StaleCacheError, match=r"different settings, trunk\.$"):
        features.load(tmp_path / "f.safetensors", key=other)
    with pytest.raises(FileNotFoundError):
        features.load(tmp_path / "missing.safetensors", key=key)
    # Changed bytes are caught by the file's digests, not served as features.
    raw = bytearray((tmp_path / "f.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / "f.safetensors").write_bytes(bytes(raw))
    with pytest.raises(tensorfile.CorruptFileError):
        features.load(tmp_path / "f.safetensors", key=key)


def test_input_of_returns_the_named_modules_input_and_trained_below_names_leaves():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(3, name="trunk")(x)).mean(axis=1)  # pooled, as a classifier
            return nn.Dense(2, name="head")(h)

    net, x = Net(), jnp.arange(12.0).reshape(2, 2, 3)
    params = net.init(jax.random.PRNGKey(0), x)["params"]
    fn = jax.jit(features.input_of(lambda p, x: net.apply({"params": p}, x), "head"))
    hidden = fn(params, x)
    head = nn.Dense(2).apply({"params": params["head"]}, hidden)
    np.testing.assert_allclose(head, net.apply({"params": params}, x), rtol=1e-6)
    with pytest.raises(ValueError, match=r"module='nothing' was called 0 times"):
        features.input_of(lambda p, x: net.apply({"params": p}, x), "nothing")(params, x)
    labels = {"head": {"bias": "train", "kernel": "train"}, "trunk": {"bias": "frozen"}}
    assert features.trained_below(labels, head="head") == []
    labels["trunk"]["kernel"] = "train"
    assert features.trained_below(labels, head="head") == ["trunk/kernel"]
