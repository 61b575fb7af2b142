"""DoRA: weight-decomposed LoRA, as a transformation of the parameter tree.

DoRA splits each adapted kernel into a magnitude and a direction and trains both: the direction
with a LoRA pair, the magnitude as one number per output unit::

    W' = m * (W + s A B) / ||W + s A B||_c          s = alpha / rank

where ``||.||_c`` is the norm of each output unit's weights (ftlab kernels are [in, out], so the
norm over ``in``, a vector of size out). ``init`` puts three leaves next to each targeted kernel::

    encoder/layer_3/attention/query/kernel    [in, out]   frozen
    encoder/layer_3/attention/query/lora_a    [in, r]     trained, random (as LoRA)
    encoder/layer_3/attention/query/lora_b    [r, out]    trained, zeros
    encoder/layer_3/attention/query/dora_m    [out]       trained, ||W||_c

so ``W' = W`` at init and the adapted model starts out equal to the base model. Every layer
kind LoRA reaches takes DoRA too (`nn.Dense`, `nn.DenseGeneral`, `nn.Einsum`, `nn.Conv`): the
column norm runs over the kernel as the matrix [fan_in, fan_out] of its ``(*in, *out)`` axes
(`ftlab.peft.dense.Layer`), so ``dora_m`` is [fan_out], e.g. one magnitude per output channel of
a convolution over its window and input channels.

The model is applied inside `ftlab.peft.dense.intercept` (:func:`wrap_apply`), which uses the
paper's efficient form ``y = m / ||W + s A B||_c * (x W + s x A B) + bias``: the base output
``x W`` is reused and the LoRA part stays factored, so training forms no gradient of the frozen
kernel.

What it costs over LoRA: the norm ``||W + s A B||_c`` needs the [in, out] matrix ``W + s A B`` in
every forward pass (a matmul of the factors and an add per adapted layer); that is inherent to
DoRA. In the backward pass the norm is held constant (`jax.lax.stop_gradient`), as the paper
recommends (section 4.3): the gradient then reaches ``A``, ``B`` only through the factored
``x A B`` and no [in, out] gradient array is formed, which saves memory at a negligible cost in
accuracy. ``m`` always gets its exact gradient. Pass ``exact_norm_grad=True`` to
:func:`wrap_apply` to differentiate through the norm too (an [in, out] gradient per layer).

:func:`merge` folds the adapter into plain kernels for inference. There is no ``unmerge``: the
merged kernel keeps the direction and magnitude of each column but not the norm of ``W + s A B``,
so ``W`` is lost up to a per-column factor. Keep the base tree (it is frozen anyway) and the
adapter from :func:`adapter` instead.

A typical run::

    params = dora.init(params, rng, targets=[r"encoder/layer_\\d+/attention/(query|value)"],
                       rank=8, alpha=16)
    label_tree = partition.labels(params, dora.rules(extra=[("head/.*", "train")]))
    apply = dora.wrap_apply(apply, alpha=16, rank=8)

References:
    Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", https://arxiv.org/abs/2402.09353
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftlab.core import partition
from ftlab.peft import dense, lora
from ftlab.types import Params, PRNGKey

__all__ = [
    "DORA_M",
    "LORA_A",
    "LORA_B",
    "adapter",
    "init",
    "intercept",
    "merge",
    "rules",
    "wrap_apply",
]

LORA_A, LORA_B, DORA_M = dense.LORA_A, dense.LORA_B, dense.DORA_M
_DORA_LEAF = re.compile(rf".*/({LORA_A}|{LORA_B}|{DORA_M})")
# Compiled as one computation, like the norm inside the jitted forward pass (which keeps it
# unfused): op-by-op evaluation can round the reduction differently in the last bit, and then
# m / ||W||_c is 1 +- 1 ulp instead of exactly 1 at init.
_column_norm = jax.jit(dense.dora_column_norm, static_argnames="scale")


def intercept(*, alpha: float, rank: int, exact_norm_grad: bool = False):
    """`ftlab.peft.dense.intercept` for DoRA (and LoRA) leaves; enter it inside traces.

    >>> import flax.linen as nn
    >>> p = {"kernel": jnp.array([[3.0], [4.0]]), "bias": jnp.zeros(1),
    ...      "lora_a": jnp.ones((2, 1)), "lora_b": jnp.zeros((1, 1)), "dora_m": jnp.array([10.0])}
    >>> with intercept(alpha=1.0, rank=1):
    ...     nn.Dense(1).apply({"params": p}, jnp.array([1.0, 0.0])).tolist()
    [6.0]
    """
    return dense.intercept(
        lora_scale=lora.scale(alpha=alpha, rank=rank),
        dora_exact_norm_grad=exact_norm_grad,
        lora_rank=int(rank),
    )


def wrap_apply(
    apply_fn: Callable,
    *,
    alpha: float,
    rank: int,
    exact_norm_grad: bool = False,
    dropout: float = 0.0,
) -> Callable:
    """`ftlab.peft.dense.wrap_apply` with DoRA's scale ``alpha / rank``.

    Args:
        apply_fn: Any function that calls a linen ``Module.apply``.
        alpha: The LoRA alpha.
        rank: The adapter rank r.
        exact_norm_grad: If True, differentiate through ``||W + s A B||_c`` as well; the default
            False holds it constant in the backward pass (DoRA section 4.3; see module docs).
        dropout: Dropout on the low-rank branch's input during training (see `lora.wrap_apply`).

    Returns:
        ``apply_fn`` running inside the interceptor.

    >>> import flax.linen as nn
    >>> p = {"kernel": jnp.array([[3.0], [4.0]]), "bias": jnp.ones(1),
    ...      "lora_a": jnp.ones((2, 1)), "lora_b": jnp.zeros((1, 1)), "dora_m": jnp.array([5.0])}
    >>> f = wrap_apply(lambda p, x: nn.Dense(1).apply({"params": p}, x), alpha=2.0, rank=1)
    >>> jax.jit(f)(p, jnp.array([1.0, 1.0])).tolist()
    [8.0]
    """
    return dense.wrap_apply(
        apply_fn,
        lora_scale=lora.scale(alpha=alpha, rank=rank),
        dora_exact_norm_grad=exact_norm_grad,
        lora_dropout=dropout,
        lora_rank=int(rank),
        what="dora.wrap_apply(apply_fn)",
    )


def init(
    params: Params,
    rng: PRNGKey,
    *,
    targets: Sequence[str] = (),
    rank: int,
    alpha: float,
    layer_types: Sequence[str | type] = (),
    layers: Mapping[str, dense.Layer] | None = None,
    what: str | None = None,
) -> Params:
    """Adds ``lora_a``, ``lora_b`` and ``dora_m`` next to every chosen linear layer's kernel.

    ``lora_a``/``lora_b`` are drawn as `ftlab.peft.lora.init` draws them (``lora_b`` zeros);
    ``dora_m`` [out] is ``||W||_c``, computed by the same (jitted) function the forward pass uses,
    so the adapted model equals the base model at init: bit for bit where both round the norm
    alike (tested on CPU), else to within one float32 ulp of the gain ``m / ||W||_c``.

    Args:
        params: A parameter tree (nested dicts) without a ``{"params": ...}`` wrapper.
        rng: PRNG key for ``lora_a``.
        targets: Regexes, each ``re.fullmatch``-ed against the module path of a kernel (the
            path without ``/kernel``), e.g. ``r"encoder/layer_\\d+/attention/(query|value)"``.
        rank: The adapter rank r, 1 <= r <= min(fan_in, fan_out) for every chosen kernel.
        alpha: The LoRA alpha (the scale ``alpha / r`` is given at apply time).
        layer_types: Layer kinds to adapt wherever they are; see `ftlab.peft.lora.init`.
        layers: The model's layers from `ftlab.peft.dense.layers`; see `ftlab.peft.lora.init`.
        what: Prefix of the argument names in errors, e.g. ``"config.peft"``; by default
            errors say ``dora.init: targets[0]``.

    Returns:
        A new tree with the DoRA leaves added; every other leaf is the same object as before.

    Raises:
        ValueError: a target matches no dense kernel, the rank is out of range, alpha is not a
            finite nonzero number, or a targeted module already holds LoRA/DoRA leaves.

    References:
        Liu et al. 2024, https://arxiv.org/abs/2402.09353

    >>> p = {"body": {"kernel": jnp.array([[3.0, 0.0], [4.0, 2.0]]), "bias": jnp.zeros(2)}}
    >>> p = init(p, jax.random.key(0), targets=["body"], rank=1, alpha=2.0)
    >>> p["body"]["lora_a"].shape, p["body"]["lora_b"].shape, p["body"]["dora_m"].tolist()
    ((2, 1), (1, 2), [5.0, 2.0])
    """
    flat = partition.flatten(params)
    stray = [k for k in flat if k.endswith(f"/{DORA_M}")]
    arg = f"{what}." if what else "dora.init: "
    out = partition.flatten(
        lora._init(params, rng, targets, rank, alpha, layer_types, layers, arg=arg)  # noqa: SLF001
    )
    s = lora.scale(alpha=alpha, rank=rank)
    added = [k[: -len(f"/{LORA_A}")] for k in out if k.endswith(f"/{LORA_A}") and k not in flat]
    clash = [f"{m}/{DORA_M}" for m in added if f"{m}/{DORA_M}" in stray]
    if clash:
        raise ValueError(
            f"{arg}targets: {clash[0]} already exists; start from the base parameters, or "
            "fold the existing adapter in first with dora.merge(...)."
        )
    quantized = [m for m in added if f"{m}/kernel" not in out]
    if quantized:
        raise ValueError(
            f"{arg}targets: {quantized[0]} holds a Q4 kernel; DoRA's column norm needs the "
            "full-precision kernel. Use LoRA there, or dequantise first (qlora.dequantize_tree)."
        )
    result = {}
    for name, leaf in out.items():
        result[name] = leaf
        module = name[: -len(f"/{LORA_B}")] if name.endswith(f"/{LORA_B}") else None
        if module in added:
            kernel = jnp.asarray(out[f"{module}/kernel"])
            a = out[f"{module}/{LORA_A}"]
            kernel_2d = kernel.reshape(np.shape(a)[0], np.shape(leaf)[1])
            norm = _column_norm(kernel_2d, a, leaf, scale=s)
            result[f"{module}/{DORA_M}"] = norm.astype(kernel.dtype)
    return partition.unflatten(result)


def rules(*, extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Partition rules that train the DoRA leaves (and ``extra``) and freeze the rest.

    Args:
        extra: Rules placed first, e.g. ``[("head/.*", "train")]`` for a new classifier head.

    Returns:
        ``[*extra, (".*/(lora_(a|b)|dora_m)", "train"), (".*", "frozen")]``.

    >>> rules(extra=[("head/.*", "train")])
    [('head/.*', 'train'), ('.*/(lora_(a|b)|dora_m)', 'train'), ('.*', 'frozen')]
    """
    return [*extra, (".*/(lora_(a|b)|dora_m)", "train"), (".*", partition.FROZEN)]


