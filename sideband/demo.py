"""``sideband demo``: the whole system against the built-in simulator. No key, no network."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from sideband.app import IncomingCall, Sideband
from sideband.context import CallContext
from sideband.runtime.driver import CallSummary, ToolRecord
from sideband.session import Accept, Decision
from sideband.testing import (
    Harness,
    Script,
    caller_hangs_up,
    caller_presses,
    caller_says,
    model_calls,
    model_says,
    run_app,
    wait_for_greeting,
)
from sideband.testing.script import WaitForGreeting
from sideband.vowel.dial import run_vowel_demo

__all__ = ["Scenario", "order_desk_scenarios", "run_demo", "valid_number"]

FROM_NUMBER = "+14255550100"
"""Who calls, unless told otherwise."""
TO_NUMBER = "+18005551212"
"""The number called, unless told otherwise."""

_NUMBER = re.compile(r"[A-Za-z0-9+*#._-]{1,64}")


def valid_number(text: str) -> bool:
    """Whether ``text`` can be a demo call's number: a phone number (``+18005551212``, ``18005551212``)
    or a SIP user name (``frontdesk``, ``anonymous``), written into the call's ``From`` or ``To``."""
    return _NUMBER.fullmatch(text) is not None


@dataclass(frozen=True, slots=True)
class Scenario:
    """One simulated call: who calls, and what caller and model do."""

    title: str
    script: Script
    from_number: str = FROM_NUMBER
    to_number: str = TO_NUMBER
    greeting: WaitForGreeting | None = None
    """The caller's first step when the call is greeted: the server's decision for the call (the route
    file, the routing hook, the app) says whether it is, as the call is answered. ``None``: ``script``
    says it all."""


def order_desk_scenarios() -> list[Scenario]:
    """Calls that exercise the bundled order desk: lookup, a failed lookup + transfer, DTMF + end call,
    and a withheld number that routing rejects."""
    return [
        Scenario(
            "order lookup, caller hangs up",
            Script(
                [
                    wait_for_greeting("Example Corp order desk, what's your order number?"),
                    caller_says("Hi, where is my order 1042?"),
                    model_calls("lookup_order", {"order_id": "1042"}, preamble="Let me check that for you."),
                    model_says("Order 1042 shipped with UPS and arrives Thursday."),
                    caller_says("Great, thanks. Bye!"),
                    model_says("You're welcome, goodbye!"),
                    caller_hangs_up(),
                ]
            ),
        ),
        Scenario(
            "unknown order, transfer to a human",
            Script(
                [
                    wait_for_greeting("Example Corp order desk, what's your order number?"),
                    caller_says("Order 9999 please."),
                    model_calls("lookup_order", {"order_id": "9999"}),
                    model_says("I can't find order 9999. Could you repeat the number?"),
                    caller_says("Just get me a person."),
                    model_calls("transfer_call", {"destination": "human"}),
                    model_says("Connecting you to a colleague now."),
                ]
            ),
            from_number="+442071838750",
        ),
        Scenario(
            "keypad entry, model ends the call",
            Script(
                [
                    wait_for_greeting("Example Corp order desk, what's your order number?"),
                    caller_presses("3001"),
                    caller_says("That's 3001."),
                    model_calls("lookup_order", {"order_id": "3001"}),
                    model_says("Order 3001 was delivered on Monday. Anything else?"),
                    caller_says("No, that's all."),
                    model_calls("end_call", {}),
                    model_says("Thanks for calling Example Corp. Goodbye!"),
                ]
            ),
            from_number="+16175550199",
        ),
        Scenario("withheld number, rejected by routing", Script([]), from_number="anonymous"),
    ]


def generic_scenarios(*, from_number: str = FROM_NUMBER, to_number: str = TO_NUMBER) -> list[Scenario]:
    """A plain call for an app the demo knows nothing about, from ``from_number`` to ``to_number``:
    greeted first if the server's decision for it greets."""
    return [
        Scenario(
            "hello and goodbye",
            Script(
                [
                    caller_says("Hello there."),
                    model_says("Hi! How can I help you today?"),
                    caller_hangs_up(),
                ]
            ),
            from_number=from_number,
            to_number=to_number,
            greeting=wait_for_greeting("Hello, how can I help?"),
        )
    ]


