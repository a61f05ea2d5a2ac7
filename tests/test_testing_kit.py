"""The testing kit an app's own tests use: ``run_app``, its ``Harness``, and the README's examples of it."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import logging
import re
import sys
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from sideband import Accept, CallContext, IncomingCall, Refer, Reject, Sideband
from sideband.testing import (
    Script,
    SimCall,
    Simulator,
    caller_hangs_up,
    caller_says,
    harness,
    model_calls,
    model_says,
    pause,
    pytest_plugin,
    run_app,
    wait_for_greeting,
)
from sideband.testing.vowel import VowelSimulator

from .conftest import TEST_SETTINGS, Stack, capture_logs

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.DOTALL)


def load_module(name: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Import ``path`` as module ``name``, registered in ``sys.modules`` for this test only."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


async def test_the_readmes_testing_examples_pass_against_its_quickstart_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's tests of an app, run as written against the Quickstart's ``myapp.py``."""
    readme = README.read_text()
    [myapp] = [block for block in python_blocks(readme) if block.startswith("# myapp.py\n")]
    (tmp_path / "myapp.py").write_text(myapp)
    section = readme[
        readme.index("## Testing your own tools") : readme.index("\n## ", readme.index("## Testing"))
    ]
    examples = [block for block in python_blocks(section) if "async def test_" in block]
    assert len(examples) == 3, examples
    (tmp_path / "readme_examples.py").write_text("\n\n".join(examples))
    load_module("myapp", tmp_path / "myapp.py", monkeypatch)
    module = load_module("readme_examples", tmp_path / "readme_examples.py", monkeypatch)
    tests = [
        f for name, f in vars(module).items() if name.startswith("test_") and inspect.iscoroutinefunction(f)
    ]
    assert len(tests) == 3
    for test in tests:
        await test()


async def test_ended_says_a_call_was_rejected_at_ring_time_and_with_what(stack: Stack) -> None:
    @stack.app.on_incoming
    def route(call: IncomingCall) -> Reject:
        return Reject(status_code=486)

    call = await stack.call(Script([caller_hangs_up()]))
    with pytest.raises(AssertionError) as failed:
        await stack.ended(call, timeout=5)
    message = str(failed.value)
    assert f"call {call.call_id} never ran on the server" in message
    assert "rejected at ring time with SIP 486 (reject body {'status_code': 486})" in message
    assert "route failure status" not in message  # a deliberate reject


async def test_ended_points_at_the_routing_hook_when_the_call_was_rejected_with_the_failure_status(
    stack: Stack,
) -> None:
    @stack.app.on_incoming
    def route(call: IncomingCall) -> Accept:
        raise RuntimeError("the routing database is down")

    call = await stack.call(Script())
    with pytest.raises(AssertionError) as failed:
        await stack.ended(call, timeout=5)
    message = str(failed.value)
    assert "rejected at ring time with SIP 480" in message
    assert "480 is the route failure status: the routing hook raised, overran its budget" in message
    assert "(call.route_failed in the log)" in message and "config_invalid" not in message, message


async def test_ended_says_openai_refused_the_accept_of_a_call_rejected_with_the_failure_status(
    simulator: Simulator,
) -> None:
    """OpenAI refuses the accept (a voice it does not have): the server rejects the call with the route
    failure status instead, and ``h.ended`` says so, not that the routing hook failed."""
    app = Sideband(instructions="desk", voice="nonexistent-voice-zzz")
    async with run_app(app, simulator, **TEST_SETTINGS) as h:
        call = await h.call(Script())
        with pytest.raises(AssertionError) as failed:
            await h.ended(call, timeout=5)
    message = str(failed.value)
    assert "rejected at ring time with SIP 480" in message
    assert "OpenAI refused its accept (400), so the server rejected the call" in message, message
    assert "call.accept_failed in the log" in message and "routing hook" not in message, message


async def test_ended_says_openai_refused_the_refer_of_a_call_rejected_with_the_failure_status(
    stack: Stack,
) -> None:
    @stack.app.on_incoming
    def route(call: IncomingCall) -> Refer:
        stack.sim.fail_verb(call.call_id, "refer", 403)
        return Refer("tel:+14155550123")

    call = await stack.call(Script())
    with pytest.raises(AssertionError) as failed:
        await stack.ended(call, timeout=5)
    message = str(failed.value)
    assert "OpenAI refused its refer (403), so the server rejected the call" in message, message
    assert "call.answer_failed in the log" in message and "routing hook" not in message, message


