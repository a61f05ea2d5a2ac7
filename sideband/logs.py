"""structlog setup: JSON lines (default when stdout is not a terminal) or a readable console."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import json
import logging
import math
import os
import re
import sys
import threading
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, Literal, TextIO

import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from sideband import blocking

__all__ = [
    "configure_logging",
    "describe",
    "failure_fields",
    "flush_or_drop",
    "logging_configured",
    "tell",
    "tell_dropped",
    "to_devnull",
]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _Output:
    """The one logger of the process, writing each line to its stream as structlog's ``PrintLogger`` does,
    but a line the stream cannot take (its reader gone: ``sideband serve | head``, a log collector that
    died; a full disk) is dropped, never raised into the call or request that logged it. Once the reader
    is gone the stream goes to /dev/null (what is buffered too, flushed at exit); stderr says so once. A
    closed stream drops its lines the same way."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._lock = threading.Lock()
        self._told = False

    def msg(self, message: str) -> None:
        """Write ``message`` as a line."""
        with self._lock:
            try:
                self.stream.write(message + "\n")
                self.stream.flush()
            except UnicodeEncodeError as exc:  # (a caller's "José" on an ASCII or Latin-1 console)
                try:
                    write_escaped(self.stream, message + "\n", exc)
                    self.stream.flush()
                except OSError as lost:
                    self.lost(lost)
                except UnicodeError:  # (not even ASCII: the line is dropped)
                    pass
                except ValueError as closed:
                    self.lost(OSError(f"the stream is closed ({closed})"))
            except OSError as exc:
                self.lost(exc)
            except ValueError as exc:  # (closed by code of the app's, or at interpreter exit)
                self.lost(OSError(f"the stream is closed ({exc})"))

    log = debug = info = warn = warning = fatal = failure = err = error = critical = exception = msg

    def lost(self, exc: OSError) -> None:
        """A line was dropped: the stream failed with ``exc``."""
        if isinstance(exc, BrokenPipeError):  # the reader is gone for good
            to_devnull(self.stream)
        if not self._told:
            self._told = True
            tell_dropped("log lines", self.stream, exc)


def to_devnull(stream: TextIO) -> None:
    """Point ``stream``'s file descriptor at /dev/null for good: what is written to it from now, what it
    still holds and its flush at exit go nowhere (no ``Exception ignored`` at exit). Nothing for a stream
    without a descriptor."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)


def tell(line: str) -> None:
    """Write ``line`` to stderr. Where stderr fails (a full disk, ``2>/dev/full``), it goes to /dev/null
    for good, what it still holds with it: nothing raised, and no failed flush at exit (status 120)."""
    if sys.stderr is None:
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        to_devnull(sys.stderr)
    except ValueError:  # (closed)
        pass


def flush_or_drop(*streams: TextIO) -> None:
    """Flush each of ``streams``; one that cannot take what it holds (a full disk) goes to /dev/null for
    good, so that the flush at exit does not fail (status 120, ``Exception ignored in <stdout>``)."""
    for stream in streams:
        try:
            stream.flush()
        except OSError:
            to_devnull(stream)
        except ValueError:  # (closed)
            pass


def tell_dropped(what: str, stream: TextIO, exc: OSError) -> None:
    """Say on stderr, in one line, that ``what`` (written to ``stream``) is dropped, ``stream`` having
    failed with ``exc``; nothing where stderr is that stream, or fails too (say with ``2>&1``)."""
    if sys.stderr is not stream:
        tell(f"sideband: {what} are dropped: {exc.strerror or exc}")


class _Shared:
    """A logger factory that hands out the same logger every time."""

    def __init__(self, logger: _Output) -> None:
        self._logger = logger

    def __call__(self, *args: Any) -> _Output:
        return self._logger


def configure_logging(
    fmt: Literal["json", "console"] | None = None,
    level: str = "info",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog once for the process (called by the CLI, not at import).

    Every line carries ``event``, ``level`` and ``timestamp``; a call's task binds ``call_id`` with
    :func:`structlog.contextvars.bind_contextvars`, so every line about a call carries it.
    """
    out = stream or sys.stdout
    if fmt is None:
        fmt = "console" if out.isatty() else "json"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    rendering: list[Any]
    if fmt == "json":
        rendering = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(_dumps)]
    else:
        # (tracebacks rendered to text first, so that they are escaped too: an exception's message may
        # hold caller data)
        rendering = [
            structlog.processors.format_exc_info,
            _escape_controls,
            _Guarded(structlog.dev.ConsoleRenderer(colors=out.isatty())),
        ]
    processors += rendering
    output = _Output(out)
    _route_library_logging(
        output, processors[:3], rendering, max(_LEVELS.get(level, logging.INFO), logging.WARNING)
    )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        # One logger for the process: structlog's factory would build one (and look up its file lock)
        # on every call of a module-level logger.
        logger_factory=_Shared(output),
        cache_logger_on_first_use=False,
    )


