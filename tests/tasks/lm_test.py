"""Chunked LM cross-entropy: equal to the plain one, without keeping [tokens, vocab] logits."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab.tasks import lm

VOCAB, DIM = 97, 8


def _inputs():
    k = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k[0], (2, 7, DIM))
    embedding = jax.random.normal(k[1], (VOCAB, DIM))
    targets = jax.random.randint(k[2], (2, 7), 0, VOCAB)
    weights = jnp.ones((2, 7)).at[0, :3].set(0.0)
    return hidden, embedding, targets, weights


def _plain(hidden, embedding, targets, weights):
    logits = hidden @ embedding.T
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(weights * losses), jnp.sum(weights)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_equals_plain_cross_entropy_and_its_gradient(chunk):
    hidden, embedding, targets, weights = _inputs()
    got = lm.chunked_cross_entropy(hidden, embedding, targets, weights, chunk=chunk)
    chex.assert_trees_all_close(got, _plain(hidden, embedding, targets, weights), rtol=1e-5)

    def f(fn, **kw):
        return jax.grad(lambda h, e: fn(h, e, targets, weights, **kw)[0], argnums=(0, 1))

    chex.assert_trees_all_close(
        f(lm.chunked_cross_entropy, chunk=chunk)(hidden, embedding),
        f(_plain)(hidden, embedding),
        rtol=1e-5,
        atol=1e-6,
    )


def test_backward_pass_keeps_no_vocabulary_sized_logits():
    hidden, embedding, targets, weights = _inputs()
    f = lambda h: lm.chunked_cross_entropy(h, embedding, targets, weights, chunk=4)[0]  # noqa: E731
    _, residuals = jax.vjp(f, hidden)
    shapes = [tuple(np.shape(r)) for r in jax.tree.leaves(residuals)]
    # the plain loss keeps [2, 7, 97] logits (or their softmax) for the backward pass; the chunked
    # one keeps the gradient it formed with each chunk's loss, [tokens, 8]
    assert not [s for s in shapes if s[-1:] == (VOCAB,)], shapes
    _, plain_residuals = jax.vjp(lambda h: _plain(h, embedding, targets, weights)[0], hidden)
    assert [s for s in map(np.shape, jax.tree.leaves(plain_residuals)) if s[-1:] == (VOCAB,)]


def _dots_with_vocab_output(jaxpr) -> int:
    """dot_generals whose output's last axis is the vocabulary, inside scans too."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape[-1:] == (VOCAB,):
            n += 1
        for v in eqn.params.values():
            inner = getattr(v, "jaxpr", v)  # a ClosedJaxpr (scan) or a Jaxpr (checkpoint)
            if hasattr(inner, "eqns"):
                n += _dots_with_vocab_output(inner)
    return n


def test_each_chunks_logits_are_formed_once_per_step():
    """Loss and gradient in one pass: one logits matmul, no recomputation in the backward."""
    hidden, embedding, targets, weights = _inputs()
    f = lambda h: lm.chunked_cross_entropy(h, embedding, targets, weights, chunk=4)[0]  # noqa: E731
    assert _dots_with_vocab_output(jax.make_jaxpr(jax.grad(f))(hidden).jaxpr) == 1
    # the frozen embedding gets no [vocab, dim] gradient matmul; a trained one does
    g = lambda h, e: lm.chunked_cross_entropy(h, e, targets, weights, chunk=4)[0]  # noqa: E731
    only_h = str(jax.make_jaxpr(jax.grad(g, argnums=0))(hidden, embedding))
    both = str(jax.make_jaxpr(jax.grad(g, argnums=(0, 1)))(hidden, embedding))
    assert f"f32[{VOCAB},{DIM}] = dot_general" not in only_h.replace(" ", "")
    assert f"f32[{VOCAB},{DIM}]=dot_general" in both.replace(" ", "")


def test_gradient_in_weights_and_in_bfloat16():
    hidden, embedding, targets, weights = _inputs()
    weights = weights * jnp.linspace(0.5, 1.5, weights.size).reshape(weights.shape)
    grads = jax.grad(lambda w: lm.chunked_cross_entropy(hidden, embedding, targets, w, chunk=3)[0])(
        weights
    )
    expected = jax.grad(lambda w: _plain(hidden, embedding, targets, w)[0])(weights)
    chex.assert_trees_all_close(grads, expected, rtol=1e-5, atol=1e-6)
    # bf16 hidden states: a bf16 gradient, close to the float32 one
    h16 = hidden.astype(jnp.bfloat16)
    d16 = jax.grad(lambda h: lm.chunked_cross_entropy(h, embedding, targets, weights, chunk=3)[0])(
        h16
    )
    d32 = jax.grad(lambda h: _plain(h, embedding, targets, weights)[0])(h16.astype(jnp.float32))
    assert d16.dtype == jnp.bfloat16
    chex.assert_trees_all_close(d16.astype(jnp.float32), d32, rtol=3e-2, atol=3e-2)


def test_shape_errors_name_the_arrays():
    hidden, embedding, targets, weights = _inputs()
    with pytest.raises(ValueError, match="targets"):
        lm.chunked_cross_entropy(hidden, embedding, targets[:, :3], weights)
