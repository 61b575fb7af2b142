"""Flax NNX models in ftlab: a module becomes a plain tree, and LoRA reaches its linear layers.

An NNX module holds its arrays itself; ftlab's verbs take plain trees. :func:`split` is the
bridge: it turns a module into a :class:`GraphDef` (nnx's graph definition, plus the leaf paths,
shapes and layer kinds ftlab checks against) and a nested dict of arrays whose slash paths are the
module's attribute paths (``layers/0/kernel``, ``head/bias``). Partition rules, the train step and
checkpoints take that tree as they take a linen tree; :func:`make_apply` gives back a pure
``apply(params, *args)`` to call inside a jitted loss::

    graphdef, params = ftlab.nnx.split(model)
    apply = ftlab.nnx.make_apply(graphdef)              # apply(params, x) == model(x)
    rules = [("head/.*", "train"), (".*", "frozen")]
    state = train.init_state(params, partition.labels(params, rules), tx, seed=0)

Non-parameter state (``nnx.BatchStat``, the ``nnx.Rngs`` a ``Dropout`` keeps, caches) is not
parameters: :func:`split` refuses a module that holds any, naming it, and
:func:`split_collections` returns it as a separate tree keyed by collection name, as linen does
(``{"batch_stats": {"bn": {"mean": ..., "var": ...}}}``). ``make_apply(graphdef,
collections=True)`` then gives ``apply(params, collections, *args) -> (out, collections)`` with
the state the call left behind (updated batch statistics, advanced rng counts).

LoRA (:func:`lora_init`, :func:`lora_merge`, :func:`lora_unmerge`) puts ``lora_a`` [in, r]
and ``lora_b`` [r, out] next to the kernel of each targeted ``nnx.Linear``,
``nnx.LinearGeneral``, ``nnx.Einsum`` or ``nnx.Conv``; "in" and "out" are the kernel's input
and output axes flattened (a convolution's kernel is read as (window x in, out), an einsum
kernel's axes are split by whether the input operand or the output names them). The model is
never edited: :func:`merge` rebuilds the module and replaces, on that fresh instance only, the
operation each layer already lets a user choose (``dot_general``, ``einsum_op``,
``conv_general_dilated``) with one that adds the low-rank term in factored form::

    Linear, LinearGeneral   y + s * (x . A) . B        (contracting the layer's input axes)
    Einsum                  y + s * einsum(einsum(x, A), B)
    Conv                    y + s * conv(x, A as a [*window, in, r] kernel) . B

with ``s = alpha / rank``. No [in, out] product of the factors is formed, so the gradient of the
adapter never builds a dense array the size of the frozen kernel. Applications go through
`ftlab.core.sites`: a LoRA leaf that no layer read during a call of ``apply`` is an error
naming it.

Layers LoRA cannot reach faithfully are refused by :func:`lora_init`, naming the layer: a
``LinearGeneral`` with ``batch_axis`` (one kernel per batch index), a grouped or masked ``Conv``,
an ``Einsum`` whose kernel shares an index with both the input and the output, or whose equation
is given only at call time, and layers stacked by ``nnx.vmap``/``nnx.scan`` (a kernel with a
leading layer axis). The bridge itself (split, apply, rules) takes all of these.

Integer keys of NNX containers (``nnx.List``) become strings in the tree, as in a checkpoint;
:func:`merge` turns them back, so a tree restored from disk merges too.

References:
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
    https://arxiv.org/abs/2106.09685
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from ftlab.core import partition, sites
from ftlab.types import Params, PRNGKey, PyTree

__all__ = [
    "LAYER_TYPES",
    "LORA_A",
    "LORA_B",
    "GraphDef",
    "LayerInfo",
    "lora_init",
    "lora_merge",
    "lora_unmerge",
    "make_apply",
    "merge",
    "split",
    "split_collections",
]

LORA_A, LORA_B = "lora_a", "lora_b"
# The NNX layers LoRA reaches, each through the operation it lets a user replace.
LAYER_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)
_LORA_NAMES = (LORA_A, LORA_B)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What ftlab needs to know about one layer LoRA may reach (static, hashable).

    Attributes:
        path: The layer's slash path in the module, e.g. ``layers/0``.
        kind: ``"Linear"``, ``"LinearGeneral"``, ``"Einsum"`` or ``"Conv"``.
        cls: The layer's class (a subclass of the kind's class counts as that kind).
        kernel_shape: The kernel's shape.
        in_axes: The kernel axes that ``lora_a``'s rows flatten, in kernel order.
        out_axes: The kernel axes that ``lora_b``'s columns flatten, in kernel order.
        einsum_str: The equation of an ``Einsum`` (None for other kinds).
        problem: Why LoRA cannot reach this layer, or None when it can.
    """

    path: str
    kind: str
    cls: type
    kernel_shape: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    einsum_str: str | None = None
    problem: str | None = None

    @property
    def in_size(self) -> int:
        return int(np.prod([self.kernel_shape[i] for i in self.in_axes]))

    @property
    def out_size(self) -> int:
        return int(np.prod([self.kernel_shape[i] for i in self.out_axes]))


