"""Transfer targets per call: a route or ``Accept(transfer_targets=…)`` gives a call its own allow-list,
which both the ``transfer_call`` tool's schema and ``ctx.transfer`` follow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sideband import Accept, CallContext, IncomingCall, Sideband, TransferNotAllowed
from sideband.routing import RouteError, RouteTable
from sideband.session import DecisionError
from sideband.testing import (
    Script,
    caller_hangs_up,
    caller_says,
    model_calls,
    model_says,
    run_app,
    wait_for_greeting,
)

from .test_routing import write

BILLING = "sip:billing@pbx.example.com"
SUPPORT = "tel:+14155550188"


def desk(**targets: str) -> Sideband:
    """An app with the ready-made transfer tool and a tool that transfers by code."""
    app = Sideband(instructions="Front desk.", transfer_targets=targets or None)
    app.enable_transfer()

    @app.tool
    async def escalate(target: str, ctx: CallContext) -> str:
        """Escalate the call (code picks the target)."""
        try:
            await ctx.transfer(target)
        except TransferNotAllowed as exc:
            return f"refused: {exc}"
        return "escalating"

    return app


def destinations(tools: list[dict[str, Any]]) -> list[str] | None:
    """The labels the transfer tool offers, or ``None`` when it is not offered."""
    for tool in tools:
        if tool.get("name") == "transfer_call":
            return list(tool["parameters"]["properties"]["destination"]["enum"])
    return None


def outputs(call: Any) -> list[Any]:
    """Each function output sent: decoded JSON, or the text a tool returned as is."""
    sent = [
        e["item"]["output"]
        for e in call.received
        if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output"
    ]
    return [json.loads(o) if o.startswith("{") else o for o in sent]


# -- plans ----------------------------------------------------------------------------------------------


def test_a_calls_own_targets_replace_the_apps_in_the_tool_and_the_plan() -> None:
    app = desk(human="tel:+14155550123")
    own = app.plan(Accept(transfer_targets={"billing": BILLING, "support": SUPPORT}))
    assert own.transfer_targets == {"billing": BILLING, "support": SUPPORT}
    assert destinations(own.session["tools"]) == ["billing", "support"]
    assert BILLING not in json.dumps(own.session)  # the model sees labels only
    assert [t["name"] for t in own.session["tools"]] == ["transfer_call", "escalate"]  # same order
    assert own.catalog is not None and own.catalog.get("transfer_call") is own.tools.get("transfer_call")
    # The app's own plan is untouched, and a route naming the same labels shares the app's tool.
    plain = app.plan()
    assert plain.transfer_targets == {"human": "tel:+14155550123"}
    assert destinations(plain.session["tools"]) == ["human"]
    same = app.plan(Accept(transfer_targets={"human": "tel:+14155550999"}))
    assert same.tools.get("transfer_call") is app.tools.get("transfer_call")
    assert same.transfer_targets == {"human": "tel:+14155550999"}


def test_a_call_with_no_targets_is_not_offered_the_transfer_tool() -> None:
    app = desk(human="tel:+14155550123")
    plan = app.plan(Accept(transfer_targets={}))
    assert destinations(plan.session["tools"]) is None
    assert plan.tools.names() == ["escalate"]
    assert plan.catalog is not None and "transfer_call" not in plan.catalog
    with pytest.raises(ValueError, match="'transfer_call' is offered, but the call has no transfer targets"):
        app.plan(Accept(tools=("transfer_call",), transfer_targets={}))


def test_an_app_without_targets_of_its_own_offers_the_tool_only_to_calls_that_have_some() -> None:
    app = desk()
    assert destinations(app.plan().session["tools"]) is None
    assert app.plan().transfer_targets == {}
    plan = app.plan(Accept(transfer_targets={"billing": BILLING}))
    assert destinations(plan.session["tools"]) == ["billing"]


def test_targets_the_app_gets_after_enable_transfer_are_offered_by_label() -> None:
    """The tool is built when enabled; targets added to the app later get a tool of their own labels,
    never the one built without any (which would take any text as its destination)."""
    app = desk()
    app.transfer_targets["human"] = "tel:+14155550123"
    plan = app.plan()
    assert destinations(plan.session["tools"]) == ["human"]
    tool = plan.tools.get("transfer_call")
    assert tool is not None
    with pytest.raises(ValueError):
        tool.parse_arguments('{"destination": "sip:attacker@example.com"}')


def test_enable_transfer_twice_is_an_error() -> None:
    app = desk(human="tel:+14155550123")
    with pytest.raises(ValueError, match="enable_transfer was called already"):
        app.enable_transfer(name="hand_off")


@pytest.mark.parametrize(
    "targets, fragment",
    [
        ({"billing": "https://example.com"}, "'billing' must be a tel: or sip: URI"),
        ({"billing": 42}, "'billing' must be a tel: or sip: URI"),
        ({"": BILLING}, "a label must be a non-empty string"),
        (["billing"], "takes a mapping of label to URI, not list"),
    ],
)
def test_bad_targets_in_a_decision_fail_closed(targets: Any, fragment: str) -> None:
    with pytest.raises(DecisionError) as info:
        Accept(transfer_targets=targets)
    assert str(info.value).startswith("Accept(transfer_targets=...): ") and fragment in str(info.value)


# -- the route table ------------------------------------------------------------------------------------

ROUTES = f"""
[default]
transfer_targets = {{}}

