"""Token usage: counted per call (``CallSummary.usage``), logged at the end, and totalled on ``/metrics``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sideband import Usage
from sideband.testing import Script, caller_hangs_up, caller_says, model_calls, model_says, wait_for_greeting

from .conftest import Stack, capture_logs

CASSETTES = Path(__file__).parent / "data" / "cassettes" / "openai"


def _recorded(event_type: str) -> list[dict[str, object]]:
    """Events of one type, as the server sent them in the recorded sessions."""
    found = []
    for path in sorted(CASSETTES.glob("ws_*.jsonl")):
        for line in path.read_text().splitlines():
            frame = json.loads(line)
            if frame.get("dir") == "server" and frame["event"].get("type") == event_type:
                found.append(frame["event"])
    return found


def test_recorded_response_usage_is_counted_in_full() -> None:
    done = [e["response"] for e in _recorded("response.done")]  # type: ignore[index]
    assert done, "no response.done recorded"
    usage = Usage()
    for response in done:
        usage.add_response(response["usage"])  # type: ignore[index]
    raw = [r["usage"] for r in done]  # type: ignore[index]
    assert usage.responses == len(done)
    assert usage.input_tokens == sum(u["input_tokens"] for u in raw)
    assert usage.output_tokens == sum(u["output_tokens"] for u in raw)
    assert usage.total_tokens == sum(u["total_tokens"] for u in raw)
    assert usage.input_audio_tokens == sum(u["input_token_details"]["audio_tokens"] for u in raw)
    assert usage.input_text_tokens == sum(u["input_token_details"]["text_tokens"] for u in raw)
    assert usage.cached_tokens == sum(u["input_token_details"]["cached_tokens"] for u in raw)
    assert usage.output_audio_tokens == sum(u["output_token_details"]["audio_tokens"] for u in raw)
    assert usage.output_audio_tokens > 0 and usage.input_audio_tokens > 0  # (the recordings hold both)
    assert usage.input_text_tokens + usage.input_audio_tokens + usage.input_image_tokens == usage.input_tokens


def test_recorded_transcription_usage_is_counted() -> None:
    done = _recorded("conversation.item.input_audio_transcription.completed")
    assert done
    usage = Usage()
    for event in done:
        usage.add_transcription(event["usage"])  # type: ignore[arg-type]
    assert usage.transcription_seconds == sum(e["usage"]["seconds"] for e in done)  # type: ignore[index]
    assert usage.transcription_seconds > 0


def test_token_priced_transcription_and_cached_details() -> None:
    usage = Usage()
    usage.add_transcription({"type": "tokens", "input_tokens": 30, "output_tokens": 7, "total_tokens": 37})
    usage.add_transcription({"type": "duration", "seconds": 1.5})
    usage.add_response(
        {
            "input_tokens": 100,
            "output_tokens": 20,
            "input_token_details": {
                "text_tokens": 40,
                "audio_tokens": 60,
                "cached_tokens": 64,
                "cached_tokens_details": {"text_tokens": 24, "audio_tokens": 40},
            },
            "output_token_details": {"text_tokens": 5, "audio_tokens": 15},
        }
    )
    assert (usage.transcription_input_tokens, usage.transcription_output_tokens) == (30, 7)
    assert usage.transcription_seconds == 1.5
    assert (usage.cached_tokens, usage.cached_text_tokens, usage.cached_audio_tokens) == (64, 24, 40)
    assert (usage.output_text_tokens, usage.output_audio_tokens, usage.total_tokens) == (5, 15, 120)


@pytest.mark.parametrize(
    "junk",
    [
        {"input_tokens": True, "output_tokens": -3},
        {"input_tokens": "12", "output_tokens": 1.5, "input_token_details": [], "output_token_details": None},
        {"input_tokens": 2**60, "input_token_details": {"cached_tokens_details": "x"}},
    ],
)
def test_odd_counts_count_as_none(junk: dict[str, object]) -> None:
    usage = Usage()
    usage.add_response(junk)
    usage.add_transcription({"type": "duration", "seconds": True})
    usage.add_transcription({"type": "duration", "seconds": -1})
    assert usage == Usage(responses=1)


async def test_a_calls_usage_is_in_its_summary_its_end_line_and_the_metrics(stack: Stack) -> None:
    def script() -> Script:
        return Script(
            [
                wait_for_greeting("Hello."),
                caller_says("Where is order 42?"),
                model_calls([("lookup_order", {"order_id": "42"})]),
                model_says("It ships tomorrow."),
                caller_hangs_up(),
            ]
        )

    calls, summaries = [], []
    with capture_logs() as logs:
        for _ in range(2):
            call = stack.sim.create_call(script())
            result = await stack.sender.deliver(stack.sim.incoming_event(call))
            assert result.status == 200, result
            await call.wait_done(timeout=10)
            summaries.append(await stack.ended(call))
            calls.append(call)
    for call, summary in zip(calls, summaries, strict=True):
        reported = [e["response"]["usage"] for e in call.sent_of_type("response.done")]
        heard = [
            e["usage"] for e in call.sent_of_type("conversation.item.input_audio_transcription.completed")
        ]
        assert len(reported) >= 3 and heard  # greeting, tool call, answer; the caller's words
        usage = summary.usage
        assert usage.responses == len(reported)
        assert usage.input_tokens == sum(u["input_tokens"] for u in reported) > 0
        assert usage.output_tokens == sum(u["output_tokens"] for u in reported) > 0
        assert usage.output_audio_tokens == sum(u["output_token_details"]["audio_tokens"] for u in reported)
        # The default transcription model is priced per token.
        assert usage.transcription_input_tokens == sum(u["input_tokens"] for u in heard) > 0
        assert usage.transcription_output_tokens == sum(u["output_tokens"] for u in heard) > 0
    ended = [e for e in logs if e["event"] == "call.ended"]
    assert [(e["input_tokens"], e["output_tokens"]) for e in ended] == [
        (s.usage.input_tokens, s.usage.output_tokens) for s in summaries
    ]
    async with aiohttp.ClientSession() as http, http.get(stack.url("/metrics")) as resp:
        text = await resp.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    one, two = (s.usage for s in summaries)
    assert samples["sideband_responses_total", ()] == one.responses + two.responses
    assert samples["sideband_tokens_total", (("direction", "output"), ("modality", "audio"))] == (
        one.output_audio_tokens + two.output_audio_tokens
    )
    assert samples["sideband_tokens_total", (("direction", "input"), ("modality", "text"))] == (
        one.input_text_tokens + two.input_text_tokens
    )
    assert samples["sideband_transcription_tokens_total", (("direction", "input"),)] == (
        one.transcription_input_tokens + two.transcription_input_tokens
    )
    assert samples["sideband_transcription_seconds_total", ()] == 0
    assert samples["sideband_cached_tokens_total", (("modality", "audio"),)] == 0


async def test_each_answered_turn_is_timed_from_the_callers_stop_to_the_models_audio(stack: Stack) -> None:
    @stack.app.tool
    async def slow_lookup(order_id: str) -> str:
        """Look an order up, slowly."""
        await asyncio.sleep(0.3)  # (the wait being measured)
        return "shipped"

    script = Script(
        [
            wait_for_greeting("Hello."),  # no turn before it: not timed
            caller_says("Where is order 42?"),
            model_calls("slow_lookup", {"order_id": "42"}),  # no audio: the caller still waits
            model_says("It shipped."),
            caller_says("Thanks."),
            model_says("Goodbye."),
            caller_hangs_up(),
        ]
    )
    with capture_logs() as logs:
        call = stack.sim.create_call(script)
        assert (await stack.sender.deliver(stack.sim.incoming_event(call))).status == 200
        await call.wait_done(timeout=10)
        summary = await stack.ended(call)
    first, second = summary.turn_seconds
    assert first >= 0.3 and second >= 0
    answered = [e for e in logs if e["event"] == "turn.answered"]
    assert [e["latency_ms"] for e in answered] == [round(t * 1000, 1) for t in summary.turn_seconds]
    said = {text: r["id"] for r in (e["response"] for e in call.sent_of_type("response.done"))
            for text in ("It shipped.", "Goodbye.") if text in json.dumps(r["output"])}  # fmt: skip
    assert [e["response_id"] for e in answered] == [said["It shipped."], said["Goodbye."]]
    async with aiohttp.ClientSession() as http, http.get(stack.url("/metrics")) as resp:
        text = await resp.text()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "sideband_turn_seconds")
    assert family.type == "histogram"
    values = {s.name: s.value for s in family.samples if not s.labels}
    assert values["sideband_turn_seconds_count"] == 2
    assert abs(values["sideband_turn_seconds_sum"] - (first + second)) < 1e-5
