"""Multi-task learning over a partition: hard sharing, soft sharing, loss weighting.

One parameter tree holds every task. Partition rules (`ftlab.core.partition`) give each leaf one of
three labels:

    task    one copy per task, stacked on a leading task axis: leaf shape [T, ...]
    shared  one copy used by every task, trained
    frozen  one copy used by every task, never updated (bit-identical)

so the classic set-ups are just rule lists over the same network::

    independent / soft sharing:  [(".*", "task")]
    hard sharing (Caruana 1997):  [("head/.*", "task"), (".*", "shared")]
    LoRA per task, frozen trunk:  [(".*/lora_(a|b)|head/.*", "task"), (".*", "frozen")]

The forward pass of all tasks is one `jax.vmap` over the task axis of per-task leaves and of the
batch, with shared and frozen leaves broadcast (`in_axes=None`)::

    label_tree = partition.labels(jax.eval_shape(init_fn, rng), rules)
    params = multitask.init(init_fn, rng, label_tree, num_tasks=T)   # or multitask.stack(...)
    losses = multitask.per_task(task_loss, params, label_tree, batch)     # [T]
    loss = multitask.uncertainty_weighted(losses, log_var, kinds="classification")
    loss += multitask.pairwise_penalty(multitask.select(params, label_tree), lam)

Tasks of different sizes share one padded batch: every batch leaf is ``[T, B, ...]`` and
``batch["mask"]`` ``[T, B]`` marks the real rows of each task (see `masked_mean`).

References:
  Caruana 1997, Multitask learning. Kendall, Gal & Cipolla 2018, Multi-task learning using
  uncertainty to weigh losses, https://arxiv.org/abs/1705.07115. Evgeniou & Pontil 2004,
  Regularized multi-task learning (the pairwise penalty). Ruder 2017, an overview of multi-task
  learning in deep neural networks, https://arxiv.org/abs/1706.05098.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftlab.core import partition
from ftlab.types import Params, PRNGKey, PyTree

__all__ = [
    "FROZEN",
    "KINDS",
    "LABELS",
    "SHARED",
    "TASK",
    "check_labels",
    "check_task_shapes",
    "constant_metrics",
    "init",
    "lambda_matrix",
    "masked_mean",
    "pairwise_penalty",
    "per_example_loss",
    "per_task",
    "sampler",
    "select",
    "stack",
    "task_axes",
    "task_metrics",
    "uncertainty_factors",
    "uncertainty_weighted",
    "weighted_sum",
]

TASK = "task"
SHARED = "shared"
FROZEN = partition.FROZEN
LABELS = (TASK, SHARED, FROZEN)
# Kendall et al. 2018, eqs. (7) and (10): the factor on exp(-log_var) * loss per task kind.
KINDS = {"regression": 0.5, "classification": 1.0}


def check_labels(label_tree: Mapping, *, what: str = "label_tree") -> None:
    """Raises unless every label is one of `LABELS`, naming the first offending leaf path."""
    for name, label in partition.flatten(label_tree).items():
        if label not in LABELS:
            raise ValueError(
                f"{what}: leaf {name!r} has label {label!r}; multi-task rules label every leaf "
                f"one of {LABELS} (per-task stacked, shared trained, shared frozen)."
            )


def task_axes(label_tree: Mapping, *, what: str = "label_tree") -> dict:
    """The `jax.vmap` ``in_axes`` tree: 0 for per-task leaves, None for shared and frozen ones.

    >>> task_axes({"head": {"kernel": "task"}, "trunk": {"kernel": "shared"}})
    {'head': {'kernel': 0}, 'trunk': {'kernel': None}}
    """
    check_labels(label_tree, what=what)
    return jax.tree.map(lambda label: 0 if label == TASK else None, label_tree)


def init(
    init_fn: Callable[[PRNGKey], Params], rng: PRNGKey, label_tree: Mapping, *, num_tasks: int
) -> dict:
    """Initialises a multi-task tree: per-task leaves stacked, shared and frozen leaves once.

    Task ``t``'s per-task leaves are ``init_fn(split(rng, T)[t])``'s; shared and frozen leaves are
    task 0's, so every task starts from its own random draw of what it owns.

    Args:
      init_fn: ``init_fn(rng) -> params`` for one task, e.g.
        ``lambda r: model.init(r, x)["params"]``.
      rng: a PRNG key.
      label_tree: the labels of ``init_fn``'s tree, from `partition.labels` (on `jax.eval_shape`).
      num_tasks: T, the size of the task axis.

    Returns:
      The tree with per-task leaves of shape ``[T, *leaf.shape]``.
    """
    check_labels(label_tree)
    # One compiled init rather than op-by-op vmapped dispatch (seconds for a small MLP on a CPU).
    stacked = jax.jit(jax.vmap(init_fn))(jax.random.split(rng, num_tasks))
    flat_labels = partition.flatten(label_tree)
    return partition.unflatten(
        {
            name: leaf if flat_labels[name] == TASK else leaf[0]
            for name, leaf in partition.flatten(stacked).items()
        }
    )


def stack(params: Params, label_tree: Mapping, *, num_tasks: int) -> dict:
    """Gives every per-task leaf a task axis by copying it T times; shared and frozen stay as is.

    For a tree that already exists (a pretrained trunk with LoRA leaves and a head, say), where
    every task should start from the same values. `init` draws a fresh init per task instead.

    Returns:
      The tree with per-task leaves of shape ``[T, *leaf.shape]``.
    """
    check_labels(label_tree)
    flat_labels = partition.flatten(label_tree)
    return partition.unflatten(
        {
            name: jnp.broadcast_to(leaf, (num_tasks, *np.shape(leaf)))
            if flat_labels[name] == TASK
            else leaf
            for name, leaf in partition.flatten(params).items()
        }
    )


def select(params: Params, label_tree: Mapping, label: str = TASK) -> dict:
    """The subtree of leaves with ``label`` (by default the per-task ones, for the penalty).

    >>> labels = {"head": {"w": "task"}, "trunk": {"w": "shared"}}
    >>> select({"head": {"w": 1}, "trunk": {"w": 2}}, labels)
    {'head': {'w': 1}}
    """
    flat_labels = partition.flatten(label_tree)
    return partition.unflatten(
        {k: v for k, v in partition.flatten(params).items() if flat_labels[k] == label}
    )


def check_task_shapes(
    params: Params, label_tree: Mapping, batch: PyTree, *, what: str = "batch"
) -> int:
    """Checks that per-task leaves and every batch leaf share one leading task axis; returns T.

    Raises:
      ValueError: naming the first leaf or batch key whose leading dimension is not T (the
        task count taken from the first per-task leaf, or from the batch if there is none).
    """
    flat_labels = partition.flatten(label_tree)
    task_leaves = {
        name: np.shape(leaf)
        for name, leaf in partition.flatten(params).items()
        if flat_labels.get(name) == TASK
    }
    batch_leaves = {
        f"{what}[{name!r}]": np.shape(leaf) for name, leaf in partition.flatten(batch).items()
    }
    if not batch_leaves:
        raise ValueError(f"{what} is empty; expected arrays of shape [num_tasks, batch, ...].")
    everything = {**{f"params leaf {k!r}": v for k, v in task_leaves.items()}, **batch_leaves}
    first, first_shape = next(iter(everything.items()))
    if not first_shape:
        raise ValueError(f"{first} is a scalar; expected a leading task axis [num_tasks, ...].")
    num_tasks = first_shape[0]
    for name, shape in everything.items():
        if not shape or shape[0] != num_tasks:
            raise ValueError(
                f"{name} has shape {tuple(shape)}; expected a leading task axis of size "
                f"{num_tasks} (as {first} has, shape {tuple(first_shape)}): per-task parameters "
                "are [num_tasks, ...] and batches [num_tasks, batch, ...], padded with "
                "batch['mask'] for tasks with fewer rows."
            )
    return num_tasks


def per_task(
    fn: Callable[[Params, PyTree], PyTree], params: Params, label_tree: Mapping, batch: PyTree
) -> PyTree:
    """Evaluates ``fn(task_params, task_batch)`` for every task at once with `jax.vmap`.

    Args:
      fn: one task's function, e.g. its masked mean loss or its predictions; it sees per-task
        leaves without their task axis and shared/frozen leaves as they are.
      params: the multi-task tree (per-task leaves ``[T, ...]``).
      label_tree: labels from `partition.labels` (`TASK`, `SHARED` or `FROZEN`).
      batch: a pytree of ``[T, B, ...]`` arrays (``B`` may be padding; see `masked_mean`).

    Returns:
      ``fn``'s outputs stacked on a leading task axis, e.g. per-task losses ``[T]``.
    """
    check_task_shapes(params, label_tree, batch)
    return jax.vmap(fn, in_axes=(task_axes(label_tree), 0))(params, batch)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``values`` over the rows where ``mask`` is 1, 0 if there are none.

    Args:
      values: ``[..., B]`` per-example values.
      mask: ``[..., B]`` 1 for real rows, 0 for padding.

    Returns:
      ``[...]``: one mean per leading index (per task when given ``[T, B]``).

    >>> masked_mean(jnp.array([[1.0, 3.0, 99.0], [2.0, 0.0, 0.0]]),
    ...             jnp.array([[1, 1, 0], [1, 0, 0]])).tolist()
    [2.0, 2.0]
    """
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def weighted_sum(
    losses: jax.Array, weights: jax.Array | Sequence[float] | None = None
) -> jax.Array:
    """``sum_t w_t L_t``; uniform (all ones) when ``weights`` is None.

    Args:
      losses: ``[T]`` per-task losses.
      weights: ``[T]`` task weights, or None.
    """
    if weights is None:
        return jnp.sum(losses)
    weights = jnp.asarray(weights, losses.dtype)
    if weights.shape != losses.shape:
        raise ValueError(f"task weights have shape {weights.shape}; expected {losses.shape} (T,)")
    return jnp.sum(weights * losses)


