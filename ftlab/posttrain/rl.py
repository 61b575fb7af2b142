"""RLHF for a Llama policy with any method: compiled rollouts, GRPO and PPO steps.

One RL step samples ``G`` completions for each of ``B`` prompts with ftlab's KV-cache sampler
(`ftlab.generation.decode`, compiled into the step), scores them with a reward function, and
updates the policy; generation, scoring and the update are one compiled function::

    sampling = rl.Sampling(num_samples=4, max_new_tokens=48, eos_id=2, temperature=1.0)
    step = jax.jit(rl.make_grpo_step(model, tx, reward_fn, sampling, wrap=wrap),
                   donate_argnums=0)
    state, metrics = step(state, {"prompt_ids": ids, "prompt_mask": mask})

``wrap`` is the method's wrapper of an apply function (``lora.wrap_apply`` with its alpha and
rank, or what `ftlab.models.add_method` returns; None for methods the model reads through its
hooks, and for full fine-tuning). The sampler and the training forward pass both run inside it,
so the policy that samples is the policy that is trained.

**The reference** is the same weights with the method switched off: the base model applied to
``state.frozen`` (see `ftlab.posttrain.logprobs.policy_and_reference`), so no second copy of the
model is held. Full fine-tuning has no frozen base to switch to and is refused.

**Log-probabilities** are those of ``softmax(logits / temperature)`` (TRL's convention; top-p only
restricts which tokens are drawn), 1 in place of a temperature of 0 (greedy). The sampler returns
them per token (`Rollout.logprobs`), and the training forward pass computes the same numbers the
same way: each prompt runs once for its ``G`` completions, into a KV cache they continue
(`score_rollout`; equal to a pass over whole rows up to float rounding).

**Rewards**: ``reward_fn(rollout) -> [B * G]`` float scores, traced inside the step (a reward
model's forward pass, or any jnp function of the token ids, `Rollout.input_ids` and
`Rollout.attention_mask`). For a reward that cannot be traced, run `make_rollout`, score on the
host, and call the update alone (`make_grpo_update`, `make_ppo_update`).

**GRPO** (Shao et al. 2024): group-relative advantages of the ``G`` completions of each prompt,
PPO's clipped ratio objective per token, an optional KL penalty to the reference inside the loss
(estimator k3), no value model. The ratio's denominator is the sampler's log-probs.

**PPO** (Ziegler et al. 2019, Ouyang et al. 2022): a scalar value head on the policy's last hidden
state (`add_value_head`: ``value_head/kernel`` [hidden, 1] and ``value_head/bias`` [1], trainable
leaves of the same tree, label them with `VALUE_HEAD_RULE`), per-token rewards ``-beta KL_t``
with the score on the last token (`losses.kl_penalized_rewards`), GAE, the clipped policy and
value losses, several epochs of minibatches over each rollout batch, and Ziegler et al.'s
adaptive ``beta``, kept in the train state's collections (`kl_collections`) so a checkpoint
holds it and a resumed run continues it.

**Precision**: the model's ``config.dtype`` (e.g. ``jnp.bfloat16``) is the forward passes'
computation dtype. Each forward pass of a step (rollout, reference, old and trained log-probs)
starts by casting the parameters to it, while the trainable leaves and their optimizer state keep
their own dtype (gradients flow back through the cast); the model sums its products in float32,
and log-probs and losses are float32. (The decoding loop holds bfloat16 layers and cache as bit
patterns, `llama.pack_layers`: XLA on CPU would convert them per layer and token otherwise;
`experiments/bench/RESULTS.md`.) The sampler and the training pass run the
same products, so their log-probs agree far below that dtype's rounding (an approximate KL of
about 1e-14 in the bfloat16 test); ``train/clip_fraction`` shows how near 1 the first ratio is.

**Layers**: every forward pass runs the layers stacked (`llama.stack_layers`, one compiled layer
body under `nn.scan`). Hold the train state's tree stacked (stack after the method's ``init``:
the method leaves stack with their layers) so that a step does not copy the weights into the
stacked layout on each of its forward passes; an unrolled tree works too.

Prompts may be padded on either side; the rollout moves each row's padding to the left, so the
completion follows the prompt's last real token directly. Every row needs a real token (not
checked under `jit`).

References:
    Ziegler et al., "Fine-Tuning Language Models from Human Preferences",
    https://arxiv.org/abs/1909.08593
    Ouyang et al., "Training language models to follow instructions with human feedback",
    https://arxiv.org/abs/2203.02155
    Schulman et al., "Proximal Policy Optimization Algorithms", https://arxiv.org/abs/1707.06347
    Shao et al., "DeepSeekMath" (GRPO), https://arxiv.org/abs/2402.03300
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ftlab import generation
from ftlab.core import partition, train
from ftlab.models import llama
from ftlab.posttrain import logprobs as logprobs_lib
from ftlab.posttrain import losses
from ftlab.types import Params, PRNGKey

__all__ = [
    "KL_CONTROLLER",
    "VALUE_HEAD",
    "VALUE_HEAD_RULE",
    "RewardFn",
    "Rollout",
    "Sampling",
    "add_value_head",
    "kl_collections",
    "make_grpo_step",
    "make_grpo_update",
    "make_ppo_step",
    "make_ppo_update",
    "make_rollout",
    "score_rollout",
]

VALUE_HEAD = "value_head"
# Partition rule that trains the value head; put it before the method's catch-all.
VALUE_HEAD_RULE = (f"{VALUE_HEAD}/.*", "train")
KL_CONTROLLER = "kl_controller"

Wrap = Callable[[Callable], Callable]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a rollout samples (static: one compiled rollout per setting and prompt shape).

    Attributes:
        num_samples: ``G``, completions per prompt.
        max_new_tokens: Most tokens per completion.
        eos_id: The token that ends a completion (it is part of the completion).
        pad_id: Fills a completion after its end; ``eos_id`` when None.
        temperature: > 0 samples from ``softmax(logits / temperature)``; 0 is greedy.
        top_p: Nucleus mass in (0, 1].
    """

    num_samples: int
    max_new_tokens: int
    eos_id: int
    pad_id: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self):
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int):
            raise ValueError(f"Sampling: num_samples={self.num_samples!r} must be an integer.")
        if self.num_samples < 1:
            raise ValueError(f"Sampling: num_samples={self.num_samples} must be >= 1.")
        generation.check_sampling(self.max_new_tokens, self.temperature, self.top_p)


