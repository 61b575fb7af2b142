"""A BERT encoder in Flax linen (post-LN), laid out like all-MiniLM-L6-v2.

The parameter tree (slash paths, as partition rules and checkpoints see them):

    embeddings/{word,position,token_type}_embeddings/embedding
    embeddings/layer_norm/{scale,bias}
    layer_{i}/attention/{query,key,value,out}/{kernel,bias}
    layer_{i}/attention_layer_norm/{scale,bias}
    layer_{i}/mlp/{intermediate,output}/{kernel,bias}
    layer_{i}/output_layer_norm/{scale,bias}

Every linear map is an `nn.Dense`, so dense-layer methods (LoRA, DoRA, IA3) can intercept
`nn.Dense.__call__` without editing this file. Parameters are always float32; `BertConfig.dtype` is
the computation dtype. Softmax, layer-norm statistics, pooling and classifier logits run in float32.

Hook points for structural methods: the model calls the sites of `ftlab.models.hooks` (the
protocol, written down there), so the methods find them through `hooks.discover`, never through
these path names. Each reads optional leaves that the model's own `init` never creates; a tree
without them gives the base model, traced exactly as before. Half a method's leaves, or a wrong
shape, is an error naming the leaf path. Where the leaves land in this model:

    embeddings/prompt                        [n, hidden]  `hooks.embeddings` (prompt tuning)
    layer_{i}/attention/prefix_{key,value}   [n, hidden]  `hooks.key_value` (prefix tuning)
    layer_{i}/{attention,output}_adapter/{down,up}/{kernel,bias}   `hooks.sublayer_output`
    layer_{i}/reft/...                       `hooks.hidden` on each layer's output (ReFT)

Applied as the root of `apply`, `BertEncoder` and `BertClassifier` check that every method leaf
of their tree was read (`hooks.track_root`): a LoRA tree applied without `lora.wrap_apply`
raises, naming the leaves, instead of running the base model.

With a prompt the encoder returns `[batch, n + seq, hidden]` (prompt positions first); the
classifier and `encode_sentences` pool over the real tokens only.

References:
    Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
    Understanding", https://arxiv.org/abs/1810.04805
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftlab import types
from ftlab.models import attention, dots, hooks

# Added to the attention logits of padded keys. Finite (unlike finfo.min) so a row whose keys are
# all padding gives a uniform softmax instead of NaN; exp(-1e9) is exactly 0 in float32, so real
# tokens never see padding. The logits are float32 when this is added, whatever the compute dtype.
_MASK_VALUE = -1e9

__all__ = [
    "BertClassifier",
    "BertConfig",
    "BertEmbeddings",
    "BertEncoder",
    "BertLayer",
    "BertMlp",
    "BertSelfAttention",
    "attention_bias",
    "encode_sentences",
    "l2_normalize",
    "mean_pool",
    "real_positions",
]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyperparameters of a BERT encoder.

    Attributes:
        vocab_size: Number of word-piece ids.
        hidden_size: Width of the residual stream.
        num_layers: Number of transformer layers.
        num_heads: Attention heads per layer; must divide `hidden_size`.
        intermediate_size: Width of the MLP's hidden layer.
        max_position_embeddings: Longest sequence the position table covers.
        type_vocab_size: Number of token-type (segment) ids; 0: the model has no token-type
            embedding table (DistilBERT), and `token_type_ids` must not be passed.
        layer_norm_eps: Epsilon of every layer norm.
        dropout_rate: Dropout on embeddings, attention probabilities and sublayer outputs.
        dtype: Computation dtype (parameters stay float32).
        attention_dropout_rate: Dropout on the attention probabilities alone; None: the same as
            `dropout_rate`. 0 lets a fused attention kernel (cuDNN) run in training.
        attention: Attention kernel, one of `attention.IMPLEMENTATIONS` (`"auto"`: cuDNN on a
            GPU in bfloat16/float16 when no probability dropout applies, else the einsum path).
        position_offset: Position id of the first token: token `i` reads row `i +
            position_offset` of the position table. 0 for BERT; RoBERTa counts positions from
            `padding_idx + 1` (2), so the rows below it are never read.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32
    attention_dropout_rate: float | None = None
    attention: str = "auto"
    position_offset: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BertConfig: hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}; pick num_heads that divides hidden_size."
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"BertConfig: dropout_rate={self.dropout_rate} must be in [0, 1).")
        rate = self.attention_dropout_rate
        if rate is not None and not 0.0 <= rate < 1.0:
            raise ValueError(f"BertConfig: attention_dropout_rate={rate} must be in [0, 1).")
        attention.check(self.attention, what="BertConfig: attention")
        if self.type_vocab_size < 0:
            raise ValueError(f"BertConfig: type_vocab_size={self.type_vocab_size} must be >= 0.")
        if not 0 <= self.position_offset < self.max_position_embeddings:
            raise ValueError(
                f"BertConfig: position_offset={self.position_offset} must be in [0, "
                f"max_position_embeddings={self.max_position_embeddings})."
            )

    @property
    def probs_dropout_rate(self) -> float:
        """Dropout on the attention probabilities: `attention_dropout_rate`, else `dropout_rate`."""
        rate = self.attention_dropout_rate
        return self.dropout_rate if rate is None else rate

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def tiny(cls, **overrides) -> BertConfig:
        """A few-thousand-parameter config for fast tests.

        >>> BertConfig.tiny().hidden_size
        16
        """
        fields = dict(
            vocab_size=64,
            hidden_size=16,
            num_layers=2,
            num_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            type_vocab_size=2,
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], *, dtype: Any = jnp.float32) -> BertConfig:
        """Builds a config from a Hugging Face BERT `config.json` dict.

        Only the architecture this module implements is accepted: a plain bidirectional BERT with
        exact (erf) GELU and absolute position embeddings. Anything else is refused rather than
        approximated.

        Args:
            d: The parsed `config.json`.
            dtype: Computation dtype of the resulting config.

        Returns:
            The matching `BertConfig`.

        Raises:
            ValueError: naming the field when a required field is missing or has a value this
                module does not implement.
        """

        def get(key, default=None):
            if key not in d:
                if default is None:
                    raise ValueError(f"config.json: required field {key!r} is missing.")
                return default
            return d[key]

        expected = {
            "model_type": ("bert", None),
            # HF "gelu" is the exact erf GELU; "gelu_new"/"gelu_pytorch_tanh" are the tanh form.
            "hidden_act": ("gelu", None),
            "position_embedding_type": ("absolute", "absolute"),
        }
        for key, (want, default) in expected.items():
            got = get(key, default)
            if got != want:
                raise ValueError(
                    f"config.json: field {key!r} is {got!r}, but ftlab's BertEncoder implements "
                    f"only {want!r}."
                )
        for key in ("is_decoder", "add_cross_attention"):
            if d.get(key, False):
                raise ValueError(
                    f"config.json: field {key!r} is true; ftlab's BertEncoder is encoder-only."
                )
        hidden_dropout = float(get("hidden_dropout_prob", 0.1))
        attention_dropout = float(get("attention_probs_dropout_prob", hidden_dropout))
        if attention_dropout != hidden_dropout:
            raise ValueError(
                "config.json: fields 'hidden_dropout_prob' and 'attention_probs_dropout_prob' "
                f"differ ({hidden_dropout} vs {attention_dropout}); BertConfig has one "
                "dropout_rate. Set them equal, or build BertConfig(...) directly."
            )
        return cls(
            vocab_size=int(get("vocab_size")),
            hidden_size=int(get("hidden_size")),
            num_layers=int(get("num_hidden_layers")),
            num_heads=int(get("num_attention_heads")),
            intermediate_size=int(get("intermediate_size")),
            max_position_embeddings=int(get("max_position_embeddings")),
            type_vocab_size=int(get("type_vocab_size", 2)),
            layer_norm_eps=float(get("layer_norm_eps", 1e-12)),
            dropout_rate=hidden_dropout,
            dtype=dtype,
        )


def attention_bias(attention_mask: jax.Array) -> jax.Array:
    """Turns a `[batch, seq]` 0/1 key mask into an additive float32 bias `[batch, 1, 1, seq]`."""
    keep = jnp.asarray(attention_mask) > 0
    return jnp.where(keep, 0.0, _MASK_VALUE).astype(jnp.float32)[:, None, None, :]


def _dense(features: int, config: BertConfig, name: str) -> Callable[[jax.Array], jax.Array]:
    """An `nn.Dense` applied to ``[..., in]`` with the leading axes folded into one.

    XLA on CPU computes the kernel gradient of a ``[batch, seq, in] x [in, out]`` dot (two
    contracting axes in the backward pass) 2-3x slower than the same dot on ``[batch*seq, in]``
    (measured on MiniLM's shapes: 142 ms against 42 ms for a 384 -> 1536 layer), so every dense
    layer sees a 2-D input. The layer, its parameter paths and any interceptor are unchanged.
    Products in `config.dtype` are summed in float32 and returned in `config.dtype`
    (`ftlab.models.dots`, as `ftlab.models.llama` does).
    """
    layer = nn.Dense(
        features,
        dtype=config.dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(0.02),
        dot_general=dots.dot_general,
        promote_dtype=dots.promote_inputs,
        name=name,
    )

    def apply(x: jax.Array) -> jax.Array:
        y = layer(x.reshape(-1, x.shape[-1])).astype(config.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return apply


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps, dtype=config.dtype, param_dtype=jnp.float32, name=name
    )


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then layer norm and dropout.

    Prompt site (`hooks.embeddings`): if the tree holds `prompt` [n_prompt, hidden], its rows are
    prepended to the sequence and go through the same (frozen) layer norm and dropout as the tokens,
    but get no position or token-type embedding, so the real tokens keep positions 0..seq-1 and a
    prompt never eats into `max_position_embeddings`. Passing the prompt through the layer norm
    keeps it in the space of word-embedding rows, which makes Lester et al.'s vocabulary init sound.
    The output is then `[batch, n_prompt + seq, hidden]`.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, *, deterministic: bool):
        cfg = self.config
        seq_len = input_ids.shape[1]
        if seq_len + cfg.position_offset > cfg.max_position_embeddings:
            room = cfg.max_position_embeddings - cfg.position_offset
            raise ValueError(
                f"input_ids has sequence length {seq_len}, but the position table has only "
                f"max_position_embeddings={cfg.max_position_embeddings} rows (room for {room} "
                f"tokens after position_offset={cfg.position_offset}); truncate the input."
            )

        def embed(num, name):
            return nn.Embed(
                num,
                cfg.hidden_size,
                dtype=cfg.dtype,
                param_dtype=jnp.float32,
                embedding_init=nn.initializers.normal(0.02),
                name=name,
            )

        words = embed(cfg.vocab_size, "word_embeddings")(input_ids)
        positions = embed(cfg.max_position_embeddings, "position_embeddings")(
            jnp.arange(seq_len)[None, :] + cfg.position_offset
        )
        x = words + positions
        if cfg.type_vocab_size:
            x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = hooks.embeddings(self, x, table="word_embeddings/embedding")
        x = _layer_norm(cfg, "layer_norm")(x)
        return nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention: `query`, `key`, `value` and `out` projections.

    Prefix site (`hooks.key_value`): if the tree holds `prefix_key` and `prefix_value` [n_prefix,
    hidden], they are the keys and values (already projected, split into heads like the others) of
    `n_prefix` virtual positions placed before the sequence; every query may attend to them (bias
    0).
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x, bias, *, deterministic: bool):
        cfg = self.config
        batch, seq_len, _ = x.shape

        def heads(name):
            y = _dense(cfg.hidden_size, cfg, name)(x)
            return y.reshape(batch, seq_len, cfg.num_heads, cfg.head_dim)

        q, k, v = heads("query"), heads("key"), heads("value")
        k, v, bias = hooks.key_value(self, k, v, bias)
        dropout = None
        if not deterministic and cfg.probs_dropout_rate > 0.0:
            dropout = functools.partial(
                nn.Dropout(cfg.probs_dropout_rate, name="probs_dropout"), deterministic=False
            )
        impl = attention.resolve(cfg.attention, cfg.dtype, dropout=dropout is not None)
        y = attention.dot_product_attention(q, k, v, bias, implementation=impl, dropout=dropout)
        return _dense(cfg.hidden_size, cfg, "out")(y.reshape(batch, seq_len, cfg.hidden_size))


class BertMlp(nn.Module):
    """The feed-forward sublayer: `intermediate` (with exact GELU) then `output`."""

    config: BertConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = _dense(cfg.intermediate_size, cfg, "intermediate")(x)
        # Exact erf GELU, as HF's "gelu"; the tanh approximation shifts MiniLM outputs by ~1e-4.
        h = nn.gelu(h, approximate=False)
        return _dense(cfg.hidden_size, cfg, "output")(h)


class BertLayer(nn.Module):
    """One post-LN transformer layer: `LN(x + attn(x))`, then `LN(h + mlp(h))`.

    Adapter sites (`hooks.sublayer_output`, names `"attention"` and `"output"`): an adapter
    transforms the attention (or MLP) sublayer output after its dropout and before the residual
    add and layer norm, where Houlsby et al. put it.

    Hidden-state site (`hooks.hidden`): the layer's output, edited by the handler a method such
    as ReFT installs; `h` itself without one.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x, bias, *, deterministic: bool, token_mask: jax.Array | None = None):
        cfg = self.config
        a = BertSelfAttention(cfg, name="attention")(x, bias, deterministic=deterministic)
        a = nn.Dropout(cfg.dropout_rate)(a, deterministic=deterministic)
        a = hooks.sublayer_output(self, "attention", a)
        h = _layer_norm(cfg, "attention_layer_norm")(x + a)
        m = BertMlp(cfg, name="mlp")(h)
        m = nn.Dropout(cfg.dropout_rate)(m, deterministic=deterministic)
        m = hooks.sublayer_output(self, "output", m)
        y = _layer_norm(cfg, "output_layer_norm")(h + m)
        if token_mask is None:
            token_mask = jnp.ones(y.shape[:2], jnp.int32)
        return hooks.hidden(self, y, token_mask)


