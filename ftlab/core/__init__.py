"""The core every method builds on. Submodules load on first use::

    from ftlab.core import partition, train

- ``partition``: trainable/frozen partitions by rules over leaf paths; ``split``/``merge``.
- ``train``: the train state and the compiled train step.
- ``checkpoint``: orbax checkpoints of a train state, written atomically and resumed.
- ``loading``: merging pretrained weights into a freshly initialised tree, path by path.
- ``metrics``: metric writers (JSON Lines, TensorBoard), non-finite checks, progress.
- ``parallel``: the data-parallel plan (device mesh or pmap), the sharded plan, multi-host start-up.
- ``report``: tables (Markdown and JSON), 95% intervals and PNG plots of results.
- ``sharding``: sharding rules over a ``data`` x ``fsdp`` x ``tensor`` mesh (FSDP, tensor parallel).
- ``sites``: the check that every method leaf of an applied tree was consumed.
- ``tensorfile``: safetensors with a sha256 per tensor; JSON that names its file on errors.
- ``xla``: XLA compiler options that apply on the CPU only.
"""

from ftlab import _lazy

_SUBMODULES = (
    "checkpoint",
    "loading",
    "metrics",
    "parallel",
    "partition",
    "report",
    "sharding",
    "sites",
    "tensorfile",
    "train",
    "xla",
)

__getattr__, __dir__, __all__ = _lazy.attach(__name__, _SUBMODULES)