@dataclasses.dataclass(frozen=True)
class GraphDef:
    """An NNX graph definition plus the leaf paths ftlab checks trees against.

    Hashable and free of arrays, so a function can close over it under `jax.jit`.

    Attributes:
        graph: nnx's own graph definition (``nnx.merge(graphdef.graph, state)`` works too).
        params: ``(slash path, nnx key path, shape, dtype)`` of every ``nnx.Param`` leaf.
        collections: ``(collection, slash path, nnx key path, shape, dtype)`` of every other
            variable (empty for a graph made by :func:`split`).
        layers: The layers of :data:`LAYER_TYPES`, in module order.
        modules: ``(slash path, class name)`` of every submodule, for error messages.
    """

    graph: Any
    params: tuple[tuple[str, tuple, tuple[int, ...], Any], ...]
    collections: tuple[tuple[str, str, tuple, tuple[int, ...], Any], ...]
    layers: tuple[LayerInfo, ...]
    modules: tuple[tuple[str, str], ...]


# --- the bridge -----------------------------------------------------------------------------


def split(module: nnx.Module) -> tuple[GraphDef, Params]:
    """Splits an NNX module into its graph definition and a plain tree of its parameters.

    Args:
        module: An ``nnx.Module`` holding only ``nnx.Param`` variables.

    Returns:
        ``(graphdef, params)``: ``params`` is a nested dict of arrays (string keys) whose slash
        paths are the module's attribute paths, e.g. ``layers/0/kernel``. The arrays are the
        module's own (no copy).

    Raises:
        ValueError: the module holds other variables (batch statistics, rng state, caches):
            the message names them; use :func:`split_collections`. Or a key contains ``/``.

    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> graphdef, params = split(model)
    >>> sorted(partition.flatten(params))
    ['bias', 'kernel']
    """
    graphdef, params, collections = _split(module, "split")
    if collections:
        flat = [(c, p) for c, p, *_ in graphdef.collections]
        shown = ", ".join(f"{p} ({c})" for c, p in flat[:6])
        raise ValueError(
            f"split: module holds {len(flat)} non-parameter variables: {shown}"
            + (f" and {len(flat) - 6} more" if len(flat) > 6 else "")
            + ". Use split_collections(module) to get them as a separate tree, and "
            "make_apply(graphdef, collections=True) to carry them through a call."
        )
    return graphdef, params


def split_collections(module: nnx.Module) -> tuple[GraphDef, Params, dict]:
    """Splits an NNX module into its graph, its parameters and its other state by collection.

    Args:
        module: Any ``nnx.Module``.

    Returns:
        ``(graphdef, params, collections)``; ``collections`` maps a collection name (nnx's name
        for the variable type: ``batch_stats`` for ``nnx.BatchStat``, ``cache`` for
        ``nnx.Cache``; the snake-case type name otherwise, e.g. ``rng_key``) to a nested dict of
        that type's arrays at their module paths. ``{}`` when the module holds only parameters.

    >>> model = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    >>> graphdef, params, collections = split_collections(model)
    >>> sorted(partition.flatten(collections))
    ['batch_stats/mean', 'batch_stats/var']
    """
    return _split(module, "split_collections")


def merge(
    graphdef: GraphDef,
    params: Params,
    collections: Mapping[str, PyTree] | None = None,
    *,
    alpha: float | None = None,
    rank: int | None = None,
) -> nnx.Module:
    """Rebuilds the NNX module from a tree; LoRA leaves, if any, act in factored form.

    The result is a fresh module: LoRA is attached to that instance only (by replacing each
    adapted layer's ``dot_general``, ``einsum_op`` or ``conv_general_dilated``), so nothing
    outside it changes. Prefer :func:`make_apply` inside a loss: it also checks that every LoRA
    leaf was read by the call.

    Args:
        graphdef: From :func:`split` or :func:`split_collections`.
        params: The parameter tree, possibly with ``lora_a``/``lora_b`` next to layer kernels
            (:func:`lora_init`) and possibly with string keys where the module has integers.
        collections: The non-parameter state by collection, required exactly when ``graphdef``
            has some.
        alpha: LoRA's alpha; required when ``params`` holds LoRA leaves.
        rank: LoRA's rank; required with ``alpha`` and checked against the leaves' shapes.

    Returns:
        An ``nnx.Module`` equal in structure to the one :func:`split` was given.

    Raises:
        ValueError: ``params`` or ``collections`` do not fit the graph (paths only in one of
            them are named, or a shape differs); LoRA leaves without ``alpha``/``rank``, with
            another rank, half a pair, of the wrong shape, or next to a module LoRA cannot reach.

    >>> graphdef, params = split(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    >>> merge(graphdef, params)(jnp.ones((1, 2))).shape
    (1, 3)
    """
    module, _ = _build(graphdef, params, collections, alpha=alpha, rank=rank, what="merge")
    return module


