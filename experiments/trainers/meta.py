"""Meta-learning: MAML, FOMAML, ANIL, Meta-SGD, Reptile and a jointly trained baseline.

``config.meta.method`` picks the algorithm; the task family (`experiments.schema.kind_of`)
gives the data, the network, its loss and what is measured, and all else is one loop: the
method's step (`ftlab.meta.make_step`, or joint training for the baseline), `loop.train`, the
held-out evaluation and the results.

- ``sinusoid`` (``config.data.task``): regression of ``y = A sin(x - phase)`` (Finn et al.
  2017, 5.1) with an MLP; the baseline ``pretrained`` trains on every point of the meta-batch's
  tasks jointly. Measured: query MSE; also a plot of adapted curves (``adapted_curves.png``).
- ``images`` (``config.data.dataset``: digits or glyphs): N-way few-shot classification (5.2)
  with ``config.model.blocks`` blocks of [3x3 conv, stride 2, ``filters`` channels,
  normalisation, ReLU] and a linear ``head``; the baseline ``finetune`` trains a classifier
  over every meta-train class, whose head is replaced by a fresh zero N-way head at test time.
  Normalisation ``"batch"`` uses the statistics of the batch it is applied to, within one
  episode (the support set while adapting, the whole query set at evaluation): transductive,
  as in MAML's reported numbers. ``"instance"`` normalises each example on its own. Measured:
  query accuracy; also results.md (a one-row table) and ``accuracy.png``.

Evaluation: ``config.evals.num_tasks`` held-out tasks; the initialisation fine-tuned on each
support set with SGD (the inner rules and rate, Meta-SGD's learned rates, or for the baseline
``config.evals.finetune_rules`` and ``finetune_lr``), the query metric after 0 and each of
``config.evals.num_steps`` steps: mean and 95% interval ``1.96 std / sqrt(n)``.

Also a command to tabulate and plot several image runs::

  python -m experiments.trainers.meta --out=runs/fewshot runs/fewshot/*/
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from experiments import evaluation, loop, models, reports, schema
from ftlab import meta
from ftlab.core import partition, report, train
from ftlab.data import fewshot, sinusoid

METHODS = {
    "sinusoid": (*meta.METHODS, "pretrained"),
    "images": ("maml", "fomaml", "anil", "reptile", "finetune"),
}  # each family's baseline (not in meta.METHODS): one network trained on all tasks jointly
# the evaluator type of config.evals.plugins each family offers (experiments.loop)
PLUGINS = {"sinusoid": "finetune_mse", "images": "finetune_accuracy"}


@dataclasses.dataclass(frozen=True)
class Family:
    """What a task family configures the meta-learning loop with.

    Attributes:
        params: The network to train (for the baseline, with its joint-training head).
        loss_fn: ``loss_fn(params, batch, rng) -> (loss, {})`` of training.
        batch_at: ``step -> host batch``: the meta-batch of tasks, or the baseline's batch.
        batch_size: The ``config.optim`` key of the batch the plan splits over devices.
        held_out: ``num_tasks -> [tasks, ...]``: the held-out tasks, in chunks.
        adapt_loss: The fine-tuning loss on a held-out support set.
        measure: ``measure(params, task) -> (metric, extra)`` on the query set, before every
            fine-tuning step and after the last; ``extra`` (a pytree) goes to ``publish``.
        for_baseline: The baseline's trained network as fine-tuned at test time.
        metric: The name in ``eval/<metric>_step_<k>``.
        step_key: The results' name of the number of steps trained.
        results: The family's own entries of results.json.
        publish: ``publish(results, tasks, extras) -> options of loop.Run.finish``.
        plot_steps: Fine-tuning steps ``publish`` draws (evaluated even if not reported).
        compiler_options: XLA options of the train step.
    """

    params: dict
    loss_fn: Callable
    batch_at: Callable[[int], Mapping]
    batch_size: str
    held_out: Callable[[int], list]
    adapt_loss: Callable
    measure: Callable
    for_baseline: Callable[[dict], dict]
    metric: str
    step_key: str
    results: dict
    publish: Callable[..., dict]
    plot_steps: tuple[int, ...] = ()
    compiler_options: dict | None = None


# -- sinusoid regression -------------------------------------------------------------------------
# The plot shows the first tasks' predictions on this grid before and after these many steps.
PLOT_GRID = np.linspace(*sinusoid.X_RANGE, 200, dtype=np.float32)[:, None]
PLOT_STEPS = (0, 1, 10)
PLOT_TASKS = 3


def _sinusoid(config: ml_collections.ConfigDict, plan) -> Family:
    """Finn et al.'s regressor (ReLU layers ``hidden_i``, a linear ``head``) on sine tasks."""
    del plan
    d, e, method = config.data, config.evals, config.meta.method
    if d.task != "sinusoid":
        raise ValueError(f"config.data.task={d.task!r}; expected 'sinusoid'")
    model = models.MLP(hidden=tuple(config.model.hidden))
    params = jax.jit(model.init)(jax.random.PRNGKey(config.seed), jnp.zeros((1, 1), jnp.float32))

    def loss_fn(params, batch, rng):
        del rng
        return jnp.mean((model.apply({"params": params}, batch["x"]) - batch["y"]) ** 2), {}

    def tasks_at(step):  # a pure function of (seed, step)
        t = sinusoid.sample(d.seed, step, num_tasks=config.optim.meta_batch_size, shots=d.shots,
                            query_shots=d.query_shots)  # fmt: skip
        return {"support": t["support"], "query": t["query"]}

    def joint_batch(step):
        """All points of the step's tasks as one regression batch (the pretrained baseline's)."""
        t = tasks_at(step)
        x, y = (np.concatenate([t["support"][k], t["query"][k]], axis=1) for k in "xy")
        return {"x": x.reshape(-1, 1), "y": y.reshape(-1, 1)}

    def measure(p, task):
        return loss_fn(p, task["query"], None)[0], model.apply({"params": p}, PLOT_GRID)[:, 0]

    def publish(results, tasks, curves):
        curves = curves[:PLOT_TASKS, np.asarray(PLOT_STEPS)]
        plot = lambda: reports.meta_adapted_plot(  # noqa: E731
            method, tasks[0], curves, grid=PLOT_GRID, steps=PLOT_STEPS, num_tasks=PLOT_TASKS
        )
        return {"figures": {"adapted_curves.png": plot}}

    return Family(
        params=jax.tree.map(np.asarray, params["params"]),
        loss_fn=loss_fn,
        batch_at=joint_batch if method == "pretrained" else tasks_at,
        batch_size="meta_batch_size",
        held_out=lambda n: [
            sinusoid.sample(e.seed, 0, num_tasks=n, shots=e.shots, query_shots=e.query_shots)
        ],  # fmt: skip
        adapt_loss=loss_fn,
        measure=measure,
        for_baseline=lambda p: p,
        metric="mse",
        step_key="step",
        results={"eval/shots": e.shots},
        publish=publish,
        plot_steps=PLOT_STEPS,
        compiler_options=meta.compiler_options(),
    )


