"""Flax models ftlab ships, and what they share. Submodules load on first use::

    from ftlab.models import bert, llama

- ``bert``: a BERT-style encoder (all-MiniLM-L6-v2) and classifier.
- ``llama``: a Llama-style decoder (SmolLM2) with a KV cache.
- ``attention``: scaled dot-product attention with a choice of kernel.
- ``hooks``: the structural hook points the models share.
"""

import importlib

_SUBMODULES = (
    "attention",
    "bert",
    "hooks",
    "llama",
)

__all__ = list(_SUBMODULES)


def __getattr__(name: str):
    # Submodules load on first use, so importing one does not import its siblings.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(
        f"module {__name__!r} has no attribute {name!r}; it has: {', '.join(__all__)}"
    )


def __dir__():
    return sorted(__all__)
