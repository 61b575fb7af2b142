"""XLA compiler options for one backend, kept only where this XLA knows them.

Some programs compile to faster code on XLA:CPU with a non-default option (see
`ftlab.online.compiler_options` and `ftlab.meta.compiler_options`). Options move between XLA
versions, so `cpu_options` returns them only when compiling for CPU with an XLA that accepts them
all, and ``{}`` (XLA's defaults) otherwise:

    jax.jit(step, compiler_options=xla.cpu_options({"xla_cpu_use_fusion_emitters": False}))
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax

__all__ = ["cpu_options"]


def cpu_options(options: Mapping[str, Any], backend: str | None = None) -> dict[str, Any]:
    """``options`` where ``backend`` (default: JAX's) is CPU and XLA accepts them; else ``{}``."""
    if (backend or jax.default_backend()) != "cpu":
        return {}
    items = tuple(sorted(options.items()))
    return dict(items) if _cpu_accepts(items) else {}


@functools.cache
def _cpu_accepts(items: tuple[tuple[str, Any], ...]) -> bool:
    try:
        jax.jit(lambda a: a + 1, compiler_options=dict(items)).lower(1.0).compile()
    except Exception:  # noqa: BLE001 - an XLA that dropped or renamed an option: use its defaults
        return False
    return True
