"""Tests of `ftlab.models.dots`: float32 sums, and derivatives in the operands' dtype."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

from ftlab.models import dots

# (lhs shape, rhs shape, dimension numbers): every layout of two 2-D operands
LAYOUTS = [
    ((3, 4), (4, 5), (((1,), (0,)), ((), ()))),
    ((3, 4), (5, 4), (((1,), (1,)), ((), ()))),
    ((4, 3), (4, 5), (((0,), (0,)), ((), ()))),
    ((4, 3), (5, 4), (((0,), (1,)), ((), ()))),
    ((2, 3, 4), (2, 4, 5), (((2,), (1,)), ((0,), (0,)))),  # batched: JAX's own derivative
]


def _operands(ls, rs, dtype):
    k1, k2 = jax.random.split(jax.random.key(0))
    return jax.random.normal(k1, ls).astype(dtype), jax.random.normal(k2, rs).astype(dtype)


@pytest.mark.parametrize("ls,rs,dims", LAYOUTS)
def test_float32_is_lax_dot_general_and_its_derivative(ls, rs, dims):
    lhs, rhs = _operands(ls, rs, jnp.float32)

    def loss(f):
        return lambda a, b: jnp.sum(jnp.sin(f(a, b, dims)))

    @jax.jit
    def both(a, b):
        return [
            jax.value_and_grad(loss(f), argnums=(0, 1))(a, b)
            for f in (dots.dot_general, lax.dot_general)
        ]

    ours, theirs = both(lhs, rhs)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-6)
    for a, b in zip(ours[1], theirs[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ls,rs,dims", LAYOUTS[:4])
def test_bfloat16_sums_in_float32_and_differentiates_in_bfloat16(ls, rs, dims):
    lhs, rhs = _operands(ls, rs, jnp.bfloat16)
    g = jax.random.normal(jax.random.key(1), lax.dot_general(lhs, rhs, dims).shape)
    out, vjp = jax.vjp(lambda a, b: dots.dot_general(a, b, dims), lhs, rhs)
    d_lhs, d_rhs = jax.jit(vjp)(g)
    assert out.dtype == jnp.float32 and d_lhs.dtype == d_rhs.dtype == jnp.bfloat16
    # numpy: float32 products of the bfloat16 values; the cotangent rounded to bfloat16 first
    a, b = np.asarray(lhs, np.float32), np.asarray(rhs, np.float32)
    (lc,), (rc,) = dims[0]
    a2 = a if lc == 1 else a.T  # [m, k]
    b2 = b if rc == 0 else b.T  # [k, n]
    np.testing.assert_allclose(out, a2 @ b2, rtol=1e-5, atol=1e-5)
    g16 = np.asarray(g.astype(jnp.bfloat16), np.float32)
    want_a, want_b = g16 @ b2.T, a2.T @ g16
    want_a = want_a if lc == 1 else want_a.T
    want_b = want_b if rc == 0 else want_b.T
    for got, want in ((d_lhs, want_a), (d_rhs, want_b)):
        np.testing.assert_array_equal(got, want.astype(ml_dtypes.bfloat16))


def test_matmul_keeps_leading_axes_and_casts_the_weight():
    x, w = _operands((2, 3, 4), (5, 4), jnp.bfloat16)
    y = jax.jit(lambda x, w: dots.matmul(x, w.astype(jnp.float32), transpose_w=True))(x, w)
    assert y.shape == (2, 3, 5) and y.dtype == jnp.float32
    want = np.asarray(x, np.float32) @ np.asarray(w, np.float32).T
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sums in float32, not"):
        dots.dot_general(x[0], w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16)


def test_a_float32_kernel_is_cast_inside_and_gets_a_float32_gradient():
    # nn.Dense(promote_dtype=dots.promote_inputs) hands the float32 kernel over uncast
    x, w = _operands((3, 4), (4, 5), jnp.float32)
    x = x.astype(jnp.bfloat16)
    inputs, kernel, bias = dots.promote_inputs(x, w, jnp.ones(5), dtype=jnp.bfloat16)
    assert (inputs.dtype, kernel.dtype, bias.dtype) == (jnp.bfloat16, jnp.float32, jnp.bfloat16)
    g = jax.random.normal(jax.random.key(1), (3, 5))
    out, vjp = jax.vjp(lambda a, b: dots.dot_general(a, b, LAYOUTS[0][2]), x, w)
    d_x, d_w = jax.jit(vjp)(g)
    assert (out.dtype, d_x.dtype, d_w.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
    # the products of the bfloat16 values, the kernel rounded to bfloat16 first
    a = np.asarray(x, np.float32)
    b16 = np.asarray(w.astype(jnp.bfloat16), np.float32)
    g16 = np.asarray(g.astype(jnp.bfloat16), np.float32)
    np.testing.assert_allclose(out, a @ b16, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(d_x, (g16 @ b16.T).astype(ml_dtypes.bfloat16))
    np.testing.assert_allclose(d_w, a.T @ g16, rtol=1e-6, atol=1e-6)
