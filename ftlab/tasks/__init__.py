"""Losses and metrics per task, for any model ``apply(params, batch, rng)``.

Submodules load on first use::

    from ftlab.tasks import classification, lm

- ``classification``: cross-entropy losses and accuracy for classifiers.
- ``lm``: causal language-model losses that never hold the full logits.
"""

import importlib

_SUBMODULES = (
    "classification",
    "lm",
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
