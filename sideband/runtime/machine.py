"""The call state machine: events in, actions out. No I/O, no clock, no asyncio.

The driver feeds it server events, tool results, timer expiries and transport closes, and carries
out the actions it returns, in order. Provider differences are data (:class:`Capabilities`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from sideband.jsonio import loads
from sideband.session import session_update

__all__ = [
    "Action",
    "CallMachine",
    "CancelTimer",
    "CancelTool",
    "Capabilities",
    "Close",
    "MachineConfig",
    "Notice",
    "RunTool",
    "Send",
    "StartTimer",
    "Verb",
    "Withdraw",
]


# ---------------------------------------------------------------------------------------- actions
@dataclass(frozen=True, slots=True)
class Send:
    """Send this client event on the socket."""

    event: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RunTool:
    """Start executing a tool call (exactly once per ``call_id``)."""

    call_id: str
    name: str
    arguments: str
    response_id: str | None = field(default=None, compare=False)
    """The response that made the call, when known."""


@dataclass(frozen=True, slots=True)
class CancelTool:
    """Cancel a running tool call; its output will not be sent."""

    call_id: str


@dataclass(frozen=True, slots=True)
class StartTimer:
    """(Re)start the named timer; :meth:`CallMachine.timer` is fed its name when it fires."""

    name: str
    delay: float


@dataclass(frozen=True, slots=True)
class TimerBy:
    """Make the named timer, if it runs, fire no later than the wall-clock time ``at`` (epoch seconds)."""

    name: str
    at: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    """Stop the named timer if it runs."""

    name: str


@dataclass(frozen=True, slots=True)
class Verb:
    """Call the call-control verb (``hangup`` or ``refer``); report with :meth:`CallMachine.verb_done`."""

    verb: Literal["hangup", "refer"]
    target: str | None = None


@dataclass(frozen=True, slots=True)
class Close:
    """The call is over: close the socket, cancel and await tools and timers."""

    reason: str


@dataclass(frozen=True, slots=True)
class Notice:
    """Something to log or hand to user hooks (``event`` is the log event name)."""

    event: str
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Withdraw:
    """Drop our queued frame with this ``event_id``: it never left for a lost socket, and is not wanted on
    the new one (see :meth:`CallMachine.reattached`)."""

    event_id: str


Action = Send | RunTool | CancelTool | StartTimer | TimerBy | CancelTimer | Verb | Close | Notice | Withdraw


# ----------------------------------------------------------------------------------------- config
DEFAULT_FILLER = (
    "Briefly tell the caller you are still working on it. One short sentence. Do not call any tool."
)
DEFAULT_GOODBYE = "Say a short, polite goodbye to the caller. Do not call any tool."
DEFAULT_STILL_THERE = (
    "The caller has said nothing for a while. Ask briefly whether they are still there. Do not call any tool."
)
DEFAULT_GUARDRAIL_NOTE = (
    "Your last reply broke a rule of this service and was cut off; the caller may have heard part of it. "
    "Do not repeat it. Continue helping the caller within the rules."
)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the far side does; the machine never branches on a provider name."""

    session_created_first: bool = False
    """The server opens with ``session.created`` and wants ``session.update`` only after it (vowel)."""
    call_verbs: bool = True
    """hangup/refer exist (OpenAI SIP and WebRTC); otherwise ending means closing the socket."""
    audio_playback_events: bool = True
    """``output_audio_buffer.started`` / ``stopped`` (played out) / ``cleared`` (the caller cut in) tell when
    the caller stops hearing the model."""
    responds_to_user_text: bool = False
    """The server starts a response by itself after a user text item (vowel); otherwise we ask for one."""
    resumable: bool = True
    """A lost socket can be re-attached to the same session (OpenAI by ``call_id``); otherwise a lost
    socket ends the call (``connection_lost``)."""
    close_reasons: Mapping[int, str] = field(default_factory=dict)
    """Close codes that end the call at once, with the reason to report (e.g. ``{1011: "engine_error"}``)."""
    nested_audio: bool = True
    """Voice, speed and turn detection live in the session's ``audio`` object (OpenAI); otherwise at its
    top level (vowel): where :meth:`CallMachine.update_session` puts ``voice=`` and the like."""
    reused_call_ids: bool = False
    """A call id may come back in a later response as a new call (an engine passing on ids the model made
    up: ``call_1`` every turn), which waits for its output; otherwise a call id is run once, ever."""
    idle_after_answers: bool = True
    """The idle limit counts the caller's silence from the end of the model's last answer (and its
    playback), and never runs out while the model speaks or a tool works; otherwise (vowel, whose engine
    counts idle time from the caller's last speech and acts on it) from the caller's last activity alone,
    to stay ahead of the engine's limit."""
    session_expires_at: bool = True
    """The session object's ``expires_at`` (epoch seconds) is when the server cuts the session (OpenAI: 60
    minutes from its start): the call-duration limit's goodbye comes :data:`BEFORE_THE_CUT` seconds
    before it at the latest, however late the sideband attached."""
    speaks_over_tools: bool = True
    """A ``response.create`` may go out while a tool's output is still due, to say something meanwhile
    (OpenAI), and a call discarded with its response (cancelled, failed) gets no output; otherwise (vowel:
    the engine waits for every output of the calls it announced) a ``say()``, or any create asked for
    again, waits for the outputs, and a discarded call is answered with an error saying it did not run,
    before the next ``response.create``."""
    tags_responses: bool = True
    """``response.create`` takes ``response.metadata``, which the server echoes on the response it starts
    (OpenAI): our creates carry their event id there, which names the create a response answers; once a
    response has come back tagged, one without a tag, starting while the server has a caller's turn to
    answer by itself, is its own answer, even while a create of ours is on its way (see
    :meth:`CallMachine._answered_create`). Otherwise the next response to start after our create is taken
    for ours."""


@dataclass(frozen=True, slots=True)
class MachineConfig:
    """Per-call policy, resolved from the app, the route and the settings before the call starts."""

    session: dict[str, Any]
    greeting: str | None = None
    filler_after: Mapping[str, float | None] = field(default_factory=dict)
    quiet: frozenset[str] = frozenset()
    """Tools whose successful output the model is not asked to answer when the response that called them
    spoke (``@app.tool(respond=False)``): its words came as a line of the transcript, or its
    ``response.done`` lists a message. The output goes into the conversation for the model's next turn."""
    filler_instructions: str = DEFAULT_FILLER
    goodbye_instructions: str = DEFAULT_GOODBYE
    idle_prompts: int = 0
    """How many times a silent caller is asked whether they are still there (each after a full idle
    period) before the idle limit's goodbye."""
    idle_prompt_instructions: str = DEFAULT_STILL_THERE
    guardrail_note: str = DEFAULT_GUARDRAIL_NOTE
    """The system message added to the conversation when an output guardrail stops a reply (the rule's
    reason follows it), before the model answers again."""
    max_call_duration: float | None = None
    max_idle_duration: float | None = None
    speech_idle_duration: float | None = None
    """A second idle limit, counted from the caller's last speech alone and only once some was heard: the
    far side's own idle limit, less a margin (the vowel engine starts its idle clock at each start of
    speech its own detection finds, and text, keys or the model's answers restart none of it). Once the
    server reports the caller's speech (``input_audio_buffer.speech_started``), the clock runs from its
    last report alone: the engine says so as its clock starts, and sound it takes for no speech (a noisy
    line) restarts none of it, however loud. Before any report, sound in the audio a backend streams
    (:meth:`CallMachine.caller_active`) restarts it. Its end is the idle limit's (``idle_timeout``), which
    only the caller's speech then withdraws."""
    max_tool_calls: int = 64
    max_identical_calls: int = 3
    end_cap: float = 10.0
    """Longest wait for in-flight tools and the model's last words before hangup/refer."""
    transfer_confirm: float = 45.0
    """After a refer's 200 (the REFER was handed to the SIP provider: nothing tells how the transfer went),
    how long the call waits for the server to end it (close the sideband, or refuse its re-attach after a
    drop) before taking the transfer as failed: ``call.transfer_unconfirmed``, a hangup, and the end
    reason ``transfer_failed``. A re-attach meanwhile does not start it again."""
    reattach_grace: float = 2.0
    """After a re-attach, how long to wait for the ``response.done`` of a response whose tool calls were
    announced on the lost socket before treating those calls as interrupted, for the acknowledgements of
    our outputs before sending them again, and for the response of our create that left for the lost
    socket before asking for it again (see :meth:`CallMachine.reattached`)."""


SPEECH_CAP = 15.0
"""Longest a caller's utterance (``input_audio_buffer.speech_started`` until ``speech_stopped``) holds back
what the sideband would start: a ``speech_stopped`` lost or never sent must not mute the call."""

TURN_GRACE = 1.0
"""After the caller stopped speaking, how long what the sideband would start (the response that speaks
tool outputs, a ``say()``, a goodbye…) waits for the server's own answer to the caller's turn, which
speaks the outputs it has seen (see :meth:`CallMachine._on_response_created`)."""

CORRECTIONS = 2
"""Replies stopped by output guardrails that the model is asked to say again, per caller turn: a model that
keeps breaking the rule is then stopped and left silent until the caller speaks (no loop of cut replies)."""

OUTPUT_RESENDS = 3
"""Times a tool output still unacknowledged after a re-attach is sent again, at most (once after each
re-attach): an output the server never takes is then given up (``tool.output_lost``)."""

BEFORE_THE_CUT = 60.0
"""Seconds before the server cuts the session that the call-duration goodbye starts at the latest (the
default limit, 3540 s, leaves as much of OpenAI's 60 minutes)."""

_IDLE = "idle"
_SPEECH_IDLE = "speech_idle"
_MAX_DURATION = "max_duration"
_END_CAP = "end_cap"
_TRANSFER = "transfer"
_ORPHANS = "orphans"
_OUTPUT_EVENT = "sb_output_"
_CREATE_EVENT = "sb_create_"
_TAG = "sideband"
"""The ``response.metadata`` key our creates carry their event id in."""
_CANCEL_EVENT = "sb_cancel_"
_UPDATE_EVENT = "sb_update_"  # our session.update events (an error names the one it refuses)
_UPDATES_KEPT = 64  # session.update events of ours a refusal may still name, at most (the last ones)
_FILLER = "filler:"
_GREETING = "greeting"
_GREETING_AGAIN = "greeting_again"
_GOODBYE = "goodbye"
_IDLE_TIMEOUT = "idle_timeout"
_SPEAKING = "speaking"
_TURN = "turn"

_RUNNABLE = frozenset({"completed", "incomplete"})
_DEFAULT: Any = object()  # a setting left to the server's default
_ABSENT: Any = object()  # a field no update of code's had set
_APART = frozenset({("model",), ("voice",), ("audio", "output", "voice")})
"""Fields a re-attach sends again each in an update of its own: once the model has spoken, the server
refuses a whole update that changes one (another's change of it, a WebRTC page's, would sink the rest)."""
_NO_TOOLS: Mapping[str, Any] = MappingProxyType({"tool_choice": "none"})
"""The response a loop breaker's refusals are answered with: words, no more tool calls."""
STOPPED_OUTPUT = json.dumps(
    {
        "error": "reply_stopped",
        "message": "Not run: the reply that made this call broke a rule of this service and was stopped. "
        "Call the tool again if it is still needed and allowed.",
    }
)
"""The output of a tool call whose reply an output guardrail stopped: the call was not run."""
_NOT_RUN: Mapping[str, str] = MappingProxyType(
    {
        "reply_stopped": STOPPED_OUTPUT,
        "response_ended": json.dumps(
            {
                "error": "not_run",
                "message": "Not run: the reply that made this call was cut off before it ended. "
                "Call the tool again if it is still needed.",
            }
        ),
        "arguments_cut": json.dumps(
            {
                "error": "not_run",
                "message": "Not run: the reply that made this call was cut off before its arguments were "
                "whole. Call the tool again if it is still needed.",
            }
        ),
        "call_ending": json.dumps({"error": "not_run", "message": "Not run: the call is ending."}),
    }
)
"""The output of a discarded call, by the reason it was discarded, for a server that waits for every
output of the calls it announced (see :attr:`Capabilities.speaks_over_tools`)."""
_INTERRUPTED = json.dumps(
    {
        "error": "interrupted",
        "message": "The connection dropped before this tool call could run; it did not run. "
        "Call the tool again if it is still needed.",
    }
)


@dataclass(slots=True)
class _ToolCall:
    call_id: str
    name: str
    response_id: str | None
    arguments: str | None = None
    state: Literal["pending", "running", "answered", "discarded"] = "pending"
    complete: bool = False  # its arguments are known whole (arguments.done, or an item "completed")
    quiet: bool = False  # its output asks for no answer (a quiet tool, its response spoke, it succeeded)


@dataclass(slots=True)
class _End:
    reason: str
    verb: Literal["hangup", "refer"] | None
    target: str | None
    goodbye: str | None  # the goodbye still to ask for
    parting: bool = False  # the end says a goodbye of its own (a limit's)
    withdrawable: bool = False  # the caller's return withdraws it (the idle limit's: see _caller_back)
    by_speech: bool = False  # the speech idle limit ran out too: only the caller's speech withdraws it
    verb_sent: bool = False
    referred: bool = False  # the refer was answered 200: the server's close of the sideband ends the call
    lost: bool = False  # the socket was lost once the verb was out (it is not re-attached)
    gone: bool = False  # the server ended the call meanwhile (a hangup that fails is no sign it is up)
    # Why nothing will watch the transfer our unanswered REFER starts (its sideband could not be attached
    # again, ``sideband_lost``; a drain, ``shutdown``): its 200 hangs the call up at once
    unwatched: str | None = None
    held: bool = False  # a re-attach happened meanwhile: the server's state shows itself first
    says: int = 0  # say() requests queued before the end was asked for: spoken before its verb
    byes: int = 0  # goodbyes asked for (one cut off is asked for once more: see _goodbye_cut)
    said: object = None  # the last goodbye's response, once it ended: its audio may still play


def _json_text(value: Any) -> str:
    """Arguments that came as JSON values rather than text, as text (what cannot be written: ``null``)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return "null"


_UNREAD: Any = object()  # the last call's arguments, not parsed yet
_NOT_JSON: Any = object()  # arguments that are not JSON


def _json_value(arguments: str) -> Any:
    """A call's arguments as a JSON value (:data:`_NOT_JSON` for text that is not JSON)."""
    try:
        return loads(arguments)
    except ValueError:
        return _NOT_JSON


