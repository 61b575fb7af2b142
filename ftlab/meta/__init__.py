"""Meta-learning over a partition: MAML, first-order MAML, ANIL, Meta-SGD and Reptile.

from ftlab import meta
adapted = meta.adapt(params, support, loss_fn=loss_fn, inner_lr=0.01, num_steps=5)
"""

from ftlab.meta.maml import (
    ADAPT,
    ALL,
    MetaState,
    adapt,
    check_tasks,
    compiler_options,
    head_rules,
    init_inner_lr,
    init_state,
    make_meta_step,
    meta_loss,
)
from ftlab.meta.reptile import make_reptile_step

__all__ = [
    "ADAPT",
    "ALL",
    "MetaState",
    "adapt",
    "check_tasks",
    "compiler_options",
    "head_rules",
    "init_inner_lr",
    "init_state",
    "make_meta_step",
    "make_reptile_step",
    "meta_loss",
]
