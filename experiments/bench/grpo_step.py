"""One GRPO step (sample G continuations of B prompts, score them, update): ftlab vs TRL, on CPU.

    .venv/bin/python -m experiments.bench.grpo_step --peer_python=/tmp/hfvenv/bin/python
    .venv/bin/python -m experiments.bench.grpo_step --quick     # smoke test: 2 layers, 8 tokens

Both sides run SmolLM2-135M's architecture (30 layers, d_model 576, 9 query / 3 KV heads, vocab
49152, tied embeddings) with random weights, LoRA rank 8 / alpha 16 on the query and value
projections (no dropout), float32, and the same step:

- generate ``--g`` completions of exactly ``--new_tokens`` tokens (no EOS stop) for each of
  ``--b`` prompts of ``--prompt_len`` tokens, temperature 1, top-p 1, with a KV cache;
- score each completion (the share of its tokens equal to token id 7: a synthetic reward, so the
  step's cost is the policy's, not a reward model's);
- group-relative advantages (standard deviation with ddof 1, TRL's), the reference's per-token
  log-probs with the LoRA switched off, the clipped ratio loss with a k3 KL penalty
  (``--beta``) averaged over all completion tokens (TRL's default ``loss_type="dapo"``), one
  Adam update (lr 1e-5, global norm clipped at 1.0, TRL's default).

Variants, each in its own process:

With ``--dtype=bfloat16`` both sides compute in bfloat16 over float32 master weights: ftlab's
model has ``LlamaConfig(dtype=bfloat16)`` (the step casts the weights once, `ftlab.posttrain.rl`),
TRL runs with ``bf16=True`` (torch's CPU autocast).

- ``ftlab``: `ftlab.posttrain.rl.make_grpo_step` under `jax.jit` with the state donated,
  compiled ahead of time; the LoRA tree is held stacked (`llama.stack_layers`), so one layer
  body compiles and the step never restacks the weights. The sampler is ftlab's compiled
  KV-cache loop (`generation.decode`) inside `lora.wrap_apply`.
- ``trl``: `trl.GRPOTrainer` with a `peft.LoraConfig`, `transformers.LlamaForCausalLM`
  (``sdpa`` attention), run by ``--peer_python`` (torch, transformers, peft and trl are no
  dependency of ftlab); prompts are text of a word-level tokenizer with one word per token id,
  so each prompt is exactly ``--prompt_len`` tokens; ``min_new_tokens`` makes every completion
  ``--new_tokens`` long; no gradient checkpointing (ftlab's step keeps its activations too). A
  step is timed from the trainer's ``on_step_begin`` to its
  ``on_step_end`` callback (generation, rewards, reference, loss, backward, optimizer).

Each child reports the median of ``--steps`` timed steps after ``--warmup`` untimed ones (and
compilation); the parent adds ``speedup_vs_trl`` (TRL's median over ftlab's) to the ftlab line
and writes ``experiments/bench/grpo_step.jsonl`` (``grpo_step_quick.jsonl`` with ``--quick``).
"""

from __future__ import annotations

import sys
import tempfile
import time

from experiments.bench import common

if __name__ != "__main__" or not common.is_child():
    # The parent (and tests). The peer child needs only its own libraries, so the peer's
    # interpreter needs neither absl nor JAX.
    from absl import app, flags

    _PEER_PYTHON = flags.DEFINE_string(
        "peer_python",
        None,
        "Python with torch, transformers, peft and trl; without it the TRL variant is skipped.",
    )
    _VARIANTS = flags.DEFINE_string("variants", "ftlab,trl", "Any of ftlab, trl.")
    _B = flags.DEFINE_integer("b", 2, "Prompts per step.")
    _G = flags.DEFINE_integer("g", 4, "Completions per prompt.")
    _PROMPT_LEN = flags.DEFINE_integer("prompt_len", 16, "Tokens per prompt.")
    _NEW_TOKENS = flags.DEFINE_integer("new_tokens", 32, "Tokens per completion.")
    _LAYERS = flags.DEFINE_integer("layers", 30, "Decoder layers (SmolLM2-135M: 30).")
    _BETA = flags.DEFINE_float("beta", 0.04, "KL penalty coefficient (k3), both sides.")
    _DTYPE = flags.DEFINE_enum(
        "dtype", "float32", ["float32", "bfloat16"],
        "Computation dtype, both sides (float32 master weights and optimizer state either way).",
    )  # fmt: skip
    _STEPS = flags.DEFINE_integer("steps", 3, "Timed steps.")
    _WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
    _QUICK = flags.DEFINE_bool("quick", False, "Smoke test: 2 layers, 8 new tokens, 2 steps.")
    _OUT = flags.DEFINE_string("out", None, "Where to write the lines (default by --quick).")

VARIANTS = ("ftlab", "trl")
SMOLLM2 = common.SMOLLM2
RANK, ALPHA = common.LORA_RANK, common.LORA_ALPHA
LR, MAX_GRAD_NORM, TARGET = 1e-5, 1.0, 7


def _prompts(s):
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(0)
    return rng.integers(8, SMOLLM2["vocab_size"], (s["b"], s["prompt_len"])).astype(np.int32)


