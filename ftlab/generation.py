"""Autoregressive generation with a KV cache: greedy, temperature and nucleus (top-p) sampling.

One compiled function per (model config, batch, prompt length, `max_new_tokens`, greedy or
sampling); `eos_id`, `pad_id`, `temperature` and `top_p` are traced, so changing them does not
recompile: a prefill call writes the whole (padded) prompt into a static-size cache, then a
`lax.while_loop` feeds one token per step until every row has produced `eos_id` or
`max_new_tokens` tokens. Shapes never change inside the loop, so nothing recompiles per token.

Padding: prompts may be left- or right-padded (or both), given by `attention_mask`. The model
counts positions from the mask, so every row decodes exactly as it would alone: the first new
token comes from the row's last real prompt token, and padded cache slots are never attended to.

Example::

    out = generation.generate(model, params, ids, mask, max_new_tokens=32, eos_id=2)
    texts = [tokenizer.decode(row[:n]) for row, n in zip(out.tokens, out.lengths)]

`decode` is the same loop as a plain traceable function, for callers that compile it inside
their own function: an RL step that samples, scores and updates in one `jit`, or a method's
`wrap_apply` (LoRA's interceptor must be active while the model is traced, so the sampler is
wrapped, not called from outside). It can also return the log-probability of each sampled
token, as PPO and GRPO need.

References:
    Holtzman et al., "The Curious Case of Neural Text Degeneration" (nucleus sampling),
    https://arxiv.org/abs/1904.09751
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ftlab import types
from ftlab.models import llama

__all__ = ["Generated", "check_sampling", "decode", "generate", "sample_logits"]


class Generated(NamedTuple):
    """Output of `generate`.

    Attributes:
        tokens: `[batch, max_new_tokens]` int32 new tokens; after a row's `eos_id` (which is
            included) the rest is `pad_id`.
        lengths: `[batch]` int32 number of new tokens per row, `eos_id` included.
        logprobs: `[batch, max_new_tokens]` float32 log-probability of each new token under
            the distribution it was drawn from, `log_softmax(logits / temperature)` (before the
            top-p cut; `temperature` 1 when greedy), 0 after the row ended; None unless asked
            for (`decode(..., logprobs=True)`).
    """

    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array | None = None


def sample_logits(
    logits: jax.Array,
    rng: types.PRNGKey,
    *,
    temperature: float | jax.Array,
    top_p: float | jax.Array = 1.0,
) -> jax.Array:
    """Draws one token per row from `softmax(logits / temperature)` cut to its top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose probability reaches `top_p`
    (the most likely token is always kept); probabilities are renormalised over it.

    Args:
        logits: `[batch, vocab]`.
        rng: PRNG key.
        temperature: > 0; 0 means greedy (use `jnp.argmax`, which `generate` does). May be
            traced.
        top_p: In (0, 1]; 1 keeps the whole vocabulary. May be traced (no recompilation).

    Returns:
        `[batch]` int32 token ids.

    >>> sample_logits(jnp.array([[0.0, 9.0, 1.0]]), jax.random.key(0), temperature=1.0,
    ...               top_p=0.5).tolist()
    [1]
    """
    logits = logits.astype(jnp.float32) / temperature
    # top_p = 1 keeps every token: skip the nucleus. A branch taken at run time, so a traced
    # top_p still compiles once.
    logits = jax.lax.cond(
        jnp.asarray(top_p) < 1.0, lambda x: _nucleus(x, top_p), lambda x: x, logits
    )
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _order_keys(x: jax.Array) -> jax.Array:
    """int32 keys of float32 values in the same order (negative floats' magnitude bits flipped;
    -0.0 made +0.0 first, as the two compare equal)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0.0, 0.0, x), jnp.int32)
    return bits ^ ((bits >> 31) & jnp.int32(0x7FFFFFFF))


