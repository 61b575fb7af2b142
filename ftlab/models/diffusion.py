"""A class-conditional flow-matching model: a small U-Net of `nn.Conv` blocks and its sampler.

Flow matching with the straight (rectified-flow) path: an image ``x0`` and Gaussian noise ``e``
are joined by ``x_t = (1 - t) x0 + t e`` for ``t`` in [0, 1], and the network learns the
velocity ``e - x0`` of that path (`make_loss_fn`, a mean squared error). Sampling (`sample`)
integrates ``dx/dt = v(x, t, label)`` from noise at ``t = 1`` back to ``t = 0`` with ``steps``
Euler steps inside one `jax.lax.fori_loop`: a pure function of its key, so the same key gives
the same images.

`UNet` is the usual shape at a small size: a stem convolution, per resolution a residual block
(GroupNorm, swish, 3x3 `nn.Conv`, the time-and-class embedding scaling and shifting each
channel through an `nn.Dense`) and a stride-2 `nn.Conv` down; a middle block; per resolution
back up a block on the concatenated skip and a nearest-neighbour upsampling followed by a 3x3
`nn.Conv` (not `nn.ConvTranspose`, which the dense-layer methods do not reach); a
zero-initialised output convolution. Applied as the root, a method leaf (``lora_a``, say) that
nothing read is an error (`ftlab.models.hooks.track_root`), not a silent run of the base
model. The class enters as ``label_embed``, an `nn.Dense` on the one-hot label, so that every
weight of the model is an `nn.Conv` or `nn.Dense` kernel (or a GroupNorm scale or bias) and
LoRA, DoRA and IA3 of `ftlab.peft.dense` reach all of them by layer type::

    time_embed_0, time_embed_1, label_embed      Dense
    stem, down_<i>/conv_<j>, downsample_<i>, ...  Conv   [3, 3, in, out]
    down_<i>/emb                                  Dense  (the embedding into block i)
    out                                           Conv   (zeros at init)

`frechet_distance` scores generated images by the Frechet distance between Gaussians fitted to
two sets of features (Heusel et al.'s FID, with any feature extractor).

References:
    Lipman et al., "Flow Matching for Generative Modeling", https://arxiv.org/abs/2210.02747
    Liu et al., "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified
    Flow", https://arxiv.org/abs/2209.03003
    Ronneberger et al., "U-Net", https://arxiv.org/abs/1505.04597
    Dhariwal & Nichol, "Diffusion Models Beat GANs on Image Synthesis" (scale-shift norm),
    https://arxiv.org/abs/2105.05233
    Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium" (FID), https://arxiv.org/abs/1706.08500
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftlab.models import hooks
from ftlab.types import Params, PRNGKey

__all__ = [
    "ResBlock",
    "UNet",
    "frechet_distance",
    "interpolate",
    "make_loss_fn",
    "sample",
    "time_features",
]

# apply(params, x [b, h, w, c], t [b], label [b] int) -> velocity [b, h, w, c]
Apply = Callable[[Params, jax.Array, jax.Array, jax.Array], jax.Array]


def time_features(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal features of ``t`` [b] in [0, 1]: `[b, dim]` (``dim`` even).

    Frequencies run geometrically from 1 to 1000 (times ``t * 1000``, as DDPM's integer steps),
    so both the coarse and the fine position on the path are visible to the network.

    >>> time_features(jnp.zeros(2), 4).tolist()
    [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]
    """
    if dim % 2:
        raise ValueError(f"time_features: dim={dim} must be even")
    half = dim // 2
    freqs = jnp.exp(-math.log(1000.0) * jnp.arange(half) / max(half - 1, 1))
    angles = (1000.0 * t)[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)


def _norm(features: int, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=math.gcd(8, features), name=name)


