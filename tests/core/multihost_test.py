"""FSDP across hosts: 2 processes x 4 simulated CPU devices (`jax.distributed` on localhost, gloo)
with a `ShardedPlan` over fsdp=8, so that every parameter and Adam moment is split across both
processes, give the losses and updated parameters of one device; and `hf.load(..., shardings=...)`
fills each process's devices with their slices alone. (LoRA on the same plans is covered on one
process of 8 devices in tests/core/sharding_test.py: its factors are replicated leaves, which
cross no process boundary that full fine-tuning does not.)

The library path only (`parallel.initialize_distributed`, `make_sharded_plan`, `put_state`,
`put_batch`, `compile_train_step`); the launcher's multi-host flags are tested in
tests/experiments/trainers_test.py. Process 0 also runs the one-device reference on one of its own
devices, which needs no collective, so that the test starts two processes rather than three.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
HF_DATA = ROOT / "tests" / "third_party" / "testdata" / "hf"

_CHILD = r"""
import json, sys
port, index, cache, hf_data = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
from ftlab.core import parallel
parallel.initialize_distributed(
    coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=index)
import chex, flax.linen as nn, jax, numpy as np, optax
from jax.experimental import multihost_utils
jax.config.update("jax_compilation_cache_dir", cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
from ftlab.core import partition, sharding, train
from third_party import hf

class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            h = nn.gelu(nn.Dense(64, name=f"up_{i}")(x))
            x = nn.LayerNorm(name=f"norm_{i}")(x + nn.Dense(16, name=f"down_{i}")(h))
        return nn.Dense(8, name="head")(x)

net = Net()
rng = np.random.default_rng(0)
# Every process builds the same global batch; put_batch feeds each its own rows. Three steps on
# it: the loss must fall, so the updates are real.
batches = [{"x": rng.normal(size=(32, 16)).astype(np.float32),
            "y": rng.integers(0, 8, 32).astype(np.int32)}] * 3
# Random leaves of init's shapes: init's own compile would cost each process seconds.
shapes = jax.eval_shape(net.init, jax.random.key(0), batches[0]["x"])["params"]
base = jax.tree.map(lambda s: rng.normal(scale=0.3, size=s.shape).astype(np.float32), shapes)
plain = lambda p, x: net.apply({"params": p}, x)
methods = {
    "full": (base, partition.labels(base, [(".*", "train")]), plain, [(".*", "fsdp")]),
}
tx = optax.adam(1e-2, eps=1e-3)

def loss_of(apply):
    def loss_fn(params, batch, rng):
        logits = apply(params, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), {}
    return loss_fn

def run(plan, method):
    params, labels, apply, _ = methods[method]
    state = plan.put_state(train.init_state(params, labels, tx, seed=0))
    step = plan.compile_train_step(train.make_train_step(loss_of(apply), tx))
    losses = []
    for b in batches:
        state, m = step(state, plan.put_batch(b))
        losses.append(float(m["train/loss"]))
    return state, losses

def close(a, b):
    try:
        chex.assert_trees_all_close(a, b, rtol=1e-4, atol=1e-5)
        return True
    except AssertionError as e:
        print(e, file=sys.stderr)
        return False

out = {"process_count": jax.process_count(), "devices": jax.device_count()}
for method, (params, labels, apply, rules) in methods.items():
    plan = parallel.make_sharded_plan({"fsdp": 8}, rules, min_bytes=0)
    state, losses = run(plan, method)
    held = state.trainable
    local = sharding.device_bytes(held)
    # Both processes gather the global state (a collective), then process 0 compares.
    gathered = multihost_utils.process_allgather(
        {"trainable": state.trainable, "opt": state.opt_state, "frozen": state.frozen},
        tiled=True)
    r = {"losses": losses, "local_devices": len(local),
         "max_device_bytes": max(local.values()),
         "total_bytes": sum(x.nbytes for x in jax.tree.leaves(held)),
         "split_across_processes": all(
             len({d.process_index for d in x.sharding.device_set}) == 2
             and not x.is_fully_addressable for x in jax.tree.leaves(held))}
    if index == 0:
        one = parallel.make_sharded_plan(
            {"fsdp": 1}, rules, min_bytes=0, devices=jax.local_devices()[:1])
        ref, ref_losses = run(one, method)
        ref = jax.device_get({"trainable": ref.trainable, "opt": ref.opt_state,
                              "frozen": ref.frozen})
        r.update(ref_losses=ref_losses, params_close=close(gathered["trainable"], ref["trainable"]),
                 opt_close=close(gathered["opt"], ref["opt"]),
                 frozen_equal=all(np.array_equal(a, b) for a, b in
                                  zip(jax.tree.leaves(gathered["frozen"]),
                                      jax.tree.leaves(ref["frozen"]))))
    out[method] = r

# Sharded loading across processes: each process fills its 4 devices from its own read.
mesh = sharding.make_mesh({"fsdp": 8})
_, placed, _ = hf.load(hf_data + "/llama",
                       shardings=lambda t: sharding.shardings(t, [(".*", "fsdp")], mesh,
                                                              min_bytes=0))
_, host, _ = hf.load(hf_data + "/llama")
whole = multihost_utils.process_allgather(placed, tiled=True)
out["hf"] = {
    "equal": all(np.array_equal(a, b) for a, b in
                 zip(jax.tree.leaves(whole), jax.tree.leaves(host))),
    "local_shards": sorted({len(x.addressable_shards) for x in jax.tree.leaves(placed)}),
    "device_bytes": sorted(set(sharding.device_bytes(placed).values())),
    "total_bytes": sum(x.nbytes for x in jax.tree.leaves(placed)),
}
print(f"RESULT{index} " + json.dumps(out), flush=True)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    cache = jax.config.jax_compilation_cache_dir or str(ROOT / ".jax_cache")
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, port, str(i), cache, str(HF_DATA)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=180)
            assert proc.returncode == 0, stderr[-4000:]
            outs.append(stdout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    lines = [
        next(x for x in out.splitlines() if x.startswith(f"RESULT{i} "))
        for i, out in enumerate(outs)
    ]
    return [json.loads(line.split(" ", 1)[1]) for line in lines]


@pytest.mark.parametrize("method", ["full"])
def test_fsdp_across_two_processes_equals_one_device(results, method):
    zero, one = results
    assert zero["process_count"] == 2 and zero["devices"] == 8
    r = zero[method]
    assert len(r["losses"]) == 3 and r["losses"][-1] < r["losses"][0]
    assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-5, abs=1e-6)
    assert one[method]["losses"] == r["losses"]
    assert r["params_close"] and r["opt_close"] and r["frozen_equal"]


@pytest.mark.parametrize("method", ["full"])
def test_each_process_holds_its_half_and_each_device_an_eighth(results, method):
    for r in (results[0][method], results[1][method]):
        assert r["split_across_processes"] and r["local_devices"] == 4
        assert r["max_device_bytes"] * 8 == r["total_bytes"], r


def test_sharded_hf_load_fills_each_process_devices_with_their_slices(results):
    for r in (x["hf"] for x in results):
        assert r["equal"] and r["local_shards"] == [4]
        assert r["device_bytes"] == [r["total_bytes"] // 8]
