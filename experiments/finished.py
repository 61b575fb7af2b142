"""Resuming a trainer made of several independent runs (methods, seeds) done one after another.

A finished run's result is kept as ``<workdir>/finished/<name>.json`` and the rerun of the same
command reads it instead of training again. Metric lines of runs that did not finish (the one
that was interrupted) are dropped, so that its rerun writes them once:

    # train(name, writer) writes "train/<name>/..." lines; it may raise finished.Stopped
    results, stopped = finished.sweep(
        workdir, config, names, train, metric_prefix=lambda name: f"train/{name}/"
    )

Each training inside a run is a `short_run` of `experiments.loop` (placement, the stop on a
non-finite loss naming the step, process-0 writers, a checkpoint at its end and on a signal)
in its own folder, ``<workdir>/runs/<name>/`` by the sweeps' convention, from whose checkpoint
an interrupted run resumes. Only process 0 of a multi-process job writes the records and the
metric lines; the sweep's report (`reports.publish`: results.json, results.md, its plots) too.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging

from experiments import loop, models
from ftlab.core import metrics as metrics_lib
from ftlab.core import parallel, report, train

__all__ = ["FOLDER", "Fits", "Runs", "Stopped", "check_methods", "short_run", "sweep"]

FOLDER = "finished"


class Stopped(Exception):
    """A signal stopped a run's loop (it saved a checkpoint): the sweep ends, a rerun resumes."""


def check_methods(config, known) -> None:
    """Refuses, before a sweep starts, a ``config.methods`` entry that is not one of ``known``
    or that has no learning rate in ``config.optim.lr`` (when the config has one per method)."""
    for m in config.methods:
        if m not in known:
            raise ValueError(f"config.methods: unknown method {m!r}; expected some of {known}")
        lrs = config.optim.get("lr") if "optim" in config else None
        if hasattr(lrs, "keys") and m not in lrs:
            raise ValueError(f"config.optim.lr has no learning rate for method {m!r}")


def short_run(
    workdir: str | os.PathLike,
    *,
    plan: parallel.Plan,
    state: Any,
    step_fn: Callable,
    batch_at: Callable[[int], Mapping],
    num_steps: int,
    log_every: int,
    fresh: bool = False,
    writer: metrics_lib.MetricWriter | None = None,
    prefix: str = "train/",
    step_offset: int = 0,
    extra: Mapping[str, Any] | None = None,
    evaluators: Sequence[loop.Evaluator] = (),
) -> loop.Run:
    """``num_steps`` steps of ``step_fn`` as one finished, closed run of `experiments.loop`.

    Checkpointed at its end (and on a signal) in ``workdir``; ``run.state`` is the trained
    state on the host (one copy), every step's train metrics are in ``run.history`` (a resumed
    run's start at its checkpoint). ``fresh``: empty ``workdir`` first, so that an interrupted
    run starts over instead of resuming. ``writer`` (a sweep's): also gets each line the loop
    logged, its ``train/<metric>`` means (not the evaluations) renamed ``<prefix><metric>``, at
    ``step_offset + step``, with ``extra``. ``evaluators`` run during the steps (`loop.train`).

    Raises:
        Stopped: A signal stopped the loop before the last step.
    """
    if fresh:
        shutil.rmtree(workdir, ignore_errors=True)
    run = loop.train(
        loop.short_run_config(num_steps, log_every=log_every),
        workdir,
        plan=plan,
        state=state,
        step_fn=step_fn,
        batch_at=batch_at,
        evaluators=evaluators,
        keep_history=True,
    )
    if not run.finished:
        raise Stopped(str(workdir))
    run.close()
    run.state = loop.fetch(plan, run.state)
    for step, line in run.logged if writer is not None else ():
        means = {
            prefix + k[6:]: v
            for k, v in line.items()
            if k.startswith("train/") and k != "train/steps_per_sec"
        }
        writer.write(step_offset + step, {**means, **(extra or {})})
    return run


class Fits:
    """The short runs of one sweep, sharing their compiled train steps.

    ``fits(folder, state, loss_fn, tx, batch_at, *, num_steps, key=None, **options)`` is the
    `short_run` of ``make_step(loss_fn, tx)`` from ``state`` in ``folder`` (``options``: more of
    `short_run`'s, ``log_every`` among them). Runs of one ``key`` (default: the loss and
    optimizer objects themselves) share one train step, so that jit compiles it once for all of
    them (every seed and data size of one shape). The step is built from the first run's loss
    and optimizer: a caller that names a ``key`` gives equal keys only to runs whose losses and
    optimizers compute the same (e.g. rebuilt from the same settings).
    """

    def __init__(
        self,
        plan: parallel.Plan,
        *,
        log_every: int | None = None,
        make_step: Callable = train.make_train_step,
    ):
        """``make_step(loss_fn, tx, axis_name=...)`` builds a train step (e.g. a
        `loop.StepPolicy`'s ``train_step``)."""
        self.plan, self.log_every, self.make_step = plan, log_every, make_step
        self._steps: dict = {}

    def __call__(self, folder, state, loss_fn, tx, batch_at, *, num_steps, key=None, **options):
        key = (loss_fn, tx) if key is None else key
        if key not in self._steps:
            self._steps[key] = self.make_step(loss_fn, tx, axis_name=models.axis_name(self.plan))
        options = {"log_every": self.log_every, **options}
        return short_run(
            folder, plan=self.plan, state=state, step_fn=self._steps[key], batch_at=batch_at,
            num_steps=num_steps, **options,
        )  # fmt: skip


