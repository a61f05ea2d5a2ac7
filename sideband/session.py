"""The session config (one object → the accept payload *and* the first ``session.update``) and the
routing decisions a hook returns."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, Strict

from sideband import jsonio

__all__ = [
    "Accept",
    "Decision",
    "DecisionError",
    "Refer",
    "Reject",
    "SessionConfig",
    "SessionConfigError",
    "validate_accept_payload",
]


class SessionConfigError(ValueError):
    """A session config OpenAI would refuse (or accept and then fail the call with)."""


class DecisionError(TypeError, ValueError):
    """A routing decision that cannot be carried out: a wrong type (``on_incoming`` returned something
    else) or value (``Reject(200)``). A ``TypeError`` and a ``ValueError``; its message is sideband's own,
    so it is logged in full (``call.route_failed``)."""


class SessionConfig(BaseModel):
    """The Realtime session a call gets. ``extra`` fields are passed through untouched, so new
    OpenAI fields need no release of ours.

    A ``tools`` list given here holds tools the server runs itself, such as remote MCP servers
    (``{"type": "mcp", "server_label": …, "server_url": …, "require_approval": "never"}``): they are sent
    beside the app's own function tools. A function the model calls must be answered by the app, so it is
    declared with ``@app.tool``, not here."""

    model_config = ConfigDict(extra="allow", frozen=True)

    model: str | None = "gpt-realtime"
    instructions: str | None = None
    voice: str | None = None
    """A built-in voice (``marin``, ``cedar``…) or a custom voice's id (``voice_…``: sent as ``{"id":
    …}``). A name close to a built-in voice and not it (``marine``) is refused as a misspelling."""
    speed: Annotated[float, Strict()] | None = Field(default=None, gt=0)
    output_modalities: list[str] | None = None
    transcription_model: str | None = "gpt-4o-mini-transcribe"
    """Input transcription model (``None`` disables caller transcripts)."""
    turn_detection: dict[str, Any] | None = None
    noise_reduction: dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_output_tokens: Annotated[int, Strict()] | Literal["inf"] | None = None
    tracing: Any = None
    prompt: dict[str, Any] | None = None
    include: list[str] | None = None
    greeting: str | None = "Greet the caller briefly and ask how you can help."
    """Instructions for the one greeting per call (``None``: wait for the caller to speak)."""

    def payload(self, tools: list[dict[str, Any]]) -> dict[str, Any]:
        """The realtime session object: the accept body and the ``session.update`` session."""
        body: dict[str, Any] = {"type": "realtime"}
        if self.model is not None:
            body["model"] = self.model
        if self.instructions is not None:
            body["instructions"] = self.instructions
        if self.output_modalities is not None:
            body["output_modalities"] = self.output_modalities
        audio_in: dict[str, Any] = {}
        if self.transcription_model is not None:
            audio_in["transcription"] = {"model": self.transcription_model}
        if self.turn_detection is not None:
            audio_in["turn_detection"] = self.turn_detection
        if self.noise_reduction is not None:
            audio_in["noise_reduction"] = self.noise_reduction
        audio_out: dict[str, Any] = {}
        if self.voice is not None:
            audio_out["voice"] = voice_field(self.voice)
        if self.speed is not None:
            audio_out["speed"] = self.speed
        if audio_in or audio_out:
            body["audio"] = {k: v for k, v in (("input", audio_in), ("output", audio_out)) if v}
        extra = dict(self.model_extra or {})
        served = extra.pop("tools", None)  # the server's own tools (MCP), beside the app's functions
        if isinstance(served, list):
            for tool in served:
                if isinstance(tool, dict) and tool.get("type", "function") == "function":
                    raise SessionConfigError(
                        f"function tool {tool.get('name')!r} in the session config: a function the model "
                        "calls must be answered by the app; declare it with @app.tool"
                    )
            tools = [*tools, *served]
        elif served is not None:
            raise SessionConfigError("tools in the session config must be a list")
        if tools:
            body["tools"] = tools
        for key in ("tool_choice", "max_output_tokens", "tracing", "prompt", "include"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        return merge_session(body, extra)

    def merged(self, **overrides: Any) -> SessionConfig:
        """A copy with ``overrides`` applied, an ``audio`` object merged into this one's as
        :func:`merge_session` does. ``None`` for ``instructions``, ``voice`` or ``greeting`` is ignored
        (not given: a decision's fields); for another field it is that field's ``None``
        (``transcription_model=None``: no caller transcripts), and a field of the extra ones is dropped.

        An override named for a key of the ``audio`` object (``voice``, ``speed``, ``turn_detection``,
        ``noise_reduction``, ``transcription_model``) replaces that key of this one's ``audio``: the later
        layer's setting wins (an ``audio`` object among the overrides still wins over their named
        fields, as within one config)."""
        given = {k: v for k, v in overrides.items() if v is not None or k not in _NOT_GIVEN_IF_NONE}
        data = merge_session(_without_audio_keys(self.model_dump(exclude_unset=False), given), given)
        fields = type(self).model_fields
        return SessionConfig.model_validate({k: v for k, v in data.items() if v is not None or k in fields})


# A decision's own fields (Accept's): ``None`` there is "not given", the value below stays.
_NOT_GIVEN_IF_NONE = frozenset({"instructions", "voice", "greeting"})


def merge_session(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over``'s session fields on top of ``base``'s: an ``audio`` object in both is merged per side
    (``input``, ``output``) and per key, so ``{"audio": {"output": {"voice": …}}}`` changes the voice
    alone; any other field of ``over`` replaces ``base``'s whole."""
    merged = {**base, **over}
    if "audio" in base and "audio" in over:
        merged["audio"] = _merge_audio(base["audio"], over["audio"])
    return merged


