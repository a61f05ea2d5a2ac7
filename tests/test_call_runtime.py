"""Tools and call control on live (simulated) calls: one test per behaviour, asserting the exact client
events the sideband sends and their order."""

from __future__ import annotations

import asyncio
import decimal
import inspect
import json
import threading
import time
import typing
from collections.abc import Callable
from typing import Any

import pytest

from sideband import (
    Accept,
    CallContext,
    CallSummary,
    SessionConfig,
    SessionConfigError,
    Sideband,
    TranscriptRole,
)
from sideband.runtime.driver import TIMER_MOVED_NOTABLE
from sideband.testing import (
    Script,
    Simulator,
    caller_hangs_up,
    caller_presses,
    caller_says,
    model_answers,
    model_calls,
    model_fails,
    model_says,
    pause,
    run_app,
    wait_for_greeting,
)

from .conftest import Stack, capture_logs, heard_at_verb, make_app, untagged

HELLO = wait_for_greeting("Hello.")


def kinds(call: Any) -> list[str]:
    """Client events in order, with outputs and creates told apart."""
    out = []
    for e in call.received:
        if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output":
            out.append(f"output:{e['item']['call_id']}")
        elif e["type"] == "response.create":
            instructions = (e.get("response") or {}).get("instructions") or ""
            out.append("create:filler" if "still working" in instructions else "create")
        else:
            out.append(e["type"])
    return out


def _decode(output: str) -> Any:
    try:
        return json.loads(output)
    except ValueError:
        return output


def outputs(call: Any) -> dict[str, Any]:
    return {
        e["item"]["call_id"]: _decode(e["item"]["output"])
        for e in call.received
        if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output"
    }


def server_errors(call: Any) -> list[dict[str, Any]]:
    return [e for e in call.sent if e["type"] == "error"]


async def start(stack: Stack, script: Script, **kw: Any) -> Any:
    call = stack.sim.create_call(script, **kw)
    assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    return call


async def ended(stack: Stack, call: Any, *, check_script: bool = True) -> CallSummary:
    return await stack.ended(call, check_script=check_script)


async def test_same_call_id_in_several_events_runs_once(stack: Stack) -> None:
    runs: list[str] = []

    @stack.app.tool
    async def count(ctx: CallContext) -> str:
        runs.append(ctx.call_id)
        return "counted"

    call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("count"),
                model_calls("count", {}, call_id="call_dup"),
                model_says("Counted."),
                model_calls("count", {}, call_id="call_dup"),  # the model repeats an answered call id
                caller_says("again?"),
                model_says("No."),
                caller_hangs_up(),
            ]
        ),
    )
    await call.wait_done(timeout=10)
    summary = await ended(stack, call)
    assert len(runs) == 1 and [t.name for t in summary.tools] == ["count"]
    assert kinds(call).count("output:call_dup") == 1
    assert not server_errors(call)


async def test_cancelled_response_calls_are_not_run(stack: Stack) -> None:
    runs: list[str] = []

    @stack.app.tool
    async def cancel_order(order_id: str) -> str:
        runs.append(order_id)
        return "cancelled"

    call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("cancel 5 — no wait!"),
                model_calls("cancel_order", {"order_id": "5"}, status="cancelled"),
                caller_says("never mind"),
                model_says("Okay."),
                caller_hangs_up(),
            ]
        ),
    )
    await call.wait_done(timeout=10)
    await ended(stack, call)
    assert runs == [] and not outputs(call)


async def test_a_failed_answer_to_the_outputs_is_asked_for_again_once(stack: Stack) -> None:
    script = Script(
        [
            HELLO,
            caller_says("Where is order 42?"),
            model_calls("lookup_order", {"order_id": "42"}, call_id="call_a"),
            model_fails(),  # the response that was to speak the output
            model_says("It shipped."),  # answers the one create sent again
            caller_says("And order 43?"),
            model_calls("lookup_order", {"order_id": "43"}, call_id="call_b"),
            model_fails(),
            model_fails(),  # a second failure in a row: nothing more is asked
            caller_says("Hello?"),
            model_says("Sorry, order 43 shipped too."),
            caller_hangs_up(),
        ]
    )
    with capture_logs() as logs:
        call = await start(stack, script)
        await call.wait_done(timeout=10)
        summary = await ended(stack, call)
    assert call.script_error is None, call.script_error
    assert kinds(call)[1:] == [
        "create",  # the greeting
        "output:call_a",
        "create",
        "create",  # once more, after the failure
        "output:call_b",
        "create",
        "create",
    ]
    failed = [e for e in logs if e["event"] == "response.failed"]
    assert [(e["log_level"], e["retry"], e["error_type"]) for e in failed] == [
        ("warning", True, "server_error"),
        ("warning", True, "server_error"),
        ("warning", False, "server_error"),
    ]
    assert all(e["message"] and e["response_id"] for e in failed)
    assert ("agent", "It shipped.") in summary.transcript
    assert summary.transcript[-1] == ("agent", "Sorry, order 43 shipped too.")


async def test_a_caller_line_that_could_not_be_transcribed_is_a_warning(stack: Stack) -> None:
    script = Script(
        [
            HELLO,
            caller_says("Where is my order?", untranscribed=True),
            model_says("Which order?"),
            caller_says("Forty-two."),
            model_says("It shipped."),
            caller_hangs_up(),
        ]
    )
    with capture_logs() as logs:
        call = await start(stack, script)
        await call.wait_done(timeout=10)
        summary = await ended(stack, call)
    assert call.script_error is None, call.script_error
    failed = [e for e in logs if e["event"] == "transcript.failed"]
    assert [(e["log_level"], e["code"], e["error_type"]) for e in failed] == [
        ("warning", "model_not_found", "invalid_request_error")
    ]
    assert "gpt-4o-mini-transcribe" in failed[0]["message"]  # (the model the session asked for)
    lost = next(e for e in call.sent if e["type"] == "conversation.item.input_audio_transcription.failed")
    assert failed[0]["item_id"] == lost["item_id"]
    assert [text for role, text in summary.transcript if role == "caller"] == ["Forty-two."]


async def test_a_failing_mcp_server_is_a_warning(stack: Stack) -> None:
    call = await start(stack, Script([HELLO, pause(30), caller_hangs_up()]))
    await call.wait_received("session.update")
    with capture_logs() as logs:
        await call._send("mcp_list_tools.failed", item_id="item_tools")
        await call._send("response.mcp_call.failed", item_id="item_mcp", output_index=0)
        stack.sim.hang_up(call)
        await ended(stack, call, check_script=False)
    failed = [(e["log_level"], e["what"], e["item_id"]) for e in logs if e["event"] == "mcp.failed"]
    assert failed == [("warning", "list_tools", "item_tools"), ("warning", "call", "item_mcp")]