def _nucleus(logits: jax.Array, top_p) -> jax.Array:
    """``logits`` with the tokens outside each row's top-p nucleus set to -inf.

    The nucleus is ``{logit >= t}`` for the largest ``t`` whose set still holds ``top_p`` of
    the probability: exactly the most likely tokens up to and including the one that reaches
    ``top_p`` (with its ties), as sorting the vocabulary and summing in order gives. The
    threshold is found by bisection over the logits' int32 order keys, 32 halvings of
    ``[min, max]``, each one masked sum over the vocabulary: 49k logits per row need no sort
    (86 ms against a few ms for 8 rows on a 2-core CPU).
    """
    probs = jax.nn.softmax(logits, axis=-1)
    keys = _order_keys(logits)
    lo = jnp.min(keys, axis=-1, keepdims=True)  # the whole vocabulary: mass 1 >= top_p
    hi = jnp.max(keys, axis=-1, keepdims=True) + 1  # nothing: mass 0 < top_p

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        holds = jnp.sum(jnp.where(keys >= mid, probs, 0.0), axis=-1, keepdims=True) >= top_p
        return jnp.where(holds, mid, lo), jnp.where(holds, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return jnp.where(keys >= lo, logits, -jnp.inf)


def check_sampling(max_new_tokens, temperature, top_p) -> None:
    """Refuses sampling settings `generate` cannot use, naming the argument: for callers that
    check them before any work (an RL trainer's configuration).

    Raises:
        ValueError: ``max_new_tokens`` not an integer >= 1, ``temperature`` < 0 or ``top_p``
            outside (0, 1].
    """
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1.")
    if not temperature >= 0.0:
        raise ValueError(f"temperature={temperature!r} must be >= 0 (0 is greedy).")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1].")


def generate(
    model: llama.LlamaForCausalLM,
    params: types.Params,
    input_ids: jax.Array | np.ndarray,
    attention_mask: jax.Array | np.ndarray | None = None,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: types.PRNGKey | None = None,
) -> Generated:
    """Continues a batch of prompts, compiled once per shape and setting.

    Args:
        model: The `LlamaForCausalLM` (its config is static).
        params: Its parameter tree (a soft prompt in it is prepended to every prompt).
        input_ids: `[batch, prompt_len]` int token ids, padded on either side.
        attention_mask: `[batch, prompt_len]`, 1 at real tokens, 0 at padding; all ones when
            omitted. Every row needs at least one real token.
        max_new_tokens: Most tokens to generate per row.
        eos_id: Token that ends a row (e.g. `<|im_end|>` for a chat model).
        pad_id: Fills `tokens` after a row has ended; `eos_id` when None.
        temperature: 0 for greedy decoding; > 0 to sample from `softmax(logits / temperature)`.
        top_p: Nucleus sampling mass (only with `temperature > 0`).
        rng: PRNG key, required when sampling.

    Returns:
        `Generated(tokens [batch, max_new_tokens], lengths [batch])`.

    Raises:
        ValueError: bad settings, or a context overflow: soft-prompt rows + `prompt_len` +
            `max_new_tokens` exceeds `model.config.max_position_embeddings` (naming both).
    """
    config = model.config
    check_sampling(max_new_tokens, temperature, top_p)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, prompt_len]; got shape {input_ids.shape}.")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {attention_mask.shape}, input_ids {input_ids.shape}."
        )
    empty = np.flatnonzero(np.asarray(attention_mask).sum(axis=1) == 0)
    if empty.size:
        raise ValueError(
            f"attention_mask row {int(empty[0])} has no real token; every prompt needs at least "
            "one (e.g. a BOS or chat-template token)."
        )
    n_prompt = llama.num_prompt(params)
    needed = n_prompt + input_ids.shape[1] + max_new_tokens
    if needed > config.max_position_embeddings:
        soft = f"{n_prompt} soft-prompt rows + " if n_prompt else ""
        raise ValueError(
            f"context overflow: {soft}prompt length {input_ids.shape[1]} + max_new_tokens "
            f"{max_new_tokens} = {needed} positions, but the model's context "
            f"(config.max_position_embeddings) is {config.max_position_embeddings}; shorten "
            "the prompt or lower max_new_tokens."
        )
    sampling = temperature > 0.0
    if sampling and rng is None:
        raise ValueError("generate: temperature > 0 samples, so pass rng=jax.random.key(...).")
    if rng is None:
        rng = jax.random.key(0)
    settings = jnp.asarray([temperature, top_p], jnp.float32)
    special = jnp.asarray([eos_id, eos_id if pad_id is None else pad_id], jnp.int32)
    return _generate(
        model,
        params,
        input_ids,
        attention_mask,
        rng,
        settings,
        special,
        max_new_tokens=max_new_tokens,
        greedy=not sampling,
    )


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy"))
def _generate(
    model, params, input_ids, attention_mask, rng, settings, special, *, max_new_tokens, greedy
):
    return decode(
        model,
        params,
        input_ids,
        attention_mask,
        rng,
        temperature=settings[0],
        top_p=settings[1],
        eos_id=special[0],
        pad_id=special[1],
        max_new_tokens=max_new_tokens,
        greedy=greedy,
    )


