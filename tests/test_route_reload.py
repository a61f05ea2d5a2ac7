"""Reloading the route file while serving (SIGHUP): new calls get the new table, live calls keep their
route, and a file that fails the start's checks changes nothing."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sideband.routing import RouteTable
from sideband.testing import Script, Simulator, pause, wait_for_greeting

from .conftest import Stack, capture_logs
from .test_cli import serve_env, serving
from .test_routing import write

BEFORE = """
[routes."+18005551212"]
instructions = "Billing desk."
max_idle_seconds = 1.5

[routes."+18005550000"]
reject = 486
"""

AFTER = """
[default]
instructions = "Front desk."

[routes."+18005551212"]
instructions = "Billing desk, new hours."
tools = ["lookup_order"]

[routes."+18005550000"]
refer = "tel:+14155550123"
"""


@pytest.fixture
def settings_overrides(tmp_path: Path) -> dict[str, Any]:
    return {"routes_file": write(tmp_path, BEFORE)}


async def metrics(stack: Stack, part: str = "route") -> dict[str, float]:
    """The samples of ``/metrics`` whose names contain ``part``, as ``name[outcome]``."""
    async with aiohttp.ClientSession() as http, http.get(stack.base_url + "/metrics") as resp:
        text = await resp.text()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if part in sample.name:
                outcome = sample.labels.get("outcome")
                samples[sample.name + (f"[{outcome}]" if outcome else "")] = sample.value
    return samples


async def test_a_reload_routes_new_calls_and_live_calls_keep_theirs(stack: Stack, tmp_path: Path) -> None:
    live = stack.sim.create_call(Script([wait_for_greeting("Hi.")]), to_number="+18005551212")
    assert (await stack.sender.deliver(stack.sim.incoming_event(live))).status == 200
    await live.wait_received("session.update", timeout=5)
    write(tmp_path, AFTER)
    with capture_logs() as logs:
        assert await stack.service.reload_routes() is True
    [reloaded] = [e for e in logs if e["event"] == "routes.reloaded"]
    assert reloaded["routes"] == 2 and reloaded["default"] is True
    assert reloaded["file"] == str(tmp_path / "routes.toml")
    billing = stack.sim.create_call(Script([wait_for_greeting("Hi.")]), to_number="+18005551212")
    referred = stack.sim.create_call(Script([]), to_number="+18005550000")
    front = stack.sim.create_call(Script([wait_for_greeting("Hi.")]), to_number="+18005557777")
    for call in (billing, referred, front):
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    assert billing.accept_body["instructions"] == "Billing desk, new hours."
    assert [t["name"] for t in billing.accept_body["tools"]] == ["lookup_order"]
    assert referred.status == "referred" and referred.refer_target == "tel:+14155550123"
    assert front.accept_body["instructions"] == "Front desk."
    # The live call keeps the route it was answered with: its 1.5 s idle limit (the new route has none,
    # the settings' is 30 s).
    assert live.end_reason is None
    await live.wait_ended(timeout=10)
    assert live.end_reason == "hangup_verb" and live.accept_body["instructions"] == "Billing desk."
    assert billing.status == "accepted" and billing.end_reason is None
    assert await metrics(stack) == {
        "sideband_route_reloads_total[failed]": 0,
        "sideband_route_reloads_total[ok]": 1,
        "sideband_routes_last_reload_successful": 1,
    }


BROKEN = [
    ('[routes."+18005551212"\ninstructions = "x"\n', "Expected ']'"),  # half written
    ('[routes."+18005551212"]\ntools = ["no_such_tool"]\n', "unknown tool no_such_tool"),
    (
        '[routes."+18005551212"]\nsession = { turn_detection = { type = "server_vad", threshold = 0.5 } }\n',
        "turn_detection.threshold",
    ),
    ('[routes."+18005551212"]\nrejectt = 486\n', "rejectt"),
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    (None, "cannot read"),  # the file is gone
]


@pytest.mark.parametrize("text, fragment", BROKEN)
async def test_a_file_that_fails_the_checks_leaves_the_table_in_force(
    stack: Stack, tmp_path: Path, text: str | None, fragment: str
) -> None:
    path = tmp_path / "routes.toml"
    in_force = stack.service.routes
    if text is None:
        path.unlink()
    else:
        path.write_text(text)
    with capture_logs() as logs:
        assert await stack.service.reload_routes() is False
    [failed] = [e for e in logs if e["event"] == "routes.reload_failed"]
    assert failed["log_level"] == "error" and failed["routes"] == 2 and failed["default"] is False
    error = failed["error"]
    assert str(path) in error and fragment in error and "\n" not in error, error
    assert stack.service.routes is in_force
    rejected = stack.sim.create_call(Script([]), to_number="+18005550000")
    assert (await stack.sender.deliver(stack.sim.incoming_event(rejected))).status == 200
    assert rejected.status == "rejected" and rejected.reject_body == {"status_code": 486}
    assert await metrics(stack) == {
        "sideband_route_reloads_total[failed]": 1,
        "sideband_route_reloads_total[ok]": 0,
        "sideband_routes_last_reload_successful": 0,
    }
    # Mended: in force, and the gauge says so again.
    path.write_text(AFTER)
    assert await stack.service.reload_routes() is True
    referred = stack.sim.create_call(Script([]), to_number="+18005550000")
    assert (await stack.sender.deliver(stack.sim.incoming_event(referred))).status == 200
    assert referred.status == "referred"
    assert await metrics(stack) == {
        "sideband_route_reloads_total[failed]": 1,
        "sideband_route_reloads_total[ok]": 1,
        "sideband_routes_last_reload_successful": 1,
    }


async def test_reloads_run_one_at_a_time_so_a_slow_stale_one_cannot_win(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first reload that read the file and is slow to finish must not put its (stale) table in force
    after a second one that read the newer file."""
    read, go = threading.Event(), threading.Event()
    load, loads = RouteTable.load, 0

    def slow_first(path: Path, names: Any = None) -> RouteTable:
        nonlocal loads
        loads += 1
        table = load(path, names)
        if loads == 1:
            read.set()
            go.wait(5)
        return table

    monkeypatch.setattr(RouteTable, "load", staticmethod(slow_first))
    write(tmp_path, AFTER)
    first = asyncio.ensure_future(stack.service.reload_routes())
    assert await asyncio.to_thread(read.wait, 5)
    write(tmp_path, BEFORE)
    second = asyncio.ensure_future(stack.service.reload_routes())
    done, _ = await asyncio.wait({second}, timeout=0.3)
    assert not done, "the second reload did not wait for the first"
    go.set()
    assert await asyncio.wait_for(asyncio.gather(first, second), 5) == [True, True]
    rejected = stack.sim.create_call(Script([]), to_number="+18005550000")
    assert (await stack.sender.deliver(stack.sim.incoming_event(rejected))).status == 200
    assert rejected.status == "rejected"


