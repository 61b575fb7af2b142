"""Houlsby adapters: exact identity at init, placement, training moves only adapters, errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab import testing
from ftlab.core import partition
from ftlab.models import bert, hooks
from ftlab.peft import adapters

TINY = bert.BertConfig.tiny(dropout_rate=0.0)
MODEL = bert.BertClassifier(TINY, num_classes=3)
BOTTLENECK = 4


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


def _with_adapters(base):
    return adapters.init(base, jax.random.key(1), sites=_sites(), bottleneck=BOTTLENECK)


def test_init_adds_two_adapters_per_layer_and_is_exact_identity(base):
    params = _with_adapters(base)
    added = sorted(set(partition.flatten(params)) - set(partition.flatten(base)))
    assert len(added) == 2 * 4 * TINY.num_layers
    a = params["encoder"]["layer_1"]["output_adapter"]
    chex.assert_shape([a["down"]["kernel"], a["up"]["kernel"]], [(16, 4), (4, 16)])
    assert np.std(a["down"]["kernel"]) > 0 and not np.any(a["up"]["kernel"])
    # The adapter itself is an exact identity at init: x + (gelu(x @ down) @ 0 + 0) == x.
    x = np.random.default_rng(1).normal(size=(2, 3, TINY.hidden_size)).astype(np.float32)
    y = jax.jit(hooks.adapter)(a, x)
    np.testing.assert_array_equal(y, x)
    # The whole model agrees to float rounding only: XLA fuses the base model's `out` dense with
    # the residual add (a GEMM accumulating into x), and the adapter between them changes that
    # fusion, which moves some logits by one ulp.
    batch = _batch(1)
    with_ad, without = jax.jit(lambda p, q: (_apply(p, batch, None), _apply(q, batch, None)))(
        params, base
    )
    np.testing.assert_allclose(with_ad, without, atol=1e-6, rtol=0)


def test_adapter_acts_before_the_residual_and_layer_norm(base):
    # An up-projection bias b adds b to the sublayer output: LN(x + a + b). Check that against
    # the same model with b folded into the attention output bias (same place, base model).
    params = _with_adapters(base)
    b = np.random.default_rng(2).normal(size=TINY.hidden_size).astype(np.float32)
    params["encoder"]["layer_0"]["attention_adapter"]["up"]["bias"] = b
    folded = jax.tree.map(lambda x: x, base)
    folded["encoder"]["layer_0"]["attention"]["out"]["bias"] = (
        base["encoder"]["layer_0"]["attention"]["out"]["bias"] + b
    )
    batch = _batch(2)
    got, want = jax.jit(lambda p, q: (_apply(p, batch, None), _apply(q, batch, None)))(
        params, folded
    )
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.max(np.abs(got - jax.jit(_apply)(base, batch, None))) > 1e-3


def test_training_moves_only_adapters_and_head_and_lowers_the_loss(base):
    params = jax.tree.map(jnp.array, _with_adapters(base))
    label_tree = partition.labels(params, adapters.rules(extra=[("head/.*", "train")]))
    tx = partition.optimizer({"train": optax.adam(1e-2)}, label_tree)
    trainable0, _ = partition.split(jax.tree.map(np.array, params), label_tree)
    assert all(k.startswith("head/") or "_adapter/" in k for k in partition.flatten(trainable0))
    testing.assert_trains_only(params, label_tree, tx, _apply, _batch(3), steps=4)


def test_rules_with_layer_norms():
    rules = adapters.rules(train_layer_norms=True)
    assert any("layer_norm" in p for p, _ in rules) and rules[-1] == (".*", "frozen")


@pytest.mark.parametrize("bottleneck", [0, 2.5, True])
def test_bad_bottleneck_names_the_argument(base, bottleneck):
    with pytest.raises(ValueError, match=r"adapters\.init: bottleneck"):
        adapters.init(base, jax.random.key(0), sites=_sites(), bottleneck=bottleneck)


def test_half_an_adapter_names_the_leaf_path(base):
    params = _with_adapters(base)
    del params["encoder"]["layer_1"]["attention_adapter"]["up"]["bias"]
    b = _batch()
    with pytest.raises(ValueError, match="encoder/layer_1/attention_adapter/up/bias is missing"):
        jax.eval_shape(_apply, params, b, None)
    with pytest.raises(ValueError, match="already exists"):
        adapters.init(_with_adapters(base), jax.random.key(0), sites=_sites(), bottleneck=2)
