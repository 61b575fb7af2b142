"""RL on a tiny Llama with a LoRA policy: compiled rollouts, GRPO and PPO raise a synthetic reward.

The reward is the share of a completion's tokens equal to TARGET, a token the base model samples
about 2% of the time, so the completions of a prompt differ in reward from the first step on (a
rarer one leaves whole groups at 0, advantages 0, and learning waits on luck: seed-dependent).
Checked over four seeds of the adapter and the sampler: GRPO reaches 0.61-0.64 from 0.02, PPO
0.35-0.64. The tiny model's embedding is
scaled up (x16) so that its next-token distribution is neither flat (a random 0.02-scale table
gives logits within +-0.3, which a LoRA on the layers below the final RMSNorm can hardly move)
nor deterministic (every sample of a prompt the same, so GRPO's advantages are all 0).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab import generation
from ftlab.core import partition, train
from ftlab.models import llama
from ftlab.peft import lora
from ftlab.posttrain import rl

CFG = llama.LlamaConfig.tiny(max_position_embeddings=32)
MODEL = llama.LlamaForCausalLM(CFG)
RANK, ALPHA = 2, 4.0
TARGET, EOS = 12, 1
SAMPLING = rl.Sampling(num_samples=8, max_new_tokens=8, eos_id=EOS)
# row 0 left-padded, row 1 right-padded
PROMPTS = np.array([[0, 0, 12, 40], [7, 33, 9, 0], [21, 22, 23, 24], [50, 3, 17, 44]], np.int32)
PROMPT_MASK = (PROMPTS > 0).astype(np.int32)
BATCH = {"prompt_ids": PROMPTS, "prompt_mask": PROMPT_MASK}


def wrap(apply):
    return lora.wrap_apply(apply, alpha=ALPHA, rank=RANK)


def reward_fn(rollout):
    hits = (rollout.tokens == TARGET) * rollout.mask
    return jnp.sum(hits, axis=1) / jnp.maximum(jnp.sum(rollout.mask, axis=1), 1)


@pytest.fixture(scope="module")
def tree():
    base = llama.init(CFG, jax.random.key(0))
    base["decoder"]["embeddings"]["word_embeddings"]["embedding"] *= 16.0
    targets = [".*/attention/(query|value)", ".*/mlp/(up|down)"]
    return lora.init(base, jax.random.key(1), targets=targets, rank=RANK, alpha=ALPHA)


def _shifted(tree, by=0.5):
    """A trained adapter: B away from zero, so the policy differs from the base."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x + by if partition.path_name(p).endswith("lora_b") else x, tree
    )


@pytest.fixture(scope="module")
def rollout():
    """One compiled rollout for every test (always called on the LoRA tree's structure)."""
    return rl.make_rollout(MODEL, SAMPLING, wrap=wrap)


@pytest.fixture(scope="module")
def grpo_step():
    """``{dtype: compiled GRPO step}`` (Adam 0.1, state donated), compiled on first use."""
    tx = optax.adam(0.1)

    def make(dtype):
        model = llama.LlamaForCausalLM(dataclasses.replace(CFG, dtype=dtype))
        return jax.jit(
            rl.make_grpo_step(model, tx, reward_fn, SAMPLING, wrap=wrap), donate_argnums=0
        )

    return tx, make(jnp.float32), make(jnp.bfloat16)


def _mean_reward(rollout, params):
    keys = jax.random.split(jax.random.key(99), 2)
    return float(np.mean([reward_fn(rollout(params, PROMPTS, PROMPT_MASK, k)) for k in keys]))


def _frozen_copy(state):
    return {k: np.array(v) for k, v in partition.flatten(state.frozen).items()}


def _assert_frozen_unchanged(state, before):
    after = partition.flatten(state.frozen)
    assert after.keys() == before.keys()
    for name, leaf in before.items():
        np.testing.assert_array_equal(after[name], leaf, err_msg=name)


