"""Scaled dot-product attention shared by the encoder and the decoder, with a choice of kernel.

`dot_product_attention` takes queries `[batch, q_len, heads, head_dim]` and keys and values
`[batch, k_len, kv_heads, head_dim]` (`kv_heads` divides `heads`: grouped-query attention, where
query head `h` reads KV head `h // (heads // kv_heads)`), and an additive bias
`[batch, 1, q_len or 1, k_len]` (padding, causality). The implementations compute the same
function:

- ``"einsum"``: two einsums and a float32 softmax, written out here; the only one that can apply
  dropout to the attention probabilities, and the one the CPU uses.
- ``"xla"``: `jax.nn.dot_product_attention(..., implementation="xla")`.
- ``"cudnn"``: `jax.nn.dot_product_attention(..., implementation="cudnn")`, cuDNN's fused flash
  attention (NVIDIA GPUs, bfloat16/float16 inputs, no probability dropout).
- ``"auto"``: ``"cudnn"`` where it applies (the default backend is a GPU, the inputs are
  bfloat16/float16 and no dropout is asked for), else ``"einsum"``. Chosen when the model is
  traced, so a CPU run and a GPU run of the same config each get their own kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["IMPLEMENTATIONS", "check", "dot_product_attention", "resolve"]

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def check(implementation: str, *, what: str) -> None:
    """Raises ValueError naming ``what`` unless ``implementation`` is one of IMPLEMENTATIONS."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{what}={implementation!r}; expected one of {IMPLEMENTATIONS}.")


def resolve(implementation: str, dtype, *, dropout: bool) -> str:
    """The kernel ``implementation`` stands for here: ``"auto"`` becomes a concrete choice.

    Args:
        implementation: One of IMPLEMENTATIONS.
        dtype: The query/key/value dtype.
        dropout: Whether dropout on the attention probabilities is wanted.

    Raises:
        ValueError: if a fused kernel (``"xla"``/``"cudnn"``) is asked for together with dropout,
            or ``"cudnn"`` for a dtype cuDNN does not take.
    """
    check(implementation, what="attention")
    if implementation == "auto":
        fused_ok = jax.default_backend() == "gpu" and jnp.dtype(dtype) in _CUDNN_DTYPES
        return "cudnn" if fused_ok and not dropout else "einsum"
    if implementation != "einsum" and dropout:
        raise ValueError(
            f"attention={implementation!r} cannot drop out attention probabilities; set the "
            "attention dropout rate to 0 or use attention='einsum' (or 'auto')."
        )
    if implementation == "cudnn" and jnp.dtype(dtype) not in _CUDNN_DTYPES:
        raise ValueError(
            f"attention='cudnn' needs bfloat16 or float16 compute, got {jnp.dtype(dtype)}; set "
            "the model dtype to bfloat16 or use attention='auto'."
        )
    return implementation


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array,
    *,
    implementation: str = "einsum",
    dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """``softmax(q k^T / sqrt(head_dim) + bias) v`` over all heads; see the module docstring.

    Args:
        query: `[batch, q_len, heads, head_dim]`.
        key: `[batch, k_len, kv_heads, head_dim]`.
        value: `[batch, k_len, kv_heads, head_dim]`.
        bias: Additive float logits bias `[batch, 1, q_len or 1, k_len]`.
        implementation: ``"einsum"``, ``"xla"`` or ``"cudnn"`` (``resolve`` turns ``"auto"``
            into one of these).
        dropout: Optional function applied to the attention probabilities (``"einsum"`` only).

    Returns:
        `[batch, q_len, heads, head_dim]` in the dtype of `value`.
    """
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    if implementation in ("xla", "cudnn"):
        if dropout is not None:
            raise ValueError(f"attention={implementation!r} takes no dropout; see resolve().")
        # cuDNN wants the bias with the full [q_len, k_len] extent; batch and heads broadcast.
        bias = jnp.broadcast_to(bias, (batch, 1, q_len, key.shape[1])).astype(query.dtype)
        out = jax.nn.dot_product_attention(
            query, key.astype(query.dtype), value.astype(query.dtype), bias=bias,
            implementation=implementation,
        )  # fmt: skip
        return out.astype(value.dtype)
    if implementation != "einsum":
        raise ValueError(f"implementation={implementation!r}; expected einsum, xla or cudnn.")
    groups = heads // kv_heads
    q = query.reshape(batch, q_len, kv_heads, groups, head_dim)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, key.astype(query.dtype)) / math.sqrt(head_dim)
    # Softmax in float32: bf16 logits lose the small differences that decide attention.
    probs = jax.nn.softmax(logits.astype(jnp.float32) + bias[:, :, None], axis=-1)
    if dropout is not None:  # drawn as [batch, heads, q_len, k_len], whatever the grouping
        shape = probs.shape
        probs = dropout(probs.reshape(batch, heads, q_len, -1)).reshape(shape)
    y = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(value.dtype), value)
    return y.reshape(batch, q_len, heads, head_dim)
