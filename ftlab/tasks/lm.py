"""Causal language-model losses that never hold the full [tokens, vocab] logits.

A 49k-word vocabulary makes the float32 logits of a 16 x 512 batch 1.6 GB, more than the rest of
a 135M-parameter LoRA step. :func:`chunked_cross_entropy` computes the loss from the final hidden
states, a chunk of tokens at a time, so at most ``chunk x vocab`` logits exist. Under
differentiation each chunk's gradient is formed in the same pass as its loss (the softmax minus
the one-hot target, times the embedding), so the logits are neither kept for the backward pass
nor computed twice: the head costs the two matmuls of an unchunked one (three when the embedding
itself trains), where recomputing the chunk (`jax.checkpoint`) would cost one more. Being a
custom VJP, the loss supports reverse mode (`jax.grad`, `jax.vjp`) but not `jax.jvp`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ftlab.models import dots
from ftlab.types import Params, PRNGKey

__all__ = ["chunked_cross_entropy", "HiddenFn", "make_loss_fn"]


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
    return _summed_loss(h, table, t, w), jnp.sum(w)


def _token_losses(h_c: jax.Array, table: jax.Array, t_c: jax.Array):
    """One chunk's float32 logits [c, vocab], their logsumexp and the per-token losses [c]."""
    # products in the hidden states' dtype summed in float32, as the model's own LM head
    logits = dots.matmul(h_c, table, transpose_w=True)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return logits, lse, lse - jnp.take_along_axis(logits, t_c[:, None], axis=-1)[:, 0]


@jax.custom_vjp
def _summed_loss(h: jax.Array, table: jax.Array, t: jax.Array, w: jax.Array) -> jax.Array:
    """``sum(w * loss)`` over chunks ``h [k, c, d]``, ``t, w [k, c]``; logits per chunk only."""

    def body(total, xs):
        h_c, t_c, w_c = xs
        return total + jnp.sum(w_c * _token_losses(h_c, table, t_c)[2]), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, t, w))[0]


def _summed_loss_fwd(h, table, t, w) -> tuple[jax.Array, Any]:
    """The loss and, chunk by chunk, its gradients: d/dlogits = w (softmax - onehot(t))."""
    # symbolic zeros: `.perturbed` says which inputs are differentiated; the embedding's gradient
    # (a [vocab, dim] matmul per chunk) is formed only when the embedding trains.
    table_v, grad_table, grad_w = table.value, table.perturbed, w.perturbed
    dtype = h.value.dtype

    def body(carry, xs):
        total, d_table = carry
        h_c, t_c, w_c = xs
        logits, lse, losses = _token_losses(h_c, table_v, t_c)
        g = jnp.exp(logits - lse[:, None]) - jax.nn.one_hot(t_c, logits.shape[-1])
        g = (w_c[:, None] * g).astype(dtype)
        d_h = dots.matmul(g, table_v).astype(dtype)
        if grad_table:
            d_table = d_table + dots.dot_general(g, h_c, (((0,), (0,)), ((), ())))
        return (total + jnp.sum(w_c * losses), d_table), (d_h, losses if grad_w else None)

    d_table0 = jnp.zeros(table_v.shape, jnp.float32) if grad_table else None
    init = (jnp.zeros((), jnp.float32), d_table0)
    (total, d_table), (d_h, losses) = jax.lax.scan(body, init, (h.value, t.value, w.value))
    if grad_table:
        d_table = d_table.astype(table_v.dtype)
    return total, (d_h, d_table, losses)


def _summed_loss_bwd(residuals, g) -> tuple:
    d_h, d_table, losses = residuals
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        g = jnp.zeros((), jnp.float32)

    def scale(a):
        return None if a is None else (g * a).astype(a.dtype)

    return scale(d_h), scale(d_table), None, scale(losses)


_summed_loss.defvjp(_summed_loss_fwd, _summed_loss_bwd, symbolic_zeros=True)


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
