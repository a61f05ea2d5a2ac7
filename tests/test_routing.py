"""The static route table (TOML) and per-route overrides and limits, end to end."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sideband import Accept, CallContext, IncomingCall, Refer, Reject, Sideband
from sideband import service as service_module
from sideband.context import SipHeader
from sideband.routing import RouteError, RouteTable
from sideband.session import SessionConfig, SessionConfigError
from sideband.testing import (
    Script,
    Simulator,
    caller_hangs_up,
    caller_says,
    model_calls,
    model_says,
    wait_for_greeting,
)

from .conftest import Stack, capture_logs, make_app, settings_for

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
        ('[routes."+1"]\nreject = 399\n', "routes.+1.reject: Input should be"),
        ('[routes."+1"]\nreject = 700\n', "routes.+1.reject: Input should be"),
        ('[routes."+1"]\nreject = 486\nrefer = "tel:+1"\n', "not both"),
        ('[routes."+1"]\nrefer = "http://x"\n', "tel: or sip:"),
        (
            '[routes."+1"]\nrefer = "tel:"\n',
            "routes.+1: Value error, refer must be a tel: or sip: URI with a number",
        ),
        ('[routes."+1"]\nrefer = "sip: "\n', "refer must be a tel: or sip: URI with a number or address"),
        ('[routes."+1"]\nrefer = "tel:+"\n', "refer must be a tel: or sip: URI with a number or address"),
        ('[routes."+1"]\nrefer = "sip:@pbx.example.com"\n', "refer must be a tel: or sip: URI with a number"),
        (
            '[routes."+1"]\ntransfer_targets = { billing = "tel:+" }\n',
            "'billing' must be a tel: or sip: URI with",
        ),
        (
            '[routes."+1"]\ntransfer_targets = { billing = "tel:" }\n',
            "'billing' must be a tel: or sip: URI with",
        ),
        ('[routes."+1"]\ncolour = "red"\n', "colour"),
        (
            '[routes."+1"]\nsession = { voice = "cedar" }\n',
            "routes.+1.session: Value error, voice is a route",
        ),
        ('[routes."+1"]\nsession = { instructions = "x" }\n', "instructions is a route field"),
        (
            '[routes."+18005551212"]\nreject = 486\n[routes."+1 800 555 1212"]\nreject = 404\n',
            "routes.+1 800 555 1212: the same number as routes.+18005551212",
        ),
        ("[routes\n", "routes.toml"),
        ('[routes."+1"]\nreject = 486\ninstructions = "x"\n', "rejects answers nothing: instructions"),
        ('[routes."+1"]\nrefer = "tel:+1"\nmax_call_seconds = 60\n', "refers answers nothing: max_call"),
        ('[routes."+1"]\nmax_call_seconds = inf\n', "routes.+1.max_call_seconds"),
        ('[routes."+1"]\nmax_idle_seconds = nan\n', "routes.+1.max_idle_seconds"),
        # values of the wrong type are refused, not converted (true is no 1-second limit)
        (
            '[routes."+1"]\nmax_call_seconds = true\n',
            "routes.+1.max_call_seconds: Input should be a valid number",
        ),
        (
            '[routes."+1"]\nmax_idle_seconds = "60"\n',
            "routes.+1.max_idle_seconds: Input should be a valid number",
        ),
        ('[routes."+1"]\nreject = "486"\n', "routes.+1.reject: Input should be a valid integer"),
        ('[routes."+1"]\nreject = 486.0\n', "routes.+1.reject: Input should be a valid integer"),
        ('[routes."+1"]\ntools = [1]\n', "routes.+1.tools.0: Input should be a valid string"),
        ("[default]\nvoice = 1\n", "default.voice: Input should be a valid string"),
        ("[default]\nsession = { x = " + "[" * 3000 + "]" * 3000 + " }\n", "nested too deeply"),
    ],
)
def test_invalid_files_are_one_line_errors(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(RouteError) as info:
        RouteTable.load(write(tmp_path, text), ["lookup_order"])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_whole_numbers_are_seconds_and_decisions_take_them_as_the_file_does(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[routes."+1"]\nmax_call_seconds = 900\nmax_idle_seconds = 0.5\nsession = { speed = 1 }\n'
    )
    table = RouteTable.load(path)
    route = table.match("+1")
    assert isinstance(route, Accept)
    assert (route.max_call_duration, route.max_idle_duration) == (900.0, 0.5)
    table.check(make_app())
    assert make_app().plan(route).session["audio"]["output"]["speed"] == 1.0


def test_a_route_without_tools_offers_every_tool_and_one_with_an_empty_list_none() -> None:
    app = make_app()
    table = RouteTable.from_dict(
        {"routes": {"+18005551212": {"instructions": "Billing desk."}, "+18005550000": {"tools": []}}},
        app.tools.names(),
    )
    every, none = table.match("+18005551212"), table.match("+18005550000")
    assert isinstance(every, Accept) and every.tools is None
    assert app.plan(every).tools.names() == app.tools.names()
    assert isinstance(none, Accept) and none.tools == ()
    assert list(app.plan(none).tools.names()) == []


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


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_decision_the_hook_returns_unawaited_is_awaited(stack: Stack, kind: str) -> None:
    """An ``await`` left out in the hook (``return lookup(call)``, ``lookup`` a coroutine function): the
    decision it returns is awaited, not refused as no decision (and left never awaited)."""

    async def lookup(call: IncomingCall) -> Accept:
        await asyncio.sleep(0)
        return Accept(instructions="Looked up.")

    if kind == "async":

        @stack.app.on_incoming
        async def route(call: IncomingCall) -> Any:
            return lookup(call)

    else:

        @stack.app.on_incoming
        def route(call: IncomingCall) -> Any:
            return lookup(call)

    call = stack.sim.create_call(Script([]))
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    assert call.status == "accepted" and call.accept_body["instructions"] == "Looked up."
    assert not [e for e in logs if e["event"] == "call.route_failed"]


async def test_a_hooks_accept_is_layered_over_the_route(stack: Stack) -> None:
    @stack.app.on_incoming
    def route(call: IncomingCall) -> Accept:
        if not call.dialed("1 (800) 555-1212"):  # the trunk's digits match the route's E.164 either way
            return Accept()
        return Accept(voice="marin", session={"max_output_tokens": 200, "greeting": "Billing, hello."})

    call = stack.sim.create_call(Script([wait_for_greeting("Billing.")]), to_number="18005551212")
    assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    body = call.accept_body
    assert body["instructions"] == "Billing desk."  # the route's, left out by the hook
    assert [t["name"] for t in body["tools"]] == ["lookup_order"]
    assert body["audio"]["output"]["voice"] == "marin"  # the hook's
    assert body["max_output_tokens"] == 200
    await call.wait_ended(timeout=5)  # the route's idle limit (0.3 s) holds too
    assert call.end_reason == "hangup_verb"
    greeting = next(e for e in call.received if e["type"] == "response.create")
    assert greeting["response"]["instructions"] == "Billing, hello."


def test_accept_takes_its_own_fields_from_session_once() -> None:
    accept = Accept(session={"voice": "cedar", "greeting": None, "max_output_tokens": 9})
    assert (accept.voice, accept.greeting, accept.session) == ("cedar", None, {"max_output_tokens": 9})
    assert make_app().plan(accept).config.voice == "cedar"
    with pytest.raises(ValueError, match="voice is given twice"):
        Accept(voice="marin", session={"voice": "cedar"})
    route = Accept(instructions="Billing.", tools=["a"], session={"x": 1}, state={"k": 1})
    mine = Accept(tools=["b"], session={"y": 2}, state={"k": 2})
    assert mine.over(route) == Accept(
        instructions="Billing.", tools=("b",), session={"x": 1, "y": 2}, state={"k": 2}
    )


def test_a_routes_custom_voice_in_openais_shape_keeps_the_rest_of_the_apps_audio(tmp_path: Path) -> None:
    app = Sideband(
        instructions="Desk.", voice="marin", session=SessionConfig(turn_detection={"type": "semantic_vad"})
    )
    path = write(
        tmp_path,
        '[routes."+18005551212"]\nsession = { audio = { output = { voice = { id = "voice_1234" } } } }\n',
    )
    table = RouteTable.load(path, app.tools.names())
    table.check(app)
    route = table.match("+18005551212")
    assert isinstance(route, Accept)
    assert app.plan(route).session["audio"] == {
        "input": {
            "transcription": {"model": "gpt-4o-mini-transcribe"},
            "turn_detection": {"type": "semantic_vad"},
        },
        "output": {"voice": {"id": "voice_1234"}},
    }


def test_an_accept_turns_caller_transcription_off_for_its_call() -> None:
    app = make_app()
    route = Accept(instructions="Billing.", session={"max_output_tokens": 400})
    off = Accept(session={"transcription_model": None}).over(route)
    session = app.plan(off).session
    assert "transcription" not in session.get("audio", {}).get("input", {}), session
    assert (session["instructions"], session["max_output_tokens"]) == ("Billing.", 400)
    assert app.plan(route).session["audio"]["input"]["transcription"] == {"model": "gpt-4o-mini-transcribe"}


# -- checked against the app at start (a bad file stops the process, not every call) -------------------

SIP_REFUSED = [
    (
        'session = { audio = { input = { format = { type = "audio/pcm", rate = 24000 } } } }',
        "audio.input.format",
    ),
    ('session = { turn_detection = { type = "server_vad", threshold = 0.5 } }', "turn_detection.threshold"),
    ('session = { type = "transcription" }', '"type": "realtime"'),
    ("session = { speed = -1 }", "session.speed: Input should be greater than 0"),
    # a typo the calls API refuses (unknown_parameter) at every call to the number
    ("session = { max_output_token = 400 }", "'max_output_token' (did you mean 'max_output_tokens'?)"),
    # a value of the wrong type is refused, not converted (true is no 1-token limit)
    ("session = { max_output_tokens = true }", "session.max_output_tokens"),
    ('session = { speed = "1.2" }', "session.speed: Input should be a valid number"),
    # values the calls API refuses at every call to the number
    (
        'session = { output_modalities = ["audio", "text"] }',
        'output_modalities must be ["audio"] or ["text"]',
    ),
    ('session = { turn_detection = { type = "semantic_vad", eagerness = "normal" } }', "eagerness must be"),
    ("session = { turn_detection = { create_response = false } }", 'turn_detection needs a "type"'),
    ('session = { turn_detection = { type = "server_vad", idle_timeout_ms = 0 } }', "idle_timeout_ms"),
    ('session = { noise_reduction = { type = "nearfield" } }', "noise_reduction must be"),
    (
        'session = { audio = { input = { transcription = { language = "en" } } } }',
        'transcription needs a "model"',
    ),
    # a built-in voice misspelt: OpenAI refuses every call to the number
    ('voice = "marine"', "unknown voice 'marine' (did you mean 'marin'?)"),
    (
        'session = { audio = { output = { voice = "Cedar" } } }',
        "unknown voice 'Cedar' (did you mean 'cedar'?)",
    ),
    # no tools to force: the session would go out forcing a tool it does not offer
    (
        'tools = []\nsession = { tool_choice = { type = "function", name = "lookup_order" } }',
        "tool_choice names the tool 'lookup_order', which the session does not offer",
    ),
]


@pytest.mark.parametrize("section", ["default", 'routes."+1 800 555 1212"'])
@pytest.mark.parametrize("line, fragment", SIP_REFUSED)
def test_check_refuses_route_sessions_a_sip_accept_would_refuse(
    tmp_path: Path, section: str, line: str, fragment: str
) -> None:
    path = write(tmp_path, f'[{section}]\ninstructions = "Billing."\n{line}\n')
    table = RouteTable.load(path, ["lookup_order"])  # the file alone is well-formed
    with pytest.raises(RouteError) as info:
        table.check(make_app())
    message = str(info.value)
    where = "default" if section == "default" else "routes.+1 800 555 1212"  # the key as written
    assert message.startswith(f"{path}: {where}: ") and fragment in message, message
    assert "\n" not in message and "app's own" not in message


def test_check_passes_a_good_table_and_skips_reject_and_refer(tmp_path: Path) -> None:
    app = make_app()
    RouteTable.load(write(tmp_path, ROUTES), app.tools.names()).check(app)
    # Reject/refer routes answer nothing, so their (unused) fields are not planned.
    RouteTable({"+1": Reject(486), "+2": Refer("tel:+1")}).check(Sideband(session=SessionConfig(type="x")))


def test_check_says_when_the_app_config_is_the_cause() -> None:
    app = Sideband(session=SessionConfig(turn_detection={"type": "server_vad", "silence_duration_ms": 500}))
    with pytest.raises(RouteError) as info:
        RouteTable.from_dict({"routes": {"+18005551212": {"voice": "cedar"}}}).check(app)
    assert str(info.value) == (
        "routes: routes.+18005551212: audio.input.turn_detection.silence_duration_ms is refused by the "
        "calls API (in the app's own session config)"
    )


def test_a_route_file_that_is_not_utf8_is_a_route_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_bytes(b'[default]\nvoice = "\xff\xfe"\n')
    with pytest.raises(RouteError, match=r"routes\.toml: not UTF-8 \(at line 2, column 10, byte 19\)$"):
        RouteTable.load(path)
    path.write_bytes(b'[default]\ninstructions = "caf\xe9"\n')  # (Latin-1)
    with pytest.raises(RouteError, match=r"not UTF-8 \(at line 2, column 20, byte 29\)$"):
        RouteTable.load(path)


def test_a_route_file_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Some editors (Notepad) start a UTF-8 file with a byte order mark: it is no part of the TOML."""
    path = tmp_path / "routes.toml"
    path.write_bytes("\ufeff".encode() + ROUTES.encode())
    assert RouteTable.load(path).match("+18005551212") == RouteTable.load(write(tmp_path, ROUTES)).match(
        "+18005551212"
    )
    path.write_bytes("\ufeff".encode() + b'[routes."+1"]\nvoice = \n')  # (a line still counts from 1)
    with pytest.raises(RouteError, match=r"at line 2, column 9\)$"):
        RouteTable.load(path)
    path.write_bytes("\ufeff".encode() + b'x = "\xff"\n')  # (the file's byte; the mark is no column)
    with pytest.raises(RouteError, match=r"not UTF-8 \(at line 1, column 6, byte 8\)$"):
        RouteTable.load(path)


