"""Prompt tuning: trainable soft-prompt vectors in front of the input, as a tree transformation.

``init`` adds one leaf at the model's input-embeddings site (`ftlab.models.hooks.embeddings`,
found by `hooks.discover`); on ftlab's BERT::

    encoder/embeddings/prompt    [length, hidden]    trained; everything else frozen

The hook prepends the prompt rows to the embedded sequence; ftlab's BERT then passes them through
the same frozen embedding layer norm as the tokens, without position or token-type embeddings: real
tokens keep positions 0..seq-1 and a prompt never eats into the position table. Every token attends
to every prompt position. The encoder then returns ``[batch, length + seq, hidden]``; the classifier
pools over the real tokens only, so a prompt acts only through attention and the base pooling stays
interpretable.

Unlike LoRA or adapters, a prompt is not an identity at init: it adds attendable positions, so the
real tokens' outputs change as soon as it exists. ``init="vocab"`` (Lester et al.'s best init)
copies randomly chosen word-embedding rows, so the prompt starts among real token embeddings;
``init="random"`` draws uniform(-0.5, 0.5) as the paper's random baseline. A typical run::

    sites = hooks.discover(apply, params, example_batch, None)   # apply(params, batch, rng)
    params = prompt.init(params, rng, sites=sites, length=20)
    label_tree = partition.labels(params, prompt.rules(extra=[("head/.*", "train")]))

References:
    Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning",
    https://arxiv.org/abs/2104.08691
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftlab.core import partition
from ftlab.models import hooks
from ftlab.types import Params, PRNGKey

__all__ = ["INITS", "adapter", "init", "rules", "wrap_apply"]

INITS = ("vocab", "random")
_PROMPT_LEAF = re.compile(rf"(.*/)?{hooks.PROMPT}")


def init(
    params: Params,
    rng: PRNGKey,
    *,
    sites: Sequence[hooks.Site],
    length: int,
    init: str = "vocab",  # noqa: A002 (the paper's and the config's name)
    what: str | None = None,
) -> dict:
    """Adds a soft prompt ``<embeddings site>/prompt`` [length, hidden] to the model's tree.

    Args:
        params: The model's tree, without a prompt.
        rng: Key for the row choice (``"vocab"``) or the values (``"random"``).
        sites: The model's hook sites, from `hooks.discover(apply, params, *example)`; exactly
            one must be an ``embeddings`` site.
        length: Number of prompt vectors (Lester et al. use 1 to 150; 20 to 100 is typical).
        init: ``"vocab"`` copies distinct random rows of the token table the site names;
            ``"random"`` draws uniform(-0.5, 0.5).
        what: The config group that set these arguments, e.g. ``"config.peft"``; by
            default errors say ``prompt.init: length``.

    Returns:
        A new tree with the prompt leaf added.

    Raises:
        ValueError: bad ``length`` or ``init``, not exactly one embeddings site, ``"vocab"``
            for a model whose site names no token table, or a prompt already there.

    >>> site = hooks.Site(hooks.EMBEDDINGS, "embeddings", width=3, table="embeddings/table")
    >>> p = {"embeddings": {"table": np.eye(5, 3, dtype=np.float32)}}
    >>> init(p, jax.random.key(0), sites=[site], length=2)["embeddings"]["prompt"].shape
    (2, 3)
    """
    arg = f"{what}." if what else "prompt.init: "
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"{arg}length={length!r} must be an integer >= 1 (e.g. 20).")
    if init not in INITS:
        raise ValueError(f"{arg}init={init!r} is not one of {list(INITS)}.")
    found = hooks.of_kind(sites, hooks.EMBEDDINGS, what="prompt.init")
    if len(found) != 1:
        raise ValueError(
            f"prompt.init: the model calls the embeddings hook at {len(found)} places "
            f"({', '.join(s.path or '<root>' for s in found)}); a soft prompt needs exactly one."
        )
    site = found[0]
    flat = partition.flatten(params)
    name = site.leaf(hooks.PROMPT)
    if name in flat:
        raise ValueError(f"prompt.init: {name} already exists; start from the base parameters.")
    hidden = site.width
    if init == "vocab":
        if not site.table or site.table not in flat:
            raise ValueError(
                f"prompt.init: {arg}init='vocab' copies rows of the token-embedding table, but "
                f"the model's embeddings hook at {site.path or '<root>'!r} names "
                f"{'no table' if not site.table else repr(site.table) + ', not in params'}; "
                f"pass table=... to hooks.embeddings or use {arg}init='random'."
            )
        table = jnp.asarray(flat[site.table])
        vocab = table.shape[0]
        # Distinct rows while the vocabulary allows it, as each prompt vector should start apart.
        rows = jax.random.choice(rng, vocab, (length,), replace=length > vocab)
        prompt = table[rows].astype(jnp.float32)
    else:
        prompt = jax.random.uniform(rng, (length, hidden), jnp.float32, -0.5, 0.5)
    return partition.unflatten({**flat, name: prompt})


def wrap_apply(apply_fn: Callable) -> Callable:
    """Returns ``apply_fn`` that raises when the prompt of its first argument was not used.

    The model prepends the prompt without a wrapper; this adds the check for a model that does
    not call the embeddings hook (`hooks.wrap_apply`). Same signature and result.
    """
    return hooks.wrap_apply(apply_fn, what="prompt.wrap_apply(apply)")


def rules(*, extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Partition rules that train the prompt (and ``extra``) and freeze the rest.

    >>> rules(extra=[("head/.*", "train")])
    [('head/.*', 'train'), ('(.*/)?prompt', 'train'), ('.*', 'frozen')]
    """
    return [*extra, (_PROMPT_LEAF.pattern, "train"), (".*", partition.FROZEN)]


def adapter(params: Params) -> dict:
    """The prompt leaf of ``params`` only.

    Raises:
        ValueError: ``params`` holds no prompt.

    >>> adapter({"embeddings": {"prompt": 1, "layer_norm": {"scale": 2}}})
    {'embeddings': {'prompt': 1}}
    """
    flat = partition.flatten(params)
    out = {k: v for k, v in flat.items() if _PROMPT_LEAF.fullmatch(k)}
    if not out:
        top = sorted({k.split("/")[0] for k in flat})
        raise ValueError(
            f"prompt.adapter: no '<...>/{hooks.PROMPT}' leaf in the tree (top-level "
            f"names: {', '.join(top)}); add it with prompt.init(...) first."
        )
    return partition.unflatten(out)
