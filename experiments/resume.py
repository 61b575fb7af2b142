"""Restoring a trainer's state from its orbax checkpoints, and stopping cleanly when preempted.

    ckpt, state, start_step, stop = resume.restore(config, workdir, state)
    for step in range(start_step, stop):
        ...
        preempted = ckpt.stop_requested(done)
        if ckpt.should_save(done) or done == stop or preempted:
            ckpt.save(done, state.replace(frozen={}), force=done == stop or preempted)
        if preempted:
            stop = done
            break
    ...
    report.save_json(workdir / "results.json", results)   # ftlab.core.report: atomic

Reads ``config.checkpoint.every_steps``, ``config.checkpoint.keep``, ``config.optim.num_steps``
and ``config.max_steps_per_run`` (0: run to the end; else stop after that many steps, e.g. to
fit a job's time limit, and let the same command continue from the checkpoint at the stop).

Preemption: cloud TPU and spot GPU hosts send SIGTERM some time before they take the machine,
and a person presses Ctrl-C (SIGINT). From `restore` until `Checkpointer.close`, either signal
only sets a flag: the step in flight finishes, `stop_requested` turns true, the trainer saves
a checkpoint at that step, closes its writers and returns as if ``max_steps_per_run`` had
stopped it, so the process exits with status 0 and the same command resumes. A second signal
of the same kind acts at once, as it would without this (KeyboardInterrupt, termination).

In a multi-process job no handler is installed: JAX's preemption service
(`jax.experimental.multihost_utils.reached_preemption_sync_point`, enabled by
`jax.distributed.initialize`) receives the scheduler's notice and picks the step all processes
stop at; `stop_requested` must then be called at every step on every process. (There SIGINT
keeps its default effect.)
"""

from __future__ import annotations

import logging as std_logging
import pathlib
import signal
import threading
import weakref
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from ftlab.core import checkpoint

__all__ = ["Checkpointer", "close_all", "restore", "saved_part"]

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Checkpointers not yet closed, for `close_all` on the way out of a failed run.
_open: weakref.WeakSet[Checkpointer] = weakref.WeakSet()


class Checkpointer(checkpoint.Checkpointer):
    """`ftlab.core.checkpoint.Checkpointer` that also turns SIGTERM/SIGINT into a clean stop."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._closed = False
        self._stop_step: int | None = None
        self._install()
        _open.add(self)

    def stop_requested(self, step: int) -> bool:
        """Whether the run should save at `step` (just finished) and stop: a signal came.

        Single process: true from the first call after SIGTERM or SIGINT. Multi-process: true
        at the step JAX's preemption service picked for every process (call it every step).
        """
        if self._stop_step is not None:
            return True
        if jax.process_count() > 1:
            stop = ocp.multihost.reached_preemption(step)
        else:
            stop = self.signal_name is not None
        if stop:
            self._stop_step = step
            logging.warning(
                "%s received: stopping after step %d with a checkpoint; run the same command "
                "to resume.",
                self.signal_name or "preemption notice",
                step,
            )
        return stop

    def close(self) -> None:
        """Finishes pending saves, releases orbax's resources and restores signal handlers."""
        if self._closed:
            return
        self._closed = True
        _open.discard(self)
        self._uninstall()
        super().close()

    def _install(self) -> None:
        # Python runs signal handlers in the main thread only; a trainer called from another
        # thread (a notebook's worker, say) keeps the default behaviour.
        if threading.current_thread() is not threading.main_thread():
            return
        # In a multi-process job JAX's preemption service takes the notice: a flag set in one
        # process alone could not make every process stop at the same step.
        if jax.process_count() > 1:
            return
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name == name:
            # The second one acts as if we were not there (KeyboardInterrupt, termination):
            # the sender does not want to wait, or the loop that would stop is gone (a trainer
            # called in-process raised before its `close`).
            self._uninstall()
            signal.raise_signal(signum)
            return
        self.signal_name = name
        # Printed now, not at the step's end: the person who pressed Ctrl-C sees it was heard.
        logging.warning(
            "%s received: finishing the current step, then saving a checkpoint (send it again "
            "to stop at once without one).",
            name,
        )


