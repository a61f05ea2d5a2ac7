"""Real frames recorded against OpenAI (tests/data/cassettes, from pydantic-ai) replayed into the call
state machine: every event is tolerated, and each recorded function call runs exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sideband.runtime.machine import CallMachine, MachineConfig, Notice, RunTool, Send

CASSETTES = sorted((Path(__file__).parent / "data" / "cassettes" / "openai").glob("*.jsonl"))


def server_events(path: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line["event"] for line in lines if line["dir"] == "server"]


def recorded_calls(events: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    return {
        e["call_id"]: (e["name"], e["arguments"])
        for e in events
        if e["type"] == "response.function_call_arguments.done"
    }


def test_cassettes_are_present() -> None:
    assert len(CASSETTES) >= 10


@pytest.mark.parametrize("path", CASSETTES, ids=lambda p: p.stem)
def test_replay_runs_each_recorded_call_once(path: Path) -> None:
    events = server_events(path)
    machine = CallMachine(MachineConfig(session={"type": "realtime"}))
    actions = machine.start()
    runs: list[RunTool] = []
    for event in events:
        out = machine.receive(event)
        actions += out
        for action in out:
            if isinstance(action, RunTool):
                runs.append(action)
                actions += machine.tool_done(action.call_id, '{"temperature": 21}')
    assert machine.closed is None
    expected = recorded_calls(events)
    completed = {
        item["call_id"]
        for e in events
        if e["type"] == "response.done" and e["response"]["status"] in ("completed", "incomplete")
        for item in e["response"].get("output") or []
        if item.get("type") == "function_call"
    }
    assert {r.call_id: (r.name, r.arguments) for r in runs} == {
        k: v for k, v in expected.items() if k in completed
    }
    assert len(runs) == len({r.call_id for r in runs})
    sent = [a.event["type"] for a in actions if isinstance(a, Send)]
    if runs:
        # Each output is followed by exactly one response.create for the batch.
        assert sent[-2:] == ["conversation.item.create", "response.create"]
    transcripts = [a.fields for a in actions if isinstance(a, Notice) and a.event == "transcript"]
    done_transcripts = [
        e.get("transcript") or e.get("text")
        for e in events
        if e["type"] in ("response.output_audio_transcript.done", "response.output_text.done")
    ]
    assert [t["text"] for t in transcripts if t["role"] == "agent"] == [
        t.strip() for t in done_transcripts if t
    ]


def test_tool_round_cassette_has_a_call_to_replay() -> None:
    events = server_events(next(p for p in CASSETTES if p.stem == "ws_tool_call_round"))
    assert next(iter(recorded_calls(events).values()))[0] == "get_weather"
