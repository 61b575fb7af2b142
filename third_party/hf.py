"""Hugging Face model folders in and out: `config.json` + safetensors + tokenizer files.

`load` reads a folder as `transformers`' `save_pretrained` writes it (one `model.safetensors`, or
shards `model-0000i-of-0000n.safetensors` listed in `model.safetensors.index.json`) into an ftlab
parameter tree and config; `save` writes one back that `load` reads to the same bits and that
`transformers` loads with the same names, shapes and config keys.

Supported architectures (`model_type` in `config.json`). Encoders, onto
`ftlab.models.bert.BertEncoder` (a base model's folder, or a task model's base under `bert.` etc.):

* ``bert``: `BertModel`, as is.
* ``roberta``: `RobertaModel`; the same tensors as BERT, but position ids start after the padding
  index (`BertConfig.position_offset = pad_token_id + 1`).
* ``distilbert``: `DistilBertModel`; no token-type embeddings (`type_vocab_size=0`), learned
  positions, other tensor names (`q_lin`, `sa_layer_norm`, `ffn.lin1`, ...).

Decoders (`DECODERS`), `*ForCausalLM` folders onto `ftlab.models.llama.LlamaForCausalLM`:

* ``llama``: SmolLM2 and Llama 2/3; tied or untied embeddings (`tie_word_embeddings`), RoPE
  scaling `linear` or `llama3` (`rope_parameters`, or transformers 4's `rope_theta` and
  `rope_scaling`, written back in the form read).
* ``mistral``: as Llama; a `sliding_window` shorter than the context is refused.
* ``qwen2``: q/k/v biases (`LlamaConfig.qkv_bias`); sliding windows refused.
* ``qwen3``: q/k RMSNorms over each head (`qk_norm`) and its own `head_dim`.

A tied checkpoint that also stores `lm_head.weight` loads when it equals the embedding table.

The converter is defensive (as penzai's): every `config.json` field is either read into the
config, checked against the one value ftlab implements, or on an explicit ignore-list with the
reason it cannot change the forward pass (`IGNORED_FIELDS`); an unknown field is an error naming
it, never skipped. Ignored fields are kept verbatim (`ModelConfig.passthrough`) and written back by
`save`. Every tensor in the files must map to a leaf and every leaf must be in the files; the only
tensors skipped are listed in `_SKIPPED_TENSORS` with their reason.

Tensors are read one shard at a time and one tensor at a time, each with a positioned read
(`np.fromfile`; safetensors' own numpy reader has no bfloat16, and a memory map's pages count
toward peak RSS), and cast to the `dtype` asked for, so the host holds the converted tree plus
one tensor. With `load(..., shardings=...)` each tensor goes straight into its sharding as it is
read (`jax.make_array_from_callback`: each device gets a copy of its slice alone), so the host holds
one tensor and this process's slices of it, and no device holds more than its shard; the shapes
to choose the shardings from come from `load_abstract`, which reads no tensor. `save` writes
bfloat16 trees as BF16 tensors, one tensor at a time.

Position ids of RoBERTa: transformers counts them over the non-padding tokens, ftlab over the
sequence (`arange + position_offset`); they agree on every real token of a right-padded batch
(ftlab's tokenizers pad on the right), and padded positions are masked out of attention.

Usage:
    >>> config, params, tok = load("path/to/folder")  # doctest: +SKIP
    >>> encoder = bert.BertEncoder(config.config)  # doctest: +SKIP
    >>> hidden = encoder.apply({"params": params}, ids, mask)  # doctest: +SKIP
    >>> save("path/to/out", config, params, tok)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ftlab import types
from ftlab.models import bert, llama

__all__ = [
    "ARCHITECTURES",
    "CONFIG_FILE",
    "DECODERS",
    "IGNORED_FIELDS",
    "INDEX_FILE",
    "WEIGHTS_FILE",
    "ModelConfig",
    "TokenizerFiles",
    "config_from_hf",
    "config_to_hf",
    "load",
    "load_abstract",
    "load_tokenizer",
    "save",
    "tensor_names",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tokenizer files copied verbatim between folders (those present); tokenizer.json is required.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    # Not the tokenizer's, but a serving stack reads it beside it (eos ids, sampling defaults).
    "generation_config.json",
)

# model_type -> the transformers class `save` names in "architectures" of a fresh config.
ARCHITECTURES = {
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "distilbert": "DistilBertModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
DECODERS = ("llama", "mistral", "qwen2", "qwen3")

# config.json fields that cannot change the forward pass, with the reason. They are kept verbatim
# and written back by `save`.
IGNORED_FIELDS = {
    "_name_or_path": "where transformers loaded the model from; bookkeeping",
    "architectures": "the transformers class names; the architecture is model_type",
    "transformers_version": "the writer's version; bookkeeping",
    "torch_dtype": "the storage dtype of the tensors; load casts to its dtype argument",
    "dtype": "the storage dtype of the tensors; load casts to its dtype argument",
    "initializer_range": "the std of random init; loaded weights are not initialised",
    "gradient_checkpointing": "a torch memory/compute trade-off in training; no effect on values",
    "use_cache": "whether transformers returns a KV cache; ftlab's cache is an explicit argument",
    "classifier_dropout": "dropout of a task head, which this loader does not load",
    "id2label": "labels of a task head, which this loader does not load",
    "label2id": "labels of a task head, which this loader does not load",
    "num_labels": "size of a task head, which this loader does not load",
    "problem_type": "loss of a task head, which this loader does not load",
    "qa_dropout": "dropout of DistilBERT's question-answering head, not loaded",
    "seq_classif_dropout": "dropout of DistilBERT's classification head, not loaded",
    "bos_token_id": "a tokenizer/generation id; the forward pass reads none",
    "eos_token_id": "a tokenizer/generation id; the forward pass reads none",
    "sep_token_id": "a tokenizer/generation id; the forward pass reads none",
    "output_past": "a generation option; encoders have no past",
    "tie_weights_": "DistilBERT's masked-LM head tying; the head is not loaded",
    "return_dict": "the shape of transformers' return value",
    "output_hidden_states": "what transformers returns; no effect on values",
    "output_attentions": "what transformers returns; no effect on values",
    "pruned_heads": "checked separately: must be empty",
    "tie_word_embeddings": "encoders: an LM head's tying, not loaded (decoders read the field)",
    "max_window_layers": "Qwen's sliding-window layer count; inert as use_sliding_window is false",
    # RoBERTa reads it (its position offset); elsewhere it only makes torch zero the gradient of
    # that embedding row (padded keys are masked out of attention) or names a tokenizer id.
    "pad_token_id": "except RoBERTa: torch's gradient of one embedding row, a tokenizer id",
    "chunk_size_feed_forward": "checked separately: feed-forward chunking changes memory only",
}
# Tensors in a folder that are not model parameters: (pattern, reason).
_SKIPPED_TENSORS = (
    (r"embeddings\.position_ids", "a constant arange buffer (older transformers saved it)"),
    (r"embeddings\.token_type_ids", "a constant zeros buffer (older transformers saved it)"),
    (r"pooler\.dense\.(weight|bias)", "BertModel's [CLS] pooler, which ftlab's encoder lacks"),
    (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", "RoPE's frequencies, recomputed"),
)
_SKIP = re.compile("|".join(p for p, _ in _SKIPPED_TENSORS))
# A decoder's embedding table (the tied head's weights).
_TABLE = "model.embed_tokens.weight"
# Fields checked for the one value ftlab implements (`_Fields.require`). Present ones go to
# `ModelConfig.passthrough` too, so `save` writes back the keys it read.
_CHECKED = (
    "hidden_act",
    "activation",
    "position_embedding_type",
    "is_decoder",
    "add_cross_attention",
    "sinusoidal_pos_embds",
    "attention_bias",
    "mlp_bias",
    "pretraining_tp",
    "attention_dropout",
    "use_sliding_window",
    "sliding_window",
    "layer_types",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A model's ftlab config plus what `save` needs to write its `config.json` back.

    Attributes:
        model_type: `config.json`'s `model_type`, a key of `ARCHITECTURES`.
        config: The `BertConfig` (encoders: the tree is a `BertEncoder`'s) or `LlamaConfig`
            (`DECODERS`: the tree is a `LlamaForCausalLM`'s) the parameter tree fits.
        passthrough: The `IGNORED_FIELDS` present in the loaded `config.json`, and the fields
            checked for the one value ftlab implements (`hidden_act`, ...), written back
            verbatim by `save`.
        legacy_rope: The decoder's `config.json` gave `rope_theta`/`rope_scaling` (transformers
            4) instead of `rope_parameters` (transformers 5); `save` writes the same form.
    """

    model_type: str
    config: bert.BertConfig | llama.LlamaConfig
    passthrough: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    legacy_rope: bool = False

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ValueError(
                f"ModelConfig: model_type={self.model_type!r} is not one of "
                f"{sorted(ARCHITECTURES)}."
            )
        unknown = sorted(set(self.passthrough) - set(IGNORED_FIELDS) - set(_CHECKED))
        if unknown:
            raise ValueError(
                f"ModelConfig: passthrough holds fields that are not ignorable: {unknown}."
            )


