"""QLoRA: Q4_1 kernels match ggml bit for bit, train LoRA without a full-precision base copy."""

import chex
import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from gguf import quants

from ftlab.core import partition, train
from ftlab.peft import lora, qlora

Q4_1 = gguf.GGMLQuantizationType.Q4_1


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(64, use_bias=False, name="up")(x))
        return nn.Dense(2, name="out")(h)


@pytest.fixture(scope="module")
def setup():
    model = _Mlp()
    x = jax.random.normal(jax.random.key(0), (8, 64))
    params = model.init(jax.random.key(1), x)["params"]
    params = lora.init(params, jax.random.key(2), targets=["up"], rank=4, alpha=8.0)
    # a nonzero B so that the LoRA term matters in the comparisons
    params["up"]["lora_b"] = 0.1 * jax.random.normal(jax.random.key(3), (4, 64))
    q = qlora.quantize(params, targets=["up", "out"])
    apply = lora.wrap_apply(lambda p, x: model.apply({"params": p}, x), alpha=8.0, rank=4)
    return apply, x, params, q


def test_quantize_and_dequantize_match_ggml_bit_for_bit():
    w = np.random.RandomState(0).randn(5, 96).astype(np.float32)  # GGUF's (out, in)
    raw = quants.quantize(w, Q4_1)
    ours = qlora.quantize_kernel(w.T)
    for name, leaf in qlora.from_gguf_q4_1(raw).items():
        np.testing.assert_array_equal(ours[name], leaf, err_msg=name)
    deq = qlora.dequantize(*(ours[k] for k in (qlora.Q4_DATA, qlora.Q4_SCALE, qlora.Q4_MIN)))
    np.testing.assert_array_equal(np.asarray(deq), quants.dequantize(raw, Q4_1))


def test_q4_forward_and_lora_gradient_equal_the_dequantised_model(setup):
    apply, x, _, q = setup
    plain = qlora.dequantize_tree(q)
    chex.assert_trees_all_close(apply(q, x), apply(plain, x), rtol=1e-5, atol=1e-5)

    def loss(trainable, frozen):
        return jnp.sum(apply(partition.merge(trainable, frozen), x) ** 2)

    rules = lora.rules(extra=[("out/bias", "train")])
    grads = [jax.grad(loss)(*partition.split(p, partition.labels(p, rules))) for p in (q, plain)]
    chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_backward_pass_keeps_no_full_precision_kernel(setup):
    apply, x, _, q = setup
    label_tree = partition.labels(q, lora.rules(extra=[("out/bias", "train")]))
    trainable, frozen = partition.split(q, label_tree)
    f = lambda t: jnp.sum(apply(partition.merge(t, frozen), x))  # noqa: E731
    _, residuals = jax.vjp(f, trainable)
    # the residuals held for the backward pass: inputs and small activations, never the [64, 64]
    # or [2, 64] dequantised float kernels
    shapes = {tuple(r.shape) for r in jax.tree.leaves(residuals) if r.dtype == jnp.float32}
    assert (64, 64) not in shapes and (2, 64) not in shapes and (64, 2) not in shapes, shapes


def test_training_changes_only_lora_and_keeps_q4_blocks_bit_identical(setup):
    apply, x, _, q = setup
    y = jnp.arange(8) % 2
    label_tree = partition.labels(q, lora.rules(extra=[("out/bias", "train")]))
    tx = partition.optimizer({"train": optax.adam(1e-2)}, label_tree)

    def loss_fn(params, batch, rng):
        del rng
        logits = apply(params, batch["x"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        return loss, {}

    state = train.init_state(q, label_tree, tx, seed=0)
    step = jax.jit(train.make_train_step(loss_fn, tx))
    losses = []
    for _ in range(5):
        state, metrics = step(state, {"x": x, "y": y})
        losses.append(float(metrics["train/loss"]))
    assert losses[-1] < losses[0]
    after = partition.flatten(state.params)
    for name, leaf in partition.flatten(q).items():
        if "/q4_" in name:
            assert after[name].dtype == leaf.dtype
            np.testing.assert_array_equal(after[name], leaf, err_msg=name)
    assert qlora.nbytes({k: v for k, v in after.items() if "/q4_" in k}) < 0.16 * 4 * (
        64 * 64 + 64 * 2
    )


def test_merge_gives_a_plain_tree_with_the_same_outputs(setup):
    apply, x, _, q = setup
    merged = qlora.merge(q, alpha=8.0, rank=4)
    names = partition.flatten(merged)
    assert not any("/q4_" in n or "/lora_" in n for n in names)
    plain_apply = lambda p, x: _Mlp().apply({"params": p}, x)  # noqa: E731
    chex.assert_trees_all_close(plain_apply(merged, x), apply(q, x), rtol=1e-5, atol=1e-5)


def test_clear_errors():
    params = {"up": {"kernel": np.ones((40, 3), np.float32)}}
    with pytest.raises(ValueError, match="matched no dense kernel"):
        qlora.quantize(params, targets=["down"])
    with pytest.raises(ValueError, match=r"up/kernel: input size 40 is not a multiple of 32"):
        qlora.quantize(params, targets=["up"])
    with pytest.raises(ValueError, match="20"):
        qlora.from_gguf_q4_1(np.zeros((2, 30), np.uint8))
