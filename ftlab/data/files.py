"""A user's own data files: text classification, chat / instructions and preference pairs.

Formats, chosen by the file's suffix:
    `.csv`:               a header row, then one record per row (standard library `csv`).
    `.jsonl` / `.ndjson`: one JSON object per line (standard library `json`, line by line).
    `.parquet`:           a table read with `pyarrow` (an optional dependency, the `data` extra).

Why these readers and not Hugging Face `datasets` or grain: a bad row must be named by its file
and line (Parquet: row index), and `datasets` converts a whole file to Arrow first, losing line
numbers and turning a malformed row into a parser error about the whole file. grain's strength,
deterministic and checkpointable iteration, is already ftlab's: `ftlab.data.batching` makes every
batch a pure function of `(arrays, step, seed)`, so resuming is exact with no iterator state.
What this module produces is therefore plain Python lists and numpy arrays that feed
`batching.train_batch` / `batching.eval_batches` like the bundled data sets do.

Every `read_*` function is an explicit file loader; everything else is a pure function.
Errors name the file and line, e.g. `reviews.csv line 7: label 'neutral' is not one of [...]`.
"""

from __future__ import annotations

import csv
import json
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "FORMATS",
    "CHATML_TEMPLATE",
    "TextClassification",
    "Preferences",
    "read_rows",
    "read_classification",
    "seeded_split",
    "encode_classification",
    "read_chat",
    "chat_renderer",
    "assistant_spans",
    "encode_chat",
    "read_preferences",
    "encode_preferences",
]

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}

# ShareGPT's `from` values and the OpenAI roles they stand for.
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant"}
_ROLES = ("system", "user", "assistant")

# The fallback when a tokenizer folder has no chat template: ChatML, as the string the Jinja
# template of the same name renders (and the format SmolLM2 and Qwen were trained on).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TextClassification(NamedTuple):
    """Texts, int32 label ids, and the label names when the labels were strings.

    Attributes:
        text: The texts.
        label: int32 `[n]`; an index into `label_names`, or the file's own integer label.
        label_names: Sorted label strings (id = position), or None for integer labels.
    """

    text: list[str]
    label: np.ndarray
    label_names: tuple[str, ...] | None


class Preferences(NamedTuple):
    """Preference pairs: a prompt, the preferred response and the rejected one."""

    prompt: list[str]
    chosen: list[str]
    rejected: list[str]


def _format(path: pathlib.Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{path}: unknown file type {path.suffix!r}; expected one of {sorted(FORMATS)}."
        )
    return fmt


