"""Per-device memory and step time of FSDP against replicated data parallelism (issue 21).

Run from the repository root, on a quiet machine (each variant in its own subprocess with
``--devices`` simulated CPU devices, one after another):

  python -m experiments.bench.sharding                # -> experiments/bench/sharding.jsonl
  python -m experiments.bench.sharding --quick        # smoke test: 2 layers, 2 timed steps

Variants are ``<model>_<method>_<layout>``:

- model ``minilm``: all-MiniLM-L6-v2's architecture (`third_party.minilm.architecture()`, its real
  config) with random weights, masked mean pooling and a 2-class head, batch x ``--seq`` tokens;
  ``smollm2``: SmolLM2-135M's (`SMOLLM2`, ``--layers``), next-token loss with the
  chunked cross-entropy, batch x ``--decoder_seq`` tokens.
- method ``full`` (every leaf trained, AdamW) or ``lora`` (rank 8, alpha 16 on query/value; the
  MiniLM head trained too; AdamW on the trainable leaves).
- layout ``replicated``: `parallel.make_plan("mesh")`, the state on every device, the batch split
  over them; ``fsdp``: `parallel.make_sharded_plan({"fsdp": N}, [lora factors replicated,
  (".*", "fsdp")])`, every leaf of 64 KiB or more split over the N devices (ZeRO-3).

Fields: ``state_mib_per_device`` (the most any device holds of the placed state, from
``addressable_shards``; computed from the shardings when the variant is too large to place, see
``placed``), ``params_mib_per_device`` and ``opt_mib_per_device`` (its parameter and optimizer
parts), XLA's ``compiled.memory_analysis()`` per device (``xla_argument_mib``,
``xla_output_mib``, ``xla_temp_mib``, ``xla_alias_mib``), ``median_step_s`` after ``--warmup``
steps (the compiled step, state donated, batch on the devices), ``compile_s``, ``final_loss``.
The parent adds, on each fsdp line, ``state_vs_replicated`` and ``temp_vs_replicated`` (fsdp's
per-device bytes over replicated's) and ``speedup_vs_replicated`` (replicated's median step over
fsdp's). A variant whose state over all devices would exceed ``--max_host_gib`` (simulated
devices share the host's memory) is compiled for its memory analysis but neither placed nor
timed (``placed: false``).
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

from experiments.bench import common

_BENCH = "sharding_step"
MODELS, METHODS, LAYOUTS = ("minilm", "smollm2"), ("full", "lora"), ("replicated", "fsdp")
VARIANTS = [f"{m}_{k}_{lay}" for m in MODELS for k in METHODS for lay in LAYOUTS]
RANK, ALPHA, LR = 8, 16.0, 1e-4
# SmolLM2-135M, as `decoder_lora.SMOLLM2` (not imported: that module defines the flags of
# minilm_step, whose names this program's own flags share).
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

_VARIANTS = flags.DEFINE_string("variants", ",".join(VARIANTS), "Comma-separated variants.")
_VARIANT = flags.DEFINE_string("variant", "", "Internal: run this one variant and print its line.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Simulated CPU devices (the fsdp axis size).")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch (a multiple of --devices).")
_SEQ = flags.DEFINE_integer("seq", 128, "MiniLM tokens per example.")
_DECODER_SEQ = flags.DEFINE_integer("decoder_seq", 64, "SmolLM2 tokens per example.")
_LAYERS = flags.DEFINE_integer("layers", 30, "SmolLM2 decoder layers (30 is SmolLM2-135M).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
_MAX_HOST_GIB = flags.DEFINE_float(
    "max_host_gib", 6.0, "Place and time a variant only if its state over all devices fits."
)
_QUICK = flags.DEFINE_bool("quick", False, "Smoke test: 2 decoder layers, seq 16, 2 steps.")
_OUT = flags.DEFINE_string("out", "experiments/bench/sharding.jsonl", "Where the lines go.")


def _model(name: str, method: str, *, batch: int, seq: int, layers: int):
    """(params, label tree, loss_fn, batch, rules) of one model and method, random weights."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from ftlab.core import partition  # noqa: PLC0415
    from ftlab.models import bert, llama  # noqa: PLC0415
    from ftlab.peft import lora  # noqa: PLC0415
    from ftlab.tasks import lm  # noqa: PLC0415
    from third_party import minilm  # noqa: PLC0415

    rng = np.random.default_rng(0)
    ids = rng.integers(3, 1000, size=(batch, seq + 1)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    if name == "minilm":
        config = minilm.architecture()
        encoder = bert.BertEncoder(config)
        shapes = jax.eval_shape(encoder.init, jax.random.key(0), ids[:, :-1], mask)["params"]
        shapes = {
            "encoder": shapes,
            "head": {
                "kernel": jax.ShapeDtypeStruct((config.hidden_size, 2), jnp.float32),
                "bias": jax.ShapeDtypeStruct((2,), jnp.float32),
            },
        }

        def apply(p, b, rng):
            hidden = encoder.apply(
                {"params": p["encoder"]}, b["input_ids"], b["attention_mask"], deterministic=False,
                rngs={"dropout": rng},
            )  # fmt: skip
            m = b["attention_mask"][..., None].astype(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1)
            return pooled @ p["head"]["kernel"] + p["head"]["bias"]

        targets = [r"encoder/layer_\d+/attention/(query|value)"]
        extra = [("head/.*", "train")]
        data = {
            "input_ids": ids[:, :-1],
            "attention_mask": mask,
            "label": (ids[:, 0] % 2).astype(np.int32),
        }
    else:
        config = llama.LlamaConfig(**{**SMOLLM2, "num_layers": layers})
        model = llama.LlamaForCausalLM(config)
        shapes = jax.eval_shape(llama.init, config, jax.random.key(0))
        targets = [r"decoder/layer_\d+/attention/(query|value)"]
        extra = []
        data = {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask * 1.0}

        def apply(p, b, rng):
            del rng
            return model.apply({"params": p}, b["input_ids"], return_hidden=True)

    def leaf(path, s):
        if partition.path_name(path).endswith(("norm/scale", "layer_norm/scale")):
            return np.ones(s.shape, np.float32)
        return rng.normal(scale=0.02, size=s.shape).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(leaf, shapes)
    rules = [(".*", "fsdp")]
    if method == "lora":
        params = lora.init(params, jax.random.key(1), targets=targets, rank=RANK, alpha=ALPHA)
        params = jax.tree.map(np.asarray, params)
        labels = partition.labels(params, lora.rules(extra=extra))
        apply = lora.wrap_apply(apply, alpha=ALPHA, rank=RANK)
        rules = [(".*/lora_(a|b)", "replicate"), *rules]
    else:
        labels = partition.labels(params, [(".*", "train")])
    if name == "minilm":
        import optax  # noqa: PLC0415

        def loss_fn(p, b, rng):
            logits = apply(p, b, rng)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, b["label"]).mean()
            return loss, {}
    else:
        embedding_of = lambda p: p["decoder"]["embeddings"]["word_embeddings"]["embedding"]  # noqa: E731
        loss_fn = lm.make_loss_fn(apply, embedding_of, chunk=256)
    return params, labels, loss_fn, data, rules