def adapter(params: Params) -> dict:
    """The DoRA leaves (``lora_a``, ``lora_b``, ``dora_m``) of ``params`` only.

    Raises:
        ValueError: ``params`` holds no ``dora_m`` leaf.

    >>> p = {"q": {"kernel": 1, "lora_a": 2, "lora_b": 3, "dora_m": 4}, "head": {"kernel": 5}}
    >>> adapter(p)
    {'q': {'dora_m': 4, 'lora_a': 2, 'lora_b': 3}}
    """
    flat = partition.flatten(params)
    if not any(k.endswith(f"/{DORA_M}") for k in flat):
        top = sorted({k.split("/")[0] for k in flat})
        raise ValueError(
            f"dora.adapter: no '*/{DORA_M}' leaf in the tree (top-level names: "
            f"{', '.join(top)}); add the DoRA leaves with dora.init(...) first."
        )
    return partition.unflatten({k: v for k, v in flat.items() if _DORA_LEAF.fullmatch(k)})


def merge(params: Params, *, alpha: float, rank: int) -> Params:
    """Folds each adapter into its kernel, ``m * V / ||V||_c`` with ``V = W + s A B``.

    The result is a plain tree the base model applies without any interceptor, at the base
    model's cost; biases are unchanged. Modules holding only ``lora_a``/``lora_b`` (plain LoRA
    under the same scale, which the DoRA interceptor also applies) are folded as
    `ftlab.peft.lora.merge` would. Pure and jittable.

    Args:
        params: A tree holding DoRA leaves (from :func:`init`, trained).
        alpha: The LoRA alpha used in training.
        rank: The rank used in training; checked against the ``lora_a`` shapes.

    Returns:
        The merged tree, without LoRA/DoRA leaves.

    Raises:
        ValueError: no DoRA leaves, a ``dora_m`` without the LoRA pair, a module without a
            kernel, shapes that do not fit, or a ``rank`` that differs from the leaves' rank.

    >>> p = {"d": {"kernel": jnp.array([[3.0], [4.0]]), "lora_a": jnp.ones((2, 1)),
    ...            "lora_b": jnp.zeros((1, 1)), "dora_m": jnp.array([10.0])}}
    >>> merge(p, alpha=1.0, rank=1)["d"]["kernel"].tolist()
    [[6.0], [8.0]]
    """
    s = lora.scale(alpha=alpha, rank=rank)
    flat = partition.flatten(params)
    modules = _modules(flat, rank=rank, what="dora.merge")
    out = {}
    for name, leaf in flat.items():
        if _DORA_LEAF.fullmatch(name):
            continue
        module = name[: -len("/kernel")] if name.endswith("/kernel") else None
        if module in modules:
            a, b, m = modules[module]
            kernel = jnp.asarray(leaf)
            shape = kernel.shape
            kernel = kernel.reshape(np.shape(a)[0], np.shape(b)[1])  # (*in, *out) as a matrix
            f32 = jnp.float32
            ab = jnp.matmul(
                jnp.asarray(a, f32), jnp.asarray(b, f32), precision=jax.lax.Precision.HIGHEST
            )
            v = kernel.astype(f32) + ab * s
            if m is not None:
                norm = _column_norm(kernel, jnp.asarray(a), jnp.asarray(b), scale=s)
                v = v * dense.dora_gain(jnp.asarray(m, f32), norm)[None, :]
            leaf = v.astype(kernel.dtype).reshape(shape)
        out[name] = leaf
    return partition.unflatten(out)


