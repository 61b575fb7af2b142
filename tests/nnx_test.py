"""Flax NNX models through ftlab: the split/merge bridge, LoRA on NNX layers, freezing, saving."""

import chex
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab import nnx as ftnnx
from ftlab import testing
from ftlab.core import checkpoint, partition, sites, train

RANK, ALPHA = 2, 4.0
LORA_RULES = [(".*/lora_(a|b)", "train"), (".*", "frozen")]


class Net(nnx.Module):
    """Conv -> Linear (in a list) -> LinearGeneral -> Einsum -> Linear head."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.layers = nnx.List([nnx.Linear(4, 6, rngs=rngs)])
        self.heads = nnx.LinearGeneral(6, (2, 3), rngs=rngs)
        self.mix = nnx.Einsum("bhd,hdk->bk", (2, 3, 5), (5,), rngs=rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def features(self, x):
        h = nnx.relu(self.conv(x)).mean(axis=(1, 2))
        h = nnx.relu(self.layers[0](h))
        return nnx.relu(self.mix(self.heads(h)))

    def __call__(self, x):
        return self.head(self.features(x))


class NormNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)  # keeps its own rng state

    def __call__(self, x):
        return self.drop(self.bn(self.lin(x)))


def _init(make, seed):
    """``(graphdef, params)`` of ``make(rngs)`` built abstractly, with numpy-drawn parameters.

    Nothing is compiled to initialise (an eager init compiles one random op per kernel shape,
    which dominated this file's cold run).
    """
    graphdef, shapes = ftnnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(s):
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 100
        return jnp.asarray(rng.standard_normal(s.shape, np.float32) / np.sqrt(fan_in))

    return graphdef, jax.tree.map(draw, shapes)


# Calls a module compiled (cached per graph and input shapes).
_call = nnx.jit(lambda module, x: module(x))


def _randn(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


@pytest.fixture(scope="module")
def net():
    graphdef, params = _init(Net, 0)
    return ftnnx.merge(graphdef, params), graphdef, params


@pytest.fixture(scope="module")
def plain_apply(net):
    return jax.jit(ftnnx.make_apply(net[1]))


@pytest.fixture(scope="module")
def batch(plain_apply):
    x = _randn(1, (8, 5, 5, 2))
    _, teacher = _init(Net, 7)
    return {"x": x, "y": plain_apply(teacher, x)}


def _loss_fn(apply):
    def loss_fn(params, batch, rng):
        del rng
        return jnp.mean((apply(params, batch["x"]) - batch["y"]) ** 2), {}

    return loss_fn


def _fit(params, rules, apply, batch, *, steps):
    """Trains with ftlab's own state and step; returns the states after 1 and after all steps."""
    tx = optax.adam(3e-2)
    state = train.init_state(params, partition.labels(params, rules), tx, seed=0)
    step = jax.jit(train.make_train_step(_loss_fn(apply), tx))
    first, metrics = step(state, batch)
    losses = [metrics["train/loss"]]
    state = first
    for _ in range(steps - 1):
        state, metrics = step(state, batch)
        losses.append(metrics["train/loss"])
    return first, state, np.array(losses)


def _with_random_b(params, seed=3):
    """LoRA leaves with a nonzero ``lora_b``, so the adapter changes the output."""
    flat = partition.flatten(params)
    for i, name in enumerate(sorted(flat)):
        if name.endswith("/lora_b") or name == "lora_b":
            flat[name] = 0.5 * jax.random.normal(jax.random.key(seed + i), flat[name].shape)
    return partition.unflatten(flat)


# --- the bridge -----------------------------------------------------------------------------


def test_split_gives_slash_paths_and_apply_equals_the_module(net, batch, plain_apply):
    model, graphdef, params = net
    assert sorted(partition.flatten(params)) == [
        f"{m}/{leaf}"
        for m in ("conv", "head", "heads", "layers/0", "mix")
        for leaf in ("bias", "kernel")
    ]
    assert isinstance(model, Net)  # the fixture's module is ftnnx.merge(graphdef, params)
    chex.assert_trees_all_equal(plain_apply(params, batch["x"]), _call(model, batch["x"]))
    # split of the rebuilt module gives back the same tree.
    chex.assert_trees_all_equal(ftnnx.split(model)[1], params)
    features = jax.eval_shape(ftnnx.make_apply(graphdef, method="features"), params, batch["x"])
    assert features.shape == (8, 5)


def test_batch_stats_and_rng_state_are_collections_that_apply_updates():
    model = NormNet(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"split: .*bn/mean \(batch_stats\).*split_collections"):
        ftnnx.split(model)
    graphdef, params, collections = ftnnx.split_collections(model)
    assert sorted(partition.flatten(collections)) == [
        "batch_stats/bn/mean",
        "batch_stats/bn/var",
        "rng_count/drop/rngs/count",
        "rng_key/drop/rngs/key",
    ]
    assert "bn/scale" in partition.flatten(params)
    with pytest.raises(ValueError, match=r"collections=True"):
        ftnnx.make_apply(graphdef)
    apply = jax.jit(ftnnx.make_apply(graphdef, collections=True))
    x = _randn(0, (16, 3)) + 2.0
    out, new = apply(params, collections, x)
    expected = model(x)  # the module updates its own state in place the same way
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new["batch_stats"]["bn"]["mean"], model.bn.mean[...], rtol=1e-6)
    assert not np.allclose(
        new["batch_stats"]["bn"]["mean"], collections["batch_stats"]["bn"]["mean"]
    )
    assert int(new["rng_count"]["drop"]["rngs"]["count"]) == 1
    # The advanced rng state draws a new dropout mask.
    again, _ = apply(params, new, x)
    assert np.any((again == 0) != (out == 0))


