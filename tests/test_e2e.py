"""End to end over loopback: simulator (OpenAI stand-in) → signed webhook → our server → sideband → tools."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from aiohttp.test_utils import TestServer

from sideband import Accept, CallContext, IncomingCall, Refer, Reject, SessionConfig
from sideband.testing import (
    Script,
    SimCall,
    Simulator,
    caller_hangs_up,
    caller_says,
    model_calls,
    model_says,
    pause,
    run_app,
    wait_for_greeting,
)
from sideband.upstream.openai import CallControl, UpstreamError, retry_after, with_retries

from .conftest import TEST_SETTINGS, Stack, heard_at_verb, make_app, transfer_window

GREETING = wait_for_greeting("Hello, test desk.")


def client_types(call: Any) -> list[str]:
    return [e["type"] for e in call.received]


def outputs(call: Any) -> list[dict[str, Any]]:
    return [
        e["item"]
        for e in call.received
        if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output"
    ]


def accepts(stack: Stack, call_id: str) -> int:
    return sum(1 for r in stack.sim.requests if r.path.endswith(f"/{call_id}/accept"))


async def run_call(stack: Stack, script: Script, **kw: Any) -> Any:
    call = stack.sim.create_call(script, **kw)
    result = await stack.sender.deliver(stack.sim.incoming_event(call))
    assert result.status == 200, result
    return call


def order_lookup_round() -> Script:
    """Greeting, one ``lookup_order`` round, the model's answer, a clean hangup."""
    return Script(
        [
            GREETING,
            caller_says("Where is order 42?"),
            model_calls("lookup_order", {"order_id": "42"}),
            model_says("It shipped."),
            caller_hangs_up(),
        ]
    )


async def test_webhook_to_tool_round_trip(stack: Stack) -> None:
    call = await run_call(
        stack,
        order_lookup_round(),
    )
    await call.wait_done(timeout=10)
    await call.wait_ended(timeout=10)
    # One source for the session: accept body == first session.update's session.
    first = call.received[0]
    assert first["type"] == "session.update"
    assert first["session"] == call.accept_body
    assert call.accept_body["type"] == "realtime"
    assert [t["name"] for t in call.accept_body["tools"]] == [
        t["name"] for t in stack.app.tools.definitions()
    ]
    assert "OpenAI-Beta" not in str(call.received)
    types = client_types(call)
    assert types[:2] == ["session.update", "response.create"]  # exactly one greeting
    assert types.count("response.create") == 2
    out = outputs(call)
    assert len(out) == 1 and json.loads(out[0]["output"]) == {"order_id": "42", "status": "shipped"}
    # response.create after the output (never before the response's response.done, never during one)
    assert types.index("conversation.item.create") < len(types) - 1 - types[::-1].index("response.create")
    assert not [e for e in call.sent if e["type"] == "error"]
    await stack.wait_idle()
    assert call.call_id not in stack.service.registry


async def test_tool_rounds_hold_when_responses_stream_over_time() -> None:
    """With the simulator's events spread out (as the real service streams them), parallel calls still
    get their outputs and one response.create only after response.done: the server reports no error."""
    async with Simulator(event_gap=0.003) as sim, run_app(make_app(), sim, **TEST_SETTINGS) as stack:
        calls = [("lookup_order", {"order_id": "1"}), ("lookup_order", {"order_id": "2"})]
        script = Script(
            [
                GREETING,
                caller_says("Orders 1 and 2?"),
                model_calls(calls, preamble="Let me check both."),
                model_says("Both shipped."),
                caller_hangs_up(),
            ]
        )
        call = await run_call(stack, script)
        await call.wait_done(timeout=10)
        await stack.ended(call)
    assert len(outputs(call)) == 2 and client_types(call).count("response.create") == 2
    assert not [e for e in call.sent if e["type"] == "error"]


async def test_same_webhook_delivered_concurrently_accepts_once(stack: Stack) -> None:
    call = stack.sim.create_call(Script([GREETING]))
    event = stack.sim.incoming_event(call)
    results = await asyncio.gather(*(stack.sender.deliver(event, webhook_id="wh_same") for _ in range(8)))
    assert all(r.status == 200 for r in results)
    assert accepts(stack, call.call_id) == 1
    await call.wait_done(timeout=5)
    assert call.sideband_connects == 1
    # A different delivery (new webhook-id) for the same call never accepts twice either.
    again = await stack.sender.deliver(event, webhook_id="wh_other")
    assert again.status == 200 and accepts(stack, call.call_id) == 1


async def test_non_call_events_are_acknowledged_and_ignored(stack: Stack) -> None:
    for event in (
        {
            "object": "event",
            "id": "evt_1",
            "type": "response.completed",
            "created_at": 1,
            "data": {"id": "resp_1"},
        },
        {
            "object": "event",
            "id": "evt_2",
            "type": "live.call.incoming",
            "created_at": 1,
            "data": {"session_id": "sess_1"},
        },
        {"object": "event", "id": "evt_3", "type": "brand.new.type", "created_at": 1},
    ):
        result = await stack.sender.deliver(event)
        assert result.status == 200 and result.attempts == [200]
    assert not [r for r in stack.sim.requests if "/accept" in r.path]


async def test_accept_404_stops_without_sideband(stack: Stack) -> None:
    call = stack.sim.create_call(Script([]))
    stack.sim.fail_accept(call.call_id, 404)
    result = await stack.sender.deliver(stack.sim.incoming_event(call))
    assert result.status == 200 and result.attempts == [200]
    assert accepts(stack, call.call_id) == 1
    assert call.sideband_connects == 0 and call.call_id not in stack.service.registry


async def test_accept_5xx_and_timeout_are_retried_within_budget(stack: Stack) -> None:
    call = stack.sim.create_call(Script([GREETING]))
    stack.sim.fail_accept(call.call_id, 500, "timeout", 503)
    result = await stack.sender.deliver(stack.sim.incoming_event(call))
    assert result.status == 200
    assert accepts(stack, call.call_id) == 4 and call.status == "accepted"
    await call.wait_done(timeout=5)


