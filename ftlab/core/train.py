"""A pure, partition-aware train step: ``step(state, batch) -> (state, metrics)``.

The state carries the trainable and frozen parts of the parameter tree separately. The step
differentiates the loss with respect to ``state.trainable`` only, so frozen leaves get no
gradient computed and no optimizer state, and they are passed through untouched (bit-identical).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ftlab.core import partition
from ftlab.types import Params, PRNGKey

# loss_fn(params, batch, rng) -> (scalar loss, {metric_name: scalar}); params is the merged tree.
LossFn = Callable[[Params, Mapping[str, jax.Array], PRNGKey], tuple[jax.Array, dict]]
# eval_fn(params, batch) -> {name: per-example values [batch]}; summed under batch["mask"].
EvalFn = Callable[[Params, Mapping[str, jax.Array]], dict]


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes.

    Attributes:
      step: int32 scalar, the number of updates applied so far.
      trainable: the trainable subtree (see `partition.split`).
      frozen: the frozen subtree; never updated.
      opt_state: optimizer state over ``trainable`` only.
      rng: a raw uint32 PRNG key; step ``s`` uses ``fold_in(rng, s)``.
    """

    step: jax.Array
    trainable: Params
    frozen: Params
    opt_state: Any
    rng: jax.Array

    @property
    def params(self) -> Params:
        """The full parameter tree, for the forward pass."""
        return partition.merge(self.trainable, self.frozen)

    def checkpointable(self) -> TrainState:
        """The state without frozen leaves: frozen weights come from the pretrained source."""
        return self.replace(frozen={})


def init_state(
    params: Params, label_tree: Mapping, tx: optax.GradientTransformation, *, seed: int
) -> TrainState:
    """Splits ``params`` by ``label_tree`` and initialises the optimizer on the trainable part."""
    trainable, frozen = partition.split(params, label_tree)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        trainable=trainable,
        frozen=frozen,
        opt_state=tx.init(trainable),
        rng=jax.random.PRNGKey(seed),
    )


def make_train_step(
    loss_fn: LossFn, tx: optax.GradientTransformation, *, axis_name: str | None = None
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """Builds ``step(state, batch) -> (state, metrics)``; jit or pmap it with the state donated.

    Args:
      loss_fn: ``loss_fn(params, batch, rng) -> (loss, metrics)`` with ``loss`` the mean over the
        batch, so that the mean over equal device shards equals the global mean.
      tx: an optax transformation over the trainable subtree.
      axis_name: the mapped axis to average gradients and metrics over under `jax.pmap`; None
        under `jax.jit`, where sharding propagation makes the batch mean global by itself.

    Returns:
      The pure step function. Metrics: ``train/loss``, ``train/grad_norm`` and ``train/<name>``
      for each metric ``loss_fn`` returns.
    """

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:
            # Different dropout masks per device, as one big batch would have.
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

        def loss_of_trainable(trainable):
            return loss_fn(partition.merge(trainable, state.frozen), batch, rng)

        (loss, aux), grads = jax.value_and_grad(loss_of_trainable, has_aux=True)(state.trainable)
        if axis_name is not None:
            grads, loss, aux = jax.lax.pmean((grads, loss, aux), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads)}
        metrics.update({f"train/{k}": v for k, v in aux.items()})
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state)
        return new_state, metrics

    return step


def make_eval_step(
    eval_fn: EvalFn, *, axis_name: str | None = None
) -> Callable[[TrainState, Mapping[str, jax.Array]], dict]:
    """Builds ``eval_step(state, batch) -> {name: masked sum}`` plus ``count``.

    ``batch["mask"]`` marks real rows (1) against padding (0); dividing the summed values by the
    summed ``count`` over all batches gives exact means regardless of padding or device count.
    """

    def eval_step(state: TrainState, batch):
        values = eval_fn(state.params, batch)
        mask = batch["mask"]
        sums = {k: jnp.sum(v * mask) for k, v in values.items()}
        sums["count"] = jnp.sum(mask)
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        return sums

    return eval_step