async def test_parallel_calls_run_concurrently_one_create_after_all_outputs(stack: Stack) -> None:
    barrier = asyncio.Barrier(3)  # deadlocks unless all three run at once

    @stack.app.tool
    async def part(n: int) -> int:
        async with asyncio.timeout(5):
            await barrier.wait()
        return n

    call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("three things"),
                model_calls([("part", {"n": 1}), ("part", {"n": 2}), ("part", {"n": 3})]),
                model_says("Done."),
                caller_hangs_up(),
            ]
        ),
    )
    await call.wait_done(timeout=10)
    ks = kinds(call)
    outs = [i for i, k in enumerate(ks) if k.startswith("output:")]
    assert len(outs) == 3 and sorted(outputs(call).values()) == [1, 2, 3]
    assert ks[outs[-1] + 1 :].count("create") == 1 and ks[outs[-1] + 1] == "create"
    assert "create" not in ks[outs[0] : outs[-1]]
    assert not server_errors(call)


async def test_slow_and_blocking_tools_never_block_other_calls(stack: Stack) -> None:
    gate = threading.Event()
    released = asyncio.Event()

    @stack.app.tool
    def blocking_report() -> str:
        """A sync tool that blocks its thread until the other call's tool ran."""
        assert gate.wait(5), "the other call never ran: the event loop was blocked"
        return "report"

    @stack.app.tool
    async def quick() -> str:
        gate.set()
        released.set()
        return "quick"

    slow_call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("report"),
                model_calls("blocking_report", {}),
                model_says("Here."),
                caller_hangs_up(),
            ]
        ),
    )
    fast_call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("quick"),
                model_calls("quick", {}),
                model_says("Done."),
                caller_hangs_up(),
            ]
        ),
    )
    await asyncio.wait_for(released.wait(), 5)
    await fast_call.wait_done(timeout=10)
    await slow_call.wait_done(timeout=10)
    assert list(outputs(slow_call).values()) == ["report"] and list(outputs(fast_call).values()) == ["quick"]


async def test_tool_timeout_gives_timeout_output_and_cancels_the_task(stack: Stack) -> None:
    cancelled = asyncio.Event()

    @stack.app.tool(timeout=0.2, filler_after=None)
    async def hang() -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("hang"),
                model_calls("hang", {}),
                model_says("Sorry, that timed out."),
                caller_hangs_up(),
            ]
        ),
    )
    await call.wait_done(timeout=10)
    assert cancelled.is_set()
    (out,) = outputs(call).values()
    assert out["error"] == "timeout"
    summary = await ended(stack, call)
    assert [(t.name, t.outcome) for t in summary.tools] == [("hang", "timeout")]


async def test_filler_is_spoken_while_a_slow_tool_runs(stack: Stack) -> None:
    release = asyncio.Event()

    @stack.app.tool(filler_after=0.05)
    async def slow_lookup() -> str:
        async with asyncio.timeout(5):
            await release.wait()
        return "found"

    call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("look it up"),
                model_calls("slow_lookup", {}, preamble="Let me check."),
                model_says("Still checking…"),  # answers the filler response.create
                model_says("Found it."),  # answers the final response.create
                caller_hangs_up(),
            ]
        ),
    )
    await call.wait_for(lambda c: "create:filler" in kinds(c), timeout=5)
    release.set()
    await call.wait_done(timeout=10)
    ks = kinds(call)
    filler, out = ks.index("create:filler"), ks.index(next(k for k in ks if k.startswith("output:")))
    assert filler < out and ks[out + 1 :] == ["create"]
    assert ks.count("create:filler") == 1
    assert not server_errors(call)  # never a response.create during an active response


def timeline(call: Any) -> list[str]:
    """Both directions in order: the caller's speech, the model's audio, and our creates and outputs."""
    marks = {
        "input_audio_buffer.speech_started": "speech_started",
        "input_audio_buffer.speech_stopped": "speech_stopped",
        "output_audio_buffer.stopped": "audio_stopped",
    }
    out = []
    for way, e in call.timeline:
        if way == "sent" and e["type"] in marks:
            out.append(marks[e["type"]])
        elif way == "received" and e["type"] in ("response.create", "conversation.item.create"):
            instructions = (e.get("response") or {}).get("instructions") or ""
            if e["type"] == "conversation.item.create":
                out.append("output")
            else:
                out.append("create:filler" if "still working" in instructions else "create")
    return out


@pytest.mark.parametrize("server_answers", [True, False])
async def test_the_answer_to_a_tool_waits_for_the_caller_to_stop_speaking(server_answers: bool) -> None:
    app = Sideband(
        session=SessionConfig(turn_detection={"type": "server_vad", "create_response": server_answers})
    )

    @app.tool(filler_after=None)
    async def slow_lookup() -> str:
        """The order's status."""
        # The lookup finishes while the caller is mid-sentence ("hello? are you still there?").
        await call.wait_for(lambda c: bool(c.sent_of_type("input_audio_buffer.speech_started")), 5)
        return "found"

    script = Script(
        [
            HELLO,
            model_calls("slow_lookup", {}, await_outputs=False),
            caller_says("hello? are you still there?", seconds=1.0),
            model_says("Found it: it ships today."),
            caller_hangs_up(),
        ]
    )
    async with run_app(app) as stack:
        call = await stack.call(script)
        await call.wait_done(timeout=10)
        await stack.ended(call)
    assert call.script_error is None
    marks = timeline(call)
    # The output goes in at once. The model speaks it once the caller has finished: in the server's own
    # answer to the caller's turn, or, when the server leaves turns to the controller, when asked.
    heard = ["speech_started", "output", "speech_stopped"]
    answer = ["audio_stopped"] if server_answers else ["create", "audio_stopped"]
    assert marks[marks.index("speech_started") :] == heard + answer
    assert [r.text for r in call.responses][-1] == "Found it: it ships today."
    assert not server_errors(call)