MAX_CALLS = 100
"""The most calls one demo places (they run one after another)."""
CALL_TIMEOUT = 10.0
"""Seconds a demo call's script gets to run to its end (the caller's or the model's hangup)."""
END_NOTICED = 5.0
"""Seconds the server gets to see a call's end, beyond the time its end may take once it has
(:meth:`~sideband.runtime.driver.CallRuntime.end_bound`: its ``on_call_end`` hooks' limits and more)."""


class _Printer:
    """Prints each call's story, and tells the demo when a call has ended.

    Its hooks are coroutine functions: they run on the event loop, in the order they were triggered, so
    they may touch loop objects (a plain hook would run in a worker thread, where an
    :class:`asyncio.Event` must not be set)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.ended: dict[str, asyncio.Event] = {}
        self.summaries: dict[str, CallSummary] = {}
        self.t0 = time.monotonic()
        self._shown: dict[str, list[int]] = {}  # per call: transcript lines and tool rounds printed
        self._installed: list[tuple[list[Callable[..., Any]], Callable[..., Any]]] = []

    def line(self, tag: str, text: str) -> None:
        """Write one timestamped line."""
        self.out.write(f"  {time.monotonic() - self.t0:6.2f}s  {tag:<7} {text}\n")
        self.out.flush()

    def install(self, app: Sideband) -> None:
        """Add the printing hooks to ``app`` (see :meth:`uninstall`)."""

        async def transcript(ctx: CallContext, role: str, text: str) -> None:
            if ctx.call_id not in self.summaries:  # (once it ended, its summary printed the rest)
                self._shown.setdefault(ctx.call_id, [0, 0])[0] += 1
                self.line(role, text)

        async def tool(ctx: CallContext, record: ToolRecord) -> None:
            if ctx.call_id not in self.summaries:
                self._shown.setdefault(ctx.call_id, [0, 0])[1] += 1
                self._tool_line(record)

        async def dtmf(ctx: CallContext, digit: str) -> None:
            self.line("keypad", digit)

        async def ended(ctx: CallContext, summary: CallSummary) -> None:
            # The app's own hooks of a kind run before ours: slow ones may have held our lines back
            # until the call's end skipped them. The summary holds them all: the rest is printed here.
            lines, rounds = self._shown.pop(ctx.call_id, (0, 0))
            for role, text in summary.transcript[lines:]:
                self.line(role, text)
            for record in summary.tools[rounds:]:
                self._tool_line(record)
            self.summaries[ctx.call_id] = summary
            self.ended.setdefault(ctx.call_id, asyncio.Event()).set()

        self._installed = [
            (app.on_transcript_hooks, app.on_transcript(transcript)),
            (app.on_tool_hooks, app.on_tool(tool)),
            (app.on_dtmf_hooks, app.on_dtmf(dtmf)),
            (app.on_call_end_hooks, app.on_call_end(ended)),
        ]

    def _tool_line(self, record: ToolRecord) -> None:
        self.line("tool", f"{record.name} → {record.outcome} in {record.duration * 1000:.1f} ms")

    def uninstall(self) -> None:
        """Take the printing hooks off the app again: it may be run (or demonstrated) once more."""
        for hooks, hook in self._installed:
            if hook in hooks:
                hooks.remove(hook)
        self._installed = []


def _plural(count: int, noun: str) -> str:
    """``count`` and ``noun``, in the plural unless ``count`` is 1 (``1 call``, ``2 calls``)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


