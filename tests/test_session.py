"""Tests for sideband.session: the session payload, merging, and local accept-payload validation."""

import re
from typing import Any

import pytest
from pydantic import ValidationError

from sideband import Sideband
from sideband.session import (
    Accept,
    DecisionError,
    Refer,
    Reject,
    SessionConfig,
    SessionConfigError,
    encode_session,
    session_update,
    validate_accept_payload,
)

TOOL = {
    "type": "function",
    "name": "lookup_order",
    "description": "Look up.",
    "parameters": {"type": "object", "properties": {}},
}


def _walk(node: Any) -> list[Any]:
    """Every value nested in ``node``."""
    if isinstance(node, dict):
        return [v for value in node.values() for v in [value, *_walk(value)]]
    if isinstance(node, list):
        return [v for value in node for v in [value, *_walk(value)]]
    return []


# -- payload ---------------------------------------------------------------------------------------------


def test_default_payload() -> None:
    body = SessionConfig().payload([])
    assert next(iter(body)) == "type"
    assert body == {
        "type": "realtime",
        "model": "gpt-realtime",
        "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}},
    }
    validate_accept_payload(body)


def test_greeting_is_not_part_of_the_payload() -> None:
    body = SessionConfig(greeting="Say hi").payload([])
    assert "greeting" not in body
    assert "Say hi" not in repr(body)


def test_full_payload_shape() -> None:
    cfg = SessionConfig(
        model="gpt-realtime-mini",
        instructions="Be brief.",
        voice="marin",
        speed=1.2,
        output_modalities=["audio"],
        transcription_model="whisper-1",
        turn_detection={"type": "semantic_vad", "eagerness": "low"},
        noise_reduction={"type": "near_field"},
        tool_choice="auto",
        max_output_tokens="inf",
        tracing="auto",
        prompt={"id": "pmpt_1"},
        include=["item.input_audio_transcription.logprobs"],
    )
    body = cfg.payload([TOOL])
    assert next(iter(body)) == "type"
    assert body == {
        "type": "realtime",
        "model": "gpt-realtime-mini",
        "instructions": "Be brief.",
        "output_modalities": ["audio"],
        "audio": {
            "input": {
                "transcription": {"model": "whisper-1"},
                "turn_detection": {"type": "semantic_vad", "eagerness": "low"},
                "noise_reduction": {"type": "near_field"},
            },
            "output": {"voice": "marin", "speed": 1.2},
        },
        "tools": [TOOL],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": "auto",
        "prompt": {"id": "pmpt_1"},
        "include": ["item.input_audio_transcription.logprobs"],
    }
    validate_accept_payload(body)


def test_voice_only_gives_output_without_input() -> None:
    body = SessionConfig(transcription_model=None, voice="cedar").payload([])
    assert body["audio"] == {"output": {"voice": "cedar"}}


def test_session_update_refuses_the_greeting_which_is_no_session_field() -> None:
    with pytest.raises(
        SessionConfigError, match=r"^greeting is not a session field \(.*ctx\.say\(instructions\)"
    ):
        session_update({"instructions": "You are billing.", "greeting": "Greet the caller as billing."})
    assert session_update({"instructions": "You are billing."}) == {
        "instructions": "You are billing.",
        "type": "realtime",
    }


def test_a_custom_voice_is_sent_as_its_id_object() -> None:
    body = SessionConfig(transcription_model=None, voice="voice_1234").payload([])
    assert body["audio"] == {"output": {"voice": {"id": "voice_1234"}}}
    assert session_update({"voice": "voice_1234"})["audio"] == {"output": {"voice": {"id": "voice_1234"}}}
    assert session_update({"voice": "cedar"})["audio"] == {"output": {"voice": "cedar"}}
    with pytest.raises(SessionConfigError, match=r"^unknown voice 'marine' \(did you mean 'marin'\?\)$"):
        session_update({"voice": "marine"})


def test_no_audio_when_nothing_audio_is_set() -> None:
    body = SessionConfig(transcription_model=None).payload([])
    assert "audio" not in body


def test_no_model_when_none() -> None:
    assert "model" not in SessionConfig(model=None).payload([])


def test_no_tools_key_without_tools() -> None:
    assert "tools" not in SessionConfig().payload([])


def test_tools_passed_as_given() -> None:
    tools = [TOOL, {**TOOL, "name": "other"}]
    assert SessionConfig().payload(tools)["tools"] == tools


def test_no_none_values_emitted() -> None:
    body = SessionConfig(model=None, transcription_model=None).payload([])
    assert body == {"type": "realtime"}
    body = SessionConfig(voice="marin", instructions="x").payload([TOOL])
    assert None not in _walk(body)


