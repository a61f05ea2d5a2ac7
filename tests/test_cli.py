"""The command line as a user runs it: `sideband serve` in a subprocess, `sideband demo`."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sideband import Sideband
from sideband.cli import SIGNAL_ECHO, CliError, _address, _raised, _reason, _UntilReaderGone
from sideband.demo import run_demo
from sideband.testing import (
    Script,
    SimCall,
    Simulator,
    caller_hangs_up,
    caller_says,
    model_calls,
    model_says,
    pause,
    wait_for_greeting,
)
from sideband.testing.sender import DeliveryResult
from sideband.testing.vowel import VowelSimulator, when

from .test_vowel import _dial as dial

ROOT = Path(__file__).resolve().parents[1]
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def free_port() -> int:
    """A port nothing listens on now. Racy (another process may take it before it is used): only for a
    test that must know a port before what listens there starts, or that needs one where nothing does;
    ``sideband serve`` itself starts on port 0 (see :func:`serving`)."""
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
            line: dict[str, object] = json.loads(raw)
            lines.append(line)
            if line.get("event") == event:
                return line


def clean_env(**extra: str) -> dict[str, str]:
    """The process environment without the real OPENAI_*/SIDEBAND_* variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "SIDEBAND_"))}
    env.update(extra)
    return env


def serve_env(simulator: Simulator, **extra: str) -> dict[str, str]:
    return clean_env(
        OPENAI_API_KEY=simulator.api_key,
        OPENAI_WEBHOOK_SECRET=simulator.webhook_secret,
        OPENAI_BASE_URL=simulator.base_url,
        SIDEBAND_LOG_FORMAT="json",
        **extra,
    )


async def start_serve(
    port: int, env: dict[str, str], app: str = "examples.app:app", **kwargs: Any
) -> asyncio.subprocess.Process:
    """``sideband serve`` in a subprocess (``kwargs`` go to :func:`asyncio.create_subprocess_exec`). Use
    :func:`serving`, which never leaves the process behind."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sideband.cli",
        "serve",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        cwd=ROOT,
        env=env,
        **{"stdout": asyncio.subprocess.PIPE, "stderr": asyncio.subprocess.PIPE, **kwargs},
    )


async def reap(proc: asyncio.subprocess.Process, timeout: float = 5) -> None:
    """``proc`` has exited: if it still runs, SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


@dataclass
class Served:
    """A running ``sideband serve``: its process, the port it listens on, its JSON log lines read so far."""

    proc: asyncio.subprocess.Process
    started: dict[str, object]
    """Its ``server.started`` line."""
    lines: list[dict[str, object]]

    @property
    def port(self) -> int:
        """The port it listens on."""
        port = self.started["port"]
        assert isinstance(port, int) and port > 0, self.started
        return port

    @property
    def url(self) -> str:
        """Its webhook URL."""
        return f"http://127.0.0.1:{self.port}/webhooks/openai"

    async def until(self, event: str, timeout: float = 20) -> dict[str, object]:
        """Read log lines up to the next ``event`` and return it."""
        assert self.proc.stdout is not None
        return await read_until(self.proc.stdout, event, self.lines, timeout)

    async def exited(self, timeout: float = 15) -> int:
        """The exit code, once it exits (within ``timeout`` seconds)."""
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def stop(self, timeout: float = 15) -> int:
        """SIGTERM, and the exit code."""
        self.proc.terminate()
        return await self.exited(timeout)

    async def rest(self) -> str:
        """Once it exited: the rest of its log read into :attr:`lines`; its stderr."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        out = (await self.proc.stdout.read()).decode()
        self.lines.extend(json.loads(line) for line in out.splitlines() if line.strip())
        return (await self.proc.stderr.read()).decode()


@contextlib.asynccontextmanager
async def serving(env: dict[str, str], app: str = "examples.app:app", **kwargs: Any) -> AsyncIterator[Served]:
    """``sideband serve`` on port 0 (``server.started`` says which it got: no port picked beforehand that
    another process could take), from its ``server.started`` on. At the end, however the test went, a
    process still running is stopped (SIGTERM, then SIGKILL): none is left holding its port."""
    proc = await start_serve(0, env, app, **kwargs)
    try:
        assert proc.stdout is not None
        lines: list[dict[str, object]] = []
        yield Served(proc, await read_until(proc.stdout, "server.started", lines), lines)
    finally:
        await reap(proc)


async def test_serve_subprocess_takes_a_signed_webhook(simulator: Simulator) -> None:
    env = serve_env(
        simulator,
        SIDEBAND_DRAIN_TIMEOUT="2",
        # Not settings (only OPENAI_* and SIDEBAND_* are): each of these would stop the server if read.
        LOG_LEVEL="INFO",
        DEDUP_TTL="3600",
        DRAIN_TIMEOUT="-1",
        WEBHOOK_SECRET="not-a-whsec",
    )
    async with serving(env) as served:
        started, lines, port = served.started, served.lines, served.port
        assert started["listening"] == [f"127.0.0.1:{port}"]
        assert started["tools"] == ["opening_hours"]
        assert started["version"] == importlib.metadata.version("sideband")
        assert started["event_loop"] == ("uvloop" if importlib.util.find_spec("uvloop") else "asyncio")
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
        sender = simulator.webhook_sender(served.url)
        result = await sender.deliver(simulator.incoming_event(call))
        assert result.status == 200
        await call.wait_done(timeout=10)
        ended = await served.until("call.ended")
        assert ended["call_id"] == call.call_id and ended["reason"] == "remote_closed"
        outputs = [e for e in call.received if e["type"] == "conversation.item.create"]
        assert outputs[0]["item"]["output"] == "closed"
        call_lines = [
            line for line in lines if str(line.get("event", "")).split(".")[0] in ("call", "tool", "sideband")
        ]
        assert call_lines and all(line.get("call_id") == call.call_id for line in call_lines)
        assert all({"event", "level", "timestamp"} <= line.keys() for line in lines)
        assert simulator.api_key not in json.dumps(lines)
        code = await served.stop()
        err = await served.rest()
    assert code == 0, err
    assert "Traceback" not in err


def closing(redirect: str, *command: str) -> list[str]:
    """``command`` run with a standard stream closed by the shell (``redirect``: ``>&-``, ``2>&-``): a
    process's own spawn puts /dev/null in the place of a closed one."""
    return ["/bin/sh", "-c", f'exec "$@" {redirect}', "sh", *command] if redirect else list(command)


def run_cli(*args: str, env: dict[str, str], redirect: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        closing(redirect, sys.executable, "-W", "always", "-m", "sideband.cli", *args),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_check_reports_what_serve_would_run_with_and_listens_on_nothing(tmp_path: Path) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text(
        '[blocked]\nnumbers = ["+15551234567"]\nwithheld = true\n'
        '[default]\ninstructions = "Front."\n[routes."+18005551212"]\nreject = 486\n'
    )
    with socket.socket() as taken:  # the port serve would listen on is in use: check never listens
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = clean_env(
            OPENAI_API_KEY="sk-test",
            OPENAI_WEBHOOK_SECRET=SECRET,
            SIDEBAND_ROUTES_FILE=str(routes),
            SIDEBAND_HOST="127.0.0.1",
            SIDEBAND_PORT=str(taken.getsockname()[1]),
        )
        done = run_cli("check", env=env)  # the bundled order desk
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "app sideband: 3 tool(s): transfer_call, end_call, lookup_order",
        f"routes: 1 number(s) and a default from {routes}",
        "blocked: 1 caller number(s) and withheld numbers",
        "claims: in memory (one instance)",
        "sideband: ready to serve",
    ]