@flax.struct.dataclass
class Rollout:
    """``B * G`` sampled completions (rows ``b * G ... b * G + G - 1`` continue prompt ``b``).

    Attributes:
        prompt_ids: ``[B * G, P]`` int32 prompts, left-padded.
        prompt_mask: ``[B * G, P]`` int32, 1 at real prompt tokens.
        tokens: ``[B * G, T]`` int32 completions; after the end, ``pad_id``.
        mask: ``[B * G, T]`` int32, 1 on a completion's tokens (its ``eos_id`` included).
        logprobs: ``[B * G, T]`` float32 log-probs of the tokens under the sampling policy
            (module docstring), 0 outside ``mask``.
        temperature: float32 scalar, the temperature the log-probs are taken at (1 for greedy).
        num_samples: ``G`` (static).
    """

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    temperature: jax.Array
    num_samples: int = flax.struct.field(pytree_node=False)

    @property
    def input_ids(self) -> jax.Array:
        """``[B * G, P + T]`` prompt and completion, e.g. for a reward model."""
        return jnp.concatenate([self.prompt_ids, self.tokens], axis=1)

    @property
    def attention_mask(self) -> jax.Array:
        """``[B * G, P + T]`` int32, 1 at the real tokens of `input_ids`."""
        return jnp.concatenate([self.prompt_mask, self.mask], axis=1)

    @property
    def lengths(self) -> jax.Array:
        """``[B * G]`` int32 completion lengths."""
        return jnp.sum(self.mask, axis=1)


RewardFn = Callable[[Rollout], jax.Array]


def add_value_head(params: Params) -> dict:
    """Adds PPO's value head, ``value_head/kernel`` [hidden, 1] and ``value_head/bias`` [1].

    Both start at zero (every value 0), so the policy and its first advantages do not depend
    on a random head. Train them: ``lora.rules(extra=[rl.VALUE_HEAD_RULE])``.

    Raises:
        ValueError: ``params`` already has a value head.

    >>> p = add_value_head(llama.init(llama.LlamaConfig.tiny(), jax.random.key(0)))
    >>> p["value_head"]["kernel"].shape
    (16, 1)
    """
    if VALUE_HEAD in params:
        raise ValueError(f"add_value_head: params already has {VALUE_HEAD!r}.")
    hidden = _output_table(params).shape[1]
    head = {"kernel": jnp.zeros((hidden, 1), jnp.float32), "bias": jnp.zeros((1,), jnp.float32)}
    return {**params, VALUE_HEAD: head}


