"""Many train steps as one compiled `lax.scan` over batches drawn from in-memory arrays.

For data sets that fit on the device (digits, Fashion-MNIST), sampling the batch inside the scan
removes the per-step host round trip, which dominates the cost of a small network's step. The
scan is `ftlab.core.train.scan_steps`; this module only draws the rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax

from ftlab.core import train
from ftlab.types import PRNGKey

__all__ = ["make_fit"]

StepFn = train.StepFn


def make_fit(
    step: StepFn, *, num_steps: int, batch_size: int
) -> Callable[[train.TrainState, Mapping[str, jax.Array], PRNGKey], tuple[train.TrainState, dict]]:
    """Builds ``fit(state, arrays, rng) -> (state, metrics)``, jitted, running ``num_steps`` steps.

    Step ``s`` trains on ``batch_size`` distinct rows of ``arrays`` drawn with
    ``fold_in(rng, state.step)``, so a run is a pure function of its inputs. Keep the returned
    function and call it again: it compiles once per shape of ``arrays``.

    Args:
      step: a train step from `ftlab.core.train.make_train_step` (not jitted: it is traced into
        the scan).
      num_steps: steps per call.
      batch_size: rows per step; at most the number of rows in ``arrays``.

    Returns:
      ``fit``; its metrics are the step's metrics stacked, each ``[num_steps]``.
    """

    def fit(state, arrays, rng):
        sizes = {k: v.shape[0] for k, v in arrays.items()}
        n = next(iter(sizes.values()))
        if len(set(sizes.values())) != 1:
            raise ValueError(f"fit: arrays must share their leading dimension; got {sizes}")
        if batch_size > n:
            raise ValueError(
                f"fit: batch_size={batch_size} is larger than the {n} rows available; "
                "lower the batch size or use more data."
            )

        def batch_at(state):
            idx = jax.random.choice(
                jax.random.fold_in(rng, state.step), n, (batch_size,), replace=False
            )
            return jax.tree.map(lambda a: a[idx], arrays)

        return train.scan_steps(step, state, batch_at, num_steps=num_steps)

    # No donation: the state is small and callers keep their initial trees (a shared pretrained
    # encoder, or the "before" copy a test compares against).
    return jax.jit(fit)