@dataclasses.dataclass(frozen=True)
class TokenizerFiles:
    """The tokenizer files of a folder, kept byte for byte so `save` writes them back unchanged.

    Attributes:
        files: File name -> contents; always holds `tokenizer.json`.
    """

    files: Mapping[str, bytes]

    @property
    def chat_template(self) -> str | None:
        """The chat template: `chat_template.jinja`, else `tokenizer_config.json`'s field."""
        if "chat_template.jinja" in self.files:
            return self.files["chat_template.jinja"].decode()
        if "tokenizer_config.json" in self.files:
            template = json.loads(self.files["tokenizer_config.json"]).get("chat_template")
            return template if isinstance(template, str) else None
        return None

    def build(self, max_length: int | None = None, *, pad_token: str | None = None):
        """A `tokenizers.Tokenizer` with padding and truncation set explicitly.

        The file's own padding and truncation settings never apply: with `max_length`, every
        encoding is truncated and right-padded to exactly `max_length` ids; without, neither.

        Args:
            max_length: Fixed number of tokens per encoding, or None for no padding/truncation.
            pad_token: The padding token; None: `tokenizer_config.json`'s `pad_token`.

        Returns:
            The configured `tokenizers.Tokenizer`.

        Raises:
            ValueError: if `max_length` is given and no pad token is known or in the vocabulary.
        """
        import tokenizers  # noqa: PLC0415 (optional dependency, imported where used)

        tok = tokenizers.Tokenizer.from_str(self.files["tokenizer.json"].decode())
        tok.no_padding()
        tok.no_truncation()
        if max_length is None:
            return tok
        if pad_token is None and "tokenizer_config.json" in self.files:
            pad_token = json.loads(self.files["tokenizer_config.json"]).get("pad_token")
            if isinstance(pad_token, dict):  # an AddedToken as transformers serialises it
                pad_token = pad_token.get("content")
        if pad_token is None:
            raise ValueError(
                "TokenizerFiles.build: no pad_token given and tokenizer_config.json names none."
            )
        pad_id = tok.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"TokenizerFiles.build: pad_token={pad_token!r} is not in the vocab.")
        tok.enable_truncation(max_length)
        tok.enable_padding(pad_id=pad_id, pad_token=pad_token, length=max_length)
        return tok


