"""Tool execution edge cases: a tool's own CancelledError, context actions from sync tools (worker
threads), and sync tools kept off the event loop's default executor."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from sideband import CallContext
from sideband.runtime.driver import CallRuntime
from sideband.testing import Script, caller_says, model_calls, model_says, wait_for_greeting
from sideband.tools import ToolRegistry

from .conftest import Stack, capture_logs
from .test_call_runtime import kinds
from .test_call_runtime import outputs as by_call_id

HELLO = wait_for_greeting("Hello.")


def outputs(call: Any) -> list[Any]:
    return list(by_call_id(call).values())


async def start(stack: Stack, script: Script) -> Any:
    call = stack.sim.create_call(script)
    assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
    return call


# -- a CancelledError raised by the tool's own code -----------------------------------------------------


async def test_cancelled_error_from_tool_code_is_a_failure_but_real_cancellation_propagates() -> None:
    reg = ToolRegistry()

    @reg.tool
    async def fetch() -> str:
        inner = asyncio.create_task(asyncio.sleep(10))
        await asyncio.sleep(0)
        inner.cancel()
        await inner  # a bug in the tool: awaiting a task it cancelled itself
        return "never"

    @reg.tool
    def sync_fetch() -> str:
        raise asyncio.CancelledError

    for name in ("fetch", "sync_fetch"):
        res = await asyncio.wait_for(reg.execute("c1", name, "{}", CallContext("call_1")), 5)
        assert res.outcome == "error", name
        assert json.loads(res.output) == {"error": "tool_failed", "message": "CancelledError"}
        assert isinstance(res.exception, asyncio.CancelledError)

    # The executing task really being cancelled (the call ends) still propagates.
    started, cancelled = asyncio.Event(), asyncio.Event()

    @reg.tool
    async def long_job() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    task = asyncio.create_task(reg.execute("c2", "long_job", "{}", CallContext("call_1")))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert cancelled.is_set()


async def test_tool_raising_cancelled_error_gets_an_output_and_a_response(stack: Stack) -> None:
    @stack.app.tool(filler_after=None)
    async def fetch() -> str:
        inner = asyncio.create_task(asyncio.sleep(10))
        await asyncio.sleep(0)
        inner.cancel()
        await inner
        return "never"

    call = await start(
        stack,
        Script([HELLO, caller_says("fetch"), model_calls("fetch", {}), model_says("Sorry, that failed.")]),
    )
    await call.wait_done(timeout=10)
    assert outputs(call) == [{"error": "tool_failed", "message": "CancelledError"}]
    ks = kinds(call)
    out = next(i for i, k in enumerate(ks) if k.startswith("output:"))
    assert ks[out + 1 :] == ["create"]  # no dead air: the model is asked to answer
    await stack.sim.hang_up(call)
    summary = await stack.ended(call)
    assert [(t.name, t.outcome) for t in summary.tools] == [("fetch", "error")]


@pytest.mark.parametrize("how", ["hook", "own_task", "library"])
async def test_a_tool_cancelled_by_the_apps_code_gets_an_output_and_the_call_goes_on(
    stack: Stack, how: str
) -> None:
    """Code of the app's cancels a running tool while the call goes on: a hook calling off a long search
    when the caller says so, the tool cancelling its own task, or a library's timer doing it and raising
    something else. Only the call's end cancels a tool silently: the model gets the tool's failure, and
    later tools' outputs are answered (the call does not take the cancelled one for still running)."""
    started = asyncio.Event()

    @stack.app.tool(filler_after=None)
    async def search(ctx: CallContext) -> str:
        task = asyncio.current_task()
        assert task is not None
        if how == "own_task":
            task.cancel()
        elif how == "library":
            timer = asyncio.get_running_loop().call_soon(task.cancel)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                raise TimeoutError("upstream slow") from None  # (and no uncancel())
            finally:
                timer.cancel()
        ctx.state["search"] = task
        started.set()
        await asyncio.Event().wait()
        return "found"

    @stack.app.on_transcript
    async def never_mind(ctx: CallContext, role: str, text: str) -> None:
        if how == "hook" and role == "caller" and "never mind" in text:
            ctx.state["search"].cancel()

    with capture_logs() as logs:
        call = await start(
            stack,
            Script(
                [
                    HELLO,
                    caller_says("search"),
                    model_calls("search", {}, call_id="c_search", await_outputs=how != "hook"),
                    *([caller_says("never mind")] if how == "hook" else []),
                    model_says("OK."),
                    caller_says("my order 42?"),
                    model_calls("lookup_order", {"order_id": "42"}, call_id="c_lookup"),
                    model_says("It shipped."),
                ]
            ),
        )
        await call.wait_done(timeout=15)
    got = by_call_id(call)
    assert got["c_search"] == {
        "error": "tool_failed",
        "message": "The tool was cancelled before it finished.",
    }
    assert "c_lookup" in got
    ks = kinds(call)
    assert ks[ks.index("output:c_lookup") + 1 :] == ["create"]  # the later tool is answered
    await stack.sim.hang_up(call)
    summary = await stack.ended(call)
    assert [(t.name, t.outcome) for t in summary.tools] == [("search", "error"), ("lookup_order", "ok")]
    finished = [e for e in logs if e["event"] == "tool.finished" and e["tool"] == "search"]
    assert [(e["outcome"], e["log_level"]) for e in finished] == [("error", "warning")]
    assert finished[0]["error"] == ("TimeoutError" if how == "library" else "CancelledError")


