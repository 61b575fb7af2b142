"""Hugging Face folders: ftlab's forward pass against transformers' recorded outputs, round trips,
and the converter's refusals. The fixtures come from `testdata/make_hf_fixtures.py`."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from ftlab.core import partition
from ftlab.models import bert, llama
from third_party import hf

DATA = pathlib.Path(__file__).parent / "testdata" / "hf"
ENCODERS = ("bert", "roberta", "distilbert")
DECODERS = ("llama_tied", "llama", "mistral", "qwen2", "qwen3")
ARCHS = ENCODERS + DECODERS
TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def loaded(arch):
    return hf.load(DATA / arch)


@pytest.fixture(scope="module")
def recorded(arch):
    return dict(np.load(DATA / f"{arch}.npz"))


def _forward(config, params, recorded):
    """(last hidden state, logits or None) of ftlab's model."""
    ids, mask = recorded["input_ids"], recorded["attention_mask"]
    if isinstance(config, llama.LlamaConfig):
        model = llama.LlamaForCausalLM(config)
        hidden = model.apply({"params": params}, ids, mask, return_hidden=True)
        return np.asarray(hidden), np.asarray(model.apply({"params": params}, ids, mask))
    return np.asarray(bert.BertEncoder(config).apply({"params": params}, ids, mask)), None


def _max_diff(ours, recorded):
    """Largest |diff| over real tokens (padded positions differ by construction, and are masked)
    of the last hidden state and, for decoders, the logits."""
    real = recorded["attention_mask"].astype(bool)
    hidden, logits = ours
    diff = np.max(np.abs(hidden[real] - recorded["last_hidden_state"][real]))
    if "logits" in recorded:
        diff = max(diff, np.max(np.abs(logits[real] - recorded["logits"][real])))
    return float(diff)


def test_forward_matches_transformers(arch, loaded, recorded):
    model_config, params, _ = loaded
    assert model_config.model_type == arch.removesuffix("_tied")
    diff = _max_diff(_forward(model_config.config, params, recorded), recorded)
    assert diff < TOLERANCE, f"{arch}: max |diff| {diff:.2e} vs transformers"


def test_decoder_switches():
    configs = {arch: hf.load(DATA / arch)[0].config for arch in DECODERS}
    assert configs["llama_tied"].tie_word_embeddings and configs["llama_tied"].rope_theta == 1e5
    assert not configs["llama"].tie_word_embeddings
    assert dict(configs["llama"].rope_scaling)["rope_type"] == "llama3"
    assert configs["qwen2"].qkv_bias and not configs["qwen2"].qk_norm
    assert configs["qwen3"].qk_norm and configs["qwen3"].head_dim == 16
    chat = hf.load(DATA / "llama_tied")[2].chat_template
    assert chat is not None and "messages" in chat


def test_architecture_switches():
    roberta, _, _ = hf.load(DATA / "roberta")
    distil, params, _ = hf.load(DATA / "distilbert")
    assert roberta.config.position_offset == 2
    assert distil.config.type_vocab_size == 0
    assert "token_type_embeddings" not in params["embeddings"]
    with pytest.raises(ValueError, match="no token-type embeddings"):
        ids = np.ones((1, 3), np.int32)
        bert.BertEncoder(distil.config).apply({"params": params}, ids, ids, ids)


def test_round_trip_is_exact(arch, loaded, tmp_path):
    model_config, params, tok = loaded
    hf.save(tmp_path, model_config, params, tok)
    again_config, again, again_tok = hf.load(tmp_path)
    assert again_config == model_config
    assert again_tok == tok
    a, b = partition.flatten(params), partition.flatten(again)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    # The same tensor names, shapes and config keys as transformers wrote.
    original = json.loads((DATA / arch / "config.json").read_text())
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == original
    from safetensors import safe_open  # noqa: PLC0415

    def shapes(folder):
        out = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="numpy") as f:
                out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        return {k: v for k, v in out.items() if not k.startswith("pooler.")}

    assert shapes(tmp_path) == shapes(DATA / arch)
    assert sorted(p.name for p in tmp_path.iterdir() if "safetensors" not in p.name) == sorted(
        p.name for p in (DATA / arch).iterdir() if "safetensors" not in p.name
    )


