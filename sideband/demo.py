"""``sideband demo``: the whole system against the built-in simulator. No key, no network."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from sideband.app import Sideband
from sideband.context import CallContext
from sideband.runtime.driver import CallSummary, ToolRecord
from sideband.testing import (
    Script,
    caller_hangs_up,
    caller_presses,
    caller_says,
    model_calls,
    model_says,
    run_app,
    wait_for_greeting,
)
from sideband.vowel.dial import run_vowel_demo

__all__ = ["Scenario", "order_desk_scenarios", "run_demo"]


@dataclass(frozen=True, slots=True)
class Scenario:
    """One simulated call: who calls, and what caller and model do."""

    title: str
    script: Script
    from_number: str = "+14255550100"
    to_number: str = "+18005551212"


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


def generic_scenarios(app: Sideband) -> list[Scenario]:
    """A plain call for an app the demo knows nothing about (greeted first if the app greets)."""
    greets = bool(app.plan().greeting)  # ("": no greeting, as None)
    opening = [wait_for_greeting("Hello, how can I help?")] if greets else []
    return [
        Scenario(
            "hello and goodbye",
            Script(
                [
                    *opening,
                    caller_says("Hello there."),
                    model_says("Hi! How can I help you today?"),
                    caller_hangs_up(),
                ]
            ),
        )
    ]


MAX_CALLS = 100
"""The most calls one demo places (they run one after another)."""


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
        self._installed: list[tuple[list[Callable[..., Any]], Callable[..., Any]]] = []

    def line(self, tag: str, text: str) -> None:
        """Write one timestamped line."""
        self.out.write(f"  {time.monotonic() - self.t0:6.2f}s  {tag:<7} {text}\n")
        self.out.flush()

    def install(self, app: Sideband) -> None:
        """Add the printing hooks to ``app`` (see :meth:`uninstall`)."""

        async def transcript(ctx: CallContext, role: str, text: str) -> None:
            self.line(role, text)

        async def tool(ctx: CallContext, record: ToolRecord) -> None:
            self.line("tool", f"{record.name} → {record.outcome} in {record.duration * 1000:.1f} ms")

        async def dtmf(ctx: CallContext, digit: str) -> None:
            self.line("keypad", digit)

        async def ended(ctx: CallContext, summary: CallSummary) -> None:
            self.summaries[ctx.call_id] = summary
            self.ended.setdefault(ctx.call_id, asyncio.Event()).set()

        self._installed = [
            (app.on_transcript_hooks, app.on_transcript(transcript)),
            (app.on_tool_hooks, app.on_tool(tool)),
            (app.on_dtmf_hooks, app.on_dtmf(dtmf)),
            (app.on_call_end_hooks, app.on_call_end(ended)),
        ]

    def uninstall(self) -> None:
        """Take the printing hooks off the app again: it may be run (or demonstrated) once more."""
        for hooks, hook in self._installed:
            if hook in hooks:
                hooks.remove(hook)
        self._installed = []


def _plural(count: int, noun: str) -> str:
    """``count`` and ``noun``, in the plural unless ``count`` is 1 (``1 call``, ``2 calls``)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


async def run_demo(app: Sideband | None = None, *, calls: int = 3, out: TextIO | None = None) -> int:
    """Place ``calls`` simulated calls (answered ones: the bundled demo adds one that routing rejects)
    through a real server on loopback; print what happens. Returns the exit status."""
    if not 1 <= calls <= MAX_CALLS:
        raise ValueError(f"calls must be between 1 and {MAX_CALLS}, got {calls}")
    out = out or sys.stdout
    scenarios: list[Scenario]
    user_app = app
    if app is None:
        from sideband.examples.order_desk import app as order_desk

        app = order_desk
        *answered, rejected = order_desk_scenarios()
        scenarios = [*(answered[i % len(answered)] for i in range(calls)), rejected]
    else:
        pool = generic_scenarios(app)
        scenarios = [pool[i % len(pool)] for i in range(calls)]
    printer = _Printer(out)
    printer.install(app)
    try:
        failures = await _place_calls(app, scenarios, printer)
    finally:
        printer.uninstall()
    failures += await run_vowel_demo(user_app, out)
    out.write(f"\n{_plural(len(scenarios), 'call')} and a trusted-server session, {failures} failed.\n")
    return 1 if failures else 0


async def _place_calls(app: Sideband, scenarios: list[Scenario], printer: _Printer) -> int:
    """Serve ``app`` against the simulator and place the ``scenarios`` one after another; returns how
    many failed (a call that did not end in time or broke its script, or whose routing hook failed)."""
    out = printer.out
    failures = 0
    async with run_app(app, max_idle_duration=30) as harness:
        sim, counters = harness.sim, harness.service.counters
        out.write(f"sideband demo: server on {harness.base_url}, simulator at {sim.base_url}\n")
        for n, scenario in enumerate(scenarios, 1):
            call = sim.create_call(
                scenario.script, from_number=scenario.from_number, to_number=scenario.to_number
            )
            printer.ended.setdefault(call.call_id, asyncio.Event())
            out.write(
                f"\ncall {n}: {scenario.title}  ({call.call_id}, {scenario.from_number} → "
                f"{scenario.to_number})\n"
            )
            started = time.monotonic()
            failed_before = counters["route_failed"] + counters["config_invalid"]
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
            if call.status != "accepted":
                printer.line("end", f"{call.status} ({call.reject_body or call.refer_target or ''})")
                continue
            try:
                await asyncio.wait_for(printer.ended[call.call_id].wait(), 10)
                await call.wait_ended(timeout=5)
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
    return failures
