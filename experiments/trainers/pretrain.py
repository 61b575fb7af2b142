"""Pretraining for transfer: pretrain an encoder without labels, then probe and fine-tune it.

For each seed and each method of ``config.methods``:
  none:         no pretraining (the random-initialisation baseline);
  layerwise:    greedy layer-wise (denoising) autoencoders (`ftlab.pretrain.layerwise`);
  rotation:     rotation prediction (`ftlab.pretrain.ssl`);
  contrastive:  SimCLR-style NT-Xent over two augmented views (`ftlab.pretrain.ssl`);
the encoder then gets a fresh head and trains on ``config.data.label_fractions`` of the train
labels (drawn per class, nested across fractions), once as a linear probe (encoder frozen) and
once fully fine-tuned, and is scored on the test split.

A `finished.sweep` of (seed, method) runs, each training (a pretext task, a layer-wise stage,
a probe or fine-tuning) a short run in ``runs/seed<s>_<method>/<part>/``; an unfinished (seed,
method) run starts over. results.json/.md hold every accuracy (per seed, mean/std),
transfer.png the test accuracy against label fraction, plots/ the first seed's pretext losses.
"""

from __future__ import annotations

import pathlib
import platform
import shutil
import time

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from experiments import finished, loop, reports
from ftlab.core import parallel, partition, train
from ftlab.data import images
from ftlab.pretrain import layerwise, network, ssl, transfer

METHODS = ("none", "layerwise", "rotation", "contrastive")
MODES = ("probe", "finetune")
# The loop's folders of each (seed, method) run: runs/seed<s>_<method>/{pretext,stage<k>,
# <mode>_<fraction>} (checkpoint, metrics.jsonl); emptied when that run starts over.
RUNS = "runs"


# Step `step`'s rows: `batch_size` distinct ones drawn with fold_in(rng, step), so that a run
# is a pure function of its inputs.
_draw = jax.jit(
    lambda rng, step, n, size: jax.random.choice(
        jax.random.fold_in(rng, step), n, (size,), replace=False
    ),
    static_argnums=(2, 3),
)


def rows_at(plan: parallel.Plan, arrays: dict, rng, *, batch_size: int, what: str):
    """``step -> batch`` of ``batch_size`` rows of the in-memory ``arrays`` (`_draw`)."""
    n = len(next(iter(arrays.values())))
    if batch_size > n:
        raise ValueError(
            f"{what}={batch_size} is larger than the {n} rows available; "
            "lower the batch size or use more data."
        )
    plan.check_batch_size(batch_size, what=what)

    def batch_at(step):
        idx = np.asarray(_draw(rng, np.int32(step), n, batch_size))
        return {k: v[idx] for k, v in arrays.items()}

    return batch_at