def test_check_takes_the_flags_serve_is_given() -> None:
    """A Service named ``sideband`` puts its link in ``SIDEBAND_PORT`` (not a port): ``serve --port`` runs
    all the same, so ``check --port`` vouches for it, and without the flag stops as serve would."""
    env = clean_env(
        OPENAI_API_KEY="sk-test", OPENAI_WEBHOOK_SECRET=SECRET, SIDEBAND_PORT="tcp://10.0.0.7:8080"
    )
    done = run_cli("check", "--host", "127.0.0.1", "--port", "8080", env=env)
    assert done.returncode == 0 and done.stdout.endswith("sideband: ready to serve\n"), done.stderr
    alone = run_cli("check", env=env)
    assert alone.returncode == 2 and "is Kubernetes' link to a Service named sideband" in alone.stderr
    bad = run_cli("check", "--port", "http", env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("sideband: --port: "), bad.stderr


def test_check_piped_to_a_reader_already_gone_ends_quietly() -> None:
    """``sideband check | head -0``: its report goes nowhere, without a traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sideband.cli", "check"],
        cwd=ROOT,
        env=clean_env(OPENAI_API_KEY="sk-test", OPENAI_WEBHOOK_SECRET=SECRET),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before a line is written
    _, err = proc.communicate(timeout=30)
    assert "BrokenPipeError" not in err and "Traceback" not in err, err
    assert proc.returncode == 0


@pytest.mark.parametrize("command", ["check", "demo"])
def test_a_command_run_with_stdout_closed_runs_as_into_dev_null(command: str) -> None:
    """``sideband check >&-``: the report goes nowhere, as into /dev/null; the exit says how it went."""
    done = run_cli(
        command, env=clean_env(OPENAI_API_KEY="sk-test", OPENAI_WEBHOOK_SECRET=SECRET), redirect=">&-"
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
@pytest.mark.parametrize(
    ("args", "env", "code"),
    [
        (("check",), {}, 0),
        (("demo", "--calls", "1"), {}, 0),
        (("check",), {"SIDEBAND_ROUTES_FILE": "/nonexistent/routes.toml"}, 2),
    ],
)
def test_a_command_whose_stdout_is_full_says_so_once_and_exits_as_it_went(
    args: tuple[str, ...], env: dict[str, str], code: int
) -> None:
    """``sideband check > /dev/full`` (a full disk, an I/O error): its report is dropped, stderr says so
    once, and the exit status is the check's own."""
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-W", "always", "-m", "sideband.cli", *args],
            env=clean_env(OPENAI_API_KEY="sk-test", OPENAI_WEBHOOK_SECRET=SECRET, **env),
            cwd=ROOT,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == code, done.stderr
    if code == 0:
        assert done.stderr == "sideband: output lines are dropped: No space left on device\n"
    else:
        assert done.stderr.startswith("sideband: SIDEBAND_ROUTES_FILE: ") and done.stderr.count("\n") == 1


def buffered_env(**extra: str) -> dict[str, str]:
    """:func:`clean_env` with Python's streams buffered, as a user's shell has them."""
    env = clean_env(**extra)
    env.pop("PYTHONUNBUFFERED", None)
    return env


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
@pytest.mark.parametrize(
    ("args", "env", "code"),
    [
        (("check",), {}, 0),
        (("demo", "--calls", "1"), {}, 0),
        (("check",), {"SIDEBAND_ROUTES_FILE": "/nonexistent/routes.toml"}, 2),
        (("check",), {"OPENAI_API_KEY": ""}, 2),
        (("no-such-command",), {}, 2),
    ],
)
@pytest.mark.parametrize("stdout_too", [True, False])
def test_a_command_whose_stderr_is_full_exits_as_it_went(
    args: tuple[str, ...], env: dict[str, str], code: int, stdout_too: bool
) -> None:
    """``sideband check >/dev/full 2>&1``, ``sideband check 2>/dev/full`` (a full disk): what stderr
    cannot take is dropped, and the exit status is still the command's own (not 120, a failed flush at
    exit)."""
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "sideband.cli", *args],
            env=buffered_env(**{"OPENAI_API_KEY": "sk-test", "OPENAI_WEBHOOK_SECRET": SECRET, **env}),
            cwd=ROOT,
            stdout=full if stdout_too else subprocess.DEVNULL,
            stderr=full,
            timeout=30,
            check=False,
        )
    assert done.returncode == code


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
async def test_serve_whose_log_is_full_says_so_once_and_exits_0() -> None:
    """``sideband serve >/dev/full`` (its log on a full disk): it serves, says once on stderr that log
    lines are dropped, and at SIGTERM drains and exits 0, with no failed flush at exit."""
    port = free_port()
    with open("/dev/full", "w") as full:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "sideband.cli", "serve", "examples.app:app"),
            *("--host", "127.0.0.1", "--port", str(port)),
            cwd=ROOT,
            env=buffered_env(
                OPENAI_API_KEY="sk-test", OPENAI_WEBHOOK_SECRET=SECRET, SIDEBAND_LOG_FORMAT="json"
            ),
            stdout=full,
            stderr=asyncio.subprocess.PIPE,
        )
    code, err = await ready_then_stopped(proc, port)
    assert code == 0 and err == "sideband: log lines are dropped: No space left on device\n", err


async def ready_then_stopped(proc: asyncio.subprocess.Process, port: int) -> tuple[int, str]:
    """Once ``sideband serve`` (``proc``, its stderr piped, its stdout no log to read) is ready on ``port``:
    SIGTERM, and its exit code and stderr. Reaped however it goes."""
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(20):
            while True:  # until it listens (or exits)
                assert proc.returncode is None, "serve exited before it listened"
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        assert resp.status == 200
                        break
                await asyncio.sleep(0.05)
        proc.terminate()
        code = await asyncio.wait_for(proc.wait(), 15)
        assert proc.stderr is not None
        return code, (await proc.stderr.read()).decode()
    finally:
        await reap(proc)


def test_an_error_with_stderr_closed_goes_nowhere_and_exits_2() -> None:
    """``sideband check 2>&-``: the one line goes nowhere (not to stdout, where the report goes)."""
    env = clean_env(OPENAI_API_KEY="sk-test", OPENAI_WEBHOOK_SECRET=SECRET, SIDEBAND_DRAIN_TIMOUT="120")
    done = run_cli("check", env=env, redirect="2>&-")
    assert done.returncode == 2 and done.stdout == "", done.stdout


