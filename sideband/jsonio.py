"""JSON in and out on the hot paths: orjson, with Python's own json module for what orjson refuses."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

__all__ = ["dumps", "loads"]


def dumps(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON, always valid JSON. orjson refuses a few things Python's encoder
    writes (a lone surrogate, an integer over 64 bits, a non-string key, a float subclass such as
    numpy's): those go through Python's encoder, written as orjson would write them where it can (a
    ``NaN`` or infinite float as ``null``) and a lone surrogate as U+FFFD (a surrogate pair split over
    two characters is joined). What neither can write (an object JSON has no form for, a circular or
    too deeply nested value) raises :exc:`TypeError`."""
    try:
        return orjson.dumps(value)
    except TypeError:
        pass
    try:
        clean = _clean(value, set())
        try:
            return orjson.dumps(clean, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:
            return json.dumps(clean, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except RecursionError:
        raise TypeError("the value is nested too deeply to be written as JSON") from None
    except ValueError as exc:  # (what _clean left: it walks dicts, lists and tuples only)
        raise TypeError(f"the value cannot be written as JSON: {exc}") from None


def _text(value: str) -> str:
    """``value`` as UTF-8 can carry it: a surrogate pair split over two characters joined, a lone
    surrogate replaced by U+FFFD."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return value


def _key(key: Any) -> Any:
    """A dict key as Python's encoder would write it, made writable (a string; a non-finite float's
    name, which it would write as a bare ``NaN`` key otherwise refused)."""
    if isinstance(key, str):
        return _text(key)
    if isinstance(key, float) and not math.isfinite(key):
        return "NaN" if math.isnan(key) else ("Infinity" if key > 0 else "-Infinity")
    return key


def _clean(value: Any, path: set[int]) -> Any:
    """``value`` with what would make Python's encoder write invalid JSON replaced: a non-finite float by
    ``None``, a string with surrogates by :func:`_text`'s. ``path``: the containers being walked (one met
    again is a cycle: :exc:`TypeError`)."""
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict | list | tuple):
        marker = id(value)
        if marker in path:
            raise TypeError("a circular value cannot be written as JSON")
        path.add(marker)
        try:
            if isinstance(value, dict):
                return {_key(k): _clean(v, path) for k, v in value.items()}
            return [_clean(v, path) for v in value]
        finally:
            path.discard(marker)
    return value


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