async def test_filler_waits_until_the_preamble_has_been_heard(stack: Stack) -> None:
    stack.sim.playback_rate = 40.0  # the preamble plays for about a second after its response.done
    release = asyncio.Event()

    @stack.app.tool(filler_after=0.05)
    async def slow_lookup() -> str:
        async with asyncio.timeout(5):
            await release.wait()
        return "found"

    call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("where are my orders?"),
                model_calls("slow_lookup", {}, preamble="Let me pull up your account and your last orders."),
                model_says("Still checking…"),  # answers the filler
                model_says("Found them."),
                caller_hangs_up(),
            ]
        ),
    )
    await call.wait_for(lambda c: "create:filler" in timeline(c), timeout=5)
    release.set()
    await call.wait_done(timeout=10)
    marks = timeline(call)
    # Not behind the preamble's words: after them, once the line has been quiet for the filler's wait.
    assert marks.index("create:filler") == marks.index("audio_stopped", marks.index("speech_stopped")) + 1
    assert marks.count("create:filler") == 1
    assert not server_errors(call)


async def test_a_line_the_caller_cut_off_is_marked_in_the_summary(stack: Stack) -> None:
    stack.sim.playback_rate = 20.0  # the answer plays for about three seconds after its response.done
    answer = "Your order shipped on Monday and should reach you by Friday."
    call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("where is my order?"),
                model_says(answer),
                caller_says("Thanks, bye!", cut_in=True),
                caller_hangs_up(),
            ]
        ),
    )
    with capture_logs() as logs:
        await call.wait_done(timeout=10)
        summary = await ended(stack, call)
    assert summary.transcript == [
        ("agent", "Hello."),
        ("caller", "where is my order?"),
        ("agent", answer),
        ("caller", "Thanks, bye!"),
    ]
    assert summary.interrupted == (2,)  # the words are the model's: the caller heard less of them
    cut = [e for e in logs if e["event"] == "agent.interrupted"]
    assert [e["response_id"] for e in cut] == [call.responses[1].response_id]
    # Each caller line names the conversation item it transcribes.
    spoken = [e["item_id"] for e in call.sent_of_type("input_audio_buffer.speech_started")]
    assert [e.get("item_id") for e in logs if e["event"] == "transcript" and e["role"] == "caller"] == spoken


async def test_loop_breaker_stops_identical_calls(stack: Stack) -> None:
    runs: list[int] = []

    @stack.app.tool
    async def poke() -> str:
        runs.append(1)
        return "poked"

    steps: list[Any] = [HELLO, caller_says("poke")]
    for _ in range(4):
        steps.append(model_calls("poke", {}))
    steps += [model_says("I'll stop."), caller_hangs_up()]
    call = await start(stack, Script(steps))
    await call.wait_done(timeout=10)
    results = list(outputs(call).values())
    assert results[:3] == ["poked"] * 3 and results[3]["error"] == "loop_detected"
    assert len(runs) == 3
    summary = await ended(stack, call)  # the refused call is in the record too
    assert [t.outcome for t in summary.tools] == ["ok", "ok", "ok", "loop_breaker"]


async def test_context_actions_say_update_session_and_idempotent_hangup(stack: Stack) -> None:
    @stack.app.tool
    async def wrap_up(ctx: CallContext) -> str:
        ctx.update_session(instructions="Be brief.")
        ctx.say("Mention our summer sale.")
        await ctx.hangup()
        await ctx.hangup()  # idempotent
        ctx.say("Too late.")  # asked for after the hangup: ignored
        return "wrapping up"

    stack.sim.playback_rate = 50.0  # (what the model says takes a moment to hear: 0.1 s for "Okay.")
    call = stack.sim.create_call(
        Script([HELLO, caller_says("bye"), model_calls("wrap_up", {}), model_says("Bye!")])
    )
    heard = heard_at_verb(stack.sim, call)
    try:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        await call.wait_ended(timeout=10)
        heard_at_hangup = await asyncio.wait_for(heard, 10)
    finally:
        heard.cancel()
    assert call.end_reason == "hangup_verb"
    assert sum(1 for r in stack.sim.requests if r.path.endswith("/hangup")) == 1
    updates = [e for e in call.received if e["type"] == "session.update"]
    assert updates[-1]["session"] == {"instructions": "Be brief.", "type": "realtime"}
    # The say asked for before the hangup is said, and so is the model's reply to the tool's output; the
    # hangup waits until both were heard to their end. The say after the hangup is not sent.
    asked = [(r.request or {}).get("instructions") for r in call.responses]
    assert asked.count("Mention our summer sale.") == 1 and "Too late." not in asked
    said = call.responses[asked.index("Mention our summer sale.")]
    reply = call.responses[-1]
    assert reply.text == "Bye!" and said is not reply
    assert said.status == reply.status == "completed"
    assert {said.response_id, reply.response_id} <= set(heard_at_hangup)
    summary = await ended(stack, call)
    assert summary.reason == "hangup"


async def test_a_hangup_left_unawaited_still_ends_the_call(stack: Stack) -> None:
    @stack.app.tool
    async def wrap_up(ctx: CallContext) -> str:
        ctx.hangup()  # (no await: asked for all the same)
        return "wrapping up"

    call = await start(
        stack, Script([HELLO, caller_says("bye"), model_calls("wrap_up", {}), model_says("Bye!")])
    )
    await call.wait_ended(timeout=10)
    assert call.end_reason == "hangup_verb"
    assert (await ended(stack, call)).reason == "hangup"


@pytest.mark.parametrize(
    ("reason", "error"), [(None, TypeError), (123, TypeError), ("", ValueError), ("  ", ValueError)]
)
def test_hangup_refuses_a_reason_that_is_no_text_and_asks_for_nothing(
    reason: object, error: type[Exception]
) -> None:
    asked: list[object] = []

    class Actions:
        def hangup(self, reason: str = "hangup") -> None:
            asked.append(reason)

    ctx = CallContext("sess_1", actions=Actions())  # type: ignore[arg-type]
    with pytest.raises(error, match="hangup reason must"):
        ctx.hangup(reason)  # type: ignore[arg-type]
    assert asked == []
    ctx.hangup("caller_verified")
    assert asked == ["caller_verified"]


@pytest.mark.parametrize("reason", [None, ""])
async def test_a_hangup_with_no_reason_is_the_tools_error_and_the_call_goes_on(
    stack: Stack, reason: str | None
) -> None:
    """``ctx.hangup(None)`` once hung the caller up and left our side of the call open until shutdown,
    and ``ctx.hangup("")`` ended it as ``internal_error``: the tool now fails, and the call goes on."""

    @stack.app.tool
    async def wrap_up(ctx: CallContext) -> str:
        await ctx.hangup(reason)  # type: ignore[arg-type]
        return "wrapping up"

    call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("bye"),
                model_calls("wrap_up", {}, call_id="c1"),
                model_says("Something went wrong."),
                caller_says("still there?"),
                model_says("Yes."),
                caller_hangs_up(),
            ]
        ),
    )
    summary = await ended(stack, call)
    assert call.end_reason != "hangup_verb" and summary.reason == "remote_closed"
    assert not any(r.path.endswith("/hangup") for r in stack.sim.requests)
    assert outputs(call)["c1"]["error"] == "tool_failed"
    assert [(t.name, t.outcome) for t in summary.tools] == [("wrap_up", "error")]


