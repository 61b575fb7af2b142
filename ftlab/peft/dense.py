"""One interception of `nn.Dense.__call__` shared by the dense-layer PEFT methods.

A dense-layer method (LoRA now; DoRA and IA3 later) stores its leaves next to the kernel it
modifies, e.g. ``encoder/layer_3/attention/query/lora_a``, and the model is applied unchanged inside
:func:`intercept`, which adds the method's term to the output of every `nn.Dense` that carries such
leaves. Models need no edit: any linen model built from `nn.Dense` gets every method.

Hyperparameters that are not leaves (LoRA's ``alpha / rank`` scale) travel in the interceptor's
closure, so they are static under `jax.jit` and can never become trainable by accident.

Use it inside the function you trace, which :func:`wrap_apply` does for you::

    apply = dense.wrap_apply(apply, lora_scale=alpha / rank)   # apply(params, batch, rng)
    step = jax.jit(train.make_train_step(classification.make_loss_fn(apply), tx))

Entering :func:`intercept` *around* a call of an already-jitted function is a trap: jit caches the
trace, and the interceptor only acts while tracing, so a function first traced outside the
interceptor keeps running without the LoRA term (and vice versa). Put the interceptor inside.

References:
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
    https://arxiv.org/abs/2106.09685
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

LORA_A, LORA_B = "lora_a", "lora_b"
# Every leaf name a dense-layer method may add next to a kernel; `lora` and the checkpoint code
# use this to tell method leaves from base leaves.
METHOD_LEAVES = (LORA_A, LORA_B)


@dataclasses.dataclass(frozen=True)
class Options:
    """Static (non-leaf) hyperparameters of the dense-layer methods.

    Attributes:
        lora_scale: The LoRA factor ``alpha / rank`` multiplying ``x @ lora_a @ lora_b``; None
            when no LoRA leaves are expected (meeting one is then an error).
    """

    lora_scale: float | None = None

    def __post_init__(self):
        if self.lora_scale is not None:
            if isinstance(self.lora_scale, bool) or not isinstance(self.lora_scale, (int, float)):
                raise TypeError(
                    f"lora_scale must be a Python number (alpha / rank), got "
                    f"{type(self.lora_scale).__name__}; it is static, not a traced array."
                )
            if not math.isfinite(self.lora_scale):
                raise ValueError(f"lora_scale must be finite, got {self.lora_scale}.")


def _module_path(module: nn.Module) -> str:
    scope = getattr(module, "scope", None)
    return "/".join(scope.path) if scope is not None and scope.path else (module.name or "<root>")


def _lora_term(module: nn.Dense, x: jax.Array, y: jax.Array, opts: Options) -> jax.Array:
    has_a, has_b = module.has_variable("params", LORA_A), module.has_variable("params", LORA_B)
    if not (has_a or has_b):
        return y
    path = _module_path(module)
    if has_a != has_b:
        missing = LORA_B if has_a else LORA_A
        raise ValueError(
            f"{path}: has only one of {LORA_A}/{LORA_B} (missing {path}/{missing}); an adapter "
            "must hold both. Re-create it with lora.init, or merge it with lora.adapter(...)."
        )
    if opts.lora_scale is None:
        raise ValueError(
            f"{path}: the params hold LoRA leaves but no lora_scale was given; use "
            "dense.intercept(lora_scale=alpha / rank) or lora.intercept(alpha=..., rank=...)."
        )
    a = module.get_variable("params", LORA_A)
    b = module.get_variable("params", LORA_B)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"{path}: {LORA_A} {a.shape} and {LORA_B} {b.shape} must be [in, r] and [r, out]."
        )
    dtype = y.dtype
    # Factored form: [..., in] @ [in, r] @ [r, out]. Differentiating this never forms an [in, out]
    # array, so a frozen kernel costs no dense gradient (the point of LoRA's memory saving).
    h = jnp.einsum("...i,ir->...r", x.astype(dtype), a.astype(dtype), precision=module.precision)
    delta = jnp.einsum("...r,ro->...o", h, b.astype(dtype), precision=module.precision)
    return y + (delta * opts.lora_scale).astype(dtype)


def _interceptor(opts: Options) -> Callable:
    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(context.module, nn.Dense):
            return y
        x = args[0] if args else kwargs["inputs"]
        return _lora_term(context.module, x, y, opts)

    return interceptor


@contextlib.contextmanager
def intercept(*, lora_scale: float | None = None) -> Iterator[Options]:
    """Adds the method terms of every dense-layer method leaf while the context is active.

    For every `nn.Dense.__call__` whose module holds ``lora_a`` [in, r] and ``lora_b`` [r, out] in
    ``"params"``, the output becomes ``dense(x) + (x @ lora_a @ lora_b) * lora_scale``. Dense
    layers without method leaves are untouched, so a plain tree gives the base model.

    Enter it inside the traced function (see the module docstring, and :func:`wrap_apply`).

    Args:
        lora_scale: LoRA's ``alpha / rank``; required as soon as a LoRA leaf is met.

    Yields:
        The validated :class:`Options`.

    Raises:
        ValueError: (at apply time) a module holds LoRA leaves but ``lora_scale`` is None, holds
            only one of the pair, or their shapes do not chain.

    References:
        Hu et al. 2021, https://arxiv.org/abs/2106.09685

    >>> model = nn.Dense(2)
    >>> params = {"kernel": jnp.eye(2), "bias": jnp.zeros(2),
    ...           "lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 2))}
    >>> with intercept(lora_scale=0.5):
    ...     y = model.apply({"params": params}, jnp.array([1.0, 2.0]))
    >>> y.tolist()
    [2.5, 3.5]
    """
    opts = Options(lora_scale=lora_scale)
    with nn.intercept_methods(_interceptor(opts)):
        yield opts


def wrap_apply(apply_fn: Callable, *, lora_scale: float | None = None) -> Callable:
    """Returns ``apply_fn`` running inside :func:`intercept`, same signature and result type.

    Wrapping the apply function (rather than entering the context around a jitted call) puts the
    interceptor inside whatever `jax.jit`, `jax.grad` or `jax.vmap` traces it.

    Args:
        apply_fn: Any function that calls a linen ``Module.apply``, e.g. a trainer's
            ``apply(params, batch, rng) -> logits``.
        lora_scale: LoRA's ``alpha / rank``.

    Returns:
        The wrapped function.

    >>> model = nn.Dense(1)
    >>> params = {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1),
    ...           "lora_a": jnp.ones((1, 1)), "lora_b": jnp.full((1, 1), 2.0)}
    >>> f = wrap_apply(lambda p, x: model.apply({"params": p}, x), lora_scale=0.25)
    >>> jax.jit(f)(params, jnp.ones(1)).tolist()
    [1.5]
    """
    Options(lora_scale=lora_scale)  # validate now, not at trace time

    @functools.wraps(apply_fn)
    def wrapped(*args, **kwargs):
        with intercept(lora_scale=lora_scale):
            return apply_fn(*args, **kwargs)

    return wrapped
