"""Trusted-server sessions on a vowel engine, end to end over loopback against the vowel simulator."""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import errno
import hashlib
import hmac
import io
import json
import math
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from sideband import CallContext, Sideband
from sideband.cli import main
from sideband.runtime.driver import CallRuntime
from sideband.runtime.machine import TURN_GRACE, CallMachine, MachineConfig, RunTool, Send
from sideband.settings import Settings, load_settings
from sideband.testing import pytest_plugin
from sideband.testing.vowel import DEFAULT_ENGINE_KEY, ToolOutputs, VowelSimulator, when
from sideband.upstream.openai import UpstreamError
from sideband.upstream.vowel import (
    MINT_ANSWER,
    EngineRefused,
    MintRefused,
    Token,
    VowelCore,
    connect_engine,
    parse_mint_answer,
    trusted_session_request,
)
from sideband.vowel import EngineError, EngineSession
from sideband.vowel.dial import run_dial, run_vowel_demo
from sideband.vowel.session import ENGINE_CAPABILITIES

ROOT = Path(__file__).resolve().parents[1]
ORDERS = {"1042": {"status": "shipped", "carrier": "UPS"}}


def make_app(**kw: Any) -> Sideband:
    app = Sideband(instructions="You are the test desk.", voice="marin", **kw)
    app.enable_end_call()

    @app.tool
    async def lookup_order(order_id: str, ctx: CallContext) -> dict[str, Any]:
        """Look up an order by its number."""
        ctx.state["looked_up"] = order_id
        return {"order_id": order_id, **ORDERS.get(order_id, {"status": "unknown"})}

    @app.tool
    async def broken() -> str:
        """Always fails."""
        raise RuntimeError("secret database password")

    @app.tool(timeout=0.05)
    async def slow() -> str:
        """Never answers in time."""
        await asyncio.Event().wait()
        return "never"

    return app


def settings_for(sim: VowelSimulator, **overrides: Any) -> Settings:
    values: dict[str, Any] = {**sim.settings_values(), "max_idle_duration": 30.0}
    values.update(overrides)
    return load_settings(values, environ={})


def a_tool_that_never_answers(app: Sideband, vowel: VowelSimulator, name: str, trigger: str) -> asyncio.Event:
    """Give ``app`` a tool ``name`` that the model calls on ``trigger`` and that never answers; the event
    is set once it runs."""
    started = asyncio.Event()

    async def never_answers() -> str:
        """Never answers."""
        started.set()
        await asyncio.Event().wait()
        return "never"

    app.tool(name=name, timeout=60)(never_answers)
    vowel.script([when(trigger, calls=[(name, {})], reply="Done.")])
    return started


@pytest.fixture
def app() -> Sideband:
    return make_app()


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Every log line (JSON, contextvars merged) written to a buffer for the duration of a test."""
    old = structlog.get_config()
    buffer = io.StringIO()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(0),
        logger_factory=structlog.PrintLoggerFactory(buffer),
        cache_logger_on_first_use=False,
    )
    try:
        yield buffer
    finally:
        structlog.configure(**old)


def log_lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------- minting
async def test_mint_declares_the_app_tools_and_returns_a_token(vowel: VowelSimulator, app: Sideband) -> None:
    body = trusted_session_request(
        service_id="order-service", provider="vowel-prime", tools=app.tools.definitions(style="vowel")
    )
    async with aiohttp.ClientSession() as http:
        token = await VowelCore(http, vowel.core_url, vowel.api_key).mint(body)
    record = vowel.mints[-1]
    assert record.status == 200 and record.api_key == vowel.api_key
    assert record.body["connectionType"] == "trusted_server"
    assert record.body["config"]["serviceId"] == "order-service"
    assert record.body["config"]["provider"] == "vowel-prime"
    assert record.body["config"]["serverTools"] == app.tools.definitions(style="vowel")
    assert all("type" not in t for t in record.body["config"]["serverTools"])
    assert token.value == record.token
    assert token.value not in repr(token)
    assert token.expires_at == pytest.approx(vowel.now() + 300, abs=2)


async def test_mint_without_the_scope_is_refused_naming_it(vowel: VowelSimulator, app: Sideband) -> None:
    settings = settings_for(vowel, vowel_api_key=vowel.browser_key)
    with pytest.raises(EngineError) as caught:
        await EngineSession.open(settings, app).start()
    assert caught.value.reason == "mint_forbidden"
    assert "403" in str(caught.value) and "mint_trusted_session" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert [m.status for m in vowel.mints] == [403]
    assert vowel.handshakes == []  # nothing was attempted with a token


async def test_a_403_about_something_else_than_the_scope_says_what_it_is_about(
    vowel: VowelSimulator, app: Sideband
) -> None:
    vowel.add_key("vkey_limited", "mint_trusted_session", providers=["another-provider"])
    settings = settings_for(vowel, vowel_api_key="vkey_limited")
    with pytest.raises(EngineError) as caught:
        await EngineSession.open(settings, app).start()
    assert caught.value.reason == "mint_forbidden" and [m.status for m in vowel.mints] == [403]
    assert str(caught.value) == (
        "vowel core refused to mint a trusted-server token (403): "
        "core said: Provider 'vowel-prime' is not allowed for this API key"
    )
    vowel.add_key("vkey_limited", "mint_trusted_session", providers=["vowel-prime"])
    async with EngineSession.open(settings, app) as session:
        assert session.live


async def test_bad_key_is_refused_with_401(vowel: VowelSimulator, app: Sideband) -> None:
    with pytest.raises(EngineError) as caught:
        await EngineSession.open(settings_for(vowel, vowel_api_key="vkey_wrong"), app).start()
    assert caught.value.reason == "mint_unauthorized"
    assert str(caught.value) == "vowel core refused the API key (401)"
    async with aiohttp.ClientSession() as http:
        with pytest.raises(MintRefused) as refused:
            await VowelCore(http, vowel.core_url, "vkey_wrong").mint({"connectionType": "trusted_server"})
    assert refused.value.status == 401


@pytest.mark.parametrize("failure", ["refused", "failed"])
async def test_a_session_whose_mint_fails_logs_every_line_with_its_call_id(
    vowel: VowelSimulator, app: Sideband, logs: io.StringIO, failure: str
) -> None:
    """Every line about a session carries its call_id, those of a session that never got a token too."""
    settings = (
        settings_for(vowel, vowel_api_key=vowel.browser_key)  # 403
        if failure == "refused"
        else settings_for(vowel, vowel_core_url=f"{vowel.base_url}/nowhere")  # 404
    )
    session = EngineSession.open(settings, app)
    assert session.call_id.startswith("vowel_")  # known before anything is sent
    with pytest.raises(EngineError):
        await session.start()
    lines = log_lines(logs)
    assert {line["event"] for line in lines} == {f"vowel.mint_{failure}", "vowel.session_failed"}
    assert all(line["call_id"] == session.call_id for line in lines), lines
    (failed,) = [line for line in lines if line["event"] == "vowel.session_failed"]
    assert failed["level"] == "warning" and failed["status"] == (403 if failure == "refused" else 404)
    assert failed["reason"] == session.end_reason and "error" not in failed  # (the line before it says)


async def test_every_line_of_a_session_carries_one_call_id(
    vowel: VowelSimulator, app: Sideband, logs: io.StringIO
) -> None:
    vowel.script([when("1042", calls=[("lookup_order", {"order_id": "1042"})], reply="Shipped.")])
    async with EngineSession.open(settings_for(vowel), app) as session:
        call_id = session.call_id
        await session.say("Where is order 1042?")
    lines = log_lines(logs)
    assert len(lines) > 5
    assert {line.get("call_id") for line in lines} == {call_id}, [
        line for line in lines if line.get("call_id") != call_id
    ]
    created = next(line for line in lines if line["event"] == "vowel.session_created")
    assert created["engine_session_id"] == vowel.sessions[0].id != call_id


async def test_a_mint_the_core_could_not_take_is_tried_again(
    vowel: VowelSimulator, app: Sideband, logs: io.StringIO
) -> None:
    vowel.fail_next_mints(503, "drop", "timeout", 500)
    session = EngineSession.open(settings_for(vowel), app, mint_timeout=0.3, mint_budget=10)
    async with session:
        reply = await session.say("hello")
    assert reply.text == "I heard you."
    assert [m.status for m in vowel.mints] == [503, 0, 0, 500, 200]
    assert not session.failed
    lines = log_lines(logs)
    retries = [line for line in lines if line["event"] == "vowel.mint_retry"]
    assert [(r["attempt"], r["status"]) for r in retries] == [(1, 503), (2, None), (3, None), (4, 500)]
    assert all(r["call_id"] == session.call_id for r in retries)
    assert "vowel.mint_failed" not in {line["event"] for line in lines}


async def test_a_mint_retry_waits_as_long_as_the_core_asks(vowel: VowelSimulator, app: Sideband) -> None:
    vowel.fail_next_mints(429, retry_after=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with EngineSession.open(settings_for(vowel), app, mint_budget=5) as session:
        elapsed = loop.time() - started
    assert [m.status for m in vowel.mints] == [429, 200]
    assert elapsed >= 1.0 and session.end_reason == "closed"


@pytest.mark.parametrize("status", [400, 404, 408, 409, 422, 401, 403])
async def test_a_mint_refused_for_what_it_is_is_not_tried_again(
    vowel: VowelSimulator, app: Sideband, status: int
) -> None:
    vowel.fail_next_mints(status)
    with pytest.raises(EngineError) as caught:
        await EngineSession.open(settings_for(vowel), app, mint_budget=5).start()
    assert [m.status for m in vowel.mints] == [status]
    reason = {401: "mint_unauthorized", 403: "mint_forbidden"}.get(status, "connect_failed")
    assert caught.value.reason == reason and f"{status}" in str(caught.value)


async def test_a_core_that_keeps_failing_fails_the_session_within_the_budget(
    vowel: VowelSimulator, app: Sideband, logs: io.StringIO
) -> None:
    vowel.fail_next_mints(*[503] * 100)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(EngineError) as caught:
        await EngineSession.open(settings_for(vowel), app, mint_budget=0.5).start()
    assert loop.time() - started < 2.0
    assert caught.value.reason == "connect_failed" and "503" in str(caught.value)
    assert len(vowel.mints) > 1 and {m.status for m in vowel.mints} == {503}
    failed = [line for line in log_lines(logs) if line["event"] == "vowel.mint_failed"]
    assert [(f["status"], f["attempts"]) for f in failed] == [(503, len(vowel.mints))]
    assert vowel.handshakes == []


async def test_a_request_the_vowel_simulator_crashes_on_is_answered_500_and_kept_as_an_internal_error(
    app: Sideband, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug of the simulator's in a handler is answered 500, which a client takes for the core's own
    failure and retries (the session then runs as if nothing were wrong): its traceback is kept in
    ``internal_errors`` all the same. An engine socket that crashes on a message is cut, and kept too."""
    issue = VowelSimulator._issue
    crashed: list[str] = []

    def crash_once(self: VowelSimulator, *args: Any, **kwargs: Any) -> Any:
        if not crashed:
            crashed.append("mint")
            raise RuntimeError("simulator bug in mint")
        return issue(self, *args, **kwargs)

    async def crash(self: VowelSimulator, *args: Any) -> None:
        raise RuntimeError("simulator bug in the engine")

    monkeypatch.setattr(VowelSimulator, "_issue", crash_once)
    async with VowelSimulator() as vowel:  # (not the fixture, which fails the test on these)
        async with EngineSession.open(settings_for(vowel), app, mint_budget=5) as session:
            reply = await session.say("hello")
        assert reply.text == "I heard you." and [m.status for m in vowel.mints] == [500, 200]
        [error] = vowel.internal_errors
        assert 'raise RuntimeError("simulator bug in mint")' in error
        monkeypatch.setattr(VowelSimulator, "_on_item", crash)
        async with _engine_with_tools(vowel) as (ws, _):
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
            await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
        await vowel.wait_for(lambda v: len(v.internal_errors) == 2, 5, "the engine's internal error")
        assert "RuntimeError: simulator bug in the engine" in vowel.internal_errors[1]


