"""An in-process stand-in for OpenAI's Realtime SIP/WebRTC service.

:class:`Simulator` is an aiohttp server on a loopback port that speaks the call-control REST endpoints
(accept/reject/refer/hangup, WebRTC ``POST /realtime/calls``, ``client_secrets``) and the call-scoped sideband
WebSocket, enforcing what the real service enforces, its error behaviours included. Each call is a
:class:`SimCall`: a record of what happened (requests, events in and out, end reason) and the runtime that
plays the call's :class:`~sideband.testing.script.Script`.

Event shapes follow real recordings (``cassettes/openai``): every server event has ``type`` and an
``event_id`` (``event_…``); ids use the real prefixes (``resp_``, ``item_``, ``call_``, ``sess_``, ``conv_``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import email.message
import email.parser
import email.policy
import itertools
import json
import re
import secrets
import time
import traceback
import uuid
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, TypeAlias

import orjson
from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict, CIMultiDictProxy

from sideband.testing._loop import check_loop

from .script import (
    CallerHangsUp,
    CallerPresses,
    CallerSays,
    FunctionCallSpec,
    HangupMode,
    ModelCalls,
    ModelSays,
    Pause,
    Script,
    Step,
    WaitForGreeting,
    model_calls,
)
from .sender import DeliveryResult, WebhookSender

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_WEBHOOK_SECRET",
    "CallStatus",
    "Fault",
    "InjectedCall",
    "RequestRecord",
    "ResponseRecord",
    "ScriptError",
    "SimCall",
    "Simulator",
]

DEFAULT_API_KEY = "sk-test"
"""The API key a :class:`Simulator` accepts unless told otherwise."""

DEFAULT_WEBHOOK_SECRET = "whsec_c2lkZWJhbmQtc2ltdWxhdG9yLXdlYmhvb2sta2V5IQ=="  # noqa: S105 - fixed test secret
"""The Standard Webhooks secret a :class:`Simulator` signs with unless told otherwise."""

CallStatus: TypeAlias = Literal["ringing", "accepted", "rejected", "referred", "ended"]
Fault: TypeAlias = int | Literal["timeout", "late"]
"""A queued fault: an HTTP status to answer, ``"timeout"`` (hold the request until closed, doing nothing) or
``"late"`` (do what was asked, then hold the answer: the client times out on a request that succeeded)."""

_DEFAULT_MODEL = "gpt-realtime"
_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
"""The built-in voices (a session may also name a custom one: ``{"id": "voice_…"}``)."""
_TRANSCRIPTION_MODELS = frozenset(
    {"gpt-realtime-whisper", "gpt-4o-mini-transcribe", "gpt-4o-transcribe", "whisper-1"}
)
"""Models that transcribe and do nothing else: no session may run on one."""
_MODELS = frozenset(
    {
        "gpt-realtime",
        "gpt-realtime-2.1",
        "gpt-realtime-mini",
        "gpt-4o-realtime-preview",
        *_TRANSCRIPTION_MODELS,
    }
)
"""The models the simulated key may use by default (``GET /models/{model}``): the realtime and
transcription models of the real recordings among them."""
_REASONING_MODELS = ("gpt-realtime-2.1",)
"""Models that reason before they answer (a dated snapshot of one too, ``gpt-realtime-2.1-…``): as
recorded on ``gpt-realtime-2.1``, their assistant messages carry a ``phase`` and their usage counts
``reasoning_tokens``."""
_DEFAULT_INSTRUCTIONS = (
    "Your knowledge cutoff is 2023-10. You are a helpful, witty, and friendly AI. Act like a human, but "
    "remember that you aren't a human and that you can't do human things in the real world."
)
_SESSION_MAX_SECONDS = 3600
_RING_TIMEOUT = 30.0
_CLOSE_TIMEOUT = 2.0
_BAD_ACCEPT_LIFETIME = 0.5  # how long a call accepted with a bad body lives (bad_accept="fail_call")
_HOLD_TURNS = 10  # event-loop turns a response stays active, at least, after its last event before done

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
    }
)
_AUDIO_INPUT_KEYS = frozenset({"format", "transcription", "noise_reduction", "turn_detection"})
_AUDIO_OUTPUT_KEYS = frozenset({"format", "voice", "speed"})
_TURN_DETECTION_KEYS = frozenset(
    {
        "type",
        "threshold",
        "prefix_padding_ms",
        "silence_duration_ms",
        "idle_timeout_ms",
        "create_response",
        "interrupt_response",
        "eagerness",
    }
)
# Keys of one kind of turn detection only: refused in the other.
_TURN_KEYS_OF: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "server_vad": frozenset({"threshold", "prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms"}),
        "semantic_vad": frozenset({"eagerness"}),
    }
)
_EAGERNESS = ("low", "medium", "high", "auto")
_REASONING_EFFORTS = ("minimal", "low", "medium", "high", "xhigh")
_SIP_FORBIDDEN_TURN_KEYS = ("threshold", "prefix_padding_ms", "silence_duration_ms")
_AUDIO_FORMATS = frozenset({"audio/pcm", "audio/pcmu", "audio/pcma"})
_CLIENT_EVENT_TYPES = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.retrieve",
    "conversation.item.truncate",
    "conversation.item.delete",
    "response.create",
    "response.cancel",
    "output_audio_buffer.clear",
)
_MESSAGE_CONTENT_TYPES: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "user": frozenset({"input_text", "input_audio", "input_image"}),
        "system": frozenset({"input_text"}),
        "assistant": frozenset({"output_text", "output_audio"}),
    }
)
_WORDS = re.compile(r"\s*\S+")
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]+$")
# A dict tool choice's kinds: the fields each requires, and those it may have besides.
_TOOL_CHOICE_FIELDS: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = MappingProxyType(
    {"function": (("name",), ()), "mcp": (("server_label",), ("name",))}
)


class ScriptError(AssertionError):
    """A call's script failed (a step timed out, the model was to call a tool not in effect, or the call
    ended before the script finished); also raised by :meth:`SimCall.inject_function_call` for a tool not
    in effect."""


class _StepFailed(Exception):
    """Internal: a script step cannot go on (the script fails with this message)."""


class _StepTimeout(_StepFailed):
    """Internal: one wait of a script step ran out of time."""


class _Problem(NamedTuple):
    param: str | None
    code: str
    message: str


@dataclass(slots=True)
class RequestRecord:
    """One HTTP request the simulator received (WebSocket handshakes included), and the status it answered."""

    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDictProxy[str]
    body: bytes
    json: Any = None
    status: int = 0
    peer: tuple[Any, ...] | None = None
    """The sender's address and port: requests with the same one came on the same connection."""


@dataclass(slots=True)
class ResponseRecord:
    """One model response on a call.

    ``trigger``: ``"response.create"`` (answering the controller), ``"vad"`` (after the caller spoke),
    ``"idle"`` (the server prompting a silent caller: turn detection's ``idle_timeout_ms``) or
    ``"spontaneous"``. ``source``: ``"script"``, ``"auto"`` (a generic answer to an unscripted
    ``response.create``) or ``"injected"`` (:meth:`SimCall.inject_function_call`). ``request`` is the
    ``response`` object of that ``response.create`` (``{}`` if it had none, ``None`` when not triggered by the
    controller).
    """

    response_id: str
    trigger: Literal["response.create", "vad", "idle", "spontaneous"]
    source: Literal["script", "auto", "injected"]
    request: dict[str, Any] | None
    status: str = "in_progress"
    text: str | None = None
    call_ids: list[str] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class InjectedCall:
    """A function call the model made on demand (:meth:`SimCall.inject_function_call`), with timestamps.

    Timestamps are ``time.monotonic_ns()`` (one clock for every process on the machine, so they compare with
    stamps taken elsewhere):

    - ``arguments_done_ns``: just before ``response.function_call_arguments.done`` went to the sideband
      (``None`` if no sideband was attached to receive it);
    - ``output_ns``: when the matching ``function_call_output`` arrived (``None`` until then), with its
      ``output`` string. Only the first output for ``call_id`` counts.

    ``response_id`` is the model response that carried the call (see :attr:`SimCall.responses`).
    """

    call_id: str
    name: str
    arguments: str
    response_id: str | None = None
    arguments_done_ns: int | None = None
    output: str | None = None
    output_ns: int | None = None
    _settled: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    async def wait_output(self, timeout: float = 10.0) -> str:
        """Wait for the controller's ``function_call_output`` and return it (its arrival is ``output_ns``).

        Raises :class:`TimeoutError` if none arrives within ``timeout`` s, :class:`RuntimeError` if the call
        ends first."""
        try:
            async with asyncio.timeout(timeout):
                await self._settled.wait()
        except TimeoutError:
            raise TimeoutError(
                f"no function_call_output for {self.call_id} ({self.name}) within {timeout}s"
            ) from None
        if self.output is None:
            raise RuntimeError(
                f"the call ended before the function_call_output for {self.call_id} ({self.name})"
            )
        return self.output


@dataclass(slots=True)
class _EphemeralKey:
    value: str
    expires_at: int
    session: dict[str, Any]


@dataclass(slots=True, eq=False)
class _Attachment:
    ws: web.WebSocketResponse
    transport: asyncio.Transport | None


_EPHEMERAL = web.RequestKey("sideband_simulator_ephemeral_key", _EphemeralKey)
"""Per-request storage: the ephemeral key a request authenticated with (immutable key object)."""


_RECORD = web.RequestKey("sideband_simulator_request_record", RequestRecord)
"""Per-request storage: the request's record in :attr:`Simulator.requests`."""


def _from_browser(request: web.Request) -> bool:
    """Whether ``request`` is a page's (a WebRTC call started from a browser): answered with CORS headers."""
    return request.path == "/v1/realtime/calls" and "Origin" in request.headers


def _drop_tracebacks(exc: BaseException | None) -> None:
    """Clear the tracebacks of ``exc`` and the exceptions it chains. aiohttp keeps a socket's last error
    (``ws.exception()``: a write into an aborted transport, chained to the EOF before it), and the
    tracebacks' frames hold the socket: cycles only the collector would free."""
    while exc is not None and exc.__traceback__ is not None:
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def _media_type(request: web.Request) -> str:
    """The request's media type, lower-cased, without parameters. Not ``request.content_type``: aiohttp
    parses each Content-Type value it has not cached (a multipart body's boundary is new every time)
    with the email package, whose header registry makes new classes per header: cyclic garbage."""
    media = request.headers.get("Content-Type", "").partition(";")[0]
    return media.strip().lower() or "application/octet-stream"


def _strict_json(data: str | bytes) -> Any:
    """``data`` parsed as the service parses JSON: strictly. ``NaN`` / ``Infinity``, a number out of a
    double's range and a lone surrogate escape (``"\\ud83d"``: half an emoji) are refused, as anything else
    that is not JSON is, with :exc:`ValueError`."""
    return orjson.loads(data)


