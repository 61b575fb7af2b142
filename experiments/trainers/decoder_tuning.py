"""Few-shot tuning of SmolLM2 (prompt, prefix, LoRA, QLoRA) against in-context learning.

For every method in `config.methods`, every number of labelled examples `n` in
`config.data.num_examples` and every seed: draw `n` balanced training examples, add the method's
leaves to the frozen decoder, train them with the next-token loss of the label word after the
zero-shot prompt (instruction + query, the same text `experiments/trainers/icl.py` scores), then
score the test examples exactly as zero-shot ICL does (`ftlab.icl.accuracy` with no
demonstrations) on the method's plain tree (LoRA merged, the prefix MLP evaluated and dropped,
the Q4 base dequantised). So every point of the table differs from ICL only in the parameters.

A `finished.sweep` of runs ``<method>_n<n>_s<seed>``; results.json/.md hold the accuracy per
method and n (mean, std over seeds), trainable parameters, base bytes held during training and
wall time, and tuning_vs_icl.png the accuracy against n with the ICL points of
`config.icl_results` (a results.json of configs/icl_smollm2.py) at n = k demonstrations.

References:
    Lester et al. 2021 (prompt tuning), https://arxiv.org/abs/2104.08691; Li & Liang 2021
    (prefix tuning), https://arxiv.org/abs/2101.00190; Hu et al. 2021 (LoRA),
    https://arxiv.org/abs/2106.09685; Dettmers et al. 2023 (QLoRA),
    https://arxiv.org/abs/2305.14314; Liu et al. 2022, "Few-Shot Parameter-Efficient
    Fine-Tuning is Better and Cheaper than In-Context Learning", https://arxiv.org/abs/2205.05638
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from experiments import evaluation, finished, loop, models, reports
from ftlab import icl
from ftlab.core import metrics as metrics_lib
from ftlab.core import partition, train
from ftlab.data import rotten_tomatoes
from ftlab.peft import qlora

METHODS = models.DECODER_METHODS
# Each run's loop folder (checkpoints, metrics.jsonl) under the workdir: runs/<method>_n<n>_s<seed>
RUNS = "runs"
# the evaluator types of config.evals.plugins (`experiments.evaluation`), run in each short run
PLUGINS = evaluation.DECODER_PLUGINS


def run_one(
    config, model, task, data, method: str, n: int, seed: int, *, fits: finished.Fits, workdir
) -> dict:
    """Trains ``method`` on ``n`` balanced examples and scores the test subset zero-shot.

    The steps run as a `finished.short_run` (placement by the plan, the stop on a non-finite
    loss naming the step, an orbax checkpoint in ``workdir`` to resume an interrupted run).
    ``fits`` keeps one train step per method: the learning rate is constant and the batch
    shape does not depend on ``n``, so every ``n`` and seed reuses its compilation.

    Returns:
        The run's record.

    Raises:
        finished.Stopped: A signal stopped it (with a checkpoint): rerun to resume it.
    """
    train_split, test = data["train"], data["test"]
    idx = icl.sample_demos(np.random.default_rng([config.seed, n, seed]), train_split.label, n)
    texts = [train_split.text[i] for i in idx]
    labels = np.asarray(train_split.label)[idx].astype(np.int32)
    ids, mask = icl.encode_prompts(
        model.tokenizer, task, texts, config.data.query_len, pad_id=model.pad_id
    )
    label_ids = np.asarray(icl.label_token_ids(model.tokenizer, task))

    # train.init_state copies what it holds, so the donated steps leave `model.params` intact.
    params, rules, wrap, to_plain = models.decoder_method(
        config.peft,
        method,
        model.params,
        jax.random.key(1000 * seed + n),
        model_config=model.config,
    )
    label_tree = partition.labels(params, rules, what=f"config.methods[{method!r}] rules")
    lr = config.optim.lr[method]
    tx = partition.optimizer({"train": optax.adamw(lr, weight_decay=0.0)}, label_tree)
    policy = loop.step_policy(config)
    state = train.init_state(params, label_tree, tx, seed=seed, precision=policy.precision)
    base_bytes = qlora.nbytes(state.frozen)
    loss_fn = icl.label_word_loss(model.config, wrap)

    def with_label_ids(params, batch, rng):
        # the label words' ids are one constant, not rows of the batch the plan shards
        return loss_fn(params, {**batch, "label_ids": label_ids}, rng)

    # Batches: passes over a fresh permutation of the n examples; with n smaller than the batch
    # size, examples repeat within a batch so that the shape (and the compiled step) is fixed.
    o, bs = config.optim, config.optim.batch_size  # o.epochs passes, within [min, max] steps
    steps = int(np.clip(np.ceil(o.epochs * n / bs), o.min_steps, o.max_steps))
    order = np.concatenate(
        [np.random.default_rng([seed, n, e]).permutation(n) for e in range(-(-steps * bs // n))]
    )

    def batch_at(i):
        b = order[i * bs : (i + 1) * bs]
        return {
            "input_ids": ids[b],
            "attention_mask": mask[b],
            "target": label_ids[labels[b]],
            "label": labels[b],
        }

    # -- evaluators during the run (config.evals.plugins) and of its final parameters --------
    on = dict(config=config, model=model, task=task, test=test, wrap=wrap, to_plain=to_plain)
    placed = lambda state: fits.plan.get_state(state).params  # noqa: E731
    evaluators = loop.from_config(
        (config.get("evals") or {}).get("plugins"), types=PLUGINS, params_of=placed, **on
    )
    try:
        run = fits(workdir, state, with_label_ids, tx, batch_at, num_steps=steps, key=method,
                   log_every=steps, evaluators=evaluators)  # fmt: skip
    except metrics_lib.NonFiniteMetricError as e:
        e.add_note(f"decoder tuning run {method}, n={n}, seed={seed}")
        raise
    # a resumed run kept only the steps after its checkpoint: the loss record starts there
    losses = [float(m["train/loss"]) for m in run.history]
    acc = evaluation.label_accuracy(params_of=lambda s: s.params, **on)(run.state)["eval/accuracy"]
    n_test = min(config.data.num_test, len(test.text))
    return {
        "method": method,
        "n": n,
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "accuracy": acc,
        "num_test": n_test,
        "first_loss": losses[0] if run.start_step == 0 else None,
        "last_loss": float(np.mean(losses[-max(1, steps // 10) :])) if losses else None,
        "trainable_params": partition.count(state.trainable),
        "base_mib_during_training": base_bytes / 2**20,
        "train_seconds": run.train_seconds,
    }


def report(config, workdir: pathlib.Path, runs: list[dict], *, n_test: int, majority: float):
    """Writes results.json, results.md and the plot for the runs finished so far."""
    rows = reports.decoder_summary(runs, METHODS)
    points = reports.icl_points(config.icl_results, config.data.task)
    results = {
        "task": config.data.task,
        "model": config.model.name,
        "num_test": n_test,
        "majority_baseline": majority,
        "rows": rows,
        "icl": points,
        "runs": runs,
    }
    plot = lambda: reports.decoder_plot(rows, points, majority)  # noqa: E731
    table = reports.decoder_table(rows, points)
    reports.publish(workdir, results, table=table, figures={"tuning_vs_icl.png": plot})
    return rows


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Runs every (method, n, seed) not yet finished, then writes the table and the plot."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    finished.check_methods(config, METHODS)
    task = models.DECODER_TASKS[config.data.task]
    data = rotten_tomatoes.load(task=config.data.task, seed=config.data.split_seed)
    model = models.decoder(config, data["train"].text[:3000])
    # every run is scored after the zero-shot instruction: it must fit before any trains
    icl.encode_prefix(model.tokenizer, icl.prefix_text(task, []), config.data.prefix_len,
                      pad_id=model.pad_id, what="config.data.prefix_len")  # fmt: skip
    n_test = min(config.data.num_test, len(data["test"].text))
    majority = rotten_tomatoes.majority_baseline(
        rotten_tomatoes.Split(data["test"].text[:n_test], data["test"].label[:n_test])
    )
    plan = loop.plan_from(config)
    plan.check_batch_size(config.optim.batch_size, what="config.optim.batch_size")
    # the evaluators' types and options are checked before any run trains (each run builds its own)
    on = dict(config=config, model=model, task=task, test=data["test"], params_of=None)
    loop.from_config(
        (config.get("evals") or {}).get("plugins"), types=PLUGINS, wrap=None, to_plain=None, **on
    )
    runs = {
        f"{method}_n{n}_s{seed}": (method, n, seed)
        for method in config.methods
        for n in config.data.num_examples
        for seed in range(config.seeds)
    }
    fits = finished.Fits(plan, make_step=loop.step_policy(config).train_step)
    done = []

    def run(name, writer):
        return run_one(
            config, model, task, data, *runs[name], fits=fits, workdir=workdir / RUNS / name,
        )  # fmt: skip

    def reported(name, r):
        # the report so far, so a long run can be read (and plotted) while it goes on
        done.append(r)
        report(config, workdir, done, n_test=n_test, majority=majority)
        logging.info(
            "%s n=%d seed=%d: accuracy %.4f (%d steps, %.0f s, loss %s -> %.3f)",
            *runs[name], r["accuracy"], r["steps"], r["train_seconds"], r["first_loss"],
            r["last_loss"],
        )  # fmt: skip

    results, stopped = finished.sweep(workdir, config, list(runs), run, on_result=reported)
    rows = report(config, workdir, list(results.values()), n_test=n_test, majority=majority)
    if not stopped:
        logging.info("tuning vs ICL:\n%s", (workdir / "results.md").read_text())
    return rows
