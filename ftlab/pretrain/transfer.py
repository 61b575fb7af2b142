"""Transfer a pretrained encoder: a new head, then linear probing or full fine-tuning.

Both are the same classifier loss with different partition rules:
    probe:     ``head/*`` trains, the encoder is frozen (bit-identical, no optimizer state);
    finetune:  everything trains.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ftlab.core import partition
from ftlab.pretrain import network
from ftlab.types import Params, PRNGKey

__all__ = ["RULES", "accuracy", "classifier_loss", "new_classifier"]

RULES = {
    "probe": [("head/.*", "train"), (".*", partition.FROZEN)],
    "finetune": [(".*", "train")],
}


def new_classifier(encoder: Params, rng: PRNGKey, *, num_classes: int) -> Params:
    """``{"encoder": encoder, "head": fresh dense}``; every pretext head is dropped."""
    width = encoder[f"layer_{len(encoder) - 1}"]["kernel"].shape[1]
    return {
        "encoder": encoder,
        "head": network.init_dense(rng, in_dim=width, out_dim=num_classes),
    }


def classifier_loss(params: Params, batch, rng) -> tuple[jax.Array, dict]:
    """Softmax cross-entropy of ``head(encoder(batch["image"]))`` against ``batch["label"]``."""
    del rng
    logits = network.classify(params, batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


@jax.jit
def accuracy(params: Params, images: jax.Array, label: jax.Array) -> jax.Array:
    """Top-1 accuracy of the classifier on ``images`` ``[n, h, w]``, ``label`` ``[n]``."""
    return jnp.mean(jnp.argmax(network.classify(params, images), -1) == label)
