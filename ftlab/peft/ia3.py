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

Every layer kind LoRA reaches takes IA3 (`nn.Dense`, `nn.DenseGeneral`, `nn.Einsum`, `nn.Conv`):
``ia3_scale`` is [fan_out] over the kernel's output axes (the output's trailing axes), and
``ia3_scale_in`` [fan_in] over the axes of the input the kernel contracts; for a convolution it
scales the input channels and has shape [1, ..., 1, in_channels], broadcasting over the kernel's
window axes. Select layers by path or, with ``layers=dense.layers(...)``, by type.

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

__all__ = [
    "DEFAULT_TARGETS_IN",
    "DEFAULT_TARGETS_OUT",
    "IA3_SCALE",
    "IA3_SCALE_IN",
    "adapter",
    "init",
    "intercept",
    "merge",
    "rules",
    "unmerge",
    "wrap_apply",
]

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
    return dense.wrap_apply(apply_fn, what="ia3.wrap_apply(apply_fn)")


def init(
    params: Params,
    *,
    targets_out: Sequence[str] = DEFAULT_TARGETS_OUT,
    targets_in: Sequence[str] = DEFAULT_TARGETS_IN,
    layer_types_out: Sequence[str | type] = (),
    layer_types_in: Sequence[str | type] = (),
    layers: Mapping[str, dense.Layer] | None = None,
    what: str | None = None,
) -> Params:
    """Adds ``ia3_scale`` [out] / ``ia3_scale_in`` [in] (ones) next to the chosen kernels.

    Args:
        params: A parameter tree (nested dicts) without a ``{"params": ...}`` wrapper.
        targets_out: Regexes ``re.fullmatch``-ed against module paths of kernels (the path
            without ``/kernel``); each match gets ``ia3_scale`` [fan_out], scaling the layer's
            output (bias included). Default: attention keys and values.
        targets_in: Likewise; each match gets ``ia3_scale_in``, scaling the layer's input.
            Default: ``mlp/output``, i.e. the FFN activation after GELU.
        layer_types_out: Layer kinds whose outputs to scale wherever they are (``"Dense"``,
            ``"DenseGeneral"``, ``"Einsum"``, ``"Conv"`` or the classes); needs ``layers``.
        layer_types_in: Likewise for input scaling.
        layers: The model's layers from `ftlab.peft.dense.layers`; without it the candidates
            are the 2-D kernels, taken as [in, out].
        what: Prefix of the argument names in errors, e.g. ``"config.peft"`` for
            ``config.peft.targets_out[0]``; by default errors say ``ia3.init: targets_out[0]``.

    Returns:
        A new tree with the IA3 leaves added; every other leaf is the same object as before.

    Raises:
        ValueError: nothing is chosen, a target or type matches no layer (available module
            paths are listed), a regex is invalid, a chosen layer cannot take IA3, or a chosen
            module already holds the IA3 leaf.

    References:
        Liu et al. 2022, https://arxiv.org/abs/2205.05638 (section 3.3)

    >>> p = {"k": {"kernel": jnp.ones((4, 3))}, "o": {"kernel": jnp.ones((3, 4))}}
    >>> p = init(p, targets_out=["k"], targets_in=["o"])
    >>> p["k"]["ia3_scale"].tolist(), p["o"]["ia3_scale_in"].tolist()
    ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    """
    arg = f"{what}." if what else "ia3.init: "
    flat = partition.flatten(params)
    if not (targets_out or targets_in or layer_types_out or layer_types_in):
        raise ValueError(
            f"{arg}targets_out and {arg if arg.endswith('.') else ''}targets_in are both empty; "
            f"name at least one module regex (defaults: {list(DEFAULT_TARGETS_OUT)}, "
            f"{list(DEFAULT_TARGETS_IN)})."
        )
    chosen = {}
    for key, targets, types in (
        ("targets_out", targets_out, layer_types_out),
        ("targets_in", targets_in, layer_types_in),
    ):
        if isinstance(targets, str):
            raise ValueError(
                f"{arg}{key} must be a list of regexes, got the string {targets!r}; "
                f"write [{targets!r}]."
            )
        # Errors name this group's own arguments: {arg}targets_out[0], {arg}layer_types_out[0].
        suffix = key.removeprefix("targets")
        try:
            chosen[key] = dense.select(
                flat, targets=targets, layer_types=types, layers=layers, arg=arg, allow_empty=True
            )
        except ValueError as e:
            msg = str(e).replace(f"{arg}targets", f"{arg}{key}")
            msg = msg.replace(f"{arg}layer_types", f"{arg}layer_types{suffix}")
            raise ValueError(msg) from None
    for leaf_name, key in ((IA3_SCALE, "targets_out"), (IA3_SCALE_IN, "targets_in")):
        for m in chosen[key]:
            if f"{m}/kernel" not in flat:
                raise ValueError(
                    f"{arg}{key}: {m} holds no kernel (a Q4 kernel?); IA3 vectors fold into a "
                    "full-precision kernel. Dequantise first (qlora.dequantize_tree)."
                )
            if f"{m}/{leaf_name}" in flat:
                raise ValueError(
                    f"{arg}{key}: {m}/{leaf_name} already exists; start from the base "
                    "parameters, or fold the existing vectors in first with ia3.merge(...)."
                )
    out = {}
    for name, leaf in flat.items():
        out[name] = leaf
        module = name[: -len("/kernel")] if name.endswith("/kernel") else None
        dtype = getattr(leaf, "dtype", jnp.float32)
        if module in chosen["targets_in"]:
            shape = chosen["targets_in"][module].in_scale_shape
            out[f"{module}/{IA3_SCALE_IN}"] = jnp.ones(shape, dtype)
        if module in chosen["targets_out"]:
            shape = (chosen["targets_out"][module].fan_out,)
            out[f"{module}/{IA3_SCALE}"] = jnp.ones(shape, dtype)
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
        kernel_shape = np.shape(flat[f"{module}/kernel"])
        for leaf_name, axis in ((IA3_SCALE, "out"), (IA3_SCALE_IN, "in")):
            if leaf_name in leaves and not _fits(kernel_shape, np.shape(leaves[leaf_name]), axis):
                raise ValueError(
                    f"{what}: {module}/{leaf_name} has shape {np.shape(leaves[leaf_name])}, "
                    f"expected [{axis}] for kernel {list(kernel_shape)} (the product of its "
                    f"{'trailing' if axis == 'out' else 'leading'} axes)."
                )
    return vectors


