"""The session config (one object → the accept payload *and* the first ``session.update``) and the
routing decisions a hook returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Accept",
    "Decision",
    "Refer",
    "Reject",
    "SessionConfig",
    "SessionConfigError",
    "validate_accept_payload",
]


class SessionConfigError(ValueError):
    """A session config OpenAI would refuse (or accept and then fail the call with)."""


class SessionConfig(BaseModel):
    """The Realtime session a call gets. ``extra`` fields are passed through untouched, so new
    OpenAI fields need no release of ours."""

    model_config = ConfigDict(extra="allow", frozen=True)

    model: str | None = "gpt-realtime"
    instructions: str | None = None
    voice: str | None = None
    speed: float | None = Field(default=None, gt=0)
    output_modalities: list[str] | None = None
    transcription_model: str | None = "gpt-4o-mini-transcribe"
    """Input transcription model (``None`` disables caller transcripts)."""
    turn_detection: dict[str, Any] | None = None
    noise_reduction: dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_output_tokens: int | Literal["inf"] | None = None
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
            audio_out["voice"] = self.voice
        if self.speed is not None:
            audio_out["speed"] = self.speed
        if audio_in or audio_out:
            body["audio"] = {k: v for k, v in (("input", audio_in), ("output", audio_out)) if v}
        if tools:
            body["tools"] = tools
        for key in ("tool_choice", "max_output_tokens", "tracing", "prompt", "include"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        if self.model_extra:
            body.update(self.model_extra)
        return body

    def merged(self, **overrides: Any) -> SessionConfig:
        """A copy with ``overrides`` applied (``None`` values are ignored)."""
        data = self.model_dump(exclude_unset=False)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return SessionConfig.model_validate(data)


_FORBIDDEN_TURN_DETECTION = ("threshold", "prefix_padding_ms", "silence_duration_ms")


def validate_accept_payload(body: dict[str, Any], *, sip: bool = True) -> None:
    """Refuse locally what OpenAI would refuse or silently break on (PROTOCOL A2)."""
    if body.get("type") != "realtime":
        raise SessionConfigError('session config needs "type": "realtime"')
    audio = body.get("audio") or {}
    if not isinstance(audio, dict):
        raise SessionConfigError("audio must be an object")
    for side in ("input", "output"):
        part = audio.get(side) or {}
        if sip and "format" in part:
            raise SessionConfigError(
                f"audio.{side}.format must not be set for SIP calls (the codec is negotiated)"
            )
    td = (audio.get("input") or {}).get("turn_detection") or {}
    if sip and isinstance(td, dict):
        for key in _FORBIDDEN_TURN_DETECTION:
            if key in td:
                raise SessionConfigError(f"audio.input.turn_detection.{key} is refused by the calls API")
    for tool in body.get("tools") or []:
        if tool.get("type") == "function" and not tool.get("name"):
            raise SessionConfigError("every function tool needs a name")


@dataclass(frozen=True, slots=True)
class Accept:
    """Answer the call. Overrides apply on top of the app's session config; ``tools`` names a subset."""

    instructions: str | None = None
    voice: str | None = None
    greeting: str | None = None
    tools: tuple[str, ...] | None = None
    session: dict[str, Any] = field(default_factory=dict)
    max_call_duration: float | None = None
    """Seconds before the model says goodbye and the call is hung up (default: app, then settings)."""
    max_idle_duration: float | None = None
    """Seconds without caller speech before goodbye and hangup (default: app, then settings)."""

    def __post_init__(self) -> None:
        if self.tools is not None:
            if isinstance(self.tools, str) or not all(isinstance(t, str) for t in self.tools):
                raise TypeError("Accept(tools=...) takes tool names, e.g. ('lookup_order',)")
            object.__setattr__(self, "tools", tuple(self.tools))  # a list is fine, stored hashable


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse the call with a SIP status (default 603 Decline); a final status, 400-699.

    Raises :class:`ValueError` on any other status, so a routing hook's mistake fails closed (the
    call is rejected with ``SIDEBAND_ROUTE_FAILURE_STATUS``) instead of leaving the caller ringing.
    """

    status_code: int = 603

    def __post_init__(self) -> None:
        if type(self.status_code) is not int or not 400 <= self.status_code <= 699:
            raise ValueError(f"Reject status_code must be a SIP status 400-699, got {self.status_code!r}")


@dataclass(frozen=True, slots=True)
class Refer:
    """Send the call elsewhere (SIP REFER) without answering it: ``tel:+1…`` or ``sip:…``.

    Raises :class:`ValueError` for any other kind of URI.
    """

    target_uri: str

    def __post_init__(self) -> None:
        if not isinstance(self.target_uri, str) or not self.target_uri.startswith(("tel:", "sip:", "sips:")):
            raise ValueError(f"Refer target_uri must be a tel: or sip: URI, got {self.target_uri!r}")


Decision = Accept | Reject | Refer
