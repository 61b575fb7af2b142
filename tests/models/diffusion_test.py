"""The flow-matching U-Net: LoRA reaches its convolutions and dense layers and trains alone, the
sampler is a pure function of its key, and the Frechet distance is the Gaussians' distance."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab.core import partition, sites, train
from ftlab.models import diffusion
from ftlab.peft import dense, lora

RANK, ALPHA = 2, 4.0
SHAPE = (8, 8, 1)
# every layer but the 1-channel output convolution (its [36, 1] kernel has no rank-2 update)
TARGETS = [r"(?!out$).*"]


@pytest.fixture(scope="module")
def setup():
    # one resolution: compiles are what these tests cost (two resolutions are traced below)
    model = diffusion.UNet(features=(4,), num_classes=3, embed_dim=8)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.uniform(-1, 1, (6, *SHAPE)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 3, 6), jnp.int32),
    }
    example = (batch["image"], jnp.zeros(6), batch["label"])
    # rbg: XLA compiles an init of many leaves much faster than with threefry (see init_key)
    params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), *example)["params"]
    # The output convolution starts at zero (velocity 0 whatever the input); give it weights, as
    # after pretraining, so that the layers before it (and LoRA on them) change the output.
    out = params["out"]["kernel"]
    params = {**params, "out": {**params["out"], "kernel": out + 0.1}}
    apply = lambda p, x, t, y: model.apply({"params": p}, x, t, y)  # noqa: E731
    return params, apply, batch, example


def test_lora_reaches_every_conv_and_dense_and_trains_alone(setup):
    params, apply, batch, example = setup
    layers = dense.layers(apply, params, *example)
    assert {v.kind for v in layers.values()} == {"Conv", "Dense"}
    adapted = lora.init(
        params,
        jax.random.key(1, impl="rbg"),
        targets=TARGETS,
        rank=RANK,
        alpha=ALPHA,
        layers=layers,
    )
    flat = partition.flatten(adapted)
    assert sorted(k[: -len("/lora_a")] for k in flat if k.endswith("/lora_a")) == sorted(
        k for k in layers if k != "out"
    )
    # a 3x3 conv on the skip concatenated (8 channels) to 4: LoRA of its (3 * 3 * 8, 4) matrix
    assert flat["up_0/conv_0/lora_a"].shape == (72, RANK)
    assert flat["up_0/conv_0/lora_b"].shape == (RANK, 4)
    wrapped = lora.wrap_apply(apply, alpha=ALPHA, rank=RANK)
    # the adapted model starts as the base model (lora_b = 0)
    chex.assert_trees_all_close(
        jax.jit(wrapped)(adapted, *example), jax.jit(apply)(params, *example), atol=1e-6
    )
    # without the wrapper nothing reads the LoRA leaves: an error naming them
    with pytest.raises(sites.UnconsumedLeavesError, match=r"down_0/conv_0/lora_a"):
        jax.jit(apply)(adapted, *example)

    # With the noise and times fixed, the flow-matching loss must fall under LoRA training,
    # the frozen base stay bit-identical and every LoRA leaf move.
    fm = diffusion.make_loss_fn(wrapped)
    loss_fn = lambda p, b, rng: fm(p, b, jax.random.key(7))  # noqa: E731
    label_tree = partition.labels(adapted, lora.rules())
    trainable0, frozen0 = partition.split(jax.tree.map(np.array, adapted), label_tree)
    state = train.init_state(adapted, label_tree, optax.adam(1e-2), seed=0)
    step = jax.jit(train.make_train_step(loss_fn, optax.adam(1e-2)), donate_argnums=0)
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["train/loss"]))
    assert losses[-1] < losses[0] - 1e-3, losses
    chex.assert_trees_all_equal(state.frozen, frozen0)
    assert set(partition.flatten(state.trainable)) == {
        k for k in flat if k.endswith(("lora_a", "lora_b"))
    }
    for name, leaf in partition.flatten(state.trainable).items():
        assert not np.array_equal(leaf, partition.flatten(trainable0)[name]), name


def test_sampler_is_a_pure_function_of_its_key(setup):
    params, apply, _, _ = setup
    sample = jax.jit(functools.partial(diffusion.sample, apply, shape=SHAPE, steps=3))
    label = jnp.asarray([0, 1, 2, 2], jnp.int32)
    a = sample(params, label, jax.random.key(0))
    chex.assert_shape(a, (4, *SHAPE))
    chex.assert_trees_all_equal(a, sample(params, label, jax.random.key(0)))
    assert not np.allclose(a, sample(params, label, jax.random.key(1)))
    # rows 2 and 3 share the label, not the noise
    assert not np.allclose(a[2], a[3])
    with pytest.raises(ValueError, match="sample: steps=0 must be >= 1"):
        diffusion.sample(apply, params, label, jax.random.key(0), shape=SHAPE, steps=0)


def test_unet_keeps_the_image_shape_through_its_resolutions():
    model = diffusion.UNet(features=(4, 8, 8), num_classes=3, embed_dim=8)
    args = (
        jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32),
        jax.ShapeDtypeStruct((2,), jnp.float32),
        jax.ShapeDtypeStruct((2,), jnp.int32),
    )
    variables = jax.eval_shape(model.init, jax.random.key(0), *args)
    assert jax.eval_shape(model.apply, variables, *args).shape == (2, 8, 8, 1)
    shapes = {k: v.shape for k, v in partition.flatten(variables["params"]).items()}
    # 8x8 -> 4x4 -> 2x2 and back: two stride-2 convs down, two 3x3 convs after upsampling
    assert shapes["downsample_0/kernel"] == (3, 3, 4, 4)
    assert shapes["downsample_1/kernel"] == (3, 3, 8, 8)
    assert shapes["upsample_2/kernel"] == (3, 3, 8, 8)
    assert shapes["upsample_1/kernel"] == (3, 3, 8, 4)
    assert "downsample_2/kernel" not in shapes and "upsample_0/kernel" not in shapes
    # the time-and-class embedding scales and shifts each channel of every block
    assert shapes["mid/emb/kernel"] == (8, 2 * 8)


def test_unet_names_a_shape_it_cannot_halve():
    model = diffusion.UNet(features=(4, 4, 4), num_classes=2, embed_dim=4)
    with pytest.raises(ValueError, match=r"divisible by 2 \*\* \(len\(features\) - 1\) = 4"):
        model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)), jnp.zeros(1), jnp.zeros(1, int))


def test_frechet_distance_is_that_of_the_fitted_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) * 2.0 + np.array([1.0, 0.0, 0.0])
    # N(0, I) against N(m, 4I): |m|^2 + 3 + 12 - 2 * tr(2I) = 1 + 3
    assert diffusion.frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)
    assert diffusion.frechet_distance(b, a) == pytest.approx(diffusion.frechet_distance(a, b))
    assert diffusion.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match=r"frechet_distance: expected a \[n, d\]"):
        diffusion.frechet_distance(a, b[:, :2])