def test_extra_fields_pass_through() -> None:
    cfg = SessionConfig(temperature=0.7, truncation={"type": "retention_ratio"})  # type: ignore[call-arg]
    body = cfg.payload([])
    assert body["temperature"] == 0.7
    assert body["truncation"] == {"type": "retention_ratio"}
    assert body["type"] == "realtime"


def test_an_audio_object_in_the_extra_fields_is_merged_into_the_built_one_per_side_and_key() -> None:
    audio = {"output": {"voice": {"id": "voice_1234"}}, "input": {"turn_detection": {"type": "server_vad"}}}
    cfg = SessionConfig(
        voice="marin",
        speed=1.1,
        turn_detection={"type": "semantic_vad"},
        noise_reduction={"type": "near_field"},
        audio=audio,  # type: ignore[call-arg]
    )
    assert cfg.payload([])["audio"] == {
        "input": {
            "transcription": {"model": "gpt-4o-mini-transcribe"},
            "turn_detection": {"type": "server_vad"},  # a key given whole replaces the built one
            "noise_reduction": {"type": "near_field"},
        },
        "output": {"voice": {"id": "voice_1234"}, "speed": 1.1},
    }
    # still checked as a whole: a SIP-refused key the merge brings in is refused
    tuned = {"type": "server_vad", "threshold": 0.5}
    bad = SessionConfig(turn_detection=tuned, audio={"output": {}})  # type: ignore[call-arg]
    with pytest.raises(SessionConfigError, match="threshold"):
        validate_accept_payload(bad.payload([]))


def test_merged_and_layered_decisions_merge_audio_objects() -> None:
    app = SessionConfig(audio={"input": {"noise_reduction": {"type": "far_field"}}})  # type: ignore[call-arg]
    out = app.merged(audio={"output": {"voice": {"id": "voice_1234"}}})
    assert out.payload([])["audio"] == {
        "input": {
            "transcription": {"model": "gpt-4o-mini-transcribe"},
            "noise_reduction": {"type": "far_field"},
        },
        "output": {"voice": {"id": "voice_1234"}},
    }
    route = Accept(
        session={"audio": {"output": {"voice": {"id": "voice_1234"}, "speed": 1.2}}, "x": {"a": 1}}
    )
    hook = Accept(session={"audio": {"output": {"speed": 0.9}}, "x": {"b": 2}})
    assert hook.over(route).session == {
        "audio": {"output": {"voice": {"id": "voice_1234"}, "speed": 0.9}},
        "x": {"b": 2},  # other fields are replaced whole
    }


def test_a_later_layers_named_setting_wins_over_an_earlier_layers_audio_object() -> None:
    """App, then route, then hook: a voice, speed, turn detection, noise reduction or transcription
    model given by name in a later layer replaces that key of an earlier layer's ``audio`` object (the
    rest of which stays); an ``audio`` object still wins over the named settings of its own layer and
    of the layers before."""
    app = Sideband(
        session=SessionConfig(
            audio={  # type: ignore[call-arg]
                "input": {
                    "transcription": {"model": "gpt-4o-transcribe", "language": "de"},
                    "noise_reduction": {"type": "near_field"},
                    "turn_detection": {"type": "server_vad"},
                },
                "output": {"voice": "ash", "speed": 0.8},
            }
        )
    )
    transcription = {"model": "gpt-4o-transcribe", "language": "de"}

    def audio(accept: Accept) -> Any:
        return app.plan(accept).session["audio"]

    assert audio(Accept(voice="marin"))["output"] == {"voice": "marin", "speed": 0.8}
    assert audio(Accept(session={"speed": 1.2}))["output"] == {"voice": "ash", "speed": 1.2}
    off = audio(Accept(session={"transcription_model": None, "noise_reduction": None}))
    assert off["input"] == {"turn_detection": {"type": "server_vad"}}
    semantic = {"type": "semantic_vad"}
    swapped = audio(Accept(session={"transcription_model": "whisper-1", "turn_detection": semantic}))
    assert swapped["input"]["transcription"] == {"model": "whisper-1"}
    assert swapped["input"]["turn_detection"] == semantic
    # an audio object of the same layer wins over its named setting
    both = Accept(voice="marin", session={"audio": {"output": {"voice": "cedar"}}})
    assert audio(both)["output"] == {"voice": "cedar", "speed": 0.8}
    # route, then hook: the hook's voice over the route's audio object, and the other way round
    route = Accept(session={"audio": {"output": {"voice": "ash", "speed": 1.1}}})
    layered = Accept(voice="marin").over(route)
    assert audio(layered) == {
        "input": {**audio(Accept())["input"], "transcription": transcription},
        "output": {"voice": "marin", "speed": 1.1},
    }
    hook = Accept(session={"audio": {"output": {"voice": "cedar"}}})
    assert audio(hook.over(Accept(voice="ash", session={"speed": 1.3})))["output"] == {
        "voice": "cedar",
        "speed": 1.3,
    }
    # a named setting given to the app itself over its own session's audio object
    own = Sideband(voice="marin", session=SessionConfig(audio={"output": {"voice": "ash"}}))  # type: ignore[call-arg]
    assert own.plan().session["audio"]["output"] == {"voice": "marin"}


