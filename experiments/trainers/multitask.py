"""Multi-task learning on real task families: independent models, hard sharing, soft sharing.

Every method is the same loop over one multi-task tree (see `ftlab.multitask`); only the rules that
label leaves per-task / shared / frozen, the task weighting and the pairwise penalty change:

    independent       one MLP per task                 [("net/.*", "task")]
    pooled            one MLP for all tasks            [(".*", "shared")]
    hard_uniform      shared trunk, a head per task    [("net/head/.*", "task"), (".*", "shared")]
    hard_uncertainty  hard_uniform + Kendall et al.'s learned log-variances (a per-task leaf)
    soft              one MLP per task + sum_{t<u} lambda_{t,u} ||theta_t - theta_u||^2, for
                      each lambda in config.multitask.lambdas (a scalar for all pairs or a [T, T])
    constant          (reference, no training) the train majority class / the train mean per task

With ``config.data.dataset = "rotten_tomatoes"`` the tasks are text classification on one frozen
pretrained encoder instead, with one LoRA per task (`train_lora_per_task`).

A `finished.sweep` of one run per method (the rows of each task's batch split over the data
mesh); results.json/.md hold the per-task and mean test metrics per method, per_task.png the
test metric per task and method, train.png the training losses.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from experiments import data as data_lib
from experiments import finished, loop, models, reports
from ftlab import multitask
from ftlab.core import partition, train
from ftlab.data import multitask as multitask_data

# method: (rules over the multi-task tree, task weighting, uses the pairwise penalty)
METHODS = {
    "independent": ((("net/.*", multitask.TASK),), "uniform", False),
    "pooled": (((".*", multitask.SHARED),), "uniform", False),
    "hard_uniform": ((("net/head/.*", multitask.TASK), (".*", multitask.SHARED)), "uniform", False),
    "hard_uncertainty": (
        (("net/head/.*|log_var", multitask.TASK), (".*", multitask.SHARED)),
        "uncertainty",
        False,
    ),
    "soft": ((("net/.*", multitask.TASK),), "uniform", True),
}
# Each tabular method's loop folder (checkpoint, metrics.jsonl): runs/<method>
RUNS = "runs"


def method_runs(config: ml_collections.ConfigDict) -> list[tuple[str, str, object]]:
    """``(run name, method, lambda)`` for every configured method; soft expands over lambdas."""
    finished.check_methods(config, tuple(METHODS))
    runs = []
    for method in config.methods:
        if METHODS[method][2]:
            for i, lam in enumerate(config.multitask.lambdas):
                label = f"{float(lam):g}" if np.ndim(lam) == 0 else f"matrix{i}"
                runs.append((f"soft_lam{label}", method, (i, lam)))
        else:
            runs.append((method, method, None))
    return runs


def _optimizer(config, label_tree, **kw) -> optax.GradientTransformation:
    """AdamW on the per-task and shared leaves (``kw``: more of `optax.adamw`'s options)."""
    tx = optax.adamw(config.optim.lr, weight_decay=config.optim.weight_decay, **kw)
    return partition.optimizer({multitask.TASK: tx, multitask.SHARED: tx}, label_tree)


def build_run(config, data: multitask_data.TaskData, method: str, lam_spec):
    """Initial parameters, labels, optimizer, loss and test scoring of one method."""
    num_tasks = len(data.task_names)
    rules, weighting, penalised = METHODS[method]
    model = models.MLP(tuple(config.model.hidden), layer="trunk")
    dim = data.train.x.shape[-1]

    def init_fn(rng):
        tree = {"net": model.init(rng, jnp.zeros((1, dim)))["params"]}
        if weighting == "uncertainty":
            # log sigma^2 = 0: every task starts with weight c_t, as in uniform weighting.
            tree["log_var"] = jnp.zeros(())
        return tree

    rng = jax.random.PRNGKey(config.seed)
    label_tree = partition.labels(jax.eval_shape(init_fn, rng), rules, what=f"{method} rules")
    params = multitask.init(init_fn, rng, label_tree, num_tasks=num_tasks)
    lam = None
    if penalised:
        i, value = lam_spec
        lam = multitask.lambda_matrix(
            value, num_tasks=num_tasks, what=f"config.multitask.lambdas[{i}]"
        )
    net_labels = label_tree["net"]

    def apply(net, batch):  # [B] scalar outputs
        return model.apply({"params": net}, batch["x"])[..., 0]

    def task_loss(net, batch):
        pred = apply(net, batch)
        return multitask.masked_mean(
            multitask.per_example_loss(data.kind, pred, batch["y"]), batch["mask"]
        )

    def loss_fn(params, batch, rng):
        del rng
        losses = multitask.per_task(task_loss, params["net"], net_labels, batch)
        if weighting == "uncertainty":
            total = multitask.uncertainty_weighted(losses, params["log_var"], kinds=data.kind)
        else:
            total = multitask.weighted_sum(losses)
        aux = {"task_loss_mean": jnp.mean(losses)}
        if lam is not None:
            penalty = multitask.pairwise_penalty(multitask.select(params["net"], net_labels), lam)
            total = total + penalty
            aux["penalty"] = penalty
        return total, aux

    def score(state):
        predict = jax.jit(lambda p, b: multitask.per_task(apply, p["net"], net_labels, b))
        pred = np.asarray(predict(state.params, {"x": jnp.asarray(data.test.x)}))
        t = data.test
        result = multitask.task_metrics(data.kind, pred, t.y, t.mask, y_std=data.y_std)
        if weighting == "uncertainty":
            result["log_var"] = [float(v) for v in state.params["log_var"]]
        return result

    # Weight decay on kernels only: not on biases, nor on the log-variances.
    decay_mask = lambda t: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda p, _: partition.path_name(p).endswith("kernel"), t
    )
    return params, label_tree, _optimizer(config, label_tree, mask=decay_mask), loss_fn, score