def _mib(n) -> float:
    return n / 2**20


def _per_device(state, shardings) -> dict:
    """The most bytes any device holds of the state's parameters, optimizer state, and all."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    def most(tree, shard_tree):
        per = {}
        for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shard_tree), strict=True):
            nbytes = int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
            for d in s.device_set:
                per[d] = per.get(d, 0) + nbytes
        return max(per.values()) if per else 0

    return {
        "state_mib_per_device": _mib(most(state, shardings)),
        "params_mib_per_device": _mib(
            most((state.trainable, state.frozen), (shardings.trainable, shardings.frozen))
        ),
        "opt_mib_per_device": _mib(most(state.opt_state, shardings.opt_state)),
        "state_mib_total": _mib(sum(x.nbytes for x in jax.tree.leaves(state))),
    }


def _bench(variant: str) -> dict:
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415

    from ftlab.core import parallel, partition, sharding, train  # noqa: PLC0415

    name, method, layout = variant.split("_")
    seq = _SEQ.value if name == "minilm" else _DECODER_SEQ.value
    batch = _BATCH.value
    params, labels, loss_fn, data, rules = _model(
        name, method, batch=batch, seq=seq, layers=_LAYERS.value
    )
    tx = partition.optimizer({"train": optax.adamw(LR)}, labels)
    state = train.init_state(params, labels, tx, seed=0)
    del params
    n = len(jax.devices())
    if layout == "fsdp":
        plan = parallel.make_sharded_plan({"fsdp": n}, rules)
        shardings = plan.state_shardings(state)
    else:
        plan = parallel.make_plan("mesh")
        shardings = jax.tree.map(lambda _: plan.replicated, state)
    plan.check_batch_size(batch, what="--batch")
    fields = _per_device(state, shardings)
    step = train.make_train_step(loss_fn, tx)
    # The step as the plans compile it (ShardedPlan: the state's own shardings in and out).
    jitted = jax.jit(
        step,
        in_shardings=(shardings, plan.batch_sharding),
        out_shardings=(shardings, plan.replicated),
        donate_argnums=0,
    )
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state, shardings
    )
    abstract_batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=plan.batch_sharding)
        for k, v in data.items()
    }
    start = time.perf_counter()
    compiled = jitted.lower(abstract, abstract_batch).compile()
    fields["compile_s"] = time.perf_counter() - start
    memory = compiled.memory_analysis()
    for key, attr in [
        ("xla_argument_mib", "argument_size_in_bytes"),
        ("xla_output_mib", "output_size_in_bytes"),
        ("xla_temp_mib", "temp_size_in_bytes"),
        ("xla_alias_mib", "alias_size_in_bytes"),
    ]:
        fields[key] = _mib(getattr(memory, attr, 0)) if memory is not None else None
    fields["placed"] = fields["state_mib_per_device"] * n / 1024 <= _MAX_HOST_GIB.value
    if fields["placed"]:
        placed = plan.put_state(state)
        del state
        measured = sharding.device_bytes(placed)
        fields["measured_state_mib_per_device"] = _mib(max(measured.values()))
        device_batch = plan.put_batch(data)
        holder = {"state": placed, "metrics": None}

        def one_step():
            holder["state"], holder["metrics"] = compiled(holder["state"], device_batch)
            jax.block_until_ready(holder["metrics"])

        times = common.time_calls(one_step, warmup=_WARMUP.value, reps=_STEPS.value)
        fields.update(common.timing_fields(times))
        fields["final_loss"] = float(holder["metrics"]["train/loss"])
        if not np.isfinite(fields["final_loss"]):
            raise FloatingPointError(f"{variant}: loss {fields['final_loss']}")
    return {
        "bench": _BENCH,
        "variant": variant,
        "model": name,
        "method": method,
        "layout": layout,
        "devices": n,
        "batch": batch,
        "seq": seq,
        **fields,
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "version": f"jax {jax.__version__}",
        "load_avg_1min": os.getloadavg()[0],
    }


def add_ratios(lines: list[dict]) -> list[dict]:
    """Fills each fsdp line's ratios against the replicated line of its model and method."""
    by = {(x["model"], x["method"], x["layout"]): x for x in lines if x["bench"] == _BENCH}
    for (model, method, layout), x in by.items():
        ref = by.get((model, method, "replicated"))
        if layout != "fsdp":
            continue
        x["state_vs_replicated"] = (
            x["state_mib_per_device"] / ref["state_mib_per_device"] if ref else None
        )
        x["temp_vs_replicated"] = (
            x["xla_temp_mib"] / ref["xla_temp_mib"]
            if ref and ref.get("xla_temp_mib") and x.get("xla_temp_mib") is not None
            else None
        )
        x["speedup_vs_replicated"] = (
            ref["median_step_s"] / x["median_step_s"]
            if ref and "median_step_s" in ref and "median_step_s" in x
            else None
        )
    return lines


def _run_parent() -> int:
    quick = _QUICK.value
    settings = {
        "devices": _DEVICES.value,
        "batch": _BATCH.value,
        "seq": 16 if quick else _SEQ.value,
        "decoder_seq": 16 if quick else _DECODER_SEQ.value,
        "layers": 2 if quick else _LAYERS.value,
        "steps": 2 if quick else _STEPS.value,
        "warmup": 1 if quick else _WARMUP.value,
        "max_host_gib": _MAX_HOST_GIB.value,
    }
    try:
        variants = common.choose_variants(_VARIANTS.value, VARIANTS)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    # XLA reads the device count once, at start-up: the children inherit it.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_DEVICES.value}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    lines, failed = common.run_children("experiments.bench.sharding", variants, settings)
    add_ratios(lines)
    out = _OUT.value
    if quick and not flags.FLAGS["out"].present:
        out = "experiments/bench/sharding_quick.jsonl"
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
        print(json.dumps(_bench(_VARIANT.value)), flush=True)
        return 0
    return _run_parent()


if __name__ == "__main__":
    app.run(main)
