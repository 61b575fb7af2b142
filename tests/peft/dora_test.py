"""DoRA: exact at init, merged equals intercepted, ||W'||_c = m, frozen base kept, gradients."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab import testing
from ftlab.core import partition, train
from ftlab.models import bert
from ftlab.peft import dense, dora
from ftlab.tasks import classification

# query/key/value/out are [12, 12], intermediate [12, 20], output [20, 12].
TINY = bert.BertConfig.tiny(hidden_size=12, num_heads=2, intermediate_size=20, dropout_rate=0.0)
MODEL = bert.BertClassifier(TINY, num_classes=3)
TARGETS = [r"encoder/layer_\d+/attention/(query|value)", r"encoder/layer_\d+/mlp/intermediate"]
RANK, ALPHA = 2, 4.0


def _apply(params, batch, rng):
    kwargs = {} if rng is None else dict(deterministic=False, rngs={"dropout": rng})
    return MODEL.apply({"params": params}, batch["input_ids"], batch["attention_mask"], **kwargs)


APPLY = dora.wrap_apply(_apply, alpha=ALPHA, rank=RANK)


def _batch(seed=0, n=4, seq=7):
    return testing.classifier_batch(TINY, seed=seed, n=n, seq=seq)


@pytest.fixture(scope="module")
def base():
    return testing.random_params(MODEL, _batch())


def _dora_tree(base):
    return dora.init(base, jax.random.key(1), targets=TARGETS, rank=RANK, alpha=ALPHA)


def _randomized(params, seed=1):
    """Non-zero lora_b and a magnitude off ||W||_c: a model that differs from the base."""
    flat = partition.flatten(params)
    rng = np.random.default_rng(seed)
    for k in flat:
        if k.endswith("/lora_b"):
            flat[k] = rng.normal(scale=0.3, size=np.shape(flat[k])).astype(np.float32)
        elif k.endswith("/dora_m"):
            flat[k] = (flat[k] * rng.uniform(0.5, 1.5, size=np.shape(flat[k]))).astype(np.float32)
    return partition.unflatten(flat)


def _column_norm(kernel):
    return np.sqrt(np.sum(np.square(np.asarray(kernel, np.float64)), axis=0))


def test_init_adds_factors_and_magnitude(base):
    params = _dora_tree(base)
    added = sorted(set(partition.flatten(params)) - set(partition.flatten(base)))
    assert len(added) == 3 * 3 * TINY.num_layers
    inter = params["encoder"]["layer_0"]["mlp"]["intermediate"]
    chex.assert_shape(
        [inter["lora_a"], inter["lora_b"], inter["dora_m"]], [(12, RANK), (RANK, 20), (20,)]
    )
    assert np.all(np.asarray(inter["lora_b"]) == 0)
    np.testing.assert_allclose(inter["dora_m"], _column_norm(inter["kernel"]), rtol=1e-6)


def test_dora_model_equals_base_at_init(base):
    params = _dora_tree(base)
    batch = _batch()
    # Separate jits of _apply and APPLY: the same compiled functions serve the merge test.
    base_out = jax.jit(_apply)(base, batch, None)
    np.testing.assert_array_equal(jax.jit(APPLY)(params, batch, None), base_out)


def test_merged_equals_intercepted_and_decomposition_holds(base):
    params = _randomized(_dora_tree(base))
    batch = _batch()
    intercepted = jax.jit(APPLY)(params, batch, None)
    merged = dora.merge(params, alpha=ALPHA, rank=RANK)
    assert jax.tree.structure(merged) == jax.tree.structure(base)  # a plain base-model tree
    plain = jax.jit(_apply)(merged, batch, None)  # no interceptor
    np.testing.assert_allclose(plain, intercepted, atol=1e-5, rtol=1e-5)
    # The adapter matters, so the comparison above can fail.
    assert np.max(np.abs(intercepted - jax.jit(_apply)(base, batch, None))) > 1e-3
    # W' = m V / ||V||_c: each merged column has norm m (and direction W + s A B).
    flat = jax.tree.map(np.asarray, partition.flatten(params))
    flat_merged = jax.tree.map(np.asarray, partition.flatten(merged))
    for k in flat:
        if k.endswith("/dora_m"):
            module = k[: -len("/dora_m")]
            kernel = flat_merged[f"{module}/kernel"]
            np.testing.assert_allclose(_column_norm(kernel), flat[k], rtol=1e-5, err_msg=module)
            v = (
                flat[f"{module}/kernel"]
                + ALPHA / RANK * flat[f"{module}/lora_a"] @ flat[f"{module}/lora_b"]
            )
            np.testing.assert_allclose(kernel / flat[k], v / _column_norm(v), atol=1e-5)
    assert dora.adapter(params).keys() == {"encoder"}


def test_training_moves_only_dora_leaves_and_head(base):
    params = jax.tree.map(jnp.array, _dora_tree(base))
    label_tree = partition.labels(params, dora.rules(extra=[("head/.*", "train")]))
    tx = partition.optimizer({"train": optax.adam(1e-2)}, label_tree)
    trainable0, frozen0 = partition.split(jax.tree.map(np.array, params), label_tree)
    names = partition.flatten(trainable0)
    assert len(names) == 3 * 3 * TINY.num_layers + 2
    assert all(
        k.startswith("head/") or k.endswith(("/lora_a", "/lora_b", "/dora_m")) for k in names
    )
    state = train.init_state(params, label_tree, tx, seed=0)
    # adam keeps mu and nu per trainable leaf (DoRA leaves and head) plus a count: nothing else.
    opt_size = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
    assert opt_size == 2 * partition.count(trainable0) + 1
    step = jax.jit(train.make_train_step(classification.make_loss_fn(APPLY), tx), donate_argnums=0)
    for i in range(3):
        state, metrics = step(state, _batch(i))
    assert np.isfinite(metrics["train/loss"])
    chex.assert_trees_all_equal(state.frozen, frozen0)
    for name, leaf in partition.flatten(state.trainable).items():
        assert not np.array_equal(leaf, partition.flatten(trainable0)[name]), name


# --- gradients on one tiny dense layer ------------------------------------------------------

D_IN, D_OUT, R, S = 5, 4, 2, 0.7  # S = alpha / rank


def _tiny():
    """``(adapter, frozen, x)`` for one dense layer: the DoRA leaves, the kernel and bias, input."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
    adapter = {
        "lora_a": rng.normal(scale=0.5, size=(D_IN, R)),
        "lora_b": rng.normal(scale=0.5, size=(R, D_OUT)),
        "dora_m": _column_norm(w) * rng.uniform(0.5, 1.5, D_OUT),
    }
    frozen = {"kernel": w, "bias": rng.normal(size=D_OUT)}
    x = rng.normal(size=(3, D_IN))
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), (adapter, frozen, x))


