"""The network pretrained and transferred: an MLP encoder plus small named heads, in linen.

Parameters are one plain nested dict whose top-level names are the parts::

    encoder/layer_0/kernel ... encoder/layer_{L-1}/bias   the transferred stack
    head/kernel, head/bias                                 the downstream classifier
    decoder/layer_k/...      layer-wise autoencoder: reconstructs the input of encoder layer k
    stage_head/layer_k/...   layer-wise supervised: temporary classifier on layer k's codes
    rotation_head/...        rotation pretext: 4-way classifier
    projector/layer_i/...    contrastive pretext: MLP projection head

Each part is applied by a pure function of its own subtree (`encode`, `dense`, `project`), so a
method adds or drops parts by editing the dict, and partition rules over these paths decide
what trains.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftlab.types import Params, PRNGKey

__all__ = [
    "MLP",
    "classify",
    "dense",
    "encode",
    "init_classifier",
    "init_dense",
    "init_mlp",
    "project",
]


class MLP(nn.Module):
    """Dense layers ``layer_0 .. layer_{L-1}`` with ReLU between them.

    Attributes:
      features: output width of each layer.
      activate_last: apply the ReLU after the last layer too (an encoder's codes) or not (a
        projection head's output).
    """

    features: Sequence[int]
    activate_last: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, start: int = 0, stop: int | None = None) -> jax.Array:
        """Applies layers ``start .. stop - 1`` to ``x`` ``[batch, in]`` (default: all)."""
        stop = len(self.features) if stop is None else stop
        for i in range(start, stop):
            x = nn.Dense(self.features[i], name=f"layer_{i}")(x)
            if self.activate_last or i < len(self.features) - 1:
                x = nn.relu(x)
        return x


def _widths(mlp_params: Params) -> tuple[int, ...]:
    return tuple(mlp_params[f"layer_{i}"]["kernel"].shape[1] for i in range(len(mlp_params)))


def init_mlp(rng: PRNGKey, *, input_dim: int, features: Sequence[int]) -> Params:
    """Parameters ``{"layer_i": {"kernel": [in_i, out_i], "bias": [out_i]}}`` of an `MLP`."""
    return _init_mlp(rng, input_dim, tuple(features))


# Jitted with static shapes: one compile per shape instead of one eager op per layer per call.
@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_mlp(rng, input_dim, features):
    return MLP(features).init(rng, jnp.zeros((1, input_dim), jnp.float32))["params"]


def encode(encoder: Params, x: jax.Array, *, start: int = 0, stop: int | None = None) -> jax.Array:
    """Codes of encoder layers ``start .. stop - 1``; widths are read from the parameters.

    Args:
      encoder: the ``encoder`` subtree.
      x: images ``[batch, height, width]`` when ``start == 0`` (flattened here), else the codes
        ``[batch, features[start - 1]]`` of the layer below.
      start: first layer to apply.
      stop: one past the last layer to apply; None for all.

    Returns:
      ``[batch, features[stop - 1]]`` (ReLU codes).
    """
    if start == 0:
        x = x.reshape(x.shape[0], -1)
    return MLP(_widths(encoder)).apply({"params": encoder}, x, start=start, stop=stop)


def project(projector: Params, h: jax.Array) -> jax.Array:
    """A projection head (an `MLP` without the last ReLU): ``[batch, in] -> [batch, out]``."""
    return MLP(_widths(projector), activate_last=False).apply({"params": projector}, h)


def init_dense(rng: PRNGKey, *, in_dim: int, out_dim: int) -> Params:
    """Parameters ``{"kernel": [in_dim, out_dim], "bias": [out_dim]}`` of one dense layer."""
    return _init_dense(rng, in_dim, out_dim)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_dense(rng, in_dim, out_dim):
    return nn.Dense(out_dim).init(rng, jnp.zeros((1, in_dim), jnp.float32))["params"]


def dense(params: Params, x: jax.Array) -> jax.Array:
    """``x @ kernel + bias``: ``[batch, in] -> [batch, out]``."""
    return nn.Dense(params["kernel"].shape[1]).apply({"params": params}, x)


def init_classifier(
    rng: PRNGKey, *, input_dim: int, features: Sequence[int], num_classes: int
) -> Params:
    """``{"encoder": ..., "head": ...}``: the network that transfer fine-tunes or probes."""
    k_enc, k_head = jax.random.split(rng)
    return {
        "encoder": init_mlp(k_enc, input_dim=input_dim, features=features),
        "head": init_dense(k_head, in_dim=features[-1], out_dim=num_classes),
    }


def classify(params: Params, images: jax.Array) -> jax.Array:
    """Logits ``[batch, num_classes]`` of ``head(encoder(images))``."""
    return dense(params["head"], encode(params["encoder"], images))
