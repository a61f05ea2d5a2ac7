"""Histograms and tool-round counts as ``/metrics`` renders them (Prometheus text format)."""

from __future__ import annotations

import json
from typing import Any, get_args

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from sideband import CallContext, Sideband
from sideband.metrics import (
    BROWSER_REFUSALS,
    END_REASONS,
    EVENT_OUTCOMES,
    REFUSALS,
    TOOL_OUTCOMES,
    UNKNOWN_TOOL,
    UNKNOWN_TOOL_OUTCOMES,
    Histogram,
    ToolStats,
)
from sideband.testing import (
    Harness,
    Script,
    Simulator,
    caller_hangs_up,
    caller_says,
    model_calls,
    model_says,
    run_app,
    wait_for_greeting,
)
from sideband.tools import Outcome

from .conftest import TEST_SETTINGS, Stack, capture_logs, make_app


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    hist = Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 3.0):
        hist.observe(seconds)
    assert hist.lines("t_seconds") == [
        "# TYPE t_seconds histogram",
        't_seconds_bucket{le="0.1"} 2',  # (a bound is inclusive: 0.1 counts in it)
        't_seconds_bucket{le="1"} 4',
        't_seconds_bucket{le="+Inf"} 5',
        "t_seconds_sum 4.650000",
        "t_seconds_count 5",
    ]
    assert hist.count() == 5


def test_histogram_series_per_label_sorted_and_escaped() -> None:
    hist = Histogram((1.0,))
    hist.observe(2.0, 'b"\\')
    hist.observe(0.5, "a")
    assert hist.lines("x", "tool") == [
        "# TYPE x histogram",
        'x_bucket{tool="a",le="1"} 1',
        'x_bucket{tool="a",le="+Inf"} 1',
        'x_sum{tool="a"} 0.500000',
        'x_count{tool="a"} 1',
        'x_bucket{tool="b\\"\\\\",le="1"} 0',
        'x_bucket{tool="b\\"\\\\",le="+Inf"} 1',
        'x_sum{tool="b\\"\\\\"} 2.000000',
        'x_count{tool="b\\"\\\\"} 1',
    ]
    assert Histogram().lines("empty") == ["# TYPE empty histogram"]  # no series before a first value


def test_tool_stats_time_only_the_runs() -> None:
    stats = ToolStats()
    stats.record("lookup", "ok", 0.02)
    stats.record("lookup", "timeout", 10.0)
    stats.record("lookup", "cancelled", 0.3)
    for outcome in ("invalid_arguments", "loop_breaker"):
        stats.record("lookup", outcome, 0.0)
    stats.record(UNKNOWN_TOOL, "unknown_tool", 0.0)
    assert +stats.outcomes == {  # (the counts above 0)
        ("lookup", "ok"): 1,
        ("lookup", "timeout"): 1,
        ("lookup", "cancelled"): 1,
        ("lookup", "invalid_arguments"): 1,
        ("lookup", "loop_breaker"): 1,
        (UNKNOWN_TOOL, "unknown_tool"): 1,
    }
    assert stats.seconds.count("lookup") == 3  # the function ran three times
    assert stats.seconds.count(UNKNOWN_TOOL) == 0
    lines = stats.lines()
    assert 'sideband_tool_calls_total{tool="lookup",outcome="timeout"} 1' in lines
    assert 'sideband_tool_seconds_bucket{tool="lookup",le="10"} 3' in lines


async def test_metrics_count_tool_rounds_and_time_the_accept(stack: Stack) -> None:
    script = Script(
        [
            wait_for_greeting("Hello."),
            caller_says("Order 42, and anything else you have."),
            model_calls(
                [("lookup_order", {"order_id": "42"}), ("broken", {}), ("made_up_tool", {})], undeclared=True
            ),
            model_says("Here is what I found."),
            caller_hangs_up(),
        ]
    )
    call = stack.sim.create_call(script)
    result = await stack.sender.deliver(stack.sim.incoming_event(call))
    assert result.status == 200, result
    await call.wait_done(timeout=10)
    await stack.ended(call)
    outputs = [e["item"] for e in call.received if e["type"] == "conversation.item.create"]
    assert sorted(json.loads(o["output"]).get("error", "ok") for o in outputs) == [
        "ok",
        "tool_failed",
        "unknown_tool",
    ]
    async with aiohttp.ClientSession() as http, http.get(stack.url("/metrics")) as resp:
        lines = (await resp.text()).splitlines()
    for line in (
        'sideband_tool_calls_total{tool="lookup_order",outcome="ok"} 1',
        'sideband_tool_calls_total{tool="broken",outcome="error"} 1',
        # The model's made-up name is no label: it would start a series of its own.
        'sideband_tool_calls_total{tool="(unknown)",outcome="unknown_tool"} 1',
        'sideband_tool_seconds_count{tool="lookup_order"} 1',
        'sideband_tool_seconds_count{tool="broken"} 1',
        'sideband_accept_seconds_bucket{le="+Inf"} 1',
        "sideband_accept_seconds_count 1",
    ):
        assert line in lines, "\n".join(lines)
    assert not [line for line in lines if "made_up_tool" in line or 'seconds_count{tool="(unknown)"' in line]
    families = {f.name: f for f in text_string_to_metric_families("\n".join(lines) + "\n")}
    accept = families["sideband_accept_seconds"]
    assert accept.type == "histogram"
    total = next(s.value for s in accept.samples if s.name == "sideband_accept_seconds_sum")
    assert 0 < total < 10
    tool_seconds = families["sideband_tool_seconds"]
    assert tool_seconds.type == "histogram"
    timed = {s.labels["tool"]: s.value for s in tool_seconds.samples if s.name.endswith("_count")}
    assert timed == {tool: 1 if tool in ("lookup_order", "broken") else 0 for tool in stack.app.tools.names()}
    assert families["sideband_tool_calls"].type == "counter"


