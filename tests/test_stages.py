"""Changing the tools a call offers mid-call (``ctx.update_session(tools=[names])``): what the model is
offered and what sideband runs change together."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from sideband import Accept, CallContext, IncomingCall, SessionConfig, SessionConfigError, Sideband
from sideband.runtime.driver import CallRuntime, CallSummary
from sideband.runtime.machine import CallMachine, MachineConfig
from sideband.testing import (
    Harness,
    Script,
    SimCall,
    Step,
    caller_hangs_up,
    caller_says,
    model_calls,
    model_says,
    pause,
    run_app,
    wait_for_greeting,
)


def desk(
    first: tuple[str, ...] = ("verify", "lookup_order"), session: SessionConfig | None = None
) -> Sideband:
    """A desk that offers ``first`` (``verify`` and ``lookup_order``); a verified caller is offered
    ``refund`` (and a CRM the server runs) instead."""
    app = Sideband(
        instructions="You are the order desk.",
        voice="marin",
        session=session,
        transfer_targets={"human": "tel:+14155550123"},
    )
    app.enable_transfer()

    @app.on_incoming
    def route(call: IncomingCall) -> Accept:
        return Accept(tools=first)

    @app.tool
    async def verify(pin: str, ctx: CallContext) -> str:
        """Check the caller's PIN."""
        ctx.update_session(
            instructions="The caller is verified.",
            tools=["refund", {"type": "mcp", "server_label": "crm",
                                              "server_url": "https://crm.example.com/mcp",
                                              "require_approval": "never"}],
        )  # fmt: skip
        return "verified"

    @app.tool
    async def lookup_order(order_id: str) -> str:
        """Look up an order."""
        return f"order {order_id} shipped"

    @app.tool
    async def refund(order_id: str) -> str:
        """Refund an order."""
        return f"order {order_id} refunded"

    return app


def outputs(call: Any) -> dict[str, str]:
    """Each function output the controller sent, by the name of the tool the model called."""
    names = {e["call_id"]: e["name"] for e in call.sent_of_type("response.function_call_arguments.done")}
    return {
        names[e["item"]["call_id"]]: e["item"]["output"]
        for e in call.received
        if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output"
    }


def errors(output: str) -> str | None:
    try:
        decoded = json.loads(output)
    except ValueError:
        return None
    return decoded.get("error") if isinstance(decoded, dict) else None


async def test_a_tool_offers_the_next_stage_and_withdraws_the_last() -> None:
    async with run_app(desk()) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Order desk."),
                    caller_says("Refund order 7."),
                    model_calls("refund", {"order_id": "7"}, undeclared=True),  # not offered yet: not run
                    model_says("First your PIN."),
                    caller_says("1234."),
                    model_calls("verify", {"pin": "1234"}),
                    model_says("Thanks."),
                    caller_says("Refund order 7."),
                    model_calls("refund", {"order_id": "7"}),
                    model_says("Done."),
                    caller_says("And verify me again."),
                    model_calls("verify", {"pin": "1234"}, undeclared=True),  # withdrawn: not run
                    model_says("You are verified already."),
                    caller_hangs_up(),
                ]
            )
        )
        summary = await h.ended(call)
    assert [(t.name, t.outcome) for t in summary.tools] == [
        ("refund", "unknown_tool"),
        ("verify", "ok"),
        ("refund", "ok"),
        ("verify", "unknown_tool"),
    ]
    updates = [e["session"] for e in call.received if e["type"] == "session.update"]
    offered = [u for u in updates if "tools" in u]
    assert [[t.get("name", t.get("server_label")) for t in u["tools"]] for u in offered] == [
        ["verify", "lookup_order"],  # the route's, with the session config
        ["refund", "crm"],  # the stage's, and the server's own tool
    ]
    stage = offered[1]
    assert stage["instructions"] == "The caller is verified."
    assert stage["tools"][0] == {
        "type": "function",
        "name": "refund",
        "description": "Refund an order.",
        "parameters": stage["tools"][0]["parameters"],
    }
    assert stage["tools"][0]["parameters"]["required"] == ["order_id"]
    # The stage went out before verify's output, so the model answering that output has the new tools.
    kinds = [
        "stage" if e["type"] == "session.update" and "tools" in e["session"] else e["type"]
        for e in call.received
    ]
    verified = next(
        i
        for i, e in enumerate(call.received)
        if e["type"] == "conversation.item.create" and "verified" in str(e)
    )
    assert kinds.index("stage") < verified
    assert outputs(call)["refund"] == "order 7 refunded"


