"""Completion log-probs over the loss mask only; the reference is the base model, method off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlab.core import partition
from ftlab.models import llama
from ftlab.peft import lora
from ftlab.posttrain import logprobs

CFG = llama.LlamaConfig.tiny()
MODEL = llama.LlamaForCausalLM(CFG)


def _base_apply(params, batch):
    return MODEL.apply({"params": params}, batch["input_ids"], batch["attention_mask"])


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, CFG.vocab_size, size=(3, 8)).astype(np.int32)
    attention = np.ones_like(ids)
    attention[2, 6:] = 0  # right padding
    loss_mask = np.zeros_like(ids)
    loss_mask[0, 3:] = 1
    loss_mask[1, 5:7] = 1
    loss_mask[2, 2:6] = 1
    targets, weights = logprobs.next_token_targets(jnp.array(ids), jnp.array(loss_mask))
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "loss_mask": loss_mask,
        "targets": targets,
        "weights": weights,
    }


def test_sequence_logprobs_sum_the_completion_tokens_only(batch):
    logits = np.asarray(jax.random.normal(jax.random.key(0), (3, 8, CFG.vocab_size)), np.float64)
    ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    want_sum, want_mean = np.zeros(3), np.zeros(3)
    for b in range(3):
        scored = [t for t in range(1, 8) if loss_mask[b, t]]  # tokens, predicted from t - 1
        lp = [
            logits[b, t - 1, ids[b, t]] - np.log(np.sum(np.exp(logits[b, t - 1]))) for t in scored
        ]
        want_sum[b], want_mean[b] = sum(lp), sum(lp) / len(lp)
    args = (jnp.array(logits, jnp.float32), batch["targets"], batch["weights"])
    np.testing.assert_allclose(logprobs.sequence_logprobs(*args), want_sum, rtol=1e-5)
    np.testing.assert_allclose(
        logprobs.sequence_logprobs(*args, average=True), want_mean, rtol=1e-5
    )


def test_next_token_targets_stop_at_segment_boundaries():
    ids = jnp.array([[1, 2, 3, 4, 5]])
    seg = jnp.array([[1, 1, 2, 2, 0]])
    t, w = logprobs.next_token_targets(ids, jnp.ones_like(ids), seg)
    assert t.tolist() == [[2, 3, 4, 5, 0]]
    assert w.tolist() == [[1.0, 0.0, 1.0, 0.0, 0.0]]


def test_chunked_hidden_logprobs_equal_the_full_logits(batch):
    targets = batch["targets"]
    hidden = jax.random.normal(jax.random.key(1), (3, 8, CFG.hidden_size))
    table = jax.random.normal(jax.random.key(2), (CFG.vocab_size, CFG.hidden_size))

    def full(h, e):
        return logprobs.token_logprobs(jnp.einsum("bsd,vd->bsv", h, e), targets)

    def chunked(h, e):  # 24 tokens in chunks of 5: the last one padded
        return logprobs.token_logprobs_from_hidden(h, e, targets, chunk=5)

    weight = jnp.arange(24.0).reshape(3, 8)

    @jax.jit
    def values_and_grads(h, e):  # one compile for both functions and their gradients
        def loss(h, e, f):
            return jnp.sum(weight * f(h, e))

        # the hidden states alone (d/dh formed in the forward pass), then both (recomputed)
        return [
            (f(h, e), jax.grad(loss)(h, e, f), jax.grad(loss, argnums=(0, 1))(h, e, f))
            for f in (full, chunked)
        ]

    (v_full, gh_full, g2_full), (v_chunk, gh_chunk, g2_chunk) = values_and_grads(hidden, table)
    np.testing.assert_allclose(v_chunk, v_full, atol=1e-5)
    np.testing.assert_allclose(gh_chunk, gh_full, atol=1e-4)
    for a, b in zip(g2_chunk, g2_full, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_reference_with_the_method_off_equals_the_base_model(batch):
    base = llama.init(CFG, jax.random.key(2))
    tree = lora.init(
        base, jax.random.key(3), targets=[".*/attention/(query|value)"], rank=2, alpha=4
    )
    # a trained adapter: B away from zero, so the policy differs from the base
    tree = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.5 if partition.path_name(p).endswith("lora_b") else x, tree
    )
    trainable, frozen = partition.split(tree, partition.labels(tree, lora.rules()))
    policy_apply = lora.wrap_apply(_base_apply, alpha=4, rank=2)

    @jax.jit
    def both(trainable, frozen, batch):
        # the reference's gradient, with both log-probs as the aux output: one compile
        def reference_sum(tr, fr):
            lp = logprobs.policy_and_reference(policy_apply, _base_apply, tr, fr, batch)
            return jnp.sum(lp[1]), lp

        return jax.grad(reference_sum, argnums=(0, 1), has_aux=True)(trainable, frozen)

    grads, (policy, reference) = both(trainable, frozen, batch)
    logits = jax.jit(_base_apply)(base, batch)
    base_lp = logprobs.sequence_logprobs(logits, batch["targets"], batch["weights"])
    # the same numbers up to float32 rounding (the two compilations fuse differently)
    np.testing.assert_allclose(reference, base_lp, rtol=1e-6)
    assert float(jnp.max(jnp.abs(policy - reference))) > 1e-3
    # no gradient flows through the reference, to the adapter or to the base
    assert not any(float(jnp.abs(x).max()) for x in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="frozen has no leaves"):
        logprobs.policy_and_reference(policy_apply, _base_apply, tree, {}, batch)
