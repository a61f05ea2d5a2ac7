"""No path of a call leaves reference cycles behind.

``sideband serve`` runs the collector's middle generation rarely (``gc.set_threshold(700, 50, 10)`` after
``gc.freeze()``), on the claim that a call leaves no reference cycles: everything it allocates is freed by
reference counting. Each path of a call (a tool that answers or fails, our own end of the call, lost
sockets, refused accepts, routing decisions, the WebRTC doors, hooks, trusted-server sessions on a
vowel engine) is checked here: one call of the scenario warms up (imports, caches, pools), then three
calls run with ``gc.DEBUG_SAVEALL`` and a collection must find nothing. A failure names the garbage's
types and the frames among it: the frame a kept exception's traceback holds is usually what closes the
cycle. The simulator (OpenAI's stand-in) runs in this process too, so what it leaves behind counts as
well.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import gc
import json
import socket
import threading
import time
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from websockets.exceptions import InvalidHandshake

from sideband import CallContext, CallSummary, IncomingCall, Reject, Sideband, ToolError, service
from sideband.runtime import driver
from sideband.runtime.driver import CallRuntime
from sideband.runtime.machine import CallMachine
from sideband.settings import Settings, load_settings
from sideband.testing import (
    Script,
    SimCall,
    caller_hangs_up,
    caller_presses,
    caller_says,
    model_calls,
    model_says,
    pause,
    wait_for_greeting,
)
from sideband.testing.vowel import VowelSimulator, when
from sideband.upstream._ws import _open_connect, open_socket
from sideband.upstream.openai import connect_sideband
from sideband.vowel import EngineError, EngineSession

from .conftest import Stack, make_app

HELLO = wait_for_greeting("Hello.")
OFFER = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
WAIT = 5.0  # seconds any one wait may take (a scenario takes well under a second)

OneCall = Callable[[int], Awaitable[None]]
STUCK_DONE = threading.Event()  # set when the thread of the ``stuck`` tool is done


def cycle_app() -> Sideband:
    """The conftest app plus tools for the paths under test."""
    app = make_app()

    @app.tool(timeout=0.2, filler_after=None)
    async def sleepy() -> str:
        """Sleeps past its timeout."""
        await asyncio.sleep(5)
        return "late"

    @app.tool
    def add(a: int, b: int) -> int:
        """A sync tool that works."""
        return a + b

    @app.tool
    def sync_transfer(ctx: CallContext) -> str:
        """A sync tool whose action (from its thread) is refused: a transfer outside the allow-list."""
        ctx.transfer("nowhere")
        return "never"

    @app.tool
    def sync_update(ctx: CallContext) -> str:
        """A sync tool whose action hops to the loop and raises there (a typo of a session field)."""
        ctx.update_session(vocie="cedar")
        return "never"

    @app.tool
    async def opaque() -> object:
        """Returns what JSON cannot carry."""
        return object()

    @app.tool(timeout=0.3, filler_after=None)  # (time for a worker thread to pick it up on a busy machine)
    def stuck() -> str:
        """A sync tool that overruns its timeout (its thread runs on, then ends)."""
        time.sleep(0.5)
        STUCK_DONE.set()
        return "late"

    @app.tool(filler_after=None)
    async def goodbye(ctx: CallContext) -> str:
        """Hangs up through the context."""
        await ctx.hangup()
        return "bye"

    return app


@pytest.fixture
def app() -> Sideband:
    return cycle_app()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """One client session for the whole test (opened before the warm-up call)."""
    async with aiohttp.ClientSession() as session:
        yield session


async def assert_no_cycles(one_call: OneCall, calls: int = 3) -> None:
    """Warm up with one call, then run ``calls`` more with ``gc.DEBUG_SAVEALL``: a collection must find
    nothing unreachable (what it finds is kept in ``gc.garbage`` and reported by type)."""
    await one_call(0)  # imports, caches and pools are paid for
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for n in range(1, calls + 1):
            await one_call(n)
        gc.collect()
        garbage = collections.Counter(type(o).__qualname__ for o in gc.garbage)
        frames = collections.Counter(_where(o) for o in gc.garbage if type(o) is types.FrameType)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not garbage, (
        f"reference cycles left behind by {calls} calls: {garbage.most_common(10)}; "
        f"frames among them: {frames.most_common(12)}"
    )


def _where(frame: types.FrameType) -> str:
    code = frame.f_code
    return f"{code.co_qualname} ({code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno})"


async def start(stack: Stack, script: Script, **kw: Any) -> SimCall:
    """Place a SIP call running ``script``; its webhook must be answered 200."""
    call = stack.sim.create_call(script, **kw)
    result = await stack.sender.deliver(stack.sim.incoming_event(call))
    assert result.status == 200, result
    return call


async def finish(stack: Stack, call: SimCall) -> CallSummary:
    """Wait until the call has ended on both sides and the server holds no live call (a call our side
    gave up on while the simulator still holds it up, say after a REFER answered 404, is hung up there).
    Its script is a stand-in (a pause the call is ended in, mostly): it is not checked."""
    summary = await stack.ended(call, timeout=WAIT, check_script=False)
    await stack.wait_idle(WAIT)
    if not call.ended:
        await stack.sim.hang_up(call)
    await call.wait_ended(timeout=WAIT)
    return summary


async def injected(
    stack: Stack, name: str, arguments: dict[str, Any] | str, *, undeclared: bool = False
) -> Any:
    """One call: the model calls ``name(arguments)`` (a tool the app does not have, with ``undeclared``),
    the output comes back, the caller hangs up."""
    call = await start(stack, Script([pause(30)]))
    await call.wait_received("session.update", timeout=WAIT)
    pending = await call.inject_function_call(name, arguments, undeclared=undeclared)
    output = json.loads(await pending.wait_output(WAIT))
    await stack.sim.hang_up(call)
    await finish(stack, call)
    return output


# -- tools ------------------------------------------------------------------------------------------------

TOOL_PATHS = [
    pytest.param("lookup_order", {"order_id": "7"}, None, id="tool_answers"),
    pytest.param("broken", {}, "tool_failed", id="tool_raises"),
    pytest.param("sleepy", {}, "timeout", id="tool_times_out"),
    pytest.param("add", {"a": 1, "b": 2}, None, id="sync_tool"),
    pytest.param("refuse", {"reason": "policy"}, "tool_failed", id="sync_tool_raises_tool_error"),
    pytest.param("sync_transfer", {}, "tool_failed", id="sync_tool_action_refused"),
    pytest.param("sync_update", {}, "tool_failed", id="sync_tool_action_raises_on_the_loop"),
    pytest.param(
        "transfer_call", {"destination": "sip:x@example.com"}, "invalid_arguments", id="bad_literal"
    ),
    pytest.param("lookup_order", {}, "invalid_arguments", id="arguments_missing"),
    pytest.param("lookup_order", '{"order_id": ', "invalid_arguments", id="arguments_not_json"),
    pytest.param("nope", {}, "unknown_tool", id="unknown_tool"),
    pytest.param("opaque", {}, "output_unencodable", id="output_unencodable"),
]


ANSWERS: dict[str, Any] = {"lookup_order": {"order_id": "7", "status": "shipped"}, "add": 3}


@pytest.mark.parametrize(("name", "arguments", "error"), TOOL_PATHS)
async def test_a_tool_path_leaves_no_cycles(
    stack: Stack, name: str, arguments: dict[str, Any] | str, error: str | None
) -> None:
    async def one_call(n: int) -> None:
        output = await injected(stack, name, arguments, undeclared=error == "unknown_tool")
        assert output.get("error") == error if error else output == ANSWERS[name], output

    await assert_no_cycles(one_call)


async def test_a_sync_tool_past_its_timeout_leaves_no_cycles(stack: Stack) -> None:
    async def one_call(n: int) -> None:
        STUCK_DONE.clear()
        output = await injected(stack, "stuck", {})
        assert output["error"] == "timeout", output
        assert await asyncio.to_thread(STUCK_DONE.wait, WAIT)  # its thread is done, its result dropped
        await asyncio.sleep(0)  # (the loop gets the thread's result)

    await assert_no_cycles(one_call)


@pytest.mark.parametrize("status", ["cancelled", "failed"])
async def test_a_tool_call_of_a_response_that_did_not_complete_leaves_no_cycles(
    stack: Stack, status: Any
) -> None:
    async def one_call(n: int) -> None:
        script = Script(
            [
                HELLO,
                caller_says("Cancel order 5. No, wait!"),
                model_calls("lookup_order", {"order_id": str(n)}, status=status),
                caller_says("Never mind."),
                model_says("Okay."),
                caller_hangs_up(),
            ]
        )
        call = await start(stack, script)
        await call.wait_done(timeout=WAIT)
        summary = await finish(stack, call)
        assert not summary.tools, summary

    await assert_no_cycles(one_call)


# -- our side ends the call -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "arguments", "reason"),
    [
        pytest.param("end_call", {}, "end_call_tool", id="end_call_tool"),
        pytest.param("goodbye", {}, "hangup", id="ctx_hangup"),
        pytest.param("transfer_call", {"destination": "human"}, "transferred", id="transfer"),
    ],
)
async def test_a_call_our_side_ends_leaves_no_cycles(
    stack: Stack, tool: str, arguments: dict[str, Any], reason: str
) -> None:
    async def one_call(n: int) -> None:
        script = Script([HELLO, caller_says("That's all."), model_calls(tool, arguments), model_says("Bye!")])
        call = await start(stack, script)
        summary = await finish(stack, call)
        assert summary.reason == reason, summary

    await assert_no_cycles(one_call)


@pytest.mark.parametrize(
    ("verb", "fault", "reason"),
    [
        pytest.param("refer", 400, "transfer_failed", id="refer_refused"),
        pytest.param("refer", 404, "call_not_found", id="refer_call_gone"),
        pytest.param("hangup", 500, "end_call_tool", id="hangup_retried"),
    ],
)
async def test_a_verb_that_fails_leaves_no_cycles(stack: Stack, verb: Any, fault: int, reason: str) -> None:
    tool, arguments = ("transfer_call", {"destination": "human"}) if verb == "refer" else ("end_call", {})

    async def one_call(n: int) -> None:
        script = Script([HELLO, caller_says("Bye."), model_calls(tool, arguments), model_says("Bye!")])
        call = stack.sim.create_call(script)
        stack.sim.fail_verb(call.call_id, verb, fault)
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        summary = await finish(stack, call)
        assert summary.reason == reason, summary

    await assert_no_cycles(one_call)


@pytest.mark.parametrize(
    ("settings_overrides", "reason"),
    [
        pytest.param({"max_call_duration": 0.2}, "max_duration", id="max_duration"),
        pytest.param({"max_idle_duration": 0.2}, "idle_timeout", id="idle_limit"),
    ],
)
async def test_a_call_ended_by_a_limit_leaves_no_cycles(
    stack: Stack, settings_overrides: dict[str, Any], reason: str
) -> None:
    async def one_call(n: int) -> None:
        call = await start(stack, Script([HELLO, pause(5)]))
        summary = await finish(stack, call)
        assert summary.reason == reason, summary

    await assert_no_cycles(one_call)


# -- the caller's side and the sideband -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        pytest.param("clean", "remote_closed", id="clean"),
        pytest.param("abnormal", "call_not_found", id="abnormal_then_reattach_404"),
    ],
)
async def test_a_caller_hangup_leaves_no_cycles(stack: Stack, mode: Any, reason: str) -> None:
    async def one_call(n: int) -> None:
        call = await start(
            stack, Script([HELLO, caller_says("Hi."), model_says("Hello."), caller_hangs_up(mode)])
        )
        summary = await finish(stack, call)
        assert summary.reason == reason, summary

    await assert_no_cycles(one_call)


async def test_an_expired_session_leaves_no_cycles(stack: Stack) -> None:
    async def one_call(n: int) -> None:
        call = await start(stack, Script([pause(30)]))
        await call.wait_received("session.update", timeout=WAIT)
        await stack.sim.expire(call)
        summary = await finish(stack, call)
        assert summary.reason == "session_expired", summary

    await assert_no_cycles(one_call)


async def test_a_lost_sideband_reattached_leaves_no_cycles(stack: Stack) -> None:
    async def one_call(n: int) -> None:
        call = await start(stack, Script([pause(30)]))
        await call.wait_received("session.update", timeout=WAIT)
        await stack.sim.drop_sideband(call, "abnormal")
        await call.wait_connected(2, timeout=WAIT)
        pending = await call.inject_function_call("lookup_order", {"order_id": str(n)})
        assert json.loads(await pending.wait_output(WAIT))["status"] == "shipped"
        await stack.sim.hang_up(call)
        await finish(stack, call)

    await assert_no_cycles(one_call)


async def test_a_sideband_lost_while_a_tool_runs_leaves_no_cycles(stack: Stack) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    @stack.app.tool(filler_after=None)
    async def slow() -> str:
        started.set()
        await asyncio.wait_for(release.wait(), WAIT)
        return "after the blip"

    async def one_call(n: int) -> None:
        started.clear()
        release.clear()
        call = await start(stack, Script([pause(30)]))
        await call.wait_received("session.update", timeout=WAIT)
        pending = await call.inject_function_call("slow", {})
        await asyncio.wait_for(started.wait(), WAIT)
        await stack.sim.drop_sideband(call, "abnormal")
        await call.wait_connected(2, timeout=WAIT)
        release.set()
        assert await pending.wait_output(WAIT) == "after the blip"
        await stack.sim.hang_up(call)
        await finish(stack, call)

    await assert_no_cycles(one_call)


async def test_a_sideband_that_cannot_be_reached_leaves_no_cycles(stack: Stack) -> None:
    with socket.socket() as probe:  # an address nothing listens on
        probe.bind(("127.0.0.1", 0))
        stack.service._sideband_url = f"ws://127.0.0.1:{probe.getsockname()[1]}/v1/realtime"

    async def one_call(n: int) -> None:
        call = await start(stack, Script([]))
        summary = await finish(stack, call)
        assert summary.reason == "connect_failed", summary

    await assert_no_cycles(one_call)


async def test_a_sideband_handshake_that_times_out_leaves_no_cycles(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sideband's handshake gets no answer: each attempt times out in the call driver (its error,
    raised from an ``asyncio.timeout`` that holds the attempt's task, is no part of that task)."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # never answers the upgrade
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    stack.service._sideband_url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/realtime"
    monkeypatch.setattr(service, "connect_sideband", functools.partial(connect_sideband, open_timeout=0.1))

    async def one_call(n: int) -> None:
        call = await start(stack, Script([]))
        summary = await finish(stack, call)
        assert summary.reason == "connect_failed", summary

    try:
        await assert_no_cycles(one_call)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_silent_sideband_found_by_the_keepalive_leaves_no_cycles(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    defaults = CallRuntime.__init__.__kwdefaults__
    assert defaults is not None
    monkeypatch.setitem(defaults, "ping_interval", 0.1)

    async def one_call(n: int) -> None:
        call = await start(stack, Script([pause(30)]))
        await call.wait_received("session.update", timeout=WAIT)
        await stack.sim.drop_sideband(call, "unreachable")
        await call.wait_connected(2, timeout=WAIT)
        await stack.sim.hang_up(call)
        await finish(stack, call)

    await assert_no_cycles(one_call)


async def test_a_call_hung_up_while_a_tool_runs_leaves_no_cycles(stack: Stack) -> None:
    started = asyncio.Event()

    @stack.app.tool(filler_after=None)
    async def forever() -> str:
        started.set()
        await asyncio.sleep(30)
        return "never"

    async def one_call(n: int) -> None:
        started.clear()
        call = await start(stack, Script([pause(30)]))
        await call.wait_received("session.update", timeout=WAIT)
        await call.inject_function_call("forever", {})
        await asyncio.wait_for(started.wait(), WAIT)
        await stack.sim.hang_up(call)
        summary = await finish(stack, call)
        assert [t.outcome for t in summary.tools] == ["cancelled"], summary

    await assert_no_cycles(one_call)


async def test_a_call_that_crashes_leaves_no_cycles(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug of ours while handling an event (``call.crashed``): the call is hung up all the same."""
    receive = CallMachine.receive

    def crash_on_session_updated(machine: CallMachine, event: dict[str, Any]) -> Any:
        if event.get("type") == "session.updated":
            raise RuntimeError("a bug in the machine")
        return receive(machine, event)

    monkeypatch.setattr(CallMachine, "receive", crash_on_session_updated)

    async def one_call(n: int) -> None:
        call = await start(stack, Script([pause(30)]))
        summary = await finish(stack, call)
        assert summary.reason == "internal_error", summary

    await assert_no_cycles(one_call)


