"""MiniLM + a new head on Rotten Tomatoes, with method=adapters (see configs/finetune_minilm.py).

python -m experiments.main --config=configs/adapters_minilm.py --workdir=runs/adapters
"""

from configs import finetune_minilm


def get_config(arg=None):
    return finetune_minilm.get_config(",".join(filter(None, ["method=adapters", arg])))