def _merge_audio(base: Any, over: Any) -> Any:
    if not isinstance(base, Mapping) or not isinstance(over, Mapping):
        return over
    audio = {**base, **over}
    for side in ("input", "output"):
        below, above = base.get(side), over.get(side)
        if isinstance(below, Mapping) and isinstance(above, Mapping):
            audio[side] = {**below, **above}
    return audio


_FORBIDDEN_TURN_DETECTION = ("threshold", "prefix_padding_ms", "silence_duration_ms")

# Names a session object takes (the realtime session's fields, and SessionConfig's own), by level: an
# unknown name *close to* one of them is a typo the calls API would refuse (``unknown_parameter``) at
# every call. Other unknown names pass: OpenAI adds fields over time, and they need no release of ours.
_SESSION_KEYS = frozenset(
    {
        "type",
        "model",
        "instructions",
        "output_modalities",
        "audio",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_output_tokens",
        "truncation",
        "tracing",
        "prompt",
        "include",
        "reasoning",
        "voice",
        "speed",
        "transcription_model",
        "turn_detection",
        "noise_reduction",
        "greeting",
    }
)
_AUDIO_KEYS = {
    "input": frozenset({"format", "transcription", "noise_reduction", "turn_detection"}),
    "output": frozenset({"format", "voice", "speed"}),
}
_AUDIO_SIDES = frozenset(_AUDIO_KEYS)
# Turn detection's keys, by kind: a key of the other kind is refused (``unknown_parameter``).
_TURN_KEYS = {
    "server_vad": frozenset(
        {
            "type",
            "create_response",
            "interrupt_response",
            "threshold",
            "prefix_padding_ms",
            "silence_duration_ms",
            "idle_timeout_ms",
        }
    ),
    "semantic_vad": frozenset({"type", "create_response", "interrupt_response", "eagerness"}),
}


def _typo(key: Any, known: frozenset[str], where: str) -> None:
    if isinstance(key, str) and key not in known:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
        if close:
            raise SessionConfigError(
                f"unknown session field {where + key!r} (did you mean {where + close[0]!r}?)"
            )


def voice_field(voice: Any) -> Any:
    """A voice as the realtime session takes it: a custom voice's id (``voice_…``) as ``{"id": …}``,
    a built-in voice's name (which never starts so) as it is."""
    return {"id": voice} if isinstance(voice, str) and voice.startswith("voice_") else voice


# SessionConfig's names for fields of the realtime session's ``audio`` object: side, key.
_AUDIO_NAMES = {
    "voice": ("output", "voice"),
    "speed": ("output", "speed"),
    "turn_detection": ("input", "turn_detection"),
    "noise_reduction": ("input", "noise_reduction"),
}


# Every SessionConfig name for a key of the realtime session's ``audio`` object: side, key.
_AUDIO_KEY_OF = {**_AUDIO_NAMES, "transcription_model": ("input", "transcription")}


