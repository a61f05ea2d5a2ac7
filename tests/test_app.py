"""Tests for sideband.app: SIP number parsing, IncomingCall, and the Sideband app object."""

import functools
import re
import typing
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sideband import EndReason, ToolOutcome
from sideband.app import IncomingCall, Sideband, parse_number
from sideband.context import CallContext, SipHeader
from sideband.metrics import END_REASONS, TOOL_OUTCOMES
from sideband.session import Accept, Refer, Reject, SessionConfig, validate_accept_payload

# -- parse_number ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("sip:+142555512112@sip.example.com", "+142555512112"),
        ("<sip:+14155550123@sip.example.com>;tag=abc", "+14155550123"),
        ('"Bob" <sip:+14155550123@example.com>;tag=9', "+14155550123"),
        ("tel:+14155550123", "+14155550123"),
        ("<tel:+14155550123>", "+14155550123"),
        ("sips:+14155550123@secure.example.com", "+14155550123"),
        ("SIP:+14155550123@EXAMPLE.COM", "+14155550123"),
        ("sip:+1-415-555-0123@example.com", "+14155550123"),
        ("sip:+1.415.555.0123@example.com", "+14155550123"),
        ("sip:+14155550123;user=phone@example.com", "+14155550123"),
        ("sip:4155550123@example.com", "4155550123"),
        ("sip:alice@example.com", "alice"),
        ('"Alice" <sip:alice@example.com>;tag=1', "alice"),
        ("sip:+12@example.com", "+12"),  # too short for E.164: returned as is
        ("garbage", None),
        ("alice@example.com", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_number(value: str | None, expected: str | None) -> None:
    assert parse_number(value) == expected


@pytest.mark.parametrize(
    "value",
    ['"Alice" <sip:+1 (425) 555-0100@x>;tag=1', "<sip:+1 (425) 555-0100@example.com>"],
)
def test_parse_number_with_spaces_in_user_part(value: str) -> None:
    assert parse_number(value) == "+14255550100"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # no user part: a host (and port) is no number
        ("<sip:10.0.0.1:5060>", None),
        ("<sips:carrier.example>;tag=1", None),
        ("sip:carrier.example;transport=tcp", None),
        ("<sip:@carrier.example>", None),
        # a password is no part of the user
        ("<sip:+14155550100:pw@carrier.example>", "+14155550100"),
        ("<sips:alice:secret@example.com>", "alice"),
        ("<sip:+14155550100;isub=12:pw@carrier.example>", "+14155550100"),
        ("tel:+14155550100;phone-context=example.com", "+14155550100"),
        # URI headers are no part of the address: an "@" there is no user part's end
        ("<sip:10.0.0.1?subject=a@b>", None),
        ("<sip:carrier.example;transport=tcp?x=1@y>", None),
        ("<sip:+14155550100@carrier.example?subject=a@b>", "+14155550100"),
        ("sip:+14155550100@carrier.example?x=y@z", "+14155550100"),
        ("<tel:+14155550100?x=a@b>", "+14155550100"),
        # control characters are in no number
        ("<sip:+1415555%000100@carrier.example>", None),
        ("<sip:alice%0D%0AX-Injected:%201@example.com>", None),
        ("<sip:%E2%80%AEalice@example.com>", None),  # (a right-to-left override)
        ("<sip:alice%E2%80%A8x@example.com>", None),  # (a line separator)
        ("<tel:+1415%7F5550100>", None),
    ],
)
def test_parse_number_takes_the_user_part_alone(value: str, expected: str | None) -> None:
    assert parse_number(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # a local number with a global phone-context is that prefix and the number (RFC 3966)
        ("<tel:4155550100;phone-context=+1>", "+14155550100"),
        ("<tel:863-1234;phone-context=+1-914-555>", "8631234"),  # a longer prefix: digits (RFC 3966's)
        ("<tel:1-800-123-4567;phone-context=+1-972>", "18001234567"),
        ("<sip:14155550100;phone-context=+1@carrier;user=phone>", "+14155550100"),  # code not repeated
        ("<tel:8631234;phone-context=+1>", "8631234"),  # no area code: not a whole NANP number
        ("<sip:02079460000;phone-context=+44@ims;user=phone>", "+442079460000"),  # trunk 0 dropped
        ("<sip:442079460000;phone-context=+44@ims;user=phone>", "+442079460000"),
        ("<sip:2079460000;phone-context=%2B44@ims;user=phone>", "+442079460000"),
        ("<sip:0612345678;phone-context=+39@ims;user=phone>", "+390612345678"),  # Italy keeps its 0
        ("<sip:4155550100;phone-context=%2B1@carrier.example;user=phone>", "+14155550100"),
        ("<tel:4155550100;phone-context=example.com>", "4155550100"),  # a domain's: no prefix
        ("<tel:911;phone-context=+1>", "911"),  # a short code is no E.164 number
        # a trunk prefix written after the country code is not dialed from abroad
        ("<sip:+44(0)2079460000@example.com>", "+442079460000"),
        ('"Desk" <sip:+44 (0) 20 7946 0000@example.com>', "+442079460000"),
        ("<sip:+4402079460000@example.com>", "+4402079460000"),  # (no brackets: as written)
        ("<sip:+39(0)612345678@example.com>", "+390612345678"),  # Italy dials its 0 from abroad too
        ("<sip:+378 (0)549 123456@example.com>", "+3780549123456"),  # San Marino too
    ],
)
def test_parse_number_gives_a_local_or_bracketed_number_as_dialled_from_abroad(
    value: str, expected: str
) -> None:
    assert parse_number(value) == expected


