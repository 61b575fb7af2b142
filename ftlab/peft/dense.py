"""One interception of Flax's linear layers shared by the dense-layer PEFT methods.

A dense-layer method stores its leaves next to the kernel it modifies, e.g.
``encoder/layer_3/attention/query/lora_a``, and the model is applied unchanged inside
:func:`intercept`, which changes the output of every linear layer that carries such leaves:
`nn.Dense`, `nn.DenseGeneral` (so `nn.MultiHeadDotProductAttention`), `nn.Einsum` and `nn.Conv`.
Models need no edit. Each kernel is treated as the matrix [in, out] = [fan_in, fan_out] of its
``(*in axes, *out axes)`` layout (:class:`Layer`; a convolution's in axes are its window and input
channels), and every effect below is computed in factored form on the layer's own input. The
leaves it knows (shapes for `nn.Dense`; ``in``/``out`` mean fan_in/fan_out elsewhere):

==================  ===========  ==============================================================
leaf                shape        effect on ``y = x @ kernel + bias``
==================  ===========  ==============================================================
``lora_a, lora_b``  [in, r],     LoRA: ``y + s * x @ lora_a @ lora_b`` with ``s = lora_scale``
                    [r, out]
``dora_m``          [out]        DoRA (with the LoRA pair): ``m / ||kernel + s a b||_c`` times
                                 ``x @ kernel + s x a b``, plus bias (:func:`dora_column_norm`)
``ia3_scale_in``    [in]         IA3 on the input: ``x -> x * ia3_scale_in`` before all of the above
``ia3_scale``       [out]        IA3 on the output: the result (bias included) ``* ia3_scale``
``q4_data``,        [out, in/2]  QLoRA: the frozen kernel itself, in Q4_1 blocks instead of
``q4_scale``,       [out, in/32] ``kernel``; dequantised inside the matmul and recomputed in the
``q4_min``          [out, in/32] backward pass (:func:`dequantize_q4_1`, `ftlab.peft.qlora`)
``q8_data``,        kernel's     the frozen kernel as int8 codes instead of ``kernel``; the
``q8_scale``        shape;       layer runs on ``q8_data * q8_scale`` (:func:`dequantize_q8`) in
                    (1,)*n_in +  the compute dtype, recomputed in the backward pass; one scale
                    out axes     per output unit, ones over the input axes (`ftlab.peft.qlora`)
==================  ===========  ==============================================================

Any combination on one module composes in that order: IA3 wraps the (LoRA- or DoRA-) adapted
linear map.

Which method runs on which layer kind (merge: ``lora.merge``/``unmerge``, ``dora.merge``,
``ia3.merge``/``unmerge``, each equal to the intercepted model within float tolerance):

=============  ========  ================  ======================  ===========================
method         Dense     DenseGeneral      Einsum                  Conv
=============  ========  ================  ======================  ===========================
LoRA           yes       yes               yes (1)                 yes: (window x in, out) (2)
DoRA           yes       yes               yes (1)                 yes (2), norm over window x in
IA3 output     [out]     [prod(features)]  [prod(out axes)] (1)    [out] (2)
IA3 input      [in]      [prod(in axes)]   [prod(contracted)] (1)  [1, ..., 1, in_channels] (2)
QLoRA (Q4)     yes       refused           refused                 refused
int8 base      yes       yes               yes (1)                 yes (2)
=============  ========  ================  ======================  ===========================

(1) The equation must put the contracted axes first in the kernel and end the output with the
kernel's other axes in kernel order (``"btd,dhk->bthk"``, not ``"btd,hdk->bthk"``); a kernel
axis shared with the input and output (a batched einsum) or an ellipsis in the kernel is refused.
(2) A kernel ``mask`` is refused. A grouped or depthwise convolution (``feature_group_count``
g > 1, kernel [*window, in / g, out]) takes every method: the update of the (window x in / g,
out) matrix is applied per group, and ``ia3_scale_in`` covers all ``in`` channels.
`nn.DenseGeneral` with ``batch_dims`` is refused. Refusals name the layer (at ``init`` and, for
leaves added by hand, when applied); any other layer (`nn.ConvTranspose`, `nn.ConvLocal`, a
module reading its own kernel) is not intercepted, and :func:`wrap_apply` raises naming the
leaves it left unused.

Inconsistent leaves (``dora_m`` without the LoRA pair, one of the pair alone, a shape that does
not fit the kernel) raise an error naming the module path.

To select targets by layer type, or to adapt kernels that are not 2-D, ``init`` functions take
``layers=dense.layers(apply_fn, params, batch)``: an abstract trace that records each layer's
type and kernel layout (the tree alone cannot tell a [in, heads, dim] projection from a 1-D
convolution's [window, in, out]).

Hyperparameters that are not leaves (LoRA's ``alpha / rank`` scale, DoRA's gradient option) travel
in the interceptor's closure, so they are static under `jax.jit` and can never become trainable by
accident.

Use it inside the function you trace, which :func:`wrap_apply` does for you::

    apply = dense.wrap_apply(apply, lora_scale=alpha / rank)   # apply(params, batch, rng)
    step = jax.jit(train.make_train_step(classification.make_loss_fn(apply), tx))

Entering :func:`intercept` *around* a call of an already-jitted function is a trap: jit caches the
trace, and the interceptor only acts while tracing, so a function first traced outside the
interceptor keeps running without the LoRA term (and vice versa). Put the interceptor inside.

References:
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
    https://arxiv.org/abs/2106.09685
    Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", https://arxiv.org/abs/2402.09353
    Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
    Learning" (IA3), https://arxiv.org/abs/2205.05638
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftlab.core import sites

__all__ = [
    "ALL_LEAVES",
    "DORA_M",
    "IA3_SCALE",
    "IA3_SCALE_IN",
    "KINDS",
    "LORA_A",
    "LORA_B",
    "Layer",
    "Options",
    "dequantize_q4_1",
    "dequantize_q8",
    "dora_column_norm",
    "dora_gain",
    "intercept",
    "kernel_matrix_shape",
    "layers",
    "select",
    "wrap_apply",
]
LORA_A, LORA_B = "lora_a", "lora_b"
DORA_M = "dora_m"
IA3_SCALE, IA3_SCALE_IN = "ia3_scale", "ia3_scale_in"
# A frozen kernel kept in GGUF's Q4_1 blocks instead of `kernel` (see `ftlab.peft.qlora`).
Q4_DATA, Q4_SCALE, Q4_MIN = "q4_data", "q4_scale", "q4_min"
Q4_LEAVES = (Q4_DATA, Q4_SCALE, Q4_MIN)
# A frozen kernel kept as int8 with a float scale per output unit (`ftlab.peft.qlora`, bits=8).
Q8_DATA, Q8_SCALE = "q8_data", "q8_scale"
Q8_LEAVES = (Q8_DATA, Q8_SCALE)
# The core's registry knows only names it was given; the int8 leaves are method leaves too, so a
# model that never reads them is an error (`ftlab.core.sites.tracking`).
sites.register(Q8_LEAVES, "int8 base")
# The low-rank leaves: `lora.init` refuses a module that already holds one of these. (Kept to the
# LoRA pair so that LoRA composes with IA3 on one module; DoRA trees always hold the pair too.)
METHOD_LEAVES = (LORA_A, LORA_B)
# Every leaf name a dense-layer method may add next to a kernel, to tell method leaves from base
# leaves.
ALL_LEAVES = (LORA_A, LORA_B, DORA_M, IA3_SCALE, IA3_SCALE_IN, *Q4_LEAVES, *Q8_LEAVES)


@dataclasses.dataclass(frozen=True)
class Options:
    """Static (non-leaf) hyperparameters of the dense-layer methods.

    Attributes:
        lora_scale: The LoRA factor ``alpha / rank`` multiplying ``x @ lora_a @ lora_b`` (also
            inside DoRA); None when no LoRA leaves are expected (meeting one is then an error).
        dora_exact_norm_grad: If True, differentiate through DoRA's column norm
            ``||kernel + s a b||_c``; if False (the default, DoRA section 4.3) the norm is a
            constant in the backward pass (`jax.lax.stop_gradient`), see :func:`dora_column_norm`.
        lora_dropout: Dropout rate on the input of the low-rank branch only,
            ``s * dropout(x) @ lora_a @ lora_b`` (as HF PEFT's ``lora_dropout``); the frozen
            ``x @ kernel`` sees the undropped input. Active only when the model is applied with
            a ``"dropout"`` PRNG stream (training); without one (evaluation) it is the identity.
        lora_rank: The rank the ``lora_scale`` was computed for; when given, a LoRA pair of
            another rank is an error (its scale would be wrong) rather than applied.
    """

    lora_scale: float | None = None
    dora_exact_norm_grad: bool = False
    lora_dropout: float = 0.0
    lora_rank: int | None = None

    def __post_init__(self):
        if self.lora_rank is not None and (
            isinstance(self.lora_rank, bool)
            or not isinstance(self.lora_rank, int)
            or self.lora_rank < 1
        ):
            raise ValueError(f"lora_rank must be an integer >= 1, got {self.lora_rank!r}.")
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}.")
        if not isinstance(self.dora_exact_norm_grad, bool):
            raise TypeError(
                "dora_exact_norm_grad must be a bool, got "
                f"{type(self.dora_exact_norm_grad).__name__}."
            )
        if self.lora_scale is not None:
            if isinstance(self.lora_scale, bool) or not isinstance(self.lora_scale, (int, float)):
                raise TypeError(
                    f"lora_scale must be a Python number (alpha / rank), got "
                    f"{type(self.lora_scale).__name__}; it is static, not a traced array."
                )
            if not math.isfinite(self.lora_scale):
                raise ValueError(f"lora_scale must be finite, got {self.lora_scale}.")


def _module_path(module: nn.Module) -> str:
    scope = getattr(module, "scope", None)
    return "/".join(scope.path) if scope is not None and scope.path else (module.name or "<root>")


def dora_column_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, *, scale: float) -> jax.Array:
    """DoRA's per-output-unit norm ``||kernel + scale * a @ b||_c``, shape [out], in float32.

    ftlab kernels are [in, out], so the norm runs over the ``in`` axis (the paper's column norm of
    its [d, k] weight; torch's row norm of the [out, in] weight). The [in, out] matrix
    ``kernel + scale * a @ b`` is formed here, in the forward pass: the norm of the adapted weight
    needs it, whatever the implementation (DoRA's inherent cost over LoRA). `dora.init`,
    `dora.merge` and the interceptor all call this one function, so that the model starts out
    equal to the base model (bit for bit where the reduction rounds alike; see `dora.init`).

    Args:
        kernel: The frozen kernel W, [in, out].
        a: ``lora_a``, [in, r].
        b: ``lora_b``, [r, out].
        scale: LoRA's ``alpha / rank``.

    Returns:
        The float32 norms, [out].

    References:
        Liu et al. 2024, https://arxiv.org/abs/2402.09353 (equation 5)

    >>> dora_column_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]]), jnp.zeros((2, 1)),
    ...                  jnp.zeros((1, 2)), scale=2.0).tolist()
    [5.0, 1.0]
    """
    f32 = jnp.float32
    # Full float32 precision: on TPU/GPU the default may round to bf16, and `dora.merge` must
    # agree with the intercepted forward pass to float tolerance.
    ab = jnp.matmul(a.astype(f32), b.astype(f32), precision=jax.lax.Precision.HIGHEST)
    v = kernel.astype(f32) + ab * scale
    return jnp.sqrt(jnp.sum(v * v, axis=0))


def dora_gain(m: jax.Array, norm: jax.Array) -> jax.Array:
    """``m / norm``, the per-output factor DoRA puts on ``kernel + s a b``; 0/0 columns give m.

    A column whose adapted weight is all zeros contributes nothing whatever its factor, so the
    guard only keeps NaNs out of the forward and backward pass.

    >>> dora_gain(jnp.array([2.0, 3.0]), jnp.array([4.0, 0.0])).tolist()
    [0.5, 3.0]
    """
    return m / jnp.where(norm > 0, norm, jnp.ones_like(norm))


def _broadcast_last(v: jax.Array, like: jax.Array) -> jax.Array:
    # Explicit reshape: ftlab tests run with jax_numpy_rank_promotion="raise".
    return v.reshape((1,) * (like.ndim - 1) + v.shape)


def dequantize_q4_1(data: jax.Array, scale: jax.Array, minimum: jax.Array, dtype) -> jax.Array:
    """The [out, in] weight of Q4_1 blocks (ggml's ``block_q4_1``), as ``dtype``.

    Args:
        data: uint8 [out, in / 2]; per block of 32 inputs, byte k holds code k (low nibble)
            and code k + 16 (high nibble).
        scale: float16 [out, in / 32], the blocks' ``d``.
        minimum: float16 [out, in / 32], the blocks' ``m``; the weight is ``d * code + m``.
        dtype: The result's dtype.

    Returns:
        [out, in] array.
    """
    d_out, n_blocks = scale.shape
    q = data.reshape(d_out, n_blocks, 16)
    codes = jnp.concatenate([q & 0x0F, q >> 4], axis=-1).astype(jnp.float32)
    w = codes * scale.astype(jnp.float32)[..., None] + minimum.astype(jnp.float32)[..., None]
    return w.reshape(d_out, n_blocks * 32).astype(dtype)


def _q4_matmul(x, data, scale, minimum):
    w = dequantize_q4_1(data, scale, minimum, x.dtype)
    return jnp.einsum("...i,oi->...o", x, w)


# Recompute the dequantised weight in the backward pass instead of saving it: the step then never
# holds a full-precision copy of a Q4 base kernel beyond the one matmul using it.
_q4_matmul_remat = jax.checkpoint(_q4_matmul, policy=jax.checkpoint_policies.nothing_saveable)


def dequantize_q8(data: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """The kernel of int8 leaves, ``data * scale`` computed in float32 and cast to ``dtype``.

    Args:
        data: int8, the kernel's own shape ``(*in axes, *out axes)``.
        scale: float, ``(1,) * n_in + out axes``: one scale per output unit, broadcast over the
            input axes (so no layer type is needed to apply it).
        dtype: The result's dtype.

    Returns:
        The kernel, shape ``data.shape``.

    >>> dequantize_q8(jnp.array([[127, -1], [0, 2]], jnp.int8), jnp.array([[0.5, 2.0]]),
    ...               jnp.float32).tolist()
    [[63.5, -2.0], [0.0, 4.0]]
    """
    return (data.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)


# -- layer kinds ------------------------------------------------------------------------------

# The linen layers the interceptor reaches, by the names `layer_types` arguments accept.
KINDS: dict[str, type] = {
    "Dense": nn.Dense,
    "DenseGeneral": nn.DenseGeneral,
    "Einsum": nn.Einsum,
    "Conv": nn.Conv,
}


@dataclasses.dataclass(frozen=True)
class Layer:
    """One linear layer as the dense-layer methods see it (recorded by :func:`layers`).

    Every supported kernel is laid out as ``(*in axes, *out axes)``: the first ``n_in`` axes are
    contracted with the input (for a convolution: the window and the input channels), the rest
    are the output features. The methods treat it as the matrix ``[fan_in, fan_out]`` of that
    split, e.g. a ``DenseGeneral`` query kernel [768, 12, 64] as [768, 768], a 3x3 ``Conv``
    kernel [3, 3, 16, 32] as [144, 32].

    Attributes:
        path: The module path (slash-joined scope path, the kernel's path without ``/kernel``).
        kind: ``"Dense"``, ``"DenseGeneral"``, ``"Einsum"`` or ``"Conv"`` (else the class name).
        kernel_shape: The kernel's shape.
        n_in: How many leading kernel axes are contracted with the input.
        in_features: The size of IA3's input vector ``ia3_scale_in``: ``fan_in``, except for a
            convolution, where it is the number of input channels.
        unsupported: Why the dense-layer methods cannot reach this layer, or None.
    """

    path: str
    kind: str
    kernel_shape: tuple[int, ...]
    n_in: int
    in_features: int
    unsupported: str | None = None

    @property
    def fan_in(self) -> int:
        """Rows of the kernel as a matrix: the product of its input axes."""
        return math.prod(self.kernel_shape[: self.n_in])

    @property
    def fan_out(self) -> int:
        """Columns of the kernel as a matrix: the product of its output axes."""
        return math.prod(self.kernel_shape[self.n_in :])

    @property
    def in_scale_shape(self) -> tuple[int, ...]:
        """The shape of IA3's ``ia3_scale_in``: ``(fan_in,)``, for a convolution
        ``(1, ..., 1, in_channels)``, which broadcasts over the kernel's window axes (and so
        tells `ftlab.peft.ia3.merge` which axis it scales without knowing the layer type)."""
        if self.kind == "Conv":
            return (1,) * (self.n_in - 1) + (self.in_features,)
        return (self.fan_in,)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """How one call of a supported layer contracts its input (see :class:`Layer`)."""

    layer: Layer
    in_sizes: tuple[int, ...]  # the kernel's input axes
    out_sizes: tuple[int, ...]  # the kernel's output axes, which are also y's trailing axes
    x_axes: tuple[int, ...]  # the axes of x that ia3_scale_in scales (in kernel order)
    x_sizes: tuple[int, ...]
    einsum: tuple[str, str, str, str] | None = None  # lhs, kernel in-letters, out prefix, spare


def _kind(module: nn.Module) -> str | None:
    for name, cls in KINDS.items():
        if isinstance(module, cls):
            return name
    return None


def _einsum_str(module: nn.Einsum, args, kwargs) -> str:
    eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str
    return (eq or "").replace(" ", "")


def _geometry(module: nn.Module, x: jax.Array, kernel_shape, args=(), kwargs=None) -> _Geometry:
    """The layout of ``module``'s kernel for the input ``x``; ``layer.unsupported`` says why not.

    Returns None where ``x`` does not fit the kernel (the layer then raises its own error).
    """
    kind = _kind(module)
    path = _module_path(module)
    kernel_shape = tuple(int(d) for d in kernel_shape)
    nd = len(kernel_shape)

    def refuse(why: str, n_in: int = 1) -> _Geometry:
        layer = Layer(path, kind, kernel_shape, n_in, math.prod(kernel_shape[:n_in]), why)
        return _Geometry(layer, (), (), (), ())

    if kind == "Dense":
        layer = Layer(path, kind, kernel_shape, 1, kernel_shape[0])
        return _Geometry(layer, kernel_shape[:1], kernel_shape[1:], (x.ndim - 1,), x.shape[-1:])
    if kind == "DenseGeneral":
        if module.batch_dims:
            return refuse(
                f"nn.DenseGeneral with batch_dims={module.batch_dims} (a kernel per batch "
                "entry) is not a single linear map"
            )
        axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
        axis = tuple(a % x.ndim for a in axis)
        n_in = len(axis)
        layer = Layer(path, kind, kernel_shape, n_in, math.prod(kernel_shape[:n_in]))
        return _Geometry(
            layer, kernel_shape[:n_in], kernel_shape[n_in:], axis, tuple(x.shape[a] for a in axis)
        )
    if kind == "Einsum":
        eq = _einsum_str(module, args, kwargs or {})
        lhs, rest = eq.split(",")
        ker, out = rest.split("->")
        if "." in ker or len(set(ker)) != len(ker):
            return refuse(
                f"nn.Einsum {eq!r}: the kernel operand has an ellipsis or a repeated axis"
            )
        batch = [c for c in ker if c in lhs and c in out]
        summed = [c for c in ker if c not in lhs and c not in out]
        if batch or summed:
            what = (
                f"kernel axes {''.join(batch)!r} are also batch axes of the input and output"
                if batch
                else f"kernel axes {''.join(summed)!r} are summed out"
            )
            return refuse(
                f"nn.Einsum {eq!r}: {what}; LoRA needs the kernel as a matrix "
                "(contracted axes, output axes)"
            )
        ins = "".join(c for c in ker if c in lhs)
        outs = "".join(c for c in ker if c not in lhs)
        if not ins or not outs:
            return refuse(
                f"nn.Einsum {eq!r}: the kernel has no {'contracted' if not ins else 'output'} "
                "axis, so it is no (contracted axes, output axes) matrix"
            )
        if ker != ins + outs or not out.endswith(outs):
            rest = "".join(c for c in out if c not in outs)
            suggestion = f"{lhs},{ins}{outs}->{rest}{outs}"
            return refuse(
                f"nn.Einsum {eq!r}: the dense-layer methods need the kernel's contracted axes "
                f"({ins!r}) first and its output axes ({outs!r}) last in the kernel, and the "
                f"output ending in them in that order, e.g. {suggestion!r}"
            )
        # Positions in x of the contracted letters (letters after '...' count from the end).
        pre, _, post = lhs.partition("...")
        pos = {c: i for i, c in enumerate(pre)}
        if "..." in lhs:
            pos |= {c: x.ndim - len(post) + i for i, c in enumerate(post)}
        x_axes = tuple(pos[c] for c in ins)
        spare = next(
            c for c in "rzyxwvutsqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in eq
        )
        n_in = len(ins)
        layer = Layer(path, kind, kernel_shape, n_in, math.prod(kernel_shape[:n_in]))
        return _Geometry(
            layer,
            kernel_shape[:n_in],
            kernel_shape[n_in:],
            x_axes,
            tuple(x.shape[a] for a in x_axes),
            (lhs, ins, out[: len(out) - len(outs)], spare),
        )
    if kind == "Conv":
        n_in = nd - 1
        if module.mask is not None:
            return refuse("nn.Conv with a kernel mask", n_in)
        # A grouped convolution's kernel [*window, in / groups, out] is still one matrix
        # (window x in / groups, out); ia3_scale_in scales all `in` input channels.
        layer = Layer(path, kind, kernel_shape, n_in, kernel_shape[-2] * module.feature_group_count)
        return _Geometry(layer, kernel_shape[:-1], kernel_shape[-1:], (x.ndim - 1,), x.shape[-1:])
    return refuse(f"{type(module).__name__} is not one of {', '.join(KINDS)}")


def _input(args, kwargs):
    return args[0] if args else kwargs["inputs"]


def layers(apply_fn: Callable, *args, **kwargs) -> dict[str, Layer]:
    """The linear layers ``apply_fn(*args, **kwargs)`` calls, by module path, without computing.

    The model is traced abstractly (`jax.eval_shape`) with an interceptor that records every
    `nn.Dense`, `nn.DenseGeneral`, `nn.Einsum` and `nn.Conv` call (and any other module holding
    a ``kernel``, as unsupported). `ftlab.peft.lora.init` and the other ``init`` functions take
    the result as ``layers=`` to reach kernels that are not plain [in, out] matrices and to
    select targets by ``layer_types``.

    Args:
        apply_fn: Any function that applies a linen model, e.g. ``lambda p, x: model.apply(
            {"params": p}, x)``; the module paths inside the apply must be the parameter tree's.
        *args: Its arguments (arrays or `jax.ShapeDtypeStruct`).
        **kwargs: Its keyword arguments.

    Returns:
        ``{module_path: Layer}`` in call order.

    >>> model = nn.Conv(4, (3, 3))
    >>> p = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 2)))["params"]
    >>> found = layers(lambda p, x: model.apply({"params": p}, x), p, jnp.ones((1, 8, 8, 2)))
    >>> [(k, v.kind, v.fan_in, v.fan_out) for k, v in found.items()]
    [('', 'Conv', 18, 4)]
    """
    found: dict[str, Layer] = {}

    def record(next_fun, a, kw, context):
        module = context.module
        if context.method_name == "__call__" and module.has_variable("params", "kernel"):
            shape = module.get_variable("params", "kernel").shape
        elif (
            context.method_name == "__call__"
            and _kind(module) == "Dense"
            and (module.has_variable("params", Q4_DATA))
        ):
            shape = _kernel_shape(module, {Q4_DATA})
        elif context.method_name == "__call__" and module.has_variable("params", Q8_DATA):
            shape = _kernel_shape(module, {Q8_DATA})
        else:
            return next_fun(*a, **kw)
        geo = _geometry(module, _input(a, kw), shape, a, kw)
        path = "/".join(module.scope.path)  # "" for a bare layer applied on its own
        found.setdefault(path, dataclasses.replace(geo.layer, path=path))
        return next_fun(*a, **kw)

    # Arrays become abstract arguments (not constants of the trace), so nothing is computed.
    leaves, treedef = jax.tree.flatten((args, kwargs))
    arrays = [i for i, leaf in enumerate(leaves) if hasattr(leaf, "shape")]

    def run(*abstract):
        filled = list(leaves)
        for i, value in zip(arrays, abstract, strict=True):
            filled[i] = value
        a, kw = jax.tree.unflatten(treedef, filled)
        return apply_fn(*a, **kw)

    with nn.intercept_methods(record):
        jax.eval_shape(run, *[leaves[i] for i in arrays])
    return found


def _kind_name(t: str | type, arg: str) -> str:
    if isinstance(t, str) and t in KINDS:
        return t
    for name, cls in KINDS.items():
        if t is cls:
            return name
    raise ValueError(
        f"{arg}: {t!r} is not a layer type the dense-layer methods reach; use one of "
        f"{', '.join(KINDS)} (or the nn classes)."
    )


def _generic(paths) -> list[str]:
    # Collapse layer indices so a 24-layer model lists a handful of patterns, not 144 paths.
    return list(dict.fromkeys(re.sub(r"_\d+(?=/|$)", r"_\\d+", p) for p in paths))


def _summarize(paths, limit: int = 12) -> str:
    generic = _generic(paths)
    shown = ", ".join(generic[:limit])
    return shown + (f", ... ({len(generic) - limit} more)" if len(generic) > limit else "")


def select(
    flat: Mapping[str, Any],
    *,
    targets: Sequence[str] = (),
    layer_types: Sequence[str | type] = (),
    layers: Mapping[str, Layer] | None = None,
    arg: str = "",
    allow_empty: bool = False,
) -> dict[str, Layer]:
    """The layers of a flat parameter tree chosen by path regexes or by layer type.

    A layer is chosen when its module path ``re.fullmatch``-es one of ``targets`` or its kind is
    in ``layer_types``. Without ``layers`` (from :func:`layers`), the candidates are the 2-D
    ``kernel`` leaves, taken as [in, out] matrices (``nn.Dense``'s layout); kernels of other
    ranks need ``layers`` to say how they split into input and output axes.

    Args:
        flat: The parameter tree as ``{slash_path: leaf}`` (`ftlab.core.partition.flatten`).
        targets: Module path regexes.
        layer_types: Kinds (``"Dense"``, ``"DenseGeneral"``, ``"Einsum"``, ``"Conv"`` or the
            classes); needs ``layers``.
        layers: The model's layers from :func:`layers`, or None.
        arg: Prefix for argument names in errors, e.g. ``"lora.init: "`` or ``"config.peft."``.
        allow_empty: Whether choosing nothing at all (no targets, no types) is allowed.

    Returns:
        ``{module_path: Layer}`` in tree order.

    Raises:
        ValueError: naming the argument: a pattern or type that claims no layer, an invalid
            regex, ``targets`` given as a string, ``layer_types`` without ``layers``, a chosen
            layer the methods cannot reach, or neither argument given.
    """
    if isinstance(targets, str):
        raise ValueError(
            f"{arg}targets must be a list of regexes, got the string {targets!r}; "
            f"write [{targets!r}]."
        )
    if isinstance(layer_types, (str, type)):
        layer_types = [layer_types]
    kinds = [_kind_name(t, f"{arg}layer_types[{i}]") for i, t in enumerate(layer_types)]
    if not targets and not kinds and not allow_empty:
        raise ValueError(
            f"{arg}targets and {arg if arg.endswith('.') else ''}layer_types are both empty; "
            f"name at least one module regex or layer type ({', '.join(KINDS)})."
        )
    if kinds and layers is None:
        raise ValueError(
            f"{arg}layer_types needs layers=dense.layers(apply_fn, params, ...) to know each "
            "layer's type; the parameter tree alone does not say."
        )
    kernels = [
        k[: -len("/kernel")] if k != "kernel" else ""
        for k in flat
        if k == "kernel" or k.endswith("/kernel")
    ]
    q4 = [k[: -len(f"/{Q4_DATA}")] for k in flat if k.endswith(f"/{Q4_DATA}")]
    if layers is None:
        candidates = {
            m: Layer(
                m,
                "Dense",
                tuple(np.shape(flat[f"{m}/kernel"])),
                1,
                np.shape(flat[f"{m}/kernel"])[0],
            )
            for m in kernels
            if m and np.ndim(flat[f"{m}/kernel"]) == 2
        }
        others = {m: np.shape(flat[f"{m}/kernel"]) for m in kernels if m and m not in candidates}
    else:
        candidates = {m: layers[m] for m in [*kernels, *q4] if m in layers}
        others = {}
    compiled = []
    for i, pattern in enumerate(targets):
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"{arg}targets[{i}]: invalid regex {pattern!r}: {e}") from None
    chosen: set[str] = set()
    for i, regex in enumerate(compiled):
        hits = [m for m in candidates if regex.fullmatch(m)]
        if not hits:
            higher = [f"{m} {list(s)}" for m, s in others.items() if regex.fullmatch(m)]
            hint = (
                f" It matches kernels that are not [in, out] matrices ({', '.join(higher[:3])}); "
                "pass layers=dense.layers(apply_fn, params, ...) so their layer type is known."
                if higher
                else ""
            )
            raise ValueError(
                f"{arg}targets[{i}]: pattern {targets[i]!r} matched no linear layer.{hint} "
                "Targets are matched against module paths (without '/kernel'); available: "
                f"{_summarize(candidates)}."
            )
        chosen.update(hits)
    for i, kind in enumerate(kinds):
        hits = [m for m, layer in candidates.items() if layer.kind == kind]
        if not hits:
            present = sorted({layer.kind for layer in candidates.values()})
            raise ValueError(
                f"{arg}layer_types[{i}]: the model has no {kind} layer with a kernel in the tree; "
                f"it has {', '.join(present) or 'none'}."
            )
        chosen.update(hits)
    out = {m: layer for m, layer in candidates.items() if m in chosen}
    for m, layer in out.items():
        if layer.unsupported:
            raise ValueError(
                f"{arg}targets: {m} is a layer the dense-layer methods cannot reach: "
                f"{layer.unsupported}. Exclude it from the targets."
            )
    return out


def kernel_matrix_shape(kernel_shape: Sequence[int], fan_in: int, *, where: str) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a kernel laid out ``(*in axes, *out axes)`` with ``fan_in`` rows.

    Merging needs no layer type: every supported kernel keeps its input axes first (see
    :class:`Layer`), so ``kernel.reshape(fan_in, fan_out)`` is the matrix the methods adapt.

    Raises:
        ValueError: no leading group of the kernel's axes has ``fan_in`` elements.

    >>> kernel_matrix_shape((3, 3, 16, 32), 144, where="conv")
    (144, 32)
    """
    shape = tuple(int(d) for d in kernel_shape)
    for k in range(1, len(shape)):
        if math.prod(shape[:k]) == fan_in:
            return fan_in, math.prod(shape[k:])
    raise ValueError(
        f"{where}: kernel {list(shape)} has no leading axes of {fan_in} elements in all; the "
        "adapter does not fit this kernel."
    )


# -- the interceptor --------------------------------------------------------------------------


def _kernel_shape(module: nn.Module, present: set[str]) -> tuple[int, ...]:
    if Q4_DATA in present:
        d_out, half = module.get_variable("params", Q4_DATA).shape
        return 2 * half, d_out
    if Q8_DATA in present:
        return module.get_variable("params", Q8_DATA).shape
    return module.get_variable("params", "kernel").shape


def _q4_dense(module: nn.Dense, x: jax.Array) -> jax.Array:
    """``x @ W + bias`` for a module whose kernel is held as Q4_1 leaves."""
    path = _module_path(module)
    missing = [n for n in Q4_LEAVES if not module.has_variable("params", n)]
    if missing:
        raise ValueError(f"{path}: has some Q4 leaves but not {missing}; qlora.quantize adds all.")
    if module.has_variable("params", "kernel"):
        raise ValueError(f"{path}: holds both kernel and {Q4_DATA}; keep one of the two.")
    dtype = module.dtype or x.dtype
    data, scale, minimum = (module.get_variable("params", n) for n in Q4_LEAVES)
    y = _q4_matmul_remat(x.astype(dtype), data, scale, minimum)
    if module.use_bias and module.has_variable("params", "bias"):
        y = y + _broadcast_last(module.get_variable("params", "bias").astype(dtype), y)
    return y


def _q8_call(module: nn.Module, args, kwargs) -> jax.Array:
    """The layer's own ``__call__`` on the kernel ``q8_data * q8_scale`` (its int8 leaves).

    The layer runs unchanged (a clone, applied to the dequantised kernel and its bias), so every
    layer kind computes exactly what it computes on a float kernel; `jax.checkpoint` recomputes
    the dequantised kernel in the backward pass instead of keeping it as a residual.
    """
    path = _module_path(module)
    if not module.has_variable("params", Q8_SCALE):
        raise ValueError(f"{path}: has {Q8_DATA} but no {Q8_SCALE}; qlora.quantize adds both.")
    if module.has_variable("params", "kernel"):
        raise ValueError(f"{path}: holds both kernel and {Q8_DATA}; keep one of the two.")
    if any(module.has_variable("params", n) for n in Q4_LEAVES):
        raise ValueError(f"{path}: holds both {Q8_DATA} and Q4 leaves; keep one kernel format.")
    data = module.get_variable("params", Q8_DATA)
    scale = module.get_variable("params", Q8_SCALE)
    fits = scale.ndim == data.ndim and all(
        s in (1, d) for s, d in zip(scale.shape, data.shape, strict=True)
    )
    if data.dtype != jnp.int8 or not fits or not jnp.issubdtype(scale.dtype, jnp.floating):
        raise ValueError(
            f"{path}: {Q8_DATA} {data.dtype} {list(data.shape)} and {Q8_SCALE} {scale.dtype} "
            f"{list(scale.shape)}: expected int8 data and a float scale of the same rank that "
            "broadcasts over it (qlora.quantize(..., bits=8) makes them)."
        )
    x = _input(args, kwargs)
    # The compute dtype: the layer's own, else its input's (as a float kernel cast to it would be).
    floating = jnp.issubdtype(x.dtype, jnp.floating)
    dtype = module.dtype or (x.dtype if floating else jnp.float32)
    extra = {
        n: module.get_variable("params", n) for n in ("bias",) if module.has_variable("params", n)
    }
    layer = module.clone(parent=None)
    # Arrays become arguments of the checkpointed function; the rest (an einsum string) is static.
    leaves, treedef = jax.tree.flatten((args, kwargs))
    arrays = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray))]

    def run(data, scale, extra, *values):
        filled = list(leaves)
        for i, value in zip(arrays, values, strict=True):
            filled[i] = value
        a, kw = jax.tree.unflatten(treedef, filled)
        kernel = dequantize_q8(data, scale, dtype)
        return layer.apply({"params": {"kernel": kernel, **extra}}, *a, **kw)

    run = jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)
    return run(data, scale, extra, *(leaves[i] for i in arrays))