async def test_a_read_that_stalls_fails_the_reload_and_the_next_one_runs(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's volume stops answering (a stalled network mount) while a reload reads it: at the read's
    timeout that reload fails (``routes.reload_failed``, counted), and the next reload runs. What the
    stalled read returns later is dropped."""
    monkeypatch.setattr("sideband.service.ROUTES_READ_TIMEOUT", 0.3)
    stale = tmp_path / "stale.toml"
    stale.write_text('[routes."+18005550000"]\nreject = 603\n')
    let_go, load = threading.Event(), RouteTable.load
    stalled: list[threading.Thread] = []

    def stalling_once(path: Path, names: Any = None) -> RouteTable:
        if stalled:
            return load(path, names)
        stalled.append(threading.current_thread())
        let_go.wait(10)
        return load(stale, names)

    monkeypatch.setattr(RouteTable, "load", staticmethod(stalling_once))
    path = write(tmp_path, AFTER)
    try:
        with capture_logs() as logs:
            assert await asyncio.wait_for(stack.service.reload_routes(), 5) is False
        [failed] = [e for e in logs if e["event"].startswith("routes.")]
        assert failed["event"] == "routes.reload_failed" and failed["log_level"] == "error"
        assert failed["error"] == f"{path}: timed out reading it (0.3 s)"
        assert await metrics(stack) == {
            "sideband_route_reloads_total[failed]": 1,
            "sideband_route_reloads_total[ok]": 0,
            "sideband_routes_last_reload_successful": 0,
        }
        assert await asyncio.wait_for(stack.service.reload_routes(), 5) is True
        in_force = stack.service.routes
    finally:
        let_go.set()
    await asyncio.to_thread(stalled[0].join, 5)  # the stalled read returns, and hands its table back
    await asyncio.sleep(0)  # (to the loop, where it is dropped)
    assert stack.service.routes is in_force
    referred = stack.sim.create_call(Script([]), to_number="+18005550000")
    assert (await stack.sender.deliver(stack.sim.incoming_event(referred))).status == 200
    assert referred.status == "referred"
    assert (await metrics(stack))["sideband_routes_last_reload_successful"] == 1


async def test_without_a_route_file_a_reload_says_there_is_nothing_to_reload(simulator: Simulator) -> None:
    """A SIGHUP where no route file is set fails nothing: one info line, and the reload metrics stay
    as they were (0 for the last reload would read as a file refused)."""
    from sideband.testing import run_app

    from .conftest import TEST_SETTINGS, make_app

    async with run_app(make_app(), simulator, **TEST_SETTINGS) as h:
        with capture_logs() as logs:
            assert await h.service.reload_routes() is False
        assert h.service.routes_reload_ok is True
        assert h.service.route_reloads == {"ok": 0, "failed": 0}
    [skipped] = [e for e in logs if e["event"].startswith("routes.")]
    assert skipped["event"] == "routes.reload_skipped" and skipped["log_level"] == "info"
    assert skipped["reason"] == "SIDEBAND_ROUTES_FILE is not set"


async def test_sighup_reloads_the_route_file_of_a_serving_process(
    simulator: Simulator, tmp_path: Path
) -> None:
    path = write(tmp_path, '[routes."+18005550000"]\nreject = 486\n')
    async with serving(serve_env(simulator, SIDEBAND_ROUTES_FILE=str(path))) as served:
        sender = simulator.webhook_sender(served.url)

        async def ring() -> str:
            call = simulator.create_call(Script([]), to_number="+18005550000")
            assert (await sender.deliver(simulator.incoming_event(call))).status == 200
            return call.status

        assert await ring() == "rejected"
        path.write_text('[routes."+18005550000"]\nreject = 486\ntools = ["opening_hours"]\n')  # refused
        served.proc.send_signal(signal.SIGHUP)
        failed = await served.until("routes.reload_failed")
        assert failed["level"] == "error" and "reject" in str(failed["error"])
        assert await ring() == "rejected"  # still serving, the old table
        path.write_text('[routes."+18005550000"]\nrefer = "tel:+14155550123"\n')
        served.proc.send_signal(signal.SIGHUP)
        reloaded = await served.until("routes.reloaded")
        assert reloaded["routes"] == 1 and reloaded["file"] == str(path)
        assert await ring() == "referred"
        code = await served.stop()
        err = await served.rest()
    assert code == 0, err
    assert "Traceback" not in err


async def test_a_sighup_while_draining_reloads_nothing_and_the_exit_stays_clean(
    simulator: Simulator, tmp_path: Path
) -> None:
    path = write(tmp_path, '[routes."+18005550000"]\nreject = 486\n')
    env = serve_env(simulator, SIDEBAND_ROUTES_FILE=str(path), SIDEBAND_DRAIN_TIMEOUT="1")
    async with serving(env) as served:
        call = simulator.create_call(Script([wait_for_greeting("Hi."), pause(10)]))
        sender = simulator.webhook_sender(served.url)
        assert (await sender.deliver(simulator.incoming_event(call))).status == 200
        await call.wait_received("session.update", timeout=5)
        served.proc.send_signal(signal.SIGTERM)
        await served.until("server.draining")
        for _ in range(3):
            served.proc.send_signal(signal.SIGHUP)
        await served.until("server.stopped")
        code = await served.exited()
        err = await served.rest()  # (a line that is not JSON, a traceback say, fails it)
    assert code == 0, err
    assert "Traceback" not in err
    assert not [line for line in served.lines if str(line.get("event", "")).startswith("routes.")]


async def test_a_reload_stuck_on_its_file_does_not_hold_up_the_exit(
    simulator: Simulator, tmp_path: Path
) -> None:
    path = write(tmp_path, '[routes."+18005550000"]\nreject = 486\n')
    env = serve_env(simulator, SIDEBAND_ROUTES_FILE=str(path), SIDEBAND_DRAIN_TIMEOUT="1")
    writer: int | None = None
    async with serving(env) as served:
        try:
            path.unlink()
            os.mkfifo(path)  # the file's volume stops answering (a stalled network mount): its read blocks
            served.proc.send_signal(signal.SIGHUP)
            deadline = asyncio.get_running_loop().time() + 10
            while writer is None:  # the reload has the file open once a writer can open it without waiting
                try:
                    writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError as exc:
                    assert exc.errno == errno.ENXIO and asyncio.get_running_loop().time() < deadline, exc
                    await asyncio.sleep(0.02)
            # (the writer stays open and writes nothing: the reload's read waits on)
            served.proc.send_signal(signal.SIGTERM)
            await served.until("server.stopped")
            code = await served.exited(10)
        finally:
            if writer is not None:
                os.close(writer)
    assert code == 0
