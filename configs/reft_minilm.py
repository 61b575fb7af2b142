"""MiniLM + a new head on Rotten Tomatoes, with method=reft (see configs/finetune_minilm.py).

python -m experiments.main --config=configs/reft_minilm.py --workdir=runs/reft
"""

from configs import finetune_minilm


def get_config(arg=None):
    return finetune_minilm.get_config(",".join(filter(None, ["method=reft", arg])))
