"""Raw floor of the answer path: the least a webhook answerer can do.

A minimal aiohttp server that verifies the signed ``realtime.call.incoming`` webhook with the
``standardwebhooks`` package, POSTs ``/realtime/calls/{call_id}/accept`` with one shared aiohttp
``ClientSession`` (and opens nothing else: no sideband, no claims, no logging), then answers 200.

With ``--attach`` it also does the rest of the answered path the bare way, after the 200: open the call's
sideband with ``websockets`` (Bearer key), send the same session as ``session.update``, wait for
``session.updated`` and hold the socket until the far side closes it. That variant is the floor for the
CPU of a whole answered call (verify, accept, attach, session.update, end).

    python benchmarks/floor_answer.py --port 8081 --base-url http://127.0.0.1:9000/v1 [--attach]

Environment: ``OPENAI_API_KEY``, ``OPENAI_WEBHOOK_SECRET``, ``FLOOR_ACCEPT_BODY`` (the JSON accept body;
the runner passes the benchmark app's session so both servers POST the same bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal

import aiohttp
import uvloop
from aiohttp import web
from standardwebhooks import Webhook
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

SESSION = web.AppKey("session", aiohttp.ClientSession)


def build_app(
    base_url: str, api_key: str, secret: str, accept_body: bytes, *, attach: bool = False
) -> web.Application:
    hook = Webhook(secret)
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    base = base_url.rstrip("/")
    ws_base = base.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/realtime"
    update = json.dumps({"type": "session.update", "session": json.loads(accept_body)})
    tasks: set[asyncio.Task[None]] = set()

    async def sideband(call_id: str) -> None:
        try:
            async with connect(
                f"{ws_base}?call_id={call_id}",
                additional_headers={"Authorization": f"Bearer {api_key}"},
                compression=None,
                proxy=None,
            ) as ws:
                await ws.send(update)
                async for message in ws:
                    if '"session.updated"' in message:
                        continue  # configured; hold the socket until the caller hangs up
        except (OSError, TimeoutError, WebSocketException):
            pass

    async def webhook(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            event = hook.verify(body, dict(request.headers))
        except Exception:
            return web.json_response({"error": "bad signature"}, status=401)
        if event.get("type") != "realtime.call.incoming":
            return web.json_response({"status": "ignored"})
        call_id = event["data"]["call_id"]
        url = f"{base}/realtime/calls/{call_id}/accept"
        async with request.app[SESSION].post(url, data=accept_body, headers=headers) as resp:
            await resp.read()
            status = resp.status
        if status != 200:
            return web.json_response({"status": "failed", "upstream": status}, status=503)
        if attach:
            task = asyncio.create_task(sideband(call_id))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return web.json_response({"status": "accepted"})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def client(app: web.Application):  # type: ignore[no-untyped-def]
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await app[SESSION].close()

    app = web.Application()
    app.router.add_post("/webhooks/openai", webhook)
    app.router.add_get("/healthz", healthz)
    app.cleanup_ctx.append(client)
    return app


async def serve(port: int, base_url: str, attach: bool) -> None:
    accept_body = os.environ.get("FLOOR_ACCEPT_BODY") or json.dumps({"type": "realtime"})
    app = build_app(
        base_url,
        os.environ["OPENAI_API_KEY"],
        os.environ["OPENAI_WEBHOOK_SECRET"],
        accept_body.encode(),
        attach=attach,
    )
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--base-url", required=True, help="REST base of the (simulated) OpenAI API")
    parser.add_argument("--attach", action="store_true", help="also attach the sideband (session.update)")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.base_url, args.attach))


if __name__ == "__main__":
    main()
