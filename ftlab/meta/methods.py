"""Meta-learning methods by name: each one's inner rules and meta-step.

    step = methods.make_step("anil", loss_fn, tx, inner_lr=0.01, num_steps=5)

Every name is a tree transformation of the same state: ``maml``, ``fomaml`` (first order),
``anil`` (only the head adapts), ``metasgd`` (learned rates under ``inner_lr/...``, see
`ftlab.meta.with_inner_lr`) and ``reptile``.
"""

from __future__ import annotations

from collections.abc import Callable

import optax

from ftlab.meta import maml, reptile

__all__ = ["METHODS", "inner_rules", "make_step"]

METHODS = ("maml", "fomaml", "anil", "metasgd", "reptile")


def inner_rules(method: str) -> maml.Rules:
    """The leaves the inner loop (and fine-tuning at test time) adapts: the head for ANIL."""
    return maml.head_rules() if method == "anil" else maml.ALL


def make_step(
    method: str,
    loss_fn: maml.LossFn,
    tx: optax.GradientTransformation,
    *,
    inner_lr: float,
    num_steps: int,
    remat: bool = False,
    axis_name: str | None = None,
) -> Callable:
    """``step(state, tasks) -> (state, metrics)`` of ``method`` (`make_meta_step` or
    `make_reptile_step` with its inner rules; Meta-SGD ignores ``inner_lr``, its rates are
    leaves of the state; ``remat`` is for the MAML family).

    Raises:
        ValueError: ``method`` is not one of `METHODS`.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; expected one of {', '.join(METHODS)}")
    kw = dict(num_steps=num_steps, rules=inner_rules(method), axis_name=axis_name)
    if method == "reptile":
        return reptile.make_reptile_step(loss_fn, tx, inner_lr=inner_lr, **kw)
    return maml.make_meta_step(
        loss_fn,
        tx,
        inner_lr=None if method == "metasgd" else inner_lr,
        first_order=method == "fomaml",
        remat=remat,
        **kw,
    )
