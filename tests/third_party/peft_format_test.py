"""HF PEFT adapter format: round trip, refusals, and PEFT itself loading what ftlab writes."""

import json

import chex
import jax
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy
from safetensors import safe_open

from ftlab.core import partition
from ftlab.data import text
from ftlab.models import bert
from ftlab.peft import lora
from third_party import peft_format

ALL_MODULES = r"layer_\d+/(attention/(query|key|value|out)|mlp/(intermediate|output))"


def _adapter(modules, *, layers=(0, 1), rank=2, prefix="", seed=0, dims=None):
    """A random adapter tree over ftlab module paths like 'attention/query'."""
    dims = dims or {
        "attention/query": (8, 8),
        "attention/key": (8, 8),
        "attention/value": (8, 8),
        "attention/out": (8, 8),
        "mlp/intermediate": (8, 16),
        "mlp/output": (16, 8),
    }
    rng = np.random.default_rng(seed)
    flat = {}
    for i in layers:
        for m in modules:
            d_in, d_out = dims[m]
            path = f"{prefix}/layer_{i}/{m}" if prefix else f"layer_{i}/{m}"
            flat[f"{path}/lora_a"] = rng.normal(size=(d_in, rank)).astype(np.float32)
            flat[f"{path}/lora_b"] = rng.normal(size=(rank, d_out)).astype(np.float32)
    return partition.unflatten(flat)


@pytest.mark.parametrize("prefix", ["", "encoder"])
def test_round_trip_with_peft_names_and_layout(tmp_path, prefix):
    ad = _adapter(["attention/query", "attention/value"], prefix=prefix)
    cfg = peft_format.export(tmp_path, ad, rank=2, alpha=16)
    assert cfg["target_modules"] == ["query", "value"]
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 2 and written["lora_alpha"] == 16
    assert written["bias"] == "none" and written["fan_in_fan_out"] is False
    tensors = safetensors_numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.encoder.layer.1.attention.self.value.lora_{}.weight"
    src = ad[prefix]["layer_1"] if prefix else ad["layer_1"]
    np.testing.assert_array_equal(tensors[key.format("A")], src["attention"]["value"]["lora_a"].T)
    np.testing.assert_array_equal(tensors[key.format("B")], src["attention"]["value"]["lora_b"].T)

    back, back_cfg = peft_format.import_(tmp_path, prefix=prefix)
    chex.assert_trees_all_equal(back, ad)
    assert (back_cfg["rank"], back_cfg["alpha"]) == (2, 16)
    head = f"{prefix}/" if prefix else ""
    assert back_cfg["targets"] == [
        f"{head}layer_(0|1)/attention/query",
        f"{head}layer_(0|1)/attention/value",
    ]


def test_mlp_names_and_the_ambiguous_output_dense_suffix(tmp_path):
    # PEFT's suffix "output.dense" also selects attention.output.dense, so an adapter on the MLP
    # output alone must be exported under exact module names.
    ad = _adapter(["mlp/output"], layers=(0,))
    cfg = peft_format.export(tmp_path, ad, rank=2, alpha=4)
    assert cfg["target_modules"] == ["encoder.layer.0.output.dense"]
    with pytest.raises(ValueError, match=r"target_modules=\['output.dense'\] also selects"):
        peft_format.export(tmp_path, ad, rank=2, alpha=4, target_modules=["output.dense"])
    ad = _adapter(["attention/out", "mlp/intermediate", "mlp/output"], layers=(0,))
    cfg = peft_format.export(tmp_path, ad, rank=2, alpha=4)
    assert cfg["target_modules"] == ["attention.output.dense", "intermediate.dense", "output.dense"]
    chex.assert_trees_all_equal(peft_format.import_(tmp_path)[0], ad)