def test_rollout_masks_stop_at_eos_logprobs_match_a_forward_pass_one_compile(rollout, tree):
    policy = _shifted(tree, 0.2)
    out = rollout(policy, PROMPTS, PROMPT_MASK, jax.random.key(0))
    rollout(tree, PROMPTS, PROMPT_MASK, jax.random.key(1))  # other weights, other key
    assert rollout.jitted._cache_size() == 1
    assert out.tokens.shape == out.mask.shape == out.logprobs.shape == (32, 8)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    ended_before = np.cumsum(tokens == EOS, axis=1) - (tokens == EOS)  # EOS strictly earlier
    np.testing.assert_array_equal(mask, ended_before == 0)
    assert 0 < mask.sum() < mask.size  # some completions ended early
    np.testing.assert_array_equal(tokens[mask == 0], EOS)  # padded with pad_id = eos_id
    # the right-padded prompt is moved left; each prompt is repeated G = 8 times
    np.testing.assert_array_equal(out.prompt_ids[8:16], np.tile([0, 7, 33, 9], (8, 1)))
    np.testing.assert_array_equal(out.prompt_mask[8:16], np.tile([0, 1, 1, 1], (8, 1)))
    assert len({tuple(row) for row in tokens[:8]}) > 1  # the G samples differ
    # the sampler's per-token log-probs are the policy's, as a whole-sequence forward pass
    # gives (num_samples=1: no prompt shared between rows)
    score = jax.jit(rl.score_rollout, static_argnums=0, static_argnames="wrap")
    lp, _ = score(MODEL, policy, out.replace(num_samples=1), wrap=wrap)
    np.testing.assert_allclose(out.logprobs, lp, atol=1e-4)
    assert np.all(np.asarray(out.logprobs)[mask == 0] == 0)
    # scored with each prompt run once into a cache its G = 8 completions continue: the same
    np.testing.assert_allclose(score(MODEL, policy, out, wrap=wrap)[0], lp, atol=2e-5)


def test_rollout_at_temperature_near_zero_is_greedy_generation(rollout, tree):
    policy = _shifted(tree, 0.3)
    # the same compiled rollout: temperature is traced
    out = rollout(policy, PROMPTS, PROMPT_MASK, jax.random.key(3), temperature=1e-5)
    assert rollout.jitted._cache_size() == 1
    merged = lora.merge(policy, alpha=ALPHA, rank=RANK)  # the same policy, no interceptor
    greedy = generation.generate(
        MODEL, merged, out.prompt_ids, out.prompt_mask, max_new_tokens=8, eos_id=EOS
    )
    np.testing.assert_array_equal(out.tokens, greedy.tokens)
    assert len({tuple(row) for row in np.asarray(out.tokens)}) > 1  # not a degenerate policy


def test_grpo_raises_the_reward_kl_starts_at_zero_base_bit_identical(rollout, tree, grpo_step):
    tx, step, _ = grpo_step
    state = train.init_state(tree, partition.labels(tree, lora.rules()), tx, seed=0)
    before, reward_before = _frozen_copy(state), _mean_reward(rollout, state.params)
    kls = []
    for _ in range(12):
        state, metrics = step(state, BATCH)
        kls.append(float(metrics["train/kl"]))
    # LoRA starts as the identity (B = 0): the sampling policy is the reference
    assert abs(kls[0]) < 1e-6, kls
    assert kls[-1] > 1e-2, kls
    reward_after = _mean_reward(rollout, state.params)
    assert reward_after > reward_before + 0.2, (reward_before, reward_after)
    _assert_frozen_unchanged(state, before)


def test_ppo_raises_the_reward_adapts_the_kl_coefficient_base_bit_identical(rollout, tree):
    tree = rl.add_value_head(tree)
    labels = partition.labels(tree, lora.rules(extra=[rl.VALUE_HEAD_RULE]))
    tx = optax.adam(0.1)
    state = train.init_state(tree, labels, tx, seed=0, collections=rl.kl_collections(0.05))
    policy_of = lambda params: {k: v for k, v in params.items() if k != rl.VALUE_HEAD}  # noqa: E731
    before, reward_before = _frozen_copy(state), _mean_reward(rollout, policy_of(state.params))
    # the host-side route: a compiled rollout, scores, then the compiled update
    update = rl.make_ppo_update(MODEL, tx, wrap=wrap, kl_target=0.5, epochs=2, minibatches=2)
    update = jax.jit(update, donate_argnums=0)
    kls, coefs = [], []
    for i in range(20):
        out = rollout(policy_of(state.params), PROMPTS, PROMPT_MASK, jax.random.key(i))
        state, metrics = update(state, out, reward_fn(out))
        kls.append(float(metrics["train/kl"]))
        coefs.append(float(metrics["train/kl_coef"]))
    assert abs(kls[0]) < 1e-5, kls
    assert coefs[0] == pytest.approx(0.05)
    # the KL rose above the target, so the coefficient rose (by at most 0.2 * 32 / 10000 a step)
    assert coefs[-1] > coefs[0], coefs
    reward_after = _mean_reward(rollout, policy_of(state.params))
    assert reward_after > reward_before + 0.2, (reward_before, reward_after)
    assert float(jnp.abs(state.trainable[rl.VALUE_HEAD]["kernel"]).max()) > 0
    _assert_frozen_unchanged(state, before)