def pretrain_encoder(config, fits, method, train_images, *, seed: int, workdir, writer=None):
    """Pretrains an encoder on unlabelled images; returns it and its final pretext loss.

    Each training (a pretext task, or one layer-wise stage) is a run of the loop in its own
    folder under ``workdir``; ``writer`` (if any) gets their lines as ``pretrain/<method>/...``.
    The final loss is the mean of the last (stage's) ten steps (None for ``none``).
    """
    p, features = config.pretrain, tuple(config.model.features)
    tx = optax.adam(p.lr)
    input_dim = int(np.prod(train_images.shape[1:]))
    rng = jax.random.PRNGKey(seed)
    rows = lambda rng: rows_at(  # noqa: E731
        fits.plan, {"image": train_images}, rng, batch_size=p.batch_size,
        what="config.pretrain.batch_size",
    )  # fmt: skip
    log = dict(writer=writer, prefix=f"pretrain/{method}/")
    if method == "none":
        return network.init_mlp(rng, input_dim=input_dim, features=features), None
    if method == "layerwise":
        # Stage k trains layer k (and its decoder) from a fresh optimizer state.
        params = layerwise.init(rng, input_dim=input_dim, features=features)
        for k in range(len(params["encoder"])):
            rules = layerwise.stage_rules(k)
            label_tree = partition.labels(params, rules, what=f"layerwise.stage_rules({k})")
            run = fits(
                workdir / f"stage{k}", train.init_state(params, label_tree, tx, seed=seed + k),
                layerwise.make_stage_loss(k, noise_std=p.layerwise_noise_std), tx,
                rows(jax.random.fold_in(rng, k)), num_steps=p.layerwise_steps_per_stage,
                key=("layerwise", k), step_offset=k * p.layerwise_steps_per_stage,
                extra={"pretrain/layerwise/stage": k}, **log,
            )  # fmt: skip
            params = run.state.params
    else:
        if method == "rotation":
            params = ssl.init_rotation(rng, input_dim=input_dim, features=features)
            loss_fn, steps = ssl.rotation_loss, p.rotation_steps
        elif method == "contrastive":
            params = ssl.init_contrastive(
                rng, input_dim=input_dim, features=features, projector=tuple(p.projector)
            )
            loss_fn = ssl.make_contrastive_loss(
                temperature=p.temperature, max_shift=p.max_shift, noise_std=p.augment_noise_std
            )
            steps = p.contrastive_steps
        else:
            raise ValueError(
                f"config.methods: unknown method {method!r}; expected one of {METHODS}"
            )
        labels = partition.labels(params, [(".*", "train")])
        state = train.init_state(params, labels, tx, seed=seed)
        run = fits(workdir / "pretext", state, loss_fn, tx, rows(rng), num_steps=steps,
                   key=method, **log)  # fmt: skip
    final_loss = float(np.mean([m["train/loss"] for m in run.history[-10:]]))
    return run.state.params["encoder"], final_loss


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every (seed, method, label fraction, mode) and writes the table and plot.

    Returns:
      The contents of ``workdir/results.json``.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    finished.check_methods(config, METHODS)

    # -- data -------------------------------------------------------------------------------
    splits = images.load(
        config.data.dataset, test_fraction=config.data.test_fraction, seed=config.data.seed
    )
    tr, te = splits["train"], splits["test"]
    num_classes = int(tr.label.max()) + 1
    fractions = tuple(config.data.label_fractions)
    logging.info("data: %d train, %d test, %d classes", len(tr.label), len(te.label), num_classes)

    # -- downstream optimizers and compiled fits (shared across seeds and methods) ----------
    t = config.transfer
    txs = {
        mode: optax.adamw(lr, weight_decay=t.weight_decay)
        for mode, lr in (("probe", t.probe_lr), ("finetune", t.finetune_lr))
    }
    plan = loop.plan_from(config)
    if "contrastive" in config.methods:  # NT-Xent contrasts each view with the whole batch
        loop.refuse_pmap(plan, "splits the batch of config.methods' 'contrastive' (NT-Xent)")
    fits = finished.Fits(plan, log_every=config.log_every_steps)

    def downstream(encoder, mode, arrays, seed, folder):
        params = transfer.new_classifier(
            encoder, jax.random.PRNGKey(10_000 + seed), num_classes=num_classes
        )
        state = train.init_state(
            params, partition.labels(params, transfer.RULES[mode]), txs[mode], seed=seed
        )
        size = min(t.batch_size, len(arrays["label"]))
        rows = rows_at(fits.plan, arrays, jax.random.PRNGKey(seed), batch_size=size,
                       what="config.transfer.batch_size")  # fmt: skip
        run = fits(folder, state, transfer.classifier_loss, txs[mode], rows, num_steps=t.num_steps)
        return float(transfer.accuracy(run.state.params, te.images, te.label))

    # -- one (seed, method) run at a time, each kept when it finishes -----------------------
    first_seed = config.seeds[0]

    def metric_prefix(name: str) -> str | None:  # only the first seed writes pretext curves
        seed, method = name.split("_", 1)
        return f"pretrain/{method}/" if seed == f"seed{first_seed}" else None

    runs = {f"seed{s}_{m}": (s, m) for s in config.seeds for m in config.methods}

    def pretrain_and_transfer(name, writer) -> dict:
        """Pretrain, then probe and fine-tune at every label fraction, in an emptied folder.

        Returns ``{"accuracy": [[mode, fraction, labels, test accuracy], ...], "final_loss",
        "seconds"}`` (JSON, kept by `finished.sweep`).
        """
        (seed, method), folder = runs[name], workdir / RUNS / name
        shutil.rmtree(folder, ignore_errors=True)  # a run that did not finish starts over
        tick = time.perf_counter()
        writes = writer if seed == first_seed else None
        encoder, final_loss = pretrain_encoder(
            config, fits, method, tr.images, seed=seed, workdir=folder, writer=writes
        )
        seconds = time.perf_counter() - tick
        accuracy = []
        for fraction in fractions:
            idx = images.label_subset(tr.label, fraction=fraction, seed=seed)
            arrays = {"image": tr.images[idx], "label": tr.label[idx]}
            for mode in MODES:
                acc = downstream(encoder, mode, arrays, seed, folder / f"{mode}_{fraction:g}")
                accuracy.append([mode, fraction, len(idx), acc])
        return {"accuracy": accuracy, "final_loss": final_loss, "seconds": seconds}

    cells, stopped = finished.sweep(
        workdir, config, list(runs), pretrain_and_transfer, metric_prefix=metric_prefix
    )
    if stopped:
        return {"stopped": stopped}

    def pretext_mean(method, key):  # over seeds (None: no pretext loss, method "none")
        values = [c[key] for n, c in cells.items() if runs[n][1] == method and c[key] is not None]
        return float(np.mean(values)) if values else None

    # -- report -----------------------------------------------------------------------------
    records = [(runs[name][1], *r) for name, cell in cells.items() for r in cell["accuracy"]]
    rows = reports.mean_rows(records, ("method", "mode", "fraction", "labels"))
    results = {
        "dataset": config.data.dataset,
        "n_train": len(tr.label),
        "n_test": len(te.label),
        "seeds": list(config.seeds),
        "rows": rows,
        "pretext": {
            m: {
                "final_loss_mean": pretext_mean(m, "final_loss"),
                "seconds_mean": pretext_mean(m, "seconds"),
            }
            for m in config.methods
        },  # fmt: skip
        "wall_s": time.perf_counter() - start,
        "hardware": f"{platform.machine()} {jax.devices()[0].platform}",
    }
    table = reports.pretrain_table(rows, fractions)
    title = f"{config.data.dataset}: transfer after pretraining ({len(config.seeds)} seeds)"
    plot = lambda: reports.pretrain_plot(rows, title=title, modes=MODES)  # noqa: E731
    if reports.publish(workdir, results, table=table, figures={"transfer.png": plot},
                       curves="plots", dpi=110):  # fmt: skip
        print(table, flush=True)
    return results
