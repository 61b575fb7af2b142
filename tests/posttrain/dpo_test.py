"""DPO / IPO / SimPO steps on a tiny Llama with LoRA: the reference is the base, method off."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab.core import partition, train
from ftlab.models import llama
from ftlab.peft import lora
from ftlab.posttrain import dpo, logprobs, losses

CFG = llama.LlamaConfig.tiny()
MODEL = llama.LlamaForCausalLM(CFG)
RANK, ALPHA = 2, 4.0


def _base_apply(params, batch):
    return MODEL.apply({"params": params}, batch["input_ids"], batch["attention_mask"])


POLICY_APPLY = lora.wrap_apply(_base_apply, alpha=ALPHA, rank=RANK)


@pytest.fixture(scope="module")
def base():
    return llama.init(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def tree(base):
    return lora.init(
        base, jax.random.key(1), targets=[".*/attention/(query|value)"], rank=RANK, alpha=ALPHA
    )


@pytest.fixture(scope="module")
def pairs():
    """4 pairs: a 3-token prompt, then a response of 3-5 tokens, right-padded to 8."""
    rng = np.random.default_rng(0)
    out = {}
    for side in ("chosen", "rejected"):
        ids = rng.integers(1, CFG.vocab_size, size=(4, 8)).astype(np.int32)
        lengths = rng.integers(6, 9, size=4)
        attention = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
        out[f"{side}_input_ids"] = ids * attention
        out[f"{side}_attention_mask"] = attention
        out[f"{side}_loss_mask"] = attention * (np.arange(8)[None] >= 3)
    return out


def _state(tree, tx, *, shift=0.0):
    # shift: a trained adapter (B away from 0), so the policy differs from the reference
    tree = jax.tree_util.tree_map_with_path(
        lambda p, x: x + shift if partition.path_name(p).endswith("lora_b") else x, tree
    )
    return train.init_state(tree, partition.labels(tree, lora.rules()), tx, seed=0)


def _separate_logprobs(params, pairs, *, average=False):
    """Chosen and rejected log-probs from the model's logits, one side at a time."""
    out = []
    for side in ("chosen", "rejected"):
        ids = jnp.asarray(pairs[f"{side}_input_ids"])
        targets, weights = logprobs.next_token_targets(ids, jnp.asarray(pairs[f"{side}_loss_mask"]))
        logits = llama.forward(CFG, params, ids, jnp.asarray(pairs[f"{side}_attention_mask"]))
        out.append(logprobs.sequence_logprobs(logits, targets, weights, average=average))
    return out


TX = optax.adam(3e-2)


@pytest.fixture(scope="module")
def step():
    """One compiled DPO step (beta 1) for every test: metrics are those of the state given."""
    step = dpo.make_dpo_step(POLICY_APPLY, TX, base_apply=_base_apply, beta=1.0)
    return jax.jit(step, donate_argnums=0)


def test_step_loss_is_dpo_loss_of_the_policy_against_the_base_model(base, tree, pairs, step):
    state = _state(tree, TX, shift=0.3)
    # the policy: the adapter merged into plain kernels; the reference: the base model alone
    pi_c, pi_r = _separate_logprobs(lora.merge(state.params, alpha=ALPHA, rank=RANK), pairs)
    _, metrics = step(state, pairs)  # donates the state
    ref_c, ref_r = _separate_logprobs(base, pairs)
    assert float(jnp.max(jnp.abs(pi_c - ref_c))) > 1e-3  # the adapter changed the policy
    want = jnp.mean(losses.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=1.0))
    np.testing.assert_allclose(metrics["train/loss"], want, rtol=1e-5)
    margin = jnp.mean((pi_c - ref_c) - (pi_r - ref_r))
    np.testing.assert_allclose(metrics["train/rewards/margin"], margin, rtol=1e-4, atol=1e-6)


