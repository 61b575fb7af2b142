"""Self-supervised pretext tasks: rotation prediction and contrastive learning (InfoNCE).

Both train the encoder with a pretext head that transfer later drops:
    rotation:     ``rotation_head`` classifies which of 4 rotations (0, 90, 180, 270 degrees
                  counter-clockwise) was applied; every image appears in all four per batch.
    contrastive:  two augmented views of each image go through the encoder and ``projector``;
                  NT-Xent pulls the two views together against the other 2B - 2 views of the
                  batch (in-batch negatives) at a temperature.

Augmentations are pure functions of a PRNG key (the same key gives the same views), so they
run inside the jitted train step with the step's key.

References:
  Gidaris, Singh, Komodakis. Unsupervised representation learning by predicting image
  rotations. ICLR 2018. https://arxiv.org/abs/1803.07728
  van den Oord, Li, Vinyals. Representation learning with contrastive predictive coding
  (InfoNCE). 2018. https://arxiv.org/abs/1807.03748
  Chen, Kornblith, Norouzi, Hinton. A simple framework for contrastive learning of visual
  representations (SimCLR, NT-Xent). ICML 2020. https://arxiv.org/abs/2002.05709
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from ftlab.pretrain import network
from ftlab.types import Params, PRNGKey

__all__ = [
    "NUM_ROTATIONS",
    "augment",
    "info_nce",
    "init_contrastive",
    "init_rotation",
    "make_contrastive_loss",
    "nt_xent",
    "rotation_loss",
    "rotations",
]

NUM_ROTATIONS = 4


def rotations(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """All four rotations of every image, with the rotation as label.

    Args:
      images: ``[batch, height, width]`` (or ``[batch, height, width, channels]``), square.

    Returns:
      ``(rotated, labels)``: ``rotated[k * batch + i]`` is ``images[i]`` rotated by ``90 * k``
      degrees counter-clockwise (`numpy.rot90` with ``k``), ``[4 * batch, height, width]``;
      ``labels[k * batch + i] == k``, int32 ``[4 * batch]``.

    >>> r, y = rotations(jnp.array([[[1, 2], [3, 4]]]))
    >>> r[1].tolist(), y.tolist()
    ([[2, 4], [1, 3]], [0, 1, 2, 3])
    """
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"rotations: images must be square; got shape {images.shape}")
    rotated = jnp.concatenate([jnp.rot90(images, k, axes=(1, 2)) for k in range(NUM_ROTATIONS)])
    labels = jnp.repeat(jnp.arange(NUM_ROTATIONS, dtype=jnp.int32), images.shape[0])
    return rotated, labels


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    # rsqrt of the clipped squared norm, not x / max(norm(x), eps): the gradient of norm at an
    # all-zero row (a ReLU encoder with every unit dead) is 0/0 = NaN.
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), eps**2))


def _cosine_logits(a: jax.Array, b: jax.Array, temperature: float) -> jax.Array:
    return _l2_normalize(a) @ _l2_normalize(b).T / temperature


def info_nce(queries: jax.Array, keys: jax.Array, *, temperature: float) -> jax.Array:
    """InfoNCE in one direction: query i's positive is key i, the other keys are negatives.

    ``mean_i -log softmax_j(cos(q_i, k_j) / temperature)[i]``.

    Args:
      queries: ``[batch, dim]``.
      keys: ``[batch, dim]``.
      temperature: divides the cosine similarities.

    Returns:
      The scalar loss.
    """
    logits = _cosine_logits(queries, keys, temperature)
    labels = jnp.arange(queries.shape[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def nt_xent(z1: jax.Array, z2: jax.Array, *, temperature: float) -> jax.Array:
    """SimCLR's NT-Xent: InfoNCE over both views, both directions, 2B - 2 negatives each.

    With ``z = concat(z1, z2)`` (``2B`` rows) and ``s = cos(z_a, z_b) / temperature``, anchor a
    has its other view as positive and every other row except itself as negative:
    ``mean_a -log(exp(s[a, pos(a)]) / sum_{b != a} exp(s[a, b]))``.

    Args:
      z1: ``[batch, dim]`` projections of the first views.
      z2: ``[batch, dim]`` projections of the second views (row i pairs with ``z1[i]``).
      temperature: divides the cosine similarities (SimCLR: 0.1 - 0.5).

    Returns:
      The scalar loss, averaged over all ``2 * batch`` anchors.
    """
    b = z1.shape[0]
    z = jnp.concatenate([z1, z2])
    logits = _cosine_logits(z, z, temperature)
    logits = jnp.where(jnp.eye(2 * b, dtype=bool), -jnp.inf, logits)
    positives = jnp.concatenate([jnp.arange(b, 2 * b), jnp.arange(b)])
    return optax.softmax_cross_entropy_with_integer_labels(logits, positives).mean()


def augment(
    rng: PRNGKey,
    images: jax.Array,
    *,
    max_shift: int = 1,
    noise_std: float = 0.0,
    flip: bool = False,
) -> jax.Array:
    """A random view of each image: shift (a crop of the zero-padded image), flip, noise.

    Args:
      rng: PRNG key; the output is a pure function of it and ``images``.
      images: ``[batch, height, width]``.
      max_shift: each image moves by an independent uniform offset in ``[-max_shift,
        max_shift]`` pixels along each axis; pixels shifted in are 0.
      noise_std: standard deviation of added Gaussian noise.
      flip: mirror left-right with probability 1/2 (off for digits: a mirrored digit is not
        the same digit).

    Returns:
      ``[batch, height, width]``.
    """
    batch, height, width = images.shape
    k_shift, k_flip, k_noise = jax.random.split(rng, 3)
    s = max_shift
    if s > 0:
        padded = jnp.pad(images, ((0, 0), (s, s), (s, s)))
        offsets = jax.random.randint(k_shift, (batch, 2), 0, 2 * s + 1)
        images = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, o, (height, width)))(
            padded, offsets
        )
    if flip:
        mirrored = jax.random.bernoulli(k_flip, 0.5, (batch, 1, 1))
        images = jnp.where(mirrored, images[:, :, ::-1], images)
    if noise_std > 0:
        images = images + noise_std * jax.random.normal(k_noise, images.shape, images.dtype)
    return images


# -- pretext networks and losses ------------------------------------------------------------


def init_rotation(rng: PRNGKey, *, input_dim: int, features: Sequence[int]) -> Params:
    """``{"encoder": ..., "rotation_head": ...}`` (``features[-1]`` -> 4)."""
    k_enc, k_head = jax.random.split(rng)
    return {
        "encoder": network.init_mlp(k_enc, input_dim=input_dim, features=features),
        "rotation_head": network.init_dense(k_head, in_dim=features[-1], out_dim=NUM_ROTATIONS),
    }


def rotation_loss(params: Params, batch, rng) -> tuple[jax.Array, dict]:
    """Cross-entropy of predicting the rotation, over all four rotations of ``batch["image"]``."""
    del rng
    rotated, labels = rotations(batch["image"])
    logits = network.dense(params["rotation_head"], network.encode(params["encoder"], rotated))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


def init_contrastive(
    rng: PRNGKey, *, input_dim: int, features: Sequence[int], projector: Sequence[int]
) -> Params:
    """``{"encoder": ..., "projector": ...}``; the projector maps ``features[-1]`` codes."""
    k_enc, k_proj = jax.random.split(rng)
    return {
        "encoder": network.init_mlp(k_enc, input_dim=input_dim, features=features),
        "projector": network.init_mlp(k_proj, input_dim=features[-1], features=projector),
    }


def make_contrastive_loss(
    *, temperature: float, max_shift: int = 1, noise_std: float = 0.0, flip: bool = False
):
    """``loss_fn(params, batch, rng)``: NT-Xent between two augmented views of the batch."""

    def loss_fn(params, batch, rng):
        k1, k2 = jax.random.split(rng)
        kwargs = dict(max_shift=max_shift, noise_std=noise_std, flip=flip)
        views = jnp.concatenate(
            [augment(k1, batch["image"], **kwargs), augment(k2, batch["image"], **kwargs)]
        )
        z = network.project(params["projector"], network.encode(params["encoder"], views))
        z1, z2 = jnp.split(z, 2)
        loss = nt_xent(z1, z2, temperature=temperature)
        # Top-1 retrieval: the nearest other view is the positive (a sanity metric).
        logits = _cosine_logits(z1, z2, 1.0)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.arange(z1.shape[0]))
        return loss, {"accuracy": accuracy}

    return loss_fn
