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

Writes ``results.json`` (per-task and mean test metrics per method), ``results.md`` (the same as a
markdown table), ``per_task.png`` (the test metric per task and method), ``metrics.jsonl`` and
TensorBoard events (training losses) and ``train.png`` into the workdir. Each method's result is
kept in ``finished/<method>.json`` when it completes (`experiments/finished.py`): rerunning
the same command after an interruption skips the finished methods and trains the rest from the
seed (one method takes seconds to minutes, the LoRA-per-task one about 20 on a CPU).

The tabular methods each train as one run of `experiments.loop` in ``runs/<method>/``: data-
parallel over ``config.parallel`` (default: a mesh over all devices; the rows of each task's
batch are split), stopped by a non-finite loss naming the step, writers on process 0 only. So do
the text path's LoRA methods (`train_lora_per_task`).
"""

from __future__ import annotations

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
from ftlab.core import metrics as metrics_lib
from ftlab.core import partition, report, train
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
    runs = []
    for method in config.methods:
        if method not in METHODS:
            raise ValueError(
                f"config.methods: unknown {method!r}; expected some of {list(METHODS)}"
            )
        if METHODS[method][2]:
            for i, lam in enumerate(config.multitask.lambdas):
                label = f"{float(lam):g}" if np.ndim(lam) == 0 else f"matrix{i}"
                runs.append((f"soft_lam{label}", method, (i, lam)))
        else:
            runs.append((method, method, None))
    return runs


def build_run(config, data: multitask_data.TaskData, method: str, lam_spec):
    """Initial parameters, labels, optimizer and loss for one method."""
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

    def predict(params, batch):
        return multitask.per_task(apply, params["net"], net_labels, batch)

    # Weight decay on kernels only: not on biases, nor on the log-variances.
    decay_mask = lambda t: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda p, _: partition.path_name(p).endswith("kernel"), t
    )
    tx = optax.adamw(config.optim.lr, weight_decay=config.optim.weight_decay, mask=decay_mask)
    tx = partition.optimizer({multitask.TASK: tx, multitask.SHARED: tx}, label_tree)
    return params, label_tree, tx, loss_fn, predict


def _fit(config, workdir, plan, params, label_tree, tx, loss_fn, sample, writer, name):
    """``config.optim.num_steps`` steps as a `finished.short_run` (an unfinished one starts
    over); returns the state on the host and the train seconds.

    Step ``s`` trains on ``sample(fold_in(state.rng, s))``, as the scan of the tabular path
    drew it on the device; the plan splits its rows (axis 1 of the ``[T, rows, ...]`` arrays;
    the host hands them over rows first) over the data mesh. Each ``config.log_every_steps``
    steps' mean goes to the sweep's ``writer`` as ``train/<name>/...``.
    """
    state = train.init_state(params, label_tree, tx, seed=config.seed)
    train_step = train.make_train_step(loss_fn, tx, axis_name=models.axis_name(plan))
    total, every = config.optim.num_steps, config.log_every_steps
    rng = state.rng
    draw = jax.jit(lambda step: sample(jax.random.fold_in(rng, step)))
    width = next(iter(jax.eval_shape(draw, np.int32(0)).values())).shape[1]
    plan.check_batch_size(width, what="config.optim.batch_size (rows per task per step)")
    if plan.mode == "pmap" and plan.num_devices > 1 and config.optim.batch_size == 0:
        # the full split is padded per task: each device would average its own share of real
        # rows, weighting them unlike the one mean a mesh computes
        raise ValueError(
            "config.parallel.mode='pmap' with config.optim.batch_size=0 (the padded full split) "
            "weights each device's real rows on their own; use mode 'mesh' or a batch size"
        )
    run = finished.short_run(
        workdir,
        plan=plan,
        state=state,
        step_fn=lambda s, b: train_step(s, {k: jnp.swapaxes(v, 0, 1) for k, v in b.items()}),
        batch_at=lambda step: {
            k: np.swapaxes(np.asarray(v), 0, 1) for k, v in draw(np.int32(step)).items()
        },
        num_steps=total,
        log_every=every,
        fresh=True,
    )
    for done in range(every, total + 1, every):
        window = run.history[done - every : done]
        mean = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
        writer.write(done, {f"train/{name}/{k[6:]}": v for k, v in mean.items()})
    return run.state, run.train_seconds


def _sweep_and_save(config, workdir, names, train_one, out: dict, *, reference=None) -> dict:
    """Every method as a `finished.sweep` (``train/<name>/...`` lines), then results.md/.json,
    per_task.png and the training curves (process 0); returns ``out`` with ``"methods"``, the
    trained ones and the untrained ``reference`` rows."""
    results, stopped = finished.sweep(
        workdir, config, names, train_one, metric_prefix=lambda n: f"train/{n}/"
    )
    if stopped:
        return {"stopped": stopped}
    out["methods"] = results = {**results, **(reference or {})}
    if jax.process_index() == 0:  # one writer in a multi-process job
        table = reports.multitask_table(results, out["task_names"])
        report.save_table(workdir / "results", markdown=table, data=out)
        plot = reports.multitask_plot(results, out["task_names"])
        report.save_figure(plot, workdir / "per_task.png", dpi=120)
        metrics_lib.plot_curves(workdir / "metrics.jsonl", workdir)
        print(table, flush=True)
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains every configured method from scratch and writes the comparison into ``workdir``.

    Returns:
      ``{run name: {"per_task": {metric: [T values]}, "mean": {metric: value}, ...}}``, also
      in ``workdir/results.json``.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    total, chunk = config.optim.num_steps, config.log_every_steps
    if total % chunk:
        raise ValueError(
            f"config.optim.num_steps={total} must be a multiple of config.log_every_steps={chunk}"
        )
    if config.data.dataset == "rotten_tomatoes":
        return train_lora_per_task(config, workdir)

    # -- data -------------------------------------------------------------------------------
    data = multitask_data.load(
        config.data.dataset, seed=config.data.seed, test_fraction=config.data.test_fraction
    )
    if config.data.max_tasks:
        keep = slice(0, config.data.max_tasks)
        data = data._replace(
            train=multitask_data.TaskSplit(*(a[keep] for a in data.train)),
            test=multitask_data.TaskSplit(*(a[keep] for a in data.test)),
            task_names=data.task_names[keep],
        )
    logging.info(
        "data %s: %d tasks, train rows %s, test rows %s",
        config.data.dataset,
        len(data.task_names),
        data.train.counts.tolist(),
        data.test.counts.tolist(),
    )
    sample = multitask.sampler(data.train._asdict(), config.optim.batch_size)
    plan = loop.plan_from(config)

    # -- one run per method -----------------------------------------------------------------
    runs = {name: (method, lam) for name, method, lam in method_runs(config)}

    def train_one(name, writer):
        method, lam_spec = runs[name]
        params, label_tree, tx, loss_fn, predict = build_run(config, data, method, lam_spec)
        state, train_s = _fit(
            config, workdir / RUNS / name, plan, params, label_tree, tx, loss_fn, sample, writer,
            name,
        )  # fmt: skip
        pred = np.asarray(jax.jit(predict)(state.params, {"x": jnp.asarray(data.test.x)}))
        result = multitask.task_metrics(
            data.kind, pred, data.test.y, data.test.mask, y_std=data.y_std
        )
        result.update(trainable_params=partition.count(state.trainable), train_s=train_s)
        if method == "hard_uncertainty":
            result["log_var"] = [float(v) for v in state.params["log_var"]]
        return result

    # Reference row: the train majority class per task, or the train mean (0 after standardising).
    if data.kind == "classification":
        majority = np.where(data.train.y.mean(axis=1, keepdims=True) > 0.5, 1.0, -1.0)
        constant = np.broadcast_to(majority, data.test.y.shape)
    else:
        constant = np.zeros_like(data.test.y)
    out = {
        "dataset": config.data.dataset,
        "task_names": list(data.task_names),
        "train_counts": data.train.counts.tolist(),
        "test_counts": data.test.counts.tolist(),
    }
    reference = {
        "constant": multitask.task_metrics(
            data.kind, constant, data.test.y, data.test.mask, y_std=data.y_std
        )
    }
    return _sweep_and_save(config, workdir, list(runs), train_one, out, reference=reference)


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
    counts = {
        k: a["mask"].sum(axis=1).astype(int).tolist()
        for k, a in (("train", train_arrays), ("test", test_arrays))
    }
    logging.info("tasks %s: train %s, test %s", task_names, counts["train"], counts["test"])
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

    plan = loop.plan_from(config)
    for method in config.methods:
        if method not in LORA_METHODS:
            raise ValueError(
                f"config.methods: unknown {method!r}; expected some of {list(LORA_METHODS)}"
            )

    def train_one(method, writer):
        rules = LORA_METHODS[method]
        label_tree = partition.labels(base, rules, what=f"{method} rules")
        for pattern, label, n in partition.claims(base, rules):
            logging.info("%s: rule %-22r -> %-7s claims %d leaves", method, pattern, label, n)
        params = multitask.stack(base, label_tree, num_tasks=num_tasks)

        def loss_fn(params, batch, rng):
            del rng
            losses = multitask.per_task(task_loss, params, label_tree, batch)
            return multitask.weighted_sum(losses), {"task_loss_mean": jnp.mean(losses)}

        tx = optax.adamw(config.optim.lr, weight_decay=config.optim.weight_decay)
        tx = partition.optimizer({multitask.TASK: tx, multitask.SHARED: tx}, label_tree)
        state, train_s = _fit(
            config, workdir / RUNS / method, plan, params, label_tree, tx, loss_fn, sample,
            writer, method,
        )  # fmt: skip
        predict = jax.jit(lambda p, b: multitask.per_task(task_logits, p, label_tree, b))
        width, step = test_arrays["mask"].shape[1], config.evals.batch_size
        pred = np.concatenate(
            [
                np.asarray(
                    predict(state.params, {k: v[:, i : i + step] for k, v in test_arrays.items()})
                )
                for i in range(0, width, step)
            ],
            axis=1,
        )
        labels = test_arrays["label"].astype(np.float32)
        result = multitask.task_metrics("classification", pred, labels, test_arrays["mask"])
        result.update(trainable_params=partition.count(state.trainable), train_s=train_s)
        # The frozen encoder must come out bit for bit as it went in.
        frozen_before = partition.split(params, label_tree)[1]
        result["frozen_bit_identical"] = all(
            np.array_equal(a, b)
            for a, b in zip(
                jax.tree.leaves(frozen_before),
                jax.tree.leaves(jax.device_get(state.frozen)),
                strict=True,
            )
        )
        return result

    labels, mask = test_arrays["label"], test_arrays["mask"] > 0
    majority = [
        float(max(np.mean(labels[t][mask[t]]), 1 - np.mean(labels[t][mask[t]])))
        for t in range(num_tasks)
    ]
    out = {
        "dataset": config.data.dataset,
        "task_names": task_names,
        "train_counts": counts["train"],
        "test_counts": counts["test"],
        "majority_baseline_accuracy": majority,
    }
    return _sweep_and_save(config, workdir, list(config.methods), train_one, out)