def make_apply(
    graphdef: GraphDef,
    *,
    method: str | None = None,
    alpha: float | None = None,
    rank: int | None = None,
    collections: bool = False,
) -> Callable:
    """Builds a pure function that calls the module rebuilt from a tree.

    Call it inside the traced function (the loss), and `jax.jit` outside: each trace rebuilds
    the module from the tree's (traced) arrays and checks, while tracing, that every LoRA leaf
    was read by a layer.

    Args:
        graphdef: From :func:`split` or :func:`split_collections`.
        method: The module's method to call; None calls the module itself.
        alpha: LoRA's alpha, needed when the trees given to ``apply`` hold LoRA leaves.
        rank: LoRA's rank, checked against the leaves.
        collections: If True, ``apply(params, collections, *args, **kwargs)`` returns
            ``(out, collections)`` with the state the call left (for a graph with
            non-parameter variables); if False, ``apply(params, *args, **kwargs)`` returns the
            output alone.

    Returns:
        The apply function described above.

    Raises:
        ValueError: ``collections`` is False but the graph has non-parameter variables (they
            would be lost), or ``method`` is not a method of the module.
        sites.UnconsumedLeavesError: (from ``apply``) a LoRA leaf was read by no layer during
            the call, e.g. because that layer is never called.

    >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    >>> graphdef, params = split(model)
    >>> apply = make_apply(graphdef)
    >>> bool(jnp.all(jax.jit(apply)(params, jnp.ones((1, 2))) == model(jnp.ones((1, 2)))))
    True
    """
    if graphdef.collections and not collections:
        names = sorted({c for c, *_ in graphdef.collections})
        raise ValueError(
            f"make_apply: the graph holds non-parameter collections {names}; pass "
            "collections=True and call apply(params, collections, *args), which returns "
            "(out, collections)."
        )
    what = "make_apply(...)(params, ...)"

    def run(params, cols, args, kwargs):
        with sites.tracking(params, what=what):
            module, _ = _build(graphdef, params, cols, alpha=alpha, rank=rank, what=what)
            # A model's own parameter whose name is also a method's leaf name (a Param called
            # `prompt`, say) is read by the model itself.
            for path, *_ in graphdef.params:
                if any(p in sites.METHOD_NAMES for p in path.split("/")):
                    sites.consume(path)
            if method is None:
                fn = module
            else:
                fn = getattr(module, method, None)
                if not callable(fn):
                    raise ValueError(
                        f"make_apply: method={method!r} is not a method of {type(module).__name__}."
                    )
            out = fn(*args, **kwargs)
        return out, module

    if collections:

        def apply_with_collections(params, cols, *args, **kwargs):
            out, module = run(params, cols, args, kwargs)
            return out, _collections_of(module)

        return apply_with_collections

    def apply(params, *args, **kwargs):
        return run(params, None, args, kwargs)[0]

    return apply


# --- LoRA -----------------------------------------------------------------------------------


def lora_init(
    graphdef: GraphDef,
    params: Params,
    rng: PRNGKey,
    *,
    targets: Sequence[str | type],
    rank: int,
    alpha: float,
) -> Params:
    """Adds ``lora_a`` [in, r] and ``lora_b`` [r, out] next to the kernel of each targeted layer.

    ``lora_a`` is uniform on ``[-1/sqrt(in), 1/sqrt(in)]`` (HF PEFT's default), ``lora_b`` is
    zeros, so the adapted model equals the base model at init.

    Args:
        graphdef: From :func:`split` (it knows each layer's kind and kernel layout).
        params: The parameter tree from :func:`split` (without LoRA leaves).
        rng: PRNG key; the ``i``-th targeted layer (module order) uses ``fold_in(rng, i)``.
        targets: Regexes ``re.fullmatch``-ed against layer paths (``r"layers/\\d+"``), and/or
            layer classes from :data:`LAYER_TYPES` (``nnx.Einsum`` targets every einsum layer).
        rank: The adapter rank r, ``1 <= r <= min(in, out)`` for every targeted layer.
        alpha: LoRA's alpha (the scale is ``alpha / rank``, given again to :func:`make_apply`).

    Returns:
        A new tree with the LoRA leaves added; every other leaf is the same object as before.

    Raises:
        ValueError: a target matches no layer LoRA reaches (the layers are listed; a module of
            another kind that it matches is named), a class target is not a layer LoRA
            reaches, a targeted layer has a layout LoRA cannot reach (named with the reason),
            the rank or alpha is out of range, or a layer already holds LoRA leaves.

    References:
        Hu et al. 2021, https://arxiv.org/abs/2106.09685

    >>> graphdef, params = split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    >>> params = lora_init(graphdef, params, jax.random.key(0), targets=[nnx.Linear], rank=2,
    ...                    alpha=4.0)
    >>> params["lora_a"].shape, params["lora_b"].shape
    ((4, 2), (2, 3))
    """
    if isinstance(targets, (str, type)):
        raise ValueError(
            f"lora_init: targets must be a list of regexes or layer classes, got {targets!r}; "
            f"write [{targets!r}]."
        )
    targets = list(targets)
    if not targets:
        raise ValueError("lora_init: targets is empty; name at least one layer regex or class.")
    _check_rank_value(rank, "lora_init: rank")
    _check_alpha(alpha, "lora_init: alpha")
    chosen: list[LayerInfo] = []
    for i, target in enumerate(targets):
        hits = _match_target(graphdef, target, f"lora_init: targets[{i}]")
        chosen.extend(h for h in hits if h not in chosen)
    chosen = [layer for layer in graphdef.layers if layer in chosen]  # module order
    flat = partition.flatten(params)
    for layer in chosen:
        if layer.problem:
            raise ValueError(
                f"lora_init: targets: LoRA cannot reach {layer.path} ({layer.cls.__name__}): "
                f"{layer.problem}. Drop it from targets."
            )
        present = [f"{_join(layer.path, n)}" for n in _LORA_NAMES if _join(layer.path, n) in flat]
        if present:
            raise ValueError(
                f"lora_init: {present[0]} already exists; start from the base parameters, or "
                "fold the existing adapter in first with lora_merge(...)."
            )
        if rank > min(layer.in_size, layer.out_size):
            raise ValueError(
                f"lora_init: rank={rank} exceeds min(in, out)="
                f"{min(layer.in_size, layer.out_size)} of {layer.path} ({layer.kind}, kernel "
                f"{list(layer.kernel_shape)} read as [{layer.in_size}, {layer.out_size}]); use "
                f"a smaller rank or drop {layer.path} from targets."
            )
    out = dict(flat)
    for i, layer in enumerate(chosen):
        kernel = flat[_join(layer.path, "kernel")]
        key = jax.random.fold_in(rng, i)
        bound = 1.0 / math.sqrt(layer.in_size)
        out[_join(layer.path, LORA_A)] = jax.random.uniform(
            key, (layer.in_size, rank), kernel.dtype, minval=-bound, maxval=bound
        )
        out[_join(layer.path, LORA_B)] = jnp.zeros((rank, layer.out_size), kernel.dtype)
    return partition.unflatten(out)


