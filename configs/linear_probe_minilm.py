"""Linear probe (feature extraction): the MiniLM encoder is frozen, only the new head trains.

  python -m experiments.main --config=configs/linear_probe_minilm.py --workdir=runs/linear_probe

Same trainer and data as configs/finetune_minilm.py (see it for the options); only the partition
rules and the learning rate differ. Result: see README.md.
"""

from configs import finetune_minilm


def get_config(arg=None):
    return finetune_minilm.get_config(",".join(filter(None, ["method=linear_probe", arg])))
