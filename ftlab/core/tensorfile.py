"""Safetensors files that know when their bytes changed, and JSON files that name themselves.

Safetensors checks its header but not the data: a flipped bit in a tensor's bytes loads as a
different number (a weight of 1.7e38, say) without a word. :func:`save` therefore records a
sha256 of every tensor's bytes in the file's ``__metadata__`` (key ``sha256:<name>``, so any
safetensors reader still reads the file) and :func:`load` verifies them. Every failure to read
(a missing digest, a digest that does not match, a truncated file, bad JSON) is a
:class:`CorruptFileError` that names the file and, where there is one, the tensor.

The digest helpers work on any flat ``{name: array}`` dict, so other formats (per-leaf checksums
of a checkpoint) can reuse them::

    sums = tensorfile.digests(partition.flatten(params))          # {name: hex sha256}
    tensorfile.verify(partition.flatten(restored), sums, where="checkpoint 1000")
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "DIGEST_PREFIX",
    "CorruptFileError",
    "digest",
    "digests",
    "load",
    "read_json",
    "save",
    "verify",
]

# Metadata key of a tensor's digest: "sha256:" + tensor name.
DIGEST_PREFIX = "sha256:"


class CorruptFileError(ValueError):
    """A file could not be read back as written: bad digest, truncated data, or bad JSON."""


def digest(array: Any) -> str:
    """The hex sha256 of an array's bytes in C order (what safetensors stores).

    Shape and dtype are not hashed: a safetensors header holds them, and a reader checks them
    against what it expects.

    >>> digest(np.zeros(2, np.float32))[:16]
    'af5570f5a1810b7a'
    """
    return hashlib.sha256(np.ascontiguousarray(np.asarray(array)).tobytes()).hexdigest()


def digests(flat: Mapping[str, Any]) -> dict[str, str]:
    """``{name: digest(array)}`` for a flat dict of arrays (e.g. ``partition.flatten(params)``)."""
    return {name: digest(array) for name, array in flat.items()}


def verify(flat: Mapping[str, Any], expected: Mapping[str, str], *, where: str) -> None:
    """Checks arrays against digests from :func:`digests`.

    Args:
      flat: ``{name: array}`` as read back.
      expected: ``{name: hex sha256}`` as recorded when written.
      where: the file or checkpoint to name in errors.

    Raises:
      CorruptFileError: a name is in one dict and not the other, or an array's bytes changed.
    """
    missing = sorted(set(flat) - set(expected))
    extra = sorted(set(expected) - set(flat))
    if missing or extra:
        raise CorruptFileError(
            f"{where}: the recorded digests do not cover the tensors: no digest for {missing[:5]}, "
            f"digest without tensor for {extra[:5]}; the file was changed after it was written."
        )
    for name, array in flat.items():
        actual = digest(array)
        if actual != expected[name]:
            raise CorruptFileError(
                f"{where}: tensor {name!r} is corrupt: its sha256 is {actual[:12]}..., the file "
                f"recorded {expected[name][:12]}... when it was written. Restore the file from "
                "a good copy."
            )


def save(
    path: str | pathlib.Path,
    flat_arrays: Mapping[str, Any],
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes ``{name: array}`` as a safetensors file with a sha256 per tensor in its metadata.

    Args:
      path: the file to write (its folder must exist).
      flat_arrays: tensor name -> array (numpy or jax; written as numpy in C order).
      metadata: extra ``__metadata__`` strings (e.g. ``{"format": "pt"}``); keys must not start
        with :data:`DIGEST_PREFIX`.

    Raises:
      ValueError: a metadata key or value is not a string, or a key starts with ``sha256:``.
    """
    from safetensors import numpy as safetensors_numpy  # noqa: PLC0415 (optional dependency)

    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not (isinstance(key, str) and isinstance(value, str)):
            raise ValueError(f"metadata[{key!r}] = {value!r}: safetensors metadata holds strings.")
        if key.startswith(DIGEST_PREFIX):
            raise ValueError(f"metadata[{key!r}]: keys starting {DIGEST_PREFIX!r} are reserved.")
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flat_arrays.items()}
    metadata.update({DIGEST_PREFIX + k: v for k, v in digests(arrays).items()})
    safetensors_numpy.save_file(arrays, str(path), metadata=metadata)


def load(
    path: str | pathlib.Path, *, missing_digests: str = "raise"
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads a safetensors file and verifies the digests :func:`save` recorded.

    Args:
      path: the file.
      missing_digests: what to do with a file that holds no digest at all (written by another
        tool, e.g. HF PEFT, or before digests were recorded): ``"raise"``, ``"warn"`` (load it
        unverified with a `UserWarning` naming the file) or ``"ignore"``. Digests that are
        present are always verified.

    Returns:
      ``(arrays, metadata)``: ``{name: numpy array}`` and the ``__metadata__`` strings other
      than the digests.

    Raises:
      FileNotFoundError: the file does not exist.
      CorruptFileError: the file is truncated or not safetensors, has no digests (with
        ``missing_digests="raise"``), or a digest does not match; the message names the file
        and the tensor.
      ValueError: ``missing_digests`` is not one of the three values.
    """
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415 (optional dependency)

    if missing_digests not in ("raise", "warn", "ignore"):
        raise ValueError(
            f"missing_digests={missing_digests!r}; expected 'raise', 'warn' or 'ignore'."
        )
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing.")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = dict(f.metadata() or {})
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except SafetensorError as e:
        raise CorruptFileError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None
    recorded = {k[len(DIGEST_PREFIX) :]: v for k, v in meta.items() if k.startswith(DIGEST_PREFIX)}
    rest = {k: v for k, v in meta.items() if not k.startswith(DIGEST_PREFIX)}
    if recorded:
        verify(arrays, recorded, where=str(path))
    elif missing_digests != "ignore":
        message = (
            f"{path}: holds no sha256 digests, so a changed byte in its data would go unnoticed; "
            "write it again with ftlab (ftlab.core.tensorfile.save) to record them."
        )
        if missing_digests == "raise":
            raise CorruptFileError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return arrays, rest


def read_json(path: str | pathlib.Path, *, what: str = "JSON file") -> Any:
    """Reads a JSON file; bad JSON is an error naming the file, the line and the column.

    Args:
      path: the file.
      what: what the file is, for the error (e.g. ``"adapter config"``).

    Raises:
      FileNotFoundError: the file does not exist.
      CorruptFileError: the file is not UTF-8 JSON.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorruptFileError(
            f"{path}: not a valid {what}: {e.msg} at line {e.lineno}, column {e.colno}."
        ) from None
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{path}: not a valid {what}: not UTF-8 text ({e}).") from None
