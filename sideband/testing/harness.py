"""Run your app against the simulator in one line: a real sideband server on loopback, a simulator,
and a signed webhook sender between them.

::

    async with run_app(app) as h:
        call = await h.call(Script([wait_for_greeting(), caller_says("Order 42?"),
                                    model_calls("lookup_order", {"order_id": "42"}), model_says("Shipped."),
                                    caller_hangs_up()]))
        summary = await h.ended(call)
        assert [t.outcome for t in summary.tools] == ["ok"]
"""

from __future__ import annotations

import asyncio
import linecache
import sys
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from aiohttp import web

from sideband import blocking, tools
from sideband.app import Sideband
from sideband.edge import SERVICE, create_app
from sideband.logs import logging_configured
from sideband.runtime.driver import CallRuntime, CallSummary
from sideband.runtime.machine import CallMachine
from sideband.service import Service
from sideband.settings import Settings, load_settings

from .script import CallerHangsUp, Script
from .sender import WebhookSender
from .simulator import SimCall, Simulator

__all__ = ["Harness", "harness_settings", "run_app"]

_RING_FAILURES: dict[str, str] = {
    "route_failed": (
        "the routing hook raised, overran its budget or decided something that cannot be sent "
        "(call.route_failed in the log)"
    ),
    "config_invalid": "the session config it was accepted with is invalid (call.config_invalid in the log)",
    "answer_failed": (
        "OpenAI refused to answer it as decided, so the server rejected the call with that status instead "
        "(call.accept_failed or call.answer_failed in the log)"
    ),
}
"""Why the server rejects a call with the route failure status, by the counter each failure moves."""