def test_unknown_tools_are_errors_even_when_the_app_has_no_tools(tmp_path: Path) -> None:
    path = write(tmp_path, '[default]\ntools = ["lookup_order"]\n')
    with pytest.raises(RouteError, match=r"default\.tools: unknown tool lookup_order$"):
        RouteTable.load(path, [])  # what the service passes for an app without tools
    table = RouteTable.load(path)  # tool names not given: not checked here...
    with pytest.raises(RouteError, match=r"routes\.toml: default\.tools: unknown tool lookup_order$"):
        table.check(Sideband())  # ...but against the app
    app = Sideband()

    @app.tool
    async def lookup_order(order_id: str) -> str:
        """Look up an order."""
        return order_id

    table.check(app)


def test_session_field_typos_are_refused_and_new_fields_pass() -> None:
    from sideband.session import SessionConfigError, validate_accept_payload

    for body, message in (
        ({"type": "realtime", "instruction": "x"}, "'instruction' (did you mean 'instructions'?)"),
        ({"type": "realtime", "audio": {"inputs": {}}}, "'audio.inputs' (did you mean 'audio.input'?)"),
        ({"type": "realtime", "audio": {"output": {"voic": "x"}}}, "did you mean 'audio.output.voice'?"),
    ):
        with pytest.raises(SessionConfigError, match=re.escape(message)):
            validate_accept_payload(body)
    # A field OpenAI adds later is close to none of the known ones: it passes untouched.
    validate_accept_payload({"type": "realtime", "audio": {"output": {"pitch": 1}}, "reasoning": {}})


