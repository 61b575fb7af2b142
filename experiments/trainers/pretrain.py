"""Pretraining for transfer: pretrain an encoder without labels, then probe and fine-tune it.

For each seed and each method of ``config.methods``:
  none:         no pretraining (the random-initialisation baseline);
  layerwise:    greedy layer-wise (denoising) autoencoders (`ftlab.pretrain.layerwise`);
  rotation:     rotation prediction (`ftlab.pretrain.ssl`);
  contrastive:  SimCLR-style NT-Xent over two augmented views (`ftlab.pretrain.ssl`);
the encoder then gets a fresh head and trains on ``config.data.label_fractions`` of the train
labels (drawn per class, nested across fractions), once as a linear probe (encoder frozen) and
once fully fine-tuned, and is scored on the test split.

Writes to the workdir: ``results.json`` (every accuracy, per seed and mean/std), ``results.md``
(the table), ``transfer.png`` (test accuracy against label fraction), ``metrics.jsonl`` with the
pretext losses of the first seed and their plots under ``plots/``. Each (seed, method) run is
kept in ``finished/`` when it completes (`experiments/trainers/finished.py`), so rerunning the
command after an interruption skips what finished.
"""

from __future__ import annotations

import pathlib
import platform
import time

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from experiments.trainers import finished
from ftlab.core import metrics as metrics_lib
from ftlab.core import partition, report, train
from ftlab.data import images
from ftlab.pretrain import layerwise, loop, network, ssl, transfer

METHODS = ("none", "layerwise", "rotation", "contrastive")
MODES = ("probe", "finetune")


class Pretrainer:
    """Pretrains encoders by ``config.pretrain``; compiled steps are reused across seeds."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.tx = optax.adam(config.pretrain.lr)
        self._fits: dict[str, object] = {}

    def _fit(self, method, loss_fn, num_steps):
        if method not in self._fits:
            step = train.make_train_step(loss_fn, self.tx)
            self._fits[method] = loop.make_fit(
                step, num_steps=num_steps, batch_size=self.config.pretrain.batch_size
            )
        return self._fits[method]

    def __call__(
        self, method: str, train_images: np.ndarray, *, seed: int
    ) -> tuple[dict, list[dict[str, np.ndarray]]]:
        """Pretrains an encoder on unlabelled images; returns it and its pretext metric curves."""
        p, features, tx = self.config.pretrain, tuple(self.config.model.features), self.tx
        input_dim = int(np.prod(train_images.shape[1:]))
        rng = jax.random.PRNGKey(seed)
        arrays = {"image": train_images}
        if method == "none":
            return network.init_mlp(rng, input_dim=input_dim, features=features), []
        if method == "layerwise":
            params = layerwise.init(rng, input_dim=input_dim, features=features)
            params, history = layerwise.pretrain(
                params,
                arrays,
                tx=tx,
                steps_per_stage=p.layerwise_steps_per_stage,
                batch_size=p.batch_size,
                seed=seed,
                noise_std=p.layerwise_noise_std,
            )
            return params["encoder"], history
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
        state = train.init_state(params, partition.labels(params, [(".*", "train")]), tx, seed=seed)
        state, metrics = self._fit(method, loss_fn, steps)(state, arrays, jax.random.PRNGKey(seed))
        return jax.device_get(state.params["encoder"]), [jax.device_get(metrics)]


def markdown(rows: list[dict], fractions) -> str:
    """One row per (method, mode), one column per label fraction: mean ± std test accuracy."""
    cells: dict[tuple, dict] = {}
    for r in rows:
        cells.setdefault((r["method"], r["mode"]), {})[r["fraction"]] = r
    table = []
    for (method, mode), by_fraction in cells.items():
        values = []
        for f in fractions:
            r = by_fraction[f]
            values.append(f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f}")
        table.append([method, mode, *values])
    header = ["method", "mode", *(f"{100 * f:g}% labels" for f in fractions)]
    return report.markdown_table(header, table)


def plot(rows: list[dict], *, title: str):
    """Test accuracy against label fraction (log x): colour = method, line style = mode."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    styles = {"probe": "-", "finetune": "--"}
    lines = []
    for method in methods:
        for mode in MODES:
            sel = sorted(
                (r for r in rows if r["method"] == method and r["mode"] == mode),
                key=lambda r: r["fraction"],
            )
            if not sel:
                continue
            lines.append(
                report.Line(
                    [r["fraction"] for r in sel],
                    [r["accuracy_mean"] for r in sel],
                    yerr=[r["accuracy_std"] for r in sel],
                    label=f"{method} ({mode})",
                    style={
                        "color": colors[method],
                        "linestyle": styles[mode],
                        "marker": "o",
                        "capsize": 3,
                    },
                )
            )
    return report.line_plot(
        lines,
        xscale="log",
        xlabel="fraction of train labels",
        ylabel="test accuracy",
        title=title,
        legend={"fontsize": 8, "ncol": 2},
        figsize=(7, 4.5),
        layout="constrained",
    )


