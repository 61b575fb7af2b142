"""Sharding rules over a device mesh: specs and errors here (one device, abstract meshes); and on
8 simulated devices in one subprocess, fsdp / data x fsdp / fsdp x tensor meshes against one
device for full fine-tuning and LoRA, per-device bytes, accumulation, and a checkpoint restored
onto another mesh shape.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from ftlab import testing
from ftlab.core import parallel, sharding, train

ROOT = pathlib.Path(__file__).resolve().parents[2]
MESH_2x4 = AbstractMesh((2, 4, 1), sharding.AXES)
MESH_4x2 = AbstractMesh((1, 4, 2), sharding.AXES)


def _tree():
    return {
        "block": {
            "up": {"kernel": jax.ShapeDtypeStruct((16, 64), jnp.float32)},
            "down": {"kernel": jax.ShapeDtypeStruct((64, 16), jnp.float32)},
        },
        "head": {
            "kernel": jax.ShapeDtypeStruct((16, 3), jnp.float32),
            "bias": jax.ShapeDtypeStruct((3,), jnp.float32),
        },
    }


def test_tactics_give_the_specs_they_promise():
    rules = [
        (".*/up/kernel", "column"),
        (".*/down/kernel", "row"),
        ("head/bias", "replicate"),
        ("head/kernel", P(None, None)),
    ]
    on_tensor = sharding.specs(_tree(), rules, MESH_4x2, min_bytes=0)
    assert on_tensor["block"]["up"]["kernel"] == P("fsdp", "tensor")
    assert on_tensor["block"]["down"]["kernel"] == P("tensor", "fsdp")
    assert on_tensor["head"]["bias"] == P()
    fsdp = sharding.specs(
        _tree(), [("head/bias", "replicate"), (".*", "fsdp")], MESH_2x4, min_bytes=0
    )
    # The largest divisible dimension; head/kernel's 16 rows, not its 3 columns.
    assert fsdp["block"]["up"]["kernel"] == P(None, "fsdp")
    assert fsdp["head"]["kernel"] == P("fsdp", None)
    # Under min_bytes: replicated, even where a dimension divides (and where none does).
    small = sharding.specs(_tree(), [(".*", "fsdp")], MESH_2x4, min_bytes=16 * 64 * 4 + 1)
    assert all(s == P() for s in jax.tree.leaves(small, is_leaf=lambda x: isinstance(x, P)))


def test_a_rule_that_matches_no_leaf_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"rules\[0\]: pattern 'encoder/.\*' matched no leaf"):
        sharding.specs(_tree(), [("encoder/.*", "fsdp"), (".*", "replicate")], MESH_2x4)


def test_a_leaf_no_rule_matches_is_an_error_unless_a_default_is_given():
    with pytest.raises(ValueError, match="leaf 'head/bias' matches no rule"):
        sharding.specs(_tree(), [("block/.*", "replicate"), ("head/kernel", "fsdp")], MESH_2x4)
    specs = sharding.specs(
        _tree(), [("block/.*", "replicate"), ("head/kernel", "fsdp")], MESH_2x4, default="replicate"
    )
    assert specs["head"]["bias"] == P()


def test_a_dimension_not_divisible_by_its_axis_is_an_error_naming_both():
    with pytest.raises(
        ValueError,
        match=r"rules\[0\] \('head/kernel', P\(None, 'tensor'\)\): dimension 1 of leaf "
        r"'head/kernel' .* not divisible by mesh axis 'tensor' of size 2",
    ):
        sharding.specs(_tree(), [("head/kernel", P(None, "tensor")), (".*", "fsdp")], MESH_4x2)
    with pytest.raises(ValueError, match="dimension 1 of leaf 'head/kernel'.* axis 'tensor'"):
        sharding.specs(_tree(), [("head/kernel", "column"), (".*", "replicate")], MESH_4x2)
    with pytest.raises(ValueError, match="no dimension of leaf 'head/bias' .* axis 'fsdp'"):
        sharding.specs(_tree(), [(".*", "fsdp")], MESH_2x4, min_bytes=0)


def test_bad_tactics_and_meshes_are_errors_naming_the_argument():
    with pytest.raises(ValueError, match=r"rules\[0\]: tactic 'shard' is not one of"):
        sharding.specs(_tree(), [(".*", "shard")], MESH_2x4)
    with pytest.raises(ValueError, match="'column' splits 2-D .* 'head/bias'"):
        sharding.specs(_tree(), [("head/bias", "column"), (".*", "replicate")], MESH_4x2)
    with pytest.raises(ValueError, match="make_mesh: shape names unknown axes \\['model'\\]"):
        sharding.make_mesh({"model": 2})
    with pytest.raises(ValueError, match="needs 4 devices but 1 exist"):
        sharding.make_mesh({"fsdp": 4})
    mesh = sharding.make_mesh({"fsdp": -1})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_optimizer_state_mirrors_its_parameters_and_counts_are_replicated():
    mesh = sharding.make_mesh({"fsdp": -1})
    params = {"w": jnp.ones((4, 8)), "b": jnp.ones((8,))}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    state = train.init_state(params, {"w": "train", "b": "frozen"}, tx, seed=0)
    rules = [("w", P(None, "fsdp")), ("b", "replicate")]
    shardings = sharding.state_shardings(state, rules, mesh)
    adam = shardings.opt_state[1][0]
    assert adam.mu["w"].spec == P(None, "fsdp") and adam.nu["w"].spec == P(None, "fsdp")
    assert adam.count.spec == P() and shardings.step.spec == P() and shardings.rng.spec == P()
    assert shardings.frozen["b"].spec == P()


# One subprocess for every multi-device check; it prints one JSON line of results.
_CHILD = r"""
import json, sys, tempfile
import chex, flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
jax.config.update("jax_compilation_cache_dir", sys.argv[1])  # the test session's cache
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
from ftlab.core import checkpoint, parallel, partition, sharding, train
from ftlab.peft import lora

