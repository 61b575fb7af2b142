"""Data sets shipped in packages, synthetic task families, and deterministic batching.

Submodules load on first use::

    from ftlab.data import batching, text

- ``batching``: batches as a pure function of ``(arrays, step)``, so a resumed run sees the same.
- ``text``: strings to fixed-length token arrays.
- ``features``: a frozen trunk's outputs computed once; their cache, keyed by what they depend on.
- ``rotten_tomatoes``: Rotten Tomatoes review snippets (Pang & Lee) for sentiment.
- ``images``: small labelled image sets shipped inside installed packages.
- ``fewshot``: few-shot image classification episodes (sklearn digits, font glyphs).
- ``multitask``: real multi-task data as padded per-task arrays.
- ``sinusoid``: sinusoid regression tasks as in Finn et al. (2017).
- ``streams``: river's bundled real streams, for online learning.
"""

import importlib

_SUBMODULES = (
    "batching",
    "features",
    "fewshot",
    "images",
    "multitask",
    "rotten_tomatoes",
    "sinusoid",
    "streams",
    "text",
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
