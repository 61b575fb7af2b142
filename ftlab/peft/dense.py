"""One interception of `nn.Dense.__call__` shared by the dense-layer PEFT methods.

A dense-layer method stores its leaves next to the kernel it modifies, e.g.
``encoder/layer_3/attention/query/lora_a``, and the model is applied unchanged inside
:func:`intercept`, which changes the output of every `nn.Dense` that carries such leaves. Models
need no edit: any linen model built from `nn.Dense` gets every method. The leaves it knows:

==================  ===========  ==============================================================
leaf                shape        effect on ``y = x @ kernel + bias``
==================  ===========  ==============================================================
``lora_a, lora_b``  [in, r],     LoRA: ``y + s * x @ lora_a @ lora_b`` with ``s = lora_scale``
                    [r, out]
``dora_m``          [out]        DoRA (with the LoRA pair): ``m / ||kernel + s a b||_c`` times
                                 ``x @ kernel + s x a b``, plus bias (:func:`dora_column_norm`)
``ia3_scale_in``    [in]         IA3 on the input: ``x -> x * ia3_scale_in`` before all of the above
``ia3_scale``       [out]        IA3 on the output: the result (bias included) ``* ia3_scale``
``q4_data``,        [out, in/2]  QLoRA: the frozen kernel itself, in Q4_1 blocks instead of
``q4_scale``,       [out, in/32] ``kernel``; dequantised inside the matmul and recomputed in the
``q4_min``          [out, in/32] backward pass (:func:`dequantize_q4_1`, `ftlab.peft.qlora`)
==================  ===========  ==============================================================

Any combination on one module composes in that order: IA3 wraps the (LoRA- or DoRA-) adapted
linear map. Inconsistent leaves (``dora_m`` without the LoRA pair, one of the pair alone, a shape
that does not fit the kernel) raise an error naming the module path.

Hyperparameters that are not leaves (LoRA's ``alpha / rank`` scale, DoRA's gradient option) travel
in the interceptor's closure, so they are static under `jax.jit` and can never become trainable by
accident.

Use it inside the function you trace, which :func:`wrap_apply` does for you::

    apply = dense.wrap_apply(apply, lora_scale=alpha / rank)   # apply(params, batch, rng)
    step = jax.jit(train.make_train_step(classification.make_loss_fn(apply), tx))

Entering :func:`intercept` *around* a call of an already-jitted function is a trap: jit caches the
trace, and the interceptor only acts while tracing, so a function first traced outside the
interceptor keeps running without the LoRA term (and vice versa). Put the interceptor inside.

References:
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
    https://arxiv.org/abs/2106.09685
    Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", https://arxiv.org/abs/2402.09353
    Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
    Learning" (IA3), https://arxiv.org/abs/2205.05638
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

from ftlab.core import sites

LORA_A, LORA_B = "lora_a", "lora_b"
DORA_M = "dora_m"
IA3_SCALE, IA3_SCALE_IN = "ia3_scale", "ia3_scale_in"
# A frozen kernel kept in GGUF's Q4_1 blocks instead of `kernel` (see `ftlab.peft.qlora`).
Q4_DATA, Q4_SCALE, Q4_MIN = "q4_data", "q4_scale", "q4_min"
Q4_LEAVES = (Q4_DATA, Q4_SCALE, Q4_MIN)
# The low-rank leaves: `lora.init` refuses a module that already holds one of these. (Kept to the
# LoRA pair so that LoRA composes with IA3 on one module; DoRA trees always hold the pair too.)
METHOD_LEAVES = (LORA_A, LORA_B)
# Every leaf name a dense-layer method may add next to a kernel, to tell method leaves from base
# leaves.
ALL_LEAVES = (LORA_A, LORA_B, DORA_M, IA3_SCALE, IA3_SCALE_IN, *Q4_LEAVES)


@dataclasses.dataclass(frozen=True)
class Options:
    """Static (non-leaf) hyperparameters of the dense-layer methods.

    Attributes:
        lora_scale: The LoRA factor ``alpha / rank`` multiplying ``x @ lora_a @ lora_b`` (also
            inside DoRA); None when no LoRA leaves are expected (meeting one is then an error).
        dora_exact_norm_grad: If True, differentiate through DoRA's column norm
            ``||kernel + s a b||_c``; if False (the default, DoRA section 4.3) the norm is a
            constant in the backward pass (`jax.lax.stop_gradient`), see :func:`dora_column_norm`.
        lora_dropout: Dropout rate on the input of the low-rank branch only,
            ``s * dropout(x) @ lora_a @ lora_b`` (as HF PEFT's ``lora_dropout``); the frozen
            ``x @ kernel`` sees the undropped input. Active only when the model is applied with
            a ``"dropout"`` PRNG stream (training); without one (evaluation) it is the identity.
    """

    lora_scale: float | None = None
    dora_exact_norm_grad: bool = False
    lora_dropout: float = 0.0

    def __post_init__(self):
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}.")
        if not isinstance(self.dora_exact_norm_grad, bool):
            raise TypeError(
                "dora_exact_norm_grad must be a bool, got "
                f"{type(self.dora_exact_norm_grad).__name__}."
            )
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


def dora_column_norm(kernel: jax.Array, a: jax.Array, b: jax.Array, *, scale: float) -> jax.Array:
    """DoRA's per-output-unit norm ``||kernel + scale * a @ b||_c``, shape [out], in float32.

    ftlab kernels are [in, out], so the norm runs over the ``in`` axis (the paper's column norm of
    its [d, k] weight; torch's row norm of the [out, in] weight). The [in, out] matrix
    ``kernel + scale * a @ b`` is formed here, in the forward pass: the norm of the adapted weight
    needs it, whatever the implementation (DoRA's inherent cost over LoRA). `dora.init`,
    `dora.merge` and the interceptor all call this one function, so that the model starts out
    equal to the base model (bit for bit where the reduction rounds alike; see `dora.init`).

    Args:
        kernel: The frozen kernel W, [in, out].
        a: ``lora_a``, [in, r].
        b: ``lora_b``, [r, out].
        scale: LoRA's ``alpha / rank``.

    Returns:
        The float32 norms, [out].

    References:
        Liu et al. 2024, https://arxiv.org/abs/2402.09353 (equation 5)

    >>> dora_column_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]]), jnp.zeros((2, 1)),
    ...                  jnp.zeros((1, 2)), scale=2.0).tolist()
    [5.0, 1.0]
    """
    f32 = jnp.float32
    # Full float32 precision: on TPU/GPU the default may round to bf16, and `dora.merge` must
    # agree with the intercepted forward pass to float tolerance.
    ab = jnp.matmul(a.astype(f32), b.astype(f32), precision=jax.lax.Precision.HIGHEST)
    v = kernel.astype(f32) + ab * scale
    return jnp.sqrt(jnp.sum(v * v, axis=0))


def dora_gain(m: jax.Array, norm: jax.Array) -> jax.Array:
    """``m / norm``, the per-output factor DoRA puts on ``kernel + s a b``; 0/0 columns give m.

    A column whose adapted weight is all zeros contributes nothing whatever its factor, so the
    guard only keeps NaNs out of the forward and backward pass.

    >>> dora_gain(jnp.array([2.0, 3.0]), jnp.array([4.0, 0.0])).tolist()
    [0.5, 3.0]
    """
    return m / jnp.where(norm > 0, norm, jnp.ones_like(norm))


def _module_path(module: nn.Module) -> str:
    scope = getattr(module, "scope", None)
    return "/".join(scope.path) if scope is not None and scope.path else (module.name or "<root>")


def _broadcast_last(v: jax.Array, like: jax.Array) -> jax.Array:
    # Explicit reshape: ftlab tests run with jax_numpy_rank_promotion="raise".
    return v.reshape((1,) * (like.ndim - 1) + v.shape)


def dequantize_q4_1(data: jax.Array, scale: jax.Array, minimum: jax.Array, dtype) -> jax.Array:
    """The [out, in] weight of Q4_1 blocks (ggml's ``block_q4_1``), as ``dtype``.

    Args:
        data: uint8 [out, in / 2]; per block of 32 inputs, byte k holds code k (low nibble)
            and code k + 16 (high nibble).
        scale: float16 [out, in / 32], the blocks' ``d``.
        minimum: float16 [out, in / 32], the blocks' ``m``; the weight is ``d * code + m``.
        dtype: The result's dtype.

    Returns:
        [out, in] array.
    """
    d_out, n_blocks = scale.shape
    q = data.reshape(d_out, n_blocks, 16)
    codes = jnp.concatenate([q & 0x0F, q >> 4], axis=-1).astype(jnp.float32)
    w = codes * scale.astype(jnp.float32)[..., None] + minimum.astype(jnp.float32)[..., None]
    return w.reshape(d_out, n_blocks * 32).astype(dtype)


def _q4_matmul(x, data, scale, minimum):
    w = dequantize_q4_1(data, scale, minimum, x.dtype)
    return jnp.einsum("...i,oi->...o", x, w)


# Recompute the dequantised weight in the backward pass instead of saving it: the step then never
# holds a full-precision copy of a Q4 base kernel beyond the one matmul using it.
_q4_matmul_remat = jax.checkpoint(_q4_matmul, policy=jax.checkpoint_policies.nothing_saveable)


def _kernel_shape(module: nn.Dense, present: set[str]) -> tuple[int, int]:
    if Q4_DATA in present:
        d_out, half = module.get_variable("params", Q4_DATA).shape
        return 2 * half, d_out
    return module.get_variable("params", "kernel").shape


def _q4_dense(module: nn.Dense, x: jax.Array) -> jax.Array:
    """``x @ W + bias`` for a module whose kernel is held as Q4_1 leaves."""
    path = _module_path(module)
    missing = [n for n in Q4_LEAVES if not module.has_variable("params", n)]
    if missing:
        raise ValueError(f"{path}: has some Q4 leaves but not {missing}; qlora.quantize adds all.")
    if module.has_variable("params", "kernel"):
        raise ValueError(f"{path}: holds both kernel and {Q4_DATA}; keep one of the two.")
    dtype = module.dtype or x.dtype
    data, scale, minimum = (module.get_variable("params", n) for n in Q4_LEAVES)
    y = _q4_matmul_remat(x.astype(dtype), data, scale, minimum)
    if module.use_bias and module.has_variable("params", "bias"):
        y = y + _broadcast_last(module.get_variable("params", "bias").astype(dtype), y)
    return y


def _check_leaves(module: nn.Dense, present: set[str], x: jax.Array, opts: Options) -> None:
    """Validates the method leaves on one module, naming its path in every error."""
    path = _module_path(module)
    has_a, has_b = LORA_A in present, LORA_B in present
    if has_a != has_b:
        missing = LORA_B if has_a else LORA_A
        raise ValueError(
            f"{path}: has only one of {LORA_A}/{LORA_B} (missing {path}/{missing}); an adapter "
            "must hold both. Re-create it with lora.init, or merge it with lora.adapter(...)."
        )
    if DORA_M in present and not has_a:
        raise ValueError(
            f"{path}: has {path}/{DORA_M} but no {LORA_A}/{LORA_B}; DoRA needs all three leaves "
            "(dora.init adds them together). Drop the stray magnitude or re-create the adapter."
        )
    if has_a and opts.lora_scale is None:
        method = "DoRA" if DORA_M in present else "LoRA"
        raise ValueError(
            f"{path}: the params hold {method} leaves but no lora_scale was given; use "
            "dense.intercept(lora_scale=alpha / rank), or lora.wrap_apply / dora.wrap_apply "
            "(alpha=..., rank=...)."
        )
    if DORA_M in present and Q4_DATA in present:
        raise ValueError(
            f"{path}: DoRA needs the full-precision kernel for its column norm; it cannot sit on "
            f"a Q4 kernel ({path}/{Q4_DATA}). Use LoRA, or dequantise first "
            "(qlora.dequantize_tree)."
        )
    d_in, d_out = _kernel_shape(module, present)
    if x.shape[-1] != d_in:
        if Q4_DATA in present:
            raise ValueError(f"{path}: input has {x.shape[-1]} features, Q4 kernel expects {d_in}.")
        return  # let nn.Dense report its own shape error
    if has_a:
        a = module.get_variable("params", LORA_A)
        b = module.get_variable("params", LORA_B)
        chained = a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[0]
        if not (chained and a.shape[0] == d_in and b.shape[1] == d_out):
            raise ValueError(
                f"{path}: {LORA_A} {a.shape} and {LORA_B} {b.shape} must be [in, r] and [r, out] "
                f"for kernel [{d_in}, {d_out}]."
            )
    for name, size, axis in (
        (DORA_M, d_out, "out"),
        (IA3_SCALE, d_out, "out"),
        (IA3_SCALE_IN, d_in, "in"),
    ):
        if name in present:
            shape = module.get_variable("params", name).shape
            if shape != (size,):
                raise ValueError(
                    f"{path}/{name}: shape {shape}, expected [{axis}] = ({size},) for kernel "
                    f"[{d_in}, {d_out}]."
                )


def _lora_delta(module: nn.Dense, x: jax.Array, dtype, opts: Options) -> jax.Array:
    a = module.get_variable("params", LORA_A)
    b = module.get_variable("params", LORA_B)
    if opts.lora_dropout > 0.0 and module.has_rng("dropout"):
        # A fresh key per module and call, from the module's own "dropout" stream.
        keep = 1.0 - opts.lora_dropout
        mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
        x = jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))
    # Factored form: [..., in] @ [in, r] @ [r, out]. Differentiating this never forms an [in, out]
    # array, so a frozen kernel costs no dense gradient (the point of LoRA's memory saving).
    h = jnp.einsum("...i,ir->...r", x.astype(dtype), a.astype(dtype), precision=module.precision)
    delta = jnp.einsum("...r,ro->...o", h, b.astype(dtype), precision=module.precision)
    return (delta * opts.lora_scale).astype(dtype)


def _lora_term(module: nn.Dense, x: jax.Array, y: jax.Array, opts: Options) -> jax.Array:
    return y + _lora_delta(module, x, y.dtype, opts)


def _dora_term(module: nn.Dense, x: jax.Array, y: jax.Array, opts: Options) -> jax.Array:
    # DoRA's efficient form (paper section 4.3): with V = W + s A B and g = m / ||V||_c,
    #   x @ (g V) + bias = g * (x W + s x A B) + bias,
    # so the base output y = x W + bias is reused and the LoRA part stays factored; only the
    # norm needs V itself. Written as y + (g - 1) (y - bias) + g s x A B, which is exactly y
    # when g == 1 and B == 0, i.e. at init.
    dtype = y.dtype
    norm = dora_column_norm(
        module.get_variable("params", "kernel"),
        module.get_variable("params", LORA_A),
        module.get_variable("params", LORA_B),
        scale=opts.lora_scale,
    )
    # Keep the norm's reduction out of the fusions around it, so that it rounds as the jitted
    # computation in `dora.init` did: then m / norm is exactly 1 at init and the adapted model
    # equals the base model bit for bit (a fused reduction may differ in the last bit).
    norm = jax.lax.optimization_barrier(norm)
    if not opts.dora_exact_norm_grad:
        # The paper's choice: ||V||_c is a constant in the backward pass. The gradient then
        # reaches A and B only through the factored x A B, so no [in, out] gradient is formed
        # (the norm's own gradient would be an [in, out] array per layer), at a negligible cost
        # in accuracy (Liu et al. 2024, section 4.3). m still gets its exact gradient.
        norm = jax.lax.stop_gradient(norm)
    g = dora_gain(module.get_variable("params", DORA_M).astype(jnp.float32), norm).astype(dtype)
    g = _broadcast_last(g, y)
    base = y
    if module.use_bias and module.has_variable("params", "bias"):
        base = y - _broadcast_last(module.get_variable("params", "bias").astype(dtype), y)
    return y + (g - 1) * base + g * _lora_delta(module, x, dtype, opts)


def _interceptor(opts: Options) -> Callable:
    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        present = {n for n in ALL_LEAVES if module.has_variable("params", n)}
        if not present:
            return next_fun(*args, **kwargs)
        sites.consume(module, *sorted(present))
        x = args[0] if args else kwargs["inputs"]
        _check_leaves(module, present, x, opts)
        if IA3_SCALE_IN in present:
            # IA3 on the input (the FFN activation in the paper): x -> x * l before the kernel.
            scale_in = module.get_variable("params", IA3_SCALE_IN)
            x = x * _broadcast_last(scale_in.astype(x.dtype), x)
            if args:
                args = (x, *args[1:])
            else:
                kwargs = {**kwargs, "inputs": x}
        y = _q4_dense(module, x) if Q4_DATA in present else next_fun(*args, **kwargs)
        if DORA_M in present:
            y = _dora_term(module, x, y, opts)
        elif LORA_A in present:
            y = _lora_term(module, x, y, opts)
        if IA3_SCALE in present:
            y = y * _broadcast_last(module.get_variable("params", IA3_SCALE).astype(y.dtype), y)
        return y

    return interceptor


@contextlib.contextmanager
def intercept(
    *,
    lora_scale: float | None = None,
    dora_exact_norm_grad: bool = False,
    lora_dropout: float = 0.0,
) -> Iterator[Options]:
    """Applies every dense-layer method leaf (LoRA, DoRA, IA3) while the context is active.

    For every `nn.Dense.__call__` whose module holds ``lora_a`` [in, r] and ``lora_b`` [r, out] in
    ``"params"``, the output becomes ``dense(x) + (x @ lora_a @ lora_b) * lora_scale``; with
    ``dora_m`` [out] as well it becomes DoRA's ``m / ||W + s a b||_c * (x W + s x a b) + bias``;
    ``ia3_scale_in`` [in] scales the input and ``ia3_scale`` [out] the output (see the module
    docstring for the order). Dense layers without method leaves are untouched, so a plain tree
    gives the base model.

    Enter it inside the traced function (see the module docstring, and :func:`wrap_apply`).

    Args:
        lora_scale: LoRA's ``alpha / rank``; required as soon as a LoRA or DoRA leaf is met.
        dora_exact_norm_grad: Differentiate through DoRA's column norm (default False: the
            norm is held constant in the backward pass, as DoRA section 4.3 recommends).
        lora_dropout: Dropout on the low-rank branch's input while a ``"dropout"`` rng stream
            is given (see :class:`Options`).

    Yields:
        The validated :class:`Options`.

    Raises:
        ValueError: (at apply time, naming the module path) a module holds LoRA/DoRA leaves but
            ``lora_scale`` is None, holds only one of the LoRA pair, holds ``dora_m`` without
            the pair, or holds a leaf whose shape does not fit its kernel.

    References:
        Hu et al. 2021, https://arxiv.org/abs/2106.09685;
        Liu et al. 2024 (DoRA), https://arxiv.org/abs/2402.09353;
        Liu et al. 2022 (IA3), https://arxiv.org/abs/2205.05638

    >>> model = nn.Dense(2)
    >>> params = {"kernel": jnp.eye(2), "bias": jnp.zeros(2),
    ...           "lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 2))}
    >>> with intercept(lora_scale=0.5):
    ...     y = model.apply({"params": params}, jnp.array([1.0, 2.0]))
    >>> y.tolist()
    [2.5, 3.5]
    >>> params |= {"ia3_scale": jnp.array([2.0, 0.0])}
    >>> with intercept(lora_scale=0.5):
    ...     model.apply({"params": params}, jnp.array([1.0, 2.0])).tolist()
    [5.0, 0.0]
    """
    opts = Options(
        lora_scale=lora_scale, dora_exact_norm_grad=dora_exact_norm_grad, lora_dropout=lora_dropout
    )
    with nn.intercept_methods(_interceptor(opts)):
        yield opts


def wrap_apply(
    apply_fn: Callable,
    *,
    lora_scale: float | None = None,
    dora_exact_norm_grad: bool = False,
    lora_dropout: float = 0.0,
) -> Callable:
    """Returns ``apply_fn`` running inside :func:`intercept`, same signature and result type.

    Wrapping the apply function (rather than entering the context around a jitted call) puts the
    interceptor inside whatever `jax.jit`, `jax.grad` or `jax.vmap` traces it.

    Args:
        apply_fn: Any function that calls a linen ``Module.apply``, e.g. a trainer's
            ``apply(params, batch, rng) -> logits``.
        lora_scale: LoRA's ``alpha / rank`` (LoRA and DoRA leaves need it; IA3 alone does not).
        dora_exact_norm_grad: See :func:`intercept`.
        lora_dropout: See :func:`intercept`.

    Returns:
        The wrapped function.

    >>> model = nn.Dense(1)
    >>> params = {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1),
    ...           "lora_a": jnp.ones((1, 1)), "lora_b": jnp.full((1, 1), 2.0)}
    >>> f = wrap_apply(lambda p, x: model.apply({"params": p}, x), lora_scale=0.25)
    >>> jax.jit(f)(params, jnp.ones(1)).tolist()
    [1.5]
    """
    # Validate now, not at trace time.
    opts = Options(
        lora_scale=lora_scale, dora_exact_norm_grad=dora_exact_norm_grad, lora_dropout=lora_dropout
    )

    @functools.wraps(apply_fn)
    def wrapped(*args, **kwargs):
        with nn.intercept_methods(_interceptor(opts)):
            return apply_fn(*args, **kwargs)

    return wrapped
