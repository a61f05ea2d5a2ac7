"""Which response is ours: each ``response.create`` carries its event id in ``response.metadata``, which the
service echoes on the response it starts, so the server's own answer to the caller is never taken for ours
when the two cross on the wire."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sideband import CallContext, Sideband
from sideband.runtime.machine import CallMachine, MachineConfig, Send
from sideband.testing import (
    Harness,
    Script,
    SimCall,
    Step,
    caller_hangs_up,
    caller_says,
    model_answers,
    model_says_first,
    run_app,
    wait_for_greeting,
)
from sideband.vowel.session import ENGINE_CAPABILITIES

SESSION = {"type": "realtime", "instructions": "hi"}
BUSY = "conversation_already_has_active_response"


def sent(actions: list[Any]) -> list[dict[str, Any]]:
    return [a.event for a in actions if isinstance(a, Send)]


def created(response_id: str, create: dict[str, Any] | None = None) -> dict[str, Any]:
    """``response.created`` as the service sends it: the metadata of the create it answers, else null."""
    metadata = create["response"]["metadata"] if create is not None else None
    return {"type": "response.created", "response": {"id": response_id, "metadata": metadata}}


def done(response_id: str, status: str = "completed", create: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"id": response_id, "status": status, "output": []}
    if create is not None:
        response["metadata"] = create["response"]["metadata"]
    if status == "failed":
        response["status_details"] = {"type": "failed", "error": {"type": "server_error", "code": None}}
    return {"type": "response.done", "response": response}


def refused(create: dict[str, Any]) -> dict[str, Any]:
    error = {"type": "invalid_request_error", "code": BUSY, "message": "busy", "event_id": create["event_id"]}
    return {"type": "error", "error": error}


def tagged_machine() -> CallMachine:
    """A machine past its greeting, which came back with the greeting create's tag."""
    m = CallMachine(MachineConfig(session=SESSION, greeting="Greet the caller."))
    greeting = next(e for e in sent(m.start()) if e["type"] == "response.create")
    m.receive({"type": "session.updated", "session": SESSION})
    m.receive(created("r_greet", greeting))
    m.receive(done("r_greet", create=greeting))
    return m


def after_an_unanswered_turn(m: CallMachine, instructions: str) -> dict[str, Any]:
    """The caller spoke, the server's answer did not start within the turn's grace, then a ``say()``:
    its create goes out, and the server's answer, late, may cross it. Returns the create."""
    m.receive({"type": "input_audio_buffer.speech_started", "item_id": "item_u"})
    m.receive({"type": "input_audio_buffer.speech_stopped", "item_id": "item_u"})
    assert sent(m.say(instructions)) == []  # held for the server's answer to the caller
    (create,) = sent(m.timer("turn"))
    return create


# ------------------------------------------------------------------------------------------ machine
def test_each_create_carries_its_own_event_id_and_an_engines_none() -> None:
    m = CallMachine(MachineConfig(session=SESSION, greeting="Greet the caller."))
    greeting = next(e for e in sent(m.start()) if e["type"] == "response.create")
    assert greeting["response"] == {
        "instructions": "Greet the caller.",
        "metadata": {"sideband": greeting["event_id"]},
    }
    m.receive({"type": "session.updated", "session": SESSION})
    m.receive(created("r_greet", greeting))
    (say,) = sent(m.receive(done("r_greet", create=greeting)) + m.say("Mention the sale."))
    assert (
        say["response"]["metadata"] == {"sideband": say["event_id"]}
        and say["event_id"] != greeting["event_id"]
    )

    engine = CallMachine(MachineConfig(session=SESSION), ENGINE_CAPABILITIES)
    engine.start()
    engine.receive({"type": "session.created", "session": {"id": "sess_1"}})
    engine.receive({"type": "session.updated", "session": {}})
    (plain,) = sent(engine.say("Mention the sale."))
    assert plain["response"] == {"instructions": "Mention the sale."}  # (the engine is not known to echo)


def test_the_callers_answer_that_crosses_our_create_is_not_taken_for_ours() -> None:
    """Our create and the server's answer to the caller cross: the server's starts first and ours meets
    it. Its start is not ours (nothing else of ours goes out meanwhile), and when ours is answered after
    all (it reached the service as the other ended), its failure is asked for again as it was asked."""
    m = tagged_machine()
    say = after_an_unanswered_turn(m, "Mention the sale.")
    assert m.receive(created("r_vad")) == []
    assert m.response_pending  # ours is still on its way
    assert sent(m.say("Then say goodbye.")) == []  # one create at a time: ours is still out
    assert sent(m.receive(done("r_vad"))) == []  # still out: its answer (or refusal) is yet to come
    assert sent(m.receive(created("r_say", say))) == []
    again = sent(m.receive(done("r_say", "failed", create=say)))
    assert [e["response"]["instructions"] for e in again] == ["Mention the sale."]