def test_dialed_reads_a_bracketed_trunk_zero_as_parse_number_does() -> None:
    call = IncomingCall.from_sip("rtc_1", headers(("To", "<sip:+442079460000@example.com>")))
    assert call.dialed("+44 (0)20 7946 0000") and call.dialed("+442079460000")
    assert not call.dialed("+4402079460000")
    italy = IncomingCall.from_sip("rtc_2", headers(("To", "<sip:+390612345678@example.com>")))
    assert italy.dialed("+39 (0)6 1234 5678") and not italy.dialed("+39612345678")


def test_an_address_whose_uri_headers_hold_an_at_sign_is_a_withheld_caller() -> None:
    call = IncomingCall.from_sip("rtc_1", headers(("From", "<sip:10.0.0.1?subject=a@b>;tag=1")))
    assert call.from_number is None and call.caller_withheld


def test_parse_number_ignores_uri_like_display_name() -> None:
    assert parse_number('"Hotel:Lobby" <sip:+14155550123@example.com>;tag=1') == "+14155550123"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # A caller chooses the display name: an address inside it must not pass for the caller's.
        ('"VIP <sip:+14155550100@x>" <sip:+19995550000@carrier>;tag=1', "+19995550000"),
        ('"a \\"quoted\\" <sip:+14155550100@x>" <sip:+19995550000@c>', "+19995550000"),
        ('"unterminated <sip:+14155550100@x>', None),
        ("Bob <sip:+19995550000@c>;tag=<x>", "+19995550000"),  # the first <…>, not up to the last >
        ("<sip:%2B14155550123@example.com>", "+14155550123"),  # percent-encoded "+"
        ("sip:+\u0661\u0664\u0661\u0665\u0665\u0665\u0665\u0660\u0661\u0662\u0663@x", "+١٤١٥٥٥٥٠١٢٣"),
    ],
)
def test_parse_number_reads_the_address_not_the_display_name(value: str, expected: str | None) -> None:
    """Non-ASCII digits stay as given (never taken for E.164, so they match no route by accident)."""
    assert parse_number(value) == expected


def test_from_sip_reads_compact_header_names() -> None:
    call = IncomingCall.from_sip(
        "rtc_1", headers(("f", "<sip:+14155550100@a>;tag=1"), ("t", "<sip:+18005550000@b>"))
    )
    assert (call.from_number, call.to_number) == ("+14155550100", "+18005550000")


# -- IncomingCall ----------------------------------------------------------------------------------------


def headers(*pairs: tuple[str, str]) -> tuple[SipHeader, ...]:
    return tuple(SipHeader(name, value) for name, value in pairs)


def test_from_sip_parses_from_and_to() -> None:
    hdrs = headers(
        ("From", '"Alice" <sip:+14155550123@carrier.example>;tag=1'),
        ("To", "<sip:+18005550100@sip.api.openai.com>"),
        ("X-Account", "42"),
    )
    call = IncomingCall.from_sip("rtc_1", hdrs, "srtp", {"call_id": "rtc_1"})
    assert call.call_id == "rtc_1"
    assert call.from_number == "+14155550123"
    assert call.to_number == "+18005550100"
    assert call.sip_headers == hdrs
    assert call.media_security == "srtp"
    assert call.source == "sip"
    assert call.raw == {"call_id": "rtc_1"}