async def test_the_faults_the_vowel_simulator_is_told_to_make_are_no_internal_errors(app: Sideband) -> None:
    """Mint faults (a 5xx, a dropped connection, a request held until the simulator closes), handshakes
    dropped, a session's connection lost, and aiohttp's own answers (a handshake that is no WebSocket
    upgrade): none of these is a bug of the simulator's, none is kept as one."""
    vowel = VowelSimulator()
    await vowel.start()
    try:
        vowel.fail_next_mints(503, "drop", "timeout")
        async with EngineSession.open(settings_for(vowel), app, mint_timeout=0.3, mint_budget=10) as session:
            await session.say("hello")
            await vowel.drop(vowel.sessions[0])
        assert [m.status for m in vowel.mints] == [503, 0, 0, 200]
        vowel.fail_next_mints("timeout")
        async with aiohttp.ClientSession() as http:
            held = asyncio.create_task(http.post(f"{vowel.core_url}/v1/realtime/sessions", json={}))
            await vowel.wait_for(lambda v: len(v.mints) == 5, 5, "the held mint")
            async with http.get(
                f"{vowel.engine_url}/v1/realtime", headers={"Authorization": "Bearer x"}
            ) as resp:
                assert resp.status == 401
            token = vowel.mints[3].token
            async with http.get(
                f"{vowel.engine_url}/v1/realtime", headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                assert resp.status == 400  # (no WebSocket upgrade)
            vowel.refuse_handshake = "drop"
            with pytest.raises(aiohttp.ServerDisconnectedError):
                async with http.get(f"{vowel.engine_url}/v1/realtime") as resp:
                    pass
            await vowel.close()
            with contextlib.suppress(aiohttp.ServerDisconnectedError):  # (answered 504, or cut)
                async with await asyncio.wait_for(held, 5) as resp:
                    assert resp.status == 504
    finally:
        await vowel.close()
    assert vowel.internal_errors == []


@pytest.mark.parametrize("style", ["core", "epoch", "expires_in", "client_secret", "engine"])
async def test_every_expiry_form_is_understood(vowel: VowelSimulator, style: Any) -> None:
    vowel.mint_answer = style
    vowel.advance(1000)  # the token's expiry follows the simulator clock, not ours
    async with aiohttp.ClientSession() as http:
        token = await VowelCore(http, vowel.core_url, vowel.api_key).mint(
            trusted_session_request(service_id="s", provider="vowel-prime", tools=[])
        )
    assert token.value == vowel.mints[-1].token
    expected = vowel.mints[-1].expires_at
    if style == "expires_in":  # relative: anchored on our clock
        assert token.expires_in() == pytest.approx(300, abs=2)
    else:
        assert token.expires_at == pytest.approx(expected, abs=1.0)


async def test_the_simulated_core_refuses_a_mint_body_that_is_not_json(vowel: VowelSimulator) -> None:
    """The core parses as ``JSON.parse`` does: ``NaN`` or ``Infinity`` in a body is no JSON, refused."""
    body = b'{"connectionType": "trusted_server", "config": {"serviceId": "s", "x": NaN}}'
    headers = {"Authorization": f"Bearer {vowel.api_key}", "Content-Type": "application/json"}
    url = f"{vowel.core_url}/v1/realtime/sessions"
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as answer:
        assert answer.status == 400
        assert await answer.json() == {"message": "Request body must be a JSON object"}
    assert [record.body for record in vowel.mints] == [None]


async def test_a_mint_refusal_whose_body_stalls_keeps_its_status() -> None:
    """The core's 403 is in, its body stalls: the refusal is still a 403 (not tried again), not a core
    that did not answer (which would be)."""
    stalled = asyncio.Event()

    async def mint(request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse(status=403)
        answer.content_length = 1000
        await answer.prepare(request)
        await answer.write(b'{"message": "API key lacks')
        await stalled.wait()
        return answer

    server = web.Application()
    server.router.add_post("/v1/realtime/sessions", mint)
    body = trusted_session_request(service_id="s", provider="vowel-prime", tools=[])
    async with TestServer(server, host="127.0.0.1") as srv, aiohttp.ClientSession() as http:
        core = VowelCore(http, str(srv.make_url("")), "vkey")
        with pytest.raises(MintRefused) as refused:
            await core.mint(body, timeout=5)
        stalled.set()
    assert refused.value.status == 403 and refused.value.reason == "mint_forbidden"


@pytest.mark.parametrize("answer", [b'{"token": "ek_\xff\xfe"}', b'\xff{"token": "ek_1"}'])
async def test_a_mint_answer_that_is_not_utf8_is_no_json(answer: bytes) -> None:
    """A 200 whose body is not UTF-8 is no JSON: the non-JSON error (not tried again), never a decoding
    error escaping, nor a token made of replacement characters."""

    async def mint(request: web.Request) -> web.Response:
        return web.Response(body=answer, content_type="application/json")

    server = web.Application()
    server.router.add_post("/v1/realtime/sessions", mint)
    body = trusted_session_request(service_id="s", provider="vowel-prime", tools=[])
    async with TestServer(server, host="127.0.0.1") as srv, aiohttp.ClientSession() as http:
        with pytest.raises(UpstreamError) as caught:
            await VowelCore(http, str(srv.make_url("")), "vkey").mint(body, timeout=5)
    assert type(caught.value) is UpstreamError and not caught.value.retryable
    assert str(caught.value) == "vowel core answered the mint request with non-JSON"
    assert caught.value.status == 200


@pytest.mark.parametrize("declared", [True, False])
async def test_a_mint_answer_too_large_is_refused(declared: bool) -> None:
    """A 200 larger than any mint answer is refused, not read whole: one that says its length at once
    (its body stalls here), one sent in chunks once :data:`MINT_ANSWER` is passed (valid JSON, padded)."""
    stalled = asyncio.Event()
    padded = b'{"token": "ek_1"}' + b" " * (2 * MINT_ANSWER)

    async def mint(request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse(headers={"Content-Type": "application/json"})
        if declared:
            answer.content_length = len(padded)
        await answer.prepare(request)
        if declared:
            await answer.write(padded[:100])
            await stalled.wait()
        else:
            for start in range(0, len(padded), 64 * 1024):
                await answer.write(padded[start : start + 64 * 1024])
        await answer.write_eof()
        return answer

    server = web.Application()
    server.router.add_post("/v1/realtime/sessions", mint)
    body = trusted_session_request(service_id="s", provider="vowel-prime", tools=[])
    async with TestServer(server, host="127.0.0.1") as srv, aiohttp.ClientSession() as http:
        try:
            with pytest.raises(UpstreamError) as caught:
                await VowelCore(http, str(srv.make_url("")), "vkey").mint(body, timeout=5)
        finally:
            stalled.set()
    assert type(caught.value) is UpstreamError and not caught.value.retryable
    assert str(caught.value) == (
        "vowel core answered the mint request with more than 1024 KiB: no mint answer is that large"
    )


async def test_a_session_whose_mint_answer_is_not_utf8_fails_as_an_engine_error(
    vowel: VowelSimulator,
) -> None:
    """The core's 200 that is not UTF-8 ends the session's start as an :class:`EngineError`, and
    ``sideband dial`` in one ``sideband:`` line and status 1."""

    async def mint(request: web.Request) -> web.Response:
        return web.Response(body=b'\xff{"token": "ek_1"}', content_type="application/json")

    server = web.Application()
    server.router.add_post("/v1/realtime/sessions", mint)
    async with TestServer(server, host="127.0.0.1") as srv:
        settings = settings_for(vowel, vowel_core_url=str(srv.make_url("")).rstrip("/"))
        with pytest.raises(EngineError) as caught:
            await EngineSession.open(settings, make_app()).start()
        assert "non-JSON" in str(caught.value)
        out, err = io.StringIO(), io.StringIO()
        assert await run_dial(settings, make_app(), ["hi"], out=out, err=err) == 1
    assert err.getvalue() == "sideband: vowel core answered the mint request with non-JSON\n"
    assert vowel.sessions == []


async def test_the_mint_body_is_strict_json(app: Sideband) -> None:
    """JSON has no NaN or infinity: a float the body holds (a hand-written tool schema's default, say)
    goes out as null, never as ``Infinity``, which the core's parser would refuse."""
    seen: list[tuple[str, bytes]] = []

    async def mint(request: web.Request) -> web.Response:
        seen.append((request.content_type, await request.read()))
        return web.json_response({"token": "ek_1", "expiresAt": 4102444800})

    server = web.Application()
    server.router.add_post("/v1/realtime/sessions", mint)
    price = {"type": "number", "default": math.inf, "examples": [math.nan, -math.inf]}
    tools = [
        {"name": "find", "description": "", "parameters": {"type": "object", "properties": {"p": price}}}
    ]
    body = trusted_session_request(service_id="s", provider="vowel-prime", tools=tools)
    async with TestServer(server, host="127.0.0.1") as srv, aiohttp.ClientSession() as http:
        token = await VowelCore(http, str(srv.make_url("")), "vkey").mint(body)
    assert token.value == "ek_1"
    [(content_type, raw)] = seen
    assert content_type == "application/json"

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    sent = json.loads(raw, parse_constant=refuse)
    assert sent["config"]["serverTools"][0]["parameters"]["properties"]["p"] == {
        "type": "number",
        "default": None,
        "examples": [None, None],
    }


def test_mint_answer_parsing_vectors() -> None:
    iso = parse_mint_answer({"token": "ek_a", "expiresAt": "2026-05-15T12:05:00.000Z"})
    assert iso.expires_at == 1778846700.0
    millis = parse_mint_answer({"token": "ek_a", "expires_at": 1778846700000})
    assert millis.expires_at == 1778846700.0
    engine = parse_mint_answer(
        {"client_secret": {"value": "ek_b", "expires_at": 1747310700}, "expires_in": 300}, now=0
    )
    assert (engine.value, engine.expires_at) == ("ek_b", 1747310700.0)
    relative = parse_mint_answer({"value": "ek_c", "expires_in": 300, "maxCallDurationMs": 60000}, now=1000)
    assert (relative.value, relative.expires_at, relative.max_call_duration) == ("ek_c", 1300.0, 60.0)
    for beyond in (
        {"expires_at": 10**400},
        {"expiresAt": "1e999"},
        {"expires_in": 10**400},
        {"expires_at": "nan"},
    ):
        odd = parse_mint_answer({"token": "ek_d", "expires_in": 300, **beyond}, now=1000)  # (no crash)
        assert odd.expires_at == (None if "expires_in" in beyond else 1300.0)
    with pytest.raises(UpstreamError, match="no token") as caught:
        parse_mint_answer({"expires_in": 300, "secret": "do-not-echo"})
    assert "do-not-echo" not in str(caught.value)


def engine_token(claims: dict[str, Any], *, header: str | None = None) -> str:
    """An engine-shaped token: ``ek_`` + a JWT with these claims (signed with a key nobody checks here)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = header if header is not None else b64(b'{"alg":"HS256"}')
    return f"ek_{head}.{b64(json.dumps(claims).encode())}.{b64(os.urandom(32))}"


def test_the_limits_the_engine_enforces_come_from_the_tokens_claims() -> None:
    """The engine's token is ``ek_`` + a JWT whose payload carries the session's limits: they are read
    from it (no signature check: the engine's secret signs it), and win over limits the answer states."""
    token = engine_token(
        {"sub": "s-1", "maxCallDurationMs": 120_000, "maxIdleDurationMs": 45_000, "iat": 1000, "exp": 1300}
    )
    parsed = parse_mint_answer({"token": token, "expiresAt": "2026-05-15T12:05:00.000Z"})
    assert (parsed.max_call_duration, parsed.max_idle_duration) == (120.0, 45.0)
    assert parsed.session_id == "s-1" and parsed.expires_at == 1778846700.0  # (the answer's expiry first)
    both = parse_mint_answer({"token": token, "maxCallDurationMs": 600_000, "maxIdleDurationMs": 1})
    assert (both.max_call_duration, both.max_idle_duration) == (120.0, 45.0)  # what the engine enforces
    assert both.expires_at == 1300.0  # the token's exp, when the answer states no expiry
    bare = parse_mint_answer({"token": engine_token({"sub": "s-2", "exp": 1300}), "maxIdleDurationMs": 9000})
    assert (bare.max_call_duration, bare.max_idle_duration) == (None, 9.0)  # the answer's, as a fallback
    padded = token.split(".")
    padded[1] += "=" * (-len(padded[1]) % 4)
    assert parse_mint_answer({"token": ".".join(padded)}).max_call_duration == 120.0


@pytest.mark.parametrize(
    "value",
    [
        "ek_opaque",
        "ek_a.b",
        "ek_a.b.c.d",
        "ek_a.%%%%.c",
        "ek_a..c",
        "ek_a.bm90IGpzb24.c",  # "not json"
        "ek_a.WzEsMl0.c",  # [1,2]
        "ek_a._w.c",  # not UTF-8
        engine_token({"maxCallDurationMs": True, "maxIdleDurationMs": -5, "exp": "soon", "sub": 7}),
        engine_token({"maxCallDurationMs": 1e400, "maxIdleDurationMs": 10**400}),
        "xk_" + engine_token({"maxCallDurationMs": 60_000})[3:],
    ],
)
def test_a_token_whose_claims_cannot_be_read_is_taken_as_it_is(value: str) -> None:
    parsed = parse_mint_answer({"token": value, "expires_in": 300}, now=0)
    assert (parsed.value, parsed.expires_at, parsed.session_id) == (value, 300.0, None)
    assert (parsed.max_call_duration, parsed.max_idle_duration) == (None, None)


async def test_the_simulator_mints_signed_engine_tokens_and_checks_them(vowel: VowelSimulator) -> None:
    vowel.claim_limits = True
    vowel.max_call_duration, vowel.max_idle_duration = 90.0, 30.0
    async with aiohttp.ClientSession() as http:
        token = await VowelCore(http, vowel.core_url, vowel.api_key).mint(
            trusted_session_request(
                service_id="s", provider="vowel-prime", tools=[], model="m1", voice="Ashley"
            )
        )
    header, payload, signature = token.value.removeprefix("ek_").split(".")
    expected = hmac.new(vowel.token_secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(signature + "==") == expected
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {"alg": "HS256"}
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert {"sub", "iat", "exp", "jti"} <= claims.keys()
    assert (claims["model"], claims["voice"]) == ("m1", "Ashley")
    assert (claims["maxCallDurationMs"], claims["maxIdleDurationMs"]) == (90_000, 30_000)
    assert claims["exp"] - claims["iat"] == 300 and token.expires_at == claims["exp"]
    assert "maxCallDurationMs" not in json.dumps(vowel.mints[-1].body)  # (in the token, not the answer)
    assert (token.session_id, token.max_call_duration, token.max_idle_duration) == (claims["sub"], 90.0, 30.0)
    forged = {**claims, "maxCallDurationMs": 10**9}
    with pytest.raises(EngineRefused):
        await connect_engine(vowel.engine_url, Token(engine_token(forged), None))
    assert (vowel.handshakes[-1].status, vowel.handshakes[-1].reason) == (401, "invalid token signature")
    vowel.max_call_duration = 3600.0  # the engine's default changes: the token's claim still holds
    async with connect(
        f"ws://127.0.0.1:{vowel.port}/engine/v1/realtime",
        additional_headers={"Authorization": f"Bearer {token.value}"},
    ) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        engine = vowel.sessions[0]
        assert engine.claims == claims and engine.max_call_duration == 90.0
        await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "hi"}}))
        assert json.loads(await ws.recv())["type"] == "session.updated"
        vowel.advance(91)
        await ws.send(json.dumps({"type": "response.create"}))  # (limits are checked on a message)
        error = json.loads(await ws.recv())
        assert error["error"]["code"] == "max_call_duration_exceeded"
        await engine.wait_closed()
    assert engine.end_reason == "max_call_duration_exceeded"


async def test_a_session_plans_for_the_limits_its_token_claims(
    vowel: VowelSimulator, app: Sideband, logs: io.StringIO
) -> None:
    """The engine cuts a session at its token's limits without a goodbye: our timers fire before them."""
    vowel.claim_limits = True
    vowel.max_call_duration, vowel.max_idle_duration = 120.0, 60.0
    async with EngineSession.open(settings_for(vowel, max_idle_duration=3600.0), app) as session:
        config = session.runtime.machine.config
        assert (config.max_call_duration, config.max_idle_duration) == (110.0, 54.0)  # (a tenth before)
    claims = vowel.sessions[0].claims
    minted = next(line for line in log_lines(logs) if line["event"] == "vowel.session_minted")
    assert minted["token_session_id"] == claims["sub"]


async def test_engine_own_mint_endpoint(vowel: VowelSimulator) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{vowel.engine_url}/v1/realtime/sessions", headers={"Authorization": "Bearer nope"}, json={}
        ) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["message"] == "Invalid API key"
        async with http.post(
            f"{vowel.engine_url}/v1/realtime/sessions",
            headers={"Authorization": f"Bearer {DEFAULT_ENGINE_KEY}"},
            json={},
        ) as resp:
            token = parse_mint_answer(await resp.json())
    ws = await connect_engine(vowel.engine_url, token)
    await ws.close()
    assert vowel.handshakes[-1].status == 101


# -------------------------------------------------------------------------------------- handshake
@pytest.mark.parametrize("refusal", ["401", "drop"])
async def test_expired_token_is_refused_at_the_handshake(vowel: VowelSimulator, refusal: Any) -> None:
    vowel.refuse_handshake = refusal
    async with aiohttp.ClientSession() as http:
        token = await VowelCore(http, vowel.core_url, vowel.api_key).mint(
            trusted_session_request(service_id="s", provider="vowel-prime", tools=[])
        )
    vowel.advance(301)  # the token lives 5 minutes
    with pytest.raises(EngineRefused) as caught:
        await connect_engine(vowel.engine_url, token)
    assert caught.value.reason == "token_rejected"
    assert token.value not in str(caught.value)
    assert [(h.status, h.reason) for h in vowel.handshakes] == [
        (401 if refusal == "401" else 0, "token expired")
    ]
    assert vowel.sessions == []


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/html\r\n\r\n<h1>Down</h1>",
        b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: gzip\r\n\r\n",
    ],
)
async def test_an_answer_the_handshake_cannot_read_is_the_engine_failing_not_a_refused_token(
    answer: bytes,
) -> None:
    """A gateway's error page before the engine (an HTTP/1.0 status line, a compressed body) is an
    answer all the same: the engine is out of reach, the token not refused (only a connection closed
    with no answer at all stands for that)."""
    asked = asyncio.Event()

    async def gateway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        asked.set()
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(gateway, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(UpstreamError) as caught:
            await connect_engine(f"http://127.0.0.1:{port}", Token("ek_x", None), open_timeout=5)
    finally:
        server.close()
    assert asked.is_set()
    assert not isinstance(caught.value, EngineRefused)
    assert "unreadable handshake answer" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("refusal", ["401", "drop"])
async def test_session_reports_a_refused_token_as_one_error(
    vowel: VowelSimulator, app: Sideband, refusal: Any
) -> None:
    vowel.refuse_handshake = refusal
    vowel.token_ttl = 0  # minted already expired: the engine refuses it
    session = EngineSession.open(settings_for(vowel), app)
    with pytest.raises(EngineError) as caught:
        async with session:
            pytest.fail("the session opened with an expired token")
    assert caught.value.reason == "token_rejected"
    assert "token" in str(caught.value) and "\n" not in str(caught.value)
    assert session.end_reason == "token_rejected"
    assert len(vowel.handshakes) == 1  # one attempt, no retry loop


async def test_audio_with_speech_then_a_text_turn_at_once_is_answered_at_once(vowel: VowelSimulator) -> None:
    """Loud audio, then at once a text turn whose reply calls a tool: the engine reports the audio's speech
    after our text went out, and the audio ended mid-speech (no stop comes). The answer to the tool's
    output is not held back for it (it waited SPEECH_CAP, past the turn's timeout)."""
    vowel.script([when("1042", calls=[("lookup_order", {"order_id": "1042"})], reply="Shipped.")])
    async with EngineSession.open(settings_for(vowel), make_app(), reply_timeout=5) as session:
        await session.send_audio(array.array("h", [3000] * 1024).tobytes())
        reply = await session.say("order 1042")
        assert reply.text == "Shipped." and [t.outcome for t in reply.tools] == ["ok"]
    engine = vowel.sessions[0]
    assert [e["type"] for e in engine.sent_of_type("input_audio_buffer.speech_started")] == [
        "input_audio_buffer.speech_started"
    ]
    assert engine.sent_of_type("input_audio_buffer.speech_stopped") == []


async def test_a_session_update_the_engine_answers_with_an_error_fails_the_start_at_once(
    vowel: VowelSimulator, app: Sideband, logs: io.StringIO
) -> None:
    """The engine answers a session.update it cannot take (a tool schema, say) with an error, sends no
    session.updated and leaves the socket open: the start fails at once, with the engine's reason."""
    said = "Invalid tool schema for lookup_order: parameters.properties must be an object"
    vowel.refuse_session_update = said
    session = EngineSession.open(settings_for(vowel), app, open_timeout=60)
    with pytest.raises(EngineError) as caught:
        async with asyncio.timeout(10):  # (not the open_timeout)
            await session.start()
    assert (caught.value.reason, caught.value.code, caught.value.engine_message) == (
        "setup_failed",
        "server_error",
        said,
    )
    assert f"server_error: {said}" in str(caught.value) and "\n" not in str(caught.value)
    assert session.end_reason == "setup_failed" and session.failed and not session.live
    engine = vowel.sessions[0]
    await engine.wait_closed()
    assert engine.closed_by == "client" and not engine.sent_of_type("session.updated")
    lines = log_lines(logs)
    refused = [line for line in lines if line["event"] == "vowel.setup_failed"]
    assert [(r["engine_error"], r["message"]) for r in refused] == [("server_error", said)]
    ended = [line["reason"] for line in lines if line["event"] == "vowel.session_ended"]
    assert ended == ["setup_failed"]


@pytest.mark.parametrize("bare", [False, True])
async def test_an_engine_failing_before_it_confirms_the_session_fails_the_start_with_its_reason(
    vowel: VowelSimulator, app: Sideband, bare: bool
) -> None:
    """A fatal error while the engine builds its agent: its error (then response.done failed, close
    1011) fails the start at once with the engine's words; a bare 1011 close, as an engine failure."""
    vowel.agent_build_time = 60.0
    session = EngineSession.open(settings_for(vowel), app, open_timeout=60)
    start = asyncio.ensure_future(session.start())
    engine = await vowel.wait_session()
    await vowel.wait_for(lambda _: bool(engine.received_of_type("session.update")), what="session.update")
    await vowel.crash(engine, "Model provider unavailable", bare=bare)
    with pytest.raises(EngineError) as caught:
        async with asyncio.timeout(10):
            await start
    if bare:
        assert caught.value.reason == "engine_error" and "1011" in str(caught.value)
    else:
        assert (caught.value.reason, caught.value.code) == ("setup_failed", "engine_error")
        assert "Model provider unavailable" in str(caught.value)
    assert session.end_reason == caught.value.reason


async def test_anything_before_session_update_is_fatal_on_the_engine(vowel: VowelSimulator) -> None:
    async with aiohttp.ClientSession() as http:
        token = await VowelCore(http, vowel.core_url, vowel.api_key).mint(
            trusted_session_request(service_id="s", provider="vowel-prime", tools=[])
        )
    async with connect(
        f"ws://127.0.0.1:{vowel.port}/engine/v1/realtime",
        additional_headers={"Authorization": f"Bearer {token.value}"},
    ) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "response.create"}))
        error = json.loads(await ws.recv())
        assert error["error"]["message"] == "No agent available"
        failed = json.loads(await ws.recv())  # a fatal error in full: error, response.done failed, 1011
        assert failed["type"] == "response.done" and failed["response"]["status"] == "failed"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011


