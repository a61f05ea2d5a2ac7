"""WebRTC doors: SDP relay (unified interface) and browser-first handoff with signed tickets."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import socket
import sys
import threading
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_protocol import RequestHandler

from sideband import CallContext, Sideband
from sideband.edge import app as edge
from sideband.service import NONCE_MARGIN
from sideband.stores import StoreUnavailable
from sideband.testing import (
    Script,
    Simulator,
    caller_hangs_up,
    caller_says,
    model_calls,
    model_says,
    pause,
    run_app,
)
from sideband.tickets import TicketSigner

from .conftest import TEST_SETTINGS, Stack, capture_logs, make_app
from .test_edge import StoreFailingOnce

OFFER = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"


async def post_json(stack: Stack, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(stack.url(path), json=body) as resp:
        return resp.status, await resp.json()


async def test_sdp_relay_creates_call_and_attaches_sideband(stack: Stack) -> None:
    stack.sim.next_webrtc_script = Script(
        [
            caller_says("Where is order 7?"),
            model_calls("lookup_order", {"order_id": "7"}),
            model_says("Shipped."),
            caller_hangs_up(),
        ]
    )
    async with (
        aiohttp.ClientSession() as http,
        http.post(stack.url("/rtc/calls"), data=OFFER, headers={"content-type": "application/sdp"}) as resp,
    ):
        assert resp.status == 201
        assert resp.content_type == "application/sdp"
        answer = await resp.text()
        call_id = resp.headers["Location"].rsplit("/", 1)[-1]
    assert answer.startswith("v=0")
    call = stack.sim.calls[call_id]
    # The relay sent the app's session config as the multipart `session` part.
    relay = next(r for r in stack.sim.requests if r.path == "/v1/realtime/calls")
    assert relay.status == 201
    await call.wait_done(timeout=10)
    assert call.sideband_connects == 1
    assert call.received[0]["type"] == "session.update"
    assert any(e["type"] == "conversation.item.create" for e in call.received)


async def test_a_browsers_call_is_not_offered_the_transfer_tool(stack: Stack) -> None:
    """A transfer is a SIP REFER: a browser's call has no phone line to hand over."""
    assert stack.app.transfer_tool == "transfer_call"  # the test app offers it on phone calls
    stack.sim.next_webrtc_script = Script([caller_hangs_up()])
    async with (
        aiohttp.ClientSession() as http,
        http.post(stack.url("/rtc/calls"), data=OFFER, headers={"content-type": "application/sdp"}) as resp,
    ):
        assert resp.status == 201
        call = stack.sim.calls[resp.headers["Location"].rsplit("/", 1)[-1]]
    await call.wait_done(timeout=10)
    names = [t["name"] for t in call.received[0]["session"]["tools"]]
    assert "transfer_call" not in names and "lookup_order" in names


async def test_sdp_relay_refuses_non_sdp(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            stack.url("/rtc/calls"), data="hello", headers={"content-type": "application/sdp"}
        ) as r:
            assert r.status == 400
        async with http.post(stack.url("/rtc/calls"), json={"sdp": OFFER}) as r:
            assert r.status == 415
    assert not [r for r in stack.sim.requests if r.path == "/v1/realtime/calls"]


async def test_browser_first_handoff_valid_forged_expired_reused(stack: Stack) -> None:
    status, minted = await post_json(stack, "/rtc/sessions", {})
    assert status == 200
    assert minted["client_secret"].startswith("ek_")
    assert minted["calls_url"] == stack.sim.base_url + "/realtime/calls"
    ticket = minted["ticket"]

    call = stack.sim.create_webrtc_call(Script([]))
    status, body = await post_json(stack, "/rtc/handoff", {"call_id": call.call_id, "ticket": ticket})
    assert (status, body["status"]) == (200, "attached")
    assert call.sideband_connects == 1

    # Reused ticket (even for another call): refused.
    other = stack.sim.create_webrtc_call(Script([]))
    status, body = await post_json(stack, "/rtc/handoff", {"call_id": other.call_id, "ticket": ticket})
    assert status == 403 and "used" in body["error"]

    # Forged: signed with another key.
    forged, _ = TicketSigner(b"not the server key", 60).issue()
    with capture_logs() as logs:
        status, _ = await post_json(stack, "/rtc/handoff", {"call_id": other.call_id, "ticket": forged})
    assert status == 403
    refused = [e for e in logs if e["event"] == "rtc.handoff_refused"]
    assert [e.get("call_id") for e in refused] == [other.call_id]  # a line about a call names it

    # Signed by an instance with a longer SIDEBAND_RTC_KEY_TTL (same key, shared store): remembered as
    # spent for as long as it stays valid, and an hour more.
    claims = StoreFailingOnce(stack.service.store, "(no key)")
    stack.service.store = claims
    longer, info = TicketSigner(stack.settings.ticket_key(), 7260).issue()
    status, body = await post_json(stack, "/rtc/handoff", {"call_id": other.call_id, "ticket": longer})
    assert (status, body["status"]) == (200, "attached")
    assert claims.ttls[f"ticket:{info.nonce}"] > 7259 + NONCE_MARGIN
    other = stack.sim.create_webrtc_call(Script([]))

    # Expired: the server's own key, issued in the past.
    old, _ = TicketSigner(stack.settings.ticket_key(), 60, clock=lambda: time.time() - 3600).issue()
    status, body = await post_json(stack, "/rtc/handoff", {"call_id": other.call_id, "ticket": old})
    assert status == 403 and "expired" in body["error"]

    # No ticket, garbage call id, garbage body.
    status, _ = await post_json(stack, "/rtc/handoff", {"call_id": other.call_id})
    assert status == 403
    _, fresh = await post_json(stack, "/rtc/sessions", {})
    with capture_logs() as logs:
        status, _ = await post_json(stack, "/rtc/handoff", {"call_id": "../etc", "ticket": fresh["ticket"]})
        assert status == 400
        # a call already attached: refused, the ticket left unused
        status, _ = await post_json(
            stack, "/rtc/handoff", {"call_id": call.call_id, "ticket": fresh["ticket"]}
        )
        assert status == 409
    refused = [
        (e["status"], e["reason"], e.get("call_id")) for e in logs if e["event"] == "rtc.handoff_refused"
    ]
    assert refused == [
        (400, "call_id must look like rtc_…", None),
        (409, "call already attached", call.call_id),
    ]
    async with aiohttp.ClientSession() as http, http.get(stack.url("/metrics")) as resp:
        metrics = await resp.text()
    for status in (400, 403, 409):  # every refusal is counted, so a stuck browser shows
        assert f'sideband_requests_refused_total{{event="rtc.handoff_refused",status="{status}"}}' in metrics
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            stack.url("/rtc/handoff"), data=b"\xff", headers={"content-type": "application/json"}
        ) as resp,
    ):
        assert resp.status == 400
    assert other.sideband_connects == 0


async def test_a_handoff_while_draining_is_served_and_new_browser_calls_are_not(stack: Stack) -> None:
    _, minted = await post_json(stack, "/rtc/sessions", {})
    call = stack.sim.create_webrtc_call(Script([]))
    stack.service.draining = True
    try:
        status, body = await post_json(stack, "/rtc/sessions", {})
        assert (status, body) == (503, {"error": "draining"})
        # its call is up at OpenAI already: without its sideband, nobody would run its tools
        status, body = await post_json(
            stack, "/rtc/handoff", {"call_id": call.call_id, "ticket": minted["ticket"]}
        )
        assert (status, body["status"]) == (200, "attached")
        await call.wait_connected(timeout=5)
        assert call.sideband_connects == 1
    finally:
        stack.service.draining = False


async def test_handoff_to_unknown_call_is_404(stack: Stack) -> None:
    _, minted = await post_json(stack, "/rtc/sessions", {})
    status, body = await post_json(
        stack, "/rtc/handoff", {"call_id": "rtc_doesnotexist", "ticket": minted["ticket"]}
    )
    assert status == 404, body


