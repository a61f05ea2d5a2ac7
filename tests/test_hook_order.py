"""The order a call's hooks run in: each kind's events in order, after on_call_start, beside the call's
traffic."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from collections.abc import MutableMapping
from typing import Any

import pytest
import structlog

from sideband import CallContext
from sideband.runtime.driver import CallHooks, CallRuntime
from sideband.runtime.machine import CallMachine, MachineConfig
from sideband.testing import Script, caller_says, model_calls, model_says, pause, wait_for_greeting
from sideband.tools import ToolRegistry

from .conftest import Stack, capture_logs

HELLO = wait_for_greeting("Hello.")


def seen_in_log(event: str) -> asyncio.Event:
    """An event set as soon as ``event`` is logged (inside :func:`capture_logs`): as the call handles it,
    before anything it starts has run."""
    logged = asyncio.Event()
    processors = structlog.get_config()["processors"]
    capture = processors[0]

    def watch(logger: Any, name: str, entry: MutableMapping[str, Any]) -> Any:
        if entry["event"] == event:
            logged.set()
        return capture(logger, name, entry)

    processors[0] = watch
    return logged


def caller_line(n: int, text: str) -> bytes:
    """The server's transcript of the caller's ``n``-th words."""
    return json.dumps(
        {
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": f"item_{n}",
            "transcript": text,
        }
    ).encode()


async def test_sync_hooks_after_an_async_one_see_the_lines_in_order() -> None:
    """Each line's async hook takes a time of its own (the first and third wait until the test lets them
    go, the third first); the sync hook registered after it still gets the lines in order."""
    lines = ["one", "two", "three", "four"]
    gates = {"one": asyncio.Event(), "three": asyncio.Event()}
    first_waits = asyncio.Event()
    loop = asyncio.get_running_loop()
    kept: list[str] = []
    all_kept = asyncio.Event()

    async def enrich(ctx: CallContext, role: str, text: str) -> None:
        gate = gates.get(text)
        if gate is not None:
            if text == "one":
                first_waits.set()
            await gate.wait()

    def keep(ctx: CallContext, role: str, text: str) -> None:
        kept.append(text)
        if len(kept) == len(lines):
            loop.call_soon_threadsafe(all_kept.set)

    async def connect() -> Any:
        raise AssertionError("not attached")

    threads = concurrent.futures.ThreadPoolExecutor(2)
    runtime = CallRuntime(
        machine=CallMachine(MachineConfig(session={"type": "realtime", "instructions": "x"})),
        ctx=CallContext("rtc_order"),
        tools=ToolRegistry(),
        connect=connect,
        hooks=CallHooks(on_transcript=[enrich, keep], executor=threads),
    )
    try:
        for n, text in enumerate(lines):
            runtime._handle(caller_line(n, text))
        await asyncio.wait_for(first_waits.wait(), 5)
        gates["three"].set()
        gates["one"].set()
        await asyncio.wait_for(all_kept.wait(), 5)
    finally:
        for gate in gates.values():
            gate.set()
        await runtime._cleanup()
        threads.shutdown(wait=True)
    assert kept == lines
    assert [text for role, text in runtime.summary.transcript] == lines


async def test_hooks_wait_for_an_async_on_call_start(stack: Stack) -> None:
    """What ``on_call_start`` sets up (a CRM record) is there for every hook after it (if it takes less
    than ``HOOK_SLOW``)."""
    release = asyncio.Event()
    seen: list[tuple[str, Any]] = []
    heard = asyncio.Event()

    @stack.app.on_call_start
    async def open_record(ctx: CallContext) -> None:
        await release.wait()  # a CRM that answers when the test says so
        ctx.state["record"] = f"crm:{ctx.call_id}"

    @stack.app.on_transcript
    async def note(ctx: CallContext, role: str, text: str) -> None:
        seen.append((text, ctx.state.get("record")))
        heard.set()

    with capture_logs():
        line_logged = seen_in_log("transcript")
        call = await stack.call(Script([HELLO, pause(30)]))
        await asyncio.wait_for(line_logged.wait(), 5)  # the greeting's line is in: its hook is due
        release.set()
        await asyncio.wait_for(heard.wait(), 5)
    stack.sim.hang_up(call)
    await stack.ended(call, check_script=False)
    assert seen == [("Hello.", f"crm:{call.call_id}")]


async def test_an_on_call_start_that_runs_on_holds_the_other_hooks_back_a_while_only(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``on_call_start`` that lasts the call (a watcher loop): the other hooks start once it has run
    ``HOOK_SLOW`` seconds, logged, instead of waiting for the call's end and being dropped."""
    monkeypatch.setattr("sideband.runtime.driver.HOOK_SLOW", 0.2)
    watching = asyncio.Event()
    lines: list[str] = []
    heard = asyncio.Event()

    @stack.app.on_call_start
    async def watch(ctx: CallContext) -> None:
        watching.set()
        await asyncio.Event().wait()  # until the call's end cancels it

    @stack.app.on_transcript
    async def note(ctx: CallContext, role: str, text: str) -> None:
        lines.append(text)
        heard.set()

    with capture_logs() as logs:
        slow_logged = seen_in_log("hook.slow")
        call = await stack.call(Script([HELLO, pause(30)]))
        await asyncio.wait_for(heard.wait(), 5)
        assert watching.is_set() and lines == ["Hello."]
        await asyncio.wait_for(slow_logged.wait(), 5)
        assert [e["hook"] for e in logs if e["event"] == "hook.slow"] == ["watch"]
    stack.sim.hang_up(call)
    await stack.ended(call, check_script=False)