REFUSED_ACTIONS: dict[str, Any] = {
    "say(None)": lambda ctx: ctx.say(None),
    "say(123)": lambda ctx: ctx.say(123),
    "send_text(None)": lambda ctx: ctx.send_text(None),
    "voice=5": lambda ctx: ctx.update_session(voice=5),
    "voice=''": lambda ctx: ctx.update_session(voice=""),
    "instructions=None": lambda ctx: ctx.update_session(instructions=None),
    "speed=10": lambda ctx: ctx.update_session(audio={"output": {"speed": 10}}),
    "speed=0.1": lambda ctx: ctx.update_session(speed=0.1),
    "tool_choice='lookup_order'": lambda ctx: ctx.update_session(tool_choice="lookup_order"),
    "tool_choice=unknown": lambda ctx: ctx.update_session(tool_choice={"type": "function", "name": "nope"}),
    "tool_choice=withdrawn": lambda ctx: ctx.update_session(
        tools=["end_call"], tool_choice={"type": "function", "name": "lookup_order"}
    ),
}


@pytest.mark.parametrize("action", list(REFUSED_ACTIONS))
async def test_an_action_openai_would_refuse_fails_the_tool_and_sends_nothing(
    stack: Stack, action: str
) -> None:
    """An action with a value OpenAI refuses went out, OpenAI answered an error the tool never saw, and the
    caller heard nothing of it: the tool now fails (the model is told), and nothing is sent."""

    @stack.app.tool
    async def act(ctx: CallContext) -> str:
        REFUSED_ACTIONS[action](ctx)
        return "done"

    call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("go"),
                model_calls("act", {}, call_id="c1"),
                model_says("That did not work."),
                caller_hangs_up(),
            ]
        ),
    )
    summary = await ended(stack, call)
    assert outputs(call)["c1"]["error"] == "tool_failed"
    assert [(t.name, t.outcome) for t in summary.tools] == [("act", "error")]
    assert not server_errors(call)
    assert len([e for e in call.received if e["type"] == "session.update"]) == 1  # the call's own config
    assert len(call.responses) == 3  # the greeting, the one calling the tool, the answer to its output


def test_say_and_send_text_refuse_what_is_not_text_and_ask_for_nothing() -> None:
    asked: list[tuple[str, object]] = []

    class Actions:
        def say(self, instructions: str) -> None:
            asked.append(("say", instructions))

        def send_text(self, text: str) -> None:
            asked.append(("send_text", text))

    ctx = CallContext("sess_1", actions=Actions())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^say\(\) takes instructions as a string, not NoneType$"):
        ctx.say(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^send_text\(\) takes text as a string, not int$"):
        ctx.send_text(42)  # type: ignore[arg-type]
    ctx.say("Mention the sale.")
    ctx.send_text("1234")
    assert asked == [("say", "Mention the sale."), ("send_text", "1234")]


async def test_update_session_takes_a_tool_choice_of_the_calls_tools(stack: Stack) -> None:
    @stack.app.tool
    async def focus(ctx: CallContext) -> str:
        ctx.update_session(tool_choice={"type": "function", "name": "lookup_order"})
        ctx.update_session(tool_choice="auto", speed=1.5)
        return "done"

    call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("go"),
                model_calls("focus", {}, call_id="c1"),
                model_says("Ok."),
                caller_hangs_up(),
            ]
        ),
    )
    await ended(stack, call)
    assert outputs(call)["c1"] == "done" and not server_errors(call)
    updates = [e["session"] for e in call.received if e["type"] == "session.update"][1:]
    assert updates == [
        {"type": "realtime", "tool_choice": {"type": "function", "name": "lookup_order"}},
        {"type": "realtime", "tool_choice": "auto", "audio": {"output": {"speed": 1.5}}},
    ]


MCP = {
    "type": "mcp",
    "server_label": "docs",
    "server_url": "https://mcp.example.com",
    "require_approval": "never",
}
CHOICES: list[Any] = [
    "required",
    {"type": "function", "name": "lookup_order"},
    {"type": "mcp", "server_label": "docs"},
]


@pytest.mark.parametrize(
    "offered, sent",
    [
        ("tools=[] before", []),
        ("a call offered none", []),
        ("an MCP server only", [CHOICES[0], CHOICES[2]]),
        ("the app's tools", CHOICES[:2]),
    ],
)
async def test_update_session_refuses_a_tool_choice_forcing_a_tool_the_session_has_not(
    stack: Stack, offered: str, sent: list[Any]
) -> None:
    """A tool choice alone (the tools left as they are) forcing a tool the session does not offer went out:
    with ``"required"`` and no tools, the model could do nothing and the call stalled. It is refused, and
    nothing sent; an MCP server's tools count as tools."""
    refused: list[str] = []

    @stack.app.on_incoming
    def route(call: Any) -> Accept:
        if offered == "a call offered none":
            return Accept(tools=())
        if offered == "an MCP server only":
            return Accept(tools=(), session={"tools": [MCP]})
        return Accept()

    @stack.app.on_call_start
    async def focus(ctx: CallContext) -> None:  # (on the loop: each update goes out as it is made)
        if offered == "tools=[] before":
            ctx.update_session(tools=[])
        for choice in CHOICES:
            try:
                ctx.update_session(tool_choice=choice)
            except SessionConfigError as exc:
                refused.append(str(exc))
            else:
                ctx.update_session(tool_choice="auto")

    call = await start(stack, Script([HELLO, caller_says("hi"), model_says("Hi."), caller_hangs_up()]))
    await ended(stack, call)
    assert not server_errors(call)
    choices = [e["session"].get("tool_choice") for e in call.received if e["type"] == "session.update"]
    assert [c for c in choices if c not in (None, "auto")] == sent
    expected = [
        'tool_choice "required" with no tools: the session offers the model none to call (give tools too)',
        "tool_choice names the tool 'lookup_order', which the call does not offer (none)",
        "tool_choice names the MCP server 'docs', which the call does not offer (none)",
    ]
    assert refused == [e for c, e in zip(CHOICES, expected, strict=True) if c not in sent]