def test_from_sip_header_names_are_case_insensitive() -> None:
    call = IncomingCall.from_sip("rtc_1", headers(("FROM", "sip:+14155550123@x"), ("to", "tel:+18005550100")))
    assert call.from_number == "+14155550123"
    assert call.to_number == "+18005550100"


def test_from_sip_first_value_wins() -> None:
    call = IncomingCall.from_sip(
        "rtc_1",
        headers(
            ("From", "sip:+14155550001@x"),
            ("from", "sip:+14155550002@x"),
            ("To", "sip:+18005550001@x"),
            ("TO", "sip:+18005550002@x"),
        ),
    )
    assert call.from_number == "+14155550001"
    assert call.to_number == "+18005550001"


def test_from_sip_without_from_or_to() -> None:
    call = IncomingCall.from_sip("rtc_1", iter(headers(("Via", "SIP/2.0/TLS x"))))
    assert (call.from_number, call.to_number) == (None, None)
    assert call.raw == {}
    assert call.media_security is None
    assert len(call.sip_headers) == 1  # an iterator is materialised once


def test_header_lookup() -> None:
    call = IncomingCall.from_sip(
        "rtc_1",
        headers(
            ("X-Account", "first"),
            ("x-account", "second"),
            ("Diversion", "<sip:+1@x>"),
        ),
    )
    assert call.header("x-account") == "first"
    assert call.header("X-ACCOUNT") == "first"
    assert call.header("diversion") == "<sip:+1@x>"
    assert call.header("missing") is None


@pytest.mark.parametrize(
    "pairs",
    [
        (("From", '"Anonymous" <sip:Anonymous@anonymous.invalid>;tag=1'),),  # RFC 3261's own form
        (("From", "<sip:anonymous@anonymous.invalid>;tag=1"),),
        (("From", "<sip:restricted@carrier.example>;tag=1"),),
        (("f", "sip:UNAVAILABLE@carrier.example"),),
        (("From", "<tel:anonymous>;tag=1"),),
        (("From", '"Private" <sip:Private@carrier.example>'),),
        (("From", "<sip:unknown@carrier.example>"),),
        (("From", "<sip:Withheld@carrier.example>;tag=1"),),
        (("From", "<sip:10.0.0.1:5060>;tag=1"),),  # an address without a user part
        (("From", "<sip:+14155550123@carrier.example>"), ("Privacy", "id")),
        (("From", "<sip:+14155550123@carrier.example>"), ("privacy", "header; User")),
        (("From", "<sip:+14155550123@carrier.example>"), ("Privacy", "none"), ("Privacy", "id;critical")),
        (("Via", "SIP/2.0/TLS x"),),  # no From at all
        (("From", "garbage"),),  # no number to be read
    ],
)
def test_caller_withheld(pairs: tuple[tuple[str, str], ...]) -> None:
    assert IncomingCall.from_sip("rtc_1", headers(*pairs)).caller_withheld


@pytest.mark.parametrize(
    "pairs",
    [
        (("From", '"Anonymous" <sip:+14155550123@carrier.example>'),),  # only the display name says so
        (("From", "<sip:+14155550123@anonymous.invalid>"), ("Privacy", "none")),
        (("From", "<sip:alice@example.com>"), ("Privacy", "header;session")),
        (("From", "<sip:anonymous.desk@example.com>"),),
    ],
)
def test_caller_not_withheld(pairs: tuple[tuple[str, str], ...]) -> None:
    assert not IncomingCall.from_sip("rtc_1", headers(*pairs)).caller_withheld


async def test_order_desk_example_refuses_withheld_callers() -> None:
    from sideband.examples.order_desk import app

    def call(*pairs: tuple[str, str]) -> IncomingCall:
        return IncomingCall.from_sip("rtc_1", headers(("To", "<sip:+18005550100@x>"), *pairs))

    for withheld in (
        call(("From", '"Anonymous" <sip:Anonymous@anonymous.invalid>;tag=1')),
        call(("From", "<sip:restricted@carrier.example>")),
        call(("From", "<sip:+14155550123@carrier.example>"), ("Privacy", "id")),
    ):
        assert await app.decide(withheld) == Reject(status_code=433)
    assert await app.decide(call(("From", "<sip:+14155550123@carrier.example>"))) == Accept()