class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(64, name="up")(x))
        return nn.LayerNorm(name="norm")(x + nn.Dense(16, name="down")(h))

class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = Block(name=f"block_{i}")(x)
        return nn.Dense(3, name="head")(x)

net = Net()
rng = np.random.default_rng(0)
batches = [
    {"x": rng.normal(size=(32, 16)).astype(np.float32),
     "y": rng.integers(0, 3, 32).astype(np.int32)}
    for _ in range(3)
]
base = jax.tree.map(np.asarray, net.init(jax.random.key(0), batches[0]["x"])["params"])
RULES = [
    (".*/up/kernel", "column"),
    (".*/down/kernel", "row"),
    ("head/bias", "replicate"),
    (".*", "fsdp"),
]

def loss_of(apply):
    def loss_fn(params, batch, rng):
        logits = apply(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), {}
    return loss_fn

plain = lambda p, x: net.apply({"params": p}, x)
methods = {
    "full": (base, partition.labels(base, [(".*", "train")]), plain),
}
lp = lora.init(base, jax.random.key(1), targets=[r"block_\d/(up|down)"], rank=2, alpha=4.0)
# B starts at zero; a nonzero B makes the LoRA path matter from the first step.
lp = jax.tree_util.tree_map_with_path(
    lambda p, x: np.full_like(x, 0.05) if partition.path_name(p).endswith("lora_b")
    else np.asarray(x), lp)
methods["lora"] = (lp, partition.labels(lp, lora.rules(extra=[("head/.*", "train")])),
                   lora.wrap_apply(plain, alpha=4.0, rank=2))
# eps well above the smallest gradients: Adam's m / sqrt(v) of a near-zero gradient would turn
# a float-reassociation difference into a full-size step of the other sign.
tx = optax.adam(1e-2, eps=1e-3)

def run(plan, method, accumulate=1, batches=batches):
    params, labels, apply = methods[method]
    state = plan.put_state(train.init_state(params, labels, tx, seed=0))
    step = plan.compile_train_step(train.make_train_step(loss_of(apply), tx, accumulate=accumulate))
    losses = []
    for b in batches:
        state, m = step(state, plan.put_batch(b))
        losses.append(float(m["train/loss"]))
    return state, losses

def close(a, b):
    try:
        chex.assert_trees_all_close(jax.device_get(a), jax.device_get(b), rtol=1e-4, atol=1e-5)
        return True
    except AssertionError as e:
        print(e, file=sys.stderr)
        return False

