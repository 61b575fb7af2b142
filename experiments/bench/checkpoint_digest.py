"""What the per-leaf checksums cost a checkpoint: save and restore with and without them.

    .venv/bin/python -m experiments.bench.checkpoint_digest   # -> checkpoint_digest.jsonl

`ftlab.core.checkpoint.Checkpointer` records each leaf's sha256 at save and checks it at restore
(issue 18: flipped bytes inside large arrays restored silently before). The state is a full
fine-tuning state of MiniLM's shape: the 22.7M float32 parameters and Adam's two moments (about
272 MB). Variants, in one process, interleaved over ``--reps`` rounds after one warm-up round:

- ``digests``: the Checkpointer as it is;
- ``no_digests``: the same with the digest step replaced by an empty record (what orbax alone
  costs; restore then skips the check, as for checkpoints written before digests existed).

Each round saves one step (timed until the files are finished) and restores it (timed until
the arrays are on the device). The lines report medians and the ratios digests / no_digests.
"""

from __future__ import annotations

import pathlib
import statistics
import tempfile
import time
from unittest import mock

import jax
import numpy as np
from absl import app, flags

from experiments.bench import common
from ftlab.core import checkpoint

_REPS = flags.DEFINE_integer("reps", 5, "Timed rounds (after one warm-up round).")
_PARAMS = flags.DEFINE_integer("params", 22_713_216, "Parameters (MiniLM-L6: 22.7M).")
_OUT = flags.DEFINE_string(
    "out", "experiments/bench/checkpoint_digest.jsonl", "Where to write the lines."
)


def _state(num_params: int) -> dict:
    # MiniLM-like leaves: a large embedding, then 384x1536 and 384x384 kernels, in float32.
    rng = np.random.default_rng(0)
    leaves, left, i = {}, num_params, 0
    for shape in [(30522, 384)] + [(384, 1536), (1536, 384), (384, 384)] * 200:
        size = int(np.prod(shape))
        if size > left:
            continue
        leaves[f"w{i}"] = rng.standard_normal(shape, np.float32)
        left, i = left - size, i + 1
    params = jax.device_put(leaves)
    return {"params": params, "mu": jax.tree.map(lambda x: x * 0.1, params), "nu": params}


def _round(state, root: pathlib.Path, step: int, *, digests: bool) -> tuple[float, float]:
    patch = (
        mock.patch.object(checkpoint, "_leaf_digests", lambda tree: {})
        if not digests
        else mock.patch.object(checkpoint, "_leaf_digests", checkpoint._leaf_digests)
    )
    with patch, checkpoint.Checkpointer(root, max_to_keep=1, save_every_steps=1) as ckpt:
        start = time.perf_counter()
        ckpt.save(step, state)
        ckpt.wait_until_finished()
        save_s = time.perf_counter() - start
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        start = time.perf_counter()
        restored, got = ckpt.restore_latest(abstract)
        jax.block_until_ready(restored)
        restore_s = time.perf_counter() - start
    assert got == step
    return save_s, restore_s


def main(argv):
    del argv
    state = _state(_PARAMS.value)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    times = {"digests": [], "no_digests": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(_REPS.value + 1):
            for variant in times:
                got = _round(
                    state, pathlib.Path(tmp) / variant, rep + 1, digests=variant == "digests"
                )
                if rep:  # the first round warms up orbax and the file cache
                    times[variant].append(got)
    lines = []
    for variant, rounds in times.items():
        save, restore = (statistics.median(x) for x in zip(*rounds, strict=True))
        lines.append(
            {
                "bench": "checkpoint_digest",
                "variant": variant,
                "state_mb": round(nbytes / 1e6, 1),
                "save_s": round(save, 4),
                "restore_s": round(restore, 4),
                "reps": _REPS.value,
            }
        )
    base = lines[1]
    lines[0]["save_vs_no_digests"] = round(lines[0]["save_s"] / base["save_s"], 3)
    lines[0]["restore_vs_no_digests"] = round(lines[0]["restore_s"] / base["restore_s"], 3)
    common.write_lines(lines, _OUT.value)


if __name__ == "__main__":
    app.run(main)
