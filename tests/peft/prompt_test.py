"""Prompt tuning: prompt placement, masking and pooling, vocab init, training, errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab import testing
from ftlab.core import partition
from ftlab.models import bert, hooks
from ftlab.peft import prompt

TINY = bert.BertConfig.tiny(dropout_rate=0.0)
MODEL = bert.BertClassifier(TINY, num_classes=3)
ENCODER = bert.BertEncoder(TINY)
LENGTH = 3


def _apply(params, batch, rng):
    del rng
    return MODEL.apply({"params": params}, batch["input_ids"], batch["attention_mask"])


def _batch(seed=0, n=4, seq=7):
    return testing.classifier_batch(TINY, seed=seed, n=n, seq=seq)


@functools.cache
def _sites():
    """The model's hook sites, traced once (`hooks.discover`)."""
    return hooks.discover(_apply, testing.random_params(MODEL, _batch()), _batch(), None)


@pytest.fixture(scope="module")
def base():
    return testing.random_params(MODEL, _batch())


@jax.jit
def _encode(params, ids, mask):
    return ENCODER.apply({"params": params}, ids, mask)


def test_vocab_init_copies_distinct_word_rows(base):
    params = prompt.init(base, sites=_sites(), rng=jax.random.key(1), length=LENGTH)
    p = np.asarray(params["encoder"]["embeddings"]["prompt"])
    table = np.asarray(base["encoder"]["embeddings"]["word_embeddings"]["embedding"])
    chex.assert_shape(p, (LENGTH, TINY.hidden_size))
    rows = [int(np.flatnonzero((table == r).all(-1))[0]) for r in p]
    assert len(set(rows)) == LENGTH
    rnd = prompt.init(base, sites=_sites(), rng=jax.random.key(1), length=LENGTH, init="random")
    assert np.max(np.abs(rnd["encoder"]["embeddings"]["prompt"])) <= 0.5


def test_prompt_is_prepended_attended_and_padding_stays_invisible(base):
    params = prompt.init(base, sites=_sites(), rng=jax.random.key(1), length=LENGTH)
    enc, enc0 = params["encoder"], base["encoder"]
    rng = np.random.default_rng(3)
    sentence = rng.integers(1, TINY.vocab_size, 5).astype(np.int32)
    outs = []
    for total in (5, 9):
        # Garbage (not just [PAD]) in the masked slots: it must stay invisible with a prompt too.
        ids = rng.integers(0, TINY.vocab_size, (2, total)).astype(np.int32)
        ids[:, :5] = sentence
        mask = (np.arange(total) < 5).astype(np.int32)[None].repeat(2, axis=0)
        hidden = _encode(enc, ids, mask)
        chex.assert_shape(hidden, (2, LENGTH + total, TINY.hidden_size))
        outs.append(hidden[:, : LENGTH + 5])
    chex.assert_trees_all_close(outs[0], outs[1], atol=1e-5)
    # The real tokens attend to the prompt, so their states differ from the base model's.
    base_hidden = _encode(enc0, ids, mask)
    assert np.max(np.abs(outs[1][:, LENGTH:] - base_hidden[:, :5])) > 1e-3


def test_classifier_pools_over_real_tokens_only(base):
    params = prompt.init(base, sites=_sites(), rng=jax.random.key(1), length=LENGTH)
    b = _batch(1)
    ids, mask = b["input_ids"], b["attention_mask"]
    hidden = _encode(params["encoder"], ids, mask)
    head = params["head"]
    want = bert.mean_pool(hidden[:, LENGTH:], mask) @ head["kernel"] + head["bias"][None]
    np.testing.assert_allclose(jax.jit(_apply)(params, b, None), want, atol=1e-5, rtol=1e-5)
    cls = bert.BertClassifier(TINY, 3, pooling="cls")
    got = jax.jit(cls.apply)({"params": params}, ids, mask)
    want = hidden[:, LENGTH] @ head["kernel"] + head["bias"][None]  # the [CLS] token, not a prompt
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_training_moves_only_prompt_and_head_and_lowers_the_loss(base):
    params = jax.tree.map(
        jnp.array, prompt.init(base, sites=_sites(), rng=jax.random.key(1), length=LENGTH)
    )
    label_tree = partition.labels(params, prompt.rules(extra=[("head/.*", "train")]))
    tx = partition.optimizer({"train": optax.adam(1e-2)}, label_tree)
    trainable0, _ = partition.split(jax.tree.map(np.array, params), label_tree)
    assert sorted(partition.flatten(trainable0)) == [
        "encoder/embeddings/prompt",
        "head/bias",
        "head/kernel",
    ]
    testing.assert_trains_only(params, label_tree, tx, _apply, _batch(3), steps=4)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(length=0), r"prompt\.init: length"), (dict(init="zeros"), r"prompt\.init: init")],
)
def test_init_errors_name_the_config_key(base, kwargs, match):
    with pytest.raises(ValueError, match=match):
        prompt.init(base, sites=_sites(), rng=jax.random.key(0), **({"length": LENGTH} | kwargs))


def test_misshaped_prompt_names_the_leaf_path(base):
    params = prompt.init(base, sites=_sites(), rng=jax.random.key(1), length=LENGTH)
    params["encoder"]["embeddings"]["prompt"] = np.zeros((LENGTH, 5), np.float32)
    with pytest.raises(ValueError, match=r"encoder/embeddings/prompt has shape \(3, 5\)"):
        jax.eval_shape(_apply, params, _batch(), None)
