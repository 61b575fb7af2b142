"""Houlsby adapters: bottleneck MLPs after every sublayer, as a tree transformation.

``init`` adds one adapter at every sublayer-output site the model calls
(`ftlab.models.hooks.sublayer_output`), found by `hooks.discover`; on ftlab's BERT::

    encoder/layer_3/attention_adapter/down/{kernel,bias}   [hidden, k], [k]   trained, small random
    encoder/layer_3/attention_adapter/up/{kernel,bias}     [k, hidden], [hidden]   trained, zeros
    encoder/layer_3/output_adapter/...                     the same, after the feed-forward block

Each adapter maps a sublayer output ``x`` to ``x + up(gelu(down(x)))`` before the residual add
(and, in a post-LN model, the layer norm), as Houlsby et al. place it. The paper initialises
adapters *near* identity (small random weights on both projections); here ``up`` starts at exactly
zero and ``down`` small and random, so each adapter starts as an exact identity and the adapted
model equals the base model (to one float32 ulp under jit: the adapter changes how XLA fuses the
``out`` dense with the residual add). ``down`` gets a gradient as soon as ``up`` has moved. The
model applies any adapter it finds; :func:`wrap_apply` adds the check that every adapter was
used (ftlab's own models check that themselves). A typical run::

    sites = hooks.discover(apply, params, example_batch, None)   # apply(params, batch, rng)
    params = adapters.init(params, rng, sites=sites, bottleneck=64)
    label_tree = partition.labels(params, adapters.rules(extra=[("head/.*", "train")]))

References:
    Houlsby et al., "Parameter-Efficient Transfer Learning for NLP",
    https://arxiv.org/abs/1902.00751
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftlab.core import partition
from ftlab.models import hooks
from ftlab.types import Params, PRNGKey

__all__ = ["DOWN_INIT_STD", "SITES", "adapter", "init", "rules", "wrap_apply"]

# The adapter subtree names, one per sublayer name of the hook protocol.
SITES = tuple(hooks.adapter_name(n) for n in hooks.SUBLAYERS)
# Standard deviation of the down-projection's init (BERT's own init scale).
DOWN_INIT_STD = 0.02
_ADAPTER_LEAF = re.compile(rf"(.*/)?({'|'.join(SITES)})/(down|up)/(kernel|bias)")


def init(
    params: Params,
    rng: PRNGKey,
    *,
    sites: Sequence[hooks.Site],
    bottleneck: int,
    what: str | None = None,
) -> dict:
    """Adds an adapter at every sublayer-output site of the model.

    Args:
        params: The model's tree, without adapters.
        rng: Key for the down-projections.
        sites: The model's hook sites, from `hooks.discover(apply, params, *example)`; the
            ``sublayer`` ones get an adapter.
        bottleneck: The adapter width k (Houlsby et al. use 8 to 256).
        what: The config group that set these arguments, e.g. ``"config.peft"`` for
            ``config.peft.bottleneck``; by default errors say ``adapters.init: bottleneck``.

    Returns:
        A new tree with ``<site>/<name>_adapter/{down,up}/{kernel,bias}`` added; ``up`` is zero,
        so the model is unchanged until training moves it.

    Raises:
        ValueError: ``bottleneck`` is not a positive integer, the model calls no
            sublayer-output hook, or the tree already holds adapters.

    >>> site = hooks.Site(kind=hooks.SUBLAYER, path="layer_0", name="output", width=4)
    >>> p = init({"layer_0": {}}, jax.random.key(0), sites=[site], bottleneck=2)
    >>> a = p["layer_0"]["output_adapter"]
    >>> a["down"]["kernel"].shape, float(a["up"]["kernel"].sum())
    ((4, 2), 0.0)
    """
    arg = f"{what}." if what else "adapters.init: "
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, (int, np.integer)):
        raise ValueError(f"{arg}bottleneck={bottleneck!r} must be an integer >= 1 (e.g. 64).")
    if bottleneck < 1:
        raise ValueError(f"{arg}bottleneck={bottleneck} must be >= 1 (e.g. 64).")
    targets = hooks.of_kind(sites, hooks.SUBLAYER, what="adapters.init")
    flat = partition.flatten(params)
    existing = [k for k in flat if _ADAPTER_LEAF.fullmatch(k)]
    if existing:
        raise ValueError(
            f"adapters.init: {existing[0]} already exists; start from the base parameters."
        )
    out = dict(flat)
    # Site i (in call order) draws from fold_in(rng, i): on BERT, 2 * layer + (0 attention,
    # 1 output), the keys the layer-by-layer init used.
    for i, site in enumerate(targets):
        hidden, name = site.width, site.leaf(hooks.adapter_name(site.name))
        down = DOWN_INIT_STD * jax.random.normal(
            jax.random.fold_in(rng, i), (hidden, bottleneck), jnp.float32
        )
        out[f"{name}/down/kernel"] = down
        out[f"{name}/down/bias"] = jnp.zeros((bottleneck,), jnp.float32)
        out[f"{name}/up/kernel"] = jnp.zeros((bottleneck, hidden), jnp.float32)
        out[f"{name}/up/bias"] = jnp.zeros((hidden,), jnp.float32)
    return partition.unflatten(out)


def wrap_apply(apply_fn: Callable) -> Callable:
    """Returns ``apply_fn`` that raises when an adapter of its first argument was not used.

    The model applies adapters without a wrapper; this adds the check for a model that does not
    call the sublayer-output hook (`hooks.wrap_apply`). Same signature and result.
    """
    return hooks.wrap_apply(apply_fn, what="adapters.wrap_apply(apply)")


def rules(
    *, extra: Sequence[tuple[str, str]] = (), train_layer_norms: bool = False
) -> list[tuple[str, str]]:
    """Partition rules that train the adapters (and ``extra``) and freeze the rest.

    Args:
        extra: Rules placed first, e.g. ``[("head/.*", "train")]`` for a new classifier head.
        train_layer_norms: Also train the layers' layer norms, as Houlsby et al. do (section 2.1).

    Returns:
        Ordered ``(regex, label)`` rules for `ftlab.core.partition`, ending in a catch-all.

    >>> rules(extra=[("head/.*", "train")])[1:]
    [('(.*/)?(attention_adapter|output_adapter)/.*', 'train'), ('.*', 'frozen')]
    """
    out = [*extra, (rf"(.*/)?({'|'.join(SITES)})/.*", "train")]
    if train_layer_norms:
        out.append((r"(.*/)?layer_\d+/(attention|output)_layer_norm/.*", "train"))
    return [*out, (".*", partition.FROZEN)]


def adapter(params: Params) -> dict:
    """The adapter leaves of ``params`` only: what to save and share, without the base weights.

    Raises:
        ValueError: ``params`` holds no adapter leaf.

    >>> sites = [hooks.Site(hooks.SUBLAYER, "layer_0", n, 4) for n in hooks.SUBLAYERS]
    >>> p = init({"layer_0": {}}, jax.random.key(0), sites=sites, bottleneck=2)
    >>> sorted(adapter(p)["layer_0"])
    ['attention_adapter', 'output_adapter']
    """
    flat = partition.flatten(params)
    out = {k: v for k, v in flat.items() if _ADAPTER_LEAF.fullmatch(k)}
    if not out:
        raise ValueError(
            f"adapters.adapter: no '*/{{{','.join(SITES)}}}/...' leaf in the tree (top-level "
            f"names: {', '.join(_top(flat))}); add them with adapters.init(...) first."
        )
    return partition.unflatten(out)


def _top(flat: dict[str, Any]) -> list[str]:
    return sorted({k.split("/")[0] for k in flat})