class _Fields:
    """Reads a `config.json` dict, remembering which fields were used."""

    def __init__(self, d: Mapping[str, Any], where: str):
        self.d, self.where, self.used = d, where, set()

    def get(self, key: str, default: Any = ...) -> Any:
        self.used.add(key)
        if key in self.d:
            return self.d[key]
        if default is ...:
            raise ValueError(f"{self.where}: required field {key!r} is missing.")
        return default

    def require(self, key: str, want: Any, default: Any = ..., why: str = "") -> None:
        assert key in _CHECKED, key
        got = self.get(key, default)
        if got != want:
            raise ValueError(
                f"{self.where}: field {key!r} is {got!r}, but ftlab implements only {want!r}"
                f"{' (' + why + ')' if why else ''}."
            )

    def finish(self) -> dict[str, Any]:
        """The passthrough fields; raises naming every field neither used nor ignorable."""
        unknown = sorted(k for k in self.d if k not in self.used and k not in IGNORED_FIELDS)
        if unknown:
            raise ValueError(
                f"{self.where}: field(s) {', '.join(map(repr, unknown))} are not understood by "
                "ftlab's converter; refusing to load rather than ignore them. If a field cannot "
                "change the forward pass, add it with its reason to third_party.hf.IGNORED_FIELDS."
            )
        if self.d.get("pruned_heads"):
            raise ValueError(f"{self.where}: field 'pruned_heads' is not empty; not implemented.")
        if self.d.get("chunk_size_feed_forward", 0) not in (0, None):
            # Chunking changes memory only, but refuse anything but the default to stay strict.
            raise ValueError(f"{self.where}: field 'chunk_size_feed_forward' must be 0.")
        return {
            k: self.d[k]
            for k in self.d
            if (k in IGNORED_FIELDS and k not in self.used) or k in _CHECKED
        }


def _bert_like_from_hf(f: _Fields, model_type: str) -> bert.BertConfig:
    # HF "gelu" is the exact erf GELU; "gelu_new"/"gelu_pytorch_tanh" are the tanh form.
    f.require("hidden_act", "gelu")
    f.require("position_embedding_type", "absolute", "absolute")
    f.require("is_decoder", False, False, "ftlab's BertEncoder is encoder-only")
    f.require("add_cross_attention", False, False, "ftlab's BertEncoder is encoder-only")
    hidden_dropout = float(f.get("hidden_dropout_prob", 0.1))
    attention_dropout = float(f.get("attention_probs_dropout_prob", 0.1))
    # RoBERTa numbers positions from padding_idx + 1 (transformers' default pad id is 1).
    offset = int(f.get("pad_token_id", 1)) + 1 if model_type == "roberta" else 0
    return bert.BertConfig(
        vocab_size=int(f.get("vocab_size")),
        hidden_size=int(f.get("hidden_size")),
        num_layers=int(f.get("num_hidden_layers")),
        num_heads=int(f.get("num_attention_heads")),
        intermediate_size=int(f.get("intermediate_size")),
        max_position_embeddings=int(f.get("max_position_embeddings")),
        type_vocab_size=int(f.get("type_vocab_size", 2)),
        layer_norm_eps=float(f.get("layer_norm_eps", 1e-12)),
        dropout_rate=hidden_dropout,
        attention_dropout_rate=None if attention_dropout == hidden_dropout else attention_dropout,
        position_offset=offset,
    )


def _distilbert_from_hf(f: _Fields) -> bert.BertConfig:
    f.require("activation", "gelu")
    f.require("sinusoidal_pos_embds", False, False, "a fixed sinusoidal table; ftlab's is learned")
    dropout = float(f.get("dropout", 0.1))
    attention_dropout = float(f.get("attention_dropout", 0.1))
    return bert.BertConfig(
        vocab_size=int(f.get("vocab_size")),
        hidden_size=int(f.get("dim")),
        num_layers=int(f.get("n_layers")),
        num_heads=int(f.get("n_heads")),
        intermediate_size=int(f.get("hidden_dim")),
        max_position_embeddings=int(f.get("max_position_embeddings")),
        type_vocab_size=0,
        # DistilBERT's layer norms use a fixed eps of 1e-12 (not a config field).
        layer_norm_eps=1e-12,
        dropout_rate=dropout,
        attention_dropout_rate=None if attention_dropout == dropout else attention_dropout,
    )


def _rope_from_hf(f: _Fields) -> tuple[float, tuple | None, bool]:
    """(rope_theta, LlamaConfig.rope_scaling, legacy form) from either config form."""
    if "rope_parameters" in f.d:
        params = dict(f.get("rope_parameters"))
        legacy = False
        for key in ("rope_theta", "rope_scaling"):
            if key in f.d:
                raise ValueError(
                    f"{f.where}: fields 'rope_parameters' and {key!r} are both given; give one."
                )
        theta = params.pop("rope_theta", 10000.0)
        scaling = params
    else:
        theta = f.get("rope_theta", 10000.0)
        scaling = dict(f.get("rope_scaling", None) or {})
        legacy = True
        if "type" in scaling:  # the older spelling of rope_type
            scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        extra = sorted(set(scaling) - {"rope_type"})
        if extra:
            raise ValueError(f"{f.where}: default RoPE takes no parameters; got {extra}.")
        return float(theta), None, legacy
    try:
        llama.LlamaConfig.tiny(rope_scaling=tuple(sorted(scaling.items())))
    except ValueError as e:
        raise ValueError(f"{f.where}: field 'rope_parameters'/'rope_scaling': {e}") from None
    return float(theta), tuple(sorted(scaling.items())), legacy


