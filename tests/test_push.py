"""The push connection under the call driver: messages go to a callback as they are parsed."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import itertools
import json
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import structlog
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidMessage, InvalidStatus

from sideband.context import CallContext
from sideband.runtime.driver import CallRuntime
from sideband.runtime.machine import CallMachine, MachineConfig
from sideband.tools import ToolRegistry
from sideband.upstream._ws import PushConnection, open_socket
from sideband.upstream.openai import connect_sideband

from .conftest import capture_logs

Handler = Callable[[ServerConnection], Awaitable[None]]


@pytest.fixture
async def peer() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Start a websockets server running a given handler; yields a starter returning its ws:// URL."""
    servers: list[Any] = []

    async def start(handler: Handler) -> str:
        server = await serve(handler, "127.0.0.1", 0)
        servers.append(server)
        port = next(iter(server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}/"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def connect(url: str) -> PushConnection:
    return await open_socket(url, "sk-test", compression=False, open_timeout=5, max_size=1 << 20, proxy=None)


def plain_runtime(call_id: str, connect: Callable[[], Awaitable[Any]], **kw: Any) -> CallRuntime:
    """A call runtime with a plain machine (a ``realtime`` session), no tools, and ``kw`` as given."""
    return CallRuntime(
        machine=CallMachine(MachineConfig(session={"type": "realtime"})),
        ctx=CallContext(call_id),
        tools=ToolRegistry(),
        connect=connect,
        **kw,
    )


class Sink:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.closes = 0
        self.closed = asyncio.Event()

    def message(self, data: bytes) -> None:
        self.messages.append(data)

    def close(self) -> None:
        self.closes += 1
        self.closed.set()


async def test_messages_before_start_are_held_in_order_then_the_close_is_reported(peer: Any) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send("one")
        await ws.send(["fr", "ag", "ments"])  # a fragmented text message
        await ws.send(b"\x00\x01")
        await ws.close(1000)

    ws = await connect(await peer(handler))
    await asyncio.wait_for(ws.wait_closed(), 5)  # every frame has been parsed, nothing delivered yet
    sink = Sink()
    ws.start(sink.message, sink.close)
    assert sink.messages == [b"one", b"fragments", b"\x00\x01"]
    assert sink.closes == 1  # lost before start: reported at once
    assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000


async def test_live_messages_go_to_the_callback_and_stop_detaches_it(peer: Any) -> None:
    release = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        async for message in ws:  # echo until told "bye", then one more message after a release
            if message == "bye":
                break
            await ws.send(["echo:", message])
        await release.wait()
        await ws.send("after stop")
        await ws.close(1001)

    ws = await connect(await peer(handler))
    sink = Sink()
    got_two = asyncio.Event()

    def on_message(data: bytes) -> None:
        sink.message(data)
        if len(sink.messages) == 2:
            got_two.set()

    ws.start(on_message, sink.close)
    await ws.send("a")
    await ws.send("é")
    await asyncio.wait_for(got_two.wait(), 5)
    assert sink.messages == [b"echo:a", "echo:é".encode()]
    ws.stop()
    await ws.send("bye")
    release.set()
    await asyncio.wait_for(ws.wait_closed(), 5)
    assert sink.messages == [b"echo:a", "echo:é".encode()]  # "after stop" dropped
    assert sink.closes == 0  # detached: not told
    assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1001


class Broken(CallMachine):
    """A machine with a bug: every server event raises while it is handled (``call.crashed``)."""

    def receive(self, event: dict[str, Any]) -> Any:
        raise RuntimeError("machine bug")


async def crashing_call(peer: Any, verb: Callable[[str, str | None], Awaitable[None]]) -> CallRuntime:
    """A call whose sideband sends ``session.created`` to a :class:`Broken` machine; ``verb`` hangs up."""

    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "session.created", "session": {"id": "sess_1"}}))
        await ws.wait_closed()

    url = await peer(handler)
    return CallRuntime(
        machine=Broken(MachineConfig(session={"type": "realtime"})),
        ctx=CallContext("rtc_crash"),
        tools=ToolRegistry(),
        connect=lambda: connect(url),
        verb=verb,
        reattach_attempts=0,
    )


