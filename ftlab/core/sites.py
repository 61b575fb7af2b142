"""Nothing silent: every method leaf in an applied tree must be consumed by a site or interceptor.

A method adds leaves to the parameter tree (``.../query/lora_a``, ``.../attention/prefix_key``,
``embeddings/prompt``, ``layer_3/attention_adapter/...``). A model applied to such a tree that
never reads one of them (no interceptor active, a model that does not call the hook the method
needs, a function traced earlier without the method) would silently run the base model. This
module makes that an error:

- a method leaf is any leaf whose path has a component in the registry of method names
  (:data:`METHOD_NAMES`, extended with :func:`register` for a user's own method);
- whatever reads method leaves (a model's hook, the dense-layer interceptor, a method's
  materialisation step) calls :func:`consume` while tracing;
- :func:`tracking` wraps one application of a model to a tree and, when it ends, raises
  :class:`UnconsumedLeavesError` naming every method leaf of that tree that nothing consumed.

Consumption is recorded while Python runs, i.e. while `jax.jit` traces. Checks therefore happen
once per trace, and a compiled function that skipped a method can never be reused silently: its
first trace raised. The reverse case (a function jitted *outside* the tracking context, first
traced with the method and later reused from jit's cache inside it) records nothing and so
raises too, naming the leaves: put `jax.jit` outside the wrapper, never inside.

Paths: a consumer records the path of its module inside the apply (linen's scope path, e.g.
``encoder/layer_0/attention/query``) plus the leaf or subtree name it read. A method leaf counts
as consumed when a consumed path is a suffix of its path (component-wise) or of one of its
parents, so a tree passed as ``{"params": tree}`` or nested one level inside the caller's own
tree is matched too.

>>> import jax.numpy as jnp
>>> tree = {"dense": {"kernel": jnp.ones((2, 2)), "lora_a": jnp.ones((2, 1))}}
>>> with tracking(tree, what="apply"):
...     consume("dense", "lora_a")
>>> try:
...     with tracking(tree, what="apply"):
...         pass
... except UnconsumedLeavesError as e:
...     print(e.leaves)
['dense/lora_a']
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import jax

__all__ = [
    "METHOD_NAMES",
    "UnconsumedLeavesError",
    "consume",
    "is_tracking",
    "method_leaves",
    "register",
    "tracking",
    "unconsumed",
]

# Path components that mark a leaf (or a subtree) as belonging to a method, and the method that
# owns each. Strings only: the core knows the names of the protocol, never the method modules.
METHOD_NAMES: dict[str, str] = {
    # dense-layer methods (read by the dense interceptor)
    "lora_a": "LoRA",
    "lora_b": "LoRA",
    "dora_m": "DoRA",
    "ia3_scale": "IA3",
    "ia3_scale_in": "IA3",
    "q4_data": "QLoRA",
    "q4_scale": "QLoRA",
    "q4_min": "QLoRA",
    # structural methods (read through the hook protocol)
    "prompt": "prompt tuning",
    "prefix_key": "prefix tuning",
    "prefix_value": "prefix tuning",
    "prefix_mlp": "prefix tuning",
    "attention_adapter": "adapters",
    "output_adapter": "adapters",
    "reft": "ReFT",
}

_local = threading.local()


class UnconsumedLeavesError(ValueError):
    """Method leaves that no site or interceptor read during an application of the model.

    Attributes:
        leaves: The slash paths of the unconsumed leaves.
    """

    def __init__(self, message: str, leaves: list[str]):
        super().__init__(message)
        self.leaves = leaves


def register(names: Iterable[str], method: str) -> None:
    """Declares ``names`` as path components of ``method``'s leaves, so they are checked too.

    Args:
        names: Leaf or subtree names the method adds (``"my_gate"``).
        method: How errors name the method.

    Raises:
        ValueError: a name already belongs to another method.
    """
    for name in names:
        owner = METHOD_NAMES.get(name)
        if owner is not None and owner != method:
            raise ValueError(f"register: {name!r} already belongs to {owner}.")
        METHOD_NAMES[name] = method


def _stack() -> list[set[tuple[str, ...]]]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def is_tracking() -> bool:
    """Whether an application of a model is being tracked in this thread."""
    return bool(_stack())


def _module_path(module: Any) -> tuple[str, ...]:
    if isinstance(module, str):
        return tuple(p for p in module.split("/") if p)
    if isinstance(module, (tuple, list)):
        return tuple(str(p) for p in module)
    scope = getattr(module, "scope", None)
    return tuple(scope.path) if scope is not None and scope.path else ()


def consume(module: Any, *names: str) -> None:
    """Records that ``module`` read its method entries ``names`` (leaves or subtrees).

    Call it from whatever applies a method leaf: a model's hook, an interceptor, a method's
    materialisation. Outside :func:`tracking` it does nothing.

    Args:
        module: A bound linen module (its scope path is used), or a slash path / tuple of names.
        names: Entry names under that module, e.g. ``"lora_a", "lora_b"``; none marks the
            module's own path (a whole subtree, e.g. an adapter module) as consumed.
    """
    stack = _stack()
    if not stack:
        return
    base = _module_path(module)
    paths = [base + (n,) for n in names] if names else [base]
    for consumed in stack:
        consumed.update(paths)


def method_leaves(tree: Any) -> list[str]:
    """The slash paths of ``tree``'s leaves that belong to a method (:data:`METHOD_NAMES`)."""
    out = []
    for key_path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = _parts(key_path)
        if any(p in METHOD_NAMES for p in parts):
            out.append("/".join(parts))
    return out