def lora_merge(graphdef: GraphDef, params: Params, *, alpha: float, rank: int) -> Params:
    """Folds the LoRA leaves into their kernels: a plain tree for the base model.

    ``kernel + alpha / rank * (lora_a @ lora_b)`` reshaped (and, for an einsum whose input and
    output axes interleave in the kernel, transposed) to the kernel's layout, in the kernel's
    dtype. The LoRA leaves are dropped.

    Args:
        graphdef: From :func:`split`.
        params: A tree with LoRA leaves (from :func:`lora_init`, trained or not).
        alpha: LoRA's alpha.
        rank: LoRA's rank; must equal the leaves' rank.

    Returns:
        A tree with the base model's leaves only; ``make_apply(graphdef)`` on it gives the
        adapted model's outputs (within float tolerance) at the base model's cost.

    Raises:
        ValueError: ``params`` holds no LoRA leaves, or they are inconsistent (half a pair, a
            shape or rank that does not fit, next to a module LoRA cannot reach).

    >>> graphdef, params = split(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    >>> params = lora_init(graphdef, params, jax.random.key(0), targets=[".*"], rank=1,
    ...                    alpha=1.0)
    >>> sorted(lora_merge(graphdef, params, alpha=1.0, rank=1))
    ['bias', 'kernel']
    """
    _check_alpha(alpha, "lora_merge: alpha")
    _check_rank_value(rank, "lora_merge: rank")
    flat = partition.flatten(params)
    lora = _lora_leaves(graphdef, flat, rank=rank, what="lora_merge", need_scale=False)
    if not lora:
        raise ValueError(
            "lora_merge: params hold no lora_a/lora_b leaves; nothing to merge (they are added "
            "by lora_init)."
        )
    scale = float(alpha) / int(rank)
    adapter = {_join(path, n) for path in lora for n in _LORA_NAMES}
    out = {}
    for name, leaf in flat.items():
        parent, _, last = name.rpartition("/")
        if name in adapter:
            continue
        if last == "kernel" and parent in lora:
            layer, a, b = lora[parent]
            leaf = (leaf + scale * _dense_delta(layer, a, b)).astype(leaf.dtype)
        out[name] = leaf
    return partition.unflatten(out)