def test_service_refuses_to_start_with_an_app_config_every_call_would_fail(simulator: Simulator) -> None:
    from sideband.service import Service
    from sideband.session import SessionConfigError

    app = Sideband(session=SessionConfig(turn_detection={"type": "server_vad", "threshold": 0.6}))
    with pytest.raises(SessionConfigError) as info:
        Service(settings_for(simulator), app)  # no route file: the app's own config is checked all the same
    assert str(info.value) == (
        "the app's session config: audio.input.turn_detection.threshold is refused by the calls API"
    )


def test_service_refuses_to_start_with_a_misspelt_voice(simulator: Simulator) -> None:
    from sideband.service import Service

    with pytest.raises(SessionConfigError) as info:
        Service(settings_for(simulator), Sideband(voice="marine"))
    assert str(info.value) == "the app's session config: unknown voice 'marine' (did you mean 'marin'?)"
    Service(settings_for(simulator), Sideband(voice="juniper"))  # a voice we do not know of may be a new one


def test_service_refuses_to_start_with_an_app_config_json_cannot_carry(simulator: Simulator) -> None:
    from sideband.service import Service

    app = Sideband(
        session=SessionConfig(tracing={"workflow_name": "desk", "metadata": {"rate": decimal.Decimal(1)}})
    )
    with pytest.raises(SessionConfigError) as info:
        Service(settings_for(simulator), app)
    assert str(info.value) == (
        "the app's session config: session field tracing.metadata.rate holds a value of type Decimal, which "
        "JSON cannot carry"
    )