def kl_collections(kl_coef: float) -> dict:
    """The train state's collections for PPO's KL coefficient: ``init_state(...,
    collections=rl.kl_collections(0.05))``. `make_ppo_step` reads ``beta`` there and, with a
    ``kl_target``, writes the adapted one back after each step.

    >>> kl_collections(0.1)["kl_controller"]["kl_coef"].dtype
    dtype('float32')
    """
    return {KL_CONTROLLER: {"kl_coef": losses.kl_controller_init(kl_coef).kl_coef}}


# -- the model pieces ----------------------------------------------------------------------------


def _output_table(params: Params) -> jax.Array:
    """``[vocab, hidden]``: the tied embedding, or the untied LM head transposed."""
    decoder = params["decoder"]
    if "lm_head" in decoder:
        return decoder["lm_head"]["kernel"].T
    return decoder["embeddings"]["word_embeddings"]["embedding"]


def _model_params(params: Params) -> Params:
    """The model's tree, without the value head, layers stacked where uniform (so the layer
    body compiles once; stacked before the method's wrapper, so its leaf tracking sees the
    stacked paths the model reads)."""
    return llama.stack_if_uniform({k: v for k, v in params.items() if k != VALUE_HEAD})


def _completion_hidden(model: llama.LlamaForCausalLM, num_samples: int) -> Callable:
    """``apply(params, rollout) -> [N, T, hidden]``: the final hidden state before each
    completion token (``rollout``'s prompts left-aligned, as `_rollout` makes them).

    With ``num_samples = G > 1`` (rows grouped by prompt) each prompt runs once, on ``N / G``
    rows, into a KV cache that its ``G`` completions continue (the sampler's own prefill and
    continuation path): the same outputs as one pass over the ``N`` whole rows, with the
    prompt's share of the work (forward and backward) divided by ``G``.
    """

    def apply(params, rollout: Rollout):
        variables = {"params": params}
        if num_samples == 1:
            hidden = model.apply(
                variables, rollout.input_ids, rollout.attention_mask, return_hidden=True
            )
            return hidden[:, rollout.prompt_ids.shape[1] - 1 : -1]
        prompt_ids = rollout.prompt_ids[::num_samples]
        rows, prompt_len = prompt_ids.shape
        size = llama.num_prompt(params) + prompt_len + rollout.tokens.shape[1] - 1
        cache = llama.init_cache(model.config, rows, size)
        last, cache = model.apply(
            variables, prompt_ids, rollout.prompt_mask[::num_samples], cache=cache,
            return_hidden=True,
        )  # fmt: skip
        cache = llama.repeat_cache(cache, num_samples)
        rest, _ = model.apply(
            variables, rollout.tokens[:, :-1], rollout.mask[:, :-1], cache=cache, start=False,
            return_hidden=True,
        )  # fmt: skip
        return jnp.concatenate([jnp.repeat(last[:, -1:], num_samples, axis=0), rest], axis=1)

    return apply


def _wrapped(wrap: Wrap | None, fn: Callable) -> Callable:
    return fn if wrap is None else wrap(fn)


