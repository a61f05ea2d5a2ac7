"""Harness floor of a tool round: a WebSocket client with no library, to show what the harness itself costs.

The same contract as ``floor_tools.py`` (one JSON line on stdin, ``{"ready": …}`` once every sideband has
its ``session.updated``, a last line of counts when stdin closes), but the client is an
``asyncio.Protocol`` of its own: an HTTP/1.1 upgrade, then frames cut straight out of the read buffer.
Like the sideband's driver, it reads the leading ``type`` of each message with one regex and decodes only
the three events it acts on: ``session.updated``, ``response.function_call_arguments.done`` (answered at
once with its ``function_call_output``) and ``response.done`` (then one ``response.create``). It answers
pings, echoes a close, and writes masked frames, as RFC 6455 requires of a client.

What it spends per round is the least any Python client can spend on the simulator's ~25 messages per
round here: the event loop's wake-ups and the socket calls, with almost no Python in between. No
compression, no fragmented messages (the simulator sends neither).

    python benchmarks/floor_tools_raw.py --url ws://127.0.0.1:9000/v1/realtime --key sk-test
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import re
import sys
from typing import Any, cast
from urllib.parse import urlsplit

import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import raise_nofile, rss_bytes

_TYPE = re.compile(rb'\s*\{\s*"type"\s*:\s*"([^"\\]+)"')
_ACTED_ON = frozenset({b"session.updated", b"response.function_call_arguments.done", b"response.done"})
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Counts:
    def __init__(self) -> None:
        self.outputs = 0
        self.creates = 0
        self.events = 0


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, final frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big") if n else b""
    return head + mask + masked


class RawSideband(asyncio.Protocol):
    """One sideband: the upgrade, then unmasked server frames cut out of one buffer."""

    def __init__(self, request: bytes, key: bytes, update: bytes, counts: Counts) -> None:
        loop = asyncio.get_running_loop()
        self.request, self.update, self.counts = request, update, counts
        self.accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.pending: set[str] = set()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's transports are not subclasses)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before session.updated"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send_text(self, text: bytes) -> None:
        assert self.transport is not None
        self.transport.write(client_frame(0x1, text))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            if not head.startswith(b"HTTP/1.1 101") or self.accept not in head:
                raise ConnectionError(f"upgrade refused: {head[:80]!r}")
            self.upgraded = True
            self.send_text(self.update)
        while len(buffer) >= 2:
            length, start = buffer[1] & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length, start = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length, start = int.from_bytes(buffer[2:10], "big"), 10
            end = start + length
            if len(buffer) < end:
                return
            first = buffer[0]
            payload = bytes(buffer[start:end])
            del buffer[:end]
            opcode = first & 0x0F
            if not first & 0x80 or opcode == 0x0:
                raise ConnectionError("fragmented message (not sent by the simulator)")
            if opcode == 0x1:
                self.message(payload)
            elif opcode == 0x9:
                assert self.transport is not None
                self.transport.write(client_frame(0xA, payload))
            elif opcode == 0x8:
                assert self.transport is not None
                self.transport.write(client_frame(0x8, payload[:2]))
                self.transport.close()
                return

    def message(self, message: bytes) -> None:
        counts = self.counts
        counts.events += 1
        match = _TYPE.match(message)
        if match is None or match.group(1) not in _ACTED_ON:
            return
        event: dict[str, Any] = json.loads(message)
        kind = event["type"]
        if kind == "response.function_call_arguments.done":
            output = json.dumps({"n": json.loads(event["arguments"]).get("n")})
            item = {"type": "function_call_output", "call_id": event["call_id"], "output": output}
            self.send_text(json.dumps({"type": "conversation.item.create", "item": item}).encode())
            counts.outputs += 1
            self.pending.add(event["response_id"])
        elif kind == "response.done":
            response_id = event["response"]["id"]
            if response_id in self.pending:
                self.pending.discard(response_id)
                self.send_text(b'{"type":"response.create"}')
                counts.creates += 1
        elif not self.ready.done():
            self.ready.set_result(None)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(0x8, (1000).to_bytes(2, "big")))
            self.transport.close()


async def attach(url: str, api_key: str, call_id: str, update: bytes, counts: Counts) -> RawSideband:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    key = base64.b64encode(os.urandom(16))
    request = (
        f"GET {parts.path}?call_id={call_id} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {api_key}\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    _, sideband = await loop.create_connection(
        lambda: RawSideband(request, key, update, counts), parts.hostname, parts.port
    )
    await asyncio.wait_for(sideband.ready, 30)
    return sideband


async def main_async(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())
    update = json.dumps({"type": "session.update", "session": spec["session"]}, separators=(",", ":"))
    rss_before = rss_bytes(os.getpid())
    counts = Counts()
    gate = asyncio.Semaphore(64)

    async def one(call_id: str) -> RawSideband:
        async with gate:
            return await attach(args.url, args.key, call_id, update.encode(), counts)

    sidebands = await asyncio.gather(*(one(c) for c in spec["call_ids"]))
    await asyncio.sleep(0.5)
    sys.stdout.write(
        json.dumps({"ready": len(sidebands), "rss_before": rss_before, "rss_ready": rss_bytes(os.getpid())})
        + "\n"
    )
    sys.stdout.flush()
    await reader.read()  # until the runner closes stdin
    for sideband in sidebands:
        sideband.close()
    await asyncio.wait([s.closed for s in sidebands], timeout=10)
    sys.stdout.write(
        json.dumps({"outputs": counts.outputs, "creates": counts.creates, "events": counts.events}) + "\n"
    )
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description="library-free WebSocket tool-round floor")
    parser.add_argument("--url", required=True, help="sideband base, ws://127.0.0.1:PORT/v1/realtime")
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    raise_nofile()
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
