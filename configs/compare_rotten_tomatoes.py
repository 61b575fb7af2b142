"""Every fine-tuning method on MiniLM + Rotten Tomatoes, each with a small learning-rate sweep.

  python -m experiments.compare --config=configs/compare_rotten_tomatoes.py --workdir=runs/compare

Each (method, lr) is one run of configs/finetune_minilm.py in its own subprocess (so its peak
memory is its own) under `<workdir>/<method>/lr_<lr>`; a finished run is not repeated, so the
command resumes. Per method the learning rate with the best validation accuracy is kept, and the
table (Markdown + JSON) and the accuracy-vs-trainable-parameters plot are written to the workdir.
Options: quick (few steps on the real model, one lr per method), tiny (random tiny model; tests),
sweep=False (only the middle learning rate of each sweep: each method's default in
configs/finetune_minilm.py; a third of the CPU time).

Measured with sweep=False (2026-11-22/23, 2-core CPU VM, seed 0; the table is in README.md):
test accuracy linear probe 75.41%, prompt 78.61%, IA3 79.08%, BitFit 77.75%, LoReFT 77.36%,
LoRA 80.02%, DoRA 79.94%, adapters 80.80%, prefix 77.60%, full fine-tuning 80.25%.
The sweep (this command without options; val/test accuracy, complete 2026-11-23): LoRA
78.77/78.38 at 3e-4, 80.87/80.02 at 1e-3 (chosen), 80.33/80.48 at 3e-3; full fine-tuning
78.92/79.70 at 2e-5, 81.03/80.25 at 5e-5, 81.89/81.42 at 1e-4 (chosen), 81.73/81.03 at 2e-4;
DoRA 78.77/78.38 at 3e-4, 80.87/79.94 at 1e-3, 81.34/80.72 at 3e-3 (chosen), 56.91/59.09 at
1e-2 (diverged); adapters 77.44/78.14 at 3e-4, 80.17/80.80 at 1e-3, 80.64/80.72 at 3e-3
(chosen), 80.56/78.77 at 1e-2; IA3 76.50/77.28 at 1e-3, 78.06/79.08 at 3e-3, 80.41/79.86 at
1e-2, 80.72/80.02 at 3e-2 (chosen), 75.88/76.19 at 1e-1; prompt tuning 75.57/76.27 at 1e-3,
77.36/78.61 at 3e-3, 77.52/77.05 at 1e-2 (chosen), 77.05/75.88 at 3e-2; BitFit 75.72/75.88 at
3e-4, 77.44/77.75 at 1e-3, 80.48/78.61 at 3e-3 (chosen; ties go to the lower rate),
80.48/77.99 at 1e-2; LoReFT 75.41/75.80 at 3e-4, 77.05/77.36 at 1e-3, 77.52/77.60 at 3e-3
(chosen), 76.42/77.21 at 1e-2; prefix tuning 77.13/77.52 at 3e-4, 79.23/77.60 at 1e-3
(chosen), 78.53/78.53 at 3e-3; linear probe 73.77/75.02 at 1e-3, 74.40/75.41 at 3e-3
(chosen), 74.40/76.58 at 1e-2. Where the best of the first three was the largest rate, the
grid below has a fourth (IA3, best at its fourth, a fifth).
"""

import ml_collections

from ftlab import config_options


def get_config(arg=None):
    opts = config_options.parse(arg, quick=False, tiny=False, sweep=True)
    config = ml_collections.ConfigDict()
    config.experiment = "compare"
    # the trainer config every run starts from, and the options given to it
    config.base = "configs/finetune_minilm.py"
    config.base_options = "quick" if opts.quick else ("tiny" if opts.tiny else "")
    # peak learning rates tried per method (the same seeds and split for all)
    config.lrs = ml_collections.ConfigDict(
        {
            # a fourth rate where the largest of the first three came out best (IA3: a fifth)
            "full": (2e-5, 5e-5, 1e-4, 2e-4),
            "linear_probe": (1e-3, 3e-3, 1e-2),
            "bitfit": (3e-4, 1e-3, 3e-3, 1e-2),
            "lora": (3e-4, 1e-3, 3e-3),
            "dora": (3e-4, 1e-3, 3e-3, 1e-2),
            "ia3": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
            "adapters": (3e-4, 1e-3, 3e-3, 1e-2),
            "prompt": (1e-3, 3e-3, 1e-2, 3e-2),
            "prefix": (3e-4, 1e-3, 3e-3),
            "reft": (3e-4, 1e-3, 3e-3, 1e-2),
        }
    )
    config.methods = tuple(config.lrs.keys())
    # extra --config.<key>=<value> overrides for every run
    config.overrides = ()
    if opts.quick or opts.tiny or not opts.sweep:
        config.lrs = ml_collections.ConfigDict({m: (lrs[1],) for m, lrs in config.lrs.items()})
    if opts.quick or opts.tiny:
        config.overrides = ("--config.optim.num_steps=4",)
    return config
