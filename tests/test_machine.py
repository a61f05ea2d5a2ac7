"""The sans-I/O call state machine: events in, actions out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sideband.runtime.machine import (
    DEFAULT_FILLER,
    DEFAULT_GOODBYE,
    DEFAULT_STILL_THERE,
    OUTPUT_RESENDS,
    TURN_GRACE,
    Action,
    CallMachine,
    CancelTimer,
    CancelTool,
    Capabilities,
    Close,
    MachineConfig,
    Notice,
    RunTool,
    Send,
    StartTimer,
    TimerBy,
    Verb,
    Withdraw,
)
from sideband.vowel.session import ENGINE_CAPABILITIES

from .conftest import untagged

SESSION = {"type": "realtime", "instructions": "hi"}


def machine(**kw: Any) -> CallMachine:
    caps = kw.pop("caps", None)
    return CallMachine(MachineConfig(session=SESSION, **kw), caps)


def sends(actions: list[Action]) -> list[dict[str, Any]]:
    """The events sent, each ``response.create`` without its tag (checked)."""
    return [untagged(a.event) for a in actions if isinstance(a, Send)]


def types(actions: list[Action]) -> list[str]:
    return [e["type"] for e in sends(actions)]


def notices(actions: list[Action], name: str) -> list[dict[str, Any]]:
    return [a.fields for a in actions if isinstance(a, Notice) and a.event == name]


def call_events(call_id: str, name: str, args: str, resp: str = "resp_1") -> list[dict[str, Any]]:
    item = {
        "id": "item_" + call_id,
        "type": "function_call",
        "status": "in_progress",
        "name": name,
        "call_id": call_id,
        "arguments": "",
    }
    done_item = {**item, "status": "completed", "arguments": args}
    return [
        {"type": "response.output_item.added", "response_id": resp, "output_index": 1, "item": item},
        {
            "type": "response.function_call_arguments.done",
            "response_id": resp,
            "call_id": call_id,
            "name": name,
            "arguments": args,
        },
        {"type": "response.output_item.done", "response_id": resp, "output_index": 1, "item": done_item},
    ]


def response_done(
    resp: str = "resp_1", status: str = "completed", output: list[Any] | None = None
) -> dict[str, Any]:
    return {"type": "response.done", "response": {"id": resp, "status": status, "output": output or []}}


def feed(m: CallMachine, events: list[dict[str, Any]]) -> list[Action]:
    out: list[Action] = []
    for e in events:
        out += m.receive(e)
    return out


def test_start_sends_session_update_then_one_greeting() -> None:
    m = machine(greeting="Say hello", max_call_duration=60, max_idle_duration=30)
    actions = m.start()
    assert types(actions) == ["session.update", "response.create"]
    assert sends(actions)[0]["session"] == SESSION
    assert sends(actions)[1]["response"] == {"instructions": "Say hello"}
    assert StartTimer("max_duration", 60) in actions and StartTimer("idle", 30) in actions
    # A re-attach sends the session again but never a second greeting.
    assert types(m.reattached()) == ["session.update"]


def test_tool_runs_once_after_response_done_and_create_follows_output() -> None:
    m = machine()
    m.start()
    assert feed(m, [{"type": "response.created", "response": {"id": "resp_1"}}]) == []
    assert feed(m, call_events("call_1", "lookup", '{"id": 1}')) == []
    actions = m.receive(
        response_done(
            output=[
                {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": '{"id": 1}'}
            ]
        )
    )
    assert [a for a in actions if isinstance(a, RunTool)] == [RunTool("call_1", "lookup", '{"id": 1}')]
    # The same call surfacing again never runs twice.
    assert not any(isinstance(a, RunTool) for a in m.receive(response_done()))
    assert not any(isinstance(a, RunTool) for a in feed(m, call_events("call_1", "lookup", '{"id": 1}')))
    done = m.tool_done("call_1", '{"ok":true}')
    assert types(done) == ["conversation.item.create", "response.create"]
    assert sends(done)[0]["item"] == {
        "type": "function_call_output",
        "call_id": "call_1",
        "output": '{"ok":true}',
    }
    assert m.tool_done("call_1", "again") == []


def test_parallel_calls_get_one_response_create_after_all_outputs() -> None:
    m = machine()
    m.start()
    m.receive({"type": "response.created", "response": {"id": "resp_1"}})
    feed(m, call_events("call_a", "a", "{}") + call_events("call_b", "b", "{}"))
    runs = [a for a in m.receive(response_done()) if isinstance(a, RunTool)]
    assert [r.call_id for r in runs] == ["call_a", "call_b"]
    assert types(m.tool_done("call_b", "B")) == ["conversation.item.create"]
    assert types(m.tool_done("call_a", "A")) == ["conversation.item.create", "response.create"]


def test_cancelled_response_discards_its_calls() -> None:
    m = machine()
    m.start()
    feed(m, call_events("call_1", "transfer", "{}"))
    actions = m.receive(response_done(status="cancelled"))
    assert not any(isinstance(a, RunTool) for a in actions)
    assert notices(actions, "tool.discarded")[0]["tool_call_id"] == "call_1"
    assert m.tool_done("call_1", "late") == []


def test_engine_style_complete_call_in_output_item_added() -> None:
    m = machine(caps=Capabilities(session_created_first=True, call_verbs=False, audio_playback_events=False))
    assert m.start() == []
    assert types(m.receive({"type": "session.created", "session": {"id": "sess_1"}})) == ["session.update"]
    item = {
        "id": "item_1",
        "type": "function_call",
        "status": "completed",
        "name": "lookupOrder",
        "call_id": "call_9",
        "arguments": '{"orderId":"1"}',
    }
    assert m.receive({"type": "response.output_item.added", "response_id": "resp_9", "item": item}) == []
    actions = m.receive(response_done("resp_9", status="incomplete"))
    assert [a for a in actions if isinstance(a, RunTool)] == [
        RunTool("call_9", "lookupOrder", '{"orderId":"1"}')
    ]


def engine_machine() -> CallMachine:
    m = machine(caps=ENGINE_CAPABILITIES)
    m.start()
    m.receive({"type": "session.created", "session": {"id": "sess_1"}})
    return m


def engine_call(call_id: str, resp: str, arguments: Any = '{"orderId":"1"}') -> dict[str, Any]:
    item = {"type": "function_call", "status": "completed", "name": "lookupOrder", "call_id": call_id}
    if arguments is not ...:
        item["arguments"] = arguments
    return {"type": "response.output_item.added", "response_id": resp, "item": item}


def test_arguments_forwarded_as_an_object_are_run_and_missing_ones_answered() -> None:
    """The engine forwards arguments as the model wrote them: an object is taken as its JSON text, and a
    finished call without any gets an output all the same (the engine waits for one with no timeout)."""
    m = engine_machine()
    m.receive(engine_call("call_obj", "resp_1", {"orderId": "1"}))
    m.receive(engine_call("call_none", "resp_1", ...))
    runs = [a for a in m.receive(response_done("resp_1")) if isinstance(a, RunTool)]
    assert runs == [
        RunTool("call_obj", "lookupOrder", '{"orderId": "1"}'),
        RunTool("call_none", "lookupOrder", "null"),  # refused by validation: invalid_arguments
    ]


@pytest.mark.parametrize("caps, runs_again", [(ENGINE_CAPABILITIES, True), (Capabilities(), False)])
def test_a_call_id_back_in_a_later_response(caps: Capabilities, runs_again: bool) -> None:
    """An engine passing on ids the model made up reuses them: a later response's call_1 is a new call,
    which the engine waits on. OpenAI's ids are unique: one seen before is never run twice."""
    m = machine(caps=caps)
    m.start()
    if caps.session_created_first:
        m.receive({"type": "session.created", "session": {"id": "sess_1"}})
    m.receive(engine_call("call_1", "resp_1"))
    assert [a.call_id for a in m.receive(response_done("resp_1")) if isinstance(a, RunTool)] == ["call_1"]
    m.tool_done("call_1", '{"ok":true}')
    m.receive(
        {"type": "conversation.item.added", "item": {"type": "function_call_output", "call_id": "call_1"}}
    )
    m.receive(engine_call("call_1", "resp_2"))
    again = [a.call_id for a in m.receive(response_done("resp_2")) if isinstance(a, RunTool)]
    assert again == (["call_1"] if runs_again else [])


@pytest.mark.parametrize("preamble", ["I'll note that.", None])
def test_a_quiet_call_of_an_engine_tool_turn_is_quiet_after_its_preamble(preamble: str | None) -> None:
    """The engine's tool turn ends incomplete with output [] whatever was said: the preamble's words come
    only in its response.text.done. Its line makes a quiet tool's success need no answer; with no
    words, the model is asked to answer (never silence)."""
    m = machine(caps=ENGINE_CAPABILITIES, quiet=frozenset({"lookupOrder"}))
    m.start()
    m.receive({"type": "session.created", "session": {"id": "sess_1"}})
    m.receive({"type": "session.updated", "session": {}})
    m.user_text("note that I prefer email")
    m.receive({"type": "response.created", "response": {"id": "resp_1"}})
    m.receive(engine_call("call_1", "resp_1"))
    if preamble:
        part = {"response_id": "resp_1", "item_id": "item_1", "output_index": 0, "content_index": 0}
        m.receive({"type": "response.text.done", **part, "text": preamble})
    done = m.receive(response_done("resp_1", status="incomplete", output=[]))
    assert [a.call_id for a in done if isinstance(a, RunTool)] == ["call_1"]
    answered = types(m.tool_done("call_1", '{"ok":true}', ok=True))
    assert answered == ["conversation.item.create"] + ([] if preamble else ["response.create"])
    assert m.response_owed == (preamble is None)


def test_an_engine_reply_replaced_by_another_ends_alone() -> None:
    """The engine cuts a reply under way for a new one (user text while it speaks), and starts that one
    before the cut one's response.done (cancelled, output []): that done ends the cut reply alone (its
    call is not run, and answered as not run), not the response under way. What waits for the line
    (a say()) waits for the new reply's end, and the new reply's line and end are its own."""
    m = engine_machine()
    m.receive({"type": "session.updated", "session": {}})
    m.user_text("tell me a story")
    m.receive({"type": "response.created", "response": {"id": "resp_1"}})
    m.receive(engine_call("call_1", "resp_1"))
    m.user_text("also this")  # the engine answers it, cutting resp_1
    assert m.say("and a note") == []  # (queued while a response runs)
    m.receive({"type": "response.created", "response": {"id": "resp_2"}})
    cut = response_done("resp_1", status="cancelled")
    cut["response"]["status_details"] = {"type": "cancelled", "reason": "client_cancelled"}
    done = m.receive(cut)
    assert not [a for a in done if isinstance(a, RunTool)]
    assert [n["tool_call_id"] for n in notices(done, "tool.discarded")] == ["call_1"]
    sent = [(e["type"], e.get("item", {}).get("call_id")) for e in sends(done)]
    assert sent == [("conversation.item.create", "call_1")]  # (its output: it did not run; no create)
    assert notices(done, "response.done") == [
        {"response_id": "resp_1", "status": "cancelled", "tools_running": 0}
    ]
    assert m.responding == "resp_2" and m.response_owed
    part = {"response_id": "resp_2", "item_id": "item_2", "output_index": 0, "content_index": 0}
    line = m.receive({"type": "response.text.done", **part, "text": "Noted."})
    assert notices(line, "transcript") == [{"role": "agent", "text": "Noted.", "response_id": "resp_2"}]
    end = m.receive(response_done("resp_2"))
    assert notices(end, "response.done") == [
        {"response_id": "resp_2", "status": "completed", "tools_running": 0}
    ]
    assert m.responding is None
    assert [(e["type"], e.get("response")) for e in sends(end)] == [
        ("response.create", {"instructions": "and a note"})
    ]


def test_a_reused_call_id_is_a_new_call_only_once_its_output_was_acknowledged() -> None:
    """Until the server acknowledged our output for a call id, that id in a later response is the call
    already answered, not a new one to run."""
    m = machine(caps=Capabilities(reused_call_ids=True))
    m.start()
    m.receive(engine_call("call_1", "resp_1"))
    assert [a.call_id for a in m.receive(response_done("resp_1")) if isinstance(a, RunTool)] == ["call_1"]
    m.tool_done("call_1", '{"ok":true}')  # not acknowledged yet
    m.receive(engine_call("call_1", "resp_2"))
    assert not [a for a in m.receive(response_done("resp_2")) if isinstance(a, RunTool)]
    m.receive(ack("call_1"))
    m.receive(engine_call("call_1", "resp_3"))
    assert [a.call_id for a in m.receive(response_done("resp_3")) if isinstance(a, RunTool)] == ["call_1"]


def test_a_call_announced_without_its_response_id_runs_at_the_next_response_done() -> None:
    m = engine_machine()
    item = {"type": "function_call", "status": "completed", "name": "lookupOrder", "call_id": "call_1"}
    m.receive({"type": "response.output_item.added", "item": {**item, "arguments": '{"orderId":"1"}'}})
    runs = [a for a in m.receive(response_done("resp_1")) if isinstance(a, RunTool)]
    assert runs == [RunTool("call_1", "lookupOrder", '{"orderId":"1"}')]


def test_output_while_response_active_waits_for_response_done() -> None:
    m = machine(filler_after={"slow": 1.5})
    m.start()
    m.receive({"type": "response.created", "response": {"id": "resp_g"}})
    m.receive(response_done("resp_g"))  # greeting done
    m.receive({"type": "response.created", "response": {"id": "resp_1"}})
    feed(m, call_events("call_1", "slow", "{}"))
    actions = m.receive(response_done())
    assert StartTimer("filler:call_1", 1.5) in actions
    filler = m.timer("filler:call_1")
    assert types(filler) == ["response.create"]
    assert sends(filler)[0]["response"]["tool_choice"] == "none"
    # The filler response is active when the tool finishes: output now, response.create only after done.
    m.receive({"type": "response.created", "response": {"id": "resp_f"}})
    done = m.tool_done("call_1", "{}")
    assert CancelTimer("filler:call_1") in done
    assert types(done) == ["conversation.item.create"]
    assert types(m.receive(response_done("resp_f"))) == ["response.create"]


def test_filler_not_sent_while_response_active() -> None:
    m = machine(filler_after={"slow": 1.0})
    m.start()  # greeting response.create in flight
    feed(m, call_events("call_1", "slow", "{}", resp="resp_x"))
    m.receive({"type": "response.created", "response": {"id": "resp_x"}})
    m.receive(response_done("resp_x"))
    m.receive({"type": "response.created", "response": {"id": "resp_y"}})
    assert m.timer("filler:call_1") == []
    # Silence counts from the end of that response: the filler is timed again from there.
    assert StartTimer("filler:call_1", 1.0) in m.receive(response_done("resp_y"))
    assert types(m.timer("filler:call_1")) == ["response.create"]


def output_ack(call_id: str) -> dict[str, Any]:
    """The server's acknowledgement of our output for ``call_id``."""
    item = {"type": "function_call_output", "call_id": call_id, "output": "{}"}
    return {"type": "conversation.item.done", "item": item}


SPEECH_STARTED = {"type": "input_audio_buffer.speech_started", "item_id": "item_u"}
SPEECH_STOPPED = {"type": "input_audio_buffer.speech_stopped", "item_id": "item_u"}


def live_machine(**kw: Any) -> CallMachine:
    """A machine past its greeting, its session confirmed."""
    m = machine(**kw)
    m.start()
    m.receive({"type": "session.updated", "session": SESSION})
    m.receive({"type": "response.created", "response": {"id": "r_greet"}})
    m.receive(response_done("r_greet"))
    return m


def test_filler_is_timed_from_the_end_of_the_models_audio() -> None:
    m = live_machine(filler_after={"slow": 1.5})
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    m.receive({"type": "output_audio_buffer.started", "response_id": "r1"})  # a spoken preamble
    feed(m, call_events("c1", "slow", "{}", resp="r1"))
    assert StartTimer("filler:c1", 1.5) in m.receive(response_done("r1"))
    assert m.timer("filler:c1") == []  # the preamble still plays: no holding phrase behind it
    stopped = m.receive({"type": "output_audio_buffer.stopped", "response_id": "r1"})
    assert StartTimer("filler:c1", 1.5) in stopped and types(stopped) == []
    assert types(m.timer("filler:c1")) == ["response.create"]
    assert m.timer("filler:c1") == []  # one filler per wait


def test_filler_waits_for_a_caller_who_is_speaking() -> None:
    m = live_machine(filler_after={"slow": 1.5})
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "slow", "{}", resp="r1"))
    m.receive(response_done("r1"))
    m.receive(SPEECH_STARTED)
    assert m.timer("filler:c1") == []
    stopped = m.receive(SPEECH_STOPPED)
    assert StartTimer("turn", 1.0) in stopped and types(stopped) == []
    m.receive({"type": "response.created", "response": {"id": "r2"}})  # the server answers the caller
    answered = m.receive(response_done("r2"))
    assert StartTimer("filler:c1", 1.5) in answered and types(answered) == []
    # The tool answers first: the filler it no longer needs never goes.
    done = m.tool_done("c1", "{}")
    assert types(done) == ["conversation.item.create", "response.create"]
    assert m.timer("filler:c1") == []


def test_nothing_of_ours_starts_while_the_caller_speaks() -> None:
    m = live_machine()
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "lookup", "{}", resp="r1"))
    m.receive(response_done("r1"))
    started = m.receive(SPEECH_STARTED)
    assert StartTimer("speaking", 15.0) in started
    # The tool's output goes in at once; the response that speaks it waits for the caller to finish.
    assert types(m.tool_done("c1", "{}")) == ["conversation.item.create"]
    m.receive(output_ack("c1"))
    assert types(m.say("Mention the sale.")) == []
    stopped = m.receive(SPEECH_STOPPED)
    assert CancelTimer("speaking") in stopped
    # Server VAD answers the caller's turn by itself, and that answer sees the output: no create of ours.
    assert StartTimer("turn", 1.0) in stopped and types(stopped) == []
    assert m.receive({"type": "response.created", "response": {"id": "r2"}}) == [CancelTimer("turn")]
    after = m.receive(response_done("r2"))
    assert [e["response"]["instructions"] for e in sends(after)] == ["Mention the sale."]
    m.receive({"type": "response.created", "response": {"id": "r3"}})
    assert types(m.receive(response_done("r3"))) == []  # the model spoke the output once


def test_outputs_the_turn_answer_may_not_have_seen_are_answered_after_it() -> None:
    m = live_machine()
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "lookup", "{}", resp="r1"))
    m.receive(response_done("r1"))
    m.receive(SPEECH_STARTED)
    m.receive(SPEECH_STOPPED)
    # The tool answers after the caller stopped: the server's answer to the turn began without it.
    assert types(m.tool_done("c1", "{}")) == ["conversation.item.create"]
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    m.receive(output_ack("c1"))  # acknowledged only after that answer had begun
    assert [e.get("response") for e in sends(m.receive(response_done("r2")))] == [None]


def test_a_turn_answer_that_failed_leaves_the_outputs_to_be_answered() -> None:
    m = live_machine(max_tool_calls=1)
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "lookup", "{}", resp="r1"))
    m.receive(response_done("r1"))
    m.receive(SPEECH_STARTED)
    m.tool_done("c1", "{}")
    m.receive(output_ack("c1"))
    m.receive(SPEECH_STOPPED)
    m.receive({"type": "response.created", "response": {"id": "r2"}})  # the turn's answer covers it...
    assert types(m.receive(response_done("r2", "failed"))) == ["response.create"]  # ...until it fails


def failed(resp: str, code: str | None = None, error_type: str = "server_error") -> dict[str, Any]:
    """A ``response.done`` that ended failed, with the reason the server gives."""
    event = response_done(resp, "failed")
    error = {"type": error_type, "code": code, "message": "The server had an error."}
    event["response"]["status_details"] = {"type": "failed", "error": error}
    return event


def test_a_failed_greeting_is_asked_for_again_once_as_it_was() -> None:
    m = machine(greeting="Say hello")
    greeting = sends(m.start())[1]
    m.receive({"type": "session.updated", "session": SESSION})
    m.receive({"type": "response.created", "response": {"id": "r_greet"}})
    actions = m.receive(failed("r_greet"))
    again = sends(actions)
    assert [e["type"] for e in again] == ["response.create"]
    assert again[0]["response"] == greeting["response"] and again[0]["event_id"] != greeting["event_id"]
    assert notices(actions, "response.failed") == [
        {
            "response_id": "r_greet",
            "code": None,
            "error_type": "server_error",
            "message": "The server had an error.",
            "param": None,
            "retry": True,
        }
    ]
    assert m.last_error is not None and m.last_error["error_type"] == "server_error"
    m.receive({"type": "response.created", "response": {"id": "r_again"}})
    actions = m.receive(failed("r_again", "insufficient_quota", "insufficient_quota"))
    assert types(actions) == []  # twice in a row: left to the caller's next words
    assert notices(actions, "response.failed")[0]["retry"] is False
    m.receive({"type": "response.created", "response": {"id": "r_turn"}})
    m.receive(response_done("r_turn"))  # a completed response: the session got past it
    assert m.last_error is None
    m.receive({"type": "response.created", "response": {"id": "r_next"}})
    assert types(m.receive(failed("r_next"))) == ["response.create"]  # a new run of failures


def test_a_failed_answer_to_the_callers_turn_is_asked_for() -> None:
    m = live_machine()
    m.receive(SPEECH_STARTED)
    m.receive(SPEECH_STOPPED)
    m.receive({"type": "response.created", "response": {"id": "r_vad"}})  # the server's own answer
    again = sends(m.receive(failed("r_vad")))
    assert again == [{"type": "response.create", "event_id": again[0]["event_id"]}]


def test_a_failed_say_is_said_again_but_nothing_once_the_call_is_ending() -> None:
    m = live_machine()
    said = sends(m.say("Mention the sale."))
    m.receive({"type": "response.created", "response": {"id": "r_say"}})
    again = sends(m.receive(failed("r_say")))
    assert [e.get("response") for e in again] == [said[0]["response"]]
    m.receive({"type": "response.created", "response": {"id": "r_say2"}})
    m.receive(response_done("r_say2"))
    assert types(m.request_end("idle_timeout", goodbye=True)) == ["response.create"]  # the goodbye
    m.receive({"type": "response.created", "response": {"id": "r_last"}})
    actions = m.receive(failed("r_last"))
    assert "response.create" not in types(actions)  # (the hangup follows; no second goodbye)
    assert notices(actions, "response.failed")[0]["retry"] is False


def test_a_caller_line_that_could_not_be_transcribed_is_reported() -> None:
    m = live_machine()
    m.receive(SPEECH_STARTED)
    m.receive(SPEECH_STOPPED)
    error = {"type": "invalid_request_error", "code": "model_not_found", "message": "No such model."}
    event = {
        "type": "conversation.item.input_audio_transcription.failed",
        "item_id": "item_u",
        "content_index": 0,
        "error": error,
    }
    actions = m.receive(event)
    assert notices(actions, "transcript.failed") == [
        {
            "item_id": "item_u",
            "code": "model_not_found",
            "error_type": "invalid_request_error",
            "message": "No such model.",
        }
    ]
    assert not notices(actions, "transcript")


def test_a_turn_answer_takes_over_a_loop_breakers_no_tools() -> None:
    m = live_machine(max_identical_calls=1)
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "lookup", "{}", resp="r1"))
    feed(m, call_events("c2", "lookup", "{}", resp="r1"))  # the same call again: refused...
    m.receive(SPEECH_STARTED)
    m.receive(response_done("r1"))  # ...once the caller had started speaking
    m.tool_done("c1", "{}")
    m.receive(output_ack("c1"))
    m.receive(output_ack("c2"))
    m.receive(SPEECH_STOPPED)
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    m.receive(response_done("r2"))
    # The model's next tool call is answered with tools on again: "no tools" was owed to a turn gone by.
    m.receive({"type": "response.created", "response": {"id": "r3"}})
    feed(m, call_events("c3", "other", "{}", resp="r3"))
    m.receive(response_done("r3"))
    assert [e.get("response") for e in sends(m.tool_done("c3", "{}")) if e["type"] == "response.create"] == [
        None
    ]