def _loss(adapter, frozen, x, *, exact):
    y = dense.wrap_apply(
        lambda p: nn.Dense(D_OUT).apply({"params": p}, x), lora_scale=S, dora_exact_norm_grad=exact
    )(adapter | frozen)
    return jnp.sum(jnp.sin(y))


def _loss_norm_held(adapter, frozen, x, held):
    """The DoRA loss with ||W + s A B||_c fixed at ``held``'s value (what stop_gradient means)."""
    v = frozen["kernel"] + S * adapter["lora_a"] @ adapter["lora_b"]
    norm = dense.dora_column_norm(frozen["kernel"], held["lora_a"], held["lora_b"], scale=S)
    y = (x @ v) * (adapter["dora_m"] / norm)[None, :] + frozen["bias"][None, :]
    return jnp.sum(jnp.sin(y))


@pytest.mark.parametrize("name", ["dora_m", "lora_a", "lora_b"])
def test_gradients_match_finite_differences(name):
    adapter, frozen, x = _tiny()
    exact = jax.jit(lambda a: _loss(a, frozen, x, exact=True))
    held = jax.jit(lambda a: _loss_norm_held(a, frozen, x, adapter))
    grads = {
        "exact": jax.jit(jax.grad(exact))(adapter)[name],
        "held": jax.jit(jax.grad(lambda a: _loss(a, frozen, x, exact=False)))(adapter)[name],
    }
    eps = 1e-2
    for seed in range(3):
        d = jnp.asarray(np.random.default_rng(seed).normal(size=adapter[name].shape), jnp.float32)
        plus = adapter | {name: adapter[name] + eps * d}
        minus = adapter | {name: adapter[name] - eps * d}
        # The default holds the norm constant: its gradient is that of the norm-frozen loss.
        for kind, f in (("exact", exact), ("held", held)):
            fd = (f(plus) - f(minus)) / (2 * eps)
            # Relative to |g| |d|: a directional derivative can be near zero by cancellation.
            scale = np.linalg.norm(grads[kind]) * np.linalg.norm(d)
            assert abs(jnp.vdot(grads[kind], d) - fd) <= 1e-2 * scale, (kind, seed)
    if name == "dora_m":  # m is not inside the norm: both gradients are exact
        np.testing.assert_allclose(grads["held"], grads["exact"], rtol=1e-5, atol=1e-6)
    else:  # the option changes something
        assert np.max(np.abs(grads["held"] - grads["exact"])) > 1e-3


