"""LoRA: low-rank adapters on frozen linear kernels, as a transformation of the parameter tree.

``init`` puts ``lora_a`` [in, r] and ``lora_b`` [r, out] next to each targeted kernel::

    encoder/layer_3/attention/query/kernel    [in, out]   frozen
    encoder/layer_3/attention/query/lora_a    [in, r]     trained, random
    encoder/layer_3/attention/query/lora_b    [r, out]    trained, zeros

and the model, applied inside :func:`intercept` (or `ftlab.peft.dense.wrap_apply`), computes
``x @ kernel + bias + (x @ lora_a @ lora_b) * alpha / r``.

Every Flax linear layer takes LoRA: `nn.Dense`, `nn.DenseGeneral` (e.g. the query, key, value
and output projections of `nn.MultiHeadDotProductAttention`), `nn.Einsum` and `nn.Conv`. Their
kernels are laid out ``(*in axes, *out axes)`` and LoRA adapts the kernel as the matrix
[fan_in, fan_out] of that split (for a convolution, (window x in channels, out)): ``lora_a`` is
[fan_in, r], ``lora_b`` [r, fan_out], and the interceptor computes the update factored (the
input contracted with ``lora_a`` shaped as a kernel of r outputs, then ``lora_b``). A kernel that
is not 2-D needs its layer type, which :func:`init` takes as ``layers=dense.layers(apply_fn,
params, batch)``; ``layer_types=("Conv",)`` then selects by type instead of by path.

Since ``lora_b`` starts at zero the adapted model starts out equal to the base model. The scale
``alpha / r`` is not a leaf: it is a static number given to the interceptor and to :func:`merge`
alike, so both always agree and it can never be trained. Training stays in factored form, so no
[in, out] gradient of a frozen kernel is formed; :func:`merge` folds the adapter into plain
kernels for inference at the base model's cost.

A typical run::

    params = lora.init(params, rng, targets=[r"encoder/layer_\\d+/attention/(query|value)"],
                       rank=8, alpha=16)
    label_tree = partition.labels(params, lora.rules(extra=[("head/.*", "train")]))
    apply = lora.wrap_apply(apply, alpha=16, rank=8)
    ...
    lora.save(workdir / "adapter", lora.adapter(params), config_dict={...})

References:
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
    https://arxiv.org/abs/2106.09685
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftlab.core import partition
from ftlab.peft import dense
from ftlab.types import Params, PRNGKey

__all__ = [
    "CONFIG_FILE",
    "LORA_A",
    "LORA_B",
    "WEIGHTS_FILE",
    "adapter",
    "init",
    "intercept",
    "load",
    "merge",
    "rules",
    "save",
    "scale",
    "unmerge",
    "wrap_apply",
]

LORA_A, LORA_B = dense.LORA_A, dense.LORA_B
WEIGHTS_FILE = "lora.safetensors"
CONFIG_FILE = "lora.json"
_LORA_LEAF = re.compile(rf".*/({LORA_A}|{LORA_B})")


def scale(*, alpha: float, rank: int) -> float:
    """LoRA's output scale ``alpha / rank`` (Hu et al. 2021, section 4.1).

    Args:
        alpha: The LoRA alpha.
        rank: The adapter rank r.

    Returns:
        ``alpha / rank`` as a Python float.

    >>> scale(alpha=16, rank=8)
    2.0
    """
    _check_alpha(alpha, "alpha")
    _check_rank_value(rank, "rank")
    return float(alpha) / int(rank)


def intercept(*, alpha: float, rank: int):
    """`ftlab.peft.dense.intercept` with ``lora_scale = alpha / rank``; enter it inside traces.

    >>> import flax.linen as nn
    >>> p = {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1),
    ...      "lora_a": jnp.ones((1, 1)), "lora_b": jnp.ones((1, 1))}
    >>> with intercept(alpha=2.0, rank=1):
    ...     nn.Dense(1).apply({"params": p}, jnp.ones(1)).tolist()
    [3.0]
    """
    return dense.intercept(lora_scale=scale(alpha=alpha, rank=rank), lora_rank=int(rank))


def wrap_apply(apply_fn: Callable, *, alpha: float, rank: int, dropout: float = 0.0) -> Callable:
    """`ftlab.peft.dense.wrap_apply` with ``lora_scale = alpha / rank``.

    ``dropout`` is LoRA's dropout on the low-rank branch's input (HF PEFT's ``lora_dropout``),
    active only when the model is applied with a ``"dropout"`` rng stream. A LoRA pair whose
    rank is not ``rank`` raises when applied (its scale ``alpha / rank`` would be wrong), and so
    do LoRA leaves no layer used (see `ftlab.peft.dense.wrap_apply`).

    >>> import flax.linen as nn
    >>> p = {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1),
    ...      "lora_a": jnp.ones((1, 1)), "lora_b": jnp.ones((1, 1))}
    >>> f = wrap_apply(lambda p, x: nn.Dense(1).apply({"params": p}, x), alpha=4.0, rank=1)
    >>> jax.jit(f)(p, jnp.ones(1)).tolist()
    [5.0]
    """
    return dense.wrap_apply(
        apply_fn,
        lora_scale=scale(alpha=alpha, rank=rank),
        lora_dropout=dropout,
        lora_rank=int(rank),
        what="lora.wrap_apply(apply_fn)",
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
    """Adds ``lora_a`` and ``lora_b`` next to every chosen linear layer's kernel.

    ``lora_a`` [fan_in, r] is drawn like PEFT's default (``kaiming_uniform_(a=sqrt(5))`` on the
    torch [r, in] weight), i.e. uniform on ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``; ``lora_b``
    [r, fan_out] is zeros, so the adapted model equals the base model at init (the paper's
    choice; A Gaussian, B zero). For `nn.Dense`, fan_in and fan_out are the kernel's [in, out].

    Args:
        params: A parameter tree (nested dicts) without a ``{"params": ...}`` wrapper.
        rng: PRNG key for ``lora_a``; leaf ``i`` (in tree order) uses ``fold_in(rng, i)``.
        targets: Regexes, each ``re.fullmatch``-ed against the module path of a kernel (the
            path without ``/kernel``), e.g. ``r"encoder/layer_\\d+/attention/(query|value)"``.
        rank: The adapter rank r, 1 <= r <= min(fan_in, fan_out) for every chosen kernel.
        alpha: The LoRA alpha; only checked here (the scale ``alpha / r`` is given at apply time).
        layer_types: Layer kinds to adapt wherever they are (``"Dense"``, ``"DenseGeneral"``,
            ``"Einsum"``, ``"Conv"`` or the `flax.linen` classes); needs ``layers``. A layer is
            chosen when it matches a target or its type is listed.
        layers: The model's layers, ``dense.layers(apply_fn, params, *example_args)``. Without
            it the candidates are the 2-D kernels, taken as [in, out]; with it every supported
            layer the model calls, whatever its kernel's rank.
        what: Prefix of the argument names in errors, e.g. ``"config.peft"`` for
            ``config.peft.targets[0]``; by default errors say ``lora.init: targets[0]``.

    Returns:
        A new tree with the LoRA leaves added; every other leaf is the same object as before.

    Raises:
        ValueError: a target or layer type matches no layer (available module paths are
            listed), a chosen layer cannot take LoRA (e.g. a masked convolution), the rank is
            out of range, alpha is not a finite nonzero number, or a chosen module already holds
            LoRA leaves.

    References:
        Hu et al. 2021, https://arxiv.org/abs/2106.09685

    >>> p = {"body": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> p = init(p, jax.random.key(0), targets=["body"], rank=2, alpha=4.0)
    >>> p["body"]["lora_a"].shape, p["body"]["lora_b"].shape
    ((4, 2), (2, 3))
    """
    arg = f"{what}." if what else "lora.init: "
    return _init(params, rng, targets, rank, alpha, layer_types, layers, arg=arg)


def _init(params, rng, targets, rank, alpha, layer_types, layers, *, arg: str) -> Params:
    """:func:`init` with ``arg`` prefixing argument names in errors (shared with `dora.init`)."""
    _check_rank_value(rank, f"{arg}rank")
    _check_alpha(alpha, f"{arg}alpha")
    flat = partition.flatten(params)
    chosen = dense.select(flat, targets=targets, layer_types=layer_types, layers=layers, arg=arg)
    for m, layer in chosen.items():
        present = [f"{m}/{n}" for n in dense.METHOD_LEAVES if f"{m}/{n}" in flat]
        if present:
            raise ValueError(
                f"{arg}targets: {present[0]} already exists; start from the base parameters, or "
                "fold the existing adapter in first with lora.merge(...)."
            )
        d_in, d_out = layer.fan_in, layer.fan_out
        if rank > min(d_in, d_out):
            raise ValueError(
                f"{arg}rank={rank} exceeds min(in, out)={min(d_in, d_out)} of {m}/kernel "
                f"[{d_in}, {d_out}]; a rank that large is no longer low-rank. Use "
                f"rank <= {min(d_in, d_out)} or drop {m} from the targets."
            )
    order = list(chosen)
    out = {}
    for name, leaf in flat.items():
        out[name] = leaf
        module = name.rpartition("/")[0]
        if name.rpartition("/")[2] in ("kernel", dense.Q4_DATA) and module in chosen:
            layer = chosen[module]
            dtype = (
                jnp.float32 if name.endswith(dense.Q4_DATA) else getattr(leaf, "dtype", jnp.float32)
            )
            key = jax.random.fold_in(rng, order.index(module))
            bound = 1.0 / math.sqrt(layer.fan_in)
            out[f"{module}/{LORA_A}"] = jax.random.uniform(
                key, (layer.fan_in, rank), dtype, minval=-bound, maxval=bound
            )
            out[f"{module}/{LORA_B}"] = jnp.zeros((rank, layer.fan_out), dtype)
    return partition.unflatten(out)


def rules(*, extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Partition rules that train the LoRA leaves (and ``extra``) and freeze the rest.

    Args:
        extra: Rules placed first, e.g. ``[("head/.*", "train")]`` for a new classifier head.

    Returns:
        ``[*extra, (".*/lora_(a|b)", "train"), (".*", "frozen")]`` for `ftlab.core.partition`.

    >>> rules(extra=[("head/.*", "train")])
    [('head/.*', 'train'), ('.*/lora_(a|b)', 'train'), ('.*', 'frozen')]
    """
    return [*extra, (".*/lora_(a|b)", "train"), (".*", partition.FROZEN)]


def adapter(params: Params) -> dict:
    """The LoRA leaves of ``params`` only: what to save and share, without the base weights.

    Raises:
        ValueError: ``params`` holds no LoRA leaf.

    >>> p = {"q": {"kernel": 1, "lora_a": 2, "lora_b": 3}, "head": {"kernel": 4}}
    >>> adapter(p)
    {'q': {'lora_a': 2, 'lora_b': 3}}
    """
    flat = partition.flatten(params)
    out = {k: v for k, v in flat.items() if _LORA_LEAF.fullmatch(k)}
    if not out:
        top = sorted({k.split("/")[0] for k in flat})
        raise ValueError(
            f"lora.adapter: no '*/{LORA_A}' or '*/{LORA_B}' leaf in the tree (top-level names: "
            f"{', '.join(top)}); add them with lora.init(...) first."
        )
    return partition.unflatten(out)


def merge(params: Params, *, alpha: float, rank: int) -> Params:
    """Folds ``alpha / rank * lora_a @ lora_b`` into each kernel and drops the LoRA leaves.

    The result is a plain tree the base model applies without any interceptor, at the base
    model's cost. Pure and jittable. Any layer kind: the [fan_in, fan_out] update is reshaped to
    the kernel's ``(*in axes, *out axes)`` shape (`ftlab.peft.dense.Layer`), so merging needs
    no layer types.

    Args:
        params: A tree holding LoRA leaves (from :func:`init`, trained).
        alpha: The LoRA alpha used in training.
        rank: The rank used in training; checked against the ``lora_a`` shapes.

    Returns:
        The merged tree.

    Raises:
        ValueError: no LoRA leaves, a module without a kernel (the adapter is never dropped
            silently) or with only one of the pair, a pair that does not fit its kernel, or a
            ``rank`` that differs from the leaves' rank.

    >>> p = {"d": {"kernel": jnp.zeros((2, 2)), "lora_a": jnp.ones((2, 1)),
    ...            "lora_b": jnp.ones((1, 2))}}
    >>> merge(p, alpha=3.0, rank=1)["d"]["kernel"].tolist()
    [[3.0, 3.0], [3.0, 3.0]]
    """
    s = scale(alpha=alpha, rank=rank)
    flat = partition.flatten(params)
    pairs = _pairs(flat, rank=rank, what="lora.merge")
    for module in pairs:
        if f"{module}/kernel" not in flat:
            quantized = f"{module}/{dense.Q4_DATA}" in flat
            raise ValueError(
                f"lora.merge: {module} holds {LORA_A}/{LORA_B} but no {module}/kernel to fold "
                "them into" + ("; it is a Q4 kernel, use qlora.merge." if quantized else ".")
            )
    out = {}
    for name, leaf in flat.items():
        if _LORA_LEAF.fullmatch(name):
            continue
        module = name[: -len("/kernel")] if name.endswith("/kernel") else None
        if module in pairs:
            a, b = pairs[module]
            leaf = jnp.asarray(leaf)
            delta = _delta(a, b, leaf.shape, where=f"lora.merge: {module}")
            leaf = (leaf + s * delta).astype(leaf.dtype)
        out[name] = leaf
    return partition.unflatten(out)


def unmerge(merged: Params, adapter_tree: Params, *, alpha: float, rank: int) -> Params:
    """Inverse of :func:`merge`: subtracts the adapter from the kernels and puts its leaves back.

    Args:
        merged: A tree from :func:`merge` (no LoRA leaves).
        adapter_tree: The adapter that was merged (from :func:`adapter`).
        alpha: The LoRA alpha.
        rank: The LoRA rank; checked against the adapter's shapes.

    Returns:
        The tree with the original kernels (to float rounding) and the LoRA leaves.

    Raises:
        ValueError: an adapter module has no kernel in ``merged``, or ``merged`` still holds LoRA
            leaves there.

    >>> p = {"d": {"kernel": jnp.zeros((2, 2)), "lora_a": jnp.ones((2, 1)),
    ...            "lora_b": jnp.ones((1, 2))}}
    >>> back = unmerge(merge(p, alpha=3.0, rank=1), adapter(p), alpha=3.0, rank=1)
    >>> back["d"]["kernel"].tolist(), sorted(back["d"])
    ([[0.0, 0.0], [0.0, 0.0]], ['kernel', 'lora_a', 'lora_b'])
    """
    s = scale(alpha=alpha, rank=rank)
    flat = partition.flatten(merged)
    ad = partition.flatten(adapter_tree)
    stray = [k for k in ad if not _LORA_LEAF.fullmatch(k)]
    if stray:
        raise ValueError(
            f"lora.unmerge: the adapter holds non-LoRA leaves, e.g. {stray[:3]}; pass "
            "lora.adapter(params)."
        )
    pairs = _pairs(ad, rank=rank, what="lora.unmerge")
    for module in pairs:
        if f"{module}/kernel" not in flat:
            raise ValueError(
                f"lora.unmerge: the adapter has {module}/{LORA_A} but the merged tree has no "
                f"{module}/kernel; is it the tree the adapter was merged into?"
            )
        if f"{module}/{LORA_A}" in flat or f"{module}/{LORA_B}" in flat:
            raise ValueError(
                f"lora.unmerge: the merged tree already holds {module}/{LORA_A}; it was not "
                "merged (pass lora.merge(...)'s output)."
            )
    out = {}
    for name, leaf in flat.items():
        module = name[: -len("/kernel")] if name.endswith("/kernel") else None
        if module in pairs:
            a, b = pairs[module]
            kernel = jnp.asarray(leaf)
            delta = _delta(a, b, kernel.shape, where=f"lora.unmerge: {module}")
            out[name] = (kernel - s * delta).astype(kernel.dtype)
            out[f"{module}/{LORA_A}"], out[f"{module}/{LORA_B}"] = a, b
        else:
            out[name] = leaf
    return partition.unflatten(out)


def save(path: str | pathlib.Path, adapter_tree: Params, *, config_dict: Mapping[str, Any]) -> None:
    """Writes an adapter to the folder ``path``: ``lora.safetensors`` and ``lora.json``.

    The safetensors keys are the flat slash paths (``encoder/layer_0/attention/query/lora_a``);
    the JSON holds ``config_dict`` (at least ``rank`` and ``alpha``; ``targets`` is customary).
    The safetensors metadata records a sha256 of each tensor, which :func:`load` verifies.
    For MiniLM with r=8 on query and value this is about 300 kB.

    Args:
        path: Output folder (created if missing).
        adapter_tree: LoRA leaves only, from :func:`adapter`.
        config_dict: JSON-serialisable hyperparameters, e.g.
            ``dict(rank=8, alpha=16, targets=[...])``.

    Raises:
        ValueError: the tree holds non-LoRA leaves, ``config_dict`` lacks ``rank``/``alpha`` or
            disagrees with the leaves' rank, or is not JSON-serialisable.

    >>> import tempfile
    >>> ad = {"d": {"lora_a": np.ones((3, 1), np.float32), "lora_b": np.zeros((1, 2), np.float32)}}
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     save(tmp, ad, config_dict={"rank": 1, "alpha": 2.0})
    ...     loaded, cfg = load(tmp)
    >>> loaded["d"]["lora_a"].shape, cfg["alpha"]
    ((3, 1), 2.0)
    """
    from ftlab.core import tensorfile  # noqa: PLC0415 (keeps `import ftlab.peft.lora` light)

    flat = partition.flatten(adapter_tree)
    stray = [k for k in flat if not _LORA_LEAF.fullmatch(k)]
    if stray:
        raise ValueError(
            f"lora.save: only LoRA leaves belong in an adapter file, got e.g. {stray[:3]}; pass "
            "lora.adapter(params)."
        )
    config_dict = dict(config_dict)
    _check_config(config_dict, where="lora.save: config_dict")
    _pairs(flat, rank=int(config_dict["rank"]), what="lora.save")
    try:
        text = json.dumps(config_dict, indent=2, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"lora.save: config_dict is not JSON-serialisable: {e}") from None
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # A sha256 per tensor in the file's metadata: load then catches a changed byte.
    tensorfile.save(path / WEIGHTS_FILE, flat, metadata={"format": "ftlab.lora"})
    (path / CONFIG_FILE).write_text(text + "\n")


def load(path: str | pathlib.Path) -> tuple[dict, dict]:
    """Reads an adapter folder written by :func:`save`.

    Args:
        path: The folder holding ``lora.safetensors`` and ``lora.json``.

    Returns:
        ``(adapter, config_dict)``: the nested adapter tree of numpy arrays, and the JSON dict.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the JSON lacks ``rank``/``alpha``, or the tensors do not fit them.
        ftlab.core.tensorfile.CorruptFileError: (a ValueError naming the file) ``lora.json`` is
            not valid JSON, ``lora.safetensors`` is truncated, or a tensor's bytes no longer match
            the sha256 :func:`save` recorded. A file without digests (written before ftlab
            recorded them) loads with a warning.
    """
    from ftlab.core import tensorfile  # noqa: PLC0415 (keeps `import ftlab.peft.lora` light)

    path = pathlib.Path(path)
    for f in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / f).is_file():
            raise FileNotFoundError(
                f"{path / f} is missing; an adapter folder from lora.save holds {WEIGHTS_FILE} "
                f"and {CONFIG_FILE}."
            )
    config_dict = tensorfile.read_json(path / CONFIG_FILE, what="LoRA adapter config")
    if not isinstance(config_dict, dict):
        raise ValueError(f"{path / CONFIG_FILE}: expected a JSON object, got {config_dict!r}.")
    _check_config(config_dict, where=str(path / CONFIG_FILE))
    # Adapters saved before digests were recorded still load, with a warning naming the file.
    flat, _ = tensorfile.load(path / WEIGHTS_FILE, missing_digests="warn")
    stray = [k for k in flat if not _LORA_LEAF.fullmatch(k)]
    if stray:
        raise ValueError(f"{path / WEIGHTS_FILE}: not a LoRA adapter, holds e.g. {stray[:3]}.")
    _pairs(flat, rank=int(config_dict["rank"]), what=str(path / WEIGHTS_FILE))
    return partition.unflatten(flat), config_dict


