"""The GCN: the renormalised adjacency of the paper, dense and sparse propagation agree,
gradients match finite differences, and LoRA on its kernels trains only its own leaves."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import test_util

from ftlab import testing
from ftlab.core import partition
from ftlab.models import gcn
from ftlab.peft import lora

N, F, CLASSES = 9, 5, 3


@pytest.fixture(scope="module")
def graph():
    rng = np.random.default_rng(0)
    adjacency = rng.integers(0, 3, (N, N)) * (rng.random((N, N)) < 0.3)  # directed, weighted
    x = jnp.asarray(rng.normal(size=(N, F)), jnp.float32)
    return adjacency, x


def test_renormalized_adjacency_is_the_papers(graph):
    adjacency, _ = graph
    a = ((adjacency + adjacency.T) > 0).astype(float)
    np.fill_diagonal(a, 0)
    a_tilde = a + np.eye(N)
    d = np.diag(a_tilde.sum(1) ** -0.5)
    np.testing.assert_allclose(gcn.renormalized_adjacency(adjacency), d @ a_tilde @ d, rtol=1e-6)
    edges = gcn.renormalized_edges(adjacency)
    dense = np.zeros((N, N), np.float32)
    dense[edges.receivers, edges.senders] = edges.weights
    np.testing.assert_allclose(dense, d @ a_tilde @ d, rtol=1e-6)
    assert len(edges.weights) == int(a.sum()) + N


def test_dense_and_sparse_propagation_agree(graph):
    adjacency, x = graph
    dense, sparse = gcn.renormalized_adjacency(adjacency), gcn.renormalized_edges(adjacency)
    model = gcn.GCN((8, 4), num_classes=CLASSES)
    params = model.init(jax.random.key(0), dense, x)["params"]
    out = model.apply({"params": params}, dense, x)
    chex.assert_trees_all_close(model.apply({"params": params}, sparse, x), out, atol=1e-5)
    jitted = jax.jit(lambda p, g: model.apply({"params": p}, g, x))
    chex.assert_trees_all_close(jitted(params, sparse), out, atol=1e-5)
    with pytest.raises(ValueError, match="propagate: h has 4 rows, the graph 9 nodes"):
        gcn.propagate(sparse, x[:4])


def test_layer_gradients_match_finite_differences(graph):
    adjacency, x = graph
    layer = gcn.GCNLayer(4)
    a = jnp.asarray(gcn.renormalized_adjacency(adjacency))
    params = layer.init(jax.random.key(1), a, x)["params"]
    params = {**params, "bias": jnp.linspace(-0.5, 0.5, 4)}
    f = lambda p, h: jnp.sum(jnp.tanh(layer.apply({"params": p}, a, h)))  # noqa: E731
    test_util.check_grads(f, (params, x), order=1, modes=["rev"], eps=1e-2, atol=2e-2, rtol=2e-2)


def test_lora_on_gcn_kernels_trains_only_its_leaves(graph):
    adjacency, x = graph
    a = jnp.asarray(gcn.renormalized_adjacency(adjacency))
    model = gcn.GCN((8,), num_classes=CLASSES)
    params = model.init(jax.random.key(0), a, x)["params"]
    adapted = lora.init(params, jax.random.key(2), targets=[r"(layer_\d+|head)/dense"], rank=2,
                        alpha=4.0)  # fmt: skip
    assert sorted(k for k in partition.flatten(adapted) if "lora" in k) == [
        "head/dense/lora_a", "head/dense/lora_b", "layer_0/dense/lora_a", "layer_0/dense/lora_b"
    ]  # fmt: skip
    apply = lora.wrap_apply(
        lambda p, b, rng: model.apply({"params": p}, a, x)[b["nodes"]], alpha=4.0, rank=2
    )
    batch = {"nodes": jnp.arange(6), "label": jnp.asarray([0, 1, 2, 0, 1, 2])}
    testing.assert_trains_only(
        adapted, partition.labels(adapted, lora.rules()), optax.adam(1e-2), apply, batch, steps=3
    )
