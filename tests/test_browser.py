"""A real browser starts WebRTC calls through the server's doors, the way the README's snippets do.

Debian's Chromium (``apt-get install chromium``; ``.ci/run`` installs it) driven by Playwright, with a fake
microphone: the offer is the browser's own SDP, and the answer must be one the browser takes. No media
flows (the simulator's candidates lead nowhere); what is tested is every HTTP step and the sideband behind it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from sideband import Sideband
from sideband.edge import create_app
from sideband.testing import Simulator
from sideband.testing.harness import harness_settings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>sideband browser test</title>
<script>
async function offer() {
  const pc = new RTCPeerConnection();
  const mic = await navigator.mediaDevices.getUserMedia({audio: true});
  pc.addTrack(mic.getTracks()[0], mic);
  pc.createDataChannel("oai-events");
  await pc.setLocalDescription(await pc.createOffer());
  return pc;
}

// The server relays the offer and attaches the sideband itself.
async function relay() {
  const pc = await offer();
  const sdp = pc.localDescription.sdp;  // as posted (ICE gathering goes on changing it)
  const r = await fetch("/rtc/calls", {method: "POST", body: sdp,
                                       headers: {"Content-Type": "application/sdp"}});
  const answer = await r.text();
  await pc.setRemoteDescription({type: "answer", sdp: answer});
  const out = {status: r.status, location: r.headers.get("Location"), state: pc.signalingState,
               offer: sdp};
  pc.close();
  return out;
}

// The browser starts the call with an ephemeral key, then hands its id over with the ticket.
async function browserFirst() {
  const s = await (await fetch("/rtc/sessions", {method: "POST", body: "{}",
                                                 headers: {"Content-Type": "application/json"}})).json();
  const pc = await offer();
  const r = await fetch(s.calls_url, {method: "POST", body: pc.localDescription.sdp,
    headers: {"Authorization": `Bearer ${s.client_secret}`, "Content-Type": "application/sdp"}});
  await pc.setRemoteDescription({type: "answer", sdp: await r.text()});
  const callId = r.headers.get("Location").split("/").pop();
  const h = await fetch("/rtc/handoff", {method: "POST", headers: {"Content-Type": "application/json"},
                                         body: JSON.stringify({call_id: callId, ticket: s.ticket})});
  const out = {status: r.status, callId: callId, handoff: h.status, handoffBody: await h.json(),
               state: pc.signalingState, key: s.client_secret};
  pc.close();
  return out;
}
</script>
"""


def chromium() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: CI installs Debian's chromium (.ci/run)")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)")


@pytest_asyncio.fixture
async def served(simulator: Simulator) -> AsyncIterator[str]:
    """The server on a loopback port with its browser doors open, and the test page at ``/``."""
    app = Sideband(instructions="You answer calls for a bakery.")

    @app.authorize_browser
    async def anyone(request: web.Request) -> bool:
        return True

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    web_app = create_app(harness_settings(simulator, max_idle_duration=30.0), app)
    web_app.router.add_get("/", page)
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def in_browser(url: str, function: str) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium(),
            args=["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"],
        )
        try:
            page = await browser.new_page()
            await page.goto(url + "/")
            result: dict[str, Any] = await page.evaluate(f"{function}()")
            return result
        finally:
            await browser.close()


async def attached(simulator: Simulator, call_id: str) -> None:
    """Wait until the server's sideband is on the call and has configured it."""
    call = simulator.calls[call_id]

    def ready() -> bool:
        return call.sideband_connects >= 1 and any(e["type"] == "session.update" for e in call.received)

    await call.wait_for(lambda c: ready(), timeout=10)


@pytest.mark.timeout(120)
async def test_a_browser_call_relayed_by_the_server(simulator: Simulator, served: str) -> None:
    chromium()
    out = await in_browser(served, "relay")
    assert out["status"] == 201
    assert out["state"] == "stable"  # the browser took the answer
    call_id = out["location"].rsplit("/", 1)[-1]
    call = simulator.calls[call_id]
    assert call.sdp_offer == out["offer"]  # the browser's own offer reached OpenAI unchanged
    assert "m=audio" in out["offer"] and "m=application" in out["offer"]
    await attached(simulator, call_id)
    update = next(e for e in call.received if e["type"] == "session.update")
    assert update["session"]["instructions"] == "You answer calls for a bakery."
    await simulator.hang_up(call)


@pytest.mark.timeout(120)
async def test_a_browser_started_call_handed_over_with_its_ticket(simulator: Simulator, served: str) -> None:
    chromium()
    out = await in_browser(served, "browserFirst")
    assert out["status"] == 201 and out["state"] == "stable"
    assert out["handoff"] == 200 and out["handoffBody"] == {"status": "attached", "call_id": out["callId"]}
    call = simulator.calls[out["callId"]]
    assert call.ephemeral_key == out["key"]  # the browser's own key started it
    await attached(simulator, out["callId"])
    await asyncio.wait_for(simulator.hang_up(call), 10)
