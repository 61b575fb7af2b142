"""experiments/bench/common.py: the per-op profile of a compiled step."""

import jax
import jax.numpy as jnp

from experiments.bench import common


def test_op_profile_names_the_dot_and_the_dropout_bits():
    def step(x, w, key):
        keep = jax.random.bernoulli(key, 0.9, x.shape)
        return jnp.tanh(jnp.where(keep, x, 0.0) @ w)

    args = (jnp.ones((64, 128)), jnp.ones((128, 256)), jax.random.key(0))
    compiled = jax.jit(step).lower(*args).compile()
    kinds = common.op_kinds(compiled.as_text())
    assert any(k.endswith(":dot_general") for k in kinds.values()), kinds
    assert any(k.endswith(":_bernoulli") for k in kinds.values()), kinds

    profile = common.op_profile(
        lambda: jax.block_until_ready(compiled(*args)), hlo_text=compiled.as_text(), top=50
    )
    by_kind = profile["by_kind_ms"]
    assert profile["op_ms_per_call"] > 0
    assert any(k.endswith(":dot_general") for k in by_kind), by_kind
    assert not any(k.startswith(common._RUNTIME_EVENTS) for k in by_kind), by_kind
