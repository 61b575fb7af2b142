"""IA3: exact at init, merged equals intercepted, unmerge restores, frozen base kept, composes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab import testing
from ftlab.core import partition, train
from ftlab.models import bert
from ftlab.peft import dora, ia3
from ftlab.tasks import classification

# query/key/value/out are [12, 12], intermediate [12, 20], output [20, 12].
TINY = bert.BertConfig.tiny(hidden_size=12, num_heads=2, intermediate_size=20, dropout_rate=0.0)
MODEL = bert.BertClassifier(TINY, num_classes=3)


def _apply(params, batch, rng):
    kwargs = {} if rng is None else dict(deterministic=False, rngs={"dropout": rng})
    return MODEL.apply({"params": params}, batch["input_ids"], batch["attention_mask"], **kwargs)


APPLY = ia3.wrap_apply(_apply)


def _batch(seed=0, n=4, seq=7):
    return testing.classifier_batch(TINY, seed=seed, n=n, seq=seq)


@pytest.fixture(scope="module")
def base():
    return testing.random_params(MODEL, _batch())


def _randomized(params, seed=1):
    """IA3 vectors away from ones (and so a model that differs from the base)."""
    flat = partition.flatten(params)
    rng = np.random.default_rng(seed)
    for k in flat:
        if k.endswith(("/ia3_scale", "/ia3_scale_in")):
            flat[k] = rng.uniform(0.3, 2.0, size=np.shape(flat[k])).astype(np.float32)
    return partition.unflatten(flat)


def test_init_adds_ones_at_keys_values_and_ffn_input(base):
    params = ia3.init(base)
    added = sorted(set(partition.flatten(params)) - set(partition.flatten(base)))
    assert len(added) == 3 * TINY.num_layers
    layer = params["encoder"]["layer_1"]
    chex.assert_shape(
        [
            layer["attention"]["key"]["ia3_scale"],
            layer["attention"]["value"]["ia3_scale"],
            layer["mlp"]["output"]["ia3_scale_in"],  # the GELU activation, [intermediate]
        ],
        [(12,), (12,), (20,)],
    )
    assert all(np.all(np.asarray(v) == 1) for v in jax.tree.leaves(ia3.adapter(params)))


def test_ia3_model_equals_base_at_init(base):
    batch = _batch()
    # Separate jits of _apply and APPLY: the same compiled functions serve the merge test.
    base_out = jax.jit(_apply)(base, batch, None)
    np.testing.assert_array_equal(jax.jit(APPLY)(ia3.init(base), batch, None), base_out)


def test_merged_equals_intercepted_and_unmerge_restores(base):
    params = _randomized(ia3.init(base))
    batch = _batch()
    intercepted = jax.jit(APPLY)(params, batch, None)
    merged = ia3.merge(params)
    assert jax.tree.structure(merged) == jax.tree.structure(base)  # a plain base-model tree
    plain = jax.jit(_apply)(merged, batch, None)  # no interceptor
    np.testing.assert_allclose(plain, intercepted, atol=1e-5, rtol=1e-5)
    # The vectors matter, so the comparison above can fail.
    assert np.max(np.abs(intercepted - jax.jit(_apply)(base, batch, None))) > 1e-3
    # Output scaling multiplies the bias too (PEFT's placement after the key/value Dense).
    v = params["encoder"]["layer_0"]["attention"]["value"]
    np.testing.assert_allclose(
        merged["encoder"]["layer_0"]["attention"]["value"]["bias"], v["bias"] * v["ia3_scale"]
    )

    back = ia3.unmerge(merged, ia3.adapter(params))
    chex.assert_trees_all_close(back, params, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_equal(ia3.adapter(back), ia3.adapter(params))


def test_training_moves_only_ia3_and_head(base):
    params = jax.tree.map(jnp.array, ia3.init(base))
    label_tree = partition.labels(params, ia3.rules(extra=[("head/.*", "train")]))
    tx = partition.optimizer({"train": optax.adam(1e-2)}, label_tree)
    trainable0, frozen0 = partition.split(jax.tree.map(np.array, params), label_tree)
    names = partition.flatten(trainable0)
    assert len(names) == 3 * TINY.num_layers + 2
    assert all(k.startswith("head/") or k.endswith(("/ia3_scale", "/ia3_scale_in")) for k in names)
    state = train.init_state(params, label_tree, tx, seed=0)
    # adam keeps mu and nu per trainable leaf (IA3 vectors and head) plus a count: nothing else.
    opt_size = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
    assert opt_size == 2 * partition.count(trainable0) + 1
    step = jax.jit(train.make_train_step(classification.make_loss_fn(APPLY), tx), donate_argnums=0)
    for i in range(3):
        state, metrics = step(state, _batch(i))
    assert np.isfinite(metrics["train/loss"])
    chex.assert_trees_all_equal(state.frozen, frozen0)
    for name, leaf in partition.flatten(state.trainable).items():
        assert not np.array_equal(leaf, partition.flatten(trainable0)[name]), name


def test_composes_with_dora_on_the_same_module(base):
    # DoRA on query/value, IA3 on key/value (output) and mlp/output (input): value holds both.
    params = dora.init(
        base,
        jax.random.key(0),
        targets=[r"encoder/layer_\d+/attention/(query|value)"],
        rank=2,
        alpha=4.0,
    )
    flat = partition.flatten(_randomized(ia3.init(params)))
    rng = np.random.default_rng(2)
    for k in flat:
        if k.endswith("/lora_b"):
            flat[k] = rng.normal(scale=0.3, size=np.shape(flat[k])).astype(np.float32)
    params = partition.unflatten(flat)
    batch = _batch()
    intercepted = jax.jit(dora.wrap_apply(_apply, alpha=4.0, rank=2))(params, batch, None)
    with pytest.raises(
        ValueError, match=r"layer_0/attention/value/lora_a sits next to IA3 vectors"
    ):
        ia3.merge(params)
    # IA3 wraps the DoRA-adapted map, so folding DoRA first and IA3 second is exact.
    merged = ia3.merge(dora.merge(params, alpha=4.0, rank=2))
    plain = jax.jit(_apply)(merged, batch, None)
    np.testing.assert_allclose(plain, intercepted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(targets_out=[r"encoder/layer_\d+/attention/kee"]),
            r"ia3\.init: targets_out\[0\].*available: .*attention/key",
        ),
        (dict(targets_in=[r"encoder/layer_\d+/ffn/output"]), r"ia3\.init: targets_in\[0\]"),
        (dict(targets_out=[], targets_in=[]), r"ia3\.init: targets_out and .* both empty"),
        (dict(targets_out="encoder/.*"), r"ia3\.init: targets_out must be a list"),
    ],
    ids=["typo-out", "typo-in", "empty", "string"],
)
def test_init_errors_name_the_argument(base, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ia3.init(base, **kwargs)


def test_inconsistent_leaves_name_the_path(base):
    params = ia3.init(base)
    with pytest.raises(ValueError, match=r"targets_out: .*attention/key/ia3_scale already exists"):
        ia3.init(params)
    flat = partition.flatten(params)
    flat["encoder/layer_1/mlp/output/ia3_scale_in"] = np.ones(12, np.float32)
    bad = partition.unflatten(flat)
    with pytest.raises(ValueError, match=r"layer_1/mlp/output/ia3_scale_in: shape \(12,\)"):
        jax.eval_shape(APPLY, bad, _batch(), None)
    with pytest.raises(ValueError, match=r"layer_1/mlp/output/ia3_scale_in has shape \(12,\)"):
        ia3.merge(bad)
    with pytest.raises(ValueError, match=r"ia3_scale has a zero entry"):
        ad = ia3.adapter(params)
        ad["encoder"]["layer_0"]["attention"]["key"]["ia3_scale"] = np.zeros(12, np.float32)
        ia3.unmerge(ia3.merge(params), ad)