def _without_audio_keys(base: Mapping[str, Any], over: Mapping[str, Any]) -> Mapping[str, Any]:
    """``base`` without the keys of its ``audio`` object that a name of ``over`` sets (``voice`` sets
    ``audio.output.voice``…), so that ``over``, a later layer, wins with them; ``base`` itself when there
    are none."""
    audio = base.get("audio")
    names = [name for name in over if name in _AUDIO_KEY_OF]
    if not names or not isinstance(audio, Mapping):
        return base
    audio = dict(audio)
    for name in names:
        side, key = _AUDIO_KEY_OF[name]
        part = audio.get(side)
        if isinstance(part, Mapping) and key in part:
            rest = {k: v for k, v in part.items() if k != key}
            if rest:
                audio[side] = rest
            else:
                del audio[side]
    return {**base, "audio": audio} if audio else {k: v for k, v in base.items() if k != "audio"}


# SessionConfig's names that are sideband's own, no field of the realtime session, with what to use.
_OWN_NAMES = {
    "greeting": "the greeting is said once, as the call starts; ctx.say(instructions) has the model say "
    "something now",
}


def check_update_fields(fields: Mapping[str, Any]) -> None:
    """Raise :class:`SessionConfigError` for a name of ``fields`` that :class:`SessionConfig` takes but no
    ``session.update`` does (``greeting``): the server would refuse the whole update."""
    for name, instead in _OWN_NAMES.items():
        if name in fields:
            raise SessionConfigError(f"{name} is not a session field ({instead})")


def session_update(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The ``session`` of a partial ``session.update``: :class:`SessionConfig`'s names (``voice=``,
    ``speed=``, ``turn_detection=``, ``noise_reduction=``, ``transcription_model=``) moved to where the
    realtime session has them (``audio.output.voice``…), other fields as given, ``type`` added.

    Raises :class:`SessionConfigError` for a field name that is a typo of a known one, or that is
    sideband's own (:func:`check_update_fields`)."""
    check_update_fields(fields)
    session: dict[str, Any] = {
        k: v for k, v in fields.items() if k not in _AUDIO_NAMES and k != "transcription_model"
    }
    given = session.pop("audio", None)
    given = {} if given is None else given
    if not isinstance(given, Mapping):
        raise SessionConfigError(f"audio must be an object, not {_kind(given)}")
    audio: dict[str, Any] = {
        side: dict(part) if isinstance(part, Mapping) else part for side, part in given.items()
    }

    def side_of(side: str) -> dict[str, Any]:
        part = audio.get(side)
        if part is None:
            part = audio[side] = {}
        elif not isinstance(part, dict):
            raise SessionConfigError(f"audio.{side} must be an object, not {_kind(part)}")
        return part

    # (within one update, as within one config, a key the ``audio`` object gives wins over its named one)
    for name, (side, key) in _AUDIO_NAMES.items():
        if name in fields:
            side_of(side).setdefault(key, voice_field(fields[name]) if name == "voice" else fields[name])
    if "transcription_model" in fields:
        model = fields["transcription_model"]
        side_of("input").setdefault("transcription", None if model is None else {"model": model})
    if audio:
        session["audio"] = audio
    session["type"] = "realtime"
    validate_accept_payload(session, sip=False, update=True)
    return session


def check_sip_audio(audio: Any) -> None:
    """Refuse an ``audio`` object that sets a format, which a SIP call negotiates (OpenAI refuses the
    whole accept or ``session.update`` that carries one, ``null`` included)."""
    if not isinstance(audio, Mapping):
        return
    for side in ("input", "output"):
        part = audio.get(side)
        if isinstance(part, Mapping) and "format" in part:
            raise SessionConfigError(
                f"audio.{side}.format must not be set for SIP calls (the codec is negotiated)"
            )


