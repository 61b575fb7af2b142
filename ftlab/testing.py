"""Small helpers for tests of models and methods: fixed batches and random parameter trees."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import numpy as np

from ftlab.core import partition
from ftlab.models import bert
from ftlab.types import Params

__all__ = [
    "assert_trains_only",
    "classifier_batch",
    "jaxpr_output_shapes",
    "random_params",
    "run_on_simulated_devices",
]


def classifier_batch(
    config: bert.BertConfig, *, seed: int = 0, n: int = 4, seq: int = 7, num_classes: int = 3
) -> dict[str, np.ndarray]:
    """A fixed classification batch; row 0 is padded after 5 tokens, so masks matter."""
    rng = np.random.default_rng(seed)
    mask = np.ones((n, seq), np.int32)
    mask[0, 5:] = 0
    return {
        "input_ids": rng.integers(1, config.vocab_size, size=(n, seq)).astype(np.int32),
        "attention_mask": mask,
        "label": rng.integers(0, num_classes, size=(n,)).astype(np.int32),
    }


def random_params(
    model: nn.Module, batch: dict[str, np.ndarray], *, seed: int = 0, std: float = 0.1
) -> Params:
    """Random numpy leaves with the shapes of ``model.init`` (LayerNorm scales are ones).

    Cheaper than ``model.init``, whose compilation costs seconds on a small CPU.
    """
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), batch["input_ids"], batch["attention_mask"]
    )
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        if partition.path_name(path).endswith("layer_norm/scale"):
            return np.ones(s.shape, np.float32)
        return rng.normal(scale=std, size=s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes["params"])


def assert_trains_only(params, label_tree, tx, apply, batch, *, steps: int, opt_slots: int = 2):
    """Trains ``steps`` compiled steps on one batch and checks what a partition promises.

    The optimizer holds ``opt_slots`` values per trainable parameter plus a step count and
    nothing for frozen leaves; the loss goes down; frozen leaves stay bit-identical; every
    trainable leaf moves. Returns the final `TrainState`.
    """
    from ftlab.core import train  # noqa: PLC0415
    from ftlab.tasks import classification  # noqa: PLC0415

    trainable0, frozen0 = partition.split(jax.tree.map(np.array, params), label_tree)
    state = train.init_state(params, label_tree, tx, seed=0)
    opt_size = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
    assert opt_size == opt_slots * partition.count(trainable0) + 1, opt_size
    step = jax.jit(train.make_train_step(classification.make_loss_fn(apply), tx), donate_argnums=0)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["train/loss"]))
    assert losses[-1] < losses[0], losses
    chex.assert_trees_all_equal(state.frozen, frozen0)
    for name, leaf in partition.flatten(state.trainable).items():
        assert not np.array_equal(leaf, partition.flatten(trainable0)[name]), name
    return state


def jaxpr_output_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every equation's outputs, recursing into sub-jaxprs (pjit, custom_jvp, ...).

    The check that a frozen kernel gets no dense gradient: no output of the gradient's jaxpr may
    have the kernel's shape.
    """
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars]
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    shapes += jaxpr_output_shapes(inner)
    return shapes


def run_on_simulated_devices(
    code: str, *args: str, devices: int = 8, root: str | os.PathLike, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Runs ``python -c code *args`` in a subprocess with ``devices`` simulated CPU devices.

    ``XLA_FLAGS`` only takes effect before JAX starts, hence the subprocess. Raises an
    AssertionError with the end of the child's stderr when it fails.
    """
    env = dict(os.environ)
    # appended: the caller's own XLA flags still apply
    flags = f"--xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(pathlib.Path(root))
    # small compiles are cached too, as in the test process (jax's default is 1 s)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
