"""Checksummed safetensors: a flipped byte, a truncated file or bad JSON names the file."""

import json
import struct

import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from ftlab.core import tensorfile


def _arrays():
    return {
        "encoder/layer_0/query/lora_a": np.arange(6, dtype=np.float32).reshape(3, 2),
        "encoder/layer_0/query/lora_b": np.ones((2, 3), np.float32),
    }


def flip_data_byte(path, tensor):
    """Flips one byte inside ``tensor``'s data region of a safetensors file."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    begin, _ = json.loads(raw[8 : 8 + n])[tensor]["data_offsets"]
    raw[8 + n + begin + 3] ^= 0x7F  # the top byte of the first float32: a huge or tiny value
    path.write_bytes(bytes(raw))


def test_round_trip_keeps_arrays_and_metadata(tmp_path):
    tensorfile.save(tmp_path / "a.safetensors", _arrays(), metadata={"format": "pt"})
    arrays, meta = tensorfile.load(tmp_path / "a.safetensors")
    assert meta == {"format": "pt"}
    for k, v in _arrays().items():
        np.testing.assert_array_equal(arrays[k], v)


def test_a_flipped_data_byte_names_the_file_and_the_tensor(tmp_path):
    path = tmp_path / "a.safetensors"
    tensorfile.save(path, _arrays())
    flip_data_byte(path, "encoder/layer_0/query/lora_b")
    # safetensors itself reads the changed number without complaint
    assert safetensors_numpy.load_file(str(path))["encoder/layer_0/query/lora_b"][0, 0] != 1.0
    with pytest.raises(
        tensorfile.CorruptFileError,
        match=r"a\.safetensors: tensor 'encoder/layer_0/query/lora_b' is corrupt",
    ):
        tensorfile.load(path)


def test_a_truncated_file_is_a_value_error_naming_it(tmp_path):
    path = tmp_path / "a.safetensors"
    tensorfile.save(path, _arrays())
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"a\.safetensors: not a readable safetensors file"):
        tensorfile.load(path)


def test_digests_are_required_unless_asked_not_to(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors_numpy.save_file(_arrays(), str(path), metadata={"format": "pt"})
    with pytest.raises(tensorfile.CorruptFileError, match=r"plain\.safetensors: holds no sha256"):
        tensorfile.load(path)
    with pytest.warns(UserWarning, match=r"plain\.safetensors: holds no sha256"):
        tensorfile.load(path, missing_digests="warn")
    arrays, meta = tensorfile.load(path, missing_digests="ignore")
    assert sorted(arrays) == sorted(_arrays()) and meta == {"format": "pt"}


def test_verify_is_reusable_on_any_flat_dict():
    sums = tensorfile.digests(_arrays())
    tensorfile.verify(_arrays(), sums, where="step 10")
    changed = dict(_arrays(), **{"encoder/layer_0/query/lora_b": np.zeros((2, 3), np.float32)})
    with pytest.raises(tensorfile.CorruptFileError, match=r"step 10: tensor .*lora_b' is corrupt"):
        tensorfile.verify(changed, sums, where="step 10")
    with pytest.raises(tensorfile.CorruptFileError, match=r"step 10: .*no digest for \['x'\]"):
        tensorfile.verify({**_arrays(), "x": np.ones(1)}, sums, where="step 10")


def test_reserved_metadata_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"reserved"):
        tensorfile.save(tmp_path / "a.safetensors", _arrays(), metadata={"sha256:x": "0"})


def test_read_json_names_the_file_line_and_column(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text('{"rank": 8,\n "alpha": }')
    with pytest.raises(ValueError, match=r"cfg\.json: not a valid adapter config: .* line 2"):
        tensorfile.read_json(path, what="adapter config")
    path.write_text('{"rank": 8}')
    assert tensorfile.read_json(path) == {"rank": 8}


# --- the files of lora.save ---------------------------------------------------------------------


@pytest.fixture
def lora_dir(tmp_path):
    from ftlab.peft import lora

    ad = {"d": {"lora_a": np.ones((3, 1), np.float32), "lora_b": np.full((1, 2), 0.5, np.float32)}}
    lora.save(tmp_path / "adapter", ad, config_dict={"rank": 1, "alpha": 2.0})
    return tmp_path / "adapter"


def test_lora_load_refuses_a_flipped_byte_naming_file_and_tensor(lora_dir):
    from ftlab.peft import lora

    flip_data_byte(lora_dir / "lora.safetensors", "d/lora_b")
    with pytest.raises(ValueError, match=r"lora\.safetensors: tensor 'd/lora_b' is corrupt"):
        lora.load(lora_dir)


def test_lora_load_names_a_truncated_weights_file(lora_dir):
    from ftlab.peft import lora

    path = lora_dir / "lora.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"lora\.safetensors: not a readable safetensors file"):
        lora.load(lora_dir)


def test_lora_load_names_a_bad_json(lora_dir):
    from ftlab.peft import lora

    (lora_dir / "lora.json").write_text('{"rank": 1, "alpha": 2.0')
    with pytest.raises(ValueError, match=r"lora\.json: not a valid LoRA adapter config"):
        lora.load(lora_dir)


def test_lora_load_warns_on_an_adapter_saved_without_digests(lora_dir):
    from ftlab.peft import lora

    arrays, _ = tensorfile.load(lora_dir / "lora.safetensors")
    safetensors_numpy.save_file(arrays, str(lora_dir / "lora.safetensors"))
    with pytest.warns(UserWarning, match=r"lora\.safetensors: holds no sha256"):
        loaded, _ = lora.load(lora_dir)
    np.testing.assert_array_equal(loaded["d"]["lora_b"], np.full((1, 2), 0.5, np.float32))