def test_sharded_save_round_trips(tmp_path):
    model_config, params, tok = hf.load(DATA / "llama")
    hf.save(tmp_path, model_config, params, tok)
    hf.save(tmp_path, model_config, params, tok, max_shard_bytes=20_000)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    again = partition.flatten(hf.load(tmp_path)[1])  # the old model.safetensors is gone
    assert all(np.array_equal(again[k], v) for k, v in partition.flatten(params).items())


def test_tokenizer_matches_transformers(arch, loaded, recorded):
    tok = loaded[2].build()
    assert tok.padding is None and tok.truncation is None
    ids = tok.encode("the cat sat on a mat").ids
    np.testing.assert_array_equal(ids, recorded["sentence_ids"])
    fixed = loaded[2].build(12).encode("the cat")
    assert len(fixed.ids) == 12 and fixed.attention_mask[-1] == 0


def test_dtype_cast():
    _, params, _ = hf.load(DATA / "bert", dtype=jax.numpy.bfloat16)
    leaves = jax.tree.leaves(params)
    assert {leaf.dtype for leaf in leaves} == {np.dtype(jax.numpy.bfloat16)}


def test_bfloat16_files_load_and_save(tmp_path):
    """Most decoder checkpoints are BF16, which safetensors' numpy reader cannot return."""
    model_config, params, tok = hf.load(DATA / "qwen3", dtype=jax.numpy.bfloat16)
    hf.save(tmp_path, model_config, llama.stack_layers(params), tok)
    raw = (tmp_path / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["lm_head.weight"]["dtype"] == "BF16"
    again = partition.flatten(hf.load(tmp_path, dtype=jax.numpy.bfloat16)[1])
    as_f32 = partition.flatten(hf.load(tmp_path)[1])
    for k, v in partition.flatten(params).items():
        assert np.array_equal(again[k], v), k
        np.testing.assert_array_equal(as_f32[k], v.astype(np.float32))


def _copy(arch, tmp_path):
    folder = tmp_path / arch
    shutil.copytree(DATA / arch, folder)
    return folder


def test_unknown_config_field_is_refused(tmp_path):
    folder = _copy("bert", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'rope_scaling' are not understood"):
        hf.load(folder)


def test_short_sliding_window_is_refused(tmp_path):
    folder = _copy("mistral", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["sliding_window"] = 16
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="field 'sliding_window' is 16"):
        hf.load(folder)


def test_unknown_rope_type_is_refused(tmp_path):
    folder = _copy("llama", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"]["rope_type"] = "yarn"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope_type 'yarn' is not implemented"):
        hf.load(folder)


def test_legacy_rope_fields_load_and_save_back(tmp_path):
    folder = _copy("llama_tied", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config["rope_scaling"] = None
    (folder / "config.json").write_text(json.dumps(config))
    model_config, params, tok = hf.load(folder)
    assert model_config.legacy_rope and model_config.config.rope_theta == 1e5
    hf.save(tmp_path / "out", model_config, params, tok)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == config


def test_unimplemented_value_is_refused(tmp_path):
    folder = _copy("roberta", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_act"] = "gelu_new"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="field 'hidden_act' is 'gelu_new'"):
        hf.load(folder)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors import numpy as safetensors_numpy

    folder = _copy("distilbert", tmp_path)
    weights = safetensors_numpy.load_file(str(folder / "model.safetensors"))
    del weights["transformer.layer.1.ffn.lin2.bias"]
    weights["transformer.layer.1.ffn.extra"] = np.zeros(3, np.float32)
    safetensors_numpy.save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)unexpected.*ffn\.extra.*missing.*lin2\.bias"):
        hf.load(folder)


def test_tied_checkpoint_may_store_its_head(tmp_path):
    from safetensors import numpy as safetensors_numpy  # noqa: PLC0415

    folder = _copy("qwen2", tmp_path)
    weights = safetensors_numpy.load_file(str(folder / "model.safetensors"))
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
    safetensors_numpy.save_file(weights, str(folder / "model.safetensors"))
    assert "lm_head" not in hf.load(folder)[1]["decoder"]
    weights["lm_head.weight"][0, 0] += 1.0
    safetensors_numpy.save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight that differs"):
        hf.load(folder)


def test_task_model_prefix(tmp_path):
    """A BertFor...'s base tensors sit under `bert.`; its head is not loaded, and is named."""
    from safetensors import numpy as safetensors_numpy  # noqa: PLC0415

    folder = _copy("bert", tmp_path)
    weights = safetensors_numpy.load_file(str(folder / "model.safetensors"))
    weights = {f"bert.{k}": v for k, v in weights.items()}
    safetensors_numpy.save_file(weights, str(folder / "model.safetensors"))
    a, b = (partition.flatten(hf.load(f)[1]) for f in (folder, DATA / "bert"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    weights["classifier.weight"] = np.zeros((2, 32), np.float32)
    safetensors_numpy.save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \(1\): classifier\.weight"):
        hf.load(folder)


def test_truncated_file_is_named(tmp_path):
    folder = _copy("bert", tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor .* truncated file\?"):
        hf.load(folder)


def test_missing_shard_is_named(tmp_path):
    folder = _copy("roberta", tmp_path)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003"):
        hf.load(folder)


def test_minilm_loads_through_this_path(minilm):
    model_config, params, tok = hf.load(minilm.model_dir)
    assert model_config.config == minilm.config
    a, b = partition.flatten(params), partition.flatten(minilm.params)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert tok.build(16).encode("A man").ids == minilm.tokenizer(16).encode("A man").ids


# Optional: rerun the comparison live and load ftlab's folders back into transformers.


def test_live_against_transformers(arch, loaded, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    recorded = dict(np.load(DATA / f"{arch}.npz"))
    model_config, params, tok = loaded
    hf.save(tmp_path, model_config, params, tok, max_shard_bytes=30_000)
    inputs = {k: torch.from_numpy(recorded[k]) for k in ("input_ids", "attention_mask")}
    ours = _forward(model_config.config, params, recorded)
    auto = transformers.AutoModelForCausalLM if arch in DECODERS else transformers.AutoModel
    for folder in (DATA / arch, tmp_path):
        model, info = auto.from_pretrained(folder, output_loading_info=True)
        model.eval()
        # ftlab writes no pooler (it has none); everything else must load, nothing be left over.
        assert not info["unexpected_keys"], info
        assert all(k.startswith("pooler.") for k in info["missing_keys"]), info
        theirs = {**recorded}
        with torch.no_grad():
            if arch in DECODERS:
                theirs["logits"] = model(**inputs).logits.numpy()
                model = model.model
            theirs["last_hidden_state"] = model(**inputs).last_hidden_state.numpy()
        assert _max_diff(ours, theirs) < TOLERANCE, folder


def test_live_smollm2_gguf_exports_to_transformers(tmp_path):
    """The real SmolLM2 (from its GGUF) saved as a folder: transformers gives ftlab's logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from third_party import smollm2  # noqa: PLC0415

    pretrained = smollm2.load()
    model_config = hf.ModelConfig("llama", pretrained.config)
    tok = hf.TokenizerFiles({"tokenizer.json": pretrained.tokenizer.to_str().encode()})
    hf.save(tmp_path, model_config, pretrained.params, tok)
    ids = np.array([pretrained.tokenizer.encode("The capital of France is Paris.").ids])
    ours = np.asarray(llama.forward(pretrained.config, pretrained.params, ids))
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).logits.numpy()
    # 30 layers in float32 on two stacks; the logits are O(10).
    assert np.max(np.abs(theirs - ours)) < 1e-3
    assert np.array_equal(theirs.argmax(-1), ours.argmax(-1))