async def test_ended_says_the_session_config_of_a_call_rejected_with_the_failure_status_is_invalid(
    stack: Stack,
) -> None:
    @stack.app.on_incoming
    def route(call: IncomingCall) -> Accept:
        return Accept(tools=("no_such_tool",))

    call = await stack.call(Script())
    with pytest.raises(AssertionError) as failed:
        await stack.ended(call, timeout=5)
    message = str(failed.value)
    assert "480 is the route failure status: the session config it was accepted with is invalid" in message
    assert "(call.config_invalid in the log)" in message and "routing hook" not in message, message


async def test_ended_takes_a_reject_with_the_failure_status_as_the_apps_own(stack: Stack) -> None:
    @stack.app.on_incoming
    def route(call: IncomingCall) -> Reject:
        return Reject(status_code=480)

    call = await stack.call(Script())
    with pytest.raises(AssertionError) as failed:
        await stack.ended(call, timeout=5)
    message = str(failed.value)
    assert "rejected at ring time with SIP 480" in message
    assert "no failure was counted for it: the decision for the call was that reject" in message, message
    assert "route_failed" not in message and "config_invalid" not in message, message


async def test_ended_says_a_call_was_transferred_at_ring_time_and_where(stack: Stack) -> None:
    @stack.app.on_incoming
    def route(call: IncomingCall) -> Refer:
        return Refer("tel:+14155550123")

    call = await stack.call(Script())
    with pytest.raises(AssertionError) as failed:
        await stack.ended(call, timeout=5)
    assert "transferred at ring time to tel:+14155550123" in str(failed.value)


def log_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


async def test_run_app_logs_the_run_at_the_level_it_is_given_then_puts_logging_back(
    app: Sideband, capsys: pytest.CaptureFixture[str]
) -> None:
    structlog_config = structlog.get_config()
    libraries = [logging.getLogger(name) for name in ("aiohttp", "asyncio", "websockets")]
    library_setup = [(list(lg.handlers), lg.propagate) for lg in libraries]
    script = Script([wait_for_greeting(), caller_says("Hello?"), model_says("Hi."), caller_hangs_up()])
    capsys.readouterr()
    for level in ("debug", "info"):
        async with run_app(app, log_level=level, log_format="json") as h:
            await h.ended(await h.call(script))
        lines = log_lines(capsys.readouterr().out)
        assert ("call.accepted", "info") in {(line["event"], line["level"]) for line in lines}
        debug = [line["event"] for line in lines if line["level"] == "debug"]
        assert ("response.done" in debug) == (level == "debug"), debug
        assert structlog.get_config() == structlog_config
        assert [(list(lg.handlers), lg.propagate) for lg in libraries] == library_setup


async def test_an_incomplete_tool_response_runs_the_calls_written_whole(stack: Stack) -> None:
    """``model_calls(..., status="incomplete")``: the calls were written whole, so the app runs them and
    the step gets its output; ``arguments_cut=True`` cuts the last call's arguments, which the app must
    not run (``tool.discarded``), and the step waits for no output."""
    whole = await stack.call(
        Script(
            [
                caller_says("Where is order 42?"),
                model_calls("lookup_order", {"order_id": "42"}, call_id="call_42", status="incomplete"),
                model_says("It shipped."),
                caller_hangs_up(),
            ],
            step_timeout=3,
        )
    )
    await whole.wait_done(timeout=5)
    summary = await stack.ended(whole)
    assert [(t.name, t.outcome) for t in summary.tools] == [("lookup_order", "ok")]
    assert json.loads(whole.output_for("call_42") or "null") == {"order_id": "42", "status": "shipped"}

    with capture_logs() as logs:
        cut = await stack.call(
            Script(
                [
                    caller_says("Where is order 42?"),
                    model_calls("lookup_order", {"order_id": "42"}, status="incomplete", arguments_cut=True),
                    caller_hangs_up(),
                ],
                step_timeout=3,
            )
        )
        await cut.wait_done(timeout=5)
        summary = await stack.ended(cut)
    assert summary.tools == [] and cut.function_outputs == []
    discarded = [e for e in logs if e["event"] == "tool.discarded"]
    assert [(e["tool"], e["reason"]) for e in discarded] == [("lookup_order", "arguments_cut")]


