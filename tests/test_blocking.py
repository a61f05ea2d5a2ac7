"""App code that blocks the event loop is named in the log: async tools, call hooks, the routing hook and
the browser gate that call blocking code (every call of the process waits while they run)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from typing import Any

import aiohttp
import pytest

from sideband import CallContext, IncomingCall, Reject
from sideband.blocking import BLOCKED_AFTER, Stepwise
from sideband.testing import Script, caller_says, model_calls, model_says

from .conftest import Stack, capture_logs
from .test_tool_execution import HELLO, outputs, start

HOLD = 0.3  # how long the blocking code below holds the loop: three times BLOCKED_AFTER


def blocked(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == "loop.blocked"]


# -- Stepwise on its own ----------------------------------------------------------------------------


async def test_stepwise_reports_the_steps_that_held_the_loop_once_when_the_coroutine_ends() -> None:
    reports: list[tuple[float, int]] = []

    async def work() -> str:
        await asyncio.sleep(HOLD)  # waiting is not blocking
        time.sleep(HOLD)
        await asyncio.sleep(0)
        time.sleep(BLOCKED_AFTER * 1.5)
        await asyncio.sleep(0)
        assert reports == []  # not before the end
        return "done"

    assert await Stepwise(work(), lambda longest, count: reports.append((longest, count))) == "done"
    assert len(reports) == 1
    longest, count = reports[0]
    assert count == 2
    assert HOLD <= longest < 2 * HOLD  # the awaited sleep is not in it


async def test_stepwise_is_silent_for_code_that_awaits() -> None:
    reports: list[tuple[float, int]] = []

    async def work() -> int:
        for _ in range(3):
            await asyncio.sleep(BLOCKED_AFTER)
        return 7

    assert await Stepwise(work(), lambda *r: reports.append(r)) == 7
    assert reports == []


async def test_stepwise_reports_a_coroutine_that_raises_or_is_cancelled() -> None:
    reports: list[tuple[float, int]] = []
    cleaned = asyncio.Event()

    async def fails() -> None:
        time.sleep(HOLD)
        raise LookupError("no such order")

    with pytest.raises(LookupError, match="no such order"):
        await Stepwise(fails(), lambda *r: reports.append(r))
    assert [count for _, count in reports] == [1]

    started = asyncio.Event()

    async def cancelled() -> None:
        try:
            started.set()
            await asyncio.sleep(10)
        finally:
            time.sleep(HOLD)  # its cleanup blocks: the step the cancellation runs
            cleaned.set()

    async def run() -> None:
        await Stepwise(cancelled(), lambda *r: reports.append(r))

    task = asyncio.create_task(run())
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert cleaned.is_set()
    assert len(reports) == 2 and reports[1][1] == 1 and reports[1][0] >= HOLD


async def test_stepwise_hands_values_and_errors_to_the_coroutine_it_runs() -> None:
    """What the awaited futures give (results, exceptions) reaches the coroutine through the wrapper."""

    async def work() -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[int] = loop.create_future()
        loop.call_soon(ready.set_result, 41)
        failing: asyncio.Future[int] = loop.create_future()
        loop.call_soon(failing.set_exception, KeyError("gone"))
        try:
            await failing
        except KeyError as exc:
            return await ready + 1, str(exc)
        raise AssertionError("the error did not reach the coroutine")

    assert await Stepwise(work(), lambda *r: None) == (42, "'gone'")


# -- over a live call ---------------------------------------------------------------------------------


async def test_an_async_tool_that_blocks_is_named_and_still_answered(stack: Stack) -> None:
    @stack.app.tool(filler_after=None)
    async def slow_lookup(order_id: str) -> str:
        """Look an order up with a blocking client."""
        time.sleep(HOLD)
        return "shipped"

    @stack.app.tool(filler_after=None)
    async def fair_lookup(order_id: str) -> str:
        """Look an order up with an async client."""
        await asyncio.sleep(HOLD)
        return "shipped"

    script = Script(
        [
            HELLO,
            caller_says("where is my order?"),
            model_calls("fair_lookup", {"order_id": "1"}),
            model_says("It shipped."),
            caller_says("and the other one?"),
            model_calls("slow_lookup", {"order_id": "2"}),
            model_says("It shipped too."),
        ]
    )
    with capture_logs() as logs:
        call = await start(stack, script)
        await asyncio.wait_for(call.wait_done(), 10)
        await stack.sim.hang_up(call)
        await stack.ended(call)
    assert outputs(call) == ["shipped", "shipped"]
    lines = blocked(logs)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line["tool"] == "slow_lookup" and line["call_id"] == call.call_id
    assert line["log_level"] == "warning" and line["steps"] == 1
    assert line["blocked_ms"] >= HOLD * 1000
    assert "plain def" in line["detail"]
    finished = [e for e in logs if e["event"] == "tool.finished" and e["tool"] == "slow_lookup"]
    assert finished[0]["tool_call_id"] == line["tool_call_id"]
    assert logs.index(line) < logs.index(finished[0])


async def test_an_async_tools_failure_shows_its_own_frames_not_the_timers(stack: Stack) -> None:
    @stack.app.tool(filler_after=None)
    async def flaky_lookup(order_id: str) -> str:
        """Look an order up."""
        await asyncio.sleep(0)
        raise LookupError(order_id)

    with capture_logs() as logs:
        call = await start(
            stack, Script([HELLO, caller_says("where?"), model_calls("flaky_lookup", {"order_id": "1"})])
        )
        await asyncio.wait_for(call.wait_done(), 10)
        await stack.sim.hang_up(call)
        await stack.ended(call)
    finished = next(e for e in logs if e["event"] == "tool.finished")
    assert finished["outcome"] == "error"
    frames = [line for line in finished["stack"].splitlines() if line.startswith("  File ")]
    assert finished["stack"].endswith("LookupError")
    # the registry called it: nothing in between
    assert frames[-1].endswith("in flaky_lookup") and frames[-2].endswith("in execute")
    assert "sideband/blocking.py" not in finished["stack"] and "_collections_abc" not in finished["stack"]


class Loader:
    """A hook written as an object with an ``async __call__``: run like a sync hook, then awaited."""

    __name__ = "loader"

    async def __call__(self, ctx: CallContext) -> None:
        time.sleep(HOLD)


async def test_an_async_call_hook_that_blocks_is_named(stack: Stack) -> None:
    @stack.app.on_call_start
    async def load_customer(ctx: CallContext) -> None:
        time.sleep(HOLD)

    async def load_history(ctx: CallContext) -> None:
        time.sleep(HOLD)

    stack.app.on_call_start(lambda ctx: load_history(ctx))  # noqa: PLW0108 - a sync function returning a coroutine
    stack.app.on_call_start(Loader())

    with capture_logs() as logs:
        call = await start(stack, Script([HELLO, caller_says("hi"), model_says("Hello!")]))
        await asyncio.wait_for(call.wait_done(), 10)
        await stack.sim.hang_up(call)
        await stack.ended(call)
    lines = blocked(logs)
    assert [(e["hook"], e["call_id"], e["steps"]) for e in lines] == [
        ("load_customer", call.call_id, 1),
        ("<lambda>", call.call_id, 1),
        ("loader", call.call_id, 1),
    ]
    assert all(e["blocked_ms"] >= HOLD * 1000 for e in lines)


async def test_an_async_routing_hook_that_blocks_is_named(stack: Stack) -> None:
    @stack.app.on_incoming
    async def route(call: IncomingCall) -> Reject:
        time.sleep(HOLD)
        return Reject(486)

    with capture_logs() as logs:
        call = await start(stack, Script([]))
    assert call.status == "rejected" and call.reject_body == {"status_code": 486}
    lines = blocked(logs)
    assert [(e["hook"], e["steps"]) for e in lines] == [("on_incoming", 1)]
    assert lines[0]["blocked_ms"] >= HOLD * 1000


@pytest.mark.parametrize("app", [{"browsers": False}], indirect=True)
async def test_an_async_browser_gate_that_blocks_is_named(stack: Stack) -> None:
    @stack.app.authorize_browser
    async def check(request: Any) -> bool:
        time.sleep(HOLD)
        return False

    with capture_logs() as logs:
        async with aiohttp.ClientSession() as http, http.post(stack.url("/rtc/sessions"), json={}) as resp:
            assert resp.status == 403
    lines = blocked(logs)
    assert [(e["hook"], e["steps"]) for e in lines] == [("authorize_browser", 1)]
    assert lines[0]["blocked_ms"] >= HOLD * 1000


async def test_an_async_tool_that_blocks_past_its_timeout_has_timed_out(stack: Stack) -> None:
    """Its timeout's timer cannot fire while it holds the loop: the overrun is seen when it returns."""

    @stack.app.tool(filler_after=None, timeout=BLOCKED_AFTER)
    async def stuck_lookup(order_id: str) -> str:
        """Look an order up with a blocking client."""
        time.sleep(HOLD)
        return "shipped"

    call = await start(
        stack,
        Script(
            [HELLO, caller_says("where?"), model_calls("stuck_lookup", {"order_id": "1"}), model_says("Hm.")]
        ),
    )
    await asyncio.wait_for(call.wait_done(), 10)
    assert outputs(call) == [
        {"error": "timeout", "message": f"The tool took longer than {BLOCKED_AFTER:g} s"}
    ]
    await stack.sim.hang_up(call)
    summary = await stack.ended(call)
    assert [(t.name, t.outcome) for t in summary.tools] == [("stuck_lookup", "timeout")]
