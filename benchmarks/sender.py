"""Paced webhook sender: signed ``realtime.call.incoming`` deliveries at a steady rate (open loop).

A long-lived helper process: it prints ``ready`` once its HTTP session is up, then runs one phase per JSON
line read on stdin, ``{"rate": 100, "warmup": 1, "duration": 10, "start_at": 12345.6}``, and answers each
with one JSON line. The schedule is wall-clock: delivery ``i`` leaves at ``start_at + i / rate``
(``time.monotonic()`` seconds, ``CLOCK_MONOTONIC``, the same clock in every process of this machine)
whether or not earlier deliveries were answered. Each delivery records when it left (``monotonic_ns``
just before the POST), when its answer came and its status; the runner joins that with the simulator's
accept timestamps by ``call_id``. It exits when stdin closes.

    python benchmarks/sender.py --url http://127.0.0.1:8080/webhooks/openai --secret whsec_…
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
import uuid
from typing import Any

import aiohttp
import uvloop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import cpu_seconds, raise_nofile

from sideband.testing.sender import OPENAI_WEBHOOK_USER_AGENT, decode_secret, sign_webhook


def incoming_body(call_id: str, n: int) -> bytes:
    """The webhook body OpenAI sends for a ringing SIP call."""
    event = {
        "object": "event",
        "id": "evt_" + uuid.uuid4().hex,
        "type": "realtime.call.incoming",
        "created_at": int(time.time()),
        "data": {
            "call_id": call_id,
            "sip_headers": [
                {"name": "From", "value": f"sip:+1425555{n % 10000:04d}@sip.example.com"},
                {"name": "To", "value": "sip:+18005551212@sip.example.com"},
                {"name": "Call-ID", "value": str(uuid.uuid4())},
            ],
            "sip_media_security": "srtp",
        },
    }
    return json.dumps(event).encode()


async def phase(
    session: aiohttp.ClientSession, url: str, key: bytes, spec: dict[str, Any], timeout: float
) -> dict[str, Any]:
    rate = float(spec["rate"])
    total = round(rate * (float(spec["warmup"]) + float(spec["duration"])))
    prepared = []
    for n in range(total):
        call_id = "rtc_" + uuid.uuid4().hex
        prepared.append((call_id, "wh_" + uuid.uuid4().hex, incoming_body(call_id, n)))
    records: list[list[Any]] = [[] for _ in range(total)]
    client_timeout = aiohttp.ClientTimeout(total=timeout)

    async def deliver(i: int, due_ns: int) -> None:
        call_id, webhook_id, body = prepared[i]
        stamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": OPENAI_WEBHOOK_USER_AGENT,
            "webhook-id": webhook_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": sign_webhook(key, body, webhook_id, stamp),
        }
        sent = time.monotonic_ns()
        status: int | None = None
        error = None
        try:
            async with session.post(url, data=body, headers=headers, timeout=client_timeout) as resp:
                await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            error = type(exc).__name__
        records[i] = [call_id, sent, time.monotonic_ns(), status, sent - due_ns, error]

    tasks = []
    start_ns = int(float(spec["start_at"]) * 1e9)
    step_ns = 1e9 / rate
    cpu0 = cpu_seconds(os.getpid())
    for i in range(total):
        due = start_ns + round(i * step_ns)
        delay = (due - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(deliver(i, due)))
    await asyncio.gather(*tasks)
    return {"rate": rate, "total": total, "cpu_seconds": cpu_seconds(os.getpid()) - cpu0, "calls": records}


async def run(args: argparse.Namespace) -> None:
    key = decode_secret(args.secret)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        while line := await reader.readline():
            result = await phase(session, args.url, key, json.loads(line), args.timeout)
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()
            gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description="paced signed webhook sender")
    parser.add_argument("--url", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--timeout", type=float, default=10.0, help="per-delivery timeout, seconds")
    args = parser.parse_args()
    raise_nofile()
    gc.disable()  # a load generator: no collector pauses inside a schedule (collected between phases)
    uvloop.run(run(args))


if __name__ == "__main__":
    main()
