"""Log-probabilities of completions under a causal LM, and the reference policy without a copy.

A batch scores the tokens its ``loss_mask`` marks (the completion, not the prompt or padding).
Position ``t`` of the logits predicts token ``t + 1``, so `next_token_targets` turns
``input_ids`` and a mask over *tokens* into ``targets`` and weights over *positions*; the
sequence log-prob is then ``sum_t weights[t] * log p(targets[t] | tokens <= t)``.

The reference policy of DPO, PPO and GRPO is the starting model. When the method only adds
leaves to the tree (LoRA, DoRA, IA3, prompt and prefix tuning, adapters, ReFT), the frozen part
of the partition *is* the starting model: `policy_and_reference` applies the base model's apply
function (the one the method's `wrap_apply` wrapped) to the frozen leaves alone, so the
reference costs a forward pass and no second copy of the weights. Full fine-tuning changes the
base leaves themselves; there, compute reference log-probs once before training
(`sequence_logprobs` with the initial parameters) and feed them with the data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from ftlab.core import partition
from ftlab.models import dots
from ftlab.types import Params

__all__ = [
    "LogitsFn",
    "next_token_targets",
    "policy_and_reference",
    "sequence_logprobs",
    "token_logprobs",
    "token_logprobs_from_hidden",
]

# apply(params, batch) -> float logits [batch, seq, vocab]
LogitsFn = Callable[[Params, Mapping[str, jax.Array]], jax.Array]


def next_token_targets(
    input_ids: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``(targets, weights)``: the token each position predicts, and whether it is scored.

    ``targets[t] = input_ids[t + 1]`` and ``weights[t] = loss_mask[t + 1]``; the last position
    predicts nothing (weight 0). With ``segment_ids`` (packed rows) a position whose next token
    starts another segment gets weight 0 too.

    Args:
        input_ids: ``[batch, seq]`` token ids.
        loss_mask: ``[batch, seq]`` 1 on the tokens to score (e.g. the assistant's).
        segment_ids: ``[batch, seq]`` ids of packed sequences, or None.

    Returns:
        int32 ``targets`` and float32 ``weights``, ``[batch, seq]`` each.

    >>> t, w = next_token_targets(jnp.array([[5, 6, 7]]), jnp.array([[0, 1, 1]]))
    >>> t.tolist(), w.tolist()
    ([[6, 7, 0]], [[1.0, 1.0, 0.0]])
    """
    if input_ids.shape != loss_mask.shape:
        raise ValueError(f"input_ids {input_ids.shape} and loss_mask {loss_mask.shape} differ.")
    pad = jnp.zeros_like(input_ids[:, :1])
    targets = jnp.concatenate([input_ids[:, 1:], pad], axis=1).astype(jnp.int32)
    weights = jnp.concatenate([loss_mask[:, 1:], pad], axis=1).astype(jnp.float32)
    if segment_ids is not None:
        if segment_ids.shape != input_ids.shape:
            raise ValueError(
                f"segment_ids {segment_ids.shape} and input_ids {input_ids.shape} differ."
            )
        same = jnp.concatenate([segment_ids[:, 1:] == segment_ids[:, :-1], pad > 0], axis=1)
        weights = weights * same
    return targets, weights


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``log softmax(logits)[targets]`` in float32: ``[batch, seq, vocab]`` -> ``[batch, seq]``.

    >>> round(float(token_logprobs(jnp.zeros((1, 1, 4)), jnp.zeros((1, 1), jnp.int32))[0, 0]), 4)
    -1.3863
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {logits.shape} and targets {targets.shape} differ in [batch, seq]."
        )
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def token_logprobs_from_hidden(
    hidden: jax.Array, embedding: jax.Array, targets: jax.Array, *, chunk: int = 256
) -> jax.Array:
    """`token_logprobs` of ``hidden @ embedding.T`` without ever holding all the logits.

    Tokens go through in chunks of ``chunk``, so at most ``chunk x vocab`` float32 logits exist
    at a time (SmolLM2's 49k vocabulary makes ``[16, 512, vocab]`` 1.6 GB). Under
    differentiation each chunk also forms its tokens' ``d logp / d hidden`` (one product with
    the embedding, no recomputed logits); when the embedding is differentiated too, the
    backward pass recomputes each chunk's logits instead. Products are in ``hidden``'s dtype,
    summed in float32 (`ftlab.models.dots`), as the model's own LM head.

    Args:
        hidden: ``[batch, seq, dim]`` final hidden states (``return_hidden=True``).
        embedding: ``[vocab, dim]`` tied output embedding.
        targets: ``[batch, seq]`` int ids.
        chunk: Tokens per chunk.

    Returns:
        ``[batch, seq]`` float32 log-probs.
    """
    if hidden.shape[:2] != targets.shape:
        raise ValueError(
            f"hidden {hidden.shape} and targets {targets.shape} differ in [batch, seq]."
        )
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be positive.")
    batch, seq, dim = hidden.shape
    n = batch * seq
    chunk = min(chunk, n)
    pad = -n % chunk
    h = jnp.pad(hidden.reshape(n, dim), ((0, pad), (0, 0))).reshape(-1, chunk, dim)
    t = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, chunk)
    table = embedding.astype(hidden.dtype)
    return _chunked(h, table, t).reshape(-1)[:n].reshape(batch, seq)


