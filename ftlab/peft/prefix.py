"""Prefix tuning: trainable key/value prefixes in every attention layer, as a tree transformation.

The model's key/value hook (`ftlab.models.hooks.key_value`, found by `hooks.discover`) reads,
per attention module (here ftlab's BERT)::

    encoder/layer_3/attention/prefix_key      [length, heads * head_dim]
    encoder/layer_3/attention/prefix_value    [length, heads * head_dim]

These *are* the keys and values (split into heads like the projected ones) of ``length`` virtual
positions in front of the sequence; every query may attend to them.

Li & Liang found optimising the prefixes directly unstable, so they train a reparametrisation
and keep only its output. ``init`` adds that reparametrisation at the top level of the tree::

    prefix_mlp/embedding        [length, width]               trained, N(0, 1)
    prefix_mlp/dense_0/{kernel,bias}   [width, hidden_mlp]    trained
    prefix_mlp/dense_1/{kernel,bias}   [hidden_mlp, 2 * sum of the sites' widths]   trained

(``width`` is the first site's ``heads * head_dim``; site ``i``'s keys and then values are the
next ``2 * width_i`` columns of ``dense_1``'s output, in call order.)

and :func:`materialize` evaluates ``dense_1(tanh(dense_0(embedding)))`` once per forward pass and
writes the per-site prefixes. During training the rules train ``prefix_mlp/.*`` and the apply
function materialises inside the loss (:func:`wrap_apply`), so gradients reach the MLP. For
inference :func:`finalize` materialises once and drops ``prefix_mlp``: the plain model then loads
only the prefixes, at no MLP cost. The sites come from `hooks.discover` and are passed to each
function that lays the MLP's output out. A typical run::

    sites = hooks.discover(apply, params, example_batch, None)   # apply(params, batch, rng)
    params = prefix.init(params, rng, sites=sites, length=10, hidden_mlp=512)
    label_tree = partition.labels(params, prefix.rules(extra=[("head/.*", "train")]))
    apply = prefix.wrap_apply(apply, sites)          # apply(params, batch, rng) -> logits
    ...
    serving_params = prefix.finalize(trained_params, sites)   # no wrapper needed any more

References:
    Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
    https://arxiv.org/abs/2101.00190
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftlab.core import partition
from ftlab.core import sites as core_sites
from ftlab.models import hooks
from ftlab.types import Params, PRNGKey

__all__ = ["MLP", "adapter", "finalize", "init", "materialize", "rules", "wrap_apply"]

MLP = "prefix_mlp"
_MLP_LEAVES = ("embedding", "dense_0/kernel", "dense_0/bias", "dense_1/kernel", "dense_1/bias")
_PREFIX_LEAF = re.compile(rf"(.*/)?({hooks.PREFIX_KEY}|{hooks.PREFIX_VALUE})")


def init(
    params: Params,
    rng: PRNGKey,
    *,
    sites: Sequence[hooks.Site],
    length: int,
    hidden_mlp: int,
    what: str | None = None,
) -> dict:
    """Adds the prefix reparametrisation ``prefix_mlp/...`` for the model's key/value sites.

    Args:
        params: The model's tree, without prefixes.
        rng: Key for the MLP's initial values.
        sites: The model's hook sites, from `hooks.discover(apply, params, *example)`; the
            ``key_value`` ones get prefixes.
        length: Number of prefix positions per site (Li & Liang: 10 for table-to-text, 200
            for summarisation).
        hidden_mlp: Width of the MLP's hidden layer (Li & Liang: 512 to 800).
        what: The config group that set these arguments, e.g. ``"config.peft"``; by
            default errors say ``prefix.init: length``.

    Returns:
        A new tree with a top-level ``prefix_mlp`` subtree: the embedding N(0, 1), kernels
        uniform(+-1/sqrt(fan_in)) and biases zero (PyTorch's defaults, which Li & Liang used).

    Raises:
        ValueError: bad ``length`` or ``hidden_mlp``, no key/value site, or prefix leaves or
            ``prefix_mlp`` already in the tree.

    >>> site = hooks.Site(hooks.KEY_VALUE, "layer_0/attention", width=4, heads=2, head_dim=2)
    >>> mlp = init({}, jax.random.key(0), sites=[site], length=3, hidden_mlp=5)["prefix_mlp"]
    >>> mlp["embedding"].shape, mlp["dense_1"]["kernel"].shape
    ((3, 4), (5, 8))
    """
    arg = f"{what}." if what else "prefix.init: "
    _check_positive(length, f"{arg}length", "e.g. 10")
    _check_positive(hidden_mlp, f"{arg}hidden_mlp", "e.g. 512")
    targets = hooks.of_kind(sites, hooks.KEY_VALUE, what="prefix.init")
    flat = partition.flatten(params)
    stale = [k for k in flat if _PREFIX_LEAF.fullmatch(k) or k.startswith(f"{MLP}/")]
    if stale:
        raise ValueError(f"prefix.init: {stale[0]} already exists; start from the base parameters.")
    hidden = targets[0].width
    out_dim = 2 * sum(s.width for s in targets)
    k_emb, k0, k1 = jax.random.split(rng, 3)

    def uniform(key, shape):
        bound = 1.0 / math.sqrt(shape[0])
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

    mlp = {
        "embedding": jax.random.normal(k_emb, (length, hidden), jnp.float32),
        "dense_0": {
            "kernel": uniform(k0, (hidden, hidden_mlp)),
            "bias": jnp.zeros((hidden_mlp,), jnp.float32),
        },
        "dense_1": {
            "kernel": uniform(k1, (hidden_mlp, out_dim)),
            "bias": jnp.zeros((out_dim,), jnp.float32),
        },
    }
    return {**params, MLP: mlp}


def materialize(params: Params, sites: Sequence[hooks.Site]) -> dict:
    """Evaluates ``prefix_mlp`` and writes every key/value site's ``prefix_key``/``prefix_value``.

    Pure and differentiable: call it inside the loss (see :func:`wrap_apply`) so that gradients
    flow to ``prefix_mlp``. The ``prefix_mlp`` subtree is kept (the model ignores it).

    Args:
        params: A tree from :func:`init`.
        sites: The sites :func:`init` was given.

    Returns:
        The tree with ``<site>/prefix_{key,value}`` [length, heads * head_dim] added.

    Raises:
        ValueError: no or an incomplete ``prefix_mlp`` (naming the missing leaf), an output width
            that does not fit the sites, or prefixes already present.

    >>> site = hooks.Site(hooks.KEY_VALUE, "layer_0/attention", width=4, heads=2, head_dim=2)
    >>> p = init({}, jax.random.key(0), sites=[site], length=3, hidden_mlp=5)
    >>> materialize(p, [site])["layer_0"]["attention"]["prefix_key"].shape
    (3, 4)
    """
    targets = hooks.of_kind(sites, hooks.KEY_VALUE, what="prefix.materialize")
    flat = partition.flatten(params)
    mlp = {}
    for leaf in _MLP_LEAVES:
        if f"{MLP}/{leaf}" not in flat:
            hint = (
                "add it with prefix.init(...)"
                if not any(k.startswith(f"{MLP}/") for k in flat)
                else "re-create it with prefix.init(...)"
            )
            raise ValueError(f"prefix.materialize: {MLP}/{leaf} is missing; {hint}.")
        mlp[leaf] = jnp.asarray(flat[f"{MLP}/{leaf}"])
    present = [k for k in flat if _PREFIX_LEAF.fullmatch(k)]
    if present:
        raise ValueError(
            f"prefix.materialize: {present[0]} already exists next to {MLP}; a tree holds either "
            "the reparametrisation (training) or the prefixes (after prefix.finalize), not both."
        )
    hidden = targets[0].width
    want = 2 * sum(s.width for s in targets)
    if mlp["dense_1/kernel"].shape[-1] != want or mlp["embedding"].shape[-1] != hidden:
        raise ValueError(
            f"prefix.materialize: {MLP}/embedding {mlp['embedding'].shape} and "
            f"{MLP}/dense_1/kernel {mlp['dense_1/kernel'].shape} do not fit the model's "
            f"{len(targets)} key/value sites (want [length, {hidden}] and [hidden_mlp, {want}]); "
            "was the MLP made for another model?"
        )
    # Full float32 precision so a finalized tree and the training-time forward pass agree.
    dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    h = jnp.tanh(dot(mlp["embedding"], mlp["dense_0/kernel"]) + mlp["dense_0/bias"][None])
    out = dot(h, mlp["dense_1/kernel"]) + mlp["dense_1/bias"][None]
    core_sites.consume((), MLP)  # the reparametrisation is used up here, the prefixes by the model
    start = 0
    for site in targets:
        w = site.width
        flat[site.leaf(hooks.PREFIX_KEY)] = out[:, start : start + w]
        flat[site.leaf(hooks.PREFIX_VALUE)] = out[:, start + w : start + 2 * w]
        start += 2 * w
    return partition.unflatten(flat)


def finalize(params: Params, sites: Sequence[hooks.Site]) -> dict:
    """:func:`materialize`, then drops ``prefix_mlp``: the tree to save and serve.

    >>> site = hooks.Site(hooks.KEY_VALUE, "layer_0/attention", width=4, heads=2, head_dim=2)
    >>> p = init({"layer_0": {}}, jax.random.key(0), sites=[site], length=3, hidden_mlp=5)
    >>> sorted(finalize(p, [site]))
    ['layer_0']
    """
    return {k: v for k, v in materialize(params, sites).items() if k != MLP}


def wrap_apply(apply_fn: Callable, sites: Sequence[hooks.Site]) -> Callable:
    """Returns ``apply_fn`` that first materialises the prefixes of its first argument.

    The call is checked like `hooks.wrap_apply`: a prefix (or any method leaf) that the model
    did not read raises `UnconsumedLeavesError` naming it.

    Args:
        apply_fn: ``apply_fn(params, *args, **kwargs)``, e.g. a trainer's
            ``apply(params, batch, rng) -> logits``, that calls the model's ``apply``.
        sites: The sites :func:`init` was given.

    Returns:
        ``wrapped(params, ...) = apply_fn(finalize(params, sites), ...)``. Inside a loss,
        gradients reach ``prefix_mlp``.
    """
    hooks.of_kind(sites, hooks.KEY_VALUE, what="prefix.wrap_apply")

    @functools.wraps(apply_fn)
    def wrapped(params, *args, **kwargs):
        with hooks.tracking(params, what="prefix.wrap_apply(apply)"):
            return apply_fn(finalize(params, sites), *args, **kwargs)

    return wrapped


def rules(
    *, extra: Sequence[tuple[str, str]] = (), reparametrized: bool = True
) -> list[tuple[str, str]]:
    """Partition rules that train the prefixes (and ``extra``) and freeze the rest.

    Args:
        extra: Rules placed first, e.g. ``[("head/.*", "train")]``.
        reparametrized: True (training from :func:`init`) trains ``prefix_mlp/.*``; False trains
            the per-site ``prefix_key``/``prefix_value`` leaves of a finalized tree directly.

    >>> rules()
    [('prefix_mlp/.*', 'train'), ('.*', 'frozen')]
    """
    target = f"{MLP}/.*" if reparametrized else _PREFIX_LEAF.pattern
    return [*extra, (target, "train"), (".*", partition.FROZEN)]


def adapter(params: Params) -> dict:
    """The prefix-tuning leaves only: ``prefix_mlp`` and/or the per-site prefixes.

    Raises:
        ValueError: ``params`` holds neither.

    >>> adapter({"layer_0": {"attention": {"prefix_key": 1, "prefix_value": 2, "key": 3}}})
    {'layer_0': {'attention': {'prefix_key': 1, 'prefix_value': 2}}}
    """
    flat = partition.flatten(params)
    out = {k: v for k, v in flat.items() if k.startswith(f"{MLP}/") or _PREFIX_LEAF.fullmatch(k)}
    if not out:
        top = sorted({k.split("/")[0] for k in flat})
        raise ValueError(
            f"prefix.adapter: no {MLP} or prefix_key/prefix_value leaf in the tree (top-level "
            f"names: {', '.join(top)}); add them with prefix.init(...) first."
        )
    return partition.unflatten(out)


def _check_positive(value, what: str, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what}={value!r} must be an integer >= 1 ({example}).")