def validate_accept_payload(body: dict[str, Any], *, sip: bool = True, update: bool = False) -> None:
    """Refuse locally what OpenAI would refuse or silently break on, and field names that
    are a typo of a known one (``max_output_token``).

    ``update``: ``body`` is a partial ``session.update``, whose ``tools`` left out stay as they are (in a
    whole session, they are none: a ``tool_choice`` forcing one is refused)."""
    if body.get("type") != "realtime":
        raise SessionConfigError('session config needs "type": "realtime"')
    for key in body:
        _typo(key, _SESSION_KEYS, "")
    audio = body.get("audio", {})
    if not isinstance(audio, dict):
        raise SessionConfigError(f"audio must be an object, not {_kind(audio)}")
    for key in audio:
        _typo(key, _AUDIO_SIDES, "audio.")
    for side in ("input", "output"):
        part = audio.get(side, {})
        if not isinstance(part, dict):
            raise SessionConfigError(f"audio.{side} must be an object, not {_kind(part)}")
        for key in part:
            _typo(key, _AUDIO_KEYS[side], f"audio.{side}.")
    if sip:
        check_sip_audio(audio)
    _check_values(body, audio, update=update)
    td = audio.get("input", {}).get("turn_detection")
    if td is not None:
        _check_turn_detection(td)
    if sip and isinstance(td, dict):
        for key in _FORBIDDEN_TURN_DETECTION:
            if key in td:
                raise SessionConfigError(f"audio.input.turn_detection.{key} is refused by the calls API")
    for tool in body.get("tools") or []:
        if not isinstance(tool, dict):
            raise SessionConfigError("every tool must be an object")
        function = tool.get("type", "function") == "function"  # (OpenAI's default type)
        if function and not tool.get("name"):
            raise SessionConfigError("every function tool needs a name")
        if function:
            if not isinstance(tool["name"], str):
                raise SessionConfigError(
                    f"a function tool's name must be a string, not {_kind(tool['name'])}"
                )
            if "description" in tool and not isinstance(tool["description"], str):
                raise SessionConfigError(
                    f"tool {tool['name']!r}: description must be a string, not {_kind(tool['description'])}"
                )
            itemless = _itemless_array(tool.get("parameters"), "parameters")
            if itemless is not None:
                raise SessionConfigError(
                    f"tool {tool['name']!r}: {itemless} is an array schema without items (OpenAI refuses it)"
                )
        if tool.get("type") == "mcp" and _asks_approval(tool):
            # Nobody is there to approve: the model would wait, silent, at every such call.
            raise SessionConfigError(
                f'MCP tool {tool.get("server_label")!r} needs "require_approval": "never" (or a '
                '"never" list holding all its "allowed_tools"): a call has nobody to approve its tool '
                'calls (choose the server\'s tools with "allowed_tools")'
            )


# Schema keywords whose value is data, not a schema (an array there is no array schema).
_SCHEMA_DATA = frozenset({"default", "examples", "example", "const", "enum"})
# Schema keywords whose value maps names (any: a parameter may be called "default") to schemas.
_SCHEMA_NAMES = frozenset({"properties", "$defs", "definitions", "patternProperties"})


def _itemless_array(schema: Any, where: str) -> str | None:
    """Where in a tool's parameter ``schema`` an array schema has no ``items`` (OpenAI refuses the
    whole session then: ``array schema missing items``), else ``None``."""
    if isinstance(schema, list):
        for i, item in enumerate(schema):
            found = _itemless_array(item, f"{where}[{i}]")
            if found is not None:
                return found
        return None
    if not isinstance(schema, Mapping):
        return None
    kind = schema.get("type")
    if (kind == "array" or (isinstance(kind, list) and "array" in kind)) and "items" not in schema:
        return where
    for key, value in schema.items():
        if key in _SCHEMA_NAMES and isinstance(value, Mapping):  # names → schemas, whatever the names
            for name, sub in value.items():
                found = _itemless_array(sub, f"{where}.{key}.{name}")
                if found is not None:
                    return found
        elif key not in _SCHEMA_DATA and isinstance(value, Mapping | list):
            found = _itemless_array(value, f"{where}.{key}")
            if found is not None:
                return found
    return None


def _check_turn_detection(td: Any) -> None:
    """``audio.input.turn_detection`` (not ``None``: the server's own) as OpenAI takes it: a kind
    (``server_vad``, ``semantic_vad``) with that kind's settings only, in range."""
    where = "audio.input.turn_detection"
    if not isinstance(td, dict):
        raise SessionConfigError(f"{where} must be an object, not {_kind(td)}")
    kind = td.get("type")
    known = _TURN_KEYS.get(kind) if isinstance(kind, str) else None
    if known is None:
        raise SessionConfigError(f'{where} needs a "type": "server_vad" or "semantic_vad", not {kind!r}')
    other = _TURN_KEYS["semantic_vad" if kind == "server_vad" else "server_vad"] - known
    for key in td:
        if key in other:
            raise SessionConfigError(f"{where}.{key} is not a setting of {kind} turn detection")
        _typo(key, known, where + ".")
    idle = td.get("idle_timeout_ms")
    if idle is not None and (isinstance(idle, bool) or not isinstance(idle, int) or idle <= 0):
        raise SessionConfigError(f"{where}.idle_timeout_ms must be a whole number of ms > 0, not {idle!r}")
    if "eagerness" in td and td["eagerness"] not in _EAGERNESS:
        raise SessionConfigError(
            f'{where}.eagerness must be "low", "medium", "high" or "auto", not {td["eagerness"]!r}'
        )