def lora_unmerge(
    graphdef: GraphDef, merged: Params, adapter: Params, *, alpha: float, rank: int
) -> Params:
    """Undoes :func:`lora_merge`: subtracts the update from the kernels and puts the leaves back.

    Args:
        graphdef: From :func:`split`.
        merged: A tree from :func:`lora_merge` (no LoRA leaves).
        adapter: The LoRA leaves that were merged (a tree holding at least them; other leaves
            are ignored), e.g. the trained tree itself.
        alpha: LoRA's alpha.
        rank: LoRA's rank; must equal the leaves' rank.

    Returns:
        The unmerged tree; its kernels equal the originals within float rounding.

    Raises:
        ValueError: ``merged`` still holds LoRA leaves, or ``adapter`` holds none or ones
            that do not fit (as in :func:`lora_merge`).
    """
    _check_alpha(alpha, "lora_unmerge: alpha")
    _check_rank_value(rank, "lora_unmerge: rank")
    flat = partition.flatten(merged)
    if _lora_leaves(graphdef, flat, rank=None, what="lora_unmerge", need_scale=False):
        raise ValueError("lora_unmerge: merged still holds LoRA leaves; it was not merged.")
    adapter_flat = {
        k: v for k, v in partition.flatten(adapter).items() if k.rpartition("/")[2] in _LORA_NAMES
    }
    lora = _lora_leaves(graphdef, adapter_flat, rank=rank, what="lora_unmerge", need_scale=False)
    if not lora:
        raise ValueError("lora_unmerge: adapter holds no lora_a/lora_b leaves.")
    scale = float(alpha) / int(rank)
    out = {}
    for name, leaf in flat.items():
        parent, _, last = name.rpartition("/")
        if last == "kernel" and parent in lora:
            layer, a, b = lora[parent]
            leaf = (leaf - scale * _dense_delta(layer, a, b)).astype(leaf.dtype)
        out[name] = leaf
    return partition.unflatten(out | adapter_flat)


# --- internals ------------------------------------------------------------------------------