def _fits(kernel_shape, shape, axis: str) -> bool:
    """Whether an IA3 vector of ``shape`` scales a trailing (out) / leading (in) axis group."""
    kernel_shape = tuple(kernel_shape)
    if len(shape) > 1:  # a convolution's [1, ..., 1, in_channels]; in / groups kernel rows
        return (
            axis == "in"
            and len(shape) == len(kernel_shape) - 1
            and all(s == 1 for s in shape[:-1])
            and shape[-1] % kernel_shape[-2] == 0
            and kernel_shape[-1] % (shape[-1] // kernel_shape[-2]) == 0
        )
    if len(shape) != 1:
        return False
    groups = kernel_shape[::-1] if axis == "out" else kernel_shape
    return any(int(np.prod(groups[:k])) == shape[0] for k in range(1, len(kernel_shape)))


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
            # Kernels are laid out (*in axes, *out axes) (`ftlab.peft.dense.Layer`).
            shape = x.shape
            if IA3_SCALE in leaves:  # columns of the kernel as [fan_in, fan_out]
                v = jnp.asarray(leaves[IA3_SCALE], x.dtype)
                x = apply(x.reshape(-1, v.shape[0]), v[None, :]).reshape(shape)
            if IA3_SCALE_IN in leaves:
                v = jnp.asarray(leaves[IA3_SCALE_IN], x.dtype)
                if v.ndim > 1:  # a convolution's input channels, for every window position
                    # Input channel g * in_g + j feeds kernel row j of group g's outputs.
                    in_g, d_out = shape[-2], shape[-1]
                    groups = v.shape[-1] // in_g
                    s = v.reshape(groups, in_g).T  # [in_g, groups]
                    s = s.reshape((1,) * (len(shape) - 2) + (in_g, groups, 1))
                    x = x.reshape(*shape[:-1], groups, d_out // groups)
                    x = apply(x, s).reshape(shape)
                else:  # rows of the kernel as [fan_in, fan_out]
                    x = apply(x.reshape(v.shape[0], -1), v[:, None]).reshape(shape)
            leaf = x
        elif leaf_name == "bias" and IA3_SCALE in leaves:
            v = jnp.asarray(leaves[IA3_SCALE], x.dtype)
            leaf = apply(x.reshape(-1), v).reshape(x.shape)
        out[name] = leaf
    return partition.unflatten(out)
