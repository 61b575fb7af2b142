"""Type aliases shared across ftlab."""

from typing import Any

import jax

__all__ = ["PyTree", "Params", "PRNGKey"]


PyTree = Any
Params = Any  # a nested dict of arrays, as produced by flax.linen `init`
PRNGKey = jax.Array