def _dumps(event_dict: Any, **_: Any) -> str:
    """One JSON log line, in printable ASCII: whatever reads the log, a caller's text (non-ASCII, a
    control character, DEL) stays escaped, as the standard library's encoder escapes it.

    orjson renders it (a fifth of the standard encoder's cost); only a line orjson refuses (a lone
    surrogate, an integer over 64 bits) goes to the standard encoder, with the same field types given
    the same form wherever :func:`_plain` can, and a float that is not finite ``null`` in both (the
    standard encoder would write ``NaN``, which is not JSON). A field neither can render (a cyclic
    structure, an object whose ``repr`` raises) is written as its ``repr``, or as ``<unrenderable T>``."""
    try:
        data = orjson.dumps(event_dict, default=_plain, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:  # (orjson.JSONEncodeError is one)
        try:
            return json.dumps(
                _finite(event_dict), default=_plain_finite, separators=(",", ":"), allow_nan=False
            )
        except Exception:  # (a cyclic field, a repr that raises: never raised into what logged)
            return json.dumps(_renderable(event_dict), default=_plain_finite, separators=(",", ":"))
    text = data.decode()
    if data.isascii() and b"\x7f" not in data:
        return text
    return _UNPRINTABLE.sub(_escape, text)  # (outside strings JSON is printable ASCII: these are in them)


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def _escape(match: re.Match[str]) -> str:
    """A character as the standard library's ASCII-only encoder writes it (a pair of surrogates above
    the Basic Multilingual Plane)."""
    code = ord(match.group())
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 | code >> 10:04x}\\u{0xDC00 | code & 0x3FF:04x}"


def _plain(obj: Any) -> Any:
    """A value neither encoder takes as it is: as JSON has it where it can (a float or int of a subclass,
    numpy's among them; a named tuple; a date; a UUID; an enum; a dataclass), else ``__structlog__()``
    or its ``repr``, as structlog's own renderer gives it."""
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, datetime.date | datetime.time):
        return obj.isoformat()
    if isinstance(obj, uuid.UUID):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    structlog_form = getattr(obj, "__structlog__", None)
    return structlog_form() if callable(structlog_form) else repr(obj)


def _finite(obj: Any) -> Any:
    """``obj`` with each float that is not finite (NaN, infinities), as a value or a key, as orjson
    writes it: ``null``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {
            "null" if isinstance(k, float) and not math.isfinite(k) else k: _finite(v) for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _renderable(event_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``event_dict`` with each field no renderer would choke on: text, a finite number, a boolean or
    None as it is, anything else as its ``repr`` (a cyclic structure's marks its cycles), or
    ``<unrenderable T>`` when even that raises."""
    out: dict[str, Any] = {}
    for key, value in event_dict.items():
        if (
            value is None
            or isinstance(value, str | bool | int)
            or (isinstance(value, float) and math.isfinite(value))
        ):
            out[str(key)] = value
            continue
        try:
            out[str(key)] = repr(value)
        except Exception:
            out[str(key)] = f"<unrenderable {type(value).__qualname__}>"
    return out


