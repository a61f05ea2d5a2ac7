"""The answer path when OpenAI's call control misbehaves: a ringing call is never left unanswered while the
webhook says it was handled, and an accept that may have gone through is attached, not dropped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sideband import Refer, Reject, Sideband
from sideband.testing import Script, Simulator, run_app, wait_for_greeting
from sideband.upstream.openai import (
    CallControl,
    CallGone,
    SidebandRefused,
    UpstreamError,
    connect_sideband,
    sideband_url,
)

from .conftest import TEST_SETTINGS, Stack, capture_logs, make_app
from .test_edge import StoreFailingOnce


def _status(result: Any) -> tuple[int, str]:
    return result.status, json.loads(result.bodies[-1] or b"{}").get("status", "")


async def test_a_refused_accept_whose_reject_keeps_failing_is_delivered_again(stack: Stack) -> None:
    """An accept refused with a 4xx is replaced by a reject; when that reject cannot get through for the
    whole budget, the caller still rings: the webhook is answered 503 and its claims released, so the
    redelivery rejects the call."""
    control = stack.service.control
    real_reject = control.reject
    rejects: list[int] = []

    async def reject_unavailable(call_id: str, status_code: int, *, timeout: float = 2.0) -> None:
        rejects.append(status_code)
        if len(rejects) > 1 and outage:
            raise UpstreamError(f"POST /realtime/calls/{call_id}/reject answered 503", 503)
        await real_reject(call_id, status_code, timeout=timeout)

    control.reject = reject_unavailable  # type: ignore[method-assign]
    call = stack.sim.create_call(Script([]))
    stack.sim.fail_accept(call.call_id, 422)
    stack.sim.fail_verb(call.call_id, "reject", 503)  # answered by the simulator, then by the outage
    outage = True
    with capture_logs() as logs:
        first = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert _status(first) == (503, "retry")
    assert call.status == "ringing" and len(rejects) > 2  # tried again until the budget was spent
    assert [e["event"] for e in logs if e["event"].startswith("call.") and e["log_level"] == "error"] == [
        "call.accept_failed",
        "call.answer_failed",
    ]
    outage = False
    stack.sim.fail_accept(call.call_id, 422)  # refused again, for what it is
    second = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert _status(second) == (200, "rejected")
    assert call.status == "rejected"
    assert call.reject_body == {"status_code": stack.settings.route_failure_status}
    assert call.sideband_connects == 0


async def test_a_refused_accept_whose_reject_finds_the_call_gone_is_call_gone(stack: Stack) -> None:
    call = stack.sim.create_call(Script([]))
    stack.sim.fail_accept(call.call_id, 422)
    stack.sim.fail_verb(call.call_id, "reject", 404)  # the caller hung up meanwhile
    result = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert _status(result) == (200, "call_gone")
    assert stack.service.counters["call_gone"] == 1 and stack.service.counters["rejected"] == 0


async def test_a_refused_accept_leaves_no_mark_for_its_redeliveries(stack: Stack) -> None:
    """Every attempt answered, and refused: the call was not accepted, so a redelivery whose accept is
    refused again must reject the call, not take the refusal for a sign of an earlier accept."""
    call = stack.sim.create_call(Script([]))
    stack.sim.fail_accept(call.call_id, 422)
    await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert await stack.service.store.claim(f"accept_uncertain:{call.call_id}", 1.0)  # nothing kept


@pytest.mark.parametrize(("refusal", "answer"), [(400, "rejected"), (404, "call_gone")])
async def test_a_refused_accept_whose_mark_the_store_fails_to_give_back_is_answered_all_the_same(
    stack: Stack, refusal: int, answer: str
) -> None:
    """The accept is refused for good (400), or finds the call gone while ringing (404), and the store
    fails as its ``accept_uncertain:`` mark is given back: the call is rejected (or the webhook answered
    ``call_gone``) all the same, not answered 503 with the mark kept, for the redelivery to take the same
    400 for an earlier accept that went through and attach to a call that still rings. The mark is given
    back once the store answers."""
    store = StoreFailingOnce(stack.service.store, "accept_uncertain:", at="release")
    stack.service.store = store
    call = stack.sim.create_call(Script([]))
    stack.sim.fail_accept(call.call_id, refusal, refusal)
    event = stack.sim.incoming_event(call)
    with capture_logs() as logs:
        first = await stack.sender.deliver(event, webhook_id="wh_m", max_attempts=1)
        assert store.failed and _status(first) == (200, answer)
        if refusal == 400:
            assert call.status == "rejected"
            assert call.reject_body == {"status_code": stack.settings.route_failure_status}
        await asyncio.wait_for(asyncio.gather(*stack.service._settling), 5)
    assert await store.claim(f"accept_uncertain:{call.call_id}", 1.0)  # given back
    # (an hour-long mark outstanding is told, and so is its end)
    [down] = [e for e in logs if e["event"] == "store.unavailable"]
    [released] = [e for e in logs if e["event"] == "store.released"]
    assert down["call_id"] == released["call_id"] == call.call_id and released["tries"] >= 1
    again = await stack.sender.deliver(event, webhook_id="wh_m", max_attempts=1)
    assert _status(again) == (200, "duplicate")
    assert call.sideband_connects == 0 and not stack.service.registry.recent


@pytest.mark.parametrize("gateway_status", [502, 504])
async def test_an_accept_that_went_through_behind_a_gateway_error_is_attached(
    stack: Stack, gateway_status: int
) -> None:
    """A gateway in front of OpenAI may answer 502/504 after passing the accept on: the retry then finds
    the call no longer ringing. That is the unanswered attempt's case: attach (the call is up), never
    ``call_gone``, which would leave an answered call with nothing behind it."""
    control = stack.service.control
    real_accept = control.accept
    attempts = 0

    async def accept_then_gateway_error(
        call_id: str, session: dict[str, Any], *, timeout: float = 2.0
    ) -> None:
        nonlocal attempts
        attempts += 1
        await real_accept(call_id, session, timeout=timeout)
        if attempts == 1:
            raise UpstreamError(
                f"POST /realtime/calls/{call_id}/accept answered {gateway_status}", gateway_status
            )

    control.accept = accept_then_gateway_error  # type: ignore[method-assign]
    call = stack.sim.create_call(Script([wait_for_greeting("Hi")]))
    with capture_logs() as logs:
        result = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert _status(result) == (200, "accepted")
    assert attempts == 2 and call.status == "accepted"
    await call.wait_connected(timeout=5)
    assert any(e["event"] == "call.accept_uncertain" for e in logs)
    assert stack.service.counters["call_gone"] == 0


@pytest.mark.parametrize(
    "reject_fault", [None, "timeout"], ids=["refused_at_once", "after_an_unanswered_one"]
)
async def test_a_reject_instead_that_finds_a_maybe_accepted_call_not_ringing_hangs_it_up(
    stack: Stack, reject_fault: Any
) -> None:
    """The first accept went through behind a gateway's 504; the retry is refused with a 4xx that says
    nothing of an earlier accept (403), so the call is rejected instead, and the reject finds it no
    longer ringing: it was answered, and is hung up rather than left up with nobody on it. (Also when an
    unanswered reject came first: its retry's 404 need not be its doing.)"""
    control = stack.service.control
    real_accept = control.accept
    attempts = 0

    async def accept(call_id: str, session: dict[str, Any], *, timeout: float = 2.0) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await real_accept(call_id, session, timeout=timeout)
            raise UpstreamError(f"POST /realtime/calls/{call_id}/accept answered 504", 504)
        raise UpstreamError(f"POST /realtime/calls/{call_id}/accept answered 403", 403)

    control.accept = accept  # type: ignore[method-assign]
    call = stack.sim.create_call(Script([wait_for_greeting("Hi")]))
    if reject_fault is not None:
        stack.sim.fail_verb(call.call_id, "reject", reject_fault)
    result = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert attempts == 2
    assert _status(result) == (200, "hung_up")
    assert _verbs(stack, call.call_id).count("reject") == (1 if reject_fault is None else 2)
    assert call.hangup_requested and call.sideband_connects == 0


def _verbs(stack: Stack, call_id: str) -> list[str]:
    prefix = f"/v1/realtime/calls/{call_id}/"
    return [r.path.rsplit("/", 1)[-1] for r in stack.sim.requests if r.path.startswith(prefix)]


@pytest.mark.parametrize(
    ("fault", "verbs", "uncertain", "status"),
    [
        pytest.param(503, ["refer", "refer"], False, "referred", id="503_did_nothing_tried_again"),
        pytest.param(504, ["refer"], True, "ringing", id="504_maybe_passed_on_not_sent_again"),
        pytest.param("late", ["refer"], True, "referred", id="carried_out_answered_late"),
    ],
)
async def test_a_refer_that_may_have_reached_the_carrier_is_not_sent_again(
    stack: Stack, fault: Any, verbs: list[str], uncertain: bool, status: str
) -> None:
    """A REFER reaches the carrier each time it is sent. One that went unanswered (its answer held past
    the budget) or that a gateway gave up on (502/504) may have been handed over: it is taken as done,
    not sent again (a retry would transfer the caller twice, or find the call gone and call it gone).
    Only a failure that did nothing (a 503) is tried again."""
    stack.app.on_incoming(lambda call: Refer("tel:+14155550123"))
    call = stack.sim.create_call(Script([]))
    stack.sim.fail_verb(call.call_id, "refer", fault)
    with capture_logs() as logs:
        result = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert _status(result) == (200, "referred")
    assert _verbs(stack, call.call_id) == verbs
    assert call.status == status  # (a 504 that passed nothing on leaves the call ringing: not known here)
    counters = stack.service.counters
    assert counters["referred"] == 1 and counters["call_gone"] == 0
    (referred,) = [e for e in logs if e["event"] == "call.referred"]
    assert referred["uncertain"] is uncertain
    unsure = [e for e in logs if e["event"] == "call.refer_uncertain"]
    assert len(unsure) == uncertain and all(e["log_level"] == "warning" for e in unsure)


async def test_a_refer_attempt_gets_the_whole_budget(stack: Stack) -> None:
    """A REFER is answered once it is handed to the SIP provider, which may take longer than an accept:
    its one attempt is given the whole answer budget, not ``SIDEBAND_ACCEPT_TIMEOUT``."""
    stack.app.on_incoming(lambda call: Refer("tel:+14155550123"))
    control = stack.service.control
    real_refer = control.refer
    timeouts: list[float] = []

    async def refer(call_id: str, target_uri: str, *, timeout: float = 5.0) -> None:
        timeouts.append(timeout)
        await real_refer(call_id, target_uri, timeout=timeout)

    control.refer = refer  # type: ignore[method-assign]
    call = stack.sim.create_call(Script([]))
    result = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert _status(result) == (200, "referred") and call.status == "referred"
    settings = stack.settings
    assert len(timeouts) == 1 and settings.accept_attempt_timeout < settings.accept_budget
    assert timeouts[0] == pytest.approx(settings.accept_budget, abs=0.1)  # (what is left of it)


async def test_a_refer_that_could_not_connect_is_tried_again(stack: Stack) -> None:
    """No connection could be made: the REFER never left, and is tried again."""
    with socket.socket() as probe:  # an address nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with aiohttp.ClientSession() as http:
        control = CallControl(http, f"http://127.0.0.1:{port}/v1", "sk-test")
        with pytest.raises(UpstreamError) as refused:
            await control.refer("rtc_1", "tel:+14155550123", timeout=2)
    assert refused.value.unsent and not refused.value.maybe_carried_out and refused.value.retryable

    stack.app.on_incoming(lambda call: Refer("tel:+14155550123"))
    real_refer = stack.service.control.refer
    attempts = 0

    async def refer(call_id: str, target_uri: str, *, timeout: float = 5.0) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise refused.value
        await real_refer(call_id, target_uri, timeout=timeout)

    stack.service.control.refer = refer  # type: ignore[method-assign]
    call = stack.sim.create_call(Script([]))
    with capture_logs() as logs:
        result = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert _status(result) == (200, "referred") and call.status == "referred" and attempts == 2
    assert not [e for e in logs if e["event"] == "call.refer_uncertain"]


async def test_an_accept_that_could_not_connect_then_finds_the_call_gone_is_call_gone(stack: Stack) -> None:
    """An attempt that never left accepted nothing: a retry's 404 means the caller left (not an attach)."""
    call = stack.sim.create_call(Script([]))
    real_accept = stack.service.control.accept

    async def accept(call_id: str, session: dict[str, Any], *, timeout: float = 2.0) -> None:
        if call.status == "ringing":
            call.status = "ended"  # the caller hangs up as the connection fails
            raise UpstreamError("POST …/accept failed: ClientConnectorError", unsent=True)
        await real_accept(call_id, session, timeout=timeout)

    stack.service.control.accept = accept  # type: ignore[method-assign]
    with capture_logs() as logs:
        result = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert _status(result) == (200, "call_gone") and call.sideband_connects == 0
    assert not [e for e in logs if e["event"] == "call.accept_uncertain"]
    assert await stack.service.store.claim(f"accept_uncertain:{call.call_id}", 1.0)  # nothing kept


@pytest.mark.parametrize("instead", [False, True], ids=["rejected", "rejected_instead_of_accept"])
async def test_a_reject_answered_late_then_found_gone_is_rejected(stack: Stack, instead: bool) -> None:
    """The first reject rejected the call but its answer came too late; the retry finds the call no
    longer ringing. The call was rejected (most likely by that attempt), not gone."""
    call = stack.sim.create_call(Script([]))
    if instead:
        stack.sim.fail_accept(call.call_id, 422)
    else:
        stack.app.on_incoming(lambda call: Reject(486))
    stack.sim.fail_verb(call.call_id, "reject", "late")
    with capture_logs() as logs:
        result = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert _status(result) == (200, "rejected")
    assert _verbs(stack, call.call_id)[-2:] == ["reject", "reject"] and call.status == "rejected"
    counters = stack.service.counters
    assert counters["rejected"] == 1 and counters["call_gone"] == 0
    (rejected,) = [e for e in logs if e["event"] == "call.rejected"]
    assert rejected["uncertain"] is True


async def test_a_base_url_the_service_does_not_serve_is_named_not_taken_for_a_gone_call(
    simulator: Simulator,
) -> None:
    """``OPENAI_BASE_URL`` without its ``/v1``: OpenAI answers every path 404 ``Invalid URL (…)``. That is
    not the call gone (every call would end ``call_gone``, quietly): the error names the setting."""
    async with aiohttp.ClientSession() as http:
        control = CallControl(http, simulator.base_url.removesuffix("/v1"), simulator.api_key)
        call = simulator.create_call(Script([]))
        with pytest.raises(UpstreamError) as accept:
            await control.accept(call.call_id, {"type": "realtime"}, timeout=2)
        gone = simulator.create_call(Script([]))
        gone.status = "ended"
        with pytest.raises(CallGone):  # (the right base: a 404 about the call itself is still that)
            await CallControl(http, simulator.base_url, simulator.api_key).accept(
                gone.call_id, {"type": "realtime"}, timeout=2
            )
    with pytest.raises(SidebandRefused) as attach:
        await connect_sideband(
            sideband_url(simulator.base_url.removesuffix("/v1")), call.call_id, simulator.api_key
        )
    for exc in (accept.value, attach.value):
        assert not isinstance(exc, CallGone) and exc.status == 404
        assert "Invalid URL" in str(exc) and "check OPENAI_BASE_URL" in str(exc), str(exc)
    assert call.status == "ringing"


async def test_a_server_pointed_at_the_wrong_base_url_says_so_on_every_call(simulator: Simulator) -> None:
    settings = {**TEST_SETTINGS, "openai_base_url": simulator.base_url.removesuffix("/v1")}
    async with run_app(make_app(), simulator, **settings) as h:
        call = simulator.create_call(Script([]))
        with capture_logs() as logs:
            result = await h.sender.deliver(simulator.incoming_event(call), max_attempts=1)
    assert _status(result) == (200, "failed")
    events = [e for e in logs if e["event"].startswith("call.")]
    assert "call.gone" not in [e["event"] for e in events]
    (failed,) = [e for e in events if e["event"] == "call.accept_failed"]
    assert failed["status"] == 404 and "check OPENAI_BASE_URL" in failed["error"]


@pytest.mark.parametrize(
    ("account", "status", "hint"),
    [
        (
            "no_credit",
            429,
            "the OpenAI project of OPENAI_API_KEY has no credit left (check its plan and billing)",
        ),
        (
            "region_refused",
            403,
            "OpenAI does not serve the country or region this server's requests come from (check the host's "
            "network or proxy)",
        ),
    ],
)
async def test_an_account_refused_is_one_attempt_and_says_why(
    stack: Stack, account: Any, status: int, hint: str
) -> None:
    """OpenAI answers every request of a project whose credit is spent 429 ``insufficient_quota``, and of
    a place it does not serve 403 ``unsupported_country_region_territory``: no retry mends either, so the
    accept is tried once (then a reject, refused alike), the webhook is not asked again, and the error
    line says what to check."""
    call = stack.sim.create_call(Script([]))
    stack.sim.account = account
    with capture_logs() as logs:
        result = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert _status(result) == (200, "failed")
    verbs = [
        r.path.rsplit("/", 1)[-1] for r in stack.sim.requests if r.path.startswith("/v1/realtime/calls/")
    ]
    assert verbs == ["accept", "reject"]
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == ["call.accept_failed", "call.answer_failed"]
    assert errors[0]["status"] == status
    assert errors[0]["error"] == f"POST /realtime/calls/{call.call_id}/accept answered {status}: {hint}"


async def test_an_accept_refused_for_its_session_logs_what_openai_refused(simulator: Simulator) -> None:
    """OpenAI refuses an accept for what it holds (a voice it does not have): the error line carries
    OpenAI's own message, so the operator reads which voice, model or field to mend."""
    app = Sideband(instructions="You answer.", greeting=None, voice="nonexistent-voice-zzz")
    async with run_app(app, simulator, **TEST_SETTINGS) as h:
        call = simulator.create_call(Script([]))
        with capture_logs() as logs:
            await h.sender.deliver(simulator.incoming_event(call), max_attempts=1)
    (failed,) = [e for e in logs if e["event"] == "call.accept_failed"]
    assert failed["status"] == 400
    prefix = f"POST /realtime/calls/{call.call_id}/accept answered 400: "
    assert failed["error"].startswith(prefix + "Invalid value: 'nonexistent-voice-zzz'."), failed


def test_a_rate_limit_is_tried_again_a_spent_quota_is_not() -> None:
    def answer(code: str) -> str:
        return json.dumps({"error": {"message": "…", "type": code, "param": None, "code": code}})

    assert UpstreamError("limited", 429, answer("rate_limit_exceeded")).retryable
    assert UpstreamError("limited", 429, "<html>Too Many Requests</html>").retryable
    assert not UpstreamError("spent", 429, answer("insufficient_quota")).retryable


async def test_an_error_body_nested_too_deeply_is_an_upstream_error() -> None:
    """An error body (a proxy's, say) nested deeper than Python's parser goes is no OpenAI error: the
    refusal is an :class:`UpstreamError` like any other, never a ``RecursionError`` (a 500 on a webhook)."""
    deep = "[" * 5000 + "]" * 5000

    async def refuse(request: web.Request) -> web.Response:
        status = 429 if request.method == "POST" else 403
        return web.Response(status=status, text=deep, content_type="application/json")

    server = web.Application()
    server.router.add_route("*", "/v1/{tail:.*}", refuse)
    async with TestServer(server) as srv, aiohttp.ClientSession() as http:
        base = str(srv.make_url("/v1"))
        control = CallControl(http, base, "sk-test")
        with pytest.raises(UpstreamError) as accept:
            await control.accept("rtc_1", {"type": "realtime"}, timeout=2)
        with pytest.raises(SidebandRefused) as attach:
            await connect_sideband(sideband_url(base), "rtc_1", "sk-test")
    assert accept.value.status == 429 and accept.value.retryable  # (a rate limit, not a spent quota)
    assert attach.value.status == 403 and "check OPENAI_API_KEY" in str(attach.value)


@contextlib.asynccontextmanager
async def raw_upstream(
    answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A server on the loopback that runs ``answer`` on each connection; yields its port. A connection
    ``answer`` leaves open (a stall) is closed on the way out."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await answer(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


def refusal_cut_short(
    status: int, how: str, requests: list[bytes] | None = None
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """An answer with an error ``status`` whose JSON body stops after a few bytes: the connection then
    closes (``how="cut"``) or stays silent (``"stalled"``). Records each request's head in ``requests``."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if requests is not None:
            requests.append(head)
        writer.write(
            f"HTTP/1.1 {status} Refused\r\nContent-Type: application/json\r\nRetry-After: 1\r\n".encode()
            + b'Content-Length: 200\r\n\r\n{"error": {"message": "overloa'
        )
        await writer.drain()
        if how == "stalled":
            await reader.read()  # (until the client gives up and closes)
        writer.close()

    return answer


@pytest.mark.parametrize(
    ("how", "timeout"),
    [("cut", 2.0), ("stalled", 0.3), ("stalled", 5.0)],
    ids=["body_cut", "body_stalled_past_the_attempt", "body_stalled_past_its_own_wait"],
)
@pytest.mark.parametrize("status", [503, 400, 404])
async def test_an_error_status_is_kept_when_its_body_is_cut_or_stalls(
    status: int, how: str, timeout: float
) -> None:
    """The status line is the answer: an error whose body is then cut short or stalls is that error (a
    503 did nothing, a 404 is the call gone), never taken for an attempt that went unanswered and may
    have been carried out. The body is waited for a moment at most; what came of it is kept."""
    async with raw_upstream(refusal_cut_short(status, how)) as port, aiohttp.ClientSession() as http:
        control = CallControl(http, f"http://127.0.0.1:{port}/v1", "sk-test")
        with pytest.raises(UpstreamError) as refused:
            await control.refer("rtc_1", "tel:+14155550123", timeout=timeout)
    exc = refused.value
    assert exc.status == status and isinstance(exc, CallGone) is (status == 404)
    assert not exc.maybe_carried_out and exc.retryable is (status == 503)
    assert exc.body == '{"error": {"message": "overloa'
    assert exc.retry_after == (None if status == 404 else 1.0)  # (the call gone waits for nothing)


@pytest.mark.parametrize("how", ["cut", "stalled"])
async def test_a_relayed_offer_refused_keeps_its_status_when_its_body_is_cut_or_stalls(how: str) -> None:
    """``POST /realtime/calls`` refused 400 (the offer itself), its body then cut short or stalled: the
    refusal is still the offer's, the browser's to know, not an upstream that went unanswered."""
    async with raw_upstream(refusal_cut_short(400, how)) as port, aiohttp.ClientSession() as http:
        control = CallControl(http, f"http://127.0.0.1:{port}/v1", "sk-test")
        with pytest.raises(UpstreamError) as refused:
            await control.create_call("v=0", {"type": "realtime"}, timeout=0.5)
    assert refused.value.status == 400 and refused.value.offer_refused


@pytest.mark.parametrize("cause", ["503_body_cut", "tls_handshake_stalls"])
async def test_a_refer_failure_that_did_nothing_is_tried_again_though_its_answer_was_incomplete(
    stack: Stack, cause: str
) -> None:
    """A REFER answered 503 whose body is then cut short, or one whose connection never opened (the TLS
    handshake stalled): nothing reached the carrier, so the REFER is sent again, and the transfer is no
    uncertain one."""
    if cause == "503_body_cut":
        answer = refusal_cut_short(503, "cut")
        base = "http://127.0.0.1:{port}/v1"
    else:

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # the TLS client hello, never answered

        base = "https://127.0.0.1:{port}/v1"
    stack.app.on_incoming(lambda call: Refer("tel:+14155550123"))
    real_refer = stack.service.control.refer
    failed: list[UpstreamError] = []

    async with raw_upstream(answer) as port, aiohttp.ClientSession() as http:
        broken = CallControl(http, base.format(port=port), "sk-test")

        async def refer(call_id: str, target_uri: str, *, timeout: float = 5.0) -> None:
            if not failed:
                try:
                    await broken.refer(call_id, target_uri, timeout=min(timeout, 0.3))
                except UpstreamError as exc:
                    failed.append(exc)
                    raise
            await real_refer(call_id, target_uri, timeout=timeout)

        stack.service.control.refer = refer  # type: ignore[method-assign]
        call = stack.sim.create_call(Script([]))
        with capture_logs() as logs:
            result = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert len(failed) == 1 and failed[0].unsent is (cause == "tls_handshake_stalls")
    assert _status(result) == (200, "referred") and call.status == "referred"
    assert _verbs(stack, call.call_id) == ["refer"]  # (the first went to the broken upstream)
    assert not [e for e in logs if e["event"] == "call.refer_uncertain"]
    (referred,) = [e for e in logs if e["event"] == "call.referred"]
    assert referred["uncertain"] is False


async def test_an_accept_refused_503_with_its_body_cut_leaves_a_later_refusal_a_refusal(stack: Stack) -> None:
    """The first accept is answered 503 (its body cut short): it accepted nothing. The retry's 400 is
    then the accept refused, and the call is rejected, not taken for one an earlier attempt accepted."""
    real_accept = stack.service.control.accept
    first: list[UpstreamError] = []

    async with raw_upstream(refusal_cut_short(503, "cut")) as port, aiohttp.ClientSession() as http:
        broken = CallControl(http, f"http://127.0.0.1:{port}/v1", "sk-test")

        async def accept(call_id: str, session: dict[str, Any], *, timeout: float = 2.0) -> None:
            if not first:
                try:
                    await broken.accept(call_id, session, timeout=timeout)
                except UpstreamError as exc:
                    first.append(exc)
                    raise
            await real_accept(call_id, session, timeout=timeout)

        stack.service.control.accept = accept  # type: ignore[method-assign]
        call = stack.sim.create_call(Script([]))
        stack.sim.fail_accept(call.call_id, 400)
        with capture_logs() as logs:
            result = await stack.sender.deliver(stack.sim.incoming_event(call), max_attempts=1)
    assert first[0].status == 503
    assert _status(result) == (200, "rejected") and call.status == "rejected"
    assert not [e for e in logs if e["event"] == "call.accept_uncertain"] and call.sideband_connects == 0


async def test_a_request_whose_connection_never_opened_was_not_sent() -> None:
    """An attempt that times out before its request left (the TLS handshake stalls) carried nothing out;
    one that times out once the request is out may have."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads what comes (a TLS client hello, a request), answers nothing

    async with raw_upstream(silent) as port, aiohttp.ClientSession() as http:
        failures: dict[str, UpstreamError] = {}
        for scheme in ("https", "http"):
            control = CallControl(http, f"{scheme}://127.0.0.1:{port}/v1", "sk-test")
            with pytest.raises(UpstreamError) as timed_out:
                await control.refer("rtc_1", "tel:+14155550123", timeout=0.3)
            failures[scheme] = timed_out.value
    handshake, unanswered = failures["https"], failures["http"]
    assert handshake.unsent and not handshake.maybe_carried_out and handshake.retryable
    assert "before the request was sent" in str(handshake)
    assert not unanswered.unsent and unanswered.maybe_carried_out
    assert "before the request was sent" not in str(unanswered)