async def test_the_calls_of_one_response_run_with_the_tools_it_was_offered() -> None:
    """verify changes the tools as it runs; lookup_order, called beside it in the same response, was
    offered to that response and runs. Called again later, it is not offered any more."""
    async with run_app(desk()) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Order desk."),
                    caller_says("PIN 1234, and where is order 9?"),
                    model_calls([("verify", {"pin": "1234"}), ("lookup_order", {"order_id": "9"})]),
                    model_says("Verified; order 9 shipped."),
                    caller_says("Where is order 10?"),
                    model_calls(  # (lookup_order is withdrawn)
                        [("lookup_order", {"order_id": "10"}), ("refund", {"order_id": "9"})], undeclared=True
                    ),
                    model_says("I can no longer look orders up."),
                    caller_hangs_up(),
                ]
            )
        )
        summary = await h.ended(call)
    outcomes = [(t.name, t.outcome) for t in summary.tools]
    assert sorted(outcomes[:2]) == [("lookup_order", "ok"), ("verify", "ok")]
    assert sorted(outcomes[2:]) == [("lookup_order", "unknown_tool"), ("refund", "ok")]


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        (["refund", "made_up"], "'made_up' not among the call's tools"),
        ("refund", "tools must be a list"),
        (
            [{"type": "function", "name": "refund", "parameters": {}}],
            "function tool 'refund' given as an object",
        ),
        ([{"name": "refund"}], "function tool 'refund' given as an object"),
        ([3], "each is a tool name"),
        ([{"type": "mcp", "server_label": "crm", "server_url": "https://x"}], 'needs "require_approval"'),
    ],
)
async def test_tools_that_cannot_be_offered_are_refused_and_change_nothing(tools: Any, message: str) -> None:
    refusals, call, summary = await _refused_stage({"tools": tools})
    assert len(refusals) == 1 and message in refusals[0], refusals
    assert [(t.name, t.outcome) for t in summary.tools] == [("try_stage", "error"), ("lookup_order", "ok")]
    assert sum(1 for e in call.received if e["type"] == "session.update") == 1  # the session config only


async def _refused_stage(fields: dict[str, Any]) -> tuple[list[str], SimCall, CallSummary]:
    """A call whose ``try_stage`` tool asks for ``update_session(**fields)`` after the greeting (the model
    has spoken), then looks up an order: what the update was refused with, the call and its summary."""
    app = desk(first=("try_stage", "lookup_order"))
    refusals: list[str] = []

    @app.tool
    async def try_stage(ctx: CallContext) -> str:
        """Move on to the next stage."""
        try:
            ctx.update_session(**fields)
        except SessionConfigError as exc:
            refusals.append(str(exc))
            raise
        return "changed"

    async with run_app(app) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Order desk."),  # (the model has spoken)
                    caller_says("Go."),
                    model_calls("try_stage", {}),
                    model_says("That did not work."),
                    caller_says("Where is order 3?"),
                    model_calls("lookup_order", {"order_id": "3"}),
                    model_says("Shipped."),
                    caller_hangs_up(),
                ]
            )
        )
        summary = await h.ended(call)
    return refusals, call, summary


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"voice": "cedar", "instructions": "Verified.", "tools": ["refund"]},
            "the voice cannot change once the model has spoken in the call",
        ),
        ({"audio": {"output": {"voice": "voice_1234"}}, "tools": ["refund"]}, "it stays 'marin'"),
        ({"model": "gpt-realtime-mini", "tools": ["refund"]}, "the model cannot change once the model has"),
    ],
)
async def test_a_new_voice_or_model_after_the_model_spoke_is_refused_and_the_tools_stay(
    fields: dict[str, Any], message: str
) -> None:
    """OpenAI refuses the whole update then (``cannot_update_voice``): had it gone out, the call would run
    the new tools while the model still had, and called, the old ones."""
    refusals, call, summary = await _refused_stage(fields)
    assert len(refusals) == 1 and message in refusals[0], refusals
    assert [(t.name, t.outcome) for t in summary.tools] == [("try_stage", "error"), ("lookup_order", "ok")]
    assert sum(1 for e in call.received if e["type"] == "session.update") == 1  # the session config only
    assert not call.sent_of_type("error")