async def test_call_checks_every_webhook_attempt_and_keeps_the_delivery(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 500 on the first attempt hidden by a 200 on the retry fails ``expect_status=200``; the
    delivery, attempt by attempt, is on the call."""
    call = await stack.call(Script([caller_hangs_up()]))
    assert call.webhook_delivery is not None and call.webhook_delivery.attempts == [200]
    await stack.ended(call)

    post_raw = stack.sender.post_raw
    failing = [(500, b'{"error": "internal"}')]  # the first attempt's answer, then the server's own

    async def flaky(body: bytes, headers: Mapping[str, str], *, timeout: float = 5.0) -> tuple[int, bytes]:
        return failing.pop() if failing else await post_raw(body, headers, timeout=timeout)

    monkeypatch.setattr(stack.sender, "post_raw", flaky)
    with pytest.raises(
        AssertionError, match=r"webhook answered 500, then 200, expected 200 on every attempt"
    ):
        await stack.call(Script([caller_hangs_up()]))
    [retried] = [c for c in stack.sim.calls.values() if c is not call]
    assert retried.webhook_delivery is not None and retried.webhook_delivery.attempts == [500, 200]
    await stack.ended(retried)


async def test_ended_finds_a_call_however_many_ended_since(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server keeps the summaries of its last few calls only (``registry.RECENT``); the harness keeps
    those of the calls ``h.call`` placed. A call placed otherwise, gone from the server's record, is
    not said to have never run."""
    monkeypatch.setattr(stack.service.registry, "RECENT", 1)
    first = await stack.call(Script([caller_says("Hello?"), caller_hangs_up()]))
    summary = await stack.ended(first)
    other = await stack.sim.place_call(stack.webhook_url, Script([caller_hangs_up()]))
    await stack.ended(other)
    for _ in range(2):
        await stack.ended(await stack.call(Script([caller_hangs_up()])))
    assert first.call_id not in stack.service.registry.recent
    assert await stack.ended(first) is summary and summary.call_id == first.call_id
    with pytest.raises(AssertionError) as failed:
        await stack.ended(other)
    message = str(failed.value)
    assert "the server keeps only its last 1 calls'" in message and "never ran on the server" not in message


async def test_ended_fails_when_the_call_ended_before_its_script_did() -> None:
    """A call the app ended while its script still had steps to play (here: hung up for the caller's
    silence during a pause) is no pass: ``h.ended`` raises, naming the step the script broke at.
    ``check_script=False`` is for a test that expects it, and returns the summary."""
    app = Sideband(instructions="desk", voice="marin", greeting="Order desk, how can I help?")
    script = Script(
        [
            wait_for_greeting("Order desk, how can I help?"),
            pause(2.0),
            caller_says("Where is order 42?"),
            model_says("It shipped yesterday."),
            caller_hangs_up(),
        ]
    )
    async with run_app(app, max_idle_duration=0.3) as h:
        broken = await h.call(script)
        with pytest.raises(AssertionError) as failed:
            await h.ended(broken)
        expected = await h.call(script)
        summary = await h.ended(expected, check_script=False)
    message = str(failed.value)
    assert f"call {broken.call_id} ended (idle_timeout), but its script broke" in message
    assert "the call ended (hangup_verb) at step 1 pause(2.0)" in message and "check_script=False" in message
    assert summary.reason == "idle_timeout" and expected.script_error is not None
    assert not broken.sent_of_type("input_audio_buffer.speech_started")  # (the caller never spoke)


async def test_ended_says_a_silent_hangup_is_noticed_by_the_idle_limit_whose_goodbye_waits() -> None:
    """A caller who hangs up with nothing on the sideband: the simulator's call has ended, the server's
    not yet (its idle limit notices, then its goodbye waits, unanswered, up to the end cap): the
    timeout says so, and what timeout the test needs."""
    app = Sideband(instructions="desk", voice="marin", greeting="Order desk.")
    script = Script([wait_for_greeting("Order desk."), caller_hangs_up("silent")])
    async with run_app(app, max_idle_duration=0.3) as h:
        call = await h.call(script)
        await call.wait_ended(timeout=5)
        with pytest.raises(TimeoutError) as failed:
            await h.ended(call, timeout=0.5)
    message = str(failed.value)
    assert f"call {call.call_id} did not end within 0.5 s" in message, message
    assert "the simulator's call has ended (caller_hangup), the server's not yet" in message, message
    assert 'caller_hangs_up("silent")' in message and "idle limit (0.3 s)" in message, message
    assert "a timeout above 10.3 s" in message, message


async def test_ended_says_a_silent_hangup_during_a_transfer_waits_out_the_transfer_window() -> None:
    """A caller who hangs up with nothing on the sideband while a transfer answered 200 is under way:
    the server cannot tell it from the transfer still going on, and waits out the transfer's window.
    The timeout says so (not the idle limit, which a transfer awaited does not run)."""
    app = Sideband(
        instructions="desk", voice="marin", greeting="Hello.", transfer_targets={"human": "tel:+14155550123"}
    )

    @app.tool(filler_after=None)
    async def to_human(ctx: CallContext) -> str:
        await ctx.transfer("human")
        return "transferring"

    script = Script(
        [
            wait_for_greeting("Hello."),
            caller_says("A human, please."),
            model_calls("to_human", {}),
            model_says("One moment."),
            pause(60.0),  # (the caller hangs up below, silently, before this is over)
            caller_hangs_up("silent"),
        ]
    )
    async with run_app(app) as h:
        h.sim.transfer_delay = 60.0  # (the carrier's transfer would take after the caller left)
        call = await h.call(script)
        await h.sim.wait_for(
            lambda s: any(r.path.endswith("/refer") and r.status == 200 for r in s.requests),
            timeout=10,
            what="the REFER's 200",
        )
        async with asyncio.timeout(5):
            while not h.service.registry.calls[call.call_id].machine.transferring:
                await asyncio.sleep(0.01)
        await h.sim.hang_up(call, "silent")
        with pytest.raises(TimeoutError) as failed:
            await h.ended(call, timeout=0.5, check_script=False)
    message = str(failed.value)
    assert "the simulator's call has ended (caller_hangup), the server's not yet" in message, message
    assert "transfer window (45 s from the REFER's 200)" in message and "as transferred" in message, message
    assert "a timeout above 45 s" in message and "idle limit" not in message, message


def test_a_script_copies_and_pickles_as_the_immutable_value_it_is() -> None:
    """``copy``/``deepcopy`` give the script itself (nothing in it can change); a pickled one comes back
    with the same steps and options; so does an object holding one."""
    import copy
    import pickle
    from dataclasses import dataclass

    from sideband.testing import caller_presses, model_answers, model_fails, model_says_first

    script = Script(
        [
            wait_for_greeting("Hi."),
            caller_says("Order 42?", seconds=0.5, cut_in=True),
            model_calls([("lookup", {"id": "42"}), ("audit", "{")], preamble="One moment."),
            model_calls("lookup", {"id": 1}, status="incomplete", arguments_cut=True),
            model_answers("Shipped."),
            model_says_first("Hello?"),
            model_fails(),
            caller_presses("12#"),
            pause(0.25),
            caller_hangs_up("silent"),
        ],
        step_timeout=2.5,
        hang_up_at_end=True,
    )
    assert copy.copy(script) is script and copy.deepcopy(script) is script

    @dataclass
    class Case:
        name: str
        script: Script

    case = Case("lookup", script)
    assert copy.deepcopy(case).script is script
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        back = pickle.loads(pickle.dumps(script, protocol))
        assert isinstance(back, Script) and back is not script
        assert (back.steps, back.step_timeout, back.hang_up_at_end) == (script.steps, 2.5, True)
        assert repr(back) == repr(script)
    with pytest.raises(AttributeError, match="Script is immutable"):
        script.step_timeout = 1.0  # type: ignore[misc]


async def test_run_app_closes_its_webhook_sender_on_a_simulator_that_outlives_it(
    simulator: Simulator, app: Sideband
) -> None:
    """Each run on a simulator of the test's own leaves no HTTP session open behind it, and the
    simulator keeps none of the runs' senders."""
    for _ in range(2):
        async with run_app(app, simulator, **TEST_SETTINGS) as h:
            await h.ended(await h.call(Script([caller_hangs_up()])))
            session = h.sender._session
            assert session is not None and not session.closed
        assert session.closed
        assert h.sender not in simulator._senders
        with pytest.raises(RuntimeError, match="WebhookSender is closed"):
            await h.sender.deliver(simulator.incoming_event(simulator.create_call(Script())))


@pytest.mark.asyncio(loop_scope="module")
async def test_a_simulator_on_another_event_loop_than_the_test_is_refused_at_once(
    simulator: Simulator, app: Sideband
) -> None:
    """The ``simulator`` fixture runs on the default fixture loop (function scope here), this test on its
    module's: the simulator's loop is not running while the test is, so it could answer nothing.
    ``run_app``, ``create_call`` and ``place_call`` say so at once, naming the cure."""
    calls = dict(simulator.calls)
    with pytest.raises(
        RuntimeError, match="the simulator runs on another event loop than this test"
    ) as failed:
        async with run_app(app, simulator, **TEST_SETTINGS):
            pytest.fail("run_app served a simulator whose event loop is not running")
    assert "the same loop scope" in str(failed.value)
    with pytest.raises(RuntimeError, match="another event loop"):
        simulator.create_call(Script([caller_hangs_up()]))
    with pytest.raises(RuntimeError, match="another event loop"):
        await simulator.place_call("http://127.0.0.1:9/webhooks/openai", Script([caller_hangs_up()]))
    assert simulator.calls == calls  # (no call was registered)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_vowel_simulator_on_another_event_loop_than_the_test_is_refused_at_once(
    vowel: VowelSimulator,
) -> None:
    """As the OpenAI simulator: the engine simulator's settings and waits say at once that its loop is
    not the test's (an engine session would never be answered)."""
    with pytest.raises(RuntimeError, match="the simulator runs on another event loop than this test"):
        vowel.settings_values()
    with pytest.raises(RuntimeError, match="another event loop"):
        await vowel.wait_session(timeout=30)


