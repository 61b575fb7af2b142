"""IA3: learned rescaling vectors on dense layers, as a transformation of the parameter tree.

IA3 trains one vector per adapted activation and multiplies it in elementwise: the attention keys
and values, and the feed-forward activation after its nonlinearity. In ftlab's tree::

    encoder/layer_3/attention/key/ia3_scale       [out]  y -> y * l  (the Dense output, bias incl.)
    encoder/layer_3/attention/value/ia3_scale     [out]
    encoder/layer_3/mlp/output/ia3_scale_in       [in]   x -> (x * l) @ W + b

The FFN vector sits on the *input* of ``mlp/output``: that input is the GELU activation the paper
rescales (a vector on the output of ``mlp/intermediate`` would act before the GELU instead). All
vectors start at ones, so the adapted model starts out equal to the base model; apply the model
inside :func:`wrap_apply` (`ftlab.peft.dense` does the work, and needs no hyperparameter).

Both scalings fold into the kernel exactly (:func:`merge`): output scaling multiplies kernel
columns and the bias, input scaling multiplies kernel rows. :func:`unmerge` divides them out again.

References:
    Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
    Learning", https://arxiv.org/abs/2205.05638
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from ftlab.core import partition
from ftlab.peft import dense
from ftlab.types import Params

IA3_SCALE, IA3_SCALE_IN = dense.IA3_SCALE, dense.IA3_SCALE_IN
# The paper's placement on a BERT-style encoder: keys, values (output scaling) and the FFN
# activation (input scaling of the second FFN dense).
DEFAULT_TARGETS_OUT = (r"encoder/layer_\d+/attention/(key|value)",)
DEFAULT_TARGETS_IN = (r"encoder/layer_\d+/mlp/output",)
_IA3_LEAF = re.compile(rf".*/({IA3_SCALE}|{IA3_SCALE_IN})")
_LOW_RANK = (dense.LORA_A, dense.LORA_B, dense.DORA_M)


def intercept():
    """`ftlab.peft.dense.intercept` for IA3 leaves (no hyperparameters); enter it inside traces.

    >>> import flax.linen as nn
    >>> p = {"kernel": jnp.ones((2, 1)), "bias": jnp.ones(1), "ia3_scale_in": jnp.array([2.0, 0.0])}
    >>> with intercept():
    ...     nn.Dense(1).apply({"params": p}, jnp.array([1.0, 5.0])).tolist()
    [3.0]
    """
    return dense.intercept()


def wrap_apply(apply_fn: Callable) -> Callable:
    """`ftlab.peft.dense.wrap_apply` for IA3: ``apply_fn`` with its dense layers rescaled.

    Args:
        apply_fn: Any function that calls a linen ``Module.apply``.

    Returns:
        The wrapped function, same signature.

    >>> import flax.linen as nn
    >>> p = {"kernel": jnp.ones((1, 1)), "bias": jnp.ones(1), "ia3_scale": jnp.array([3.0])}
    >>> f = wrap_apply(lambda p, x: nn.Dense(1).apply({"params": p}, x))
    >>> f(p, jnp.ones(1)).tolist()
    [6.0]
    """
    return dense.wrap_apply(apply_fn)


def init(
    params: Params,
    *,
    targets_out: Sequence[str] = DEFAULT_TARGETS_OUT,
    targets_in: Sequence[str] = DEFAULT_TARGETS_IN,
    what: str = "config.peft",
) -> Params:
    """Adds ``ia3_scale`` [out] / ``ia3_scale_in`` [in] (ones) next to the matching kernels.

    Args:
        params: A parameter tree (nested dicts) without a ``{"params": ...}`` wrapper.
        targets_out: Regexes ``re.fullmatch``-ed against module paths of 2-D ``kernel`` leaves
            (the path without ``/kernel``); each match gets ``ia3_scale`` [out], scaling the
            dense output (bias included). Default: attention keys and values.
        targets_in: Likewise; each match gets ``ia3_scale_in`` [in], scaling the dense input.
            Default: ``mlp/output``, i.e. the FFN activation after GELU.
        what: The config group named in errors: ``{what}.targets_out``, ``{what}.targets_in``.

    Returns:
        A new tree with the IA3 leaves added; every other leaf is the same object as before.

    Raises:
        ValueError: both target lists are empty, a target matches no dense kernel (available
            module paths are listed), a regex is invalid, or a targeted module already holds
            the IA3 leaf.

    References:
        Liu et al. 2022, https://arxiv.org/abs/2205.05638 (section 3.3)

    >>> p = {"k": {"kernel": jnp.ones((4, 3))}, "o": {"kernel": jnp.ones((3, 4))}}
    >>> p = init(p, targets_out=["k"], targets_in=["o"])
    >>> p["k"]["ia3_scale"].tolist(), p["o"]["ia3_scale_in"].tolist()
    ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    """
    flat = partition.flatten(params)
    modules = [
        k[: -len("/kernel")] for k, v in flat.items() if k.endswith("/kernel") and np.ndim(v) == 2
    ]
    chosen_out = _match(targets_out, modules, f"{what}.targets_out")
    chosen_in = _match(targets_in, modules, f"{what}.targets_in")
    if not chosen_out and not chosen_in:
        raise ValueError(
            f"{what}.targets_out and {what}.targets_in are both empty; name at least one dense "
            f"module regex (defaults: {list(DEFAULT_TARGETS_OUT)}, {list(DEFAULT_TARGETS_IN)})."
        )
    for chosen, leaf_name, key in (
        (chosen_out, IA3_SCALE, "targets_out"),
        (chosen_in, IA3_SCALE_IN, "targets_in"),
    ):
        for m in chosen:
            if f"{m}/{leaf_name}" in flat:
                raise ValueError(
                    f"{what}.{key}: {m}/{leaf_name} already exists; start from the base "
                    "parameters, or fold the existing vectors in first with ia3.merge(...)."
                )
    out = {}
    for name, leaf in flat.items():
        out[name] = leaf
        module = name[: -len("/kernel")] if name.endswith("/kernel") else None
        dtype = getattr(leaf, "dtype", jnp.float32)
        if module in chosen_in:
            out[f"{module}/{IA3_SCALE_IN}"] = jnp.ones(np.shape(leaf)[0], dtype)
        if module in chosen_out:
            out[f"{module}/{IA3_SCALE}"] = jnp.ones(np.shape(leaf)[1], dtype)
    return partition.unflatten(out)


def rules(*, extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Partition rules that train the IA3 vectors (and ``extra``) and freeze the rest.

    Args:
        extra: Rules placed first, e.g. ``[("head/.*", "train")]`` for a new classifier head.

    Returns:
        ``[*extra, (".*/ia3_scale(_in)?", "train"), (".*", "frozen")]``.

    >>> rules(extra=[("head/.*", "train")])
    [('head/.*', 'train'), ('.*/ia3_scale(_in)?', 'train'), ('.*', 'frozen')]
    """
    return [*extra, (".*/ia3_scale(_in)?", "train"), (".*", partition.FROZEN)]