async def test_serve_with_stdout_closed_serves_and_logs_nowhere() -> None:
    """``sideband serve >&-`` (its log unwanted): it serves, drains at SIGTERM and exits 0, and says
    nothing on stderr."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *closing(">&-", sys.executable, "-m", "sideband.cli", "serve", "examples.app:app"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        cwd=ROOT,
        env=clean_env(OPENAI_API_KEY="sk-test", OPENAI_WEBHOOK_SECRET=SECRET),  # (the log's format: its pick)
        stderr=asyncio.subprocess.PIPE,
    )
    code, err = await ready_then_stopped(proc, port)
    assert code == 0 and err == "", err


@pytest.mark.parametrize(
    ("routes", "env", "expected"),
    [
        (
            '[routes."+1"]\ntools = ["nope"]\n',
            {},
            "sideband: SIDEBAND_ROUTES_FILE: {routes}: routes.+1.tools: ",
        ),
        ('[routes."+1"]\nreject = 486\n', {"OPENAI_API_KEY": ""}, "sideband: OPENAI_API_KEY is not set"),
        (
            '[routes."+1"]\nreject = 486\n',
            {"OPENAI_WEBHOOK_SECRET": "", "SIDEBAND_PORT": ""},
            "sideband: OPENAI_WEBHOOK_SECRET is not set",
        ),
        (
            '[routes."+1"]\nsession = { speed = -1 }\n',
            {},
            "sideband: SIDEBAND_ROUTES_FILE: {routes}: routes.+1: session.speed: ",
        ),
        (
            '[routes."+1"]\nmax_call_seconds = true\n',
            {},
            "sideband: SIDEBAND_ROUTES_FILE: {routes}: routes.+1.max_call_seconds: Input should be a valid",
        ),
    ],
)
def test_check_stops_at_what_would_stop_serve_with_one_line(
    tmp_path: Path, routes: str, env: dict[str, str], expected: str
) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(routes)
    settings = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_WEBHOOK_SECRET": SECRET,
        "SIDEBAND_ROUTES_FILE": str(path),
    }
    done = run_cli("check", env=clean_env(**{**settings, **env}))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(expected.format(routes=path)), done.stderr


@pytest.mark.parametrize("command", ["check", "serve"])
def test_a_route_file_nested_too_deeply_stops_the_start_with_one_line(tmp_path: Path, command: str) -> None:
    path = tmp_path / "routes.toml"
    path.write_text("[default]\nsession = { x = " + "[" * 3000 + "]" * 3000 + " }\n")
    env = clean_env(OPENAI_API_KEY="sk-test", OPENAI_WEBHOOK_SECRET=SECRET, SIDEBAND_ROUTES_FILE=str(path))
    done = run_cli(command, env=env)
    assert done.returncode == 2 and done.stdout == "", done.stderr[-300:]
    assert done.stderr == f"sideband: SIDEBAND_ROUTES_FILE: {path}: nested too deeply\n"


@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize(
    "base",
    [
        "https://api.openai.com:99999/v1",
        "https://api.openai.com:abc/v1",
        "https:///v1",
        "https://api openai.com/v1",
        "https://api.openai.com/v1?x=1",
        "https://api.openai.com/v1#x",
    ],
)
def test_a_malformed_openai_base_url_stops_the_start_with_one_line(command: str, base: str) -> None:
    env = clean_env(OPENAI_API_KEY="sk-test", OPENAI_WEBHOOK_SECRET=SECRET, OPENAI_BASE_URL=base)
    done = run_cli(command, "--port", "0", env=env) if command == "serve" else run_cli(command, env=env)
    assert done.returncode == 2 and done.stdout == "", done.stderr[-300:]
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("sideband: OPENAI_BASE_URL: "), done.stderr


@pytest.mark.parametrize("command", ["check", "serve", "demo", "dial"])
def test_a_misspelt_variable_stops_every_command_with_one_line(command: str) -> None:
    env = clean_env(OPENAI_API_KEY="sk-test", OPENAI_WEBHOOK_SECRET=SECRET, SIDEBAND_DRAIN_TIMOUT="120")
    done = run_cli(command, "--port", "0", env=env) if command == "serve" else run_cli(command, env=env)
    assert done.returncode == 2 and done.stdout == "", done.stderr[-300:]
    assert done.stderr == (
        "sideband: SIDEBAND_DRAIN_TIMOUT: not a setting (did you mean SIDEBAND_DRAIN_TIMEOUT?)\n"
    )


def test_version_is_the_installed_packages() -> None:
    done = run_cli("--version", env=clean_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"sideband {importlib.metadata.version('sideband')}\n"


def test_serve_on_a_port_in_use_is_one_line() -> None:
    env = clean_env(OPENAI_API_KEY="sk-test", OPENAI_WEBHOOK_SECRET=SECRET)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        proc = run_cli("serve", "--host", "127.0.0.1", "--port", str(port), env=env)
    # One line, no traceback, no "Unclosed client session" (warnings are on: -W always).
    assert proc.stderr == f"sideband: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert proc.stdout == ""  # not even server.started
    settings_error = run_cli("serve", env={**env, "SIDEBAND_PORT": "70000"})
    assert settings_error.stderr.startswith("sideband: SIDEBAND_PORT:")
    assert proc.returncode == settings_error.returncode == 2


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("--port", "abc"), "sideband: --port: "),
        (
            ("--host", "bad..host", "--port", "0"),
            "sideband: cannot listen on bad..host:0: not a valid host name",
        ),
        (("--host", "x" * 64 + ".example", "--port", "0"), "not a valid host name"),
    ],
)
def test_a_bad_host_or_port_flag_is_one_line(flags: tuple[str, ...], expected: str) -> None:
    env = clean_env(OPENAI_API_KEY="sk-test", OPENAI_WEBHOOK_SECRET=SECRET)
    proc = run_cli("serve", *flags, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr  # no traceback, no warnings


@pytest.mark.parametrize("host", ["bad..host", "x" * 64 + ".example", "nowhere.invalid"])
def test_check_refuses_a_host_serve_cannot_listen_on_as_serve_does(host: str) -> None:
    """A host name that is not valid, or does not resolve: ``check`` stops with the line ``serve`` stops
    with, not "ready to serve"."""
    env = clean_env(OPENAI_API_KEY="sk-test", OPENAI_WEBHOOK_SECRET=SECRET)
    checked = run_cli("check", "--host", host, "--port", "0", env=env)
    served = run_cli("serve", "--host", host, "--port", "0", env=env)
    assert checked.returncode == served.returncode == 2 and checked.stdout == served.stdout == ""
    assert checked.stderr.startswith(f"sideband: cannot listen on {host}:0: "), checked.stderr
    assert checked.stderr.count("\n") == 1 and checked.stderr == served.stderr


@pytest.mark.parametrize(
    ("host", "port", "exc", "expected"),
    [
        (
            "127.0.0.1",
            8080,
            OSError(errno.EADDRINUSE, "error while attempting to bind"),
            "127.0.0.1:8080: address already in use",
        ),
        ("::1", 443, OSError(errno.EACCES, "error while attempting to bind"), "[::1]:443: permission denied"),
        (
            "nowhere.invalid",
            80,
            socket.gaierror(-2, "Name or service not known"),
            "nowhere.invalid:80: name or service not known",
        ),
    ],
)
def test_listen_error_wording(host: str, port: int, exc: OSError, expected: str) -> None:
    assert f"{_address(host, port)}: {_reason(exc)}" == expected
    assert str(CliError(f"cannot listen on {expected}")).count("\n") == 0


async def test_sigterm_gives_calls_one_drain_window(simulator: Simulator) -> None:
    """A call that an in-flight webhook accepts during the drain shares the one drain window: the server
    exits about SIDEBAND_DRAIN_TIMEOUT after SIGTERM, not twice that."""
    # The late call starts 2.5 s into the 3 s window: in a window of its own the server would exit at about
    # 5.5 s; in the shared one at about 3 s, plus the hangups and the exit however busy the machine is.
    drain = 3.0
    env = serve_env(simulator, SIDEBAND_DRAIN_TIMEOUT=str(drain), SIDEBAND_ACCEPT_TIMEOUT="2.5")
    loop = asyncio.get_running_loop()
    delivery: asyncio.Task[DeliveryResult] | None = None
    async with serving(env) as served:
        try:
            sender = simulator.webhook_sender(served.url)
            live = simulator.create_call(Script([pause(60)]))
            assert (await sender.deliver(simulator.incoming_event(live))).status == 200
            await live.wait_connected(timeout=10)
            # The next call's first accept attempt hangs (retried after SIDEBAND_ACCEPT_TIMEOUT): SIGTERM
            # lands while its webhook is in flight, so the call starts during the drain.
            late = simulator.create_call(Script([pause(60)]))
            simulator.fail_accept(late.call_id, "timeout")
            delivery = asyncio.create_task(sender.deliver(simulator.incoming_event(late), max_attempts=1))
            accept_path = f"/v1/realtime/calls/{late.call_id}/accept"
            await simulator.wait_for(
                lambda sim: any(r.path == accept_path for r in sim.requests), timeout=10, what="late accept"
            )
            started = loop.time()
            served.proc.send_signal(signal.SIGTERM)
            code = await served.exited(timeout=4 * drain)
            elapsed = loop.time() - started
            late_result = await delivery
        finally:
            if delivery is not None and not delivery.done():
                delivery.cancel()
        err = await served.rest()
    assert code == 0, err
    assert late_result.status == 200, late_result
    assert sum(1 for r in simulator.requests if r.path == accept_path) == 2  # accepted on the retry
    ended = {line.get("call_id") for line in served.lines if line.get("event") == "call.ended"}
    assert {live.call_id, late.call_id} <= ended
    assert drain <= elapsed < drain + 2, f"exited {elapsed:.2f}s after SIGTERM (drain window {drain}s)"


async def _raw_request(port: int, data: bytes) -> None:
    """Send ``data`` and hang up without waiting for an answer (a client that gives up mid-request)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.transport.abort()