def _same_json(a: Any, b: Any) -> bool:
    """Whether two JSON values are the same to a tool, however the model wrote them: objects whatever
    their keys' order, numbers by value (``1`` and ``1.0``); ``true`` and ``false`` are no numbers."""
    if a.__class__ is bool or b.__class__ is bool:
        return a is b
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and len(a) == len(b)
            and all(k in b and _same_json(v, b[k]) for k, v in a.items())
        )
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same_json, a, b))
    return not isinstance(b, dict | list) and bool(a == b)


def _tool_name(item: dict[str, Any]) -> str:
    """The name of the tool a call asks for; a name longer than any tool's can be (OpenAI's are at most
    64 characters) is cut short: it names no tool either way, and it is logged and shown to the model."""
    name = str(item.get("name") or "")
    return name if len(name) <= 128 else name[:127] + "…"


def _output(call_id: str, output: str) -> dict[str, Any]:
    return {
        "type": "conversation.item.create",
        "item": {"type": "function_call_output", "call_id": call_id, "output": output},
    }


class CallMachine:
    """One call's protocol logic. Every public method returns the actions to carry out, in order."""

    __slots__ = (
        "_agent_lines",
        "_answer_due",
        "_answered_total",
        "_calls",
        "_cancel_next",
        "_closed",
        "_corrections",
        "_covered_by",
        "_create_sent",
        "_created_for",
        "_crossed",
        "_cut_response",
        "_done_since_create",
        "_end",
        "_failed_in_row",
        "_filler_due",
        "_filler_spoken",
        "_greeted",
        "_heard",
        "_held",
        "_idle_due",
        "_idle_waited",
        "_last_error",
        "_last_line_response",
        "_last_signature",
        "_last_value",
        "_live",
        "_lost",
        "_nudged",
        "_orphans",
        "_ours",
        "_outputs_before",
        "_play_overdue",
        "_play_unsure",
        "_playing",
        "_prompt",
        "_prompt_due",
        "_prompt_items",
        "_queued_say",
        "_reasked",
        "_recent_creates",
        "_repeat",
        "_replay",
        "_resend",
        "_response_active",
        "_retry",
        "_running",
        "_seq",
        "_session_id",
        "_session_ready",
        "_socket",
        "_speaking",
        "_speech_capped",
        "_speech_reported",
        "_started",
        "_stopped_reply",
        "_tagged",
        "_text_out",
        "_text_owed",
        "_text_unseen",
        "_text_wait",
        "_turn_items",
        "_turn_wait",
        "_unacked",
        "_unanswered",
        "_updated",
        "_updates",
        "_updates_held",
        "_updates_sent",
        "_want_response",
        "_without_tools",
        "caller_turns",
        "caps",
        "config",
        "responding",
    )

    def __init__(self, config: MachineConfig, caps: Capabilities | None = None) -> None:
        self.config = config
        self.caps = caps or Capabilities()
        self._calls: dict[str, _ToolCall] = {}
        self._running = 0
        self._answered_total = 0
        # the last tool call run (name, arguments as written) and its arguments' JSON value, parsed only
        # once a call of the same name is written otherwise (see _run)
        self._last_signature: tuple[str, str] | None = None
        self._last_value: Any = _UNREAD
        self._repeat = 0
        self._response_active = False
        self._unanswered = False  # the caller stopped speaking, and no audio of the model's started since
        self._nudged = 0  # times the silent caller was asked whether they are still there
        self.responding: str | None = None
        """The id of the response under way, if any (as the server announced it)."""
        self.caller_turns = 0
        """How many times the caller began to speak."""
        self._create_sent: str | None = None  # event_id of our response.create not yet seen created
        # That create, when it left for a socket since lost (with the response under way then), until the
        # new socket shows it arrived or the re-attach grace ends (see reattached)
        self._lost: tuple[str, object] | None = None
        # That create, once asked for again (see _ask_again), and the body of its copy owed (None: a plain
        # create, owed as _want_response), until a response starts: the lost one's, which drops the copy,
        # or another, after which the lost one can no longer show
        self._reasked: tuple[str, dict[str, Any] | None] | None = None
        self._cancel_next: str | None = None  # event_id of our create to cancel as it starts (interrupt)
        self._corrections = 0  # replies stopped by a guardrail and asked for again since the caller's turn
        self._stopped_reply: object = None  # the last reply a guardrail stopped (see correct)
        # the create the last response.created was taken to answer: it may have been the caller's turn
        # (server VAD), and a refusal that names no event then means that create
        self._created_for: str | None = None
        self._done_since_create = False  # a response.done arrived since our last create went out
        self._ours: tuple[str, str] | None = None  # (response id, create event_id) of ours that runs
        self._tagged = False  # a response came back with our create's tag: the server echoes them
        self._failed_in_row = 0  # responses that ended failed since the last completed one
        # event_id → (body, tag), the last few; the tag says what a create was for: the greeting, a
        # filler ("filler:<call_id>"), the end's goodbye, or None for anything that stays owed until it
        # is answered.
        self._recent_creates: dict[str, tuple[dict[str, Any], str | None]] = {}
        # refused creates (or ones that never left for a lost socket) to send again, first first; a plain
        # create among them is owed as _want_response instead
        self._retry: tuple[tuple[dict[str, Any], str | None], ...] = ()
        self._want_response = False
        self._without_tools = False  # the next plain create follows a loop breaker: no tools in it
        self._turn_items: tuple[object, ...] = ()  # the caller's last input items whose speech began a turn
        self._idle_waited = False  # the idle limit came due once while the model or a tool was busy
        # The server's own prompts to a silent caller (server VAD's idle_timeout_ms): one is announced
        # (input_audio_buffer.timeout_triggered) until its response starts; then that response's id, until
        # the caller is heard or another response starts. Neither restarts the idle limit, which, come due
        # while the prompt is said, waits for its last word.
        self._prompt_due = False
        self._prompt: object = None
        self._prompt_items: tuple[object, ...] = ()  # the silences committed for the last prompts
        self._idle_due = False
        self._heard: object = None  # the response whose audio started last
        self._filler_spoken = False
        self._answer_due = False  # a finished tool of the running ones asks for an answer
        self._filler_due = False  # a filler came due while the line was not quiet
        self._speaking = False  # the caller is mid-utterance (speech_started, no speech_stopped yet)
        self._speech_capped = False  # SPEECH_CAP ended the utterance before its speech_stopped came
        # Code's text went out to a server that answers it by itself, and it has not shown it took it yet
        # (its item, or a response): the caller's speech it reports meanwhile is of audio sent before the
        # text (see _on_caller_activity).
        self._text_out = False
        self._text_wait = False  # the wait for a turn's answer (_turn_wait) is code's text's alone
        # Code's text went out (to OpenAI), not known to be taken yet: the sequence number of our events
        # before it (a create of ours after it that starts says the server has taken it: in order).
        self._text_unseen: int | None = None
        self._speech_reported = False  # the server reports the caller's speech (speech_started)
        self._turn_wait = False  # the caller's speech ended: the server's answer to it may be on its way
        self._covered_by: object = None  # the server's answer to a turn, taken to answer our outputs too
        # (that answer, and our plain create it crossed on the wire: refused for it, it is not asked again)
        self._crossed: tuple[object, str] | None = None
        self._text_owed = False  # code's user text awaits its answer (no acknowledgement tells it arrived)
        self._queued_say: list[str] = []
        self._playing = False
        # the model's audio was playing when the socket was lost, and nothing on the new one has shown
        # it since: it plays on until its stop shows, or the re-attach grace ends
        self._play_unsure = False
        self._play_overdue = False  # the grace ended while a response ran: its end settles it
        self._agent_lines: set[tuple[str, str]] = set()  # (response, item) of the lines reported
        self._last_line_response: object = None  # the response the agent's last transcript line is of
        self._cut_response: object = None  # the response whose audio the caller cut off, its line unseen
        self._greeted = False
        self._live = False  # our session.update went out (vowel: was confirmed); code may send now
        self._held: tuple[Action, ...] = ()  # sends asked for by code before that
        # what code's session.updates set, field by field (the last value of each), replayed after a
        # re-attach: ("instructions",) → "…", ("audio", "output", "voice") → "cedar"…
        self._updated: dict[tuple[str, ...], Any] | None = None
        # Our last session.update events on this socket, in the order they went out (a refusal names one; a
        # session.updated does not say whose update it answers: a browser's, on a WebRTC call, too): each
        # one's event_id and, for code's, the value each field it sets had before it (_ABSENT: none),
        # which a refusal puts back; None when there are none
        self._updates: list[tuple[str, dict[tuple[str, ...], Any] | None]] | None = None
        self._updates_sent = 0  # (their event_ids)
        self._updates_held: tuple[tuple[str, dict[tuple[str, ...], Any] | None], ...] = ()  # (with _held)
        # code's updates to send again after a re-attach, each with its fields' values before it
        self._replay: tuple[tuple[dict[str, Any], dict[tuple[str, ...], Any]], ...] = ()
        self._orphans: tuple[str, ...] = ()  # calls announced on a lost socket, their response unfinished
        # call_id → our function_call_output the server has not acknowledged yet, how many times it was
        # sent again after a re-attach, and the socket it last went out on (None when empty)
        self._unacked: dict[str, tuple[dict[str, Any], int, int]] | None = None
        self._socket = 0  # the sockets attached since the first (which one our frames go out on)
        # our last create, and our outputs unacknowledged that went out before it on the same socket: a
        # response it started shows they arrived too (their acknowledgements may have been lost)
        self._outputs_before: tuple[str, frozenset[str]] | None = None
        self._resend: tuple[str, ...] = ()  # of those, the ones unacknowledged when a socket was lost
        self._started = False
        self._session_ready = False
        self._session_id: str | None = None
        self._last_error: dict[str, Any] | None = None
        self._end: _End | None = None
        self._closed: str | None = None
        self._seq = 0

    # ------------------------------------------------------------------------------ properties
    @property
    def closed(self) -> str | None:
        """The end reason once :class:`Close` was emitted."""
        return self._closed

    @property
    def verb_sent(self) -> bool:
        """The end's hangup/refer went out: nothing more is started or said."""
        return self._going

    @property
    def referring(self) -> bool:
        """Our REFER is out, unanswered so far."""
        end = self._end
        return (
            end is not None
            and end.verb == "refer"
            and end.verb_sent
            and not end.referred
            and self._closed is None
        )

    @property
    def transferring(self) -> bool:
        """The refer was answered (handed to the SIP provider) and the call waits for the server to end
        it: the sideband's close says the transfer took (see :meth:`verb_done`)."""
        end = self._end
        return end is not None and end.referred and end.verb == "refer" and self._closed is None

    @property
    def ending(self) -> bool:
        """A hangup/transfer/limit end has been requested."""
        return self._end is not None

    @property
    def session_ready(self) -> bool:
        """``session.updated`` has been seen since the last (re)attach."""
        return self._session_ready

    @property
    def session_id(self) -> str | None:
        """The server's session id, from the last ``session.created`` that carried one."""
        return self._session_id

    @property
    def last_error(self) -> Mapping[str, Any] | None:
        """The last server ``error`` not followed by a completed response: the ``sideband.error`` notice's
        code, error_type, message and param."""
        return self._last_error

    @property
    def response_owed(self) -> bool:
        """A response is active, our ``response.create`` is unanswered, or one will be asked for (once
        running tools finish, a refused create to send again, a queued :meth:`say`)."""
        return self._busy or self._want_response or bool(self._retry) or self._say_owed

    @property
    def busy(self) -> bool:
        """A tool runs, or a response is under way or owed (:attr:`response_owed`)."""
        return bool(self._running) or self.response_owed

    @property
    def _say_owed(self) -> bool:
        """A :meth:`say` is queued that is still to be spoken: any before the call's end is asked for,
        then those queued before it."""
        return bool(self._queued_say) and (self._end is None or self._end.says > 0)

    @property
    def awaiting_acks(self) -> bool:
        """Some of our tool outputs are not acknowledged yet (drivers must then decode ``ACK_TYPES``)."""
        return self._unacked is not None

    def tool_name(self, call_id: str) -> str:
        """The name of tool call ``call_id`` (empty if unknown)."""
        call = self._calls.get(call_id)
        return call.name if call is not None else ""

    # ---------------------------------------------------------------------------------- inputs
    def start(self) -> list[Action]:
        """The socket is open (first attach)."""
        actions: list[Action] = []
        if not self._started:
            self._started = True
            if self.config.max_call_duration:
                actions.append(StartTimer(_MAX_DURATION, self.config.max_call_duration))
            if self.config.max_idle_duration:
                actions.append(StartTimer(_IDLE, self.config.max_idle_duration))
        return actions + self._attached()

    def reattached(self, queued: Collection[str] = ()) -> list[Action]:
        """A new socket replaced a lost one: same call, same state, no second greeting.

        ``queued`` names (by ``event_id``) the frames still queued for the new socket: they never left
        for the lost one, and go out first on the new one, in order. Our tool outputs among them are not
        sent a second time. Our ``response.create`` among them is the one the machine now waits on, in its
        place in the queue, unless it is withdrawn (:class:`Withdraw`): a filler once no tool of its
        response runs (its "still working on it" would come after the answer), anything once the end's
        verb is out, and a create answering outputs while others may have to be sent again (one create
        then follows them all).

        Tool calls announced on the lost socket whose ``response.done`` never arrived are *orphans*: their
        response may still be running (its ``response.done`` then arrives on the new socket and they run,
        or are discarded, as usual) or may have ended while no socket was attached, and then nothing will
        ever settle them. An orphan still unsettled ``reattach_grace`` seconds later is not run — its
        response may have been cancelled, and a call runs at most once and only for a finished response —
        but answered with an ``interrupted`` error output (``tool.interrupted`` notice), and one
        ``response.create`` follows: the model carries on (and calls the tool again if it still needs it)
        instead of leaving the caller in silence.

        Our tool outputs the server had not acknowledged when the socket was lost may have been lost with
        it (a dead connection swallows what is written to it), or their acknowledgement may still come: the
        server holds it back while a response runs. Those still unacknowledged after the same grace, at a
        moment no response runs, are sent again, and one ``response.create`` follows. Each stays kept
        until it is acknowledged: the socket it went out on again may be lost too, and the next re-attach
        sends it once more, up to :data:`OUTPUT_RESENDS` times in all (one the server never takes is then
        given up: ``tool.output_lost``).

        Our ``response.create`` that had left for the lost socket, unanswered, may have been lost with it
        (the greeting, the answer to outputs acknowledged already, a :meth:`say`, the end's goodbye). The
        machine waits on it as before (nothing of ours crosses it) until the new socket shows it arrived:
        the response it started, by its ``response.created`` or, when that went to the lost socket, its
        ``response.done`` (each tagged with the create). Nothing of it within the same grace: it is
        asked for again, once (``response.lost``), as the rules for any create say (never over the
        caller, never while a response runs; a greeting not once the caller has spoken, a filler not once
        its tools are done); one that :meth:`interrupt` cancelled is not. Its response may still show
        after that (it ran on past the grace): the copy is then dropped, or, on its way, cancelled as it
        starts (see :meth:`_drop_copy`).

        The model's audio that was playing when the socket was lost plays on, for the idle limit and for
        the end's verb, until its stop shows on the new socket or the same grace ends.

        The server keeps the call's session: our session config goes again without the fields code's
        updates set, and those updates follow as :meth:`_to_replay` says.

        A transfer awaited after its refer's 200 (:attr:`transferring`) is attached again too (the socket
        may have dropped while the carrier still carries the transfer out): only the session config goes
        on the new socket, nothing of ours starts there (the end's verb is out), and the transfer's window
        goes on, its timer not started again. The new socket's close, or the re-attach refused as the
        call is gone (:meth:`fail` ``call_not_found``), ends the call ``transferred``.
        """
        sent = self._create_sent
        lost = None if sent is None or sent in queued or self._going else (sent, self.responding)
        self._response_active = self._speaking = self._turn_wait = self._unanswered = False
        self._speech_capped = self._text_out = self._text_wait = False
        self._create_sent = self._created_for = self._covered_by = self._ours = self.responding = None
        self._crossed = self._text_unseen = None
        queued_outputs = {e[len(_OUTPUT_EVENT) :] for e in queued if e.startswith(_OUTPUT_EVENT)}
        self._resend = tuple(c for c in self._unacked or () if c not in queued_outputs)
        self._socket += 1
        unacked = self._unacked or {}
        for call_id in queued_outputs & unacked.keys():
            event, resends, _ = unacked[call_id]  # (it goes out on the new socket)
            unacked[call_id] = (event, resends, self._socket)
        before = self._outputs_before
        if before is not None and before[0] in queued:  # (it goes out on the new socket: after those)
            self._outputs_before = (
                (before[0], before[1] & queued_outputs) if before[1] & queued_outputs else None
            )
        self._orphans = tuple(c.call_id for c in self._calls.values() if c.state == "pending")
        if self._going:
            self._resend, self._orphans = (), ()  # the call is going: nothing more to say
        end = self._end
        ending = end is not None and not end.verb_sent
        # Playback that had started counts as playing (the line is not idle, the end's verb waits) until
        # its stop arrives or the grace ends: the stop may have gone out while no socket was attached,
        # and only playback heard on the new socket holds on longer.
        self._play_unsure, self._play_overdue = self._playing, False
        if self._updates is not None:
            # Updates sent on the lost socket get no answer; those still queued go out first on the new one.
            self._replay = self._to_replay(queued)
            kept = [u for u in self._updates if u[0] in queued]
            self._updates = kept or None
        actions = [*self._requeued(queued), *self._attached()]
        self._lost = lost if self._create_sent is None else None
        if self._lost is not None:
            self._create_sent = sent  # still awaited: it may have arrived (see _seen_lost)
        if end is not None and ending:
            # Our goodbye (or the model's last words) may be queued for the new socket or still running
            # on the server: its events show it within the grace; only then may the verb go (the end cap
            # still holds).
            end.held = True
        if self._orphans or self._resend or ending or self._play_unsure or self._lost is not None:
            actions.append(StartTimer(_ORPHANS, self.config.reattach_grace))
        actions += self._progress()
        return actions

    def _requeued(self, queued: Collection[str]) -> list[Action]:
        """Decide our creates still queued at a re-attach (see :meth:`reattached`): kept in place, or
        withdrawn. A create that answers outputs is withdrawn while outputs may have to be sent again:
        one create follows them all."""
        actions: list[Action] = []
        for event_id in queued:
            create = self._recent_creates.get(event_id)
            if create is None:
                continue  # not a create of ours (code's own raw frames stay as they are)
            tag = create[1]
            plain = _plain(create)
            if self._going or (tag is not None and tag.startswith(_FILLER) and self._stale(tag)):
                del self._recent_creates[event_id]
                actions += [Withdraw(event_id), Notice("response.dropped", {"purpose": tag or "response"})]
            elif plain and self._resend:
                del self._recent_creates[event_id]
                actions.append(Withdraw(event_id))
                self._owe(create)
            elif self._create_sent is None:
                self._create_sent = event_id  # it goes out in its place: the one we now wait on
        return actions

    def _owe(self, create: tuple[dict[str, Any], str | None]) -> None:
        """A create of ours was refused or never went out: it is sent again (see :meth:`_progress`). A
        plain create answers outputs: it goes once no tool runs, as one create for all."""
        if _plain(create):
            self._want_response = True
            self._without_tools = self._without_tools or bool(create[0])
        else:
            self._retry = (*self._retry, create)

    def _attached(self) -> list[Action]:
        self._session_ready = False
        if self.caps.session_created_first:
            return []
        return self._configure()

    def _configure(self) -> list[Action]:
        session = self.config.session
        if self._live and self._updated:
            # a re-attach: the server keeps the call's session, so the base config goes again without
            # the fields code changed since (the config's voice would get the whole update refused once
            # the model has spoken in another voice); code's own follow, where they may be lost
            session = _without(session, self._updated)
        actions: list[Action] = [self._update_sent(session, None)]
        replay, self._replay = self._replay, ()
        actions += [self._update_sent(fields, before) for fields, before in replay]
        if self.config.greeting and not self._greeted:
            self._greeted = True
            actions.append(self._create({"instructions": self.config.greeting}, _GREETING))
        if not self._live and not self.caps.session_created_first:
            actions += self._go_live()
        return actions

    def _go_live(self) -> list[Action]:
        """Our session config is out (first in line): what code asked for meanwhile may follow it."""
        self._live = True
        held, self._held = self._held, ()
        for update in self._updates_held:
            self._track(update)
        self._updates_held = ()
        return [*held, *self._progress()]

    def receive(self, event: dict[str, Any]) -> list[Action]:
        """A server event arrived. Unknown types are ignored."""
        if self._closed is not None:
            return []
        kind = event.get("type")
        handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is None:
            return []
        return handler(self, event)

    def tool_done(self, call_id: str, output: str, *, ok: bool = False) -> list[Action]:
        """A tool finished (``ok``: it returned normally; either way ``output`` is what the model sees).
        After the call's hangup or transfer went out (an end forced while it ran), its output is not sent
        (``tool.output_dropped``). Once no tool runs, the model is asked to answer the outputs, unless each
        was a quiet tool's success (:attr:`MachineConfig.quiet`)."""
        call = self._calls.get(call_id)
        if call is None or call.state != "running" or self._closed is not None:
            return []
        call.state = "answered"
        call.quiet = call.quiet and ok
        self._answer_due = self._answer_due or not call.quiet
        self._running -= 1
        if self._going:
            return [
                CancelTimer(_FILLER + call_id),
                Notice("tool.output_dropped", {"tool_call_id": call_id, "tool": call.name}),
            ]
        if self._running == 0:
            if self._answer_due or self._filler_spoken:  # (a holding phrase promised an answer too)
                # The answer follows this output: sent again after a re-attach, it brings the answer
                # again, quiet or not.
                self._want_response, call.quiet = True, False
            self._answer_due = self._filler_spoken = False
        actions: list[Action] = [CancelTimer(_FILLER + call_id), self._output(call_id, output)]
        return actions + self._progress()

    def timer(self, name: str) -> list[Action]:
        """The named timer fired."""
        if self._closed is not None:
            return []
        end = self._end
        if name == _SPEECH_IDLE:
            return self._speech_idle_reached()
        # The call is ending already: no limit to report, but the call-duration limit's end takes the place
        # of the idle limit's, which the caller's return would withdraw (see request_end).
        if (
            name in (_IDLE, _MAX_DURATION)
            and end is not None
            and (name == _IDLE or end.verb_sent or not end.withdrawable)
        ):
            return []
        if name == _IDLE:
            period = self.config.max_idle_duration
            if self._prompt is not None or self._prompt_due:
                # The caller stayed silent through the server's prompts to them, which restart nothing:
                # the limit is reached now, or at the last word of the prompt being said. Something of
                # ours under way (a tool, a say()) waits as below; the caller mid-word too.
                ours = self._running or self._speaking or self._owed_ours
                if not (ours or self._prompt_due or self._response_active or self._playing):
                    return self._idle_reached()
                if not self._idle_waited and period:
                    self._idle_waited = True
                    self._idle_due = not ours
                    return [StartTimer(_IDLE, period)]  # the backstop, should the prompt's end not show
                return self._idle_reached()
            busy = self.response_owed or self._running or self._playing or self._speaking
            if self.caps.idle_after_answers and busy and not self._idle_waited and period:
                # The model speaks, or a tool works for the caller: the line is not idle, and the end of
                # that starts the clock again. Once only: still at it a full period later, it is stuck (a
                # playback whose end never came, a refused create), and the limit is the backstop.
                self._idle_waited = True
                return [StartTimer(_IDLE, period)]
            # Still busy a period later: stuck (see above), and no question would be heard or answered.
            return self._idle_reached(nudge=not busy)
        if name == _MAX_DURATION:
            return [
                Notice("call.limit", {"limit": "max_duration"}),
                *self.request_end("max_duration", goodbye=True),
            ]
        if name == _END_CAP:
            return self._fire_end(forced=True)
        if name == _TRANSFER:
            return self._transfer_unconfirmed()
        if name.startswith(_FILLER):
            return self._filler(name[len(_FILLER) :])
        if name == _ORPHANS:
            return self._after_reattach_grace()
        if name == _SPEAKING:
            return self._speech_over(stopped=False)
        if name == _TURN:
            self._turn_wait = self._text_wait = False  # no answer to the turn came: what waited may start
            self._text_out = False  # (nor to code's text: refused, say; speech reported now is after it)
            return self._progress() + self._rearm_filler()
        return []

    def verb_done(
        self, ok: bool, detail: str | None = None, *, gone: bool = False, ended: bool = False
    ) -> list[Action]:
        """The hangup/refer verb finished (``ok``; ``gone``: answered 404, the call had ended; ``ended``:
        carried out, and the call found ended since, as a REFER whose answer was lost and the hangup
        after it finding the call gone) or failed.

        A refer's 200 only says the REFER was handed to the SIP provider: the call stays ours (nothing
        more is started or said) until the server ends it, closing the sideband (:meth:`transport_closed`)
        or refusing its re-attach after a drop (:meth:`fail` ``call_not_found``; a socket lost without a
        close is attached again, see :meth:`reattached`): then it ends ``transferred``. Still open after
        :attr:`MachineConfig.transfer_confirm` seconds, the transfer is taken as failed
        (``call.transfer_unconfirmed``): the call is hung up and ends ``transfer_failed``, unless that
        hangup finds it gone (it ended without us: ``transferred``). A sideband the server closed while
        the refer was still unanswered (cleanly, or refusing its re-attach) said the call ended: its 200
        ends the call ``transferred`` at once, as does a refer that was ``ended``; one given up (not
        attached again), or a drain begun meanwhile, leaves nothing to watch the transfer: its 200 hangs
        the call up at once, as after the window.

        A failed refer falls back to a hangup (the caller must not stay on a call nobody controls) and
        the call ends with reason ``transfer_failed``. A refer that finds the call gone transferred
        nothing: ``call_not_found``. A hangup that fails (its retries spent) ends our part with reason
        ``hangup_failed``: the call may still be up, and the end reason must not say otherwise.
        """
        end = self._end
        if self._closed is not None or end is None:
            return []
        if ok and not (gone and end.verb == "refer"):
            if end.verb == "refer" and not end.lost and not ended:
                end.referred = True
                if end.unwatched is not None:  # (nothing would tell whether the server ends the call)
                    return self._transfer_unconfirmed(end.unwatched)
                return [StartTimer(_TRANSFER, self.config.transfer_confirm)]
            if gone and end.referred:  # the hangup after an unconfirmed transfer: the call had ended
                return self._close("transferred")
            return self._close(end.reason)
        actions: list[Action] = [Notice("call.verb_failed", {"verb": end.verb, "detail": detail})]
        if ok:  # a refer answered 404
            return [*actions, *self._close("call_not_found")]
        if end.verb == "refer":
            end.reason, end.verb, end.target = "transfer_failed", "hangup", None
            return [
                *actions,
                Notice("call.ending", {"reason": end.reason, "verb": "hangup", "target": None}),
                Verb("hangup"),
            ]
        # (the call known ended meanwhile: a failed hangup does not say it may still be up)
        return [*actions, *self._close(end.reason if end.gone else "hangup_failed")]

    def transport_closed(self, code: int | None, reason: str = "") -> list[Action]:
        """The socket closed for good (the driver gave up re-attaching or the close was clean). Once the
        end's verb is out, the call ends with the end's reason (``transferred`` after a refer's 200). A
        refer still unanswered is waited for, as after a socket lost (see :meth:`sideband_lost`): the
        server may have closed the sideband as it carried the REFER out (its 200 then ends the call
        ``transferred``), or because the caller hung up meanwhile (the refer finds the call gone:
        ``call_not_found``; refused: ``transfer_failed``). So is the hangup after a transfer's window
        (:meth:`_transfer_unconfirmed`): the server may have closed the sideband as it carried the hangup
        out (the transfer failed) or the transfer took at the last moment (the hangup finds the call
        gone: ``transferred``)."""
        if self._closed is not None:
            return []
        end = self._end
        if end is not None and end.verb_sent:
            if end.verb == "refer" and not end.referred:
                end.lost = True
                return []
            if end.referred and end.verb == "hangup":  # (the window's hangup, unanswered)
                end.lost = end.gone = True
                return []
            return self._close(end.reason)
        return self._close("remote_closed")

    def sideband_lost(self, *, gone: bool = False) -> list[Action]:
        """The socket was lost (no clean close) once the end's verb was out, and it is not attached again.
        A transfer awaited after a refer's 200 is attached again first (see :meth:`reattached`): this is
        for when that failed (its attempts spent, sockets lost again as soon as they opened). The server
        may have ended the call, or the transfer failed and the caller is still on: with no socket left to
        tell, a hangup does (``transferred`` when it finds the call gone, else ``transfer_failed``), and
        the caller is not left on a call nobody controls. A verb still unanswered ends the call when it is
        answered: a REFER still unanswered is attached again first too, and given up, its 200 hangs the
        call up at once (nothing is left to tell whether the server ends the call); refused as the call
        is gone, its 200 ends it ``transferred`` (the server dropped the sideband as it carried the REFER
        out); the hangup after a transfer's window, finding the call gone, ends it ``transferred``.
        ``gone``: the call was found ended (a re-attach refused): a hangup's answer then tells nothing more
        but after a transfer's window, and the call ends now with its reason; a hangup after a window
        that then fails ends ``transfer_failed``, not ``hangup_failed``."""
        end = self._end
        if self._closed is not None or end is None or not end.verb_sent:
            return []
        if self.transferring:
            return self._transfer_unconfirmed("sideband_lost")
        if gone and end.verb == "hangup" and not end.referred:
            return self._close(end.reason)
        if self.referring and not gone:
            # The socket given up while the REFER is out: no close of the server's said the call ended.
            end.unwatched = "sideband_lost"
            return []
        end.lost = True
        end.gone = end.gone or (gone and end.verb == "hangup")  # (a REFER's answer alone tells)
        return []

    def fail(self, reason: str) -> list[Action]:
        """End now for a reason found by the driver (``call_not_found``, ``shutdown``…).

        A ``shutdown`` that cuts short a hangup or refer still unanswered ends ``hangup_failed``: the
        call may still be up, and the end reason must not say otherwise. One while the call waits for
        the server to end a transfer (:attr:`transferring`) ends ``transferred``: its re-attach refused
        as the call is gone (``call_not_found``: the server ended it), or its run cut short (the refer
        was carried out; a drain hangs such a call up first: see :meth:`abandon`)."""
        if self._closed is not None:
            return []
        end = self._end
        if self.transferring and end is not None:
            return self._close(end.reason)
        if reason == "call_not_found" and end is not None and end.verb_sent:
            reason = end.reason
        elif reason == "shutdown" and end is not None and end.verb_sent and end.gone:
            reason = end.reason  # (the call known ended meanwhile)
        elif reason == "shutdown" and end is not None and end.verb_sent:
            detail = "cut short by the shutdown: the call may still be up"
            return [
                Notice("call.verb_failed", {"verb": end.verb, "detail": detail}),
                *self._close("hangup_failed"),
            ]
        return self._close(reason)

    def abandon(self, reason: str) -> list[Action]:
        """The sideband cannot be (re-)attached while the call may still be up: hang up at once (there is
        no socket to wait on for outputs or the model's last words), then end with ``reason``. A hangup
        or transfer already under way is sent now instead (the idle limit's end too). A transfer the
        call waits on (:attr:`transferring`) is left to its window, but a ``shutdown`` hangs it up now
        (``transferred`` when the hangup finds the call gone, else ``transfer_failed``): the transfer may
        have failed, and nobody would control the call after. A ``shutdown`` while the REFER is still
        unanswered hangs the call up on its 200."""
        if self.transferring:
            return self._transfer_unconfirmed("shutdown") if reason == "shutdown" else []
        asked = self.request_end(reason) if self._end is None else []
        fired = self._fire_end(forced=True)
        if reason == "shutdown" and self.referring:  # (out before, or just now)
            assert self._end is not None
            self._end.unwatched = "shutdown"  # (its 200 hangs the call up at once: see verb_done)
        return [*asked, *fired]

    # ---------------------------------------------------------------------- requests from code
    def request_end(
        self,
        reason: str,
        *,
        verb: Literal["hangup", "refer"] | None = "hangup",
        target: str | None = None,
        goodbye: bool = False,
    ) -> list[Action]:
        """Hang up (or refer) once in-flight outputs and the model's last words are out (with a
        ``goodbye`` first, for a limit). Terminal and idempotent: once an end is asked for, another is
        ignored, except while the end is the idle limit's, which the caller's return would withdraw (see
        :meth:`_caller_back`): the new end replaces it and stands, within the idle end's cap (the end
        began with it). A goodbye the idle limit already asked for is let finish, and serves a new end
        that says one (the call-duration limit's); one not asked for yet is asked only by such an end."""
        return self._ask_end(reason, verb, target, goodbye=goodbye)

    def _ask_end(
        self,
        reason: str,
        verb: Literal["hangup", "refer"] | None,
        target: str | None,
        *,
        goodbye: bool,
        withdrawable: bool = False,
    ) -> list[Action]:
        old = self._end
        if self._closed is not None or (old is not None and (old.verb_sent or not old.withdrawable)):
            return []
        if not self._turn_wait:  # (else the server's answer to the caller's turn is on its way)
            self._unanswered = False  # (the goodbye, or the last words, answer no turn of the caller's)
        end = _End(
            reason=reason,
            verb=verb if self.caps.call_verbs else None,
            target=target,
            goodbye=self.config.goodbye_instructions if goodbye else None,
            parting=goodbye,
            withdrawable=withdrawable,
            says=len(self._queued_say),
        )
        if old is not None:  # it takes the idle limit's place: what of that end is under way stays so
            end.says, end.held = old.says, old.held
            if goodbye:
                end.goodbye, end.byes, end.said = old.goodbye, old.byes, old.said
        self._end = end
        return [
            Notice("call.ending", {"reason": reason, "verb": verb, "target": target}),
            # (one that takes the idle limit's place keeps its cap: the end began with that one)
            *([StartTimer(_END_CAP, self.config.end_cap)] if old is None else []),
            *self._progress(),
        ]

    def say(self, instructions: str) -> list[Action]:
        """Ask the model to speak now (queued while a response is active). Once the call's end is asked
        for, what is queued before it is still said (before a goodbye, then the verb); a later say()
        is not."""
        if self._closed is not None or self._end is not None:
            return []
        self._queued_say.append(instructions)
        return self._progress()

    def interrupt(self) -> list[Action]:
        """Stop the model now: cancel the response under way (the tool calls it made are not run) and,
        where the server plays the audio (SIP, WebRTC), clear what of it the caller has not heard yet. A
        response of ours asked for and not started yet is cancelled as it starts (and not asked for again
        if refused). With nothing to stop, nothing is sent. Queued :meth:`say` requests stay queued: they
        follow once the response has ended. A limit's goodbye stopped this way is not asked for again: the
        call's end goes on to its verb. Ignored once the call's hangup or transfer went out."""
        if self._closed is not None or self._going:
            return []
        if self._create_sent is not None:  # (a response may run meanwhile: the server's own)
            self._cancel_next = self._create_sent
        end = self._end
        if end is not None and end.byes:  # a goodbye the app stops is not asked for again
            end.byes = 2
        return self._stop(None)

    def _stop(self, response_id: str | None) -> list[Action]:
        """Cancel the response under way and clear the audio playing, if they are ``response_id``'s (any,
        for ``None``)."""
        actions: list[Action] = []
        if self._response_active and response_id in (None, self.responding):
            actions.append(self._cancel(self.responding))
        playing = (self._playing or self._play_unsure) and response_id in (None, self._heard)
        if self.caps.audio_playback_events and (actions or playing):
            self._seq += 1  # (an error about it names this)
            actions.append(
                Send({"type": "output_audio_buffer.clear", "event_id": f"{_CANCEL_EVENT}{self._seq}"})
            )
        return actions

    def correct(self, note: str, response_id: str | None = None) -> list[Action]:
        """Reply ``response_id`` (the current one, for ``None``) broke a rule of the app's (an output
        guardrail): stop what of it is still under way or playing, add ``note`` to the conversation as a
        system message, and have the model answer again (once the tools still running are answered; when
        the call is ending, its goodbye is asked for again), up to :data:`CORRECTIONS` times per caller
        turn; past that it is left silent until the caller speaks (``guardrail.silenced``). The tool
        calls of a reply stopped in time (its response ends ``cancelled``) are discarded with reason
        ``reply_stopped`` (no output: they end with their response). A reply already followed by another
        (one under way, asked for, or playing) gets the note alone: the one that follows is not stopped,
        and answers. Ignored once the call's hangup or transfer went out."""
        if self._closed is not None or self._going:
            return []
        later = response_id is not None and (
            self.responding not in (None, response_id)
            or (self._create_sent is not None and not self._response_active)
            or (self._playing and self._heard not in (None, response_id))
        )
        actions = [] if later else self._stop(response_id)
        item = {"type": "message", "role": "system", "content": [{"type": "input_text", "text": note}]}
        send = Send({"type": "conversation.item.create", "item": item})
        if self._live:
            actions.append(send)
        else:
            self._held = (*self._held, send)
        if later:
            return actions
        # (its calls, should it end cancelled, are discarded as stopped: see _on_response_done)
        self._stopped_reply = response_id if response_id is not None else self.responding
        self._corrections += 1
        if self._corrections > CORRECTIONS:
            return [*actions, Notice("guardrail.silenced", {"stopped": self._corrections})]
        end = self._end
        if end is not None:
            end.goodbye = self.config.goodbye_instructions  # (the last words were what broke the rule)
        else:
            self._want_response = True
        return actions + self._progress()

    def _cancel(self, response_id: str | None) -> Send:
        self._seq += 1
        event: dict[str, Any] = {"type": "response.cancel", "event_id": f"{_CANCEL_EVENT}{self._seq}"}
        if response_id is not None:
            event["response_id"] = response_id
        return Send(event)

    def caller_active(self) -> list[Action]:
        """The caller speaks by other means than speech the server reports (e.g. in audio a backend
        streams): the idle limit starts again, and so does the speech idle limit
        (:attr:`MachineConfig.speech_idle_duration`) until the server reports the caller's speech itself
        (then that alone restarts it)."""
        if self._closed is not None:
            return []
        self._unnudge()
        speech = not self._speech_reported
        back = self._caller_back(speech=speech) if self._end is not None else []
        return back + self._touch_idle() + (self._heard_speech() if speech else [])

    def user_text(self, text: str) -> list[Action]:
        """Add a user text turn (driving the conversation from code); one response follows it (ours, or, on
        an engine that answers text by itself, its own: what we would start waits for it to begin, as
        for the caller's turn). Ignored once the call's hangup or transfer went out."""
        if self._closed is not None or self._going:
            return []
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        send = Send({"type": "conversation.item.create", "item": item})
        actions = self._caller_turn()
        if text.strip():  # the caller's line of the transcript (no transcription event comes for text)
            actions.append(Notice("transcript", {"role": "caller", "text": text.strip()}))
        if self._live:
            actions.append(send)
        else:
            self._held = (*self._held, send)
        if not self.caps.responds_to_user_text:
            self._want_response = self._text_owed = True
            self._text_unseen = self._seq
            if self._reasked is not None and self._reasked[1] is None:
                self._reasked = None  # (the lost create's response, should it show, does not answer it)
            return actions + self._progress()
        if not self._turn_wait:  # its answer is on its way: what we would start would replace it
            self._turn_wait = self._text_wait = True
            actions.append(StartTimer(_TURN, TURN_GRACE))
        self._text_out = True  # (speech it reports before it takes the text is dropped too)
        # The server answers the text at once, caller's speech or not: the utterance it reported holds
        # nothing of ours back any more (the rest of that answer, a goodbye), lest a stop that never
        # comes (audio that stopped mid-speech) keep it waiting.
        return actions + self._speech_dropped() + self._progress()

    def update_session(self, fields: Mapping[str, Any]) -> list[Action]:
        """Send a partial ``session.update`` (held until our own session config is out). Ignored once the
        call's hangup or transfer went out. :class:`~sideband.SessionConfig`'s names (``voice=``…) are moved
        into ``audio`` where the server has them there (:func:`~sideband.session.session_update`, which
        raises :class:`~sideband.session.SessionConfigError` for a typo of a known field)."""
        if self._closed is not None or self._going:
            return []
        session = session_update(fields) if self.caps.nested_audio else {**fields, "type": "realtime"}
        updated = self._updated if self._updated is not None else {}
        before: dict[tuple[str, ...], Any] = {}
        for path, value in _fields(session):
            # re-inserted last: replayed in the order code last set them
            before[path] = updated.pop(path, _ABSENT)
            updated[path] = value
        self._updated = updated
        if not self._live:
            event_id = self._update_id()
            self._held = (
                *self._held,
                Send({"type": "session.update", "event_id": event_id, "session": session}),
            )
            self._updates_held = (*self._updates_held, (event_id, before))
            return []
        return [self._update_sent(session, before)]

    def send_raw(self, event: dict[str, Any]) -> list[Action]:
        """Code's own client event, sent as it is, in order with the rest. A ``session.update`` gets an
        ``event_id`` if it has none and awaits the server's answer among ours (it changes nothing that
        :meth:`updated_field` tells or a re-attach sends again)."""
        if event.get("type") == "session.update":
            event_id = event.get("event_id")
            if not isinstance(event_id, str) or not event_id:
                event_id = self._update_id()
                event = {**event, "event_id": event_id}
            self._track((event_id, None))
        return [Send(event)]

    def text_refused(self) -> list[Action]:
        """The server refused code's user text (an ``error`` in its answer's place, on a server that
        answers text by itself): no answer to it will come, so what waited for one may start now rather
        than after :data:`TURN_GRACE`. The wait for the answer to a silence (the server's idle prompt)
        stands."""
        if self._closed is not None or not self._text_out:  # (none went out, or the server took it)
            return []
        self._text_out = False  # (speech it reports from now on is not of audio before a text)
        if not (self._turn_wait and self._text_wait) or self._prompt_due:
            return []  # (the wait is for the answer to the caller's turn, or to a silence, too)
        self._turn_wait = self._text_wait = False
        return [CancelTimer(_TURN), *self._progress(), *self._rearm_filler()]

    def updated_field(self, path: tuple[str, ...], default: Any = None) -> Any:
        """What code's updates set of one session field (by path: ``("audio", "output", "voice")``,
        ``("tools",)``), as sent and not refused by the server: the value a re-attach sends again;
        ``default`` when none set it (the config's stands)."""
        updated = self._updated
        return default if updated is None else updated.get(path, default)

    def _to_replay(
        self, queued: Collection[str]
    ) -> tuple[tuple[dict[str, Any], dict[tuple[str, ...], Any]], ...]:
        """Code's updates that left for a socket just lost, to be sent again on the next (see
        :meth:`reattached`): their answer, a refusal among them, may have been lost with it. Each goes
        again as one update, as the server takes or refuses an update whole (but for its voice and model,
        each in an update of its own: see _APART), with the fields no later update sets (the last value
        of each: a call that updated its session every turn sends one) and what each was before it,
        which its refusal puts back. One still queued goes out as it is."""
        updated, updates = self._updated, self._updates
        if not updated or updates is None:
            return ()
        setters: dict[str, list[tuple[str, ...]]] = {}
        for path in updated:
            setter = next((u for u in reversed(updates) if u[1] is not None and path in u[1]), None)
            if setter is not None and setter[0] not in queued:
                setters.setdefault(setter[0], []).append(path)
        replay: list[tuple[dict[str, Any], dict[tuple[str, ...], Any]]] = []
        for event_id, before in updates:
            paths = setters.get(event_id)
            if not paths or before is None:
                continue
            groups = [[path] for path in paths if path in _APART]
            rest = [path for path in paths if path not in _APART]
            if rest:
                groups.append(rest)
            for group in groups:
                fields = _session_of((path, updated[path]) for path in group)
                replay.append((fields, {path: before[path] for path in group}))
        return tuple(replay)

    def _update_id(self) -> str:
        self._updates_sent += 1
        return f"{_UPDATE_EVENT}{self._updates_sent}"

    def _update_sent(self, session: dict[str, Any], before: dict[tuple[str, ...], Any] | None) -> Send:
        """Our ``session.update`` of ``session``, awaiting the server's answer (``before``: see _updates)."""
        event_id = self._update_id()
        self._track((event_id, before))
        return Send({"type": "session.update", "event_id": event_id, "session": session})

    def _track(self, update: tuple[str, dict[tuple[str, ...], Any] | None]) -> None:
        updates = self._updates
        if updates is None:
            updates = self._updates = []
        updates.append(update)
        if len(updates) > _UPDATES_KEPT:
            del updates[0]  # (refused so long after, it is taken for accepted)

    def _update_refused(self, event_id: str) -> list[Action]:
        """An ``error`` naming one of our ``session.update`` events: the server refused it whole, so each
        field it set of code's is back to its value before it (none set it: the config's stands), unless
        an update sent after it sets that field too. Nothing of it is sent again after a re-attach."""
        updates = self._updates
        if updates is None:
            return []
        index = next((i for i, (sent, _) in enumerate(updates) if sent == event_id), None)
        if index is None:
            return []
        _, before = updates.pop(index)
        later = updates[index:]
        if not updates:
            self._updates = None
        updated = self._updated
        if not before or updated is None:
            return []
        restored: list[str] = []
        for path, value in before.items():
            heir = next((b for _, b in later if b is not None and path in b), None)
            if heir is not None:
                heir[path] = value  # (refused too, it puts back what this one found)
                continue
            if value is _ABSENT:
                updated.pop(path, None)
            else:
                updated[path] = value
            restored.append(".".join(path))
        if not restored:
            return []
        return [Notice("session.update_refused", {"event_id": event_id, "fields": restored})]

    # ------------------------------------------------------------------------------- handlers
    def _on_session_created(self, event: dict[str, Any]) -> list[Action]:
        session = event.get("session")
        if isinstance(session, dict) and isinstance(session.get("id"), str):
            self._session_id = session["id"]
        if self.caps.session_created_first:
            return self._configure()
        return []

    def _on_session_updated(self, event: dict[str, Any]) -> list[Action]:
        if self._session_ready:
            return []
        self._session_ready = True
        actions: list[Action] = [Notice("sideband.ready", {})]
        if self.caps.session_expires_at and self.config.max_call_duration:
            expires_at = _obj(event.get("session")).get("expires_at")
            if isinstance(expires_at, int | float) and not isinstance(expires_at, bool) and expires_at < 1e15:
                actions.append(TimerBy(_MAX_DURATION, float(expires_at) - BEFORE_THE_CUT))
        if not self._live:  # vowel: nothing but our session.update may precede session.updated
            actions += self._go_live()
        return actions

    def _on_response_created(self, event: dict[str, Any]) -> list[Action]:
        self._response_active = True
        self._text_out = False
        response = _obj(event.get("response"))
        response_id = response.get("id")
        self.responding = response_id if isinstance(response_id, str) else None
        create, known = self._answered_create(response)
        reasked = self._reasked
        if reasked is not None:
            # The lost create's response, shown after all, or one after which it can no longer start.
            self._reasked = None
            if create == reasked[0]:
                self._drop_copy(reasked[1])
        prompted, self._prompt_due = self._prompt_due and create is None, False
        self._prompt = response_id if prompted else None
        if create is not None:
            # (a refusal naming no event may be about a create only taken to have started, not one known)
            self._created_for = None if known else create
            if known:
                self._arrived(create)
                unseen = self._text_unseen
                if unseen is not None and _seq_of(create) > unseen:
                    self._text_unseen = None  # (ours, sent after code's text, started: the text was taken)
            if self._create_sent == create:
                self._create_sent = None
            self._ours = (response_id, create) if isinstance(response_id, str) else None
            if self._cancel_next == create:  # interrupted before it started
                self._cancel_next = None
                return [self._cancel(self.responding)]
        elif self._turn_wait:
            # The server's answer to the caller's turn. It answers our outputs too if it sees them all:
            # each acknowledged before it began (one still unacknowledged, or code's text, may have come
            # too late for it: then ours follows it, better twice than never). On the same terms it answers
            # our plain create lost with a socket and still awaited (see reattached): it is not asked again.
            self._turn_wait = self._text_wait = False
            if not self._running and self.caps.resumable and self._unacked is None and not self._text_owed:
                if self._want_response:
                    self._want_response = self._without_tools = False
                    self._covered_by = response_id
                lost = self._lost
                if (
                    lost is not None
                    and self._create_sent == lost[0]
                    and _plain(self._recent_creates.get(lost[0]))
                ):
                    self._lost = self._create_sent = None
                    self._covered_by = response_id
                elif (
                    self._create_sent is not None
                    and self._text_unseen is None  # (code's text, if it came too late for it, is answered)
                    and _plain(self._recent_creates.get(self._create_sent))
                ):
                    # Our plain create, on its way, crossed it: refused for it, it is not asked again.
                    self._crossed = (response_id, self._create_sent)
            return [CancelTimer(_TURN)]
        return []

    def _answered_create(self, response: dict[str, Any]) -> tuple[str | None, bool]:
        """The event id of our create that a starting ``response`` answers (``None`` for the server's own),
        and whether its tag said so: the create named by its tag; else the create still awaited, unless
        this session echoes tags and the server has a reason of its own to answer (a caller's turn it
        answers by itself, an idle prompt) and has not ended a response since ours left (ours, not
        refused meanwhile, would then be the next to start: nothing is stuck waiting on a create whose
        answer came untagged)."""
        if self.caps.tags_responses:
            tag = _obj(response.get("metadata")).get(_TAG)
            if isinstance(tag, str) and tag.startswith(_CREATE_EVENT):
                self._tagged = True
                return tag, True
            if (
                self._tagged
                and self._create_sent is not None
                and not self._done_since_create
                and (self._prompt_due or (self._unanswered and self._turn_responds()))
            ):
                return None, False
        return self._create_sent, False

    def _on_response_done(self, event: dict[str, Any]) -> list[Action]:
        response = _obj(event.get("response"))
        response_id = response.get("id")
        status = response.get("status")
        status = status if isinstance(status, str) else None
        self._done_since_create = True
        # The response under way ends, unless this is one it replaced: the vowel engine cuts a reply for a
        # new one (user text, a create, the caller's speech over it), which starts before the cut one's
        # response.done. That ends the cut one alone (its calls, not its successor's).
        current = (
            response_id == self.responding or self.responding is None or not isinstance(response_id, str)
        )
        if current:
            self._response_active = False
            self.responding = None
            self._agent_lines.clear()
            if self._play_overdue:  # a response without audio ended past the grace: nothing plays any more
                self._playing = self._play_unsure = self._play_overdue = False
            covered_by, self._covered_by = self._covered_by, None
            ours, self._ours = self._ours, None
        else:
            covered_by = ours = None
            if self._covered_by == response_id:
                covered_by, self._covered_by = response_id, None
            if self._ours is not None and self._ours[0] == response_id:
                ours, self._ours = self._ours, None
        if ours is None and self._lost is not None and isinstance(response_id, str):
            create = self._seen_lost(response)  # (its response.created went to the lost socket)
            if create is not None:
                ours = (response_id, create)
                self._arrived(create)
        if ours is None and self._reasked is not None and isinstance(response_id, str):
            # (the lost create's response, its start unseen, outlived the grace: see _ask_again)
            reasked = self._reasked
            if _obj(response.get("metadata")).get(_TAG) == reasked[0]:
                self._reasked = None
                self._drop_copy(reasked[1])
                ours = (response_id, reasked[0])
        if covered_by is not None and covered_by == response_id and status != "completed":
            self._want_response = True  # it did not get to answer our outputs: we still ask
        usage = response.get("usage")
        actions: list[Action] = (
            [Notice("usage", {"of": "response", "usage": usage})] if isinstance(usage, dict) else []
        )
        if status == "completed":
            self._last_error = None  # the session got past it: not the cause of a later close
            self._failed_in_row = 0
        elif status == "failed":
            actions += self._response_failed(
                response, ours[1] if ours is not None and ours[0] == response_id else None
            )
        output = response.get("output")
        output = output if isinstance(output, list) else []
        for item in output:
            if isinstance(item, dict) and item.get("type") == "function_call":
                self._learn(item, response_id)
        end = self._end
        ending = self._going
        if end is not None and not ending:
            mine = ours is not None and ours[0] == response_id
            if mine and ours is not None and self._tag_of(ours[1]) == _GOODBYE:
                end.said = response_id
                if status == "cancelled":
                    self._goodbye_cut(end)
            # A response the call did not ask for while it ends (the server's answer to a caller who
            # spoke over the goodbye) starts nothing either, where a create may go out with a call
            # unanswered (an engine waits for every output before it speaks again).
            ending = not mine and self.caps.speaks_over_tools
        quiet = self.config.quiet
        # Whether the response said words, which keeps its quiet calls quiet: its line came (the vowel
        # engine lists no message in a tool turn's output, and ends its preamble with text.done alone),
        # or it lists its message.
        spoke = bool(quiet) and (
            (response_id is not None and response_id == self._last_line_response)
            or any(isinstance(i, dict) and i.get("type") == "message" for i in output)
        )
        for call in list(self._calls.values()):
            if call.state != "pending" or call.response_id not in (None, response_id):
                continue
            # A response cut short (max_output_tokens, a content filter) may hold calls whose arguments
            # were cut too: "" would pass for {} and run a parameterless action nobody finished asking for.
            cut = status == "incomplete" and not call.complete
            if status not in _RUNNABLE or ending or cut:
                call.state = "discarded"
                if status not in _RUNNABLE:
                    stopped = response_id is not None and response_id == self._stopped_reply
                    reason = "reply_stopped" if stopped else "response_ended"
                else:  # the call is going (see above): nothing starts any more
                    reason = "call_ending" if ending else "arguments_cut"
                actions.append(
                    Notice(
                        "tool.discarded",
                        {
                            "tool_call_id": call.call_id,
                            "tool": call.name,
                            "response_status": status,
                            "reason": reason,
                        },
                    )
                )
                if not self.caps.speaks_over_tools:
                    # The server waits for this call's output before it speaks again (the vowel engine,
                    # with no timeout): it hears the call did not run, before any create of ours.
                    actions.append(self._output(call.call_id, _NOT_RUN[reason]))
            else:
                if call.arguments is None:  # none came with a finished response: never silence
                    call.arguments = "null"  # (refused by validation: the model hears invalid_arguments)
                if call.name in quiet:  # quiet only if the response spoke: else the caller hears nothing
                    call.quiet = spoke
                actions += self._run(call)
        actions.append(
            Notice(
                "response.done",
                {"response_id": response_id, "status": status, "tools_running": self._running},
            )
        )
        if not current:  # (its successor runs: the model has not had its say yet)
            return actions
        # The model has had its say: the caller's silence counts from here (or from the end of playback).
        return actions + self._answered(response_id) + self._progress() + self._rearm_filler()

    def _tag_of(self, create: str) -> str | None:
        """What our create ``create`` (an event id) was for (see ``_recent_creates``)."""
        asked = self._recent_creates.get(create)
        return asked[1] if asked is not None else None

    def _goodbye_cut(self, end: _End) -> None:
        """The end's goodbye was cut off (its response cancelled, or its audio cleared: the caller spoke
        over it). It is asked for once more, after the server's answer to the caller (whose tool calls do
        not run); a caller who talks over that one too is not kept on the line for it (and the end cap
        holds throughout)."""
        if end.parting and end.goodbye is None and end.byes < 2:
            end.goodbye = self.config.goodbye_instructions

    def _response_failed(self, response: dict[str, Any], create: str | None) -> list[Action]:
        """A response ended ``failed`` (a server error, a quota, a rate limit): nothing was said. It is
        asked for again once, as it was asked (``create``: the event_id of our create it answered, else
        the caller's turn went unanswered); a second failure in a row is left to the caller's next words.
        Either way it is reported, with the server's reason."""
        error = _obj(_obj(response.get("status_details")).get("error"))
        fields = {**_error_fields(error), "param": None}
        if error:  # (else the error event before it, if any, says more: the engine fails so)
            self._last_error = fields
        self._failed_in_row += 1
        retry = self._failed_in_row == 1 and self._end is None
        if retry:
            asked = self._recent_creates.get(create) if create is not None else None
            if asked is not None:
                body, tag = asked
                self._owe((body, _GREETING_AGAIN if tag == _GREETING else tag))
            else:
                self._want_response = True
        return [Notice("response.failed", {"response_id": response.get("id"), **fields, "retry": retry})]

    def _on_arguments_done(self, event: dict[str, Any]) -> list[Action]:
        item = {
            "call_id": event.get("call_id"),
            "name": event.get("name"),
            "arguments": event.get("arguments"),
            "status": "completed",  # (its arguments are whole)
        }
        self._learn(item, event.get("response_id"))
        return []

    def _on_output_item(self, event: dict[str, Any]) -> list[Action]:
        item = _obj(event.get("item"))
        if item.get("type") != "function_call":
            return []
        # OpenAI announces calls in_progress with empty arguments; the vowel engine announces them
        # complete here and never sends arguments.done. Either way, arguments count once complete.
        if item.get("status") == "completed" or event.get("type") == "response.output_item.done":
            self._learn(item, event.get("response_id"))
        else:
            self._learn({**item, "arguments": None}, event.get("response_id"))
        return []

    def _learn(self, item: dict[str, Any], response_id: Any) -> None:
        call_id = item.get("call_id")
        if not isinstance(call_id, str) or not call_id:
            return
        call = self._calls.get(call_id)
        if (
            call is not None
            and self.caps.reused_call_ids
            and call.state in ("answered", "discarded")
            and isinstance(response_id, str)
            and call.response_id not in (None, response_id)
            and call_id not in (self._unacked or ())
        ):
            # An id seen in an earlier response, done with: an engine that passes on ids the model
            # made up (call_1, every turn) asks for a new call, and waits for its output forever.
            call = None
        if call is None:
            call = _ToolCall(call_id, _tool_name(item), response_id if isinstance(response_id, str) else None)
            self._calls[call_id] = call
        if call.response_id is None and isinstance(response_id, str):
            call.response_id = response_id
        if not call.name:
            call.name = _tool_name(item)
        arguments = item.get("arguments")
        if call.arguments is None and arguments is not None:
            # (a string as OpenAI sends it; an engine may forward the model's object as it is)
            call.arguments = arguments if isinstance(arguments, str) else _json_text(arguments)
        status = item.get("status")
        if status == "completed":
            call.complete = True
        elif status in ("incomplete", "cancelled", "failed"):
            call.complete = False  # the item's own word wins over an earlier arguments.done

    def _run(self, call: _ToolCall) -> list[Action]:
        arguments = call.arguments or ""
        if self._same_call(call.name, arguments):
            self._repeat += 1
        else:
            self._last_signature, self._last_value, self._repeat = (call.name, arguments), _UNREAD, 1
        self._answered_total += 1
        breach = None
        if self._answered_total > self.config.max_tool_calls:
            breach = f"more than {self.config.max_tool_calls} tool calls in this call"
        elif self._repeat > self.config.max_identical_calls:
            breach = f"the same call repeated {self._repeat} times"
        if breach is not None:
            call.state, call.quiet = "answered", False  # (the model must hear it: it is answered)
            out = json.dumps(
                {
                    "error": "loop_detected",
                    "message": f"Stop calling tools: {breach}. Answer the caller with what you already know.",
                }
            )
            self._want_response = self._without_tools = True  # the model answers, without more tools
            return [
                Notice(
                    "tool.loop_breaker", {"tool_call_id": call.call_id, "tool": call.name, "detail": breach}
                ),
                self._output(call.call_id, out),
            ]
        call.state = "running"
        self._running += 1
        actions: list[Action] = [RunTool(call.call_id, call.name, arguments, call.response_id)]
        filler = self.config.filler_after.get(call.name)
        if filler:
            actions.append(StartTimer(_FILLER + call.call_id, filler))
        return actions

    def _same_call(self, name: str, arguments: str) -> bool:
        """Whether a call is the last one run again, for the loop breaker: the same tool, its arguments
        the same JSON value however the model wrote them (compact or pretty-printed, keys in any order,
        ``1`` or ``1.0``; a blank, which runs as ``{}``, is ``{}``). Text that is not JSON is the same
        only as written. Parsed only when the text differs."""
        last = self._last_signature
        if last is None or last[0] != name:
            return False
        if last[1] == arguments:
            return True
        value = self._last_value
        if value is _UNREAD:
            value = self._last_value = _json_value(last[1] if last[1].strip() else "{}")
        other = _json_value(arguments if arguments.strip() else "{}")
        if value is _NOT_JSON or other is _NOT_JSON:
            return False
        try:
            return _same_json(value, other)
        except RecursionError:  # (nested deeper than Python's stack: another call, as far as we can tell)
            return False

    def _on_caller_transcript(self, event: dict[str, Any]) -> list[Action]:
        usage = event.get("usage")  # (billed, words or not)
        used: list[Action] = (
            [Notice("usage", {"of": "transcription", "usage": usage})] if isinstance(usage, dict) else []
        )
        return used + self._caller_words(event)

    def _caller_words(self, event: dict[str, Any]) -> list[Action]:
        text = event.get("transcript")
        item = event.get("item_id")
        # The transcript of speech whose start began a turn (it often completes while the model answers,
        # or after the caller spoke again): that turn, not a new one.
        same_turn = item is not None and item in self._turn_items
        said = text.strip() if isinstance(text, str) else ""
        if not (same_turn or said):
            return []  # nothing was said (the silence the server committed for its idle prompt, noise)
        if item is not None and item in self._prompt_items and not same_turn:
            # Words found in the silence the server committed for its prompt: shown, but too faint for
            # its turn detection (or made up from line noise) to count as the caller being there.
            actions: list[Action] = []
        else:
            actions = self._touch_idle() if same_turn else self._caller_turn()
        if said:
            fields = {"role": "caller", "text": said}
            if isinstance(item, str):
                fields["item_id"] = item  # (the item it transcribes: its place in the conversation)
            actions.append(Notice("transcript", fields))
        return actions

    def _on_transcript_failed(self, event: dict[str, Any]) -> list[Action]:
        """The caller's words of ``item_id`` could not be transcribed (the transcription model refused,
        say): the model heard them, but no transcript line will come for them."""
        fields = {"item_id": event.get("item_id"), **_error_fields(_obj(event.get("error")))}
        return [Notice("transcript.failed", fields)]

    def _on_mcp_failed(self, event: dict[str, Any]) -> list[Action]:
        """A remote MCP server of the session failed the model: listing its tools, or one call. The server
        tells the model; operations hear of it here."""
        what = "list_tools" if event.get("type") == "mcp_list_tools.failed" else "call"
        return [Notice("mcp.failed", {"what": what, "item_id": event.get("item_id")})]

    def _on_agent_transcript(self, event: dict[str, Any]) -> list[Action]:
        return self._agent_line(event, event.get("transcript"))

    def _on_agent_text(self, event: dict[str, Any]) -> list[Action]:
        return self._agent_line(event, event.get("text"))

    def _agent_line(self, event: dict[str, Any], text: Any) -> list[Action]:
        if not isinstance(text, str) or not text.strip():
            return []
        # One line a message, whichever of its parts carries it: OpenAI's messages have one (text or
        # audio), the vowel engine's a text part (content_index 0) and an audio part whose transcript
        # says the same words (1).
        key = (str(event.get("response_id")), str(event.get("item_id")))
        if key in self._agent_lines:
            return []
        self._agent_lines.add(key)
        response_id = event.get("response_id")
        self._last_line_response = response_id
        fields = {"role": "agent", "text": text.strip()}
        if isinstance(response_id, str):
            fields["response_id"] = response_id  # (the reply it is of)
        line = Notice("transcript", fields)
        if response_id is not None and response_id == self._cut_response:
            self._cut_response = None  # (its words came after the caller had cut its audio off)
            return [line, Notice("agent.interrupted", {"response_id": response_id})]
        return [line]

    def _on_caller_activity(self, event: dict[str, Any]) -> list[Action]:
        self._speech_reported = True  # (the speech idle limit then runs from these alone: caller_active)
        item = event.get("item_id")
        if item is not None:
            self._turn_items = (*self._turn_items[-3:], item)
        self._speaking = True  # nothing of ours starts over the caller's words (see _progress)
        self._speech_capped = False
        self.caller_turns += 1
        actions = [*self._caller_turn(speech=True), StartTimer(_SPEAKING, SPEECH_CAP)]
        if self._text_out:
            # Speech in audio sent before code's text (the server reports it as it reads that audio, before
            # the text): the text went out over it, and is answered at once, as for speech known before it
            # (see user_text). Its stop, should it come, still ends the caller's turn; audio that ended
            # mid-speech would bring none, and hold our answers back until SPEECH_CAP.
            actions += self._speech_dropped()
        return actions

    def _on_speech_stopped(self, event: dict[str, Any]) -> list[Action]:
        if not self._speaking:
            if not self._speech_capped:
                return []
            # A long utterance SPEECH_CAP took for over: this is its real end, which the server answers.
            self._speaking = True
        self._speech_capped = False
        return [CancelTimer(_SPEAKING), *self._speech_over(stopped=True)]

    def _speech_dropped(self) -> list[Action]:
        """The caller is taken to have stopped speaking without the server saying so (as when
        :data:`SPEECH_CAP` runs out): what was held back for them may start. Their speech's stop, should it
        come after all, still ends their turn."""
        if not self._speaking:
            return []
        return [CancelTimer(_SPEAKING), *self._speech_over(stopped=False)]

    def _speech_over(self, *, stopped: bool) -> list[Action]:
        """The caller finished speaking (``stopped``), or :data:`SPEECH_CAP` ran out: what was held back
        may start, and the caller's silence counts from here."""
        if not self._speaking or self._closed is not None:
            return []
        self._speaking = False
        self._speech_capped = not stopped
        actions = self._touch_idle()
        if stopped:
            self._unanswered = True
            actions.append(Notice("turn.stopped", {}))  # (the driver times the answer from here)
        if stopped and self._turn_responds():
            # The server answers the caller's turn by itself: what we would start now would be refused
            # meanwhile, and tool outputs that came in while the caller spoke are answered by it too.
            self._turn_wait, self._text_wait = True, False
            actions.append(StartTimer(_TURN, TURN_GRACE))
        return actions + self._progress() + self._rearm_filler()

    def _turn_responds(self) -> bool:
        """Whether the server answers a caller's turn by itself: turn detection's ``create_response``, true
        unless code set it false (or turned detection off)."""
        path = ("audio", "input", "turn_detection") if self.caps.nested_audio else ("turn_detection",)
        updated = self._updated or {}
        if path in updated:
            value = updated[path]
        else:
            value = self.config.session
            for key in path:
                if isinstance(value, Mapping):
                    value = value.get(key, _DEFAULT)
        if value is _DEFAULT:
            return True  # the server's default: server VAD, which responds
        return isinstance(value, Mapping) and value.get("create_response", True) is not False

    def _on_dtmf(self, event: dict[str, Any]) -> list[Action]:
        digit = event.get("event")
        if isinstance(digit, int) and not isinstance(digit, bool):
            digit = str(digit)
        if not isinstance(digit, str) or not digit or len(digit) > 16:
            return self._caller_turn()  # a key was pressed, but which one is not said: no digit to report
        return [*self._caller_turn(), Notice("dtmf", {"digit": digit})]

    def _caller_turn(self, *, speech: bool = False) -> list[Action]:
        """The caller spoke (``speech``: their speech was detected), keyed or typed: a new turn. The same
        tool call asked for again is no loop, and a loop breaker's "no tools" is not owed to this turn;
        the idle limit starts again, the speech idle limit on speech alone (and an end they had asked for
        is withdrawn: see :meth:`_caller_back`)."""
        self._last_signature, self._repeat, self._without_tools = None, 0, False
        self._corrections = 0
        self._unnudge()
        back = self._caller_back(speech=speech) if self._end is not None else []
        return back + self._touch_idle() + (self._heard_speech() if speech else [])

    def _caller_back(self, *, speech: bool = False) -> list[Action]:
        """The caller is active while the idle limit ends the call, before its hangup went out: they are
        back. The end is withdrawn (``call.limit_withdrawn``; the idle clock then starts again): a
        goodbye not started yet is cancelled as it starts, one under way or still heard is stopped
        (unless the caller's speech is what cuts it off: the server's turn detection does, as for any
        reply), and a refused one is not sent again. Once the speech idle limit ran out too, only the
        caller's ``speech`` withdraws it (the far side's clock would cut the call anyway). Any other end
        stands."""
        end = self._end
        if end is None or not end.withdrawable or end.verb_sent or (end.by_speech and not speech):
            return []
        self._end = None
        actions: list[Action] = [Notice("call.limit_withdrawn", {"limit": "idle"}), CancelTimer(_END_CAP)]
        if self._create_sent is not None and self._tag_of(self._create_sent) == _GOODBYE:
            self._cancel_next = self._create_sent
        elif not self._speaking:
            ours = self._ours
            said = ours[0] if ours is not None and self._tag_of(ours[1]) == _GOODBYE else end.said
            if isinstance(said, str):
                actions += self._stop(said)
        return actions

    def _unnudge(self) -> None:
        """The caller is there: a question whether they are still there, not yet asked, is not asked."""
        if self._nudged and self.config.idle_prompt_instructions in self._queued_say:
            self._queued_say.remove(self.config.idle_prompt_instructions)
        self._nudged = 0

    def _answered(self, response_id: object = None) -> list[Action]:
        """The model has had its say (``response_id``'s response, or its playback, is over): the caller's
        turn to speak. Not after the server's prompt to a silent caller: they are no less silent for it
        (and an idle limit that came due while it was said is reached now)."""
        if self._prompt is not None and response_id == self._prompt:
            busy = self._response_active or self._playing or self._running or self._speaking
            if self._idle_due and not (busy or self._owed_ours):
                return self._idle_reached()
            return []
        return self._touch_idle() if self.caps.idle_after_answers else []

    @property
    def response_pending(self) -> bool:
        """Whether a response is about to start: our create is out, unanswered so far, or the server is
        expected to answer the caller's turn (or a silence) by itself."""
        return self._create_sent is not None or self._turn_wait or self._prompt_due

    @property
    def _owed_ours(self) -> bool:
        """A response of ours is asked for, or will be (outputs answered, a refused create, a say())."""
        return self._want_response or bool(self._retry) or self._create_sent is not None or self._say_owed

    def _on_idle_prompt(self, event: dict[str, Any]) -> list[Action]:
        """The server's turn detection found the caller silent for its ``idle_timeout_ms``: it commits the
        silence and answers it with a response of its own, which what we would start now would cross
        (it waits, as after the caller's words). Our idle limit keeps counting."""
        item = event.get("item_id")
        self._prompt_due = self._turn_wait = True
        self._prompt_items = (*self._prompt_items[-3:], item)
        start, end = event.get("audio_start_ms"), event.get("audio_end_ms")
        silent = end - start if isinstance(start, int) and isinstance(end, int) else None
        return [
            Notice("call.idle_prompt", {"item_id": item, "silent_ms": silent}),
            StartTimer(_TURN, TURN_GRACE),
        ]

    def _idle_reached(self, *, nudge: bool = True) -> list[Action]:
        self._idle_due = False
        if self._end is not None:
            return []  # the call is ending for another reason already
        self._unanswered = False  # a turn unanswered for a whole period: no wait worth timing
        server_prompts = self._prompt is not None or self._prompt_due  # (the server asked them already)
        if nudge and self._nudged < self.config.idle_prompts and not server_prompts:
            # Asked whether they are still there; the model's answer starts the clock again (and the
            # period, once more, where answers do not).
            self._nudged += 1
            actions: list[Action] = [Notice("call.idle_nudge", {"nudge": self._nudged})]
            if self.config.max_idle_duration:
                actions.append(StartTimer(_IDLE, self.config.max_idle_duration))
            return actions + self.say(self.config.idle_prompt_instructions)
        ending = self._ask_end(_IDLE_TIMEOUT, "hangup", None, goodbye=True, withdrawable=True)
        return [Notice("call.limit", {"limit": "idle"}), *ending]

    def _speech_idle_reached(self) -> list[Action]:
        """The far side's idle limit, which only the caller's speech restarts, comes due: the idle limit's
        end (no question first: it would restart none of that clock), which text or keys no longer
        withdraw. An idle end under way already stands for it too."""
        end = self._end
        if end is None:
            actions = self._idle_reached(nudge=False)
            end = self._end
        else:
            actions = []
        if end is not None and end.withdrawable:
            end.by_speech = True
        # An utterance still under way started a whole period ago: the far side cuts the call from its
        # start however long it goes on, and its stop may never come (the audio stopped coming mid-speech:
        # the far side hears no silence to end it). Nothing waits for it any more: the goodbye goes now.
        return actions + self._speech_dropped()

    def _heard_speech(self) -> list[Action]:
        """The caller spoke: the speech idle limit (:attr:`MachineConfig.speech_idle_duration`) starts
        again."""
        if self.config.speech_idle_duration and self._end is None:
            return [StartTimer(_SPEECH_IDLE, self.config.speech_idle_duration)]
        return []

    def _touch_idle(self) -> list[Action]:
        self._idle_waited = self._idle_due = self._prompt_due = False
        self._prompt = None
        if self.config.max_idle_duration and self._end is None:
            return [StartTimer(_IDLE, self.config.max_idle_duration)]
        return []

    def _on_playback_started(self, event: dict[str, Any]) -> list[Action]:
        self._playing = True
        self._heard = event.get("response_id")
        self._play_unsure = self._play_overdue = False
        if self._unanswered and (self._prompt is None or self._heard != self._prompt):
            self._unanswered = False  # (the server's idle prompt is no answer: it comes after silence)
            if self._end is not None and self._is_goodbye(self._heard):
                return []  # (nor is the goodbye, said once no answer to the caller came)
            return [Notice("turn.answered", {"response_id": self._heard})]
        return []

    def _is_goodbye(self, response_id: object) -> bool:
        """Whether ``response_id`` is the end's goodbye (under way, or ended)."""
        ours, end = self._ours, self._end
        if ours is not None and ours[0] == response_id:
            return self._tag_of(ours[1]) == _GOODBYE
        return end is not None and response_id is not None and response_id == end.said

    def _on_playback_cleared(self, event: dict[str, Any]) -> list[Action]:
        """The caller cut in: the rest of the model's audio was dropped. Its line of the transcript holds
        words the caller never heard: it is marked (now, or when it comes)."""
        response_id = event.get("response_id")
        end = self._end
        if end is not None and response_id is not None and response_id == end.said:
            self._goodbye_cut(end)  # (the goodbye had ended, its audio was playing)
        actions: list[Action] = []
        if response_id is not None and response_id == self._last_line_response:
            actions.append(Notice("agent.interrupted", {"response_id": response_id}))
        elif response_id is not None:
            self._cut_response = response_id
        return actions + self._on_playback_stopped(event)

    def _on_playback_stopped(self, event: dict[str, Any]) -> list[Action]:
        self._playing = self._play_unsure = self._play_overdue = False
        if self._end is not None:
            self._end.held = False  # the last words were heard to their end: nothing more to wait for
        return self._answered(event.get("response_id")) + self._progress() + self._rearm_filler()

    def _on_error(self, event: dict[str, Any]) -> list[Action]:
        error = _obj(event.get("error"))
        code = error.get("code")
        fields = {**_error_fields(error), "param": error.get("param")}
        event_id = error.get("event_id")
        if (
            isinstance(event_id, str)
            and event_id.startswith(_CANCEL_EVENT)
            and code == "response_cancel_not_active"
        ):
            # Our cancel came after the response had ended: nothing to stop.
            return [Notice("response.cancel_late", {"code": code})]
        self._last_error = fields
        if code == "session_expired":
            return [Notice("sideband.error", fields), *self._close("session_expired")]
        if error.get("type") == "session_timeout":
            return [Notice("sideband.error", fields), *self._close(str(code or "session_timeout"))]
        actions: list[Action] = [Notice("sideband.error", fields)]
        if self._updates is not None and isinstance(event_id, str):
            actions += self._update_refused(event_id)
        if event_id is None and code == "conversation_already_has_active_response":
            # The error names no event: our unanswered create, else the one a response.created was taken
            # to answer (that response was then the caller's turn, started before ours arrived).
            event_id = self._create_sent or self._created_for
            self._created_for = None
        if isinstance(event_id, str) and event_id.startswith(_OUTPUT_EVENT):
            # An output the server refused (e.g. an unknown call id) will never be acknowledged.
            actions += self._settled_output(event_id[len(_OUTPUT_EVENT) :])
        refused = self._recent_creates.pop(str(event_id), None)
        if refused is not None and event_id == self._cancel_next:
            # Interrupted before it started: refused, it is not asked for again.
            self._cancel_next = None
            if self._create_sent == event_id:
                self._create_sent = None
            return actions + self._progress()
        if refused is not None:
            # One of our response.create was refused (a response.created we saw may not have been ours).
            unanswered = self._create_sent == event_id
            if unanswered:
                self._create_sent = None
            if self._ours is not None and self._ours[1] == event_id:
                # The response taken for its answer is someone else's (the server's answer to the caller,
                # untagged): not ours, its calls are not run while the call ends, nor is it the goodbye.
                self._ours = None
            crossed, self._crossed = self._crossed, None
            if (
                code == "conversation_already_has_active_response"
                and crossed is not None
                and crossed[1] == event_id
                and crossed[0] == self.responding
            ):
                # Refused for the server's answer to the caller's turn, which answers what ours would
                # have (it saw all we had sent): not asked again, unless that answer does not complete.
                self._covered_by = crossed[0]
            elif code == "conversation_already_has_active_response":
                # Someone else's response runs; ours goes out again after its response.done. If no
                # response.created came since ours was sent, that response is yet to be announced: wait
                # for it. If it came and ended already (the error can arrive late), send again now.
                if unanswered and not self._done_since_create:
                    self._response_active = True
                # (a greeting asked again after it failed is a refused greeting now: see _stale)
                self._owe(refused if refused[1] != _GREETING_AGAIN else (refused[0], _GREETING))
            else:
                actions += self._refused(refused, error)
            actions += self._progress()
        return actions

    def _refused(self, create: tuple[dict[str, Any], str | None], error: dict[str, Any]) -> list[Action]:
        """Our ``create`` was refused for another reason than a response under way. A fault of the
        server's (``server_error``, a rate limit) is asked for again once, as a response that ended
        ``failed`` is; a request it found invalid is not (it would be refused again). Either way it is
        reported, with what it was for."""
        body, tag = create
        retry = False
        if error.get("type") != "invalid_request_error":  # (the app's own mistake breaks no run)
            self._failed_in_row += 1
            retry = self._failed_in_row == 1 and self._end is None
        if retry:
            self._owe((body, _GREETING_AGAIN if tag == _GREETING else tag))
        purpose = _GREETING if tag == _GREETING_AGAIN else tag or "response"
        return [Notice("response.refused", {"purpose": purpose, "code": error.get("code"), "retry": retry})]

    def _on_item_ack(self, event: dict[str, Any]) -> list[Action]:
        item = event.get("item")
        if not isinstance(item, dict):
            return []
        if item.get("type") == "function_call_output":
            return self._settled_output(str(item.get("call_id")))
        if item.get("role") == "user" and _has_text(item):
            # (the server took code's text, not the caller's audio: speech it reports from now on is after
            # it; an answer that starts from now on sees it)
            self._text_out, self._text_unseen = False, None
        return []

    def _arrived(self, create: str) -> None:
        """The server started a response for our create ``create``: our outputs that went out before it
        on the same socket arrived too (in order), their acknowledgements lost with it or not: none of
        them is sent again."""
        before = self._outputs_before
        if before is None or before[0] != create:
            return
        self._outputs_before = None
        unacked = self._unacked
        if unacked is None:
            return
        for call_id in before[1]:
            unacked.pop(call_id, None)
        if not unacked:
            self._unacked = None
        self._resend = tuple(c for c in self._resend if c in (self._unacked or ()))

    def _settled_output(self, call_id: str) -> list[Action]:
        """The server acknowledged (or refused) our output for ``call_id``: it is never sent again."""
        if not self._unacked or self._unacked.pop(call_id, None) is None:
            return []
        if not self._unacked:
            self._unacked = None
        if self._resend and not any(c in (self._unacked or ()) for c in self._resend):
            self._resend = ()  # all of them arrived after all: nothing to send again
            return self._progress()
        return []

    # ------------------------------------------------------------------------------ decisions
    def _output(self, call_id: str, output: str) -> Send:
        event = _output(call_id, output)
        if self.caps.resumable:  # kept to be sent again after a re-attach
            event["event_id"] = _OUTPUT_EVENT + call_id  # an error about it names this
            if self._unacked is None:
                self._unacked = {}
            self._unacked[call_id] = (event, 0, self._socket)
        return Send(event)

    def _create(self, response: dict[str, Any] | None = None, tag: str | None = None) -> Send:
        self._seq += 1
        event_id = f"{_CREATE_EVENT}{self._seq}"
        self._create_sent, self._created_for = event_id, None
        self._done_since_create = False
        self._recent_creates[event_id] = (response or {}, tag)
        if len(self._recent_creates) > 8:
            del self._recent_creates[next(iter(self._recent_creates))]
        unacked = self._unacked
        if unacked is not None:
            before = frozenset(c for c, (_, _, socket) in unacked.items() if socket == self._socket)
            self._outputs_before = (event_id, before) if before else None
        else:
            self._outputs_before = None
        event: dict[str, Any] = {"type": "response.create", "event_id": event_id}
        if self.caps.tags_responses:  # echoed on the response it starts: see _answered_create
            response = {**(response or {}), "metadata": {_TAG: event_id}}
        if response:
            event["response"] = response
        return Send(event)

    @property
    def _busy(self) -> bool:
        return self._response_active or self._create_sent is not None

    @property
    def _going(self) -> bool:
        """The end's hangup/refer is out: nothing more is started or said."""
        return self._end is not None and self._end.verb_sent

    def _progress(self) -> list[Action]:
        """Send the next response.create if one is owed and allowed; move a pending end along."""
        if self._closed is not None or self._busy or self._going:
            return []
        caller_done = not (self._speaking or self._turn_wait)  # never over the caller, nor their answer
        if self._live and caller_done:
            # (an engine that does not speak over tools holds any create until every output is in)
            if self._retry and (self.caps.speaks_over_tools or not self._running):
                (body, tag), self._retry = self._retry[0], self._retry[1:]
                if tag is None or not self._stale(tag):
                    if tag is not None and tag.startswith(_FILLER):
                        self._filler_spoken = True  # one filler per wait
                    return [self._create(body, tag)]
                purpose = _GREETING if tag == _GREETING_AGAIN else tag
                return [Notice("response.dropped", {"purpose": purpose}), *self._progress()]
            if self._want_response and self._running == 0 and not self._resend:
                # (held while outputs may still have to be sent again after a re-attach: it follows them)
                self._want_response = self._text_owed = False
                if self._without_tools:
                    self._without_tools = False
                    return [self._create(dict(_NO_TOOLS))]
                return [self._create()]
            if self._say_owed and (self.caps.speaks_over_tools or not self._running):
                if self._end is not None:
                    self._end.says -= 1
                return [self._create({"instructions": self._queued_say.pop(0)})]
        if self._end is not None:
            return self._fire_end(forced=False)
        return []

    def _stale(self, tag: str) -> bool:
        """Whether a refused create is no longer worth sending again: the greeting (whatever response ran
        instead was the opening, and only the opening is a greeting; one asked again after it failed,
        once the caller has spoken: the answer to them opens), or a filler once no tool runs (a
        late "still working on it" would come before, or after, the real answer) or the call is ending;
        the end's goodbye once the end was withdrawn (the caller is back: see :meth:`_caller_back`), or
        replaced by one that says none (see :meth:`request_end`). A
        filler stays apt while a tool of its response still runs, its own or a sibling."""
        if tag == _GOODBYE:
            return self._end is None or not self._end.parting
        if tag == _GREETING_AGAIN:  # one that failed: said unless the caller spoke since (their answer opens)
            return self.caller_turns > 0 or self._end is not None
        if tag == _GREETING or self._end is not None:
            return True
        call = self._calls.get(tag[len(_FILLER) :])
        return call is None or not any(
            c.state == "running" and c.response_id == call.response_id for c in self._calls.values()
        )

    def _after_reattach_grace(self) -> list[Action]:
        """No ``response.done`` settled the calls announced before a re-attach: answer them; send again
        our outputs still unacknowledged since then (see :meth:`reattached`). Nothing once the end's verb
        is out: the call is going."""
        end = self._end
        if end is not None:
            end.held = False
        actions: list[Action] = []
        if self._play_unsure:
            if self._response_active:  # its audio shows with playback events, else its end settles it
                self._play_overdue = True
            else:
                self._playing = self._play_unsure = False  # its stop may have come with no socket attached
                actions += self._answered(self._heard)
        lost, self._lost = self._lost, None
        if lost is not None and self._create_sent == lost[0]:
            actions += self._ask_again(lost[0])
        if self._going:
            self._resend, self._orphans = (), ()
            return actions
        answer = False  # outputs go out that the model is to answer
        if self._resend:
            if self._response_active:  # it may hold their acknowledgements: look again after it
                actions.append(StartTimer(_ORPHANS, self.config.reattach_grace))
            else:
                due = [c for c in self._resend if c in (self._unacked or ())]
                actions += self._send_again(due)
                sent = [c for c in due if c in (self._unacked or ())]  # (not those given up)
                answer = any(c not in self._calls or not self._calls[c].quiet for c in sent)
                self._resend = ()
        for call_id in self._orphans:
            call = self._calls.get(call_id)
            if call is None or call.state != "pending":
                continue
            call.state = "answered"
            actions.append(Notice("tool.interrupted", {"tool_call_id": call_id, "tool": call.name}))
            actions.append(self._output(call_id, _INTERRUPTED))
            answer = True
        self._orphans = ()
        if answer:
            self._want_response = True
            if self._reasked is not None and self._reasked[1] is None:
                self._reasked = None  # (the lost create's response, should it show, did not see these)
        return actions + self._progress() + self._rearm_filler()

    def _send_again(self, due: list[str]) -> list[Action]:
        """Send again our outputs ``due``, unacknowledged since a re-attach (see :meth:`reattached`): each
        stays kept until the server acknowledges it, and is sent again after each re-attach, up to
        :data:`OUTPUT_RESENDS` times; then it is given up (``tool.output_lost``)."""
        unacked = self._unacked or {}
        actions: list[Action] = []
        for call_id in due:
            event, resends, _ = unacked[call_id]
            if resends < OUTPUT_RESENDS:
                unacked[call_id] = (event, resends + 1, self._socket)
                actions.append(Send(event))
                continue
            # An output the server never takes (each socket it goes out on is lost) must not be sent
            # again and again, a create after it every time.
            del unacked[call_id]
            actions.append(
                Notice(
                    "tool.output_lost",
                    {"tool_call_id": call_id, "tool": self.tool_name(call_id), "sent": resends + 1},
                )
            )
        if not unacked:
            self._unacked = None
        return actions

    def _ask_again(self, event_id: str) -> list[Action]:
        """Our create ``event_id`` left for a lost socket, and nothing on the new one showed it arrived
        within the re-attach grace: it is owed again, once (see :meth:`reattached`), unless it was
        cancelled before it started (:meth:`interrupt`) or the call is going."""
        self._create_sent = None
        create = self._recent_creates.get(event_id)
        if self._cancel_next == event_id:
            self._cancel_next = None
            return []
        if create is None or self._going:
            return []
        body, tag = create
        plain = _plain(create)
        if not (plain and self._want_response):  # (merged with an answer owed anyway, it is that answer)
            self._reasked = (event_id, None if plain else body)
        # (a greeting asked for again is said unless the caller has spoken since: see _stale)
        self._owe((body, _GREETING_AGAIN if tag == _GREETING else tag))
        return [Notice("response.lost", {"purpose": tag or "response"})]

    def _drop_copy(self, body: dict[str, Any] | None) -> None:
        """The response of our create lost with a socket shows after all, once it was asked for again
        (its copy's ``body``; ``None``: a plain create): the copy is not asked for, or, on its way, is
        cancelled as it starts (and not asked for again if refused). A plain one stays owed while what
        it answers may go beyond what the lost one saw (a tool runs, an output is unacknowledged, code's
        text awaits its answer)."""
        sent = self._create_sent
        asked = self._recent_creates.get(sent) if sent is not None else None
        if body is None:
            if self._running or self._unacked is not None or self._text_owed:
                return
            self._want_response = self._without_tools = False
            copy = _plain(asked)
        else:
            self._retry = tuple(c for c in self._retry if c[0] is not body)
            copy = asked is not None and asked[0] is body
        if copy and sent is not None and asked is not None:
            self._cancel_next = sent
            self._recent_creates[sent] = (asked[0], None)  # (cut at its start: no greeting, no goodbye)

    def _seen_lost(self, response: dict[str, Any]) -> str | None:
        """The event id of our create lost with a socket, still awaited, if ``response``, ending on the
        new one without its ``response.created`` seen, answers it (tagged with it; where the server echoes
        no tags, any but the one under way at the loss: the next to start after our create is taken for
        ours). That create is then no longer awaited."""
        lost = self._lost
        if lost is None or self._create_sent != lost[0] or response.get("id") == lost[1]:
            return None  # (not awaited any more: its response.created came, or it was refused)
        if self.caps.tags_responses and _obj(response.get("metadata")).get(_TAG) != lost[0]:
            return None
        self._lost = self._create_sent = None
        return lost[0]

    @property
    def _quiet(self) -> bool:
        """Nobody speaks: no response runs or is asked for, no audio of the model plays, the caller is
        not mid-utterance."""
        return not (self._busy or self._speaking or self._turn_wait or self._playing or self._play_unsure)

    def _filler(self, call_id: str) -> list[Action]:
        call = self._calls.get(call_id)
        if call is None or call.state != "running" or self._filler_spoken or self._end:
            return []
        if not self._quiet:  # the holding phrase fills silence: timed again once the line goes quiet
            self._filler_due = True
            return []
        self._filler_due = False
        self._filler_spoken = True
        return [
            Notice("tool.filler", {"tool_call_id": call_id, "tool": call.name}),
            self._create(
                {"instructions": self.config.filler_instructions, "tool_choice": "none"}, _FILLER + call_id
            ),
        ]

    def _rearm_filler(self) -> list[Action]:
        """The line went quiet while a filler was due: the wait of a tool still running starts again from
        here (the one that came due may have finished meanwhile, its sibling not)."""
        if not self._filler_due or not self._quiet:
            return []
        self._filler_due = False
        if self._filler_spoken or self._end is not None:
            return []
        for call in self._calls.values():
            after = self.config.filler_after.get(call.name) if call.state == "running" else None
            if after:
                return [StartTimer(_FILLER + call.call_id, after)]
        return []

    def _fire_end(self, *, forced: bool) -> list[Action]:
        end = self._end
        if end is None or end.verb_sent or self._closed is not None:
            return []
        if not forced:
            if (
                self._running
                or self._want_response
                or self._busy
                or self._resend
                or end.held
                or self._say_owed
            ):
                return []  # (outputs that may have to be sent again after a re-attach go first)
            if self._speaking or self._turn_wait:
                return []  # the caller speaks, or the server's answer to them is on its way
            if end.goodbye is not None:
                if not self._live:
                    return []  # not a word before our session config (the end cap still holds)
                goodbye, end.goodbye = end.goodbye, None
                end.byes += 1
                return [self._create({"instructions": goodbye, "tool_choice": "none"}, _GOODBYE)]
            if self._playing and self.caps.audio_playback_events:
                return []
        end.verb_sent = True
        actions: list[Action] = [CancelTimer(_END_CAP)]
        if forced:
            actions.append(Notice("call.end_forced", {"reason": end.reason}))
        if end.verb is None:
            return actions + self._close(end.reason)
        return [*actions, Verb(end.verb, end.target)]

    def _transfer_unconfirmed(self, why: str = "window") -> list[Action]:
        """The server has not ended the call :attr:`MachineConfig.transfer_confirm` seconds after the
        refer's 200 (``why``: ``window``), or the wait was cut short (``sideband_lost``: the socket lost
        and not attached again; ``shutdown``): the call is hung up (``transfer_failed``, or
        ``transferred`` when the hangup finds it gone)."""
        end = self._end
        if end is None or not self.transferring:
            return []
        target = end.target
        end.reason, end.verb, end.target = "transfer_failed", "hangup", None
        waited = self.config.transfer_confirm if why == "window" else None
        return [
            Notice("call.transfer_unconfirmed", {"target": target, "why": why, "waited_s": waited}),
            Notice("call.ending", {"reason": end.reason, "verb": "hangup", "target": None}),
            Verb("hangup"),
        ]

    def _close(self, reason: str) -> list[Action]:
        self._closed = reason
        actions: list[Action] = [CancelTool(c.call_id) for c in self._calls.values() if c.state == "running"]
        return [*actions, Close(reason)]


