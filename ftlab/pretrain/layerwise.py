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
    params, history = layerwise.pretrain(params, {"image": x}, tx=optax.adam(1e-3),
                                         steps_per_stage=2000, batch_size=128, seed=0)

References:
  Bengio, Lamblin, Popovici, Larochelle. Greedy layer-wise training of deep networks. NeurIPS
  2006. https://papers.nips.cc/paper/3048
  Vincent, Larochelle, Bengio, Manzagol. Extracting and composing robust features with denoising
  autoencoders. ICML 2008 (the ``noise_std`` option). https://doi.org/10.1145/1390156.1390294
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftlab.core import partition, train
from ftlab.pretrain import loop, network
from ftlab.types import Params, PRNGKey

__all__ = ["init", "make_stage_loss", "pretrain", "stage_rules"]


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


def pretrain(
    params: Params,
    arrays: Mapping[str, np.ndarray],
    *,
    tx: optax.GradientTransformation,
    steps_per_stage: int,
    batch_size: int,
    seed: int,
    supervised: bool = False,
    noise_std: float = 0.0,
    stages: Sequence[int] | None = None,
) -> tuple[Params, list[dict[str, np.ndarray]]]:
    """Runs the stages ``0 .. L-1`` in order, each from a fresh optimizer state.

    Stage k's randomness depends on ``seed`` and k alone, so running the stages one call at a
    time (``stages=[0]``, then ``stages=[1]``, ...) gives the same tree as one call.

    Args:
      params: from `init` (with ``stage_head`` for ``supervised=True``).
      arrays: ``{"image": [n, h, w]}``, plus ``"label": [n]`` when supervised.
      tx: the optimizer of every stage (its state is re-initialised on each stage's leaves).
      steps_per_stage: train steps per layer.
      batch_size: examples per step.
      seed: randomness of batches and noise.
      supervised: train each layer through a temporary classifier instead of a decoder.
      noise_std: input corruption of the denoising autoencoder (unsupervised only).
      stages: the stages to run (default: all, in order).

    Returns:
      ``(params, history)``: the pretrained tree (same structure as ``params``) and, per stage
      run, its metrics as numpy arrays ``[steps_per_stage]`` (``train/loss``, ...).
    """
    part = "stage_head" if supervised else "decoder"
    if part not in params:
        raise ValueError(
            f"layerwise.pretrain(supervised={supervised}) needs params[{part!r}]; "
            f"got top-level names {sorted(params)}. Build them with layerwise.init("
            + ("num_classes=...)" if supervised else "num_classes=None)")
        )
    num_layers = len(params["encoder"])
    stages = range(num_layers) if stages is None else stages
    if any(not 0 <= k < num_layers for k in stages):
        raise ValueError(
            f"layerwise.pretrain: stages={stages}; the encoder has {num_layers} layers"
        )
    history = []
    for k in stages:
        rules = stage_rules(k, supervised=supervised)
        label_tree = partition.labels(params, rules, what=f"layerwise.stage_rules({k})")
        state = train.init_state(params, label_tree, tx, seed=seed + k)
        fit = _stage_fit(k, supervised, noise_std, tx, steps_per_stage, batch_size)
        state, metrics = fit(state, arrays, jax.random.fold_in(jax.random.PRNGKey(seed), k))
        params = jax.device_get(state.params)
        history.append(jax.device_get(metrics))
    return params, history


@functools.lru_cache(maxsize=32)
def _stage_fit(k, supervised, noise_std, tx, steps_per_stage, batch_size):
    # Cached so that pretraining again (another seed) with the same `tx` object compiles nothing.
    loss_fn = make_stage_loss(k, supervised=supervised, noise_std=noise_std)
    return loop.make_fit(
        train.make_train_step(loss_fn, tx), num_steps=steps_per_stage, batch_size=batch_size
    )
