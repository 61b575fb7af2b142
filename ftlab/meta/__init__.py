"""Meta-learning over a partition: MAML, first-order MAML, ANIL, Meta-SGD and Reptile.

Every meta-step carries `ftlab.core.train.TrainState` and takes the loss of every ftlab step,
``loss_fn(params, batch, rng) -> (loss, aux)``::

    from ftlab import meta
    adapted = meta.adapt(params, support, loss_fn=loss_fn, inner_lr=0.01, num_steps=5)
"""

from ftlab.meta.maml import (
    ADAPT,
    ALL,
    INNER_LR,
    LossFn,
    adapt,
    check_tasks,
    compiler_options,
    head_rules,
    init_inner_lr,
    make_meta_step,
    meta_loss,
    split_inner_lr,
    with_inner_lr,
)
from ftlab.meta.reptile import make_reptile_step

__all__ = [
    "ADAPT",
    "ALL",
    "INNER_LR",
    "LossFn",
    "adapt",
    "check_tasks",
    "compiler_options",
    "head_rules",
    "init_inner_lr",
    "make_meta_step",
    "make_reptile_step",
    "meta_loss",
    "split_inner_lr",
    "with_inner_lr",
]
