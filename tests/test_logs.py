"""Logging setup: our lines, the libraries' lines in the same shape, and the app's own logging left alone."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import io
import json
import logging
import uuid
from collections.abc import Iterator

import aiohttp
import pytest
import structlog

from sideband.logs import configure_logging, logging_configured

from .conftest import Stack


@pytest.fixture
def restored() -> Iterator[None]:
    """Whatever configure_logging changes, put back for the other tests."""
    config = structlog.get_config()
    loggers = [logging.getLogger(name) for name in ("aiohttp", "asyncio", "websockets", "")]
    saved = [(lg, list(lg.handlers), lg.propagate, lg.level) for lg in loggers]
    try:
        yield
    finally:
        structlog.configure(**config)
        for lg, handlers, propagate, level in saved:
            lg.handlers[:] = handlers
            lg.propagate, lg.level = propagate, level


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_library_errors_are_lines_like_ours_at_the_configured_level(restored: None) -> None:
    out = io.StringIO()
    configure_logging("json", "error", stream=out)
    configure_logging("json", "error", stream=out)  # idempotent: one handler, one line per record
    try:
        raise ConnectionResetError("peer gone")
    except ConnectionResetError:
        logging.getLogger("aiohttp.server").exception("Error handling request from %s", "127.0.0.1")
    logging.getLogger("aiohttp.server").warning("below SIDEBAND_LOG_LEVEL=error")
    structlog.get_logger(component="sideband.edge").error("http.internal_error")
    got = lines(out)
    assert [(e["event"], e["level"], e["component"]) for e in got] == [
        ("Error handling request from 127.0.0.1", "error", "aiohttp.server"),
        ("http.internal_error", "error", "sideband.edge"),
    ]
    assert "ConnectionResetError: peer gone" in str(got[0]["exception"]) and "timestamp" in got[0]


def test_the_apps_own_logging_setup_still_works(restored: None) -> None:
    out, own = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    root.handlers.clear()
    configure_logging("json", "info", stream=out)  # `sideband serve` does this before importing the app
    logging.basicConfig(level=logging.INFO, stream=own)  # what an app module may do at import
    logging.getLogger("myapp").info("order 42 stored")
    assert "order 42 stored" in own.getvalue() and out.getvalue() == ""


def test_console_lines_never_carry_raw_control_characters(restored: None) -> None:
    """Caller data (a SIP From, a transcript) must not reach the operator's terminal as escape sequences."""
    out = io.StringIO()
    configure_logging("console", "info", stream=out)
    hostile = "\x1b]0;pwned\x07\x1b[2J\u2028"  # retitle the window, clear the screen
    structlog.get_logger().info("call.incoming", from_number=hostile, to_number="+18005550100")
    line = out.getvalue()
    assert "\x1b" not in line and "\x07" not in line and "\u2028" not in line
    assert "\\x1b]0;pwned\\x07\\x1b[2J\\u2028" in line and "+18005550100" in line


def test_console_tracebacks_keep_their_lines_and_lose_their_escapes(restored: None) -> None:
    out = io.StringIO()
    configure_logging("console", "info", stream=out)
    try:
        raise ValueError("caller said \x1b]0;pwned\x07")
    except ValueError:
        structlog.get_logger().exception("tool.finished", stack="line one\n  line two")
    text = out.getvalue()
    assert "\x1b" not in text and "\x07" not in text
    assert "line one\n  line two" in text  # a block of lines, as before
    assert "Traceback (most recent call last):\n" in text and "\\x1b]0;pwned\\x07" in text


async def test_a_request_aiohttp_cannot_parse_is_a_warning_without_traceback(
    restored: None, stack: Stack
) -> None:
    """Any client could otherwise write error-level tracebacks into the log, one per request."""
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    headers = {"content-type": "application/json", "content-encoding": "br"}  # not decodable here
    async with (
        aiohttp.ClientSession() as http,
        http.post(stack.webhook_url, data=b"{}", headers=headers) as r,
    ):
        assert r.status == 400
    mine = [line for line in lines(out) if line.get("component") == "aiohttp.server"]
    assert [(line["level"], line["event"][:35]) for line in mine] == [
        ("warning", "bad request: ContentEncodingError: ")
    ]
    assert "exception" not in mine[0]


def test_console_lines_escape_invisible_characters_too(restored: None) -> None:
    """A right-to-left override or a zero-width space in a caller's number would show it as another."""
    out = io.StringIO()
    configure_logging("console", "info", stream=out)
    structlog.get_logger().info("call.incoming", from_number="\u202e0010-555-1415+\u200b")
    line = out.getvalue()
    assert "\u202e" not in line and "\u200b" not in line
    assert "\\u202e0010-555-1415+\\u200b" in line


def test_a_body_aiohttp_fails_to_decode_is_a_warning_without_traceback(restored: None) -> None:
    from aiohttp.web_protocol import RequestPayloadError

    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    try:
        raise RequestPayloadError("400, message: Can not decode content-encoding: gzip")
    except RequestPayloadError:
        logging.getLogger("aiohttp.server").exception("Unhandled exception")
    (line,) = lines(out)
    assert line["level"] == "warning" and str(line["event"]).startswith("bad request: RequestPayloadError")
    assert "exception" not in line


class Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


@pytest.mark.parametrize(
    "fields",
    [
        {"call_id": "rtc_1", "duration_ms": 1.25, "tools": ["a", "b"], "ok": True, "none": None},
        {"text": "Grüße, 東京 — ça va?"},  # non-ASCII: escaped, as the standard encoder writes it
        {"text": "\x1b]0;owned\x07 and \u202e and \x7f and \x9b"},  # controls, bidi, DEL, C1
        {"text": "rub\x7fout"},  # DEL alone: ASCII, yet not printable
        {"text": "half a pair \ud83d"},  # a lone surrogate (the standard decoder lets them through)
        {"big": 2**70, "keys": {1: "one"}},  # an int over 64 bits, a key that is not a string
        {"thing": Opaque()},
    ],
)
def test_json_lines_are_printable_ascii_json(restored: None, fields: dict[str, object]) -> None:
    out = io.StringIO()
    configure_logging("json", "info", out)
    structlog.get_logger().info("probe", **fields)
    line = out.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    assert line.isascii() and all(ch.isprintable() for ch in line[:-1]), line
    parsed = json.loads(line)
    expected = json.loads(json.dumps(fields, default=repr))
    assert {k: parsed[k] for k in fields} == expected
    assert parsed["event"] == "probe" and parsed["level"] == "info" and parsed["timestamp"].endswith("Z")


def test_a_value_has_one_form_whatever_else_the_line_holds(restored: None) -> None:
    """orjson renders a line; the standard encoder only one orjson refuses. A field's form must not hang
    on its neighbours: dates, UUIDs, enums, dataclasses, named tuples and float subclasses come out the
    same beside plain ASCII, beside a caller's non-ASCII text, and beside an integer orjson refuses."""

    class Ratio(float):
        pass

    class Kind(enum.Enum):
        SIP = "sip"

    @dataclasses.dataclass
    class Point:
        x: int

    pair = collections.namedtuple("pair", "a b")
    fields = {
        "when": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "id": uuid.UUID(int=7),
        "kind": Kind.SIP,
        "at": Point(3),
        "pair": pair(1, 2),
        "ratio": Ratio(0.5),
    }
    out = io.StringIO()
    configure_logging("json", "info", out)
    log = structlog.get_logger()
    for other in ({"caller": "Bob"}, {"caller": "Zoë 😀"}, {"caller": "Bob", "big": 2**70}):
        log.info("probe", **fields, **other)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["caller"] for line in lines] == ["Bob", "Zoë 😀", "Bob"]
    expected = {
        "when": "2026-01-02T03:04:05+00:00",
        "id": "00000000-0000-0000-0000-000000000007",
        "kind": "sip",
        "at": {"x": 3},
        "pair": [1, 2],
        "ratio": 0.5,
    }
    assert all({k: line[k] for k in fields} == expected for line in lines), lines
    assert "\\u00eb \\ud83d\\ude00" in out.getvalue().splitlines()[1]  # escaped as the standard encoder does


def test_logging_configured_leaves_structlog_as_it_found_it_even_unconfigured() -> None:
    """An app that configures structlog only ``if not structlog.is_configured()`` still gets to."""
    suite = structlog.get_config()
    try:
        structlog.reset_defaults()
        assert not structlog.is_configured()
        with logging_configured("json", "info", io.StringIO()):
            assert structlog.is_configured()
        assert not structlog.is_configured()
    finally:
        structlog.configure(**suite)


class FailingStream(io.StringIO):
    """A stream whose writes fail with ``error`` from the ``after``-th on (the reader gone, a disk full)."""

    def __init__(self, error: OSError, after: int = 0) -> None:
        super().__init__()
        self.error, self.after = error, after

    def write(self, text: str) -> int:
        if self.after <= 0:
            raise self.error
        self.after -= 1
        return super().write(text)


@pytest.mark.parametrize(
    "error", [BrokenPipeError(32, "Broken pipe"), OSError(28, "No space left on device")]
)
def test_a_line_the_stream_cannot_take_is_dropped_not_raised(
    restored: None, error: OSError, capsys: pytest.CaptureFixture[str]
) -> None:
    """A log call must never fail what logged it (a call's task, a request): the line is dropped, and
    stderr says so once."""
    out = FailingStream(error, after=1)
    configure_logging("json", "info", stream=out)
    log = structlog.get_logger(component="sideband.test")
    log.info("first")
    log.info("lost")
    log.error("lost too")
    logging.getLogger("aiohttp.server").error("a library's, lost")
    assert [e["event"] for e in lines(out)] == ["first"]
    assert capsys.readouterr().err.splitlines() == [f"sideband: log lines are dropped: {error.strerror}"]


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_field_no_renderer_can_take_is_written_as_a_note_not_raised(restored: None, fmt: str) -> None:
    """A tool's own log line with a cyclic structure, or an object whose ``repr`` raises, must not fail
    the tool: the line is written, such a field as its ``repr`` or a note naming its type."""
    out = io.StringIO()
    configure_logging(fmt, "info", stream=out)  # type: ignore[arg-type]
    cyclic: dict[str, object] = {"order": 7}
    cyclic["self"] = cyclic
    log = structlog.get_logger(component="sideband.test")
    log.info("cyclic", field=cyclic, n=3)
    log.info("bad repr", field=_BadRepr(), n=4)
    log.info("after")
    written = out.getvalue().splitlines()
    assert len(written) == 3, written
    if fmt == "json":
        first, second, third = (json.loads(line) for line in written)
        assert first["event"] == "cyclic" and first["n"] == 3 and "{...}" in first["field"]
        assert second["event"] == "bad repr" and second["field"] == "<unrenderable _BadRepr>"
        assert second["n"] == 4 and third["event"] == "after"
    else:
        assert "cyclic" in written[0] and "{...}" in written[0]
        assert "bad repr" in written[1] and "<unrenderable _BadRepr>" in written[1]
        assert "after" in written[2]