def uncertainty_factors(kinds: str | Sequence[str], num_tasks: int) -> np.ndarray:
    """``[T]`` factors c_t: 1/2 for regression, 1 for classification tasks (Kendall eqs. 7, 10).

    Raises:
      ValueError: a kind is unknown, or the sequence of kinds is not T long.
    """
    if isinstance(kinds, str):
        kinds = [kinds] * num_tasks
    kinds = list(kinds)
    if len(kinds) != num_tasks:
        raise ValueError(f"uncertainty kinds: got {len(kinds)} kinds for {num_tasks} tasks")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"uncertainty kinds: unknown {bad[0]!r}; expected one of {sorted(KINDS)}")
    return np.array([KINDS[k] for k in kinds], np.float32)


def uncertainty_weighted(
    losses: jax.Array, log_var: jax.Array, *, kinds: str | Sequence[str]
) -> jax.Array:
    """Homoscedastic uncertainty weighting: ``sum_t c_t exp(-s_t) L_t + s_t / 2``.

    With ``s_t = log sigma_t^2`` a trainable leaf (start it at 0), this is Kendall et al.'s
    ``L_t / (2 sigma_t^2) + log sigma_t`` for a Gaussian regression loss ``L_t`` (c = 1/2, eq. 7)
    and ``L_t / sigma_t^2 + log sigma_t`` for a softmax/sigmoid cross-entropy (c = 1, eq. 10).
    Learning ``s`` rather than ``sigma`` keeps the weights positive without a constraint and is
    the parametrisation the paper trains (Sec. 3.2).

    Args:
      losses: ``[T]`` per-task losses (e.g. mean squared error, mean cross-entropy).
      log_var: ``[T]`` learned log-variances ``s_t``.
      kinds: "regression", "classification", or one of those per task.

    Returns:
      The scalar total loss.

    References:
      Kendall, Gal & Cipolla 2018, https://arxiv.org/abs/1705.07115.

    >>> float(uncertainty_weighted(jnp.array([2.0]), jnp.array([0.0]), kinds="regression"))
    1.0
    """
    if losses.shape != log_var.shape or losses.ndim != 1:
        raise ValueError(
            f"uncertainty log_var has shape {log_var.shape}; expected one per task, {losses.shape}"
        )
    c = jnp.asarray(uncertainty_factors(kinds, losses.shape[0]), losses.dtype)
    return jnp.sum(c * jnp.exp(-log_var) * losses + 0.5 * log_var)