async def test_an_error_while_handling_a_message_ends_the_call_as_internal_error(peer: Any) -> None:
    verbs: list[tuple[str, str | None]] = []

    async def verb(name: str, target: str | None) -> None:
        verbs.append((name, target))

    capture = structlog.testing.LogCapture()
    old = structlog.get_config()
    structlog.configure(  # every level, set before the runtime binds its logger
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(0),
        cache_logger_on_first_use=False,
    )
    try:
        runtime = await crashing_call(peer, verb)
        reason = await asyncio.wait_for(runtime.run(), 5)
    finally:
        structlog.configure(**old)
    assert reason == "internal_error"
    assert verbs == [("hangup", None)]  # the caller is not left on a call nobody controls any more
    events = [entry["event"] for entry in capture.entries]
    assert "call.crashed" in events and events.index("call.crashed") < events.index("call.ended")


async def test_a_crashed_call_hangs_up_with_its_own_budget(
    peer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sideband.runtime.driver.TASK_GRACE", 0.05)
    verbs: list[str] = []

    async def slow_verb(name: str, target: str | None) -> None:
        await asyncio.sleep(0.3)
        verbs.append(name)

    runtime = await crashing_call(peer, slow_verb)
    with capture_logs() as logs:
        reason = await asyncio.wait_for(runtime.run(), 5)
    assert reason == "internal_error" and verbs == ["hangup"]
    assert not [e for e in logs if e["event"] == "call.tasks_abandoned"]


async def test_a_shutdown_cutting_short_a_crashed_calls_hangup_ends_hangup_failed(peer: Any) -> None:
    """Cancelled (a shutdown past its grace) while it waits for the hangup a crash sent: the hangup is
    cancelled at once, and the end says the call may still be up."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow_verb(name: str, target: str | None) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    runtime = await crashing_call(peer, slow_verb)
    with capture_logs() as logs:
        task = asyncio.create_task(runtime.run())
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)  # (not the 5 s grace the cleanup gives what is left)
    assert runtime.summary.reason == "hangup_failed" and cancelled.is_set()
    assert not [e for e in logs if e["event"] == "call.tasks_abandoned"]


async def test_a_live_socket_keeps_nothing_of_the_handshake_headers(peer: Any) -> None:
    seen: list[str | None] = []
    handled = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        seen.append(ws.request.headers.get("Authorization"))
        handled.set()
        await ws.wait_closed()

    ws = await connect(await peer(handler))
    try:
        await asyncio.wait_for(handled.wait(), 5)
        assert seen == ["Bearer sk-test"]  # the credential went out...
        assert ws.request is None  # ...and no copy of it stays with the connection
        assert ws.response is not None and ws.response.status_code == 101
        assert list(ws.response.headers.raw_items()) == []
    finally:
        await ws.close()


async def test_an_idle_socket_keeps_nothing_of_the_last_message(peer: Any) -> None:
    """websockets' parser holds its last frame until the next one: the push connection leaves it empty,
    so an idle call does not keep its last (often largest) event."""
    big = json.dumps({"type": "session.updated", "session": {"instructions": "x" * 400_000}})

    async def handler(ws: ServerConnection) -> None:
        await ws.send(big)
        await ws.wait_closed()

    ws = await connect(await peer(handler))
    got = asyncio.Event()
    received: list[int] = []

    def on_message(data: bytes) -> None:
        received.append(len(data))  # the message itself is not kept
        got.set()

    tracemalloc.start()
    try:
        ws.start(on_message, lambda: None)
        await asyncio.wait_for(got.wait(), 5)
        gc.collect()
        held = sum(
            stat.size
            for stat in tracemalloc.take_snapshot().statistics("filename")
            if "websockets" in stat.traceback[0].filename or "_ws.py" in stat.traceback[0].filename
        )
    finally:
        tracemalloc.stop()
        await ws.close()
    assert received == [len(big)]
    assert held < 64_000, f"{held} bytes still held by the connection after a {len(big)}-byte message"


async def test_send_now_writes_text_frames_in_order_or_nothing(peer: Any) -> None:
    got: list[str | bytes] = []
    three = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            got.append(message)
            if len(got) == 3:
                three.set()

    ws = await connect(await peer(handler))
    try:
        assert ws.send_now([b'{"n":1}', '{"n":"\u00e9"}'.encode()])
        ws.paused = True  # the write buffer is full: nothing is written, the caller waits in send()
        assert not ws.send_now([b'{"n":"held"}'])
        ws.paused = False
        assert ws.send_now([b'{"n":3}'])
        await asyncio.wait_for(three.wait(), 5)
        assert got == ['{"n":1}', '{"n":"\u00e9"}', '{"n":3}']  # str: they arrived as text frames
    finally:
        await ws.close()
    assert not ws.send_now([b'{"n":4}'])  # closed: nothing written, nothing raised


async def test_frames_wait_while_an_aborted_socket_closes(peer: Any) -> None:
    """The keepalive aborts a dead socket; frames flushed before it is seen closed stay queued for the
    re-attached socket instead of being written into the closing one."""

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    ws = await connect(await peer(handler))

    async def connect_again() -> PushConnection:
        raise AssertionError("not re-attached in this test")

    rt = plain_runtime("rtc_abort", connect_again, ping_interval=None)
    rt._ws = ws
    rt._outbox = [b'{"type":"response.create"}']
    assert ws.transport is not None
    ws.transport.abort()
    await rt._flush()
    assert rt._outbox == [b'{"type":"response.create"}']


async def test_a_full_write_buffer_holds_send_until_it_drains(peer: Any) -> None:
    """Flow control still works on a push connection (its waiters are kept in a list)."""
    got: list[str | bytes] = []
    arrived = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            got.append(message)
            arrived.set()

    ws = await connect(await peer(handler))
    try:
        ws.pause_writing()  # what the transport calls when its buffer is over the high-water mark
        sending = asyncio.ensure_future(ws.send(b'{"n":1}', text=True))

        async def waiting() -> None:  # the send wrote its frame and now waits for the buffer
            while not ws.drain_waiters:
                await asyncio.sleep(0)

        await asyncio.wait_for(waiting(), 5)
        assert not sending.done()
        ws.resume_writing()
        await asyncio.wait_for(sending, 5)
        assert list(ws.drain_waiters) == []
        await asyncio.wait_for(arrived.wait(), 5)
        assert got == ['{"n":1}']
    finally:
        await ws.close()


# --------------------------------------------------------------------------- opening handshake
async def raw_server(
    answer: Callable[[bytes], bytes | None],
) -> tuple[asyncio.AbstractServer, str, list[bytes]]:
    """A TCP server that reads one HTTP request and writes ``answer(request)`` (None: closes at once)."""
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        requests.append(request)
        reply = answer(request)
        if reply is not None:
            writer.write(reply)
            await writer.drain()
            if reply:
                await reader.read()  # hold the connection until the client closes it
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"ws://127.0.0.1:{port}/v1/realtime?call_id=rtc_1", requests


async def test_the_request_carries_the_credential_the_agent_and_the_websocket_headers(peer: Any) -> None:
    seen: list[dict[str, str]] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        seen.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
        await ws.send("hello")
        await ws.wait_closed()

    url = await peer(handler)
    ws = await connect(url + "v1/realtime?call_id=rtc_1")
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    ws.start(lambda data: got.done() or got.set_result(data), lambda: None)
    try:
        assert await asyncio.wait_for(got, 5) == b"hello"
    finally:
        await ws.close()
    (headers,) = seen
    assert headers["authorization"] == "Bearer sk-test"
    assert headers["user-agent"] == "sideband"
    assert headers["upgrade"] == "websocket" and headers["sec-websocket-version"] == "13"
    assert "sec-websocket-extensions" not in headers  # compression is off
    assert "openai-beta" not in headers


async def test_compression_is_negotiated_when_asked(peer: Any) -> None:
    offered: list[str | None] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        offered.append(ws.request.headers.get("Sec-WebSocket-Extensions"))
        await ws.send("x" * 10_000)
        await ws.wait_closed()

    url = await peer(handler)
    ws = await open_socket(url, "sk-test", compression=True, open_timeout=5, max_size=1 << 20, proxy=None)
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    ws.start(lambda data: got.done() or got.set_result(data), lambda: None)
    try:
        assert await asyncio.wait_for(got, 5) == b"x" * 10_000
        assert [e.name for e in ws.protocol.extensions] == ["permessage-deflate"]
    finally:
        await ws.close()
    assert offered and offered[0] is not None and "permessage-deflate" in offered[0]


async def test_a_refusal_raises_invalid_status_with_its_body() -> None:
    body = b'{"error":{"message":"call not found"}}'
    server, url, _ = await raw_server(
        lambda _: (
            b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
    )
    try:
        with pytest.raises(InvalidStatus) as caught:
            await connect(url)
    finally:
        server.close()
    assert caught.value.response.status_code == 404
    assert caught.value.response.body == body


async def test_a_redirect_is_followed(peer: Any) -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send("here")
        await ws.wait_closed()

    target = await peer(handler)
    server, url, requests = await raw_server(
        lambda _: (
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: "
            + target.encode()
            + b"\r\nContent-Length: 0\r\n\r\n"
        )
    )
    try:
        ws = await connect(url)
    finally:
        server.close()
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    ws.start(lambda data: got.done() or got.set_result(data), lambda: None)
    try:
        assert await asyncio.wait_for(got, 5) == b"here"
    finally:
        await ws.close()
    assert len(requests) >= 1


async def test_a_connection_closed_during_the_handshake_fails_at_once() -> None:
    server, url, requests = await raw_server(lambda _: None)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(InvalidMessage):
            await open_socket(url, "sk-test", compression=False, open_timeout=30, max_size=1024, proxy=None)
        assert asyncio.get_running_loop().time() - started < 5  # not the 30 s open timeout
    finally:
        server.close()
    assert len(requests) == 1


async def test_a_server_that_never_answers_times_out_and_the_socket_is_closed() -> None:
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # returns once the client has closed its end
        closed.set()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TimeoutError, match="opening handshake"):
            await open_socket(
                f"ws://127.0.0.1:{port}/",
                "sk-test",
                compression=False,
                open_timeout=0.3,
                max_size=1024,
                proxy=None,
            )
        await asyncio.wait_for(closed.wait(), 5)
    finally:
        server.close()


async def test_a_sideband_takes_a_message_of_several_mebibytes(peer: Any) -> None:
    """The server echoes whole conversation items (an image, a long document): 5 MiB is no reason to
    lose the socket, and a tool call behind it."""
    big = json.dumps({"type": "conversation.item.done", "item": {"data": "a" * (5 << 20)}})

    async def handler(ws: ServerConnection) -> None:
        await ws.send(big)
        await ws.send('{"type":"after"}')
        await ws.wait_closed()

    url = await peer(handler)
    ws = await connect_sideband(url.rstrip("/"), "rtc_1", "sk-test")
    got: list[bytes] = []
    both = asyncio.Event()

    def message(data: bytes) -> None:
        got.append(data)
        if len(got) == 2:
            both.set()

    ws.start(message, lambda: None)
    try:
        await asyncio.wait_for(both.wait(), 10)
    finally:
        await ws.close()
    assert len(got[0]) == len(big) and got[1] == b'{"type":"after"}'


async def test_sockets_dropped_at_once_again_and_again_end_the_call_not_a_loop(peer: Any) -> None:
    """A server that takes each handshake and drops the socket at once (1011): the first loss re-attaches
    at once, the next ones wait longer each time, and once SIDEBAND_REATTACH_ATTEMPTS re-attached sockets
    in a row were lost so soon, the call is hung up (``reattach_failed``), instead of re-attaching
    hundreds of times a second."""
    handshakes: list[float] = []
    loop = asyncio.get_running_loop()

    async def handler(ws: ServerConnection) -> None:
        handshakes.append(loop.time())
        await ws.recv()  # our session.update
        await ws.close(1011, "server error")

    url = await peer(handler)
    verbs: list[tuple[str, str | None]] = []

    async def verb(name: str, target: str | None) -> None:
        verbs.append((name, target))

    runtime = plain_runtime("rtc_storm", lambda: connect(url), verb=verb, reattach_attempts=4)
    reason = await asyncio.wait_for(runtime.run(), 20)
    assert reason == "reattach_failed"
    assert verbs == [("hangup", None)]
    assert len(handshakes) == 5  # the first socket and four re-attaches, not a storm
    gaps = [b - a for a, b in itertools.pairwise(handshakes)]
    assert gaps[1] >= 0.15 and gaps[2] >= 0.35 and gaps[3] >= 0.75  # waits of 0.2, 0.4, 0.8 s first


def _upgrade(request: bytes) -> bytes:
    """The ``101 Switching Protocols`` answer to a WebSocket handshake ``request``."""
    key = next(
        line.split(b":", 1)[1].strip()
        for line in request.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    )
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


async def test_a_close_frame_ends_the_call_though_the_server_keeps_the_connection_open() -> None:
    """The server sends its close frame (1000) and never closes the TCP connection (OpenAI's close is
    not always followed by one): the call ends once the close timeout (2 s) is up, not at the next
    keepalive ping (here: never)."""
    got_eof = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_upgrade(await reader.readuntil(b"\r\n\r\n")))
        await reader.read(1)  # our session.update has started to arrive
        writer.write(b"\x88\x02\x03\xe8")  # close 1000; the TCP connection stays open
        while await reader.read(65536):  # (our close frame answers it)
            pass
        got_eof.set()  # our side ended the connection
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    runtime = plain_runtime(
        "rtc_nofin",
        lambda: connect_sideband(f"ws://127.0.0.1:{port}", "rtc_nofin", "sk-test"),
        reattach_attempts=1,
        ping_interval=None,
    )
    try:
        assert await asyncio.wait_for(runtime.run(), 10) == "remote_closed"
        await asyncio.wait_for(got_eof.wait(), 5)
    finally:
        server.close()


async def test_a_frame_too_big_ends_the_connection_though_the_server_keeps_it_open() -> None:
    """The server starts a frame larger than the sideband takes (a TiB) and never closes the TCP
    connection: our close (1009) goes out, and the connection is lost once the close timeout (2 s) is
    up, not at the next keepalive ping (here: never)."""
    got_eof = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(_upgrade(await reader.readuntil(b"\r\n\r\n")))
        writer.write(b"\x81\x7f" + (2**40).to_bytes(8, "big"))  # the TCP connection stays open
        while await reader.read(65536):  # (our close frame)
            pass
        got_eof.set()  # our side ended the connection
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    closed = asyncio.Event()
    ws = await connect_sideband(f"ws://127.0.0.1:{port}", "rtc_toobig", "sk-test")
    try:
        ws.start(lambda data: None, closed.set)
        await asyncio.wait_for(closed.wait(), 5)
        await asyncio.wait_for(got_eof.wait(), 5)
        assert ws.protocol.close_sent is not None and ws.protocol.close_sent.code == 1009
    finally:
        ws.transport.abort()
        server.close()


async def test_an_attach_refused_with_retry_after_waits_as_asked(peer: Any) -> None:
    """429 with ``Retry-After: 1``: the next attempt comes a second later, not after the usual 0.2 s
    (which would spend the attempts and hang up a call the server was about to take)."""
    loop = asyncio.get_running_loop()
    attempts: list[float] = []

    def process_request(connection: Any, request: Any) -> Any:
        attempts.append(loop.time())
        if len(attempts) == 1:
            response = connection.respond(429, "slow down\n")
            response.headers["Retry-After"] = "1"
            return response
        return None

    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    server = await serve(handler, "127.0.0.1", 0, process_request=process_request)
    port = next(iter(server.sockets)).getsockname()[1]
    runtime = plain_runtime(
        "rtc_later",
        lambda: connect_sideband(f"ws://127.0.0.1:{port}", "rtc_later", "sk-test"),
        reattach_attempts=3,
    )
    task = asyncio.create_task(runtime.run())
    try:
        await asyncio.wait_for(runtime.attached.wait(), 10)
    finally:
        runtime.abandon("test over")
        await asyncio.wait_for(task, 10)
        server.close()
        await server.wait_closed()
    assert len(attempts) == 2 and attempts[1] - attempts[0] >= 0.9