def sweep(
    workdir: str | os.PathLike,
    config: ml_collections.ConfigDict,
    names: list[str],
    run_one: Callable[[str, metrics_lib.MetricWriter | None], dict],
    *,
    metric_prefix: Callable[[str], str | None] | None = None,
    on_result: Callable[[str, dict], None] | None = None,
) -> tuple[dict[str, dict], str | None]:
    """Every run of a sweep, each recorded when it finishes and read back on a rerun.

    Args:
        workdir: The trainer's folder (records in ``finished/``, lines in metrics.jsonl).
        config: The trainer's config (`Runs`).
        names: The runs, in order.
        run_one: ``run_one(name, writer) -> result`` (JSON) of a run not finished yet; it may
            raise `Stopped`. ``writer`` is the sweep's metric writer (None without
            ``metric_prefix``: then the sweep writes no metrics.jsonl).
        metric_prefix: ``name -> prefix`` of the lines ``name`` writes (`Runs`).
        on_result: Called with each new result once it is recorded.

    Returns:
        ``({name: result}`` in the order of ``names``, ``None)``; or, when a signal stopped the
        run ``name``, the results before it and ``name`` (a rerun resumes there).
    """
    past = Runs(workdir, metric_prefix=metric_prefix or (lambda name: None), config=config)
    writer = past.open_writer() if metric_prefix else None
    results: dict[str, dict] = {}
    progress = metrics_lib.Progress(len(names), enabled=loop.is_chief())
    try:
        for i, name in enumerate(names):
            if (result := past.get(name)) is None:
                result = run_one(name, writer)
                past.put(name, result)
                if on_result is not None:
                    on_result(name, result)
            results[name] = result
            progress.update(i + 1, run=name)
    except Stopped:
        logging.info("stopped during run %s; rerun to resume", name)
        return results, name
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    return results, None


class Runs:
    """The finished runs of one workdir."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        metric_prefix: Callable[[str], str | None],
        config: ml_collections.ConfigDict,
    ):
        """Args:
        workdir: The trainer's folder.
        metric_prefix: ``name -> prefix`` of every metric a run writes (e.g. ``train/<name>/``),
            or None for a run that writes none.
        config: The trainer's config; a finished run recorded under another config is an error,
            not a result to reuse.
        """
        self.workdir = pathlib.Path(workdir)
        self.folder = self.workdir / FOLDER
        self.metric_prefix = metric_prefix
        self.config = json.loads(config.to_json_best_effort())

    def _path(self, name: str) -> pathlib.Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"finished.Runs: run name {name!r} cannot name a file")
        return self.folder / f"{name}.json"

    def names(self) -> list[str]:
        """Names of the finished runs, sorted."""
        return sorted(p.stem for p in self.folder.glob("*.json"))

    def get(self, name: str) -> dict | None:
        """The result of a finished run, or None.

        Raises:
            ValueError: The run was recorded under a different config (names the file).
        """
        path = self._path(name)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if record.get("config") != self.config:
            raise ValueError(
                f"{path} was run with a different config; use a new --workdir, or move that "
                "file away to run it again."
            )
        return record["result"]

    def put(self, name: str, result: dict) -> None:
        """Records a finished run (written to a temporary file, then renamed; process 0 only)."""
        path = self._path(name)
        if loop.is_chief():
            report.save_json(path, {"config": self.config, "result": result})

    def get_or_run(self, name: str, run: Callable[..., dict], *args: Any) -> dict:
        """The recorded result of ``name``, or ``run(*args)``'s, recorded (`Stopped` passes
        through, recording nothing)."""
        result = self.get(name)
        if result is None:
            result = run(*args)
            self.put(name, result)
        return result

    def open_writer(self) -> metrics_lib.MetricWriter:
        """A metric writer that keeps the lines of finished runs only, and appends (process 0)."""
        prefixes = tuple(p for n in self.names() if (p := self.metric_prefix(n)) is not None)

        def keep(record: dict) -> bool:
            return bool(prefixes) and all(k == "step" or k.startswith(prefixes) for k in record)

        return metrics_lib.MetricWriter(
            self.workdir, enabled=loop.is_chief(), resume_step=None, keep=keep
        )
