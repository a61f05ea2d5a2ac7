"""`sideband demo`: what it prints, what it counts as a failure, and the pytest plugin's import cost."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sideband import Accept, CallContext, CallSummary, IncomingCall, Reject, Sideband
from sideband.app import CallPlan
from sideband.cli import main
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


async def test_demo_prints_the_lines_an_apps_slow_hooks_held_back() -> None:
    app = plain_app()
    never = asyncio.Event()

    @app.on_transcript
    async def crm_write(ctx: CallContext, role: str, text: str) -> None:
        await never.wait()  # held until the call's end skips what is queued behind it

    out = io.StringIO()
    assert await run_demo(app, calls=1, out=out) == 0, out.getvalue()
    text = out.getvalue()
    call = text[text.index("call 1:") : text.index("trusted-server")]
    tags = [line.split()[1] for line in call.splitlines()[1:] if line.strip()]
    assert tags == ["webhook", "caller", "agent", "end"], call  # each line once, before the end


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


async def test_demo_counts_an_accept_openai_refuses_as_a_failed_call() -> None:
    """OpenAI refuses every accept of this app (a voice it does not have): the server rejects the call
    instead, which is no reject of the app's own."""
    app = Sideband(instructions="You answer.", greeting=None, voice="nonexistent-voice-zzz")
    out = io.StringIO()
    code = await run_demo(app, calls=2, out=out)
    text = out.getvalue()
    assert code == 1, text
    assert text.count("error   OpenAI refused to answer the call as decided") == 2, text
    assert "the call was rejected with 480" in text and "call.accept_failed" in text, text
    assert "end     rejected" not in text, text
    assert text.endswith("\n2 calls and a trusted-server session, 2 failed.\n"), text


async def test_demo_counts_a_call_whose_webhook_was_never_answered_2xx_as_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server answers every attempt of a call's webhook 500 (an error of its own: no counter of a
    routing or answer failure moves): the call is left ringing, never answered, which is a failure."""
    app = plain_app()

    def unplannable(accept: Accept | None = None) -> CallPlan:
        raise RuntimeError("the plan cache is corrupt")

    @app.on_incoming
    async def route(call: IncomingCall) -> Accept:
        monkeypatch.setattr(app, "plan", unplannable)  # (the server planned the app's own calls at start)
        return Accept()

    out = io.StringIO()
    code = await run_demo(app, calls=2, out=out)
    text = out.getvalue()
    assert code == 1, text
    assert (
        text.count("error   the webhook was never answered 2xx (500, 500, 500), so the call was left ringing")
        == 2
    )
    assert "end     ringing" not in text, text
    assert text.endswith("\n2 calls and a trusted-server session, 2 failed.\n"), text


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


async def test_demo_waits_for_an_end_hook_that_takes_all_of_its_time() -> None:
    """An ``on_call_end`` hook may run ``END_HOOK_TIMEOUT`` seconds (a slow CRM write); the demo's own
    end hook runs after it, and the demo waits as long as the call's end may take, not less."""
    app = plain_app()
    cut_off = asyncio.Event()

    @app.on_call_end
    async def crm(ctx: CallContext, summary: CallSummary) -> None:
        try:
            await asyncio.Event().wait()  # (until the hook's time is up)
        except asyncio.CancelledError:
            cut_off.set()
            raise

    out = io.StringIO()
    code = await run_demo(app, calls=1, out=out)
    text = out.getvalue()
    assert cut_off.is_set()  # it ran the whole of its time
    assert code == 0, text
    assert "did not end in time" not in text and "error" not in text, text
    assert "0 tool call(s); simulator: caller_hangup\n" in text, text
    assert text.endswith("\n1 call and a trusted-server session, 0 failed.\n"), text


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


@pytest.mark.parametrize("app_greets", [True, False])
async def test_demo_waits_for_a_greeting_as_the_routing_hook_decides(app_greets: bool) -> None:
    """The hook turns the app's greeting off (or gives one to an app without): the demo's caller waits
    for a greeting only when the server's decision for the call has one."""
    app = Sideband(instructions="You answer.", greeting=None if not app_greets else "Greet the caller.")

    @app.on_incoming
    async def route(call: IncomingCall) -> Accept:
        return Accept(greeting="" if app_greets else "Greet the caller warmly.")

    out = io.StringIO()
    code = await run_demo(app, calls=2, out=out)
    text = out.getvalue()
    assert code == 0, text
    assert text.endswith("\n2 calls and a trusted-server session, 0 failed.\n"), text
    assert ("Hello, how can I help?" in text) == (not app_greets), text  # (the simulated greeting)
    assert "decide" not in vars(app)  # (the app is left as it was)


