"""Collecting what a caller keys on the keypad from a tool: ``await ctx.collect_digits(…)``."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sideband import CallContext, Sideband
from sideband.testing import (
    Script,
    caller_hangs_up,
    caller_presses,
    caller_says,
    model_answers,
    model_calls,
    run_app,
    wait_for_greeting,
)

from .conftest import capture_logs


def keypad_app(**collect: Any) -> tuple[Sideband, list[str]]:
    """An app whose ``read_account`` tool collects keys with ``collect``; also returns the keys its
    ``on_dtmf`` hook saw."""
    app = Sideband(instructions="You are the bank.", greeting="Greet the caller.")
    hooked: list[str] = []

    @app.tool(timeout=10, filler_after=None)
    async def read_account(ctx: CallContext) -> dict[str, str]:
        """Read the account number the caller keys in."""
        return {"keyed": await ctx.collect_digits(**collect)}

    @app.on_dtmf
    def seen(ctx: CallContext, digit: str) -> None:
        hooked.append(digit)

    return app, hooked


async def keyed(app: Sideband, *steps: Any) -> tuple[str, Any]:
    """Run a call where the model asks for the account number and the caller does ``steps``; returns
    what the tool collected and the call's summary."""
    async with run_app(app) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Hello."),
                    caller_says("My balance, please."),
                    model_calls(
                        "read_account", {}, preamble="Key in your account number.", await_outputs=False
                    ),
                    *steps,
                    model_answers("Thank you."),
                    caller_hangs_up(),
                ]
            )
        )
        summary = await h.ended(call)
    output = next(
        e["item"]["output"]
        for e in call.received
        if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output"
    )
    return json.loads(output)["keyed"], summary


@pytest.mark.parametrize(
    ("collect", "pressed", "expected", "ended_by"),
    [
        ({}, "4711#", "4711", "end_key"),  # the end key finishes the entry and is left out
        ({"max_digits": 4}, "123456", "1234", "max_digits"),
        ({"end": None, "max_digits": 3}, "#*1", "#*1", "max_digits"),  # no end key: every key counts
        ({"end": "*#"}, "98*", "98", "end_key"),
    ],
)
async def test_keys_are_collected_until_the_end_key_or_the_count(
    collect: dict[str, Any], pressed: str, expected: str, ended_by: str
) -> None:
    app, hooked = keypad_app(**collect)
    with capture_logs() as logs:
        got, summary = await keyed(app, caller_presses(pressed))
    assert got == expected
    assert summary.dtmf == pressed and "".join(hooked) == pressed  # the hooks see every key all the same
    assert [(e["keys"], e["ended_by"]) for e in logs if e["event"] == "dtmf.collected"] == [
        (len(expected), ended_by)
    ]


async def test_a_caller_who_stops_keying_gets_what_was_keyed_after_the_timeout() -> None:
    app, _ = keypad_app(timeout=0.3)
    with capture_logs() as logs:
        got, summary = await keyed(app, caller_presses("12"))  # (then nothing)
    assert got == "12"
    assert [e["ended_by"] for e in logs if e["event"] == "dtmf.collected"] == ["timeout"]
    assert [(t.name, t.outcome) for t in summary.tools] == [("read_account", "ok")]


async def test_keys_pressed_before_the_collection_are_not_collected() -> None:
    app = Sideband(instructions="You are the bank.", greeting="Greet the caller.")

    @app.tool(timeout=10, filler_after=None)
    async def read_account(ctx: CallContext) -> str:
        """Read the account number."""
        return await ctx.collect_digits(timeout=0.3)

    async with run_app(app) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Hello."),
                    caller_presses("99"),  # before the model asked
                    caller_says("My balance."),
                    model_calls("read_account", {}, await_outputs=False),
                    caller_presses("7#"),
                    model_answers("Thanks."),
                    caller_hangs_up(),
                ]
            )
        )
        await h.ended(call)
    assert call.output_for(call.responses[1].call_ids[0]) == "7"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"max_digits": 0}, "max_digits"),
        ({"max_digits": 2.0}, "max_digits"),
        ({"end": "x"}, "end must be keypad keys"),
        ({"end": ""}, "end must be keypad keys"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
    ],
)
async def test_bad_arguments_are_refused_before_anything_waits(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        await CallContext("call_1").collect_digits(**kw)


async def test_without_a_live_call_there_is_nothing_to_collect() -> None:
    with pytest.raises(RuntimeError, match="no live call"):
        await CallContext("call_1").collect_digits(4)
