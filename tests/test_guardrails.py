"""Stopping the model: ``ctx.interrupt()`` and output guardrails (``@app.guardrail``), from the call machine
to whole calls against the simulator."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
import structlog

from sideband import CallContext, Sideband
from sideband.logs import failure_fields
from sideband.runtime import guard
from sideband.runtime.driver import CallHooks, CallRuntime
from sideband.runtime.machine import CORRECTIONS, CallMachine, MachineConfig, Notice, Send, Verb
from sideband.settings import load_settings
from sideband.testing import (
    Script,
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
from sideband.testing.vowel import VowelSimulator, when
from sideband.tools import ToolRegistry
from sideband.vowel import EngineSession
from sideband.vowel.session import ENGINE_CAPABILITIES

from .conftest import asked, capture_logs, untagged

SESSION = {"type": "realtime", "instructions": "hi"}
PROMISE = (
    "Of course. I guarantee you a full refund today, no questions asked, and I will make sure the money is "
    "back on your card before the end of the week, whatever the terms of your order say."
)


def refund_asked(**options: Any) -> Script:
    """The caller asks for a refund; the model promises one as it calls ``issue_refund`` (a rule breaks),
    then answers within the rules."""
    return Script(
        [
            wait_for_greeting("Hi."),
            caller_says("Refund?"),
            model_calls("issue_refund", {}, preamble=PROMISE),
            model_answers("A colleague decides on refunds."),
            caller_hangs_up(),
        ],
        **options,
    )


def live(**caps: Any) -> CallMachine:
    m = CallMachine(MachineConfig(session=SESSION), ENGINE_CAPABILITIES if caps.get("engine") else None)
    m.start()
    if caps.get("engine"):
        m.receive({"type": "session.created", "session": {"id": "sess_1"}})
        m.receive({"type": "session.updated", "session": {}})
    return m


def sent(actions: list[Any]) -> list[dict[str, Any]]:
    return [untagged(a.event) for a in actions if isinstance(a, Send)]


# ------------------------------------------------------------------------------------------ machine
def test_interrupt_cancels_the_response_under_way_and_clears_its_audio() -> None:
    m = live()
    m.receive({"type": "response.created", "response": {"id": "resp_1"}})
    m.receive({"type": "output_audio_buffer.started", "response_id": "resp_1"})
    out = sent(m.interrupt())
    assert [e["type"] for e in out] == ["response.cancel", "output_audio_buffer.clear"]
    assert out[0]["response_id"] == "resp_1"
    # The reply ends cancelled: the calls it made are not run, and nothing is asked for in its place.
    done = m.receive({"type": "response.done", "response": {"id": "resp_1", "status": "cancelled"}})
    assert sent(done) == []


def test_interrupt_after_the_reply_was_written_clears_only_the_audio_still_playing() -> None:
    m = live()
    m.receive({"type": "response.created", "response": {"id": "resp_1"}})
    m.receive({"type": "output_audio_buffer.started", "response_id": "resp_1"})
    m.receive({"type": "response.done", "response": {"id": "resp_1", "status": "completed"}})
    assert [e["type"] for e in sent(m.interrupt())] == ["output_audio_buffer.clear"]
    m.receive({"type": "output_audio_buffer.cleared", "response_id": "resp_1"})
    assert m.interrupt() == []  # nothing is said any more


def test_interrupt_cancels_a_reply_asked_for_as_it_starts_and_keeps_a_queued_say() -> None:
    m = live()
    assert [e["type"] for e in sent(m.say("first"))] == ["response.create"]
    m.say("second")  # queued behind the first
    assert m.interrupt() == []  # nothing started yet: it is cancelled as it starts
    created = m.receive({"type": "response.created", "response": {"id": "resp_1"}})
    assert sent(created) == [{"type": "response.cancel", "event_id": sent(created)[0]["event_id"],
                              "response_id": "resp_1"}]  # fmt: skip
    done = m.receive({"type": "response.done", "response": {"id": "resp_1", "status": "cancelled"}})
    assert [e.get("response") for e in sent(done)] == [{"instructions": "second"}]
    # The next reply of ours is not cancelled.
    assert sent(m.receive({"type": "response.created", "response": {"id": "resp_2"}})) == []


def test_interrupt_on_an_engine_only_cancels() -> None:
    m = live(engine=True)
    m.receive({"type": "response.created", "response": {"id": "resp_1"}})
    assert [e["type"] for e in sent(m.interrupt())] == ["response.cancel"]


def test_a_cancel_that_came_late_is_no_error() -> None:
    m = live()
    m.receive({"type": "response.created", "response": {"id": "resp_1"}})
    cancel = sent(m.interrupt())[0]
    error = {
        "type": "invalid_request_error",
        "code": "response_cancel_not_active",
        "event_id": cancel["event_id"],
    }
    actions = m.receive({"type": "error", "error": error})
    assert [a.event for a in actions if isinstance(a, Notice)] == ["response.cancel_late"]
    assert m.last_error is None


def test_correct_stops_the_reply_and_has_the_model_answer_again_after_the_tools() -> None:
    m = live()
    m.receive({"type": "response.created", "response": {"id": "resp_1"}})
    for event in (
        {"type": "response.function_call_arguments.done", "response_id": "resp_1", "call_id": "c1",
         "name": "lookup", "arguments": "{}"},
    ):  # fmt: skip
        m.receive(event)
    out = sent(m.correct("Stay polite.\nThe rule: no promises"))
    assert [e["type"] for e in out] == [
        "response.cancel",
        "output_audio_buffer.clear",
        "conversation.item.create",
    ]
    assert out[2]["item"] == {
        "type": "message",
        "role": "system",
        "content": [{"type": "input_text", "text": "Stay polite.\nThe rule: no promises"}],
    }
    done = m.receive({"type": "response.done", "response": {"id": "resp_1", "status": "cancelled"}})
    assert [e["type"] for e in sent(done)] == ["response.create"]  # (its call was not run)
    assert "response" not in sent(done)[0]  # the session's own instructions: the persona stays


def test_a_model_that_keeps_breaking_the_rule_is_left_silent_until_the_caller_speaks() -> None:
    m = live()
    creates = []
    for n in range(CORRECTIONS + 1):
        m.receive({"type": "response.created", "response": {"id": f"resp_{n}"}})
        actions = m.correct("note")
        actions += m.receive(
            {"type": "response.done", "response": {"id": f"resp_{n}", "status": "cancelled"}}
        )
        creates.append([e for e in sent(actions) if e["type"] == "response.create"])
        if n < CORRECTIONS:
            m.receive({"type": "response.created", "response": {"id": f"again_{n}"}})
            m.receive({"type": "response.done", "response": {"id": f"again_{n}", "status": "completed"}})
    assert [len(c) for c in creates] == [1] * CORRECTIONS + [0]
    assert [a.fields for a in actions if isinstance(a, Notice) and a.event == "guardrail.silenced"] == [
        {"stopped": CORRECTIONS + 1}
    ]
    m.receive({"type": "input_audio_buffer.speech_started", "item_id": "item_9"})  # the caller speaks
    m.receive({"type": "input_audio_buffer.speech_stopped", "item_id": "item_9"})
    m.receive({"type": "response.created", "response": {"id": "resp_turn"}})
    actions = m.correct("note")
    actions += m.receive({"type": "response.done", "response": {"id": "resp_turn", "status": "cancelled"}})
    assert [e["type"] for e in sent(actions)].count("response.create") == 1


# --------------------------------------------------------------------------------------- whole calls
def guarded_app(**kw: Any) -> tuple[Sideband, list[str]]:
    """An app whose guardrail stops promises of refunds; returns it and the texts the guardrail saw."""
    app = Sideband(instructions="You are the order desk.", greeting="Greet the caller.", **kw)
    seen: list[str] = []

    @app.guardrail
    def no_refund_promises(ctx: CallContext, text: str) -> str | None:
        seen.append(text)
        return "never promise a refund" if "guarantee" in text else None

    return app, seen


async def test_a_reply_that_breaks_a_rule_is_stopped_as_it_streams_and_said_again() -> None:
    app, seen = guarded_app()
    async with Simulator(event_gap=0.02) as sim, run_app(app, sim) as h:
        with capture_logs() as logs:
            call = await h.call(
                Script(
                    [
                        wait_for_greeting("Order desk."),
                        caller_says("Can I have my money back?"),
                        model_says(PROMISE),
                        model_answers("I can look into a refund for you. What is your order number?"),
                        caller_hangs_up(),
                    ]
                )
            )
            summary = await h.ended(call)
        async with aiohttp.ClientSession() as http, http.get(h.url("/metrics")) as r:
            metrics = await r.text()
    stopped, again = call.responses[1], call.responses[2]
    assert stopped.status == "cancelled"
    assert stopped.text is not None and "guarantee" in stopped.text and len(stopped.text) < len(PROMISE)
    assert again.status == "completed" and again.text is not None and again.text.startswith("I can look")
    assert asked(again.request) == {}  # asked for plainly: the session's persona stays
    # In order: the cancel of that reply, the clear of its audio, the note, and one new response.
    sent_types = [e["type"] for e in call.received]
    start = sent_types.index("response.cancel")
    assert sent_types[start : start + 4] == [
        "response.cancel",
        "output_audio_buffer.clear",
        "conversation.item.create",
        "response.create",
    ]
    assert call.received[start]["response_id"] == stopped.response_id
    note = call.received[start + 2]["item"]
    assert note["role"] == "system" and note["content"][0]["text"].endswith(
        "The rule: never promise a refund"
    )
    assert summary.guardrails == (("no_refund_promises", "never promise a refund"),)
    assert [summary.transcript[i] for i in summary.stopped] == [("agent", stopped.text)]
    tripped = [e for e in logs if e["event"] == "guardrail.tripped"]
    assert [(e["guardrail"], e["reason"], e["response_id"]) for e in tripped] == [
        ("no_refund_promises", "never promise a refund", stopped.response_id)
    ]
    assert 'sideband_guardrail_trips_total{guardrail="no_refund_promises"} 1' in metrics.splitlines()
    # The words were checked as they streamed (not only whole), and the stopped reply's later words not.
    assert any(PROMISE.startswith(t) and t != PROMISE for t in seen)
    assert not any(t.startswith(stopped.text) and len(t) > len(stopped.text) for t in seen)


async def test_the_servers_answer_to_a_caller_who_spoke_over_a_stopped_reply_is_the_only_answer() -> None:
    """A reply is stopped and the model asked to answer again, while the caller speaks over it: our create
    crosses the server's answer to the caller and is refused for it. That answer is the one the caller
    hears: our create is not asked again after it (a second reply, unasked)."""
    app, _ = guarded_app()
    async with Simulator() as sim, run_app(app, sim) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Order desk."),
                    caller_says("Can I have my money back?"),
                    model_says(PROMISE),
                    caller_says("I just want my order", cut_in=True),
                    model_says("Right, let me look."),
                    pause(1.0),  # (the caller's silence: an answer asked again would be heard here)
                    caller_hangs_up(),
                ]
            )
        )
        await h.ended(call)
    refused = [e["error"]["code"] for e in call.sent if e["type"] == "error"]
    assert refused == ["conversation_already_has_active_response"]  # (ours crossed theirs on the wire)
    assert [(r.text, r.status) for r in call.responses[1:]] == [
        (call.responses[1].text, "cancelled"),
        ("Right, let me look.", "completed"),
    ]


async def test_a_reply_written_before_its_check_ends_still_has_its_unheard_audio_dropped() -> None:
    app = Sideband(instructions="You are the order desk.", greeting="Greet the caller.")
    checked = asyncio.Event()

    @app.guardrail
    async def moderation(ctx: CallContext, text: str) -> bool:
        if "guarantee" not in text:
            return False
        (call,) = sim.calls.values()  # a slow check: the reply is written, its response over, meanwhile
        await call.wait_for(lambda c: len(c.sent_of_type("response.done")) == 2, timeout=5)
        checked.set()
        return True

    # 10 characters a second: the reply plays for many seconds after it was written.
    async with Simulator(playback_rate=10) as sim, run_app(app, sim) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Hi."),
                    caller_says("Refund?"),
                    model_says(PROMISE),
                    model_answers("Let me check your order."),
                    caller_hangs_up(),
                ]
            )
        )
        summary = await h.ended(call)
    stopped = call.responses[1]
    assert stopped.status == "completed" and stopped.text == PROMISE  # written whole before the check
    assert checked.is_set()
    types = [e["type"] for e in call.received]
    assert "response.cancel" not in types  # nothing to cancel: only the audio still playing goes
    cleared = [
        e for e in call.sent_of_type("output_audio_buffer.cleared") if e["response_id"] == stopped.response_id
    ]
    assert len(cleared) == 1
    assert not [
        e for e in call.sent_of_type("output_audio_buffer.stopped") if e["response_id"] == stopped.response_id
    ]
    assert summary.guardrails == (("moderation", "moderation"),)  # True: the guardrail's name is the reason
    line = summary.transcript.index(("agent", PROMISE))
    assert line in summary.interrupted  # its line says the caller did not hear it all
    assert summary.stopped == (line,)  # (marked as the guardrail tripped: the line was written already)


async def test_a_guardrail_that_raises_lets_the_words_pass_and_is_logged() -> None:
    app = Sideband(instructions="You are the order desk.", greeting="Greet the caller.")

    @app.guardrail
    def broken(ctx: CallContext, text: str) -> bool:
        raise RuntimeError("the word list is missing")

    async with Simulator(event_gap=0.005) as sim, run_app(app, sim) as h:
        with capture_logs() as logs:
            call = await h.call(
                Script(
                    [wait_for_greeting("Hi."), caller_says("Refund?"), model_says(PROMISE), caller_hangs_up()]
                )
            )
            summary = await h.ended(call)
    assert all(r.status == "completed" for r in call.responses)
    assert "response.cancel" not in [e["type"] for e in call.received]
    assert summary.guardrails == ()
    failed = [e for e in logs if e["event"] == "guardrail.failed"]
    assert failed and failed[0]["guardrail"] == "broken" and failed[0]["error"].startswith("RuntimeError")
    assert len(failed) == len(call.responses) == 2  # once a reply, not at each of its deltas


class Ambiguous:
    """A guardrail's answer with no truth value (as a numpy array of several elements has none)."""

    def __bool__(self) -> bool:
        raise ValueError("the truth value is ambiguous")