def lambda_matrix(
    value: float | Sequence[Sequence[float]] | np.ndarray,
    *,
    num_tasks: int,
    what: str = "value",
) -> np.ndarray:
    """Validates the pairwise coupling ``lambda`` as a symmetric non-negative ``[T, T]`` matrix.

    A scalar ``c`` means ``c`` for every pair: ``c * (1 - I)``. The diagonal couples a task with
    itself, where ``||theta_t - theta_t||^2 = 0``: it has no effect, and is set to 0.

    Args:
      value: a scalar or a ``[T, T]`` nested sequence / array.
      num_tasks: T.
      what: how errors name ``value`` (a caller may pass its config key).

    Returns:
      A float32 ``[T, T]`` numpy array with zero diagonal.

    >>> lambda_matrix(0.1, num_tasks=2).tolist()
    [[0.0, 0.10000000149011612], [0.10000000149011612, 0.0]]

    Raises:
      ValueError: wrong shape, not symmetric, negative or non-finite entries.
    """
    lam = np.asarray(value, np.float64)
    if lam.ndim == 0:
        lam = np.full((num_tasks, num_tasks), float(lam))
    if lam.shape != (num_tasks, num_tasks):
        raise ValueError(
            f"{what} has shape {lam.shape}; expected a scalar or a [T, T] = "
            f"[{num_tasks}, {num_tasks}] matrix for the {num_tasks} tasks."
        )
    if not np.all(np.isfinite(lam)) or np.any(lam < 0):
        raise ValueError(f"{what} must be finite and non-negative; min is {np.min(lam)}")
    if not np.allclose(lam, lam.T, rtol=1e-6, atol=0.0):
        t, u = np.unravel_index(np.argmax(np.abs(lam - lam.T)), lam.shape)
        raise ValueError(
            f"{what} must be symmetric: [{t}, {u}] = {lam[t, u]} but [{u}, {t}] = {lam[u, t]}"
        )
    np.fill_diagonal(lam, 0.0)
    return lam.astype(np.float32)


