"""Hugging Face folders: ftlab's forward pass against transformers' recorded outputs, round trips,
and the converter's refusals. The fixtures come from `testdata/make_hf_fixtures.py`."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from ftlab.core import partition
from ftlab.models import bert
from third_party import hf

DATA = pathlib.Path(__file__).parent / "testdata" / "hf"
ARCHS = ("bert", "roberta", "distilbert")
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
    return np.asarray(
        bert.BertEncoder(config).apply(
            {"params": params}, recorded["input_ids"], recorded["attention_mask"]
        )
    )


def _max_diff(hidden, recorded):
    """Largest |diff| over real tokens (padded positions differ by construction, and are masked)."""
    real = recorded["attention_mask"].astype(bool)
    return float(np.max(np.abs(hidden[real] - recorded["last_hidden_state"][real])))


def test_forward_matches_transformers(arch, loaded, recorded):
    model_config, params, _ = loaded
    assert model_config.model_type == arch
    diff = _max_diff(_forward(model_config.config, params, recorded), recorded)
    assert diff < TOLERANCE, f"{arch}: max |diff| {diff:.2e} vs transformers"


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
    from safetensors import safe_open

    def shapes(folder):
        out = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="numpy") as f:
                out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        return {k: v for k, v in out.items() if not k.startswith("pooler.")}

    assert shapes(tmp_path) == shapes(DATA / arch)


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
    hf.save(tmp_path, model_config, params, tok)
    ids = torch.from_numpy(recorded["input_ids"])
    mask = torch.from_numpy(recorded["attention_mask"])
    ours = _forward(model_config.config, params, recorded)
    for folder in (DATA / arch, tmp_path):
        model, info = transformers.AutoModel.from_pretrained(folder, output_loading_info=True)
        model.eval()
        # ftlab writes no pooler (it has none); everything else must load, nothing be left over.
        assert not info["unexpected_keys"], info
        assert all(k.startswith("pooler.") for k in info["missing_keys"]), info
        with torch.no_grad():
            theirs = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        assert _max_diff(ours, {**recorded, "last_hidden_state": theirs}) < TOLERANCE, folder