def test_code_text_is_answered_after_a_turn_answer_that_may_not_have_seen_it() -> None:
    m = live_machine()
    m.receive(SPEECH_STARTED)
    assert types(m.user_text("[keypad] 42")) == ["conversation.item.create"]
    m.receive(SPEECH_STOPPED)
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    assert types(m.receive(response_done("r1"))) == ["response.create"]


def test_a_filler_is_timed_for_the_tool_still_running_when_its_sibling_finished() -> None:
    m = live_machine(filler_after={"fast": 1.5, "slow": 1.5})
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    m.receive({"type": "output_audio_buffer.started", "response_id": "r1"})  # a long spoken preamble
    feed(m, call_events("c_fast", "fast", "{}", resp="r1"))
    feed(m, call_events("c_slow", "slow", "{}", resp="r1"))
    m.receive(response_done("r1"))
    assert m.timer("filler:c_slow") == [] and m.timer("filler:c_fast") == []  # both due mid-preamble
    m.tool_done("c_fast", "{}")
    stopped = m.receive({"type": "output_audio_buffer.stopped", "response_id": "r1"})
    assert StartTimer("filler:c_slow", 1.5) in stopped
    assert types(m.timer("filler:c_slow")) == ["response.create"]


@pytest.mark.parametrize(
    "turn_detection", [{"type": "server_vad", "create_response": False}, {"type": "semantic_vad"}]
)
def test_outputs_held_by_a_caller_are_answered_once_they_stop(turn_detection: dict[str, Any]) -> None:
    session = {**SESSION, "audio": {"input": {"turn_detection": turn_detection}}}
    m = CallMachine(MachineConfig(session=session))
    m.start()
    m.receive({"type": "session.updated", "session": session})
    m.receive({"type": "response.created", "response": {"id": "r_greet"}})
    m.receive(response_done("r_greet"))
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "lookup", "{}", resp="r1"))
    m.receive(response_done("r1"))
    m.receive(SPEECH_STARTED)
    assert types(m.tool_done("c1", "{}")) == ["conversation.item.create"]
    stopped = m.receive(SPEECH_STOPPED)
    if turn_detection.get("create_response") is False:  # nobody else answers the turn: we ask at once
        assert types(stopped) == ["response.create"]
    else:  # the server's answer is awaited for a moment; when none comes, we ask
        assert types(stopped) == [] and StartTimer("turn", 1.0) in stopped
        assert types(m.timer("turn")) == ["response.create"]
    # Code that turns the server's own answers off is heeded too.
    m.update_session({"turn_detection": {"type": "server_vad", "create_response": False}})
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    m.receive(response_done("r2"))
    m.receive({"type": "response.created", "response": {"id": "r3"}})
    feed(m, call_events("c2", "lookup", "{}", resp="r3"))
    m.receive(response_done("r3"))
    m.receive(SPEECH_STARTED)
    m.tool_done("c2", "{}")
    assert types(m.receive(SPEECH_STOPPED) + m.timer("turn")) == ["response.create"]


def test_goodbye_and_verb_wait_for_the_caller_to_finish() -> None:
    m = live_machine(max_call_duration=600)
    m.receive(SPEECH_STARTED)
    limit = m.timer("max_duration")
    assert notices(limit, "call.limit") == [{"limit": "max_duration"}] and types(limit) == []
    assert types(m.receive(SPEECH_STOPPED)) == []  # the server answers the caller first
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    goodbye = sends(m.receive(response_done("r2")))
    assert "goodbye" in goodbye[0]["response"]["instructions"]
    m.receive({"type": "response.created", "response": {"id": "r_bye"}})
    m.receive(SPEECH_STARTED)  # the caller cuts into the goodbye: the server cancels it
    assert not [a for a in m.receive(response_done("r_bye", "cancelled")) if isinstance(a, Verb)]
    assert not [a for a in m.receive(SPEECH_STOPPED) if isinstance(a, Verb)]
    # No answer to that turn came: the goodbye the caller cut off is asked for once more, then the verb.
    again = sends(m.timer("turn"))
    assert [e["response"]["instructions"] for e in again] == [DEFAULT_GOODBYE]
    m.receive({"type": "response.created", "response": {"id": "r_bye2"}})
    m.receive(SPEECH_STARTED)  # cut off again: not asked for a third time
    m.receive(response_done("r_bye2", "cancelled"))
    m.receive(SPEECH_STOPPED)
    assert Verb("hangup", None) in m.timer("turn")


def started(m: CallMachine, create: dict[str, Any], response_id: str) -> list[Action]:
    """The response ``response_id`` starts, answering our ``create`` (its tag echoed)."""
    return m.receive(
        {"type": "response.created", "response": {"id": response_id, "metadata": create["metadata"]}}
    )


def test_a_caller_who_speaks_over_the_idle_goodbye_is_back_and_the_call_goes_on() -> None:
    m = live_machine(max_idle_duration=30)
    bye = [a.event for a in m.timer("idle") if isinstance(a, Send)][-1]
    assert bye["response"]["instructions"] == DEFAULT_GOODBYE
    started(m, bye["response"], "r_bye")
    m.receive({"type": "output_audio_buffer.started", "response_id": "r_bye"})
    # "Wait, I'm still here, I need my order status!"
    back = m.receive(SPEECH_STARTED)
    assert notices(back, "call.limit_withdrawn") == [{"limit": "idle"}]
    assert CancelTimer("end_cap") in back and StartTimer("idle", 30) in back
    assert types(back) == []  # the caller's speech cuts the goodbye off: the server's turn detection does
    assert not m.ending
    m.receive({"type": "output_audio_buffer.cleared", "response_id": "r_bye"})
    m.receive(response_done("r_bye", "cancelled"))
    m.receive(SPEECH_STOPPED)
    # The server answers the caller, as on any turn: its tool calls run.
    m.receive({"type": "response.created", "response": {"id": "r_ans"}})
    feed(m, call_events("c1", "lookup", "{}", resp="r_ans"))
    done = m.receive(response_done("r_ans"))
    assert [a.call_id for a in done if isinstance(a, RunTool)] == ["c1"]
    answer = [a.event for a in m.tool_done("c1", "{}") if isinstance(a, Send)]
    assert [e["type"] for e in answer] == ["conversation.item.create", "response.create"]
    assert m.timer("end_cap") == []  # nothing forced later either
    started(m, answer[1]["response"], "r_out")
    m.receive({"type": "output_audio_buffer.started", "response_id": "r_out"})
    m.receive(response_done("r_out"))
    out = m.receive({"type": "output_audio_buffer.stopped", "response_id": "r_out"})
    assert not [a for a in out if isinstance(a, Verb | Close)]
    # A silence as long again is the limit again: a new goodbye.
    again = m.timer("idle")
    assert notices(again, "call.limit") == [{"limit": "idle"}] and m.ending


def test_keys_pressed_during_the_idle_goodbye_withdraw_it_and_stop_it() -> None:
    m = live_machine(max_idle_duration=30)
    bye = [a.event for a in m.timer("idle") if isinstance(a, Send)][-1]
    started(m, bye["response"], "r_bye")
    m.receive({"type": "output_audio_buffer.started", "response_id": "r_bye"})
    back = m.receive({"type": "input_audio_buffer.dtmf_event_received", "event": "1"})
    assert notices(back, "call.limit_withdrawn") == [{"limit": "idle"}]
    # No speech cut it off: the goodbye is stopped, and what of it the caller has not heard is dropped.
    assert types(back) == ["response.cancel", "output_audio_buffer.clear"]
    # A goodbye asked for and not started yet is cancelled as it starts.
    m = live_machine(max_idle_duration=30)
    bye = [a.event for a in m.timer("idle") if isinstance(a, Send)][-1]
    assert types(m.receive({"type": "input_audio_buffer.dtmf_event_received", "event": "1"})) == []
    assert types(started(m, bye["response"], "r_bye")) == ["response.cancel"]
    assert not [a for a in m.receive(response_done("r_bye", "cancelled")) if isinstance(a, Verb)]
    # One refused is not sent again.
    m = live_machine(max_idle_duration=30)
    bye = [a.event for a in m.timer("idle") if isinstance(a, Send)][-1]
    m.receive({"type": "response.created", "response": {"id": "r_other"}})
    error = {"type": "invalid_request_error", "code": "conversation_already_has_active_response"}
    m.receive({"type": "error", "error": {**error, "event_id": bye["event_id"]}})
    m.receive({"type": "input_audio_buffer.dtmf_event_received", "event": "1"})
    done = m.receive(response_done("r_other"))
    assert types(done) == [] and notices(done, "response.dropped") == [{"purpose": "goodbye"}]


def test_other_ends_stand_when_the_caller_speaks_over_the_goodbye() -> None:
    m = live_machine(max_call_duration=600)
    bye = [a.event for a in m.timer("max_duration") if isinstance(a, Send)][-1]
    started(m, bye["response"], "r_bye")
    assert notices(m.receive(SPEECH_STARTED), "call.limit_withdrawn") == []
    assert m.ending
    m.receive(response_done("r_bye", "cancelled"))
    m.receive(SPEECH_STOPPED)
    # The server's own answer to the caller, while the call ends, starts no tool.
    m.receive({"type": "response.created", "response": {"id": "r_ans"}})
    feed(m, call_events("c1", "lookup", "{}", resp="r_ans"))
    done = m.receive(response_done("r_ans"))
    assert not [a for a in done if isinstance(a, RunTool)]
    assert notices(done, "tool.discarded") == [
        {"tool_call_id": "c1", "tool": "lookup", "response_status": "completed", "reason": "call_ending"}
    ]
    # The goodbye the caller cut off is asked for again, after that answer, then the verb.
    again = [a.event for a in done if isinstance(a, Send)]
    assert [e["response"]["instructions"] for e in again] == [DEFAULT_GOODBYE]
    started(m, again[0]["response"], "r_bye2")
    assert Verb("hangup", None) in m.receive(response_done("r_bye2"))


def test_a_goodbye_whose_audio_the_caller_cuts_off_is_asked_for_again_once() -> None:
    m = live_machine(max_call_duration=600)
    bye = [a.event for a in m.timer("max_duration") if isinstance(a, Send)][-1]
    started(m, bye["response"], "r_bye")
    m.receive({"type": "output_audio_buffer.started", "response_id": "r_bye"})
    assert not [a for a in m.receive(response_done("r_bye")) if isinstance(a, Verb)]  # still heard
    m.receive(SPEECH_STARTED)
    m.receive({"type": "output_audio_buffer.cleared", "response_id": "r_bye"})  # written whole, heard in part
    m.receive(SPEECH_STOPPED)
    again = [a.event for a in m.timer("turn") if isinstance(a, Send)]  # (no answer to the caller came)
    assert [e["response"]["instructions"] for e in again] == [DEFAULT_GOODBYE]
    started(m, again[0]["response"], "r_bye2")
    m.receive({"type": "output_audio_buffer.started", "response_id": "r_bye2"})
    m.receive(response_done("r_bye2"))
    m.receive(SPEECH_STARTED)
    m.receive({"type": "output_audio_buffer.cleared", "response_id": "r_bye2"})  # cut off again: no third
    m.receive(SPEECH_STOPPED)
    assert Verb("hangup", None) in m.timer("turn")


def test_a_goodbye_the_app_interrupts_is_not_asked_for_again() -> None:
    m = live_machine(max_call_duration=600)
    bye = [a.event for a in m.timer("max_duration") if isinstance(a, Send)][-1]
    started(m, bye["response"], "r_bye")
    m.receive({"type": "output_audio_buffer.started", "response_id": "r_bye"})
    assert types(m.interrupt()) == ["response.cancel", "output_audio_buffer.clear"]
    done = m.receive(response_done("r_bye", "cancelled"))
    done += m.receive({"type": "output_audio_buffer.cleared", "response_id": "r_bye"})
    assert "response.create" not in types(done)  # the app stopped it: no second goodbye
    assert Verb("hangup", None) in done


DTMF = {"type": "input_audio_buffer.dtmf_event_received", "event": "1"}


def test_the_call_limit_due_during_the_idle_goodbye_stands_when_the_caller_comes_back() -> None:
    m = live_machine(max_idle_duration=30, max_call_duration=600)
    bye = [a.event for a in m.timer("idle") if isinstance(a, Send)][-1]
    started(m, bye["response"], "r_bye")
    m.receive({"type": "output_audio_buffer.started", "response_id": "r_bye"})
    # The call's time runs out while the idle goodbye is said: that goodbye is the call limit's now.
    due = m.timer("max_duration")
    assert notices(due, "call.limit") == [{"limit": "max_duration"}]
    assert notices(due, "call.ending") == [{"reason": "max_duration", "verb": "hangup", "target": None}]
    assert types(due) == []  # one goodbye: the one under way
    # "Wait, I'm still here!": the call-duration limit is not withdrawn.
    back = m.receive(SPEECH_STARTED)
    assert notices(back, "call.limit_withdrawn") == [] and m.ending
    m.receive({"type": "output_audio_buffer.cleared", "response_id": "r_bye"})
    m.receive(response_done("r_bye", "cancelled"))
    m.receive(SPEECH_STOPPED)
    # The server's answer to the caller runs no tool; the goodbye they cut off is asked for once more.
    m.receive({"type": "response.created", "response": {"id": "r_ans"}})
    feed(m, call_events("c1", "lookup", "{}", resp="r_ans"))
    done = m.receive(response_done("r_ans"))
    assert not [a for a in done if isinstance(a, RunTool)]
    again = [a.event for a in done if isinstance(a, Send)]
    assert [e["response"]["instructions"] for e in again] == [DEFAULT_GOODBYE]
    started(m, again[0]["response"], "r_bye2")
    assert Verb("hangup", None) in m.receive(response_done("r_bye2"))
    assert m.verb_done(True) == [Close("max_duration")]


def test_the_call_limit_due_during_the_idle_end_keeps_to_one_goodbye() -> None:
    # Keys pressed once the call's time is up do not stop the goodbye under way.
    m = live_machine(max_idle_duration=30, max_call_duration=600)
    bye = [a.event for a in m.timer("idle") if isinstance(a, Send)][-1]
    started(m, bye["response"], "r_bye")
    m.receive({"type": "output_audio_buffer.started", "response_id": "r_bye"})
    m.timer("max_duration")
    keyed = m.receive(DTMF)
    assert notices(keyed, "call.limit_withdrawn") == [] and types(keyed) == []
    assert types(m.receive(response_done("r_bye"))) == []
    assert Verb("hangup", None) in m.receive({"type": "output_audio_buffer.stopped", "response_id": "r_bye"})
    # The idle limit reached while a tool is stuck: its goodbye waits for the tool. The call limit due
    # meanwhile asks for no second one.
    m = live_machine(max_idle_duration=30, max_call_duration=600)
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "lookup", "{}", resp="r1"))
    m.receive(response_done("r1"))
    assert m.timer("idle") == [StartTimer("idle", 30)]  # a tool works: one more period
    assert notices(m.timer("idle"), "call.limit") == [{"limit": "idle"}]
    assert types(m.timer("max_duration")) == []
    assert notices(m.receive(DTMF), "call.limit_withdrawn") == []
    answer = [a.event for a in m.tool_done("c1", "{}") if isinstance(a, Send)]
    assert [e["type"] for e in answer] == ["conversation.item.create", "response.create"]
    started(m, answer[1]["response"], "r_ans")
    byes = [a.event for a in m.receive(response_done("r_ans")) if isinstance(a, Send)]
    assert [e["response"]["instructions"] for e in byes] == [DEFAULT_GOODBYE]
    started(m, byes[0]["response"], "r_bye")
    assert Verb("hangup", None) in m.receive(response_done("r_bye"))
    assert m.verb_done(True) == [Close("max_duration")]
    # Once the idle end's hangup went out, the call limit has nothing left to take over.
    m = live_machine(max_idle_duration=30, max_call_duration=600)
    bye = [a.event for a in m.timer("idle") if isinstance(a, Send)][-1]
    started(m, bye["response"], "r_bye")
    assert Verb("hangup", None) in m.receive(response_done("r_bye"))
    assert m.timer("max_duration") == []
    assert m.verb_done(True) == [Close("idle_timeout")]


def test_a_hangup_asked_for_during_the_idle_goodbye_takes_its_place() -> None:
    m = live_machine(max_idle_duration=30, max_call_duration=600)
    bye = [a.event for a in m.timer("idle") if isinstance(a, Send)][-1]
    started(m, bye["response"], "r_bye")
    m.receive({"type": "output_audio_buffer.started", "response_id": "r_bye"})
    asked = m.request_end("end_call_tool")  # the app's ctx.hangup() (or the end_call tool)
    assert notices(asked, "call.ending") == [{"reason": "end_call_tool", "verb": "hangup", "target": None}]
    assert types(asked) == []  # the goodbye under way is let finish
    # The end began with the idle limit's: its cap holds for this one too (not started again).
    assert not [a for a in asked if isinstance(a, StartTimer | CancelTimer)]
    assert m.request_end("again") == []  # an explicit end stays terminal: no other replaces it
    assert m.timer("max_duration") == []  # nor the call limit
    back = m.receive(SPEECH_STARTED)
    assert notices(back, "call.limit_withdrawn") == [] and m.ending
    m.receive({"type": "output_audio_buffer.cleared", "response_id": "r_bye"})
    m.receive(response_done("r_bye", "cancelled"))
    m.receive(SPEECH_STOPPED)
    # The server's answer to the caller runs no tool, and the hangup, which says no goodbye of its own,
    # follows it: the idle goodbye the caller cut off is not asked for again.
    m.receive({"type": "response.created", "response": {"id": "r_ans"}})
    feed(m, call_events("c1", "lookup", "{}", resp="r_ans"))
    done = m.receive(response_done("r_ans"))
    assert not [a for a in done if isinstance(a, RunTool)] and types(done) == []
    assert Verb("hangup", None) in done
    assert m.verb_done(True) == [Close("end_call_tool")]
    # An idle goodbye refused (another response ran) is not sent again for the hangup.
    m = live_machine(max_idle_duration=30)
    bye = [a.event for a in m.timer("idle") if isinstance(a, Send)][-1]
    m.receive({"type": "response.created", "response": {"id": "r_other"}})
    error = {"type": "invalid_request_error", "code": "conversation_already_has_active_response"}
    m.receive({"type": "error", "error": {**error, "event_id": bye["event_id"]}})
    m.request_end("end_call_tool")
    done = m.receive(response_done("r_other"))
    assert types(done) == [] and notices(done, "response.dropped") == [{"purpose": "goodbye"}]
    assert Verb("hangup", None) in done


def test_a_transfer_asked_for_before_the_idle_goodbye_is_said_replaces_it() -> None:
    m = live_machine(max_idle_duration=30)
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "escalate", "{}", resp="r1"))
    m.receive(response_done("r1"))
    m.timer("idle")
    assert notices(m.timer("idle"), "call.limit") == [{"limit": "idle"}]  # the goodbye waits for the tool
    # The tool transfers the caller as it finishes: no goodbye, the model's answer, then the REFER.
    asked = m.request_end("transferred", verb="refer", target="tel:+14155550123")
    assert StartTimer("end_cap", 10.0) not in asked  # (the idle end's cap holds)
    assert notices(m.receive(DTMF), "call.limit_withdrawn") == []
    answer = [a.event for a in m.tool_done("c1", '"transferring"', ok=True) if isinstance(a, Send)]
    assert [e["type"] for e in answer] == ["conversation.item.create", "response.create"]
    assert "instructions" not in untagged(answer[1]).get("response", {})
    started(m, answer[1]["response"], "r_ans")
    done = m.receive(response_done("r_ans"))
    assert types(done) == [] and Verb("refer", "tel:+14155550123") in done
    assert m.verb_done(True) == [StartTimer("transfer", 45.0)]  # the server's close ends it
    assert m.transport_closed(1000) == [Close("transferred")]


def test_code_hanging_up_with_the_idle_limits_reason_is_not_withdrawn() -> None:
    m = live_machine(max_idle_duration=30)
    m.receive({"type": "response.created", "response": {"id": "r1"}})  # (the verb waits for it)
    m.request_end("idle_timeout")  # ctx.hangup("idle_timeout"): the app's own end, not the limit's
    assert notices(m.receive(DTMF), "call.limit_withdrawn") == [] and m.ending
    assert Verb("hangup", None) in m.receive(response_done("r1"))


def test_transfer_waits_for_the_caller_within_the_end_cap() -> None:
    m = live_machine(end_cap=10.0)
    m.receive(SPEECH_STARTED)
    asked = m.request_end("transferred", verb="refer", target="tel:+14155550123")
    assert not [a for a in asked if isinstance(a, Verb)]
    assert Verb("refer", "tel:+14155550123") in m.timer("end_cap")  # the cap still holds


def test_speech_cap_releases_what_a_lost_speech_stop_would_hold() -> None:
    m = live_machine(max_idle_duration=30)
    m.receive(SPEECH_STARTED)
    assert types(m.say("Are you still there?")) == []
    released = m.timer("speaking")
    assert StartTimer("idle", 30) in released
    assert [e["response"]["instructions"] for e in sends(released)] == ["Are you still there?"]
    late = m.receive(SPEECH_STOPPED)  # a long utterance's real end after all: nothing is sent again
    assert sends(late) == [] and notices(late, "turn.stopped") == [{}]
    assert m.receive(SPEECH_STOPPED) == []  # (once)


def test_the_real_end_of_an_utterance_longer_than_the_speech_cap_is_its_turns_end() -> None:
    """The caller spoke past SPEECH_CAP (an address, a complaint): the cap took the utterance for over,
    but its speech_stopped still ends the turn, which the server answers by itself. A tool output that
    comes meanwhile waits for that answer rather than racing it with a create of its own."""
    m = live_machine()
    feed(m, [{"type": "response.created", "response": {"id": "resp_1"}}, *call_events("c1", "lookup", "{}")])
    assert any(isinstance(a, RunTool) for a in m.receive(response_done("resp_1")))
    m.receive(SPEECH_STARTED)
    assert notices(m.timer("speaking"), "turn.stopped") == []  # (the cap is no stop of the caller's)
    stopped = m.receive(SPEECH_STOPPED)
    assert notices(stopped, "turn.stopped") == [{}]
    assert StartTimer("turn", TURN_GRACE) in stopped
    assert m.response_pending  # the server's answer to the turn may be on its way
    assert [e["type"] for e in sends(m.tool_done("c1", '{"ok": true}'))] == ["conversation.item.create"]


def test_a_failed_greeting_is_not_said_once_the_caller_has_spoken() -> None:
    """The greeting failed and was asked again; the caller spoke meanwhile and the server answered them,
    which refused our create: that answer was the opening, and the greeting is not said after it."""
    m = machine(greeting="Say hello")
    m.start()
    m.receive({"type": "session.updated", "session": SESSION})
    m.receive({"type": "response.created", "response": {"id": "r_greet"}})
    (again,) = sends(m.receive(failed("r_greet")))
    assert again["response"]["instructions"] == "Say hello"
    feed(m, [SPEECH_STARTED, SPEECH_STOPPED, {"type": "response.created", "response": {"id": "r_turn"}}])
    assert sends(m.receive(crossed(again))) == []
    after = m.receive(response_done("r_turn")) + m.timer("turn")
    assert sends(after) == []
    assert notices(after, "response.dropped") == [{"purpose": "greeting"}]


def tagged_machine() -> CallMachine:
    """A machine past its greeting, whose response came tagged (as OpenAI echoes our tags)."""
    m = machine(greeting="Say hello")
    greeting = sends(m.start())[-1]
    m.receive({"type": "session.updated", "session": SESSION})
    tag = {"sideband": greeting["event_id"]}
    m.receive({"type": "response.created", "response": {"id": "r_greet", "metadata": tag}})
    m.receive(response_done("r_greet"))
    return m


