"""One DPO train step (sigmoid loss, LoRA, reference = LoRA off): ftlab vs TRL's DPOTrainer, on CPU.

    .venv/bin/python -m experiments.bench.dpo_step --peer_python=/tmp/hfvenv/bin/python
    .venv/bin/python -m experiments.bench.dpo_step --quick     # smoke test: 2 layers, 2 x 16

Both sides run SmolLM2-135M's architecture (30 layers, vocab 49152, tied embeddings) with random
weights (float32 unless ``--dtype``), LoRA rank 8 / alpha 16 on the query and value projections (no
dropout), and the same step on ``--b`` preference pairs: a prompt of ``--prompt_len`` random tokens
followed by a chosen and a rejected response of ``--response_len`` tokens each (the last one EOS),
so every row is ``prompt_len + response_len`` tokens and nothing is padded. The step runs the
reference (the same weights with the LoRA switched off, no second copy of the model) on the ``2b``
rows without a gradient, then the policy forward and backward, the sigmoid DPO loss (beta
``--beta``) on the responses' summed log-probs, global-norm clipping at 1.0 and one AdamW update
(no weight decay).

With ``--dtype=bfloat16`` both sides compute in bfloat16 over float32 master weights: ftlab's
model has ``LlamaConfig(dtype=bfloat16)``, TRL runs with ``bf16=True`` (torch's CPU autocast).

Variants, each in its own process:

- ``ftlab``: `ftlab.posttrain.dpo.make_dpo_step` with ``base_apply`` (the reference from
  ``state.frozen``) and the policy `ftlab.peft.lora.wrap_apply` of it, under `jax.jit` with the
  state donated, compiled ahead of time; the tree is held stacked (`llama.stack_layers`).
- ``trl``: `trl.DPOTrainer` with a `peft.LoraConfig` and no ``ref_model`` (TRL then disables
  the adapter for the reference), ``loss_type=["sigmoid"]``, ``transformers.LlamaForCausalLM``
  with ``sdpa`` attention, no gradient checkpointing (DPOConfig's default is on; ftlab keeps
  its activations too), run by ``--peer_python``. The text is one word per token id, so the
  tokens are exactly ftlab's. A step is timed from ``on_step_begin`` to ``on_step_end``.

What differs, besides the frameworks: `make_dpo_step` takes a model apply that returns logits,
so ftlab forms the ``[2b, seq, 49152]`` float32 logits of both passes (200 MB each at 4 pairs x
128 tokens) and takes their log-softmax; TRL's fused LM head computes the log-probs of the
targets in chunks without keeping the logits (it also computes per-token entropy and top-1
accuracy for its logs).

Each child reports the median of ``--steps`` timed steps after ``--warmup`` untimed ones (and
ftlab's compilation ``compile_s``; TRL's first step is ``first_step_s``) and its own peak RSS;
the parent adds ``speedup_vs_trl`` (TRL's median step over this one's) and ``memory_vs_trl``
(this one's peak RSS over TRL's) and writes ``experiments/bench/dpo_step.jsonl``
(``dpo_step_quick.jsonl`` with ``--quick``).
"""

from __future__ import annotations

import sys
import tempfile
import time

from experiments.bench import common