async def test_concurrent_handoffs_with_one_ticket_attach_once(stack: Stack) -> None:
    _, minted = await post_json(stack, "/rtc/sessions", {})
    call = stack.sim.create_webrtc_call(Script([]))
    results = await asyncio.gather(
        *(
            post_json(stack, "/rtc/handoff", {"call_id": call.call_id, "ticket": minted["ticket"]})
            for _ in range(5)
        )
    )
    statuses = sorted(s for s, _ in results)
    assert statuses[0] == 200 and set(statuses[1:]) <= {403, 409}
    assert call.sideband_connects == 1


async def test_a_handoff_refused_because_the_call_is_attached_leaves_the_ticket_unused(stack: Stack) -> None:
    _, first = await post_json(stack, "/rtc/sessions", {})
    _, second = await post_json(stack, "/rtc/sessions", {})
    call = stack.sim.create_webrtc_call(Script([]))
    assert (await post_json(stack, "/rtc/handoff", {"call_id": call.call_id, "ticket": first["ticket"]}))[
        0
    ] == 200
    status, _ = await post_json(stack, "/rtc/handoff", {"call_id": call.call_id, "ticket": second["ticket"]})
    assert status == 409
    own = stack.sim.create_webrtc_call(Script([]))  # the browser's own call: its ticket still works
    status, body = await post_json(
        stack, "/rtc/handoff", {"call_id": own.call_id, "ticket": second["ticket"]}
    )
    assert (status, body["status"]) == (200, "attached")


# -- who may use the doors --------------------------------------------------------------------------------


async def _post(stack: Stack, path: str, data: str | bytes, content_type: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(stack.url(path), data=data, headers={"content-type": content_type}) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def test_without_an_authorize_browser_hook_the_doors_are_closed(simulator: Simulator) -> None:
    app = Sideband(instructions="SIP only.")  # no authorize_browser: a phone-only server
    async with run_app(app, simulator, **TEST_SETTINGS) as stack:
        for path, data, ctype in (
            ("/rtc/calls", OFFER, "application/sdp"),
            ("/rtc/sessions", "{}", "application/json"),
            ("/rtc/handoff", '{"call_id": "rtc_x", "ticket": "t"}', "application/json"),
        ):
            assert (await _post(stack, path, data, ctype))[0] == 404
    assert not [r for r in simulator.requests if r.path.startswith("/v1/realtime/c")]  # nothing minted


async def test_the_authorize_browser_hook_decides_who_gets_in(simulator: Simulator) -> None:
    app = Sideband(instructions="x")
    seen: list[str | None] = []
    threads: set[str] = set()

    @app.authorize_browser
    def signed_in(request: web.Request) -> bool:  # sync: runs in a worker thread
        seen.append(request.cookies.get("session"))
        threads.add(threading.current_thread().name)
        if request.cookies.get("session") == "boom":
            raise RuntimeError("session store down")
        if request.cookies.get("session") == "gone":  # a lookup the store's client cancelled
            lookup: concurrent.futures.Future[bool] = concurrent.futures.Future()
            lookup.cancel()
            return lookup.result()
        if request.cookies.get("session") == "quit":
            sys.exit("session store client gave up")
        if request.cookies.get("session") == "unknown":  # a lookup that found nothing
            return next(s for s in ("alice",) if s == request.cookies.get("session"))
        if request.cookies.get("session") == "expired":  # aiohttp-security's check_authorized
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": "Bearer"})
        if request.cookies.get("session") == "slow":  # its store client's own timeout: a failure, no overrun
            raise TimeoutError("session store timed out")
        return request.cookies.get("session") == "alice"

    async with run_app(app, simulator, **TEST_SETTINGS) as stack:
        with capture_logs() as logs:
            # refused: 403; its backend failing: 503 (the server's trouble, not the browser's)
            for cookie, expected in (
                ("alice", 200),
                ("mallory", 403),
                ("boom", 503),
                ("gone", 503),
                ("quit", 503),
                ("unknown", 503),
                ("slow", 503),
                ("expired", 401),  # the hook's own answer, headers and all
                (None, 403),
            ):
                cookies = {"session": cookie} if cookie else {}
                async with (
                    aiohttp.ClientSession(cookies=cookies) as http,
                    http.post(stack.url("/rtc/sessions"), json={}) as resp,
                ):
                    assert resp.status == expected, cookie
                    assert (resp.headers.get("WWW-Authenticate") == "Bearer") == (cookie == "expired")
            async with aiohttp.ClientSession() as http, http.get(stack.url("/metrics")) as resp:
                metrics = await resp.text()
    assert seen == ["alice", "mallory", "boom", "gone", "quit", "unknown", "slow", "expired", None]
    refused = 'sideband_requests_refused_total{event="rtc.unauthorized",status="%d"} %d'
    assert refused % (401, 1) in metrics and refused % (403, 2) in metrics  # (mallory, None)
    failed = [e["error"] for e in logs if e["event"] == "rtc.authorize_failed"]
    assert failed == ["RuntimeError", "CancelledError", "SystemExit", "RuntimeError", "TimeoutError"]
    assert {name.split("_")[0] for name in threads} == {"sideband-authorize"}  # never the tools' threads
    assert sum(1 for r in simulator.requests if r.path == "/v1/realtime/client_secrets") == 1


async def _signed_in(request: web.Request) -> bool:
    """The app's own async session-store check."""
    await asyncio.sleep(0)
    return request.cookies.get("session") == "alice"


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_an_awaitable_an_authorize_hook_returns_is_awaited(simulator: Simulator, kind: str) -> None:
    """An ``await`` left out in the hook (``return is_signed_in(request)``): the coroutine it returns is
    what decides, not its truth (a coroutine is true, so everyone got in)."""
    app = Sideband(instructions="x")
    if kind == "async":

        async def signed_in(request: web.Request) -> Any:
            return _signed_in(request)  # (its await left out)

    else:

        def signed_in(request: web.Request) -> Any:
            return _signed_in(request)

    app.authorize_browser(signed_in)
    async with run_app(app, simulator, **TEST_SETTINGS) as stack:
        answers = []
        for cookie in ("mallory", "alice", None):
            cookies = {"session": cookie} if cookie else {}
            async with (
                aiohttp.ClientSession(cookies=cookies) as http,
                http.post(stack.url("/rtc/sessions"), json={}) as resp,
            ):
                answers.append(resp.status)
    assert answers == [403, 200, 403]
    assert sum(1 for r in simulator.requests if r.path == "/v1/realtime/client_secrets") == 1


async def test_an_authorize_hook_returning_a_refusal_instead_of_raising_it_fails_closed(
    simulator: Simulator,
) -> None:
    """``return web.HTTPForbidden()`` (a response, true) in place of ``raise``: not let in, a 503."""
    app = Sideband(instructions="x")

    @app.authorize_browser
    async def signed_in(request: web.Request) -> Any:
        if request.cookies.get("session") == "alice":
            return True
        return web.HTTPForbidden() if request.cookies.get("session") else web.Response(status=401)

    async with run_app(app, simulator, **TEST_SETTINGS) as stack:
        with capture_logs() as logs:
            answers = []
            for cookie in ("mallory", None, "alice"):
                cookies = {"session": cookie} if cookie else {}
                async with (
                    aiohttp.ClientSession(cookies=cookies) as http,
                    http.post(stack.url("/rtc/sessions"), json={}) as resp,
                ):
                    answers.append(resp.status)
    assert answers == [503, 503, 200]
    failed = [e["error"] for e in logs if e["event"] == "rtc.authorize_failed"]
    assert failed == ["TypeError", "TypeError"]


async def test_an_authorize_hook_may_read_the_body(simulator: Simulator) -> None:
    """A CSRF token in the JSON body: the hook reads it, and the route still gets the whole body."""
    app = Sideband(instructions="x")
    tokens: list[object] = []

    @app.authorize_browser
    async def csrf(request: web.Request) -> bool:
        if request.content_type == "application/json":
            data = await request.json()
        else:
            data = {"csrf": "sdp" if (await request.text()).startswith("v=0") else None}
        tokens.append(data.get("csrf"))
        return data.get("csrf") in ("t", "sdp")

    async with run_app(app, simulator, **TEST_SETTINGS) as stack:
        status, minted = await post_json(stack, "/rtc/sessions", {"csrf": "t"})
        assert status == 200
        call = stack.sim.create_webrtc_call(Script([]))
        body = {"call_id": call.call_id, "ticket": minted["ticket"], "csrf": "t"}
        assert (await post_json(stack, "/rtc/handoff", body))[0] == 200
        await call.wait_connected(timeout=5)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                stack.url("/rtc/calls"), data=OFFER, headers={"content-type": "application/sdp"}
            ) as resp,
        ):
            assert resp.status == 201 and (await resp.text()).startswith("v=0")
        too_big = {"call_id": call.call_id, "ticket": "t" * 9000, "csrf": "t"}  # (read whole by the hook)
        assert (await post_json(stack, "/rtc/handoff", too_big))[0] == 413
    assert tokens == ["t", "t", "sdp", "t"]


