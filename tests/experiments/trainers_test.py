"""The trainers through the real launcher: a diverged update stops one naming the step, killed
at a random step and rerun it ends as an uninterrupted run does, bit for bit (`CHAIN`); run as 2
processes x 4 simulated devices (the multi-host path of a Cloud TPU slice, 8 devices in all; the
transformer trainers with their parameters sharded fsdp over all 8), it gives the numbers of 1
device and only process 0 writes the run's files (`MULTIPROCESS`).

Each run is a subprocess of `experiments.main`, so that ``XLA_FLAGS``, ``jax.distributed`` and
SIGKILL act as they do for a user; the runs share the session's persistent compile cache. The
faults come from inside: a wrapper around the plan's compiled steps returns NaN parameters from
a chosen train step, or sends the process SIGKILL at its K-th call (counted over every run of a
sweep), K drawn at random, with orbax's asynchronous saves possibly still in flight.
"""

import json
import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE = os.environ.get("FTLAB_TEST_CACHE", str(ROOT / ".jax_cache"))

# Each trainer's tiny config (all seven, meta with both its task families, so that a list below
# can take any of them back), with
# global batches that 8 devices divide and checkpoints often
# enough that a kill usually lands between two of them.
TRAINERS = {
    "classification": [
        "--config=configs/full_ft_minilm.py:tiny",
        "--config.model.dropout_rate=0.0",  # dropout masks depend on the device layout
        "--config.optim.num_steps=6",
        "--config.checkpoint.every_steps=2",
    ],
    "meta": [
        "--config=configs/maml_sinusoid.py:quick",
        "--config.optim.meta_batch_size=8",
        "--config.checkpoint.every_steps=2",
    ],
    "meta_images": [
        "--config=configs/maml_fewshot.py:quick",
        "--config.optim.meta_batch_size=8",
        "--config.checkpoint.every_steps=2",
    ],
    "multitask": [
        "--config=configs/multitask_yeast.py:quick",
        "--config.methods=('independent', 'hard_uniform')",  # a sweep of two: seconds fewer
    ],
    "pretrain": [
        "--config=configs/pretrain_digits.py:quick,seeds=1",
        "--config.data.label_fractions=(0.05,)",  # >= 16 labelled images: batches of 16
        # the loss whose negatives cross devices; a sweep of one run (ICL's has several)
        "--config.methods=('contrastive',)",
    ],
    "online": [
        "--config=configs/online_river.py:quick",
        "--config.checkpoint.every_steps=2",
        "--config.evals.river=False",  # river's own learner is no part of the loop
    ],
    "icl": ["--config=configs/icl_smollm2.py:quick", "--config.icl.batch_size=8"],
    "decoder_tuning": [
        "--config=configs/tune_smollm2.py:quick,methods=lora",
        "--config.optim.batch_size=8",
    ],
}

# In the 2-process run these trainers also shard their parameters and optimizer state over all
# 8 devices (fsdp across the processes; leaves of 128 bytes and more), as a model larger than a
# device would be; the rest stay data parallel (their conv kernels or state do not divide by 8).
SHARDED = {
    "classification": [
        "--config.parallel.sharding_rules=(('.*bias', 'replicate'), ('.*', 'fsdp'))"
    ],
    "decoder_tuning": ["--config.parallel.sharding_rules=(('.*', 'fsdp'),)"],
}
SHARDED = {k: v + ["--config.parallel.fsdp_min_bytes=128"] for k, v in SHARDED.items()}

