"""Turning strings into fixed-length token arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["encode"]


def _fixed_length(tokenizer: Any, max_length: int) -> Any:
    """`tokenizer` if it already truncates and pads to exactly `max_length`, else a configured copy.

    The caller's tokenizer is never mutated, so one tokenizer can serve several lengths.
    """
    padding, truncation = tokenizer.padding, tokenizer.truncation
    if (
        padding is not None
        and padding.get("length") == max_length
        and padding.get("direction") == "right"
        and truncation is not None
        and truncation.get("max_length") == max_length
    ):
        return tokenizer
    import tokenizers  # noqa: PLC0415 (only needed for the copy)

    pad_id = padding["pad_id"] if padding else 0
    pad_token = padding["pad_token"] if padding else "[PAD]"
    copy = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    copy.enable_truncation(max_length)
    copy.enable_padding(pad_id=pad_id, pad_token=pad_token, length=max_length)
    return copy


def encode(tokenizer: Any, texts: Sequence[str], *, max_length: int) -> dict[str, np.ndarray]:
    """Tokenizes `texts` into fixed-length arrays.

    Every row has exactly `max_length` tokens: longer texts are truncated (keeping the special
    tokens the tokenizer adds, e.g. [CLS] ... [SEP]) and shorter ones are padded on the right. The
    output depends only on the tokenizer file and the texts.

    Args:
        tokenizer: A `tokenizers.Tokenizer` (e.g. `third_party.minilm.load().tokenizer(64)`). If its
            padding/truncation are not already `max_length`, a configured copy is used.
        texts: The strings to encode.
        max_length: Tokens per row.

    Returns:
        `{"input_ids": int32 [n, max_length], "attention_mask": int32 [n, max_length]}`.

    Raises:
        TypeError: naming the index of the first text that is not a `str`.
        ValueError: if `max_length` is not positive.
    """
    if max_length < 1:
        raise ValueError(f"max_length={max_length} must be positive.")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(
                f"texts[{i}] is {type(t).__name__} ({t!r}), not str; drop or convert missing "
                "values before encoding."
            )
    ids = np.zeros((len(texts), max_length), np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    if texts:
        encodings = _fixed_length(tokenizer, max_length).encode_batch(texts)
        ids[:] = [e.ids for e in encodings]
        mask[:] = [e.attention_mask for e in encodings]
    return {"input_ids": ids, "attention_mask": mask}
