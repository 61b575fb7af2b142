"""The launcher's reliability on the tiny classification config, through the CLI: nothing
written twice on a rerun, one writer per workdir, SIGTERM stops with a checkpoint and the same
command finishes the run exactly as an uninterrupted one. Five launches in all, shared."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from experiments import loop, resume
from experiments import workdir as workdir_lib
from ftlab.core import metrics as metrics_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARGS = (
    "--config=configs/finetune_minilm.py:method=bitfit,tiny,steps=300",
    "--config.checkpoint.every_steps=100",
    "--config.evals.every_steps=100",
)
# Launches share the test session's compile cache: compiling dominates a tiny run.
ENV = {
    **os.environ,
    "JAX_COMPILATION_CACHE_DIR": str(os.environ.get("FTLAB_TEST_CACHE", ROOT / ".jax_cache")),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
}


def _launch(workdir, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.main", f"--workdir={workdir}", *ARGS],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _run(workdir):
    proc = _launch(workdir)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _measured(results):
    return {k: v for k, v in results.items() if k not in loop.MEASURED}


def _steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finished")
    rc, err = _run(workdir)
    assert rc == 0, err[-3000:]
    return workdir


def test_rerun_after_a_kill_at_the_end_writes_nothing_twice(finished, tmp_path):
    # The state a kill -9 leaves after the final checkpoint, before the final writes were
    # done: results.json missing, and one step more than checkpoint.keep (orbax deletes the
    # oldest step after the new one is complete).
    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    reference = json.loads((workdir / "results.json").read_text())
    (workdir / "results.json").unlink()
    shutil.copytree(workdir / "checkpoints" / "200", workdir / "checkpoints" / "100")
    lines = (workdir / "metrics.jsonl").read_text()

    rc, err = _run(workdir)
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert (workdir / "metrics.jsonl").read_text() == lines
    assert _measured(json.loads((workdir / "results.json").read_text())) == _measured(reference)
    assert _steps(workdir) == [200, 300]


def test_a_second_writer_is_refused_in_one_line_naming_the_holder(finished, tmp_path):
    workdir = tmp_path / "busy"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from experiments import workdir; "
            f"held = workdir.lock({str(workdir)!r}); print('locked', flush=True); time.sleep(60)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, err = _run(workdir)
        assert rc == 2  # a user error: one line, status 2
        assert (
            err.strip()
            .splitlines()[-1]
            .startswith(f"error: workdir {workdir} is in use by pid {holder.pid} on ")
        ), err[-2000:]
        assert "Traceback" not in err
        assert not (workdir / "config.json").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock, no stale lock is left
        holder.wait()
    workdir_lib.lock(workdir).close()


def test_sigterm_saves_the_step_reached_and_the_same_command_finishes(finished, tmp_path):
    workdir = tmp_path / "preempted"
    proc = _launch(workdir)
    jsonl = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (jsonl.exists() and jsonl.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "SIGTERM received: stopping after step" in err
    assert not (workdir / "results.json").exists()
    reached = max(r["step"] for r in metrics_lib.read_jsonl(jsonl))
    assert 2 <= reached < 300 and _steps(workdir)[-1] == reached

    rc, err = _run(workdir)
    assert rc == 0, err[-3000:]
    assert f"resumed from step {reached}" in err
    results = json.loads((workdir / "results.json").read_text())
    reference = json.loads((finished / "results.json").read_text())
    assert _measured(results) == _measured(reference)


def test_sigint_sets_a_stop_flag_and_close_restores_the_handler(tmp_path):
    # Python's own handler before, whatever the test worker had installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ckpt = resume.Checkpointer(tmp_path, save_every_steps=10)
        assert not ckpt.stop_requested(1)
        os.kill(os.getpid(), signal.SIGINT)
        assert ckpt.signal_name == "SIGINT" and ckpt.stop_requested(2)
        with pytest.raises(KeyboardInterrupt):  # the second one interrupts at once
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ckpt.close()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
