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


# -- donation -----------------------------------------------------------------------------------
def test_donated_steps_never_delete_the_callers_params(params):
    """init_state copies: the README's order (state, donated steps, then params again) works."""
    labels = partition.labels(params, [("head/.*", "train"), (".*", "frozen")])
    tx = optax.adam(1e-2)
    state = train.init_state(params, labels, tx, seed=0)
    step = jax.jit(train.make_train_step(classification.make_loss_fn(_apply), tx), donate_argnums=0)
    for i in range(2):
        state, _ = step(state, _batch(i))
    # Every leaf of the caller's tree is alive and unchanged, frozen and trainable alike.
    for name, leaf in partition.flatten(params).items():
        assert not leaf.is_deleted(), name
    state2 = train.init_state(params, labels, tx, seed=0)
    chex.assert_trees_all_equal(state2.frozen, state.frozen)
    # copy=False shares the buffers, and then the donated step does delete them.
    shared = jax.tree.map(jnp.array, params)
    state3 = train.init_state(shared, labels, tx, seed=0, copy=False)
    step(state3, _batch(0))
    assert shared["body"]["kernel"].is_deleted()


# -- non-parameter collections: a BatchNorm CNN ---------------------------------------------------
class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, *, train: bool):  # [n, 6, 6, 1] -> [n, 3]
        x = nn.Conv(4, (3, 3), name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(x)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        return nn.Dense(3, name="head")(x)


_BN = _BNNet()


def _bn_batch(seed=0, n=16):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=(n,)).astype(np.int32)
    x = rng.normal(size=(n, 6, 6, 1)).astype(np.float32) + y[:, None, None, None]
    return {"x": x, "label": y}


def _bn_loss(*, train_mode: bool):
    def loss_fn(variables, batch, rng):
        del rng
        if train_mode:
            logits, updates = _BN.apply(variables, batch["x"], train=True, mutable=["batch_stats"])
            aux = {"collections": updates}
        else:
            logits, aux = _BN.apply(variables, batch["x"], train=False), {}
        xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return jnp.mean(xent), aux

    return loss_fn


@pytest.fixture(scope="module")
def bn_variables():
    variables = jax.jit(lambda r: _BN.init(r, jnp.zeros((2, 6, 6, 1)), train=False))(
        jax.random.PRNGKey(0)
    )
    return jax.tree.map(np.asarray, variables)


@pytest.fixture(scope="module")
def bn_finetuned(bn_variables):
    """Full fine-tuning with batch_stats updated by the step: (start state, end state, losses)."""
    params, stats = bn_variables["params"], {"batch_stats": bn_variables["batch_stats"]}
    labels = partition.labels(params, [(".*", "train")])
    tx = optax.adam(3e-2)
    start = train.init_state(params, labels, tx, seed=0, collections=stats)
    step = jax.jit(train.make_train_step(_bn_loss(train_mode=True), tx))
    state, losses = start, []
    for i in range(8):
        state, metrics = step(state, _bn_batch(i % 2))
        losses.append(float(metrics["train/loss"]))
    return start, state, losses


def test_batchnorm_model_fine_tunes_and_its_batch_stats_move(bn_finetuned):
    start, end, losses = bn_finetuned
    assert losses[-1] < 0.8 * losses[0], losses
    assert set(end.collections) == {"batch_stats"}
    for name, leaf in partition.flatten(end.collections).items():
        assert not np.allclose(leaf, partition.flatten(start.collections)[name]), name
    # The eval step sees the running statistics: variables = {"params", "batch_stats"}.
    assert set(end.variables) == {"params", "batch_stats"}


def test_frozen_batch_stats_stay_bit_identical(bn_variables):
    """A linear probe on a BatchNorm trunk: rules freeze batch_stats/..., in eval or train mode."""
    params, stats = bn_variables["params"], {"batch_stats": bn_variables["batch_stats"]}
    labels = partition.labels(params, [("head/.*", "train"), (".*", "frozen")])
    stat_labels = partition.labels(stats, [("batch_stats/.*", "frozen")])
    tx = optax.adam(3e-2)
    for train_mode in (False, True):
        state = train.init_state(
            params, labels, tx, seed=0, collections=stats, collection_labels=stat_labels
        )
        step = jax.jit(train.make_train_step(_bn_loss(train_mode=train_mode), tx))
        for i in range(2):
            state, metrics = step(state, _bn_batch(i))
        assert "train/collections" not in metrics
        chex.assert_trees_all_equal(state.collections, stats)
        chex.assert_trees_all_equal(state.frozen, partition.split(params, labels)[1])
        assert not np.allclose(state.trainable["head"]["kernel"], params["head"]["kernel"])


