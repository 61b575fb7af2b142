"""In-context learning with SmolLM2: zero-, one- and k-shot accuracy over draws of demonstrations.

For each task and each `k` in `config.icl.shots`, `config.icl.draws` random balanced sets of `k`
demonstrations (from the train split, each cut to `config.data.max_demo_tokens` tokens so that
the largest `k` fits `config.icl.prefix_len`) are put in front of every test query, and the
label word with the highest next-token log-probability is the prediction (`ftlab.icl`). `k = 0`
is the instruction alone (one draw: there is nothing to draw). Writes into the workdir:

    results.json    per task and k: accuracy of every draw, mean and standard deviation
    results.md      the same as a markdown table
    icl.png         accuracy against k (mean, with the spread over draws as error bars)
    metrics.jsonl   `icl/<task>/accuracy_mean` etc. with step = k (MetricWriter)
"""

from __future__ import annotations

import pathlib
import time

import ml_collections
import numpy as np
from absl import logging

from experiments import finished, models
from ftlab import icl
from ftlab.core import report
from ftlab.data import rotten_tomatoes

# The prompted tasks and the model live in `experiments/models.py`, shared with decoder tuning.
TASKS = models.DECODER_TASKS


def evaluate_task(config, model: models.Decoder, name: str) -> dict:
    """Accuracy of every draw for every k on one task."""
    task = TASKS[name]
    data = rotten_tomatoes.load(task=name, seed=config.data.split_seed)
    train, test = data["train"], data["test"]
    pool = min(config.data.demo_pool, len(train.text))
    texts, labels = train.text[:pool], train.label[:pool]
    n = min(config.data.num_test, len(test.text))
    out = {"num_test": n, "majority_baseline": rotten_tomatoes.majority_baseline(
        rotten_tomatoes.Split(test.text[:n], test.label[:n])), "shots": {}}  # fmt: skip
    for k in config.icl.shots:
        draws = 1 if k == 0 else config.icl.draws
        accs = []
        for d in range(draws):
            rng = np.random.default_rng([config.seed, k, d])
            idx = icl.sample_demos(rng, labels, k)
            cut = config.data.max_demo_tokens
            demos = [(icl.truncate(model.tokenizer, texts[i], cut), int(labels[i])) for i in idx]
            try:  # the library names its argument; the user set the config key
                icl.encode_prefix(model.tokenizer, icl.prefix_text(task, demos),
                                  config.icl.prefix_len, pad_id=model.pad_id)  # fmt: skip
            except ValueError as e:
                raise ValueError(f"config.icl.prefix_len={config.icl.prefix_len}: {e}") from None
            start = time.perf_counter()
            acc, _ = icl.accuracy(
                model.config, model.params, model.tokenizer, task, demos,
                test.text[:n], test.label[:n],
                prefix_len=config.icl.prefix_len, query_len=config.icl.query_len,
                batch_size=config.icl.batch_size, pad_id=model.pad_id,
            )  # fmt: skip
            accs.append(acc)
            logging.info(
                "%s k=%d draw %d: accuracy %.4f (%d examples, %.1f s)",
                name, k, d, acc, n, time.perf_counter() - start,
            )  # fmt: skip
        out["shots"][str(k)] = {
            "accuracy_per_draw": accs,
            "mean": float(np.mean(accs)),
            "std": float(np.std(accs)),
        }
    return out


def _table(results: dict) -> str:
    """One row per task: the majority baseline, then mean (± std over draws) accuracy per k."""
    shots = sorted({int(k) for r in results["tasks"].values() for k in r["shots"]})
    rows = []
    for name, r in results["tasks"].items():
        cells = [name, f"{r['majority_baseline']:.3f}"]
        for k in shots:
            s = r["shots"].get(str(k))
            if s is None:
                cells.append("")
            elif len(s["accuracy_per_draw"]) == 1:
                cells.append(f"{s['mean']:.3f}")
            else:
                cells.append(f"{s['mean']:.3f} ± {s['std']:.3f}")
        rows.append(cells)
    return report.markdown_table(["task", "majority", *(f"k={k}" for k in shots)], rows)


def _plot(results: dict):
    """Accuracy against k per task (error bars: std over draws), dotted: its majority class."""
    lines, baselines = [], []
    for i, (name, r) in enumerate(results["tasks"].items()):
        ks = sorted(int(k) for k in r["shots"])
        lines.append(
            report.Line(
                ks,
                [r["shots"][str(k)]["mean"] for k in ks],
                yerr=[r["shots"][str(k)]["std"] for k in ks],
                label=name,
                style={"marker": "o", "capsize": 3, "color": f"C{i}"},
            )
        )
        style = {"ls": ":", "lw": 1, "color": f"C{i}"}
        baselines.append(report.HLine(r["majority_baseline"], style=style))
    return report.line_plot(
        lines,
        hlines=baselines,
        xlabel="demonstrations k",
        ylabel="accuracy",
        title=f"ICL, {results['model']} (dotted: majority class)",
        legend={},
        grid=None,
        figsize=(5, 3.5),
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the evaluation and writes results.json, results.md, icl.png and metrics.jsonl."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in config.data.tasks:
        if name not in TASKS:
            raise ValueError(f"config.data.tasks: {name!r} is not one of {sorted(TASKS)}.")

    # Model (the tiny stand-in's vocabulary comes from the first task's training texts).
    first = rotten_tomatoes.load(task=config.data.tasks[0], seed=config.data.split_seed)["train"]
    model = models.decoder(config, first.text[: config.data.demo_pool])

    results = {"model": config.model.name, "tasks": {}}
    start = time.perf_counter()
    # Each task's evaluation is kept when it finishes; a rerun skips it.
    past = finished.Runs(workdir, metric_prefix=lambda n: f"icl/{n}/", config=config)
    with past.open_writer() as writer:
        for name in config.data.tasks:
            if (r := past.get(name)) is not None:
                results["tasks"][name] = r
                continue
            results["tasks"][name] = r = evaluate_task(config, model, name)
            for k, s in r["shots"].items():
                writer.write(int(k), {f"icl/{name}/accuracy_mean": s["mean"],
                                      f"icl/{name}/accuracy_std": s["std"]})  # fmt: skip
            past.put(name, r)
    results["wall_seconds"] = time.perf_counter() - start
    table = _table(results)
    report.save_table(workdir / "results", markdown=table, data=results)
    report.save_figure(_plot(results), workdir / "icl.png")
    logging.info("ICL results:\n%s", table)
    return results
