"""int8 frozen kernels: per-channel round-trip bound, LoRA on top trains alone, 1/4 the bytes."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab import testing
from ftlab.core import partition, sites
from ftlab.models import bert
from ftlab.peft import dense, dora, lora, qlora

TINY = bert.BertConfig.tiny(hidden_size=16, num_heads=2, intermediate_size=24, dropout_rate=0.0)
MODEL = bert.BertClassifier(TINY, num_classes=3)
KERNELS = r"encoder/layer_\d+/.*"  # every encoder kernel (attention, mlp) stored as int8
TARGETS = [r"encoder/layer_\d+/attention/(query|value)", r"encoder/layer_\d+/mlp/intermediate"]
RANK, ALPHA = 2, 4.0


def _apply(params, batch, rng):
    del rng
    return MODEL.apply({"params": params}, batch["input_ids"], batch["attention_mask"])


APPLY = lora.wrap_apply(_apply, alpha=ALPHA, rank=RANK)


def _batch(seed=0):
    return testing.classifier_batch(TINY, seed=seed, n=4, seq=7)


@pytest.fixture(scope="module")
def trees():
    """The float LoRA tree (non-zero lora_b, so the adapter matters) and its int8 twin."""
    base = testing.random_params(MODEL, _batch())
    params = lora.init(base, jax.random.key(1), targets=TARGETS, rank=RANK, alpha=ALPHA)
    flat = partition.flatten(params)
    rng = np.random.default_rng(0)
    for k in flat:
        if k.endswith("/lora_b"):
            flat[k] = rng.normal(scale=0.3, size=np.shape(flat[k])).astype(np.float32)
    params = partition.unflatten(flat)
    return params, qlora.quantize(params, targets=[KERNELS], bits=8)


def test_round_trip_is_within_half_a_step_per_output_channel():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(40, 6)).astype(np.float32) * np.array([1e-3, 0.1, 1, 10, 0, 3], np.float32)
    leaves = qlora.quantize_kernel_int8(w)
    data, scale = leaves[qlora.Q8_DATA], leaves[qlora.Q8_SCALE]
    assert data.dtype == np.int8 and data.shape == (40, 6)
    assert scale.dtype == np.float32 and scale.shape == (1, 6)
    deq = np.asarray(dense.dequantize_q8(data, scale, jnp.float32))
    assert np.all(np.abs(w - deq) <= scale / 2 * (1 + 1e-6)), np.max(np.abs(w - deq) / scale)
    # absmax: each non-zero channel uses the full code range; the all-zero one stays exactly 0
    np.testing.assert_array_equal(np.abs(data).max(0), [127, 127, 127, 127, 0, 127])
    np.testing.assert_array_equal(deq[:, 4], 0.0)
    # a convolution's kernel [3, 3, 4, 5]: one scale per output channel, ones over the window
    conv = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    leaves = qlora.quantize_kernel_int8(conv, n_in=3)
    assert leaves[qlora.Q8_SCALE].shape == (1, 1, 1, 5)
    deq = dense.dequantize_q8(leaves[qlora.Q8_DATA], leaves[qlora.Q8_SCALE], jnp.float32)
    assert np.all(np.abs(conv - np.asarray(deq)) <= leaves[qlora.Q8_SCALE] / 2 * (1 + 1e-6))


def test_int8_bert_with_lora_is_close_to_float_and_equals_its_dequantised_tree(trees):
    params, q = trees
    names = partition.flatten(q)
    assert "encoder/layer_0/attention/query/q8_data" in names
    assert not any(k.startswith("encoder/") and k.endswith("/kernel") for k in names)
    batch = _batch(1)
    fn = jax.jit(APPLY)
    y_float, y_q8 = fn(params, batch, None), fn(q, batch, None)
    # the same model on the dequantised kernels: exact up to float reassociation
    np.testing.assert_allclose(y_q8, fn(qlora.dequantize_tree(q), batch, None), atol=1e-5)
    # and close to the float model (int8 steps are 1/254 of each channel's range)
    err = np.max(np.abs(np.asarray(y_q8) - np.asarray(y_float)))
    assert 0 < err < 2e-2 * np.max(np.abs(np.asarray(y_float))), err
    # merge folds LoRA into the dequantised base: a plain tree with the same outputs
    merged = qlora.merge(q, alpha=ALPHA, rank=RANK)
    assert not any("/q8_" in n or "/lora_" in n for n in partition.flatten(merged))
    np.testing.assert_allclose(jax.jit(_apply)(merged, batch, None), y_q8, atol=1e-5)


def test_training_moves_only_lora_and_keeps_int8_leaves_bit_identical(trees):
    _, q = trees
    q = jax.tree.map(jnp.asarray, q)
    label_tree = partition.labels(q, lora.rules())
    tx = partition.optimizer({"train": optax.adam(1e-2)}, label_tree)
    state = testing.assert_trains_only(q, label_tree, tx, APPLY, _batch(2), steps=3)
    trainable = partition.flatten(state.trainable)
    assert trainable and all(k.endswith(("/lora_a", "/lora_b")) for k in trainable)
    frozen = partition.flatten(state.frozen)
    assert frozen["encoder/layer_0/mlp/output/q8_data"].dtype == jnp.int8


def test_int8_kernels_hold_a_quarter_of_the_float32_bytes(trees):
    params, q = trees
    flat, qflat = partition.flatten(params), partition.flatten(q)
    kernels = {k: v for k, v in flat.items() if k.startswith("encoder/") and k.endswith("/kernel")}
    q8 = {k: v for k, v in qflat.items() if "/q8_" in k}
    # one byte a weight plus a float32 scale per output unit
    assert qlora.nbytes(q8) == sum(v.size + 4 * v.shape[-1] for v in kernels.values())
    big = qlora.quantize({"d": {"kernel": np.ones((256, 64), np.float32)}}, targets=["d"], bits=8)
    assert qlora.nbytes(big) / (4 * 256 * 64) == pytest.approx(0.25, abs=0.005)


class _Layers(nn.Module):
    """One of each layer kind the interceptor reaches, for the int8 path off nn.Dense."""

    @nn.compact
    def __call__(self, x):  # x [b, 6, 8]
        h = nn.DenseGeneral((2, 4), name="proj")(x)  # kernel [8, 2, 4]
        h = nn.Einsum((2, 4, 8), "bthk,hko->bto", name="mix")(h)  # kernel [2, 4, 8]
        h = nn.Conv(8, (3,), name="conv")(nn.relu(h))  # kernel [3, 8, 8]
        return nn.DenseGeneral(3, axis=(-2, -1), name="head")(h)  # kernel [6, 8, 3]


def test_dense_general_einsum_conv_run_on_int8_with_lora():
    model = _Layers()
    x = jax.random.normal(jax.random.key(0), (2, 6, 8))
    base = jax.jit(model.init)(jax.random.key(1), x)["params"]
    f = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    layers = dense.layers(f, base, x)
    params = lora.init(base, jax.random.key(2), targets=[".*"], rank=2, alpha=4.0, layers=layers)
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.1 if "lora_b" in jax.tree_util.keystr(path) else v, params
    )
    q = qlora.quantize(params, targets=[".*"], bits=8, layers=layers)
    shapes = {k: v.shape for k, v in partition.flatten(q).items() if "/q8_scale" in k}
    assert shapes == {
        "proj/q8_scale": (1, 2, 4),
        "mix/q8_scale": (1, 1, 8),
        "conv/q8_scale": (1, 1, 8),
        "head/q8_scale": (1, 1, 3),
    }
    apply = jax.jit(lora.wrap_apply(f, alpha=4.0, rank=2))
    plain = qlora.dequantize_tree(q)
    chex.assert_trees_all_close(apply(q, x), apply(plain, x), rtol=1e-5, atol=1e-5)

    def loss(trainable, frozen, x):
        return jnp.sum(apply(partition.merge(trainable, frozen), x) ** 2)

    splits = [partition.split(p, partition.labels(p, lora.rules())) for p in (q, plain)]
    grads = [jax.jit(jax.grad(loss))(*s, x) for s in splits]
    chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
    # the backward pass keeps no dequantised float kernel as a residual
    trainable, frozen = splits[0]
    _, residuals = jax.vjp(lambda t: loss(t, frozen, x), trainable)
    kernel_shapes = {v.shape for k, v in partition.flatten(plain).items() if k.endswith("kernel")}
    held = {tuple(r.shape) for r in jax.tree.leaves(residuals) if r.dtype == jnp.float32}
    assert not held & kernel_shapes, held & kernel_shapes


class _One(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="net")(x)


def test_unused_int8_leaf_is_an_error():
    x = jnp.ones((1, 4))
    m = {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}
    q = qlora.quantize({"net": m, "unused": m}, targets=["net", "unused"], bits=8)
    f = dense.wrap_apply(lambda p, x: _One().apply({"params": p}, x))
    chex.assert_trees_all_close(f({"net": q["net"]}, x), f({"net": m}, x))  # 1s are exact
    # a module the model never calls: its int8 kernel would silently be ignored
    with pytest.raises(sites.UnconsumedLeavesError, match=r"int8 base leaves .*unused/q8_data"):
        f(q, x)


def test_clear_errors(trees):
    params, q = trees
    with pytest.raises(ValueError, match=r"qlora.quantize: bits must be 4 .* or 8 .*, got 16"):
        qlora.quantize(params, targets=[KERNELS], bits=16)
    with pytest.raises(ValueError, match=r"cfg.targets\[0\]: pattern 'nope' matched no linear"):
        qlora.quantize(params, targets=["nope"], bits=8, what="cfg")
    with pytest.raises(ValueError, match="layers applies to bits=8 only"):
        qlora.quantize(params, targets=[KERNELS], layers={})
    # DoRA cannot sit on an int8 kernel (its norm needs the float kernel)
    m = {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}
    d = dora.init({"net": m}, jax.random.key(0), targets=["net"], rank=1, alpha=1.0)
    d = qlora.quantize(d, targets=["net"], bits=8)
    f = dora.wrap_apply(lambda p, x: _One().apply({"params": p}, x), alpha=1.0, rank=1)
    with pytest.raises(ValueError, match=r"net: DoRA needs the full-precision kernel.*int8"):
        f(d, jnp.ones((1, 4)))
    # both a kernel and int8 leaves on one module
    both = {"net": {**m, **qlora.quantize({"net": m}, targets=["net"], bits=8)["net"]}}
    g = dense.wrap_apply(lambda p, x: _One().apply({"params": p}, x))
    with pytest.raises(ValueError, match="net: holds both kernel and q8_data"):
        g(both, jnp.ones((1, 4)))
