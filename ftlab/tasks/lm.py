"""Causal language-model losses that never hold the full [tokens, vocab] logits.

A 49k-word vocabulary makes the float32 logits of a 16 x 512 batch 1.6 GB, more than the rest of
a 135M-parameter LoRA step. :func:`chunked_cross_entropy` computes the loss from the final hidden
states, a chunk of tokens at a time: each chunk's logits are formed, reduced to its losses, and
recomputed in the backward pass (`jax.checkpoint`), so at most ``chunk x vocab`` logits exist.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from ftlab.types import Params, PRNGKey


def chunked_cross_entropy(
    hidden: jax.Array,
    embedding: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    chunk: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy through a tied output embedding, chunk by chunk.

    Args:
        hidden: [batch, seq, dim] final hidden states (any float dtype; the logits are formed in
            that dtype and reduced in float32, as an unchunked head would).
        embedding: [vocab, dim] output embedding (``logits = hidden @ embedding.T``).
        targets: [batch, seq] int token ids to predict at each position.
        weights: [batch, seq] loss weights (1 for scored positions, 0 for prompt or padding).
        chunk: Tokens per chunk; ``batch * seq`` is padded up to a multiple of it.

    Returns:
        ``(sum of weight * loss, sum of weights)``, float32 scalars.

    >>> h = jnp.ones((1, 3, 2)); e = jnp.eye(2)
    >>> loss, n = chunked_cross_entropy(h, e, jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3)),
    ...                                 chunk=2)
    >>> round(float(loss / n), 4)  # log 2: both words score 1
    0.6931
    """
    if hidden.shape[:2] != targets.shape or targets.shape != weights.shape:
        raise ValueError(
            f"hidden {hidden.shape[:2]}, targets {targets.shape} and weights {weights.shape} "
            "must share [batch, seq]."
        )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}.")
    dim = hidden.shape[-1]
    n = targets.size
    chunk = min(chunk, n)  # never pad a small batch up to a large chunk
    pad = -n % chunk
    h = jnp.pad(hidden.reshape(n, dim), ((0, pad), (0, 0))).reshape(-1, chunk, dim)
    t = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, chunk)
    w = jnp.pad(weights.reshape(n).astype(jnp.float32), (0, pad)).reshape(-1, chunk)
    table = embedding.astype(hidden.dtype)

    @jax.checkpoint
    def chunk_loss(h_c, t_c, w_c):
        logits = jnp.einsum("cd,vd->cv", h_c, table).astype(jnp.float32)
        target_logit = jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]
        return jnp.sum(w_c * (jax.nn.logsumexp(logits, axis=-1) - target_logit))

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, t, w))
    return total, jnp.sum(w)


# apply_hidden(params, batch, rng) -> final hidden states [batch, seq, dim]
HiddenFn = Callable[[Params, Mapping[str, jax.Array], PRNGKey | None], jax.Array]


def make_loss_fn(
    apply_hidden: HiddenFn, embedding_of: Callable[[Params], jax.Array], *, chunk: int = 256
):
    """``loss_fn(params, batch, rng) -> (mean token loss, metrics)`` for a causal LM.

    The batch holds ``input_ids`` [batch, seq], ``targets`` [batch, seq] (usually the inputs
    shifted left) and ``loss_mask`` [batch, seq] (which positions are scored).

    Args:
        apply_hidden: Returns the model's final hidden states for a batch.
        embedding_of: Picks the tied output embedding [vocab, dim] out of the params.
        chunk: See :func:`chunked_cross_entropy`.
    """

    def loss_fn(params, batch, rng):
        hidden = apply_hidden(params, batch, rng)
        total, count = chunked_cross_entropy(
            hidden, embedding_of(params), batch["targets"], batch["loss_mask"], chunk=chunk
        )
        loss = total / jnp.maximum(count, 1.0)
        return loss, {"tokens": count}

    return loss_fn