async def run_demo(
    app: Sideband | None = None,
    *,
    calls: int = 3,
    out: TextIO | None = None,
    routes_file: Path | str | None = None,
    from_number: str | None = None,
    to_number: str | None = None,
) -> int:
    """Place ``calls`` simulated calls (answered ones: the bundled demo adds one that routing rejects)
    through a real server on loopback; print what happens. Returns the exit status.

    ``routes_file`` (``SIDEBAND_ROUTES_FILE`` for ``sideband demo``): the route table that answers
    ``app``'s calls, loaded and checked as ``sideband serve`` does (:class:`~sideband.routing.RouteError`
    if it fails). ``from_number``/``to_number``: the numbers of ``app``'s calls (``+14255550100`` calls
    ``+18005551212`` by default). The bundled demo's calls are scripted for the order desk as it stands,
    with numbers of their own: it takes no numbers (:class:`ValueError`), and says that it does not
    apply a route file."""
    if not 1 <= calls <= MAX_CALLS:
        raise ValueError(f"calls must be between 1 and {MAX_CALLS}, got {calls}")
    for name, number in (("from_number", from_number), ("to_number", to_number)):
        if number is not None and not valid_number(number):
            raise ValueError(f"{name} must be a phone number or a SIP user name, got {number!r}")
    out = out or sys.stdout
    user_app = app
    scenarios: list[Scenario]
    if app is None:
        if from_number is not None or to_number is not None:
            raise ValueError("the bundled demo's calls have numbers of their own: give your app to set them")
        from sideband.examples.order_desk import app as order_desk

        app = order_desk
        *answered, rejected = order_desk_scenarios()
        scenarios = [*(answered[i % len(answered)] for i in range(calls)), rejected]
    else:
        pool = generic_scenarios(from_number=from_number or FROM_NUMBER, to_number=to_number or TO_NUMBER)
        scenarios = [pool[i % len(pool)] for i in range(calls)]

    printer = _Printer(out)
    printer.install(app)
    try:
        placed, failures = await _place_calls(
            app, scenarios, printer, routes_file=routes_file, apply_routes=user_app is not None
        )
    finally:
        printer.uninstall()
    failures += await run_vowel_demo(user_app, out)
    out.write(f"\n{_plural(placed, 'call')} and a trusted-server session, {failures} failed.\n")
    return 1 if failures else 0


async def _place_calls(
    app: Sideband,
    placed: list[Scenario],
    printer: _Printer,
    *,
    routes_file: Path | str | None = None,
    apply_routes: bool = True,
) -> tuple[int, int]:
    """Serve ``app`` (with ``routes_file`` if ``apply_routes``) against the simulator and place the
    ``placed`` calls one after another; returns how many calls it placed, and how many failed (a call
    that did not end in time or broke its script, whose routing hook failed, that OpenAI refused to
    answer as decided, or whose webhook the server never answered with a 2xx)."""
    out = printer.out
    settings: dict[str, Any] = {"max_idle_duration": 30}
    if routes_file and apply_routes:
        settings["routes_file"] = routes_file
    async with run_app(app, **settings) as harness:
        sim, routes = harness.sim, harness.service.routes
        out.write(f"sideband demo: server on {harness.base_url}, simulator at {sim.base_url}\n")
        if routes_file and apply_routes:
            default = " and a default" if routes.default is not None else ""
            out.write(f"routes: {routes_file} ({_plural(len(routes), 'route')}{default})\n")
        elif routes_file:
            out.write(
                f"routes: {routes_file} is not applied: the bundled order desk's calls are scripted for "
                "its own routing (name your app, sideband demo module:attribute, to try a route file)\n"
            )
        openings: dict[str, WaitForGreeting] = {}  # call id → the step a greeted call opens with
        decide = app.decide

        async def deciding(call: IncomingCall, *, started: threading.Event | None = None) -> Decision:
            # The server's decision for the call (route file, routing hook, app), as it is answered: a
            # greeted call's caller waits for the greeting first (its sideband attaches after this).
            decision = await decide(call, started=started)
            opening, simulated = openings.pop(call.call_id, None), sim.calls.get(call.call_id)
            if opening is not None and simulated is not None and isinstance(decision, Accept):
                with contextlib.suppress(Exception):  # (a decision it cannot plan: the server says so)
                    if app.plan(decision).greeting:  # ("": no greeting, as None)
                        script = simulated.script
                        simulated.script = Script(
                            (opening, *script.steps),
                            step_timeout=script.step_timeout,
                            hang_up_at_end=script.hang_up_at_end,
                        )
            return decision

        app.decide = deciding  # type: ignore[method-assign]
        try:
            return await _place(app, placed, openings, harness, printer)
        finally:
            del app.decide  # (the instance's own, the class's method again)