class _Guarded:
    """The console renderer, which never raises into what logged: a line it cannot render (a field
    whose ``repr`` raises) is rendered again with such fields made safe (:func:`_renderable`)."""

    def __init__(self, render: Callable[..., Any]) -> None:
        self._render = render

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        kept = dict(event_dict)  # (the renderer takes fields out of the one it is given)
        try:
            return self._render(logger, method, event_dict)
        except Exception:
            return self._render(logger, method, _renderable(kept))


def _plain_finite(obj: Any) -> Any:
    """:func:`_plain`, then :func:`_finite` (a dataclass's NaN field)."""
    return _finite(_plain(obj))


def write_escaped(stream: TextIO, text: str, exc: UnicodeEncodeError) -> None:
    """Write ``text`` to ``stream``, whose encoding refused a character of it (``exc``), with what that
    encoding cannot hold escaped (``\\xe9``, ``\\u2192``); as ASCII when even that is refused. The
    encoding is the stream's own: an 8-bit code page (cp437, KOI8-R) calls itself ``charmap`` in the
    error, which is no codec's name. Raises what the stream raises otherwise."""
    encoding = getattr(stream, "encoding", None)
    try:
        stream.write(encodable(text, encoding if isinstance(encoding, str) and encoding else exc.encoding))
    except UnicodeError:  # (a codec that cannot take its own escapes)
        stream.write(encodable(text, "ascii"))


def encodable(text: str, encoding: str) -> str:
    """``text`` with what ``encoding`` cannot hold escaped as Python writes it (``\\xe9``,
    ``\\u2192``), for a stream in that encoding."""
    try:
        return text.encode(encoding, "backslashreplace").decode(encoding)
    except (LookupError, UnicodeError):  # (an encoding without a codec here, or one that refuses)
        return text.encode("ascii", "backslashreplace").decode("ascii")


_BLOCKS = frozenset({"stack", "exception"})
"""The fields the console prints as blocks of lines: tabs and newlines kept."""


def _escaped(value: str, block: bool) -> str:
    out = []
    for ch in value:
        if ch.isprintable() or (block and ch in "\t\n"):
            out.append(ch)
        else:
            code = ord(ch)
            out.append(
                f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
            )
    return "".join(out)