def test_payload_is_fresh_each_time() -> None:
    cfg = SessionConfig(voice="marin")
    first = cfg.payload([])
    first["audio"]["output"]["voice"] = "changed"
    first["model"] = "changed"
    assert cfg.payload([])["audio"]["output"]["voice"] == "marin"
    assert cfg.payload([])["model"] == "gpt-realtime"


def test_config_is_frozen_and_validated() -> None:
    cfg = SessionConfig()
    with pytest.raises(ValidationError):
        cfg.voice = "x"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        SessionConfig(speed=0)
    with pytest.raises(ValidationError):
        SessionConfig(max_output_tokens="lots")  # type: ignore[arg-type]


# -- merged ----------------------------------------------------------------------------------------------


def test_merged_overrides_and_keeps_the_rest() -> None:
    base = SessionConfig(instructions="a", voice="marin", temperature=0.5)  # type: ignore[call-arg]
    out = base.merged(instructions="b", speed=1.1)
    assert out.instructions == "b"
    assert out.voice == "marin"
    assert out.speed == 1.1
    assert out.payload([])["temperature"] == 0.5
    assert base.instructions == "a"  # the original is untouched
    assert base.speed is None


def test_merged_ignores_none() -> None:
    base = SessionConfig(instructions="a", voice="marin")
    out = base.merged(instructions=None, voice=None, greeting=None)
    assert (out.instructions, out.voice, out.greeting) == ("a", "marin", base.greeting)


def test_merged_unsets_a_field_given_none_other_than_a_decisions_own() -> None:
    base = SessionConfig(turn_detection={"type": "semantic_vad"}, truncation="auto")  # type: ignore[call-arg]
    out = base.merged(transcription_model=None, turn_detection=None, truncation=None, instructions=None)
    assert (out.transcription_model, out.turn_detection, out.instructions) == (None, None, None)
    assert out.payload([]) == {"type": "realtime", "model": "gpt-realtime"}  # no null sent for truncation


def test_merged_accepts_new_extra_fields() -> None:
    out = SessionConfig().merged(temperature=0.9)
    assert out.payload([])["temperature"] == 0.9


def test_merged_validates() -> None:
    with pytest.raises(ValidationError):
        SessionConfig().merged(speed=-1)


# -- validate_accept_payload ------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [{}, {"type": "transcription"}, {"model": "gpt-realtime"}])
def test_type_required(body: dict[str, Any]) -> None:
    with pytest.raises(SessionConfigError, match="type"):
        validate_accept_payload(body)


def test_session_config_error_is_value_error() -> None:
    assert issubclass(SessionConfigError, ValueError)


@pytest.mark.parametrize("side", ["input", "output"])
def test_audio_format_refused_for_sip(side: str) -> None:
    body = {"type": "realtime", "audio": {side: {"format": {"type": "audio/pcmu"}}}}
    with pytest.raises(SessionConfigError, match=f"audio.{side}.format"):
        validate_accept_payload(body)
    validate_accept_payload(body, sip=False)


def test_audio_format_from_extra_field_is_caught() -> None:
    cfg = SessionConfig(audio={"input": {"format": {"type": "audio/pcm", "rate": 24000}}})  # type: ignore[call-arg]
    with pytest.raises(SessionConfigError):
        validate_accept_payload(cfg.payload([]))


@pytest.mark.parametrize("key", ["threshold", "prefix_padding_ms", "silence_duration_ms"])
def test_turn_detection_tuning_refused_for_sip(key: str) -> None:
    cfg = SessionConfig(turn_detection={"type": "server_vad", key: 1})
    body = cfg.payload([])
    with pytest.raises(SessionConfigError, match=key):
        validate_accept_payload(body)
    validate_accept_payload(body, sip=False)


def test_turn_detection_type_alone_is_fine() -> None:
    for td in ({"type": "server_vad"}, {"type": "semantic_vad", "eagerness": "high"}):
        validate_accept_payload(SessionConfig(turn_detection=td).payload([]))


