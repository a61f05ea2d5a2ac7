"""Call runtime edges: hook ordering and time limits, task ownership, attach retries, failed transfers and
tools cancelled by the call's end — over loopback against the simulators."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import json
import sys
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import pytest
import structlog

from sideband import CallContext, CallSummary, Sideband, TranscriptRole
from sideband.runtime.driver import HOOK_GRACE, CallHooks, CallRuntime
from sideband.runtime.machine import CallMachine, CancelTimer, MachineConfig, StartTimer
from sideband.testing import (
    Script,
    SimCall,
    Simulator,
    caller_hangs_up,
    caller_presses,
    caller_says,
    model_answers,
    model_calls,
    model_says,
    pause,
    run_app,
    wait_for_greeting,
)
from sideband.testing.vowel import VowelSimulator
from sideband.tools import ToolRegistry
from sideband.upstream._ws import PushConnection
from sideband.upstream.openai import CallGone, SidebandRefused, UpstreamError, connect_sideband

from .conftest import TEST_SETTINGS, Stack, asked, capture_logs, make_app, transfer_window, untagged
from .test_call_runtime import until

HELLO = wait_for_greeting("Hello.")


def creates(call: Any) -> list[str]:
    """The instructions of each response.create the sideband sent ("" for a plain one)."""
    return [
        (e.get("response") or {}).get("instructions") or ""
        for e in call.received
        if e["type"] == "response.create"
    ]


def server_errors(call: Any) -> list[dict[str, Any]]:
    return [e for e in call.sent if e["type"] == "error"]


# ------------------------------------------------------------------------------- on_call_start order
async def test_on_call_start_actions_follow_the_session_config_and_the_greeting(simulator: Simulator) -> None:
    greeting = "Greet the test caller."
    app = make_app(greeting=greeting)

    @app.on_call_start
    async def personalise(ctx: CallContext) -> None:
        ctx.update_session(instructions="The caller is Alice, a VIP.")
        ctx.say("Tell the caller this call is recorded.")

    async with run_app(app, simulator, **TEST_SETTINGS) as h:
        call = await h.call(Script([HELLO], step_timeout=10))
        # the greeting and the hook's `say`, each answered in turn
        await call.wait_for(
            lambda c: len(c.responses) == 2 and c.responses[1].status == "completed", timeout=5
        )
        await simulator.hang_up(call)
        await h.ended(call)
    kinds = [e["type"] for e in call.received]
    assert kinds == ["session.update", "response.create", "session.update", "response.create"]
    first = call.received[0]["session"]
    assert first["instructions"] == "You are a test desk." and "tools" in first  # the machine's own config
    assert call.received[2]["session"] == {"instructions": "The caller is Alice, a VIP.", "type": "realtime"}
    assert creates(call) == [greeting, "Tell the caller this call is recorded."]  # one greeting, first
    assert [asked(r.request) for r in call.responses] == [
        {"instructions": greeting},
        {"instructions": "Tell the caller this call is recorded."},
    ]
    assert not server_errors(call)  # the say waited for the greeting's response.done


_TURN_EVENTS = frozenset({"response.create", "response.done", "input_audio_buffer.speech_started", "error"})


def turn_order(call: SimCall) -> list[tuple[str, str]]:
    """The creates received, the responses ended, the caller's speech and the errors, in wire order."""
    return [(way, e["type"]) for way, e in call.timeline if e["type"] in _TURN_EVENTS]


async def test_a_say_from_on_call_start_goes_out_after_the_greeting_before_the_callers_turn(
    stack: Stack,
) -> None:
    """The hook's say() is asked for as the greeting's response ends: a caller who lets the greeting end
    hears it before their own turn, and nothing is refused."""

    @stack.app.on_call_start
    async def menu(ctx: CallContext) -> None:
        ctx.say("Say the menu.")

    greeting = stack.app.config.greeting
    call = await stack.call(
        Script(
            [
                HELLO,
                model_answers("We have three options."),  # (waits for the say's create)
                caller_says("Option two."),
                model_says("Sure."),
                caller_hangs_up(),
            ]
        )
    )
    await stack.ended(call)
    assert turn_order(call) == [
        ("received", "response.create"),  # the greeting
        ("sent", "response.done"),
        ("received", "response.create"),  # the say, before the caller's turn
        ("sent", "response.done"),
        ("sent", "input_audio_buffer.speech_started"),
        ("sent", "response.done"),  # the server's own answer to the caller
    ]
    assert creates(call) == [greeting, "Say the menu."]
    assert [(r.trigger, r.text) for r in call.responses] == [
        ("response.create", "Hello."),
        ("response.create", "We have three options."),
        ("vad", "Sure."),
    ]
    assert not server_errors(call)


async def test_a_say_from_on_call_start_crossed_by_a_caller_speaking_at_once_follows_their_turn(
    stack: Stack,
) -> None:
    """Scripted steps follow each other at once: the caller's whole turn, and the server's answer to it,
    come with the greeting's end, before the say asked for then can arrive. The say is refused once and
    said after that answer (as the README's testing section says)."""

    @stack.app.on_call_start
    async def menu(ctx: CallContext) -> None:
        ctx.say("Say the menu.")

    greeting = stack.app.config.greeting
    call = await stack.call(
        Script(
            [
                HELLO,
                caller_says("Option two."),
                model_says("Sure."),
                model_answers("We have three options."),
                caller_hangs_up(),
            ]
        )
    )
    await stack.ended(call)
    assert turn_order(call) == [
        ("received", "response.create"),  # the greeting
        ("sent", "response.done"),
        ("sent", "input_audio_buffer.speech_started"),
        ("received", "response.create"),  # the say, during the server's answer to the caller
        ("sent", "error"),
        ("sent", "response.done"),
        ("received", "response.create"),  # asked again
        ("sent", "response.done"),
    ]
    assert creates(call) == [greeting, "Say the menu.", "Say the menu."]
    assert [e["error"]["code"] for e in server_errors(call)] == ["conversation_already_has_active_response"]
    assert [(r.trigger, r.text) for r in call.responses] == [
        ("response.create", "Hello."),
        ("vad", "Sure."),
        ("response.create", "We have three options."),
    ]


async def test_vowel_on_call_start_actions_wait_for_the_engine_session(vowel: VowelSimulator) -> None:
    from sideband.settings import load_settings
    from sideband.vowel import EngineSession

    app = Sideband(instructions="You are the test desk.")

    @app.on_call_start
    def personalise(ctx: CallContext) -> None:
        ctx.update_session(instructions="The caller is Alice.")
        ctx.say("Welcome the caller back.")

    settings = load_settings({**vowel.settings_values(), "max_idle_duration": 30.0}, environ={})
    async with EngineSession.open(settings, app) as session:
        engine = await vowel.wait_session()
        await vowel.wait_for(
            lambda s: bool(engine.responses) and engine.responses[0].status == "completed", timeout=5
        )
        assert session.end_reason is None
    kinds = [e["type"] for e in engine.received]
    assert kinds == ["session.update", "session.update", "response.create"]
    assert engine.received[0]["session"]["instructions"] == "You are the test desk."
    assert engine.received[1]["session"] == {"instructions": "The caller is Alice.", "type": "realtime"}
    assert [r.instructions for r in engine.responses] == ["Welcome the caller back."]
    assert engine.close_code != 1011 and engine.notes == []


async def test_a_slow_on_call_start_hook_does_not_hold_back_the_session(simulator: Simulator) -> None:
    app = make_app()
    release = asyncio.Event()
    hook_done = asyncio.Event()

    @app.on_call_start
    async def slow_lookup(ctx: CallContext) -> None:
        await release.wait()
        ctx.update_session(instructions="Found the caller's account.")
        hook_done.set()

    async with run_app(app, simulator, **TEST_SETTINGS) as h:
        call = await h.call(Script([HELLO], step_timeout=10))
        await call.wait_for(lambda c: bool(c.responses) and c.responses[0].status == "completed", timeout=3)
        assert not release.is_set()  # the greeting was answered while the hook was still waiting
        release.set()
        await asyncio.wait_for(hook_done.wait(), 5)
        await call.wait_for(lambda c: len(c.received) == 3, timeout=5)
        await simulator.hang_up(call)
        await h.ended(call, check_script=False)
    assert [e["type"] for e in call.received] == ["session.update", "response.create", "session.update"]
    assert call.received[2]["session"]["instructions"] == "Found the caller's account."


# ------------------------------------------------------------------------------------ hook lifetimes
async def test_a_blocking_sync_hook_runs_in_a_thread_and_holds_back_nothing(stack: Stack) -> None:
    release = threading.Event()
    blocked = asyncio.Event()
    loop = asyncio.get_running_loop()
    lines: list[str] = []
    in_order = asyncio.Event()

    @stack.app.on_dtmf
    def slow_crm(ctx: CallContext, digit: str) -> None:  # blocking I/O in a plain function
        assert threading.current_thread() is not threading.main_thread()
        loop.call_soon_threadsafe(blocked.set)
        release.wait(10)

    @stack.app.on_transcript
    def keep(ctx: CallContext, role: str, text: str) -> None:
        lines.append(text)
        if len(lines) == 3:
            loop.call_soon_threadsafe(in_order.set)

    call = stack.sim.create_call(
        Script(
            [
                HELLO,
                caller_presses("1"),
                caller_says("order 7"),
                model_calls("lookup_order", {"order_id": "7"}),
                model_says("Shipped."),
            ],
            step_timeout=10,
        )
    )
    try:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        await asyncio.wait_for(blocked.wait(), 5)
        # While the hook blocks its thread, the call goes on: the tool round completes.
        await call.wait_for(lambda c: bool(c.function_outputs), timeout=5)
        assert not release.is_set()
    finally:
        release.set()
    await asyncio.wait_for(in_order.wait(), 5)  # a call's sync hooks run one at a time, in order
    assert lines == ["Hello.", "order 7", "Shipped."]
    stack.sim.hang_up(call)
    await stack.ended(call, check_script=False)


async def test_a_calls_sync_hooks_run_one_at_a_time_in_order_mid_call(stack: Stack) -> None:
    """While the greeting's line is in a sync transcript hook that blocks, the caller's next line is
    left waiting (the call goes on: a tool round completes); it starts only once the first returns."""
    loop = asyncio.get_running_loop()
    release = threading.Event()
    blocked, all_in = asyncio.Event(), asyncio.Event()
    inside: list[str] = []  # the lines whose hook runs now
    started: list[tuple[str, list[str]]] = []  # each line as its hook starts, with the lines inside then

    @stack.app.on_transcript
    def store(ctx: CallContext, role: str, text: str) -> None:
        started.append((text, list(inside)))
        inside.append(text)
        try:
            if text == "Hello.":
                loop.call_soon_threadsafe(blocked.set)
                release.wait(10)
        finally:
            inside.remove(text)
            if len(started) == 3:
                loop.call_soon_threadsafe(all_in.set)

    call = stack.sim.create_call(
        Script(
            [
                HELLO,
                caller_says("order 7"),
                model_calls("lookup_order", {"order_id": "7"}),
                model_says("Shipped."),
                pause(30),
            ]
        )
    )
    try:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        await asyncio.wait_for(blocked.wait(), 5)
        # The caller's line came before the tool call: once the tool's output is back, its hook was
        # asked for long ago, and waits behind the one that blocks.
        await call.wait_for(lambda c: bool(c.function_outputs), timeout=5)
        assert [line for line, _ in started] == ["Hello."]
    finally:
        release.set()
    await asyncio.wait_for(all_in.wait(), 5)
    assert started == [("Hello.", []), ("order 7", []), ("Shipped.", [])]
    await stack.sim.hang_up(call)
    await stack.ended(call, check_script=False)