def _sweep_and_save(config, workdir, sample, builds, out: dict, *, reference=None) -> dict:
    """Every run as a `finished.sweep`, then results.md/.json, per_task.png and the training
    curves (process 0); returns ``out`` with ``"methods"``, the trained ones and the untrained
    ``reference`` rows.

    ``builds``: ``{name: build}``, ``build() -> (params, label_tree, tx, loss_fn, score)``,
    ``score(state) -> result`` on the test split. Each run is ``config.optim.num_steps`` steps
    of a fresh `finished.short_run` (its lines also in the sweep's metrics as
    ``train/<name>/...``); step ``s`` trains on ``sample(fold_in(state.rng, s))``, as the scan
    of the tabular path drew it on the device, the plan splitting its rows (axis 1 of the
    ``[T, rows, ...]`` arrays; the host hands them over rows first) over the data mesh.
    """
    fits = finished.Fits(loop.plan_from(config), log_every=config.log_every_steps)
    width = next(iter(jax.eval_shape(sample, jax.random.PRNGKey(0)).values())).shape[1]
    fits.plan.check_batch_size(width, what="config.optim.batch_size (rows per task per step)")
    if config.optim.batch_size == 0:  # the full split, padded per task
        why = "with config.optim.batch_size=0 weights each device's real rows on their own"
        loop.refuse_pmap(fits.plan, why, otherwise=" or a batch size")
    tasks_first = lambda b: {k: jnp.swapaxes(v, 0, 1) for k, v in b.items()}  # noqa: E731

    def train_one(name, writer):
        params, label_tree, tx, loss_fn, score = builds[name]()
        state = train.init_state(params, label_tree, tx, seed=config.seed)
        rng = state.rng
        draw = jax.jit(lambda step: sample(jax.random.fold_in(rng, step)))
        run = fits(
            workdir / RUNS / name, state, lambda p, b, r: loss_fn(p, tasks_first(b), r), tx,
            lambda step: {k: np.swapaxes(v, 0, 1) for k, v in draw(np.int32(step)).items()},
            num_steps=config.optim.num_steps, fresh=True, writer=writer, prefix=f"train/{name}/",
        )  # fmt: skip
        trainable = partition.count(run.state.trainable)
        return {**score(run.state), "trainable_params": trainable, "train_s": run.train_seconds}

    results, stopped = finished.sweep(
        workdir, config, list(builds), train_one, metric_prefix=lambda n: f"train/{n}/"
    )
    if stopped:
        return {"stopped": stopped}
    out["methods"] = results = {**results, **(reference or {})}
    table = reports.multitask_table(results, out["task_names"])
    plot = lambda: reports.multitask_plot(results, out["task_names"])  # noqa: E731
    if reports.publish(
        workdir, out, table=table, figures={"per_task.png": plot}, curves="", dpi=120
    ):
        print(table, flush=True)
    return out


