"""Full fine-tuning: every leaf of MiniLM and the new head trains.

  python -m experiments.main --config=configs/full_ft_minilm.py --workdir=runs/full_ft

Same trainer and data as configs/finetune_minilm.py (see it for the options); only the partition
rules and the learning rate differ. Result: see README.md.
"""

from configs import finetune_minilm


def get_config(arg=None):
    return finetune_minilm.get_config(",".join(filter(None, ["method=full", arg])))
