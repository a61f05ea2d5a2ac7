"""An in-process stand-in for a self-hosted vowel stack: the *core* (API keys with scopes, token mint) and
the *engine* (the realtime WebSocket), on one loopback port, behaving as the vowel engine does.

::

    async with VowelSimulator() as sim:
        sim.script([when("order 1042", calls=[("lookup_order", {"order_id": "1042"})],
                         reply="Order 1042 has shipped.")])
        settings = load_settings(sim.settings_values(), environ={})
        async with EngineSession.open(settings, app) as session:
            reply = await session.say("Where is order 1042?")
        assert sim.sessions[0].outputs  # every client and server event is recorded

``sim.core_url`` (``…/core``) serves ``POST /v1/realtime/sessions``; ``sim.engine_url`` (``…/engine``)
serves ``GET /v1/realtime`` (WebSocket) and the engine's own ``POST /v1/realtime/sessions``. Tokens are
the engine's: ``ek_`` + a JWT (HS256, signed with the simulator's ``token_secret``) whose claims the
engine reads back at the handshake; they live ``token_ttl`` seconds on the simulator's clock, which tests
move with :meth:`VowelSimulator.advance`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import itertools
import json
import re
import secrets
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias

from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler

from sideband.testing._loop import check_loop

__all__ = [
    "DEFAULT_BROWSER_KEY",
    "DEFAULT_ENGINE_KEY",
    "DEFAULT_VOWEL_KEY",
    "EARLY_CREATE",
    "EngineSessionRecord",
    "HandshakeRecord",
    "MintFault",
    "MintRecord",
    "ReplyEnd",
    "Rule",
    "SimResponse",
    "ToolOutputs",
    "VowelSimulator",
    "when",
]

DEFAULT_VOWEL_KEY = "vkey_trusted_test"
"""A core API key with the ``mint_trusted_session`` scope."""
DEFAULT_BROWSER_KEY = "vkey_browser_test"
"""A core API key with only ``mint_ephemeral`` (browser tokens): refused for trusted-server mints."""
DEFAULT_ENGINE_KEY = "engine_static_test"
"""The engine's own static API key (its ``POST /v1/realtime/sessions``, no scopes)."""

TRUSTED_SCOPE = "mint_trusted_session"
EPHEMERAL_SCOPE = "mint_ephemeral"
MIN_AUDIO_CHUNK = 2048
EARLY_CREATE = "response.create before function_call_output"
"""How a session's note of a ``response.create`` sent before every output of its calls was in begins:
the ``vowel`` fixture fails a test whose sessions have one, unless it is marked ``vowel_early_create``."""

MintAnswer: TypeAlias = Literal["core", "engine", "epoch", "expires_in", "client_secret"]
"""How the core words its mint answer: ``core`` ``{"token", "expiresAt": ISO}``, ``engine`` (the
engine's own shape: ``client_secret``, ``value``, ``token``, ``expires_in``), ``epoch``
``{"token", "expires_at"}``, ``expires_in`` ``{"token", "expires_in"}``, ``client_secret``
``{"client_secret": {"value", "expires_at"}}``."""
MintFault: TypeAlias = int | Literal["timeout", "drop"]
"""A queued fault of the core's mint: an HTTP status to answer (300-599, with a ``{"message": …}`` body),
``"timeout"`` (hold the request, unanswered, until the simulator closes) or ``"drop"`` (cut the
connection with no answer)."""
Refusal: TypeAlias = Literal["401", "drop"]
"""How the engine refuses a bad token at the handshake: HTTP 401, or closing TCP with no HTTP answer."""
ReplyEnd: TypeAlias = Literal["completed", "cancelled"]
"""How a rule's reply ends (:attr:`Rule.ends`)."""
Match: TypeAlias = "str | re.Pattern[str] | Callable[[str], bool]"
Reply: TypeAlias = "str | Callable[[ToolOutputs], str]"


