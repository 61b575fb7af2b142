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
- ``files``: a user's CSV / JSON Lines / Parquet files: classification, chat, preference pairs.
- ``sharegpt``: ShareGPT conversations (instruction tuning), decoded up to the file's cut.
- ``graphs``: real graphs with labelled nodes (the larval Drosophila connectome, graspologic).
- ``ratings``: human sentiment ratings of movie snippets, tweets and more (Hutto & Gilbert 2014).
"""

from ftlab import _lazy

_SUBMODULES = (
    "batching",
    "features",
    "fewshot",
    "files",
    "graphs",
    "images",
    "multitask",
    "ratings",
    "rotten_tomatoes",
    "sharegpt",
    "sinusoid",
    "streams",
    "text",
)

__getattr__, __dir__, __all__ = _lazy.attach(__name__, _SUBMODULES)
