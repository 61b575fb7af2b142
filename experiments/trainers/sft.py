"""Instruction tuning (SFT) of SmolLM2-135M-Instruct on ShareGPT, loss on assistant tokens only.

Conversations (`ftlab.data.sharegpt`: read, `for_sft`, the train/test split that keeps the pieces
of one conversation together) are rendered with the checkpoint's own chat template
(`third_party.smollm2.CHAT_TEMPLATE`) and tokenised with the assistant turns marked
(`ftlab.posttrain.sft.encode`: their content and end-of-turn token, never a header, the system
prompt or a user turn), then packed several per row of ``config.data.seq_len`` tokens
(`sft.pack`) with segment ids, so that attention never crosses two conversations and positions
restart at each (`ftlab.models.llama`). A conversation longer than a row is cut to its first
``seq_len`` tokens; one with no assistant token left is dropped (both counted in the results).

``config.method`` picks what trains, from the same config: ``full`` (every leaf), ``lora`` and
``qlora`` (LoRA factors on ``config.peft.targets``; QLoRA keeps the ``config.peft.qlora_targets``
kernels as 4-bit blocks), ``prompt`` (a soft prompt of ``config.peft.length`` rows), each through
`experiments.models.add_method` and its partition rules.

The loss is the mean negative log-likelihood of the assistant tokens of a batch (computed from
the final hidden states in chunks: `logprobs.token_logprobs_from_hidden`, so the ``[rows,
seq_len, 49k]`` logits never exist at once). The held-out loss (the same, over every assistant
token of ``config.data.num_test`` test conversations) is measured before training, during it, and
after.

Writes into the workdir: ``results.json``, ``results.md`` (held-out loss and perplexity before and
after), ``before.json`` (the loss before training, kept for a resumed run), ``losses.png`` (train
and held-out loss against the step), with ``config.plot_metrics`` ``train.png`` / ``eval.png``
(every metric), checkpoints and metrics.jsonl.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from experiments import evaluation, loop, models, reports
from ftlab.core import metrics as metrics_lib
from ftlab.core import partition, report, train
from ftlab.data import batching, files, sharegpt
from ftlab.models import hooks, llama
from ftlab.peft import lora, prompt, qlora
from ftlab.posttrain import logprobs, sft

METHODS = ("full", "lora", "qlora", "prompt")
# the arrays of a packed row the model and the loss read
ROW_KEYS = ("input_ids", "attention_mask", "segment_ids", "targets", "loss_mask")


# -- data -----------------------------------------------------------------------------------------


def _first_turns(messages, max_messages: int):
    """The first ``max_messages`` messages (0: all), cut back to end on an assistant turn."""
    if not max_messages or len(messages) <= max_messages:
        return messages
    kept = list(messages[:max_messages])
    while kept and kept[-1]["role"] != "assistant":
        kept.pop()
    return kept if any(m["role"] == "assistant" for m in kept) else list(messages)


@functools.lru_cache(maxsize=1)
def _sharegpt() -> sharegpt.SFTData:
    # decoded once per process (125 MB of JSON): a test or a sweep runs the trainer repeatedly
    return sharegpt.for_sft(sharegpt.read())


def conversations(config: ml_collections.ConfigDict) -> dict[str, list]:
    """``{"train", "test"}`` message lists: the first ``num_train`` / ``num_test`` of each side."""
    d = config.data
    data = _sharegpt()
    sides = sharegpt.split(data.ids, seed=d.split_seed, test_fraction=d.test_fraction)
    out = {}
    for name, count in (("train", d.num_train), ("test", d.num_test)):
        idx = sides[name] if not count else sides[name][:count]
        out[name] = [_first_turns(data.conversations[i], d.max_messages) for i in idx]
    return out


def pack_split(examples, *, seq_len: int, pad_id: int) -> tuple[dict, dict]:
    """Packs the examples with an assistant token within ``seq_len``; ``(arrays, counts)``."""
    kept = [e for e in examples if np.any(e.assistant_mask[1:seq_len])]
    packed = sft.pack(kept, seq_len=seq_len, pad_id=pad_id)
    arrays = {k: v for k, v in packed.arrays().items() if k in ROW_KEYS}
    counts = {
        "conversations": len(kept),
        "dropped_no_assistant_token_in_row": len(examples) - len(kept),
        "truncated": len(packed.truncated),
        "rows": int(packed.input_ids.shape[0]),
        "scored_tokens": int(packed.loss_mask.sum()),
        "fill": float(packed.attention_mask.mean()),
    }
    return arrays, counts


# -- the model and its method ---------------------------------------------------------------------


def add_method(config: ml_collections.ConfigDict, params, model_config: llama.LlamaConfig):
    """``(params, rules, wrap)`` of ``config.method`` on the decoder's (unstacked) tree."""
    method, p = config.method, config.peft
    if method not in METHODS:
        raise ValueError(f"config.method={method!r}; expected one of {METHODS}")
    rng = jax.random.PRNGKey(config.seed + 1)
    if method == "full":
        return params, [(".*", "train")], lambda f: f
    if method == "prompt":
        module = llama.LlamaForCausalLM(model_config)
        ids = jnp.ones((1, 2), jnp.int32)
        sites = hooks.discover(lambda q: module.apply({"params": q}, ids), params)
        params, wrap = models.add_method(p, "prompt", params, rng, sites=sites)
        return params, prompt.rules(), wrap
    params, wrap = models.add_method(p, "lora", params, rng)
    if method == "qlora":
        params = qlora.quantize(params, targets=list(p.qlora_targets), what="config.peft.qlora")
    return params, lora.rules(), stacked(wrap)