# ------------------------------------------------------------------------------------------ scripting
class ToolOutputs(dict[str, str]):
    """What a rule's ``reply`` callable gets: the outputs of the turn's tool calls. As a mapping, each
    tool's name gives the output of its last call (``outputs["lookup_order"]``); :attr:`calls` holds
    every call's ``(name, output)`` in the order they were made, and :meth:`of` one tool's outputs."""

    __slots__ = ("calls",)

    def __init__(self, calls: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(calls)
        self.calls: tuple[tuple[str, str], ...] = tuple(calls)

    def of(self, name: str) -> list[str]:
        """The outputs of every call to the tool ``name``, in call order."""
        return [output for called, output in self.calls if called == name]


@dataclass(frozen=True, slots=True)
class Rule:
    """What the simulated model does when the user's utterance matches ``match``.

    ``match``: a case-insensitive substring, a compiled regex (searched) or a predicate. ``calls``: tools
    to call first, in order (name, arguments as a dict or a raw JSON string). The engine announces one
    call a response, as it does: it stops its model's stream at the first call it gets, announces it
    complete in a ``response.output_item.added`` at ``output_index`` 1 (the response's message, opened
    at 0 as every response's is, never completes) and ends the response ``incomplete`` with
    ``output: []`` (``status_details`` null); the model's other calls of that stream are dropped, so it
    makes the next one in the response the client's ``response.create`` starts once that call's output
    is in, and so on: the first call in the turn's first response, the second in the next… and the
    reply in the one after the last. (``VowelSimulator(batch_calls=True)`` plays engine builds that
    announce every call of a stream in its one response instead.) A response that ends before it
    announced its call (cancelled, replaced) leaves that call to the next response. The model calls
    none when ``session.update`` declared no tool it may call, and never one the engine dropped (a tool
    without a name or a description): each is noted in the session's ``notes``. ``reply``: the text said
    once the outputs are in and the client sent ``response.create`` (a callable gets the outputs,
    :class:`ToolOutputs`: ``{tool name: output}``, and every call's in ``calls``).
    ``preamble``: text said in the response that makes the turn's first call, before it:
    ``response.text.delta`` events, and a ``response.text.done`` after the call (before the calls, with
    ``batch_calls``; no transcript's ``done``, no ``output_item.done``); the engine voices a sentence
    only once more text follows it, so a preamble's last is never heard (a one-sentence preamble has no
    audio at all). ``repeat_calls``: announce each call twice (same ``call_id``). ``fatal``: the engine
    fails (``error``, ``response.done`` failed, close 1011).
    ``refuse``: the engine refuses the text itself with this message: an ``error``
    (``invalid_request_error``, code ``invalid_value``), no item created and no response; the session
    carries on. ``ends``: how the reply's response ends, ``completed``, or ``cancelled``: cut short with
    nothing to follow it, as when the engine's turn detection stops a reply on a noise (its words so far,
    then ``response.done`` ``cancelled`` alone, ``status_details`` ``{"type": "cancelled", "reason":
    "turn_detected"}``, ``usage`` null: none of its message's ``*.done`` events). The engine ends no reply
    ``incomplete``: that status is a tool turn's alone.
    """

    match: Match
    calls: tuple[tuple[str, dict[str, Any] | str], ...] = ()
    reply: Reply = "Okay."
    preamble: str | None = None
    repeat_calls: bool = False
    fatal: bool = False
    refuse: str | None = None
    ends: ReplyEnd = "completed"

    def matches(self, text: str) -> bool:
        """Whether this rule applies to the user's ``text``."""
        if isinstance(self.match, str):
            return self.match.lower() in text.lower()
        if isinstance(self.match, re.Pattern):
            return self.match.search(text) is not None
        return bool(self.match(text))


def when(
    match: Match,
    *,
    calls: Sequence[tuple[str, dict[str, Any] | str]] = (),
    reply: Reply = "Okay.",
    preamble: str | None = None,
    repeat_calls: bool = False,
    fatal: bool = False,
    refuse: str | None = None,
    ends: ReplyEnd = "completed",
) -> Rule:
    """Build a :class:`Rule`: ``when("order", calls=[("lookup_order", {"order_id": "1"})], reply="…")``.

    As on the engine, a rule's ``calls`` come one a response, in order, each once the previous one's
    output and the client's ``response.create`` are in; its ``reply`` comes after the last."""
    return Rule(match, tuple((n, a) for n, a in calls), reply, preamble, repeat_calls, fatal, refuse, ends)


# ------------------------------------------------------------------------------------------ records
@dataclass(slots=True)
class MintRecord:
    """One mint request (core or engine endpoint) and what it got (``status`` 0: no answer, a
    ``"timeout"`` or ``"drop"`` fault)."""

    endpoint: Literal["core", "engine"]
    api_key: str | None
    body: Any
    status: int
    token: str | None = None
    expires_at: float | None = None


_MINT = web.RequestKey("sideband_vowel_mint_record", MintRecord)
"""Per-request storage: a mint request's record in :attr:`VowelSimulator.mints`."""


@dataclass(slots=True)
class HandshakeRecord:
    """One engine WebSocket handshake: ``status`` 101 (accepted), 401 (refused) or 0 (TCP dropped)."""

    token: str | None
    status: int
    reason: str = ""


@dataclass(slots=True)
class SimResponse:
    """One model response. ``trigger``: ``user_text`` (automatic) or ``response.create``."""

    id: str
    trigger: Literal["user_text", "response.create"]
    instructions: str | None = None
    status: str = "in_progress"
    text: str = ""
    call_ids: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Token:
    value: str
    expires_at: float
    service_id: str | None
    server_tools: list[Any]
    claims: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class EngineSessionRecord:
    """One engine session: everything that went in and out, for assertions."""

    id: str
    token: str
    service_id: str | None
    connected_at: float
    max_call_duration: float
    """Seconds: the token's ``maxCallDurationMs`` claim, else the simulator's ``max_call_duration``."""
    max_idle_duration: float
    """Seconds: the token's ``maxIdleDurationMs`` claim, else the simulator's ``max_idle_duration``."""
    claims: dict[str, Any] = field(default_factory=dict)
    """The claims of the token the session was opened with (``sub``, ``iat``, ``exp``, ``jti``…)."""
    received: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    configured: bool = False
    tools: list[dict[str, Any]] = field(default_factory=list)
    """Function tools from the last ``session.update`` with tools that the model may call: as on the
    engine, one whose name or description is missing or empty is dropped (and noted in ``notes``)."""
    instructions: str | None = None
    user_texts: list[str] = field(default_factory=list)
    """The text of each user message the engine took (one it refused is in ``received`` only)."""
    audio_chunks: list[int] = field(default_factory=list)
    """Decoded size in bytes of each accepted ``input_audio_buffer.append``."""
    audio: bytearray = field(default_factory=bytearray)
    speaking: bool = False
    """The engine's detector hears the caller speak: ``speech_started`` sent, ``speech_stopped`` not yet."""
    outputs: dict[str, list[str]] = field(default_factory=dict)
    """``function_call_output`` items by ``call_id`` (a list: duplicates show)."""
    responses: list[SimResponse] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Protocol misuse seen (a ``response.create`` before a tool's output, which starts with
    :data:`EARLY_CREATE`), and what the engine did of its own accord (a tool of ``session.update`` it
    dropped)."""
    close_code: int | None = None
    closed_by: Literal["engine", "client"] | None = None
    end_reason: str | None = None
    last_speech: float | None = None
    """When the engine's detector last found speech starting (simulator clock): its idle clock's start."""
    _declared: list[dict[str, Any]] = field(default_factory=list)  # session.updated echoes them all
    _dropped: frozenset[str] = frozenset()  # names of the declared tools the engine dropped
    _turn_text: str | None = None
    _turn_calls: dict[str, str] = field(default_factory=dict)  # call_id → tool name, this turn
    _turn_plan: list[tuple[str, dict[str, Any] | str]] | None = None  # calls still to make (None: unplanned)
    _ws: web.WebSocketResponse | None = None
    _transport: asyncio.Transport | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _active: asyncio.Task[None] | None = None
    _active_response: SimResponse | None = None
    _ending: bool = False
    _closed: asyncio.Event = field(default_factory=asyncio.Event)
    _speech_item: str = ""  # the item_id of the speech under way
    _speech_end: int = 0  # bytes of audio streamed when the last chunk of speech ended

    @property
    def closed(self) -> bool:
        """The socket is closed."""
        return self._closed.is_set()

    def received_of_type(self, event_type: str) -> list[dict[str, Any]]:
        """Client events of one type, in order."""
        return [e for e in self.received if e.get("type") == event_type]

    def sent_of_type(self, event_type: str) -> list[dict[str, Any]]:
        """Server events of one type, in order."""
        return [e for e in self.sent if e.get("type") == event_type]

    async def wait_closed(self, timeout: float = 5.0) -> None:
        """Wait until the socket is closed."""
        async with asyncio.timeout(timeout):
            await self._closed.wait()


def _engine_json(text: str) -> Any:
    """``text`` parsed as the engine (``JSON.parse``) parses it: ``NaN`` and ``Infinity`` are no JSON."""
    return json.loads(text, parse_constant=_no_constant)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


def _claimed(claims: dict[str, Any], name: str, default: float) -> float:
    """A limit of the token's claims in seconds (milliseconds there), else the engine's default."""
    value = claims.get(name)
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value) / 1000
    return default


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(epoch % 1 * 1000):03d}Z"


def _js_falsy(value: Any) -> bool:
    """Whether the engine (JavaScript) takes a JSON value for false: absent or ``null``, ``false``, ``0``,
    an empty string (an empty list or object is true to it)."""
    return value is None or value is False or value == "" or (type(value) in (int, float) and not value)


def _words(text: str) -> list[str]:
    """The deltas the engine's model streams ``text`` in: a word each (none for no text at all)."""
    return re.findall(r"\s*\S+", text) or ([text] if text else [])


_SENTENCE_END = re.compile(r"[.!?]+\s")
_CLAUSE_END = re.compile(r"[,;:]\s")


@dataclass(slots=True)
class _Speech:
    """A message's words as the engine streams them: the text so far, and its chunker, which hands a
    sentence to its voice once the sentence is whole (the whitespace after its mark has come) and at
    least 15 characters in, a clause once 80 characters wait, a cut at a space once 120 do, and the
    rest only when the reply ends (never in a response that calls a tool)."""

    base: dict[str, Any]  # the fields of the message's events
    text: str = ""
    waiting: str = ""
    voiced: bool = False  # its audio part was opened

    def add(self, words: str) -> list[str]:
        """Take the next ``words``; return the chunk they complete, if any."""
        self.text += words
        self.waiting += words
        waiting = self.waiting
        end = max((m.end() for m in _SENTENCE_END.finditer(waiting) if m.end() >= 15), default=0)
        if not end and len(waiting) >= 80:
            end = max((m.end() for m in _CLAUSE_END.finditer(waiting) if m.end() >= 15), default=0)
            if not end and len(waiting) >= 120:
                space = waiting.rfind(" ", 0, 81)
                if space > 15:
                    self.waiting = waiting[space + 1 :]
                    return [waiting[:space].strip()]
        if not end:
            return []
        self.waiting = waiting[end:]
        return [waiting[:end].strip()]

    def flush(self) -> list[str]:
        """The words still waiting, at the end of the reply."""
        rest, self.waiting = self.waiting.strip(), ""
        return [rest] if rest else []


# ------------------------------------------------------------------------------------------ simulator
class VowelSimulator:
    """A vowel core + engine on a loopback port. ``async with VowelSimulator() as sim:``.

    Keys: ``api_key`` carries ``mint_trusted_session``; ``browser_key`` only ``mint_ephemeral``;
    :meth:`add_key` adds more. Limits (seconds, on the simulator clock) are checked when a client message
    arrives, as the engine does; the idle limit counts from the last start of speech the engine's detector
    found, none until it found one (see below: silence, line noise and user text start and restart none).
    A session's limits are its token's claims
    (``maxCallDurationMs``, ``maxIdleDurationMs``), else ``max_call_duration`` / ``max_idle_duration``
    (the engine's defaults). ``claim_limits=True`` puts those two in the tokens the core mints; the
    engine's own mint always does, as the engine does. ``refuse_handshake`` picks how a bad token (a
    signature that does not check out, an ``exp`` past) is refused.

    The engine builds its agent on the first ``session.update`` and answers ``session.updated`` once it
    is built, ``agent_build_time`` seconds later (5 ms by default): a client event other than
    ``session.update`` arriving before that fails the session fatally ("No agent available": ``error``,
    ``response.done`` failed, close 1011), as on the engine; wait for ``session.updated``. Later
    updates are answered at once. With ``refuse_session_update`` set (a message), each ``session.update``
    is answered as the engine answers one whose handling fails (a tool schema it cannot take): an
    ``error`` (``server_error``, that message), no ``session.updated`` and no agent; the socket stays open.

    A ``response.create`` is answered at once, as the engine answers it: one sent while an output of a
    call it announced is still due starts a response whose model sees those calls unanswered (and its
    reply callable gets ``""`` for them), and is noted in the session's ``notes`` (see
    :data:`EARLY_CREATE`): a client sends every output first. A response cancelled before it announced a
    call leaves no output due.

    The engine's turn detection runs on the streamed audio (``input_audio_buffer.append``, PCM16 LE mono
    24 kHz), chunk by chunk: ``detects_speech(chunk)`` says whether a chunk holds speech (by default: a
    peak above about -36 dBFS, 500 of 32767, which silence and line noise stay below; a test may set its
    own, e.g. to make loud noise no speech). A chunk of speech after none starts the caller's speech: the
    idle clock starts again and ``input_audio_buffer.speech_started`` goes out (``audio_start_ms``, the
    audio streamed before that chunk, and a new ``item_id``). ``silence_duration`` seconds of audio with
    no speech after it end it: ``input_audio_buffer.speech_stopped`` (``audio_end_ms``, where the speech
    ended, and the same ``item_id``). Only the start of speech restarts the idle clock, as on the engine:
    neither its end nor each chunk of speech does. Audio that stops coming ends no speech.

    A reply is cut as the engine cuts one: a ``response.cancel`` (one with none in flight, or naming
    another response, is ignored), or a new response replacing it (user text, a ``response.create``:
    its ``response.created`` goes out first), ends it with ``response.done`` ``cancelled`` alone
    (``status_details`` ``{"type": "cancelled", "reason": "client_cancelled"}``, ``usage`` null), none
    of its message's ``*.done`` events and nothing more of it.

    The engine announces one tool call a response (see :class:`Rule`); ``batch_calls=True`` plays the
    engine builds that collect every call of their model's stream and announce them all in its one
    response, after the preamble's ``response.text.done``, before ``response.done`` ``incomplete``.

    ``event_delay`` paces the engine's events within a response; ``input_delay`` is how long each
    client message takes to reach the engine (in order), while what it already runs goes on: a reply
    under way may end before a text sent meanwhile arrives.

    The simulator's own bugs are kept as tracebacks in ``internal_errors``, never passed over: a
    request it fails on is answered 500 (an engine socket already open is cut). What it is told to do (a
    mint fault, a dropped handshake) is no bug. The ``vowel`` fixture fails its test on any.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str = DEFAULT_VOWEL_KEY,
        browser_key: str = DEFAULT_BROWSER_KEY,
        engine_api_key: str = DEFAULT_ENGINE_KEY,
        token_ttl: float = 300.0,
        max_call_duration: float = 30 * 60.0,
        max_idle_duration: float = 10 * 60.0,
        mint_answer: MintAnswer = "core",
        refuse_handshake: Refusal = "401",
        default_reply: Reply = "I heard you.",
        instructed_reply: str = "Goodbye!",
        timeout_close_delay: float = 0.1,
        event_delay: float = 0.0,
        input_delay: float = 0.0,
        claim_limits: bool = False,
        batch_calls: bool = False,
        agent_build_time: float = 0.005,
        token_secret: bytes | None = None,
        refuse_session_update: str | None = None,
        detects_speech: Callable[[bytes], bool] | None = None,
        silence_duration: float = 0.5,
    ) -> None:
        self.host = host
        self.api_key = api_key
        self.browser_key = browser_key
        self.engine_api_key = engine_api_key
        self.token_ttl = token_ttl
        self.max_call_duration = max_call_duration
        self.max_idle_duration = max_idle_duration
        self.mint_answer: MintAnswer = mint_answer
        self.refuse_handshake: Refusal = refuse_handshake
        self.default_reply = default_reply
        self.instructed_reply = instructed_reply
        self.timeout_close_delay = timeout_close_delay
        self.event_delay = event_delay
        self.input_delay = input_delay
        self.claim_limits = claim_limits
        self.batch_calls = batch_calls
        """Play engine builds that announce every tool call of their model's stream in one response
        (after the preamble's ``response.text.done``), rather than the first alone."""
        self.agent_build_time = agent_build_time
        self.token_secret = token_secret or secrets.token_bytes(32)
        """The key that signs the engine tokens (HMAC-SHA256), as the engine's JWT secret does."""
        self.refuse_session_update = refuse_session_update
        self.detects_speech: Callable[[bytes], bool] = detects_speech or _speech
        """Whether a chunk of streamed PCM16 audio holds speech, to the engine's turn detection."""
        self.silence_duration = silence_duration
        """Seconds of streamed audio without speech that end the caller's speech (``speech_stopped``)."""
        self.keys: dict[str, set[str]] = {api_key: {TRUSTED_SCOPE}, browser_key: {EPHEMERAL_SCOPE}}
        self.key_providers: dict[str, frozenset[str]] = {}
        """The providers a key may mint for, for the keys :meth:`add_key` limited (others: any)."""
        self.rules: list[Rule] = []
        self.mints: list[MintRecord] = []
        self.handshakes: list[HandshakeRecord] = []
        self.sessions: list[EngineSessionRecord] = []
        self.internal_errors: list[str] = []
        """Tracebacks of the simulator's own bugs: each request (a mint, an engine socket) it failed on,
        answered 500 (or cut, once its socket was open)."""
        self._tokens: dict[str, _Token] = {}
        self._offset = 0.0
        self._port = port
        self._bound_port: int | None = None
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the one it was started on
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()
        self._counter = itertools.count(1)
        self._closed = False
        self._closing = asyncio.Event()
        self._mint_faults: deque[tuple[MintFault, int | None]] = deque()

    # ------------------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> VowelSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Bind the loopback port and serve."""
        if self._runner is not None or self._closed:
            raise RuntimeError("a VowelSimulator starts once")
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/core/v1/realtime/sessions", self._handle_core_mint)
        app.router.add_post("/engine/v1/realtime/sessions", self._handle_engine_mint)
        app.router.add_get("/engine/v1/realtime", self._handle_engine)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
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

    async def close(self) -> None:
        """Close every engine socket (1001), cancel and await every task, stop serving. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()  # (held mint requests are answered)
        for session in self.sessions:
            if session._ws is not None and not session._ws.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(session._ws.close(code=1001), 1.0)
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------------------ addresses
    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._bound_port is None:
            raise RuntimeError("VowelSimulator not started")
        return self._bound_port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    @property
    def core_url(self) -> str:
        """The core's base URL (``SIDEBAND_VOWEL_CORE_URL``)."""
        return f"{self.base_url}/core"

    @property
    def engine_url(self) -> str:
        """The engine's base URL (``SIDEBAND_VOWEL_ENGINE_URL``); the socket is ``…/v1/realtime``."""
        return f"{self.base_url}/engine"

    def settings_values(
        self, *, api_key: str | None = None, service_id: str = "order-service"
    ) -> dict[str, Any]:
        """Overrides for :func:`sideband.settings.load_settings` pointing at this simulator.
        :class:`RuntimeError` at once on another event loop than the one the simulator was started on."""
        check_loop(self._loop)
        return {
            "vowel_core_url": self.core_url,
            "vowel_engine_url": self.engine_url,
            "vowel_api_key": api_key or self.api_key,
            "vowel_service_id": service_id,
        }

    def environ(self, *, api_key: str | None = None, service_id: str = "order-service") -> dict[str, str]:
        """``SIDEBAND_VOWEL_*`` environment variables pointing at this simulator (for a subprocess)."""
        return {
            "SIDEBAND_VOWEL_CORE_URL": self.core_url,
            "SIDEBAND_VOWEL_ENGINE_URL": self.engine_url,
            "SIDEBAND_VOWEL_API_KEY": api_key or self.api_key,
            "SIDEBAND_VOWEL_SERVICE_ID": service_id,
        }

    # ------------------------------------------------------------------------------ control
    def add_key(self, key: str, *scopes: str, providers: Sequence[str] | None = None) -> None:
        """Accept ``key`` with these scopes (e.g. ``mint_trusted_session``, ``mint_ephemeral``).
        ``providers``: the only ``config.provider`` values it may mint for (any by default); another
        is refused with a 403 that says so."""
        self.keys[key] = set(scopes)
        if providers is None:
            self.key_providers.pop(key, None)
        else:
            self.key_providers[key] = frozenset(providers)

    def fail_next_mints(self, *answers: MintFault, retry_after: int | None = None) -> None:
        """Queue faults for the next mint requests to the core (see :data:`MintFault`), one per request, in
        order; then it mints again. ``retry_after``: the whole seconds a status fault's ``Retry-After``
        header asks to wait (none by default)."""
        for answer in answers:
            if answer in ("timeout", "drop"):
                continue
            if not isinstance(answer, int) or isinstance(answer, bool) or not 300 <= answer <= 599:
                raise ValueError(
                    f"a mint fault is an HTTP status 300-599, 'timeout' or 'drop', not {answer!r}"
                )
        self._mint_faults.extend((answer, retry_after) for answer in answers)

    def script(self, rules: Sequence[Rule]) -> None:
        """Replace the model's rules (first match wins; unmatched text gets ``default_reply``)."""
        self.rules = list(rules)

    def now(self) -> float:
        """The simulator clock (epoch seconds): wall time plus every :meth:`advance`."""
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the simulator clock forward (token expiry and session limits use it)."""
        self._offset += seconds

    async def crash(
        self, session: EngineSessionRecord, message: str = "Internal engine error", *, bare: bool = False
    ) -> None:
        """Fail ``session`` fatally: ``error``, ``response.done`` failed, close 1011. ``bare``: the engine
        crashes without a word, a close 1011 and nothing before it."""
        if not bare:
            await self._fatal(session, message)
            return
        if session._ending or session.closed:
            return
        session._ending = True
        await self._stop_response(session)
        await self._close(session, 1011, "crash")

    async def drop(self, session: EngineSessionRecord) -> None:
        """Lose ``session``'s connection: the TCP connection is cut, no close frame (the client sees 1006)."""
        session._ending = True
        if session.close_code is None:
            session.close_code, session.closed_by, session.end_reason = 1006, "engine", "dropped"
        await self._stop_response(session)
        transport = session._transport
        if transport is not None:  # uvloop's transports are not asyncio.Transport subclasses
            transport.abort()
        await session.wait_closed()

    async def wait_for(
        self, predicate: Callable[[VowelSimulator], bool], timeout: float = 5.0, what: str = "condition"
    ) -> None:
        """Wait until ``predicate(sim)`` holds (re-checked whenever something is recorded).
        :class:`RuntimeError` at once on another event loop than the one the simulator was started on."""
        check_loop(self._loop)
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"vowel simulator: {what} not met within {timeout}s") from None

    async def send(self, session: EngineSessionRecord, event: dict[str, Any]) -> None:
        """Send ``session`` a server event of your own (an ``event_id`` is added): what no script plays,
        such as a transcript of the caller's speech. (The engine's ``speech_started`` / ``speech_stopped``
        come from its turn detection on the streamed audio: see :attr:`detects_speech`.)"""
        await self._send(session, event)

    async def wait_session(self, index: int = 0, timeout: float = 5.0) -> EngineSessionRecord:
        """The ``index``-th engine session, once it exists."""
        await self.wait_for(lambda s: len(s.sessions) > index, timeout, f"engine session #{index}")
        return self.sessions[index]

    def _notify(self) -> None:
        self._changed.set()

    def _id(self, prefix: str) -> str:
        return f"{prefix}{secrets.token_hex(12)}{next(self._counter):08x}"

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------------------ core
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """An exception a handler did not mean to raise (a bug of the simulator's) is kept in
        :attr:`internal_errors` and answered 500, as the core and engine answer their own failures;
        aiohttp's answers (``HTTPException``) and a client gone mid-request (``ConnectionError``) are
        no bug, nor is a request that met the simulator closing."""
        try:
            return await handler(request)
        except (web.HTTPException, ConnectionError):
            raise
        except Exception:
            if self._closed:
                raise
            self.internal_errors.append(traceback.format_exc())
            if request.writer.output_size:  # its answer had begun (a socket upgraded): no 500 to give
                self._notify()
                raise
            mint = request.get(_MINT)
            if mint is not None:
                mint.status = 500
            self._notify()
            if request.path.startswith("/core/"):
                return web.json_response({"message": "Internal server error"}, status=500)
            return web.json_response({"error": {"message": "Internal server error"}}, status=500)

    @staticmethod
    def _bearer(request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        return value.strip() or None if scheme.lower() == "bearer" else None

    def _issue(
        self,
        service_id: str | None,
        tools: list[Any],
        *,
        limits: bool,
        voice_config: Any = None,
    ) -> _Token:
        """Mint a token as the engine does: ``ek_`` + a JWT (HS256) whose payload carries ``sub`` (the
        session id), the model and voice asked for, the limits (``limits``), ``iat``, ``exp``, ``jti``."""
        iat = int(self.now())
        claims: dict[str, Any] = {"sub": str(uuid.uuid4())}
        if isinstance(voice_config, dict):
            claims.update(
                {k: voice_config[k] for k in ("model", "voice") if isinstance(voice_config.get(k), str)}
            )
        if limits:
            claims["maxCallDurationMs"] = round(self.max_call_duration * 1000)
            claims["maxIdleDurationMs"] = round(self.max_idle_duration * 1000)
        claims.update(iat=iat, exp=iat + int(self.token_ttl), jti=str(uuid.uuid4()))
        value = "ek_" + self._sign(claims)
        token = _Token(value, float(claims["exp"]), service_id, tools, claims)
        self._tokens[value] = token
        return token

    def _sign(self, claims: dict[str, Any]) -> str:
        header = _b64url(json.dumps({"alg": "HS256"}, separators=(",", ":")).encode())
        payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
        signature = hmac.new(self.token_secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64url(signature)}"

    def _verify(self, value: str | None) -> tuple[dict[str, Any], str | None]:
        """A token's claims, checked as the engine checks them (the ``ek_`` prefix, the HS256 signature,
        ``exp``), or what is wrong with it."""
        if value is None:
            return {}, "missing token"
        parts = value[3:].split(".") if value.startswith("ek_") else []
        if len(parts) != 3:
            return {}, "invalid token format"
        expected = _b64url(
            hmac.new(self.token_secret, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
        )
        if not hmac.compare_digest(expected.encode(), parts[2].encode()):
            return {}, "invalid token signature"
        try:
            header = json.loads(_unb64url(parts[0]))
            claims = json.loads(_unb64url(parts[1]))
        except ValueError:
            return {}, "invalid token"
        if not isinstance(header, dict) or header.get("alg") != "HS256" or not isinstance(claims, dict):
            return {}, "invalid token"
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or exp <= self.now():
            return claims, "token expired"
        return claims, None

    def _answer(self, token: _Token, style: MintAnswer) -> dict[str, Any]:
        ttl = max(round(token.expires_at - self.now()), 0)
        epoch = int(token.expires_at)
        if style == "core":
            return {
                "token": token.value,
                "expiresAt": _iso(token.expires_at),
                "connectionType": "trusted_server",
            }
        if style == "epoch":
            return {"token": token.value, "expires_at": epoch}
        if style == "expires_in":
            return {"token": token.value, "expires_in": ttl}
        if style == "client_secret":
            return {"client_secret": {"value": token.value, "expires_at": epoch}}
        return {
            "client_secret": {"value": token.value, "expires_at": epoch},
            "value": token.value,
            "token": token.value,
            "expires_in": ttl,
        }

    async def _handle_core_mint(self, request: web.Request) -> web.StreamResponse:
        key = self._bearer(request)
        try:
            body: Any = _engine_json(await request.text())
        except ValueError:
            body = None
        record = request[_MINT] = MintRecord("core", key, body, 0)
        self.mints.append(record)
        try:
            if self._mint_faults:
                return await self._mint_fault(request, record, *self._mint_faults.popleft())
            if key is None or key not in self.keys:
                record.status = 401
                return web.json_response({"message": "Invalid API key"}, status=401)
            if not isinstance(body, dict):
                record.status = 400
                return web.json_response({"message": "Request body must be a JSON object"}, status=400)
            trusted = body.get("connectionType") == "trusted_server"
            scope = TRUSTED_SCOPE if trusted else EPHEMERAL_SCOPE
            if scope not in self.keys[key]:
                record.status = 403
                return web.json_response({"message": f"API key lacks required scope: {scope}"}, status=403)
            config = body.get("config")
            if not isinstance(config, dict) or not isinstance(config.get("serviceId"), str):
                record.status = 400
                return web.json_response({"message": "config.serviceId is required"}, status=400)
            allowed = self.key_providers.get(key)
            if allowed is not None and config.get("provider") not in allowed:
                record.status = 403
                message = f"Provider {config.get('provider')!r} is not allowed for this API key"
                return web.json_response({"message": message}, status=403)
            tools = config.get("serverTools", [])
            if not isinstance(tools, list) or not all(
                isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools
            ):
                record.status = 400
                return web.json_response(
                    {"message": "config.serverTools must be a list of {name, description, parameters}"},
                    status=400,
                )
            token = self._issue(
                config["serviceId"], tools, limits=self.claim_limits, voice_config=config.get("voiceConfig")
            )
            record.status, record.token, record.expires_at = 200, token.value, token.expires_at
            return web.json_response(self._answer(token, self.mint_answer))
        finally:
            self._notify()

    async def _mint_fault(
        self, request: web.Request, record: MintRecord, fault: MintFault, retry_after: int | None
    ) -> web.StreamResponse:
        if fault == "drop":
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing more to say on a dropped connection
        if fault == "timeout":
            self._notify()  # (the request is recorded: a test may wait for it)
            await self._closing.wait()
            return web.json_response({"message": "Gateway timeout"}, status=504)
        record.status = fault
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        message = {429: "Too many requests", 503: "Service unavailable"}.get(
            fault, f"Simulated failure ({fault})"
        )
        return web.json_response({"message": message}, status=fault, headers=headers)

    async def _handle_engine_mint(self, request: web.Request) -> web.StreamResponse:
        key = self._bearer(request)
        try:
            body: Any = _engine_json(await request.text())
        except ValueError:
            body = None
        record = request[_MINT] = MintRecord("engine", key, body, 0)
        self.mints.append(record)
        try:
            if key != self.engine_api_key:
                record.status = 401
                return web.json_response({"error": {"message": "Invalid API key"}}, status=401)
            token = self._issue(None, [], limits=True)  # (the engine's mint states its limits)
            record.status, record.token, record.expires_at = 200, token.value, token.expires_at
            return web.json_response(self._answer(token, "engine"))
        finally:
            self._notify()

    # ------------------------------------------------------------------------------ engine socket
    async def _handle_engine(self, request: web.Request) -> web.StreamResponse:
        value = self._bearer(request)
        claims, problem = self._verify(value)
        if problem is not None:
            if self.refuse_handshake == "drop":
                self.handshakes.append(HandshakeRecord(value, 0, problem or ""))
                self._notify()
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError  # nothing more to say on a dropped connection
            self.handshakes.append(HandshakeRecord(value, 401, problem or ""))
            self._notify()
            return web.json_response({"error": {"message": f"Unauthorized: {problem}"}}, status=401)
        ws = web.WebSocketResponse(max_msg_size=16 * 1024 * 1024, compress=False, timeout=2.0)
        await ws.prepare(request)
        self.handshakes.append(HandshakeRecord(value, 101))
        issued = self._tokens.get(value or "")
        session = EngineSessionRecord(
            id=self._id("sess_"),
            token=value or "",
            service_id=issued.service_id if issued is not None else None,
            connected_at=self.now(),
            max_call_duration=_claimed(claims, "maxCallDurationMs", self.max_call_duration),
            max_idle_duration=_claimed(claims, "maxIdleDurationMs", self.max_idle_duration),
            claims=claims,
            _ws=ws,
            _transport=request.transport,
        )
        self.sessions.append(session)
        self._notify()
        try:
            await self._send(
                session,
                {
                    "type": "session.created",
                    "session": {
                        "id": session.id,
                        "object": "realtime.session",
                        "tools": [],
                        "instructions": "",
                    },
                },
            )
            async for message in ws:
                if self.input_delay:  # (on its way: what the engine already runs goes on meanwhile)
                    await asyncio.sleep(self.input_delay)
                if message.type == WSMsgType.TEXT:
                    await self._on_message(session, message.data)
                elif message.type == WSMsgType.BINARY:
                    await self._error(
                        session, "invalid_request_error", "invalid_json", "Send JSON text frames."
                    )
                if session._ending:
                    break
        finally:
            await self._stop_response(session)
            if session.close_code is None:
                session.closed_by = "client"
                session.close_code = ws.close_code
            session._closed.set()
            self._notify()
        return ws

    async def _send(self, session: EngineSessionRecord, event: dict[str, Any]) -> None:
        event = {
            "type": event["type"],
            "event_id": self._id("event_"),
            **{k: v for k, v in event.items() if k != "type"},
        }
        ws = session._ws
        if ws is None or ws.closed:
            return
        session.sent.append(event)
        self._notify()
        async with session._lock:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(json.dumps(event))

    async def _error(self, session: EngineSessionRecord, type_: str, code: str | None, message: str) -> None:
        await self._send(
            session,
            {"type": "error", "error": {"type": type_, "code": code, "message": message, "param": None}},
        )

    async def _close(self, session: EngineSessionRecord, code: int, reason: str) -> None:
        session._ending = True
        if session.close_code is None:
            session.close_code, session.closed_by, session.end_reason = code, "engine", reason
        ws = session._ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(code=code), 2.0)
        session._closed.set()
        self._notify()

    async def _on_message(self, session: EngineSessionRecord, data: str) -> None:
        try:
            event = _engine_json(data)
        except ValueError:
            await self._error(
                session, "invalid_request_error", "invalid_json", "The message is not valid JSON."
            )
            return
        if not isinstance(event, dict):
            await self._error(session, "invalid_request_error", "invalid_json", "Send a JSON object.")
            return
        session.received.append(event)
        self._notify()
        now = self.now()
        if now - session.connected_at > session.max_call_duration:
            await self._timeout(session, "max_call_duration_exceeded", "maximum call duration exceeded")
            return
        if session.last_speech is not None and now - session.last_speech > session.max_idle_duration:
            await self._timeout(session, "max_idle_duration_exceeded", "maximum idle duration exceeded")
            return
        etype = event.get("type")
        if not session.configured and etype != "session.update":
            await self._fatal(session, "No agent available", code="no_agent")  # (a fatal error, in full)
            return
        if etype == "session.update":
            await self._on_session_update(session, event)
        elif etype == "conversation.item.create":
            await self._on_item(session, event)
        elif etype == "response.create":
            response = event.get("response") if isinstance(event.get("response"), dict) else {}
            instructions = response.get("instructions") if isinstance(response, dict) else None
            await self._create(session, instructions if isinstance(instructions, str) else None)
        elif etype == "response.cancel":  # (with none in flight, or another's id: ignored, as on the engine)
            stopped = await self._stop_response(session, event.get("response_id"))
            if stopped is not None:
                await self._cancelled(session, stopped, "client_cancelled")
        elif etype == "input_audio_buffer.append":
            await self._on_audio(session, event)
        elif etype == "input_audio_buffer.commit":
            await self._send(session, {"type": "input_audio_buffer.committed", "item_id": self._id("item_")})
        else:
            await self._error(
                session, "invalid_request_error", "unknown_event", f"Unknown event type: {etype}"
            )

    async def _timeout(self, session: EngineSessionRecord, code: str, what: str) -> None:
        await self._error(session, "session_timeout", code, f"Session ended: {what}")
        session._ending = True
        await asyncio.sleep(self.timeout_close_delay)
        await self._close(session, 1000, code)

    async def _fatal(
        self,
        session: EngineSessionRecord,
        message: str,
        response: SimResponse | None = None,
        *,
        code: str = "engine_error",
    ) -> None:
        if session._ending or session.closed:
            return
        session._ending = True
        response = response or session._active_response
        await self._stop_response(session)
        await self._error(session, "server_error", code, message)
        if response is None:
            response = SimResponse(self._id("resp_"), "response.create")
            session.responses.append(response)
        response.status = "failed"
        await self._send(
            session,
            {
                "type": "response.done",
                "response": {
                    "id": response.id,
                    "object": "realtime.response",
                    "status": "failed",
                    "output": [],
                },
            },
        )
        await self._close(session, 1011, code)

    async def _on_session_update(self, session: EngineSessionRecord, event: dict[str, Any]) -> None:
        update = event.get("session")
        if not isinstance(update, dict):
            await self._error(session, "invalid_request_error", "invalid_value", "session must be an object")
            return
        if self.refuse_session_update is not None:  # the engine's handler threw: its catch-all answer
            await self._error(session, "server_error", None, self.refuse_session_update)
            return
        if "tools" in update and isinstance(update["tools"], list):
            # Like the engine: only {"type": "function", name, …} entries become tools, and of those only
            # one with a name and a description: it skips any other (with a warning in its own log).
            declared = [t for t in update["tools"] if isinstance(t, dict) and t.get("type") == "function"]
            session._declared, session.tools, dropped = declared, [], []
            for tool in declared:
                name = tool.get("name")
                missing = (
                    "name"
                    if _js_falsy(name)
                    else "description"
                    if _js_falsy(tool.get("description"))
                    else None
                )
                if missing is None:
                    session.tools.append(tool)
                    continue
                dropped.append(str(name))
                session.notes.append(
                    f"tool {name!r} dropped: no {missing} (the engine skips it: its model cannot call it)"
                )
            session._dropped = frozenset(dropped)
        if isinstance(update.get("instructions"), str):
            session.instructions = update["instructions"]
        if session.configured:
            await self._session_updated(session)
        else:  # the engine builds its agent first: input before session.updated finds none (fatal)
            self._spawn(self._build_agent(session))

    async def _build_agent(self, session: EngineSessionRecord) -> None:
        await asyncio.sleep(self.agent_build_time)
        if session._ending or session.closed:
            return
        session.configured = True
        await self._session_updated(session)

    async def _session_updated(self, session: EngineSessionRecord) -> None:
        await self._send(
            session,
            {
                "type": "session.updated",
                "session": {
                    "id": session.id,
                    "object": "realtime.session",
                    "tools": session._declared,
                    "instructions": session.instructions or "",
                },
            },
        )

    async def _on_item(self, session: EngineSessionRecord, event: dict[str, Any]) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            await self._error(session, "invalid_request_error", "invalid_value", "item must be an object")
            return
        item = {"id": self._id("item_"), **item}
        if item.get("type") == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                await self._error(session, "invalid_request_error", "invalid_value", "call_id is required")
                return
            session.outputs.setdefault(call_id, []).append(str(item.get("output", "")))
            await self._send(session, {"type": "conversation.item.created", "item": item})
            return
        if item.get("type") == "message" and item.get("role") == "user":
            texts = [
                c.get("text", "")
                for c in item.get("content") or ()
                if isinstance(c, dict) and c.get("type") == "input_text"
            ]
            text = " ".join(t for t in texts if isinstance(t, str)).strip()
            rule = self._rule(text)
            if rule is not None and rule.refuse is not None:  # refused as it is: no item, no response
                await self._error(session, "invalid_request_error", "invalid_value", rule.refuse)
                return
            session.user_texts.append(text)
            session._turn_text, session._turn_calls, session._turn_plan = text, {}, None
            await self._send(session, {"type": "conversation.item.created", "item": item})
            await self._start_response(session, "user_text", None)  # the engine answers user text by itself
            return
        await self._send(session, {"type": "conversation.item.created", "item": item})

    async def _on_audio(self, session: EngineSessionRecord, event: dict[str, Any]) -> None:
        try:
            chunk = base64.b64decode(str(event.get("audio", "")), validate=True)
        except (binascii.Error, ValueError):
            chunk = b""
        if len(chunk) < MIN_AUDIO_CHUNK:
            await self._error(
                session,
                "invalid_request_error",
                "invalid_audio_chunk",
                f"Audio chunk too small: {len(chunk)} bytes (minimum {MIN_AUDIO_CHUNK})",
            )
            await self._close(session, 1003, "invalid_audio_chunk")
            return
        session.audio_chunks.append(len(chunk))
        start = len(session.audio)
        session.audio.extend(chunk)
        if self.detects_speech(chunk):
            session._speech_end = len(session.audio)
            if not session.speaking:  # speech starting: the engine's idle clock starts (nothing else does)
                session.speaking, session.last_speech = True, self.now()
                session._speech_item = self._id("item_")
                await self._send(
                    session,
                    {
                        "type": "input_audio_buffer.speech_started",
                        "audio_start_ms": _ms(start),
                        "item_id": session._speech_item,
                    },
                )
        elif session.speaking and len(session.audio) - session._speech_end >= self.silence_duration * 48000:
            session.speaking = False
            await self._send(
                session,
                {
                    "type": "input_audio_buffer.speech_stopped",
                    "audio_end_ms": _ms(session._speech_end),
                    "item_id": session._speech_item,
                },
            )

    # ------------------------------------------------------------------------------ responses
    async def _start_response(
        self,
        session: EngineSessionRecord,
        trigger: Literal["user_text", "response.create"],
        instructions: str | None,
    ) -> None:
        """A new response, as the engine starts one: it replaces the one in flight, whose stream stops at
        once (nothing more of it goes out); its ``response.created`` goes out first, then the cut one's
        ``response.done`` ``cancelled`` (``client_cancelled``: its stream notices the cut at its next
        chunk), then the rest of the new one."""
        replaced = await self._stop_response(session)
        response = SimResponse(self._id("resp_"), trigger, instructions)
        session.responses.append(response)
        session._active_response = response
        created: dict[str, Any] = {
            "id": response.id,
            "object": "realtime.response",
            "status": "in_progress",
            "status_details": None,
            "output": [],
            "usage": None,
        }
        await self._send(session, {"type": "response.created", "response": created})
        if replaced is not None:
            await self._cancelled(session, replaced, "client_cancelled")
        session._active = self._spawn(self._respond(session, response))

    async def _create(self, session: EngineSessionRecord, instructions: str | None) -> None:
        """A ``response.create``, answered at once as the engine answers it: one sent before every call
        its tool turn announced has its output starts a response with those calls unanswered (noted)."""
        pending = [cid for cid in session._turn_calls if cid not in session.outputs]
        if pending:
            session.notes.append(
                f"{EARLY_CREATE} for {', '.join(pending)}: answered at once, the calls unanswered"
            )
        await self._start_response(session, "response.create", instructions)

    async def _stop_response(
        self, session: EngineSessionRecord, response_id: Any = None
    ) -> SimResponse | None:
        """Stop the response in flight (the one ``response_id`` names, if it names one), if any: its task
        cancelled, nothing more of it sent. Returns it if it had not ended yet."""
        task, response = session._active, session._active_response
        if response is None or (isinstance(response_id, str) and response_id != response.id):
            return None
        session._active, session._active_response = None, None
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return response if response.status == "in_progress" else None

    async def _cancelled(self, session: EngineSessionRecord, response: SimResponse, reason: str) -> None:
        """End ``response`` as the engine ends a cut one: ``response.done`` ``cancelled`` alone, with
        ``status_details`` ``{"type": "cancelled", "reason": reason}``, no output and no usage (none of
        the ``*.done`` events of its message)."""
        response.status = "cancelled"
        body: dict[str, Any] = {
            "id": response.id,
            "object": "realtime.response",
            "status": "cancelled",
            "status_details": {"type": "cancelled", "reason": reason},
            "output": [],
            "usage": None,
        }
        await self._send(session, {"type": "response.done", "response": body})

    async def _pace(self) -> None:
        await asyncio.sleep(self.event_delay)

    def _rule(self, text: str | None) -> Rule | None:
        if text is None:
            return None
        return next((r for r in self.rules if r.matches(text)), None)

    async def _respond(self, session: EngineSessionRecord, response: SimResponse) -> None:
        item = await self._open(session, response)
        await self._pace()
        rule = self._rule(session._turn_text)
        if response.instructions is not None:
            await self._say(session, response, item, self.instructed_reply)
            return
        if rule is not None and rule.fatal:
            session._active, session._active_response = None, None
            self._spawn(self._fatal(session, "The model provider failed", response))
            return
        if rule is not None and rule.calls:
            if session._turn_plan is None:  # the turn's first response: what its model will call
                session._turn_plan = self._calls(session, rule)
            if session._turn_plan:
                await self._call_tools(session, response, item, rule, session._turn_plan)
                return
        outputs = ToolOutputs(
            [(name, (session.outputs.get(cid) or [""])[-1]) for cid, name in session._turn_calls.items()]
        )
        reply = self.default_reply if rule is None else rule.reply
        text = reply(outputs) if callable(reply) else reply
        await self._say(session, response, item, text, "completed" if rule is None else rule.ends)

    @staticmethod
    def _calls(session: EngineSessionRecord, rule: Rule) -> list[tuple[str, dict[str, Any] | str]]:
        """The calls of ``rule`` the engine's model makes. It knows the tools of session.update, not the
        mint's, and not one the engine dropped: with none to call it calls none, and it never calls a
        dropped one (with some, it may still call a name it made up)."""
        if not session.tools:
            session.notes.append("no tools declared in session.update: the model called none")
            return []
        calls = [call for call in rule.calls if call[0] not in session._dropped]
        for name in dict.fromkeys(name for name, _ in rule.calls if name in session._dropped):
            session.notes.append(f"the model did not call {name!r}: the engine dropped it")
        return calls

    async def _open(self, session: EngineSessionRecord, response: SimResponse) -> dict[str, Any]:
        """The response's assistant message, as the engine opens it before its model runs, whatever
        comes of it: ``output_item.added`` (index 0, in progress, no content, no ``object`` field, as the
        engine's items have none), then its text part's ``content_part.added``."""
        item: dict[str, Any] = {
            "id": self._id("item_"),
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        await self._send(
            session,
            {
                "type": "response.output_item.added",
                "response_id": response.id,
                "output_index": 0,
                "item": item,
            },
        )
        await self._send(
            session,
            {
                "type": "response.content_part.added",
                "response_id": response.id,
                "item_id": item["id"],
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "text", "text": ""},
            },
        )
        return item

    async def _stream(
        self, session: EngineSessionRecord, response: SimResponse, item: dict[str, Any], text: str
    ) -> _Speech:
        """The words of ``text`` into the message ``item``: each a ``response.text.delta`` of its text part
        (``content_index`` 0); each sentence the engine's chunker finds complete is voiced as it comes
        (see :meth:`_voice`). Returns where the message stands, for the rest of the response."""
        speech = _Speech({"response_id": response.id, "item_id": item["id"], "output_index": 0})
        for word in _words(text):
            await self._pace()
            await self._send(
                session, {"type": "response.text.delta", **speech.base, "content_index": 0, "delta": word}
            )
            await self._voice(session, speech, speech.add(word))
        response.text = f"{response.text} {text}".strip()
        return speech

    async def _voice(self, session: EngineSessionRecord, speech: _Speech, chunks: list[str]) -> None:
        """Voice ``chunks`` of the message as the engine does: its audio part opened first (a
        ``content_part.added`` at ``content_index`` 1), then each chunk's transcript delta and audio."""
        audio = {**speech.base, "content_index": 1}
        for chunk in chunks:
            if not speech.voiced:
                speech.voiced = True
                part = {"type": "audio", "transcript": ""}
                await self._send(session, {"type": "response.content_part.added", **audio, "part": part})
            await self._send(
                session, {"type": "response.output_audio_transcript.delta", **audio, "delta": chunk}
            )
            silence = base64.b64encode(bytes(480)).decode("ascii")
            await self._send(session, {"type": "response.output_audio.delta", **audio, "delta": silence})

    async def _text_done(self, session: EngineSessionRecord, speech: _Speech) -> None:
        """The message's ``response.text.done`` (``content_index`` 0): its whole text so far."""
        done = {"type": "response.text.done", **speech.base, "content_index": 0, "text": speech.text}
        await self._send(session, done)

    async def _say(
        self,
        session: EngineSessionRecord,
        response: SimResponse,
        item: dict[str, Any],
        text: str,
        ends: ReplyEnd = "completed",
    ) -> None:
        """Speak ``text`` in the message ``item`` and end the response, as the engine ends a reply: the
        rest of the text voiced, ``response.text.done`` (``content_index`` 0), then, if any of it was
        voiced, ``response.output_audio_transcript.done`` and ``response.output_audio.done`` (1), both
        with the whole text; the item completes with both parts. A reply its turn detection cuts
        (``ends="cancelled"``) stops after its words: ``response.done`` ``cancelled`` (``turn_detected``)
        alone, the rest never voiced, none of the ``*.done`` events."""
        speech = await self._stream(session, response, item, text)
        if ends == "cancelled":
            await self._pace()
            if session._active_response is response:
                session._active, session._active_response = None, None
                await self._cancelled(session, response, "turn_detected")
            return
        await self._voice(session, speech, speech.flush())
        text = speech.text
        await self._text_done(session, speech)
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if speech.voiced:
            audio = {**speech.base, "content_index": 1}
            await self._send(
                session, {"type": "response.output_audio_transcript.done", **audio, "transcript": text}
            )
            await self._send(session, {"type": "response.output_audio.done", **audio})
            content.append({"type": "audio", "transcript": text})
        done = {**item, "status": "completed", "content": content}
        await self._send(
            session,
            {
                "type": "response.output_item.done",
                "response_id": response.id,
                "output_index": 0,
                "item": done,
            },
        )
        await self._finish(session, response, "completed", [done])

    async def _call_tools(
        self,
        session: EngineSessionRecord,
        response: SimResponse,
        item: dict[str, Any],
        rule: Rule,
        plan: list[tuple[str, dict[str, Any] | str]],
    ) -> None:
        """A response in which the model calls a tool, as the engine plays it: the preamble's words in
        the message, if this is the turn's first call (a sentence voiced only once more text follows it:
        never the last), the next call of ``plan`` announced complete at ``output_index`` 1, then the
        preamble's ``response.text.done`` alone, and ``response.done`` ``incomplete`` with
        ``output: []``. The message never completes (no ``output_item.done``, no transcript's ``done``).
        With ``batch_calls``, every call of ``plan``, after the preamble's ``response.text.done``."""
        preamble = None if session._turn_calls else rule.preamble
        speech = await self._stream(session, response, item, preamble) if preamble else None
        if speech is not None and self.batch_calls:
            await self._text_done(session, speech)
        for name, args in list(plan) if self.batch_calls else plan[:1]:
            call_id = "call_" + secrets.token_hex(8)
            arguments = args if isinstance(args, str) else json.dumps(args, separators=(",", ":"))
            call = {  # (the engine's item: the assistant's, no ``object`` field)
                "id": self._id("item_"),
                "type": "function_call",
                "status": "completed",
                "role": "assistant",
                "name": name,
                "call_id": call_id,
                "arguments": arguments,
            }
            for _ in range(2 if rule.repeat_calls else 1):
                await self._pace()
                if call_id not in session._turn_calls:  # announced: the engine waits for its output
                    session._turn_calls[call_id] = name
                    response.call_ids.append(call_id)
                    plan.pop(0)
                await self._send(
                    session,
                    {
                        "type": "response.output_item.added",
                        "response_id": response.id,
                        "output_index": 1,
                        "item": call,
                    },
                )
        if speech is not None and not self.batch_calls:
            await self._text_done(session, speech)
        await self._finish(session, response, "incomplete", [])

    async def _finish(
        self,
        session: EngineSessionRecord,
        response: SimResponse,
        status: Literal["completed", "incomplete"],
        output: list[dict[str, Any]],
    ) -> None:
        """End ``response`` as the engine ends a reply (``completed``) or a tool turn (``incomplete``):
        ``response.done``, ``status_details`` and ``usage`` null (the engine reports none)."""
        await self._pace()
        if session._active_response is response:
            session._active, session._active_response = None, None
        response.status = status
        body: dict[str, Any] = {
            "id": response.id,
            "object": "realtime.response",
            "status": status,
            "status_details": None,
            "output": output,
            "usage": None,
        }
        await self._send(session, {"type": "response.done", "response": body})


def _ms(size: int) -> int:
    """Milliseconds of PCM16 mono 24 kHz audio in ``size`` bytes (48 a millisecond)."""
    return size // 48


def _speech(pcm16: bytes) -> bool:
    """Whether PCM16 LE audio holds speech, as the engine's detector would say: a peak above about
    -36 dBFS (500 of 32767); silence and line noise stay below it."""
    samples = memoryview(pcm16[: len(pcm16) - len(pcm16) % 2]).cast("h")
    return len(samples) > 0 and (max(samples) > 500 or min(samples) < -500)