def _left_align(ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rolls each row so its last real token is the last column (right padding moves left)."""
    shift = jnp.argmax(mask[:, ::-1], axis=1)  # trailing padding of each row
    roll = jax.vmap(lambda row, s: jnp.roll(row, s))
    return roll(ids, shift), roll(mask, shift)


def _check_prompts(model, params, prompt_ids, prompt_mask, sampling: Sampling) -> None:
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} must both be "
            "[batch, prompt_len]."
        )
    n_prompt = llama.num_prompt(params)
    needed = n_prompt + prompt_ids.shape[1] + sampling.max_new_tokens
    if needed > model.config.max_position_embeddings:
        raise ValueError(
            f"context overflow: {n_prompt} soft-prompt rows + prompt length {prompt_ids.shape[1]}"
            f" + max_new_tokens {sampling.max_new_tokens} = {needed} positions, but the model's "
            f"context (config.max_position_embeddings) is {model.config.max_position_embeddings}."
        )


def _rollout(
    model,
    wrap,
    sampling: Sampling,
    params,
    prompt_ids,
    prompt_mask,
    rng: PRNGKey,
    temperature=None,
    top_p=None,
) -> Rollout:
    """The traceable rollout (see `make_rollout`); ``temperature`` and ``top_p`` may be traced
    arrays (None: the ``sampling``'s)."""
    _check_prompts(model, params, prompt_ids, prompt_mask, sampling)
    g = sampling.num_samples
    ids, mask = _left_align(jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask, jnp.int32))
    greedy = sampling.temperature == 0.0
    pad_id = sampling.eos_id if sampling.pad_id is None else sampling.pad_id
    temperature = jnp.asarray(
        1.0 if greedy else sampling.temperature if temperature is None else temperature,
        jnp.float32,
    )
    top_p = jnp.asarray(sampling.top_p if top_p is None else top_p, jnp.float32)

    def sample(params, ids, mask, rng):
        return generation.decode(
            model,
            params,
            ids,
            mask,
            rng,
            max_new_tokens=sampling.max_new_tokens,
            eos_id=sampling.eos_id,
            pad_id=pad_id,
            temperature=temperature,
            top_p=top_p,
            greedy=greedy,
            logprobs=True,
            num_samples=g,
        )

    out = _wrapped(wrap, sample)(_model_params(jax.lax.stop_gradient(params)), ids, mask, rng)
    ids, mask = jnp.repeat(ids, g, axis=0), jnp.repeat(mask, g, axis=0)
    completion = (jnp.arange(sampling.max_new_tokens)[None, :] < out.lengths[:, None]).astype(
        jnp.int32
    )
    return Rollout(
        prompt_ids=ids,
        prompt_mask=mask,
        tokens=out.tokens,
        mask=completion,
        logprobs=out.logprobs * completion,
        temperature=temperature,
        num_samples=g,
    )


def make_rollout(
    model: llama.LlamaForCausalLM, sampling: Sampling, *, wrap: Wrap | None = None
) -> Callable[..., Rollout]:
    """``rollout(params, prompt_ids, prompt_mask, rng, *, temperature=None, top_p=None)``.

    ``G = sampling.num_samples`` completions for each of the ``B`` prompts in one batched call
    of the KV-cache sampler (``B * G`` rows), inside the method's ``wrap``. Compiled once per
    prompt shape: ``temperature`` and ``top_p`` (None: the ``sampling``'s) are traced, so a
    schedule of them does not recompile. Greedy decoding (``sampling.temperature == 0``) is
    its own compiled function, which takes no ``temperature`` or ``top_p``.

    Args:
        model: The policy's `LlamaForCausalLM`.
        sampling: How to sample.
        wrap: The method's wrapper of an apply function (module docstring), or None.

    Returns:
        The jitted rollout; ``params`` is the whole tree (a value head in it is ignored).

    Raises:
        ValueError: (when called) prompts of different shapes, a context overflow, or a
            ``temperature`` or ``top_p`` given to a greedy rollout.
    """
    jitted = jax.jit(functools.partial(_rollout, model, wrap, sampling))

    def rollout(params, prompt_ids, prompt_mask, rng, *, temperature=None, top_p=None):
        if sampling.temperature == 0.0:
            if temperature is not None or top_p is not None:
                raise ValueError(
                    "this rollout is greedy (sampling.temperature=0): temperature and top_p "
                    "would have no effect; make a sampling rollout to sample."
                )
            temperature = top_p = 1.0  # unused by the greedy path
        else:
            temperature = sampling.temperature if temperature is None else temperature
            top_p = sampling.top_p if top_p is None else top_p
            if isinstance(temperature, (int, float)) and isinstance(top_p, (int, float)):
                generation.check_sampling(sampling.max_new_tokens, temperature, top_p)
                if temperature == 0.0:
                    raise ValueError(
                        "temperature=0 is greedy decoding, a different compiled function: "
                        "make a rollout with Sampling(temperature=0.0)."
                    )
        # always arrays, so every call has the same pytree and compiles once
        t, p = jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32)
        return jitted(params, prompt_ids, prompt_mask, rng, t, p)

    rollout.jitted = jitted  # for compile counts
    return rollout


