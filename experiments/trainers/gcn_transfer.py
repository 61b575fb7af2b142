"""Semi-supervised node classification with a GCN, and transfer from self-supervised pretraining.

For each seed, a GCN encoder (`ftlab.models.gcn`, layers ``config.model.features``, identity
node features as Kipf & Welling use for featureless graphs) is pretrained without labels as a
graph auto-encoder (Kipf & Welling 2016, arXiv:1611.07308): the inner product of two nodes'
embeddings scores whether they are linked, trained with binary cross-entropy on every edge
against ``config.pretrain.negatives`` random node pairs per edge. Then, with
``config.data.labels_per_class`` labelled nodes of each class (the rest are the test nodes),
a classifier ``encoder -> Dense head`` trains, full batch, by each method of ``config.methods``:

  scratch:  random initialisation, every leaf trained (Kipf & Welling's semi-supervised GCN);
  probe:    the pretrained encoder frozen, the head trained (a linear probe);
  finetune: the pretrained encoder and the head trained;
  lora:     the pretrained encoder frozen, LoRA on its layer kernels and the head trained.

Writes ``results.json`` / ``results.md`` (test accuracy, mean ± std over seeds, per method and
labels per class), ``transfer.png`` (accuracy against labels per class); each seed's pretext
loss curve is in its record under ``finished/``. Each training is a short run of
`experiments.loop` in ``runs/seed<s>/<part>/``; a finished seed is kept in ``finished/``
(`experiments.finished`), so the rerun of an interrupted command skips it.
"""

from __future__ import annotations

import pathlib
import platform
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from experiments import finished, reports
from ftlab.core import parallel, partition, train
from ftlab.data import graphs
from ftlab.models import gcn
from ftlab.peft import lora

METHODS = ("scratch", "probe", "finetune", "lora")
PROPAGATION = ("dense", "sparse")
RUNS = "runs"


def link_loss(encode, negatives: int):
    """Graph auto-encoder loss: BCE of ``sigmoid(z_i . z_j)`` on the batch's edges against
    ``negatives`` uniformly drawn node pairs per edge (drawn from the step's ``rng``)."""

    def loss_fn(params, batch, rng):
        z = encode(params)
        s, r = batch["edges"][:, 0], batch["edges"][:, 1]
        pos = jnp.sum(z[s] * z[r], -1)
        neg_pairs = jax.random.randint(rng, (len(s) * negatives, 2), 0, z.shape[0])
        neg = jnp.sum(z[neg_pairs[:, 0]] * z[neg_pairs[:, 1]], -1)
        loss = jnp.mean(optax.sigmoid_binary_cross_entropy(pos, jnp.ones_like(pos)))
        loss += jnp.mean(optax.sigmoid_binary_cross_entropy(neg, jnp.zeros_like(neg)))
        accuracy = 0.5 * (jnp.mean(pos > 0) + jnp.mean(neg < 0))
        return loss, {"link_accuracy": accuracy}

    return loss_fn