_EAGERNESS = ("low", "medium", "high", "auto")
_NOISE_REDUCTIONS = ("near_field", "far_field")
_MODALITIES = ("audio", "text")
_TOOL_CHOICES = ("auto", "none", "required")
# A tool choice object's fields, by its type: the required, then the optional ones.
_TOOL_CHOICE_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "function": (("name",), ()),
    "mcp": (("server_label",), ("name",)),
}
# OpenAI's built-in voices: a name close to one of them, and not it, is a typo (others pass: new voices).
_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
_SPEED = (0.25, 1.5)
"""The slowest and fastest speech OpenAI takes (``audio.output.speed``; 1.0 is the voice's own pace)."""


def _check_values(body: Mapping[str, Any], audio: Mapping[str, Any], *, update: bool = False) -> None:
    """Refuse a value of the wrong type or out of range that OpenAI would refuse (the whole update or
    accept with it): ``instructions``, ``model``, ``output_modalities``, ``max_output_tokens``, the
    input's transcription and noise reduction, the output voice and speed, ``tool_choice``. A voice's name
    is not held to the built-in voices (a new one needs no release of ours), but one close to a known
    voice and not it (``"marine"``) is the typo OpenAI would refuse at every call."""
    if "instructions" in body and not isinstance(body["instructions"], str):
        raise SessionConfigError(f"instructions must be a string, not {_kind(body['instructions'])}")
    if "output_modalities" in body:
        modalities = body["output_modalities"]
        if not (isinstance(modalities, list) and len(modalities) == 1 and modalities[0] in _MODALITIES):
            raise SessionConfigError(f'output_modalities must be ["audio"] or ["text"], not {modalities!r}')
    heard = audio.get("input", {})
    transcription = heard.get("transcription")
    if transcription is not None and not (
        isinstance(transcription, Mapping) and isinstance(transcription.get("model"), str)
    ):
        raise SessionConfigError(
            'audio.input.transcription needs a "model" (a transcription model\'s name, as '
            f'"gpt-4o-mini-transcribe"; None: no caller transcripts), not {transcription!r}'
        )
    noise = heard.get("noise_reduction")
    if noise is not None and not (isinstance(noise, Mapping) and noise.get("type") in _NOISE_REDUCTIONS):
        raise SessionConfigError(
            'noise_reduction must be {"type": "near_field"} or {"type": "far_field"} (or None), '
            f"not {noise!r}"
        )
    if "model" in body and not (isinstance(body["model"], str) and body["model"].strip()):
        raise SessionConfigError(f'model must be a model\'s name ("gpt-realtime"), not {body["model"]!r}')
    if "max_output_tokens" in body:
        limit = body["max_output_tokens"]
        if limit != "inf" and (
            isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 4096
        ):
            raise SessionConfigError(f'max_output_tokens must be from 1 to 4096, or "inf", not {limit!r}')
    output = audio.get("output")
    if isinstance(output, Mapping):
        if "voice" in output:
            voice = output["voice"]
            named = isinstance(voice, str) and voice.strip()
            custom = isinstance(voice, Mapping) and set(voice) == {"id"} and isinstance(voice["id"], str)
            if not (named or custom):
                raise SessionConfigError(
                    f"voice must be a voice's name (\"marin\") or a custom voice's id, not {voice!r}"
                )
            if isinstance(voice, str) and voice not in _VOICES:
                close = difflib.get_close_matches(voice.lower(), _VOICES, n=1, cutoff=0.8)
                if close:
                    raise SessionConfigError(f"unknown voice {voice!r} (did you mean {close[0]!r}?)")
        if "speed" in output:
            speed = output["speed"]
            low, high = _SPEED
            if isinstance(speed, bool) or not isinstance(speed, int | float) or not low <= speed <= high:
                raise SessionConfigError(f"speed must be a number from {low} to {high}, not {speed!r}")
    if "tool_choice" in body:
        # (a whole session without tools has none: a partial update's leaves them as they are)
        _check_tool_choice(body["tool_choice"], body.get("tools", None if update else []))


