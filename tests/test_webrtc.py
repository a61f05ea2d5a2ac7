"""WebRTC doors: SDP relay (unified interface) and browser-first handoff with signed tickets."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from sideband.testing import Script, caller_hangs_up, caller_says, model_calls, model_says
from sideband.tickets import TicketSigner

from .conftest import Stack

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
    status, _ = await post_json(stack, "/rtc/handoff", {"call_id": other.call_id, "ticket": forged})
    assert status == 403

    # Expired: the server's own key, issued in the past.
    old, _ = TicketSigner(stack.settings.ticket_key(), 60, clock=lambda: time.time() - 3600).issue()
    status, body = await post_json(stack, "/rtc/handoff", {"call_id": other.call_id, "ticket": old})
    assert status == 403 and "expired" in body["error"]

    # No ticket, garbage call id, garbage body.
    status, _ = await post_json(stack, "/rtc/handoff", {"call_id": other.call_id})
    assert status == 403
    _, fresh = await post_json(stack, "/rtc/sessions", {})
    status, _ = await post_json(stack, "/rtc/handoff", {"call_id": "../etc", "ticket": fresh["ticket"]})
    assert status == 400
    async with aiohttp.ClientSession() as http, http.post(stack.url("/rtc/handoff"), data=b"\xff") as resp:
        assert resp.status == 400
    assert other.sideband_connects == 0


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
    assert sorted(s for s, _ in results) == [200, 403, 403, 403, 403]
    assert call.sideband_connects == 1
