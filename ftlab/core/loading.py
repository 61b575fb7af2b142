"""Merge pretrained weights into a freshly initialised tree, path by path."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from ftlab.core import partition
from ftlab.types import Params

__all__ = ["merge_pretrained"]


def merge_pretrained(
    params: Params, loaded: Mapping, *, dont_load: Sequence[str] = (), what: str = "pretrained"
) -> dict:
    """Returns ``params`` with every leaf replaced by its namesake in ``loaded``.

    Leaves whose path fully matches a ``dont_load`` regex keep their initial value (a new head,
    say). Any other leaf missing from ``loaded``, any loaded leaf the model lacks, and any shape
    or dtype mismatch is reported in one error that lists them all.

    >>> merge_pretrained({"enc": {"w": np.zeros(2)}, "head": {"w": np.ones(1)}},
    ...                  {"enc": {"w": np.full(2, 7.0)}}, dont_load=["head/.*"])["enc"]["w"]
    array([7., 7.])
    """
    keep = [re.compile(p) for p in dont_load]
    flat, flat_loaded = partition.flatten(params), partition.flatten(loaded)
    skipped = {n for n in flat if any(r.fullmatch(n) for r in keep)}
    only_model = sorted(set(flat) - set(flat_loaded) - skipped)
    only_loaded = sorted(set(flat_loaded) - set(flat))
    bad = [
        f"{n}: model {np.shape(flat[n])} {np.dtype(flat[n].dtype)}, "
        f"{what} {np.shape(flat_loaded[n])} {np.dtype(flat_loaded[n].dtype)}"
        for n in flat.keys() & flat_loaded.keys()
        if n not in skipped
        and (
            np.shape(flat[n]) != np.shape(flat_loaded[n])
            or np.dtype(flat[n].dtype) != np.dtype(flat_loaded[n].dtype)
        )
    ]
    if only_model or only_loaded or bad:
        raise ValueError(
            f"cannot load {what} weights into the model:\n"
            f"  only in the model ({len(only_model)}): {only_model[:10]}\n"
            f"  only in {what} ({len(only_loaded)}): {only_loaded[:10]}\n"
            f"  mismatched ({len(bad)}): {bad[:10]}\n"
            "Add regexes for the model's new leaves (a new head, say) to dont_load."
        )
    merged = {n: (flat[n] if n in skipped else flat_loaded[n]) for n in flat}
    return partition.unflatten(merged)
