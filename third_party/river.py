"""river (https://riverml.xyz) beside ftlab's online learners: the same linear model, one example
at a time, for a reference number.

river is an optional dependency, imported inside the function.
"""

from __future__ import annotations

import time

import numpy as np

from ftlab.data import streams

__all__ = ["progressive"]


def progressive(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    columns: tuple,
    *,
    lr: float,
    decay: str,
    pipeline: bool = False,
    limit: int | None = None,
) -> dict[str, float]:
    """river's progressive validation of the linear model equivalent to ftlab's OGD learner.

    `linear_model.LogisticRegression` (binary) or `LinearRegression` (regression) with
    `optim.SGD(lr)` (or `InverseScaling(lr, power=0.5)`, which is lr / sqrt(t)) for the weights
    and the same schedule for the intercept. `pipeline=False` feeds the rows of `x` (the same
    features ftlab saw); `pipeline=True` feeds river's raw dicts of the stream `name` through
    `preprocessing.StandardScaler()` first (river's own idiom). Predict, score, then learn.

    Args:
        name: the stream (`ftlab.data.streams`); a name it does not know is a binary task.
        x, y: ``[T, d]`` features and ``[T]`` targets, in arrival order.
        columns: the ``d`` feature names.
        lr: the step size; decay: ``"constant"`` or ``"sqrt"`` (lr / sqrt(t)).
        pipeline: read the raw stream through river's scaler instead of ``x``.
        limit: stop after this many examples (None: all).

    Returns:
        `{"accuracy", "log_loss"}` or `{"mae", "rmse"}`, plus `examples_per_s`.
    """
    from river import linear_model, metrics, optim, preprocessing  # noqa: PLC0415

    schedule = lr if decay == "constant" else optim.schedulers.InverseScaling(lr, power=0.5)
    binary = name not in streams.STREAMS or streams.task(name) == "binary"
    cls = linear_model.LogisticRegression if binary else linear_model.LinearRegression
    model = cls(optimizer=optim.SGD(schedule), intercept_lr=schedule)
    if pipeline:
        model = preprocessing.StandardScaler() | model
        source = ((x_, y_) for x_, y_ in streams.dataset(name))
    else:
        source = (
            (dict(zip(columns, map(float, row), strict=True)), float(t))
            for row, t in zip(x, y, strict=True)
        )
    scores = (metrics.Accuracy(), metrics.LogLoss()) if binary else (metrics.MAE(), metrics.RMSE())
    count = 0
    start = time.perf_counter()
    for features, target in source:
        if limit is not None and count >= limit:
            break
        if binary:
            target = bool(target)
            proba = model.predict_proba_one(features)
            scores[0].update(target, max(proba, key=proba.get))
            scores[1].update(target, proba[True])
        else:
            prediction = model.predict_one(features)
            for s in scores:
                s.update(target, prediction)
        model.learn_one(features, target)
        count += 1
    elapsed = time.perf_counter() - start
    names = ("accuracy", "log_loss") if binary else ("mae", "rmse")
    out = {n: float(s.get()) for n, s in zip(names, scores, strict=True)}
    out["examples_per_s"] = count / elapsed
    return out