@pytest.mark.parametrize(
    "td, message",
    [
        (
            {"type": "semantic_vad", "idle_timeout_ms": 5000},
            "idle_timeout_ms is not a setting of semantic_vad",
        ),
        ({"type": "semantic_vad", "threshold": 0.5}, "threshold is not a setting of semantic_vad"),
        ({"type": "server_vad", "eagerness": "low"}, "eagerness is not a setting of server_vad"),
        (
            {"type": "server_vad", "idle_timeout": 5000},
            "did you mean 'audio.input.turn_detection.idle_timeout_ms'",
        ),
    ],
)
def test_turn_detection_keys_of_the_other_kind_or_misspelt_are_refused(
    td: dict[str, Any], message: str
) -> None:
    body = SessionConfig(turn_detection=td).payload([])
    with pytest.raises(SessionConfigError, match=message):
        validate_accept_payload(body, sip=False)


def test_idle_timeout_and_reasoning_pass() -> None:
    cfg = SessionConfig(
        turn_detection={"type": "server_vad", "idle_timeout_ms": 6000}, reasoning={"effort": "low"}
    )  # type: ignore[call-arg]
    validate_accept_payload(cfg.payload([]))
    with pytest.raises(SessionConfigError, match="did you mean 'reasoning'"):
        validate_accept_payload({"type": "realtime", "reasonning": {"effort": "low"}})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (SessionConfig(speed=2.0), "speed must be a number from 0.25 to 1.5, not 2.0"),
        (SessionConfig(voice=""), "voice must be a voice's name"),
        (SessionConfig(audio={"output": {"voice": 5}}), "voice must be a voice's name"),  # type: ignore[call-arg]
        (SessionConfig(tool_choice="lookup_order"), '"name": "lookup_order"}), not \'lookup_order\''),
        (SessionConfig(tool_choice={"type": "function"}), 'needs the tool\'s "name"'),
        (
            SessionConfig(tool_choice={"type": "function", "name": "refund"}),
            "tool_choice names the tool 'refund', which the session does not offer",
        ),
        (SessionConfig(tool_choice={"name": "lookup_order"}), "tool_choice must be"),
        (SessionConfig(model=""), "model must be a model's name (\"gpt-realtime\"), not ''"),
        (SessionConfig(max_output_tokens=0), 'max_output_tokens must be from 1 to 4096, or "inf", not 0'),
        (SessionConfig(max_output_tokens=99999), "not 99999"),
        (SessionConfig(voice="marine"), "unknown voice 'marine' (did you mean 'marin'?)"),
        (SessionConfig(voice="ALLOY"), "unknown voice 'ALLOY' (did you mean 'alloy'?)"),
        (SessionConfig(audio={"output": {"voice": "shimer"}}), "(did you mean 'shimmer'?)"),  # type: ignore[call-arg]
        (SessionConfig(voice="juniper"), None),  # a voice we do not know of may be a new one
        (SessionConfig(voice="voice_marin"), None),  # a custom voice's id
        (SessionConfig(max_output_tokens="inf", model="gpt-realtime"), None),
        (SessionConfig(max_output_tokens=4096), None),
    ],
)
def test_values_openai_refuses_are_refused(config: SessionConfig, message: str | None) -> None:
    """A session config's value of the wrong kind, or out of range, fails every call it is sent with
    (the bounds themselves pass: ``message`` None)."""
    if message is None:
        validate_accept_payload(config.payload([TOOL]))
        return
    with pytest.raises(SessionConfigError) as info:
        validate_accept_payload(config.payload([TOOL]))
    assert message in str(info.value)