def test_settings_that_cannot_take_effect_are_errors(rollout, tree):
    tx = optax.sgd(0.1)
    out = rollout(tree, PROMPTS, PROMPT_MASK, jax.random.key(0))
    state = train.init_state(tree, partition.labels(tree, lora.rules()), tx, seed=0)
    with pytest.raises(ValueError, match="GRPO .* needs at least 2"):
        rl.make_grpo_step(MODEL, tx, reward_fn, rl.Sampling(1, 8, EOS), wrap=wrap)
    with pytest.raises(ValueError, match=r"one float per completion, \[32\]"):
        jax.eval_shape(rl.make_grpo_update(MODEL, tx, wrap=wrap), state, out, jnp.zeros((4, 8)))
    with pytest.raises(ValueError, match="the value head is missing"):
        jax.eval_shape(rl.make_ppo_update(MODEL, tx, wrap=wrap), state, out, jnp.zeros(32))
    headed = rl.add_value_head(tree)
    labels = partition.labels(headed, lora.rules(extra=[rl.VALUE_HEAD_RULE]))
    state = train.init_state(headed, labels, tx, seed=0)
    with pytest.raises(ValueError, match="GRPO has no value model"):
        jax.eval_shape(rl.make_grpo_update(MODEL, tx, wrap=wrap), state, out, jnp.zeros(32))
    with pytest.raises(ValueError, match="pass collections=rl.kl_collections"):
        jax.eval_shape(rl.make_ppo_update(MODEL, tx, wrap=wrap), state, out, jnp.zeros(32))
    with pytest.raises(ValueError, match="minibatches=3 must divide the 32"):
        update = rl.make_grpo_update(MODEL, tx, wrap=wrap, minibatches=3)
        jax.eval_shape(update, train.init_state(tree, partition.labels(tree, lora.rules()),
                                                tx, seed=0), out, jnp.zeros(32))  # fmt: skip
    full = train.init_state(tree, jax.tree.map(lambda _: "train", tree), tx, seed=0)
    with pytest.raises(ValueError, match="state.frozen holds no decoder"):
        jax.eval_shape(rl.make_grpo_update(MODEL, tx, wrap=wrap), full, out, jnp.zeros(32))
    with pytest.raises(ValueError, match="context overflow"):
        long = np.ones((1, 30), np.int32)
        jax.eval_shape(rollout, tree, long, long, jax.random.key(0))
    with pytest.raises(ValueError, match="temperature=-1.0 must be >= 0"):
        rl.Sampling(2, 8, EOS, temperature=-1.0)


def test_grpo_in_bfloat16_keeps_float32_leaves_and_follows_the_float32_update(tree, grpo_step):
    tx, *compiled = grpo_step
    labels = partition.labels(tree, lora.rules())
    steps, deltas = {}, {}
    # the model's computation dtype: float32, bfloat16
    for dtype, step in zip((jnp.float32, jnp.bfloat16), compiled, strict=True):
        state = train.init_state(tree, labels, tx, seed=0)
        before = _frozen_copy(state)
        start = {k: np.array(v) for k, v in partition.flatten(state.trainable).items()}
        state, steps[dtype] = step(state, BATCH)
        _assert_frozen_unchanged(state, before)
        for leaf in jax.tree.leaves((state.trainable, state.opt_state)):
            assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype  # masters stay float32
        after = partition.flatten(state.trainable)
        deltas[dtype] = np.concatenate([np.ravel(after[k] - start[k]) for k in sorted(start)])
    f32, bf16 = steps[jnp.float32], steps[jnp.bfloat16]
    # bfloat16 is in effect: the gradient differs from float32's by more than float32 rounding
    assert abs(float(bf16["train/grad_norm"]) / float(f32["train/grad_norm"]) - 1) > 1e-4
    # the sampler and the trained pass run the same products (one prompt pass, its cache
    # continued, float32 sums): their log-probs agree in bfloat16 too
    assert float(bf16["train/approx_kl"]) < 1e-6, bf16
    assert float(f32["train/approx_kl"]) < 1e-9, f32
    assert float(bf16["train/clip_fraction"]) < 0.05
    # about the same samples (the same key) and the same step
    assert float(bf16["train/reward"]) == pytest.approx(float(f32["train/reward"]), abs=0.05)
    a, b = deltas[jnp.float32], deltas[jnp.bfloat16]
    assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.9
