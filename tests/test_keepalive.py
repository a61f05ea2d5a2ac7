"""Keepalive: a sideband that stops answering pings is treated as lost (the "no close at all" case)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from sideband.context import CallContext
from sideband.runtime.driver import CallRuntime
from sideband.runtime.machine import CallMachine, MachineConfig
from sideband.tools import ToolRegistry
from sideband.upstream.openai import connect_sideband


async def test_silent_peer_is_detected_and_the_call_reattaches() -> None:
    attaches: list[int] = []
    pings_seen = asyncio.Event()

    async def sideband(request: web.Request) -> web.StreamResponse:
        attaches.append(1)
        if len(attaches) > 1:  # the call is gone by the time we re-attach
            return web.json_response({"error": {"code": "call_id_not_found"}}, status=404)
        ws = web.WebSocketResponse(autoping=False)  # never answers pings, never closes
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.PING:
                pings_seen.set()
        return ws

    app = web.Application()
    app.router.add_get("/v1/realtime", sideband)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        url = str(server.make_url("/v1/realtime")).replace("http://", "ws://")

        async def connect() -> Any:
            return await connect_sideband(url, "rtc_test", "sk-test")

        runtime = CallRuntime(
            machine=CallMachine(MachineConfig(session={"type": "realtime"})),
            ctx=CallContext("rtc_test"),
            tools=ToolRegistry(),
            connect=connect,
            reattach_attempts=1,
            ping_interval=0.05,
        )
        reason = await asyncio.wait_for(runtime.run(), 10)
    finally:
        await server.close()
    assert pings_seen.is_set()
    assert len(attaches) == 2 and reason == "call_not_found"