class _OrbaxErrorsWithoutTracebacks(std_logging.Filter):
    """Keeps orbax's error lines but not their tracebacks (a failed save logged four)."""

    def filter(self, record):
        if "/orbax/" in record.pathname and record.exc_info:
            record.exc_info, record.exc_text = None, None
        return True


_ORBAX_FILTER = _OrbaxErrorsWithoutTracebacks()


def close_all() -> None:
    """Closes every checkpointer a trainer left open (it raised before its own `close`).

    The launcher calls it on every way out of a run: orbax finishes a save in background
    threads, and an interpreter shutting down under them floods the terminal with 'Event loop
    is closed' and 'cannot schedule new futures after shutdown' tracebacks that bury the real
    error. A save that fails here is logged in one line; the steps saved before it are kept.
    """
    for ckpt in list(_open):
        try:
            ckpt.close()
        except Exception as e:  # noqa: BLE001 - the run's own error is the one to show
            logging.error(
                "closing the checkpointer of %s failed (%s: %s); the steps saved before are "
                "kept: %s",
                ckpt.directory,
                type(e).__name__,
                str(e).strip().splitlines()[0] if str(e).strip() else "",
                ckpt.all_steps() if ckpt.directory.exists() else [],
            )


def saved_part(state: Any) -> Any:
    """What a checkpoint holds of ``state``: a `ftlab.core.train.TrainState` without its frozen
    leaves (they come from the pretrained source on resume); any other state whole."""
    return state.replace(frozen={}) if hasattr(state, "frozen") else state


def restore(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    state: Any,
    *,
    abstract: Callable[[Any], Any] | None = None,
) -> tuple[Checkpointer, Any, int, int]:
    """Opens ``<workdir>/checkpoints`` and restores the newest good state, if any.

    Args:
        config: The trainer's config (keys above).
        workdir: The run's folder.
        state: The freshly initialised state; the restore target. Checkpoints hold no frozen
            leaves of a state with a ``frozen`` field: they come from ``state`` (`saved_part`).
        abstract: Maps the target to what `Checkpointer.restore_latest` gets, e.g.
            `parallel.Plan.abstract_state` for a sharded restore; default: the target itself.

    Returns:
        ``(checkpointer, state on the host, start step, stop step)``; start 0 on a fresh
        workdir, and the stop is where this invocation ends. From here until the
        checkpointer's `close`, SIGTERM and SIGINT request a stop (`stop_requested`).

    Raises:
        ValueError: ``config.checkpoint.every_steps`` or ``config.checkpoint.keep`` is not a
            positive integer.
    """
    for key, value in (
        ("every_steps", config.checkpoint.every_steps),
        ("keep", config.checkpoint.keep),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"config.checkpoint.{key}={value!r}; expected a positive integer "
                f"(e.g. --config.checkpoint.{key}={1000 if key == 'every_steps' else 2})."
            )
    # The error itself arrives once, as CheckpointSaveError or a warning naming the step.
    logging.get_absl_handler().addFilter(_ORBAX_FILTER)  # adding twice adds it once
    ckpt = Checkpointer(
        pathlib.Path(workdir) / "checkpoints",
        max_to_keep=config.checkpoint.keep,
        save_every_steps=config.checkpoint.every_steps,
    )
    target = saved_part(state)
    try:
        restored = ckpt.restore_latest(target if abstract is None else abstract(target))
    except BaseException:
        ckpt.close()  # no orbax threads left running behind the error
        raise
    start_step = 0
    if restored is not None:
        saved, start_step = restored
        saved = jax.device_get(saved)
        state = saved.replace(frozen=state.frozen) if hasattr(state, "frozen") else saved
        logging.info("resumed from step %d of %s", start_step, ckpt.directory)
    total = config.optim.num_steps
    stop = (
        total if not config.max_steps_per_run else min(total, start_step + config.max_steps_per_run)
    )
    return ckpt, state, start_step, stop
