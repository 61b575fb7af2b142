"""Few-shot tuning of SmolLM2 (prompt, prefix, LoRA, QLoRA) against in-context learning.

For every method in `config.methods`, every number of labelled examples `n` in
`config.data.num_examples` and every seed: draw `n` balanced training examples, add the method's
leaves to the frozen decoder, train them with the next-token loss of the label word after the
zero-shot prompt (instruction + query, the same text `experiments/trainers/icl.py` scores), then
score the test examples exactly as zero-shot ICL does (`ftlab.icl.accuracy` with no
demonstrations) on the method's plain tree (LoRA merged, the prefix MLP evaluated and dropped,
the Q4 base dequantised). So every point of the table differs from ICL only in the parameters.

Writes into the workdir:

    finished/<method>_n<n>_s<seed>.json  one finished run (the sweep resumes run by run;
                                      `experiments/finished.py`)
    runs/<method>_n<n>_s<seed>/       that run's loop folder (`experiments/loop.py`): its
                                      checkpoint, from which an interrupted run resumes, and
                                      metrics.jsonl
    results.json, results.md          accuracy per method and n (mean, std over seeds), trainable
                                      parameters, base bytes held during training, wall time
    tuning_vs_icl.png                 accuracy against n (log x), one line per method, with the
                                      ICL points of `config.icl_results` (a results.json of
                                      configs/icl_smollm2.py) placed at n = k demonstrations

References:
    Lester et al. 2021 (prompt tuning), https://arxiv.org/abs/2104.08691; Li & Liang 2021
    (prefix tuning), https://arxiv.org/abs/2101.00190; Hu et al. 2021 (LoRA),
    https://arxiv.org/abs/2106.09685; Dettmers et al. 2023 (QLoRA),
    https://arxiv.org/abs/2305.14314; Liu et al. 2022, "Few-Shot Parameter-Efficient
    Fine-Tuning is Better and Cheaper than In-Context Learning", https://arxiv.org/abs/2205.05638
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

from experiments import finished, loop, models, reports
from ftlab import icl
from ftlab.core import metrics as metrics_lib
from ftlab.core import parallel, partition, train
from ftlab.core import report as report_lib
from ftlab.data import rotten_tomatoes
from ftlab.models import hooks, llama
from ftlab.peft import lora, prefix, prompt, qlora

METHODS = ("prompt", "prefix", "lora", "qlora")
# Each run's loop folder (checkpoints, metrics.jsonl) under the workdir: runs/<method>_n<n>_s<seed>
RUNS = "runs"


def add_method(
    config: ml_collections.ConfigDict,
    method: str,
    params,
    rng,
    *,
    model_config: llama.LlamaConfig,
):
    """The method's tree, rules, training apply wrapper and ``to_plain(trained) -> tree``.

    ``model_config``: the decoder's config, to trace its hook sites (`hooks.discover`).
    """
    p, sites = config.peft, None
    if method not in METHODS:
        raise ValueError(f"config.methods: {method!r} is not one of {METHODS}.")
    if method in ("prompt", "prefix"):
        if method == "prefix" and llama.LAYERS in params["decoder"]:
            # A prefix per layer needs the layers one by one: unstack the scanned layers (the
            # loss stacks them again, prefixes included, so the step still compiles one layer).
            params = llama.unstack_layers(params)
        module = llama.LlamaForCausalLM(model_config)
        ids = jnp.ones((1, 2), jnp.int32)
        sites = hooks.discover(lambda q: module.apply({"params": q}, ids), params)
    # QLoRA trains the LoRA leaves of a quantised base
    params, wrap = models.add_method(p, method.removeprefix("q"), params, rng, sites=sites)
    if method == "prompt":
        return params, prompt.rules(), wrap, (lambda t: t)
    if method == "prefix":
        return params, prefix.rules(), wrap, functools.partial(prefix.finalize, sites=sites)

    def stacked(f):
        # Stack before the wrapper, so that it checks the tree the model sees (the LoRA
        # leaves are consumed at `decoder/layers/...`); stacking again inside is a no-op.
        g = wrap(f)
        return lambda q, *args: g(llama.stack_if_uniform(q), *args)

    if method == "lora":
        return params, lora.rules(), stacked, lambda t: lora.merge(t, alpha=p.alpha, rank=p.rank)
    params = qlora.quantize(params, targets=list(p.qlora_targets), what="config.peft.qlora")
    return params, lora.rules(), stacked, lambda t: qlora.merge(t, alpha=p.alpha, rank=p.rank)


def encode(model, task: icl.Task, texts, query_len: int):
    """``[n, prefix + query_len]`` ids and mask of the zero-shot prompts (instruction + query)."""
    head = icl.prefix_text(task, [])
    n_head = len(model.tokenizer.encode(head).ids) if head else 0
    p_ids, p_mask = icl.encode_prefix(model.tokenizer, head, n_head, pad_id=model.pad_id)
    q_ids, q_mask = icl.encode_queries(model.tokenizer, task, texts, query_len, pad_id=model.pad_id)
    n = len(texts)
    ids = np.concatenate([np.repeat(p_ids, n, 0), q_ids], axis=1)
    mask = np.concatenate([np.repeat(p_mask, n, 0), q_mask], axis=1)
    return ids, mask


def make_loss_fn(model_config: llama.LlamaConfig, wrap):
    """Next-token cross-entropy of the label word at each prompt's last real position."""
    module = llama.LlamaForCausalLM(model_config)

    def hidden_fn(params, ids, mask):
        params = llama.stack_if_uniform(params)  # differentiable: gradients reach every layer
        return module.apply({"params": params}, ids, mask, return_hidden=True)

    hidden_fn = wrap(hidden_fn)

    def loss_fn(params, batch, rng):
        del rng
        hidden = hidden_fn(params, batch["input_ids"], batch["attention_mask"])
        last = jnp.sum(batch["attention_mask"], axis=1) - 1
        h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        logp = jax.nn.log_softmax(llama.lm_logits(params, h), axis=-1)
        loss = -jnp.mean(jnp.take_along_axis(logp, batch["target"][:, None], axis=1))
        correct = jnp.argmax(jnp.take(logp, batch["label_ids"], axis=1), axis=1) == batch["label"]
        return loss, {"accuracy": jnp.mean(correct)}

    return loss_fn


