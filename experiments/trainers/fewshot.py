"""Few-shot image classification: MAML, FOMAML, ANIL, Reptile, and a fine-tuned pretrained net.

``config.meta.method`` picks the algorithm. ``finetune`` trains one network on all meta-train
classes jointly (a classifier over every train class); at test time its head is replaced by a
fresh zero 5-way head, and the leaves ``config.evals.finetune_rules`` select are fine-tuned on
each support set with the same SGD steps as the meta-learners. Evaluation: ``config.evals
.num_tasks`` episodes of held-out (meta-test) classes, query accuracy after each number of
fine-tuning steps in ``config.evals.num_steps``, mean and 95% interval ``1.96 std / sqrt(n)``.

Network: ``config.model.blocks`` blocks of [3x3 conv, stride 2, ``filters`` channels,
normalisation, ReLU], flattened, a linear ``head``. Normalisation ``"batch"`` normalises with
the statistics of the batch it is applied to, within one episode: the support set during
adaptation, the whole query set at evaluation. That is transductive, as in MAML's reported
numbers (its code runs batch norm in training mode at test time). ``"instance"`` normalises each
example over its own pixels and channels: not transductive.

Also a command to tabulate and plot several runs::

  python -m experiments.trainers.fewshot --out=runs/fewshot runs/fewshot/*/
"""

from __future__ import annotations

import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from experiments import evaluation, loop, models, reports
from ftlab import meta
from ftlab.core import partition, report, train
from ftlab.data import fewshot

METHODS = ("maml", "fomaml", "anil", "reptile", "finetune")
# the evaluator types of config.evals.plugins (experiments.loop)
PLUGINS = ("finetune_accuracy",)


