"""The recurrent language model: LoRA reaches its cell kernels inside the scan, carries continue
a sequence exactly, and the hook sites are where a method expects them."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab import testing
from ftlab.core import partition, sites
from ftlab.models import hooks, rnn
from ftlab.peft import lora

RANK, ALPHA = 2, 4.0
RECURRENT = r"layer_\d+/cell/h[a-z]"


def _setup(cell):
    model = rnn.RNNLM(vocab_size=11, embed_dim=4, hidden=6, num_layers=2, cell=cell)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 11, (3, 7)), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    apply = lambda p, ids, carries=None, prompt=True: model.apply(  # noqa: E731
        {"params": p}, ids, carries, prompt=prompt
    )
    return model, params, apply, ids


@pytest.fixture(scope="module")
def setup():
    return _setup("gru")


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_lora_on_the_recurrent_kernels_takes_effect(cell):
    _, params, apply, ids = _setup(cell)
    adapted = lora.init(params, jax.random.key(1), targets=[RECURRENT], rank=RANK, alpha=ALPHA)
    chosen = [k for k in partition.flatten(adapted) if k.endswith("lora_b")]
    assert len(chosen) == 2 * (3 if "hr" in params["layer_0"]["cell"] else 4)
    wrapped = jax.jit(lora.wrap_apply(apply, alpha=ALPHA, rank=RANK))
    base = jax.jit(apply)(params, ids)[0]
    # lora_b = 0: the adapted model is the base model
    chex.assert_trees_all_close(wrapped(adapted, ids)[0], base, atol=1e-6)
    # a non-zero lora_b on the recurrent kernels only changes the output
    bumped = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 if partition.path_name(path).endswith("lora_b") else x, adapted
    )
    assert float(jnp.max(jnp.abs(wrapped(bumped, ids)[0] - base))) > 1e-3
    # without the wrapper nothing reads the leaves: an error naming them, not the base model
    with pytest.raises(sites.UnconsumedLeavesError, match=r"layer_0/cell/h\w/lora_a"):
        jax.jit(apply)(bumped, ids)  # raises while tracing


def test_lora_on_recurrent_kernels_trains_only_its_leaves(setup):
    _, params, apply, ids = setup
    adapted = lora.init(params, jax.random.key(1), targets=[RECURRENT], rank=RANK, alpha=ALPHA)
    wrapped = lora.wrap_apply(apply, alpha=ALPHA, rank=RANK)
    label_tree = partition.labels(adapted, lora.rules())
    batch = {"inputs": ids[:, :-1], "label": ids[:, 1:]}
    testing.assert_trains_only(
        adapted, label_tree, optax.adam(1e-2), lambda p, b, rng: wrapped(p, b["inputs"])[0],
        batch, steps=3,
    )  # fmt: skip


def test_carries_continue_a_sequence_exactly(setup):
    model, params, apply, ids = setup
    run = jax.jit(apply, static_argnums=3)
    zeros = rnn.initial_carries(model, ids.shape[0])
    full = run(params, ids, zeros, True)[0]
    head, carries = run(params, ids[:, :3], zeros, True)
    tail, _ = run(params, ids[:, 3:], carries, False)
    chex.assert_trees_all_close(jnp.concatenate([head, tail], 1), full, atol=1e-5)
    out = rnn.sample(apply, params, ids[:, :2], jax.random.key(0), steps=5)
    assert out.shape == (3, 5) and out.dtype == jnp.int32


def test_hook_sites_and_a_soft_prompt(setup):
    _, params, apply, ids = setup
    found = hooks.discover(lambda p, x: apply(p, x), params, ids)
    assert [(s.kind, s.path) for s in found] == [
        ("embeddings", ""), ("hidden", "layer_0"), ("hidden", "layer_1")
    ]  # fmt: skip
    assert found[0].table == "embed/embedding"
    prompted = {**params, hooks.PROMPT: jnp.ones((2, 4))}
    logits = apply(prompted, ids)[0]
    assert logits.shape == (3, 7, 11)  # prompt positions are not predicted
    assert float(jnp.max(jnp.abs(logits - apply(params, ids)[0]))) > 1e-4
