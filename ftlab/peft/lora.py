"""LoRA: low-rank adapters on frozen dense kernels, as a transformation of the parameter tree.

``init`` puts ``lora_a`` [in, r] and ``lora_b`` [r, out] next to each targeted kernel::

    encoder/layer_3/attention/query/kernel    [in, out]   frozen
    encoder/layer_3/attention/query/lora_a    [in, r]     trained, random
    encoder/layer_3/attention/query/lora_b    [r, out]    trained, zeros

and the model, applied inside :func:`intercept` (or `ftlab.peft.dense.wrap_apply`), computes
``x @ kernel + bias + (x @ lora_a @ lora_b) * alpha / r``. Since ``lora_b`` starts at zero the
adapted model starts out equal to the base model. The scale ``alpha / r`` is not a leaf: it is a
static number given to the interceptor and to :func:`merge` alike, so both always agree and it can
never be trained. Training stays in factored form, so no [in, out] gradient of a frozen kernel is
formed; :func:`merge` folds the adapter into plain kernels for inference at the base model's cost.

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
    return dense.intercept(lora_scale=scale(alpha=alpha, rank=rank))


def wrap_apply(apply_fn: Callable, *, alpha: float, rank: int, dropout: float = 0.0) -> Callable:
    """`ftlab.peft.dense.wrap_apply` with ``lora_scale = alpha / rank``.

    ``dropout`` is LoRA's dropout on the low-rank branch's input (HF PEFT's ``lora_dropout``),
    active only when the model is applied with a ``"dropout"`` rng stream.

    >>> import flax.linen as nn
    >>> p = {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1),
    ...      "lora_a": jnp.ones((1, 1)), "lora_b": jnp.ones((1, 1))}
    >>> f = wrap_apply(lambda p, x: nn.Dense(1).apply({"params": p}, x), alpha=4.0, rank=1)
    >>> jax.jit(f)(p, jnp.ones(1)).tolist()
    [5.0]
    """
    return dense.wrap_apply(
        apply_fn, lora_scale=scale(alpha=alpha, rank=rank), lora_dropout=dropout
    )


def init(
    params: Params,
    rng: PRNGKey,
    *,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    what: str = "config.peft",
) -> Params:
    """Adds ``lora_a`` and ``lora_b`` next to every dense kernel whose module path matches.

    ``lora_a`` [in, r] is drawn like PEFT's default (``kaiming_uniform_(a=sqrt(5))`` on the torch
    [r, in] weight), i.e. uniform on ``[-1/sqrt(in), 1/sqrt(in)]``; ``lora_b`` [r, out] is zeros,
    so the adapted model equals the base model at init (the paper's choice; A Gaussian, B zero).

    Args:
        params: A parameter tree (nested dicts) without a ``{"params": ...}`` wrapper.
        rng: PRNG key for ``lora_a``; leaf ``i`` (in tree order) uses ``fold_in(rng, i)``.
        targets: Regexes, each ``re.fullmatch``-ed against the module path of a 2-D ``kernel``
            leaf (the path without ``/kernel``), e.g.
            ``r"encoder/layer_\\d+/attention/(query|value)"``.
        rank: The adapter rank r, 1 <= r <= min(in, out) for every targeted kernel.
        alpha: The LoRA alpha; only checked here (the scale ``alpha / r`` is given at apply time).
        what: The config group named in errors: ``{what}.targets``, ``{what}.rank``, ...

    Returns:
        A new tree with the LoRA leaves added; every other leaf is the same object as before.

    Raises:
        ValueError: a target matches no dense kernel (available module paths are listed), the
            rank is out of range, alpha is not a finite nonzero number, or a targeted module
            already holds LoRA leaves.

    References:
        Hu et al. 2021, https://arxiv.org/abs/2106.09685

    >>> p = {"body": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
    >>> p = init(p, jax.random.key(0), targets=["body"], rank=2, alpha=4.0)
    >>> p["body"]["lora_a"].shape, p["body"]["lora_b"].shape
    ((4, 2), (2, 3))
    """
    if isinstance(targets, str):
        raise ValueError(
            f"{what}.targets must be a list of regexes, got the string {targets!r}; "
            f"write [{targets!r}]."
        )
    _check_rank_value(rank, f"{what}.rank")
    _check_alpha(alpha, f"{what}.alpha")
    flat = partition.flatten(params)
    modules = _dense_modules(flat)
    compiled = []
    for i, pattern in enumerate(targets):
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"{what}.targets[{i}]: invalid regex {pattern!r}: {e}") from None
    if not compiled:
        raise ValueError(f"{what}.targets is empty; name at least one dense module regex.")
    chosen = []
    for i, regex in enumerate(compiled):
        hits = [m for m in modules if regex.fullmatch(m)]
        if not hits:
            raise ValueError(
                f"{what}.targets[{i}]: pattern {targets[i]!r} matched no dense kernel. Targets "
                "are matched against module paths (without '/kernel'); available: "
                f"{_summarize(modules)}."
            )
        chosen.extend(h for h in hits if h not in chosen)
    chosen = [m for m in modules if m in chosen]  # tree order, for reproducible rng use
    for m in chosen:
        present = [f"{m}/{n}" for n in dense.METHOD_LEAVES if f"{m}/{n}" in flat]
        if present:
            raise ValueError(
                f"{what}.targets: {present[0]} already exists; start from the base parameters, or "
                "fold the existing adapter in first with lora.merge(...)."
            )
        d_in, d_out = np.shape(flat[f"{m}/kernel"])
        if rank > min(d_in, d_out):
            raise ValueError(
                f"{what}.rank={rank} exceeds min(in, out)={min(d_in, d_out)} of {m}/kernel "
                f"[{d_in}, {d_out}]; a rank that large is no longer low-rank. Use "
                f"{what}.rank <= {min(d_in, d_out)} or drop {m} from {what}.targets."
            )
    out = {}
    for name, leaf in flat.items():
        out[name] = leaf
        module = name[: -len("/kernel")] if name.endswith("/kernel") else None
        if module in chosen:
            d_in, d_out = np.shape(leaf)
            dtype = getattr(leaf, "dtype", jnp.float32)
            key = jax.random.fold_in(rng, chosen.index(module))
            bound = 1.0 / math.sqrt(d_in)
            out[f"{module}/{LORA_A}"] = jax.random.uniform(
                key, (d_in, rank), dtype, minval=-bound, maxval=bound
            )
            out[f"{module}/{LORA_B}"] = jnp.zeros((rank, d_out), dtype)
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
    model's cost. Pure and jittable.

    Args:
        params: A tree holding LoRA leaves (from :func:`init`, trained).
        alpha: The LoRA alpha used in training.
        rank: The rank used in training; checked against the ``lora_a`` shapes.

    Returns:
        The merged tree.

    Raises:
        ValueError: no LoRA leaves, a module without a kernel or with only one of the pair, or a
            ``rank`` that differs from the leaves' rank.

    >>> p = {"d": {"kernel": jnp.zeros((2, 2)), "lora_a": jnp.ones((2, 1)),
    ...            "lora_b": jnp.ones((1, 2))}}
    >>> merge(p, alpha=3.0, rank=1)["d"]["kernel"].tolist()
    [[3.0, 3.0], [3.0, 3.0]]
    """
    s = scale(alpha=alpha, rank=rank)
    flat = partition.flatten(params)
    pairs = _pairs(flat, rank=rank, what="lora.merge")
    out = {}
    for name, leaf in flat.items():
        if _LORA_LEAF.fullmatch(name):
            continue
        module = name[: -len("/kernel")] if name.endswith("/kernel") else None
        if module in pairs:
            a, b = pairs[module]
            leaf = (jnp.asarray(leaf) + s * _matmul(a, b)).astype(jnp.asarray(leaf).dtype)
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
            out[name] = (kernel - s * _matmul(a, b)).astype(kernel.dtype)
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


def _dense_modules(flat: Mapping[str, Any]) -> list[str]:
    """Module paths (without '/kernel') of the 2-D kernels, in tree order."""
    return [
        k[: -len("/kernel")] for k, v in flat.items() if k.endswith("/kernel") and np.ndim(v) == 2
    ]


def _summarize(modules: Sequence[str], limit: int = 12) -> str:
    # Collapse layer indices so a 24-layer model lists a handful of patterns, not 144 paths.
    generic = list(dict.fromkeys(re.sub(r"_\d+(?=/|$)", r"_\\d+", m) for m in modules))
    shown = ", ".join(generic[:limit])
    return shown + (f", ... ({len(generic) - limit} more)" if len(generic) > limit else "")


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
                "rank the adapter was trained with (config.peft.rank)."
            )
        out[module] = (a, b)
    return out


def _matmul(a: Any, b: Any) -> jax.Array:
    # Full float32 precision: on TPU/GPU the default may round to bf16, and merge must agree with
    # the factored forward pass to float tolerance.
    return jnp.matmul(jnp.asarray(a), jnp.asarray(b), precision=jax.lax.Precision.HIGHEST)
