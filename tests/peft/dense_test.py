"""Dense-layer methods on every Flax linear layer: Dense, DenseGeneral, Einsum and Conv.

A small ViT-like model written only here (Flax's own `nn.Conv` patch embedding,
`nn.MultiHeadDotProductAttention`, an `nn.Einsum` mixer and an `nn.Dense` head) takes LoRA, DoRA
and IA3 on all four layer kinds: identity at init, a changed output after one step, frozen leaves
bit-identical, no optimizer state for them, merged equal to unmerged, and no dense gradient of a
frozen kernel. Single layers of each kind with unusual settings (strides, circular and causal
padding, non-last axes, ellipsis equations) check merge against the factored forward pass.
"""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab import testing
from ftlab.core import partition, sites
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
        tuple(sorted(s))
        for s in testing.jaxpr_output_shapes(jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr)
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
    "conv_grouped": (nn.Conv(6, (3,), feature_group_count=2), (2, 7, 4)),
    "conv_depthwise": (nn.Conv(8, (2, 2), feature_group_count=4), (2, 5, 5, 4)),
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


# -- selecting layers, and the errors ------------------------------------------------------------


def _leaf_modules(params):
    return sorted({k.rpartition("/")[0] for k in partition.flatten(params) if "lora_" in k})


def test_select_by_type_by_path_or_both(base, found):
    kw = dict(rank=2, alpha=4.0, layers=found)
    by_type = lora.init(base, jax.random.key(0), layer_types=[nn.Conv], **kw)
    assert _leaf_modules(by_type) == ["patch"]
    both = lora.init(base, jax.random.key(0), targets=["head"], layer_types=["DenseGeneral"], **kw)
    assert _leaf_modules(both) == ["attn/key", "attn/out", "attn/query", "attn/value", "head"]
    # Without layers the candidates are the 2-D kernels, taken as [in, out]: only the head here.
    plain = lora.init(base, jax.random.key(0), targets=[".*"], rank=2, alpha=4.0)
    assert _leaf_modules(plain) == ["head"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layer_types=["Conv"]), r"lora\.init: layer_types needs layers=dense\.layers"),
        (
            dict(targets=["attn/query"]),
            r"lora\.init: targets\[0\]: .* not \[in, out\] matrices \(attn/query \[6, 2, 4\]\); "
            r"pass layers=",
        ),
        (dict(layer_types=["LSTM"], layers={}), r"lora\.init: layer_types\[0\]: 'LSTM' is not"),
        (dict(), r"lora\.init: targets and layer_types are both empty"),
        (dict(targets=["head"], what="config.peft", rank=9), r"config\.peft\.rank=9 exceeds"),
    ],
    ids=["types-without-layers", "3d-without-layers", "unknown-type", "nothing", "config-prefix"],
)
def test_init_errors_name_the_argument(base, kwargs, match):
    kwargs = dict(rank=2, alpha=4.0) | kwargs
    with pytest.raises(ValueError, match=match):
        lora.init(base, jax.random.key(0), **kwargs)


@pytest.mark.parametrize(
    "layer, shape, match",
    [
        (
            nn.Einsum((4, 2, 3), "btd,hdk->bthk"),
            (2, 3, 2),
            r"nn\.Einsum 'btd,hdk->bthk': .* contracted axes \('d'\) first .* "
            r"e\.g\. 'btd,dhk->bthk'",
        ),
        (nn.Conv(4, (3,), mask=np.ones((3, 4, 4))), (2, 5, 4), r"nn\.Conv with a kernel mask"),
        (nn.DenseGeneral(3, batch_dims=(0,)), (2, 4), r"batch_dims=\(0,\)"),
    ],
    ids=["einsum-order", "masked-conv", "batch-dims"],
)
def test_layers_the_methods_cannot_reach_are_refused_by_name(layer, shape, match):
    x = jnp.ones(shape)
    p = {"layer": jax.tree.map(np.asarray, layer.init(jax.random.key(0), x)["params"])}

    def f(p, x):
        return layer.apply({"params": p["layer"]}, x)

    (found,) = dense.layers(f, p, x).values()
    found = {"layer": dataclasses.replace(found, path="layer")}
    with pytest.raises(ValueError, match=r"lora\.init: targets: layer is a layer .*" + match):
        lora.init(p, jax.random.key(0), targets=["layer"], layers=found, rank=1, alpha=1.0)
    # Leaves put there by hand are refused when applied, naming the module, never ignored.
    a = np.ones((found["layer"].fan_in, 1), np.float32)
    b = np.ones((1, found["layer"].fan_out), np.float32)
    p["layer"] |= {"lora_a": a, "lora_b": b}
    with pytest.raises(ValueError, match=match):
        lora.wrap_apply(f, alpha=1.0, rank=1)(p, x)