def test_a_model_with_flax_own_lora_leaves_keeps_them_as_parameters():
    model = nnx.LoRALinear(3, 4, lora_rank=2, rngs=nnx.Rngs(0))
    graphdef, params = ftnnx.split(model)
    assert "lora/lora_a" in partition.flatten(params)  # nnx.LoRAParam is a Param
    x = jnp.ones((2, 3))
    chex.assert_trees_all_equal(ftnnx.make_apply(graphdef)(params, x), model(x))


# --- LoRA -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(net, batch):
    _, graphdef, params = net
    lora_params = jax.jit(
        lambda p, k: ftnnx.lora_init(graphdef, p, k, targets=[".*"], rank=RANK, alpha=ALPHA)
    )(params, jax.random.key(2))
    apply = ftnnx.make_apply(graphdef, alpha=ALPHA, rank=RANK)
    first, last, losses = _fit(lora_params, LORA_RULES, apply, batch, steps=25)
    return lora_params, jax.jit(apply), first, last, losses


def test_lora_reaches_every_layer_kind_and_starts_as_identity(net, batch, lora_run):
    model, graphdef, params = net
    lora_params, apply, *_ = lora_run
    lora_leaves = {k: v.shape for k, v in partition.flatten(lora_params).items() if "lora" in k}
    assert lora_leaves == {
        "conv/lora_a": (3 * 3 * 2, RANK),  # (window x in, r)
        "conv/lora_b": (RANK, 4),
        "layers/0/lora_a": (4, RANK),
        "layers/0/lora_b": (RANK, 6),
        "heads/lora_a": (6, RANK),
        "heads/lora_b": (RANK, 2 * 3),
        "mix/lora_a": (2 * 3, RANK),
        "mix/lora_b": (RANK, 5),
        "head/lora_a": (5, RANK),
        "head/lora_b": (RANK, 3),
    }
    chex.assert_trees_all_equal(apply(lora_params, batch["x"]), _call(model, batch["x"]))


def test_lora_fine_tunes_only_its_leaves(net, batch, lora_run):
    _, _, params = net
    lora_params, apply, first, last, losses = lora_run
    trainable = sorted(partition.flatten(last.trainable))
    assert trainable == sorted(k for k in partition.flatten(lora_params) if "lora" in k)
    # Optimizer state exists for the LoRA leaves only.
    adam = last.opt_state[0]
    assert sorted(partition.flatten(adam.mu)) == trainable
    assert sorted(partition.flatten(adam.nu)) == trainable
    # The frozen base is bit-identical to the pretrained arrays.
    chex.assert_trees_all_equal(last.frozen, params)
    # One step changes the output; training lowers the loss.
    assert np.max(np.abs(apply(first.params, batch["x"]) - apply(lora_params, batch["x"]))) > 1e-4
    assert losses[-1] < 0.7 * losses[0], losses


