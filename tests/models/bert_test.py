"""Behaviour of the BERT encoder and classifier on a tiny config."""

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlab.models import bert

CONFIG = bert.BertConfig.tiny()
BATCH, SEQ = 2, 8


def _paths(tree):
    return {"/".join(k): v.shape for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _inputs(seed=0, batch=BATCH, seq=SEQ):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, CONFIG.vocab_size, (batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    return ids, mask


# Everything runs under jit: eager flax compiles each op separately, which is slower on 2 cores.
@jax.jit
def _encode(params, ids, mask):
    return bert.BertEncoder(CONFIG).apply({"params": params}, ids, mask)


@pytest.fixture(scope="module")
def encoder_params():
    ids, mask = _inputs()
    return jax.jit(bert.BertEncoder(CONFIG).init)(jax.random.key(0), ids, mask)["params"]


def test_encoder_param_paths_and_shapes(encoder_params):
    h, m, v, p = CONFIG.hidden_size, CONFIG.intermediate_size, CONFIG.vocab_size, 32
    want = {
        "embeddings/word_embeddings/embedding": (v, h),
        "embeddings/position_embeddings/embedding": (p, h),
        "embeddings/token_type_embeddings/embedding": (2, h),
        "embeddings/layer_norm/scale": (h,),
        "embeddings/layer_norm/bias": (h,),
    }
    for i in range(CONFIG.num_layers):
        for name in ("query", "key", "value", "out"):
            want[f"layer_{i}/attention/{name}/kernel"] = (h, h)
            want[f"layer_{i}/attention/{name}/bias"] = (h,)
        want[f"layer_{i}/mlp/intermediate/kernel"] = (h, m)
        want[f"layer_{i}/mlp/intermediate/bias"] = (m,)
        want[f"layer_{i}/mlp/output/kernel"] = (m, h)
        want[f"layer_{i}/mlp/output/bias"] = (h,)
        for norm in ("attention_layer_norm", "output_layer_norm"):
            want[f"layer_{i}/{norm}/scale"] = (h,)
            want[f"layer_{i}/{norm}/bias"] = (h,)
    assert _paths(encoder_params) == want
    chex.assert_trees_all_equal_dtypes(
        encoder_params, jax.tree.map(lambda x: jnp.zeros((), jnp.float32), encoder_params)
    )


def test_encoder_output_shape(encoder_params):
    ids, mask = _inputs()
    out = _encode(encoder_params, ids, mask)
    chex.assert_shape(out, (BATCH, SEQ, CONFIG.hidden_size))
    chex.assert_tree_all_finite(out)


def test_classifier_tree_and_logits(encoder_params):
    ids, mask = _inputs()
    model = bert.BertClassifier(CONFIG, num_classes=3)
    shapes = jax.eval_shape(model.init, jax.random.key(1), ids, mask)["params"]
    paths = _paths(shapes)
    assert set(shapes) == {"encoder", "head"}
    assert paths["head/kernel"] == (CONFIG.hidden_size, 3)
    assert paths["encoder/layer_1/attention/query/kernel"] == (16, 16)
    assert {k: v for k, v in paths.items() if k.startswith("encoder/")} == {
        f"encoder/{k}": v for k, v in _paths(encoder_params).items()
    }
    head = {"kernel": np.ones((CONFIG.hidden_size, 3), np.float32), "bias": np.arange(3.0)}
    params = {"encoder": encoder_params, "head": head}
    logits = jax.jit(model.apply)({"params": params}, ids, mask)
    chex.assert_shape(logits, (BATCH, 3))
    assert logits.dtype == jnp.float32
    # Mean pooling then the head: the logits are the pooled features' sum plus the bias.
    pooled = bert.mean_pool(_encode(encoder_params, ids, mask), mask)
    chex.assert_trees_all_close(
        logits, pooled.sum(-1, keepdims=True) + jnp.arange(3.0)[None], atol=1e-5
    )
    cls_model = bert.BertClassifier(CONFIG, 3, pooling="cls")
    assert jax.eval_shape(cls_model.apply, {"params": params}, ids, mask).shape == (BATCH, 3)
    bad_model = bert.BertClassifier(CONFIG, 3, pooling="max")
    with pytest.raises(ValueError, match="pooling"):
        jax.eval_shape(bad_model.apply, {"params": params}, ids, mask)


def test_padding_does_not_change_real_tokens_or_embedding(encoder_params):
    rng = np.random.default_rng(3)
    sentence = rng.integers(1, CONFIG.vocab_size, 5).astype(np.int32)
    embeddings, hiddens = [], []
    for total in (SEQ, 2 * SEQ):
        # Garbage (not just [PAD]) in the masked slots: they must still be invisible.
        ids = rng.integers(0, CONFIG.vocab_size, (BATCH, total)).astype(np.int32)
        ids[:, :5] = sentence
        mask = (np.arange(total) < 5).astype(np.int32)[None].repeat(BATCH, axis=0)
        hidden = _encode(encoder_params, ids, mask)
        hiddens.append(hidden[:, :5])
        embeddings.append(bert.l2_normalize(bert.mean_pool(hidden, mask)))
    chex.assert_trees_all_close(embeddings[0], embeddings[1], atol=1e-5)
    chex.assert_trees_all_close(hiddens[0], hiddens[1], atol=1e-5)
    # The rows differ only in their padding garbage.
    chex.assert_trees_all_close(embeddings[1][0], embeddings[1][1], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embeddings[0], axis=-1), 1.0, atol=1e-6)


def test_jit_matches_eager_and_traces_once(encoder_params):
    ids, mask = _inputs()
    model = bert.BertEncoder(CONFIG)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(params, ids, mask):
        return model.apply({"params": params}, ids, mask)

    jitted = forward(encoder_params, ids, mask)
    forward(encoder_params, (ids + 1) % CONFIG.vocab_size, mask)
    chex.assert_trees_all_close(jitted, _encode(encoder_params, ids, mask), atol=1e-5)


def test_dropout_only_when_not_deterministic(encoder_params):
    ids, mask = _inputs()
    model = bert.BertEncoder(CONFIG)

    @jax.jit
    def train_forward(rng):
        return model.apply(
            {"params": encoder_params}, ids, mask, deterministic=False, rngs={"dropout": rng}
        )

    # deterministic=True (the default) needs no rng and is reproducible.
    a = _encode(encoder_params, ids, mask)
    chex.assert_trees_all_equal(a, _encode(encoder_params, ids, mask))
    # rbg keys: same semantics, but the dropout masks compile ~3x faster than threefry on CPU.
    key5, key6 = jax.random.key(5, impl="rbg"), jax.random.key(6, impl="rbg")
    c, d = train_forward(key5), train_forward(key6)
    assert not np.allclose(a, c)
    assert not np.allclose(c, d)
    chex.assert_trees_all_equal(c, train_forward(key5))


def test_compute_dtype_bfloat16_keeps_float32_params_and_logits():
    config = bert.BertConfig.tiny(dtype=jnp.bfloat16)
    ids, mask = _inputs()
    model = bert.BertClassifier(config, num_classes=2)
    # Shapes and dtypes only: nothing needs computing.
    params = jax.eval_shape(model.init, jax.random.key(0), ids, mask)["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    hidden = jax.eval_shape(
        bert.BertEncoder(config).apply, {"params": params["encoder"]}, ids, mask
    )
    assert hidden.dtype == jnp.bfloat16
    assert jax.eval_shape(model.apply, {"params": params}, ids, mask).dtype == jnp.float32


def test_sequence_longer_than_position_table_is_refused(encoder_params):
    ids, mask = _inputs(seq=CONFIG.max_position_embeddings + 1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        bert.BertEncoder(CONFIG).apply({"params": encoder_params}, ids, mask)


def test_mean_pool_and_l2_normalize():
    hidden = jnp.array([[[1.0, 2.0], [3.0, 4.0], [50.0, 60.0]]])
    pooled = bert.mean_pool(hidden, jnp.array([[1, 1, 0]]))
    chex.assert_trees_all_close(pooled, jnp.array([[2.0, 3.0]]))
    chex.assert_trees_all_close(bert.l2_normalize(jnp.array([[3.0, 4.0]])), jnp.array([[0.6, 0.8]]))
    chex.assert_trees_all_close(bert.l2_normalize(jnp.zeros((1, 2))), jnp.zeros((1, 2)))


def test_encode_sentences_rejects_wrapped_params(encoder_params):
    ids, mask = _inputs()
    with pytest.raises(ValueError, match="embeddings"):
        bert.encode_sentences(CONFIG, {"params": encoder_params}, ids, mask)


HF_CONFIG = {
    "model_type": "bert",
    "hidden_act": "gelu",
    "position_embedding_type": "absolute",
    "vocab_size": 100,
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "max_position_embeddings": 20,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}


def test_from_hf_reads_fields():
    config = bert.BertConfig.from_hf(HF_CONFIG)
    assert (config.num_layers, config.num_heads, config.head_dim) == (1, 2, 4)


@pytest.mark.parametrize(
    "field,value",
    [
        ("hidden_act", "gelu_new"),
        ("position_embedding_type", "relative_key"),
        ("model_type", "roberta"),
        ("is_decoder", True),
    ],
)
def test_from_hf_refuses_unsupported_fields(field, value):
    with pytest.raises(ValueError, match=field):
        bert.BertConfig.from_hf({**HF_CONFIG, field: value})


def test_from_hf_names_missing_field():
    config = dict(HF_CONFIG)
    del config["num_hidden_layers"]
    with pytest.raises(ValueError, match="num_hidden_layers"):
        bert.BertConfig.from_hf(config)


def test_hook_leaves_compose_and_keep_padding_invisible(encoder_params):
    # Prompt, prefixes and an adapter together, as hand-made leaves: the output grows by the
    # prompt length, differs from the base model, and padding garbage stays invisible.
    h, n = CONFIG.hidden_size, 3
    rng = np.random.default_rng(7)
    params = jax.tree.map(np.asarray, encoder_params)
    params["embeddings"] = {**params["embeddings"], "prompt": rng.normal(size=(n, h))}
    attn = dict(params["layer_0"]["attention"])
    attn["prefix_key"], attn["prefix_value"] = rng.normal(size=(2, 2, h))
    adapter = {
        "down": {"kernel": rng.normal(size=(h, 4)), "bias": np.zeros(4)},
        "up": {"kernel": rng.normal(size=(4, h)), "bias": np.zeros(h)},
    }
    params["layer_1"] = {**params["layer_1"], "output_adapter": adapter}
    params["layer_0"] = {**params["layer_0"], "attention": attn}
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    sentence = rng.integers(1, CONFIG.vocab_size, 5).astype(np.int32)
    outs = []
    for total in (5, 9):
        ids = rng.integers(0, CONFIG.vocab_size, (BATCH, total)).astype(np.int32)
        ids[:, :5] = sentence
        mask = (np.arange(total) < 5).astype(np.int32)[None].repeat(BATCH, axis=0)
        out = _encode(params, ids, mask)
        chex.assert_shape(out, (BATCH, n + total, h))
        outs.append(out[:, : n + 5])
    chex.assert_trees_all_close(outs[0], outs[1], atol=1e-5)
    base = _encode(encoder_params, ids[:, :5], mask[:, :5])
    assert np.max(np.abs(outs[0][:, n:] - base)) > 1e-3
    sentences = bert.encode_sentences(CONFIG, params, ids, mask)
    chex.assert_shape(sentences, (BATCH, h))
