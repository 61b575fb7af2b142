"""Matrix products in the operands' dtype, summed in float32, differentiated in the operands' dtype.

A model computing in bfloat16 multiplies bfloat16 operands and sums in float32, as GPU and TPU
matrix units do. ``lax.dot_general(..., preferred_element_type=float32)`` says so for the forward
pass, but its derivative does not: the cotangent of a float32 result is float32, so JAX's
transpose multiplies it with the operand upcast to float32, and the backward pass runs in
float32. `dot_general` here casts the cotangent to the operands' dtype first, so both passes
multiply bfloat16. On the 2-core CPU of `experiments/bench/RESULTS.md` a ``[280, 576] x [576,
1536]`` product takes 1.25 ms this way, against 2.42 ms in float32 and 2.59 ms with bfloat16
sums; GPU and TPU matrix units sum in float32 anyway. With float32 operands it is
``lax.dot_general`` and its derivative.

It is a drop-in ``dot_general`` for Flax layers (``nn.Dense(dot_general=dots.dot_general,
promote_dtype=dots.promote_inputs)``), and `matmul` is its ``x @ w`` (or ``x @ w.T``) over the
last axis of ``x``. With `promote_inputs` the layer hands its float32 kernel over uncast and the
product casts it: under differentiation the kernel a layer scan slices is then what the
backward pass keeps, not a bfloat16 copy of every layer's kernel (JAX stacks per-layer
intermediates of a scan as residuals; a slice of the scanned input it passes through as is).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes
from jax import lax

__all__ = ["dot_general", "matmul", "promote_inputs"]

_PLAIN = (((1,), (0,)), ((), ()))  # [m, k] x [k, n]
_NT = (((1,), (1,)), ((), ()))  # [m, k] x [n, k]


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` with float32 sums: a float32 result of products in ``lhs``'s dtype
    (``rhs`` is cast to it, inside the product).

    2-D operands with one contracted axis each (what `matmul` and ``nn.Dense`` on folded inputs
    give) take the custom derivative; any other layout is plain ``lax.dot_general`` with float32
    sums and JAX's own derivative.

    Args:
        lhs, rhs: The operands; ``rhs`` as wide as ``lhs`` or wider (a float32 kernel).
        dimension_numbers: As ``lax.dot_general``'s.
        precision: As ``lax.dot_general``'s.
        preferred_element_type: Ignored unless float32 or None (Flax passes None): the result
            is float32.
    """
    if preferred_element_type not in (None, jnp.float32):
        raise ValueError(f"dots.dot_general sums in float32, not {preferred_element_type}.")
    dims = _canonical(dimension_numbers)
    if lhs.ndim == rhs.ndim == 2 and dims[1] == ((), ()) and len(dims[0][0]) == 1:
        return _dot2d(lhs, rhs, dims, precision)
    return lax.dot_general(
        lhs, rhs.astype(lhs.dtype), dimension_numbers, precision,
        preferred_element_type=jnp.float32,
    )  # fmt: skip


def promote_inputs(*args, dtype=None, inexact=True) -> list:
    """A Flax ``promote_dtype`` for `dot_general`: ``(inputs, kernel, bias)`` with the inputs and
    bias cast to ``dtype`` and the kernel left as it is (`dot_general` casts it). Without a
    ``dtype``, Flax's own promotion.

    >>> [a.dtype for a in promote_inputs(jnp.ones(2), jnp.ones((2, 2)), None, dtype="bfloat16")
    ...  if a is not None]
    [dtype(bfloat16), dtype('float32')]
    """
    if dtype is None:
        return flax_dtypes.promote_dtype(*args, dtype=dtype, inexact=inexact)
    inputs, kernel, *rest = args
    cast = [None if a is None else jnp.asarray(a).astype(dtype) for a in (inputs, *rest)]
    return [cast[0], kernel, *cast[1:]]


def matmul(x: jax.Array, w: jax.Array, *, transpose_w: bool = False) -> jax.Array:
    """``x @ w`` (``x @ w.T`` with ``transpose_w``) over ``x``'s last axis: float32 sums of
    products in ``x``'s dtype (``w`` is cast to it), leading axes of ``x`` kept.

    >>> matmul(jnp.ones((2, 3, 4), jnp.bfloat16), jnp.ones((5, 4)), transpose_w=True).dtype
    dtype('float32')
    """
    flat = x.reshape(-1, x.shape[-1])
    y = _dot2d(flat, w, _NT if transpose_w else _PLAIN, None)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _canonical(dimension_numbers) -> tuple:
    (lc, rc), (lb, rb) = dimension_numbers
    return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dot2d(lhs: jax.Array, rhs: jax.Array, dims: tuple, precision) -> jax.Array:
    return lax.dot_general(
        lhs, rhs.astype(lhs.dtype), dims, precision, preferred_element_type=jnp.float32
    )


def _dot2d_fwd(lhs, rhs, dims, precision):
    # symbolic zeros: `.perturbed` says which operand is differentiated. Keep only what its
    # cotangent needs (a frozen kernel gets no product in the backward pass), and the dtypes
    # (as empty arrays: residuals are arrays).
    out = _dot2d(lhs.value, rhs.value, dims, precision)
    dtypes = (jnp.zeros((0,), lhs.value.dtype), jnp.zeros((0,), rhs.value.dtype))
    return out, (lhs.value if rhs.perturbed else None, rhs.value if lhs.perturbed else None, dtypes)


def _dot2d_bwd(dims, precision, residuals, g):
    lhs, rhs, (lhs_dtype, rhs_dtype) = residuals  # lhs is kept when rhs needs a cotangent, ...
    dtype = lhs_dtype.dtype  # the products' dtype
    ((lc,), (rc,)), _ = dims
    d_lhs = d_rhs = None
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        return d_lhs, d_rhs
    # g is [lhs's free axis, rhs's free axis], cast to the products' dtype: multiply in it and
    # sum in float32 (the point of this module)
    g = g.astype(dtype)
    if rhs is not None:
        d_lhs = lax.dot_general(g, rhs.astype(dtype), (((1,), (1 - rc,)), ((), ())), precision,
                                preferred_element_type=jnp.float32)  # fmt: skip
        d_lhs = (d_lhs.T if lc == 0 else d_lhs).astype(dtype)  # [free, k] -> lhs's layout
    if lhs is not None:
        d_rhs = lax.dot_general(lhs, g, (((1 - lc,), (0,)), ((), ())), precision,
                                preferred_element_type=jnp.float32)  # fmt: skip
        d_rhs = (d_rhs.T if rc == 1 else d_rhs).astype(rhs_dtype.dtype)  # [k, free]: rhs's layout
    return d_lhs, d_rhs


_dot2d.defvjp(_dot2d_fwd, _dot2d_bwd, symbolic_zeros=True)