def test_context_carries_the_call() -> None:
    hdrs = headers(("From", "sip:+14155550123@x"), ("X-Account", "42"))
    ctx = IncomingCall.from_sip("rtc_1", hdrs).context()
    assert isinstance(ctx, CallContext)
    assert (ctx.call_id, ctx.source, ctx.from_number, ctx.to_number) == ("rtc_1", "sip", "+14155550123", None)
    assert ctx.header("x-account") == "42"
    assert ctx.state == {}


# -- Sideband: config and plan ----------------------------------------------------------------------------


def make_app(**kw: Any) -> Sideband:
    app = Sideband(instructions="You are the order desk.", voice="marin", **kw)

    @app.tool
    async def lookup_order(order_id: str) -> dict[str, Any]:
        """Look up an order.

        Args:
            order_id: The order number.
        """
        return {"order_id": order_id}

    @app.tool(timeout=3)
    def cancel_order(order_id: str, ctx: CallContext) -> str:
        """Cancel an order."""
        return "cancelled"

    return app


def test_constructor_config() -> None:
    app = Sideband(instructions="Be nice.", voice="cedar", model="gpt-realtime-mini", greeting="Say hello.")
    assert app.config.instructions == "Be nice."
    assert app.config.voice == "cedar"
    assert app.config.model == "gpt-realtime-mini"
    assert app.config.greeting == "Say hello."


@pytest.mark.parametrize("option", ["max_tool_calls", "max_identical_calls"])
@pytest.mark.parametrize(
    ("value", "error"),
    [
        (None, TypeError),
        ("64", TypeError),
        (2.5, TypeError),
        (True, TypeError),
        (0, ValueError),
        (-1, ValueError),
    ],
)
def test_a_loop_limit_that_is_no_whole_number_from_1_is_refused(
    option: str, value: object, error: type[Exception]
) -> None:
    """Taken, it would end every call at its first tool call (``internal_error``)."""
    with pytest.raises(error, match=option):
        Sideband(**{option: value})
    assert getattr(Sideband(**{option: 1}), option) == 1


@pytest.mark.parametrize(
    "bad", [{"tool_timeout": True}, {"filler_after": True}, {"tool_timeout": 0}, {"filler_after": -1}]
)
def test_true_is_no_number_of_seconds(bad: dict[str, Any]) -> None:
    (option,) = bad
    with pytest.raises(ValueError, match=rf"^{option} must be"):  # (the name the app was given it by)
        Sideband(**bad)


def test_default_greeting_and_no_greeting() -> None:
    assert Sideband().config.greeting == SessionConfig().greeting
    assert Sideband(greeting=None).config.greeting is None


def test_session_config_used_as_base() -> None:
    base = SessionConfig(instructions="base", turn_detection={"type": "semantic_vad"}, temperature=0.6)  # type: ignore[call-arg]
    app = Sideband(session=base, voice="marin")
    payload = app.plan().session
    assert payload["instructions"] == "base"
    assert payload["audio"]["input"]["turn_detection"] == {"type": "semantic_vad"}
    assert payload["audio"]["output"]["voice"] == "marin"
    assert payload["temperature"] == 0.6


def test_session_config_model_and_greeting_kept() -> None:
    app = Sideband(session=SessionConfig(model="gpt-realtime-mini", greeting="Hola."))
    assert app.config.model == "gpt-realtime-mini"
    assert app.config.greeting == "Hola."


def test_plan_default() -> None:
    app = make_app()
    plan = app.plan()
    assert plan.session["type"] == "realtime"
    assert plan.session["instructions"] == "You are the order desk."
    assert plan.session["audio"]["output"]["voice"] == "marin"
    assert plan.session["tools"] == app.tools.definitions(style="openai")
    assert [t["name"] for t in plan.session["tools"]] == ["lookup_order", "cancel_order"]
    assert all("ctx" not in t["parameters"]["properties"] for t in plan.session["tools"])
    assert plan.tools.names() == ["lookup_order", "cancel_order"]
    assert plan.greeting == app.config.greeting
    assert plan.config == app.config
    validate_accept_payload(plan.session)


