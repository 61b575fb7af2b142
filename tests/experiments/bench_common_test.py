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


def test_speedups_compare_within_a_round_and_summaries_take_medians():
    def line(impl, round_, seconds, inner=1):
        return {"bench": "b", "impl": impl, "inner_steps": inner, "round": round_,
                "median_step_s": seconds}  # fmt: skip

    lines = [
        line("ours", 0, 1.0), line("peer", 0, 4.0),  # a fast round: 4x
        line("ours", 1, 3.0), line("peer", 1, 9.0),  # a slow round: 3x
        line("ours", 2, 1.0), line("peer", 2, 5.0),  # 5x
        line("ours", 0, 2.0, inner=5),  # its peer did not run
    ]  # fmt: skip
    common.round_speedups(lines, name="impl", group=("inner_steps",), peers=["peer"])
    assert [x["speedup_vs_peer"] for x in lines] == [4.0, 1.0, 3.0, 1.0, 5.0, 1.0, None]

    summary = common.summarize_rounds(lines, name="impl", group=("inner_steps",))
    ours = next(s for s in summary if s["impl"] == "ours" and s["inner_steps"] == 1)
    # The median of the rounds' ratios (4x), not the ratio of the median times (5 / 1 = 5x).
    assert ours["speedup_vs_peer"] == 4.0
    assert (ours["speedup_vs_peer_min"], ours["speedup_vs_peer_max"]) == (3.0, 5.0)
    assert ours["median_step_s"] == 1.0 and ours["rounds"] == 3
    lonely = next(s for s in summary if s["inner_steps"] == 5)
    assert lonely["speedup_vs_peer"] is None and lonely["rounds"] == 1
