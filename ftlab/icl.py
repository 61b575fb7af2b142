"""In-context learning: k-shot prompts and label scoring by log-probability, for a Llama decoder.

A prompt is an instruction, `k` demonstrations and the query, each demonstration and the query
formatted by the task's template::

    {instruction}

    Review: a gorgeous, witty film.
    Sentiment: positive

    Review: {query text}
    Sentiment:

The prediction is the label whose word (e.g. " positive" / " negative", one token each) has the
highest log-probability as the next token. Everything before the query is shared by all queries
of one draw of demonstrations, so it is encoded once (`prefill`, a KV cache) and every batch of
queries only runs its own tokens against that cache (`score`). Both are compiled once for fixed
padded lengths: the shared part is left-padded to `prefix_len` tokens and queries are
right-padded to `query_len`, so every `k` and every draw reuses the same two programs.

References:
    Brown et al., "Language Models are Few-Shot Learners", https://arxiv.org/abs/2005.14165
    Zhao et al., "Calibrate Before Use: Improving Few-Shot Performance of Language Models",
    https://arxiv.org/abs/2102.09690 (why the spread over draws of demonstrations matters)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftlab import types
from ftlab.models import llama

__all__ = [
    "Task",
    "demonstration",
    "prefix_text",
    "prompt",
    "label_token_ids",
    "truncate",
    "sample_demos",
    "encode_prefix",
    "encode_queries",
    "encode_prompts",
    "label_word_loss",
    "prefill",
    "score",
    "accuracy",
]


@dataclasses.dataclass(frozen=True)
class Task:
    """How to phrase a classification task as text.

    Attributes:
        instruction: Text in front of everything (may be empty).
        template: One example without its answer; must contain `{text}` and end where the
            label word follows, e.g. `"Review: {text}\\nSentiment:"`.
        label_words: The answer word of each label index, with its leading space
            (`(" negative", " positive")`); each must be a single token.
        separator: Between the instruction and the examples.
    """

    instruction: str
    template: str
    label_words: tuple[str, ...]
    separator: str = "\n\n"

    def __post_init__(self):
        if "{text}" not in self.template:
            raise ValueError(f"Task.template {self.template!r} must contain '{{text}}'.")
        if len(set(self.label_words)) != len(self.label_words) or len(self.label_words) < 2:
            raise ValueError(f"Task.label_words {self.label_words!r}: need >= 2 distinct words.")


def demonstration(task: Task, text: str, label: int) -> str:
    """One solved example: the template filled in, then the label word.

    >>> t = Task("", "Q: {text}\\nA:", (" no", " yes"))
    >>> demonstration(t, "sky blue?", 1)
    'Q: sky blue?\\nA: yes'
    """
    return task.template.format(text=text) + task.label_words[label]


def prefix_text(task: Task, demos: Sequence[tuple[str, int]]) -> str:
    """The part shared by all queries: instruction and `k` demonstrations, each followed by the
    separator (the query comes right after).

    >>> t = Task("Answer.", "Q: {text}\\nA:", (" no", " yes"))
    >>> prefix_text(t, [("x", 0)])
    'Answer.\\n\\nQ: x\\nA: no\\n\\n'
    """
    parts = [task.instruction + task.separator] if task.instruction else []
    parts += [demonstration(task, text, label) + task.separator for text, label in demos]
    return "".join(parts)


def prompt(task: Task, demos: Sequence[tuple[str, int]], text: str) -> str:
    """The whole k-shot prompt for one query (`prefix_text` + the query's template).

    >>> t = Task("Answer.", "Q: {text}\\nA:", (" no", " yes"))
    >>> print(prompt(t, [("x", 0)], "y"))
    Answer.
    <BLANKLINE>
    Q: x
    A: no
    <BLANKLINE>
    Q: y
    A:
    """
    return prefix_text(task, demos) + task.template.format(text=text)


def label_token_ids(tokenizer: Any, task: Task) -> np.ndarray:
    """`[n_labels]` int32 token id of each label word.

    Raises:
        ValueError: a label word is not exactly one token (naming it and its tokens).
    """
    ids = []
    for word in task.label_words:
        enc = tokenizer.encode(word)
        if len(enc.ids) != 1:
            raise ValueError(
                f"label word {word!r} is {len(enc.ids)} tokens {enc.tokens}; icl scores single-"
                "token label words; pick words that are one token (with their leading space)."
            )
        ids.append(enc.ids[0])
    return np.asarray(ids, np.int32)


def truncate(tokenizer: Any, text: str, max_tokens: int) -> str:
    """`text` cut to its first `max_tokens` tokens (unchanged if it is that short).

    Keeps long demonstrations (plot summaries run to hundreds of tokens) from crowding out the
    others in a fixed prefix budget.
    """
    ids = tokenizer.encode(text).ids
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def sample_demos(
    rng: np.random.Generator, labels: np.ndarray, k: int, *, eligible: np.ndarray | None = None
) -> np.ndarray:
    """Indices of `k` demonstrations, balanced over labels (round robin from a random label),
    in random order.

    Args:
        rng: numpy generator (one per draw, for reproducible draws).
        labels: `[n]` label of every candidate.
        k: Number of demonstrations.
        eligible: Optional `[n]` bool, candidates allowed (e.g. short enough).

    Raises:
        ValueError: not enough eligible candidates of some label.

    >>> sample_demos(np.random.default_rng(0), np.array([0, 1, 0, 1]), 2).shape
    (2,)
    """
    labels = np.asarray(labels)
    ok = np.ones(len(labels), bool) if eligible is None else np.asarray(eligible, bool)
    classes = np.unique(labels)
    pools = {c: rng.permutation(np.flatnonzero((labels == c) & ok)).tolist() for c in classes}
    start = int(rng.integers(len(classes)))
    picked = []
    for i in range(k):
        c = classes[(start + i) % len(classes)]
        if not pools[c]:
            raise ValueError(f"sample_demos: too few eligible examples of label {c} for k={k}.")
        picked.append(pools[c].pop())
    return rng.permutation(np.asarray(picked, np.int64))


def encode_prefix(
    tokenizer: Any, text: str, length: int, *, pad_id: int, what: str = "prefix_len"
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and mask `[1, length]` of the shared prefix.

    ``what`` names ``length`` in the error (a caller that read it from a config passes the key).

    Raises:
        ValueError: the prefix has more than `length` tokens (naming both numbers).
    """
    ids = tokenizer.encode(text).ids if text else []
    if len(ids) > length:
        raise ValueError(
            f"the instruction and demonstrations take {len(ids)} tokens, more than "
            f"{what}={length}; use fewer or shorter demonstrations or a larger {what}."
        )
    out = np.full((1, length), pad_id, np.int32)
    mask = np.zeros((1, length), np.int32)
    if ids:
        out[0, length - len(ids) :], mask[0, length - len(ids) :] = ids, 1
    return out, mask


def encode_queries(
    tokenizer: Any, task: Task, texts: Sequence[str], length: int, *, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ids and mask `[n, length]` of the queries' templates.

    A text too long for `length` keeps its first tokens: the template around it (the cue the
    label word follows) is always complete.
    """
    head, tail = task.template.split("{text}")
    head_ids = tokenizer.encode(head).ids if head else []
    tail_ids = tokenizer.encode(tail).ids if tail else []
    budget = length - len(head_ids) - len(tail_ids)
    if budget < 1:
        raise ValueError(
            f"query_len={length} leaves no room for the text of template {task.template!r}."
        )
    out = np.full((len(texts), length), pad_id, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, text in enumerate(texts):
        ids = tokenizer.encode(task.template.format(text=text)).ids
        if len(ids) > length:
            body = tokenizer.encode(head + text).ids[len(head_ids) :][:budget]
            ids = head_ids + body + tail_ids
        out[i, : len(ids)], mask[i, : len(ids)] = ids, 1
    return out, mask


def encode_prompts(
    tokenizer: Any, task: Task, texts: Sequence[str], query_len: int, *, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ids and mask `[n, instruction + query_len]` of the zero-shot prompts (instruction, then
    each query's template), the instruction as long as it is: the text a tuned model answers.
    """
    head = prefix_text(task, [])
    n_head = len(tokenizer.encode(head).ids) if head else 0
    p_ids, p_mask = encode_prefix(tokenizer, head, n_head, pad_id=pad_id)
    q_ids, q_mask = encode_queries(tokenizer, task, texts, query_len, pad_id=pad_id)
    n = len(texts)
    ids = np.concatenate([np.repeat(p_ids, n, 0), q_ids], axis=1)
    mask = np.concatenate([np.repeat(p_mask, n, 0), q_mask], axis=1)
    return ids, mask


def label_word_loss(config: llama.LlamaConfig, wrap: Callable | None = None) -> Callable:
    """``loss_fn(params, batch, rng) -> (loss, {"accuracy"})``: the next-token cross-entropy
    of the label word at each prompt's last real position, what `score` ranks the labels by.

    Args:
        config: The decoder's config.
        wrap: ``wrap(apply) -> apply`` of a PEFT method applied in the forward pass.

    ``batch``: ``input_ids``, ``attention_mask`` `[batch, seq]` (`encode_prompts`), ``target``
    `[batch]` (the label word's token id), ``label`` `[batch]` (its index) and ``label_ids``
    `[n_labels]` (`label_token_ids`); the accuracy is that of the argmax over the label words.
    """
    module = llama.LlamaForCausalLM(config)

    def hidden_fn(params, ids, mask):
        params = llama.stack_if_uniform(params)  # differentiable: gradients reach every layer
        return module.apply({"params": params}, ids, mask, return_hidden=True)

    hidden_fn = hidden_fn if wrap is None else wrap(hidden_fn)

    def loss_fn(params, batch, rng):
        del rng
        hidden = hidden_fn(params, batch["input_ids"], batch["attention_mask"])
        last = jnp.sum(batch["attention_mask"], axis=1) - 1
        h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        logp = jax.nn.log_softmax(llama.lm_logits(params, h), axis=-1)
        loss = -jnp.mean(jnp.take_along_axis(logp, batch["target"][:, None], axis=1))
        correct = jnp.argmax(jnp.take(logp, batch["label_ids"], axis=1), axis=1) == batch["label"]
        return loss, {"accuracy": jnp.mean(correct)}

    return loss_fn


@functools.partial(jax.jit, static_argnames=("config", "query_len"))
def prefill(
    config: llama.LlamaConfig,
    params: types.Params,
    prefix_ids: jax.Array,
    prefix_mask: jax.Array,
    *,
    query_len: int,
) -> llama.Cache:
    """Encodes the shared prefix `[1, prefix_len]` into a cache with room for `query_len` more."""
    params = llama.stack_if_uniform(params)
    n_prompt = llama.num_prompt(params)
    cache = llama.init_cache(config, 1, n_prompt + prefix_ids.shape[1] + query_len)
    _, cache = llama.LlamaForCausalLM(config).apply(
        {"params": params}, prefix_ids, prefix_mask, cache=cache, return_hidden=True
    )
    return cache


@functools.partial(jax.jit, static_argnames="config")
def score(
    config: llama.LlamaConfig,
    params: types.Params,
    cache: llama.Cache,
    query_ids: jax.Array,
    query_mask: jax.Array,
    label_ids: jax.Array,
) -> jax.Array:
    """Log-probabilities `[batch, n_labels]` of the label tokens after each query.

    Args:
        config: The model's config.
        params: Its parameters (those `cache` was made with).
        cache: From `prefill` (batch 1); shared by all queries.
        query_ids: `[batch, query_len]` right-padded queries (`encode_queries`).
        query_mask: `[batch, query_len]`.
        label_ids: `[n_labels]` from `label_token_ids`.

    Returns:
        float32 `[batch, n_labels]`: `log p(label word | prompt)` over the whole vocabulary.
    """
    params = llama.stack_if_uniform(params)
    batch = query_ids.shape[0]
    cache = llama.Cache(
        layers=jax.tree.map(
            lambda x: jnp.broadcast_to(x, (x.shape[0], batch, *x.shape[2:])), cache.layers
        ),
        mask=jnp.broadcast_to(cache.mask, (batch, cache.mask.shape[1])),
        index=cache.index,
    )
    hidden, _ = llama.LlamaForCausalLM(config).apply(
        {"params": params}, query_ids, query_mask, cache=cache, start=False, return_hidden=True
    )
    last = jnp.sum(query_mask, axis=1) - 1
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    # Logits of the last real position only: never the [batch, seq, vocab] array.
    logp = jax.nn.log_softmax(llama.lm_logits(params, h), axis=-1)
    return jnp.take(logp, label_ids, axis=1)


def accuracy(
    config: llama.LlamaConfig,
    params: types.Params,
    tokenizer: Any,
    task: Task,
    demos: Sequence[tuple[str, int]],
    texts: Sequence[str],
    labels: np.ndarray,
    *,
    prefix_len: int,
    query_len: int,
    batch_size: int,
    pad_id: int,
) -> tuple[float, np.ndarray]:
    """Accuracy of the k-shot prompt with `demos` on `texts`, and the predictions.

    The last batch is padded to `batch_size` (repeating the first query), so `score` compiles
    once.

    Returns:
        `(accuracy, predictions [n])`.
    """
    label_ids = jnp.asarray(label_token_ids(tokenizer, task))
    p_ids, p_mask = encode_prefix(tokenizer, prefix_text(task, demos), prefix_len, pad_id=pad_id)
    cache = prefill(config, params, p_ids, p_mask, query_len=query_len)
    q_ids, q_mask = encode_queries(tokenizer, task, texts, query_len, pad_id=pad_id)
    preds = []
    for start in range(0, len(texts), batch_size):
        ids, mask = q_ids[start : start + batch_size], q_mask[start : start + batch_size]
        n = len(ids)
        if n < batch_size:
            ids = np.concatenate([ids, np.repeat(ids[:1], batch_size - n, 0)])
            mask = np.concatenate([mask, np.repeat(mask[:1], batch_size - n, 0)])
        logp = score(config, params, cache, ids, mask, label_ids)
        preds.append(np.asarray(jnp.argmax(logp, axis=1))[:n])
    preds = np.concatenate(preds) if preds else np.zeros((0,), np.int64)
    return float(np.mean(preds == np.asarray(labels))), preds
