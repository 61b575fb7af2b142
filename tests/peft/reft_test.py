"""LoReFT: exact at init, edits only chosen positions, R stays orthonormal, training, errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab import testing
from ftlab.core import partition, train
from ftlab.models import bert, hooks
from ftlab.peft import reft
from ftlab.tasks import classification

TINY = bert.BertConfig.tiny(dropout_rate=0.0)
MODEL = bert.BertClassifier(TINY, num_classes=3)
ENCODER = bert.BertEncoder(TINY)
RANK = 2


def _apply(params, batch, rng):
    del rng
    return MODEL.apply({"params": params}, batch["input_ids"], batch["attention_mask"])


APPLY = reft.wrap_apply(_apply, first_n=1, last_n=1)


def _batch(seed=0, n=4, seq=7):
    return testing.classifier_batch(TINY, seed=seed, n=n, seq=seq)


@functools.cache
def _sites():
    """The model's hook sites, traced once (`hooks.discover`)."""
    return hooks.discover(_apply, testing.random_params(MODEL, _batch()), _batch(), None)


@pytest.fixture(scope="module")
def base():
    return testing.random_params(MODEL, _batch())


def _with_reft(base, layers=(0, 1)):
    return reft.init(base, jax.random.key(1), sites=_sites(), layers=list(layers), rank=RANK)


def test_positions_are_first_and_last_real_tokens():
    mask = np.array([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0]])
    got = np.asarray(reft.positions(mask, first_n=2, last_n=1)).astype(int)
    want = [[1, 1, 0, 0, 1, 0, 0], [0, 0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0]]
    np.testing.assert_array_equal(got, want)


def test_init_is_an_identity(base):
    params = _with_reft(base)
    r = params["encoder"]["layer_0"]["reft"]
    chex.assert_shape([r["rotation"], r["weight"], r["bias"]], [(RANK, 16), (RANK, 16), (RANK,)])
    np.testing.assert_allclose(r["rotation"] @ r["rotation"].T, np.eye(RANK), atol=1e-6)
    # The intervention itself is exactly zero at init: (W - R) h + b = 0 with W = R, b = 0.
    h = np.random.default_rng(1).normal(size=(2, 5, 16)).astype(np.float32)
    edited = jax.jit(reft.intervene)(r, h, np.ones((2, 5), bool))
    np.testing.assert_array_equal(edited, h)
    # The whole model agrees to float rounding only: the hook changes how XLA fuses the layer
    # norm with the next layer's dense, which moves some logits by one ulp.
    batch = _batch(1)
    got, want = jax.jit(lambda p, q: (APPLY(p, batch, None), _apply(q, batch, None)))(params, base)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_edits_only_the_chosen_positions_of_the_chosen_layer(base):
    params = _with_reft(base, layers=[1])  # the last layer: nothing downstream mixes positions
    rng = np.random.default_rng(2)
    r = params["encoder"]["layer_1"]["reft"]
    r["weight"] = rng.normal(size=(RANK, 16)).astype(np.float32)
    r["bias"] = rng.normal(size=(RANK,)).astype(np.float32)
    b = _batch(2)
    mask = b["attention_mask"]

    def encode(p):
        return ENCODER.apply({"params": p}, b["input_ids"], mask)

    got, want = jax.jit(lambda p, q: (reft.wrap_apply(encode, first_n=1, last_n=2)(p), encode(q)))(
        params["encoder"], base["encoder"]
    )
    changed = np.abs(np.asarray(got) - np.asarray(want)).max(-1) > 1e-4
    np.testing.assert_array_equal(changed, reft.positions(mask, first_n=1, last_n=2))
    # At an edited position the change lies in the row space of R: h' - h = R^T (...).
    rot = reft.orthonormal_rows(r["rotation"])
    d = np.asarray(got - want)[changed]
    np.testing.assert_allclose(d @ rot.T @ rot, d, atol=1e-5)


def test_training_keeps_r_orthonormal_moves_only_reft_and_head(base):
    params = jax.tree.map(jnp.array, _with_reft(base))
    label_tree = partition.labels(params, reft.rules(extra=[("head/.*", "train")]))
    tx = partition.optimizer({"train": optax.adam(3e-2)}, label_tree)
    trainable0, frozen0 = partition.split(jax.tree.map(np.array, params), label_tree)
    assert all(k.startswith("head/") or "/reft/" in k for k in partition.flatten(trainable0))
    state = train.init_state(params, label_tree, tx, seed=0)
    assert sum(np.size(x) for x in jax.tree.leaves(state.opt_state)) == (
        2 * partition.count(trainable0) + 1
    )
    step = jax.jit(train.make_train_step(classification.make_loss_fn(APPLY), tx), donate_argnums=0)
    batch, losses = _batch(3), []
    for _ in range(5):
        state, metrics = step(state, batch)
        losses.append(float(metrics["train/loss"]))
    assert losses[-1] < losses[0]
    chex.assert_trees_all_equal(state.frozen, frozen0)
    flat0 = partition.flatten(trainable0)
    for name, leaf in partition.flatten(state.trainable).items():
        assert not np.array_equal(leaf, flat0[name]), name
    for i in range(TINY.num_layers):
        rotation = state.trainable["encoder"][f"layer_{i}"]["reft"]["rotation"]
        # The free matrix has left the orthonormal set; the R the model uses has not.
        assert np.abs(rotation @ rotation.T - np.eye(RANK)).max() > 1e-5
        rot = reft.orthonormal_rows(rotation)
        np.testing.assert_allclose(rot @ rot.T, np.eye(RANK), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layers=[2]), r"reft\.init: layers\[0\]=2 .* layers 0\.\.1"),
        (dict(layers=[0, 0]), r"reft\.init: layers"),
        (dict(rank=0), r"reft\.init: rank"),
        (dict(rank=17), r"reft\.init: rank=17 exceeds the hidden width 16"),
    ],
    ids=["layer-out-of-range", "layer-repeated", "rank0", "rank-too-big"],
)
def test_init_errors_name_the_config_key(base, kwargs, match):
    with pytest.raises(ValueError, match=match):
        reft.init(base, jax.random.key(0), sites=_sites(), **(dict(layers=[0], rank=RANK) | kwargs))


def test_apply_errors_name_the_leaf_path(base):
    with pytest.raises(ValueError, match=r"reft: first_n and last_n"):
        reft.wrap_apply(_apply, first_n=0, last_n=0)
    params = _with_reft(base)
    with pytest.raises(ValueError, match="encoder/layer_0/reft is in the params.*reft.wrap_apply"):
        jax.eval_shape(_apply, params, _batch(), None)
    del params["encoder"]["layer_1"]["reft"]["bias"]
    with pytest.raises(ValueError, match="encoder/layer_1/reft/bias is missing"):
        jax.eval_shape(APPLY, params, _batch(), None)


def test_init_sizes_interventions_by_the_residual_width_under_grouped_query_attention():
    from ftlab.models import llama

    config = llama.LlamaConfig.tiny()  # hidden 16, key/value projections 8 wide (GQA)
    base = llama.init(config, jax.random.key(0))
    model = llama.LlamaForCausalLM(config)
    sites = hooks.discover(lambda p: model.apply({"params": p}, jnp.ones((1, 3), jnp.int32)), base)
    params = reft.init(base, jax.random.key(1), sites=sites, layers=[0], rank=2)
    leaves = partition.flatten(reft.adapter(params))
    widths = {v.shape[-1] for k, v in leaves.items() if v.ndim == 2}
    assert config.hidden_size in widths and config.kv_dim not in widths, leaves
