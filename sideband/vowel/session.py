"""Trusted-server sessions on a vowel engine, driven from code (PROTOCOL C).

::

    async with EngineSession.open(settings, app) as session:
        reply = await session.say("Where is order 1042?")
        print(reply.text, [t.name for t in reply.tools])

One session = one freshly minted token, one engine socket, one :class:`~sideband.runtime.driver.CallRuntime`
(the same state machine and tool execution as a phone call). The token is minted right before connecting
and never logged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import aiohttp
import structlog
from pydantic import SecretStr
from websockets.asyncio.client import ClientConnection
from websockets.typing import Data

from sideband.app import Sideband
from sideband.context import CallContext
from sideband.runtime.driver import CallHooks, CallRuntime, CallSummary, ToolRecord
from sideband.runtime.machine import CallMachine, Capabilities, MachineConfig
from sideband.settings import Settings, env_name
from sideband.tools import ToolRegistry
from sideband.upstream.openai import UpstreamError
from sideband.upstream.vowel import (
    EngineRefused,
    MintRefused,
    Token,
    VowelCore,
    connect_engine,
    trusted_session_request,
)

__all__ = ["ENGINE_CAPABILITIES", "EngineError", "EngineSession", "Reply"]

ENGINE_CAPABILITIES = Capabilities(
    session_created_first=True,
    call_verbs=False,
    audio_playback_events=False,
    responds_to_user_text=True,
    resumable=False,
    close_reasons={1011: "engine_error"},
)
"""What the vowel engine does, as the call machine sees it."""

MIN_AUDIO_CHUNK = 2048
"""The engine refuses smaller ``input_audio_buffer.append`` chunks (``invalid_audio_chunk``, close 1003)."""
MAX_AUDIO_CHUNK = 32 * 1024

_TEXT_DONE = frozenset(
    {"response.output_audio_transcript.done", "response.text.done", "response.output_text.done"}
)
_TEXT_DELTA = frozenset(
    {"response.output_audio_transcript.delta", "response.text.delta", "response.output_text.delta"}
)
_RUNNABLE = frozenset({"completed", "incomplete"})
_LIMITS = {
    "max_duration": "the session reached SIDEBAND_MAX_CALL_SECONDS",
    "idle_timeout": "the session was idle for SIDEBAND_MAX_IDLE_SECONDS",
}
_ENGINE_LIMITS = frozenset({"max_call_duration_exceeded", "max_idle_duration_exceeded"})
_REQUIRED = ("vowel_core_url", "vowel_engine_url", "vowel_api_key", "vowel_service_id")


class EngineError(Exception):
    """A trusted-server session could not start or ended badly. ``str(err)`` is one line; ``reason`` is
    the end reason (``mint_forbidden``, ``mint_unauthorized``, ``token_rejected``, ``engine_error``,
    ``max_call_duration_exceeded``, ``max_idle_duration_exceeded``, ``max_duration``, ``idle_timeout``…)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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


class _TapConnection(ClientConnection):
    """The runtime's socket, with a listener that sees every server event before the machine does."""

    listener: Callable[[dict[str, Any]], None] | None = None

    @overload
    async def recv(self, decode: Literal[True]) -> str: ...

    @overload
    async def recv(self, decode: Literal[False]) -> bytes: ...

    @overload
    async def recv(self, decode: bool | None = None) -> Data: ...

    async def recv(self, decode: bool | None = None) -> Data:
        message = await super().recv(decode)
        listener = self.listener
        if listener is not None and isinstance(message, str):
            try:
                event = json.loads(message)
            except ValueError:
                event = None
            if isinstance(event, dict):
                listener(event)
        return message


@dataclass(slots=True)
class _Part:
    final: str | None = None
    transcript: str = ""
    text: str = ""

    def best(self) -> str:
        return (self.final if self.final is not None else self.transcript or self.text).strip()