_Handler = Callable[["CallMachine", dict[str, Any]], list[Action]]

# Server event type → handler. Read-only and shared by every call.
_HANDLERS: Mapping[str, _Handler] = MappingProxyType(
    {
        "session.created": CallMachine._on_session_created,
        "session.updated": CallMachine._on_session_updated,
        "response.created": CallMachine._on_response_created,
        "response.done": CallMachine._on_response_done,
        "response.function_call_arguments.done": CallMachine._on_arguments_done,
        "response.output_item.added": CallMachine._on_output_item,
        "response.output_item.done": CallMachine._on_output_item,
        "conversation.item.input_audio_transcription.completed": CallMachine._on_caller_transcript,
        "conversation.item.input_audio_transcription.failed": CallMachine._on_transcript_failed,
        "response.output_audio_transcript.done": CallMachine._on_agent_transcript,
        "response.output_text.done": CallMachine._on_agent_text,
        "response.text.done": CallMachine._on_agent_text,
        "input_audio_buffer.speech_started": CallMachine._on_caller_activity,
        "input_audio_buffer.speech_stopped": CallMachine._on_speech_stopped,
        "input_audio_buffer.committed": CallMachine._on_speech_stopped,  # (a stop the server skipped)
        "input_audio_buffer.dtmf_event_received": CallMachine._on_dtmf,
        "input_audio_buffer.timeout_triggered": CallMachine._on_idle_prompt,
        "output_audio_buffer.started": CallMachine._on_playback_started,
        "output_audio_buffer.stopped": CallMachine._on_playback_stopped,
        "output_audio_buffer.cleared": CallMachine._on_playback_cleared,  # the caller cut in
        "error": CallMachine._on_error,
        "mcp_list_tools.failed": CallMachine._on_mcp_failed,
        "response.mcp_call.failed": CallMachine._on_mcp_failed,
        "conversation.item.added": CallMachine._on_item_ack,
        "conversation.item.done": CallMachine._on_item_ack,
        "conversation.item.created": CallMachine._on_item_ack,  # the beta name, from older servers
    }
)
ACK_TYPES = frozenset({"conversation.item.added", "conversation.item.done", "conversation.item.created"})
"""Events that acknowledge our tool outputs: worth decoding only while :attr:`CallMachine.awaiting_acks`."""
HANDLED_TYPES = frozenset(_HANDLERS) - ACK_TYPES
"""Server event types a :class:`CallMachine` acts on; drivers may skip decoding any other."""


