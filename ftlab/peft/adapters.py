"""Houlsby adapters: bottleneck MLPs inside every transformer layer, as a tree transformation.

``init`` adds two adapters per layer, read by the model's adapter hook (`ftlab.models.bert`)::

    encoder/layer_3/attention_adapter/down/{kernel,bias}   [hidden, k], [k]   trained, small random
    encoder/layer_3/attention_adapter/up/{kernel,bias}     [k, hidden], [hidden]   trained, zeros
    encoder/layer_3/output_adapter/...                     the same, after the feed-forward block

Each adapter maps a sublayer output ``x`` to ``x + up(gelu(down(x)))`` before the residual add and
layer norm, as Houlsby et al. place it. The paper initialises adapters *near* identity (small
random weights on both projections); here ``up`` starts at exactly zero and ``down`` small and
random, so each adapter starts as an exact identity and the adapted model equals the base model
(to one float32 ulp under jit: the adapter changes how XLA fuses the ``out`` dense with the
residual add). ``down`` gets a gradient as soon as ``up`` has moved. No wrapper is needed: the
model applies any adapter it finds in the tree.

A typical run::

    params = adapters.init(params, rng, bottleneck=64)
    label_tree = partition.labels(params, adapters.rules(extra=[("head/.*", "train")]))

References:
    Houlsby et al., "Parameter-Efficient Transfer Learning for NLP",
    https://arxiv.org/abs/1902.00751
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftlab.core import partition
from ftlab.models import bert
from ftlab.types import Params, PRNGKey

SITES = (bert.ATTENTION_ADAPTER, bert.OUTPUT_ADAPTER)
# Standard deviation of the down-projection's init (BERT's own init scale).
DOWN_INIT_STD = 0.02
_LAYER = re.compile(r"(?P<layer>(?:.*/)?layer_\d+)/attention/out/kernel")
_ADAPTER_LEAF = re.compile(rf".*/({'|'.join(SITES)})/(down|up)/(kernel|bias)")


def init(params: Params, rng: PRNGKey, *, bottleneck: int, what: str = "config.peft") -> dict:
    """Adds an attention and an output adapter to every transformer layer of ``params``.

    Args:
        params: A BERT tree (`BertEncoder` or `BertClassifier`), without adapters.
        rng: Key for the down-projections.
        bottleneck: The adapter width k (Houlsby et al. use 8 to 256).
        what: How to name the config group in errors.

    Returns:
        A new tree with ``<layer>/{attention,output}_adapter/{down,up}/{kernel,bias}`` added;
        ``up`` is zero, so the model is unchanged until training moves it.

    Raises:
        ValueError: ``bottleneck`` is not a positive integer, the tree has no transformer layer,
            or it already holds adapters.

    >>> p = {"layer_0": {"attention": {"out": {"kernel": np.zeros((4, 4))}}}}
    >>> a = init(p, jax.random.key(0), bottleneck=2)["layer_0"]["output_adapter"]
    >>> a["down"]["kernel"].shape, float(a["up"]["kernel"].sum())
    ((4, 2), 0.0)
    """
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, (int, np.integer)):
        raise ValueError(f"{what}.bottleneck={bottleneck!r} must be an integer >= 1 (e.g. 64).")
    if bottleneck < 1:
        raise ValueError(f"{what}.bottleneck={bottleneck} must be >= 1 (e.g. 64).")
    flat = partition.flatten(params)
    layers = [m["layer"] for k in flat if (m := _LAYER.fullmatch(k))]
    if not layers:
        raise ValueError(
            f"adapters.init: no '<...>/layer_<i>/attention/out/kernel' in the tree (example leaf: "
            f"{next(iter(flat), None)!r}); pass a BERT encoder or classifier tree."
        )
    existing = [k for k in flat if _ADAPTER_LEAF.fullmatch(k)]
    if existing:
        raise ValueError(
            f"adapters.init: {existing[0]} already exists; start from the base parameters."
        )
    out = dict(flat)
    for i, layer in enumerate(layers):
        hidden = np.shape(flat[f"{layer}/attention/out/kernel"])[1]
        for j, site in enumerate(SITES):
            key = jax.random.fold_in(rng, 2 * i + j)
            down = DOWN_INIT_STD * jax.random.normal(key, (hidden, bottleneck), jnp.float32)
            out[f"{layer}/{site}/down/kernel"] = down
            out[f"{layer}/{site}/down/bias"] = jnp.zeros((bottleneck,), jnp.float32)
            out[f"{layer}/{site}/up/kernel"] = jnp.zeros((bottleneck, hidden), jnp.float32)
            out[f"{layer}/{site}/up/bias"] = jnp.zeros((hidden,), jnp.float32)
    return partition.unflatten(out)


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
    [('.*/(attention_adapter|output_adapter)/.*', 'train'), ('.*', 'frozen')]
    """
    out = [*extra, (rf".*/({'|'.join(SITES)})/.*", "train")]
    if train_layer_norms:
        out.append((r"(.*/)?layer_\d+/(attention|output)_layer_norm/.*", "train"))
    return [*out, (".*", partition.FROZEN)]


def adapter(params: Params) -> dict:
    """The adapter leaves of ``params`` only: what to save and share, without the base weights.

    Raises:
        ValueError: ``params`` holds no adapter leaf.

    >>> p = init({"layer_0": {"attention": {"out": {"kernel": np.zeros((4, 4))}}}},
    ...          jax.random.key(0), bottleneck=2)
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