async def test_sync_tool_raising_generator_exit_gets_an_output_and_a_response(stack: Stack) -> None:
    """A ``GeneratorExit`` out of a sync tool's thread ended the task awaiting it: the model waited for
    an output that never came. It is the tool's failure, as any exception."""

    @stack.app.tool(filler_after=None)
    def close_all() -> str:
        raise GeneratorExit

    call = await start(
        stack,
        Script(
            [HELLO, caller_says("close"), model_calls("close_all", {}), model_says("Sorry, that failed.")]
        ),
    )
    await call.wait_done(timeout=10)
    assert outputs(call) == [{"error": "tool_failed", "message": "RuntimeError"}]
    ks = kinds(call)
    out = next(i for i, k in enumerate(ks) if k.startswith("output:"))
    assert ks[out + 1 :] == ["create"]
    await stack.sim.hang_up(call)
    summary = await stack.ended(call)
    assert [(t.name, t.outcome) for t in summary.tools] == [("close_all", "error")]


# -- context actions from a sync tool's worker thread ---------------------------------------------------


async def test_context_actions_from_a_worker_thread_run_on_the_loop() -> None:
    loop_thread = threading.get_ident()
    seen: list[tuple[str, Any, int]] = []

    class Actions:
        def hangup(self, reason: str = "hangup") -> None:
            seen.append(("hangup", reason, threading.get_ident()))

        def transfer(self, target: str) -> None:
            seen.append(("transfer", target, threading.get_ident()))
            if target != "human":
                raise ValueError(f"transfer target {target!r} is not allowed")

        def say(self, instructions: str) -> None:
            seen.append(("say", instructions, threading.get_ident()))

        def update_session(self, **fields: Any) -> None:
            seen.append(("update_session", fields, threading.get_ident()))

    ctx = CallContext("call_1", actions=Actions())
    reg = ToolRegistry()

    @reg.tool
    def sync_tool(ctx: CallContext) -> dict[str, Any]:
        ctx.update_session(instructions="Be brief.")
        ctx.say("Mention the sale.")
        ctx.transfer("human")
        try:
            ctx.transfer("nowhere")
        except ValueError as exc:  # raised on the loop, re-raised here
            refused = str(exc)
        ctx.hangup("done")
        return {"thread": threading.get_ident(), "refused": refused}

    res = await asyncio.wait_for(reg.execute("c1", "sync_tool", "{}", ctx), 5)
    assert res.outcome == "ok", res.error
    out = json.loads(res.output)
    assert out["thread"] != loop_thread
    assert out["refused"] == "transfer target 'nowhere' is not allowed"
    assert [(name, arg) for name, arg, _ in seen] == [
        ("update_session", {"instructions": "Be brief."}),
        ("say", "Mention the sale."),
        ("transfer", "human"),
        ("transfer", "nowhere"),
        ("hangup", "done"),
    ]
    assert {thread for _, _, thread in seen} == {loop_thread}
    assert ctx.loop is asyncio.get_running_loop()  # captured when the actions were bound

    # On the loop the actions are called directly and hangup/transfer are awaited as before.
    await ctx.hangup("again")
    assert seen[-1] == ("hangup", "again", loop_thread)