@pytest.mark.parametrize(
    "config",
    [
        SessionConfig(speed=0.25, voice="voice_1234", tool_choice="required"),
        SessionConfig(speed=1.5, tool_choice={"type": "function", "name": "lookup_order"}),
        SessionConfig(tool_choice={"type": "mcp", "server_label": "crm"}),
    ],
)
def test_values_openai_takes_pass(config: SessionConfig) -> None:
    validate_accept_payload(config.payload([TOOL]))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"output_modalities": ["audio", "text"]}, 'output_modalities must be ["audio"] or ["text"]'),
        ({"output_modalities": []}, 'output_modalities must be ["audio"] or ["text"], not []'),
        ({"output_modalities": ["speech"]}, "output_modalities must be"),
        ({"turn_detection": {"create_response": False}}, 'turn_detection needs a "type": "server_vad" or'),
        ({"turn_detection": {}}, 'turn_detection needs a "type"'),
        ({"turn_detection": {"type": "vad"}}, "not 'vad'"),
        ({"audio": {"input": {"turn_detection": "server_vad"}}}, "turn_detection must be an object, not str"),
        (
            {"turn_detection": {"type": "semantic_vad", "eagerness": "normal"}},
            'eagerness must be "low", "medium", "high" or "auto", not \'normal\'',
        ),
        ({"turn_detection": {"type": "server_vad", "idle_timeout_ms": 0}}, "idle_timeout_ms must be"),
        ({"turn_detection": {"type": "server_vad", "idle_timeout_ms": 1.5}}, "not 1.5"),
        ({"turn_detection": {"type": "server_vad", "idle_timeout_ms": True}}, "not True"),
        ({"turn_detection": {"type": "server_vad", "idle_timeout_ms": "6000"}}, "not '6000'"),
        ({"noise_reduction": {"type": "nearfield"}}, 'noise_reduction must be {"type": "near_field"}'),
        ({"audio": {"input": {"noise_reduction": "near_field"}}}, "noise_reduction must be"),
        ({"noise_reduction": {}}, "noise_reduction must be"),
        ({"audio": {"input": {"transcription": {"language": "en"}}}}, 'transcription needs a "model"'),
        ({"audio": {"input": {"transcription": "whisper-1"}}}, 'transcription needs a "model"'),
        ({"audio": {"output": None}}, "audio.output must be an object, not None"),
        ({"audio": {"input": None}}, "audio.input must be an object, not None"),
    ],
)
def test_values_the_calls_api_refuses_are_refused_before_any_call(
    fields: dict[str, Any], message: str
) -> None:
    """Refused by OpenAI at every call (the accept, or the update, fails): refused here, at start."""
    body = SessionConfig.model_validate(fields).payload([TOOL])
    with pytest.raises(SessionConfigError) as info:
        validate_accept_payload(body)
    assert message in str(info.value)
    with pytest.raises(SessionConfigError) as info:
        session_update(fields)  # (an update mid-call: nothing is sent)
    assert message in str(info.value)


def test_an_audio_object_of_none_is_refused_in_a_session_and_left_out_of_an_update() -> None:
    with pytest.raises(SessionConfigError, match=r"^audio must be an object, not None$"):
        validate_accept_payload({"type": "realtime", "audio": None})
    assert session_update({"audio": None}) == {"type": "realtime"}


@pytest.mark.parametrize(
    "fields",
    [
        {"output_modalities": ["text"]},
        {"turn_detection": None, "noise_reduction": None, "transcription_model": None},
        {"turn_detection": {"type": "server_vad", "idle_timeout_ms": None}},
        {"turn_detection": {"type": "server_vad", "idle_timeout_ms": 1}},
        {"turn_detection": {"type": "semantic_vad", "eagerness": "auto"}},
        {"noise_reduction": {"type": "far_field"}},
        {"audio": {"input": {"transcription": {"model": "whisper-1", "language": "en"}}}},
    ],
)
def test_the_same_settings_in_range_pass(fields: dict[str, Any]) -> None:
    validate_accept_payload(SessionConfig.model_validate(fields).payload([TOOL]))
    session_update(fields)


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        (
            {"type": "function", "name": "lookup_order", "strict": True},
            'takes "type", "name", not \'strict\'',
        ),
        ({"type": "mcp", "server_label": "crm", "tool": "read"}, "not 'tool'"),
        ({"type": "mcp", "server_label": "crm", "name": 5}, "tool_choice name must be a string, not int"),
    ],
)
def test_a_tool_choice_with_a_field_openai_does_not_take_is_refused(
    choice: dict[str, Any], message: str
) -> None:
    with pytest.raises(SessionConfigError) as info:
        validate_accept_payload(SessionConfig(tool_choice=choice).payload([TOOL]))
    assert message in str(info.value)
    validate_accept_payload(
        SessionConfig(tool_choice={"type": "mcp", "server_label": "crm", "name": "read"}).payload([])
    )


@pytest.mark.parametrize(
    ("choice", "message"),
    [
        (
            {"type": "function", "name": "lookup_order"},
            "names the tool 'lookup_order', which the session does not",
        ),
        ("required", 'tool_choice "required" with no tools'),
    ],
)
def test_a_session_without_tools_cannot_force_one(choice: Any, message: str) -> None:
    """No tools (a route's ``tools = []``, ``Accept(tools=())``): the session has none to force."""
    with pytest.raises(SessionConfigError, match=re.escape(message)):
        validate_accept_payload(SessionConfig(tool_choice=choice).payload([]))
    # An update that leaves the tools out keeps them: the choice is checked against the call's (elsewhere).
    assert session_update({"tool_choice": choice})["tool_choice"] == choice
    with pytest.raises(SessionConfigError, match=re.escape(message)):
        session_update({"tool_choice": choice, "tools": []})


