"""The static route table (TOML) and per-route overrides and limits, end to end."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sideband import Accept, IncomingCall, Refer, Reject
from sideband.routing import RouteError, RouteTable
from sideband.testing import Script, caller_says, model_says, wait_for_greeting

from .conftest import Stack

ROUTES = """
[default]
instructions = "Front desk."

[routes."+18005551212"]
instructions = "Billing desk."
voice = "cedar"
tools = ["lookup_order"]
max_idle_seconds = 0.3

[routes."+1 800 555 0000"]
reject = 486

[routes."+18005559999"]
refer = "tel:+14155550123"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "routes.toml"
    path.write_text(text)
    return path


def test_table_matches_numbers_and_default(tmp_path: Path) -> None:
    table = RouteTable.load(write(tmp_path, ROUTES), ["lookup_order", "end_call"])
    billing = table.match("+18005551212")
    assert isinstance(billing, Accept)
    assert (billing.instructions, billing.voice, billing.tools, billing.max_idle_duration) == (
        "Billing desk.",
        "cedar",
        ("lookup_order",),
        0.3,
    )
    assert table.match("+18005550000") == Reject(486)  # visual separators normalised
    assert table.match("+18005559999") == Refer("tel:+14155550123")
    default = table.match("+19999999999")
    assert isinstance(default, Accept) and default.instructions == "Front desk."
    assert table.match(None) == default


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('[routes."+1"]\ntools = ["nope"]\n', "unknown tool nope"),
        ('[routes."+1"]\nreject = 200\n', "reject"),
        ('[routes."+1"]\nreject = 486\nrefer = "tel:+1"\n', "not both"),
        ('[routes."+1"]\nrefer = "http://x"\n', "tel: or sip:"),
        ('[routes."+1"]\ncolour = "red"\n', "colour"),
        ("[routes\n", "routes.toml"),
    ],
)
def test_invalid_files_are_one_line_errors(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(RouteError) as info:
        RouteTable.load(write(tmp_path, text), ["lookup_order"])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_missing_file_is_refused_at_start(tmp_path: Path) -> None:
    env = {
        "OPENAI_API_KEY": "sk-x",
        "OPENAI_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "SIDEBAND_ROUTES_FILE": str(tmp_path / "missing.toml"),
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "sideband.cli", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "SIDEBAND_ROUTES_FILE" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture
def settings_overrides(tmp_path: Path) -> dict[str, Any]:
    return {"routes_file": write(tmp_path, ROUTES)}


async def test_route_file_drives_decisions_overrides_and_limits(stack: Stack) -> None:
    rejected = stack.sim.create_call(Script([]), to_number="+18005550000")
    referred = stack.sim.create_call(Script([]), to_number="+18005559999")
    billing = stack.sim.create_call(Script([wait_for_greeting("Billing.")]), to_number="+18005551212")
    for call in (rejected, referred, billing):
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    assert rejected.status == "rejected" and rejected.reject_body == {"status_code": 486}
    assert referred.status == "referred"
    assert billing.accept_body["instructions"] == "Billing desk."
    assert billing.accept_body["audio"]["output"]["voice"] == "cedar"
    assert [t["name"] for t in billing.accept_body["tools"]] == ["lookup_order"]
    # The route's idle limit (0.3 s): goodbye, then hangup.
    await billing.wait_ended(timeout=5)
    assert billing.end_reason == "hangup_verb"
    goodbye = [e for e in billing.received if e["type"] == "response.create"][-1]
    assert "goodbye" in goodbye["response"]["instructions"]


async def test_hook_sees_the_route_and_can_override_it(stack: Stack) -> None:
    seen: list[Any] = []

    @stack.app.on_incoming
    def route(call: IncomingCall) -> Accept | Reject | Refer:
        seen.append(call.route)
        return (
            Accept(instructions="Overridden.")
            if call.from_number == "+15550001111"
            else call.route or Accept()
        )

    call = stack.sim.create_call(
        Script([wait_for_greeting("Hi"), caller_says("x"), model_says("y")]),
        to_number="+18005550000",
        from_number="+15550001111",
    )
    assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    assert seen == [Reject(486)]
    assert call.status == "accepted" and call.accept_body["instructions"] == "Overridden."
    await asyncio.wait_for(call.wait_done(), 5)
