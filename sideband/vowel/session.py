"""Trusted-server sessions on a vowel engine, driven from code.

::

    async with EngineSession.open(settings, app) as session:
        reply = await session.say("Where is order 1042?")
        print(reply.text, [t.name for t in reply.tools])

One session = one freshly minted token, one engine socket, one :class:`~sideband.runtime.driver.CallRuntime`
(the same state machine and tool execution as a phone call). The token is minted right before connecting
and never logged.
"""

from __future__ import annotations

import array
import asyncio
import base64
import dataclasses
import re
import secrets
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from pydantic import SecretStr

from sideband.app import Sideband
from sideband.context import CallContext
from sideband.runtime.driver import CallHooks, CallRuntime, CallSummary, ToolRecord
from sideband.runtime.machine import Action, CallMachine, Capabilities, MachineConfig
from sideband.settings import Settings, env_name
from sideband.tools import ToolRegistry
from sideband.upstream._ws import PushConnection
from sideband.upstream.openai import UpstreamError, with_retries
from sideband.upstream.vowel import (
    EngineRefused,
    MintRefused,
    Token,
    VowelCore,
    connect_engine,
    core_proxy,
    engine_socket_url,
    trusted_session_request,
)

__all__ = ["ENGINE_CAPABILITIES", "REQUIRED_SETTINGS", "EngineError", "EngineSession", "Reply"]

ENGINE_CAPABILITIES = Capabilities(
    session_created_first=True,
    call_verbs=False,
    audio_playback_events=False,
    responds_to_user_text=True,
    resumable=False,
    close_reasons={1011: "engine_error"},
    nested_audio=False,
    reused_call_ids=True,
    speaks_over_tools=False,
    idle_after_answers=False,
    session_expires_at=False,
    tags_responses=False,
)
"""What the vowel engine does, as the call machine sees it."""

REQUIRED_SETTINGS = ("vowel_core_url", "vowel_engine_url", "vowel_api_key", "vowel_service_id")
"""What a session needs (``load_settings(require=REQUIRED_SETTINGS)``)."""

MIN_AUDIO_CHUNK = 2048
"""The engine refuses smaller ``input_audio_buffer.append`` chunks (``invalid_audio_chunk``, close 1003)."""
MAX_AUDIO_CHUNK = 32 * 1024

_LIMITS = {
    "max_duration": "the session reached SIDEBAND_MAX_CALL_SECONDS, or the engine's call limit",
    "idle_timeout": "the session was idle for SIDEBAND_MAX_IDLE_SECONDS, or the engine's idle limit",
}
ENGINE_CALL_LIMIT = 30 * 60.0
"""The engine's call limit when the token carries no ``maxCallDurationMs`` claim (seconds)."""
ENGINE_IDLE_LIMIT = 10 * 60.0
"""The engine's idle limit when the token carries no ``maxIdleDurationMs`` claim (seconds)."""
_LIMIT_MARGIN = 5.0
"""Our timers fire this much plus ``end_cap`` (at most a tenth of the limit) before the engine's: it checks
its limits only when a message arrives, so the outputs of tools still running and our goodbye's
``response.create`` must reach it in time, and its clock may have started before ours."""
SPEECH_PEAK = 500
"""Streamed audio counts as the caller's activity when a sample rises above this (of 32767, about
-36 dBFS): line noise and silence stay below it, speech does not."""
_ENGINE_LIMITS = frozenset({"max_call_duration_exceeded", "max_idle_duration_exceeded"})
_REFUSAL = "invalid_request_error"  # the type of the engine's error refusing one client event
_CUT_SHORT = frozenset({"cancelled", "incomplete"})  # a reply's end that may have nothing follow it


def _described_name(name: str) -> str:
    """The description an engine session declares for a tool that has none, made from its name:
    ``lookup_order`` and ``lookupOrder`` → "Lookup order.", ``send_SMS`` → "Send SMS."."""
    words = (
        re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
        .replace("_", " ")
        .replace("-", " ")
        .split()
    )
    words = [w if w.isupper() and len(w) > 1 else w.lower() for w in words]
    text = " ".join(words) or name
    return f"{text[0].upper()}{text[1:]}."


def _described(tools: ToolRegistry) -> ToolRegistry:
    """``tools``, each without a description given one made from its name: the engine drops a session
    tool without one, which its model then never calls."""
    for tool in list(tools):
        if not tool.description.strip():
            tools = tools.replacing(dataclasses.replace(tool, description=_described_name(tool.name)))
    return tools


