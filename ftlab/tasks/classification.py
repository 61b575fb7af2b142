"""Classification losses and metrics for any model ``apply(params, batch, rng) -> logits``."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from ftlab.types import Params, PRNGKey

__all__ = ["ApplyFn", "make_loss_fn", "make_eval_fn"]


# apply(params, batch, rng) -> logits [batch, classes]; rng is None at evaluation.
ApplyFn = Callable[[Params, Mapping[str, jax.Array], PRNGKey | None], jax.Array]


def make_loss_fn(apply: ApplyFn, *, label_smoothing: float = 0.0):
    """Mean softmax cross-entropy over the batch, with accuracy as a metric."""

    def loss_fn(params, batch, rng):
        logits = apply(params, batch, rng).astype(jnp.float32)
        num_classes = logits.shape[-1]
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), label_smoothing)
        loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"accuracy": accuracy}

    return loss_fn


def make_eval_fn(apply: ApplyFn):
    """Per-example loss and correctness, for `ftlab.core.train.make_eval_step`."""

    def eval_fn(params, batch):
        logits = apply(params, batch, None).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {"loss": loss, "accuracy": correct}

    return eval_fn