@pytest.mark.parametrize("kind", ["plain", "async"])
async def test_a_guardrail_whose_answer_has_no_truth_value_lets_the_words_pass(kind: str) -> None:
    app = Sideband(instructions="You are the order desk.", greeting="Greet the caller.")

    def plain(ctx: CallContext, text: str) -> Any:
        return Ambiguous()

    async def scored(ctx: CallContext, text: str) -> Any:
        return Ambiguous()

    app.guardrail(plain if kind == "plain" else scored)
    async with Simulator(event_gap=0.005) as sim, run_app(app, sim) as h:
        with capture_logs() as logs:
            call = await h.call(
                Script(
                    [wait_for_greeting("Hi."), caller_says("Refund?"), model_says(PROMISE), caller_hangs_up()]
                )
            )
            summary = await h.ended(call)
    assert summary.reason == "remote_closed"  # (the caller hung up: not internal_error)
    assert all(r.status == "completed" for r in call.responses)
    assert "response.cancel" not in [e["type"] for e in call.received]
    assert summary.guardrails == ()
    failed = [e for e in logs if e["event"] == "guardrail.failed"]
    assert failed and {(e["guardrail"], e["error"]) for e in failed} == {
        ("plain" if kind == "plain" else "scored", "ValueError")
    }
    assert all("in __bool__" in e["stack"] for e in failed)


