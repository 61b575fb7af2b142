"""LoRA training step on a SmolLM2-135M-shaped decoder: ftlab (fp32, bf16, Q4 base) vs HF PEFT.

Run from the repository root, on a quiet machine (each variant in its own subprocess, one after
another, so each peak RSS is that variant's own):

  python -m experiments.bench.decoder_lora            # CPU: batch 4 x 128 -> decoder_lora.jsonl
  python -m experiments.bench.decoder_lora --quick    # smoke test: 2 layers, batch 2 x 16
  python -m experiments.bench.decoder_lora --batch=16 --seq=512 --variants=ftlab_lora_bf16,...

The model is SmolLM2-135M's architecture (30 layers, width 576, 9 query / 3 KV heads, SwiGLU
1536, vocabulary 49,152, tied embeddings) with random weights, the same in both frameworks up to
initialisation. LoRA: rank 8, alpha 16 on the query and value projections, AdamW (lr 1e-4) on
the LoRA factors only, next-token loss on every position.

- ``ftlab_lora``: `ftlab.models.llama` under `lora.wrap_apply`, float32 base and compute,
  `ftlab.tasks.lm.chunked_cross_entropy` (no [tokens, vocab] logits kept), one jitted step with
  the state donated (`ftlab.core.train.make_train_step`).
- ``ftlab_lora_bf16``: the same with the frozen base stored and computed in bfloat16 (LoRA
  factors and optimizer state stay float32).
- ``ftlab_qlora``: every attention and MLP kernel kept as Q4_1 blocks (`ftlab.peft.qlora`),
  dequantised inside each matmul.
- ``peft_lora``: `transformers.LlamaForCausalLM` + `peft.get_peft_model`, torch AdamW, float32
  (bf16 with ``--torch_bf16`` on a GPU).

Fields: ``tokens_per_s`` (batch x seq / median step), ``speedup_vs_peft`` (PEFT's median step /
this one's), ``peak_rss_mib``, ``base_mib`` (bytes of the frozen base as held), ``gflops`` from
XLA's cost analysis of the ftlab fp32 step (used for every variant: same math) and
``fraction_of_matmul_peak`` against a square matmul measured in the same run.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

from experiments.bench import common
from experiments.bench import minilm_step as base_bench

_BENCH = "decoder_lora_step"
VARIANTS = {
    "matmul_jax": "matmul_peak",
    "matmul_torch": "matmul_peak",
    "ftlab_lora": _BENCH,
    "ftlab_lora_bf16": _BENCH,
    "ftlab_qlora": _BENCH,
    "peft_lora": _BENCH,
}
# SmolLM2-135M (the GGUF's metadata, see third_party/smollm2.py)
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    intermediate_size=1536,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
)
RANK, ALPHA, LR = 8, 16.0, 1e-4
TARGET_SPEEDUP_VS_PEFT = 1.2

# Flags shared with minilm_step (defined there): --batch, --seq, --steps, --warmup, --variants,
# --quick, --matmul_n, --torch_threads, --out, --variant. This program's defaults are set in
# __main__; its own flags:
_LAYERS = flags.DEFINE_integer("layers", 30, "Decoder layers (30 is SmolLM2-135M).")
_CHUNK = flags.DEFINE_integer("chunk", 256, "Tokens per cross-entropy chunk (ftlab).")
_TORCH_BF16 = flags.DEFINE_bool("torch_bf16", False, "PEFT in bfloat16 (GPU runs).")
_BATCH, _SEQ, _STEPS, _WARMUP = (
    base_bench._BATCH,
    base_bench._SEQ,
    base_bench._STEPS,
    base_bench._WARMUP,
)
_VARIANTS, _QUICK, _MATMUL_N = base_bench._VARIANTS, base_bench._QUICK, base_bench._MATMUL_N
_TORCH_THREADS, _OUT, _VARIANT = base_bench._TORCH_THREADS, base_bench._OUT, base_bench._VARIANT
_DEFAULTS = {
    "variants": ",".join(VARIANTS),
    "out": "experiments/bench/decoder_lora.jsonl",
    "batch": 4,
    "seq": 128,
    "steps": 5,
    "warmup": 2,
    "matmul_n": 2048,
}


def _tokens(batch: int, seq: int, vocab: int):
    import numpy as np  # noqa: PLC0415

    ids = np.random.default_rng(0).integers(3, vocab, size=(batch, seq + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def _bench_ftlab(variant: str, *, batch: int, seq: int, layers: int, warmup: int, steps: int):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415

    from ftlab.core import partition, train  # noqa: PLC0415
    from ftlab.models import llama  # noqa: PLC0415
    from ftlab.peft import lora, qlora  # noqa: PLC0415
    from ftlab.tasks import lm  # noqa: PLC0415

    bf16 = variant == "ftlab_lora_bf16"
    config = llama.LlamaConfig(
        **{**SMOLLM2, "num_layers": layers}, dtype=jnp.bfloat16 if bf16 else jnp.float32
    )
    model = llama.LlamaForCausalLM(config)
    params = llama.init(config, jax.random.key(0))
    targets = [r"decoder/layer_\d+/attention/(query|value)"]
    params = lora.init(params, jax.random.key(1), targets=targets, rank=RANK, alpha=ALPHA)
    label_tree = partition.labels(params, lora.rules())
    if bf16:  # the frozen base in bfloat16; LoRA factors stay float32
        flat, labels = partition.flatten(params), partition.flatten(label_tree)
        params = partition.unflatten(
            {
                k: v if labels[k] != partition.FROZEN else v.astype(jnp.bfloat16)
                for k, v in flat.items()
            }
        )
    if variant == "ftlab_qlora":
        params = qlora.quantize(
            params,
            targets=[r"decoder/layer_\d+/(attention|mlp)/(query|key|value|out|gate|up|down)"],
        )
        label_tree = partition.labels(params, lora.rules())
    base_bytes = qlora.nbytes(partition.split(params, label_tree)[1])

    def apply_hidden(p, b, rng):
        del rng
        return model.apply({"params": p}, b["input_ids"], return_hidden=True)

    apply_hidden = lora.wrap_apply(apply_hidden, alpha=ALPHA, rank=RANK)
    embedding_of = lambda p: p["decoder"]["embeddings"]["word_embeddings"]["embedding"]  # noqa: E731
    loss_fn = lm.make_loss_fn(apply_hidden, embedding_of, chunk=_CHUNK.value)
    tx = partition.optimizer({"train": optax.adamw(LR)}, label_tree)
    state = train.init_state(params, label_tree, tx, seed=0)
    ids, tgt = _tokens(batch, seq, config.vocab_size)
    device_batch = {
        "input_ids": jnp.asarray(ids),
        "targets": jnp.asarray(tgt),
        "loss_mask": jnp.ones(ids.shape, jnp.float32),
    }
    jitted = jax.jit(train.make_train_step(loss_fn, tx), donate_argnums=0)
    start = time.perf_counter()
    compiled = jitted.lower(state, device_batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    holder = {"state": state, "metrics": None}

    def one_step():
        holder["state"], holder["metrics"] = compiled(holder["state"], device_batch)
        jax.block_until_ready(holder["metrics"])

    times = common.time_calls(one_step, warmup=warmup, reps=steps)
    loss = float(holder["metrics"]["train/loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"{variant}: loss {loss}")
    device = jax.devices()[0]
    stats = getattr(device, "memory_stats", lambda: None)() or {}
    return {
        **common.timing_fields(times),
        "compile_s": compile_s,
        "gflop_per_step": None if flops is None else flops / 1e9,
        "gflop_source": "xla_cost_analysis",
        "base_mib": base_bytes / 2**20,
        "peak_rss_mib": base_bench._peak_rss_mib(),
        "device_peak_mib": stats.get("peak_bytes_in_use", 0) / 2**20 or None,
        "trainable_params": partition.count(holder["state"].trainable),
        "final_loss": loss,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "version": f"jax {jax.__version__}",
    }


def _bench_peft(*, batch: int, seq: int, layers: int, warmup: int, steps: int, threads: int):
    torch = base_bench._import_torch(threads)
    import peft  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    dtype = torch.bfloat16 if _TORCH_BF16.value else torch.float32
    hf_config = transformers.LlamaConfig(
        vocab_size=SMOLLM2["vocab_size"],
        hidden_size=SMOLLM2["hidden_size"],
        intermediate_size=SMOLLM2["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=SMOLLM2["num_heads"],
        num_key_value_heads=SMOLLM2["num_kv_heads"],
        max_position_embeddings=SMOLLM2["max_position_embeddings"],
        rope_theta=SMOLLM2["rope_theta"],
        rms_norm_eps=SMOLLM2["rms_norm_eps"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_config).to(dtype)
    lora_config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
    )
    model = peft.get_peft_model(model, lora_config)
    device = common.torch_device(torch)
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    ids, tgt = _tokens(batch, seq, SMOLLM2["vocab_size"])
    ids_t = torch.as_tensor(ids, dtype=torch.long, device=device)
    tgt_t = torch.as_tensor(tgt, dtype=torch.long, device=device)
    holder = {}

    def one_step():
        logits = model(input_ids=ids_t).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), tgt_t.reshape(-1)
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.torch_sync(torch)
        holder["loss"] = loss.item()

    times = common.time_calls(one_step, warmup=warmup, reps=steps)
    return {
        **common.timing_fields(times),
        "peak_rss_mib": base_bench._peak_rss_mib(),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "final_loss": holder["loss"],
        **common.torch_platform(torch, threads),
        "version": f"torch {torch.__version__}, peft {peft.__version__}",
    }


def _run_variant(variant: str) -> None:
    threads = _TORCH_THREADS.value or base_bench._cores()
    shape = dict(batch=_BATCH.value, seq=_SEQ.value, layers=_LAYERS.value)
    timing = dict(warmup=_WARMUP.value, steps=_STEPS.value)
    if variant == "matmul_jax":
        result = base_bench._bench_matmul_jax(n=_MATMUL_N.value, reps=5)
    elif variant == "matmul_torch":
        result = base_bench._bench_matmul_torch(n=_MATMUL_N.value, reps=5, threads=threads)
    elif variant == "peft_lora":
        result = {**shape, **_bench_peft(**shape, **timing, threads=threads)}
    else:
        result = {**shape, **_bench_ftlab(variant, **shape, **timing)}
    if VARIANTS[variant] == _BENCH:
        result["tokens_per_s"] = _BATCH.value * _SEQ.value / result["median_step_s"]
    impl = "jax" if variant == "matmul_jax" else ("torch" if "torch" in variant else variant)
    line = {"bench": VARIANTS[variant], "variant": variant, "impl": impl, **result}
    print(json.dumps({**line, "cores": base_bench._cores()}), flush=True)


def add_ratios(lines: list[dict]) -> list[dict]:
    """Speedup over PEFT, FLOP rate and fraction of the matmul peak (in place).

    Every variant does the fp32 LoRA step's math (bf16 and Q4 change only the storage), so XLA's
    count for ``ftlab_lora`` stands for all of them.
    """
    same_math = ("ftlab_lora_bf16", "ftlab_qlora", "peft_lora")
    return common.add_rates(
        lines,
        _BENCH,
        baseline="peft_lora",
        speedup_key="speedup_vs_peft",
        flops_from={v: "ftlab_lora" for v in same_math},
    )


def _run_parent() -> int:
    quick = _QUICK.value
    settings = {
        "batch": 2 if quick else _BATCH.value,
        "seq": 16 if quick else _SEQ.value,
        "layers": 2 if quick else _LAYERS.value,
        "steps": 2 if quick else _STEPS.value,
        "warmup": 1 if quick else _WARMUP.value,
        "matmul_n": 256 if quick else _MATMUL_N.value,
        "chunk": _CHUNK.value,
        "torch_threads": _TORCH_THREADS.value or base_bench._cores(),
        "torch_bf16": _TORCH_BF16.value,
        "dtype": base_bench._DTYPE.value,  # the matmul peak's dtype
    }
    try:
        variants = common.choose_variants(_VARIANTS.value, VARIANTS)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    lines, failed = common.run_children("experiments.bench.decoder_lora", variants, settings)
    add_ratios(lines)
    out = _OUT.value
    if quick and not flags.FLAGS["out"].present:
        out = "experiments/bench/decoder_lora_quick.jsonl"
    common.write_lines(lines, out)
    for x in lines:
        if x.get("speedup_vs_peft") and x["variant"] != "peft_lora":
            met = "met" if x["speedup_vs_peft"] >= TARGET_SPEEDUP_VS_PEFT else "NOT met"
            logging.info(
                "%s: %.2fx PEFT (target %.1fx: %s)",
                x["variant"],
                x["speedup_vs_peft"],
                TARGET_SPEEDUP_VS_PEFT,
                met,
            )
    if failed:
        logging.error("failed variants: %s", ", ".join(failed))
        return 1
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if _VARIANT.value:
        if _VARIANT.value not in VARIANTS:
            raise app.UsageError(f"--variant={_VARIANT.value!r}; one of {', '.join(VARIANTS)}")
        _run_variant(_VARIANT.value)
        return 0
    return _run_parent()


if __name__ == "__main__":
    for name, value in _DEFAULTS.items():
        flags.FLAGS.set_default(name, value)
    app.run(main)
