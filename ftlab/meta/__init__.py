"""Meta-learning over a partition: MAML, first-order MAML, ANIL, Meta-SGD and Reptile.

Every meta-step carries `ftlab.core.train.TrainState` and takes the loss of every ftlab step,
``loss_fn(params, batch, rng) -> (loss, aux)``. The verbs are re-exported here from the modules
where they live (``maml``, ``reptile``, ``methods``: each method by name), which load on first use::

    from ftlab import meta
    adapted = meta.adapt(params, support, loss_fn=loss_fn, inner_lr=0.01, num_steps=5)
"""

from ftlab import _lazy

_SUBMODULES = ("maml", "methods", "reptile")
# name -> the submodule that defines it
_NAMES = {
    "ADAPT": "maml",
    "ALL": "maml",
    "INNER_LR": "maml",
    "LossFn": "maml",
    "adapt": "maml",
    "check_tasks": "maml",
    "compiler_options": "maml",
    "head_rules": "maml",
    "init_inner_lr": "maml",
    "make_meta_step": "maml",
    "meta_loss": "maml",
    "split_inner_lr": "maml",
    "with_inner_lr": "maml",
    "make_reptile_step": "reptile",
    "METHODS": "methods",
    "inner_rules": "methods",
    "make_step": "methods",
}

__getattr__, __dir__, __all__ = _lazy.attach(__name__, _SUBMODULES, _NAMES)