def test_partial_freeze_trains_only_the_head(net, batch):
    _, graphdef, params = net
    rules = [("head/.*", "train"), (".*", "frozen")]
    first, last, losses = _fit(params, rules, ftnnx.make_apply(graphdef), batch, steps=10)
    assert sorted(partition.flatten(last.trainable)) == ["head/bias", "head/kernel"]
    frozen = {k: v for k, v in partition.flatten(params).items() if not k.startswith("head/")}
    chex.assert_trees_all_equal(partition.flatten(last.frozen), frozen)
    assert not np.allclose(last.trainable["head"]["kernel"], params["head"]["kernel"])
    assert losses[-1] < losses[0], losses


def test_checkpoint_round_trip_of_an_nnx_lora_state(tmp_path, net, batch, lora_run):
    _, graphdef, _ = net
    _, apply, _, last, _ = lora_run
    with checkpoint.Checkpointer(tmp_path, save_every_steps=1) as ckpt:
        ckpt.save(int(last.step), last, force=True)
        ckpt.wait_until_finished()
        restored, step = ckpt.restore_latest(jax.eval_shape(lambda: last))
    assert step == int(last.step)
    chex.assert_trees_all_equal(restored, last)
    chex.assert_trees_all_equal(apply(restored.params, batch["x"]), apply(last.params, batch["x"]))
    # The merged plain tree, as a module again.
    merged = ftnnx.lora_merge(graphdef, restored.params, alpha=ALPHA, rank=RANK)
    model = ftnnx.merge(graphdef, merged)
    np.testing.assert_allclose(
        _call(model, batch["x"]), apply(restored.params, batch["x"]), rtol=1e-5, atol=1e-5
    )


# Layouts beyond the whole-model test (which merges Net's Conv, Linear, LinearGeneral, Einsum).
_LAYERS = {
    "LinearGeneral": (lambda r: nnx.LinearGeneral((2, 3), (4, 5), axis=(1, -1), rngs=r), (7, 2, 3)),
    # Input and output axes interleave in the kernel: merge must transpose.
    "Einsum-interleaved": (lambda r: nnx.Einsum("bi,hio->bho", (2, 4, 3), (2, 3), rngs=r), (7, 4)),
    "Conv-strided": (lambda r: nnx.Conv(3, 5, (3, 3), strides=2, rngs=r), (2, 6, 6, 3)),
    "Conv1D-circular": (lambda r: nnx.Conv(2, 4, (3,), padding="CIRCULAR", rngs=r), (2, 9, 2)),
}


def _layer(kind):
    """A single-layer model of ``kind``: graph, base tree, input."""
    make, x_shape = _LAYERS[kind]
    return (*_init(make, 0), _randn(4, x_shape))


def _lora(graphdef, params):
    return ftnnx.lora_init(graphdef, params, jax.random.key(5), targets=[".*"], rank=2, alpha=3.0)


@pytest.mark.parametrize("kind", list(_LAYERS))
def test_merged_equals_unmerged_for_each_layer_kind(kind):
    graphdef, params, x = _layer(kind)

    @jax.jit
    def outputs(params, x):
        lora_params = _with_random_b(_lora(graphdef, params))
        merged = ftnnx.lora_merge(graphdef, lora_params, alpha=3.0, rank=2)
        unmerged = ftnnx.lora_unmerge(graphdef, merged, lora_params, alpha=3.0, rank=2)
        return (
            ftnnx.make_apply(graphdef)(params, x),
            ftnnx.make_apply(graphdef, alpha=3.0, rank=2)(lora_params, x),
            ftnnx.make_apply(graphdef)(merged, x),
            (merged, unmerged, lora_params),
        )

    base, lora_out, merged_out, (merged, unmerged, lora_params) = outputs(params, x)
    assert np.max(np.abs(lora_out - base)) > 1e-2  # the adapter does something
    np.testing.assert_allclose(lora_out, merged_out, rtol=1e-5, atol=1e-5)
    assert sorted(merged) == ["bias", "kernel"]
    chex.assert_trees_all_close(unmerged, lora_params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["Linear", *_LAYERS])