def test_export_refuses_what_peft_cannot_hold(tmp_path):
    ad = _adapter(["attention/query"])
    with pytest.raises(ValueError, match=r"leaves out adapter modules"):
        peft_format.export(tmp_path, ad, rank=2, alpha=4, target_modules=["value"])
    with pytest.raises(ValueError, match=r"rank 2 but the config says r=4"):
        peft_format.export(tmp_path, ad, rank=4, alpha=4)
    head = {"head": {"lora_a": np.zeros((8, 2)), "lora_b": np.zeros((2, 3))}}
    with pytest.raises(ValueError, match=r"leaf 'head/lora_a' has no place"):
        peft_format.export(tmp_path, head, rank=2, alpha=4)


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_dora", True),
        ("fan_in_fan_out", True),
        ("use_rslora", True),
        ("rank_pattern", {"query": 4}),
        ("bias", "all"),
        ("init_lora_weights", "pissa"),
        ("peft_type", "IA3"),
        ("modules_to_save", ["classifier"]),
        ("some_future_option", {"on": True}),
    ],
)
def test_import_refuses_fields_it_does_not_implement(tmp_path, field, value):
    peft_format.export(tmp_path, _adapter(["attention/query"]), rank=2, alpha=4)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"field '{field}' is"):
        peft_format.import_(tmp_path)


def test_import_accepts_empty_unknown_fields_and_checks_target_modules(tmp_path):
    peft_format.export(tmp_path, _adapter(["attention/query"]), rank=2, alpha=4)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(kasa_config=None, peft_version="0.21.2", use_dora=False)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    peft_format.import_(tmp_path)
    cfg["target_modules"] = ["value"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"field 'target_modules'.*does not select"):
        peft_format.import_(tmp_path)