def test_plan_with_accept_overrides() -> None:
    app = make_app()
    plan = app.plan(
        Accept(
            instructions="You are billing.",
            voice="cedar",
            greeting="Say billing.",
            session={"temperature": 0.7, "speed": 1.1},
        )
    )
    assert plan.session["instructions"] == "You are billing."
    assert plan.session["audio"]["output"] == {"voice": "cedar", "speed": 1.1}
    assert plan.session["temperature"] == 0.7
    assert plan.greeting == "Say billing."
    assert plan.config.instructions == "You are billing."
    # the app itself is unchanged
    assert app.config.instructions == "You are the order desk."
    assert app.plan().session["audio"]["output"] == {"voice": "marin"}


def test_equal_sessions_in_another_key_order_share_one_plan() -> None:
    """The plan cache is keyed on the session's content, not on the order its keys were written in."""
    app = make_app()
    tracing = {"workflow_name": "desk", "metadata": {"line": "sales", "region": "eu"}}
    audio = {"output": {"speed": 1.1, "voice": "cedar"}, "input": {"noise_reduction": None}}
    one = app.plan(Accept(session={"temperature": 0.7, "tracing": tracing, "audio": audio}))
    reordered = {
        "audio": {"input": {"noise_reduction": None}, "output": {"voice": "cedar", "speed": 1.1}},
        "tracing": {"metadata": {"region": "eu", "line": "sales"}, "workflow_name": "desk"},
        "temperature": 0.7,
    }
    assert app.plan(Accept(session=reordered)) is one
    assert app.plan(Accept(session={**reordered, "temperature": 0.8})) is not one
    assert one.session["tracing"] == tracing
    assert one.session["audio"]["output"] == {"voice": "cedar", "speed": 1.1}
    again = app.plan(Accept(session={"tracing": {"workflow_name": "desk", "metadata": {"z": 1, "a": 2}}}))
    assert list(again.session["tracing"]["metadata"]) == ["z", "a"]  # the order written, not sorted


def test_plan_with_tool_subset() -> None:
    app = make_app()
    plan = app.plan(Accept(tools=("cancel_order",)))
    assert plan.tools.names() == ["cancel_order"]
    assert plan.session["tools"] == app.tools.definitions(["cancel_order"], style="openai")
    assert plan.tools.timeout_for("cancel_order") == 3
    assert app.tools.names() == ["lookup_order", "cancel_order"]


def test_plan_with_no_tools() -> None:
    plan = make_app().plan(Accept(tools=()))
    assert len(plan.tools) == 0
    assert "tools" not in plan.session


def test_plan_with_unknown_tool_name() -> None:
    with pytest.raises(ValueError, match="nope"):
        make_app().plan(Accept(tools=("lookup_order", "nope")))


def test_tool_options_pass_through() -> None:
    app = Sideband(tool_timeout=7, filler_after=None)

    @app.tool(name="renamed", description="Described.")
    async def fn() -> None:
        """Ignored."""

    tool = app.tools.get("renamed")
    assert tool is not None
    assert tool.description == "Described."
    assert app.tools.timeout_for("renamed") == 7
    assert app.tools.filler_after_for("renamed") is None


def test_tool_options_apply_when_the_function_is_passed_directly() -> None:
    app = Sideband()

    async def fn() -> None:
        """Ignored."""

    assert app.tool(fn, name="renamed", description="Described.", timeout=3, filler_after=None) is fn
    tool = app.tools.get("renamed")
    assert tool is not None and app.tools.get("fn") is None
    assert tool.description == "Described."
    assert app.tools.timeout_for("renamed") == 3
    assert app.tools.filler_after_for("renamed") is None


def test_a_tool_option_it_does_not_take_is_a_clear_type_error() -> None:
    app = Sideband()

    async def fn() -> None:
        """Ignored."""

    with pytest.raises(TypeError, match=r"^Sideband\.tool\(\) got an unexpected keyword argument 'filler'$"):
        app.tool(filler=None)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"^Sideband\.tool\(\) got an unexpected keyword argument 'timout'$"):
        app.tool(fn, timout=3)  # type: ignore[call-overload]
    assert app.tools.names() == []


# -- Sideband: routing -------------------------------------------------------------------------------------


CALL = IncomingCall("rtc_1", "+14155550123", "+18005550100")


async def test_decide_default_accept() -> None:
    assert await Sideband().decide(CALL) == Accept()


