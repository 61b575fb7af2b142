"""Full fine-tuning: every leaf of MiniLM and the new head trains.

  python -m experiments.main --config=configs/full_ft_minilm.py --workdir=runs/full_ft

Same trainer and data as configs/finetune_minilm.py (see it for the options); only the partition
rules and the learning rate differ.
Result: test accuracy 80.25% (validation 81.03%), 320 steps, 14 min
on a shared 2-core x86_64 CPU VM, jax 0.10.2,
2026-11-22 (README.md has the table).
"""

from configs import finetune_minilm


def get_config(arg=None):
    return finetune_minilm.get_config(",".join(filter(None, ["method=full", arg])))