async def test_broken_requests_are_json_lines_and_no_internal_error(simulator: Simulator) -> None:
    head = b"POST /webhooks/openai HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    async with serving(serve_env(simulator, SIDEBAND_DRAIN_TIMEOUT="0")) as served:
        port = served.port
        await _raw_request(port, head + b'Content-Length: 1000\r\n\r\n{"type":')  # gone mid-body
        await served.until("webhook.abandoned")
        await _raw_request(port, b"GARBAGE\r\n\r\n")
        async with (  # still serving, and says so
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as resp,
        ):
            assert resp.status == 200
        code = await served.stop()
        err = await served.rest()
    assert code == 0 and err == ""  # nothing on stderr: every line is on stdout, as JSON
    lines = served.lines
    assert not [e for e in lines if e.get("event") == "http.internal_error"]
    assert next(e for e in lines if e.get("event") == "webhook.abandoned")["level"] == "info"


HUNG_APP = """
import threading
from sideband import Sideband

app = Sideband(instructions="x", greeting=None)

@app.tool(timeout=1, filler_after=None)  # (a worker thread takes the job before it times out)
def stuck_lookup() -> str:
    \"\"\"A backend that never answers.\"\"\"
    threading.Event().wait(120)
    return "never"
"""


async def sigterm_during_tool(
    simulator: Simulator,
    tmp_path: Path,
    source: str,
    tool: str,
    *,
    drain: float,
    wait_for: str,
    signal_again_after: str | None = None,
) -> tuple[int, str, list[dict[str, object]]]:
    """Serve the app in ``source``, place a call whose model calls ``tool``, wait for the log event
    ``wait_for``, send SIGTERM; return the exit code, stderr and every log line. With
    ``signal_again_after``, once that event is logged, SIGTERM goes again every 0.1 s until the exit."""
    (tmp_path / f"{tool}_app.py").write_text(source)
    env = serve_env(simulator, SIDEBAND_DRAIN_TIMEOUT=str(drain), PYTHONPATH=str(tmp_path))
    async with serving(env, app=f"{tool}_app:app") as served:
        proc = served.proc
        call = simulator.create_call(Script([model_calls(tool, {}), pause(60)]))
        sender = simulator.webhook_sender(served.url)
        assert (await sender.deliver(simulator.incoming_event(call))).status == 200
        await served.until(wait_for)
        proc.send_signal(signal.SIGTERM)
        exited = asyncio.ensure_future(proc.wait())
        if signal_again_after is not None:
            await served.until(signal_again_after)
            while not exited.done():
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait([exited], timeout=0.1)
        # the drain, the call's tools' grace (5 s) and a second for what is left: not the tool's forever
        code = await asyncio.wait_for(exited, timeout=20)
        err = await served.rest()
    return code, err, served.lines


async def test_a_stuck_sync_tool_does_not_keep_the_process_alive(
    simulator: Simulator, tmp_path: Path
) -> None:
    code, err, lines = await sigterm_during_tool(
        simulator, tmp_path, HUNG_APP, "stuck_lookup", drain=1, wait_for="tool.finished"
    )
    assert code == 0, err
    finished = next(e for e in lines if e.get("event") == "tool.finished")
    assert finished["outcome"] == "timeout"  # the model was answered; the thread still waits
    abandoned = [line for line in lines if line.get("event") == "server.threads_abandoned"]
    assert len(abandoned) == 1 and [e.get("event") for e in lines][-2:] == [
        "server.stopped",
        "server.threads_abandoned",
    ]


TO_THREAD_APP = """
import asyncio
import threading
from sideband import Sideband

app = Sideband(instructions="x", greeting=None)

@app.tool(timeout=1, filler_after=None)
async def db_lookup() -> str:
    \"\"\"A blocking client called in asyncio's default executor, whose backend never answers.\"\"\"
    return await asyncio.to_thread(threading.Event().wait, 120)
"""


async def test_an_async_tool_stuck_in_the_default_executor_does_not_keep_the_process_alive(
    simulator: Simulator, tmp_path: Path
) -> None:
    """``asyncio.to_thread`` (or ``run_in_executor(None, …)``) stuck on a backend: the event loop's close
    would wait for the default executor's thread forever; it is left behind like any stuck thread."""
    code, err, lines = await sigterm_during_tool(
        simulator, tmp_path, TO_THREAD_APP, "db_lookup", drain=0.5, wait_for="tool.finished"
    )
    assert code == 0, err
    finished = next(e for e in lines if e.get("event") == "tool.finished")
    assert finished["outcome"] == "timeout"
    events = [e.get("event") for e in lines]
    assert events[-2:] == ["server.stopped", "server.threads_abandoned"], events
    threads = lines[-1]["threads"]
    assert isinstance(threads, list) and len(threads) == 1, threads


async def test_a_signal_while_stuck_threads_are_waited_for_exits_at_once_with_status_1(
    simulator: Simulator, tmp_path: Path
) -> None:
    """Past the event loop's end (its signal handlers gone with it), a signal still exits with status 1,
    not by the signal's default action. The stuck thread is waited for 1 s: signals sent every 0.1 s
    from `server.stopped` on land both before and after the loop ends."""
    code, err, lines = await sigterm_during_tool(
        simulator,
        tmp_path,
        HUNG_APP,
        "stuck_lookup",
        drain=0.5,
        wait_for="tool.finished",
        signal_again_after="server.stopped",
    )
    events = [e.get("event") for e in lines]
    assert code == 1 and "server.threads_abandoned" not in events, (code, err, events)