def test_training_lowers_the_loss_and_leaves_the_base_bit_identical(tree, pairs, step):
    state = _state(tree, TX)
    frozen = jax.tree.map(np.array, state.frozen)
    history = []
    for _ in range(8):
        state, metrics = step(state, pairs)
        history.append(float(metrics["train/loss"]))
    # LoRA starts as the identity: the policy is the reference, loss log 2, no margin
    np.testing.assert_allclose(history[0], np.log(2.0), rtol=1e-5)
    assert history[-1] < history[0] - 0.1, history
    assert float(metrics["train/rewards/accuracy"]) == 1.0
    for name, leaf in partition.flatten(state.frozen).items():
        np.testing.assert_array_equal(leaf, partition.flatten(frozen)[name], err_msg=name)


def test_simpo_and_ipo_on_length_normalised_logprobs_precomputed_reference(base, tree, pairs):
    state = _state(tree, optax.sgd(0.0), shift=0.3)
    merged = lora.merge(state.params, alpha=ALPHA, rank=RANK)
    a_c, a_r = _separate_logprobs(merged, pairs, average=True)
    simpo = jax.jit(dpo.make_dpo_loss(POLICY_APPLY, loss="simpo", beta=2.0, gamma=0.5))
    loss, aux = simpo(state.params, pairs, None)
    np.testing.assert_allclose(loss, jnp.mean(losses.simpo_loss(a_c, a_r, gamma=0.5)), rtol=1e-5)
    np.testing.assert_allclose(aux["logps/chosen"], jnp.mean(a_c), rtol=1e-5)
    # the reference precomputed once from the starting parameters (the full fine-tuning route)
    ref = jax.jit(dpo.reference_logprobs, static_argnums=0, static_argnames="loss")(
        _base_apply, base, pairs, loss="ipo"
    )
    ref_c, ref_r = _separate_logprobs(base, pairs, average=True)
    np.testing.assert_allclose(ref["reference_chosen"], ref_c, rtol=1e-5)
    ipo = jax.jit(dpo.make_dpo_loss(POLICY_APPLY, loss="ipo", beta=0.25))
    loss, _ = ipo(state.params, {**pairs, **ref}, None)
    want = losses.ipo_loss(a_c, a_r, ref_c, ref_r, beta=0.25)
    np.testing.assert_allclose(loss, jnp.mean(want), rtol=1e-5)


def test_a_reference_that_cannot_take_effect_is_an_error(tree, pairs):
    tx = optax.sgd(0.0)
    state = _state(tree, tx)
    with pytest.raises(ValueError, match="reference-free; base_apply"):
        dpo.make_dpo_step(POLICY_APPLY, tx, base_apply=_base_apply, loss="simpo")
    with pytest.raises(ValueError, match="one reference would be ignored"):
        step = dpo.make_dpo_step(POLICY_APPLY, tx, base_apply=_base_apply)
        jax.eval_shape(step, state, {**pairs, "reference_chosen": jnp.zeros(4)})
    with pytest.raises(ValueError, match="needs the reference log-probs"):
        jax.eval_shape(dpo.make_dpo_step(POLICY_APPLY, tx), state, pairs)
    full = train.init_state(tree, jax.tree.map(lambda _: "train", tree), tx, seed=0)
    with pytest.raises(ValueError, match="state.frozen has no leaves"):
        jax.eval_shape(dpo.make_dpo_step(POLICY_APPLY, tx, base_apply=_base_apply), full, pairs)
    with pytest.raises(ValueError, match="pad chosen and rejected rows"):
        short = {k: v[:, :6] if k.startswith("chosen") else v for k, v in pairs.items()}
        jax.eval_shape(dpo.make_dpo_step(POLICY_APPLY, tx, base_apply=_base_apply), state, short)
    with pytest.raises(ValueError, match="gamma=2.0 is SimPO's margin"):
        dpo.make_dpo_loss(POLICY_APPLY, gamma=2.0)