def test_peft_loads_the_exported_adapter_and_matches_ftlab(minilm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)

    rank, alpha = 4, 8.0
    params = lora.init(
        minilm.params, jax.random.key(0), targets=[ALL_MODULES], rank=rank, alpha=alpha
    )
    flat = partition.flatten(params)
    rng = np.random.default_rng(0)
    for k in flat:  # a trained-looking adapter: lora_b away from zero
        if k.endswith("/lora_b"):
            flat[k] = rng.normal(scale=0.05, size=np.shape(flat[k])).astype(np.float32)
    params = partition.unflatten(flat)
    # A local base path, so that PEFT never looks the base model up on the hub.
    cfg = peft_format.export(
        tmp_path / "peft",
        lora.adapter(params),
        rank=rank,
        alpha=alpha,
        base_model_name=str(minilm.model_dir),
    )
    assert cfg["target_modules"] == [
        "query",
        "key",
        "value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ]

    base = transformers.BertModel.from_pretrained(
        str(minilm.model_dir), local_files_only=True, add_pooling_layer=False
    )
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    # Every exported tensor was loaded where PEFT expects it (load_state_dict is not strict).
    loaded = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
    written = safetensors_numpy.load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert loaded.keys() == written.keys() and len(written) == 2 * 6 * 6
    for k in written:
        np.testing.assert_array_equal(loaded[k], written[k])

    sentences = ["A man is eating food.", "The stock market fell sharply today."]
    b = text.encode(minilm.tokenizer(16), sentences, max_length=16)
    inputs = {k: torch.tensor(b[k], dtype=torch.long) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        hf = model(**inputs).last_hidden_state.numpy()
        with model.disable_adapter():
            hf_base = model(**inputs).last_hidden_state.numpy()
    encoder = bert.BertEncoder(minilm.config)

    def encode(p):
        return encoder.apply({"params": p}, b["input_ids"], b["attention_mask"])

    ours = np.asarray(jax.jit(lora.wrap_apply(encode, alpha=alpha, rank=rank))(params))
    valid = b["attention_mask"].astype(bool)  # padded positions are not compared
    assert np.max(np.abs(hf - hf_base)[valid]) > 1e-2  # the adapter changes the output noticeably
    np.testing.assert_allclose(ours[valid], hf[valid], atol=1e-4, rtol=1e-4)


# --- the pooler, which ftlab's encoder does not have -------------------------------------------

POOLER = "base_model.model.pooler.dense.lora_{}.weight"
DENSE_KINDS = ["attention/query", "attention/value", "attention/out", "mlp/intermediate"]


def _peft_written(path, *, with_pooler=True):
    """An adapter as PEFT writes it for target_modules=["query", "value", "dense"] on BertModel:
    no digests in the metadata, and LoRA on the pooler's dense layer too."""
    state_dict = peft_format.to_state_dict(_adapter([*DENSE_KINDS, "mlp/output"], layers=(0,)))
    if with_pooler:
        rng = np.random.default_rng(1)
        state_dict[POOLER.format("A")] = rng.normal(size=(2, 8)).astype(np.float32)
        state_dict[POOLER.format("B")] = rng.normal(size=(8, 2)).astype(np.float32)
    path.mkdir()
    safetensors_numpy.save_file(
        state_dict, str(path / "adapter_model.safetensors"), {"format": "pt"}
    )
    cfg = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["query", "value", "dense"],
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return state_dict


def test_import_skips_the_pooler_with_a_warning_naming_it(tmp_path):
    _peft_written(tmp_path / "peft")
    with pytest.warns(UserWarning, match=r"skipping the LoRA weights of \['pooler.dense'\]"):
        ad, cfg = peft_format.import_(tmp_path / "peft")
    assert cfg["skipped_modules"] == ["pooler.dense"]
    assert "pooler" not in partition.flatten(ad) and len(partition.flatten(ad)) == 2 * 5
    chex.assert_trees_all_equal(ad, _adapter([*DENSE_KINDS, "mlp/output"], layers=(0,)))


def test_import_without_a_pooler_warns_nothing(tmp_path, recwarn):
    _peft_written(tmp_path / "peft", with_pooler=False)  # a PEFT file without digests
    _, cfg = peft_format.import_(tmp_path / "peft")
    assert cfg["skipped_modules"] == [] and not recwarn.list


def test_export_extra_module_check_covers_the_pooler(tmp_path):
    ad = _adapter([*DENSE_KINDS, "mlp/output"], layers=(0,))
    with pytest.raises(ValueError, match=r"also selects \['pooler.dense'\]"):
        peft_format.export(
            tmp_path, ad, rank=2, alpha=4, target_modules=["query", "value", "dense"]
        )
    with pytest.raises(ValueError, match=r"also selects \['embeddings.word_embeddings'"):
        peft_format.export(tmp_path, ad, rank=2, alpha=4, target_modules=".*")


# --- file integrity ------------------------------------------------------------------------------


def _flip_data_byte(path, tensor):
    """Flips one byte inside ``tensor``'s data region of a safetensors file."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    begin, _ = json.loads(raw[8 : 8 + n])[tensor]["data_offsets"]
    raw[8 + n + begin + 3] ^= 0x7F  # the top byte of the first float32
    path.write_bytes(bytes(raw))


def test_export_records_digests_and_import_refuses_a_flipped_byte(tmp_path):
    peft_format.export(tmp_path, _adapter(["attention/query"]), rank=2, alpha=4)
    key = "base_model.model.encoder.layer.1.attention.self.query.lora_B.weight"
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "np") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and f"sha256:{key}" in meta
    _flip_data_byte(tmp_path / "adapter_model.safetensors", key)
    with pytest.raises(ValueError, match=rf"adapter_model\.safetensors: tensor '{key}' is corrupt"):
        peft_format.import_(tmp_path)


def test_import_names_a_truncated_weights_file_and_a_bad_config(tmp_path):
    peft_format.export(tmp_path, _adapter(["attention/query"]), rank=2, alpha=4)
    weights = tmp_path / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: not a readable safetensors"):
        peft_format.import_(tmp_path)
    weights.write_bytes(good)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA",')
    with pytest.raises(ValueError, match=r"adapter_config\.json: not a valid PEFT adapter config"):
        peft_format.import_(tmp_path)