def test_factored_gradient_forms_no_kernel_sized_array(kind):
    if kind == "Linear":
        graphdef, params = _init(lambda r: nnx.Linear(4, 3, rngs=r), 0)
        x = jnp.ones((5, 4))
    else:
        graphdef, params, x = _layer(kind)
    # Abstract LoRA leaves suffice to trace; the frozen base is the real tree.
    lora_params = jax.eval_shape(lambda: _lora(graphdef, params))
    trainable = {k: lora_params[k] for k in ("lora_a", "lora_b")}
    frozen = params
    apply = ftnnx.make_apply(graphdef, alpha=3.0, rank=2)
    kernel_shape = tuple(params["kernel"].shape)

    def count(f):
        return testing.jaxpr_output_shapes(jax.make_jaxpr(f)(trainable).jaxpr).count(kernel_shape)

    def loss(t):
        return jnp.sum(apply(partition.merge(t, frozen), x) ** 2)

    def merged_form_loss(t):  # the dense alternative, to show the count can see it
        delta = (t["lora_a"] @ t["lora_b"]).reshape(kernel_shape)
        return jnp.sum((frozen["kernel"] + delta) ** 2)

    assert count(jax.grad(merged_form_loss)) > 0
    assert count(jax.grad(loss)) == count(loss) == 0


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(targets=["layer/0"]), r"'layer/0' matched no layer.*layers/0 \(Linear"),
        (dict(targets=[nnx.Embed]), r"targets\[0\]: Embed is not a layer LoRA reaches"),
        (dict(targets="head"), r"targets must be a list"),
        (dict(rank=0), r"lora_init: rank=0 must be a positive integer"),
        (dict(rank=4), r"rank=4 exceeds min\(in, out\)=3 of head \(Linear"),
        (dict(alpha=float("nan")), r"lora_init: alpha=nan"),
    ],
    ids=["no-match", "other-type", "string", "rank0", "rank-too-big", "alpha-nan"],
)  # fmt: skip
def test_lora_init_errors_name_the_argument(net, kwargs, match):
    _, graphdef, params = net
    args = dict(targets=[".*"], rank=RANK, alpha=ALPHA) | kwargs
    with pytest.raises(ValueError, match=match):
        ftnnx.lora_init(graphdef, params, jax.random.key(0), **args)


def test_lora_init_refuses_modules_it_cannot_reach():
    graphdef, params, _ = ftnnx.split_collections(nnx.eval_shape(lambda: NormNet(nnx.Rngs(0))))
    with pytest.raises(
        ValueError, match=r"'bn' matches bn \(BatchNorm\), not a layer LoRA reaches"
    ):
        ftnnx.lora_init(graphdef, params, jax.random.key(0), targets=["bn"], rank=1, alpha=1.0)
    graphdef, params = _init(lambda r: nnx.Conv(4, 4, (3,), feature_group_count=2, rngs=r), 0)
    with pytest.raises(ValueError, match=r"cannot reach .*\(Conv\): feature_group_count=2"):
        ftnnx.lora_init(graphdef, params, jax.random.key(0), targets=[nnx.Conv], rank=1, alpha=1.0)


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)


def _stacked(rngs):
    """Three Blocks stacked by nnx.vmap, as nnx.scan-ed models hold them: kernel [3, 4, 4]."""
    return nnx.split_rngs(splits=3)(nnx.vmap(Block, in_axes=0, out_axes=0))(rngs)


def test_lora_init_refuses_stacked_layers():
    graphdef, params = _init(_stacked, 0)
    assert params["lin"]["kernel"].shape == (3, 4, 4)
    with pytest.raises(ValueError, match=r"cannot reach lin \(Linear\): its kernel has shape"):
        ftnnx.lora_init(graphdef, params, jax.random.key(0), targets=["lin"], rank=1, alpha=1.0)