[routes."+18005551212"]
instructions = "Billing desk."
transfer_targets = {{ billing = "{BILLING}" }}

[routes."+18005550100"]
instructions = "Support desk."
"""


def test_a_route_gives_its_number_its_own_targets(tmp_path: Path) -> None:
    table = RouteTable.load(write(tmp_path, ROUTES), ["transfer_call", "escalate"])
    billing, support, default = (table.match(n) for n in ("+18005551212", "+18005550100", "+19995550000"))
    assert isinstance(billing, Accept) and billing.transfer_targets == {"billing": BILLING}
    assert isinstance(support, Accept) and support.transfer_targets is None  # the app's
    assert isinstance(default, Accept) and default.transfer_targets == {}  # nowhere


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('[routes."+1"]\ntransfer_targets = { billing = "https://x" }\n', "'billing' must be a tel: or sip:"),
        ('[routes."+1"]\ntransfer_targets = { billing = 1 }\n', "routes.+1.transfer_targets.billing"),
        ('[routes."+1"]\nreject = 486\ntransfer_targets = {}\n', "answers nothing: transfer_targets"),
    ],
)
def test_bad_route_targets_are_one_line_errors(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(RouteError) as info:
        RouteTable.load(write(tmp_path, text), ["transfer_call"])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_a_route_offering_the_transfer_tool_with_no_targets_stops_the_start(tmp_path: Path) -> None:
    app = desk(human="tel:+14155550123")
    text = '[routes."+18005551212"]\ntools = ["transfer_call"]\ntransfer_targets = {}\n'
    table = RouteTable.load(write(tmp_path, text), app.tools.names())
    with pytest.raises(RouteError, match=r"routes\.\+18005551212: 'transfer_call' is offered, but the call"):
        table.check(app)
    RouteTable.load(write(tmp_path, ROUTES), app.tools.names()).check(app)  # the good file passes


# -- calls ----------------------------------------------------------------------------------------------


async def test_a_routed_call_transfers_to_its_own_targets_only(tmp_path: Path) -> None:
    """The billing number's model is offered ``billing`` only; the app's ``human`` is refused both as the
    model's choice (not in the schema) and from code (``TransferNotAllowed``); ``billing`` is referred."""
    app = desk(human="tel:+14155550123")
    async with run_app(app, routes_file=write(tmp_path, ROUTES)) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Billing."),
                    caller_says("A human please."),
                    model_calls("transfer_call", {"destination": "human"}),
                    model_says("I cannot."),
                    caller_says("Escalate me."),
                    model_calls("escalate", {"target": "human"}),
                    model_says("Not there."),
                    caller_says("Billing then."),
                    model_calls("transfer_call", {"destination": "billing"}),
                    model_says("Transferring you."),
                ]
            ),
            to_number="+18005551212",
        )
        summary = await h.ended(call)
    assert destinations(call.accept_body["tools"]) == ["billing"]
    first, second, third = outputs(call)
    assert first["error"] == "invalid_arguments"
    assert second.startswith("refused: transfer target 'human' is not allowed (allowed: billing)")
    assert third["ok"] is True
    assert call.status == "referred" and call.refer_target == BILLING
    assert summary.reason == "transferred"


