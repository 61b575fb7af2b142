"""Transfer of a class-conditional flow-matching model to classes it never saw, from few images.

A U-Net flow (`ftlab.models.diffusion`) is pretrained on every train image of the source
classes ``config.data.source_classes`` (digits 0-4 by default), then trained on
``config.data.shots`` train images of each target class (digits 5-9) by each method of
``config.methods``:

  scratch: a fresh model, every leaf trained (the baseline pretraining must beat);
  full:    the pretrained model, every leaf trained;
  lora:    the pretrained model frozen, LoRA (`ftlab.peft.lora`) on the `nn.Conv` and `nn.Dense`
           layers ``config.peft.targets`` picks, plus the leaves ``config.peft.train``;
  embed:   the pretrained model frozen but its class embedding ``label_embed`` (a new class is
           a new input to a frozen generator, as in textual inversion).

Quality of a model = its samples, conditioned on the target classes, seen by a separately
trained judge: a small CNN classifier of all 10 classes (the train split, `Judge`). Reported per
method: the judge's accuracy on the samples (does a "7" look like a 7), the Frechet distance
between the judge's penultimate features of the samples and of the held-out test images of the
target classes (FID's recipe with a feature extractor that knows digits: are the samples as
varied and as placed as real ones), and the flow-matching loss on those test images (fixed
noise and times; lower is a better fit of held-out data). Reference rows: the pretrained model
unadapted, and real images (all train images of the target classes) in place of samples, the
floor that finite samples of the test images allow.

Writes to the workdir: ``results.json`` / ``results.md`` (the table), ``samples_<shots>.png``
(a grid of samples per method beside real test images), ``pretrain.png`` (the pretrained model's
source classes), ``transfer.png`` (train loss against step per method), ``metrics.jsonl``.
Each training is a short run of `experiments.loop` under ``runs/<name>/``; the judge and the
pretrained model resume from their checkpoints, and each finished (method, shots) is kept in
``finished/`` (`experiments.finished`), so the rerun of an interrupted command skips it.
"""

from __future__ import annotations

import functools
import pathlib
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from experiments import finished, loop, reports
from ftlab.core import partition, report, train
from ftlab.data import images
from ftlab.models import diffusion
from ftlab.peft import dense, lora

METHODS = ("scratch", "full", "lora", "embed")
RUNS = "runs"
PRETRAIN = "pretrain"
JUDGE = "judge"