# ---------------------------------------------------------------------------------------------


def _modules(
    flat: Mapping[str, Any], *, rank: int, what: str
) -> dict[str, tuple[Any, Any, Any | None]]:
    """``{module: (lora_a, lora_b, dora_m or None)}``, checking leaves are complete and fit."""
    modules: dict[str, dict[str, Any]] = {}
    for name, leaf in flat.items():
        if _DORA_LEAF.fullmatch(name):
            module, leaf_name = name.rsplit("/", 1)
            modules.setdefault(module, {})[leaf_name] = leaf
    if not any(DORA_M in leaves for leaves in modules.values()):
        raise ValueError(f"{what}: no '*/{DORA_M}' leaf found; add them with dora.init(...) first.")
    out = {}
    for module, leaves in modules.items():
        missing = [n for n in (LORA_A, LORA_B) if n not in leaves]
        if missing:
            raise ValueError(
                f"{what}: {module}/{missing[0]} is missing; a DoRA adapter needs {LORA_A}, "
                f"{LORA_B} and {DORA_M}."
            )
        if f"{module}/kernel" not in flat:
            raise ValueError(f"{what}: {module} holds adapter leaves but no {module}/kernel.")
        a, b, m = leaves[LORA_A], leaves[LORA_B], leaves.get(DORA_M)
        kernel_shape = np.shape(flat[f"{module}/kernel"])
        r = np.shape(a)[-1] if np.ndim(a) == 2 else -1
        fits = np.ndim(a) == 2 and np.ndim(b) == 2 and np.shape(b)[0] == r
        if fits:
            try:
                d_in, d_out = dense.kernel_matrix_shape(kernel_shape, np.shape(a)[0], where=what)
            except ValueError:
                fits = False
        if not fits or np.shape(b) != (r, d_out):
            raise ValueError(
                f"{what}: {module}/{LORA_A} {np.shape(a)} and {LORA_B} {np.shape(b)} must be "
                f"[in, r] and [r, out] for kernel {list(kernel_shape)} (input axes first)."
            )
        if r != rank:
            raise ValueError(
                f"{what}: rank={rank} but {module}/{LORA_A} has rank {r}; pass the "
                "rank the adapter was trained with."
            )
        if m is not None and np.shape(m) != (d_out,):
            raise ValueError(
                f"{what}: {module}/{DORA_M} has shape {np.shape(m)}, expected [out] = ({d_out},)."
            )
        out[module] = (a, b, m)
    return out
