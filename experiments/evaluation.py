"""Evaluations several trainers share: exact sums over a split's batches (classification,
SFT), fine-tuning trajectories on held-out tasks, and their summary (mean and 95% interval per
number of steps).

The meta-learning trainers (``meta``, ``fewshot``) evaluate an initialisation the same way: fine-
tune it on each held-out task's support set with single `ftlab.meta.adapt` steps and measure it
on the query set before every step and after the last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ftlab import meta
from ftlab.core import report
from ftlab.data import batching

__all__ = ["adapt_trajectory", "batch_sums", "steps_summary"]


def batch_sums(plan, eval_step, state, arrays: Mapping, *, batch_size: int) -> dict[str, float]:
    """Each sum ``eval_step(state, batch)`` returns, added up over ``arrays`` in batches.

    ``eval_step`` (compiled by ``plan``) returns sums over a batch's real rows (the padding of
    the last batch masked out, `ftlab.data.batching.eval_batches`), so a mean divided out of
    them is exact whatever the batch size or device count.
    """
    totals: dict[str, float] = {}
    for batch in batching.eval_batches(arrays, batch_size=batch_size):
        for k, v in jax.device_get(eval_step(state, plan.put_batch(batch))).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return totals


def adapt_trajectory(
    measure: Callable[[object, Mapping], object], loss_fn: Callable, *, rules, num_steps: int
) -> Callable:
    """``trajectories(params, inner_lr, tasks) -> measure after 0, 1, ..., num_steps steps``.

    Per task (a `jax.vmap` over the leading axis of ``tasks``), one `jax.lax.scan` of single
    `ftlab.meta.adapt` steps on ``task["support"]``, so all step counts come from one
    compiled loop; ``measure(params, task)`` (a pytree of arrays) is stacked along a new axis
    of ``num_steps + 1`` after the task axis. Compiled with `jax.jit`.
    """

    def trajectory(params, inner_lr, task):
        def step(p, _):
            out = measure(p, task)
            p = meta.adapt(
                p, task["support"], loss_fn=loss_fn, inner_lr=inner_lr, num_steps=1, rules=rules
            )
            return p, out

        last, outs = jax.lax.scan(step, params, None, length=num_steps)
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), outs, measure(last, task))

    return jax.jit(jax.vmap(trajectory, in_axes=(None, None, 0)))


def steps_summary(values: np.ndarray, steps: Iterable[int], name: str) -> dict[str, float]:
    """``eval/<name>_step_<k>`` and its 95% half-width ``..._ci95`` for k in 0 and ``steps``.

    ``values``: ``[tasks, max steps + 1]``, the metric of each task after 0, 1, ... steps.
    """
    out = {}
    for k in sorted({0, *steps}):
        key = f"eval/{name}_step_{k}"
        out[key], out[f"{key}_ci95"] = report.interval95(values[:, k])
    return out