def node_loss(logits_fn):
    """Mean cross-entropy of the batch's labelled ``nodes``; ``logits_fn(params, rng)``."""

    def loss_fn(params, batch, rng):
        logits = logits_fn(params, rng)[batch["nodes"]]
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    return loss_fn


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every (seed, method, labels per class) and writes the table and plot.

    Returns:
        The contents of ``workdir/results.json`` (or ``{"stopped": name}`` after a signal).
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    finished.check_methods(config, METHODS)

    # -- data -------------------------------------------------------------------------------
    g = graphs.load(config.data.dataset)
    n, num_classes = len(g.labels), len(g.classes)
    if config.data.propagation == "dense":
        graph = jnp.asarray(gcn.renormalized_adjacency(g.adjacency))
    else:
        graph = gcn.Edges(*map(jnp.asarray, gcn.renormalized_edges(g.adjacency)[:3]), n)
    upper = np.triu((g.adjacency != 0) | (g.adjacency.T != 0), 1)
    edges = np.stack(np.nonzero(upper), 1).astype(np.int32)
    features = jnp.eye(n, dtype=jnp.float32)
    logging.info("data: %s, %d nodes, %d edges, %d classes", config.data.dataset, n, len(edges),
                 num_classes)  # fmt: skip

    # -- models -----------------------------------------------------------------------------
    m = config.model
    encoder = gcn.GCN(tuple(m.features), dropout_rate=m.dropout_rate)
    classifier = gcn.GCN(
        tuple(m.features), num_classes=num_classes, dropout_rate=m.dropout_rate, head="linear"
    )

    def classify(params, rng=None):
        rngs = {"dropout": rng} if rng is not None else {}
        return classifier.apply({"params": params}, graph, features, train=rng is not None,
                                rngs=rngs)  # fmt: skip

    p = config.peft
    classify_lora = lora.wrap_apply(classify, alpha=p.alpha, rank=p.rank)
    predict = {a: jax.jit(a) for a in (classify, classify_lora)}
    losses = {a: node_loss(a) for a in (classify, classify_lora)}
    # Full-graph training: every step's batch is the whole graph (edges, all nodes), which
    # has no batch axis to split over devices; one device holds it (a graph too large for
    # one device needs neighbour sampling, not built). The config has no parallel group.
    plan = parallel.make_plan("mesh", num_devices=1)
    wd = config.optim.weight_decay
    txs = {lr: optax.adamw(lr, weight_decay=wd) for lr in set(config.optim.lr.values())}
    pretext_tx = optax.adam(config.pretrain.lr)
    pretext_loss = link_loss(
        lambda q: encoder.apply({"params": q}, graph, features), config.pretrain.negatives
    )

    fits = finished.Fits(plan, log_every=config.log_every_steps)

    def fit(folder, key, params, rules, loss_fn, tx, batch, *, num_steps, seed):
        # One step function per (loss, optimizer): runs that share them (every seed; scratch
        # and finetune at one learning rate) share one compilation.
        label_tree = partition.labels(params, rules, what=f"rules of {folder.name}")
        state = train.init_state(params, label_tree, tx, seed=seed)
        run = fits(folder, state, loss_fn, tx, lambda step: batch, num_steps=num_steps, key=key)
        return run.state.params, [float(x["train/loss"]) for x in run.history]

    # -- one seed: pretrain, then every method at every number of labels -------------------
    def one_seed(seed: int, folder: pathlib.Path) -> dict:
        shutil.rmtree(folder, ignore_errors=True)  # a seed that did not finish starts over
        rng = jax.random.PRNGKey(seed)
        params = encoder.init(rng, graph, features)["params"]
        pretrained, curve = fit(
            folder / "pretrain", "pretrain", params, [(".*", "train")], pretext_loss, pretext_tx,
            {"edges": edges}, num_steps=config.pretrain.steps, seed=seed,
        )  # fmt: skip
        accuracy = []
        for k in config.data.labels_per_class:
            nodes = graphs.label_subset(g.labels, per_class=k, seed=seed)
            test = np.setdiff1d(np.arange(n), nodes)
            batch = {"nodes": nodes.astype(np.int32), "label": g.labels[nodes]}
            for method in config.methods:
                fresh = classifier.init(jax.random.fold_in(rng, 1), graph, features)["params"]
                params, apply, rules = dict(fresh), classify, [(".*", "train")]
                if method != "scratch":
                    params.update({name: pretrained[name] for name in pretrained})
                if method == "probe":
                    rules = [("head/.*", "train"), (".*", "frozen")]
                elif method == "lora":
                    params = lora.init(
                        params, jax.random.fold_in(rng, 2), targets=list(p.targets),
                        rank=p.rank, alpha=p.alpha, what="config.peft",
                    )  # fmt: skip
                    apply, rules = classify_lora, lora.rules(extra=[("head/.*", "train")])
                lr = config.optim.lr[method]
                params, _ = fit(
                    folder / f"{method}_{k}", (id(apply), lr), params, rules, losses[apply],
                    txs[lr], batch, num_steps=config.optim.num_steps, seed=seed,
                )  # fmt: skip
                predicted = np.argmax(np.asarray(predict[apply](params)), -1)
                acc = float(np.mean(predicted[test] == g.labels[test]))
                accuracy.append([method, k, len(nodes), acc])
        return {"accuracy": accuracy, "pretext_curve": curve}

    seeds = {f"seed{seed}": seed for seed in config.seeds}
    done, stopped = finished.sweep(
        workdir, config, list(seeds), lambda name, _: one_seed(seeds[name], workdir / RUNS / name)
    )
    if stopped:
        return {"stopped": stopped}
    pretext = [cell["pretext_curve"] for cell in done.values()]

    # -- report -----------------------------------------------------------------------------
    records = [r for cell in done.values() for r in cell["accuracy"]]
    rows = reports.mean_rows(records, ("method", "labels_per_class", "labels"))
    last = [c[-1] for c in pretext if c]
    results = {
        "dataset": config.data.dataset,
        "nodes": n,
        "edges": int(len(edges)),
        "classes": list(g.classes),
        "seeds": list(config.seeds),
        "rows": rows,
        "pretext_final_loss_mean": float(np.mean(last)) if last else None,
        "wall_s": time.perf_counter() - start,
        "hardware": f"{platform.machine()} {jax.devices()[0].platform}",
    }
    table = reports.gcn_transfer_table(rows, tuple(config.data.labels_per_class))
    plot = lambda: reports.gcn_transfer_plot(  # noqa: E731
        rows, dataset=config.data.dataset, num_seeds=len(config.seeds)
    )
    if reports.publish(workdir, results, table=table, figures={"transfer.png": plot}, dpi=110):
        print(table, flush=True)
    return results
