"""LoRA train step on MiniLM: ftlab LoRA vs ftlab full FT vs Hugging Face PEFT LoRA (PyTorch).

Run from the repository root, on a quiet machine (every variant runs in its own subprocess, one
after another, so each peak-RSS number belongs to that variant alone):

  python -m experiments.bench.lora_step           # -> experiments/bench/lora_step.jsonl
  python -m experiments.bench.lora_step --quick   # smoke test: batch 4, seq 16, 2 steps

The ftlab steps are the ones `experiments/trainers/classification.py` runs, for
`configs/lora_minilm.py` and `configs/full_ft_minilm.py`: `models.encoder_classifier` (real
all-MiniLM-L6-v2 weights), `models.encoder_method` (LoRA factors + the LoRA-wrapped apply; the
identity for full FT),
`partition.labels` + `models.adamw`, `train.init_state`, `classification.make_loss_fn`,
`train.make_train_step`, compiled by `parallel.Plan.compile_train_step`, with dropout on. The
reference is `transformers.BertModel` on the same weights wrapped by `peft.get_peft_model` with the
same rank, alpha and target modules, masked mean pooling, dropout, a trainable linear head, and
AdamW over the trainable parameters only, under the same hyperparameters and schedule.

On a GPU (`experiments/bench/gpu.sh`): `--dtype=bfloat16 --weights=random --attention_dropout=0
--batch=256 --seq=128`; PEFT then runs on CUDA under bf16 autocast and ftlab's attention='auto'
takes cuDNN.

Flags, the synthetic batch, the timing and the matmul peak are `experiments/bench/minilm_step.py`'s
(imported, not copied). One JSON line per result goes to stdout and to `--out`;
experiments/bench/README.md explains the fields.
"""

from __future__ import annotations

import json
import math

from absl import app, flags, logging

# Its flags (--steps, --batch, --seq, --variants, --quick, --out, ...) are this script's flags too.
from experiments.bench import common
from experiments.bench import minilm_step as base

_DEFAULT_OUT = "experiments/bench/lora_step.jsonl"
# A smoke test must not overwrite the real results.
_DEFAULT_QUICK_OUT = "experiments/bench/lora_step_quick.jsonl"
_BENCH = "lora_train_step"

# variant -> (bench, impl, method); the order is the order they run and print in.
VARIANTS = {
    "matmul_jax": ("matmul_peak", "jax", None),
    "matmul_torch": ("matmul_peak", "torch", None),
    "ftlab_lora": (_BENCH, "ftlab", "lora"),
    "ftlab_full": (_BENCH, "ftlab", "full"),
    "peft_lora": (_BENCH, "peft", "lora"),
}
# method -> config module; the benchmark runs exactly these configs, resized to --batch/--seq.
_CONFIGS = {"lora": "configs.lora_minilm", "full": "configs.full_ft_minilm"}
# The targets, checked (and logged) by the parent.
TARGET_SPEEDUP_VS_PEFT = 1.2
TARGET_MEMORY_VS_FULL = 1.0


def _load_config(method: str):
    import importlib  # noqa: PLC0415

    return importlib.import_module(_CONFIGS[method]).get_config()


def analytic_gflop(
    *, method: str, batch: int, seq: int, encoder_config: dict, num_classes: int, lora_params: int
) -> float:
    """Matmul GFLOPs of one train step, counted by hand (see `minilm_step.analytic_gflop`).

    LoRA leaves every base kernel frozen but needs activation gradients through every layer, which
    is exactly BitFit's count; on top, each adapter's two products ``x @ a`` and ``(x a) @ b`` cost
    ``2 * tokens * size`` forward per factor and 3x that with both backward products.

    Args:
      method: ``"full"`` or ``"lora"``.
      lora_params: total size of the ``lora_a``/``lora_b`` factors (ignored for full FT).
    """
    kwargs = dict(
        batch=batch,
        seq=seq,
        hidden=encoder_config["hidden_size"],
        intermediate=encoder_config["intermediate_size"],
        layers=encoder_config["num_layers"],
        num_classes=num_classes,
    )
    if method == "full":
        return base.analytic_gflop(method="full", **kwargs)
    if method != "lora":
        raise ValueError(f"method={method!r}; expected one of {sorted(_CONFIGS)}")
    lora_forward = 2 * batch * seq * lora_params
    return base.analytic_gflop(method="bitfit", **kwargs) + 3 * lora_forward / 1e9


