"""The end of the drain window, in process: hangups that fail, end hooks, tools' own cleanup."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sideband.service import HANGUP_BUDGET, WebhookEvent
from sideband.session import Accept
from sideband.stores import ClaimStore, StoreUnavailable
from sideband.testing import Script, caller_says, model_calls, pause, wait_for_greeting

from .conftest import Stack, capture_logs
from .test_edge import StoreFailingOnce
from .test_webrtc import OFFER, post_json

GREETING = wait_for_greeting("Hello, test desk.")


async def live_call(stack: Stack, script: Script | None = None) -> str:
    call = stack.sim.create_call(script or Script([GREETING, pause(60)]))
    assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    await call.wait_for(lambda c: bool(c.responses) and c.responses[0].status == "completed", timeout=5)
    return call.call_id


async def test_a_hangup_still_failing_when_the_grace_ends_is_hangup_failed(stack: Stack) -> None:
    with capture_logs() as logs:  # (from the start: a call's logger is bound when it starts)
        call_id = await live_call(stack)
        stack.sim.fail_verb(call_id, "hangup", *[503] * 50)  # failing far longer than the grace
        await asyncio.wait_for(stack.service.registry.drain(0.0, grace=0.5), 10)
    assert stack.service.registry.recent[call_id].reason == "hangup_failed"  # the call may still be up
    failed = [e for e in logs if e["event"] == "call.verb_failed"]
    assert len(failed) == 1 and failed[0]["verb"] == "hangup" and "shutdown" in failed[0]["detail"]
    ended = [e for e in logs if e["event"] == "call.ended"]
    assert [e["reason"] for e in ended] == ["hangup_failed"]
    assert not [e for e in logs if e["event"] == "calls.abandoned"]


async def test_an_end_hook_longer_than_the_shutdown_grace_runs_to_its_end(stack: Stack) -> None:
    finished: list[str] = []

    async def slow_end_hook(ctx: object, summary: object) -> None:
        await asyncio.sleep(1.0)  # past the grace the calls' hangups get
        finished.append(getattr(summary, "reason", "?"))

    stack.app.on_call_end(slow_end_hook)
    with capture_logs() as logs:
        call_id = await live_call(stack)
        await asyncio.wait_for(stack.service.registry.drain(0.0, grace=0.3), 20)
    assert finished == ["shutdown"]
    assert [e["reason"] for e in logs if e["event"] == "call.ended"] == ["shutdown"]
    assert not [e for e in logs if e["event"] in ("hook.cancelled", "calls.abandoned")]
    assert stack.service.registry.ended["shutdown"] == 1 and call_id not in stack.service.registry


async def test_a_tool_cancelled_by_the_end_finishes_its_own_cleanup(stack: Stack) -> None:
    """The end cancels a running tool once: its cleanup (in ``except CancelledError``) is not cut short
    by a second cancellation."""
    steps: list[str] = []
    started = asyncio.Event()

    @stack.app.tool(timeout=60, filler_after=None)
    async def careful() -> str:
        """Writes something that must be rolled back if the call ends."""
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            steps.append("cleanup started")
            await asyncio.sleep(0.3)  # a rollback
            steps.append("cleanup finished")
            raise
        return "done"

    await live_call(stack, Script([GREETING, caller_says("Do it."), model_calls("careful", {}), pause(60)]))
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.wait_for(stack.service.registry.drain(0.0), 20)
    assert steps == ["cleanup started", "cleanup finished"]


def test_a_hangup_while_the_server_stops_fits_in_what_is_left_of_the_window(stack: Stack) -> None:
    service = stack.service
    assert service._hangup_budget() == HANGUP_BUDGET  # serving: the full budget
    try:
        service._drain_deadline = time.monotonic() + 10.0  # 10 s of drain window left
        assert 13.0 < service._hangup_budget() <= 14.0  # the window, then the shutdown grace less a second
        service._drain_deadline = time.monotonic()  # the window is over: the grace only
        assert 3.5 < service._hangup_budget() <= 4.0
    finally:
        service._drain_deadline = None


async def test_waiting_for_the_drain_sleeps(stack: Stack) -> None:
    """While a call is live and no request is in flight, the drain waits on the call, not in a loop."""
    await live_call(stack)
    registry, rounds = stack.service.registry, 0
    wait_idle = registry.wait_idle

    async def counted() -> None:
        nonlocal rounds
        rounds += 1
        await wait_idle()

    registry.wait_idle = counted  # type: ignore[method-assign]
    hurry = asyncio.Event()
    try:
        waiting = asyncio.create_task(stack.service.wait_quiet(hurry))
        await asyncio.sleep(0.3)  # the window being measured, not a wait for an outcome
        assert not waiting.done() and rounds == 1
        hurry.set()
        await asyncio.wait_for(waiting, 5)
    finally:
        registry.wait_idle = wait_idle  # type: ignore[method-assign]


async def test_a_hangup_cut_short_is_not_tried_again_after_the_grace(stack: Stack) -> None:
    with capture_logs():
        call_id = await live_call(stack)
        stack.sim.fail_verb(call_id, "hangup", *["timeout"] * 50)  # each attempt hangs
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(stack.service.registry.drain(0.0, grace=0.5), 10)
        took = loop.time() - started
        tried = sum(1 for r in stack.sim.requests if r.path.endswith("/hangup"))
        await asyncio.sleep(1.5)  # a hangup still retrying in the background would show up here
    assert took < 3.5, f"the drain took {took:.2f}s"  # not the tools' 5 s grace waiting on the verb
    assert sum(1 for r in stack.sim.requests if r.path.endswith("/hangup")) == tried


async def test_a_hangup_while_the_server_stops_gives_up_within_the_grace(stack: Stack) -> None:
    """The hangup a shutdown sends is bounded by what is left of the window and the grace (4 s here),
    not the usual 30 s: it ends on its own terms (the 503s it got), before the grace cuts it short."""
    with capture_logs() as logs:
        call_id = await live_call(stack)
        stack.sim.fail_verb(call_id, "hangup", *[503] * 200)
        await asyncio.wait_for(stack.service.end_calls(), 15)
    failed = [e for e in logs if e["event"] == "call.verb_failed"]
    assert len(failed) == 1 and "503" in failed[0]["detail"], failed
    assert stack.service.registry.recent[call_id].reason == "hangup_failed"


async def test_call_ended_is_logged_even_when_the_end_is_cut_short(stack: Stack) -> None:
    started, ignored, released = asyncio.Event(), asyncio.Event(), asyncio.Event()

    @stack.app.tool(timeout=60, filler_after=None)
    async def stubborn() -> str:
        """Ignores its cancellation (until the test is over)."""
        started.set()
        while not released.is_set():
            try:
                await released.wait()
            except asyncio.CancelledError:
                ignored.set()
        return "released"

    with capture_logs() as logs:
        call_id = await live_call(
            stack, Script([GREETING, caller_says("Go."), model_calls("stubborn", {}), pause(60)])
        )
        await asyncio.wait_for(started.wait(), 5)
        task = stack.service.registry._tasks[call_id]
        task.cancel()  # the end begins: the tool is cancelled, and ignores it
        await asyncio.wait_for(ignored.wait(), 5)  # the end is under way, waiting on the tool
        task.cancel()  # and the end itself is cut short
        await asyncio.gather(task, return_exceptions=True)
    released.set()  # (the tool task ends with the test)
    assert [e["reason"] for e in logs if e["event"] == "call.ended"] == ["shutdown"]


async def test_a_webhook_cut_short_mid_accept_is_answered_all_the_same_and_its_call_hung_up(
    stack: Stack,
) -> None:
    """The server stops while a webhook's accept is out, and cancels the request (aiohttp does, a second
    after the drain window). The accept went through, its answer slow: the answer goes on to its end, and
    the call it started is hung up at close, not left up at OpenAI with nobody on it."""
    call = stack.sim.create_call(Script([pause(60)]))
    stack.sim.fail_accept(call.call_id, "late")  # carried out; its answer held past the attempt's timeout
    event = WebhookEvent.model_validate(stack.sim.incoming_event(call))
    accept = f"/v1/realtime/calls/{call.call_id}/accept"
    with capture_logs() as logs:
        request = asyncio.create_task(stack.service.handle_webhook("wh_cut_short", event, time.monotonic()))
        await stack.sim.wait_for(
            lambda sim: any(r.path == accept for r in sim.requests), timeout=5, what="accept"
        )
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.wait_for(stack.service.close(), 20)
    assert [r.path for r in stack.sim.requests if r.path.endswith("/hangup")] == [
        f"/v1/realtime/calls/{call.call_id}/hangup"
    ]
    assert call.status == "ended"  # (accepted at OpenAI, then hung up)
    assert [e["reason"] for e in logs if e["event"] == "call.ended"] == ["shutdown"]
    [cut] = [e for e in logs if e["event"] == "webhook.unanswered"]
    assert cut["call_id"] == call.call_id and cut["webhook_id"] == "wh_cut_short"
    assert stack.service._answering == set()


async def test_a_webhook_cut_short_before_its_answer_leaves_the_call_ringing_for_a_redelivery(
    stack: Stack,
) -> None:
    """Cut short while its routing hook still runs, a webhook's answer sends nothing to OpenAI: the call
    rings on, and its claims are released for the redelivery (to another instance)."""
    started, release = asyncio.Event(), asyncio.Event()

    async def route(call: object) -> Accept:
        started.set()
        await release.wait()
        return Accept()

    stack.app.on_incoming(route)
    call = stack.sim.create_call(Script([pause(60)]))
    event = WebhookEvent.model_validate(stack.sim.incoming_event(call))
    with capture_logs() as logs:
        request = asyncio.create_task(stack.service.handle_webhook("wh_early", event, time.monotonic()))
        await asyncio.wait_for(started.wait(), 5)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        release.set()  # the hook decides within its budget: to accept
        await asyncio.wait_for(stack.service.close(), 20)
    assert not [r.path for r in stack.sim.requests if r.path.startswith("/v1/realtime/calls/")]
    assert [e["event"] for e in logs if e["event"] in ("webhook.unanswered", "call.left_ringing")] == [
        "webhook.unanswered",
        "call.left_ringing",
    ]
    assert await stack.service.store.claim("webhook:wh_early", 1.0)  # released: a redelivery does the work
    assert await stack.service.store.claim(f"call:{call.call_id}", 1.0)


class ClaimFailingLate:
    """The service's claim store, but the claim of the call waits for ``go``, then fails with ``error``."""

    def __init__(self, inner: ClaimStore, error: Exception) -> None:
        self.inner, self.error, self.where = inner, error, inner.where
        self.waiting, self.go = asyncio.Event(), asyncio.Event()

    async def claim(self, key: str, ttl: float) -> bool:
        if key.startswith("call:"):
            self.waiting.set()
            await self.go.wait()
            raise self.error
        return await self.inner.claim(key, ttl)

    async def settle(self, key: str, ttl: float) -> None:
        await self.inner.settle(key, ttl)

    async def settled(self, key: str) -> bool:
        return await self.inner.settled(key)

    async def release(self, key: str) -> None:
        await self.inner.release(key)

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()