async def test_a_body_that_is_not_json_is_refused_not_a_failing_hook(simulator: Simulator) -> None:
    """A stranger's malformed body, read by a hook that looks for a CSRF token: a ``400`` at warning,
    as often as they like; the hook's backend answering something that is not JSON is still its
    failure."""
    app = Sideband(instructions="x")

    @app.authorize_browser
    async def csrf(request: web.Request) -> bool:
        if request.headers.get("X-Backend") == "html":
            json.loads("<html>")  # (its session store answered an error page)
        return bool((await request.json()).get("csrf"))

    json_as = "application/json"
    sent = [
        ("{not json", json_as, None),
        ("\xff\xfe", json_as, None),
        ("", json_as, None),
        ("[" * 50000, json_as, None),  # (nested deeper than Python's parser goes)
        ("1" * 5000, json_as, None),  # (more digits than Python reads in an integer)
        ('{"csrf": 1}', "application/json; charset=no-such-codec", None),
        ('{"csrf": 1}', "application/json; charset=utf-16", None),  # (its bytes are no UTF-16)
        ('{"csrf": 1}', json_as, "html"),
    ]
    answers: list[tuple[int, Any]] = []
    async with run_app(app, simulator, **TEST_SETTINGS) as stack:
        with capture_logs() as logs:
            async with aiohttp.ClientSession() as http:
                for body, kind, backend in sent:
                    headers = {"Content-Type": kind} | ({"X-Backend": backend} if backend else {})
                    for path in ("/rtc/sessions", "/rtc/handoff"):
                        async with http.post(
                            stack.url(path), data=body.encode("latin-1"), headers=headers
                        ) as r:
                            answers.append((r.status, (await r.json())["error"]))
    assert answers == [(400, "body is not JSON")] * 14 + [(503, "authorization unavailable")] * 2
    failed = [e for e in logs if e["event"] == "rtc.authorize_failed"]
    assert [e["error"] for e in failed] == ["JSONDecodeError"] * 2
    rejected = [e for e in logs if e["event"] == "rtc.rejected"]
    assert [(e["status"], e["log_level"]) for e in rejected] == [(400, "warning")] * 14