def _check_leaves(module: nn.Module, present: set[str], geo: _Geometry, opts: Options) -> None:
    """Validates the method leaves on one module, naming its path in every error."""
    path = geo.layer.path
    has_a, has_b = LORA_A in present, LORA_B in present
    if has_a != has_b:
        missing = LORA_B if has_a else LORA_A
        raise ValueError(
            f"{path}: has only one of {LORA_A}/{LORA_B} (missing {path}/{missing}); an adapter "
            "must hold both. Re-create it with lora.init, or merge it with lora.adapter(...)."
        )
    if DORA_M in present and not has_a:
        raise ValueError(
            f"{path}: has {path}/{DORA_M} but no {LORA_A}/{LORA_B}; DoRA needs all three leaves "
            "(dora.init adds them together). Drop the stray magnitude or re-create the adapter."
        )
    if has_a and opts.lora_scale is None:
        method = "DoRA" if DORA_M in present else "LoRA"
        raise ValueError(
            f"{path}: the params hold {method} leaves but no lora_scale was given; use "
            "dense.intercept(lora_scale=alpha / rank), or lora.wrap_apply / dora.wrap_apply "
            "(alpha=..., rank=...)."
        )
    if Q4_DATA in present and geo.layer.kind != "Dense":
        raise ValueError(
            f"{path}: Q4 kernel leaves ({path}/{Q4_DATA}) run on nn.Dense only, this is an "
            f"nn.{geo.layer.kind}; dequantise it (qlora.dequantize_tree)."
        )
    if DORA_M in present and Q8_DATA in present:
        raise ValueError(
            f"{path}: DoRA needs the full-precision kernel for its column norm; it cannot sit on "
            f"an int8 kernel ({path}/{Q8_DATA}). Use LoRA, or dequantise first "
            "(qlora.dequantize_tree)."
        )
    if DORA_M in present and Q4_DATA in present:
        raise ValueError(
            f"{path}: DoRA needs the full-precision kernel for its column norm; it cannot sit on "
            f"a Q4 kernel ({path}/{Q4_DATA}). Use LoRA, or dequantise first "
            "(qlora.dequantize_tree)."
        )
    if geo.layer.unsupported:
        methods = sorted({sites.METHOD_NAMES.get(n, n) for n in present})
        raise ValueError(
            f"{path}: holds {'/'.join(methods)} leaves ({', '.join(sorted(present))}) on a layer "
            f"the dense-layer methods cannot reach: {geo.layer.unsupported}."
        )
    d_in, d_out = geo.layer.fan_in, geo.layer.fan_out
    kshape = "[" + ", ".join(map(str, geo.layer.kernel_shape)) + "]"
    if has_a:
        a = module.get_variable("params", LORA_A)
        b = module.get_variable("params", LORA_B)
        chained = a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[0]
        if not (chained and a.shape[0] == d_in and b.shape[1] == d_out):
            raise ValueError(
                f"{path}: {LORA_A} {a.shape} and {LORA_B} {b.shape} must be [in, r] and [r, out] "
                f"for kernel {kshape} as [{d_in}, {d_out}]."
            )
        if opts.lora_rank is not None and a.shape[1] != opts.lora_rank:
            raise ValueError(
                f"{path}: rank={opts.lora_rank} but {path}/{LORA_A} has rank {a.shape[1]}, so the "
                f"scale alpha / rank would be wrong; pass the rank the adapter was trained with."
            )
    for name, expected, axis in (
        (DORA_M, (d_out,), "out"),
        (IA3_SCALE, (d_out,), "out"),
        (IA3_SCALE_IN, geo.layer.in_scale_shape, "in"),
    ):
        if name in present:
            shape = module.get_variable("params", name).shape
            if tuple(shape) != tuple(expected):
                raise ValueError(
                    f"{path}/{name}: shape {shape}, expected [{axis}] = {tuple(expected)} for "
                    f"kernel {kshape}."
                )


