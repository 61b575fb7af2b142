"""BitFit: only the bias terms of MiniLM and the new head train (arXiv:2106.10199).

  python -m experiments.main --config=configs/bitfit_minilm.py --workdir=runs/bitfit

Same trainer and data as configs/finetune_minilm.py (see it for the options); only the partition
rules and the learning rate differ.
Result: test accuracy 77.75% (validation 77.44%), 480 steps, 18 min
on a shared 2-core x86_64 CPU VM, jax 0.10.2,
2026-11-22 (README.md has the table).
"""

from configs import finetune_minilm


def get_config(arg=None):
    return finetune_minilm.get_config(",".join(filter(None, ["method=bitfit", arg])))
