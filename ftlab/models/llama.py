"""A Llama-style decoder in Flax linen (pre-RMSNorm, RoPE, grouped-query attention, SwiGLU).

Laid out like SmolLM2 / Llama 2-3 (Hugging Face `LlamaForCausalLM`) with tied input and output
embeddings. The parameter tree of `LlamaForCausalLM` (slash paths, as partition rules and
checkpoints see them; every kernel is `[in, out]`, no biases)::

    decoder/embeddings/word_embeddings/embedding        [vocab, hidden]   (also the LM head)
    decoder/layer_{i}/attention_norm/scale              [hidden]
    decoder/layer_{i}/attention/query/kernel            [hidden, heads * head_dim]
    decoder/layer_{i}/attention/{key,value}/kernel      [hidden, kv_heads * head_dim]
    decoder/layer_{i}/attention/out/kernel              [heads * head_dim, hidden]
    decoder/layer_{i}/mlp_norm/scale                    [hidden]
    decoder/layer_{i}/mlp/{gate,up}/kernel              [hidden, intermediate]
    decoder/layer_{i}/mlp/down/kernel                   [intermediate, hidden]
    decoder/final_norm/scale                            [hidden]

Switches of `LlamaConfig` for other checkpoints of the family (all off by default) add leaves:
`qkv_bias` (Qwen2) `attention/{query,key,value}/bias`; `qk_norm` (Qwen3)
`attention/{query,key}_norm/scale` [head_dim]; `tie_word_embeddings=False` (Llama, Mistral)
`decoder/lm_head/kernel` [hidden, vocab]. `attention_head_dim` decouples the head width from
`hidden_size // num_heads` and `rope_scaling` scales RoPE's frequencies (linear, llama3).

The same model also accepts a *stacked* tree (`stack_layers`): `decoder/layers/...` with a leading
`[num_layers]` axis on every layer leaf, run with `nn.scan`, so one layer body is compiled instead
of `num_layers` (SmolLM2's 30 layers compile in seconds instead of tens of seconds on a CPU).
`generation.generate`, `forward` and `ftlab.icl` stack uniform trees themselves. The decoding
loop also holds bfloat16 layers and KV caches as bit patterns (`pack_layers`, `pack_cache`).

Query and key kernels use Hugging Face's head layout (RoPE rotates the two halves of each head,
"rotate_half"), not llama.cpp's interleaved pairs; `third_party/smollm2.py` un-permutes GGUF files.

Every linear map is an `nn.Dense` applied to a 2-D input (`_dense`), so the dense-layer methods
of `ftlab.peft.dense` (LoRA, DoRA, IA3) apply without editing this file. Parameters are float32;
`LlamaConfig.dtype` is the computation dtype. RMSNorm statistics, RoPE, attention softmax and the
returned logits are float32.

Hook points for structural methods: the model calls the sites of `ftlab.models.hooks` (the
protocol, written down there), as `ftlab.models.bert` does, so the methods find them through
`hooks.discover`. Each reads optional leaves the model's `init` never creates; without them the
model is traced exactly as the base model. A wrong shape is an error naming the leaf. Where the
leaves land in this model:

    decoder/embeddings/prompt                  [n_prompt, hidden]   `hooks.embeddings`
    decoder/layer_{i}/attention/prefix_key     [n_prefix, kv_heads * head_dim]   `hooks.key_value`
    decoder/layer_{i}/attention/prefix_value   [n_prefix, kv_heads * head_dim]
    decoder/layer_{i}/{attention,output}_adapter/...   `hooks.sublayer_output` on the attention
                                 and MLP outputs before each residual add (adapters)
    decoder/layer_{i}/reft/...   `hooks.hidden` on each layer's output (ReFT)

Discover sites on an unrolled tree (`unstack_layers`): under `nn.scan` the layers are one module.
Applied as the root of `apply`, `LlamaForCausalLM` (or a lone `LlamaDecoder`) checks that every
method leaf of its tree was read (`hooks.track_root`).

* The soft prompt is prepended to the embedded tokens when a call starts a sequence (`start=True`,
  the default). Its rows take positions `0..n_prompt-1` and the tokens follow, as in Lester et
  al.'s decoder setting; every token attends to the whole prompt. The returned logits (and hidden
  states) cover the real tokens only: `[batch, seq, ...]`, aligned with `input_ids`. With a KV
  cache the prompt occupies the first `n_prompt` cache slots.
* Prefix keys and values are the per-layer keys and values (after projection and, as Li & Liang's
  `past_key_values`, *after* RoPE: they are used as given, never rotated) of `n_prefix` virtual
  positions in front of the sequence, one row of `kv_heads * head_dim` split into the `kv_heads`
  KV heads like the projected keys (`prefix.init` sizes them from the keys the hook saw). Every
  query attends to them; they do not shift the tokens' positions and take no cache slots.

The model takes an explicit KV cache (`Cache`, from `init_cache`): a call writes its keys and
values at slots `cache.index ...` and returns the new cache, so prefill and decoding are two calls
of the same function with static shapes (see `ftlab.generation`). Positions are counted from the
attention mask (padding does not advance them), so left- and right-padded batches give each row
the same outputs as running it alone. Several sequences packed into one row (`segment_ids`)
likewise each get the outputs they would get alone: attention never crosses them and positions
restart at each.

References:
    Touvron et al., "LLaMA: Open and Efficient Foundation Language Models",
    https://arxiv.org/abs/2302.13971
    Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding",
    https://arxiv.org/abs/2104.09864
    Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
    Checkpoints", https://arxiv.org/abs/2305.13245
    Shazeer, "GLU Variants Improve Transformer", https://arxiv.org/abs/2002.05202
    Allal et al., "SmolLM2: When Smol Goes Big", https://arxiv.org/abs/2502.02737
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftlab import types
from ftlab.models import attention, dots, hooks

# Added to the float32 attention logits of keys a query may not see (padding, the future).
# Finite so that a fully masked row (a padding query) gives a uniform softmax, not NaN.
_MASK_VALUE = -1e9

__all__ = [
    "LAYERS",
    "Cache",
    "LayerCache",
    "LlamaAttention",
    "LlamaConfig",
    "LlamaDecoder",
    "LlamaEmbeddings",
    "LlamaForCausalLM",
    "LlamaLayer",
    "LlamaMlp",
    "RMSNorm",
    "forward",
    "init",
    "init_cache",
    "lm_logits",
    "num_prompt",
    "pack_cache",
    "pack_layers",
    "param_shapes",
    "repeat_cache",
    "rope",
    "stack_if_uniform",
    "stack_layers",
    "unstack_layers",
]

# Name of the stacked-layers subtree (`stack_layers`).
LAYERS = "layers"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama-style decoder with tied embeddings.

    Attributes:
        vocab_size: Number of token ids.
        hidden_size: Width of the residual stream.
        num_layers: Number of decoder layers.
        num_heads: Query heads per layer; must divide `hidden_size`.
        num_kv_heads: Key/value heads (grouped-query attention); must divide `num_heads`.
        intermediate_size: Width of the SwiGLU hidden layer.
        max_position_embeddings: Context length: the most positions (soft prompt, prompt and
            generated tokens together) a sequence may have.
        rope_theta: RoPE base frequency.
        rms_norm_eps: Epsilon of every RMSNorm.
        dtype: Computation dtype (parameters stay float32), e.g. `jnp.bfloat16`.
        attention: Attention kernel for whole sequences, one of `attention.IMPLEMENTATIONS`
            (`"auto"`: cuDNN on a GPU in bfloat16/float16, else the einsum path); cached
            decoding always takes the einsum path.
        tie_word_embeddings: The LM head is the embedding table (SmolLM2); False: a separate
            `decoder/lm_head/kernel` [hidden, vocab].
        attention_head_dim: Width of each head when it is not `hidden_size // num_heads`
            (Qwen3); None: `hidden_size // num_heads`.
        qkv_bias: The query, key and value projections have biases (Qwen2).
        qk_norm: An RMSNorm over each query and key head before RoPE (Qwen3):
            `attention/{query,key}_norm/scale` [head_dim].
        rope_scaling: RoPE frequency scaling as `(name, value)` pairs (hashable, for `jit`):
            `rope_type` `"linear"` (`factor`) or `"llama3"` (`factor`, `low_freq_factor`,
            `high_freq_factor`, `original_max_position_embeddings`), as Hugging Face computes
            them; None: none.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    attention: str = "auto"
    tie_word_embeddings: bool = True
    attention_head_dim: int | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling: tuple[tuple[str, Any], ...] | None = None

    def __post_init__(self):
        attention.check(self.attention, what="LlamaConfig: attention")
        if self.rope_scaling is not None:
            _scaled_inv_freq(np.ones(1), dict(self.rope_scaling))  # validates it
        if self.attention_head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"LlamaConfig: hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}."
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig: num_heads={self.num_heads} is not divisible by "
                f"num_kv_heads={self.num_kv_heads}; each KV head serves a whole group of queries."
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim={self.head_dim} must be even for RoPE.")

    @property
    def head_dim(self) -> int:
        if self.attention_head_dim is not None:
            return self.attention_head_dim
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of the key and value projections: `num_kv_heads * head_dim`."""
        return self.num_kv_heads * self.head_dim

    @classmethod
    def tiny(cls, **overrides) -> LlamaConfig:
        """A few-thousand-parameter config for fast tests (4 query heads sharing 2 KV heads).

        >>> LlamaConfig.tiny().kv_dim
        8
        """
        fields = dict(
            vocab_size=64,
            hidden_size=16,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
        fields.update(overrides)
        return cls(**fields)


class LayerCache(NamedTuple):
    """Keys and values, `[..., batch, size, kv_heads, head_dim]` each (RoPE applied).

    In a `Cache` the leading axis is the layer; a layer sees its own slice.
    """

    key: jax.Array
    value: jax.Array


class Cache(NamedTuple):
    """A KV cache: a pytree, so it passes through `jit`, `lax.scan` and `lax.while_loop`.

    Attributes:
        layers: `LayerCache` of `[num_layers, batch, size, kv_heads, head_dim]` arrays.
        mask: `[batch, size]` int32, 1 where a slot holds a token (or soft-prompt row) that later
            queries may attend to, 0 for padding and unwritten slots.
        index: int32 scalar, the number of slots written so far (the next call writes there).

    Size the cache for the whole sequence (`generate` does): under `jit` a call that would
    write past `size` cannot raise, and `lax.dynamic_update_slice` would clamp its start.
    """

    layers: LayerCache
    mask: jax.Array
    index: jax.Array

    @property
    def size(self) -> int:
        return self.mask.shape[1]


def init_cache(config: LlamaConfig, batch: int, size: int) -> Cache:
    """An empty cache for `batch` sequences of at most `size` slots, in `config.dtype`.

    Args:
        config: The model's config.
        batch: Number of sequences.
        size: Slots per sequence: soft-prompt rows + prompt tokens (padding included) + tokens
            to generate.

    Raises:
        ValueError: `size` exceeds `config.max_position_embeddings`.

    >>> init_cache(LlamaConfig.tiny(), 2, 8).layers.key.shape
    (2, 2, 8, 2, 4)
    """
    if size > config.max_position_embeddings:
        raise ValueError(
            f"init_cache: size={size} exceeds the context length "
            f"config.max_position_embeddings={config.max_position_embeddings}."
        )
    shape = (config.num_layers, batch, size, config.num_kv_heads, config.head_dim)
    return Cache(
        layers=LayerCache(jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype)),
        mask=jnp.zeros((batch, size), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def repeat_cache(cache: Cache, repeats: int) -> Cache:
    """Each sequence's cache `repeats` times in a row (row `b` becomes rows `b * repeats ...
    b * repeats + repeats - 1`): one prompt's cache for several continuations.

    >>> repeat_cache(init_cache(LlamaConfig.tiny(), 2, 8), 3).mask.shape
    (6, 8)
    """
    return Cache(
        LayerCache(*(jnp.repeat(x, repeats, axis=1) for x in cache.layers)),
        jnp.repeat(cache.mask, repeats, axis=0),
        cache.index,
    )


def _dense(
    features: int,
    config: LlamaConfig,
    name: str,
    *,
    use_bias: bool = False,
    out_dtype: Any = None,
) -> Callable[[jax.Array], jax.Array]:
    """An `nn.Dense` (bias-free unless `use_bias`) applied to `[..., in]`, leading axes folded;
    its float32 sums (`ftlab.models.dots`: products and their derivatives in `config.dtype`)
    are returned in `out_dtype` (default `config.dtype`).

    As in `ftlab.models.bert._dense`: XLA on CPU differentiates 2-D dots much faster, and the
    layer, its parameter paths and any `nn.Dense` interceptor are unchanged.
    """
    layer = nn.Dense(
        features,
        use_bias=use_bias,
        dtype=config.dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(0.02),
        dot_general=dots.dot_general,
        promote_dtype=dots.promote_inputs,
        name=name,
    )

    def apply(x: jax.Array) -> jax.Array:
        y = layer(x.reshape(-1, x.shape[-1])).astype(out_dtype or config.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return apply


class RMSNorm(nn.Module):
    """`x / rms(x) * scale`, statistics in float32, output in `dtype`.

    References:
        Zhang & Sennrich, "Root Mean Square Layer Normalization", https://arxiv.org/abs/1910.07467
    """

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.reshape((1,) * (x.ndim - 1) + scale.shape)).astype(self.dtype)


def _scaled_inv_freq(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Hugging Face's RoPE frequency scaling (`linear`, `llama3`) of float64 `inv_freq`."""
    kind = scaling.get("rope_type")
    want = {
        "linear": {"rope_type", "factor"},
        "llama3": {
            "rope_type",
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        },
    }
    if kind not in want:
        raise ValueError(
            f"rope_scaling: rope_type {kind!r} is not implemented; ftlab implements "
            f"{sorted(want)} (or no scaling)."
        )
    if set(scaling) != want[kind]:
        raise ValueError(
            f"rope_scaling: {kind!r} takes exactly {sorted(want[kind])}; got {sorted(scaling)}."
        )
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled)


def rope(
    x: jax.Array,
    positions: jax.Array,
    *,
    theta: float,
    scaling: tuple[tuple[str, Any], ...] | None = None,
) -> jax.Array:
    """Rotary position embedding in Hugging Face's "rotate_half" layout, computed in float32.

    Dimension `j < d/2` of each head is paired with `j + d/2` and rotated by the angle
    `position * theta ** (-2j / d)`.

    Args:
        x: `[batch, seq, heads, head_dim]`.
        positions: `[batch, seq]` integer positions.
        theta: Base frequency.
        scaling: `LlamaConfig.rope_scaling`, or None.

    Returns:
        The rotated `x`, same shape and dtype.

    >>> x = jnp.ones((1, 1, 1, 4))
    >>> bool(jnp.allclose(rope(x, jnp.zeros((1, 1), jnp.int32), theta=1e4), x))
    True
    """
    half = x.shape[-1] // 2
    if scaling is None:
        inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    else:
        # Constants at trace time, so the default path above is traced exactly as before.
        base = theta ** (-np.arange(half, dtype=np.float64) / half)
        inv_freq = jnp.asarray(_scaled_inv_freq(base, dict(scaling)), jnp.float32)
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq[None, None, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class LlamaEmbeddings(nn.Module):
    """The token embedding table, also the tied output projection (`attend`).

    Prompt site (`hooks.embeddings`): `prompt` [n_prompt, hidden] in this module's params is
    prepended by `__call__` when `start` is True.
    """

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.word_embeddings = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=jnp.float32,
            embedding_init=nn.initializers.normal(0.02),
        )

    def __call__(self, input_ids: jax.Array, *, start: bool) -> jax.Array:
        """`[batch, seq]` ids -> `[batch, n_prompt + seq, hidden]` (no prompt unless `start`)."""
        x = self.word_embeddings(input_ids)
        return hooks.embeddings(self, x, table="word_embeddings/embedding", prepend=start)

    def attend(self, hidden: jax.Array) -> jax.Array:
        """Tied LM head: `[..., hidden]` -> float32 logits `[..., vocab]` (`config.dtype`
        products summed in float32)."""
        table = self.word_embeddings.embedding
        return dots.matmul(hidden.astype(self.config.dtype), table, transpose_w=True)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with RoPE: `query`, `key`, `value`, `out` projections.

    Prefix site (`hooks.key_value`): `prefix_key` and `prefix_value` [n_prefix, kv_heads *
    head_dim] (see the module docstring) are attended to by every query.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        bias: jax.Array,
        cache: LayerCache | None,
        index: jax.Array | None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """Attention over the sequence (or the cache).

        Args:
            x: `[batch, seq, hidden]`.
            positions: `[batch, seq]` RoPE positions.
            bias: `[batch, seq, keys]` additive float32 logits bias, keys = seq without a cache
                and the cache size with one.
            cache: This layer's cache, or None.
            index: Slot where `x`'s keys and values are written (with a cache).

        Returns:
            `([batch, seq, hidden], updated cache or None)`.
        """
        cfg = self.config
        batch, seq, _ = x.shape
        kv, hd = cfg.num_kv_heads, cfg.head_dim
        bias_ = cfg.qkv_bias
        q = _dense(cfg.num_heads * hd, cfg, "query", use_bias=bias_)(x)
        q = q.reshape(batch, seq, cfg.num_heads, hd)
        k = _dense(cfg.kv_dim, cfg, "key", use_bias=bias_)(x).reshape(batch, seq, kv, hd)
        v = _dense(cfg.kv_dim, cfg, "value", use_bias=bias_)(x).reshape(batch, seq, kv, hd)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="query_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="key_norm")(k)
        q = rope(q, positions, theta=cfg.rope_theta, scaling=cfg.rope_scaling)
        k = rope(k, positions, theta=cfg.rope_theta, scaling=cfg.rope_scaling)
        if cache is not None:
            start = (0, index, 0, 0)
            cache = LayerCache(
                _cache_write(cache.key, k, start), _cache_write(cache.value, v, start)
            )
            k, v = _unpack_bits(cache.key), _unpack_bits(cache.value)
        k, v, bias = hooks.key_value(self, k, v, bias)
        # A fused kernel for whole sequences; the einsum path for cached decoding.
        impl = (
            "einsum"
            if cache is not None
            else attention.resolve(cfg.attention, cfg.dtype, dropout=False)
        )
        y = attention.dot_product_attention(q, k, v, bias[:, None], implementation=impl)
        y = y.reshape(batch, seq, cfg.num_heads * hd).astype(cfg.dtype)
        return _dense(cfg.hidden_size, cfg, "out")(y), cache


class LlamaMlp(nn.Module):
    """SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        gate = _dense(cfg.intermediate_size, cfg, "gate")(x)
        up = _dense(cfg.intermediate_size, cfg, "up")(x)
        return _dense(cfg.hidden_size, cfg, "down")(nn.silu(gate) * up)


class LlamaLayer(nn.Module):
    """One pre-norm decoder layer: `h = x + attn(norm(x))`, `y = h + mlp(norm(h))`.

    Adapter sites (`hooks.sublayer_output`): the attention output (`"attention"`) and the MLP
    output (`"output"`), each before its residual add. Hidden-state site (`hooks.hidden`): the
    layer's output.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, bias, token_mask, cache=None, index=None):
        cfg = self.config
        a, cache = LlamaAttention(cfg, name="attention")(
            RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="attention_norm")(x),
            positions,
            bias,
            cache,
            index,
        )
        h = x + hooks.sublayer_output(self, "attention", a)
        m = LlamaMlp(cfg, name="mlp")(RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="mlp_norm")(h))
        y = h + hooks.sublayer_output(self, "output", m)
        return hooks.hidden(self, y, token_mask), cache