def _trailing(v: jax.Array, y: jax.Array, sizes: tuple[int, ...]) -> jax.Array:
    """The flat vector ``v`` shaped to broadcast over ``y``'s trailing axes ``sizes``."""
    return v.reshape((1,) * (y.ndim - len(sizes)) + tuple(sizes))


def _scale_input(x: jax.Array, v: jax.Array, geo: _Geometry) -> jax.Array:
    """``x`` times the flat vector ``v`` laid over the axes ``geo.x_axes`` (kernel order)."""
    if geo.layer.kind in ("Dense", "Conv"):  # the last axis of x
        return x * _broadcast_last(v.reshape(-1).astype(x.dtype), x)
    v = v.astype(x.dtype).reshape(geo.x_sizes)
    order = sorted(range(len(geo.x_axes)), key=lambda i: geo.x_axes[i])
    v = jnp.transpose(v, order)
    shape = [1] * x.ndim
    for a in geo.x_axes:
        shape[a] = x.shape[a]
    return x * v.reshape(shape)


def _lora_delta(module: nn.Module, geo: _Geometry, x: jax.Array, dtype, opts: Options):
    a = module.get_variable("params", LORA_A)
    b = module.get_variable("params", LORA_B)
    if opts.lora_dropout > 0.0 and module.has_rng("dropout"):
        # A fresh key per module and call, from the module's own "dropout" stream.
        keep = 1.0 - opts.lora_dropout
        mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
        x = jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))
    # Factored form: x contracted with lora_a (shaped as a kernel with r outputs), then [r, out].
    # Differentiating this never forms an array of the frozen kernel's shape, so a frozen kernel
    # costs no dense gradient (the point of LoRA's memory saving), whatever the layer kind.
    x, a, b = x.astype(dtype), a.astype(dtype), b.astype(dtype)
    rank = a.shape[1]
    kind = geo.layer.kind
    if kind == "Dense":
        h = jnp.einsum("...i,ir->...r", x, a, precision=module.precision)
    elif kind == "DenseGeneral":
        a_k = a.reshape(*geo.in_sizes, rank)
        dims = ((geo.x_axes, tuple(range(len(geo.in_sizes)))), ((), ()))
        h = jax.lax.dot_general(x, a_k, dims, precision=module.precision)
    elif kind == "Einsum":
        lhs, ins, prefix, spare = geo.einsum
        a_k = a.reshape(*geo.in_sizes, rank)
        eq = f"{lhs},{ins}{spare}->{prefix}{spare}"
        h = jnp.einsum(eq, x, a_k, precision=module.precision)
    else:  # Conv: the window x in -> r convolution, with the layer's own padding and strides
        a_k = a.reshape(*geo.in_sizes, rank)
        groups = module.feature_group_count
        if groups > 1:
            # Each group's input channels meet the same update: convolve every group with A
            # (A tiled once per group, group-major outputs [..., groups * r]), then each output
            # channel takes its own group's r values through B.
            a_k = jnp.tile(a_k, (1,) * (a_k.ndim - 1) + (groups,))
        low = module.clone(parent=None, features=groups * rank, use_bias=False, dtype=dtype)
        h = low.apply({"params": {"kernel": a_k}}, x)
        if groups > 1:
            h = h.reshape(*h.shape[:-1], groups, rank)
            b_g = b.reshape(rank, groups, b.shape[1] // groups)
            delta = jnp.einsum("...gr,rgo->...go", h, b_g, precision=module.precision)
            return (delta.reshape(*delta.shape[:-2], -1) * opts.lora_scale).astype(dtype)
    delta = jnp.einsum("...r,ro->...o", h, b, precision=module.precision)
    if len(geo.out_sizes) != 1:
        delta = delta.reshape(delta.shape[:-1] + tuple(geo.out_sizes))
    return (delta * opts.lora_scale).astype(dtype)


def _dora_term(module: nn.Module, geo: _Geometry, x: jax.Array, y: jax.Array, opts: Options):
    # DoRA's efficient form (paper section 4.3): with V = W + s A B and g = m / ||V||_c,
    #   x @ (g V) + bias = g * (x W + s x A B) + bias,
    # so the base output y = x W + bias is reused and the LoRA part stays factored; only the
    # norm needs V itself. Written as y + (g - 1) (y - bias) + g s x A B, which is exactly y
    # when g == 1 and B == 0, i.e. at init.
    dtype = y.dtype
    kernel = module.get_variable("params", "kernel")
    norm = dora_column_norm(
        kernel.reshape(geo.layer.fan_in, geo.layer.fan_out),
        module.get_variable("params", LORA_A),
        module.get_variable("params", LORA_B),
        scale=opts.lora_scale,
    )
    # Keep the norm's reduction out of the fusions around it, so that it rounds as the jitted
    # computation in `dora.init` did: then m / norm is exactly 1 at init and the adapted model
    # equals the base model bit for bit (a fused reduction may differ in the last bit).
    norm = jax.lax.optimization_barrier(norm)
    if not opts.dora_exact_norm_grad:
        # The paper's choice: ||V||_c is a constant in the backward pass. The gradient then
        # reaches A and B only through the factored x A B, so no [in, out] gradient is formed
        # (the norm's own gradient would be an [in, out] array per layer), at a negligible cost
        # in accuracy (Liu et al. 2024, section 4.3). m still gets its exact gradient.
        norm = jax.lax.stop_gradient(norm)
    g = dora_gain(module.get_variable("params", DORA_M).astype(jnp.float32), norm).astype(dtype)
    g = _trailing(g, y, geo.out_sizes)
    base = y
    if module.use_bias and module.has_variable("params", "bias"):
        bias = module.get_variable("params", "bias").astype(dtype)
        base = y - _trailing(bias.reshape(-1), y, geo.out_sizes)
    return y + (g - 1) * base + g * _lora_delta(module, geo, x, dtype, opts)


def _interceptor(opts: Options) -> Callable:
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or _kind(module) is None:
            return next_fun(*args, **kwargs)
        present = {n for n in ALL_LEAVES if module.has_variable("params", n)}
        if not present:
            return next_fun(*args, **kwargs)
        sites.consume(module, *sorted(present))
        x = _input(args, kwargs)
        quantized = Q4_DATA in present or Q8_DATA in present
        if not quantized and not module.has_variable("params", "kernel"):
            return next_fun(*args, **kwargs)  # let the layer report its missing kernel
        geo = _geometry(module, x, _kernel_shape(module, present), args, kwargs)
        expected = (geo.layer.in_features,) if geo.layer.kind == "Conv" else geo.in_sizes
        if not geo.layer.unsupported and tuple(geo.x_sizes) != tuple(expected):
            if Q4_DATA in present:
                raise ValueError(
                    f"{geo.layer.path}: input has {x.shape[-1]} features, Q4 kernel expects "
                    f"{geo.layer.fan_in}."
                )
            if Q8_DATA in present:
                raise ValueError(
                    f"{geo.layer.path}: input axes {list(geo.x_sizes)} do not fit the int8 "
                    f"kernel {list(geo.layer.kernel_shape)} (expects {list(expected)})."
                )
            return next_fun(*args, **kwargs)  # let the layer report its own shape error
        _check_leaves(module, present, geo, opts)
        if IA3_SCALE_IN in present:
            # IA3 on the input (the FFN activation in the paper): x -> x * l before the kernel.
            x = _scale_input(x, module.get_variable("params", IA3_SCALE_IN), geo)
            if args:
                args = (x, *args[1:])
            else:
                kwargs = {**kwargs, "inputs": x}
        if Q4_DATA in present:
            y = _q4_dense(module, x)
        elif Q8_DATA in present:
            y = _q8_call(module, args, kwargs)
        else:
            y = next_fun(*args, **kwargs)
        if DORA_M in present:
            y = _dora_term(module, geo, x, y, opts)
        elif LORA_A in present:
            y = y + _lora_delta(module, geo, x, y.dtype, opts)
        if IA3_SCALE in present:
            scale = module.get_variable("params", IA3_SCALE).astype(y.dtype)
            y = y * _trailing(scale, y, geo.out_sizes)
        return y

    return interceptor


@contextlib.contextmanager
def intercept(
    *,
    lora_scale: float | None = None,
    dora_exact_norm_grad: bool = False,
    lora_dropout: float = 0.0,
    lora_rank: int | None = None,
) -> Iterator[Options]:
    """Applies every dense-layer method leaf (LoRA, DoRA, IA3) while the context is active.

    For every `nn.Dense.__call__` whose module holds ``lora_a`` [in, r] and ``lora_b`` [r, out] in
    ``"params"``, the output becomes ``dense(x) + (x @ lora_a @ lora_b) * lora_scale``; with
    ``dora_m`` [out] as well it becomes DoRA's ``m / ||W + s a b||_c * (x W + s x a b) + bias``;
    ``ia3_scale_in`` [in] scales the input and ``ia3_scale`` [out] the output (see the module
    docstring for the order). Dense layers without method leaves are untouched, so a plain tree
    gives the base model.

    Enter it inside the traced function (see the module docstring, and :func:`wrap_apply`).

    Args:
        lora_scale: LoRA's ``alpha / rank``; required as soon as a LoRA or DoRA leaf is met.
        dora_exact_norm_grad: Differentiate through DoRA's column norm (default False: the
            norm is held constant in the backward pass, as DoRA section 4.3 recommends).
        lora_dropout: Dropout on the low-rank branch's input while a ``"dropout"`` rng stream
            is given (see :class:`Options`).
        lora_rank: The rank behind ``lora_scale``; LoRA leaves of another rank raise.

    Yields:
        The validated :class:`Options`.

    Raises:
        ValueError: (at apply time, naming the module path) a module holds LoRA/DoRA leaves but
            ``lora_scale`` is None, holds only one of the LoRA pair, holds ``dora_m`` without
            the pair, or holds a leaf whose shape does not fit its kernel.

    References:
        Hu et al. 2021, https://arxiv.org/abs/2106.09685;
        Liu et al. 2024 (DoRA), https://arxiv.org/abs/2402.09353;
        Liu et al. 2022 (IA3), https://arxiv.org/abs/2205.05638

    >>> model = nn.Dense(2)
    >>> params = {"kernel": jnp.eye(2), "bias": jnp.zeros(2),
    ...           "lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 2))}
    >>> with intercept(lora_scale=0.5):
    ...     y = model.apply({"params": params}, jnp.array([1.0, 2.0]))
    >>> y.tolist()
    [2.5, 3.5]
    >>> params |= {"ia3_scale": jnp.array([2.0, 0.0])}
    >>> with intercept(lora_scale=0.5):
    ...     model.apply({"params": params}, jnp.array([1.0, 2.0])).tolist()
    [5.0, 0.0]
    """
    opts = Options(
        lora_scale=lora_scale,
        dora_exact_norm_grad=dora_exact_norm_grad,
        lora_dropout=lora_dropout,
        lora_rank=lora_rank,
    )
    with nn.intercept_methods(_interceptor(opts)):
        yield opts


def wrap_apply(
    apply_fn: Callable,
    *,
    lora_scale: float | None = None,
    dora_exact_norm_grad: bool = False,
    lora_dropout: float = 0.0,
    lora_rank: int | None = None,
    what: str = "dense.wrap_apply",
) -> Callable:
    """Returns ``apply_fn`` running inside :func:`intercept`, same signature and result type.

    Wrapping the apply function (rather than entering the context around a jitted call) puts the
    interceptor inside whatever `jax.jit`, `jax.grad` or `jax.vmap` traces it.

    Nothing silent: each call is tracked (`ftlab.core.sites.tracking`) over its first positional
    argument (the parameters; without positional arguments, the keyword arguments), and a method
    leaf there that no layer consumed raises `ftlab.core.sites.UnconsumedLeavesError` naming it:
    a LoRA pair on a layer the interceptor does not reach, a model that bypasses the module, or
    an ``apply_fn`` jitted and traced earlier without the interceptor (jit outside the wrapper,
    never inside). Inside an enclosing tracking context that context checks instead.

    Args:
        apply_fn: Any function that calls a linen ``Module.apply``, e.g. a trainer's
            ``apply(params, batch, rng) -> logits``.
        lora_scale: LoRA's ``alpha / rank`` (LoRA and DoRA leaves need it; IA3 alone does not).
        dora_exact_norm_grad: See :func:`intercept`.
        lora_dropout: See :func:`intercept`.
        lora_rank: See :func:`intercept`.
        what: How errors name this wrapper.

    Returns:
        The wrapped function.

    Raises:
        UnconsumedLeavesError: (when called) a method leaf of the parameters was used by nothing.

    >>> model = nn.Dense(1)
    >>> params = {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1),
    ...           "lora_a": jnp.ones((1, 1)), "lora_b": jnp.full((1, 1), 2.0)}
    >>> f = wrap_apply(lambda p, x: model.apply({"params": p}, x), lora_scale=0.25)
    >>> jax.jit(f)(params, jnp.ones(1)).tolist()
    [1.5]
    """
    # Validate now, not at trace time.
    opts = Options(
        lora_scale=lora_scale,
        dora_exact_norm_grad=dora_exact_norm_grad,
        lora_dropout=lora_dropout,
        lora_rank=lora_rank,
    )

    @functools.wraps(apply_fn)
    def wrapped(*args, **kwargs):
        with nn.intercept_methods(_interceptor(opts)):
            if sites.is_tracking():
                return apply_fn(*args, **kwargs)
            with sites.tracking(args[0] if args else kwargs, what=what):
                return apply_fn(*args, **kwargs)

    return wrapped