async def test_update_session_takes_session_config_names_and_refuses_typos(stack: Stack) -> None:
    @stack.app.tool
    async def slow_down(ctx: CallContext) -> str:
        # (the voice cannot change once the model has spoken: the server refuses that)
        ctx.update_session(speed=0.9, noise_reduction={"type": "near_field"}, instructions="Speak slowly.")
        try:
            ctx.update_session(instruction="typo")
        except ValueError as exc:
            return str(exc)
        return "no error"

    @stack.app.tool
    async def to_sales(ctx: CallContext) -> str:
        await ctx.transfer("sales")  # not in transfer_targets
        return "transferring"

    call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("slower please, then sales"),
                model_calls("slow_down", {}),
                model_says("Sure."),
                model_calls("to_sales", {}),
                model_says("I can only transfer you to a human."),
                caller_hangs_up(),
            ]
        ),
    )
    await call.wait_done(timeout=10)
    updates = [e["session"] for e in call.received if e["type"] == "session.update"]
    assert updates[-1] == {
        "type": "realtime",
        "instructions": "Speak slowly.",
        "audio": {"output": {"speed": 0.9}, "input": {"noise_reduction": {"type": "near_field"}}},
    }
    assert not server_errors(call)  # the simulator, like OpenAI, took the update
    results = list(outputs(call).values())
    assert results[0] == "unknown session field 'instruction' (did you mean 'instructions'?)"
    # The model learns which targets it may use instead of a bare error type.
    assert results[1] == {
        "error": "tool_failed",
        "message": "transfer target 'sales' is not allowed (allowed: human)",
    }


async def test_update_session_refuses_a_greeting_and_sends_nothing(stack: Stack) -> None:
    @stack.app.tool
    async def to_billing(ctx: CallContext) -> str:
        try:
            ctx.update_session(instructions="You are billing.", greeting="Greet the caller as billing.")
        except ValueError as exc:
            return str(exc)
        return "no error"

    call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("billing"),
                model_calls("to_billing", {}),
                model_says("Sure."),
                caller_hangs_up(),
            ]
        ),
    )
    await call.wait_done(timeout=10)
    updates = [e["session"] for e in call.received if e["type"] == "session.update"]
    assert not any("greeting" in u or u.get("instructions") == "You are billing." for u in updates), updates
    assert not server_errors(call)
    [result] = outputs(call).values()
    assert result.startswith("greeting is not a session field (") and "ctx.say(instructions)" in result


async def test_update_session_refuses_an_audio_format_on_a_phone_call(stack: Stack) -> None:
    """A SIP call's codec is negotiated: OpenAI refuses a session.update that sets a format, and with it
    the rest of that update (the voice here). The tool is told at once; nothing goes out."""

    @stack.app.tool
    async def hi_fi(ctx: CallContext) -> str:
        try:
            ctx.update_session(
                voice="cedar", audio={"output": {"format": {"type": "audio/pcm", "rate": 24000}}}
            )
        except ValueError as exc:
            return str(exc)
        return "no error"

    call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("better sound"),
                model_calls("hi_fi", {}),
                model_says("Sure."),
                caller_hangs_up(),
            ]
        ),
    )
    await call.wait_done(timeout=10)
    updates = [e["session"] for e in call.received if e["type"] == "session.update"]
    assert not any("cedar" in json.dumps(u) for u in updates), updates
    assert not server_errors(call)
    [result] = outputs(call).values()
    assert result == "audio.output.format must not be set for SIP calls (the codec is negotiated)"


@pytest.mark.parametrize(
    "audio, message",
    [
        ("loud", "audio must be an object, not str"),
        ({"input": "loud"}, "audio.input must be an object, not str"),
        ({"output": 3}, "audio.output must be an object, not int"),
    ],
)
async def test_update_session_refuses_a_malformed_audio_object_as_a_session_config_error(
    stack: Stack, audio: Any, message: str
) -> None:
    """A SessionConfigError, its message logged (not an AttributeError or ValueError the update made of
    it); nothing is sent."""

    @stack.app.tool
    async def tune(ctx: CallContext) -> str:
        ctx.update_session(instructions="Tuned.", audio=audio)
        return "no error"

    steps = [HELLO, caller_says("tune it"), model_calls("tune", {}), model_says("Sure."), caller_hangs_up()]
    with capture_logs() as logs:
        call = await start(stack, Script(steps))
        await call.wait_done(timeout=10)
    updates = [e["session"] for e in call.received if e["type"] == "session.update"]
    assert not any(u.get("instructions") == "Tuned." for u in updates), updates
    assert list(outputs(call).values()) == [{"error": "tool_failed", "message": "SessionConfigError"}]
    [failed] = [e for e in logs if e["event"] == "tool.finished"]
    assert failed["error"] == f"SessionConfigError: {message}"


def test_update_session_refuses_a_greeting_before_the_call_is_asked_on_any_engine() -> None:
    asked: list[dict[str, Any]] = []

    class Actions:
        def update_session(self, **fields: Any) -> None:
            asked.append(fields)

    ctx = CallContext("sess_1", actions=Actions())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="greeting is not a session field"):
        ctx.update_session(greeting="Greet the caller as billing.")
    ctx.update_session(instructions="You are billing.")
    assert asked == [{"instructions": "You are billing."}]


async def test_hangup_during_a_tool_cancels_it_and_sends_nothing(stack: Stack) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    @stack.app.tool(filler_after=None)
    async def long_job() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    call = await start(
        stack, Script([HELLO, caller_says("go"), model_calls("long_job", {})], step_timeout=10)
    )
    await asyncio.wait_for(started.wait(), 5)
    await stack.sim.hang_up(call)
    summary = await ended(stack, call, check_script=False)
    assert cancelled.is_set() and summary.reason == "remote_closed"
    assert not outputs(call)
    assert stack.service.registry.calls.get(call.call_id) is None


async def test_network_blip_reattaches_and_delivers_the_pending_output(stack: Stack) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    @stack.app.tool(filler_after=None)
    async def slow() -> str:
        started.set()
        async with asyncio.timeout(5):
            await release.wait()
        return "after the blip"

    call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("go"),
                model_calls("slow", {}),
                model_says("Got it."),
                caller_hangs_up(),
            ]
        ),
    )
    await asyncio.wait_for(started.wait(), 5)
    await stack.sim.drop_sideband(call, "abnormal")
    await call.wait_for(lambda c: c.sideband_connects == 2, timeout=5)
    release.set()
    await call.wait_done(timeout=10)
    assert list(outputs(call).values()) == ["after the blip"]
    greetings = [e for e in call.received if e["type"] == "response.create" and untagged(e).get("response")]
    assert len(greetings) == 1  # no second greeting after the re-attach
    assert [e["type"] for e in call.received].count("session.update") == 2


