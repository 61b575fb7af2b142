"""Metric logging for training loops: JSONL + TensorBoard, progress, NaN checks, plots.

    writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0,
                                  resume_step=start_step)
    progress = metrics.Progress(total_steps, initial_step=start_step,
                                enabled=jax.process_index() == 0)
    last_good = None
    for step in range(start_step + 1, total_steps + 1):
        state, m = train_step(state, batch)
        if step % log_every_steps == 0:
            m = {k: float(v) for k, v in m.items()}
            metrics.check_finite(m, step=step, last_good_step=last_good)
            last_good = step
            writer.write(step, m)
            progress.update(step, **m)
    writer.close(); progress.close()
    metrics.plot_curves(workdir / "metrics.jsonl", workdir / "plots")

Metric names are slash paths (`train/loss`, `eval/validation/accuracy`); `plot_curves` draws
one figure per first path component.
"""

import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Self, TextIO

import numpy as np
from absl import logging

from ftlab.core import report

__all__ = [
    "JSONL_NAME",
    "TENSORBOARD_DIR",
    "NonFiniteMetricError",
    "check_finite",
    "checked_mean",
    "MetricWriter",
    "read_jsonl",
    "Progress",
    "plot_curves",
]


JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class NonFiniteMetricError(FloatingPointError):
    """A metric became NaN or infinite.

    Attributes:
        names: The metric names that are not finite.
        step: The step at which they were found.
        last_good_step: The last step at which all metrics were checked finite, or None.
    """

    def __init__(self, message: str, *, names: list[str], step: int, last_good_step: int | None):
        super().__init__(message)
        self.names = names
        self.step = step
        self.last_good_step = last_good_step


def check_finite(metrics: Mapping[str, Any], *, step: int, last_good_step: int | None) -> None:
    """Raises if any metric is NaN or infinite, naming where it went bad.

    Args:
        metrics: Metric name -> scalar (python, numpy or jax; arrays are checked elementwise).
        step: The step these metrics belong to.
        last_good_step: The last step whose metrics passed this check, or None if none has.

    Raises:
        NonFiniteMetricError: Names each bad metric, its value, and the step range
            `(last_good_step, step]` in which it went bad.

    >>> check_finite({"train/loss": 0.25}, step=10, last_good_step=5)
    >>> check_finite({"train/loss": float("nan")}, step=10, last_good_step=5)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ftlab.core.metrics.NonFiniteMetricError: train/loss=nan at step 10: ...
    """
    bad = {}
    for name, value in metrics.items():
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.number) or np.all(np.isfinite(array)):
            continue
        if array.size == 1:
            bad[name] = f"{array.item():g}"
        else:
            bad[name] = f"array with {np.sum(~np.isfinite(array))} of {array.size} non-finite"
    if not bad:
        return
    where = ", ".join(f"{name}={value}" for name, value in bad.items())
    plural = "metrics" if len(bad) > 1 else "metric"
    if last_good_step is None:
        since = f"steps (start, {step}]: no earlier step was checked"
    else:
        since = f"steps ({last_good_step}, {step}] (it was finite at step {last_good_step})"
    raise NonFiniteMetricError(
        f"{where} at step {step}: the {plural} went non-finite in {since}. "
        "Resume from a checkpoint at or before the last good step with a lower "
        "learning rate or with gradient clipping, or log more often to narrow it down.",
        names=list(bad),
        step=step,
        last_good_step=last_good_step,
    )


def checked_mean(
    history: Sequence[Mapping[str, Any]], *, last_step: int, last_good_step: int | None
) -> dict[str, float]:
    """The mean of each metric over consecutive steps, after `check_finite` on every one.

    Args:
        history: One metrics dict per step (already on the host, e.g. `jax.device_get` of the
            steps run since the last check), the last one for `last_step`.
        last_step: The step of `history[-1]`.
        last_good_step: The last step that passed the check before these.

    Raises:
        NonFiniteMetricError: For the first step with a NaN or infinite metric.

    >>> checked_mean([{"loss": 1.0}, {"loss": 3.0}], last_step=4, last_good_step=2)
    {'loss': 2.0}
    """
    for i, metrics in enumerate(history):
        step = last_step - len(history) + i + 1
        check_finite(metrics, step=step, last_good_step=last_good_step)
    return {k: float(np.mean([m[k] for m in history])) for k in history[0]}


