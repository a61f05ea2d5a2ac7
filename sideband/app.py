"""The user's app object: session config, tools, routing and call hooks in one place."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import re
import ssl
import threading
import time
import unicodedata
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, overload

from aiohttp import web

from sideband import jsonio
from sideband.blocking import in_thread, timed
from sideband.context import CallContext, SipHeader
from sideband.runtime.driver import CallHooks, CallSummary, ToolRecord, TranscriptRole
from sideband.runtime.machine import (
    DEFAULT_FILLER,
    DEFAULT_GOODBYE,
    DEFAULT_GUARDRAIL_NOTE,
    DEFAULT_STILL_THERE,
)
from sideband.session import (
    Accept,
    Decision,
    DecisionError,
    Refer,
    Reject,
    SessionConfig,
    check_seconds,
    check_transfer_targets,
    encode_session,
)
from sideband.tools import _DEFAULT, Tool, ToolRegistry, _Default, is_async_callable
from sideband.upstream._ws import client_tls

__all__ = ["IncomingCall", "Sideband", "parse_number"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
RouteHook = Callable[["IncomingCall"], Awaitable[Decision] | Decision]

# What each hook is called with, for type checkers: a plain function or an ``async def`` one (its return
# value, or what it awaits to, is not read, except a routing hook's and a guardrail's).
RouteHookT = TypeVar("RouteHookT", bound=RouteHook)
AuthorizeHookT = TypeVar("AuthorizeHookT", bound=Callable[[web.Request], object])
StartHookT = TypeVar("StartHookT", bound=Callable[[CallContext], object])
EndHookT = TypeVar("EndHookT", bound=Callable[[CallContext, CallSummary], object])
TranscriptHookT = TypeVar("TranscriptHookT", bound=Callable[[CallContext, TranscriptRole, str], object])
DtmfHookT = TypeVar("DtmfHookT", bound=Callable[[CallContext, str], object])
ToolHookT = TypeVar("ToolHookT", bound=Callable[[CallContext, ToolRecord], object])
GuardrailT = TypeVar("GuardrailT", bound=Callable[[CallContext, str], object])


class _Unset:
    """Marks a constructor argument that was not given (``None`` means "off")."""


_UNSET = _Unset()

HOOK_THREADS = 32
"""Worker threads of each of the app's pools for sync hooks (call hooks, the routing hook and the
``authorize_browser`` hook each have their own), as many as the tools' (started on demand): a burst of
calls whose routing hook blocks a while waits for no thread until more than this many run at once."""

AUTHORIZE_TIMEOUT = 5.0
"""Seconds an ``authorize_browser`` hook may take before the request is answered 503."""


class HookTimeout(TimeoutError):
    """A hook overran its ``budget`` (seconds). ``started``: whether it ran at all (a sync one may have
    waited all that time for a thread of its pool, every one busy)."""

    def __init__(self, *, budget: float, started: bool) -> None:
        super().__init__("timeout")
        self.budget = budget
        self.started = started


class HookRun(threading.Event):
    """One run of a hook, as its budget reads it: set as the hook starts (a sync one, once a worker
    thread of its pool takes it up), and :attr:`ended`, the ``time.monotonic()`` at which it answered
    (a sync one, as its thread returned: not when the event loop, held by other code, got to read it)."""

    def __init__(self) -> None:
        super().__init__()
        self.ended: float | None = None

    def end(self, *_: object) -> None:
        """Mark the hook's answer as given now."""
        self.ended = time.monotonic()

    def returned(self, thread: concurrent.futures.Future[Any]) -> None:
        """A sync hook's thread returned (its future's done callback): its answer is given now, unless
        it is something still to be awaited (a coroutine, its ``await`` left out), which runs on."""
        if thread.cancelled() or thread.exception() is not None or not inspect.isawaitable(thread.result()):
            self.end()


def _in_pool(
    pool: concurrent.futures.Executor | None, work: Callable[[], Any], run: HookRun | None
) -> asyncio.Future[Any]:
    """``work`` run in a thread of ``pool``, as a future to await; ``run`` marked as answered as the
    thread returns. (Not in the awaiting frame: the future holds what the hook raised, and its
    traceback that frame, which would hold the future in turn.)"""
    if pool is None:
        raise RuntimeError("a sync hook runs in a pool of its own, and it has none")
    thread = pool.submit(work)
    if run is not None:
        thread.add_done_callback(run.returned)  # (in the thread, as it returns)
    return asyncio.wrap_future(thread)


async def call_hook(
    fn: Callable[[Any], Any],
    arg: object,
    *,
    is_async: bool,
    pool: concurrent.futures.Executor | None,
    started: threading.Event | None = None,
) -> Any:
    """What ``fn(arg)`` answers (an awaitable it returns, awaited): an async hook on the event loop, a
    sync one in a thread of ``pool`` (in a copy of this context). ``started`` is set as it starts, and
    a :class:`HookRun`'s :attr:`~HookRun.ended` as it answers."""
    run = started if isinstance(started, HookRun) else None
    if is_async:
        if started is not None:
            started.set()
        result = fn(arg)
    else:
        result = await _in_pool(pool, in_thread(fn, arg, started=started), run)
        if not inspect.isawaitable(result):
            return result
    while inspect.isawaitable(result):  # (an ``await`` left out in the hook: what it returns)
        result = await result
    if run is not None:
        run.end()
    return result