def crossed(create: dict[str, Any]) -> dict[str, Any]:
    """The refusal of our ``create`` that crossed another response on the wire."""
    return {
        "type": "error",
        "error": {"code": "conversation_already_has_active_response", "event_id": create["event_id"]},
    }


def reask_crossed(m: CallMachine) -> list[dict[str, Any]]:
    """A guardrail stops reply ``r1``; the create asking the model to answer again crosses the server's
    answer to the caller (``r_turn``), which has started: what the machine sends at that create's refusal."""
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    m.correct("Never promise refunds.", "r1")
    (again,) = [
        e for e in sends(m.receive(response_done("r1", status="cancelled"))) if e["type"] == "response.create"
    ]
    feed(m, [SPEECH_STARTED, SPEECH_STOPPED, {"type": "response.created", "response": {"id": "r_turn"}}])
    return sends(m.receive(crossed(again)))


@pytest.mark.parametrize("answer", ["completed", "cancelled"])
def test_a_plain_create_refused_for_the_servers_answer_to_the_caller_is_not_asked_again(answer: str) -> None:
    """A guardrail stopped a reply; the model is asked to answer again, and the caller spoke meanwhile:
    our plain create crosses the server's answer to the caller and is refused for it. That answer is the
    model's answer again (it saw all we had sent): ours is not asked once more after it, a second reply
    unasked, unless that answer does not complete."""
    m = tagged_machine()
    assert reask_crossed(m) == []
    after = m.receive(response_done("r_turn", status=answer)) + m.timer("turn")
    assert creates(after) == ([] if answer == "completed" else [""])


def test_codes_text_crossed_with_its_create_by_the_servers_answer_to_the_caller_is_answered() -> None:
    """Code's text (OpenAI answers no text by itself: our plain create follows it) goes out as the caller's
    turn ends; the server's answer to that turn crosses both on the wire, and our create is refused for
    it. That answer began before the server took the text (the caller's own item came first): the text
    is answered after it, better twice than never."""
    m = tagged_machine()
    (create,) = [
        e for e in sends(m.user_text("The order shipped: tell the caller.")) if e["type"] == "response.create"
    ]
    audio = [{"type": "input_audio", "transcript": None}]
    caller_item = {
        "type": "conversation.item.added",
        "item": {"type": "message", "role": "user", "content": audio},
    }
    feed(
        m,
        [
            SPEECH_STARTED,
            SPEECH_STOPPED,
            caller_item,
            {"type": "response.created", "response": {"id": "r_turn"}},
        ],
    )
    assert sends(m.receive(crossed(create))) == []
    after = m.receive(response_done("r_turn")) + m.timer("turn")
    assert creates(after) == [""]


def test_codes_text_the_server_refused_is_taken_as_seen_once_a_create_after_it_starts() -> None:
    """Code's text is refused (no item acknowledged), and our create after it runs: the server has taken
    the text by then (in order). A later plain create that the server's answer to the caller crosses is
    not asked again after that answer (the model would speak twice)."""
    m = tagged_machine()
    (create,) = [e for e in sends(m.user_text("x" * 10)) if e["type"] == "response.create"]
    m.receive(refusal(None))  # (the text's item, refused: no acknowledgement comes)
    m.receive(
        {
            "type": "response.created",
            "response": {"id": "r_text", "metadata": {"sideband": create["event_id"]}},
        }
    )
    m.receive(response_done("r_text"))
    assert reask_crossed(m) == []
    assert creates(m.receive(response_done("r_turn")) + m.timer("turn")) == []


def test_a_failed_greeting_asked_again_waits_for_the_caller_and_is_dropped_if_they_spoke() -> None:
    m = machine(greeting="Say hello")
    m.start()
    m.receive({"type": "session.updated", "session": SESSION})
    m.receive({"type": "response.created", "response": {"id": "r_greet"}})
    m.receive(SPEECH_STARTED)  # the caller speaks over the greeting, which then fails
    assert sends(m.receive(failed("r_greet"))) == []  # (never over the caller)
    m.receive(SPEECH_STOPPED)
    later = m.timer("turn")  # the server did not answer: still no greeting after the caller
    assert sends(later) == [] and notices(later, "response.dropped") == [{"purpose": "greeting"}]


def test_idle_limit_waits_for_a_caller_still_speaking() -> None:
    m = live_machine(max_idle_duration=20)
    m.receive(SPEECH_STARTED)
    assert m.timer("idle") == [StartTimer("idle", 20)]  # mid-utterance: not idle
    assert StartTimer("idle", 20) in m.receive(SPEECH_STOPPED)  # silence counts from the stop
    assert notices(m.timer("idle"), "call.limit") == [{"limit": "idle"}]


def test_a_reattach_forgets_an_utterance_in_progress() -> None:
    m = live_machine()
    m.receive(SPEECH_STARTED)
    assert types(m.say("Hello?")) == []
    again = sends(m.reattached())  # the stop may have been lost with the socket
    assert [e["type"] for e in again] == ["session.update", "response.create"]
    assert again[1]["response"]["instructions"] == "Hello?"


def agent_line(resp: str, text: str) -> dict[str, Any]:
    return {
        "type": "response.output_audio_transcript.done",
        "response_id": resp,
        "item_id": "item_" + resp,
        "content_index": 0,
        "transcript": text,
    }


def test_a_message_is_one_line_whichever_of_its_parts_carries_it() -> None:
    """The vowel engine ends a reply's text part (response.text.done, content_index 0) and its audio
    transcript (1) with the same words: one line. Another message of the same response is a line of
    its own, and so is the next response's."""
    m = live_machine(caps=ENGINE_CAPABILITIES)
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    part = {"response_id": "r1", "item_id": "item_1", "output_index": 0}
    text = m.receive({"type": "response.text.done", **part, "content_index": 0, "text": "It shipped."})
    assert notices(text, "transcript") == [{"role": "agent", "text": "It shipped.", "response_id": "r1"}]
    said = {
        "type": "response.output_audio_transcript.done",
        **part,
        "content_index": 1,
        "transcript": "It shipped.",
    }
    assert notices(m.receive(said), "transcript") == []
    other = {**agent_line("r1", "Anything else?"), "item_id": "item_2"}
    assert [n["text"] for n in notices(m.receive(other), "transcript")] == ["Anything else?"]
    m.receive(response_done("r1"))
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    again = {**said, "response_id": "r2"}
    assert [n["text"] for n in notices(m.receive(again), "transcript")] == ["It shipped."]


def test_a_line_the_caller_cut_off_is_marked_whenever_its_words_come() -> None:
    m = live_machine()
    # The words first, then the caller cuts into the audio still playing after the response.
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    m.receive({"type": "output_audio_buffer.started", "response_id": "r1"})
    assert notices(m.receive(agent_line("r1", "Your order shipped on Monday.")), "transcript")
    m.receive(response_done("r1"))
    m.receive(SPEECH_STARTED)
    cleared = m.receive({"type": "output_audio_buffer.cleared", "response_id": "r1"})
    assert notices(cleared, "agent.interrupted") == [{"response_id": "r1"}]
    # The audio cleared before the (partial) words of a cancelled response arrive: marked with them.
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    m.receive({"type": "output_audio_buffer.started", "response_id": "r2"})
    m.receive(SPEECH_STARTED)
    assert (
        notices(m.receive({"type": "output_audio_buffer.cleared", "response_id": "r2"}), "agent.interrupted")
        == []
    )
    late = m.receive(agent_line("r2", "Let me"))
    assert [a.event for a in late if isinstance(a, Notice)] == ["transcript", "agent.interrupted"]
    # Heard to the end: nothing to mark.
    m.receive(response_done("r2", "cancelled"))
    m.receive({"type": "response.created", "response": {"id": "r3"}})
    m.receive({"type": "output_audio_buffer.started", "response_id": "r3"})
    m.receive(agent_line("r3", "Goodbye."))
    m.receive(response_done("r3"))
    assert (
        notices(m.receive({"type": "output_audio_buffer.stopped", "response_id": "r3"}), "agent.interrupted")
        == []
    )


def test_active_response_error_retries_after_done() -> None:
    m = machine()
    m.start()
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c", "t", "{}", resp="r1"))
    m.receive(response_done("r1"))
    first = sends(m.tool_done("c", "o"))[1]
    assert first["type"] == "response.create"
    # The caller spoke meanwhile: the server refuses our create; it goes out again after that response.
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    errs = m.receive(
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "code": "conversation_already_has_active_response",
                "event_id": first["event_id"],
            },
        }
    )
    assert types(errs) == []
    again = sends(m.receive(response_done("r2")))
    assert [e["type"] for e in again] == ["response.create"] and again[0]["event_id"] != first["event_id"]
    assert m.tool_done("c", "o") == []


def test_hangup_waits_for_tool_output_model_reply_and_playback() -> None:
    m = machine()
    m.start()
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("call_end", "end_call", "{}", resp="r1"))
    m.receive(response_done("r1"))
    ending = m.request_end("end_call_tool")
    assert StartTimer("end_cap", 10.0) in ending and not any(isinstance(a, Verb) for a in ending)
    assert m.request_end("again") == []  # idempotent
    done = m.tool_done("call_end", '{"ok":true}')
    assert types(done) == ["conversation.item.create", "response.create"]
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    m.receive({"type": "output_audio_buffer.started"})
    assert not any(isinstance(a, Verb) for a in m.receive(response_done("r2")))
    stop = m.receive({"type": "output_audio_buffer.stopped"})
    assert Verb("hangup", None) in stop and CancelTimer("end_cap") in stop
    assert m.verb_done(True)[-1] == Close("end_call_tool")
    assert m.closed == "end_call_tool"
    assert m.receive({"type": "response.created"}) == []


def test_transfer_is_a_refer_and_end_cap_forces_it() -> None:
    m = machine()
    m.start()  # no greeting configured: nothing in flight
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    actions = m.request_end("transferred", verb="refer", target="tel:+14155550123")
    assert not any(isinstance(a, Verb) for a in actions)
    forced = m.timer("end_cap")
    assert Verb("refer", "tel:+14155550123") in forced
    assert notices(forced, "call.end_forced")
    assert m.timer("end_cap") == []


def test_idle_limit_says_goodbye_then_hangs_up() -> None:
    m = machine(max_idle_duration=20)
    m.start()
    assert StartTimer("idle", 20) in m.receive({"type": "input_audio_buffer.speech_started"})
    assert StartTimer("idle", 20) in m.receive({"type": "input_audio_buffer.speech_stopped"})
    m.timer("turn")  # no answer to that turn came
    actions = m.timer("idle")
    assert notices(actions, "call.limit") == [{"limit": "idle"}]
    create = sends(actions)
    assert create[0]["type"] == "response.create" and "goodbye" in create[0]["response"]["instructions"]
    m.receive({"type": "response.created", "response": {"id": "r"}})
    assert Verb("hangup", None) in m.receive(response_done("r"))
    assert m.timer("max_duration") == []  # ending already: no second limit reported
    assert m.verb_done(False, "boom")[-1] == Close("hangup_failed")  # the call may still be up


def test_loop_breaker_answers_with_an_error_output() -> None:
    m = machine(max_identical_calls=2)
    m.start()
    outputs = []
    for n in range(3):
        r = f"r{n}"
        m.receive({"type": "response.created", "response": {"id": r}})
        feed(m, call_events(f"call_{n}", "same", '{"x":1}', resp=r))
        actions = m.receive(response_done(r))
        if any(isinstance(a, RunTool) for a in actions):
            outputs += sends(m.tool_done(f"call_{n}", "fine"))
        else:
            outputs += sends(actions)
            assert notices(actions, "tool.loop_breaker")
    items = [o["item"]["output"] for o in outputs if o["type"] == "conversation.item.create"]
    assert items[:2] == ["fine", "fine"]
    assert "loop_detected" in items[2]
    # The plain creates that answered real outputs allow tools; the one after the refusal does not:
    # a model in a loop would otherwise be invited to call again, and again.
    assert [o.get("response") for o in outputs if o["type"] == "response.create"] == [
        None,
        None,
        {"tool_choice": "none"},
    ]


def _loop_broken(m: CallMachine, written: list[str]) -> list[str]:
    """The calls of ``status`` the loop breaker stopped, one per response, with arguments ``written``."""
    broken = []
    for n, args in enumerate(written):
        m.receive({"type": "response.created", "response": {"id": f"r{n}"}})
        feed(m, call_events(f"c{n}", "status", args, resp=f"r{n}"))
        done = m.receive(response_done(f"r{n}"))
        broken += [f["tool_call_id"] for f in notices(done, "tool.loop_breaker")]
        if any(isinstance(a, RunTool) for a in done):
            m.tool_done(f"c{n}", "fine")
    return broken


def test_the_same_call_written_another_way_is_the_same_call_for_the_loop_breaker() -> None:
    """The model's arguments come compact or pretty-printed (with a trailing newline), their keys in any
    order: the same call all the same."""
    m = machine(max_identical_calls=2)
    m.start()
    written = [
        '{"order":42,"full":true}',
        '{\n  "order": 42,\n  "full": true\n}\n',
        '{"full": true, "order": 42}',
    ]
    assert _loop_broken(m, written) == ["c2"]
    # Other values, or a call whose arguments are not JSON, are other calls.
    for n, args in enumerate(['{"order": 43, "full": true}', "not json", "not json "], start=3):
        m.receive({"type": "response.created", "response": {"id": f"r{n}"}})
        feed(m, call_events(f"c{n}", "status", args, resp=f"r{n}"))
        done = m.receive(response_done(f"r{n}"))
        assert notices(done, "tool.loop_breaker") == [] and [a for a in done if isinstance(a, RunTool)]
        m.tool_done(f"c{n}", "fine")


@pytest.mark.parametrize(
    "written",
    [
        ["", "{}", " \n"],  # no arguments, however said (a blank is run as {})
        ['{"n":1}', '{"n": 1.0}', '{"n":1e0}'],  # the same number
        ['{"a":[1,{"b":2}]}', '{"a": [1.0, {"b": 2.0}]}', '{"a":[1,{"b":2}]}'],
    ],
)
def test_arguments_of_the_same_value_are_the_same_call_for_the_loop_breaker(written: list[str]) -> None:
    """Arguments that differ as text but mean the same to the tool (no arguments as "" or "{}", 1 or 1.0)
    are the same call: a model repeating itself that way is stopped all the same."""
    m = machine(max_identical_calls=2)
    m.start()
    assert _loop_broken(m, written) == ["c2"]


@pytest.mark.parametrize(
    "written",
    [
        ['{"n":1}', '{"n":true}', '{"n":1}'],  # true is no number
        ['{"n":0}', '{"n":false}', '{"n":0}'],
        ['{"n":null}', '{"n":0}', '{"n":null}'],
        ['{"n":[1]}', '{"n":1}', '{"n":[1]}'],
        ['{"n":"1"}', '{"n":1}', '{"n":"1"}'],
        ['{"n":1}', '{"n":1,"m":1}', '{"n":1}'],
        ["", "null", ""],  # (null is refused as arguments; a blank is {})
    ],
)
def test_arguments_of_other_values_are_other_calls_for_the_loop_breaker(written: list[str]) -> None:
    m = machine(max_identical_calls=1)
    m.start()
    for n, args in enumerate(written):
        m.receive({"type": "response.created", "response": {"id": f"r{n}"}})
        feed(m, call_events(f"c{n}", "status", args, resp=f"r{n}"))
        done = m.receive(response_done(f"r{n}"))
        assert notices(done, "tool.loop_breaker") == [] and [a for a in done if isinstance(a, RunTool)]
        m.tool_done(f"c{n}", "fine")


def test_a_refused_create_after_a_loop_breaker_still_allows_no_tools() -> None:
    m = machine(max_tool_calls=0)
    m.start()
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "t", "{}", resp="r1"))
    create = sends(m.receive(response_done("r1")))[-1]
    assert create["response"] == {"tool_choice": "none"}
    m.receive({"type": "response.created", "response": {"id": "r_vad"}})  # the caller spoke meanwhile
    m.receive(refusal(create["event_id"]))
    assert [e.get("response") for e in sends(m.receive(response_done("r_vad")))] == [{"tool_choice": "none"}]


def test_the_same_tool_call_in_another_caller_turn_is_no_loop() -> None:
    """A caller asking "is order 42 shipped yet?" again, a turn later, is not a model stuck in a loop."""
    m = machine(max_identical_calls=2)
    m.start()
    for n in range(4):
        m.receive({"type": "conversation.item.input_audio_transcription.completed", "transcript": "shipped?"})
        m.receive({"type": "response.created", "response": {"id": f"r{n}"}})
        feed(m, call_events(f"c{n}", "status", '{"order":42}', resp=f"r{n}"))
        ran = m.receive(response_done(f"r{n}"))
        assert RunTool(f"c{n}", "status", '{"order":42}') in ran, n
        m.tool_done(f"c{n}", "not yet")
        m.receive({"type": "response.created", "response": {"id": f"a{n}"}})
        m.receive(response_done(f"a{n}"))


def test_a_call_cut_short_with_its_response_is_not_run() -> None:
    """max_output_tokens or a content filter ends the response "incomplete": a call whose arguments were
    cut ("" would pass for {}) is discarded; one whose arguments were complete still runs."""
    m = machine()
    m.start()
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    m.receive(
        {
            "type": "response.output_item.added",
            "response_id": "r1",
            "item": {
                "type": "function_call",
                "call_id": "c_whole",
                "name": "lookup",
                "status": "in_progress",
            },
        }
    )
    m.receive(
        {
            "type": "response.function_call_arguments.done",
            "response_id": "r1",
            "call_id": "c_whole",
            "name": "lookup",
            "arguments": '{"id":1}',
        }
    )
    cut = {
        "type": "function_call",
        "call_id": "c_cut",
        "name": "cancel",
        "arguments": "",
        "status": "incomplete",
    }
    whole = {"type": "function_call", "call_id": "c_whole", "name": "lookup", "arguments": '{"id":1}'}
    actions = m.receive(response_done("r1", "incomplete", output=[{**whole, "status": "completed"}, cut]))
    assert [a for a in actions if isinstance(a, RunTool)] == [RunTool("c_whole", "lookup", '{"id":1}')]
    discarded = notices(actions, "tool.discarded")
    assert [(d["tool_call_id"], d["reason"]) for d in discarded] == [("c_cut", "arguments_cut")]


def test_an_item_that_ended_incomplete_is_not_run_though_its_arguments_were_announced_done() -> None:
    """OpenAI sends arguments.done for calls of responses that end cancelled or incomplete too: the item's
    own status decides."""
    m = machine()
    m.start()
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    cut = {"type": "function_call", "call_id": "c_cut", "name": "end_call", "arguments": ""}
    m.receive(
        {"type": "response.output_item.added", "response_id": "r1", "item": {**cut, "status": "in_progress"}}
    )
    m.receive(
        {
            "type": "response.function_call_arguments.done",
            "response_id": "r1",
            "call_id": "c_cut",
            "name": "end_call",
            "arguments": "",
        }
    )
    m.receive(
        {"type": "response.output_item.done", "response_id": "r1", "item": {**cut, "status": "incomplete"}}
    )
    actions = m.receive(response_done("r1", "incomplete", output=[{**cut, "status": "incomplete"}]))
    assert not [a for a in actions if isinstance(a, RunTool)]
    assert [d["reason"] for d in notices(actions, "tool.discarded")] == ["arguments_cut"]


def test_audio_a_backend_streams_is_no_new_caller_turn_for_the_loop_breaker() -> None:
    m = machine(max_identical_calls=2)
    m.start()
    breaks = []
    for n in range(4):
        m.caller_active()  # silence streamed between the model's calls
        m.receive({"type": "response.created", "response": {"id": f"r{n}"}})
        feed(m, call_events(f"c{n}", "same", "{}", resp=f"r{n}"))
        actions = m.receive(response_done(f"r{n}"))
        breaks += notices(actions, "tool.loop_breaker")
        if any(isinstance(a, RunTool) for a in actions):
            m.tool_done(f"c{n}", "x")
        m.receive({"type": "response.created", "response": {"id": f"a{n}"}})
        m.receive(response_done(f"a{n}"))
    assert len(breaks) == 2


def identical_calls_with_a_late_transcript(
    spoken: list[str], late: str
) -> tuple[CallMachine, int, list[Action]]:
    """The caller starts speaking (``spoken`` items, in order), then the model calls the same tool three
    times; the transcript of ``late`` completes after the first call ran. Returns the machine, the loop
    breaker's refusals and what the transcript produced."""
    m = machine(max_identical_calls=2)
    m.start()
    for item in spoken:
        m.receive({"type": "input_audio_buffer.speech_started", "item_id": item})
    breaks, transcript = 0, []
    for n in range(3):
        m.receive({"type": "response.created", "response": {"id": f"r{n}"}})
        feed(m, call_events(f"c{n}", "same", "{}", resp=f"r{n}"))
        actions = m.receive(response_done(f"r{n}"))
        breaks += len(notices(actions, "tool.loop_breaker"))
        if any(isinstance(a, RunTool) for a in actions):
            m.tool_done(f"c{n}", "x")
        if n == 0:
            transcript = m.receive(
                {
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": late,
                    "transcript": "Check it again and again.",
                }
            )
    return m, breaks, transcript


@pytest.mark.parametrize(
    "spoken", [["item_a"], ["item_a", "item_b"]], ids=["its-own-turn", "an-earlier-utterance"]
)
def test_a_caller_transcript_completing_late_is_no_new_turn_for_the_loop_breaker(spoken: list[str]) -> None:
    """The caller's words are transcribed while the model answers, or after (even after the caller spoke
    again): their transcript is the turn their speech began, and does not reset the count of identical
    calls in the current one."""
    m, breaks, transcript = identical_calls_with_a_late_transcript(spoken, "item_a")
    assert notices(transcript, "transcript") == [
        {"role": "caller", "text": "Check it again and again.", "item_id": "item_a"}
    ]
    assert breaks == 1  # the third identical call of the turn
    # A transcript with no speech start of its own (another item) is a turn of its own.
    m.receive(
        {
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": "item_z",
            "transcript": "Hi",
        }
    )
    m.receive({"type": "response.created", "response": {"id": "r9"}})
    feed(m, call_events("c9", "same", "{}", resp="r9"))
    assert not notices(m.receive(response_done("r9")), "tool.loop_breaker")


def test_a_new_caller_turn_gets_its_tools_back_after_a_loop_breaker() -> None:
    m = machine(max_tool_calls=1)
    m.start()
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "slow", "{}", resp="r1"))
    feed(m, call_events("c2", "slow", "{}", resp="r1"))
    m.receive(response_done("r1"))  # c1 runs, c2 is refused: "no tools" is owed once c1 is in
    m.receive({"type": "input_audio_buffer.speech_started"})  # the caller speaks meanwhile: a new turn
    m.receive({"type": "input_audio_buffer.speech_stopped"})
    m.timer("turn")  # no answer to that turn came
    creates = sends(m.tool_done("c1", "x"))
    assert [e.get("response") for e in creates if e["type"] == "response.create"] == [None]


def test_session_expired_closes_and_cancels_running_tools() -> None:
    m = machine()
    m.start()
    feed(m, call_events("call_1", "slow", "{}"))
    m.receive(response_done())
    actions = m.receive(
        {"type": "error", "error": {"type": "invalid_request_error", "code": "session_expired"}}
    )
    assert CancelTool("call_1") in actions and actions[-1] == Close("session_expired")


def test_engine_session_timeout_error_closes_with_its_code() -> None:
    m = machine()
    m.start()
    actions = m.receive(
        {"type": "error", "error": {"type": "session_timeout", "code": "max_idle_duration_exceeded"}}
    )
    assert actions[-1] == Close("max_idle_duration_exceeded")


