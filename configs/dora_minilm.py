"""DoRA (rank 8, alpha 16) on MiniLM's attention query/value kernels, plus a new head.

  python -m experiments.main --config=configs/dora_minilm.py --workdir=runs/dora

Same trainer and data as configs/finetune_minilm.py (see it for the options).
"""

from configs import finetune_minilm


def get_config(arg=None):
    return finetune_minilm.get_config(",".join(filter(None, ["method=dora", arg])))