class ResBlock(nn.Module):
    """``x + conv(swish(norm(conv(swish(norm(x)))) * (1 + scale) + shift))`` with ``scale``
    and ``shift`` per channel from ``dense(emb)`` (a 1x1 conv on the skip when the width
    changes). ``x`` [b, h, w, c], ``emb`` [b, e] -> [b, h, w, features].

    The embedding scales and shifts after the normalisation (Dhariwal & Nichol's
    ``use_scale_shift_norm``): a shift added before a GroupNorm is removed by it wherever a
    group holds one channel, and the condition would not reach the output at all.
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        f = self.features
        h = nn.Conv(f, (3, 3), name="conv_0")(nn.swish(_norm(x.shape[-1], "norm_0")(x)))
        scale, shift = jnp.split(nn.Dense(2 * f, name="emb")(nn.swish(emb))[:, None, None], 2, -1)
        h = _norm(f, "norm_1")(h) * (1.0 + scale) + shift
        h = nn.Conv(f, (3, 3), name="conv_1")(nn.swish(h))
        if x.shape[-1] != f:
            x = nn.Conv(f, (1, 1), name="skip")(x)
        return x + h


class UNet(nn.Module):
    """Velocity ``v(x, t, label)`` of a class-conditional flow: `[b, h, w, c]` -> same shape.

    Attributes:
        features: Channels per resolution, from the input's down; each after the first halves
            ``h`` and ``w`` (which must divide by ``2 ** (len(features) - 1)``).
        num_classes: Classes of the label (``label_embed`` is a Dense on its one-hot).
        embed_dim: Width of the time-and-class embedding.
    """

    features: Sequence[int] = (32, 64)
    num_classes: int = 10
    embed_dim: int = 64

    @nn.compact
    @hooks.track_root
    def __call__(self, x: jax.Array, t: jax.Array, label: jax.Array) -> jax.Array:
        levels = len(self.features)
        if x.ndim != 4 or x.shape[1] % 2 ** (levels - 1) or x.shape[2] % 2 ** (levels - 1):
            raise ValueError(
                f"UNet: x has shape {x.shape}; expected [batch, h, w, c] with h and w divisible "
                f"by 2 ** (len(features) - 1) = {2 ** (levels - 1)}"
            )
        emb = nn.Dense(self.embed_dim, name="time_embed_0")(time_features(t, self.embed_dim))
        emb = nn.Dense(self.embed_dim, name="time_embed_1")(nn.swish(emb))
        one_hot = jax.nn.one_hot(label, self.num_classes, dtype=emb.dtype)
        emb = emb + nn.Dense(self.embed_dim, use_bias=False, name="label_embed")(one_hot)

        h = nn.Conv(self.features[0], (3, 3), name="stem")(x)
        skips = []
        for i, width in enumerate(self.features):
            h = ResBlock(width, name=f"down_{i}")(h, emb)
            skips.append(h)
            if i < levels - 1:
                h = nn.Conv(width, (3, 3), strides=(2, 2), name=f"downsample_{i}")(h)
        h = ResBlock(self.features[-1], name="mid")(h, emb)
        for i in reversed(range(levels)):
            h = ResBlock(self.features[i], name=f"up_{i}")(jnp.concatenate([h, skips[i]], -1), emb)
            if i > 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = nn.Conv(self.features[i - 1], (3, 3), name=f"upsample_{i}")(h)
        h = nn.swish(_norm(self.features[0], "out_norm")(h))
        # Zeros: the untrained model predicts velocity 0, and the first steps learn the mean.
        return nn.Conv(x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros, name="out")(h)


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """``(1 - t) x0 + t noise`` with ``t`` [b] broadcast over the image axes.

    >>> interpolate(jnp.zeros((1, 2)), jnp.ones((1, 2)), jnp.full(1, 0.25)).tolist()
    [[0.25, 0.25]]
    """
    t = t.reshape(t.shape + (1,) * (x0.ndim - 1))
    return (1.0 - t) * x0 + t * noise


def make_loss_fn(apply: Apply):
    """Flow-matching loss of ``apply(params, x_t, t, label) -> velocity`` for `train`'s step.

    The batch holds ``image`` `[b, h, w, c]` (data scaled to about [-1, 1]) and ``label`` `[b]`;
    each example draws its own ``t ~ U(0, 1)`` and noise from the step's ``rng`` (one normal
    draw for both). The loss is the mean squared error to the path's velocity
    ``noise - image``, per pixel.

    Returns:
        ``loss_fn(params, batch, rng) -> (loss, {})``.
    """

    def loss_fn(params, batch, rng):
        x0 = batch["image"]
        b, n = x0.shape[0], math.prod(x0.shape[1:])
        # One draw for the noise and the time (t = Phi(z) of one more normal is U(0, 1)): each
        # threefry draw is a sizeable piece of the step's XLA compile on CPU (a third, measured).
        z = jax.random.normal(rng, (b, n + 1), jnp.float32)
        noise = z[:, :n].reshape(x0.shape).astype(x0.dtype)
        t = (0.5 * (1.0 + jax.lax.erf(z[:, n] / math.sqrt(2.0)))).astype(x0.dtype)
        v = apply(params, interpolate(x0, noise, t), t, batch["label"])
        return jnp.mean(jnp.square(v.astype(jnp.float32) - (noise - x0))), {}

    return loss_fn


def sample(
    apply: Apply,
    params: Params,
    label: jax.Array,
    rng: PRNGKey,
    *,
    shape: Sequence[int],
    steps: int,
) -> jax.Array:
    """Images of classes ``label`` [b]: Euler steps of the learned flow from noise, t = 1 -> 0.

    Args:
        apply: ``apply(params, x, t, label) -> velocity``.
        params: The model's parameters.
        label: `[b]` int classes to generate.
        rng: Draws the starting noise; the result is a pure function of it.
        shape: One image's shape ``(h, w, c)``.
        steps: Euler steps (static; jit with it bound, e.g. by `functools.partial`).

    Returns:
        `[b, h, w, c]` float32 images (not clipped).
    """
    if steps < 1:
        raise ValueError(f"sample: steps={steps} must be >= 1")
    b = label.shape[0]
    x = jax.random.normal(rng, (b, *shape), jnp.float32)
    dt = 1.0 / steps

    def body(i, x):
        t = jnp.full((b,), 1.0 - i * dt, jnp.float32)
        return x - dt * apply(params, x, t, label).astype(jnp.float32)

    return jax.lax.fori_loop(0, steps, body, x)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` [n, d] and ``b`` [m, d].

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``, in float64 with
    symmetric eigendecompositions (the trace of the matrix square root of ``S_a S_b`` equals
    that of the symmetric ``S_a^1/2 S_b S_a^1/2``, whose eigenvalues are real and >= 0).

    Raises:
        ValueError: Fewer than 2 rows in either set, or feature widths that differ.

    >>> x = np.random.default_rng(0).normal(size=(500, 3))
    >>> round(frechet_distance(x, x), 6), round(frechet_distance(x, x + 1.0), 6)
    (0.0, 3.0)
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(
            f"frechet_distance: expected a [n, d] and b [m, d] with n, m >= 2, got {a.shape} "
            f"and {b.shape}"
        )
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, q = np.linalg.eigh(sa)
    root_a = (q * np.sqrt(np.clip(w, 0, None))) @ q.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ sb @ root_a), 0, None)).sum()
    diff = a.mean(0) - b.mean(0)
    return float(max(diff @ diff + np.trace(sa) + np.trace(sb) - 2.0 * cross, 0.0))
