"""Which response is ours: each ``response.create`` carries its event id in ``response.metadata``, which the
service echoes on the response it starts, so the server's own answer to the caller is never taken for ours
when the two cross on the wire."""

from __future__ import annotations

from typing import Any

from sideband import CallContext, Sideband
from sideband.runtime.machine import CallMachine, MachineConfig, Send
from sideband.testing import (
    Script,
    caller_hangs_up,
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
    (say,) = sent(m.say("Mention the sale."))
    assert m.receive(created("r_vad")) == []
    assert m.response_pending  # ours is still on its way
    assert sent(m.say("Then say goodbye.")) == []  # one create at a time: ours is still out
    assert sent(m.receive(done("r_vad"))) == []  # still out: its answer (or refusal) is yet to come
    assert sent(m.receive(created("r_say", say))) == []
    again = sent(m.receive(done("r_say", "failed", create=say)))
    assert [e["response"]["instructions"] for e in again] == ["Mention the sale."]


def test_a_refused_create_is_asked_for_again_after_the_servers_answer() -> None:
    m = tagged_machine()
    (say,) = sent(m.say("Mention the sale."))
    m.receive(created("r_vad"))
    assert sent(m.receive(refused(say))) == []  # the server's answer is still under way
    (again,) = sent(m.receive(done("r_vad")))
    assert again["response"]["instructions"] == "Mention the sale." and again["event_id"] != say["event_id"]
    assert again["response"]["metadata"] == {"sideband": again["event_id"]}


def test_interrupt_before_our_reply_starts_spares_the_servers_answer() -> None:
    """``interrupt()`` while our create is on its way: the server's own answer starting meanwhile is not
    cancelled, and ours, refused, is not asked for again."""
    m = tagged_machine()
    (say,) = sent(m.say("Mention the sale."))
    assert m.interrupt() == []  # nothing under way yet
    assert sent(m.receive(created("r_vad"))) == []  # not ours: not cancelled
    assert sent(m.receive(refused(say))) == []
    assert sent(m.receive(done("r_vad"))) == []  # the interrupted reply is not asked for again
    assert not m.response_pending


def test_interrupt_cancels_our_reply_when_it_starts_after_the_servers() -> None:
    m = tagged_machine()
    (say,) = sent(m.say("Mention the sale."))
    m.interrupt()
    assert sent(m.receive(created("r_vad"))) == []
    m.receive(done("r_vad"))
    (cancel,) = sent(m.receive(created("r_say", say)))
    assert cancel["type"] == "response.cancel" and cancel["response_id"] == "r_say"


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
async def test_an_interrupted_say_crossing_the_callers_answer_leaves_that_answer_whole() -> None:
    """A say() interrupted before it started, while the server's own answer to the caller starts first:
    that answer is said whole (no cancel), and the say, refused, is not asked for again."""
    app = Sideband(instructions="You are the order desk.", greeting="Greet the caller.")
    contexts: list[CallContext] = []

    @app.on_call_start
    def keep(ctx: CallContext) -> None:
        contexts.append(ctx)

    async with run_app(app) as h:
        call = await h.call(
            Script([wait_for_greeting("Hi."), model_says_first("Sure, I can help."), caller_hangs_up()])
        )
        await call.wait_for(lambda c: c.step_index == 1 and c.phase == "wait_create", 5, "the race's step")
        (ctx,) = contexts
        ctx.say("Mention the sale.")
        ctx.interrupt()  # (changed its mind at once: the say is on its way)
        await h.ended(call)
    assert [(r.trigger, r.status, r.text) for r in call.responses] == [
        ("response.create", "completed", "Hi."),
        ("vad", "completed", "Sure, I can help."),
    ]
    kinds = [e["type"] for e in call.received]
    assert "response.cancel" not in kinds and kinds.count("response.create") == 2  # greeting, the say
    refusals = [e for e in call.sent_of_type("error") if e["error"]["code"] == BUSY]
    assert len(refusals) == 1


async def test_a_say_crossing_the_callers_answer_is_said_after_it() -> None:
    app = Sideband(instructions="You are the order desk.", greeting="Greet the caller.")
    contexts: list[CallContext] = []

    @app.on_call_start
    def keep(ctx: CallContext) -> None:
        contexts.append(ctx)

    async with run_app(app) as h:
        call = await h.call(
            Script(
                [
                    wait_for_greeting("Hi."),
                    model_says_first("Sure, I can help."),
                    model_answers("We have a sale on."),
                    caller_hangs_up(),
                ]
            )
        )
        await call.wait_for(lambda c: c.step_index == 1 and c.phase == "wait_create", 5, "the race's step")
        contexts[0].say("Mention the sale.")
        await h.ended(call)
    assert [(r.trigger, r.status, r.text) for r in call.responses] == [
        ("response.create", "completed", "Hi."),
        ("vad", "completed", "Sure, I can help."),
        ("response.create", "completed", "We have a sale on."),
    ]
    creates = [e for e in call.received if e["type"] == "response.create"]
    assert [e["response"].get("instructions") for e in creates[1:]] == ["Mention the sale."] * 2
    assert call.responses[2].request == creates[2]["response"]  # the second, answered
    assert [e["response"]["metadata"] for e in creates] == [{"sideband": e["event_id"]} for e in creates]