def _join(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def _key_str(key: Any) -> str:
    s = str(key)
    if "/" in s:
        raise ValueError(
            f"split: the module has an entry named {s!r}; ftlab's leaf paths join names with "
            "'/', so a name must not contain one. Rename it."
        )
    return s


def _slash(key_path: Sequence) -> str:
    return "/".join(_key_str(k) for k in key_path)


def _collection_name(var_type: type) -> str:
    try:
        return nnx.variable_name_from_type(var_type)
    except ValueError:
        # Types nnx has no collection name for (RngKey, RngCount, a user's own Variable).
        return re.sub(r"(?<!^)(?=[A-Z])", "_", var_type.__name__).lower()


def _split(module: nnx.Module, what: str) -> tuple[GraphDef, Params, dict]:
    if not isinstance(module, nnx.Module):
        raise ValueError(f"{what}: expected an nnx.Module, got {type(module).__name__}.")
    graph, param_state, rest_state = nnx.split(module, nnx.Param, ...)
    params_meta, params = [], {}
    for key_path, var in nnx.to_flat_state(param_state):
        value = var.get_value()
        name = _slash(key_path)
        params_meta.append((name, tuple(key_path), tuple(np.shape(value)), _dtype(value)))
        params[name] = value
    cols_meta, cols = [], {}
    for key_path, var in nnx.to_flat_state(rest_state):
        value = var.get_value()
        col = _collection_name(type(var))
        name = _slash(key_path)
        cols_meta.append((col, name, tuple(key_path), tuple(np.shape(value)), _dtype(value)))
        cols[_join(col, name)] = value
    modules, layers = [], []
    for key_path, sub in nnx.iter_modules(module):
        path = _slash(key_path)
        modules.append((path, type(sub).__name__))
        if isinstance(sub, LAYER_TYPES):
            layers.append(_layer_info(path, sub))
    graphdef = GraphDef(
        graph=graph,
        params=tuple(params_meta),
        collections=tuple(cols_meta),
        layers=tuple(sorted(layers, key=lambda info: _order(params_meta, info.path))),
        modules=tuple(sorted(modules)),
    )
    return graphdef, partition.unflatten(params), partition.unflatten(cols)


def _dtype(value: Any) -> Any:
    return getattr(value, "dtype", type(value))  # numpy's or JAX's (typed PRNG keys)


def _order(params_meta, path: str) -> int:
    kernel = _join(path, "kernel")
    for i, (name, *_) in enumerate(params_meta):
        if name == kernel:
            return i
    return len(params_meta)


def _layer_info(path: str, layer: nnx.Module) -> LayerInfo:
    shape = tuple(layer.kernel.shape)
    problem = None
    einsum_str = None
    if isinstance(layer, nnx.Linear):
        kind, in_axes, out_axes = "Linear", (0,), (1,)
        expected_ndim = 2
    elif isinstance(layer, nnx.LinearGeneral):
        kind = "LinearGeneral"
        n_in = len(layer.in_features)
        in_axes, out_axes = tuple(range(n_in)), tuple(range(n_in, len(shape)))
        expected_ndim = len(layer.batch_axis) + n_in + len(layer.out_features)
        if layer.batch_axis:
            problem = "it has batch_axis (one kernel per batch index, so one adapter would not do)"
    elif isinstance(layer, nnx.Einsum):
        kind = "Einsum"
        einsum_str = layer.einsum_str
        in_axes, out_axes, problem = _einsum_axes(einsum_str, len(shape))
        expected_ndim = len(shape)
    else:
        kind = "Conv"
        in_axes, out_axes = tuple(range(len(shape) - 1)), (len(shape) - 1,)
        expected_ndim = len(layer.kernel_size) + 2
        if layer.feature_group_count != 1:
            problem = (
                f"feature_group_count={layer.feature_group_count} (a grouped kernel is not one "
                "(window x in, out) matrix)"
            )
        elif layer.mask is not None:
            problem = "it has a kernel mask (the low-rank update would not be masked)"
    if len(shape) != expected_ndim:
        # e.g. layers stacked by nnx.vmap / nnx.scan: one kernel per layer along a leading axis.
        problem = (
            f"its kernel has shape {list(shape)}, not the {expected_ndim}-D kernel of one "
            f"{kind} (stacked layers?)"
        )
    return LayerInfo(
        path=path,
        kind=kind,
        cls=type(layer),
        kernel_shape=shape,
        in_axes=in_axes,
        out_axes=out_axes,
        einsum_str=einsum_str,
        problem=problem,
    )


def _einsum_parts(einsum_str: str) -> tuple[str, str, str]:
    lhs, rest = einsum_str.split(",")
    rhs, out = rest.split("->")
    return lhs, rhs, out


def _einsum_axes(einsum_str: str | None, ndim: int):
    if einsum_str is None:
        return (
            (),
            (),
            "its einsum_str is given only at call time, so the kernel's layout is unknown",
        )
    lhs, rhs, out = _einsum_parts(einsum_str)
    if "." in rhs or len(set(rhs)) != len(rhs) or len(rhs) != ndim:
        return (), (), f"its kernel subscripts {rhs!r} are not one distinct letter per axis"
    in_axes, out_axes = [], []
    for i, c in enumerate(rhs):
        if c in lhs and c in out:
            return (), (), f"kernel index {c!r} of {einsum_str!r} is shared by input and output"
        if c in lhs:
            in_axes.append(i)
        elif c in out:
            out_axes.append(i)
        else:
            return (), (), f"kernel index {c!r} of {einsum_str!r} is summed over the kernel alone"
    if not in_axes or not out_axes:
        return (), (), f"{einsum_str!r} has no input or no output axis on the kernel"
    return tuple(in_axes), tuple(out_axes), None


def _match_target(graphdef: GraphDef, target: str | type, what: str) -> list[LayerInfo]:
    available = ", ".join(f"{x.path or '(root)'} ({x.kind})" for x in graphdef.layers) or "none"
    kinds = ", ".join(f"nnx.{t.__name__}" for t in LAYER_TYPES)
    if isinstance(target, type):
        if not issubclass(target, LAYER_TYPES):
            raise ValueError(
                f"{what}: {target.__name__} is not a layer LoRA reaches; it reaches {kinds}."
            )
        hits = [x for x in graphdef.layers if issubclass(x.cls, target)]
        if not hits:
            raise ValueError(
                f"{what}: the module has no {target.__name__} layer; layers LoRA reaches: "
                f"{available}."
            )
        return hits
    if not isinstance(target, str):
        raise ValueError(f"{what}: expected a regex or a layer class, got {target!r}.")
    try:
        regex = re.compile(target)
    except re.error as e:
        raise ValueError(f"{what}: invalid regex {target!r}: {e}") from None
    hits = [x for x in graphdef.layers if regex.fullmatch(x.path)]
    if not hits:
        others = [f"{p} ({t})" for p, t in graphdef.modules if regex.fullmatch(p)]
        if others:
            raise ValueError(
                f"{what}: pattern {target!r} matches {', '.join(others[:4])}, not a layer LoRA "
                f"reaches ({kinds}); layers it reaches: {available}."
            )
        raise ValueError(
            f"{what}: pattern {target!r} matched no layer. Targets are matched against layer "
            f"paths (without '/kernel'); layers LoRA reaches: {available}."
        )
    return hits


def _lora_leaves(
    graphdef: GraphDef, flat: Mapping[str, Any], *, rank: int | None, what: str, need_scale: bool
) -> dict[str, tuple[LayerInfo, Any, Any]]:
    """``{layer path: (info, lora_a, lora_b)}``, checked against the graph."""
    layers = {x.path: x for x in graphdef.layers}
    module_types = dict(graphdef.modules)
    # The model's own variables may bear these names too (flax's nnx.LoRA holds `lora_a`).
    own = {name for name, *_ in graphdef.params}
    pairs: dict[str, dict[str, Any]] = {}
    for name, leaf in flat.items():
        parent, _, last = name.rpartition("/")
        if last in _LORA_NAMES and name not in own:
            pairs.setdefault(parent, {})[last] = (name, leaf)
    out = {}
    for path, pair in pairs.items():
        some = next(iter(pair.values()))[0]
        layer = layers.get(path)
        if layer is None:
            found = module_types.get(path)
            raise ValueError(
                f"{what}: {some} sits next to "
                + (f"{path or '(root)'}, a {found}" if found else f"{path!r}, not a module")
                + "; LoRA reaches "
                + ", ".join(f"nnx.{t.__name__}" for t in LAYER_TYPES)
                + " layers only."
            )
        if layer.problem:
            raise ValueError(f"{what}: LoRA cannot reach {path} ({layer.kind}): {layer.problem}.")
        if len(pair) != 2:
            missing = LORA_B if LORA_A in pair else LORA_A
            raise ValueError(f"{what}: {some} has no {_join(path, missing)}; LoRA needs both.")
        (_, a), (_, b) = pair[LORA_A], pair[LORA_B]
        r = np.shape(a)[-1] if np.ndim(a) == 2 else None
        if np.shape(a) != (layer.in_size, r) or np.shape(b) != (r, layer.out_size):
            raise ValueError(
                f"{what}: {_join(path, LORA_A)} {list(np.shape(a))} and {_join(path, LORA_B)} "
                f"{list(np.shape(b))} do not fit {path}'s kernel {list(layer.kernel_shape)} read "
                f"as [{layer.in_size}, {layer.out_size}]; expected [{layer.in_size}, r] and "
                f"[r, {layer.out_size}]."
            )
        if need_scale and rank is None:
            raise ValueError(
                f"{what}: params hold LoRA leaves ({_join(path, LORA_A)}, ...) but no alpha and "
                "rank were given; pass alpha= and rank= (the scale alpha / rank is not a leaf), "
                "or fold the adapter in with lora_merge first."
            )
        if rank is not None and r != rank:
            raise ValueError(
                f"{what}: rank={rank} but {_join(path, LORA_A)} has rank {r}; the scale "
                "alpha / rank would be wrong. Pass the rank the adapter was made with."
            )
        out[path] = (layer, a, b)
    return out


def _build(graphdef, params, collections, *, alpha, rank, what):
    """The module rebuilt from trees, with LoRA attached; also ``{path: (info, a, b)}``."""
    if not isinstance(graphdef, GraphDef):
        raise ValueError(
            f"{what}: graphdef must come from ftlab.nnx.split or split_collections, got "
            f"{type(graphdef).__name__}."
        )
    if (alpha is None) != (rank is None):
        raise ValueError(f"{what}: give alpha and rank together (got alpha={alpha}, rank={rank}).")
    if rank is not None:
        _check_rank_value(rank, f"{what}: rank")
        _check_alpha(alpha, f"{what}: alpha")
    flat = partition.flatten(params)
    lora = _lora_leaves(graphdef, flat, rank=rank, what=what, need_scale=True)
    adapter = {_join(path, n) for path in lora for n in _LORA_NAMES}
    base = {k: v for k, v in flat.items() if k not in adapter}
    param_state = _rebuild(
        [(name, key_path, shape) for name, key_path, shape, _ in graphdef.params],
        base,
        what=f"{what}: params",
    )
    states = [param_state]
    if graphdef.collections:
        if collections is None:
            names = sorted({c for c, *_ in graphdef.collections})
            raise ValueError(f"{what}: the graph holds collections {names}; pass collections.")
        states.append(
            _rebuild(
                [(_join(c, n), kp, s) for c, n, kp, s, _ in graphdef.collections],
                partition.flatten(collections),
                what=f"{what}: collections",
            )
        )
    elif collections:
        raise ValueError(
            f"{what}: collections given ({sorted(collections)}) but the graph has none."
        )
    module = nnx.merge(graphdef.graph, *states)
    if lora:
        scale = float(alpha) / int(rank)
        modules = {_slash(p): m for p, m in nnx.iter_modules(module)}
        for path, (layer, a, b) in lora.items():
            _attach(modules[path], layer, a, b, scale)
    return module, lora


def _rebuild(expected, flat: Mapping[str, Any], *, what: str) -> dict:
    """A nested dict with nnx's own keys (ints for list items) from a slash-keyed flat tree."""
    names = {name for name, *_ in expected}
    only_tree = sorted(k for k in flat if k not in names)
    only_model = sorted(n for n in names if n not in flat)
    if only_tree or only_model:
        extra = [k for k in only_tree if any(p in sites.METHOD_NAMES for p in k.split("/"))]
        hint = (
            f" ({', '.join(extra[:3])} belong to methods ftlab.nnx does not apply; it applies "
            "LoRA only)"
            if extra
            else ""
        )
        raise ValueError(
            f"{what} do not fit the module: only in the tree {only_tree[:6]}, only in the module "
            f"{only_model[:6]}{hint}."
        )
    out: dict = {}
    for name, key_path, shape in expected:
        leaf = flat[name]
        if tuple(np.shape(leaf)) != tuple(shape):
            raise ValueError(
                f"{what}: {name} has shape {list(np.shape(leaf))}; the module expects "
                f"{list(shape)}."
            )
        node = out
        for k in key_path[:-1]:
            node = node.setdefault(k, {})
        node[key_path[-1]] = leaf
    return out


def _collections_of(module: nnx.Module) -> dict:
    rest = nnx.state(module, nnx.Not(nnx.Param))
    out = {}
    for key_path, var in nnx.to_flat_state(rest):
        out[_join(_collection_name(type(var)), _slash(key_path))] = var.get_value()
    return partition.unflatten(out)


def _lowrank(x, a_k, b, lhs_contract, precision):
    """``(x . a_k) . b``: contract ``x``'s axes ``lhs_contract`` with ``a_k``'s leading axes."""
    low = jax.lax.dot_general(
        x, a_k, ((tuple(lhs_contract), tuple(range(len(lhs_contract)))), ((), ())),
        precision=precision,
    )  # fmt: skip
    return jax.lax.dot_general(
        low, b, (((low.ndim - 1,), (0,)), ((), ())), precision=precision
    )  # [..., *out]


def _attach(layer: nnx.Module, info: LayerInfo, a, b, scale: float) -> None:
    """Replaces the layer's own operation, on this instance, with one adding the LoRA term."""
    path, r = info.path, np.shape(a)[-1]
    in_shape = tuple(info.kernel_shape[i] for i in info.in_axes)
    out_shape = tuple(info.kernel_shape[i] for i in info.out_axes)

    def factors(dtype):
        return a.reshape(*in_shape, r).astype(dtype), b.reshape(r, *out_shape).astype(dtype)

    if info.kind in ("Linear", "LinearGeneral"):
        if getattr(layer, "dot_general_cls", None) is not None:
            cls = layer.dot_general_cls
            layer.dot_general_cls = None

            def orig(*args, **kwargs):
                return cls()(*args, **kwargs)

        else:
            orig = layer.dot_general or jax.lax.dot_general

        def dot_general(x, kernel, dimension_numbers, precision=None, **kwargs):
            y = orig(x, kernel, dimension_numbers, precision=precision, **kwargs)
            (lhs_c, rhs_c), (lhs_b, _) = dimension_numbers
            if tuple(rhs_c) != info.in_axes or tuple(lhs_b):
                raise ValueError(  # a subclass calling dot_general differently
                    f"{path}: dot_general called with dimension_numbers {dimension_numbers}, "
                    f"not the {info.kind} layout the LoRA leaves were made for."
                )
            a_k, b_k = factors(x.dtype)
            sites.consume(path, LORA_A, LORA_B)
            return y + (scale * _lowrank(x, a_k, b_k, lhs_c, precision)).astype(y.dtype)

        layer.dot_general = dot_general
    elif info.kind == "Einsum":
        orig_einsum = layer.einsum_op
        lhs, rhs, out = _einsum_parts(info.einsum_str)
        letter = next(c for c in "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA"
                      if c not in info.einsum_str)  # fmt: skip
        ins = "".join(rhs[i] for i in info.in_axes)
        outs = "".join(rhs[i] for i in info.out_axes)
        keep = "".join(c for c in lhs if c not in ins)

        def einsum_op(einsum_str, x, kernel, precision=None, **kwargs):
            y = orig_einsum(einsum_str, x, kernel, precision=precision, **kwargs)
            if einsum_str != info.einsum_str:
                raise ValueError(
                    f"{path}: called with einsum_str {einsum_str!r}; its LoRA leaves were made "
                    f"for {info.einsum_str!r}."
                )
            a_k, b_k = factors(x.dtype)
            low = jnp.einsum(f"{lhs},{ins}{letter}->{keep}{letter}", x, a_k, precision=precision)
            term = jnp.einsum(
                f"{keep}{letter},{letter}{outs}->{out}", low, b_k, precision=precision
            )
            sites.consume(path, LORA_A, LORA_B)
            return y + (scale * term).astype(y.dtype)

        layer.einsum_op = einsum_op
    else:
        orig_conv = layer.conv_general_dilated

        def conv_general_dilated(x, kernel, *args, **kwargs):
            y = orig_conv(x, kernel, *args, **kwargs)
            a_k, b_k = factors(x.dtype)  # a_k: [*window, in, r], a kernel with r output channels
            low = orig_conv(x, a_k, *args, **kwargs)  # [batch, *spatial, r], channels last
            term = jax.lax.dot_general(low, b_k, (((low.ndim - 1,), (0,)), ((), ())))
            sites.consume(path, LORA_A, LORA_B)
            return y + (scale * term).astype(y.dtype)

        layer.conv_general_dilated = conv_general_dilated


def _dense_delta(info: LayerInfo, a, b):
    """``a @ b`` in the kernel's layout (reshaped, and transposed where axes interleave)."""
    in_shape = tuple(info.kernel_shape[i] for i in info.in_axes)
    out_shape = tuple(info.kernel_shape[i] for i in info.out_axes)
    delta = (a @ b).reshape(*in_shape, *out_shape)
    order = info.in_axes + info.out_axes  # the kernel axis of each axis of `delta`
    return jnp.transpose(delta, np.argsort(order))


def _check_rank_value(rank: Any, what: str) -> None:
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{what}={rank!r} must be a positive integer (typically 4 to 64).")


def _check_alpha(alpha: Any, what: str) -> None:
    ok = isinstance(alpha, (int, float, np.floating, np.integer)) and not isinstance(alpha, bool)
    if not ok or not math.isfinite(alpha) or alpha == 0:
        raise ValueError(
            f"{what}={alpha!r} must be a finite nonzero number (the scale is alpha / rank; "
            "alpha = 2 * rank is common)."
        )