def test_held_norm_adds_no_dense_array_to_the_backward_pass():
    adapter, frozen, x = _tiny()

    def count(f):
        return testing.jaxpr_output_shapes(jax.make_jaxpr(f)(adapter).jaxpr).count((D_IN, D_OUT))

    n_forward = count(lambda a: _loss(a, frozen, x, exact=False))
    assert n_forward > 0  # the norm of W + s A B needs the [in, out] matrix: inherent to DoRA
    # Gradients of the adapter only (the kernel is frozen): the factored backward pass adds no
    # [in, out] array; differentiating through the norm does.
    assert count(jax.grad(lambda a: _loss(a, frozen, x, exact=False))) == n_forward
    assert count(jax.grad(lambda a: _loss(a, frozen, x, exact=True))) > n_forward


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(targets=[r"encoder/layer_\d+/attention/qury"]),
            r"dora\.init: targets\[0\].*available: .*attention/query",
        ),
        (dict(rank=0), r"dora\.init: rank"),
        (dict(rank=13), r"dora\.init: rank=13 exceeds min\(in, out\)=12"),
        (dict(alpha=0.0), r"dora\.init: alpha"),
    ],
    ids=["typo", "rank0", "rank-too-big", "alpha0"],
)
def test_init_errors_name_the_argument(base, kwargs, match):
    args = dict(targets=TARGETS, rank=RANK, alpha=ALPHA) | kwargs
    with pytest.raises(ValueError, match=match):
        dora.init(base, jax.random.key(0), **args)


def test_inconsistent_leaves_name_the_module(base):
    params = _dora_tree(base)
    with pytest.raises(ValueError, match=r"lora_a already exists"):
        dora.init(params, jax.random.key(0), targets=TARGETS, rank=RANK, alpha=ALPHA)
    with pytest.raises(ValueError, match=r"rank=4 but .*lora_a has rank 2"):
        dora.merge(params, alpha=ALPHA, rank=4)
    with pytest.raises(ValueError, match=r"DoRA leaves but no lora_scale"):
        jax.eval_shape(dense.wrap_apply(_apply), params, _batch(), None)
    flat = partition.flatten(params)
    del (
        flat["encoder/layer_1/attention/value/lora_a"],
        flat["encoder/layer_1/attention/value/lora_b"],
    )
    stray = partition.unflatten(flat)
    with pytest.raises(ValueError, match=r"encoder/layer_1/attention/value: has .*/dora_m but no"):
        jax.eval_shape(APPLY, stray, _batch(), None)
    with pytest.raises(ValueError, match=r"encoder/layer_1/attention/value/lora_a is missing"):
        dora.merge(stray, alpha=ALPHA, rank=RANK)
    flat = partition.flatten(params)
    flat["encoder/layer_0/attention/query/dora_m"] = np.ones(5, np.float32)
    with pytest.raises(ValueError, match=r"layer_0/attention/query/dora_m: shape \(5,\)"):
        jax.eval_shape(APPLY, partition.unflatten(flat), _batch(), None)