# -- the answer path --------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{"accept_attempt_timeout": 0.2}])
@pytest.mark.parametrize("fault", [500, "timeout"])
async def test_an_accept_retried_leaves_no_cycles(
    stack: Stack, fault: Any, settings_overrides: dict[str, Any]
) -> None:
    async def one_call(n: int) -> None:
        call = stack.sim.create_call(Script([HELLO, caller_hangs_up()]))
        stack.sim.fail_accept(call.call_id, fault)
        result = await stack.sender.deliver(stack.sim.incoming_event(call))
        assert result.status == 200 and result.attempts == [200], result
        await finish(stack, call)

    await assert_no_cycles(one_call)


async def test_an_accept_answered_404_leaves_no_cycles(stack: Stack) -> None:
    async def one_call(n: int) -> None:
        call = stack.sim.create_call(Script([]))
        stack.sim.fail_accept(call.call_id, 404)
        result = await stack.sender.deliver(stack.sim.incoming_event(call))
        assert result.status == 200 and json.loads(result.bodies[0] or b"")["status"] == "call_gone"
        await stack.wait_idle(WAIT)

    await assert_no_cycles(one_call)


async def test_a_duplicate_webhook_leaves_no_cycles(stack: Stack) -> None:
    async def one_call(n: int) -> None:
        call = stack.sim.create_call(Script([HELLO, caller_hangs_up()]))
        event = stack.sim.incoming_event(call)
        first = await stack.sender.deliver(event, webhook_id=f"wh_dup_{n}")
        again = await stack.sender.deliver(event, webhook_id=f"wh_dup_{n}")
        other = await stack.sender.deliver(event)  # another delivery of the same call
        for result in (again, other):
            assert json.loads(result.bodies[-1] or b"")["status"] == "duplicate", result
        assert first.status == 200
        await finish(stack, call)

    await assert_no_cycles(one_call)


