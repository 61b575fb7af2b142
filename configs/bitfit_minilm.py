"""BitFit: only the bias terms of MiniLM and the new head train (arXiv:2106.10199).

  python -m experiments.main --config=configs/bitfit_minilm.py --workdir=runs/bitfit

Same trainer and data as configs/finetune_minilm.py (see it for the options); only the partition
rules and the learning rate differ. Result: see README.md.
"""

from configs import finetune_minilm


def get_config(arg=None):
    return finetune_minilm.get_config(",".join(filter(None, ["method=bitfit", arg])))