def _parts(key_path) -> tuple[str, ...]:
    out = []
    for k in key_path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def unconsumed(tree: Any, consumed: Iterable[tuple[str, ...]]) -> list[str]:
    """The method leaves of ``tree`` not covered by any ``consumed`` path (see module docstring)."""
    consumed = set(consumed)
    by_len: dict[int, set[tuple[str, ...]]] = {}
    for c in consumed:
        by_len.setdefault(len(c), set()).add(c)
    out = []
    for leaf in method_leaves(tree):
        parts = tuple(leaf.split("/"))
        # Every contiguous window of the leaf path that ends at a method component or below it.
        hit = any(
            parts[i : i + n] in paths
            for n, paths in by_len.items()
            for i in range(0, len(parts) - n + 1)
            if any(p in METHOD_NAMES for p in parts[i : i + n])
        )
        if not hit:
            out.append(leaf)
    return out


@contextlib.contextmanager
def tracking(tree: Any, *, what: str) -> Iterator[set[tuple[str, ...]]]:
    """Tracks one application of a model to ``tree``; raises if a method leaf was not consumed.

    Nested contexts each check their own tree; every consumption is recorded in all of them.

    Args:
        tree: The parameters (or variables) the model is applied to.
        what: How the error names the application, e.g. ``"lora.wrap_apply(apply)"``.

    Yields:
        The set of consumed paths (tuples of names), filled while the context is active.

    Raises:
        UnconsumedLeavesError: when the context exits normally and some method leaf of ``tree``
            was consumed by nothing.
    """
    consumed: set[tuple[str, ...]] = set()
    stack = _stack()
    stack.append(consumed)
    try:
        yield consumed
    finally:
        stack.remove(consumed)
    missing = unconsumed(tree, consumed)
    if missing:
        methods = sorted(
            {METHOD_NAMES[p] for leaf in missing for p in leaf.split("/") if p in METHOD_NAMES}
        )
        shown = ", ".join(missing[:8]) + (
            f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        )
        raise UnconsumedLeavesError(
            f"{what}: {len(missing)} {'/'.join(methods)} leaves were not used by the model: "
            f"{shown}. Apply the model through the method's wrap_apply (dense-layer methods need "
            "the interceptor), make sure the model calls the hook the method needs "
            "(ftlab.models.hooks), and jit outside the wrapper, not inside.",
            missing,
        )
