"""Losses and metrics per task, for any model ``apply(params, batch, rng)``.

Submodules load on first use::

    from ftlab.tasks import classification, lm

- ``classification``: cross-entropy losses and accuracy for classifiers.
- ``lm``: causal language-model losses that never hold the full logits.
"""

from ftlab import _lazy

_SUBMODULES = (
    "classification",
    "lm",
)

__getattr__, __dir__, __all__ = _lazy.attach(__name__, _SUBMODULES)