def test_a_tool_name_longer_than_any_tool_is_cut_short() -> None:
    """The model's made-up name is logged and shown back to it: no longer than 128 characters."""
    m = machine()
    m.start()
    m.receive({"type": "response.created", "response": {"id": "resp_1"}})
    feed(m, call_events("c1", "lookup_" + "x" * 50_000, "{}"))
    run = [a for a in m.receive(response_done()) if isinstance(a, RunTool)]
    assert len(run) == 1 and run[0].name.startswith("lookup_xx") and len(run[0].name) == 128


def test_transcripts_dtmf_unknown_events_and_recoverable_errors() -> None:
    m = machine()
    m.start()
    a = m.receive(
        {"type": "conversation.item.input_audio_transcription.completed", "transcript": " Where is 42? "}
    )
    assert notices(a, "transcript") == [{"role": "caller", "text": "Where is 42?"}]
    a = m.receive({"type": "response.output_audio_transcript.done", "transcript": "It shipped."})
    assert notices(a, "transcript") == [{"role": "agent", "text": "It shipped."}]
    assert notices(m.receive({"type": "input_audio_buffer.dtmf_event_received", "event": "9"}), "dtmf") == [
        {"digit": "9"}
    ]
    for odd in ({}, {"event": None}, {"event": ""}, {"event": ["9"]}, {"event": "9" * 40}):
        assert notices(m.receive({"type": "input_audio_buffer.dtmf_event_received", **odd}), "dtmf") == []
    assert notices(m.receive({"type": "input_audio_buffer.dtmf_event_received", "event": 7}), "dtmf") == [
        {"digit": "7"}
    ]
    assert m.receive({"type": "some.future.event", "x": 1}) == []
    assert m.receive({"no": "type"}) == []
    err = m.receive({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_value"}})
    assert notices(err, "sideband.error")[0]["code"] == "invalid_value" and m.closed is None


def test_clean_close_and_driver_failures_end_once() -> None:
    m = machine()
    m.start()
    assert m.transport_closed(1000) == [Close("remote_closed")]
    assert m.transport_closed(1000) == [] and m.fail("x") == []
    # The server closing after our verb ends the call with our reason.
    m3 = machine()
    m3.start()
    actions = m3.request_end("hangup")
    assert Verb("hangup", None) in actions
    assert m3.transport_closed(1000) == [Close("hangup")]


def test_a_close_before_the_end_verb_went_out_is_the_remote_side_ending_the_call() -> None:
    m = machine()
    m.start()
    m.receive({"type": "response.created", "response": {"id": "r1"}})  # the model still speaks
    assert not [a for a in m.request_end("hangup") if isinstance(a, Verb)]
    assert m.transport_closed(1000) == [Close("remote_closed")]


def test_a_call_found_gone_ends_as_call_not_found_unless_our_verb_ended_it() -> None:
    m = machine()
    m.start()
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    m.request_end("idle_timeout", goodbye=True)  # the goodbye waits for r1: no verb yet
    assert m.fail("call_not_found") == [Close("call_not_found")]
    # After our hangup went out, the call being gone is the hangup's doing.
    m2 = machine()
    m2.start()
    assert Verb("hangup", None) in m2.request_end("hangup")
    assert m2.fail("call_not_found") == [Close("hangup")]


def test_say_is_queued_behind_an_active_response() -> None:
    m = machine()
    m.start()
    m.receive({"type": "response.created", "response": {"id": "r"}})
    assert m.say("Tell them about the sale") == []
    out = m.receive(response_done("r"))
    assert sends(out)[0]["response"] == {"instructions": "Tell them about the sale"}
    upd = m.update_session({"instructions": "new"})
    assert [(e["type"], e["session"]) for e in sends(upd)] == [
        ("session.update", {"instructions": "new", "type": "realtime"})
    ]


def test_a_say_queued_before_the_end_is_said_before_the_goodbye_and_a_later_one_not_at_all() -> None:
    """What code asked the model to say before it asked for the end are the call's last words, whether
    the model was talking at the time (queued) or not (sent at once); a say() after the end is not."""
    m = machine()
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    assert m.say("Tell them about the sale") == []
    m.request_end("idle_timeout", goodbye=True)
    assert m.say("Too late") == [] and m.response_owed
    assert creates(m.receive(response_done("r1"))) == ["Tell them about the sale"]
    m.receive({"type": "response.created", "response": {"id": "r_say"}})
    assert creates(m.receive(response_done("r_say"))) == [DEFAULT_GOODBYE]
    m.receive({"type": "response.created", "response": {"id": "r_bye"}})
    done = m.receive(response_done("r_bye"))
    assert creates(done) == [] and Verb("hangup", None) in done


def test_a_say_queued_before_a_transfer_is_said_before_the_refer() -> None:
    m = machine()
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    m.receive({"type": "response.created", "response": {"id": "r1"}})  # the model is talking
    assert m.say("Tell the caller you are connecting them to a person.") == []
    m.request_end("transferred", verb="refer", target="tel:+14155550123")
    done = m.receive(response_done("r1"))
    assert creates(done) == ["Tell the caller you are connecting them to a person."]
    assert not [a for a in done if isinstance(a, Verb)]
    m.receive({"type": "response.created", "response": {"id": "r_say"}})
    assert Verb("refer", "tel:+14155550123") in m.receive(response_done("r_say"))


def test_update_session_moves_session_config_names_where_the_server_has_them() -> None:
    m = machine()
    m.start()
    upd = m.update_session(
        {"voice": "cedar", "transcription_model": None, "audio": {"output": {"speed": 1.2}}}
    )
    assert sends(upd)[0]["session"] == {
        "type": "realtime",
        "audio": {"output": {"speed": 1.2, "voice": "cedar"}, "input": {"transcription": None}},
    }
    flat = machine(caps=Capabilities(nested_audio=False))  # e.g. the vowel engine: top-level voice
    flat.start()
    flat.receive({"type": "session.updated", "session": {}})
    assert sends(flat.update_session({"voice": "Ashley"}))[0]["session"] == {
        "voice": "Ashley",
        "type": "realtime",
    }


def test_agent_line_reported_once_when_sent_as_text_and_transcript() -> None:
    m = machine()
    m.start()
    part = {"response_id": "r1", "item_id": "item_1", "content_index": 0}
    first = m.receive({"type": "response.output_audio_transcript.done", **part, "transcript": "Hi."})
    again = m.receive({"type": "response.text.done", **part, "text": "Hi."})
    other = m.receive({"type": "response.text.done", **part, "item_id": "item_2", "text": "More."})
    assert notices(first, "transcript") == [{"role": "agent", "text": "Hi.", "response_id": "r1"}]
    assert notices(again, "transcript") == []
    assert notices(other, "transcript") == [{"role": "agent", "text": "More.", "response_id": "r1"}]


def test_session_id_last_error_and_response_owed() -> None:
    m = machine(max_identical_calls=1, caps=Capabilities(session_created_first=True))
    m.start()
    assert m.session_id is None and m.last_error is None and not m.response_owed
    m.receive({"type": "session.created", "session": {"id": "sess_1"}})
    assert m.session_id == "sess_1"
    m.receive({"type": "session.updated", "session": {}})
    m.user_text("hello")
    assert m.response_owed  # a response.create went out and is not answered yet
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "same", "{}", resp="r1"))
    m.receive(response_done("r1"))
    assert not m.response_owed  # the tool runs: its response is asked for once it finished
    assert types(m.tool_done("c1", "ok"))[-1] == "response.create" and m.response_owed
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    feed(m, call_events("c2", "same", "{}", resp="r2"))
    broken = m.receive(response_done("r2"))  # the call repeats: answered at once, a reply is owed
    assert notices(broken, "tool.loop_breaker") and types(broken)[-1] == "response.create"
    assert m.response_owed
    m.receive({"type": "response.created", "response": {"id": "r3"}})
    m.receive({"type": "error", "error": {"type": "server_error", "code": "boom", "message": "Oops"}})
    assert m.last_error == {"code": "boom", "error_type": "server_error", "message": "Oops", "param": None}
    m.receive(response_done("r3"))
    assert not m.response_owed


def test_driver_reads_the_leading_type_without_decoding() -> None:
    from sideband.runtime.driver import _leading_type
    from sideband.runtime.machine import HANDLED_TYPES

    assert _leading_type(b'{"type":"response.output_audio_transcript.delta","delta":"x"}') == (
        b"response.output_audio_transcript.delta"
    )
    assert _leading_type(b'{"type": "session.updated", "session": {}}') == b"session.updated"
    assert _leading_type(b'{"event_id":"e","type":"error"}') is None  # not first: decoded normally
    assert _leading_type(b'{"type":') is None and _leading_type(b"") is None
    assert _leading_type(b'{"type":"session\\u002eupdated"}') is None  # an escape: decoded normally
    assert "response.done" in HANDLED_TYPES and "response.output_audio_transcript.delta" not in HANDLED_TYPES


# ------------------------------------------------------------------------------------ edge cases
def refusal(event_id: Any) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "code": "conversation_already_has_active_response",
            "message": "Conversation already has an active response in progress.",
            "event_id": event_id,
        },
    }


def creates(actions: list[Action]) -> list[str]:
    """The instructions of each response.create ("" for a plain one)."""
    return [
        (e.get("response") or {}).get("instructions", "")
        for e in sends(actions)
        if e["type"] == "response.create"
    ]


def test_code_actions_before_the_session_config_follow_it() -> None:
    # OpenAI: start() puts session.update and the greeting first; a say waits for the greeting's done.
    m = machine(greeting="Say hello")
    first = m.start()
    assert types(first) == ["session.update", "response.create"]
    assert [(e["type"], e["session"]) for e in sends(m.update_session({"instructions": "VIP"}))] == [
        ("session.update", {"instructions": "VIP", "type": "realtime"})
    ]
    assert m.say("Mention the recording") == []
    m.receive({"type": "response.created", "response": {"id": "r_greet"}})
    assert creates(m.receive(response_done("r_greet"))) == ["Mention the recording"]
    # vowel: what code asks for before the engine confirmed our session.update is held until then.
    v = machine(caps=Capabilities(session_created_first=True, call_verbs=False, responds_to_user_text=True))
    assert v.start() == []
    assert v.update_session({"instructions": "VIP"}) == [] and v.say("Welcome back") == []
    assert types(v.user_text("hi")) == []
    assert types(v.receive({"type": "session.created", "session": {"id": "sess_1"}})) == ["session.update"]
    ready = v.receive({"type": "session.updated", "session": {}})
    assert notices(ready, "sideband.ready") == [{}]
    # (the engine answers the text by itself: the say follows that answer rather than replace it)
    assert types(ready) == ["session.update", "conversation.item.create"]
    assert sends(ready)[0]["session"] == {"instructions": "VIP", "type": "realtime"}
    assert types(v.receive({"type": "response.created", "response": {"id": "r_text"}})) == []
    assert creates(v.receive(response_done("r_text"))) == ["Welcome back"]


def test_an_engine_say_refused_waits_for_the_outputs_of_the_calls_announced_since() -> None:
    """The engine holds a ``response.create`` until every call it announced has its output: a say()
    refused while a response of the engine's own ran (its answer to the caller) is asked for again as a
    first one goes, once the tools that response started have answered."""
    m = engine_machine()
    m.receive({"type": "session.updated", "session": {}})
    assert creates(m.say("Tell them about the sale.")) == ["Tell them about the sale."]
    m.receive(refusal(None))
    m.receive({"type": "response.created", "response": {"id": "resp_1"}})
    m.receive(engine_call("call_1", "resp_1"))
    done = m.receive(response_done("resp_1", status="incomplete"))
    assert [a.call_id for a in done if isinstance(a, RunTool)] == ["call_1"]
    assert creates(done) == []  # call_1 owes its output: the engine would hold a create
    answered = m.tool_done("call_1", '{"status":"shipped"}')
    assert types(answered) == ["conversation.item.create", "response.create"]
    assert creates(answered) == ["Tell them about the sale."]
    m.receive({"type": "response.created", "response": {"id": "resp_2"}})
    assert creates(m.receive(response_done("resp_2"))) == [""]  # then the answer to the output


def test_speech_reported_before_the_engine_took_codes_text_holds_no_answer_back() -> None:
    """Audio with speech, then at once code's text: the engine reports that speech as it reads the audio,
    before it takes the text. The text went out over it: the answer to the outputs of the text's tool
    calls is asked for at once, not held until SPEECH_CAP for a stop that audio ending mid-speech never
    brings. Speech reported once the engine took a text is the caller's, and holds it back."""
    text = [{"type": "input_text", "text": "order 1042"}]
    user_item = {
        "type": "conversation.item.created",
        "item": {"type": "message", "role": "user", "content": text},
    }

    def tool_round(resp: str, call_id: str) -> list[Action]:
        m.receive({"type": "response.created", "response": {"id": resp}})
        m.receive(engine_call(call_id, resp))
        m.receive(response_done(resp, status="incomplete"))
        return m.tool_done(call_id, '{"status":"shipped"}')

    m = engine_machine()
    m.receive({"type": "session.updated", "session": {}})
    m.user_text("order 1042")
    m.receive({"type": "input_audio_buffer.speech_started", "item_id": "item_a"})
    m.receive(user_item)
    assert types(tool_round("resp_1", "call_1")) == ["conversation.item.create", "response.create"]
    m.receive({"type": "response.created", "response": {"id": "resp_2"}})
    m.receive(response_done("resp_2"))
    m.user_text("order 7")
    m.receive(user_item)
    m.receive({"type": "input_audio_buffer.speech_started", "item_id": "item_b"})
    assert types(tool_round("resp_3", "call_2")) == ["conversation.item.create"]  # (the caller speaks)
    assert creates(m.receive({"type": "input_audio_buffer.speech_stopped", "item_id": "item_b"})) == []
    assert creates(m.timer("turn")) == [""]  # (the engine did not answer their turn: we ask)
    # OpenAI answers no text by itself: the text's create waits for the caller's speech, whenever reported.
    o = live_machine()
    assert types(o.user_text("[keypad] 42")) == ["conversation.item.create", "response.create"]
    o.receive({"type": "input_audio_buffer.speech_started", "item_id": "item_c"})
    o.receive({"type": "response.created", "response": {"id": "resp_k"}})
    o.receive(response_done("resp_k", output=[function_call("call_3")]))
    assert types(o.tool_done("call_3", "{}")) == ["conversation.item.create"]


def test_a_goodbye_asked_for_before_the_engine_confirmed_the_session_waits_for_it() -> None:
    m = machine(caps=ENGINE_CAPABILITIES)
    assert m.start() == []
    assert sends(m.request_end("idle_timeout", goodbye=True)) == []
    assert types(m.receive({"type": "session.created", "session": {"id": "sess_1"}})) == ["session.update"]
    ready = m.receive({"type": "session.updated", "session": {}})
    assert creates(ready) == [DEFAULT_GOODBYE] and m.closed is None


def test_failed_refer_falls_back_to_hangup_and_ends_as_transfer_failed() -> None:
    m = machine()
    m.start()
    actions = m.request_end("transferred", verb="refer", target="tel:+14155550123")
    assert Verb("refer", "tel:+14155550123") in actions
    fallback = m.verb_done(False, "refer answered 400")
    assert notices(fallback, "call.verb_failed") == [{"verb": "refer", "detail": "refer answered 400"}]
    assert fallback[-1] == Verb("hangup") and m.closed is None
    assert m.verb_done(True) == [Close("transfer_failed")]
    # A failed hangup (after a failed refer too) ends our part as hangup_failed: the call may be up.
    m2 = machine()
    m2.start()
    m2.request_end("transferred", verb="refer", target="tel:+1")
    m2.verb_done(False, "400")
    assert m2.verb_done(False, "503")[-1] == Close("hangup_failed")
    m3 = machine()
    m3.start()
    m3.request_end("hangup")
    failed = m3.verb_done(False, "503")
    assert notices(failed, "call.verb_failed") == [{"verb": "hangup", "detail": "503"}]
    assert failed[-1] == Close("hangup_failed")
    # A refer that finds the call gone (404) transferred nothing.
    m4 = machine()
    m4.start()
    m4.request_end("transferred", verb="refer", target="tel:+1")
    gone = m4.verb_done(True, "call already gone", gone=True)
    assert notices(gone, "call.verb_failed") == [{"verb": "refer", "detail": "call already gone"}]
    assert gone[-1] == Close("call_not_found")
    # A hangup that finds it gone did what it meant to.
    m5 = machine()
    m5.start()
    m5.request_end("hangup")
    assert m5.verb_done(True, "call already gone", gone=True) == [Close("hangup")]


def transferring(**kw: Any) -> CallMachine:
    """A live machine whose transfer's REFER was answered 200."""
    m = live_machine(**kw)
    assert Verb("refer", "tel:+14155550123") in m.request_end(
        "transferred", verb="refer", target="tel:+14155550123"
    )
    assert m.verb_done(True) == [StartTimer("transfer", kw.get("transfer_confirm", 45.0))]
    return m


@pytest.mark.parametrize("close", ["clean", "lost"])
def test_a_refers_200_keeps_the_call_until_the_server_ends_it(close: str) -> None:
    """The 200 only says the REFER was handed over: the call stays ours, going (nothing started or said,
    tool calls discarded, code's hangup and the limits ignored), until the server closes the sideband."""
    m = transferring(max_call_duration=600, max_idle_duration=30)
    assert m.closed is None and m.verb_sent and m.transferring
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    feed(m, call_events("c2", "lookup", "{}", resp="r2"))
    done = m.receive(response_done("r2"))
    assert not [a for a in done if isinstance(a, (RunTool, Send))]
    assert [n["reason"] for n in notices(done, "tool.discarded")] == ["call_ending"]
    assert m.request_end("hangup") == [] and m.say("one more thing") == []
    assert m.timer("end_cap") == [] and m.timer("max_duration") == [] and m.timer("idle") == []
    assert m.closed is None
    if close == "clean":
        assert m.transport_closed(1000) == [Close("transferred")] and not m.transferring
    else:  # dropped, and not attached again (the re-attach given up): a hangup tells
        probe = m.sideband_lost()
        assert notices(probe, "call.transfer_unconfirmed") == [
            {"target": "tel:+14155550123", "why": "sideband_lost", "waited_s": None}
        ]
        assert probe[-1] == Verb("hangup") and not m.transferring
        assert m.verb_done(True, "call already gone", gone=True) == [Close("transferred")]
    assert m.timer("transfer") == []  # (the window's timer, should it fire still, finds the call over)


@pytest.mark.parametrize("end", ["closed", "gone", "window"])
def test_a_transfer_attached_again_waits_on_the_new_socket_for_the_rest_of_its_window(end: str) -> None:
    """A socket lost after the refer's 200 is attached again (a blip while the carrier carries the
    transfer out): nothing of ours starts on the new one (only the session config goes; the model's
    tool calls are discarded; no say, no filler), the window's timer goes on, and the call ends as it
    would have over the first: the server's close or its refusal of the re-attach (the call gone) says
    ``transferred``; the window's end hangs it up."""
    m = transferring(filler_after={"lookup": 0.5}, greeting="Hello.")
    again = m.reattached()
    assert types(again) == ["session.update"] and not [a for a in again if isinstance(a, StartTimer)]
    assert m.transferring and m.say("one more thing") == [] and m.request_end("hangup") == []
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    feed(m, call_events("c2", "lookup", "{}", resp="r2"))
    done = m.receive(response_done("r2"))
    assert not [a for a in done if isinstance(a, (RunTool, Send, StartTimer))]
    assert [n["reason"] for n in notices(done, "tool.discarded")] == ["call_ending"]
    assert m.timer("filler:c2") == [] and m.timer("orphans") == []
    if end == "closed":
        assert m.transport_closed(1000) == [Close("transferred")]
    elif end == "gone":
        assert m.fail("call_not_found") == [Close("transferred")]
    else:
        fallback = m.timer("transfer")
        assert [n["why"] for n in notices(fallback, "call.transfer_unconfirmed")] == ["window"]
        assert fallback[-1] == Verb("hangup")
        assert m.verb_done(True) == [Close("transfer_failed")]


def test_a_transfer_the_server_does_not_end_within_the_window_is_hung_up() -> None:
    m = transferring(transfer_confirm=5.0)
    fallback = m.timer("transfer")
    assert notices(fallback, "call.transfer_unconfirmed") == [
        {"target": "tel:+14155550123", "why": "window", "waited_s": 5.0}
    ]
    assert notices(fallback, "call.ending") == [
        {"reason": "transfer_failed", "verb": "hangup", "target": None}
    ]
    assert fallback[-1] == Verb("hangup") and m.closed is None and not m.transferring
    assert m.timer("transfer") == [] and m.request_end("hangup") == []
    assert m.sideband_lost() == []  # the hangup's answer ends the call
    assert m.verb_done(True) == [Close("transfer_failed")]
    # Its sideband closed (by the hangup, or as the transfer took at the last moment): the hangup's
    # answer tells which; a failure of it is no sign the call is up. The hangup failing; the call gone
    # by then (it ended without us).
    answers: list[tuple[dict[str, Any], str]] = [
        ({"ok": True}, "transfer_failed"),
        ({"ok": True, "detail": "call already gone", "gone": True}, "transferred"),
        ({"ok": False, "detail": "503"}, "transfer_failed"),
    ]
    for answer, reason in answers:
        m2 = transferring()
        m2.timer("transfer")
        assert m2.transport_closed(1000) == [] and m2.closed is None
        assert m2.verb_done(**answer)[-1] == Close(reason)
    m3 = transferring()
    m3.timer("transfer")
    assert m3.verb_done(False, "503")[-1] == Close("hangup_failed")
    m4 = transferring()
    m4.timer("transfer")
    assert m4.verb_done(True, "call already gone", gone=True) == [Close("transferred")]


def test_a_call_found_gone_while_a_verb_is_out_ends_as_that_verb_can_tell() -> None:
    """A re-attach refused as the call is gone while a verb of ours is out: the hangup after a transfer's
    window is waited for (finding the call gone, the transfer took: ``transferred``; failing, the call is
    known ended all the same: ``transfer_failed``, not ``hangup_failed``, nor after a shutdown); another
    hangup's answer tells nothing more: the call ends now, with its reason."""
    for answer, reason in (({"ok": True, "gone": True}, "transferred"), ({"ok": False}, "transfer_failed")):
        m = transferring()
        m.timer("transfer")
        assert m.sideband_lost(gone=True) == [] and m.closed is None
        assert m.verb_done(**answer)[-1] == Close(reason)
    m = transferring()
    m.timer("transfer")
    m.sideband_lost(gone=True)
    assert m.fail("shutdown") == [Close("transfer_failed")]
    m = live_machine()
    assert Verb("hangup", None) in m.request_end("done")
    assert m.sideband_lost(gone=True) == [Close("done")]
    # A REFER still unanswered is waited for, and says nothing of the call's end by itself: the caller may
    # have hung up. A shutdown cutting it short ends the call as the call may still be up.
    m = live_machine()
    assert Verb("refer", "tel:+14155550123") in m.request_end(
        "transferred", verb="refer", target="tel:+14155550123"
    )
    assert m.sideband_lost(gone=True) == [] and m.closed is None
    assert m.fail("shutdown")[-1] == Close("hangup_failed")


def test_a_shutdown_while_a_transfer_is_awaited_hangs_it_up() -> None:
    """The transfer may have failed, the caller still on: a drain hangs the call up rather than leave
    it to nobody; its run cut short (no verb can go any more), it ends ``transferred``."""
    m = transferring()
    assert m.abandon("internal_error") == [] and m.closed is None  # the window still decides
    probe = m.abandon("shutdown")
    assert [n["why"] for n in notices(probe, "call.transfer_unconfirmed")] == ["shutdown"]
    assert probe[-1] == Verb("hangup")
    assert m.verb_done(True) == [Close("transfer_failed")]
    m2 = transferring()
    assert m2.fail("shutdown") == [Close("transferred")]  # (the run cut short: no hangup_failed)
    m3 = transferring()
    m3.timer("transfer")  # its hangup is out: a shutdown cuts it short, the call may still be up
    assert m3.fail("shutdown")[-1] == Close("hangup_failed")


