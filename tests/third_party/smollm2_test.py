"""Tests of the SmolLM2 GGUF loader: pinned file, refusals, Q/K un-permutation, tokenizer, chat."""

import numpy as np
import pytest

from ftlab.core import partition
from ftlab.models import llama
from ftlab.peft import qlora
from third_party import smollm2

TINY = llama.LlamaConfig.tiny(vocab_size=8, num_layers=1, max_position_embeddings=32)


def _permute(w, heads):
    """llama.cpp's `convert_hf_to_gguf` permutation of HF Q/K rows (the reverse of ours)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _write_gguf(path, *, arch="llama", extra=None, bad_shape=False):
    """A tiny float32 Llama GGUF written with `gguf.GGUFWriter`; returns the HF-layout weights."""
    import gguf

    rng = np.random.default_rng(0)
    c = TINY
    hf = {
        "token_embd.weight": rng.normal(size=(c.vocab_size, c.hidden_size)),
        "output_norm.weight": rng.normal(size=(c.hidden_size,)),
        "blk.0.attn_norm.weight": rng.normal(size=(c.hidden_size,)),
        "blk.0.ffn_norm.weight": rng.normal(size=(c.hidden_size,)),
        "blk.0.attn_q.weight": rng.normal(size=(c.hidden_size, c.hidden_size)),
        "blk.0.attn_k.weight": rng.normal(size=(c.kv_dim, c.hidden_size)),
        "blk.0.attn_v.weight": rng.normal(size=(c.kv_dim, c.hidden_size)),
        "blk.0.attn_output.weight": rng.normal(size=(c.hidden_size, c.hidden_size)),
        "blk.0.ffn_gate.weight": rng.normal(size=(c.intermediate_size, c.hidden_size)),
        "blk.0.ffn_up.weight": rng.normal(size=(c.intermediate_size, c.hidden_size)),
        "blk.0.ffn_down.weight": rng.normal(size=(c.hidden_size, c.intermediate_size)),
    }
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    if bad_shape:
        hf["blk.0.ffn_up.weight"] = hf["blk.0.ffn_up.weight"][:-1]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_string("general.type", "model")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_bool("tokenizer.ggml.add_space_prefix", False)
    w.add_chat_template(smollm2.CHAT_TEMPLATE)
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    for name, value in hf.items():
        stored = value
        if name == "blk.0.attn_q.weight":
            stored = _permute(value, c.num_heads)
        if name == "blk.0.attn_k.weight":
            stored = _permute(value, c.num_kv_heads)
        w.add_tensor(name, stored)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_round_trip_unpermutes_q_and_k(tmp_path):
    path = tmp_path / "tiny.gguf"
    hf = _write_gguf(path)
    f = smollm2.GGUFFile(path)
    config = smollm2.config_from_metadata(f.metadata, path=str(path))
    assert config == TINY
    flat = partition.flatten(smollm2.convert(f, config))
    np.testing.assert_array_equal(flat["decoder/layer_0/attention/query/kernel"],
                                  hf["blk.0.attn_q.weight"].T)  # fmt: skip
    np.testing.assert_array_equal(flat["decoder/layer_0/attention/key/kernel"],
                                  hf["blk.0.attn_k.weight"].T)  # fmt: skip
    np.testing.assert_array_equal(flat["decoder/layer_0/mlp/down/kernel"],
                                  hf["blk.0.ffn_down.weight"].T)  # fmt: skip
    np.testing.assert_array_equal(flat["decoder/embeddings/word_embeddings/embedding"],
                                  hf["token_embd.weight"])  # fmt: skip
    assert {k: v.shape for k, v in flat.items()} == llama.param_shapes(config)


def test_refuses_other_architecture_unknown_keys_and_bad_shapes(tmp_path):
    _write_gguf(tmp_path / "a.gguf", arch="gemma")
    with pytest.raises(smollm2.GGUFFormatError, match=r"a.gguf: general.architecture is 'gemma'"):
        smollm2.load(tmp_path / "a.gguf", check_hash=False)
    _write_gguf(tmp_path / "b.gguf", extra={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(smollm2.GGUFFormatError, match="llama.rope.scaling.type are not understood"):
        smollm2.load(tmp_path / "b.gguf", check_hash=False)
    _write_gguf(tmp_path / "c.gguf", bad_shape=True)
    f = smollm2.GGUFFile(tmp_path / "c.gguf")
    with pytest.raises(
        smollm2.GGUFFormatError,
        match=r"tensor blk.0.ffn_up.weight \(-> decoder/layer_0/mlp/up/kernel\) has shape "
        r"\(31, 16\)",
    ):
        smollm2.convert(f, smollm2.config_from_metadata(f.metadata))


def test_wrong_file_names_file_and_expected_sha(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF not really")
    with pytest.raises(
        smollm2.ChecksumError, match=f"model.gguf: sha256 is .*expected {smollm2.SHA256}"
    ):
        smollm2.load(path)


@pytest.fixture(scope="module")
def real():
    return smollm2.load()


def test_real_file_config_and_parameter_count(real):
    c = real.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        30,
        576,
        9,
        3,
        64,
    )
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (1536, 49152, 8192)
    assert (c.rope_theta, real.eos_id, real.pad_id) == (100000.0, 2, 2)
    # DATA.md: 134,515,008 parameters after dequantisation (tied: no output.weight).
    assert sum(np.size(x) for x in partition.flatten(real.params).values()) == 134_515_008


def test_q4_1_blocks_dequantize_to_the_loaded_kernels(real):
    f = smollm2.GGUFFile(real.path)
    for leaf in ("decoder/layer_2/attention/key/kernel", "decoder/layer_2/mlp/down/kernel"):
        blocks = smollm2.leaf_q4_1_blocks(f, real.config, leaf)
        assert blocks.quants.dtype == np.uint8 and int(blocks.quants.max()) <= 15
        kernel = np.asarray(partition.flatten(real.params)[leaf])
        np.testing.assert_array_equal(smollm2.dequantize_q4_1(blocks).T, kernel)
        # QLoRA's base is the file's own 4-bit content: re-quantising the loaded kernel gives
        # the GGUF blocks bit for bit (so LoRA on it and QLoRA train on identical weights)
        q = qlora.quantize_kernel(kernel)
        np.testing.assert_array_equal(q["q4_scale"], blocks.scale)
        np.testing.assert_array_equal(q["q4_min"], blocks.min)
        packed = blocks.quants[..., :16] | (blocks.quants[..., 16:] << 4)
        np.testing.assert_array_equal(q["q4_data"], packed.reshape(kernel.shape[1], -1))
    with pytest.raises(smollm2.GGUFFormatError, match="token_embd.weight is Q8_0, not Q4_1"):
        f.q4_1_blocks("token_embd.weight")


def test_tokenizer_round_trip_and_special_tokens(real):
    tok = real.tokenizer
    text = "Paris, 2026: café ☕ costs 12.50€!\n  indented"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    # Digits are split one by one (SmolLM2's pre-tokenizer); control tokens are single ids.
    assert tok.encode("1234").tokens == ["1", "2", "3", "4"]
    assert tok.encode("<|im_start|>user").ids[0] == 1
    assert tok.encode("a<|im_end|>").ids[-1] == real.eos_id


def test_chat_prompt_matches_the_template():
    msgs = [smollm2.user("What is the capital of France?")]
    assert smollm2.chat_prompt(msgs) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    custom = [{"role": "system", "content": "Be brief."}, smollm2.user("Hi")]
    assert smollm2.chat_prompt(custom, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    with pytest.raises(ValueError, match=r"messages\[1\] must be a dict"):
        smollm2.chat_prompt([smollm2.user("a"), "b"])