def test_collections_the_loss_does_not_return_are_an_error(bn_variables):
    params, stats = bn_variables["params"], {"batch_stats": bn_variables["batch_stats"]}
    labels = partition.labels(params, [(".*", "train")])
    tx = optax.sgd(0.1)
    state = train.init_state(params, labels, tx, seed=0, collections=stats)
    eval_mode = jax.jit(train.make_train_step(_bn_loss(train_mode=False), tx))
    with pytest.raises(ValueError, match=r"loss_fn returned no aux\['collections'\].*bn/mean"):
        eval_mode(state, _bn_batch())
    # A loss that returns collections the state does not hold (built without collections=).
    bare = train.init_state(params, labels, tx, seed=0)

    def forgot(params, batch, rng):
        variables = {"params": params, **stats}
        return _bn_loss(train_mode=True)(variables, batch, rng)

    with pytest.raises(ValueError, match=r"leaves the state does not hold: \['batch_stats/bn/"):
        jax.jit(train.make_train_step(forgot, tx))(bare, _bn_batch())
    with pytest.raises(ValueError, match=r"collection_labels does not match collections"):
        train.init_state(params, labels, tx, seed=0, collections=stats, collection_labels={})


def test_pmapped_step_averages_collections_like_the_jitted_one(bn_variables):
    """Under `jax.pmap` (one device here) the step pmeans the updated batch_stats."""
    params, stats = bn_variables["params"], {"batch_stats": bn_variables["batch_stats"]}
    labels = partition.labels(params, [(".*", "train")])
    tx = optax.sgd(0.1)
    state = train.init_state(params, labels, tx, seed=0, collections=stats)
    batch = _bn_batch()
    jitted, _ = jax.jit(train.make_train_step(_bn_loss(train_mode=True), tx))(state, batch)
    step = train.make_train_step(_bn_loss(train_mode=True), tx, axis_name="data")
    pmapped, _ = jax.pmap(step, axis_name="data")(
        jax.tree.map(lambda x: x[None], state), jax.tree.map(lambda x: x[None], batch)
    )
    # rng differs (fold_in of the device index) but this loss draws none.
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x[0], pmapped.collections), jitted.collections, rtol=1e-6
    )
    assert not np.allclose(jitted.collections["batch_stats"]["bn"]["mean"], 0.0)


# -- gradient accumulation, remat, precision --------------------------------------------------


def _no_dropout_loss():
    return classification.make_loss_fn(lambda p, b, r: _apply(p, b, None))


def _run(params, loss_fn, tx, batches, **kwargs):
    labels = partition.labels(params, [(".*", "train")])
    state = train.init_state(params, labels, tx, seed=0)
    step = jax.jit(train.make_train_step(loss_fn, tx, **kwargs), donate_argnums=0)
    losses = []
    for b in batches:
        state, metrics = step(state, b)
        losses.append(float(metrics["train/loss"]))
    return state, losses


