"""Meta-learning on sinusoid regression: MAML, FOMAML, ANIL, Meta-SGD, Reptile, and a baseline.

``config.meta.method`` picks the algorithm; ``pretrained`` trains one network on all tasks jointly
(no inner loop) and is evaluated by fine-tuning it exactly as the meta-learned initialisations
are. Evaluation: held-out tasks, fine-tuned on ``config.evals.shots`` points with
:func:`ftlab.meta.adapt`, query MSE after each of ``config.evals.num_steps`` gradient steps (mean
and 95% interval over tasks), plus a plot of adapted curves.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from experiments import evaluation, loop, models, reports
from ftlab import meta
from ftlab.core import partition, train
from ftlab.data import sinusoid

METHODS = (*meta.METHODS, "pretrained")
# the evaluator types of config.evals.plugins (experiments.loop)
PLUGINS = ("finetune_mse",)


def make_loss_fn(model: models.MLP):
    """``loss_fn(params, batch, rng) -> (MSE, {})`` over ``batch["x"]``, ``batch["y"]`` [n, 1]."""

    def loss_fn(params, batch, rng):
        del rng
        pred = model.apply({"params": params}, batch["x"])
        return jnp.mean((pred - batch["y"]) ** 2), {}

    return loss_fn


def build_model(config: ml_collections.ConfigDict) -> tuple[models.MLP, dict]:
    """Finn et al.'s regressor: ReLU hidden layers ``hidden_i``, then a linear ``head``."""
    model = models.MLP(hidden=tuple(config.model.hidden))
    params = jax.jit(model.init)(jax.random.PRNGKey(config.seed), jnp.zeros((1, 1), jnp.float32))
    return model, jax.tree.map(np.asarray, params["params"])


def sample_tasks(config: ml_collections.ConfigDict, step: int) -> dict:
    """The meta-batch of training tasks for ``step``: a pure function of (seed, step)."""
    tasks = sinusoid.sample(
        config.data.seed,
        step,
        num_tasks=config.optim.meta_batch_size,
        shots=config.data.shots,
        query_shots=config.data.query_shots,
    )
    return {"support": tasks["support"], "query": tasks["query"]}


def build_step(config, loss_fn, tx, *, axis_name=None):
    """The training step of ``config.meta.method`` (`ftlab.meta.make_step`, or joint training)."""
    m = config.meta
    if m.method == "pretrained":
        return train.make_train_step(loss_fn, tx, axis_name=axis_name)
    return meta.make_step(
        m.method, loss_fn, tx, inner_lr=m.inner_lr, num_steps=m.inner_steps, remat=m.remat,
        axis_name=axis_name,
    )  # fmt: skip


def init_state(config, params, tx):
    """Every leaf meta-trained; Meta-SGD adds its learned rates under ``inner_lr/...``."""
    if config.meta.method == "metasgd":
        params = meta.with_inner_lr(
            params,
            jax.random.PRNGKey(config.seed + 1),
            low=config.meta.metasgd_lr_init[0],
            high=config.meta.metasgd_lr_init[1],
        )
    label_tree = partition.labels(params, [(".*", "train")])
    return train.init_state(params, label_tree, tx, seed=config.seed)


def _joint_batch(tasks):
    """All points of all tasks as one regression batch (the pretrained baseline's data)."""
    x = np.concatenate([tasks["support"]["x"], tasks["query"]["x"]], axis=1)
    y = np.concatenate([tasks["support"]["y"], tasks["query"]["y"]], axis=1)
    return {"x": x.reshape(-1, 1), "y": y.reshape(-1, 1)}


# -- evaluation ----------------------------------------------------------------------------------
# The plot shows the first tasks' predictions on this grid before and after these many steps.
PLOT_GRID = np.linspace(*sinusoid.X_RANGE, 200, dtype=np.float32)[:, None]
PLOT_STEPS = (0, 1, 10)
PLOT_TASKS = 3