def test_a_refused_create_is_asked_for_again_after_the_servers_answer() -> None:
    m = tagged_machine()
    say = after_an_unanswered_turn(m, "Mention the sale.")
    m.receive(created("r_vad"))
    assert sent(m.receive(refused(say))) == []  # the server's answer is still under way
    (again,) = sent(m.receive(done("r_vad")))
    assert again["response"]["instructions"] == "Mention the sale." and again["event_id"] != say["event_id"]
    assert again["response"]["metadata"] == {"sideband": again["event_id"]}


def test_interrupt_before_our_reply_starts_spares_the_servers_answer() -> None:
    """``interrupt()`` while our create is on its way: the server's own answer starting meanwhile is not
    cancelled, and ours, refused, is not asked for again."""
    m = tagged_machine()
    say = after_an_unanswered_turn(m, "Mention the sale.")
    assert m.interrupt() == []  # nothing under way yet
    assert sent(m.receive(created("r_vad"))) == []  # not ours: not cancelled
    assert sent(m.receive(refused(say))) == []
    assert sent(m.receive(done("r_vad"))) == []  # the interrupted reply is not asked for again
    assert not m.response_pending


def test_interrupt_cancels_our_reply_when_it_starts_after_the_servers() -> None:
    m = tagged_machine()
    say = after_an_unanswered_turn(m, "Mention the sale.")
    m.interrupt()
    assert sent(m.receive(created("r_vad"))) == []
    m.receive(done("r_vad"))
    (cancel,) = sent(m.receive(created("r_say", say)))
    assert cancel["type"] == "response.cancel" and cancel["response_id"] == "r_say"


def test_interrupt_while_the_servers_answer_runs_stops_it_and_ours_on_its_way() -> None:
    m = tagged_machine()
    say = after_an_unanswered_turn(m, "Mention the sale.")
    m.receive(created("r_vad"))  # the server's own answer starts; ours is still on its way
    assert [e["type"] for e in sent(m.interrupt())] == ["response.cancel", "output_audio_buffer.clear"]
    assert sent(m.receive(refused(say))) == []
    assert sent(m.receive(done("r_vad", "cancelled"))) == []  # the interrupted say is not asked again


def test_the_start_of_an_earlier_create_keeps_the_interrupt_of_a_later_one() -> None:
    """A create that left on a lost socket is answered on the new one, late, while a later create of
    ours, interrupted, is on its way: that interrupt is for the later one."""
    m = tagged_machine()
    (first,) = sent(m.say("First."))
    m.reattached(())  # the socket is lost with the first create out
    m.receive({"type": "session.updated", "session": SESSION})
    (second,) = sent(m.timer("orphans"))  # nothing of it showed: asked for again
    assert second["response"]["instructions"] == "First."
    assert m.interrupt() == []
    assert sent(m.receive(created("r_first", first))) == []  # not the one interrupted
    assert sent(m.receive(refused(second))) == []
    assert sent(m.receive(done("r_first", create=first))) == []  # the second is not asked for again


def test_a_refusal_naming_no_event_is_not_taken_for_a_create_whose_tag_came_back() -> None:
    """Code's own raw ``response.create`` (no ``event_id``) refused while our reply runs: the error
    names no event, and cannot be about our create, which its tag showed started."""
    m = tagged_machine()
    (say,) = sent(m.say("Mention the sale."))
    m.receive(created("r_say", say))
    error = {"type": "invalid_request_error", "code": BUSY, "message": "busy", "event_id": None}
    assert sent(m.receive({"type": "error", "error": error})) == []
    assert sent(m.receive(done("r_say", create=say))) == []  # said once


def test_an_untagged_start_with_no_turn_of_the_callers_to_answer_is_ours() -> None:
    """The server answers by itself only a caller's turn (or an idle prompt): with none to answer, an
    untagged response after our create is ours (a reply whose tag did not come back is not left owed)."""
    m = tagged_machine()
    sent(m.say("First."))
    m.receive(created("r_1"))
    assert not m.response_pending
    assert sent(m.say("Second.")) == []  # queued behind it
    (second,) = sent(m.receive(done("r_1")))
    assert second["response"]["instructions"] == "Second."


