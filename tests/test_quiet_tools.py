"""Quiet tools (``@app.tool(respond=False)``): a successful output goes into the conversation without a
``response.create`` when the model spoke as it called the tool; the caller is never left in silence."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sideband import CallContext, Sideband
from sideband.runtime.machine import Action, CallMachine, MachineConfig, RunTool, Send
from sideband.testing import (
    Script,
    caller_hangs_up,
    caller_says,
    model_calls,
    model_says,
    run_app,
    wait_for_greeting,
)
from sideband.tools import Tool

from .conftest import untagged

SESSION = {"type": "realtime", "instructions": "hi"}
SPOKE = {
    "type": "message",
    "role": "assistant",
    "content": [{"type": "output_audio", "transcript": "Noted."}],
}


def machine(quiet: frozenset[str] = frozenset({"note"})) -> CallMachine:
    m = CallMachine(MachineConfig(session=SESSION, quiet=quiet))
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    return m


def respond_with(m: CallMachine, calls: list[tuple[str, str]], *, spoke: bool, resp: str = "r1") -> list[str]:
    """Response ``resp`` calls ``(call_id, name)`` each (after a spoken message if ``spoke``) and ends;
    returns the call ids it started."""
    m.receive({"type": "response.created", "response": {"id": resp}})
    output: list[Any] = [SPOKE] if spoke else []
    output += [
        {"type": "function_call", "status": "completed", "call_id": c, "name": n, "arguments": "{}"}
        for c, n in calls
    ]
    actions = m.receive(
        {"type": "response.done", "response": {"id": resp, "status": "completed", "output": output}}
    )
    return [a.call_id for a in actions if isinstance(a, RunTool)]


def sent(actions: list[Action]) -> list[str]:
    return [a.event["type"] for a in actions if isinstance(a, Send)]


# -- the machine ----------------------------------------------------------------------------------------


def test_a_quiet_tools_success_after_words_asks_for_no_answer() -> None:
    m = machine()
    assert respond_with(m, [("c1", "note")], spoke=True) == ["c1"]
    assert sent(m.tool_done("c1", "saved", ok=True)) == ["conversation.item.create"]
    assert not m.response_owed


def test_a_quiet_tool_called_without_a_word_is_answered() -> None:
    """Nothing was said: without an answer the caller would hear silence until they speak again."""
    m = machine()
    respond_with(m, [("c1", "note")], spoke=False)
    assert sent(m.tool_done("c1", "saved", ok=True)) == ["conversation.item.create", "response.create"]


def test_a_quiet_tools_failure_is_answered() -> None:
    m = machine()
    respond_with(m, [("c1", "note")], spoke=True)
    assert sent(m.tool_done("c1", '{"error": "tool_failed"}', ok=False)) == [
        "conversation.item.create",
        "response.create",
    ]


@pytest.mark.parametrize("loud_first", [True, False])
def test_one_answer_follows_a_quiet_and_a_loud_call_of_one_response(loud_first: bool) -> None:
    m = machine()
    respond_with(m, [("c1", "note"), ("c2", "lookup")], spoke=True)
    first, second = ("c2", "c1") if loud_first else ("c1", "c2")
    assert sent(m.tool_done(first, "x", ok=True)) == ["conversation.item.create"]
    assert sent(m.tool_done(second, "y", ok=True)) == ["conversation.item.create", "response.create"]
    # The next batch starts afresh: a quiet success alone asks for nothing.
    m.receive({"type": "response.created", "response": {"id": "r9"}})
    m.receive({"type": "response.done", "response": {"id": "r9", "status": "completed", "output": []}})
    respond_with(m, [("c3", "note")], spoke=True, resp="r2")
    assert sent(m.tool_done("c3", "z", ok=True)) == ["conversation.item.create"]


def test_only_the_configured_tools_are_quiet() -> None:
    m = machine(quiet=frozenset())
    respond_with(m, [("c1", "note")], spoke=True)
    assert sent(m.tool_done("c1", "saved", ok=True)) == ["conversation.item.create", "response.create"]


@pytest.mark.parametrize("quiet", [True, False])
def test_an_output_sent_again_after_a_reattach_is_answered_only_if_it_was_to_be(quiet: bool) -> None:
    m = machine(quiet=frozenset({"note"}) if quiet else frozenset())
    respond_with(m, [("c1", "note")], spoke=True)
    m.tool_done("c1", "saved", ok=True)
    m.receive({"type": "response.created", "response": {"id": "r2"}})  # (the answer, if any)
    m.receive({"type": "response.done", "response": {"id": "r2", "status": "completed", "output": []}})
    assert m.awaiting_acks  # lost with the socket, perhaps
    m.reattached()
    m.receive({"type": "session.updated", "session": {}})
    again = sent(m.timer("orphans"))
    assert again == (
        ["conversation.item.create"] if quiet else ["conversation.item.create", "response.create"]
    )


def test_a_loud_siblings_answer_comes_again_with_the_quiet_output_it_followed() -> None:
    """The create went out after the quiet output (the last of its batch), both lost with the socket;
    the loud sibling's output was acknowledged: the quiet output sent again brings the answer again."""
    m = machine()
    respond_with(m, [("c1", "note"), ("c2", "lookup")], spoke=True)
    assert sent(m.tool_done("c2", "shipped", ok=True)) == ["conversation.item.create"]
    m.receive({"type": "conversation.item.added", "item": {"type": "function_call_output", "call_id": "c2"}})
    assert sent(m.tool_done("c1", "saved", ok=True)) == ["conversation.item.create", "response.create"]
    m.reattached()
    m.receive({"type": "session.updated", "session": {}})
    assert sent(m.timer("orphans")) == ["conversation.item.create", "response.create"]


