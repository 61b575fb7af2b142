"""Online learning on a real stream: progressive metrics, regret and its slope, river beside it.

The stream runs on `experiments.loop`, one step per chunk of ``config.data.chunk_size``
examples, the sweep's learners split over the data mesh. results.json holds the final
progressive metrics, regret and its slope, river's scores and timings; table.md one row per step
size (and river); plots/regret.png the log-log R(t) with the fitted slope.
"""

from __future__ import annotations

import functools
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from experiments import data as data_lib
from experiments import loop, reports
from ftlab import online
from ftlab.core import report
from ftlab.data import streams
from third_party import river

# ``config.learner.name`` (the schema checks it): ``(config.learner, lr) -> optax learner``
LEARNERS = {
    "ogd": lambda c, lr: online.ogd(lr, decay=c.decay),
    "adagrad": lambda c, lr: optax.adagrad(lr),
    "adam": lambda c, lr: optax.adam(lr),
}


def learner_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`online.start`'s and `online.advance`'s options from ``config.learner``."""
    c = config.learner
    dtype = jnp.dtype(c.param_dtype) if c.param_dtype else None
    return dict(delay=c.delay, batch_size=c.batch_size, param_dtype=dtype)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs the online experiment described by `configs/online_river.py`.

    One loop step per chunk of the stream (checkpoints every ``config.checkpoint.every_steps``
    chunks); the numbers are those of one scan over the whole stream, bit for bit.

    Returns:
        The results, also written to `workdir/results.json` (``{"step": ...}`` if stopped
        early by ``config.max_steps_per_run`` or a signal: rerun to resume).
    """
    workdir = pathlib.Path(workdir)
    name = config.data.stream

    # Data: the stream in arrival order, causally standardised.
    x, y, columns = data_lib.stream(config, workdir)
    if not len(y):
        raise ValueError(f"config.data.stream={name!r}: the stream has no examples")
    river_stream = config.data.get("source", "river") == "river"
    task = streams.task(name) if river_stream else "binary"
    model = {"binary": online.logistic_regression}.get(task, online.linear_regression)(x.shape[1])
    stream = online.prepare(x, y, model=model, on_error=config.data.on_error)
    num = x.shape[0]
    logging.info("stream %s: %d examples x %d features (%s)", name, num, x.shape[1], task)

    # The best fixed model in hindsight on each prefix of a log-spaced grid; the last prefix
    # is the whole stream, whose solution is the comparator tracked at every step.
    solver = {k: config.regret[k] for k in ("tol", "max_iterations", "l2", "method")}
    steps = online.checkpoints(num, points=config.regret.points)
    start = time.perf_counter()
    prefix = jax.jit(lambda s: online.best_fixed_prefixes(model, s, steps, **solver))(stream)
    prefix = jax.block_until_ready(prefix)
    solve_s = time.perf_counter() - start
    best = jax.tree.map(lambda a: a[-1], prefix)

    # The online runs, one per step size (the configured one among them), on the loop: the
    # sweep padded with copies of its last step size to a multiple of the devices.
    plan = loop.plan_from(config)
    size = config.data.chunk_size
    plan.check_batch_size(size, what="config.data.chunk_size")
    lrs = tuple(sorted({*config.sweep.learning_rates, config.learner.lr}))
    host = online.chunked(stream, size)
    learner_of = functools.partial(LEARNERS[config.learner.name], config.learner)
    state = online.sweep_start(
        model, lrs, make_learner=learner_of, padded_length=len(host["y"]),
        num_devices=plan.num_devices, **learner_options(config),
    )  # fmt: skip
    step_fn = online.sweep_step(
        model, make_learner=learner_of, plan=plan, length=num,
        main=lrs.index(config.learner.lr), comparator=best.params, **learner_options(config),
    )  # fmt: skip
    loop_config = config.copy_and_resolve_references()
    with loop_config.unlocked():  # one loop step per chunk
        loop_config.optim = {"num_steps": len(host["y"]) // size}
    start = time.perf_counter()
    run = loop.train(
        loop_config,
        workdir,
        plan=plan,
        state=state,
        step_fn=step_fn,
        batch_at=lambda i: {k: a[i * size : (i + 1) * size] for k, a in host.items()},
    )
    if not run.finished:
        return {"step": run.step}
    sweep_s = time.perf_counter() - start
    final = loop.fetch(run.plan, run.state)
    run.close()
    swept = jax.vmap(lambda c: online.progressive_metrics(model, c, comparator=True))(
        final["carry"]
    )
    swept = {k: np.asarray(v)[: len(lrs)] for k, v in swept.items()}
    main = {k: v[lrs.index(config.learner.lr)] for k, v in swept.items()}

    # Exact prefix regret R(t) on the grid, and its log-log slope.
    prefix_regret = online.regret_curve(final["losses"][:num], steps, prefix)
    slope, intercept = online.fit_slope(steps, prefix_regret)
    b, delay = config.learner.batch_size, config.learner.delay
    blocks = np.asarray(stream.valid).tolist() + [False] * (-num % b)
    has = np.asarray(blocks).reshape(-1, b).any(axis=1)
    metric_names = ("accuracy", "log_loss") if task == "binary" else ("mae", "rmse")

    results: dict[str, Any] = {
        "stream": name,
        "examples": num,
        "features": list(columns),
        "learner": config.learner.to_dict(),
        **{f"progressive/{k}": float(main[k]) for k in metric_names},
        "cumulative_loss": float(main["cumulative_loss"]),
        **{f"best_fixed/{k}": float(getattr(best, k)) for k in ("total_loss", "grad_norm")},
        "best_fixed/iterations": int(best.iterations),
        **{f"best_fixed/{k}": config.regret[k] for k in ("tol", "method")},
        "regret": float(prefix_regret[-1]),
        "average_regret": float(prefix_regret[-1] / num),
        "regret/slope": slope,
        "regret/steps": [int(t) for t in steps],
        "regret/values": [float(r) for r in prefix_regret],
        "regret/prefix_max_grad_norm": float(np.max(np.asarray(prefix.grad_norm))),
        "num_updates": int(np.sum(has[: max(len(has) - delay, 0)])),
        "num_skipped": int(num - np.sum(stream.valid)),
        # wall time of the sweep in this invocation, compilation included (experiments/bench)
        "sweep_s": sweep_s,
        "best_fixed_s": solve_s,
        "sweep": {
            str(lr): {
                **{k: float(swept[k][i]) for k in metric_names},
                "regret_vs_final_comparator": float(swept["regret"][i]),
            }
            for i, lr in enumerate(lrs)
        },
    }
    c = config.learner
    if config.evals.river and (c.name, c.batch_size, c.delay) == ("ogd", 1, 0):
        kw = dict(lr=c.lr, decay=c.decay)
        results["river/same_features"] = river.progressive(name, x, y, columns, **kw)
        if river_stream:
            kw.update(pipeline=True, limit=num)
            results["river/pipeline"] = river.progressive(name, x, y, columns, **kw)
    title = f"{name}: {config.learner.name} lr={config.learner.lr}"
    plot = lambda: reports.online_regret_plot(steps, prefix_regret, slope, intercept, title)  # noqa: E731
    if reports.publish(workdir, results, figures={"plots/regret.png": plot}, curves="plots"):
        report.save_text(workdir / "table.md", reports.online_table(results, metric_names))
    logging.info("results: %s", {k: v for k, v in results.items() if not isinstance(v, list)})
    return results