async def _place(
    app: Sideband,
    placed: list[Scenario],
    openings: dict[str, WaitForGreeting],
    harness: Harness,
    printer: _Printer,
) -> tuple[int, int]:
    """Place the ``placed`` calls one after another (see :func:`_place_calls`)."""
    out, sim, counters = printer.out, harness.sim, harness.service.counters
    failures = 0
    for n, scenario in enumerate(placed, 1):
        call = sim.create_call(
            scenario.script, from_number=scenario.from_number, to_number=scenario.to_number
        )
        if scenario.greeting is not None:
            openings[call.call_id] = scenario.greeting
        printer.ended.setdefault(call.call_id, asyncio.Event())
        out.write(
            f"\ncall {n}: {scenario.title}  ({call.call_id}, {scenario.from_number} → {scenario.to_number})\n"
        )
        started = time.monotonic()
        failed_before = counters["route_failed"] + counters["config_invalid"]
        refused_before = counters["answer_failed"]
        result = await harness.sender.deliver(sim.incoming_event(call))
        printer.line(
            "webhook",
            f"{result.status} in {(time.monotonic() - started) * 1000:.1f} ms, call {call.status}",
        )
        if counters["route_failed"] + counters["config_invalid"] > failed_before:
            failures += 1
            printer.line(
                "error",
                "the routing hook failed (it raised, overran its budget or decided something that "
                f"cannot be sent), so the call was {call.status} with "
                f"{harness.settings.route_failure_status}: see call.route_failed or "
                "call.config_invalid in the log",
            )
            continue
        if counters["answer_failed"] > refused_before:
            # OpenAI refused the accept (a session it does not take: a voice, a model...), reject or
            # refer: the server answered the call otherwise, which is no decision of the app's.
            failures += 1
            outcome: str = call.status
            if call.status == "rejected":
                outcome += f" with {(call.reject_body or {}).get('status_code', 603)}"
            printer.line(
                "error",
                f"OpenAI refused to answer the call as decided, so the call was {outcome}: see "
                "call.accept_failed or call.answer_failed in the log",
            )
            continue
        if not result.ok:
            # Not answered (an error of the server's own, say): the call is left ringing, as a rule.
            failures += 1
            answers = ", ".join("no answer" if status is None else str(status) for status in result.attempts)
            left = (
                "so the call was left ringing" if call.status == "ringing" else f"the call is {call.status}"
            )
            printer.line(
                "error", f"the webhook was never answered 2xx ({answers}), {left}: see the server's log"
            )
            continue
        if call.status != "accepted":
            printer.line("end", f"{call.status} ({call.reject_body or call.refer_target or ''})")
            continue
        try:
            await call.wait_ended(timeout=CALL_TIMEOUT)
            # Then its end on the server: its tools stopped, each end hook run for up to its time limit
            # (the demo's own, which hands over the summary, comes last), within the runtime's own bound.
            runtime = harness.service.registry.calls.get(call.call_id)
            bound = runtime.end_bound() if runtime is not None else 0.0
            await asyncio.wait_for(printer.ended[call.call_id].wait(), bound + END_NOTICED)
        except TimeoutError:
            failures += 1
            printer.line("error", f"call did not end in time ({call.script_error or 'no script error'})")
            continue
        summary = printer.summaries[call.call_id]
        printer.line(
            "end",
            f"{summary.reason} after {summary.duration:.2f} s, "
            f"{len(summary.tools)} tool call(s); simulator: {call.end_reason}",
        )
        if call.script_error:
            failures += 1
            printer.line("error", call.script_error)
    return len(placed), failures