def pretrain_and_transfer(
    method,
    seed,
    pretrain_encoder,
    downstream,
    train_split,
    fractions,
    writer,
    *,
    log_curves,
    log_every,
) -> dict:
    """One (seed, method) run: pretrain, then probe and fine-tune at every label fraction.

    Returns ``{"accuracy": [[mode, fraction, labels, test accuracy], ...], "final_loss",
    "seconds"}`` (JSON, kept by `finished.Runs`).
    """
    tick = time.perf_counter()
    encoder, history = pretrain_encoder(method, train_split.images, seed=seed)
    seconds = time.perf_counter() - tick
    if log_curves:
        offset = 0
        for stage, curves in enumerate(history):
            n_steps = len(curves["train/loss"])
            for s in range(log_every - 1, n_steps, log_every):
                record = {f"pretrain/{method}/{k[6:]}": v[s] for k, v in curves.items()}
                if method == "layerwise":
                    record["pretrain/layerwise/stage"] = stage
                writer.write(offset + s + 1, record)
            offset += n_steps
    accuracy = []
    for fraction in fractions:
        idx = images.label_subset(train_split.label, fraction=fraction, seed=seed)
        arrays = {"image": train_split.images[idx], "label": train_split.label[idx]}
        for mode in MODES:
            accuracy.append([mode, fraction, len(idx), downstream(encoder, mode, arrays, seed)])
    final_loss = float(np.mean(history[-1]["train/loss"][-10:])) if history else None
    return {"accuracy": accuracy, "final_loss": final_loss, "seconds": seconds}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs every (seed, method, label fraction, mode) and writes the table and plot.

    Returns:
      The contents of ``workdir/results.json``.
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for m in config.methods:
        if m not in METHODS:
            raise ValueError(f"config.methods: unknown method {m!r}; expected some of {METHODS}")

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
    fits: dict[tuple, object] = {}

    def downstream(encoder, mode, arrays, seed):
        n = len(arrays["label"])
        key = (mode, n)
        if key not in fits:
            step = train.make_train_step(transfer.classifier_loss, txs[mode])
            fits[key] = loop.make_fit(step, num_steps=t.num_steps, batch_size=min(t.batch_size, n))
        params = transfer.new_classifier(
            encoder, jax.random.PRNGKey(10_000 + seed), num_classes=num_classes
        )
        label_tree = partition.labels(params, transfer.RULES[mode])
        state = train.init_state(params, label_tree, txs[mode], seed=seed)
        state, _ = fits[key](state, arrays, jax.random.PRNGKey(seed))
        return float(transfer.accuracy(state.params, te.images, te.label))

    # -- loop: one (seed, method) run at a time, each kept when it finishes -----------------
    first_seed = config.seeds[0]

    def metric_prefix(name: str) -> str | None:  # only the first seed writes pretext curves
        seed, method = name.split("_", 1)
        return f"pretrain/{method}/" if seed == f"seed{first_seed}" else None

    past = finished.Runs(workdir, metric_prefix=metric_prefix, config=config)
    pretrain_encoder = Pretrainer(config)
    writer = past.open_writer()
    accuracy: dict[tuple, list[float]] = {}
    pretext: dict[str, dict[str, list[float]]] = {}
    runs = [(s, m) for s in config.seeds for m in config.methods]
    progress = metrics_lib.Progress(len(runs))
    for i, (seed, method) in enumerate(runs):
        name = f"seed{seed}_{method}"
        cell = past.get(name)
        if cell is None:
            cell = pretrain_and_transfer(
                method, seed, pretrain_encoder, downstream, tr, fractions, writer,
                log_curves=seed == first_seed, log_every=config.log_every_steps,
            )  # fmt: skip
            past.put(name, cell)
        info = pretext.setdefault(method, {"final_loss": [], "seconds": []})
        info["seconds"].append(cell["seconds"])
        if cell["final_loss"] is not None:
            info["final_loss"].append(cell["final_loss"])
        for mode, fraction, n_labels, acc in cell["accuracy"]:
            accuracy.setdefault((method, mode, fraction, n_labels), []).append(acc)
        progress.update(i + 1, method=method, seed=seed)
    progress.close()
    writer.close()

    # -- report -----------------------------------------------------------------------------
    rows = [
        {
            "method": method,
            "mode": mode,
            "fraction": fraction,
            "labels": n_labels,
            "accuracy_mean": float(np.mean(accs)),
            "accuracy_std": float(np.std(accs)),
            "accuracy": accs,
        }
        for (method, mode, fraction, n_labels), accs in accuracy.items()
    ]
    results = {
        "dataset": config.data.dataset,
        "n_train": len(tr.label),
        "n_test": len(te.label),
        "seeds": list(config.seeds),
        "rows": rows,
        "pretext": {
            m: {"final_loss_mean": float(np.mean(v["final_loss"])) if v["final_loss"] else None}
            | {"seconds_mean": float(np.mean(v["seconds"]))}
            for m, v in pretext.items()
        },
        "wall_s": time.perf_counter() - start,
        "hardware": f"{platform.machine()} {jax.devices()[0].platform}",
    }
    table = markdown(rows, fractions)
    report.save_table(workdir / "results", markdown=table, data=results)
    title = f"{config.data.dataset}: transfer after pretraining ({len(config.seeds)} seeds)"
    report.save_figure(plot(rows, title=title), workdir / "transfer.png", dpi=110)
    if (workdir / metrics_lib.JSONL_NAME).stat().st_size:
        metrics_lib.plot_curves(workdir / metrics_lib.JSONL_NAME, workdir / "plots")
    print(table, flush=True)
    return results
