"""Naming the app code that blocks the event loop.

An async tool or hook that calls blocking code (``time.sleep``, ``requests``, a sync database driver, a long
computation) holds the event loop for as long as it runs: every call of the process waits meanwhile, its
events unread, its tools' outputs unsent, its timers late. Nothing can interrupt it (not even the tool's
own timeout), but it can be found: :class:`Stepwise` times each step of a coroutine, the code that runs
between two of its awaits that suspend, and reports the steps that held the loop too long.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar

__all__ = ["BLOCKED_AFTER", "PLAIN_GUARDRAIL_DETAIL", "Stepwise", "in_thread", "log_blocked", "then", "timed"]

T = TypeVar("T")
U = TypeVar("U")

BLOCKED_AFTER = 0.1
"""Seconds one step may run before it counts as blocking (asyncio's debug mode warns at the same)."""

BLOCKED_DETAIL = (
    "the event loop ran nothing else meanwhile, so every call waited: call blocking code from a plain def "
    "(it then runs in a thread), or use an async client"
)


PLAIN_GUARDRAIL_DETAIL = (
    "the event loop ran nothing else meanwhile, so every call waited: a plain guardrail runs on the loop; "
    "keep it quick, or make it async def and await its slow work"
)


def log_blocked(log: Any, detail: str = BLOCKED_DETAIL, **by: str) -> Callable[[float, int], None]:
    """A :class:`Stepwise` report that logs ``loop.blocked`` (a warning) on ``log``, with the fields
    ``by`` naming the tool, hook or guardrail, the longest step in ms, the number of such steps and
    ``detail`` (what to do about it)."""

    def report(longest: float, count: int) -> None:
        log.warning("loop.blocked", **by, blocked_ms=round(longest * 1000), steps=count, detail=detail)

    return report


def timed(awaitable: Awaitable[T], report: Callable[[float, int], None] | None) -> Awaitable[T]:
    """``awaitable`` as a :class:`Stepwise` when it is a coroutine and there is a ``report``; as it is
    otherwise (a future, an object with ``__await__`` of its own: nothing to time step by step)."""
    if report is not None and inspect.iscoroutine(awaitable):
        return Stepwise(awaitable, report)
    return awaitable


async def then(awaitable: Awaitable[T], fn: Callable[[T], U]) -> U:
    """``fn`` of what ``awaitable`` gives, called in the same step as its end: a :class:`Stepwise`
    around it times ``fn`` with that step (like :class:`Stepwise`, its frame is left out of the stacks a
    failure logs)."""
    return fn(await awaitable)


def in_thread(fn: Callable[..., T], /, *args: Any, started: threading.Event | None = None) -> Callable[[], T]:
    """``fn(*args)`` as a worker thread runs it (``loop.run_in_executor(pool, in_thread(fn, …))``): in a
    copy of the caller's context (what it logs carries the call's fields), and with a ``StopIteration``
    it raises (``next()`` on an exhausted iterator) turned into a ``RuntimeError``, as Python does for a
    coroutine: asyncio cannot put a ``StopIteration`` into a future, which would never finish. So is a
    ``GeneratorExit``: awaited from the future, it would end the coroutine awaiting it whatever that
    catches (the task's result lost). ``started`` is set as a thread takes it up (a busy pool queues it
    until then)."""
    return functools.partial(contextvars.copy_context().run, _carried, started, fn, *args)


def _carried(started: threading.Event | None, fn: Callable[..., T], *args: Any) -> T:
    began = time.monotonic()  # noqa: F841 - read from this frame by the testing kit: how long it has run
    if started is not None:
        started.set()
    try:
        return fn(*args)
    except (StopIteration, GeneratorExit) as exc:
        # Its traceback from the function's own frame on: the log's stack names the line that raised.
        raise RuntimeError(f"function raised {type(exc).__name__}").with_traceback(
            exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        ) from exc


class Stepwise(Generator[Any, Any, T]):
    """``await Stepwise(coro, report)`` runs ``coro`` as ``await coro`` would, timing each of its steps.

    When ``coro`` ends (it returns, raises or is cancelled) after one step or more of
    :data:`BLOCKED_AFTER` seconds or longer, ``report(longest, count)`` is called once: the longest of
    those steps in seconds, and how many there were. Two clock reads per step: cheap enough for every
    tool call.
    """

    __slots__ = ("_coro", "_report", "count", "longest")

    def __init__(self, coro: Coroutine[Any, Any, T], report: Callable[[float, int], None]) -> None:
        self._coro = coro
        self._report = report
        self.longest = 0.0
        self.count = 0

    def __await__(self) -> Generator[Any, Any, T]:
        return self

    def __next__(self) -> Any:  # (what ``await`` calls for most steps: one frame fewer than the mixin's)
        return self.send(None)

    def send(self, value: Any) -> Any:
        start = time.perf_counter()
        ended = True
        try:
            step = self._coro.send(value)
            ended = False
            return step
        finally:
            self._step(time.perf_counter() - start, ended)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        start = time.perf_counter()
        ended = True
        try:
            # (the one-argument form where it can be: the three-argument one is deprecated from 3.12)
            step = self._coro.throw(typ) if val is None and tb is None else self._coro.throw(typ, val, tb)
            ended = False
            return step
        finally:
            # The exception, raised on out of here, keeps this frame in its traceback: not it in turn.
            typ = val = tb = None
            self._step(time.perf_counter() - start, ended)

    def close(self) -> None:
        self._coro.close()

    def _step(self, took: float, ended: bool) -> None:
        if took >= BLOCKED_AFTER:
            self.count += 1
            self.longest = max(self.longest, took)
        if ended and self.count:
            self._report(self.longest, self.count)