def stacked(wrap):
    """``wrap`` of a LoRA-like method, given the stacked tree: the wrapper checks the leaves the
    model consumes (at ``decoder/layers/...``), so it must see the tree the model sees."""

    def wrap_stacked(f):
        g = wrap(f)
        return lambda params, *args: g(llama.stack_if_uniform(params), *args)

    return wrap_stacked


def output_table(params) -> jax.Array:
    """``[vocab, dim]``: the tied embedding, or the untied LM head's kernel transposed."""
    decoder = params["decoder"]
    if "lm_head" in decoder:
        return decoder["lm_head"]["kernel"].T
    return decoder["embeddings"]["word_embeddings"]["embedding"]


def make_nll_fn(model_config: llama.LlamaConfig, wrap, *, chunk: int):
    """``nll(params, batch) -> (summed NLL [rows], scored tokens [rows])`` of packed rows."""
    module = llama.LlamaForCausalLM(model_config)

    def hidden_fn(params, ids, mask, segment_ids):
        params = llama.stack_if_uniform(params)  # one compiled layer body, scanned
        return module.apply(
            {"params": params}, ids, mask, segment_ids=segment_ids, return_hidden=True
        )

    hidden_fn = wrap(hidden_fn)

    def nll(params, batch):
        hidden = hidden_fn(
            params, batch["input_ids"], batch["attention_mask"], batch["segment_ids"]
        )
        logp = logprobs.token_logprobs_from_hidden(
            hidden, output_table(params), batch["targets"], chunk=chunk
        )
        w = batch["loss_mask"].astype(jnp.float32)
        return -jnp.sum(logp * w, axis=1), jnp.sum(w, axis=1)

    return nll


def make_loss_fn(nll_fn):
    """The mean NLL per assistant token of the batch (the train step's loss)."""

    def loss_fn(params, batch, rng):
        del rng
        total, count = nll_fn(params, batch)
        tokens = jnp.sum(count)
        return jnp.sum(total) / jnp.maximum(tokens, 1.0), {"tokens": tokens}

    return loss_fn


def held_out_loss(plan, eval_step, state, arrays, *, batch_size: int) -> dict[str, float]:
    """Mean NLL over every scored token of ``arrays`` (exact: padding rows count nothing)."""
    sums = evaluation.batch_sums(plan, eval_step, state, arrays, batch_size=batch_size)
    count = sums.get("tokens", 0.0)
    loss = sums.get("nll", 0.0) / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