# The fault chain runs for one trainer of each way to resume: orbax checkpoints of one run
# (meta, through `loop.train`, with a diverged update first) and finished items of a sweep
# (ICL's finished tasks). Classification runs the same `loop.train`; its own tests resume an
# interrupted run, stop on a NaN keeping the last good checkpoint and fall back from a corrupt
# one. Meta's image family trains through the same loop and step builder as its sinusoids;
# decoder tuning, multitask, pretrain and online resume through the same two, and their own
# tests stop them part-way and check the rerun. CI's 10-minute budget does not fit them all
# (each chain passed for all eight trainers, fewshot then a trainer of its own, before the cut,
# 2026-12-05; classification's until 2026-12-06).
CHAIN = ("meta", "icl")
# The 2-process run covers each data-parallel path: the loop's plan (classification, sharded
# fsdp too), ICL's own split of the queries, and pretrain (a sweep of short runs, whose
# contrastive loss takes its negatives across devices). Meta's two families train through the same
# `loop.train` on the same plan as classification (tests/meta/parallel_test.py checks their
# steps on 4 devices); decoder tuning's and multitask's sweeps of short runs are pretrain's, on
# the plan classification shards; online's sweep over the mesh has its own 8-devices-equal-1
# and process-1 tests (tests/experiments/online_test.py). Decoder tuning (sharded) and online
# passed here too before CI's 10-minute budget cut them, 2026-12-06.
MULTIPROCESS = ("classification", "icl", "pretrain")

# The trainers whose chain starts with a diverged update. ICL trains nothing; meta's image family
# stops in the same `loop.train` as its sinusoids; the others' own tests make their loss NaN
# in-process and restore the last good checkpoint (classification, multitask, pretrain and
# decoder tuning tests, online_test), which keeps CI within its budget.
DIVERGE = ("meta",)

# Results that measure time or memory, not the computation.
_MEASURED = re.compile(r"(_s$|_s_|seconds|per_s|per_sec|rss|_mib)")

# Runs the launcher. "kill:K" SIGKILLs the process at its K-th call of a compiled step (train or
# evaluation) of the plan; "nan:K" makes the K-th call of a train step return NaN parameters and
# metrics, as a diverged update does; "run:0" changes nothing. Prints the number of calls (the
# reference run's count bounds K).
_LAUNCH = r"""
import atexit, os, signal, sys
import jax, jax.numpy as jnp
from absl import app
from experiments import main
from ftlab.core import parallel

fault, at = sys.argv.pop(1).split(":")
at, calls = int(at), [0]

def diverged(tree):
    return jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

def counted(compile_step, train):
    def compile(*args, **kwargs):
        step = compile_step(*args, **kwargs)
        def run(*args, **kwargs):
            calls[0] += 1
            out = step(*args, **kwargs)
            if calls[0] == at and fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if calls[0] == at and fault == "nan" and train:
                return diverged(out)
            return out
        return run
    return compile

for plan in (parallel.Plan, getattr(parallel, "ShardedPlan", parallel.Plan)):
    for name in ("compile_train_step", "compile_eval_step"):
        if name in vars(plan):
            setattr(plan, name, counted(vars(plan)[name], name == "compile_train_step"))
atexit.register(lambda: print(f"CALLS {calls[0]}", flush=True))

# Every file the process opens for writing in the workdir, outside orbax's checkpoint folder
# (every process of a multi-host job writes its part of a checkpoint there).
workdir = os.path.realpath(next(a for a in sys.argv if a.startswith("--workdir=")).split("=", 1)[1])

def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path, mode, flags = os.path.realpath(os.fsdecode(args[0])), args[1] or "", args[2] or 0
        writes = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        inside = path.startswith(workdir + os.sep)
        if writes and inside and "checkpoints" not in path[len(workdir):].split(os.sep):
            print(f"WROTE {path[len(workdir) + 1:]}", flush=True)

sys.addaudithook(audit)
app.run(main.main, flags_parser=main.parse_flags)
"""


def _launch(args, workdir, *, fault="run:0", devices=1, process=None):
    env = dict(os.environ)
    flags = f"--xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = CACHE
    # as tests/conftest.py: cache the small compiles too (the five runs of a trainer share them)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    env["PYTHONPATH"] = str(ROOT)
    argv = [sys.executable, "-c", _LAUNCH, fault, *args, f"--workdir={workdir}"]
    if process is not None:
        port, index = process
        argv += [
            "--config.parallel.multihost=True",
            f"--config.parallel.coordinator_address=127.0.0.1:{port}",
            "--config.parallel.num_processes=2",
            f"--config.parallel.process_id={index}",
        ]
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc, *, status=0, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == status, out[-4000:]
    return out