async def test_a_request_still_in_flight_after_the_drain_window_gets_a_second(simulator: Simulator) -> None:
    """A client trickling a webhook's body (it would get its 408 after 10 s) does not hold the exit: once
    the drain window is over, requests still in flight get a second, then the process exits."""
    writer: asyncio.StreamWriter | None = None
    async with serving(serve_env(simulator, SIDEBAND_DRAIN_TIMEOUT="0.5")) as served:
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(
                b"POST /webhooks/openai HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n{"
            )
            await writer.drain()
            async with aiohttp.ClientSession() as http:  # the request is in: /metrics counts it
                for _ in range(100):
                    async with http.get(f"http://127.0.0.1:{served.port}/metrics") as resp:
                        if "sideband_requests_in_flight 2" in await resp.text():
                            break
                else:
                    raise AssertionError("the trickling request never showed as in flight")
            loop = asyncio.get_running_loop()
            started = loop.time()
            code = await served.stop(timeout=20)
            took = loop.time() - started
        finally:
            if writer is not None:
                writer.close()
    assert code == 0
    # the window, the second, exit slack (waiting the body's 10 s would take far longer)
    assert took < 0.5 + 1 + 4, f"exited {took:.2f} s after SIGTERM"


GC_APP = """
import gc
import structlog
from sideband import Sideband

app = Sideband(instructions="x", greeting=None)

@app.tool
def gc_settings() -> str:
    \"\"\"What the collector runs with.\"\"\"
    structlog.get_logger().info("app.gc", threshold=list(gc.get_threshold()), frozen=gc.get_freeze_count())
    return "ok"
"""


async def test_serve_tunes_the_collector_for_live_calls(simulator: Simulator, tmp_path: Path) -> None:
    code, err, lines = await sigterm_during_tool(
        simulator, tmp_path, GC_APP, "gc_settings", drain=0.5, wait_for="app.gc"
    )
    assert code == 0, err
    seen = next(e for e in lines if e.get("event") == "app.gc")
    threshold, frozen = seen["threshold"], seen["frozen"]
    assert isinstance(threshold, list), threshold
    if sys.version_info < (3, 14):
        assert threshold[1] == 50, threshold  # the middle generation: 5x rarer
    assert isinstance(frozen, int) and frozen > 10_000  # what was loaded at start is out of the way


async def test_demo_runs_every_scenario() -> None:
    out = io.StringIO()
    code = await run_demo(out=out)
    text = out.getvalue()
    assert code == 0, text
    assert "lookup_order → ok" in text
    assert "transfer_call → ok" in text and "end_call → ok" in text
    assert "0 failed" in text


async def test_demo_of_an_app_without_a_greeting_and_more_calls() -> None:
    out = io.StringIO()
    code = await run_demo(Sideband(instructions="You answer.", greeting=None), calls=2, out=out)
    text = out.getvalue()
    assert code == 0, text
    assert text.count("hello and goodbye") == 2 and "2 calls and a trusted-server session, 0 failed." in text
    out = io.StringIO()
    assert await run_demo(calls=5, out=out) == 0, out.getvalue()
    assert "6 calls and a trusted-server session, 0 failed." in out.getvalue()  # 5 answered, 1 rejected


def test_demo_logs_as_a_server_would_when_asked() -> None:
    """The story on stdout; with SIDEBAND_LOG_FORMAT/LEVEL the server's JSON log on stderr, each call's
    lines from its webhook to its end."""
    env = {**clean_env(), "SIDEBAND_LOG_FORMAT": "json", "SIDEBAND_LOG_LEVEL": "info"}
    proc = run_cli("demo", "--calls", "1", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "0 failed" in proc.stdout and not proc.stdout.lstrip().startswith("{")
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    ended = [e for e in lines if e.get("event") == "call.ended"]
    assert ended and all(e.get("call_id") for e in ended)
    assert {e["call_id"] for e in ended} <= {
        e.get("call_id") for e in lines if e.get("event") == "call.incoming"
    } | {e.get("call_id") for e in lines if e.get("event", "").startswith("vowel.")}
    bad = run_cli("demo", env={**clean_env(), "SIDEBAND_LOG_LEVEL": "loud"})
    assert bad.returncode == 2 and bad.stderr.startswith("sideband: SIDEBAND_LOG_LEVEL: ")


@pytest.mark.parametrize("calls", ["0", "-1", "abc", "101"])
def test_demo_calls_out_of_range_is_one_line(calls: str) -> None:
    proc = run_cli("demo", "--calls", calls, env=clean_env())
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"sideband: --calls: must be a whole number from 1 to 100, got {calls!r}\n"


async def test_serve_raises_its_open_files_limit(simulator: Simulator) -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit of open files is too low to lower the soft one under it")
    env = serve_env(simulator, SIDEBAND_DRAIN_TIMEOUT="1")

    def lower() -> None:  # systemd's 1024, smaller
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    async with serving(env, preexec_fn=lower) as served:
        started = served.started
        assert started["max_open_files"] == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
        limits = Path(f"/proc/{served.proc.pid}/limits").read_text()
        assert f"Max open files            {started['max_open_files']}" in limits


STUBBORN_APP = """
import asyncio
from sideband import Sideband

app = Sideband(instructions="x", greeting=None)

@app.tool(timeout=600, filler_after=None)
async def stubborn() -> str:
    \"\"\"A tool that will not stop.\"\"\"
    while True:
        try:
            await asyncio.sleep(600)
        except asyncio.CancelledError:
            pass  # swallowed, every time
"""


async def test_a_tool_that_ignores_cancellation_does_not_keep_the_process_alive(
    simulator: Simulator, tmp_path: Path
) -> None:
    code, err, lines = await sigterm_during_tool(
        simulator, tmp_path, STUBBORN_APP, "stubborn", drain=0.5, wait_for="tool.started"
    )
    assert code == 0, err
    events = [e.get("event") for e in lines]
    assert events[-2:] == ["server.stopped", "server.tasks_abandoned"]
    tasks = lines[-1]["tasks"]
    assert isinstance(tasks, list) and len(tasks) == 1 and str(tasks[0]).startswith("tool:call_")
    ended = [e for e in lines if e.get("event") == "call.ended"]
    assert [e["reason"] for e in ended] == ["shutdown"]


@contextlib.asynccontextmanager
async def serve_with_a_live_call(simulator: Simulator, drain: float) -> AsyncIterator[tuple[Served, SimCall]]:
    """``sideband serve`` (drain window ``drain``) with one call attached, its caller silent a minute."""
    async with serving(serve_env(simulator, SIDEBAND_DRAIN_TIMEOUT=str(drain))) as served:
        call = simulator.create_call(Script([pause(60)]))
        sender = simulator.webhook_sender(served.url)
        assert (await sender.deliver(simulator.incoming_event(call))).status == 200
        await served.until("sideband.attached")
        yield served, call


async def test_a_second_signal_ends_the_drain_at_once(simulator: Simulator) -> None:
    loop = asyncio.get_running_loop()
    async with serve_with_a_live_call(simulator, 60) as (served, call):
        served.proc.send_signal(signal.SIGTERM)
        first = loop.time()
        await served.until("server.draining")
        await asyncio.sleep(first + SIGNAL_ECHO + 0.1 - loop.time())  # (sooner, it is the same signal)
        started = loop.time()
        served.proc.send_signal(signal.SIGINT)
        code = await served.exited(timeout=15)  # not the 60 s window
        elapsed = loop.time() - started
        await served.rest()
    assert code == 0 and elapsed < 5
    events = [e.get("event") for e in served.lines]
    assert "server.hurried" in events
    assert [e["reason"] for e in served.lines if e.get("event") == "call.ended"] == ["shutdown"]
    assert [r.path for r in simulator.requests if r.path.endswith("/hangup")] == [
        f"/v1/realtime/calls/{call.call_id}/hangup"
    ]


async def test_one_signal_that_arrives_twice_drains_all_the_same(simulator: Simulator) -> None:
    """A Ctrl-C under a wrapper that forwards it (or a SIGTERM to the whole process group) reaches the
    server twice at once: that is one signal, not the second that ends the drain."""
    drain = 2.0
    loop = asyncio.get_running_loop()
    async with serve_with_a_live_call(simulator, drain) as (served, _):
        started = loop.time()
        served.proc.send_signal(signal.SIGINT)  # the terminal's
        served.proc.send_signal(signal.SIGINT)  # the wrapper's
        served.proc.send_signal(signal.SIGTERM)  # and a supervisor's to the group
        code = await served.exited(timeout=15)
        elapsed = loop.time() - started
        await served.rest()
    assert code == 0
    events = [e.get("event") for e in served.lines]
    assert "server.hurried" not in events and "server.killed" not in events
    assert "server.signal_repeated" in events  # (said: one who presses Ctrl-C again sees why)
    assert elapsed >= drain  # the live call had the whole window
    assert [e["reason"] for e in served.lines if e.get("event") == "call.ended"] == ["shutdown"]


async def test_a_webhook_in_flight_keeps_the_listener_and_its_call_gets_the_window(
    simulator: Simulator,
) -> None:
    """No call is live at SIGTERM, but a webhook is mid-accept: the server goes on listening (readyz says
    503) until it is answered, and the call it accepts is served for the rest of the window."""
    drain = 2.0
    env = serve_env(simulator, SIDEBAND_DRAIN_TIMEOUT=str(drain), SIDEBAND_ACCEPT_TIMEOUT="1")
    loop = asyncio.get_running_loop()
    delivery: asyncio.Task[DeliveryResult] | None = None
    async with serving(env) as served:
        try:
            sender = simulator.webhook_sender(served.url)
            late = simulator.create_call(Script([pause(60)]))
            simulator.fail_accept(
                late.call_id, "timeout"
            )  # the first attempt hangs for SIDEBAND_ACCEPT_TIMEOUT
            delivery = asyncio.create_task(sender.deliver(simulator.incoming_event(late), max_attempts=1))
            accept_path = f"/v1/realtime/calls/{late.call_id}/accept"
            await simulator.wait_for(
                lambda sim: any(r.path == accept_path for r in sim.requests), timeout=10, what="accept"
            )
            started = loop.time()
            served.proc.send_signal(signal.SIGTERM)
            await served.until("server.draining")
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{served.port}/readyz") as resp,
            ):
                assert resp.status == 503  # still listening, and saying it drains
            assert (await delivery).status == 200
            await served.until("sideband.attached")
            code = await served.exited(timeout=4 * drain)
            elapsed = loop.time() - started
        finally:
            if delivery is not None and not delivery.done():
                delivery.cancel()
        await served.rest()
    assert code == 0
    ended = [e for e in served.lines if e.get("event") == "call.ended"]
    assert [e["reason"] for e in ended] == ["shutdown"] and ended[0]["call_id"] == late.call_id
    assert drain <= elapsed < drain + 3, f"exited {elapsed:.2f}s after SIGTERM (drain window {drain}s)"