_BEFORE_AND_AFTER_SPEECH = Script(
    [
        caller_says("Go."),
        model_calls("try_stage", {}),  # (no words with it: no audio yet)
        model_says("Done."),
        caller_says("Where is order 3?"),
        model_calls("check_order", {"order_id": "3"}),
        model_says("Shipped."),
        caller_hangs_up(),
    ]
)
"""A call whose tool ``try_stage`` runs before the model has spoken, and ``check_order`` after."""


async def test_the_voice_may_change_before_the_model_speaks_and_be_given_again_after() -> None:
    app = desk(first=("try_stage", "check_order"), session=SessionConfig(greeting=None))
    refusals: list[str] = []

    @app.tool
    async def try_stage(ctx: CallContext) -> str:
        """Change the voice."""
        ctx.update_session(voice="cedar")  # (nothing said yet: taken)
        return "changed"

    @app.tool
    async def check_order(order_id: str, ctx: CallContext) -> str:
        """Look up an order."""
        ctx.update_session(voice="cedar", instructions="Be brief.")  # (the same voice: taken)
        try:
            ctx.update_session(voice="marin")
        except SessionConfigError as exc:
            refusals.append(str(exc))
        return "shipped"

    async with run_app(app) as h:
        call = await h.call(_BEFORE_AND_AFTER_SPEECH)
        await h.ended(call)
    assert not call.sent_of_type("error")
    updates = [e["session"] for e in call.received if e["type"] == "session.update"][1:]
    assert updates == [
        {"type": "realtime", "audio": {"output": {"voice": "cedar"}}},
        {"type": "realtime", "instructions": "Be brief.", "audio": {"output": {"voice": "cedar"}}},
    ]
    assert len(refusals) == 1 and "it stays 'cedar'" in refusals[0], refusals


@pytest.mark.parametrize("set_by", ["config", "update"])
async def test_tools_that_leave_out_the_forced_tool_need_a_tool_choice_too(set_by: str) -> None:
    """A ``tool_choice`` forcing a tool (the session config's, or an earlier update's) that new tools
    leave out would force a tool the model no longer has: the update must say what is chosen now."""
    forced = {"type": "function", "name": "try_stage"}
    app = desk(
        first=("try_stage", "lookup_order"),
        session=SessionConfig(tool_choice=forced) if set_by == "config" else None,
    )
    refusals: list[str] = []

    @app.tool
    async def try_stage(ctx: CallContext) -> str:
        """Move on to the next stage."""
        if set_by == "update":
            ctx.update_session(tool_choice=forced)
        for fields in ({"tools": ["refund"]}, {"tools": ["refund"], "tool_choice": "auto"}):
            try:
                ctx.update_session(**fields)
            except SessionConfigError as exc:
                refusals.append(str(exc))
        return "changed"

    async with run_app(app) as h:
        call = await h.call(
            Script(
                [
                    caller_says("Go."),
                    model_calls("try_stage", {}),
                    model_says("Done."),
                    caller_says("Refund order 3."),
                    model_calls("refund", {"order_id": "3"}),
                    model_says("Refunded."),
                    caller_hangs_up(),
                ]
            )
        )
        summary = await h.ended(call)
    assert refusals == [
        "tools: the session's tool_choice forces 'try_stage', which these tools leave out: give tool_choice "
        'too ("auto", or one of these tools)'
    ]
    assert [(t.name, t.outcome) for t in summary.tools] == [("try_stage", "ok"), ("refund", "ok")]
    assert call.session["tool_choice"] == "auto" and [t["name"] for t in call.session["tools"]] == ["refund"]
    assert not call.sent_of_type("error")