@loop.register("finetune_mse")
def make_evaluator(*, num_steps=None, metric="mse", config, loss_fn, model, plan):
    """``evaluate(state) -> {eval/<metric>_step_<k>: query MSE}`` of the held-out tasks.

    The state's initialisation fine-tuned on each task's support set for ``k`` in
    ``num_steps`` (default ``config.evals.num_steps``) steps. ``evaluate.full(state)`` adds
    the 95% intervals, the tasks and the plot's curves (``[PLOT_TASKS, len(PLOT_STEPS),
    grid]``). All step counts come from one compiled `evaluation.adapt_trajectory`.
    """
    steps = tuple(config.evals.num_steps if num_steps is None else num_steps)
    if not steps or min(steps) < 0:
        raise ValueError(f"num_steps={steps!r}: expected fine-tuning step counts >= 0")
    method, e = config.meta.method, config.evals

    def measure(p, task):
        return loss_fn(p, task["query"], None)[0], model.apply({"params": p}, PLOT_GRID)[:, 0]

    trajectories = evaluation.adapt_trajectory(
        measure, loss_fn, rules=meta.inner_rules(method), num_steps=max(*steps, *PLOT_STEPS)
    )
    held_out = sinusoid.sample(
        e.seed, 0, num_tasks=e.num_tasks, shots=e.shots, query_shots=e.query_shots
    )
    tasks = {"support": held_out["support"], "query": held_out["query"]}

    def full(state):
        params, learned = meta.split_inner_lr(plan.get_state(state).params)
        # Fine-tuning step size: learned (Meta-SGD), the baseline's, or the inner lr.
        lr = {"metasgd": learned, "pretrained": e.finetune_lr}.get(method, config.meta.inner_lr)
        queries, curves = jax.device_get(trajectories(params, lr, tasks))
        summary = evaluation.steps_summary(queries, steps, metric)
        return summary, held_out, curves[:PLOT_TASKS, np.asarray(PLOT_STEPS)]

    def evaluate(state):
        return {k: v for k, v in full(state)[0].items() if not k.endswith("_ci95")}

    evaluate.full = full
    return evaluate


# -- main ----------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Meta-trains ``config.meta.method``, evaluates on held-out tasks, writes into ``workdir``.

    Resumes from the workdir's latest checkpoint. Returns the results, also in results.json.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    method = config.meta.method
    if method not in METHODS:
        raise ValueError(f"config.meta.method={method!r}; expected one of {METHODS}")
    if config.data.task != "sinusoid":
        raise ValueError(f"config.data.task={config.data.task!r}; expected 'sinusoid'")
    plan = loop.plan_from(config)
    plan.check_batch_size(config.optim.meta_batch_size, what="config.optim.meta_batch_size")

    # -- model, optimizer, state -------------------------------------------------------------
    model, params = build_model(config)
    loss_fn = make_loss_fn(model)
    tx = optax.adam(config.optim.lr)
    state = init_state(config, params, tx)
    logging.info("method %s, %d parameters", method, partition.count(params))

    # -- evaluators: held-out tasks every config.evals.every_steps, and the plugins --------
    # Fine-tuning with Meta-SGD's learned rates (tuned for one step) may diverge at ten: that is
    # a result to report, not a broken run, so evaluations are not checked for NaN.
    on = dict(config=config, loss_fn=loss_fn, model=model, plan=plan)
    held_out = make_evaluator(**on)
    evaluators = [
        loop.Evaluator(
            "held_out", held_out, every_steps=config.evals.every_steps, check_finite=False
        ),
        *loop.from_config(config.evals.get("plugins"), types=PLUGINS, check_finite=False, **on),
    ]

    # -- loop --------------------------------------------------------------------------------
    def batch_at(step):
        tasks = sample_tasks(config, step)
        return _joint_batch(tasks) if method == "pretrained" else tasks

    run = loop.train(
        config,
        workdir,
        plan=plan,
        state=state,
        step_fn=build_step(config, loss_fn, tx, axis_name=models.axis_name(plan)),
        batch_at=batch_at,
        evaluators=evaluators,
        compiler_options=meta.compiler_options(),
    )
    if not run.finished:
        return {"step": run.step}

    # -- final evaluation --------------------------------------------------------------------
    summary, tasks, curves = held_out.full(run.state)
    results = {"step": run.step, "method": method, **summary}
    results["eval/num_tasks"] = config.evals.num_tasks
    results["eval/shots"] = config.evals.shots
    results["train_seconds_this_run"] = run.train_seconds
    plot = lambda: reports.meta_adapted_plot(  # noqa: E731
        method, tasks, curves, grid=PLOT_GRID, steps=PLOT_STEPS, num_tasks=PLOT_TASKS
    )
    return run.finish(
        results, logged="eval/mse", figures={"adapted_curves.png": plot}, dpi=90,
        curves="" if config.plot_metrics else None,
    )  # fmt: skip