def test_a_refer_found_ended_by_its_own_follow_up_ends_the_call_at_once() -> None:
    """The REFER's answer was lost and the hangup after it found the call gone: the call is over, and
    no transfer window is waited out."""
    m = live_machine()
    m.request_end("transferred", verb="refer", target="tel:+14155550123")
    assert m.verb_done(True, ended=True) == [Close("transferred")] and not m.transferring


def test_an_invalid_create_breaks_no_run_of_server_failures() -> None:
    """A ``say()`` refused as invalid (the app's mistake) is not the server failing: a response the
    server then fails is still asked for again."""
    m = live_machine()
    said = next(a.event for a in m.say("x") if isinstance(a, Send))
    m.receive(refused_by(said, "invalid_request_error", "invalid_value"))
    m.receive({"type": "response.created", "response": {"id": "r_vad"}})
    failed = m.receive(response_done("r_vad", status="failed"))
    assert [n["retry"] for n in notices(failed, "response.failed")] == [True]


def test_a_refers_200_with_nothing_left_to_watch_the_transfer_hangs_the_call_up_at_once() -> None:
    """The REFER is out when its sideband is given up (not attached again) or a drain begins: its 200 then
    hangs the call up at once (``transferred`` if the hangup finds it gone), as for a transfer awaited
    then; nothing would tell whether the transfer took. A sideband the server closed said the call
    ended: the 200 ends it ``transferred``."""
    for lost, why in (
        (lambda m: m.sideband_lost(), "sideband_lost"),
        (lambda m: m.abandon("shutdown"), "shutdown"),
    ):
        m = live_machine()
        m.request_end("transferred", verb="refer", target="tel:+14155550123")
        assert lost(m) == [] and m.closed is None  # (the answer decides)
        answered = m.verb_done(True)
        assert notices(answered, "call.transfer_unconfirmed") == [
            {"target": "tel:+14155550123", "why": why, "waited_s": None}
        ]
        assert answered[-1] == Verb("hangup") and m.closed is None
        assert m.verb_done(True, "call already gone", gone=True) == [Close("transferred")]
    m = live_machine()
    m.request_end("transferred", verb="refer", target="tel:+14155550123")
    assert m.transport_closed(1000) == []
    assert m.verb_done(True) == [Close("transferred")]
    # A REFER held back (the model still speaking) that the drain itself sends: the same.
    m = live_machine()
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    held = m.request_end("transferred", verb="refer", target="tel:+14155550123")
    assert Verb("refer", "tel:+14155550123") not in held
    assert Verb("refer", "tel:+14155550123") in m.abandon("shutdown")
    answered = m.verb_done(True)
    assert notices(answered, "call.transfer_unconfirmed")[0]["why"] == "shutdown"
    assert answered[-1] == Verb("hangup")
    m2 = live_machine()
    m2.request_end("transferred", verb="refer", target="tel:+14155550123")
    m2.sideband_lost()
    assert m2.verb_done(False, "400")[-1] == Verb("hangup")  # a refused REFER: hung up as ever
    assert m2.verb_done(True) == [Close("transfer_failed")]


def test_refused_filler_is_dropped_once_its_tool_finished() -> None:
    m = machine(filler_after={"slow": 1.5})
    m.start()
    m.receive({"type": "response.created", "response": {"id": "resp_1"}})
    feed(m, call_events("call_1", "slow", "{}"))
    m.receive(response_done())
    filler = sends(m.timer("filler:call_1"))[0]
    m.receive({"type": "response.created", "response": {"id": "resp_vad"}})  # the caller spoke meanwhile
    assert sends(m.receive(refusal(filler["event_id"]))) == []
    assert types(m.tool_done("call_1", '{"result":"found"}')) == ["conversation.item.create"]
    after = m.receive(response_done("resp_vad"))
    assert creates(after) == [""]  # the answer's response.create, no stale "still working on it"
    assert notices(after, "response.dropped") == [{"purpose": "filler:call_1"}]
    # ...while a tool still running gets its refused filler again after the other response.
    m2 = machine(filler_after={"slow": 1.5})
    m2.start()
    m2.receive({"type": "response.created", "response": {"id": "resp_1"}})
    feed(m2, call_events("call_1", "slow", "{}"))
    m2.receive(response_done())
    filler = sends(m2.timer("filler:call_1"))[0]
    m2.receive({"type": "response.created", "response": {"id": "resp_vad"}})
    m2.receive(refusal(filler["event_id"]))
    assert creates(m2.receive(response_done("resp_vad"))) == [DEFAULT_FILLER]


def test_a_refused_filler_is_dropped_once_the_call_is_ending_though_its_tool_still_runs() -> None:
    m = machine(filler_after={"slow": 1.5})
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    feed(m, [*call_events("call_1", "slow", "{}"), response_done()])
    filler = sends(m.timer("filler:call_1"))[0]
    m.receive({"type": "response.created", "response": {"id": "resp_vad"}})  # the caller spoke meanwhile
    m.receive(refusal(filler["event_id"]))
    m.request_end("hangup")
    after = m.receive(response_done("resp_vad"))
    assert creates(after) == [] and notices(after, "response.dropped") == [{"purpose": "filler:call_1"}]
    assert not [a for a in after if isinstance(a, Verb)]  # the tool still runs: its output goes first


def test_refused_greeting_is_never_replayed() -> None:
    m = machine(greeting="Say hello")
    greeting = sends(m.start())[1]
    m.receive({"type": "response.created", "response": {"id": "resp_vad"}})  # the caller spoke first
    m.receive(refusal(greeting["event_id"]))
    after = m.receive(response_done("resp_vad"))
    assert creates(after) == [] and notices(after, "response.dropped") == [{"purpose": "greeting"}]
    assert not m.response_owed
    assert types(m.reattached()) == ["session.update"]


def test_refusal_arriving_after_the_blocking_response_ended_is_sent_again_at_once() -> None:
    m = machine()
    m.start()
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "t", "{}", resp="r1"))
    m.receive(response_done("r1"))
    first = sends(m.tool_done("c1", "x"))[1]
    m.receive({"type": "response.created", "response": {"id": "r_vad"}})
    m.receive(response_done("r_vad"))
    again = m.receive(refusal(first["event_id"]))  # late: the blocking response is already over
    assert creates(again) == [""] and sends(again)[0]["event_id"] != first["event_id"]
    # The refusal arriving before the blocking response was announced waits for its response.done.
    m2 = machine()
    m2.start()
    m2.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m2, call_events("c1", "t", "{}", resp="r1"))
    m2.receive(response_done("r1"))
    first = sends(m2.tool_done("c1", "x"))[1]
    assert sends(m2.receive(refusal(first["event_id"]))) == []
    m2.receive({"type": "response.created", "response": {"id": "r_vad"}})
    assert creates(m2.receive(response_done("r_vad"))) == [""]


def test_calls_announced_on_a_lost_socket() -> None:
    # No response.done ever comes for them: the call is not run (its response may have been cancelled);
    # once the grace has passed it gets an "interrupted" output and the model is asked to carry on.
    m = machine()
    m.start()
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "lookup", '{"id":1}', resp="r1"))
    back = m.reattached()
    assert not any(isinstance(a, RunTool) for a in back)
    m.receive({"type": "session.updated", "session": {}})
    fired = m.timer("orphans")
    assert notices(fired, "tool.interrupted") == [{"tool_call_id": "c1", "tool": "lookup"}]
    assert types(fired) == ["conversation.item.create", "response.create"]
    output = sends(fired)[0]["item"]
    assert output["call_id"] == "c1" and json.loads(output["output"])["error"] == "interrupted"
    late = m.receive(
        response_done("r1", output=[{"type": "function_call", "call_id": "c1", "name": "lookup"}])
    )
    assert not any(isinstance(a, RunTool) for a in late)  # never run after it was answered
    # Their response.done arrives on the new socket within the grace: they run as usual, once.
    m2 = machine()
    m2.start()
    m2.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m2, call_events("c1", "lookup", '{"id":1}', resp="r1"))
    assert StartTimer("orphans", MachineConfig(session=SESSION).reattach_grace) in m2.reattached()
    assert [a for a in m2.receive(response_done("r1")) if isinstance(a, RunTool)] == [
        RunTool("c1", "lookup", '{"id":1}')
    ]
    assert m2.timer("orphans") == []


def test_an_end_pending_at_a_reattach_lets_the_goodbye_be_said_before_the_verb() -> None:
    m = machine(max_call_duration=60)
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    goodbye = m.timer("max_duration")  # the socket is lost before this create leaves: it waits to go out
    assert "goodbye" in sends(goodbye)[-1]["response"]["instructions"]
    back = m.reattached()
    assert not [a for a in back if isinstance(a, Verb)]  # not while the goodbye may still be said
    assert StartTimer("orphans", MachineConfig(session=SESSION).reattach_grace) in back
    m.receive({"type": "session.updated", "session": {}})
    m.receive({"type": "response.created", "response": {"id": "r_bye"}})  # the goodbye, on the new socket
    assert not [a for a in m.timer("orphans") if isinstance(a, Verb)]  # being said
    assert Verb("hangup", None) in m.receive(response_done("r_bye"))
    # The goodbye had left for the lost socket, and nothing of it shows on the new one within the grace:
    # it is asked for again, and the verb follows it.
    m2 = machine(max_call_duration=60)
    m2.start()
    m2.receive({"type": "session.updated", "session": {}})
    lost = sends(m2.timer("max_duration"))[-1]
    assert not [a for a in m2.reattached() if isinstance(a, Verb)]
    again = m2.timer("orphans")
    assert not [a for a in again if isinstance(a, Verb)]
    assert [e["response"] for e in sends(again)] == [lost["response"]]
    assert notices(again, "response.lost") == [{"purpose": "goodbye"}]
    m2.receive({"type": "response.created", "response": {"id": "r_bye"}})
    assert Verb("hangup", None) in m2.receive(response_done("r_bye"))


def test_playback_started_before_a_reattach_still_holds_the_verb() -> None:
    m = machine()
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    m.receive({"type": "output_audio_buffer.started", "response_id": "r1"})
    m.request_end("hangup")
    m.reattached()
    assert not [a for a in m.receive(response_done("r1")) if isinstance(a, Verb)]  # still heard
    assert Verb("hangup", None) in m.receive({"type": "output_audio_buffer.stopped", "response_id": "r1"})
    # The stop came while no socket was attached (nothing of the playback shows on the new one): the
    # verb goes at the end of the grace, not at the end cap.
    m2 = machine()
    m2.start()
    m2.receive({"type": "session.updated", "session": {}})
    m2.receive({"type": "response.created", "response": {"id": "r1"}})
    m2.receive({"type": "output_audio_buffer.started", "response_id": "r1"})
    m2.receive(response_done("r1"))
    m2.request_end("hangup")
    assert not [a for a in m2.reattached() if isinstance(a, Verb)]
    assert Verb("hangup", None) in m2.timer("orphans")


def test_code_session_updates_survive_a_reattach() -> None:
    m = machine()
    m.start()
    m.update_session({"instructions": "The caller is Alice, a VIP."})
    m.update_session({"audio": {"output": {"speed": 1.1}}})
    m.update_session({"audio": {"output": {"voice": "cedar"}, "input": {"noise_reduction": None}}})
    m.update_session({"tools": [{"type": "function", "name": "a"}]})
    m.update_session({"tools": [], "instructions": "The caller is Alice."})
    again = sends(m.reattached())
    # the base config without the fields code set, then code's updates, each as one update (the server
    # takes or refuses one whole), with what no later one sets; a voice in one of its own
    assert again[0]["session"] == {"type": "realtime"}
    assert [e["session"] for e in again[1:]] == [
        {"type": "realtime", "audio": {"output": {"speed": 1.1}}},
        {"type": "realtime", "audio": {"output": {"voice": "cedar"}}},
        {"type": "realtime", "audio": {"input": {"noise_reduction": None}}},
        {"type": "realtime", "tools": [], "instructions": "The caller is Alice."},
    ]
    assert [e["session"] for e in sends(m.reattached())] == [e["session"] for e in again]


def test_a_replayed_nested_setting_is_replaced_whole() -> None:
    m = machine()
    m.start()
    semantic = {"type": "semantic_vad", "eagerness": "high"}
    m.update_session({"audio": {"input": {"turn_detection": semantic}}})
    m.update_session({"audio": {"input": {"turn_detection": {"type": "server_vad"}}}})
    again = sends(m.reattached())
    assert [e["session"] for e in again[1:]] == [
        {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "server_vad"}}}}
    ]


def test_a_call_updating_its_session_every_turn_replays_one_update() -> None:
    m = machine()
    m.start()
    for turn in range(500):
        m.update_session({"instructions": f"turn {turn}"})
    again = sends(m.reattached())
    assert [e["session"].get("instructions") for e in again[1:]] == ["turn 499"]


def test_a_reattach_sends_the_base_config_without_the_fields_code_set() -> None:
    """The server keeps the call's session: the config's voice sent again after code changed it and
    the model spoke would get the whole update refused, the config's instructions would undo code's."""
    audio = {"output": {"voice": "alloy", "speed": 1.0}, "input": {"noise_reduction": None}}
    m = CallMachine(MachineConfig(session={**SESSION, "audio": audio}))
    m.start()
    m.update_session({"audio": {"output": {"voice": "cedar"}}})
    again = sends(m.reattached())
    assert again[0]["session"] == {**SESSION, "audio": {"output": {"speed": 1.0}, "input": audio["input"]}}
    assert [e["session"] for e in again[1:]] == [
        {"type": "realtime", "audio": {"output": {"voice": "cedar"}}}
    ]
    m.update_session(
        {"instructions": "VIP", "audio": {"output": {"speed": 1.2}, "input": {"noise_reduction": None}}}
    )
    assert sends(m.reattached())[0]["session"] == {"type": "realtime"}
    assert m.config.session["audio"] == audio  # (left as it was)


def test_an_update_whose_answer_was_lost_is_sent_again_whole_and_taken_back_when_refused() -> None:
    """Its answer, a refusal, may have been lost with the socket: sent again as one update, the server
    refuses it whole again, and what it set is back (not kept, nor taken in part)."""
    m = live_machine()
    m.update_session({"instructions": "Be brief."})
    m.receive({"type": "session.updated", "session": {}})
    prompt = {"id": "pmpt_gone"}
    m.update_session({"instructions": "Check.", "tool_choice": "required", "prompt": prompt})
    again = sends(m.reattached())  # (lost before its answer came)
    assert [e["session"] for e in again[1:]] == [
        {"type": "realtime", "instructions": "Check.", "tool_choice": "required", "prompt": prompt}
    ]
    refused = m.receive(update_refused(again[1]["event_id"]))
    assert notices(refused, "session.update_refused") == [
        {"event_id": again[1]["event_id"], "fields": ["instructions", "tool_choice", "prompt"]}
    ]
    assert m.updated_field(("instructions",)) == "Be brief." and m.updated_field(("tool_choice",)) is None
    assert replayed(m) == []  # (the server has "Be brief.": the base config leaves it alone)


def test_a_voice_sent_again_after_a_reattach_goes_alone() -> None:
    """The voice changed since code's update went (a WebRTC page's own update) and the model spoke: the
    server refuses the voice sent again, and only it: the tools and instructions it came with stand."""
    m = live_machine()
    m.update_session({"audio": {"output": {"voice": "cedar"}}, "tools": [], "instructions": "VIP"})
    m.receive({"type": "session.updated", "session": {}})
    again = sends(m.reattached())
    assert [e["session"] for e in again[1:]] == [
        {"type": "realtime", "audio": {"output": {"voice": "cedar"}}},
        {"type": "realtime", "tools": [], "instructions": "VIP"},
    ]
    refused = m.receive(update_refused(again[1]["event_id"]))
    assert notices(refused, "session.update_refused") == [
        {"event_id": again[1]["event_id"], "fields": ["audio.output.voice"]}
    ]
    assert m.updated_field(("tools",)) == [] and m.updated_field(("instructions",)) == "VIP"


def test_an_update_still_queued_at_a_reattach_is_not_sent_again() -> None:
    """It never left: it goes out first on the new socket, as it is; the base config leaves its fields
    alone, and its refusal there takes it back."""
    m = live_machine()
    (update,) = sends(m.update_session({"instructions": "Check.", "model": "x"}))
    again = sends(m.reattached([update["event_id"]]))
    assert [e["session"] for e in again] == [{"type": "realtime"}]
    refused = m.receive(update_refused(update["event_id"]))
    assert notices(refused, "session.update_refused") == [
        {"event_id": update["event_id"], "fields": ["instructions", "model"]}
    ]
    assert m.updated_field(("instructions",)) is None


def update_refused(event_id: str) -> dict[str, Any]:
    """The server's ``error`` refusing our client event ``event_id`` (OpenAI names it)."""
    error = {"type": "invalid_request_error", "code": "invalid_value", "event_id": event_id}
    return {"type": "error", "error": {**error, "param": "session.model"}}


def replayed(m: CallMachine) -> list[dict[str, Any]]:
    """What a re-attach sends again after the base config (which leaves out what code set)."""
    again = sends(m.reattached())
    base = {key: value for key, value in m.config.session.items() if m.updated_field((key,)) is None}
    assert again[0]["session"] == base
    return [e["session"] for e in again[1:]]


def test_an_update_the_server_refused_is_not_sent_again_after_a_reattach() -> None:
    """OpenAI refuses a session.update whole (here a model the key may not use): none of its fields
    applied, so a re-attach must not send them again one by one, where the server would take those it
    can (a forced tool_choice alone); the fields an earlier update set are back."""
    m = machine()
    m.start()
    m.receive({"type": "session.updated", "session": {}})  # (the base config)
    m.update_session({"instructions": "Be brief."})
    m.receive({"type": "session.updated", "session": {}})
    forced = {"type": "function", "name": "check_order"}
    (update,) = sends(m.update_session({"instructions": "Check first.", "tool_choice": forced, "model": "x"}))
    assert m.updated_field(("tool_choice",)) == forced
    out = m.receive(update_refused(update["event_id"]))
    assert notices(out, "session.update_refused") == [
        {"event_id": update["event_id"], "fields": ["instructions", "tool_choice", "model"]}
    ]
    assert m.updated_field(("tool_choice",), "none") == "none"
    assert m.updated_field(("instructions",)) == "Be brief."
    assert replayed(m) == [{"type": "realtime", "instructions": "Be brief."}]


def test_a_refusal_after_a_session_updated_of_another_update_is_taken_back() -> None:
    """A WebRTC call's browser updates the session too: its session.updated is no answer to ours."""
    m = live_machine()
    forced = {"type": "function", "name": "check_order"}
    (update,) = sends(m.update_session({"tool_choice": forced, "model": "nope"}))
    m.receive({"type": "session.updated", "session": {}})  # the browser's update
    refused = m.receive(
        {"type": "error", "error": {"type": "invalid_request_error", "event_id": update["event_id"]}}
    )
    assert notices(refused, "session.update_refused") == [
        {"event_id": update["event_id"], "fields": ["tool_choice", "model"]}
    ]
    assert m.updated_field(("model",)) is None and m.updated_field(("tool_choice",)) is None


def test_a_refused_update_leaves_what_an_update_sent_after_it_sets() -> None:
    """The server applies updates in order: one sent after the refused one, before its refusal arrived,
    sets the session's field; refused too, the field is back to what it was before both."""
    m = machine()
    m.start()
    m.update_session({"instructions": "A"})
    (first,) = sends(m.update_session({"instructions": "B", "model": "x"}))
    (second,) = sends(m.update_session({"instructions": "C", "tool_choice": "required"}))
    assert notices(m.receive(update_refused(first["event_id"])), "session.update_refused") == [
        {"event_id": first["event_id"], "fields": ["model"]}
    ]
    assert m.updated_field(("instructions",)) == "C"
    m.receive(update_refused(second["event_id"]))
    assert m.updated_field(("instructions",)) == "A" and m.updated_field(("tool_choice",)) is None
    assert replayed(m) == [{"type": "realtime", "instructions": "A"}]


def test_updates_answered_after_more_than_are_kept_still_find_a_refusal() -> None:
    """Many updates go out before the server answers any: the answers of those no longer kept are not
    taken for later ones', and the refusal of the last still takes it back."""
    m = machine()
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    for step in range(100):
        m.update_session({"instructions": f"step {step}"})
    (last,) = sends(m.update_session({"tool_choice": "required", "model": "x"}))
    for _ in range(100):
        m.receive({"type": "session.updated", "session": {}})
    m.receive(update_refused(last["event_id"]))
    assert replayed(m) == [{"type": "realtime", "instructions": "step 99"}]


def test_an_update_held_before_the_engine_confirmed_the_session_is_taken_back_when_refused() -> None:
    """vowel: code's update is held until the engine confirmed our session config; then sent, it is
    answered after it, and a refusal naming it takes it back."""
    v = machine(caps=ENGINE_CAPABILITIES)
    v.start()
    assert v.update_session({"instructions": "VIP"}) == []
    (config,) = sends(v.receive({"type": "session.created", "session": {"id": "sess_1"}}))
    held = sends(v.receive({"type": "session.updated", "session": {}}))  # (the config's answer)
    assert [e["session"] for e in held] == [{"type": "realtime", "instructions": "VIP"}]
    assert config["event_id"] != held[0]["event_id"]
    v.receive(update_refused(held[0]["event_id"]))
    assert v.updated_field(("instructions",)) is None


def test_code_raw_session_update_counts_among_the_answers_awaited() -> None:
    """A raw session.update of code's gets its own event_id, and its answer is not taken for the answer
    of an update of ours sent after it."""
    m = machine()
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    (raw,) = sends(m.send_raw({"type": "session.update", "session": {"type": "realtime"}}))
    assert raw["event_id"].startswith("sb_update_")
    (ours,) = sends(m.update_session({"instructions": "B", "model": "x"}))
    m.receive({"type": "session.updated", "session": {}})  # (the raw one's)
    m.receive(update_refused(ours["event_id"]))
    assert m.updated_field(("instructions",)) is None


def test_a_refusal_that_names_no_event_is_taken_for_our_unanswered_create() -> None:
    m = machine()
    m.start()
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c", "t", "{}", resp="r1"))
    m.receive(response_done("r1"))
    first = sends(m.tool_done("c", "o"))[1]
    assert types(m.receive(refusal(None))) == []  # the caller's turn is not announced yet
    m.receive({"type": "response.created", "response": {"id": "r_vad"}})
    again = sends(m.receive(response_done("r_vad")))
    assert [e["type"] for e in again] == ["response.create"] and again[0]["event_id"] != first["event_id"]


def test_a_refusal_naming_no_event_after_the_callers_turn_was_announced_is_sent_again() -> None:
    m = announced("c")
    first = sends(m.tool_done("c", "o"))[1]
    # The caller's turn (server VAD) started before our output and create arrived: its response.created
    # comes first and looks like the answer to our create, then the refusal names no event.
    m.receive({"type": "response.created", "response": {"id": "r_vad"}})
    assert types(m.receive(refusal(None))) == []  # not while that response runs
    again = sends(m.receive(response_done("r_vad")))
    assert [e["type"] for e in again] == ["response.create"] and again[0]["event_id"] != first["event_id"]
    # The same refusal arriving late, once that response is over: sent again at once.
    late = announced("c")
    sends(late.tool_done("c", "o"))
    late.receive({"type": "response.created", "response": {"id": "r_vad"}})
    assert types(late.receive(response_done("r_vad"))) == []
    assert types(late.receive(refusal(None))) == ["response.create"]


def test_an_other_error_naming_no_event_leaves_our_unanswered_create_awaited() -> None:
    m = machine()
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    assert creates(m.say("first")) == ["first"]
    error = {"type": "invalid_request_error", "code": "invalid_value", "message": "Bad value."}
    assert sends(m.receive({"type": "error", "error": error})) == []
    assert m.say("second") == [] and m.response_owed  # still waiting on "first"
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    assert creates(m.receive(response_done("r1"))) == ["second"]