@pytest.mark.parametrize("settings_overrides", [{"max_call_duration": 0.5}])
async def test_max_duration_says_goodbye_then_hangs_up(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    call = await start(stack, Script([HELLO, caller_says("let me think"), model_says("Sure."), pause(3)]))
    await call.wait_ended(timeout=5)
    assert call.end_reason == "hangup_verb"
    creates = [e for e in call.received if e["type"] == "response.create"]
    assert "goodbye" in creates[-1]["response"]["instructions"]
    summary = await ended(stack, call, check_script=False)
    assert summary.reason == "max_duration"


@pytest.mark.parametrize("settings_overrides", [{"max_idle_duration": 1.0}])
async def test_a_caller_who_speaks_over_the_idle_goodbye_keeps_the_call(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    stack.sim.playback_rate = 30.0  # the goodbye plays for about two seconds: the caller cuts into it
    with capture_logs() as logs:
        call = await start(
            stack,
            Script(
                [
                    HELLO,
                    model_answers("Thank you for calling the order desk, goodbye."),
                    caller_says("Wait, I'm still here! Where is order 42?", cut_in=True),
                    model_calls("lookup_order", {"order_id": "42"}),
                    model_answers("Order 42 has shipped."),
                    caller_hangs_up(),
                ],
                step_timeout=10,
            ),
        )
        await call.wait_done(timeout=15)
        summary = await ended(stack, call)
    assert summary.reason == "remote_closed"  # the caller hung up, not the idle limit
    assert [(t.name, t.outcome) for t in summary.tools] == [("lookup_order", "ok")]
    assert [e["limit"] for e in logs if e["event"] == "call.limit_withdrawn"] == ["idle"]
    assert not [e for e in logs if e["event"] == "call.hung_up"]


@pytest.mark.parametrize("settings_overrides", [{"max_call_duration": 1.0}])
async def test_a_duration_goodbye_the_caller_talks_over_is_said_again_and_their_answer_runs_no_tool(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    stack.sim.playback_rate = 30.0
    ran: list[str] = []

    @stack.app.tool
    async def book_visit(ctx: CallContext) -> str:
        """Book a technician's visit."""
        ran.append("book")
        return "booked"

    call = await start(
        stack,
        Script(
            [
                HELLO,
                model_answers("We have reached the time limit of this call, goodbye."),
                caller_says("No wait, book me a visit first!", cut_in=True),
                model_calls("book_visit", {}, await_outputs=False),  # the server's own answer
                model_answers("I'm sorry, we have to end here. Goodbye."),
            ],
            step_timeout=10,
        ),
    )
    await call.wait_ended(timeout=15)
    summary = await ended(stack, call)
    assert call.end_reason == "hangup_verb" and summary.reason == "max_duration"
    assert ran == [] and summary.tools == []
    goodbyes = [
        e["response"]["instructions"]
        for e in call.received
        if e["type"] == "response.create" and "goodbye" in str(e.get("response", {}).get("instructions"))
    ]
    assert len(goodbyes) == 2  # the one the caller cut off, then once more


async def until(done: Any, timeout: float = 5.0) -> None:
    """Wait until ``done()`` holds (what the sideband logs shows no other way)."""
    async with asyncio.timeout(timeout):
        while not done():
            await asyncio.sleep(0.01)


def limits(logs: list[Any]) -> list[str]:
    return [e["limit"] for e in logs if e["event"] == "call.limit"]


@pytest.mark.parametrize("settings_overrides", [{"max_idle_duration": 0.2, "max_call_duration": 2.0}])
async def test_the_call_limit_due_during_the_idle_end_still_ends_a_caller_who_comes_back(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    stack.sim.playback_rate = 30.0  # the goodbye plays for about two seconds: the caller cuts into it
    release = asyncio.Event()

    @stack.app.tool(filler_after=None)
    async def check_stock() -> str:
        """Check the stock (a slow back end)."""
        async with asyncio.timeout(5):
            await release.wait()
        return "in stock"

    with capture_logs() as logs:
        call = await start(
            stack,
            Script(
                [
                    HELLO,
                    caller_says("Is the blue kettle in stock?"),
                    model_calls("check_stock", {}),
                    model_answers("Yes, it is in stock."),
                    model_answers("Thank you for calling the kitchen shop, goodbye."),
                    caller_says("Wait, can I order it now?", cut_in=True),
                    model_says("I'm sorry, we have to end the call here."),  # the server's own answer
                    model_answers("Goodbye."),
                ],
                step_timeout=10,
            ),
        )
        # The tool is stuck past the idle limit, which then ends the call, and past the call limit.
        await until(lambda: limits(logs) == ["idle", "max_duration"])
        release.set()
        await call.wait_ended(timeout=15)
        summary = await ended(stack, call)
    assert call.end_reason == "hangup_verb" and summary.reason == "max_duration"
    assert not [e for e in logs if e["event"] == "call.limit_withdrawn"]
    goodbyes = [
        e for e in call.received if e["type"] == "response.create" and "goodbye" in json.dumps(e).lower()
    ]
    assert len(goodbyes) == 2  # the one the caller cut off, then once more


@pytest.mark.parametrize("settings_overrides", [{"max_idle_duration": 0.2}])
async def test_a_transfer_asked_for_while_the_idle_limit_ends_the_call_is_made(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    release = asyncio.Event()

    @stack.app.tool(filler_after=None)
    async def escalate(ctx: CallContext) -> str:
        """File the case, then hand the caller to a person."""
        async with asyncio.timeout(5):
            await release.wait()
        await ctx.transfer("human")
        return "transferring"

    with capture_logs() as logs:
        call = await start(
            stack,
            Script(
                [
                    HELLO,
                    caller_says("I want to speak to a person."),
                    model_calls("escalate", {}),
                    model_answers("Connecting you to a colleague now."),
                ],
                step_timeout=10,
            ),
        )
        await until(lambda: limits(logs) == ["idle"])  # the tool is stuck past the idle limit
        release.set()
        await call.wait_ended(timeout=5)
        summary = await ended(stack, call)
    assert call.end_reason == "referred" and summary.reason == "transferred"
    creates = [untagged(e) for e in call.received if e["type"] == "response.create"]
    assert not [e for e in creates if "goodbye" in json.dumps(e).lower()]  # no goodbye before the transfer


async def test_the_goodbye_comes_before_the_sessions_cut_however_late_the_attach() -> None:
    """The session is cut at its expires_at (62.5 s after it started here); the call-duration limit
    (3540 s from the attach) is brought forward to 60 s before the cut: the goodbye is said and the
    call hung up before the session would have been cut without a word."""
    with capture_logs() as logs:
        async with Simulator(session_seconds=62.5) as sim, run_app(make_app(), sim) as harness:
            call = harness.sim.create_call(
                Script([HELLO, caller_says("let me think"), model_says("Sure."), pause(60)])
            )
            assert (await harness.sender.deliver(harness.sim.incoming_event(call))).status == 200
            await call.wait_ended(timeout=10)
            assert call.end_reason == "hangup_verb"
            creates = [e for e in call.received if e["type"] == "response.create"]
            assert "goodbye" in creates[-1]["response"]["instructions"]
            summary = await harness.ended(call, check_script=False)
            assert summary.reason == "max_duration" and summary.duration < 6
    moved = [e for e in logs if e["event"] == "sideband.timer_moved"]
    assert [(e["timer"], e["log_level"]) for e in moved] == [("max_duration", "info")]
    assert 3530 < moved[0]["earlier_s"] < 3540


async def test_a_limit_brought_forward_by_a_second_or_two_is_no_news(stack: Stack) -> None:
    """Every call's session starts at the accept, before the attach, and its expires_at is in whole
    seconds: the limit (3540 s from the attach) moves forward by a second or so on every call."""
    with capture_logs() as logs:
        call = await start(stack, Script([HELLO, caller_says("hi"), model_says("Hello."), caller_hangs_up()]))
        await ended(stack, call)
    moved = [e for e in logs if e["event"] == "sideband.timer_moved"]  # (none if it moved by nothing)
    assert [(e["timer"], e["log_level"]) for e in moved] in ([], [("max_duration", "debug")])
    assert all(0 <= e["earlier_s"] < TIMER_MOVED_NOTABLE for e in moved)


async def test_a_session_expiry_already_past_is_not_taken_as_the_end() -> None:
    """An expires_at less than 60 s ahead when the session is confirmed says more of the clocks than of
    the call: it is logged, not acted on (the call would otherwise say goodbye at once)."""
    async with Simulator(session_seconds=30) as sim, run_app(make_app(), sim) as harness:
        call = harness.sim.create_call(
            Script([HELLO, caller_says("hello"), model_says("Hi, how can I help?"), caller_hangs_up()])
        )
        with capture_logs() as logs:
            assert (await harness.sender.deliver(harness.sim.incoming_event(call))).status == 200
            summary = await harness.ended(call)
        assert summary.reason == "remote_closed"
        ignored = [e for e in logs if e["event"] == "sideband.expiry_ignored"]
        assert [(e["timer"], e["log_level"]) for e in ignored] == [("max_duration", "warning")]
        assert 28 <= ignored[0]["late_s"] <= 32


async def test_hooks_get_start_end_dtmf_transcripts_and_one_greeting() -> None:
    from sideband.testing import Simulator

    from .conftest import settings_for

    app: Sideband = make_app()
    events: list[tuple[str, Any]] = []
    done = asyncio.Event()
    app.on_call_start(lambda ctx: events.append(("start", ctx.from_number)))
    app.on_dtmf(lambda ctx, d: events.append(("dtmf", d)))
    app.on_transcript(lambda ctx, role, text: events.append((role, text)))

    async def end(ctx: CallContext, summary: CallSummary) -> None:
        events.append(("end", summary))
        done.set()

    app.on_call_end(end)

    @app.on_call_start
    def broken_hook(ctx: CallContext) -> None:
        raise RuntimeError("a failing hook never ends the call")

    from aiohttp.test_utils import TestServer

    from sideband.edge import create_app

    async with Simulator() as sim:
        server = TestServer(create_app(settings_for(sim), app), host="127.0.0.1")
        await server.start_server()
        try:
            call = sim.create_call(
                Script(
                    [
                        HELLO,
                        caller_presses("12#"),
                        caller_says("order 12"),
                        model_calls("lookup_order", {"order_id": "12"}),
                        model_says("Shipped."),
                        caller_hangs_up(),
                    ]
                ),
                from_number="+15551230000",
            )
            sender = sim.webhook_sender(str(server.make_url("/webhooks/openai")))
            assert (await sender.deliver(sim.incoming_event(call))).status == 200
            await asyncio.wait_for(done.wait(), 10)
        finally:
            await server.close()
    assert events[0] == ("start", "+15551230000")
    assert [d for k, d in events if k == "dtmf"] == ["1", "2", "#"]
    lines = [(k, v) for k, v in events if k in ("caller", "agent")]
    assert lines == [("agent", "Hello."), ("caller", "order 12"), ("agent", "Shipped.")]
    summary = events[-1][1]
    assert summary.reason == "remote_closed" and summary.dtmf == "12#" and summary.duration > 0
    assert [(t.name, t.outcome) for t in summary.tools] == [("lookup_order", "ok")]
    assert summary.transcript == lines
    greetings = [e for e in call.received if e["type"] == "response.create" and untagged(e).get("response")]
    assert len(greetings) == 1


async def test_the_summary_says_when_the_call_started_by_the_wall_clock(stack: Stack) -> None:
    summaries: list[CallSummary] = []
    stack.app.on_call_end(lambda ctx, summary: summaries.append(summary))
    before = time.time()
    call = await start(
        stack, Script([HELLO, caller_says("Is it open?"), model_says("Yes, until five."), caller_hangs_up()])
    )
    summary = await ended(stack, call)
    after = time.time()
    assert summaries == [summary] and summary.reason == "remote_closed"
    assert before <= summary.started_at < summary.started_at + summary.duration <= after
    assert {role for role, _ in summary.transcript} == set(typing.get_args(TranscriptRole))


async def test_the_calls_actions_refuse_in_on_call_end(stack: Stack) -> None:
    """The call has ended by the time ``on_call_end`` runs: its actions raise (a hangup, a transfer or a
    say there would do nothing), rather than return as if they had been carried out."""
    tried: list[tuple[str, str]] = []

    async def collect(ctx: CallContext) -> str:
        return await ctx.collect_digits(max_digits=1, timeout=30)

    actions: dict[str, Callable[[CallContext], Any]] = {
        "say": lambda ctx: ctx.say("Bye."),
        "hangup": lambda ctx: ctx.hangup("late"),
        "transfer": lambda ctx: ctx.transfer("human"),
        "collect_digits": collect,
    }

    @stack.app.on_call_end
    async def end(ctx: CallContext, summary: CallSummary) -> None:
        for name, action in actions.items():
            try:
                done = action(ctx)
                if inspect.isawaitable(done):
                    await done
            except RuntimeError as exc:
                tried.append((name, str(exc)))

    call = await start(stack, Script([HELLO, caller_says("Hi."), model_says("Hello."), caller_hangs_up()]))
    summary = await ended(stack, call)
    assert summary.reason == "remote_closed"
    assert tried == [(name, "no live call behind this context") for name in actions]


async def test_keyed_digits_reach_the_model_through_send_text(stack: Stack) -> None:
    @stack.app.on_dtmf
    def keypad(ctx: CallContext, digit: str) -> None:  # (sync: in a worker thread, the action hops over)
        keyed = ctx.state.setdefault("keyed", [])
        if digit != "#":
            keyed.append(digit)
            return
        ctx.send_text(f"[keypad] {''.join(keyed)}")
        keyed.clear()

    call = await start(
        stack,
        Script(
            [
                wait_for_greeting("Please key in your order number, then the hash key."),
                caller_presses("42#"),
                wait_for_greeting("Order 42: it shipped today."),  # (waits for the controller's create)
                caller_hangs_up(),
            ]
        ),
    )
    await call.wait_done(timeout=10)
    summary = await ended(stack, call)
    items = [e["item"] for e in call.received if e["type"] == "conversation.item.create"]
    assert items == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "[keypad] 42"}]}
    ]
    marks = [e["type"] for e in call.received]
    assert marks[marks.index("conversation.item.create") + 1] == "response.create"  # one answer follows
    assert [(r.trigger, r.text) for r in call.responses][-1] == (
        "response.create",
        "Order 42: it shipped today.",
    )
    assert summary.dtmf == "42#" and ("caller", "[keypad] 42") in summary.transcript
    assert not server_errors(call)


def test_send_text_needs_a_live_call() -> None:
    with pytest.raises(RuntimeError, match="no live call"):
        CallContext("rtc_x").send_text("42")


async def test_hangup_verb_is_retried_after_a_server_error(stack: Stack) -> None:
    @stack.app.tool
    async def finish(ctx: CallContext) -> str:
        await ctx.hangup()
        return "bye"

    call = stack.sim.create_call(
        Script([HELLO, caller_says("done"), model_calls("finish", {}), model_says("Bye!")])
    )
    stack.sim.fail_verb(call.call_id, "hangup", 503, 500)
    assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    await call.wait_ended(timeout=10)
    assert call.end_reason == "hangup_verb"
    assert sum(1 for r in stack.sim.requests if r.path.endswith("/hangup")) == 3
    assert (await ended(stack, call)).reason == "hangup"


async def test_frames_only_pythons_json_parser_reads_are_still_events(stack: Stack) -> None:
    """A NaN or an integer over 64 bits is outside strict JSON; the frame is still handled, not dropped."""
    digits: list[str] = []
    got = asyncio.Event()

    def on_dtmf(ctx: CallContext, digit: str) -> None:
        digits.append(digit)
        if len(digits) == 2:
            got.set()

    stack.app.on_dtmf(on_dtmf)
    call = await start(stack, Script([HELLO, pause(30), caller_hangs_up()]))
    await call.wait_received("session.update")
    # The simulator writes NaN as Python's json module does; 2**70 is valid JSON but not a 64-bit integer.
    await call._send("input_audio_buffer.dtmf_event_received", event="4", received_at=float("nan"))
    await call._send("input_audio_buffer.dtmf_event_received", event="2", received_at=2**70)
    await asyncio.wait_for(got.wait(), 10)
    stack.sim.hang_up(call)
    summary = await ended(stack, call, check_script=False)
    assert digits == ["4", "2"] and summary.dtmf == "42"


async def test_text_only_pythons_json_encoder_writes_still_goes_out(stack: Stack) -> None:
    """A lone surrogate (e.g. a file name decoded with surrogateescape) in a tool's output or in say()."""
    name = b"caf\xe9.txt".decode("utf-8", "surrogateescape")

    @stack.app.tool
    async def newest_file() -> str:
        return name

    call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("which file?"),
                model_calls("newest_file", {}),
                model_says("That one."),
                caller_hangs_up(),
            ]
        ),
    )
    await ended(stack, call)
    # (UTF-8 has no form for it, and a \udce9 escape is no JSON a strict parser reads: U+FFFD in its place)
    assert list(outputs(call).values()) == ["caf\ufffd.txt"]
    assert kinds(call)[-1] == "create" and kinds(call)[-2].startswith("output:") and not server_errors(call)