async def test_hangup_and_transfer_can_be_handed_to_create_task_or_another_thread() -> None:
    """``ctx.transfer()``/``ctx.hangup()`` act as they are called, and what they return is a coroutine
    already done: ``asyncio.create_task`` and ``run_coroutine_threadsafe`` take it (the tool does not fail
    after its action was asked for), and one left alone warns of nothing."""
    seen: list[tuple[str, str]] = []

    class Actions:
        def hangup(self, reason: str = "hangup") -> None:
            seen.append(("hangup", reason))

        def transfer(self, target: str) -> None:
            seen.append(("transfer", target))

    ctx = CallContext("call_1", actions=Actions())
    reg = ToolRegistry()

    @reg.tool
    async def hand_over(ctx: CallContext) -> str:
        await asyncio.create_task(ctx.transfer("human"))
        await asyncio.gather(ctx.hangup("later"))
        return "transferring"

    @reg.tool
    def end_from_thread(ctx: CallContext) -> str:
        assert ctx.loop is not None
        asyncio.run_coroutine_threadsafe(ctx.hangup("done"), ctx.loop).result(timeout=5)
        return "ended"

    for name in ("hand_over", "end_from_thread"):
        res = await asyncio.wait_for(reg.execute("c1", name, "{}", ctx), 5)
        assert res.outcome == "ok", res.error
    assert seen == [("transfer", "human"), ("hangup", "later"), ("hangup", "done")]

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        ctx.transfer("human")  # never awaited: no "coroutine … was never awaited"
        gc.collect()
    assert seen[-1] == ("transfer", "human") and not warned