async def test_a_log_whose_reader_is_gone_fails_no_call_and_no_exit(simulator: Simulator) -> None:
    """``sideband serve | head``, or a log collector that died: calls are answered and run as before,
    their lines dropped, and the process drains and exits 0, saying once on stderr that lines are lost."""
    read, write = os.pipe()
    proc = await start_serve(0, serve_env(simulator, SIDEBAND_DRAIN_TIMEOUT="5"), stdout=write)
    os.close(write)
    try:
        with open(read, "rb") as log:  # (closed, the reader is gone)
            started = json.loads(await asyncio.to_thread(log.readline))
        assert started["event"] == "server.started", started
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
        base = f"http://127.0.0.1:{started['port']}"
        sender = simulator.webhook_sender(f"{base}/webhooks/openai")
        assert (await sender.deliver(simulator.incoming_event(call))).status == 200
        await call.wait_done(timeout=10)
        outputs = [e for e in call.received if e["type"] == "conversation.item.create"]
        assert outputs[0]["item"]["output"] == "closed"  # the tool ran, its output went out
        ended = 'sideband_calls_ended_total{reason="remote_closed"} 1'
        async with aiohttp.ClientSession() as http:  # the call's end was run through, not cut short
            for _ in range(100):
                async with http.get(f"{base}/metrics") as resp:
                    if ended in await resp.text():
                        break
            else:
                raise AssertionError("the call never ended at the server")
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 15)
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
    finally:
        await reap(proc)
    assert code == 0, err
    assert err == "sideband: log lines are dropped: Broken pipe\n"


async def console_until(
    stream: asyncio.StreamReader, event: str, seen: list[str], timeout: float = 20
) -> str:
    """Read console log lines (``SIDEBAND_LOG_FORMAT=console``) into ``seen`` up to one of ``event``."""
    async with asyncio.timeout(timeout):
        while True:
            raw = await stream.readline()
            assert raw, f"server exited before logging {event}; saw {seen}"
            seen.append(raw.decode("ascii").rstrip("\n"))  # (any other byte fails the test)
            if f" {event} " in seen[-1]:
                return seen[-1]


async def test_a_console_log_that_cannot_encode_a_callers_words_fails_no_call(simulator: Simulator) -> None:
    """``SIDEBAND_LOG_FORMAT=console`` on a stdout that is not UTF-8 (an ASCII locale, a cp1252 redirect):
    a caller saying "José" is logged escaped, and the call goes on as any other."""
    env = {
        **serve_env(simulator, PYTHONIOENCODING="ascii", SIDEBAND_DRAIN_TIMEOUT="5"),
        "SIDEBAND_LOG_FORMAT": "console",
    }
    proc = await start_serve(0, env)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        seen: list[str] = []
        started = await console_until(proc.stdout, "server.started", seen)
        port = re.search(r" port=(\d+)", started)
        assert port, started
        call = simulator.create_call(
            Script(
                [
                    wait_for_greeting("Hello"),
                    caller_says("Hola, soy José → cuenta 42"),
                    model_says("Hola José, ¿qué tal?"),
                    caller_hangs_up(),
                ]
            )
        )
        sender = simulator.webhook_sender(f"http://127.0.0.1:{port.group(1)}/webhooks/openai")
        assert (await sender.deliver(simulator.incoming_event(call))).status == 200
        await call.wait_done(timeout=10)
        ended = await console_until(proc.stdout, "call.ended", seen)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 15)
        err = (await proc.stderr.read()).decode()
    finally:
        await reap(proc)
    assert code == 0, err
    assert call.script_error is None and "reason=remote_closed" in ended, seen
    assert not [line for line in seen if "call.crashed" in line]
    transcript = [line for line in seen if " transcript " in line]
    assert any("Hola, soy Jos\\xe9 \\u2192 cuenta 42" in line for line in transcript), transcript
    assert "Traceback" not in err