def _decoder_from_hf(f: _Fields, model_type: str) -> tuple[llama.LlamaConfig, bool]:
    f.require("hidden_act", "silu", ..., "SwiGLU with SiLU")
    f.require("attention_dropout", 0.0, 0.0, "ftlab's decoder has no attention dropout")
    if model_type in ("llama", "qwen3"):
        f.require("attention_bias", False, False, "only Qwen2 has q/k/v biases")
    if model_type == "llama":
        f.require("mlp_bias", False, False)
        f.require("pretraining_tp", 1, 1, "sliced matmuls of torch training")
    max_positions = int(f.get("max_position_embeddings"))
    if model_type in ("qwen2", "qwen3"):
        f.require("use_sliding_window", False, False, "sliding-window attention")
        f.get("sliding_window", None)  # inert without use_sliding_window
        layers = f.get("layer_types", None)
        if layers is not None and set(layers) != {"full_attention"}:
            raise ValueError(
                f"{f.where}: field 'layer_types' is {layers!r}; ftlab implements only "
                "'full_attention' layers."
            )
    elif model_type == "mistral":
        window = f.get("sliding_window", None)
        if window is not None and int(window) < max_positions:
            raise ValueError(
                f"{f.where}: field 'sliding_window' is {window}, shorter than "
                f"max_position_embeddings={max_positions}; ftlab implements only full "
                "attention (a window at least as long as the context)."
            )
    theta, scaling, legacy = _rope_from_hf(f)
    hidden, heads = int(f.get("hidden_size")), int(f.get("num_attention_heads"))
    head_dim = f.get("head_dim", None) if model_type != "qwen2" else None
    if head_dim is not None and int(head_dim) == hidden // heads and hidden % heads == 0:
        head_dim = None
    config = llama.LlamaConfig(
        vocab_size=int(f.get("vocab_size")),
        hidden_size=hidden,
        num_layers=int(f.get("num_hidden_layers")),
        num_heads=heads,
        # Llama defaults to one KV head per query head; the others' defaults are model sizes.
        num_kv_heads=int(f.get("num_key_value_heads", heads if model_type == "llama" else ...)),
        intermediate_size=int(f.get("intermediate_size")),
        max_position_embeddings=max_positions,
        rope_theta=theta,
        rms_norm_eps=float(f.get("rms_norm_eps", 1e-6)),
        # Absent: transformers' default for these four classes, untied.
        tie_word_embeddings=bool(f.get("tie_word_embeddings", False)),
        attention_head_dim=None if head_dim is None else int(head_dim),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        rope_scaling=scaling,
    )
    return config, legacy


def config_from_hf(d: Mapping[str, Any], *, where: str = CONFIG_FILE) -> ModelConfig:
    """Parses a `config.json` dict into a `ModelConfig`, refusing any field it does not know.

    Args:
        d: The parsed `config.json`.
        where: How errors name the file.

    Returns:
        The `ModelConfig`.

    Raises:
        ValueError: naming the field when one is unknown, missing, or has a value ftlab does not
            implement.
    """
    f = _Fields(d, where)
    model_type = f.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"{where}: field 'model_type' is {model_type!r}; ftlab loads {sorted(ARCHITECTURES)}."
        )
    legacy = False
    if model_type in DECODERS:
        config, legacy = _decoder_from_hf(f, model_type)
    elif model_type == "distilbert":
        config = _distilbert_from_hf(f)
    else:
        config = _bert_like_from_hf(f, model_type)
        if model_type == "bert" and config.type_vocab_size == 0:
            raise ValueError(f"{where}: field 'type_vocab_size' is 0; BERT needs at least 1.")
    return ModelConfig(
        model_type=model_type, config=config, passthrough=f.finish(), legacy_rope=legacy
    )


def config_to_hf(model_config: ModelConfig) -> dict[str, Any]:
    """The `config.json` dict of `model_config`, as transformers writes it for that class.

    Raises:
        ValueError: if the `BertConfig` cannot be expressed in that architecture's config
            (a RoBERTa offset of 0, a DistilBERT with token types, ...), naming the field.
    """
    c, kind = model_config.config, model_config.model_type
    out: dict[str, Any] = {"architectures": [ARCHITECTURES[kind]]}
    out.update(model_config.passthrough)
    if kind in DECODERS:
        return _decoder_to_hf(model_config, out)
    attention_dropout = c.probs_dropout_rate
    if kind == "distilbert":
        if c.type_vocab_size or c.position_offset or c.layer_norm_eps != 1e-12:
            raise ValueError(
                "config_to_hf: a DistilBERT needs model_config.config.type_vocab_size=0, "
                f"position_offset=0 and layer_norm_eps=1e-12; got {c.type_vocab_size}, "
                f"{c.position_offset} and {c.layer_norm_eps}."
            )
        out.update(
            model_type=kind,
            activation="gelu",
            vocab_size=c.vocab_size,
            dim=c.hidden_size,
            n_layers=c.num_layers,
            n_heads=c.num_heads,
            hidden_dim=c.intermediate_size,
            max_position_embeddings=c.max_position_embeddings,
            dropout=c.dropout_rate,
            attention_dropout=attention_dropout,
        )
        return out
    if kind == "roberta":
        if c.position_offset < 1:
            raise ValueError(
                "config_to_hf: a RoBERTa needs model_config.config.position_offset = "
                f"pad_token_id + 1 >= 1; got {c.position_offset}."
            )
        out["pad_token_id"] = c.position_offset - 1
    else:
        if c.position_offset:
            raise ValueError(
                "config_to_hf: BERT has no position offset; model_config.config."
                f"position_offset is {c.position_offset} (use model_type='roberta')."
            )
    out.update(
        model_type=kind,
        hidden_act="gelu",
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        type_vocab_size=c.type_vocab_size,
        layer_norm_eps=c.layer_norm_eps,
        hidden_dropout_prob=c.dropout_rate,
        attention_probs_dropout_prob=attention_dropout,
    )
    return out


