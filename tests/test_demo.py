"""`sideband demo`: what it prints, what it counts as a failure, and the pytest plugin's import cost."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

from sideband import Accept, IncomingCall, Reject, Sideband
from sideband.demo import run_demo

ROOT = Path(__file__).resolve().parents[1]

SIMULATORS = ("sideband.testing.simulator", "sideband.testing.vowel")


def clean_env(**extra: str) -> dict[str, str]:
    """The process environment without the real OPENAI_*/SIDEBAND_*/PYTHON* variables, plus ``extra``."""
    drop = ("OPENAI_", "SIDEBAND_", "PYTHONDEVMODE", "PYTHONASYNCIODEBUG")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


def plain_app() -> Sideband:
    """An app the demo knows nothing about: no greeting, no tools."""
    return Sideband(instructions="You answer.", greeting=None)


class ThreadRecordingOut(io.StringIO):
    """A StringIO that remembers which thread wrote each piece of text."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def write(self, s: str) -> int:
        """Write ``s``, noting the writing thread."""
        self.threads.add(threading.get_ident())
        return super().write(s)


def test_demo_in_development_mode_ends_with_no_hook_failure() -> None:
    """Under PYTHONDEVMODE the event loop refuses calls from other threads: the demo's hooks must set
    its events on the loop, or a call's end is never seen and the demo hangs."""
    proc = subprocess.run(
        [sys.executable, "-m", "sideband.cli", "demo", "--calls", "1"],
        check=False,
        cwd=ROOT,
        env=clean_env(PYTHONDEVMODE="1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "hook.failed" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.endswith("2 calls and a trusted-server session, 0 failed.\n"), proc.stdout


async def test_demo_prints_from_the_event_loop_in_order() -> None:
    out = ThreadRecordingOut()
    assert await run_demo(calls=1, out=out) == 0, out.getvalue()
    assert out.threads == {threading.get_ident()}
    text = out.getvalue()
    call = text[text.index("call 1:") : text.index("call 2:")]
    tags = [line.split()[1] for line in call.splitlines()[1:] if line.strip()]
    assert tags == ["webhook", "agent", "caller", "agent", "tool", "agent", "caller", "agent", "end"], call


async def test_demo_of_one_call_says_call_and_leaves_the_app_as_it_was() -> None:
    app = plain_app()
    out = io.StringIO()
    assert await run_demo(app, calls=1, out=out) == 0, out.getvalue()
    assert out.getvalue().endswith("\n1 call and a trusted-server session, 0 failed.\n"), out.getvalue()
    hooks = (app.on_transcript_hooks, app.on_tool_hooks, app.on_dtmf_hooks, app.on_call_end_hooks)
    assert hooks == ([], [], [], [])  # the demo's printing hooks are gone again


async def test_demo_of_an_app_whose_greeting_is_empty_does_not_wait_for_one() -> None:
    """``greeting=""`` means no greeting, as ``None`` does: the caller speaks first."""
    out = io.StringIO()
    assert await run_demo(Sideband(instructions="You answer.", greeting=""), calls=1, out=out) == 0, (
        out.getvalue()
    )
    assert out.getvalue().endswith("\n1 call and a trusted-server session, 0 failed.\n"), out.getvalue()


async def test_demo_counts_a_crashing_routing_hook_as_failed_calls() -> None:
    app = plain_app()

    @app.on_incoming
    async def route(call: IncomingCall) -> Accept:
        raise RuntimeError("the routing database is down")

    out = io.StringIO()
    code = await run_demo(app, calls=2, out=out)
    text = out.getvalue()
    assert code == 1, text
    assert text.count("error   the routing hook failed") == 2, text
    assert "so the call was rejected with 480" in text
    assert text.endswith("\n2 calls and a trusted-server session, 2 failed.\n"), text


async def test_demo_counts_an_accept_that_cannot_be_sent_as_a_failed_call() -> None:
    app = plain_app()

    @app.on_incoming
    async def route(call: IncomingCall) -> Accept:
        return Accept(tools=("no_such_tool",))

    out = io.StringIO()
    code = await run_demo(app, calls=1, out=out)
    text = out.getvalue()
    assert code == 1, text
    assert "error   the routing hook failed" in text and "call.config_invalid" in text, text
    assert text.endswith("\n1 call and a trusted-server session, 1 failed.\n"), text


async def test_demo_counts_a_routing_hook_past_its_budget_as_a_failed_call() -> None:
    app = plain_app()
    never = asyncio.Event()

    @app.on_incoming
    async def route(call: IncomingCall) -> Accept:
        await never.wait()
        return Accept()

    out = io.StringIO()
    code = await run_demo(app, calls=1, out=out)
    text = out.getvalue()
    assert code == 1, text
    assert text.count("error   the routing hook failed") == 1, text
    assert text.endswith("\n1 call and a trusted-server session, 1 failed.\n"), text


async def test_demo_takes_a_deliberate_reject_as_a_success() -> None:
    app = plain_app()

    @app.on_incoming
    def route(call: IncomingCall) -> Reject:
        return Reject(status_code=486)

    out = io.StringIO()
    code = await run_demo(app, calls=1, out=out)
    text = out.getvalue()
    assert code == 0, text
    assert "end     rejected ({'status_code': 486})" in text and "error" not in text, text
    assert text.endswith("\n1 call and a trusted-server session, 0 failed.\n"), text


def imported_after(code: str) -> list[str]:
    """Which of the simulator modules are imported after running ``code`` in a fresh interpreter."""
    check = f"{code}\nimport sys\nprint(','.join(m for m in {SIMULATORS!r} if m in sys.modules))"
    proc = subprocess.run(
        [sys.executable, "-c", check],
        check=False,
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return [m for m in proc.stdout.strip().split(",") if m]


def test_loading_the_pytest_plugin_imports_no_simulator() -> None:
    """pytest loads the plugin in every run where sideband is installed: it imports the simulators in
    its fixtures only, and its package imports each name on first use."""
    assert imported_after("import sideband.testing.pytest_plugin") == []
    assert imported_after("from sideband.testing import Simulator") == ["sideband.testing.simulator"]