async def test_replies_that_pass_are_checked_whole_and_left_alone() -> None:
    app, seen = guarded_app()
    async with Simulator(event_gap=0.005) as sim, run_app(app, sim) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Welcome to the order desk."),
                    caller_says("Where is my order?"),
                    model_says("It left the warehouse this morning and arrives tomorrow."),
                    caller_hangs_up(),
                ]
            )
        )
        summary = await h.ended(call)
    assert summary.guardrails == ()
    assert "Welcome to the order desk." in seen
    assert "It left the warehouse this morning and arrives tomorrow." in seen
    assert "response.cancel" not in [e["type"] for e in call.received]
    assert [e["item"]["role"] for e in call.received if e["type"] == "conversation.item.create"] == []


async def test_a_hook_interrupts_the_model_and_says_something_else() -> None:
    app = Sideband(instructions="You are the order desk.", greeting="Greet the caller.")

    @app.on_dtmf
    def operator(ctx: CallContext, digit: str) -> None:
        if digit == "0":
            ctx.interrupt()
            ctx.say("Tell the caller you are putting them through to an operator.")

    async with Simulator(playback_rate=10) as sim, run_app(app, sim) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Hi."),
                    caller_says("What are your opening hours?"),
                    model_says(PROMISE),  # still playing when the caller presses 0
                    caller_presses("0"),
                    model_answers("Putting you through to an operator."),
                    caller_hangs_up(),
                ]
            )
        )
        await h.ended(call)
    long_reply = call.responses[1]
    types = [e["type"] for e in call.received]
    clear = types.index("output_audio_buffer.clear")
    assert "response.cancel" not in types  # (the reply was written already)
    create = types.index("response.create", clear)
    assert untagged(call.received[create])["response"] == {
        "instructions": "Tell the caller you are putting them through to an operator."
    }
    assert [e["response_id"] for e in call.sent_of_type("output_audio_buffer.cleared")] == [
        long_reply.response_id
    ]
    assert call.responses[2].text == "Putting you through to an operator."