def test_once_the_end_verb_is_out_no_tool_starts_and_no_output_goes() -> None:
    m = announced("c1")  # c1 runs
    m.request_end("hangup")
    assert Verb("hangup", None) in m.timer("end_cap")  # the cap forces the verb while c1 still runs
    late = m.tool_done("c1", "result")
    assert sends(late) == [] and notices(late, "tool.output_dropped") == [{"tool_call_id": "c1", "tool": "t"}]
    # The caller speaks on while the verb is under way and the model calls a tool: it is not run.
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    feed(m, call_events("c2", "lookup", "{}", resp="r2"))
    done = m.receive(response_done("r2"))
    assert not any(isinstance(a, RunTool) for a in done) and sends(done) == []
    assert notices(done, "tool.discarded") == [
        {"tool_call_id": "c2", "tool": "lookup", "response_status": "completed", "reason": "call_ending"}
    ]
    assert m.user_text("one more thing") == [] and m.update_session({"instructions": "x"}) == []
    assert m.say("goodbye") == []
    assert isinstance(m.verb_done(True)[-1], Close)


def test_the_line_is_not_idle_while_the_model_speaks_or_a_tool_works() -> None:
    """The idle clock counts the caller's silence once the model has had its say: it starts again at the
    end of each response and of its playback, and a limit that comes due meanwhile waits its turn."""
    m = machine(max_idle_duration=10)
    m.start()
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "slow", "{}", resp="r1"))
    actions = m.receive(response_done("r1"))
    assert StartTimer("idle", 10) in actions and any(isinstance(a, RunTool) for a in actions)
    assert m.timer("idle") == [StartTimer("idle", 10)]  # the tool still works for the caller
    m.tool_done("c1", "x")  # its output, then our response.create
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    m.receive({"type": "output_audio_buffer.started", "response_id": "r2"})
    assert StartTimer("idle", 10) in m.receive(response_done("r2"))
    assert m.timer("idle") == [StartTimer("idle", 10)]  # still heard
    assert m.receive({"type": "output_audio_buffer.stopped", "response_id": "r2"}) == [StartTimer("idle", 10)]
    ending = m.timer("idle")  # the caller said nothing since the model finished: idle
    assert notices(ending, "call.limit") == [{"limit": "idle"}]


@pytest.mark.parametrize(
    "stuck",
    [
        [{"type": "response.created", "response": {"id": "r1"}}, {"type": "output_audio_buffer.started"}],
        [{"type": "response.create"}],  # (ours, refused by an error naming no event: never answered)
    ],
    ids=["playback-never-stopped", "create-never-answered"],
)
def test_the_idle_limit_waits_once_for_a_busy_line_then_is_the_backstop(stuck: list[dict[str, Any]]) -> None:
    m = machine(max_idle_duration=10)
    m.start()
    for event in stuck:
        if event["type"] == "response.create":
            m.say("Anyone there?")
        else:
            m.receive(event)
    assert m.timer("idle") == [StartTimer("idle", 10)]  # busy: it waits one more period
    ending = m.timer("idle")  # still busy a full period later: stuck, and the call is idle
    assert notices(ending, "call.limit") == [{"limit": "idle"}]


def test_playback_under_way_at_a_reattach_still_keeps_the_line_busy() -> None:
    """The socket is lost while the caller hears the model: the audio plays on, so an idle limit due
    meanwhile waits, and an end asked for then waits for the stop, until the stop shows on the new
    socket or the re-attach grace ends (the stop may have gone out while no socket was attached)."""

    def playing() -> CallMachine:
        m = machine(max_idle_duration=10)
        m.start()
        m.receive({"type": "session.updated", "session": {}})
        m.receive({"type": "response.created", "response": {"id": "r1"}})
        m.receive({"type": "output_audio_buffer.started", "response_id": "r1"})
        m.receive(response_done("r1"))
        assert StartTimer("orphans", 2.0) in m.reattached()
        m.receive({"type": "session.updated", "session": {}})
        return m

    m = playing()
    assert m.timer("idle") == [StartTimer("idle", 10)]  # the caller still hears the model
    assert m.receive({"type": "output_audio_buffer.stopped", "response_id": "r1"}) == [StartTimer("idle", 10)]
    assert m.timer("orphans") == []  # the stop showed: nothing left to settle
    assert notices(m.timer("idle"), "call.limit") == [{"limit": "idle"}]

    m = playing()  # no stop on the new socket: the grace ends the playback, and the caller's turn begins
    assert m.timer("orphans") == [StartTimer("idle", 10)]
    assert notices(m.timer("idle"), "call.limit") == [{"limit": "idle"}]

    m = playing()  # a hangup asked for meanwhile waits for the stop, or for the grace
    assert not [a for a in m.request_end("hangup") if isinstance(a, Verb)]
    assert Verb("hangup", None) in m.receive({"type": "output_audio_buffer.stopped", "response_id": "r1"})
    m = playing()
    assert not [a for a in m.request_end("hangup") if isinstance(a, Verb)]
    assert Verb("hangup", None) in m.timer("orphans")

    # A response runs on the new socket when the grace ends: its audio would show; it ends without any
    # (cancelled, or only a tool call), so nothing plays any more and a hangup goes at once.
    m = playing()
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    assert m.timer("orphans") == []
    assert StartTimer("idle", 10) in m.receive(response_done("r2", status="cancelled"))
    assert Verb("hangup", None) in m.request_end("hangup")
    m = playing()  # … or it speaks: its own playback events settle it
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    m.timer("orphans")
    m.receive({"type": "output_audio_buffer.started", "response_id": "r2"})
    m.receive(response_done("r2"))
    assert not [a for a in m.request_end("hangup") if isinstance(a, Verb)]  # the caller hears r2
    assert Verb("hangup", None) in m.receive({"type": "output_audio_buffer.stopped", "response_id": "r2"})


def test_on_an_engine_that_counts_idle_from_speech_the_idle_limit_keeps_to_the_caller() -> None:
    """The vowel engine ends a session whose caller has not spoken for its limit, whatever the model
    does: our clock keeps to the caller's activity alone, so our goodbye comes first."""
    m = machine(max_idle_duration=10, caps=ENGINE_CAPABILITIES)
    m.start()
    m.receive({"type": "session.created", "session": {"id": "s"}})
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "slow", "{}", resp="r1"))
    actions = m.receive(response_done("r1", status="incomplete"))
    assert StartTimer("idle", 10) not in actions and any(isinstance(a, RunTool) for a in actions)
    assert notices(m.timer("idle"), "call.limit") == [{"limit": "idle"}]


def test_the_speech_idle_limit_runs_from_the_callers_speech_alone_and_only_speech_withdraws_its_end() -> None:
    """The vowel engine counts idle time only after speech was detected, from the last: text restarts
    none of it. Our clock for it neither; its end, once due, is not withdrawn by text (the engine would cut
    the session anyway), only by speech."""
    m = machine(max_idle_duration=300, speech_idle_duration=10, caps=ENGINE_CAPABILITIES)
    assert StartTimer("speech_idle", 10) not in m.start()  # no speech yet: no clock
    m.receive({"type": "session.created", "session": {"id": "s"}})
    m.receive({"type": "session.updated", "session": {}})
    assert StartTimer("speech_idle", 10) in m.caller_active()  # speech in audio the backend streams
    typed = m.user_text("hello")
    assert StartTimer("idle", 300) in typed and StartTimer("speech_idle", 10) not in typed
    assert StartTimer("speech_idle", 10) in m.receive(SPEECH_STARTED)  # speech the engine detected
    m.receive(SPEECH_STOPPED)
    assert notices(m.timer("speech_idle"), "call.limit") == [{"limit": "idle"}]
    assert m.ending
    assert notices(m.user_text("still here"), "call.limit_withdrawn") == []  # the engine's clock runs on
    assert m.ending
    back = m.receive(SPEECH_STARTED)
    assert notices(back, "call.limit_withdrawn") == [{"limit": "idle"}] and not m.ending
    assert StartTimer("speech_idle", 10) in back
    m.receive(SPEECH_STOPPED)
    # Our own idle end came first: the speech limit coming due too keeps text from withdrawing it.
    assert notices(m.timer("idle"), "call.limit") == [{"limit": "idle"}]
    assert m.timer("speech_idle") == []
    assert notices(m.user_text("here"), "call.limit_withdrawn") == [] and m.ending


def test_once_the_engine_reports_speech_the_speech_idle_limit_runs_from_its_reports_alone() -> None:
    """The vowel engine starts its idle clock at each start of speech its own detection finds, and says so
    (``speech_started``): from then on our clock for it runs from those reports alone. Sound in the audio
    streamed meanwhile (``caller_active``: a noisy line, louder than near-silence) restarts the idle limit
    only: it neither restarts that clock (one timer per chunk) nor withdraws its end."""
    m = machine(max_idle_duration=300, speech_idle_duration=10, caps=ENGINE_CAPABILITIES)
    m.start()
    m.receive({"type": "session.created", "session": {"id": "s"}})
    m.receive({"type": "session.updated", "session": {}})
    assert StartTimer("speech_idle", 10) in m.caller_active()  # no report yet: the audio's sound counts
    assert StartTimer("speech_idle", 10) in m.receive(SPEECH_STARTED)
    assert m.caller_active() == [StartTimer("idle", 300)]  # the caller's speech streams on
    m.receive(SPEECH_STOPPED)
    assert m.caller_active() == [StartTimer("idle", 300)]  # noise: the engine's clock runs on, ours too
    assert notices(m.timer("speech_idle"), "call.limit") == [{"limit": "idle"}]
    assert m.ending
    assert notices(m.caller_active(), "call.limit_withdrawn") == [] and m.ending  # noise withdraws nothing
    back = m.receive(SPEECH_STARTED)  # the caller speaks again: the engine's clock starts again
    assert notices(back, "call.limit_withdrawn") == [{"limit": "idle"}] and not m.ending
    assert StartTimer("speech_idle", 10) in back


def test_the_speech_idle_limit_ends_an_utterance_whose_stop_never_came() -> None:
    """The backend's audio stopped coming mid-speech: the engine hears no silence, so no ``speech_stopped``
    comes, and its idle clock runs from the speech's start. Once ours for it runs out, the utterance holds
    nothing back: what code asked to say, then the goodbye, go out at once (not after the speech cap,
    nor never, once the end cap closes the session)."""
    m = machine(max_idle_duration=300, speech_idle_duration=10, caps=ENGINE_CAPABILITIES)
    m.start()
    m.receive({"type": "session.created", "session": {"id": "s"}})
    m.receive({"type": "session.updated", "session": {}})
    m.receive(SPEECH_STARTED)
    assert sends(m.say("One more thing.")) == []  # (never over the caller)
    due = m.timer("speech_idle")
    assert notices(due, "call.limit") == [{"limit": "idle"}] and CancelTimer("speaking") in due
    assert [e["response"]["instructions"] for e in sends(due)] == ["One more thing."]
    m.receive({"type": "response.created", "response": {"id": "r_say"}})
    (goodbye,) = sends(m.receive(response_done("r_say")))
    assert goodbye["response"]["instructions"] == DEFAULT_GOODBYE
    m.receive({"type": "response.created", "response": {"id": "r_bye"}})
    assert Close("idle_timeout") in m.receive(response_done("r_bye"))


def test_the_speech_idle_limit_lets_a_held_end_say_its_last_words() -> None:
    """The call was ending already (our idle limit, code's hangup), held for a caller whose speech never
    stopped: the speech idle limit coming due lets its goodbye go."""
    m = machine(max_idle_duration=300, speech_idle_duration=10, caps=ENGINE_CAPABILITIES)
    m.start()
    m.receive({"type": "session.created", "session": {"id": "s"}})
    m.receive({"type": "session.updated", "session": {}})
    m.receive(SPEECH_STARTED)
    assert sends(m.request_end("done", goodbye=True)) == []
    (goodbye,) = sends(m.timer("speech_idle"))
    assert goodbye["response"]["instructions"] == DEFAULT_GOODBYE


def test_text_the_engine_answers_ends_the_hold_of_an_utterance_whose_stop_never_came() -> None:
    """The engine answers user text at once, whatever speech it heard: the rest of that answer (the create
    after its tool's output) is not held for a caller whose speech never stopped (their audio stopped
    coming). A stop that comes after all still ends the caller's turn. Where we ask for the answer to text
    ourselves, it still waits for the caller."""
    m = machine(caps=ENGINE_CAPABILITIES)
    m.start()
    m.receive({"type": "session.created", "session": {"id": "s"}})
    m.receive({"type": "session.updated", "session": {}})
    m.receive(SPEECH_STARTED)
    typed = m.user_text("Where is order 1?")
    assert "response.create" not in types(typed)
    feed(m, [{"type": "response.created", "response": {"id": "r1"}}, engine_call("c1", "r1")])
    assert any(isinstance(a, RunTool) for a in m.receive(response_done("r1")))
    assert types(m.tool_done("c1", '{"status": "shipped"}')) == [
        "conversation.item.create",
        "response.create",
    ]
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    m.receive(response_done("r2"))
    assert notices(m.receive(SPEECH_STOPPED), "turn.stopped") == [{}]

    m = live_machine()
    m.receive(SPEECH_STARTED)
    assert types(m.user_text("hello")) == ["conversation.item.create"]  # (our create waits for the caller)
    assert types(m.receive(SPEECH_STOPPED) + m.timer("turn")) == ["response.create"]


def test_a_refused_text_is_waited_for_no_more() -> None:
    """The engine refused code's text: no answer to it comes, so what waited for one starts now, not
    after TURN_GRACE. The answer to a silence still due is waited for; where we ask for the answer to text
    ourselves, nothing waited."""
    m = machine(caps=ENGINE_CAPABILITIES)
    m.start()
    m.receive({"type": "session.created", "session": {"id": "s"}})
    m.receive({"type": "session.updated", "session": {}})
    m.user_text("something forbidden")
    assert m.say("Anything else?") == [] and m.response_pending  # (held for the text's answer)
    actions = m.text_refused()
    assert CancelTimer("turn") in actions and types(actions) == ["response.create"]
    assert m.text_refused() == []  # (our create is what is pending now)

    m = machine(caps=ENGINE_CAPABILITIES)
    m.start()
    m.receive({"type": "session.created", "session": {"id": "s"}})
    m.receive({"type": "session.updated", "session": {}})
    m.user_text("hello")
    m.receive({"type": "input_audio_buffer.timeout_triggered", "item_id": "i1"})  # (before the refusal)
    assert m.text_refused() == [] and m.response_pending  # the engine's prompt is still on its way

    m = machine(caps=ENGINE_CAPABILITIES)
    m.start()
    m.receive({"type": "session.created", "session": {"id": "s"}})
    m.receive({"type": "session.updated", "session": {}})
    m.user_text("hello")
    m.receive(
        {
            "type": "conversation.item.created",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]},
        }
    )
    assert m.say("Anything else?") == []
    assert m.text_refused() == [] and m.response_pending  # (it took the text: its answer is on its way)

    m = live_machine()
    assert types(m.user_text("hello")) == ["conversation.item.create", "response.create"]
    assert m.text_refused() == []


def test_a_refused_text_leaves_the_wait_for_an_idle_prompt_that_came_after_an_earlier_texts_wait() -> None:
    """A text's wait ran out (no answer came); then the engine prompts the silent caller and code sends
    text while that prompt's answer is on its way. The engine refuses that text: the prompt's answer is
    still waited for (the earlier text's wait, long over, is not this one)."""
    m = engine_machine()
    m.receive({"type": "session.updated", "session": {}})
    m.user_text("hello")
    m.timer("turn")  # (no answer to it came)
    m.receive({"type": "input_audio_buffer.timeout_triggered", "item_id": "i1"})
    m.user_text("something forbidden")
    assert m.text_refused() == [] and m.response_pending
    assert creates(m.say("Anything else?")) == []  # (not over the engine's answer to the silence)


def test_a_refused_text_leaves_the_wait_for_the_callers_turn_and_holds_no_later_speech_back() -> None:
    """Caller audio, then code's text: the engine reports the speech and its stop (it reads the audio
    first, and answers that turn by itself), then refuses the text. The answer to the caller's turn is
    still waited for. And a text refused with nothing to say so (no say() watching: a hook's) holds no
    speech reported once its wait is over: that is the caller's, and holds our answers back."""
    m = engine_machine()
    m.receive({"type": "session.updated", "session": {}})
    m.user_text("something forbidden")
    m.receive(SPEECH_STARTED)
    m.receive(SPEECH_STOPPED)  # (the engine answers this turn by itself)
    assert m.text_refused() == [] and m.response_pending
    assert creates(m.say("Anything else?")) == []  # (not over the engine's answer to the caller)

    m = engine_machine()
    m.receive({"type": "session.updated", "session": {}})
    m.user_text("something forbidden")
    m.receive(refusal(None))
    assert creates(m.timer("turn")) == []  # (no answer to it came)
    m.receive(SPEECH_STARTED)  # the caller, later
    assert creates(m.say("One moment please.")) == []  # (not over their words)


def idle_prompt(m: CallMachine, resp: str, item: str, *, then_caller: str | None = None) -> list[Action]:
    """The server's turn detection prompts a silent caller (``idle_timeout_ms``): the silence committed as
    an empty item (transcribed as nothing), then a spoken response of its own, played out."""
    return feed(
        m,
        [
            {
                "type": "input_audio_buffer.timeout_triggered",
                "item_id": item,
                "audio_start_ms": 0,
                "audio_end_ms": 4000,
            },
            {"type": "input_audio_buffer.committed", "item_id": item},
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item,
                "transcript": then_caller or "",
            },
            {"type": "response.created", "response": {"id": resp}},
            {"type": "output_audio_buffer.started", "response_id": resp},
            response_done(resp),
            {"type": "output_audio_buffer.stopped", "response_id": resp},
        ],
    )


def test_the_servers_prompts_to_a_silent_caller_do_not_restart_the_idle_limit() -> None:
    """Server VAD's ``idle_timeout_ms`` makes the model ask "are you still there?" on its own: the caller
    is no less silent for it, so the limit still comes (it would otherwise never come while the prompts
    repeat), and one due while a prompt is said waits for its last word."""
    m = machine(max_idle_duration=10)
    m.start()
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    assert StartTimer("idle", 10) in m.receive(response_done("r1"))  # the model's own answer counts
    for n in range(3):
        actions = idle_prompt(m, f"p{n}", f"item_silence{n}")
        assert not [a for a in actions if isinstance(a, StartTimer) and a.name == "idle"]
        assert notices(actions, "call.idle_prompt") == [{"item_id": f"item_silence{n}", "silent_ms": 4000}]
        assert notices(actions, "transcript") == []  # nothing was said
    assert notices(m.timer("idle"), "call.limit") == [{"limit": "idle"}]

    # Due while a prompt is said: the limit waits for its end (not one more full period).
    m = machine(max_idle_duration=10)
    m.start()
    feed(
        m,
        [
            {"type": "input_audio_buffer.timeout_triggered", "item_id": "i1"},
            {"type": "response.created", "response": {"id": "p1"}},
            {"type": "output_audio_buffer.started", "response_id": "p1"},
        ],
    )
    assert m.timer("idle") == [StartTimer("idle", 10)]  # (a backstop, should the prompt's end not show)
    assert notices(m.receive(response_done("p1")), "call.limit") == []  # still heard
    ending = m.receive({"type": "output_audio_buffer.stopped", "response_id": "p1"})
    assert notices(ending, "call.limit") == [{"limit": "idle"}]
    assert sends(ending)[0]["response"]["instructions"] == DEFAULT_GOODBYE

    # Words found in the committed silence are shown, but too faint for turn detection (or made up from
    # line noise): they restart nothing. The caller's speech does, and our own answers count as before.
    m = machine(max_idle_duration=10)
    m.start()
    actions = idle_prompt(m, "p1", "i1", then_caller="Thank you.")
    assert notices(actions, "transcript") == [{"role": "caller", "text": "Thank you.", "item_id": "i1"}]
    assert StartTimer("idle", 10) not in actions
    assert notices(m.timer("idle"), "call.limit") == [{"limit": "idle"}]
    m = machine(max_idle_duration=10)
    m.start()
    idle_prompt(m, "p1", "i1")
    m.receive({"type": "input_audio_buffer.speech_started", "item_id": "i2"})
    assert StartTimer("idle", 10) in m.receive({"type": "input_audio_buffer.speech_stopped", "item_id": "i2"})
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    assert StartTimer("idle", 10) in m.receive(response_done("r2"))


def test_around_the_servers_prompt_what_is_ours_comes_first() -> None:
    """Between the prompt's announcement and its response, what we would start would cross it: it waits
    (as after the caller's words, 1 s at most). Something of ours owed when the limit comes (a say(), a
    tool) is not cut off by it: the limit waits as for any busy line, a full period at most. A prompt that
    never shows its end is no reason to wait for ever, and a limit due at the prompt's end of a call that is
    ending already says nothing."""
    m = live_machine(max_idle_duration=10)
    m.receive({"type": "input_audio_buffer.timeout_triggered", "item_id": "i1"})
    assert sends(m.say("Still looking for your order.")) == []  # the prompt's response is on its way
    assert notices(m.timer("idle"), "call.limit") == []  # and ours after it: not idle
    m.receive({"type": "response.created", "response": {"id": "p1"}})
    assert types(m.receive(response_done("p1"))) == ["response.create"]  # the say(), once it is over
    assert (
        notices(m.receive({"type": "output_audio_buffer.stopped", "response_id": "p1"}), "call.limit") == []
    )

    m = live_machine(max_idle_duration=10)  # no response ever follows the announcement
    m.receive({"type": "input_audio_buffer.timeout_triggered", "item_id": "i1"})
    assert m.timer("turn") == []
    assert m.timer("idle") == [StartTimer("idle", 10)]
    assert notices(m.timer("idle"), "call.limit") == [{"limit": "idle"}]

    m = live_machine(max_idle_duration=10)  # due while a prompt is said; the app hangs up meanwhile
    feed(
        m,
        [
            {"type": "input_audio_buffer.timeout_triggered", "item_id": "i1"},
            {"type": "response.created", "response": {"id": "p1"}},
            {"type": "output_audio_buffer.started", "response_id": "p1"},
        ],
    )
    m.timer("idle")
    m.request_end("hangup")
    m.receive(response_done("p1"))
    ending = m.receive({"type": "output_audio_buffer.stopped", "response_id": "p1"})
    assert notices(ending, "call.limit") == [] and Verb("hangup", None) in ending

    # The socket is lost while a prompt plays: its end, by the re-attach grace, restarts nothing either.
    m = live_machine(max_idle_duration=10)
    feed(
        m,
        [
            {"type": "input_audio_buffer.timeout_triggered", "item_id": "i1"},
            {"type": "response.created", "response": {"id": "p1"}},
            {"type": "output_audio_buffer.started", "response_id": "p1"},
            response_done("p1"),
        ],
    )
    m.reattached()
    m.receive({"type": "session.updated", "session": {}})
    assert StartTimer("idle", 10) not in m.timer("orphans")
    assert notices(m.timer("idle"), "call.limit") == [{"limit": "idle"}]


def test_a_failing_mcp_server_is_reported() -> None:
    m = machine()
    m.start()
    failed = [
        {"type": "mcp_list_tools.failed", "item_id": "item_tools"},
        {"type": "response.mcp_call.failed", "item_id": "item_mcp", "output_index": 0},
    ]
    assert [notices(m.receive(e), "mcp.failed") for e in failed] == [
        [{"what": "list_tools", "item_id": "item_tools"}],
        [{"what": "call", "item_id": "item_mcp"}],
    ]


def test_caller_activity_other_than_speech_restarts_the_idle_limit() -> None:
    m = machine(max_idle_duration=30.0)
    m.start()
    assert m.caller_active() == [StartTimer("idle", 30.0)]
    m.request_end("hangup")
    assert m.caller_active() == []  # ending: no limit to restart