def _check_tool_choice(choice: Any, tools: Any) -> None:
    """A ``tool_choice`` as OpenAI takes it: ``"auto"``, ``"none"``, ``"required"`` (with a tool to
    call), one function tool (``{"type": "function", "name": …}``: one of ``tools``, unless they are
    ``None``: not known) or an MCP server's (``{"type": "mcp", "server_label": …}``)."""
    if isinstance(choice, str) and choice in _TOOL_CHOICES:
        if choice == "required" and isinstance(tools, list) and not tools:
            raise SessionConfigError(
                'tool_choice "required" with no tools: the model would have none to call'
            )
        return
    kind = choice.get("type") if isinstance(choice, Mapping) else None
    fields = _TOOL_CHOICE_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is not None:
        required, optional = fields
        for key in choice:
            if key != "type" and key not in required and key not in optional:
                takes = ", ".join(f'"{k}"' for k in ("type", *required, *optional))
                raise SessionConfigError(f'tool_choice {{"type": "{kind}"}} takes {takes}, not {key!r}')
        for key in optional:
            if key in choice and not isinstance(choice[key], str):
                raise SessionConfigError(f"tool_choice {key} must be a string, not {_kind(choice[key])}")
    if kind == "function":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise SessionConfigError('tool_choice {"type": "function"} needs the tool\'s "name"')
        if isinstance(tools, list) and not any(
            isinstance(t, Mapping) and t.get("type") == "function" and t.get("name") == name for t in tools
        ):
            raise SessionConfigError(f"tool_choice names the tool {name!r}, which the session does not offer")
        return
    if kind == "mcp" and isinstance(choice.get("server_label"), str):
        return
    name = choice if isinstance(choice, str) else "…"
    one = f'{{"type": "function", "name": "{name}"}}'
    raise SessionConfigError(
        f'tool_choice must be "auto", "none", "required" or one tool ({one}), not {choice!r}'
    )


