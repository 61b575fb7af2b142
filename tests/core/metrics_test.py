"""Tests for ftlab.core.metrics: JSONL/TensorBoard logs, resume, NaN checks, plots, progress."""

import io
import itertools
import json

import jax.numpy as jnp
import numpy as np
import pytest

from ftlab.core import metrics


def _log(workdir, steps, **kwargs):
    with metrics.MetricWriter(workdir, **kwargs) as writer:
        for step in steps:
            writer.write(step, {"train/loss": 1.0 / step, "train/lr": jnp.float32(0.5)})


def test_write_appends_one_json_line_per_step(tmp_path):
    with metrics.MetricWriter(tmp_path) as writer:
        writer.write(1, {"train/loss": jnp.float32(0.5), "eval/acc": np.float64(0.25)})
        writer.write(2, {"train/loss": 0.125, "train/ok": True})
        # Flushed at once: readable before close.
        assert len(metrics.read_jsonl(tmp_path / "metrics.jsonl")) == 2

    records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert records == [
        {"step": 1, "train/loss": 0.5, "eval/acc": 0.25},
        {"step": 2, "train/loss": 0.125, "train/ok": 1.0},
    ]
    assert all(type(v) is float for r in records for k, v in r.items() if k != "step")


def test_write_rejects_non_scalars(tmp_path):
    error = pytest.raises(ValueError, match=r"step 3: metric 'train/logits'")
    with metrics.MetricWriter(tmp_path) as writer, error:
        writer.write(3, {"train/logits": jnp.zeros((2,))})


def test_tensorboard_event_file_is_written(tmp_path):
    _log(tmp_path, [1, 2])
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_resume_drops_lines_after_the_restored_step(tmp_path):
    uninterrupted, resumed = tmp_path / "a", tmp_path / "b"
    _log(uninterrupted, range(1, 9))
    _log(resumed, range(1, 7))  # crashed after step 6, last checkpoint at step 4
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "train/lo')  # a line torn by the crash
    _log(resumed, range(5, 9), resume_step=4)

    assert (resumed / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()


def test_rerun_replaces_a_line_already_written_instead_of_adding_one(tmp_path):
    # A run killed after its final checkpoint redoes the final evaluation when rerun.
    with metrics.MetricWriter(tmp_path) as writer:
        writer.write(6, {"train/loss": 0.5})
        writer.write(6, {"eval/accuracy": 0.75})
    with metrics.MetricWriter(tmp_path, resume_step=6) as writer:
        writer.write(6, {"eval/accuracy": 0.75})
        writer.write(7, {"eval/accuracy": 0.5})
    assert metrics.read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 6, "train/loss": 0.5},
        {"step": 6, "eval/accuracy": 0.75},
        {"step": 7, "eval/accuracy": 0.5},
    ]


def test_disabled_writer_touches_nothing(tmp_path):
    _log(tmp_path / "run", [1], enabled=False)
    assert not (tmp_path / "run").exists()


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2"):
        metrics.read_jsonl(path)


def test_check_finite_passes_finite_values():
    metrics.check_finite(
        {"train/loss": 0.1, "train/acc": jnp.float32(1.0)}, step=3, last_good_step=2
    )


def test_check_finite_names_metric_value_and_step_range():
    with pytest.raises(metrics.NonFiniteMetricError) as error:
        metrics.check_finite(
            {"train/loss": float("nan"), "train/grad_norm": np.float32(np.inf), "train/acc": 0.5},
            step=20,
            last_good_step=10,
        )
    message = str(error.value)
    assert "train/loss=nan" in message and "train/grad_norm=inf" in message
    assert "train/acc" not in message
    assert "(10, 20]" in message
    assert isinstance(error.value, FloatingPointError)
    assert error.value.names == ["train/loss", "train/grad_norm"]

    with pytest.raises(metrics.NonFiniteMetricError, match=r"\(start, 5\]"):
        metrics.check_finite({"train/loss": float("inf")}, step=5, last_good_step=None)


def test_plot_curves_writes_one_png_per_group(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": s, "train/loss": 1 / s, "train/grad_norm": 2.0, "note": "text", "flag": True}
        for s in range(1, 5)
    ] + [{"step": 4, "eval/validation/accuracy": 0.75, "eval/validation/loss": float("nan")}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    written = metrics.plot_curves(path, tmp_path / "plots")

    assert [p.name for p in written] == ["eval.png", "train.png"]
    for png in written:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


class _FakeClock:
    def __init__(self):
        self._ticks = itertools.count(0.0, 0.5)

    def __call__(self):
        return next(self._ticks)


def test_progress_prints_eta_and_scalars_to_a_log(monkeypatch):
    monkeypatch.setattr(metrics.time, "monotonic", _FakeClock())
    stream = io.StringIO()
    progress = metrics.Progress(100, initial_step=0, stream=stream)
    for step in range(1, 101):
        progress.update(step, loss=0.4321, lr=jnp.float32(3e-6))
    progress.close()

    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert 20 <= len(lines) <= 23  # about one line per 5%, plus the final one
    assert "  1/100" in lines[0] and "ETA ?" in lines[0]
    assert "steps/s" in lines[5] and "ETA 0:00:" in lines[5]
    assert "loss=0.4321" in lines[5] and "lr=3.000e-06" in lines[5]
    assert "100/100 100.0%" in lines[-1] and "done in" in lines[-1]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_redraws_one_line_on_a_terminal(monkeypatch):
    monkeypatch.setattr(metrics.time, "monotonic", _FakeClock())
    stream = _Terminal()
    progress = metrics.Progress(10, initial_step=5, stream=stream)
    for step in range(6, 11):
        progress.update(step, loss=1.0)
    progress.close()

    text = stream.getvalue()
    assert text.count("\r") == 6 and text.count("\n") == 1 and text.endswith("\n")
    assert "ETA 0:00:00" in text and "10/10" in text


def test_disabled_progress_writes_nothing():
    stream = io.StringIO()
    progress = metrics.Progress(10, stream=stream, enabled=False)
    progress.update(1, loss=1.0)
    progress.close()
    assert stream.getvalue() == ""
