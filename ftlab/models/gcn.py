"""Graph convolutional networks (Kipf & Welling 2017) whose weights are plain Dense leaves.

A layer is ``H' = Â H W``: an `nn.Dense` (``layer_<i>/dense``, so LoRA, DoRA and IA3 of
`ftlab.peft.dense` reach it unchanged), then propagation over the renormalised adjacency
``Â = D̃^-1/2 (A + I) D̃^-1/2`` with ``D̃`` the degrees of ``A + I`` (the paper's eq. 2; the
self-loops keep a node's own features, the symmetric normalisation keeps the spectrum in
[-1, 1] so stacking layers neither explodes nor vanishes). The graph comes in one of two forms,
and `propagate` takes either:

- dense: the [n, n] matrix ``Â`` (`renormalized_adjacency`); one matmul, best for a few
  thousand nodes;
- sparse: `Edges`, the non-zeros of ``Â`` as ``(senders, receivers, weights)``
  (`renormalized_edges`), propagated with `jax.ops.segment_sum` in O(edges) memory.

Both give the same numbers up to float reassociation (tested). The model calls the ``hidden``
hook after each layer (ReFT and the like see the nodes as one sequence ``[1, n, d]``).

References:
    Kipf & Welling, "Semi-Supervised Classification with Graph Convolutional Networks",
    https://arxiv.org/abs/1609.02907
    Kipf & Welling, "Variational Graph Auto-Encoders" (link prediction), https://arxiv.org/abs/1611.07308
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftlab.models import hooks

__all__ = [
    "GCN",
    "HEADS",
    "Edges",
    "GCNLayer",
    "Graph",
    "propagate",
    "renormalized_adjacency",
    "renormalized_edges",
]


class Edges(NamedTuple):
    """The non-zeros of a propagation matrix: ``out[r] += w * h[s]`` for each edge.

    Attributes:
        senders: `[e]` int source nodes.
        receivers: `[e]` int target nodes.
        weights: `[e]` float weights.
        num_nodes: Number of nodes. (Passed through `jax.jit` as an argument it becomes a
            traced leaf; `propagate` takes the static count from ``h`` and checks this one
            only while it is a Python int.)
    """

    senders: jax.Array
    receivers: jax.Array
    weights: jax.Array
    num_nodes: int


HEADS = ("gcn", "linear")

# A graph as `propagate` takes it: the dense [n, n] Â, or its non-zeros.
Graph = jax.Array | Edges


def _symmetric_binary(adjacency: np.ndarray, *, what: str) -> np.ndarray:
    a = np.asarray(adjacency)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{what}: adjacency must be a square [n, n] matrix, got {a.shape}")
    a = (a != 0) | (a.T != 0)
    np.fill_diagonal(a, False)
    return a


def renormalized_adjacency(adjacency: np.ndarray) -> np.ndarray:
    """``D̃^-1/2 (A + I) D̃^-1/2`` as a dense float32 [n, n] matrix.

    ``A`` is the undirected, unweighted graph of ``adjacency``: an edge wherever either
    direction is non-zero (GCN's propagation is defined for symmetric ``A``); its own diagonal
    is dropped before the identity is added, so every node has exactly one self-loop.

    Args:
        adjacency: `[n, n]` any numeric or boolean matrix.

    Returns:
        ``Â`` `[n, n]` float32.

    >>> renormalized_adjacency(np.array([[0, 1], [0, 0]])).tolist()
    [[0.5, 0.5], [0.5, 0.5]]
    """
    a = _symmetric_binary(adjacency, what="renormalized_adjacency").astype(np.float64)
    a += np.eye(len(a))
    d = 1.0 / np.sqrt(a.sum(1))
    return (d[:, None] * a * d[None, :]).astype(np.float32)


def renormalized_edges(adjacency: np.ndarray) -> Edges:
    """The non-zeros of `renormalized_adjacency` (self-loops included) as `Edges`.

    Args:
        adjacency: `[n, n]` matrix (see `renormalized_adjacency`).

    Returns:
        `Edges` with ``2 * undirected edges + n`` entries, in row-major order of ``Â``.
    """
    a = _symmetric_binary(adjacency, what="renormalized_edges")
    a |= np.eye(len(a), dtype=bool)
    receivers, senders = np.nonzero(a)  # row r of Â sums over its columns s
    degree = a.sum(1).astype(np.float64)
    weights = 1.0 / np.sqrt(degree[receivers] * degree[senders])
    return Edges(
        senders.astype(np.int32), receivers.astype(np.int32), weights.astype(np.float32), len(a)
    )


def propagate(graph: Graph, h: jax.Array) -> jax.Array:
    """``Â h`` for a dense ``Â`` [n, n] or its `Edges`; ``h`` is `[n, d]`.

    Raises:
        ValueError: ``h`` has another number of rows than the graph has nodes.
    """
    n = h.shape[0]
    expected = graph.num_nodes if isinstance(graph, Edges) else graph.shape[0]
    if isinstance(expected, int) and expected != n:
        raise ValueError(f"propagate: h has {n} rows, the graph {expected} nodes")
    if isinstance(graph, Edges):
        messages = graph.weights[:, None].astype(h.dtype) * h[graph.senders]
        return jax.ops.segment_sum(messages, graph.receivers, num_segments=n)
    return graph.astype(h.dtype) @ h


class GCNLayer(nn.Module):
    """``Â (h W) + b``: a Dense then propagation (the bias after, as in Kipf's code)."""

    features: int

    @nn.compact
    def __call__(self, graph: Graph, h: jax.Array) -> jax.Array:
        h = propagate(graph, nn.Dense(self.features, use_bias=False, name="dense")(h))
        h = h + self.param("bias", nn.initializers.zeros, (self.features,))[None]
        return hooks.hidden(self, h[None], jnp.ones((1, h.shape[0]), jnp.int32))[0]


class GCN(nn.Module):
    """Node embeddings or logits ``x [n, f] -> [n, out]`` over a graph.

    ``layer_0 .. layer_{k-1}`` of widths ``features`` with ReLU and dropout between them. With
    ``num_classes`` a ``head`` gives logits: ``head="gcn"`` a last GCN layer after a ReLU (the
    paper's two-layer model is ``features=(16,)``), ``head="linear"`` an `nn.Dense` on the last
    layer's output as it is (a linear probe of an encoder's embeddings). Without
    ``num_classes``, the last layer's output, without ReLU (an encoder, as in a graph
    auto-encoder).

    Attributes:
        features: Hidden widths.
        num_classes: Output classes; 0 for an encoder.
        dropout_rate: Dropout on each layer's input (the paper: 0.5).
        head: ``"gcn"`` or ``"linear"`` (see above).
    """

    features: Sequence[int] = (16,)
    num_classes: int = 0
    dropout_rate: float = 0.0
    head: str = "gcn"

    @nn.compact
    @hooks.track_root
    def __call__(self, graph: Graph, x: jax.Array, *, train: bool = False) -> jax.Array:
        if self.head not in HEADS:
            raise ValueError(f"GCN: head={self.head!r}; expected one of {HEADS}")
        h = x
        for i, width in enumerate(self.features):
            h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
            h = GCNLayer(width, name=f"layer_{i}")(graph, h)
            if i < len(self.features) - 1 or (self.num_classes and self.head == "gcn"):
                h = nn.relu(h)
        if self.num_classes:
            h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
            if self.head == "gcn":
                h = GCNLayer(self.num_classes, name="head")(graph, h)
            else:
                h = nn.Dense(self.num_classes, name="head")(h)
        return h
