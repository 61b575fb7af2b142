"""Typed options for ``get_config(arg)``: ``--config=configs/x.py:quick,method=bitfit``."""

from __future__ import annotations

import types

__all__ = ["parse"]


def parse(arg: str | None, **defaults) -> types.SimpleNamespace:
    """Parses ``"a=1,flag"`` into a namespace typed after ``defaults``.

    A bare name sets a boolean option to True. An unknown option or a value that does not parse
    as its default's type is an error naming it.

    >>> parse("quick,steps=3", quick=False, steps=10, method="full")
    namespace(quick=True, steps=3, method='full')
    """
    opts = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(
                f"unknown config option {key!r} in {arg!r}; options are: {', '.join(defaults)}"
            )
        kind = type(defaults[key])
        if not eq:
            if kind is not bool:
                raise ValueError(f"config option {key!r} needs a value: {key}=<{kind.__name__}>")
            opts[key] = True
        elif kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config option {key}={value!r}: expected true or false")
            opts[key] = value.lower() in ("true", "1")
        else:
            try:
                opts[key] = kind(value)
            except ValueError:
                raise ValueError(
                    f"config option {key}={value!r}: expected a {kind.__name__}"
                ) from None
    return types.SimpleNamespace(**opts)