@dataclass
class Harness:
    """A running app, the simulator it talks to, and a sender for signed webhooks."""

    sim: Simulator
    app: Sideband
    settings: Settings
    base_url: str
    sender: WebhookSender
    service: Service
    _summaries: dict[str, CallSummary] = field(default_factory=dict, init=False, repr=False)
    """The summary of each call :meth:`call` placed that ran on the server (filled in as it runs), so
    :meth:`ended` finds it however many calls ended since (the server keeps only its last few)."""
    _ring_failures: dict[str, tuple[str, ...]] = field(default_factory=dict, init=False, repr=False)
    """Which failure counters of the server's (:data:`_RING_FAILURES`) each call :meth:`call` placed
    moved while its webhook was answered: how a call rejected with the route failure status came to be."""

    @property
    def webhook_url(self) -> str:
        """Where the simulator's webhooks go."""
        return self.base_url + "/webhooks/openai"

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until the server has no live call (every runtime ended and was released).

        Raises :class:`TimeoutError` when calls are still live after ``timeout`` seconds, naming each
        one and where the simulator's call and its script stand."""
        registry = self.service.registry
        try:
            await asyncio.wait_for(registry.wait_idle(), timeout)
        except TimeoutError:
            live = [
                f"{call_id} (simulator status {call.status}, {_script_position(call)})"
                if (call := self.sim.calls.get(call_id)) is not None
                else call_id
                for call_id in registry.calls
            ]
            count = f"{len(live)} live call{'s' if len(live) != 1 else ''}"
            raise TimeoutError(
                f"the server still has {count} after {timeout:g} s: {', '.join(live)}. A call ends when "
                "its caller hangs up (caller_hangs_up(), h.sim.hang_up(call)) or your app ends it"
            ) from None

    def url(self, path: str) -> str:
        """Absolute URL of a route of the server under test."""
        return self.base_url + path

    async def call(self, script: Script, *, expect_status: int = 200, **call_options: Any) -> SimCall:
        """Place a SIP call running ``script`` and deliver its signed webhook, retried as OpenAI does
        after a non-2xx answer; the delivery is kept as ``call.webhook_delivery`` (every attempt).

        Raises :class:`AssertionError` unless every attempt was answered ``expect_status``: a retry
        does not hide an earlier answer (a 500, then a 200 on the retry, fails ``expect_status=200``);
        :class:`TypeError` at once when ``script`` is no :class:`Script` (a list of steps: wrap it,
        ``Script([...])``). The message of the :class:`AssertionError` holds the tracebacks of the
        simulator's internal errors on the call or outside any call, if it had any (a 500 of its own
        failure the app took for OpenAI's, say)."""
        call = self.sim.create_call(script, **call_options)
        counters = self.service.counters
        before = [counters[name] for name in _RING_FAILURES]
        result = call.webhook_delivery = await self.sender.deliver(self.sim.incoming_event(call))
        self._ring_failures[call.call_id] = tuple(
            name for name, count in zip(_RING_FAILURES, before, strict=True) if counters[name] > count
        )
        registry = self.service.registry  # (a call accepted is in the registry once its webhook is answered)
        runtime = registry.calls.get(call.call_id)
        summary = runtime.summary if runtime is not None else registry.recent.get(call.call_id)
        if summary is not None:
            self._summaries[call.call_id] = summary
        if not result.attempts or any(status != expect_status for status in result.attempts):
            answers = ", then ".join(
                str(status) if status is not None else f"nothing ({error})"
                for status, error in zip(result.attempts, result.errors, strict=True)
            )
            broken = _internal_error(self.sim, call)
            raise AssertionError(
                f"call {call.call_id}: webhook answered {answers or 'nothing'}, expected {expect_status} "
                "on every attempt" + (f"; {broken}" if broken is not None else "")
            )
        return call

    async def ended(self, call: SimCall, timeout: float = 10.0, *, check_script: bool = True) -> CallSummary:
        """Wait until our side of ``call`` has ended and its script has finished; return its summary.

        The script must have run whole: when it broke (a step failed, or the call ended before its
        last step, so steps never ran: ``call.script_error``), :class:`AssertionError` says how. A test
        that expects the call to end mid-script (the app hangs up or transfers while the caller still
        has steps to play) passes ``check_script=False``: the script is then neither waited for nor
        checked (``call.script_error`` says where it stopped).

        Raises :class:`TimeoutError` when the call has not ended, or its script not finished, within
        ``timeout`` seconds, naming the script step that failed, if one did (a step that times out does
        not end the call; unless ``check_script=False``, a step that fails while the call goes on is
        reported as soon as it failed, without waiting out ``timeout``), or saying that the simulator has
        ended the call and the server not yet (after ``caller_hangs_up("silent")``: the app's idle limit,
        then up to 10 s for an unanswered goodbye; while a transfer answered 200 is under way, the
        transfer's 45 s window), or, the simulator's call still up, where its script is (or that it has
        finished, no step of it hanging up); and the tool calls that did not succeed, with what the model
        was told (arguments that do not match the tool's parameters, say),
        and :class:`AssertionError` at once when it never ran on the server: rejected at ring time (the
        message gives the SIP status and the reject body), transferred (the target) or never answered.
        :class:`AssertionError` too when the simulator itself failed on the call or outside any call
        (``call.internal_errors``, ``sim.internal_errors``: a bug of the simulator's, not the app's, such
        as a request it answered 500 for its own failure; the message holds the traceback)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        registry = self.service.registry
        runtime = registry.calls.get(call.call_id)
        if runtime is not None:
            outcome = await self._wait_closed(call, runtime, timeout, check_script)
            if outcome != "closed":
                broken = _internal_error(self.sim, call)
                if broken is not None:
                    raise AssertionError(broken)
                tools = _tools_failed(call, runtime.summary)
                if outcome == "script_failed":
                    raise TimeoutError(
                        f"call {call.call_id} has not ended; the script failed: {call.script_error}{tools}"
                    )
                why = f"; the script failed: {call.script_error}" if call.script_error else ""
                if call.status == "ended":
                    why += self._end_unseen(call, runtime.machine)
                else:
                    why += _still_up(call)
                raise TimeoutError(f"call {call.call_id} did not end within {timeout:g} s{why}{tools}")
            summary = runtime.summary
        else:
            found = self._summaries.get(call.call_id) or registry.recent.get(call.call_id)
            if found is None:
                raise AssertionError(_internal_error(self.sim, call) or self._never_ran(call))
            summary = found
        broken = _internal_error(self.sim, call)
        if broken is not None:
            raise AssertionError(broken)
        if check_script:
            await self._script_finished(call, summary, until - loop.time(), timeout)
        return summary

    @staticmethod
    async def _wait_closed(
        call: SimCall, runtime: CallRuntime, timeout: float, check_script: bool
    ) -> Literal["closed", "script_failed", "timeout"]:
        """Wait up to ``timeout`` seconds for ``runtime`` (``call``'s on the server) to close; with
        ``check_script``, no longer than until the call's script failed while the call is still live (a
        failure whatever comes next; a script that failed as the call ended waits for its end)."""
        closed = asyncio.ensure_future(runtime.wait_closed())
        waiting = {closed}
        failed: asyncio.Future[None] | None = None
        if check_script:
            failed = asyncio.ensure_future(
                call.wait_for(lambda c: c.script_error is not None and not c.ended, timeout, "script failed")
            )
            waiting.add(failed)
        try:
            await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
        if closed.done() and not closed.cancelled():
            return "closed"
        if failed is not None and failed.done() and not failed.cancelled() and failed.exception() is None:
            return "script_failed"
        return "timeout"

    @staticmethod
    def _end_unseen(call: SimCall, machine: CallMachine) -> str:
        """Why the server may not have seen the end of ``call``, which has ended on the simulator."""
        why = f"; the simulator's call has ended ({call.end_reason}), the server's not yet"
        config = machine.config
        if machine.transferring:
            window = config.transfer_confirm
            return (
                f"{why}: the server's call awaits the end of its transfer (its REFER was answered 200), "
                "and a caller who hangs up meanwhile with nothing on the sideband is not told from a "
                f"transfer still under way: the call ends once the transfer window ({window:g} s from "
                "the REFER's 200) is over, as transferred (the hangup then finds the call gone): give "
                f"h.ended a timeout above {window:g} s"
            )
        silent = any(isinstance(step, CallerHangsUp) and step.mode == "silent" for step in call.script.steps)
        if not silent:
            return why
        idle, cap = config.max_idle_duration, config.end_cap
        if not idle:
            return (
                f'{why}: a caller who hangs up with nothing on the sideband (caller_hangs_up("silent")) is '
                "noticed by the app's idle limit, and this call has none"
            )
        return (
            f'{why}: a caller who hangs up with nothing on the sideband (caller_hangs_up("silent")) is '
            f"noticed by the app's idle limit ({idle:g} s), whose goodbye then waits, unanswered, up to "
            f"{cap:g} s: give h.ended a timeout above {idle + cap:g} s"
        )

    @staticmethod
    async def _script_finished(call: SimCall, summary: CallSummary, left: float, timeout: float) -> None:
        """Wait up to ``left`` seconds for ``call``'s script to finish; raise if it broke."""
        try:
            await call.wait_for(lambda c: c.script_done, max(left, 0.0), "script finished")
        except TimeoutError:
            raise TimeoutError(
                f"call {call.call_id} ended on the server ({summary.reason}), but its script did not finish "
                f"within {timeout:g} s ({call._describe_position()}, simulator status {call.status})"
            ) from None
        if call.script_error is not None:
            raise AssertionError(
                f"call {call.call_id} ended ({summary.reason}), but its script broke: {call.script_error}. "
                "Pass check_script=False to h.ended if the call is meant to end mid-script"
            )

    def _never_ran(self, call: SimCall) -> str:
        """Why ``call`` has no summary on the server: it was answered without being accepted."""
        where = f"call {call.call_id} never ran on the server"
        if call.status == "rejected":
            body = call.reject_body or {}
            code = body.get("status_code", 603)  # (the calls API's default)
            why = ""
            if code == self.settings.route_failure_status:
                why = f"; {code} is the route failure status: {self._failure_status_cause(call)}"
            return (
                f"{where}: it was rejected at ring time with SIP {code} (reject body {body}){why}. "
                "A rejected call has no end to wait for: check call.status and call.reject_body"
            )
        if call.status == "referred":
            return (
                f"{where}: it was transferred at ring time to {call.refer_target} (a refer, not "
                "accepted). Check call.status and call.refer_target"
            )
        if call.status == "ringing":
            return f"{where}: it is still ringing (no accept, reject or refer reached the simulator)"
        if call.accept_body is not None:  # (placed otherwise than by h.call: only the server's record)
            return (
                f"call {call.call_id} has no summary on the server: the server keeps only its last "
                f"{self.service.registry.RECENT} calls' (it may have run and ended before them), or it never "
                f"ran there (simulator status {call.status}, end reason {call.end_reason}). Place calls "
                "with h.call, whose summaries the harness keeps"
            )
        return f"{where} (simulator status {call.status}, end reason {call.end_reason})"

    def _failure_status_cause(self, call: SimCall) -> str:
        """Why ``call`` was rejected with the route failure status: what OpenAI refused of it (the
        simulator's record), else what the server counted while its webhook was answered."""
        for record in reversed(self.sim.requests):
            verb = record.path.rpartition("/")[2]
            if (
                verb in ("accept", "refer")
                and 400 <= record.status < 500  # (refused: a 5xx is retried, not rejected instead)
                and record.path.endswith(f"/calls/{call.call_id}/{verb}")
            ):
                event = "call.accept_failed" if verb == "accept" else "call.answer_failed"
                return (
                    f"OpenAI refused its {verb} ({record.status}), so the server rejected the call with "
                    f"that status instead ({event} in the log)"
                )
        moved = self._ring_failures.get(call.call_id)
        if moved is None:  # (placed otherwise than by h.call)
            return (
                "did the routing hook raise, overrun its budget or decide something that cannot be sent, "
                "or OpenAI refuse to answer it as decided? (call.route_failed, call.config_invalid, "
                "call.accept_failed or call.answer_failed in the log)"
            )
        causes = [_RING_FAILURES[name] for name in moved]
        if not causes:
            return (
                "no failure was counted for it: the decision for the call was that reject (the app's, its "
                "routing hook's or the route file's)"
            )
        if len(causes) == 1:
            return causes[0]
        return "one of these, counted while its webhook was answered (with other calls'): " + "; or ".join(
            causes
        )