class BertEncoder(nn.Module):
    """BERT encoder without pooler.

    Attributes:
        config: The model's `BertConfig`.
    """

    config: BertConfig

    @nn.compact
    @hooks.track_root
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Encodes a batch of token ids.

        Args:
            input_ids: `[batch, seq]` integer word-piece ids.
            attention_mask: `[batch, seq]`, 1 for real tokens and 0 for padding.
            token_type_ids: `[batch, seq]` segment ids; zeros when omitted.
            deterministic: If False, applies dropout (needs a `"dropout"` rng).

        Returns:
            Hidden states `[batch, seq, hidden]` in the computation dtype; with a soft prompt in
            the tree, `[batch, n_prompt + seq, hidden]` with the prompt positions first.
        """
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be [batch, seq]; got shapes "
                f"{input_ids.shape} and {attention_mask.shape}."
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        elif not self.config.type_vocab_size:
            raise ValueError(
                "token_type_ids was given, but the model has no token-type embeddings "
                "(type_vocab_size=0); leave token_type_ids out."
            )
        x = BertEmbeddings(self.config, name="embeddings")(
            input_ids, token_type_ids, deterministic=deterministic
        )
        token_mask = jnp.asarray(attention_mask)
        n_prompt = x.shape[1] - input_ids.shape[1]
        if n_prompt:
            # Prompt positions are always attended to, but are not tokens (for pooling and ReFT).
            ones = jnp.ones((x.shape[0], n_prompt), token_mask.dtype)
            bias = attention_bias(jnp.concatenate([ones, token_mask], axis=1))
            token_mask = jnp.concatenate([jnp.zeros_like(ones), token_mask], axis=1)
        else:
            bias = attention_bias(attention_mask)
        for i in range(self.config.num_layers):
            x = BertLayer(self.config, name=f"layer_{i}")(
                x, bias, deterministic=deterministic, token_mask=token_mask
            )
        return x


def real_positions(hidden: jax.Array, seq_len: int) -> jax.Array:
    """Drops the soft-prompt positions the encoder puts first: the last `seq_len` positions.

    >>> real_positions(jnp.zeros((1, 5, 2)), 3).shape
    (1, 3, 2)
    """
    return hidden[:, hidden.shape[1] - seq_len :]


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `hidden` over the positions where `mask` is nonzero, in float32.

    Args:
        hidden: `[batch, seq, dim]`.
        mask: `[batch, seq]`, 1 for real tokens and 0 for padding.

    Returns:
        `[batch, dim]` float32. A row with no real tokens gives zeros.

    >>> mean_pool(jnp.array([[[1.0], [3.0], [100.0]]]), jnp.array([[1, 1, 0]])).tolist()
    [[2.0]]
    """
    m = jnp.asarray(mask, jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
    # Clamp as sentence-transformers does, so an all-padding row gives 0 rather than NaN.
    return total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def l2_normalize(x: jax.Array, *, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """Scales `x` to unit L2 norm along `axis` (a zero vector stays zero).

    >>> l2_normalize(jnp.array([3.0, 4.0])).tolist()
    [0.6000000238418579, 0.800000011920929]
    """
    norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
    return x / jnp.maximum(norm, eps)


class BertClassifier(nn.Module):
    """A BERT encoder with a pooled linear head.

    Attributes:
        config: The encoder's `BertConfig`.
        num_classes: Number of output logits.
        pooling: `"mean"` (masked mean, as sentence-transformers) or `"cls"` (first token).
    """

    config: BertConfig
    num_classes: int
    pooling: str = "mean"

    @nn.compact
    @hooks.track_root
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Returns float32 logits `[batch, num_classes]`.

        Pooling covers the real tokens only: soft-prompt positions (if any) are dropped first,
        so `"cls"` still reads the [CLS] token and `"mean"` averages the same positions as the
        base model.
        """
        hidden = BertEncoder(self.config, name="encoder")(
            input_ids, attention_mask, token_type_ids, deterministic=deterministic
        )
        hidden = real_positions(hidden, input_ids.shape[1])
        if self.pooling == "mean":
            pooled = mean_pool(hidden, attention_mask)
        elif self.pooling == "cls":
            pooled = hidden[:, 0].astype(jnp.float32)
        else:
            raise ValueError(
                f"BertClassifier.pooling is {self.pooling!r}; expected 'mean' or 'cls'."
            )
        pooled = nn.Dropout(self.config.dropout_rate)(pooled, deterministic=deterministic)
        return nn.Dense(
            self.num_classes,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(0.02),
            name="head",
        )(pooled)


@functools.partial(jax.jit, static_argnames="config")
def encode_sentences(
    config: BertConfig,
    encoder_params: types.Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
) -> jax.Array:
    """Sentence embeddings as sentence-transformers computes them: mean pool, then L2-normalise.

    Args:
        config: The encoder's config.
        encoder_params: The `BertEncoder` tree (top-level `embeddings`, `layer_0`, ...); for a
            `BertClassifier` tree pass `params["encoder"]`.
        input_ids: `[batch, seq]` int ids.
        attention_mask: `[batch, seq]` 0/1 mask.

    Returns:
        `[batch, hidden]` float32 unit vectors.
    """
    if "embeddings" not in encoder_params:
        raise ValueError(
            "encode_sentences: encoder_params has no 'embeddings' entry (top-level keys: "
            f"{sorted(encoder_params)}); pass the BertEncoder tree, e.g. params['encoder'] of a "
            "BertClassifier, without the {'params': ...} wrapper."
        )
    hidden = BertEncoder(config).apply({"params": encoder_params}, input_ids, attention_mask)
    hidden = real_positions(hidden, input_ids.shape[1])
    return l2_normalize(mean_pool(hidden, attention_mask))
