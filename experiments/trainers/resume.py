"""Restoring a trainer's state from its orbax checkpoints (the trainers that save them).

    ckpt, state, start_step, stop = resume.restore(config, workdir, state)
    for step in range(start_step, stop):
        ...
        ckpt.save(done, state.replace(frozen={}), force=done == stop)

Reads ``config.checkpoint.every_steps``, ``config.checkpoint.keep``, ``config.optim.num_steps``
and ``config.max_steps_per_run`` (0: run to the end; else stop after that many steps, e.g. to
fit a job's time limit, and let the same command continue from the checkpoint at the stop).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging

from ftlab.core import checkpoint


def restore(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    state: Any,
    *,
    abstract: Callable[[Any], Any] | None = None,
) -> tuple[checkpoint.Checkpointer, Any, int, int]:
    """Opens ``<workdir>/checkpoints`` and restores the newest good state, if any.

    Args:
        config: The trainer's config (keys above).
        workdir: The run's folder.
        state: The freshly initialised state (a flax struct with a ``frozen`` field); the
            restore target. Checkpoints hold no frozen leaves: they come from ``state``.
        abstract: Maps the target to what `Checkpointer.restore_latest` gets, e.g.
            `parallel.Plan.abstract_state` for a sharded restore; default: the target itself.

    Returns:
        ``(checkpointer, state on the host, start step, stop step)``; start 0 on a fresh
        workdir, and the stop is where this invocation ends.
    """
    ckpt = checkpoint.Checkpointer(
        pathlib.Path(workdir) / "checkpoints",
        max_to_keep=config.checkpoint.keep,
        save_every_steps=config.checkpoint.every_steps,
    )
    target = state.replace(frozen={})
    restored = ckpt.restore_latest(target if abstract is None else abstract(target))
    start_step = 0
    if restored is not None:
        saved, start_step = restored
        state = jax.device_get(saved).replace(frozen=state.frozen)
        logging.info("resumed from step %d of %s", start_step, ckpt.directory)
    total = config.optim.num_steps
    stop = (
        total if not config.max_steps_per_run else min(total, start_step + config.max_steps_per_run)
    )
    return ckpt, state, start_step, stop