def _still_up(call: SimCall) -> str:
    """Where ``call``, which the simulator has not ended, stands: what its script is doing, or that it
    finished with nothing to end the call."""
    where = f"; the simulator's call is still up (status {call.status})"
    if not call.script_done:
        return f"{where}, {_script_position(call)}"
    if call.script_error is not None:
        return where
    return (
        f"{where} and its script has finished: no step of it hangs up. If the caller is to hang up, end "
        "the script with caller_hangs_up() (or pass hang_up_at_end=True to Script); if your app is to end "
        "the call, it has not"
    )


def _script_position(call: SimCall) -> str:
    """Where ``call``'s script is: the step it is at, or that it has finished."""
    return "its script finished" if call.script_done else f"its script {call._describe_position()}"


_SHOWN_OUTPUT = 300
"""Characters of a tool's output a failure message shows."""


def _tools_failed(call: SimCall, summary: CallSummary) -> str:
    """The tool calls of ``call`` that did not succeed, with the output the model got for each (what
    went wrong: arguments that do not match the tool's parameters, say), or ``""``: none."""
    failed = []
    for record in summary.tools:
        if record.outcome == "ok":
            continue
        output = call.output_for(record.call_id)
        if output is not None and len(output) > _SHOWN_OUTPUT:
            output = output[:_SHOWN_OUTPUT] + "…"
        answer = f", the model was told {output}" if output is not None else ""
        failed.append(f"{record.name} ({record.call_id}): {record.outcome}{answer}")
    return "; tool calls that did not succeed: " + "; ".join(failed) if failed else ""