@pytest.mark.parametrize("encoding", ["ascii", "cp1252"])
def test_demo_on_a_stdout_that_cannot_encode_its_arrows_escapes_them(encoding: str) -> None:
    """``sideband demo > out.txt`` on Windows (cp1252), or on an ASCII locale: the story is all there, with
    what the encoding cannot hold escaped."""
    proc = subprocess.run(
        [sys.executable, "-m", "sideband.cli", "demo", "--calls", "1"],
        env=clean_env(PYTHONIOENCODING=encoding),
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    out, err = proc.stdout.decode(encoding), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "lookup_order \\u2192 ok" in out and "0 failed." in out
    assert err == ""


@pytest.mark.parametrize(
    ("encoding", "written"),
    [("ascii", "Jo\\xe3o \\u2192 ok"), ("cp437", "Jo\\xe3o \\u2192 ok"), ("koi8_r", "Jo\\xe3o \\u2192 ok")],
)
def test_a_commands_output_escapes_what_its_streams_code_page_cannot_hold(
    encoding: str, written: str
) -> None:
    """An 8-bit code page (cp437, KOI8-R) calls itself ``charmap`` in its errors: the escaping goes by the
    stream's own encoding, and the line is written whole."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding=encoding)
    out = _UntilReaderGone(stream)
    out.write("João → ok\n")
    out.flush()
    assert raw.getvalue().decode(encoding) == written + "\n"


async def test_dial_on_a_stdout_that_cannot_encode_the_turns_escapes_them(vowel: VowelSimulator) -> None:
    vowel.script([when("1042", calls=[("lookup_order", {"order_id": "1042"})], reply="Order 1042: café.")])
    code, out, err = await dial(vowel, "--say", "¿Dónde está 1042?", PYTHONIOENCODING="ascii")
    assert code == 0, err
    lines = out.splitlines()
    assert "you: \\xbfD\\xf3nde est\\xe1 1042?" in lines and "agent: Order 1042: caf\\xe9." in lines
    assert any(line.startswith("tool: lookup_order \\u2192 ok ") for line in lines), lines


@pytest.mark.parametrize("drain", ["0", "0.5"])
async def test_a_webhook_whose_accept_is_out_when_the_window_ends_leaves_no_call_up(
    simulator: Simulator, drain: str
) -> None:
    """The window ends while a webhook's accept is out (it went through, its answer is slow): the request
    is cut short a second later, the answer is not. The call is attached, then hung up, and the process
    exits."""
    env = serve_env(
        simulator, SIDEBAND_DRAIN_TIMEOUT=drain, SIDEBAND_ACCEPT_TIMEOUT="3", SIDEBAND_ACCEPT_BUDGET="6"
    )
    delivery: asyncio.Task[DeliveryResult] | None = None
    async with serving(env) as served:
        try:
            sender = simulator.webhook_sender(served.url)
            call = simulator.create_call(Script([pause(60)]))
            simulator.fail_accept(call.call_id, "late")  # carried out, its answer held (3 s here)
            delivery = asyncio.create_task(sender.deliver(simulator.incoming_event(call), max_attempts=1))
            accept_path = f"/v1/realtime/calls/{call.call_id}/accept"
            await simulator.wait_for(
                lambda sim: any(r.path == accept_path for r in sim.requests), timeout=10, what="accept"
            )
            served.proc.send_signal(signal.SIGTERM)
            code = await served.exited(timeout=20)
            await asyncio.gather(delivery, return_exceptions=True)  # (no answer: the request was cut short)
        finally:
            if delivery is not None and not delivery.done():
                delivery.cancel()
        err = await served.rest()
    assert code == 0, err
    assert call.status == "ended"
    assert [r.path for r in simulator.requests if r.path.endswith("/hangup")] == [
        f"/v1/realtime/calls/{call.call_id}/hangup"
    ]
    events = [e.get("event") for e in served.lines]
    assert "webhook.unanswered" in events and "server.tasks_abandoned" not in events, events
    ended = [e for e in served.lines if e.get("event") == "call.ended"]
    assert [(e["call_id"], e["reason"]) for e in ended] == [(call.call_id, "shutdown")]


def in_a_removed_directory(tmp_path: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """``command`` run from the shell's directory removed under it."""
    gone = tmp_path / "gone"
    gone.mkdir()
    in_it = ["/bin/sh", "-c", 'cd "$0" && rmdir "$0" && exec "$@"', str(gone)]
    return subprocess.run(
        [*in_it, *command],
        env=clean_env(OPENAI_API_KEY="sk-test", OPENAI_WEBHOOK_SECRET=SECRET),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("command", ["check", "serve"])
def test_a_start_from_a_removed_directory_is_one_line(tmp_path: Path, command: str) -> None:
    """The shell's directory removed under it: where the app would be imported from is gone."""
    done = in_a_removed_directory(tmp_path, sys.executable, "-m", "sideband.cli", command, "app:app")
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr == (
        "sideband: the current directory cannot be read (no such file or directory): start sideband from "
        "one that can\n"
    )


@pytest.mark.parametrize("args", [("check",), ("demo", "sideband.examples.order_desk:app", "--calls", "1")])
def test_an_installed_app_starts_from_a_removed_directory(tmp_path: Path, args: tuple[str, ...]) -> None:
    """The shell's directory removed under it: an app installed as a module is imported all the same."""
    done = in_a_removed_directory(tmp_path, sys.executable, "-m", "sideband.cli", *args)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.endswith("sideband: ready to serve\n" if args == ("check",) else "\n"), done.stdout
    assert "cannot" not in done.stdout, done.stdout


@pytest.mark.parametrize(
    "source, spec, expected",
    [
        (
            "raise RuntimeError('no database')\n",
            "broken_app:app",
            "RuntimeError: no database (broken_app.py:1)",
        ),
        (
            "from sideband import Sideband\napp = Sideband()\n@app.tool\ndef gen():\n    yield 1\n",
            "broken_app:app",
            "a generator function cannot be a tool",
        ),
        (
            "def make():\n    return 1 / 0\n",
            "broken_app:make",
            "ZeroDivisionError: division by zero (broken_app.py:2)",
        ),
        ("app = (\n", "broken_app:app", "SyntaxError"),
        ("import json\njson.loads('{not json')\n", "broken_app:app", "(broken_app.py:2)"),  # not json's
        ("raise ValueError('first\\nsecond\\nthird')\n", "broken_app:app", "ValueError: first second third"),
        ("app = None\n", "broken_app:app", "broken_app:app is not a sideband.Sideband app"),
        ("async def make():\n    return None\n", "broken_app:make", "broken_app:make is an async function"),
    ],
)
def test_an_app_that_fails_to_load_is_one_line(tmp_path: Path, source: str, spec: str, expected: str) -> None:
    (tmp_path / "broken_app.py").write_text(source)
    env = clean_env(OPENAI_API_KEY="sk-test", OPENAI_WEBHOOK_SECRET=SECRET, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "sideband.cli", "serve", spec, "--port", "0"],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("sideband: ") and expected in done.stderr
    if "generator" in expected:
        assert "(broken_app.py:3)" in done.stderr  # the app's line, not sideband's own


def test_a_load_error_names_the_apps_line_when_the_app_lives_under_pythons_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Python installed in /usr (a distribution's) runs an app in /usr/src/app: the app's frame is
    still the one named, not dropped with the prefix as if it were the standard library's."""
    app_file = tmp_path / "usr" / "src" / "app" / "desk.py"
    app_file.parent.mkdir(parents=True)
    app_file.write_text("def connect():\n    raise RuntimeError('no database')\n")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "usr"))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "usr"))
    space: dict[str, Any] = {}
    exec(compile(app_file.read_text(), str(app_file), "exec"), space)  # (as the app's module runs)
    with pytest.raises(RuntimeError) as raised:
        space["connect"]()
    said = _raised(raised.value)
    assert said == f"RuntimeError: no database ({os.path.relpath(app_file)}:2)"


