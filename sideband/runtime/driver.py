"""The thin async driver around a :class:`CallMachine`: owns the socket, tool tasks and timers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import structlog
from websockets.exceptions import ConnectionClosed
from websockets.protocol import CLOSED

from sideband import jsonio
from sideband.blocking import in_thread, log_blocked, timed
from sideband.context import NO_ACTIONS, CallContext
from sideband.logs import failure_fields
from sideband.metrics import (
    APP_END_REASON,
    END_REASONS,
    UNKNOWN_TOOL,
    EndReason,
    Histogram,
    ToolStats,
    end_reason,
    zeros,
)
from sideband.runtime import guard as guards
from sideband.runtime.guard import GUARDED_DELTAS, GUARDED_DONE, OutputGuard
from sideband.runtime.machine import (
    ACK_TYPES,
    HANDLED_TYPES,
    OUTPUT_RESENDS,
    STOPPED_OUTPUT,
    Action,
    CallMachine,
    CancelTimer,
    CancelTool,
    Close,
    Notice,
    RunTool,
    Send,
    StartTimer,
    TimerBy,
    Verb,
    Withdraw,
)
from sideband.session import SessionConfigError, check_sip_audio, session_update
from sideband.tools import (
    Outcome,
    ToolError,
    TransferNotAllowed,
    cancelled_result,
    failed_result,
    is_async_callable,
    own_cancellation,
)
from sideband.upstream._ws import PushConnection
from sideband.upstream.openai import CallGone, UpstreamError
from sideband.usage import Usage

if TYPE_CHECKING:
    from sideband.tools import ToolRegistry, ToolResult

__all__ = [
    "END_HOOK_TIMEOUT",
    "HOOK_GRACE",
    "CallHooks",
    "CallRegistry",
    "CallRuntime",
    "CallSummary",
    "EndReason",
    "ToolOutcome",
    "ToolRecord",
    "TranscriptRole",
]

Connect = Callable[[], Awaitable[PushConnection]]
VerbCall = Callable[[str, str | None], Awaitable[bool | None]]
"""Carries out a hangup or refer (the verb, the refer's target); ``True`` when it found the call ended
meanwhile (a REFER whose answer was lost, the hangup that followed it finding the call gone)."""

_CLEAN_CLOSES = frozenset({1000, 1001})
_HANDLED = frozenset(t.encode() for t in HANDLED_TYPES)
_ACKS = frozenset(t.encode() for t in ACK_TYPES)
_DELTAS = frozenset(t.encode() for t in GUARDED_DELTAS)
_GUARDED = GUARDED_DELTAS | GUARDED_DONE  # the events an output guard is fed
_KEEPALIVE = "\x00keepalive"  # a driver timer name no machine timer can take
_TYPE_AHEAD = 16  # keys kept for the next collection at most (the last ones)
_ITEMS_KEPT = 16  # conversation items of ours awaiting their acknowledgement, at most (the last ones)
# The one acknowledgement of each item (GA: added, then done; beta: created): one sent item per server item
_ITEM_ACKS = frozenset({"conversation.item.added", "conversation.item.created"})
_ITEM_EVENT = "sb_item_"  # the event_id prefix of our message items (an error names the one it refuses)
_UNSET: Any = object()

HOOK_GRACE = 2.0
"""Seconds a call's hooks still running or queued when it ends get to finish, in all: then those running
are cancelled (and awaited, with a ``hook.cancelled`` warning naming each) and the ones queued behind them
are dropped (``hook.skipped``)."""
END_HOOK_TIMEOUT = 10.0
"""Seconds each ``on_call_end`` hook may run before it is cancelled (``hook.cancelled``)."""
TIMER_MOVED_NOTABLE = 5.0
"""Seconds by which the session's ``expires_at`` must bring a limit forward for ``sideband.timer_moved``
to be logged at ``info`` (less is every call's: ``debug``)."""
HOOK_SLOW = 5.0
"""Seconds a hook may run before ``hook.slow`` is logged (its kind's next events wait behind it), and
that the other kinds wait for ``on_call_start`` at most."""
TASK_GRACE = 5.0
"""Seconds a call's cancelled tools get to stop when it ends; one that ignores its cancellation is left
behind (``call.tasks_abandoned``)."""
OVERDUE_GRACE = 1.0
"""Seconds past its timeout a tool's cleanup gets before the model is answered without it: a tool that
swallows its cancellation (a bare ``except`` in a retry loop) gets the ``timeout`` output then, and what
it does later no longer counts (its task is left to the call's end, which cancels it again once
:data:`TASK_GRACE` is out)."""
_STABLE_SOCKET = 10.0  # seconds a sideband must have lasted for its loss not to count as one in a row
_MAX_RETRY_AFTER = 30.0  # seconds at most an attach waits when the server asks to (Retry-After)
_LEFT_BEHIND = 1.0  # seconds a cancelled hook gets to end before the call's end goes on without it
_CLOSE_TIMEOUT = 2.0  # seconds an ended call's socket gets for its closing handshake
_VERB_BOUND = 120.0  # seconds a call hung up without its socket waits for the hangup (it has its own budget)
_LATE_ANSWER = 1.0  # seconds a hangup's or refer's answer may still take once the call has ended
SHUTDOWN_GRACE = 5.0
"""Seconds the calls still live at the end of a drain get for their hangup before they are cancelled."""


class Flag:
    """A one-way flag to wait on, like :class:`asyncio.Event` but allocating its event (and the event's
    waiter deque) only when someone actually waits: a live call keeps three of these."""

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None
        self._set = False

    def set(self) -> None:
        """Raise the flag and wake every waiter."""
        self._set = True
        if self._event is not None:
            self._event.set()

    def is_set(self) -> bool:
        """Whether the flag is raised."""
        return self._set

    async def wait(self) -> bool:
        """Wait until the flag is raised."""
        if not self._set:
            if self._event is None:
                self._event = asyncio.Event()
            await self._event.wait()
        return True


ToolOutcome = Literal[Outcome, "cancelled", "loop_breaker", "stopped"]
"""How a tool call ended, as its :class:`ToolRecord` says: the tool's own outcome (``ok``, ``error``,
``timeout``, ``invalid_arguments``, ``unknown_tool``), or ``cancelled``, ``loop_breaker``, ``stopped``."""

TranscriptRole = Literal["caller", "agent"]
"""Who said a transcript line: ``caller`` (the input transcription) or ``agent`` (the model)."""


@dataclass(frozen=True, slots=True)
class ToolRecord:
    """One tool call, as the call-end summary reports it: ``outcome`` is the tool's (``ok``, ``error``,
    ``timeout``, ``invalid_arguments``, ``unknown_tool``), ``cancelled`` when the call's end cut it off,
    ``loop_breaker`` when the breaker refused to run it, or ``stopped`` when an output guardrail stopped
    the reply that made it (not run)."""

    call_id: str
    name: str
    outcome: ToolOutcome
    duration: float


@dataclass(slots=True)
class CallSummary:
    """What happened on a call, handed to ``on_call_end`` hooks."""

    call_id: str
    source: str
    reason: EndReason | str = ""
    """Why the call ended: one of :data:`EndReason`, or a reason of the app's own (``ctx.hangup(reason)``);
    empty until it has ended."""
    duration: float = 0.0
    """Seconds the call lasted, from :attr:`started_at` to its end (by the monotonic clock)."""
    tools: list[ToolRecord] = field(default_factory=list)
    transcript: list[tuple[TranscriptRole, str]] = field(default_factory=list)
    """``(role, text)`` lines in order: ``caller`` (the input transcription) and ``agent`` (what the model
    said, as it wrote it: a line in :attr:`interrupted` holds more than the caller heard)."""
    dtmf: str = ""
    interrupted: tuple[int, ...] = ()
    """Indices in :attr:`transcript` of the agent's lines the caller cut off (barge-in)."""
    turn_seconds: tuple[float, ...] = ()
    """For each caller turn: seconds from the caller's stop (``speech_stopped``) until the model's audio
    started (``output_audio_buffer.started``; a holding phrase counts: it ends the silence), as both
    reached sideband. Empty on a vowel engine (no playback events)."""
    guardrails: tuple[tuple[str, str], ...] = ()
    """``(guardrail, reason)`` for each reply of the model's an output guardrail stopped."""
    stopped: tuple[int, ...] = ()
    """Indices in :attr:`transcript` of the agent's lines an output guardrail stopped (what the model
    wrote before it was stopped: the caller heard some of it, or none)."""
    late_guardrails: tuple[tuple[str, str], ...] = ()
    """``(guardrail, reason)`` for each reply of the model's an output guardrail objected to only once the
    call was ending (its hangup or transfer out, or the call over): too late to stop, the caller may have
    heard it all (not in :attr:`guardrails`)."""
    started_at: float = 0.0
    """When the call started, by the wall clock: seconds since the epoch (UTC, as :func:`time.time`;
    ``datetime.fromtimestamp(summary.started_at, UTC)`` makes it a datetime). It is when sideband began
    running the call, once answered, as :attr:`duration` counts from: the call ended at ``started_at +
    duration``. 0 until it runs."""
    _usage: Usage | None = field(default=None, repr=False)

    @property
    def usage(self) -> Usage:
        """The tokens the call's responses used and the caller audio transcribed, as the server reported
        them (made on first use: a call that reported none holds none)."""
        if self._usage is None:
            self._usage = Usage()
        return self._usage


@dataclass(slots=True)
class CallHooks:
    """User callbacks (sync or async); an exception in one is logged and never ends the call.

    Each kind of hook gets the call's events in order, one at a time: an event's hooks in the order they
    were registered, after those of the kind's events before it; kinds run apart. ``on_transcript``,
    ``on_dtmf`` and ``on_tool`` hooks start once ``on_call_start`` has returned, or has run
    :data:`HOOK_SLOW` seconds. A call's sync hooks run one at a time, whatever their kind. Hooks run
    beside the call, never holding back its traffic: ``on_call_start`` starts once the session config
    (and greeting) are on their way, and what it asks for (``say``, ``update_session``…) follows them;
    tool outputs and answers go out while hooks run. A hook still running after :data:`HOOK_SLOW`
    seconds is logged (``hook.slow``): its kind's next events wait behind it. When the call ends, the
    hooks still running or queued get :data:`HOOK_GRACE` seconds in all; then those running are
    cancelled and the rest are dropped. ``on_call_end`` runs after all of
    them, each hook for at most :data:`END_HOOK_TIMEOUT` seconds. Output guardrails are no part of this
    order: they check the model's words as they stream in, beside the hooks.
    """

    on_call_start: list[Callable[..., Any]] = field(default_factory=list)
    on_call_end: list[Callable[..., Any]] = field(default_factory=list)
    on_transcript: list[Callable[..., Any]] = field(default_factory=list)
    on_dtmf: list[Callable[..., Any]] = field(default_factory=list)
    on_tool: list[Callable[..., Any]] = field(default_factory=list)
    on_response: list[Callable[..., Any]] = field(default_factory=list)
    """Called with ``(ctx, response_id, status, tools_running)`` after each ``response.done``, at once, in
    a task of its own: outside the order of the other hooks (an engine session's turns end on it, never
    behind the app's hooks; apps have no decorator for it)."""
    guardrails: list[Callable[..., Any]] = field(default_factory=list)
    """Output guardrails: called with ``(ctx, text)`` as the model's words stream in (see
    :class:`~sideband.runtime.guard.OutputGuard`)."""
    executor: concurrent.futures.Executor | None = None
    """Where sync hooks run (``None``: the tools' thread pool). The app gives its own: a hook stuck in
    its thread then holds no thread a sync tool needs."""


class CallRuntime:
    """Runs one call: connect, feed the machine, carry out its actions, clean up in ``finally``.

    Implements :class:`sideband.context.CallActions` for the call's context.
    """

    __slots__ = (
        "_abandoned",
        "_alarm",
        "_alarm_at",
        "_base_tools",
        "_before",
        "_catalog",
        "_closed",
        "_connect",
        "_deadlines",
        "_flushing",
        "_guard",
        "_hook_queue",
        "_item_count",
        "_items",
        "_keypad",
        "_log_args",
        "_log_fields",
        "_log_said",
        "_outbox",
        "_ping_interval",
        "_pong",
        "_quiet",
        "_reattach_attempts",
        "_side_tasks",
        "_spoken",
        "_stats",
        "_stop",
        "_sync_hooks",
        "_targets",
        "_tool_started",
        "_tool_tasks",
        "_trips",
        "_turn_mark",
        "_turns",
        "_typed",
        "_usage",
        "_verb_call",
        "_verb_waiting",
        "_ws",
        "attached",
        "ctx",
        "hooks",
        "log",
        "machine",
        "ready",
        "summary",
        "tools",
    )

    def __init__(
        self,
        *,
        machine: CallMachine,
        ctx: CallContext,
        tools: ToolRegistry,
        connect: Connect,
        catalog: ToolRegistry | None = None,
        verb: VerbCall | None = None,
        hooks: CallHooks | None = None,
        transfer_targets: Mapping[str, str] | None = None,
        reattach_attempts: int = 5,
        ping_interval: float | None = 20.0,
        log_tool_arguments: bool = False,
        log_transcripts: bool = True,
        log_fields: Mapping[str, Any] | None = None,
        stats: ToolStats | None = None,
        usage: Usage | None = None,
        turn_seconds: Histogram | None = None,
        guardrail_trips: Counter[str] | None = None,
    ) -> None:
        self.machine = machine
        self.ctx = ctx
        self.tools = tools
        """The tools the model is offered now (``update_session(tools=…)`` changes them)."""
        self._catalog = tools if catalog is None else catalog  # what ``update_session(tools=…)`` may name
        # After a change of tools, those the response then under way was offered (it may still call them).
        self._before: tuple[ToolRegistry, str] | None = None
        self._base_tools = tools  # (in force again when the server refuses each update of the tools)
        self._spoken = False  # the model's audio started in the call: its voice and model are set for good
        self._connect = connect
        self._verb_call = verb
        # The hangup or refer under way, unanswered so far: its task, the verb and its target.
        self._verb_waiting: tuple[asyncio.Task[Any] | None, str, str | None] | None = None
        self.hooks = hooks or CallHooks()
        self._targets = dict(transfer_targets or {})
        self._reattach_attempts = reattach_attempts
        self._ping_interval = ping_interval
        self._pong: asyncio.Future[float] | None = None
        self._log_args = log_tool_arguments
        self._log_said = log_transcripts  # False: transcript text and keypad digits stay out of logs
        self._log_fields = dict(log_fields or {})
        self._stats = stats
        self._usage = usage  # the process's (``/metrics``), counted along with the call's own
        self._turns = turn_seconds  # the process's answer times (``/metrics``)
        self._turn_mark: float | None = None  # when the caller last stopped speaking, unanswered so far
        self._trips = guardrail_trips  # the process's replies stopped, per guardrail (``/metrics``)
        self._keypad: list[asyncio.Queue[str]] | None = None  # the collections of keys under way
        # keys pressed while none was under way (typed ahead), each with the caller's turn it came in
        self._typed: list[tuple[int, str]] | None = None
        self._ws: PushConnection | None = None
        self._outbox: list[bytes] = []  # JSON text frames, a few at most (a deque: 760 bytes per call)
        # Messages we added to the conversation (code's text, a guardrail's note), not acknowledged yet
        # (see _resend_items); None when there are none
        self._items: list[_SentItem] | None = None
        self._item_count = 0  # (their event_ids)
        self._flushing = False
        # Each tool run under way, with its call id. By run, not by call id: an engine that passes on
        # the ids the model made up (call_1, every turn) runs a call id again while an earlier run of it,
        # answered past its deadline, may still be running.
        self._tool_tasks: dict[asyncio.Task[Any], str] = {}
        # When each tool run under way started (monotonic): a run the call's end gives up on is recorded
        # with the time it ran. None until a tool runs.
        self._tool_started: dict[asyncio.Task[Any], float] | None = None
        # The tool runs that no longer count: answered past their deadline while they ran on, or given
        # up by the call's end
        self._abandoned: set[asyncio.Task[Any]] | None = None
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._hook_queue: _HookQueue | None = None  # the hooks running and waiting their turn, while any
        self._quiet: asyncio.Event | None = None  # see quiet_signal(): made for whoever waits on it
        # Held by a sync hook's thread: one cut off by the call's end still runs alone (on_call_end waits).
        self._sync_hooks: asyncio.Lock | None = None
        # Woken when the call ends: a re-attach backoff, or the read loop (the socket may never close:
        # a peer that stops reading stalls the closing handshake).
        self._stop: asyncio.Future[Any] | None = None
        # The call's timers: name → loop time it fires, behind one loop timer for the earliest (a loop
        # timer handle per named timer would cost about 0.5 KiB each, per call).
        self._deadlines: dict[str, float] = {}
        self._alarm: asyncio.TimerHandle | None = None
        self._alarm_at = 0.0
        self._closed = Flag()
        self.summary = CallSummary(ctx.call_id, ctx.source)
        self.attached = Flag()
        """Set once the first socket is open (tests and benchmarks wait on it)."""
        self.ready = Flag()
        """Set once the server confirmed the session (``session.updated``)."""
        self.log = structlog.get_logger(component="sideband.call").bind(
            call_id=ctx.call_id, **self._log_fields
        )
        self._guard = (
            OutputGuard(self.hooks.guardrails, ctx, self._stopped, self.log, self._failure)
            if self.hooks.guardrails
            else None
        )
        ctx.actions = self

    # ----------------------------------------------------------------------- CallActions API
    def hangup(self, reason: str = "hangup") -> None:
        """Request the end of the call; returns at once (the end waits for in-flight outputs)."""
        self._apply(self.machine.request_end(reason))
        self._kick()

    def transfer(self, target: str) -> None:
        """Request a SIP REFER to an allow-listed target (a name from ``transfer_targets`` or its URI)."""
        uri = self._targets.get(target)
        if uri is None and target in self._targets.values():
            uri = target
        if uri is None:
            allowed = ", ".join(sorted(self._targets)) or "none for this call"
            raise TransferNotAllowed(f"transfer target {target!r} is not allowed (allowed: {allowed})")
        self._apply(self.machine.request_end("transferred", verb="refer", target=uri))
        self._kick()

    def say(self, instructions: str) -> None:
        """Ask the model to speak (after the current response, if any)."""
        self._apply(self.machine.say(instructions))
        self._kick()

    def interrupt(self) -> None:
        """Stop what the model is saying now (see :meth:`CallMachine.interrupt`)."""
        self._apply(self.machine.interrupt())
        self._kick()

    def quiet_signal(self) -> asyncio.Event:
        """An event set each time the machine has handled something and is quiet after it: no response
        under way, owed or expected, and no tool running. Its waiter clears it and checks
        :attr:`CallMachine.busy` and :attr:`CallMachine.response_pending` again. Quiet comes without a
        ``response.done`` too: the caller's turn went unanswered, a quiet tool finished."""
        if self._quiet is None:
            self._quiet = asyncio.Event()
        return self._quiet

    async def guarded(self) -> None:
        """Wait until the output guardrails have checked every word of the model's so far (at once
        without guardrails)."""
        if self._guard is not None:
            await self._guard.settled()

    async def collect_digits(self, max_digits: int | None, end: str | None, timeout: float) -> str:
        """The keys the caller presses from now on (see :meth:`CallContext.collect_digits`)."""
        keys: asyncio.Queue[str] = asyncio.Queue()
        turn, typed, self._typed = self.machine.caller_turns, self._typed or (), None
        for keyed_in, key in typed:  # typed ahead since the caller last spoke: first in line
            if keyed_in == turn:
                keys.put_nowait(key)
        if self._keypad is None:
            self._keypad = []
        self._keypad.append(keys)
        keyed: list[str] = []
        ended_by = "max_digits"
        try:
            while max_digits is None or len(keyed) < max_digits:
                try:
                    async with asyncio.timeout(timeout):
                        key = await keys.get()
                except TimeoutError:
                    ended_by = "timeout"
                    break
                if end is not None and key in end:
                    ended_by = "end_key"
                    break
                keyed.append(key)
        finally:
            if self._keypad is not None:
                self._keypad.remove(keys)
                if not self._keypad:
                    self._keypad = None
        self.log.info("dtmf.collected", keys=len(keyed), ended_by=ended_by)
        return "".join(keyed)

    def _stopped(self, guardrail: str, reason: str, response_id: str | None) -> bool:
        """An output guardrail objected to the words of ``response_id``: stop the reply, tell the model
        why (:meth:`CallMachine.correct`) and let it answer again; returns whether it was stopped. Once
        the call is ending (its hangup or transfer out, or the call over) nothing more is said: the
        verdict is logged (``stopped`` false), counted and kept in ``summary.late_guardrails``."""
        machine = self.machine
        stopping = machine.closed is None and not machine.verb_sent
        self.log.warning(
            "guardrail.tripped", guardrail=guardrail, reason=reason, response_id=response_id, stopped=stopping
        )
        if self._trips is not None:
            self._trips[guardrail] += 1
        if not stopping:
            self.summary.late_guardrails = (*self.summary.late_guardrails, (guardrail, reason))
            return False
        self.summary.guardrails = (*self.summary.guardrails, (guardrail, reason))
        if self._guard is not None:  # its lines so far (the ones still to come are marked as they come)
            self.summary.stopped += tuple(self._guard.lines_of(response_id))
        self._apply(machine.correct(f"{machine.config.guardrail_note}\nThe rule: {reason}", response_id))
        self._kick()
        return True

    @property
    def stopped_reply(self) -> str | None:
        """The id of the last reply an output guardrail stopped (not one it objected to too late: the call
        was ending)."""
        return self._guard.stopped if self._guard is not None else None

    async def _checked_tool(self, guard: OutputGuard, run: RunTool, tools: ToolRegistry) -> None:
        """Run a tool call once ``guard`` has checked the words of the reply that made it: not if a
        guardrail stopped that reply (the model is told so)."""
        await guard.settled()
        call_id, name = run.call_id, run.name
        if not guard.objected(run.response_id):
            await self._run_tool(call_id, name, run.arguments, tools)
            return
        try:
            self.log.info("tool.discarded", tool=name, tool_call_id=call_id, reason="reply_stopped")
            self._stopped_tool(call_id, name)
            self._apply(self.machine.tool_done(call_id, STOPPED_OUTPUT))
            await self._flush()
        finally:
            self._tool_ended()

    def _stopped_tool(self, call_id: str, name: str) -> None:
        """A tool call of a reply an output guardrail stopped: not run, in the record all the same."""
        record = ToolRecord(call_id, name, "stopped", 0.0)
        self._record(record)
        if self.hooks.on_tool:
            self._spawn_hooks(self.hooks.on_tool, self.ctx, record)

    def send_text(self, text: str) -> None:
        """Add a user text turn; one response follows it."""
        self._apply(self.machine.user_text(text))
        self._kick()

    def caller_active(self) -> None:
        """The caller is active (e.g. audio streamed by a backend): the idle limit starts again (and an
        idle goodbye under way is stopped at once)."""
        self._apply(self.machine.caller_active())
        self._kick()

    def send_event(self, event: dict[str, Any]) -> None:
        """Send a raw client event (e.g. ``input_audio_buffer.append``) in order with the rest."""
        self._apply(self.machine.send_raw(event))
        self._kick()

    def update_session(self, **fields: Any) -> None:
        """Send a partial ``session.update`` (see :meth:`CallMachine.update_session`). ``tools`` lists the
        names of the call's tools the model is offered from now on (and any tools the server runs itself,
        as objects); a response under way, or already asked for, may still call those it was offered.

        Raises :class:`SessionConfigError`, and sends nothing, for an update the server would refuse whole:
        a new voice or model once the model's audio started, tools leaving out the one the session's
        ``tool_choice`` forces (unless the update gives ``tool_choice`` too), a ``tool_choice`` that forces
        one the session does not offer (``"required"`` with none)."""
        if self.summary.source == "sip" and "audio" in fields:
            check_sip_audio(fields["audio"])  # (the server would refuse the whole update)
        offered = None
        if "tools" in fields:
            offered, fields["tools"] = self._offer(fields["tools"])
            if "tool_choice" not in fields:  # (given, the session's check holds it to these tools)
                self._check_choice_kept(fields["tools"])
        elif "tool_choice" in fields:
            self._check_choice_offered(fields["tool_choice"])
        self._check_voice_and_model(fields)
        self._apply(self.machine.update_session(fields))
        machine = self.machine
        if offered is not None and not machine.closed:
            # The response under way, or about to start ("": ours is asked for, or the server answers
            # the caller's turn), was offered the tools in force until now.
            under_way = machine.responding or ("" if machine.response_pending else None)
            if under_way is None:
                self._before = None
            elif self._before is None or self._before[1] != under_way:
                self._before = (self.tools, under_way)
            self.tools = offered
        self._kick()

    def _current(self, key: str) -> Any:
        """The session's ``voice``, ``model``, ``tool_choice`` or ``tools`` as last sent, less what the server
        refused (``None``: not known, or none)."""
        machine = self.machine
        path = ("audio", "output", "voice") if key == "voice" and machine.caps.nested_audio else (key,)
        value = machine.updated_field(path, _UNSET)
        if value is not _UNSET:
            return value
        session = machine.config.session
        if key == "voice":
            audio = session.get("audio")
            output = audio.get("output") if isinstance(audio, Mapping) else None
            return output.get("voice") if isinstance(output, Mapping) else None
        return session.get(key)

    def _check_voice_and_model(self, fields: Mapping[str, Any]) -> None:
        """Raises :class:`SessionConfigError` for a change of the voice or model once the model's audio
        started: OpenAI refuses the whole update then (``cannot_update_voice``), its tools and instructions
        too, and the call would go on with tools it no longer knows of."""
        if (
            not self._spoken
            or not ("voice" in fields or "model" in fields or "audio" in fields)
            or not self.machine.caps.nested_audio
        ):
            return
        update = session_update(fields)
        output = update.get("audio", {}).get("output")
        fixed = {"voice": output["voice"]} if isinstance(output, Mapping) and "voice" in output else {}
        if "model" in update:
            fixed["model"] = update["model"]
        for key, value in fixed.items():
            now = self._current(key)
            if now is not None and value != now:
                raise SessionConfigError(
                    f"the {key} cannot change once the model has spoken in the call (OpenAI refuses the "
                    f"whole update): it stays {now!r}; give the {key} with the app, the route or Accept"
                )

    def _tools_refused(self) -> None:
        """The server refused an update of the tools: those it offers are the ones set before it (see
        :meth:`CallMachine.updated_field`), which the model may call and a ``tool_choice`` may name."""
        tools = self.machine.updated_field(("tools",), _UNSET)
        if tools is _UNSET:
            self.tools = self._base_tools
            return
        names = [
            t.get("name") for t in tools if isinstance(t, Mapping) and t.get("type", "function") == "function"
        ]
        self.tools = self._catalog.subset([n for n in names if isinstance(n, str) and n in self._catalog])

    def _check_choice_kept(self, tools: list[dict[str, Any]]) -> None:
        """Raise :class:`SessionConfigError` if the session's ``tool_choice`` forces a tool that ``tools``
        (the session's from now on) leave out, or is ``"required"`` with none: the update must give its
        ``tool_choice`` too (``"auto"``, or one of ``tools``)."""
        choice = self._current("tool_choice")
        missing = _forced_missing(choice, tools)
        if missing is None:
            return
        if choice == "required":
            raise SessionConfigError(
                'tools: none left while the session\'s tool_choice is "required": '
                'give tool_choice too ("auto")'
            )
        raise SessionConfigError(
            f"tools: the session's tool_choice forces {missing!r}, which these tools leave out: "
            'give tool_choice too ("auto", or one of these tools)'
        )

    def _check_choice_offered(self, choice: Any) -> None:
        """Raise :class:`SessionConfigError` if ``choice``, an update's ``tool_choice`` that leaves the tools
        as they are, forces a tool the session does not offer now (the call's tools in force, and those the
        server runs itself, such as MCP, as last sent, else as the call's config has them), or is
        ``"required"`` with none: the model could do nothing then (the update must give ``tools`` too)."""
        served = [
            t
            for t in self._current("tools") or ()
            if isinstance(t, Mapping) and t.get("type", "function") != "function"
        ]
        tools = [*({"type": "function", "name": name} for name in self.tools.names()), *served]
        missing = _forced_missing(choice, tools)
        if missing is None:
            return
        if choice == "required":
            raise SessionConfigError(
                'tool_choice "required" with no tools: the session offers the model none to call '
                "(give tools too)"
            )
        kind = choice.get("type") if isinstance(choice, Mapping) else None
        key = "name" if kind == "function" else "server_label"
        offered = [
            str(t.get(key)) for t in tools if isinstance(t, Mapping) and t.get("type", "function") == kind
        ]
        what = "tool" if kind == "function" else "MCP server"
        raise SessionConfigError(
            f"tool_choice names the {what} {missing!r}, which the call does not offer "
            f"({', '.join(offered) or 'none'})"
        )

    def _offer(self, tools: Any) -> tuple[ToolRegistry, list[dict[str, Any]]]:
        """The registry and session ``tools`` for ``update_session(tools=…)``: names of the call's tools,
        and objects of tools the server runs itself (MCP)."""
        if isinstance(tools, str | bytes) or not isinstance(tools, Sequence):
            raise SessionConfigError("tools must be a list of tool names (and server tools, such as MCP)")
        names = [t for t in tools if isinstance(t, str)]
        served = [t for t in tools if not isinstance(t, str)]
        unknown = [n for n in names if n not in self._catalog]
        if unknown:
            offered = ", ".join(self._catalog.names()) or "none"
            raise SessionConfigError(
                f"tools: {', '.join(map(repr, unknown))} not among the call's tools ({offered})"
            )
        for tool in served:
            if not isinstance(tool, Mapping):
                raise SessionConfigError("tools: each is a tool name, or an object of a tool the server runs")
            if tool.get("type", "function") == "function":
                raise SessionConfigError(
                    f"tools: function tool {tool.get('name')!r} given as an object: name a tool of the "
                    "call's instead (a function the model calls must be answered by the app: @app.tool)"
                )
        return self._catalog.subset(names), [*self._catalog.definitions(names), *served]

    def abandon(self, reason: str) -> None:
        """Hang up now, without waiting for outputs or the model's last words, and end with ``reason``."""
        self._apply(self.machine.abandon(reason))
        self._kick()

    # ------------------------------------------------------------------------------- running
    async def run(self) -> str:
        """Drive the call to its end; return the end reason. Never raises except on cancellation."""
        structlog.contextvars.bind_contextvars(call_id=self.ctx.call_id, **self._log_fields)
        started = time.monotonic()
        self.summary.started_at = time.time()
        try:
            try:
                await self._main()
            except Exception as exc:
                self.log.exception("call.crashed")
                # Logged: its traceback (whose frames hold the future it came through, which holds it) goes.
                exc.__traceback__ = None
                # Hang up (unless a verb is out already): the caller must not stay on a call nobody controls.
                self._apply(self.machine.abandon("internal_error"))
            await self._verb_out()
        except asyncio.CancelledError:
            # Cut short (a shutdown past its grace): what the call still had under way (a hangup or refer,
            # a flush, a close) is given up too, and the end says so (hangup_failed).
            self._apply(self.machine.fail("shutdown"))
            for task in self._side_tasks:
                task.cancel()
            raise
        finally:
            ended = time.monotonic()  # (the call's own time: not its teardown's)
            try:
                try:
                    await self._cleanup()
                finally:  # (logged even if the cleanup is cut short)
                    self.summary.reason = self.machine.closed or "internal_error"
                    self.summary.duration = ended - started
                    self.log.info(
                        "call.ended",
                        reason=self.summary.reason,
                        duration_s=round(self.summary.duration, 3),
                        tool_calls=len(self.summary.tools),
                        input_tokens=self.summary._usage.input_tokens if self.summary._usage else 0,
                        output_tokens=self.summary._usage.output_tokens if self.summary._usage else 0,
                    )
                # The call has ended: its actions refuse from now on (in on_call_end, a hangup or a say
                # would do nothing). And so the context ↔ runtime cycle is broken: an ended call is freed
                # by reference counting, not by the cyclic collector (whose pauses grow with the calls).
                self.ctx.actions = NO_ACTIONS
                for hook in self.hooks.on_call_end:
                    await self._end_hook(hook)
            finally:
                self.ctx.actions = NO_ACTIONS  # (the cleanup cut short)
                self._ws = None
                self._closed.set()
        return self.summary.reason

    async def _end_hook(self, hook: Callable[..., Any]) -> None:
        """Run one ``on_call_end`` hook in a task of its own, for :data:`END_HOOK_TIMEOUT` seconds; then
        cancel it, and leave it behind if it still runs a second later (it ignores its cancellation)."""
        task = asyncio.ensure_future(self._hooks((hook,), (self.ctx, self.summary)))
        task.add_done_callback(_drop_cancellation)
        try:
            done, _ = await asyncio.wait({task}, timeout=END_HOOK_TIMEOUT)
            if done:
                return
            self.log.warning("hook.cancelled", hook=_hook_name(hook), grace_s=END_HOOK_TIMEOUT)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=_LEFT_BEHIND)
            if not done:
                self.log.error("hook.abandoned", hook=_hook_name(hook), grace_s=_LEFT_BEHIND)
        finally:
            if not task.done():
                task.cancel()  # (the run cut short meanwhile: the hook goes with it)
            elif not task.cancelled():
                task.exception()  # (logged where it ran)

    async def _main(self) -> None:
        ws = await self._open(first=True)
        if ws is None:
            return
        self._apply(self.machine.start())  # our session.update (and greeting) go out first
        if self.hooks.on_call_start:
            self._spawn_hooks(self.hooks.on_call_start, self.ctx)
        loop = asyncio.get_running_loop()
        brief, delay = 0, 0.2  # sockets in a row lost soon after they opened; the wait before the next
        while self.machine.closed is None:
            await self._flush()
            opened = loop.time()
            code = await self._pump(ws)
            if self.machine.closed is not None:
                return
            if code in _CLEAN_CLOSES:
                self._apply(self.machine.transport_closed(code))
                return
            # A transfer (its REFER out, or answered 200 and awaited) is attached again: the server may
            # have ended the call (the re-attach is refused: the REFER's answer, or the transfer, tells)
            # or the socket dropped while the call goes on, and a hangup to find out would cut the
            # caller off.
            transferring = self.machine.transferring or self.machine.referring
            if self.machine.verb_sent and not transferring:
                # Our hangup is out, unanswered (the service drops the sideband as it carries it out): its
                # answer ends the call (``run`` waits for it), and a call being hung up is not attached
                # again.
                self.log.info("sideband.lost", close_code=code)
                self._apply(self.machine.sideband_lost())
                return
            caps = self.machine.caps
            final = caps.close_reasons.get(code) if code is not None else None
            if final is not None or not caps.resumable:
                self.log.warning("sideband.lost", close_code=code)
                self._apply(self.machine.fail(final or "connection_lost"))
                return
            (self.log.info if transferring else self.log.warning)("sideband.lost", close_code=code)
            # A socket the server takes and drops again at once must not make a re-attach loop: the first
            # loss re-attaches at once, the next ones in a row wait longer each time, and once
            # SIDEBAND_REATTACH_ATTEMPTS re-attached sockets in a row were lost so soon, the call is hung
            # up (nobody can control it; a transfer awaited, as when its re-attach fails: see _open).
            if loop.time() - opened >= _STABLE_SOCKET:
                brief, delay = 0, 0.2
            else:
                brief += 1
                if brief > max(self._reattach_attempts, 1):
                    machine = self.machine
                    self._apply(
                        machine.sideband_lost() if transferring else machine.abandon("reattach_failed")
                    )
                    return
                if brief > 1:
                    await self._backoff(delay)
                    delay = min(delay * 2, 5.0)
                    if self.machine.closed is not None:
                        return
            reopened = await self._open(first=False)
            if reopened is None:
                return
            ws = reopened
            queued = self._queued_ids()
            self._resend_items()
            self._apply(self.machine.reattached(queued))

    def _resend_items(self) -> None:
        """Put the messages we added to the conversation (``send_text()``, a guardrail's note, code's own
        ``conversation.item.create`` of a message) that left for the socket just lost, and that the server
        never acknowledged, first in the outbox: a dead connection swallows what is written to it, and
        the model would answer without them. Each goes again after each re-attach until it is
        acknowledged, up to ``OUTPUT_RESENDS`` times (then ``sideband.item_lost``)."""
        items = self._items
        if items is None:
            return
        if self.machine.verb_sent:  # the call is going: nothing more is said
            self._items = None
            return
        outbox, kept, again = self._outbox, [], []
        for item in items:
            if not any(frame is item.frame for frame in outbox):  # (else it never left: it goes now)
                if item.resends >= OUTPUT_RESENDS:
                    self.log.warning("sideband.item_lost", role=item.role, sent=item.resends + 1)
                    continue
                item.resends += 1
                again.append(item.frame)
            kept.append(item)
        self._items = kept or None
        if again:
            outbox[:0] = again  # (they left before what is still queued: they go first)
            self.log.info("sideband.items_resent", items=len(again))

    def _sent_item(self, event: Mapping[str, Any]) -> bytes:
        """The frame of our ``conversation.item.create``; one of a message is kept until the server
        acknowledges it, or refuses it (it goes with an ``event_id`` that the refusal names)."""
        item = event.get("item")
        if not isinstance(item, Mapping) or item.get("type") != "message":
            return jsonio.dumps(event)
        event_id = event.get("event_id")
        if not isinstance(event_id, str) or not event_id:
            self._item_count += 1
            event_id = f"{_ITEM_EVENT}{self._item_count}"
            event = {**event, "event_id": event_id}
        frame = jsonio.dumps(event)
        items = self._items
        if items is None:
            items = self._items = []
        items.append(_SentItem(frame, _item_key(item), str(item.get("role")), event_id))
        del items[:-_ITEMS_KEPT]
        return frame

    def _refused_item(self, error: Any) -> None:
        """The server refused one of our client events: a message of ours, if it was one, is not kept to
        be sent again (it would be refused again)."""
        items = self._items
        event_id = error.get("event_id") if isinstance(error, Mapping) else None
        if items is None or not isinstance(event_id, str):
            return
        self._items = [sent for sent in items if sent.event_id != event_id] or None

    def _acked_item(self, item: Any) -> None:
        """The server acknowledged a conversation item: ours, if it is one we keep, is never sent again."""
        items = self._items
        if items is None or not isinstance(item, Mapping) or item.get("type") != "message":
            return
        key = _item_key(item)
        for index, sent in enumerate(items):
            if sent.key == key:
                del items[index]
                break
        if not items:
            self._items = None

    def _queued_ids(self) -> list[str]:
        """The ``event_id`` of each frame still in the outbox (they never left for the lost socket)."""
        ids: list[str] = []
        for frame in self._outbox:
            if b'"event_id"' in frame:
                event_id = jsonio.loads(frame).get("event_id")
                if isinstance(event_id, str):
                    ids.append(event_id)
        return ids

    async def _open(self, *, first: bool) -> PushConnection | None:
        """Attach (or re-attach) the sideband: retryable failures are tried again with backoff, up to
        ``reattach_attempts`` attempts (the first attach at least once); 404/410 ends the call at once
        (``call_not_found``; ``transferred`` for a transfer awaited after its refer's 200: the server ended
        the call as it carried the transfer out). Gives up as soon as the call has ended meanwhile (a
        timer, a hook; an attempt under way is given up then too), and the first attach as soon as its
        hangup is out (a shutdown): a call being hung up is not started. An attach that finally fails
        hangs the call up (``connect_failed``, ``reattach_failed``; a transfer awaited: ``transfer_failed``,
        see :meth:`CallMachine.sideband_lost`): the caller must not stay on a call nobody controls."""
        attempts = max(self._reattach_attempts, 1 if first else 0)
        delay = 0.2
        machine = self.machine
        for attempt in range(1, attempts + 1):
            if machine.closed is not None or (first and machine.verb_sent):
                return None
            try:
                ws = await self._attempt()
            except CallGone as exc:
                self.log.info("sideband.refused", status=exc.status, attempt=attempt)
                if machine.verb_sent and not machine.transferring:
                    # Our verb went out meanwhile, unanswered: the call ended, as the server carried it out
                    # or as the caller hung up (or the transfer took, for the hangup after its window). As
                    # for a sideband closed meanwhile, the answer of a REFER (or of that hangup) tells.
                    self._apply(machine.sideband_lost(gone=True))
                else:
                    self._apply(machine.fail("call_not_found"))
                return None
            except UpstreamError as exc:
                self.log.warning(
                    "sideband.connect_failed", status=exc.status, error=str(exc), attempt=attempt
                )
                if machine.closed is not None or (first and machine.verb_sent):
                    return None
                if not exc.retryable:
                    break
                if attempt < attempts:
                    # (as long as the server asks, up to half a minute: better than hanging up the caller)
                    await self._backoff(max(delay, min(exc.retry_after or 0.0, _MAX_RETRY_AFTER)))
                    delay = min(delay * 2, 5.0)
                continue
            if ws is None or machine.closed is not None or (first and machine.verb_sent):
                if ws is not None:
                    self._spawn(ws.close(), "close")
                return None
            self._ws = ws
            self._pong = None
            self._arm_keepalive()
            self.attached.set()
            self.log.info("sideband.attached" if first else "sideband.reattached", attempt=attempt)
            return ws
        if not first and machine.verb_sent:
            # The hangup or REFER went out meanwhile, or a transfer is awaited: the socket is lost as
            # after them (see _main). A transfer awaited is hung up now (nothing is left to tell whether
            # the server ends the call); a REFER answered later ends the call at once.
            self._apply(machine.sideband_lost())
        else:
            self._apply(machine.abandon("connect_failed" if first else "reattach_failed"))  # hangup
        return None

    async def _attempt(self) -> PushConnection | None:
        """One attach attempt; None if the call ends meanwhile (its :class:`Close` wakes this, as it
        wakes a backoff): the attempt is then given up, cancelled and awaited, as when the run is cut
        short (a socket it made all the same is dropped). An attempt that ends cancelled by itself
        raises :class:`UpstreamError` (no status: tried again)."""
        failed: list[Exception] = []  # what the attempt raised: kept here, never by its task (see _boxed)
        attempt = asyncio.ensure_future(_boxed(self._connect(), failed))
        attempt.add_done_callback(_drop_cancellation)
        stop = self._stop = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait((attempt, stop), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the run cut short (a shutdown): the attempt goes with it
            await _give_up(attempt)
            failed.clear()
            ws = None if attempt.cancelled() else attempt.result()
            if ws is not None:
                _abort(ws)
            raise
        finally:
            self._stop = None
        await _give_up(attempt)  # (the call has ended, if it still runs)
        if attempt.cancelled():
            if stop.done():
                return None
            # Ended cancelled by itself (a library making its own timeout a cancellation): a failed
            # attempt, tried again or given up as any other, never taken for the call's end.
            raise UpstreamError("the sideband attach was cancelled")
        if not failed:
            return attempt.result()
        # Raised from here, the error's traceback holds this frame, which then holds nothing of it.
        error = failed.pop()
        try:
            raise error
        finally:
            del error

    async def _verb_out(self) -> None:
        """Wait until a call hung up without its socket (an attach that failed, sockets lost again and
        again, a crash) has closed: its hangup is retried for its own budget (half a minute), which the
        cleanup's :data:`TASK_GRACE` would otherwise cut short, leaving the caller on a call nobody
        controls. (A call that ended any other way has closed already.) A transfer still waiting for the
        server to end the call gets its window on top (its hangup follows it)."""
        loop = asyncio.get_running_loop()
        machine = self.machine
        deadline = (
            loop.time() + _VERB_BOUND + (machine.config.transfer_confirm if machine.transferring else 0.0)
        )
        while self.machine.closed is None and (left := deadline - loop.time()) > 0:
            await self._backoff(left)  # (the machine's Close wakes it)

    async def _backoff(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less if the call ends meanwhile."""
        loop = asyncio.get_running_loop()
        stop = self._stop = loop.create_future()
        handle = loop.call_later(delay, _wake, stop)
        try:
            await stop
        finally:
            handle.cancel()
            self._stop = None

    async def _pump(self, ws: PushConnection) -> int | None:
        """Feed the socket's messages to the machine as they are parsed (no reader task wakes per
        message); return the close code the server sent (None: none) once the socket is lost, or None
        as soon as the machine has closed. An exception while handling a message is raised here."""
        done: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        handle, kick, machine = self._handle, self._kick, self.machine

        def on_message(message: bytes) -> None:
            if done.done():
                return
            try:
                if handle(message):
                    kick()
            except Exception as exc:
                if not done.done():
                    done.set_exception(exc)
                return
            if machine.closed is not None:
                _wake(done)

        def on_close() -> None:
            if not done.done():
                rcvd = ws.protocol.close_rcvd
                done.set_result(rcvd.code if rcvd is not None else None)

        ws.start(on_message, on_close)
        self._stop = done  # (the call's end, from a timer or a verb, ends the read loop too)
        try:
            return await done
        finally:
            self._stop = None
            ws.stop()

    def _handle(self, message: bytes) -> bool:
        """Feed one message to the machine; True if something waits in the outbox. Neither the frame
        nor the event stays referenced afterwards (while a call idles, the last one is often the whole
        session echo)."""
        etype = _leading_type(message)
        guard = self._guard
        if (
            etype is not None
            and etype not in _HANDLED
            and not (etype in _ACKS and (self.machine.awaiting_acks or self._items is not None))
            and (guard is None or etype not in _DELTAS)
        ):
            # Deltas and other events the machine ignores; acknowledgements while no output awaits one.
            return False
        try:
            event = jsonio.loads(message)
        except ValueError:
            self.log.warning("sideband.bad_frame", size=len(message))
            return False
        if not isinstance(event, dict):
            return False
        if guard is not None and event.get("type") in _GUARDED:
            guard.feed(event)
        if not self._spoken and event.get("type") == "output_audio_buffer.started":
            self._spoken = True
        if self._items is not None:
            kind = event.get("type")
            if kind in _ITEM_ACKS:
                self._acked_item(event.get("item"))
            elif kind == "error":
                self._refused_item(event.get("error"))
        actions = self.machine.receive(event)
        before = self._before
        if before is not None and not before[1] and self.machine.responding is not None:
            self._before = (before[0], self.machine.responding)  # the response that was about to start
        if actions:
            self._apply(actions)
        return bool(self._outbox)

    # ------------------------------------------------------------------------------- actions
    def _apply(self, actions: list[Action]) -> None:
        # The tools in force as the batch began: the calls of one response run with those, whatever a
        # sibling that runs first (an eager task factory) changes.
        offered, before = self.tools, self._before
        for action in actions:
            if isinstance(action, Send):
                event = action.event
                if event.get("type") == "conversation.item.create" and self.machine.caps.resumable:
                    self._outbox.append(self._sent_item(event))
                else:
                    self._outbox.append(jsonio.dumps(event))
            elif isinstance(action, RunTool):
                # Or those a response under way when they changed was offered.
                tools = offered
                if action.name not in tools and before is not None and action.response_id == before[1]:
                    tools = before[0]
                guard = self._guard
                if guard is not None and (
                    guard.checking(action.response_id) or guard.objected(action.response_id)
                ):
                    # Its reply's words are still being checked, or were stopped: held until that is known.
                    run = self._checked_tool(guard, action, tools)
                else:
                    run = self._run_tool(action.call_id, action.name, action.arguments, tools)
                task = asyncio.create_task(run, name=f"tool:{action.call_id}")
                task.add_done_callback(_drop_cancellation)
                if not task.done():  # (an eager task factory may have run it to its end already)
                    self._tool_tasks[task] = action.call_id
            elif isinstance(action, Notice):
                self._notice(action)
            elif isinstance(action, StartTimer):
                self._set_timer(action.name, action.delay)
            elif isinstance(action, TimerBy):
                self._timer_by(action.name, action.at)
            elif isinstance(action, CancelTimer):
                self._deadlines.pop(action.name, None)  # the alarm, if it was this one, finds nothing due
            elif isinstance(action, CancelTool):
                self._cancel_tool(action.call_id)
            elif isinstance(action, Withdraw):
                self._outbox[:] = [f for f in self._outbox if not _carries(f, action.event_id)]
            elif isinstance(action, Verb):
                self._spawn(self._run_verb(action.verb, action.target), f"verb:{action.verb}")
            elif isinstance(action, Close):
                if self._ws is not None:
                    self._spawn(self._close_ws(self._ws), "close")
                if self._stop is not None:
                    _wake(self._stop)
        quiet = self._quiet
        if quiet is not None and not (self.machine.busy or self.machine.response_pending):
            quiet.set()

    def _kick(self) -> None:
        """Flush the outbox from a context that is not the read loop (never once the call has ended:
        :class:`Close` flushes what is left, and a hook acting late must not start a task nobody awaits)."""
        if self._outbox and not self._flushing and self.machine.closed is None:
            self._spawn(self._flush(), "flush")

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        """Run ``coro`` in a side task named ``name`` (the call's end awaits it)."""
        task = asyncio.ensure_future(coro)
        if isinstance(task, asyncio.Task):
            task.set_name(name)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def _spawn_hooks(self, hooks: list[Callable[..., Any]], *args: Any, queued: bool = True) -> None:
        """Queue an event's ``hooks`` behind the earlier events of the same kind (``on_transcript``,
        ``on_dtmf``…): each kind's events are run in order by a task of its own, started when one is
        queued and ended once none is left (see :meth:`_settle_hooks`). Returns at once: the call's
        traffic never waits for its hooks. Not ``queued``: they start at once, in a task of their own
        (the call still owns it)."""
        queue = self._hook_queue
        if queue is None:
            queue = self._hook_queue = _HookQueue()
        if queued:
            key = id(hooks)
            line = queue.pending.get(key)
            if line is None:
                line = queue.pending[key] = (hooks, deque())
            line[1].append(args)
            if key in queue.draining:
                return
            if hooks is self.hooks.on_call_start and queue.gate is None:
                queue.gate = asyncio.Event()  # the other kinds wait for it (a while at most)
                queue.gate_until = asyncio.get_running_loop().time() + HOOK_SLOW
            queue.draining.add(key)  # (before the task starts: an eager task factory runs it at once)
            task = asyncio.ensure_future(self._run_hooks(queue, hooks))
        else:
            task = asyncio.ensure_future(self._hooks(hooks, args))
        if not task.done():  # (an eager task factory may have run it to its end already)
            queue.tasks[task] = _hook_name(hooks[0])
        task.add_done_callback(functools.partial(self._hook_done, queue))
        task.add_done_callback(_drop_cancellation)

    async def _run_hooks(self, queue: _HookQueue, hooks: list[Callable[..., Any]]) -> None:
        """Run the queued events of ``hooks``' kind, in order, until none is left: after
        ``on_call_start`` has returned, or has run :data:`HOOK_SLOW` seconds (``hook.slow``)."""
        key = id(hooks)
        starting = hooks is self.hooks.on_call_start
        try:
            gate = queue.gate
            if not starting and gate is not None and not gate.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(queue.gate_until):
                        await gate.wait()
            while (line := queue.pending.get(key)) is not None and line[1]:
                await self._hooks(hooks, line[1].popleft())
        finally:
            queue.draining.discard(key)
            line = queue.pending.get(key)
            if line is not None and not line[1]:
                del queue.pending[key]
            if starting and queue.gate is not None:
                queue.gate.set()

    def _hook_done(self, queue: _HookQueue, task: asyncio.Future[None]) -> None:
        queue.tasks.pop(task, None)
        if not (queue.tasks or queue.pending or queue.draining) and self._hook_queue is queue:
            self._hook_queue = None  # (allocated again when a hook is next queued)

    async def _flush(self) -> None:
        if self._flushing or self._ws is None:
            return
        self._flushing = True
        ws = self._ws
        try:
            if ws.send_now(self._outbox):
                self._outbox.clear()
                return
            while self._outbox:
                if ws.transport.is_closing():  # aborted (keepalive): kept for a re-attached socket
                    return
                frame = self._outbox[0]
                try:
                    await ws.send(frame, text=True)
                except ConnectionClosed:
                    return  # kept in the outbox for a re-attached socket
                del self._outbox[0]
        finally:
            self._flushing = False

    async def _close_ws(self, ws: PushConnection) -> None:
        """Flush what is left and close, within :data:`_CLOSE_TIMEOUT`; a peer that stopped reading gets
        the connection aborted (a flush stuck on it then ends too)."""
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await self._flush()
                await ws.close()
        except TimeoutError:
            _abort(ws)

    # ---------------------------------------------------------------------------------- timers
    def _set_timer(self, name: str, delay: float) -> None:
        """(Re)start the timer ``name``: it fires in ``delay`` seconds (:meth:`_on_timer`)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        self._deadlines[name] = when
        if self._alarm is None or when < self._alarm_at:
            self._arm_alarm(loop, when)

    def _timer_by(self, name: str, at: float) -> None:
        """Bring the running timer ``name`` forward to the wall-clock time ``at``, if it is due later.

        A time already past is not acted on: it says more of the clocks (a skewed one here, a stale
        value there) than of the call, which would otherwise end at once."""
        due = self._deadlines.get(name)
        if due is None:  # not running (fired already, or no such limit)
            return
        delay = at - time.time()
        if delay <= 0:
            self.log.warning(
                "sideband.expiry_ignored",
                timer=name,
                late_s=round(-delay, 1),
                detail="the server's time for this timer is already past: is this machine's clock right?",
            )
            return
        earlier = due - (asyncio.get_running_loop().time() + delay)
        if earlier > 0:
            self._set_timer(name, delay)
            # Logged when it says something: a late attach, or (the same amount on every call) a clock
            # running ahead. A second or two is every call's: the session starts at the accept, before
            # the attach, and its expires_at is in whole seconds.
            log = self.log.info if earlier >= TIMER_MOVED_NOTABLE else self.log.debug
            log("sideband.timer_moved", timer=name, earlier_s=round(earlier, 1), due_in_s=round(delay, 1))

    def _arm_alarm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._alarm is not None:
            self._alarm.cancel()
        self._alarm_at = when
        self._alarm = loop.call_at(when, self._ring)

    def _ring(self) -> None:
        """Fire every timer that is due, earliest first, then wait for the next one."""
        self._alarm = None
        loop = asyncio.get_running_loop()
        now = loop.time() + 0.001  # loop timers may fire up to a millisecond early
        due = sorted((when, name) for name, when in self._deadlines.items() if when <= now)
        try:
            for when, name in due:
                if self._deadlines.get(name) != when:
                    continue  # restarted or cancelled by a timer that fired before it
                del self._deadlines[name]
                self._on_timer(name)
        finally:  # the call's other timers keep running whatever one of them raised
            if self._deadlines:
                earliest = min(self._deadlines.values())
                if self._alarm is None or earliest < self._alarm_at:
                    self._arm_alarm(loop, earliest)

    def _arm_keepalive(self) -> None:
        if self._ping_interval:
            self._set_timer(_KEEPALIVE, self._ping_interval)
        else:
            self._deadlines.pop(_KEEPALIVE, None)

    def _keepalive(self) -> None:
        """Ping the server every interval; no pong within one interval means a dead connection (the
        "no close at all" case): abort it, so the read loop sees an abnormal close and re-attaches."""
        ws = self._ws
        if ws is None or self.machine.closed is not None:
            return
        if self._pong is not None and not self._pong.done():
            self.log.warning("sideband.keepalive_timeout", interval_s=self._ping_interval)
            if ws.transport is not None:
                ws.transport.abort()
            return
        # Pending until the ping is written *and* answered: a ping stuck behind a full write buffer (the
        # peer reads nothing) counts as unanswered at the next interval, as a lost pong does.
        waiting = self._pong = asyncio.get_running_loop().create_future()
        self._spawn(self._ping(ws, waiting), "ping")
        self._arm_keepalive()

    @staticmethod
    async def _ping(ws: PushConnection, waiting: asyncio.Future[float]) -> None:
        pong: object = None
        try:
            pong = await ws.ping()
        except ConnectionClosed:
            pass  # lost already: the read side handles it (no keepalive verdict on a closed socket)
        finally:
            if isinstance(pong, asyncio.Future):
                pong.add_done_callback(functools.partial(_answered, waiting))
            elif not waiting.done():  # closed, or ping() failed: nothing to wait for
                waiting.set_result(0.0)

    def _on_timer(self, name: str) -> None:
        if name == _KEEPALIVE:
            self._keepalive()
            return
        self._apply(self.machine.timer(name))
        self._kick()

    async def _run_tool(self, call_id: str, name: str, arguments: str, tools: ToolRegistry) -> None:
        fields: dict[str, Any] = {"tool": name, "tool_call_id": call_id}
        if self._log_args:
            fields["arguments"] = arguments
        self.log.info("tool.started", **fields)
        started = time.monotonic()
        watch: asyncio.TimerHandle | None = None
        run = asyncio.current_task()  # (this run of the call id: the engine may run the id again later)
        if run is not None:
            if self._tool_started is None:
                self._tool_started = {}
            self._tool_started[run] = started

        def on_deadline(when: float, timed_out: Callable[[], ToolResult]) -> None:
            nonlocal watch
            if run is not None:
                loop = asyncio.get_running_loop()
                watch = loop.call_at(when + OVERDUE_GRACE, self._overdue, call_id, name, run, timed_out)

        try:
            try:
                blocked = log_blocked(self.log, tool=name, tool_call_id=call_id)
                result = await tools.execute(
                    call_id, name, arguments, self.ctx, on_blocked=blocked, on_deadline=on_deadline
                )
            except asyncio.CancelledError as exc:
                if run is None or self.machine.closed is not None:
                    # The call's end (a shutdown's too) cancelled it: no output is due any more.
                    if self._owns(run):
                        self._tool_cancelled(call_id, name, time.monotonic() - started)
                    raise
                # Cancelled by code of the app's while the call goes on (a hook calling off a search, the
                # tool's own task): only the call's end cancels a tool silently. The model gets the
                # tool's failure, and the call counts it done.
                while run.uncancel():
                    pass
                result = cancelled_result(call_id, name, exc, started)
            except Exception as exc:  # never expected; the model must still get an answer
                result = failed_result(call_id, name, exc, started)
            if watch is not None:
                watch.cancel()  # (answered now: not once more while the output is being written)
            if not self._owns(run):
                # Answered at its deadline while it ran on, or left behind by the call's end (it ignored
                # its cancellation): nothing of it counts.
                return
            self._answered(call_id, name, result)
            await self._flush()
        finally:
            if watch is not None:
                watch.cancel()
            self._tool_ended()  # the task's last step: nothing of it runs on

    def _answered(self, call_id: str, name: str, result: ToolResult) -> None:
        """A tool round's result: in the record and the log, and its output to the model."""
        record = ToolRecord(call_id, name, result.outcome, result.duration)
        self._record(record)
        # A tool that raised or overran is worth an operator's look (with where it raised).
        # (A ToolError is the tool's answer on purpose, "no such order": not a fault.)
        faulty = result.outcome in ("error", "timeout") and not isinstance(result.exception, ToolError)
        log = self.log.warning if faulty else self.log.info
        # The output first, then the log line (which reads the exception, user code's object).
        self._apply(self.machine.tool_done(call_id, result.output, ok=result.ok))
        failure = {"error": result.error} if result.exception is None else self._failure(result.exception)
        log(
            "tool.finished",
            tool=name,
            tool_call_id=call_id,
            outcome=result.outcome,
            duration_ms=round(result.duration * 1000, 2),
            **failure,
        )
        if self.hooks.on_tool:
            self._spawn_hooks(self.hooks.on_tool, self.ctx, record)

    def _overdue(
        self, call_id: str, name: str, task: asyncio.Task[Any], timed_out: Callable[[], ToolResult]
    ) -> None:
        """A tool still running :data:`OVERDUE_GRACE` seconds past its deadline (it swallowed its
        cancellation): the model gets its timeout output now, and its task, left running, no longer
        counts (the call's end cancels it again, and leaves it behind if it still runs on)."""
        if self.machine.closed is not None or task not in self._tool_tasks or not self._owns(task):
            return  # the call's end deals with it
        if self._abandoned is None:
            self._abandoned = set()
        self._abandoned.add(task)
        self._answered(call_id, name, timed_out())
        self._kick()

    def _record(self, record: ToolRecord) -> None:
        """A tool round, in the call's summary and the process's counts."""
        self.summary.tools.append(record)
        if self._stats is not None:
            name = record.name if record.name in self._catalog else UNKNOWN_TOOL
            self._stats.record(name, record.outcome, record.duration)

    def _owns(self, run: asyncio.Task[Any] | None) -> bool:
        """Whether a tool run (its task) still counts for the call: not once it was answered past its
        deadline (:meth:`_overdue`), nor once the call's end abandoned it (it ignored its cancellation, and
        the end recorded it as cancelled). Another run of the same call id counts all the same."""
        return self._abandoned is None or run not in self._abandoned

    def _cancel_tool(self, call_id: str) -> None:
        """Cancel the run of ``call_id`` that counts (the latest: an earlier one, answered past its
        deadline, is the call's end's to cancel again)."""
        for run, running in reversed(self._tool_tasks.items()):
            if running == call_id:
                if self._owns(run):
                    run.cancel()
                return

    def _tool_ended(self) -> None:
        """The current tool run is done: forgotten (a later run of its call id is not this one)."""
        run = asyncio.current_task()
        if run is not None:
            self._tool_tasks.pop(run, None)
            if self._tool_started is not None:
                self._tool_started.pop(run, None)
            if self._abandoned is not None:
                self._abandoned.discard(run)

    def _tool_cancelled(self, call_id: str, name: str, duration: float) -> None:
        """A tool cancelled by the call's end (or the machine): in the summary, the log and ``on_tool``
        all the same."""
        record = ToolRecord(call_id, name, "cancelled", duration)
        self._record(record)
        if self.hooks.on_tool:
            self._spawn_hooks(self.hooks.on_tool, self.ctx, record)
        self.log.info(
            "tool.finished",
            tool=name,
            tool_call_id=call_id,
            outcome="cancelled",
            duration_ms=round(duration * 1000, 2),
            error=None,
        )

    async def _run_verb(self, verb: str, target: str | None) -> None:
        ok, gone, ended, detail = True, False, False, None
        if self._verb_call is not None:
            waiting = self._verb_waiting = (asyncio.current_task(), verb, target)
            try:
                ended = bool(await self._verb_call(verb, target))
                self.log.info("call.referred" if verb == "refer" else "call.hung_up", target=target)
            except CallGone:
                gone, detail = True, "call already gone"
            except UpstreamError as exc:
                ok, detail = False, str(exc)
            except Exception as exc:  # say, the HTTP client closed under a shutdown: the call still ends
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            finally:
                if self._verb_waiting is waiting:
                    self._verb_waiting = None
            if not ok and self.machine.closed is not None:  # (the machine has nothing more to say of it)
                self.log.warning("call.verb_failed", verb=verb, detail=detail)
        self._apply(self.machine.verb_done(ok, detail, gone=gone, ended=ended))
        await self._flush()

    def _cut_verb(self, waiting: tuple[asyncio.Task[Any] | None, str, str | None]) -> None:
        """The call's end gave the verb under way :data:`_LATE_ANSWER` seconds for its answer, which has
        not come: its task is cancelled, and what is known of it logged. A call that has ended (the
        server closed it, as it does once it carries out a hangup) was hung up: ``call.hung_up``
        (``answered`` false); else ``call.verb_unanswered``."""
        task, verb, target = waiting
        if self._verb_waiting is not waiting or task is None or task.done() or task.cancelling():
            return
        self._verb_waiting = None
        if verb == "hangup" and self.machine.closed is not None:
            self.log.info("call.hung_up", target=target, answered=False)
        else:
            self.log.warning("call.verb_unanswered", verb=verb, target=target, reason=self.machine.closed)
        task.cancel()

    def _notice(self, notice: Notice) -> None:
        event, fields = notice.event, notice.fields
        if event == "turn.stopped":
            self._turn_mark = time.monotonic()
        elif event == "turn.answered":
            if self._turn_mark is not None:
                seconds = time.monotonic() - self._turn_mark
                self._turn_mark = None
                self.summary.turn_seconds = (*self.summary.turn_seconds, seconds)
                if self._turns is not None:
                    self._turns.observe(seconds)
                self.log.info(event, latency_ms=round(seconds * 1000, 1), **fields)
        elif event == "usage":
            for usage in (self.summary.usage, self._usage):
                if usage is not None:
                    if fields["of"] == "response":
                        usage.add_response(fields["usage"])
                    else:
                        usage.add_transcription(fields["usage"])
        elif event == "transcript":
            transcript, guard = self.summary.transcript, self._guard
            if (
                guard is not None
                and fields["role"] == "agent"
                and guard.line(len(transcript), fields.get("response_id"))
            ):
                self.summary.stopped = (*self.summary.stopped, len(transcript))
            transcript.append((fields["role"], fields["text"]))
            if self._log_said:
                self.log.info("transcript", **fields)
            else:
                self.log.info(
                    "transcript",
                    **{k: v for k, v in fields.items() if k != "text"},
                    chars=len(fields["text"]),
                )
            if self.hooks.on_transcript:
                self._spawn_hooks(self.hooks.on_transcript, self.ctx, fields["role"], fields["text"])
        elif event == "agent.interrupted":
            self.log.info(event, **fields)
            transcript = self.summary.transcript
            line = next((i for i in range(len(transcript) - 1, -1, -1) if transcript[i][0] == "agent"), None)
            if line is not None and line not in self.summary.interrupted:
                self.summary.interrupted = (*self.summary.interrupted, line)
        elif event == "dtmf":
            self.summary.dtmf += fields["digit"]
            if self._keypad is not None:
                for keys in self._keypad:
                    keys.put_nowait(fields["digit"])
            else:  # typed ahead: the next collection takes it, unless the caller speaks first
                typed = self._typed = self._typed or []
                typed.append((self.machine.caller_turns, fields["digit"]))
                del typed[:-_TYPE_AHEAD]
            self.log.info("dtmf", **(fields if self._log_said else {}))
            if self.hooks.on_dtmf:
                self._spawn_hooks(self.hooks.on_dtmf, self.ctx, fields["digit"])
        elif event == "response.done":
            self.log.debug(event, **fields)
            if self.hooks.on_response:
                self._spawn_hooks(
                    self.hooks.on_response,
                    self.ctx,
                    fields["response_id"],
                    fields["status"],
                    fields["tools_running"],
                    queued=False,
                )
        elif event == "session.update_refused":
            if "tools" in fields["fields"]:
                self._tools_refused()
            self.log.info(event, **fields)
        elif event == "sideband.ready":
            self.ready.set()
            self.log.info(event)
        elif event == "tool.loop_breaker":  # a tool call answered with a refusal: in the record too
            self.log.warning(event, **fields)
            record = ToolRecord(fields["tool_call_id"], fields["tool"], "loop_breaker", 0.0)
            self._record(record)
            if self.hooks.on_tool:
                self._spawn_hooks(self.hooks.on_tool, self.ctx, record)
        elif event == "tool.discarded" and fields["reason"] == "reply_stopped":
            # (a reply stopped in time: its response ended cancelled, and its calls with it)
            self.log.info(event, **fields)
            self._stopped_tool(fields["tool_call_id"], fields["tool"])
        elif event == "response.cancel_late":
            self.log.debug(event, **fields)  # the reply ended before our cancel arrived: nothing to stop
        elif event == "sideband.error" and fields.get("code") == "conversation_already_has_active_response":
            self.log.info(event, **fields)  # a create that crossed a response: sent again after it
        elif event in (
            "sideband.error",
            "response.failed",
            "response.refused",
            "transcript.failed",
            "mcp.failed",
            "call.verb_failed",
            "call.end_forced",
            "call.transfer_unconfirmed",
            "guardrail.silenced",
            "tool.output_lost",
        ):
            self.log.warning(event, **fields)
        else:
            self.log.info(event, **fields)

    async def _hooks(self, hooks: Sequence[Callable[..., Any]], args: tuple[Any, ...]) -> None:
        """Run one event's ``hooks``, one after the other."""
        running = asyncio.current_task()
        baseline = running.cancelling() if running is not None else 0  # (a call's end runs cancelled)
        queue = self._hook_queue
        for hook in hooks:
            if queue is not None and running in queue.tasks:
                queue.tasks[running] = _hook_name(hook)  # (the one a cancellation would name)
            try:
                if is_async_callable(hook):
                    slow = self._slow_after(hook)
                    try:
                        await timed(hook(*args), log_blocked(self.log, hook=_hook_name(hook)))
                    finally:
                        slow.cancel()
                else:
                    await self._sync_hook(hook, args)
            except BaseException as exc:  # (a SystemExit too: out of a task it would stop the server)
                if isinstance(exc, asyncio.CancelledError) and not own_cancellation(exc, baseline):
                    raise
                self.log.error("hook.failed", hook=_hook_name(hook), **self._failure(exc))
                if running is not None and running.cancelling() > baseline:
                    # Cancelled (the call's end, a hook's limit), and the hook's code made that another
                    # exception: the hooks after it must not run.
                    raise asyncio.CancelledError from None

    def _failure(self, exc: BaseException) -> dict[str, Any]:
        """Log fields for a tool's or hook's exception: its text only where it is ours (a ToolError's is
        the model's anyway) or ``SIDEBAND_LOG_TOOL_ARGUMENTS`` allows it."""
        own = isinstance(exc, ToolError | SessionConfigError)
        return failure_fields(exc, message=own or self._log_args, full=self._log_args)

    def _slow_after(self, hook: Callable[..., Any]) -> asyncio.TimerHandle:
        """Log ``hook.slow`` should ``hook`` still run in :data:`HOOK_SLOW` seconds (cancel the handle
        once it is done): its kind's next events wait behind it."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        return loop.call_later(
            HOOK_SLOW,
            lambda: self.log.warning(
                "hook.slow", hook=_hook_name(hook), running_s=round(loop.time() - started, 1)
            ),
        )

    async def _sync_hook(self, hook: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """A plain function runs in a worker thread (:attr:`CallHooks.executor`), so blocking work never
        stalls the loop; it holds the call's sync-hook lock until its thread is done, so that one cut off
        by the call's end (its task cancelled) never runs beside the next (``on_call_end``). Context
        actions from the thread hop to the loop."""
        lock = self._sync_hooks
        if lock is None:
            lock = self._sync_hooks = asyncio.Lock()
        await lock.acquire()
        try:
            loop = asyncio.get_running_loop()
            if self.ctx._loop is None:
                self.ctx._loop = loop
            work = loop.run_in_executor(self.hooks.executor or self.tools.executor, in_thread(hook, *args))
        except BaseException:
            lock.release()
            raise
        abandoned = False
        slow = self._slow_after(hook)

        def finished(done: asyncio.Future[Any]) -> None:
            # Released when the thread is done, not when this task is cancelled (the end's grace, the
            # on_call_end bound): the next sync hook of the call never runs beside one still running.
            slow.cancel()
            lock.release()
            if done.cancelled():
                return
            exc = done.exception()  # always retrieved (asyncio would log its text otherwise)
            if exc is not None and abandoned:  # nobody awaits it any more: logged here
                self.log.error("hook.failed", hook=_hook_name(hook), **self._failure(exc))

        work.add_done_callback(finished)
        try:
            result = await asyncio.shield(work)
        except asyncio.CancelledError:
            abandoned = True
            raise
        finally:
            del work  # it holds the hook's exception, whose traceback holds this frame: no cycle
        if inspect.isawaitable(result):  # a sync wrapper around a coroutine function
            await timed(result, log_blocked(self.log, hook=_hook_name(hook)))

    async def _cleanup(self) -> None:
        loop = asyncio.get_running_loop()
        checks_until = loop.time() + guards.CHECK_TIMEOUT
        # A hangup or refer still unanswered once the call has ended (the server closed it): its answer
        # changes nothing any more. Given a moment for it, it is then cut short, neither waited for as
        # long as the tools nor left behind as one of them.
        waiting = self._verb_waiting
        cut = loop.call_later(_LATE_ANSWER, self._cut_verb, waiting) if waiting is not None else None
        try:
            await self._end_tasks(checks_until)
        finally:
            if cut is not None:
                cut.cancel()

    async def _end_tasks(self, checks_until: float) -> None:
        """Stop the call's timers, tools and socket, and await them, the side tasks, the output
        guardrails' last checks and the hooks (each within its bound)."""
        if self._alarm is not None:
            self._alarm.cancel()
            self._alarm = None
        self._deadlines.clear()
        tasks = list(self._tool_tasks)
        for task in tasks:
            # Not one cancelled already (by the end's CancelTool, or by its timeout: answered past its
            # deadline, it may be running a slow cleanup): its cleanup runs, within TASK_GRACE.
            if not task.cancelling():
                task.cancel()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await ws.close()
            _abort(ws)  # (closed already, unless the peer stalled the closing handshake)
        await self._await_tasks(tasks)
        if self._guard is not None:
            await self._settle_guard(self._guard, checks_until)
        for run, call_id in list(self._tool_tasks.items()):  # cancelled before they ever started, or stuck
            del self._tool_tasks[run]
            if not self._owns(run):
                continue  # answered past its deadline already (its timeout is in the record)
            if self._abandoned is None:
                self._abandoned = set()
            self._abandoned.add(run)  # what a stuck one does later no longer counts
            started = self._tool_started.pop(run, None) if self._tool_started is not None else None
            ran = 0.0 if started is None else time.monotonic() - started  # (0: it never started)
            self._tool_cancelled(call_id, self.machine.tool_name(call_id), ran)
        await self._settle_hooks()

    async def _await_tasks(self, tasks: list[asyncio.Task[None]]) -> None:
        """Await the cancelled tool tasks and the side tasks, for :data:`TASK_GRACE` seconds at most: a
        tool that swallows its cancellation must not keep the call (and a shutdown) from ending."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TASK_GRACE
        pending: set[asyncio.Future[Any]] = {*tasks, *self._side_tasks}
        while pending:
            done, stuck = await asyncio.wait(pending, timeout=max(deadline - loop.time(), 0.0))
            for task in done:
                if not task.cancelled():
                    task.exception()  # seen: their failures were handled (or logged) where they ran
            if stuck:
                names = sorted(t.get_name() if isinstance(t, asyncio.Task) else repr(t) for t in stuck)
                self.log.error("call.tasks_abandoned", tasks=names, grace_s=TASK_GRACE)
                self._side_tasks.difference_update(stuck)
                for task in stuck:  # (once more: one that swallowed a cancellation may heed the next)
                    task.cancel()
                return
            pending = set(self._side_tasks)  # started meanwhile (a flush, a verb)

    async def _settle_guard(self, guard: OutputGuard, until: float) -> None:
        """Let the output guardrails finish checking the words they were fed, until ``until`` (loop time):
        a verdict on the call's last words is recorded (nothing more is said). Then cancel the check
        (``guardrail.cancelled``), and await it (a while)."""
        try:
            if guard.checking(None):
                async with asyncio.timeout_at(until):
                    await guard.settled()
        except TimeoutError:
            self.log.warning("guardrail.cancelled", grace_s=guards.CHECK_TIMEOUT)
        finally:  # past the grace, or cancelled meanwhile
            checking = guard.stop()
            if checking is not None:
                _, stuck = await asyncio.wait({checking}, timeout=_LEFT_BEHIND)
                if stuck:  # a guardrail that ignores its cancellation: the call's end goes on without it
                    self.log.error("call.tasks_abandoned", tasks=[checking.get_name()], grace_s=_LEFT_BEHIND)

    async def _settle_hooks(self) -> None:
        """Give the hooks still running or queued :data:`HOOK_GRACE` seconds in all; then drop the queued
        ones (``hook.skipped``), cancel those running (``hook.cancelled``) and await them (a while)."""
        if self._hook_queue is None:
            return
        if self._hook_queue.gate is not None:
            self._hook_queue.gate.set()  # (the hooks waiting for on_call_start get the grace too)
        try:
            async with asyncio.timeout(HOOK_GRACE):
                while (queue := self._hook_queue) is not None and queue.tasks:
                    await asyncio.wait(list(queue.tasks))
        except TimeoutError:
            pass
        finally:  # past the grace, or cancelled meanwhile
            queue, self._hook_queue = self._hook_queue, None
            if queue is not None:
                await self._drop_hooks(queue)

    async def _drop_hooks(self, queue: _HookQueue) -> None:
        """Drop the hooks ``queue`` holds, cancel those running and await them, for :data:`_LEFT_BEHIND`
        seconds at most (one that ignores its cancellation is left behind)."""
        skipped = [
            _hook_name(hook) for hooks, waiting in queue.pending.values() for _ in waiting for hook in hooks
        ]
        queue.pending.clear()
        left = dict(queue.tasks)
        for task, hook in left.items():
            self.log.warning("hook.cancelled", hook=hook, grace_s=HOOK_GRACE)
            task.cancel()
        if skipped:
            self.log.warning(
                "hook.skipped", hooks=list(dict.fromkeys(skipped)), count=len(skipped), grace_s=HOOK_GRACE
            )
        if left:
            _, stuck = await asyncio.wait(left, timeout=_LEFT_BEHIND)
            for task in stuck:  # it ignores its cancellation: the call's end goes on without it
                self.log.error("hook.abandoned", hook=left[task], grace_s=_LEFT_BEHIND)

    def end_bound(self) -> float:
        """Seconds this call's end may take once its machine has closed, at most: the socket's close and
        its tools' grace (or the output guardrails' last check), its hooks' grace and each
        ``on_call_end`` hook's limit (and a second to spare)."""
        tasks = TASK_GRACE + _CLOSE_TIMEOUT
        if self._guard is not None:
            tasks = max(tasks, guards.CHECK_TIMEOUT) + _LEFT_BEHIND
        per_end_hook = END_HOOK_TIMEOUT + _LEFT_BEHIND
        hooks = HOOK_GRACE + _LEFT_BEHIND + per_end_hook * len(self.hooks.on_call_end)
        return tasks + hooks + 1.0

    async def wait_closed(self) -> None:
        """Wait until :meth:`run` has finished."""
        await self._closed.wait()


def _hook_name(hook: Callable[..., Any]) -> str:
    return getattr(hook, "__name__", None) or repr(hook)


class _HookQueue:
    """A call's hooks waiting their turn, by kind, and the tasks running hooks (made when a hook is
    queued, dropped once none is left: an idle call holds none)."""

    __slots__ = ("draining", "gate", "gate_until", "pending", "tasks")

    def __init__(self) -> None:
        self.pending: dict[int, tuple[list[Callable[..., Any]], deque[tuple[Any, ...]]]] = {}
        """For each kind of hook (its list's ``id``): its hooks, and each event's arguments in order."""
        self.tasks: dict[asyncio.Future[None], str] = {}
        """The tasks running hooks (one per kind being run, those not queued) → the hook each runs."""
        self.draining: set[int] = set()
        """The kinds a task runs."""
        self.gate: asyncio.Event | None = None
        """Set once ``on_call_start`` has returned (or the call ends): the other kinds wait for it."""
        self.gate_until = 0.0
        """When the other kinds stop waiting for ``on_call_start`` all the same (loop time)."""


def _drop_cancellation(task: asyncio.Future[Any]) -> None:
    """A task that ended cancelled keeps the ``CancelledError`` it raised, whose traceback holds every
    frame the cancellation went through; one of them holding the task (``asyncio.current_task()``, an
    ``asyncio.timeout``) makes a cycle only the collector frees. Taking the error drops it: the task stays
    cancelled, and a later ``await`` or ``result()`` gets a fresh one."""
    if task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            task.result()


async def _boxed(connect: Awaitable[PushConnection], failed: list[Exception]) -> PushConnection | None:
    """``connect``'s result; what it raises goes into ``failed`` instead, and ``None`` is returned. A task
    that kept the error would make a cycle: its context (the ``TimeoutError`` of an ``asyncio.timeout``
    whose handshake ran out) has a traceback whose frames hold that timeout, which holds the task."""
    try:
        return await connect
    except Exception as exc:
        failed.append(exc)
        return None


async def _give_up(attempt: asyncio.Future[Any]) -> None:
    """Cancel ``attempt`` unless it is done, and wait until it is."""
    if not attempt.done():
        attempt.cancel()
        await asyncio.wait((attempt,))


def _wake(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)


def _abort(ws: PushConnection) -> None:
    """Drop the connection now, unless it is lost already: no closing handshake, and no waiting for a write
    buffer the peer does not read (a transport closing with one would wait for it forever)."""
    transport = ws.transport
    if transport is not None and ws.protocol.state is not CLOSED:
        transport.abort()


def _answered(waiting: asyncio.Future[float], pong: asyncio.Future[float]) -> None:
    """A pong came (or the connection closed): the ping being waited for is over."""
    if not pong.cancelled():
        pong.exception()  # retrieved: a ping lost with its connection is no error to report
    if not waiting.done():
        waiting.set_result(0.0)


class _SentItem:
    """A message we added to the conversation, awaiting the server's acknowledgement."""

    __slots__ = ("event_id", "frame", "key", "resends", "role")

    def __init__(self, frame: bytes, key: tuple[Any, ...], role: str, event_id: str) -> None:
        self.frame = frame
        self.key = key
        self.role = role
        self.event_id = event_id
        self.resends = 0


def _forced_missing(choice: Any, tools: Sequence[Any]) -> str | None:
    """What a ``tool_choice`` forces that ``tools`` (a session's) leave out: any tool, for ``"required"``
    with none (``""``), or the function's name or the MCP server's label it names; ``None`` when
    ``tools`` have it, or it forces nothing."""
    if choice == "required":
        return None if tools else ""
    kind = choice.get("type") if isinstance(choice, Mapping) else None
    if kind not in ("function", "mcp"):
        return None
    key = "name" if kind == "function" else "server_label"
    name = choice.get(key)
    if any(
        isinstance(t, Mapping) and t.get("type", "function") == kind and t.get(key) == name for t in tools
    ):
        return None
    return str(name)


def _item_key(item: Mapping[str, Any]) -> tuple[Any, ...]:
    """What tells a message item from another: its role, and each content part's type and text (as the
    server's acknowledgement repeats them)."""
    content = item.get("content")
    parts = tuple(
        (part.get("type"), part.get("text"))
        for part in (content if isinstance(content, list) else ())
        if isinstance(part, Mapping)
    )
    return (item.get("role"), parts)


_TYPE_FIRST = re.compile(rb'\{"type": ?"([^"\\]+)"')


def _carries(frame: bytes, event_id: str) -> bool:
    """Whether the frame is the client event ``event_id``."""
    return b'"event_id"' in frame and jsonio.loads(frame).get("event_id") == event_id


def _leading_type(message: bytes) -> bytes | None:
    """The event type when the frame starts with it (OpenAI and vowel put ``type`` first), else None."""
    match = _TYPE_FIRST.match(message)
    return match.group(1) if match is not None else None


class CallRegistry:
    """Process-wide owner of live calls: starts their tasks, counts them, drains them on shutdown."""

    RECENT = 256

    def __init__(self, tools: Iterable[str] = (), guardrails: Iterable[str] = ()) -> None:
        """``tools`` and ``guardrails``: the names the app's calls count under (their series start at 0)."""
        self._tasks: dict[str, asyncio.Task[str]] = {}
        self.calls: dict[str, CallRuntime] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.recent: OrderedDict[str, CallSummary] = OrderedDict()
        """Summaries of the last :attr:`RECENT` calls that ended (for tests and diagnostics)."""
        self.ended: Counter[str] = zeros((*END_REASONS, APP_END_REASON))
        """Calls that ended, per end reason (``/metrics``): an app's own reason counts as ``app``."""
        self.tools = ToolStats(tools)
        """The tool rounds of the calls it ran (``/metrics``), given to each call's runtime."""
        self.usage = Usage()
        """The tokens and transcription of the calls it ran (``/metrics``), given to each call's runtime."""
        self.turn_seconds = Histogram(keys=("",))
        """Their callers' waits for an answer (``/metrics``), given to each call's runtime."""
        self.guardrail_trips: Counter[str] = zeros(guardrails)
        """Replies output guardrails stopped, per guardrail (``/metrics``), given to each call's runtime."""

    def start(self, runtime: CallRuntime) -> asyncio.Task[str]:
        """Run ``runtime`` in its own task, in a fresh logging context."""
        call_id = runtime.ctx.call_id
        task = asyncio.create_task(self._run(runtime), name=f"call:{call_id}")
        self._tasks[call_id] = task
        self.calls[call_id] = runtime
        self._idle.clear()
        return task

    async def _run(self, runtime: CallRuntime) -> str:
        structlog.contextvars.clear_contextvars()
        try:
            return await runtime.run()
        finally:
            self._tasks.pop(runtime.ctx.call_id, None)
            self.calls.pop(runtime.ctx.call_id, None)
            self.recent[runtime.ctx.call_id] = runtime.summary
            self.ended[end_reason(runtime.summary.reason or "internal_error")] += 1
            if len(self.recent) > self.RECENT:
                self.recent.popitem(last=False)
            if not self._tasks:
                self._idle.set()

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, call_id: object) -> bool:
        return call_id in self._tasks

    async def wait_idle(self) -> None:
        """Wait until no call is live."""
        await self._idle.wait()

    async def drain(self, timeout: float, *, grace: float = SHUTDOWN_GRACE) -> None:
        """Let live calls finish for up to ``timeout`` seconds; then hang up the rest (reason
        ``shutdown``: a call left up would go on with nobody running its tools) and give that up to
        ``grace`` seconds. A call whose hangup is still unanswered then is cut short (``hangup_failed``);
        one that is past its end (stopping its tools, running its end hooks) finishes within the bounds
        each call keeps (:meth:`CallRuntime.end_bound`). Every call's task is awaited."""
        tasks = dict(self._tasks)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks.values(), timeout=timeout)
        if pending:
            for live in list(self.calls.values()):
                live.abandon("shutdown")
            _, pending = await asyncio.wait(pending, timeout=grace)
        if not pending:
            return
        bound = 1.0
        for call_id, task in tasks.items():
            runtime = self.calls.get(call_id)
            if task not in pending or runtime is None:
                continue
            bound = max(bound, runtime.end_bound())
            if runtime.machine.closed is None:  # its hangup is still out: the window is over
                task.cancel()
        _, stuck = await asyncio.wait(pending, timeout=bound)
        if stuck:  # (each call bounds its own end: this would take a bug of ours)
            log = structlog.get_logger(component="sideband.call")
            log.error("calls.abandoned", calls=sorted(t.get_name() for t in stuck))