def _positions_and_bias(
    mask: jax.Array, cache: Cache | None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """RoPE positions `[batch, seq]`, the attention bias and the cache's new key mask.

    `mask` `[batch, seq]` marks the real entries of this call (soft-prompt rows included). A
    real entry's position is the number of real entries before it in the sequence, so padding
    (left, right, or in the cache) never shifts positions. Query slot `i` may attend key slot
    `j` when `j` holds a real entry and `j <= i`; a padding query attends causally to whatever
    is real before it (its output is never used).
    """
    seq = mask.shape[1]
    before = 0 if cache is None else jnp.sum(cache.mask, axis=1, keepdims=True)
    positions = jnp.maximum(before + jnp.cumsum(mask, axis=1) - 1, 0)
    if cache is None:
        keys, q_slot, new_mask = mask, jnp.arange(seq), None
    else:
        new_mask = jax.lax.dynamic_update_slice(
            cache.mask, mask.astype(jnp.int32), (0, cache.index)
        )
        keys, q_slot = new_mask, cache.index + jnp.arange(seq)
    k_slot = jnp.arange(keys.shape[1])
    allowed = (keys[:, None, :] > 0) & (k_slot[None, None, :] <= q_slot[None, :, None])
    bias = jnp.where(allowed, 0.0, _MASK_VALUE).astype(jnp.float32)
    return positions, bias, new_mask


def _segment_positions_and_bias(
    mask: jax.Array, segment_ids: jax.Array, n_prompt: int
) -> tuple[jax.Array, jax.Array]:
    """Positions and attention bias of a packed row: no attention across segments.

    `mask` `[batch, n_prompt + seq]` marks real entries, the first `n_prompt` being soft-prompt
    rows; `segment_ids` `[batch, seq]` label the tokens. A token attends causally to the real
    tokens of its own segment and to the soft prompt; a prompt row to the prompt rows before it.
    An entry's position counts the real entries it may attend (itself included) minus one, so
    every segment's tokens take positions `n_prompt, n_prompt + 1, ...`: each packed
    conversation is computed as if it were alone in its row.
    """
    batch, total = mask.shape
    prompt = jnp.arange(total) < n_prompt  # [total]
    seg = jnp.concatenate([jnp.zeros((batch, n_prompt), segment_ids.dtype), segment_ids], axis=1)
    same = seg[:, :, None] == seg[:, None, :]
    # a prompt row sees the prompt only; a token its own segment and the prompt
    visible = jnp.where(prompt[None, :, None], prompt[None, None, :], same | prompt[None, None, :])
    slot = jnp.arange(total)
    allowed = visible & (mask[:, None, :] > 0) & (slot[None, None, :] <= slot[None, :, None])
    positions = jnp.maximum(jnp.sum(allowed, axis=2) - 1, 0)
    bias = jnp.where(allowed, 0.0, _MASK_VALUE).astype(jnp.float32)
    return positions, bias


class LlamaDecoder(nn.Module):
    """Embeddings, `num_layers` decoder layers, the final RMSNorm and the tied LM head.

    Attributes:
        config: The model's `LlamaConfig`.
    """

    config: LlamaConfig

    @nn.compact
    @hooks.track_root
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        cache: Cache | None = None,
        start: bool = True,
        return_hidden: bool = False,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """Logits (or final hidden states) of the real tokens, and the updated cache.

        See `LlamaForCausalLM.__call__` for the arguments.

        Returns:
            `(float32 logits [batch, seq, vocab] or hidden [batch, seq, hidden] in
            config.dtype, updated cache or None)`.
        """
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {input_ids.shape}.")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {attention_mask.shape}, input_ids {input_ids.shape}; "
                "both must be [batch, seq]."
            )
        embeddings = LlamaEmbeddings(cfg, name="embeddings")
        x = embeddings(input_ids, start=start)
        batch, seq = input_ids.shape
        n_prompt = x.shape[1] - seq
        token_mask = jnp.asarray(attention_mask, jnp.int32)
        mask = token_mask
        if n_prompt:
            ones = jnp.ones((batch, n_prompt), jnp.int32)
            mask = jnp.concatenate([ones, token_mask], axis=1)
            token_mask = jnp.concatenate([jnp.zeros_like(ones), token_mask], axis=1)
        if cache is not None and mask.shape[1] > cache.size:
            raise ValueError(
                f"this call writes {mask.shape[1]} cache slots ({n_prompt} soft-prompt rows + "
                f"{seq} tokens), but the cache has only {cache.size}; make a larger cache."
            )
        if segment_ids is None:
            positions, bias, new_mask = _positions_and_bias(mask, cache)
        else:
            if cache is not None:
                raise ValueError(
                    "segment_ids (packed rows) cannot be used with a cache: decoding extends one "
                    "sequence per row; pass cache=None for a packed forward pass."
                )
            if segment_ids.shape != input_ids.shape:
                raise ValueError(
                    f"segment_ids has shape {segment_ids.shape}, input_ids {input_ids.shape}; "
                    "both must be [batch, seq]."
                )
            positions, bias = _segment_positions_and_bias(
                mask, jnp.asarray(segment_ids, jnp.int32), n_prompt
            )
            new_mask = None
        index = None if cache is None else cache.index
        layer_caches = None if cache is None else cache.layers
        if self.has_variable("params", LAYERS):
            # Stacked form (`stack_layers`): one layer body, compiled once, scanned.
            layer = LlamaLayer
            if any(a.dtype == _BITS for a in jax.tree.leaves(self.variables["params"][LAYERS])):
                # `pack_layers`' bit patterns, sliced per layer as integers, read as bfloat16
                layer = nn.map_variables(LlamaLayer, "params", trans_in_fn=_unpack_bits)
            scanned = nn.scan(
                layer,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=cfg.num_layers,
            )
            x, layer_caches = scanned(cfg, name=LAYERS)(
                x, positions, bias, token_mask, layer_caches, index
            )
        else:
            updated = []
            for i in range(cfg.num_layers):
                layer_cache = None
                if cache is not None:
                    layer_cache = LayerCache(cache.layers.key[i], cache.layers.value[i])
                x, layer_cache = LlamaLayer(cfg, name=f"layer_{i}")(
                    x, positions, bias, token_mask, layer_cache, index
                )
                updated.append(layer_cache)
            if cache is not None:
                layer_caches = jax.tree.map(lambda *a: jnp.stack(a), *updated)
        h = RMSNorm(cfg.rms_norm_eps, cfg.dtype, name="final_norm")(x[:, n_prompt:])
        if cache is not None:
            cache = Cache(layer_caches, new_mask, cache.index + mask.shape[1])
        if return_hidden:
            return h, cache
        if cfg.tie_word_embeddings:
            return embeddings.attend(h), cache
        # float32 logits straight from the float32 sums, as the tied head and `lm_logits` give
        return _dense(cfg.vocab_size, cfg, "lm_head", out_dtype=jnp.float32)(h), cache