class MetricWriter:
    """Appends scalar metrics to `workdir/metrics.jsonl` and TensorBoard event files.

    Each `write` adds one JSON line `{"step": step, "name": value, ...}` (flushed at once, so
    the file is complete up to the last write even if the process dies) and one TensorBoard
    scalar per metric under `workdir/tensorboard`.

    Resuming: pass `resume_step` (the step of the restored checkpoint). Lines with a larger
    step, which the interrupted run wrote after its last checkpoint and the resumed run will
    write again, are removed, and TensorBoard is told to hide events after `resume_step`; so
    the resumed run's `metrics.jsonl` equals that of a run that was never interrupted (given a
    deterministic train step logged at the same steps). A last line cut off by a crash is
    dropped as well. A run starting from scratch in a used workdir passes `resume_step=0`.

    Exactly once: a record whose step and metric names equal those of a line already in the
    file when it was opened replaces that line instead of adding a second one (and adds no
    second TensorBoard event). A run killed after its last checkpoint but before it finished
    writing redoes the final evaluation at the checkpoint's step when rerun; its line is
    written once.

    In multi-process jobs create it with `enabled=jax.process_index() == 0`: a disabled
    writer touches no file and every method does nothing.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enabled: bool = True,
        resume_step: int | None = None,
        keep: Callable[[dict], bool] | None = None,
    ):
        """Opens the metric files, creating `workdir` if needed.

        Args:
            workdir: The run's folder.
            enabled: False makes every method a no-op (for non-zero JAX processes).
            resume_step: Drop lines with `step > resume_step` from an existing file. None
                keeps the file as it is and appends.
            keep: Also drop the existing lines (records) for which this is False, e.g. those of
                the runs of an experiment that did not finish.
        """
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / JSONL_NAME
        self._file = None
        self._tensorboard = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # (step, metric names) -> line number of the records already on disk.
        self._existing: dict[tuple[Any, tuple[str, ...]], int] = {}
        if self.path.exists():
            _rewrite_jsonl(self.path, resume_step, keep)
            for number, record in enumerate(read_jsonl(self.path)):
                if isinstance(record, dict):
                    self._existing[_record_key(record)] = number
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

        import tensorboardX  # Imported here: only process 0 of a job needs it.

        self._tensorboard = tensorboardX.SummaryWriter(
            str(pathlib.Path(workdir) / TENSORBOARD_DIR),
            purge_step=None if resume_step is None else resume_step + 1,
            flush_secs=30,
        )

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records scalar `metrics` at `step`.

        Args:
            step: The training step.
            metrics: Metric name -> scalar (python, numpy or jax); stored as python floats.
                NaN and infinity are written as JSON's `NaN`/`Infinity` extensions.

        Raises:
            ValueError: A metric is not a scalar, or is named "step".
        """
        if not self.enabled:
            return
        if self._file is None:
            raise ValueError(f"MetricWriter.write(step={step}) after close() of {self.path}.")
        record = {"step": int(step)}
        for name, value in metrics.items():
            if name == "step":
                raise ValueError(
                    f"MetricWriter.write: step {step}: metric name 'step' is reserved for the "
                    "step number; rename it (e.g. 'train/step_time')."
                )
            record[name] = _to_float(name, value, step)
        number = self._existing.pop(_record_key(record), None)
        if number is not None:
            self._replace_line(number, json.dumps(record) + "\n")
            return  # its TensorBoard events were written with the line it replaces
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in record.items():
            if name != "step":
                self._tensorboard.add_scalar(name, value, global_step=record["step"])

    def _replace_line(self, number: int, line: str) -> None:
        """Replaces the `number`-th non-blank line, atomically (temporary file + rename)."""
        self._file.close()
        lines = [x for x in self.path.read_text(encoding="utf-8").splitlines(True) if x.strip()]
        lines[number] = line
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(lines), encoding="utf-8")
        os.replace(temporary, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def flush(self) -> None:
        """Pushes buffered TensorBoard events to disk (JSONL lines are never buffered)."""
        if self.enabled:
            self._tensorboard.flush()

    def close(self) -> None:
        """Flushes and closes the files; further writes raise."""
        if not self.enabled or self._file is None:
            return
        self._file.close()
        self._tensorboard.close()
        self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _record_key(record: dict) -> tuple[Any, tuple[str, ...]]:
    return record.get("step"), tuple(sorted(k for k in record if k != "step"))


def _to_float(name: str, value: Any, step: int) -> float:
    array = np.asarray(value)
    if array.size != 1 or not (
        np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)
    ):
        raise ValueError(
            f"MetricWriter.write: step {step}: metric {name!r} is {type(value).__name__} with "
            f"shape {array.shape} and dtype {array.dtype}; expected a numeric scalar. Reduce "
            "it first (e.g. jnp.mean) or log it elsewhere."
        )
    return float(array.reshape(()))


