"""A static route table: dialed number → overrides or a refusal, loaded from TOML at start (and on SIGHUP).

```toml
[blocked]                      # optional: callers refused before any route or hook
numbers = ["+14155550199"]
withheld = true                # and callers who withhold their number
status = 603                   # SIP status (the default)

[default]                      # optional: calls to numbers not listed below
instructions = "You are the front desk."

[routes."+18005551212"]
instructions = "You are the billing desk."
voice = "cedar"
greeting = "Greet the caller as the billing desk."
tools = ["lookup_order", "transfer_call"]
max_call_seconds = 900
max_idle_seconds = 60
transfer_targets = { human = "tel:+14155550188" }   # instead of the app's, for this number

[routes."+18005550000"]
reject = 486                   # SIP status

[routes."+18005559999"]
refer = "tel:+14155550123"     # send elsewhere without answering
```
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sideband.app import parse_number
from sideband.session import (
    Accept,
    Decision,
    Refer,
    Reject,
    check_transfer_targets,
    is_target_uri,
    validate_accept_payload,
)

if TYPE_CHECKING:
    from sideband.app import IncomingCall, Sideband

__all__ = ["RouteError", "RouteTable", "session_problem"]


class RouteError(ValueError):
    """The route file is unreadable or invalid; ``str()`` is one line naming the place."""


_SCHEME = re.compile(r"(?:sips?|tel):", re.IGNORECASE)
_USER = re.compile(r"[\w\-.!~*'()&=+$,?/]+", re.ASCII)  # RFC 3261 user characters (';' aside)


def _route_key(key: str) -> str:
    """The dialed number a route key stands for, as :func:`parse_number` gives it (a ``tel:``/``sip:``
    key without its scheme and host: the host's parameters, ``;user=phone``, say nothing of the number);
    ``ValueError`` (one line) for a key no call could match."""
    user = key.strip()
    scheme = _SCHEME.match(user)
    rest = user[scheme.end() if scheme else 0 :]
    user = rest.partition("@")[0]
    if ";" in user:
        params = user[user.index(";") :]
        raise ValueError(f"a key cannot carry URI parameters ({params}): calls are matched by number alone")
    if "?" in rest:  # (after the user or the host: a caller's address is read without its URI headers)
        headers = rest[rest.index("?") :]
        raise ValueError(f"a key cannot carry URI headers ({headers}): calls are matched by number alone")
    # (parse_number reads "<", ">" and '"' as a header's structure, not as part of a user name)
    number = parse_number(f"tel:{user}") if not set(user) & set('<>"') else None
    if number is None or not _USER.fullmatch(number):
        raise ValueError("not an E.164 number, a number of digits or a SIP user name")
    return number


_BOM = b"\xef\xbb\xbf"


def _where(data: bytes, begin: int, offset: int) -> str:
    """Where byte ``offset`` of a file's ``data`` (its text from ``begin``, after a byte order mark) is,
    as tomllib's errors say it, with the byte: ``at line 2, column 10, byte 19`` (the column counts the
    characters before it on its line, as an editor does)."""
    start = max(begin, data.rfind(b"\n", 0, offset) + 1)
    line = data.count(b"\n", 0, offset) + 1
    column = len(data[start:offset].decode(errors="replace")) + 1
    return f"at line {line}, column {column}, byte {offset}"


# Session keys that have their own route field: in ``session`` they would clash with it at call time.
_OWN_FIELDS = ("instructions", "voice", "greeting", "tools")


def _one_line(exc: Exception) -> str:
    """Why a plan failed, on one line (a pydantic report reduced to its first error)."""
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"session.{where}: {err['msg']}" if where else err["msg"]
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def session_problem(app: Sideband, decision: Accept, *, sip: bool = True) -> str | None:
    """Why ``app`` answering a SIP call (``sip``; else a WebRTC one) with ``decision`` would fail (one
    line), else ``None``: the payload is built and checked as at ring time (the plan is then cached)."""
    try:
        validate_accept_payload(app.plan(decision).session, sip=sip)
    except Exception as exc:  # whatever fails here would fail the call at ring time
        return _one_line(exc)
    return None


# Strict: a TOML value of the wrong type is refused, not converted (``max_call_seconds = true`` is no
# 1-second limit, ``reject = "486"`` no status); an integer is still a number of seconds.
class _Route(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    instructions: str | None = None
    voice: str | None = None
    greeting: str | None = None
    tools: list[str] | None = None
    max_call_seconds: float | None = Field(default=None, gt=0)
    max_idle_seconds: float | None = Field(default=None, gt=0)
    session: dict[str, Any] = Field(default_factory=dict)
    transfer_targets: dict[str, str] | None = None
    reject: int | None = Field(default=None, ge=400, le=699)
    refer: str | None = None

    @model_validator(mode="after")
    def _one_outcome(self) -> _Route:
        if self.reject is not None and self.refer is not None:
            raise ValueError("a route may reject or refer, not both")
        if self.reject is not None or self.refer is not None:
            # A route that does not answer has no use for answering fields: one set is a mistake.
            unused = sorted(k for k in self.model_fields_set if k not in ("reject", "refer"))
            if unused:
                verb = "rejects" if self.reject is not None else "refers"
                raise ValueError(f"a route that {verb} answers nothing: {', '.join(unused)} would be ignored")
        if self.refer is not None and not is_target_uri(self.refer):
            raise ValueError("refer must be a tel: or sip: URI with a number or address")
        return self

    @field_validator("transfer_targets")
    @classmethod
    def _targets(cls, targets: dict[str, str] | None) -> dict[str, str] | None:
        return None if targets is None else check_transfer_targets(targets)

    @field_validator("session")
    @classmethod
    def _no_own_fields(cls, session: dict[str, Any]) -> dict[str, Any]:
        for key in _OWN_FIELDS:
            if key in session:
                raise ValueError(f"{key} is a route field: set it on the route, not in session")
        return session

    def decision(self) -> Decision:
        if self.reject is not None:
            return Reject(self.reject)
        if self.refer is not None:
            return Refer(self.refer)
        return Accept(
            instructions=self.instructions,
            voice=self.voice,
            greeting=self.greeting,
            tools=tuple(self.tools) if self.tools is not None else None,
            session=dict(self.session),
            max_call_duration=self.max_call_seconds,
            max_idle_duration=self.max_idle_seconds,
            transfer_targets=self.transfer_targets,
        )


class _Blocked(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    numbers: list[str] = Field(default_factory=list)
    withheld: bool = False
    status: int = Field(default=603, ge=400, le=699)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    blocked: _Blocked | None = None
    default: _Route | None = None
    routes: dict[str, _Route] = Field(default_factory=dict)


class RouteTable:
    """Decisions per dialed number, resolved before the call rings (a dict lookup on the answer path)."""

    def __init__(
        self,
        routes: Mapping[str, Decision],
        default: Decision | None = None,
        *,
        source: str | None = None,
        labels: Mapping[str, str] | None = None,
        blocked: Iterable[str] = (),
        block_withheld: bool = False,
        block_status: int = 603,
    ) -> None:
        self._routes = dict(routes)
        self.default = default
        self.source = source
        """Where the table came from (the file path for :meth:`load`), for error messages."""
        self._labels = dict(labels or {})
        self.blocked = frozenset(blocked)
        """Caller numbers refused before any route or hook (as :func:`parse_number` gives them)."""
        # Each digits-only or E.164 entry under both forms: a block list must not miss its caller for a
        # trunk that sends (or a file that lists) the number without its "+".
        self._blocked_forms = self.blocked | {
            n[1:] if n.startswith("+") else "+" + n for n in self.blocked if n.lstrip("+").isdigit()
        }
        self.block_withheld = block_withheld
        """Whether callers who withhold their number are refused too."""
        self._refusal = Reject(block_status) if self.blocked or block_withheld else None

    def __len__(self) -> int:
        return len(self._routes)

    def match(self, dialed: str | None) -> Decision | None:
        """The decision for a dialed number (E.164 or as parsed), else the default (or ``None``).

        An exact match wins. Failing that, a dialed number of digits only (``18005551212``, as many
        trunks send the ``To`` user part) is tried as E.164 with a ``+`` (``+18005551212``): it must
        include the country code. National forms (``8005551212``) are not rewritten: list them as their
        own keys. Two dict lookups at most.
        """
        if dialed is not None:
            found = self._routes.get(dialed)
            if found is None and dialed.isascii() and dialed.isdigit():
                found = self._routes.get("+" + dialed)
            if found is not None:
                return found
        return self.default

    def blocks(self, call: IncomingCall) -> Reject | None:
        """The refusal for a caller the ``[blocked]`` section names, else ``None``.

        A caller's number matches an entry written the same way, and E.164 and digits only match each
        other either way (``+14155550199``, ``14155550199``); with ``withheld = true``, so does any
        caller who withholds their number (:attr:`~sideband.IncomingCall.caller_withheld`). Caller
        numbers come from SIP and anyone can send any: a block list turns away the callers it names, it
        lets no one in.
        """
        refusal = self._refusal
        if refusal is None:
            return None
        if call.from_number in self._blocked_forms:
            return refusal
        return refusal if self.block_withheld and call.caller_withheld else None

    def check(self, app: Sideband) -> None:
        """Build every accepting route's call plan for ``app`` as a SIP call would, at start.

        Raises :class:`RouteError` (one line: file, route, problem) for a tool the app does not have or
        a session OpenAI would refuse, so a bad file stops the process instead of
        rejecting every call to that number at ring time. The plans built here are cached by ``app``.
        """
        known = set(app.tools.names())
        base = session_problem(app, Accept())
        for where, decision in self.accepting():
            unknown = sorted(set(decision.tools or ()) - known)
            if unknown:
                self._fail(f"{where}.tools: unknown tool {', '.join(unknown)}")
            problem = session_problem(app, decision)
            if problem is not None:
                whose = " (in the app's own session config)" if problem == base else ""
                self._fail(f"{where}: {problem}{whose}")

    def accepting(self) -> list[tuple[str, Accept]]:
        """The decisions that accept a call, each with where the file gives it (``default``,
        ``routes.<number>``), in the file's order."""
        entries: list[tuple[str, Decision]] = [("default", self.default)] if self.default else []
        entries += [(f"routes.{self._labels.get(k, k)}", d) for k, d in self._routes.items()]
        return [(where, d) for where, d in entries if isinstance(d, Accept)]

    def _fail(self, message: str) -> None:
        raise RouteError(f"{self.source}: {message}" if self.source else message)

    @classmethod
    def load(cls, path: Path | str, tool_names: Iterable[str] | None = None) -> RouteTable:
        """Read and validate a TOML route file; with ``tool_names`` (even empty), unknown tools are errors.

        The sessions are checked against an app by :meth:`check`.
        """
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise RouteError(f"cannot read {path}: {exc.strerror}") from None
        # (a byte order mark, as some editors write at the start of a UTF-8 file, is no part of the TOML)
        mark = len(_BOM) if data.startswith(_BOM) else 0
        try:
            raw = tomllib.loads(data[mark:].decode())
        except tomllib.TOMLDecodeError as exc:
            raise RouteError(f"{path}: {' '.join(str(exc).split())}") from None
        except UnicodeDecodeError as exc:  # (TOML is UTF-8)
            raise RouteError(f"{path}: not UTF-8 ({_where(data, mark, mark + exc.start)})") from None
        except RecursionError:  # (tomllib parses arrays and tables recursively: a few hundred levels)
            raise RouteError(f"{path}: nested too deeply") from None
        return cls.from_dict(raw, tool_names, source=str(path))

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any], tool_names: Iterable[str] | None = None, source: str = "routes"
    ) -> RouteTable:
        """Build from already-parsed data (same rules as :meth:`load`)."""
        try:
            parsed = _File.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise RouteError(f"{source}: {where}: {err['msg']}") from None
        known = None if tool_names is None else set(tool_names)
        routes: dict[str, Decision] = {}
        labels: dict[str, str] = {}
        entries = [("default", parsed.default)] if parsed.default else []
        entries += [(f"routes.{number}", route) for number, route in parsed.routes.items()]
        for where, route in entries:
            unknown = sorted(set(route.tools or ()) - known) if known is not None else []
            if unknown:
                raise RouteError(f"{source}: {where}.tools: unknown tool {', '.join(unknown)}")
        for number, route in parsed.routes.items():
            try:
                key = _route_key(number)
            except ValueError as exc:
                raise RouteError(f"{source}: routes.{number}: {exc}") from None
            if key in labels:
                raise RouteError(f"{source}: routes.{number}: the same number as routes.{labels[key]}")
            labels[key] = number
            routes[key] = route.decision()
        default = parsed.default.decision() if parsed.default else None
        blocked: set[str] = set()
        block = parsed.blocked or _Blocked()
        for number in block.numbers:
            try:
                blocked.add(_route_key(number))
            except ValueError as exc:
                raise RouteError(f"{source}: blocked.numbers: {number}: {exc}") from None
        return cls(
            routes,
            default,
            source=source,
            labels=labels,
            blocked=blocked,
            block_withheld=block.withheld,
            block_status=block.status,
        )
