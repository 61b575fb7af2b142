"""Prompt tuning: trainable soft-prompt vectors in front of the input, as a tree transformation.

``init`` adds one leaf next to the word embeddings, read by the model's prompt hook::

    encoder/embeddings/prompt    [length, hidden]    trained; everything else frozen

The model (`ftlab.models.bert.BertEmbeddings`) prepends the prompt rows to the embedded sequence and
passes them through the same frozen embedding layer norm as the tokens, without position or
token-type embeddings: real tokens keep positions 0..seq-1 and a prompt never eats into the
position table. Every token attends to every prompt position. The encoder then returns
``[batch, length + seq, hidden]``; the classifier pools over the real tokens only, so a prompt acts
only through attention and the base pooling stays interpretable.

Unlike LoRA or adapters, a prompt is not an identity at init: it adds attendable positions, so the
real tokens' outputs change as soon as it exists. ``init="vocab"`` (Lester et al.'s best init)
copies randomly chosen word-embedding rows, so the prompt starts among real token embeddings;
``init="random"`` draws uniform(-0.5, 0.5) as the paper's random baseline.

References:
    Lester et al., "The Power of Scale for Parameter-Efficient Prompt Tuning",
    https://arxiv.org/abs/2104.08691
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ftlab.core import partition
from ftlab.models import bert
from ftlab.types import Params, PRNGKey

INITS = ("vocab", "random")
_WORDS = re.compile(r"(?P<emb>(?:.*/)?embeddings)/word_embeddings/embedding")
_PROMPT_LEAF = re.compile(rf"(.*/)?embeddings/{bert.PROMPT}")


def init(
    params: Params,
    rng: PRNGKey,
    *,
    length: int,
    init: str = "vocab",  # noqa: A002 (the paper's and the config's name)
    what: str = "config.peft",
) -> dict:
    """Adds a soft prompt ``embeddings/prompt`` [length, hidden] to a BERT tree.

    Args:
        params: A BERT tree (`BertEncoder` or `BertClassifier`) without a prompt.
        rng: Key for the row choice (``"vocab"``) or the values (``"random"``).
        length: Number of prompt vectors (Lester et al. use 1 to 150; 20 to 100 is typical).
        init: ``"vocab"`` copies distinct random word-embedding rows; ``"random"`` draws
            uniform(-0.5, 0.5).
        what: How to name the config group in errors.

    Returns:
        A new tree with the prompt leaf added.

    Raises:
        ValueError: bad ``length`` or ``init``, no word-embedding table, or a prompt already there.

    >>> p = {"embeddings": {"word_embeddings": {"embedding": np.eye(5, 3, dtype=np.float32)}}}
    >>> init(p, jax.random.key(0), length=2)["embeddings"]["prompt"].shape
    (2, 3)
    """
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"{what}.length={length!r} must be an integer >= 1 (e.g. 20).")
    if init not in INITS:
        raise ValueError(f"{what}.init={init!r} is not one of {list(INITS)}.")
    flat = partition.flatten(params)
    found = [m["emb"] for k in flat if (m := _WORDS.fullmatch(k))]
    if len(found) != 1:
        raise ValueError(
            "prompt.init: expected exactly one '<...>/embeddings/word_embeddings/embedding' leaf, "
            f"found {found}; pass a BERT encoder or classifier tree."
        )
    emb = found[0]
    name = f"{emb}/{bert.PROMPT}"
    if name in flat:
        raise ValueError(f"prompt.init: {name} already exists; start from the base parameters.")
    table = jnp.asarray(flat[f"{emb}/word_embeddings/embedding"])
    vocab, hidden = table.shape
    if init == "vocab":
        # Distinct rows while the vocabulary allows it, as each prompt vector should start apart.
        rows = jax.random.choice(rng, vocab, (length,), replace=length > vocab)
        prompt = table[rows].astype(jnp.float32)
    else:
        prompt = jax.random.uniform(rng, (length, hidden), jnp.float32, -0.5, 0.5)
    out = {}
    for k, v in flat.items():
        out[k] = v
        if k == f"{emb}/word_embeddings/embedding":
            out[name] = prompt
    return partition.unflatten(out)


def rules(*, extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """Partition rules that train the prompt (and ``extra``) and freeze the rest.

    >>> rules(extra=[("head/.*", "train")])
    [('head/.*', 'train'), ('(.*/)?embeddings/prompt', 'train'), ('.*', 'frozen')]
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
            f"prompt.adapter: no '<...>/embeddings/{bert.PROMPT}' leaf in the tree (top-level "
            f"names: {', '.join(top)}); add it with prompt.init(...) first."
        )
    return partition.unflatten(out)
