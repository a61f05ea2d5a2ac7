"""The webhook edge: every malformed input is a clean 4xx (never 500, never 410); routing decisions."""

from __future__ import annotations

import asyncio
import gzip
import json
import sys
import threading
import time
import zlib
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from sideband import Accept, IncomingCall, Refer, Reject
from sideband.edge import app as edge
from sideband.stores import ClaimStore, StoreUnavailable
from sideband.testing import Script, caller_hangs_up, model_calls, pause, wait_for_greeting

from .conftest import Stack, capture_logs


def signed(
    stack: Stack, body: bytes, *, webhook_id: str = "wh_test", ts: int | None = None
) -> dict[str, str]:
    headers = stack.sender.sign(body, webhook_id, ts if ts is not None else int(time.time()))
    return {**headers, "content-type": "application/json"}


async def post(stack: Stack, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(stack.webhook_url, data=body, headers=headers) as resp,
    ):
        text = await resp.text()
        return resp.status, (json.loads(text) if text.startswith("{") else text)


def event_body(stack: Stack) -> bytes:
    call = stack.sim.create_call(Script([]))
    return json.dumps(stack.sim.incoming_event(call)).encode()


async def test_bad_inputs_are_4xx_with_json_errors(stack: Stack) -> None:
    body = event_body(stack)
    good = signed(stack, body)
    cases: list[tuple[str, bytes, dict[str, str], int]] = []
    for missing in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        cases.append((f"missing {missing}", body, {k: v for k, v in good.items() if k != missing}, 400))
    for sig in ("v1", "v1,a,b", "v1,!!!notbase64!!!", "v2,abc", "", " ", "v1," + "A" * 5000):
        cases.append((f"signature {sig[:12]!r}", body, {**good, "webhook-signature": sig}, -1))
    cases += [
        ("timestamp not a number", body, {**good, "webhook-timestamp": "abc"}, 400),
        ("timestamp float", body, {**good, "webhook-timestamp": "1.5e9"}, 400),
        ("too old", body, signed(stack, body, ts=int(time.time()) - 330), 401),
        ("too new", body, signed(stack, body, ts=int(time.time()) + 330), 401),
        ("tampered body", body.replace(b"realtime", b"realtimE"), good, 401),
        ("non-utf8 body", b"\xff\xfe{}", signed(stack, b"\xff\xfe{}"), 400),
        ("signed non-json", b"hello", signed(stack, b"hello"), 400),
        ("signed json array", b"[1]", signed(stack, b"[1]"), 400),
        (
            "call event without call_id",
            b'{"type":"realtime.call.incoming","data":{}}',
            signed(stack, b'{"type":"realtime.call.incoming","data":{}}'),
            400,
        ),
        ("wrong content type", body, {**good, "content-type": "text/plain"}, 415),
        ("too large", b"{" + b" " * (300 * 1024) + b"}", signed(stack, b"{}"), 413),
    ]
    for name, data, headers, expected in cases:
        status, answer = await post(stack, data, headers)
        assert 400 <= status < 500 and status != 410, (name, status, answer)
        if expected != -1:
            assert status == expected, (name, status, answer)
        assert isinstance(answer, dict) and "error" in answer, (name, answer)
    # Nothing was accepted, and the genuine delivery still works afterwards (nothing was claimed).
    assert not [r for r in stack.sim.requests if r.path.endswith("/accept")]
    status, answer = await post(stack, body, good)
    assert (status, answer["status"]) == (200, "accepted")


