"""Prefix tuning: finalized equals training-time, prefixes attend, training, errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab import testing
from ftlab.core import partition
from ftlab.models import attention, bert, hooks
from ftlab.peft import prefix

TINY = bert.BertConfig.tiny(dropout_rate=0.0)
MODEL = bert.BertClassifier(TINY, num_classes=3)
LENGTH, HIDDEN_MLP = 3, 8


def _apply(params, batch, rng):
    del rng
    return MODEL.apply({"params": params}, batch["input_ids"], batch["attention_mask"])


def _batch(seed=0, n=4, seq=7):
    return testing.classifier_batch(TINY, seed=seed, n=n, seq=seq)


@functools.cache
def _sites():
    """The model's hook sites, traced once (`hooks.discover`)."""
    return hooks.discover(_apply, testing.random_params(MODEL, _batch()), _batch(), None)


@pytest.fixture(scope="module")
def base():
    return testing.random_params(MODEL, _batch())


def _with_prefix(base):
    return prefix.init(
        base, jax.random.key(1), sites=_sites(), length=LENGTH, hidden_mlp=HIDDEN_MLP
    )


def APPLY(params, batch, rng):  # noqa: N802 (a constant wrapped function)
    return prefix.wrap_apply(_apply, _sites())(params, batch, rng)


def test_init_materialize_and_finalize_trees(base):
    params = _with_prefix(base)
    assert set(params) == {"encoder", "head", "prefix_mlp"}
    chex.assert_shape(
        params["prefix_mlp"]["dense_1"]["kernel"], (HIDDEN_MLP, 2 * TINY.num_layers * 16)
    )
    final = prefix.finalize(params, _sites())
    assert "prefix_mlp" not in final
    added = sorted(set(partition.flatten(final)) - set(partition.flatten(base)))
    assert added == [
        f"encoder/layer_{i}/attention/prefix_{kv}" for i in range(2) for kv in ("key", "value")
    ]
    chex.assert_shape(final["encoder"]["layer_1"]["attention"]["prefix_value"], (LENGTH, 16))


def test_finalized_tree_equals_training_time_output_and_prefixes_attend(base):
    params = _with_prefix(base)
    batch = _batch(1)
    trained_path, served, plain = jax.jit(
        lambda p, f, b: (APPLY(p, batch, None), _apply(f, batch, None), _apply(b, batch, None))
    )(params, prefix.finalize(params, _sites()), base)
    np.testing.assert_array_equal(served, trained_path)
    assert np.max(np.abs(served - plain)) > 1e-3


def test_prefix_equals_attending_to_extra_keys(base):
    # A prefix whose keys and values are what the layer would compute for some extra tokens is
    # the same as those tokens being present as keys/values: check at the first layer, where
    # both are easy to build, using attention with an explicit longer key sequence.
    attn = bert.BertSelfAttention(TINY)
    p = jax.tree.map(jnp.asarray, base["encoder"]["layer_0"]["attention"])
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 5, 16)).astype(np.float32)
    extra = rng.normal(size=(LENGTH, 16)).astype(np.float32)
    kx = extra @ p["key"]["kernel"] + p["key"]["bias"][None]
    vx = extra @ p["value"]["kernel"] + p["value"]["bias"][None]
    bias = bert.attention_bias(np.ones((2, 5), np.int32))
    got = attn.apply(
        {"params": {**p, "prefix_key": kx, "prefix_value": vx}}, x, bias, deterministic=True
    )

    def heads(y):
        return y.reshape(*y.shape[:-1], 2, 8)

    full = np.concatenate([np.broadcast_to(extra, (2, LENGTH, 16)), x], axis=1)
    q = heads(x @ p["query"]["kernel"] + p["query"]["bias"][None, None])
    k = heads(full @ p["key"]["kernel"] + p["key"]["bias"][None, None])
    v = heads(full @ p["value"]["kernel"] + p["value"]["bias"][None, None])
    y = attention.dot_product_attention(q, k, v, np.zeros((2, 1, 1, LENGTH + 5), np.float32))
    want = y.reshape(2, 5, 16) @ p["out"]["kernel"] + p["out"]["bias"][None, None]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_training_moves_only_the_mlp_and_head_and_lowers_the_loss(base):
    params = jax.tree.map(jnp.array, _with_prefix(base))
    label_tree = partition.labels(params, prefix.rules(extra=[("head/.*", "train")]))
    tx = partition.optimizer({"train": optax.adam(1e-2)}, label_tree)
    trainable0, _ = partition.split(jax.tree.map(np.array, params), label_tree)
    assert all(k.startswith(("head/", "prefix_mlp/")) for k in partition.flatten(trainable0))
    state = testing.assert_trains_only(params, label_tree, tx, APPLY, _batch(3), steps=4)
    # The served tree is the frozen base plus prefixes only.
    served = prefix.finalize(state.params, _sites())
    assert set(partition.flatten(prefix.adapter(served))) == {
        f"encoder/layer_{i}/attention/prefix_{kv}" for i in range(2) for kv in ("key", "value")
    }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(length=0), r"prefix\.init: length"),
        (dict(hidden_mlp=-1), r"prefix\.init: hidden_mlp"),
    ],
)
def test_init_errors_name_the_config_key(base, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prefix.init(
            base, jax.random.key(0), sites=_sites(), **(dict(length=LENGTH, hidden_mlp=4) | kwargs)
        )


def test_incomplete_trees_name_the_leaf_path(base):
    final = prefix.finalize(_with_prefix(base), _sites())
    del final["encoder"]["layer_1"]["attention"]["prefix_value"]
    with pytest.raises(ValueError, match="encoder/layer_1/attention/prefix_value is missing"):
        jax.eval_shape(_apply, final, _batch(), None)
    params = _with_prefix(base)
    del params["prefix_mlp"]["dense_1"]["bias"]
    with pytest.raises(ValueError, match="prefix_mlp/dense_1/bias is missing"):
        prefix.materialize(params, _sites())
    with pytest.raises(ValueError, match="prefix_key already exists next to prefix_mlp"):
        prefix.materialize(prefix.materialize(_with_prefix(base), _sites()), _sites())
