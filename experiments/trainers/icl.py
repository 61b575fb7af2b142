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

import json
import pathlib
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from experiments.trainers import finished
from ftlab import icl
from ftlab.data import rotten_tomatoes
from ftlab.models import llama

TASKS = {
    "sentiment": icl.Task(
        instruction="Classify the sentiment of each movie review as positive or negative.",
        template="Review: {text}\nSentiment:",
        label_words=(" negative", " positive"),  # rotten_tomatoes labels: rotten 0, fresh 1
    ),
    "subjectivity": icl.Task(
        instruction="Say whether each movie text is a plot summary or a critic's opinion.",
        template="Text: {text}\nType:",
        label_words=(" opinion", " plot"),  # rotten_tomatoes labels: review 0, plot 1
    ),
}


class _Model:
    """What the evaluation needs: config, params, tokenizer, pad id."""

    def __init__(self, config, params, tokenizer, pad_id):
        self.config, self.params, self.tokenizer, self.pad_id = config, params, tokenizer, pad_id


def build_model(config: ml_collections.ConfigDict, texts: list[str]) -> _Model:
    """SmolLM2, or (`config.model.name == "tiny"`) a random tiny Llama with a word-level stand-in
    tokenizer built from `texts` (for end-to-end tests: seconds instead of minutes)."""
    if config.model.name == "smollm2":
        from third_party import smollm2  # noqa: PLC0415 (loads 540 MB of weights)

        m = smollm2.load()
        # Stacked once here, so the compiled prefill/score do not restack 30 layers per call.
        return _Model(m.config, llama.stack_layers(m.params), m.tokenizer, m.pad_id)
    if config.model.name != "tiny":
        raise ValueError(f"config.model.name={config.model.name!r}; expected 'smollm2' or 'tiny'.")
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415

    words: dict[str, int] = {"[UNK]": 0, "[PAD]": 1}
    extra = " ".join(
        t.instruction + " " + t.template + " ".join(t.label_words) for t in TASKS.values()
    )
    for text in [extra, *texts]:
        for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text):
            if len(words) < config.model.vocab_size:
                words.setdefault(w, len(words))
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cfg = llama.LlamaConfig.tiny(vocab_size=config.model.vocab_size, max_position_embeddings=1024)
    return _Model(cfg, llama.init(cfg, jax.random.key(config.seed)), tok, 1)


def evaluate_task(config, model: _Model, name: str) -> dict:
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
    shots = sorted({int(k) for r in results["tasks"].values() for k in r["shots"]})
    lines = [
        "| task | majority | " + " | ".join(f"k={k}" for k in shots) + " |",
        "|---|---|" + "---|" * len(shots),
    ]
    for name, r in results["tasks"].items():
        cells = []
        for k in shots:
            s = r["shots"].get(str(k))
            if s is None:
                cells.append("")
            elif len(s["accuracy_per_draw"]) == 1:
                cells.append(f"{s['mean']:.3f}")
            else:
                cells.append(f"{s['mean']:.3f} ± {s['std']:.3f}")
        lines.append(f"| {name} | {r['majority_baseline']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: pathlib.Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for name, r in results["tasks"].items():
        ks = sorted(int(k) for k in r["shots"])
        mean = [r["shots"][str(k)]["mean"] for k in ks]
        std = [r["shots"][str(k)]["std"] for k in ks]
        ax.errorbar(ks, mean, yerr=std, marker="o", capsize=3, label=name)
        ax.axhline(r["majority_baseline"], ls=":", lw=1, color=ax.lines[-1].get_color())
    ax.set_xlabel("demonstrations k")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ICL, {results['model']} (dotted: majority class)")
    ax.legend()
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the evaluation and writes results.json, results.md, icl.png and metrics.jsonl."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in config.data.tasks:
        if name not in TASKS:
            raise ValueError(f"config.data.tasks: {name!r} is not one of {sorted(TASKS)}.")

    # Model (the tiny stand-in's vocabulary comes from the first task's training texts).
    first = rotten_tomatoes.load(task=config.data.tasks[0], seed=config.data.split_seed)["train"]
    model = build_model(config, first.text[: config.data.demo_pool])

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
    (workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (workdir / "results.md").write_text(_table(results))
    _plot(results, workdir / "icl.png")
    logging.info("ICL results:\n%s", _table(results))
    return results
