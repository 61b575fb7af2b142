"""IA3 on MiniLM: learned scales on attention keys and values and on the FFN activation.

  python -m experiments.main --config=configs/ia3_minilm.py --workdir=runs/ia3

Same trainer and data as configs/finetune_minilm.py (see it for the options).
"""

from configs import finetune_minilm


def get_config(arg=None):
    return finetune_minilm.get_config(",".join(filter(None, ["method=ia3", arg])))
