"""Evaluations several trainers share: fine-tuning trajectories on held-out tasks, and their
summary (mean and 95% interval per number of steps).

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

__all__ = ["adapt_trajectory", "steps_summary"]


def adapt_trajectory(
    measure: Callable[[object, Mapping], object], loss_fn: Callable, *, rules, num_steps: int
) -> Callable:
    """``trajectory(params, inner_lr, task) -> measure after 0, 1, ..., num_steps steps``.

    One `jax.lax.scan` of single `ftlab.meta.adapt` steps on ``task["support"]``, so all step
    counts come from one compiled loop; ``measure(params, task)`` (a pytree of arrays) is
    stacked along a new leading axis of ``num_steps + 1``.
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

    return trajectory


def steps_summary(values: np.ndarray, steps: Iterable[int], name: str) -> dict[str, float]:
    """``eval/<name>_step_<k>`` and its 95% half-width ``..._ci95`` for k in 0 and ``steps``.

    ``values``: ``[tasks, max steps + 1]``, the metric of each task after 0, 1, ... steps.
    """
    out = {}
    for k in sorted({0, *steps}):
        key = f"eval/{name}_step_{k}"
        out[key], out[f"{key}_ci95"] = report.interval95(values[:, k])
    return out
