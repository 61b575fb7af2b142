"""In-context learning with SmolLM2: zero-, one- and k-shot accuracy over draws of demonstrations.

For each task and each `k` in `config.icl.shots`, `config.icl.draws` random balanced sets of `k`
demonstrations (from the train split, each cut to `config.data.max_demo_tokens` tokens so that
the largest `k` fits `config.icl.prefix_len`) are put in front of every test query, and the
label word with the highest next-token log-probability is the prediction (`ftlab.icl`). `k = 0`
is the instruction alone (one draw: there is nothing to draw). A `finished.sweep` over tasks:
results.json/.md hold per task and k every draw's accuracy (mean, std) and the true label word's
mean log-probability, icl.png the accuracy against k, metrics.jsonl ``icl/<task>/...`` at step k.
The weights are placed once and each batch of queries split over the data mesh.
"""

from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from experiments import evaluation, finished, loop, models, reports
from ftlab import icl
from ftlab.core import parallel
from ftlab.data import rotten_tomatoes


def make_hits(plan: parallel.Plan, model: models.Decoder):
    """``hits((params, cache, label_ids), batch) -> {"hits", "count", "label_logprob"}`` (sums of
    correct predictions, of queries and of the true label's log-probability), compiled by the
    plan.

    The batch of queries is split over the data mesh; every device scores its share against the
    shared prefix's cache (replicated) and the counts are summed over the global batch (padding
    rows, ``mask`` 0 as `ftlab.data.batching.eval_batches` marks them, count for nothing).
    Counts are integers: any device count gives the same accuracy; the log-probabilities agree
    to float tolerance.
    """

    def hits(state, batch):
        params, cache, label_ids = state
        logp = icl.score(model.config, params, cache, batch["ids"], batch["attention"], label_ids)
        real = batch["mask"] > 0
        hit = (jnp.argmax(logp, axis=1) == batch["label"]) & real
        true = jnp.take_along_axis(logp, batch["label"][:, None], axis=1)[:, 0]
        sums = {
            "hits": jnp.sum(hit),
            "count": jnp.sum(real),
            "label_logprob": jnp.sum(jnp.where(real, true, 0.0)),
        }
        return jax.lax.psum(sums, parallel.DATA_AXIS) if plan.mode == "pmap" else sums

    return plan.compile_eval_step(hits)


def evaluate_task(config, model: models.Decoder, name: str, *, plan, params, hits) -> dict:
    """Accuracy of every draw for every k on one task (``params``: placed by ``plan``)."""
    task = models.DECODER_TASKS[name]  # shared with decoder tuning
    data = rotten_tomatoes.load(task=name, seed=config.data.split_seed)
    train, test = data["train"], data["test"]
    pool = min(config.data.demo_pool, len(train.text))
    texts, labels = train.text[:pool], train.label[:pool]
    n = min(config.data.num_test, len(test.text))
    out = {"num_test": n, "majority_baseline": rotten_tomatoes.majority_baseline(
        rotten_tomatoes.Split(test.text[:n], test.label[:n])), "shots": {}}  # fmt: skip
    ids, mask = icl.encode_queries(model.tokenizer, task, test.text[:n], config.icl.query_len,
                                   pad_id=model.pad_id)  # fmt: skip
    queries = {"ids": ids, "attention": mask, "label": test.label[:n]}
    label_ids = icl.label_token_ids(model.tokenizer, task)
    one = plan.get_state(params)  # one copy of the weights (pmap holds one per device)
    for k in config.icl.shots:
        draws = 1 if k == 0 else config.icl.draws
        accs, logps = [], []
        for d in range(draws):
            rng = np.random.default_rng([config.seed, k, d])
            idx = icl.sample_demos(rng, labels, k)
            cut = config.data.max_demo_tokens
            demos = [(icl.truncate(model.tokenizer, texts[i], cut), int(labels[i])) for i in idx]
            prefix = icl.encode_prefix(model.tokenizer, icl.prefix_text(task, demos),
                                       config.icl.prefix_len, pad_id=model.pad_id,
                                       what="config.icl.prefix_len")  # fmt: skip
            start = time.perf_counter()
            cache = icl.prefill(model.config, one, *prefix,
                                query_len=config.icl.query_len)  # fmt: skip
            state = (params, *plan.put_state(jax.device_get((cache, label_ids))))
            sums = evaluation.batch_sums(
                plan, hits, state, queries, batch_size=config.icl.batch_size
            )
            acc = sums["hits"] / sums["count"]
            accs.append(acc)
            logps.append(sums["label_logprob"] / n)
            logging.info(
                "%s k=%d draw %d: accuracy %.4f (%d examples, %.1f s)",
                name, k, d, acc, n, time.perf_counter() - start,
            )  # fmt: skip
        out["shots"][str(k)] = {
            "accuracy_per_draw": accs,
            "mean": float(np.mean(accs)),
            "std": float(np.std(accs)),
            # mean log-probability of the true label word (how sure, not only whether right)
            "label_logprob_per_draw": logps,
        }
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the evaluation and writes results.json, results.md, icl.png and metrics.jsonl."""
    workdir = pathlib.Path(workdir)

    # Model (the tiny stand-in's vocabulary comes from the first task's training texts).
    first = rotten_tomatoes.load(task=config.data.tasks[0], seed=config.data.split_seed)["train"]
    model = models.decoder(config, first.text[: config.data.demo_pool])

    # Data parallel: the weights are placed once, each batch of queries split over the mesh.
    plan = loop.plan_from(config)
    plan.check_batch_size(config.icl.batch_size, what="config.icl.batch_size")
    params, hits = plan.put_state(model.params), make_hits(plan, model)
    is_chief = loop.is_chief()  # one writer in a multi-process job
    if is_chief:
        workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def run_one(name, writer):
        r = evaluate_task(config, model, name, plan=plan, params=params, hits=hits)
        for k, s in r["shots"].items():
            writer.write(int(k), {f"icl/{name}/accuracy_mean": s["mean"],
                                  f"icl/{name}/accuracy_std": s["std"]})  # fmt: skip
        return r

    # Each task's evaluation is kept when it finishes; a rerun skips it.
    tasks, _ = finished.sweep(
        workdir, config, list(config.data.tasks), run_one, metric_prefix=lambda n: f"icl/{n}/"
    )
    results = {"model": config.model.name, "tasks": tasks}
    results["wall_seconds"] = time.perf_counter() - start
    table = reports.icl_table(results)
    reports.publish(
        workdir, results, table=table, figures={"icl.png": lambda: reports.icl_plot(results)}
    )
    logging.info("ICL results:\n%s", table)
    return results