def test_a_caller_cutting_in_ends_playback_like_its_end() -> None:
    m = machine()
    m.start()
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    m.receive({"type": "output_audio_buffer.started", "response_id": "r1"})
    m.receive(response_done("r1"))
    assert not any(isinstance(a, Verb) for a in m.request_end("hangup"))  # the caller still hears it
    # Barge-in on SIP/WebRTC: the server clears the rest of the audio instead of playing it out.
    cleared = m.receive({"type": "output_audio_buffer.cleared", "response_id": "r1"})
    assert Verb("hangup", None) in cleared


def announced(*call_ids: str, m: CallMachine | None = None) -> CallMachine:
    """A started machine whose response r1 called tool ``t`` once per call id, and is done: they run."""
    m = m or machine()
    m.start()
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    for call_id in call_ids:
        feed(m, call_events(call_id, "t", "{}", resp="r1"))
    m.receive(response_done("r1"))
    return m


def _answered_two_outputs() -> tuple[CallMachine, dict[str, Any], dict[str, Any]]:
    """Two calls answered; returns the machine, c1's output event and the create after c2's output."""
    m = announced("c1", "c2")
    first = sends(m.tool_done("c1", "one"))[0]
    return m, first, sends(m.tool_done("c2", "two"))[-1]


def ack(call_id: str, kind: str = "conversation.item.added") -> dict[str, Any]:
    return {"type": kind, "item": {"type": "function_call_output", "call_id": call_id}}


def test_unacknowledged_outputs_are_sent_again_after_the_reattach_grace() -> None:
    m, _, create = _answered_two_outputs()
    assert create["type"] == "response.create" and m.awaiting_acks
    # c1's output is acknowledged (an item event for something else changes nothing); c2's is not
    m.receive({"type": "conversation.item.added", "item": {"type": "message", "id": "i0"}})
    m.receive(ack("c1"))
    back = m.reattached()
    assert types(back) == ["session.update"]  # nothing is sent again at once: acks may still come
    assert StartTimer("orphans", MachineConfig(session=SESSION).reattach_grace) in back
    again = m.timer("orphans")
    assert types(again) == ["conversation.item.create", "response.create"]
    output, fresh = sends(again)
    assert output["item"] == {"type": "function_call_output", "call_id": "c2", "output": "two"}
    assert fresh["event_id"] != create["event_id"]
    m.receive(ack("c2", "conversation.item.done"))
    assert not m.awaiting_acks
    assert types(m.reattached()) == ["session.update"]
    assert types(m.timer("orphans")) == ["response.create"]  # (that create, lost too: no output again)


@pytest.mark.parametrize("shown_by", ["response.created", "response.done"])
def test_outputs_before_a_create_whose_response_shows_are_not_sent_again(shown_by: str) -> None:
    """The socket is lost with the outputs' acknowledgements, after our create left on it: the response
    it started shows on the new socket, so the outputs before it on the same socket arrived too (in
    order). Sent again, the model would have each twice, and answer again."""
    m, _, create = _answered_two_outputs()
    m.reattached()
    tagged = {"id": "r2", "metadata": {"sideband": create["event_id"]}}
    if shown_by == "response.created":
        m.receive({"type": "response.created", "response": tagged})
    m.receive({"type": "response.done", "response": {**tagged, "status": "completed", "output": []}})
    assert not m.awaiting_acks
    assert sends(m.timer("orphans")) == []


def test_outputs_sent_on_a_lost_socket_go_again_though_a_create_on_the_new_one_shows() -> None:
    """A create that went out on the new socket says nothing of what the lost one swallowed."""
    m, _, create = _answered_two_outputs()
    m.reattached([create["event_id"]])  # (the create never left: it goes out on the new socket)
    tagged = {"id": "r2", "metadata": {"sideband": create["event_id"]}}
    m.receive({"type": "response.created", "response": tagged})
    m.receive({"type": "response.done", "response": {**tagged, "status": "completed", "output": []}})
    assert m.awaiting_acks
    assert [e["item"]["call_id"] for e in sends(m.timer("orphans")) if "item" in e] == ["c1", "c2"]


def test_the_answer_goes_at_once_when_every_output_in_doubt_is_acknowledged_within_the_grace() -> None:
    m = machine()
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    feed(m, [*call_events("c1", "look", "{}"), *call_events("c2", "book", "{}"), response_done()])
    m.tool_done("c1", "one")
    queued = sends(m.tool_done("c2", "two"))
    create = queued[-1]
    assert create["type"] == "response.create"
    after = m.reattached([create["event_id"]])  # the outputs left on the lost socket, the create did not
    assert withdrawn(after) == [create["event_id"]]
    m.receive({"type": "session.updated", "session": {}})
    assert creates(m.receive(ack("c1"))) == []  # c2's output may still be lost
    assert creates(m.receive(ack("c2"))) == [""]  # both arrived after all: no wait for the grace
    assert m.timer("orphans") == []


def outputs_sent(actions: list[Action]) -> list[str]:
    """The call ids of the tool outputs among the events sent."""
    return [e["item"]["call_id"] for e in sends(actions) if e["type"] == "conversation.item.create"]


def test_an_output_sent_again_into_a_dead_socket_is_sent_again_after_the_next_reattach() -> None:
    m, _, _ = _answered_two_outputs()
    m.receive(ack("c1"))
    m.reattached()
    m.receive({"type": "session.updated", "session": {}})
    assert types(m.timer("orphans")) == ["conversation.item.create", "response.create"]
    assert m.awaiting_acks  # kept until acknowledged: that socket may be dead too
    back = m.reattached()  # it was: neither the output nor its create arrived
    assert StartTimer("orphans", MachineConfig(session=SESSION).reattach_grace) in back
    m.receive({"type": "session.updated", "session": {}})
    again = m.timer("orphans")
    assert outputs_sent(again) == ["c2"] and creates(again) == [""]
    m.receive(ack("c2"))
    assert not m.awaiting_acks
    m.reattached()
    assert outputs_sent(m.timer("orphans")) == []  # (acknowledged: never sent again)


def test_an_output_the_server_never_takes_is_given_up_after_a_few_resends() -> None:
    """An output the server cannot take (each socket it goes out on is lost) must not go out again on
    every re-attach, each time followed by a create, for as long as the call lasts."""
    m, _, _ = _answered_two_outputs()
    m.receive(ack("c1"))
    for _ in range(OUTPUT_RESENDS):
        m.reattached()
        m.receive({"type": "session.updated", "session": {}})
        resent = m.timer("orphans")
        assert outputs_sent(resent) == ["c2"] and notices(resent, "tool.output_lost") == []
        m.receive({"type": "response.created", "response": {"id": "r_again"}})
        m.receive(response_done("r_again"))
    m.reattached()
    m.receive({"type": "session.updated", "session": {}})
    last = m.timer("orphans")
    assert outputs_sent(last) == [] and creates(last) == [] and not m.awaiting_acks
    assert notices(last, "tool.output_lost") == [
        {"tool_call_id": "c2", "tool": "t", "sent": OUTPUT_RESENDS + 1}
    ]
    assert not [a for a in m.reattached() if isinstance(a, StartTimer) and a.name == "orphans"]


def test_acknowledgements_held_back_by_a_running_response_are_waited_for() -> None:
    m, _, _ = _answered_two_outputs()
    m.reattached()
    m.receive({"type": "response.created", "response": {"id": "r_filler"}})
    assert m.timer("orphans") == [StartTimer("orphans", MachineConfig(session=SESSION).reattach_grace)]
    m.receive(response_done("r_filler"))
    m.receive(ack("c1"))
    m.receive(ack("c2"))  # the acknowledgements the response held back
    assert m.timer("orphans") == [] and not m.awaiting_acks


def test_an_output_the_server_refused_is_never_sent_again() -> None:
    m, output, _ = _answered_two_outputs()
    assert output["item"]["call_id"] == "c1"
    m.receive(
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "code": "invalid_value",
                "event_id": output["event_id"],
            },
        }
    )
    m.receive(ack("c2"))
    assert not m.awaiting_acks
    m.reattached()
    assert types(m.timer("orphans")) == ["response.create"]  # (the create, lost with the socket: no output)


def test_a_refused_plain_create_is_one_create_once_no_tool_runs() -> None:
    # A refused create that answers outputs waits for the blocking response; if a tool started meanwhile,
    # it waits for that tool too, and one create answers all of them.
    m = announced("c1")
    create = sends(m.tool_done("c1", "one"))[-1]
    m.receive({"type": "response.created", "response": {"id": "r2"}})  # the caller spoke first
    m.receive(refusal(create["event_id"]))
    feed(m, call_events("c2", "t", "{}", resp="r2"))
    after = m.receive(response_done("r2"))
    assert [a for a in after if isinstance(a, RunTool)] and creates(after) == []
    assert creates(m.tool_done("c2", "two")) == [""]
    # After a re-attach with the same refused create pending, one create follows the resent outputs.
    m2, _, create2 = _answered_two_outputs()
    m2.receive({"type": "response.created", "response": {"id": "r3"}})
    m2.receive(refusal(create2["event_id"]))
    m2.reattached()
    assert creates(m2.timer("orphans")) == [""]
    assert creates(m2.receive(response_done("r3"))) == []


def test_outputs_are_not_kept_when_the_session_cannot_be_resumed() -> None:
    m = announced("c1", m=CallMachine(MachineConfig(session=SESSION), Capabilities(resumable=False)))
    assert types(m.tool_done("c1", "one")) == ["conversation.item.create", "response.create"]
    assert not m.awaiting_acks


def _unacked_after_reattach() -> CallMachine:
    """c1 answered (its create answered too), its output never acknowledged; the socket was replaced."""
    m = announced("c1")
    m.tool_done("c1", "one")
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    m.receive(response_done("r2"))
    m.reattached()
    return m


def test_an_end_during_the_reattach_grace_waits_for_the_outputs_sent_again() -> None:
    m = _unacked_after_reattach()
    assert not any(isinstance(a, Verb) for a in m.request_end("hangup"))  # outputs may be lost: first them
    fired = m.timer("orphans")
    assert types(fired) == ["conversation.item.create", "response.create"]
    m.receive({"type": "response.created", "response": {"id": "r3"}})
    assert Verb("hangup", None) in m.receive(response_done("r3"))
    # A goodbye (limits) is said after them too, not before.
    g = _unacked_after_reattach()
    assert creates(g.timer("idle")) == []
    again = g.timer("orphans")
    assert types(again) == ["conversation.item.create", "response.create"] and creates(again) == [""]
    g.receive({"type": "response.created", "response": {"id": "r3"}})
    assert "goodbye" in creates(g.receive(response_done("r3")))[0].lower()


def test_nothing_is_sent_again_once_the_end_verb_is_out() -> None:
    forced = _unacked_after_reattach()
    assert Verb("hangup", None) in forced.abandon("shutdown")
    assert forced.timer("orphans") == []
    orphaned = machine()
    orphaned.start()
    orphaned.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(orphaned, call_events("c1", "lookup", "{}", resp="r1"))
    orphaned.reattached()
    assert Verb("hangup", None) in orphaned.request_end("hangup")  # orphans are not waited for
    assert orphaned.timer("orphans") == []
    # A hangup can close the socket abnormally: a re-attach then sends no outputs and starts no grace.
    late = _unacked_after_reattach()
    late.timer("orphans")  # sent again; still unacknowledged when the end comes
    late.receive({"type": "response.created", "response": {"id": "r3"}})
    late.receive(response_done("r3"))
    assert Verb("hangup", None) in late.request_end("hangup")
    back = late.reattached()
    assert types(back) == ["session.update"] and not any(isinstance(a, StartTimer) for a in back)


def test_a_reattach_once_the_end_verb_is_out_starts_no_grace() -> None:
    m = announced("c1")
    m.tool_done("c1", "one")  # never acknowledged
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    feed(m, call_events("c2", "lookup", "{}", resp="r2"))  # announced, its response unfinished
    m.request_end("hangup")
    assert Verb("hangup", None) in m.timer("end_cap")
    back = m.reattached()
    assert types(back) == ["session.update"] and not any(isinstance(a, StartTimer) for a in back)


# -- found by driving the machine with random server behaviour ------------------------------------------


def test_a_cancelled_response_of_someone_else_does_not_forget_our_unanswered_create() -> None:
    m = machine()
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "end_call", "{}", resp="r1"))
    assert RunTool("c1", "end_call", "{}") in m.receive(response_done("r1"))
    m.receive({"type": "response.created", "response": {"id": "r2"}})  # the caller's turn (server VAD)
    m.reattached()  # r2 runs on across the re-attach
    m.receive({"type": "session.updated", "session": {}})
    m.request_end("end_call_tool")
    assert [e["type"] for e in sends(m.tool_done("c1", '{"ok":true}'))][-1] == "response.create"
    # The caller cut r2 off; our create crossed its response.done: the model's reply is still to come.
    out = m.receive({"type": "response.done", "response": {"id": "r2", "status": "cancelled", "output": []}})
    assert not [a for a in out if isinstance(a, Verb)]
    m.receive({"type": "response.created", "response": {"id": "r3"}})
    assert Verb("hangup", None) in m.receive(response_done("r3"))  # after the reply


def test_a_limits_goodbye_is_not_cut_by_a_failed_response_that_ran_across_a_reattach() -> None:
    m = CallMachine(MachineConfig(session={"type": "realtime"}, max_idle_duration=30))
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    m.reattached()
    m.receive({"type": "session.updated", "session": {}})
    assert [e["type"] for e in sends(m.timer("idle"))] == ["response.create"]  # the goodbye
    out = m.receive({"type": "response.done", "response": {"id": "r1", "status": "failed", "output": []}})
    assert not [a for a in out if isinstance(a, Verb)]


def test_a_refusal_arriving_after_the_blocking_response_ended_is_not_a_stall_after_a_reattach() -> None:
    m = machine()
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    m.reattached()
    m.receive({"type": "session.updated", "session": {}})
    first = sends(m.say("Mention the sale"))
    assert [e["type"] for e in first] == ["response.create"]
    m.receive(response_done("r1"))
    again = sends(m.receive(refusal(first[0]["event_id"])))  # late: r1 had ended already
    assert [e["type"] for e in again] == ["response.create"]
    assert again[0]["response"] == first[0]["response"]


@pytest.mark.parametrize(
    "event",
    [
        {"type": "error", "error": "boom"},
        {"type": "response.done", "response": "x"},
        {"type": "response.done", "response": {"output": 1}},
        {"type": "response.output_item.done", "item": "x"},
        {"type": "response.output_item.added", "item": ["x"]},
        {"type": "response.output_audio_transcript.done", "transcript": "hi", "item_id": {"a": 1}},
        {"type": {"x": 1}},
    ],
)
def test_fields_of_odd_shapes_are_ignored_not_raised(event: dict[str, Any]) -> None:
    m = machine()
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    m.receive(event)
    assert m.closed is None


def test_playback_heard_before_a_reattach_does_not_hold_the_end_past_the_grace() -> None:
    m = machine()
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    m.receive({"type": "response.created", "response": {"id": "r1"}})  # the model's goodbye
    assert not [a for a in m.request_end("hangup") if isinstance(a, Verb)]  # it is still talking
    m.receive({"type": "output_audio_buffer.started", "response_id": "r1"})  # heard on the old socket
    assert not [a for a in m.receive(response_done("r1")) if isinstance(a, Verb)]  # still playing
    m.reattached()  # the stop went out while no socket was attached
    m.receive({"type": "session.updated", "session": {}})
    assert Verb("hangup", None) in m.timer("orphans")  # at the grace, not at the end cap


def withdrawn(actions: list[Action]) -> list[str]:
    return [a.event_id for a in actions if isinstance(a, Withdraw)]


def test_a_create_that_never_left_keeps_its_place_at_a_reattach() -> None:
    # the greeting never went out: it goes first on the new socket, and the machine waits on it
    m = machine(greeting="Welcome")
    greeting = sends(m.start())[-1]
    assert greeting["response"] == {"instructions": "Welcome"}
    after = m.reattached([greeting["event_id"]])
    assert types(after) == ["session.update"] and withdrawn(after) == []
    m.receive({"type": "session.updated", "session": {}})
    assert sends(m.say("Mention the sale")) == []  # behind the greeting, not crossing it
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    said = sends(m.receive(response_done("r1")))
    assert [e.get("response") for e in said] == [{"instructions": "Mention the sale"}]

    # code's own frames are not the machine's to withdraw
    m = machine()
    m.start()
    assert withdrawn(m.reattached(["app_create_1"])) == [] and not m.response_owed


def tag_of(create: dict[str, Any]) -> dict[str, Any]:
    """The ``response.metadata`` our create ``create`` (as sent, tagged) has the server echo."""
    return {"sideband": create["event_id"]}


def raw(actions: list[Action]) -> list[dict[str, Any]]:
    """The events sent, as they are (a ``response.create`` with its tag)."""
    return [a.event for a in actions if isinstance(a, Send)]


def test_a_greeting_lost_with_the_first_socket_is_asked_for_again_once() -> None:
    # The path dies as the call starts: the session config and the greeting, written, never arrive.
    m = machine(greeting="Welcome")
    greeting = raw(m.start())[-1]
    back = m.reattached(())  # nothing queued: it had left
    assert types(back) == ["session.update"]  # no second greeting at once: the first may have arrived
    assert StartTimer("orphans", MachineConfig(session=SESSION).reattach_grace) in back
    m.receive({"type": "session.updated", "session": {}})
    assert sends(m.say("Mention the sale")) == []  # nothing crosses it meanwhile
    again = m.timer("orphans")  # nothing of it showed on the new socket
    assert [e.get("response") for e in sends(again)] == [{"instructions": "Welcome"}]
    assert notices(again, "response.lost") == [{"purpose": "greeting"}]
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    said = m.receive(response_done("r1"))
    assert [e.get("response") for e in sends(said)] == [{"instructions": "Mention the sale"}]
    assert m.timer("orphans") == []  # once

    # It arrived: its response shows on the new socket, by its start or by its end alone (the start
    # went to the lost socket). One greeting, never two.
    for shown in ("response.created", "response.done"):
        m = machine(greeting="Welcome")
        greeting = raw(m.start())[-1]
        m.reattached(())
        m.receive({"type": "session.updated", "session": {}})
        response = {"id": "r1", "status": "completed", "output": [], "metadata": tag_of(greeting)}
        m.receive({"type": shown, "response": response})
        if shown == "response.created":
            m.receive(response_done("r1"))
        assert not m.response_owed
        assert sends(m.timer("orphans")) == []

    # The caller speaks on the new socket first: their words open the call, the greeting is not said.
    m = machine(greeting="Welcome")
    m.start()
    m.reattached(())
    m.receive({"type": "session.updated", "session": {}})
    m.receive({"type": "input_audio_buffer.speech_started", "item_id": "i1"})
    assert sends(m.timer("orphans")) == []  # never over the caller
    m.receive({"type": "input_audio_buffer.speech_stopped", "item_id": "i1"})
    dropped = m.timer("turn")
    assert sends(dropped) == [] and notices(dropped, "response.dropped") == [{"purpose": "greeting"}]


def test_a_create_lost_with_the_socket_after_its_outputs_arrived_is_asked_for_again() -> None:
    # A slow tool: its filler speaks as it finishes; the output goes and is acknowledged; at the filler's
    # end the answer's create is written alone, and the path dies before the server reads it.
    m = live_machine(filler_after={"slow": 1.0})
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "slow", "{}", resp="r1"))
    assert RunTool("c1", "slow", "{}") in m.receive(response_done("r1"))
    (filler,) = raw(m.timer("filler:c1"))
    m.receive({"type": "response.created", "response": {"id": "r_filler", "metadata": tag_of(filler)}})
    m.tool_done("c1", '{"ok": 1}', ok=True)
    m.receive(output_ack("c1"))
    assert creates(m.receive(response_done("r_filler"))) == [""]  # the answer's create, then the loss
    back = m.reattached(())
    assert types(back) == ["session.update"] and m.response_owed  # still awaited
    again = m.timer("orphans")
    assert creates(again) == [""] and notices(again, "response.lost") == [{"purpose": "response"}]
    assert not any(e["type"] == "conversation.item.create" for e in sends(again))  # (it had arrived)

    # A say(): asked for again as it was asked, after the response that runs meanwhile (the server's
    # answer to the caller, untagged: this server echoes tags).
    m = live_machine()
    (hello,) = raw(m.say("Say hello"))
    m.receive({"type": "response.created", "response": {"id": "r_hello", "metadata": tag_of(hello)}})
    m.receive(response_done("r_hello"))
    m.say("Mention the sale")
    m.reattached(())
    m.receive({"type": "session.updated", "session": {}})
    m.receive({"type": "input_audio_buffer.speech_started", "item_id": "i1"})
    m.receive({"type": "input_audio_buffer.speech_stopped", "item_id": "i1"})
    m.receive({"type": "response.created", "response": {"id": "r_turn"}})  # the server's answer to them
    assert creates(m.timer("orphans")) == []  # not while a response runs
    assert creates(m.receive(response_done("r_turn"))) == ["Mention the sale"]

    # One cancelled by interrupt() before anything of it showed is not asked for again.
    m = live_machine()
    m.say("Mention the sale")
    m.reattached(())
    m.interrupt()
    assert sends(m.timer("orphans")) == [] and not m.response_owed


def test_a_goodbye_lost_with_the_socket_whose_end_shows_alone_is_not_said_twice() -> None:
    m = machine(max_call_duration=60)
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    (goodbye,) = raw(m.timer("max_duration"))
    m.reattached(())
    m.receive({"type": "session.updated", "session": {}})
    done = {"id": "r_bye", "status": "completed", "output": [], "metadata": tag_of(goodbye)}
    m.receive({"type": "response.done", "response": done})  # its start went to the lost socket
    m.receive({"type": "output_audio_buffer.started", "response_id": "r_bye"})
    assert sends(m.timer("orphans")) == []  # said: not asked for again
    ended = m.receive({"type": "output_audio_buffer.stopped", "response_id": "r_bye"})
    assert Verb("hangup", None) in ended


def refused_active(create: dict[str, Any]) -> dict[str, Any]:
    """The server's refusal of ``create``: a response is under way."""
    error = {
        "type": "invalid_request_error",
        "code": "conversation_already_has_active_response",
        "event_id": create["event_id"],
    }
    return {"type": "error", "error": error}


def refused_by(create: dict[str, Any], error_type: str, code: str) -> dict[str, Any]:
    error = {"type": error_type, "code": code, "message": "no", "event_id": create["event_id"]}
    return {"type": "error", "error": error}


def answer_to_an_output(m: CallMachine) -> dict[str, Any]:
    """A tool round on ``m``, up to the create that answers its output (returned, as sent)."""
    m.receive({"type": "response.created", "response": {"id": "resp_1"}})
    feed(m, call_events("call_1", "lookup", "{}"))
    m.receive(response_done(output=[{"type": "function_call", "call_id": "call_1", "name": "lookup"}]))
    creates = [a.event for a in m.tool_done("call_1", "x") if isinstance(a, Send)][1:]
    assert [c["type"] for c in creates] == ["response.create"]
    return creates[0]


@pytest.mark.parametrize(
    ("error_type", "code"), [("server_error", "server_error"), ("rate_limit_error", "rate_limit_exceeded")]
)
def test_an_answer_the_server_refuses_for_its_own_fault_is_asked_for_again_once(
    error_type: str, code: str
) -> None:
    """A ``response.create`` refused by an ``error`` of the server's own (not of the request): the
    caller would hear nothing until they spoke again; it is sent again, once."""
    m = machine()
    m.start()
    create = answer_to_an_output(m)
    actions = m.receive(refused_by(create, error_type, code))
    assert notices(actions, "response.refused") == [{"purpose": "response", "code": code, "retry": True}]
    again = [a.event for a in actions if isinstance(a, Send)]
    assert [e["type"] for e in again] == ["response.create"] and "response" not in untagged(again[0])
    assert again[0]["event_id"] != create["event_id"]
    second = m.receive(refused_by(again[0], error_type, code))  # twice in a row: left to the caller
    assert notices(second, "response.refused") == [{"purpose": "response", "code": code, "retry": False}]
    assert sends(second) == []