@dataclass(frozen=True, slots=True)
class _Raised:
    """What a hook raised (not what it returned: a hook may return an exception)."""

    exc: BaseException


async def _contained(answer: Awaitable[T], run: HookRun) -> tuple[T | _Raised, float]:
    """What a hook answered, or what it raised other than a cancellation (a ``SystemExit`` or a
    ``KeyboardInterrupt`` raised out of a task would stop the event loop, and every call with it); and
    the seconds from its start to its answer by its own clock (``run``): not the time its task waited to
    start, or the time its answer waited to be read, while other code held the event loop."""
    start = time.monotonic()
    try:
        answered = await answer
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # (returned from here: kept in a local, it would hold this frame)
        return _Raised(exc), (run.ended or time.monotonic()) - start
    return answered, (run.ended or time.monotonic()) - start


def _drop_outcome(hook: asyncio.Future[Any]) -> None:
    """The end of a hook left behind at its budget: nobody's (its late answer is dropped)."""
    if not hook.cancelled():
        hook.exception()


async def within_budget(answer: Awaitable[T], budget: float, run: HookRun) -> T:
    """What a hook answers (``answer``, the coroutine running it; ``run``, its :class:`HookRun`),
    run as a task of its own under ``budget`` seconds of its own time. What it raises is raised (a
    cancellation of its own included). :class:`HookTimeout` when it has not answered within the budget
    (its task is cancelled and left behind, even when it ignores that: its late answer is dropped), or
    answered past it by its own clock (its blocking code held the event loop past the budget, whose timer
    could not fire meanwhile). Only its own time counts: a wait, after it answered, for other code holding
    the event loop to let its answer be read is not its overrun. Cancelled, it cancels the hook."""
    begun = time.monotonic()
    hook = asyncio.ensure_future(_contained(answer, run))
    try:
        await asyncio.wait((hook,), timeout=budget)
        ended = run.ended
        if not hook.done() and ended is not None and ended - begun < budget:
            # A sync hook's thread answered in time, but other code held the event loop until the
            # budget's timer was due with the answer, and went first: the answer is on its way.
            await asyncio.wait((hook,), timeout=budget)
    except asyncio.CancelledError:
        hook.cancel()
        hook.add_done_callback(_drop_outcome)
        raise
    if not hook.done():
        hook.cancel()
        hook.add_done_callback(_drop_outcome)
        raise HookTimeout(budget=budget, started=run.is_set())
    outcome, took = hook.result()  # (a cancellation of the hook's own is raised from here)
    if isinstance(outcome, _Raised):
        try:
            raise outcome.exc
        finally:
            del outcome, hook  # (the exception, raised on, holds this frame: not it in turn)
    if took >= budget:
        raise HookTimeout(budget=budget, started=True)
    return outcome


_URI = re.compile(r"(sips?|tel):([^>]*)", re.IGNORECASE)
_VISUAL = re.compile(r"[\s\-.()]")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')  # RFC 3261 quoted-string, \" escapes included
_E164 = re.compile(r"\+[0-9]{7,15}")  # ASCII digits only (str.isdigit() takes any script's)
_NATIONAL = re.compile(r"[0-9]{7,15}")
# A national trunk prefix written after the country code, "+44 (0)20…": not dialed from abroad. (Not
# Italy's or San Marino's, whose leading 0 is part of the number, dialed from abroad too: "+39 06…".)
_TRUNK_ZERO = re.compile(r"^(\+(?!(?:39|378)(?![0-9]))[0-9]{1,3})[\s\-.]*\(0\)")
_COUNTRY = re.compile(r"\+[0-9]{1,3}")  # a phone-context that is a country code alone
_KEEPS_ZERO = frozenset({"39", "378"})  # Italy, San Marino: a number's leading 0 is dialed from abroad
# Caller "numbers" that carriers and RFC 3323 (``sip:anonymous@anonymous.invalid``) send for a withheld ID.
_WITHHELD = frozenset({"anonymous", "restricted", "unavailable", "unknown", "private", "withheld"})


