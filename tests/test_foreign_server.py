"""`sideband serve` against a PROTOCOL A server that is not the project's simulator.

``ReplayServer`` below is written from ``PROTOCOL.md`` alone and shares no code with
``sideband.testing``: it lives under another base path, answers the call verbs the way OpenAI does (200,
empty body), and on the sideband plays back the frames OpenAI really sent in a recorded tool round
(``tests/data/cassettes/openai/ws_tool_round_gpt-realtime.jsonl``) — pretty-printed arguments with a
trailing newline, an acknowledgement that arrives before the output it acknowledges, ``rate_limits.updated``
between responses — then drops the TCP connection without a close frame, as a caller hangup can look.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import ssl
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import WSMsgType, web
from standardwebhooks import Webhook

from tests.test_cli import clean_env, serving

CASSETTE = Path(__file__).parent / "data" / "cassettes" / "openai" / "ws_tool_round_gpt-realtime.jsonl"
BASE_PATH = "/proxy/openai/v1"


def recorded_server_frames() -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in CASSETTE.read_text().splitlines() if line.strip()]
    # A sideband attached by call id gets no session.created (PROTOCOL A3).
    return [x["event"] for x in lines if x["dir"] == "server" and x["event"]["type"] != "session.created"]


@dataclass
class Received:
    """A client frame, with how many server frames had been sent when it arrived."""

    event: dict[str, Any]
    after_sent: int


@dataclass
class ReplayServer:
    api_key: str
    frames: list[dict[str, Any]]
    verbs: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    handshakes: list[dict[str, str]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    sent: int = 0
    state: dict[str, str] = field(default_factory=dict)
    replay_error: list[str] = field(default_factory=list)
    dropped: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(BASE_PATH + "/realtime/calls/{call_id}/{verb}", self.verb)
        app.router.add_get(BASE_PATH + "/realtime", self.sideband)
        return app

    def authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def verb(self, request: web.Request) -> web.Response:
        call_id, verb = request.match_info["call_id"], request.match_info["verb"]
        self.verbs.append((verb, call_id, dict(request.headers), await request.read()))
        if not self.authorized(request):
            return web.json_response({"error": {"code": "invalid_api_key"}}, status=401)
        if call_id not in self.state:
            return web.json_response({"error": {"code": "call_id_not_found"}}, status=404)
        if verb == "accept":
            self.state[call_id] = "accepted"
        elif verb in ("hangup", "reject"):
            self.state[call_id] = "ended"
        return web.Response(status=200)

    async def sideband(self, request: web.Request) -> web.StreamResponse:
        self.handshakes.append({**request.headers, "call_id": request.query.get("call_id", "")})
        if not self.authorized(request):
            return web.json_response({"error": {"code": "invalid_api_key"}}, status=401)
        if self.state.get(request.query.get("call_id", "")) != "accepted":
            return web.json_response({"error": {"code": "call_id_not_found"}}, status=404)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        arrived = asyncio.Queue[str]()

        async def read() -> None:
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    event = json.loads(msg.data)
                    self.received.append(Received(event, self.sent))
                    arrived.put_nowait(event["type"])

        async def wait_for(kind: str) -> None:
            async with asyncio.timeout(10):
                while await arrived.get() != kind:
                    pass

        async def send(frames: list[dict[str, Any]]) -> None:
            for frame in frames:
                await ws.send_str(json.dumps(frame))
                self.sent += 1

        reader = asyncio.create_task(read())
        try:
            kinds = [f["type"] for f in self.frames]
            first_done = kinds.index("response.done")
            await wait_for("session.update")
            await send(self.frames[: first_done + 1])  # session.updated … the tool call's response.done
            await wait_for("response.create")
            await send(self.frames[first_done + 1 :])  # rate limits, acks, the spoken answer
        except TimeoutError:
            self.replay_error.append(f"timed out after {self.sent} frames")
        finally:
            self.state[request.query["call_id"]] = "ended"
            assert request.transport is not None
            request.transport.abort()  # no close frame: the connection just drops
            reader.cancel()
            self.dropped.set()
        return ws


def signed_incoming(secret: str, call_id: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(
        {
            "object": "event",
            "id": "evt_" + secrets.token_hex(16),
            "type": "realtime.call.incoming",
            "created_at": int(time.time()),
            "data": {
                "call_id": call_id,
                "sip_headers": [
                    {"name": "From", "value": "sip:+142555512112@sip.example.com"},
                    {"name": "To", "value": "sip:+18005551212@sip.example.com"},
                    {"name": "Call-ID", "value": "03782086-4ce9-44bf-8b0d-4e303d2cc590"},
                ],
            },
        }
    )
    msg_id = "wh_" + secrets.token_hex(16)
    now = datetime.now(tz=UTC)
    headers = {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, body),
    }
    return body.encode(), headers


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_serve_runs_a_recorded_tool_round_against_another_protocol_a_server(
    scheme: str, tmp_path: Path
) -> None:
    """Over ``https`` the server presents a certificate of a private CA that the serving process trusts
    through ``SSL_CERT_FILE``: the REST verbs and the ``wss://`` sideband both verify it."""
    frames = recorded_server_frames()
    recorded = next(f for f in frames if f["type"] == "response.function_call_arguments.done")
    assert recorded["arguments"].endswith("\n") and "\n" in recorded["arguments"].strip()  # pretty-printed
    spoken = next(f["text"] for f in frames if f["type"] == "response.output_text.done")

    key = "sk-replay-" + secrets.token_hex(8)
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    call_id = "rtc_" + secrets.token_hex(16)
    server = ReplayServer(key, frames, state={call_id: "ringing"})
    runner = web.AppRunner(server.app())
    await runner.setup()
    server_tls: ssl.SSLContext | None = None
    trust: dict[str, str] = {}
    if scheme == "https":
        ca = trustme.CA()
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(server_tls)
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        trust = {"SSL_CERT_FILE": str(tmp_path / "ca.pem")}
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls).start()
        upstream_port = runner.addresses[0][1]
        env = clean_env(
            OPENAI_API_KEY=key,
            OPENAI_WEBHOOK_SECRET=secret,
            OPENAI_BASE_URL=f"{scheme}://127.0.0.1:{upstream_port}{BASE_PATH}",
            SIDEBAND_LOG_FORMAT="json",
            SIDEBAND_DRAIN_TIMEOUT="2",
            **trust,
        )
        async with serving(env, "tests.weather_app:app") as served:
            body, headers = signed_incoming(secret, call_id)
            async with (
                aiohttp.ClientSession() as http,
                http.post(served.url, data=body, headers=headers) as r,
            ):
                assert r.status == 200, await r.text()
            ended = await served.until("call.ended")
            await asyncio.wait_for(server.dropped.wait(), 5)
            code = await served.stop()
            err = await served.rest()
    finally:
        await runner.cleanup()
    lines = served.lines
    assert code == 0, err
    assert "Traceback" not in err
    assert server.replay_error == []

    # Call control: one accept, on the configured base path, with the Bearer key and a valid body.
    assert [(verb, cid) for verb, cid, _, _ in server.verbs] == [("accept", call_id)]
    _, _, accept_headers, accept_raw = server.verbs[0]
    assert accept_headers["Authorization"] == f"Bearer {key}"
    accept = json.loads(accept_raw)
    assert accept["type"] == "realtime"
    assert [t["name"] for t in accept["tools"]] == ["get_weather"]
    assert "format" not in json.dumps(accept.get("audio", {}))

    # The sideband: scoped to the call, Bearer key, no beta header; re-attach after the drop is refused.
    assert server.handshakes and all(h["call_id"] == call_id for h in server.handshakes)
    assert all(h["Authorization"] == f"Bearer {key}" for h in server.handshakes)
    assert not any("OpenAI-Beta" in h for h in server.handshakes)

    # What the controller sent, in order: the same config as the accept, the output for the recorded
    # call id, then one response.create only after the tool call's response.done went out.
    kinds = [x.event["type"] for x in server.received]
    assert kinds == ["session.update", "conversation.item.create", "response.create"], kinds
    update, output, create = server.received
    assert update.after_sent == 0
    assert update.event["session"]["type"] == "realtime"
    assert update.event["session"]["tools"] == accept["tools"]
    assert update.event["session"]["instructions"] == accept["instructions"]
    item = output.event["item"]
    assert item["type"] == "function_call_output" and item["call_id"] == recorded["call_id"]
    assert json.loads(item["output"]) == {"city": "London", "temperature_c": 21}
    assert output.after_sent > frames.index(recorded)
    assert create.after_sent == [f["type"] for f in frames].index("response.done") + 1

    # The logs tell the story: the tool ran once, the recorded answer is the agent's transcript line,
    # and the dropped connection ends the call once re-attaching is refused.
    tools = [x for x in lines if x.get("event") == "tool.finished"]
    assert len(tools) == 1 and tools[0]["outcome"] == "ok" and tools[0]["tool"] == "get_weather"
    agent = [x["text"] for x in lines if x.get("event") == "transcript" and x.get("role") == "agent"]
    assert agent == [spoken.strip()]
    assert any(x.get("event") == "sideband.lost" for x in lines)
    assert ended["call_id"] == call_id and ended["reason"] == "call_not_found"
