"""Multi-task learning: the pairwise penalty, uncertainty weighting, padded tasks, frozen leaves."""

import itertools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftlab import multitask
from ftlab.core import partition, train
from ftlab.peft import lora

T = 3
SIZES = (5, 2, 7)  # tasks of different sizes, padded to 7
DIM = 4


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(6, name="trunk_0")(x))
        x = nn.relu(nn.Dense(5, name="trunk_1")(x))
        return nn.Dense(1, name="head")(x)[..., 0]


NET = _Net()
HARD = [("head/.*", multitask.TASK), (".*", multitask.SHARED)]
INDEPENDENT = [(".*", multitask.TASK)]
FROZEN_TRUNK0 = [
    ("head/.*", multitask.TASK),
    ("trunk_0/.*", multitask.FROZEN),
    (".*", multitask.SHARED),
]


def _init_fn(rng):
    return NET.init(rng, jnp.zeros((1, DIM)))["params"]


def _multitask_params(rules, seed=0):
    rng = jax.random.PRNGKey(seed)
    label_tree = partition.labels(jax.eval_shape(_init_fn, rng), rules)
    return multitask.init(_init_fn, rng, label_tree, num_tasks=T), label_tree


@pytest.fixture(scope="module")
def hard():
    return _multitask_params(HARD)


@pytest.fixture(scope="module")
def independent():
    return _multitask_params(INDEPENDENT)


def _task_data(seed=0):
    """Per-task unpadded (x, y) lists and the padded batch, with garbage in the padding."""
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(n, DIM)).astype(np.float32) for n in SIZES]
    ys = [rng.normal(size=(n,)).astype(np.float32) for n in SIZES]
    width = max(SIZES)
    batch = {
        "x": np.full((T, width, DIM), 1e3, np.float32),
        "y": np.full((T, width), -1e3, np.float32),
        "mask": np.zeros((T, width), np.float32),
    }
    for t, n in enumerate(SIZES):
        batch["x"][t, :n], batch["y"][t, :n], batch["mask"][t, :n] = xs[t], ys[t], 1.0
    return xs, ys, batch


def _task_loss(params, batch):
    err = jnp.square(NET.apply({"params": params}, batch["x"]) - batch["y"])
    return multitask.masked_mean(err, batch["mask"])


def _numpy_net(p, x):
    """_Net's forward pass in plain numpy, the reference."""
    p = jax.tree.map(np.asarray, p)
    x = np.maximum(x @ p["trunk_0"]["kernel"] + p["trunk_0"]["bias"], 0)
    x = np.maximum(x @ p["trunk_1"]["kernel"] + p["trunk_1"]["bias"], 0)
    return (x @ p["head"]["kernel"] + p["head"]["bias"])[:, 0]


def _params_of_task(params, label_tree, t):
    labels = partition.flatten(label_tree)
    return partition.unflatten(
        {
            k: v[t] if labels[k] == multitask.TASK else v
            for k, v in partition.flatten(params).items()
        }
    )


# -- the pairwise penalty -------------------------------------------------------------------------


def _direct_penalty(stacked, lam):
    """sum_{t<u} lam[t, u] ||theta_t - theta_u||^2 by a double loop over pairs."""
    total = 0.0
    for leaf in jax.tree.leaves(stacked):
        for t, u in itertools.combinations(range(lam.shape[0]), 2):
            total = total + lam[t, u] * jnp.sum(jnp.square(leaf[t] - leaf[u]))
    return total


def _random_lambda(num_tasks, seed):
    a = np.random.default_rng(seed).uniform(size=(num_tasks, num_tasks))
    lam = a + a.T
    np.fill_diagonal(lam, 0.0)
    return lam.astype(np.float32)


@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_pairwise_penalty_and_gradient_match_the_double_loop(offset):
    # offset: large shared weights with small differences, where an uncentred closed form loses
    # the answer to cancellation in float32 (its two terms are ~1e6 here, the penalty ~10).
    num_tasks = 5
    rng = np.random.default_rng(1)
    stacked = {
        "a": {"kernel": rng.normal(size=(num_tasks, 3, 2)) + offset},
        "b": rng.normal(size=(num_tasks, 4)),
    }
    lam = _random_lambda(num_tasks, seed=2)
    want = sum(
        lam[t, u] * np.sum(np.square(x[t] - x[u]))
        for x in jax.tree.leaves(stacked)
        for t, u in itertools.combinations(range(num_tasks), 2)
    )
    stacked32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), stacked)
    got = jax.jit(multitask.pairwise_penalty)(stacked32, lam)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    grad = jax.jit(jax.grad(multitask.pairwise_penalty))(stacked32, lam)
    # d/d theta_t = 2 sum_u lam[t, u] (theta_t - theta_u), from the definition.
    want_grad = jax.tree.map(
        lambda x: 2 * np.einsum("tu,tu...->t...", lam, x[:, None] - x[None, :]), stacked
    )
    chex.assert_trees_all_close(grad, want_grad, atol=2e-3 * (1 + offset / 100), rtol=1e-4)
    chex.assert_trees_all_close(
        grad, jax.jit(jax.grad(_direct_penalty))(stacked32, lam), atol=2e-3 * (1 + offset / 100)
    )