async def test_a_tool_interrupts_from_its_worker_thread() -> None:
    app = Sideband(instructions="You are the order desk.", greeting="Greet the caller.")

    @app.tool
    def stop_talking(ctx: CallContext) -> str:
        """Stop."""
        ctx.interrupt()  # its response was written whole: what of it still plays is dropped
        return "stopped"

    async with Simulator(playback_rate=10) as sim, run_app(app, sim) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Hi."),
                    caller_says("Stop."),
                    model_calls("stop_talking", {}, preamble=PROMISE),
                    model_says("Stopped."),
                    caller_hangs_up(),
                ]
            )
        )
        summary = await h.ended(call)
    assert [(t.name, t.outcome) for t in summary.tools] == [("stop_talking", "ok")]
    types = [e["type"] for e in call.received]
    assert "response.cancel" not in types
    assert types.index("output_audio_buffer.clear") < types.index(
        "conversation.item.create"
    )  # before its output
    preamble = call.responses[1]
    assert [e["response_id"] for e in call.sent_of_type("output_audio_buffer.cleared")] == [
        preamble.response_id
    ]


async def test_an_engine_session_hands_back_the_answer_given_after_a_stopped_reply() -> None:
    app, seen = guarded_app()
    replies = iter(["I guarantee a full refund, today.", "Let me look at your order first."])
    async with VowelSimulator(event_delay=0.05) as vowel:  # (a word every 50 ms)
        vowel.script([when("refund", reply=lambda outputs: next(replies))])
        settings = load_settings({**vowel.settings_values(), "max_idle_duration": 30.0}, environ={})
        async with EngineSession.open(settings, app) as session:
            reply = await session.say("Can I get a refund?")
            summary = session.runtime.summary
        engine = vowel.sessions[0]
    assert reply.text == "Let me look at your order first."
    assert summary.guardrails == (("no_refund_promises", "never promise a refund"),)
    # After the caller's words: the stopped reply's cancel (no audio clear: the engine plays none of its own),
    # the note, and one new response.
    after = engine.received[[e["type"] for e in engine.received].index("conversation.item.create") + 1 :]
    assert [(e["type"], e.get("item", {}).get("role")) for e in after] == [
        ("response.cancel", None),
        ("conversation.item.create", "system"),
        ("response.create", None),
    ]
    assert [r.status for r in engine.responses] == ["cancelled", "completed"]
    assert any(t.startswith("I guarantee") for t in seen)


async def test_an_engine_turn_waits_for_the_check_of_its_reply_before_handing_it_back() -> None:
    """The check ends after the reply was written whole (a slow moderation call): the turn is not handed
    back with the words that broke the rule, but with the answer given instead."""
    app = Sideband(instructions="You are the order desk.")
    sessions: list[EngineSession] = []

    @app.guardrail
    async def moderation(ctx: CallContext, text: str) -> str | None:
        if "guarantee" not in text:
            return None
        machine = sessions[0].runtime.machine
        async with asyncio.timeout(5):
            while machine.responding is not None:  # until the reply's response.done was handled
                await asyncio.sleep(0.001)
        return "no promises"

    replies = iter(["I guarantee a refund.", "Let me check your order."])
    async with VowelSimulator() as vowel:
        vowel.script([when("refund", reply=lambda outputs: next(replies))])
        settings = load_settings({**vowel.settings_values(), "max_idle_duration": 30.0}, environ={})
        async with EngineSession.open(settings, app) as session:
            sessions.append(session)
            reply = await session.say("Can I get a refund?")
            summary = session.runtime.summary
    assert reply.text == "Let me check your order."
    assert reply.lines == ("Let me check your order.",)
    assert [summary.transcript[i] for i in summary.stopped] == [("agent", "I guarantee a refund.")]
    assert summary.guardrails == (("moderation", "no promises"),)


