"""Attention kernels compute one function; "auto" picks one the platform and dtype allow."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftlab.models import attention, bert, llama


def _inputs(heads=4, kv_heads=2, q_len=6, k_len=6, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, q_len, heads, 8), dtype)
    k = jax.random.normal(ks[1], (2, k_len, kv_heads, 8), dtype)
    v = jax.random.normal(ks[2], (2, k_len, kv_heads, 8), dtype)
    keep = np.ones((2, k_len), bool)
    keep[1, -2:] = False  # padding in the second row
    bias = np.where(keep, 0.0, -1e9).astype(np.float32)[:, None, None, :]
    return q, k, v, bias


def _reference(q, k, v, bias):
    """A per-head float64 loop: query head h reads KV head h // (heads // kv_heads)."""
    q, k, v, bias = (np.asarray(x, np.float64) for x in (q, k, v, bias))
    groups = q.shape[2] // k.shape[2]
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            s = q[b, :, h] @ k[b, :, h // groups].T / np.sqrt(q.shape[-1]) + bias[b, 0]
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h // groups]
    return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("implementation", ["einsum", "xla"])
def test_kernels_match_a_per_head_loop(implementation, kv_heads):
    q, k, v, bias = _inputs(kv_heads=kv_heads)
    got = attention.dot_product_attention(q, k, v, bias, implementation=implementation)
    assert got.shape == q.shape
    np.testing.assert_allclose(got, _reference(q, k, v, bias), atol=1e-5, rtol=1e-5)


def test_a_per_query_bias_is_honoured():
    q, k, v, _ = _inputs()
    causal = np.where(np.tril(np.ones((6, 6), bool)), 0.0, -1e9).astype(np.float32)
    bias = np.broadcast_to(causal, (2, 1, 6, 6))
    for impl in ("einsum", "xla"):
        got = attention.dot_product_attention(q, k, v, bias, implementation=impl)
        np.testing.assert_allclose(got, _reference(q, k, v, bias), atol=1e-5, rtol=1e-5)


def test_dropout_is_applied_to_the_probabilities_in_heads_layout():
    q, k, v, bias = _inputs(kv_heads=4)
    seen = []

    def zero_dropout(p):
        seen.append(p.shape)
        return jnp.zeros_like(p)

    got = attention.dot_product_attention(q, k, v, bias, dropout=zero_dropout)
    assert seen == [(2, 4, 6, 6)]
    np.testing.assert_array_equal(got, 0.0)


def test_auto_resolves_to_einsum_off_gpu_and_with_dropout():
    on_gpu = jax.default_backend() == "gpu"
    assert attention.resolve("auto", jnp.float32, dropout=False) == "einsum"
    assert attention.resolve("auto", jnp.bfloat16, dropout=True) == "einsum"
    want = "cudnn" if on_gpu else "einsum"
    assert attention.resolve("auto", jnp.bfloat16, dropout=False) == want


def test_bad_choices_name_the_setting():
    with pytest.raises(ValueError, match="BertConfig: attention='flash'"):
        bert.BertConfig.tiny(attention="flash")
    with pytest.raises(ValueError, match="LlamaConfig: attention='sdpa'"):
        dataclasses.replace(llama.LlamaConfig.tiny(), attention="sdpa")
    with pytest.raises(ValueError, match="cannot drop out"):
        attention.resolve("cudnn", jnp.bfloat16, dropout=True)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        attention.resolve("cudnn", jnp.float32, dropout=False)
    with pytest.raises(ValueError, match="attention_dropout_rate=1.5"):
        bert.BertConfig.tiny(attention_dropout_rate=1.5)


def test_encoder_gives_the_same_outputs_with_the_xla_kernel():
    """Same parameters, dropout off: the einsum and the fused XLA kernel agree end to end."""
    config = bert.BertConfig.tiny(attention_dropout_rate=0.0, dropout_rate=0.0)
    ids = jnp.array([[1, 5, 7, 9, 0, 0], [1, 4, 4, 2, 8, 3]], jnp.int32)
    mask = (ids > 0).astype(jnp.int32)
    model = bert.BertEncoder(dataclasses.replace(config, attention="einsum"))
    params = model.init(jax.random.key(0), ids, mask)
    want = model.apply(params, ids, mask)
    got = bert.BertEncoder(dataclasses.replace(config, attention="xla")).apply(params, ids, mask)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_decoder_gives_the_same_logits_with_the_xla_kernel():
    config = dataclasses.replace(llama.LlamaConfig.tiny(), attention="einsum")
    params = llama.init(config, jax.random.key(0))
    ids = jnp.array([[3, 5, 7, 9, 11], [4, 4, 2, 8, 3]], jnp.int32)
    mask = jnp.array([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], jnp.int32)  # left padding in row 0
    want = llama.LlamaForCausalLM(config).apply({"params": params}, ids, mask)
    fused = dataclasses.replace(config, attention="xla")
    got = llama.LlamaForCausalLM(fused).apply({"params": params}, ids, mask)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