def test_penalty_ignores_the_diagonal_and_is_zero_for_equal_tasks():
    penalty = jax.jit(multitask.pairwise_penalty)
    equal = {"w": np.tile(np.arange(6.0, dtype=np.float32), (4, 1))}
    assert float(penalty(equal, np.full((4, 4), 3.0, np.float32))) == 0.0
    y = {"w": np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)}
    lam = _random_lambda(4, seed=0)
    with_diag = lam + np.diag([5.0, 1.0, 2.0, 7.0]).astype(np.float32)
    np.testing.assert_allclose(penalty(y, with_diag), penalty(y, lam), rtol=1e-6)


def test_lambda_matrix_validates_and_expands_scalars():
    np.testing.assert_array_equal(
        multitask.lambda_matrix(0.5, num_tasks=3), 0.5 * (1 - np.eye(3, dtype=np.float32))
    )
    with pytest.raises(ValueError, match=r"config\.multitask\.lambdas\[1\].*\[3, 3\].*3 tasks"):
        multitask.lambda_matrix(np.ones((2, 2)), num_tasks=3, what="config.multitask.lambdas[1]")
    with pytest.raises(ValueError, match=r"symmetric: \[0, 1\] = 1.0 but \[1, 0\] = 2.0"):
        multitask.lambda_matrix([[0, 1], [2, 0]], num_tasks=2)
    with pytest.raises(ValueError, match="non-negative"):
        multitask.lambda_matrix(-1.0, num_tasks=2)


def test_penalty_rejects_a_lambda_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"leaf 'head/kernel' has shape \(3, 5, 1\).*size 4"):
        multitask.pairwise_penalty({"head": {"kernel": jnp.zeros((3, 5, 1))}}, jnp.ones((4, 4)))


# -- uncertainty weighting ------------------------------------------------------------------------


def test_uncertainty_weighting_equals_the_hand_computed_value():
    # Task 0 (regression): 2.0 / (2 * 4) + log 2 = 0.25 + log 2   (sigma^2 = 4)
    # Task 1 (classification): 0.5 / 0.5 + log sqrt(0.5) = 1 - log(2) / 2   (sigma^2 = 0.5)
    losses = jnp.array([2.0, 0.5])
    log_var = jnp.log(jnp.array([4.0, 0.5]))
    got = multitask.uncertainty_weighted(losses, log_var, kinds=["regression", "classification"])
    np.testing.assert_allclose(float(got), 1.25 + 0.5 * math.log(2), rtol=1e-6)
    # Minimising over s_t gives sigma_t^2 = 2 c_t L_t: the loss's own scale (the paper's point).
    optimum = jnp.log(2 * jnp.array([0.5, 1.0]) * losses)
    grad = jax.grad(multitask.uncertainty_weighted, argnums=1)(
        losses, optimum, kinds=["regression", "classification"]
    )
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown 'ranking'"):
        multitask.uncertainty_weighted(losses, log_var, kinds="ranking")


# -- sharing over a partition ---------------------------------------------------------------------


def test_init_stacks_per_task_leaves_and_shares_the_rest(hard):
    params, label_tree = hard
    chex.assert_shape(params["head"]["kernel"], (T, 5, 1))
    chex.assert_shape(params["trunk_0"]["kernel"], (DIM, 6))
    assert not np.allclose(params["head"]["kernel"][0], params["head"]["kernel"][1])
    assert multitask.task_axes(label_tree)["head"] == {"bias": 0, "kernel": 0}
    assert list(multitask.select(params, label_tree)) == ["head"]


@pytest.mark.parametrize("sharing", ["hard", "independent"])
def test_padded_tasks_of_different_sizes_equal_each_task_computed_separately(sharing, request):
    params, label_tree = request.getfixturevalue(sharing)
    xs, ys, batch = _task_data()

    def total(p):
        return jnp.sum(multitask.per_task(_task_loss, p, label_tree, batch))

    def total_by_loop(p):
        return sum(
            jnp.mean(
                jnp.square(NET.apply({"params": _params_of_task(p, label_tree, t)}, xs[t]) - ys[t])
            )
            for t in range(T)
        )

    losses = jax.jit(lambda p: multitask.per_task(_task_loss, p, label_tree, batch))(params)
    chex.assert_shape(losses, (T,))
    for t in range(T):
        alone = np.mean(
            np.square(_numpy_net(_params_of_task(params, label_tree, t), xs[t]) - ys[t])
        )
        np.testing.assert_allclose(losses[t], alone, rtol=1e-5)
    chex.assert_trees_all_close(
        jax.jit(jax.grad(total))(params), jax.jit(jax.grad(total_by_loop))(params), rtol=1e-5
    )


