"""The call context handed to tools and hooks."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from sideband.session import check_update_fields, encode_session

__all__ = ["NO_ACTIONS", "CallActions", "CallContext", "SipHeader"]

T = TypeVar("T")

_HOP_TIMEOUT = 10.0
"""Seconds a thread waits for the call's loop to carry out an action (it never waits for the call to end;
only a loop that stopped, or was held by blocking code, meanwhile would leave it waiting): then
``TimeoutError``, and the action is withdrawn, never carried out later."""


@dataclass(frozen=True, slots=True)
class SipHeader:
    """One SIP header from the INVITE, in order. **Untrusted**: the caller controls it."""

    name: str
    value: str


class CallActions(Protocol):
    """What a tool or hook may ask of the live call (implemented by the call driver)."""

    def hangup(self, reason: str = ...) -> None: ...
    def transfer(self, target: str) -> None: ...
    def say(self, instructions: str) -> None: ...
    def interrupt(self) -> None: ...
    def collect_digits(self, max_digits: int | None, end: str | None, timeout: float) -> Awaitable[str]: ...
    def send_text(self, text: str) -> None: ...
    def update_session(self, **fields: Any) -> None: ...


class _NoActions:
    """Actions for a context with no live call behind it (unit tests, dry runs)."""

    def hangup(self, reason: str = "hangup") -> None:
        raise RuntimeError("no live call behind this context")

    def transfer(self, target: str) -> None:
        raise RuntimeError("no live call behind this context")

    def say(self, instructions: str) -> None:
        raise RuntimeError("no live call behind this context")

    def interrupt(self) -> None:
        raise RuntimeError("no live call behind this context")

    async def collect_digits(self, max_digits: int | None, end: str | None, timeout: float) -> str:
        raise RuntimeError("no live call behind this context")

    def send_text(self, text: str) -> None:
        raise RuntimeError("no live call behind this context")

    def update_session(self, **fields: Any) -> None:
        raise RuntimeError("no live call behind this context")


NO_ACTIONS: CallActions = _NoActions()
"""Actions for a context with no live call behind it (stateless, shared)."""


class _Through:
    """A run's view of the call's actions: whatever its context's are at the time of the call (the call
    driver while it is live, :data:`NO_ACTIONS` once it has ended)."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: CallContext) -> None:
        self._ctx = ctx

    def hangup(self, reason: str = "hangup") -> None:
        self._ctx._actions.hangup(reason)

    def transfer(self, target: str) -> None:
        self._ctx._actions.transfer(target)

    def say(self, instructions: str) -> None:
        self._ctx._actions.say(instructions)

    def interrupt(self) -> None:
        self._ctx._actions.interrupt()

    def collect_digits(self, max_digits: int | None, end: str | None, timeout: float) -> Awaitable[str]:
        return self._ctx._actions.collect_digits(max_digits, end, timeout)

    def send_text(self, text: str) -> None:
        self._ctx._actions.send_text(text)

    def update_session(self, **fields: Any) -> None:
        self._ctx._actions.update_session(**fields)


class _Overrun:
    """Actions of a tool run that has timed out: the model was told it failed, so nothing it asks for
    afterwards (a transfer the caller was told could not happen) may reach the call."""

    __slots__ = ("_why",)

    def __init__(self, why: str) -> None:
        self._why = why

    def _refuse(self) -> None:
        raise RuntimeError(self._why)

    def hangup(self, reason: str = "hangup") -> None:
        self._refuse()

    def transfer(self, target: str) -> None:
        self._refuse()

    def say(self, instructions: str) -> None:
        self._refuse()

    def interrupt(self) -> None:
        self._refuse()

    async def collect_digits(self, max_digits: int | None, end: str | None, timeout: float) -> str:
        self._refuse()
        return ""

    def send_text(self, text: str) -> None:
        self._refuse()

    def update_session(self, **fields: Any) -> None:
        self._refuse()