@pytest.mark.parametrize("first", ["user_text", "audio"])
async def test_input_before_session_updated_finds_no_agent(vowel: VowelSimulator, first: str) -> None:
    """The engine builds its agent on session.update and confirms with session.updated (PROTOCOL C2):
    input sent right after the update, without waiting for that, fails the session fatally."""
    async with aiohttp.ClientSession() as http:
        token = await VowelCore(http, vowel.core_url, vowel.api_key).mint(
            trusted_session_request(service_id="s", provider="vowel-prime", tools=[])
        )
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}
    event = (
        {"type": "conversation.item.create", "item": item}
        if first == "user_text"
        else {"type": "input_audio_buffer.append", "audio": base64.b64encode(speech(100)).decode()}
    )
    async with connect(
        f"ws://127.0.0.1:{vowel.port}/engine/v1/realtime",
        additional_headers={"Authorization": f"Bearer {token.value}"},
    ) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "hi", "tools": []}}))
        await ws.send(json.dumps(event))
        kinds: list[str] = []
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(5):
                while True:
                    received = json.loads(await ws.recv())
                    kinds.append(received["type"])
                    if received["type"] == "error":
                        assert received["error"]["message"] == "No agent available"
    assert kinds == ["error", "response.done"]  # (no session.updated: the session failed first)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    engine = vowel.sessions[0]
    assert (engine.close_code, engine.end_reason, engine.user_texts) == (1011, "no_agent", [])


async def test_each_session_update_is_answered_once_the_agent_is_built(vowel: VowelSimulator) -> None:
    """A second session.update before the agent is built is no input (PROTOCOL C2): each update gets its
    session.updated, both once the agent is built, and input may follow."""
    vowel.agent_build_time = 0.05
    async with aiohttp.ClientSession() as http:
        token = await VowelCore(http, vowel.core_url, vowel.api_key).mint(
            trusted_session_request(service_id="s", provider="vowel-prime", tools=[])
        )
    async with connect(
        f"ws://127.0.0.1:{vowel.port}/engine/v1/realtime",
        additional_headers={"Authorization": f"Bearer {token.value}"},
    ) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        for instructions in ("one", "two"):
            await ws.send(json.dumps({"type": "session.update", "session": {"instructions": instructions}}))
        answers = [json.loads(await ws.recv()) for _ in range(2)]
        assert [a["type"] for a in answers] == ["session.updated", "session.updated"]
        await ws.send(json.dumps({"type": "response.create"}))
        assert json.loads(await ws.recv())["type"] == "response.created"
    engine = vowel.sessions[0]
    assert engine.instructions == "two" and engine.end_reason is None


async def test_a_second_response_create_replaces_the_one_in_flight(vowel: VowelSimulator) -> None:
    vowel.event_delay = 0.01
    vowel.script([when("story", reply="once upon a time there was a very long story " * 3)])
    async with aiohttp.ClientSession() as http:
        token = await VowelCore(http, vowel.core_url, vowel.api_key).mint(
            trusted_session_request(service_id="s", provider="vowel-prime", tools=[])
        )
    ws = await connect(
        f"ws://127.0.0.1:{vowel.port}/engine/v1/realtime",
        additional_headers={"Authorization": f"Bearer {token.value}"},
    )
    try:
        await ws.recv()  # session.created
        await ws.send(json.dumps({"type": "session.update", "session": {"instructions": "hi"}}))
        assert json.loads(await ws.recv())["type"] == "session.updated"  # (input before it is fatal)
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a story"}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        statuses: list[str] = []
        async with asyncio.timeout(5):
            while True:
                event = json.loads(await ws.recv())
                if event["type"] == "response.created" and not statuses:
                    statuses.append("created")
                    await ws.send(json.dumps({"type": "response.create"}))  # the recipe's double trigger
                elif event["type"] == "response.done":
                    statuses.append(event["response"]["status"])
                    if len(statuses) == 3:
                        break
    finally:
        await ws.close()
    assert statuses == ["created", "cancelled", "completed"]
    # As on the engine: the new response starts at once, and the cut one's stream notices the cut after
    # that, at its next chunk: its response.done (cancelled, nothing else) comes after the new created.
    engine = vowel.sessions[0]
    first, second = engine.responses
    created = [e["response"]["id"] for e in engine.sent_of_type("response.created")]
    assert created == [first.id, second.id] and first.status == "cancelled"
    events = engine.sent[[_response_of(e) for e in engine.sent].index(second.id) :]
    cut = [e for e in events if _response_of(e) == first.id]
    assert cut == [events[1]] and cut[0]["response"] == _cancelled(first.id, "client_cancelled")


def _cancelled(response_id: str, reason: str) -> dict[str, Any]:
    """The ``response`` of the engine's ``response.done`` for a reply it cut."""
    return {
        "id": response_id,
        "object": "realtime.response",
        "status": "cancelled",
        "status_details": {"type": "cancelled", "reason": reason},
        "output": [],
        "usage": None,
    }


def _response_of(event: dict[str, Any]) -> Any:
    """The id of the response an engine event is of, if any."""
    return event.get("response_id") or _obj(event.get("response")).get("id")


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


async def test_a_response_cancel_cuts_the_reply_in_flight_as_the_engine_does(vowel: VowelSimulator) -> None:
    """A response.cancel stops the reply in flight: response.done cancelled (``client_cancelled``) at
    once, no usage, nothing more of that reply (none of its message's done events). One that names
    another response, or comes with none in flight, is ignored: no event at all, as on the engine."""
    vowel.event_delay = 0.01
    vowel.script([when("story", reply="Once upon a time. There was a very long story. " * 3)])
    async with _engine_with_tools(vowel) as (ws, until):
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a story"}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        await until("response.output_audio_transcript.delta")  # (a sentence voiced)
        engine = vowel.sessions[0]
        (reply,) = engine.responses
        await ws.send(json.dumps({"type": "response.cancel", "response_id": "resp_someone_else"}))
        await ws.send(json.dumps({"type": "response.cancel", "response_id": reply.id}))
        done = await until("response.done")
        await ws.send(json.dumps({"type": "response.cancel"}))  # none in flight now
        await ws.send(json.dumps({"type": "session.update", "session": {}}))  # (a mark: all before is out)
        await until("session.updated")
    assert done["response"] == _cancelled(reply.id, "client_cancelled") and reply.status == "cancelled"
    its = [e["type"] for e in engine.sent if _response_of(e) == reply.id]
    assert its[-1] == "response.done" and [t for t in its if t.endswith(".done")] == ["response.done"]
    after = engine.sent[[e["event_id"] for e in engine.sent].index(done["event_id"]) + 1 :]
    assert [e["type"] for e in after] == ["session.updated"]  # (the cancels that followed: ignored)


async def test_user_text_replaces_the_reply_in_flight_as_the_engine_does(vowel: VowelSimulator) -> None:
    """User text arriving while a reply streams starts a new response at once: its response.created
    comes first, then the cut reply's response.done (cancelled, ``client_cancelled``), then nothing
    more of the cut reply."""
    vowel.event_delay = 0.01
    vowel.script(
        [when("story", reply="once upon a time there was a long story " * 3), when("also", reply="Ok.")]
    )
    async with _engine_with_tools(vowel) as (ws, until):
        for text in ("a story", "also this"):
            item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
            await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
            await until("response.text.delta")
        while (await until("response.done"))["response"]["status"] != "completed":
            pass
    engine = vowel.sessions[0]
    story, also = engine.responses
    kinds = [(e["type"], _response_of(e)) for e in engine.sent]
    cut = kinds.index(("response.done", story.id))
    assert kinds.index(("response.created", also.id)) < cut  # the new one started first
    assert story.id not in [r for _, r in kinds[cut + 1 :]]  # nothing more of the cut reply
    assert [t for t, r in kinds if r == story.id and t.endswith(".done")] == ["response.done"]
    assert engine.sent_of_type("response.done")[0]["response"] == _cancelled(story.id, "client_cancelled")
    assert (story.status, also.status, also.text) == ("cancelled", "completed", "Ok.")


@contextlib.asynccontextmanager
async def _engine_with_tools(
    vowel: VowelSimulator, *names: str
) -> AsyncIterator[tuple[Any, Callable[[str], Awaitable[dict[str, Any]]]]]:
    """A raw engine socket with a minted token, the functions ``names`` declared and their
    ``session.updated`` read; with ``until(kind)``, which reads up to the next event of that type."""
    async with aiohttp.ClientSession() as http:
        token = await VowelCore(http, vowel.core_url, vowel.api_key).mint(
            trusted_session_request(service_id="s", provider="vowel-prime", tools=[])
        )
    tools = [
        {"type": "function", "name": n, "description": f"Tool {n}.", "parameters": {"type": "object"}}
        for n in names
    ]
    async with connect(
        f"ws://127.0.0.1:{vowel.port}/engine/v1/realtime",
        additional_headers={"Authorization": f"Bearer {token.value}"},
    ) as ws:

        async def until(kind: str) -> dict[str, Any]:
            async with asyncio.timeout(5):
                while (event := json.loads(await ws.recv()))["type"] != kind:
                    pass
            return event

        await ws.recv()  # session.created
        await ws.send(json.dumps({"type": "session.update", "session": {"tools": tools}}))
        await until("session.updated")
        yield ws, until


async def _call_announced(
    vowel: VowelSimulator, ws: Any, until: Callable[[str], Awaitable[dict[str, Any]]]
) -> str:
    """Ask the engine to "do one": its response announces a call of ``a``; its call id."""
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "do one"}]}
    await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
    assert (await until("response.done"))["response"]["status"] == "incomplete"
    (call_id,) = vowel.sessions[0].responses[0].call_ids
    return call_id


def _output(call_id: str) -> str:
    """A ``function_call_output`` for ``call_id``, as a frame."""
    item = {"type": "function_call_output", "call_id": call_id, "output": "ok"}
    return json.dumps({"type": "conversation.item.create", "item": item})


@pytest.mark.vowel_early_create
async def test_the_engine_answers_a_create_at_once_even_with_an_announced_call_unanswered(
    vowel: VowelSimulator,
) -> None:
    """The engine answers a response.create at once, from the conversation as it stands: one sent before
    the call it announced has its output starts a reply whose model sees that call unanswered (its
    output counts as ""), and is noted; the output that comes later starts nothing."""
    outputs: list[ToolOutputs] = []

    def reply(done: ToolOutputs) -> str:
        outputs.append(done)
        return "Half done."

    vowel.script([when("one", calls=[("a", {})], reply=reply)])
    async with _engine_with_tools(vowel, "a") as (ws, until):
        call_id = await _call_announced(vowel, ws, until)

        await ws.send(json.dumps({"type": "response.create"}))  # the output still due
        assert (await until("response.created"))["response"]["status"] == "in_progress"
        assert (await until("response.done"))["response"]["status"] == "completed"
        await ws.send(_output(call_id))
        await until("conversation.item.created")
        await ws.send(json.dumps({"type": "response.create"}))  # (a mark: whatever came before is out)
        await until("response.done")
    engine = vowel.sessions[0]
    assert [(r.trigger, r.text) for r in engine.responses] == [
        ("user_text", ""),
        ("response.create", "Half done."),
        ("response.create", "Half done."),
    ]
    assert outputs[0].calls == (("a", ""),) and outputs[1].calls == (("a", "ok"),)
    assert engine.notes == [
        f"response.create before function_call_output for {call_id}: answered at once, the calls unanswered"
    ]


async def test_the_vowel_fixture_fails_a_test_whose_client_sent_a_create_early(
    request: pytest.FixtureRequest,
) -> None:
    """A client that sends response.create before every output of the engine's calls is in (the engine
    answers it at once, the calls unanswered) fails the test that used the ``vowel`` fixture, unless the
    test is marked ``vowel_early_create``."""
    for marked in (False, True):
        if marked:
            request.node.add_marker(pytest.mark.vowel_early_create)
        fixture = pytest_plugin.vowel.__wrapped__(request)  # type: ignore[attr-defined]
        try:
            sim = await anext(fixture)
            sim.script([when("one", calls=[("a", {})], reply="Half done.")])
            async with _engine_with_tools(sim, "a") as (ws, until):
                call_id = await _call_announced(sim, ws, until)
                await ws.send(json.dumps({"type": "response.create"}))
                await until("response.done")
            if marked:
                with pytest.raises(StopAsyncIteration):
                    await anext(fixture)
                continue
            with pytest.raises(pytest.fail.Exception, match="before every output") as failed:
                await anext(fixture)
            assert f"response.create before function_call_output for {call_id}" in str(failed.value)
        finally:
            await fixture.aclose()


async def test_a_tool_turn_cancelled_before_its_call_was_announced_leaves_no_output_due(
    vowel: VowelSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a call the engine announced awaits its output: one its response never got to announce (it
    was cancelled first) holds back no create, and the response the create starts makes it, its
    preamble said again (the model saw neither)."""
    vowel.script([when("look", preamble="Looking.", calls=[("a", {})], reply="Looked.")])
    paces, gate = [0], asyncio.Event()

    async def pace(self: VowelSimulator) -> None:
        paces[0] += 1
        if paces[0] == 3:  # after response.created and the preamble's word: the call's own
            await gate.wait()

    monkeypatch.setattr(VowelSimulator, "_pace", pace)
    async with _engine_with_tools(vowel, "a") as (ws, until):
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "look"}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        await until("response.text.delta")  # the preamble's word
        await ws.send(json.dumps({"type": "response.cancel"}))
        assert (await until("response.done"))["response"]["status"] == "cancelled"
        await ws.send(json.dumps({"type": "response.create"}))
        assert (await until("response.done"))["response"]["status"] == "incomplete"  # answered at once
    engine = vowel.sessions[0]
    assert engine.responses[0].call_ids == [] and len(engine.responses[1].call_ids) == 1
    assert [r.text for r in engine.responses] == ["Looking.", "Looking."] and engine.notes == []


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("preamble", ["Let me look.", None])
async def test_a_response_that_calls_tools_plays_as_the_engine_plays_it(
    vowel: VowelSimulator, preamble: str | None, batch: bool
) -> None:
    """The engine opens every response's message first (index 0, in progress, empty, and its text
    part); a preamble's words stream as text (a one-sentence preamble is never voiced); the first call
    is announced at index 1, then the preamble's response.text.done, alone; the message never
    completes, and the response ends incomplete with output []. The model's next call comes in the
    response the client's create starts once the first's output is in, without a preamble. An engine
    build that batches a stream's calls announces both in the one response, after the text.done."""
    vowel.batch_calls = batch
    vowel.script([when("look", preamble=preamble, calls=[("a", {}), ("b", {})], reply="Looked.")])
    async with _engine_with_tools(vowel, "a", "b") as (ws, until):
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "look"}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        done = await until("response.done")
        engine = vowel.sessions[0]
        start = next(i for i, e in enumerate(engine.sent) if e["type"] == "response.created")
        events = engine.sent[start:]
        for call_id in engine.responses[0].call_ids:
            await ws.send(_output(call_id))
            await until("conversation.item.created")
        await ws.send(json.dumps({"type": "response.create"}))
        assert (await until("response.done"))["response"]["status"] == (
            "completed" if batch else "incomplete"
        )
    said = [("response.text.delta", 0), ("response.text.delta", 0), ("response.text.delta", 0)]
    text_done = [("response.text.done", 0)] if preamble else []
    calls = [("response.output_item.added", 1)] * (2 if batch else 1)
    assert [(e["type"], e.get("output_index")) for e in events] == [
        ("response.created", None),
        ("response.output_item.added", 0),
        ("response.content_part.added", 0),
        *(said if preamble else []),
        *([*text_done, *calls] if batch else [*calls, *text_done]),
        ("response.done", None),
    ]
    message = events[1]["item"]
    assert (message["type"], message["status"], message["content"]) == ("message", "in_progress", [])
    assert events[2]["part"] == {"type": "text", "text": ""} and events[2]["item_id"] == message["id"]
    announced = [e for e in events if e["type"] == "response.output_item.added" and e["output_index"] == 1]
    assert [e["item"]["name"] for e in announced] == (["a", "b"] if batch else ["a"])
    if preamble:
        deltas, text = events[3:6], next(e for e in events if e["type"] == "response.text.done")
        assert {(e["item_id"], e["content_index"]) for e in [*deltas, text]} == {(message["id"], 0)}
        assert "".join(e["delta"] for e in deltas) == text["text"] == preamble
    assert done["response"]["status"] == "incomplete" and done["response"]["output"] == []
    assert done["response"]["status_details"] is None
    if not batch:  # the second response: the next call alone, no preamble
        second = [e for e in engine.sent if e.get("response_id") == engine.responses[1].id]
        assert [(e["type"], e.get("output_index")) for e in second] == [
            ("response.output_item.added", 0),
            ("response.content_part.added", 0),
            ("response.output_item.added", 1),
        ]
        assert second[-1]["item"]["name"] == "b" and engine.responses[1].text == ""
    assert [len(r.call_ids) for r in engine.responses] == ([2, 0] if batch else [1, 1])


async def test_a_preamble_voices_each_sentence_more_text_follows_never_its_last(
    vowel: VowelSimulator,
) -> None:
    """The engine voices a sentence once the whitespace after it has come, and flushes the rest only
    when a reply completes: of a preamble, the sentences before its last are heard (its audio part
    opened at content_index 1, their transcript and audio), never the last, and no transcript's done."""
    preamble = "Sure, I can do that. One moment."
    vowel.script([when("look", preamble=preamble, calls=[("a", {})], reply="Looked.")])
    async with _engine_with_tools(vowel, "a") as (ws, until):
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "look"}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        await until("response.done")
    engine = vowel.sessions[0]
    (part,) = [e for e in engine.sent if e["type"] == "response.content_part.added" and e["content_index"]]
    assert part["part"] == {"type": "audio", "transcript": ""} and part["content_index"] == 1
    transcript = engine.sent_of_type("response.output_audio_transcript.delta")
    assert [(e["delta"], e["content_index"]) for e in transcript] == [("Sure, I can do that.", 1)]
    assert len(engine.sent_of_type("response.output_audio.delta")) == 1
    assert engine.sent_of_type("response.output_audio_transcript.done") == []
    assert [e["text"] for e in engine.sent_of_type("response.text.done")] == [preamble]


