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

from experiments import loop
from ftlab import meta
from ftlab.core import parallel, partition, report, train
from ftlab.data import fewshot

METHODS = ("maml", "fomaml", "anil", "reptile", "finetune")


class Norm(nn.Module):
    """Normalisation without running statistics; learned ``scale`` and ``bias`` per channel.

    ``batch``: over (examples, H, W) of the batch given, i.e. transductive within an episode.
    ``instance``: over (H, W, C) of each example alone.
    """

    kind: str = "batch"
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):  # [n, H, W, C]
        axes = {"batch": (0, 1, 2), "instance": (1, 2, 3)}[self.kind]
        mean = jnp.mean(x, axes, keepdims=True)
        var = jnp.var(x, axes, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + self.eps)
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return x * scale.reshape(1, 1, 1, c) + bias.reshape(1, 1, 1, c)


class ConvNet(nn.Module):
    """``blocks`` x [conv 3x3 stride 2, Norm, ReLU] -> flatten -> Dense ``head``."""

    ways: int
    filters: int = 32
    blocks: int = 3
    norm: str = "batch"

    @nn.compact
    def __call__(self, x):  # [n, H, W] -> [n, ways]
        x = x[..., None]
        for i in range(self.blocks):
            x = nn.Conv(self.filters, (3, 3), strides=2, padding="SAME", name=f"conv_{i}")(x)
            x = nn.relu(Norm(self.norm, name=f"norm_{i}")(x))
        return nn.Dense(self.ways, name="head")(x.reshape(x.shape[0], -1))


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


def inner_rules(config):
    return meta.head_rules() if config.meta.method == "anil" else meta.ALL


def build_model(config, ways, image_shape):
    m = config.model
    model = ConvNet(ways=ways, filters=m.filters, blocks=m.blocks, norm=m.norm)
    init = jax.jit(model.init)  # one compile, not one per op
    params = init(jax.random.PRNGKey(config.seed), jnp.zeros((2, *image_shape)))["params"]
    return model, params


def fresh_head(params, ways):
    """``params`` with a zero ``head`` of ``ways`` outputs (the fine-tune baseline at test time)."""
    feat = params["head"]["kernel"].shape[0]
    head = {"kernel": jnp.zeros((feat, ways)), "bias": jnp.zeros((ways,))}
    return {**params, "head": head}


def make_evaluator(config, loss_fn, accuracy, rules, inner_lr):
    """``evaluate(params, episodes) -> query accuracy [tasks, max_steps + 1]`` after 0.. steps."""
    max_steps = max(config.evals.num_steps)

    def trajectory(params, task):
        def step(p, _):
            acc = accuracy(p, task["query"])
            p = meta.adapt(
                p, task["support"], loss_fn=loss_fn, inner_lr=inner_lr, num_steps=1, rules=rules
            )
            return p, acc

        last, accs = jax.lax.scan(step, params, None, length=max_steps)
        return jnp.concatenate([accs, accuracy(last, task["query"])[None]])

    return jax.jit(jax.vmap(trajectory, in_axes=(None, 0)))


