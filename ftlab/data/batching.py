"""Deterministic batching of in-memory arrays that resumes exactly from a step number.

A training batch is a pure function of `(arrays, step, batch_size, seed)`: no iterator state to
checkpoint, and a run restored at step `s` sees the same batches as one that never stopped.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping

import numpy as np

__all__ = ["steps_per_epoch", "train_batch", "eval_batches", "process_slice"]


def _num_rows(arrays: Mapping[str, np.ndarray]) -> int:
    if not arrays:
        raise ValueError("arrays is empty; pass a dict of equal-length arrays.")
    sizes = {k: len(v) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"arrays must share their leading dimension; got lengths {sizes}.")
    return next(iter(sizes.values()))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per pass over `n` rows (the remainder is dropped).

    >>> steps_per_epoch(10, 3)
    3
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive.")
    if batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {n} rows available; lower the batch size "
            "or use more data."
        )
    return n // batch_size


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    # Seeding with [seed, epoch] gives independent streams per epoch without any carried state.
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.setflags(write=False)
    return perm


def train_batch(
    arrays: Mapping[str, np.ndarray], step: int, *, batch_size: int, seed: int
) -> dict[str, np.ndarray]:
    """The training batch for global step `step`.

    Epoch `step // steps_per_epoch` is a permutation drawn from `np.random.default_rng([seed,
    epoch])`; step `step` takes the next `batch_size` rows of it. Each epoch therefore visits every
    row at most once (exactly once when `batch_size` divides the row count).

    Args:
        arrays: Equal-length arrays, e.g. `{"input_ids": ..., "attention_mask": ..., "label": ...}`.
        step: Global step, 0-based.
        batch_size: Rows per batch.
        seed: Shuffle seed.

    Returns:
        A dict with the same keys, each `[batch_size, ...]`.

    >>> train_batch({"x": np.arange(4)}, 0, batch_size=2, seed=0)["x"].shape
    (2,)
    """
    if step < 0:
        raise ValueError(f"step={step} must be non-negative.")
    n = _num_rows(arrays)
    spe = steps_per_epoch(n, batch_size)
    epoch, within = divmod(step, spe)
    idx = _permutation(n, seed, epoch)[within * batch_size : (within + 1) * batch_size]
    return {k: np.asarray(v)[idx] for k, v in arrays.items()}


def eval_batches(
    arrays: Mapping[str, np.ndarray], *, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Every row once, in order, in batches of one static shape.

    The last batch is padded to `batch_size` by repeating row 0, and every batch carries a float32
    `"mask"` (1 for real rows, 0 for padding) so metrics can ignore the padding while a jitted eval
    step compiles once.

    Args:
        arrays: Equal-length arrays; must not already contain a `"mask"` key.
        batch_size: Rows per batch.

    Yields:
        Dicts with the keys of `arrays` plus `"mask"`, each `[batch_size, ...]`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive.")
    if "mask" in arrays:
        raise ValueError("arrays already has a 'mask' key; rename it, eval_batches adds its own.")
    n = _num_rows(arrays)
    for start in range(0, n, batch_size):
        real = min(batch_size, n - start)
        idx = np.concatenate(
            [np.arange(start, start + real), np.zeros(batch_size - real, np.int64)]
        )
        batch = {k: np.asarray(v)[idx] for k, v in arrays.items()}
        batch["mask"] = (np.arange(batch_size) < real).astype(np.float32)
        yield batch


def process_slice(
    batch: Mapping[str, np.ndarray], *, process_index: int, process_count: int
) -> dict[str, np.ndarray]:
    """The contiguous share of a global batch that host `process_index` feeds.

    Concatenating the slices of processes `0 .. process_count - 1` gives back the global batch.

    Args:
        batch: Global batch, every array `[global_batch, ...]`.
        process_index: This host's index (`jax.process_index()`).
        process_count: Number of hosts (`jax.process_count()`).

    Returns:
        The same keys, each `[global_batch // process_count, ...]`.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must be in [0, process_count={process_count})."
        )
    n = _num_rows(batch)
    if n % process_count:
        raise ValueError(
            f"global batch of {n} rows does not split evenly over {process_count} processes; "
            f"make the batch size a multiple of {process_count}."
        )
    share = n // process_count
    lo = process_index * share
    return {k: np.asarray(v)[lo : lo + share] for k, v in batch.items()}
