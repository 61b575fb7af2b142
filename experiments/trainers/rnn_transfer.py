"""Transfer of a recurrent language model: pretrain on one corpus, adapt to a smaller one.

A byte-level GRU/LSTM (`ftlab.models.rnn`) is pretrained on ``config.data.source`` and then
trained on ``config.data.target`` (a much smaller corpus) by each method of ``config.methods``:

  scratch: a fresh model, every leaf trained (the baseline pretraining must beat);
  full:    the pretrained model, every leaf trained;
  lora:    the pretrained model frozen, LoRA (`ftlab.peft.lora`) on ``config.peft.targets``
           (by default the recurrent kernels and the output head) trained;
  head:    the pretrained model frozen but its output ``head``.

Each is scored by its held-out loss in bits per byte (UTF-8 bytes are the tokens, so for
English text bits per character) on the target's test text, and on the source's (what the
adaptation forgot); ``pretrained`` is the model before any adaptation. Text sampled from the
pretrained model and from each adapted one, from the same target prompt, shows the change.

Writes to the workdir: ``results.json`` / ``results.md`` (the table), ``transfer.png`` (train
bits per byte against step per method, the test numbers in the legend), ``samples.md``, and
``metrics.jsonl`` with every run's train curve. Each training is a short run of
`experiments.loop` under ``runs/<name>/``; the pretrained model's run resumes from its
checkpoint, and each finished method is kept in ``finished/`` (`experiments.finished`), so the
rerun of an interrupted command skips what finished.
"""

from __future__ import annotations

import functools
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from experiments import finished, loop, reports
from ftlab.core import partition, report, train
from ftlab.data import rotten_tomatoes, sharegpt
from ftlab.models import rnn
from ftlab.peft import lora

METHODS = ("scratch", "full", "lora", "head")
SOURCES = ("sharegpt", "rt_reviews", "rt_plot")
RUNS = "runs"
PRETRAIN = "pretrain"


# -- data: bytes of real text -------------------------------------------------------------------


def corpus(name: str, *, seed: int, train_chars: int, test_chars: int) -> dict[str, np.ndarray]:
    """``{"train", "test"}`` int32 byte ids of corpus ``name`` (texts joined by newlines).

    ``sharegpt``: the turns of ShareGPT conversations (records split by a permutation);
    ``rt_reviews`` / ``rt_plot``: Rotten Tomatoes review snippets / plot summaries (their
    train and test splits). Each part is cut to its number of characters (bytes).
    """
    if name == "sharegpt":
        records = sharegpt.read()
        order = np.random.default_rng(seed).permutation(len(records))
        texts = [m["content"] for i in order for m in records[i].messages]
        cut = len(texts) // 20  # the first 5% of turns (in permuted record order) are held out
        parts = {"test": texts[:cut], "train": texts[cut:]}
    elif name in ("rt_reviews", "rt_plot"):
        task = "sentiment" if name == "rt_reviews" else "subjectivity"
        splits = rotten_tomatoes.load(task=task, seed=seed)
        keep = (lambda s, i: True) if task == "sentiment" else (lambda s, i: s.label[i] == 1)
        parts = {
            part: [t for i, t in enumerate(splits[part].text) if keep(splits[part], i)]
            for part in ("train", "test")
        }
    else:
        raise ValueError(f"unknown corpus {name!r}; expected one of {SOURCES}")
    out = {}
    for part, limit in (("train", train_chars), ("test", test_chars)):
        data = "\n".join(parts[part]).encode("utf-8")[:limit]
        out[part] = np.frombuffer(data, np.uint8).astype(np.int32)
    return out


def windows(data: np.ndarray, seq: int) -> dict[str, np.ndarray]:
    """Consecutive non-overlapping windows: ``inputs`` and the next bytes ``targets``."""
    n = (len(data) - 1) // seq
    return {
        "inputs": data[: n * seq].reshape(n, seq),
        "targets": data[1 : n * seq + 1].reshape(n, seq),
    }


def batch_fn(data: np.ndarray, *, seq: int, batch_size: int, seed: int):
    """``step -> batch`` of ``batch_size`` random windows, a pure function of the step."""

    def batch_at(step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((seed, step))
        starts = rng.integers(0, len(data) - seq - 1, batch_size)
        idx = starts[:, None] + np.arange(seq + 1)
        rows = data[idx]
        return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}

    return batch_at


