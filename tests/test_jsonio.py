"""JSON on the hot paths: orjson, and Python's json module for what orjson refuses."""

from __future__ import annotations

import json
import math

import pytest

from sideband import jsonio


class Score(float):
    """A float subclass, like numpy.float64."""


@pytest.mark.parametrize(
    "value",
    [
        {"type": "x", "text": "caf\udce9.txt"},  # a lone surrogate (surrogateescape)
        {"n": 2**70},
        {"scores": {1: "one"}},
        {"score": Score(0.5)},
    ],
    ids=["surrogate", "bigint", "int-key", "float-subclass"],
)
def test_dumps_writes_what_only_pythons_encoder_writes(value: dict[str, object]) -> None:
    data = jsonio.dumps(value)
    assert json.loads(data) == json.loads(json.dumps(value))


def test_dumps_is_compact_utf8_and_raises_for_what_nobody_writes() -> None:
    assert jsonio.dumps({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()
    with pytest.raises(TypeError):
        jsonio.dumps({"a": object()})


def test_loads_reads_what_only_pythons_parser_reads() -> None:
    assert jsonio.loads(b'{"n": 1180591620717411303424}') == {"n": 2**70}
    assert math.isnan(jsonio.loads(b'{"x": NaN}')["x"])
    assert jsonio.loads('{"t": "\\udce9"}') == {"t": "\udce9"}


@pytest.mark.parametrize("data", [b"{", b"not json", b"[" * 100_000 + b"]" * 100_000])
def test_loads_raises_value_error_for_anything_else(data: bytes) -> None:
    with pytest.raises(ValueError):
        jsonio.loads(data)