def num_steps(config: ml_collections.ConfigDict, n: int) -> int:
    """Steps for ``n`` examples: ``epochs`` passes, within ``[min_steps, max_steps]``."""
    o = config.optim
    steps = int(np.ceil(o.epochs * n / o.batch_size))
    return int(np.clip(steps, o.min_steps, o.max_steps))


def run_one(
    config, model, task, data, method: str, n: int, seed: int, steps_cache: dict, *, plan, workdir
) -> dict | None:
    """Trains ``method`` on ``n`` balanced examples and scores the test subset zero-shot.

    The steps run in `experiments.loop.train` (placement by ``plan``, the stop on a non-finite
    loss naming the step, an orbax checkpoint in ``workdir`` to resume an interrupted run).
    ``steps_cache`` keeps one train step per method: the learning rate is constant and the batch
    shape does not depend on ``n``, so every ``n`` and seed reuses its compilation.

    Returns:
        The run's record, or None when it stopped early (a signal): rerun to resume it.
    """
    train_split, test = data["train"], data["test"]
    idx = icl.sample_demos(np.random.default_rng([config.seed, n, seed]), train_split.label, n)
    texts = [train_split.text[i] for i in idx]
    labels = np.asarray(train_split.label)[idx].astype(np.int32)
    ids, mask = encode(model, task, texts, config.data.query_len)
    label_ids = np.asarray(icl.label_token_ids(model.tokenizer, task))

    # train.init_state copies what it holds, so the donated steps leave `model.params` intact.
    params, rules, wrap, to_plain = add_method(
        config, method, model.params, jax.random.key(1000 * seed + n), model_config=model.config
    )
    label_tree = partition.labels(params, rules, what=f"config.methods[{method!r}] rules")
    lr = config.optim.lr[method]
    tx = partition.optimizer({"train": optax.adamw(lr, weight_decay=0.0)}, label_tree)
    policy = loop.step_policy(config)
    state = train.init_state(params, label_tree, tx, seed=seed, precision=policy.precision)
    base_bytes = qlora.nbytes(state.frozen)
    if method not in steps_cache:
        loss_fn = make_loss_fn(model.config, wrap)

        def with_label_ids(params, batch, rng):
            # the label words' ids are one constant, not rows of the batch the plan shards
            return loss_fn(params, {**batch, "label_ids": label_ids}, rng)

        # pmap runs the step per device: the gradient mean then needs the axis' name
        axis = parallel.DATA_AXIS if plan.mode == "pmap" else None
        steps_cache[method] = policy.train_step(with_label_ids, tx, axis_name=axis)

    # Batches: passes over a fresh permutation of the n examples; with n smaller than the batch
    # size, examples repeat within a batch so that the shape (and the compiled step) is fixed.
    bs = config.optim.batch_size
    steps = num_steps(config, n)
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

    try:
        run = loop.train(
            loop.short_run_config(steps, log_every=steps),
            workdir,
            plan=plan,
            state=state,
            step_fn=steps_cache[method],
            batch_at=batch_at,
            keep_history=True,
        )
    except metrics_lib.NonFiniteMetricError as e:
        e.add_note(f"decoder tuning run {method}, n={n}, seed={seed}")
        raise
    if not run.finished:
        return None
    run.close()
    # a resumed run kept only the steps after its checkpoint: the loss record starts there
    losses = [float(m["train/loss"]) for m in run.history]

    plain = to_plain(loop.fetch(run.plan, run.state).params)
    n_test = min(config.data.num_test, len(test.text))
    acc, _ = icl.accuracy(
        model.config,
        plain,
        model.tokenizer,
        task,
        [],
        test.text[:n_test],
        test.label[:n_test],
        prefix_len=config.data.prefix_len,
        query_len=config.data.query_len,
        batch_size=config.data.eval_batch_size,
        pad_id=model.pad_id,
    )
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
    if jax.process_index() == 0:  # one writer in a multi-process job
        report_lib.save_table(
            workdir / "results", markdown=reports.decoder_table(rows, points), data=results
        )
        report_lib.save_figure(
            reports.decoder_plot(rows, points, majority), workdir / "tuning_vs_icl.png"
        )
    return rows


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Runs every (method, n, seed) not yet finished, then writes the table and the plot."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for m in config.methods:
        if m not in METHODS:
            raise ValueError(f"config.methods: {m!r} is not one of {METHODS}.")
        if m not in config.optim.lr:
            raise ValueError(f"config.optim.lr has no learning rate for {m!r}.")
    task = models.DECODER_TASKS[config.data.task]
    data = rotten_tomatoes.load(task=config.data.task, seed=config.data.split_seed)
    model = models.decoder(config, data["train"].text[:3000])
    try:  # every run is scored after the zero-shot instruction: it must fit before any trains
        icl.encode_prefix(
            model.tokenizer, icl.prefix_text(task, []), config.data.prefix_len, pad_id=model.pad_id
        )
    except ValueError as e:
        raise ValueError(f"config.data.prefix_len={config.data.prefix_len}: {e}") from None
    n_test = min(config.data.num_test, len(data["test"].text))
    majority = rotten_tomatoes.majority_baseline(
        rotten_tomatoes.Split(data["test"].text[:n_test], data["test"].label[:n_test])
    )
    plan = loop.plan_from(config)
    plan.check_batch_size(config.optim.batch_size, what="config.optim.batch_size")
    past = finished.Runs(workdir, metric_prefix=lambda name: None, config=config)
    runs, steps_cache = [], {}
    for method in config.methods:
        for n in config.data.num_examples:
            for seed in range(config.seeds):
                name = f"{method}_n{n}_s{seed}"
                r = past.get(name)  # finished in an earlier invocation
                if r is not None:
                    runs.append(r)
                    continue
                r = run_one(
                    config, model, task, data, method, n, seed, steps_cache,
                    plan=plan, workdir=workdir / RUNS / name,
                )  # fmt: skip
                if r is None:  # stopped by a signal, with a checkpoint: rerun to resume
                    logging.info("stopped during run %s; rerun to resume", name)
                    return report(config, workdir, runs, n_test=n_test, majority=majority)
                if jax.process_index() == 0:
                    past.put(name, r)
                runs.append(r)
                # the report so far, so a long run can be read (and plotted) while it goes on
                report(config, workdir, runs, n_test=n_test, majority=majority)
                logging.info(
                    "%s n=%d seed=%d: accuracy %.4f (%d steps, %.0f s, loss %s -> %.3f)",
                    method,
                    n,
                    seed,
                    r["accuracy"],
                    r["steps"],
                    r["train_seconds"],
                    r["first_loss"],
                    r["last_loss"],
                )
    rows = report(config, workdir, runs, n_test=n_test, majority=majority)
    logging.info("tuning vs ICL:\n%s", (workdir / "results.md").read_text())
    return rows
