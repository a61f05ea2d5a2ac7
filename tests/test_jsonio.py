"""JSON on the hot paths: orjson, and Python's json module for what orjson refuses."""

from __future__ import annotations

import json
import math

import orjson
import pytest

from sideband import jsonio


class Score(float):
    """A float subclass, like numpy.float64."""


@pytest.mark.parametrize(
    "value",
    [{"n": 2**70}, {"scores": {1: "one"}}, {"score": Score(0.5)}],
    ids=["bigint", "int-key", "float-subclass"],
)
def test_dumps_writes_what_only_pythons_encoder_writes(value: dict[str, object]) -> None:
    data = jsonio.dumps(value)
    assert json.loads(data) == json.loads(json.dumps(value))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"type": "x", "text": "caf\udce9.txt"}, {"type": "x", "text": "caf\ufffd.txt"}),  # surrogateescape
        ({"output": "ok \ud83d", "n": 1}, {"output": "ok \ufffd", "n": 1}),  # an emoji cut in half
        ({"output": "\ud83d\ude00"}, {"output": "\U0001f600"}),  # a pair split over two characters
        ({"\udce9": 1, float("nan"): 2, float("-inf"): 3}, {"\ufffd": 1, "NaN": 2, "-Infinity": 3}),
        (
            {"n": 2**70, "x": float("nan"), "y": [float("inf"), Score("-inf")]},
            {"n": 2**70, "x": None, "y": [None, None]},
        ),
    ],
    ids=["surrogateescape", "cut-emoji", "split-pair", "keys", "non-finite"],
)
def test_dumps_falls_back_to_valid_json_only(
    value: dict[object, object], expected: dict[str, object]
) -> None:
    """What orjson refuses is still written as strict JSON: a strict parser reads it back (a lone
    surrogate as U+FFFD, a non-finite float as null, as orjson writes one)."""
    data = jsonio.dumps(value)
    parsed = json.loads(data, parse_constant=lambda name: pytest.fail(f"{name} written"))
    assert orjson.loads(data).keys() == parsed.keys()  # (orjson refuses lone surrogate escapes)
    assert parsed.items() >= expected.items()


def test_dumps_raises_type_error_for_a_circular_or_too_deep_value() -> None:
    circular: list[object] = [2**70]
    circular.append(circular)
    deep: list[object] = [2**70]
    for _ in range(100_000):
        deep = [deep]
    for value in (circular, {"a": circular}, deep):
        with pytest.raises(TypeError):
            jsonio.dumps(value)
    shared = ["\udce9"]
    assert json.loads(jsonio.dumps([shared, shared])) == [["\ufffd"], ["\ufffd"]]  # (not a cycle)


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
