"""Data parallelism gives the numbers of one device: 8 simulated devices with pmap, and a mesh of
2 processes x 4 devices on localhost (the multi-host path of a Cloud TPU slice).

Each run is the real launcher on the tiny config in a subprocess, so that XLA_FLAGS and
`jax.distributed` take effect; the runs share the session's persistent compile cache.
"""

import json
import os
import pathlib
import socket
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


def _launch(workdir, *extra, devices=1, process_id=None, port=None):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    args = [sys.executable, "-m", "experiments.main", *BASE, f"--workdir={workdir}", *extra]
    if process_id is not None:
        args += [
            "--config.parallel.multihost=True",
            f"--config.parallel.coordinator_address=127.0.0.1:{port}",
            "--config.parallel.num_processes=2",
            f"--config.parallel.process_id={process_id}",
        ]
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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The mesh (jit + NamedSharding) path over 8 devices is the multi-process test below: 2 processes
# x 4 devices, one global mesh. pmap has no multi-process form here, so it runs on 8 devices alone.
def test_eight_devices_with_pmap_equal_one(single_device, tmp_path):
    _finish(_launch(tmp_path, "--config.parallel.mode=pmap", devices=8))
    losses, params = _result(tmp_path)
    ref_losses, ref_params = single_device
    assert len(losses) == STEPS
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(params, ref_params, rtol=1e-4, atol=1e-5)


def test_two_processes_of_four_devices_equal_one(single_device, tmp_path):
    port = _free_port()
    procs = [_launch(tmp_path, devices=4, process_id=i, port=port) for i in range(2)]
    outs = [_finish(p) for p in procs]
    assert "devices: 8" in outs[0], outs[0][-2000:]
    losses, params = _result(tmp_path)
    ref_losses, ref_params = single_device
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(params, ref_params, rtol=1e-4, atol=1e-5)
