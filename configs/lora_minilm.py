"""LoRA (rank 8, alpha 16) on MiniLM's attention query/value kernels, plus a new head.

  python -m experiments.main --config=configs/lora_minilm.py --workdir=runs/lora

Same trainer and data as configs/finetune_minilm.py (see it for the options, e.g. `:rank=4`).
At the end the workdir holds the adapter alone (`adapter/`, ftlab safetensors) and the same
adapter in Hugging Face PEFT's format (`adapter_peft/`). Result: see README.md.
"""

from configs import finetune_minilm


def get_config(arg=None):
    return finetune_minilm.get_config(",".join(filter(None, ["method=lora", arg])))