@pytest.mark.parametrize("hangs", ["awaiting", "swallowing_its_cancel"])
async def test_a_check_that_hangs_lets_the_words_pass_and_the_next_ones_are_checked(
    hangs: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A moderation service that never answers this once; or one behind a client that retries on any
    exception, its cancellation included (left behind: the next words are checked all the same)."""
    monkeypatch.setattr(guard, "CHECK_TIMEOUT", 0.2)
    app = Sideband(instructions="You are the order desk.", greeting="Greet the caller.")

    hung: list[str] = []
    over, gone = asyncio.Event(), asyncio.Event()
    cancels = 0

    @app.guardrail
    async def moderation(ctx: CallContext, text: str) -> str | None:
        nonlocal cancels
        if text.startswith("Your order") and not hung:  # (its words may come to it in one piece or more)
            hung.append(text)
            try:
                while not over.is_set():
                    try:
                        await over.wait()
                    except asyncio.CancelledError:
                        cancels += 1
                        if hangs == "awaiting" or cancels > 1:  # (the second: the call's end)
                            raise
            finally:
                gone.set()
        return "no promises" if "guarantee" in text else None

    async with run_app(app) as h:
        with capture_logs() as logs:
            call = await h.call(
                Script(
                    [
                        wait_for_greeting("Hi."),
                        caller_says("Where is my order?"),
                        model_says("Your order ships today."),
                        caller_says("And a refund?"),
                        model_says("I guarantee one."),
                        model_answers("A colleague will decide on refunds."),
                        caller_hangs_up(),
                    ]
                )
            )
            summary = await h.ended(call)
            await asyncio.wait_for(gone.wait(), 5)  # (left behind, cancelled again as the call ended)
    assert cancels == (1 if hangs == "awaiting" else 2)
    failed = [e for e in logs if e["event"] == "guardrail.failed"]
    assert [(e["guardrail"], e["error"]) for e in failed] == [("moderation", "timeout")]
    assert summary.guardrails == (("moderation", "no promises"),)
    assert [summary.transcript[i] for i in summary.stopped] == [("agent", "I guarantee one.")]
    assert call.responses[-1].text == "A colleague will decide on refunds."


# ------------------------------------------------------------------------------ what a stop leaves alone
def test_a_stopped_goodbye_is_asked_for_again_before_the_hangup() -> None:
    m = live()
    create = sent(m.request_end("idle_timeout", goodbye=True))
    assert create[0]["response"]["tool_choice"] == "none"
    m.receive({"type": "response.created", "response": {"id": "resp_bye"}})
    out = sent(m.correct("note", "resp_bye"))
    assert [e["type"] for e in out] == [
        "response.cancel",
        "output_audio_buffer.clear",
        "conversation.item.create",
    ]
    again = sent(m.receive({"type": "response.done", "response": {"id": "resp_bye", "status": "cancelled"}}))
    assert [e.get("response") for e in again] == [create[0]["response"]]  # the goodbye, not a plain answer
    m.receive({"type": "response.created", "response": {"id": "resp_bye2"}})
    done = m.receive({"type": "response.done", "response": {"id": "resp_bye2", "status": "completed"}})
    assert [a.verb for a in done if isinstance(a, Verb)] == ["hangup"]


def test_an_interrupted_create_that_is_refused_is_not_asked_for_again() -> None:
    m = live()
    create = sent(m.say("first"))[0]
    m.interrupt()
    error = {"type": "invalid_request_error", "code": "conversation_already_has_active_response"}
    refused = m.receive({"type": "error", "error": {**error, "event_id": create["event_id"]}})
    assert sent(refused) == []
    assert not m.response_owed


def test_code_sending_text_is_no_turn_of_the_callers_for_typed_ahead_keys() -> None:
    m = live()
    m.receive({"type": "input_audio_buffer.speech_started", "item_id": "item_1"})
    m.user_text("The caller keyed: 12")
    assert m.caller_turns == 1


def test_the_calls_of_a_reply_stopped_in_time_are_discarded_as_stopped() -> None:
    m = live()
    m.receive({"type": "session.updated", "session": {}})
    m.receive({"type": "response.created", "response": {"id": "resp_1"}})
    call = {"type": "function_call", "call_id": "c1", "name": "issue_refund", "arguments": "{}"}
    m.receive({"type": "response.output_item.added", "response_id": "resp_1", "item": call})
    assert [e["type"] for e in sent(m.correct("no promises", "resp_1"))] == [
        "response.cancel",
        "output_audio_buffer.clear",
        "conversation.item.create",
    ]
    done = m.receive(
        {"type": "response.done", "response": {"id": "resp_1", "status": "cancelled", "output": [call]}}
    )
    discarded = [a.fields for a in done if isinstance(a, Notice) and a.event == "tool.discarded"]
    assert discarded == [
        {
            "tool_call_id": "c1",
            "tool": "issue_refund",
            "response_status": "cancelled",
            "reason": "reply_stopped",
        }
    ]
    assert [e["type"] for e in sent(done)] == ["response.create"]  # the answer within the rules; no output
    # A reply cancelled otherwise (the caller cut in) is no stopped one.
    m.receive({"type": "response.created", "response": {"id": "resp_2"}})
    call = {**call, "call_id": "c2"}
    m.receive({"type": "response.output_item.added", "response_id": "resp_2", "item": call})
    done = m.receive(
        {"type": "response.done", "response": {"id": "resp_2", "status": "cancelled", "output": [call]}}
    )
    assert [a.fields["reason"] for a in done if isinstance(a, Notice) and a.event == "tool.discarded"] == [
        "response_ended"
    ]


def test_on_an_engine_that_waits_for_outputs_the_calls_of_a_cut_reply_are_answered_before_it_speaks() -> None:
    """The vowel engine waits for the output of every call it announced, with no timeout: a call discarded
    with its reply gets an error saying it did not run, before the create that asks the model again."""
    m = live(engine=True)
    m.receive({"type": "response.created", "response": {"id": "resp_1"}})
    call = {
        "type": "function_call",
        "status": "completed",
        "call_id": "c1",
        "name": "issue_refund",
        "arguments": "{}",
    }
    m.receive({"type": "response.output_item.added", "response_id": "resp_1", "item": call})
    m.correct("no promises", "resp_1")
    done = m.receive(
        {"type": "response.done", "response": {"id": "resp_1", "status": "cancelled", "output": []}}
    )
    discarded = [a.fields for a in done if isinstance(a, Notice) and a.event == "tool.discarded"]
    assert [(d["tool_call_id"], d["reason"]) for d in discarded] == [("c1", "reply_stopped")]
    first, create = sent(done)
    assert first["item"]["type"] == "function_call_output" and first["item"]["call_id"] == "c1"
    assert json.loads(first["item"]["output"])["error"] == "reply_stopped"
    assert create["type"] == "response.create"  # the answer within the rules, after the output
    # A reply cut off otherwise (code interrupted it): its call is answered too, and nothing more is asked.
    m.receive({"type": "response.created", "response": {"id": "resp_2"}})
    m.receive(
        {"type": "response.output_item.added", "response_id": "resp_2", "item": {**call, "call_id": "c2"}}
    )
    m.interrupt()
    done = m.receive(
        {"type": "response.done", "response": {"id": "resp_2", "status": "cancelled", "output": []}}
    )
    (output,) = sent(done)
    assert output["item"]["call_id"] == "c2"
    assert json.loads(output["item"]["output"])["error"] == "not_run"


async def test_an_engine_tool_turn_stopped_in_time_answers_its_calls_and_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The verdict on an engine's preamble comes once its call was announced, before its response ended:
    the response ends cancelled, and the call still gets its output (the engine would wait for it
    forever), before the create that has the model answer again within the rules."""
    app = Sideband(instructions="You are the order desk.")
    ran: list[str] = []

    @app.guardrail
    async def moderation(ctx: CallContext, text: str) -> str | None:
        if "guarantee" not in text:
            return None
        await vowel.wait_for(lambda v: bool(v.sessions[0].sent_of_type("response.output_item.added")[1:]))
        return "never promise a refund"

    @app.tool
    async def lookup_order(order_id: str) -> str:
        """Look up an order."""
        ran.append(order_id)
        return "shipped"

    finish = VowelSimulator._finish

    async def ends_once_cancelled(self: VowelSimulator, session: Any, response: Any, *args: Any) -> None:
        if response.call_ids:  # the tool turn's end waits for the client's cancel, which ends it first
            await self.wait_for(lambda v: bool(session.received_of_type("response.cancel")))
        await finish(self, session, response, *args)

    monkeypatch.setattr(VowelSimulator, "_finish", ends_once_cancelled)
    async with VowelSimulator() as vowel:
        rule = when("refund", preamble="I guarantee it.", calls=[("lookup_order", {"order_id": "1"})])
        vowel.script([rule])
        settings = load_settings({**vowel.settings_values(), "max_idle_duration": 30.0}, environ={})
        async with EngineSession.open(settings, app, reply_timeout=5) as session:
            reply = await session.say("A refund, please")
        engine = vowel.sessions[0]
    assert reply.text == "Okay." and [(t.name, t.outcome) for t in reply.tools] == [
        ("lookup_order", "stopped")
    ]
    assert ran == []
    stopped, answer = engine.responses
    assert stopped.status == "cancelled" and answer.status == "completed"
    (call_id,) = stopped.call_ids
    assert json.loads(engine.outputs[call_id][0])["error"] == "reply_stopped"
    kinds = [
        e["type"] if e["type"] != "conversation.item.create" else e["item"]["type"] for e in engine.received
    ]
    assert kinds[-2:] == ["function_call_output", "response.create"]  # the output first
    assert engine.notes == []


async def test_the_tool_calls_of_a_reply_stopped_in_time_are_recorded_as_stopped() -> None:
    app, _ = guarded_app()
    ran: list[str] = []
    seen: list[tuple[str, str]] = []

    @app.tool
    async def issue_refund(ctx: CallContext) -> str:
        """Refund the order."""
        ran.append("refund")
        return "refunded"

    app.on_tool(lambda ctx, record: seen.append((record.name, record.outcome)))
    # (events a little apart: the reply is still streaming when the guardrail stops it)
    async with Simulator(event_gap=0.01) as sim, run_app(app, sim) as h:
        with capture_logs() as logs:
            call = await h.call(refund_asked(step_timeout=10))
            summary = await h.ended(call)
    stopped = call.responses[1]
    assert stopped.status == "cancelled"
    assert ran == []
    assert [(t.name, t.outcome) for t in summary.tools] == [("issue_refund", "stopped")]
    assert seen == [("issue_refund", "stopped")]
    assert [(e["tool"], e["reason"]) for e in logs if e["event"] == "tool.discarded"] == [
        ("issue_refund", "reply_stopped")
    ]
    # Its call ended with its response: no output for it, and the model answers the note.
    assert call.output_for(stopped.call_ids[0]) is None
    assert call.responses[-1].text == "A colleague decides on refunds."


async def test_the_tool_calls_of_a_stopped_reply_are_not_run() -> None:
    app = Sideband(instructions="You are the order desk.", greeting="Greet the caller.")
    ran: list[str] = []

    @app.guardrail
    async def moderation(ctx: CallContext, text: str) -> str | None:
        if "guarantee" not in text:
            return None
        (call,) = h.sim.calls.values()  # a slow check: the reply and its call are in, its response over
        await call.wait_for(lambda c: len(c.sent_of_type("response.done")) == 2, timeout=5)
        return "no promises"

    @app.tool
    async def issue_refund(ctx: CallContext) -> str:
        """Refund the order."""
        ran.append("refund")
        return "refunded"

    async with run_app(app) as h:
        call = await h.call(refund_asked())
        summary = await h.ended(call)
    assert ran == []
    assert [(t.name, t.outcome) for t in summary.tools] == [("issue_refund", "stopped")]
    output = call.output_for(call.responses[1].call_ids[0])
    assert output is not None and json.loads(output)["error"] == "reply_stopped"
    creates = [e for e in call.received if e["type"] == "response.create"]
    assert len(creates) == 2  # the greeting, then one answer for the note and the output together
    assert call.responses[-1].text == "A colleague decides on refunds."


async def test_a_stop_that_comes_after_the_next_reply_began_leaves_that_reply_alone() -> None:
    app = Sideband(instructions="You are the order desk.", greeting="Greet the caller.")
    calls: list[Any] = []
    placed = asyncio.Event()

    @app.guardrail
    async def moderation(ctx: CallContext, text: str) -> str | None:
        if "guarantee" not in text:
            return None
        await placed.wait()
        await calls[0].wait_for(lambda c: len(c.responses) >= 3, 5.0, "the next reply")
        return "no promises"

    async with Simulator(playback_rate=40) as sim, run_app(app, sim) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Hi."),
                    caller_says("Refund?"),
                    model_says(PROMISE),
                    caller_says("Hello?", cut_in=True),
                    model_says("Sorry, where were we? " * 8),
                    caller_hangs_up(),
                ]
            )
        )
        calls.append(call)
        placed.set()
        summary = await h.ended(call)
    promise, following = call.responses[1], call.responses[2]
    assert following.status == "completed"
    cancels = [e.get("response_id") for e in call.received if e["type"] == "response.cancel"]
    assert following.response_id not in cancels
    assert [c["response_id"] for c in call.sent_of_type("output_audio_buffer.cleared")] == [
        promise.response_id
    ]
    notes = [
        e for e in call.received if e["type"] == "conversation.item.create" and e["item"]["role"] == "system"
    ]
    assert len(notes) == 1  # the model is told
    assert [
        r.request for r in call.responses[3:]
    ] == []  # and not asked to answer again: the reply that follows does
    assert summary.guardrails == (("moderation", "no promises"),)
    assert [summary.transcript[i] for i in summary.stopped] == [("agent", PROMISE)]


