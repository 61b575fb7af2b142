"""experiments/bench/sft_step.py and dpo_step.py: ftlab's quick variant runs from the command line
and writes the line RESULTS.md reads; without --peer_python the TRL variant is skipped, not failed
(the peer's venv does not exist in CI)."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from experiments.bench import common

# LoRA rank 8 on query [576 -> 576] and value [576 -> 192] of 2 layers (--quick)
LORA_PARAMS = 2 * (8 * (576 + 576) + 8 * (576 + 192))
KEYS = {
    "bench", "variant", "layers", "steps", "warmup", "median_step_s", "steps_per_s", "min_step_s",
    "max_step_s", "timed_steps", "median_step_cpu_s", "compile_s", "final_loss",
    "model_batch_shape", "trainable_params", "platform", "version", "peak_rss_mib", "cores",
    "loadavg_1min", "speedup_vs_trl", "memory_vs_trl",
}  # fmt: skip


def _run(module: str, variants: str, tmp_path) -> list[dict]:
    out = tmp_path / f"{module}.jsonl"
    env = {
        **os.environ,
        "PYTHONPATH": str(common.REPO_ROOT),
        # the test process's compile cache (tests/conftest.py), small compiles included
        "JAX_COMPILATION_CACHE_DIR": str(jax.config.jax_compilation_cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
    }
    env.pop("JAX_PLATFORMS", None)
    proc = subprocess.run(
        [sys.executable, "-m", f"experiments.bench.{module}", "--quick",
         f"--variants={variants}", f"--out={out}"],
        cwd=common.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trl" in proc.stderr and "skipped: no --peer_python" in proc.stderr, proc.stderr[-2000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize(
    "module, variants, extra",
    [
        # 2 rows of 2 conversations of 16 tokens; the assistant's 8 are scored from the
        # position before each: 8 per conversation
        ("sft_step", "ftlab_lora,trl_lora", {"scored_tokens": 32, "model_batch_shape": [2, 32]}),
        # 2 pairs of 8 prompt + 8 response tokens: 4 rows of 16
        ("dpo_step", "ftlab,trl", {"model_batch_shape": [4, 16]}),
    ],
)
def test_quick_ftlab_variant_writes_its_line_and_skips_trl(tmp_path, module, variants, extra):
    lines = _run(module, variants, tmp_path)
    assert len(lines) == 1, lines
    (line,) = lines
    assert KEYS <= set(line), KEYS - set(line)
    assert line["bench"] == module and line["variant"] == variants.split(",")[0]
    assert line["layers"] == 2 and line["timed_steps"] == line["steps"] == 2
    assert line["trainable_params"] == LORA_PARAMS
    assert {k: line[k] for k in extra} == extra
    # random weights: the loss starts near log(vocab) (DPO's sigmoid loss: near log 2)
    expected = math.log(common.SMOLLM2["vocab_size"]) if module == "sft_step" else math.log(2)
    assert abs(line["final_loss"] - expected) < 0.5, line["final_loss"]
    assert 0 < line["min_step_s"] <= line["median_step_s"] <= line["max_step_s"]
    assert line["compile_s"] > 0 and line["peak_rss_mib"] > 100
    # no TRL line to compare with: the ratios are there, and None
    assert line["speedup_vs_trl"] is None and line["memory_vs_trl"] is None