async def test_decide_sync_hook() -> None:
    app = Sideband()
    seen: list[IncomingCall] = []

    def route(call: IncomingCall) -> Reject:
        seen.append(call)
        return Reject(486)

    assert app.on_incoming(route) is route  # usable as a decorator
    assert await app.decide(CALL) == Reject(486)
    assert seen == [CALL]


async def test_decide_async_hook() -> None:
    app = Sideband()

    @app.on_incoming
    async def route(call: IncomingCall) -> Refer | Accept:
        if call.from_number == "+14155550123":
            return Refer("tel:+14155550999")
        return Accept()

    assert await app.decide(CALL) == Refer("tel:+14155550999")
    assert await app.decide(IncomingCall("rtc_2", None, None)) == Accept()


async def test_a_second_routing_or_browser_hook_is_refused_and_the_first_stays() -> None:
    """A second hook of a kind an app has one of replaced the first unseen (two modules each adding
    theirs, say): it is refused as it is registered."""
    app = Sideband()

    @app.on_incoming
    def front_desk(call: IncomingCall) -> Reject:
        return Reject()

    with pytest.raises(ValueError, match=r"^an app has one on_incoming hook, and .*front_desk is registered"):
        app.on_incoming(lambda call: Accept(voice="cedar"))
    assert await app.decide(CALL) == Reject()

    app.authorize_browser(lambda request: True)
    with pytest.raises(
        ValueError, match=r"^an app has one authorize_browser hook, and .*<lambda> is registered"
    ):
        app.authorize_browser(lambda request: False)
    assert await app.authorize(None) is True  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [None, "accept", 42, {"accept": True}])
async def test_decide_sync_hook_wrong_type(value: object) -> None:
    app = Sideband()
    app.on_incoming(lambda call: value)
    with pytest.raises(TypeError):
        await app.decide(CALL)


@pytest.mark.parametrize("value", [None, "accept", Accept])
async def test_decide_async_hook_wrong_type(value: object) -> None:
    app = Sideband()

    @app.on_incoming
    async def route(call: IncomingCall) -> object:
        return value

    with pytest.raises(TypeError, match="Accept/Reject/Refer"):
        await app.decide(CALL)


async def test_decide_hook_exception_propagates() -> None:
    app = Sideband()

    @app.on_incoming
    async def route(call: IncomingCall) -> Accept:
        raise LookupError("crm down")

    with pytest.raises(LookupError):
        await app.decide(CALL)


# -- Sideband: hooks --------------------------------------------------------------------------------------


def test_call_hooks_registered_in_order() -> None:
    app = Sideband()

    def start(ctx: CallContext) -> None: ...
    def start2(ctx: CallContext) -> None: ...
    def end(ctx: CallContext, summary: Any) -> None: ...
    def transcript(ctx: CallContext, role: str, text: str) -> None: ...
    def dtmf(ctx: CallContext, digit: str) -> None: ...
    def tool(ctx: CallContext, record: Any) -> None: ...

    assert app.on_call_start(start) is start
    app.on_call_start(start2)
    app.on_call_end(end)
    app.on_transcript(transcript)
    app.on_dtmf(dtmf)
    app.on_tool(tool)
    assert app.on_call_start_hooks == [start, start2]
    assert app.on_call_end_hooks == [end]
    assert app.on_transcript_hooks == [transcript]
    assert app.on_dtmf_hooks == [dtmf]
    assert app.on_tool_hooks == [tool]
    assert app.hooks() is not None


def test_a_hook_that_cannot_take_its_arguments_is_refused_as_it_is_registered() -> None:
    app = Sideband()

    def end(ctx: CallContext) -> None: ...

    with pytest.raises(TypeError) as refused:
        app.on_call_end(end)
    assert str(refused.value) == (
        "the on_call_end hook test_a_hook_that_cannot_take_its_arguments_is_refused_as_it_is_registered."
        "<locals>.end(ctx) cannot be called with (ctx, summary): "
        "too many positional arguments"
    )
    assert app.on_call_end_hooks == []


