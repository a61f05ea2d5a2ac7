"""SIDEBAND_MAX_CALLS: an instance that has taken its calls rejects more as busy, at once."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sideband import Accept, IncomingCall
from sideband.settings import SettingsError, load_settings
from sideband.testing import Script, pause

from .conftest import Stack, capture_logs

OFFER = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"


async def samples(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, http.get(stack.url("/metrics")) as resp:
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def readiness(stack: Stack) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http, http.get(stack.url("/readyz")) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize("settings_overrides", [{"max_calls": 1}])
async def test_a_call_over_the_cap_is_rejected_busy_without_asking_the_routing_hook(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    asked: list[str] = []

    def route(call: IncomingCall) -> Accept:
        asked.append(call.call_id)
        return Accept()

    stack.app.on_incoming(route)
    assert await readiness(stack) == (200, {"status": "ready", "calls": 0, "full": False})
    live = await stack.call(Script([pause(60)]))
    await live.wait_connected(timeout=5)
    # Full, and still ready: out of the balancer, calls would ring out when every instance is full.
    assert await readiness(stack) == (200, {"status": "ready", "calls": 1, "full": True})
    with capture_logs() as logs:
        busy = await stack.call(Script([]))
    assert busy.status == "rejected" and busy.reject_body == {"status_code": 486}
    assert asked == [live.call_id]  # the caller hears busy at once: no routing hook for that call
    (line,) = [e for e in logs if e["event"] == "call.busy"]
    assert line["log_level"] == "warning" and (line["live"], line["max_calls"]) == (1, 1)
    counted = await samples(stack)
    assert counted["sideband_events_total", (("outcome", "busy"),)] == 1
    assert counted["sideband_events_total", (("outcome", "rejected"),)] == 1

    # Once the live call has ended there is room again.
    await stack.sim.hang_up(live)
    await stack.ended(live, check_script=False)
    after = await stack.call(Script([pause(60)]))
    await after.wait_connected(timeout=5)
    assert after.status == "accepted" and asked == [live.call_id, after.call_id]
    await stack.sim.hang_up(after)
    await stack.ended(after, check_script=False)


@pytest.mark.parametrize("settings_overrides", [{"max_calls": 1, "busy_status": 503}])
async def test_calls_being_answered_count_toward_the_cap(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    """Two calls ring together with room for one: the second is busy while the first is still being
    decided (it may yet be accepted), not both taken."""
    entered = asyncio.Event()
    release = asyncio.Event()

    async def route(call: IncomingCall) -> Accept:
        entered.set()
        await release.wait()
        return Accept()

    stack.app.on_incoming(route)
    first = stack.sim.create_call(Script([pause(60)]))
    delivery = asyncio.ensure_future(stack.sender.deliver(stack.sim.incoming_event(first)))
    try:
        await asyncio.wait_for(entered.wait(), 5)
        second = await stack.call(Script([]))
        assert second.status == "rejected" and second.reject_body == {"status_code": 503}
    finally:
        release.set()
        result = await asyncio.wait_for(delivery, 5)
    assert result.status == 200 and first.status == "accepted"
    await first.wait_connected(timeout=5)
    await stack.sim.hang_up(first)
    await stack.ended(first, check_script=False)


@pytest.mark.parametrize("settings_overrides", [{"max_calls": 1}])
async def test_a_browser_cannot_start_a_call_over_the_cap(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    live = await stack.call(Script([pause(60)]))
    await live.wait_connected(timeout=5)
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as http:
            async with http.post(stack.url("/rtc/sessions"), json={}) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "5"
                assert await resp.json() == {"error": "busy"}
            async with http.post(
                stack.url("/rtc/calls"), data=OFFER, headers={"content-type": "application/sdp"}
            ) as resp:
                assert resp.status == 503 and await resp.json() == {"error": "busy"}
    assert [e["event"] for e in logs if e["event"] == "rtc.busy"] == ["rtc.busy"] * 2
    # No key was minted and no call created at OpenAI for them.
    upstream = ("/v1/realtime/calls", "/v1/realtime/client_secrets")
    assert not [r for r in stack.sim.requests if r.path in upstream]
    refused = await samples(stack)
    assert refused["sideband_requests_refused_total", (("event", "rtc.busy"), ("status", "503"))] == 2
    await stack.sim.hang_up(live)
    await stack.ended(live, check_script=False)
    async with aiohttp.ClientSession() as http, http.post(stack.url("/rtc/sessions"), json={}) as resp:
        assert resp.status == 200  # room again


def test_the_cap_settings_are_checked() -> None:
    env = {"OPENAI_API_KEY": "sk-x", "OPENAI_WEBHOOK_SECRET": "whsec_" + "A" * 32}
    settings = load_settings({}, environ=env)
    assert (settings.max_calls, settings.busy_status) == (0, 486)  # no cap unless asked for
    settings = load_settings({}, environ={**env, "SIDEBAND_MAX_CALLS": "200", "SIDEBAND_BUSY_STATUS": "503"})
    assert (settings.max_calls, settings.busy_status) == (200, 503)
    for name, value in (("SIDEBAND_MAX_CALLS", "-1"), ("SIDEBAND_BUSY_STATUS", "200")):
        with pytest.raises(SettingsError, match=name):
            load_settings({}, environ={**env, name: value})


@pytest.mark.parametrize("settings_overrides", [{"max_calls": 1}])
async def test_an_offer_being_relayed_counts_toward_the_cap_from_its_start(
    stack: Stack, settings_overrides: dict[str, Any]
) -> None:
    """A second browser's offer, checked while the first is on its way to OpenAI, finds no room."""
    relay = asyncio.create_task(stack.service.rtc_relay(OFFER))
    await asyncio.sleep(0)  # (one step of it: the offer is on its way)
    assert not relay.done() and stack.service.full()
    call_id, _ = await asyncio.wait_for(relay, 5)
    assert stack.service.full() and call_id in stack.service.registry