def pairwise_penalty(stacked: PyTree, lam: jax.Array) -> jax.Array:
    """``sum_{t<u} lambda_{t,u} ||theta_t - theta_u||^2`` over all leaves, in closed form.

    Expanding the square, with row sums ``r = lambda 1`` and Gram matrix ``G = Theta Theta^T``
    of the flattened leaf ``Theta`` ``[T, P]``, the sum over pairs is
    ``sum_t r_t |theta_t|^2 - sum_{t,u} lambda_{t,u} G_{t,u}``: one ``[T, T]`` matmul per leaf and
    no loop over pairs. The penalty does not change when every task moves by the same vector, so
    each leaf is first centred on its task mean: the two terms are then of the size of the
    differences rather than of the weights, which keeps the subtraction accurate in float32.

    Args:
      stacked: a pytree of ``[T, ...]`` per-task leaves (e.g. `select`'s output).
      lam: ``[T, T]`` symmetric, non-negative, zero diagonal (see `lambda_matrix`).

    Returns:
      The scalar penalty (0 for an empty tree).

    References:
      Evgeniou & Pontil 2004, Regularized multi-task learning (KDD).

    >>> theta = {"w": jnp.array([[0.0], [1.0], [3.0]])}  # pairs: 1 + 9 + 4
    >>> round(float(pairwise_penalty(theta, jnp.ones((3, 3)))), 4)
    14.0
    """
    lam = jnp.asarray(lam)
    num_tasks = lam.shape[0]
    if lam.shape != (num_tasks, num_tasks):
        raise ValueError(f"pairwise_penalty: lambda has shape {lam.shape}; expected [T, T]")
    # The self-pairs contribute nothing; zero them so a traced lambda need not be pre-validated.
    lam = lam * (1.0 - jnp.eye(num_tasks, dtype=lam.dtype))
    row_sums = jnp.sum(lam, axis=1)
    total = jnp.zeros((), lam.dtype)
    for name, leaf in partition.flatten(stacked).items():
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] != num_tasks:
            raise ValueError(
                f"pairwise_penalty: leaf {name!r} has shape {np.shape(leaf)}; expected a leading "
                f"task axis of size {num_tasks} (lambda is [{num_tasks}, {num_tasks}])."
            )
        theta = jnp.reshape(leaf, (num_tasks, -1))
        theta = theta - jnp.mean(theta, axis=0, keepdims=True)
        # HIGHEST: TPU/GPU default f32 matmuls round to bf16/tf32, and the two terms cancel.
        gram = jnp.matmul(theta, theta.T, precision=jax.lax.Precision.HIGHEST)
        total = total + jnp.sum(row_sums * jnp.diagonal(gram)) - jnp.sum(lam * gram)
    return total


# -- per-task losses, batches and metrics ----------------------------------------------------


