"""Instruction-tuning data: chat conversations to tokens with an assistant-only loss, packed.

`encode` renders each conversation with the checkpoint's chat template (a Jinja string, e.g.
`third_party.smollm2.CHAT_TEMPLATE` or `TokenizerFiles.chat_template`, through
`ftlab.data.files.chat_renderer`) and marks the tokens of the assistant turns: their content
and end-of-turn marker, never the role header, the system prompt or a user turn. The rule is
`ftlab.data.files.encode_chat`'s, shared with it, so a user's chat file and ShareGPT are
masked alike.

`pack` lays several encoded conversations into each row of a fixed length, first fit in the
given order, and returns what the model and the loss need to keep them apart:
``segment_ids`` (1, 2, ... per row, 0 for padding; `ftlab.models.llama.LlamaForCausalLM` then
never attends across them and restarts positions at each), ``positions`` (per segment) and
``targets`` / ``loss_mask`` aligned by position (a segment's last position predicts nothing).
``pack(..., max_segments=1)`` is the unpacked layout of the same data, one conversation per row.

Pure functions of their inputs; nothing is read from disk here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from ftlab.data import files

__all__ = ["Encoded", "Packed", "encode", "pack"]

Render = Callable[[Sequence[Mapping[str, str]], bool], str]


class Encoded(NamedTuple):
    """One tokenised conversation.

    Attributes:
        input_ids: int32 ``[n]`` token ids of the whole rendered conversation.
        assistant_mask: int32 ``[n]``, 1 on the tokens of assistant turns (aligned with the
            tokens, not yet shifted to the positions that predict them).
    """

    input_ids: np.ndarray
    assistant_mask: np.ndarray


class Packed(NamedTuple):
    """Rows of packed conversations, all int32 ``[rows, seq_len]``.

    Attributes:
        input_ids: Token ids (``pad_id`` in padding).
        attention_mask: 1 on real tokens.
        segment_ids: 1, 2, ... for the conversations of a row in order, 0 in padding.
        positions: Position of each token within its conversation (0 in padding); what the
            model computes from ``segment_ids`` itself.
        targets: The next token of the same conversation (0 where there is none).
        loss_mask: 1 where ``targets`` is an assistant token: the positions to score, as
            `ftlab.tasks.lm.make_loss_fn` and `ftlab.posttrain.logprobs` read them.
        source: Index into the packed examples of each token's conversation (-1 in padding).
        truncated: Indices of the examples cut to ``seq_len`` tokens (their tail is dropped).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    source: np.ndarray
    truncated: tuple[int, ...]

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-token arrays as a dict, for `ftlab.data.batching`."""
        return {k: getattr(self, k) for k in self._fields if k != "truncated"}


def encode(
    tokenizer: Any,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    *,
    render: Render | None = None,
) -> list[Encoded]:
    """Tokenises conversations with a mask over their assistant tokens; no truncation.

    Args:
        tokenizer: A `tokenizers.Tokenizer`; its own padding, truncation and special tokens are
            not used (the template writes the special tokens).
        conversations: Lists of ``{"role", "content"}`` messages (`files.read_chat`,
            `ftlab.data.sharegpt`).
        render: From `files.chat_renderer(chat_template)`; None: ChatML without a system
            prompt (`files.CHATML_TEMPLATE`).

    Returns:
        One `Encoded` per conversation.

    Raises:
        ValueError: naming the conversation whose template rendering cannot be split into
            turns (e.g. SmolLM2's template adds a system prompt in front of a conversation that
            opens with an assistant turn), or which has no assistant token.
    """
    import tokenizers  # noqa: PLC0415 (only tokenising needs it)

    render = render or files.chat_renderer()
    tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    texts, spans = [], []
    for i, messages in enumerate(conversations):
        try:
            # encode_chat's own rule, so that the two masks never differ
            text, span = files.assistant_spans(render, messages)
        except ValueError as e:
            raise ValueError(f"conversations[{i}]: {e}") from None
        texts.append(text)
        spans.append(span)
    out = []
    for i, (enc, span) in enumerate(
        zip(tok.encode_batch(texts, add_special_tokens=False), spans, strict=True)
    ):
        mask = [any(s <= a and b <= e and b > a for s, e in span) for a, b in enc.offsets]
        if not any(mask):
            raise ValueError(f"conversations[{i}] has no assistant token to learn from.")
        out.append(Encoded(np.asarray(enc.ids, np.int32), np.asarray(mask, np.int32)))
    return out


def pack(
    examples: Sequence[Encoded],
    *,
    seq_len: int,
    pad_id: int = 0,
    max_segments: int | None = None,
) -> Packed:
    """Packs encoded conversations into rows of ``seq_len`` tokens, first fit in order.

    Each example goes into the first row with room for all its tokens (and fewer than
    ``max_segments`` examples), else a new row; rows keep the examples' order. An example
    longer than ``seq_len`` is cut to its first ``seq_len`` tokens and gets a row of its own
    (its index is in ``Packed.truncated``).

    Args:
        examples: From `encode`.
        seq_len: Tokens per row.
        pad_id: Id written in padding slots.
        max_segments: At most this many examples per row; 1 gives the unpacked layout.

    Returns:
        A `Packed`.

    Raises:
        ValueError: ``seq_len`` or ``max_segments`` below 1, no examples, or an example with no
            scored position left within ``seq_len`` tokens (naming it).

    >>> ex = [Encoded(np.array([1, 2, 3]), np.array([0, 1, 1])), Encoded(np.array([4, 5]),
    ...       np.array([0, 1]))]
    >>> p = pack(ex, seq_len=6)
    >>> p.segment_ids.tolist(), p.targets.tolist(), p.loss_mask.tolist()
    ([[1, 1, 1, 2, 2, 0]], [[2, 3, 0, 5, 0, 0]], [[1, 1, 0, 1, 0, 0]])
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be positive.")
    if max_segments is not None and max_segments < 1:
        raise ValueError(f"max_segments={max_segments} must be positive or None.")
    if not examples:
        raise ValueError("pack: examples is empty.")
    lengths = np.array([min(len(e.input_ids), seq_len) for e in examples], np.int64)
    truncated = tuple(i for i, e in enumerate(examples) if len(e.input_ids) > seq_len)
    for i, e in enumerate(examples):
        if not np.any(e.assistant_mask[1 : lengths[i]]):
            raise ValueError(
                f"examples[{i}] has no assistant token within seq_len={seq_len} tokens (it has "
                f"{len(e.input_ids)}); leave it out or raise seq_len."
            )
    # First fit: `free` per open row, the row for each example, vectorised over rows.
    free = np.zeros(0, np.int64)
    count = np.zeros(0, np.int64)
    rows = np.empty(len(examples), np.int64)
    cap = np.iinfo(np.int64).max if max_segments is None else max_segments
    for i, n in enumerate(lengths):
        fits = np.flatnonzero((free >= n) & (count < cap))
        if fits.size:
            r = int(fits[0])
        else:
            r = len(free)
            free = np.append(free, seq_len)
            count = np.append(count, 0)
        rows[i] = r
        free[r] -= n
        count[r] += 1
    shape = (len(free), seq_len)
    out = {
        "input_ids": np.full(shape, pad_id, np.int32),
        "attention_mask": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
        "targets": np.zeros(shape, np.int32),
        "loss_mask": np.zeros(shape, np.int32),
        "source": np.full(shape, -1, np.int32),
    }
    used = np.zeros(len(free), np.int64)
    for i, (e, n) in enumerate(zip(examples, lengths, strict=True)):
        r, a = rows[i], used[rows[i]]
        b = a + n
        used[r] = b
        out["input_ids"][r, a:b] = e.input_ids[:n]
        out["attention_mask"][r, a:b] = 1
        out["segment_ids"][r, a:b] = out["segment_ids"][r].max() + 1
        out["positions"][r, a:b] = np.arange(n)
        out["targets"][r, a : b - 1] = e.input_ids[1:n]
        out["loss_mask"][r, a : b - 1] = e.assistant_mask[1:n]
        out["source"][r, a:b] = i
    return Packed(**out, truncated=truncated)