async def test_a_reply_plays_as_the_engine_plays_it(vowel: VowelSimulator) -> None:
    """A completed reply: text deltas of the message's text part (content_index 0); its audio part
    (content_index 1) opened as the first sentence is voiced, that sentence's transcript and audio,
    the rest flushed at the end; response.text.done (0) before the transcript's done and the audio's
    (1), both with the whole text; the item done with both parts; response.done completed, listing it,
    status_details and usage null."""
    reply = "Your order shipped today. It should arrive on Monday."
    vowel.script([when("where", reply=reply)])
    async with _engine_with_tools(vowel) as (ws, until):
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "where"}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        done = await until("response.done")
    engine = vowel.sessions[0]
    start = next(i for i, e in enumerate(engine.sent) if e["type"] == "response.created")
    events = engine.sent[start:]
    created = events[0]["response"]
    assert (created["status_details"], created["usage"], created["output"]) == (None, None, [])
    words = ["Your", " order", " shipped", " today.", " It", " should", " arrive", " on", " Monday."]
    text = [("response.text.delta", 0)]
    voiced = [("response.output_audio_transcript.delta", 1), ("response.output_audio.delta", 1)]
    assert [(e["type"], e.get("content_index")) for e in events[3:]] == [
        *text * 5,  # (the first sentence is whole once the word after it came)
        ("response.content_part.added", 1),
        *voiced,
        *text * 4,
        *voiced,  # (the rest, flushed)
        ("response.text.done", 0),
        ("response.output_audio_transcript.done", 1),
        ("response.output_audio.done", 1),
        ("response.output_item.done", None),
        ("response.done", None),
    ]
    message = events[1]["item"]["id"]
    assert {e.get("item_id") for e in events[2:-2]} == {message}
    assert [e["delta"] for e in events if e["type"] == "response.text.delta"] == words
    transcript = [e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta"]
    assert transcript == ["Your order shipped today.", "It should arrive on Monday."]
    assert events[-5]["text"] == events[-4]["transcript"] == reply
    item_done = events[-2]["item"]
    assert (item_done["id"], item_done["status"]) == (message, "completed")
    assert item_done["content"] == [{"type": "text", "text": reply}, {"type": "audio", "transcript": reply}]
    response = done["response"]
    assert (response["status"], response["status_details"], response["usage"]) == ("completed", None, None)
    assert response["output"] == [item_done]


async def test_the_engines_items_and_an_empty_reply_are_as_the_engine_sends_them(
    vowel: VowelSimulator,
) -> None:
    """The engine's items have no ``object`` field: its message ``{id, type, status, role, content}``,
    its call ``{id, type, status, role: "assistant", name, call_id, arguments}``. A reply with no text
    streams no delta: its text part's done (empty), the item done with it, the response completed."""
    vowel.script([when("look", calls=[("a", {"q": 1})], reply="")])
    async with _engine_with_tools(vowel, "a") as (ws, until):
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "look"}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        await until("response.done")
        engine = vowel.sessions[0]
        (call_id,) = engine.responses[0].call_ids
        await ws.send(_output(call_id))
        await until("conversation.item.created")
        await ws.send(json.dumps({"type": "response.create"}))
        done = await until("response.done")
    message, call = (e["item"] for e in engine.sent_of_type("response.output_item.added")[:2])
    assert list(message) == ["id", "type", "status", "role", "content"]
    assert list(call) == ["id", "type", "status", "role", "name", "call_id", "arguments"]
    assert (call["role"], call["arguments"]) == ("assistant", '{"q":1}')
    reply = [e for e in engine.sent if _response_of(e) == engine.responses[1].id]
    assert [e["type"] for e in reply] == [
        "response.created",
        "response.output_item.added",
        "response.content_part.added",
        "response.text.done",
        "response.output_item.done",
        "response.done",
    ]
    assert reply[3]["text"] == "" and "object" not in reply[4]["item"]
    assert reply[4]["item"]["content"] == [{"type": "text", "text": ""}]
    assert done["response"]["status"] == "completed" and done["response"]["output"] == [reply[4]["item"]]


async def test_a_reply_the_engines_turn_detection_cuts_plays_as_the_engine_plays_it(
    vowel: VowelSimulator,
) -> None:
    """A reply the engine's turn detection cuts: its words so far (a sentence voiced once the next word
    came), then response.done cancelled alone (``turn_detected``, no output, no usage): no flush of the
    rest, none of its message's done events."""
    vowel.script([when("noise", reply="Sure, I can check that. Let me", ends="cancelled")])
    async with _engine_with_tools(vowel) as (ws, until):
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "noise"}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        done = await until("response.done")
    engine = vowel.sessions[0]
    (reply,) = engine.responses
    assert done["response"] == _cancelled(reply.id, "turn_detected") and reply.status == "cancelled"
    its = [e["type"] for e in engine.sent if _response_of(e) == reply.id]
    assert [t for t in its if t.endswith(".done")] == ["response.done"] and its[-1] == "response.done"
    assert "".join(e["delta"] for e in engine.sent_of_type("response.text.delta")) == reply.text
    heard = [e["delta"] for e in engine.sent_of_type("response.output_audio_transcript.delta")]
    assert heard == ["Sure, I can check that."]  # ("Let me" waited for more: never voiced)


async def test_a_reply_is_one_line_though_its_text_and_its_transcript_both_end(
    vowel: VowelSimulator, logs: io.StringIO
) -> None:
    """The engine ends a reply's text part (content_index 0) and its audio transcript (1) with the same
    words: the reply is one line, in the reply, the transcript, the on_transcript hooks and the log."""
    heard: list[tuple[str, str]] = []
    app = make_app()

    @app.on_transcript
    async def note(ctx: CallContext, role: str, text: str) -> None:
        heard.append((role, text))

    vowel.script([when("hello", reply="Hello there. How can I help?")])
    async with EngineSession.open(settings_for(vowel), app) as session:
        reply = await session.say("hello")
        assert await session.say("thanks") is not None
    said = vowel.sessions[0].sent_of_type("response.output_audio_transcript.done")
    assert [e["content_index"] for e in said] == [1, 1]  # (the engine's: both parts of each reply end)
    assert reply.lines == ("Hello there. How can I help?",)
    assert session.summary is not None
    agent = ["Hello there. How can I help?", "I heard you."]
    assert [t for role, t in session.summary.transcript if role == "agent"] == agent
    assert [t for role, t in heard if role == "agent"] == agent
    logged = [
        line["text"] for line in log_lines(logs) if line["event"] == "transcript" and line["role"] == "agent"
    ]
    assert logged == agent


@pytest.mark.parametrize("preamble", ["I'll note that.", None])
async def test_a_quiet_tool_called_after_a_preamble_asks_for_no_answer(
    vowel: VowelSimulator, preamble: str | None
) -> None:
    """The engine's tool turn lists nothing in response.done whatever was said; its preamble's words come
    in response.text.done alone. Played to a call machine with a quiet tool, they keep its successful
    output from asking for an answer (no response.create: the engine says nothing more); with no words
    the model is asked to answer, never leaving silence."""
    vowel.script([when("note", preamble=preamble, calls=[("note", {})], reply="Noted.")])
    async with _engine_with_tools(vowel, "note") as (ws, until):
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "note it"}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        done = await until("response.done")
    assert done["response"]["output"] == []
    machine = CallMachine(MachineConfig(session={}, quiet=frozenset({"note"})), ENGINE_CAPABILITIES)
    machine.start()
    played = [action for event in vowel.sessions[0].sent for action in machine.receive(event)]
    (run,) = [a for a in played if isinstance(a, RunTool)]
    answered = [a.event["type"] for a in machine.tool_done(run.call_id, "{}", ok=True) if isinstance(a, Send)]
    assert answered == ["conversation.item.create", *([] if preamble else ["response.create"])]


@pytest.mark.parametrize("preamble", ["Let me check.", None])
async def test_a_preamble_lands_once_and_the_turn_ends_though_its_message_never_completes(
    vowel: VowelSimulator, app: Sideband, preamble: str | None
) -> None:
    """The engine's message of a response that called tools stays open for good: its preamble's words,
    ended by response.text.done alone, are the agent's line once, and the turn ends with the reply."""
    vowel.script(
        [when("1042", preamble=preamble, calls=[("lookup_order", {"order_id": "1042"})], reply="Shipped.")]
    )
    async with EngineSession.open(settings_for(vowel), app) as session:
        reply = await session.say("Where is order 1042?")
        again = await session.say("thanks")
    assert reply.lines == ((preamble,) if preamble else ()) + ("Shipped.",) and reply.status == "completed"
    assert again.text == "I heard you."
    assert session.summary is not None
    assert [t for role, t in session.summary.transcript if role == "agent"] == [
        *([preamble] if preamble else []),
        "Shipped.",
        "I heard you.",
    ]


# ------------------------------------------------------------------------------------ conversation
async def test_tool_round_trip(vowel: VowelSimulator, app: Sideband, logs: io.StringIO) -> None:
    vowel.script(
        [
            when(
                "1042",
                calls=[("lookup_order", {"order_id": "1042"})],
                preamble="Let me check.",
                reply=lambda outputs: f"Order 1042: {json.loads(outputs['lookup_order'])['status']}.",
            )
        ]
    )
    async with EngineSession.open(settings_for(vowel), app) as session:
        reply = await session.say("Where is order 1042?")
        token = vowel.mints[-1].token
    assert reply.lines == ("Let me check.", "Order 1042: shipped.")
    assert [(t.name, t.outcome) for t in reply.tools] == [("lookup_order", "ok")]
    assert reply.ended is None
    engine = vowel.sessions[0]
    kinds = [
        e["type"] if e["type"] != "conversation.item.create" else e["item"]["type"] for e in engine.received
    ]
    # session.update first; the user's text; the tool's output; then exactly one response.create
    assert kinds == ["session.update", "message", "function_call_output", "response.create"]
    update = engine.received[0]["session"]
    assert update["instructions"] == "You are the test desk."
    assert [t["name"] for t in engine.tools] == app.tools.names()
    assert all(t["type"] == "function" for t in update["tools"])
    assert [(r.trigger, r.status) for r in engine.responses] == [
        ("user_text", "incomplete"),
        ("response.create", "completed"),
    ]
    (call_id,) = engine.outputs
    assert json.loads(engine.outputs[call_id][0]) == {
        "order_id": "1042",
        "status": "shipped",
        "carrier": "UPS",
    }
    assert engine.notes == []
    assert session.end_reason == "closed" and not session.failed
    assert engine.closed_by == "client"
    # logs: minted, connected, tool events, end, all bound to the session and the service; never the token
    lines = log_lines(logs)
    assert token is not None and token not in logs.getvalue()
    events = {line["event"] for line in lines}
    assert {"vowel.session_minted", "vowel.connected", "tool.finished", "vowel.session_ended"} <= events
    for line in lines:
        if line["event"] in (
            "vowel.session_minted",
            "vowel.connected",
            "tool.finished",
            "vowel.session_ended",
        ):
            assert line["call_id"] == session.call_id and line["service_id"] == "order-service", line
    ended = next(line for line in lines if line["event"] == "vowel.session_ended")
    assert ended["reason"] == "closed" and ended["engine_session_id"] == engine.id
    # both sides of the conversation, as on a phone call: the backend's turn is the caller's line
    said = [(t["role"], t.get("text")) for t in lines if t["event"] == "transcript"]
    assert said == [
        ("caller", "Where is order 1042?"),
        ("agent", "Let me check."),
        ("agent", "Order 1042: shipped."),
    ]
    assert session.summary is not None and session.summary.transcript[0] == ("caller", "Where is order 1042?")


async def test_a_turn_the_engine_refuses_fails_at_once_and_the_session_carries_on(
    vowel: VowelSimulator, app: Sideband, logs: io.StringIO
) -> None:
    vowel.script([when("forbidden", refuse="Message content is not allowed")])
    async with EngineSession.open(settings_for(vowel), app, reply_timeout=30) as session:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(EngineError) as caught:
            await session.say("something forbidden")
        assert loop.time() - started < 1.0  # not at the reply timeout
        assert caught.value.reason == "turn_refused" and caught.value.code == "invalid_value"
        assert caught.value.engine_message == "Message content is not allowed"
        assert "Message content is not allowed" in str(caught.value) and "\n" not in str(caught.value)
        assert session.live and session.end_reason is None
        reply = await session.say("hello again")  # the next turn goes through
    assert reply.text == "I heard you."
    assert session.end_reason == "closed" and not session.failed
    engine = vowel.sessions[0]
    assert engine.user_texts == ["hello again"] and len(engine.responses) == 1
    refused = [line for line in log_lines(logs) if line["event"] == "vowel.turn_refused"]
    assert [(r["engine_error"], r["call_id"]) for r in refused] == [("invalid_value", session.call_id)]


