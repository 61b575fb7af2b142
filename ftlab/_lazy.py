"""Lazy package attributes: submodules (and names re-exported from them) load on first use.

Each package `__init__` of ftlab is one call, so importing one module never imports its siblings
and ``import ftlab`` stays cheap::

    __getattr__, __dir__, __all__ = _lazy.attach(__name__, ["lora", "dora"])

(The scientific Python ecosystem's ``lazy_loader.attach`` does the same; this is its 20 lines
without a dependency and with ftlab's error message.)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping


def attach(
    package: str, submodules: Iterable[str], names: Mapping[str, str] | None = None
) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """Returns ``(__getattr__, __dir__, __all__)`` for the package named ``package``.

    Args:
        package: The package's ``__name__``.
        submodules: Its submodules, reachable as attributes.
        names: ``{name: submodule}`` for names re-exported from a submodule.

    Returns:
        The module-level ``__getattr__`` and ``__dir__`` functions and ``__all__``.
    """
    submodules, names = tuple(submodules), dict(names or {})
    public = [*names, *submodules]

    def __getattr__(name: str):
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        if name in names:
            value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(
            f"module {package!r} has no attribute {name!r}; it has: {', '.join(public)}"
        )

    def __dir__() -> list[str]:
        return sorted(public)

    return __getattr__, __dir__, public