def test_within_one_update_the_audio_object_wins_over_the_named_settings() -> None:
    """As within one config: ``audio`` gives the key, its named setting does not replace it."""
    update = session_update(
        {
            "voice": "cedar",
            "speed": 1.2,
            "transcription_model": None,
            "audio": {"output": {"voice": "ash"}, "input": {"transcription": {"model": "whisper-1"}}},
        }
    )
    assert update["audio"] == {
        "output": {"voice": "ash", "speed": 1.2},
        "input": {"transcription": {"model": "whisper-1"}},
    }
    config = SessionConfig(voice="cedar", audio={"output": {"voice": "ash"}})  # type: ignore[call-arg]
    assert config.payload([])["audio"]["output"] == {"voice": "ash"}


def test_audio_must_be_an_object() -> None:
    with pytest.raises(SessionConfigError):
        validate_accept_payload({"type": "realtime", "audio": "pcmu"})


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"audio": "pcmu"}, "audio must be an object, not str"),
        ({"audio": {"input": "pcmu"}}, "audio.input must be an object, not str"),
        ({"audio": {"output": ["x"]}}, "audio.output must be an object, not list"),
        ({"audio": {"output": "x"}, "voice": "marin"}, "audio.output must be an object, not str"),
        ({"audio": {"input": 1}, "transcription_model": None}, "audio.input must be an object, not int"),
        ({"audio": []}, "audio must be an object, not list"),  # (an empty one is no object either)
        ({"audio": ""}, "audio must be an object, not str"),
        ({"audio": {"output": []}}, "audio.output must be an object, not list"),
        ({"audio": {"input": ""}}, "audio.input must be an object, not str"),
        ({"audio": {"input": False}, "voice": "marin"}, "audio.input must be an object, not bool"),
    ],
)
def test_a_malformed_audio_object_is_a_session_config_error(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(SessionConfigError, match=f"^{re.escape(message)}$"):
        session_update(fields)
    if "audio" in fields:
        with pytest.raises(SessionConfigError, match=f"^{re.escape(message)}$"):
            validate_accept_payload({"type": "realtime", "audio": fields["audio"]})


def test_an_audio_side_given_none_takes_the_named_settings() -> None:
    update = session_update({"audio": {"input": None}, "voice": "marin", "transcription_model": "m"})
    assert update["audio"] == {"input": {"transcription": {"model": "m"}}, "output": {"voice": "marin"}}


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "function"},
        {"type": "function", "name": ""},
        {"type": "function", "name": None, "parameters": {}},
        {"parameters": {}},  # (no type: a function tool)
    ],
)
def test_nameless_function_tool_refused(tool: dict[str, Any]) -> None:
    with pytest.raises(SessionConfigError, match="name"):
        validate_accept_payload({"type": "realtime", "tools": [TOOL, tool]})


@pytest.mark.parametrize(
    "tool, message",
    [
        ({**TOOL, "name": 5}, "a function tool's name must be a string, not int"),
        ({**TOOL, "description": 123}, "tool 'lookup_order': description must be a string, not int"),
        ({**TOOL, "description": None}, "tool 'lookup_order': description must be a string, not None"),
        ({**TOOL, "description": ["Look up."]}, "description must be a string, not list"),
        # (a tool without a type is a function tool, as OpenAI takes it)
        ({"name": "x", "description": 5}, "tool 'x': description must be a string, not int"),
        ({"name": 5}, "a function tool's name must be a string, not int"),
    ],
)
def test_a_function_tools_name_or_description_that_is_not_a_string_is_refused(
    tool: dict[str, Any], message: str
) -> None:
    """OpenAI's function tool takes strings there, and an accept may answer 200 to a bad payload."""
    with pytest.raises(SessionConfigError, match=re.escape(message)):
        validate_accept_payload({"type": "realtime", "tools": [tool]})
    validate_accept_payload(
        {"type": "realtime", "tools": [{k: v for k, v in TOOL.items() if k != "description"}]}
    )