def _error_body(
    message: str, *, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> web.Response:
    return web.json_response(_error_body(message, type_=type_, param=param, code=code), status=status)


def _fault_response(status: int) -> web.Response:
    if status == 404:
        return _error_response(404, "Call not found.", code="call_not_found")
    if status == 429:
        return _error_response(429, "Rate limit reached.", type_="requests", code="rate_limit_exceeded")
    if status >= 500:
        return _error_response(
            status,
            "The server had an error while processing your request. Sorry about that!",
            type_="server_error",
        )
    return _error_response(status, f"Simulated failure ({status}).")


def _chunks(text: str, limit: int = 12) -> list[str]:
    """Split text into transcript-like deltas (words with their leading space), at most ``limit``."""
    words = _WORDS.findall(text)
    if not words:
        return [text] if text else []
    tail = text[len("".join(words)) :]
    if tail:
        words[-1] += tail
    if len(words) <= limit:
        return words
    size = -(-len(words) // limit)
    return ["".join(words[i : i + size]) for i in range(0, len(words), size)]


def _arg_chunks(arguments: str, limit: int = 12) -> list[str]:
    if not arguments:
        return []
    count = max(1, min(limit, len(arguments) // 4))
    size = -(-len(arguments) // count)
    return [arguments[i : i + size] for i in range(0, len(arguments), size)]


def _reasons(model: Any) -> bool:
    """Whether the session's ``model`` is one of :data:`_REASONING_MODELS` (or a snapshot of one)."""
    return isinstance(model, str) and any(model == m or model.startswith(m + "-") for m in _REASONING_MODELS)


def _usage(input_tokens: int, output_tokens: int, *, audio: bool, reasoning: bool = False) -> dict[str, Any]:
    """A ``response.done``'s ``usage``; a reasoning model's (``reasoning``) counts ``reasoning_tokens``
    among its output tokens too, as recorded."""
    audio_out = output_tokens if audio else 0
    made = {"text_tokens": output_tokens - audio_out, "audio_tokens": audio_out}
    if reasoning:
        made["reasoning_tokens"] = output_tokens // 2
    return {
        "total_tokens": input_tokens + output_tokens,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_token_details": {
            "text_tokens": input_tokens,
            "audio_tokens": 0,
            "image_tokens": 0,
            "cached_tokens": 0,
            "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0},
        },
        "output_token_details": made,
    }


def _creates_response(session: Mapping[str, Any]) -> bool:
    """Whether the session's turn detection starts a response by itself when the caller stops speaking."""
    turn = session.get("audio", {}).get("input", {}).get("turn_detection")
    return isinstance(turn, dict) and bool(turn.get("create_response", True))


def _transcript_usage(session: Mapping[str, Any], seconds: int, text: str) -> dict[str, Any]:
    """A transcript's usage as the server reports it: by duration for whisper models (as recorded), by
    tokens for the ``*-transcribe`` ones (their audio heard, their text written)."""
    model = session.get("audio", {}).get("input", {}).get("transcription", {}).get("model")
    if not (isinstance(model, str) and "transcribe" in model):
        return {"type": "duration", "seconds": seconds}
    heard, wrote = 10 * seconds, len(text) // 4 + 1
    return {
        "type": "tokens",
        "input_tokens": heard,
        "output_tokens": wrote,
        "total_tokens": heard + wrote,
        "input_token_details": {"text_tokens": 0, "audio_tokens": heard},
    }


def _transcribes(session: Mapping[str, Any]) -> bool:
    return isinstance(session.get("audio", {}).get("input", {}).get("transcription"), dict)


def _normalize_turn_detection(value: Mapping[str, Any]) -> dict[str, Any]:
    if value.get("type") == "semantic_vad":
        base: dict[str, Any] = {
            "type": "semantic_vad",
            "eagerness": "auto",
            "create_response": True,
            "interrupt_response": True,
        }
    else:
        base = {
            "type": "server_vad",
            "threshold": 0.5,
            "prefix_padding_ms": 300,
            "silence_duration_ms": 200,
            "idle_timeout_ms": None,
            "create_response": True,
            "interrupt_response": True,
        }
    base.update(copy.deepcopy(dict(value)))
    return base


def _normalize_tool(tool: Mapping[str, Any]) -> dict[str, Any]:
    if tool.get("type", "function") != "function":
        return copy.deepcopy(dict(tool))
    out: dict[str, Any] = {"type": "function", "name": tool.get("name")}
    if "description" in tool:
        out["description"] = tool["description"]
    out["parameters"] = copy.deepcopy(tool.get("parameters", {}))
    return out


_CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "Location"}
_CORS_PREFLIGHT = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST",
    "Access-Control-Allow-Headers": "Authorization, Content-Type",
    "Access-Control-Max-Age": "600",
}


def _default_session(
    session_id: str, *, model: str, sip: bool, seconds: float = _SESSION_MAX_SECONDS
) -> dict[str, Any]:
    fmt: dict[str, Any] = {"type": "audio/pcmu"} if sip else {"type": "audio/pcm", "rate": 24000}
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": ["audio"],
        "instructions": _DEFAULT_INSTRUCTIONS,
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "expires_at": int(time.time() + seconds),
        "audio": {
            "input": {
                "format": dict(fmt),
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": _normalize_turn_detection({"type": "server_vad"}),
            },
            "output": {"format": dict(fmt), "voice": "alloy", "speed": 1.0},
        },
        "include": None,
    }


def _merge_session(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with the fields present in ``update`` changed (a new object; ``base`` is not modified)."""
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        if key in ("type", "object", "id"):
            continue
        if key == "tools":
            merged["tools"] = [_normalize_tool(t) for t in value]
        elif key == "audio":
            audio = merged.setdefault("audio", {"input": {}, "output": {}})
            for direction in ("input", "output"):
                part = value.get(direction)
                if not isinstance(part, Mapping):
                    continue
                target = audio.setdefault(direction, {})
                for sub, sub_value in part.items():
                    if sub == "transcription" and isinstance(sub_value, Mapping):
                        target[sub] = {"model": None, "language": None, "prompt": None, **sub_value}
                    elif sub == "turn_detection" and isinstance(sub_value, Mapping):
                        target[sub] = _normalize_turn_detection(sub_value)
                    else:
                        target[sub] = copy.deepcopy(sub_value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


_RESPONSE_KEYS = frozenset(
    {
        "audio",
        "conversation",
        "input",
        "instructions",
        "max_output_tokens",
        "metadata",
        "output_modalities",
        "prompt",
        "tool_choice",
        "tools",
    }
)


def _check_response(response: Mapping[str, Any]) -> _Problem | None:
    """What the real service would reject in ``response.create``'s ``response`` overrides (GA shape)."""
    for key in response:
        if key not in _RESPONSE_KEYS:
            return _Problem(f"response.{key}", "unknown_parameter", f"Unknown parameter: 'response.{key}'.")
    if "metadata" in response:
        problem = _check_metadata(response["metadata"], "response.metadata")
        if problem is not None:
            return problem
    if "conversation" in response and response["conversation"] not in ("auto", "none"):
        return _Problem(
            "response.conversation",
            "invalid_value",
            f"Invalid value: {response['conversation']!r}. Supported values are: 'auto' and 'none'.",
        )
    if "audio" in response:
        problem = _check_response_audio(response["audio"])
        if problem is not None:
            return problem
    shared = {
        k: response[k] for k in ("instructions", "output_modalities", "tools", "tool_choice") if k in response
    }
    if "max_output_tokens" in response:
        shared["max_output_tokens"] = response["max_output_tokens"]
    return _check_session({"type": "realtime", **shared}, "response.", sip=False, accept=False)


def _check_response_audio(audio: Any) -> _Problem | None:
    """What the service refuses in ``response.create``'s ``response.audio``: it takes ``output`` with a
    ``format`` and a ``voice`` (checked as a session's voice)."""
    where = "response.audio"
    if not isinstance(audio, dict):
        return _Problem(where, "invalid_type", f"Invalid type for '{where}': expected an object.")
    for key in audio:
        if key != "output":
            return _Problem(f"{where}.{key}", "unknown_parameter", f"Unknown parameter: '{where}.{key}'.")
    if "output" not in audio:
        return None
    output, here = audio["output"], f"{where}.output"
    if not isinstance(output, dict):
        return _Problem(here, "invalid_type", f"Invalid type for '{here}': expected an object.")
    for key in output:
        if key not in ("format", "voice"):
            return _Problem(f"{here}.{key}", "unknown_parameter", f"Unknown parameter: '{here}.{key}'.")
    if "format" in output:
        fmt = output["format"]
        if not isinstance(fmt, dict) or fmt.get("type") not in _AUDIO_FORMATS:
            return _Problem(f"{here}.format", "invalid_value", f"Invalid value for '{here}.format'.")
    if "voice" in output:
        return _check_voice(output["voice"], f"{here}.voice")
    return None


def _itemless_array(schema: Any, context: tuple[str, ...]) -> tuple[str, ...] | None:
    """Where in a function's parameters an array schema has no ``items``, as the service names it
    (``('properties', 'coords')``); ``None`` when every array schema has them."""
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    if (kind == "array" or (isinstance(kind, list) and "array" in kind)) and "items" not in schema:
        return context
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            for name, sub in value.items():
                found = _itemless_array(sub, (*context, key, str(name)))
                if found is not None:
                    return found
        elif key in ("items", "additionalProperties", "not"):
            found = _itemless_array(value, (*context, key))
            if found is not None:
                return found
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems") and isinstance(value, list):
            for i, sub in enumerate(value):
                found = _itemless_array(sub, (*context, key, str(i)))
                if found is not None:
                    return found
    return None


def _check_tool_choice(choice: Any, where: str) -> _Problem | None:
    """A tool choice as the service takes it: ``"auto"``, ``"none"``, ``"required"``, one function
    (``{"type": "function", "name": …}``) or an MCP server's tool (``{"type": "mcp", "server_label": …}``)."""
    if not isinstance(choice, dict):
        if isinstance(choice, str) and choice in ("auto", "none", "required"):
            return None
        return _Problem(
            where,
            "invalid_value",
            f"Invalid value: {choice!r}. Supported values are: 'auto', 'none', and 'required'.",
        )
    kind = choice.get("type")
    if kind is None:
        return _Problem(
            f"{where}.type", "missing_required_parameter", f"Missing required parameter: '{where}.type'."
        )
    fields = _TOOL_CHOICE_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        return _Problem(
            f"{where}.type",
            "invalid_value",
            f"Invalid value: {kind!r}. Supported values are: 'function' and 'mcp'.",
        )
    required, optional = fields
    for key in choice:
        if key != "type" and key not in required and key not in optional:
            return _Problem(f"{where}.{key}", "unknown_parameter", f"Unknown parameter: '{where}.{key}'.")
    for key in required:
        if key not in choice:
            return _Problem(
                f"{where}.{key}",
                "missing_required_parameter",
                f"Missing required parameter: '{where}.{key}'.",
            )
    for key in (*required, *optional):
        if key in choice and not isinstance(choice[key], str):
            return _Problem(
                f"{where}.{key}", "invalid_type", f"Invalid type for '{where}.{key}': expected a string."
            )
    return None


def _check_text_part(part: Mapping[str, Any], where: str) -> _Problem | None:
    """What the service refuses in a message's ``input_text`` / ``output_text`` part: no ``text`` string."""
    if part["type"] not in ("input_text", "output_text"):
        return None
    if "text" not in part:
        return _Problem(
            f"{where}.text", "missing_required_parameter", f"Missing required parameter: '{where}.text'."
        )
    if not isinstance(part["text"], str):
        return _Problem(
            f"{where}.text", "invalid_type", f"Invalid type for '{where}.text': expected a string."
        )
    return None


def _check_metadata(metadata: Any, param: str) -> _Problem | None:
    """What the real service would reject in a ``metadata`` map: up to 16 string values (≤ 512
    characters) under keys of at most 64 characters; ``null`` clears it."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return _Problem(param, "invalid_type", f"Invalid type for '{param}': expected an object.")
    if len(metadata) > 16:
        return _Problem(
            param,
            "object_above_max_properties",
            f"Invalid '{param}': too many properties. Expected an object with at most 16 properties, but "
            f"got an object with {len(metadata)} properties instead.",
        )
    for key, value in metadata.items():
        if len(key) > 64:
            return _Problem(
                param,
                "string_above_max_length",
                f"Invalid '{param}': key too long. Expected a key with maximum length 64, but got a key "
                f"with length {len(key)} instead.",
            )
        if not isinstance(value, str):
            return _Problem(
                f"{param}.{key}", "invalid_type", f"Invalid type for '{param}.{key}': expected a string."
            )
        if len(value) > 512:
            return _Problem(
                f"{param}.{key}",
                "string_above_max_length",
                f"Invalid '{param}.{key}': string too long. Expected a string with maximum length 512, "
                f"but got a string with length {len(value)} instead.",
            )
    return None


def _check_session(session: Mapping[str, Any], prefix: str, *, sip: bool, accept: bool) -> _Problem | None:
    """What the real service would reject in a session config (accept body or ``session.update``)."""
    for key in session:
        if key not in _SESSION_KEYS:
            return _Problem(f"{prefix}{key}", "unknown_parameter", f"Unknown parameter: '{prefix}{key}'.")
    if session.get("type") != "realtime":
        return _Problem(
            f"{prefix}type",
            "invalid_value",
            f"Invalid value: {session.get('type')!r}. Supported values are: 'realtime'.",
        )
    for key in ("model", "instructions"):
        if key in session and not isinstance(session[key], str):
            return _Problem(
                f"{prefix}{key}", "invalid_type", f"Invalid type for '{prefix}{key}': expected a string."
            )
    if "output_modalities" in session:
        modalities = session["output_modalities"]
        if not isinstance(modalities, list) or len(modalities) != 1 or modalities[0] not in ("audio", "text"):
            return _Problem(
                f"{prefix}output_modalities",
                "invalid_value",
                "output_modalities must be ['audio'] or ['text'].",
            )
    if "tools" in session:
        tools = session["tools"]
        if not isinstance(tools, list):
            return _Problem(
                f"{prefix}tools", "invalid_type", f"Invalid type for '{prefix}tools': expected an array."
            )
        for index, tool in enumerate(tools):
            where = f"{prefix}tools[{index}]"
            if not isinstance(tool, dict):
                return _Problem(where, "invalid_type", f"Invalid type for '{where}': expected an object.")
            if tool.get("type", "function") == "function":
                if tool.get("name") in (None, ""):
                    return _Problem(
                        f"{where}.name",
                        "missing_required_parameter",
                        f"Missing required parameter: '{where}.name'.",
                    )
                for key in ("name", "description"):
                    if key in tool and not isinstance(tool[key], str):
                        return _Problem(
                            f"{where}.{key}",
                            "invalid_type",
                            f"Invalid type for '{where}.{key}': expected a string.",
                        )
                if len(tool["name"]) > 64:
                    return _Problem(
                        f"{where}.name",
                        "string_above_max_length",
                        f"Invalid '{where}.name': string too long. Expected a string with maximum length 64, "
                        f"but got a string with length {len(tool['name'])} instead.",
                    )
                if not _TOOL_NAME.fullmatch(tool["name"]):
                    return _Problem(
                        f"{where}.name",
                        "invalid_value",
                        f"Invalid '{where}.name': string does not match pattern. Expected a string that "
                        f"matches the pattern '{_TOOL_NAME.pattern}'.",
                    )
                if "parameters" in tool and not isinstance(tool["parameters"], dict):
                    return _Problem(
                        f"{where}.parameters",
                        "invalid_type",
                        f"Invalid type for '{where}.parameters': expected an object.",
                    )
                itemless = _itemless_array(tool.get("parameters"), ())
                if itemless is not None:
                    return _Problem(
                        f"{where}.parameters",
                        "invalid_function_parameters",
                        f"Invalid schema for function '{tool['name']}': In context={itemless!r}, "
                        "array schema missing items.",
                    )
    if "tool_choice" in session:
        problem = _check_tool_choice(session["tool_choice"], f"{prefix}tool_choice")
        if problem is not None:
            return problem
    if "max_output_tokens" in session:
        limit = session["max_output_tokens"]
        if not (
            limit == "inf" or (isinstance(limit, int) and not isinstance(limit, bool) and 1 <= limit <= 4096)
        ):
            return _Problem(
                f"{prefix}max_output_tokens",
                "invalid_value",
                "max_output_tokens must be an integer between 1 and 4096, or 'inf'.",
            )
    if "reasoning" in session:
        reasoning = session["reasoning"]
        if reasoning is not None and (not isinstance(reasoning, dict) or set(reasoning) - {"effort"}):
            return _Problem(
                f"{prefix}reasoning", "invalid_value", f"'{prefix}reasoning' takes one field: 'effort'."
            )
        if isinstance(reasoning, dict) and reasoning.get("effort", "low") not in _REASONING_EFFORTS:
            return _Problem(
                f"{prefix}reasoning.effort",
                "invalid_value",
                "Invalid value. Supported values are: 'minimal', 'low', 'medium', 'high' and 'xhigh'.",
            )
    if "audio" in session:
        return _check_audio(session["audio"], f"{prefix}audio", sip=sip, accept=accept)
    return None


def _check_audio(audio: Any, where: str, *, sip: bool, accept: bool) -> _Problem | None:
    if not isinstance(audio, dict):
        return _Problem(where, "invalid_type", f"Invalid type for '{where}': expected an object.")
    for key in audio:
        if key not in ("input", "output"):
            return _Problem(f"{where}.{key}", "unknown_parameter", f"Unknown parameter: '{where}.{key}'.")
    for direction, allowed in (("input", _AUDIO_INPUT_KEYS), ("output", _AUDIO_OUTPUT_KEYS)):
        if direction not in audio:
            continue
        part = audio[direction]
        here = f"{where}.{direction}"
        if not isinstance(part, dict):
            return _Problem(here, "invalid_type", f"Invalid type for '{here}': expected an object.")
        for key in part:
            if key not in allowed:
                return _Problem(f"{here}.{key}", "unknown_parameter", f"Unknown parameter: '{here}.{key}'.")
        if "format" in part:
            if sip:
                return _Problem(
                    f"{here}.format",
                    "invalid_value",
                    f"'{here}.format' is not supported for SIP calls: the codec is negotiated in SIP.",
                )
            fmt = part["format"]
            if not isinstance(fmt, dict) or fmt.get("type") not in _AUDIO_FORMATS:
                return _Problem(f"{here}.format", "invalid_value", f"Invalid value for '{here}.format'.")
        if direction == "input":
            problem = _check_audio_input(part, here, sip=sip, accept=accept)
            if problem is not None:
                return problem
        else:
            if "voice" in part:
                problem = _check_voice(part["voice"], f"{here}.voice")
                if problem is not None:
                    return problem
            speed = part.get("speed", 1.0)
            if not isinstance(speed, int | float) or isinstance(speed, bool) or not 0.25 <= speed <= 1.5:
                return _Problem(f"{here}.speed", "invalid_value", "speed must be between 0.25 and 1.5.")
    return None


def _check_voice(voice: Any, param: str) -> _Problem | None:
    """A built-in voice's name, or a custom voice (``{"id": "voice_…"}``), as the service takes them."""
    if isinstance(voice, dict):
        if set(voice) != {"id"} or not isinstance(voice["id"], str) or not voice["id"].startswith("voice_"):
            return _Problem(
                param, "invalid_value", f'Invalid value for \'{param}\': expected {{"id": "voice_…"}}.'
            )
        return None
    if not isinstance(voice, str):
        return _Problem(param, "invalid_type", f"Invalid type for '{param}': expected a string or an object.")
    if voice not in _VOICES:
        names = ", ".join(f"'{v}'" for v in _VOICES[:-1])
        return _Problem(
            param,
            "invalid_value",
            f"Invalid value: '{voice}'. Supported values are: {names}, and '{_VOICES[-1]}'.",
        )
    return None


def _check_audio_input(part: Mapping[str, Any], here: str, *, sip: bool, accept: bool) -> _Problem | None:
    transcription = part.get("transcription")
    if transcription is not None and (
        not isinstance(transcription, dict) or not isinstance(transcription.get("model"), str)
    ):
        return _Problem(
            f"{here}.transcription.model", "invalid_value", f"'{here}.transcription' needs a 'model' string."
        )
    noise = part.get("noise_reduction")
    if noise is not None and (
        not isinstance(noise, dict) or noise.get("type") not in ("near_field", "far_field")
    ):
        return _Problem(
            f"{here}.noise_reduction.type",
            "invalid_value",
            "noise_reduction.type must be 'near_field' or 'far_field'.",
        )
    turn = part.get("turn_detection")
    if turn is None:
        return None
    where = f"{here}.turn_detection"
    if not isinstance(turn, dict):
        return _Problem(where, "invalid_type", f"Invalid type for '{where}': expected an object.")
    if turn.get("type") not in ("server_vad", "semantic_vad"):
        return _Problem(
            f"{where}.type",
            "invalid_value",
            "Invalid value. Supported values are: 'server_vad' and 'semantic_vad'.",
        )
    other = "semantic_vad" if turn["type"] == "server_vad" else "server_vad"
    for key in turn:
        if key not in _TURN_DETECTION_KEYS or key in _TURN_KEYS_OF[other]:
            return _Problem(f"{where}.{key}", "unknown_parameter", f"Unknown parameter: '{where}.{key}'.")
    idle = turn.get("idle_timeout_ms")
    if idle is not None and (not isinstance(idle, int) or isinstance(idle, bool) or idle <= 0):
        return _Problem(
            f"{where}.idle_timeout_ms", "invalid_value", "idle_timeout_ms must be a positive integer or null."
        )
    if "eagerness" in turn and turn["eagerness"] not in _EAGERNESS:
        return _Problem(
            f"{where}.eagerness",
            "invalid_value",
            "Invalid value. Supported values are: 'low', 'medium', 'high' and 'auto'.",
        )
    if sip and accept:
        for key in _SIP_FORBIDDEN_TURN_KEYS:
            if key in turn:
                return _Problem(
                    f"{where}.{key}",
                    "unknown_parameter",
                    f"'{where}.{key}' is not supported when accepting a SIP call.",
                )
    return None


def _refuse_webrtc_session(session: Any, *, accept: bool) -> web.Response | None:
    """The 400 the service answers for a bad WebRTC ``session`` object, or ``None`` when it is fine."""
    if not isinstance(session, dict):
        return _error_response(
            400, "Invalid type for 'session': expected an object.", param="session", code="invalid_type"
        )
    if "type" not in session:
        return _error_response(
            400,
            "Missing required parameter: 'session.type'.",
            param="session.type",
            code="missing_required_parameter",
        )
    problem = _check_session(session, "session.", sip=False, accept=accept)
    if problem is not None:
        return _error_response(400, problem.message, param=problem.param, code=problem.code)
    return None


def _refused_calls(
    calls: Sequence[FunctionCallSpec],
    session: Mapping[str, Any],
    create: Mapping[str, Any] | None,
    status: str = "completed",
) -> str | None:
    """Why the model could not make ``calls`` in a response to ``create`` (``None``: a response of its own,
    under the session's settings), or ``None`` if it could: it calls only the function tools in effect
    (the ``response.create``'s ``tools`` / ``tool_choice``, else the session's), none under
    ``tool_choice: "none"``, and only the forced one under a tool choice naming one; and a response that
    completes with no call at all is refused under a ``tool_choice`` of ``"required"`` or forcing a
    function (the model must call one)."""
    overrides = (create.get("response") or {}) if create is not None else {}
    tools, tools_from = (
        (overrides["tools"], "the response.create's")
        if "tools" in overrides
        else (session.get("tools") or [], "the session's")
    )
    choice, choice_from = (
        (overrides["tool_choice"], "the response.create's")
        if "tool_choice" in overrides
        else (session.get("tool_choice", "auto"), "the session's")
    )
    if not calls:
        if status != "completed":  # (cut short or failed before it called anything)
            return None
        if choice == "required":
            forced = 'is "required"'
        elif isinstance(choice, Mapping) and choice.get("type") == "function":
            forced = f"forces {choice.get('name')!r}"
        else:
            return None
        return (
            f"the model must call a tool: {choice_from} tool_choice {forced} (script model_calls(…) for "
            "this response)"
        )
    declared = [
        t.get("name") for t in tools if isinstance(t, Mapping) and t.get("type", "function") == "function"
    ]
    for spec in calls:
        if choice == "none":
            reason = f'{choice_from} tool_choice is "none": the model calls no tool'
        elif isinstance(choice, Mapping) and choice.get("type") == "mcp":
            reason = f"{choice_from} tool_choice forces a tool of MCP server {choice.get('server_label')!r}"
        elif isinstance(choice, Mapping) and choice.get("name") != spec.name:
            reason = f"{choice_from} tool_choice forces {choice.get('name')!r}"
        elif spec.name not in declared:
            names = ", ".join(repr(n) for n in declared) or "none"
            reason = f"it is not among {tools_from} tools ({names})"
        else:
            continue
        return (
            f"the model cannot call {spec.name!r}: {reason} (undeclared=True scripts a call to a tool "
            "that is not in effect)"
        )
    return None


def _is_response_step(step: Step) -> bool:
    return isinstance(step, WaitForGreeting | ModelSays | ModelCalls)


class _Ticker:
    """Wakes waiters whenever the state they watch may have changed (cheap when nobody waits)."""

    __slots__ = ("_event", "_waiters")

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._waiters = 0

    def notify(self) -> None:
        if self._waiters:
            self._event.set()
            self._event = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._waiters += 1
                    try:
                        await self._event.wait()
                    finally:
                        self._waiters -= 1
        except TimeoutError:
            raise TimeoutError(f"{what} not met within {timeout}s") from None


class SimCall:
    """One simulated call: its record (what was asked, what was sent) and the runtime playing its script.

    Public attributes are a read-only record for tests:

    - ``call_id`` (``rtc_<32 hex>``), ``kind`` (``"sip"``/``"webrtc"``), ``script``, ``from_number``,
      ``to_number``, ``sip_headers``, ``media_security``;
    - ``status`` (``"ringing"``, ``"accepted"``, ``"rejected"``, ``"referred"``, ``"ended"``) and
      ``end_reason`` (``"caller_hangup"``, ``"hangup_verb"``, ``"rejected"``, ``"referred"``,
      ``"session_expired"``, ``"script_done"``, ``"accept_failed"``, ``"ring_timeout"``);
    - ``accept_body``, ``accept_problem`` (what was wrong with an accept body taken with
      ``bad_accept="fail_call"``, else ``None``), ``reject_body``, ``refer_target``, ``hangup_requested``,
      ``session`` (the full effective session), ``sdp_offer``/``ephemeral_key`` (WebRTC);
    - ``received`` (client events, in order), ``sent`` (server events, in order), ``timeline`` (both, as
      ``("received" | "sent", event)`` in the order they arrived or left), ``bad_frames`` (frames that
      were not JSON objects), ``sideband_connects``;
    - ``responses`` (:class:`ResponseRecord` per model response), ``function_outputs`` (``(call_id,
      output)`` in arrival order), ``transcript`` (``(role, text)`` lines);
    - ``script_error`` (why the script failed, or ``None``), ``internal_errors`` (simulator bugs:
      tracebacks, those of requests on the call it failed on included), ``accept_faults`` (faults queued
      for the next accept attempts), ``webhook_delivery``;
    - ``accept_received_ns`` (when the first accept request for the call reached its handler) and
      ``first_session_update_ns`` (when the first ``session.update`` arrived): ``time.monotonic_ns()``, or
      ``None`` before that happened.

    :meth:`inject_function_call` makes the model call a function at any moment of a live call.
    """

    def __init__(
        self,
        sim: Simulator,
        call_id: str,
        script: Script,
        *,
        kind: Literal["sip", "webrtc"],
        from_number: str | None = None,
        to_number: str | None = None,
        sip_headers: list[dict[str, str]] | None = None,
        media_security: str | None = None,
    ) -> None:
        self.call_id = call_id
        self.kind: Literal["sip", "webrtc"] = kind
        self.script = script
        self.from_number = from_number
        self.to_number = to_number
        self.sip_headers: list[dict[str, str]] = sip_headers or []
        self.media_security = media_security
        self.created_at = int(time.time())
        self.incoming_event_id = "evt_" + uuid.uuid4().hex
        self.status: CallStatus = "ringing"
        self.end_reason: str | None = None
        self.accept_body: dict[str, Any] | None = None
        self.accept_problem: str | None = None
        self.reject_body: dict[str, Any] | None = None
        self.refer_target: str | None = None
        self.hangup_requested = False
        self.session: dict[str, Any] | None = None
        self.received: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self.timeline: list[tuple[Literal["received", "sent"], dict[str, Any]]] = []
        self.bad_frames: list[str | bytes] = []
        self.internal_errors: list[str] = []
        self.sideband_connects = 0
        self.responses: list[ResponseRecord] = []
        self.function_outputs: list[tuple[str, str]] = []
        self.transcript: list[tuple[str, str]] = []
        self.script_error: str | None = None
        self.sdp_offer: str | None = None
        self.ephemeral_key: str | None = None
        self.webhook_delivery: DeliveryResult | None = None
        self.accept_faults: deque[Fault] = sim._call_faults.pop(call_id, deque())
        self.accept_received_ns: int | None = None
        self.first_session_update_ns: int | None = None

        self._sim = sim
        self._session_id = "sess_" + call_id.removeprefix("rtc_")
        self._conversation_id = sim._new_id("conv_")
        self._sockets: list[_Attachment] = []
        self._unreachable: list[_Attachment] = []  # dropped by drop_sideband(..., "unreachable")
        self._attached = asyncio.Event()
        self._first_event = asyncio.Event()
        self._ended = asyncio.Event()
        self._done = asyncio.Event()
        self._ticker = _Ticker()
        self._runner: asyncio.Task[None] | None = None
        self._response_tasks: set[asyncio.Task[None]] = set()
        self._response_lock = asyncio.Lock()
        self._active_response: str | None = None
        self._pending_create: dict[str, Any] | None = None
        self._pending_response_id: str | None = None  # the id the pending create's response will have
        self._unannounced: str | None = None  # the active response's id while its response.created is due
        self._create_arrived = asyncio.Event()
        self._cancel_reason: str | None = None
        self._deferred: list[tuple[str, dict[str, Any]]] = []
        self._function_calls: dict[str, str] = {}
        self._answered_calls: set[str] = set()
        self._outputs_changed = asyncio.Event()
        self._items: dict[str, dict[str, Any]] = {}
        self._last_item_id: str | None = None
        self._first_item_id: str | None = None  # the item at the start of the conversation
        self._step_index = 0
        self._phase_value = "idle"
        self._next_needs_create = False
        self._grace_done = False
        self._audio_ms = 0
        self._assistant_audio = False
        self._audio_response: str | None = None  # whose audio started and has not stopped or cleared
        self._playback: asyncio.Task[None] | None = None  # its playing out, after its response.done
        self._playback_cut: asyncio.Event | None = None
        self._pending_transcript: dict[str, Any] | None = None  # the caller's, completing mid-answer
        self._pending_deltas: deque[dict[str, Any]] = deque()  # its deltas still to come (after the stop)
        self._response_count = 0
        self._awaiting_ids: list[str] = []
        self._vad_turn = False
        # What the caller said with turn detection off, not committed yet: (text, seconds, untranscribed)
        self._input_buffer: list[tuple[str, int, bool]] = []
        self._injected: dict[str, InjectedCall] = {}
        self._idle_task: asyncio.Task[None] | None = None  # the server's idle timer (idle_timeout_ms)
        self._ring_task: asyncio.Task[None] | None = None  # ends the call if nobody accepts it in time
        self._rung_out = False  # the ring timeout passed while an accept was in flight
        self._accepts_in_flight = 0  # accept requests received, not yet decided

    def __repr__(self) -> str:
        return f"<SimCall {self.call_id} {self.kind} status={self.status} end_reason={self.end_reason}>"

    # ----------------------------------------------------------------------------------------- waiting

    @property
    def ended(self) -> bool:
        """Whether the call has ended (any way)."""
        return self._ended.is_set()

    @property
    def script_done(self) -> bool:
        """Whether the script finished (successfully or not)."""
        return self._done.is_set()

    @property
    def phase(self) -> str:
        """Where the script is: ``idle``, ``wait_ready``, ``wait_create``, ``emitting``, ``await_outputs``,
        ``pause``, ``hanging_up`` or ``finished`` (with :attr:`step_index`; useful with :meth:`wait_for`)."""
        return self._phase_value

    @property
    def step_index(self) -> int:
        """The index of the script step being played (``len(script.steps)`` once finished)."""
        return self._step_index

    @property
    def _phase(self) -> str:
        return self._phase_value

    def _set_phase(self, phase: str) -> None:
        self._phase_value = phase
        self._notify()

    def _describe_position(self) -> str:
        steps = self.script.steps
        if self._done.is_set():
            return "script finished"
        if self._step_index < len(steps):
            return f"at step {self._step_index} {steps[self._step_index].describe()} ({self._phase})"
        return f"after the last step ({self._phase})"

    async def wait_ended(self, timeout: float = 10.0) -> None:
        """Wait until the call ended (verb, caller hangup, rejected, referred, expired, script done)."""
        try:
            async with asyncio.timeout(timeout):
                await self._ended.wait()
        except TimeoutError:
            raise TimeoutError(
                f"call {self.call_id} did not end within {timeout}s "
                f"(status {self.status}, {self._describe_position()})"
            ) from None

    async def wait_done(self, timeout: float = 10.0) -> None:
        """Wait until the script ran to completion; raise :class:`ScriptError` if it failed."""
        try:
            async with asyncio.timeout(timeout):
                await self._done.wait()
        except TimeoutError:
            raise TimeoutError(
                f"call {self.call_id}: script not done within {timeout}s ({self._describe_position()}, "
                f"status {self.status})"
            ) from None
        if self.script_error is not None:
            raise ScriptError(f"call {self.call_id}: {self.script_error}")

    async def wait_for(
        self,
        predicate: Callable[[SimCall], bool],
        timeout: float = 10.0,
        what: str = "condition",
    ) -> None:
        """Wait until ``predicate(call)`` holds (re-checked whenever the call's state changes)."""
        await self._ticker.wait_for(lambda: predicate(self), timeout, f"call {self.call_id}: {what}")

    async def wait_connected(self, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until the sideband was attached ``count`` times in total."""
        await self.wait_for(lambda c: c.sideband_connects >= count, timeout, f"{count} sideband connect(s)")

    async def wait_received(self, event_type: str, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for the first client event of ``event_type`` and return it."""

        def found(call: SimCall) -> bool:
            return any(e.get("type") == event_type for e in call.received)

        await self.wait_for(found, timeout, f"client event {event_type!r}")
        return next(e for e in self.received if e.get("type") == event_type)

    def output_for(self, call_id: str) -> str | None:
        """The first ``function_call_output`` the controller sent for a function ``call_id``."""
        return next((out for cid, out in self.function_outputs if cid == call_id), None)

    def sent_of_type(self, event_type: str) -> list[dict[str, Any]]:
        """Server events of one type, in order."""
        return [e for e in self.sent if e["type"] == event_type]

    # ------------------------------------------------------------------------------------ on demand

    async def inject_function_call(
        self,
        name: str,
        arguments: Mapping[str, Any] | str | None = None,
        *,
        call_id: str | None = None,
        undeclared: bool = False,
    ) -> InjectedCall:
        """The model calls ``name(arguments)`` now, whatever the script is doing, in a response of its own.

        The events are those of a scripted :func:`~sideband.testing.model_calls` (``response.created``,
        ``response.output_item.added``, ``conversation.item.added``, argument deltas,
        ``response.function_call_arguments.done``, ``conversation.item.done``, ``response.output_item.done``,
        ``response.done``). A response in progress finishes first. ``arguments``: a dict
        is sent as compact JSON, a str verbatim; ``call_id`` is generated (``call_…``) when not given.

        Returns once ``response.done`` went out; the record's :meth:`InjectedCall.wait_output` waits for the
        controller's output. The controller's next ``response.create`` is answered as any other: by the
        script if a step is waiting for one, else with the simulator's ``auto_answer_text``. The script does
        not wait for injected calls and the call's :attr:`responses` records the response with
        ``source="injected"``.

        As on the real service, the model calls only a tool the session declares (its ``tools``), and none
        under its ``tool_choice`` ``"none"`` (or another than the one a ``tool_choice`` forces): another
        call raises :class:`ScriptError` naming the tools in effect. ``undeclared=True`` makes the call
        anyway, to test a call to a tool that was withdrawn or never existed (a model's hallucination).

        Raises :class:`RuntimeError` if the call is not live (never accepted, or ended), :class:`ValueError`
        if ``call_id`` is already in the conversation.
        """
        spec = model_calls(name, {} if arguments is None else arguments, call_id=call_id).calls[0]
        if spec.call_id is None:
            spec = FunctionCallSpec(spec.name, spec.arguments, "call_" + secrets.token_hex(8))
        assert spec.call_id is not None
        injected = InjectedCall(spec.call_id, spec.name, spec.arguments)
        async with self._response_lock:
            if self.status != "accepted" or self._ended.is_set():
                raise RuntimeError(f"call {self.call_id} is not live (status {self.status})")
            if spec.call_id in self._function_calls or spec.call_id in self._injected:
                raise ValueError(f"call {self.call_id}: function call_id {spec.call_id!r} is already in use")
            assert self.session is not None
            refused = None if undeclared else _refused_calls((spec,), self.session, None)
            if refused is not None:
                raise ScriptError(f"call {self.call_id}: {refused}")
            self._injected[spec.call_id] = injected
            record = await self._emit_response(
                text=None,
                calls=(spec,),
                status="completed",
                create=None,
                trigger="spontaneous",
                source="injected",
                injected=injected,
            )
        injected.response_id = record.response_id
        return injected

    def _notify(self) -> None:
        self._ticker.notify()

    # ------------------------------------------------------------------------------------ sending

    async def _send(self, event_type: str, /, **fields: Any) -> bool:
        """Send one server event to the attached sideband(s), ``event_gap`` seconds after the last; False
        if none was attached (event dropped)."""
        if self._sim.event_gap:
            # The real service streams a response over time: what a client sends meanwhile (an early
            # response.create…) reaches it before the next event, while the response is still active.
            await asyncio.sleep(self._sim.event_gap)
        return await self._send_now(event_type, **fields)

    async def _send_now(self, event_type: str, /, **fields: Any) -> bool:
        """:meth:`_send` without the ``event_gap``."""
        event: dict[str, Any] = {"type": event_type, "event_id": self._sim._new_id("event_")}
        event.update(fields)
        sockets = [a for a in self._sockets if not a.ws.closed]
        if not sockets:
            return False
        self.sent.append(event)
        self.timeline.append(("sent", event))
        data = json.dumps(event)
        for attachment in sockets:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await attachment.ws.send_str(data)
        self._notify()
        return True

    async def _error(
        self,
        code: str | None,
        message: str,
        *,
        param: str | None = None,
        event_id: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        await self._send(
            "error",
            error={"type": type_, "code": code, "message": message, "param": param, "event_id": event_id},
        )

    # ------------------------------------------------------------------------------------ lifecycle

    def _accept(self, body: dict[str, Any]) -> None:
        self._stop_ringing()
        self.status = "accepted"
        self.accept_body = body
        seconds = self._sim.session_seconds
        base = _default_session(
            self._session_id, model=self._sim.model, sip=self.kind == "sip", seconds=seconds
        )
        self.session = _merge_session(base, body)
        self._sim._spawn(self._expire_in(seconds))
        self._set_phase("wait_ready")
        if self.script.steps:
            self._runner = self._sim._spawn(self._run_script())
        else:
            self._set_phase("finished")
            self._done.set()
        self._notify()

    def _accept_bad(self, body: dict[str, Any], problem: str) -> None:
        """Accepted (200) with a body the service cannot use: the call fails soon after. A sideband that
        attaches meanwhile is closed at once; later ones are refused, the call being gone."""
        self._stop_ringing()
        self.status = "accepted"
        self.accept_body = body
        self.accept_problem = problem
        self.session = _default_session(
            self._session_id, model=self._sim.model, sip=self.kind == "sip", seconds=self._sim.session_seconds
        )
        self._sim._spawn(self._fail_soon())
        self._notify()

    def _stop_ringing(self) -> None:
        task, self._ring_task = self._ring_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _ring_out(self, seconds: float) -> None:
        """Nobody accepted the call within ``seconds``: the caller heard it ring, then the leg is dropped
        (``ring_timeout``). An accept in flight then keeps the call: it ends only if that accept fails."""
        await asyncio.sleep(seconds)
        self._ring_task = None
        if self.status != "ringing" or self._ended.is_set():
            return
        if self._accepts_in_flight:
            self._rung_out = True  # (decided when the accept is)
            return
        await self._end("ring_timeout")

    def _accept_arrived(self) -> None:
        """An accept request for the ringing call came in (its body may still be on its way)."""
        self._accepts_in_flight += 1

    def _accept_decided(self) -> None:
        """That accept was carried out or refused: a call that rang out meanwhile and is still not
        accepted ends now."""
        self._accepts_in_flight -= 1
        if self._accepts_in_flight or not self._rung_out or self.status != "ringing" or self._sim._closed:
            return
        self._sim._spawn(self._end("ring_timeout"))

    async def _fail_soon(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._attached.wait(), _BAD_ACCEPT_LIFETIME)
        await self._end("accept_failed", "clean")

    async def _expire_in(self, seconds: float) -> None:
        """The session's maximum duration: cut when it is reached (``session_expired``), unless it ended."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), seconds)
            return
        await self._sim._expire(self)

    async def _transfer_in(self, seconds: float, mode: str) -> None:
        """The carrier's transfer takes after ``seconds``: the call ends ``referred`` and its sideband
        closes per ``mode``, unless it ended meanwhile (the caller hung up, a hangup verb…)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ended.wait(), seconds)
            return
        await self._end("referred", mode)

    async def _end(self, reason: str, mode: str = "clean") -> None:
        """End the call once: record the reason, stop the script, close the sideband(s) per ``mode``."""
        if self._ended.is_set():
            return
        self._stop_ringing()
        if reason == "rejected":
            self.status = "rejected"
        elif reason == "referred":
            self.status = "referred"
        else:
            self.status = "ended"
        self.end_reason = reason
        self._ended.set()
        current = asyncio.current_task()
        if not self._done.is_set():
            if self._runner is None:
                if self.script.steps:
                    self.script_error = f"the call ended ({reason}) before the script started"
                self._set_phase("finished")
                self._done.set()
            elif self._runner is not current:
                if not self._last_step_complete():
                    self.script_error = f"the call ended ({reason}) {self._describe_position()}"
                self._runner.cancel()
        for task in list(self._response_tasks):
            if task is not current:
                task.cancel()
        injected, self._injected = self._injected, {}
        for pending in injected.values():
            pending._settled.set()  # wait_output() raises: no output will come
        self._notify()
        await self._close_sockets(mode)

    def _last_step_complete(self) -> bool:
        """The last step got everything it waited for (its outputs) but the runner has not resumed yet,
        or its response, every call of which was answered, has yet to end."""
        steps = self.script.steps
        if self._step_index != len(steps) - 1:
            return False
        if self._phase == "await_outputs":
            return all(cid in self._answered_calls for cid in self._awaiting_ids)
        step = steps[-1]
        if self._phase != "emitting" or not isinstance(step, ModelCalls) or not step.waits_for_outputs:
            return False
        record = self.responses[-1] if self.responses else None
        return (
            record is not None
            and record.source == "script"
            and len(record.call_ids) == len(step.calls)
            and all(cid in self._answered_calls for cid in record.call_ids)
        )

    async def _close_sockets(self, mode: str) -> None:
        attachments = list(self._sockets)
        if mode == "unreachable":
            # The path to the controller dies without a word: nothing more is read from these sockets
            # (frames and pings written to them are lost), nothing more is sent on them.
            for attachment in attachments:
                if attachment.transport is not None:
                    attachment.transport.pause_reading()
                self._unreachable.append(attachment)
                self._detach(attachment)
            return
        for attachment in self._unreachable:  # the call ends: free what the lost path left behind
            if attachment.transport is not None:
                attachment.transport.abort()
        self._unreachable.clear()
        if mode == "silent" or not attachments:
            return
        if mode == "abnormal":
            for attachment in attachments:
                if attachment.transport is not None:
                    attachment.transport.abort()
            return
        code = 1001 if mode == "going_away" else 1000
        await asyncio.gather(*(self._close_one(a, code) for a in attachments), return_exceptions=True)

    @staticmethod
    async def _close_one(attachment: _Attachment, code: int) -> None:
        try:
            with contextlib.suppress(ConnectionError, RuntimeError, TimeoutError):
                await attachment.ws.close(code=code)
        finally:  # (a close that met the peer's EOF keeps it, after the socket's handler let go of it)
            _drop_tracebacks(attachment.ws.exception())

    def _attach(self, attachment: _Attachment) -> None:
        self._sockets.append(attachment)
        self._attached.set()
        if self._idle_task is None:
            self._arm_idle()
        self._notify()

    def _detach(self, attachment: _Attachment) -> None:
        with contextlib.suppress(ValueError):
            self._sockets.remove(attachment)
        if not self._sockets:
            self._attached.clear()
        self._notify()

    # ------------------------------------------------------------------------------------ client events

    async def _on_text(self, data: str) -> None:
        try:
            event = _strict_json(data)
        except ValueError as exc:
            self.bad_frames.append(data)
            if not self._ended.is_set():
                await self._error("invalid_json", f"Failed to parse client event: {exc}")
            return
        if not isinstance(event, dict):
            self.bad_frames.append(data)
            if not self._ended.is_set():
                await self._error("invalid_json", "A client event must be a JSON object.")
            return
        self.received.append(event)
        self.timeline.append(("received", event))
        self._first_event.set()
        self._notify()
        if self._ended.is_set():
            return  # the call is gone: nobody answers any more
        raw_id = event.get("event_id")
        event_id = raw_id if isinstance(raw_id, str) else None
        etype = event.get("type")
        if not isinstance(etype, str):
            await self._error(
                "missing_required_parameter",
                "Missing required parameter: 'type'.",
                param="type",
                event_id=event_id,
            )
            return
        match etype:
            case "session.update":
                await self._on_session_update(event, event_id)
            case "response.create":
                await self._on_response_create(event, event_id)
            case "response.cancel":
                await self._on_response_cancel(event, event_id)
            case "conversation.item.create":
                await self._on_item_create(event, event_id)
            case "conversation.item.retrieve" | "conversation.item.delete" | "conversation.item.truncate":
                await self._on_item_op(etype, event, event_id)
            case "output_audio_buffer.clear":
                cleared, self._audio_response = self._audio_response, None  # (no stopped for it now)
                if cleared is not None and self._playback_cut is not None:
                    self._playback_cut.set()
                # (a response not announced yet is not named: the client has never seen its id)
                named = self._active_response if self._active_response != self._unannounced else None
                await self._send("output_audio_buffer.cleared", response_id=cleared or named)
                if cleared is not None and self._active_response is None:
                    self._arm_idle()  # the model's audio ended here
            case "input_audio_buffer.append":
                pass  # media reaches the call by SIP/WebRTC; appended audio is ignored here
            case "input_audio_buffer.commit":
                if not self._input_buffer:
                    await self._error(
                        "input_audio_buffer_commit_empty",
                        "Error committing input audio buffer: buffer is empty.",
                        event_id=event_id,
                    )
                else:
                    await self._commit_buffer()
            case "input_audio_buffer.clear":
                self._input_buffer.clear()  # (what the caller said, unheard, is gone)
                await self._send("input_audio_buffer.cleared")
            case _:
                supported = ", ".join(f"'{t}'" for t in _CLIENT_EVENT_TYPES)
                await self._error(
                    "invalid_value",
                    f"Invalid value: '{etype}'. Supported values are: {supported}.",
                    param="type",
                    event_id=event_id,
                )

    async def _on_session_update(self, event: Mapping[str, Any], event_id: str | None) -> None:
        if self.first_session_update_ns is None:
            self.first_session_update_ns = time.monotonic_ns()
        update = event.get("session")
        if not isinstance(update, dict):
            await self._error(
                "missing_required_parameter",
                "Missing required parameter: 'session'.",
                param="session",
                event_id=event_id,
            )
            return
        if "type" not in update:
            await self._error(
                "missing_required_parameter",
                "Missing required parameter: 'session.type'.",
                param="session.type",
                event_id=event_id,
            )
            return
        problem = _check_session(
            update, "session.", sip=self.kind == "sip", accept=False
        ) or self._sim._check_model(update, "session.")
        if problem is not None:
            await self._error(problem.code, problem.message, param=problem.param, event_id=event_id)
            return
        assert self.session is not None
        model = update.get("model")
        if self._assistant_audio and model is not None and model != self.session.get("model"):
            await self._error(
                "cannot_update_model",
                "Cannot update a conversation's model if assistant audio is present.",
                param="session.model",
                event_id=event_id,
            )
            return
        voice = update.get("audio", {}).get("output", {}).get("voice")
        if (
            self._assistant_audio
            and voice is not None
            and voice != self.session["audio"]["output"].get("voice")
        ):
            await self._error(
                "cannot_update_voice",
                "Cannot update a conversation's voice if assistant audio is present.",
                param="session.audio.output.voice",
                event_id=event_id,
            )
            return
        before = self._idle_timeout()
        self.session = _merge_session(self.session, update)
        await self._send("session.updated", session=self.session)
        if self._idle_timeout() != before:
            self._arm_idle()

    def _response_busy(self) -> bool:
        return self._active_response is not None or self._pending_create is not None

    async def _on_response_create(self, event: dict[str, Any], event_id: str | None) -> None:
        overrides = event.get("response", {})
        if not isinstance(overrides, dict):
            await self._error(
                "invalid_type",
                "Invalid type for 'response': expected an object.",
                param="response",
                event_id=event_id,
            )
            return
        problem = _check_response(overrides)
        if problem is not None:
            await self._error(problem.code, problem.message, param=problem.param, event_id=event_id)
            return
        if self._response_busy():
            await self._refuse_busy(event_id)
            return
        self._pending_create = event
        self._pending_response_id = self._sim._new_id("resp_")  # (its response is under way from now)
        if self._script_claims_create():
            self._create_arrived.set()
        else:
            self._answer_unscripted()

    def _answer_unscripted(self) -> None:
        """Answer the pending ``response.create`` with :meth:`_auto_answer`, in a task of its own."""
        task = self._sim._spawn(self._auto_answer())
        self._response_tasks.add(task)
        task.add_done_callback(self._response_tasks.discard)

    async def _refuse_busy(self, event_id: str | None) -> None:
        """Refuse a ``response.create`` that met an active response (or another create)."""
        await self._error(
            "conversation_already_has_active_response",
            "Conversation already has an active response in progress: "
            f"{self._active_response or self._pending_response_id}. Wait until the response is finished "
            "before creating a new one.",
            event_id=event_id,
        )

    def _script_claims_create(self) -> bool:
        """Whether the script will answer a ``response.create`` arriving now (else it is auto-answered)."""
        if self._runner is None or self._done.is_set():
            return False
        steps = self.script.steps
        if self._step_index >= len(steps):
            return False
        step = steps[self._step_index]
        if self._phase in ("wait_ready", "wait_create") and _is_response_step(step):
            return True
        if self._phase == "await_outputs" and isinstance(step, ModelCalls):
            following = steps[self._step_index + 1] if self._step_index + 1 < len(steps) else None
            answered = all(cid in self._answered_calls for cid in self._awaiting_ids)
            return answered and following is not None and _is_response_step(following)
        return False

    async def _on_response_cancel(self, event: Mapping[str, Any], event_id: str | None) -> None:
        wanted = event.get("response_id")
        if not self._response_busy() or (wanted is not None and wanted != self._active_response):
            await self._error(
                "response_cancel_not_active",
                "Cancellation failed: no active response found.",
                event_id=event_id,
            )
            return
        self._cancel_reason = "client_cancelled"

    async def _on_item_create(self, event: Mapping[str, Any], event_id: str | None) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            await self._error(
                "missing_required_parameter",
                "Missing required parameter: 'item'.",
                param="item",
                event_id=event_id,
            )
            return
        if "previous_item_id" in event:
            problem = self._check_previous_item(event["previous_item_id"])
            if problem is not None:
                await self._error(problem.code, problem.message, param=problem.param, event_id=event_id)
                return
        raw_id = item.get("id")
        item_id = raw_id if isinstance(raw_id, str) and raw_id else self._sim._new_id("item_")
        itype = item.get("type")
        if itype == "function_call_output":
            received_ns = time.monotonic_ns() if self._injected else 0
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                await self._error(
                    "missing_required_parameter",
                    "Missing required parameter: 'item.call_id'.",
                    param="item.call_id",
                    event_id=event_id,
                )
                return
            if call_id not in self._function_calls:
                await self._error(
                    "invalid_value",
                    f"Tool call ID '{call_id}' not found in conversation.",
                    param="item.call_id",
                    event_id=event_id,
                )
                return
            output = item.get("output")
            if not isinstance(output, str):
                await self._error(
                    "invalid_type",
                    "Invalid type for 'item.output': expected a string.",
                    param="item.output",
                    event_id=event_id,
                )
                return
            self.function_outputs.append((call_id, output))
            self._answered_calls.add(call_id)
            injected = self._injected.pop(call_id, None)
            if injected is not None:
                injected.output, injected.output_ns = output, received_ns
                injected._settled.set()
            new: dict[str, Any] = {
                "id": item_id,
                "type": "function_call_output",
                "call_id": call_id,
                "output": output,
            }
            self._items[item_id] = new
            previous = self._function_calls[call_id]
            self._last_item_id = item_id
            if self._active_response is not None:
                self._deferred.append((previous, new))  # acknowledged after the current response.done
            else:
                await self._ack_item(previous, new)
            self._outputs_changed.set()
            return
        if itype == "message":
            role = item.get("role")
            allowed = _MESSAGE_CONTENT_TYPES.get(role) if isinstance(role, str) else None
            if allowed is None:
                await self._error(
                    "invalid_value",
                    f"Invalid value: {role!r}. Supported values are: 'user', 'assistant', and 'system'.",
                    param="item.role",
                    event_id=event_id,
                )
                return
            content = item.get("content")
            if not isinstance(content, list):
                await self._error(
                    "missing_required_parameter",
                    "Missing required parameter: 'item.content'.",
                    param="item.content",
                    event_id=event_id,
                )
                return
            for index, part in enumerate(content):
                ptype = part.get("type") if isinstance(part, dict) else None
                if ptype not in allowed:
                    await self._error(
                        "invalid_value",
                        f"Invalid value: {ptype!r}. Supported values are: {', '.join(sorted(allowed))}.",
                        param=f"item.content[{index}].type",
                        event_id=event_id,
                    )
                    return
                problem = _check_text_part(part, f"item.content[{index}]")
                if problem is not None:
                    await self._error(problem.code, problem.message, param=problem.param, event_id=event_id)
                    return
            new = {
                "id": item_id,
                "type": "message",
                "status": "completed",
                "role": role,
                "content": copy.deepcopy(content),
            }
        elif itype == "function_call":
            name, call_id, arguments = item.get("name"), item.get("call_id"), item.get("arguments", "")
            if not isinstance(name, str) or not isinstance(call_id, str) or not isinstance(arguments, str):
                await self._error(
                    "missing_required_parameter",
                    "A function_call item needs 'name', 'call_id' and string 'arguments'.",
                    param="item",
                    event_id=event_id,
                )
                return
            new = {
                "id": item_id,
                "type": "function_call",
                "status": "completed",
                "name": name,
                "call_id": call_id,
                "arguments": arguments,
            }
            self._function_calls[call_id] = item_id
        else:
            await self._error(
                "invalid_value",
                f"Invalid value: {itype!r}. Supported values are: 'message', "
                "'function_call', and 'function_call_output'.",
                param="item.type",
                event_id=event_id,
            )
            return
        # No previous_item_id: the item goes last; "root": first (nothing before it); else after that one.
        asked = event.get("previous_item_id")
        after: str | None = self._last_item_id if asked is None else None if asked == "root" else asked
        self._items[item_id] = new
        if asked is None or asked == self._last_item_id or self._last_item_id is None:
            self._last_item_id = item_id
        if after is None:
            self._first_item_id = item_id
        await self._ack_item(after, new)

    def _check_previous_item(self, previous: Any) -> _Problem | None:
        """What the service refuses in ``conversation.item.create``'s ``previous_item_id``: an item the
        conversation does not have (``"root"`` is the start; ``null`` the end)."""
        if previous is None or previous == "root":
            return None
        if not isinstance(previous, str):
            return _Problem(
                "previous_item_id", "invalid_type", "Invalid type for 'previous_item_id': expected a string."
            )
        # (an item of the model's still streaming is known too: the last one, or a function call's)
        if (
            previous in self._items
            or previous == self._last_item_id
            or previous in self._function_calls.values()
        ):
            return None
        return _Problem(
            "previous_item_id",
            "invalid_value",
            f"Invalid value for 'previous_item_id': no item with id '{previous}' in the conversation.",
        )

    async def _ack_item(self, previous: str | None, item: dict[str, Any]) -> None:
        await self._send("conversation.item.added", previous_item_id=previous, item=item)
        await self._send("conversation.item.done", previous_item_id=previous, item=item)

    async def _on_item_op(self, etype: str, event: Mapping[str, Any], event_id: str | None) -> None:
        item_id = event.get("item_id")
        if not isinstance(item_id, str) or item_id not in self._items:
            await self._error(
                "item_not_found",
                f"Item with item_id not found: {item_id}",
                param="item_id",
                event_id=event_id,
            )
            return
        if etype == "conversation.item.retrieve":
            await self._send("conversation.item.retrieved", item=self._items[item_id])
        elif etype == "conversation.item.delete":
            del self._items[item_id]
            await self._send("conversation.item.deleted", item_id=item_id)
        else:
            await self._send(
                "conversation.item.truncated",
                item_id=item_id,
                content_index=event.get("content_index", 0),
                audio_end_ms=event.get("audio_end_ms", 0),
            )

    # ------------------------------------------------------------------------------------ responses

    def _take_pending_create(self) -> tuple[dict[str, Any], str] | None:
        """The pending ``response.create`` and the id its response takes (``None`` if none is pending)."""
        create, self._pending_create = self._pending_create, None
        response_id, self._pending_response_id = self._pending_response_id, None
        self._create_arrived.clear()
        if create is None or response_id is None:
            return None
        return create, response_id

    async def _auto_answer(self) -> None:
        async with self._response_lock:
            if self._ended.is_set():
                return
            taken = self._take_pending_create()
            if taken is None:
                return  # the script answered it meanwhile
            create, response_id = taken
            await self._emit_response(
                text=self._sim.auto_answer_text,
                calls=(),
                status="completed",
                create=create,
                trigger="response.create",
                source="auto",
                response_id=response_id,
            )

    def _response_object(
        self,
        response_id: str,
        status: str,
        output: list[dict[str, Any]],
        modalities: list[str],
        *,
        details: dict[str, Any] | None = None,
        usage: dict[str, Any] | None = None,
        overrides: dict[str, Any],
    ) -> dict[str, Any]:
        """The ``response`` object of ``response.created`` / ``response.done``: the session's settings,
        with the ``response.create``'s own (``overrides``: voice, ``max_output_tokens``) in their place."""
        assert self.session is not None
        out_audio = self.session["audio"]["output"]
        voice = (overrides.get("audio") or {}).get("output", {}).get("voice", out_audio.get("voice"))
        return {
            "object": "realtime.response",
            "id": response_id,
            "status": status,
            "status_details": details,
            "output": output,
            "conversation_id": self._conversation_id,
            "output_modalities": list(modalities),
            "max_output_tokens": overrides.get(
                "max_output_tokens", self.session.get("max_output_tokens", "inf")
            ),
            "audio": {"output": {"format": dict(out_audio["format"]), "voice": voice}},
            "usage": usage,
            "metadata": overrides.get("metadata"),
        }

    async def _emit_response(
        self,
        *,
        text: str | None,
        calls: tuple[FunctionCallSpec, ...],
        status: str,
        create: dict[str, Any] | None,
        trigger: Literal["response.create", "vad", "idle", "spontaneous"],
        source: Literal["script", "auto", "injected"],
        injected: InjectedCall | None = None,
        crossed: dict[str, Any] | None = None,
        response_id: str | None = None,
    ) -> ResponseRecord:
        """Stream one response. The caller holds the response lock. Returns its record (final status).

        ``injected``: the record of the call among ``calls`` whose ``arguments.done`` is timestamped.
        ``crossed``: a ``response.create`` that arrived as this response began, refused once it is
        announced. ``response_id``: the id set aside for it (a refusal may have named it), else a new one.

        On a reasoning model (:data:`_REASONING_MODELS`) its message carries a ``phase``: ``"final_answer"``
        (as recorded), or ``"commentary"`` for words before calls of the same response (the preamble)."""
        assert self.session is not None
        reasoning = _reasons(self.session.get("model"))
        overrides: dict[str, Any] = dict(create.get("response") or {}) if create is not None else {}
        modalities = overrides.get("output_modalities") or self.session["output_modalities"]
        audio = "audio" in modalities
        send = self._send
        new_id = self._sim._new_id
        response_id = response_id or new_id("resp_")
        record = ResponseRecord(response_id, trigger, source, overrides if create is not None else None)
        self.responses.append(record)
        self._active_response = response_id
        self._unannounced = None  # (its response.created goes out next)
        self._disarm_idle()  # (the server's idle timer counts from the end of the model's audio)
        self._response_count += 1
        self._notify()
        buffer_started = False
        audio_started = 0.0
        interrupted = False
        created = time.monotonic()
        try:
            await send(
                "response.created",
                response=self._response_object(
                    response_id, "in_progress", [], modalities, overrides=overrides
                ),
            )
            if crossed is not None:
                crossed_id = crossed.get("event_id")
                await self._refuse_busy(crossed_id if isinstance(crossed_id, str) else None)
            await self._trickle_transcript()  # (the caller's transcript still streams, as recorded)
            outputs: list[dict[str, Any]] = []
            spoken = ""
            message_id: str | None = None
            call_states: list[tuple[FunctionCallSpec, str, str, int]] = []

            async def announce_calls() -> None:
                base = 0 if message_id is None else 1
                for offset, spec in enumerate(calls):
                    if self._cancel_reason is not None:
                        return
                    item_id = new_id("item_")
                    call_id = spec.call_id or "call_" + secrets.token_hex(8)
                    previous = self._last_item_id
                    self._last_item_id = item_id
                    if previous is None:
                        self._first_item_id = item_id
                    self._function_calls[call_id] = item_id
                    record.call_ids.append(call_id)
                    index = base + offset
                    call_states.append((spec, item_id, call_id, index))
                    added = {
                        "id": item_id,
                        "type": "function_call",
                        "status": "in_progress",
                        "name": spec.name,
                        "call_id": call_id,
                        "arguments": "",
                    }
                    await send(
                        "response.output_item.added", response_id=response_id, output_index=index, item=added
                    )
                    await send("conversation.item.added", previous_item_id=previous, item=dict(added))
                    await self._flush_transcript()

            if text is not None:
                message_id = new_id("item_")
                previous = self._last_item_id
                self._last_item_id = message_id
                if previous is None:
                    self._first_item_id = message_id
                started: dict[str, Any] = {
                    "id": message_id,
                    "type": "message",
                    "status": "in_progress",
                    "role": "assistant",
                    "content": [],
                }
                if reasoning:
                    started["phase"] = "commentary" if calls else "final_answer"
                await send(
                    "response.output_item.added", response_id=response_id, output_index=0, item=started
                )
                await send(
                    "conversation.item.added", previous_item_id=previous, item={**started, "content": []}
                )
                await self._trickle_transcript()
                where = {
                    "response_id": response_id,
                    "item_id": message_id,
                    "output_index": 0,
                    "content_index": 0,
                }
                part_type, key = ("audio", "transcript") if audio else ("text", "text")
                await send("response.content_part.added", **where, part={"type": part_type, key: ""})
                if audio and self._cancel_reason is None:  # (cancelled before it began: nothing plays)
                    await self._stop_playback()  # (one voice at a time: what still played is over)
                    await send("output_audio_buffer.started", response_id=response_id)
                    buffer_started, audio_started = True, time.monotonic()
                    self._audio_response = response_id
                    self._assistant_audio = True
                delta_type = (
                    "response.output_audio_transcript.delta" if audio else "response.output_text.delta"
                )
                for number, chunk in enumerate(_chunks(text)):
                    if self._cancel_reason is not None:
                        break
                    spoken += chunk
                    await send(delta_type, **where, delta=chunk, obfuscation=secrets.token_hex(4))
                    if number == 0 and calls:
                        await announce_calls()  # a call may be announced while the preamble streams
                    if not await self._trickle_transcript():
                        await self._flush_transcript()  # (completed amid the model's words)
                if calls and not call_states:
                    await announce_calls()
                await self._flush_transcript()
                item_status = "incomplete" if self._cancel_reason is not None else "completed"
                if audio:
                    await send("response.output_audio.done", **where)
                    await send("response.output_audio_transcript.done", **where, transcript=spoken)
                    content = {"type": "output_audio", "transcript": spoken}
                else:
                    await send("response.output_text.done", **where, text=spoken)
                    content = {"type": "output_text", "text": spoken}
                await send("response.content_part.done", **where, part={"type": part_type, key: spoken})
                done_item = {
                    "id": message_id,
                    "type": "message",
                    "status": item_status,
                    "role": "assistant",
                    "content": [content],
                }
                if reasoning:
                    done_item["phase"] = started["phase"]
                self._items[message_id] = done_item
                # (as recorded: the item.done of an answer to the conversation's first item names no
                # predecessor, unlike its .added; one to any later item names it)
                done_previous = None if previous == self._first_item_id else previous
                await send("conversation.item.done", previous_item_id=done_previous, item=done_item)
                await send(
                    "response.output_item.done", response_id=response_id, output_index=0, item=done_item
                )
                outputs.append(done_item)
                record.text = spoken
                if spoken:
                    self.transcript.append(("model", spoken))
            elif calls:
                await announce_calls()

            final_status = status if self._cancel_reason is None else "cancelled"
            # A response cut short (incomplete) after a call's arguments were written whole completes
            # that call's item (it runs); one cut inside them (spec.cut) leaves it incomplete.
            whole = final_status in ("completed", "incomplete")
            for spec, item_id, call_id, index in call_states:
                call_item_status = "completed" if whole and not spec.cut else "incomplete"
                arguments = spec.arguments[: len(spec.arguments) // 2] if spec.cut else spec.arguments
                where = {
                    "response_id": response_id,
                    "item_id": item_id,
                    "output_index": index,
                    "call_id": call_id,
                }
                if self._cancel_reason is None:
                    for chunk in _arg_chunks(arguments):
                        await send(
                            "response.function_call_arguments.delta",
                            **where,
                            delta=chunk,
                            obfuscation=secrets.token_hex(4),
                        )
                stamp = time.monotonic_ns() if injected is not None and injected.call_id == call_id else None
                delivered = await send(
                    "response.function_call_arguments.done", **where, name=spec.name, arguments=arguments
                )
                if stamp is not None and delivered and injected is not None:
                    injected.arguments_done_ns = stamp
                done_call = {
                    "id": item_id,
                    "type": "function_call",
                    "status": call_item_status,
                    "name": spec.name,
                    "call_id": call_id,
                    "arguments": arguments,
                }
                self._items[item_id] = done_call
                # (the real service sends a model call's item.done with no predecessor, unlike its .added)
                await send("conversation.item.done", previous_item_id=None, item=done_call)
                await send(
                    "response.output_item.done", response_id=response_id, output_index=index, item=done_call
                )
                outputs.append(done_call)
            details: dict[str, Any] | None = None
            interrupted = self._cancel_reason == "turn_detected"
            if self._cancel_reason is not None:
                details = {"type": "cancelled", "reason": self._cancel_reason}
            elif status == "cancelled":
                details = {"type": "cancelled", "reason": "turn_detected"}
            elif status == "incomplete":
                details = {"type": "incomplete", "reason": "max_output_tokens"}
            elif status == "failed":
                details = {
                    "type": "failed",
                    "error": {
                        "type": "server_error",
                        "code": None,
                        "message": "The server had an error while processing your request.",
                    },
                }
            out_tokens = 5 + len(spoken) // 4 + sum(len(s.arguments) // 4 for s in calls)
            record.status = final_status
            # Over once response.done is out: a response.create the client sends on reading it is fine
            # (and one sent before it, while the response is held active, is still refused).
            await self._flush_transcript()  # (a response of neither words nor calls)
            await self._hold_active(created)
            if self._cancel_reason is not None and final_status != "cancelled":  # cancelled while held
                final_status = record.status = "cancelled"
                details = {"type": "cancelled", "reason": self._cancel_reason}
            self._active_response = None
            await self._send_now(
                "response.done",
                response=self._response_object(
                    response_id,
                    final_status,
                    outputs,
                    modalities,
                    details=details,
                    usage=_usage(
                        40 + 10 * self._response_count, out_tokens, audio=audio, reasoning=reasoning
                    ),
                    overrides=overrides,
                ),
            )
        finally:
            self._active_response = None
            self._cancel_reason = None
            self._notify()
        deferred, self._deferred = self._deferred, []
        for previous_id, item in deferred:
            await self._ack_item(previous_id, item)
        if buffer_started and self._audio_response == response_id:  # (not cleared by the controller)
            if interrupted:  # the caller cut in: the rest of the model's audio is dropped
                self._audio_response = None
                await send("output_audio_buffer.cleared", response_id=response_id)
            elif self._sim.playback_rate:  # heard after the response, which is over: not under its lock
                remaining = audio_started + len(spoken) / self._sim.playback_rate - time.monotonic()
                cut = self._playback_cut = asyncio.Event()  # (before the task runs: it can be cut at once)
                self._playback = task = self._sim._spawn(self._play_out(response_id, remaining, cut))
                self._response_tasks.add(task)
                task.add_done_callback(self._response_tasks.discard)
            else:
                await self._play_out(response_id, 0.0, None)
        if self._audio_response is None and self._phase != "caller_speaking" and not self._vad_turn:
            self._arm_idle()  # nothing plays on: the idle timer counts from the response's end
        if self._response_count % 2 == 1:  # irregular on purpose: never rely on it
            await self._send_now(  # right after: the response's step is over once this is out
                "rate_limits.updated",
                rate_limits=[
                    {
                        "name": "tokens",
                        "limit": 15000000,
                        "remaining": 14999000 - 100 * self._response_count,
                        "reset_seconds": 0.001,
                    }
                ],
            )
        return record

    async def _hold_active(self, created: float) -> None:
        """Keep the response active a moment before its ``response.done``: the real service streams a
        response over tens of milliseconds or more, so what a client sends on reading its events (an early
        ``response.create``, a ``response.cancel``) reaches the service while the response is active.
        Held for ``event_gap`` (if set), a few turns of the event loop (a client in this process reacts
        within them) and until ``min_response_time`` has passed since ``response.created`` (one in
        another process); client events arriving meanwhile are read and judged."""
        if self._sim.min_response_time is None:
            return
        if self._sim.event_gap:
            await asyncio.sleep(self._sim.event_gap)
        for _ in range(_HOLD_TURNS):
            await asyncio.sleep(0)
        remaining = created + self._sim.min_response_time - time.monotonic()
        if remaining > 0:
            await asyncio.sleep(remaining)

    # ------------------------------------------------------------------------------------ the script

    async def _play_out(self, response_id: str, remaining: float, cut: asyncio.Event | None) -> None:
        """The caller hears the rest of the response's audio (``remaining`` seconds; with a
        ``playback_rate`` this runs after the response, on its own), then ``output_audio_buffer.stopped``.
        Cut short by a newer response's audio (stopped at once), or by the controller's clear (its
        ``cleared`` is out: nothing more)."""
        if cut is not None:
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await cut.wait()
            finally:
                if self._playback_cut is cut:
                    self._playback_cut = None
        if self._audio_response == response_id:
            self._audio_response = None
            await self._send("output_audio_buffer.stopped", response_id=response_id)
            if self._active_response is None:
                self._arm_idle()

    def _idle_timeout(self) -> int | None:
        """The session's server VAD ``idle_timeout_ms`` (None: not set, or not server VAD)."""
        turn = (self.session or {}).get("audio", {}).get("input", {}).get("turn_detection")
        if not isinstance(turn, dict) or turn.get("type") != "server_vad":
            return None
        value = turn.get("idle_timeout_ms")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def _arm_idle(self) -> None:
        """The server's idle timer starts (again): the caller is silent from now on, until they speak or
        the model does."""
        self._disarm_idle()
        timeout = self._idle_timeout()
        if timeout is None or self._ended.is_set() or self.session is None or self._sim._closed:
            return
        self._idle_task = task = self._sim._spawn(self._idle_prompt(timeout))
        self._response_tasks.add(task)
        task.add_done_callback(self._response_tasks.discard)

    def _disarm_idle(self) -> None:
        task, self._idle_task = self._idle_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _idle_prompt(self, timeout_ms: int) -> None:
        """``idle_timeout_ms`` of silence: the server commits the silent audio as an empty user item and
        answers it (``input_audio_buffer.timeout_triggered``, then a response of its own: a prompt to go
        on, :attr:`Simulator.idle_prompt_text`). The timer starts again once that prompt has played."""
        await asyncio.sleep(timeout_ms / 1000)
        async with self._response_lock:
            if self._idle_task is not asyncio.current_task():
                return  # disarmed meanwhile
            self._idle_task = None
            if (
                self._ended.is_set()
                or self._response_busy()
                or self._audio_response is not None
                or self._phase == "caller_speaking"
                or self._vad_turn
            ):
                return  # someone speaks, or is about to: the silence is over
            assert self.session is not None
            await self._flush_transcript()
            # Under way from here (the caller speaking now cuts the prompt off), announced a little later.
            response_id = self._active_response = self._unannounced = self._sim._new_id("resp_")
            try:
                item_id = self._sim._new_id("item_")
                start = self._audio_ms
                self._audio_ms = end = start + timeout_ms
                await self._send(
                    "input_audio_buffer.timeout_triggered",
                    audio_start_ms=start,
                    audio_end_ms=end,
                    item_id=item_id,
                )
                await self._commit_audio(item_id, "")
                if _transcribes(self.session):  # (nothing was said: an empty transcript, mid-answer)
                    self._pending_transcript = {
                        "item_id": item_id,
                        "content_index": 0,
                        "transcript": "",
                        "usage": _transcript_usage(self.session, max(1, timeout_ms // 1000), ""),
                    }
                await self._emit_response(
                    text=self._sim.idle_prompt_text,
                    calls=(),
                    status="completed",
                    create=None,
                    trigger="idle",
                    source="auto",
                    response_id=response_id,
                )
            finally:
                if self._unannounced == response_id:  # (cut short before its response began)
                    self._active_response = self._unannounced = None

    async def _commit_audio(self, item_id: str, text: str) -> None:
        """The caller's audio (``text`` was said in it) becomes user item ``item_id``: committed, added,
        done (its transcript is not in it: that comes on its own, if the session transcribes)."""
        previous, self._last_item_id = self._last_item_id, item_id
        if previous is None:
            self._first_item_id = item_id
        await self._send("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        item = {
            "id": item_id,
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        await self._send("conversation.item.added", previous_item_id=previous, item=item)
        await self._send("conversation.item.done", previous_item_id=previous, item=item)
        self._items[item_id] = {**item, "content": [{"type": "input_audio", "transcript": text}]}

    async def _stop_playback(self) -> None:
        """Let the audio still playing end now (its stopped goes out), before anything else is heard."""
        task = self._playback
        if task is not None and not task.done():
            if self._playback_cut is not None:
                self._playback_cut.set()
            await asyncio.wait({task})
        self._playback = None

    async def _hear_out(self) -> None:
        """A caller waits for the model to finish speaking before saying something."""
        task = self._playback
        if task is not None and not task.done():
            await asyncio.wait({task})

    async def _run_script(self) -> None:
        script = self.script
        try:
            for index, step in enumerate(script.steps):
                if self._ended.is_set():
                    self.script_error = f"the call ended ({self.end_reason}) {self._describe_position()}"
                    return
                self._step_index = index
                self._set_phase("wait_ready")
                await self._run_step(step, script.step_timeout)
            self._step_index = len(script.steps)
            await self._flush_transcript()
            self._set_phase("finished")
            if script.hang_up_at_end and not self._ended.is_set():
                await self._end("script_done", "clean")
        except _StepFailed as exc:
            self.script_error = f"step {self._step_index} {script.steps[self._step_index].describe()}: {exc}"
        except Exception as exc:  # a step that crashed: the script failed (never a silent success)
            self.internal_errors.append(traceback.format_exc())
            self.script_error = f"{self._describe_position()}: {type(exc).__name__}: {exc}"
        finally:
            self._set_phase("finished")
            self._done.set()
            if self._pending_create is not None and not self._ended.is_set():
                self._answer_unscripted()  # (a create the failed step was to answer: the model answers it)
            self._notify()

    async def _flush_transcript(self) -> None:
        """Send the caller's transcript still owed, its last deltas then ``completed`` (it completes while
        the model answers, or before the caller's next move)."""
        while await self._trickle_transcript():
            pass
        pending, self._pending_transcript = self._pending_transcript, None
        if pending is not None:
            await self._send("conversation.item.input_audio_transcription.completed", **pending)

    async def _trickle_transcript(self) -> bool:
        """Send the next delta of the caller's transcript still owed; False if none was."""
        if not self._pending_deltas:
            return False
        fields = self._pending_deltas.popleft()
        await self._send("conversation.item.input_audio_transcription.delta", **fields)
        return True

    async def _run_step(self, step: Step, limit: float) -> None:
        if not isinstance(step, WaitForGreeting | ModelSays | ModelCalls):
            await self._flush_transcript()
        match step:
            case WaitForGreeting(text=text):
                await self._response_step(text, (), "completed", must_wait=True, limit=limit)
            case ModelSays(text=text, failed=True):
                record = await self._response_step(
                    None, (), "failed", must_wait=self._next_needs_create, limit=limit
                )
                self._next_needs_create = record is not None  # (the model is silent until asked)
            case ModelSays(text=text, first=True):
                await self._response_step(text, (), "completed", must_wait=True, limit=limit, first=True)
            case ModelSays(text=text, asked=asked):
                await self._response_step(
                    text, (), "completed", must_wait=self._next_needs_create or asked, limit=limit
                )
            case ModelCalls():
                await self._model_calls(step, limit)
            case CallerSays(text=text, seconds=seconds, cut_in=cut_in, untranscribed=untranscribed):
                await self._caller_says(
                    text, limit, seconds=seconds, cut_in=cut_in, untranscribed=untranscribed
                )
            case CallerPresses(digits=digits):
                if self.kind != "sip":  # (the keypad reaches a sideband over SIP only)
                    raise _StepFailed(
                        "a WebRTC call has no keypad: input_audio_buffer.dtmf_event_received comes on SIP "
                        "calls only"
                    )
                await self._wait_ready(limit)
                self._set_phase("emitting")
                for digit in digits:
                    await self._send(
                        "input_audio_buffer.dtmf_event_received", event=digit, received_at=int(time.time())
                    )
            case Pause(seconds=seconds):
                self._set_phase("pause")
                await asyncio.sleep(seconds)
            case CallerHangsUp(mode=mode):
                # The caller hangs up on an attached sideband; with none after the step timeout, anyway.
                with contextlib.suppress(_StepTimeout):
                    await self._wait_ready(limit)
                self._set_phase("hanging_up")
                await self._caller_hangs_up(mode)

    async def _wait_ready(self, limit: float) -> None:
        if not self._attached.is_set():
            try:
                async with asyncio.timeout(limit):
                    await self._attached.wait()
            except TimeoutError:
                raise _StepTimeout(f"no sideband was attached within {limit}s") from None
        if not self._grace_done:
            # Give the controller a moment for its first session.update before the caller acts.
            self._grace_done = True
            if not self._first_event.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(self._sim.ready_grace, limit)):
                        await self._first_event.wait()

    async def _response_step(
        self,
        text: str | None,
        calls: tuple[FunctionCallSpec, ...],
        status: str,
        *,
        must_wait: bool,
        limit: float,
        first: bool = False,
        undeclared: bool = False,
    ) -> ResponseRecord | None:
        """One scripted response: the answer to the controller's pending create, else the server's own;
        with ``first``, the server's own, started as that create arrives (which it then refuses). Its
        ``calls`` must be to tools in effect for it, unless ``undeclared`` (else the step fails, the
        create left to the auto-answer)."""
        self._set_phase("wait_ready")
        await self._wait_ready(limit)
        if must_wait and self._pending_create is None:
            self._set_phase("wait_create")
            try:
                async with asyncio.timeout(limit):
                    await self._create_arrived.wait()
            except TimeoutError:
                raise _StepTimeout(f"the controller sent no response.create within {limit}s") from None
        async with self._response_lock:
            if self._ended.is_set():
                return None
            assert self.session is not None
            answering = None if first else self._pending_create
            refused = None if undeclared else _refused_calls(calls, self.session, answering, status)
            if refused is not None:
                raise _StepFailed(refused)
            taken = self._take_pending_create()
            create, response_id = taken if taken is not None else (None, None)
            # (crossed: the server's own response, under way as the create came, takes the create's id)
            crossed, create = (create, None) if first else (None, create)
            if create is not None:
                trigger: Literal["response.create", "vad", "spontaneous"] = "response.create"
            else:
                trigger = "vad" if self._vad_turn or first else "spontaneous"
            self._set_phase("emitting")
            self._next_needs_create = False
            self._vad_turn = False
            return await self._emit_response(
                text=text,
                calls=calls,
                status=status,
                create=create,
                trigger=trigger,
                source="script",
                crossed=crossed,
                response_id=response_id,
            )

    async def _model_calls(self, step: ModelCalls, limit: float) -> None:
        record = await self._response_step(
            step.preamble,
            step.calls,
            step.status,
            must_wait=self._next_needs_create,
            limit=limit,
            undeclared=step.undeclared,
        )
        if record is None or not step.waits_for_outputs or record.status in ("cancelled", "failed"):
            # (with calls left to answer, the model speaks again only when asked)
            self._next_needs_create = (
                record is not None
                and not step.await_outputs
                and record.status not in ("cancelled", "failed")
                and bool(record.call_ids)
            )
            return
        call_ids = list(record.call_ids)
        self._awaiting_ids = call_ids
        self._set_phase("await_outputs")
        names = dict(zip(call_ids, (c.name for c in step.calls), strict=False))
        try:
            async with asyncio.timeout(limit):
                while True:
                    missing = [cid for cid in call_ids if cid not in self._answered_calls]
                    if not missing:
                        break
                    self._outputs_changed.clear()
                    await self._outputs_changed.wait()
        except TimeoutError:
            missing = [f"{cid} ({names.get(cid)})" for cid in call_ids if cid not in self._answered_calls]
            raise _StepTimeout(f"no function_call_output for {', '.join(missing)} within {limit}s") from None
        self._next_needs_create = True

    async def _caller_says(
        self,
        text: str,
        limit: float,
        *,
        seconds: float | None = None,
        cut_in: bool = False,
        untranscribed: bool = False,
    ) -> None:
        await self._wait_ready(limit)
        if not cut_in:
            await self._hear_out()
        self._set_phase("emitting")
        assert self.session is not None
        item_id = self._sim._new_id("item_")
        start = self._audio_ms + 400
        end = start + (300 + 60 * len(text) if seconds is None else int(seconds * 1000))
        self._audio_ms = end + 200
        turn = self.session["audio"]["input"].get("turn_detection")
        if not isinstance(turn, dict):
            await self._caller_unheard(text, seconds, (end - start) // 1000, untranscribed)
            return
        self._disarm_idle()
        await self._send("input_audio_buffer.speech_started", audio_start_ms=start, item_id=item_id)
        interrupts = turn.get("interrupt_response", True)
        if self._active_response is not None and interrupts:
            self._cancel_reason = "turn_detected"  # barge-in: the server cuts the model off
        elif self._audio_response is not None and interrupts:
            # The response is over but its audio still plays: the server drops the rest of it.
            cleared, self._audio_response = self._audio_response, None
            if self._playback_cut is not None:
                self._playback_cut.set()
            await self._send("output_audio_buffer.cleared", response_id=cleared)
        transcribes = _transcribes(self.session)
        if transcribes and not untranscribed:
            # Transcribed as it is spoken, and behind: the first deltas come before the caller's item
            # exists, the rest after it (once a response is on its way, amid the model's answer).
            deltas = [
                {
                    "item_id": item_id,
                    "content_index": 0,
                    "delta": chunk,
                    "obfuscation": secrets.token_hex(4),
                }
                for chunk in _chunks(text, 4)
            ]
            heard = len(deltas) // 2
            for fields in deltas[:heard]:
                await self._send("conversation.item.input_audio_transcription.delta", **fields)
            self._pending_deltas.extend(deltas[heard:])
        if seconds:
            self._set_phase("caller_speaking")
            await asyncio.sleep(seconds)  # (what the controller sends meanwhile is served as it comes)
            if self._ended.is_set():
                return
            self._set_phase("emitting")
        await self._send("input_audio_buffer.speech_stopped", audio_end_ms=end, item_id=item_id)
        if self._active_response is None and not _creates_response(self.session):
            self._arm_idle()  # (else the server's answer comes, and the timer counts from its end)
        await self._commit_audio(item_id, text)
        self.transcript.append(("caller", text))
        creates = _creates_response(self.session)
        if transcribes and untranscribed:
            await self._send(
                "conversation.item.input_audio_transcription.failed",
                item_id=item_id,
                content_index=0,
                error=self._transcription_error(),
            )
        elif transcribes:
            completed = {
                "item_id": item_id,
                "content_index": 0,
                "transcript": text,
                "usage": _transcript_usage(self.session, max(1, (end - start) // 1000), text),
            }
            # With a response on its way (server VAD), the transcript completes while the model answers.
            self._pending_transcript = completed
            if not creates:
                await self._flush_transcript()
        self._next_needs_create = not creates
        self._vad_turn = creates

    async def _caller_unheard(
        self, text: str, seconds: float | None, whole_seconds: int, untranscribed: bool
    ) -> None:
        """The caller speaks while the session has no turn detection: nobody listens for speech, so the
        server sends nothing (no ``speech_started`` / ``stopped``, no commit, no item, no barge-in). The
        audio waits in the input buffer for the controller's ``input_audio_buffer.commit``."""
        if seconds:
            self._set_phase("caller_speaking")
            await asyncio.sleep(seconds)
            if self._ended.is_set():
                return
            self._set_phase("emitting")
        self._input_buffer.append((text, max(1, whole_seconds), untranscribed))
        self._next_needs_create = True  # (the model answers when asked)
        self._vad_turn = False

    async def _commit_buffer(self) -> None:
        """The controller commits the input buffer: what the caller said in it becomes one user item
        (``input_audio_buffer.committed``, the item), transcribed at once if the session transcribes."""
        assert self.session is not None
        said, self._input_buffer = self._input_buffer, []
        text = " ".join(t for t, _, _ in said)
        item_id = self._sim._new_id("item_")
        await self._commit_audio(item_id, text)
        self.transcript.append(("caller", text))
        if not _transcribes(self.session):
            return
        if any(untranscribed for _, _, untranscribed in said):
            await self._send(
                "conversation.item.input_audio_transcription.failed",
                item_id=item_id,
                content_index=0,
                error=self._transcription_error(),
            )
            return
        for chunk in _chunks(text, 4):
            await self._send(
                "conversation.item.input_audio_transcription.delta",
                item_id=item_id,
                content_index=0,
                delta=chunk,
                obfuscation=secrets.token_hex(4),
            )
        seconds = sum(s for _, s, _ in said)
        await self._send(
            "conversation.item.input_audio_transcription.completed",
            item_id=item_id,
            content_index=0,
            transcript=text,
            usage=_transcript_usage(self.session, seconds, text),
        )

    def _transcription_error(self) -> dict[str, Any]:
        """The error of a transcription that failed (the project may not use the model)."""
        assert self.session is not None
        model = self.session["audio"]["input"]["transcription"].get("model")
        return {
            "type": "invalid_request_error",
            "code": "model_not_found",
            "message": f"The model `{model}` does not exist or you do not have access to it.",
            "param": None,
        }

    async def _caller_hangs_up(self, mode: HangupMode) -> None:
        await self._end("caller_hangup", mode)


_ACCEPTING = web.RequestKey("sideband_simulator_accepting", SimCall)
"""Per-request storage: the ringing call an accept request is for, until the accept is decided."""


def _check_script(script: object) -> None:
    """:class:`TypeError` unless ``script`` is a :class:`Script` or ``None`` (a list of steps, say)."""
    if script is not None and not isinstance(script, Script):
        raise TypeError(f"a call plays a Script, not {type(script).__name__}: wrap the steps, Script([...])")


class Simulator:
    """An in-process OpenAI Realtime (SIP/WebRTC) service on a loopback port.

    ``async with Simulator() as sim:`` starts it and closes it (every task cancelled and awaited, every
    socket closed). ``sim.base_url`` is the REST base (``http://127.0.0.1:PORT/v1``); the sideband lives at
    ``ws://127.0.0.1:PORT/v1/realtime?call_id=…``.

    ``auto_answer_text`` is what the model says to a ``response.create`` no script step answers;
    ``idle_prompt_text`` what it says, unasked, when the session's server VAD has an ``idle_timeout_ms`` and
    the caller stays silent that long after the model's audio ended (``input_audio_buffer.timeout_triggered``
    first, and an empty user item; again after each prompt, for as long as the silence lasts);
    ``ready_grace`` is how long a script waits, after the first attach, for the controller's first event
    before the caller acts.

    ``ws_compression=True`` serves the sideband with permessage-deflate when the client offers it (by default
    the simulator declines the extension). ``auto_create_calls=True`` accepts calls it has never seen: an
    accept request for an unknown ``call_id`` first registers a ringing SIP call with that id (default
    numbers and headers, as :meth:`create_call`) playing ``auto_call_script`` (an attribute; empty by
    default), so webhooks for invented call ids can come from elsewhere (another process, a load
    generator). Other verbs on unknown ids still get 404.

    ``min_response_time`` is the least time a response stays active, from its ``response.created`` to its
    ``response.done`` (5 ms by default; also a few turns of the event loop after its last other event):
    the real service streams a response over tens of milliseconds or more, and a client that acts too
    early (a ``response.create`` sent on ``function_call_arguments.done``, before ``response.done``)
    meets the error it gives (``conversation_already_has_active_response``). ``None`` holds no response
    at all (``response.done`` follows its other events at once), for a benchmark whose instrument must
    add nothing to the round it times.
    ``event_gap`` is how long the simulator waits before each server event (0 by default: a response's
    events go out back to back, then it is held active as above); a gap spreads a response out, so that
    what a client sends mid-response arrives between its events.

    ``verb_close`` is how the service ends the sideband after a ``hangup`` or ``refer`` verb. The real one
    has been seen to close it cleanly (``"clean"``, code 1000; ``"going_away"``, 1001), to drop it with no
    close frame (``"abnormal"``), and to leave it open (``"silent"``): a controller must end its part
    whichever comes. A refer's 200 only says the REFER was handed to the carrier: the transfer of an
    answered call takes ``transfer_delay`` seconds later (0.1 by default; a plain attribute), and the call
    then ends ``referred``, its sideband ended per ``verb_close``; until then it is still ``accepted``
    and its script goes on. A ringing call is referred at once (no sideband). :meth:`fail_transfer`
    makes a call's next transfer fail at the carrier. ``gone_status`` refuses a sideband handshake for a
    call that has ended: 404 (``call_id_not_found``, the default) or 410, both seen. A call id never seen
    is always 404. Both are plain attributes, so a test can change them on a running simulator.

    ``bad_accept`` is how an accept with a session config the service cannot use (``audio.*.format`` or
    ``turn_detection.threshold`` on a SIP call, no ``type``, a bad value…) is answered. ``"refuse"`` (the
    default): a 400 naming the problem. ``"fail_call"``: as the real service may, 200, then the call fails
    soon after (half a second, or as soon as a sideband attaches, which is closed at once with 1000;
    later handshakes are refused as for any ended call): ``end_reason`` ``"accept_failed"``, the problem
    in ``accept_problem``, the script not played. A plain attribute, like ``verb_close``.

    ``ring_timeout`` is how long a SIP call rings before the caller's leg is dropped, if nobody accepts
    it (30 s by default; ``None``: for ever): as on the real service, a call accepted too late fails. The
    call then ends (``end_reason`` ``"ring_timeout"``): accept, reject, refer and hangup get 404
    ``call_not_found`` and a sideband handshake is refused as for any call gone. An accept whose request
    came in before then keeps the call (it ends only if that accept fails). A plain attribute, read when
    a call is created.

    ``models`` (a set: the realtime and transcription models, and ``model``) is what the key may use:
    ``GET /v1/models/{model}`` answers the model for those and 404 ``model_not_found`` for any other.
    ``key_reads_models = False`` makes it a restricted key without the models scope: that lookup then
    answers 401 ``Missing scopes: api.model.read``. Both are plain attributes. A session's ``model`` (an
    accept's, a WebRTC call's, a ``session.update``'s) must be one of ``models`` that is no transcription
    model: another is refused as a bad payload is (``bad_accept`` applies), with an ``error`` event
    (``session.model``) for a ``session.update``.

    ``account`` (a plain attribute) is the standing of the key's project: ``"ok"``; ``"no_credit"``, every
    request with the key (call control, the sideband handshake) answered 429 ``insufficient_quota``, as
    for a project whose credit is spent; ``"region_refused"``, answered 403
    ``unsupported_country_region_territory``, as for requests from where OpenAI does not serve.

    ``playback_rate`` is how fast the caller hears the model, in characters of its transcript a second
    (about 15 for real speech): ``output_audio_buffer.stopped`` goes out once a spoken response has played,
    after its ``response.done``, as on the real service, so a controller that hangs up on ``response.done``
    cuts its own goodbye short. By default (None) it has played as soon as it is sent. One voice at a
    time: a newer response's audio ends what still plays (its ``stopped`` first), and a scripted caller
    hears the model out before speaking. A caller cutting in while a response streams clears the model's
    audio (``output_audio_buffer.cleared``, no ``stopped``), as does the controller's
    ``output_audio_buffer.clear`` once the audio has started.

    The simulator's own bugs are kept as tracebacks, never passed over: a request it fails on is
    answered 500 (``server_error``), as a real server answers its own failures, and its traceback kept in
    the ``internal_errors`` of the call it names (a verb, a sideband handshake) or else in the
    simulator's ``internal_errors``. What it is told to do (a fault queued, a connection dropped) is no
    bug, nor is aiohttp's own answer or a client that went away. ``run_app``, ``h.ended`` and the
    ``simulator`` fixture fail on any.
    """

    def __init__(
        self,
        api_key: str = DEFAULT_API_KEY,
        webhook_secret: str = DEFAULT_WEBHOOK_SECRET,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model: str = _DEFAULT_MODEL,
        auto_answer_text: str = "Okay.",
        idle_prompt_text: str = "Are you still there?",
        ready_grace: float = 1.0,
        ws_compression: bool = False,
        auto_create_calls: bool = False,
        auto_call_script: Script | None = None,
        event_gap: float = 0.0,
        min_response_time: float | None = 0.005,
        verb_close: Literal["clean", "going_away", "abnormal", "silent"] = "clean",
        gone_status: Literal[404, 410] = 404,
        playback_rate: float | None = None,
        session_seconds: float = _SESSION_MAX_SECONDS,
        bad_accept: Literal["refuse", "fail_call"] = "refuse",
        ring_timeout: float | None = _RING_TIMEOUT,
        transfer_delay: float = 0.1,
    ) -> None:
        if not 0 < session_seconds < 10**9:
            raise ValueError(f"session_seconds must be a positive number of seconds, not {session_seconds!r}")
        if ring_timeout is not None and not 0 < ring_timeout < 10**9:
            raise ValueError(
                f"ring_timeout must be a positive number of seconds or None, not {ring_timeout!r}"
            )
        if verb_close not in ("clean", "going_away", "abnormal", "silent"):
            raise ValueError(f"verb_close must be clean, going_away, abnormal or silent, not {verb_close!r}")
        if min_response_time is not None and not 0 <= min_response_time < 60:
            raise ValueError(f"min_response_time must be 0 to 60 seconds, not {min_response_time!r}")
        if bad_accept not in ("refuse", "fail_call"):
            raise ValueError(f"bad_accept must be refuse or fail_call, not {bad_accept!r}")
        if not 0 <= transfer_delay < 3600:
            raise ValueError(f"transfer_delay must be 0 to 3600 seconds, not {transfer_delay!r}")
        if gone_status not in (404, 410):
            raise ValueError(f"gone_status must be 404 or 410, not {gone_status!r}")
        if playback_rate is not None and not playback_rate > 0:
            raise ValueError(
                f"playback_rate must be a positive number of characters a second, not {playback_rate!r}"
            )
        self.api_key = api_key
        self.webhook_secret = webhook_secret
        self.host = host
        self.model = model
        self.auto_answer_text = auto_answer_text
        self.idle_prompt_text = idle_prompt_text
        self.ready_grace = ready_grace
        self.ws_compression = ws_compression
        self.auto_create_calls = auto_create_calls
        self.event_gap = event_gap
        self.min_response_time = min_response_time
        self.verb_close: Literal["clean", "going_away", "abnormal", "silent"] = verb_close
        self.gone_status: Literal[404, 410] = gone_status
        self.transfer_delay = transfer_delay
        self.playback_rate = playback_rate
        self.session_seconds = session_seconds
        self.bad_accept: Literal["refuse", "fail_call"] = bad_accept
        """How long a call's session lasts (its ``expires_at``): then ``session_expired``, close 1001."""
        self.ring_timeout = ring_timeout
        self.models: set[str] = {*_MODELS, model}
        self.key_reads_models = True
        self.account: Literal["ok", "no_credit", "region_refused"] = "ok"
        self.requests: list[RequestRecord] = []
        self.calls: dict[str, SimCall] = {}
        self.internal_errors: list[str] = []
        """Tracebacks of the simulator's own bugs outside any call: a request it failed on (answered
        500) that names no call it knows. A call's are in its :attr:`SimCall.internal_errors`."""
        self.next_webrtc_script: Script = Script()
        self.auto_call_script: Script = auto_call_script or Script()
        self._port = port
        self._bound_port: int | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._senders: list[WebhookSender] = []
        self._call_senders: dict[str, WebhookSender] = {}  # place_call's, one per webhook URL
        self._call_faults: dict[str, deque[Fault]] = {}
        self._verb_faults: dict[tuple[str, str], deque[Fault]] = {}
        self._failed_transfers: Counter[str] = Counter()
        self._next_faults: deque[Fault] = deque()
        self._ephemeral: dict[str, _EphemeralKey] = {}
        self._closing = asyncio.Event()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the one it was started on
        self._ticker = _Ticker()
        self._id_prefix = secrets.token_hex(6)
        self._counter = itertools.count(1)

    # ------------------------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Bind the loopback port and start serving."""
        if self._runner is not None:
            raise RuntimeError("Simulator already started")
        if self._closed:
            raise RuntimeError("Simulator is closed")
        app = web.Application(middlewares=[self._middleware], client_max_size=8 * 1024 * 1024)
        app.router.add_post("/v1/realtime/calls", self._handle_webrtc_create)
        app.router.add_post("/v1/realtime/calls/{call_id}/{verb}", self._handle_verb)
        app.router.add_post("/v1/realtime/client_secrets", self._handle_client_secrets)
        app.router.add_get("/v1/realtime", self._handle_sideband)
        app.router.add_get("/v1/models/{model}", self._handle_model)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_CLOSE_TIMEOUT)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._bound_port = int(runner.addresses[0][1])
        self._loop = asyncio.get_running_loop()

    def _check_loop(self) -> None:
        """See :func:`check_loop`."""
        check_loop(self._loop)

    async def close(self) -> None:
        """Stop serving: cancel and await every task, close every socket and sender (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for attachment in (a for call in self.calls.values() for a in call._unreachable):
            if attachment.transport is not None:
                attachment.transport.abort()
        attachments = [a for call in self.calls.values() for a in call._sockets]
        await asyncio.gather(*(SimCall._close_one(a, 1001) for a in attachments), return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        senders, self._senders = self._senders, []
        self._call_senders.clear()  # (each is in _senders too)
        await asyncio.gather(*(s.close() for s in senders), return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        if self._closed:
            coro.close()
            raise RuntimeError("Simulator is closed")
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _notify(self) -> None:
        self._ticker.notify()

    async def wait_for(
        self,
        predicate: Callable[[Simulator], bool],
        timeout: float = 10.0,
        what: str = "condition",
    ) -> None:
        """Wait until ``predicate(sim)`` holds (re-checked on every request and new call)."""
        await self._ticker.wait_for(lambda: predicate(self), timeout, f"simulator: {what}")

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{self._id_prefix}{next(self._counter):010x}"

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._bound_port is None:
            raise RuntimeError("Simulator not started")
        return self._bound_port

    @property
    def base_url(self) -> str:
        """The REST base URL, ``http://127.0.0.1:PORT/v1``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def realtime_url(self) -> str:
        """The sideband WebSocket URL without ``call_id``, ``ws://127.0.0.1:PORT/v1/realtime``."""
        return f"ws://{self.host}:{self.port}/v1/realtime"

    def sideband_url(self, call: SimCall | str) -> str:
        """The sideband URL of one call."""
        call_id = call.call_id if isinstance(call, SimCall) else call
        return f"{self.realtime_url}?call_id={call_id}"

    # ------------------------------------------------------------------------------------ calls

    def create_call(
        self,
        script: Script | None = None,
        *,
        from_number: str = "+14255550100",
        to_number: str = "+18005551212",
        sip_headers: Sequence[Mapping[str, str] | tuple[str, str]] | None = None,
        media_security: str | None = "srtp",
        accept_body: Mapping[str, Any] | None = None,
    ) -> SimCall:
        """Register a ringing SIP call (``call_id`` ``rtc_<32 hex>``) that will play ``script`` once accepted.

        ``sip_headers`` (``{"name", "value"}`` dicts or ``(name, value)`` pairs) replaces the default
        ``From``/``To``/``Call-ID`` built from the numbers. ``media_security=None`` omits the field.

        ``accept_body`` registers the call already accepted with that body (checked as an accept request
        would be; :class:`ValueError` if invalid), as if a controller had accepted it: for clients that only
        hold sidebands. Its ``accept_received_ns`` stays ``None``.

        Raises :class:`TypeError` unless ``script`` is a :class:`Script` (or ``None``: no steps), and
        :class:`RuntimeError` when called on another event loop than the one the simulator was started on
        (which is not running meanwhile, so the call could never be answered).
        """
        _check_script(script)
        self._check_loop()
        body: dict[str, Any] | None = None
        if accept_body is not None:
            body = dict(accept_body)
            if "type" not in body:
                raise ValueError("invalid accept body: missing required parameter 'type'")
            problem = _check_session(body, "", sip=True, accept=True) or self._check_model(body, "")
            if problem is not None:
                raise ValueError(f"invalid accept body: {problem.message}")
        call = self._register_sip_call(
            "rtc_" + uuid.uuid4().hex,
            script,
            from_number=from_number,
            to_number=to_number,
            sip_headers=sip_headers,
            media_security=media_security,
        )
        if body is not None:
            call._accept(body)
        return call

    def _register_sip_call(
        self,
        call_id: str,
        script: Script | None,
        *,
        from_number: str = "+14255550100",
        to_number: str = "+18005551212",
        sip_headers: Sequence[Mapping[str, str] | tuple[str, str]] | None = None,
        media_security: str | None = "srtp",
    ) -> SimCall:
        if sip_headers is None:
            headers = [
                {"name": "From", "value": f"sip:{from_number}@sip.example.com"},
                {"name": "To", "value": f"sip:{to_number}@sip.example.com"},
                {"name": "Call-ID", "value": str(uuid.uuid4())},
            ]
        else:
            headers = []
            for header in sip_headers:
                if isinstance(header, tuple):
                    headers.append({"name": header[0], "value": header[1]})
                else:
                    headers.append({"name": header["name"], "value": header["value"]})
        call = SimCall(
            self,
            call_id,
            script or Script(),
            kind="sip",
            from_number=from_number,
            to_number=to_number,
            sip_headers=headers,
            media_security=media_security,
        )
        self.calls[call_id] = call
        if self.ring_timeout is not None and not self._closed:
            call._ring_task = self._spawn(call._ring_out(self.ring_timeout))
        self._notify()
        return call

    def incoming_event(self, call: SimCall) -> dict[str, Any]:
        """The ``realtime.call.incoming`` webhook event for ``call`` (same ``id`` every time)."""
        data: dict[str, Any] = {"call_id": call.call_id, "sip_headers": [dict(h) for h in call.sip_headers]}
        if call.media_security is not None:
            data["sip_media_security"] = call.media_security
        return {
            "object": "event",
            "id": call.incoming_event_id,
            "type": "realtime.call.incoming",
            "created_at": call.created_at,
            "data": data,
        }

    def webhook_sender(self, url: str) -> WebhookSender:
        """A :class:`WebhookSender` for ``url`` signing with this simulator's secret (closed with it)."""
        sender = WebhookSender(url, self.webhook_secret)
        self._senders.append(sender)
        return sender

    async def place_call(
        self, webhook_url: str, script: Script | None = None, **call_options: Any
    ) -> SimCall:
        """Create a ringing call and deliver its signed ``realtime.call.incoming`` webhook to ``webhook_url``.

        The delivery result is stored as ``call.webhook_delivery``. Calls placed to the same URL share one
        sender (one HTTP client, its connections kept alive), closed when the simulator closes. As
        :meth:`create_call`, raises :class:`TypeError` for a ``script`` that is no :class:`Script`, and
        :class:`RuntimeError` on another event loop than the simulator's, before any webhook is sent.
        """
        call = self.create_call(script, **call_options)
        sender = self._call_senders.get(webhook_url)
        if sender is None:
            sender = self._call_senders[webhook_url] = self.webhook_sender(webhook_url)
        call.webhook_delivery = await sender.deliver(self.incoming_event(call))
        return call

    def create_webrtc_call(
        self, script: Script | None = None, *, session: Mapping[str, Any] | None = None
    ) -> SimCall:
        """A WebRTC call as if a browser had created it with an ephemeral key (status ``"accepted"``).
        :class:`TypeError` unless ``script`` is a :class:`Script` (or ``None``), as :meth:`create_call`."""
        _check_script(script)
        body = dict(session) if session is not None else {"type": "realtime"}
        problem = _check_session(body, "session.", sip=False, accept=True) or self._check_model(
            body, "session."
        )
        if problem is not None:
            raise ValueError(f"invalid session: {problem.message}")
        key = self.mint_ephemeral_key(body)
        call = self._new_webrtc_call(script, body)
        call.ephemeral_key = key
        return call

    def _new_webrtc_call(self, script: Script | None, body: dict[str, Any]) -> SimCall:
        call_id = "rtc_" + uuid.uuid4().hex
        call = SimCall(self, call_id, script or Script(), kind="webrtc", media_security=None)
        self.calls[call_id] = call
        call._accept(body)
        self._notify()
        return call

    def mint_ephemeral_key(self, session: Mapping[str, Any] | None = None, seconds: int = 600) -> str:
        """Mint an ``ek_…`` key valid for ``seconds`` (what ``POST /realtime/client_secrets`` does)."""
        body = dict(session) if session is not None else {"type": "realtime"}
        value = "ek_" + uuid.uuid4().hex
        self._ephemeral[value] = _EphemeralKey(value, int(time.time()) + seconds, body)
        return value

    def fail_accept(self, call_id: str, *answers: Fault) -> None:
        """Queue faults for the next accept attempts of ``call_id``: an HTTP status, ``"timeout"`` or
        ``"late"`` (see :data:`Fault`)."""
        faults = self._check_faults(answers)
        call = self.calls.get(call_id)
        if call is not None:
            call.accept_faults.extend(faults)
        else:
            self._call_faults.setdefault(call_id, deque()).extend(faults)

    def fail_verb(self, call_id: str, verb: Literal["reject", "refer", "hangup"], *answers: Fault) -> None:
        """Queue faults for the next ``verb`` requests on that call: an HTTP status, ``"timeout"`` or
        ``"late"`` (the verb is carried out, its answer held: see :data:`Fault`)."""
        self._verb_faults.setdefault((call_id, verb), deque()).extend(self._check_faults(answers))

    def fail_transfer(self, call_id: str) -> None:
        """Make the next transfer of that call fail at the carrier (the target busy or not answering, the
        REFER refused further on): its refer is answered 200 all the same, as OpenAI answers once the
        REFER is handed over, and the call stays as it was (answered: its sideband open, its script going
        on). Each call queues one more failed transfer."""
        self._failed_transfers[call_id] += 1

    def clear_verb_faults(self, call_id: str, verb: Literal["reject", "refer", "hangup"]) -> None:
        """Drop the faults still queued for ``verb`` on that call: OpenAI answers again."""
        self._verb_faults.pop((call_id, verb), None)

    def fail_next_accepts(self, *answers: Fault) -> None:
        """Queue faults for the next accept attempts, whichever call they are for."""
        self._next_faults.extend(self._check_faults(answers))

    @staticmethod
    def _check_faults(answers: Sequence[Fault]) -> list[Fault]:
        for answer in answers:
            if answer in ("timeout", "late"):
                continue
            if not isinstance(answer, int) or isinstance(answer, bool) or not 300 <= answer <= 599:
                raise ValueError(f"a fault is an HTTP status 300-599, 'timeout' or 'late', not {answer!r}")
        return list(answers)

    def expire(self, call: SimCall) -> asyncio.Task[None]:
        """Expire the call's session: ``error`` code ``session_expired``, close 1001, the call ends.

        Returns the task doing it (await it to wait until done)."""
        return self._spawn(self._expire(call))

    async def _expire(self, call: SimCall) -> None:
        if call.ended:
            return
        await call._error("session_expired", "Your session hit the maximum duration of 60 minutes.")
        await call._end("session_expired", "going_away")

    def hang_up(self, call: SimCall, mode: HangupMode = "clean") -> asyncio.Task[None]:
        """The caller hangs up now, whatever the script is doing (e.g. while a tool runs).

        ``mode`` as in :func:`caller_hangs_up`. Returns the task doing it (await it to wait until done)."""
        return self._spawn(call._end("caller_hangup", mode))

    def drop_sideband(
        self, call: SimCall, mode: Literal["abnormal", "clean", "going_away", "unreachable"] = "abnormal"
    ) -> asyncio.Task[None]:
        """Lose the call's sideband socket(s) *without* ending the call.

        ``"abnormal"`` drops the TCP connection (the controller should re-attach), ``"clean"`` /
        ``"going_away"`` close with 1000 / 1001 (as OpenAI closes the sideband of a call that ended: a
        controller takes it for the call's end, and the call left up here shows what that does), and
        ``"unreachable"`` keeps the connection open but silent both ways: what the controller writes is
        never read (lost, like on a dead network path) and pings go unanswered, so only the controller's
        own keepalive can tell."""
        return self._spawn(call._close_sockets(mode))

    # ------------------------------------------------------------------------------------ HTTP

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every request: recorded, its key checked, then handled. An exception a handler did not mean
        to raise (a bug of the simulator's) is kept in :attr:`internal_errors` (or its call's) and
        answered 500, as a real server answers its own failures; aiohttp's answers (``HTTPException``)
        and a client gone mid-request (``ConnectionError``) are no bug, nor is a request that met the
        simulator closing."""
        try:
            if request.match_info.get("verb") != "accept":
                return await self._serve(request, handler)
            return await self._serve_accept(request, handler)
        except (web.HTTPException, ConnectionError):
            raise
        except Exception:
            if self._closed:
                raise
            trace = traceback.format_exc()
            if request.writer.output_size:  # its answer had begun (a socket upgraded): no 500 to give
                self._internal_error(request, trace)
                raise
            response = _fault_response(500)
            if _from_browser(request):
                response.headers.update(_CORS)
            record = request.get(_RECORD)
            if record is not None:
                record.status = response.status
            self._internal_error(request, trace)
            return response

    def _internal_error(self, request: web.Request, trace: str) -> None:
        """Keep ``trace`` (a handler crashed on ``request``) with the call the request names, if it names
        one the simulator knows, else with the simulator's own."""
        call_id = request.match_info.get("call_id") or request.query.get("call_id")
        call = self.calls.get(call_id) if call_id else None
        (call.internal_errors if call is not None else self.internal_errors).append(trace)
        self._notify()

    async def _serve_accept(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # An accept in flight (its body may still be coming) keeps a ringing call past its ring timeout.
        call = self.calls.get(request.match_info.get("call_id", ""))
        if call is not None and call.status == "ringing":
            call._accept_arrived()
            request[_ACCEPTING] = call
            self._notify()
        try:
            return await self._serve(request, handler)
        finally:
            self._accept_decided(request)

    @staticmethod
    def _accept_decided(request: web.Request) -> None:
        """The accept request was carried out or refused (once per request; no-op for other requests)."""
        call = request.get(_ACCEPTING)
        if call is not None:
            del request[_ACCEPTING]
            call._accept_decided()

    async def _serve(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body = await request.read() if request.can_read_body else b""
        parsed: Any = None
        if body and _media_type(request) == "application/json":
            with contextlib.suppress(ValueError):
                parsed = json.loads(body)
        record = RequestRecord(
            request.method,
            request.path,
            dict(request.query),
            CIMultiDictProxy(CIMultiDict(request.headers)),
            body,
            parsed,
            peer=None if request.transport is None else request.transport.get_extra_info("peername"),
        )
        self.requests.append(record)
        request[_RECORD] = record
        self._notify()
        browser = _from_browser(request)
        if browser and request.method == "OPTIONS":  # a browser's preflight: no key needed for it
            record.status = 204
            self._notify()
            return web.Response(status=204, headers=_CORS_PREFLIGHT)
        try:
            response = self._check_auth(request)
            if response is None:
                response = await handler(request)
        except web.HTTPNotFound:
            response = _error_response(404, f"Invalid URL ({request.method} {request.path})")
        except web.HTTPMethodNotAllowed:
            response = _error_response(405, f"Method not allowed ({request.method} {request.path})")
        if browser:  # a page of any origin may start a call with an ephemeral key and read its id
            response.headers.update(_CORS)
        record.status = response.status
        self._notify()
        return response

    def _check_auth(self, request: web.Request) -> web.StreamResponse | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if not header or scheme.lower() != "bearer" or not token:
            return _error_response(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization "
                "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        if secrets.compare_digest(token, self.api_key):
            if self.account == "no_credit":
                return _error_response(
                    429,
                    "You exceeded your current quota, please check your plan and billing details. For more "
                    "information on this error, read the docs: "
                    "https://platform.openai.com/docs/guides/error-codes/api-errors.",
                    type_="insufficient_quota",
                    code="insufficient_quota",
                )
            if self.account == "region_refused":
                return _error_response(
                    403,
                    "Country, region, or territory not supported",
                    type_="request_forbidden",
                    code="unsupported_country_region_territory",
                )
            return None
        key = self._ephemeral.get(token)
        if key is not None and key.expires_at > time.time():
            if request.method == "POST" and request.path == "/v1/realtime/calls":
                request[_EPHEMERAL] = key
                return None
            if request.path == "/v1/realtime":
                # Seen on the real service: ephemeral keys on the sideband get a 404.
                return _error_response(404, "Call not found.", code="call_id_not_found")
        shown = token[:3] + "*" * 4 + token[-4:] if len(token) > 8 else "****"
        return _error_response(
            401,
            f"Incorrect API key provided: {shown}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            code="invalid_api_key",
        )

    async def _hold(self) -> web.Response:
        """Hold a request until the simulator closes (the client gives up first)."""
        await self._closing.wait()
        return _error_response(504, "Gateway timeout.", type_="server_error")

    def _check_model(self, session: Mapping[str, Any], prefix: str) -> _Problem | None:
        """A session's ``model`` the service would refuse: one the key may not use (see :attr:`models`),
        or one that only transcribes."""
        model = session.get("model")
        if not isinstance(model, str) or (model in self.models and model not in _TRANSCRIPTION_MODELS):
            return None
        names = ", ".join(f"'{m}'" for m in sorted(self.models - _TRANSCRIPTION_MODELS))
        return _Problem(
            f"{prefix}model",
            "invalid_value",
            f"Invalid value: '{model}'. Supported values are: {names}.",
        )

    def _take_fault(self, call_id: str) -> Fault | None:
        call = self.calls.get(call_id)
        queue = call.accept_faults if call is not None else self._call_faults.get(call_id)
        if queue:
            return queue.popleft()
        if self._next_faults:
            return self._next_faults.popleft()
        return None

    @staticmethod
    async def _json_body(request: web.Request, *, optional: bool) -> dict[str, Any] | web.Response:
        raw = await request.read()
        if not raw.strip():
            if optional:
                return {}
            return _error_response(
                400, "We could not parse the JSON body of your request: the body is empty."
            )
        try:
            body = _strict_json(raw)
        except ValueError:
            return _error_response(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely "
                "means you aren't using your HTTP library correctly.)",
            )
        if not isinstance(body, dict):
            return _error_response(400, "The request body must be a JSON object.")
        return body

    async def _handle_verb(self, request: web.Request) -> web.StreamResponse:
        call_id = request.match_info["call_id"]
        verb = request.match_info["verb"]
        if verb == "accept":
            return await self._handle_accept(request, call_id)
        if verb not in ("reject", "refer", "hangup"):
            raise web.HTTPNotFound()
        faults = self._verb_faults.get((call_id, verb))
        fault = faults.popleft() if faults else None
        if fault == "timeout":
            return await self._hold()
        if isinstance(fault, int):
            return _fault_response(fault)
        call = self.calls.get(call_id)
        if call is None or call.ended:
            return _error_response(404, f"Call {call_id} not found.", code="call_not_found")
        if verb == "refer" and call.kind != "sip":
            # A REFER goes to the SIP provider: a browser's call has none (hangup is the one verb for it).
            return _error_response(
                400,
                f"Call {call_id} is a WebRTC call: refer is only supported for SIP calls.",
                code="invalid_value",
            )
        body = await self._json_body(request, optional=verb != "refer")
        if isinstance(body, web.Response):
            return body
        if verb == "reject":
            if call.status != "ringing":
                return _error_response(404, f"Call {call_id} is not ringing.", code="call_not_found")
            code = body.get("status_code", 603)
            if not isinstance(code, int) or isinstance(code, bool) or not 400 <= code <= 699:
                return _error_response(
                    400,
                    "status_code must be a SIP status between 400 and 699.",
                    param="status_code",
                    code="invalid_value",
                )
            call.reject_body = body
            await call._end("rejected")
        elif verb == "refer":
            target = body.get("target_uri")
            if not isinstance(target, str):
                return _error_response(
                    400,
                    "Missing required parameter: 'target_uri'.",
                    param="target_uri",
                    code="missing_required_parameter",
                )
            if not target.startswith(("tel:", "sip:", "sips:")) or len(target) < 6:
                return _error_response(
                    400, "target_uri must be a tel: or sip: URI.", param="target_uri", code="invalid_value"
                )
            call.refer_target = target
            if self._failed_transfers[call_id] > 0:
                self._failed_transfers[call_id] -= 1  # the carrier could not reach the target
            elif call.status == "ringing":
                self._spawn(call._end("referred", self.verb_close))
            else:
                self._spawn(call._transfer_in(self.transfer_delay, self.verb_close))
        else:
            call.hangup_requested = True
            self._spawn(call._end("hangup_verb", self.verb_close))
        if fault == "late":
            return await self._hold()
        return web.Response(status=200)

    async def _handle_accept(self, request: web.Request, call_id: str) -> web.StreamResponse:
        try:
            answer = await self._decide_accept(request, call_id)
        finally:
            self._accept_decided(request)
        return await self._hold() if answer is None else answer

    async def _decide_accept(self, request: web.Request, call_id: str) -> web.Response | None:
        """Carry out or refuse an accept: the answer, or ``None`` to hold it (a ``timeout`` fault; a
        ``late`` one once the call is accepted)."""
        received_ns = time.monotonic_ns()
        call = self.calls.get(call_id)
        if call is None and self.auto_create_calls:
            call = self._register_sip_call(call_id, self.auto_call_script)
        if call is not None and call.accept_received_ns is None:
            call.accept_received_ns = received_ns
        fault = self._take_fault(call_id)
        if fault == "timeout":
            return None
        if fault is not None and fault != "late":
            return _fault_response(fault)
        if call is None or call.status != "ringing":
            return _error_response(404, f"Call {call_id} not found.", code="call_not_found")
        body = await self._json_body(request, optional=False)
        if isinstance(body, web.Response):
            return body
        if "type" not in body:
            problem: _Problem | None = _Problem(
                "type", "missing_required_parameter", "Missing required parameter: 'type'."
            )
        else:
            problem = _check_session(body, "", sip=call.kind == "sip", accept=True) or self._check_model(
                body, ""
            )
        if problem is None:
            call._accept(body)
        elif self.bad_accept == "fail_call":
            call._accept_bad(body, problem.message)
        else:
            return _error_response(400, problem.message, param=problem.param, code=problem.code)
        if fault == "late":
            return None
        return web.Response(status=200)

    async def _handle_model(self, request: web.Request) -> web.StreamResponse:
        if not self.key_reads_models:
            return _error_response(
                401,
                "You have insufficient permissions for this operation. Missing scopes: api.model.read. "
                "Check that you have the correct role in your organization (Reader, Writer, Owner) and "
                "project (Member, Owner), and if you're using a restricted API key, that it has the "
                "necessary scopes.",
            )
        name = request.match_info["model"]
        if name not in self.models:
            return _error_response(
                404,
                f"The model `{name}` does not exist or you do not have access to it.",
                code="model_not_found",
            )
        return web.json_response({"id": name, "object": "model", "created": 1756271701, "owned_by": "system"})

    async def _handle_client_secrets(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request, optional=True)
        if isinstance(body, web.Response):
            return body
        seconds = 600
        if "expires_after" in body:
            expires = body["expires_after"]
            if not isinstance(expires, dict):
                return _error_response(
                    400,
                    "Invalid type for 'expires_after': expected an object.",
                    param="expires_after",
                    code="invalid_type",
                )
            if expires.get("anchor") != "created_at":
                return _error_response(
                    400,
                    "Invalid value for 'expires_after.anchor': expected 'created_at'.",
                    param="expires_after.anchor",
                    code="invalid_value",
                )
            raw = expires.get("seconds", 600)
            if not isinstance(raw, int) or isinstance(raw, bool) or not 10 <= raw <= 7200:
                return _error_response(
                    400,
                    "'expires_after.seconds' must be an integer between 10 and 7200.",
                    param="expires_after.seconds",
                    code="invalid_value",
                )
            seconds = raw
        session = body.get("session", {"type": "realtime"})
        refused = _refuse_webrtc_session(session, accept=False)
        if refused is not None:
            return refused
        value = self.mint_ephemeral_key(session, seconds)
        full = _merge_session(_default_session(self._new_id("sess_"), model=self.model, sip=False), session)
        expires_at = self._ephemeral[value].expires_at
        return web.json_response({"value": value, "expires_at": expires_at, "session": full})

    async def _handle_webrtc_create(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        ctype = _media_type(request)
        session: Any
        if ctype == "multipart/form-data":
            parts = self._multipart_parts(request.headers.get("Content-Type", ""), raw)
            if "sdp" not in parts:
                return _error_response(
                    400, "Missing required parameter: 'sdp'.", param="sdp", code="missing_required_parameter"
                )
            sdp = parts["sdp"].decode("utf-8", "replace")
            if "session" in parts:
                try:
                    session = _strict_json(parts["session"])
                except ValueError:
                    return _error_response(
                        400, "The 'session' part is not valid JSON.", param="session", code="invalid_json"
                    )
            else:
                session = {"type": "realtime"}
        elif ctype == "application/sdp":
            sdp = raw.decode("utf-8", "replace")
            key = request.get(_EPHEMERAL)
            session = dict(key.session) if key is not None else {"type": "realtime"}
        else:
            return _error_response(
                400,
                f"Unsupported content type {ctype!r}: send multipart/form-data (sdp, "
                "session) or application/sdp.",
                code="invalid_value",
            )
        if not sdp.lstrip().startswith("v=0"):
            return _error_response(400, "The SDP offer is invalid.", param="sdp", code="invalid_offer")
        refused = _refuse_webrtc_session(session, accept=True)
        if refused is not None:
            return refused
        problem = self._check_model(session, "session.")
        if problem is not None:
            return _error_response(400, problem.message, param=problem.param, code=problem.code)
        call = self._new_webrtc_call(self.next_webrtc_script, session)
        call.sdp_offer = sdp
        used = request.get(_EPHEMERAL)
        if used is not None:
            call.ephemeral_key = used.value
        return web.Response(
            status=201,
            body=self._sdp_answer(sdp).encode(),
            content_type="application/sdp",
            headers={"Location": f"/v1/realtime/calls/{call.call_id}"},
        )

    @staticmethod
    def _multipart_parts(content_type: str, raw: bytes) -> dict[str, bytes]:
        # compat32: the other policies' header registry makes new classes per header (cyclic garbage)
        message = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw
        )
        parts: dict[str, bytes] = {}
        if not message.is_multipart():
            return parts
        for part in message.get_payload():
            if not isinstance(part, email.message.Message):
                continue
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if isinstance(name, str) and isinstance(payload, bytes):
                parts[name] = payload
        return parts

    @staticmethod
    def _sdp_answer(offer: str) -> str:
        """An SDP answer a browser accepts for ``offer``: its media sections in its order and with its
        ``mid``s. Audio is answered with a codec the section offers (opus, else PCMU or PCMA) and the
        direction that complements the offer's; the data channel is accepted; both are bundled. Anything
        else (video, audio with none of those codecs) is declined with port 0. No media ever flows: the
        candidates lead nowhere."""
        sections: list[dict[str, Any]] = []
        for line in offer.splitlines():
            if line.startswith("m="):
                fields = line[2:].split()  # kind, port, protocol, payload types…
                sections.append(
                    {
                        "kind": fields[0] if fields else "",
                        "proto": fields[2] if len(fields) > 2 else "UDP/TLS/RTP/SAVPF",
                        "payloads": fields[3:],
                        "mid": str(len(sections)),
                        "direction": "sendrecv",
                        "codecs": {},
                    }
                )
            elif not sections:
                continue  # session-level lines
            elif line.startswith("a=mid:"):
                sections[-1]["mid"] = line[6:].strip()
            elif line[2:] in ("sendrecv", "sendonly", "recvonly", "inactive") and line.startswith("a="):
                sections[-1]["direction"] = line[2:]
            elif line.startswith("a=rtpmap:"):
                payload, _, codec = line[9:].partition(" ")
                sections[-1]["codecs"][codec.split("/", 1)[0].lower()] = payload
        if not sections:
            sections = [
                {"kind": "audio", "proto": "UDP/TLS/RTP/SAVPF", "payloads": ["111"], "mid": "0",
                 "direction": "sendrecv", "codecs": {"opus": "111"}}
            ]  # fmt: skip
        for section in sections:
            if section["kind"] == "audio":
                codecs, payloads = section["codecs"], section["payloads"]
                static = {"0": "pcmu", "8": "pcma"}  # static payload types need no rtpmap
                chosen = next(
                    (codecs[c] for c in ("opus", "pcmu", "pcma") if codecs.get(c) in payloads), None
                )
                chosen = chosen or next((pt for pt in ("0", "8") if pt in payloads), None)
                section["answer"] = chosen
                section["codec"] = next(
                    (c for c, pt in codecs.items() if pt == chosen), static.get(chosen or "")
                )
        session_id = secrets.randbelow(10**18)
        ufrag = secrets.token_hex(4)
        pwd = secrets.token_hex(12)
        fingerprint = ":".join(f"{b:02X}" for b in secrets.token_bytes(32))
        transport = [
            "c=IN IP4 127.0.0.1",
            f"a=ice-ufrag:{ufrag}",
            f"a=ice-pwd:{pwd}",
            f"a=fingerprint:sha-256 {fingerprint}",
            "a=setup:active",
        ]
        complement = {
            "sendrecv": "sendrecv",
            "sendonly": "recvonly",
            "recvonly": "sendonly",
            "inactive": "inactive",
        }
        rtpmaps = {"opus": "opus/48000/2", "pcmu": "PCMU/8000", "pcma": "PCMA/8000"}
        accepted = [
            x["mid"]
            for x in sections
            if x["kind"] == "application" or (x["kind"] == "audio" and x.get("answer"))
        ]
        lines = ["v=0", f"o=- {session_id} 2 IN IP4 127.0.0.1", "s=-", "t=0 0"]
        if accepted:
            lines.append("a=group:BUNDLE " + " ".join(accepted))
        lines.append("a=msid-semantic:WMS *")
        for x in sections:
            if x["kind"] == "audio" and x.get("answer"):
                pt = x["answer"]
                lines += [f"m=audio 3478 UDP/TLS/RTP/SAVPF {pt}", *transport, f"a=mid:{x['mid']}"]
                lines += [
                    f"a={complement[x['direction']]}",
                    "a=rtcp-mux",
                    f"a=rtpmap:{pt} {rtpmaps[x['codec']]}",
                ]
                if x["codec"] == "opus":
                    lines.append(f"a=fmtp:{pt} minptime=10;useinbandfec=1")
                lines.append("a=candidate:1 1 udp 2130706431 127.0.0.1 3478 typ host")
            elif x["kind"] == "application":
                lines += ["m=application 3478 UDP/DTLS/SCTP webrtc-datachannel", *transport]
                lines += [f"a=mid:{x['mid']}", "a=sctp-port:5000"]
            else:  # declined
                first = x["payloads"][0] if x["payloads"] else "0"
                lines += [f"m={x['kind']} 0 {x['proto']} {first}", "c=IN IP4 0.0.0.0", f"a=mid:{x['mid']}"]
                lines.append("a=inactive")
        return "\r\n".join(lines) + "\r\n"

    # ------------------------------------------------------------------------------------ sideband

    async def _handle_sideband(self, request: web.Request) -> web.StreamResponse:
        call_id = request.query.get("call_id")
        if not call_id:
            return _error_response(
                400,
                "This simulator serves sideband connections only: pass ?call_id=.",
                param="call_id",
                code="missing_required_parameter",
            )
        call = self.calls.get(call_id)
        if call is None or call.status != "accepted":
            status = self.gone_status if call is not None and call.ended else 404
            return _error_response(status, f"Call {call_id} not found.", code="call_id_not_found")
        ws: web.WebSocketResponse = web.WebSocketResponse(
            timeout=_CLOSE_TIMEOUT, compress=self.ws_compression, max_msg_size=16 * 1024 * 1024
        )
        beta = "OpenAI-Beta" in request.headers
        if not beta:
            # Counted before the 101 goes out, so a client that saw its handshake complete sees the count.
            call.sideband_connects += 1
        try:
            await ws.prepare(request)
        except BaseException:
            if not beta:
                call.sideband_connects -= 1
            raise
        if beta:
            event = {
                "type": "error",
                "event_id": self._new_id("event_"),
                "error": {
                    "type": "invalid_request_error",
                    "code": "beta_api_shape_disabled",
                    "message": "The OpenAI-Beta header is not supported by the GA Realtime API: remove it.",
                    "param": None,
                    "event_id": None,
                },
            }
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(json.dumps(event))
            await SimCall._close_one(_Attachment(ws, request.transport), 1008)
            return ws
        attachment = _Attachment(ws, request.transport)
        call._attach(attachment)
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    try:
                        await call._on_text(message.data)
                    except Exception:  # a simulator bug: keep the socket, report it loudly
                        call.internal_errors.append(traceback.format_exc())
                        await call._error(
                            None,
                            "The server had an error while processing your request.",
                            type_="server_error",
                        )
                elif message.type == WSMsgType.BINARY:
                    call.bad_frames.append(message.data)
                    if not call.ended:
                        await call._error("invalid_json", "Binary frames are not supported: send JSON text.")
        finally:
            call._detach(attachment)
            _drop_tracebacks(ws.exception())
        return ws