async def test_a_call_placed_with_anything_but_a_script_is_refused_at_once(stack: Stack) -> None:
    """A list of steps is no script: ``h.call``, ``create_call``, ``place_call`` and ``create_webrtc_call``
    raise ``TypeError`` before any call is registered or webhook sent (the simulator would crash on it
    once the call is accepted)."""
    steps = [caller_hangs_up()]
    with pytest.raises(TypeError, match=r"a Script, not list: wrap the steps, Script\(\[\.\.\.\]\)"):
        await stack.call(steps)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a Script, not list"):
        stack.sim.create_call(steps)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a Script, not tuple"):
        await stack.sim.place_call(stack.webhook_url, ())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a Script, not list"):
        stack.sim.create_webrtc_call(steps)  # type: ignore[arg-type]
    assert not stack.sim.calls and not stack.sim.requests
    await stack.ended(await stack.call(Script(steps)))  # (a Script, and None, still place calls)
    stack.sim.create_call(None)


async def test_ended_and_run_app_fail_on_an_internal_error_of_the_simulator(
    app: Sideband, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulator crashing on a frame from the app (here: on its ``session.update``) answers it with a
    ``server_error``, which the app may well survive: ``h.ended`` fails all the same, with the traceback,
    and so does a ``run_app`` that owns its simulator as the block ends, for the calls nobody waited for."""
    handle = SimCall._on_session_update

    async def crash(self: SimCall, event: Mapping[str, Any], event_id: str | None) -> None:
        await handle(self, event, event_id)
        raise RuntimeError("simulator bug")

    monkeypatch.setattr(SimCall, "_on_session_update", crash)
    with pytest.raises(AssertionError) as at_exit:
        async with run_app(app, **TEST_SETTINGS) as h:
            call = await h.call(Script([wait_for_greeting(), caller_hangs_up()]))
            with pytest.raises(AssertionError) as at_end:
                await h.ended(call)
            unwaited = await h.call(Script([wait_for_greeting(), caller_hangs_up()]))
            await unwaited.wait_for(lambda c: bool(c.internal_errors), 5, "an internal error")
    ended = str(at_end.value)
    assert f"call {call.call_id}: the simulator hit an internal error" in ended, ended
    assert 'raise RuntimeError("simulator bug")' in ended and "RuntimeError: simulator bug" in ended, ended
    exited = str(at_exit.value)
    assert exited.startswith("the simulator hit internal errors"), exited
    assert f"call {unwaited.call_id}:\n" in exited and "RuntimeError: simulator bug" in exited, exited
    with pytest.raises(AssertionError) as raised:  # the block's own failure is kept, the report noted on it
        async with run_app(app, **TEST_SETTINGS) as h:
            call = await h.call(Script([wait_for_greeting(), caller_hangs_up()]))
            await h.ended(call)
    assert str(raised.value).startswith(f"call {call.call_id}: the simulator hit an internal error")
    [note] = raised.value.__notes__
    assert note.startswith("the simulator hit internal errors") and f"call {call.call_id}:\n" in note


async def test_a_request_the_simulator_fails_on_is_a_500_that_fails_ended_and_run_app(
    app: Sideband, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulator crashing in a request handler (here: on the call's first accept) answers 500, which
    the app takes for OpenAI's and retries, so the call goes on as if nothing were wrong: the traceback
    is kept with the call all the same, and ``h.ended`` and ``run_app`` fail on it; a crash on a request
    that names no call (a WebRTC call's creation) is kept with the simulator's own, and fails them too."""
    accept = SimCall._accept
    crashed: list[str] = []

    def crash_once(self: SimCall, body: dict[str, Any]) -> None:
        if not crashed:
            crashed.append(self.call_id)
            raise RuntimeError("simulator bug in accept")
        accept(self, body)

    monkeypatch.setattr(SimCall, "_accept", crash_once)
    with pytest.raises(AssertionError) as at_exit:
        async with run_app(app, **TEST_SETTINGS) as h:
            call = await h.call(Script([wait_for_greeting(), caller_hangs_up()]))
            accepts = [r.status for r in h.sim.requests if r.path.endswith(f"/{call.call_id}/accept")]
            assert accepts == [500, 200] and call.status == "accepted"  # (the app retried: the call runs)
            assert len(call.internal_errors) == 1 and not h.sim.internal_errors
            with pytest.raises(AssertionError) as at_end:
                await h.ended(call)
    ended = str(at_end.value)
    assert ended.startswith(f"call {call.call_id}: the simulator hit an internal error"), ended
    assert 'raise RuntimeError("simulator bug in accept")' in ended, ended
    exited = str(at_exit.value)
    assert f"call {call.call_id}:\n" in exited and "RuntimeError: simulator bug in accept" in exited, exited

    monkeypatch.setattr(SimCall, "_accept", accept)
    monkeypatch.setattr(Simulator, "_sdp_answer", staticmethod(lambda offer: 1 / 0))
    with pytest.raises(AssertionError) as at_exit:
        async with run_app(app, **TEST_SETTINGS) as h:
            call = await h.call(Script([wait_for_greeting(), caller_hangs_up()]))
            async with aiohttp.ClientSession() as http:
                offer = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 RTP/SAVPF 111\r\n"
                headers = {"Authorization": f"Bearer {h.sim.api_key}", "Content-Type": "application/sdp"}
                async with http.post(h.sim.base_url + "/realtime/calls", data=offer, headers=headers) as resp:
                    assert resp.status == 500
                    assert (await resp.json())["error"]["type"] == "server_error"
            assert h.sim.requests[-1].status == 500 and len(h.sim.internal_errors) == 1
            with pytest.raises(AssertionError) as at_end:  # (its own call went well: no matter)
                await h.ended(call)
    ended = str(at_end.value)
    assert ended.startswith("the simulator hit an internal error outside any call"), ended
    assert "ZeroDivisionError" in ended, ended
    exited = str(at_exit.value)
    assert "outside any call:\n" in exited and "ZeroDivisionError" in exited, exited


async def test_a_webhook_the_app_failed_on_a_simulator_bug_says_so(
    app: Sideband, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every accept crashing in the simulator (answered 500), the app gives up on the call and answers
    its webhook 503: ``h.call`` fails on that, and its message holds the simulator's traceback (the
    cause), not only the statuses."""

    def crash(self: SimCall, body: dict[str, Any]) -> None:
        raise RuntimeError("simulator bug in accept")

    monkeypatch.setattr(SimCall, "_accept", crash)
    with pytest.raises(AssertionError):  # (and run_app, as its block ends)
        async with run_app(app, **{**TEST_SETTINGS, "accept_budget": 0.2}) as h:
            with pytest.raises(AssertionError) as placed:
                await h.call(Script([wait_for_greeting(), caller_hangs_up()]))
    message = str(placed.value)
    assert "webhook answered 503" in message and "expected 200 on every attempt; call rtc_" in message
    assert "the simulator hit an internal error" in message and "RuntimeError: simulator bug" in message


async def test_the_simulator_fixtures_fail_their_test_on_a_request_the_simulator_crashed_on(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """The ``simulator`` fixture fails its test on a crash outside any call (here: a client secret's
    mint), and the ``vowel`` fixture on one of the vowel simulator's (a token's mint): each was answered
    500, which the test may well have taken for a server's failure and passed over. The message holds
    each traceback as it is printed, line by line, and says where it was hit."""

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulator bug")

    monkeypatch.setattr(Simulator, "mint_ephemeral_key", crash)
    monkeypatch.setattr(VowelSimulator, "_issue", crash)
    fixtures = (
        pytest_plugin.simulator.__wrapped__(),  # type: ignore[attr-defined]
        pytest_plugin.vowel.__wrapped__(request),  # type: ignore[attr-defined]
    )
    try:
        simulator, vowel = [await anext(fixture) for fixture in fixtures]
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {simulator.api_key}"}
            url = simulator.base_url + "/realtime/client_secrets"
            async with http.post(url, json={}, headers=headers) as resp:
                assert resp.status == 500
            headers = {"Authorization": f"Bearer {vowel.api_key}"}
            body = {"connectionType": "trusted_server", "config": {"serviceId": "s"}}
            async with http.post(
                vowel.core_url + "/v1/realtime/sessions", json=body, headers=headers
            ) as resp:
                assert resp.status == 500
        messages = []
        for fixture, name in zip(fixtures, ("the simulator", "the vowel simulator"), strict=True):
            with pytest.raises(pytest.fail.Exception, match=f"^{name} hit internal errors") as failed:
                await anext(fixture)
            messages.append(message := str(failed.value))
            assert "\nTraceback (most recent call last):\n  File " in message, message
            assert "\nRuntimeError: simulator bug\n" in message, message
        assert "\noutside any call:\nTraceback" in messages[0], messages[0]
    finally:
        for fixture in fixtures:
            await fixture.aclose()


async def test_ended_reports_a_script_that_failed_on_a_live_call_at_once(stack: Stack) -> None:
    """A step that fails while the call goes on (here: the model is to call a tool the app does not
    have) fails the test whatever comes next: ``h.ended`` says so as soon as it failed, not when its
    timeout has run out. A test expecting the call to go on (``check_script=False``) still waits for
    its end."""
    call = await stack.call(Script([model_calls("no_such_tool", {}), caller_hangs_up()]))
    async with asyncio.timeout(5):  # (far below h.ended's own timeout)
        with pytest.raises(TimeoutError) as failed:
            await stack.ended(call, timeout=60)
    message = str(failed.value)
    assert f"call {call.call_id} has not ended; the script failed: step 0 model_calls(no_such_tool" in message
    assert "the model cannot call 'no_such_tool'" in message, message
    assert call.status == "accepted"  # (the call goes on)
    stack.sim.hang_up(call)
    summary = await stack.ended(call, check_script=False)
    assert summary.reason == "remote_closed"


async def test_ended_says_a_script_that_finished_leaves_the_call_up_and_how_to_end_it(stack: Stack) -> None:
    """A script whose last step is no hangup leaves the call up (here: the transfer the model asked for
    never happened, its arguments not the tool's): the timeout says the script has finished with nothing
    to end the call, how to end it, and which tool call failed, with what the model was told."""
    script = Script(
        [
            wait_for_greeting(),
            caller_says("A human, please."),
            model_calls("transfer_call", {"target": "human"}, call_id="call_human"),
            model_says("One moment."),
        ]
    )
    call = await stack.call(script)
    await call.wait_done()
    with pytest.raises(TimeoutError) as failed:
        await stack.ended(call, timeout=0.2)
    message = str(failed.value)
    assert f"call {call.call_id} did not end within 0.2 s; the simulator's call is still up" in message
    assert "(status accepted) and its script has finished: no step of it hangs up" in message, message
    assert "caller_hangs_up()" in message and "hang_up_at_end=True" in message, message
    assert "tool calls that did not succeed: transfer_call (call_human): invalid_arguments" in message
    assert '{"loc":"destination","msg":"Field required"}' in message, message


async def test_ended_says_where_the_script_of_a_call_still_up_is(stack: Stack) -> None:
    """A call still up whose script is still playing: the timeout names the step it is at, and the
    simulator's status."""
    call = await stack.call(Script([wait_for_greeting(), caller_says("Hello?"), pause(30.0)]))
    await call.wait_for(lambda c: c.phase == "pause", 5, "the pause")
    with pytest.raises(TimeoutError) as failed:
        await stack.ended(call, timeout=0.2)
    message = str(failed.value)
    assert message == (
        f"call {call.call_id} did not end within 0.2 s; the simulator's call is still up (status "
        "accepted), its script at step 2 pause(30.0) (pause)"
    ), message


async def test_wait_idle_names_the_calls_still_live_when_it_times_out(stack: Stack) -> None:
    """``h.wait_idle`` timing out names the server's live calls, where each one's script is, and how
    long it waited; once they have ended it returns."""
    call = await stack.call(Script([wait_for_greeting()]))
    await call.wait_done()
    with pytest.raises(TimeoutError) as failed:
        await stack.wait_idle(timeout=0.2)
    message = str(failed.value)
    assert message.startswith(
        f"the server still has 1 live call after 0.2 s: {call.call_id} (simulator status accepted, its "
        "script finished)"
    ), message
    assert failed.value.__cause__ is None and failed.value.__suppress_context__
    await stack.sim.hang_up(call)
    await stack.wait_idle(timeout=5)
    assert not stack.service.registry.calls


async def test_run_app_waits_without_a_warning_for_a_sync_tool_within_its_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sync tool still running as the block ends, its call hung up meanwhile, but within its own
    timeout (``timeout=10``, returning a second later): ``run_app`` waits for it and does not warn."""
    monkeypatch.setattr(harness, "_THREADS_GRACE", 0.1)
    release = threading.Event()
    returned = threading.Event()
    app = Sideband(instructions="desk", voice="marin")

    @app.tool(timeout=10, filler_after=None)
    def slow() -> str:
        """Blocks until released."""
        started.set()
        release.wait(30)
        returned.set()
        return "done"

    started = threading.Event()
    script = Script([wait_for_greeting(), caller_says("Hi."), model_calls("slow", {}, await_outputs=False)])
    timer = threading.Timer(1.0, release.set)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            async with run_app(app, **TEST_SETTINGS) as h:
                call = await h.call(script)
                assert await asyncio.to_thread(started.wait, 10)
                await h.sim.hang_up(call)
                summary = await h.ended(call)
                assert not returned.is_set()  # (still running as the block ends)
                timer.start()
        said = [str(w.message) for w in warned if issubclass(w.category, RuntimeWarning)]
        assert not said, said
        assert returned.is_set()  # (the block's end waited for it)
        assert [t.outcome for t in summary.tools] == ["cancelled"]
    finally:
        timer.cancel()
        release.set()


async def test_run_app_warns_of_a_sync_tool_still_running_as_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync tool stuck past its timeout runs on in a worker thread that Python waits for at exit (the
    test process would not exit): ``run_app`` warns as it ends, naming the tool, where it is stuck and its
    thread. A later run does not warn again of it (it did not start there)."""
    monkeypatch.setattr(harness, "_THREADS_GRACE", 0.1)
    release = threading.Event()
    app = Sideband(instructions="desk", voice="marin")

    @app.tool(timeout=0.2, filler_after=None)
    def stuck() -> str:
        """Blocks until released."""
        release.wait(30)
        return "done"

    script = Script([wait_for_greeting(), caller_says("Hi."), model_calls("stuck", {}), caller_hangs_up()])
    try:
        with pytest.warns(RuntimeWarning) as warned:
            async with run_app(app, **TEST_SETTINGS) as h:
                summary = await h.ended(await h.call(script))
        assert [t.outcome for t in summary.tools] == ["timeout"]
        [warning] = warned
        message = str(warning.message)
        assert re.match(
            r"run_app: \d+\.\d s after the app stopped, its sync code still runs in 1 worker ", message
        )
        assert f"sync tool stuck ({__file__}:" in message, message
        assert re.search(r"now at line \d+: release\.wait\(30\) \(inside Condition\.wait, ", message), message
        assert re.search(r"\), in thread sideband-tool_\d+\. Give the blocking call", message), message
        assert warning.filename == __file__  # (the test's own line: the block that ended)
        with warnings.catch_warnings(record=True) as again:
            warnings.simplefilter("always")
            async with run_app(app, **TEST_SETTINGS):
                pass
        assert not again, [str(w.message) for w in again]
    finally:
        release.set()