def read_rows(path: str | pathlib.Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields `(where, row)` for each record of a CSV, JSON Lines or Parquet file.

    `where` names the record for error messages: `"FILE line N"` (CSV: the line the record starts
    on, the header being line 1; JSON Lines: the line) or `"FILE row I"` (Parquet, 0-based).
    Blank lines of a JSON Lines file are skipped.

    Args:
        path: The file; its suffix picks the format (`FORMATS`).

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: for an unknown suffix, malformed JSON, a JSON line that is not an object, or a
            CSV record with more or fewer fields than the header, naming the file and line.
        ImportError: for Parquet when `pyarrow` is not installed.
    """
    path = pathlib.Path(path)
    fmt = _format(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    if fmt == "csv":
        with path.open(newline="", encoding="utf-8-sig") as f:  # Excel writes a BOM
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty CSV file (no header row).")
            line = reader.line_num + 1
            for record in reader:
                if len(record) != len(header):
                    raise ValueError(
                        f"{path} line {line}: {len(record)} fields, but the header has "
                        f"{len(header)} ({header})."
                    )
                yield f"{path} line {line}", dict(zip(header, record, strict=True))
                line = reader.line_num + 1
    elif fmt == "jsonl":
        with path.open(encoding="utf-8-sig") as f:
            for number, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {number}: malformed JSON ({e}).") from None
                if not isinstance(row, dict):
                    raise ValueError(
                        f"{path} line {number}: a JSON {type(row).__name__}, expected an object."
                    )
                yield f"{path} line {number}", row
    else:
        try:
            import pyarrow.parquet as pq  # noqa: PLC0415 (optional dependency)
        except ImportError as e:
            raise ImportError(
                f"{path}: reading Parquet needs pyarrow; `pip install pyarrow` (the `data` extra)."
            ) from e
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", row


def _field(where: str, row: Mapping[str, Any], column: str, argument: str) -> Any:
    if column not in row:
        raise ValueError(f"{where}: no column {column!r} ({argument}); the row has {sorted(row)}.")
    return row[column]


def _text(where: str, value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: {what} is {type(value).__name__} ({value!r}), expected a string."
        )
    if not value.strip():
        raise ValueError(f"{where}: {what} is empty.")
    return value


def read_classification(
    path: str | pathlib.Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> TextClassification:
    """Reads a text classification file.

    Labels are either strings or integers, decided by the arguments:
        neither `label_names` nor `num_classes`: strings, mapped to ids in sorted order; the
            sorted names are returned (pass them as `label_names` when reading the other splits).
        `label_names`: strings, each of which must be one of them; id = position in the list.
        `num_classes`: integers in `[0, num_classes)` (a CSV cell must be a decimal integer).

    Args:
        path: A CSV, JSON Lines or Parquet file (`read_rows`).
        text_column: The column holding the text.
        label_column: The column holding the label.
        label_names: The label set, for string labels.
        num_classes: The number of classes, for integer labels.

    Returns:
        A `TextClassification`.

    Raises:
        ValueError: if both `label_names` and `num_classes` are given, if the file has no rows,
            or, naming the file and line, for a missing column, a text that is not a string or is
            empty, or a label of the wrong type or outside the label set.
    """
    if label_names is not None and num_classes is not None:
        raise ValueError(
            "pass label_names (string labels) or num_classes (integer labels), not both."
        )
    if label_names is not None and len(set(label_names)) != len(label_names):
        raise ValueError(f"label_names={list(label_names)} has duplicates.")
    texts, labels = [], []
    for where, row in read_rows(path):
        texts.append(_text(where, _field(where, row, text_column, "text_column"), "text"))
        label = _field(where, row, label_column, "label_column")
        if num_classes is not None:
            if isinstance(label, str) and label.strip().lstrip("-").isdigit():
                label = int(label)
            if not isinstance(label, int | np.integer) or isinstance(label, bool):
                raise ValueError(
                    f"{where}: label {label!r} is not an integer (num_classes={num_classes})."
                )
            if not 0 <= label < num_classes:
                raise ValueError(
                    f"{where}: label {label} is outside [0, num_classes={num_classes})."
                )
        elif not isinstance(label, str):
            raise ValueError(
                f"{where}: label {label!r} is {type(label).__name__}; string labels are expected "
                "(pass num_classes for integer labels)."
            )
        elif not label.strip():
            raise ValueError(f"{where}: label is empty.")
        elif label_names is not None and label not in label_names:
            raise ValueError(
                f"{where}: label {label!r} is not one of label_names={list(label_names)}."
            )
        labels.append(label)
    if not texts:
        raise ValueError(f"{path}: no rows.")
    if num_classes is not None:
        return TextClassification(texts, np.asarray(labels, np.int32), None)
    names = tuple(label_names) if label_names is not None else tuple(sorted(set(labels)))
    index = {name: i for i, name in enumerate(names)}
    return TextClassification(texts, np.asarray([index[x] for x in labels], np.int32), names)


def seeded_split(
    data: TextClassification, fractions: Mapping[str, float], *, seed: int
) -> dict[str, TextClassification]:
    """Splits one file's rows by a seeded permutation (the same on every machine).

    Args:
        data: The rows.
        fractions: Split name -> fraction of the rows, summing to 1, e.g.
            `{"train": 0.8, "validation": 0.1, "test": 0.1}`; rounding goes to the last split.
        seed: Permutation seed.

    Returns:
        Split name -> its rows (label names shared).

    Raises:
        ValueError: if a fraction is not in (0, 1), they do not sum to 1, or a split gets no rows.
    """
    if not fractions:
        raise ValueError("fractions is empty.")
    for name, frac in fractions.items():
        if not 0 < frac < 1 and len(fractions) > 1:
            raise ValueError(f"fractions[{name!r}]={frac} must be in (0, 1).")
    if abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"fractions={dict(fractions)} sum to {sum(fractions.values())}, not 1.")
    n = len(data.text)
    perm = np.random.default_rng(seed).permutation(n)
    names = list(fractions)
    bounds = np.round(np.cumsum([fractions[k] for k in names]) * n).astype(int)
    bounds[-1] = n
    out, start = {}, 0
    for name, stop in zip(names, bounds, strict=True):
        idx = perm[start:stop]
        if not len(idx):
            raise ValueError(
                f"fractions[{name!r}]={fractions[name]} of {n} rows is no rows; use more data."
            )
        out[name] = TextClassification(
            [data.text[i] for i in idx], data.label[idx], data.label_names
        )
        start = stop
    return out


def encode_classification(
    tokenizer: Any, data: TextClassification, *, max_length: int
) -> dict[str, np.ndarray]:
    """`{"input_ids", "attention_mask", "label"}` arrays for `batching`, via `text.encode`."""
    from ftlab.data import text  # noqa: PLC0415 (keeps this module importable on its own)

    return {**text.encode(tokenizer, data.text, max_length=max_length), "label": data.label}


def _messages(where: str, row: Mapping[str, Any]) -> list[dict[str, str]]:
    if ("messages" in row) == ("conversations" in row):
        raise ValueError(
            f"{where}: a row needs exactly one of 'messages' (OpenAI) or 'conversations' "
            f"(ShareGPT); it has {sorted(row)}."
        )
    sharegpt = "conversations" in row
    turns = row["conversations" if sharegpt else "messages"]
    key = "conversations" if sharegpt else "messages"
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: {key} must be a non-empty list, got {turns!r}.")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise ValueError(
                f"{where}: {key}[{i}] must be an object with {role_key!r} and {content_key!r}; "
                f"got {turn!r}."
            )
        extra = sorted(set(turn) - {role_key, content_key})
        if extra:  # e.g. OpenAI's name / tool_calls: the rendered text would silently drop them
            raise ValueError(
                f"{where}: {key}[{i}] has field(s) {extra} that cannot take effect; a turn holds "
                f"only {role_key!r} and {content_key!r}."
            )
        role = turn[role_key]
        known = _SHAREGPT_ROLES if sharegpt else {r: r for r in _ROLES}
        if role not in known:
            raise ValueError(
                f"{where}: {key}[{i}] has {role_key}={role!r}; expected one of {sorted(known)}."
            )
        content = turn[content_key]
        if not isinstance(content, str):
            raise ValueError(
                f"{where}: {key}[{i}].{content_key} is {type(content).__name__}, expected a string."
            )
        out.append({"role": known[role], "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: {key} has no assistant turn, so nothing to learn from.")
    return out


def read_chat(path: str | pathlib.Path) -> list[list[dict[str, str]]]:
    """Reads conversations, each a list of `{"role", "content"}` messages.

    A row holds either `messages` (OpenAI style: `role` in system/user/assistant, `content`) or
    `conversations` (ShareGPT: `from` in system/human/gpt, also `user`; `value`), converted to the
    OpenAI form. JSON Lines or Parquet (a CSV cell cannot hold a list).

    Raises:
        ValueError: naming the file and line for a row with neither or both keys, an empty list,
            a turn without its two fields or with any other, an unknown role / `from`, a
            non-string content, or no assistant turn; and for a CSV file or a file with no rows.
    """
    path = pathlib.Path(path)
    if _format(path) == "csv":
        raise ValueError(
            f"{path}: chat data needs JSON Lines or Parquet; a CSV cell holds no list."
        )
    out = [_messages(where, row) for where, row in read_rows(path)]
    if not out:
        raise ValueError(f"{path}: no rows.")
    return out


def chat_renderer(
    chat_template: str | None = None, **special_tokens: str
) -> Callable[[Sequence[Mapping[str, str]], bool], str]:
    """`render(messages, add_generation_prompt) -> str` from a Jinja chat template.

    Rendered as `transformers` does: a sandboxed Jinja environment with `trim_blocks` and
    `lstrip_blocks`, a `raise_exception` function, and `special_tokens` (e.g. `bos_token="<s>"`)
    as variables.

    Args:
        chat_template: The template (`TokenizerFiles.chat_template`); None: `CHATML_TEMPLATE`.
        **special_tokens: Extra template variables.
    """
    import jinja2.sandbox  # noqa: PLC0415 (only chat data needs it)

    def raise_exception(message):
        raise ValueError(f"chat_template raised: {message}")

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(CHATML_TEMPLATE if chat_template is None else chat_template)

    def render(messages, add_generation_prompt=False):
        return template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **special_tokens
        )

    return render


def assistant_spans(render, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans ``[(start, end), ...]`` of its
    assistant turns: what `encode_chat` (and `ftlab.posttrain.sft.pack`) train on.

    The text of turn i is what rendering ``messages[:i+1]`` adds to ``messages[:i]`` (with the
    generation prompt, so an assistant span starts after its header and keeps its end token).

    >>> def render(messages, prompt):  # an assistant turn is "A:" + content + "|"
    ...     turn = lambda m: ("A:" if m["role"] == "assistant" else "") + m["content"] + "|"
    ...     return "".join(map(turn, messages)) + ("A:" if prompt else "")
    >>> assistant_spans(render, [{"role": "user", "content": "hi"},
    ...                          {"role": "assistant", "content": "yo"}])
    ('hi|A:yo|', [(5, 8)])

    Raises:
        ValueError: The template does not render conversations prefix by prefix.
    """
    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise ValueError(
                "the chat template does not render conversations prefix by prefix, so the "
                "assistant turns cannot be located in the text."
            )
        spans.append((len(before), len(upto)))
    return full, spans


def encode_chat(
    tokenizer: Any,
    conversations: Sequence[Sequence[Mapping[str, str]]],
    *,
    max_length: int,
    pad_id: int,
    render: Callable[[Sequence[Mapping[str, str]], bool], str] | None = None,
) -> dict[str, np.ndarray]:
    """Tokenises conversations with a loss mask over the assistant tokens only.

    Each conversation is rendered to one string (`render`, default ChatML), tokenised once
    without the tokenizer's own special tokens (the template writes them), truncated to
    `max_length` and right-padded with `pad_id`. A token is in the loss mask when its characters
    lie in an assistant turn's content or end-of-turn marker (not its role header).

    Args:
        tokenizer: A `tokenizers.Tokenizer`; its padding and truncation settings are not used.
        conversations: From `read_chat`.
        max_length: Tokens per row.
        pad_id: The padding token id.
        render: From `chat_renderer`; None: `chat_renderer()` (ChatML).

    Returns:
        `{"input_ids", "attention_mask", "loss_mask"}`, int32 `[n, max_length]`.

    Raises:
        ValueError: if `max_length` is not positive, or naming the conversation whose assistant
            tokens all fall beyond `max_length`.
    """
    import tokenizers  # noqa: PLC0415

    if max_length < 1:
        raise ValueError(f"max_length={max_length} must be positive.")
    render = render or chat_renderer()
    tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    n = len(conversations)
    out = {
        k: np.zeros((n, max_length), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")
    }
    out["input_ids"][:] = pad_id
    for row, messages in enumerate(conversations):
        text, spans = assistant_spans(render, messages)
        enc = tok.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids[:max_length], enc.offsets[:max_length]
        out["input_ids"][row, : len(ids)] = ids
        out["attention_mask"][row, : len(ids)] = 1
        out["loss_mask"][row, : len(ids)] = [
            any(s <= a and b <= e and b > a for s, e in spans) for a, b in offsets
        ]
        if not out["loss_mask"][row].any():
            raise ValueError(
                f"conversations[{row}]: no assistant token within max_length={max_length} "
                f"tokens (the conversation has {len(enc.ids)})."
            )
    return out


def read_preferences(
    path: str | pathlib.Path,
    *,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
) -> Preferences:
    """Reads preference pairs: non-empty string `prompt`, `chosen` and `rejected` per row.

    Raises:
        ValueError: naming the file and line for a missing column or a value that is not a
            non-empty string, and for a file with no rows.
    """
    columns = {"prompt": prompt_column, "chosen": chosen_column, "rejected": rejected_column}
    out = {k: [] for k in columns}
    for where, row in read_rows(path):
        for key, column in columns.items():
            out[key].append(_text(where, _field(where, row, column, f"{key}_column"), key))
    if not out["prompt"]:
        raise ValueError(f"{path}: no rows.")
    return Preferences(**out)


def encode_preferences(
    tokenizer: Any, data: Preferences, *, max_length: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Tokenises `prompt + chosen` and `prompt + rejected`, the loss mask on the response only.

    The strings are concatenated as they are (put any separator in the data), tokenised without
    the tokenizer's special tokens, truncated to `max_length` and padded with `pad_id`.

    Returns:
        `{"chosen_input_ids", "chosen_attention_mask", "chosen_loss_mask", "rejected_..."}`,
        int32 `[n, max_length]`.

    Raises:
        ValueError: naming the pair whose response lies wholly beyond `max_length`.
    """
    import tokenizers  # noqa: PLC0415

    if max_length < 1:
        raise ValueError(f"max_length={max_length} must be positive.")
    tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    n = len(data.prompt)
    out = {}
    for side, responses in (("chosen", data.chosen), ("rejected", data.rejected)):
        ids = np.full((n, max_length), pad_id, np.int32)
        mask = np.zeros((n, max_length), np.int32)
        loss = np.zeros((n, max_length), np.int32)
        for row, (prompt, response) in enumerate(zip(data.prompt, responses, strict=True)):
            enc = tok.encode(prompt + response, add_special_tokens=False)
            k = min(len(enc.ids), max_length)
            ids[row, :k] = enc.ids[:k]
            mask[row, :k] = 1
            loss[row, :k] = [a >= len(prompt) and b > a for a, b in enc.offsets[:k]]
            if not loss[row].any():
                raise ValueError(
                    f"pairs[{row}]: the {side} response lies beyond max_length={max_length} tokens."
                )
        out.update(
            {f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_loss_mask": loss}
        )
    return out
