"""Online learning on a real stream: progressive metrics, regret and its slope, river beside it.

Writes to the workdir: `results.json` (final progressive metrics, regret, slope, solver tolerance,
river's scores, timings), `table.md` (one row per step size of the vmapped sweep, plus river),
`metrics.jsonl` + TensorBoard (progressive metrics and regret at log-spaced steps),
`plots/regret.png` (log-log R(t) with the fitted slope) and `plots/*.png` (every metric).
"""

from __future__ import annotations

import functools
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from ftlab import online
from ftlab.core import metrics as metrics_lib
from ftlab.core import report
from ftlab.data import streams


def make_learner(config: ml_collections.ConfigDict, lr: Any = None) -> optax.GradientTransformation:
    """The optax learner named by `config.learner` (lr overrides `config.learner.lr`)."""
    lr = config.learner.lr if lr is None else lr
    name = config.learner.name
    if name == "ogd":
        return online.ogd(lr, decay=config.learner.decay)
    if name == "adagrad":
        return optax.adagrad(lr)
    if name == "adam":
        return optax.adam(lr)
    raise ValueError(f"config.learner.name={name!r}; expected ogd, adagrad or adam")


def load_stream(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, tuple]:
    """`(x, y, columns)` of the configured stream, limited and standardised as configured.

    `config.data.source`: "river" (`config.data.stream` from `ftlab.data.streams`) or
    "minilm_rotten_tomatoes" (Rotten Tomatoes training snippets in their seeded order, embedded
    once by the frozen all-MiniLM-L6-v2 trunk: `[T, 384]` unit vectors, y = fresh).
    """
    source = config.data.get("source", "river")
    if source == "minilm_rotten_tomatoes":
        x, y = embed_rotten_tomatoes(config)
        columns = tuple(f"e{i}" for i in range(x.shape[1]))
    elif source == "river":
        x, y, columns = streams.load(config.data.stream, limit=config.data.limit or None)
    else:
        raise ValueError(
            f"config.data.source={source!r}; expected 'river' or 'minilm_rotten_tomatoes'"
        )
    if config.data.standardize:
        x = streams.running_standardize(x)
    return x, y, columns