class _Done(Coroutine[Any, Any, None]):
    """A coroutine that is already done: what ``hangup``/``transfer`` return (they act as they are
    called). Awaited, or handed to ``asyncio.create_task``/``run_coroutine_threadsafe``, it finishes at
    once; left alone, it is no coroutine never awaited (no warning)."""

    __slots__ = ()

    def send(self, value: Any) -> Any:
        """Finish at once (``StopIteration``), as a coroutine with nothing to wait for does."""
        raise StopIteration

    def throw(self, typ: Any, val: Any = None, tb: Any = None, /) -> Any:
        """Raise what is thrown in: there is nothing under way to catch it."""
        return super().throw(typ, val, tb)

    def close(self) -> None:
        """Nothing to close."""

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # a generator that finishes at once


_DONE: Coroutine[Any, Any, None] = _Done()


@dataclass(init=False, slots=True)
class CallContext:
    """Everything a tool knows about the call it serves.

    ``from_number`` and ``to_number`` are parsed from the SIP ``From``/``To`` headers (E.164 where
    possible). Like ``sip_headers`` they come from the caller's side of the call and are **untrusted**:
    use them to personalise, never to authorise.

    The actions (:meth:`say`, :meth:`interrupt`, :meth:`send_text`, :meth:`update_session`, :meth:`hangup`,
    :meth:`transfer`) may be used from any thread, e.g. from a sync tool, which runs in a worker thread.
    Called off the call's event loop (:attr:`loop`, captured when the call's actions are bound), an action
    hops onto that loop (``loop.call_soon_threadsafe``), and the calling thread waits until the loop has
    carried it out: it then behaves exactly as on the loop, in the same order with the call's other events,
    and returns or raises the same (e.g. ``ValueError`` for a transfer target outside the allow-list). Off the
    loop as on it, ``hangup()`` and ``transfer()`` have been requested by the time they return; the
    awaitable they return is already done, so a sync tool simply calls ``ctx.hangup()``, and an ``async
    def`` one that leaves out the ``await`` still ends the call. A loop that does not take the action
    within 10 s (blocking code holding it) raises ``TimeoutError`` in the calling thread, and the action
    is withdrawn: it is never carried out later.
    """

    call_id: str
    source: str  # "sip", "webrtc" or "vowel"
    from_number: str | None
    to_number: str | None
    sip_headers: tuple[SipHeader, ...]
    state: dict[str, Any]
    _actions: CallActions = field(init=False, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(init=False, repr=False, compare=False)

    def __init__(  # noqa: PLR0917  (the positional order of the former generated __init__)
        self,
        call_id: str,
        source: str = "sip",
        from_number: str | None = None,
        to_number: str | None = None,
        sip_headers: tuple[SipHeader, ...] = (),
        state: dict[str, Any] | None = None,
        actions: CallActions = NO_ACTIONS,
    ) -> None:
        self.call_id = call_id
        self.source = source
        self.from_number = from_number
        self.to_number = to_number
        self.sip_headers = sip_headers
        self.state = {} if state is None else state
        self.actions = actions

    @property
    def actions(self) -> CallActions:
        """What this context's actions call (the call driver; :data:`NO_ACTIONS` without a live call).

        Setting it also captures the running event loop (if any) as :attr:`loop`.
        """
        return self._actions

    @actions.setter
    def actions(self, actions: CallActions) -> None:
        self._actions = actions
        self._loop = _running_loop()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the call runs on (``None`` until known): actions from other threads run there."""
        return self._loop

    def for_run(self) -> CallContext:
        """A view of this context for one tool run: same call, same ``state`` dict, same actions until
        :meth:`_overrun` withdraws them from this view alone."""
        view = object.__new__(CallContext)
        view.call_id, view.source = self.call_id, self.source
        view.from_number, view.to_number = self.from_number, self.to_number
        view.sip_headers, view.state = self.sip_headers, self.state
        view._actions, view._loop = _Through(self), self._loop
        return view

    def _overrun(self, why: str) -> None:
        """The run this view was made for timed out: its actions raise ``RuntimeError(why)`` from now on."""
        self._actions = _Overrun(why)

    def header(self, name: str) -> str | None:
        """First value of the SIP header ``name`` (case-insensitive), untrusted."""
        lname = name.lower()
        for h in self.sip_headers:
            if h.name.lower() == lname:
                return h.value
        return None

    def hangup(self, reason: str = "hangup") -> Coroutine[Any, Any, None]:
        """End the call once in-flight tool outputs and the model's last words are out.

        ``reason`` is the call's end reason (``CallSummary.reason``, ``call.ended``); ``/metrics`` counts
        one that is none of sideband's end reasons as ``reason="app"``.

        The end is asked for as this is called, from an ``async def`` tool or hook (``await
        ctx.hangup()``; without the ``await`` it is asked for all the same) or from a sync one's thread.
        What it returns is a coroutine already done: ``asyncio.create_task(ctx.hangup())`` takes it too.

        Raises ``TypeError`` for a ``reason`` that is not a string and ``ValueError`` for a blank one,
        asking for nothing.
        """
        if not isinstance(reason, str):
            raise TypeError(f"hangup reason must be a string, not {type(reason).__name__}")
        if not reason.strip():
            raise ValueError("hangup reason must not be blank")
        self._act(lambda: self._actions.hangup(reason))
        return _DONE

    def transfer(self, target: str) -> Coroutine[Any, Any, None]:
        """Transfer (SIP REFER) to ``target``, which must be in the app's allow-list (else
        :class:`~sideband.TransferNotAllowed`, raised by this call).

        The transfer is asked for as this is called, as :meth:`hangup` is: ``await ctx.transfer(target)``.
        """
        self._act(lambda: self._actions.transfer(target))
        return _DONE

    def _act(self, action: Callable[[], None]) -> None:
        loop = self._foreign_loop()
        if loop is None:
            action()
        else:
            _call_in(loop, action)

    def say(self, instructions: str) -> None:
        """Ask the model to speak now, following ``instructions`` (a string, else ``TypeError``)."""
        _check_text("say", "instructions", instructions)
        loop = self._foreign_loop()
        if loop is None:
            self._actions.say(instructions)
        else:
            _call_in(loop, lambda: self._actions.say(instructions))

    def interrupt(self) -> None:
        """Stop what the model is saying now: the response under way is cancelled (the tool calls it
        made are not run) and, on phone and browser calls, the audio the caller has not heard yet is
        dropped. A response already asked for (a :meth:`say` sent, not started yet) is cancelled as it
        starts; a ``say()`` still queued is not, so ``ctx.interrupt(); ctx.say("…")`` replaces what the
        model was saying. With nothing being said, it does nothing."""
        loop = self._foreign_loop()
        if loop is None:
            self._actions.interrupt()
        else:
            _call_in(loop, self._actions.interrupt)

    async def collect_digits(
        self, max_digits: int | None = None, *, end: str | None = "#", timeout: float = 5.0
    ) -> str:
        """Collect what the caller keys on the keypad from now on (SIP calls), as a phone menu does:
        ``pin = await ctx.collect_digits(4)``.

        It returns the keys pressed, in order, once ``max_digits`` keys are in, a key of ``end`` is pressed
        (it is not included: ``"#"`` by default, ``None`` for none), or ``timeout`` seconds pass without a key
        (the wait starts again at each key); then with what was keyed so far, possibly ``""``. Keys the caller
        typed ahead (after they last spoke, before the collection began: while the model was still asking,
        say) come first; keys from before they last spoke, or taken by an earlier collection, are not
        collected. The :meth:`~sideband.Sideband.on_dtmf` hooks see every key all the same. A coroutine: from
        an ``async def`` tool or hook. A tool that collects keys waits for the caller: give it a ``timeout``
        of its own long enough, and ``filler_after=None`` (the caller is keying, not waiting)."""
        if max_digits is not None and (type(max_digits) is not int or max_digits < 1):
            raise ValueError(f"max_digits must be a whole number of 1 or more, or None, not {max_digits!r}")
        if end is not None and (not isinstance(end, str) or not end or set(end) - _KEYS):
            raise ValueError(f"end must be keypad keys (0-9, *, #, A-D), or None, not {end!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < 3600:
            raise ValueError(f"timeout must be a number of seconds above 0 (below 3600), not {timeout!r}")
        return await self._actions.collect_digits(max_digits, end, float(timeout))

    def send_text(self, text: str) -> None:
        """Add ``text`` to the conversation as the caller's (a user text item, e.g. what they keyed on
        the keypad: the model does not hear tones), and have the model answer it. It is a caller line of
        the transcript too. ``text`` that is not a string raises ``TypeError``."""
        _check_text("send_text", "text", text)
        loop = self._foreign_loop()
        if loop is None:
            self._actions.send_text(text)
        else:
            _call_in(loop, lambda: self._actions.send_text(text))

    def update_session(self, **fields: Any) -> None:
        """Send a ``session.update`` with these fields (``type`` is added). Names as for
        :class:`~sideband.SessionConfig` work too (``voice="cedar"`` becomes ``audio.output.voice``); a
        field name that is a typo of a known one, or ``greeting`` (said once, as the call starts: use
        :meth:`say`), raises ``SessionConfigError`` (a ``ValueError``).

        ``tools=["refund", "lookup_order"]`` changes the tools the model is offered to these of the app's
        (by name; tools the server runs itself, such as MCP, as objects beside them), and what sideband
        runs with them: a withdrawn tool called later gets ``unknown_tool``, while the calls of a response
        under way at the change (or already asked for) still run with the tools it was offered. A name
        the call cannot offer, or a function tool given as an object, raises ``SessionConfigError``.

        So does a value OpenAI would refuse, with the rest of the update: ``instructions`` that are not a
        string, a ``voice`` that names none (or a misspelt built-in one: ``"marine"``), a ``speed``
        outside 0.25-1.5, a ``tool_choice`` other than ``"auto"``, ``"none"``, ``"required"`` or one of
        the session's tools (``{"type": "function", "name": "refund"}``, an MCP server's label), one
        that forces a tool when the session (with this update) has none, or a value JSON cannot carry
        (a ``Decimal``, ``bytes``, a set, an object of the app's own: the error names where it is).
        OpenAI also refuses to change the voice once the model has spoken in the call (the greeting
        counts): the voice is the app's, the route's or ``Accept``'s."""
        check_update_fields(fields)
        encode_session(fields)  # (a value JSON cannot carry is refused here, not where the update is sent)
        self._act(lambda: self._actions.update_session(**fields))

    def _foreign_loop(self) -> asyncio.AbstractEventLoop | None:
        """The call's loop when called from another thread while it runs, else ``None`` (call directly)."""
        loop = self._loop
        if loop is None or _running_loop() is loop or not loop.is_running():
            return None
        return loop


_KEYS = frozenset("0123456789*#ABCD")


def _check_text(action: str, name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{action}() takes {name} as a string, not {type(value).__name__}")


def _call_in(loop: asyncio.AbstractEventLoop, fn: Callable[[], T]) -> T:
    """Run ``fn`` on ``loop`` (from another thread) and wait for its result or exception.

    A loop that has not started it within :data:`_HOP_TIMEOUT` raises ``TimeoutError`` here, and ``fn``
    is withdrawn: it never runs (the caller was told it failed). One the loop started meanwhile is waited
    for, its outcome the caller's."""
    done: concurrent.futures.Future[T] = concurrent.futures.Future()
    loop.call_soon_threadsafe(_settle, done, fn)
    try:
        try:
            return done.result(_HOP_TIMEOUT)
        except TimeoutError:
            if not done.cancel():  # (fn's own TimeoutError, or the loop started it just now)
                return done.result()
            raise TimeoutError(
                f"the call's event loop did not take the action within {_HOP_TIMEOUT:g} s: it was withdrawn"
            ) from None
    finally:
        del done  # it holds fn's exception, whose traceback holds this frame: no cycle


def _settle(done: concurrent.futures.Future[T], fn: Callable[[], T]) -> None:
    if not done.set_running_or_notify_cancel():
        return  # withdrawn: the thread that asked gave up waiting, and said it failed
    try:
        done.set_result(fn())
    except BaseException as exc:
        done.set_exception(exc)
        del done  # (as in _call_in: the exception's traceback holds this frame)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
