"""Tests of ftlab.icl: prompt text, demonstration draws, padding, cached scoring vs a plain pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlab import icl
from ftlab.models import llama

TASK = icl.Task("Classify.", "Review: {text}\nSentiment:", (" negative", " positive"))
CFG = llama.LlamaConfig.tiny(max_position_embeddings=64)


def test_prompt_text():
    demos = [("great fun", 1), ("a bore", 0)]
    assert icl.prompt(TASK, demos, "fine") == (
        "Classify.\n\nReview: great fun\nSentiment: positive\n\n"
        "Review: a bore\nSentiment: negative\n\nReview: fine\nSentiment:"
    )
    assert icl.prompt(TASK, [], "fine") == "Classify.\n\nReview: fine\nSentiment:"


def test_sample_demos_balanced_reproducible_and_checked():
    labels = np.array([0] * 10 + [1] * 3)
    a = icl.sample_demos(np.random.default_rng(0), labels, 6)
    b = icl.sample_demos(np.random.default_rng(0), labels, 6)
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 6 and np.bincount(labels[a]).tolist() == [3, 3]
    with pytest.raises(ValueError, match="too few eligible examples of label 1 for k=8"):
        icl.sample_demos(np.random.default_rng(0), labels, 8)


class _Enc:
    def __init__(self, ids):
        self.ids, self.tokens = ids, [str(i) for i in ids]


class _CharTokenizer:
    """One token per character (ids 3..), enough to test padding and truncation."""

    def encode(self, text):
        return _Enc([3 + (ord(c) % 60) for c in text])

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids)


def test_encoding_pads_and_truncates():
    tok = _CharTokenizer()
    ids, mask = icl.encode_prefix(tok, "abc", 5, pad_id=0)
    assert ids[0, :2].tolist() == [0, 0] and mask.tolist() == [[0, 0, 1, 1, 1]]
    with pytest.raises(ValueError, match="take 6 tokens, more than prefix_len=5"):
        icl.encode_prefix(tok, "abcdef", 5, pad_id=0)
    with pytest.raises(ValueError, match=r"than config.icl.prefix_len=5; .* config.icl.prefix_len"):
        icl.encode_prefix(tok, "abcdef", 5, pad_id=0, what="config.icl.prefix_len")
    task = icl.Task("", "<{text}>", (" a", " b"))
    ids, mask = icl.encode_queries(tok, task, ["xy", "x" * 20], 6, pad_id=0)
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert ids[1].tolist() == tok.encode("<xxxx>").ids  # the text is cut, the template kept
    with pytest.raises(ValueError, match="label word ' a' is 2 tokens"):
        icl.label_token_ids(tok, task)


def test_cached_scoring_equals_one_plain_forward_pass():
    """Left-padded shared prefix in a cache + right-padded queries == each prompt run alone."""
    params = llama.init(CFG, jax.random.key(0))
    prefix = [5, 6, 7, 8]
    queries = [[9, 10, 11], [12, 13, 14, 15, 16]]
    labels = jnp.array([20, 30, 40])
    p_ids = np.array([[0, 0] + prefix])
    p_mask = np.array([[0, 0, 1, 1, 1, 1]])
    q_ids = np.zeros((2, 6), np.int32)
    q_mask = np.zeros((2, 6), np.int32)
    for i, q in enumerate(queries):
        q_ids[i, : len(q)], q_mask[i, : len(q)] = q, 1
    cache = icl.prefill(CFG, params, p_ids, p_mask, query_len=6)
    got = icl.score(CFG, params, cache, q_ids, q_mask, labels)
    for i, q in enumerate(queries):
        logits = llama.forward(CFG, params, jnp.asarray([prefix + q]))[0, -1]
        want = jax.nn.log_softmax(logits)[labels]
        np.testing.assert_allclose(got[i], want, atol=1e-5)


@pytest.fixture(scope="module")
def smollm2():
    from third_party import smollm2 as lib

    return lib.load()


def test_real_model_scores_clear_reviews(smollm2):
    m = smollm2
    task = icl.Task(
        "Classify the sentiment of each movie review as positive or negative.",
        "Review: {text}\nSentiment:",
        (" negative", " positive"),
    )
    assert icl.label_token_ids(m.tokenizer, task).tolist() == [3524, 2731]
    texts = [
        "A masterpiece: moving, funny and beautifully acted. I loved every minute.",
        "A dull, lifeless mess that wastes its talented cast. Avoid it.",
    ]
    tok, pad = m.tokenizer, m.pad_id
    p_ids, p_mask = icl.encode_prefix(tok, icl.prefix_text(task, []), 16, pad_id=pad)
    cache = icl.prefill(m.config, m.params, p_ids, p_mask, query_len=24)
    q_ids, q_mask = icl.encode_queries(tok, task, texts, 24, pad_id=pad)
    logp = np.asarray(icl.score(m.config, m.params, cache, q_ids, q_mask, jnp.array([3524, 2731])))
    assert np.all(logp < 0) and np.all(np.exp(logp).sum(1) <= 1.0)
    # The 135M model leans to " positive" zero-shot, but the review decides the direction: the
    # positive review's margin log p(positive) - log p(negative) is far above the negative one's.
    margin = logp[:, 1] - logp[:, 0]
    assert margin[0] > margin[1] + 1.0, margin