@pytest.mark.parametrize(
    ("register", "expected"),
    [
        ("on_call_start", "(ctx)"),
        ("on_call_end", "(ctx, summary)"),
        ("on_transcript", "(ctx, role, text)"),
        ("on_dtmf", "(ctx, digit)"),
        ("on_tool", "(ctx, record)"),
        ("guardrail", "(ctx, text)"),
        ("on_incoming", "(call)"),
        ("authorize_browser", "(request)"),
    ],
)
def test_every_hook_decorator_checks_the_hooks_parameters(register: str, expected: str) -> None:
    app = Sideband()

    async def too_many(a: Any, b: Any, c: Any, d: Any) -> None: ...

    def keyword_only(*, ctx: Any) -> None: ...

    for hook in (too_many, keyword_only):
        with pytest.raises(
            TypeError, match=rf"the {register} hook .* cannot be called with {re.escape(expected)}"
        ):
            getattr(app, register)(hook)
    with pytest.raises(TypeError, match=f"{register} takes a function, not int"):
        getattr(app, register)(5)
    hooks = app.hooks()
    registered = (hooks.on_call_start, hooks.on_call_end, hooks.on_transcript, hooks.on_dtmf, hooks.on_tool)
    assert registered == ([], [], [], [], []) and hooks.guardrails == []
    assert not app.routes_calls and not app.browsers_allowed


class Desk:
    def end(self, ctx: CallContext, summary: Any) -> None: ...

    def end_late(self, ctx: CallContext) -> None: ...

    async def __call__(self, ctx: CallContext, summary: Any) -> None: ...