@pytest.mark.parametrize(
    ("error", "event"),
    [
        (StoreUnavailable("redis at redis://cache:6379/0: no answer within 2 s"), "store.unavailable"),
        (RuntimeError("a bug"), "webhook.failed"),
    ],
)
async def test_a_webhook_cut_short_whose_answer_then_fails_logs_it_with_its_call(
    stack: Stack, error: Exception, event: str
) -> None:
    """The server stops while a webhook's answer waits for the store, and cancels the request; the answer
    then fails (the store gave up on it, or a bug): the line that says so names the call and the webhook,
    as every line about a call does."""
    store = ClaimFailingLate(stack.service.store, error)
    stack.service.store = store
    call = stack.sim.create_call(Script([pause(60)]))
    incoming = WebhookEvent.model_validate(stack.sim.incoming_event(call))
    with capture_logs() as logs:
        request = asyncio.create_task(stack.service.handle_webhook("wh_late", incoming, time.monotonic()))
        await asyncio.wait_for(store.waiting.wait(), 5)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        store.go.set()
        await asyncio.wait_for(stack.service.close(), 20)
    lines = [e for e in logs if e["event"] in ("webhook.unanswered", event)]
    assert [e["event"] for e in lines] == ["webhook.unanswered", event]
    assert all(e.get("call_id") == call.call_id and e.get("webhook_id") == "wh_late" for e in lines), lines
    assert not any(r.path.endswith("/accept") for r in stack.sim.requests)  # (nothing was sent)


