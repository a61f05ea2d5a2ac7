"""What a call cost, as the server reported it: the tokens of its responses (``response.done``'s ``usage``)
and what transcribing the caller took (``conversation.item.input_audio_transcription.completed``'s
``usage``). One :class:`Usage` per call (:attr:`sideband.CallSummary.usage`), and one for the process
(``/metrics``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Usage"]

_MAX = 2**53  # a count above this is no count a server sends (and would lose precision as a float)


def _count(value: Any) -> int:
    """A reported count: a non-negative int (anything else counts as none)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX:
        return value
    return 0


def _details(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


@dataclass(slots=True)
class Usage:
    """Tokens and transcription audio of a call (or of all the process's calls), summed as reported.

    Input counts include the cached ones (``cached_*`` are a part of them, billed at the cached rate). A
    server that sends no usage (the vowel engine) leaves every count at 0.
    """

    responses: int = 0
    """Responses that reported their usage."""
    input_tokens: int = 0
    output_tokens: int = 0
    input_text_tokens: int = 0
    input_audio_tokens: int = 0
    input_image_tokens: int = 0
    cached_tokens: int = 0
    cached_text_tokens: int = 0
    cached_audio_tokens: int = 0
    cached_image_tokens: int = 0
    output_text_tokens: int = 0
    output_audio_tokens: int = 0
    transcription_seconds: float = 0.0
    """Caller audio transcribed by a model billed per duration (``whisper-1``)."""
    transcription_input_tokens: int = 0
    """Tokens of a transcription model billed per token (``gpt-4o-transcribe``…): the audio it heard."""
    transcription_output_tokens: int = 0
    """…and the text it wrote."""

    @property
    def total_tokens(self) -> int:
        """The responses' input and output tokens together."""
        return self.input_tokens + self.output_tokens

    def add_response(self, usage: Mapping[str, Any]) -> None:
        """Count a ``response.done``'s ``response.usage``."""
        self.responses += 1
        self.input_tokens += _count(usage.get("input_tokens"))
        self.output_tokens += _count(usage.get("output_tokens"))
        given = _details(usage.get("input_token_details"))
        self.input_text_tokens += _count(given.get("text_tokens"))
        self.input_audio_tokens += _count(given.get("audio_tokens"))
        self.input_image_tokens += _count(given.get("image_tokens"))
        self.cached_tokens += _count(given.get("cached_tokens"))
        cached = _details(given.get("cached_tokens_details"))
        self.cached_text_tokens += _count(cached.get("text_tokens"))
        self.cached_audio_tokens += _count(cached.get("audio_tokens"))
        self.cached_image_tokens += _count(cached.get("image_tokens"))
        made = _details(usage.get("output_token_details"))
        self.output_text_tokens += _count(made.get("text_tokens"))
        self.output_audio_tokens += _count(made.get("audio_tokens"))

    def add_transcription(self, usage: Mapping[str, Any]) -> None:
        """Count a caller transcript's ``usage``: ``{"type": "duration", "seconds": …}`` or
        ``{"type": "tokens", "input_tokens": …, "output_tokens": …}``."""
        if usage.get("type") == "duration":
            seconds = usage.get("seconds")
            if isinstance(seconds, int | float) and not isinstance(seconds, bool) and 0 <= seconds < _MAX:
                self.transcription_seconds += seconds
        else:
            self.transcription_input_tokens += _count(usage.get("input_tokens"))
            self.transcription_output_tokens += _count(usage.get("output_tokens"))

    def lines(self) -> list[str]:
        """``/metrics`` counters: ``sideband_responses_total``, ``sideband_tokens_total{direction,modality}``,
        ``sideband_cached_tokens_total{modality}``, ``sideband_transcription_seconds_total`` and
        ``sideband_transcription_tokens_total{direction}``."""
        tokens = (
            ("input", "text", self.input_text_tokens),
            ("input", "audio", self.input_audio_tokens),
            ("input", "image", self.input_image_tokens),
            ("output", "text", self.output_text_tokens),
            ("output", "audio", self.output_audio_tokens),
        )
        cached = (
            ("text", self.cached_text_tokens),
            ("audio", self.cached_audio_tokens),
            ("image", self.cached_image_tokens),
        )
        return [
            "# TYPE sideband_responses_total counter",
            f"sideband_responses_total {self.responses}",
            "# TYPE sideband_tokens_total counter",
            *(
                f'sideband_tokens_total{{direction="{direction}",modality="{modality}"}} {count}'
                for direction, modality, count in tokens
            ),
            "# TYPE sideband_cached_tokens_total counter",
            *(f'sideband_cached_tokens_total{{modality="{modality}"}} {count}' for modality, count in cached),
            "# TYPE sideband_transcription_seconds_total counter",
            f"sideband_transcription_seconds_total {self.transcription_seconds:.3f}",
            "# TYPE sideband_transcription_tokens_total counter",
            f'sideband_transcription_tokens_total{{direction="input"}} {self.transcription_input_tokens}',
            f'sideband_transcription_tokens_total{{direction="output"}} {self.transcription_output_tokens}',
        ]
