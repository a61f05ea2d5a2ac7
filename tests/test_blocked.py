"""The route file's ``[blocked]`` callers: refused before any route, hook or capacity check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sideband import Accept, IncomingCall, Reject
from sideband.context import SipHeader
from sideband.routing import RouteError, RouteTable
from sideband.testing import Script, Simulator, caller_hangs_up, pause, run_app, wait_for_greeting

from .conftest import TEST_SETTINGS, Stack, capture_logs, make_app
from .test_route_reload import metrics
from .test_routing import write

BLOCKING = """
[blocked]
numbers = ["+1 555 123 4567", "tel:+15550001111", "sip:+15550002222@trunk.example.com", "15559998888"]

[routes."+18005550000"]
reject = 486
"""


def caller(number: str | None, *headers: tuple[str, str]) -> IncomingCall:
    return IncomingCall("rtc_x", number, "+18005551212", tuple(SipHeader(n, v) for n, v in headers))


def test_numbers_match_as_dialed_numbers_do(tmp_path: Path) -> None:
    table = RouteTable.load(write(tmp_path, BLOCKING), [])
    assert table.blocked == {"+15551234567", "+15550001111", "+15550002222", "15559998888"}
    # E.164 and digits only match each other both ways (a trunk may send either).
    for number in ("+15551234567", "15551234567", "+15550002222", "15559998888", "+15559998888"):
        assert table.blocks(caller(number)) == Reject(603), number
    # Not listed; a withheld number is let through unless the section says otherwise.
    for number in ("+15551234568", "5551234567", "+5551234567", None, "anonymous"):
        assert table.blocks(caller(number)) is None, number
    assert table.blocks(caller("+14155550100", ("Privacy", "id"))) is None


def test_withheld_callers_and_the_status(tmp_path: Path) -> None:
    table = RouteTable.load(write(tmp_path, "[blocked]\nwithheld = true\nstatus = 486\n"), [])
    assert table.blocked == frozenset() and table.block_withheld
    for withheld in (caller(None), caller("Anonymous"), caller("+14155550100", ("Privacy", "user; id"))):
        assert table.blocks(withheld) == Reject(486)
    assert table.blocks(caller("+14155550100")) is None


def test_without_the_section_nobody_is_blocked(tmp_path: Path) -> None:
    for text in ('[routes."+18005550000"]\nreject = 486\n', "[blocked]\nnumbers = []\n"):
        table = RouteTable.load(write(tmp_path, text), [])
        assert table.blocks(caller(None)) is None and table.blocks(caller("+15551234567")) is None


@pytest.mark.parametrize(
    "text, fragment",
    [
        (
            '[blocked]\nnumbers = ["+15551234567;ext=2"]\n',
            "blocked.numbers: +15551234567;ext=2: a key cannot",
        ),
        ('[blocked]\nnumbers = ["<sip:x>"]\n', "blocked.numbers: <sip:x>: not an E.164 number"),
        ("[blocked]\nstatus = 200\n", "blocked.status: Input should be greater than or equal to 400"),
        ('[blocked]\nnumber = ["+15551234567"]\n', "blocked.number: Extra inputs are not permitted"),
        ('[blocked]\nnumbers = "+15551234567"\n', "blocked.numbers: Input should be a valid list"),
        # values of the wrong type are refused, not converted
        ("[blocked]\nwithheld = 1\n", "blocked.withheld: Input should be a valid boolean"),
        ('[blocked]\nwithheld = "false"\n', "blocked.withheld: Input should be a valid boolean"),
        ('[blocked]\nstatus = "486"\n', "blocked.status: Input should be a valid integer"),
        ("[blocked]\nnumbers = [14155550199]\n", "blocked.numbers.0: Input should be a valid string"),
    ],
)
def test_a_bad_section_is_a_one_line_error(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(RouteError) as info:
        RouteTable.load(path, [])
    message = str(info.value)
    assert message.startswith(f"{path}: ") and fragment in message and "\n" not in message, message


@pytest.fixture
def settings_overrides(tmp_path: Path) -> dict[str, Any]:
    return {"routes_file": write(tmp_path, BLOCKING)}


async def test_a_blocked_caller_is_refused_before_the_hook_and_others_are_not(
    stack: Stack, tmp_path: Path
) -> None:
    asked: list[str | None] = []

    @stack.app.on_incoming
    def route(call: IncomingCall) -> Accept | Reject:
        asked.append(call.from_number)
        return Accept()

    blocked = stack.sim.create_call(Script([]), from_number="+15550001111")
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(blocked))).status == 200
    assert blocked.status == "rejected" and blocked.reject_body == {"status_code": 603}
    assert asked == []
    [line] = [e for e in logs if e["event"] == "call.blocked"]
    assert line["status_code"] == 603 and line["withheld"] is False
    [decided] = [e for e in logs if e["event"] == "call.decided"]
    assert decided["decision"] == "reject" and decided["status_code"] == 603
    # Another caller goes through the hook as before (the dialed number's route is the hook's to use).
    other = stack.sim.create_call(
        Script([wait_for_greeting("Hi"), caller_hangs_up()]), from_number="+15550003333"
    )
    assert (await stack.sender.deliver(stack.sim.incoming_event(other))).status == 200
    assert other.status == "accepted" and asked == ["+15550003333"]
    await stack.ended(other)
    # Added to the file and reloaded: blocked from the next call on.
    write(tmp_path, BLOCKING.replace('"15559998888"]', '"15559998888", "+15550003333"]'))
    assert await stack.service.reload_routes() is True
    again = stack.sim.create_call(Script([]), from_number="+15550003333")
    assert (await stack.sender.deliver(stack.sim.incoming_event(again))).status == 200
    assert again.status == "rejected" and asked == ["+15550003333"]
    counts = await metrics(stack, "sideband_events_total")
    assert counts["sideband_events_total[blocked]"] == 2 and counts["sideband_events_total[rejected]"] == 2


async def test_a_blocked_caller_is_refused_as_blocked_even_when_the_instance_is_full(
    simulator: Simulator, tmp_path: Path
) -> None:
    settings = {**TEST_SETTINGS, "routes_file": write(tmp_path, BLOCKING), "max_calls": 1}
    async with run_app(make_app(), simulator, **settings) as h:
        live = h.sim.create_call(Script([wait_for_greeting("Hi"), pause(5)]))
        assert (await h.sender.deliver(h.sim.incoming_event(live))).status == 200
        assert live.status == "accepted"
        blocked = h.sim.create_call(Script([]), from_number="+15551234567")
        assert (await h.sender.deliver(h.sim.incoming_event(blocked))).status == 200
        assert blocked.reject_body == {"status_code": 603}
        counts = await metrics(h, "sideband_events_total")
        assert (
            counts.get("sideband_events_total[blocked]") == 1
            and counts.get("sideband_events_total[busy]") == 0
        )
        await h.sim.hang_up(live)
