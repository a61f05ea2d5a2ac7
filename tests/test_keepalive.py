"""Keepalive: a sideband that stops answering pings is treated as lost (the "no close at all" case)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from sideband.context import CallContext
from sideband.runtime.driver import CallRuntime
from sideband.runtime.machine import CallMachine, MachineConfig
from sideband.tools import ToolRegistry
from sideband.upstream.openai import connect_sideband

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def sideband_server(handler: Handler) -> AsyncIterator[str]:
    """A stand-in sideband endpoint on a loopback port; yields its ``ws://`` URL."""
    app = web.Application()
    app.router.add_get("/v1/realtime", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/v1/realtime")).replace("http://", "ws://")
    finally:
        await server.close()


def runtime_for(
    connect: Callable[[], Awaitable[Any]],
    *,
    attempts: int,
    ping_interval: float,
    session: dict[str, Any] | None = None,
) -> CallRuntime:
    return CallRuntime(
        machine=CallMachine(MachineConfig(session=session or {"type": "realtime"})),
        ctx=CallContext("rtc_test"),
        tools=ToolRegistry(),
        connect=connect,
        reattach_attempts=attempts,
        ping_interval=ping_interval,
    )


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

    async with sideband_server(sideband) as url:

        async def connect() -> Any:
            return await connect_sideband(url, "rtc_test", "sk-test")

        reason = await asyncio.wait_for(runtime_for(connect, attempts=1, ping_interval=0.05).run(), 10)
    assert pings_seen.is_set()
    assert len(attaches) == 2 and reason == "call_not_found"


async def test_a_dead_peer_is_detected_while_the_write_buffer_is_full() -> None:
    """The ping cannot even be written (websockets waits for the full buffer to drain): the next
    interval must still count it as unanswered, not wait for the write forever."""
    import socket

    attaches: list[int] = []
    done = asyncio.Event()

    async def sideband(request: web.Request) -> web.StreamResponse:
        attaches.append(1)
        if len(attaches) > 1:
            return web.json_response({"error": {"code": "call_id_not_found"}}, status=404)
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request.transport.pause_reading()  # a dead path: nothing is read, nothing answered
        await done.wait()
        request.transport.abort()
        return ws

    async with sideband_server(sideband) as url:

        async def connect() -> Any:
            ws = await connect_sideband(url, "rtc_test", "sk-test")
            ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            return ws

        # a session.update far larger than both socket buffers: the connection's writes pause
        session = {"type": "realtime", "instructions": "x" * 2_000_000}
        runtime = runtime_for(connect, attempts=1, ping_interval=0.1, session=session)
        try:
            reason = await asyncio.wait_for(runtime.run(), 10)
        finally:
            done.set()
    assert len(attaches) == 2 and reason == "call_not_found"


async def test_a_slow_reattach_is_no_keepalive_timeout() -> None:
    from .conftest import capture_logs

    attaches: list[int] = []

    async def sideband(request: web.Request) -> web.StreamResponse:
        attaches.append(1)
        ws = web.WebSocketResponse()  # answers pings
        await ws.prepare(request)
        if len(attaches) == 1:
            assert request.transport is not None
            request.transport.abort()  # an abnormal drop: the runtime re-attaches
            return ws
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.5):  # five ping intervals, each a pong late by 0.3 s at most
                async for _ in ws:
                    pass
        await ws.close()  # then a clean close ends the call
        return ws

    opened = 0
    async with sideband_server(sideband) as url:

        async def connect() -> Any:
            nonlocal opened
            opened += 1
            if opened > 1:
                await asyncio.sleep(1.0)  # several ping intervals while the lost socket is still ours
            return await connect_sideband(url, "rtc_test", "sk-test")

        with capture_logs() as logs:  # before the runtime binds its logger
            runtime = runtime_for(connect, attempts=2, ping_interval=0.3)
            reason = await asyncio.wait_for(runtime.run(), 10)
    events = [e["event"] for e in logs if str(e["event"]).startswith("sideband.")]
    assert len(attaches) == 2 and reason == "remote_closed"
    assert "sideband.reattached" in events
    assert "sideband.keepalive_timeout" not in events