def _escape_controls(
    logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Console lines: control and other invisible characters in text values (a caller's SIP ``From``, a
    transcript, a tool name the model chose) shown escaped, never sent raw to the operator's terminal,
    where an escape sequence could retitle the window, clear the screen or write the clipboard, and a
    right-to-left override or a zero-width space could make a number read as another."""
    for key, value in event_dict.items():
        if isinstance(value, str) and not value.isprintable():
            event_dict[key] = _escaped(value, key in _BLOCKS)
    return event_dict


class _LibraryLines(logging.Handler):
    """What libraries log through :mod:`logging` (aiohttp's "Error handling request"…), as our lines,
    written as ours are: a line the stream cannot take is dropped, one it cannot encode written escaped
    (not reported with a traceback on stderr)."""

    def __init__(self, output: _Output) -> None:
        super().__init__()
        self.output = output

    def emit(self, record: logging.LogRecord) -> None:
        """Render ``record`` and write it as a line."""
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.output.msg(line)


def _client_faults(record: logging.LogRecord) -> bool:
    """A request aiohttp cannot even parse (malformed HTTP, a ``Content-Encoding`` it cannot decode) is
    the client's fault, yet aiohttp logs it as an error with a traceback: any client could flood the log
    and page the on-call with those. They become one warning line, without the traceback."""
    exc = record.exc_info[1] if record.exc_info else None
    client = isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 400) < 500
    if client or isinstance(exc, RequestPayloadError):  # (a body that is not the gzip it claims)
        text = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
        record.msg, record.args = f"bad request: {text[:200]}", ()
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
    return True


def _component(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    record = event_dict.get("_record")
    if record is not None:
        event_dict.setdefault("component", record.name)
    return event_dict


_LIBRARIES = ("aiohttp", "asyncio", "websockets")
"""The libraries whose log records the server renders as its own lines."""


def _route_library_logging(out: _Output, pre: list[Any], rendering: list[Any], level: int) -> None:
    """Render the warnings and errors of the libraries the server runs on (aiohttp's "Error handling
    request"…) like our lines, on the same stream, instead of plain text on stderr. Only their loggers
    are touched: the root logger, and the app's own ``logging`` setup, stay the app's. Idempotent."""
    handler = _LibraryLines(out)
    handler.setLevel(level)
    handler.addFilter(_client_faults)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*pre, _component],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
        )
    )
    for name in _LIBRARIES:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, _LibraryLines)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False  # rendered here: not a second time by a root handler


@contextmanager
def logging_configured(
    fmt: Literal["json", "console"] | None = None, level: str = "info", stream: TextIO | None = None
) -> Iterator[None]:
    """:func:`configure_logging` while the block runs, then structlog's configuration and the library
    loggers it took over are put back as they were (structlog left unconfigured if it was). Blocks may
    nest; two that overlap otherwise leave the one that ends last's setting behind."""
    configured = structlog.is_configured()
    config = structlog.get_config()
    saved = [(lg, list(lg.handlers), lg.propagate) for lg in map(logging.getLogger, _LIBRARIES)]
    configure_logging(fmt, level, stream)
    try:
        yield
    finally:
        if configured:
            structlog.configure(**config)
        else:
            structlog.reset_defaults()
        for logger, handlers, propagate in saved:
            logger.handlers[:] = handlers
            logger.propagate = propagate


def clip(text: str | None, limit: int = 128) -> str | None:
    """Untrusted text for a log line (a caller's number as written, a name the model chose): at most
    ``limit`` characters, cut short with ``…``."""
    return text if text is None or len(text) <= limit else text[: limit - 1] + "…"


def safe_str(value: object) -> str:
    """``str(value)``, or ``<unprintable Type>`` when that raises (an exception whose message is an object
    with a broken ``__str__``, say: a detached ORM instance)."""
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def describe(exc: BaseException, *, message: bool) -> str:
    """What an operator needs from a failure in user code (tools, routing and call hooks), on one line:
    ``Type``, or ``Type: message`` (at most 300 characters) when ``message`` — only when the message is
    sideband's own or ``SIDEBAND_LOG_TOOL_ARGUMENTS`` allows it: exception text often holds the data the
    code worked on (arguments, card numbers, keys)."""
    if not message:
        return type(exc).__name__
    text = " ".join(safe_str(exc).split())
    described = type(exc).__name__ + (f": {text}" if text else "")
    return described if len(described) <= 300 else described[:299] + "…"


def failure_fields(exc: BaseException, *, message: bool, full: bool) -> dict[str, Any]:
    """Log fields for a failure in user code: ``error`` (:func:`describe`) and where it was raised.

    ``message``: the exception's own message may be logged (sideband's own exceptions, a ``ToolError``,
    or ``SIDEBAND_LOG_TOOL_ARGUMENTS``). ``full``: the whole traceback may be logged (``exc_info``), with
    the text of every exception chained to it (``raise ToolError(…) from exc`` carries ``exc``'s message,
    which may hold a secret). Otherwise ``stack``: the traceback's frames (file, line, function, source
    line) and the exception's type, no message."""
    if full:
        return {"error": describe(exc, message=True), "exc_info": exc}
    frames: list[traceback.FrameSummary] = list(traceback.extract_tb(exc.__traceback__))
    cause = exc.__cause__
    if isinstance(exc, RuntimeError) and isinstance(cause, StopIteration):
        # A coroutine's StopIteration, which Python turns into a RuntimeError where it is awaited: the
        # frames that raised it are the StopIteration's.
        frames.extend(traceback.extract_tb(cause.__traceback__))
    frames = [f for f in frames if f.filename != _STEPWISE]
    frames = frames[-_STACK_FRAMES:]
    stack = "".join(traceback.format_list(frames)) + type(exc).__name__
    return {"error": describe(exc, message=message), "stack": stack}


_STACK_FRAMES = 12
_STEPWISE = blocking.__file__  # its frames (between a timed tool or hook and its caller) say nothing