async def test_the_tool_calls_of_a_stopped_reply_are_not_run_when_the_next_reply_is_stopped_too() -> None:
    """A slow check of a reply that called a tool (held until it is known) ends after the caller cut in
    and the next reply's words came: both replies are stopped, and the first one's call is not run."""
    app = Sideband(instructions="You are the order desk.", greeting="Greet the caller.")
    ran: list[str] = []
    calls: list[Any] = []
    placed = asyncio.Event()

    @app.guardrail
    async def moderation(ctx: CallContext, text: str) -> str | None:
        if "guarantee" not in text.lower():
            return None
        if text.startswith("Of course"):  # the first reply: checked until the next one's words wait
            await placed.wait()
            (call,) = calls
            await call.wait_for(lambda c: len(c.responses) >= 3, 5.0, "the next reply")
            checks = h.service.registry.calls[ctx.call_id]._guard
            following = call.responses[2].response_id
            async with asyncio.timeout(5):
                while not checks.checking(following):  # (its first word says it already)
                    await asyncio.sleep(0.001)
        return "no promises"

    @app.tool
    async def issue_refund(ctx: CallContext) -> str:
        """Refund the order."""
        ran.append("refund")
        return "refunded"

    async with Simulator(playback_rate=40) as sim, run_app(app, sim) as h:
        with capture_logs() as logs:
            call = await h.call(
                Script(
                    [
                        wait_for_greeting("Hi."),
                        caller_says("Refund?"),
                        model_calls("issue_refund", {}, preamble=PROMISE, await_outputs=False),
                        caller_says("Hello?", cut_in=True),
                        model_says("Guaranteed, you get it all back, trust me on that one. " * 3),
                        model_answers("A colleague decides on refunds."),
                        caller_hangs_up(),
                    ]
                )
            )
            calls.append(call)
            placed.set()
            summary = await h.ended(call)
    first, following = call.responses[1], call.responses[2]
    assert ran == []
    assert [(t.name, t.outcome) for t in summary.tools] == [("issue_refund", "stopped")]
    output = call.output_for(first.call_ids[0])
    assert output is not None and json.loads(output)["error"] == "reply_stopped"
    tripped = [e["response_id"] for e in logs if e["event"] == "guardrail.tripped"]
    assert tripped == [first.response_id, following.response_id]
    assert summary.guardrails == (("moderation", "no promises"),) * 2