def bare_runtime(**session: Any) -> CallRuntime:
    """The desk's call runtime with no socket: tests feed it events and read what it ran."""
    app = desk()

    async def connect() -> Any:
        raise AssertionError("no socket in this test")

    return CallRuntime(
        machine=CallMachine(MachineConfig(session={"type": "realtime", **session})),
        ctx=CallContext("rtc_bare"),
        tools=app.tools.subset(["verify", "lookup_order"]),
        catalog=app.tools,
        connect=connect,
    )


async def test_a_response_under_way_when_the_tools_change_may_still_call_those_it_was_offered() -> None:
    """The tools change while a response streams (a hook, a slow tool of an earlier response): that
    response was offered the old ones, and its call of one withdrawn still runs; the next response's
    does not."""
    runtime = bare_runtime()
    machine = runtime.machine
    for event in (
        {"type": "session.updated", "session": {"type": "realtime"}},
        {"type": "response.created", "response": {"id": "r1"}},
    ):
        runtime._apply(machine.receive(event))
    runtime.update_session(tools=["refund"])  # while r1 streams
    assert runtime.tools.names() == ["refund"]

    def call(call_id: str, name: str, response_id: str) -> list[dict[str, Any]]:
        return [
            {"type": "response.created", "response": {"id": response_id}},
            {
                "type": "response.function_call_arguments.done",
                "response_id": response_id,
                "call_id": call_id,
                "name": name,
                "arguments": '{"order_id": "5"}',
            },
            {"type": "response.done", "response": {"id": response_id, "status": "completed", "output": []}},
        ]

    for event in call("c1", "lookup_order", "r1")[1:] + call("c2", "lookup_order", "r2"):
        runtime._apply(machine.receive(event))
        await asyncio.gather(*runtime._tool_tasks)
    assert [(t.call_id, t.outcome) for t in runtime.summary.tools] == [("c1", "ok"), ("c2", "unknown_tool")]


async def test_a_response_asked_for_before_the_tools_change_may_call_those_it_was_offered() -> None:
    """Our response.create is out (answering a tool's output) when code changes the tools (an on_tool
    hook, say): the server takes the create first, so the response it starts was offered the old tools."""
    runtime = bare_runtime()
    machine = runtime.machine

    def receive(event: dict[str, Any]) -> None:
        runtime._handle(json.dumps(event).encode())

    receive({"type": "session.updated", "session": {"type": "realtime"}})
    runtime.say("Tell the caller their order shipped.")  # a create goes out; no response yet
    assert machine.response_pending and machine.responding is None
    runtime.update_session(tools=["refund"])
    for event in (
        {"type": "response.created", "response": {"id": "r1"}},
        {
            "type": "response.function_call_arguments.done",
            "response_id": "r1",
            "call_id": "c1",
            "name": "lookup_order",
            "arguments": '{"order_id": "5"}',
        },
        {"type": "response.done", "response": {"id": "r1", "status": "completed", "output": []}},
    ):
        receive(event)
    await asyncio.gather(*runtime._tool_tasks)
    assert [(t.call_id, t.outcome) for t in runtime.summary.tools] == [("c1", "ok")]


async def test_no_tools_left_while_a_tool_is_required_needs_a_tool_choice_too() -> None:
    runtime = bare_runtime(tool_choice="required")
    with pytest.raises(SessionConfigError, match='none left while the session\'s tool_choice is "required"'):
        runtime.update_session(tools=[])
    assert runtime.tools.names() == ["verify", "lookup_order"]  # unchanged
    runtime.update_session(tools=[], tool_choice="auto")
    assert runtime.tools.names() == []