# -- main -----------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Tunes the decoder on packed ShareGPT rows and reports the held-out loss before and after.

    Resumes from the workdir's newest checkpoint. Returns the results (also results.json).
    """
    from third_party import smollm2  # noqa: PLC0415 - the chat template (no weights are read)

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    plan = loop.plan_from(config)
    plan.check_batch_size(config.optim.batch_size, what="config.optim.batch_size")
    plan.check_batch_size(config.evals.batch_size, what="config.evals.batch_size")
    d = config.data

    # -- data -------------------------------------------------------------------------------
    convs = conversations(config)
    texts = [m["content"] for c in convs["train"][:200] for m in c]
    model = models.decoder(
        ml_collections.ConfigDict(
            {
                "seed": config.seed,
                "model": models.decoder_model_options(config),
            }
        ),
        texts,
    )
    render = files.chat_renderer(smollm2.CHAT_TEMPLATE)
    arrays, counts = {}, {}
    for name, c in convs.items():
        try:
            encoded = sft.encode(model.tokenizer, c, render=render)
        except ValueError as e:
            raise ValueError(f"config.data ({name} conversations): {e}") from None
        arrays[name], counts[name] = pack_split(encoded, seq_len=d.seq_len, pad_id=model.pad_id)
    logging.info("packed: %s", json.dumps(counts))
    if counts["train"]["rows"] < config.optim.batch_size:
        raise ValueError(
            f"config.optim.batch_size={config.optim.batch_size} is more than the "
            f"{counts['train']['rows']} packed training rows; raise config.data.num_train"
        )

    # -- model, method, partition, optimizer ------------------------------------------------
    base = (
        llama.unstack_layers(model.params)
        if llama.LAYERS in model.params["decoder"]
        else model.params
    )
    params, rules, wrap = add_method(config, base, model.config)
    label_tree, n_trainable = models.partition_of(
        params, rules, what=f"config.method={config.method!r} rules"
    )
    tx = models.adamw(config, label_tree)
    state = train.init_state(params, label_tree, tx, seed=config.seed)
    base_mib = qlora.nbytes(state.frozen) / 2**20
    nll_fn = make_nll_fn(model.config, wrap, chunk=config.model.logits_chunk)

    def eval_fn(params, batch):
        total, count = nll_fn(params, batch)
        return {"nll": total, "tokens": count}

    eval_step = plan.compile_eval_step(
        train.make_eval_step(eval_fn, axis_name=models.axis_name(plan))
    )

    def evaluate(placed_state):
        return held_out_loss(
            plan, eval_step, placed_state, arrays["test"], batch_size=config.evals.batch_size
        )

    # The loss before training: measured once on the fresh state, kept for a resumed run.
    before_file = workdir / "before.json"
    if before_file.exists():
        before = json.loads(before_file.read_text())
    else:
        before = evaluate(plan.put_state(state))
        if jax.process_index() == 0:
            report.save_json(before_file, before)
    logging.info("held-out assistant-token loss before training: %s", before)

    evaluators = [
        loop.Evaluator(
            "test",
            lambda s: {f"eval/test/{k}": v for k, v in evaluate(s).items() if k != "tokens"},
            every_steps=config.evals.every_steps,
        )
    ]

    # -- loop -------------------------------------------------------------------------------
    run = loop.train(
        config,
        workdir,
        plan=plan,
        state=state,
        step_fn=train.make_train_step(make_loss_fn(nll_fn), tx, axis_name=models.axis_name(plan)),
        batch_at=lambda step: batching.train_batch(
            arrays["train"], step, batch_size=config.optim.batch_size, seed=d.seed
        ),
        evaluators=evaluators,
    )
    if not run.finished:
        return {"step": run.step}

    after = evaluate(run.state)
    name = "SmolLM2-135M-Instruct" if config.model.name == "smollm2" else "tiny random Llama"
    row = {
        "model": name,
        "method": config.method,
        "trainable_params": n_trainable,
        "steps": run.step,
        "loss_before": before["loss"],
        "loss_after": after["loss"],
        "ppl_before": before["perplexity"],
        "ppl_after": after["perplexity"],
    }
    results = {
        "step": run.step,
        "method": config.method,
        "model": name,
        "eval/test/loss_before": before["loss"],
        "eval/test/loss": after["loss"],
        "eval/test/perplexity_before": before["perplexity"],
        "eval/test/perplexity": after["perplexity"],
        "eval/test/tokens": after["tokens"],
        "data": counts,
        "seq_len": d.seq_len,
        "trainable_params": n_trainable,
        "total_params": partition.count(params),
        "base_mib_during_training": base_mib,
    }
    notes = [
        "Mean negative log-likelihood per assistant token of "
        f"{counts['test']['conversations']} held-out ShareGPT conversations "
        f"({int(after['tokens']):,} tokens), packed in rows of "
        f"{d.seq_len} tokens with segment ids; training: {counts['train']['conversations']} "
        f"conversations in {counts['train']['rows']} rows, {run.step} steps of "
        f"{config.optim.batch_size} rows.",
    ]
    table = reports.sft_table([row], notes=notes)
    plot = lambda: reports.sft_losses_plot(  # noqa: E731
        metrics_lib.read_jsonl(workdir / "metrics.jsonl"), before["loss"]
    )
    # with config.plot_metrics, every metric's curve (seconds of drawing)
    curves = "" if config.plot_metrics else None
    return run.finish(results, table=table, figures={"losses.png": plot}, curves=curves)