async def test_a_browser_call_cut_short_mid_relay_is_attached_all_the_same_and_hung_up(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stops while a browser's offer is out at OpenAI (the call created there, its answer
    slow), and cancels the request: the relay goes on to its end, and the call it created is attached,
    then hung up at close, not left up at OpenAI with nobody on it."""
    created, answered = asyncio.Event(), asyncio.Event()
    create_call = stack.service.control.create_call

    async def slow_answer(sdp: str, session: dict[str, Any], **kw: Any) -> tuple[str, str]:
        made = await create_call(sdp, session, **kw)
        created.set()
        await answered.wait()  # OpenAI's answer, on its way
        return made

    monkeypatch.setattr(stack.service.control, "create_call", slow_answer)
    stack.sim.next_webrtc_script = Script([pause(60)])
    with capture_logs() as logs:
        request = asyncio.create_task(stack.service.rtc_relay(OFFER))
        await asyncio.wait_for(created.wait(), 5)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        answered.set()
        await asyncio.wait_for(stack.service.close(), 20)
    [call] = stack.sim.calls.values()
    assert call.sideband_connects == 1 and call.status == "ended"  # (attached, then hung up)
    assert [r.path for r in stack.sim.requests if r.path.endswith("/hangup")] == [
        f"/v1/realtime/calls/{call.call_id}/hangup"
    ]
    assert [e["reason"] for e in logs if e["event"] == "call.ended"] == ["shutdown"]
    [cut] = [e for e in logs if e["event"] == "rtc.unanswered"]
    assert cut["log_level"] == "warning"


class StoreSlowToSettle(StoreFailingOnce):
    """The service's claim store, but the first settle of a key starting with ``prefix`` waits for
    ``go`` (``entered`` is set as it starts to)."""

    def __init__(self, inner: Any, prefix: str) -> None:
        super().__init__(inner, prefix, at="nowhere")
        self.entered, self.go = asyncio.Event(), asyncio.Event()

    async def settle(self, key: str, ttl: float) -> None:
        if key.startswith(self.prefix) and not self.entered.is_set():
            self.entered.set()
            await self.go.wait()
        await self.inner.settle(key, ttl)


async def test_a_handoff_cut_short_between_its_claims_and_its_launch_attaches_and_hangs_up(
    stack: Stack,
) -> None:
    """The server stops while a handoff's claims are being made (the ticket spent, the store slow to
    settle the call's claim), and cancels the request: the handoff goes on to its end, and the call is
    attached, then hung up at close, not left running with no tools until it ends."""
    _, minted = await post_json(stack, "/rtc/sessions", {})
    call = stack.sim.create_webrtc_call(Script([pause(60)]))
    store = stack.service.store = StoreSlowToSettle(stack.service.store, "call:")
    with capture_logs() as logs:
        request = asyncio.create_task(stack.service.rtc_handoff(call.call_id, minted["ticket"]))
        await asyncio.wait_for(store.entered.wait(), 5)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        stack.service.start_draining()  # (the server stopping, as close() begins)
        closing = asyncio.create_task(stack.service.close())
        store.go.set()  # the store answers as the server stops
        await asyncio.wait_for(closing, 20)
    assert call.sideband_connects == 1 and call.status == "ended"  # (attached, then hung up)
    assert [r.path for r in stack.sim.requests if r.path.endswith("/hangup")] == [
        f"/v1/realtime/calls/{call.call_id}/hangup"
    ]
    assert [e["reason"] for e in logs if e["event"] == "call.ended"] == ["shutdown"]
    [cut] = [e for e in logs if e["event"] == "rtc.unanswered"]
    assert cut["log_level"] == "warning"