@dataclass(slots=True)
class _Turn:
    text: str
    future: asyncio.Future[Reply]
    responses: set[str] = field(default_factory=set)
    parts: dict[tuple[str, str, int], _Part] = field(default_factory=dict)
    calls: dict[str, str] = field(default_factory=dict)  # call_id → response_id
    expected: set[str] = field(default_factory=set)  # call ids the machine will run
    tools: list[ToolRecord] = field(default_factory=list)

    def lines(self) -> tuple[str, ...]:
        out: list[str] = []
        for part in self.parts.values():
            text = part.best()
            if text and text not in out:
                out.append(text)
        return tuple(out)


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
        reply_timeout: float = 60.0,
        end_cap: float = 5.0,
        app_hooks: bool = True,
    ) -> None:
        for name in _REQUIRED:
            value = getattr(settings, name)
            if value is None or (isinstance(value, SecretStr) and not value.get_secret_value()):
                raise EngineError("not_configured", f"{env_name(name)} is not set")
        self.settings = settings
        self.app = app
        self.tools: ToolRegistry = app.tools if tools is None else app.tools.subset(tools)
        self.instructions = instructions if instructions is not None else app.config.instructions
        self.open_timeout = open_timeout
        self.reply_timeout = reply_timeout
        self.end_cap = end_cap
        self.app_hooks = app_hooks
        self.service_id: str = settings.vowel_service_id or ""
        self.call_id: str | None = None
        """The session's id in our logs: the engine's session id when the mint gave one, else a local id."""
        self.engine_session_id: str | None = None
        """The engine's ``sess_…`` id (from ``session.created``)."""
        self.token_expires_at: float | None = None
        self.end_reason: str | None = None
        self.end_message: str | None = None
        self.summary: CallSummary | None = None
        self._http = http
        self._own_http = http is None
        self._core: VowelCore | None = None
        self._runtime: CallRuntime | None = None
        self._task: asyncio.Task[str] | None = None
        self._sockets: list[_TapConnection] = []
        self._last_error: dict[str, Any] = {}
        self._turn: _Turn | None = None
        self._turn_lock = asyncio.Lock()
        self._recorded: set[str] = set()
        self._record_seen = asyncio.Event()
        self._ended = asyncio.Event()
        self._configured = asyncio.Event()  # session.updated seen on the current socket
        self._audio = bytearray()
        self._started = False
        self._closing = False
        self._log: Any = structlog.get_logger(component="sideband.vowel").bind(service_id=self.service_id)

    @classmethod
    def open(cls, settings: Settings, app: Sideband, **options: Any) -> EngineSession:
        """A session to use as ``async with EngineSession.open(settings, app) as session:``."""
        return cls(settings, app, **options)

    async def __aenter__(self) -> EngineSession:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        if exc_type is not None and not issubclass(exc_type, Exception):
            await self.abort()  # cancelled or interrupted: do not wait for the engine
        else:
            await self.close()

    # ------------------------------------------------------------------------------- state
    @property
    def live(self) -> bool:
        """Started and not ended."""
        return self._task is not None and not self._task.done() and not self._ended.is_set()

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

    # ------------------------------------------------------------------------------ opening
    async def start(self) -> EngineSession:
        """Mint a token, connect, configure the session; return once the engine confirmed it."""
        if self._started:
            raise RuntimeError("an EngineSession starts once")
        self._started = True
        settings = self.settings
        api_key = settings.vowel_api_key.get_secret_value() if settings.vowel_api_key else ""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        self._core = VowelCore(self._http, settings.vowel_core_url or "", api_key)
        try:
            token = await self._mint()
            ws = await self._connect(token)
        except UpstreamError as exc:
            await self._release_http()
            reason = getattr(exc, "reason", None) or "connect_failed"
            self._set_end(reason, str(exc))
            self._log.warning("vowel.session_failed", reason=reason, status=exc.status)
            raise EngineError(reason, str(exc)) from None
        except BaseException:
            await self._release_http()
            raise
        self._runtime = self._build_runtime(ws, token)
        self._task = asyncio.create_task(self._run(self._runtime), name=f"vowel:{self.call_id}")
        ready = asyncio.ensure_future(self._runtime.ready.wait())
        ended = asyncio.ensure_future(self._ended.wait())
        try:
            await asyncio.wait({ready, ended}, timeout=self.open_timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await self.abort()
            raise
        finally:
            ready.cancel()
            ended.cancel()
            await asyncio.gather(ready, ended, return_exceptions=True)
        if not self._runtime.ready.is_set():
            if not self._ended.is_set():
                self._log.warning("vowel.session_not_ready", timeout_s=self.open_timeout)
                limit = f"{self.open_timeout:g}"
                self._set_end("not_ready", f"vowel engine did not confirm the session within {limit} s")
            await self.abort()
            raise self._error()
        return self

    async def _mint(self) -> Token:
        assert self._core is not None
        settings = self.settings
        body = trusted_session_request(
            service_id=self.service_id,
            provider=settings.vowel_provider,
            tools=self.tools.definitions(style="vowel"),
            model=settings.vowel_model,
            voice=settings.vowel_voice,
        )
        try:
            token = await self._core.mint(body)
        except MintRefused as exc:
            self._log.warning("vowel.mint_refused", status=exc.status, reason=exc.reason)
            raise
        except UpstreamError as exc:
            self._log.warning("vowel.mint_failed", status=exc.status, error=str(exc))
            raise
        if self.call_id is None:
            self.call_id = token.session_id or f"vowel_{secrets.token_hex(8)}"
            self._log = self._log.bind(call_id=self.call_id)
        self.token_expires_at = token.expires_at
        expires_in = token.expires_in()
        self._log.info(
            "vowel.session_minted",
            expires_in_s=None if expires_in is None else round(expires_in, 1),
            token_session_id=token.session_id,
            tools=self.tools.names(),
        )
        return token

    async def _connect(self, token: Token) -> _TapConnection:
        try:
            ws = await connect_engine(
                self.settings.vowel_engine_url or "",
                token,
                open_timeout=self.open_timeout,
                create_connection=_TapConnection,
            )
        except EngineRefused as exc:
            self._log.warning("vowel.token_rejected", status=exc.status)
            raise
        except UpstreamError as exc:
            self._log.warning("vowel.connect_failed", status=exc.status, error=str(exc))
            raise
        assert isinstance(ws, _TapConnection)
        ws.listener = self._on_event
        self._configured.clear()
        self._sockets.append(ws)
        self._log.info("vowel.connected", attempt=len(self._sockets))
        return ws

    def _build_runtime(self, first: _TapConnection, token: Token) -> CallRuntime:
        settings, app = self.settings, self.app
        session: dict[str, Any] = {"tools": self.tools.definitions(style="openai")}
        if self.instructions:
            session["instructions"] = self.instructions
        if settings.vowel_voice:
            session["voice"] = settings.vowel_voice
        if settings.vowel_model:
            session["model"] = settings.vowel_model
        config = MachineConfig(
            session=session,
            greeting=None,
            goodbye_instructions=app.goodbye_instructions,
            max_call_duration=_tightest(
                app.max_call_duration or settings.max_call_duration, token.max_call_duration
            ),
            max_idle_duration=_tightest(
                app.max_idle_duration or settings.max_idle_duration, token.max_idle_duration
            ),
            end_cap=self.end_cap,
        )
        pending: list[_TapConnection] = [first]

        async def connect() -> ClientConnection:
            if pending:
                return pending.pop()
            return await self._connect(await self._mint())  # a re-attach needs a fresh token

        hooks = CallHooks(on_tool=[self._on_tool], on_response=[self._on_response])
        if self.app_hooks:
            hooks.on_call_start += app.on_call_start_hooks
            hooks.on_call_end += app.on_call_end_hooks
            hooks.on_transcript += app.on_transcript_hooks
            hooks.on_dtmf += app.on_dtmf_hooks
            hooks.on_tool += app.on_tool_hooks
        return CallRuntime(
            machine=CallMachine(config, ENGINE_CAPABILITIES),
            ctx=CallContext(self.call_id or "", "vowel"),
            tools=self.tools,
            connect=connect,
            hooks=hooks,
            reattach_attempts=0,
            log_tool_arguments=settings.log_tool_arguments,
            log_fields={"service_id": self.service_id},
        )

    async def _run(self, runtime: CallRuntime) -> str:
        reason = "shutdown"
        try:
            reason = await runtime.run()
        finally:
            self.summary = runtime.summary
            self._finish(reason, requested=runtime.machine.ending)
        return reason

    # ------------------------------------------------------------------------------ driving
    async def say(self, text: str, *, timeout: float | None = None) -> Reply:
        """Send a user text turn and wait for the assistant's reply (tools it ran included).

        The engine answers user text by itself: no ``response.create`` is sent for it. Raises
        :class:`EngineError` if the session ends first (or ``reply_timeout`` passes).
        """
        if not text.strip():
            raise ValueError("say() needs some text")
        async with self._turn_lock:
            await self._wait_configured()
            runtime = self.runtime
            turn = _Turn(text, asyncio.get_running_loop().create_future())
            self._turn = turn
            limit = self.reply_timeout if timeout is None else timeout
            try:
                runtime.user_text(text)
                ended = asyncio.ensure_future(self._ended.wait())
                waiters: set[asyncio.Future[Any]] = {turn.future, ended}
                try:
                    await asyncio.wait(waiters, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    ended.cancel()
                    await asyncio.gather(ended, return_exceptions=True)
                if turn.future.done():
                    return turn.future.result()
                if self._ended.is_set():
                    raise self._error()
                raise EngineError("reply_timeout", f"no reply from the vowel engine within {limit:g} s")
            finally:
                self._turn = None
                if not turn.future.done():
                    turn.future.cancel()

    async def send_audio(self, pcm16: bytes) -> None:
        """Send caller audio: PCM16 LE mono 24 kHz. Sent as ``input_audio_buffer.append`` chunks of at
        least 2048 bytes; a smaller remainder waits for the next call (or :meth:`flush_audio`)."""
        await self._wait_configured()
        self._audio.extend(pcm16)
        while len(self._audio) >= MIN_AUDIO_CHUNK:
            size = min(len(self._audio), MAX_AUDIO_CHUNK)
            size -= size % 2
            chunk = bytes(self._audio[:size])
            del self._audio[:size]
            self.runtime.send_event(
                {"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode("ascii")}
            )

    async def _wait_configured(self) -> None:
        """Input goes out only once the engine confirmed the session on the current socket (anything
        before ``session.update`` is fatal on the engine, and a re-attached socket needs it again)."""
        self._check_live()
        if self._configured.is_set():
            return
        configured = asyncio.ensure_future(self._configured.wait())
        ended = asyncio.ensure_future(self._ended.wait())
        try:
            await asyncio.wait(
                {configured, ended}, timeout=self.open_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            configured.cancel()
            ended.cancel()
            await asyncio.gather(configured, ended, return_exceptions=True)
        self._check_live()
        if not self._configured.is_set():
            raise EngineError(
                "not_ready", f"vowel engine did not confirm the session within {self.open_timeout:g} s"
            )

    async def flush_audio(self) -> None:
        """Send the buffered remainder, padded with silence to the engine's minimum chunk size."""
        if not self._audio:
            return
        self._audio.extend(bytes(MIN_AUDIO_CHUNK - len(self._audio)))
        await self.send_audio(b"")

    async def wait_closed(self, timeout: float | None = None) -> str | None:
        """Wait until the session has ended; return its end reason."""
        async with asyncio.timeout(timeout):
            await self._ended.wait()
            if self._task is not None:
                await asyncio.gather(self._task, return_exceptions=True)
        return self.end_reason

    async def close(self) -> str | None:
        """End the session (after in-flight tool outputs, at most ``end_cap`` seconds), close the socket,
        cancel and await every task. Idempotent; returns the end reason."""
        task = self._task
        if task is not None and not task.done():
            self._closing = True
            try:
                with structlog.contextvars.bound_contextvars(
                    call_id=self.call_id, service_id=self.service_id
                ):
                    await self.runtime.hangup("closed")
                await asyncio.wait({task}, timeout=self.end_cap + 2.0)
            finally:
                await self._stop(task)
        await self._release_http()
        return self.end_reason

    async def abort(self) -> None:
        """End at once: cancel the runtime (its socket and tools) and await it."""
        if self._task is not None:
            await self._stop(self._task)
        await self._release_http()

    async def _stop(self, task: asyncio.Task[str]) -> None:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _release_http(self) -> None:
        http, self._http = self._http, None
        if http is not None and self._own_http:
            await http.close()

    # ------------------------------------------------------------------------------ events
    def _on_event(self, event: dict[str, Any]) -> None:
        try:
            self._observe(event)
        except Exception as exc:  # never let bookkeeping break the socket
            self._log.error("vowel.observe_failed", error=type(exc).__name__, event_type=event.get("type"))

    def _observe(self, event: dict[str, Any]) -> None:
        etype = str(event.get("type", ""))
        if etype == "session.updated":
            self._configured.set()
            return
        if etype == "session.created":
            session = event.get("session") or {}
            if isinstance(session, dict) and isinstance(session.get("id"), str):
                self.engine_session_id = session["id"]
            self._log.info("vowel.session_created", engine_session_id=self.engine_session_id)
            return
        if etype == "error":
            error = event.get("error")
            self._last_error = error if isinstance(error, dict) else {}
            return
        turn = self._turn
        if turn is None:
            return
        response_id = str(event.get("response_id") or "")
        if etype == "response.created":
            response = event.get("response") or {}
            if isinstance(response, dict) and isinstance(response.get("id"), str):
                turn.responses.add(response["id"])
        elif etype in _TEXT_DONE or etype in _TEXT_DELTA:
            key = (response_id, str(event.get("item_id") or ""), _int(event.get("content_index")))
            part = turn.parts.setdefault(key, _Part())
            if etype in _TEXT_DONE:
                text = event.get("transcript") if "transcript" in etype else event.get("text")
                if isinstance(text, str) and part.final is None:
                    part.final = text
            else:
                delta = event.get("delta")
                if isinstance(delta, str):
                    if "transcript" in etype:
                        part.transcript += delta
                    else:
                        part.text += delta
        elif etype in ("response.output_item.added", "response.output_item.done"):
            item = event.get("item") or {}
            if isinstance(item, dict) and item.get("type") == "function_call":
                self._note_call(turn, item.get("call_id"), response_id)
        elif etype == "response.function_call_arguments.done":
            self._note_call(turn, event.get("call_id"), response_id)
        elif etype == "response.done":
            response = event.get("response") or {}
            if not isinstance(response, dict):
                return
            rid = str(response.get("id") or "")
            for item in response.get("output") or ():
                if isinstance(item, dict) and item.get("type") == "function_call":
                    self._note_call(turn, item.get("call_id"), rid)
            if response.get("status") in _RUNNABLE:
                turn.expected.update(cid for cid, r in turn.calls.items() if r in (rid, ""))

    @staticmethod
    def _note_call(turn: _Turn, call_id: Any, response_id: str) -> None:
        if isinstance(call_id, str) and call_id and call_id not in turn.calls:
            turn.calls[call_id] = response_id

    def _on_tool(self, ctx: CallContext, record: ToolRecord) -> None:
        self._recorded.add(record.call_id)
        turn = self._turn
        if turn is not None:
            turn.tools.append(record)
        self._record_seen.set()

    async def _on_response(
        self, ctx: CallContext, response_id: str | None, status: str | None, tools_running: int
    ) -> None:
        turn = self._turn
        if turn is None or turn.future.done() or response_id not in turn.responses:
            return
        if status != "completed" or tools_running:
            return
        # A tool's record is handed over just after its output went out; wait for any still on the way.
        try:
            async with asyncio.timeout(1.0):
                while turn.expected - self._recorded:
                    self._record_seen.clear()
                    await self._record_seen.wait()
        except TimeoutError:
            pass
        if turn.future.done():
            return
        lines = turn.lines()
        ended = self.runtime.machine.closed
        turn.future.set_result(Reply(" ".join(lines), lines, tuple(turn.tools), response_id, ended))

    # ------------------------------------------------------------------------------ ending
    def _check_live(self) -> None:
        if not self._started or self._task is None:
            raise RuntimeError("EngineSession.start() was not awaited")
        if self._ended.is_set() or self._task.done():
            raise self._error()

    def _error(self) -> EngineError:
        reason = self.end_reason or "closed"
        return EngineError(reason, self.end_message or f"the vowel session has ended ({reason})")

    def _set_end(self, reason: str, message: str | None) -> None:
        if self.end_reason is None:
            self.end_reason, self.end_message = reason, message
        self._ended.set()

    def _finish(self, runtime_reason: str, *, requested: bool) -> None:
        """Name the end: the runtime's reason, refined with the engine's close code and last error."""
        ws = self._sockets[-1] if self._sockets else None
        code = ws.close_code if ws is not None else None
        error = self._last_error
        error_code = str(error.get("code") or error.get("type") or "") or None
        error_message = " ".join(str(error.get("message") or "").split())[:200]
        said = f": {error_message}" if error_message else ""
        reason, message = runtime_reason, None
        if runtime_reason in _ENGINE_LIMITS:
            message = f"vowel engine ended the session: {runtime_reason}{said}"
        elif runtime_reason in _LIMITS and requested:
            message = f"session ended: {runtime_reason} ({_LIMITS[runtime_reason]})"
        elif runtime_reason in (
            "reattach_failed",
            "remote_closed",
            "connect_failed",
            "engine_error",
            "connection_lost",
        ):
            if code == 1011:
                reason = "engine_error"
                message = f"vowel engine failed and closed the session (1011){said}"
            elif code in (1000, 1001) and runtime_reason == "remote_closed":
                message = f"vowel engine closed the session ({code}){said}"
            elif error_code:
                reason = error_code
                message = f"vowel engine closed the session ({code}): {error_code}{said}"
            else:
                reason = "connection_lost"
                message = f"connection to the vowel engine lost (close {code})"
        elif runtime_reason == "shutdown" and not self._closing:
            message = "the session was cancelled"
        elif runtime_reason == "internal_error":
            message = "internal error in the session runtime (see the logs)"
        self._set_end(reason, message)
        turn = self._turn
        if turn is not None and not turn.future.done():
            turn.future.set_exception(self._error())
            turn.future.exception()  # retrieved: say() raises its own copy
        (self._log.warning if message else self._log.info)(
            "vowel.session_ended",
            reason=self.end_reason,
            close_code=code,
            engine_error=error_code,
            engine_session_id=self.engine_session_id,
        )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _tightest(*values: float | None) -> float | None:
    """The tightest positive limit."""
    found = [v for v in values if v]
    return min(found) if found else None
