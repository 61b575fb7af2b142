"""Greedy layer-wise pretraining: train encoder layer k on the frozen codes of layers 0..k-1.

Stage k trains ``encoder/layer_k`` together with a stage-local part, and nothing else:
    unsupervised: ``decoder/layer_k`` reconstructs layer k's input from its codes (an
                  autoencoder, optionally denoising), so no labels are needed;
    supervised:   ``stage_head/layer_k`` classifies layer k's codes (a temporary output head).
Freezing is only the partition rule `stage_rules(k)`, which moves up one layer per stage; the
train step (`ftlab.core.train`) then differentiates the trainable leaves alone, so earlier
layers stay bit-identical and carry no optimizer state. Afterwards the whole stack is fine-tuned
with a new head (`ftlab.pretrain.transfer`).

    params = layerwise.init(rng, input_dim=64, features=(256, 256, 128))
    for k in range(3):  # stage k: a fresh optimizer state on stage_rules(k)'s leaves
        labels = partition.labels(params, layerwise.stage_rules(k))
        state = train.init_state(params, labels, tx, seed=k)
        ...  # steps of train.make_train_step(layerwise.make_stage_loss(k), tx)

`experiments/trainers/pretrain.py` runs the stages as runs of the experiment loop.

References:
  Bengio, Lamblin, Popovici, Larochelle. Greedy layer-wise training of deep networks. NeurIPS
  2006. https://papers.nips.cc/paper/3048
  Vincent, Larochelle, Bengio, Manzagol. Extracting and composing robust features with denoising
  autoencoders. ICML 2008 (the ``noise_std`` option). https://doi.org/10.1145/1390156.1390294
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from ftlab.core import partition
from ftlab.pretrain import network
from ftlab.types import Params, PRNGKey

__all__ = ["init", "make_stage_loss", "stage_rules"]


def init(
    rng: PRNGKey, *, input_dim: int, features: Sequence[int], num_classes: int | None = None
) -> Params:
    """The encoder plus one stage-local part per layer.

    Args:
      rng: PRNG key.
      input_dim: flattened input size (64 for 8x8 images).
      features: encoder widths, one per layer (at least two: one layer has no stages to stack).
      num_classes: None for the unsupervised variant (adds ``decoder/layer_k``: ``features[k]``
        -> width of layer k's input); a class count for the supervised variant (adds
        ``stage_head/layer_k``: ``features[k]`` -> ``num_classes``).

    Returns:
      ``{"encoder": ..., "decoder" | "stage_head": {"layer_k": {"kernel", "bias"}}}``.
    """
    if len(features) < 2:
        raise ValueError(
            f"layer-wise pretraining needs at least 2 encoder layers; got features={features}"
        )
    keys = jax.random.split(rng, len(features) + 1)
    in_dims = (input_dim, *features[:-1])
    if num_classes is None:
        part, outs = "decoder", in_dims
    else:
        part, outs = "stage_head", (num_classes,) * len(features)
    return {
        "encoder": network.init_mlp(keys[0], input_dim=input_dim, features=features),
        part: {
            f"layer_{k}": network.init_dense(keys[k + 1], in_dim=features[k], out_dim=outs[k])
            for k in range(len(features))
        },
    }


def stage_rules(k: int, *, supervised: bool = False) -> list[tuple[str, str]]:
    """Partition rules of stage ``k``: encoder layer k and its stage-local part train.

    >>> stage_rules(1)
    [('encoder/layer_1/.*', 'train'), ('decoder/layer_1/.*', 'train'), ('.*', 'frozen')]
    """
    part = "stage_head" if supervised else "decoder"
    return [
        (f"encoder/layer_{k}/.*", "train"),
        (f"{part}/layer_{k}/.*", "train"),
        (".*", partition.FROZEN),
    ]


def make_stage_loss(k: int, *, supervised: bool = False, noise_std: float = 0.0):
    """``loss_fn(params, batch, rng) -> (loss, metrics)`` of stage ``k``.

    ``batch["image"]`` is ``[batch, height, width]``; the supervised variant also reads int
    ``batch["label"]`` ``[batch]``. The input of layer k is the codes of the (frozen) layers
    below it. Unsupervised: mean squared error of ``decoder/layer_k`` reconstructing that input
    from layer k's codes, with the input corrupted by Gaussian noise of ``noise_std`` first
    (denoising) when ``noise_std > 0``. Supervised: softmax cross-entropy of
    ``stage_head/layer_k`` on layer k's codes.
    """

    def loss_fn(params, batch, rng):
        inputs = network.encode(params["encoder"], batch["image"], stop=k)
        corrupted = inputs
        if noise_std > 0:
            corrupted = inputs + noise_std * jax.random.normal(rng, inputs.shape, inputs.dtype)
        codes = network.encode(params["encoder"], corrupted, start=k, stop=k + 1)
        if supervised:
            logits = network.dense(params["stage_head"][f"layer_{k}"], codes)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
            return loss, {"accuracy": accuracy}
        reconstruction = network.dense(params["decoder"][f"layer_{k}"], codes)
        return jnp.mean(jnp.square(reconstruction - inputs)), {}

    return loss_fn
