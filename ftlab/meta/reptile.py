"""Reptile: move the initialisation towards the weights each task adapts to.

For a task batch, each task adapts with :func:`ftlab.meta.maml.adapt` (plain SGD on its support
set, first order by construction) and the meta-update direction is the mean of
``theta - phi_task`` over tasks. That direction is handed to the outer optimizer as if it were a
gradient, so ``optax.sgd(epsilon)`` gives Reptile exactly, ``theta <- theta + epsilon *
mean(phi - theta)``, and ``optax.adam`` gives the Adam variant used in practice. Only the
adapted leaves that are meta-trained move; other meta-trained leaves receive a zero direction.

References:
    Nichol, Achiam and Schulman, "On First-Order Meta-Learning Algorithms",
    https://arxiv.org/abs/1803.02999
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from ftlab.core import partition, train
from ftlab.meta import maml

__all__ = ["make_reptile_step"]


def make_reptile_step(
    loss_fn: maml.LossFn,
    tx: optax.GradientTransformation,
    *,
    inner_lr: float,
    num_steps: int,
    rules: maml.Rules = maml.ALL,
    axis_name: str | None = None,
) -> Callable[[train.TrainState, Mapping], tuple[train.TrainState, dict]]:
    """Builds ``step(state, tasks) -> (state, metrics)`` for Reptile.

    Args:
      loss_fn: ``loss_fn(params, batch, rng) -> (loss, aux)``, the mean loss over one task's
        batch (the loss of every ftlab step); ``aux`` is not used.
      tx: the outer optimizer; it receives ``mean_t(theta - phi_t)`` as the gradient.
      inner_lr: SGD step size of the inner loop.
      num_steps: inner steps per task (Reptile needs more than one to differ from joint training).
      rules: inner rules (which leaves adapt).
      axis_name: the pmapped device axis to average over; None under `jax.jit`.

    Returns:
      The pure step. ``tasks["support"]`` drives the adaptation; ``tasks["query"]``, if present,
      only measures it. Metrics: ``train/loss`` (query loss after adaptation, or support loss if
      there is no query set) and ``train/grad_norm`` (norm of the Reptile direction).
    """

    def step(state: train.TrainState, tasks):
        maml.check_tasks(tasks, need_query=False)
        maml._check_no_collections(state, "make_reptile_step")
        if maml.INNER_LR in state.params:
            raise ValueError(
                f"make_reptile_step: Reptile does not learn inner learning rates; the state holds "
                f"{maml.INNER_LR!r} leaves"
            )
        theta = state.trainable
        eval_set = "query" if "query" in tasks else "support"
        rng = maml._step_rng(state, axis_name)
        num_tasks = jax.tree.leaves(tasks["support"])[0].shape[0]

        def one_task(task, key):
            adapted = maml.adapt(
                partition.merge(theta, state.frozen),
                task["support"],
                loss_fn=loss_fn,
                inner_lr=inner_lr,
                num_steps=num_steps,
                rules=rules,
                rng=key,
            )
            phi = _like(adapted, theta)
            return phi, loss_fn(adapted, task[eval_set], jax.random.fold_in(key, num_steps))[0]

        phis, losses = jax.vmap(one_task)(tasks, jax.random.split(rng, num_tasks))
        # Mean of per-task differences, not theta minus the mean: a leaf a task left unchanged
        # then contributes an exact zero, which matters once Adam rescales tiny directions.
        direction = jax.tree.map(lambda t, p: jnp.mean(t[None] - p, axis=0), theta, phis)
        return train.apply_gradients(state, tx, direction, jnp.mean(losses), axis_name=axis_name)

    return step


def _like(full, subtree):
    """The leaves of ``full`` at the paths of ``subtree``, with the structure of ``subtree``."""
    flat = partition.flatten(full)
    return partition.unflatten({k: flat[k] for k in partition.flatten(subtree)})