out = {}
# A rule that matches no leaf is an error, so LoRA's factors get theirs only under LoRA.
RULES = {"full": RULES, "lora": [(".*/lora_(a|b)", "replicate"), *RULES]}
one = {m: parallel.make_sharded_plan({"fsdp": 1}, r, min_bytes=0, devices=jax.devices()[:1])
       for m, r in RULES.items()}
meshes = {"fsdp8": {"fsdp": 8}, "data2_fsdp4": {"data": 2, "fsdp": 4},
          "fsdp4_tensor2": {"fsdp": 4, "tensor": 2}}
plans = {(m, k): parallel.make_sharded_plan(v, RULES[m], min_bytes=0)
         for k, v in meshes.items() for m in methods}
for method in methods:
    ref_state, ref_losses = run(one[method], method)
    for name in meshes:
        plan = plans[method, name]
        state, losses = run(plan, method)
        frozen = state.frozen if method == "lora" else state.trainable
        per_device = sharding.device_bytes(frozen)
        total = sum(x.nbytes for x in jax.tree.leaves(frozen))
        replicated = sum(
            x.nbytes for x in jax.tree.leaves(frozen) if x.sharding.is_fully_replicated)
        out[f"{method}/{name}"] = {
            "losses": losses, "ref_losses": ref_losses,
            "params_close": close(state.trainable, ref_state.trainable),
            "opt_close": close(state.opt_state, ref_state.opt_state),
            "frozen_equal": method == "full" or close(state.frozen, ref_state.frozen),
            "max_device_bytes": max(per_device.values()), "total_bytes": total,
            "replicated_bytes": replicated,
            "specs": {k: str(v.sharding.spec) for k, v in partition.flatten(state.opt_state).items()
                      if k.endswith("block_0/up/kernel")},
        }
        if name == "fsdp8" and method == "lora":
            lora_state = state
        if name == "fsdp4_tensor2" and method == "full":
            # The eval step of the sharded plan sums what one device sums.
            eval_step = train.make_eval_step(lambda p, b: {"logit": plain(p, b["x"])[:, 0]})
            b = dict(batches[0], mask=np.ones(32, np.float32))
            sums = plan.compile_eval_step(eval_step)(state, plan.put_batch(b))
            host = jax.device_get(state.trainable)
            ref_sums = {"logit": plain(host, b["x"])[:, 0].sum(), "count": 32.0}
            out["eval"] = close(sums, ref_sums)
    if method == "full":
        full_ref = ref_state

# Remat per block and a bf16 policy compose with the tensor-parallel mesh.
params, labels, apply = methods["lora"]
policy = train.Precision(compute="bfloat16", frozen="bfloat16")
plan = plans["lora", "fsdp4_tensor2"]
state = plan.put_state(train.init_state(params, labels, tx, seed=0, precision=policy))
loss_fn = train.remat(loss_of(apply), policy="nothing_saveable", modules=r"block_\d")
step = plan.compile_train_step(train.make_train_step(loss_fn, tx, precision=policy))
state, m = step(state, plan.put_batch(batches[0]))
out["policies"] = {"loss": float(m["train/loss"]), "ref": out["lora/fsdp8"]["ref_losses"][0],
                   "frozen_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(state.frozen)}),
                   "up_spec": str(state.frozen["block_0"]["up"]["kernel"].sharding.spec)}

# Accumulation on the fsdp mesh: 4 micro-batches of 8 rows, one per device each.
s_acc, acc = run(plans["full", "fsdp8"], "full", accumulate=4)
out["accumulate"] = {"losses": acc, "ref_losses": out["full/fsdp8"]["ref_losses"],
                     "params_close": close(s_acc.trainable, full_ref.trainable)}

# Saved on fsdp=8, restored onto fsdp=4 x tensor=2 (and the other way round, on data x fsdp).
with tempfile.TemporaryDirectory() as d:
    with checkpoint.Checkpointer(d, save_every_steps=1) as ckpt:
        ckpt.save(3, lora_state.checkpointable())
    for name in ("fsdp4_tensor2", "data2_fsdp4"):
        with checkpoint.Checkpointer(d, save_every_steps=1) as ckpt:
            target = plans["lora", name].abstract_state(lora_state.checkpointable())
            restored, step = ckpt.restore_latest(target)
        same_shardings = all(
            r.sharding.is_equivalent_to(t.sharding, r.ndim)
            for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)))
        out[f"restore/{name}"] = {
            "step": step, "equal": close(restored, lora_state.checkpointable()),
            "shardings": same_shardings,
            "tensor_split": str(restored.trainable["block_0"]["up"]["lora_a"].sharding.spec),
            "up_mu": str(restored.opt_state[0].mu["block_0"]["up"]["lora_a"].sharding.spec),
        }
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
    cache = jax.config.jax_compilation_cache_dir or str(ROOT / ".jax_cache")
    proc = testing.run_on_simulated_devices(_CHILD, cache, root=ROOT)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("mesh", ["fsdp8", "data2_fsdp4", "fsdp4_tensor2"])
