"""JSON in and out on the hot paths: orjson, with Python's own json module for what orjson refuses."""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["dumps", "loads"]


def dumps(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON. orjson refuses a few things Python's encoder writes (a lone
    surrogate, an integer over 64 bits, a non-string key, a float subclass such as numpy's): those go
    through Python's encoder. What neither can write raises :exc:`TypeError`."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":")).encode()


def loads(data: bytes | str) -> Any:
    """Parse JSON; what orjson refuses but Python reads (``NaN``, integers over 64 bits, lone
    surrogates) is read by Python's parser. Raises :exc:`ValueError` for anything that is not JSON
    (nesting too deep for Python's parser included)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            return json.loads(data)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