if __name__ != "__main__" or not common.is_child():
    # The parent (and tests). The peer's interpreter needs neither absl nor JAX.
    from absl import app, flags

    _PEER_PYTHON = flags.DEFINE_string(
        "peer_python", None, "Python with torch, transformers, peft and trl; without it the TRL "
        "variant is skipped."
    )  # fmt: skip
    _VARIANTS = flags.DEFINE_string("variants", "ftlab,trl", "Any of ftlab, trl.")
    _B = flags.DEFINE_integer("b", 4, "Preference pairs per step.")
    _PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens of each pair.")
    _RESPONSE_LEN = flags.DEFINE_integer("response_len", 64, "Tokens of each response.")
    _LAYERS = flags.DEFINE_integer("layers", 30, "Decoder layers (SmolLM2-135M: 30).")
    _BETA = flags.DEFINE_float("beta", 0.1, "DPO's beta, both sides.")
    _STEPS = flags.DEFINE_integer("steps", 3, "Timed steps.")
    _WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
    _DTYPE = flags.DEFINE_enum(
        "dtype", "float32", ["float32", "bfloat16"],
        "Computation dtype, both sides (float32 master weights and optimizer state either way).",
    )  # fmt: skip
    _QUICK = flags.DEFINE_bool("quick", False, "Smoke test: 2 layers, 2 pairs of 8 + 8, 2 steps.")
    _OUT = flags.DEFINE_string("out", None, "Where to write the lines (default by --quick).")

VARIANTS = ("ftlab", "trl")
LR, MAX_GRAD_NORM, EOS = 5e-5, 1.0, 1


def _pairs(s: dict):
    """``(prompt [b, prompt_len], chosen [b, response_len], rejected [b, response_len])`` int32
    token ids; each response ends with EOS."""
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(0)
    vocab = common.SMOLLM2["vocab_size"]
    prompt = rng.integers(8, vocab, (s["b"], s["prompt_len"]))
    chosen, rejected = rng.integers(8, vocab, (2, s["b"], s["response_len"]))
    chosen[:, -1] = rejected[:, -1] = EOS
    return prompt.astype(np.int32), chosen.astype(np.int32), rejected.astype(np.int32)


def _run_ftlab(s: dict) -> dict:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415

    from ftlab.core import partition, train  # noqa: PLC0415
    from ftlab.models import llama  # noqa: PLC0415
    from ftlab.peft import lora  # noqa: PLC0415
    from ftlab.posttrain import dpo  # noqa: PLC0415

    config = llama.LlamaConfig(
        **common.SMOLLM2, num_layers=s["layers"], dtype=jnp.dtype(s["dtype"])
    )
    module = llama.LlamaForCausalLM(config)
    params = llama.init(config, jax.random.key(0))
    params = lora.init(
        params, jax.random.key(1), targets=[common.LORA_TARGETS], rank=common.LORA_RANK,
        alpha=common.LORA_ALPHA,
    )  # fmt: skip
    params = llama.stack_layers(params)
    labels = partition.labels(params, lora.rules())
    tx = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM), optax.adamw(LR, weight_decay=0.0))
    state = train.init_state(params, labels, tx, seed=0, copy=False)
    del params

    def base_apply(params, batch):
        return module.apply({"params": params}, batch["input_ids"], batch["attention_mask"])

    policy_apply = lora.wrap_apply(base_apply, alpha=common.LORA_ALPHA, rank=common.LORA_RANK)
    step = dpo.make_dpo_step(policy_apply, tx, base_apply=base_apply, beta=s["beta"])

    prompt, chosen, rejected = _pairs(s)
    loss_mask = np.concatenate(
        [np.zeros_like(prompt), np.ones_like(chosen)], axis=1, dtype=np.int32
    )
    batch = {}
    for side, response in (("chosen", chosen), ("rejected", rejected)):
        ids = np.concatenate([prompt, response], axis=1)
        batch[f"{side}_input_ids"] = jnp.asarray(ids)
        batch[f"{side}_attention_mask"] = jnp.ones(ids.shape, jnp.int32)
        batch[f"{side}_loss_mask"] = jnp.asarray(loss_mask)
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state, "metrics": None}

    def one_step():
        holder["state"], holder["metrics"] = compiled(holder["state"], batch)
        jax.block_until_ready(holder["metrics"])

    times, cpu = common.time_calls_cpu(one_step, warmup=s["warmup"], reps=s["steps"])
    metrics = {k: float(v) for k, v in holder["metrics"].items()}
    if not np.isfinite(metrics["train/loss"]):
        raise FloatingPointError(f"ftlab: loss {metrics['train/loss']}")
    return {
        **common.timing_fields(times),
        **common.cpu_fields(cpu),
        "compile_s": compile_s,
        "final_loss": metrics["train/loss"],
        "rewards_margin": metrics["train/rewards/margin"],
        "model_batch_shape": [2 * s["b"], s["prompt_len"] + s["response_len"]],
        "trainable_params": partition.count(holder["state"].trainable),
        "platform": jax.devices()[0].platform,
        "version": f"jax {jax.__version__}",
    }