def test_a_loop_breakers_refusal_of_a_quiet_tool_is_answered_when_sent_again() -> None:
    m = CallMachine(MachineConfig(session=SESSION, quiet=frozenset({"note"}), max_identical_calls=1))
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    respond_with(m, [("c1", "note")], spoke=True)
    m.tool_done("c1", "saved", ok=True)
    m.receive({"type": "conversation.item.added", "item": {"type": "function_call_output", "call_id": "c1"}})
    m.receive({"type": "response.created", "response": {"id": "r2"}})
    output = [
        SPOKE,
        {"type": "function_call", "status": "completed", "call_id": "c2", "name": "note", "arguments": "{}"},
    ]
    refused = m.receive(
        {"type": "response.done", "response": {"id": "r2", "status": "completed", "output": output}}
    )
    assert sent(refused) == ["conversation.item.create", "response.create"]  # loop_detected, answered
    m.reattached()
    m.receive({"type": "session.updated", "session": {}})
    assert sent(m.timer("orphans")) == ["conversation.item.create", "response.create"]


def test_a_quiet_tool_that_made_the_caller_wait_with_a_holding_phrase_is_answered() -> None:
    """ "One moment…" promised an answer: the caller is not left waiting for it in silence."""
    m = CallMachine(MachineConfig(session=SESSION, quiet=frozenset({"note"}), filler_after={"note": 1.0}))
    m.start()
    m.receive({"type": "session.updated", "session": {}})
    respond_with(m, [("c1", "note")], spoke=True)
    assert sent(m.timer("filler:c1")) == ["response.create"]
    m.receive({"type": "response.created", "response": {"id": "r_filler"}})
    m.receive(
        {"type": "response.done", "response": {"id": "r_filler", "status": "completed", "output": [SPOKE]}}
    )
    assert sent(m.tool_done("c1", "saved", ok=True)) == ["conversation.item.create", "response.create"]


# -- the tool declaration -------------------------------------------------------------------------------