async def test_a_call_routing_rejects_leaves_no_cycles(stack: Stack) -> None:
    @stack.app.on_incoming
    async def route(call: IncomingCall) -> Reject:
        return Reject(status_code=486)

    async def one_call(n: int) -> None:
        call = await start(stack, Script([]))
        assert call.status == "rejected" and call.reject_body == {"status_code": 486}

    await assert_no_cycles(one_call)


@pytest.mark.parametrize("sync", [False, True], ids=["async_hook", "sync_hook"])
async def test_a_routing_hook_that_raises_leaves_no_cycles(stack: Stack, sync: bool) -> None:
    def route(call: IncomingCall) -> Reject:
        raise RuntimeError("routing table unavailable")

    async def route_async(call: IncomingCall) -> Reject:
        raise RuntimeError("routing table unavailable")

    stack.app.on_incoming(route if sync else route_async)

    async def one_call(n: int) -> None:
        call = await start(stack, Script([]))
        assert call.status == "rejected", call

    await assert_no_cycles(one_call)


@pytest.mark.parametrize("settings_overrides", [{"route_budget": 0.1}])
async def test_a_routing_hook_past_its_budget_leaves_no_cycles(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    @stack.app.on_incoming
    async def route(call: IncomingCall) -> Reject:
        await asyncio.sleep(5)
        return Reject(status_code=486)

    async def one_call(n: int) -> None:
        call = await start(stack, Script([]))
        assert call.status == "rejected" and call.reject_body == {"status_code": 480}, call.reject_body

    await assert_no_cycles(one_call)


# -- the WebRTC doors -------------------------------------------------------------------------------------


async def test_a_webrtc_call_through_the_sdp_relay_leaves_no_cycles(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    stack.sim.next_webrtc_script = Script(
        [
            caller_says("Order 7?"),
            model_calls("lookup_order", {"order_id": "7"}),
            model_says("Shipped."),
            caller_hangs_up(),
        ]
    )

    async def one_call(n: int) -> None:
        async with http.post(
            stack.url("/rtc/calls"), data=OFFER, headers={"content-type": "application/sdp"}
        ) as resp:
            assert resp.status == 201, await resp.text()
            call = stack.sim.calls[resp.headers["Location"].rsplit("/", 1)[-1]]
        await call.wait_done(timeout=WAIT)
        summary = await finish(stack, call)
        assert [t.outcome for t in summary.tools] == ["ok"], summary

    await assert_no_cycles(one_call)


async def test_a_browser_first_handoff_leaves_no_cycles(stack: Stack, http: aiohttp.ClientSession) -> None:
    async def one_call(n: int) -> None:
        async with http.post(stack.url("/rtc/sessions"), json={}) as resp:
            assert resp.status == 200
            ticket = (await resp.json())["ticket"]
        call = stack.sim.create_webrtc_call(
            Script([caller_says("Hi."), model_says("Hello."), caller_hangs_up()])
        )
        async with http.post(
            stack.url("/rtc/handoff"), json={"call_id": call.call_id, "ticket": ticket}
        ) as resp:
            assert resp.status == 200, await resp.text()
        await call.wait_done(timeout=WAIT)
        await finish(stack, call)

    await assert_no_cycles(one_call)


async def test_a_refused_handoff_leaves_no_cycles(stack: Stack, http: aiohttp.ClientSession) -> None:
    async def one_call(n: int) -> None:
        async with http.post(stack.url("/rtc/sessions"), json={}) as resp:
            ticket = (await resp.json())["ticket"]
        body = {"call_id": f"rtc_{uuid.uuid4().hex}", "ticket": ticket}  # (a call id is claimed once)
        async with http.post(stack.url("/rtc/handoff"), json=body) as resp:
            assert resp.status == 404

    await assert_no_cycles(one_call)


async def test_a_door_request_with_a_content_type_never_seen_leaves_no_cycles(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """A browser (anyone, at the doors) chooses the Content-Type's parameters."""

    async def one_call(n: int) -> None:
        headers = {"content-type": f"application/json; x={uuid.uuid4().hex}"}
        async with http.post(stack.url("/rtc/sessions"), data="{}", headers=headers) as resp:
            assert resp.status == 200, await resp.text()

    await assert_no_cycles(one_call)


# -- hooks ------------------------------------------------------------------------------------------------


async def test_dtmf_and_transcript_hooks_leave_no_cycles(stack: Stack) -> None:
    seen: list[str] = []
    stack.app.on_dtmf(lambda ctx, digit: seen.append(digit))
    stack.app.on_transcript(lambda ctx, role, text: seen.append(role))

    async def on_transcript(ctx: CallContext, role: str, text: str) -> None:
        seen.append(text)

    stack.app.on_transcript(on_transcript)

    async def one_call(n: int) -> None:
        seen.clear()
        script = Script(
            [
                HELLO,
                caller_presses("12#"),
                caller_says("Order 12."),
                model_says("Shipped."),
                caller_hangs_up(),
            ]
        )
        call = await start(stack, script)
        await call.wait_done(timeout=WAIT)
        await finish(stack, call)
        assert {"1", "2", "#", "caller", "agent"} <= set(seen), seen

    await assert_no_cycles(one_call)


@pytest.mark.parametrize("sync", [False, True], ids=["async_hooks", "sync_hooks"])
async def test_hooks_that_raise_leave_no_cycles(stack: Stack, sync: bool) -> None:
    ran: list[str] = []

    def failing(*args: Any) -> None:
        ran.append("hook")
        raise ToolError("a hook's bug")

    async def failing_async(*args: Any) -> None:
        ran.append("hook")
        raise ToolError("a hook's bug")

    hook = failing if sync else failing_async
    for register in (stack.app.on_call_start, stack.app.on_dtmf, stack.app.on_transcript, stack.app.on_tool):
        register(hook)
    stack.app.on_call_end(hook)

    async def one_call(n: int) -> None:
        ran.clear()
        script = Script(
            [
                HELLO,
                caller_presses("1"),
                caller_says("Order 1."),
                model_calls("lookup_order", {"order_id": "1"}),
                model_says("Shipped."),
                caller_hangs_up(),
            ]
        )
        call = await start(stack, script)
        await call.wait_done(timeout=WAIT)
        await finish(stack, call)
        assert len(ran) >= 5, ran

    await assert_no_cycles(one_call)


async def test_hooks_cut_off_by_the_end_of_the_call_leave_no_cycles(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hook still running when the call ends is cancelled after its grace; an ``on_call_end`` hook
    after its limit (both shortened here)."""
    monkeypatch.setattr(driver, "HOOK_GRACE", 0.05)
    monkeypatch.setattr(driver, "END_HOOK_TIMEOUT", 0.05)
    cancelled: list[str] = []

    async def slow(*args: Any) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append("hook")
            raise

    stack.app.on_call_start(slow)
    stack.app.on_call_end(slow)

    async def one_call(n: int) -> None:
        cancelled.clear()
        call = await start(stack, Script([HELLO, caller_hangs_up()]))
        await finish(stack, call)
        assert cancelled == ["hook", "hook"], cancelled

    await assert_no_cycles(one_call)


# -- trusted-server sessions on a vowel engine ---------------------------------------------------------


def _vowel_settings(vowel: VowelSimulator) -> Settings:
    return load_settings({**vowel.settings_values(), "max_idle_duration": 30.0}, environ={})


VOWEL_TURNS = [
    when(
        "order",
        calls=[("lookup_order", {"order_id": "7"})],
        preamble="Let me check.",
        reply=lambda outputs: f"Order 7: {json.loads(outputs['lookup_order'])['status']}.",
    ),
    when("fail", calls=[("broken", {}), ("nope", {}), ("lookup_order", "{not json")], reply="Sorry."),
    when("boom", fatal=True),
]


@pytest.mark.parametrize("turn", ["order", "fail", "boom", "dropped"])
async def test_an_engine_session_leaves_no_cycles(vowel: VowelSimulator, turn: str) -> None:
    app = make_app()
    vowel.script(VOWEL_TURNS)

    async def one_call(n: int) -> None:
        async with EngineSession.open(_vowel_settings(vowel), app) as session:
            if turn == "dropped":
                await vowel.drop(vowel.sessions[-1])  # no close frame: an abnormal close
                assert await session.wait_closed(WAIT) == "connection_lost"
            elif turn == "boom":
                with pytest.raises(EngineError) as caught:
                    await session.say("boom")
                assert caught.value.reason == "engine_error"
                del caught  # (the test's own frame would hold the error and its traceback)
            else:
                reply = await session.say(turn)
                assert reply.tools and reply.text, reply
        assert session.end_reason in ("closed", "engine_error", "connection_lost"), session.end_reason

    await assert_no_cycles(one_call)


# -- sideband handshakes that fail ------------------------------------------------------------------------

HANDSHAKE_REPLIES = {
    "silent": None,  # the handshake times out
    "bad_accept": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: nope\r\n\r\n",
    "refused": b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope",
}


@pytest.mark.parametrize("path", ["direct", "connect"])
@pytest.mark.parametrize("reply", list(HANDSHAKE_REPLIES))
async def test_a_failed_sideband_handshake_leaves_no_cycles(reply: str, path: str) -> None:
    """A handshake that times out, gets a bad upgrade or is refused, on a direct connection or through
    websockets' own ``connect()`` (proxies, redirects): websockets keeps the error on the protocol and
    the response, with the parser's frames in its traceback."""
    connections: asyncio.Queue[asyncio.Event] = asyncio.Queue()  # one per connection: set once it is gone

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        gone = asyncio.Event()
        connections.put_nowait(gone)
        await reader.readuntil(b"\r\n\r\n")
        answer = HANDSHAKE_REPLIES[reply]
        if answer is not None:
            writer.write(answer)
        await reader.read()  # until the client has dropped the connection
        writer.close()
        gone.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    opener = open_socket if path == "direct" else functools.partial(_open_connect, tls=None)

    async def one_call(n: int) -> None:
        with pytest.raises((InvalidHandshake, TimeoutError)):
            await opener(url, "sk-test", compression=False, open_timeout=0.2, max_size=1 << 20, proxy=None)
        gone = await asyncio.wait_for(connections.get(), WAIT)
        await asyncio.wait_for(gone.wait(), WAIT)  # the client dropped it: its side is lost too

    try:
        await one_call(0)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for n in range(1, 3):
                await one_call(n)
            gc.collect()
            # (the test's own stream server makes cycles of its own: count websockets' and ours)
            found = collections.Counter(
                _where(o) if type(o) is types.FrameType else type(o).__qualname__
                for o in gc.garbage
                if (type(o) is types.FrameType and _ours(o.f_code.co_filename))
                or _ours(type(o).__module__.replace(".", "/"))
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    finally:
        server.close()
        await server.wait_closed()
    assert not found, f"reference cycles left behind by failed handshakes: {found.most_common(10)}"


def _ours(where: str) -> bool:
    return "websockets" in where or ("sideband" in where and "testing" not in where)