async def test_a_body_a_hook_cannot_read_is_refused_as_the_routes_refuse_it(
    simulator: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    """A stranger's body that does not match its ``Content-Encoding``, or is larger than any route
    takes, read by a hook that looks for a CSRF token: refused as the routes refuse such a body (400,
    its connection closed; 413), in JSON at warning, as often as they like. Not a failing hook (503, an
    error line), nor aiohttp's plain-text 413 counted as unauthorized."""
    app = Sideband(instructions="x")

    @app.authorize_browser
    async def csrf(request: web.Request) -> bool:
        return bool((await request.json()).get("csrf"))

    answers: list[tuple[int, str, str]] = []
    async with run_app(app, simulator, **TEST_SETTINGS) as stack:
        limit = max(stack.settings.webhook_max_body, 64 * 1024)  # (aiohttp's client_max_size)
        sent = [
            (b"x" * 100, {"Content-Type": "application/json", "Content-Encoding": "gzip"}),
            (b'{"csrf": "' + b"t" * limit + b'"}', {"Content-Type": "application/json"}),
        ]
        with capture_logs() as logs:
            async with aiohttp.ClientSession() as http:
                for path in ("/rtc/sessions", "/rtc/handoff", "/rtc/calls"):
                    for body, headers in sent:
                        async with http.post(stack.url(path), data=body, headers=headers) as r:
                            error = (await r.json())["error"]
                            answers.append((r.status, error, r.headers.get("Connection", "").lower()))
    bad = (400, "body does not match its content or transfer encoding", "close")
    assert [answer[:2] for answer in answers[1::2]] == [(413, f"body over {limit} bytes")] * 3
    assert answers[0::2] == [bad] * 3
    assert not [e for e in logs if e["event"] in ("rtc.authorize_failed", "rtc.unauthorized")]
    rejected = [(e["status"], e["log_level"]) for e in logs if e["event"] == "rtc.rejected"]
    assert rejected == [(400, "warning"), (413, "warning")] * 3
    counted = {key: n for key, n in stack.service.refused.items() if n}
    assert counted == {("rtc.rejected", 400): 3, ("rtc.rejected", 413): 3}
    assert not [r for r in caplog.records if r.name.startswith("aiohttp") and r.levelno >= 40]


@pytest.mark.parametrize("sent", ["part", "all"])
async def test_a_client_gone_before_a_hook_reads_its_body_is_no_failing_hook(
    sent: str, simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The browser leaves before its whole body came (read for the hook, before it runs), or after
    sending it, as the hook is about to read it: the request is abandoned (info), as when the route
    reads a body; the hook did not fail."""
    app = Sideband(instructions="x")
    deciding, lost, reading = asyncio.Event(), asyncio.Event(), asyncio.Event()
    connection_lost, read_body = RequestHandler.connection_lost, edge._read_body

    def on_lost(handler: RequestHandler, exc: BaseException | None) -> None:
        connection_lost(handler, exc)
        lost.set()

    async def read_as_told(request: web.Request, limit: int) -> bytes:
        reading.set()
        return await read_body(request, limit)

    monkeypatch.setattr(RequestHandler, "connection_lost", on_lost)
    monkeypatch.setattr(edge, "_read_body", read_as_told)

    @app.authorize_browser
    async def csrf(request: web.Request) -> bool:
        deciding.set()
        await lost.wait()  # (its session lookup, meanwhile)
        return bool((await request.json()).get("csrf"))

    async with run_app(app, simulator, **TEST_SETTINGS) as stack:
        answered = asyncio.Event()
        request_done = stack.service.request_done

        def done() -> None:
            request_done()
            answered.set()

        stack.service.request_done = done  # type: ignore[method-assign]
        host, port = stack.url("/").removeprefix("http://").split("/")[0].split(":")
        body = b'{"csrf": "t"}'
        with capture_logs() as logs:
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /rtc/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + (body if sent == "all" else body[:5])
            )
            async with asyncio.timeout(5):
                await (deciding if sent == "all" else reading).wait()
                writer.close()
                await answered.wait()
    assert deciding.is_set() == (sent == "all")
    assert not [e for e in logs if e["event"] in ("rtc.authorize_failed", "http.internal_error")]
    [left] = [e for e in logs if e["event"] == "rtc.abandoned"]
    assert left["log_level"] == "info"
    assert stack.service.refused["rtc.authorize_failed", 503] == 0


async def test_a_body_sent_slowly_to_a_hook_that_reads_it_is_408_as_at_the_routes(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stranger trickling the body a CSRF-checking hook reads: the routes' ``408`` (in JSON, at
    warning, the connection closed), at the routes' deadline for a body, which is longer than the
    hook's budget. Not a failing hook (503, an error line)."""
    monkeypatch.setattr("sideband.app.AUTHORIZE_TIMEOUT", 0.2)
    monkeypatch.setattr("sideband.edge.app.BODY_TIMEOUT", 0.5)
    app = Sideband(instructions="x")

    @app.authorize_browser
    async def csrf(request: web.Request) -> bool:
        return bool((await request.json()).get("csrf"))

    answers: list[tuple[bytes, Any]] = []
    async with run_app(app, simulator, **TEST_SETTINGS) as stack:
        host, port = stack.url("/").removeprefix("http://").split("/")[0].split(":")
        with capture_logs() as logs:
            for path, kind in [
                ("/rtc/sessions", "application/json"),
                ("/rtc/handoff", "application/json"),
                ("/rtc/calls", "application/sdp"),
            ]:
                reader, writer = await asyncio.open_connection(host, int(port))
                try:
                    writer.write(
                        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n".encode()
                        + b'Content-Length: 100\r\n\r\n{"csrf": '  # the rest never comes
                    )
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                    answers.append(
                        (head.split(b" ")[1], json.loads(await asyncio.wait_for(reader.read(), 5)))
                    )
                finally:
                    writer.close()
    assert answers == [(b"408", {"error": "body not received within 0.5 s"})] * 3
    assert not [e for e in logs if e["event"] in ("rtc.authorize_failed", "http.internal_error")]
    rejected = [(e["status"], e["log_level"]) for e in logs if e["event"] == "rtc.rejected"]
    assert rejected == [(408, "warning")] * 3
    assert {key: n for key, n in stack.service.refused.items() if n} == {("rtc.rejected", 408): 3}


async def test_a_body_slower_than_the_hooks_budget_but_in_time_for_the_routes_is_served(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow uplink: the body the hook reads takes longer to come than the hook may take to decide, but
    comes within the routes' deadline. The hook's time starts once it has it."""
    monkeypatch.setattr("sideband.app.AUTHORIZE_TIMEOUT", 0.2)
    app = Sideband(instructions="x")

    @app.authorize_browser
    async def csrf(request: web.Request) -> bool:
        return bool((await request.json()).get("csrf"))

    async with run_app(app, simulator, **TEST_SETTINGS) as stack:
        host, port = stack.url("/").removeprefix("http://").split("/")[0].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            body = b'{"csrf": "t"}'
            writer.write(
                b"POST /rtc/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body[:5]
            )
            await writer.drain()
            await asyncio.sleep(0.5)  # (the slow uplink: the rest comes after the hook's whole budget)
            writer.write(body[5:])
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            minted = json.loads(await asyncio.wait_for(reader.read(), 5))
        finally:
            writer.close()
    assert head.split(b" ")[1] == b"200", head
    assert minted["ticket"] and minted["client_secret"]


async def test_browsers_arriving_together_are_authorized_together(simulator: Simulator) -> None:
    """A sync hook's session lookup takes a while: a burst of browsers does not queue for its threads
    (and run into the hook's 5 s there)."""
    app = Sideband(instructions="x")
    together = threading.Barrier(12, timeout=10)

    @app.authorize_browser
    def signed_in(request: web.Request) -> bool:
        together.wait()  # passes once all 12 lookups run at the same time
        return True

    async with run_app(app, simulator, **TEST_SETTINGS) as stack:
        answers = await asyncio.gather(*(post_json(stack, "/rtc/sessions", {}) for _ in range(12)))
    assert [status for status, _ in answers] == [200] * 12


@pytest.mark.parametrize("late", ["swallows_its_cancel", "holds_the_loop"])
async def test_an_authorize_hook_that_answers_after_its_time_is_not_heard(
    late: str, simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hook that says yes late: its lookup swallowed its cancellation, or its blocking code held the
    event loop past its time (whose timer could not fire meanwhile). The browser gets 503, not in."""
    monkeypatch.setattr("sideband.app.AUTHORIZE_TIMEOUT", 0.2)
    app = Sideband(instructions="x")

    @app.authorize_browser
    async def signed_in(request: web.Request) -> bool:
        if late == "holds_the_loop":
            time.sleep(0.3)  # a sync session store's client, on the event loop
            return True
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)
        return True

    async with run_app(app, simulator, **TEST_SETTINGS) as stack:
        with capture_logs() as logs:
            assert (await post_json(stack, "/rtc/sessions", {}))[0] == 503
    failed = [(e["error"], e["budget_s"], e["started"]) for e in logs if e["event"] == "rtc.authorize_failed"]
    assert failed == [("timeout", 0.2, True)]
    assert not [r for r in simulator.requests if r.path == "/v1/realtime/client_secrets"]


async def test_an_authorize_hook_that_waited_for_a_thread_all_its_time_says_so(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every thread of the hook's pool busy: the overrun says the hook never started (the pool is too
    small for the lookups' pace), not that it was slow."""
    monkeypatch.setattr("sideband.app.HOOK_THREADS", 1)
    monkeypatch.setattr("sideband.app.AUTHORIZE_TIMEOUT", 0.3)
    app = Sideband(instructions="x")
    holding = threading.Event()
    release = threading.Event()

    @app.authorize_browser
    def signed_in(request: web.Request) -> bool:
        if request.cookies.get("session") == "first":
            holding.set()
            release.wait(10)
        return True

    async with run_app(app, simulator, **TEST_SETTINGS) as stack:
        with capture_logs() as logs:
            async with aiohttp.ClientSession(cookies={"session": "first"}) as http:
                first = asyncio.create_task(http.post(stack.url("/rtc/sessions"), json={}))
                await asyncio.to_thread(holding.wait, 10)
                try:
                    assert (await post_json(stack, "/rtc/sessions", {}))[0] == 503
                finally:
                    release.set()
                async with await first as resp:
                    assert resp.status == 503  # its own overrun: it held its thread past its time
    failed = [e["started"] for e in logs if e["event"] == "rtc.authorize_failed"]
    assert sorted(failed) == [False, True]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_quick_authorize_hook_is_heard_when_another_calls_blocking_tool_held_the_loop(
    kind: str, simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook says yes at once; a live call's tool then holds the event loop past the hook's time
    before its answer is read. The hook did not overrun: the browser gets in (the tool's blocking is the
    tool's, named as such)."""
    monkeypatch.setattr("sideband.app.AUTHORIZE_TIMEOUT", 0.2)
    app = make_app(browsers=False)
    waiting, decided = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    @app.tool(timeout=10, filler_after=None)
    async def sync_crm_lookup() -> str:
        """Look the caller up with a blocking client."""
        waiting.set()
        await decided.wait()
        time.sleep(0.4)  # a sync client's lookup, on the event loop, as the hook answers
        return "found"

    if kind == "sync":

        @app.authorize_browser
        def signed_in(request: web.Request) -> bool:
            loop.call_soon_threadsafe(decided.set)  # the tool runs on before the answer is read
            return True

    else:

        @app.authorize_browser
        async def signed_in(request: web.Request) -> bool:
            decided.set()  # the tool runs on before the answer is read
            return True

    async with run_app(app, simulator, **TEST_SETTINGS) as stack:
        busy = await stack.call(Script([model_calls("sync_crm_lookup", {}), pause(60)]))
        await asyncio.wait_for(waiting.wait(), 5)
        with capture_logs() as logs:
            status, minted = await post_json(stack, "/rtc/sessions", {})
        await stack.sim.hang_up(busy)
    assert status == 200 and minted["ticket"]
    assert not [e for e in logs if e["event"] == "rtc.authorize_failed"]
    assert [e.get("tool") for e in logs if e["event"] == "loop.blocked"] == ["sync_crm_lookup"]


async def test_only_requests_another_site_cannot_send_blind_are_served(stack: Stack) -> None:
    # text/plain and form bodies are what a page on another origin may POST without a preflight
    assert (await _post(stack, "/rtc/calls", OFFER, "text/plain"))[0] == 415
    assert (await _post(stack, "/rtc/sessions", "{}", "text/plain"))[0] == 415
    _, minted = await post_json(stack, "/rtc/sessions", {})
    body = json.dumps({"call_id": "rtc_x", "ticket": minted["ticket"]})
    assert (await _post(stack, "/rtc/handoff", body, "text/plain"))[0] == 415
    assert (await _post(stack, "/rtc/handoff", "[" * 5000, "application/json"))[0] == 400  # too deep
    assert not [r for r in stack.sim.requests if r.path == "/v1/realtime/calls"]


async def test_a_handoff_that_cannot_attach_says_so(stack: Stack) -> None:
    _, minted = await post_json(stack, "/rtc/sessions", {})
    call = stack.sim.create_webrtc_call(Script([]))
    with socket.socket() as probe:  # a sideband address nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"ws://127.0.0.1:{probe.getsockname()[1]}/v1/realtime"
    stack.service._sideband_url = dead
    status, body = await post_json(
        stack, "/rtc/handoff", {"call_id": call.call_id, "ticket": minted["ticket"]}
    )
    assert (status, body) == (502, {"error": "could not attach", "reason": "connect_failed"})


async def test_upstream_faults_map_to_what_the_browser_may_know(simulator: Simulator) -> None:
    """OpenAI refusing the server's key is the server's problem (502), not the browser's (401). OpenAI
    busy (a rate limit's 429, a 500 or 503: the request did nothing) is a 503 with OpenAI's
    ``Retry-After`` (else 1 s): the browser may try again; a project out of credit is a 502."""
    answers: dict[str, Any] = {"calls": 401, "secrets": 200, "retry_after": None, "code": None}

    def refusal(status: int, message: str) -> web.Response:
        headers = {} if answers["retry_after"] is None else {"Retry-After": answers["retry_after"]}
        body = {"error": {"message": message, "code": answers["code"]}}
        return web.json_response(body, status=status, headers=headers)

    async def realtime_calls(request: web.Request) -> web.Response:
        return refusal(answers["calls"], "bad key")

    async def client_secrets(request: web.Request) -> web.Response:
        if answers["secrets"] != 200:
            return refusal(answers["secrets"], "slow down")
        return web.Response(text="<html>proxy error</html>", content_type="text/html")  # a 200 all the same

    upstream = web.Application()
    upstream.router.add_post("/v1/realtime/calls", realtime_calls)
    upstream.router.add_post("/v1/realtime/client_secrets", client_secrets)
    server = TestServer(upstream, host="127.0.0.1")
    await server.start_server()
    try:
        base = str(server.make_url("/v1"))
        async with run_app(make_app(), simulator, **TEST_SETTINGS, openai_base_url=base) as stack:
            assert await _post(stack, "/rtc/calls", OFFER, "application/sdp") == (
                502,
                {"error": "upstream error"},
            )
            answers["calls"] = 400  # the offer itself: the browser's to know
            assert (await _post(stack, "/rtc/calls", OFFER, "application/sdp"))[0] == 400
            assert await _post(stack, "/rtc/sessions", "{}", "application/json") == (
                502,
                {"error": "could not mint a client secret"},
            )
            for status, retry_after, waits, error in [
                (429, "7", "7", "upstream busy"),
                (429, None, "1", "upstream busy"),
                (503, "3600", "60", "upstream unavailable"),
                (500, None, "1", "upstream unavailable"),
            ]:
                answers.update(calls=status, secrets=status, retry_after=retry_after)
                for path, body, kind in [
                    ("/rtc/calls", OFFER, "application/sdp"),
                    ("/rtc/sessions", "{}", "application/json"),
                ]:
                    async with (
                        aiohttp.ClientSession() as http,
                        http.post(stack.url(path), data=body, headers={"content-type": kind}) as resp,
                    ):
                        assert (resp.status, await resp.json()) == (503, {"error": error}), (path, status)
                        assert resp.headers["Retry-After"] == waits
            answers.update(calls=429, secrets=429, retry_after="7", code="insufficient_quota")  # no credit
            assert await _post(stack, "/rtc/calls", OFFER, "application/sdp") == (
                502,
                {"error": "upstream error"},
            )
            assert await _post(stack, "/rtc/sessions", "{}", "application/json") == (
                502,
                {"error": "could not mint a client secret"},
            )
    finally:
        await server.close()


class CreatingUpstream:
    """OpenAI's ``/realtime/calls`` that creates each call (201, its ``Location``) and then loses its SDP
    answer: cut short (``answer="cut"``) or held (``"stalled"``); ``location`` replaces the Location.
    Records the hangups it is sent."""

    def __init__(self, answer: str, location: str = "/v1/realtime/calls/rtc_created1") -> None:
        self.answer, self.location = answer, location
        self.hangups: list[str] = []
        self.release = asyncio.Event()
        self.created = asyncio.Event()  # a call created, its answer begun
        self.hangup_fails = False  # each hangup answered 503
        upstream = web.Application()
        upstream.router.add_post("/v1/realtime/calls", self._create)
        upstream.router.add_post("/v1/realtime/calls/{call_id}/hangup", self._hangup)
        self.server = TestServer(upstream, host="127.0.0.1")

    async def __aenter__(self) -> str:
        await self.server.start_server()
        return str(self.server.make_url("/v1"))

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await self.server.close()

    async def _create(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        headers = {"Location": self.location, "Content-Type": "application/sdp", "Content-Length": "500"}
        response = web.StreamResponse(status=201, headers=headers)
        await response.prepare(request)
        await response.write(b"v=0\r\n")  # 5 bytes of the 500
        self.created.set()
        if self.answer == "stalled":
            await self.release.wait()
        assert request.transport is not None
        request.transport.close()
        return response

    async def _hangup(self, request: web.Request) -> web.Response:
        self.hangups.append(request.match_info["call_id"])
        if self.hangup_fails:
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        return web.json_response({})


@pytest.mark.parametrize("answer", ["cut", "stalled"])
async def test_a_call_created_whose_answer_is_lost_is_hung_up(answer: str) -> None:
    """OpenAI created the call (201, its Location) but its SDP answer is cut short or held past the time:
    no browser can join the call, and nobody would control it. It is hung up, and the error names it."""
    from sideband.upstream.openai import CallControl, UpstreamError

    upstream = CreatingUpstream(answer)
    async with upstream as base, aiohttp.ClientSession() as http:
        control = CallControl(http, base, "sk-test")
        with pytest.raises(UpstreamError) as lost:
            await control.create_call(OFFER, {"type": "realtime"}, timeout=0.5)
    assert upstream.hangups == ["rtc_created1"]
    message = str(lost.value)
    assert "created call rtc_created1" in message and message.endswith(": hung up"), message
    assert not lost.value.offer_refused and not lost.value.unsent


@pytest.mark.parametrize(
    ("location", "answer", "error"),
    [
        ("/v1/realtime/calls/rtc_created1", "cut", "upstream unavailable"),
        ("http://[gw/v1/realtime/calls/rtc_abc", "cut", "upstream error"),
    ],
    ids=["answer_lost", "location_unreadable"],
)
async def test_a_relay_whose_created_call_cannot_be_served_fails_as_upstream(
    simulator: Simulator, location: str, answer: str, error: str
) -> None:
    """``POST /rtc/calls`` whose call OpenAI created but whose answer was lost (the call hung up), or
    whose Location no URL parser reads: a 502 to the browser and an error line, never a 500."""
    upstream = CreatingUpstream(answer, location)
    async with (
        upstream as base,
        run_app(make_app(), simulator, **TEST_SETTINGS, openai_base_url=base) as stack,
    ):
        with capture_logs() as logs:
            assert await _post(stack, "/rtc/calls", OFFER, "application/sdp") == (502, {"error": error})
    (failed,) = [e for e in logs if e["event"] == "rtc.relay_failed"]
    if error == "upstream unavailable":
        assert upstream.hangups == ["rtc_created1"] and "rtc_created1" in failed["error"]
        assert failed["call_id"] == "rtc_created1"  # (a line about a call names it)
    else:
        assert upstream.hangups == [] and failed["status"] == 201
        assert "no call id in Location" in failed["error"] and "call_id" not in failed


async def test_a_relay_cut_short_whose_created_call_is_lost_names_the_call(simulator: Simulator) -> None:
    """The server stops while OpenAI holds the answer to a call it created; the relay goes on, the answer
    is then lost and the call hung up: the error line names the call."""
    upstream = CreatingUpstream("stalled")
    async with (
        upstream as base,
        run_app(make_app(), simulator, **TEST_SETTINGS, openai_base_url=base) as stack,
    ):
        with capture_logs() as logs:
            request = asyncio.create_task(stack.service.rtc_relay(OFFER))
            await asyncio.wait_for(upstream.created.wait(), 5)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
            upstream.release.set()  # (the answer cut short)
            await asyncio.wait_for(stack.service.close(), 20)
    assert upstream.hangups == ["rtc_created1"]
    [failed] = [e for e in logs if e["event"] == "rtc.relay_failed"]
    assert failed["call_id"] == "rtc_created1" and "created call rtc_created1" in failed["error"]


async def test_a_created_call_whose_answer_is_lost_and_whose_hangup_fails_is_hung_up_later(
    simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenAI created the call but its answer was lost, and the hangup that follows fails too: the call
    may be up with nobody on it. It is hung up again later, as a call whose hangup failed is."""
    monkeypatch.setattr("sideband.upstream.openai.DROP_BUDGET", 0.3)
    monkeypatch.setattr("sideband.service.STRANDED_RETRY", 0.2)
    upstream = CreatingUpstream("cut")
    upstream.hangup_fails = True
    async with (
        upstream as base,
        run_app(make_app(), simulator, **TEST_SETTINGS, openai_base_url=base) as stack,
    ):
        with capture_logs() as logs:
            assert await _post(stack, "/rtc/calls", OFFER, "application/sdp") == (
                502,
                {"error": "upstream unavailable"},
            )
            tried = len(upstream.hangups)
            again = list(stack.service._stranded.values())
            assert len(again) == 1
            upstream.hangup_fails = False
            await asyncio.wait_for(asyncio.gather(*again), 10)
    [failed] = [e for e in logs if e["event"] == "rtc.relay_failed"]
    assert failed["call_id"] == "rtc_created1" and "it may be up still" in failed["error"]
    assert tried >= 1 and upstream.hangups[tried:] == ["rtc_created1"]
    stranded = [(e["call_id"], e["outcome"]) for e in logs if e["event"] == "call.stranded"]
    assert stranded[-1] == ("rtc_created1", "hung_up")


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")  # (the config's bad value, as copied in)
async def test_a_call_relayed_while_the_apps_config_changes_is_served_with_the_plan_it_was_created_with(
    stack: Stack,
) -> None:
    """The app's config is changed to one its validation refuses while OpenAI creates a browser's call:
    the call, created with the plan from before, is served with it (it was left up with nobody on it, a
    500 to the browser)."""
    stack.sim.next_webrtc_script = Script([pause(30)])
    control = stack.service.control
    create, config = control.create_call, stack.app.config

    async def create_call(sdp: str, session: dict[str, Any], **kw: Any) -> tuple[str, str]:
        made = await create(sdp, session, **kw)
        stack.app.config = config.model_copy(update={"max_output_tokens": "lots"})  # (meanwhile)
        return made

    control.create_call = create_call  # type: ignore[method-assign]
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(stack.url("/rtc/calls"), data=OFFER, headers={"content-type": "application/sdp"}) as r,
        ):
            status = r.status
    finally:
        stack.app.config = config
    assert status == 201
    (call,) = stack.sim.calls.values()
    await call.wait_for(lambda c: c.sideband_connects == 1, 5, "the sideband")
    await stack.sim.hang_up(call)


async def test_a_spent_ticket_stays_spent_when_the_wall_clock_steps_back(simulator: Simulator) -> None:
    """The spent ticket is remembered by the store's clock for longer than any ticket lives, so a wall
    clock stepped back (NTP) cannot make it unexpired and unspent at once."""
    from sideband.service import Service
    from sideband.stores import MemoryStore

    from .conftest import settings_for

    wall, steady = [time.time()], [1000.0]
    settings = settings_for(simulator, rtc_ticket_secret="s" * 40)
    service = Service(settings, make_app(), store=MemoryStore(clock=lambda: steady[0]), clock=lambda: wall[0])
    await service.start()
    try:
        assert service.tickets is not None
        ticket, info = service.tickets.issue()
        first = simulator.create_webrtc_call(Script([]))
        assert (await service.rtc_handoff(first.call_id, ticket, wait=2)).status == 200  # attached
        again = simulator.create_webrtc_call(Script([]))
        assert (await service.rtc_handoff(again.call_id, ticket, wait=2)).status == 403
        # 12 minutes pass, while the wall clock is stepped back 5 of them: by the wall clock the ticket
        # still has minutes to live.
        steady[0] += 12 * 60
        wall[0] += 12 * 60 - 300
        assert info.expires_at > wall[0]
        late = simulator.create_webrtc_call(Script([]))
        refused = await service.rtc_handoff(late.call_id, ticket, wait=2)
        assert (refused.status, refused.body) == (403, {"error": "ticket already used"})
    finally:
        await service.registry.drain(0.0)
        await service.close()


@pytest.mark.parametrize("body", [[], ["rtc_x", "v1.a.b"], "rtc_x", 7, None])
async def test_a_handoff_body_that_is_json_but_not_an_object_is_400(stack: Stack, body: Any) -> None:
    assert await _post(stack, "/rtc/handoff", json.dumps(body), "application/json") == (
        400,
        {"error": "body must be JSON {call_id, ticket}"},
    )


async def test_a_ticket_refused_as_used_leaves_the_call_free_for_its_own_ticket(stack: Stack) -> None:
    _, spent = await post_json(stack, "/rtc/sessions", {})
    _, own = await post_json(stack, "/rtc/sessions", {})
    first = stack.sim.create_webrtc_call(Script([]))
    assert (await post_json(stack, "/rtc/handoff", {"call_id": first.call_id, "ticket": spent["ticket"]}))[
        0
    ] == 200
    call = stack.sim.create_webrtc_call(Script([]))
    assert await post_json(stack, "/rtc/handoff", {"call_id": call.call_id, "ticket": spent["ticket"]}) == (
        403,
        {"error": "ticket already used"},
    )
    status, body = await post_json(stack, "/rtc/handoff", {"call_id": call.call_id, "ticket": own["ticket"]})
    assert (status, body) == (200, {"status": "attached", "call_id": call.call_id})
    assert call.sideband_connects == 1


@pytest.mark.parametrize("claim", ["ticket:", "call:"])
async def test_a_store_failing_as_a_handoff_claims_leaves_call_and_ticket_free(
    stack: Stack, claim: str
) -> None:
    """The ticket is claimed first, then the call: a store failing at either leaves both free (a ticket
    spent by then is given back)."""
    stack.service.store = StoreFailingOnce(stack.service.store, claim)
    _, minted = await post_json(stack, "/rtc/sessions", {})
    call = stack.sim.create_webrtc_call(Script([]))
    handoff = {"call_id": call.call_id, "ticket": minted["ticket"]}
    assert await post_json(stack, "/rtc/handoff", handoff) == (503, {"error": "claim store unavailable"})
    assert call.sideband_connects == 0
    status, body = await post_json(stack, "/rtc/handoff", handoff)
    assert (status, body) == (200, {"status": "attached", "call_id": call.call_id})


class StoreDownAfterTicket(StoreFailingOnce):
    """The service's claim store, but it goes down once the first ticket is claimed (its next commands
    fail), until ``down`` is cleared."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner, "", at="nowhere")
        self.down = False

    def _fail(self, at: str, key: str) -> None:
        if self.down:
            raise StoreUnavailable("redis at redis://cache:6379/0: Connection reset by peer")

    async def claim(self, key: str, ttl: float) -> bool:
        self._fail("claim", key)
        got = await self.inner.claim(key, ttl)
        if key.startswith("ticket:") and not self.failed:
            self.failed = self.down = True
        return got


async def test_a_ticket_the_store_failed_to_give_back_is_given_back_once_it_answers(stack: Stack) -> None:
    """The store goes down between the ticket's claim and the call's: the ticket cannot be given back at
    once. It is once the store answers again, and the browser's retry with it attaches the call (it
    found its ticket spent for as long as a ticket lives)."""
    _, minted = await post_json(stack, "/rtc/sessions", {})
    call = stack.sim.create_webrtc_call(Script([pause(30)]))
    handoff = {"call_id": call.call_id, "ticket": minted["ticket"]}
    store = stack.service.store = StoreDownAfterTicket(stack.service.store)
    with capture_logs() as logs:
        assert await post_json(stack, "/rtc/handoff", handoff) == (503, {"error": "claim store unavailable"})
        store.down = False  # (back)
        await asyncio.wait_for(asyncio.gather(*stack.service._settling), 5)
    assert [e["call_id"] for e in logs if e["event"] == "store.released"] == [call.call_id]
    status, body = await post_json(stack, "/rtc/handoff", handoff)
    assert (status, body) == (200, {"status": "attached", "call_id": call.call_id})


class StoreLosingReplies(StoreFailingOnce):
    """The service's claim store, but the first call claim fails, and the first ticket release is carried
    out with its answer lost (``lost=True``) or fails (``False``)."""

    def __init__(self, inner: Any, *, lost: bool) -> None:
        super().__init__(inner, "", at="nowhere")
        self.lost, self.call_failed, self.release_failed = lost, False, False

    async def claim(self, key: str, ttl: float) -> bool:
        if key.startswith("call:") and not self.call_failed:
            self.call_failed = True
            raise StoreUnavailable("redis at redis://cache:6379/0: timeout")
        return await self.inner.claim(key, ttl)

    async def release(self, key: str) -> None:
        if key.startswith("ticket:") and not self.release_failed:
            self.release_failed = True
            if self.lost:
                await self.inner.release(key)
            raise StoreUnavailable("redis at redis://cache:6379/0: timeout")
        await self.inner.release(key)


@pytest.mark.parametrize("lost", [True, False], ids=["release_answer_lost", "release_failed"])
async def test_a_retry_with_a_ticket_still_to_be_given_back_attaches_and_spends_it(
    stack: Stack, lost: bool
) -> None:
    """The store failed a handoff as its call was claimed, and the ticket's release (carried out unseen,
    or not): the browser's retry at once is not told its ticket is used, it attaches the call; and the
    ticket, spent on that call, is not given back later (reopened for another call)."""
    _, minted = await post_json(stack, "/rtc/sessions", {})
    call = stack.sim.create_webrtc_call(Script([pause(30)]))
    handoff = {"call_id": call.call_id, "ticket": minted["ticket"]}
    stack.service.store = StoreLosingReplies(stack.service.store, lost=lost)
    assert await post_json(stack, "/rtc/handoff", handoff) == (503, {"error": "claim store unavailable"})
    assert len(stack.service._settling) == 1  # (the give-back, waiting for the store)
    assert await post_json(stack, "/rtc/handoff", handoff) == (
        200,
        {"status": "attached", "call_id": call.call_id},
    )
    await asyncio.wait_for(asyncio.gather(*stack.service._settling, return_exceptions=True), 5)
    other = stack.sim.create_webrtc_call(Script([]))
    reused = await post_json(stack, "/rtc/handoff", {"call_id": other.call_id, "ticket": minted["ticket"]})
    assert reused == (403, {"error": "ticket already used"})
    assert other.sideband_connects == 0


async def test_a_retry_while_the_store_is_still_down_keeps_the_ticket_to_give_back(stack: Stack) -> None:
    """The browser retries its handoff at once, the store still down: 503 again, and the ticket is still
    given back once the store answers (it stayed spent, and the retry after that was told 403)."""
    _, minted = await post_json(stack, "/rtc/sessions", {})
    call = stack.sim.create_webrtc_call(Script([pause(30)]))
    handoff = {"call_id": call.call_id, "ticket": minted["ticket"]}
    store = stack.service.store = StoreDownAfterTicket(stack.service.store)
    assert await post_json(stack, "/rtc/handoff", handoff) == (503, {"error": "claim store unavailable"})
    assert await post_json(stack, "/rtc/handoff", handoff) == (503, {"error": "claim store unavailable"})
    assert len(stack.service._giving_back) == 1
    store.down = False  # (back)
    await asyncio.wait_for(asyncio.gather(*stack.service._settling, return_exceptions=True), 5)
    assert await post_json(stack, "/rtc/handoff", handoff) == (
        200,
        {"status": "attached", "call_id": call.call_id},
    )


async def test_a_handoff_sent_again_to_another_instance_after_it_attached_is_told_so(stack: Stack) -> None:
    """The handoff attached the call, its answer was lost, and the browser sends it again to another
    instance sharing the store: 409 "call already attached", as the instance that runs the call says, not
    403 "ticket already used" (read as a forged or replayed ticket)."""
    from sideband.service import Service

    _, minted = await post_json(stack, "/rtc/sessions", {})
    call = stack.sim.create_webrtc_call(Script([pause(30)]))
    handoff = {"call_id": call.call_id, "ticket": minted["ticket"]}
    attached = (200, {"status": "attached", "call_id": call.call_id})
    assert await post_json(stack, "/rtc/handoff", handoff) == attached
    assert await post_json(stack, "/rtc/handoff", handoff) == (409, {"error": "call already attached"})
    other = Service(stack.settings, stack.app, store=stack.service.store)
    reply = await other.rtc_handoff(call.call_id, minted["ticket"])
    assert (reply.status, reply.body) == (409, {"error": "call already attached"})
    again = stack.sim.create_webrtc_call(Script([]))  # (the ticket is spent all the same)
    reply = await other.rtc_handoff(again.call_id, minted["ticket"])
    assert (reply.status, reply.body) == (403, {"error": "ticket already used"})


class StoreSlowToClaim(StoreFailingOnce):
    """The service's claim store, but the first claim of ``key`` waits for ``go`` (``entered`` is set as it
    starts to)."""

    def __init__(self, inner: Any, key: str) -> None:
        super().__init__(inner, key, at="nowhere")
        self.entered, self.go = asyncio.Event(), asyncio.Event()

    async def claim(self, key: str, ttl: float) -> bool:
        if key == self.prefix and not self.entered.is_set():
            self.entered.set()
            await self.go.wait()
        return await self.inner.claim(key, ttl)


async def test_a_spent_ticket_being_checked_does_not_hold_up_a_valid_handoff_of_its_call(
    stack: Stack,
) -> None:
    """A browser retries its handoff with a spent ticket while one with a valid ticket comes in for the same
    call: the spent ticket is found spent before the call is claimed, and the valid one attaches the call
    (it was refused as attached, and the call ran without its sideband)."""
    _, spent = await post_json(stack, "/rtc/sessions", {})
    _, fresh = await post_json(stack, "/rtc/sessions", {})
    first = stack.sim.create_webrtc_call(Script([]))
    status, _ = await post_json(stack, "/rtc/handoff", {"call_id": first.call_id, "ticket": spent["ticket"]})
    assert status == 200
    assert stack.service.tickets is not None
    nonce = stack.service.tickets.verify(spent["ticket"]).nonce
    store = stack.service.store = StoreSlowToClaim(stack.service.store, f"ticket:{nonce}")
    call = stack.sim.create_webrtc_call(Script([pause(30)]))
    stale = asyncio.create_task(
        post_json(stack, "/rtc/handoff", {"call_id": call.call_id, "ticket": spent["ticket"]})
    )
    try:
        await asyncio.wait_for(store.entered.wait(), 5)  # its ticket being checked (a round trip to Redis)
        valid = await post_json(stack, "/rtc/handoff", {"call_id": call.call_id, "ticket": fresh["ticket"]})
    finally:
        store.go.set()
    assert valid == (200, {"status": "attached", "call_id": call.call_id})
    assert await stale == (409, {"error": "call already attached"})  # (as it is by then)
    assert call.sideband_connects == 1


async def test_a_handoff_of_a_call_another_instance_attached_leaves_the_ticket_unused(stack: Stack) -> None:
    """The call is held in the shared store (attached elsewhere): 409, and the ticket, claimed before the
    call, is given back for the browser's own call."""
    _, minted = await post_json(stack, "/rtc/sessions", {})
    call = stack.sim.create_webrtc_call(Script([]))
    await stack.service.store.settle(f"call:{call.call_id}", 60)  # (another instance's handoff)
    status, body = await post_json(
        stack, "/rtc/handoff", {"call_id": call.call_id, "ticket": minted["ticket"]}
    )
    assert (status, body) == (409, {"error": "call already attached"})
    assert call.sideband_connects == 0
    own = stack.sim.create_webrtc_call(Script([]))
    status, body = await post_json(
        stack, "/rtc/handoff", {"call_id": own.call_id, "ticket": minted["ticket"]}
    )
    assert (status, body) == (200, {"status": "attached", "call_id": own.call_id})


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")  # (the config's bad value, as copied in)
async def test_a_browser_session_that_cannot_be_sent_spends_no_ticket_and_holds_no_call(stack: Stack) -> None:
    """The app's config changed after the start so that a browser's session cannot be sent (its forced
    tool is the transfer, which a browser's call is not offered): the doors answer 500 with one error line,
    not a traceback, and a handoff refused so leaves its ticket and its call free."""
    _, minted = await post_json(stack, "/rtc/sessions", {})
    call = stack.sim.create_webrtc_call(Script([pause(30)]))
    handoff = {"call_id": call.call_id, "ticket": minted["ticket"]}
    config = stack.app.config
    for change, said in (
        ({"tool_choice": {"type": "function", "name": "transfer_call"}}, "'transfer_call'"),
        ({"max_output_tokens": "lots"}, "max_output_tokens"),  # (that its merge's validation refuses)
    ):
        stack.app.config = config.model_copy(update=change)
        try:
            with capture_logs() as logs:
                assert await post_json(stack, "/rtc/sessions", {}) == (
                    500,
                    {"error": "session config invalid"},
                )
                assert await post_json(stack, "/rtc/handoff", handoff) == (
                    500,
                    {"error": "session config invalid"},
                )
        finally:
            stack.app.config = config
        invalid = [e for e in logs if e["event"] == "rtc.config_invalid"]
        assert [(e["log_level"], e.get("call_id")) for e in invalid] == [
            ("error", None),
            ("error", call.call_id),
        ]
        assert all(said in e["error"] and "\n" not in e["error"] for e in invalid), invalid
        assert not [e for e in logs if e["event"] == "http.internal_error"]
    assert not [e for e in logs if e["event"] == "http.internal_error"]
    assert await post_json(stack, "/rtc/handoff", handoff) == (
        200,
        {"status": "attached", "call_id": call.call_id},
    )


@pytest.mark.parametrize(
    ("choice", "problem"),
    [
        ("required", 'tool_choice "required" with no tools: the model would have none to call'),
        (
            {"type": "function", "name": "transfer_call"},
            "tool_choice names the tool 'transfer_call', which the session does not offer",
        ),
    ],
    ids=["required", "forced_transfer"],
)
def test_an_app_whose_browser_calls_would_all_be_refused_does_not_start(
    simulator: Simulator, choice: Any, problem: str
) -> None:
    """A browser's call is not offered the transfer tool: a config only its session cannot be sent with
    stops the start where the app takes browser calls (every one of them would be refused)."""
    from sideband import SessionConfig
    from sideband.service import Service
    from sideband.session import SessionConfigError

    from .conftest import settings_for

    app = Sideband(
        instructions="Front desk: transfer every caller.",
        transfer_targets={"human": "tel:+14155550123"},
        session=SessionConfig(tool_choice=choice),
    )
    app.enable_transfer()
    Service(settings_for(simulator), app)  # phone calls only: their session offers the transfer
    app.authorize_browser(lambda request: True)
    with pytest.raises(SessionConfigError) as info:
        Service(settings_for(simulator), app)
    assert str(info.value) == f"the app's session config for browser calls: {problem}"


async def test_a_store_failing_as_the_handoff_settles_serves_the_call(stack: Stack) -> None:
    """Call and ticket are claimed when the store fails to settle the call's claim: the call is served all
    the same (a 503 would leave the browser's call without its sideband, its retry refused as attached)."""
    stack.service.store = StoreFailingOnce(stack.service.store, "call:", at="settle")
    _, minted = await post_json(stack, "/rtc/sessions", {})
    call = stack.sim.create_webrtc_call(Script([pause(30)]))
    with capture_logs() as logs:
        status, body = await post_json(
            stack, "/rtc/handoff", {"call_id": call.call_id, "ticket": minted["ticket"]}
        )
    assert (status, body) == (200, {"status": "attached", "call_id": call.call_id})
    assert call.sideband_connects == 1
    assert [e["event"] for e in logs if e["event"] in ("store.unavailable", "rtc.handoff")] == [
        "store.unavailable",
        "rtc.handoff",
    ]
    # Its claim, left pending, runs out (as a Redis key's TTL does): the call is live here all the same,
    # and a second handoff of it, with a fresh ticket, is refused without a second sideband.
    await stack.service.store.release(f"call:{call.call_id}")
    _, again = await post_json(stack, "/rtc/sessions", {})
    status, body = await post_json(
        stack, "/rtc/handoff", {"call_id": call.call_id, "ticket": again["ticket"]}
    )
    assert (status, body) == (409, {"error": "call already attached"})
    assert call.sideband_connects == 1


async def test_a_call_the_sdp_relay_created_cannot_be_handed_off_again(stack: Stack) -> None:
    stack.sim.next_webrtc_script = Script([pause(30)])
    async with (
        aiohttp.ClientSession() as http,
        http.post(stack.url("/rtc/calls"), data=OFFER, headers={"content-type": "application/sdp"}) as resp,
    ):
        assert resp.status == 201
        call = stack.sim.calls[resp.headers["Location"].rsplit("/", 1)[-1]]
    await call.wait_connected(timeout=5)
    _, minted = await post_json(stack, "/rtc/sessions", {})
    assert await post_json(stack, "/rtc/handoff", {"call_id": call.call_id, "ticket": minted["ticket"]}) == (
        409,
        {"error": "call already attached"},
    )
    assert call.sideband_connects == 1


async def test_a_handed_off_call_stays_attached_past_the_pending_claims_life(simulator: Simulator) -> None:
    """Once attached, the call is held for ``SIDEBAND_DEDUP_TTL``: another ticket cannot attach a second
    sideband to it once the few seconds a claim pending its work may last have passed."""
    from sideband.service import Service, pending_ttl
    from sideband.stores import MemoryStore

    from .conftest import settings_for

    steady = [1000.0]
    settings = settings_for(simulator, rtc_ticket_secret="s" * 40)
    service = Service(settings, make_app(), store=MemoryStore(clock=lambda: steady[0]))
    await service.start()
    try:
        assert service.tickets is not None
        call = simulator.create_webrtc_call(Script([pause(30)]))
        first, _ = service.tickets.issue()
        assert (await service.rtc_handoff(call.call_id, first, wait=2)).status == 200
        steady[0] += pending_ttl(settings) + 1
        second, _ = service.tickets.issue()
        refused = await service.rtc_handoff(call.call_id, second, wait=2)
        assert (refused.status, refused.body) == (409, {"error": "call already attached"})
        assert call.sideband_connects == 1
    finally:
        await service.registry.drain(0.0)
        await service.close()


@pytest.mark.parametrize("value", ["rtc_x\n", "rtc_", "xrtc_abc", "rtc_a b", 7, None])
def test_only_a_whole_rtc_call_id_is_one(value: object) -> None:
    from sideband.service import rtc_call_id

    assert rtc_call_id(value) is None
    assert rtc_call_id("rtc_Ab9_-") == "rtc_Ab9_-"


async def test_a_browsers_call_cannot_be_transferred_from_code(simulator: Simulator) -> None:
    """A REFER needs a phone call: ``ctx.transfer`` on a browser's call refuses, and the model is told,
    instead of a REFER that fails and hangs the caller up."""
    app = Sideband(instructions="Front desk.", transfer_targets={"human": "tel:+14155550123"})
    app.authorize_browser(lambda request: True)

    @app.tool
    async def escalate(ctx: CallContext) -> str:
        """Hand the caller to a person."""
        await ctx.transfer("human")
        return "transferring"

    simulator.next_webrtc_script = Script(
        [
            caller_says("A person, please."),
            model_calls("escalate", {}),
            model_says("I cannot transfer you from here."),
            caller_hangs_up(),
        ]
    )
    async with (
        run_app(app, simulator, **TEST_SETTINGS) as h,
        aiohttp.ClientSession() as http,
        http.post(h.url("/rtc/calls"), data=OFFER, headers={"content-type": "application/sdp"}) as resp,
    ):
        assert resp.status == 201
        call = simulator.calls[resp.headers["Location"].rsplit("/", 1)[-1]]
        summary = await h.ended(call)
    assert summary.reason == "remote_closed" and call.refer_target is None
    [output] = [e["item"]["output"] for e in call.received if e["type"] == "conversation.item.create"]
    assert "not allowed" in output and "human" in output