def parse_number(header_value: str | None) -> str | None:
    """The user part of a SIP ``From``/``To`` value, as E.164 (``+14155550123``) when it is one.

    ``"Alice" <sip:+1 (425) 555-0100@example.com>;tag=x`` → ``+14255550100``; a non-numeric user part
    (``sip:alice@example.com``) is returned as is (``alice``). Untrusted either way. A national number
    whose ``phone-context`` is a country code is read in that country (``tel:4155550100;phone-context=+1``
    → ``+14155550100``; ``sip:02079460000;phone-context=+44@…`` → ``+442079460000``: see
    :func:`_in_country`); a longer context (``+1-914-555``) leaves the digits as they came. A trunk prefix
    written after the country code is dropped, as it is not dialed from abroad (``+44 (0)20 7946 0000`` →
    ``+442079460000``; but in Italy and San Marino).

    A ``sip:``/``sips:`` address without a user part (``<sip:10.0.0.1:5060>``: a host alone) has no
    number (``None``); a password in the user part (``sip:+14155550100:pw@host``) is dropped, and so
    are URI headers (``<sip:10.0.0.1?subject=a@b>`` is a host alone). A user part holding control
    characters (``%00``, a line break) is no number (``None``).
    """
    if not header_value:
        return None
    value = header_value.lstrip()
    if value.startswith('"'):  # a quoted display name may hold anything, "<sip:…>" included
        end = _QUOTED.match(value)
        if end is None:
            return None
        value = value[end.end() :]
    start = value.find("<")
    if start >= 0:
        end_at = value.find(">", start)
        if end_at < 0:
            return None
        value = value[start + 1 : end_at]  # the address, not the display name or the parameters
    match = _URI.search(value)
    if match is None:
        return None
    scheme, rest = match.group(1).lower(), match.group(2)
    rest = rest.partition("?")[0]  # URI headers (``?subject=a@b``) are no part of the address
    if scheme == "tel":
        number = rest.partition("@")[0]
    else:  # sip:user[;user-params][:password]@host…: no "@", no user, a host alone
        userinfo, at, _ = rest.partition("@")
        number = userinfo.partition(":")[0] if at else ""
    raw, _, params = number.partition(";")
    user = urllib.parse.unquote(raw).strip()
    if not user or any(unicodedata.category(c)[0] == "C" or c in "\u2028\u2029" for c in user):
        return None  # (none, or one with control characters, %00 or a line break, that no number has)
    digits = _VISUAL.sub("", _TRUNK_ZERO.sub(r"\1", user, count=1))
    if _NATIONAL.fullmatch(digits):  # a national number: global in its country's phone-context
        context = _phone_context(params)
        if context is not None:
            return _in_country(context[1:], digits)
    if _E164.fullmatch(digits) or _NATIONAL.fullmatch(digits):
        return digits
    return user


def _phone_context(params: str) -> str | None:
    """The ``phone-context`` of a number's ``params`` when it is a country code (``+44``), else ``None``:
    none, a domain's (``example.com``), or a longer prefix (``+1-914-555``), which RFC 3966 warns is no
    safe start for the number (a local ``863-1234`` there may be dialed with its area code or not)."""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "phone-context":
            prefix = _VISUAL.sub("", urllib.parse.unquote(value))
            return prefix if _COUNTRY.fullmatch(prefix) else None
    return None


def _in_country(code: str, digits: str) -> str:
    """A national number of the country ``code`` (``"44"``) as E.164, else its digits as they came: its
    trunk ``0`` dropped (``020 7946 0000`` → ``+442079460000``; but in Italy and San Marino), the code
    not repeated (``14155550100`` in ``+1``), and a number of North America's plan whole (its area code
    and 7 digits: a shorter one is its digits)."""
    if code == "1":
        national = digits[1:] if len(digits) == 11 and digits[0] == "1" else digits
        return "+1" + national if len(national) == 10 and national[0] not in "01" else digits
    if digits[0] == "0":
        number = code + (digits if code in _KEEPS_ZERO else digits[1:])
    elif digits.startswith(code):  # (dialed with its country code, without the "+")
        number = digits
    else:
        number = code + digits
    return "+" + number if _E164.fullmatch("+" + number) else digits