def _decoder_to_hf(model_config: ModelConfig, out: dict[str, Any]) -> dict[str, Any]:
    c, kind = model_config.config, model_config.model_type
    if c.qkv_bias != (kind == "qwen2") or c.qk_norm != (kind == "qwen3"):
        raise ValueError(
            f"config_to_hf: model_type={kind!r} needs qkv_bias={kind == 'qwen2'} and "
            f"qk_norm={kind == 'qwen3'}; model_config.config has {c.qkv_bias} and {c.qk_norm}."
        )
    if kind == "qwen2" and c.attention_head_dim is not None:
        raise ValueError("config_to_hf: Qwen2 has no head_dim field; attention_head_dim is set.")
    out.update(
        model_type=kind,
        hidden_act="silu",
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
    )
    if kind != "qwen2":
        out["head_dim"] = c.head_dim
    scaling = dict(c.rope_scaling or {})
    if model_config.legacy_rope:
        out["rope_theta"] = c.rope_theta
        out["rope_scaling"] = scaling or None
    else:
        out["rope_parameters"] = {"rope_theta": c.rope_theta, "rope_type": "default", **scaling}
    return out


def _decoder_names(c: llama.LlamaConfig) -> dict[str, tuple[str, bool]]:
    names = {
        "model.embed_tokens.weight": ("decoder/embeddings/word_embeddings/embedding", False),
        "model.norm.weight": ("decoder/final_norm/scale", False),
    }
    if not c.tie_word_embeddings:
        names["lm_head.weight"] = ("decoder/lm_head/kernel", True)
    dense = {
        "self_attn.q_proj": "attention/query",
        "self_attn.k_proj": "attention/key",
        "self_attn.v_proj": "attention/value",
        "self_attn.o_proj": "attention/out",
        "mlp.gate_proj": "mlp/gate",
        "mlp.up_proj": "mlp/up",
        "mlp.down_proj": "mlp/down",
    }
    norms = {"input_layernorm": "attention_norm", "post_attention_layernorm": "mlp_norm"}
    if c.qk_norm:
        norms.update(
            {"self_attn.q_norm": "attention/query_norm", "self_attn.k_norm": "attention/key_norm"}
        )
    for i in range(c.num_layers):
        hf, ft = f"model.layers.{i}.", f"decoder/layer_{i}/"
        for src, dst in dense.items():
            names[f"{hf}{src}.weight"] = (f"{ft}{dst}/kernel", True)
            if c.qkv_bias and src[-6:] in ("q_proj", "k_proj", "v_proj"):
                names[f"{hf}{src}.bias"] = (f"{ft}{dst}/bias", False)
        for src, dst in norms.items():
            names[f"{hf}{src}.weight"] = (f"{ft}{dst}/scale", False)
    return names


def tensor_names(model_config: ModelConfig) -> dict[str, tuple[str, bool]]:
    """HF tensor name -> (ftlab slash path, whether the torch `(out, in)` weight is transposed)."""
    c, kind = model_config.config, model_config.model_type
    if kind in DECODERS:
        return _decoder_names(c)
    names: dict[str, tuple[str, bool]] = {
        "embeddings.word_embeddings.weight": ("embeddings/word_embeddings/embedding", False),
        "embeddings.position_embeddings.weight": (
            "embeddings/position_embeddings/embedding",
            False,
        ),
        "embeddings.LayerNorm.weight": ("embeddings/layer_norm/scale", False),
        "embeddings.LayerNorm.bias": ("embeddings/layer_norm/bias", False),
    }
    if c.type_vocab_size:
        names["embeddings.token_type_embeddings.weight"] = (
            "embeddings/token_type_embeddings/embedding",
            False,
        )
    if kind == "distilbert":
        prefix = "transformer.layer.{i}."
        dense = {
            "attention.q_lin": "attention/query",
            "attention.k_lin": "attention/key",
            "attention.v_lin": "attention/value",
            "attention.out_lin": "attention/out",
            "ffn.lin1": "mlp/intermediate",
            "ffn.lin2": "mlp/output",
        }
        norms = {"sa_layer_norm": "attention_layer_norm", "output_layer_norm": "output_layer_norm"}
    else:
        prefix = "encoder.layer.{i}."
        dense = {
            "attention.self.query": "attention/query",
            "attention.self.key": "attention/key",
            "attention.self.value": "attention/value",
            "attention.output.dense": "attention/out",
            "intermediate.dense": "mlp/intermediate",
            "output.dense": "mlp/output",
        }
        norms = {
            "attention.output.LayerNorm": "attention_layer_norm",
            "output.LayerNorm": "output_layer_norm",
        }
    for i in range(c.num_layers):
        hf, ft = prefix.format(i=i), f"layer_{i}/"
        for src, dst in dense.items():
            names[f"{hf}{src}.weight"] = (f"{ft}{dst}/kernel", True)
            names[f"{hf}{src}.bias"] = (f"{ft}{dst}/bias", False)
        for src, dst in norms.items():
            names[f"{hf}{src}.weight"] = (f"{ft}{dst}/scale", False)
            names[f"{hf}{src}.bias"] = (f"{ft}{dst}/bias", False)
    return names