def test_accumulating_four_micro_batches_equals_one_batch_of_four_times_the_size(params):
    tx = optax.adam(1e-2, eps=1e-3)
    batches = [_batch(seed=s, n=16) for s in range(2)]
    one, one_losses = _run(params, _no_dropout_loss(), tx, batches)
    acc, acc_losses = _run(params, _no_dropout_loss(), tx, batches, accumulate=4)
    np.testing.assert_allclose(acc_losses, one_losses, rtol=1e-6)
    chex.assert_trees_all_close(acc.trainable, one.trainable, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(acc.opt_state, one.opt_state, rtol=1e-5, atol=1e-6)


def _token_loss(params, batch, rng):
    # A mean over unmasked "tokens": micro-batches hold different numbers of them.
    logits = _apply(params, batch, None)
    per_row = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    tokens = jnp.sum(batch["mask"])
    return jnp.sum(per_row * batch["mask"]) / tokens, {"tokens": tokens}


def test_token_weighted_accumulation_is_exact_only_with_the_weight(params):
    batch = dict(_batch(n=16), mask=np.array([1] * 4 + [0, 1, 0, 0] * 3, np.float32))
    tx = optax.sgd(0.5)
    one, (loss,) = _run(params, _token_loss, tx, [batch])
    weighted, (w_loss,) = _run(params, _token_loss, tx, [batch], accumulate=4, weight="tokens")
    plain, (p_loss,) = _run(params, _token_loss, tx, [batch], accumulate=4)
    np.testing.assert_allclose(w_loss, loss, rtol=1e-6)
    chex.assert_trees_all_close(weighted.trainable, one.trainable, rtol=1e-5, atol=1e-6)
    assert abs(p_loss - loss) > 1e-3  # the mean of micro-batch means is another number


def test_accumulation_errors_name_the_argument(params, bn_variables):
    tx = optax.sgd(0.1)
    with pytest.raises(ValueError, match="accumulate=0; expected an integer >= 1"):
        train.make_train_step(_no_dropout_loss(), tx, accumulate=0)
    with pytest.raises(ValueError, match="weight='tokens' only weights micro-batches"):
        train.make_train_step(_no_dropout_loss(), tx, weight="tokens")
    with pytest.raises(ValueError, match=r"accumulate=3 must divide .* leading sizes \[16\]"):
        _run(params, _no_dropout_loss(), tx, [_batch()], accumulate=3)
    with pytest.raises(ValueError, match=r"weight='tokens' is not in the loss's aux.*accuracy"):
        _run(params, _no_dropout_loss(), tx, [_batch()], accumulate=2, weight="tokens")
    labels = partition.labels(bn_variables["params"], [(".*", "train")])
    stats = {"batch_stats": bn_variables["batch_stats"]}
    state = train.init_state(bn_variables["params"], labels, tx, seed=0, collections=stats)
    step = train.make_train_step(_bn_loss(train_mode=True), tx, accumulate=2)
    with pytest.raises(ValueError, match="accumulate=2 on a state whose collections the step"):
        jax.eval_shape(step, state, _bn_batch())


def test_remat_per_module_keeps_the_gradient_and_recomputes(params):
    loss_fn = _no_dropout_loss()
    batch = _batch()

    def grad(f):
        return jax.grad(lambda p: f(p, batch, None)[0])

    wrapped = train.remat(loss_fn, policy="nothing_saveable", modules="body")
    chex.assert_trees_all_close(grad(wrapped)(params), grad(loss_fn)(params), rtol=1e-6)
    # One checkpointed call: the body layer's (the head's 3 outputs are not wrapped).
    text = str(jax.make_jaxpr(grad(wrapped))(params))
    assert text.count("policy=<function nothing_saveable") == 1, text
    assert "policy=" not in str(jax.make_jaxpr(grad(loss_fn))(params))
    whole = train.remat(loss_fn, policy="dots_saveable")
    chex.assert_trees_all_close(grad(whole)(params), grad(loss_fn)(params), rtol=1e-6)
    with pytest.raises(ValueError, match="remat: policy='everything'; expected one of"):
        train.remat(loss_fn, policy="everything")
    nowhere = train.remat(loss_fn, policy="nothing_saveable", modules="encoder/layer_\\d+")
    with pytest.raises(ValueError, match=r"matched no module the loss called; .*'body', 'head'"):
        grad(nowhere)(params)


def test_precision_policy_keeps_master_leaves_and_narrows_the_frozen_base(params):
    from ftlab.peft import qlora  # noqa: PLC0415 - a Q4 base is one more frozen tree here

    policy = train.Precision(compute="bfloat16", frozen="bfloat16")
    labels = partition.labels(params, [("head/.*", "train"), (".*", "frozen")])
    tx = optax.adam(1e-2)
    state = train.init_state(params, labels, tx, seed=0, precision=policy)
    assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {jnp.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves((state.trainable, state.opt_state[0].mu))} == {
        jnp.dtype("float32")
    }
    ref = train.init_state(params, labels, tx, seed=0)
    step = jax.jit(train.make_train_step(_no_dropout_loss(), tx, precision=policy))
    ref_step = jax.jit(train.make_train_step(_no_dropout_loss(), tx))
    new, metrics = step(state, _batch())
    _, ref_metrics = ref_step(ref, _batch())
    assert metrics["train/loss"].dtype == jnp.float32
    np.testing.assert_allclose(metrics["train/loss"], ref_metrics["train/loss"], rtol=2e-2)
    assert new.trainable["head"]["kernel"].dtype == jnp.float32
    chex.assert_trees_all_equal(new.frozen, state.frozen)
    # A 4-bit base keeps its codes and float16 scales; only wider floats are narrowed.
    q4 = qlora.quantize({"q": {"kernel": np.ones((32, 4), np.float32)}}, targets=["q"])
    kept = train.cast_floats(q4, "bfloat16")
    assert {k: v.dtype for k, v in partition.flatten(kept).items()} == {
        k: v.dtype for k, v in partition.flatten(q4).items()
    }
    with pytest.raises(ValueError, match="Precision: compute='int8' is not a floating dtype"):
        train.Precision(compute="int8")


def test_an_integer_frozen_precision_points_to_quantize():
    with pytest.raises(ValueError, match=r"frozen='int8' is not a cast; quantize .* bits=8"):
        train.Precision(frozen="int8")