class LlamaForCausalLM(nn.Module):
    """A `LlamaDecoder` (named `decoder`) with the tied LM head.

    Attributes:
        config: The model's `LlamaConfig`.
    """

    config: LlamaConfig

    @nn.compact
    @hooks.track_root
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        cache: Cache | None = None,
        start: bool = True,
        return_hidden: bool = False,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, Cache]:
        """Next-token logits for every position.

        Args:
            input_ids: `[batch, seq]` int token ids.
            attention_mask: `[batch, seq]`, 1 for tokens and 0 for padding (left, right or
                both); all ones when omitted.
            cache: A `Cache` to read and extend (from `init_cache`), or None for a plain
                forward pass over `input_ids` alone.
            start: True when `input_ids` start the sequence (the soft prompt, if any, is
                prepended); False for a continuation of the cached sequence.
            return_hidden: Return the final hidden states `[batch, seq, hidden]` (in
                `config.dtype`) instead of logits, e.g. for a chunked cross-entropy with
                `lm_logits`, so the `[batch, seq, vocab]` float32 logits never exist at once.
            segment_ids: `[batch, seq]` int ids of the sequences packed into each row (e.g.
                `ftlab.posttrain.sft.pack`), or None for one sequence per row. A token then
                attends only to earlier real tokens of its own segment (and to a soft prompt,
                which every segment sees as its own start), and positions restart at each
                segment, so every packed sequence gets the outputs it would get alone. Padding
                is still marked by `attention_mask`. Not with a cache.

        Returns:
            float32 logits `[batch, seq, vocab]` (position `t` predicts token `t + 1`), or the
            hidden states with `return_hidden`; with a cache, `(that, updated cache)`.
        """
        out, new_cache = LlamaDecoder(self.config, name="decoder")(
            input_ids,
            attention_mask,
            cache=cache,
            start=start,
            return_hidden=return_hidden,
            segment_ids=segment_ids,
        )
        return out if cache is None else (out, new_cache)


