"""Pretraining for transfer: greedy layer-wise autoencoders and self-supervised pretext tasks.

Submodules load on first use::

    from ftlab.pretrain import layerwise, transfer

- ``network``: the MLP encoder plus small named heads that is pretrained and transferred.
- ``loop``: many train steps as one compiled ``lax.scan``.
- ``layerwise``: greedy layer-wise pretraining.
- ``ssl``: self-supervised pretext tasks (rotation prediction, InfoNCE).
- ``transfer``: a new head, then linear probing or full fine-tuning.
"""

import importlib

_SUBMODULES = ("layerwise", "loop", "network", "ssl", "transfer")

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
