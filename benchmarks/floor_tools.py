"""Raw floor of a tool round: a bare ``websockets`` client that holds N sidebands and answers instantly.

It reads one JSON line on stdin, ``{"call_ids": [...], "session": {...}}``, connects one sideband per call
(``ws://…/realtime?call_id=…``, Bearer key, no beta header), sends the ``session.update`` and waits for
``session.updated`` on each, then prints ``{"ready": N, "rss_before": …, "rss_ready": …}``. From then on it
answers every ``response.function_call_arguments.done`` at once with its ``function_call_output`` and
sends one ``response.create`` after that response's ``response.done`` — no validation, no state machine,
no logging. It exits when every socket has closed (or stdin closes), printing a last JSON line of counts.

    python benchmarks/floor_tools.py --url ws://127.0.0.1:9000/v1/realtime --key sk-test [--compression]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import raise_nofile, rss_bytes


class Counts:
    def __init__(self) -> None:
        self.outputs = 0
        self.creates = 0
        self.events = 0


async def attach(
    url: str, key: str, call_id: str, session: dict[str, object], compression: bool
) -> ClientConnection:
    ws = await connect(
        f"{url}?call_id={call_id}",
        additional_headers={"Authorization": f"Bearer {key}"},
        compression="deflate" if compression else None,
        max_size=4 * 1024 * 1024,
        open_timeout=30,
    )
    await ws.send(json.dumps({"type": "session.update", "session": session}, separators=(",", ":")))
    while True:
        event = json.loads(await ws.recv())
        if event.get("type") == "session.updated":
            return ws


async def answer(ws: ClientConnection, counts: Counts) -> None:
    pending: set[str] = set()
    try:
        async for message in ws:
            counts.events += 1
            event = json.loads(message)
            kind = event.get("type")
            if kind == "response.function_call_arguments.done":
                output = json.dumps({"n": json.loads(event["arguments"]).get("n")})
                item = {"type": "function_call_output", "call_id": event["call_id"], "output": output}
                await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
                counts.outputs += 1
                pending.add(event["response_id"])
            elif kind == "response.done":
                response_id = event["response"]["id"]
                if response_id in pending:
                    pending.discard(response_id)
                    await ws.send('{"type":"response.create"}')
                    counts.creates += 1
    except ConnectionClosed:
        pass


async def main_async(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())
    call_ids: list[str] = spec["call_ids"]
    session: dict[str, object] = spec["session"]
    rss_before = rss_bytes(os.getpid())
    gate = asyncio.Semaphore(64)

    async def one(call_id: str) -> ClientConnection:
        async with gate:
            return await attach(args.url, args.key, call_id, session, args.compression)

    sockets = await asyncio.gather(*(one(c) for c in call_ids))
    await asyncio.sleep(0.5)
    sys.stdout.write(
        json.dumps({"ready": len(sockets), "rss_before": rss_before, "rss_ready": rss_bytes(os.getpid())})
        + "\n"
    )
    sys.stdout.flush()
    counts = Counts()
    answering = asyncio.gather(*(answer(ws, counts) for ws in sockets))
    stdin_closed = asyncio.ensure_future(reader.read())
    await asyncio.wait({answering, stdin_closed}, return_when=asyncio.FIRST_COMPLETED)
    stdin_closed.cancel()
    for ws in sockets:
        await ws.close()
    await answering
    sys.stdout.write(
        json.dumps({"outputs": counts.outputs, "creates": counts.creates, "events": counts.events}) + "\n"
    )
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description="bare websockets tool-round floor")
    parser.add_argument("--url", required=True, help="sideband base, ws://127.0.0.1:PORT/v1/realtime")
    parser.add_argument("--key", required=True)
    parser.add_argument("--compression", action="store_true", help="offer permessage-deflate")
    args = parser.parse_args()
    raise_nofile()
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