# -- model ------------------------------------------------------------------------------------


def make_model(config: ml_collections.ConfigDict) -> rnn.RNNLM:
    m = config.model
    return rnn.RNNLM(
        vocab_size=256,
        embed_dim=m.embed_dim,
        hidden=m.hidden,
        num_layers=m.num_layers,
        cell=m.cell,
    )


def evaluate(loss, params, data: dict[str, np.ndarray], batch_size: int) -> float:
    """Mean bits per byte over every window of ``data``, each from a zero state.

    ``loss(params, batch)`` is the jitted mean loss (nats) of a batch of windows.
    """
    n = len(data["inputs"])
    total = 0.0
    for i in range(0, n, batch_size):
        b = {k: v[i : i + batch_size] for k, v in data.items()}
        total += float(loss(params, b)) * len(b["inputs"])
    return rnn.bits_per_token(total / n)


def decode(ids) -> str:
    return bytes(np.asarray(ids, np.uint8).tolist()).decode("utf-8", errors="replace")


# -- the experiment --------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrains, adapts with every method, and writes the table, plot and samples.

    Returns:
        The contents of ``workdir/results.json`` (or ``{"stopped": name}`` after a signal).
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    finished.check_methods(config, METHODS)

    # -- data -------------------------------------------------------------------------------
    d = config.data
    source = corpus(
        d.source, seed=d.seed, train_chars=d.source_train_chars, test_chars=d.test_chars
    )
    target = corpus(
        d.target, seed=d.seed, train_chars=d.target_train_chars, test_chars=d.test_chars
    )
    tests = {k: windows(v["test"], d.seq_len) for k, v in (("source", source), ("target", target))}
    logging.info(
        "data: %s %d train bytes, %s %d train bytes, %d test bytes each",
        d.source,
        len(source["train"]),
        d.target,
        len(target["train"]),
        d.test_chars,
    )

    # -- model, methods, and one short run of the loop per training --------------------------
    model = make_model(config)
    base_apply = lambda p, ids, carries=None, prompt=True: model.apply(  # noqa: E731
        {"params": p}, ids, carries, prompt=prompt
    )
    p = config.peft
    lora_apply = lora.wrap_apply(base_apply, alpha=p.alpha, rank=p.rank)
    logits_of = lambda apply: lambda params, ids: apply(params, ids)[0]  # noqa: E731
    plan = loop.plan_from(config)
    plan.check_batch_size(config.optim.batch_size, what="config.optim.batch_size")
    fits = finished.Fits(plan, log_every=config.log_every_steps)

    def fit(folder, params, rules, apply, lr, data, *, num_steps, seed, fresh):
        label_tree = partition.labels(params, rules, what=f"rules of {folder.name}")
        tx = optax.adam(lr)
        state = train.init_state(params, label_tree, tx, seed=seed)
        run = fits(
            folder, state, rnn.make_loss_fn(logits_of(apply)), tx,
            batch_fn(data, seq=d.seq_len, batch_size=config.optim.batch_size, seed=seed),
            num_steps=num_steps, key=(apply, lr), fresh=fresh,
        )  # fmt: skip
        curve = [float(m["train/bits_per_token"]) for m in run.history]
        # short_run hands back one host copy of the state already (under pmap too)
        return run.state.params, curve, partition.count(run.state.trainable)

    # One compiled evaluation and sampler per apply function (base, LoRA), shared by every run.
    losses = {
        a: jax.jit(lambda q, b, a=a: rnn.make_loss_fn(logits_of(a))(q, b, None)[0])
        for a in (base_apply, lora_apply)
    }
    samplers = {
        a: jax.jit(
            functools.partial(
                rnn.sample, a, steps=config.sample.length, temperature=config.sample.temperature
            )
        )
        for a in (base_apply, lora_apply)
    }

    def score(apply, params) -> dict:
        return {
            f"{k}_bpc": evaluate(losses[apply], params, v, config.eval_batch_size)
            for k, v in tests.items()
        }

    prompt = target["test"][: config.sample.prompt_len][None]
    prompt_text = decode(prompt[0])

    def sample_text(apply, params) -> str:
        key = jax.random.PRNGKey(config.sample.seed)
        return decode(samplers[apply](params, jnp.asarray(prompt), key)[0])

    past = finished.Runs(workdir, metric_prefix=lambda name: f"train/{name}/", config=config)
    writer = past.open_writer()

    def record_curve(name: str, curve: list[float]) -> None:
        every = config.log_every_steps
        for s in range(every - 1, len(curve), every):
            writer.write(
                s + 1, {f"train/{name}/bits_per_byte": float(np.mean(curve[s - every + 1 : s + 1]))}
            )

    init = lambda seed: model.init(jax.random.PRNGKey(seed), prompt)["params"]  # noqa: E731
    everything = [(".*", "train")]

    def adapt(method: str, pretrained) -> dict:
        tick = time.perf_counter()
        apply, rules, params = base_apply, everything, pretrained
        if method == "scratch":
            params = init(config.seed + 1)
        elif method == "lora":
            params = lora.init(
                pretrained,
                jax.random.PRNGKey(config.seed + 2),
                targets=list(p.targets),
                rank=p.rank,
                alpha=p.alpha,
                what="config.peft",
            )
            apply, rules = lora_apply, lora.rules()
        elif method == "head":
            rules = [("head/.*", "train"), (".*", "frozen")]
        params, curve, n = fit(
            workdir / RUNS / method,
            params,
            rules,
            apply,
            config.optim.lr[method],
            target["train"],
            num_steps=config.optim.num_steps,
            seed=config.seed,
            fresh=True,
        )
        record_curve(method, curve)
        return {
            "curve": curve,
            "trainable": n,
            **score(apply, params),
            "sample": sample_text(apply, params),
            "seconds": time.perf_counter() - tick,
        }

    try:
        # The pretrained model's run resumes from its checkpoint (finished: restores it).
        pre = past.get(PRETRAIN)
        pretrained = None
        if pre is None or any(past.get(m) is None for m in config.methods):
            pretrained, curve, n = fit(
                workdir / RUNS / PRETRAIN,
                init(config.seed),
                everything,
                base_apply,
                config.optim.pretrain_lr,
                source["train"],
                num_steps=config.optim.pretrain_steps,
                seed=config.seed,
                fresh=False,
            )
        if pre is None:
            record_curve(PRETRAIN, curve)
            pre = {
                "curve": curve,
                "trainable": n,
                **score(base_apply, pretrained),
                "sample": sample_text(base_apply, pretrained),
            }
            past.put(PRETRAIN, pre)
        results_by = {m: past.get_or_run(m, adapt, m, pretrained) for m in config.methods}
    except finished.Stopped as e:
        writer.close()
        logging.info("stopped during %s; rerun to resume", e)
        return {"stopped": str(e)}
    writer.close()

    # -- report -----------------------------------------------------------------------------
    rows = [
        {
            "method": "pretrained",
            "trainable": 0,
            **{k: v for k, v in pre.items() if k.endswith("_bpc")},
        }
    ]
    rows += [
        {
            "method": m,
            "trainable": r["trainable"],
            "target_bpc": r["target_bpc"],
            "source_bpc": r["source_bpc"],
            "seconds": r["seconds"],
        }
        for m, r in results_by.items()
    ]
    results = {
        "source": d.source,
        "target": d.target,
        "source_train_bytes": int(len(source["train"])),
        "target_train_bytes": int(len(target["train"])),
        "test_bytes": {k: int(v["inputs"].size) for k, v in tests.items()},
        "rows": rows,
        "pretrain_final_train_bpc": float(np.mean(pre["curve"][-10:])) if pre["curve"] else None,
        "prompt": prompt_text,
        "samples": {"pretrained": pre["sample"], **{m: r["sample"] for m, r in results_by.items()}},
        "wall_s": time.perf_counter() - start,
        "hardware": f"{platform.machine()} {jax.devices()[0].platform}",
    }
    table = reports.rnn_transfer_table(rows, source=d.source, target=d.target)
    plot = lambda: reports.rnn_transfer_plot(  # noqa: E731
        results_by,
        pretrained_bpc=pre["target_bpc"],
        source=d.source,
        target=d.target,
        cell=config.model.cell,
    )
    if reports.publish(workdir, results, table=table, figures={"transfer.png": plot}, dpi=110):
        samples = [f"prompt: {prompt_text!r}", ""]
        samples += [f"{name}: {text!r}" for name, text in results["samples"].items()]
        report.save_text(workdir / "samples.md", "\n".join(samples) + "\n")
        print(table, flush=True)
    return results