def _shards(folder: pathlib.Path) -> dict[pathlib.Path, list[str] | None]:
    """Safetensors file -> the tensor names the index assigns it (None: a single file)."""
    index, single = folder / INDEX_FILE, folder / WEIGHTS_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object.")
        shards: dict[pathlib.Path, list[str] | None] = {}
        for name, file in weight_map.items():
            shards.setdefault(folder / file, []).append(name)
        missing = sorted(str(p) for p in shards if not p.is_file())
        if missing:
            raise FileNotFoundError(f"{index} lists shard(s) that are missing: {missing}.")
        return shards
    if single.is_file():
        return {single: None}
    raise FileNotFoundError(
        f"{folder} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}; is it a Hugging Face model "
        "folder saved with safe_serialization?"
    )


# Bytes per element of the safetensors dtype codes.
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
    "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip


class _SafetensorsFile:
    """A safetensors file whose tensors are read one at a time, each with one positioned read.

    `safetensors.safe_open(framework="numpy")` cannot return bfloat16 tensors (numpy has no
    such dtype), and most decoder checkpoints are bfloat16; the format is simple (an 8-byte
    little-endian header length, a JSON header of dtype, shape and byte offsets, then the data),
    so it is read here with `np.fromfile` and `ml_dtypes.bfloat16`. Not `np.memmap`: the mapped
    pages of a whole shard count toward the process's peak RSS. Measured on MiniLM (86 MiB of
    float32 parameters, jax already initialised): `load` raises peak RSS by 93 MB.
    """

    def __init__(self, path: pathlib.Path):
        import ml_dtypes  # noqa: PLC0415 (a jax dependency)

        self.path = path
        self.dtypes = {
            "F64": np.float64,
            "F32": np.float32,
            "F16": np.float16,
            "BF16": ml_dtypes.bfloat16,
        }
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"{path}: not a safetensors file (header length {n}).")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise ValueError(f"{path}: the safetensors header is not JSON ({e}).") from None
        header.pop("__metadata__", None)
        self.header = header
        self.data_size = size - 8 - n
        # Every entry, read or skipped, must fit the file: a truncated file is named at once.
        for key, info in header.items():
            start, end = info["data_offsets"]
            width = _ITEMSIZE.get(info["dtype"])
            numel = int(np.prod(info["shape"]))
            if end > self.data_size or (width is not None and end - start != numel * width):
                raise ValueError(
                    f"{path}: tensor {key!r} ({info['dtype']} {info['shape']}) has byte range "
                    f"[{start}, {end}) that does not fit its shape or the file "
                    f"({self.data_size} data bytes); truncated file?"
                )
        self.data_start = 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, key: str) -> np.ndarray:
        """The tensor `key`, read from the file into a new array (floating dtypes only)."""
        info = self.header[key]
        if info["dtype"] not in self.dtypes:
            raise ValueError(
                f"{self.path}: tensor {key!r} has dtype {info['dtype']}; expected one of "
                f"{sorted(self.dtypes)}."
            )
        start, _ = info["data_offsets"]  # checked against the file in __init__
        shape = tuple(info["shape"])
        flat = np.fromfile(
            self.path,
            dtype=np.dtype(self.dtypes[info["dtype"]]),
            count=int(np.prod(shape)),
            offset=self.data_start + start,
        )
        return flat.reshape(shape)