def lm_logits(params: types.Params, hidden: jax.Array) -> jax.Array:
    """The LM head outside the model: `hidden @ embedding.T` (or `@ lm_head`) in float32.

    Args:
        params: A `LlamaForCausalLM` tree (with the top-level `decoder`).
        hidden: `[..., hidden]` from `return_hidden=True`.

    Returns:
        `[..., vocab]` float32 logits: `hidden`'s dtype products summed in float32, as the
        model does.
    """
    if "lm_head" in params["decoder"]:  # untied (`LlamaConfig.tie_word_embeddings=False`)
        return dots.matmul(hidden, params["decoder"]["lm_head"]["kernel"])
    table = params["decoder"]["embeddings"]["word_embeddings"]["embedding"]  # [vocab, hidden]
    return dots.matmul(hidden, table, transpose_w=True)


def num_prompt(params: types.Params) -> int:
    """Number of soft-prompt rows in a `LlamaForCausalLM` tree (0 without a prompt)."""
    prompt = params["decoder"]["embeddings"].get(hooks.PROMPT)
    return 0 if prompt is None else int(prompt.shape[0])


def param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Slash path -> shape of every `LlamaForCausalLM` leaf, computed without tracing.

    (`jax.eval_shape` of `init` gives the same, but traces all layers: seconds for 30 layers.)

    >>> param_shapes(LlamaConfig.tiny())["decoder/layer_0/attention/key/kernel"]
    (16, 8)
    """
    c, d = config, "decoder"
    shapes = {
        f"{d}/embeddings/word_embeddings/embedding": (c.vocab_size, c.hidden_size),
        f"{d}/final_norm/scale": (c.hidden_size,),
    }
    for i in range(c.num_layers):
        layer = f"{d}/layer_{i}"
        shapes.update(
            {
                f"{layer}/attention_norm/scale": (c.hidden_size,),
                f"{layer}/attention/query/kernel": (c.hidden_size, c.num_heads * c.head_dim),
                f"{layer}/attention/key/kernel": (c.hidden_size, c.kv_dim),
                f"{layer}/attention/value/kernel": (c.hidden_size, c.kv_dim),
                f"{layer}/attention/out/kernel": (c.num_heads * c.head_dim, c.hidden_size),
                f"{layer}/mlp_norm/scale": (c.hidden_size,),
                f"{layer}/mlp/gate/kernel": (c.hidden_size, c.intermediate_size),
                f"{layer}/mlp/up/kernel": (c.hidden_size, c.intermediate_size),
                f"{layer}/mlp/down/kernel": (c.intermediate_size, c.hidden_size),
            }
        )
        if c.qkv_bias:
            shapes[f"{layer}/attention/query/bias"] = (c.num_heads * c.head_dim,)
            shapes[f"{layer}/attention/key/bias"] = (c.kv_dim,)
            shapes[f"{layer}/attention/value/bias"] = (c.kv_dim,)
        if c.qk_norm:
            shapes[f"{layer}/attention/query_norm/scale"] = (c.head_dim,)
            shapes[f"{layer}/attention/key_norm/scale"] = (c.head_dim,)
    if not c.tie_word_embeddings:
        shapes[f"{d}/lm_head/kernel"] = (c.hidden_size, c.vocab_size)
    return shapes


def stack_layers(params: types.Params) -> dict:
    """Replaces `decoder/layer_{i}/...` by one `decoder/layers/...` subtree stacked on axis 0.

    The model runs a stacked tree with `nn.scan` over one layer body, so the layer is compiled
    once instead of `num_layers` times (seconds instead of tens of seconds for SmolLM2's 30
    layers on a CPU), with the same outputs. Every layer must hold the same leaves (method
    leaves included: LoRA on all layers stacks, LoRA on some does not). Differentiable: a loss
    may stack inside, so gradients reach the per-layer leaves.

    Raises:
        ValueError: no `decoder/layer_0`, or layers with different leaves or shapes (naming
            the first leaf that differs).

    >>> p = init(LlamaConfig.tiny(), jax.random.key(0))
    >>> stack_layers(p)["decoder"]["layers"]["mlp"]["up"]["kernel"].shape
    (2, 16, 32)
    """
    decoder = dict(params["decoder"])
    names = sorted(
        (k for k in decoder if k.startswith("layer_") and k[6:].isdigit()), key=lambda k: int(k[6:])
    )
    if not names or names != [f"layer_{i}" for i in range(len(names))]:
        raise ValueError(
            f"stack_layers: expected decoder/layer_0 ... decoder/layer_<n-1>, found {names}."
        )
    layers = [decoder.pop(k) for k in names]
    base = jax.tree_util.tree_structure(layers[0])
    for i, layer in enumerate(layers[1:], 1):
        if jax.tree_util.tree_structure(layer) != base or any(
            jnp.shape(a) != jnp.shape(b)
            for a, b in zip(jax.tree.leaves(layer), jax.tree.leaves(layers[0]), strict=True)
        ):
            from ftlab.core import partition  # noqa: PLC0415

            a, b = partition.flatten(layers[0]), partition.flatten(layer)
            diff = sorted(set(a) ^ set(b)) or [k for k in a if jnp.shape(a[k]) != jnp.shape(b[k])]
            raise ValueError(
                f"stack_layers: decoder/layer_{i} differs from decoder/layer_0 at "
                f"{diff[0]!r}; only layers with identical leaves can be stacked."
            )
    decoder[LAYERS] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    return {**params, "decoder": decoder}


def unstack_layers(params: types.Params) -> dict:
    """Inverse of `stack_layers`: `decoder/layers` back to `decoder/layer_{i}`."""
    decoder = dict(params["decoder"])
    stacked = decoder.pop(LAYERS)
    n = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n):
        decoder[f"layer_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return {**params, "decoder": decoder}


_BITS = jnp.uint16  # a bfloat16 leaf of `pack_layers`


def pack_layers(params: types.Params) -> types.Params:
    """A stacked tree whose bfloat16 layer leaves (`decoder/layers/...`) are held as their
    uint16 bit patterns, for a model that is run many times and not differentiated (the
    decoding loop of `ftlab.generation.decode`); the model reads them back as bfloat16.

    Why: XLA on CPU slices a bfloat16 stack per layer by converting the whole stack to float32
    outside the loop and each slice back inside it, every layer of every token (bfloat16
    decoding was no faster than float32); integer slices are plain copies of half float32's
    bytes. Differentiating through the bit patterns would give zero gradients, so it is an
    error. No other leaf changes; `pack_cache` does the same for a KV cache.
    """
    layers = params["decoder"].get(LAYERS)
    if layers is None:
        return params
    return {**params, "decoder": {**params["decoder"], LAYERS: jax.tree.map(_to_bits, layers)}}


def pack_cache(cache: Cache) -> Cache:
    """`cache` with bfloat16 keys and values held as uint16 bit patterns (see `pack_layers`):
    the model writes and reads them as bfloat16, and the scan over stacked layers slices them
    as integers. Not differentiable (an error)."""
    return cache._replace(layers=LayerCache(*(_to_bits(x) for x in cache.layers)))


@jax.custom_jvp
def _to_bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, _BITS) if x.dtype == jnp.bfloat16 else x


@_to_bits.defjvp
def _to_bits_jvp(primals, tangents):
    raise ValueError(
        "llama.pack_layers / pack_cache: packed layers or KV caches cannot be differentiated "
        "(their bit patterns carry no gradient); pack only what is not differentiated, e.g. "
        "under jax.lax.stop_gradient."
    )


def _unpack_bits(tree):
    """`tree` with `_to_bits`' bit patterns read back as bfloat16."""
    return jax.tree.map(
        lambda a: jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == _BITS else a, tree
    )


