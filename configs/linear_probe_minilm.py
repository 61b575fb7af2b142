"""Linear probe (feature extraction): the MiniLM encoder is frozen, only the new head trains.

  python -m experiments.main --config=configs/linear_probe_minilm.py --workdir=runs/linear_probe

Same trainer and data as configs/finetune_minilm.py (see it for the options); only the partition
rules and the learning rate differ.
Result: test accuracy 75.41% (validation 74.40%), 640 steps, 10 min
on a shared 2-core x86_64 CPU VM, jax 0.10.2,
2026-11-22 (README.md has the table).
"""

from configs import finetune_minilm


def get_config(arg=None):
    return finetune_minilm.get_config(",".join(filter(None, ["method=linear_probe", arg])))