def _computed(tree):
    """``tree`` without the entries that measure time or memory."""
    if isinstance(tree, dict):
        return {k: _computed(v) for k, v in tree.items() if not _MEASURED.search(k)}
    if isinstance(tree, list):
        return [_computed(v) for v in tree]
    return tree


def _outcome(workdir):
    """The run's results and metric lines (of every run of a sweep), without timings."""
    workdir = pathlib.Path(workdir)
    results = json.loads((workdir / "results.json").read_text())
    lines = {
        str(path.relative_to(workdir)): [
            _computed(json.loads(x)) for x in path.read_text().splitlines()
        ]
        for path in sorted(workdir.rglob("metrics.jsonl"))
    }
    assert lines, f"no metrics.jsonl in {workdir}"
    return _computed(results), lines


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Each trainer run once, uninterrupted, on 1 device: (outcome, batches asked for)."""
    return {}


def _reference(name, reference, tmp_path_factory):
    if name not in reference:
        workdir = tmp_path_factory.mktemp(f"{name}_reference")
        out = _finish(_launch(TRAINERS[name], workdir))
        calls = _calls(out)
        reference[name] = (_outcome(workdir), calls)
    return reference[name]


def _calls(out):
    return int(re.findall(r"^CALLS (\d+)$", out, re.M)[-1])


@pytest.mark.parametrize("name", CHAIN)
def test_a_diverged_update_then_a_kill_at_a_random_step_then_a_rerun_ends_as_uninterrupted(
    name, reference, tmp_path, tmp_path_factory
):
    """One workdir through three faults' worth of runs (one chain: each run costs seconds).

    1. (`DIVERGE` trainers) The second train step's update diverges (NaN parameters and
       metrics): the run stops, naming the step, and saves nothing from it.
    2. The same command resumes from the last good checkpoint and is SIGKILLed at a random
       compiled-step call of those it has left.
    3. The same command again: the results and every metric line equal the uninterrupted run's,
       bit for bit (each line once).
    """
    expected, calls = _reference(name, reference, tmp_path_factory)
    done = 0
    if name in DIVERGE:
        out = _finish(_launch(TRAINERS[name], tmp_path, fault="nan:2"), status=1)
        assert re.search(r"=nan at step \d+", out), out[-3000:]
        done = _calls(out)
    kill_at = random.randint(1, calls - done)
    _finish(_launch(TRAINERS[name], tmp_path, fault=f"kill:{kill_at}"), status=-signal.SIGKILL)
    _finish(_launch(TRAINERS[name], tmp_path))
    results, lines = _outcome(tmp_path)
    where = f"killed at compiled-step call {kill_at} (the reference made {calls})"
    assert results == expected[0], where
    assert lines == expected[1], where


@pytest.mark.parametrize("name", MULTIPROCESS)
def test_two_processes_of_four_devices_equal_one_device_and_only_process_0_writes(
    name, reference, tmp_path, tmp_path_factory
):
    expected, _ = _reference(name, reference, tmp_path_factory)
    port = _free_port()
    # One workdir, as a multi-host job on a shared file system has.
    procs = [
        _launch(TRAINERS[name] + SHARDED.get(name, []), tmp_path, devices=4, process=(port, index))
        for index in (0, 1)
    ]
    chief, other = (_finish(proc) for proc in procs)
    results, lines = _outcome(tmp_path)
    _close(lines, expected[1])
    _close(results, expected[0])
    wrote = {
        index: re.findall(r"^WROTE (.+)$", out, re.M) for index, out in enumerate((chief, other))
    }
    assert "results.json.tmp" in wrote[0] or "results.json" in wrote[0], wrote[0]
    assert wrote[1] == [], wrote[1]


def _close(got, want, *, rel=1e-4, abs_=1e-5):
    """Asserts equal structure, strings and integers, and floats within reassociation error."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (got, want)
        for k in want:
            _close(got[k], want[k], rel=rel, abs_=abs_)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (got, want)
        for g, w in zip(got, want, strict=True):
            _close(g, w, rel=rel, abs_=abs_)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=rel, abs=abs_), (got, want)
    else:
        assert got == want