def test_service_refuses_to_start_with_an_mcp_server_whose_calls_wait_for_approval(
    simulator: Simulator,
) -> None:
    from sideband.service import Service
    from sideband.session import SessionConfigError

    mcp = {"type": "mcp", "server_label": "crm", "server_url": "https://mcp.example.com"}
    app = Sideband(session=SessionConfig(tools=[mcp]))  # type: ignore[call-arg]
    app.authorize_browser(lambda request: True)  # (WebRTC calls have nobody to approve either)
    with pytest.raises(SessionConfigError, match='MCP tool \'crm\' needs "require_approval": "never"'):
        Service(settings_for(simulator), app)
    app = Sideband(session=SessionConfig(tools=[{**mcp, "require_approval": "never"}]))  # type: ignore[call-arg]
    Service(settings_for(simulator), app)


def test_a_config_only_sip_refuses_is_a_warning_where_webrtc_calls_are_taken(simulator: Simulator) -> None:
    from sideband.service import Service

    app = Sideband(session=SessionConfig(turn_detection={"type": "server_vad", "threshold": 0.6}))
    app.authorize_browser(lambda request: True)  # WebRTC calls allow a threshold
    with capture_logs() as logs:
        Service(settings_for(simulator), app)
    warned = [e for e in logs if e["event"] == "server.config_warning"]
    assert [(e["problem"], e["refused"]) for e in warned] == [
        ("audio.input.turn_detection.threshold is refused by the calls API", "sip calls")
    ]