async def test_unreachable_upstream_errors_say_why() -> None:
    """An operator must tell "connection refused" from "too many open files": the errno text is kept."""
    from sideband.upstream.openai import connect_sideband

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once closed
    async with aiohttp.ClientSession() as http:
        control = CallControl(http, f"http://127.0.0.1:{port}/v1", "sk-test")
        with pytest.raises(UpstreamError) as accept:
            await control.accept("rtc_x", {"type": "realtime"}, timeout=2)
    with pytest.raises(UpstreamError) as attach:
        await connect_sideband(f"ws://127.0.0.1:{port}/v1/realtime", "rtc_x", "sk-test")
    for exc in (accept.value, attach.value):
        assert exc.status is None and "Connect" in str(exc) and "refused" in str(exc).lower(), str(exc)


def test_upstream_error_text_keeps_no_credentials_and_no_false_errno() -> None:
    from sideband.upstream.openai import why

    proxy = ValueError("http://svc:hunter2@proxy.internal:3128 isn't a valid proxy")
    assert why(proxy) == "ValueError: http://proxy.internal:3128 isn't a valid proxy"
    dns = socket.gaierror(socket.EAI_NONAME, "Name or service not known")  # errno -2: no errno text
    assert why(dns) == "gaierror: [Errno -2] Name or service not known"


async def test_accept_exhausted_answers_503_and_redelivery_can_succeed(stack: Stack) -> None:
    call = stack.sim.create_call(Script([GREETING]))
    stack.sim.fail_accept(call.call_id, *([500] * 40))
    event = stack.sim.incoming_event(call)
    first = await stack.sender.deliver(event, webhook_id="wh_retry", max_attempts=1)
    assert first.status == 503
    stack.sim.calls[call.call_id].accept_faults.clear()
    second = await stack.sender.deliver(event, webhook_id="wh_retry", max_attempts=1)
    assert second.status == 200 and call.status == "accepted"


async def test_an_accept_that_may_have_gone_through_is_remembered_for_the_redelivery(stack: Stack) -> None:
    call = stack.sim.create_call(Script([GREETING]))
    # The first attempt accepts the call but its answer never comes; the rest get 500 until the budget
    # is spent: the webhook answers 503 and OpenAI redelivers, by which time the call no longer rings.
    stack.sim.fail_accept(call.call_id, "late", *([500] * 60))
    event = stack.sim.incoming_event(call)
    first = await stack.sender.deliver(event, webhook_id="wh_u", max_attempts=1)
    assert first.status == 503 and call.status == "accepted"  # accepted upstream all the same
    stack.sim.calls[call.call_id].accept_faults.clear()
    second = await stack.sender.deliver(event, webhook_id="wh_u", max_attempts=1)
    assert second.status == 200 and json.loads(second.bodies[0] or b"{}")["status"] == "accepted"
    await call.wait_connected(timeout=5)  # the call is not left answered with nothing behind it
    await call.wait_done(timeout=5)


async def test_a_redelivery_that_rejects_a_call_an_earlier_attempt_may_have_answered_hangs_it_up(
    stack: Stack,
) -> None:
    decisions = iter([Accept(), Reject(486)])  # the routing's answer changed between deliveries

    @stack.app.on_incoming
    async def route(call: IncomingCall) -> Accept | Reject:
        return next(decisions)

    call = stack.sim.create_call(Script([GREETING]))
    stack.sim.fail_accept(call.call_id, "late", *([500] * 60))  # answered upstream, then 500s: 503
    event = stack.sim.incoming_event(call)
    assert (await stack.sender.deliver(event, webhook_id="wh_u", max_attempts=1)).status == 503
    assert call.status == "accepted"
    second = await stack.sender.deliver(event, webhook_id="wh_u", max_attempts=1)
    assert second.status == 200 and json.loads(second.bodies[0] or b"{}")["status"] == "hung_up"
    await call.wait_ended(timeout=5)
    assert call.end_reason == "hangup_verb" and call.sideband_connects == 0