def _run_trl(s: dict) -> dict:
    peer = common.TrlPeer(s["layers"])
    prompt, chosen, rejected = _pairs(s)
    total = s["warmup"] + s["steps"]
    # every step sees the same b pairs, as ftlab's one batch; a response starts with a space
    # (TRL tokenises prompt + response as one string) and ends with EOS (so none is added)
    picks = [i % s["b"] for i in range(s["b"] * total)]
    dataset = peer.datasets.Dataset.from_dict(
        {
            "prompt": [common.words(prompt[i]) for i in picks],
            "chosen": [" " + common.words(chosen[i]) for i in picks],
            "rejected": [" " + common.words(rejected[i]) for i in picks],
        }
    )
    with tempfile.TemporaryDirectory() as out:
        args = peer.args(
            peer.trl.DPOConfig, out, dtype=s["dtype"], max_steps=total,
            per_device_train_batch_size=s["b"], gradient_accumulation_steps=1,
            loss_type=["sigmoid"], beta=s["beta"], max_length=None, learning_rate=LR,
            max_grad_norm=MAX_GRAD_NORM, disable_dropout=True, precompute_ref_log_probs=False,
        )  # fmt: skip
        times: list[float] = []
        cpu: list[float] = []
        trainer = peer.trl.DPOTrainer(
            model=peer.model, args=args, train_dataset=dataset, processing_class=peer.tokenizer,
            peft_config=peer.lora_config(),
            callbacks=[common.step_timer(peer.transformers, times, cpu)],
        )  # fmt: skip
        # what the model gets per step, to check both sides do the same work
        sample = next(iter(trainer.get_train_dataloader()))
        shape = list(sample["input_ids"].shape)
        trainer.train()
        history = [x for x in trainer.state.log_history if "loss" in x]
    last = history[-1] if history else {}
    return peer.result(
        trainer, times, s["warmup"], cpu,
        final_loss=last.get("loss"),
        rewards_margin=last.get("rewards/margins"),
        model_batch_shape=shape,
        attn_implementation=trainer.model.config._attn_implementation,  # noqa: SLF001
        optim=str(getattr(args.optim, "value", args.optim)),
    )  # fmt: skip


def main(argv):
    del argv
    quick = _QUICK.value
    settings = dict(
        b=2 if quick else _B.value, prompt_len=8 if quick else _PROMPT_LEN.value,
        response_len=8 if quick else _RESPONSE_LEN.value, layers=2 if quick else _LAYERS.value,
        beta=_BETA.value, steps=2 if quick else _STEPS.value, warmup=_WARMUP.value,
        dtype=_DTYPE.value,
    )  # fmt: skip
    variants = common.choose_variants(_VARIANTS.value, VARIANTS)
    default = "dpo_step_quick.jsonl" if quick else "dpo_step.jsonl"
    sys.exit(
        common.run_peer_bench(
            "experiments.bench.dpo_step", variants, settings, peer_python=_PEER_PYTHON.value,
            peer_of={"ftlab": "trl", "trl": "trl"},
            out=_OUT.value or f"experiments/bench/{default}",
        )
    )  # fmt: skip


if __name__ == "__main__":
    if common.is_child():
        common.child_main("dpo_step", {"ftlab": _run_ftlab, "trl": _run_trl})
    else:
        app.run(main)