def _fields(session: Mapping[str, Any]) -> list[tuple[tuple[str, ...], Any]]:
    """The fields a partial session sets, each with its path: ``audio`` down to a side's key
    (``("audio", "output", "voice")``), anything else at the top (a ``turn_detection``, ``tools`` or
    ``instructions`` value is replaced whole, as the server takes it). ``type`` is left out."""
    out: list[tuple[tuple[str, ...], Any]] = []
    for key, value in session.items():
        if key == "type":
            continue
        if key == "audio" and isinstance(value, Mapping):
            for side, part in value.items():
                if isinstance(part, Mapping):
                    out += [(("audio", side, name), inner) for name, inner in part.items()]
                else:
                    out.append((("audio", side), part))
        else:
            out.append(((key,), value))
    return out


def _session_of(fields: Iterable[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    """A partial session setting these fields (by path, as :func:`_fields` gives them):
    ``{"type": "realtime", "audio": {"output": {"voice": …}}}``."""
    session: dict[str, Any] = {"type": "realtime"}
    for path, value in fields:
        part = session
        for key in path[:-1]:
            part = part.setdefault(key, {})
        part[path[-1]] = value
    return session


def _without(session: Mapping[str, Any], paths: Iterable[tuple[str, ...]]) -> dict[str, Any]:
    """``session`` without the fields at ``paths`` (an ``audio`` part they leave empty goes too)."""
    out = dict(session)
    for path in paths:
        part, parents = out, []
        for key in path[:-1]:
            inner = part.get(key)
            if not isinstance(inner, Mapping):
                break
            part[key] = inner = dict(inner)
            parents.append((part, key))
            part = inner
        else:
            part.pop(path[-1], None)
            for parent, key in reversed(parents):
                if parent[key]:
                    break
                del parent[key]
    return out


def _error_fields(error: Mapping[str, Any]) -> dict[str, Any]:
    """What a server error object says, as the notices name it: code, error_type, message."""
    return {"code": error.get("code"), "error_type": error.get("type"), "message": error.get("message")}


def _plain(create: tuple[Mapping[str, Any], str | None] | None) -> bool:
    """Whether a create of ours (body, tag) is a plain one: it answers outputs (see ``_owe``)."""
    return create is not None and create[1] is None and (not create[0] or create[0] == _NO_TOOLS)


def _seq_of(event_id: str) -> int:
    """The sequence number of an event id of ours (``sb_create_12`` → 12; -1 for another's)."""
    number = event_id.rpartition("_")[2]
    return int(number) if number.isdigit() else -1


def _has_text(item: Mapping[str, Any]) -> bool:
    """Whether a conversation item holds typed text (``input_text``: code's, not the caller's audio)."""
    content = item.get("content")
    return isinstance(content, list) and any(
        isinstance(part, dict) and part.get("type") == "input_text" for part in content
    )


def _obj(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one: a field of an odd shape is as good as absent."""
    return value if isinstance(value, dict) else {}