def _kind(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def encode_session(fields: Mapping[str, Any], *, sort_keys: bool = False) -> bytes:
    """``fields`` (session fields) as JSON, as :func:`sideband.jsonio.dumps` writes them; with
    ``sort_keys``, each object's keys in sorted order (equal sessions written in another order encode
    alike, as a cache key).

    Raises :class:`SessionConfigError` for a value JSON cannot carry (a ``Decimal``, ``bytes``, a set, an
    object of the app's own), naming where it is and its type (not its value), rather than leave it to
    fail where the session is sent."""
    try:
        encoded = _sorted_json(fields) if sort_keys else jsonio.dumps(fields)
    except (TypeError, ValueError, RecursionError):  # (a cycle is a ValueError of Python's encoder)
        problem = _unencodable(fields, "", set()) or "a value JSON cannot carry"
        raise SessionConfigError(f"session {problem}") from None
    if b"null" in encoded:  # (orjson writes a NaN or an infinity as null: a field unset, unseen)
        non_finite = _unencodable(fields, "", set())
        if non_finite is not None:
            raise SessionConfigError(f"session {non_finite}")
    return encoded


def _sorted_json(fields: Mapping[str, Any]) -> bytes:
    """``fields`` as JSON with sorted keys; what orjson refuses (a non-string key, an integer over 64
    bits, a lone surrogate) as :func:`sideband.jsonio.dumps` writes it, in its own order."""
    try:
        return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return jsonio.dumps(fields)


_SCALARS = (str, int, float, bool, type(None))


def _unencodable(value: Any, where: str, seen: set[int]) -> str | None:
    """What in ``value`` (at ``where``) JSON cannot carry (a NaN or an infinity included), said with its
    path and type, else ``None``. Only run after an encoding failed, or wrote a null (it is slow)."""
    at = f"field {where}" if where else "config"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{at} is {value!r}, which JSON cannot carry"
    if isinstance(value, _SCALARS):
        return None
    if isinstance(value, Mapping | list | tuple):
        if id(value) in seen:
            return f"{at} contains itself, which JSON cannot carry"
        if len(seen) >= 200:
            return f"{at} is nested too deeply for JSON"
        seen = seen | {id(value)}
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        for key, item in items:
            if isinstance(value, Mapping):
                if not isinstance(key, _SCALARS):
                    return f"{at} has a key of type {type(key).__name__}, which JSON cannot carry"
                inner = f"{where}.{key}" if where else str(key)
            else:
                inner = f"{where}[{key}]"
            found = _unencodable(item, inner, seen)
            if found is not None:
                return found
        return None
    try:
        jsonio.dumps(value)  # (orjson writes some types of its own: a datetime, a dataclass…)
    except (TypeError, ValueError, RecursionError):
        return f"{at} holds a value of type {type(value).__name__}, which JSON cannot carry"
    return None


def _asks_approval(tool: Mapping[str, Any]) -> bool:
    """Whether an MCP tool's calls may wait for an approval: unless ``require_approval`` is ``"never"``
    (unset, it is ``"always"``), or a filter that asks for none and names every allowed tool ``never``."""
    approval = tool.get("require_approval")
    if approval == "never":
        return False
    if not isinstance(approval, dict):
        return True
    always = approval.get("always")
    asked: Any = []  # the tools an "always" filter names (one that names none asks for none)
    if always is not None:
        asked = (
            always.get("tool_names") if isinstance(always, dict) and set(always) == {"tool_names"} else None
        )
        if not isinstance(asked, list):
            return True  # (a filter of another kind: it may match any tool)
    never = approval.get("never")
    exempt = never.get("tool_names") if isinstance(never, dict) else None
    allowed = tool.get("allowed_tools")
    if isinstance(allowed, dict):
        allowed = allowed.get("tool_names")
    if not (isinstance(exempt, list) and isinstance(allowed, list) and allowed):
        return True
    return not all(isinstance(name, str) and name in exempt and name not in asked for name in allowed)


def check_seconds(name: str, value: object) -> float | None:
    """``value`` as a number of seconds > 0 (None stays None); :class:`DecisionError` for anything else
    (a string read from config, a negative or infinite value, a bool)."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise DecisionError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Accept:
    """Answer the call. Overrides apply on top of the app's session config; ``tools`` names a subset."""

    instructions: str | None = None
    voice: str | None = None
    greeting: str | None = None
    tools: Sequence[str] | None = None
    """Names of the app's tools the call is offered (a list or tuple; kept as a tuple)."""
    session: dict[str, Any] = field(default_factory=dict)
    """Other session fields, as :class:`SessionConfig` takes them (``instructions``, ``voice`` or
    ``greeting`` given here are taken as the fields of the same name). A field given ``None`` is unset
    for this call (``{"transcription_model": None}``: no caller transcripts)."""
    max_call_duration: float | None = None
    """Seconds before the model says goodbye and the call is hung up (default: app, then settings)."""
    max_idle_duration: float | None = None
    """Seconds without caller speech before goodbye and hangup (default: app, then settings)."""
    state: Mapping[str, Any] = field(default_factory=dict)
    """Put in the call's ``ctx.state`` before anything of it runs (what the routing hook looked up about
    the caller, so tools and hooks need not look it up again)."""
    transfer_targets: Mapping[str, str] | None = None
    """Label → ``tel:``/``sip:`` URI: where this call may be transferred, instead of the app's
    ``transfer_targets`` (``{}``: nowhere; the ``transfer_call`` tool is then not offered)."""

    def __post_init__(self) -> None:
        if not isinstance(self.state, Mapping):
            raise DecisionError(f"Accept(state=...) takes a mapping, not {type(self.state).__name__}")
        if not isinstance(self.session, Mapping):
            raise DecisionError(f"Accept(session=...) takes a mapping, not {type(self.session).__name__}")
        session = dict(self.session)
        for name in ("instructions", "voice", "greeting"):  # Accept's own fields, given in session
            if name in session:
                value = session.pop(name)
                if getattr(self, name) is not None and value is not None:
                    raise DecisionError(f"Accept: {name} is given twice, as {name}=... and in session")
                if value is not None:
                    object.__setattr__(self, name, value)
        object.__setattr__(self, "session", session)
        if self.tools is not None:
            try:
                names: tuple[object, ...] = tuple(self.tools)  # (read once: it may be an iterator)
            except TypeError:
                names = (self.tools,)  # (not names at all)
            if isinstance(self.tools, str) or not all(isinstance(t, str) for t in names):
                raise DecisionError("Accept(tools=...) takes tool names, e.g. ('lookup_order',)")
            object.__setattr__(self, "tools", names)  # a list is fine, stored hashable
        for name in ("max_call_duration", "max_idle_duration"):
            object.__setattr__(self, name, check_seconds(f"Accept {name}", getattr(self, name)))
        if self.transfer_targets is not None:
            try:
                targets = check_transfer_targets(self.transfer_targets)
            except ValueError as exc:
                raise DecisionError(f"Accept(transfer_targets=...): {exc}") from None
            object.__setattr__(self, "transfer_targets", targets)

    def over(self, base: Accept, *, transfer_tool: str | None = None) -> Accept:
        """This decision layered over ``base`` (the route table's, for a routing hook's ``Accept``): what
        this one leaves out (``None``), ``base`` gives; ``session`` (as :func:`merge_session` does) and
        ``state`` are merged, this one's entries winning.

        This one's ``transfer_targets={}`` (nowhere) withdraws ``transfer_tool`` (the app's transfer
        tool) from the ``tools`` it takes from ``base``: it is not offered, as without ``base``."""
        tools = _given(self.tools, base.tools)
        if self.tools is None and tools is not None and self.transfer_targets == {}:
            tools = tuple(name for name in tools if name != transfer_tool)
        return Accept(
            instructions=_given(self.instructions, base.instructions),
            voice=_given(self.voice, base.voice),
            greeting=_given(self.greeting, base.greeting),
            tools=tools,
            session=merge_session(_without_audio_keys(base.session, self._named()), self.session),
            max_call_duration=_given(self.max_call_duration, base.max_call_duration),
            max_idle_duration=_given(self.max_idle_duration, base.max_idle_duration),
            state={**base.state, **self.state},
            transfer_targets=_given(self.transfer_targets, base.transfer_targets),
        )

    def _named(self) -> Mapping[str, Any]:
        """This decision's named settings: its ``session``, and ``voice`` when given."""
        return self.session if self.voice is None else {**self.session, "voice": self.voice}


_T = TypeVar("_T")


def _given(value: _T | None, otherwise: _T | None) -> _T | None:
    return otherwise if value is None else value


# A SIP URI's host (a name, an IPv4 or a bracketed IPv6 address), its port and parameters after it.
_SIP_HOST = re.compile(
    r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_])?\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]+)?(?:;.*)?"
)