def embed_rotten_tomatoes(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """Sentence embeddings of the Rotten Tomatoes training split by the frozen MiniLM trunk.

    The trunk runs once, in batches of `config.data.embed_batch_size` (jit-compiled once, the
    last batch padded); the online head then learns over the embeddings.
    """
    from ftlab.data import rotten_tomatoes, text
    from ftlab.models import bert
    from third_party import minilm

    split = rotten_tomatoes.load(
        task="sentiment", seed=config.data.seed, limit=config.data.limit or None
    )["train"]
    pretrained = minilm.load()
    tokens = text.encode(
        pretrained.tokenizer(config.data.max_length), split.text, max_length=config.data.max_length
    )
    # The weights are an argument, not a closed-over constant (XLA would constant-fold them).
    encode = jax.jit(functools.partial(bert.encode_sentences, pretrained.config))
    weights = jax.device_put(pretrained.params)
    size, num = config.data.embed_batch_size, len(split.label)
    out = []
    for start in range(0, num, size):
        ids = tokens["input_ids"][start : start + size]
        mask = tokens["attention_mask"][start : start + size]
        pad = size - len(ids)
        ids, mask = (np.pad(a, ((0, pad), (0, 0))) for a in (ids, mask))
        mask[len(mask) - pad :, 0] = 1  # padded rows: one [PAD] "token", dropped below
        out.append(np.asarray(encode(weights, ids, mask))[: size - pad])
    return np.concatenate(out).astype(np.float32), split.label.astype(np.float32)


def river_progressive(
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
    features ftlab saw); `pipeline=True` feeds river's raw dicts through
    `preprocessing.StandardScaler()` first (river's own idiom). Predict, score, then learn.

    Returns:
        `{"accuracy", "log_loss"}` or `{"mae", "rmse"}`, plus `examples_per_s`.
    """
    from river import linear_model, metrics, optim, preprocessing

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


def plot_regret(steps, regret, slope: float, intercept: float, title: str):
    """Log-log R(t) against t with the fitted line (and a slope-0.5 line through its end)."""
    steps, regret = np.asarray(steps, float), np.asarray(regret, float)
    keep = regret > 0
    lines = [
        report.Line(
            steps[keep], regret[keep], label="R(t) (prefix comparators)", style={"marker": "o"}
        )
    ]
    if math.isfinite(slope):
        lines.append(
            report.Line(
                steps,
                np.exp(intercept) * steps**slope,
                label=f"fit: slope {slope:.3f}",
                style={"ls": "--"},
            )
        )
        lines.append(
            report.Line(
                steps,
                np.exp(intercept) * steps[-1] ** (slope - 0.5) * steps**0.5,
                label="slope 0.5",
                style={"ls": ":"},
            )
        )
    return report.line_plot(
        lines,
        xscale="log",
        yscale="log",
        xlabel="t (examples)",
        ylabel="regret R(t)",
        title=title,
        legend={},
        grid=None,
        figsize=(5, 4),
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs the online experiment described by `configs/online_river.py`.

    Returns:
        The results, also written to `workdir/results.json`.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    name = config.data.stream

    # Data: the stream in arrival order, causally standardised.
    x, y, columns = load_stream(config)
    river_stream = config.data.get("source", "river") == "river"
    task = streams.task(name) if river_stream else "binary"
    model = (
        online.logistic_regression(x.shape[1])
        if task == "binary"
        else online.linear_regression(x.shape[1])
    )
    stream = online.prepare(x, y, model=model, on_error=config.data.on_error)
    num = x.shape[0]
    logging.info("stream %s: %d examples x %d features (%s)", name, num, x.shape[1], task)

    # The best fixed model in hindsight on each prefix of a log-spaced grid; the last prefix
    # is the whole stream, whose solution is the comparator tracked at every step.
    solver = dict(
        tol=config.regret.tol,
        max_iterations=config.regret.max_iterations,
        l2=config.regret.l2,
        method=config.regret.method,
    )
    steps = online.checkpoints(num, points=config.regret.points)
    start = time.perf_counter()
    prefix = jax.jit(lambda s: online.best_fixed_prefixes(model, s, steps, **solver))(stream)
    prefix = jax.block_until_ready(prefix)
    solve_s = time.perf_counter() - start
    best = jax.tree.map(lambda a: a[-1], prefix)

    # The online runs, one per step size in one vmapped scan (the configured step size among
    # them): prediction, loss, progressive metrics, regret and update, all inside the scan.
    param_dtype = jnp.dtype(config.learner.param_dtype) if config.learner.param_dtype else None
    lrs = tuple(sorted({*config.sweep.learning_rates, config.learner.lr}))
    sweep = jax.jit(
        lambda s: online.sweep(
            model,
            model.init(),
            s,
            make_learner=lambda lr: make_learner(config, lr),
            learning_rates=jnp.asarray(lrs),
            delay=config.learner.delay,
            batch_size=config.learner.batch_size,
            param_dtype=param_dtype,
            comparator=best.params,
        )
    )
    start = time.perf_counter()
    swept = jax.block_until_ready(sweep(stream))
    sweep_s = time.perf_counter() - start
    result = jax.tree.map(lambda a: a[lrs.index(config.learner.lr)], swept)

    # Exact prefix regret R(t) on the grid, and its log-log slope.
    prefix_regret = online.regret_curve(result.metrics["loss"], steps, prefix)
    slope, intercept = online.fit_slope(steps, prefix_regret)

    # Metrics at log-spaced steps.
    m = {k: np.asarray(v) for k, v in result.metrics.items()}
    metric_names = ("accuracy", "log_loss") if task == "binary" else ("mae", "rmse")
    log_steps = online.checkpoints(num, points=config.evals.log_points, start=1)
    with metrics_lib.MetricWriter(workdir, resume_step=0) as writer:
        for t in log_steps:
            row = {f"online/{k}": m[k][t - 1] for k in metric_names}
            row["regret/final_comparator"] = m["regret"][t - 1]
            row["regret/average"] = m["average_regret"][t - 1]
            row["online/cumulative_loss"] = m["cumulative_loss"][t - 1]
            metrics_lib.check_finite(row, step=int(t), last_good_step=None)
            writer.write(int(t), row)
    metrics_lib.plot_curves(workdir / metrics_lib.JSONL_NAME, workdir / "plots")
    title = f"{name}: {config.learner.name} lr={config.learner.lr}"
    figure = plot_regret(steps, prefix_regret, slope, intercept, title)
    report.save_figure(figure, workdir / "plots" / "regret.png")

    results: dict[str, Any] = {
        "stream": name,
        "examples": num,
        "features": list(columns),
        "learner": config.learner.to_dict(),
        **{f"progressive/{k}": float(m[k][-1]) for k in metric_names},
        "cumulative_loss": float(m["cumulative_loss"][-1]),
        "best_fixed/total_loss": float(best.total_loss),
        "best_fixed/grad_norm": float(best.grad_norm),
        "best_fixed/iterations": int(best.iterations),
        "best_fixed/tol": config.regret.tol,
        "best_fixed/method": config.regret.method,
        "regret": float(prefix_regret[-1]),
        "average_regret": float(prefix_regret[-1] / num),
        "regret/slope": slope,
        "regret/steps": [int(t) for t in steps],
        "regret/values": [float(r) for r in prefix_regret],
        "regret/prefix_max_grad_norm": float(np.max(np.asarray(prefix.grad_norm))),
        "num_updates": int(result.num_updates),
        "num_skipped": int(result.num_skipped),
        # wall time of the vmapped sweep, compilation included (experiments/bench for speed)
        "sweep_s": sweep_s,
        "best_fixed_s": solve_s,
        "sweep": {
            str(lr): {
                **{k: float(np.asarray(swept.metrics[k])[i, -1]) for k in metric_names},
                "regret_vs_final_comparator": float(np.asarray(swept.metrics["regret"])[i, -1]),
            }
            for i, lr in enumerate(lrs)
        },
    }
    if config.evals.river and config.learner.name == "ogd" and config.learner.batch_size == 1:
        if config.learner.delay == 0:
            kw = dict(lr=config.learner.lr, decay=config.learner.decay)
            results["river/same_features"] = river_progressive(name, x, y, columns, **kw)
            if river_stream:
                results["river/pipeline"] = river_progressive(
                    name, x, y, columns, pipeline=True, limit=num, **kw
                )

    report.save_json(workdir / "results.json", results)
    report.save_text(workdir / "table.md", _table(results, metric_names))
    logging.info("results: %s", {k: v for k, v in results.items() if not isinstance(v, list)})
    return results


def _table(results: dict, metric_names: tuple[str, ...]) -> str:
    """The learner, each step size of the sweep and river's learners: metrics and regret."""
    learner = results["learner"]
    rows = [
        [
            f"ftlab {learner['name']} lr={learner['lr']} ({learner['decay']})",
            *(f"{results[f'progressive/{k}']:.4f}" for k in metric_names),
            f"{results['regret']:.2f} (slope {results['regret/slope']:.3f})",
        ]
    ]
    for lr, row in results["sweep"].items():
        rows.append(
            [
                f"ftlab sweep lr={lr}",
                *(f"{row[k]:.4f}" for k in metric_names),
                f"{row['regret_vs_final_comparator']:.2f} (vs u*_T)",
            ]
        )
    for key in ("river/same_features", "river/pipeline"):
        if key in results:
            rows.append([key, *(f"{results[key][k]:.4f}" for k in metric_names), ""])
    return report.markdown_table(["learner", *metric_names, "regret R(T)"], rows)
