"""The structural hook points ftlab's models share, read the same way by every model.

A method that needs a structural hook puts its leaves in the params tree under these names (see
`ftlab.models.bert` and `ftlab.models.llama` for where each sits); a model without them is traced
exactly as the base model.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftlab.core import sites

PROMPT = "prompt"
PREFIX_KEY, PREFIX_VALUE = "prefix_key", "prefix_value"
REFT = "reft"
INTERVENE_METHOD = "intervene"


def scope_path(module: nn.Module) -> str:
    """The slash path of a bound module, as error messages name it."""
    scope = getattr(module, "scope", None)
    return "/".join(scope.path) if scope is not None and scope.path else "<root>"


def hook_leaves(module: nn.Module, name: str) -> Any:
    """The `params` entry `name` of `module` (a leaf or a subtree), or None when absent."""
    if not module.has_variable("params", name):
        return None
    sites.consume(module, name)
    return module.variables["params"][name]


def prefix_key_values(
    module: nn.Module, batch: int, *, heads: int, head_dim: int, dtype: Any, width: str
) -> tuple[jax.Array, jax.Array] | None:
    """`(keys, values)` `[batch, n_prefix, heads, head_dim]` from an attention module's prefix
    leaves `prefix_key`, `prefix_value` `[n_prefix, heads * head_dim]`, or None without them.

    Args:
        module: The bound attention module holding the leaves.
        batch: Batch size to broadcast to.
        heads: Key/value heads the rows split into.
        head_dim: Width of one head.
        dtype: Computation dtype.
        width: How errors name the expected row width, e.g. `"hidden=384"`.

    Raises:
        ValueError: only one of the two leaves, or a shape other than `[n, heads * head_dim]`.
    """
    key, value = hook_leaves(module, PREFIX_KEY), hook_leaves(module, PREFIX_VALUE)
    if key is None and value is None:
        return None
    path = scope_path(module)
    if key is None or value is None:
        missing = PREFIX_KEY if key is None else PREFIX_VALUE
        raise ValueError(
            f"{path}/{missing} is missing; prefix tuning needs both {PREFIX_KEY} and "
            f"{PREFIX_VALUE}. Re-create them with prefix.init(...) and prefix.finalize(...)."
        )
    for name, leaf in ((PREFIX_KEY, key), (PREFIX_VALUE, value)):
        if leaf.ndim != 2 or leaf.shape[1] != heads * head_dim or leaf.shape != key.shape:
            raise ValueError(
                f"{path}/{name} has shape {leaf.shape}; {PREFIX_KEY} {key.shape} and "
                f"{PREFIX_VALUE} {value.shape} must both be [n_prefix, {width}]."
            )

    def split(leaf):
        leaf = leaf.reshape(leaf.shape[0], heads, head_dim).astype(dtype)
        return jnp.broadcast_to(leaf, (batch, *leaf.shape))

    return split(key), split(value)
