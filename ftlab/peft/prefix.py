"""Prefix tuning: trainable key/value prefixes in every attention layer, as a tree transformation.

The model's prefix hook (`ftlab.models.bert.BertSelfAttention`) reads, per layer::

    encoder/layer_3/attention/prefix_key      [length, hidden]
    encoder/layer_3/attention/prefix_value    [length, hidden]

These *are* the keys and values (split into heads like the projected ones) of ``length`` virtual
positions in front of the sequence; every query may attend to them.

Li & Liang found optimising the prefixes directly unstable, so they train a reparametrisation
and keep only its output. ``init`` adds that reparametrisation at the top level of the tree::

    prefix_mlp/embedding        [length, hidden]               trained, N(0, 1)
    prefix_mlp/dense_0/{kernel,bias}   [hidden, hidden_mlp]    trained
    prefix_mlp/dense_1/{kernel,bias}   [hidden_mlp, 2 * num_layers * hidden]   trained

and :func:`materialize` evaluates ``dense_1(tanh(dense_0(embedding)))`` once per forward pass and
writes the per-layer prefixes. During training the rules train ``prefix_mlp/.*`` and the apply
function materialises inside the loss (:func:`wrap_apply`), so gradients reach the MLP. For
inference :func:`finalize` materialises once and drops ``prefix_mlp``: the plain model then loads
only the prefixes, at no MLP cost. A typical run::

    params = prefix.init(params, rng, length=10, hidden_mlp=512)
    label_tree = partition.labels(params, prefix.rules(extra=[("head/.*", "train")]))
    apply = prefix.wrap_apply(apply)          # apply(params, batch, rng) -> logits
    ...
    serving_params = prefix.finalize(trained_params)   # no wrapper needed any more

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

from ftlab.core import partition, sites
from ftlab.models import bert
from ftlab.types import Params, PRNGKey

MLP = "prefix_mlp"
_MLP_LEAVES = ("embedding", "dense_0/kernel", "dense_0/bias", "dense_1/kernel", "dense_1/bias")
_LAYER = re.compile(r"(?P<layer>(?:.*/)?layer_(?P<index>\d+))/attention/key/kernel")
_PREFIX_LEAF = re.compile(rf"(.*/)?layer_\d+/attention/({bert.PREFIX_KEY}|{bert.PREFIX_VALUE})")


def init(
    params: Params, rng: PRNGKey, *, length: int, hidden_mlp: int, what: str = "config.peft"
) -> dict:
    """Adds the prefix reparametrisation ``prefix_mlp/...`` to a BERT tree.

    Args:
        params: A BERT tree (`BertEncoder` or `BertClassifier`) without prefixes.
        rng: Key for the MLP's initial values.
        length: Number of prefix positions per layer (Li & Liang: 10 for table-to-text, 200
            for summarisation).
        hidden_mlp: Width of the MLP's hidden layer (Li & Liang: 512 to 800).
        what: How to name the config group in errors.

    Returns:
        A new tree with a top-level ``prefix_mlp`` subtree: the embedding N(0, 1), kernels
        uniform(+-1/sqrt(fan_in)) and biases zero (PyTorch's defaults, which Li & Liang used).

    Raises:
        ValueError: bad ``length`` or ``hidden_mlp``, no attention layers, or prefix leaves or
            ``prefix_mlp`` already in the tree.

    >>> p = {"layer_0": {"attention": {"key": {"kernel": np.zeros((4, 4))}}}}
    >>> mlp = init(p, jax.random.key(0), length=3, hidden_mlp=5)["prefix_mlp"]
    >>> mlp["embedding"].shape, mlp["dense_1"]["kernel"].shape
    ((3, 4), (5, 8))
    """
    _check_positive(length, f"{what}.length", "e.g. 10")
    _check_positive(hidden_mlp, f"{what}.hidden_mlp", "e.g. 512")
    flat = partition.flatten(params)
    layers = _layers(flat, what="prefix.init")
    stale = [k for k in flat if _PREFIX_LEAF.fullmatch(k) or k.startswith(f"{MLP}/")]
    if stale:
        raise ValueError(f"prefix.init: {stale[0]} already exists; start from the base parameters.")
    hidden = np.shape(flat[f"{layers[0]}/attention/key/kernel"])[1]
    out_dim = 2 * len(layers) * hidden
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


def materialize(params: Params) -> dict:
    """Evaluates ``prefix_mlp`` and writes every layer's ``prefix_key`` and ``prefix_value``.

    Pure and differentiable: call it inside the loss (see :func:`wrap_apply`) so that gradients
    flow to ``prefix_mlp``. The ``prefix_mlp`` subtree is kept (the model ignores it).

    Args:
        params: A tree from :func:`init`.

    Returns:
        The tree with ``<layer>/attention/prefix_{key,value}`` [length, hidden] added.

    Raises:
        ValueError: no or an incomplete ``prefix_mlp`` (naming the missing leaf), an output width
            that does not fit the model's layers, or prefixes already present.

    >>> p = {"layer_0": {"attention": {"key": {"kernel": np.zeros((4, 4))}}}}
    >>> m = materialize(init(p, jax.random.key(0), length=3, hidden_mlp=5))
    >>> m["layer_0"]["attention"]["prefix_key"].shape
    (3, 4)
    """
    flat = partition.flatten(params)
    layers = _layers(flat, what="prefix.materialize")
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
    hidden = np.shape(flat[f"{layers[0]}/attention/key/kernel"])[1]
    length = mlp["embedding"].shape[0]
    want = 2 * len(layers) * hidden
    if mlp["dense_1/kernel"].shape[-1] != want or mlp["embedding"].shape[-1] != hidden:
        raise ValueError(
            f"prefix.materialize: {MLP}/embedding {mlp['embedding'].shape} and "
            f"{MLP}/dense_1/kernel {mlp['dense_1/kernel'].shape} do not fit a model with "
            f"{len(layers)} layers of width {hidden} (want [length, {hidden}] and "
            f"[hidden_mlp, {want}]); was the MLP made for another model?"
        )
    # Full float32 precision so a finalized tree and the training-time forward pass agree.
    dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
    h = jnp.tanh(dot(mlp["embedding"], mlp["dense_0/kernel"]) + mlp["dense_0/bias"][None])
    out = (dot(h, mlp["dense_1/kernel"]) + mlp["dense_1/bias"][None]).reshape(
        length, len(layers), 2, hidden
    )
    sites.consume((), MLP)  # the reparametrisation is used up here, the prefixes by the model
    for i, layer in enumerate(layers):
        flat[f"{layer}/attention/{bert.PREFIX_KEY}"] = out[:, i, 0]
        flat[f"{layer}/attention/{bert.PREFIX_VALUE}"] = out[:, i, 1]
    return partition.unflatten(flat)


def finalize(params: Params) -> dict:
    """:func:`materialize`, then drops ``prefix_mlp``: the tree to save and serve.

    >>> p = {"layer_0": {"attention": {"key": {"kernel": np.zeros((4, 4))}}}}
    >>> sorted(finalize(init(p, jax.random.key(0), length=3, hidden_mlp=5)))
    ['layer_0']
    """
    return {k: v for k, v in materialize(params).items() if k != MLP}


def wrap_apply(apply_fn: Callable) -> Callable:
    """Returns ``apply_fn`` that first materialises the prefixes of its first argument.

    Args:
        apply_fn: ``apply_fn(params, *args, **kwargs)``, e.g. a trainer's
            ``apply(params, batch, rng) -> logits``, that calls the model's ``apply``.

    Returns:
        ``wrapped(params, ...) = apply_fn(finalize(params), ...)``. Inside a loss, gradients
        reach ``prefix_mlp``.

    >>> p = {"layer_0": {"attention": {"key": {"kernel": np.zeros((4, 4))}}}}
    >>> f = wrap_apply(lambda q: sorted(q["layer_0"]["attention"]))
    >>> f(init(p, jax.random.key(0), length=3, hidden_mlp=5))
    ['key', 'prefix_key', 'prefix_value']
    """

    @functools.wraps(apply_fn)
    def wrapped(params, *args, **kwargs):
        return apply_fn(finalize(params), *args, **kwargs)

    return wrapped


def rules(
    *, extra: Sequence[tuple[str, str]] = (), reparametrized: bool = True
) -> list[tuple[str, str]]:
    """Partition rules that train the prefixes (and ``extra``) and freeze the rest.

    Args:
        extra: Rules placed first, e.g. ``[("head/.*", "train")]``.
        reparametrized: True (training from :func:`init`) trains ``prefix_mlp/.*``; False trains
            the per-layer ``prefix_key``/``prefix_value`` leaves of a finalized tree directly.

    >>> rules()
    [('prefix_mlp/.*', 'train'), ('.*', 'frozen')]
    """
    target = f"{MLP}/.*" if reparametrized else _PREFIX_LEAF.pattern
    return [*extra, (target, "train"), (".*", partition.FROZEN)]


def adapter(params: Params) -> dict:
    """The prefix-tuning leaves only: ``prefix_mlp`` and/or the per-layer prefixes.

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


def _layers(flat: dict, *, what: str) -> list[str]:
    """Layer paths ``<...>/layer_<i>`` in index order."""
    found = {}
    for k in flat:
        if m := _LAYER.fullmatch(k):
            found[int(m["index"])] = m["layer"]
    if not found:
        raise ValueError(
            f"{what}: no '<...>/layer_<i>/attention/key/kernel' in the tree (example leaf: "
            f"{next(iter(flat), None)!r}); pass a BERT encoder or classifier tree."
        )
    return [found[i] for i in sorted(found)]