# ---------------------------------------------------------------------------------------------


def _check_rank_value(rank: Any, what: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"{what}={rank!r} must be an integer >= 1 (typical: 4, 8, 16).")


def _check_alpha(alpha: Any, what: str) -> None:
    ok = isinstance(alpha, (int, float, np.floating, np.integer)) and not isinstance(alpha, bool)
    if not ok or not math.isfinite(alpha) or alpha == 0:
        raise ValueError(
            f"{what}={alpha!r} must be a finite nonzero number (the scale is alpha / rank; "
            "alpha = 2 * rank is common)."
        )


def _check_config(config_dict: Mapping[str, Any], *, where: str) -> None:
    for key in ("rank", "alpha"):
        if key not in config_dict:
            raise ValueError(
                f"{where}: missing {key!r}; the adapter config must record rank and alpha "
                "(the scale alpha / rank is not stored in the tensors)."
            )
    _check_rank_value(config_dict["rank"], f"{where}: rank")
    _check_alpha(config_dict["alpha"], f"{where}: alpha")


def _pairs(flat: Mapping[str, Any], *, rank: int, what: str) -> dict[str, tuple[Any, Any]]:
    """``{module: (lora_a, lora_b)}``, checking pairs are complete and of rank ``rank``."""
    modules: dict[str, dict[str, Any]] = {}
    for name, leaf in flat.items():
        if _LORA_LEAF.fullmatch(name):
            module, leaf_name = name.rsplit("/", 1)
            modules.setdefault(module, {})[leaf_name] = leaf
    if not modules:
        raise ValueError(f"{what}: no LoRA leaves found; add them with lora.init(...) first.")
    out = {}
    for module, leaves in modules.items():
        if set(leaves) != {LORA_A, LORA_B}:
            missing = ({LORA_A, LORA_B} - set(leaves)).pop()
            raise ValueError(f"{what}: {module}/{missing} is missing; an adapter needs both.")
        a, b = leaves[LORA_A], leaves[LORA_B]
        if np.ndim(a) != 2 or np.ndim(b) != 2 or np.shape(a)[1] != np.shape(b)[0]:
            raise ValueError(
                f"{what}: {module}/{LORA_A} {np.shape(a)} and {LORA_B} {np.shape(b)} must be "
                "[in, r] and [r, out]."
            )
        if np.shape(a)[1] != rank:
            raise ValueError(
                f"{what}: rank={rank} but {module}/{LORA_A} has rank {np.shape(a)[1]}; pass the "
                "rank the adapter was trained with."
            )
        out[module] = (a, b)
    return out


def _delta(a: Any, b: Any, kernel_shape, *, where: str) -> jax.Array:
    """``a @ b`` shaped as the kernel (whose input axes come first, see `dense.Layer`)."""
    dense.kernel_matrix_shape(kernel_shape, np.shape(a)[0], where=where)
    if np.shape(b)[1] * np.shape(a)[0] != math.prod(kernel_shape):
        raise ValueError(
            f"{where}: {LORA_A} {np.shape(a)} and {LORA_B} {np.shape(b)} do not fit kernel "
            f"{list(kernel_shape)}."
        )
    return _matmul(a, b).reshape(kernel_shape)


def _matmul(a: Any, b: Any) -> jax.Array:
    # Full float32 precision: on TPU/GPU the default may round to bf16, and merge must agree with
    # the factored forward pass to float tolerance.
    return jnp.matmul(jnp.asarray(a), jnp.asarray(b), precision=jax.lax.Precision.HIGHEST)