def _check_hook(kind: str, fn: object, params: tuple[str, ...]) -> None:
    """Refuse, as it is registered, a ``kind`` hook that cannot be called with ``params`` (positionally, as
    sideband calls it): ``TypeError`` naming the hook and what it must take. Defaults, ``*args``, bound
    methods, :func:`functools.partial` and callable objects are read from the signature; a callable whose
    signature cannot be read (some builtins) is taken as it is."""
    if not callable(fn):
        raise TypeError(f"{kind} takes a function, not {type(fn).__name__}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*params)
    except TypeError as exc:
        try:  # a decorator's wrapper (functools.wraps) may take other parameters than the function it wraps
            inspect.signature(fn, follow_wrapped=False).bind(*params)
        except (TypeError, ValueError):
            pass
        else:
            return
        bare = signature.replace(  # (its parameters as written, without their annotations)
            parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
            return_annotation=signature.empty,
        )
        raise TypeError(
            f"the {kind} hook {_describe(fn)}{bare} cannot be called with ({', '.join(params)}): {exc}"
        ) from None


def _one_hook(kind: str, registered: object, why: str) -> None:
    """Refuse a second hook of a ``kind`` an app has one of: it would replace the first unseen."""
    if registered is not None:
        raise ValueError(f"an app has one {kind} hook, and {_describe(registered)} is registered ({why})")


def _describe(fn: object) -> str:
    """How a registration error names a hook: ``end``, ``Desk.end``, ``functools.partial(end)``…"""
    if isinstance(fn, functools.partial):
        return f"functools.partial({_describe(fn.func)})"
    name = getattr(fn, "__qualname__", None)
    return name if isinstance(name, str) else f"{type(fn).__qualname__} object"


@dataclass(frozen=True, slots=True)
class IncomingCall:
    """A ringing call, as the routing hook sees it. Everything from SIP is **untrusted**."""

    call_id: str
    from_number: str | None
    to_number: str | None
    sip_headers: tuple[SipHeader, ...] = ()
    media_security: str | None = None
    source: Literal["sip", "webrtc"] = "sip"
    raw: Mapping[str, Any] = field(default_factory=dict)
    route: Decision | None = None
    """What the static route table says for this dialed number (``None``: no table or no match)."""

    @property
    def caller_withheld(self) -> bool:
        """Whether the caller's number is withheld: no ``From`` number (none, or an address without a
        user part), a ``From`` user part of ``anonymous``, ``restricted``, ``unavailable``, ``unknown``,
        ``private`` or ``withheld`` (any case), or a ``Privacy`` header asking for ``id`` or ``user``
        privacy (RFC 3323/3325). Untrusted like everything from SIP: a caller may send any number, so
        this refuses callers who hide, it authenticates no one."""
        if self.from_number is None or self.from_number.lower() in _WITHHELD:
            return True
        privacy = (h.value for h in self.sip_headers if h.name.lower() == "privacy")
        asked = {v.strip().lower() for value in privacy for v in re.split(r"[;,]", value)}
        return not asked.isdisjoint(("id", "user"))

    def dialed(self, number: str) -> bool:
        """Whether the dialed number is ``number``: written the same way, or E.164 against digits only
        either way (``+18005551212`` and ``18005551212``, as trunks send either; ``+44 (0)20…`` without
        its trunk ``0``, as :func:`parse_number` reads it). Looser than the route
        table, where a key of digits only is not taken for a dialed ``+`` number. Untrusted, like all of
        SIP."""
        to, number = self.to_number, _VISUAL.sub("", _TRUNK_ZERO.sub(r"\1", number.strip(), count=1))
        if to is None:
            return False
        return to == number or (to.lstrip("+").isdigit() and to.lstrip("+") == number.lstrip("+"))

    def header(self, name: str) -> str | None:
        """First value of a SIP header (case-insensitive)."""
        lname = name.lower()
        return next((h.value for h in self.sip_headers if h.name.lower() == lname), None)

    @classmethod
    def from_sip(
        cls,
        call_id: str,
        headers: Iterable[SipHeader],
        media_security: str | None = None,
        raw: Mapping[str, Any] | None = None,
    ) -> IncomingCall:
        """Build from the webhook's ``sip_headers`` list."""
        hdrs = tuple(headers)
        get = {h.name.lower(): h.value for h in reversed(hdrs)}
        return cls(
            call_id,
            parse_number(get.get("from") or get.get("f")),  # (f/t: SIP's compact header names)
            parse_number(get.get("to") or get.get("t")),
            hdrs,
            media_security,
            "sip",
            raw or {},
        )

    def context(self) -> CallContext:
        """A fresh :class:`CallContext` for this call."""
        return CallContext(self.call_id, self.source, self.from_number, self.to_number, self.sip_headers)


@dataclass(frozen=True, slots=True)
class CallPlan:
    """What an accepted call runs with: the session payload (accept body = first ``session.update``),
    the tools it may call, and its policy."""

    session: dict[str, Any]
    tools: ToolRegistry
    greeting: str | None
    config: SessionConfig
    max_call_duration: float | None = None
    max_idle_duration: float | None = None
    transfer_targets: Mapping[str, str] = field(default_factory=dict)
    """Where this call may be transferred (label → URI): the decision's, else the app's."""
    catalog: ToolRegistry | None = None
    """The tools code may offer this call later (``ctx.update_session(tools=[…])``): the app's, with the
    transfer tool offering this call's targets (or left out when it has none). ``None``: ``tools``."""


def _count(name: str, value: object) -> int:
    """``value`` as a whole number >= 1: ``TypeError`` for anything else (``None``, a string, a float, a
    bool), ``ValueError`` below 1."""
    if type(value) is not int:
        raise TypeError(f"{name} must be a whole number >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


class Sideband:
    """A voice agent: its session config, its tools, its routing and its hooks.

    >>> app = Sideband(instructions="You are the order desk.", voice="marin")
    >>> @app.tool
    ... async def lookup_order(order_id: str) -> dict: ...

    Args:
        instructions: System instructions of every call (a route or ``Accept`` may override them).
        voice: Output voice (e.g. ``"marin"``).
        model: Realtime model (default ``gpt-realtime``).
        greeting: Instructions for the one greeting per call; ``None`` waits for the caller to speak.
        session: A full :class:`SessionConfig` to start from (the arguments above apply on top).
        transfer_targets: Label → ``tel:``/``sip:`` URI; the only places ``transfer`` may send a call (a
            route or ``Accept(transfer_targets=…)`` may give a call its own).
        tool_timeout: Default seconds a tool may run before the model gets a timeout output.
        filler_after: Default seconds before a holding phrase while a tool runs (``None``: never).
        filler_instructions: What the model is told to say as a holding phrase.
        goodbye_instructions: What the model is told when a limit ends the call.
        idle_prompts: How many times a silent caller is asked whether they are still there, each after
            ``max_idle_duration`` of silence, before the idle limit's goodbye (default 0: goodbye at once).
        idle_prompt_instructions: What the model is told for that question.
        guardrail_note: The system message the model gets when an output guardrail stops its reply (the
            guardrail's reason follows it), before it answers again.
        max_call_duration: Seconds before goodbye and hangup (default ``SIDEBAND_MAX_CALL_SECONDS``).
        max_idle_duration: Seconds of caller silence (no speech, transcript or keypad) after the model
            last finished speaking before goodbye and hangup.
        max_tool_calls: Tool calls allowed in one call before the model is told to stop.
        max_identical_calls: Identical consecutive tool calls allowed before the model is told to stop.
        name: Shown in logs.
    """

    def __init__(
        self,
        *,
        instructions: str | None = None,
        voice: str | None = None,
        model: str | _Unset | None = _UNSET,
        greeting: str | _Unset | None = _UNSET,
        session: SessionConfig | None = None,
        transfer_targets: Mapping[str, str] | None = None,
        tool_timeout: float = 10.0,
        filler_after: float | None = 1.5,
        filler_instructions: str | None = None,
        goodbye_instructions: str | None = None,
        idle_prompts: int = 0,
        idle_prompt_instructions: str | None = None,
        guardrail_note: str | None = None,
        max_call_duration: float | None = None,
        max_idle_duration: float | None = None,
        max_tool_calls: int = 64,
        max_identical_calls: int = 3,
        name: str = "sideband",
    ) -> None:
        if session is not None and not isinstance(session, SessionConfig):
            raise TypeError(
                f"session must be a SessionConfig (SessionConfig.model_validate(...) reads a dict), "
                f"not {type(session).__name__}"
            )
        config = (session or SessionConfig()).merged(instructions=instructions, voice=voice)
        explicit = {k: v for k, v in (("model", model), ("greeting", greeting)) if not isinstance(v, _Unset)}
        self.config = config.model_copy(update=explicit) if explicit else config
        self.name = name
        try:
            self.tools = ToolRegistry(default_timeout=tool_timeout, default_filler_after=filler_after)
        except ValueError as exc:  # (said with this constructor's names)
            message = str(exc).replace("default_timeout", "tool_timeout")
            raise ValueError(message.replace("default_filler_after", "filler_after")) from None
        self.transfer_targets: dict[str, str] = check_transfer_targets(transfer_targets or {})
        self.transfer_tool: str | None = None
        """The name of the tool :meth:`enable_transfer` added (SIP calls only: a REFER needs a phone call)."""
        self._transfer_labels: tuple[str, ...] = ()  # the labels that tool offers
        self.filler_instructions = filler_instructions or DEFAULT_FILLER
        self.goodbye_instructions = goodbye_instructions or DEFAULT_GOODBYE
        if type(idle_prompts) is not int or not 0 <= idle_prompts <= 10:
            raise ValueError(f"idle_prompts must be a whole number 0-10, got {idle_prompts!r}")
        self.idle_prompts = idle_prompts
        self.idle_prompt_instructions = idle_prompt_instructions or DEFAULT_STILL_THERE
        self.guardrail_note = guardrail_note or DEFAULT_GUARDRAIL_NOTE
        self.max_call_duration = check_seconds("max_call_duration", max_call_duration)
        self.max_idle_duration = check_seconds("max_idle_duration", max_idle_duration)
        self.max_tool_calls = _count("max_tool_calls", max_tool_calls)
        self.max_identical_calls = _count("max_identical_calls", max_identical_calls)
        self._route: RouteHook | None = None
        self._route_is_async = False
        self._route_threads: concurrent.futures.ThreadPoolExecutor | None = None
        # Sync hooks' own threads (started on demand): a hook stuck in one holds no thread a tool needs.
        self._hook_threads = concurrent.futures.ThreadPoolExecutor(
            HOOK_THREADS, thread_name_prefix="sideband-hook"
        )
        self._authorize_browser: Callable[[web.Request], Any] | None = None
        self._authorize_threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._tls: ssl.SSLContext | None = None
        self.on_call_start_hooks: list[Callable[..., Any]] = []
        self.on_call_end_hooks: list[Callable[..., Any]] = []
        self.on_transcript_hooks: list[Callable[..., Any]] = []
        self.on_dtmf_hooks: list[Callable[..., Any]] = []
        self.on_tool_hooks: list[Callable[..., Any]] = []
        self.guardrails: list[Callable[..., Any]] = []
        """Output guardrails (:meth:`guardrail`), in the order they run."""
        self._plans: dict[tuple[Any, ...], CallPlan] = {}
        self._plans_of: SessionConfig | None = None  # the config the cached plans were built from

    # ------------------------------------------------------------------------------ decorators
    @overload
    def tool(
        self,
        fn: F,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        filler_after: float | Literal[False] | _Default | None = _DEFAULT,
        respond: bool = True,
    ) -> F: ...

    @overload
    def tool(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        filler_after: float | Literal[False] | _Default | None = _DEFAULT,
        respond: bool = True,
    ) -> Callable[[F], F]: ...

    def tool(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        filler_after: float | Literal[False] | _Default | None = _DEFAULT,
        respond: bool = True,
    ) -> F | Callable[[F], F]:
        """Register a tool: ``@app.tool``, ``@app.tool(timeout=3, filler_after=None)`` or
        ``app.tool(fn, name=...)``. Returns the function unchanged.

        Args:
            fn: The tool's function (sync or ``async def``); left out, a decorator taking it is returned.
            name: The name the model calls it by (default: the function's name).
            description: What the model is told it does (default: its docstring, before its sections).
            timeout: Seconds it may run before the model gets a timeout output (default: the app's
                ``tool_timeout``).
            filler_after: Seconds before a spoken holding phrase while it runs; ``None``, ``False`` or
                ``0`` for never (default: the app's ``filler_after``; never for ``respond=False``).
            respond: ``False``: the model is not asked to answer a successful output when it spoke as it
                called the tool (a quiet tool, such as ``end_call``).

        Raises ``TypeError`` for an option it does not take, or a function that cannot be a tool, and
        ``ValueError`` for a bad name, timeout or filler delay, or a name already taken.
        """
        register = self.tools.tool(
            name=name, description=description, timeout=timeout, filler_after=filler_after, respond=respond
        )
        return register if fn is None else register(fn)

    def on_incoming(self, fn: RouteHookT) -> RouteHookT:
        """Route each ringing call: the hook gets an :class:`IncomingCall` and returns
        :class:`Accept`, :class:`Reject` or :class:`Refer` (sync or async; a sync hook runs in a worker
        thread, one of :data:`HOOK_THREADS`, so a slow one cannot stall other calls and the route budget
        still applies).

        A hook that cannot be called with ``(call)`` raises ``TypeError`` here, as do those of the other
        hook decorators that cannot take what they are called with. An app has one routing hook: a second
        raises ``ValueError`` (the first stays)."""
        _check_hook("on_incoming", fn, ("call",))
        _one_hook("on_incoming", self._route, "it decides every call: route them all in one")
        self._route = fn
        self._route_is_async = is_async_callable(fn)
        if not self._route_is_async and self._route_threads is None:
            # Its own threads, not the loop's default executor: hooks stuck past the route budget must
            # not starve DNS lookups (the default resolver's threads) on the answer path.
            self._route_threads = concurrent.futures.ThreadPoolExecutor(
                HOOK_THREADS, thread_name_prefix="sideband-route"
            )
        return fn

    @property
    def routes_calls(self) -> bool:
        """Whether an :meth:`on_incoming` hook decides calls (else the route table or the app's config)."""
        return self._route is not None

    def authorize_browser(self, fn: AuthorizeHookT) -> AuthorizeHookT:
        """Open the WebRTC doors (``/rtc/calls``, ``/rtc/sessions``, ``/rtc/handoff``) to the requests
        ``fn`` approves: it gets the :class:`aiohttp.web.Request` (cookies, headers: your own login) and
        returns true to let it through (sync or async; a sync one runs in threads of its own, never the
        tools'). An awaitable it returns (an ``await`` left out) is awaited, and what that gives decides.
        It has :data:`AUTHORIZE_TIMEOUT` seconds; one that raises or overruns gets the request a 503, as
        does one that returns an aiohttp response or exception instead of raising it, but an aiohttp
        ``HTTPException`` of 3xx/4xx it raises (``check_authorized``'s 401, a redirect to a login page)
        is the answer given. It may read the body (``await request.json()``). Without it, those routes
        answer 404: a server that only takes phone calls offers no way to start a call, or mint a key,
        with its API key. ``app.authorize_browser(lambda request: True)`` opens them to
        anyone. An app has one such hook: a second raises ``ValueError`` (the first stays).
        """
        _check_hook("authorize_browser", fn, ("request",))
        _one_hook(
            "authorize_browser", self._authorize_browser, "it decides every request: check them all in one"
        )
        self._authorize_browser = fn
        if not is_async_callable(fn) and self._authorize_threads is None:
            # Strangers' requests run it: they must not take the threads live calls' tools need.
            self._authorize_threads = concurrent.futures.ThreadPoolExecutor(
                HOOK_THREADS, thread_name_prefix="sideband-authorize"
            )
        return fn

    @property
    def browsers_allowed(self) -> bool:
        """Whether an :meth:`authorize_browser` hook opened the WebRTC doors."""
        return self._authorize_browser is not None

    async def authorize(
        self, request: web.Request, *, report: Callable[[float, int], None] | None = None
    ) -> bool:
        """Run the :meth:`authorize_browser` hook under :data:`AUTHORIZE_TIMEOUT` (``False`` without
        one). Its exceptions propagate; an overrun raises :class:`HookTimeout`. An awaitable it returns is
        awaited (in the same time); an aiohttp response or an exception it returns raises ``TypeError``.
        Only the hook's own time counts (see :func:`within_budget`); ``report``, a
        :class:`~sideband.blocking.Stepwise` report, hears of its steps that held the event loop."""
        hook = self._authorize_browser
        if hook is None:
            return False
        run = HookRun()
        answer = call_hook(
            hook, request, is_async=is_async_callable(hook), pool=self._authorize_threads, started=run
        )
        result = await within_budget(timed(answer, report), AUTHORIZE_TIMEOUT, run)
        if isinstance(result, web.StreamResponse | BaseException):  # (true, both: a refusal let through)
            raise TypeError(
                f"the authorize_browser hook returned {type(result).__name__}: it returns true or false "
                "(an aiohttp HTTPException is raised to answer with it)"
            )
        return bool(result)

    def close(self) -> None:
        """Stop the app's worker threads (sync tools and hooks, sync routing hooks) at process end: idle
        ones exit, queued work is dropped, running work is not waited for. The app runs no sync code after.
        """
        self.tools.executor.shutdown(wait=False, cancel_futures=True)
        for pool in (self._hook_threads, self._route_threads, self._authorize_threads):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def on_call_start(self, fn: StartHookT) -> StartHookT:
        """Called with ``(ctx)``, the :class:`CallContext`, once the sideband is attached."""
        _check_hook("on_call_start", fn, ("ctx",))
        self.on_call_start_hooks.append(fn)
        return fn

    def on_call_end(self, fn: EndHookT) -> EndHookT:
        """Called with ``(ctx, summary)`` when the call has ended (:class:`~sideband.CallSummary`)."""
        _check_hook("on_call_end", fn, ("ctx", "summary"))
        self.on_call_end_hooks.append(fn)
        return fn

    def on_transcript(self, fn: TranscriptHookT) -> TranscriptHookT:
        """Called with ``(ctx, role, text)`` for each transcript line: ``role`` is ``"caller"`` or
        ``"agent"`` (:data:`~sideband.TranscriptRole`)."""
        _check_hook("on_transcript", fn, ("ctx", "role", "text"))
        self.on_transcript_hooks.append(fn)
        return fn

    def on_dtmf(self, fn: DtmfHookT) -> DtmfHookT:
        """Called with ``(ctx, digit)`` for each keypad digit (SIP calls)."""
        _check_hook("on_dtmf", fn, ("ctx", "digit"))
        self.on_dtmf_hooks.append(fn)
        return fn

    def on_tool(self, fn: ToolHookT) -> ToolHookT:
        """Called with ``(ctx, record)`` after each tool call (:class:`~sideband.ToolRecord`)."""
        _check_hook("on_tool", fn, ("ctx", "record"))
        self.on_tool_hooks.append(fn)
        return fn

    def guardrail(self, fn: GuardrailT) -> GuardrailT:
        """Check what the model says, as it says it: ``fn(ctx, text)`` gets the words of the model's
        reply so far, and returns a falsy value to let them pass, or the reason (a string, or ``True``:
        its name is the reason) to stop the reply. The model writes its words ahead of the caller hearing
        them, so a reply is usually stopped before the caller hears the words that broke the rule.

        A stopped reply is cancelled (the tool calls it made are not run), the audio the caller has not
        heard is dropped, and the model is told, by a system message (``guardrail_note`` and the reason),
        to answer again within the rules (``guardrail.tripped``, ``CallSummary.guardrails``); the tool calls
        of a reply wait for its check, and a stopped reply's are not run. A plain function runs on the
        event loop as the words arrive: keep it quick (a word list, a regular expression); make a slow
        check (a moderation model) ``async def``: one check runs at a time, for 5 s at most, and the words
        that arrive meanwhile are checked together next. A guardrail that raises or overruns lets the
        words pass (``guardrail.failed``). Guardrails check words, not tool arguments: a tool checks its
        own."""
        _check_hook("guardrail", fn, ("ctx", "text"))
        self.guardrails.append(fn)
        return fn

    def hooks(self) -> CallHooks:
        """The call hooks registered on this app (and its output guardrails)."""
        return CallHooks(
            self.on_call_start_hooks,
            self.on_call_end_hooks,
            self.on_transcript_hooks,
            self.on_dtmf_hooks,
            self.on_tool_hooks,
            guardrails=self.guardrails,
            executor=self._hook_threads,
        )

    def tls_context(self) -> ssl.SSLContext:
        """The client TLS context this app's ``wss://`` connections share (OpenAI sidebands, engine
        sessions), built on first use: one per connection would load the CA certificates each time."""
        if self._tls is None:
            self._tls = client_tls()
        return self._tls

    # ------------------------------------------------------------------------ built-in tools
    def enable_end_call(self, *, name: str = "end_call") -> None:
        """Offer the model a tool to end the call (after its goodbye). A quiet tool: called with a
        goodbye in the same response, the call ends after it, without a second one."""

        async def end_call(ctx: CallContext) -> dict[str, Any]:
            """End the phone call. Use it when the caller is done or asks to hang up."""
            await ctx.hangup("end_call_tool")
            return {"ok": True, "message": "The call ends after your next sentence. Say a short goodbye now."}

        self.tools.add(end_call, name=name, filler_after=None, timeout=5.0, respond=False)

    def enable_transfer(self, *, name: str = "transfer_call") -> None:
        """Offer the model a tool to transfer to one of the call's transfer targets (by label only). A
        quiet tool, as ``end_call``: the caller hears what the model said as it called it, then the
        transfer.

        The targets are the app's ``transfer_targets``, or those a route or ``Accept(transfer_targets=…)``
        gives the call: the tool lists the call's labels, and a call with none is not offered it.
        """
        if self.transfer_tool is not None:
            raise ValueError(f"enable_transfer was called already (its tool is {self.transfer_tool!r})")
        self._transfer_labels = tuple(self.transfer_targets)
        self.tools._add_tool(self._transfer_call(name, self._transfer_labels))
        self.transfer_tool = name

    @staticmethod
    def _transfer_call(name: str, labels: tuple[str, ...]) -> Tool:
        """The transfer tool offering ``labels`` (its schema's ``enum``: the model can name no other)."""

        async def transfer_call(destination: str, ctx: CallContext) -> dict[str, Any]:
            await ctx.transfer(destination)
            return {"ok": True, "message": f"Transferring to {destination}. Tell the caller in one sentence."}

        transfer_call.__annotations__ = {
            "destination": Literal[labels] if labels else str,
            "ctx": CallContext,
            "return": dict[str, Any],
        }
        transfer_call.__doc__ = (
            "Transfer the caller to a human or another department.\n\n"
            f"Args:\n    destination: Where to transfer: one of {', '.join(labels) or 'none'}."
        )
        return Tool.from_function(transfer_call, name=name, filler_after=None, timeout=5.0, respond=False)

    # ------------------------------------------------------------------------------- routing
    async def decide(self, call: IncomingCall, *, started: threading.Event | None = None) -> Decision:
        """Run the routing hook; without one, the route table's decision or accept with the app's config.

        A hook's :class:`Accept` is layered over the route table's (:meth:`Accept.over`): the fields it
        leaves out are the route's, then the app's. ``started`` is set as the hook starts to run (a sync
        one waits for a worker thread first, should all :data:`HOOK_THREADS` be busy)."""
        if self._route is None:
            return call.route or Accept()
        # (a plain function may block: in a thread, so the route budget still applies, in a copy of this
        # context, so what the hook logs still carries the call_id)
        result = await call_hook(
            self._route, call, is_async=self._route_is_async, pool=self._route_threads, started=started
        )
        if not isinstance(result, Accept | Reject | Refer):
            raise DecisionError(f"on_incoming returned {type(result).__name__}, not Accept/Reject/Refer")
        if isinstance(result, Accept) and isinstance(call.route, Accept):
            # (what the hook leaves out, the call's route gives)
            return result.over(call.route, transfer_tool=self.transfer_tool)
        return result

    def plan(self, accept: Accept | None = None) -> CallPlan:
        """The session and tools for an accepted call (``accept`` overrides on top of the app).

        Plans are cached per distinct decision (the answer path builds each one once); the returned
        session payload is shared and must not be mutated. It holds what JSON carries alone (as
        :func:`sideband.jsonio.loads` gives it back): a value JSON cannot carry (a ``Decimal``, ``bytes``,
        a set, an object of the app's own) raises :class:`SessionConfigError` here, naming where it is,
        rather than failing as the call is answered.
        """
        accept = accept or Accept()
        # (keys sorted: an equal session written in another order is the same plan, not another build)
        session = encode_session(accept.session, sort_keys=True) if accept.session else b""
        key = (
            accept.instructions,
            accept.voice,
            accept.greeting,
            accept.tools,
            session,
            accept.max_call_duration,
            accept.max_idle_duration,
            None if accept.transfer_targets is None else tuple(accept.transfer_targets.items()),
            len(self.tools),
        )
        if (
            self._plans_of is not self.config
        ):  # (replaced: by the object, not its id, which a new one may reuse)
            self._plans.clear()
            self._plans_of = self.config
        plan = self._plans.get(key)
        if plan is None:
            # (from the session as JSON carries it: the same key, the same plan, whatever types wrote it;
            # in the order it was written: a tool schema's properties are the order the model fills them)
            written = encode_session(accept.session) if accept.session else b""
            plan = self._build_plan(accept, jsonio.loads(written) if written else {})
            if len(self._plans) >= 256:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        return plan

    def _build_plan(self, accept: Accept, session: dict[str, Any]) -> CallPlan:
        config = self.config.merged(
            instructions=accept.instructions, voice=accept.voice, greeting=accept.greeting, **session
        )
        targets = self.transfer_targets if accept.transfer_targets is None else accept.transfer_targets
        catalog = self._catalog(targets)
        if accept.tools is None:
            tools = catalog
        elif self.transfer_tool in accept.tools and self.transfer_tool not in catalog:
            raise ValueError(f"{self.transfer_tool!r} is offered, but the call has no transfer targets")
        else:
            tools = catalog.subset(accept.tools)
        # As JSON and back, once per plan: what is sent (the accept, the first session.update) is then
        # plain JSON, and a value JSON cannot carry fails here, a config error, not as the call is answered.
        payload = jsonio.loads(encode_session(config.payload(tools.definitions(style="openai"))))
        return CallPlan(
            payload,
            tools,
            config.greeting,
            config,
            accept.max_call_duration or self.max_call_duration,
            accept.max_idle_duration or self.max_idle_duration,
            targets,
            catalog,
        )

    def _catalog(self, targets: Mapping[str, str]) -> ToolRegistry:
        """The app's tools for a call that may be transferred to ``targets``: the transfer tool lists
        their labels, and is left out when there are none."""
        name = self.transfer_tool
        if name is None or (targets and tuple(targets) == self._transfer_labels):
            return self.tools  # (the app's tool was built for these labels)
        if not targets:
            return self.tools.subset(n for n in self.tools.names() if n != name)
        return self.tools.replacing(self._transfer_call(name, tuple(targets)))