class Judge(nn.Module):
    """A small CNN classifier ``[n, h, w] -> (logits [n, classes], features [n, features])``;
    the features (after the last hidden layer's ReLU) are the space of the Frechet distance."""

    num_classes: int
    features: int = 32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3), name="conv_0")(x[..., None]))
        x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2), name="conv_1")(x))
        h = nn.relu(nn.Dense(self.features, name="features")(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes, name="head")(h), h


def init_key(seed: int) -> jax.Array:
    """The key that initialises weights: XLA's RngBitGenerator ("rbg"), not threefry.

    An init draws one array per leaf, and on CPU XLA compiles the U-Net's init about 3.5 times
    faster with rbg (9 s against 33 s for the test model on a loaded 2-core VM). Its bits may
    differ between backends or XLA versions; a run's numbers are reproducible on one machine,
    and the checkpoints (not the seed) are what a rerun resumes from.
    """
    return jax.random.key(seed, impl="rbg")


def few_shot(label: np.ndarray, classes, shots: int, *, seed: int) -> np.ndarray:
    """Sorted indices of the first ``shots`` examples of each class in ``classes`` under a
    per-class permutation of ``seed`` (so the images of fewer shots are among those of more).

    Raises:
        ValueError: A class has fewer than ``shots`` examples.
    """
    keep = []
    for c in classes:
        members = np.random.default_rng([seed, int(c)]).permutation(np.flatnonzero(label == c))
        if len(members) < shots:
            raise ValueError(f"class {c} has {len(members)} train images, fewer than {shots}")
        keep.append(members[:shots])
    return np.sort(np.concatenate(keep))


def batch_fn(data: dict[str, np.ndarray], *, batch_size: int, seed: int):
    """``step -> batch`` of ``batch_size`` examples drawn with replacement, a pure function of
    the step (so a resumed run sees the batches an uninterrupted one would)."""
    n = len(data["label"])

    def batch_at(step: int) -> dict[str, np.ndarray]:
        idx = np.random.default_rng((seed, step)).integers(0, n, batch_size)
        return {k: v[idx] for k, v in data.items()}

    return batch_at


def to_model(x: np.ndarray) -> np.ndarray:
    """Images in [0, 1] ``[n, h, w]`` -> the model's [-1, 1] ``[n, h, w, 1]``."""
    return (2.0 * x - 1.0)[..., None].astype(np.float32)


def to_images(x) -> np.ndarray:
    """The model's ``[n, h, w, 1]`` -> images clipped to [0, 1] ``[n, h, w]``."""
    return np.clip((np.asarray(x, np.float32)[..., 0] + 1.0) / 2.0, 0.0, 1.0)


def judge_loss(judge: Judge):
    def loss_fn(params, batch, rng):
        del rng
        logits, _ = judge.apply({"params": params}, batch["image"])
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    return loss_fn


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the judge and the pretrained flow, adapts with every method at every number of
    shots, and writes the table and the sample grids.

    Returns:
        The contents of ``workdir/results.json`` (or ``{"stopped": name}`` after a signal).
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    finished.check_methods(config, METHODS)

    # -- data -------------------------------------------------------------------------------
    d = config.data
    splits = images.load(d.dataset, test_fraction=d.test_fraction, seed=d.seed)
    tr, te = splits["train"], splits["test"]
    num_classes = int(max(tr.label.max(), te.label.max())) + 1
    for key in ("source_classes", "target_classes"):
        bad = [c for c in getattr(d, key) if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"config.data.{key}: {bad} not among the {num_classes} classes")
    if set(d.source_classes) & set(d.target_classes):
        raise ValueError("config.data.source_classes and target_classes overlap")
    targets = np.asarray(d.target_classes, np.int32)
    source = np.isin(tr.label, d.source_classes)
    source_data = {"image": to_model(tr.images[source]), "label": tr.label[source]}
    test_mask = np.isin(te.label, targets)
    test_target = {"image": to_model(te.images[test_mask]), "label": te.label[test_mask]}
    train_target = np.isin(tr.label, targets)
    shape = source_data["image"].shape[1:]
    logging.info(
        "data: %s %s, %d source train images; targets %s, %d test images",
        d.dataset, list(d.source_classes), len(source_data["label"]), list(targets),
        len(test_target["label"]),
    )  # fmt: skip

    # -- models, methods, and one short run of the loop per training --------------------------
    unet = diffusion.UNet(
        tuple(config.model.features), num_classes=num_classes, embed_dim=config.model.embed_dim
    )
    base_apply = lambda q, x, t, y: unet.apply({"params": q}, x, t, y)  # noqa: E731
    p = config.peft
    lora_apply = lora.wrap_apply(base_apply, alpha=p.alpha, rank=p.rank)
    example = (jnp.zeros((1, *shape)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
    # Compiled: an eager init dispatches (and compiles) every small op of the model one by one.
    init_fn = jax.jit(lambda key: unet.init(key, *example)["params"])
    init = lambda seed: init_fn(init_key(seed))  # noqa: E731
    judge = Judge(num_classes, features=config.judge.features)
    plan = loop.plan_from(config)
    for key, size in (("optim.batch_size", config.optim.batch_size),
                      ("judge.batch_size", config.judge.batch_size)):  # fmt: skip
        plan.check_batch_size(size, what=f"config.{key}")
    fits = finished.Fits(plan, log_every=config.log_every_steps)
    # what a run trains, by name: the flow (plain or with LoRA's interceptor) or the judge
    applies = {"base": base_apply, "lora": lora_apply}
    losses = {k: diffusion.make_loss_fn(a) for k, a in applies.items()}
    losses[JUDGE] = judge_loss(judge)

    def fit(folder, params, rules, kind, lr, batch_at, *, num_steps, fresh):
        label_tree = partition.labels(params, rules, what=f"rules of {folder.name}")
        tx = optax.adam(lr)
        state = train.init_state(params, label_tree, tx, seed=config.seed)
        # One step function per (loss, learning rate): shared by runs alike.
        run = fits(folder, state, losses[kind], tx, batch_at, num_steps=num_steps,
                   key=(kind, lr), fresh=fresh)  # fmt: skip
        curve = [float(m["train/loss"]) for m in run.history]
        # short_run hands back one host copy of the state already (under pmap too)
        return run.state.params, curve, partition.count(run.state.trainable)

    # -- evaluation: the judge's view of samples, and the held-out flow-matching loss --------
    judge_apply = jax.jit(lambda q, x: judge.apply({"params": q}, x))
    samplers = {
        k: jax.jit(functools.partial(
            diffusion.sample, a, shape=shape, steps=config.eval.sample_steps))
        for k, a in applies.items()
    }  # fmt: skip
    test_losses = {k: jax.jit(lambda q, b, r, k=k: losses[k](q, b, r)[0]) for k in applies}
    e = config.eval

    def judged(judge_params, x: np.ndarray, label: np.ndarray):
        """The judge's accuracy on ``x`` (of classes ``label``) and its features of ``x``."""
        logits, feats = [], []
        for i in range(0, len(x), e.batch_size):
            chunk = x[i : i + e.batch_size]
            # Padded to one batch shape: one compile for every set of images judged.
            pad = np.zeros((e.batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)
            lo, fe = judge_apply(judge_params, np.concatenate([chunk, pad]))
            logits.append(np.asarray(lo)[: len(chunk)])
            feats.append(np.asarray(fe)[: len(chunk)])
        logits, feats = np.concatenate(logits), np.concatenate(feats)
        return float(np.mean(np.argmax(logits, -1) == label)), feats

    def nearest(x: np.ndarray, shown: np.ndarray) -> float:
        # Mean distance from each image to the closest image a method trained on: a model that
        # copies its few images scores 0; held-out real images score `test_nearest`.
        d2 = np.sum(np.square(x.reshape(len(x), 1, -1) - shown.reshape(1, len(shown), -1)), -1)
        return float(np.mean(np.sqrt(d2.min(1))))

    def generate(
        apply, params, classes, per_class: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        label = np.repeat(np.asarray(classes, np.int32), per_class)
        out = samplers[apply](params, jnp.asarray(label), jax.random.PRNGKey(seed))
        return to_images(out), label

    def test_loss(apply, params) -> float:
        # Fixed draws of (t, noise) per repeat: every method is scored on the same ones.
        key = jax.random.PRNGKey(e.seed)
        values = [
            float(test_losses[apply](params, test_target, jax.random.fold_in(key, r)))
            for r in range(e.loss_repeats)
        ]
        return float(np.mean(values))

    def score(apply, params, judge_params, real_feats, shown=None) -> dict:
        x, label = generate(apply, params, targets, e.samples_per_class, e.seed)
        accuracy, feats = judged(judge_params, x, label)
        grid = x.reshape(len(targets), e.samples_per_class, *x.shape[1:])[:, : e.grid_per_class]
        out = {
            "judge_accuracy": accuracy,
            "frechet": diffusion.frechet_distance(feats, real_feats),
            "test_loss": test_loss(apply, params),
            "grid": np.round(grid.reshape(-1, *x.shape[1:]), 3).tolist(),
        }
        if shown is not None:
            out["nearest"] = nearest(x, shown)
        return out

    past = finished.Runs(workdir, metric_prefix=lambda name: f"train/{name}/", config=config)
    writer = past.open_writer()

    def record_curve(name: str, curve: list[float]) -> None:
        every = config.log_every_steps
        for s in range(every - 1, len(curve), every):
            writer.write(
                s + 1, {f"train/{name}/loss": float(np.mean(curve[s - every + 1 : s + 1]))}
            )

    everything = [(".*", "train")]
    layers = dense.layers(base_apply, init(config.seed), *example)

    def adapt(method: str, shots: int, pretrained, judge_params, real_feats) -> dict:
        tick = time.perf_counter()
        apply, rules, params = "base", everything, pretrained
        if method == "scratch":
            params = init(config.seed + 1)
        elif method == "lora":
            params = lora.init(
                pretrained, init_key(config.seed + 2), targets=list(p.targets),
                rank=p.rank, alpha=p.alpha, layers=layers, what="config.peft",
            )  # fmt: skip
            apply = "lora"
            rules = lora.rules(extra=[(rf"{pattern}/.*", "train") for pattern in p.train])
        elif method == "embed":
            rules = [("label_embed/.*", "train"), (".*", "frozen")]
        idx = few_shot(tr.label, targets, shots, seed=d.seed)
        data = {"image": to_model(tr.images[idx]), "label": tr.label[idx]}
        params, curve, n = fit(
            workdir / RUNS / f"{method}_{shots}", params, rules, apply, config.optim.lr[method],
            batch_fn(data, batch_size=config.optim.batch_size, seed=config.seed + shots),
            num_steps=config.optim.num_steps, fresh=True,
        )  # fmt: skip
        record_curve(f"{method}_{shots}", curve)
        return {
            "curve": curve,
            "trainable": n,
            **score(apply, params, judge_params, real_feats, shown=tr.images[idx]),
            "seconds": time.perf_counter() - tick,
        }

    names = [f"{m}_{k}" for k in d.shots for m in config.methods]
    try:
        # The judge and the pretrained model resume from their checkpoints (a finished run
        # restores its last state), so the methods of a rerun start from the same weights.
        judge_params, judge_curve, _ = fit(
            workdir / RUNS / JUDGE,
            jax.jit(judge.init)(init_key(config.seed + 3), tr.images[:1])["params"],
            everything, JUDGE, config.judge.lr,
            batch_fn({"image": tr.images, "label": tr.label},
                     batch_size=config.judge.batch_size, seed=config.seed + 3),
            num_steps=config.judge.steps, fresh=False,
        )  # fmt: skip
        _, real_feats = judged(judge_params, te.images[test_mask], te.label[test_mask])
        pre = past.get(PRETRAIN)
        pretrained = None
        if pre is None or any(past.get(n) is None for n in names):
            pretrained, curve, n = fit(
                workdir / RUNS / PRETRAIN, init(config.seed), everything, "base",
                config.pretrain.lr,
                batch_fn(source_data, batch_size=config.optim.batch_size, seed=config.seed),
                num_steps=config.pretrain.steps, fresh=False,
            )  # fmt: skip
        if pre is None:
            record_curve(PRETRAIN, curve)
            source_x, source_y = generate(
                "base", pretrained, d.source_classes, e.samples_per_class, e.seed
            )
            pre = {
                "curve": curve,
                "trainable": n,
                **score("base", pretrained, judge_params, real_feats),
                "source_judge_accuracy": judged(judge_params, source_x, source_y)[0],
                "source_grid": np.round(
                    source_x.reshape(len(d.source_classes), e.samples_per_class, *shape[:2])[
                        :, : e.grid_per_class
                    ].reshape(-1, *shape[:2]), 3
                ).tolist(),
                "judge_test_accuracy": judged(judge_params, te.images, te.label)[0],
                "judge_final_loss": float(np.mean(judge_curve[-10:])) if judge_curve else None,
            }  # fmt: skip
            past.put(PRETRAIN, pre)
        results_by = {
            (m, k): past.get_or_run(f"{m}_{k}", adapt, m, k, pretrained, judge_params, real_feats)
            for k in d.shots
            for m in config.methods
        }
    except finished.Stopped as err:
        writer.close()
        logging.info("stopped during %s; rerun to resume", err)
        return {"stopped": str(err)}
    writer.close()

    # -- report -----------------------------------------------------------------------------
    real_x = tr.images[train_target]
    real_accuracy, real_train_feats = judged(judge_params, real_x, tr.label[train_target])
    rows = [
        {
            "method": "real images", "shots": int(len(real_x) // len(targets)), "trainable": 0,
            "judge_accuracy": real_accuracy,
            "frechet": diffusion.frechet_distance(real_train_feats, real_feats),
        },
        {"method": "pretrained", "shots": 0, "trainable": 0,
         **{k: pre[k] for k in ("judge_accuracy", "frechet", "test_loss")}},
    ]  # fmt: skip
    rows += [
        {
            "method": m,
            "shots": k,
            "trainable": r["trainable"],
            **{k: r[k] for k in ("judge_accuracy", "frechet", "nearest", "test_loss", "seconds")},
        }
        for (m, k), r in results_by.items()
    ]
    results = {
        "dataset": d.dataset,
        "source_classes": list(d.source_classes),
        "target_classes": [int(c) for c in targets],
        "source_train_images": int(len(source_data["label"])),
        "target_test_images": int(len(test_target["label"])),
        "judge_test_accuracy": pre["judge_test_accuracy"],
        # mean distance of each target test image to the nearest of the images of k shots
        "test_nearest": {
            str(k): nearest(
                te.images[test_mask], tr.images[few_shot(tr.label, targets, k, seed=d.seed)]
            )
            for k in d.shots
        },
        "pretrained_source_judge_accuracy": pre["source_judge_accuracy"],
        "pretrain_final_loss": float(np.mean(pre["curve"][-50:])) if pre["curve"] else None,
        "rows": rows,
        "wall_s": time.perf_counter() - start,
        "hardware": f"{platform.machine()} {jax.devices()[0].platform}",
    }
    table = reports.diffusion_table(rows, results["test_nearest"])
    figures = {
        "pretrain.png": lambda: reports.diffusion_pretrain_plot(
            pre["source_grid"], d.source_classes
        ),
        "transfer.png": lambda: reports.diffusion_transfer_plot(results_by),
    }
    if reports.publish(workdir, results, table=table, figures=figures, dpi=110):
        # the sample grids, at a finer resolution than the other figures
        g = e.grid_per_class
        real_grid = np.concatenate(
            [te.images[te.label == c][:g] for c in targets]
        )  # the first test images of each class
        for k in d.shots:
            adapted = {m: results_by[m, k] for m in config.methods}
            fig = reports.diffusion_samples_plot(real_grid, pre, adapted, targets=targets, shots=k)
            report.save_figure(fig, workdir / f"samples_{k}.png", dpi=140)
        print(table, flush=True)
    return results