async def test_a_sync_hook_cut_off_by_the_end_still_runs_alone(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grace cancels the waiting task, not the thread: on_call_end waits for that thread (here past
    its own bound, so it never runs beside it)."""
    monkeypatch.setattr("sideband.runtime.driver.HOOK_GRACE", 0.1)
    monkeypatch.setattr("sideband.runtime.driver.END_HOOK_TIMEOUT", 0.3)
    inside, release = threading.Event(), threading.Event()
    overlapped: list[bool] = []

    @stack.app.on_call_start
    def slow_crm(ctx: CallContext) -> None:  # a backend that answers only when the test says so
        inside.set()
        release.wait(10)
        inside.clear()

    @stack.app.on_call_end
    def file_ticket(ctx: CallContext, summary: CallSummary) -> None:
        overlapped.append(inside.is_set())

    call = stack.sim.create_call(Script([HELLO, caller_hangs_up()]))
    try:
        with capture_logs() as logs:
            assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
            await stack.ended(call)
    finally:
        release.set()
    assert [e["hook"] for e in logs if e["event"] == "hook.cancelled"] == ["slow_crm", "file_ticket"]
    assert overlapped == []  # without the lock held by the thread: [True]


async def test_a_sync_hook_that_fails_after_the_end_cut_it_off_is_logged_like_any(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sideband.runtime.driver.HOOK_GRACE", 0.1)
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    release, failed = threading.Event(), asyncio.Event()

    @stack.app.on_call_start
    def slow_crm(ctx: CallContext) -> None:
        release.wait(10)
        raise RuntimeError(f"no record for {ctx.from_number}")

    def flag(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if event_dict.get("event") == "hook.failed":
            loop.call_soon_threadsafe(failed.set)
        return event_dict

    call = stack.sim.create_call(Script([HELLO, caller_hangs_up()]))
    try:
        with capture_logs() as logs:
            structlog.get_config()["processors"].insert(0, flag)
            assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
            await stack.ended(call)  # slow_crm was cut off (hook.cancelled); its thread runs on
            release.set()
            await asyncio.wait_for(failed.wait(), 5)
    finally:
        release.set()
        loop.set_exception_handler(None)
    hook = [e for e in logs if e["event"] == "hook.failed"]
    assert [(e["hook"], e["error"]) for e in hook] == [("slow_crm", "RuntimeError")]  # not its text
    gc.collect()
    assert unretrieved == []  # asyncio would log the exception's text ("never retrieved")


async def test_a_tool_that_ignores_its_cancellation_does_not_keep_the_call_alive(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sideband.runtime.driver.TASK_GRACE", 0.2)
    started, stop = asyncio.Event(), asyncio.Event()

    @stack.app.tool(filler_after=None)
    async def stubborn() -> str:  # a buggy tool: swallows every cancellation until the test ends
        started.set()
        while not stop.is_set():
            try:
                await stop.wait()
            except asyncio.CancelledError:
                continue
        return "late"

    late_hooks: list[str] = []
    stack.app.on_tool(lambda ctx, record: late_hooks.append(record.outcome))
    call = stack.sim.create_call(Script([HELLO, pause(30)]))
    try:
        with capture_logs() as logs:
            assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
            await call.wait_for(lambda c: bool(c.responses) and c.responses[0].status == "completed", 5)
            await call.inject_function_call("stubborn", {})
            await asyncio.wait_for(started.wait(), 5)
            stuck = next(t for t in asyncio.all_tasks() if t.get_name().startswith("tool:"))
            stack.sim.hang_up(call)
            summary = await stack.ended(call, timeout=5, check_script=False)  # ends all the same
            stop.set()
            assert await asyncio.wait_for(stuck, 5) is None  # it finished at last: nothing of it counts
    finally:
        stop.set()
    assert summary.reason == "remote_closed"
    assert [(t.name, t.outcome) for t in summary.tools] == [("stubborn", "cancelled")]
    assert [e["outcome"] for e in logs if e["event"] == "tool.finished"] == ["cancelled"]
    assert late_hooks == ["cancelled"]  # the end's record; nothing of its late finish
    abandoned = [e["tasks"] for e in logs if e["event"] == "call.tasks_abandoned"]
    assert len(abandoned) == 1 and abandoned[0][0].startswith("tool:")


async def test_a_call_that_does_not_end_names_the_script_step_that_failed(stack: Stack) -> None:
    @stack.app.tool(timeout=30, filler_after=None)
    async def slow_lookup() -> str:
        await asyncio.Event().wait()
        return "never"

    call = stack.sim.create_call(Script([HELLO, model_calls("slow_lookup", {})], step_timeout=1.0))
    assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    with pytest.raises(TimeoutError) as failed:
        await stack.ended(call, timeout=3)
    assert "the script failed: step 1 model_calls(slow_lookup" in str(failed.value)
    stack.sim.hang_up(call)
    await stack.ended(call, check_script=False)


async def test_a_hook_that_raises_cancelled_error_or_system_exit_is_a_failure_like_any_other(
    stack: Stack,
) -> None:
    """A hook awaiting something cancelled (not the call being cancelled) is logged and the hooks after
    it still run; the call still ends and says so."""
    ran: list[str] = []

    def cancelled_lookup() -> None:
        lookup: concurrent.futures.Future[None] = concurrent.futures.Future()
        lookup.cancel()
        lookup.result()

    @stack.app.on_transcript
    def crm_note(ctx: CallContext, role: str, text: str) -> None:
        cancelled_lookup()  # a sync hook: raised in its worker thread

    @stack.app.on_transcript
    def second_note(ctx: CallContext, role: str, text: str) -> None:
        ran.append(f"transcript:{role}")

    @stack.app.on_transcript
    def give_up(ctx: CallContext, role: str, text: str) -> None:
        sys.exit("no CRM")  # out of a task, it would stop the server and every call

    @stack.app.on_call_start
    async def greet_crm(ctx: CallContext) -> None:
        raise SystemExit(3)

    @stack.app.on_call_end
    async def archive(ctx: CallContext, summary: CallSummary) -> None:
        lookup = asyncio.get_running_loop().create_future()
        lookup.cancel()
        await lookup

    @stack.app.on_call_end
    async def report(ctx: CallContext, summary: CallSummary) -> None:
        ran.append(f"end:{summary.reason}")

    call = stack.sim.create_call(Script([HELLO]))
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        runtime = stack.service.registry.calls[call.call_id]
        await call.wait_for(lambda c: bool(c.responses), timeout=5)
        stack.sim.hang_up(call)
        await stack.ended(call, check_script=False)
        await asyncio.wait_for(runtime.wait_closed(), 5)  # the end hooks have all run
    failed = [(e["hook"], e["error"]) for e in logs if e["event"] == "hook.failed"]
    assert ("crm_note", "CancelledError") in failed and ("archive", "CancelledError") in failed
    assert ("give_up", "SystemExit") in failed and ("greet_crm", "SystemExit") in failed
    assert "transcript:agent" in ran and ran[-1] == "end:remote_closed"


async def test_end_hooks_of_a_cancelled_call_still_run_after_one_raises_cancelled_error() -> None:
    """A call cancelled (an engine session aborted, a drain past its grace) still runs every end hook:
    one awaiting something cancelled of its own is a failure, not the call's cancellation."""
    ran: list[str] = []
    connecting = asyncio.Event()

    async def connect() -> Any:
        connecting.set()
        await asyncio.Event().wait()  # a slow attach

    async def archive(ctx: CallContext, summary: CallSummary) -> None:
        lookup = asyncio.get_running_loop().create_future()
        lookup.cancel()
        await lookup

    async def report(ctx: CallContext, summary: CallSummary) -> None:
        ran.append(summary.reason)

    runtime = CallRuntime(
        machine=CallMachine(MachineConfig(session={"type": "realtime"})),
        ctx=CallContext("rtc_x"),
        tools=ToolRegistry(),
        connect=connect,
        hooks=CallHooks(on_call_end=[archive, report]),
    )
    with capture_logs() as logs:
        task = asyncio.create_task(runtime.run())
        await asyncio.wait_for(connecting.wait(), 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled() and ran == ["shutdown"]
    assert [(e["hook"], e["error"]) for e in logs if e["event"] == "hook.failed"] == [
        ("archive", "CancelledError")
    ]


async def _card_call(stack: Stack) -> tuple[list[MutableMapping[str, Any]], CallSummary]:
    """A caller keys and says a card number; the log entries and the summary hooks get."""
    call = stack.sim.create_call(
        Script([HELLO, caller_presses("4111#"), caller_says("my card is 4111 1111"), model_says("Thanks.")])
    )
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        # (the answer done: the caller's transcript, which streams on into it, has been sent whole)
        await call.wait_for(lambda c: len(c.responses) >= 2 and c.responses[1].status != "in_progress", 5)
        stack.sim.hang_up(call)
        summary = await stack.ended(call, check_script=False)
    return logs, summary


async def test_transcripts_and_keypad_digits_are_logged_by_default(stack: Stack) -> None:
    logs, _ = await _card_call(stack)
    assert [e["digit"] for e in logs if e["event"] == "dtmf"] == ["4", "1", "1", "1", "#"]
    said = [(e["role"], e["text"]) for e in logs if e["event"] == "transcript"]
    assert ("caller", "my card is 4111 1111") in said


@pytest.mark.parametrize("settings_overrides", [{"log_transcripts": False}])
async def test_a_payment_line_keeps_what_callers_say_and_key_out_of_the_logs(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    logs, summary = await _card_call(stack)
    assert "4111" not in repr(logs)
    assert len([e for e in logs if e["event"] == "dtmf"]) == 5  # that keys were pressed, not which
    lines = [e for e in logs if e["event"] == "transcript"]
    assert {"role": "caller", "chars": len("my card is 4111 1111")}.items() <= lines[1].items()
    assert lines[1]["item_id"].startswith("item_")  # the item it transcribes, to place it
    assert summary.dtmf == "4111#" and ("caller", "my card is 4111 1111") in summary.transcript  # hooks


async def _failing_call(stack: Stack) -> list[MutableMapping[str, Any]]:
    """A call whose on_call_start hook and tool raise with data in their messages; its log entries."""

    @stack.app.on_call_start
    def needs_crm(ctx: CallContext) -> None:
        raise KeyError(f"no CRM record for {ctx.from_number}")  # data of the call in the message

    call = stack.sim.create_call(
        Script([HELLO, caller_says("order 1"), model_calls("broken", {}), model_says("Sorry.")])
    )
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        await call.wait_for(lambda c: bool(c.function_outputs), timeout=5)
        stack.sim.hang_up(call)
        await stack.ended(call, check_script=False)
    assert "secret" not in call.function_outputs[0][1]  # never the model's to see
    return logs


async def test_a_sync_hook_raising_stop_iteration_fails_and_the_next_hooks_run(stack: Stack) -> None:
    """A lookup that found nothing (``next()`` on an empty iterator) in a sync hook: ``hook.failed`` at
    once, naming the line, and the call's later sync hooks (``on_call_end``) run."""
    ended = asyncio.Event()

    @stack.app.on_call_start
    def start(ctx: CallContext) -> None:
        next(iter(()))

    @stack.app.on_call_end
    def end(ctx: CallContext, summary: CallSummary) -> None:
        stack_loop.call_soon_threadsafe(ended.set)

    stack_loop = asyncio.get_running_loop()
    call = stack.sim.create_call(Script([HELLO, caller_hangs_up()]))
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        await stack.ended(call)
        await asyncio.wait_for(ended.wait(), 5)
    hook = [e for e in logs if e["event"] == "hook.failed"]
    assert [(e["hook"], e["error"]) for e in hook] == [("start", "RuntimeError")]
    assert "in start" in hook[0]["stack"] and "next(iter(()))" in hook[0]["stack"]


async def test_a_sync_hook_raising_generator_exit_fails_and_its_later_events_still_come(stack: Stack) -> None:
    """A ``GeneratorExit`` out of a sync hook's thread ended the task running that kind of hook: the later
    lines of the transcript never reached the hook (``hook.skipped``). Each now fails on its own."""
    lines: list[str] = []

    @stack.app.on_transcript
    def record(ctx: CallContext, role: TranscriptRole, text: str) -> None:
        lines.append(text)
        raise GeneratorExit

    call = stack.sim.create_call(
        Script([HELLO, caller_says("hi"), model_says("Hi there."), caller_says("bye"), caller_hangs_up()])
    )
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        await stack.ended(call)
    assert lines == ["Hello.", "hi", "Hi there.", "bye"]
    failed = [(e["hook"], e["error"]) for e in logs if e["event"] == "hook.failed"]
    assert failed == [("record", "RuntimeError")] * 4
    assert not [e for e in logs if e["event"] == "hook.skipped"]


async def test_failures_in_user_code_are_logged_with_where_not_with_their_data(stack: Stack) -> None:
    logs = await _failing_call(stack)
    hook = [e for e in logs if e["event"] == "hook.failed"]
    assert [(e["hook"], e["error"], e["log_level"]) for e in hook] == [("needs_crm", "KeyError", "error")]
    assert "in needs_crm" in hook[0]["stack"] and hook[0]["stack"].endswith("KeyError")
    assert "+14255550100" not in repr(hook[0])  # the caller's number was in the message only
    tool = [e for e in logs if e["event"] == "tool.finished"]
    assert [(e["outcome"], e["error"], e["log_level"]) for e in tool] == [
        ("error", "RuntimeError", "warning")
    ]
    assert "in broken" in tool[0]["stack"] and "exc_info" not in tool[0]


async def test_a_tool_error_wrapping_another_exception_logs_its_own_message_only(stack: Stack) -> None:
    """``raise ToolError("…") from exc``: the model's message is logged, the wrapped exception's text
    (which may hold a secret) is not, chained or implied."""
    from sideband import ToolError

    @stack.app.tool
    async def lookup(order_id: str) -> str:
        """Look an order up."""
        try:
            raise RuntimeError("db password=hunter2 refused")
        except RuntimeError as exc:
            if order_id == "1":
                raise ToolError("Lookup failed, try again.") from exc
            raise ToolError("Lookup failed, sorry.")  # noqa: B904  # chained implicitly (__context__)

    call = stack.sim.create_call(
        Script(
            [
                HELLO,
                model_calls("lookup", {"order_id": "1"}),
                model_says("Sorry."),
                model_calls("lookup", {"order_id": "2"}),
                model_says("Sorry."),
            ]
        )
    )
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        await call.wait_for(lambda c: len(c.function_outputs) == 2, timeout=5)
        stack.sim.hang_up(call)
        await stack.ended(call, check_script=False)
    tool = [e for e in logs if e["event"] == "tool.finished"]
    assert [(e["error"], e["log_level"]) for e in tool] == [  # the tool's answer on purpose: no alert
        ("ToolError: Lookup failed, try again.", "info"),
        ("ToolError: Lookup failed, sorry.", "info"),
    ]
    assert all("in lookup" in e["stack"] and "exc_info" not in e for e in tool), tool
    assert "hunter2" not in repr(logs)


@pytest.mark.parametrize("settings_overrides", [{"log_tool_arguments": True}])
async def test_failures_are_logged_in_full_when_tool_data_may_be_logged(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    logs = await _failing_call(stack)
    hook = next(e for e in logs if e["event"] == "hook.failed")
    assert hook["error"] == "KeyError: 'no CRM record for +14255550100'"
    assert isinstance(hook["exc_info"], KeyError)
    tool = next(e for e in logs if e["event"] == "tool.finished")
    assert tool["error"] == "RuntimeError: secret database password in message"
    assert isinstance(tool["exc_info"], RuntimeError)


class _Detached:
    """An object whose ``str()`` raises, as a detached ORM instance's may."""

    def __str__(self) -> str:
        raise RuntimeError("instance is not bound to a Session")


@pytest.mark.parametrize(
    "settings_overrides", [{}, {"log_tool_arguments": True}], ids=["types_logged", "messages_logged"]
)
async def test_a_failure_whose_text_cannot_be_had_is_answered_logged_and_the_next_hook_runs(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    """An exception whose message is an object with a broken ``__str__``: the model gets the tool's
    output all the same, the log line says the text could not be had, and the hook after one that raised
    such an exception runs."""
    from sideband import ToolError

    @stack.app.tool(filler_after=None)
    async def fetch(which: str) -> str:
        """Fetch something."""
        if which == "own":
            raise ToolError(_Detached())  # type: ignore[arg-type]
        raise ValueError(_Detached())

    ran: list[str] = []

    @stack.app.on_tool
    async def audit(ctx: CallContext, record: Any) -> None:
        raise LookupError(_Detached())

    @stack.app.on_tool
    async def count(ctx: CallContext, record: Any) -> None:
        ran.append(record.outcome)

    call = stack.sim.create_call(
        Script(
            [
                HELLO,
                model_calls("fetch", {"which": "own"}),
                model_says("Sorry."),
                model_calls("fetch", {"which": "other"}),
                model_says("Sorry again."),
            ]
        )
    )
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        await call.wait_done(timeout=5)
        stack.sim.hang_up(call)
        await stack.ended(call, check_script=False)
    assert [json.loads(o) for _, o in call.function_outputs] == [
        {"error": "tool_failed", "message": "<unprintable _Detached>"},
        {"error": "tool_failed", "message": "ValueError"},
    ]
    messages = bool(settings_overrides)
    tool = [e["error"] for e in logs if e["event"] == "tool.finished"]
    assert tool == [
        "ToolError: <unprintable ToolError>",
        "ValueError: <unprintable ValueError>" if messages else "ValueError",
    ]
    hook = [(e["hook"], e["error"]) for e in logs if e["event"] == "hook.failed"]
    assert hook == [("audit", "LookupError: <unprintable LookupError>" if messages else "LookupError")] * 2
    assert ran == ["error", "error"]


async def test_on_tool_hooks_end_before_on_call_end(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sideband.runtime.driver.HOOK_GRACE", 0.2, raising=False)
    order: list[Any] = []
    hook_task: list[asyncio.Task[Any]] = []

    @stack.app.tool(filler_after=None)
    async def quick() -> str:
        return "ok"

    @stack.app.on_tool
    async def audit(ctx: CallContext, record: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        hook_task.append(task)
        order.append("on_tool started")
        try:
            await asyncio.Event().wait()  # an audit sink that never answers
        except asyncio.CancelledError:
            order.append("on_tool cancelled")
            raise

    @stack.app.on_call_end
    def end(ctx: CallContext, summary: CallSummary) -> None:
        order.append(("on_call_end", [t.done() for t in hook_task]))

    with capture_logs() as logs:
        call = await stack.call(
            Script(
                [HELLO, caller_says("go"), model_calls("quick", {}), model_says("Done."), caller_hangs_up()]
            )
        )
        summary = await stack.ended(call)
    assert [(t.name, t.outcome) for t in summary.tools] == [("quick", "ok")]
    assert order == ["on_tool started", "on_tool cancelled", ("on_call_end", [True])]
    warned = [e for e in logs if e["event"] == "hook.cancelled"]
    assert [e["hook"] for e in warned] == ["audit"] and warned[0]["log_level"] == "warning"


async def test_hung_hooks_get_a_grace_period_and_the_call_still_ends(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sideband.runtime.driver.HOOK_GRACE", 0.2, raising=False)
    cancelled: list[str] = []
    ended: list[str] = []

    def hang(name: str) -> Callable[..., Awaitable[None]]:
        async def hook(*args: Any) -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(name)
                raise

        hook.__name__ = name
        return hook

    stack.app.on_transcript(hang("stuck_transcript"))
    stack.app.on_dtmf(hang("stuck_dtmf"))
    stack.app.on_call_end(lambda ctx, summary: ended.append(summary.reason))

    with capture_logs() as logs:
        call = await stack.call(Script([HELLO, caller_presses("1"), caller_presses("2"), caller_hangs_up()]))
        summary = await stack.ended(call, timeout=5)  # never waits on the hooks for long
    assert summary.reason == "remote_closed" and ended == ["remote_closed"]
    # Each kind's first hook never ends: cancelled; the second key's waits its turn: dropped, never run.
    assert sorted(cancelled) == ["stuck_dtmf", "stuck_transcript"]
    warned = [e["hook"] for e in logs if e["event"] == "hook.cancelled"]
    assert sorted(warned) == ["stuck_dtmf", "stuck_transcript"]
    skipped = [e for e in logs if e["event"] == "hook.skipped"]
    assert [(e["hooks"], e["count"], e["log_level"]) for e in skipped] == [(["stuck_dtmf"], 1, "warning")]
    await stack.wait_idle(timeout=5)


# ------------------------------------------------------------------------------- cancelled tools
async def test_tools_cancelled_by_the_call_end_are_in_the_summary(stack: Stack) -> None:
    started = asyncio.Event()

    @stack.app.tool(filler_after=None)
    async def long_job() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    with capture_logs() as logs:
        call = await stack.call(
            Script([HELLO, caller_says("go"), model_calls("long_job", {})], step_timeout=10)
        )
        await asyncio.wait_for(started.wait(), 5)
        await stack.sim.hang_up(call)
        summary = await stack.ended(call, check_script=False)
    assert summary.reason == "remote_closed"
    assert [(t.name, t.outcome) for t in summary.tools] == [("long_job", "cancelled")]
    assert summary.tools[0].duration > 0
    finished = [e for e in logs if e["event"] == "tool.finished"]
    assert [(e["tool"], e["outcome"]) for e in finished] == [("long_job", "cancelled")]


# ------------------------------------------------------------------------------------- transfers
def transfer_call(stack: Stack) -> SimCall:
    """A call whose model calls ``to_human``, a tool that transfers to the allow-listed human."""

    @stack.app.tool(filler_after=None)
    async def to_human(ctx: CallContext) -> str:
        await ctx.transfer("human")
        return "transferring"

    return stack.sim.create_call(
        Script([HELLO, caller_says("a human please"), model_calls("to_human", {}), model_says("One moment.")])
    )


async def test_a_failed_transfer_hangs_up_and_ends_as_transfer_failed(stack: Stack) -> None:
    call = transfer_call(stack)
    stack.sim.fail_verb(call.call_id, "refer", 400)  # e.g. the SIP provider refuses the target
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        await call.wait_ended(timeout=10)
        summary = await stack.ended(call)
    verbs = [r.path.rsplit("/", 1)[1] for r in stack.sim.requests if r.path.endswith(("/refer", "/hangup"))]
    assert verbs == ["refer", "hangup"]
    assert call.end_reason == "hangup_verb" and summary.reason == "transfer_failed"
    failed = [e for e in logs if e["event"] == "call.verb_failed"]
    assert [e["verb"] for e in failed] == ["refer"]
    assert [e["reason"] for e in logs if e["event"] == "call.ended"] == ["transfer_failed"]


async def test_a_transfer_that_finds_the_call_gone_is_not_reported_as_transferred(stack: Stack) -> None:
    call = transfer_call(stack)
    stack.sim.fail_verb(call.call_id, "refer", 404)  # the caller hung up meanwhile
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        summary = await stack.ended(call)
    verbs = [r.path.rsplit("/", 1)[1] for r in stack.sim.requests if r.path.endswith(("/refer", "/hangup"))]
    assert verbs == ["refer"]  # nothing to hang up
    assert summary.reason == "call_not_found"
    assert [(e["verb"], e["detail"]) for e in logs if e["event"] == "call.verb_failed"] == [
        ("refer", "call already gone")
    ]
    assert not [e for e in logs if e["event"] == "call.referred"]


@pytest.mark.parametrize(
    ("close", "verbs", "outcome"),
    [
        pytest.param("clean", ["refer", "hangup"], "transferred", id="sideband_closed_by_the_transfer"),
        pytest.param("abnormal", ["refer", "hangup"], "transferred", id="sideband_dropped_by_the_transfer"),
        pytest.param("silent", ["refer", "hangup"], "transferred", id="hangup_finds_the_call_gone"),
    ],
)
async def test_a_transfer_whose_refer_is_answered_late_is_sent_once_and_ends_transferred(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, close: Any, verbs: list[str], outcome: str
) -> None:
    """The REFER was handed over but its answer came too late: it is not sent again (each reaches the
    carrier). A hangup finds the call gone (its sideband closed or dropped meanwhile, or not: a close
    alone may be the caller hanging up): transferred, at once (no transfer window to wait out, no
    second hangup: the call is known to be over)."""
    transfer_window(monkeypatch, 0.2)
    stack.sim.verb_close = close
    call = transfer_call(stack)
    stack.sim.fail_verb(call.call_id, "refer", "late")
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        summary = await stack.ended(call)
    assert _call_verbs(stack) == verbs
    assert call.status == "referred" and summary.reason == "transferred"
    unsure = [(e["outcome"], e["log_level"]) for e in logs if e["event"] == "call.refer_uncertain"]
    assert unsure == [(outcome, "warning")]
    assert not [e for e in logs if e["event"] == "call.verb_failed"]


async def test_a_transfer_whose_refer_goes_unanswered_hangs_up_the_call_still_up(stack: Stack) -> None:
    """The REFER went unanswered and the call is still up: it may yet have reached the carrier, so it is
    not sent again, and the caller must not stay on a call nobody controls: hung up, transfer_failed."""
    stack.sim.verb_close = "silent"
    call = transfer_call(stack)
    stack.sim.fail_verb(call.call_id, "refer", "timeout")
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        summary = await stack.ended(call)
    assert _call_verbs(stack)[:2] == ["refer", "hangup"]  # (the fallback's own hangup finds it gone)
    assert call.end_reason == "hangup_verb" and summary.reason == "transfer_failed"
    unsure = [e["outcome"] for e in logs if e["event"] == "call.refer_uncertain"]
    assert unsure == ["hung_up"]
    assert [e["verb"] for e in logs if e["event"] == "call.verb_failed"] == ["refer"]


def _call_verbs(stack: Stack) -> list[str]:
    return [r.path.rsplit("/", 1)[1] for r in stack.sim.requests if r.path.endswith(("/refer", "/hangup"))]


async def _awaiting_transfer(stack: Stack, call: SimCall) -> CallRuntime:
    """The call's runtime, once its REFER was answered 200 and it waits for the server to end the call."""
    await stack.sim.wait_for(
        lambda s: any(r.path.endswith("/refer") and r.status == 200 for r in s.requests),
        timeout=10,
        what="a REFER",
    )
    runtime = stack.service.registry.calls[call.call_id]  # (still live: the server has not ended it)
    async with asyncio.timeout(5):
        while not runtime.machine.transferring:
            await asyncio.sleep(0.01)
    return runtime


@pytest.mark.parametrize(("close", "gone_status"), [("clean", 404), ("abnormal", 404), ("abnormal", 410)])
async def test_a_transfer_ends_as_transferred_once_the_server_has_ended_the_call(
    stack: Stack, close: Any, gone_status: Any
) -> None:
    """A refer's 200 only says the REFER was handed to the carrier: the call is ours until the server
    ends it (the transfer took: its sideband closes), and ends ``transferred`` then, not before. (A
    sideband dropped rather than closed may have been a blip: it is attached again, and the re-attach
    refused as the call is gone tells the transfer took; no hangup probes it.)"""
    stack.sim.verb_close = close
    stack.sim.gone_status = gone_status
    stack.sim.transfer_delay = 0.5
    call = transfer_call(stack)
    at_end: list[tuple[str, str | None, list[str]]] = []
    stack.app.on_call_end(
        lambda ctx, summary: at_end.append((call.status, call.end_reason, _call_verbs(stack)))
    )
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        summary = await stack.ended(call)
    # The REFER, then the carrier's transfer and the sideband's close, then the end of our call.
    assert at_end == [("referred", "referred", ["refer"])]
    assert summary.reason == "transferred" and call.sideband_connects == 1
    events = ("call.referred", "sideband.lost", "sideband.refused", "call.ended")
    order = [e["event"] for e in logs if e["event"] in events]
    lost = ["sideband.lost", "sideband.refused"] if close == "abnormal" else []
    assert order == ["call.referred", *lost, "call.ended"]
    if close == "abnormal":
        assert [e["status"] for e in logs if e["event"] == "sideband.refused"] == [gone_status]
    assert not [e for e in logs if e["event"] in ("call.transfer_unconfirmed", "call.verb_failed")]


async def test_a_transfer_the_carrier_fails_is_hung_up_once_its_window_is_over(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The REFER is answered 200 but the transfer fails at the carrier (the caller stays on the line with
    the model): with the sideband still open at the end of the window, the call is hung up."""
    transfer_window(monkeypatch, 0.3)
    call = transfer_call(stack)
    stack.sim.fail_transfer(call.call_id)
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        summary = await stack.ended(call)
    assert _call_verbs(stack) == ["refer", "hangup"] and call.hangup_requested
    assert call.refer_target == "tel:+14155550123" and call.end_reason == "hangup_verb"
    assert summary.reason == "transfer_failed"
    unconfirmed = [e for e in logs if e["event"] == "call.transfer_unconfirmed"]
    assert [(e["log_level"], e["target"], e["waited_s"]) for e in unconfirmed] == [
        ("warning", "tel:+14155550123", 0.3)
    ]
    assert [e["reason"] for e in logs if e["event"] == "call.ended"] == ["transfer_failed"]
    assert not [e for e in logs if e["event"] == "call.verb_failed"]


@pytest.mark.parametrize("end", ["caller_hangs_up", "sideband_lost", "code_hangs_up_first"])
async def test_a_transfer_awaited_ends_as_transferred_whichever_way_its_sideband_ends(
    stack: Stack, end: str
) -> None:
    """While the call waits for the server to end it, the caller hanging up ends it ``transferred`` (no
    hangup), over the sideband it had, or over one attached again after it dropped (maybe a blip, the
    transfer still under way). A hangup code asks for meanwhile is ignored: it is going."""
    call = transfer_call(stack)
    stack.sim.fail_transfer(call.call_id)  # (nothing ends the call but what the test does)
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        runtime = await _awaiting_transfer(stack, call)
        if end == "code_hangs_up_first":
            runtime.hangup()
            assert runtime.machine.transferring
        if end == "sideband_lost":
            await stack.sim.drop_sideband(call, "abnormal")
            await call.wait_connected(2, timeout=5)
            assert runtime.machine.transferring
        await stack.sim.hang_up(call)
        summary = await stack.ended(call)
    assert call.sideband_connects == (2 if end == "sideband_lost" else 1)
    assert not [e for e in logs if e["event"] in ("call.verb_failed", "call.transfer_unconfirmed")]
    assert summary.reason == "transferred" and _call_verbs(stack) == ["refer"]


async def test_a_transfer_whose_sideband_drops_is_attached_again_and_awaited_for_the_rest_of_its_window(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sideband dropped without a close after the refer's 200 may have been a blip while the carrier
    still carries the transfer out: it is attached again (no hangup, which would cut the caller off),
    and the call waits over the new socket, nothing of ours started on it (a tool the model calls is not
    run), until the server ends it (``transferred``) or the window, not started again, is over."""
    transfer_window(monkeypatch, 30.0)
    stack.sim.transfer_delay = 2.0
    call = transfer_call(stack)
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        runtime = await _awaiting_transfer(stack, call)
        window = runtime._deadlines["transfer"]
        heard = len(call.received)
        await stack.sim.drop_sideband(call, "abnormal")
        await call.wait_connected(2, timeout=5)
        assert runtime.machine.transferring and runtime._deadlines["transfer"] == window
        injected = await call.inject_function_call("to_human", {})  # the model calls on the new socket
        summary = await stack.ended(call)  # (the carrier's transfer takes 2 s after the REFER's 200)
    assert call.end_reason == "referred" and summary.reason == "transferred"
    assert _call_verbs(stack) == ["refer"] and call.sideband_connects == 2
    assert {e["type"] for e in call.received[heard:]} <= {"session.update"}  # nothing asked of the model
    assert injected.call_id not in dict(call.function_outputs)
    assert [e["reason"] for e in logs if e["event"] == "tool.discarded"] == ["call_ending"]
    reattach = ("sideband.lost", "sideband.reattached")
    assert [(e["event"], e["log_level"]) for e in logs if e["event"] in reattach] == [
        ("sideband.lost", "info"),  # (after the refer: OpenAI's end of a call may show so)
        ("sideband.reattached", "info"),
    ]
    assert not [e for e in logs if e["event"] in ("call.transfer_unconfirmed", "call.verb_failed")]


async def test_a_transfer_attached_again_whose_window_ends_is_hung_up(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sideband attached again after a drop shows the call still up: the transfer's window, not
    started again, decides as ever (still up at its end: hung up, ``transfer_failed``)."""
    transfer_window(monkeypatch, 2.0)
    call = transfer_call(stack)
    stack.sim.fail_transfer(call.call_id)
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        runtime = await _awaiting_transfer(stack, call)
        await stack.sim.drop_sideband(call, "abnormal")
        await call.wait_connected(2, timeout=5)
        assert runtime.machine.transferring  # (attached again: no hangup yet)
        summary = await stack.ended(call)
    assert summary.reason == "transfer_failed" and call.end_reason == "hangup_verb"
    assert _call_verbs(stack) == ["refer", "hangup"]
    assert [(e["why"], e["waited_s"]) for e in logs if e["event"] == "call.transfer_unconfirmed"] == [
        ("window", 2.0)
    ]


async def test_a_shutdown_while_a_transfer_is_awaited_hangs_it_up_at_once(stack: Stack) -> None:
    """A shutdown does not wait for the transfer's window: the call is hung up now (the transfer may
    have failed, and nobody would control the call after), ``transfer_failed`` as it was still up."""
    call = transfer_call(stack)
    stack.sim.fail_transfer(call.call_id)
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        await _awaiting_transfer(stack, call)
        await asyncio.wait_for(stack.service.registry.drain(0.0), 5)  # (the window is 45 s)
    assert stack.service.registry.recent[call.call_id].reason == "transfer_failed"
    assert _call_verbs(stack) == ["refer", "hangup"] and call.status == "ended"
    assert [e["reason"] for e in logs if e["event"] == "call.ended"] == ["transfer_failed"]
    assert [e["why"] for e in logs if e["event"] == "call.transfer_unconfirmed"] == ["shutdown"]
    assert not [e for e in logs if e["event"] == "call.verb_failed"]


def _hanging_up_call(stack: Stack) -> SimCall:
    """A call whose tool hangs up after the caller says they are done."""

    @stack.app.tool(filler_after=None)
    async def finish(ctx: CallContext) -> str:
        await ctx.hangup()
        return "bye"

    return stack.sim.create_call(
        Script([HELLO, caller_says("done"), model_calls("finish", {}), model_says("Bye!")])
    )


async def test_a_hangup_that_keeps_failing_ends_as_hangup_failed(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end reason must not say the call was hung up when it may still be up."""
    monkeypatch.setattr("sideband.service.HANGUP_BUDGET", 1.5)  # (a few retries, even on a slow machine)
    call = _hanging_up_call(stack)
    stack.sim.fail_verb(call.call_id, "hangup", *([503] * 200))
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        summary = await stack.ended(call)
    assert summary.reason == "hangup_failed"
    assert sum(1 for r in stack.sim.requests if r.path.endswith("/hangup")) > 2  # retried meanwhile
    failed = [e for e in logs if e["event"] == "call.verb_failed"]
    assert [e["verb"] for e in failed] == ["hangup"] and "503" in failed[0]["detail"]
    assert [e["reason"] for e in logs if e["event"] == "call.ended"] == ["hangup_failed"]


async def test_a_call_whose_hangup_failed_is_hung_up_again_later(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``hangup_failed``: the call may still be up, the model talking on with nobody running its tools."""
    monkeypatch.setattr("sideband.service.HANGUP_BUDGET", 1.5)
    monkeypatch.setattr("sideband.service.STRANDED_RETRY", 0.2)
    call = _hanging_up_call(stack)
    stack.sim.fail_verb(call.call_id, "hangup", *([503] * 500))
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        assert (await stack.ended(call)).reason == "hangup_failed"
        assert not call.ended
        stack.sim.clear_verb_faults(call.call_id, "hangup")  # OpenAI answers again
        await call.wait_ended(timeout=15)
    assert call.end_reason == "hangup_verb"
    stranded = [(e["outcome"], e["log_level"]) for e in logs if e["event"] == "call.stranded"]
    assert stranded[-1] == ("hung_up", "warning")
    assert {o for o, _ in stranded[:-1]} <= {"retrying"}
    assert not stack.service._stranded


async def test_a_verb_that_raises_something_unexpected_still_ends_the_call(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def closed_client(self: Any, call_id: str, *, timeout: float) -> None:
        raise RuntimeError("Session is closed")

    monkeypatch.setattr("sideband.upstream.openai.CallControl.hangup", closed_client)
    call = _hanging_up_call(stack)
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        summary = await stack.ended(call)
    assert summary.reason == "hangup_failed"
    assert [e["detail"] for e in logs if e["event"] == "call.verb_failed"] == [
        "RuntimeError: Session is closed"
    ]


async def test_a_tool_the_model_calls_once_the_transfer_is_out_neither_runs_nor_answers(stack: Stack) -> None:
    call = transfer_call(stack)
    stack.sim.fail_verb(call.call_id, "refer", "timeout")  # the REFER goes unanswered
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        await stack.sim.wait_for(
            lambda s: any(r.path.endswith("/refer") for r in s.requests), timeout=10, what="a REFER"
        )
        # The caller speaks on while the REFER is under way, and the model calls a tool.
        late = await call.inject_function_call("lookup_order", {"order_id": "42"})
        summary = await stack.ended(call)
    # (an unanswered REFER is not sent again: the call, still up, is hung up)
    assert [t.name for t in summary.tools] == ["to_human"] and summary.reason == "transfer_failed"
    answered = [e["item"].get("call_id") for e in call.received if e["type"] == "conversation.item.create"]
    assert late.call_id not in answered
    discarded = [(e["tool"], e["reason"]) for e in logs if e["event"] == "tool.discarded"]
    assert discarded == [("lookup_order", "call_ending")]
    assert not [e for e in logs if e["event"] == "tool.started" and e["tool"] == "lookup_order"]


class ClosesSeen(CallMachine):
    """A call machine that tells when the driver has handed it the sideband's clean close."""

    def __init__(self, config: MachineConfig) -> None:
        super().__init__(config)
        self.close_seen = asyncio.Event()

    def transport_closed(self, code: int | None, reason: str = "") -> list[Any]:
        self.close_seen.set()
        return super().transport_closed(code, reason)


@pytest.mark.parametrize(
    ("answer", "reason", "verbs"),
    [
        pytest.param(404, "call_not_found", ["refer"], id="refer_finds_the_call_gone"),
        pytest.param(400, "transfer_failed", ["refer", "hangup"], id="refer_refused"),
        pytest.param(200, "transferred", ["refer"], id="refer_carried_out"),
    ],
)
async def test_a_clean_close_while_the_refer_is_unanswered_waits_for_its_answer(
    simulator: Simulator, answer: int, reason: str, verbs: list[str]
) -> None:
    """The sideband closes cleanly as the REFER goes out: the server carried it out, or the caller hung
    up meanwhile. Only the refer's answer tells which: a call it finds gone, or a refer refused, is no
    transfer (and its failure is logged)."""
    call = simulator.create_call(Script([HELLO], step_timeout=10), accept_body={"type": "realtime"})
    machine = ClosesSeen(MachineConfig(session={"type": "realtime", "instructions": "x"}, greeting="Hi."))
    sent: list[str] = []

    async def verb(name: str, target: str | None) -> None:
        sent.append(name)
        if name != "refer":
            return
        await simulator.hang_up(call)  # the caller hangs up as the REFER goes out
        await asyncio.wait_for(machine.close_seen.wait(), 5)  # the close is handled before the answer
        if answer == 404:
            raise CallGone("refer: call not found", 404)
        if answer == 400:
            raise UpstreamError("refer refused with 400", 400)

    rt = CallRuntime(
        machine=machine,
        ctx=CallContext(call.call_id),
        tools=ToolRegistry(),
        connect=Connector(simulator, call.call_id, []),
        verb=verb,
        transfer_targets={"human": "tel:+14155550123"},
        ping_interval=None,
    )
    task = asyncio.create_task(rt.run())
    await call.wait_for(lambda c: bool(c.responses) and c.responses[0].status == "completed", timeout=5)
    with capture_logs() as logs:
        rt.transfer("human")
        assert await asyncio.wait_for(task, 10) == reason  # (a 200: at once, no transfer window)
    assert sent == verbs
    failed = [e["verb"] for e in logs if e["event"] == "call.verb_failed"]
    assert failed == ([] if answer == 200 else ["refer"])
    assert [e["reason"] for e in logs if e["event"] == "call.ended"] == [reason]


@pytest.mark.parametrize("answer", ["after_the_close", "failed_after_the_close", "never"])
async def test_a_hangup_answered_after_the_servers_close_ends_the_call_without_waiting_on_it(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    """The server closes the sideband cleanly as it carries out the hangup, before the hangup's HTTP
    answer (slow, or retried after a 503) comes: the call has ended. The answer is given a moment, then
    cut short, not waited for as long as a stuck tool (nor reported as one): the hangup is logged, and
    ``on_call_end`` runs at once. A failure it answers is logged all the same."""
    monkeypatch.setattr("sideband.runtime.driver.TASK_GRACE", 60.0)  # (a wait that long fails the test)
    call = simulator.create_call(Script([HELLO], step_timeout=10), accept_body={"type": "realtime"})
    machine = ClosesSeen(MachineConfig(session={"type": "realtime", "instructions": "x"}, greeting="Hi."))
    cut: list[str] = []

    async def verb(name: str, target: str | None) -> None:
        await simulator.hang_up(call)  # the server ends the call (a clean close) as it hangs it up
        await asyncio.wait_for(machine.close_seen.wait(), 5)
        if answer == "failed_after_the_close":
            raise UpstreamError("hangup refused with 400", 400)
        if answer == "never":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cut.append(name)
                raise

    ended: list[str] = []
    rt = CallRuntime(
        machine=machine,
        ctx=CallContext(call.call_id),
        tools=ToolRegistry(),
        connect=Connector(simulator, call.call_id, []),
        verb=verb,
        hooks=CallHooks(on_call_end=[lambda ctx, summary: ended.append(summary.reason)]),
        ping_interval=None,
    )
    task = asyncio.create_task(rt.run())
    await call.wait_for(lambda c: bool(c.responses) and c.responses[0].status == "completed", timeout=5)
    with capture_logs() as logs:
        rt.hangup()
        assert await asyncio.wait_for(task, 10) == "hangup"
    assert ended == ["hangup"]
    assert not [e for e in logs if e["event"] == "call.tasks_abandoned"]
    failed = [(e["verb"], e["detail"]) for e in logs if e["event"] == "call.verb_failed"]
    hung_up = [(e["log_level"], e.get("answered")) for e in logs if e["event"] == "call.hung_up"]
    if answer == "failed_after_the_close":
        assert failed == [("hangup", "hangup refused with 400")] and hung_up == []
    else:
        assert failed == [] and hung_up == [("info", False if answer == "never" else None)]
    assert cut == (["hangup"] if answer == "never" else [])


# ---------------------------------------------------------------------------------------- attach
class Connector:
    """Connects to the simulator's sideband, after failing as told (an exception per attempt)."""

    def __init__(self, sim: Simulator, call_id: str, failures: list[BaseException | None]) -> None:
        self.sim, self.call_id, self.failures = sim, call_id, failures
        self.attempts = 0
        self.changed = asyncio.Event()
        self.gate: asyncio.Event | None = None  # when set: failures wait for it (a slow handshake)

    async def __call__(self) -> PushConnection:
        self.attempts += 1
        self.changed.set()
        failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            if self.gate is not None and not self.failures:
                await self.gate.wait()
            raise failure
        return await connect_sideband(self.sim.realtime_url, self.call_id, self.sim.api_key)


def runtime(
    connect: Connector,
    verbs: list[tuple[str, str | None]],
    *,
    attempts: int = 3,
    verb_takes: float = 0.0,
    **config: Any,
) -> CallRuntime:
    """A call over ``connect``; its hangups and refers are recorded in ``verbs``, each ``verb_takes``
    seconds after it is asked for (an upstream answering 503 a few times before it goes through)."""

    async def verb(name: str, target: str | None) -> None:
        if verb_takes:
            await asyncio.sleep(verb_takes)
        verbs.append((name, target))

    machine = CallMachine(MachineConfig(session={"type": "realtime", "instructions": "x"}, **config))
    return CallRuntime(
        machine=machine,
        ctx=CallContext(connect.call_id),
        tools=ToolRegistry(),
        connect=connect,
        verb=verb,
        hooks=CallHooks(),
        reattach_attempts=attempts,
        ping_interval=None,
    )


def refused(status: int) -> Exception:
    if status in (404, 410):
        return CallGone("sideband refused: call not found", status)
    return SidebandRefused(f"sideband refused with {status}", status)


async def transferable(
    simulator: Simulator,
    verb: Callable[[str, str | None], Awaitable[None]],
    *,
    attempts: int,
    **config: Any,
) -> tuple[SimCall, Connector, CallRuntime, asyncio.Task[str]]:
    """A call over a :class:`Connector` that may transfer to ``human``, running, its greeting said; its
    hangups and refers go to ``verb``."""
    call = simulator.create_call(Script([HELLO], step_timeout=10), accept_body={"type": "realtime"})
    connect = Connector(simulator, call.call_id, [])
    machine = CallMachine(
        MachineConfig(session={"type": "realtime", "instructions": "x"}, greeting="Hi.", **config)
    )
    rt = CallRuntime(
        machine=machine,
        ctx=CallContext(call.call_id),
        tools=ToolRegistry(),
        connect=connect,
        verb=verb,
        transfer_targets={"human": "tel:+14155550123"},
        reattach_attempts=attempts,
        ping_interval=None,
    )
    task = asyncio.create_task(rt.run())
    await call.wait_for(lambda c: bool(c.responses) and c.responses[0].status == "completed", timeout=5)
    return call, connect, rt, task


async def test_first_attach_is_retried_after_a_transient_refusal(simulator: Simulator) -> None:
    call = simulator.create_call(Script([HELLO, caller_hangs_up()]), accept_body={"type": "realtime"})
    connect = Connector(simulator, call.call_id, [refused(503)])
    verbs: list[tuple[str, str | None]] = []
    rt = runtime(connect, verbs, greeting="Say hello.")
    assert await asyncio.wait_for(rt.run(), 10) == "remote_closed"
    assert connect.attempts == 2 and call.sideband_connects == 1
    assert [e["type"] for e in call.received][:2] == ["session.update", "response.create"]
    assert verbs == []


@pytest.mark.parametrize(
    ("failures", "reason", "attempts", "verbs_sent"),
    [
        ([503, 503, 503], "connect_failed", 3, [("hangup", None)]),  # gave up: the call is hung up
        ([503, 404], "call_not_found", 2, []),  # the call is gone: stop, nothing to hang up
    ],
)
async def test_first_attach_that_fails_for_good(
    simulator: Simulator,
    failures: list[int],
    reason: str,
    attempts: int,
    verbs_sent: list[tuple[str, str | None]],
) -> None:
    call = simulator.create_call(Script([HELLO]), accept_body={"type": "realtime"})
    connect = Connector(simulator, call.call_id, [refused(s) for s in failures])
    verbs: list[tuple[str, str | None]] = []
    with capture_logs() as logs:
        rt = runtime(connect, verbs, attempts=3)
        assert await asyncio.wait_for(rt.run(), 10) == reason
    assert connect.attempts == attempts and call.sideband_connects == 0
    assert verbs == verbs_sent
    assert [e["reason"] for e in logs if e["event"] == "call.ended"] == [reason]


@pytest.mark.parametrize(("cancelled", "reason"), [(1, "remote_closed"), (3, "connect_failed")])
async def test_an_attach_attempt_that_ends_cancelled_by_itself_is_a_failed_attempt(
    simulator: Simulator, cancelled: int, reason: str
) -> None:
    """A connect that ends cancelled with nobody cancelling it (a library making its own timeout a
    cancellation) is not the call's end: it is tried again, and the call hung up once the attempts
    are spent (it was ended as if over: nobody hung up, and the caller was left on the line)."""
    call = simulator.create_call(Script([HELLO, caller_hangs_up()]), accept_body={"type": "realtime"})
    connect = Connector(simulator, call.call_id, [asyncio.CancelledError() for _ in range(cancelled)])
    verbs: list[tuple[str, str | None]] = []
    with capture_logs() as logs:
        rt = runtime(connect, verbs, attempts=3, greeting="Say hello.")
        assert await asyncio.wait_for(rt.run(), 10) == reason
    assert connect.attempts == min(cancelled + 1, 3)
    assert verbs == ([("hangup", None)] if reason == "connect_failed" else [])
    failed = [(e["status"], e["attempt"]) for e in logs if e["event"] == "sideband.connect_failed"]
    assert failed == [(None, n) for n in range(1, cancelled + 1)]


async def test_a_reattach_that_fails_for_good_hangs_up_at_once(simulator: Simulator) -> None:
    call = simulator.create_call(Script([HELLO], step_timeout=10), accept_body={"type": "realtime"})
    connect = Connector(simulator, call.call_id, [])
    verbs: list[tuple[str, str | None]] = []
    rt = runtime(connect, verbs, attempts=2, greeting="Say hello.", end_cap=30)
    task = asyncio.create_task(rt.run())
    await call.wait_for(lambda c: bool(c.responses) and c.responses[0].status == "completed", timeout=5)
    connect.failures.extend(refused(503) for _ in range(2))
    await simulator.drop_sideband(call, "abnormal")
    # Not after the 30 s end cap: with no socket there is nothing to wait for.
    assert await asyncio.wait_for(task, 5) == "reattach_failed"
    assert verbs == [("hangup", None)] and connect.attempts == 3


@pytest.mark.parametrize("reattach", [False, True])
async def test_a_hangup_after_an_attach_that_failed_gets_its_own_budget(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch, reattach: bool
) -> None:
    """The hangup of a call whose sideband cannot be attached is retried for as long as it takes (its own
    budget), not cut off by the grace the call's end gives its other tasks: the caller must not stay on
    a call nobody controls, and the end says what happened (not ``internal_error``)."""
    monkeypatch.setattr("sideband.runtime.driver.TASK_GRACE", 0.05)
    call = simulator.create_call(Script([HELLO], step_timeout=10), accept_body={"type": "realtime"})
    connect = Connector(simulator, call.call_id, [] if reattach else [refused(503)] * 2)
    verbs: list[tuple[str, str | None]] = []
    rt = runtime(connect, verbs, attempts=2, verb_takes=0.3, greeting="Say hello.")
    with capture_logs() as logs:
        task = asyncio.create_task(rt.run())
        if reattach:
            await call.wait_for(
                lambda c: bool(c.responses) and c.responses[0].status == "completed", timeout=5
            )
            connect.failures.extend(refused(503) for _ in range(2))
            await simulator.drop_sideband(call, "abnormal")
        reason = await asyncio.wait_for(task, 10)
    assert reason == ("reattach_failed" if reattach else "connect_failed")
    assert verbs == [("hangup", None)]
    assert not [e for e in logs if e["event"] == "call.tasks_abandoned"]


async def test_an_attempt_in_flight_when_the_call_ends_backs_off_no_more(simulator: Simulator) -> None:
    call = simulator.create_call(Script([HELLO], step_timeout=10), accept_body={"type": "realtime"})
    connect = Connector(simulator, call.call_id, [])
    verbs: list[tuple[str, str | None]] = []
    rt = runtime(connect, verbs, attempts=10, greeting="Say hello.", end_cap=0.1)
    task = asyncio.create_task(rt.run())
    await call.wait_for(lambda c: bool(c.responses) and c.responses[0].status == "completed", timeout=5)
    connect.gate = asyncio.Event()
    connect.failures.extend(refused(503) for _ in range(3))  # the third waits on the gate
    await simulator.drop_sideband(call, "abnormal")
    async with asyncio.timeout(5):
        while connect.attempts < 4:  # 1 attach + 2 failed re-attaches (backoff 0.2 s, 0.4 s) + 1 in flight
            connect.changed.clear()
            await connect.changed.wait()
    rt.hangup()  # the call ends while that attempt is in flight (after the 0.1 s end cap)
    async with asyncio.timeout(5):
        while rt.machine.closed is None:
            await asyncio.sleep(0.01)
    assert rt.machine.closed == "hangup" and verbs == [("hangup", None)]
    connect.gate.set()  # the attempt fails now, retryably: the next backoff would be 0.8 s
    assert await asyncio.wait_for(task, 0.5) == "hangup"
    assert connect.attempts == 4


async def test_a_reattach_under_way_when_the_call_ends_is_given_up_at_once(simulator: Simulator) -> None:
    """The call ends (code hangs up) while a re-attach's handshake is under way: the end does not wait
    for that attempt (up to its open timeout), which is given up."""
    call = simulator.create_call(Script([HELLO], step_timeout=10), accept_body={"type": "realtime"})
    connect = Connector(simulator, call.call_id, [])
    verbs: list[tuple[str, str | None]] = []
    rt = runtime(connect, verbs, greeting="Say hello.", end_cap=0.1)
    task = asyncio.create_task(rt.run())
    await call.wait_for(lambda c: bool(c.responses) and c.responses[0].status == "completed", timeout=5)
    connect.gate = asyncio.Event()  # the re-attach's handshake hangs until it is set
    connect.failures.append(refused(503))
    await simulator.drop_sideband(call, "abnormal")
    try:
        async with asyncio.timeout(5):
            while connect.attempts < 2:
                connect.changed.clear()
                await connect.changed.wait()
        rt.hangup()
        assert await asyncio.wait_for(asyncio.shield(task), 2) == "hangup"
    finally:
        connect.gate.set()
        await asyncio.wait_for(task, 5)
    assert verbs == [("hangup", None)] and connect.attempts == 2


@pytest.mark.parametrize(
    ("answer", "reason", "verbs"),
    [
        pytest.param(404, "call_not_found", ["refer"], id="refer_finds_the_call_gone"),
        pytest.param(400, "transfer_failed", ["refer", "hangup"], id="refer_refused"),
        pytest.param(200, "transferred", ["refer"], id="refer_carried_out"),
    ],
)
async def test_a_reattach_refused_while_the_refer_is_unanswered_waits_for_its_answer(
    simulator: Simulator, answer: int, reason: str, verbs: list[str]
) -> None:
    """The sideband is lost, and the REFER goes out while it is being attached again: a re-attach refused
    as the call is gone (404) says the server ended the call, not why (the transfer went through, or the
    caller hung up): as for a sideband closed meanwhile, the REFER's answer tells which."""
    sent: list[str] = []
    referred, release = asyncio.Event(), asyncio.Event()

    async def verb(name: str, target: str | None) -> None:
        sent.append(name)
        if name != "refer":
            return
        referred.set()
        await release.wait()
        if answer == 404:
            raise CallGone("refer: call not found", 404)
        if answer == 400:
            raise UpstreamError("refer refused with 400", 400)

    call, connect, rt, task = await transferable(simulator, verb, attempts=3, end_cap=0.1)
    machine = rt.machine
    connect.gate = asyncio.Event()  # the re-attach's handshake waits, then is refused: the call is gone
    connect.failures.append(CallGone("sideband refused: call not found", 404))
    with capture_logs() as logs:
        await simulator.drop_sideband(call, "abnormal")
        async with asyncio.timeout(5):
            while connect.attempts < 2:
                connect.changed.clear()
                await connect.changed.wait()
        rt.transfer("human")  # (the REFER goes out while the re-attach is under way: the end cap)
        await asyncio.wait_for(referred.wait(), 5)
        connect.gate.set()
        await until(lambda: [e for e in logs if e["event"] == "sideband.refused"])
        assert machine.closed is None  # the refusal ends nothing yet
        release.set()
        assert await asyncio.wait_for(task, 10) == reason
    assert sent == verbs and connect.attempts == 2
    assert [e["reason"] for e in logs if e["event"] == "call.ended"] == [reason]


@pytest.mark.parametrize(
    ("failures", "reason", "verbs"),
    [
        pytest.param([503, 503], "transfer_failed", ["refer", "hangup"], id="attempts_spent"),
        pytest.param(None, "transfer_failed", ["refer", "hangup"], id="sockets_dropped_at_once"),
        pytest.param([503, 404], "transferred", ["refer"], id="call_gone"),
        pytest.param([410], "transferred", ["refer"], id="call_gone_410"),
    ],
)
async def test_a_transfer_awaited_whose_sideband_drops_ends_by_what_its_reattach_finds(
    simulator: Simulator, failures: list[int] | None, reason: str, verbs: list[str]
) -> None:
    """A sideband dropped without a close after the refer's 200 is attached again: refused as the call
    is gone (404, 410), the server ended it, carrying the transfer out (``transferred``, no hangup);
    the attempts spent (or sockets lost again and again as soon as they open), nothing is left to
    wait on and the call is hung up at once (``transfer_failed``), not left to its 45 s window."""
    sent: list[str] = []

    async def verb(name: str, target: str | None) -> None:
        sent.append(name)

    call, connect, rt, task = await transferable(simulator, verb, attempts=2)
    machine = rt.machine
    rt.transfer("human")
    await until(lambda: machine.transferring)
    with capture_logs() as logs:
        if failures is None:
            for again in (1, 2):  # each re-attached socket lost as soon as it opened
                await simulator.drop_sideband(call, "abnormal")
                async with asyncio.timeout(5):
                    while len([e for e in logs if e["event"] == "sideband.reattached"]) < again:
                        await asyncio.sleep(0.01)
        else:
            connect.failures.extend(refused(status) for status in failures)
        await simulator.drop_sideband(call, "abnormal")
        assert await asyncio.wait_for(task, 5) == reason  # (not after the 45 s window)
    assert sent == verbs and call.sideband_connects == (3 if failures is None else 1)
    unconfirmed = [e["why"] for e in logs if e["event"] == "call.transfer_unconfirmed"]
    assert unconfirmed == (["sideband_lost"] if reason == "transfer_failed" else [])


@pytest.mark.parametrize("refused_as_gone", [False, True])
async def test_a_sideband_dropped_while_the_refer_is_unanswered_is_attached_again(
    simulator: Simulator, refused_as_gone: bool
) -> None:
    """The sideband drops without a close while the REFER is out, unanswered: it may be a blip, the call
    going on. It is attached again, and the REFER's 200 then starts the wait for the transfer as ever
    (not ending the call ``transferred`` at once, the caller left on a call nobody controls should the
    transfer fail). Refused as the call is gone, the REFER's answer tells (its 200: ``transferred``)."""
    sent: list[str] = []
    referred, answer = asyncio.Event(), asyncio.Event()

    async def verb(name: str, target: str | None) -> None:
        sent.append(name)
        if name == "refer":
            referred.set()
            await answer.wait()

    call, connect, rt, task = await transferable(simulator, verb, attempts=3)
    if refused_as_gone:
        connect.failures.append(refused(404))
    rt.transfer("human")
    await asyncio.wait_for(referred.wait(), 5)
    with capture_logs() as logs:
        await simulator.drop_sideband(call, "abnormal")
        if refused_as_gone:
            await until(lambda: [e for e in logs if e["event"] == "sideband.refused"])
            assert rt.machine.closed is None  # (the REFER's answer tells)
            answer.set()
            assert await asyncio.wait_for(task, 5) == "transferred"
        else:
            await call.wait_for(lambda c: c.sideband_connects == 2, timeout=5, what="a re-attach")
            answer.set()
            await until(lambda: rt.machine.transferring)
            assert rt.machine.closed is None  # the transfer is awaited over the new socket
            await simulator.hang_up(call)  # (the server ends the call: the transfer took)
            assert await asyncio.wait_for(task, 5) == "transferred"
    assert sent == ["refer"]
    assert [e["reason"] for e in logs if e["event"] == "call.ended"] == ["transferred"]


@pytest.mark.parametrize(
    ("hangup_finds", "reason"), [("gone", "transferred"), ("failure", "transfer_failed")]
)
async def test_a_reattach_refused_while_the_transfer_windows_hangup_is_out_waits_for_its_answer(
    simulator: Simulator, hangup_finds: str, reason: str
) -> None:
    """A sideband dropped after the refer's 200 is being attached again when the transfer's window ends:
    its hangup goes out, then the re-attach is refused as the call is gone. That says the server ended
    the call, not how: the hangup's answer tells (gone: the transfer took, ``transferred``); a hangup
    that fails says nothing of a call known ended (``transfer_failed``, not ``hangup_failed``)."""
    sent: list[str] = []
    hanging_up, answer = asyncio.Event(), asyncio.Event()

    async def verb(name: str, target: str | None) -> None:
        sent.append(name)
        if name == "hangup":
            hanging_up.set()
            await answer.wait()
            if hangup_finds == "gone":
                raise CallGone("hangup: call not found", 404)
            raise UpstreamError("hangup: no answer within its budget", 503)

    call, connect, rt, task = await transferable(simulator, verb, attempts=3, transfer_confirm=0.5)
    rt.transfer("human")
    await until(lambda: rt.machine.transferring)
    with capture_logs() as logs:
        connect.gate = asyncio.Event()  # the re-attach waits, then is refused: the call is gone
        connect.failures.append(refused(404))
        await simulator.drop_sideband(call, "abnormal")
        await asyncio.wait_for(hanging_up.wait(), 5)  # (the window ended while the re-attach waits)
        connect.gate.set()
        await until(lambda: [e for e in logs if e["event"] == "sideband.refused"])
        assert rt.machine.closed is None  # the refusal ends nothing yet
        answer.set()
        assert await asyncio.wait_for(task, 5) == reason
    assert sent == ["refer", "hangup"]
    assert [e["reason"] for e in logs if e["event"] == "call.ended"] == [reason]


@pytest.mark.parametrize(
    ("answered_first", "reason", "verbs"),
    [
        pytest.param(True, "transfer_failed", ["refer", "hangup"], id="refer_answered_before"),
        pytest.param(False, "transfer_failed", ["refer", "hangup"], id="refer_answered_after"),
    ],
)
async def test_a_reattach_given_up_while_a_transfer_is_out_does_not_wait_out_its_window(
    simulator: Simulator, answered_first: bool, reason: str, verbs: list[str]
) -> None:
    """The REFER goes out while a lost sideband is being attached again, and the re-attach is given up:
    as for a sideband lost once the REFER is out, a transfer awaited is hung up at once (nobody would
    control the call, nor see its end), and so is one a REFER answered 200 later starts; neither waits
    out the transfer's window with no socket."""
    sent: list[str] = []
    referred, release = asyncio.Event(), asyncio.Event()

    async def verb(name: str, target: str | None) -> None:
        sent.append(name)
        if name == "refer":
            referred.set()
            await release.wait()

    call, connect, rt, task = await transferable(
        simulator, verb, attempts=2, end_cap=0.1, transfer_confirm=30
    )
    machine = rt.machine
    connect.gate = asyncio.Event()  # the last re-attach attempt waits for it, then fails: given up
    connect.failures.extend(refused(503) for _ in range(2))
    with capture_logs() as logs:
        await simulator.drop_sideband(call, "abnormal")
        async with asyncio.timeout(5):
            while connect.attempts < 3:
                connect.changed.clear()
                await connect.changed.wait()
        rt.transfer("human")  # (the REFER goes out while the re-attach is under way: the end cap)
        await asyncio.wait_for(referred.wait(), 5)
        if answered_first:
            release.set()
            await until(lambda: machine.transferring)
        connect.gate.set()
        async with asyncio.timeout(5):  # (the attach given up as that attempt's failure is logged)
            while not [e for e in logs if e["event"] == "sideband.connect_failed" and e["attempt"] == 2]:
                await asyncio.sleep(0.01)
        release.set()
        assert await asyncio.wait_for(task, 5) == reason  # (not after the 30 s window)
    assert sent == verbs and connect.attempts == 3
    unconfirmed = [e["why"] for e in logs if e["event"] == "call.transfer_unconfirmed"]
    assert unconfirmed == ["sideband_lost"]


async def test_a_run_cut_short_during_an_attach_takes_the_attempt_with_it(simulator: Simulator) -> None:
    """A shutdown past its grace cancels the call's run while its attach is in its handshake: the
    attempt is cancelled too, and over by the time the run is."""
    call = simulator.create_call(Script([HELLO], step_timeout=10), accept_body={"type": "realtime"})
    tried, given_up = asyncio.Event(), asyncio.Event()

    async def connect() -> PushConnection:
        tried.set()
        try:
            await asyncio.Event().wait()  # a handshake that never ends
        except asyncio.CancelledError:
            given_up.set()
            raise
        raise AssertionError("unreachable")

    rt = CallRuntime(
        machine=CallMachine(MachineConfig(session={"type": "realtime", "instructions": "x"})),
        ctx=CallContext(call.call_id),
        tools=ToolRegistry(),
        connect=connect,
        hooks=CallHooks(),
        ping_interval=None,
    )
    task = asyncio.create_task(rt.run())
    await asyncio.wait_for(tried.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert given_up.is_set() and rt.summary.reason == "shutdown"


async def test_reattach_stops_as_soon_as_the_call_has_ended(simulator: Simulator) -> None:
    call = simulator.create_call(Script([HELLO], step_timeout=10), accept_body={"type": "realtime"})
    connect = Connector(simulator, call.call_id, [])
    verbs: list[tuple[str, str | None]] = []
    rt = runtime(connect, verbs, attempts=20, greeting="Say hello.", end_cap=0.1)
    task = asyncio.create_task(rt.run())
    await call.wait_for(lambda c: bool(c.responses) and c.responses[0].status == "completed", timeout=5)
    connect.failures.extend(refused(503) for _ in range(20))  # every re-attach now fails
    await simulator.drop_sideband(call, "abnormal")
    async with asyncio.timeout(5):
        while connect.attempts < 2:  # the first re-attach attempt failed: the driver backs off
            connect.changed.clear()
            await connect.changed.wait()
    rt.hangup()
    assert await asyncio.wait_for(task, 1.0) == "hangup"  # not after 20 attempts
    assert verbs == [("hangup", None)] and connect.attempts == 2


@pytest.mark.parametrize("attempt", ["fails", "succeeds"])
async def test_a_call_hung_up_during_its_first_attach_is_not_started(
    simulator: Simulator, attempt: str
) -> None:
    """A shutdown while the first attach is under way sends the hangup at once. The attempt in flight
    then failing makes no further attempt; succeeding starts nothing (no session config, no greeting, no
    ``on_call_start``): its socket is closed. The call ends with the shutdown's reason once the hangup is
    done, ``on_call_end`` as on any call."""
    call = simulator.create_call(Script([HELLO], step_timeout=10), accept_body={"type": "realtime"})
    gate, tried, connected = asyncio.Event(), asyncio.Event(), asyncio.Event()
    hanging_up, hung_up = asyncio.Event(), asyncio.Event()
    attempts: list[PushConnection | None] = []

    async def connect() -> PushConnection:
        attempts.append(None)
        tried.set()
        await gate.wait()
        if attempt == "fails" and len(attempts) == 1:
            raise refused(503)
        ws = await connect_sideband(simulator.realtime_url, call.call_id, simulator.api_key)
        attempts[-1] = ws
        connected.set()
        return ws

    async def verb(name: str, target: str | None) -> None:
        hanging_up.set()
        await hung_up.wait()

    started: list[str] = []
    ended: list[str] = []
    rt = CallRuntime(
        machine=CallMachine(MachineConfig(session={"type": "realtime", "instructions": "x"}, greeting="Hi.")),
        ctx=CallContext(call.call_id),
        tools=ToolRegistry(),
        connect=connect,
        verb=verb,
        hooks=CallHooks(
            on_call_start=[lambda ctx: started.append(ctx.call_id)],
            on_call_end=[lambda ctx, summary: ended.append(summary.reason)],
        ),
        reattach_attempts=3,
        ping_interval=None,
    )
    task = asyncio.create_task(rt.run())
    await asyncio.wait_for(tried.wait(), 5)
    rt.abandon("shutdown")  # as a shutdown's drain does
    await asyncio.wait_for(hanging_up.wait(), 5)
    tried.clear()
    gate.set()
    if attempt == "succeeds":
        await asyncio.wait_for(connected.wait(), 5)
        assert attempts[0] is not None
        await asyncio.wait_for(attempts[0].wait_closed(), 5)  # closed, not started
    else:
        # (the next attempt would come after a 0.2 s backoff)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tried.wait(), 1)
    hung_up.set()
    assert await asyncio.wait_for(task, 5) == "shutdown"
    assert len(attempts) == 1
    assert [e["type"] for e in call.received] == []
    assert not rt.attached.is_set() and started == [] and ended == ["shutdown"]


# ----------------------------------------------------------------------------- silently dead socket
def gated_tool_call(
    simulator: Simulator, result: str
) -> tuple[ToolRegistry, SimCall, asyncio.Event, asyncio.Event]:
    """A call whose model calls tool ``slow``, which returns ``result`` once ``release`` is set; the
    caller hangs up after the model's answer. Returns (tools, call, started, release)."""
    started, release = asyncio.Event(), asyncio.Event()
    tools = ToolRegistry()

    async def slow() -> str:
        started.set()
        await asyncio.wait_for(release.wait(), 5)
        return result

    tools.add(slow)
    call = simulator.create_call(
        Script([caller_says("go"), model_calls("slow", {}), model_says("Done."), caller_hangs_up()]),
        accept_body={"type": "realtime", "tools": tools.definitions()},
    )
    return tools, call, started, release


async def test_outputs_lost_in_a_silently_dead_socket_are_sent_again(simulator: Simulator) -> None:
    """The path dies without a close while a tool runs: its output is written into the dead socket and
    lost. The keepalive notices, the call re-attaches, and the unacknowledged output goes out again
    (once), followed by one response.create: the model answers instead of leaving the caller in silence."""
    tools, call, started, release = gated_tool_call(simulator, "after the outage")
    with capture_logs() as logs:
        rt = CallRuntime(
            machine=CallMachine(
                MachineConfig(session={"type": "realtime", "instructions": "x"}, reattach_grace=0.3)
            ),
            ctx=CallContext(call.call_id),
            tools=tools,
            connect=Connector(simulator, call.call_id, []),
            hooks=CallHooks(),
            reattach_attempts=2,
            ping_interval=0.5,  # (a pong late by a busy machine's pause is no timeout of a healthy socket)
        )
        run = asyncio.ensure_future(rt.run())
        await asyncio.wait_for(started.wait(), 5)
        await simulator.drop_sideband(call, "unreachable")
        release.set()  # the output is written into the dead socket
        assert await asyncio.wait_for(run, 10) == "remote_closed"
    assert call.sideband_connects == 2
    sent = [e["item"]["output"] for e in call.received if e["type"] == "conversation.item.create"]
    assert sent == ["after the outage"]  # the copy written into the dead socket never arrived
    # on the new socket: the session config, then (no acknowledgement came within the grace) the output
    # again and one response.create
    assert [e["type"] for e in call.received][-3:] == [
        "session.update",
        "conversation.item.create",
        "response.create",
    ]
    assert [e["event"] for e in logs if e["event"].startswith("sideband.")] == [
        "sideband.attached",
        "sideband.ready",
        "sideband.keepalive_timeout",
        "sideband.lost",
        "sideband.reattached",
        "sideband.ready",
    ]
    assert [t.name for t in rt.summary.tools] == ["slow"] and not call.script_error


def _reattaching(simulator: Simulator, call: SimCall) -> CallRuntime:
    """A runtime for ``call`` with no tools, which attaches again twice at most after a loss."""
    return CallRuntime(
        machine=CallMachine(
            MachineConfig(
                session={"type": "realtime", "instructions": "x"}, greeting="Hi", reattach_grace=0.3
            )
        ),
        ctx=CallContext(call.call_id),
        tools=ToolRegistry(),
        connect=Connector(simulator, call.call_id, []),
        hooks=CallHooks(),
        reattach_attempts=2,
        ping_interval=0.5,
    )


@pytest.mark.parametrize("lost", [True, False])
async def test_text_lost_in_a_silently_dead_socket_is_sent_again_before_its_answer(
    simulator: Simulator, lost: bool
) -> None:
    """Code adds the caller's keyed digits as text (``send_text``) while the path is dead: the item is
    written into the socket and lost, and the model would answer without it. After the re-attach it goes
    again, once, before the response.create that answers it. (Text the server acknowledged before the
    loss is not sent again.)"""
    call = simulator.create_call(
        Script([HELLO, model_answers("Order 42: it shipped today."), pause(30)]),
        accept_body={"type": "realtime"},
    )
    rt = _reattaching(simulator, call)
    with capture_logs() as logs:
        run = asyncio.ensure_future(rt.run())
        await call.wait_for(lambda c: bool(c.responses) and c.responses[0].status == "completed", timeout=5)
        if lost:
            await simulator.drop_sideband(call, "unreachable")
        rt.send_text("[keypad] 42")
        if not lost:  # answered, its acknowledgement seen; then the socket is lost
            await call.wait_for(lambda c: len(c.responses) == 2 and c.responses[1].status == "completed", 5)
            await simulator.drop_sideband(call, "abnormal")
        await call.wait_for(lambda c: len(c.responses) == 2 and c.responses[1].status == "completed", 10)
        await call.wait_connected(2, timeout=5)
        await simulator.hang_up(call)
        assert await asyncio.wait_for(run, 10) == "remote_closed"
    kinds = [e["type"] for e in call.received]
    text = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "[keypad] 42"}]}
    assert [e["item"] for e in call.received if e["type"] == "conversation.item.create"] == [text]
    assert kinds.index("conversation.item.create") < len(kinds) - 1 - kinds[::-1].index("response.create")
    assert call.responses[1].text == "Order 42: it shipped today."
    assert [e["items"] for e in logs if e["event"] == "sideband.items_resent"] == ([1] if lost else [])
    assert ("caller", "[keypad] 42") in rt.summary.transcript


async def test_the_same_text_twice_is_acknowledged_once_each(simulator: Simulator) -> None:
    """The caller pressed 1 twice: two equal texts. The server acknowledges the first twice (added, then
    done); that is one item's acknowledgement, not both's: the second, lost with the socket, goes again."""
    call = simulator.create_call(Script([HELLO, pause(30)]), accept_body={"type": "realtime"})
    original, dead_on = call._on_text, []

    async def on_text(data: str) -> None:
        if dead_on and call.sideband_connects == dead_on[0]:
            return  # the dead path: what is written to it is lost
        await original(data)
        if json.loads(data).get("type") == "conversation.item.create" and not dead_on:
            dead_on.append(call.sideband_connects)  # the path dies right after the first was acknowledged
            await call._close_sockets("unreachable")

    call._on_text = on_text  # type: ignore[method-assign]
    rt = _reattaching(simulator, call)
    with capture_logs() as logs:
        run = asyncio.ensure_future(rt.run())
        await call.wait_for(lambda c: bool(c.responses) and c.responses[0].status == "completed", timeout=5)
        rt.send_text("[keypad] 1")
        rt.send_text("[keypad] 1")
        await call.wait_for(
            lambda c: sum(e["type"] == "conversation.item.create" for e in c.received) == 2, timeout=10
        )
        await simulator.hang_up(call)
        await asyncio.wait_for(run, 10)
    assert [e["items"] for e in logs if e["event"] == "sideband.items_resent"] == [1]
    assert call.sideband_connects == 2


async def test_a_message_the_server_refused_is_not_sent_again_after_a_reattach(simulator: Simulator) -> None:
    """The server refused code's message item (its error names the item's event_id): it is not kept to be
    sent again after the re-attach, only to be refused again and reported lost."""
    call = simulator.create_call(Script([HELLO, pause(30)]), accept_body={"type": "realtime"})
    rt = _reattaching(simulator, call)
    bad = {"type": "message", "role": "assistant", "content": [{"type": "text", "text": "Noted."}]}
    with capture_logs() as logs:
        run = asyncio.ensure_future(rt.run())
        await call.wait_for(lambda c: bool(c.responses) and c.responses[0].status == "completed", timeout=5)
        rt.send_event({"type": "conversation.item.create", "item": bad})
        await call.wait_for(lambda c: any(e["type"] == "error" for e in c.sent), timeout=5)
        updates = sum(e["type"] == "session.update" for e in call.received)
        await simulator.drop_sideband(call, "abnormal")
        await call.wait_connected(2, timeout=10)
        # (the re-attached socket's session.update comes after anything sent again)
        await call.wait_for(lambda c: sum(e["type"] == "session.update" for e in c.received) > updates, 10)
        await simulator.hang_up(call)
        await asyncio.wait_for(run, 10)
    (refused,) = [e for e in call.sent if e["type"] == "error"]
    (sent,) = [e for e in call.received if e["type"] == "conversation.item.create"]
    assert refused["error"]["event_id"] == sent["event_id"]
    assert not [e for e in logs if e["event"] in ("sideband.items_resent", "sideband.item_lost")]


async def test_text_lost_again_and_again_is_given_up(simulator: Simulator) -> None:
    """Each socket the text goes out on again dies silently too: it is sent again after each of 3
    re-attaches, then given up (``sideband.item_lost``), not sent after every re-attach for ever."""
    call = simulator.create_call(Script([HELLO, pause(30)]), accept_body={"type": "realtime"})
    connect = Connector(simulator, call.call_id, [])

    async def dead_for_a_while() -> PushConnection:
        ws = await connect()
        if 2 <= connect.attempts <= 4:  # what is written to these is never read
            await simulator.drop_sideband(call, "unreachable")
        return ws

    rt = CallRuntime(
        machine=CallMachine(
            MachineConfig(
                session={"type": "realtime", "instructions": "x"}, greeting="Hi", reattach_grace=0.1
            )
        ),
        ctx=CallContext(call.call_id),
        tools=ToolRegistry(),
        connect=dead_for_a_while,
        hooks=CallHooks(),
        reattach_attempts=6,
        ping_interval=0.3,
    )
    with capture_logs() as logs:
        run = asyncio.ensure_future(rt.run())
        await call.wait_for(lambda c: bool(c.responses) and c.responses[0].status == "completed", timeout=5)
        await simulator.drop_sideband(call, "unreachable")
        rt.send_text("[keypad] 42")
        await call.wait_connected(5, timeout=15)
        async with asyncio.timeout(5):
            while not [e for e in logs if e["event"] == "sideband.item_lost"]:
                await asyncio.sleep(0.01)
        await simulator.hang_up(call)
        assert await asyncio.wait_for(run, 10) == "remote_closed"
    assert not [e for e in call.received if e["type"] == "conversation.item.create"]
    assert [e["items"] for e in logs if e["event"] == "sideband.items_resent"] == [1, 1, 1]
    lost = [(e["role"], e["sent"], e["log_level"]) for e in logs if e["event"] == "sideband.item_lost"]
    assert lost == [("user", 4, "warning")]


async def test_a_greeting_lost_with_a_socket_dead_from_the_start_is_said_after_the_reattach(
    simulator: Simulator,
) -> None:
    """The network path dies as the sideband opens: the session config and the greeting are written into
    it and never arrive. The keepalive notices, the call re-attaches, and once nothing of the greeting
    has shown on the new socket within the grace it is asked for again: the caller is greeted, once."""
    call = simulator.create_call(Script([HELLO, caller_hangs_up()]), accept_body={"type": "realtime"})
    connect = Connector(simulator, call.call_id, [])

    async def dead_at_first() -> PushConnection:
        ws = await connect()
        if connect.attempts == 1:  # what is written to this one is never read
            await simulator.drop_sideband(call, "unreachable")
        return ws

    with capture_logs() as logs:
        rt = CallRuntime(
            machine=CallMachine(
                MachineConfig(
                    session={"type": "realtime", "instructions": "x"},
                    greeting="Greet the caller.",
                    reattach_grace=0.3,
                )
            ),
            ctx=CallContext(call.call_id),
            tools=ToolRegistry(),
            connect=dead_at_first,
            hooks=CallHooks(),
            reattach_attempts=2,
            ping_interval=0.5,
        )
        assert await asyncio.wait_for(rt.run(), 10) == "remote_closed"
    assert call.sideband_connects == 2 and not call.script_error
    creates = [untagged(e) for e in call.received if e["type"] == "response.create"]
    assert [e.get("response") for e in creates] == [{"instructions": "Greet the caller."}]
    assert rt.summary.transcript == [("agent", "Hello.")]
    assert [e["purpose"] for e in logs if e["event"] == "response.lost"] == ["greeting"]


async def test_a_caller_active_by_other_means_stops_the_idle_goodbye_at_once(simulator: Simulator) -> None:
    """The idle limit's goodbye has been said and still plays when code reports the caller active
    (``caller_active``: audio a backend streams): the end is withdrawn and the goodbye's audio cleared at
    once, not when the next server event or timer happens to come (here: the end of its playback, a
    second on; the idle limit started again would come later)."""
    simulator.playback_rate = 24.0  # the goodbye plays on for about a second after its response is done
    call = simulator.create_call(
        Script([model_answers("Thank you, goodbye now."), pause(30)]),
        accept_body={"type": "realtime"},
    )
    said = asyncio.Event()
    hooks = CallHooks(on_response=[lambda ctx, response_id, status, running: said.set()])
    with capture_logs() as logs:
        rt = CallRuntime(
            machine=CallMachine(
                MachineConfig(session={"type": "realtime", "instructions": "x"}, max_idle_duration=1.5)
            ),
            ctx=CallContext(call.call_id),
            tools=ToolRegistry(),
            connect=Connector(simulator, call.call_id, []),
            hooks=hooks,
            ping_interval=None,
        )
        run = asyncio.ensure_future(rt.run())
        await asyncio.wait_for(said.wait(), 5)  # the goodbye's response is done; its audio plays
        rt.caller_active()
        await call.wait_received("output_audio_buffer.clear", timeout=5)
        sent = [e["type"] for e in call.sent]
        assert "output_audio_buffer.cleared" in sent and "output_audio_buffer.stopped" not in sent
        await simulator.hang_up(call)
        assert await asyncio.wait_for(run, 5) == "remote_closed"
    assert [e["limit"] for e in logs if e["event"] == "call.limit_withdrawn"] == ["idle"]


def held_reattach(
    simulator: Simulator, call: SimCall, tools: ToolRegistry, machine: CallMachine
) -> tuple[CallRuntime, Connector, asyncio.Event]:
    """A runtime whose re-attach, once begun, is held up until ``connect.gate`` is set (then refused
    once, then made); ``finished`` is set as a tool finishes. Returns (runtime, connect, finished)."""
    finished = asyncio.Event()
    connect = Connector(simulator, call.call_id, [None, SidebandRefused("sideband refused with 503", 503)])
    connect.gate = asyncio.Event()
    hooks = CallHooks()
    hooks.on_tool.append(lambda ctx, record: finished.set())
    rt = CallRuntime(
        machine=machine,
        ctx=CallContext(call.call_id),
        tools=tools,
        connect=connect,
        hooks=hooks,
        reattach_attempts=3,
        ping_interval=None,
    )
    return rt, connect, finished


async def test_an_output_queued_while_detached_goes_out_once_after_the_reattach(simulator: Simulator) -> None:
    tools, call, started, release = gated_tool_call(simulator, "queued")
    machine = CallMachine(MachineConfig(session={"type": "realtime", "instructions": "x"}))
    rt, connect, finished = held_reattach(simulator, call, tools, machine)
    run = asyncio.ensure_future(rt.run())
    await asyncio.wait_for(started.wait(), 5)
    connect.changed.clear()
    await simulator.drop_sideband(call, "abnormal")
    await asyncio.wait_for(connect.changed.wait(), 5)  # the re-attach has begun
    release.set()
    await asyncio.wait_for(finished.wait(), 5)  # its output waits in the outbox: no socket to write to
    connect.gate.set()
    assert await asyncio.wait_for(run, 10) == "remote_closed"
    assert connect.attempts == 3 and call.sideband_connects == 2
    outs = [e["item"]["output"] for e in call.received if e["type"] == "conversation.item.create"]
    assert outs == ["queued"]
    # on the new socket: what waited (the output, its create, in their order), then the session config;
    # the output is acknowledged there, and nothing is sent twice
    assert [e["type"] for e in call.received][-3:] == [
        "conversation.item.create",
        "response.create",
        "session.update",
    ]
    assert [e["type"] for e in call.received].count("response.create") == 1


async def test_a_filler_queued_while_detached_is_not_said_after_the_answer(simulator: Simulator) -> None:
    """The filler's time comes while the socket is lost, and the tool finishes before the re-attach: the
    filler and the create for the answer wait in the outbox. On the new socket the output goes out, the
    stale filler does not, and one create follows the output: nothing is refused, no late "still
    working on it"."""
    tools, call, started, release = gated_tool_call(simulator, "queued")
    machine = CallMachine(
        MachineConfig(session={"type": "realtime", "instructions": "x"}, filler_after={"slow": 60.0})
    )
    with capture_logs() as logs:
        rt, connect, finished = held_reattach(simulator, call, tools, machine)
        run = asyncio.ensure_future(rt.run())
        await asyncio.wait_for(started.wait(), 5)
        tool_call = call.sent_of_type("response.function_call_arguments.done")[0]["call_id"]
        connect.changed.clear()
        await simulator.drop_sideband(call, "abnormal")
        await asyncio.wait_for(connect.changed.wait(), 5)  # the re-attach has begun
        rt._apply(machine.timer("filler:" + tool_call))  # the filler's time comes now
        assert [e["event"] for e in logs].count("tool.filler") == 1
        assert len(rt._outbox) == 1  # the filler's create, queued with no socket to write to
        release.set()
        await asyncio.wait_for(finished.wait(), 5)
        connect.gate.set()
        assert await asyncio.wait_for(run, 10) == "remote_closed"
    assert call.sideband_connects == 2
    creates = [e for e in call.received if e["type"] == "response.create"]
    assert len(creates) == 1 and "response" not in untagged(
        creates[0]
    )  # the answer's create; no filler at all
    assert [e["type"] for e in call.received][-3:] == [
        "conversation.item.create",
        "session.update",
        "response.create",
    ]
    assert [e["type"] for e in call.sent if e["type"] == "error"] == []
    assert [e["purpose"] for e in logs if e["event"] == "response.dropped"] == ["filler:" + tool_call]


async def test_code_frames_queued_while_detached_go_out_in_order_after_the_reattach(
    simulator: Simulator,
) -> None:
    call = simulator.create_call(Script([pause(30)]), accept_body={"type": "realtime"})
    connect = Connector(simulator, call.call_id, [None, SidebandRefused("sideband refused with 503", 503)])
    connect.gate = asyncio.Event()
    rt = runtime(connect, [])
    run = asyncio.ensure_future(rt.run())
    await call.wait_connected(1, timeout=5)
    await call.wait_for(lambda c: bool(c.sent_of_type("session.updated")), timeout=5)
    connect.changed.clear()
    await simulator.drop_sideband(call, "abnormal")
    await asyncio.wait_for(connect.changed.wait(), 5)  # the re-attach has begun
    rt.send_event({"type": "response.create", "event_id": "app_create_1", "response": {"instructions": "Hi"}})
    rt.send_event({"type": "input_audio_buffer.clear", "event_id": "app_clear_1"})
    connect.gate.set()
    await call.wait_for(lambda c: any(e.get("event_id") == "app_clear_1" for e in c.received), timeout=5)
    mine = [e.get("event_id") for e in call.received if str(e.get("event_id")).startswith("app_")]
    assert mine == ["app_create_1", "app_clear_1"]
    rt.hangup()
    assert await asyncio.wait_for(run, 10) in ("hangup", "remote_closed")


# ------------------------------------------------------------------------------------------ timers
async def test_call_timers_fire_in_deadline_order_behind_one_loop_timer() -> None:
    fired: list[str] = []
    at: dict[str, float] = {}
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    class Recording(CallMachine):
        def timer(self, name: str) -> list[Any]:
            fired.append(name)
            at[name] = loop.time()
            if name == "last":
                done.set()
            if name == "boom":
                raise RuntimeError("a bug in one timer")
            return [StartTimer("again", 0.03)] if name == "b" else []

    async def never() -> PushConnection:
        raise AssertionError("not connected in this test")

    rt = CallRuntime(
        machine=Recording(MachineConfig(session={"type": "realtime"})),
        ctx=CallContext("rtc_timers"),
        tools=ToolRegistry(),
        connect=never,
        ping_interval=None,
    )
    start = loop.time()
    rt._apply(
        [
            StartTimer("c", 0.5),  # armed first: a later, earlier timer must still fire on time
            StartTimer("a", 0.02),
            StartTimer("b", 0.04),
            StartTimer("x", 0.03),
            CancelTimer("x"),  # never fires
            StartTimer("a", 0.05),  # restarted later: fires then, not at 0.02
            StartTimer("boom", 0.55),  # raises: the timers after it still fire
            StartTimer("last", 0.6),
        ]
    )
    assert sorted(rt._deadlines) == ["a", "b", "boom", "c", "last"] and rt._alarm is not None
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        await asyncio.wait_for(done.wait(), 5)
    finally:
        loop.set_exception_handler(None)
    assert fired == ["b", "a", "again", "c", "boom", "last"]
    assert [str(e.get("exception")) for e in errors] == ["a bug in one timer"]
    assert at["b"] - start < 0.4 and at["c"] - start >= 0.499  # on time, not batched with c
    assert rt._deadlines == {} and rt._alarm is None


async def test_a_refused_session_change_does_not_sink_the_others_on_a_reattach(simulator: Simulator) -> None:
    base = {"type": "realtime", "instructions": "base"}
    call = simulator.create_call(Script([wait_for_greeting("Hello."), pause(30)]), accept_body=base)

    async def connect() -> PushConnection:
        return await connect_sideband(simulator.realtime_url, call.call_id, simulator.api_key)

    runtime = CallRuntime(
        machine=CallMachine(MachineConfig(session=base, greeting="Say hello.")),
        ctx=CallContext(call.call_id),
        tools=ToolRegistry(),
        connect=connect,
        reattach_attempts=3,
        ping_interval=None,
    )
    task = asyncio.create_task(runtime.run())

    def answered(c: Any, updates: int) -> bool:
        sent = [e for e in c.received if e["type"] == "session.update"]
        answers = [
            e
            for e in c.sent
            if e["type"] == "session.updated"
            or (e["type"] == "error" and e["error"].get("code") == "cannot_update_voice")
        ]
        return len(sent) == updates and len(answers) >= updates

    try:
        await call.wait_for(lambda c: bool(c.responses) and c.responses[0].status == "completed", timeout=5)
        runtime.update_session(voice="cedar")  # refused: the model has spoken already
        runtime.update_session(instructions="changed")
        await call.wait_for(lambda c: answered(c, 3), timeout=5)
        assert call.session["instructions"] == "changed"
        await simulator.drop_sideband(call, "abnormal")
        # re-attached: the base config, then the instructions (the refused voice is not sent again)
        await call.wait_for(lambda c: c.sideband_connects >= 2 and answered(c, 5), timeout=5)
        assert call.session["instructions"] == "changed"
        voices = [e for e in call.received if e["type"] == "session.update" and "audio" in e["session"]]
        assert len(voices) == 1
    finally:
        runtime.abandon("test")
        await asyncio.wait_for(task, 5)


async def test_a_call_whose_peer_stopped_reading_still_ends() -> None:
    """A sideband peer (or a proxy) that no longer reads: the flush and the closing handshake stall on a
    full socket. The call's end still comes, within the close timeout: the read loop stops at the end,
    the close gives up and aborts the connection, and the stuck flush ends with it."""
    from websockets.asyncio.server import serve

    from sideband.runtime.driver import _CLOSE_TIMEOUT

    stop = asyncio.Event()

    async def handler(ws: Any) -> None:
        ws.transport.pause_reading()
        await stop.wait()

    async with serve(handler, "127.0.0.1", 0, close_timeout=0.5) as server:  # (its own end: not ours)
        port = server.sockets[0].getsockname()[1]
        verbs: list[str] = []

        async def verb(name: str, target: str | None) -> None:
            verbs.append(name)

        runtime = CallRuntime(
            machine=CallMachine(MachineConfig(session={"type": "realtime", "instructions": "x"})),
            ctx=CallContext("rtc_x"),
            tools=ToolRegistry(),
            connect=lambda: connect_sideband(f"ws://127.0.0.1:{port}/v1/realtime", "rtc_x", "sk"),
            verb=verb,
            hooks=CallHooks(),
            ping_interval=None,
        )
        task = asyncio.ensure_future(runtime.run())
        try:
            await asyncio.wait_for(runtime.attached.wait(), 5)
            chunk = "A" * (1 << 20)
            for _ in range(64):  # audio a backend streams: fills the socket's buffers, then the flush waits
                runtime.send_event({"type": "input_audio_buffer.append", "audio": chunk})
                await asyncio.sleep(0.01)
            assert runtime._outbox, "the peer read it all: nothing stalled"
            loop = asyncio.get_running_loop()
            started = loop.time()
            runtime.abandon("shutdown")
            reason = await asyncio.wait_for(task, runtime.end_bound())
            took = loop.time() - started
        finally:
            stop.set()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    assert (reason, verbs) == ("shutdown", ["hangup"])
    assert took < 2 * _CLOSE_TIMEOUT + 1, f"the end took {took:.2f} s"


async def test_a_hook_that_ignores_its_cancellation_is_left_behind(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hook still running at the call's end is cancelled; one that carries on all the same (it retries
    on any error) is left behind a second later: the call still ends."""
    monkeypatch.setattr("sideband.runtime.driver.HOOK_GRACE", 0.2)
    release = asyncio.Event()
    cancels: list[int] = []

    async def stubborn(ctx: CallContext, digit: str) -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancels.append(1)

    stack.app.on_dtmf(stubborn)
    try:
        with capture_logs() as logs:
            call = await stack.call(Script([HELLO, caller_presses("1"), caller_hangs_up()]))
            summary = await stack.ended(call, timeout=5)
    finally:
        release.set()
    assert summary.reason == "remote_closed" and cancels == [1]
    assert [e["hook"] for e in logs if e["event"] == "hook.abandoned"] == ["stubborn"]


async def test_an_end_hook_that_ignores_its_cancellation_is_left_behind(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sideband.runtime.driver.END_HOOK_TIMEOUT", 0.3)
    release = asyncio.Event()
    after: list[str] = []

    async def stubborn(ctx: CallContext, summary: CallSummary) -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    stack.app.on_call_end(stubborn)
    stack.app.on_call_end(lambda ctx, summary: after.append(summary.reason))
    try:
        with capture_logs() as logs:
            call = await stack.call(Script([HELLO, caller_hangs_up()]))
            summary = await stack.ended(call, timeout=5)
    finally:
        release.set()
    assert summary.reason == "remote_closed" and after == ["remote_closed"]  # the next end hook ran
    events = [(e["event"], e.get("hook")) for e in logs if e["event"].startswith("hook.")]
    assert events == [("hook.cancelled", "stubborn"), ("hook.abandoned", "stubborn")], events


async def test_a_cancellation_a_hook_turns_into_an_error_stops_the_hooks_after_it(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hooks of one event run one after the other in one task; cancelled at the call's end while the
    first turns its cancellation into an error (a library's timer), the next one does not start."""
    monkeypatch.setattr("sideband.runtime.driver.HOOK_GRACE", 0.2)
    ran: list[str] = []

    async def crm(ctx: CallContext, digit: str) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise TimeoutError("crm request timed out") from None

    async def audit(ctx: CallContext, digit: str) -> None:
        ran.append("audit")

    stack.app.on_dtmf(crm)
    stack.app.on_dtmf(audit)
    with capture_logs() as logs:
        call = await stack.call(Script([HELLO, caller_presses("1"), caller_hangs_up()]))
        await stack.ended(call, timeout=5)
    assert ran == []
    assert [(e["event"], e.get("hook")) for e in logs if e["event"] == "hook.failed"] == [
        ("hook.failed", "crm")
    ]


async def test_a_create_that_crossed_a_response_is_no_alert_other_server_errors_are(
    simulator: Simulator,
) -> None:
    rt = runtime(Connector(simulator, "rtc_x", []), [])

    def error(code: str) -> bytes:
        return json.dumps(
            {"type": "error", "error": {"type": "invalid_request_error", "code": code}}
        ).encode()

    with capture_logs() as logs:
        rt._handle(error("conversation_already_has_active_response"))  # sent again after that response
        rt._handle(error("invalid_value"))
    assert [(e["code"], e["log_level"]) for e in logs if e["event"] == "sideband.error"] == [
        ("conversation_already_has_active_response", "info"),
        ("invalid_value", "warning"),
    ]


# -- hooks: their own threads, the call's time, what on_tool sees --------------------------------------


async def test_on_tool_sees_the_tools_the_calls_end_cancelled(stack: Stack) -> None:
    started = asyncio.Event()
    seen: list[tuple[str, str]] = []

    @stack.app.tool(filler_after=None)
    async def long_job() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    @stack.app.on_tool
    def audit(ctx: CallContext, record: Any) -> None:
        seen.append((record.name, record.outcome))

    call = await stack.call(Script([HELLO, caller_says("go"), model_calls("long_job", {})], step_timeout=10))
    await asyncio.wait_for(started.wait(), 5)
    await stack.sim.hang_up(call)
    summary = await stack.ended(call, check_script=False)
    assert [(t.name, t.outcome) for t in summary.tools] == [("long_job", "cancelled")]
    assert seen == [("long_job", "cancelled")]


async def test_the_calls_duration_leaves_out_the_teardown(stack: Stack) -> None:
    @stack.app.on_transcript
    async def slow(ctx: CallContext, role: str, text: str) -> None:
        await asyncio.Event().wait()  # cancelled only once the end's grace for hooks (2 s) is over

    loop = asyncio.get_running_loop()
    began = loop.time()
    call = await stack.call(Script([HELLO, caller_says("hi"), model_says("Hello there."), caller_hangs_up()]))
    await call.wait_done(timeout=10)
    hung_up = loop.time() - began
    summary = await stack.ended(call, timeout=15)
    assert summary.duration < hung_up + 0.5 < HOOK_GRACE + 0.5


async def test_sync_hooks_stuck_in_their_threads_leave_the_tools_threads_alone(stack: Stack) -> None:
    release = threading.Event()
    stack.app.tools._executor = concurrent.futures.ThreadPoolExecutor(1)  # (one thread: any taken shows)

    @stack.app.on_transcript
    def store(ctx: CallContext, role: str, text: str) -> None:
        release.wait(30)  # a write to a database that hangs

    @stack.app.tool(timeout=2.0, filler_after=None)
    def quick_sync() -> str:
        """Quick."""
        return "ok"

    try:
        first = await stack.call(Script([HELLO, caller_hangs_up()]))
        await stack.ended(first, timeout=15)  # its hook is left behind, stuck in its thread
        call = await stack.call(
            Script(
                [
                    HELLO,
                    caller_says("go"),
                    model_calls("quick_sync", {}),
                    model_says("done"),
                    caller_hangs_up(),
                ]
            )
        )
        summary = await stack.ended(call, timeout=15)
        assert [(t.name, t.outcome) for t in summary.tools] == [("quick_sync", "ok")]
    finally:
        release.set()
        stack.app.tools.executor.shutdown(wait=False)


async def test_a_sync_hook_that_runs_long_is_logged_as_slow(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sideband.runtime.driver.HOOK_SLOW", 0.2)
    loop = asyncio.get_running_loop()
    release, keyed, slow_seen = threading.Event(), asyncio.Event(), asyncio.Event()
    keys: list[str] = []

    @stack.app.on_transcript
    def store(ctx: CallContext, role: str, text: str) -> None:
        release.wait(20)

    @stack.app.on_dtmf
    def keypad(ctx: CallContext, digit: str) -> None:
        keys.append(digit)
        loop.call_soon_threadsafe(keyed.set)

    with capture_logs() as logs:
        processors = structlog.get_config()["processors"]
        capture = processors[0]

        def watch(logger: Any, name: str, event: MutableMapping[str, Any]) -> Any:
            if event["event"] == "hook.slow":
                slow_seen.set()
            return capture(logger, name, event)

        processors[0] = watch
        call = await stack.call(Script([HELLO, caller_presses("1"), pause(30)]))
        try:
            await asyncio.wait_for(slow_seen.wait(), 5)
            slow = next(e for e in logs if e["event"] == "hook.slow")
            assert (
                slow["hook"].endswith("store") and slow["running_s"] >= 0.2 and slow["log_level"] == "warning"
            )
            assert keys == []  # waiting behind it: the call's sync hooks run one at a time, in order
            release.set()
            await asyncio.wait_for(keyed.wait(), 5)
            assert keys == ["1"]
        finally:
            release.set()
            await stack.sim.hang_up(call)
            await stack.ended(call, check_script=False)


async def test_a_sideband_lost_while_our_hangup_is_out_is_not_attached_again(stack: Stack) -> None:
    """The service drops the sideband as it carries out our hangup, whose answer is held (the hangup
    is retried, and finds the call gone): the call ends on that answer, and no handshake goes out for a
    call being hung up."""
    stack.sim.verb_close = "abnormal"
    call = _hanging_up_call(stack)
    stack.sim.fail_verb(call.call_id, "hangup", "late")
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        summary = await stack.ended(call)
    assert summary.reason == "hangup"
    handshakes = [r for r in stack.sim.requests if r.path == "/v1/realtime"]
    assert len(handshakes) == 1
    assert not [e for e in logs if e["event"] in ("sideband.reattached", "sideband.refused")]