ROUTES = """
[blocked]
numbers = ["+14155550199"]

[default]
reject = 486

[routes."+18005550000"]
instructions = "You are the billing desk."
greeting = ""
"""


def greeting_app() -> Sideband:
    """An app that greets every call, unless its route says otherwise."""
    return Sideband(instructions="You answer.")


async def test_demo_answers_an_apps_calls_by_its_route_file_and_numbers(tmp_path: Path) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text(ROUTES)
    out = io.StringIO()
    code = await run_demo(greeting_app(), calls=1, out=out, routes_file=routes, to_number="+18005550000")
    text = out.getvalue()
    assert code == 0, text
    assert f"routes: {routes} (1 route and a default)\n" in text
    call = text[text.index("call 1:") : text.index("trusted-server session")]
    assert "+14255550100 → +18005550000" in call
    # the billing route's empty greeting: the caller speaks first, and the call goes its whole course
    tags = [line.split()[1] for line in call.splitlines()[1:] if line.strip()]
    assert tags == ["webhook", "caller", "agent", "end"], call

    out = io.StringIO()
    code = await run_demo(greeting_app(), calls=1, out=out, routes_file=routes, from_number="14155550199")
    text = out.getvalue()
    assert code == 0, text
    assert "14155550199 → +18005551212" in text and "end     rejected ({'status_code': 603})" in text


async def test_the_bundled_demo_says_it_does_not_apply_a_route_file(tmp_path: Path) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text("[default]\nreject = 486\n")
    out = io.StringIO()
    assert await run_demo(calls=1, out=out, routes_file=routes) == 0, out.getvalue()
    text = out.getvalue()
    assert f"routes: {routes} is not applied: the bundled order desk's calls are scripted" in text
    assert "{'status_code': 486}" not in text
    with pytest.raises(ValueError, match="numbers of their own"):
        await run_demo(calls=1, out=io.StringIO(), to_number="+18005550000")


def test_demo_piped_to_a_reader_that_stops_early_ends_quietly() -> None:
    """``sideband demo | head -1``: the rest of the story goes nowhere, without a traceback per line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sideband.cli", "demo", "--calls", "1"],
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith("sideband demo: server on ")
        proc.stdout.close()  # the reader is gone
        err = proc.stderr.read()
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "BrokenPipeError" not in err and "Traceback" not in err and "hook.failed" not in err, err
    assert code == 0


def run_demo_cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sideband.cli", "demo", *args],
        check=False,
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_demo_reads_the_route_file_from_the_environment_and_takes_the_numbers_to_call(
    tmp_path: Path,
) -> None:
    (tmp_path / "desk.py").write_text('from sideband import Sideband\napp = Sideband(instructions="Hi.")\n')
    (tmp_path / "routes.toml").write_text(ROUTES)
    broken = run_demo_cli(tmp_path, "desk:app", "--calls", "1", SIDEBAND_ROUTES_FILE="missing.toml")
    assert broken.returncode == 2 and broken.stdout == ""
    assert broken.stderr.startswith("sideband: SIDEBAND_ROUTES_FILE: cannot read missing.toml"), broken.stderr
    args = ("desk:app", "--calls", "1", "--to", "+18005550001", "--from", "+14155550100")
    proc = run_demo_cli(tmp_path, *args, SIDEBAND_ROUTES_FILE="routes.toml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "routes: routes.toml (1 route and a default)\n" in proc.stdout
    assert "+14155550100 → +18005550001" in proc.stdout
    assert "end     rejected ({'status_code': 486})" in proc.stdout  # the file's [default]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("--to", "+18005550000"), "--to: the bundled demo's calls have numbers of their own; name your app"),
        (
            ("--from", "anonymous"),
            "--from: the bundled demo's calls have numbers of their own; name your app",
        ),
        (("x:app", "--to", "sip:a@b"), "--to: must be a phone number or a SIP user name"),
        (("x:app", "--from", ""), "--from: must be a phone number or a SIP user name"),
    ],
)
def test_demo_numbers_it_cannot_use_are_one_line(
    args: tuple[str, ...], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"sideband: {error}"), captured.err
    assert captured.err.count("\n") == 1


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
