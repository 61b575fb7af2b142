"""MiniLM + a new head on Rotten Tomatoes, with method=prefix (see configs/finetune_minilm.py).

python -m experiments.main --config=configs/prefix_minilm.py --workdir=runs/prefix
"""

from configs import finetune_minilm


def get_config(arg=None):
    return finetune_minilm.get_config(",".join(filter(None, ["method=prefix", arg])))