def _describe(config, task_names, train_mask, test_mask) -> dict:
    """The data part of results.json (also logged): tasks and their real rows per split."""
    counts = {k: m.sum(axis=1).astype(int).tolist() for k, m in (("train", train_mask),
                                                                 ("test", test_mask))}  # fmt: skip
    logging.info("data %s: tasks %s, rows %s", config.data.dataset, list(task_names), counts)
    return {"dataset": config.data.dataset, "task_names": list(task_names),
            "train_counts": counts["train"], "test_counts": counts["test"]}  # fmt: skip


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains every configured method from scratch and writes the comparison into ``workdir``.

    Returns:
      ``{run name: {"per_task": {metric: [T values]}, "mean": {metric: value}, ...}}``, also
      in ``workdir/results.json``.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if config.data.dataset == "rotten_tomatoes":
        return train_lora_per_task(config, workdir)

    # -- data -------------------------------------------------------------------------------
    d = config.data
    data = multitask_data.load(
        d.dataset, seed=d.seed, test_fraction=d.test_fraction, max_tasks=d.max_tasks
    )
    out = _describe(config, data.task_names, data.train.mask, data.test.mask)
    sample = multitask.sampler(data.train._asdict(), config.optim.batch_size)

    # -- one run per method -----------------------------------------------------------------
    builds = {
        name: functools.partial(build_run, config, data, method, lam)
        for name, method, lam in method_runs(config)
    }
    # the reference row: each task's train majority class, or its train mean
    reference = {"constant": multitask.constant_metrics(data)}
    return _sweep_and_save(config, workdir, sample, builds, out, reference=reference)


# -- one LoRA per task on a frozen pretrained encoder -------------------------------------------

LORA_METHODS = {
    # an adapter and a head per task over one frozen trunk
    "lora_per_task": (
        ("head/.*", multitask.TASK),
        (".*/lora_(a|b)", multitask.TASK),
        (".*", multitask.FROZEN),
    ),
    # hard sharing of the adapter: one LoRA for all tasks, a head per task
    "lora_shared": (
        ("head/.*", multitask.TASK),
        (".*/lora_(a|b)", multitask.SHARED),
        (".*", multitask.FROZEN),
    ),
}


def train_lora_per_task(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    """One LoRA adapter (and head) per task on one frozen encoder, all tasks in one vmapped step.

    The tree holds the pretrained encoder once and each task's ``lora_a``/``lora_b``/head with a
    leading task axis; `multitask.per_task` runs every task's forward pass as one `jax.vmap` with
    the frozen kernels broadcast. Dropout is off (the per-task function gets no rng).
    """
    from ftlab.tasks import classification  # noqa: PLC0415

    # -- data -------------------------------------------------------------------------------
    train_arrays, test_arrays, task_names = data_lib.rotten_tomatoes_tasks(config)
    num_tasks = len(task_names)
    out = _describe(config, task_names, train_arrays["mask"], test_arrays["mask"])
    sample = multitask.sampler(train_arrays, config.optim.batch_size)

    # -- model: pretrained encoder + LoRA leaves + head -------------------------------------
    model, base = models.encoder_classifier(config)
    base, wrap = models.add_method(config.peft, "lora", base, jax.random.PRNGKey(config.seed + 1))
    apply = wrap(models.classifier_apply(model))
    task_loss_fn = classification.make_loss_fn(apply)

    def task_loss(params, batch):
        return task_loss_fn(params, batch, None)[0]

    def task_logits(params, batch):
        logits = apply(params, batch, None).astype(jnp.float32)
        return logits[..., 1] - logits[..., 0]

    finished.check_methods(config, tuple(LORA_METHODS))

    def build(method):
        rules = LORA_METHODS[method]
        label_tree, _ = models.partition_of(base, rules, what=f"{method} rules")
        params = multitask.stack(base, label_tree, num_tasks=num_tasks)

        def loss_fn(params, batch, rng):
            del rng
            losses = multitask.per_task(task_loss, params, label_tree, batch)
            return multitask.weighted_sum(losses), {"task_loss_mean": jnp.mean(losses)}

        def score(state):
            predict = jax.jit(lambda p, b: multitask.per_task(task_logits, p, label_tree, b))
            n, width = config.evals.batch_size, test_arrays["mask"].shape[1]
            parts = [
                {k: v[:, i : i + n] for k, v in test_arrays.items()} for i in range(0, width, n)
            ]
            pred = np.concatenate([np.asarray(predict(state.params, b)) for b in parts], axis=1)
            labels = test_arrays["label"].astype(np.float32)
            result = multitask.task_metrics("classification", pred, labels, test_arrays["mask"])
            # The frozen encoder must come out bit for bit as it went in.
            same = jax.tree.map(
                np.array_equal, partition.split(params, label_tree)[1], state.frozen
            )
            return {**result, "frozen_bit_identical": all(jax.tree.leaves(same))}

        return params, label_tree, _optimizer(config, label_tree), loss_fn, score

    labels, mask = test_arrays["label"], test_arrays["mask"] > 0
    majority = [
        float(max(np.mean(labels[t][mask[t]]), 1 - np.mean(labels[t][mask[t]])))
        for t in range(num_tasks)
    ]
    out["majority_baseline_accuracy"] = majority
    builds = {method: functools.partial(build, method) for method in config.methods}
    return _sweep_and_save(config, workdir, sample, builds, out)