# ------------------------------------------------------------------------------------------ ./dev
FAKE_PYTHON = """#!/bin/sh
# python3 as Debian's and Ubuntu's: its pip refuses to install anything (PEP 668); no uv module unless
# FAKE_UV_MODULE is set; a virtualenv (unless FAKE_NO_VENV is set) whose pip installs the fake uv.
echo "python3 $*" >>"$FAKE_LOG"
[ "$1" = -m ] || exit 1
case "$2" in
    uv) [ -n "${FAKE_UV_MODULE:-}" ] || { echo "No module named uv" >&2; exit 1; }
        shift 2
        exec "$FAKE_BIN/uv" "$@" ;;
    pip) echo "error: externally-managed-environment" >&2; exit 1 ;;
    venv) if [ -n "${FAKE_NO_VENV:-}" ]; then
              mkdir -p "$3"
              echo "ensurepip is not available" >&2
              exit 1
          fi
          mkdir -p "$3/bin" && cp "$FAKE_BIN/venv-python" "$3/bin/python" ;;
    *) exit 1 ;;
esac
"""
FAKE_VENV_PYTHON = """#!/bin/sh
echo "venv-python $*" >>"$FAKE_LOG"
[ "$1 $2 $3" = "-m pip install" ] && cp "$FAKE_BIN/uv" "$(dirname "$0")/uv"
"""
FAKE_UV = """#!/bin/sh
echo "uv $* (in $PWD)" >>"$FAKE_LOG"
"""


@dataclass
class FakeMachine:
    """A copy of ``dev`` in ``checkout``, run from ``app`` with nothing on ``PATH`` but basic tools and a
    fake python3 (and uv, if asked): what ``dev`` ran, in order, is :meth:`ran`."""

    checkout: Path
    app: Path
    env: dict[str, str]

    def dev(self, *args: str) -> subprocess.CompletedProcess[str]:
        self.log.write_text("")
        return subprocess.run(
            [str(self.checkout / "dev"), *args],
            cwd=self.app,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    @property
    def log(self) -> Path:
        return Path(self.env["FAKE_LOG"])

    def ran(self) -> list[str]:
        return self.log.read_text().splitlines()


@pytest.fixture
def machine(tmp_path: Path) -> FakeMachine:
    checkout, app, fake, tools = (tmp_path.resolve() / name for name in ("checkout", "app", "fake", "tools"))
    for folder in (checkout, app, fake, tools):
        folder.mkdir()
    shutil.copy2(ROOT / "dev", checkout / "dev")
    for name, text in (("python3", FAKE_PYTHON), ("venv-python", FAKE_VENV_PYTHON), ("uv", FAKE_UV)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    for tool in ("cat", "cp", "dirname", "grep", "mkdir", "paste", "rm", "sed", "tr"):
        found = shutil.which(tool, path="/usr/bin:/bin")
        assert found, tool
        (tools / tool).symlink_to(found)
    (tools / "python3").symlink_to(fake / "python3")
    env = {
        "PATH": str(tools),
        "HOME": str(tmp_path),
        "FAKE_BIN": str(fake),
        "FAKE_LOG": str(tmp_path / "log"),
    }
    return FakeMachine(checkout, app, env)


def test_dev_installs_uv_into_a_virtualenv_of_its_own_where_pip_refuses(machine: FakeMachine) -> None:
    """A stock Debian or Ubuntu Python refuses ``pip install`` and ``pip install --user`` (PEP 668): uv
    goes into a git-ignored virtualenv in the checkout, made once."""
    bootstrap = machine.checkout / ".dev-uv"
    done = machine.dev("sideband", "serve", "myapp:app")
    assert done.returncode == 0, done.stderr
    ran = machine.ran()
    assert ran[:3] == [
        "python3 -m uv --version",
        "python3 -m pip install --quiet --disable-pip-version-check uv==0.13.8",
        "python3 -m pip install --quiet --disable-pip-version-check uv==0.13.8 --user",
    ]
    assert ran[3:6] == [
        f"python3 -m venv {bootstrap}",
        "venv-python -m pip install --quiet --disable-pip-version-check uv==0.13.8",
        "python3 -m uv --version",
    ]
    assert ran[6:] == [
        f"uv run --project {machine.checkout} --frozen sideband serve myapp:app (in {machine.app})"
    ]
    assert (bootstrap / ".gitignore").read_text() == "*\n"
    assert "externally-managed" not in done.stderr  # (pip's refusals are said only if nothing works)
    again = machine.dev("sideband", "--version")  # the same uv, nothing installed again
    assert again.returncode == 0, again.stderr
    assert machine.ran() == [
        "python3 -m uv --version",
        f"uv --version (in {machine.checkout})",
        f"uv run --project {machine.checkout} --frozen sideband --version (in {machine.app})",
    ]


@pytest.mark.parametrize("where", ["module", "path"])
def test_dev_takes_the_uv_there_is_first(machine: FakeMachine, where: str) -> None:
    """``python3 -m uv``, else ``uv`` on PATH, as before: nothing installed. A command runs from the
    caller's directory, ``test`` from the checkout."""
    if where == "module":
        machine.env["FAKE_UV_MODULE"] = "1"
    else:
        (Path(machine.env["PATH"]) / "uv").symlink_to(Path(machine.env["FAKE_BIN"]) / "uv")
    steps = (
        "sync --frozen --quiet",
        "run --frozen ruff check",
        "run --frozen mypy",
        "run --frozen pytest -x",
    )
    for args, runs in (
        (
            ("sideband", "--version"),
            [f"run --project {machine.checkout} --frozen sideband --version (in {machine.app})"],
        ),
        (("test", "-x"), [f"{step} (in {machine.checkout})" for step in steps]),
    ):
        done = machine.dev(*args)
        assert done.returncode == 0, done.stderr
        uv = [line.removeprefix("uv ") for line in machine.ran() if line.startswith("uv ")]
        assert uv == ([f"--version (in {machine.checkout})"] if where == "module" else []) + runs
        assert machine.ran()[0] == "python3 -m uv --version"
        assert not any("pip" in line or "venv" in line for line in machine.ran())
    assert not (machine.checkout / ".dev-uv").exists()


def test_dev_without_pip_or_virtualenv_names_what_to_install(machine: FakeMachine) -> None:
    machine.env["FAKE_NO_VENV"] = "1"
    done = machine.dev("demo")
    assert done.returncode == 1
    err = done.stderr.splitlines()
    assert "error: externally-managed-environment" in err and "ensurepip is not available" in err
    assert any("apt install python3-venv" in line for line in err), err
    assert "install uv (https://docs.astral.sh/uv/)" in err[-1]
    assert not (machine.checkout / ".dev-uv").exists()


def test_dev_demo_runs_from_the_callers_directory(machine: FakeMachine) -> None:
    """``path/to/dev demo myapp:app`` from the app's directory: the demo imports the app, and reads a
    relative ``SIDEBAND_ROUTES_FILE``, from there, as ``serve`` does."""
    machine.env["FAKE_UV_MODULE"] = "1"
    done = machine.dev("demo", "myapp:app", "--calls", "1")
    assert done.returncode == 0, done.stderr
    assert machine.ran()[-1] == (
        f"uv run --project {machine.checkout} --frozen sideband demo myapp:app --calls 1 (in {machine.app})"
    )