def per_example_loss(kind: str, pred: jax.Array, y: jax.Array) -> jax.Array:
    """Sigmoid cross-entropy of logits against 0/1 targets (``"classification"``), else the
    squared error."""
    if kind == "classification":
        return optax.sigmoid_binary_cross_entropy(pred, y)
    return jnp.square(pred - y)


def sampler(split: Mapping[str, np.ndarray], batch_size: int):
    """``sample(rng) -> batch``: the full padded split (batch_size 0) or per-task rows.

    ``split`` holds ``[T, N, ...]`` arrays whose real rows come first, as ``split["mask"]``
    ``[T, N]`` marks them. Minibatches draw ``batch_size`` rows per task uniformly with
    replacement from that task's real rows.
    """
    arrays = {k: jnp.asarray(v) for k, v in split.items()}
    if batch_size == 0:
        return lambda rng: arrays
    counts = jnp.sum(arrays["mask"] > 0, axis=1).astype(jnp.float32)

    def sample(rng):
        u = jax.random.uniform(rng, (counts.shape[0], batch_size))
        # Rows [0, count_t) are task t's real rows: index them uniformly, never the padding.
        idx = jnp.minimum(jnp.floor(u * counts[:, None]), counts[:, None] - 1).astype(jnp.int32)
        return {
            k: jnp.take_along_axis(v, idx.reshape(idx.shape + (1,) * (v.ndim - 2)), axis=1)
            for k, v in arrays.items()
        }

    return sample


def task_metrics(
    kind: str, pred: np.ndarray, y: np.ndarray, mask: np.ndarray, *, y_std: float = 1.0
) -> dict:
    """Per-task metrics of predictions: accuracy and F1 (classification) or MSE (regression).

    Args:
      kind: ``"classification"`` (``pred`` are logits, ``y`` 0/1) or ``"regression"``.
      pred, y, mask: ``[T, N]`` predictions, targets and real-row mask (padding 0).
      y_std: the targets' standard deviation: MSE is reported in raw units (``y`` standardised).

    Returns:
      ``{"per_task": {metric: [T floats]}, "mean": {metric: float}}``; regression adds
      ``pooled_mse`` (over all real rows) to the means.

    >>> r = task_metrics("classification", np.array([[1.0, -1.0]]), np.array([[1.0, 1.0]]),
    ...                  np.ones((1, 2)))
    >>> r["per_task"]["accuracy"], r["mean"]["f1"]
    ([0.5], 0.6666666666666666)
    """
    mask = mask > 0
    if kind == "classification":
        hit = (pred > 0) == (y > 0.5)
        tp = np.sum((pred > 0) & (y > 0.5) & mask, axis=1)
        fp = np.sum((pred > 0) & (y < 0.5) & mask, axis=1)
        fn = np.sum((pred <= 0) & (y > 0.5) & mask, axis=1)
        accuracy = np.sum(hit & mask, axis=1) / np.sum(mask, axis=1)
        # F1 of a task with no predicted and no true positives is 0 (sklearn's zero_division=0).
        f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
        per_task = {"accuracy": accuracy, "f1": f1}
        mean = {"accuracy": float(accuracy.mean()), "f1": float(f1.mean())}
    else:
        sq = np.square(pred - y) * mask * y_std**2
        mse = sq.sum(axis=1) / mask.sum(axis=1)
        per_task = {"mse": mse}
        mean = {"mse": float(mse.mean()), "pooled_mse": float(sq.sum() / mask.sum())}
    return {
        "per_task": {k: [float(v) for v in vals] for k, vals in per_task.items()},
        "mean": mean,
    }


def constant_metrics(data) -> dict:
    """`task_metrics` on ``data.test`` of the constant predictor of each task: its train
    majority class (classification), or the train mean (regression: 0, the targets being
    standardised on the train split).

    Args:
      data: A `ftlab.data.multitask.TaskData`.
    """
    if data.kind == "classification":
        train = data.train
        share = (train.y * train.mask).sum(axis=1, keepdims=True) / train.mask.sum(
            axis=1, keepdims=True
        )
        majority = np.where(share > 0.5, 1.0, -1.0)  # of the real rows, not the padding
        constant = np.broadcast_to(majority, data.test.y.shape)
    else:
        constant = np.zeros_like(data.test.y)
    return task_metrics(data.kind, constant, data.test.y, data.test.mask, y_std=data.y_std)