def _lr_factor(optim_config):
    """optax.warmup_cosine_decay_schedule(0, lr, warmup, decay) / lr, for torch's LambdaLR."""
    o = optim_config
    decay_steps = max(o.num_steps, o.warmup_steps + 1)

    def factor(step):
        if step < o.warmup_steps:
            return step / o.warmup_steps
        t = min(step - o.warmup_steps, decay_steps - o.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * t / (decay_steps - o.warmup_steps)))

    return factor


# -- child: ftlab ------------------------------------------------------------------------------


def _bench_ftlab(method: str, *, batch: int, seq: int, warmup: int, steps: int) -> dict:
    """The trainer's own step for configs/lora_minilm.py or configs/full_ft_minilm.py."""

    def analytic(config, method, batch, seq, enc, n_lora):
        return analytic_gflop(
            method=method,
            batch=batch,
            seq=seq,
            encoder_config=enc,
            num_classes=config.model.num_classes,
            lora_params=n_lora,
        )

    return base._bench_ftlab(
        method,
        batch=batch,
        seq=seq,
        warmup=warmup,
        steps=steps,
        configs=_CONFIGS,
        analytic=analytic,
    )


# -- child: Hugging Face PEFT ------------------------------------------------------------------


def _bench_peft(
    *, model_dir: str, batch: int, seq: int, warmup: int, steps: int, threads: int, adamw: str
) -> dict:
    torch = base._import_torch(threads)
    import peft  # noqa: PLC0415

    config = _load_config("lora")
    o, p = config.optim, config.peft
    rate = config.model.dropout_rate
    if config.model.pooling != "mean":
        raise ValueError(
            f"config.model.pooling={config.model.pooling!r}; the PEFT side does 'mean'"
        )
    # PEFT names target modules by suffix; ftlab by a regex over the module path. Check that they
    # pick the same kernels rather than translate one into the other.
    if tuple(p.targets) != (r"encoder/layer_\d+/attention/(query|value)",):
        raise ValueError(
            f"{_CONFIGS['lora']}: peft.targets={tuple(p.targets)}; this benchmark gives PEFT "
            "target_modules=['query', 'value'] and only knows that ftlab target."
        )
    torch.manual_seed(config.seed)
    # No pooler: ftlab's classifier pools the hidden states itself (masked mean).
    encoder = base.torch_encoder(torch, model_dir=model_dir, config=config)
    # ftlab's LoRA has no dropout on the adapter input, so PEFT gets lora_dropout=0 too.
    lora_config = peft.LoraConfig(
        r=p.rank, lora_alpha=p.alpha, target_modules=["query", "value"], lora_dropout=0.0
    )
    model = peft.get_peft_model(encoder, lora_config)
    hidden = encoder.config.hidden_size
    head = torch.nn.Linear(hidden, config.model.num_classes).to(common.torch_device(torch))
    torch.nn.init.normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    dropout = torch.nn.Dropout(rate)
    model.train()
    head.train()

    lora_params = [x for n, x in model.named_parameters() if x.requires_grad]
    if not lora_params or not all(
        "lora_" in n for n, x in model.named_parameters() if x.requires_grad
    ):
        raise AssertionError("PEFT should leave only lora_A/lora_B trainable")
    params = lora_params + list(head.parameters())
    # As models.adamw: weight decay on matrices only (not biases).
    groups = [
        {"params": [x for x in params if x.ndim > 1], "weight_decay": o.weight_decay},
        {"params": [x for x in params if x.ndim <= 1], "weight_decay": 0.0},
    ]
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[adamw]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(0.9, 0.999), eps=1e-8, **impl)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(o))
    data = base.torch_batch(torch, batch, seq)
    losses = []

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        with base.torch_autocast(torch):
            out = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
        m = data["attention_mask"].unsqueeze(-1).float()
        pooled = (out.last_hidden_state.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)
        logits = head(dropout(pooled))
        loss = torch.nn.functional.cross_entropy(logits, data["label"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())  # also the sync point on a GPU

    times = common.time_calls(one_step, warmup=warmup, reps=steps)
    if not math.isfinite(losses[-1]):
        raise FloatingPointError(f"peft lora: loss is {losses[-1]} after the timed steps")
    enc = {
        "hidden_size": hidden,
        "intermediate_size": encoder.config.intermediate_size,
        "num_layers": encoder.config.num_hidden_layers,
    }
    n_lora = sum(x.numel() for x in lora_params)
    return {
        "method": "lora",
        "config": _CONFIGS["lora"],
        "batch": batch,
        "seq": seq,
        **common.timing_fields(times),
        "warmup_steps": warmup,
        "compile_s": None,
        "analytic_gflop_per_step": analytic_gflop(
            method="lora",
            batch=batch,
            seq=seq,
            encoder_config=enc,
            num_classes=config.model.num_classes,
            lora_params=n_lora,
        ),
        "peak_rss_mib": base._peak_rss_mib(),
        "trainable_params": sum(x.numel() for x in params),
        "lora_params": n_lora,
        "final_loss": losses[-1],
        "attn_implementation": encoder.config._attn_implementation,
        "adamw_impl": adamw,
        "peft_version": peft.__version__,
        **base._torch_device_fields(torch, threads),
    }


def _run_variant(variant: str) -> None:
    """Runs one variant in this process and prints its JSON line."""
    bench, impl, method = VARIANTS[variant]
    threads = base._TORCH_THREADS.value or base._cores()
    if variant == "matmul_jax":
        result = base._bench_matmul_jax(n=base._MATMUL_N.value, reps=base._MATMUL_REPS.value)
    elif variant == "matmul_torch":
        result = base._bench_matmul_torch(
            n=base._MATMUL_N.value, reps=base._MATMUL_REPS.value, threads=threads
        )
    elif impl == "ftlab":
        result = _bench_ftlab(
            method,
            batch=base._BATCH.value,
            seq=base._SEQ.value,
            warmup=base._WARMUP.value,
            steps=base._STEPS.value,
        )
    else:
        model_dir = base._MODEL_DIR.value
        if not model_dir and base._WEIGHTS.value == "real":
            # Only when run by hand: this imports jax, which adds ~140 MiB to torch's peak RSS.
            from third_party import minilm  # noqa: PLC0415

            model_dir = str(minilm.model_dir())
        result = _bench_peft(
            model_dir=model_dir,
            batch=base._BATCH.value,
            seq=base._SEQ.value,
            warmup=base._WARMUP.value,
            steps=base._STEPS.value,
            threads=threads,
            adamw=base._TORCH_ADAMW.value,
        )
    line = {"bench": bench, "impl": impl, **result, "variant": variant, "cores": base._cores()}
    print(json.dumps(line), flush=True)


# -- parent ------------------------------------------------------------------------------------


def add_ratios(lines: list[dict]) -> list[dict]:
    """FLOP rate, fraction of peak, speedup over PEFT, and LoRA's memory against full FT's.

    PEFT's step is the same math as ftlab's LoRA step, so XLA's count for that step stands for it.
    Updates ``lines`` in place; a ratio whose reference did not run is None.
    """
    common.add_rates(
        lines,
        _BENCH,
        baseline="peft_lora",
        speedup_key="speedup_vs_peft",
        flops_from={"peft_lora": "ftlab_lora"},
    )
    steps = {x["variant"]: x for x in lines if x["bench"] == _BENCH}
    ftlab_lora, ftlab_full = steps.get("ftlab_lora"), steps.get("ftlab_full")
    if ftlab_lora is not None:
        full_ok = ftlab_full is not None
        # On a GPU the step's memory is the device's (the host RSS is mostly the runtime's);
        # on the CPU it is the process's peak RSS.
        key = "device_peak_mib" if ftlab_lora.get("device_peak_mib") else "peak_rss_mib"
        ftlab_lora["memory_vs_full"] = ftlab_lora[key] / ftlab_full[key] if full_ok else None
        ftlab_lora["memory_source"] = key
        ftlab_lora["xla_temp_mib_full"] = ftlab_full.get("xla_temp_mib") if full_ok else None
        temps = (ftlab_lora.get("xla_temp_mib"), ftlab_lora["xla_temp_mib_full"])
        ftlab_lora["xla_temp_vs_full"] = temps[0] / temps[1] if all(temps) else None
    return lines


def _log_targets(lines: list[dict]) -> None:
    lora_line = next((x for x in lines if x.get("variant") == "ftlab_lora"), None)
    if lora_line is None:
        return
    speedup, memory = lora_line.get("speedup_vs_peft"), lora_line.get("memory_vs_full")
    if speedup is not None:
        met = "met" if speedup >= TARGET_SPEEDUP_VS_PEFT else "NOT met"
        logging.info(
            "target ftlab LoRA >= %.1fx PEFT: %.2fx, %s", TARGET_SPEEDUP_VS_PEFT, speedup, met
        )
    if memory is not None:
        met = "met" if memory < TARGET_MEMORY_VS_FULL else "NOT met"
        source = lora_line["memory_source"]
        logging.info("target LoRA %s < full FT's: %.2fx of full, %s", source, memory, met)


def _run_parent() -> int:
    quick = base._QUICK.value
    settings = {
        "batch": 4 if quick else base._BATCH.value,
        "seq": 16 if quick else base._SEQ.value,
        "steps": 2 if quick else base._STEPS.value,
        "warmup": base._WARMUP.value,
        "matmul_n": 512 if quick else base._MATMUL_N.value,
        "matmul_reps": base._MATMUL_REPS.value,
        "torch_threads": base._TORCH_THREADS.value or base._cores(),
        "torch_adamw": base._TORCH_ADAMW.value,
        **base.model_settings(),
    }
    try:
        variants = common.choose_variants(base._VARIANTS.value, VARIANTS)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if "peft_lora" in variants and base._WEIGHTS.value == "real":
        from third_party import minilm  # noqa: PLC0415 (jax import stays out of the children)

        settings["model_dir"] = str(minilm.model_dir())

    lines, failed = common.run_children("experiments.bench.lora_step", variants, settings)

    add_ratios(lines)
    out = base._OUT.value
    if quick and not flags.FLAGS["out"].present:
        out = _DEFAULT_QUICK_OUT
    common.write_lines(lines, out)
    _log_targets(lines)
    if failed:
        logging.error("failed variants: %s", ", ".join(failed))
        return 1
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if base._VARIANT.value:
        if base._VARIANT.value not in VARIANTS:
            raise app.UsageError(f"--variant={base._VARIANT.value!r}; one of {', '.join(VARIANTS)}")
        _run_variant(base._VARIANT.value)
        return 0
    return _run_parent()


if __name__ == "__main__":
    # The shared flags default to minilm_step's variants and output; this program has its own.
    # Done here, not at import, so importing this module leaves minilm_step's defaults alone.
    flags.FLAGS.set_default("variants", ",".join(VARIANTS))
    flags.FLAGS.set_default("out", _DEFAULT_OUT)
    app.run(main)
