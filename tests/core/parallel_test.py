"""Data parallelism with pmap gives the numbers of one device on 8 simulated devices. (The mesh
path, 2 processes x 4 devices on localhost, is tested for every trainer in
tests/experiments/trainers_test.py.)

Each run is the real launcher on the tiny config in a subprocess, so that XLA_FLAGS and
`jax.distributed` take effect; the runs share the session's persistent compile cache.
"""

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 6
# Dropout off: pmap draws per-device masks, which a single device cannot reproduce.
BASE = [
    "--config=configs/full_ft_minilm.py:tiny",
    "--config.model.dropout_rate=0.0",
    f"--config.optim.num_steps={STEPS}",
]


def _launch(workdir, *extra, devices=1):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    args = [sys.executable, "-m", "experiments.main", *BASE, f"--workdir={workdir}", *extra]
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _result(workdir):
    workdir = pathlib.Path(workdir)
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    path = (workdir / "checkpoints" / str(STEPS) / "default").resolve()
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        # Saved on several devices: restore onto this process's one device.
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
            ckptr.metadata(path).item_metadata.tree,
        )
        state = ckptr.restore(path, target)
    return np.array(losses), state["trainable"]


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device")
    _finish(_launch(workdir))
    return _result(workdir)


# pmap has no multi-process form here, so it runs on 8 devices of one process.
def test_eight_devices_with_pmap_equal_one(single_device, tmp_path):
    _finish(_launch(tmp_path, "--config.parallel.mode=pmap", devices=8))
    losses, params = _result(tmp_path)
    ref_losses, ref_params = single_device
    assert len(losses) == STEPS
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(params, ref_params, rtol=1e-4, atol=1e-5)