async def test_update_session_refuses_a_value_json_cannot_carry_and_sends_nothing(stack: Stack) -> None:
    """A value JSON cannot carry is refused as update_session is called, naming where it is: the tool
    is told, nothing goes out, and the call goes on (a later update is sent as usual)."""
    refused: list[str] = []

    @stack.app.on_call_start
    def started(ctx: CallContext) -> None:  # (before the session is live: the update would be held)
        try:
            ctx.update_session(tracing={"workflow_name": "desk", "metadata": {"raw": b"\xff"}})
        except ValueError as exc:
            refused.append(str(exc))

    @stack.app.tool
    async def stage(ctx: CallContext) -> str:
        try:
            ctx.update_session(
                tracing={"workflow_name": "desk", "metadata": {"amount": decimal.Decimal("12.50")}}
            )
        except ValueError as exc:
            return str(exc)
        return "no error"

    @stack.app.tool
    async def brief(ctx: CallContext) -> str:
        ctx.update_session(instructions="Be brief.")
        return "done"

    call = await start(
        stack,
        Script(
            [
                HELLO,
                caller_says("go"),
                model_calls("stage", {}, call_id="c1"),
                model_says("Done."),
                caller_says("shorter"),
                model_calls("brief", {}, call_id="c2"),
                model_says("Ok."),
                caller_hangs_up(),
            ]
        ),
    )
    summary = await ended(stack, call)
    assert refused == [
        "session field tracing.metadata.raw holds a value of type bytes, which JSON cannot carry"
    ]
    assert outputs(call) == {
        "c1": "session field tracing.metadata.amount holds a value of type Decimal, which JSON cannot carry",
        "c2": "done",
    }
    updates = [e["session"] for e in call.received if e["type"] == "session.update"][1:]
    assert updates == [{"type": "realtime", "instructions": "Be brief."}]
    assert not server_errors(call)
    assert [(t.name, t.outcome) for t in summary.tools] == [("stage", "ok"), ("brief", "ok")]