def test_hooks_of_every_form_that_can_take_their_arguments_are_registered() -> None:
    app = Sideband()
    desk = Desk()

    def sync(ctx: CallContext, summary: Any) -> None: ...
    async def asynchronous(ctx: CallContext, summary: Any) -> None: ...
    def defaulted(ctx: CallContext, summary: Any, extra: int = 0, *, flag: bool = False) -> None: ...
    def anything(*args: Any) -> None: ...
    def tagged(tag: str, ctx: CallContext, summary: Any) -> None: ...
    async def keyed(ctx: CallContext, summary: Any, tag: str) -> None: ...
    async def filed(ctx: CallContext, summary: Any, db: str) -> None: ...

    def with_db(fn: Callable[[CallContext, Any, str], Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        @functools.wraps(fn)  # (its signature reads as fn's: the wrapper's own is what is called)
        async def wrapper(ctx: CallContext, summary: Any) -> None:
            await fn(ctx, summary, "db")

        return wrapper

    hooks = [
        sync,
        asynchronous,
        defaulted,
        anything,
        lambda ctx, summary: None,
        desk.end,
        desk,
        functools.partial(tagged, "billing"),
        functools.partial(keyed, tag="billing"),
        with_db(filed),
    ]
    for hook in hooks:
        assert app.on_call_end(hook) is hook
    assert app.on_call_end_hooks == hooks
    with pytest.raises(
        TypeError, match=r"the on_call_end hook Desk\.end_late\(ctx\) cannot be called with \(ctx, summary\)"
    ):
        app.on_call_end(desk.end_late)
    with pytest.raises(
        TypeError,
        match=r"hook functools\.partial\(.*<locals>\.tagged\)\(summary\) cannot be called with \(ctx, summ",
    ):
        app.on_call_end(functools.partial(tagged, "billing", CallContext("c1")))


def test_the_summarys_types_name_every_end_reason_and_tool_outcome_the_metrics_count() -> None:
    assert typing.get_args(EndReason) == END_REASONS
    assert sorted(typing.get_args(ToolOutcome)) == sorted(TOOL_OUTCOMES)


# -- Sideband: built-in tools ------------------------------------------------------------------------------

TARGETS = {
    "sales": "tel:+14155550100",
    "support": "sip:support@example.com",
    "secure": "sips:desk@example.com",
}


def test_enable_transfer_schema() -> None:
    app = Sideband(transfer_targets=TARGETS)
    app.enable_transfer()
    tool = app.tools.get("transfer_call")
    assert tool is not None
    params = tool.parameters
    assert set(params["properties"]) == {"destination"}
    assert params["properties"]["destination"]["enum"] == ["sales", "support", "secure"]
    assert params["required"] == ["destination"]
    definition = app.tools.definitions(style="openai")[0]
    for uri in TARGETS.values():  # the model sees labels only, never the URIs
        assert uri not in repr(definition)
    assert definition["description"]


def test_enable_transfer_custom_name() -> None:
    app = Sideband(transfer_targets={"human": "tel:+14155550100"})
    app.enable_transfer(name="hand_off")
    assert app.tools.names() == ["hand_off"]


@pytest.mark.parametrize("uri", ["+14155550100", "http://example.com", "mailto:x@example.com", ""])
def test_bad_transfer_target_uri(uri: str) -> None:
    with pytest.raises(ValueError, match="bad"):
        Sideband(transfer_targets={"bad": uri})


async def test_transfer_tool_runs_through_context() -> None:
    app = Sideband(transfer_targets=TARGETS)
    app.enable_transfer()
    transfers: list[str] = []

    class Actions:
        def hangup(self, reason: str = "hangup") -> None: ...
        def transfer(self, target: str) -> None:
            transfers.append(target)

        def say(self, instructions: str) -> None: ...
        def update_session(self, **fields: Any) -> None: ...

    ctx = CallContext("rtc_1", actions=Actions())
    ok = await app.tools.execute("c1", "transfer_call", '{"destination": "sales"}', ctx)
    assert ok.ok
    assert transfers == ["sales"]
    bad = await app.tools.execute("c2", "transfer_call", '{"destination": "tel:+19005550000"}', ctx)
    assert bad.outcome == "invalid_arguments"
    assert transfers == ["sales"]


def test_enable_end_call() -> None:
    app = Sideband()
    app.enable_end_call()
    tool = app.tools.get("end_call")
    assert tool is not None
    assert tool.parameters["properties"] == {}
    assert not tool.parameters.get("required")
    assert tool.context_param is not None
    assert app.tools.filler_after_for("end_call") is None
    assert app.plan().session["tools"][0]["name"] == "end_call"


async def test_end_call_tool_hangs_up() -> None:
    app = Sideband()
    app.enable_end_call(name="hang_up")
    reasons: list[str] = []

    class Actions:
        def hangup(self, reason: str = "hangup") -> None:
            reasons.append(reason)

        def transfer(self, target: str) -> None: ...
        def say(self, instructions: str) -> None: ...
        def update_session(self, **fields: Any) -> None: ...

    result = await app.tools.execute("c1", "hang_up", "", CallContext("rtc_1", actions=Actions()))
    assert result.ok
    assert reasons == ["end_call_tool"]


def test_a_session_given_as_a_dict_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match=r"session must be a SessionConfig .* not dict"):
        Sideband(session={"voice": "marin"})  # type: ignore[arg-type]
    assert Sideband(session=SessionConfig.model_validate({"voice": "marin"})).config.voice == "marin"


@pytest.mark.parametrize(
    "reply",
    [
        "I can promise you a full refund today.",
        "I promise you a full refund.",
        "We GUARANTEE a\nrefund.",
        "We guarantee a refund.",
        "Don't worry, we'll guarantee your refund.",
        "Your order is late. I will personally guarantee that you get a refund.",
    ],
)
def test_order_desk_example_stops_a_promised_refund(reply: str) -> None:
    from sideband.examples.order_desk import app, no_refund_promises

    assert app.guardrails == [no_refund_promises]
    assert no_refund_promises(CallContext("rtc_1"), reply)


@pytest.mark.parametrize(
    "reply",
    [
        "Your order ships Thursday. Refunds are handled by billing.",
        "I promise to check.",
        "I can't promise a refund, but I can transfer you to billing, who decide refunds.",
        "I cannot guarantee a refund, but billing can look at it.",
        "I can not promise a refund. We don't guarantee refunds on the phone.",
        "We won't promise a refund; I will never guarantee refunds.",
        "Your order is guaranteed to arrive Thursday. For refunds, I can transfer you to billing.",
        "I promise you won't lose anything: a refund is for billing to decide.",
    ],
)
def test_order_desk_example_lets_a_reply_that_promises_no_refund_pass(reply: str) -> None:
    """The rule is to promise no refund: a reply that says so, or promises something else in a sentence
    of its own, keeps to it."""
    from sideband.examples.order_desk import no_refund_promises

    assert no_refund_promises(CallContext("rtc_1"), reply) is None


def test_a_config_replaced_is_planned_from_even_where_it_takes_the_old_ones_place_in_memory() -> None:
    """Plans are cached per config: one replaced (``app.config = …``), even by an object that takes the
    freed old one's address, is planned from afresh, never given the old one's plan."""
    app = Sideband(instructions="First.")
    base = app.config
    for n in range(20):
        app.config = base.model_copy(update={"instructions": f"Desk {n}."})
        assert app.plan().session["instructions"] == f"Desk {n}."
        app.config = base  # (the copy freed: the next one may take its place)
        assert app.plan().session["instructions"] == "First."