async def test_an_update_the_server_refused_leaves_later_checks_to_the_session_as_it_is() -> None:
    """The server refuses a whole ``session.update`` for a reason of its own (here a model the key may
    not use): its voice and tool_choice never applied, and later updates are checked against the session
    the server has, not against the refused one."""
    app = desk(first=("try_stage", "check_order"), session=SessionConfig(greeting=None))
    refusals: list[str] = []

    @app.tool
    async def try_stage(ctx: CallContext) -> str:
        """Change the voice."""
        forced = {"type": "function", "name": "check_order"}
        ctx.update_session(voice="cedar", tool_choice=forced, model="gpt-realtime-nope")  # (refused)
        return "changed"

    @app.tool
    async def check_order(order_id: str, ctx: CallContext) -> str:
        """Look up an order."""
        for fields in (
            {"voice": "cedar", "instructions": "Be brief."},
            {"voice": "marin"},
            {"tools": ["refund"]},
        ):
            try:
                ctx.update_session(**fields)
            except SessionConfigError as exc:
                refusals.append(str(exc))
        return "shipped"

    async with run_app(app) as h:
        call = await h.call(_BEFORE_AND_AFTER_SPEECH)
        await h.ended(call)
    assert [e["error"]["param"] for e in call.sent_of_type("error")] == ["session.model"]  # that one only
    assert len(refusals) == 1 and "it stays 'marin'" in refusals[0], refusals
    updates = [e["session"] for e in call.received if e["type"] == "session.update"][2:]
    assert updates == [
        {"type": "realtime", "audio": {"output": {"voice": "marin"}}},
        {"type": "realtime", "tools": [json.loads(json.dumps(t)) for t in app.tools.definitions(["refund"])]},
    ]
    assert call.session["audio"]["output"]["voice"] == "marin" and call.session["tool_choice"] == "auto"


async def test_a_refused_update_gives_way_to_the_updates_sent_after_it() -> None:
    """An update sent before the server's refusal of an earlier one arrives: once that is refused, the
    session's voice is the later update's (the server applies updates in order), not the config's; and a
    refused tool_choice leaves the one the server has."""
    runtime = bare_runtime(audio={"output": {"voice": "marin"}})

    def receive(event: dict[str, Any]) -> None:
        runtime._handle(json.dumps(event).encode())

    def refuse(event_id: str) -> None:
        receive({"type": "error", "error": {"type": "invalid_request_error", "event_id": event_id}})

    def last_update() -> str:
        event = json.loads(runtime._outbox[-1])
        assert event["type"] == "session.update"
        return str(event["event_id"])

    receive({"type": "session.updated", "session": {"type": "realtime"}})
    runtime.update_session(voice="cedar", model="gpt-realtime-nope")
    first = last_update()
    runtime.update_session(voice="sage")
    refuse(first)
    receive({"type": "output_audio_buffer.started", "response_id": "r1"})  # the model speaks
    with pytest.raises(SessionConfigError, match="it stays 'sage'"):
        runtime.update_session(voice="marin")
    receive(
        {"type": "session.updated", "session": {"type": "realtime", "audio": {"output": {"voice": "sage"}}}}
    )
    runtime.update_session(tool_choice={"type": "function", "name": "verify"}, instructions="Verify first.")
    refuse(last_update())
    runtime.update_session(tools=["refund"])  # (no tool_choice in force leaves it out)
    assert runtime.tools.names() == ["refund"]


def feeder(runtime: CallRuntime) -> tuple[Any, Any, Any]:
    """Feed ``runtime`` server events: any, a refusal of our event, and read our last session.update's id."""

    def receive(event: dict[str, Any]) -> None:
        runtime._handle(json.dumps(event).encode())

    def refuse(event_id: str) -> None:
        receive({"type": "error", "error": {"type": "invalid_request_error", "event_id": event_id}})

    def last_update() -> str:
        event = json.loads(runtime._outbox[-1])
        assert event["type"] == "session.update"
        return str(event["event_id"])

    return receive, refuse, last_update