def make_fns(model: nn.Module):
    """``loss_fn(params, batch, rng) -> (cross-entropy, {})`` and ``accuracy(params, batch)``."""

    def loss_fn(params, batch, rng):
        del rng
        logits = model.apply({"params": params}, batch["x"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])), {}

    def accuracy(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return jnp.mean(jnp.argmax(logits, -1) == batch["y"])

    return loss_fn, accuracy


def load_data(config) -> fewshot.Dataset:
    d = config.data
    if d.dataset == "digits":
        return fewshot.load_digits()
    if d.dataset == "glyphs":
        return fewshot.load_glyphs(
            size=d.glyph_size, num_classes=d.glyph_classes, instances=d.glyph_instances
        )
    raise ValueError(f"config.data.dataset={d.dataset!r}; expected 'digits' or 'glyphs'")


def build_model(config, ways, image_shape):
    m = config.model
    model = models.ConvNet(ways=ways, filters=m.filters, blocks=m.blocks, norm=m.norm)
    init = jax.jit(model.init)  # one compile, not one per op
    params = init(jax.random.PRNGKey(config.seed), jnp.zeros((2, *image_shape)))["params"]
    return model, params


def fresh_head(params, ways):
    """``params`` with a zero ``head`` of ``ways`` outputs (the fine-tune baseline at test time)."""
    feat = params["head"]["kernel"].shape[0]
    head = {"kernel": jnp.zeros((feat, ways)), "bias": jnp.zeros((ways,))}
    return {**params, "head": head}


@loop.register("finetune_accuracy")
def make_evaluator(*, num_tasks=None, num_steps=None, metric="acc", config, data, test_ids, plan):
    """``evaluate(state) -> {eval/<metric>_step_<k>: query accuracy}`` on held-out episodes.

    ``num_tasks`` episodes (default ``config.evals.num_tasks``) of the held-out classes, the
    state's network fine-tuned on each support set for ``k`` in ``num_steps`` (default
    ``config.evals.num_steps``) steps: the inner rules and rate, or for ``finetune`` a fresh
    zero head and ``config.evals.finetune_rules``/``finetune_lr``. ``evaluate.full(state)``:
    the accuracies, ``[tasks, max steps + 1]``.
    """
    e, d, m, method = config.evals, config.data, config.model, config.meta.method
    steps = tuple(e.num_steps if num_steps is None else num_steps)
    num_tasks = e.num_tasks if num_tasks is None else num_tasks
    if not steps or min(steps) < 0 or num_tasks < 1:
        raise ValueError(f"num_steps={steps!r}, num_tasks={num_tasks!r}: expected >= 0, >= 1")
    loss_fn, accuracy = make_fns(
        models.ConvNet(ways=d.ways, filters=m.filters, blocks=m.blocks, norm=m.norm)
    )
    if method == "finetune":
        rules, lr = tuple(e.finetune_rules), e.finetune_lr
    else:
        rules, lr = meta.inner_rules(method), config.meta.inner_lr
    trajectories = evaluation.adapt_trajectory(
        lambda p, task: accuracy(p, task["query"]), loss_fn, rules=rules, num_steps=max(steps)
    )

    def full(state):
        params = plan.get_state(state).params
        if method == "finetune":
            params = fresh_head(params, d.ways)
        chunks = []
        for i in range(0, num_tasks, e.chunk):
            ep = fewshot.sample_episodes(
                data.images, test_ids, e.seed, i // e.chunk, num_tasks=e.chunk, ways=d.ways,
                shots=d.shots, query=e.query,
            )  # fmt: skip
            tasks = {"support": ep["support"], "query": ep["query"]}
            chunks.append(np.asarray(trajectories(params, lr, tasks)))
        return np.concatenate(chunks)[:num_tasks]

    def evaluate(state):
        summary = evaluation.steps_summary(full(state), steps, metric)
        return {k: v for k, v in summary.items() if not k.endswith("_ci95")}

    evaluate.full = full
    return evaluate


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Meta-trains (or pretrains) ``config.meta.method``, evaluates on held-out classes.

    Writes results.json, results.md (a one-row table), metrics.jsonl and accuracy.png.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    method, d, e = config.meta.method, config.data, config.evals
    if method not in METHODS:
        raise ValueError(f"config.meta.method={method!r}; expected one of {METHODS}")
    data = load_data(config)
    train_ids, test_ids = fewshot.split_classes(
        len(data.names), num_train=d.num_train_classes, seed=d.split_seed
    )
    tx = optax.adam(config.optim.lr)
    plan = loop.plan_from(config)
    what = "pretrain_batch_size" if method == "finetune" else "meta_batch_size"
    plan.check_batch_size(config.optim[what], what=f"config.optim.{what}")
    if (method, config.model.norm, plan.mode) == ("finetune", "batch", "pmap") and (
        plan.num_devices > 1
    ):
        # Under pmap each device normalises its own share of the pretraining batch: the result
        # would depend on the device count (a mesh normalises over the global batch).
        raise ValueError(
            "config.parallel.mode='pmap' with config.model.norm='batch' normalises each "
            "device's share of the pretraining batch on its own; use mode 'mesh' or norm "
            "'instance'"
        )
    axis = models.axis_name(plan)
    ways = len(train_ids) if method == "finetune" else d.ways
    model, params = build_model(config, ways, data.images.shape[2:])
    loss_fn, _ = make_fns(model)
    state = train.init_state(
        params, partition.labels(params, [(".*", "train")]), tx, seed=config.seed
    )
    if method == "finetune":
        step_fn = train.make_train_step(loss_fn, tx, axis_name=axis)

        def batch_at(step):
            return fewshot.sample_batch(
                data.images, train_ids, d.seed, step, batch_size=config.optim.pretrain_batch_size
            )
    else:
        m = config.meta
        step_fn = meta.make_step(
            method, loss_fn, tx, inner_lr=m.inner_lr, num_steps=m.inner_steps, axis_name=axis
        )

        def batch_at(step):
            ep = fewshot.sample_episodes(
                data.images, train_ids, d.seed, step, num_tasks=config.optim.meta_batch_size,
                ways=ways, shots=d.shots, query=d.query,
            )  # fmt: skip
            return {"support": ep["support"], "query": ep["query"]}

    logging.info("%s on %s: %d parameters", method, d.dataset, partition.count(params))

    # -- evaluators: held-out episodes, as config.evals.plugins choose ------------------------
    on = dict(config=config, data=data, test_ids=test_ids, plan=plan)
    evaluators = loop.from_config(config.evals.get("plugins"), types=PLUGINS, **on)

    # -- loop: every batch is a pure function of (seed, step), so a restored state continues
    # the same run --------------------------------------------------------------------------
    run = loop.train(
        config, workdir, plan=plan, state=state, step_fn=step_fn, batch_at=batch_at,
        evaluators=evaluators,
    )  # fmt: skip
    if not run.finished:
        return {"step": run.step}
    total = run.step

    # -- evaluation on held-out classes ------------------------------------------------------
    accs = make_evaluator(**on).full(run.state)
    results = {
        "method": method,
        "dataset": d.dataset,
        "synthetic": data.synthetic,
        "ways": d.ways,
        "shots": d.shots,
        "norm": config.model.norm,
        "transductive": config.model.norm == "batch",
        "meta_iterations": total,
        "train_classes": len(train_ids),
        "test_classes": len(test_ids),
        "eval/num_tasks": int(len(accs)),
        "eval/query_per_class": e.query,
        **evaluation.steps_summary(accs, e.num_steps, "acc"),
        "train_seconds_this_run": run.train_seconds,
    }
    table = reports.fewshot_table([results], methods=METHODS)
    figures = {"accuracy.png": lambda: reports.fewshot_plot([results])}
    return run.finish(results, logged="eval/acc", table=table, figures=figures, dpi=90, curves=None)


def main(argv: list[str]) -> None:
    """``python -m experiments.trainers.fewshot --out=DIR RUN_DIR...``: table.md and plot."""
    out = pathlib.Path(next(a.split("=", 1)[1] for a in argv if a.startswith("--out=")))
    rows = [
        json.loads((pathlib.Path(a) / "results.json").read_text())
        for a in argv
        if not a.startswith("--") and (pathlib.Path(a) / "results.json").exists()
    ]
    out.mkdir(parents=True, exist_ok=True)
    report.save_json(out / "results.json", rows)
    report.save_text(out / "table.md", table := reports.fewshot_table(rows, methods=METHODS))
    print(table)
    report.save_figure(reports.fewshot_plot(rows), out / "accuracy.png", dpi=90)


if __name__ == "__main__":
    main(sys.argv[1:])