async def test_an_object_with_an_async_call_is_an_async_hook(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It runs on the event loop (no hook thread taken to make its coroutine), timed as it runs."""
    monkeypatch.setattr("sideband.runtime.driver.HOOK_SLOW", 0.2)
    release = asyncio.Event()
    loop_thread = threading.get_ident()
    threads: list[int] = []

    class Archive:
        async def __call__(self, ctx: CallContext, role: str, text: str) -> None:
            threads.append(threading.get_ident())
            await release.wait()

    stack.app.on_transcript(Archive())
    with capture_logs() as logs:
        slow_logged = seen_in_log("hook.slow")
        call = await stack.call(Script([HELLO, pause(30)]))
        try:
            await asyncio.wait_for(slow_logged.wait(), 5)
        finally:
            release.set()
        assert threads == [loop_thread]
        assert len([e for e in logs if e["event"] == "hook.slow"]) == 1
    stack.sim.hang_up(call)
    await stack.ended(call, check_script=False)


async def test_a_slow_hook_holds_back_neither_the_tools_nor_the_answers_nor_other_hooks(
    stack: Stack,
) -> None:
    """The first line's hook hangs: the tool round, the model's answer and the ``on_tool`` hook go on,
    the transcript hooks after it wait their turn, and then run in the order of the lines."""
    release = asyncio.Event()
    lines: list[str] = []
    loop = asyncio.get_running_loop()
    audited, all_lines = asyncio.Event(), asyncio.Event()

    @stack.app.on_transcript
    async def store(ctx: CallContext, role: str, text: str) -> None:
        if not lines:
            await release.wait()  # a database write that hangs until the test lets it go
        lines.append(f"{role}: {text}")
        if len(lines) == 3:  # the greeting, the caller, the answer
            all_lines.set()

    @stack.app.on_tool
    def audit(ctx: CallContext, tool: Any) -> None:
        loop.call_soon_threadsafe(audited.set)

    with capture_logs() as logs:
        call = await stack.call(
            Script(
                [
                    HELLO,
                    caller_says("Where is order 7?"),
                    model_calls("lookup_order", {"order_id": "7"}),
                    model_says("It has shipped."),
                    pause(30),
                ],
                step_timeout=10,
            )
        )
        await call.wait_for(lambda c: len(c.responses) == 3 and c.responses[2].status == "completed", 5)
        assert call.function_outputs and json.loads(call.function_outputs[0][1])["status"] == "shipped"
        await asyncio.wait_for(audited.wait(), 5)  # another kind of hook: not held back
        assert lines == []  # the first line's hook still hangs; the lines after it wait
        release.set()
        await asyncio.wait_for(all_lines.wait(), 5)
    stack.sim.hang_up(call)
    await stack.ended(call, check_script=False)
    met = [f"{e['role']}: {e['text']}" for e in logs if e["event"] == "transcript"]
    assert lines == met and len(met) == 3


async def test_an_async_hook_that_runs_long_is_logged_as_slow(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An async hook holds back the call's next hooks as a sync one does: logged all the same."""
    monkeypatch.setattr("sideband.runtime.driver.HOOK_SLOW", 0.2)
    release = asyncio.Event()

    @stack.app.on_transcript
    async def store(ctx: CallContext, role: str, text: str) -> None:
        await release.wait()

    with capture_logs() as logs:
        slow_logged = seen_in_log("hook.slow")
        call = await stack.call(Script([HELLO, pause(30)]))
        try:
            await asyncio.wait_for(slow_logged.wait(), 5)
        finally:
            release.set()
        stack.sim.hang_up(call)
        await stack.ended(call, check_script=False)
    slow = [e for e in logs if e["event"] == "hook.slow"]
    assert [(e["hook"], e["log_level"]) for e in slow] == [("store", "warning")]
    assert slow[0]["running_s"] >= 0.2
