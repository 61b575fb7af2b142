"""Tests of KV-cache generation: a naive no-cache loop as reference, padding, EOS, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlab import generation
from ftlab.models import llama

CFG = llama.LlamaConfig.tiny(max_position_embeddings=16)
MODEL = llama.LlamaForCausalLM(CFG)


@pytest.fixture(scope="module")
def params():
    return llama.init(CFG, jax.random.key(0))


PROMPTS = [[5, 9, 13], [7, 21, 33, 2, 40]]
LEFT = np.array([[0, 0, 5, 9, 13], [7, 21, 33, 2, 40]])
LEFT_MASK = (np.arange(5)[None] >= np.array([[2], [0]])).astype(np.int32)


@pytest.fixture(scope="module")
def naive(params):
    return [_naive_greedy(params, p, 6) for p in PROMPTS]


def _naive_greedy(params, prompt, steps):
    """Greedy decoding without a cache: one full forward pass per new token."""
    seq = list(prompt)
    for _ in range(steps):
        logits = llama.forward(CFG, params, jnp.asarray([seq + [0] * (12 - len(seq))]))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt) :]


def test_greedy_with_cache_equals_naive_loop_left_and_right_padded(params, naive):
    right = np.array([[5, 9, 13, 0, 0], [7, 21, 33, 2, 40]])
    for x, m in ((LEFT, LEFT_MASK), (right, LEFT_MASK[:, ::-1])):
        out = generation.generate(MODEL, params, x, m, max_new_tokens=6, eos_id=CFG.vocab_size)
        np.testing.assert_array_equal(out.tokens, naive)
        np.testing.assert_array_equal(out.lengths, [6, 6])


def test_stops_at_eos_and_pads_after(params, naive):
    want = naive[0]
    eos = want[2]
    stop = want.index(eos)
    out = generation.generate(
        MODEL, params, LEFT, LEFT_MASK, max_new_tokens=6, eos_id=eos, pad_id=63
    )
    assert out.tokens[0, : stop + 1].tolist() == want[: stop + 1]
    assert out.tokens[0, stop + 1 :].tolist() == [63] * (5 - stop)
    assert int(out.lengths[0]) == stop + 1


def test_context_overflow_names_both_numbers(params):
    with pytest.raises(ValueError, match=r"prompt length 10 \+ max_new_tokens 7 = 17 .* is 16"):
        generation.generate(MODEL, params, np.ones((1, 10), np.int32), max_new_tokens=7, eos_id=1)


def test_bad_settings(params):
    x = np.ones((1, 3), np.int32)
    with pytest.raises(ValueError, match="pass rng="):
        generation.generate(MODEL, params, x, max_new_tokens=2, eos_id=1, temperature=1.0)
    with pytest.raises(ValueError, match=r"top_p=0.0 must be in \(0, 1\]"):
        generation.generate(MODEL, params, x, max_new_tokens=2, eos_id=1, top_p=0.0)
    with pytest.raises(ValueError, match="attention_mask row 1 has no real token"):
        mask = np.array([[1, 1, 1], [0, 0, 0]])
        generation.generate(MODEL, params, mask, mask, max_new_tokens=2, eos_id=1)


def test_sample_logits_follows_the_nucleus_distribution():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.jit(
        jax.vmap(
            lambda k, t, p: generation.sample_logits(logits, k, temperature=t, top_p=p)[0],
            in_axes=(0, None, None),
        )
    )
    freq = np.bincount(np.asarray(draw(keys, 1.0, 0.7)), minlength=4) / 4000
    # Nucleus at 0.7: tokens 0 and 1 (mass before token 1 is 0.5 < 0.7, before token 2 is 0.8).
    np.testing.assert_allclose(freq, [0.625, 0.375, 0.0, 0.0], atol=0.03)
    freq = np.bincount(np.asarray(draw(keys, 0.5, 1.0)), minlength=4) / 4000
    p = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    np.testing.assert_allclose(freq, p / p.sum(), atol=0.03)


def test_nucleus_by_bisection_is_the_sorted_nucleus_ties_included():
    # the definition by sorting: the most likely tokens while the mass before them is < top_p
    rng = np.random.default_rng(0)
    # many ties, and -0.0 beside 0.0 (equal logits: the same side of the threshold)
    logits = np.round(rng.normal(size=(64, 1000)) * 3.0, 1).astype(np.float32)
    logits[0] = 0.0  # one row all tied
    logits[1, 7] = 40.0  # one token holds almost all the mass
    nucleus = jax.jit(generation._nucleus)
    for top_p in (1e-6, 0.1, 0.5, 0.9, 0.999):
        ordered = np.sort(logits.astype(np.float64), axis=-1)[:, ::-1]
        probs = np.exp(ordered - ordered[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        kept = np.sum(np.cumsum(probs, axis=-1) - probs < top_p, axis=-1)
        threshold = ordered[np.arange(len(ordered)), kept - 1]
        want = logits >= threshold[:, None]
        got = np.asarray(nucleus(jnp.asarray(logits), top_p)) > -np.inf
        # float32 sums cannot decide a row whose nucleus mass, or the mass above its
        # threshold, is within rounding of top_p: leave those few rows out
        p = np.exp(logits - logits.max(-1, keepdims=True), dtype=np.float64)
        p /= p.sum(-1, keepdims=True)
        at = np.sum(p * want, axis=-1)
        above = np.sum(p * (logits > threshold[:, None]), axis=-1)
        clear = (at - top_p > 1e-5) & (top_p - above > 1e-5) | (kept == 1) & (at - top_p > 1e-5)
        assert clear.sum() >= 48, (top_p, clear.sum())  # not a test of nothing
        np.testing.assert_array_equal(got[clear], want[clear], err_msg=f"top_p={top_p}")
    assert want[0].all() and want[1].sum() == 1


def test_top_p_of_one_draws_what_a_plain_categorical_draws_and_compiles_once():
    # top_p = 1 skips the nucleus (no sort of the vocabulary) and keeps every token: the draw
    # is jax.random.categorical's from the same key; top_p is traced, so one compile serves both.
    logits = jax.random.normal(jax.random.key(0), (1, 49152)) * 3.0
    keys = jax.random.split(jax.random.key(1), 64)
    draw = jax.jit(
        jax.vmap(lambda k, p: generation.sample_logits(logits, k, temperature=0.5, top_p=p)[0])
    )
    plain = jax.vmap(lambda k: jax.random.categorical(k, logits / 0.5, axis=-1)[0])(keys)
    np.testing.assert_array_equal(draw(keys, jnp.full(64, 1.0)), plain)
    assert len(set(np.asarray(plain).tolist())) > 1  # not one token every time
    # a nucleus of the most likely token alone (this draw has two tied at the top)
    tiny = draw(keys, jnp.full(64, 1e-6))
    np.testing.assert_array_equal(logits[0][tiny], jnp.max(logits))
    assert draw._cache_size() == 1


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy(params, naive):
    kw = dict(max_new_tokens=6, eos_id=CFG.vocab_size, temperature=1.0, rng=jax.random.key(1))
    nucleus = generation.generate(MODEL, params, LEFT, LEFT_MASK, top_p=1e-6, **kw)
    np.testing.assert_array_equal(nucleus.tokens, naive)
    a = generation.generate(MODEL, params, LEFT, LEFT_MASK, **kw)
    b = generation.generate(MODEL, params, LEFT, LEFT_MASK, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    # At temperature 1 over a random tiny model's near-uniform logits, sampling leaves greedy.
    assert not np.array_equal(a.tokens, naive)


@pytest.fixture(scope="module")
def smollm2():
    from third_party import smollm2 as lib

    return lib, lib.load()


def test_smollm2_greedy_chat_answer_left_and_right_padded(smollm2):
    lib, m = smollm2
    ids = m.tokenizer.encode(lib.chat_prompt([lib.user("What is the capital of France?")])).ids
    n = len(ids)
    x = np.full((2, n + 2), m.pad_id, np.int32)
    mask = np.zeros((2, n + 2), np.int32)
    x[0, 2:], mask[0, 2:] = ids, 1  # left-padded
    x[1, :n], mask[1, :n] = ids, 1  # right-padded
    out = generation.generate(
        llama.LlamaForCausalLM(m.config), m.params, x, mask, max_new_tokens=10, eos_id=m.eos_id
    )
    for row, length in zip(np.asarray(out.tokens), np.asarray(out.lengths), strict=True):
        assert row[length - 1] == m.eos_id
        assert m.tokenizer.decode(row[: length - 1].tolist()) == "The capital of France is Paris."
