"""MiniLM + a new head on Rotten Tomatoes, with method=prompt (see configs/finetune_minilm.py).

python -m experiments.main --config=configs/prompt_minilm.py --workdir=runs/prompt
"""

from configs import finetune_minilm


def get_config(arg=None):
    return finetune_minilm.get_config(",".join(filter(None, ["method=prompt", arg])))