def score_rollout(
    model: llama.LlamaForCausalLM,
    params: Params,
    rollout: Rollout,
    *,
    wrap: Wrap | None = None,
    values: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Per-token log-probs of ``rollout.tokens`` (and values) from one forward pass.

    Each prompt runs once for its ``rollout.num_samples`` completions, which continue its KV
    cache (so ``rows b * G ... b * G + G - 1`` must share prompt ``b``, as `Rollout` says). The
    hidden state before each completion token gives its log-prob under
    ``softmax(logits / rollout.temperature)`` (chunked over the vocabulary,
    `logprobs.token_logprobs_from_hidden`) and, with ``values``, the value head's ``V_t``.

    Args:
        model: The `LlamaForCausalLM`.
        params: The whole tree (with ``value_head`` for ``values``).
        rollout: The completions.
        wrap: The method's wrapper (None for the base model).
        values: Also return the value head's predictions.

    Returns:
        ``(logprobs [N, T], values [N, T] or None)`` float32, 0 outside ``rollout.mask``.
    """
    h = _wrapped(wrap, _completion_hidden(model, rollout.num_samples))(
        _model_params(params), rollout
    )
    mask = rollout.mask.astype(jnp.float32)
    scaled = h / rollout.temperature.astype(h.dtype)
    lp = logprobs_lib.token_logprobs_from_hidden(scaled, _output_table(params), rollout.tokens)
    if not values:
        return lp * mask, None
    if VALUE_HEAD not in params:
        raise ValueError(
            f"score_rollout(values=True): params has no {VALUE_HEAD!r}; add it with "
            "rl.add_value_head and train it (rl.VALUE_HEAD_RULE)."
        )
    head = params[VALUE_HEAD]
    v = jnp.einsum("ntd,dk->ntk", h.astype(jnp.float32), head["kernel"])[..., 0] + head["bias"][0]
    return lp * mask, v * mask


def _reference_logprobs(model, state: train.TrainState, rollout: Rollout) -> jax.Array:
    frozen = {k: v for k, v in state.frozen.items() if k != VALUE_HEAD}
    frozen = train.cast_floats(frozen, model.config.dtype)
    if "decoder" not in frozen:
        raise ValueError(
            "the RL reference is the frozen base model with the method switched off, but "
            "state.frozen holds no decoder (full fine-tuning): train with a method that freezes "
            "the base (LoRA, ...)."
        )
    lp, _ = score_rollout(model, jax.lax.stop_gradient(frozen), rollout)
    return jax.lax.stop_gradient(lp)


def _sequence_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask.astype(jnp.float32), axis=1)


def _check_scores(scores: jax.Array, rollout: Rollout) -> jax.Array:
    n = rollout.tokens.shape[0]
    if jnp.shape(scores) != (n,):
        raise ValueError(
            f"the rewards must be one float per completion, [{n}]; got shape {jnp.shape(scores)}."
        )
    return jnp.asarray(scores, jnp.float32)


def _check_value_head(state: train.TrainState, *, wanted: bool, what: str) -> None:
    trainable = VALUE_HEAD in state.trainable
    if wanted and not trainable:
        where = "frozen" if VALUE_HEAD in state.frozen else "missing"
        raise ValueError(
            f"{what}: the value head is {where}; add it with rl.add_value_head and label it "
            "trainable with rl.VALUE_HEAD_RULE."
        )
    if not wanted and trainable:
        raise ValueError(
            f"{what}: GRPO has no value model, so the trainable {VALUE_HEAD!r} would never be "
            "trained; drop it from the parameters."
        )


# -- the update: epochs of minibatches over one rollout batch ------------------------------------


def _minibatch_updates(
    state: train.TrainState,
    tx: optax.GradientTransformation,
    loss_fn: Callable[[Params, Mapping[str, jax.Array]], tuple[jax.Array, dict]],
    data: Mapping[str, Any],
    rng: PRNGKey,
    *,
    epochs: int,
    minibatches: int,
    dtype: Any,
) -> tuple[train.TrainState, dict]:
    """``epochs`` passes over ``data``'s rows in ``minibatches`` shuffled parts, one update
    each, in a `lax.scan`, the loss seeing the parameters cast to ``dtype``; metrics averaged
    over the updates."""
    n = jax.tree.leaves(data)[0].shape[0]
    if n % minibatches:
        raise ValueError(f"minibatches={minibatches} must divide the {n} completions per step.")
    size = n // minibatches
    if minibatches == 1:
        order = jnp.tile(jnp.arange(n), (epochs, 1))
    else:
        order = jnp.stack(
            [jax.random.permutation(jax.random.fold_in(rng, e), n) for e in range(epochs)]
        )
    order = order.reshape(epochs * minibatches, size)

    # The frozen base is a constant of the loop, not part of its carry: a carried tree is
    # copied into and out of the loop, the whole base model each step.
    frozen = train.cast_floats(state.frozen, dtype)

    def one(state, rows):
        part = jax.tree.map(lambda x: x[rows] if x.ndim else x, data)  # scalars: temperature
        if minibatches > 1 and "rollout" in part:  # shuffled rows: no longer grouped by prompt
            part["rollout"] = part["rollout"].replace(num_samples=1)

        def of_trainable(trainable):
            return loss_fn(partition.merge(train.cast_floats(trainable, dtype), frozen), part)

        (loss, aux), grads = jax.value_and_grad(of_trainable, has_aux=True)(state.trainable)
        if state.collections:  # PPO's KL coefficient: unchanged by an update
            aux = {**aux, train.COLLECTIONS: state.collections}
        return train.apply_gradients(state, tx, grads, loss, aux)

    updated, metrics = jax.lax.scan(one, state.replace(frozen={}), order)
    return updated.replace(frozen=state.frozen), jax.tree.map(jnp.mean, metrics)


def _check_counts(epochs: int, minibatches: int) -> None:
    for name, value in (("epochs", epochs), ("minibatches", minibatches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1.")


def _rollout_metrics(rollout: Rollout, scores, kl_seq) -> dict:
    return {
        "train/reward": jnp.mean(scores),
        "train/reward_std": jnp.std(scores),
        "train/kl": jnp.mean(kl_seq),
        "train/completion_length": jnp.mean(rollout.lengths.astype(jnp.float32)),
    }


# -- GRPO ----------------------------------------------------------------------------------------


def make_grpo_update(
    model: llama.LlamaForCausalLM,
    tx: optax.GradientTransformation,
    *,
    wrap: Wrap | None = None,
    clip_eps: float = 0.2,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    epochs: int = 1,
    minibatches: int = 1,
    eps: float = 1e-4,
    ddof: int = 1,
) -> Callable[[train.TrainState, Rollout, jax.Array], tuple[train.TrainState, dict]]:
    """``update(state, rollout, scores) -> (state, metrics)``: GRPO on a scored rollout.

    Advantages are the scores standardised within each prompt's group of ``G``
    (`losses.grpo_advantages`), given to every token of a completion; the loss is PPO's clipped
    ratio objective averaged over all completion tokens (`losses.ppo_policy_loss`) against the
    sampler's log-probs, plus ``kl_coef`` times the mean per-token KL to the reference (with
    gradient through the policy's log-probs). The reference's log-probs are computed once per
    update, also for ``kl_coef = 0``, as ``train/kl`` reports the KL either way.

    Args:
        model: The policy's `LlamaForCausalLM`.
        tx: The optimizer over ``state.trainable``.
        wrap: The method's wrapper (module docstring).
        clip_eps: The ratio's clip range.
        kl_coef: Weight of the KL penalty in the loss (0: none).
        kl_estimator: Per-token KL estimator, one of `losses.KL_ESTIMATORS` (GRPO's is k3).
        epochs: Passes over the rollout batch (GRPO's ``mu``; 1: one on-policy update).
        minibatches: Updates per pass, on shuffled equal parts of the completions.
        eps: Added to each group's standard deviation.
        ddof: Its delta degrees of freedom (1: TRL's).

    Returns:
        The update. Metrics: ``train/loss``, ``train/grad_norm``, ``train/clip_fraction``,
        ``train/approx_kl`` (averaged over the updates), ``train/reward`` (mean score),
        ``train/reward_std``, ``train/kl`` (mean over completions of the summed per-token KL
        of the sampling policy to the reference) and ``train/completion_length``.

    Raises:
        ValueError: an unknown estimator or bad counts; at trace time, a trainable value head,
            scores not ``[B * G]``, ``minibatches`` not dividing ``B * G``, or no frozen base.
    """
    _check_counts(epochs, minibatches)
    if kl_estimator not in losses.KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={kl_estimator!r}; expected one of {losses.KL_ESTIMATORS}.")

    def loss_fn(params, part):
        lp, _ = score_rollout(model, params, part["rollout"], wrap=wrap)
        mask = part["rollout"].mask
        loss, aux = losses.ppo_policy_loss(
            lp, part["old"], part["advantages"], mask, clip_eps=clip_eps
        )
        if kl_coef:
            kl = losses.per_token_kl(lp, part["reference"], kind=kl_estimator)
            loss = loss + kl_coef * losses.masked_mean(kl, mask)
        return loss, aux

    def update(state: train.TrainState, rollout: Rollout, scores: jax.Array):
        _check_value_head(state, wanted=False, what="make_grpo_update")
        scores = _check_scores(scores, rollout)
        g = rollout.num_samples
        advantages = losses.grpo_advantages(scores.reshape(-1, g), eps=eps, ddof=ddof)
        advantages = jnp.broadcast_to(advantages.reshape(-1, 1), rollout.mask.shape)
        reference = _reference_logprobs(model, state, rollout)
        kl = losses.per_token_kl(rollout.logprobs, reference, kind=kl_estimator)
        metrics = _rollout_metrics(rollout, scores, _sequence_sum(kl, rollout.mask))
        data = {
            "rollout": rollout,
            "old": rollout.logprobs,
            "advantages": advantages,
            "reference": reference,
        }
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
        state, update_metrics = _minibatch_updates(
            state, tx, loss_fn, data, rng, epochs=epochs, minibatches=minibatches,
            dtype=model.config.dtype,
        )  # fmt: skip
        return state, {**update_metrics, **metrics}

    return update


def make_grpo_step(
    model: llama.LlamaForCausalLM,
    tx: optax.GradientTransformation,
    reward_fn: RewardFn,
    sampling: Sampling,
    *,
    wrap: Wrap | None = None,
    **update_options,
) -> Callable[[train.TrainState, Mapping[str, jax.Array]], tuple[train.TrainState, dict]]:
    """``step(state, batch) -> (state, metrics)``: sample, score and update, all traced.

    ``batch`` holds ``prompt_ids`` and ``prompt_mask`` ``[B, P]``; the rollout draws from
    ``fold_in(state.rng, state.step)``. Jit it with the state donated.

    Args:
        model: The policy's `LlamaForCausalLM`.
        tx: The optimizer over ``state.trainable``.
        reward_fn: ``reward_fn(rollout) -> [B * G]`` scores, traceable.
        sampling: How the rollout samples (``num_samples`` is GRPO's group size ``G``, >= 2).
        wrap: The method's wrapper (module docstring).
        **update_options: The keyword arguments of `make_grpo_update`.

    Returns:
        The step; metrics as `make_grpo_update`'s.
    """
    if sampling.num_samples < 2:
        raise ValueError(
            f"sampling.num_samples={sampling.num_samples}: GRPO compares the completions of a "
            "prompt with each other and needs at least 2."
        )
    update = make_grpo_update(model, tx, wrap=wrap, **update_options)
    return _step_of(model, wrap, sampling, reward_fn, update)


def _step_of(model, wrap, sampling, reward_fn, update):
    def step(state: train.TrainState, batch: Mapping[str, jax.Array]):
        missing = [k for k in ("prompt_ids", "prompt_mask") if k not in batch]
        if missing:
            raise ValueError(f"the batch has no {missing} (keys: {sorted(batch)}).")
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)
        params = train.cast_floats(state.params, model.config.dtype)
        rollout = _rollout(
            model, wrap, sampling, params, batch["prompt_ids"], batch["prompt_mask"], rng
        )
        return update(state, rollout, reward_fn(rollout))

    return step


# -- PPO -----------------------------------------------------------------------------------------


def _whiten(x: jax.Array, mask: jax.Array) -> jax.Array:
    mean = losses.masked_mean(x, mask)
    var = losses.masked_mean((x - mean) ** 2, mask)
    return (x - mean) * jax.lax.rsqrt(var + 1e-8) * mask.astype(jnp.float32)


def make_ppo_update(
    model: llama.LlamaForCausalLM,
    tx: optax.GradientTransformation,
    *,
    wrap: Wrap | None = None,
    clip_eps: float = 0.2,
    value_clip_eps: float = 0.2,
    vf_coef: float = 0.1,
    gamma: float = 1.0,
    lam: float = 0.95,
    kl_estimator: str = "k1",
    kl_target: float | None = None,
    kl_horizon: float = 10000.0,
    whiten_advantages: bool = True,
    epochs: int = 4,
    minibatches: int = 1,
) -> Callable[[train.TrainState, Rollout, jax.Array], tuple[train.TrainState, dict]]:
    """``update(state, rollout, scores) -> (state, metrics)``: PPO with a value head.

    Before the updates, one forward pass of the policy (log-probs and values, the "old" ones)
    and one of the reference (method off); per-token rewards ``-beta KL_t`` plus the score on
    each completion's last token (`losses.kl_penalized_rewards`, ``beta`` from
    ``state.collections["kl_controller"]``), advantages and returns by `losses.gae`, advantages
    whitened over the batch; then ``epochs`` passes of ``minibatches`` updates of
    ``ppo_policy_loss + vf_coef * ppo_value_loss``. With ``kl_target`` the coefficient adapts
    after the step (`losses.kl_controller_update`, ``B * G`` samples per step); without, it
    stays as `kl_collections` set it.

    Args:
        model: The policy's `LlamaForCausalLM`.
        tx: The optimizer over ``state.trainable`` (method leaves and the value head).
        wrap: The method's wrapper (module docstring).
        clip_eps: The ratio's clip range.
        value_clip_eps: The value's clip range (`losses.ppo_value_loss`).
        vf_coef: Weight of the value loss.
        gamma: Discount over tokens.
        lam: GAE's lambda.
        kl_estimator: The per-token KL in the rewards (Ziegler et al.: k1).
        kl_target: The KL (nats per completion) to hold, or None for a fixed coefficient.
        kl_horizon: The controller's horizon in samples.
        whiten_advantages: Standardise the advantages over the batch's completion tokens.
        epochs: Passes over the rollout batch.
        minibatches: Updates per pass, on shuffled equal parts of the completions.

    Returns:
        The update. Metrics: those of `make_grpo_update` and ``train/value_loss``,
        ``train/value_clip_fraction``, ``train/kl_coef`` (the coefficient used in this step's
        rewards).

    Raises:
        ValueError: bad options; at trace time, no trainable value head, no
            ``kl_controller`` collection, or no frozen base.
    """
    _check_counts(epochs, minibatches)
    if kl_estimator not in losses.KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={kl_estimator!r}; expected one of {losses.KL_ESTIMATORS}.")
    if kl_target is not None and (kl_target <= 0 or kl_horizon <= 0):
        raise ValueError(f"kl_target={kl_target} and kl_horizon={kl_horizon} must be positive.")

    def loss_fn(params, part):
        mask = part["rollout"].mask
        lp, values = score_rollout(model, params, part["rollout"], wrap=wrap, values=True)
        pg, aux = losses.ppo_policy_loss(
            lp, part["old"], part["advantages"], mask, clip_eps=clip_eps
        )
        vf, vf_aux = losses.ppo_value_loss(
            values, part["old_values"], part["returns"], mask, clip_eps=value_clip_eps
        )
        aux = {**aux, "value_loss": vf, "value_clip_fraction": vf_aux["clip_fraction"]}
        return pg + vf_coef * vf, aux

    def update(state: train.TrainState, rollout: Rollout, scores: jax.Array):
        _check_value_head(state, wanted=True, what="make_ppo_update")
        if KL_CONTROLLER not in state.collections:
            raise ValueError(
                f"make_ppo_update: state.collections has no {KL_CONTROLLER!r} (it has "
                f"{sorted(state.collections)}); pass collections=rl.kl_collections(kl_coef) to "
                "train.init_state."
            )
        scores = _check_scores(scores, rollout)
        kl_coef = state.collections[KL_CONTROLLER]["kl_coef"]
        params = train.cast_floats(jax.lax.stop_gradient(state.params), model.config.dtype)
        old, old_values = score_rollout(model, params, rollout, wrap=wrap, values=True)
        old, old_values = jax.lax.stop_gradient((old, old_values))
        reference = _reference_logprobs(model, state, rollout)
        rewards, kl = losses.kl_penalized_rewards(
            scores, old, reference, rollout.mask, kl_coef=kl_coef, kind=kl_estimator
        )
        advantages, returns = losses.gae(rewards, old_values, rollout.mask, gamma=gamma, lam=lam)
        if whiten_advantages:
            advantages = _whiten(advantages, rollout.mask)
        kl_seq = _sequence_sum(kl, rollout.mask)
        metrics = {**_rollout_metrics(rollout, scores, kl_seq), "train/kl_coef": kl_coef}
        data = {
            "rollout": rollout,
            "old": old,
            "old_values": old_values,
            "advantages": advantages,
            "returns": returns,
        }
        rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
        state, update_metrics = _minibatch_updates(
            state, tx, loss_fn, data, rng, epochs=epochs, minibatches=minibatches,
            dtype=model.config.dtype,
        )  # fmt: skip
        if kl_target is not None:
            controller = losses.kl_controller_update(
                losses.KLControllerState(kl_coef),
                jnp.mean(kl_seq),
                rollout.tokens.shape[0],
                target=kl_target,
                horizon=kl_horizon,
            )
            collections = {
                **state.collections,
                KL_CONTROLLER: {"kl_coef": controller.kl_coef},
            }
            state = state.replace(collections=collections)
        return state, {**update_metrics, **metrics}

    return update


def make_ppo_step(
    model: llama.LlamaForCausalLM,
    tx: optax.GradientTransformation,
    reward_fn: RewardFn,
    sampling: Sampling,
    *,
    wrap: Wrap | None = None,
    **update_options,
) -> Callable[[train.TrainState, Mapping[str, jax.Array]], tuple[train.TrainState, dict]]:
    """``step(state, batch) -> (state, metrics)``: sample, score and run `make_ppo_update`.

    As `make_grpo_step`, with the keyword arguments of `make_ppo_update`. The state needs a
    trainable value head (`add_value_head`, `VALUE_HEAD_RULE`) and PPO's KL coefficient in its
    collections (`kl_collections`).
    """
    update = make_ppo_update(model, tx, wrap=wrap, **update_options)
    return _step_of(model, wrap, sampling, reward_fn, update)