def _run_ftlab(s: dict) -> dict:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415

    from ftlab.core import partition, train  # noqa: PLC0415
    from ftlab.models import llama  # noqa: PLC0415
    from ftlab.peft import lora  # noqa: PLC0415
    from ftlab.posttrain import rl  # noqa: PLC0415

    dtype = jnp.dtype(s["dtype"])  # the computation dtype; the step casts the weights once
    config = llama.LlamaConfig(**SMOLLM2, num_layers=s["layers"], dtype=dtype)
    model = llama.LlamaForCausalLM(config)
    params = llama.init(config, jax.random.key(0))
    params = lora.init(
        params, jax.random.key(1), targets=[common.LORA_TARGETS],
        rank=RANK, alpha=ALPHA,
    )  # fmt: skip
    params = llama.stack_layers(params)
    labels = partition.labels(params, lora.rules())
    tx = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM), optax.adam(LR))
    state = train.init_state(params, labels, tx, seed=0, copy=False)
    del params

    def reward_fn(rollout):
        hits = (rollout.tokens == TARGET) * rollout.mask
        return jnp.sum(hits, axis=1) / jnp.maximum(jnp.sum(rollout.mask, axis=1), 1)

    sampling = rl.Sampling(
        num_samples=s["g"], max_new_tokens=s["new_tokens"], eos_id=-1, temperature=1.0
    )
    step = rl.make_grpo_step(
        model, tx, reward_fn, sampling, kl_coef=s["beta"],
        wrap=lambda f: lora.wrap_apply(f, alpha=ALPHA, rank=RANK),
    )  # fmt: skip
    ids = _prompts(s)
    batch = {"prompt_ids": jnp.asarray(ids), "prompt_mask": jnp.ones(ids.shape, jnp.int32)}
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state, "metrics": None}

    def one_step():
        holder["state"], holder["metrics"] = compiled(holder["state"], batch)
        jax.block_until_ready(holder["metrics"])

    times = common.time_calls(one_step, warmup=s["warmup"], reps=s["steps"])
    loss = float(holder["metrics"]["train/loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"ftlab: loss {loss}")
    return {
        **common.timing_fields(times),
        "compile_s": compile_s,
        "final_loss": loss,
        "kl": float(holder["metrics"]["train/kl"]),
        "completion_length": float(holder["metrics"]["train/completion_length"]),
        "trainable_params": partition.count(holder["state"].trainable),
        "platform": jax.devices()[0].platform,
        "version": f"jax {jax.__version__}",
    }


def _run_trl(s: dict) -> dict:
    peer = common.TrlPeer(s["layers"])
    peer.tokenizer.padding_side = "left"
    ids = _prompts(s)
    total = s["warmup"] + s["steps"]
    rows = [common.words(ids[i % len(ids)]) for i in range(len(ids) * total)]
    dataset = peer.datasets.Dataset.from_dict({"prompt": rows})

    def reward(completions, completion_ids, **kwargs):
        return [sum(int(t) == TARGET for t in c) / max(len(c), 1) for c in completion_ids]

    with tempfile.TemporaryDirectory() as out:
        args = peer.args(
            peer.trl.GRPOConfig, out, dtype=s["dtype"], max_steps=total,
            per_device_train_batch_size=s["b"] * s["g"], num_generations=s["g"],
            gradient_accumulation_steps=1, max_completion_length=s["new_tokens"],
            temperature=1.0, top_p=1.0, generation_kwargs={"min_new_tokens": s["new_tokens"]},
            beta=s["beta"], learning_rate=LR, max_grad_norm=MAX_GRAD_NORM, disable_dropout=True,
            shuffle_dataset=False,
        )  # fmt: skip
        times = []
        trainer = peer.trl.GRPOTrainer(
            model=peer.model, reward_funcs=reward, args=args, train_dataset=dataset,
            processing_class=peer.tokenizer, peft_config=peer.lora_config(),
            callbacks=[common.step_timer(peer.transformers, times)],
        )  # fmt: skip
        trainer.train()
        history = [x for x in trainer.state.log_history if "loss" in x]
    last = history[-1] if history else {}
    return peer.result(
        trainer, times, s["warmup"],
        final_loss=last.get("loss"),
        kl=last.get("kl"),
        completion_length=last.get("completions/mean_length"),
    )  # fmt: skip


def main(argv):
    del argv
    quick = _QUICK.value
    settings = dict(
        b=_B.value, g=_G.value, prompt_len=_PROMPT_LEN.value,
        new_tokens=8 if quick else _NEW_TOKENS.value, layers=2 if quick else _LAYERS.value,
        beta=_BETA.value, steps=2 if quick else _STEPS.value, warmup=_WARMUP.value,
        dtype=_DTYPE.value,
    )  # fmt: skip
    variants = common.choose_variants(_VARIANTS.value, VARIANTS)
    default = "grpo_step_quick.jsonl" if quick else "grpo_step.jsonl"
    sys.exit(
        common.run_peer_bench(
            "experiments.bench.grpo_step", variants, settings, peer_python=_PEER_PYTHON.value,
            peer_of={"ftlab": "trl", "trl": "trl"},
            out=_OUT.value or f"experiments/bench/{default}",
        )
    )  # fmt: skip


if __name__ == "__main__":
    if common.is_child():
        common.child_main("grpo_step", {"ftlab": _run_ftlab, "trl": _run_trl})
    else:
        app.run(main)
