"""Pretext tasks: InfoNCE/NT-Xent equal a direct numpy computation; rotations and augmentations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlab.pretrain import network, ssl


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_info_nce(q, k, t):
    q, k = _normalize(np.float64(q)), _normalize(np.float64(k))
    losses = []
    for i in range(len(q)):
        s = np.array([q[i] @ k[j] / t for j in range(len(k))])
        losses.append(-(s[i] - np.log(np.sum(np.exp(s)))))
    return np.mean(losses)


def _numpy_nt_xent(z1, z2, t):
    b = len(z1)
    z = _normalize(np.float64(np.concatenate([z1, z2])))
    losses = []
    for a in range(2 * b):
        positive = (a + b) % (2 * b)
        others = [z[a] @ z[j] / t for j in range(2 * b) if j != a]
        losses.append(-(z[a] @ z[positive] / t - np.log(np.sum(np.exp(others)))))
    return np.mean(losses)


# One compile for every call below: the shapes are shared and the temperature is traced.
@jax.jit
def _losses(z1, z2, t):
    """[info_nce(z1, z2), info_nce(z2, z1), nt_xent(z1, z2), nt_xent(z2, z1)]."""
    return jnp.stack(
        [
            ssl.info_nce(z1, z2, temperature=t),
            ssl.info_nce(z2, z1, temperature=t),
            ssl.nt_xent(z1, z2, temperature=t),
            ssl.nt_xent(z2, z1, temperature=t),
        ]
    )


def _views(seed):
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(5, 3)).astype(np.float32)
    return z1, (z1 + 0.5 * rng.normal(size=(5, 3))).astype(np.float32)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
def test_info_nce_and_nt_xent_equal_numpy(temperature):
    z1, z2 = _views(0)
    got = np.asarray(_losses(z1, z2, temperature))
    np.testing.assert_allclose(got[0], _numpy_info_nce(z1, z2, temperature), rtol=1e-5)
    np.testing.assert_allclose(got[1], _numpy_info_nce(z2, z1, temperature), rtol=1e-5)
    np.testing.assert_allclose(got[2], _numpy_nt_xent(z1, z2, temperature), rtol=1e-5)


def test_nt_xent_covers_both_directions_and_both_views():
    z1, z2 = _views(1)
    info_12, info_21, nt_12, nt_21 = np.asarray(_losses(z1, z2, 0.3))
    # Symmetric in the views, unlike one-directional InfoNCE; and it is not just their mean,
    # since each anchor also has the other anchors of its own view as negatives.
    np.testing.assert_allclose(nt_12, nt_21, rtol=1e-6)
    assert abs(info_12 - info_21) > 1e-3
    assert abs(nt_12 - (info_12 + info_21) / 2) > 1e-2
    # Scale-free (cosine similarity), and lower when the views agree.
    np.testing.assert_allclose(_losses(3 * z1, z2, 0.3)[2], nt_12, rtol=1e-5)
    assert _losses(z1, z1, 0.3)[2] < nt_12


def test_nt_xent_gradient_is_finite_for_an_all_zero_projection():
    z1, z2 = _views(2)
    z1[0] = 0.0  # e.g. every ReLU unit dead for one view
    grads = jax.jit(jax.grad(lambda a: ssl.nt_xent(a, z2, temperature=0.5)))(z1)
    assert np.all(np.isfinite(grads))


def test_rotations_and_labels_match_numpy_rot90():
    images = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    rotated, labels = jax.jit(ssl.rotations)(images)
    chex.assert_shape(rotated, (12, 4, 4))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for k in range(4):
        for i in range(3):
            np.testing.assert_array_equal(rotated[k * 3 + i], np.rot90(images[i], k))
    # Label 1 is a quarter turn counter-clockwise: the top-right pixel goes to the top-left.
    np.testing.assert_array_equal(rotated[3][0], images[0][:, -1])
    with pytest.raises(ValueError, match="square"):
        ssl.rotations(jnp.zeros((2, 3, 4)))


def test_rotation_loss_is_log4_with_a_zero_head():
    params = ssl.init_rotation(jax.random.PRNGKey(0), input_dim=16, features=(5,))
    assert sorted(params) == ["encoder", "rotation_head"]
    params["rotation_head"] = jax.tree.map(np.zeros_like, params["rotation_head"])
    loss, _ = jax.jit(ssl.rotation_loss)(params, {"image": np.ones((2, 4, 4), np.float32)}, None)
    np.testing.assert_allclose(loss, np.log(4.0), rtol=1e-6)


_augment = jax.jit(ssl.augment, static_argnames=("max_shift", "noise_std", "flip"))
IMAGES = np.random.default_rng(0).uniform(size=(16, 5, 5)).astype(np.float32)


def test_augment_is_deterministic_given_the_rng():
    kwargs = dict(max_shift=1, noise_std=0.1, flip=True)
    a = _augment(jax.random.PRNGKey(1), IMAGES, **kwargs)
    b = _augment(jax.random.PRNGKey(1), IMAGES, **kwargs)
    c = _augment(jax.random.PRNGKey(2), IMAGES, **kwargs)
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(a, c)
    chex.assert_shape(a, IMAGES.shape)
    # On blank images only the noise is left: zero mean, std noise_std.
    noise = _augment(jax.random.PRNGKey(5), np.zeros_like(IMAGES), **kwargs)
    assert abs(float(jnp.std(noise)) - 0.1) < 0.015 and abs(float(jnp.mean(noise))) < 0.015


def test_augment_shift_moves_each_image_by_at_most_max_shift():
    out = np.asarray(_augment(jax.random.PRNGKey(3), IMAGES, max_shift=1))
    padded = np.pad(IMAGES, ((0, 0), (1, 1), (1, 1)))
    found = []
    for i in range(len(IMAGES)):
        matches = [
            (dy, dx)
            for dy in range(3)
            for dx in range(3)
            if np.array_equal(out[i], padded[i, dy : dy + 5, dx : dx + 5])
        ]
        assert len(matches) == 1, i
        found.append(matches[0])
    assert len(set(found)) > 3  # independent offsets per image


def test_augment_flip_mirrors_about_half_the_images():
    out = np.asarray(_augment(jax.random.PRNGKey(4), IMAGES, max_shift=0, flip=True))
    flipped = np.array([np.array_equal(o, x[:, ::-1]) for o, x in zip(out, IMAGES, strict=True)])
    kept = np.array([np.array_equal(o, x) for o, x in zip(out, IMAGES, strict=True)])
    assert np.all(flipped | kept) and flipped.any() and kept.any()


def test_contrastive_loss_views_differ_and_projector_is_used():
    params = ssl.init_contrastive(
        jax.random.PRNGKey(0), input_dim=16, features=(6, 5), projector=(4, 3)
    )
    assert sorted(params) == ["encoder", "projector"]
    augmented = ssl.make_contrastive_loss(temperature=0.5, max_shift=1, noise_std=0.1)
    plain = ssl.make_contrastive_loss(temperature=0.5, max_shift=0)

    @jax.jit
    def run(params, batch, rng):
        z = network.project(params["projector"], network.encode(params["encoder"], batch["image"]))
        return (
            augmented(params, batch, rng),
            plain(params, batch, rng)[0],
            ssl.nt_xent(z, z, temperature=0.5),
        )

    batch = {"image": IMAGES[:4, :4, :4]}
    (loss, metrics), plain_loss, reference = run(params, batch, jax.random.PRNGKey(2))
    (again, _), _, _ = run(params, batch, jax.random.PRNGKey(2))
    assert loss == again and 0.0 <= metrics["accuracy"] <= 1.0
    # Without augmentation both views are the image itself: the loss is nt_xent(z, z).
    np.testing.assert_allclose(plain_loss, reference, rtol=1e-6)
    assert abs(loss - plain_loss) > 1e-4