def _chunk(h_c: jax.Array, table: jax.Array, t_c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One chunk's float32 logits ``[c, vocab]`` and log-probs ``[c]``."""
    logits = dots.matmul(h_c, table, transpose_w=True)
    return logits, token_logprobs(logits, t_c)


def _dlogits(logits: jax.Array, t_c: jax.Array) -> jax.Array:
    """``d logp / d logits = onehot(t) - softmax(logits)``, ``[c, vocab]`` float32."""
    return jax.nn.one_hot(t_c, logits.shape[-1]) - jax.nn.softmax(logits, axis=-1)


@jax.custom_vjp
def _chunked(h: jax.Array, table: jax.Array, t: jax.Array) -> jax.Array:
    """Log-probs ``[k, c]`` of chunks ``h [k, c, d]``, ``t [k, c]``."""
    return jax.lax.map(lambda xs: _chunk(xs[0], table, xs[1])[1], (h, t))


def _chunked_fwd(h, table, t) -> tuple[jax.Array, tuple]:
    # symbolic zeros: `.perturbed` says which inputs are differentiated
    h_v, table_v, t_v = h.value, table.value, t.value
    if table.perturbed:  # its gradient needs the cotangent: recompute in the backward pass
        return _chunked(h_v, table_v, t_v), (h_v, table_v, t_v, None)

    def one(xs):
        h_c, t_c = xs
        logits, lp = _chunk(h_c, table_v, t_c)
        d_h = dots.matmul(_dlogits(logits, t_c).astype(h_v.dtype), table_v)
        return lp, d_h.astype(h_v.dtype)

    lp, d_h = jax.lax.map(one, (h_v, t_v))
    return lp, (None, None, None, d_h)


def _chunked_bwd(residuals, g) -> tuple:
    h, table, t, d_h = residuals
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        g = jnp.zeros(t.shape if d_h is None else d_h.shape[:2], jnp.float32)
    if d_h is not None:
        return (g[..., None] * d_h).astype(d_h.dtype), None, None

    def body(d_table, xs):
        h_c, t_c, g_c = xs
        d = (g_c[:, None] * _dlogits(_chunk(h_c, table, t_c)[0], t_c)).astype(h.dtype)
        d_t = dots.dot_general(d, h_c, (((0,), (0,)), ((), ())))  # [vocab, dim]
        return d_table + d_t, dots.matmul(d, table).astype(h.dtype)

    d_table, d_hidden = jax.lax.scan(body, jnp.zeros(table.shape, jnp.float32), (h, t, g))
    return d_hidden, d_table.astype(table.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd, symbolic_zeros=True)


def sequence_logprobs(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, *, average: bool = False
) -> jax.Array:
    """Summed (or, with ``average``, mean) log-probs of the weighted positions of each row.

    Args:
        logits: ``[batch, seq, vocab]`` next-token logits.
        targets: ``[batch, seq]`` from `next_token_targets`.
        weights: ``[batch, seq]`` from `next_token_targets` (1 on completion tokens).
        average: Divide by the number of weighted positions (SimPO's and IPO's length-normalised
            log-prob); a row without any gives 0.

    Returns:
        ``[batch]`` float32.
    """
    if weights.shape != targets.shape:
        raise ValueError(f"weights {weights.shape} and targets {targets.shape} differ.")
    w = weights.astype(jnp.float32)
    total = jnp.sum(token_logprobs(logits, targets) * w, axis=1)
    if average:
        return total / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return total


def policy_and_reference(
    policy_apply: LogitsFn,
    base_apply: LogitsFn,
    trainable: Params,
    frozen: Params,
    batch: Mapping[str, jax.Array],
    *,
    average: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Sequence log-probs of ``batch`` under the policy and under the reference (method off).

    The policy is ``policy_apply(merge(trainable, frozen), batch)``, e.g. the model wrapped by
    `ftlab.peft.lora.wrap_apply`; the reference is ``base_apply(frozen, batch)``, the unwrapped
    model on the frozen leaves alone, behind `jax.lax.stop_gradient`. This is the starting model
    exactly when the method only added leaves and froze every base leaf (LoRA, DoRA, IA3, prompt
    or prefix tuning, adapters, ReFT); a method leaf left in ``frozen`` is an error of the
    method's own (an unconsumed leaf), not a silent change of the reference.

    Args:
        policy_apply: ``(params, batch) -> logits`` with the method on.
        base_apply: ``(params, batch) -> logits`` of the base model.
        trainable: The trainable leaves (``partition.split``'s first part).
        frozen: The frozen leaves (its second part).
        batch: Holds ``targets`` and ``weights`` ``[batch, seq]`` (`next_token_targets`) and
            whatever the apply functions read.
        average: See `sequence_logprobs`.

    Returns:
        ``(policy [batch], reference [batch])`` float32; only the policy carries gradients.

    Raises:
        ValueError: ``frozen`` holds no leaf (full fine-tuning: precompute the reference).
    """
    if not jax.tree.leaves(frozen):
        raise ValueError(
            "policy_and_reference: frozen has no leaves, so there is no base model to switch "
            "the method off to (full fine-tuning); compute the reference log-probs once before "
            "training with sequence_logprobs and pass them with the data."
        )
    for key in ("targets", "weights"):
        if key not in batch:
            raise ValueError(
                f"policy_and_reference: batch has no {key!r} (keys: {sorted(batch)}); build "
                "them with next_token_targets."
            )
    targets, weights = batch["targets"], batch["weights"]
    policy = sequence_logprobs(
        policy_apply(partition.merge(trainable, frozen), batch), targets, weights, average=average
    )
    reference = sequence_logprobs(
        base_apply(jax.lax.stop_gradient(frozen), batch), targets, weights, average=average
    )
    return policy, jax.lax.stop_gradient(reference)
