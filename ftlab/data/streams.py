"""river's bundled real streams as arrays in stream order (no download: the files are in the wheel).

    x, y, columns = streams.load("phishing")            # x [1250, 9] float32, y [1250] float32
    x = streams.running_standardize(x)                  # causal: row t uses rows 0..t only

| name     | river class                    | T      | d | task                                  |
|----------|--------------------------------|--------|---|---------------------------------------|
| phishing | `river.datasets.Phishing`      | 1,250  | 9 | binary, y = is phishing (548 / 702)   |
| trump    | `river.datasets.TrumpApproval` | 1,001  | 6 | regression, time-ordered approval (%) |
| shuttle  | `river.datasets.Shuttle`       | 49,097 | 9 | binary, y = anomaly (3,511 / 45,586)  |

river's dict features become columns in the order of the dataset's CSV header (fixed below, and
checked against every example). Shuttle's label is river's own binarisation (ODDS): 1 for the rare
classes (anomaly), 0 for the majority "Rad Flow" class; the second-largest class is already
dropped in river's file.

Scaling. The raw features are on very different scales (Shuttle's lie in about [-30000, 30000]
in places, TrumpApproval's `ordinal_date` is about 736,000), so plain SGD needs standardised
inputs. A global scaler would peek at the future; `running_standardize` instead uses, for row t,
the mean and variance of rows 0..t only: exactly what river's `preprocessing.StandardScaler`
feeds the next pipeline step in `learn_one` (its Welford update, population variance, 0 for a
zero variance). river's `predict_one` uses the statistics of rows 0..t-1; here one transformed
stream serves prediction, update and the hindsight comparator, so regret is defined on one fixed
sequence of losses. Using x_t's own features is not peeking: x_t is seen before the prediction.
"""

from __future__ import annotations

import numpy as np

__all__ = ["STREAMS", "dataset", "load", "task", "running_standardize"]


# name -> (river dataset class name, feature columns in CSV order, task)
STREAMS = {
    "phishing": (
        "Phishing",
        (
            "empty_server_form_handler",
            "popup_window",
            "https",
            "request_from_other_domain",
            "anchor_from_other_domain",
            "is_popular",
            "long_url",
            "age_of_domain",
            "ip_in_url",
        ),
        "binary",
    ),
    "trump": (
        "TrumpApproval",
        ("ordinal_date", "gallup", "ipsos", "morning_consult", "rasmussen", "you_gov"),
        "regression",
    ),
    "shuttle": ("Shuttle", tuple(f"f{i}" for i in range(1, 10)), "binary"),
}


def dataset(name: str):
    """The river dataset object for `name` (for river's own baselines)."""
    from river import datasets  # Imported here: only the stream loaders need river.

    if name not in STREAMS:
        raise ValueError(f"streams: unknown stream {name!r}; known: {', '.join(STREAMS)}")
    return getattr(datasets, STREAMS[name][0])()


def load(name: str, *, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Loads a river stream in its order.

    Args:
        name: "phishing", "trump" or "shuttle".
        limit: Keep only the first `limit` examples (None: all).

    Returns:
        `(x [T, d] float32, y [T] float32, columns)`: y is 0/1 for the binary streams.

    Raises:
        ValueError: Unknown name, or an example whose keys differ from the expected columns
            (the message gives the example's index).
    """
    _, columns, _ = STREAMS.get(name, (None, None, None))
    data = dataset(name)
    xs, ys = [], []
    for i, (x, y) in enumerate(data):
        if limit is not None and i >= limit:
            break
        if tuple(x) != columns:
            raise ValueError(
                f"streams.load({name!r}): example {i} has features {tuple(x)}; expected "
                f"{columns}. The installed river's dataset changed; update STREAMS."
            )
        xs.append([float(x[c]) for c in columns])
        ys.append(float(y))
    return np.asarray(xs, np.float32), np.asarray(ys, np.float32), columns


def task(name: str) -> str:
    """ "binary" or "regression"."""
    return STREAMS[name][2]


def running_standardize(x: np.ndarray) -> np.ndarray:
    """Causal standardisation: row t becomes (x_t - mean_{0..t}) / std_{0..t}.

    Population variance over rows 0..t (river's `StandardScaler` after `learn_one(x_t)`); a
    feature with zero variance so far maps to 0. Computed in float64 with the first row
    subtracted, so large offsets (dates) do not cancel.

    Args:
        x: `[T, d]`.

    Returns:
        `[T, d]` float32; row t depends on rows 0..t only.
    """
    x = np.asarray(x, np.float64)
    shifted = x - x[:1]
    count = np.arange(1, len(x) + 1, dtype=np.float64)[:, None]
    mean = np.cumsum(shifted, axis=0) / count
    var = np.maximum(np.cumsum(shifted**2, axis=0) / count - mean**2, 0.0)
    # The first row is subtracted, so a feature constant so far sums to exactly 0.
    zero = var <= 0.0
    out = np.where(zero, 0.0, (shifted - mean) / np.sqrt(np.where(zero, 1.0, var)))
    return out.astype(np.float32)
