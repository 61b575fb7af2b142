"""The meta-step is data parallel over tasks: 4 simulated devices give the 1-device numbers."""

import os
import pathlib
import subprocess
import sys

import numpy as np

_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, optax
from ftlab import meta
from ftlab.core import parallel, train
from ftlab.data import sinusoid
assert jax.device_count() == 4, jax.devices()

def loss_fn(p, b, rng):
    h = jax.nn.relu(b["x"] @ p["body"]["w"] + p["body"]["b"][None])
    return jnp.mean((h @ p["head"]["w"] - b["y"]) ** 2), {}

rng = np.random.default_rng(0)
params = {"body": {"w": rng.normal(size=(1, 8)), "b": rng.normal(size=8)},
          "head": {"w": rng.normal(size=(8, 1))}}
params = jax.tree.map(lambda a: a.astype(np.float32), params)
tx = optax.adam(1e-3)
kw = dict(inner_lr=0.02, num_steps=3)
for method, make in (("maml", meta.make_meta_step), ("reptile", meta.make_reptile_step)):
    out = []
    for n in (1, 4):
        plan = parallel.make_plan("mesh", num_devices=n)
        labels = jax.tree.map(lambda _: "train", params)
        state = plan.put_state(train.init_state(params, labels, tx, seed=0))
        step = plan.compile_train_step(make(loss_fn, tx, **kw))
        for i in range(2):
            t = sinusoid.sample(0, i, num_tasks=8, shots=5, query_shots=5)
            batch = {k: plan.put_batch(t[k]) for k in ("support", "query")}
            state, _ = step(state, batch)
        out.append(jax.device_get(state.trainable))
    diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), *out)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), out[0], params)
    print(method, max(jax.tree.leaves(diff)), max(jax.tree.leaves(moved)))
"""


def test_four_simulated_devices_match_one():
    root = pathlib.Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env["JAX_COMPILATION_CACHE_DIR"] = str(root / ".jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=root, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln.split() for ln in proc.stdout.splitlines()]
    assert [ln[0] for ln in lines] == ["maml", "reptile"]
    for method, diff, moved in lines:
        # The parameters moved (2 Adam steps of 1e-3) and moved the same on 1 and 4 devices.
        assert float(moved) > 1e-3, method
        np.testing.assert_array_less(float(diff), 1e-6, err_msg=method)
