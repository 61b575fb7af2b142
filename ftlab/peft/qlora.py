"""QLoRA: frozen kernels stay in GGUF's 4-bit Q4_1 blocks (or int8), LoRA trains in full precision.

``quantize`` (or :func:`from_gguf_q4_1` for a kernel that is already Q4_1 in a GGUF file) replaces
a dense module's ``kernel`` [in, out] by three frozen leaves in GGUF's row-block layout::

    decoder/layer_3/attention/query/q4_data   [out, in / 2]    uint8, two 4-bit codes per byte
    decoder/layer_3/attention/query/q4_scale  [out, in / 32]   float16, per block of 32 inputs
    decoder/layer_3/attention/query/q4_min    [out, in / 32]   float16

and `ftlab.peft.dense` computes ``x @ W + bias`` from them inside the traced step, with
``W[o, 32 b + j] = q4_scale[o, b] * code(o, b, j) + q4_min[o, b]`` (ggml's Q4_1: in block ``b``,
byte ``k`` holds code ``j = k`` in its low nibble and ``j = k + 16`` in its high nibble). The
dequantised kernel exists only inside one matmul: it is recomputed in the backward pass
(`jax.checkpoint`) rather than kept as a residual, so the step never holds a full-precision copy
of the base. That is 0.625 bytes a weight against 4 (float32) or 2 (bfloat16). LoRA leaves
(``lora_a``, ``lora_b``) next to a Q4 kernel work as on a plain kernel; :func:`merge` folds them
into a dequantised copy for export.

int8 (``quantize(..., bits=8)``) keeps the kernel's own shape and layout ``(*in axes, *out axes)``
(see `ftlab.peft.dense.Layer`) and works on every layer kind the dense interceptor reaches
(`nn.Dense`, `nn.DenseGeneral`, `nn.Einsum`, `nn.Conv`)::

    decoder/layer_3/attention/query/q8_data   [in, out]   int8 in [-127, 127]
    decoder/layer_3/attention/query/q8_scale  [1, out]    float32, one per output unit

with ``kernel = q8_data * q8_scale`` (symmetric absmax: ``q8_scale = max_in |w| / 127``, codes
rounded to nearest, so ``|w - kernel| <= q8_scale / 2``). The scale has ones over the kernel's
input axes (``(1,) * n_in + out axes``, e.g. [1, 1, 1, 32] for a 3x3 convolution's
[3, 3, 16, 32]), so it broadcasts onto ``q8_data`` without knowing the layer. The interceptor
runs the layer itself on the dequantised kernel in the compute dtype (the layer's ``dtype``, else
its input's), recomputed in the backward pass. That is 1 byte a weight plus ``4 / fan_in``.

References:
    Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale" (int8
    absmax quantisation of weights), https://arxiv.org/abs/2208.07339;
    Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (the idea: a frozen 4-bit
    base, LoRA in 16/32 bits), https://arxiv.org/abs/2305.14314; the Q4_1 block format is
    ggml's (https://github.com/ggml-org/ggml, ``block_q4_1``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftlab.core import partition
from ftlab.peft import dense, lora
from ftlab.types import Params

__all__ = [
    "BLOCK",
    "Q4_DATA",
    "Q4_MIN",
    "Q4_SCALE",
    "Q8_DATA",
    "Q8_SCALE",
    "dequantize",
    "dequantize_tree",
    "from_gguf_q4_1",
    "merge",
    "nbytes",
    "quantize",
    "quantize_kernel",
    "quantize_kernel_int8",
]

Q4_DATA, Q4_SCALE, Q4_MIN = dense.Q4_DATA, dense.Q4_SCALE, dense.Q4_MIN
Q8_DATA, Q8_SCALE = dense.Q8_DATA, dense.Q8_SCALE
BLOCK = 32
# bytes of one GGUF block_q4_1: float16 d, float16 m, 16 bytes of codes
_GGUF_BLOCK_BYTES = 20


def quantize_kernel(kernel: np.ndarray) -> dict[str, np.ndarray]:
    """Quantises one [in, out] kernel to Q4_1 leaves, rounding as ggml's reference does.

    Per block of 32 inputs of one output unit: ``d = (max - min) / 15``, code
    ``min(15, floor((w - min) / d + 0.5))``, and ``d``, ``min`` stored as float16.

    Args:
        kernel: [in, out] float array, ``in`` a multiple of 32.

    Returns:
        ``{"q4_data": uint8 [out, in/2], "q4_scale": f16 [out, in/32], "q4_min": f16 [..]}``.

    Raises:
        ValueError: ``in`` is not a multiple of 32.

    >>> leaves = quantize_kernel(np.linspace(-1, 1, 64 * 2).reshape(64, 2))
    >>> {k: v.shape for k, v in leaves.items()}
    {'q4_data': (2, 32), 'q4_scale': (2, 2), 'q4_min': (2, 2)}
    """
    w = np.asarray(kernel, np.float32)
    if w.ndim != 2 or w.shape[0] % BLOCK:
        raise ValueError(f"Q4_1 needs a 2-D [in, out] kernel with in % {BLOCK} == 0, got {w.shape}")
    d_in, d_out = w.shape
    blocks = w.T.reshape(d_out, d_in // BLOCK, BLOCK)
    lo, hi = blocks.min(-1), blocks.max(-1)
    d = (hi - lo) / 15.0
    inv = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0)
    codes = np.minimum(15, np.floor((blocks - lo[..., None]) * inv[..., None] + 0.5)).astype(
        np.uint8
    )
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return {
        Q4_DATA: packed.reshape(d_out, d_in // 2),
        Q4_SCALE: d.astype(np.float16),
        Q4_MIN: lo.astype(np.float16),
    }


def quantize_kernel_int8(kernel: np.ndarray, *, n_in: int = 1) -> dict[str, np.ndarray]:
    """Quantises one kernel to int8 with a symmetric absmax scale per output unit.

    ``q8_scale = max |w| / 127`` over the ``n_in`` leading (input) axes, codes
    ``round(w / q8_scale)`` (to nearest, ties to even) in [-127, 127]; an all-zero output unit
    gets scale 0 and codes 0. So ``|w - q8_data * q8_scale| <= q8_scale / 2``.

    Args:
        kernel: A float kernel laid out ``(*in axes, *out axes)``.
        n_in: How many leading axes are the input (1 for `nn.Dense`'s [in, out]).

    Returns:
        ``{"q8_data": int8 kernel.shape, "q8_scale": float32 (1,) * n_in + out axes}``.

    Raises:
        ValueError: ``n_in`` leaves no input or no output axis.

    >>> leaves = quantize_kernel_int8(np.array([[1.0, -0.5], [-2.0, 0.25]]))
    >>> leaves["q8_data"].tolist(), leaves["q8_scale"].tolist()
    ([[64, -127], [-127, 64]], [[0.015748031437397003, 0.003937007859349251]])
    """
    w = np.asarray(kernel, np.float32)
    if not 1 <= n_in < w.ndim:
        raise ValueError(f"n_in={n_in} must leave input and output axes of kernel {w.shape}")
    scale = np.max(np.abs(w), axis=tuple(range(n_in)), keepdims=True) / np.float32(127)
    safe = np.where(scale > 0, scale, np.float32(1))
    codes = np.clip(np.rint(w / safe), -127, 127).astype(np.int8)
    return {Q8_DATA: codes, Q8_SCALE: scale.astype(np.float32)}


def from_gguf_q4_1(raw: np.ndarray) -> dict[str, np.ndarray]:
    """Q4_1 leaves from a GGUF tensor's raw blocks, without dequantising them.

    Args:
        raw: The ``GGUFReader`` tensor's ``data``: uint8 [out, in / 32 * 20] (GGUF's numpy
            shape for a Q4_1 weight stored (out, in)).

    Returns:
        The three leaves (see the module docstring); `dequantize` of them equals
        ``gguf.quants.dequantize(raw, Q4_1)`` exactly.

    Raises:
        ValueError: ``raw`` is not a uint8 matrix of whole 20-byte blocks.
    """
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % _GGUF_BLOCK_BYTES:
        raise ValueError(
            f"expected GGUF Q4_1 blocks as uint8 [out, n * {_GGUF_BLOCK_BYTES}], got "
            f"{raw.dtype} {raw.shape}"
        )
    d_out = raw.shape[0]
    blocks = raw.reshape(d_out, -1, _GGUF_BLOCK_BYTES)
    return {
        Q4_DATA: np.ascontiguousarray(blocks[..., 4:]).reshape(d_out, -1),
        Q4_SCALE: np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0],
        Q4_MIN: np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0],
    }


def dequantize(data: jax.Array, scale: jax.Array, minimum: jax.Array, dtype=jnp.float32):
    """The [out, in] weight of Q4_1 leaves (note: GGUF's (out, in), the transpose of a kernel).

    >>> leaves = quantize_kernel(np.ones((32, 1)))
    >>> dequantize(*(leaves[k] for k in (Q4_DATA, Q4_SCALE, Q4_MIN))).shape
    (1, 32)
    """
    return dense.dequantize_q4_1(data, scale, minimum, dtype)


def quantize(
    params: Params,
    *,
    targets: Sequence[str],
    what: str | None = None,
    bits: int = 4,
    layers: Mapping[str, dense.Layer] | None = None,
) -> Params:
    """Replaces the ``kernel`` of every matching module by Q4_1 leaves (or int8, ``bits=8``).

    With ``bits=4`` only 2-D kernels ([in, out], `nn.Dense`'s layout) are quantised: the Q4
    kernel runs on `nn.Dense` only, and the interceptor refuses it on any other layer type.
    With ``bits=8`` every kernel the dense interceptor reaches can be quantised
    (:func:`quantize_kernel_int8`); without ``layers`` the candidates are the 2-D kernels taken
    as [in, out], with ``layers=dense.layers(apply_fn, params, batch)`` any `nn.DenseGeneral`,
    `nn.Einsum` or `nn.Conv` kernel too (its input axes come from the layer).

    Args:
        params: A parameter tree.
        targets: Regexes ``re.fullmatch``-ed against module paths (the kernel path without
            ``/kernel``), e.g. ``r"decoder/layer_\\d+/(attention|mlp)/.*"``.
        what: Prefix of the argument names in errors, e.g. ``"config.peft.qlora"`` for
            ``config.peft.qlora.targets[0]``; by default errors say ``qlora.quantize: targets``.
        bits: 4 (Q4_1 blocks, the default) or 8 (int8 with a scale per output unit).
        layers: The model's layers from `ftlab.peft.dense.layers` (``bits=8`` only).

    Returns:
        A new tree; every other leaf is the same object as before.

    Raises:
        ValueError: a target matches no 2-D kernel (available modules are listed), or a
            matched kernel's input size is not a multiple of 32 (``bits=4``); ``bits`` is not
            4 or 8; ``layers`` with ``bits=4``; a target matches a layer the interceptor
            cannot reach (``bits=8``).
    """
    arg = f"{what}." if what else "qlora.quantize: "
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"{arg}bits must be 4 (Q4_1 blocks) or 8 (int8), got {bits!r}.")
    if bits == 8:
        return _quantize_int8(params, targets=targets, layers=layers, arg=arg)
    if layers is not None:
        raise ValueError(
            f"{arg}layers applies to bits=8 only; Q4_1 (bits=4) runs on nn.Dense's 2-D kernels."
        )
    if isinstance(targets, str):
        raise ValueError(f"{arg}targets must be a list of regexes, got the string {targets!r}.")
    flat = partition.flatten(params)
    modules = [
        n[: -len("/kernel")] for n, v in flat.items() if n.endswith("/kernel") and np.ndim(v) == 2
    ]
    chosen = set()
    for i, pattern in enumerate(targets):
        hits = [m for m in modules if re.fullmatch(pattern, m)]
        if not hits:
            raise ValueError(
                f"{arg}targets[{i}]: pattern {pattern!r} matched no dense kernel; available: "
                f"{', '.join(modules[:6])}{', ...' if len(modules) > 6 else ''}"
            )
        chosen.update(hits)
    out = {}
    for name, leaf in flat.items():
        module = name[: -len("/kernel")] if name.endswith("/kernel") else None
        if module in chosen:
            if np.shape(leaf)[0] % BLOCK:
                raise ValueError(
                    f"{name}: input size {np.shape(leaf)[0]} is not a multiple of {BLOCK}; "
                    f"Q4_1 blocks cannot cover it. Drop {module} from the targets ({arg}targets)."
                )
            for k, v in quantize_kernel(np.asarray(leaf)).items():
                out[f"{module}/{k}"] = v
        else:
            out[name] = leaf
    return partition.unflatten(out)


def _quantize_int8(params, *, targets, layers, arg) -> Params:
    flat = partition.flatten(params)
    chosen = dense.select(flat, targets=targets, layers=layers, arg=arg)
    out = {}
    for name, leaf in flat.items():
        module = name[: -len("/kernel")] if name.endswith("/kernel") else None
        if module in chosen:
            for k, v in quantize_kernel_int8(np.asarray(leaf), n_in=chosen[module].n_in).items():
                out[f"{module}/{k}"] = v
        else:
            out[name] = leaf
    return partition.unflatten(out)


def dequantize_tree(params: Params, *, dtype=jnp.float32) -> Params:
    """Replaces every module's Q4_1 or int8 leaves by a plain ``kernel`` of ``dtype``."""
    flat = partition.flatten(params)
    out = {}
    for name, leaf in flat.items():
        if name.endswith("/" + Q4_DATA):
            module = name[: -len(Q4_DATA) - 1]
            w = dequantize(leaf, flat[f"{module}/{Q4_SCALE}"], flat[f"{module}/{Q4_MIN}"], dtype)
            out[f"{module}/kernel"] = jnp.transpose(w)
        elif name.endswith("/" + Q8_DATA):
            module = name[: -len(Q8_DATA) - 1]
            out[f"{module}/kernel"] = dense.dequantize_q8(leaf, flat[f"{module}/{Q8_SCALE}"], dtype)
        elif not name.endswith(("/" + Q4_SCALE, "/" + Q4_MIN, "/" + Q8_SCALE)):
            out[name] = leaf
    return partition.unflatten(out)


def merge(params: Params, *, alpha: float, rank: int, dtype=jnp.float32) -> Params:
    """Dequantises the base (Q4 or int8) and folds the LoRA factors in: a plain tree for export."""
    return lora.merge(dequantize_tree(params, dtype=dtype), alpha=alpha, rank=rank)


def nbytes(params: Params) -> int:
    """Bytes held by the leaves of ``params`` (to compare a Q4/int8 base with fp32/bf16 copies)."""
    return int(sum(np.dtype(x.dtype).itemsize * np.size(x) for x in jax.tree.leaves(params)))