def test_apply_errors_name_the_leaves(net, batch, lora_run):
    _, graphdef, params = net
    lora_params = lora_run[0]
    x = batch["x"]
    with pytest.raises(
        ValueError, match=r"LoRA leaves \(conv/lora_a, \.\.\.\) but no alpha and rank"
    ):
        ftnnx.make_apply(graphdef)(lora_params, x)
    with pytest.raises(ValueError, match=r"rank=3 but conv/lora_a has rank 2"):
        ftnnx.make_apply(graphdef, alpha=ALPHA, rank=3)(lora_params, x)
    with pytest.raises(ValueError, match=r"rank=3 but conv/lora_a has rank 2"):
        ftnnx.lora_merge(graphdef, lora_params, alpha=ALPHA, rank=3)
    # A LoRA leaf on a layer the call never reaches: nothing silent.
    features = ftnnx.make_apply(graphdef, method="features", alpha=ALPHA, rank=RANK)
    with pytest.raises(sites.UnconsumedLeavesError, match=r"head/lora_a, head/lora_b") as e:
        jax.jit(features)(lora_params, x)
    assert e.value.leaves == ["head/lora_a", "head/lora_b"]
    # Leaves of a method ftlab.nnx does not apply, and half a LoRA pair.
    flat = partition.flatten(params)
    ia3 = partition.unflatten(flat | {"head/ia3_scale": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"only in the tree \['head/ia3_scale'\].*LoRA only"):
        ftnnx.make_apply(graphdef)(ia3, x)
    half = partition.unflatten(flat | {"head/lora_a": jnp.ones((5, 2))})
    with pytest.raises(ValueError, match=r"head/lora_a has no head/lora_b"):
        ftnnx.make_apply(graphdef, alpha=ALPHA, rank=RANK)(half, x)
    with pytest.raises(ValueError, match=r"lora_merge: params hold no lora_a/lora_b"):
        ftnnx.lora_merge(graphdef, params, alpha=ALPHA, rank=RANK)


def test_an_nnx_batchnorm_model_fine_tunes_through_the_train_step_with_its_collections():
    # The NNX collections tree is what train.init_state takes as `collections`; the loss gets
    # Flax's variables dict and hands the updated statistics (and rng counts) back.
    graphdef, params, collections = ftnnx.split_collections(NormNet(nnx.Rngs(0)))
    apply = ftnnx.make_apply(graphdef, collections=True)
    x = _randn(1, (16, 3)) + 2.0
    y = jnp.asarray(np.arange(16) % 4, jnp.int32)

    def loss_fn(variables, batch, rng):
        del rng
        rest = {k: v for k, v in variables.items() if k != "params"}
        out, new = apply(variables["params"], rest, batch["x"])
        xent = optax.softmax_cross_entropy_with_integer_labels(out, batch["y"]).mean()
        return xent, {"collections": new}

    labels = partition.labels(params, [("lin/.*", "train"), (".*", "frozen")])
    tx = optax.sgd(0.1)
    step = jax.jit(train.make_train_step(loss_fn, tx))
    for frozen_stats in (False, True):
        rules = [("batch_stats/.*", "frozen" if frozen_stats else "train"), (".*", "train")]
        state = train.init_state(
            params,
            labels,
            tx,
            seed=0,
            collections=collections,
            collection_labels=partition.labels(collections, rules),
        )
        state, _ = step(state, {"x": x, "y": y})
        mean0 = collections["batch_stats"]["bn"]["mean"]
        mean1 = state.collections["batch_stats"]["bn"]["mean"]
        if frozen_stats:
            np.testing.assert_array_equal(mean1, mean0)
        else:
            assert not np.allclose(mean1, mean0)
        assert int(state.collections["rng_count"]["drop"]["rngs"]["count"]) == 1
        assert not np.allclose(state.params["lin"]["kernel"], params["lin"]["kernel"])
        np.testing.assert_array_equal(state.params["bn"]["scale"], params["bn"]["scale"])