async def test_a_refused_update_of_the_tools_leaves_the_tools_the_server_offers() -> None:
    """The server refuses a whole update of the tools (with a model the key may not use): it still
    offers the tools set before, which a tool_choice may force and the model may call."""
    runtime = bare_runtime(audio={"output": {"voice": "marin"}})
    receive, refuse, last_update = feeder(runtime)
    receive({"type": "session.updated", "session": {"type": "realtime"}})
    runtime.update_session(tools=["verify"])
    receive({"type": "session.updated", "session": {"type": "realtime"}})
    runtime.update_session(tools=["refund"], model="gpt-realtime-nope")
    refuse(last_update())
    assert runtime.tools.names() == ["verify"]
    runtime.update_session(tool_choice={"type": "function", "name": "verify"})  # (no error)
    runtime.update_session(tools=["refund", "lookup_order"], tool_choice="auto", model="gpt-realtime-nope")
    refuse(last_update())
    assert runtime.tools.names() == ["verify"]
    runtime.update_session(tools=["lookup_order"], tool_choice="auto")
    runtime.update_session(tools=["refund"], model="gpt-realtime-nope")
    refuse(last_update())  # (answered before the update sent ahead of it)
    assert runtime.tools.names() == ["lookup_order"]


async def test_the_models_call_of_a_tool_a_refused_update_left_out_runs() -> None:
    app = desk(first=("switch", "lookup_order"), session=SessionConfig(greeting=None))

    @app.tool
    async def switch(ctx: CallContext) -> str:
        """Switch to refunds."""
        ctx.update_session(tools=["refund"], model="gpt-realtime-nope")  # (refused whole)
        return "ok"

    async with run_app(app) as h:
        call = await h.call(
            Script(
                [
                    caller_says("Go."),
                    model_calls("switch", {}),
                    model_says("Done."),
                    caller_says("Where is order 3?"),
                    model_calls("lookup_order", {"order_id": "3"}),  # (the server still offers it)
                    model_says("Shipped."),
                    caller_hangs_up(),
                ]
            )
        )
        await h.ended(call)
    assert [e["error"]["param"] for e in call.sent_of_type("error")] == ["session.model"]
    assert sorted(t["name"] for t in call.session["tools"]) == ["lookup_order", "switch"]
    outputs = [
        e["item"]["output"]
        for e in call.received
        if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output"
    ]
    assert outputs == ["ok", "order 3 shipped"]


def order_1_after(tool: str) -> list[Step]:
    """The caller has the model call ``tool``, then asks for order 1; a pause follows, during which
    :func:`lose_the_sideband_once_answered` has the sideband lost and re-attached."""
    return [
        caller_says("Go."),
        model_calls(tool, {}),
        model_says("Done."),
        caller_says("And order 1?"),
        model_calls("lookup_order", {"order_id": "1"}),
        model_says("Shipped."),
        pause(1.5),
    ]


async def lose_the_sideband_once_answered(h: Harness, call: SimCall) -> None:
    """Once the output for order 1 is in, the sideband is lost (no close), and re-attached."""

    def answered(c: SimCall) -> bool:
        return any(
            e["type"] == "conversation.item.create" and e["item"].get("output") == "order 1 shipped"
            for e in c.received
        )

    await call.wait_for(answered, timeout=5)
    await h.sim.drop_sideband(call, "abnormal")
    await call.wait_for(lambda c: c.sideband_connects == 2, timeout=5)


async def test_a_refused_update_is_not_sent_again_after_a_reattach() -> None:
    """The server refused an update whole; the sideband is lost and re-attached: what code set since
    the config is sent again, field by field, but nothing of the refused update (the server would take
    its forced tool_choice alone), and later updates are checked against the session the server has."""
    app = desk(first=("try_stage", "check_order", "lookup_order"), session=SessionConfig(greeting=None))
    outcome: list[str] = []
    forced = {"type": "function", "name": "check_order"}

    @app.tool
    async def try_stage(ctx: CallContext) -> str:
        """Stage."""
        ctx.update_session(instructions="Be brief.")
        ctx.update_session(tool_choice=forced, instructions="Check.", model="gpt-realtime-nope")  # (refused)
        return "changed"

    @app.tool
    async def check_order(order_id: str, ctx: CallContext) -> str:
        """Look up an order."""
        try:
            ctx.update_session(tools=["refund"])
            outcome.append("sent")
        except SessionConfigError as exc:
            outcome.append(f"raised: {exc}")
        return "shipped"

    async with run_app(app) as h:
        call = await h.call(
            Script(
                [
                    *order_1_after("try_stage"),
                    caller_says("Where is order 3?"),
                    model_calls("check_order", {"order_id": "3"}),
                    model_says("Shipped."),
                    caller_hangs_up(),
                ]
            )
        )

        await lose_the_sideband_once_answered(h, call)  # (the refusal was read before it, on that socket)
        await h.ended(call)
    assert [e["error"]["param"] for e in call.sent_of_type("error")] == ["session.model"]
    updates = [e["session"] for e in call.received if e["type"] == "session.update"]
    refused = {
        "type": "realtime",
        "tool_choice": forced,
        "instructions": "Check.",
        "model": "gpt-realtime-nope",
    }
    assert [u for u in updates if "tool_choice" in u] == [refused]
    assert [u for u in updates if u.get("model") == "gpt-realtime-nope"] == [refused]
    assert {"type": "realtime", "instructions": "Be brief."} in updates[3:]  # (sent again)
    assert outcome == ["sent"]
    assert call.session["tool_choice"] == "auto" and call.session["instructions"] == "Be brief."
    assert [t["name"] for t in call.session["tools"]] == ["refund"]


