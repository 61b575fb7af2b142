"""Greedy generation tokens/s with a KV cache: ftlab vs transformers' LlamaForCausalLM, on CPU.

Both run SmolLM2-135M's architecture (30 layers, d_model 576, 9 query / 3 KV heads, vocab 49152)
with the same random weights (copied from the ftlab tree into torch), greedy decoding of
`--new_tokens` tokens after a `--prompt_len`-token prompt, no EOS stop, at batch 1 and 8.

  python -m experiments.bench.decoder_generate         # -> experiments/bench/decoder_generate.jsonl
  python -m experiments.bench.decoder_generate --quick # smoke test: 2 layers, 8 new tokens

Each variant runs in its own subprocess (`experiments.bench.common`). A result line:

  {"bench": "decoder_generate", "variant": "ftlab_b8", "batch": 8, "tokens_per_s": ...,
   "median_s": ..., "compile_s": ..., "speedup_vs_hf": ...}

`tokens_per_s` counts new tokens (batch x new_tokens) per second of the whole `generate` call
(prefill included), median over `--repeats` calls after `--warmup` untimed ones; `speedup_vs_hf`
is ftlab's tokens/s over transformers' at the same batch, measured in the same run.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time

from absl import app, flags

from experiments.bench import common

_VARIANT = flags.DEFINE_string("variant", None, "child mode: one variant")
_VARIANTS = flags.DEFINE_list("variants", ["ftlab_b1", "hf_b1", "ftlab_b8", "hf_b8"], "variants")
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "prompt tokens")
_NEW = flags.DEFINE_integer("new_tokens", 32, "generated tokens")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed calls")
_WARMUP = flags.DEFINE_integer("warmup", 1, "untimed calls after compilation")
_LAYERS = flags.DEFINE_integer("layers", 30, "decoder layers (SmolLM2: 30)")
_QUICK = flags.DEFINE_bool("quick", False, "smoke test: 2 layers, 8 new tokens, 2 repeats")
_OUT = flags.DEFINE_string("out", None, "JSON lines output (default by --quick)")


def _config(layers):
    from ftlab.models import llama  # noqa: PLC0415

    return llama.LlamaConfig(
        vocab_size=49152, hidden_size=576, num_layers=layers, num_heads=9, num_kv_heads=3,
        intermediate_size=1536, max_position_embeddings=8192, rope_theta=100000.0,
    )  # fmt: skip


def _params(config):
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from ftlab.models import llama  # noqa: PLC0415

    return jax.tree.map(np.asarray, llama.init(config, jax.random.key(0)))


def _ids(batch, prompt_len):
    import numpy as np  # noqa: PLC0415

    return np.random.default_rng(0).integers(3, 49152, (batch, prompt_len)).astype(np.int32)


def _time(fn, repeats, warmup):
    start = time.perf_counter()
    fn()
    compile_s = time.perf_counter() - start
    return compile_s, statistics.median(common.time_calls(fn, warmup=warmup, reps=repeats))


def _run_ftlab(batch, settings):
    import jax  # noqa: PLC0415

    from ftlab import generation  # noqa: PLC0415
    from ftlab.models import llama  # noqa: PLC0415

    config = _config(settings["layers"])
    params = jax.tree.map(jax.numpy.asarray, llama.stack_layers(_params(config)))
    model, ids = llama.LlamaForCausalLM(config), _ids(batch, settings["prompt_len"])

    def call():
        out = generation.generate(model, params, ids, max_new_tokens=settings["new_tokens"],
                                  eos_id=-1)  # fmt: skip
        jax.block_until_ready(out.tokens)

    return _time(call, settings["repeats"], settings["warmup"])


def _run_hf(batch, settings):
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from ftlab.core import partition  # noqa: PLC0415

    c = _config(settings["layers"])
    hf = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=True,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(hf).eval()
    flat = partition.flatten(_params(c))
    names = {
        "model.embed_tokens.weight": ("decoder/embeddings/word_embeddings/embedding", False),
        "model.norm.weight": ("decoder/final_norm/scale", False),
    }
    for i in range(c.num_layers):
        f, t = f"decoder/layer_{i}/", f"model.layers.{i}."
        for a, b in (("self_attn.q_proj", "attention/query"), ("self_attn.k_proj", "attention/key"),
                     ("self_attn.v_proj", "attention/value"), ("self_attn.o_proj", "attention/out"),
                     ("mlp.gate_proj", "mlp/gate"), ("mlp.up_proj", "mlp/up"),
                     ("mlp.down_proj", "mlp/down")):  # fmt: skip
            names[f"{t}{a}.weight"] = (f"{f}{b}/kernel", True)
        names[f"{t}input_layernorm.weight"] = (f"{f}attention_norm/scale", False)
        names[f"{t}post_attention_layernorm.weight"] = (f"{f}mlp_norm/scale", False)
    state = {k: torch.from_numpy(np.array(flat[v].T if tr else flat[v]))
             for k, (v, tr) in names.items()}  # fmt: skip
    model.load_state_dict(state, strict=False)
    ids = torch.from_numpy(_ids(batch, settings["prompt_len"]).astype(np.int64))
    n = settings["new_tokens"]

    def call():
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)  # fmt: skip

    return _time(call, settings["repeats"], settings["warmup"])


def _child(variant, settings):
    kind, batch = variant.split("_b")
    batch = int(batch)
    run = {"ftlab": _run_ftlab, "hf": _run_hf}[kind]
    compile_s, median_s = run(batch, settings)
    line = {
        "bench": "decoder_generate", "variant": variant, "batch": batch,
        "tokens_per_s": batch * settings["new_tokens"] / median_s, "median_s": median_s,
        "compile_s": compile_s, **settings,
    }  # fmt: skip
    print(json.dumps(line))


def main(argv):
    del argv
    settings = dict(
        prompt_len=_PROMPT.value,
        new_tokens=8 if _QUICK.value else _NEW.value,
        repeats=2 if _QUICK.value else _REPEATS.value,
        warmup=_WARMUP.value,
        layers=2 if _QUICK.value else _LAYERS.value,
    )
    if _VARIANT.value:
        _child(_VARIANT.value, settings)
        return
    lines, failed = common.run_children(
        "experiments.bench.decoder_generate", _VARIANTS.value, settings
    )
    hf = {line["batch"]: line["tokens_per_s"] for line in lines if line["variant"].startswith("hf")}
    for line in lines:
        if line["variant"].startswith("ftlab") and line["batch"] in hf:
            line["speedup_vs_hf"] = line["tokens_per_s"] / hf[line["batch"]]
    default = "decoder_generate_quick.jsonl" if _QUICK.value else "decoder_generate.jsonl"
    out = pathlib.Path(_OUT.value or common.REPO_ROOT / "experiments" / "bench" / default)
    with open(out, "w") as f:
        for line in lines:
            print(json.dumps(line))
            f.write(json.dumps(line) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    app.run(main)
