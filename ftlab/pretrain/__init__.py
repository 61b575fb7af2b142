"""Pretraining for transfer: greedy layer-wise autoencoders and self-supervised pretext tasks.

Submodules load on first use::

    from ftlab.pretrain import layerwise, transfer

- ``network``: the MLP encoder plus small named heads that is pretrained and transferred.
- ``layerwise``: greedy layer-wise pretraining.
- ``ssl``: self-supervised pretext tasks (rotation prediction, InfoNCE).
- ``transfer``: a new head, then linear probing or full fine-tuning.
"""

from ftlab import _lazy

_SUBMODULES = ("layerwise", "network", "ssl", "transfer")

__getattr__, __dir__, __all__ = _lazy.attach(__name__, _SUBMODULES)