def test_a_line_to_a_closed_stream_is_dropped_not_raised(
    restored: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The log stream closed under the server (by an app's code, or at interpreter exit): a call that
    logs goes on, its lines dropped, and stderr says so once."""
    out = io.StringIO()
    configure_logging("console", "info", stream=out)
    log = structlog.get_logger(component="sideband.test")
    log.info("first")
    assert "first" in out.getvalue()
    out.close()
    log.info("lost", text="José")
    log.error("lost too")
    logging.getLogger("aiohttp.server").error("a library's, lost")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("sideband: log lines are dropped: the stream is closed")


def test_a_log_whose_reader_is_gone_goes_nowhere_from_then_on(restored: None) -> None:
    """``sideband serve | head``: once the pipe's reader is gone, its lines (and what is still buffered,
    flushed at exit) go to /dev/null instead of failing every write."""
    import os

    read, write = os.pipe()
    with open(write, "w") as out:
        configure_logging("json", "info", stream=out)
        log = structlog.get_logger(component="sideband.test")
        log.info("read")
        assert b'"event":"read"' in os.read(read, 1000)
        os.close(read)  # the reader is gone
        log.info("gone")
        assert os.path.samestat(os.fstat(out.fileno()), os.stat(os.devnull))
        log.info("gone too")
        out.write("buffered")  # and flushed as the stream closes: no BrokenPipeError either


@pytest.mark.parametrize(
    ("encoding", "written"),
    [
        ("ascii", "Jos\\xe9 \\u2192 caf\\xe9"),
        ("latin-1", "José \\u2192 café"),
        ("cp1252", "José \\u2192 café"),
        ("cp437", "José \\u2192 café"),
        ("koi8_r", "Jos\\xe9 \\u2192 caf\\xe9"),  # (a code page its error calls "charmap")
    ],
)
def test_a_console_line_the_stream_cannot_encode_is_written_escaped(
    restored: None, encoding: str, written: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A caller's "José" on an ASCII or Latin-1 locale (or ``PYTHONIOENCODING``, a cp1252 console):
    what the stream's encoding cannot hold is escaped, never raised into the call that logged it."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding=encoding)
    configure_logging("console", "info", stream=out)
    structlog.get_logger(component="sideband.test").info("transcript", text="José → café")
    logging.getLogger("aiohttp.server").error("a library's: José → café")
    structlog.get_logger(component="sideband.test").info("after")
    text = raw.getvalue().decode(encoding)
    mine, library, after = text.splitlines()
    assert "transcript" in mine and written in mine
    assert "a library's: " + written in library and "aiohttp.server" in library
    assert "after" in after
    assert capsys.readouterr().err == ""  # no "--- Logging error ---", no line said to be dropped


def test_a_json_line_the_standard_encoder_renders_holds_no_nan(restored: None) -> None:
    """A line orjson refuses (a lone surrogate) goes to the standard encoder, which would write ``NaN``
    and ``Infinity``: not JSON. A float that is not finite is ``null`` there, as orjson writes it."""

    @dataclasses.dataclass
    class Param:
        value: float

    fields = {
        "param": float("nan"),
        "limits": [float("inf"), -float("inf"), 1.5],
        "nested": {"at": Param(float("nan")), "pair": (float("nan"), 2)},
    }
    out = io.StringIO()
    configure_logging("json", "info", out)
    log = structlog.get_logger()
    log.info("probe", **fields, text="fine")  # orjson renders it
    log.info("probe", **fields, text="half a pair \ud83d")  # the standard encoder renders it

    def refuse(constant: str) -> None:
        raise AssertionError(f"not JSON: {constant}")

    parsed = [json.loads(line, parse_constant=refuse) for line in out.getvalue().splitlines()]
    expected = {
        "param": None,
        "limits": [None, None, 1.5],
        "nested": {"at": {"value": None}, "pair": [None, 2]},
    }
    assert [{k: line[k] for k in fields} for line in parsed] == [expected, expected]
    assert parsed[1]["text"] == "half a pair \ud83d"