def test_serve_with_a_bad_app_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "badcfg.py").write_text(
        "from sideband import SessionConfig, Sideband\n"
        "app = Sideband(session=SessionConfig(max_output_token=400))\n"
    )
    env = {
        "OPENAI_API_KEY": "sk-x",
        "OPENAI_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "sideband.cli", "serve", "badcfg:app", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "sideband: the app's session config: unknown session field 'max_output_token' "
        "(did you mean 'max_output_tokens'?)"
    )


def test_service_refuses_to_start_with_a_route_sip_would_refuse(simulator: Simulator, tmp_path: Path) -> None:
    from sideband.service import Service

    path = write(tmp_path, f'[routes."+18005551212"]\n{SIP_REFUSED[0][0]}\n')
    with pytest.raises(RouteError, match=r"audio\.input\.format"):
        Service(settings_for(simulator, routes_file=path), make_app())


@contextlib.contextmanager
def stalled_route_file(tmp_path: Path, after: float = 10.0) -> Iterator[Path]:
    """A route file whose read hangs (a FIFO nobody writes to: as a file on a stalled network volume),
    until the block ends, or ``after`` seconds (an empty file is read then)."""
    path = tmp_path / "routes.toml"
    os.mkfifo(path)

    def write_nothing() -> None:  # (a read blocked opening the FIFO opens, and finds it empty)
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(after, write_nothing)
    timer.start()
    try:
        yield path
    finally:
        timer.cancel()
        write_nothing()


