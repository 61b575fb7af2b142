"""Sinusoid regression tasks, sampled exactly as in Finn et al. (2017), section 5.1.

A task is ``y = amplitude * sin(x - phase)`` with amplitude uniform in [0.1, 5.0], phase uniform
in [0, pi] and inputs uniform in [-5, 5] (as in the authors' code, ``data_generator.py``). A batch
of tasks is a pure function of ``(seed, index)``, so a resumed run sees the same tasks and a
held-out evaluation set is just another seed.

References:
    Finn et al., "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
    https://arxiv.org/abs/1703.03400
"""

from __future__ import annotations

import numpy as np

__all__ = ["AMPLITUDE", "PHASE", "X_RANGE", "sample", "curve"]


AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, np.pi)
X_RANGE = (-5.0, 5.0)


def sample(
    seed: int, index: int, *, num_tasks: int, shots: int, query_shots: int
) -> dict[str, dict[str, np.ndarray]]:
    """Samples ``num_tasks`` sinusoid tasks with a support and a query set each.

    Args:
      seed: the stream's seed (training and evaluation use different seeds).
      index: which batch of the stream (e.g. the meta-step number).
      num_tasks: tasks in the batch (the meta-batch size).
      shots: support points per task (K).
      query_shots: query points per task.

    Returns:
      ``{"support": {"x", "y"}, "query": {"x", "y"}, "task": {"amplitude", "phase"}}`` with
      ``x, y`` float32 ``[num_tasks, shots or query_shots, 1]`` and ``amplitude, phase``
      float32 ``[num_tasks]``.

    >>> t = sample(0, 0, num_tasks=2, shots=5, query_shots=3)
    >>> t["support"]["x"].shape, t["query"]["y"].shape, t["task"]["phase"].shape
    ((2, 5, 1), (2, 3, 1), (2,))
    """
    for name, v in (("num_tasks", num_tasks), ("shots", shots), ("query_shots", query_shots)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"sinusoid.sample: {name}={v!r}; expected a positive integer")
    rng = np.random.default_rng([seed, index])
    amplitude = rng.uniform(*AMPLITUDE, size=num_tasks)
    phase = rng.uniform(*PHASE, size=num_tasks)
    x = rng.uniform(*X_RANGE, size=(num_tasks, shots + query_shots, 1))
    y = amplitude[:, None, None] * np.sin(x - phase[:, None, None])
    x, y = x.astype(np.float32), y.astype(np.float32)
    return {
        "support": {"x": x[:, :shots], "y": y[:, :shots]},
        "query": {"x": x[:, shots:], "y": y[:, shots:]},
        "task": {"amplitude": amplitude.astype(np.float32), "phase": phase.astype(np.float32)},
    }


def curve(amplitude: float, phase: float, x: np.ndarray) -> np.ndarray:
    """The task's true function at ``x``."""
    return amplitude * np.sin(x - phase)
