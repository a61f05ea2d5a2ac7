"""Output guardrails: the app's checks on what the model says, run while its words stream in.

The model writes its words faster than the caller hears them (the transcript runs ahead of the audio), so a
check on the words so far can stop a reply before the caller hears the part that broke a rule. An
:class:`OutputGuard` runs the call's guardrails over the text of the model's reply as its transcript deltas
arrive, each time on all the words so far, and once more on the reply's final text: the plain functions at
once, the ``async def`` ones in a task of their own, one check at a time (deltas that arrive meanwhile are
checked together next). The first guardrail that objects *trips*: the guard reports it (the call driver
then stops the reply and has the model answer again, or, once the call is ending, only records it) and
checks nothing more of that reply.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sideband.blocking import BLOCKED_AFTER, PLAIN_GUARDRAIL_DETAIL, log_blocked, timed
from sideband.context import CallContext
from sideband.tools import is_async_callable

__all__ = ["CHECK_TIMEOUT", "GUARDED_DELTAS", "GUARDED_DONE", "OutputGuard", "guardrail_name"]

GUARDED_DELTAS = frozenset(
    {"response.output_audio_transcript.delta", "response.output_text.delta", "response.text.delta"}
)
"""The events that carry the model's words as they stream (audio transcript; text; text's beta name)."""

GUARDED_DONE = frozenset(
    {"response.output_audio_transcript.done", "response.output_text.done", "response.text.done"}
)
"""The events that carry a part's final text (``transcript``, or ``text``)."""

CHECK_TIMEOUT = 5.0
"""Seconds an ``async def`` guardrail may take over one check: then the words pass (``guardrail.failed``
with ``error`` ``timeout``), and the next words are checked."""

_OBJECTIONS_KEPT = 16
"""Replies a guard remembers it objected to (the latest): their later words are not checked, and their tool
calls, held until the words fed so far are checked, are not run. Plenty: the model is stopped a few times a
caller turn at most (``CORRECTIONS``), then left silent until the caller speaks."""

Trip = Callable[[str, str, str | None], bool]
"""What a guard calls when a guardrail objects: ``(guardrail, reason, response_id)``; returns whether the
reply was stopped (``False``: too late, the call is ending)."""


def guardrail_name(fn: Callable[..., Any]) -> str:
    """How logs and metrics name a guardrail: its function's name."""
    return str(getattr(fn, "__name__", None) or type(fn).__name__)