def _write_safetensors(
    path: pathlib.Path, tensors: Mapping[str, tuple[np.ndarray, bool]], names: list[str]
) -> None:
    """Writes `names` of `tensors` (name -> (array, transpose)) as a safetensors file.

    Metadata `format=pt`, as transformers requires; bfloat16 included. Each tensor is transposed
    into torch's layout only while it is written, so the host never holds a second model.
    """
    codes = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        array, transpose = tensors[name]
        if array.dtype.name not in codes:
            raise ValueError(f"save: leaf for {name!r} has dtype {array.dtype}; expected floats.")
        header[name] = {
            "dtype": codes[array.dtype.name],
            "shape": list(array.shape[::-1] if transpose else array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in names:
            array, transpose = tensors[name]
            f.write(np.ascontiguousarray(array.T if transpose else array).tobytes())


def _read_tensors(
    folder: pathlib.Path,
    want: Mapping[str, tuple[str, bool]],
    dtype: Any,
    *,
    shapes: Mapping[str, tuple[int, ...]],
    place: Callable[[str, np.ndarray], Any] | None = None,
    tied_head: str | None = None,
) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """Reads the wanted tensors shard by shard, one at a time.

    Args:
        folder: The model folder.
        want: HF tensor name -> (ftlab leaf path, whether torch's `(out, in)` is transposed).
        dtype: The dtype of the leaves.
        shapes: Leaf path -> the shape `config.json` implies; a tensor of another shape is not
            converted, only described in the third return value.
        place: None: each leaf is a numpy array. Else `place(leaf path, value)` makes the leaf
            from a read-only view in the file's dtype (transposed already), so that the host
            copy of that tensor is dropped as soon as it returns.
        tied_head: An HF name in `want` that must equal the embedding table (a tied
            checkpoint's stored head); it is compared, then dropped.

    Returns:
        `(leaves by HF name, unexpected tensor names, HF name -> its shape mismatch)`.
    """
    out, unexpected, bad = {}, [], {}
    # A task model's base tensors sit under a prefix ("bert.", "distilbert.", ...).
    prefixes = ("", "bert.", "roberta.", "distilbert.")
    files = []
    for path, listed in _shards(folder).items():
        f = _SafetensorsFile(path)
        keys = f.keys()
        if listed is not None and set(keys) != set(listed):
            raise ValueError(
                f"{path}: holds {sorted(set(keys) - set(listed))[:5]} not listed for it in "
                f"{INDEX_FILE}, and lacks {sorted(set(listed) - set(keys))[:5]}."
            )
        files.append(f)
    where = {key: f for f in files for key in f.keys()}
    seen = set()
    for f in files:
        for key in f.keys():
            name = next(
                (key[len(p) :] for p in prefixes if key.startswith(p) and key[len(p) :] in want),
                None,
            )
            if name is None:
                bare = next((key[len(p) :] for p in prefixes[1:] if key.startswith(p)), key)
                if not _SKIP.fullmatch(bare):
                    unexpected.append(key)
                continue
            if name in seen:
                raise ValueError(f"{folder}: tensor {name!r} is stored twice.")
            seen.add(name)
            leaf, transpose = want[name]
            value = f.get(key)
            view = value.T if transpose else value  # torch (out, in) -> flax (in, out)
            if view.shape != shapes[leaf]:
                bad[name] = f"  {name} -> {leaf}: expected {shapes[leaf]}, got {view.shape}" + (
                    " (transposed from torch (out, in))" if transpose else ""
                )
                continue
            if name == tied_head:
                table = where.get(_TABLE)
                if table is not None and not np.array_equal(
                    view.astype(dtype), table.get(_TABLE).astype(dtype)
                ):
                    raise ValueError(
                        f"{folder}: config.json says tie_word_embeddings=true, but the files "
                        f"hold an {name} that differs from {_TABLE}; set tie_word_embeddings "
                        "to false to load the separate head."
                    )
                continue
            if place is not None:
                out[name] = place(leaf, view)
            elif transpose:  # one copy of one tensor
                out[name] = np.array(view, dtype=dtype, order="C")
            else:
                out[name] = value.astype(dtype, copy=False)
            del value, view  # the host copy goes before the next tensor is read
    return out, unexpected, bad


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Slash paths -> nested dicts."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, last = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def _expected_shapes(config: bert.BertConfig | llama.LlamaConfig) -> dict[str, tuple[int, ...]]:
    if isinstance(config, llama.LlamaConfig):
        return llama.param_shapes(config)
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(
        lambda key, x: bert.BertEncoder(config).init(key, x, jnp.ones_like(x)),
        jax.random.key(0),
        ids,
    )["params"]
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def load_tokenizer(folder: str | pathlib.Path) -> TokenizerFiles | None:
    """The folder's tokenizer files, or None when it has no `tokenizer.json`."""
    folder = pathlib.Path(folder)
    if not (folder / "tokenizer.json").is_file():
        return None
    return TokenizerFiles(
        {n: (folder / n).read_bytes() for n in _TOKENIZER_FILES if (folder / n).is_file()}
    )


def _read_config(folder: pathlib.Path) -> ModelConfig:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; is {folder} a model folder?")
    return config_from_hf(json.loads(config_path.read_text()), where=str(config_path))


def load_abstract(
    path: str | pathlib.Path, *, dtype: Any = np.float32
) -> tuple[ModelConfig, types.Params]:
    """The folder's config and the shapes of the tree `load` returns, reading no tensor.

    What a caller needs to choose a sharding per leaf before loading (`load`'s `shardings`).

    Args:
        path: The model folder.
        dtype: The dtype `load` would be given.

    Returns:
        `(model_config, tree)`: the tree of `load` with `jax.ShapeDtypeStruct` leaves.

    Raises:
        ValueError, FileNotFoundError: as `load` for `config.json`.
    """
    import jax  # noqa: PLC0415

    model_config = _read_config(pathlib.Path(path))
    shapes = _expected_shapes(model_config.config)
    return model_config, _nest({k: jax.ShapeDtypeStruct(v, dtype) for k, v in shapes.items()})


def load(
    path: str | pathlib.Path,
    *,
    dtype: Any = np.float32,
    shardings: Any = None,
) -> tuple[ModelConfig, types.Params, TokenizerFiles | None]:
    """Loads a Hugging Face model folder into an ftlab `BertEncoder` or `LlamaForCausalLM` tree.

    Args:
        path: The folder: `config.json`, `model.safetensors` or the sharded files with
            `model.safetensors.index.json`, and optionally `tokenizer.json` and friends.
        dtype: Dtype of the returned arrays (float32 by default; `jnp.bfloat16` works too).
        shardings: None: the leaves are numpy arrays on the host. Else each leaf becomes a
            `jax.Array` in its own sharding as it is read (`jax.make_array_from_callback`): every
            device gets only its slice of the tensor, the host holds one tensor (and this
            process's slices of it) at a time, and every process of a multi-host job fills its
            own devices. Either a tree of
            `jax.sharding.Sharding`s with exactly the leaves of the loaded tree, or a function
            from the tree of `load_abstract` to one, e.g.
            `lambda tree: sharding.shardings(tree, rules, mesh)` (`ftlab.core.sharding`).

    Returns:
        `(model_config, params, tokenizer)`: the `ModelConfig` (its `config` builds the
        `BertEncoder`), the parameter tree (nested dict of numpy arrays, or of `jax.Array`s with
        `shardings`), and the `TokenizerFiles` (None if the folder has no `tokenizer.json`).

    Raises:
        ValueError: naming a `config.json` field the converter does not understand or whose value
            it does not implement; naming every tensor in the files that maps to no leaf and
            every leaf missing from the files; naming each tensor whose shape is wrong; naming
            the leaves `shardings` lacks or has beyond the tree, and a value that is no sharding.
        FileNotFoundError: if `config.json` or the weights (or a listed shard) are missing.
    """
    folder = pathlib.Path(path)
    model_config = _read_config(folder)
    names = tensor_names(model_config)
    shapes = _expected_shapes(model_config.config)
    assert {leaf for leaf, _ in names.values()} == set(shapes), "tensor_names is out of date"
    place = None
    if shardings is not None:
        place = _placer(shardings, shapes, dtype)
    want, tied_head = dict(names), None
    if model_config.model_type in DECODERS and model_config.config.tie_word_embeddings:
        # Some tied checkpoints store the head too; it must be the table, and is then dropped.
        tied_head = "lm_head.weight"
        want[tied_head] = names[_TABLE]
    tensors, unexpected, bad = _read_tensors(
        folder, want, dtype, shapes=shapes, place=place, tied_head=tied_head
    )
    missing = sorted(k for k in names if k not in tensors and k not in bad)
    if unexpected or missing:
        lines = [f"{folder}: the tensors do not match {ARCHITECTURES[model_config.model_type]}:"]
        if unexpected:
            lines.append(f"  unexpected tensor(s) ({len(unexpected)}): {', '.join(unexpected)}")
        if missing:
            lines.append(
                f"  missing tensor(s) ({len(missing)}): "
                + ", ".join(f"{k} (-> {names[k][0]})" for k in missing)
            )
        raise ValueError("\n".join(lines))
    if bad:
        raise ValueError(
            f"{folder}: tensor shapes do not fit config.json:\n" + "\n".join(bad.values())
        )
    params = _nest({names[name][0]: value for name, value in tensors.items()})
    return model_config, params, load_tokenizer(folder)


def _placer(
    shardings: Any, shapes: Mapping[str, tuple[int, ...]], dtype: Any
) -> Callable[[str, np.ndarray], Any]:
    """`place` for `_read_tensors`: puts each leaf into its sharding from a host view."""
    import jax  # noqa: PLC0415

    from ftlab.core import partition  # noqa: PLC0415

    if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
        abstract = _nest({k: jax.ShapeDtypeStruct(v, dtype) for k, v in shapes.items()})
        shardings = shardings(abstract)
    flat = partition.flatten(shardings)
    extra, lacking = sorted(set(flat) - set(shapes)), sorted(set(shapes) - set(flat))
    if extra or lacking:
        raise ValueError(
            f"load: shardings does not fit the loaded tree: leaves it lacks {lacking[:5]}"
            f"{f' (and {len(lacking) - 5} more)' if len(lacking) > 5 else ''}, leaves not in "
            f"the tree {extra[:5]}; build it from load_abstract(path)."
        )
    wrong = [k for k, v in flat.items() if not isinstance(v, jax.sharding.Sharding)]
    if wrong:
        raise ValueError(
            f"load: shardings[{wrong[0]!r}] is {flat[wrong[0]]!r}, not a jax.sharding.Sharding."
        )

    def place(leaf: str, view: np.ndarray) -> jax.Array:
        # Each addressable device's slice is copied out of the view and converted. Not the view
        # itself: on the CPU a device buffer may alias an aligned host array, which would keep
        # the whole tensor alive behind a 1/n shard.
        return jax.make_array_from_callback(
            view.shape, flat[leaf], lambda index: np.array(view[index], dtype=dtype, order="C")
        )

    return place


def save(
    path: str | pathlib.Path,
    model_config: ModelConfig,
    params: types.Params,
    tokenizer: TokenizerFiles | None = None,
    *,
    max_shard_bytes: int | None = None,
) -> None:
    """Writes a Hugging Face model folder that `load` and `transformers` read back.

    Writes `config.json`, a single `model.safetensors` (torch names and `(out, in)` layout, in
    the params' own dtype, bfloat16 included, metadata `format=pt` as transformers expects) and
    the tokenizer files. A stacked decoder tree (`llama.stack_layers`) is unstacked first.

    Args:
        path: The folder; created if missing. Existing files of the same names are replaced.
        model_config: The architecture and config (from `load`, or built by hand).
        params: A `BertEncoder` tree (no method leaves: merge LoRA first).
        tokenizer: Tokenizer files to write, or None for none.
        max_shard_bytes: Split the weights into `model-0000i-of-0000n.safetensors` shards of
            at most this many bytes (a larger tensor gets a shard of its own) listed in
            `model.safetensors.index.json`, as `save_pretrained(max_shard_size=...)`; None:
            one `model.safetensors`. Weight files of an earlier save in the folder are removed
            first, so a stale index never shadows the new weights.

    Raises:
        ValueError: if `params` has leaves `model_config` does not know, or lacks some, naming them.
    """
    from ftlab.core import partition  # noqa: PLC0415

    if model_config.model_type in DECODERS and llama.LAYERS in params.get("decoder", {}):
        params = llama.unstack_layers(params)  # a stacked tree (`llama.stack_layers`)
    flat = {k: np.asarray(v) for k, v in partition.flatten(params).items()}
    names = tensor_names(model_config)
    by_leaf = {leaf: (hf, transpose) for hf, (leaf, transpose) in names.items()}
    extra, missing = sorted(set(flat) - set(by_leaf)), sorted(set(by_leaf) - set(flat))
    if extra or missing:
        raise ValueError(
            f"save: params do not fit {ARCHITECTURES[model_config.model_type]}: leaves not in "
            f"the architecture {extra}, leaves missing {missing}. Merge method leaves (LoRA, "
            "...) into the base weights first."
        )
    tensors = {hf: (flat[leaf], transpose) for leaf, (hf, transpose) in by_leaf.items()}
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise ValueError(f"save: max_shard_bytes={max_shard_bytes} must be positive.")
    config = config_to_hf(model_config)
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [
        folder / WEIGHTS_FILE,
        folder / INDEX_FILE,
        *folder.glob("model-*-of-*.safetensors"),
    ]:
        old.unlink(missing_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    order = sorted(tensors)
    if max_shard_bytes is None:
        _write_safetensors(folder / WEIGHTS_FILE, tensors, order)
    else:
        shards: list[list[str]] = [[]]
        size = 0
        for name in order:
            nbytes = tensors[name][0].nbytes
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(folder / file, tensors, shard)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(a.nbytes for a, _ in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        for name, data in tokenizer.files.items():
            (folder / name).write_bytes(data)