def test_sharded_meshes_give_the_numbers_of_one_device(results, method, mesh):
    r = results[f"{method}/{mesh}"]
    assert len(r["losses"]) == 3 and r["losses"][-1] < r["losses"][0]
    assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-5, abs=1e-6)
    assert r["params_close"] and r["opt_close"] and r["frozen_equal"]


@pytest.mark.parametrize(
    ("mesh", "share", "spec"),
    [
        ("fsdp8", 8, "P('fsdp', None)"),
        ("data2_fsdp4", 4, "P('fsdp', None)"),
        ("fsdp4_tensor2", 4, "P('fsdp', 'tensor')"),
    ],
)
def test_each_device_holds_its_share_of_the_frozen_base(results, mesh, share, spec):
    for method in ("full", "lora"):
        r = results[f"{method}/{mesh}"]
        # The fsdp axis splits every leaf but the replicated ones; data replicates.
        bound = (r["total_bytes"] - r["replicated_bytes"]) / share + r["replicated_bytes"]
        assert r["max_device_bytes"] <= bound, r
    assert results["lora/fsdp8"]["replicated_bytes"] == 0
    assert results["lora/fsdp8"]["max_device_bytes"] == results["lora/fsdp8"]["total_bytes"] / 8
    # Adam's moments of a full fine-tune sit where their parameter sits.
    assert set(results[f"full/{mesh}"]["specs"].values()) == {spec}


def test_accumulating_four_micro_batches_equals_one_batch_on_the_mesh(results):
    r = results["accumulate"]
    assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-5, abs=1e-6)
    assert r["params_close"]


@pytest.mark.parametrize("mesh", ["fsdp4_tensor2", "data2_fsdp4"])
def test_a_state_saved_on_one_mesh_restores_onto_another(results, mesh):
    r = results[f"restore/{mesh}"]
    assert r["step"] == 3 and r["equal"] and r["shardings"]
    # LoRA factors replicated by the rules; their Adam moments too.
    assert r["tensor_split"] == "P()" and r["up_mu"] == "P()"


def test_remat_and_a_bf16_policy_run_on_the_tensor_parallel_mesh(results):
    r = results["policies"]
    assert r["loss"] == pytest.approx(r["ref"], rel=2e-2)
    assert r["frozen_dtypes"] == ["bfloat16"] and r["up_spec"] == "P('fsdp', 'tensor')"


def test_the_sharded_eval_step_sums_what_one_device_sums(results):
    assert results["eval"]


def test_sharded_plan_needs_a_placed_state_and_valid_rules():
    plan = parallel.make_sharded_plan({"fsdp": -1}, [(".*", "fsdp")])
    plan.check_batch_size(3, what="batch_size")  # one device: anything goes
    tx = optax.sgd(0.1)
    state = train.init_state({"w": jnp.ones((2, 2))}, {"w": "train"}, tx, seed=0)
    loss_fn = lambda p, b, r: (jnp.sum(p["w"] * b["x"]), {})  # noqa: E731
    step = plan.compile_train_step(train.make_train_step(loss_fn, tx))
    with pytest.raises(
        ValueError, match=r"state leaves \['step', 'trainable/w'.*plan.put_state first"
    ):
        step(state, plan.put_batch({"x": np.ones((2, 2), np.float32)}))
    placed, _ = step(plan.put_state(state), plan.put_batch({"x": np.ones((2, 2), np.float32)}))
    assert placed.trainable["w"].sharding.mesh == plan.mesh
    with pytest.raises(ValueError, match=r"rules\[0\]: tactic 'zero3'"):
        parallel.make_sharded_plan({"fsdp": -1}, [(".*", "zero3")])