def summarize(accs: np.ndarray, steps) -> dict[str, float]:
    """Mean accuracy and the 95% half-width ``1.96 std / sqrt(n)`` per number of steps."""
    out = {}
    for k in sorted({0, *steps}):
        out[f"eval/acc_step_{k}"], out[f"eval/acc_step_{k}_ci95"] = report.interval95(accs[:, k])
    return out


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
    image_shape = data.images.shape[2:]
    ways = d.ways
    rules = inner_rules(config)
    tx = optax.adam(config.optim.lr)
    plan = parallel.make_plan(config.parallel.mode, num_devices=config.parallel.num_devices)
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
    # pmap runs the step per device: the gradient mean then needs the axis' name
    axis = parallel.DATA_AXIS if plan.mode == "pmap" else None

    if method == "finetune":
        model, params = build_model(config, len(train_ids), image_shape)
        loss_fn, _ = make_fns(model)
        state = train.init_state(
            params, partition.labels(params, [(".*", "train")]), tx, seed=config.seed
        )
        step_fn = train.make_train_step(loss_fn, tx, axis_name=axis)

        def batch_at(step):
            return fewshot.sample_batch(
                data.images, train_ids, d.seed, step, batch_size=config.optim.pretrain_batch_size
            )
    else:
        model, params = build_model(config, ways, image_shape)
        loss_fn, _ = make_fns(model)
        state = train.init_state(
            params, partition.labels(params, [(".*", "train")]), tx, seed=config.seed
        )
        kw = dict(
            inner_lr=config.meta.inner_lr,
            num_steps=config.meta.inner_steps,
            rules=rules,
            axis_name=axis,
        )
        if method == "reptile":
            step_fn = meta.make_reptile_step(loss_fn, tx, **kw)
        else:
            step_fn = meta.make_meta_step(loss_fn, tx, first_order=method == "fomaml", **kw)

        def batch_at(step):
            ep = fewshot.sample_episodes(
                data.images,
                train_ids,
                d.seed,
                step,
                num_tasks=config.optim.meta_batch_size,
                ways=ways,
                shots=d.shots,
                query=d.query,
            )
            return {"support": ep["support"], "query": ep["query"]}

    logging.info("%s on %s: %d parameters", method, d.dataset, partition.count(params))

    # -- loop: every batch is a pure function of (seed, step), so a restored state continues
    # the same run --------------------------------------------------------------------------
    run = loop.train(config, workdir, plan=plan, state=state, step_fn=step_fn, batch_at=batch_at)
    if not run.finished:
        return {"step": run.step}
    total = run.step

    # -- evaluation on held-out classes ------------------------------------------------------
    m = config.model
    eval_model = ConvNet(ways=ways, filters=m.filters, blocks=m.blocks, norm=m.norm)
    eval_loss, eval_acc = make_fns(eval_model)
    params = plan.get_state(run.state).params
    if method == "finetune":
        params = fresh_head(params, ways)
        eval_rules, eval_lr = tuple(e.finetune_rules), e.finetune_lr
    else:
        eval_rules, eval_lr = rules, config.meta.inner_lr
    evaluate = make_evaluator(config, eval_loss, eval_acc, eval_rules, eval_lr)
    chunks = []
    for i in range(0, e.num_tasks, e.chunk):
        ep = fewshot.sample_episodes(
            data.images,
            test_ids,
            e.seed,
            i // e.chunk,
            num_tasks=e.chunk,
            ways=ways,
            shots=d.shots,
            query=e.query,
        )
        chunks.append(
            np.asarray(evaluate(params, {"support": ep["support"], "query": ep["query"]}))
        )
    accs = np.concatenate(chunks)[: e.num_tasks]
    results = {
        "method": method,
        "dataset": d.dataset,
        "synthetic": data.synthetic,
        "ways": ways,
        "shots": d.shots,
        "norm": config.model.norm,
        "transductive": config.model.norm == "batch",
        "meta_iterations": total,
        "train_classes": len(train_ids),
        "test_classes": len(test_ids),
        "eval/num_tasks": int(len(accs)),
        "eval/query_per_class": e.query,
        **summarize(accs, e.num_steps),
        "train_seconds_this_run": run.train_seconds,
    }
    if run.is_chief:
        run.write({k: v for k, v in results.items() if k.startswith("eval/acc")})
        report.save_json(workdir / "results.json", results)
        write_table([results], workdir / "results.md")
        plot([results], workdir / "accuracy.png")
        logging.info("results: %s", json.dumps(results))
    run.close()
    return results


def write_table(rows: list[dict], path) -> str:
    """A markdown table: one row per run, accuracy (%) +- 95% interval after each step count."""
    steps = sorted({int(k[len("eval/acc_step_") :]) for r in rows for k in r if _is_acc(k)})
    head = ["dataset", "shots", "method", "iters", *[f"{k} steps" for k in steps]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["shots"], METHODS.index(r["method"]))):
        name = r["dataset"] + (" (synthetic)" if r["synthetic"] else "")
        cells = [name, f"5-way {r['shots']}-shot", r["method"], str(r["meta_iterations"])]
        for k in steps:
            a, ci = r.get(f"eval/acc_step_{k}"), r.get(f"eval/acc_step_{k}_ci95")
            cells.append("-" if a is None else f"{100 * a:.1f} +- {100 * ci:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    pathlib.Path(path).write_text(text)
    return text


def _is_acc(key: str) -> bool:
    return key.startswith("eval/acc_step_") and not key.endswith("_ci95")


def plot(rows: list[dict], path) -> None:
    """Accuracy against fine-tuning steps, one panel per (dataset, shots), 95% error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = sorted({(r["dataset"], r["shots"]) for r in rows})
    fig = Figure(figsize=(4.0 * len(panels), 3.4))
    FigureCanvasAgg(fig)
    for i, (ds, shots) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for r in rows:
            if (r["dataset"], r["shots"]) != (ds, shots):
                continue
            ks = sorted(int(k[len("eval/acc_step_") :]) for k in r if _is_acc(k))
            acc = [100 * r[f"eval/acc_step_{k}"] for k in ks]
            ci = [100 * r[f"eval/acc_step_{k}_ci95"] for k in ks]
            ax.errorbar(ks, acc, yerr=ci, marker="o", capsize=3, label=r["method"])
        synth = " (synthetic)" if ds == "glyphs" else ""
        ax.set_title(f"{ds}{synth}, 5-way {shots}-shot")
        ax.set_xlabel("fine-tuning steps")
        ax.set_ylabel("query accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str]) -> None:
    """``python -m experiments.trainers.fewshot --out=DIR RUN_DIR...``: table.md and plot."""
    out = pathlib.Path(next(a.split("=", 1)[1] for a in argv if a.startswith("--out=")))
    rows = [
        json.loads((pathlib.Path(a) / "results.json").read_text())
        for a in argv
        if not a.startswith("--") and (pathlib.Path(a) / "results.json").exists()
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(write_table(rows, out / "table.md"))
    plot(rows, out / "accuracy.png")


if __name__ == "__main__":
    main(sys.argv[1:])