def test_frozen_leaves_stay_bit_identical_while_shared_and_per_task_leaves_train():
    params, label_tree = _multitask_params(FROZEN_TRUNK0)
    _, _, batch = _task_data()
    tx = partition.optimizer(
        {multitask.TASK: optax.adam(1e-2), multitask.SHARED: optax.sgd(1e-2)}, label_tree
    )
    state = train.init_state(params, label_tree, tx, seed=0)
    assert set(state.frozen) == {"trunk_0"}

    def loss_fn(p, b, rng):
        del rng
        return jnp.sum(multitask.per_task(_task_loss, p, label_tree, b)), {}

    step = jax.jit(train.make_train_step(loss_fn, tx))
    for _ in range(3):
        state, _ = step(state, batch)
    after = state.params
    chex.assert_trees_all_equal(after["trunk_0"], params["trunk_0"])
    for name in ("trunk_1", "head"):
        assert not np.allclose(after[name]["kernel"], params[name]["kernel"])
    # Every task's head moved, each by its own gradient.
    moved = np.abs(after["head"]["kernel"] - params["head"]["kernel"]).reshape(T, -1).max(axis=1)
    assert np.all(moved > 0)


def test_bad_task_shapes_name_the_offending_leaf_or_key(hard):
    params, label_tree = hard
    _, _, batch = _task_data()
    short = dict(batch, y=batch["y"][:2])
    with pytest.raises(ValueError, match=r"batch\['y'\] has shape \(2, 7\).*task axis of size 3"):
        multitask.per_task(_task_loss, params, label_tree, short)
    with pytest.raises(ValueError, match=r"leaf 'head/bias' has label 'train'.*\('task'"):
        multitask.task_axes({"head": {"bias": "train"}})


def test_one_lora_per_task_on_a_frozen_trunk_equals_each_adapter_alone_and_keeps_it_frozen():
    # A single (unstacked) base network, LoRA on both trunk layers, then a task axis on the LoRA
    # factors and the head only: the composed example (one adapter per task, one frozen trunk).
    shapes = jax.eval_shape(_init_fn, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    base = jax.tree.map(lambda s: rng.normal(scale=0.5, size=s.shape).astype(np.float32), shapes)
    base = lora.init(base, jax.random.PRNGKey(1), targets=["trunk_0", "trunk_1"], rank=2, alpha=2)
    rules = [("head/.*", multitask.TASK), (".*/lora_(a|b)", multitask.TASK), (".*", "frozen")]
    label_tree = partition.labels(base, rules)
    params = multitask.stack(base, label_tree, num_tasks=T)
    # Distinct non-zero adapters per task, so that mixing tasks up would show.
    params["trunk_1"]["lora_b"] = rng.normal(size=(T, 2, 5)).astype(np.float32)
    apply = lora.wrap_apply(lambda p, x: NET.apply({"params": p}, x), alpha=2, rank=2)
    _, _, batch = _task_data()

    per_task = jax.jit(
        lambda p: multitask.per_task(lambda q, b: apply(q, b["x"]), p, label_tree, batch)
    )
    alone = jax.jit(apply)
    got = per_task(params)
    for t in range(T):
        np.testing.assert_allclose(
            got[t], alone(_params_of_task(params, label_tree, t), batch["x"][t]), rtol=1e-5
        )

    def loss_fn(p, b, rng):
        del rng

        def err(q, c):
            return multitask.masked_mean(jnp.square(apply(q, c["x"]) - c["y"]), c["mask"])

        return jnp.sum(multitask.per_task(err, p, label_tree, b)), {}

    tx = partition.optimizer({multitask.TASK: optax.adam(1e-2)}, label_tree)
    state = train.init_state(params, label_tree, tx, seed=0)
    assert set(partition.flatten(state.trainable)) == {
        f"{m}/{leaf}" for m in ("trunk_0", "trunk_1") for leaf in ("lora_a", "lora_b")
    } | {"head/kernel", "head/bias"}
    step = jax.jit(train.make_train_step(loss_fn, tx))
    for _ in range(2):
        state, _ = step(state, batch)
    chex.assert_trees_all_equal(state.frozen, partition.split(params, label_tree)[1])
    moved = np.abs(state.params["trunk_0"]["lora_b"] - params["trunk_0"]["lora_b"])
    assert np.all(moved.reshape(T, -1).max(axis=1) > 0)


def test_constant_metrics_score_each_tasks_train_majority_or_mean():
    from ftlab.data import multitask as data_lib  # noqa: PLC0415

    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
    split = lambda y: data_lib.TaskSplit(np.zeros((2, 4, 1), np.float32), np.float32(y), mask)  # noqa: E731
    data = data_lib.TaskData(
        train=split([[1, 1, 0, 0], [0, 0, 0, 1]]),  # majorities: 1, then 0
        test=split([[1, 0, 1, 0], [0, 1, 1, 1]]),
        task_names=("a", "b"), feature_names=("x",), kind="classification", y_mean=0.0, y_std=1.0,
    )  # fmt: skip
    got = multitask.constant_metrics(data)
    assert got["per_task"]["accuracy"] == [2 / 3, 1 / 4]
    regression = data._replace(kind="regression", y_std=2.0)
    # the train mean of standardised targets is 0: squared error y^2 in raw units (x y_std^2)
    assert multitask.constant_metrics(regression)["per_task"]["mse"] == [4 * 2 / 3, 4 * 3 / 4]