@pytest.mark.parametrize("action", ["transfer", "hangup", "say"])
async def test_an_action_the_held_loop_did_not_take_in_time_is_never_carried_out(
    monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    """Blocking code holds the call's loop past the hop's time: the sync tool's ``ctx.transfer()`` raises
    ``TimeoutError`` (the model is told the tool failed), and the transfer never happens, not even once the
    loop is free again."""
    monkeypatch.setattr("sideband.context._HOP_TIMEOUT", 0.05)
    carried_out: list[str] = []

    class Actions:
        def hangup(self, reason: str = "hangup") -> None:
            carried_out.append("hangup")

        def transfer(self, target: str) -> None:
            carried_out.append("transfer")

        def say(self, instructions: str) -> None:
            carried_out.append("say")

    ctx = CallContext("call_1", actions=Actions())  # type: ignore[arg-type]
    gave_up = threading.Event()
    raised: list[BaseException] = []

    def sync_tool() -> None:
        try:
            {"transfer": lambda: ctx.transfer("human"), "hangup": ctx.hangup, "say": lambda: ctx.say("Hi")}[
                action
            ]()
        except BaseException as exc:
            raised.append(exc)
        finally:
            gave_up.set()

    thread = threading.Thread(target=sync_tool)
    thread.start()
    assert gave_up.wait(10)  # (this blocks the loop: the tool's hop waits behind it, and times out)
    thread.join(10)
    free = asyncio.Event()
    asyncio.get_running_loop().call_soon(free.set)  # (after the hop's callback, were it still queued)
    await asyncio.wait_for(free.wait(), 5)
    assert carried_out == []
    assert [type(exc) for exc in raised] == [TimeoutError]
    assert "withdrawn" in str(raised[0])
    ctx.transfer("human")  # (the loop free: the context still acts)
    assert carried_out == ["transfer"]


async def test_sync_tool_uses_context_actions_on_a_live_call(stack: Stack) -> None:
    @stack.app.tool(filler_after=None)
    def wrap_up_sync(ctx: CallContext) -> dict[str, Any]:
        ctx.update_session(instructions="Be brief.")
        try:
            ctx.transfer("tel:+19005550000")  # not in the allow-list
        except ValueError:
            refused = True
        else:
            refused = False
        ctx.hangup()
        return {"refused": refused}

    call = await start(
        stack, Script([HELLO, caller_says("bye"), model_calls("wrap_up_sync", {}), model_says("Bye!")])
    )
    await call.wait_ended(timeout=10)
    summary = await stack.ended(call)
    assert [(t.name, t.outcome) for t in summary.tools] == [("wrap_up_sync", "ok")]
    assert outputs(call) == [{"refused": True}]
    ks = kinds(call)
    updates = [e for e in call.received if e["type"] == "session.update"]
    assert updates[-1]["session"] == {"instructions": "Be brief.", "type": "realtime"}
    assert call.received.index(updates[-1]) < ks.index(next(k for k in ks if k.startswith("output:")))
    assert call.end_reason == "hangup_verb" and summary.reason == "hangup"
    assert sum(1 for r in stack.sim.requests if r.path.endswith("/hangup")) == 1
    assert not any(r.path.endswith("/refer") for r in stack.sim.requests)


# -- sync tools in their own thread pool ----------------------------------------------------------------


async def test_hung_sync_tools_do_not_starve_the_default_executor() -> None:
    loop = asyncio.get_running_loop()
    default = ThreadPoolExecutor(max_workers=2, thread_name_prefix="default-executor")
    loop.set_default_executor(default)
    release = threading.Event()
    finished = threading.Semaphore(0)
    threads: list[threading.Thread] = []
    reg = ToolRegistry(default_timeout=0.3)  # (a job no worker thread took before its timeout never runs)

    @reg.tool
    def legacy_lookup() -> str:
        threads.append(threading.current_thread())
        try:
            release.wait(10)  # a blocking client with no timeout of its own
        finally:
            finished.release()
        return "late"

    @reg.tool(timeout=5)  # (its answer is the point, not the default timeout the hung ones run into)
    def trivial() -> str:
        return threading.current_thread().name

    hung = 3
    try:
        results = await asyncio.wait_for(
            asyncio.gather(
                *(reg.execute(f"a{i}", "legacy_lookup", "{}", CallContext("call_A")) for i in range(hung))
            ),
            5,
        )
        assert [r.outcome for r in results] == ["timeout"] * hung
        # The loop's default executor (getaddrinfo, to_thread) still answers at once...
        name = await asyncio.wait_for(loop.run_in_executor(None, lambda: threading.current_thread().name), 2)
        assert name.startswith("default-executor")
        await asyncio.wait_for(loop.getaddrinfo("127.0.0.1", 443), 2)
        # ...because the hung threads are the registry's own...
        assert len(threads) == hung
        assert all(t.name.startswith("sideband-tool") for t in threads)
        # ...and another call's sync tool still runs.
        res = await asyncio.wait_for(reg.execute("b1", "trivial", "{}", CallContext("call_B")), 2)
        assert res.outcome == "ok" and res.output.startswith("sideband-tool")
    finally:
        release.set()
        for _ in range(len(threads)):
            assert finished.acquire(timeout=5)
        default.shutdown(wait=True)


async def test_a_sync_tool_that_never_got_a_thread_says_why_it_timed_out() -> None:
    """Sync tools hung past their timeout hold their threads: once none is free, the next sync tools
    time out without ever running, and their result (logged as ``tool.finished``) says so."""
    release = threading.Event()
    reg = ToolRegistry(default_timeout=0.2, max_threads=2)
    ran: list[str] = []

    @reg.tool
    def legacy_lookup() -> str:
        release.wait(10)  # a blocking client with no timeout of its own
        return "late"

    @reg.tool
    def trivial() -> str:
        ran.append("trivial")
        return "ok"

    try:
        hung = [reg.execute(f"a{i}", "legacy_lookup", "{}", CallContext("call_A")) for i in range(2)]
        assert [r.error for r in await asyncio.wait_for(asyncio.gather(*hung), 5)] == [
            "timed out after 0.2 s"
        ] * 2
        res = await asyncio.wait_for(
            reg.subset(["trivial"]).execute("b1", "trivial", "{}", CallContext("B")), 5
        )
        assert res.outcome == "timeout" and ran == []
        assert res.error == (
            "timed out after 0.2 s without starting: no thread of the tool pool (2 in all) was free, "
            "2 held by sync tools running on past their timeout or their call's end"
        )
    finally:
        release.set()
    res = await asyncio.wait_for(reg.execute("b2", "trivial", "{}", CallContext("call_B")), 5)
    assert (res.outcome, ran) == ("ok", ["trivial"])


async def test_sync_tools_running_on_past_their_calls_end_are_counted_as_holding_threads() -> None:
    """A call that ends cancels its sync tools' runs, but their threads run on: a sync tool that then
    finds no thread free counts them among those held."""
    release = threading.Event()
    started = threading.Semaphore(0)
    reg = ToolRegistry(default_timeout=0.2, max_threads=2)

    @reg.tool(timeout=30)
    def legacy_lookup() -> str:
        started.release()
        release.wait(10)  # a blocking client with no timeout of its own
        return "late"

    @reg.tool
    def trivial() -> str:
        return "ok"

    try:
        runs = [
            asyncio.create_task(reg.execute(f"a{i}", "legacy_lookup", "{}", CallContext(f"call_{i}")))
            for i in range(2)
        ]
        for _ in runs:
            assert await asyncio.to_thread(started.acquire, True, 5)
        for run in runs:
            run.cancel()  # the caller hung up
        results = await asyncio.gather(*runs, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        res = await asyncio.wait_for(reg.execute("b1", "trivial", "{}", CallContext("B")), 5)
        assert res.outcome == "timeout"
        assert res.error == (
            "timed out after 0.2 s without starting: no thread of the tool pool (2 in all) was free, "
            "2 held by sync tools running on past their timeout or their call's end"
        )
    finally:
        release.set()
    res = await asyncio.wait_for(reg.execute("b2", "trivial", "{}", CallContext("B")), 5)
    assert res.outcome == "ok"


# -- a tool run that timed out no longer acts on the call ------------------------------------------------


async def test_a_sync_tool_that_timed_out_can_no_longer_transfer_the_call(stack: Stack) -> None:
    """The model was told the tool timed out (and told the caller the transfer failed): the worker thread,
    running on, must not transfer the call behind their backs."""
    release = threading.Event()
    attempted: list[str] = []
    done = threading.Event()

    @stack.app.tool(timeout=0.5, filler_after=None)
    def slow_transfer(ctx: CallContext) -> str:
        release.wait(10)
        try:
            ctx.transfer("human")
        except RuntimeError as exc:
            attempted.append(str(exc))
        finally:
            done.set()
        return "transferred"

    stack.app.transfer_targets["human"] = "tel:+14155550123"
    call = await start(
        stack,
        Script([HELLO, caller_says("a human"), model_calls("slow_transfer", {}), model_says("Sorry.")]),
    )
    await call.wait_for(lambda c: bool(c.function_outputs), timeout=5)
    assert json.loads(call.function_outputs[0][1])["error"] == "timeout"
    release.set()
    assert await asyncio.get_running_loop().run_in_executor(None, done.wait, 5)
    assert attempted == ["slow_transfer timed out after 0.5 s: its call actions no longer apply"]
    assert not [r for r in stack.sim.requests if r.path.endswith("/refer")]
    stack.sim.hang_up(call)
    assert (await stack.ended(call, check_script=False)).reason == "remote_closed"


# -- a tool that swallows its timeout's cancellation ----------------------------------------------------


def stuck_tool() -> asyncio.Task[Any]:
    return next(t for t in asyncio.all_tasks() if t.get_name().startswith("tool:"))


async def test_a_tool_that_swallows_its_timeout_is_answered_at_its_deadline(stack: Stack) -> None:
    """The model gets the timeout output a moment after the deadline, not when the tool at last returns
    (the caller would hear nothing until then); what the tool does later counts for nothing."""
    release, finished = asyncio.Event(), asyncio.Event()
    late: list[str] = []

    @stack.app.tool(timeout=0.2, filler_after=None)
    async def lookup(ctx: CallContext) -> str:
        for source in (asyncio.Event().wait, release.wait):  # the first hangs, the second answers late
            try:
                await source()
            except BaseException:  # a bare except in a retry loop: the cancellation is swallowed
                continue
        try:
            ctx.transfer("human")
        except RuntimeError as exc:
            late.append(str(exc))
        finished.set()
        return "found it, late"

    stack.app.transfer_targets["human"] = "tel:+14155550123"
    hooks: list[str] = []
    stack.app.on_tool(lambda ctx, record: hooks.append(record.outcome))
    with capture_logs() as logs:
        call = await start(
            stack,
            Script(
                [
                    HELLO,
                    caller_says("look it up"),
                    model_calls("lookup", {}),
                    model_says("Sorry, it timed out."),
                ]
            ),
        )
        await call.wait_done(timeout=5)  # the timeout output went out, and the response.create after it
        stuck = stuck_tool()
        assert not stuck.done() and not finished.is_set()
        assert outputs(call) == [{"error": "timeout", "message": "The tool took longer than 0.2 s"}]
        ks = kinds(call)
        out = next(i for i, k in enumerate(ks) if k.startswith("output:"))
        assert ks[out + 1 :] == ["create"]
        release.set()
        assert await asyncio.wait_for(stuck, 5) is None
        assert finished.is_set()
        await stack.sim.hang_up(call)
        summary = await stack.ended(call)
    assert kinds(call)[out:] == ks[out:]  # nothing more of it went out
    assert late == ["lookup timed out after 0.2 s: its call actions no longer apply"]
    assert not [r for r in stack.sim.requests if r.path.endswith("/refer")]
    assert [(t.name, t.outcome) for t in summary.tools] == [("lookup", "timeout")]
    assert [e["outcome"] for e in logs if e["event"] == "tool.finished"] == ["timeout"]
    assert hooks == ["timeout"]
    assert not [e for e in logs if e["event"] == "call.tasks_abandoned"]


async def test_a_tool_answered_at_its_deadline_is_cancelled_again_and_left_behind_at_the_end(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sideband.runtime.driver.TASK_GRACE", 0.2)
    monkeypatch.setattr("sideband.runtime.driver.OVERDUE_GRACE", 0.1)
    stop = asyncio.Event()
    cancels: list[int] = []

    @stack.app.tool(timeout=0.2, filler_after=None)
    async def stubborn() -> str:  # a buggy tool: swallows every cancellation until the test ends
        while not stop.is_set():
            try:
                await stop.wait()
            except asyncio.CancelledError:
                cancels.append(len(cancels) + 1)
        return "late"

    hooks: list[str] = []
    stack.app.on_tool(lambda ctx, record: hooks.append(record.outcome))
    try:
        with capture_logs() as logs:
            call = await start(
                stack, Script([HELLO, caller_says("go"), model_calls("stubborn", {}), model_says("Sorry.")])
            )
            await call.wait_done(timeout=5)
            stuck = stuck_tool()
            assert cancels == [1]  # its timeout's
            stack.sim.hang_up(call)
            summary = await stack.ended(call, timeout=5, check_script=False)  # ends all the same
            assert cancels == [1, 2]  # the call's end cancelled it again
            stop.set()
            assert await asyncio.wait_for(stuck, 5) is None  # it finished at last: nothing of it counts
    finally:
        stop.set()
    assert outputs(call) == [{"error": "timeout", "message": "The tool took longer than 0.2 s"}]
    assert [(t.name, t.outcome) for t in summary.tools] == [("stubborn", "timeout")]
    assert [e["outcome"] for e in logs if e["event"] == "tool.finished"] == ["timeout"]
    assert hooks == ["timeout"]
    abandoned = [e["tasks"] for e in logs if e["event"] == "call.tasks_abandoned"]
    assert len(abandoned) == 1 and abandoned[0][0].startswith("tool:")


async def test_a_tool_answered_past_its_deadline_keeps_its_cleanup_when_the_call_ends(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tool that heeds its timeout's cancellation, but whose cleanup (a rollback) outlasts the grace:
    the model is answered without it, and the call's end, which finds it still cleaning up, lets its
    cleanup run (it was cancelled once already)."""
    monkeypatch.setattr("sideband.runtime.driver.OVERDUE_GRACE", 0.1)
    ending = asyncio.Event()
    real = CallRuntime._await_tasks

    async def await_tasks(self: CallRuntime, tasks: list[asyncio.Task[None]]) -> None:
        ending.set()  # (the call's end has cancelled what it cancels)
        await real(self, tasks)

    monkeypatch.setattr(CallRuntime, "_await_tasks", await_tasks)
    steps: list[str] = []

    @stack.app.tool(timeout=0.2, filler_after=None)
    async def book() -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            steps.append("cleanup started")
            try:
                await ending.wait()  # a rollback still under way when the call ends
            except asyncio.CancelledError:
                steps.append("cleanup cut")
                raise
            steps.append("cleanup done")
            raise
        return "never"

    call = await start(
        stack, Script([HELLO, caller_says("book it"), model_calls("book", {}), model_says("Sorry.")])
    )
    await call.wait_done(timeout=5)  # (answered past its deadline, its cleanup still running)
    stack.sim.hang_up(call)
    summary = await stack.ended(call, timeout=10, check_script=False)
    assert steps == ["cleanup started", "cleanup done"]
    assert outputs(call) == [{"error": "timeout", "message": "The tool took longer than 0.2 s"}]
    assert [(t.name, t.outcome) for t in summary.tools] == [("book", "timeout")]


async def test_a_tool_whose_output_is_still_being_written_at_the_grace_is_answered_once(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tool stopped at its timeout and its result is being written to a congested socket when its
    grace runs out: it is answered once (one record, one log line, one hook call)."""
    monkeypatch.setattr("sideband.runtime.driver.OVERDUE_GRACE", 0.1)
    overdue = asyncio.Event()
    real_overdue, real_flush = CallRuntime._overdue, CallRuntime._flush

    def watched_overdue(self: CallRuntime, *args: Any) -> None:
        overdue.set()
        real_overdue(self, *args)

    async def congested_flush(self: CallRuntime) -> None:
        if any(b"function_call_output" in frame for frame in self._outbox) and not self._flushing:
            # (ws.send waiting for the transport to drain): until the grace has run out, if it fires
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(overdue.wait(), 1.0)
        await real_flush(self)

    monkeypatch.setattr(CallRuntime, "_overdue", watched_overdue)
    monkeypatch.setattr(CallRuntime, "_flush", congested_flush)

    @stack.app.tool(timeout=0.2, filler_after=None)
    async def slow() -> str:
        await asyncio.Event().wait()
        return "never"

    hooks: list[str] = []
    stack.app.on_tool(lambda ctx, record: hooks.append(record.outcome))
    with capture_logs() as logs:
        call = await start(
            stack, Script([HELLO, caller_says("go"), model_calls("slow", {}), model_says("Sorry.")])
        )
        await call.wait_done(timeout=5)
        stack.sim.hang_up(call)
        summary = await stack.ended(call, timeout=10, check_script=False)
    assert [(t.name, t.outcome) for t in summary.tools] == [("slow", "timeout")]
    assert [e["outcome"] for e in logs if e["event"] == "tool.finished"] == ["timeout"]
    assert hooks == ["timeout"]


async def test_tools_that_stop_at_their_timeout_are_answered_once(stack: Stack) -> None:
    """An async tool that honours its cancellation and a sync tool (its thread runs on) are answered by
    their own task, once."""
    release, returned = threading.Event(), threading.Event()

    @stack.app.tool(timeout=0.2, filler_after=None)
    async def polite() -> str:
        await asyncio.Event().wait()
        return "never"

    @stack.app.tool(timeout=0.2, filler_after=None)
    def blocking() -> str:
        release.wait(10)
        returned.set()
        return "late"

    with capture_logs() as logs:
        call = await start(
            stack,
            Script(
                [
                    HELLO,
                    caller_says("one"),
                    model_calls("polite", {}),
                    model_says("Sorry."),
                    caller_says("two"),
                    model_calls("blocking", {}),
                    model_says("Sorry again."),
                ]
            ),
        )
        await call.wait_done(timeout=5)
        release.set()
        assert await asyncio.get_running_loop().run_in_executor(None, returned.wait, 5)
        await stack.sim.hang_up(call)
        summary = await stack.ended(call)
    timeout = {"error": "timeout", "message": "The tool took longer than 0.2 s"}
    assert outputs(call) == [timeout, timeout]
    assert [(t.name, t.outcome) for t in summary.tools] == [("polite", "timeout"), ("blocking", "timeout")]
    assert [e["outcome"] for e in logs if e["event"] == "tool.finished"] == ["timeout", "timeout"]
    assert not [e for e in logs if e["event"] == "call.tasks_abandoned"]


# -- the driver's last line of defence ------------------------------------------------------------------


async def test_an_unexpected_error_in_execute_still_answers_the_model(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    @stack.app.tool(filler_after=None)
    async def fetch() -> str:
        return "fine"

    async def broken(self: ToolRegistry, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a defect in execute")

    monkeypatch.setattr(ToolRegistry, "execute", broken)
    call = await start(
        stack,
        Script([HELLO, caller_says("fetch"), model_calls("fetch", {}), model_says("Sorry, that failed.")]),
    )
    await call.wait_done(timeout=10)
    assert outputs(call) == [{"error": "tool_failed", "message": "RuntimeError"}]
    ks = kinds(call)
    out = next(i for i, k in enumerate(ks) if k.startswith("output:"))
    assert ks[out + 1 :] == ["create"]
    await stack.sim.hang_up(call)
    summary = await stack.ended(call)
    assert [(t.name, t.outcome) for t in summary.tools] == [("fetch", "error")]


# -- what a tool returns reaches the model as JSON the service reads ------------------------------------


async def test_an_output_holding_half_an_emoji_reaches_the_model(stack: Stack) -> None:
    """A string cut inside a surrogate pair (text from a UTF-16 source, half an emoji) cannot be UTF-8:
    the frame carrying it is written with U+FFFD in its place, as strict JSON the service takes, rather
    than with a ``\\ud83d`` escape it refuses (the model would get no output, and wait)."""

    @stack.app.tool(filler_after=None)
    async def status() -> str:
        return "Shipped \ud83d"

    call = await start(
        stack, Script([HELLO, caller_says("status?"), model_calls("status", {}), model_says("It shipped.")])
    )
    await call.wait_done(timeout=10)
    assert call.bad_frames == []
    assert [out for _, out in call.function_outputs] == ["Shipped \ufffd"]
    await stack.sim.hang_up(call)
    summary = await stack.ended(call)
    assert [(t.name, t.outcome) for t in summary.tools] == [("status", "ok")]


async def test_a_structured_output_holding_half_an_emoji_reaches_the_model(stack: Stack) -> None:
    """The same inside what a tool returns as data (a dict, a list): its JSON has U+FFFD in place of the
    half, not an ``output_unencodable`` error for the model."""

    @stack.app.tool(filler_after=None)
    async def status() -> dict[str, Any]:
        return {"status": "Shipped \ud83d", "items": ["\udc4d", 2], "weight": float("nan")}

    call = await start(
        stack, Script([HELLO, caller_says("status?"), model_calls("status", {}), model_says("It shipped.")])
    )
    await call.wait_done(timeout=10)
    assert call.bad_frames == []
    (output,) = [out for _, out in call.function_outputs]
    assert json.loads(output) == {"status": "Shipped \ufffd", "items": ["\ufffd", 2], "weight": None}
    await stack.sim.hang_up(call)
    summary = await stack.ended(call)
    assert [(t.name, t.outcome) for t in summary.tools] == [("status", "ok")]


async def test_a_tool_left_behind_at_the_calls_end_is_recorded_with_the_time_it_ran(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tool that ignores the call's end's cancellation is given up once the grace is out: it is recorded
    as cancelled, with the time it ran until then (the whole grace at least), not as if it never ran."""
    monkeypatch.setattr("sideband.runtime.driver.TASK_GRACE", 0.2)
    started, stop = asyncio.Event(), asyncio.Event()

    @stack.app.tool(timeout=30, filler_after=None)
    async def stubborn() -> str:  # a buggy tool: swallows every cancellation until the test ends
        started.set()
        while not stop.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await stop.wait()
        return "late"

    try:
        with capture_logs() as logs:
            call = await start(
                stack, Script([HELLO, caller_says("go"), model_calls("stubborn", {}), model_says("Sorry.")])
            )
            await asyncio.wait_for(started.wait(), 5)
            stuck = stuck_tool()
            stack.sim.hang_up(call)
            summary = await stack.ended(call, timeout=5, check_script=False)
            stop.set()
            assert await asyncio.wait_for(stuck, 5) is None
    finally:
        stop.set()
    (record,) = summary.tools
    assert (record.name, record.outcome) == ("stubborn", "cancelled")
    assert record.duration >= 0.2  # it ran through the grace, at least
    (line,) = [e for e in logs if e["event"] == "tool.finished"]
    assert (line["outcome"], line["duration_ms"]) == ("cancelled", round(record.duration * 1000, 2))