def adapter(params: Params) -> dict:
    """The IA3 leaves of ``params`` only: what to save and share, without the base weights.

    Raises:
        ValueError: ``params`` holds no IA3 leaf.

    >>> p = {"v": {"kernel": 1, "ia3_scale": 2}, "o": {"kernel": 3, "ia3_scale_in": 4}}
    >>> adapter(p)
    {'o': {'ia3_scale_in': 4}, 'v': {'ia3_scale': 2}}
    """
    flat = partition.flatten(params)
    out = {k: v for k, v in flat.items() if _IA3_LEAF.fullmatch(k)}
    if not out:
        top = sorted({k.split("/")[0] for k in flat})
        raise ValueError(
            f"ia3.adapter: no '*/{IA3_SCALE}' or '*/{IA3_SCALE_IN}' leaf in the tree (top-level "
            f"names: {', '.join(top)}); add them with ia3.init(...) first."
        )
    return partition.unflatten(out)


def merge(params: Params) -> Params:
    """Folds the IA3 vectors into their kernels (and biases) and drops the IA3 leaves.

    Output scaling ``l`` [out] multiplies the kernel's columns and the bias; input scaling
    ``l`` [in] multiplies the kernel's rows. The result is a plain tree the base model applies
    without any interceptor. A module that also holds LoRA/DoRA leaves is refused: fold those
    first (`lora.merge` / `dora.merge` leave IA3 leaves in place, and IA3 wraps the adapted
    map, so that order is exact). Pure and jittable.

    Args:
        params: A tree holding IA3 leaves.

    Returns:
        The merged tree.

    Raises:
        ValueError: no IA3 leaves, a module without a kernel, a vector whose shape does not fit
            the kernel, or a module that also holds LoRA/DoRA leaves.

    >>> p = {"d": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2),
    ...            "ia3_scale": jnp.array([2.0, 3.0]), "ia3_scale_in": jnp.array([1.0, 0.0])}}
    >>> m = merge(p)
    >>> m["d"]["kernel"].tolist(), m["d"]["bias"].tolist()
    ([[2.0, 3.0], [0.0, 0.0]], [2.0, 3.0])
    """
    flat = partition.flatten(params)
    vectors = _vectors(flat, what="ia3.merge")
    for module in vectors:
        low_rank = [f"{module}/{n}" for n in _LOW_RANK if f"{module}/{n}" in flat]
        if low_rank:
            raise ValueError(
                f"ia3.merge: {low_rank[0]} sits next to IA3 vectors; fold the LoRA/DoRA adapter "
                "first (lora.merge or dora.merge), then ia3.merge."
            )
    return _rescale(flat, vectors, invert=False)