async def test_the_turn_after_a_refused_one_does_not_wait_for_the_refused_texts_answer(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """No answer to a refused text will come: the next turn goes out at once, not after the grace a
    turn's answer is given to start (which would take all of a short timeout: the text not sent)."""
    vowel.script([when("forbidden", refuse="Message content is not allowed")])
    async with EngineSession.open(settings_for(vowel), app) as session:
        with pytest.raises(EngineError) as caught:
            await session.say("something forbidden")
        assert caught.value.reason == "turn_refused"
        assert not session.runtime.machine.response_pending  # nothing is expected any more
        reply = await session.say("hello again", timeout=TURN_GRACE / 2)
    assert reply.text == "I heard you."
    assert vowel.sessions[0].user_texts == ["hello again"]


@pytest.mark.parametrize("code", [1012, 1000])
async def test_a_refused_turn_is_not_named_as_the_cause_of_a_later_close(
    vowel: VowelSimulator, code: int
) -> None:
    """The session carried on past a refused turn: the engine closing later (a restart) is not that
    refusal's doing, and its end names no refusal."""
    vowel.script([when("forbidden", refuse="Message content is not allowed")])
    async with EngineSession.open(settings_for(vowel), make_app()) as session:
        with pytest.raises(EngineError) as caught:
            await session.say("something forbidden")
        assert caught.value.reason == "turn_refused"
        assert session.live
        await vowel._close(vowel.sessions[0], code, "service restart")
        reason = await session.wait_closed(5)
    assert reason == ("remote_closed" if code == 1000 else "connection_lost")
    assert "not allowed" not in (session.end_message or "")


@pytest.mark.parametrize("names_an_event", [True, False])
async def test_an_error_before_the_turns_answer_fails_it_unless_it_names_another_event(
    vowel: VowelSimulator, app: Sideband, names_an_event: bool
) -> None:
    """An error while the turn's answer has yet to start is the engine's answer to the turn's text, unless
    it names the client event it answers (``error.event_id``): the turn's text carries no event id."""
    sent = asyncio.Event()
    app.on_transcript(lambda ctx, role, text: sent.set() if role == "caller" else None)
    async with EngineSession.open(settings_for(vowel), app) as session:
        engine = await vowel.wait_session()
        vowel.input_delay = 0.2  # the text is on its way: the error below comes before its answer
        turn = asyncio.ensure_future(session.say("hello"))
        await asyncio.wait_for(sent.wait(), 5)
        error: dict[str, Any] = {"type": "invalid_request_error", "code": "invalid_value", "message": "No."}
        if names_an_event:
            error["event_id"] = "evt_elsewhere"
        await vowel.send(engine, {"type": "error", "error": error})
        if names_an_event:
            assert (await turn).text == "I heard you."
        else:
            with pytest.raises(EngineError) as caught:
                await turn
            assert (caught.value.reason, caught.value.code) == ("turn_refused", "invalid_value")
    assert session.end_reason == "closed"


@pytest.mark.parametrize("answer_started", [True, False])
async def test_a_fatal_error_on_a_turn_ends_the_session_with_the_engines_reason(
    vowel: VowelSimulator, app: Sideband, answer_started: bool
) -> None:
    """The engine fails (``error``, then ``response.done`` failed and close 1011) during the turn's
    answer, or before it starts: no refusal of the turn's text (that is an ``invalid_request_error``),
    the session's end."""
    vowel.script([when("crash", fatal=True)])
    sent = asyncio.Event()
    app.on_transcript(lambda ctx, role, text: sent.set() if role == "caller" else None)
    async with EngineSession.open(settings_for(vowel), app) as session:
        engine = await vowel.wait_session()
        if not answer_started:
            vowel.input_delay = 0.2  # the text is on its way: the engine fails before its answer
        turn = asyncio.ensure_future(session.say("crash now" if answer_started else "hello"))
        if not answer_started:
            await asyncio.wait_for(sent.wait(), 5)
            await vowel.crash(engine, "The model provider failed")
        with pytest.raises(EngineError) as caught:
            await turn
        await session.wait_closed(5)
    assert caught.value.reason == "engine_error" and caught.value.code is None
    assert "The model provider failed" in str(caught.value)
    assert session.end_reason == "engine_error" and session.failed


async def test_a_reply_cut_short_that_nothing_follows_ends_the_turn(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """The engine's turn detection stops a reply on a noise (``cancelled``) and no response follows: the
    turn ends there, the session carries on."""
    ends = "cancelled"
    vowel.script([when("noise", reply="Let me", ends=ends)])
    async with EngineSession.open(settings_for(vowel), app, reply_timeout=60) as session:
        async with asyncio.timeout(10):  # (not the reply_timeout)
            reply = await session.say("noise")
            assert (reply.status, reply.tools, reply.lines) == (ends, (), ())  # (words never voiced)
            assert reply.response_id == vowel.sessions[0].responses[-1].id
            after = await session.say("hello again")
        assert (after.text, after.status) == ("I heard you.", "completed")
        assert session.live
    assert [r.status for r in vowel.sessions[0].responses] == [ends, "completed"]


@pytest.mark.xfail(
    strict=True,
    reason="the engine sends none of a cut reply's done events, and agent lines come from those alone",
)
async def test_a_reply_cut_after_a_voiced_sentence_keeps_what_the_caller_heard(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """The engine's turn detection cuts a reply after its first sentence was voiced (its transcript delta
    and audio went out): the caller heard that sentence, so the turn's reply and the call's transcript
    hold it, though the engine ends the cut reply with its response.done alone."""
    vowel.script([when("noise", reply="Sure, I can check that. Let me", ends="cancelled")])
    async with EngineSession.open(settings_for(vowel), app) as session:
        reply = await session.say("noise", timeout=5)
        engine = vowel.sessions[0]
        heard = [e["delta"] for e in engine.sent_of_type("response.output_audio_transcript.delta")]
        assert heard == ["Sure, I can check that."] and reply.status == "cancelled"
        assert reply.lines == ("Sure, I can check that.",)


async def test_a_cancelled_reply_another_follows_does_not_end_the_turn(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """A reply cancelled by a response of ours asked for meanwhile (a hook's text) is not the turn's end:
    the answer that follows is waited for. (The engine starts that answer first: its response.created
    comes before the cut reply's response.done.)"""
    vowel.event_delay = 0.01
    vowel.script([when("story", reply="once upon a time " * 4), when("also", reply="Noted.")])
    async with EngineSession.open(settings_for(vowel), app) as session:
        turn = asyncio.ensure_future(session.say("a story"))
        engine = vowel.sessions[0]
        await vowel.wait_for(lambda _: bool(engine.sent_of_type("response.text.delta")), what="the reply")
        session.runtime.send_text("also this")  # the engine answers it, cancelling the story
        reply = await asyncio.wait_for(turn, 10)
    assert reply.status == "completed" and reply.text.endswith("Noted.")
    assert [r.status for r in engine.responses] == ["cancelled", "completed"]


async def test_a_turn_whose_model_calls_tools_one_after_another_runs_each_and_replies_once(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """The engine announces one call a response: the turn's first response asks for the first lookup;
    its output and a response.create go back, and the next response asks for the second; the reply
    comes after that one's output. Each call runs once, in order, and the turn's reply lists both."""
    ORDERS["7"] = {"status": "packed"}
    try:
        calls = [("lookup_order", {"order_id": "1042"}), ("lookup_order", {"order_id": "7"})]
        vowel.script([when("both", calls=calls, preamble="Let me check.", reply="Both found.")])
        async with EngineSession.open(settings_for(vowel), app) as session:
            reply = await session.say("Where are both orders?", timeout=5)
    finally:
        del ORDERS["7"]
    engine = vowel.sessions[0]
    assert [(r.trigger, r.status, len(r.call_ids)) for r in engine.responses] == [
        ("user_text", "incomplete", 1),
        ("response.create", "incomplete", 1),
        ("response.create", "completed", 0),
    ]
    first, second = (r.call_ids[0] for r in engine.responses[:2])
    kinds = [
        e["item"].get("call_id", e["type"]) if e["type"] == "conversation.item.create" else e["type"]
        for e in engine.received
        if e["type"] in ("conversation.item.create", "response.create")
    ]
    assert kinds[-4:] == [first, "response.create", second, "response.create"]
    assert [json.loads(engine.outputs[c][0])["status"] for c in (first, second)] == ["shipped", "packed"]
    assert [(t.name, t.call_id, t.outcome) for t in reply.tools] == [
        ("lookup_order", first, "ok"),
        ("lookup_order", second, "ok"),
    ]
    assert reply.lines == ("Let me check.", "Both found.") and reply.status == "completed"
    assert engine.notes == []


async def test_a_reply_callable_gets_every_output_of_a_tool_called_twice(
    vowel: VowelSimulator, app: Sideband
) -> None:
    def both(outputs: ToolOutputs) -> str:
        each = " / ".join(f"{name} {json.loads(output)['status']}" for name, output in outputs.calls)
        last = json.loads(outputs["lookup_order"])["status"]  # (by name: the last call's, as before)
        return f"{each} ({len(outputs.of('lookup_order'))}, last {last})"

    ORDERS["7"] = {"status": "packed"}
    try:
        calls = [("lookup_order", {"order_id": "1042"}), ("lookup_order", {"order_id": "7"})]
        vowel.script([when("both", calls=calls, reply=both)])
        async with EngineSession.open(settings_for(vowel), app) as session:
            reply = await session.say("Where are both orders?", timeout=5)
    finally:
        del ORDERS["7"]
    assert reply.text == "lookup_order shipped / lookup_order packed (2, last packed)"


@pytest.mark.parametrize("batch", [False, True])
async def test_tool_failures_reach_the_model(vowel: VowelSimulator, app: Sideband, batch: bool) -> None:
    """Each failure reaches the model as its call's output, and the turn's reply lists every call: the
    engine asks for one call a response (a response.create after each output), or, on builds that batch
    a stream's calls, all four in one (every output, then one response.create)."""
    vowel.batch_calls = batch
    vowel.script(
        [
            when(
                "everything",
                calls=[
                    ("broken", {}),
                    ("slow", {}),
                    ("no_such_tool", {}),
                    ("lookup_order", "{not json"),
                ],
                reply="Sorry, that did not work.",
            )
        ]
    )
    async with EngineSession.open(settings_for(vowel), app) as session:
        reply = await session.say("Try everything")
    engine = vowel.sessions[0]
    by_name = {
        call["item"]["name"]: json.loads(engine.outputs[call["item"]["call_id"]][0])
        for call in engine.sent_of_type("response.output_item.added")
        if call["item"]["type"] == "function_call"
    }
    assert by_name["broken"]["error"] == "tool_failed"
    assert "secret" not in json.dumps(by_name)
    assert by_name["slow"]["error"] == "timeout"
    assert by_name["no_such_tool"]["error"] == "unknown_tool"
    assert by_name["lookup_order"]["error"] == "invalid_arguments"
    assert sorted(t.outcome for t in reply.tools) == ["error", "invalid_arguments", "timeout", "unknown_tool"]
    assert reply.text == "Sorry, that did not work."
    assert [len(r.call_ids) for r in engine.responses] == ([4, 0] if batch else [1, 1, 1, 1, 0])
    assert len(engine.received_of_type("response.create")) == (1 if batch else 4)
    assert engine.notes == []  # (each create came once every output it was owed was in)


async def test_a_call_announced_twice_runs_once(vowel: VowelSimulator, app: Sideband) -> None:
    ran: list[str] = []
    app.on_tool(lambda ctx, record: ran.append(record.call_id))
    vowel.script(
        [when("1042", calls=[("lookup_order", {"order_id": "1042"})], repeat_calls=True, reply="ok")]
    )
    async with EngineSession.open(settings_for(vowel), app) as session:
        reply = await session.say("order 1042")
    engine = vowel.sessions[0]
    announced = [
        e["item"]["call_id"]
        for e in engine.sent_of_type("response.output_item.added")
        if e["item"]["type"] == "function_call"
    ]
    assert len(announced) == 2 and len(set(announced)) == 1
    assert ran == announced[:1]
    assert engine.outputs == {announced[0]: [engine.outputs[announced[0]][0]]}
    assert len(reply.tools) == 1


class _ModelMadeIds:
    """The simulator's ``secrets``, its call ids all ``call_1``: an engine that passes on the ids the model
    made up gives the same one every turn."""

    def __getattr__(self, name: str) -> Any:
        return getattr(secrets, name)

    @staticmethod
    def token_hex(nbytes: int | None = None) -> str:
        return "1" if nbytes == 8 else secrets.token_hex(nbytes)  # (8: a call id's)


@pytest.fixture
def model_made_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulated engine gives every tool call the id ``call_1``; a tool's round is answered past its
    deadline at once (0.1 s grace)."""
    monkeypatch.setattr("sideband.testing.vowel.secrets", _ModelMadeIds())
    monkeypatch.setattr("sideband.runtime.driver.OVERDUE_GRACE", 0.1)


def a_tool_that_swallows_its_timeout(app: Sideband) -> tuple[asyncio.Event, list[asyncio.Task[Any]]]:
    """Give ``app`` a tool ``stubborn`` (0.2 s timeout) that swallows its cancellation and returns once the
    event is set; the list gets its task."""
    release = asyncio.Event()
    running: list[asyncio.Task[Any]] = []

    @app.tool(timeout=0.2, filler_after=None)
    async def stubborn() -> str:
        """Swallows its cancellation."""
        task = asyncio.current_task()
        assert task is not None
        running.append(task)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()
        return "late"

    return release, running


@pytest.mark.usefixtures("model_made_ids")
async def test_a_call_id_used_again_after_a_round_answered_past_its_deadline_is_answered(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """The first ``call_1`` swallows its timeout's cancellation: it is answered past its deadline and runs
    on. The next turn's ``call_1`` is a new call, answered as any other; what the first does later counts
    for nothing."""
    release, running = a_tool_that_swallows_its_timeout(app)
    vowel.script(
        [
            when("one", calls=[("stubborn", {})], reply="Sorry."),
            when("two", calls=[("lookup_order", {"order_id": "1042"})], reply="Shipped."),
        ]
    )
    async with EngineSession.open(settings_for(vowel), app) as session:
        first = await session.say("one", timeout=5)
        second = await session.say("two", timeout=5)  # (the first call_1 still runs)
        assert not running[0].done()
        release.set()
        assert await asyncio.wait_for(running[0], 5) is None
        engine = vowel.sessions[0]
        outputs = [json.loads(output) for output in engine.outputs["call_1"]]
    assert [(t.call_id, t.outcome) for t in first.tools] == [("call_1", "timeout")]
    assert [(t.call_id, t.outcome) for t in second.tools] == [("call_1", "ok")]
    assert second.text == "Shipped."
    assert outputs == [
        {"error": "timeout", "message": "The tool took longer than 0.2 s"},
        {"order_id": "1042", "status": "shipped", "carrier": "UPS"},
    ]
    assert [t.outcome for t in session.runtime.summary.tools] == ["timeout", "ok"]


@pytest.mark.usefixtures("model_made_ids")
async def test_a_round_answered_past_its_deadline_ending_late_leaves_a_later_run_of_its_id_to_the_end(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """The first ``call_1`` ends late while the next turn's ``call_1`` runs: the session's end still
    cancels and awaits the later one."""
    release, running = a_tool_that_swallows_its_timeout(app)
    started, cancelled = asyncio.Event(), asyncio.Event()

    @app.tool(timeout=30, filler_after=None)
    async def hang() -> str:
        """Blocks until cancelled."""
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return "never"

    vowel.script([when("one", calls=[("stubborn", {})], reply="Sorry."), when("two", calls=[("hang", {})])])
    session = EngineSession.open(settings_for(vowel), app, end_cap=0.2)
    async with session:
        await session.say("one", timeout=5)
        turn = asyncio.create_task(session.say("two", timeout=10))
        await asyncio.wait_for(started.wait(), 5)
        release.set()
        assert await asyncio.wait_for(running[0], 5) is None  # its run is over: the later one runs on
        assert not cancelled.is_set()
    with pytest.raises(EngineError):
        await turn
    assert cancelled.is_set()
    runtime = session.runtime
    assert [(t.name, t.outcome) for t in runtime.summary.tools] == [
        ("stubborn", "timeout"),
        ("hang", "cancelled"),
    ]
    assert runtime._tool_tasks == {}


async def test_app_hooks_can_be_left_out(vowel: VowelSimulator, app: Sideband) -> None:
    seen: list[str] = []
    app.on_tool(lambda ctx, record: seen.append(f"tool {ctx.source}"))
    app.on_call_end(lambda ctx, summary: seen.append(f"end {summary.reason}"))
    vowel.script([when("1042", calls=[("lookup_order", {"order_id": "1042"})], reply="ok")])
    async with EngineSession.open(settings_for(vowel), app, app_hooks=False) as quiet:
        assert len((await quiet.say("order 1042")).tools) == 1
    assert seen == []
    async with EngineSession.open(settings_for(vowel), app) as session:
        await session.say("order 1042")
    assert seen == ["tool vowel", "end closed"]


def test_the_transfer_tool_is_left_out_of_engine_sessions(vowel: VowelSimulator) -> None:
    """A transfer needs a phone call (a SIP REFER): offered on an engine session it could only fail."""
    app = Sideband(instructions="x", transfer_targets={"human": "tel:+14155550123"})
    app.enable_transfer()
    app.enable_end_call()
    session = EngineSession(settings_for(vowel), app)
    assert session.tools.names() == ["end_call"]
    with pytest.raises(ValueError, match="'transfer_call' transfers phone calls"):
        EngineSession(settings_for(vowel), app, tools=["transfer_call"])


async def test_agent_ending_the_session_is_a_clean_end(vowel: VowelSimulator, app: Sideband) -> None:
    vowel.script([when("bye", calls=[("end_call", {})], reply="Goodbye!")])
    session = EngineSession.open(settings_for(vowel), app)
    async with session:
        reply = await session.say("bye now")
        assert await session.wait_closed(5) == "end_call_tool"
        with pytest.raises(EngineError):
            await session.say("are you there?")
    assert reply.text == "Goodbye!" and reply.ended == "end_call_tool"
    assert not session.failed


# ---------------------------------------------------------------------------------------- ending
@pytest.mark.parametrize(
    ("advance", "reason"),
    [(31 * 60, "max_call_duration_exceeded"), (11 * 60, "max_idle_duration_exceeded")],
)
async def test_engine_limits_end_the_session(
    vowel: VowelSimulator, app: Sideband, advance: float, reason: str
) -> None:
    vowel.max_idle_duration = 10 * 60
    async with EngineSession.open(settings_for(vowel), app) as session:
        await session.send_audio(speech(100))  # speech: idle time starts counting
        await vowel.wait_for(lambda v: bool(v.sessions[0].audio_chunks), what="the speech")
        vowel.advance(advance)
        with pytest.raises(EngineError) as caught:
            await session.say("still there?")  # limits are checked when a client message arrives
    assert caught.value.reason == reason and reason in str(caught.value)
    assert session.end_reason == reason and session.failed
    engine = vowel.sessions[0]
    assert engine.close_code == 1000 and engine.end_reason == reason


async def test_our_own_max_duration_ends_an_idle_session(vowel: VowelSimulator, app: Sideband) -> None:
    session = EngineSession.open(settings_for(vowel, max_call_duration=0.2), app)
    async with session:
        assert await session.wait_closed(5) == "max_duration"  # the engine alone would never notice
    assert session.failed and "SIDEBAND_MAX_CALL_SECONDS" in (session.end_message or "")
    engine = vowel.sessions[0]
    goodbye = engine.responses[-1]
    assert goodbye.trigger == "response.create" and goodbye.instructions and goodbye.status == "completed"
    assert engine.closed_by == "client"


@pytest.mark.parametrize("ending", ["limit_goodbye", "agent_hangup"])
async def test_an_end_with_last_words_closes_once_their_response_is_done_not_at_the_cap(
    vowel: VowelSimulator, app: Sideband, logs: io.StringIO, ending: str
) -> None:
    """The engine sends no playback events (its audio comes to us): an end that waits for the model's
    last words (a limit's goodbye, or the reply after a tool hung up) closes at their ``response.done``,
    never held until ``end_cap`` (an hour here, far past the wait)."""
    if ending == "limit_goodbye":
        session = EngineSession.open(settings_for(vowel, max_call_duration=0.2), app, end_cap=3600)
        reason = "max_duration"
    else:
        vowel.script([when("bye", calls=[("end_call", {})], reply="Goodbye!")])
        session = EngineSession.open(settings_for(vowel), app, end_cap=3600)
        reason = "end_call_tool"
    async with session:
        if ending == "agent_hangup":
            reply = await session.say("bye now")
            assert reply.text == "Goodbye!" and reply.ended == reason
        assert await session.wait_closed(5) == reason
    engine = vowel.sessions[0]
    last = engine.responses[-1]
    assert last.trigger == "response.create" and last.status == "completed"
    # The close came right after the last words were done; the end cap's timer did not force it.
    assert engine.sent[-1]["type"] == "response.done" and engine.sent[-1]["response"]["id"] == last.id
    assert engine.closed_by == "client"
    events = [line["event"] for line in log_lines(logs)]
    assert "call.ending" in events and "call.end_forced" not in events


async def test_the_engine_limits_end_the_session_with_our_goodbye_first(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """The engine acts on its limits only when a message arrives, and its clock starts before ours: our
    timers fire a little before its limits, so the goodbye goes out in time, whether the token claims a
    limit or the engine's defaults apply."""
    async with EngineSession.open(settings_for(vowel, max_call_duration=3600.0), app) as session:
        config = session.runtime.machine.config
        # (5 s, and end_cap's 5 s for the tools' outputs, before the engine's 30 minutes)
        assert (config.max_call_duration, config.max_idle_duration) == (30 * 60 - 10, 30.0)
    # (3 s: ours fires at 2.7 s, leaving the goodbye 0.3 s however busy the machine)
    vowel.max_call_duration, vowel.max_idle_duration, vowel.claim_limits = 3.0, 3600.0, True
    session = EngineSession.open(settings_for(vowel), app)
    async with session:
        assert await session.wait_closed(10) == "max_duration"
    engine = vowel.sessions[-1]
    goodbye = engine.responses[-1]
    assert goodbye.trigger == "response.create" and goodbye.instructions and goodbye.status == "completed"
    assert engine.end_reason != "max_call_duration_exceeded" and engine.closed_by == "client"


async def test_fatal_engine_error_ends_without_reattaching(vowel: VowelSimulator, app: Sideband) -> None:
    vowel.script([when("boom", fatal=True)])
    async with EngineSession.open(settings_for(vowel), app) as session:
        with pytest.raises(EngineError) as caught:
            await session.say("boom")
    assert caught.value.reason == "engine_error" and "1011" in str(caught.value)
    engine = vowel.sessions[0]
    assert engine.close_code == 1011
    assert [e["response"]["status"] for e in engine.sent_of_type("response.done")][-1] == "failed"
    assert len(vowel.mints) == 1 and len(vowel.handshakes) == 1  # no re-attach loop


async def test_crash_while_idle_is_reported(vowel: VowelSimulator, app: Sideband) -> None:
    async with EngineSession.open(settings_for(vowel), app) as session:
        await vowel.crash(vowel.sessions[0], "disk on fire")
        assert await session.wait_closed(5) == "engine_error"
    assert session.end_message is not None and "disk on fire" in session.end_message


async def test_a_bare_crash_is_reported_as_an_engine_error(vowel: VowelSimulator, app: Sideband) -> None:
    """A crash (PROTOCOL C5): close 1011 and nothing before it, no error event to say why."""
    async with EngineSession.open(settings_for(vowel), app) as session:
        await vowel.crash(vowel.sessions[0], bare=True)
        assert await session.wait_closed(5) == "engine_error"
        with pytest.raises(EngineError) as caught:
            await session.say("hello?")
    assert caught.value.reason == "engine_error" and session.failed
    engine = vowel.sessions[0]
    assert (engine.close_code, engine.closed_by) == (1011, "engine")
    assert [e["type"] for e in engine.sent] == ["session.created", "session.updated"]  # (not a word)


async def test_lost_engine_socket_ends_the_session_without_reattaching(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """An engine session lives and dies with its socket: a new socket would be a new conversation."""
    async with EngineSession.open(settings_for(vowel), app) as session:
        await vowel.drop(vowel.sessions[0])  # no close frame: an abnormal close
        await session.wait_closed()
        assert session.end_reason == "connection_lost"
        with pytest.raises(EngineError) as info:
            await session.say("hello?")
    assert info.value.reason == "connection_lost"
    assert len(vowel.mints) == 1 and len(vowel.sessions) == 1


@pytest.mark.parametrize("waiting", [False, True])
@pytest.mark.parametrize("ending", ["drop", "close"])
async def test_a_turn_under_way_fails_as_the_session_ends_not_after_its_teardown(
    vowel: VowelSimulator, app: Sideband, logs: io.StringIO, ending: str, waiting: bool
) -> None:
    """The engine's socket is lost (or code closes the session) while a turn's tool runs (or, ``waiting``,
    a hook's text's tool, which the turn waits for before its text goes out); the runtime's teardown then
    takes its time (the tool's cleanup, an ``on_call_end`` hook). The turn fails at once with the
    session's end, the session is no longer live, and every place names the same end."""
    started, cleanup, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    seen: list[str] = []

    @app.tool(timeout=30)
    async def export() -> str:
        """Exports, and rolls back when cancelled."""
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleanup.set()
            await release.wait()  # a rollback, past end_cap (and ignoring a cancellation within it)
        return "never"

    @app.on_call_end
    async def file_ticket(ctx: CallContext, summary: Any) -> None:
        seen.append(summary.reason)
        await release.wait()  # within an on_call_end hook's 10 s

    if waiting:
        app.on_call_start(lambda ctx: ctx.send_text("export please"))
    vowel.script([when("export", calls=[("export", {})], reply="ok"), when("hello", reply="Hi.")])
    session = EngineSession.open(settings_for(vowel), app, end_cap=0.1)
    expected = "connection_lost" if ending == "drop" else "closed"
    try:
        async with session:
            if waiting:
                await asyncio.wait_for(started.wait(), 5)
            turn = asyncio.ensure_future(session.say("hello" if waiting else "export please", timeout=30))
            await asyncio.wait_for(started.wait(), 5)
            if ending == "drop":
                await vowel.drop(vowel.sessions[0])
                closing = None
            else:
                closing = asyncio.ensure_future(session.close())
            await asyncio.wait_for(cleanup.wait(), 5)
            done, _ = await asyncio.wait({turn}, timeout=5)
            assert done, "the turn waited for the runtime's teardown"
            assert not session.live and session.end_reason == expected
            if waiting:  # (its text waited for the hook's tool: never sent)
                assert vowel.sessions[0].user_texts == ["export please"]
            with pytest.raises(EngineError) as caught:
                await turn
            assert caught.value.reason == expected
            # (the summary is there already: what the call said, to log as the turn fails)
            assert session.summary is not None and session.summary.reason == expected
            assert ("caller", "export please") in session.summary.transcript
            with pytest.raises(EngineError):
                await session.say("still there?")
            release.set()
            if closing is not None:
                assert await closing == expected
            assert await session.wait_closed(10) == expected
    finally:
        release.set()
    assert session.summary is not None and session.summary.reason == expected
    assert seen == [expected]
    assert session.failed == (ending == "drop")
    lines = log_lines(logs)
    assert [e["reason"] for e in lines if e["event"] == "call.ended"] == [expected]
    assert [e["reason"] for e in lines if e["event"] == "vowel.session_ended"] == [expected]


# ------------------------------------------------------------------------------------------ audio
async def test_send_audio_chunks_are_never_below_2048_bytes(vowel: VowelSimulator, app: Sideband) -> None:
    pieces = [bytes([n % 251 + 1]) * size for n, size in enumerate([100, 3000, 1000, 5000, 37, 40000, 2047])]
    async with EngineSession.open(settings_for(vowel), app) as session:
        for piece in pieces:
            await session.send_audio(piece)
        await session.flush_audio()
        await session.say("that was audio")  # same socket, in order: the audio is in by now
    engine = vowel.sessions[0]
    sent = b"".join(pieces)
    assert engine.audio_chunks and min(engine.audio_chunks) >= 2048
    assert bytes(engine.audio[: len(sent)]) == sent
    assert bytes(engine.audio[len(sent) :]) == bytes(len(engine.audio) - len(sent))  # silence padding
    assert engine.sent_of_type("error") == []
    for event in engine.received_of_type("input_audio_buffer.append"):
        assert len(base64.b64decode(event["audio"])) % 2 == 0


async def test_simulator_refuses_small_audio_chunks(
    vowel: VowelSimulator, app: Sideband, logs: io.StringIO
) -> None:
    """The engine closes (1003) after an ``error`` naming why: the session's end is that error's code,
    in the session, its summary, what ``on_call_end`` gets and every log line about its end."""
    seen: list[str] = []
    app.on_call_end(lambda ctx, summary: seen.append(summary.reason))
    async with EngineSession.open(settings_for(vowel), app) as session:
        session.runtime.send_event(
            {"type": "input_audio_buffer.append", "audio": base64.b64encode(b"ab").decode()}
        )
        assert await session.wait_closed(5) == "invalid_audio_chunk"
    assert vowel.sessions[0].close_code == 1003
    assert session.failed and "(1003): invalid_audio_chunk" in (session.end_message or "")
    assert session.summary is not None and session.summary.reason == "invalid_audio_chunk"
    assert seen == ["invalid_audio_chunk"]
    lines = log_lines(logs)
    assert [e["reason"] for e in lines if e["event"] == "call.ended"] == ["invalid_audio_chunk"]
    assert [e["reason"] for e in lines if e["event"] == "vowel.session_ended"] == ["invalid_audio_chunk"]


# ------------------------------------------------------------------------------------- lifecycle
def _foreign(task: asyncio.Task[Any]) -> bool:
    """A server-side aiohttp connection handler (the simulator's, not ours)."""
    return "aiohttp" in getattr(task.get_coro(), "__qualname__", "") or "RequestHandler" in repr(
        task.get_coro()
    )


async def test_everything_is_released_on_exit(vowel: VowelSimulator, app: Sideband) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    @app.tool(timeout=30)
    async def hang() -> str:
        """Blocks until cancelled."""
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return "never"

    vowel.script([when("hang", calls=[("hang", {})], reply="done")])
    before = asyncio.all_tasks()
    session = EngineSession.open(settings_for(vowel), app, end_cap=0.2)
    async with session:
        turn = asyncio.create_task(session.say("hang please"))
        await asyncio.wait_for(started.wait(), 5)
    with pytest.raises(EngineError):
        await turn
    assert cancelled.is_set()
    runtime = session.runtime
    assert session._task is not None and session._task.done()
    assert runtime._tool_tasks == {} and runtime._side_tasks == set()
    assert runtime._deadlines == {} and runtime._alarm is None
    assert session._ws is not None and session._ws.state is State.CLOSED
    assert session._http is None
    leftover = [t for t in asyncio.all_tasks() - before if not t.done() and not _foreign(t)]
    assert leftover == []


async def test_close_awaits_the_runtime_end_in_full(vowel: VowelSimulator, app: Sideband) -> None:
    """A tool's cleanup after its cancellation, then an ``on_call_end`` hook: both within the runtime's
    own bounds, and both past ``end_cap`` + 2 s, which close() once allowed before cancelling it all."""
    started = asyncio.Event()
    done: list[str] = []

    @app.tool(timeout=30)
    async def export() -> str:
        """Exports, and rolls back when cancelled."""
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(1.6)  # a rollback, within the tools' grace (5 s)
            done.append("rolled back")
        return "never"

    @app.on_call_end
    async def file_ticket(ctx: CallContext, summary: Any) -> None:
        await asyncio.sleep(1.0)  # within an on_call_end hook's 10 s
        done.append(f"ticket: {summary.reason}")

    vowel.script([when("export", calls=[("export", {})], reply="ok")])
    session = EngineSession.open(settings_for(vowel), app, end_cap=0.1)
    async with session:
        turn = asyncio.create_task(session.say("export please"))
        await asyncio.wait_for(started.wait(), 5)
    with pytest.raises(EngineError):
        await turn
    assert done == ["rolled back", "ticket: closed"]
    assert [t for t in asyncio.all_tasks() if (t.get_name() or "").startswith("tool:")] == []


async def test_a_say_from_a_tool_waits_for_its_output(vowel: VowelSimulator, app: Sideband) -> None:
    """The engine waits for every output of its tool turn before a response.create: a tool's
    ``ctx.say()`` goes out after the output and the answer to it, never before."""

    @app.tool
    async def check_stock(item: str, ctx: CallContext) -> str:
        """Checks the stock."""
        ctx.say("Tell the caller you are still checking.")
        await asyncio.sleep(0.2)
        return "in stock"

    vowel.script([when("stock", calls=[("check_stock", {"item": "x"})], reply="It is in stock.")])
    async with EngineSession.open(settings_for(vowel), app) as session:
        reply = await session.say("any stock?")
    engine = vowel.sessions[0]
    assert engine.notes == []
    sent = [
        (e.get("response") or {}).get("instructions", "answer")
        if e["type"] == "response.create"
        else e["item"]["type"]
        for e in engine.received
        if e["type"] == "response.create"
        or (e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output")
    ]
    assert sent == ["function_call_output", "answer", "Tell the caller you are still checking."]
    assert [t.outcome for t in reply.tools] == ["ok"]


async def test_a_cancelled_turn_ends_the_session(vowel: VowelSimulator, app: Sideband) -> None:
    """The turn went out; its reply, still to come, would be taken for the next turn's: the session is
    over, as after a reply_timeout."""
    started, release = asyncio.Event(), asyncio.Event()

    @app.tool(timeout=30)
    async def wait_a_bit() -> str:
        """Takes its time."""
        started.set()
        await release.wait()
        return "ready"

    vowel.script(
        [when("wait", calls=[("wait_a_bit", {})], reply="It is ready."), when("next", reply="Next.")]
    )
    async with EngineSession.open(settings_for(vowel), app) as session:
        turn = asyncio.create_task(session.say("wait for it"))
        await asyncio.wait_for(started.wait(), 5)
        turn.cancel()
        with pytest.raises(asyncio.CancelledError):
            await turn
        assert not session.live and session.end_reason == "reply_cancelled"
        with pytest.raises(EngineError) as ended:
            await session.say("next please")
        assert ended.value.reason == "reply_cancelled"
        release.set()
    texts = [e for e in vowel.sessions[0].received if e.get("type") == "conversation.item.create"]
    assert not any("next please" in json.dumps(e) for e in texts)  # the next turn never went out


async def test_a_turn_cancelled_once_its_reply_came_leaves_the_session_live(
    vowel: VowelSimulator, app: Sideband, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel lands after the reply did (before say() resumed): no reply is left to come, the
    session carries on."""
    turns: list[asyncio.Task[Any]] = []
    answer = EngineSession._on_response

    async def then_cancel(self: EngineSession, *args: Any) -> None:
        await answer(self, *args)
        if self._turn is not None and self._turn.future.done():
            turns[0].cancel()

    monkeypatch.setattr(EngineSession, "_on_response", then_cancel)
    vowel.script([when("first", reply="First."), when("second", reply="Second.")])
    async with EngineSession.open(settings_for(vowel), app) as session:
        turns.append(asyncio.create_task(session.say("first")))
        with pytest.raises(asyncio.CancelledError):
            await turns[0]
        assert session.live
        monkeypatch.setattr(EngineSession, "_on_response", answer)
        assert (await session.say("second")).text == "Second."


async def test_an_owner_cancelled_mid_turn_ends_the_session_as_cancelled(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """Not ``reply_cancelled``: the whole session was cancelled with its owner (a shutdown)."""
    started = a_tool_that_never_answers(app, vowel, "wait_a_bit", "wait")
    holder: list[EngineSession] = []

    async def owner() -> None:
        async with EngineSession.open(settings_for(vowel), app) as session:
            holder.append(session)
            await session.say("wait for it")

    task = asyncio.create_task(owner())
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (session,) = holder
    assert (session.end_reason, session.end_message) == ("shutdown", "the session was cancelled")


async def test_cancelling_the_owner_cancels_the_session(vowel: VowelSimulator, app: Sideband) -> None:
    opened = asyncio.Event()
    holder: list[EngineSession] = []

    async def owner() -> None:
        async with EngineSession.open(settings_for(vowel), app) as session:
            holder.append(session)
            opened.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(owner())
    await asyncio.wait_for(opened.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (session,) = holder
    assert session._task is not None and session._task.done()
    await vowel.sessions[0].wait_closed()


# -------------------------------------------------------------------------------------------- CLI
async def _dial(
    vowel: VowelSimulator, *args: str, stdin: bytes | None = None, stdin_closed: bool = False, **env: str
) -> tuple[int, str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SIDEBAND_"))}
    environ.update({**vowel.environ(), "SIDEBAND_LOG_FORMAT": "json", **env})
    command = (sys.executable, "-m", "sideband.cli", "dial", *args)
    if stdin_closed:  # (by the shell: a process's own spawn puts /dev/null in the place of a closed one)
        command = ("/bin/sh", "-c", 'exec "$@" <&-', "sh", *command)
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        env=environ,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


ORDER_DESK_RULES = [
    when("1042", calls=[("lookup_order", {"order_id": "1042"})], reply="Order 1042 shipped with UPS."),
]


async def test_dial_subprocess_talks_to_the_engine(vowel: VowelSimulator) -> None:
    vowel.script(ORDER_DESK_RULES)
    code, out, err = await _dial(vowel, "--say", "Where is order 1042?", "--say", "Thanks!")
    assert code == 0, err
    lines = out.splitlines()
    assert "you: Where is order 1042?" in lines
    assert any(line.startswith("tool: lookup_order → ok ") and line.endswith(" ms") for line in lines)
    assert "agent: Order 1042 shipped with UPS." in lines
    assert lines.index("you: Thanks!") > lines.index("agent: Order 1042 shipped with UPS.")
    assert "agent: I heard you." in lines and lines[-1] == "end: closed"
    assert vowel.mints[-1].token not in out + err
    assert [s.closed_by for s in vowel.sessions] == ["client"]


async def test_dial_reads_turns_from_stdin(vowel: VowelSimulator) -> None:
    vowel.script(ORDER_DESK_RULES)
    code, out, err = await _dial(vowel, "sideband.examples.order_desk:app", stdin=b"order 1042 please\n\n")
    assert code == 0, err
    assert "you: order 1042 please" in out and "agent: Order 1042 shipped with UPS." in out
    assert len(vowel.sessions[0].user_texts) == 1


async def test_dial_reads_past_a_line_that_is_not_utf8(vowel: VowelSimulator) -> None:
    """A byte stdin's encoding cannot decode is replaced: the line is sent, and the ones after it (a
    stdin that decodes strictly, as it does in a UTF-8 locale)."""
    turns = "first\ncafé latin-1\nthird\n".encode("latin-1")
    code, out, err = await _dial(vowel, stdin=turns, PYTHONIOENCODING="utf-8:strict")
    assert code == 0, err
    assert vowel.sessions[0].user_texts == ["first", "caf\ufffd latin-1", "third"]
    assert "you: third" in out.splitlines()


class _FailingRead(io.RawIOBase):
    """A stream whose first read gives one line and whose next read fails."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.reads += 1
        if self.reads > 1:
            raise OSError(errno.EIO, "Input/output error")
        buffer[:6] = b"first\n"
        return 6


async def test_dial_whose_stdin_cannot_be_read_fails_in_one_line(vowel: VowelSimulator) -> None:
    """A read of stdin that fails is no end of the input: the session closes, one ``sideband:`` line
    says why, and the status is 1."""
    stdin = io.TextIOWrapper(io.BufferedReader(_FailingRead()), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    code = await run_dial(settings_for(vowel), make_app(), out=out, err=err, stdin=stdin)
    assert code == 1
    assert err.getvalue() == "sideband: could not read the standard input: [Errno 5] Input/output error\n"
    assert out.getvalue().splitlines()[-1] == "end: closed"
    assert vowel.sessions[0].user_texts == ["first"]
    await vowel.sessions[0].wait_closed()
    assert vowel.sessions[0].closed_by == "client"


async def test_dial_with_stdin_closed_fails_in_one_line(
    vowel: VowelSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process started with its stdin closed has no ``sys.stdin``: one ``sideband:`` line and status 1."""
    monkeypatch.setattr(sys, "stdin", None)
    out, err = io.StringIO(), io.StringIO()
    assert await run_dial(settings_for(vowel), make_app(), out=out, err=err) == 1
    assert err.getvalue() == "sideband: could not read the standard input: it is closed\n"
    assert out.getvalue().splitlines()[-1] == "end: closed"
    await vowel.sessions[0].wait_closed()
    assert vowel.sessions[0].closed_by == "client"


@pytest.mark.parametrize("says", [(), ("--say", "Where is order 1042?")])
async def test_dial_started_with_its_stdin_closed_ends_as_it_says(
    vowel: VowelSimulator, says: tuple[str, ...]
) -> None:
    """``sideband dial <&-``: its turns from ``--say`` are spoken and the status is 0; with none, the one
    line says stdin is closed and the status is 1. Either way the process ends as it says (a socket given
    the free descriptor 0 made it abort as it closed it)."""
    vowel.script(ORDER_DESK_RULES)
    code, out, err = await _dial(vowel, *says, stdin_closed=True)
    lines = out.splitlines()
    assert lines[-1] == "end: closed", (code, out, err)
    if says:
        assert code == 0 and "agent: Order 1042 shipped with UPS." in lines, err
    else:
        assert code == 1, (code, out, err)
        assert err.splitlines()[-1] == "sideband: could not read the standard input: it is closed"


async def test_dial_without_the_scope_fails_in_one_line(vowel: VowelSimulator) -> None:
    code, out, err = await _dial(vowel, "--say", "hi", SIDEBAND_VOWEL_API_KEY=vowel.browser_key)
    assert code != 0
    assert "Traceback" not in err + out
    errors = [line for line in err.splitlines() if line.startswith("sideband:")]
    assert len(errors) == 1 and "mint_trusted_session" in errors[0]
    assert [line for line in err.splitlines() if "mint_trusted_session" in line] == errors


async def test_dial_reports_an_engine_timeout(vowel: VowelSimulator) -> None:
    vowel.max_call_duration = 0  # the first message after connecting is already too late
    code, _, err = await _dial(vowel, "--say", "hi")
    assert code != 0 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("sideband:")]
    assert len(errors) == 1 and "max_call_duration_exceeded" in errors[0]


async def test_dial_reports_the_engines_answer_to_a_session_update_it_could_not_take(
    vowel: VowelSimulator,
) -> None:
    vowel.refuse_session_update = "Invalid tool schema for lookup_order"
    code, _, err = await _dial(vowel, "--say", "hi")
    assert code != 0 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("sideband:")]
    assert len(errors) == 1 and "server_error: Invalid tool schema for lookup_order" in errors[0]
    assert vowel.sessions[0].user_texts == []


async def test_dial_shows_a_reply_cut_short(vowel: VowelSimulator) -> None:
    vowel.script([when("noise", reply="Let me", ends="cancelled")])  # (its words never voiced)
    code, out, err = await _dial(vowel, "--say", "noise", "--say", "Where is order 1042?")
    assert code == 0, err
    lines = out.splitlines()
    at = lines.index("you: noise")
    assert lines[at + 1 : at + 3] == ["agent: (no text)", "reply: cancelled"]
    assert "agent: I heard you." in lines and lines[-1] == "end: closed"


@pytest.mark.parametrize("from_stdin", [False, True])
async def test_dial_carries_on_past_a_refused_turn(vowel: VowelSimulator, from_stdin: bool) -> None:
    """A refused turn is one ``refused:`` line and the next turn follows (the session carries on); the
    status then says a turn failed, the last refusal ending stderr."""
    vowel.script([when("forbidden", refuse="Message content is not allowed")])
    turns = ["something forbidden", "hello", "forbidden again", "bye"]
    out, err = io.StringIO(), io.StringIO()
    if from_stdin:
        stdin = io.StringIO("".join(f"{turn}\n" for turn in turns))
        code = await run_dial(settings_for(vowel), make_app(), out=out, err=err, stdin=stdin)
    else:
        code = await run_dial(settings_for(vowel), make_app(), turns, out=out, err=err)
    assert code == 1
    lines = out.getvalue().splitlines()
    refusal = "refused: invalid_value: Message content is not allowed"
    assert lines[1:] == [
        "you: something forbidden",
        refusal,
        "you: hello",
        "agent: I heard you.",
        "you: forbidden again",
        refusal,
        "you: bye",
        "agent: I heard you.",
        "end: closed",
    ]
    assert vowel.sessions[0].user_texts == ["hello", "bye"]
    assert err.getvalue().splitlines()[-1] == (
        "sideband: vowel engine refused the turn's text (invalid_value: Message content is not allowed)"
        " (2 turns refused)"
    )


def test_dial_names_a_missing_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("SIDEBAND_VOWEL_"):
            monkeypatch.delenv(name)
    assert main(["dial", "--say", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sideband: SIDEBAND_VOWEL_CORE_URL is not set"


async def test_vowel_demo_leg() -> None:
    out = io.StringIO()
    assert await run_vowel_demo(None, out) == 0
    text = out.getvalue()
    assert "tool: lookup_order → ok" in text and "end: end_call_tool" in text
    assert "refused: " in text and "mint_trusted_session" in text


# -- ends, errors and turns as a backend sees them ---------------------------------------------------------


async def test_an_exception_in_the_body_aborts_instead_of_closing(
    vowel: VowelSimulator, app: Sideband
) -> None:
    started = a_tool_that_never_answers(app, vowel, "hang", "hang")
    session = EngineSession.open(settings_for(vowel), app)
    with pytest.raises(ValueError, match="user bug"):
        async with session:
            turn = asyncio.create_task(session.say("hang please"))
            await asyncio.wait_for(started.wait(), 5)
            raise ValueError("user bug")
    # Not the graceful close that waits for the running tool (up to end_cap): cancelled at once.
    assert session.end_reason == "shutdown" and not session.live
    assert [(t.name, t.outcome) for t in session.summary.tools] == [("hang", "cancelled")]
    with pytest.raises(EngineError):
        await turn


async def test_an_error_the_session_got_past_does_not_name_a_later_drop(
    vowel: VowelSimulator, app: Sideband
) -> None:
    async with EngineSession.open(settings_for(vowel), app) as session:
        session.runtime.send_event({"type": "no.such.event"})  # the engine answers with a non-fatal error
        await vowel.wait_for(lambda s: bool(s.sessions[0].sent_of_type("error")), 5)
        assert (await session.say("hello")).text  # the session carries on
        await vowel.drop(vowel.sessions[0])
        assert await session.wait_closed(5) == "connection_lost"
    assert "unknown_event" not in (session.end_message or "")


async def test_an_error_before_a_cut_connection_does_not_name_it(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """A recoverable error, then the connection cut (no close frame): the error did not end the session."""
    async with EngineSession.open(settings_for(vowel), app) as session:
        session.runtime.send_event({"type": "no.such.event"})  # the engine answers with a non-fatal error
        await vowel.wait_for(lambda s: bool(s.sessions[0].sent_of_type("error")), 5)
        await vowel.drop(vowel.sessions[0])
        assert await session.wait_closed(5) == "connection_lost"
    assert session.end_message == "connection to the vowel engine lost (close 1006)"


def app_starting_with(act: Callable[[CallContext], None]) -> tuple[Sideband, asyncio.Event]:
    """:func:`make_app` whose ``on_call_start`` hook runs ``act``; the event is set once it has."""
    app, done = make_app(), asyncio.Event()

    @app.on_call_start
    def start(ctx: CallContext) -> None:
        act(ctx)
        done.set()

    return app, done


async def test_a_reply_under_way_is_not_taken_for_the_next_turns() -> None:
    """A hook's greeting is still being said as the first say() comes: the text, on its way, would reach
    the engine after the greeting ended, which would then pass for its reply (and every reply after for
    the turn before's). The turn waits for the greeting to end."""
    app, greeted = app_starting_with(lambda ctx: ctx.say("Greet the caller."))
    async with VowelSimulator(input_delay=0.05) as vowel:
        vowel.instructed_reply = "Welcome to the order desk!"
        vowel.script([when("1042", reply="Order 1042 has shipped.")])
        async with EngineSession.open(settings_for(vowel), app) as session:
            await asyncio.wait_for(greeted.wait(), 5)
            first = await session.say("Where is order 1042?")
            second = await session.say("Thanks.")
        texts = vowel.sessions[0].user_texts
        responses = [(r.trigger, r.status) for r in vowel.sessions[0].responses]
    assert (first.text, second.text) == ("Order 1042 has shipped.", "I heard you.")
    assert texts == ["Where is order 1042?", "Thanks."]
    assert responses == [
        ("response.create", "completed"),
        ("user_text", "completed"),
        ("user_text", "completed"),
    ]


async def test_a_hooks_text_whose_reply_has_not_started_is_not_taken_for_the_next_turn() -> None:
    """A hook's user text: the engine answers it by itself, so its reply is on its way before it starts.
    The first say() waits for it (and sends nothing that would replace it meanwhile)."""
    app, greeted = app_starting_with(lambda ctx: ctx.send_text("Hi there"))
    async with VowelSimulator(input_delay=0.05) as vowel:
        vowel.script([when("1042", reply="Order 1042 has shipped."), when("Hi there", reply="Hello!")])
        async with EngineSession.open(settings_for(vowel), app) as session:
            await asyncio.wait_for(greeted.wait(), 5)
            first = await session.say("Where is order 1042?")
        texts = vowel.sessions[0].user_texts
        responses = [(r.trigger, r.status) for r in vowel.sessions[0].responses]
    assert first.text == "Order 1042 has shipped."
    assert texts == ["Hi there", "Where is order 1042?"]
    assert responses == [("user_text", "completed"), ("user_text", "completed")]


async def test_a_say_after_speech_the_engine_left_unanswered_goes_out_once_the_turn_wait_ends() -> None:
    """The engine heard the caller speak and never answered: no response.done ever comes, and the turn
    wait ends by its own timer (TURN_GRACE). A say() meanwhile goes out then, not at its timeout."""
    app = Sideband(instructions="You are the test desk.")
    heard = asyncio.Event()

    @app.on_transcript
    async def on_transcript(ctx: CallContext, role: str, text: str) -> None:
        heard.set()

    async with VowelSimulator() as vowel:
        vowel.script([when("1042", reply="Order 1042 has shipped.")])
        async with EngineSession.open(settings_for(vowel), app) as session:
            engine = vowel.sessions[0]
            await vowel.send(engine, {"type": "input_audio_buffer.speech_started", "item_id": "item_1"})
            await vowel.send(engine, {"type": "input_audio_buffer.speech_stopped", "item_id": "item_1"})
            await vowel.send(
                engine,
                {
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": "item_1",
                    "transcript": "Um.",
                },
            )
            await asyncio.wait_for(heard.wait(), 5)  # (the events before it were handled too)
            assert session.runtime.machine.response_pending  # its answer may be on its way
            started = time.monotonic()
            reply = await session.say("Where is order 1042?", timeout=4 * TURN_GRACE)
            waited = time.monotonic() - started
        texts = engine.user_texts
    assert reply.text == "Order 1042 has shipped."
    assert texts == ["Where is order 1042?"]
    assert waited < 3 * TURN_GRACE, waited


async def test_a_say_that_finds_the_engine_answering_past_its_timeout_sends_nothing(
    vowel: VowelSimulator, app: Sideband
) -> None:
    started = a_tool_that_never_answers(app, vowel, "hold", "hold on")
    async with EngineSession.open(settings_for(vowel), app) as session:
        session.runtime.send_text("hold on")  # (a hook's text: its reply's tool never answers)
        await asyncio.wait_for(started.wait(), 5)
        with pytest.raises(EngineError) as info:
            await session.say("Are you there?", timeout=0.2)
        assert info.value.reason == "reply_timeout" and "not sent" in str(info.value)
        assert session.end_reason is None  # the session carries on
        await session.abort()  # (not a close, which would wait for the tool)
    assert "Are you there?" not in vowel.sessions[0].user_texts


async def test_a_say_queued_behind_another_turn_keeps_to_its_timeout(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """A say() waiting for another say()'s turn to end counts that wait in its timeout: once it is up,
    its text is not sent and the session carries on."""
    started = a_tool_that_never_answers(app, vowel, "hold", "hold on")
    async with EngineSession.open(settings_for(vowel), app) as session:
        first = asyncio.ensure_future(session.say("hold on"))
        await asyncio.wait_for(started.wait(), 5)
        async with asyncio.timeout(5):  # (far past its own timeout)
            with pytest.raises(EngineError) as caught:
                await session.say("Are you there?", timeout=0.2)
        assert caught.value.reason == "reply_timeout" and "not sent" in str(caught.value)
        assert session.live and session.end_reason is None and not first.done()
        await session.abort()  # (not a close, which would wait for the tool)
        await asyncio.gather(first, return_exceptions=True)
    assert "Are you there?" not in vowel.sessions[0].user_texts


async def test_a_says_timeout_bounds_the_whole_turn_the_wait_for_quiet_included(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """A reply under way takes most of the turn's time: the reply to the text, which takes as long,
    is not given the whole timeout again (the say() would then wait up to twice what it was told)."""
    spent = asyncio.Event()

    @app.tool(timeout=5)
    async def ponder() -> str:
        """Takes its time."""
        await asyncio.sleep(0.3)
        spent.set()
        return "done"

    vowel.script([when("think", calls=[("ponder", {})], reply="Thought.")])
    async with EngineSession.open(settings_for(vowel), app) as session:
        session.runtime.send_text("think")  # (a hook's text: its reply's tool takes 0.3 s)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(EngineError) as caught:
            await session.say("think again", timeout=0.45)  # its own reply takes 0.3 s more
        waited = loop.time() - started
        assert caught.value.reason == "reply_timeout" and "not sent" not in str(caught.value)
        assert spent.is_set() and waited < 1.0, waited  # (not the 0.6 s the two replies take)
    assert vowel.sessions[0].user_texts == ["think", "think again"]


async def test_a_reply_keeps_every_line_even_a_repeated_one(vowel: VowelSimulator, app: Sideband) -> None:
    vowel.script(
        [
            when(
                "1042",
                calls=[("lookup_order", {"order_id": "1042"})],
                preamble="One moment.",
                reply="One moment.",
            )
        ]
    )
    async with EngineSession.open(settings_for(vowel), app) as session:
        reply = await session.say("order 1042")
    assert reply.lines == ("One moment.", "One moment.")


def speech(ms: int, amplitude: int = 8000) -> bytes:
    """``ms`` of a 220 Hz tone, PCM16 LE mono 24 kHz: audio the engine would take for speech."""
    samples = array.array(
        "h", (round(amplitude * math.sin(2 * math.pi * 220 * n / 24000)) for n in range(24 * ms))
    )
    if sys.byteorder == "big":
        samples.byteswap()
    return samples.tobytes()


async def test_streamed_speech_keeps_the_session_from_idling_and_silence_does_not(
    vowel: VowelSimulator, app: Sideband, monkeypatch: pytest.MonkeyPatch
) -> None:
    active: list[int] = []
    monkeypatch.setattr(CallRuntime, "caller_active", lambda self: active.append(1))
    async with EngineSession.open(settings_for(vowel), app) as session:
        await session.send_audio(speech(100))  # 100 ms of PCM16 at 24 kHz
        await session.send_audio(speech(100))
        await session.send_audio(bytes(4800))  # silence
        await session.send_audio(speech(100, amplitude=300))  # line noise
    assert len(active) == 2


async def test_audio_split_at_any_byte_is_judged_by_whole_samples(
    vowel: VowelSimulator, app: Sideband, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend forwarding a socket's reads (any byte count, any bytes-like type): near-silent line noise
    split at an odd byte is still silence, and speech in a memoryview is still speech."""
    active: list[int] = []
    monkeypatch.setattr(CallRuntime, "caller_active", lambda self: active.append(1))
    dither = array.array("h", (1 if n % 2 else -1 for n in range(4800)))  # +-1 LSB: about -90 dBFS
    if sys.byteorder == "big":
        dither.byteswap()
    noise = dither.tobytes()
    async with EngineSession.open(settings_for(vowel), app) as session:
        await session.send_audio(noise[:4801])  # one byte into a sample
        await session.send_audio(noise[4801:])
        assert active == []
        await session.send_audio(memoryview(speech(100)))  # type: ignore[arg-type]
    assert active == [1]


@pytest.mark.parametrize("close_first", [True, False], ids=["closed", "still-open"])
async def test_a_turn_given_up_on_keeps_its_end_reason_when_the_owner_is_cancelled_later(
    vowel: VowelSimulator, app: Sideband, close_first: bool
) -> None:
    closed = asyncio.Event()
    a_tool_that_never_answers(app, vowel, "wait_a_bit", "wait")
    holder: list[EngineSession] = []

    async def owner() -> None:
        async with EngineSession.open(settings_for(vowel), app, end_cap=0.2) as session:
            holder.append(session)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(session.say("wait for it"), 0.3)  # (a task of its own, cancelled)
            if close_first:
                await session.close()
            closed.set()
            await asyncio.Event().wait()  # other work; the owner is cancelled here

    task = asyncio.create_task(owner())
    await asyncio.wait_for(closed.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (session,) = holder
    assert (session.end_reason, session.failed) == ("reply_cancelled", True)


@pytest.mark.parametrize("idle_prompts", [0, 1])
async def test_a_caller_who_spoke_then_streams_silence_gets_our_goodbye_before_the_engine_cuts(
    vowel: VowelSimulator, idle_prompts: int
) -> None:
    """The engine's idle clock runs from the last speech: ours too, so our goodbye comes first. An app's
    idle prompts are not asked on the engine: they restart none of its clock, and it would cut the caller
    off before the goodbye."""
    app = make_app(idle_prompts=idle_prompts)
    vowel.max_idle_duration, vowel.claim_limits = 3.0, True  # the token claims 3 s: ours fires at 2.7 s
    async with EngineSession.open(settings_for(vowel), app) as session:
        await session.send_audio(speech(100))
        assert (await session.say("hello")).text
        closed = asyncio.ensure_future(session.wait_closed(10))
        while not closed.done():  # a caller on hold: 100 ms of silence every 50 ms until the end
            with contextlib.suppress(EngineError):
                await session.send_audio(bytes(4800))
            await asyncio.wait({closed}, timeout=0.05)
        assert await closed == "idle_timeout"
    engine = vowel.sessions[0]
    assert engine.end_reason != "max_idle_duration_exceeded" and engine.responses[-1].instructions


async def test_the_engine_counts_idle_time_from_speech_not_from_silence_or_text(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """The engine's idle limit counts only after speech was detected (PROTOCOL C5): streamed silence and
    user text start no clock and restart none; speech does."""
    vowel.max_idle_duration = 60.0
    async with EngineSession.open(settings_for(vowel), app) as session:
        await session.send_audio(bytes(4800))  # 100 ms of silence
        await vowel.wait_for(lambda v: bool(v.sessions[0].audio_chunks), what="the audio")
        vowel.advance(120)
        assert (await session.say("hello")).text  # no speech yet: the engine's idle clock never started
        vowel.advance(120)
        assert (await session.say("hello again")).text  # text started none
        await session.send_audio(speech(100))
        await vowel.wait_for(lambda v: len(v.sessions[0].audio_chunks) == 2, what="the speech")
        vowel.advance(40)
        assert (await session.say("still there?")).text  # 40 s after the speech
        vowel.advance(40)  # 80 s after it, 40 after the text: the text restarted nothing
        with pytest.raises(EngineError) as caught:
            await session.say("and now?")
    assert caught.value.reason == "max_idle_duration_exceeded"


async def test_the_engine_reports_speech_starting_and_stopping_and_counts_idle_time_from_its_start(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """The engine's turn detection on the streamed audio: speech after none starts the caller's speech
    (``speech_started``, and the idle clock starts); half a second of audio without speech ends it
    (``speech_stopped``, same item). Speech streaming on restarts no clock, as on the engine."""
    vowel.max_idle_duration = 60.0
    async with EngineSession.open(settings_for(vowel), app) as session:
        engine = await vowel.wait_session()

        async def stream(pcm16: bytes) -> None:
            count = len(engine.audio_chunks) + 1
            await session.send_audio(pcm16)
            await vowel.wait_for(lambda v: len(engine.audio_chunks) == count, what="the audio")

        await stream(bytes(4800))  # 100 ms of silence: nothing
        assert engine.sent_of_type("input_audio_buffer.speech_started") == [] and engine.last_speech is None
        await stream(speech(100))
        (started,) = engine.sent_of_type("input_audio_buffer.speech_started")
        assert started["audio_start_ms"] == 100 and started["item_id"] and engine.speaking
        assert engine.last_speech is not None
        vowel.advance(40)
        await stream(speech(100))  # the caller speaks on: no new start, the clock runs from the first
        assert len(engine.sent_of_type("input_audio_buffer.speech_started")) == 1
        for _ in range(4):
            await stream(bytes(4800))
        assert engine.sent_of_type("input_audio_buffer.speech_stopped") == []  # 400 ms: a pause only
        await stream(bytes(4800))
        (stopped,) = engine.sent_of_type("input_audio_buffer.speech_stopped")
        assert stopped["audio_end_ms"] == 300 and stopped["item_id"] == started["item_id"]
        assert not engine.speaking
        vowel.advance(30)  # 70 s after the speech started, 30 after its last sound
        with pytest.raises(EngineError) as caught:
            await session.say("still there?")
    assert caught.value.reason == "max_idle_duration_exceeded"


async def test_what_the_engine_takes_for_speech_is_the_tests_to_say(app: Sideband) -> None:
    """``detects_speech`` and ``silence_duration``: a test's own detector and pause; each start of speech
    after an end is a new one, with a new item."""
    said = VowelSimulator(detects_speech=lambda chunk: chunk[:1] == b"S", silence_duration=0.2)
    async with said as vowel, EngineSession.open(settings_for(vowel), app) as session:
        engine = await vowel.wait_session()
        for chunk in (b"S" * 4800, bytes(4800), bytes(4800), b"S" * 4800, speech(100)):
            await session.send_audio(chunk)
        await vowel.wait_for(lambda v: len(engine.audio_chunks) == 5, what="the audio")
    events = [
        (e["type"].rpartition(".")[2], e.get("audio_start_ms", e.get("audio_end_ms")), e["item_id"])
        for e in engine.sent
        if e["type"].startswith("input_audio_buffer.speech_")
    ]
    assert [e[:2] for e in events] == [
        ("speech_started", 0),
        ("speech_stopped", 100),
        ("speech_started", 300),
    ]
    assert events[0][2] == events[1][2] != events[2][2]


@pytest.mark.parametrize("audio_stops_mid_speech", [False, True])
async def test_a_caller_who_spoke_then_only_types_gets_our_goodbye_before_the_engine_cuts(
    vowel: VowelSimulator, app: Sideband, audio_stops_mid_speech: bool
) -> None:
    """The engine's idle clock runs from the caller's last speech, which text does not restart: ours for
    it neither, so our goodbye comes before the engine's cut however busily the caller types meanwhile.
    Audio that stops coming mid-speech (no ``speech_stopped`` ever comes) holds no goodbye back."""
    vowel.max_idle_duration, vowel.claim_limits = 3.0, True  # the token claims 3 s: ours fires at 2.7 s
    async with EngineSession.open(settings_for(vowel), app) as session:
        await session.send_audio(speech(100))
        if not audio_stops_mid_speech:
            await session.send_audio(bytes(24000))  # half a second of silence: the engine hears it end
        machine = session.runtime.machine
        closed = asyncio.ensure_future(session.wait_closed(10))
        while not closed.done():  # a turn of text every 200 ms, until the end
            if not machine.ending:
                with contextlib.suppress(EngineError):
                    await session.say("still here")
            await asyncio.wait({closed}, timeout=0.2)
        assert await closed == "idle_timeout"
    engine = vowel.sessions[0]
    assert engine.end_reason != "max_idle_duration_exceeded" and engine.responses[-1].instructions


async def test_a_caller_whose_audio_stops_mid_speech_gets_our_goodbye_before_the_engine_cuts(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """The backend's audio stops coming while the caller speaks: the engine hears no end of the speech (it
    needs silence for that), and its idle clock runs from the speech's start. Ours for it ends the
    utterance it still holds for the caller: the goodbye is said before the engine's cut, rather than held
    until the end cap closes the session with none."""
    vowel.max_idle_duration, vowel.claim_limits = 3.0, True  # the token claims 3 s: ours fires at 2.7 s
    async with EngineSession.open(settings_for(vowel), app) as session:
        engine = await vowel.wait_session()
        await session.send_audio(speech(100))  # and no more audio
        await vowel.wait_for(lambda v: engine.speaking, what="the speech")
        assert await session.wait_closed(8) == "idle_timeout"
    assert engine.sent_of_type("input_audio_buffer.speech_stopped") == [] and engine.speaking
    assert engine.end_reason != "max_idle_duration_exceeded"
    assert [r.instructions for r in engine.responses] == [app.goodbye_instructions]


async def test_a_noisy_line_keeps_no_goodbye_from_coming_before_the_engines_idle_cut(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """The engine starts its idle clock at each start of speech its own detection finds, and says so
    (``speech_started``); a noisy line is no speech to it, however loud. Ours for its limit runs from its
    reports, so the goodbye comes before its cut while the noise streams on."""
    words = speech(100)
    vowel.detects_speech = lambda chunk: chunk == words  # the street behind the caller is no speech
    vowel.max_idle_duration, vowel.claim_limits = 3.0, True  # the token claims 3 s: ours fires at 2.7 s
    async with EngineSession.open(settings_for(vowel), app) as session:
        engine = await vowel.wait_session()
        await session.send_audio(words)
        await vowel.wait_for(lambda v: bool(engine.sent_of_type("input_audio_buffer.speech_started")))
        closed = asyncio.ensure_future(session.wait_closed(10))
        while not closed.done():  # the caller says no more; loud noise every 50 ms, until the end
            with contextlib.suppress(EngineError):
                await session.send_audio(speech(100, amplitude=3000))
            await asyncio.wait({closed}, timeout=0.05)
        assert await closed == "idle_timeout"
    assert len(engine.sent_of_type("input_audio_buffer.speech_started")) == 1
    assert engine.sent_of_type("input_audio_buffer.speech_stopped")  # the noise ended the speech for it
    assert engine.end_reason != "max_idle_duration_exceeded" and engine.responses[-1].instructions


async def test_the_engine_calls_no_tool_that_session_update_did_not_declare(vowel: VowelSimulator) -> None:
    app = Sideband(instructions="No tools here.")  # declares none: the mint-only mistake of PROTOCOL C1
    vowel.script([when("order", calls=[("lookup_order", {"order_id": "1"})], reply="I cannot look that up.")])
    async with EngineSession.open(settings_for(vowel), app) as session:
        reply = await session.say("where is my order")
    engine = vowel.sessions[0]
    assert reply.text == "I cannot look that up." and reply.tools == ()
    assert engine.notes == ["no tools declared in session.update: the model called none"]


async def test_a_tool_without_a_description_is_declared_with_one_and_called(
    vowel: VowelSimulator, app: Sideband
) -> None:
    """The engine drops a session tool whose description is empty: a tool with no docstring is declared
    to it (in session.update and at mint time alike) with a description made from its name, so its
    model can call it. The app's own declarations (an OpenAI session's) keep it without one."""

    @app.tool
    async def cancel_order(order_id: str) -> str:
        return f"order {order_id} cancelled"

    vowel.script([when("cancel", calls=[("cancel_order", {"order_id": "7"})], reply="Cancelled.")])
    async with EngineSession.open(settings_for(vowel), app) as session:
        reply = await session.say("cancel order 7")
    engine = vowel.sessions[0]
    assert reply.text == "Cancelled." and [(t.name, t.outcome) for t in reply.tools] == [
        ("cancel_order", "ok")
    ]
    assert engine.notes == []
    (declared,) = [t for t in engine.received[0]["session"]["tools"] if t["name"] == "cancel_order"]
    (minted,) = [t for t in vowel.mints[0].body["config"]["serverTools"] if t["name"] == "cancel_order"]
    assert declared["description"] == minted["description"] == "Cancel order."
    assert [t["description"] for t in app.tools.definitions(["cancel_order"])] == [""]


async def test_the_engine_drops_a_tool_without_a_name_or_a_description(vowel: VowelSimulator) -> None:
    """As the engine does, the simulator skips a session tool whose name or description is missing or
    empty: its model never calls it (the drop is noted), while session.updated echoes what was sent."""
    vowel.script([when("use", calls=[("a", {})], reply="I cannot.")])
    tools = [
        {"type": "function", "name": "a", "description": "", "parameters": {"type": "object"}},
        {"type": "function", "description": "Nameless.", "parameters": {"type": "object"}},
        {"type": "function", "name": "b", "description": "Tool b.", "parameters": {"type": "object"}},
    ]
    async with _engine_with_tools(vowel) as (ws, until):
        await ws.send(json.dumps({"type": "session.update", "session": {"tools": tools}}))
        assert (await until("session.updated"))["session"]["tools"] == tools
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "use a"}]}
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        assert (await until("response.done"))["response"]["status"] == "completed"
    engine = vowel.sessions[0]
    assert [t["name"] for t in engine.tools] == ["b"]
    assert [r.call_ids for r in engine.responses] == [[]] and engine.responses[0].text == "I cannot."
    assert engine.notes == [
        "tool 'a' dropped: no description (the engine skips it: its model cannot call it)",
        "tool None dropped: no name (the engine skips it: its model cannot call it)",
        "the model did not call 'a': the engine dropped it",
    ]


def test_dial_with_a_blank_turn_is_one_line_before_anything_opens(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dial", "--say", "hi", "--say", "  "]) == 2
    assert capsys.readouterr().err.strip() == "sideband: --say needs some text"


async def test_a_slow_sync_hook_does_not_hold_the_reply_back(vowel: VowelSimulator, app: Sideband) -> None:
    """The reply is handed to ``say()`` on the event loop, not after the app's sync hooks in the tools'
    thread pool: a transcript hook that takes its time does not delay it."""
    loop = asyncio.get_running_loop()
    app.on_transcript(lambda ctx, role, text: time.sleep(1.0))
    vowel.script([when("hello", reply="Hi there.")])
    async with EngineSession.open(settings_for(vowel), app) as session:
        started = loop.time()
        reply = await session.say("hello")
        elapsed = loop.time() - started
    assert reply.text == "Hi there."
    assert elapsed < 0.8, f"the reply took {elapsed:.2f}s"


async def test_a_reply_timeout_ends_the_session_with_that_reason(
    vowel: VowelSimulator, app: Sideband, logs: io.StringIO
) -> None:
    @app.tool(timeout=5)
    async def ponder() -> str:
        """Takes its time."""
        await asyncio.sleep(2)
        return "done"

    vowel.script([when("think", calls=[("ponder", {})], reply="Thought.")])
    async with EngineSession.open(settings_for(vowel), app) as session:
        with pytest.raises(EngineError) as caught:
            await session.say("think", timeout=0.3)
        assert caught.value.reason == "reply_timeout"
        assert session.end_reason == "reply_timeout" and not session.live
        with pytest.raises(EngineError) as again:  # a late reply would be taken for this turn's
            await session.say("anything else?")
        assert again.value.reason == "reply_timeout"
    lines = log_lines(logs)
    ended = [e for e in lines if e["event"] == "vowel.session_ended"]
    assert [(e["reason"], e["level"]) for e in ended] == [("reply_timeout", "warning")]  # a failure
    assert [e["reason"] for e in lines if e["event"] == "call.ended"] == ["reply_timeout"]  # one reason


async def test_a_session_over_keeps_its_end_when_its_socket_is_lost_afterwards(
    vowel: VowelSimulator, app: Sideband, logs: io.StringIO
) -> None:
    """A ``say()`` gave up on its reply (``reply_timeout``): the session is over, and the socket lost
    later does not name its end anew; the call's end, its summary and its logs give the session's."""
    seen: list[str] = []
    app.on_call_end(lambda ctx, summary: seen.append(summary.reason))
    started = a_tool_that_never_answers(app, vowel, "hold", "hold on")
    async with EngineSession.open(settings_for(vowel), app) as session:
        with pytest.raises(EngineError) as caught:
            await session.say("hold on", timeout=0.2)
        assert caught.value.reason == "reply_timeout" and started.is_set()
        await vowel.drop(vowel.sessions[0])
        assert await session.wait_closed(10) == "reply_timeout"
    assert session.summary is not None and session.summary.reason == "reply_timeout"
    assert seen == ["reply_timeout"]
    lines = log_lines(logs)
    assert [e["reason"] for e in lines if e["event"] == "call.ended"] == ["reply_timeout"]
    assert [e["reason"] for e in lines if e["event"] == "vowel.session_ended"] == ["reply_timeout"]


@pytest.mark.parametrize("end", ["reply_timeout", "reply_cancelled"])
async def test_a_session_over_before_its_body_raised_logs_one_end(
    vowel: VowelSimulator, app: Sideband, logs: io.StringIO, end: str
) -> None:
    """The session's end (a say()'s reply_timeout, or a say() cancelled before its reply) leaves the
    ``async with`` body, which aborts the session: its call's end is the session's, not the
    cancellation's (``shutdown``)."""
    started = a_tool_that_never_answers(app, vowel, "hold", "hold on")
    with pytest.raises(EngineError) as caught:
        async with EngineSession.open(settings_for(vowel), app) as session:
            if end == "reply_timeout":
                await session.say("hold on", timeout=0.2)
            turn = asyncio.ensure_future(session.say("hold on"))
            await asyncio.wait_for(started.wait(), 5)
            turn.cancel()  # (its reply is still to come: the session is over)
            with contextlib.suppress(asyncio.CancelledError):
                await turn
            await session.say("anything else?")
    assert caught.value.reason == end == session.end_reason
    lines = log_lines(logs)
    assert [e["reason"] for e in lines if e["event"] == "vowel.session_ended"] == [end]
    assert [e["reason"] for e in lines if e["event"] == "call.ended"] == [end]
    assert session.summary is not None and session.summary.reason == end


async def test_a_session_whose_update_is_refused_logs_one_end(
    vowel: VowelSimulator, app: Sideband, logs: io.StringIO
) -> None:
    vowel.refuse_session_update = "Invalid tool schema for lookup_order"
    session = EngineSession.open(settings_for(vowel), app)
    with pytest.raises(EngineError) as caught:
        await session.start()
    assert caught.value.reason == "setup_failed"
    lines = log_lines(logs)
    assert [e["reason"] for e in lines if e["event"] == "vowel.session_ended"] == ["setup_failed"]
    assert [e["reason"] for e in lines if e["event"] == "call.ended"] == ["setup_failed"]


@pytest.mark.parametrize("guarded", [False, True])
@pytest.mark.parametrize("tool", [False, True])
async def test_a_reply_whose_end_and_the_sockets_loss_come_together_ends_its_turn(
    vowel: VowelSimulator, app: Sideband, monkeypatch: pytest.MonkeyPatch, tool: bool, guarded: bool
) -> None:
    """The engine's ``response.done`` for the turn's reply and the loss of its connection reach us in
    one read (the TCP connection cut just after the frame went out), or (``guarded``) while an output
    guardrail still checks the reply's words. The reply was whole: the turn returns it; the session has
    ended all the same (``connection_lost``), and the next turn fails."""
    cut = asyncio.Event()
    sessions: list[EngineSession] = []
    if guarded:

        @app.guardrail
        async def moderate(ctx: CallContext, text: str) -> None:
            if cut.is_set():  # (the words of the reply whose end comes with the connection's loss)
                await sessions[0]._ended.wait()  # checked once the loss is known

    rule = when("order", calls=[("lookup_order", {"order_id": "7"})], reply="It shipped.")
    vowel.script([rule if tool else when("hello", reply="Hi there.")])
    send = vowel._send

    async def send_then_cut(record: Any, event: dict[str, Any]) -> None:
        await send(record, event)
        response = event.get("response") or {}
        if event["type"] == "response.done" and response.get("status") == "completed":
            transport = record._transport
            assert transport is not None
            transport.close()  # (after the frame: both leave in one write, then the FIN)
            cut.set()

    monkeypatch.setattr(vowel, "_send", send_then_cut)
    async with EngineSession.open(settings_for(vowel), app) as session:
        sessions.append(session)
        reply = await session.say("my order please" if tool else "hello", timeout=10)
        assert reply.text == ("It shipped." if tool else "Hi there.")
        assert [t.name for t in reply.tools] == (["lookup_order"] if tool else [])
        assert await session.wait_closed(10) == "connection_lost"
        with pytest.raises(EngineError) as caught:
            await session.say("still there?")
        assert caught.value.reason == "connection_lost"