def test_an_answer_refused_as_invalid_is_not_sent_again() -> None:
    m = machine()
    m.start()
    actions = m.receive(refused_by(answer_to_an_output(m), "invalid_request_error", "invalid_value"))
    assert notices(actions, "response.refused") == [
        {"purpose": "response", "code": "invalid_value", "retry": False}
    ]
    assert sends(actions) == []


def test_a_refused_goodbye_lets_the_end_go_on() -> None:
    m = machine(max_idle_duration=20)
    m.start()
    m.receive({"type": "input_audio_buffer.speech_started"})
    m.receive({"type": "input_audio_buffer.speech_stopped"})
    m.timer("turn")
    goodbye = next(a.event for a in m.timer("idle") if isinstance(a, Send))
    actions = m.receive(refused_by(goodbye, "server_error", "server_error"))
    assert notices(actions, "response.refused") == [
        {"purpose": "goodbye", "code": "server_error", "retry": False}
    ]
    assert sends(actions) == [] and actions[-1] == Verb("hangup", None)


ACTIVE = ("invalid_request_error", "conversation_already_has_active_response")


def function_call(call_id: str, name: str = "lookup") -> dict[str, Any]:
    return {
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": "{}",
        "status": "completed",
    }


def test_a_response_taken_for_a_goodbye_the_server_refused_is_not_ours() -> None:
    """Before any response has come back tagged, the next one to start after our create is taken for
    ours: here the server's own, starting as the limit's goodbye goes out. The goodbye's refusal says it
    was not: its tool calls do not run while the call ends, and it is not the goodbye."""
    m = machine(max_call_duration=60)
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    bye = raw(m.timer("max_duration"))[-1]
    assert untagged(bye)["response"]["instructions"] == DEFAULT_GOODBYE
    m.receive({"type": "response.created", "response": {"id": "r_own"}})  # taken for the goodbye
    m.receive(refused_by(bye, *ACTIVE))
    feed(m, call_events("c1", "lookup", "{}", resp="r_own"))
    done = m.receive(response_done("r_own", output=[function_call("c1")]))
    assert not [a for a in done if isinstance(a, RunTool)]
    assert [n["reason"] for n in notices(done, "tool.discarded")] == ["call_ending"]
    again = raw(done)
    assert creates(done) == [DEFAULT_GOODBYE]  # asked for again: none was said
    # A caller cutting off r_own's audio cuts off no goodbye: none is asked for a third time.
    m.receive({"type": "output_audio_buffer.cleared", "response_id": "r_own"})
    started(m, again[0]["response"], "r_bye")
    m.receive({"type": "output_audio_buffer.started", "response_id": "r_bye"})
    said = m.receive(response_done("r_bye"))
    assert creates(said) == [] and not [a for a in said if isinstance(a, Verb)]  # its audio plays
    assert Verb("hangup", None) in m.receive({"type": "output_audio_buffer.stopped", "response_id": "r_bye"})


def greeted_then_caller_spoke(**kw: Any) -> CallMachine:
    """A machine whose greeting came back tagged (the server echoes tags) and whose caller has just
    stopped speaking: the server's answer to them is awaited."""
    m = machine(greeting="Hi", **kw)
    greeting = raw(m.start())[-1]
    m.receive({"type": "session.updated", "session": {}})
    started(m, greeting["response"], "r_greet")
    m.receive(response_done("r_greet"))
    m.receive(SPEECH_STARTED)
    m.receive(SPEECH_STOPPED)
    return m


def test_the_servers_answer_to_the_caller_while_the_call_ends_is_its_own_and_answers_the_turn() -> None:
    m = greeted_then_caller_spoke(max_call_duration=60)
    assert creates(m.timer("max_duration")) == []  # the goodbye waits for the server's answer
    bye = raw(m.timer("turn"))[-1]  # none came within the grace: the goodbye goes
    # The server's answer starts all the same, untagged, as the goodbye arrives: it is the server's own.
    m.receive({"type": "response.created", "response": {"id": "r_own"}})
    heard = m.receive({"type": "output_audio_buffer.started", "response_id": "r_own"})
    assert notices(heard, "turn.answered") == [{"response_id": "r_own"}]  # the caller's wait, timed
    m.receive(refused_by(bye, *ACTIVE))
    feed(m, call_events("c1", "lookup", "{}", resp="r_own"))
    done = m.receive(response_done("r_own", output=[function_call("c1")]))
    assert not [a for a in done if isinstance(a, RunTool)]
    m.receive({"type": "output_audio_buffer.stopped", "response_id": "r_own"})
    assert creates(done) == [DEFAULT_GOODBYE]


def test_a_goodbye_said_once_no_answer_came_to_the_caller_answers_no_turn() -> None:
    m = greeted_then_caller_spoke(max_call_duration=60)
    m.timer("max_duration")
    bye = raw(m.timer("turn"))[-1]
    started(m, bye["response"], "r_bye")
    heard = m.receive({"type": "output_audio_buffer.started", "response_id": "r_bye"})
    assert notices(heard, "turn.answered") == []


def lost_create(kind: str) -> tuple[CallMachine, dict[str, Any], str]:
    """Our create (the greeting, or a say()) left for a socket that died, and the re-attach grace is
    over with nothing of it shown on the new one. Returns the machine, the lost create (as sent,
    tagged) and the instructions it asked for."""
    if kind == "greeting":
        m = machine(greeting="Welcome")
        lost = raw(m.start())[-1]
    else:
        m = live_machine()
        (hello,) = raw(m.say("Say hello"))
        m.receive({"type": "response.created", "response": {"id": "r_hello", "metadata": tag_of(hello)}})
        m.receive(response_done("r_hello"))
        (lost,) = raw(m.say("Mention the sale"))
    m.reattached(())
    m.receive({"type": "session.updated", "session": {}})
    return m, lost, lost["response"]["instructions"]


@pytest.mark.parametrize("kind", ["greeting", "say"])
def test_a_lost_create_whose_response_outlives_the_grace_is_said_once(kind: str) -> None:
    # It had arrived: its response (its start went to the lost socket) still runs as the grace ends. The
    # copy asked for is refused (that response is active); the response then ends, tagged with the
    # lost create: the copy is not asked for again.
    m, lost, said = lost_create(kind)
    (copy,) = raw(m.timer("orphans"))
    assert copy["response"]["instructions"] == said and copy["event_id"] != lost["event_id"]
    assert sends(m.receive(refused_active(copy))) == []
    done = {"id": "r_lost", "status": "completed", "output": [], "metadata": tag_of(lost)}
    ended = m.receive({"type": "response.done", "response": done})
    assert sends(ended) == [] and not m.response_owed
    assert notices(ended, "response.done")[0]["response_id"] == "r_lost"

    # It ends before the copy reaches the server: the copy is cancelled as it starts.
    m, lost, said = lost_create(kind)
    (copy,) = raw(m.timer("orphans"))
    assert sends(m.receive({"type": "response.done", "response": done})) == []
    started = {"type": "response.created", "response": {"id": "r_copy", "metadata": tag_of(copy)}}
    assert types(m.receive(started)) == ["response.cancel"]
    assert sends(m.receive(response_done("r_copy", "cancelled"))) == [] and not m.response_owed

    # Its start shows on the new socket, late: the copy, refused meanwhile, is not asked for again.
    m, lost, said = lost_create(kind)
    (copy,) = raw(m.timer("orphans"))
    m.receive(refused_active(copy))
    m.receive({"type": "response.created", "response": {"id": "r_lost", "metadata": tag_of(lost)}})
    assert sends(m.receive(response_done("r_lost"))) == [] and not m.response_owed

    # The response that runs is another (its start unseen too, untagged): the copy goes once it ends (a
    # greeting not: that response opened the call).
    m, lost, said = lost_create(kind)
    (copy,) = raw(m.timer("orphans"))
    m.receive(refused_active(copy))
    other = {"type": "response.done", "response": {"id": "r_other", "status": "completed", "output": []}}
    assert creates(m.receive(other)) == ([] if kind == "greeting" else [said])


def test_a_lost_goodbye_whose_response_outlives_the_grace_is_said_once_then_the_verb() -> None:
    m = machine(max_call_duration=60)
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    (goodbye,) = raw(m.timer("max_duration"))
    m.reattached(())
    m.receive({"type": "session.updated", "session": {}})
    (copy,) = raw(m.timer("orphans"))
    assert copy["response"]["instructions"] == DEFAULT_GOODBYE
    m.receive(refused_active(copy))
    done = {"id": "r_bye", "status": "completed", "output": [], "metadata": tag_of(goodbye)}
    ended = m.receive({"type": "response.done", "response": done})
    assert sends(ended) == [] and Verb("hangup", None) in ended  # said once: the verb follows it

    # It ends before the copy reaches the server: the copy, cancelled as it starts, is no goodbye cut
    # short (none is asked for again), and the verb follows it.
    m = machine(max_call_duration=60)
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    (goodbye,) = raw(m.timer("max_duration"))
    m.reattached(())
    m.receive({"type": "session.updated", "session": {}})
    (copy,) = raw(m.timer("orphans"))
    done = {"id": "r_bye", "status": "completed", "output": [], "metadata": tag_of(goodbye)}
    assert m.receive({"type": "response.done", "response": done})[-1] == Notice(
        "response.done", {"response_id": "r_bye", "status": "completed", "tools_running": 0}
    )  # (nothing yet: the copy is on its way)
    started = {"type": "response.created", "response": {"id": "r_copy", "metadata": tag_of(copy)}}
    assert types(m.receive(started)) == ["response.cancel"]
    ended = m.receive(response_done("r_copy", "cancelled"))
    assert sends(ended) == [] and Verb("hangup", None) in ended


def lost_answer(*, acked: bool = True) -> tuple[CallMachine, dict[str, Any]]:
    """The answer to a tool output (acknowledged, or not) was asked for, and the socket died with its
    create out. Returns the machine, re-attached, and that create (as sent, tagged)."""
    m = live_machine()
    (hello,) = raw(m.say("Say hello"))
    m.receive({"type": "response.created", "response": {"id": "r_hello", "metadata": tag_of(hello)}})
    m.receive(response_done("r_hello"))  # (the server echoes tags)
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    feed(m, call_events("c1", "look", "{}", resp="r1"))
    m.receive(response_done("r1"))
    (answer,) = raw(m.tool_done("c1", '{"ok": 1}', ok=True))[1:]
    if acked:
        m.receive(output_ack("c1"))
    m.reattached(())
    m.receive({"type": "session.updated", "session": {}})
    return m, answer


def caller_turn(m: CallMachine, item: str = "i1") -> None:
    m.receive({"type": "input_audio_buffer.speech_started", "item_id": item})
    m.receive({"type": "input_audio_buffer.speech_stopped", "item_id": item})


def test_a_lost_answer_the_servers_answer_to_the_caller_covers_is_not_asked_for_again() -> None:
    # The caller speaks on the new socket: the server's answer to them sees the output (acknowledged), and
    # answers it too.
    m, _ = lost_answer()
    caller_turn(m)
    m.receive({"type": "response.created", "response": {"id": "r_turn"}})
    out = m.receive(response_done("r_turn"))
    out += m.timer("orphans")
    assert creates(out) == [] and not m.response_owed and notices(out, "response.lost") == []

    # That answer was cut short: it did not get to answer the output, which is asked for.
    m, _ = lost_answer()
    caller_turn(m)
    m.receive({"type": "response.created", "response": {"id": "r_turn"}})
    assert creates(m.receive(response_done("r_turn", "cancelled"))) == [""]

    # The output was not acknowledged: that answer may not have seen it. Once the grace ends, the output
    # goes again, and one answer follows it.
    m, _ = lost_answer(acked=False)
    caller_turn(m)
    m.receive({"type": "response.created", "response": {"id": "r_turn"}})
    assert m.response_owed
    m.receive(response_done("r_turn"))
    again = m.timer("orphans")
    assert types(again) == ["conversation.item.create", "response.create"]
    assert notices(again, "response.lost") == [{"purpose": "response"}]


def test_a_lost_answer_whose_response_outlives_the_grace_is_not_asked_for_twice() -> None:
    m, answer = lost_answer()
    (copy,) = raw(m.timer("orphans"))
    assert creates([Send(copy)]) == [""]
    m.receive(refused_active(copy))
    done = {"id": "r_answer", "status": "completed", "output": [], "metadata": tag_of(answer)}
    assert sends(m.receive({"type": "response.done", "response": done})) == [] and not m.response_owed

    # Code's text came meanwhile: the answer asked for then answers it.
    m, answer = lost_answer()
    (copy,) = raw(m.timer("orphans"))
    m.receive(refused_active(copy))
    m.user_text("And the weather?")
    assert creates(m.receive({"type": "response.done", "response": done})) == [""]


def test_a_queued_filler_is_withdrawn_only_once_no_tool_runs() -> None:
    m = machine(filler_after={"look": 1.0, "book": 1.0})
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    both = [*call_events("c1", "look", "{}"), *call_events("c2", "book", "{}")]
    feed(m, [*both, response_done()])
    filler = sends(m.timer("filler:c1"))[0]
    m.tool_done("c1", "ok")  # queued behind the filler; "book" still runs
    after = m.reattached([filler["event_id"], "sb_output_c1"])
    assert withdrawn(after) == []  # still apt: the caller waits on "book"
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    m.receive(response_done("r2"))
    tail = m.tool_done("c2", "ok")
    assert types(tail) == ["conversation.item.create", "response.create"]

    m = machine(filler_after={"look": 1.0})
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    feed(m, [*call_events("c1", "look", "{}"), response_done()])
    filler = sends(m.timer("filler:c1"))[0]
    output = sends(m.tool_done("c1", "ok"))[0]
    after = m.reattached([filler["event_id"], output["event_id"]])
    assert withdrawn(after) == [filler["event_id"]]  # the answer is in: no late "still working"
    assert notices(after, "response.dropped") == [{"purpose": "filler:c1"}]
    # the output goes out first from the queue, the create for the answer after it; the grace sends
    # the output no second time
    assert types(after) == ["session.update", "response.create"]
    assert "response" not in sends(after)[1]
    assert types(m.timer("orphans")) == []


def test_nothing_queued_is_sent_once_the_verb_is_out() -> None:
    m = machine()
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    said = sends(m.say("One more thing"))[0]
    m.request_end("hangup")
    assert [a for a in m.timer("end_cap") if isinstance(a, Verb)]  # forced: the verb is out
    assert withdrawn(m.reattached([said["event_id"]])) == [said["event_id"]]


def test_a_refused_create_waits_behind_one_that_never_left() -> None:
    m = machine()
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    first = sends(m.say("first"))[0]
    m.receive({"type": "response.created", "response": {"id": "r1"}})  # the caller's turn, as it was
    m.receive(response_done("r1"))
    second = sends(m.say("second"))[0]
    assert sends(m.receive(refusal(first["event_id"]))) == []  # late: "first" waits behind "second"
    after = m.reattached([second["event_id"]])  # "second" never left for the lost socket
    assert types(after) == ["session.update"] and withdrawn(after) == []
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    again = sends(m.receive(response_done("r2")))
    assert [e.get("response") for e in again] == [{"instructions": "first"}]


def test_a_refused_filler_is_not_said_for_a_later_tool() -> None:
    m = machine(filler_after={"look": 1.0, "book": 1.0})
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    feed(m, [*call_events("c1", "look", "{}"), response_done("resp_1")])
    filler = sends(m.timer("filler:c1"))[0]
    m.receive(refusal(filler["event_id"]))  # the caller's turn runs
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    m.tool_done("c1", "ok")  # "look" answered: its filler is stale now
    acts = feed(m, [*call_events("c2", "book", "{}", "r2"), response_done("r2")])  # the turn calls "book"
    assert notices(acts, "response.dropped") == [{"purpose": "filler:c1"}]
    assert sends(acts) == []  # (one create answers both, once "book" is done)
    late = sends(m.timer("filler:c2"))  # "book" gets its own filler, on its own time
    assert [e["response"]["instructions"] for e in late] == [DEFAULT_FILLER]


def test_a_queued_answer_waits_for_the_outputs_sent_again_after_the_grace() -> None:
    m = machine()
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    feed(m, [*call_events("c1", "look", "{}"), *call_events("c2", "book", "{}"), response_done()])
    m.tool_done("c1", "one")  # written to the socket that then died: no acknowledgement
    queued = sends(m.tool_done("c2", "two"))  # detached: its output and the answer's create wait
    assert [e["type"] for e in queued] == ["conversation.item.create", "response.create"]
    after = m.reattached([e["event_id"] for e in queued])
    assert withdrawn(after) == [queued[1]["event_id"]] and types(after) == ["session.update"]
    m.receive({"type": "session.updated", "session": {}})
    m.receive({"type": "conversation.item.added", "item": {"type": "function_call_output", "call_id": "c2"}})
    grace = sends(m.timer("orphans"))  # c1's output is sent again, then one create for both
    assert [(e["type"], e.get("item", {}).get("call_id")) for e in grace] == [
        ("conversation.item.create", "c1"),
        ("response.create", None),
    ]


def test_the_sessions_expiry_brings_the_call_duration_goodbye_forward() -> None:
    """OpenAI cuts the session at its ``expires_at``, counted from the session's start; our limit counts
    from the attach. The first session.updated brings the limit's timer to 60 s before the cut at the
    latest (the driver keeps it if it is due sooner); later ones, or an expiry that is no number, do not."""
    m = machine(max_call_duration=3540)
    m.start()
    first = m.receive({"type": "session.updated", "session": {"expires_at": 1_800_003_600}})
    assert [a for a in first if isinstance(a, TimerBy)] == [TimerBy("max_duration", 1_800_003_540)]
    again = m.receive({"type": "session.updated", "session": {"expires_at": 1_800_000_000}})
    assert not [a for a in again if isinstance(a, TimerBy)]
    odd: list[dict[str, Any]] = [{}, {"expires_at": "soon"}, {"expires_at": True}, {"expires_at": None}]
    odd += [{"expires_at": 10**400}, {"expires_at": float("inf")}, {"expires_at": float("nan")}]
    for session in odd:
        other = machine(max_call_duration=3540)
        other.start()
        assert not [
            a
            for a in other.receive({"type": "session.updated", "session": session})
            if isinstance(a, TimerBy)
        ]
    unlimited = machine()
    unlimited.start()
    updated = unlimited.receive({"type": "session.updated", "session": {"expires_at": 1_800_003_600}})
    assert not [a for a in updated if isinstance(a, TimerBy)]
    engine = machine(max_call_duration=3540, caps=ENGINE_CAPABILITIES)
    engine.start()
    engine.receive({"type": "session.created", "session": {"id": "s"}})
    updated = engine.receive({"type": "session.updated", "session": {"expires_at": 1_800_003_600}})
    assert not [a for a in updated if isinstance(a, TimerBy)]


def test_a_turn_is_answered_by_the_models_next_audio_not_by_a_server_prompt() -> None:
    m = live_machine()

    def answers(response_id: str) -> list[dict[str, Any]]:
        """The turns response ``response_id``'s audio answered as it started to play."""
        m.receive({"type": "response.created", "response": {"id": response_id}})
        started = m.receive({"type": "output_audio_buffer.started", "response_id": response_id})
        return notices(started, "turn.answered")

    def played(response_id: str) -> None:
        m.receive(response_done(response_id))
        m.receive({"type": "output_audio_buffer.stopped", "response_id": response_id})

    m.receive({"type": "input_audio_buffer.speech_started", "item_id": "i1"})
    assert notices(
        m.receive({"type": "input_audio_buffer.speech_stopped", "item_id": "i1"}), "turn.stopped"
    ) == [{}]
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    m.receive(response_done("r1"))  # (no audio: a tool call, say)
    # Silence: the server prompts the caller. Its audio answers nothing.
    m.receive({"type": "input_audio_buffer.timeout_triggered", "item_id": "i_silence"})
    assert answers("p1") == []
    played("p1")
    assert answers("r2") == [{"response_id": "r2"}]
    played("r2")
    assert answers("r3") == []
    # A caller whose end the server never showed (speech cut off by the cap) starts no wait to time.
    m.receive({"type": "input_audio_buffer.speech_started", "item_id": "i2"})
    assert notices(m.timer("speaking"), "turn.stopped") == []
    played("r3")
    assert answers("r4") == []


def test_a_silent_caller_is_asked_whether_they_are_still_there_before_the_goodbye() -> None:
    m = live_machine(max_idle_duration=10, idle_prompts=2)

    def answer(response_id: str) -> list[Action]:
        m.receive({"type": "response.created", "response": {"id": response_id}})
        return m.receive(response_done(response_id))

    for n in (1, 2):
        fired = m.timer("idle")
        assert notices(fired, "call.idle_nudge") == [{"nudge": n}]
        assert notices(fired, "call.limit") == []
        assert [s["response"]["instructions"] for s in sends(fired)] == [DEFAULT_STILL_THERE]
        assert StartTimer("idle", 10) in answer(f"still{n}")  # the clock runs again from its answer
    # The caller speaks up: asked again after the next silence, as often.
    m.receive({"type": "input_audio_buffer.speech_started", "item_id": "i1"})
    m.receive({"type": "input_audio_buffer.speech_stopped", "item_id": "i1"})
    answer("r_turn")
    for n in (1, 2):
        assert notices(m.timer("idle"), "call.idle_nudge") == [{"nudge": n}]
        answer(f"again{n}")
    ending = m.timer("idle")
    assert notices(ending, "call.limit") == [{"limit": "idle"}] and notices(ending, "call.idle_nudge") == []
    assert sends(ending)[0]["response"]["instructions"] == DEFAULT_GOODBYE
    # Off by default: the goodbye at the first silence.
    assert notices(live_machine(max_idle_duration=10).timer("idle"), "call.limit") == [{"limit": "idle"}]


def test_a_caller_the_server_prompted_already_is_not_asked_again() -> None:
    m = live_machine(max_idle_duration=10, idle_prompts=1)
    m.receive({"type": "input_audio_buffer.timeout_triggered", "item_id": "i_silence"})
    m.receive({"type": "response.created", "response": {"id": "p1"}})
    m.receive(response_done("p1"))
    ending = m.timer("idle")
    assert notices(ending, "call.idle_nudge") == [] and notices(ending, "call.limit") == [{"limit": "idle"}]


def test_a_line_still_busy_a_period_later_gets_the_goodbye_not_a_question() -> None:
    """A response that runs on (or a playback whose stop never came) holds the idle limit off one period;
    still busy after it, the call is stuck: the goodbye, as without idle prompts, never a question."""
    m = live_machine(max_idle_duration=10, idle_prompts=2)
    m.receive({"type": "response.created", "response": {"id": "long"}})
    assert m.timer("idle") == [StartTimer("idle", 10)]
    stuck = m.timer("idle")
    assert notices(stuck, "call.idle_nudge") == [] and notices(stuck, "call.limit") == [{"limit": "idle"}]


def test_an_unanswered_turn_is_not_timed_by_the_goodbye() -> None:
    m = live_machine(max_idle_duration=10)
    m.receive({"type": "input_audio_buffer.speech_started", "item_id": "i1"})
    m.receive({"type": "input_audio_buffer.speech_stopped", "item_id": "i1"})
    m.receive({"type": "response.created", "response": {"id": "r1"}})
    m.receive(response_done("r1", status="cancelled"))  # no audio answered the turn
    assert notices(m.timer("idle"), "call.limit") == [{"limit": "idle"}]
    m.receive({"type": "response.created", "response": {"id": "bye"}})
    assert (
        notices(m.receive({"type": "output_audio_buffer.started", "response_id": "bye"}), "turn.answered")
        == []
    )
