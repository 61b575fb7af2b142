"""The partition-aware train step: frozen leaves untouched, exact gradients, one compile."""

import chex
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab.core import partition, train
from ftlab.tasks import classification


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x, *, deterministic=True):
        x = nn.tanh(nn.Dense(8, name="body")(x))
        x = nn.Dropout(0.2, deterministic=deterministic)(x)
        return nn.Dense(3, name="head")(x)


_MODEL = _MLP()


def _apply(params, batch, rng):
    if rng is None:
        return _MODEL.apply({"params": params}, batch["x"])
    return _MODEL.apply({"params": params}, batch["x"], deterministic=False, rngs={"dropout": rng})


def _batch(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(n, 5)).astype(np.float32),
        "label": rng.integers(0, 3, size=(n,)).astype(np.int32),
    }


@pytest.fixture(scope="module")
def _init_params():
    return jax.tree.map(np.asarray, _MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))["params"])


@pytest.fixture
def params(_init_params):
    # Fresh device buffers per test: the compiled steps donate (and so delete) their input state.
    return jax.tree.map(jnp.array, _init_params)


@pytest.mark.parametrize(
    "rules",
    [
        [("head/.*", "train"), (".*", "frozen")],  # linear probe
        [(".*/bias", "train"), (".*", "frozen")],  # BitFit without a head
    ],
    ids=["probe", "bitfit"],
)
def test_frozen_leaves_bit_identical_and_stateless(params, rules):
    labels = partition.labels(params, rules)
    tx = partition.optimizer({"train": optax.adam(1e-1)}, labels)
    before = jax.tree.map(np.array, params)
    trainable_before, frozen_before = partition.split(before, labels)
    state = train.init_state(params, labels, tx, seed=0)
    # adam keeps mu and nu per trainable leaf, plus a step count: nothing for frozen leaves.
    opt_size = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
    assert opt_size == 2 * partition.count(trainable_before) + 1
    step = jax.jit(train.make_train_step(classification.make_loss_fn(_apply), tx), donate_argnums=0)
    for i in range(3):
        state, _ = step(state, _batch(i))
    chex.assert_trees_all_equal(state.frozen, frozen_before)
    for name, leaf in partition.flatten(state.trainable).items():
        assert not np.allclose(leaf, partition.flatten(trainable_before)[name]), name


def test_gradient_of_trainable_subtree_matches_finite_differences(params):
    labels = partition.labels(
        params, [("head/.*", "train"), ("body/bias", "train"), (".*", "frozen")]
    )
    trainable, frozen = partition.split(params, labels)
    loss_fn = classification.make_loss_fn(_apply)
    batch = _batch(1)

    def f(t):
        return loss_fn(partition.merge(t, frozen), batch, None)[0]

    grads = jax.grad(f)(trainable)
    flat_t, unravel = jax.flatten_util.ravel_pytree(trainable)
    flat_g, _ = jax.flatten_util.ravel_pytree(grads)
    eps = 1e-3
    rng = np.random.default_rng(0)
    for i in rng.choice(flat_t.size, size=8, replace=False):
        e = jnp.zeros_like(flat_t).at[i].set(eps)
        fd = (f(unravel(flat_t + e)) - f(unravel(flat_t - e))) / (2 * eps)
        np.testing.assert_allclose(flat_g[i], fd, rtol=2e-2, atol=2e-4)


def test_gradient_is_not_computed_for_frozen_leaves(params):
    labels = partition.labels(params, [("head/.*", "train"), (".*", "frozen")])
    tx = optax.sgd(0.1)
    state = train.init_state(params, labels, tx, seed=0)
    step = train.make_train_step(classification.make_loss_fn(_apply), tx)
    jaxpr = jax.make_jaxpr(step)(state, _batch()).jaxpr
    # The only [5, 8] arrays in the step are the frozen body kernel itself (an input); no
    # gradient of that shape is produced anywhere.
    shapes = [tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars]
    assert (5, 8) not in shapes


def test_step_compiles_once(params):
    labels = partition.labels(params, [("head/.*", "train"), (".*", "frozen")])
    tx = optax.adam(1e-2)
    state = train.init_state(params, labels, tx, seed=0)
    raw = train.make_train_step(classification.make_loss_fn(_apply), tx)
    step = jax.jit(chex.assert_max_traces(raw, n=1), donate_argnums=0)
    for i in range(4):
        state, metrics = step(state, _batch(i))
    assert int(state.step) == 4
    assert set(metrics) == {"train/loss", "train/grad_norm", "train/accuracy"}


def test_eval_step_masks_padding(params):
    eval_step = jax.jit(train.make_eval_step(classification.make_eval_fn(_apply)))
    labels = partition.labels(params, [(".*", "train")])
    state = train.init_state(params, labels, optax.sgd(0.1), seed=0)
    batch = _batch(2, n=8)
    full = eval_step(state, {**batch, "mask": np.ones(8, np.float32)})
    half = {k: v[:4] for k, v in batch.items()}
    padded = {k: np.concatenate([v, v[:1].repeat(4, 0)]) for k, v in half.items()}
    masked = eval_step(state, {**padded, "mask": np.r_[np.ones(4), np.zeros(4)].astype(np.float32)})
    assert float(masked["count"]) == 4 and float(full["count"]) == 8
    ref = eval_step(state, {**half, "mask": np.ones(4, np.float32)})
    np.testing.assert_allclose(masked["loss"], ref["loss"], rtol=1e-6)