def test_a_route_file_read_that_hangs_stops_the_service_start(
    simulator: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A route file that never comes (a FIFO, a stalled network volume) stops the start at the read's
    timeout, as a reload fails then: the start does not hang with no word."""
    from sideband.service import Service

    monkeypatch.setattr("sideband.service.ROUTES_READ_TIMEOUT", 0.3)
    with stalled_route_file(tmp_path, after=5.0) as path, pytest.raises(RouteError) as info:
        Service(settings_for(simulator, routes_file=path), make_app())
    assert str(info.value) == f"{path}: timed out reading it (0.3 s)"


@pytest.mark.parametrize("command", ["check", "serve"])
def test_a_route_file_read_that_hangs_stops_the_command_with_one_line(tmp_path: Path, command: str) -> None:
    with stalled_route_file(tmp_path, after=15.0) as path:
        env = {
            "OPENAI_API_KEY": "sk-x",
            "OPENAI_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "SIDEBAND_ROUTES_FILE": str(path),
            "PATH": "/usr/bin:/bin",
        }
        main = (
            "import sideband.service, sideband.cli; sideband.service.ROUTES_READ_TIMEOUT = 0.5; "
            f"raise SystemExit(sideband.cli.main([{command!r}, '--port', '0']))"
        )
        done = subprocess.run(
            [sys.executable, "-c", main], env=env, capture_output=True, text=True, timeout=30, check=False
        )
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr == f"sideband: SIDEBAND_ROUTES_FILE: {path}: timed out reading it (0.5 s)\n"


@pytest.mark.parametrize("command", ["check", "serve", "demo"])
def test_ctrl_c_while_the_route_file_is_read_at_start_exits_130_at_once(tmp_path: Path, command: str) -> None:
    """Ctrl-C while the start waits for a route file that does not come (a FIFO, a stalled network
    volume) ends the command at once as interrupted (130), not at the read's timeout as a route error."""
    path = tmp_path / "routes.toml"
    os.mkfifo(path)
    env = {
        "OPENAI_API_KEY": "sk-x",
        "OPENAI_WEBHOOK_SECRET": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "SIDEBAND_ROUTES_FILE": str(path),
        "PATH": "/usr/bin:/bin",
    }
    # (the bundled demo's calls have routes of their own: the file answers an app's calls only)
    args = {"serve": ["--port", "0"], "demo": ["sideband.examples.order_desk:app"]}.get(command, [])
    proc = subprocess.Popen(
        [sys.executable, "-m", "sideband.cli", command, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    writer = None
    try:
        deadline = time.monotonic() + 20
        while writer is None:  # until the start opens the file to read it (then finds nothing written)
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            try:
                writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # (ENXIO: no reader yet)
                time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=5)  # (the read's own timeout is 10 s)
    finally:
        if writer is not None:
            os.close(writer)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and out == "" and err == "", err


async def test_a_cancellation_asked_for_before_the_route_file_is_read_is_raised_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C that lands as the start begins, before the route file is read (the start's task already
    cancelled), ends the start at once, not at the read's timeout as a route error."""
    monkeypatch.setattr(service_module, "ROUTES_READ_TIMEOUT", 2.0)
    path = tmp_path / "routes.toml"
    os.mkfifo(path)  # (nothing is ever written: a read waits for good)

    took: list[float] = []

    async def start() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # (asyncio's answer to SIGINT, not yet delivered: this step has not awaited)
        began = time.monotonic()
        try:
            service_module._read_routes(path, [])
        finally:
            took.append(time.monotonic() - began)

    started = asyncio.create_task(start())
    try:
        with pytest.raises(asyncio.CancelledError):
            await started
    finally:
        with contextlib.suppress(OSError):  # (a reader left waiting gets an empty file: it ends)
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    assert started.cancelled() and took[0] < 1.0, took


# -- dialed numbers without "+" ------------------------------------------------------------------------


def dialed(to: str) -> str | None:
    return IncomingCall.from_sip("rtc_1", [SipHeader("To", to)]).to_number


def test_digits_only_dialed_numbers_match_e164_keys() -> None:
    table = RouteTable.from_dict({"default": {"reject": 404}, "routes": {"+18005551212": {"reject": 486}}})
    assert table.match(dialed("<sip:+18005551212@sip.example.com>")) == Reject(486)
    assert table.match(dialed("<sip:18005551212@sip.example.com>")) == Reject(486)  # trunk form
    assert table.match(dialed("tel:1-800-555-1212")) == Reject(486)
    # National forms lack the country code: not guessed at, the default applies.
    assert table.match(dialed("tel:8005551212")) == Reject(404)
    assert table.match("\uff11\uff18\uff10\uff10\uff15\uff15\uff15\uff11\uff12\uff11\uff12") == Reject(404)
    assert table.match("+") == Reject(404) and table.match("") == Reject(404)


def test_exact_keys_win_over_the_plus_form() -> None:
    """A digits-only key is the number as a trunk sends it, which may be national: not the same key as
    the ``+`` form (a dialed ``+4155550123`` is a number in Switzerland, not ``4155550123``)."""
    table = RouteTable.from_dict(
        {
            "default": {"reject": 403},
            "routes": {
                "+18005551212": {"reject": 486},
                "18005551212": {"reject": 488},
                "4155550123": {"reject": 404},
            },
        }
    )
    assert table.match("18005551212") == Reject(488)
    assert table.match("+18005551212") == Reject(486)
    assert table.match("4155550123") == Reject(404)
    assert table.match("+4155550123") == Reject(403)
    uri = RouteTable.from_dict({"routes": {"sip:18005551212@pbx.example.com": {"reject": 488}}})
    assert uri.match("18005551212") == Reject(488) and uri.match("+18005551212") is None


@pytest.mark.parametrize(
    "key",
    [
        "tel:+18005551212",
        "TEL:+1-800-555-1212",
        "sip:+18005551212@pbx.example.com",
        "sips:+18005551212@pbx.example.com;user=phone",  # the host and its parameters are ignored
        "tel:%2B18005551212",
    ],
)
def test_keys_written_as_uris_match_the_number(key: str) -> None:
    table = RouteTable.from_dict({"default": {"reject": 404}, "routes": {key: {"reject": 486}}})
    for to in ("<sip:+18005551212@sip.example.com;user=phone>", "<sip:18005551212@sip.example.com>"):
        assert table.match(dialed(to)) == Reject(486), (key, to)
    with pytest.raises(RouteError, match=re.escape(f"routes.{key}: the same number as routes.+18005551212")):
        RouteTable.from_dict({"routes": {"+18005551212": {"reject": 486}, key: {"reject": 404}}})


def test_sip_user_names_are_keys() -> None:
    table = RouteTable.from_dict(
        {
            "default": {"reject": 404},
            "routes": {"frontdesk": {"reject": 486}, "sip:sales@pbx": {"reject": 488}},
        }
    )
    assert table.match(dialed("<sip:frontdesk@sip.example.com>")) == Reject(486)
    assert table.match(dialed("<sip:sales@sip.example.com>")) == Reject(488)
    assert table.match(dialed("<sip:Sales@sip.example.com>")) == Reject(404)  # user parts are case-sensitive


@pytest.mark.parametrize(
    "key, problem",
    [
        ("+18005551212;ext=22", "a key cannot carry URI parameters (;ext=22)"),
        ("tel:+18005551212;phone-context=example.com", "URI parameters (;phone-context=example.com)"),
        ("sip:+18005551212;isub=1@pbx.example.com", "URI parameters (;isub=1)"),
        ("sales?x=1", "a key cannot carry URI headers (?x=1)"),
        ("sip:+18005551212?subject=a@pbx.example.com", "URI headers (?subject=a@pbx.example.com)"),
        ("sip:+18005551212@pbx.example.com?subject=x", "URI headers (?subject=x)"),
        ("sip:frontdesk@pbx.example.com;user=phone?x=y", "URI headers (?x=y)"),
        ("", "not an E.164 number, a number of digits or a SIP user name"),
        ("tel:", "not an E.164 number"),
        ("front desk", "not an E.164 number"),
        ("+1 800 FLOWERS", "not an E.164 number"),
        ("sip:+18005551212:5060@pbx.example.com", "not an E.164 number"),
        ("+18005551212>", "not an E.164 number"),
        ("http://example.com", "not an E.164 number"),
    ],
)
def test_keys_no_call_could_match_are_refused(tmp_path: Path, key: str, problem: str) -> None:
    path = write(tmp_path, f'[routes."{key}"]\nreject = 486\n')
    with pytest.raises(RouteError) as info:
        RouteTable.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: routes.{key}: ") and problem in message, message
    assert "\n" not in message


async def test_route_file_matches_a_to_without_plus(stack: Stack) -> None:
    call = stack.sim.create_call(Script([]), to_number="18005550000")
    assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    assert call.status == "rejected" and call.reject_body == {"status_code": 486}


async def test_accept_with_values_only_pythons_json_encoder_writes(stack: Stack) -> None:
    """An integer over 64 bits in the session (orjson refuses it) is still accepted, not a 500."""

    @stack.app.on_incoming
    def route(call: IncomingCall) -> Accept:
        return Accept(session={"tracing": {"workflow_name": "desk", "metadata": {"ticket": 2**70}}})

    call = stack.sim.create_call(Script([wait_for_greeting("Hi"), caller_says("x"), model_says("y")]))
    assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    assert call.status == "accepted" and call.accept_body["tracing"]["metadata"] == {"ticket": 2**70}
    await asyncio.wait_for(call.wait_done(), 5)


class _Ticket:
    """An object of the app's own, which JSON cannot carry."""


@pytest.mark.parametrize(
    ("value", "kind"),
    [(_Ticket(), "_Ticket"), (b"\xff", "bytes"), ({1, 2}, "set"), (decimal.Decimal("12.50"), "Decimal")],
)
async def test_an_accept_with_a_value_json_cannot_carry_fails_closed(
    stack: Stack, value: Any, kind: str
) -> None:
    """The accept could not be sent: the call is rejected (config_invalid, naming where the value is and
    its type), not answered 500 at every redelivery while the caller rings."""

    @stack.app.on_incoming
    def route(call: IncomingCall) -> Accept:
        return Accept(session={"tracing": {"workflow_name": "desk", "metadata": {"x": value}}})

    call = stack.sim.create_call(Script([]))
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    assert call.status == "rejected" and call.reject_body == {"status_code": 480}
    [invalid] = [e for e in logs if e["event"] == "call.config_invalid"]
    assert invalid["error"] == (
        f"session field tracing.metadata.x holds a value of type {kind}, which JSON cannot carry"
    )
    assert stack.service.counters["config_invalid"] == 1


def test_a_plan_is_the_same_for_a_value_and_its_look_alike_string() -> None:
    """A session is cached by what it is as JSON: a value JSON cannot carry is refused even after a
    string that reads the same was planned, and one JSON writes its own way (a datetime, as ISO 8601)
    is planned, and sent, as the string it is written as."""
    app = make_app()
    plain = Accept(session={"tracing": {"workflow_name": "desk", "metadata": {"amount": "12.50"}}})
    assert app.plan(plain).session["tracing"]["metadata"] == {"amount": "12.50"}
    money = Accept(
        session={"tracing": {"workflow_name": "desk", "metadata": {"amount": decimal.Decimal("12.50")}}}
    )
    with pytest.raises(SessionConfigError, match=r"tracing\.metadata\.amount holds a value of type Decimal"):
        app.plan(money)
    when = datetime.datetime(2026, 3, 1, 9, 30, tzinfo=datetime.UTC)
    dated = app.plan(Accept(session={"tracing": {"workflow_name": "desk", "metadata": {"at": when}}}))
    assert dated.session["tracing"]["metadata"] == {"at": "2026-03-01T09:30:00+00:00"}
    assert json.loads(json.dumps(dated.session)) == dated.session  # (what the accept is sent with)
    # orjson writes NaN as null, which unsets a field: a NaN is refused, not taken for the None before it
    unset = app.plan(Accept(session={"transcription_model": None})).session["audio"]
    assert "transcription" not in unset.get("input", {})
    with pytest.raises(
        SessionConfigError, match=r"field transcription_model is nan, which JSON cannot carry"
    ):
        app.plan(Accept(session={"transcription_model": float("nan")}))


async def test_a_hook_accepting_with_a_session_sip_refuses_is_rejected_on_every_call(stack: Stack) -> None:
    """Validation of an accept's session is remembered only for a session that passed it: the same bad
    decision is refused on every call, and a good one after it is accepted."""
    bad = {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}}}  # SIP negotiates the codec
    decisions = [Accept(session=bad), Accept(session=bad), Accept(instructions="Fine.")]

    @stack.app.on_incoming
    async def route(call: IncomingCall) -> Accept:
        return decisions.pop(0)

    with capture_logs() as logs:
        calls = []
        for _ in range(3):
            call = stack.sim.create_call(Script([]))
            assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
            calls.append(call)
    status = stack.service.settings.route_failure_status
    assert [c.status for c in calls[:2]] == ["rejected", "rejected"]
    assert [c.reject_body for c in calls[:2]] == [{"status_code": status}] * 2
    assert calls[2].status == "accepted" and calls[2].accept_body["instructions"] == "Fine."
    invalid = [e for e in logs if e["event"] == "call.config_invalid"]
    assert len(invalid) == 2 and all("format" in e["error"] for e in invalid), invalid