def _cache_write(cache: jax.Array, x: jax.Array, start: tuple) -> jax.Array:
    """`x` written into `cache` at `start` in the cache's dtype (bit patterns if packed)."""
    x = _to_bits(x.astype(jnp.bfloat16)) if cache.dtype == _BITS else x.astype(cache.dtype)
    return jax.lax.dynamic_update_slice(cache, x, start)


def stack_if_uniform(params: types.Params) -> types.Params:
    """`stack_layers(params)` when the layers hold identical leaves, else `params` unchanged."""
    if LAYERS in params["decoder"]:
        return params
    try:
        return stack_layers(params)
    except ValueError:
        return params


@functools.partial(jax.jit, static_argnames="config")
def forward(
    config: LlamaConfig,
    params: types.Params,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """Compiled `LlamaForCausalLM(config).apply` without a cache: float32 logits.

    Stacks uniform layers first (`stack_if_uniform`), so 30 layers compile as one.

    Args:
        config: The model's config (static).
        params: A `LlamaForCausalLM` tree (unrolled or stacked).
        input_ids: `[batch, seq]` ids.
        attention_mask: `[batch, seq]` 0/1, all ones when None.
        segment_ids: `[batch, seq]` ids of packed sequences (see `LlamaForCausalLM`), or None.

    Returns:
        `[batch, seq, vocab]` float32 logits.
    """
    return LlamaForCausalLM(config).apply(
        {"params": stack_if_uniform(params)}, input_ids, attention_mask, segment_ids=segment_ids
    )


@functools.partial(jax.jit, static_argnums=0)
def init(config: LlamaConfig, rng: types.PRNGKey) -> types.Params:
    """Random `LlamaForCausalLM` parameters (the `params` collection, without the wrapper).

    Kernels and the embedding are N(0, 0.02^2), norm scales one, as the modules' own
    initialisers; drawn directly from `param_shapes` in one random call rather than through
    `Module.init`, which traces the whole forward pass and takes seconds to compile.

    >>> init(LlamaConfig.tiny(), jax.random.key(0))["decoder"]["final_norm"]["scale"].shape
    (16,)
    """
    shapes = param_shapes(config)
    sizes = [math.prod(s) for s in shapes.values()]
    noise = 0.02 * jax.random.normal(rng, (sum(sizes),), jnp.float32)
    flat, start = {}, 0
    for (path, shape), size in zip(shapes.items(), sizes, strict=True):
        if path.endswith("/scale"):
            flat[path] = jnp.ones(shape, jnp.float32)
        elif path.endswith("/bias"):  # as nn.Dense's own init
            flat[path] = jnp.zeros(shape, jnp.float32)
        else:
            flat[path] = noise[start : start + size].reshape(shape)
        start += size
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, last = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree
