"""A small DSL that scripts one simulated call: what the caller does and what the model answers.

A :class:`Script` is plain, immutable data: a list of steps the simulator plays on the call's sideband in
order. The simulator (``sideband.testing.simulator``) interprets the steps; nothing here does any I/O, so
one script can be reused for any number of calls::

    script = Script([
        wait_for_greeting("Thanks for calling Example Corp."),
        caller_says("Where is my order 12345?"),
        model_calls("lookup_order", {"order_id": "12345"}),
        model_says("It ships tomorrow."),
        caller_hangs_up(),
    ])

Response steps follow one rule: if the controller sent a ``response.create`` that is not answered yet, the
step answers it; otherwise the response is spontaneous (as after server VAD). Two kinds of step *wait* for
the controller's ``response.create``: :func:`wait_for_greeting`, and a ``model_says``/``model_calls`` that
follows a completed :func:`model_calls` (the controller must send the outputs, then ``response.create``), or
that follows a :func:`caller_says` when the session's turn detection does not create responses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeAlias

__all__ = [
    "CallerHangsUp",
    "CallerPresses",
    "CallerSays",
    "FunctionCallSpec",
    "HangupMode",
    "ModelCalls",
    "ModelSays",
    "Pause",
    "ResponseStatus",
    "Script",
    "Step",
    "WaitForGreeting",
    "caller_hangs_up",
    "caller_presses",
    "caller_says",
    "model_answers",
    "model_calls",
    "model_fails",
    "model_says",
    "model_says_first",
    "pause",
    "wait_for_greeting",
]

HangupMode: TypeAlias = Literal["clean", "going_away", "abnormal", "silent"]
"""How the caller's hangup shows on the sideband: close 1000, close 1001, TCP drop with no close frame, or
nothing."""

ResponseStatus: TypeAlias = Literal["completed", "cancelled", "failed", "incomplete"]
"""The ``response.done`` status a scripted response ends with."""

_HANGUP_MODES: tuple[str, ...] = ("clean", "going_away", "abnormal", "silent")
_RESPONSE_STATUSES: tuple[str, ...] = ("completed", "cancelled", "failed", "incomplete")
_DTMF_DIGITS = frozenset("0123456789*#ABCD")


@dataclass(frozen=True, slots=True)
class WaitForGreeting:
    """Wait for the controller's ``response.create`` and answer it with a spoken ``text``."""

    text: str

    def describe(self) -> str:
        """A short human description, used in failure messages."""
        return f"wait_for_greeting({self.text!r})"


@dataclass(frozen=True, slots=True)
class CallerSays:
    """The caller speaks ``text`` (server VAD events, the user item, and the transcript if configured),
    for ``seconds`` between ``speech_started`` and ``speech_stopped`` (None: at once), after hearing the
    model out unless ``cut_in``; with ``untranscribed``, the transcription fails instead of completing.
    With the session's turn detection off, none of that comes until the controller commits the input
    buffer (see :func:`caller_says`)."""

    text: str
    seconds: float | None = None
    cut_in: bool = False
    untranscribed: bool = False

    def describe(self) -> str:
        """A short human description, used in failure messages."""
        extra = "" if self.seconds is None else f", seconds={self.seconds}"
        extra += ", cut_in=True" if self.cut_in else ""
        extra += ", untranscribed=True" if self.untranscribed else ""
        return f"caller_says({self.text!r}{extra})"


@dataclass(frozen=True, slots=True)
class ModelSays:
    """One spoken model response whose transcript is ``text``; with ``failed``, one that ends ``failed``
    (a ``server_error``) before it says anything; with ``asked``, one that waits for the controller's
    ``response.create`` and answers it; with ``first``, one that waits for that create and starts before
    it, refusing it (see :func:`model_says_first`)."""

    text: str
    failed: bool = False
    asked: bool = False
    first: bool = False

    def describe(self) -> str:
        """A short human description, used in failure messages."""
        if self.failed:
            return "model_fails()"
        if self.first:
            return f"model_says_first({self.text!r})"
        return f"model_answers({self.text!r})" if self.asked else f"model_says({self.text!r})"


@dataclass(frozen=True, slots=True)
class FunctionCallSpec:
    """One function call inside a :class:`ModelCalls` response.

    ``arguments`` is the exact string the model "writes" (compact JSON for a dict, verbatim for a str).
    ``call_id`` is generated (``call_…``) when not given. ``cut``: the response ends before the arguments
    are whole (only their first half is written, and the call's item ends ``incomplete``).
    """

    name: str
    arguments: str
    call_id: str | None = None
    cut: bool = False


@dataclass(frozen=True, slots=True)
class ModelCalls:
    """One model response carrying an optional spoken preamble and one or more function calls."""

    calls: tuple[FunctionCallSpec, ...]
    preamble: str | None = None
    status: ResponseStatus = "completed"
    await_outputs: bool = True
    undeclared: bool = False

    @property
    def arguments_cut(self) -> bool:
        """Whether the response ends with a call's arguments cut short (see :func:`model_calls`)."""
        return any(call.cut for call in self.calls)

    @property
    def waits_for_outputs(self) -> bool:
        """Whether the step waits for a ``function_call_output`` per call (not for cancelled/failed, nor
        with arguments cut short, nor with ``await_outputs=False``)."""
        return self.await_outputs and self.status not in ("cancelled", "failed") and not self.arguments_cut

    def describe(self) -> str:
        """A short human description, used in failure messages."""
        names = ", ".join(c.name for c in self.calls)
        cut = ", arguments_cut=True" if self.arguments_cut else ""
        cut += ", undeclared=True" if self.undeclared else ""
        return f"model_calls({names}, status={self.status!r}{cut})"


@dataclass(frozen=True, slots=True)
class CallerPresses:
    """The caller presses DTMF keys: one ``input_audio_buffer.dtmf_event_received`` per digit."""

    digits: str

    def describe(self) -> str:
        """A short human description, used in failure messages."""
        return f"caller_presses({self.digits!r})"


@dataclass(frozen=True, slots=True)
class Pause:
    """Nothing happens for ``seconds`` (simulated silence)."""

    seconds: float

    def describe(self) -> str:
        """A short human description, used in failure messages."""
        return f"pause({self.seconds})"


@dataclass(frozen=True, slots=True)
class CallerHangsUp:
    """The caller hangs up; the call ends with ``end_reason == "caller_hangup"``."""

    mode: HangupMode = "clean"

    def describe(self) -> str:
        """A short human description, used in failure messages."""
        return f"caller_hangs_up({self.mode!r})"


Step: TypeAlias = (
    WaitForGreeting | CallerSays | ModelSays | ModelCalls | CallerPresses | Pause | CallerHangsUp
)
"""Any one step of a :class:`Script`."""

_STEP_TYPES = (WaitForGreeting, CallerSays, ModelSays, ModelCalls, CallerPresses, Pause, CallerHangsUp)


class Script:
    """An ordered list of steps for one simulated call (immutable; reusable for any number of calls).
    ``copy.copy``/``copy.deepcopy`` give the script itself; it pickles.

    ``step_timeout`` bounds every wait of a step (for the sideband to attach, for the controller's
    ``response.create``, for function outputs); a step that times out fails the script with a message naming
    the step. ``hang_up_at_end`` ends the call (clean close, ``end_reason == "script_done"``) once the last
    step ran; by default a script that finishes without :func:`caller_hangs_up` leaves the call live.
    """

    __slots__ = ("hang_up_at_end", "step_timeout", "steps")

    steps: tuple[Step, ...]
    step_timeout: float
    hang_up_at_end: bool

    def __init__(
        self, steps: Sequence[Step] = (), *, step_timeout: float = 5.0, hang_up_at_end: bool = False
    ) -> None:
        steps_tuple = tuple(steps)
        for index, step in enumerate(steps_tuple):
            if not isinstance(step, _STEP_TYPES):
                raise TypeError(f"script step {index} is not a step: {step!r}")
        if not (math.isfinite(step_timeout) and step_timeout > 0):
            raise ValueError("step_timeout must be a positive number of seconds")
        object.__setattr__(self, "steps", steps_tuple)
        object.__setattr__(self, "step_timeout", float(step_timeout))
        object.__setattr__(self, "hang_up_at_end", bool(hang_up_at_end))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Script is immutable")

    def __copy__(self) -> Script:
        return self  # (immutable: a copy would be the same value)

    def __deepcopy__(self, memo: dict[int, Any]) -> Script:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (_script, (self.steps, self.step_timeout, self.hang_up_at_end))

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        steps = ", ".join(step.describe() for step in self.steps)
        return f"Script([{steps}], step_timeout={self.step_timeout}, hang_up_at_end={self.hang_up_at_end})"


def _script(steps: tuple[Step, ...], step_timeout: float, hang_up_at_end: bool) -> Script:
    """A :class:`Script` rebuilt from its parts (how a pickled one comes back)."""
    return Script(steps, step_timeout=step_timeout, hang_up_at_end=hang_up_at_end)


def wait_for_greeting(text: str = "Hello, thanks for calling.") -> WaitForGreeting:
    """Wait for the controller's ``response.create`` (its greeting) and speak ``text``."""
    return WaitForGreeting(text)


def caller_says(
    text: str, *, seconds: float | None = None, cut_in: bool = False, untranscribed: bool = False
) -> CallerSays:
    """The caller says ``text``; server VAD then starts the next model step by itself.

    ``seconds``: how long the caller speaks, from ``input_audio_buffer.speech_started`` to
    ``speech_stopped`` (by default they follow each other at once), so a controller's behaviour while the
    caller is mid-utterance can be tested. ``cut_in=True``: the caller does not wait for the model's audio
    to finish playing (see ``Simulator(playback_rate=…)``) but speaks over it, and the server clears it
    (``output_audio_buffer.cleared``), as on a barge-in; a response still streaming is cancelled either
    way (``turn_detected``). ``untranscribed=True``: where the session transcribes the caller, the
    transcription fails (``conversation.item.input_audio_transcription.failed``, as when the project may
    not use the transcription model); the model still hears the words.

    With the session's turn detection off (``turn_detection: null``), nobody listens for speech, as on the
    real service: the server sends nothing (no VAD events, no commit, no user item, no barge-in) and the
    caller's words wait in the input buffer until the controller sends ``input_audio_buffer.commit``;
    then they become one user item (with what else the caller said since the last commit), transcribed
    at once if the session transcribes. ``input_audio_buffer.clear`` drops them. The next response
    step waits for the controller's ``response.create``."""
    if seconds is not None and not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError("seconds must be a non-negative number")
    return CallerSays(text, None if seconds is None else float(seconds), cut_in, untranscribed)


def model_says(text: str) -> ModelSays:
    """The model speaks ``text`` in one response."""
    return ModelSays(text)


def model_answers(text: str) -> ModelSays:
    """The model speaks ``text`` in answer to the controller's next ``response.create`` (a ``say()``, the
    answer after an interrupted reply…): the step waits for it, where :func:`model_says` speaks at once
    unless a create is pending."""
    return ModelSays(text, asked=True)


def model_says_first(text: str) -> ModelSays:
    """The model answers the caller by itself (server VAD) in a response that starts just as the
    controller's next ``response.create`` arrives, as when the two cross on the wire: the step waits for
    that create, starts its own response, then refuses the create
    (``conversation_already_has_active_response``). The response is the server's own: it carries none of
    the create's ``metadata``."""
    return ModelSays(text, first=True)


def model_fails() -> ModelSays:
    """The next response ends ``failed`` before a word is said (``status_details.error``: a
    ``server_error``), as when the service errs mid-call. Like a spontaneous one, it answers the
    controller's ``response.create`` if one is pending; afterwards the model says nothing more until
    asked: the next response step waits for the controller's ``response.create``."""
    return ModelSays("", failed=True)


def _encode_arguments(arguments: Mapping[str, Any] | str) -> str:
    if isinstance(arguments, str):
        return arguments
    if isinstance(arguments, Mapping):
        return json.dumps(dict(arguments), separators=(",", ":"), ensure_ascii=False)
    raise TypeError(f"function call arguments must be a dict or a str, not {type(arguments).__name__}")


def model_calls(
    name: str | Sequence[tuple[str, Mapping[str, Any] | str]],
    arguments: Mapping[str, Any] | str | None = None,
    *,
    call_id: str | None = None,
    preamble: str | None = None,
    status: ResponseStatus = "completed",
    await_outputs: bool = True,
    arguments_cut: bool = False,
    undeclared: bool = False,
) -> ModelCalls:
    """The model calls one function (``model_calls("lookup", {"id": 1})``) or several in parallel
    (``model_calls([("a", {...}), ("b", {...})])``).

    ``arguments``: a dict is sent as compact JSON, a str verbatim (so malformed or pretty-printed arguments
    can be tested). ``preamble`` adds a spoken message before the call(s) in the same response.
    ``status`` sets the ``response.done`` status; for ``"cancelled"``/``"failed"`` the step does not wait
    for outputs (the calls' items end ``incomplete``). ``"incomplete"`` is a response cut short (say, by
    ``max_output_tokens``) after the calls were written whole: their items end ``completed``, so they
    run, and the step waits for their outputs as for ``"completed"``. ``arguments_cut=True`` (with
    ``status="incomplete"`` only) cuts the response inside the last call's arguments: only their first
    half is written and its item ends ``incomplete``, so a controller must not run it; the step does not
    wait for outputs. ``await_outputs=False``: the script goes on once the response is done, while the
    tools run (the caller speaks meanwhile, say); the model answers the outputs at the next response step.

    As on the real service, the model calls only the tools in effect for its response: the session's
    ``tools`` and ``tool_choice``, or those of the ``response.create`` it answers. A call to another
    (or any call under ``tool_choice: "none"``, or to another tool than a forced one) fails the script
    at this step, naming the tools in effect. ``undeclared=True`` lets the model call tools nobody
    declared, to test a call to a tool that was withdrawn or never existed (a model's hallucination).
    """
    if status not in _RESPONSE_STATUSES:
        raise ValueError(f"status must be one of {_RESPONSE_STATUSES}, not {status!r}")
    if arguments_cut and status != "incomplete":
        raise ValueError('arguments_cut needs status="incomplete" (a response cut short)')
    specs: list[FunctionCallSpec]
    if isinstance(name, str):
        if arguments is None:
            arguments = {}
        specs = [FunctionCallSpec(name, _encode_arguments(arguments), call_id)]
    else:
        if arguments is not None or call_id is not None:
            raise TypeError("with a list of calls, give no separate arguments or call_id")
        specs = [FunctionCallSpec(n, _encode_arguments(a)) for n, a in name]
        if not specs:
            raise ValueError("model_calls needs at least one call")
    for spec in specs:
        if not spec.name:
            raise ValueError("a function call needs a name")
        if spec.call_id is not None and not spec.call_id:
            raise ValueError("call_id may not be empty")
    if arguments_cut:
        specs[-1] = replace(specs[-1], cut=True)
    return ModelCalls(tuple(specs), preamble, status, await_outputs, undeclared)


def caller_presses(digits: str) -> CallerPresses:
    """The caller presses DTMF ``digits`` (``0-9``, ``*``, ``#``, ``A-D``), one event per digit.

    SIP calls only, as on the real service (``input_audio_buffer.dtmf_event_received`` never comes on a
    WebRTC call): on a WebRTC call the step fails the script (:class:`~sideband.testing.ScriptError`
    from ``wait_done()``, naming the step) rather than send what the real service never would."""
    bad = sorted(set(digits) - _DTMF_DIGITS)
    if not digits or bad:
        raise ValueError(f"not DTMF digits: {digits!r}")
    return CallerPresses(digits)


def pause(seconds: float) -> Pause:
    """Nothing happens for ``seconds`` (a finite, non-negative number)."""
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError("pause needs a non-negative number of seconds")
    return Pause(float(seconds))


def caller_hangs_up(mode: HangupMode = "clean") -> CallerHangsUp:
    """The caller hangs up. ``mode``: ``"clean"`` closes the sideband with 1000, ``"going_away"`` with
    1001 (both seen on the real service), ``"abnormal"`` drops the TCP connection without a close frame,
    ``"silent"`` sends nothing and leaves the socket open (the controller must notice by its own idle
    timer). The call ends either way. The step first waits (up to the step timeout) for a sideband to be
    attached, so the hangup is seen on it."""
    if mode not in _HANGUP_MODES:
        raise ValueError(f"mode must be one of {_HANGUP_MODES}, not {mode!r}")
    return CallerHangsUp(mode)