def _internal_error(sim: Simulator, call: SimCall) -> str | None:
    """What the simulator's internal errors on ``call``, and outside any call, were (their tracebacks),
    or ``None``: none."""
    parts = []
    if call.internal_errors:
        parts.append(
            f"call {call.call_id}: the simulator hit an internal error (a bug of the simulator, not of your "
            "app: what it was handling was answered with a server_error or a 500, or the call's script "
            "failed):\n" + "\n".join(call.internal_errors)
        )
    if sim.internal_errors:
        parts.append(_outside_calls(sim))
    return "\n".join(parts) or None


def _outside_calls(sim: Simulator) -> str:
    """The simulator's internal errors outside any call (their tracebacks)."""
    return (
        "the simulator hit an internal error outside any call (a bug of the simulator, not of your app: "
        "the request it was handling was answered 500):\n" + "\n".join(sim.internal_errors)
    )


def _internal_errors(sim: Simulator) -> str | None:
    """The internal errors the simulator hit on any of its calls or outside them (their tracebacks), or
    ``None``: none."""
    broken = [call for call in sim.calls.values() if call.internal_errors]
    if not broken and not sim.internal_errors:
        return None
    lines = [f"call {call.call_id}:\n" + "\n".join(call.internal_errors) for call in broken]
    if sim.internal_errors:
        lines.append("outside any call:\n" + "\n".join(sim.internal_errors))
    return "the simulator hit internal errors (bugs of the simulator, not of your app):\n" + "\n".join(lines)


def harness_settings(sim: Simulator, **overrides: Any) -> Settings:
    """Settings pointing at ``sim`` (no process environment read)."""
    values: dict[str, Any] = {
        "openai_api_key": sim.api_key,
        "openai_webhook_secret": sim.webhook_secret,
        "openai_base_url": sim.base_url,
        "drain_timeout": 1.0,
    }
    values.update(overrides)
    return load_settings(values, environ={})