def test_an_untagged_start_after_the_servers_answer_ended_is_ours() -> None:
    """Ours was neither refused while the server's answer ran nor answered since: the next response to
    start is its answer, tag or not."""
    m = tagged_machine()
    after_an_unanswered_turn(m, "First.")
    m.receive(created("r_vad"))
    assert sent(m.say("Second.")) == []
    assert sent(m.receive(done("r_vad"))) == []  # ours is still to start
    m.receive(created("r_1"))  # (its tag did not come back)
    assert not m.response_pending
    (second,) = sent(m.receive(done("r_1")))
    assert second["response"]["instructions"] == "Second."


def test_without_echoed_tags_the_next_response_to_start_is_taken_for_ours() -> None:
    """A service that echoes no metadata: the next response after our create is taken for ours."""
    m = CallMachine(MachineConfig(session=SESSION, greeting="Greet the caller."))
    m.start()
    m.receive({"type": "session.updated", "session": SESSION})
    m.receive({"type": "response.created", "response": {"id": "r_greet", "metadata": None}})
    m.receive(done("r_greet"))
    sent(m.say("Mention the sale."))
    m.interrupt()
    (cancel,) = sent(m.receive(created("r_next")))
    assert cancel["type"] == "response.cancel" and cancel["response_id"] == "r_next"


# ------------------------------------------------------------------------------------------ whole calls
async def turn_left_unanswered(h: Harness, call: SimCall) -> None:
    """Wait until the app's side of ``call`` has seen the caller's turn end (it expects the server's
    answer to it: a response is pending) and then given up waiting for that answer (the turn's grace
    is over; nothing is under way, owed or expected): a ``say()`` now goes out at once."""
    await call.wait_for(lambda c: c.step_index == 2 and c.phase == "wait_create", 5, "the race's step")
    machine = h.service.registry.calls[call.call_id].machine
    async with asyncio.timeout(5):
        while not machine.response_pending:
            await asyncio.sleep(0.001)
        while machine.response_pending or machine.busy:
            await asyncio.sleep(0.001)


async def crossing(act: Callable[[CallContext], None], *answers: Step) -> SimCall:
    """A whole call: the greeting, then the caller speaks and the server's answer is late; ``act`` runs
    on the call's context once the app has given up waiting for it, and the server's answer starts just
    as the create ``act`` makes arrives (``answers`` follow, then the caller hangs up)."""
    app = Sideband(instructions="You are the order desk.", greeting="Greet the caller.")
    contexts: list[CallContext] = []
    app.on_call_start(contexts.append)
    async with run_app(app) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Hi."),
                    caller_says("Hello? Can you help me?"),
                    model_says_first("Sure, I can help."),
                    *answers,
                    caller_hangs_up(),
                ]
            )
        )
        await turn_left_unanswered(h, call)
        (ctx,) = contexts
        act(ctx)
        await h.ended(call)
    return call


async def test_an_interrupted_say_crossing_the_callers_answer_leaves_that_answer_whole() -> None:
    """A say() interrupted before it started, while the server's own answer to the caller starts first:
    that answer is said whole (no cancel), and the say, refused, is not asked for again."""

    def say_then_think_better(ctx: CallContext) -> None:
        ctx.say("Mention the sale.")
        ctx.interrupt()  # (changed its mind at once: the say is on its way)

    call = await crossing(say_then_think_better)
    assert [(r.trigger, r.status, r.text) for r in call.responses] == [
        ("response.create", "completed", "Hi."),
        ("vad", "completed", "Sure, I can help."),
    ]
    kinds = [e["type"] for e in call.received]
    assert "response.cancel" not in kinds and kinds.count("response.create") == 2  # greeting, the say
    refusals = [e for e in call.sent_of_type("error") if e["error"]["code"] == BUSY]
    assert len(refusals) == 1


async def test_a_say_crossing_the_callers_answer_is_said_after_it() -> None:
    call = await crossing(lambda ctx: ctx.say("Mention the sale."), model_answers("We have a sale on."))
    assert [(r.trigger, r.status, r.text) for r in call.responses] == [
        ("response.create", "completed", "Hi."),
        ("vad", "completed", "Sure, I can help."),
        ("response.create", "completed", "We have a sale on."),
    ]
    creates = [e for e in call.received if e["type"] == "response.create"]
    assert [e["response"].get("instructions") for e in creates[1:]] == ["Mention the sale."] * 2
    assert call.responses[2].request == creates[2]["response"]  # the second, answered
    assert [e["response"]["metadata"] for e in creates] == [{"sideband": e["event_id"]} for e in creates]