class EngineError(Exception):
    """A trusted-server session could not start or ended badly, or the engine refused a turn.
    ``str(err)`` is one line; ``reason`` is the end reason (``mint_forbidden``, ``mint_unauthorized``,
    ``token_rejected``, ``setup_failed``, ``engine_error``, ``max_call_duration_exceeded``,
    ``max_idle_duration_exceeded``, ``max_duration``, ``idle_timeout``…), or ``turn_refused`` (the
    session carries on)."""

    def __init__(
        self, reason: str, message: str, *, code: str | None = None, engine_message: str | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code
        """The code (else the type) of the engine's ``error`` event that refused the turn
        (``turn_refused``) or the session's ``session.update`` (``setup_failed``)."""
        self.engine_message = engine_message
        """That error's message."""


@dataclass(frozen=True, slots=True)
class Reply:
    """The assistant's answer to one :meth:`EngineSession.say` turn."""

    text: str
    """The reply's lines joined with spaces."""
    lines: tuple[str, ...]
    """Each text/transcript part of the turn, in order (a preamble before a tool call comes first)."""
    tools: tuple[ToolRecord, ...]
    """Tools executed during the turn (name, outcome, duration)."""
    response_id: str | None
    ended: str | None = None
    """The end reason when the session ended with this reply (e.g. the agent ended the call)."""
    status: str | None = "completed"
    """The status of the response that ended the turn: ``completed``, or ``cancelled`` / ``incomplete``
    for a reply cut short that nothing followed (the engine's turn detection stopped it, say)."""


class _EngineMachine(CallMachine):
    """The call machine of an engine session, which hands the session an ``error`` event that arrives
    while the session waits for the engine's answer to what it sent (:attr:`on_error`, set only then:
    otherwise a handled event costs one call and one attribute check more): ``session.updated`` as the
    session starts, or the start of a turn's reply (:attr:`until_reply`: that watch ends at
    ``response.created``, after which an error is not about the turn's text). When ``on_error`` takes
    the error for the engine's refusal of the turn's text (it returns ``True``), nothing waits for that
    text's answer any more (:meth:`CallMachine.text_refused`).

    As it closes, whatever ends it, the machine hands its reason to :attr:`on_close` (once), which names
    the session's end: the call ends with that name (its summary, ``call.ended``, the ``on_call_end``
    hooks), and the session knows it has ended from that moment, not once the runtime's teardown is over.
    """

    __slots__ = ("on_close", "on_error", "reply_ends", "until_reply")

    def __init__(self, config: MachineConfig, caps: Capabilities) -> None:
        super().__init__(config, caps)
        self.on_error: Callable[[dict[str, Any]], bool] | None = None
        self.until_reply = False
        self.on_close: Callable[[str], str] | None = None
        self.reply_ends = 0
        """``response.done`` events whose check of the turn (:meth:`EngineSession._on_response`) has not
        run yet: a close while one is pending (brought by that event, come in the same read, or while
        the reply's words are checked) leaves the turn to that reply's end."""

    def watch(self, on_error: Callable[[dict[str, Any]], bool] | None, *, until_reply: bool = False) -> None:
        """Hand ``error`` events to ``on_error`` from now on (``None``: no more)."""
        self.on_error, self.until_reply = on_error, until_reply

    def _close(self, reason: str) -> list[Action]:
        on_close, self.on_close = self.on_close, None  # (it holds the session: no cycle once closed)
        return super()._close(on_close(reason) if on_close is not None else reason)

    def receive(self, event: dict[str, Any]) -> list[Action]:
        """A server event arrived (see :meth:`CallMachine.receive`)."""
        kind = event.get("type")
        if kind == "response.done" and self.closed is None:  # (its notice brings the turn's check)
            self.reply_ends += 1
        actions = super().receive(event)
        if self.on_error is not None:
            if kind == "response.created" and self.until_reply:
                self.on_error = None
            elif kind == "error":
                error = event.get("error")
                if self.on_error(error if isinstance(error, dict) else {}):
                    actions = [*actions, *self.text_refused()]  # (applied with the rest)
        return actions


@dataclass(slots=True)
class _Turn:
    future: asyncio.Future[Reply]
    transcript_at: int  # where the turn starts in the runtime's summary
    tools_at: int


class EngineSession:
    """One trusted-server session on a vowel engine, with ``app``'s tools.

    Use :meth:`open` as an async context manager (or ``await session.start()`` … ``await
    session.close()``). Settings: ``SIDEBAND_VOWEL_CORE_URL``, ``SIDEBAND_VOWEL_ENGINE_URL``,
    ``SIDEBAND_VOWEL_API_KEY`` (a key with the ``mint_trusted_session`` scope), ``SIDEBAND_VOWEL_SERVICE_ID``.
    """

    def __init__(
        self,
        settings: Settings,
        app: Sideband,
        *,
        tools: Iterable[str] | None = None,
        instructions: str | None = None,
        http: aiohttp.ClientSession | None = None,
        open_timeout: float = 10.0,
        mint_timeout: float = 5.0,
        mint_budget: float = 10.0,
        reply_timeout: float = 60.0,
        end_cap: float = 5.0,
        app_hooks: bool = True,
    ) -> None:
        for name in REQUIRED_SETTINGS:
            value = getattr(settings, name)
            if value is None or (isinstance(value, SecretStr) and not value.get_secret_value()):
                raise EngineError("not_configured", f"{env_name(name)} is not set")
        self.settings = settings
        self.app = app
        transfer = app.transfer_tool
        if tools is None:  # all of the app's tools but the transfer, which only a phone call can do
            tools = [name for name in app.tools.names() if name != transfer] if transfer else None
        elif transfer is not None and transfer in (tools := list(tools)):
            raise ValueError(f"{transfer!r} transfers phone calls: an engine session has none to transfer")
        self.tools: ToolRegistry = _described(app.tools if tools is None else app.tools.subset(tools))
        """The session's tools, as the engine is told of them: one without a description has one made
        from its name (``lookup_order`` → "Lookup order."), as the engine drops a tool without one."""
        self.instructions = instructions if instructions is not None else app.config.instructions
        self.open_timeout = open_timeout
        self.mint_timeout = mint_timeout
        self.mint_budget = mint_budget
        self.reply_timeout = reply_timeout
        self.end_cap = end_cap
        self.app_hooks = app_hooks
        self.service_id: str = settings.vowel_service_id or ""
        self.call_id: str = f"vowel_{secrets.token_hex(8)}"
        """The session's id in our logs, on every line about it from the mint on (a local id: the
        engine's own ids are logged beside it, ``token_session_id`` and ``engine_session_id``)."""
        self.token_expires_at: float | None = None
        self.end_reason: str | None = None
        self.end_message: str | None = None
        self._end_error: tuple[str | None, str | None] = (None, None)  # the engine's code and message
        self.summary: CallSummary | None = None
        self._http = http
        self._own_http = http is None
        self._ws: PushConnection | None = None
        self._runtime: CallRuntime | None = None
        self._machine: _EngineMachine | None = None
        self._task: asyncio.Task[str] | None = None
        self._turn: _Turn | None = None
        self._cancelled_turn: asyncio.Task[Any] | None = None  # the task whose cancel ended a turn
        # The engine's refusal of a turn's text (the session carried on): not the cause of a later close.
        self._excused: Mapping[str, Any] | None = None
        self._turn_lock = asyncio.Lock()
        self._ended = asyncio.Event()  # set with end_reason
        self._audio = bytearray()
        self._started = False
        self._closing = False
        self._log: Any = structlog.get_logger(component="sideband.vowel").bind(
            call_id=self.call_id, service_id=self.service_id
        )

    @classmethod
    def open(cls, settings: Settings, app: Sideband, **options: Any) -> EngineSession:
        """A session to use as ``async with EngineSession.open(settings, app) as session:``."""
        return cls(settings, app, **options)

    async def __aenter__(self) -> EngineSession:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        if exc_type is not None:
            task = self._task
            cancelled_turn = self._cancelled_turn
            if (
                issubclass(exc_type, asyncio.CancelledError)
                and cancelled_turn is not None
                and cancelled_turn is asyncio.current_task()
                and task is not None
                and not task.done()
                and self.runtime.machine.closed is None
            ):
                # This very cancellation cut the say() short (its owner is being cancelled, a
                # shutdown): the session is cancelled, not a turn given up on.
                self.end_reason = self.end_message = None
                self._ended.clear()
            await self.abort()  # the body failed, or was cancelled: do not wait for the engine
        else:
            await self.close()

    # ------------------------------------------------------------------------------- state
    @property
    def live(self) -> bool:
        """Started and not ended."""
        return self._task is not None and not self._task.done() and self.end_reason is None

    @property
    def failed(self) -> bool:
        """Ended for a reason other than our own close or an end the agent asked for."""
        return self.end_reason is not None and self.end_message is not None

    @property
    def runtime(self) -> CallRuntime:
        """The call runtime driving the engine socket (after :meth:`start`)."""
        if self._runtime is None:
            raise RuntimeError("EngineSession.start() was not awaited")
        return self._runtime

    @property
    def engine_session_id(self) -> str | None:
        """The engine's ``sess_…`` id (from ``session.created``)."""
        return self._runtime.machine.session_id if self._runtime is not None else None

    # ------------------------------------------------------------------------------ opening
    async def start(self) -> EngineSession:
        """Mint a token, connect, configure the session; return once the engine confirmed it."""
        if self._started:
            raise RuntimeError("an EngineSession starts once")
        self._started = True
        settings = self.settings
        api_key = settings.vowel_api_key.get_secret_value() if settings.vowel_api_key else ""
        core_url = settings.vowel_core_url or ""
        try:  # (the proxy the engine's socket takes: a host behind one reaches the core through it too)
            proxy = core_proxy(core_url)
        except ValueError as exc:
            self._set_end("not_configured", str(exc))
            self._log.warning("vowel.session_failed", reason="not_configured", status=None, error=str(exc))
            raise EngineError("not_configured", str(exc)) from None
        if self._http is None:
            self._http = aiohttp.ClientSession()
        try:
            token = await self._mint(VowelCore(self._http, core_url, api_key, proxy))
            self._ws = await self._connect(token)
        except UpstreamError as exc:
            await self.abort()
            reason = getattr(exc, "reason", None) or "connect_failed"
            self._set_end(reason, str(exc))
            self._log.warning("vowel.session_failed", reason=reason, status=exc.status)
            raise EngineError(reason, str(exc)) from None
        except BaseException:
            await self.abort()
            raise
        self._runtime = self._build_runtime(self._ws, token)
        machine = self._machine
        assert machine is not None
        machine.watch(self._setup_refused)
        self._task = asyncio.create_task(self._run(self._runtime), name=f"vowel:{self.call_id}")
        try:
            await self._ready()
        except BaseException as exc:
            if isinstance(exc, EngineError):
                self._set_end(exc.reason, str(exc))  # a no-op when the session had ended already
            await self.abort()
            raise
        finally:
            machine.watch(None)  # (the machine would hold this session)
        self._log.info("vowel.session_created", engine_session_id=self.engine_session_id)
        return self

    def _setup_refused(self, error: dict[str, Any]) -> bool:
        """An ``error`` event came while the session waited for ``session.updated``: the engine's answer
        to our ``session.update`` (the only event sent by then), such as a tool schema it could not take,
        after which no ``session.updated`` comes and the socket stays open. The start fails at once with
        the engine's code and message (``setup_failed``). An error that ended the session (a limit) is
        left to the session's end, which names it. Returns ``False``: no text was refused."""
        machine = self._machine
        if machine is None or machine.session_ready or machine.closed is not None or self.end_reason:
            return False
        code = str(error.get("code") or error.get("type") or "") or None
        said = " ".join(str(error.get("message") or "").split())[:200] or None
        self._log.warning("vowel.setup_failed", engine_error=code, message=said)
        detail = ": ".join(part for part in (code, said) if part) or "no reason given"
        message = (
            f"vowel engine could not set up the session: session.update answered with an error ({detail})"
        )
        self._end_error = (code, said)
        self._set_end("setup_failed", message)
        return False

    async def _mint(self, core: VowelCore) -> Token:
        settings = self.settings
        body = trusted_session_request(
            service_id=self.service_id,
            provider=settings.vowel_provider,
            tools=self.tools.definitions(style="vowel"),
            model=settings.vowel_model,
            voice=settings.vowel_voice,
        )
        attempts = 0

        async def attempt(timeout: float) -> Token:
            nonlocal attempts
            attempts += 1
            return await core.mint(body, timeout=timeout)

        def on_retry(attempt: int, exc: UpstreamError) -> None:
            self._log.info(
                "vowel.mint_retry",
                attempt=attempt,
                status=exc.status,
                error=str(exc),
                retry_after=exc.retry_after,
            )

        try:
            token = await with_retries(
                attempt, budget=self.mint_budget, attempt_timeout=self.mint_timeout, on_retry=on_retry
            )
        except MintRefused as exc:
            self._log.warning("vowel.mint_refused", status=exc.status, reason=exc.reason)
            raise
        except UpstreamError as exc:
            self._log.warning("vowel.mint_failed", status=exc.status, error=str(exc), attempts=attempts)
            raise
        self.token_expires_at = token.expires_at
        expires_in = token.expires_in()
        self._log.info(
            "vowel.session_minted",
            expires_in_s=None if expires_in is None else round(expires_in, 1),
            token_session_id=token.session_id,
            tools=self.tools.names(),
        )
        return token

    async def _connect(self, token: Token) -> PushConnection:
        try:
            url = self.settings.vowel_engine_url or ""
            # the app's one client TLS context for wss://, not a new one per session
            tls = self.app.tls_context() if engine_socket_url(url).startswith("wss://") else None
            ws = await connect_engine(url, token, open_timeout=self.open_timeout, tls=tls)
        except EngineRefused as exc:
            self._log.warning("vowel.token_rejected", status=exc.status)
            raise
        except UpstreamError as exc:
            self._log.warning("vowel.connect_failed", status=exc.status, error=str(exc))
            raise
        self._log.info("vowel.connected", attempt=1)
        return ws

    def _build_runtime(self, ws: PushConnection, token: Token) -> CallRuntime:
        settings, app = self.settings, self.app
        session: dict[str, Any] = {"tools": self.tools.definitions(style="openai")}
        if self.instructions:
            session["instructions"] = self.instructions
        if settings.vowel_voice:
            session["voice"] = settings.vowel_voice
        if settings.vowel_model:
            session["model"] = settings.vowel_model
        engine_idle = _before(token.max_idle_duration or ENGINE_IDLE_LIMIT, self.end_cap)
        config = MachineConfig(
            session=session,
            greeting=None,
            goodbye_instructions=app.goodbye_instructions,
            # None: the engine times idleness from the caller's last words, which a question of ours
            # does not restart; asked, the caller would be cut off by the engine before our goodbye.
            idle_prompts=0,
            guardrail_note=app.guardrail_note,
            max_call_duration=_tightest(
                app.max_call_duration or settings.max_call_duration,
                _before(token.max_call_duration or ENGINE_CALL_LIMIT, self.end_cap),
            ),
            max_idle_duration=_tightest(app.max_idle_duration or settings.max_idle_duration, engine_idle),
            # The engine counts idle time only after speech was detected, from the last: text restarts
            # none of its clock, so ours for it runs from the caller's speech alone.
            speech_idle_duration=engine_idle,
            end_cap=self.end_cap,
            max_tool_calls=app.max_tool_calls,
            max_identical_calls=app.max_identical_calls,
        )

        async def connect() -> PushConnection:
            return ws  # opened already; an engine session is never resumed on another socket

        hooks = app.hooks() if self.app_hooks else CallHooks(guardrails=app.guardrails)  # (rules still hold)
        hooks.on_response = [self._on_response]
        self._machine = _EngineMachine(config, ENGINE_CAPABILITIES)
        self._machine.on_close = self._machine_closed
        return CallRuntime(
            machine=self._machine,
            ctx=CallContext(self.call_id, "vowel"),
            tools=self.tools,
            connect=connect,
            hooks=hooks,
            log_tool_arguments=settings.log_tool_arguments,
            log_transcripts=settings.log_transcripts,
            log_fields={"service_id": self.service_id},
        )

    async def _run(self, runtime: CallRuntime) -> str:
        try:
            return await runtime.run()
        finally:
            self._finish(runtime)
            # The runtime's hook is a method of this session, which holds the runtime: a cycle only the
            # collector would free. The session has ended; nothing calls the hook again.
            runtime.hooks.on_response = []

    # ------------------------------------------------------------------------------ driving
    async def say(self, text: str, *, timeout: float | None = None) -> Reply:
        """Send a user text turn and wait for the assistant's reply (tools it ran included), for at most
        ``timeout`` seconds in all (``reply_timeout`` by default), the wait for the turns before it
        included: one still under way when the time is up leaves this one's text unsent
        (``reply_timeout``; the session carries on).

        The engine answers user text by itself: no ``response.create`` is sent for it. A reply already
        under way or on its way (a hook's ``ctx.say()`` or text, the tools of an earlier reply) is waited
        for first: it is not this turn's. A reply cut short (``cancelled``, or ``incomplete`` with no tool
        call) that no other response follows ends the turn, as :attr:`Reply.status` says. Raises
        :class:`EngineError` if the session ends first (or ``reply_timeout`` passes), or at once with
        ``turn_refused`` (the engine's ``code`` and ``engine_message``) when the engine refuses the text
        (an ``invalid_request_error`` instead of a reply): the session carries on. Any other error (the
        engine failing, a limit) ends the session, whose end reason is raised.
        """
        if not text.strip():
            raise ValueError("say() needs some text")
        limit = self.reply_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit  # (the whole turn's: the waits for the turns before it count)
        try:
            async with asyncio.timeout_at(deadline):
                await self._turn_lock.acquire()
        except TimeoutError:
            message = (
                f"an earlier say() was still waiting for its reply after {limit:g} s: the text was not sent"
            )
            raise EngineError("reply_timeout", message) from None
        try:
            await self._ready()
            runtime = self.runtime
            await self._until_quiet(limit, deadline)
            summary = runtime.summary
            future: asyncio.Future[Reply] = loop.create_future()
            self._turn = _Turn(future, len(summary.transcript), len(summary.tools))
            machine = self._machine
            assert machine is not None
            try:
                machine.watch(self._turn_refused, until_reply=True)  # until the engine's answer starts
                runtime.send_text(text)
                async with asyncio.timeout_at(deadline):  # (3.11's wait_for can lose a cancellation)
                    return await future
            except TimeoutError:
                # The engine is stuck, or its late reply would be taken for the next turn's: this
                # session is over (its logs and end_reason say so; close it). One that ended meanwhile
                # keeps its own end.
                self._set_end("reply_timeout", f"no reply from the vowel engine within {limit:g} s")
                raise self._error() from None
            except asyncio.CancelledError:
                if (future.cancelled() or not future.done()) and self.end_reason is None:
                    # The turn is out and its reply still to come: the next turn would take it for its
                    # own. Over, as after a reply_timeout. (Cancelling the task cancels the future.)
                    self._set_end("reply_cancelled", "a say() was cancelled before its reply came")
                    self._cancelled_turn = asyncio.current_task()
                raise
            finally:
                machine.watch(None)  # (the machine would hold this session)
                self._turn = None
                del future  # it may hold the error raised here, whose traceback holds this frame
        finally:
            self._turn_lock.release()

    def _turn_refused(self, error: dict[str, Any]) -> bool:
        """An ``error`` event came while the turn's text waited for its answer to start: the engine's
        answer to that text if it is a refusal of one client event (``invalid_request_error``), unless it
        names the client event it answers (``event_id``: the text carries none). The turn fails at once
        with the engine's code and message, and ``True`` is returned: no answer to the text will come,
        and the next turn need not wait for one. Any other error (the engine failing: ``error``, then
        ``response.done`` failed and close 1011; a limit's ``session_timeout``), or one that ended the
        session, is left to the session's end, which names it."""
        turn, machine = self._turn, self._machine
        event_id = error.get("event_id")
        if (
            turn is None
            or turn.future.done()
            or machine is None
            or error.get("type") != _REFUSAL
            or (isinstance(event_id, str) and event_id)
        ):
            return False
        machine.watch(None)
        if machine.closed is not None:
            return False
        self._excused = machine.last_error
        code = str(error.get("code") or error.get("type") or "") or None
        said = " ".join(str(error.get("message") or "").split())[:200] or None
        self._log.warning("vowel.turn_refused", engine_error=code, message=said)
        detail = ": ".join(part for part in (code, said) if part) or "no reason given"
        turn.future.set_exception(
            EngineError(
                "turn_refused",
                f"vowel engine refused the turn's text ({detail})",
                code=code,
                engine_message=said,
            )
        )
        return True

    async def _until_quiet(self, limit: float, deadline: float) -> None:
        """Wait until no response is under way, owed or expected (the engine's answer to a hook's text)
        and no tool runs (a reply already under way would be taken for the next turn's). Raises
        :class:`EngineError` once the session has ended, or ``reply_timeout`` at ``deadline`` (the
        loop's time; ``limit`` seconds after the turn began: the turn not sent, the session carries on)."""
        machine, ended, quiet = self.runtime.machine, self._ended, self.runtime.quiet_signal()
        try:
            async with asyncio.timeout_at(deadline):
                while (machine.busy or machine.response_pending) and not ended.is_set():
                    quiet.clear()
                    waiters = [asyncio.ensure_future(quiet.wait()), asyncio.ensure_future(ended.wait())]
                    try:
                        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for waiter in waiters:
                            waiter.cancel()
                        await asyncio.gather(*waiters, return_exceptions=True)
        except TimeoutError:
            message = f"the vowel engine was still answering after {limit:g} s: the text was not sent"
            raise EngineError("reply_timeout", message) from None
        self._check_live()

    async def send_audio(self, pcm16: bytes) -> None:
        """Send caller audio: PCM16 LE mono 24 kHz. Sent as ``input_audio_buffer.append`` chunks of at
        least 2048 bytes; a smaller remainder waits for the next call (or :meth:`flush_audio`)."""
        await self._ready()
        start = len(self._audio) & ~1  # (the buffer holds whole samples from its start)
        self._audio.extend(pcm16)
        if _sounds(self._audio[start:]):  # the engine counts idle from speech: silence is no activity
            self.runtime.caller_active()
        while len(self._audio) >= MIN_AUDIO_CHUNK:
            size = min(len(self._audio), MAX_AUDIO_CHUNK)
            size -= size % 2
            chunk = bytes(self._audio[:size])
            del self._audio[:size]
            self.runtime.send_event(
                {"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode("ascii")}
            )

    async def flush_audio(self) -> None:
        """Send the buffered remainder, padded with silence to the engine's minimum chunk size."""
        if not self._audio:
            return
        self._audio.extend(bytes(MIN_AUDIO_CHUNK - len(self._audio)))
        await self.send_audio(b"")

    async def _ready(self) -> None:
        """Input goes out only once the engine confirmed the session (anything before ``session.update``
        is fatal on the engine). Raises :class:`EngineError` once the session has ended (the engine
        refused our ``session.update``, say: see :meth:`_setup_refused`)."""
        self._check_live()
        ready = self.runtime.ready
        if ready.is_set():
            return
        waiters = [asyncio.ensure_future(ready.wait()), asyncio.ensure_future(self._ended.wait())]
        try:
            await asyncio.wait(waiters, timeout=self.open_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        self._check_live()
        if not ready.is_set():
            self._log.warning("vowel.session_not_ready", timeout_s=self.open_timeout)
            message = f"vowel engine did not confirm the session within {self.open_timeout:g} s"
            self._set_end("not_ready", message)
            raise EngineError("not_ready", message)

    def _check_live(self) -> None:
        if self._task is None:
            raise RuntimeError("EngineSession.start() was not awaited")
        if self.end_reason is not None or self._task.done():
            raise self._error()

    async def _on_response(
        self, ctx: CallContext, response_id: str | None, status: str | None, tools_running: int
    ) -> None:
        """A turn ends at a ``completed`` ``response.done`` (or one an output guardrail stopped) with no tool
        running and no response to come; its reply's words checked, without a stopped reply's lines. A
        reply that ended ``cancelled`` or ``incomplete`` ends it too when no response is owed or about to
        start (nothing follows a reply the engine's turn detection stopped on a noise). The hook runs
        once the runtime handled that event: nothing asked for since can be answered yet. The session
        ended with that event, or since (see :meth:`_machine_closed`), and no reply ending the turn: it
        fails with the session's end.
        (A coroutine: it runs on the event loop, never queued behind the app's sync hooks and tools.)"""
        turn, runtime, engine = self._turn, self.runtime, self._machine
        machine = runtime.machine
        try:
            if turn is None or turn.future.done():
                return
            # (a reply an output guardrail stopped, with no answer to follow it, ends the turn too)
            was_stopped = response_id is not None and response_id == runtime.stopped_reply
            cut_short = status in _CUT_SHORT and not machine.response_pending
            if (
                (status != "completed" and not was_stopped and not cut_short)
                or tools_running
                or machine.response_owed
            ):
                return
            await runtime.guarded()  # (the reply's words are checked before it is handed back)
            if turn.future.done() or machine.response_owed or (cut_short and machine.response_pending):
                return  # (a guardrail stopped it: the model answers again)
            summary = runtime.summary
            at, stopped = turn.transcript_at, summary.stopped
            lines = tuple(
                t
                for i, (role, t) in enumerate(summary.transcript[at:], at)
                if role == "agent" and i not in stopped
            )
            tools = tuple(summary.tools[turn.tools_at :])  # recorded before their outputs went out
            turn.future.set_result(Reply(" ".join(lines), lines, tools, response_id, machine.closed, status))
        finally:
            if engine is not None and engine.reply_ends:
                engine.reply_ends -= 1
            if (
                turn is not None
                and not turn.future.done()
                and machine.closed is not None
                and not (engine is not None and engine.reply_ends)  # (a later reply's end may end it)
            ):
                turn.future.set_exception(self._error())  # the session ended with no reply to the turn

    # ------------------------------------------------------------------------------ ending
    async def wait_closed(self, timeout: float | None = None) -> str | None:
        """Wait until the session has ended and its runtime's end is over (its tools' cleanup, its
        ``on_call_end`` hooks); return its end reason. (:attr:`live` turns false, and a turn under way
        fails, as the session ends.)"""
        if self._task is not None:
            async with asyncio.timeout(timeout):
                await asyncio.wait({self._task})
        return self.end_reason

    async def close(self) -> str | None:
        """End the session (after in-flight tool outputs, at most ``end_cap`` seconds), close the socket,
        cancel and await every task. Idempotent; returns the end reason.

        The runtime's own end (its tools' grace, the socket's close, each ``on_call_end`` hook's limit)
        is awaited in full; only a runtime still running past all of that is cancelled."""
        task = self._task
        try:
            if task is not None and not task.done():
                self._closing = True
                with structlog.contextvars.bound_contextvars(
                    call_id=self.call_id, service_id=self.service_id
                ):
                    # (a session already over, say after a reply_timeout, ends with that reason)
                    self.runtime.hangup(self.end_reason or "closed")
                await asyncio.wait({task}, timeout=self.end_cap + self.runtime.end_bound())
        finally:
            await self.abort()
        return self.end_reason

    async def abort(self) -> None:
        """End at once: cancel the runtime (its socket and tools) and await it."""
        self._cancelled_turn = None  # (a task, which may hold this session through its frames)
        if self._task is not None:
            self._task.cancel()  # (a session over already ends the call with its end: _machine_closed)
            await asyncio.gather(self._task, return_exceptions=True)
        http, self._http = self._http, None
        if http is not None and self._own_http:
            await http.close()

    def _error(self) -> EngineError:
        reason = self.end_reason or "closed"
        code, said = self._end_error
        return EngineError(
            reason,
            self.end_message or f"the vowel session has ended ({reason})",
            code=code,
            engine_message=said,
        )

    def _set_end(self, reason: str, message: str | None) -> None:
        if self.end_reason is None:
            self.end_reason, self.end_message = reason, message
            self._ended.set()

    def _machine_closed(self, reason: str) -> str:
        """The call's machine closes with ``reason``: the session ends now, named by :meth:`_named` (a
        session over already, say after a ``reply_timeout``, keeps its end). A turn under way fails with
        it at once, unless a ``response.done`` whose check is still to run may end the turn with its
        reply (see :meth:`_on_response`; the runtime's end fails it otherwise: :meth:`_finish`).
        Returns the end, which the call ends with too. The call's summary is the session's from now on
        (its ``reason`` now; its ``duration`` once the runtime's end is over)."""
        self._set_end(*self._named(reason))
        end = self.end_reason
        assert end is not None
        if self._runtime is not None:
            self.summary = self._runtime.summary
            self.summary.reason = end
        turn, machine = self._turn, self._machine
        if turn is not None and not turn.future.done() and not (machine is not None and machine.reply_ends):
            turn.future.set_exception(self._error())
        return end

    def _named(self, reason: str) -> tuple[str, str | None]:
        """The session's end and its message (``None``: no failure), from the call's end ``reason``
        refined with the engine's close code and last error."""
        code = self._ws.close_code if self._ws is not None else None
        error_code, said = self._engine_error()
        said = f": {said}" if said else ""
        if reason in _ENGINE_LIMITS:
            return reason, f"vowel engine ended the session: {reason}{said}"
        if reason in _LIMITS:
            return reason, f"session ended: {reason} ({_LIMITS[reason]})"
        if reason == "engine_error":  # close 1011 (ENGINE_CAPABILITIES.close_reasons)
            return reason, f"vowel engine failed and closed the session (1011){said}"
        if reason == "remote_closed":  # a clean close (1000/1001) from the engine
            return reason, f"vowel engine closed the session ({code}){said}"
        if reason == "connection_lost" and error_code and code not in (None, 1006):
            # (closed by the engine after an error: that error says why; a connection cut, no)
            return error_code, f"vowel engine closed the session ({code}): {error_code}{said}"
        if reason == "connection_lost":
            return reason, f"connection to the vowel engine lost (close {code})"
        if reason == "shutdown" and not self._closing:
            return reason, "the session was cancelled"
        if reason == "internal_error":
            return reason, "internal error in the session runtime (see the logs)"
        return reason, None

    def _engine_error(self) -> tuple[str | None, str]:
        """The code and message of the engine's last ``error`` (none: one the session got past)."""
        error = self._machine.last_error if self._machine is not None else None
        if error is None or error is self._excused:
            return None, ""
        code = str(error.get("code") or error.get("error_type") or "") or None
        return code, " ".join(str(error.get("message") or "").split())[:200]

    def _finish(self, runtime: CallRuntime) -> None:
        """The runtime has ended: its summary kept, and the session's end (named as the call's machine
        closed) logged."""
        self.summary = runtime.summary
        self._set_end(*self._named(runtime.summary.reason or "shutdown"))  # (a machine that never closed)
        turn = self._turn
        if turn is not None and not turn.future.done():
            turn.future.set_exception(self._error())
        (self._log.warning if self.failed else self._log.info)(
            "vowel.session_ended",
            reason=self.end_reason,
            close_code=self._ws.close_code if self._ws is not None else None,
            engine_error=self._engine_error()[0],
            engine_session_id=self.engine_session_id,
        )


def _before(engine_limit: float, end_cap: float) -> float:
    """Our timer for one of the engine's limits: a little before it (see :data:`_LIMIT_MARGIN`)."""
    return engine_limit - min(end_cap + _LIMIT_MARGIN, engine_limit / 10)


def _sounds(pcm16: bytearray) -> bool:
    """Whether PCM16 LE audio (whole samples from its start) rises above near-silence
    (:data:`SPEECH_PEAK`)."""
    samples = array.array("h")
    samples.frombytes(pcm16[: len(pcm16) & ~1])
    if sys.byteorder == "big":  # pragma: no cover - little-endian machines
        samples.byteswap()
    return bool(samples) and (max(samples) > SPEECH_PEAK or min(samples) < -SPEECH_PEAK)


def _tightest(*values: float | None) -> float | None:
    """The tightest positive limit."""
    found = [v for v in values if v]
    return min(found) if found else None
