"""One packed SFT train step (loss on assistant tokens only): ftlab vs TRL's SFTTrainer, on CPU.

    .venv/bin/python -m experiments.bench.sft_step --peer_python=/tmp/hfvenv/bin/python
    .venv/bin/python -m experiments.bench.sft_step --quick     # smoke test: 2 layers, 2 x 32

Both sides run SmolLM2-135M's architecture (30 layers, vocab 49152, tied embeddings) with
random weights (float32 unless ``--dtype``) and train on the same tokens: ``--b`` rows of
``--seq_len`` tokens, each row ``--segments`` conversations of ``seq_len / segments`` random
tokens packed end to end (no padding), the first half of each conversation a user turn and the
second half the assistant's, so the loss is the mean NLL of the assistant tokens. A step is
forward, loss, backward, global-norm clipping at 1.0 and one AdamW update (no weight decay).

With ``--dtype=bfloat16`` both sides compute in bfloat16 over float32 master weights: ftlab's
model has ``LlamaConfig(dtype=bfloat16)``, TRL runs with ``bf16=True`` (torch's CPU autocast).

Variants, each in its own process: ``ftlab_lora`` / ``trl_lora`` (LoRA rank 8, alpha 16 on the
query and value projections, no dropout) and ``ftlab_full`` / ``trl_full`` (every weight).

- ``ftlab_*``: the SFT trainer's own pieces (`experiments.trainers.sft`): rows from
  `ftlab.posttrain.sft.pack` (segment ids, per-segment positions, targets and loss mask), the
  loss of `sft.make_nll_fn` / `sft.make_loss_fn` (the LM head in chunks of 256 positions, so
  the ``[rows, seq, 49152]`` logits never exist at once), `models.adamw`, and
  `ftlab.core.train.make_train_step`, under `jax.jit` with the state donated, compiled ahead
  of time. The tree is held stacked (`llama.stack_layers`: one layer body, scanned); the
  trainer holds it unstacked and stacks it inside the step (``--layout=trainer`` measures that).
- ``trl_*``: `trl.SFTTrainer` (``--peer_python``: torch, transformers, peft and trl are no
  dependency of ftlab) on the same conversations, pre-tokenised with ``labels`` -100 on the
  user tokens, ``packing=True`` with ``--trl_packing`` (default ``bfd``, TRL's default and its
  only strategy that keeps conversations apart), ``transformers.LlamaForCausalLM`` with ``sdpa``
  attention, no gradient checkpointing (SFTConfig's default is on; ftlab keeps its
  activations too), TRL's fused LM head (chunked log-probs, as ftlab's). A step is timed from
  the trainer's ``on_step_begin`` to its ``on_step_end`` callback.

What differs, besides the frameworks:

- **Attention over packed rows.** With ``bfd`` TRL turns on padding-free batching: the
  collator concatenates the ``b`` packed rows into one ``[1, b * seq_len]`` sequence with
  per-conversation ``position_ids``, and transformers' ``sdpa`` path builds a block-diagonal
  causal mask over all of it, so its attention scores cost ``(b * seq_len)^2`` per head where
  ftlab's ``[b, seq_len]`` rows with segment ids cost ``b * seq_len^2`` (flash-attention's
  varlen kernel would skip the empty blocks; there is none on a CPU). At 4 x 256 that is 1.8
  GFLOP more per layer per forward pass against 7.2 GFLOP of projections and MLP.
  ``--trl_packing=wrapped`` gives TRL ftlab's shapes (``[b, seq_len]`` causal rows, the same
  FLOPs) but lets attention cross conversations: the same cost, not the same result.
- TRL's fused head also computes the entropy and top-1 accuracy of every scored position for
  its logs; ftlab's loss computes the NLL alone.
- TRL rebuilds the batch on the host each step (collation, not timed: it runs before
  ``on_step_begin``); ftlab's batch is on the device before timing starts.

Each child reports the median of ``--steps`` timed steps after ``--warmup`` untimed ones (and
ftlab's compilation, ``compile_s``; TRL's first step is ``first_step_s``) and its own peak RSS;
the parent adds ``speedup_vs_trl`` (the TRL variant's median step over this one's) and
``memory_vs_trl`` (this one's peak RSS over the TRL variant's) and writes
``experiments/bench/sft_step.jsonl`` (``sft_step_quick.jsonl`` with ``--quick``).
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
        "variants are skipped."
    )  # fmt: skip
    _VARIANTS = flags.DEFINE_string(
        "variants", ",".join(("ftlab_lora", "trl_lora", "ftlab_full", "trl_full")),
        "Any of ftlab_lora, trl_lora, ftlab_full, trl_full.",
    )  # fmt: skip
    _B = flags.DEFINE_integer("b", 4, "Packed rows per step.")
    _SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
    _SEGMENTS = flags.DEFINE_integer("segments", 4, "Conversations per row (divides seq_len).")
    _LAYERS = flags.DEFINE_integer("layers", 30, "Decoder layers (SmolLM2-135M: 30).")
    _STEPS = flags.DEFINE_integer("steps", 3, "Timed steps.")
    _WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
    _LAYOUT = flags.DEFINE_enum(
        "layout", "stacked", ["stacked", "trainer"],
        "ftlab's tree: stacked layers (one scanned body) or the trainer's unstacked tree, "
        "stacked inside each step.",
    )  # fmt: skip
    _TRL_PACKING = flags.DEFINE_enum(
        "trl_packing", "bfd", ["bfd", "wrapped"], "TRL's packing_strategy (module docstring)."
    )
    _DTYPE = flags.DEFINE_enum(
        "dtype", "float32", ["float32", "bfloat16"],
        "Computation dtype, both sides (float32 master weights and optimizer state either way).",
    )  # fmt: skip
    _QUICK = flags.DEFINE_bool("quick", False, "Smoke test: 2 layers, 2 rows x 32, 2 steps.")
    _OUT = flags.DEFINE_string("out", None, "Where to write the lines (default by --quick).")

VARIANTS = ("ftlab_lora", "trl_lora", "ftlab_full", "trl_full")
LR = {"lora": 1e-4, "full": 1e-5}
CHUNK = 256  # the LM head's positions per chunk, as configs/sft_smollm2.py


def _conversations(s: dict):
    """``(ids, assistant)``: int32 ``[b * segments, seq_len / segments]`` tokens and the mask of
    the assistant half of each conversation (1 on its tokens)."""
    import numpy as np  # noqa: PLC0415

    n, length = s["b"] * s["segments"], s["seq_len"] // s["segments"]
    ids = np.random.default_rng(0).integers(8, common.SMOLLM2["vocab_size"], (n, length))
    assistant = np.zeros((n, length), np.int32)
    assistant[:, length // 2 :] = 1
    return ids.astype(np.int32), assistant


def _run_ftlab(s: dict) -> dict:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import ml_collections  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from experiments import models  # noqa: PLC0415
    from experiments.trainers import sft as sft_trainer  # noqa: PLC0415
    from ftlab.core import partition, train  # noqa: PLC0415
    from ftlab.models import llama  # noqa: PLC0415
    from ftlab.peft import lora  # noqa: PLC0415
    from ftlab.posttrain import sft  # noqa: PLC0415

    config = llama.LlamaConfig(
        **common.SMOLLM2, num_layers=s["layers"], dtype=jnp.dtype(s["dtype"])
    )
    params = llama.init(config, jax.random.key(0))
    if s["method"] == "lora":
        params = lora.init(
            params, jax.random.key(1), targets=[common.LORA_TARGETS], rank=common.LORA_RANK,
            alpha=common.LORA_ALPHA,
        )  # fmt: skip
        rules = lora.rules()
        # the trainer's wrap for LoRA (sft.add_method): it sees the stacked tree either way
        wrap = sft_trainer.stacked(
            lambda f: lora.wrap_apply(f, alpha=common.LORA_ALPHA, rank=common.LORA_RANK)
        )
    else:
        rules, wrap = [(".*", "train")], lambda f: f
    if s["layout"] == "stacked":
        params = llama.stack_layers(params)
    labels = partition.labels(params, rules)
    optim = ml_collections.ConfigDict(
        {"optim": {"lr": LR[s["method"]], "warmup_steps": 1, "num_steps": 1000,
                   "grad_clip_norm": 1.0, "weight_decay": 0.0}}
    )  # fmt: skip
    tx = models.adamw(optim, labels)
    state = train.init_state(params, labels, tx, seed=0, copy=False)
    del params
    nll_fn = sft_trainer.make_nll_fn(config, wrap, chunk=CHUNK)
    step = train.make_train_step(sft_trainer.make_loss_fn(nll_fn), tx)

    ids, assistant = _conversations(s)
    packed = sft.pack(
        [sft.Encoded(i, m) for i, m in zip(ids, assistant, strict=True)], seq_len=s["seq_len"]
    )
    if packed.input_ids.shape != (s["b"], s["seq_len"]):
        raise AssertionError(f"packed {packed.input_ids.shape}, expected {s['b']} full rows")
    batch = {k: jnp.asarray(v) for k, v in packed.arrays().items() if k in sft_trainer.ROW_KEYS}
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state, "metrics": None}

    def one_step():
        holder["state"], holder["metrics"] = compiled(holder["state"], batch)
        jax.block_until_ready(holder["metrics"])

    times, cpu = common.time_calls_cpu(one_step, warmup=s["warmup"], reps=s["steps"])
    loss = float(holder["metrics"]["train/loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"ftlab: loss {loss}")
    return {
        **common.timing_fields(times),
        **common.cpu_fields(cpu),
        "compile_s": compile_s,
        "final_loss": loss,
        "scored_tokens": int(packed.loss_mask.sum()),
        "model_batch_shape": list(packed.input_ids.shape),
        "trainable_params": partition.count(holder["state"].trainable),
        "platform": jax.devices()[0].platform,
        "version": f"jax {jax.__version__}",
    }


def _run_trl(s: dict) -> dict:
    peer = common.TrlPeer(s["layers"])
    ids, assistant = _conversations(s)
    total = s["warmup"] + s["steps"]
    # every step sees b rows of the same conversations, as ftlab's one batch
    rows = [(ids[i % len(ids)], assistant[i % len(ids)]) for i in range(len(ids) * total)]
    dataset = peer.datasets.Dataset.from_dict(
        {
            "input_ids": [r.tolist() for r, _ in rows],
            "labels": [[int(t) if m else -100 for t, m in zip(r, a, strict=True)] for r, a in rows],
        }
    )
    with tempfile.TemporaryDirectory() as out:
        args = peer.args(
            peer.trl.SFTConfig, out, dtype=s["dtype"], max_steps=total,
            per_device_train_batch_size=s["b"], gradient_accumulation_steps=1,
            max_length=s["seq_len"], packing=True, packing_strategy=s["trl_packing"],
            learning_rate=LR[s["method"]], max_grad_norm=1.0,
        )  # fmt: skip
        times: list[float] = []
        cpu: list[float] = []
        trainer = peer.trl.SFTTrainer(
            model=peer.model, args=args, train_dataset=dataset, processing_class=peer.tokenizer,
            peft_config=peer.lora_config() if s["method"] == "lora" else None,
            callbacks=[common.step_timer(peer.transformers, times, cpu)],
        )  # fmt: skip
        # what the model gets per step, to check both sides do the same work
        sample = next(iter(trainer.get_train_dataloader()))
        shape = list(sample["input_ids"].shape)
        scored = int((sample["labels"][:, 1:] != -100).sum())
        trainer.train()
        history = [x for x in trainer.state.log_history if "loss" in x]
    return peer.result(
        trainer, times, s["warmup"], cpu,
        final_loss=history[-1]["loss"] if history else None,
        scored_tokens=scored,
        model_batch_shape=shape,
        padding_free=bool(trainer.padding_free),
        attn_implementation=trainer.model.config._attn_implementation,  # noqa: SLF001
        optim=str(getattr(args.optim, "value", args.optim)),
    )  # fmt: skip


def _settings(variant: str, base: dict) -> dict:
    return {**base, "method": variant.split("_", 1)[1]}


def main(argv):
    del argv
    quick = _QUICK.value
    if (_SEQ_LEN.value if not quick else 32) % _SEGMENTS.value:
        raise ValueError(f"--segments={_SEGMENTS.value} must divide --seq_len")
    base = dict(
        b=2 if quick else _B.value, seq_len=32 if quick else _SEQ_LEN.value,
        segments=_SEGMENTS.value if not quick else 2, layers=2 if quick else _LAYERS.value,
        steps=2 if quick else _STEPS.value, warmup=_WARMUP.value, layout=_LAYOUT.value,
        trl_packing=_TRL_PACKING.value, dtype=_DTYPE.value,
    )  # fmt: skip
    variants = common.choose_variants(_VARIANTS.value, VARIANTS)
    default = "sft_step_quick.jsonl" if quick else "sft_step.jsonl"
    # the method is a per-variant setting: run the variants one by one, then compare
    lines_out = _OUT.value or f"experiments/bench/{default}"
    sys.exit(
        common.run_peer_bench(
            "experiments.bench.sft_step", variants, base, peer_python=_PEER_PYTHON.value,
            peer_of={v: "trl_" + v.split("_", 1)[1] for v in variants}, out=lines_out,
            settings_of=_settings,
        )
    )  # fmt: skip


if __name__ == "__main__":
    if common.is_child():
        common.child_main("sft_step", {v: (_run_ftlab if v.startswith("ftlab") else _run_trl)
                                       for v in VARIANTS})  # fmt: skip
    else:
        app.run(main)