def decode(
    model: llama.LlamaForCausalLM,
    params: types.Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    rng: types.PRNGKey,
    *,
    max_new_tokens: int,
    eos_id: int | jax.Array,
    pad_id: int | jax.Array,
    temperature: float | jax.Array,
    top_p: float | jax.Array,
    greedy: bool,
    logprobs: bool = False,
    num_samples: int = 1,
) -> Generated:
    """The decoding loop of `generate` as a traceable function: no checks, no `jit` of its own.

    Compile it inside your own function (see the module docstring). `generate` validates its
    arguments and calls this; a caller of `decode` is responsible for the same: `input_ids`
    int32 `[batch, prompt_len]`, every row of `attention_mask` with a real token, and the
    context (soft-prompt rows + `prompt_len` + `max_new_tokens`) within
    `model.config.max_position_embeddings`.

    Args:
        model: The `LlamaForCausalLM`.
        params: Its parameter tree (unrolled or stacked).
        input_ids: `[batch, prompt_len]` int32 ids, padded on either side.
        attention_mask: `[batch, prompt_len]` int32, 1 at real tokens.
        rng: PRNG key (unused when `greedy`).
        max_new_tokens: Static number of decoding steps at most.
        eos_id: Token that ends a row.
        pad_id: Fills `tokens` after a row has ended.
        temperature: Sampling temperature, > 0 (ignored when `greedy`).
        top_p: Nucleus mass in (0, 1] (ignored when `greedy`).
        greedy: Static: take the argmax instead of sampling.
        logprobs: Static: also return each new token's log-probability (`Generated.logprobs`).
        num_samples: Static: `G`, continuations of each prompt; rows `b * G ... b * G + G - 1`
            of the output continue prompt `b`. The prompt is run once and its KV cache copied.

    Returns:
        `Generated` of `batch * num_samples` rows, with `logprobs` when asked for.
    """
    rows, prompt_len = input_ids.shape
    batch = rows * num_samples
    size = llama.num_prompt(params) + prompt_len + max_new_tokens
    # Scan one compiled layer body instead of unrolling them all (much faster to compile);
    # stacked once here, outside the loop.
    params = llama.stack_if_uniform(params)
    # bfloat16 layers and cache as bit patterns: XLA on CPU slices those fast (`llama.pack_layers`)
    params = llama.pack_layers(params)
    cache = llama.pack_cache(llama.init_cache(model.config, rows, size))
    variables = {"params": params}

    def pick(logits, step):
        if greedy:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            key = jax.random.fold_in(rng, step)
            token = sample_logits(logits, key, temperature=temperature, top_p=top_p)
        if not logprobs:
            return token, None
        scaled = logits.astype(jnp.float32) if greedy else logits.astype(jnp.float32) / temperature
        picked = jnp.take_along_axis(scaled, token[:, None], axis=-1)[:, 0]
        return token, picked - jax.nn.logsumexp(scaled, axis=-1)

    logits, cache = model.apply(variables, input_ids, attention_mask, cache=cache)
    # The row's last real token predicts the first new one (right padding puts it earlier).
    last = prompt_len - 1 - jnp.argmax(attention_mask[:, ::-1], axis=1)
    logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    if num_samples > 1:
        cache = llama.repeat_cache(cache, num_samples)
        logits = jnp.repeat(logits, num_samples, axis=0)
    first, first_lp = pick(logits, 0)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    lps = None
    if logprobs:
        lps = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(first_lp)
    done = first == eos_id
    lengths = jnp.ones((batch,), jnp.int32)

    def cond(state):
        step, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, tokens, lps, done, lengths = state
        prev = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=1)
        logits, cache = model.apply(variables, prev, jnp.ones_like(prev), cache=cache, start=False)
        token, lp = pick(logits[:, 0], step)
        token = jnp.where(done, pad_id, token)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
        if logprobs:
            lp = jnp.where(done, 0.0, lp)
            lps = jax.lax.dynamic_update_slice_in_dim(lps, lp[:, None], step, axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        return step + 1, cache, tokens, lps, done | (token == eos_id), lengths

    state = (jnp.ones((), jnp.int32), cache, tokens, lps, done, lengths)
    _, _, tokens, lps, _, lengths = jax.lax.while_loop(cond, body, state)
    return Generated(tokens, lengths, lps)