async def counters(url: str) -> dict[str, dict[tuple[str, ...], float]]:
    """The ``_total`` samples of ``/metrics`` (and the histograms' ``_count``), per family, as
    ``{label values: value}``."""
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        text = await resp.text()
    families = text_string_to_metric_families(text)
    return {
        f.name: {
            tuple(s.labels.values()): s.value
            for s in f.samples
            if s.name.endswith("_total") or s.name.endswith("_count")
        }
        for f in families
        if f.type in ("counter", "histogram")
    }


async def test_a_fresh_instance_shows_the_known_series_of_its_counters_at_zero(simulator: Simulator) -> None:
    # A series that first appears at 1 has no increase in Prometheus: the first failure after a start
    # would not show in rate() or increase(), nor in an alert on them.
    app = make_app()

    @app.guardrail
    def no_promises(ctx: CallContext, text: str) -> bool:
        return "guarantee" in text

    async with run_app(app, simulator, **TEST_SETTINGS) as h:
        found = await counters(h.url("/metrics"))
    tools = app.tools.names()
    assert set(tools) == {"end_call", "transfer_call", "lookup_order", "broken", "refuse"}
    assert found["sideband_calls_ended"] == {(reason,): 0 for reason in (*END_REASONS, "app")}
    assert found["sideband_events"] == {(outcome,): 0 for outcome in EVENT_OUTCOMES}
    assert found["sideband_tool_calls"] == {
        **{(tool, outcome): 0 for tool in tools for outcome in TOOL_OUTCOMES},
        **{(UNKNOWN_TOOL, outcome): 0 for outcome in UNKNOWN_TOOL_OUTCOMES},
    }
    assert found["sideband_guardrail_trips"] == {("no_promises",): 0}
    assert found["sideband_route_reloads"] == {("ok",): 0, ("failed",): 0}
    refusals = {(event, str(status)): 0 for event, status in (*REFUSALS, *BROWSER_REFUSALS)}
    assert found["sideband_requests_refused"] == refusals
    assert {"accepted", "busy", "route_failed", "answer_failed"} <= set(EVENT_OUTCOMES)
    assert set(get_args(Outcome)) <= set(TOOL_OUTCOMES)  # (each outcome a tool's run may have)
    # The histograms too: the first accept, turn or tool round after a start shows in rate().
    assert found["sideband_accept_seconds"] == {(): 0}
    assert found["sideband_turn_seconds"] == {(): 0}
    assert found["sideband_tool_seconds"] == {(tool,): 0 for tool in tools}


async def test_an_app_without_webrtc_starts_with_its_refusals_as_rtc_closed(simulator: Simulator) -> None:
    app = Sideband(instructions="A desk.")

    @app.tool
    def lookup(order_id: str) -> dict[str, Any]:
        """Look up an order."""
        return {"order_id": order_id}

    async with run_app(app, simulator, **TEST_SETTINGS) as h:
        found = await counters(h.url("/metrics"))
    refused = found["sideband_requests_refused"]
    assert refused == {**{(e, str(s)): 0 for e, s in REFUSALS}, ("rtc.closed", "404"): 0}
    assert found["sideband_tool_calls"][("lookup", "timeout")] == 0
    assert found.get("sideband_guardrail_trips", {}) == {}


async def test_a_reason_of_the_apps_own_is_counted_as_app(simulator: Simulator) -> None:
    # ctx.hangup(reason) takes any text, perhaps the caller's words: as a label, each would start a
    # series of its own. The end reasons count as themselves, any other under "app"; the text itself is
    # in the summary and the call.ended line.
    app = make_app()
    said = 'caller said "stop"\nand hung up \\ '

    @app.tool(filler_after=None)
    async def give_up(why: str, ctx: CallContext) -> str:
        """Ends the call, saying why."""
        await ctx.hangup(why)
        return "bye"

    @app.tool(filler_after=None)
    async def plain_hangup(ctx: CallContext) -> str:
        """Ends the call."""
        await ctx.hangup()
        return "bye"

    async def one_call(h: Harness, tool: str, arguments: dict[str, Any]) -> str:
        script = Script(
            [wait_for_greeting("Hi."), caller_says("Stop."), model_calls(tool, arguments), model_says("Bye!")]
        )
        call = h.sim.create_call(script)
        assert (await h.sender.deliver(h.sim.incoming_event(call))).status == 200
        return (await h.ended(call)).reason

    async with run_app(app, simulator, **TEST_SETTINGS) as h:
        with capture_logs() as logs:
            assert await one_call(h, "give_up", {"why": said}) == said
            assert await one_call(h, "give_up", {"why": "something else"}) == "something else"
            assert await one_call(h, "plain_hangup", {}) == "hangup"
        found = await counters(h.url("/metrics"))
    ended = found["sideband_calls_ended"]
    assert {reason: n for (reason,), n in ended.items() if n} == {"app": 2, "hangup": 1}
    assert set(ended) == {(reason,) for reason in (*END_REASONS, "app")}
    assert [e["reason"] for e in logs if e["event"] == "call.ended"] == [said, "something else", "hangup"]