# -- few-shot image classification ---------------------------------------------------------------
def _classifier(model: nn.Module):
    """``loss_fn(params, batch, rng) -> (cross-entropy, {})`` and ``accuracy(params, batch)``."""

    def loss_fn(params, batch, rng):
        del rng
        logits = model.apply({"params": params}, batch["x"])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])), {}

    def accuracy(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return jnp.mean(jnp.argmax(logits, -1) == batch["y"])

    return loss_fn, accuracy


def fresh_head(params, ways):
    """``params`` with a zero ``head`` of ``ways`` outputs (the fine-tune baseline at test time)."""
    feat = params["head"]["kernel"].shape[0]
    head = {"kernel": jnp.zeros((feat, ways)), "bias": jnp.zeros((ways,))}
    return {**params, "head": head}


def _images(config: ml_collections.ConfigDict, plan) -> Family:
    """A conv net on N-way episodes of the meta-train classes; held out: the other classes."""
    d, e, m = config.data, config.evals, config.model
    baseline = config.meta.method == "finetune"
    if baseline and m.norm == "batch":
        why = "with config.model.norm='batch' normalises each device's share of the batch"
        loop.refuse_pmap(plan, why, otherwise=" or norm 'instance'")
    if d.dataset == "digits":
        data = fewshot.load_digits()
    elif d.dataset == "glyphs":
        data = fewshot.load_glyphs(
            size=d.glyph_size, num_classes=d.glyph_classes, instances=d.glyph_instances
        )
    else:
        raise ValueError(f"config.data.dataset={d.dataset!r}; expected 'digits' or 'glyphs'")
    train_ids, test_ids = fewshot.split_classes(
        len(data.names), num_train=d.num_train_classes, seed=d.split_seed
    )
    convnet = lambda ways: models.ConvNet(  # noqa: E731
        ways=ways, filters=m.filters, blocks=m.blocks, norm=m.norm
    )
    model = convnet(len(train_ids) if baseline else d.ways)
    init = jax.jit(model.init)  # one compile, not one per op
    params = init(jax.random.PRNGKey(config.seed), jnp.zeros((2, *data.images.shape[2:])))
    loss_fn, _ = _classifier(model)
    adapt_loss, accuracy = _classifier(convnet(d.ways))

    def episodes(ids, seed, index, num_tasks, query):
        ep = fewshot.sample_episodes(data.images, ids, seed, index, num_tasks=num_tasks,
                                     ways=d.ways, shots=d.shots, query=query)  # fmt: skip
        return {"support": ep["support"], "query": ep["query"]}

    def batch_at(step):  # a pure function of (seed, step)
        if baseline:
            size = config.optim.pretrain_batch_size
            return fewshot.sample_batch(data.images, train_ids, d.seed, step, batch_size=size)
        return episodes(train_ids, d.seed, step, config.optim.meta_batch_size, d.query)

    def publish(results, tasks, extras):
        del tasks, extras
        return {"table": reports.fewshot_table([results], methods=METHODS["images"]),
                "figures": {"accuracy.png": lambda: reports.fewshot_plot([results])}}  # fmt: skip

    return Family(
        params=params["params"],
        loss_fn=loss_fn,
        batch_at=batch_at,
        batch_size="pretrain_batch_size" if baseline else "meta_batch_size",
        held_out=lambda n: [
            episodes(test_ids, e.seed, i // e.chunk, e.chunk, e.query) for i in range(0, n, e.chunk)
        ],  # fmt: skip
        adapt_loss=adapt_loss,
        measure=lambda p, task: (accuracy(p, task["query"]), None),
        for_baseline=lambda p: fresh_head(p, d.ways),
        metric="acc",
        step_key="meta_iterations",
        results={
            "dataset": d.dataset,
            "synthetic": data.synthetic,
            "ways": d.ways,
            "shots": d.shots,
            "norm": m.norm,
            "transductive": m.norm == "batch",
            "train_classes": len(train_ids),
            "test_classes": len(test_ids),
            "eval/query_per_class": e.query,
        },  # fmt: skip
        publish=publish,
    )


FAMILIES = {"sinusoid": _sinusoid, "images": _images}


# -- the loop, shared ----------------------------------------------------------------------------
def build_step(config, loss_fn, tx, *, axis_name=None):
    """The training step of ``config.meta.method`` (`ftlab.meta.make_step`, or joint training)."""
    m = config.meta
    if m.method not in meta.METHODS:  # the baseline
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Meta-trains (or jointly trains) ``config.meta.method``, evaluates on held-out tasks.

    Resumes from the workdir's latest checkpoint. Returns the results, also in results.json.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    name, method = schema.kind_of(config)[1], config.meta.method
    if method not in METHODS[name]:
        raise ValueError(f"config.meta.method={method!r}; expected one of {METHODS[name]}")
    plan = loop.plan_from(config)
    family = FAMILIES[name](config, plan)
    plan.check_batch_size(config.optim[family.batch_size], what=f"config.optim.{family.batch_size}")
    tx = optax.adam(config.optim.lr)
    state = init_state(config, family.params, tx)
    logging.info("%s on %s: %d parameters", method, name, partition.count(family.params))

    # -- evaluators: held-out tasks every config.evals.every_steps, and the plugins ----------
    # Fine-tuning with Meta-SGD's learned rates (tuned for one step) may diverge at ten: that is
    # a result to report, not a broken run, so evaluations are not checked for NaN.
    on = dict(config=config, family=family, plan=plan)
    held_out = evaluation.held_out_adaptation(**on)
    evaluators = [
        loop.Evaluator(
            "held_out", held_out, every_steps=config.evals.every_steps, check_finite=False
        ),
        *loop.from_config(
            config.evals.get("plugins"), types=(PLUGINS[name],), check_finite=False, **on
        ),
    ]

    # -- loop: every batch is a pure function of (seed, step), so a restored state continues
    # the same run --------------------------------------------------------------------------
    run = loop.train(
        config, workdir, plan=plan, state=state, evaluators=evaluators,
        step_fn=build_step(config, family.loss_fn, tx, axis_name=models.axis_name(plan)),
        batch_at=family.batch_at, compiler_options=family.compiler_options,
    )  # fmt: skip
    if not run.finished:
        return {"step": run.step}

    # -- final evaluation --------------------------------------------------------------------
    summary, tasks, extras = held_out.full(run.state)
    results = {family.step_key: run.step, "method": method, **family.results, **summary}
    results["eval/num_tasks"] = config.evals.num_tasks
    return run.finish(
        results, logged=f"eval/{family.metric}", dpi=90,
        curves="" if config.plot_metrics else None, **family.publish(results, tasks, extras),
    )  # fmt: skip


def main(argv: list[str]) -> None:
    """``python -m experiments.trainers.meta --out=DIR RUN_DIR...``: table.md and plot of
    image-family runs."""
    out = pathlib.Path(next(a.split("=", 1)[1] for a in argv if a.startswith("--out=")))
    rows = [
        json.loads((pathlib.Path(a) / "results.json").read_text())
        for a in argv
        if not a.startswith("--") and (pathlib.Path(a) / "results.json").exists()
    ]
    out.mkdir(parents=True, exist_ok=True)
    report.save_json(out / "results.json", rows)
    table = reports.fewshot_table(rows, methods=METHODS["images"])
    report.save_text(out / "table.md", table)
    print(table)
    report.save_figure(reports.fewshot_plot(rows), out / "accuracy.png", dpi=90)


if __name__ == "__main__":
    main(sys.argv[1:])