async def test_an_accept_hands_what_the_hook_looked_up_to_the_calls_state(stack: Stack) -> None:
    seen: list[tuple[str, Any]] = []

    @stack.app.on_incoming
    async def route(call: IncomingCall) -> Accept:
        return Accept(state={"customer": {"name": "Ada", "tier": "gold"}, "number": call.from_number})

    @stack.app.on_call_start
    def started(ctx: CallContext) -> None:
        seen.append(("start", dict(ctx.state)))

    @stack.app.tool
    async def whoami(ctx: CallContext) -> str:
        """Who is calling."""
        seen.append(("tool", ctx.state["customer"]["name"]))
        return ctx.state["customer"]["name"]

    call = stack.sim.create_call(
        Script(
            [
                wait_for_greeting("Hi"),
                caller_says("Who am I?"),
                model_calls("whoami", {}),
                model_says("Ada."),
                caller_hangs_up(),
            ]
        ),
        from_number="+15550001111",
        to_number="+18005550001",  # the default route: every tool
    )
    assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    await asyncio.wait_for(call.wait_done(), 5)
    await stack.ended(call)
    customer = {"name": "Ada", "tier": "gold"}
    assert seen == [("start", {"customer": customer, "number": "+15550001111"}), ("tool", "Ada")]


async def test_an_accept_whose_state_is_no_mapping_fails_closed(stack: Stack) -> None:
    @stack.app.on_incoming
    def route(call: IncomingCall) -> Accept:
        return Accept(state=[("customer", "Ada")])  # type: ignore[arg-type]

    call = stack.sim.create_call(Script([caller_says("x")]))
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    assert call.status == "rejected" and call.reject_body == {"status_code": 480}
    failed = next(e for e in logs if e["event"] == "call.route_failed")
    assert "Accept(state=...) takes a mapping, not list" in failed["error"]


def test_the_readmes_route_file_loads_and_passes_the_check_against_the_bundled_app(tmp_path: Path) -> None:
    from sideband.examples.order_desk import app

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    routing = readme[readme.index("## Routing") : readme.index("## Limits")]
    [example] = re.findall(r"```toml\n(.*?)```", routing, re.DOTALL)
    text = "\n".join(line.removeprefix("   ") for line in example.splitlines())
    table = RouteTable.load(write(tmp_path, text), app.tools.names())
    table.check(app)
    assert len(table) == 3 and table.default is not None
    assert table.blocked == {"+14155550199", "+14155550142"} and table.block_withheld