@pytest.mark.parametrize("settings_overrides", [{"accept_budget": 4.0}])  # (room for a slow machine)
async def test_redelivery_while_the_first_is_in_flight_is_409_until_it_is_handled(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    call = stack.sim.create_call(Script([GREETING]))
    stack.sim.fail_accept(call.call_id, *([500] * 400))  # the first delivery retries for its whole budget
    event = stack.sim.incoming_event(call)
    first = asyncio.create_task(stack.sender.deliver(event, webhook_id="wh_a", max_attempts=1))
    async with asyncio.timeout(5):
        while not accepts(stack, call.call_id):
            await asyncio.sleep(0.01)
    # OpenAI gave up waiting and redelivers; another event for the same call arrives too
    same = await stack.sender.deliver(event, webhook_id="wh_a", max_attempts=1)
    other = await stack.sender.deliver(event, webhook_id="wh_b", max_attempts=1)
    assert (same.status, other.status) == (409, 409), (same.bodies, other.bodies)
    assert (await first).status == 503  # accept kept failing: claims released
    stack.sim.calls[call.call_id].accept_faults.clear()
    again = await stack.sender.deliver(event, webhook_id="wh_a", max_attempts=1)
    assert again.status == 200 and call.status == "accepted"
    dup = await stack.sender.deliver(event, webhook_id="wh_b", max_attempts=1)
    assert dup.status == 200 and json.loads(dup.bodies[-1] or b"{}")["status"] == "duplicate"
    await call.wait_done(timeout=5)
    assert call.sideband_connects == 1


async def test_an_unexpected_error_answering_releases_the_claims(stack: Stack) -> None:
    call = stack.sim.create_call(Script([GREETING]))
    control = stack.service.control
    real_accept = control.accept
    calls = 0

    async def broken_once(*args: Any, **kw: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        await real_accept(*args, **kw)

    control.accept = broken_once  # type: ignore[method-assign]
    event = stack.sim.incoming_event(call)
    first = await stack.sender.deliver(event, webhook_id="wh_bug", max_attempts=1)
    assert first.status == 500
    second = await stack.sender.deliver(event, webhook_id="wh_bug", max_attempts=1)
    assert second.status == 200 and call.status == "accepted"


# The budget is not what these test: room for a retry after the first attempt's timeout, on a slow machine.
@pytest.mark.parametrize("settings_overrides", [{"accept_budget": 10.0}])
async def test_an_accept_that_went_through_unanswered_still_attaches(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    call = stack.sim.create_call(Script([GREETING]))
    stack.sim.fail_accept(call.call_id, "late")  # accepted upstream, but the answer never comes
    result = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert result.status == 200 and json.loads(result.bodies[-1] or b"{}")["status"] == "accepted"
    assert accepts(stack, call.call_id) == 2  # the retry found the call no longer ringing (404)
    await call.wait_done(timeout=5)
    assert call.sideband_connects == 1 and client_types(call)[0] == "session.update"


@pytest.mark.parametrize("settings_overrides", [{"accept_budget": 10.0}])
@pytest.mark.parametrize("again", [400, 409, 422])
async def test_an_accept_refused_after_an_unanswered_attempt_attaches(
    stack: Stack, again: int, settings_overrides: dict[str, Any]
) -> None:
    """The service may refuse an accept of a call already accepted (PROTOCOL does not say how): after an
    attempt that went unanswered, such a refusal attaches the call, it does not reject it."""
    call = stack.sim.create_call(Script([GREETING]))
    stack.sim.fail_accept(call.call_id, "late", again)  # accepted, unanswered; the retry is refused
    result = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert result.status == 200 and json.loads(result.bodies[-1] or b"{}")["status"] == "accepted"
    assert accepts(stack, call.call_id) == 2
    await call.wait_done(timeout=5)
    assert call.sideband_connects == 1 and client_types(call)[0] == "session.update"
    assert not [r for r in stack.sim.requests if r.path.endswith(("/reject", "/hangup"))]


async def test_an_accept_answered_200_whose_body_is_cut_is_taken() -> None:
    """The 200 is the answer: a body cut short after it must not make the accept look undone."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{")
        await writer.drain()
        writer.close()  # 1 byte of the 200 promised

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as http:
            control = CallControl(http, f"http://127.0.0.1:{port}/v1", "sk-test")
            await control.accept("rtc_x", {"type": "realtime"}, timeout=2)  # does not raise
            with pytest.raises(UpstreamError):  # where the body is the answer, a cut one is an error
                await control.client_secret({"type": "realtime"}, 600, timeout=2)
    finally:
        server.close()


@pytest.mark.parametrize("settings_overrides", [{"route_failure_status": 480}])
async def test_a_refused_accept_or_refer_rejects_the_call_instead(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    refused = stack.sim.create_call(Script([]))
    stack.sim.fail_accept(refused.call_id, 400)
    result = await stack.sender.deliver(stack.sim.incoming_event(refused))
    assert (
        result.status == 200 and refused.status == "rejected" and refused.reject_body == {"status_code": 480}
    )

    stack.app.on_incoming(lambda call: Refer("tel:+14155550123"))
    moved = stack.sim.create_call(Script([]))
    stack.sim.fail_verb(moved.call_id, "refer", 403)
    result = await stack.sender.deliver(stack.sim.incoming_event(moved))
    assert result.status == 200 and moved.status == "rejected" and moved.reject_body == {"status_code": 480}


@contextlib.asynccontextmanager
async def local_server(*routes: tuple[str, str, Any]) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    """A server on loopback answering ``(method, path, handler)`` routes: its base URL and a client
    session, both closed afterwards."""
    app = web.Application()
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            yield str(server.make_url("")).rstrip("/"), http
    finally:
        await server.close()


async def test_an_upstream_error_page_that_is_not_utf8_is_an_upstream_error() -> None:
    async def proxy_page(request: web.Request) -> web.Response:
        return web.Response(status=502, body=b"\xff\xfe<html>bad gateway\x00", content_type="text/html")

    async with local_server(("POST", "/v1/realtime/calls/{call_id}/accept", proxy_page)) as (url, http):
        control = CallControl(http, url + "/v1", "sk-test")
        with pytest.raises(UpstreamError) as caught:
            await control.accept("rtc_x", {"type": "realtime"})
    assert caught.value.status == 502 and caught.value.retryable and "bad gateway" in caught.value.body


@pytest.mark.parametrize("answer", ["nested", "nested_error", "redirect"])
async def test_a_vowel_mint_answer_that_is_no_token_is_an_upstream_error(answer: str) -> None:
    """A body nested deeper than Python's parser goes (a broken proxy), or a redirect: an UpstreamError
    that says what happened, never another exception; the redirect is not followed (it would repeat the
    POST as a GET)."""
    from sideband.upstream.vowel import VowelCore

    posts: list[str] = []

    async def mint(request: web.Request) -> web.Response:
        posts.append(request.method)
        if answer == "redirect":
            raise web.HTTPFound("/elsewhere/v1/realtime/sessions")
        body = "[" * 100_000 + "]" * 100_000
        return web.Response(
            status=200 if answer == "nested" else 500, text=body, content_type="application/json"
        )

    routes = [("*", "/v1/realtime/sessions", mint), ("*", "/elsewhere/v1/realtime/sessions", mint)]
    async with local_server(*routes) as (url, http):
        with pytest.raises(UpstreamError) as caught:
            await VowelCore(http, url, "vk-test").mint({"tools": []})
    assert posts == ["POST"]
    expected = {
        "nested": "non-JSON",
        "nested_error": "answered 500",
        "redirect": "redirecting to /elsewhere/v1/realtime/sessions",
    }[answer]
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    "location",
    [
        "/v1/realtime/calls/rtc_abc",
        "/v1/realtime/calls/rtc_abc/",
        "/v1/realtime/calls/rtc_abc?region=eu",
        "https://api.example/v1/realtime/calls/rtc_abc#x",
    ],
)
async def test_the_call_id_is_the_last_segment_of_the_locations_path(location: str) -> None:
    async def created(request: web.Request) -> web.Response:
        return web.Response(status=201, text="v=0 answer", headers={"Location": location})

    async with local_server(("POST", "/v1/realtime/calls", created)) as (url, http):
        control = CallControl(http, url + "/v1", "sk-test")
        assert await control.create_call("v=0", {"type": "realtime"}) == ("rtc_abc", "v=0 answer")


async def silent_server() -> tuple[TestServer, list[str]]:
    """A started server that takes every POST and never answers; the paths posted to, in order."""
    posts: list[str] = []

    async def never(request: web.Request) -> web.Response:
        posts.append(request.path)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_post("/{tail:.*}", never)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server, posts


async def cancelled_as_its_timer_fires(
    monkeypatch: pytest.MonkeyPatch, limit: float, start: Callable[[], Awaitable[Any]]
) -> asyncio.Future[Any]:
    """Run ``start()`` with every loop timer due ``limit`` seconds after it was set followed, in the same
    loop iteration, by a cancel of the task (a shutdown's cancel landing as a request's timeout fires:
    the race). Returns the task once it is done (5 s at most)."""
    loop = asyncio.get_running_loop()
    call_at = loop.call_at
    task: asyncio.Future[Any] | None = None

    def racing_call_at(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        if task is None or abs(when - (loop.time() + limit)) > 0.05:
            return call_at(when, callback, *args, **kwargs)

        def fire(*a: Any) -> None:
            callback(*a)
            assert task is not None
            task.cancel()  # the shutdown's cancel, right behind the timer's

        return call_at(when, fire, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", racing_call_at)
    try:
        task = asyncio.ensure_future(start())
        await asyncio.wait([task], timeout=5)
    finally:
        monkeypatch.undo()
    return task


@pytest.mark.parametrize("request_kind", ["hangup", "accept", "create_call", "mint"])
async def test_a_cancellation_landing_as_a_request_times_out_is_not_lost(
    request_kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shutdown cancelling a request just as its own timeout fires: the request ends cancelled, not
    timed out (a hangup cut short by the shutdown must not try again). The cancel is delivered right
    after the timer's own, in the same loop iteration, which is the race."""
    from sideband.upstream.vowel import VowelCore

    server, _ = await silent_server()
    limit = 0.3
    try:
        async with aiohttp.ClientSession() as http:
            control = CallControl(http, str(server.make_url("/v1")), "sk-test")
            core = VowelCore(http, str(server.make_url("")), "vk-test")
            request: Callable[[], Awaitable[Any]] = {
                "hangup": lambda: control.hangup("rtc_x", timeout=limit),
                "accept": lambda: control.accept("rtc_x", {"type": "realtime"}, timeout=limit),
                "create_call": lambda: control.create_call("v=0", {"type": "realtime"}, timeout=limit),
                "mint": lambda: core.mint({"tools": []}, timeout=limit),
            }[request_kind]
            task = await cancelled_as_its_timer_fires(monkeypatch, limit, request)
            assert task.done() and task.cancelled(), task
    finally:
        await server.close()


class TwoAddresses(AbstractResolver):
    """api.test has two addresses (say AAAA + A): the first never answers a SYN, the second works."""

    def __init__(self, slow: str, good: str) -> None:
        self.slow, self.good = slow, good

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        return [
            {"hostname": host, "host": h, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}
            for h in (self.slow, self.good)
        ]

    async def close(self) -> None:
        pass


async def test_a_cancel_absorbed_by_happy_eyeballs_is_not_retried_past() -> None:
    """A host with two addresses, the first silent: aiohttp races them (happy eyeballs) and cancels the
    loser once the second connects. A shutdown's cancel landing then is absorbed by the loser; the
    attempt goes on and fails (503): the retry loop sees the pending cancel and stops, cancelled."""
    hangups: list[int] = []

    async def hangup(request: web.Request) -> web.Response:
        hangups.append(1)
        return web.Response(status=503 if len(hangups) == 1 else 200)

    app = web.Application()
    app.router.add_post("/v1/realtime/calls/{cid}/hangup", hangup)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    port = server.port
    # 127.0.0.3:port: a listener whose accept queue is full, so a SYN to it goes unanswered (a dead
    # IPv6 route, a blackholed address).
    clog = socket.socket()
    clog.bind(("127.0.0.3", port))
    clog.listen(0)
    fill = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # (on loopback the handshake completes in the call)
            s.connect(("127.0.0.3", port))
        fill.append(s)

    loop = asyncio.get_running_loop()
    target: asyncio.Task[Any] | None = None

    def watch() -> None:
        # The request's task awaits a happy-eyeballs loser it just cancelled (staggered_race's finally):
        # the shutdown's cancel lands now.
        assert target is not None
        if target.done():
            return
        waiter = getattr(target, "_fut_waiter", None)
        if (
            isinstance(waiter, asyncio.Task)
            and waiter.get_coro().__name__ == "run_one_coro"
            and waiter.cancelling()
        ):
            target.cancel()
            return
        loop.call_soon(watch)

    connector = aiohttp.TCPConnector(
        limit=0, ttl_dns_cache=300, keepalive_timeout=60, resolver=TwoAddresses("127.0.0.3", "127.0.0.1")
    )
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            control = CallControl(http, f"http://api.test:{port}/v1", "sk-test")

            async def verb() -> str:  # service.launch's verb(): a hangup under with_retries
                await with_retries(
                    lambda t: control.hangup("rtc_x", timeout=t), budget=5.0, attempt_timeout=2.0
                )
                return "hung up"

            target = asyncio.ensure_future(verb())
            loop.call_soon(watch)
            await asyncio.wait([target], timeout=10)
    finally:
        clog.close()
        for s in fill:
            s.close()
        await server.close()
    assert target.done()
    assert target.cancelled() and len(hangups) == 1, (target, hangups)


async def test_the_webhook_sender_is_cancelled_even_as_an_attempt_times_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The testing kit's sender retries timeouts: a cancel landing as one fires stops it, not a retry."""
    from sideband.testing import WebhookSender

    server, posts = await silent_server()
    sender = WebhookSender(str(server.make_url("/hook")), "whsec_" + "A" * 32)
    try:
        task = await cancelled_as_its_timer_fires(
            monkeypatch, 0.3, lambda: sender.deliver({"type": "x"}, timeout=0.3, max_attempts=3)
        )
        assert task.done() and task.cancelled() and posts == ["/hook"], (task, posts)
    finally:
        await sender.close()
        await server.close()


async def test_calls_still_live_when_the_drain_ends_are_hung_up(stack: Stack) -> None:
    call = await run_call(stack, Script([GREETING, pause(60)]))
    await call.wait_for(lambda c: bool(c.responses) and c.responses[0].status == "completed", timeout=5)
    await asyncio.wait_for(stack.service.registry.drain(0.2), 5)
    assert [r.path for r in stack.sim.requests if r.path.endswith("/hangup")] == [
        f"/v1/realtime/calls/{call.call_id}/hangup"
    ]
    assert stack.service.registry.recent[call.call_id].reason == "shutdown"
    assert call.ended


@pytest.mark.parametrize(
    "mode, gone_status, reason",
    [
        ("clean", 404, "remote_closed"),
        ("abnormal", 404, "call_not_found"),
        ("abnormal", 410, "call_not_found"),
    ],
)
async def test_caller_hangup_ends_the_call(stack: Stack, mode: str, gone_status: int, reason: str) -> None:
    stack.sim.gone_status = gone_status  # type: ignore[assignment]  # (the re-attach after a drop is refused)
    ended: list[str] = []
    stack.app.on_call_end(lambda ctx, summary: ended.append(summary.reason))
    call = await run_call(stack, Script([GREETING, caller_hangs_up(mode)]))
    await call.wait_ended(timeout=5)
    await stack.ended(call, timeout=5)  # (its end hooks have run)
    await stack.wait_idle()
    assert ended == [reason]


async def test_session_expired_ends_the_call(stack: Stack) -> None:
    call = await run_call(stack, Script([GREETING]))
    await call.wait_done(timeout=5)
    runtime = stack.service.registry.calls[call.call_id]
    stack.sim.expire(call)
    await asyncio.wait_for(runtime.wait_closed(), 5)
    assert runtime.summary.reason == "session_expired"


async def test_tool_failures_become_model_visible_outputs(stack: Stack) -> None:
    call = await run_call(
        stack,
        Script(
            [
                GREETING,
                caller_says("Do things."),
                model_calls(
                    [
                        ("nope", {}),
                        ("broken", {}),
                        ("lookup_order", '{"order_id": '),
                        ("refuse", {"reason": "policy"}),
                    ],
                    undeclared=True,  # (the model makes "nope" up)
                ),
                model_says("Sorry."),
                caller_hangs_up(),
            ]
        ),
    )
    await call.wait_done(timeout=10)
    outs = {o["call_id"]: json.loads(o["output"]) for o in outputs(call)}
    assert len(outs) == 4
    by_error = sorted(v["error"] for v in outs.values())
    assert by_error == ["invalid_arguments", "tool_failed", "tool_failed", "unknown_tool"]
    assert "secret" not in json.dumps(list(outs.values()))
    assert any(v.get("message") == "cannot do that: policy" for v in outs.values())
    # One response.create for the whole batch.
    types = client_types(call)
    last_output = max(i for i, t in enumerate(types) if t == "conversation.item.create")
    assert types[last_output + 1 :].count("response.create") == 1


async def test_end_call_tool_hangs_up_after_output_and_goodbye(stack: Stack) -> None:
    """The goodbye takes real time to play (0.2 s at 40 characters a second): a hangup sent with the
    tool's output, or before the goodbye was heard, comes before the goodbye's ``stopped``."""
    stack.sim.playback_rate = 40.0
    call = stack.sim.create_call(
        Script(
            [GREETING, caller_says("That's all, bye."), model_calls("end_call", {}), model_says("Goodbye!")]
        )
    )
    heard = heard_at_verb(stack.sim, call)
    try:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        await call.wait_ended(timeout=10)
        heard_at_hangup = await asyncio.wait_for(heard, 10)
    finally:
        heard.cancel()
    assert call.end_reason == "hangup_verb"
    assert sum(1 for r in stack.sim.requests if r.path.endswith("/hangup")) == 1
    goodbye = call.responses[-1]
    assert goodbye.text == "Goodbye!" and goodbye.status == "completed"
    assert heard_at_hangup == [call.responses[0].response_id, goodbye.response_id]  # greeting, goodbye
    types = client_types(call)
    output_at = types.index("conversation.item.create")
    assert types[output_at + 1 :] == ["response.create"]  # output, then the request for the goodbye
    assert (await stack.ended(call)).reason == "end_call_tool"


async def test_the_hangup_waits_until_the_goodbye_has_been_heard(stack: Stack) -> None:
    """The caller hears the goodbye after its response.done (0.6 s of speech here): the hangup waits for
    the end of playback; one sent on response.done would cut the goodbye off (no stopped for it)."""
    stack.sim.playback_rate = 100.0
    goodbye = "Goodbye, and thank you for calling the order desk today."
    call = await run_call(
        stack,
        Script([GREETING, caller_says("That's all."), model_calls("end_call", {}), model_says(goodbye)]),
    )
    await call.wait_ended(timeout=10)
    last = call.responses[-1]
    assert last.text == goodbye and last.status == "completed"
    stops = [e["response_id"] for e in call.sent if e["type"] == "output_audio_buffer.stopped"]
    assert stops[-1] == last.response_id
    assert call.end_reason == "hangup_verb" and (await stack.ended(call)).reason == "end_call_tool"


async def test_transfer_tool_refers_to_allow_listed_target(stack: Stack) -> None:
    call = await run_call(
        stack,
        Script(
            [
                GREETING,
                caller_says("A human please."),
                model_calls("transfer_call", {"destination": "human"}),
                model_says("Transferring you."),
            ]
        ),
    )
    await call.wait_ended(timeout=10)
    assert call.status == "referred" and call.refer_target == "tel:+14155550123"


@pytest.mark.parametrize("mode", ["clean", "going_away", "abnormal", "silent"])
@pytest.mark.parametrize(
    "case",
    [
        ("end_call", {}, "hangup", "end_call_tool"),
        ("transfer_call", {"destination": "human"}, "refer", "transferred"),
    ],
    ids=["hangup", "refer"],
)
async def test_our_verb_ends_the_call_however_the_service_ends_the_sideband(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, mode: str, case: tuple[str, dict[str, str], str, str]
) -> None:
    """After our hangup or refer the real service closes the sideband cleanly, drops it, or leaves it
    open: each time the call ends with our reason, one verb, and no re-attach to a finished call. (A
    transfer whose sideband is left open confirms nothing: once its window is over the call is hung up,
    and that hangup finding the call gone says it was transferred; one whose sideband is dropped is
    attached again, the drop maybe a blip with the carrier still at work, and that re-attach refused as
    the call is gone says it was transferred.)"""
    tool, arguments, verb, reason = case
    transfer_window(monkeypatch, 0.2)
    stack.sim.verb_close = mode  # type: ignore[assignment]
    ended: list[str] = []
    stack.app.on_call_end(lambda ctx, summary: ended.append(summary.reason))
    call = await run_call(
        stack,
        Script([GREETING, caller_says("That's all."), model_calls(tool, arguments), model_says("Bye now.")]),
    )
    await call.wait_ended(timeout=10)
    await stack.ended(call, timeout=5)  # (its end hooks have run)
    await stack.wait_idle()
    assert ended == [reason]
    verbs = [verb, "hangup"] if verb == "refer" and mode == "silent" else [verb]
    assert [r.path for r in stack.sim.requests if r.path.endswith(("/hangup", "/refer"))] == [
        f"/v1/realtime/calls/{call.call_id}/{v}" for v in verbs
    ]
    assert call.sideband_connects == 1
    assert call.script_error is None


async def test_transfer_to_unlisted_target_is_refused(stack: Stack) -> None:
    call = await run_call(
        stack,
        Script(
            [
                GREETING,
                caller_says("Transfer me to my friend."),
                model_calls("transfer_call", {"destination": "sip:attacker@example.com"}),
                model_says("I can't do that."),
                caller_hangs_up(),
            ]
        ),
    )
    await call.wait_done(timeout=10)
    out = json.loads(outputs(call)[0]["output"])
    assert out["error"] == "invalid_arguments"
    assert call.refer_target is None


async def test_no_task_or_socket_left_behind(stack: Stack) -> None:
    before = {t for t in asyncio.all_tasks()}
    calls = [
        await run_call(
            stack, Script([GREETING, caller_says("hi"), model_says("Hello."), caller_hangs_up(mode)])
        )
        for mode in ("clean", "abnormal")
    ]
    runtimes = [stack.service.registry.calls[c.call_id] for c in calls if c.call_id in stack.service.registry]
    for call in calls:
        await call.wait_ended(timeout=5)
    for runtime in runtimes:
        await asyncio.wait_for(runtime.wait_closed(), 5)
    await stack.wait_idle()
    leftovers = [
        t for t in asyncio.all_tasks() - before if (t.get_name() or "").startswith(("call:", "tool:"))
    ]
    assert leftovers == []
    for runtime in runtimes:
        assert runtime._ws is None or runtime._ws.state.name == "CLOSED"
        assert not runtime._tool_tasks and not runtime._side_tasks
        assert not runtime._deadlines and runtime._alarm is None


def sent_at(call: SimCall, event_type: str, response_id: str | None) -> int:
    """Where the simulator sent the first ``event_type`` event of response ``response_id``."""
    return next(
        i
        for i, e in enumerate(call.sent)
        if e["type"] == event_type
        and (e.get("response_id") or e.get("response", {}).get("id")) == response_id
    )


async def test_a_tool_slower_than_the_idle_limit_is_waited_for_and_the_caller_hears_its_answer() -> None:
    """The caller waits for a slow lookup, and listens to its answer: not idle. Their silence counts once
    the model has finished speaking, and only then does the idle limit end the call."""
    app = make_app()

    @app.tool(filler_after=None)
    async def slow_lookup(ctx: CallContext) -> str:
        """Takes a while."""
        await asyncio.sleep(1.0)
        return "found it"

    async with (
        Simulator(playback_rate=100.0) as sim,
        run_app(app, sim, **{**TEST_SETTINGS, "max_idle_duration": 0.75}) as stack,
    ):
        answer = "I found your order, it ships tomorrow morning."  # about 0.5 s of speech
        call = await run_call(
            stack,
            Script(
                [GREETING, caller_says("Find my order."), model_calls("slow_lookup", {}), model_says(answer)]
            ),
        )
        await call.wait_ended(timeout=10)
        assert call.script_error is None  # the answer was spoken: the limit did not cut the wait short
        assert call.end_reason == "hangup_verb" and (await stack.ended(call)).reason == "idle_timeout"
        said = [r for r in call.responses if r.text]
        assert (
            said[-2].text == answer and "goodbye" in (said[-1].request or {}).get("instructions", "").lower()
        )
        answered = next(
            i for i, e in enumerate(call.sent) if e.get("response", {}).get("id") == said[-2].response_id
        )
        heard = sent_at(call, "output_audio_buffer.stopped", said[-2].response_id)
        goodbye = sent_at(call, "response.created", said[-1].response_id)
        assert answered < heard < goodbye  # the goodbye came after the answer had been heard


async def test_a_silent_caller_is_asked_whether_they_are_still_there_then_bid_goodbye() -> None:
    """``Sideband(idle_prompts=1)``: after a silent idle period the model asks once whether the caller is
    still there; a caller who answers is asked again after the next silence; one who stays silent a
    period after the question gets the goodbye and the hangup."""
    app = make_app(idle_prompts=1, idle_prompt_instructions="Ask if the caller is still on the line.")
    async with (
        Simulator(playback_rate=100.0) as sim,
        run_app(app, sim, **{**TEST_SETTINGS, "max_idle_duration": 2.0}) as stack,
    ):
        # The caller answers about 1 s after the first question, 1 s before the second silence ends.
        call = await run_call(stack, Script([GREETING, pause(3.0), caller_says("Yes, I am here.")]))
        await call.wait_ended(timeout=15)
        assert call.end_reason == "hangup_verb" and (await stack.ended(call)).reason == "idle_timeout"
    asked = [r for r in call.responses if r.source == "auto"]  # (what no script step asked for)
    assert [(r.request or {}).get("instructions") for r in asked] == [
        "Ask if the caller is still on the line.",  # after the greeting's silence
        "Ask if the caller is still on the line.",  # after the silence that followed the caller's words
        app.goodbye_instructions,
    ]
    spoke = next(i for i, e in enumerate(call.sent) if e["type"] == "input_audio_buffer.speech_started")
    assert sent_at(call, "response.created", asked[0].response_id) < spoke
    assert spoke < sent_at(call, "response.created", asked[1].response_id)


async def test_the_servers_idle_prompts_do_not_keep_a_silent_call_up() -> None:
    """With server VAD's ``idle_timeout_ms``, the model asks a silent caller "are you still there?" on its
    own, again and again. Those prompts are not the caller: our idle limit still ends the call, after the
    prompt being said when it came due, with the goodbye and a hangup."""
    app = make_app(session=SessionConfig(turn_detection={"type": "server_vad", "idle_timeout_ms": 250}))
    # Prompts of 0.5 s (50 characters at 100 a second) after 0.25 s of silence each: the second is said
    # from about 1.0 s to 1.5 s, and the limit comes due within it, however late each prompt starts.
    prompt = "Hello? Are you still there? I am here to help you."
    async with (
        Simulator(playback_rate=100.0, idle_prompt_text=prompt) as sim,
        run_app(app, sim, **{**TEST_SETTINGS, "max_idle_duration": 1.3}) as stack,
    ):
        call = await run_call(stack, Script([GREETING]))
        await call.wait_ended(timeout=10)
        assert call.end_reason == "hangup_verb" and (await stack.ended(call)).reason == "idle_timeout"
        prompts = [r for r in call.responses if r.trigger == "idle"]
        assert len(prompts) >= 2 and all(r.text == sim.idle_prompt_text for r in prompts)
        assert len([e for e in call.sent if e["type"] == "input_audio_buffer.timeout_triggered"]) == len(
            prompts
        )
        goodbye = call.responses[-1]
        assert "goodbye" in (goodbye.request or {}).get("instructions", "").lower()
        last = next(r for r in reversed(call.responses[:-1]) if r.trigger == "idle")
        assert sent_at(call, "output_audio_buffer.stopped", last.response_id) < sent_at(
            call, "response.created", goodbye.response_id
        )  # the prompt under way was heard to its end first
        assert client_types(call).count("response.create") == 2  # the greeting and the goodbye


async def test_a_socket_lost_while_the_caller_listens_does_not_cut_the_answer_short() -> None:
    """The sideband drops just after the model's answer is done, while the caller still hears it: the
    re-attached call knows the answer plays on, so the idle limit waits for its stop (which comes on the
    new socket) instead of saying goodbye over the model's last words."""
    async with (
        Simulator(playback_rate=40.0) as sim,
        run_app(make_app(), sim, **{**TEST_SETTINGS, "max_idle_duration": 1.0}) as stack,
    ):
        answer = "Your order left our warehouse this morning and arrives on Friday."  # about 1.6 s
        call = await run_call(
            stack, Script([GREETING, caller_says("Where is my order?"), model_says(answer)])
        )
        await call.wait_for(
            lambda c: any(r.text == answer and r.status == "completed" for r in c.responses),
            timeout=10,
            what="the answer's response.done",
        )
        await sim.drop_sideband(call, "abnormal")
        await call.wait_ended(timeout=10)
        assert call.sideband_connects == 2
        assert call.end_reason == "hangup_verb" and (await stack.ended(call)).reason == "idle_timeout"
        said = [r for r in call.responses if r.text]
        assert said[-2].text == answer
        heard = sent_at(call, "output_audio_buffer.stopped", said[-2].response_id)
        goodbye = sent_at(call, "response.created", said[-1].response_id)
        assert heard < goodbye  # the answer was heard to its end before the goodbye began


async def test_tool_round_over_permessage_deflate() -> None:
    """With ``SIDEBAND_WS_COMPRESSION`` the sideband negotiates deflate; every event still arrives whole."""
    async with (
        Simulator(ws_compression=True) as sim,
        run_app(make_app(), sim, **{**TEST_SETTINGS, "ws_compression": True}) as stack,
    ):
        call = await run_call(
            stack,
            order_lookup_round(),
        )
        await call.wait_done(timeout=10)
        await call.wait_ended(timeout=10)
        handshakes = [r for r in sim.requests if r.path.endswith("/realtime") and r.query.get("call_id")]
        assert len(handshakes) == 1
        assert "permessage-deflate" in handshakes[0].headers.get("Sec-WebSocket-Extensions", "")
        out = outputs(call)
        assert len(out) == 1 and json.loads(out[0]["output"]) == {"order_id": "42", "status": "shipped"}
        assert client_types(call).count("response.create") == 2
        summary = await stack.ended(call)
        assert summary.reason == "remote_closed" and [t.outcome for t in summary.tools] == ["ok"]


async def test_a_redelivery_attaches_when_the_instance_that_accepted_died_before_answering(
    stack: Stack,
) -> None:
    """The mark goes into the (shared) store before the first accept attempt: an instance killed after
    its accept went through leaves it, and the redelivery that finds the call no longer ringing attaches
    instead of leaving an answered call with nobody on it."""
    answered = stack.sim.create_call(Script([GREETING]))
    assert (await stack.sender.deliver(stack.sim.incoming_event(answered))).status == 200
    mark = f"accept_uncertain:{answered.call_id}"
    assert not await stack.service.store.claim(mark, 1.0)  # held from before its accept

    gone = stack.sim.create_call(Script([GREETING]))
    stack.sim.fail_accept(gone.call_id, 404)  # the caller left while it rang
    result = await stack.sender.deliver(stack.sim.incoming_event(gone), max_attempts=1)
    assert json.loads(result.bodies[-1] or b"{}")["status"] == "call_gone"
    assert await stack.service.store.claim(f"accept_uncertain:{gone.call_id}", 1.0)  # nothing kept

    call = stack.sim.create_call(Script([GREETING]))
    # what a dying instance leaves: its mark, and its accept, gone through upstream
    assert await stack.service.store.claim(f"accept_uncertain:{call.call_id}", 3700)
    await stack.service.control.accept(call.call_id, stack.app.plan().session, timeout=2)
    result = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert result.status == 200 and json.loads(result.bodies[-1] or b"{}")["status"] == "accepted"
    await call.wait_done(timeout=5)
    assert call.sideband_connects == 1


async def test_call_control_retries_wait_as_the_server_asks() -> None:
    loop = asyncio.get_running_loop()
    tries: list[float] = []

    async def attempt(timeout: float) -> str:
        tries.append(loop.time())
        if len(tries) == 1:
            raise UpstreamError("POST /x answered 429", 429, retry_after=0.5)
        return "ok"

    assert await with_retries(attempt, budget=5.0, attempt_timeout=1.0) == "ok"
    assert tries[1] - tries[0] >= 0.45  # not the usual 50 ms

    tries.clear()
    timeouts: list[float] = []

    async def far_later(timeout: float) -> str:
        tries.append(loop.time())
        timeouts.append(timeout)
        raise UpstreamError("POST /x answered 503", 503, retry_after=60)

    started = loop.time()
    with pytest.raises(UpstreamError):  # past the budget: one last try at its end, not a minute later
        await asyncio.wait_for(with_retries(far_later, budget=4.0, attempt_timeout=1.5), 6.0)
    # The last try keeps time enough to be answered (an attempt's timeout, or half of what is left).
    assert len(tries) == 2 and 2.3 <= tries[1] - started <= 3.0, tries[1] - started  # (about 2.5 s)
    assert 1.2 <= timeouts[1] <= 1.5, timeouts

    tries.clear()
    timeouts.clear()
    started = loop.time()
    with pytest.raises(UpstreamError):
        await asyncio.wait_for(with_retries(far_later, budget=1.0, attempt_timeout=1.0), 3.0)
    assert len(tries) == 2 and 0.4 <= tries[1] - started <= 0.9, tries[1] - started  # (about 0.5 s)
    assert 0.3 <= timeouts[1] <= 0.5, timeouts

    tries.clear()

    async def later_then_fine(timeout: float) -> str:  # a hangup answered 503 Retry-After: 60, then taken
        tries.append(loop.time())
        if len(tries) == 1:
            raise UpstreamError("POST /x answered 503", 503, retry_after=60)
        return "ok"

    assert await with_retries(later_then_fine, budget=1.0, attempt_timeout=1.0) == "ok"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("3", 3.0),
        (" 120 ", 120.0),
        ("Sun, 22 Nov 2026 10:00:05 GMT", 5.0),
        ("Sun, 22 Nov 2026 09:59:00 GMT", 0.0),  # in the past: no wait
        ("999999", 3600.0),  # capped at an hour
        ("soon", None),
        ("\u00b2", None),  # a digit to str.isdigit(), not to float()
        ("-1", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_header_values(value: str | None, expected: float | None) -> None:
    now = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC).timestamp()
    assert retry_after(value, now=lambda: now) == expected


async def test_a_rest_refusal_carries_its_retry_after() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Length: 4\r\n\r\nslow")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as http:
            control = CallControl(http, f"http://127.0.0.1:{port}/v1", "sk-test")
            with pytest.raises(UpstreamError) as caught:
                await control.hangup("rtc_x", timeout=2)
    finally:
        server.close()
    assert (caught.value.status, caught.value.retry_after, caught.value.body) == (429, 2.0, "slow")


async def test_requests_never_sent_twice_do_not_go_on_a_connection_the_server_may_have_closed() -> None:
    """A server closes a keep-alive connection it finds idle, as a request goes out on it: a hangup is
    tried again, but a REFER or a WebRTC call's creation, lost that way, cannot be. Those open a
    connection of their own; the others keep theirs."""
    served: dict[object, int] = {}  # requests per connection (its client's port)

    async def handle(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peer = request.transport.get_extra_info("peername")
        seen = served[peer] = served.get(peer, 0) + 1
        if seen > 1 and request.path.endswith(("/refer", "/realtime/calls")):
            request.transport.abort()  # (its idle timer fired as the request came in)
            return web.Response()
        if request.path == "/v1/realtime/calls":
            await request.read()
            return web.Response(status=201, text="v=0", headers={"Location": "/v1/realtime/calls/rtc_n"})
        return web.Response()

    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", handle)
    async with TestServer(app, port=0) as server:
        shared = aiohttp.ClientSession(connector=aiohttp.TCPConnector(keepalive_timeout=60))
        unshared = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        async with shared, unshared:
            control = CallControl(shared, str(server.make_url("/v1")), "sk-test", unshared=unshared)
            for _ in range(2):
                await control.hangup("rtc_a", timeout=2)
                await control.refer("rtc_a", "tel:+14155550100", timeout=2)
                assert await control.create_call("v=0", {"type": "realtime"}, timeout=2) == ("rtc_n", "v=0")
    assert sorted(served.values()) == [1, 1, 1, 1, 2]  # the hangups on one connection


async def test_the_service_sends_a_refer_on_a_connection_of_its_own(stack: Stack) -> None:
    """A phone call's REFER does not go on the connection the accept left in the pool; a hangup does."""
    call = stack.sim.create_call(Script([GREETING]))
    assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    await stack.service.control.refer(call.call_id, "tel:+14155550100", timeout=2)
    await stack.service.control.hangup(call.call_id, timeout=2)
    peers = {r.path.rsplit("/", 1)[-1]: r.peer for r in stack.sim.requests if r.method == "POST"}
    assert set(peers) == {"accept", "refer", "hangup"} and None not in peers.values()
    assert peers["accept"] == peers["hangup"] != peers["refer"]