@contextmanager
def _logging_as(settings: Settings) -> Iterator[None]:
    """Log as ``sideband serve`` would with ``settings.log_level``/``log_format`` (on stdout) while the
    block runs, then put the process's logging back as it was. Neither set: logging is left alone."""
    if settings.log_level is None and settings.log_format is None:
        yield
        return
    with logging_configured(settings.log_format, settings.log_level or "info"):
        yield


_PACKAGE = str(Path(blocking.__file__).parent)
"""Where sideband's own code is: a frame of a worker thread outside it is the app's."""

_THREADS_GRACE = 1.0
"""Seconds :func:`run_app` gives the app's sync tools and hooks still running as it ends to finish, before
it warns of them (as ``sideband serve`` gives them before leaving them behind)."""

_THREADS_WAIT = 10.0
"""Seconds at most :func:`run_app` waits, as it ends, for a sync tool still within its timeout (a
``timeout=30`` tool whose call hung up meanwhile) to return before it would warn of it."""


def _busy_threads() -> dict[int, tuple[FrameType, FrameType]]:
    """The threads running an app's sync tool or hook now (the work :func:`~sideband.blocking.in_thread`
    hands them), by thread id: each one's innermost frame, and the frame that runs the work."""
    carried = blocking._carried.__code__
    busy = {}
    for ident, top in sys._current_frames().items():
        frame: FrameType | None = top
        while frame is not None and frame.f_code is not carried:
            frame = frame.f_back
        if frame is not None:
            busy[ident] = (top, frame)
    return busy


def _started_since(
    before: dict[int, tuple[FrameType, FrameType]],
) -> list[tuple[threading.Thread, FrameType, FrameType]]:
    """The sync tools and hooks that started running since ``before`` and still run in a thread that
    Python waits for at exit (not a daemon): each one's thread, innermost frame and the frame running it."""
    threads = {thread.ident: thread for thread in threading.enumerate()}
    return [
        (thread, top, carried)
        for ident, (top, carried) in _busy_threads().items()
        if (thread := threads.get(ident)) is not None
        and not thread.daemon
        and not (ident in before and before[ident][1] is carried)
    ]


def _deadline(app: Sideband, carried: FrameType) -> float:
    """When the sync work run by ``carried`` (a frame of :func:`sideband.blocking._carried`) is due, by
    :func:`time.monotonic`: a tool's start plus its timeout; a hook's start (due now: the run has
    ended)."""
    began = carried.f_locals.get("began")
    if not isinstance(began, float):
        return 0.0
    fn = carried.f_locals.get("fn")
    if fn is not tools._call_encoded:
        return began
    args = carried.f_locals.get("args") or ()
    tool = next((t for t in app.tools if args and t.fn is args[0]), None)
    if tool is None:
        return began
    return began + (app.tools.default_timeout if tool.timeout is None else tool.timeout)


def _describe_running(
    app: Sideband, running: list[tuple[threading.Thread, FrameType, FrameType]]
) -> list[str]:
    """What each of the ``running`` sync tools and hooks of ``app`` is, where it is now, and its thread."""
    left = []
    for thread, top, carried in running:
        chain = []  # (the frames the work runs in, from its own down to the innermost)
        frame: FrameType | None = top
        while frame is not None and frame is not carried:
            chain.append(frame)
            frame = frame.f_back
        chain.reverse()
        is_tool = any(f.f_code is tools._call_encoded.__code__ for f in chain)
        own = [f for f in chain if not f.f_code.co_filename.startswith(_PACKAGE)]
        entry = own[0] if own else chain[0] if chain else top
        code = entry.f_code
        name = next((t.name for t in app.tools if getattr(t.fn, "__code__", None) is code), code.co_qualname)
        line = linecache.getline(code.co_filename, entry.f_lineno).strip()
        inner = top.f_code
        deeper = (
            f" (inside {inner.co_qualname}, {inner.co_filename}:{top.f_lineno})" if top is not entry else ""
        )
        left.append(
            f"{'sync tool' if is_tool else 'sync hook'} {name} ({code.co_filename}:{code.co_firstlineno}), "
            f"now at line {entry.f_lineno}"
            + (f": {line}" if line else "")
            + f"{deeper}, in thread {thread.name}"
        )
    return left


