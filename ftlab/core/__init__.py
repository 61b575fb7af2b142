"""The core every method builds on. Submodules load on first use::

    from ftlab.core import partition, train

- ``partition``: trainable/frozen partitions by rules over leaf paths; ``split``/``merge``.
- ``train``: the train state and the compiled train step.
- ``checkpoint``: orbax checkpoints of a train state, written atomically and resumed.
- ``loading``: merging pretrained weights into a freshly initialised tree, path by path.
- ``metrics``: metric writers (JSON Lines, TensorBoard), non-finite checks, progress, plots.
- ``parallel``: the data-parallel plan (device mesh or pmap) and multi-host start-up.
- ``sites``: the check that every method leaf of an applied tree was consumed.
- ``tensorfile``: safetensors with a sha256 per tensor; JSON that names its file on errors.
- ``xla``: XLA compiler options that apply on the CPU only.
"""

import importlib

_SUBMODULES = (
    "checkpoint",
    "loading",
    "metrics",
    "parallel",
    "partition",
    "sites",
    "tensorfile",
    "train",
    "xla",
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
