"""The command line as a user runs it: `sideband serve` in a subprocess, `sideband demo`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import sys
from pathlib import Path

from sideband.demo import run_demo
from sideband.testing import (
    Script,
    Simulator,
    caller_hangs_up,
    caller_says,
    model_calls,
    model_says,
    wait_for_greeting,
)

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def read_until(
    stream: asyncio.StreamReader, event: str, lines: list[dict[str, object]], timeout: float = 20
) -> dict[str, object]:
    async with asyncio.timeout(timeout):
        while True:
            raw = await stream.readline()
            assert raw, f"server exited before logging {event}; saw {[line.get('event') for line in lines]}"
            line = json.loads(raw)
            lines.append(line)
            if line.get("event") == event:
                return line


async def test_serve_subprocess_takes_a_signed_webhook(simulator: Simulator) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SIDEBAND_"))}
    env.update(
        {
            "OPENAI_API_KEY": simulator.api_key,
            "OPENAI_WEBHOOK_SECRET": simulator.webhook_secret,
            "OPENAI_BASE_URL": simulator.base_url,
            "SIDEBAND_LOG_FORMAT": "json",
            "SIDEBAND_DRAIN_TIMEOUT": "2",
        }
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sideband.cli",
        "serve",
        "examples.app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    lines: list[dict[str, object]] = []
    try:
        started = await read_until(proc.stdout, "server.started", lines)
        assert started["tools"] == ["opening_hours"]
        call = simulator.create_call(
            Script(
                [
                    wait_for_greeting("Hello"),
                    caller_says("Are you open on Sunday?"),
                    model_calls("opening_hours", {"day": "sunday"}),
                    model_says("We are closed on Sunday."),
                    caller_hangs_up(),
                ]
            )
        )
        sender = simulator.webhook_sender(f"http://127.0.0.1:{port}/webhooks/openai")
        result = await sender.deliver(simulator.incoming_event(call))
        assert result.status == 200
        await call.wait_done(timeout=10)
        ended = await read_until(proc.stdout, "call.ended", lines)
        assert ended["call_id"] == call.call_id and ended["reason"] == "remote_closed"
        outputs = [e for e in call.received if e["type"] == "conversation.item.create"]
        assert outputs[0]["item"]["output"] == "closed"
        call_lines = [
            line for line in lines if str(line.get("event", "")).split(".")[0] in ("call", "tool", "sideband")
        ]
        assert call_lines and all(line.get("call_id") == call.call_id for line in call_lines)
        assert all({"event", "level", "timestamp"} <= line.keys() for line in lines)
        assert simulator.api_key not in json.dumps(lines)
    finally:
        proc.terminate()
        code = await asyncio.wait_for(proc.wait(), 15)
        err = (await proc.stderr.read()).decode() if proc.stderr else ""
    assert code == 0, err
    assert "Traceback" not in err


async def test_demo_runs_every_scenario() -> None:
    out = io.StringIO()
    code = await run_demo(out=out)
    text = out.getvalue()
    assert code == 0, text
    assert "lookup_order → ok" in text
    assert "transfer_call → ok" in text and "end_call → ok" in text
    assert "0 failed" in text
