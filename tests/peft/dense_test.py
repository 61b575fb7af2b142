"""Dense-layer methods on every Flax linear layer: Dense, DenseGeneral, Einsum and Conv.

A small ViT-like model written only here (Flax's own `nn.Conv` patch embedding,
`nn.MultiHeadDotProductAttention`, an `nn.Einsum` mixer and an `nn.Dense` head) takes LoRA, DoRA
and IA3 on all four layer kinds: identity at init, a changed output after one step, frozen leaves
bit-identical, no optimizer state for them, merged equal to unmerged, and no dense gradient of a
frozen kernel. Single layers of each kind with unusual settings (strides, circular and causal
padding, non-last axes, ellipsis equations) check merge against the factored forward pass.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab.core import partition
from ftlab.peft import dense, dora, ia3, lora

RANK, ALPHA = 3, 6.0
KINDS = ("Dense", "DenseGeneral", "Einsum", "Conv")


class TinyViT(nn.Module):
    """Kernels of distinctive shapes, so that a shape names one kernel in a jaxpr."""

    @nn.compact
    def __call__(self, images):  # [b, 8, 8, 3]
        h = nn.Conv(6, (2, 2), strides=(2, 2), name="patch")(images)  # kernel [2, 2, 3, 6]
        h = h.reshape(h.shape[0], -1, 6)  # [b, 16, 6]
        # query/key/value kernels [6, 2, 4], out [2, 4, 6] (nn.DenseGeneral)
        h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(h)
        h = nn.LayerNorm(name="norm")(h)
        h = nn.Einsum((6, 2, 5), "btd,dhk->bthk", name="mix")(h)  # kernel [6, 2, 5]
        h = nn.gelu(h.reshape(h.shape[0], h.shape[1], 10))
        return nn.Dense(7, name="head")(h.mean(axis=1))  # kernel [10, 7]


MODEL = TinyViT()
IMAGES = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
LABELS = jnp.array([1, 4])


def _apply(params, images):
    return MODEL.apply({"params": params}, images)


@pytest.fixture(scope="module")
def base():
    return jax.tree.map(np.asarray, jax.jit(MODEL.init)(jax.random.key(1), IMAGES)["params"])


@pytest.fixture(scope="module")
def found(base):
    return dense.layers(_apply, base, IMAGES)


def test_layers_records_every_kind_with_its_matrix_shape(found):
    got = {p: (layer.kind, layer.fan_in, layer.fan_out) for p, layer in found.items()}
    assert got == {
        "patch": ("Conv", 12, 6),
        "attn/query": ("DenseGeneral", 6, 8),
        "attn/key": ("DenseGeneral", 6, 8),
        "attn/value": ("DenseGeneral", 6, 8),
        "attn/out": ("DenseGeneral", 8, 6),
        "mix": ("Einsum", 6, 10),
        "head": ("Dense", 10, 7),
    }
    assert found["patch"].in_scale_shape == (1, 1, 3)
    assert all(layer.unsupported is None for layer in found.values())


# -- every method on the ViT: init identity, one step, frozen leaves, merge ----------------------

METHODS = {
    "lora": dict(
        init=lambda p, layers: lora.init(
            p, jax.random.key(2), layer_types=KINDS, layers=layers, rank=RANK, alpha=ALPHA
        ),
        wrap=lambda f: lora.wrap_apply(f, alpha=ALPHA, rank=RANK),
        rules=lora.rules(),
        merge=lambda p: lora.merge(p, alpha=ALPHA, rank=RANK),
        n_leaves=2 * 7,
    ),
    "dora": dict(
        init=lambda p, layers: dora.init(
            p, jax.random.key(2), layer_types=KINDS, layers=layers, rank=RANK, alpha=ALPHA
        ),
        wrap=lambda f: dora.wrap_apply(f, alpha=ALPHA, rank=RANK),
        rules=dora.rules(),
        merge=lambda p: dora.merge(p, alpha=ALPHA, rank=RANK),
        n_leaves=3 * 7,
    ),
    "ia3": dict(
        init=lambda p, layers: ia3.init(
            p,
            targets_out=(),
            targets_in=(),
            layer_types_out=KINDS,
            layer_types_in=("Conv", "Einsum", "DenseGeneral"),
            layers=layers,
        ),
        wrap=ia3.wrap_apply,
        rules=ia3.rules(),
        merge=ia3.merge,
        n_leaves=7 + 6,
    ),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_on_every_layer_kind(base, found, method):
    m = METHODS[method]
    params = m["init"](base, found)
    added = set(partition.flatten(params)) - set(partition.flatten(base))
    assert len(added) == m["n_leaves"]
    apply = m["wrap"](_apply)

    @jax.jit
    def forward(p):  # the adapted model, and the base model on the merged tree
        return apply(p, IMAGES), _apply(m["merge"](p), IMAGES)

    base_out = jax.jit(_apply)(base, IMAGES)
    adapted, _ = forward(params)
    np.testing.assert_allclose(adapted, base_out, atol=1e-6, rtol=0)

    label_tree = partition.labels(params, m["rules"])
    trainable, frozen = partition.split(params, label_tree)
    assert set(partition.flatten(trainable)) == added
    tx = optax.adam(0.05)
    opt_state = tx.init(trainable)
    # adam's mu and nu for the method leaves, plus a count: no state for frozen leaves
    assert sum(np.size(x) for x in jax.tree.leaves(opt_state)) == 2 * partition.count(trainable) + 1

    def loss(t):
        logits = apply(partition.merge(t, frozen), IMAGES)
        return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()

    @jax.jit
    def step(t, o):
        grads = jax.grad(loss)(t)
        updates, o = tx.update(grads, o, t)
        return optax.apply_updates(t, updates), o

    frozen0 = jax.tree.map(np.array, frozen)
    trained, opt = step(trainable, opt_state)
    trained, _ = step(trained, opt)  # two steps: LoRA's lora_a moves once lora_b is non-zero
    for name, leaf in partition.flatten(trained).items():
        assert not np.array_equal(leaf, partition.flatten(trainable)[name]), name
    params = partition.merge(trained, frozen)
    chex.assert_trees_all_equal(partition.split(params, label_tree)[1], frozen0)
    adapted, merged_out = forward(params)
    assert np.max(np.abs(adapted - base_out)) > 1e-3
    assert jax.tree.structure(m["merge"](params)) == jax.tree.structure(base)
    np.testing.assert_allclose(merged_out, adapted, atol=1e-5, rtol=1e-5)


def _output_shapes(jaxpr):
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars]
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    shapes += _output_shapes(inner)
    return shapes


def test_no_dense_gradient_of_a_frozen_kernel_on_any_layer_kind(base, found):
    params = lora.init(
        base, jax.random.key(2), layer_types=KINDS, layers=found, rank=RANK, alpha=ALPHA
    )
    # The head's kernel [10, 7] is trained too, as the control: its gradient must show up.
    label_tree = partition.labels(params, lora.rules(extra=[("head/kernel", "train")]))
    trainable, frozen = partition.split(params, label_tree)
    apply = lora.wrap_apply(_apply, alpha=ALPHA, rank=RANK)

    def loss(t):
        return jnp.sum(apply(partition.merge(t, frozen), IMAGES))

    # Sorted, since a gradient may be formed transposed before it is laid out as the kernel.
    shapes = {
        tuple(sorted(s)) for s in _output_shapes(jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr)
    }
    assert (7, 10) in shapes
    # patch (Conv), attn/{query,key,value} and attn/out (DenseGeneral), mix (Einsum)
    for frozen_kernel in [(2, 2, 3, 6), (6, 2, 4), (2, 4, 6), (6, 2, 5)]:
        assert tuple(sorted(frozen_kernel)) not in shapes, frozen_kernel
    assert (RANK, 8) in shapes and (RANK, 12) in shapes  # the factors' gradients


# -- single layers with unusual settings: merged equals factored ---------------------------------

LAYERS = {
    "dense": (nn.Dense(5), (2, 3, 4)),
    "general_two_in_axes": (nn.DenseGeneral((2, 3), axis=(-2, -1)), (2, 4, 5)),
    "general_middle_axis": (nn.DenseGeneral(6, axis=1), (2, 4, 5)),
    "einsum_ellipsis": (nn.Einsum((4, 2, 3), "...d,dhk->...hk"), (2, 3, 4)),
    "einsum_two_contracted": (nn.Einsum((3, 4, 5), "bhd,hdo->bo"), (2, 3, 4)),
    "conv_strided_circular": (nn.Conv(5, (3, 3), strides=2, padding="CIRCULAR"), (2, 7, 7, 4)),
    "conv_causal_1d": (nn.Conv(5, (3,), padding="CAUSAL", kernel_dilation=2), (2, 9, 4)),
    "conv_unbatched": (nn.Conv(5, (2, 2)), (6, 6, 4)),
}


class Zoo(nn.Module):
    """Each layer setting of LAYERS on its own input, under its own name."""

    @nn.compact
    def __call__(self, xs):
        return {n: layer.clone(parent=self, name=n)(xs[n]) for n, (layer, _) in LAYERS.items()}


ZOO = Zoo()
XS = {
    n: jax.random.normal(jax.random.key(i), shape)
    for i, (n, (_, shape)) in enumerate(LAYERS.items())
}


def _zoo(params, xs):
    return ZOO.apply({"params": params}, xs)


def _randomized(tree, seed=0):
    """Adapter leaves moved off their init, so that the adapted model differs from the base."""
    rng = np.random.default_rng(seed)
    flat = partition.flatten(tree)
    for k, v in flat.items():
        noise = rng.normal(scale=0.5, size=np.shape(v)).astype(np.float32)
        if k.endswith("lora_b"):
            flat[k] = np.asarray(v) + noise
        elif k.endswith(("dora_m", "ia3_scale", "ia3_scale_in")):
            flat[k] = np.asarray(v) * (1.5 + np.tanh(noise))
    return partition.unflatten(flat)


ZOO_METHODS = {
    "lora": (
        lambda p, layers: lora.init(
            p, jax.random.key(5), targets=[".*"], layers=layers, rank=2, alpha=4
        ),
        lambda f: lora.wrap_apply(f, alpha=4, rank=2),
        lambda p: lora.merge(p, alpha=4, rank=2),
        lambda merged, p: lora.unmerge(merged, lora.adapter(p), alpha=4, rank=2),
    ),
    "dora": (
        lambda p, layers: dora.init(
            p, jax.random.key(5), targets=[".*"], layers=layers, rank=2, alpha=4
        ),
        lambda f: dora.wrap_apply(f, alpha=4, rank=2),
        lambda p: dora.merge(p, alpha=4, rank=2),
        None,
    ),
    "ia3": (
        lambda p, layers: ia3.init(p, targets_out=[".*"], targets_in=[".*"], layers=layers),
        ia3.wrap_apply,
        ia3.merge,
        lambda merged, p: ia3.unmerge(merged, ia3.adapter(p)),
    ),
}


@pytest.fixture(scope="module")
def zoo():
    base = jax.tree.map(np.asarray, jax.jit(ZOO.init)(jax.random.key(4), XS)["params"])
    return base, dense.layers(_zoo, base, XS), jax.jit(_zoo)(base, XS)


@pytest.mark.parametrize("method", list(ZOO_METHODS))
def test_merge_equals_factored_on_each_layer_setting(zoo, method):
    init, wrap, merge, unmerge = ZOO_METHODS[method]
    base, found, y0 = zoo
    assert {n: found[n].kind for n in LAYERS} == {
        n: type(layer).__name__ for n, (layer, _) in LAYERS.items()
    }
    params = _randomized(init(base, found))
    apply = wrap(_zoo)

    @jax.jit
    def run(p):
        merged = merge(p)
        return apply(p, XS), merged, _zoo(merged, XS)

    y, merged, y_merged = run(params)
    for n in LAYERS:
        assert np.max(np.abs(y[n] - y0[n])) > 1e-2, n  # the adapter matters on every layer
        np.testing.assert_allclose(y_merged[n], y[n], atol=1e-4, rtol=1e-4, err_msg=n)
    if unmerge is not None:
        chex.assert_trees_all_close(unmerge(merged, params), params, atol=1e-5)