async def _warn_of_threads_left(app: Sideband, before: dict[int, tuple[FrameType, FrameType]]) -> None:
    """Warn (:class:`RuntimeWarning`) of the app's sync tools and hooks that started during the run and
    still run past their deadline as it ends: their threads hold up the test process's exit. It waits
    :data:`_THREADS_GRACE` seconds for them, and for a tool within its timeout (the call hung up while it
    ran) up to that timeout, at most :data:`_THREADS_WAIT` seconds; one that returns ends the wait at once."""
    began = time.monotonic()
    running = _started_since(before)
    while running:
        deadlines = [_deadline(app, carried) for _, _, carried in running]
        wait = max(began + _THREADS_GRACE, min(began + _THREADS_WAIT, max(deadlines)))
        if time.monotonic() >= wait:
            break
        await asyncio.sleep(0.02)
        running = _started_since(before)
    waited = time.monotonic() - began
    running = [work for work in running if _deadline(app, work[2]) <= began + waited]
    if not running:
        return
    left = _describe_running(app, running)
    threads = f"{len(left)} worker thread{'s' if len(left) != 1 else ''}"
    warnings.warn(
        f"run_app: {waited:.1f} s after the app stopped, its sync code still runs in {threads} that "
        "Python waits for at exit (a thread cannot be stopped), so the test process will not exit until it "
        "returns: " + "; ".join(left) + ". Give the blocking call in it a timeout of its own: a tool's "
        "timeout answers the model, and cannot stop its thread",
        RuntimeWarning,
        stacklevel=4,
    )


@asynccontextmanager
async def run_app(app: Sideband, sim: Simulator | None = None, **settings: Any) -> AsyncIterator[Harness]:
    """Serve ``app`` on a free loopback port against ``sim`` (a new one if not given); ``settings``
    are :class:`~sideband.Settings` field overrides (e.g. ``max_idle_duration=5``).

    ``log_level`` (and ``log_format``) log the run as ``sideband serve`` would: the lines at that level
    and above, on stdout (where pytest captures them), JSON unless stdout is a terminal. Logging being
    the process's, that holds for all that logs while the app runs; it is put back as it was
    afterwards. Given neither, the process's logging is left as it is.

    The harness's webhook sender (``h.sender``) is the run's: it is closed when the block ends, also on
    a ``sim`` that outlives the run.

    A ``sim`` started on another event loop than the running one (a pytest fixture on a loop of another
    scope than the test's) raises :class:`RuntimeError` at once: its loop is not running meanwhile, so
    it would answer nothing.

    Without a ``sim``, the run's own simulator is checked as it closes: if it hit an internal error on
    any call or outside them (a bug of the simulator's, ``call.internal_errors``, ``sim.internal_errors``:
    a request it answered 500 for its own failure, say), the block raises
    :class:`AssertionError` with the tracebacks (a note on the block's own exception, if it raised one),
    as the ``simulator`` fixture fails its test.

    The app's sync tools and hooks that started during the run and still run a second after it (a tool
    stuck past its timeout: its thread cannot be stopped, and Python waits for it at exit) are named in a
    :class:`RuntimeWarning` as the block ends."""
    own = sim is None
    simulator = sim or Simulator()
    if own:
        await simulator.start()
    else:
        simulator._check_loop()
    failed: Exception | None = None
    report: str | None = None
    busy = _busy_threads()
    try:
        config = harness_settings(simulator, **settings)
        with _logging_as(config):
            runner: web.AppRunner | None = None
            sender: WebhookSender | None = None
            try:
                web_app = create_app(config, app)
                runner = web.AppRunner(web_app, access_log=None)
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                host, port = runner.addresses[0][:2]
                base = f"http://{host}:{port}"
                # The run's own sender (not the simulator's, which would keep it until it closes): a
                # simulator that outlives many runs is left no HTTP session of theirs.
                sender = WebhookSender(base + "/webhooks/openai", simulator.webhook_secret)
                yield Harness(simulator, app, config, base, sender, web_app[SERVICE])
            finally:
                try:
                    if sender is not None:
                        await sender.close()
                finally:
                    try:
                        if runner is not None:
                            await runner.cleanup()
                    finally:
                        await _warn_of_threads_left(app, busy)
    except Exception as exc:
        failed = exc
        raise
    finally:
        if own:
            await simulator.close()
            report = _internal_errors(simulator)
            if report is not None and failed is not None:
                failed.add_note(report)
    if report is not None:
        raise AssertionError(report)
