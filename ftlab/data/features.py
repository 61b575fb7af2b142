"""Features of a frozen, deterministic trunk: computed once, stored with the key they depend on.

When everything below a point of a model is frozen and runs without randomness (a linear probe:
only the head trains, no dropout in the encoder), the head's inputs never change during training.
Computing them once and training the head on them gives the same run as feeding every batch
through the trunk, at a fraction of the cost. This module holds the pure pieces; where the cache
lives and when it is used is the caller's policy::

    key = features.cache_key(trunk=frozen, inputs=data, settings={...})
    try:
        cached = features.load(path, key=key)
    except (FileNotFoundError, features.StaleCacheError) as e:
        cached = {s: features.compute(fn, data[s], batch_size=128) for s in data}
        features.save(path, cached, key=key)

The key is a dict of sha256 digests, one per thing the features depend on (the trunk's weights,
the model inputs, the settings and the code), so a mismatch names what changed. Files are
safetensors written by `ftlab.core.tensorfile` (a digest per tensor, verified when read).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from ftlab.core import partition, tensorfile

__all__ = [
    "CODE_VERSION",
    "StaleCacheError",
    "cache_key",
    "compute",
    "input_of",
    "load",
    "save",
    "trained_below",
]

# Bump when the way features are computed changes (what is cut where, how batches are formed),
# so caches written by the old code are recomputed rather than reused.
CODE_VERSION = 1

# Metadata key holding the JSON-encoded key in a cache file.
_KEY_FIELD = "ftlab.features.key"


class StaleCacheError(ValueError):
    """A feature cache was computed for other weights, inputs, settings or code."""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def trained_below(label_tree: Any, *, head: str) -> list[str]:
    """The leaves that train outside the subtree ``head``: empty when everything below it is frozen.

    Args:
      label_tree: a `ftlab.core.partition.labels` tree (``"frozen"`` or a trainable group).
      head: the top-level name of the part that may train (its inputs can then be cached).

    Returns:
      The slash paths of the trainable leaves not under ``head/``, in tree order.

    >>> trained_below({"head": {"w": "train"}, "encoder": {"w": "frozen"}}, head="head")
    []
    >>> trained_below({"head": {"w": "train"}, "encoder": {"b": "train"}}, head="head")
    ['encoder/b']
    """
    return [
        name
        for name, label in partition.flatten(label_tree).items()
        if label != partition.FROZEN and not name.startswith(f"{head}/")
    ]


def input_of(apply: Callable[..., Any], module: str) -> Callable[..., Any]:
    """``fn(*args) -> x``: what the submodule named ``module`` receives when ``apply(*args)`` runs.

    It runs the whole model and records the first positional argument of that submodule's
    ``__call__`` (Flax's method interception), so the cut is exactly the module's input whatever
    the layers before it do (pooling, say).

    Args:
      apply: a function that applies a Flax model, e.g. ``lambda p, x: model.apply({"params": p},
        x)``.
      module: the submodule's name (``"head"``); it must be called exactly once.

    Returns:
      A function of ``apply``'s arguments, traceable by `jax.jit`.

    Raises:
      ValueError: (when called) ``module`` was called not once but some other number of times.
    """

    def fn(*args, **kwargs):
        seen = []

        def record(next_fun, call_args, call_kwargs, context):
            if context.module.name == module and context.method_name == "__call__":
                seen.append(call_args[0])
            return next_fun(*call_args, **call_kwargs)

        with nn.intercept_methods(record):
            apply(*args, **kwargs)
        if len(seen) != 1:
            raise ValueError(f"module={module!r} was called {len(seen)} times; expected once.")
        return seen[0]

    return fn


def cache_key(
    *,
    trunk: Any,
    inputs: Mapping[str, Mapping[str, np.ndarray]],
    settings: Mapping[str, Any],
) -> dict[str, str]:
    """The digests a feature cache depends on.

    Args:
      trunk: the frozen parameters the features are computed from (any pytree of arrays).
      inputs: ``{split: {name: array}}``, the model inputs of every split (token ids and masks:
        their digests cover the examples, the tokenizer and the length).
      settings: everything else that changes the numbers (model configuration, dtype, which
        module's input is cut, batch size, library versions, device platform); JSON-encodable,
        values that are not are encoded by ``repr``.

    Returns:
      ``{"trunk", "inputs", "settings", "code"}`` -> hex sha256.
    """
    trunk_digests = tensorfile.digests(partition.flatten(trunk))
    input_digests = {
        split: {name: tensorfile.digest(a) + str(np.shape(a)) for name, a in arrays.items()}
        for split, arrays in inputs.items()
    }
    return {
        "trunk": _sha(json.dumps(trunk_digests, sort_keys=True)),
        "inputs": _sha(json.dumps(input_digests, sort_keys=True)),
        "settings": _sha(json.dumps(dict(settings), sort_keys=True, default=repr)),
        "code": _sha(f"ftlab.data.features v{CODE_VERSION}"),
    }


def compute(
    fn: Callable[[dict[str, np.ndarray]], Any],
    arrays: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    lengths: np.ndarray | None = None,
    sequence_keys: tuple[str, ...] = (),
    multiple: int = 16,
) -> np.ndarray:
    """Runs ``fn`` over every row once and returns its outputs in row order.

    Every batch has ``batch_size`` rows (the last is padded by repeating a row and the padding
    dropped), so a jitted ``fn`` compiles once per sequence length.

    Args:
      fn: ``fn(batch) -> [batch_size, ...]`` features, e.g. a jitted forward pass to the cut.
      arrays: equal-length input arrays (e.g. ``input_ids``, ``attention_mask``).
      batch_size: rows per call.
      lengths: optional real length of each row. When given, rows are taken in order of length
        and the arrays named in ``sequence_keys`` are cut after each batch's longest row,
        rounded up to ``multiple``: padding is most of a short text's tokens. Only valid for a
        model whose outputs at real positions do not depend on padded ones (attention masked).
      sequence_keys: the arrays whose second axis is the sequence (cut when ``lengths`` given).
      multiple: lengths are rounded up to this (bounds the number of compiled shapes).

    Returns:
      ``[rows, ...]`` numpy features, row ``i`` for input row ``i``.

    Raises:
      ValueError: ``batch_size`` or ``multiple`` is not positive, ``arrays`` is empty or its
        arrays differ in length, or ``lengths`` does not have one entry per row.
    """
    if batch_size < 1 or multiple < 1:
        raise ValueError(f"batch_size={batch_size} and multiple={multiple} must be positive.")
    sizes = {name: len(a) for name, a in arrays.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise ValueError(f"arrays must be non-empty and of equal length; got {sizes}.")
    n = next(iter(sizes.values()))
    if lengths is None:
        order = np.arange(n)
    else:
        lengths = np.asarray(lengths)
        if lengths.shape != (n,):
            raise ValueError(f"lengths has shape {lengths.shape}; expected ({n},).")
        order = np.argsort(lengths, kind="stable")
    out = []
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        real = len(rows)
        rows = np.concatenate([rows, np.full(batch_size - real, rows[0])])
        batch = {name: np.asarray(a)[rows] for name, a in arrays.items()}
        if lengths is not None:
            cut = -(-int(lengths[rows].max()) // multiple) * multiple
            for name in sequence_keys:
                batch[name] = batch[name][:, :cut]
        out.append(np.asarray(fn(batch))[:real])
    result = np.empty((n, *out[0].shape[1:]), out[0].dtype)
    result[order] = np.concatenate(out)
    return result


def save(
    path: str | pathlib.Path, features: Mapping[str, np.ndarray], *, key: Mapping[str, str]
) -> None:
    """Writes ``{split: features}`` with its key, atomically (a reader never sees half a file).

    Args:
      path: the file; its folder must exist.
      features: split name -> ``[rows, ...]`` array.
      key: the `cache_key` the features were computed for.
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tensorfile.save(tmp, dict(features), metadata={_KEY_FIELD: json.dumps(dict(key))})
    os.replace(tmp, path)


def load(path: str | pathlib.Path, *, key: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Reads a cache written by `save`, only if it was written for ``key``.

    Args:
      path: the file.
      key: the `cache_key` of the features wanted.

    Returns:
      ``{split: features}``.

    Raises:
      FileNotFoundError: there is no cache.
      StaleCacheError: the cache was computed for another key; the message names the parts
        that differ (trunk, inputs, settings, code).
      ftlab.core.tensorfile.CorruptFileError: the file does not read back as written.
    """
    arrays, metadata = tensorfile.load(path)
    try:
        stored = json.loads(metadata.get(_KEY_FIELD, "null"))
    except json.JSONDecodeError:
        stored = None
    if not isinstance(stored, dict):
        raise StaleCacheError(f"{path}: holds no feature key (not written by features.save).")
    changed = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
    if changed:
        raise StaleCacheError(f"{path}: computed for a different {', '.join(changed)}.")
    return arrays