def unmerge(merged: Params, adapter_tree: Params) -> Params:
    """Inverse of :func:`merge`: divides the vectors out of the kernels and puts them back.

    Args:
        merged: A tree from :func:`merge` (no IA3 leaves).
        adapter_tree: The IA3 vectors that were merged (from :func:`adapter`).

    Returns:
        The tree with the original kernels and biases (to float rounding) and the IA3 leaves.

    Raises:
        ValueError: the adapter holds non-IA3 leaves or a zero entry (not invertible), an
            adapter module has no kernel in ``merged``, or ``merged`` still holds IA3 leaves.

    >>> p = {"d": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2),
    ...            "ia3_scale": jnp.array([2.0, 4.0])}}
    >>> back = unmerge(merge(p), adapter(p))
    >>> back["d"]["kernel"].tolist(), sorted(back["d"])
    ([[1.0, 1.0], [1.0, 1.0]], ['bias', 'ia3_scale', 'kernel'])
    """
    flat = partition.flatten(merged)
    ad = partition.flatten(adapter_tree)
    stray = [k for k in ad if not _IA3_LEAF.fullmatch(k)]
    if stray:
        raise ValueError(
            f"ia3.unmerge: the adapter holds non-IA3 leaves, e.g. {stray[:3]}; pass "
            "ia3.adapter(params)."
        )
    for name in ad:
        if name in flat:
            raise ValueError(
                f"ia3.unmerge: the merged tree already holds {name}; it was not merged (pass "
                "ia3.merge(...)'s output)."
            )
        if not np.all(np.asarray(ad[name]) != 0):
            raise ValueError(
                f"ia3.unmerge: {name} has a zero entry, so the merged kernel lost that unit; "
                "it cannot be divided back out. Keep the base parameters instead."
            )
    vectors = _vectors({**flat, **ad}, what="ia3.unmerge")
    out = _rescale(flat, vectors, invert=True)
    return partition.merge(out, partition.unflatten(ad))


# ---------------------------------------------------------------------------------------------


def _match(targets: Sequence[str], modules: Sequence[str], what: str) -> list[str]:
    """The module paths (tree order) matched by ``targets``; every pattern must match one."""
    if isinstance(targets, str):
        raise ValueError(
            f"{what} must be a list of regexes, got the string {targets!r}; write [{targets!r}]."
        )
    chosen = set()
    for i, pattern in enumerate(targets):
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"{what}[{i}]: invalid regex {pattern!r}: {e}") from None
        hits = [m for m in modules if regex.fullmatch(m)]
        if not hits:
            generic = list(dict.fromkeys(re.sub(r"_\d+(?=/|$)", r"_\\d+", m) for m in modules))
            raise ValueError(
                f"{what}[{i}]: pattern {pattern!r} matched no dense kernel. Targets are matched "
                f"against module paths (without '/kernel'); available: {', '.join(generic)}."
            )
        chosen.update(hits)
    return [m for m in modules if m in chosen]


def _vectors(flat: Mapping[str, Any], *, what: str) -> dict[str, dict[str, Any]]:
    """``{module: {leaf_name: vector}}`` for the IA3 leaves, checked against their kernels."""
    vectors: dict[str, dict[str, Any]] = {}
    for name, leaf in flat.items():
        if _IA3_LEAF.fullmatch(name):
            module, leaf_name = name.rsplit("/", 1)
            vectors.setdefault(module, {})[leaf_name] = leaf
    if not vectors:
        raise ValueError(f"{what}: no IA3 leaves found; add them with ia3.init(...) first.")
    for module, leaves in vectors.items():
        if f"{module}/kernel" not in flat:
            raise ValueError(f"{what}: {module} holds IA3 leaves but no {module}/kernel.")
        d_in, d_out = np.shape(flat[f"{module}/kernel"])
        for leaf_name, size, axis in ((IA3_SCALE, d_out, "out"), (IA3_SCALE_IN, d_in, "in")):
            if leaf_name in leaves and np.shape(leaves[leaf_name]) != (size,):
                raise ValueError(
                    f"{what}: {module}/{leaf_name} has shape {np.shape(leaves[leaf_name])}, "
                    f"expected [{axis}] = ({size},) for kernel [{d_in}, {d_out}]."
                )
    return vectors


def _rescale(flat: Mapping[str, Any], vectors: Mapping[str, Mapping[str, Any]], *, invert: bool):
    def apply(x, v):
        return x / v if invert else x * v

    out = {}
    for name, leaf in flat.items():
        if _IA3_LEAF.fullmatch(name):
            continue
        module, _, leaf_name = name.rpartition("/")
        leaves = vectors.get(module, {})
        x = jnp.asarray(leaf)
        if leaf_name == "kernel" and leaves:
            if IA3_SCALE in leaves:  # columns
                x = apply(x, jnp.asarray(leaves[IA3_SCALE], x.dtype)[None, :])
            if IA3_SCALE_IN in leaves:  # rows
                x = apply(x, jnp.asarray(leaves[IA3_SCALE_IN], x.dtype)[:, None])
            leaf = x
        elif leaf_name == "bias" and IA3_SCALE in leaves:
            leaf = apply(x, jnp.asarray(leaves[IA3_SCALE], x.dtype))
        out[name] = leaf
    return partition.unflatten(out)