@pytest.mark.parametrize(
    "parameters, where",
    [
        ({"type": "object", "properties": {"xy": {"type": "array"}}}, "parameters.properties.xy"),
        (
            {"type": "object", "properties": {"default": {"anyOf": [{"type": "null"}, {"type": "array"}]}}},
            "parameters.properties.default.anyOf[1]",
        ),
        (
            {"type": "object", "properties": {"xy": {"type": "array", "items": {"type": ["array", "null"]}}}},
            "parameters.properties.xy.items",
        ),
        ({"type": "object", "$defs": {"P": {"type": "array", "prefixItems": [{}]}}}, "parameters.$defs.P"),
    ],
)
def test_an_array_schema_without_items_in_a_tools_parameters_is_refused(
    parameters: dict[str, Any], where: str
) -> None:
    """OpenAI refuses the whole session for it (``array schema missing items``)."""
    tool = {**TOOL, "parameters": parameters}
    with pytest.raises(SessionConfigError, match=rf"'lookup_order': {re.escape(where)} is an array schema"):
        validate_accept_payload({"type": "realtime", "tools": [tool]})


def test_arrays_with_items_and_array_data_in_a_tools_parameters_pass() -> None:
    parameters = {
        "type": "object",
        "properties": {
            "xy": {"type": "array", "items": {}, "default": {"type": "array"}},
            "kind": {"enum": [{"type": "array"}]},
        },
    }
    validate_accept_payload({"type": "realtime", "tools": [{**TOOL, "parameters": parameters}]})


MCP = {
    "type": "mcp",
    "server_label": "crm",
    "server_url": "https://mcp.example.com",
    "require_approval": "never",
}


def test_named_tools_and_other_tool_types_pass() -> None:
    validate_accept_payload({"type": "realtime", "tools": [TOOL, MCP, {"type": "web_search_preview"}]})


@pytest.mark.parametrize(
    "approval, allowed",
    [
        (None, None),
        ("always", ["read"]),
        ({"never": {"tool_names": ["read"]}}, None),  # every tool but "read" asks
        ({"never": {"tool_names": ["read"]}}, ["read", "write"]),
        ({"never": {"tool_names": ["read"]}, "always": {"tool_names": ["read"]}}, ["read"]),
        ({"never": {"read_only": True}}, ["read"]),
    ],
)
def test_an_mcp_server_whose_calls_wait_for_an_approval_is_refused(approval: Any, allowed: Any) -> None:
    """Unset, require_approval is "always": the model would ask, and wait, at every MCP call, and a phone
    call has nobody to approve."""
    tool = {k: v for k, v in MCP.items() if k != "require_approval"}
    for key, value in (("require_approval", approval), ("allowed_tools", allowed)):
        if value is not None:
            tool[key] = value
    with pytest.raises(SessionConfigError, match='\'crm\' needs "require_approval": "never"'):
        validate_accept_payload({"type": "realtime", "tools": [TOOL, tool]})


def test_an_mcp_server_whose_allowed_tools_never_ask_passes() -> None:
    for allowed in (["read", "find"], {"tool_names": ["read"]}):
        tool = {
            **MCP,
            "allowed_tools": allowed,
            "require_approval": {"never": {"tool_names": ["read", "find"]}},
        }
        validate_accept_payload({"type": "realtime", "tools": [tool]})


def test_an_always_filter_naming_none_of_the_allowed_tools_asks_for_no_approval() -> None:
    for always in ([], ["write"]):
        tool = {
            **MCP,
            "allowed_tools": ["read"],
            "require_approval": {"always": {"tool_names": always}, "never": {"tool_names": ["read"]}},
        }
        validate_accept_payload({"type": "realtime", "tools": [tool]})
    tool["require_approval"] = {"always": {"read_only": True}, "never": {"tool_names": ["read"]}}
    with pytest.raises(SessionConfigError, match='needs "require_approval": "never"'):
        validate_accept_payload({"type": "realtime", "tools": [tool]})


def test_the_servers_own_tools_in_the_session_config_go_beside_the_apps_functions() -> None:
    cfg = SessionConfig(tools=[MCP])  # type: ignore[call-arg]
    assert cfg.payload([TOOL])["tools"] == [TOOL, MCP]
    assert cfg.merged(instructions="x").payload([])["tools"] == [MCP]
    with pytest.raises(SessionConfigError, match=r"'lookup' in the session config.*@app\.tool"):
        SessionConfig(tools=[MCP, {"type": "function", "name": "lookup"}]).payload([])  # type: ignore[call-arg]
    with pytest.raises(SessionConfigError, match="must be a list"):
        SessionConfig(tools={"crm": MCP}).payload([])  # type: ignore[call-arg]


# -- decisions -------------------------------------------------------------------------------------------