def is_target_uri(uri: object) -> bool:
    """Whether ``uri`` is a place a REFER can send a call: a ``tel:`` URI with a number (a digit at
    least: OpenAI refuses a bare ``tel:``, and ``tel:+`` reaches no one), or a ``sip:``/``sips:`` URI with
    a host and, when it has an ``@``, a user before it (``sip:agent@pbx.example.com``,
    ``sip:pbx.example.com``, a fully qualified ``pbx.example.com.``, a service name such as
    ``sip:agent@pbx_internal``; not ``sip:@pbx.example.com``). Never one with a space or a control
    character (``tel:+1 415 555 0100``, a line break): no carrier takes it, written so."""
    if not isinstance(uri, str) or not uri.isprintable() or any(c.isspace() for c in uri):
        return False
    scheme, _, rest = uri.partition(":")
    if scheme == "tel":
        return any(c in _DIGITS for c in rest.partition(";")[0])
    if scheme not in ("sip", "sips"):
        return False
    address = rest.partition("?")[0]  # (its headers aside)
    userinfo, at, host = address.partition("@") if "@" in address else ("", "", address)
    if at and not userinfo.partition(":")[0].strip():
        return False
    return _SIP_HOST.fullmatch(host) is not None


_DIGITS = frozenset("0123456789")


def check_transfer_targets(targets: Mapping[str, str]) -> dict[str, str]:
    """``targets`` as a dict, checked: labels are non-empty strings, URIs ``tel:``/``sip:``/``sips:``
    with a number or address (:func:`is_target_uri`).

    Raises ``ValueError`` (one line naming the label) otherwise.
    """
    if not isinstance(targets, Mapping):
        raise ValueError(f"takes a mapping of label to URI, not {type(targets).__name__}")
    for label, uri in targets.items():
        if not isinstance(label, str) or not label:
            raise ValueError(f"a label must be a non-empty string, got {label!r}")
        if not is_target_uri(uri):
            raise ValueError(
                f"transfer target {label!r} must be a tel: or sip: URI with a number or address, got {uri!r}"
            )
    return dict(targets)


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse the call with a SIP status (default 603 Decline); a final status, 400-699.

    Raises :class:`DecisionError` (a ``ValueError``) on any other status, so a routing hook's mistake
    fails closed (the call is rejected with ``SIDEBAND_ROUTE_FAILURE_STATUS``) instead of leaving the
    caller ringing.
    """

    status_code: int = 603

    def __post_init__(self) -> None:
        if type(self.status_code) is not int or not 400 <= self.status_code <= 699:
            raise DecisionError(f"Reject status_code must be a SIP status 400-699, got {self.status_code!r}")


@dataclass(frozen=True, slots=True)
class Refer:
    """Send the call elsewhere (SIP REFER) without answering it: ``tel:+1…`` or ``sip:…``.

    Raises :class:`DecisionError` (a ``ValueError``) for any other kind of URI, or one with nothing after
    its scheme (``tel:``).
    """

    target_uri: str

    def __post_init__(self) -> None:
        if not is_target_uri(self.target_uri):
            raise DecisionError(
                "Refer target_uri must be a tel: or sip: URI with a number or address, "
                f"got {self.target_uri!r}"
            )


Decision = Accept | Reject | Refer
