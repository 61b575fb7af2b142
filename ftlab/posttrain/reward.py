"""A scalar reward head over any model's hidden states: pool, then one linear unit.

A reward model is a pretrained network whose final hidden states are pooled into one vector per
text and mapped to a number. Nothing here knows a model: ``hidden_apply(params, batch, *args)``
returns ``[batch, seq, dim]`` hidden states (a decoder's ``return_hidden=True`` output, an
encoder's last layer), and `wrap_apply` turns it into ``reward_apply(params, batch, *args) ->
[batch]``, reading the head from its own subtree ``params[name]`` (``{"kernel": [dim, 1],
"bias": [1]}``, as a Flax ``Dense(1)``) and handing the rest of the tree to ``hidden_apply``.
So any parameter-efficient method that wraps ``hidden_apply`` (LoRA, prompt tuning, ...)
composes with it, and a partition rule ``("<name>/.*", "train")`` trains the head.

Pooling: ``"mean"`` over the real tokens (sentence encoders), ``"first"`` (BERT's [CLS]),
``"last"``: the last real token of each row, a decoder's summary of the whole text (causal
attention: only it has seen every token), as InstructGPT's and Llama 2's reward models read it.

References:
    Ouyang et al., "Training language models to follow instructions with human feedback",
    https://arxiv.org/abs/2203.02155 (reward model: a scalar projection of the final token).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ftlab.types import Params

__all__ = ["HEAD", "POOLINGS", "init", "pool", "wrap_apply"]

HEAD = "reward_head"
POOLINGS = ("mean", "first", "last")


def pool(hidden: jax.Array, mask: jax.Array, how: str) -> jax.Array:
    """``[batch, seq, dim]`` hidden states -> ``[batch, dim]`` float32, over ``mask``'s tokens.

    Args:
        hidden: Final hidden states.
        mask: ``[batch, seq]`` 1 on real tokens; ``"last"`` and ``"first"`` expect them to be a
            prefix of each row (right padding).
        how: One of `POOLINGS`.

    >>> h, m = jnp.arange(6.0).reshape(1, 3, 2), jnp.array([[1, 1, 0]])
    >>> pool(h, m, "last").tolist(), pool(h, m, "mean").tolist()
    ([[2.0, 3.0]], [[1.0, 2.0]])
    """
    if hidden.ndim != 3 or hidden.shape[:2] != mask.shape:
        raise ValueError(
            f"hidden {hidden.shape} must be [batch, seq, dim] and mask {mask.shape} [batch, seq]."
        )
    hidden = hidden.astype(jnp.float32)
    if how == "mean":
        m = mask.astype(jnp.float32)[..., None]
        return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    if how == "first":
        return hidden[:, 0]
    if how == "last":
        last = jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=1) - 1, 0)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    raise ValueError(f"how={how!r}; expected one of {POOLINGS}.")


def init(params: Params, rng: jax.Array, *, dim: int, name: str = HEAD) -> dict:
    """``params`` with a fresh head under ``name``: kernel ``N(0, 0.02^2)`` ``[dim, 1]``, bias 0.

    Raises:
        ValueError: ``params`` already has an entry ``name``.
    """
    if name in params:
        raise ValueError(f"params already has a top-level {name!r}; pass another name.")
    kernel = 0.02 * jax.random.normal(rng, (dim, 1), jnp.float32)
    head = {"kernel": np.asarray(kernel), "bias": np.zeros((1,), np.float32)}
    return {**params, name: head}


def wrap_apply(
    hidden_apply: Callable[..., jax.Array], *, pooling: str, name: str = HEAD
) -> Callable[..., jax.Array]:
    """``reward_apply(params, batch, *args) -> [batch]`` float32 rewards.

    Args:
        hidden_apply: ``(params without the head, batch, *args) -> [batch, seq, dim]``; ``batch``
            must hold ``attention_mask`` ``[batch, seq]``.
        pooling: One of `POOLINGS`.
        name: The head's top-level key in ``params`` (`init`).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}; expected one of {POOLINGS}.")

    def reward_apply(params: Mapping, batch: Mapping[str, jax.Array], *args) -> jax.Array:
        if name not in params:
            raise ValueError(
                f"params has no reward head {name!r} (top-level keys: {sorted(params)}); add it "
                "with reward.init."
            )
        head = params[name]
        rest = {k: v for k, v in params.items() if k != name}
        pooled = pool(hidden_apply(rest, batch, *args), batch["attention_mask"], pooling)
        return pooled @ head["kernel"][:, 0].astype(jnp.float32) + head["bias"][0]

    return reward_apply