async def test_an_engine_turn_whose_replies_keep_breaking_the_rule_comes_back_empty() -> None:
    app, _ = guarded_app()
    async with VowelSimulator(event_delay=0.02) as vowel:
        vowel.script([when("refund", reply="I guarantee a full refund, today, for sure.")])
        settings = load_settings({**vowel.settings_values(), "max_idle_duration": 30.0}, environ={})
        with capture_logs() as logs:
            async with EngineSession.open(settings, app) as session:
                reply = await session.say("Can I get a refund?", timeout=8)
                assert session.live
        engine = vowel.sessions[0]
    assert reply.text == "" and reply.lines == ()
    assert [r.status for r in engine.responses] == ["cancelled"] * (CORRECTIONS + 1)
    assert [e["stopped"] for e in logs if e["event"] == "guardrail.silenced"] == [CORRECTIONS + 1]


@pytest.mark.parametrize("until", ["hangup_out", "call_closed"])
async def test_a_verdict_that_comes_once_the_call_is_ending_is_recorded(until: str) -> None:
    """A slow check of the model's last words answers after the hangup went out (or the call closed): too
    late to stop anything, and nothing is sent; the verdict is logged, counted and in the summary."""
    app = Sideband(instructions="You are the order desk.", greeting="Greet the caller.")
    runtimes: list[CallRuntime] = []

    @app.guardrail
    async def moderation(ctx: CallContext, text: str) -> str | None:
        if "guarantee" not in text:
            return None
        (call,) = h.sim.calls.values()
        runtimes.append(h.service.registry.calls[ctx.call_id])
        await call.wait_for(lambda c: c.hangup_requested, timeout=5)  # the caller is being hung up
        if until == "call_closed":
            machine = runtimes[0].machine
            async with asyncio.timeout(5):
                while machine.closed is None:  # until the call's end has begun
                    await asyncio.sleep(0.001)
        return "no promises"

    @app.on_dtmf
    def leave(ctx: CallContext, digit: str) -> None:
        ctx.hangup("caller_left")

    async with run_app(app) as h:
        with capture_logs() as logs:
            call = await h.call(
                Script(
                    [
                        wait_for_greeting("Hi."),
                        caller_says("Refund?"),
                        model_says(PROMISE),
                        caller_presses("9"),
                    ]
                )
            )
            summary = await h.ended(call)
        trips = dict(h.service.registry.guardrail_trips)
    tripped = [e for e in logs if e["event"] == "guardrail.tripped"]
    assert [(e["guardrail"], e["reason"], e["stopped"], e["log_level"]) for e in tripped] == [
        ("moderation", "no promises", False, "warning")
    ]
    assert tripped[0]["response_id"] == call.responses[1].response_id
    assert trips == {"moderation": 1}
    assert summary.reason == "caller_left"
    assert summary.late_guardrails == (("moderation", "no promises"),)
    assert summary.guardrails == () and summary.stopped == ()  # nothing was stopped
    assert runtimes[0].stopped_reply is None  # (an engine turn would read that reply as stopped)
    # Nothing was sent for it: no cancel, no note to the model.
    assert not [e for e in call.received if e["type"] in ("response.cancel", "conversation.item.create")]
    assert not [e for e in logs if e["event"] in ("guardrail.trip_failed", "guardrail.cancelled")]