# -- nothing silent: LoRA leaves that no layer used raise ----------------------------------------


class Bypass(nn.Module):
    """A layer that reads its own kernel instead of calling a Flax linear layer."""

    @nn.compact
    def __call__(self, x):
        return x @ self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 3))


@pytest.mark.parametrize(
    "layer", [nn.ConvTranspose(3, (2,)), Bypass()], ids=["conv-transpose", "own-kernel"]
)
def test_lora_leaves_no_layer_consumed_raise(layer):
    x = jnp.ones((2, 4, 5))
    p = {"net": dict(layer.init(jax.random.key(0), x)["params"])}
    k = p["net"]["kernel"]
    p["net"] |= {"lora_a": jnp.ones((int(np.prod(k.shape[:-1])), 1)), "lora_b": jnp.ones((1, 3))}
    f = lora.wrap_apply(lambda p, x: layer.apply({"params": p["net"]}, x), alpha=1.0, rank=1)
    with pytest.raises(sites.UnconsumedLeavesError, match=r"net/lora_a, net/lora_b"):
        f(p, x)


def test_a_function_jitted_earlier_without_the_wrapper_is_never_reused_silently():
    model = nn.Dense(2)
    x = jnp.ones((1, 3))
    p = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
    p |= {"lora_a": jnp.ones((3, 1)), "lora_b": jnp.ones((1, 2))}

    def f(p, x):
        return model.apply({"params": p}, x)

    jitted = jax.jit(f)
    base_out = jitted(p, x)  # traced without the interceptor: the base model
    with pytest.raises(sites.UnconsumedLeavesError, match="lora_a"):
        lora.wrap_apply(jitted, alpha=2.0, rank=1)(p, x)  # the cached trace skips LoRA
    # jit outside the wrapper traces with the interceptor and applies the adapter.
    adapted = jax.jit(lora.wrap_apply(f, alpha=2.0, rank=1))(p, x)
    np.testing.assert_allclose(adapted - base_out, 2.0 * 3.0 * jnp.ones((1, 2)))


# -- the remaining silent paths of the LoRA verbs (issue 17, item 8) -----------------------------


def test_wrap_apply_with_another_rank_than_the_leaves_raises():
    model = nn.Dense(4)
    p = {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}
    p |= {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 4))}
    f = lora.wrap_apply(lambda p, x: model.apply({"params": p}, x), alpha=40.0, rank=2)
    f(p, jnp.ones((1, 4)))  # the leaves' own rank is fine
    # rank=4 with alpha=40 would scale by 10 instead of 20 (merge refuses it as well).
    wrong = lora.wrap_apply(lambda p, x: model.apply({"params": p}, x), alpha=40.0, rank=4)
    with pytest.raises(ValueError, match=r"rank=4 but .*lora_a has rank 2, so the scale"):
        wrong(p, jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"rank=4 but .*lora_a has rank 2"):
        lora.merge({"d": p}, alpha=40.0, rank=4)


def test_merge_refuses_lora_leaves_without_a_kernel():
    p = {"q": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 4))}, "h": {"kernel": 1.0}}
    with pytest.raises(ValueError, match=r"lora\.merge: q holds lora_a/lora_b but no q/kernel"):
        lora.merge(p, alpha=1.0, rank=2)