async def test_get_and_unknown_routes_are_never_410(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        for method, path in (("GET", "/webhooks/openai"), ("POST", "/nope"), ("PUT", "/webhooks/openai")):
            async with http.request(method, stack.url(path)) as resp:
                assert resp.status in (404, 405)


async def test_health_readiness_and_metrics(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.url("/healthz")) as resp:
            assert resp.status == 200
        async with http.get(stack.url("/readyz")) as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ready"
        stack.service.draining = True
        async with http.get(stack.url("/readyz")) as resp:
            assert resp.status == 503
        body = event_body(stack)
        with capture_logs() as logs:
            status, _ = await post(stack, body, signed(stack, body))
        assert status == 503  # OpenAI redelivers to an instance that is not draining
        assert [e["event"] for e in logs] == ["webhook.draining"]
        stack.service.draining = False
        status, _answer = await post(stack, body, signed(stack, body))
        assert status == 200
        forged = {**signed(stack, body), "webhook-signature": "v1,AAAA"}
        assert (await post(stack, body, forged))[0] == 401
        assert (await post(stack, body, {**signed(stack, body), "content-type": "text/plain"}))[0] == 415
        call = next(iter(stack.sim.calls.values()))
        await call.wait_connected(timeout=5)
        stack.sim.hang_up(call)
        await stack.ended(call)
        async with http.get(stack.url("/metrics")) as resp:
            text = await resp.text()
    for line in (
        'sideband_events_total{outcome="accepted"} 1',
        "sideband_requests_in_flight 1",  # (the /metrics request itself)
        'sideband_calls_ended_total{reason="remote_closed"} 1',
        'sideband_requests_refused_total{event="webhook.draining",status="503"} 1',
        'sideband_requests_refused_total{event="webhook.rejected",status="401"} 1',
        'sideband_requests_refused_total{event="webhook.rejected",status="415"} 1',
    ):
        assert line in text.splitlines(), text
    # The whole text is valid exposition.
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ended = families["sideband_calls_ended"]
    assert ended.type == "counter"
    assert {s.labels["reason"]: s.value for s in ended.samples if s.name.endswith("_total") and s.value} == {
        "remote_closed": 1,
    }
    assert families["sideband_calls_live"].type == "gauge"


async def test_routing_reject_refer_and_accept_overrides(stack: Stack) -> None:
    @stack.app.on_incoming
    async def route(call: IncomingCall) -> Accept | Reject | Refer:
        if call.to_number == "+18005550001":
            return Reject(status_code=486)
        if call.to_number == "+18005550002":
            return Refer("tel:+14155550123")
        return Accept(instructions="Billing desk.", tools=("lookup_order",))

    busy = stack.sim.create_call(Script([]), to_number="+18005550001")
    moved = stack.sim.create_call(Script([]), to_number="+18005550002")
    billed = stack.sim.create_call(Script([wait_for_greeting("Hi")]), to_number="+18005550003")
    for call in (busy, moved, billed):
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    assert busy.status == "rejected" and busy.reject_body == {"status_code": 486}
    assert moved.status == "referred" and moved.refer_target == "tel:+14155550123"
    assert billed.accept_body["instructions"] == "Billing desk."
    assert [t["name"] for t in billed.accept_body["tools"]] == ["lookup_order"]


@pytest.mark.parametrize("settings_overrides", [{"route_budget": 0.2, "route_failure_status": 503}])
async def test_routing_hook_that_fails_or_overruns_rejects(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    never = asyncio.Event()

    @stack.app.on_incoming
    async def route(call: IncomingCall) -> Accept:
        if call.to_number == "+18005550009":
            raise LookupError("no account for +18005550009")
        if call.to_number == "+18005550011":
            return None  # type: ignore[return-value]  # a forgotten return
        if call.to_number == "+18005550013":
            return Accept(max_idle_duration="60")  # type: ignore[arg-type]  # a value read from config
        if call.to_number == "+18005550012":  # a cancelled lookup of the hook's own, not a shutdown
            lookup = asyncio.get_running_loop().create_future()
            lookup.cancel()
            await lookup
        if call.to_number == "+18005550014":
            sys.exit("the CRM client gave up")  # out of a task, it would stop the server
        if call.to_number == "+18005550015":  # its lookup swallows the cancellation, answers later
            try:
                await never.wait()
            except asyncio.CancelledError:
                await asyncio.sleep(2)
            return Accept()
        await never.wait()
        return Accept()

    raising = stack.sim.create_call(Script([]), to_number="+18005550009")
    slow = stack.sim.create_call(Script([]), to_number="+18005550010")
    nothing = stack.sim.create_call(Script([]), to_number="+18005550011")
    cancelled = stack.sim.create_call(Script([]), to_number="+18005550012")
    unusable = stack.sim.create_call(Script([]), to_number="+18005550013")
    exiting = stack.sim.create_call(Script([]), to_number="+18005550014")
    stubborn = stack.sim.create_call(Script([]), to_number="+18005550015")
    with capture_logs() as logs:
        for call in (raising, slow, nothing, cancelled, unusable, exiting, stubborn):
            delivery = asyncio.create_task(stack.sender.deliver(stack.sim.incoming_event(call)))
            assert (await asyncio.wait_for(delivery, 1.5)).status == 200  # at the budget, not later
            assert call.status == "rejected" and call.reject_body == {"status_code": 503}
    failed = [e for e in logs if e["event"] == "call.route_failed"]
    # What went wrong, for the operator: where the hook raised, not the data in its message (which
    # SIDEBAND_LOG_TOOL_ARGUMENTS would show); sideband's own messages in full.
    assert [e["error"] for e in failed] == [
        "LookupError",
        "timeout",
        "DecisionError: on_incoming returned NoneType, not Accept/Reject/Refer",
        "CancelledError",
        "DecisionError: Accept max_idle_duration must be a number of seconds > 0, got '60'",
        "SystemExit",
        "timeout",
    ]
    assert "in route" in failed[0]["stack"] and 'raise LookupError("no account' in failed[0]["stack"]
    assert "+18005550009" not in failed[0]["stack"].splitlines()[-1]


@pytest.mark.parametrize("settings_overrides", [{"route_budget": 0.3, "route_failure_status": 503}])
async def test_a_blocking_sync_hook_is_bounded_and_blocks_nothing(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    release = threading.Event()
    entered = threading.Event()

    @stack.app.on_incoming
    def route(call: IncomingCall) -> Accept:
        entered.set()
        release.wait(10)  # a slow database lookup, written as a plain function
        return Accept()

    call = stack.sim.create_call(Script([]))
    try:
        delivery = asyncio.create_task(stack.sender.deliver(stack.sim.incoming_event(call)))
        assert await asyncio.to_thread(entered.wait, 5)
        async with aiohttp.ClientSession() as http, http.get(stack.url("/healthz")) as resp:
            assert resp.status == 200  # the event loop is free while the hook blocks
        result = await asyncio.wait_for(delivery, 5)
        assert result.status == 200 and call.status == "rejected" and call.reject_body == {"status_code": 503}
    finally:
        release.set()


@pytest.mark.parametrize("settings_overrides", [{"route_budget": 0.2, "route_failure_status": 503}])
async def test_an_async_hook_holding_the_loop_past_its_budget_is_an_overrun(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    """Blocking code in an async hook keeps the budget's timer from firing: its decision, late all the
    same, is not obeyed."""

    @stack.app.on_incoming
    async def route(call: IncomingCall) -> Accept:
        time.sleep(0.3)  # a sync client's lookup, on the event loop
        return Accept()

    call = stack.sim.create_call(Script([]))
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    assert call.status == "rejected" and call.reject_body == {"status_code": 503}
    failed = [(e["error"], e["started"]) for e in logs if e["event"] == "call.route_failed"]
    assert failed == [("timeout", True)]
    assert [e["hook"] for e in logs if e["event"] == "loop.blocked"] == ["on_incoming"]


@pytest.mark.parametrize("kind", ["async", "sync"])
@pytest.mark.parametrize("settings_overrides", [{"route_budget": 0.2, "route_failure_status": 503}])
async def test_a_quick_hook_is_obeyed_when_another_calls_blocking_tool_held_the_loop(
    stack: Stack, settings_overrides: dict[str, Any], kind: str
) -> None:
    """The routing hook decides at once (a sync one, in its thread); a live call's tool then holds the
    event loop past the hook's budget before its decision is read. The hook did not overrun: its
    decision stands (the tool's blocking is the tool's, named as such)."""
    waiting, routed = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    @stack.app.tool(timeout=10, filler_after=None)
    async def sync_crm_lookup() -> str:
        """Look the caller up with a blocking client."""
        waiting.set()
        await routed.wait()
        time.sleep(0.4)  # a sync client's lookup, on the event loop, as the other call's hook returns
        return "found"

    if kind == "async":

        @stack.app.on_incoming
        async def route(call: IncomingCall) -> Accept:
            if call.to_number == "+18005550021":
                routed.set()  # the tool runs on right after this, before the decision is read
            return Accept()

    else:

        @stack.app.on_incoming
        def route_in_thread(call: IncomingCall) -> Accept:
            if call.to_number == "+18005550021":
                loop.call_soon_threadsafe(routed.set)  # (as above, from the hook's thread)
            return Accept()

    busy = await stack.call(
        Script([wait_for_greeting("Hi."), model_calls("sync_crm_lookup", {}), pause(60)]),
        to_number="+18005550020",
    )
    await asyncio.wait_for(waiting.wait(), 5)
    call = stack.sim.create_call(Script([]), to_number="+18005550021")
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    assert call.status != "rejected" and call.accept_body is not None
    assert not [e for e in logs if e["event"] == "call.route_failed"]
    assert [e.get("tool") for e in logs if e["event"] == "loop.blocked"] == ["sync_crm_lookup"]
    assert stack.service.counters["route_failed"] == 0
    await stack.sim.hang_up(busy)


@pytest.mark.parametrize("settings_overrides", [{"route_budget": 0.3, "route_failure_status": 503}])
async def test_a_sync_hook_that_answers_while_other_code_holds_the_loop_is_obeyed(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    """The sync hook's thread answers at once, but while other code (another call's) holds the event
    loop past the budget: once the loop runs again, the budget's timer is due as the answer is. The
    hook did not overrun (its own time was short): its decision stands."""
    loop = asyncio.get_running_loop()
    began, holding, answered = asyncio.Event(), threading.Event(), threading.Event()

    @stack.app.on_incoming
    def route(call: IncomingCall) -> Accept:
        loop.call_soon_threadsafe(began.set)
        holding.wait(5)  # answers while the loop is held
        answered.set()
        return Accept(instructions="Decided in time.")

    async def other_code() -> None:
        await began.wait()
        holding.set()
        answered.wait(5)
        time.sleep(0.45)  # blocking code of another call's, holding the loop past the hook's budget

    call = stack.sim.create_call(Script([]))
    with capture_logs() as logs:
        hog = asyncio.ensure_future(other_code())
        reply = await stack.sender.deliver(stack.sim.incoming_event(call))
        await hog
    assert answered.is_set() and reply.status == 200
    assert not [e for e in logs if e["event"] == "call.route_failed"]
    assert call.status != "rejected" and call.accept_body is not None
    assert call.accept_body["instructions"] == "Decided in time."


@pytest.mark.parametrize("settings_overrides", [{"route_budget": 1.0, "route_failure_status": 503}])
async def test_a_sync_hook_whose_answer_is_a_coroutine_keeps_to_the_budget(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    """A sync hook returns at once, but what it returns is a coroutine (its ``await`` left out), which then
    runs on past the budget: the hook has not answered by its thread's return, and fails closed at the
    budget (it was given a second one)."""

    async def slow() -> Accept:
        await asyncio.Event().wait()  # (never)
        return Accept()

    @stack.app.on_incoming
    def route(call: IncomingCall) -> Any:
        return slow()

    call = stack.sim.create_call(Script([]))
    loop = asyncio.get_running_loop()
    with capture_logs() as logs:
        began = loop.time()
        reply = await stack.sender.deliver(stack.sim.incoming_event(call))
        took = loop.time() - began
    assert reply.status == 200 and call.status == "rejected"
    assert [(e["error"], e["started"]) for e in logs if e["event"] == "call.route_failed"] == [
        ("timeout", True)
    ]
    assert 1.0 <= took < 1.7  # (one budget, not two)


@pytest.mark.parametrize("settings_overrides", [{"route_budget": 5}])
async def test_a_burst_of_calls_whose_sync_hook_blocks_a_while_runs_their_hooks_together(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    """24 calls ring at once, each hook's lookup blocking a while: none waits for a worker thread (and
    runs out of its budget in a queue) while the others run."""
    together = threading.Barrier(24, timeout=10)

    @stack.app.on_incoming
    def route(call: IncomingCall) -> Accept:
        together.wait()  # passes once all 24 hooks run at the same time
        return Accept()

    with capture_logs() as logs:
        calls = await asyncio.gather(*(stack.call(Script([caller_hangs_up()])) for _ in range(24)))
        for call in calls:
            await stack.ended(call)  # (an AssertionError for a call rejected at ring time)
    assert all(c.accept_body for c in calls)
    assert not [e for e in logs if e["event"] == "call.route_failed"]


@pytest.mark.parametrize("settings_overrides", [{"route_budget": 0.3, "route_failure_status": 503}])
async def test_a_sync_hook_that_never_got_a_thread_is_told_from_one_that_overran(
    stack: Stack, settings_overrides: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sideband.app.HOOK_THREADS", 1)
    release, entered = threading.Event(), threading.Event()

    @stack.app.on_incoming
    def route(call: IncomingCall) -> Accept:
        entered.set()
        release.wait(10)  # a lookup that hangs, holding the one thread
        return Accept()

    slow, queued = stack.sim.create_call(Script([])), stack.sim.create_call(Script([]))
    try:
        with capture_logs() as logs:
            first = asyncio.create_task(stack.sender.deliver(stack.sim.incoming_event(slow)))
            assert await asyncio.to_thread(entered.wait, 5)
            second = await asyncio.wait_for(stack.sender.deliver(stack.sim.incoming_event(queued)), 5)
            assert (await asyncio.wait_for(first, 5)).status == second.status == 200
    finally:
        release.set()
    assert slow.status == queued.status == "rejected"
    failed = [(e["error"], e["started"]) for e in logs if e["event"] == "call.route_failed"]
    assert failed == [("timeout", True), ("timeout", False)]


@pytest.mark.parametrize("settings_overrides", [{"route_budget": 30, "route_failure_status": 503}])
async def test_a_sync_hook_raising_stop_iteration_fails_closed_at_once(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    @stack.app.on_incoming
    def route(call: IncomingCall) -> Accept:
        return next(Accept() for number in ["+18005550000"] if number == call.to_number)  # none found

    call = stack.sim.create_call(Script([]))
    with capture_logs() as logs:
        delivery = stack.sender.deliver(stack.sim.incoming_event(call))
        assert (await asyncio.wait_for(delivery, 5)).status == 200  # not at the budget
    assert call.status == "rejected" and call.reject_body == {"status_code": 503}
    failed = [e for e in logs if e["event"] == "call.route_failed"]
    assert [e["error"] for e in failed] == ["RuntimeError"]
    assert "in route" in failed[0]["stack"]


@pytest.mark.parametrize(
    "decide",
    [lambda: Reject(status_code=200), lambda: Reject(status_code=1000), lambda: Refer("https://example.com")],
    ids=["reject-200", "reject-1000", "refer-https"],
)
@pytest.mark.parametrize("settings_overrides", [{"route_failure_status": 480}])
async def test_an_impossible_decision_fails_closed(
    stack: Stack, settings_overrides: dict[str, Any], decide: Any
) -> None:
    stack.app.on_incoming(lambda call: decide())
    call = stack.sim.create_call(Script([]))
    assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    assert call.status == "rejected" and call.reject_body == {"status_code": 480}
    assert not [r for r in stack.sim.requests if r.path.endswith(("/refer", "/accept"))]


async def test_accept_tools_may_be_a_list_or_any_iterable_of_names() -> None:
    assert Accept(tools=["lookup_order"]).tools == ("lookup_order",)
    names = (n for n in ("lookup_order", "transfer_call"))  # read once, and kept
    assert Accept(tools=names).tools == ("lookup_order", "transfer_call")  # type: ignore[arg-type]
    for wrong in ("lookup_order", 3, [1]):
        with pytest.raises(TypeError, match="takes tool names"):
            Accept(tools=wrong)  # type: ignore[arg-type]


async def test_a_caller_address_of_any_length_makes_a_bounded_log_line(stack: Stack) -> None:
    long_user = "support-" + "x" * 50_000
    call = stack.sim.create_call(Script([]), from_number=long_user)
    with capture_logs() as logs:
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    incoming = next(e for e in logs if e["event"] == "call.incoming")
    assert incoming["from_number"].startswith("support-xxx") and len(incoming["from_number"]) == 128
    assert incoming["to_number"] == "+18005551212"
    await stack.sim.hang_up(call)


async def test_odd_envelopes_of_verified_events_are_tolerated(stack: Stack) -> None:
    call = stack.sim.create_call(Script([wait_for_greeting("Hi")]))
    event = stack.sim.incoming_event(call)
    event["data"]["sip_headers"] += [{"name": "X-Odd", "value": None}, {"value": "no name"}, "junk"]
    event["data"]["sip_media_security"] = 7
    for n, odd in enumerate(
        (
            {"object": "event", "id": 123, "type": "batch.completed", "created_at": "2026-01-01T00:00:00Z"},
            {"object": "event", "type": "eval.run.succeeded", "data": [1, 2]},
            event,
        )
    ):
        body = json.dumps(odd).encode()
        status, answer = await post(stack, body, signed(stack, body, webhook_id=f"wh_odd{n}"))
        assert status == 200, (odd, answer)
    assert call.status == "accepted"
    assert (await post(stack, b'{"id": "evt_1"}', signed(stack, b'{"id": "evt_1"}')))[0] == 400  # no type


async def test_bodies_that_do_not_match_their_encoding_are_400(stack: Stack) -> None:
    body = event_body(stack)
    for encoding in ("gzip", "deflate"):
        headers = {**signed(stack, body), "Content-Encoding": encoding}
        status, answer = await post(stack, b"this is not compressed", headers)
        assert status == 400 and "encoding" in answer["error"], (encoding, status, answer)
    status, answer = await post(stack, body, {**signed(stack, body), "Content-Encoding": "br"})
    assert status == 400  # an encoding we do not decode
    bomb = gzip.compress(b"{" + b" " * 50_000_000 + b"}")  # 49 KB that inflate to 50 MB
    status, answer = await post(stack, bomb, {**signed(stack, body), "Content-Encoding": "gzip"})
    assert status == 413
    encodings: tuple[tuple[str, Any], ...] = (
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("gzip", lambda b: gzip.compress(b[:10]) + gzip.compress(b[10:])),  # two gzip members
        ("", lambda b: b),  # an empty header: no encoding
    )
    for n, (encoding, compress) in enumerate(encodings):
        fresh = event_body(stack)
        headers = {**signed(stack, fresh, webhook_id=f"wh_enc{n}"), "Content-Encoding": encoding}
        status, answer = await post(stack, compress(fresh), headers)
        assert (status, answer["status"]) == (200, "accepted"), encoding


async def test_a_body_that_fails_to_decode_closes_its_connection_quietly(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp would read the rest of such a body after our 400, fail again and log an unhandled error
    with a traceback (any client could flood the log that way) and drop the next request."""
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    statuses = []
    async with aiohttp.ClientSession() as http:  # one session: keep-alive reuse is attempted
        for _ in range(3):
            async with http.post(stack.webhook_url, data=b"x" * 100, headers=headers) as resp:
                statuses.append(resp.status)
                assert resp.headers.get("Connection", "").lower() == "close"  # the rest is never read
    assert statuses == [400, 400, 400]
    assert not [r for r in caplog.records if r.name.startswith("aiohttp") and r.levelno >= 40]


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/webhooks/openai", "application/json"),
        ("/rtc/calls", "application/sdp"),
        ("/rtc/handoff", "application/json"),
    ],
)
async def test_a_bad_body_from_a_client_that_left_is_no_internal_error(
    stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    path: str,
    content_type: str,
) -> None:
    """A sender that gives up (a timeout, a proxy) right after a body that fails to decode: its 400
    cannot be written, and that is no server error (no traceback, no 500 in the log)."""
    route = "webhook" if path.startswith("/webhooks/") else "rtc"
    host, port = stack.webhook_url.removeprefix("http://").split("/")[0].split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    seen_leave = asyncio.Event()
    monkeypatch.setattr(RequestHandler, "eof_received", lambda self: seen_leave.set())
    read_body = edge._read_body

    async def read_as_the_client_leaves(request: web.Request, limit: int) -> bytes:
        try:
            return await read_body(request, limit)
        finally:  # the body has failed to decode: the client is gone before the answer goes out
            writer.close()
            async with asyncio.timeout(5):
                await seen_leave.wait()

    monkeypatch.setattr(edge, "_read_body", read_as_the_client_leaves)
    answered = asyncio.Event()
    request_done = stack.service.request_done

    def done() -> None:
        request_done()
        answered.set()

    monkeypatch.setattr(stack.service, "request_done", done)
    with capture_logs() as logs:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n".encode()
            + b"Content-Encoding: gzip\r\nContent-Length: 100\r\n\r\n"
            + b"x" * 100
        )
        async with asyncio.timeout(5):
            await answered.wait()
    assert not [e for e in logs if e["event"] == "http.internal_error"]
    [left] = [e for e in logs if e["event"] == f"{route}.abandoned"]
    assert left["log_level"] == "info" and "exc_info" not in left, left
    assert not [r for r in caplog.records if r.name.startswith("aiohttp") and r.levelno >= 40]


async def test_a_body_trickled_in_too_slowly_is_408_and_the_connection_closed(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sideband.edge.app.BODY_TIMEOUT", 0.3)
    host, port = stack.webhook_url.removeprefix("http://").split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST /webhooks/openai HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))[15:])
        answer = await asyncio.wait_for(reader.readexactly(length), 5)
        writer.write(b" ")  # the client trickles on: the server does not read it, the connection is closed
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 408 "), head[:80]
    assert json.loads(answer) == {"error": "body not received within 0.3 s"}


async def test_signature_header_lines_are_joined(stack: Stack) -> None:
    body = event_body(stack)
    good = signed(stack, body)
    headers = CIMultiDict({k: v for k, v in good.items() if k != "webhook-signature"})
    headers.add("webhook-signature", "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")  # a rotated-out key
    headers.add("webhook-signature", good["webhook-signature"])
    async with (
        aiohttp.ClientSession() as http,
        http.post(stack.webhook_url, data=body, headers=headers) as resp,
    ):
        assert resp.status == 200, await resp.text()


async def test_invalid_session_config_is_refused_locally(stack: Stack) -> None:
    @stack.app.on_incoming
    def route(call: IncomingCall) -> Accept:
        return Accept(session={"audio": {"input": {"format": {"type": "audio/pcm"}}}})

    call = stack.sim.create_call(Script([]))
    assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    assert call.status == "rejected" and not [r for r in stack.sim.requests if r.path.endswith("/accept")]


@pytest.mark.parametrize(
    ("path", "content_type", "status"),
    [
        ("/webhooks/openai", "text/plain", 415),  # refused before its body is read
        ("/healthz", "application/json", 405),
        ("/nowhere", "application/json", 404),
    ],
)
async def test_a_request_answered_without_its_body_read_closes_its_connection_at_once(
    stack: Stack, path: str, content_type: str, status: int
) -> None:
    """Otherwise aiohttp goes on reading the rest for 10 s, decompressing it on the event loop: a 4 MB
    gzip body that inflates to 4 GiB cost the server 8 s of CPU after its answer."""
    host, port = stack.webhook_url.removeprefix("http://").split("/")[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n".encode()
            + b"Content-Encoding: gzip\r\nContent-Length: 10000000\r\n\r\n"
            + gzip.compress(b"\0" * 100_000)[:1000]  # the start of a body that never ends
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.split(b" ")[1] == str(status).encode()
        async with asyncio.timeout(3):  # closed by the server, not after the 10 s linger
            while await reader.read(65536):
                pass
    finally:
        writer.close()


async def test_too_many_header_lines_are_refused(stack: Stack) -> None:
    headers = {f"x-filler-{n}": "y" * 100 for n in range(70)}
    async with aiohttp.ClientSession() as http, http.get(stack.url("/healthz"), headers=headers) as r:
        assert r.status == 400


async def test_a_lone_surrogate_in_a_sip_header_does_not_sink_the_call(stack: Stack) -> None:
    """Valid JSON that pydantic's parser refuses (Python's reads it, as OpenAI's SDK would): a caller's
    odd header bytes must not make every delivery a 400 while the caller rings."""
    call = stack.sim.create_call(Script([]))
    event = stack.sim.incoming_event(call)
    event["data"]["sip_headers"].append({"name": "X-Caller-Name", "value": "\udc80 odd"})
    body = json.dumps(event).encode()  # ensure_ascii: the surrogate goes out escaped, \udc80
    assert b"\\udc80" in body
    with capture_logs() as logs:
        status, answer = await post(stack, body, signed(stack, body, webhook_id="wh_surrogate"))
        assert (status, answer) == (200, {"status": "accepted"})
        await call.wait_connected(timeout=5)
    assert not [e for e in logs if e["event"] in ("webhook.rejected", "http.internal_error")]


@pytest.mark.parametrize("settings_overrides", [{"openai_api_key": "sk-not-this-projects"}])
async def test_a_refused_api_key_is_named_in_the_log(stack: Stack) -> None:
    """OpenAI answers 401 to a wrong key: the log says which setting to check, not only the status."""
    call = stack.sim.create_call(Script([]))
    with capture_logs() as logs:
        result = await stack.sender.deliver(stack.sim.incoming_event(call))
    assert result.status == 200 and call.status == "ringing"  # the reject instead was refused too
    failed = [e for e in logs if e["event"] in ("call.accept_failed", "call.answer_failed")]
    assert [e["status"] for e in failed] == [401, 401], failed
    assert all("OpenAI refused the API key (check OPENAI_API_KEY)" in e["error"] for e in failed), failed


def padded_event_body(stack: Stack, size: int) -> bytes:
    """A new call's event, padded with whitespace inside its JSON object to exactly ``size`` bytes."""
    body = event_body(stack)
    assert body.endswith(b"}") and len(body) < size
    return body[:-1] + b" " * (size - len(body)) + b"}"


@pytest.mark.parametrize("settings_overrides", [{"webhook_max_body": 4096}])
async def test_a_body_of_exactly_the_size_limit_is_taken_and_one_byte_more_is_413(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    limit = stack.settings.webhook_max_body
    exact = padded_event_body(stack, limit)
    status, answer = await post(stack, exact, signed(stack, exact, webhook_id="wh_exact"))
    assert (status, answer) == (200, {"status": "accepted"})
    over = padded_event_body(stack, limit + 1)
    status, answer = await post(stack, over, signed(stack, over, webhook_id="wh_over"))
    assert (status, answer) == (413, {"error": f"body over {limit} bytes"})


@pytest.mark.parametrize("settings_overrides", [{"webhook_max_body": 4096}])
async def test_a_chunked_body_of_exactly_the_size_limit_is_taken_while_it_streams_in(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    """Without a Content-Length, the limit is counted as the chunks arrive: reaching it is not passing it."""
    body = padded_event_body(stack, stack.settings.webhook_max_body)
    rest = asyncio.Event()

    async def chunks() -> Any:
        yield body
        await rest.wait()  # the end of the body comes once the server is reading it

    async with aiohttp.ClientSession() as http:
        sending = asyncio.create_task(
            http.post(stack.webhook_url, data=chunks(), headers=signed(stack, body, webhook_id="wh_chunked"))
        )
        try:
            async with asyncio.timeout(5):  # until the handler reads the body (or answers without it)
                while not stack.service.requests and not sending.done():
                    await asyncio.sleep(0.01)
            rest.set()
            async with asyncio.timeout(10), await sending as resp:
                assert (resp.status, await resp.json()) == (200, {"status": "accepted"})
        finally:
            rest.set()
            sending.cancel()


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", "Application/JSON", " application/json ;charset=UTF-8"],
)
async def test_the_webhook_media_type_is_matched_without_case_or_parameters(
    stack: Stack, content_type: str
) -> None:
    body = event_body(stack)
    status, answer = await post(stack, body, {**signed(stack, body), "content-type": content_type})
    assert (status, answer) == (200, {"status": "accepted"})


async def test_a_webhook_refused_while_draining_asks_to_be_sent_again_after_a_second(stack: Stack) -> None:
    body = event_body(stack)
    stack.service.draining = True
    async with (
        aiohttp.ClientSession() as http,
        http.post(stack.webhook_url, data=body, headers=signed(stack, body)) as resp,
    ):
        assert (resp.status, resp.headers.get("Retry-After"), await resp.json()) == (
            503,
            "1",
            {"error": "draining"},
        )
    assert not [r for r in stack.sim.requests if r.path.endswith("/accept")]


async def test_a_redelivered_event_of_another_type_is_acknowledged_as_a_duplicate(stack: Stack) -> None:
    event = {"object": "event", "id": "evt_9", "type": "response.completed", "created_at": 1, "data": {}}
    first = await stack.sender.deliver(event, webhook_id="wh_not_a_call", max_attempts=1)
    again = await stack.sender.deliver(event, webhook_id="wh_not_a_call", max_attempts=1)
    assert [(r.status, json.loads(r.bodies[-1] or b"{}")) for r in (first, again)] == [
        (200, {"status": "ignored"}),
        (200, {"status": "duplicate"}),
    ]


class StoreFailingOnce:
    """The service's claim store, but the first claim (or, ``at="settle"`` or ``"release"``, settle or
    release) of a key starting with ``prefix`` fails as an unreachable Redis would. ``ttls``: each key
    claimed, with its TTL."""

    def __init__(self, inner: ClaimStore, prefix: str, at: str = "claim") -> None:
        self.inner, self.prefix, self.at, self.failed = inner, prefix, at, False
        self.where = inner.where
        self.ttls: dict[str, float] = {}

    def _fail(self, at: str, key: str) -> None:
        if at == self.at and key.startswith(self.prefix) and not self.failed:
            self.failed = True
            raise StoreUnavailable("redis at redis://cache:6379/0: Connection reset by peer")

    async def claim(self, key: str, ttl: float) -> bool:
        self._fail("claim", key)
        self.ttls[key] = ttl
        return await self.inner.claim(key, ttl)

    async def settle(self, key: str, ttl: float) -> None:
        self._fail("settle", key)
        await self.inner.settle(key, ttl)

    async def settled(self, key: str) -> bool:
        return await self.inner.settled(key)

    async def release(self, key: str) -> None:
        self._fail("release", key)
        await self.inner.release(key)

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()


async def test_a_store_failing_as_the_call_is_claimed_frees_the_delivery_for_its_redelivery(
    stack: Stack,
) -> None:
    stack.service.store = StoreFailingOnce(stack.service.store, "call:")
    call = stack.sim.create_call(Script([wait_for_greeting("Hi")]))
    event = stack.sim.incoming_event(call)
    first = await stack.sender.deliver(event, webhook_id="wh_flaky", max_attempts=1)
    assert (first.status, json.loads(first.bodies[-1] or b"{}")) == (
        503,
        {"error": "claim store unavailable"},
    )
    assert not [r for r in stack.sim.requests if r.path.endswith("/accept")]
    again = await stack.sender.deliver(event, webhook_id="wh_flaky", max_attempts=1)
    assert (again.status, json.loads(again.bodies[-1] or b"{}")) == (200, {"status": "accepted"})
    await call.wait_connected(timeout=5)


async def test_a_store_lost_in_the_middle_of_an_answer_is_one_line(stack: Stack) -> None:
    """Redis goes away after the call is claimed: the answer path's next claim fails, and so does the
    release of the claims it holds. One ``store.unavailable`` line says so, not one per command."""

    class LostAfterTheCallClaim(StoreFailingOnce):
        async def claim(self, key: str, ttl: float) -> bool:
            if self.failed:
                raise StoreUnavailable("redis at redis://cache:6379/0: Connection refused")
            self.failed = key.startswith("call:")
            return await self.inner.claim(key, ttl)

        async def release(self, key: str) -> None:
            if self.failed:
                raise StoreUnavailable("redis at redis://cache:6379/0: Connection refused")
            await self.inner.release(key)

    stack.service.store = LostAfterTheCallClaim(stack.service.store, "call:")
    call = stack.sim.create_call(Script([]))  # (an accept claims its own mark before it goes out)
    with capture_logs() as logs:
        result = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert result.status == 503
    down = [e for e in logs if e["event"] == "store.unavailable"]
    assert len(down) == 1 and down[0]["call_id"] == call.call_id, down


# Room for exactly one attempt: it goes unanswered, and the budget is spent with no retry after it.
@pytest.mark.parametrize("settings_overrides", [{"accept_budget": 1.0, "accept_attempt_timeout": 1.0}])
async def test_a_lone_accept_attempt_that_went_unanswered_is_remembered_for_the_redelivery(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    call = stack.sim.create_call(Script([wait_for_greeting("Hi")]))
    stack.sim.fail_accept(call.call_id, "late")  # accepted upstream, but the answer never comes
    event = stack.sim.incoming_event(call)
    first = await stack.sender.deliver(event, webhook_id="wh_lone", max_attempts=1)
    assert first.status == 503 and call.status == "accepted"
    second = await stack.sender.deliver(event, webhook_id="wh_lone", max_attempts=1)
    assert (second.status, json.loads(second.bodies[-1] or b"{}")) == (200, {"status": "accepted"})
    await call.wait_connected(timeout=5)
    assert call.sideband_connects == 1


async def test_accepts_refused_by_every_attempt_leave_nothing_for_a_redelivery_to_attach_to(
    stack: Stack,
) -> None:
    """Every attempt was answered (500): the call was not accepted. When the redelivery finds it gone
    (the caller left meanwhile), it is gone: nothing attaches to it."""
    call = stack.sim.create_call(Script([wait_for_greeting("Hi")]))
    stack.sim.fail_accept(call.call_id, *([500] * 60))
    event = stack.sim.incoming_event(call)
    first = await stack.sender.deliver(event, webhook_id="wh_refused", max_attempts=1)
    assert first.status == 503 and call.status == "ringing"
    stack.sim.calls[call.call_id].accept_faults.clear()
    stack.sim.fail_accept(call.call_id, 404)  # the caller left before the redelivery
    second = await stack.sender.deliver(event, webhook_id="wh_refused", max_attempts=1)
    assert (second.status, json.loads(second.bodies[-1] or b"{}")) == (200, {"status": "call_gone"})
    assert call.sideband_connects == 0 and call.call_id not in stack.service.registry


async def test_a_reject_refused_with_a_4xx_is_reported_failed_and_not_sent_again(stack: Stack) -> None:
    stack.app.on_incoming(lambda call: Reject(486))
    call = stack.sim.create_call(Script([]))
    stack.sim.fail_verb(call.call_id, "reject", 400)
    result = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert (result.status, json.loads(result.bodies[-1] or b"{}")) == (
        200,
        {"status": "failed", "error": "upstream answered 400"},
    )
    assert len([r for r in stack.sim.requests if r.path.endswith(f"/{call.call_id}/reject")]) == 1
    assert call.status == "ringing"