def _rewrite_jsonl(
    path: pathlib.Path, resume_step: int | None, keep: Callable[[dict], bool] | None = None
) -> None:
    """Drops lines after `resume_step`, lines `keep` rejects and a torn last line; rewrites
    atomically if changed."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                logging.warning("%s:%d: dropping a line cut off by a crash: %r", path, number, line)
                continue
            raise ValueError(
                f"{path}:{number}: not valid JSON: {line[:200]!r}. Fix or remove that line."
            ) from None
        step = record.get("step") if isinstance(record, dict) else None
        if keep is not None and not keep(record):
            continue
        if resume_step is None or not _is_number(step) or step <= resume_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    new_text = "".join(kept)
    if new_text == text:
        return
    dropped = len([line for line in lines if line.strip()]) - len(kept)
    logging.info("%s: resuming (after step %s), dropped %d lines.", path, resume_step, dropped)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(new_text, encoding="utf-8")
    os.replace(temporary, path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads a JSON-lines file (e.g. `metrics.jsonl`) into a list of dicts, skipping blanks.

    Raises:
        ValueError: A line is not valid JSON; the message names the file and line number.
    """
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{number}: not valid JSON ({e.msg}): {line[:200]!r}"
                ) from e
    return records


class Progress:
    """A one-line progress report: bar, step/total, percent, steps/s, ETA and live scalars.

    On a terminal the line is redrawn in place (`\\r`) at most 10 times a second; in a log file
    or pipe a full line is printed at most every 5% of the run or every 30 seconds. Speed is
    measured from the first `update` on, so compilation of the first step does not skew it.

        [#########...........]  450/1000  45.0% | 12.3 steps/s | ETA 0:00:44 | loss=0.4321
    """

    _TTY_INTERVAL_S = 0.1
    _LOG_INTERVAL_S = 30.0
    _LOG_FRACTION = 0.05
    _BAR_WIDTH = 20

    def __init__(
        self,
        total_steps: int,
        *,
        initial_step: int = 0,
        stream: TextIO = sys.stderr,
        enabled: bool = True,
    ):
        """Starts a report.

        Args:
            total_steps: The step at which the run ends.
            initial_step: The step the run starts (or resumes) from.
            stream: Where to write.
            enabled: False makes every method a no-op (for non-zero JAX processes).
        """
        self.total_steps = max(int(total_steps), 1)
        self.enabled = enabled
        self._stream = stream
        isatty = getattr(stream, "isatty", None)
        self._tty = bool(isatty and isatty())
        self._start_time = time.monotonic()
        self._first: tuple[int, float] | None = None  # (step, time) of the first update
        self._step = int(initial_step)
        self._scalars: dict[str, Any] = {}
        self._last_draw = -math.inf
        self._last_drawn_step: int | None = None
        self._last_bucket = -1
        self._width = 0
        self._closed = False

    def update(self, step: int, **scalars: Any) -> None:
        """Reports that `step` is done, with scalars to show (e.g. `loss=0.4321`)."""
        if not self.enabled or self._closed:
            return
        now = time.monotonic()
        if self._first is None:
            self._first = (int(step), now)
        self._step = int(step)
        self._scalars.update(scalars)
        if self._tty:
            if now - self._last_draw >= self._TTY_INTERVAL_S or step >= self.total_steps:
                self._draw(now)
        else:
            bucket = int(self._fraction() / self._LOG_FRACTION)
            if bucket > self._last_bucket or now - self._last_draw >= self._LOG_INTERVAL_S:
                self._last_bucket = bucket
                self._draw(now)

    def close(self) -> None:
        """Prints the final line (with the total time) and ends it with a newline."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        now = time.monotonic()
        line = f"{self._line(now)} | done in {_duration(now - self._start_time)}"
        self._write(line, final=True)

    def _fraction(self) -> float:
        return min(max(self._step / self.total_steps, 0.0), 1.0)

    def _line(self, now: float) -> str:
        fraction = self._fraction()
        filled = int(fraction * self._BAR_WIDTH)
        digits = len(str(self.total_steps))
        parts = [
            (
                f"[{'#' * filled}{'.' * (self._BAR_WIDTH - filled)}] "
                f"{self._step:>{digits}}/{self.total_steps} {100 * fraction:5.1f}%"
            )
        ]
        rate = None
        if self._first is not None and now > self._first[1] and self._step > self._first[0]:
            rate = (self._step - self._first[0]) / (now - self._first[1])
        if rate:
            remaining = max(self.total_steps - self._step, 0) / rate
            parts.append(f"{rate:.3g} steps/s")
            parts.append(f"ETA {_duration(remaining)}")
        else:
            parts.append("? steps/s")
            parts.append("ETA ?")
        parts.extend(f"{name}={_format_scalar(value)}" for name, value in self._scalars.items())
        return " | ".join(parts)

    def _draw(self, now: float) -> None:
        self._last_draw = now
        self._last_drawn_step = self._step
        self._write(self._line(now), final=False)

    def _write(self, line: str, *, final: bool) -> None:
        if self._tty:
            # Pad with spaces so a shorter line fully covers the one it replaces.
            self._stream.write("\r" + line.ljust(self._width) + ("\n" if final else ""))
            self._width = len(line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _format_scalar(value: Any) -> str:
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "iuf":
        return str(value)
    if array.dtype.kind in "iu":
        return str(int(array.reshape(())))
    number = float(array.reshape(()))
    if number != 0 and math.isfinite(number) and not 1e-3 <= abs(number) < 1e5:
        return f"{number:.3e}"
    return f"{number:.4f}"


def plot_curves(jsonl_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[pathlib.Path]:
    """Plots every numeric metric of a metrics JSONL file against step.

    Metrics are grouped by the first component of their name: `train/loss` and
    `train/grad_norm` become two panels of `train.png`, `eval/validation/accuracy` a panel of
    `eval.png`. Fields that are not numbers (strings, lists, booleans) are skipped.

    The drawing is `report.save_curves`' (the Agg canvas directly, so the global pyplot backend
    of the caller, e.g. a notebook's, is left alone).

    Args:
        jsonl_path: A file written by `MetricWriter`.
        out_dir: Folder for the PNG files; created if needed.

    Returns:
        The PNG paths written, sorted by name.

    Raises:
        ValueError: A line of the file is not valid JSON.
    """
    return report.save_curves(read_jsonl(jsonl_path), out_dir)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