async def test_the_checks_left_when_the_call_ends_get_their_time_and_no_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At the call's end the words fed so far are still checked, for one check's time: then what is left
    is cancelled (``guardrail.cancelled``), and the call's end goes on."""
    monkeypatch.setattr(guard, "CHECK_TIMEOUT", 0.3)
    first, ending = asyncio.Event(), asyncio.Event()
    checked: list[str] = []

    async def moderation(ctx: CallContext, text: str) -> str | None:
        checked.append(text)
        if len(checked) == 1:
            first.set()
            await ending.wait()  # answers as the call's end begins: the later words are checked next
            return None
        await asyncio.Event().wait()  # a moderation service that stopped answering
        return None

    async def connect() -> Any:
        raise AssertionError("not attached")

    runtime = CallRuntime(
        machine=CallMachine(MachineConfig(session=SESSION)),
        ctx=CallContext("rtc_end"),
        tools=ToolRegistry(),
        connect=connect,
        hooks=CallHooks(guardrails=[moderation]),
    )

    def said(delta: str) -> None:
        runtime._handle(
            json.dumps(
                {
                    "type": "response.output_audio_transcript.delta",
                    "response_id": "resp_1",
                    "item_id": "item_1",
                    "content_index": 0,
                    "delta": delta,
                }
            ).encode()
        )

    said("I guarantee")
    await asyncio.wait_for(first.wait(), 5)
    said(" a refund.")  # (waits its turn)

    async def end() -> None:
        ending.set()
        await runtime._cleanup()  # (its grace for the checks starts before the first check answers)

    with capture_logs() as logs:
        await asyncio.wait_for(end(), 5)
    assert checked == ["I guarantee", "I guarantee a refund."]
    cancelled = [e for e in logs if e["event"] == "guardrail.cancelled"]
    assert [(e["grace_s"], e["log_level"]) for e in cancelled] == [(0.3, "warning")]
    assert not [e for e in logs if e["event"] in ("guardrail.failed", "call.tasks_abandoned")]
    assert not runtime._guard.checking(None)  # type: ignore[union-attr]


def test_a_reply_objected_to_too_late_to_stop_has_no_stopped_lines() -> None:
    """Once the call is ending the driver stops nothing (its trip answers ``False``): the reply's words are
    checked no further, but its lines are no stopped ones."""
    verdicts: list[tuple[str, str, str | None]] = []

    def no_promises(ctx: CallContext, text: str) -> str | None:
        return "no promises" if "guarantee" in text else None

    def trip(guardrail: str, reason: str, response_id: str | None) -> bool:
        verdicts.append((guardrail, reason, response_id))
        return False  # the call's hangup is out

    checks = guard.OutputGuard(
        [no_promises], CallContext("rtc_x"), trip, structlog.get_logger(), lambda e: {}
    )
    for delta in ("I guarantee", " a refund."):
        checks.feed(
            {
                "type": "response.output_audio_transcript.delta",
                "response_id": "resp_1",
                "item_id": "item_1",
                "content_index": 0,
                "delta": delta,
            }
        )
    assert verdicts == [("no_promises", "no promises", "resp_1")]  # once
    assert checks.objected("resp_1") and checks.stopped is None
    assert checks.line(1, "resp_1") is False and checks.lines_of("resp_1") == []


def test_a_stop_that_fails_is_logged_with_where_it_failed() -> None:
    """Stopping a tripped reply raised (a bug of ours): ``guardrail.trip_failed`` has the guardrail, the
    error and its stack, as a guardrail's own failure has; the next words are checked."""
    verdicts: list[str | None] = []

    def no_promises(ctx: CallContext, text: str) -> str | None:
        return "no promises" if "guarantee" in text else None

    def trip(guardrail: str, reason: str, response_id: str | None) -> bool:
        verdicts.append(response_id)
        raise RuntimeError("the call's state is off")

    def failure(exc: BaseException) -> dict[str, Any]:
        return failure_fields(exc, message=False, full=False)

    checks = guard.OutputGuard([no_promises], CallContext("rtc_x"), trip, structlog.get_logger(), failure)
    with capture_logs() as logs:
        for response_id in ("resp_1", "resp_2"):
            checks.feed(
                {
                    "type": "response.output_audio_transcript.delta",
                    "response_id": response_id,
                    "item_id": "item_1",
                    "content_index": 0,
                    "delta": "I guarantee",
                }
            )
    assert verdicts == ["resp_1", "resp_2"]
    failed = [e for e in logs if e["event"] == "guardrail.trip_failed"]
    assert [(e["guardrail"], e["error"], e["log_level"]) for e in failed] == [
        ("no_promises", "RuntimeError", "error")
    ] * 2
    assert all("in trip" in e["stack"] and "exc_info" not in e for e in failed)


async def test_order_desk_lets_a_reply_that_refuses_a_refund_be_heard() -> None:
    """The bundled order desk's rule is to promise no refund: a reply saying it cannot promise one, and
    offering billing, is heard whole, not stopped and asked again."""
    from sideband.examples.order_desk import app as order_desk

    refusal = "I can't promise a refund, but I can transfer you to billing, who decide refunds."
    async with Simulator(event_gap=0.02) as sim, run_app(order_desk, sim) as h:
        with capture_logs() as logs:
            call = await h.call(
                Script(
                    [
                        wait_for_greeting("Example Corp order desk."),
                        caller_says("Can I have my money back for order 1042?"),
                        model_says(refusal),
                        caller_hangs_up(),
                    ]
                )
            )
            summary = await h.ended(call)
    assert call.script_error is None
    assert not [e for e in logs if e["event"] == "guardrail.tripped"]
    assert summary.guardrails == ()
    assert [r.status for r in call.responses] == ["completed", "completed"]
    assert ("model", refusal) in call.transcript


async def test_a_plain_guardrail_that_blocks_the_loop_is_told_what_to_do_about_it() -> None:
    """A plain guardrail runs on the event loop (not in a thread, as a plain tool or hook does): the
    ``loop.blocked`` line names it and tells to keep it quick or make it ``async def``."""
    app = Sideband(instructions="Be brief.")

    @app.guardrail
    def slow_rule(ctx: CallContext, text: str) -> None:
        deadline = time.perf_counter() + 0.15
        while time.perf_counter() < deadline:  # (busy: what a blocking call does to the loop)
            pass

    async with Simulator() as sim, run_app(app, sim) as h:
        with capture_logs() as logs:
            call = await h.call(
                Script(
                    [wait_for_greeting("Hi."), caller_says("Hello"), model_says("Hello."), caller_hangs_up()]
                )
            )
            await h.ended(call)
    blocked = [e for e in logs if e["event"] == "loop.blocked"]
    assert blocked and {e["guardrail"] for e in blocked} == {"slow_rule"}
    assert len(blocked) == len(call.responses) == 2  # once a reply, not at each of its deltas
    assert all("make it async def" in e["detail"] and "plain def" not in e["detail"] for e in blocked)