async def test_a_call_to_a_number_without_targets_cannot_be_transferred(tmp_path: Path) -> None:
    app = desk(human="tel:+14155550123")
    async with run_app(app, routes_file=write(tmp_path, ROUTES)) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Hello."),
                    caller_says("Escalate me."),
                    model_calls("escalate", {"target": "human"}),
                    model_says("I cannot."),
                    caller_hangs_up(),
                ]
            ),
            to_number="+19995550000",
        )
        await h.ended(call)
    assert destinations(call.accept_body["tools"]) is None
    assert outputs(call) == ["refused: transfer target 'human' is not allowed (allowed: none for this call)"]
    assert call.refer_target is None


async def test_a_hook_that_empties_the_targets_withdraws_the_routes_transfer_tool(tmp_path: Path) -> None:
    """The route offers ``transfer_call`` with targets of its own; the hook's ``transfer_targets={}`` (this
    caller goes nowhere) answers the call with the route's other tools, not a refusal of it."""
    app = desk(human="tel:+14155550123")
    routes = (
        '[routes."+18005551212"]\ninstructions = "Billing desk."\ntools = ["escalate", "transfer_call"]\n'
        f'transfer_targets = {{ billing = "{BILLING}" }}\n'
    )

    @app.on_incoming
    def route(call: IncomingCall) -> Accept:
        return Accept(transfer_targets={})

    async with run_app(app, routes_file=write(tmp_path, routes)) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Billing."),
                    caller_says("Escalate me."),
                    model_calls("escalate", {"target": "billing"}),
                    model_says("I cannot."),
                    caller_hangs_up(),
                ]
            ),
            to_number="+18005551212",
        )
        await h.ended(call)
    assert call.accept_body["instructions"] == "Billing desk."
    assert [t["name"] for t in call.accept_body["tools"]] == ["escalate"]
    assert outputs(call) == [
        "refused: transfer target 'billing' is not allowed (allowed: none for this call)"
    ]
    # the hook naming the tool itself, with no targets, is still its mistake
    route_accept = Accept(tools=("escalate", "transfer_call"), transfer_targets={"billing": BILLING})
    mine = Accept(tools=("transfer_call",), transfer_targets={}).over(
        route_accept, transfer_tool="transfer_call"
    )
    with pytest.raises(ValueError, match="'transfer_call' is offered, but the call has no transfer targets"):
        app.plan(mine)


async def test_the_routing_hooks_targets_follow_the_call_into_a_later_stage() -> None:
    """Targets given by the routing hook hold for the tools a tool offers later (update_session)."""
    app = desk(human="tel:+14155550123")

    @app.on_incoming
    def route(call: IncomingCall) -> Accept:
        return Accept(tools=("verify",), transfer_targets={"support": SUPPORT})

    @app.tool
    async def verify(ctx: CallContext) -> str:
        """Verify the caller."""
        ctx.update_session(tools=["transfer_call"])
        return "verified"

    async with run_app(app) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Hello."),
                    caller_says("Verify me."),
                    model_calls("verify", {}),
                    model_says("Verified."),
                    caller_says("Support please."),
                    model_calls("transfer_call", {"destination": "support"}),
                    model_says("Transferring you."),
                ]
            )
        )
        await h.ended(call)
    assert destinations(call.accept_body["tools"]) is None
    offered = [
        e["session"]["tools"]
        for e in call.received
        if e["type"] == "session.update" and "tools" in e["session"]
    ]
    assert destinations(offered[-1]) == ["support"]
    assert call.refer_target == SUPPORT