def test_respond_false_declares_a_quiet_tool_without_a_filler_by_default() -> None:
    async def note(text: str) -> str:
        """Note it."""
        return "ok"

    quiet = Tool.from_function(note, respond=False)
    assert quiet.respond is False and quiet.filler_after == 0.0  # (0: never, whatever the default)
    timed = Tool.from_function(note, respond=False, filler_after=2)
    assert timed.filler_after == 2.0
    assert Tool.from_function(note).respond is True and Tool.from_function(note).filler_after is None
    with pytest.raises(TypeError, match="respond must be True or False"):
        Tool.from_function(note, respond="no")  # type: ignore[arg-type]


# -- a call ---------------------------------------------------------------------------------------------


def notes_app() -> tuple[Sideband, list[str]]:
    app = Sideband(instructions="You are the order desk.")
    notes: list[str] = []

    @app.tool(respond=False)
    async def take_note(text: str, ctx: CallContext) -> str:
        """Write down what the caller wants remembered."""
        notes.append(text)
        return "noted"

    @app.tool
    async def lookup_order(order_id: str) -> dict[str, str]:
        """Look up an order."""
        return {"order_id": order_id, "status": "shipped"}

    return app, notes


async def test_a_call_notes_quietly_and_answers_the_rest() -> None:
    app, notes = notes_app()
    async with run_app(app) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Order desk."),
                    caller_says("Please remember I prefer email."),
                    model_calls("take_note", {"text": "prefers email"}, preamble="I'll note that."),
                    caller_says("Where is order 7?"),
                    model_calls("lookup_order", {"order_id": "7"}),
                    model_says("It shipped."),
                    caller_hangs_up(),
                ]
            )
        )
        summary = await h.ended(call)
    assert notes == ["prefers email"]
    assert [(t.name, t.outcome) for t in summary.tools] == [("take_note", "ok"), ("lookup_order", "ok")]
    # Our creates: the answer to the lookup only; the note's output went in without one.
    timeline = [
        e
        for e in call.received
        if e["type"] == "conversation.item.create"
        or (e["type"] == "response.create" and "response" not in untagged(e))
    ]  # (the greeting's create, which has instructions, aside)
    kinds = [e["item"]["call_id"] if e["type"] == "conversation.item.create" else "create" for e in timeline]
    names = {e["call_id"]: e["name"] for e in call.sent_of_type("response.function_call_arguments.done")}
    assert [names.get(k, k) for k in kinds] == ["take_note", "lookup_order", "create"]
    assert json.loads(call.output_for(kinds[1]) or "{}")["status"] == "shipped"
    assert [r.text for r in call.responses][-1] == "It shipped."


def _creates_after_output(call: Any) -> list[str]:
    kinds = [e["type"] for e in call.received]
    return [k for k in kinds[kinds.index("conversation.item.create") :] if k == "response.create"]


@pytest.mark.parametrize("preamble", ["You're welcome, goodbye!", None])
async def test_end_call_after_a_spoken_goodbye_asks_for_no_second_one(preamble: str | None) -> None:
    """The ready-made ``end_call`` is quiet: called with a goodbye in the same response, the call is hung
    up after it; called without a word, the model is asked to say its goodbye first."""
    app = Sideband(instructions="Front desk.")
    app.enable_end_call()
    async with run_app(app) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Front desk."),
                    caller_says("That's all, thanks."),
                    model_calls("end_call", {}, preamble=preamble),
                ],
                step_timeout=10,
            )
        )
        summary = await h.ended(call)
    assert summary.reason == "end_call_tool" and call.hangup_requested
    assert _creates_after_output(call) == ([] if preamble else ["response.create"])


async def test_transfer_call_after_a_spoken_preamble_asks_for_nothing_more() -> None:
    app = Sideband(instructions="Front desk.", transfer_targets={"human": "tel:+14155550123"})
    app.enable_transfer()
    async with run_app(app) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Front desk."),
                    caller_says("A person, please."),
                    model_calls("transfer_call", {"destination": "human"}, preamble="Connecting you now."),
                ],
                step_timeout=10,
            )
        )
        summary = await h.ended(call)
    assert summary.reason == "transferred" and call.refer_target == "tel:+14155550123"
    assert _creates_after_output(call) == []