def test_decision_defaults() -> None:
    accept = Accept()
    assert (accept.instructions, accept.voice, accept.greeting, accept.tools, accept.session) == (
        None,
        None,
        None,
        None,
        {},
    )
    assert Accept().session is not Accept().session
    assert Reject().status_code == 603
    assert Refer("tel:+14155550123").target_uri == "tel:+14155550123"


@pytest.mark.parametrize(
    "uri",
    [
        "tel:",
        "sip:",
        "sips:",
        "tel: ",
        "https://example.com",
        None,
        "tel:+",
        "tel:+ ;phone-context=example.com",
        "sip:@",
        "sip:@pbx.example.com",
        "sips::pw@pbx.example.com",
        "sip:agent@",
        "sip:agent@;transport=tls",
        "sip:agent@pbx@example.com",
        "sip:agent@pbx..",
        "sip:agent@.pbx",
        "tel:+1 415 555 0100",
        "tel:+14155550100\nX-Evil: 1",
        "sip:agent @pbx.example.com",
        "sip:agent@pbx.example.com\r\n",
        "sip:agent@pbx.example.com;transport=tls\x00",
        "tel:+14155550100\u00a0",
    ],
)
def test_a_refer_or_transfer_target_needs_a_number_or_address(uri: Any) -> None:
    """OpenAI answers a REFER to a bare ``tel:`` with 400, and ``tel:+`` or ``sip:@host`` reaches no one:
    the decision fails closed instead of failing at every call."""
    with pytest.raises(DecisionError, match=r"^Refer target_uri must be a tel: or sip: URI with a number or"):
        Refer(uri)
    with pytest.raises(DecisionError, match=r"'human' must be a tel: or sip: URI with a number or address"):
        Accept(transfer_targets={"human": uri})
    with pytest.raises(ValueError, match=r"'human' must be a tel: or sip: URI with a number or address"):
        Sideband(transfer_targets={"human": uri})
    for good in (
        "tel:+14155550123",
        "tel:911",
        "tel:+1-415-555-0123;ext=22",
        "sip:agent@example.com",
        "sips:desk@pbx.example.com",
        "sip:pbx.example.com",
        "sip:+14155550123@10.0.0.1:5060;transport=tls",
        "sips:desk:secret@[2001:db8::1]:5061",
        "sip:desk@pbx.example.com?subject=transfer",
        "sip:agent@pbx.example.com.",  # (fully qualified)
        "sip:agent@pbx_internal:5060",  # (a container's service name)
    ):
        assert Refer(good).target_uri == good
        assert Accept(transfer_targets={"human": good}).transfer_targets == {"human": good}


@pytest.mark.parametrize("value", ["60", -1, 0, float("inf"), float("nan"), True])
def test_accept_limits_must_be_seconds(value: Any) -> None:
    """A limit the runtime could not arm (a string from config) or that would end the call at once is
    the routing hook's mistake: the call is rejected (fail closed), never accepted and then dropped."""
    for name in ("max_call_duration", "max_idle_duration"):
        with pytest.raises(DecisionError, match=f"Accept {name} must be a number of seconds > 0"):
            Accept(**{name: value})
    with pytest.raises(ValueError, match="max_idle_duration must be a number of seconds > 0"):
        Sideband(instructions="x", max_idle_duration=value)


def test_accept_limits_are_kept_as_seconds() -> None:
    accept = Accept(max_call_duration=90, max_idle_duration=12.5)
    assert (accept.max_call_duration, accept.max_idle_duration) == (90.0, 12.5)


def test_encode_session_names_what_json_cannot_carry_and_where() -> None:
    looped: dict[str, Any] = {"workflow_name": "desk"}
    looped["self"] = looped
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"tools": [{"type": "mcp"}, {"type": "mcp", "headers": {"k": {1, 2}}}]},
            "field tools[1].headers.k holds a value of type set",
        ),
        ({"tracing": looped}, "field tracing.self contains itself"),
        ({"prompt": {("a", "b"): 1}}, "field prompt has a key of type tuple"),
        ({"audio": {"output": {"speed": float("nan")}}}, "field audio.output.speed is nan"),
        (
            {"tracing": {"metadata": {"rate": None, "cap": float("-inf")}}},
            "field tracing.metadata.cap is -inf",
        ),
    ]
    for fields, problem in cases:
        with pytest.raises(
            SessionConfigError, match=re.escape(f"session {problem}, which JSON cannot carry")
        ):
            encode_session(fields)
    assert (
        encode_session({"transcription_model": None, "x": "null"})
        == b'{"transcription_model":null,"x":"null"}'
    )
    assert (
        encode_session({"tracing": {"metadata": {"n": 2**70}}})
        == b'{"tracing":{"metadata":{"n":1180591620717411303424}}}'
    )
