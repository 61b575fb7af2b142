"""Real graphs with labelled nodes, read from files a PyPI package ships (no download).

``drosophila_left`` and ``drosophila_right``: the two hemispheres of the larval *Drosophila*
mushroom-body connectome (Eichler et al. 2017, Nature 548:175), as shipped in the
`graspologic==3.4.4` wheel (MIT licence) under ``graspologic/datasets/drosophila/``: a
weighted, directed adjacency (synapse counts between reconstructed neurons) and one cell-type
label per neuron, ``K`` (Kenyon cells), ``I`` (input neurons), ``O`` (output neurons), ``P``
(projection neurons). Left: 209 neurons (K 101, I 21, O 29, P 58); right: 213 (K 100, I 21,
O 29, P 63). The nodes have no features of their own (use the identity, as Kipf & Welling do
for featureless graphs). The files are read directly and hash-checked; the package (whose
dependencies are not installed) is never imported.

Why this graph: no package on PyPI ships Cora, CiteSeer or PubMed (torch_geometric, dgl,
stellargraph, spektral, karateclub and littleballoffur download them at run time, checked
2026-12-05), and networkx's karate club (34 nodes, 2 labels) is the floor; a connectome of
~200 neurons with 4 cell types is the largest labelled real graph found that installs offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import pathlib
from typing import NamedTuple

import numpy as np

__all__ = ["CLASSES", "DATASETS", "SHA256", "Graph", "data_path", "label_subset", "load"]

DATASETS = ("drosophila_left", "drosophila_right")
CLASSES = ("K", "I", "O", "P")
_FOLDER = ("datasets", "drosophila")
_PIN = "graspologic==3.4.4"
# sha256 of each shipped file, so that a different wheel is an error rather than other numbers
SHA256 = {
    "left_adjacency.csv": "f23ba630f10dff95164ddbbdccf7d4fe1ac01a9a8ed77db26069af4a6248a1cf",
    "left_cell_labels.csv": "a733652a33d5dde5c7cbdc9d8c0e679680cd000dc11edf3ea762a4da43b764c9",
    "right_adjacency.csv": "b9684d323e3f91ac5bf8c3691ff3e0635ef40fa2dee8e048161633760c84791d",
    "right_cell_labels.csv": "80547ac9df6b3fc5abe5844c04bc5da56b48c7cac5eb13ab3cc2f8695cd6de1d",
}
_SIZES = {"drosophila_left": 209, "drosophila_right": 213}


class Graph(NamedTuple):
    """One graph: its adjacency, node labels and class names.

    Attributes:
        adjacency: `[n, n]` int synapse counts (directed: row sends to column).
        labels: `[n]` int32 class ids into ``classes``.
        classes: Class names, in id order.
    """

    adjacency: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]


def data_path() -> pathlib.Path:
    """The folder of the shipped files, found without importing `graspologic`.

    Raises:
        FileNotFoundError: the package is not installed, saying how to install it.
    """
    spec = importlib.util.find_spec("graspologic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the Drosophila connectome comes from the PyPI package {_PIN}, which is not "
            "installed. Run `bash install.sh` from the repository root (--no-deps install)."
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0], *_FOLDER)


def _read(name: str, check_hash: bool) -> bytes:
    path = data_path() / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall {_PIN} (`bash install.sh`).")
    raw = path.read_bytes()
    if check_hash and (actual := hashlib.sha256(raw).hexdigest()) != SHA256[name]:
        raise ValueError(
            f"{path}: sha256 is {actual}, expected {SHA256[name]}. Reinstall {_PIN} "
            "(`bash install.sh`), or pass check_hash=False if you changed it on purpose."
        )
    return raw


def load(dataset: str = "drosophila_left", *, check_hash: bool = True) -> Graph:
    """Reads one graph of `DATASETS`, checked.

    Args:
        dataset: ``"drosophila_left"`` or ``"drosophila_right"``.
        check_hash: Verify each file's sha256.

    Returns:
        The `Graph`.

    Raises:
        ValueError: an unknown dataset, a file with the wrong hash, or contents that are not
            what this module documents (shape, a label outside `CLASSES`, a negative count).
        FileNotFoundError: graspologic is not installed.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r} is unknown; choose one of {', '.join(DATASETS)}")
    side = dataset.split("_")[1]
    adjacency = np.loadtxt(_read(f"{side}_adjacency.csv", check_hash).decode().splitlines())
    names = _read(f"{side}_cell_labels.csv", check_hash).decode().split()
    n = _SIZES[dataset]
    if adjacency.shape != (n, n) or len(names) != n:
        raise ValueError(
            f"{dataset}: expected a [{n}, {n}] adjacency and {n} labels, got "
            f"{adjacency.shape} and {len(names)}"
        )
    if (adjacency < 0).any() or (adjacency != np.round(adjacency)).any():
        raise ValueError(f"{dataset}: the adjacency must hold non-negative synapse counts")
    if unknown := sorted(set(names) - set(CLASSES)):
        raise ValueError(f"{dataset}: labels {unknown} are not among {CLASSES}")
    labels = np.array([CLASSES.index(c) for c in names], np.int32)
    return Graph(adjacency.astype(np.int32), labels, CLASSES)


def label_subset(labels: np.ndarray, *, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` nodes of each class (all of a smaller class), drawn with
    ``np.random.default_rng(seed)``: the few labels of semi-supervised training.

    >>> label_subset(np.array([0, 0, 0, 1, 1]), per_class=2, seed=0).shape
    (4,)
    """
    if per_class < 1:
        raise ValueError(f"label_subset: per_class={per_class}; expected an integer >= 1")
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))