async def test_a_reattach_after_a_voice_change_and_speech_refuses_nothing() -> None:
    """Code changed the voice before the model spoke; the sideband is lost after it spoke in that
    voice: the re-attach sends the config without its voice (OpenAI would refuse the whole update) and
    then code's change, the voice apart, which the server takes."""
    app = desk(first=("switch", "lookup_order"), session=SessionConfig(greeting=None))

    @app.tool
    async def switch(ctx: CallContext) -> str:
        """Switch voices."""
        ctx.update_session(voice="cedar", instructions="Be brief.")
        return "ok"

    async with run_app(app) as h:
        call = await h.call(
            Script(
                [
                    *order_1_after("switch"),
                    caller_says("Thanks."),
                    model_says("Bye."),
                    caller_hangs_up(),
                ]
            )
        )

        await lose_the_sideband_once_answered(h, call)  # (after "Done." was spoken in cedar)
        await h.ended(call)
    assert call.sent_of_type("error") == []
    updates = [e["session"] for e in call.received if e["type"] == "session.update"]
    assert "voice" not in updates[-3].get("audio", {}).get("output", {})  # (the config, sent again)
    assert updates[-2:] == [
        {"type": "realtime", "audio": {"output": {"voice": "cedar"}}},
        {"type": "realtime", "instructions": "Be brief."},
    ]
    assert call.session["audio"]["output"]["voice"] == "cedar"
    assert call.session["instructions"] == "Be brief."


async def test_an_output_whose_acknowledgement_was_lost_with_the_socket_reaches_the_model_once() -> None:
    """The server takes the tool's output and our response.create after it, and the socket is lost just
    as it acknowledges the output: the answer's response, shown on the new socket, says the output
    arrived (it went before it, on the same socket). Sent again, the model would have it twice and
    speak again after its answer (after its goodbye, on a call that is ending)."""
    app = desk(first=("lookup_order",), session=SessionConfig(greeting=None))
    async with run_app(app) as h:
        call = h.sim.create_call(
            Script(
                [
                    caller_says("Where is order 1?"),
                    model_calls("lookup_order", {"order_id": "1"}),
                    model_says("Shipped."),
                    pause(3),  # (past the re-attach grace: what is sent again then is heard)
                    caller_hangs_up(),
                ]
            )
        )
        acknowledge = call._ack_item

        async def lose_the_socket_first(previous: str | None, item: dict[str, Any]) -> None:
            if item.get("type") == "function_call_output" and call.sideband_connects == 1:
                await h.sim.drop_sideband(call, "abnormal")
            await acknowledge(previous, item)

        call._ack_item = lose_the_socket_first  # type: ignore[method-assign]
        call.webhook_delivery = await h.sender.deliver(h.sim.incoming_event(call))
        await h.ended(call)
    assert call.sideband_connects == 2
    assert [output for _, output in call.function_outputs] == ["order 1 shipped"]
    assert [r.text for r in call.responses if r.trigger == "response.create"] == ["Shipped."]