class OutputGuard:
    """One call's output guardrails, fed the model's transcript events (see the module docstring).

    A guardrail is called with ``(ctx, text)``: the call's context and the words of the reply so far. It
    returns a falsy value to let them pass; a string (the reason, which the model is told) or ``True``
    (its name is the reason) to stop the reply. A plain function runs on the event loop as the words
    arrive, before the next event of the call is read: keep it quick (a word list, a regular
    expression). Slower checks (a moderation model) are ``async def``: they run one at a time, on the
    words so far, and get :data:`CHECK_TIMEOUT` seconds. A guardrail that raises (its answer's truth too:
    a numpy array's) or overruns lets the words pass, and is logged (``guardrail.failed``).
    """

    __slots__ = (
        "_async",
        "_checked",
        "_ctx",
        "_current",
        "_failure",
        "_left",
        "_lines",
        "_log",
        "_objected",
        "_parts",
        "_pending",
        "_response",
        "_sync",
        "_task",
        "_told",
        "_trip",
    )

    def __init__(
        self,
        guardrails: Sequence[Callable[..., Any]],
        ctx: CallContext,
        trip: Trip,
        log: Any,
        failure: Callable[[BaseException], dict[str, Any]],
    ) -> None:
        self._sync = tuple(g for g in guardrails if not is_async_callable(g))
        self._async = tuple(g for g in guardrails if is_async_callable(g))
        self._ctx = ctx
        self._trip = trip
        self._log = log
        self._failure = failure  # the log fields for a guardrail's exception
        self._response: str | None = None  # the reply being said
        self._parts: dict[tuple[Any, ...], str] = {}  # its content parts (item, part, kind) → words so far
        # content part → (its reply, its words) not checked yet by the async guardrails
        self._pending: dict[tuple[Any, ...], tuple[str | None, str]] = {}
        self._task: asyncio.Task[None] | None = None
        self._left: set[asyncio.Task[Any]] = set()  # checks left behind at their time, not over yet
        self._current: str | None = None  # the reply whose words the async guardrails check now
        # the last replies tripped on, oldest first (their later words are not checked) → whether that came
        # too late to stop them: the call was ending (their lines are no stopped ones)
        self._objected: dict[str | None, bool] = {}
        # the last words each kind of guardrail checked, with their reply (a server that sends a part as
        # text and as transcript has it checked once)
        self._checked: list[tuple[str | None, str] | None] = [None, None]
        self._lines: tuple[tuple[str | None, int], ...] = ()  # the last agent lines: (reply, index)
        # what the plain guardrails were logged for in a reply: (reply, {(what, guardrail)})
        self._told: tuple[str | None, set[tuple[str, str]]] = (None, set())

    def objected(self, response_id: str | None) -> bool:
        """Whether a guardrail objected to reply ``response_id`` (stopped it, or too late to stop it: its
        tool calls are not run either way). The latest such replies are remembered (16)."""
        return response_id is not None and response_id in self._objected

    @property
    def stopped(self) -> str | None:
        """The id of the last reply a guardrail objected to, if it was stopped (``None`` when that
        objection came too late to stop its reply: the call was ending)."""
        if not self._objected:
            return None
        last = next(reversed(self._objected))
        return None if self._objected[last] else last

    def checking(self, response_id: str | None) -> bool:
        """Whether words of reply ``response_id`` are being checked, or wait to be (any reply's, for
        ``None``)."""
        if self._task is None:
            return False
        if response_id is None or self._current == response_id:
            return True
        return any(r == response_id for r, _ in self._pending.values())

    def line(self, index: int, response_id: str | None) -> bool:
        """The agent's line ``index`` of the transcript, of reply ``response_id``, was written: whether
        that reply was stopped (else the line is remembered, should its reply be stopped later)."""
        if self.objected(response_id):
            return not self._objected[response_id]
        self._lines = (*self._lines[-7:], (response_id, index))
        return False

    def lines_of(self, response_id: str | None) -> list[int]:
        """The indices of the transcript's recent agent lines of reply ``response_id``."""
        return [i for r, i in self._lines if response_id is not None and r == response_id]

    async def settled(self) -> None:
        """Wait until the words fed so far are checked (at once when they are)."""
        task = self._task
        if task is not None:
            await asyncio.wait({task})

    def feed(self, event: dict[str, Any]) -> None:
        """A transcript delta or done event of the model's (``GUARDED_DELTAS``, ``GUARDED_DONE``)."""
        response_id = event.get("response_id")
        response_id = response_id if isinstance(response_id, str) else None
        if self.objected(response_id):
            return
        if response_id != self._response:
            self._response, self._parts = response_id, {}
        etype = str(event.get("type"))
        key = (event.get("item_id"), event.get("content_index"), etype.rsplit(".", 1)[0])
        said = self._parts.get(key, "")
        if etype in GUARDED_DONE:
            final = event.get("transcript", event.get("text"))
            if not isinstance(final, str) or final == said:
                return  # (the words checked, or being checked, already)
            said = final
        else:
            delta = event.get("delta")
            if not isinstance(delta, str) or not delta:
                return
            said += delta
        self._parts[key] = said
        if self._sync and self._fresh(0, response_id, said):
            for check in self._sync:
                reason = self._run_sync(check, said, response_id)
                if reason is not None:
                    self._stop(check, reason, response_id)
                    return
        if self._async:
            self._pending[key] = (response_id, said)
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._run(), name="guardrails")

    def stop(self) -> asyncio.Task[None] | None:
        """Cancel the check under way (the call ends); returns its task, to await."""
        task, self._task = self._task, None
        self._pending.clear()
        if task is not None:
            task.cancel()
        for left in self._left:  # (once more: they may heed it now)
            left.cancel()
        return task

    def _fresh(self, kind: int, response_id: str | None, text: str) -> bool:
        """Whether ``text`` of ``response_id`` is new to the guardrails of ``kind`` (0 sync, 1 async)."""
        if self._checked[kind] == (response_id, text):
            return False
        self._checked[kind] = (response_id, text)
        return True

    def _stop(self, check: Callable[..., Any], reason: str, response_id: str | None) -> None:
        objected = self._objected
        objected.pop(response_id, None)  # (the latest last: see stopped)
        objected[response_id] = False
        if len(objected) > _OBJECTIONS_KEPT:
            del objected[next(iter(objected))]
        try:
            objected[response_id] = not self._trip(guardrail_name(check), reason, response_id)
        except Exception as exc:  # (a bug of ours: the call goes on, its next words are checked)
            self._log.error("guardrail.trip_failed", guardrail=guardrail_name(check), **self._failure(exc))

    async def _run(self) -> None:
        try:
            while self._pending:
                key = next(iter(self._pending))
                response_id, text = self._pending.pop(key)
                if self.objected(response_id):
                    continue
                if not self._fresh(1, response_id, text):
                    continue
                self._current = response_id
                for check in self._async:
                    reason = await self._run_async(check, text)
                    if reason is not None:
                        if not self.objected(response_id):  # (sync ones may have)
                            self._stop(check, reason, response_id)
                        break
        finally:
            if self._task is asyncio.current_task():
                self._task, self._current = None, None

    def _run_sync(self, check: Callable[..., Any], text: str, response_id: str | None) -> str | None:
        """Run one plain guardrail; its reason if it objects, else ``None``."""
        name = guardrail_name(check)
        started = time.perf_counter()
        try:
            verdict = check(self._ctx, text)
            if not inspect.isawaitable(verdict):
                return _reason(check, verdict)  # (its truth may raise too: a numpy array's)
        except Exception as exc:
            if self._first("failed", name, response_id):
                self._log.error("guardrail.failed", guardrail=name, **self._failure(exc))
            return None
        finally:
            took = time.perf_counter() - started
            if took >= BLOCKED_AFTER and self._first("blocked", name, response_id):
                log_blocked(self._log, PLAIN_GUARDRAIL_DETAIL, guardrail=name)(took, 1)
        if inspect.iscoroutine(verdict):
            verdict.close()
        if self._first("failed", name, response_id):
            self._log.error(
                "guardrail.failed",
                guardrail=name,
                error="a plain function returned an awaitable: make the guardrail async def",
            )
        return None

    def _first(self, what: str, name: str, response_id: str | None) -> bool:
        """Whether plain guardrail ``name`` is logged ``what`` (failed, blocked) for the first time in reply
        ``response_id``: it runs at each of the reply's deltas, and is logged once a reply."""
        reply, told = self._told
        if reply != response_id:
            told = set()
            self._told = (response_id, told)
        if (what, name) in told:
            return False
        told.add((what, name))
        return True

    async def _run_async(self, check: Callable[..., Any], text: str) -> str | None:
        """Run one async guardrail; its reason if it objects, else ``None``. It runs as a task of its own,
        left behind (cancelled) at :data:`CHECK_TIMEOUT`: one that swallows its cancellation must not
        hold the checks of every later word, and the tool calls waiting on them."""
        name = guardrail_name(check)
        try:
            checked = timed(check(self._ctx, text), log_blocked(self._log, guardrail=name))
        except Exception as exc:  # (calling it raised before any await)
            self._log.error("guardrail.failed", guardrail=name, **self._failure(exc))
            return None
        check_task = asyncio.get_running_loop().create_task(
            _reason_of(check, checked), name=f"guardrail:{name}"
        )
        try:
            await asyncio.wait({check_task}, timeout=CHECK_TIMEOUT)
        finally:  # (cancelled too when the guard stops: the call ends)
            if not check_task.done():
                check_task.cancel()
                self._left.add(check_task)
                check_task.add_done_callback(self._left_over)
        if not check_task.done():
            self._log.error("guardrail.failed", guardrail=name, error="timeout", timeout_s=CHECK_TIMEOUT)
            return None
        if check_task.cancelled():  # (its own doing: the words pass)
            self._log.error("guardrail.failed", guardrail=name, error="cancelled")
            return None
        failure = check_task.exception()
        if failure is not None:
            self._log.error("guardrail.failed", guardrail=name, **self._failure(failure))
            return None
        return check_task.result()

    def _left_over(self, task: asyncio.Task[Any]) -> None:
        """A check left behind has ended: its outcome taken (asyncio would log it as never retrieved)."""
        self._left.discard(task)
        if not task.cancelled():
            task.exception()


def _reason(check: Callable[..., Any], verdict: Any) -> str | None:
    """A guardrail's answer as the reason it objects (its name for ``True``), or ``None``; raises what the
    answer's truth raises (a numpy array's, an object's ``__bool__``): the guardrail failed."""
    if not verdict:
        return None
    return verdict if isinstance(verdict, str) else guardrail_name(check)


async def _reason_of(check: Callable[..., Any], awaitable: Awaitable[Any]) -> str | None:
    """An async guardrail's answer as :func:`_reason`, in its check's task (what raises is its failure)."""
    return _reason(check, await awaitable)
