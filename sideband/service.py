"""The service: turns verified deliveries and browser requests into calls. HTTP-free."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import re
import secrets
import ssl
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator
from websockets.proxy import Proxy

from sideband.app import CallPlan, HookRun, HookTimeout, IncomingCall, Sideband, within_budget
from sideband.blocking import Stepwise, log_blocked
from sideband.context import CallContext, SipHeader
from sideband.logs import clip, failure_fields
from sideband.metrics import BROWSER_REFUSALS, EVENT_OUTCOMES, REFUSALS, Histogram, zeros
from sideband.routing import RouteError, RouteTable, session_problem
from sideband.runtime.driver import SHUTDOWN_GRACE, CallRegistry, CallRuntime
from sideband.runtime.guard import guardrail_name
from sideband.runtime.machine import CallMachine, MachineConfig
from sideband.session import (
    Accept,
    Decision,
    DecisionError,
    Refer,
    Reject,
    SessionConfigError,
    validate_accept_payload,
)
from sideband.settings import Settings, SettingsError
from sideband.stores import (
    STORE_TIMEOUT,
    CallLedger,
    ClaimStore,
    MemoryStore,
    RedisStore,
    StoreUnavailable,
)
from sideband.tickets import TicketError, TicketSigner
from sideband.tools import own_cancellation
from sideband.upstream._ws import http_proxy, resolve_proxy, ws_proxy_names
from sideband.upstream.openai import CallControl, CallGone, UpstreamError, connect_sideband, with_retries

__all__ = ["HANDOFF_GRACE", "Reply", "Service", "WebhookEvent"]

_RTC_CALL_ID = re.compile(r"rtc_[A-Za-z0-9_-]{1,128}")

_T = TypeVar("_T")


def rtc_call_id(value: Any) -> str | None:
    """``value`` if it has the form of a WebRTC call id (``rtc_…``), else None."""
    return value if isinstance(value, str) and _RTC_CALL_ID.fullmatch(value) else None


def pending_ttl(settings: Settings) -> float:
    """Seconds a claim stays pending at most: longer than any answer path (the route budget, then an
    accept refused, the reject instead, and a hangup when that finds the call no longer ringing, each
    within the accept budget; and the store's commands between them), and short enough that the claims
    of an instance that died mid-work free the call for a redelivery soon."""
    return settings.route_budget + 3 * settings.accept_budget + 10.0


_UNCERTAIN_TTL = 3700.0
"""Seconds the mark an accept sets before its first attempt is kept: it may have gone through (an attempt
went unanswered, or the instance died), and the call's redeliveries must know it, for longer than any
call lasts."""

HANGUP_BUDGET = 30.0
"""Seconds a hangup is retried for (5xx, timeouts) before the call ends as ``hangup_failed``: a call
left up talks on with nobody running its tools, so it gets longer than the accept budget."""

ROUTES_READ_TIMEOUT = 10.0
"""Seconds a read of the route file (at start, and at each reload) waits for it (a FIFO, a file on a
stalled network volume) before it fails: the start stops with one line, or the next reload may run."""

_CANCEL_LOOKS = 0.05
"""Seconds between looks for a cancellation while the route file is read at start (:func:`_read_routes`)."""

HANDOFF_GRACE = 60.0
"""Seconds a handoff ticket outlives the ephemeral key minted with it (``SIDEBAND_RTC_KEY_TTL``)."""

NONCE_MARGIN = 3600.0
"""Seconds a spent ticket is remembered beyond the longest life a ticket has: a wall-clock step back, or
instances' clocks apart, by less than this cannot make it valid and unspent again."""

SETTLE_RETRY = 0.5
SETTLE_RETRY_MAX = 10.0
"""Seconds before the first retry of a settle the store failed, and the longest wait between retries
(the wait doubles)."""

LEDGER_TICK = 1.0
"""Seconds between the starts of an instance's records of its live calls (each renews its lease)."""


def ledger_lease(settings: Settings) -> float:
    """Seconds each record of an instance's live calls renews its lease for: ``SIDEBAND_ORPHAN_AFTER``
    past the next record's latest arrival (:data:`LEDGER_TICK` later, and given the store's timeout to
    go through), so only an instance whose records stop, or fall that far behind, loses its calls."""
    return settings.orphan_after + LEDGER_TICK + STORE_TIMEOUT


ORPHANS_AT_ONCE = 16
"""Orphaned calls hung up at once, by the instance that found them."""

SWEEP_MARGIN = 10.0
"""Seconds added to :data:`HANGUP_BUDGET` for each :data:`ORPHANS_AT_ONCE` calls of a dead instance, in
the time the instance sweeping it holds it (a hangup's last attempt, the ledger's own commands)."""

STRANDED_RETRY = 10.0
STRANDED_RETRY_MAX = 300.0
STRANDED_FOR = 3600.0
"""A call whose hangup failed (``hangup_failed``: it may still be up, with nobody running its tools) is
hung up again after ``STRANDED_RETRY`` seconds, the wait doubling up to ``STRANDED_RETRY_MAX``, for
``STRANDED_FOR`` seconds (no call lasts longer)."""


class _SipHeaderModel(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    value: str


def _usable_headers(value: Any) -> list[Any]:
    """Keep the well-formed ``{name, value}`` entries: SIP headers are caller data, one odd entry must
    not sink the call."""
    if not isinstance(value, list):
        return []
    return [
        h
        for h in value
        if isinstance(h, dict) and isinstance(h.get("name"), str) and isinstance(h.get("value"), str)
    ]


class CallIncomingData(BaseModel):
    """``data`` of ``realtime.call.incoming`` (tolerant: unknown fields are kept, odd headers dropped)."""

    model_config = ConfigDict(extra="allow")
    call_id: str = Field(min_length=1, max_length=256)
    sip_headers: list[_SipHeaderModel] = Field(default_factory=list)
    sip_media_security: str | None = None

    @field_validator("sip_headers", mode="before")
    @classmethod
    def _drop_odd_headers(cls, value: Any) -> list[Any]:
        return _usable_headers(value)

    @field_validator("sip_media_security", mode="before")
    @classmethod
    def _unknown_security(cls, value: Any) -> str | None:
        return value if isinstance(value, str) else None


class WebhookEvent(BaseModel):
    """Any webhook event (tolerant reader: only a string ``type`` is required; unknown fields and
    types, and envelope fields of unexpected shapes, are fine)."""

    model_config = ConfigDict(extra="allow")
    id: Any = None
    type: str = Field(min_length=1)
    created_at: Any = None
    data: Any = None


def call_data(event: WebhookEvent) -> CallIncomingData:
    """The ``data`` of a ``realtime.call.incoming``; raises :class:`pydantic.ValidationError` when it
    has no usable ``call_id``."""
    return CallIncomingData.model_validate(event.data if isinstance(event.data, dict) else {})


@dataclass(frozen=True, slots=True)
class Reply:
    """What the edge answers: an HTTP status and a small JSON body."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def _retry_later() -> Reply:
    """OpenAI could not be brought to answer the call: the webhook's sender delivers it again."""
    return Reply(503, {"status": "retry", "error": "upstream unavailable"}, {"Retry-After": "1"})


def _uncertain_key(call_id: str) -> str:
    return f"accept_uncertain:{call_id}"


class _RunElsewhere(Exception):
    """A redelivery found its call run by another live instance (its claims had run out, unsettled)."""

    def __init__(self, owner: str) -> None:
        super().__init__(owner)
        self.owner = owner


class Service:
    """Owns the store, the call-control client, the call registry and the app. One per process."""

    def __init__(
        self,
        settings: Settings,
        app: Sideband,
        *,
        store: ClaimStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.app = app
        if store is None:
            url = settings.redis_url
            try:
                store = RedisStore(url.get_secret_value()) if url is not None else MemoryStore()
            except ValueError:  # (redis-py's words may quote the URL, password and all)
                raise SettingsError(
                    "SIDEBAND_REDIS_URL: not a valid Redis URL (redis://[:password@]host[:port][/db], "
                    "rediss://… or unix:///path?db=N)"
                ) from None
        self.store: ClaimStore = store
        self._pending_ttl = pending_ttl(settings)
        # The app's tools and guardrails are known now (routes name tools of these only; a reload
        # adds none): their counts, and the others' known labels, start at 0 (see sideband.metrics).
        self.registry = CallRegistry(app.tools.names(), (guardrail_name(g) for g in app.guardrails))
        self._admitting = 0  # webhooks being answered that may still launch a call (see :meth:`full`)
        self.draining = False
        self._drain_deadline: float | None = None
        self._ending: asyncio.Future[None] | None = None  # the end of the drain window: calls hung up
        self._settling: set[asyncio.Task[None]] = set()  # claims whose settle the store failed, retried
        self._giving_back: dict[str, asyncio.Task[None]] = {}  # tickets (nonces) to give back, as _settling
        # Webhooks being answered and browsers' offers being relayed (see handle_webhook, rtc_relay)
        self._answering: set[asyncio.Task[Any]] = set()
        self._cut_short: set[asyncio.Task[Reply]] = set()  # webhooks whose request was cut short
        self.instance_id = secrets.token_hex(6)
        """This instance's name in a shared store's ledger of live calls (new at each start)."""
        self._ledger: asyncio.Task[None] | None = None  # records this instance's calls, finds orphans
        self._sweeping: asyncio.Task[None] | None = None  # hangs up the calls of a dead instance
        self._sweep_holds: str | None = None  # the dead instance the sweep holds (until it is swept)
        self._launched = asyncio.Event()  # a call started since the ledger's last record
        self._stranded: dict[str, asyncio.Task[None]] = {}  # calls whose hangup failed, hung up again
        self._left = False  # the close has taken the calls still up: none is hung up again from now
        self.requests = 0
        """Requests being handled (kept by the edge): a shutdown lets them finish before it stops."""
        self._no_requests = asyncio.Event()
        self._no_requests.set()
        self.counters: Counter[str] = zeros(EVENT_OUTCOMES)
        """What became of webhook events, per outcome (``/metrics``)."""
        self.refused: Counter[tuple[str, int]] = zeros(REFUSALS)
        """Requests the edge refused: (log event, HTTP status) → count (``/metrics``)."""
        self.accept_seconds = Histogram(keys=("",))
        """From a webhook's arrival to OpenAI's answer to the accept, per call accepted (``/metrics``)."""
        self.tickets = (
            # A ticket outlives the key it came with: a call started with the key just before it
            # expired can still be handed over.
            TicketSigner(settings.ticket_key(), settings.rtc_key_ttl + HANDOFF_GRACE, clock)
            if (settings.rtc_ticket_secret or settings.openai_webhook_secret or settings.openai_api_key)
            else None
        )
        # Where the app keeps the WebRTC doors closed, each of their requests is refused as rtc.closed.
        self.refused.update(zeros(BROWSER_REFUSALS if app.browsers_allowed else [("rtc.closed", 404)]))
        self.log = structlog.get_logger(component="sideband.service").bind()  # bound once, not per call
        # A config every call would be refused with stops the start. One only SIP refuses (e.g. a
        # turn_detection.threshold) is a warning where the app takes WebRTC calls, which allow it. Those
        # have a session of their own (no transfer tool): one only they would be refused with stops it too.
        problem = session_problem(app, Accept())
        browser = session_problem(app, self._browser_accept(), sip=False) if app.browsers_allowed else None
        if problem is not None and (browser is not None or not app.browsers_allowed):
            raise SessionConfigError(f"the app's session config: {problem}")
        if browser is not None:
            raise SessionConfigError(f"the app's session config for browser calls: {browser}")
        if problem is not None:
            self.log.warning("server.config_warning", problem=problem, refused="sip calls")
        self.routes = RouteTable({})
        if settings.routes_file:  # every route's session as a SIP accept would send it: fail at start
            self.routes = _read_routes(settings.routes_file, app.tools.names())
            self.routes.check(app)
        self.route_reloads: Counter[str] = zeros(("ok", "failed"))
        """Route file reloads by outcome, ``ok`` or ``failed`` (``/metrics``)."""
        self.routes_reload_ok = True
        """Whether the last reload put the file in force (``False``: the table in force is older)."""
        self._reloading = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None
        self._unshared: aiohttp.ClientSession | None = None
        self._sideband_url = settings.sideband_url
        self._configs: dict[int, tuple[CallPlan, MachineConfig]] = {}
        self._sip_checked: dict[int, CallPlan] = {}  # plans whose session a SIP accept may send
        self._proxy: str | None = None
        self._tls: ssl.SSLContext | None = None
        self._control: CallControl | None = None

    # ----------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Open the shared HTTP client session.

        Raises :class:`~sideband.settings.SettingsError` when the environment names a proxy for OpenAI
        that is malformed or not an HTTP proxy (call control could not use it)."""
        key, base = self.settings.openai_api_key, self.settings.openai_base_url
        # One proxy (the one websockets picks for the sideband URL) for call control too: a host that
        # reaches OpenAI only through a proxy must answer its calls, not only attach to them.
        self._proxy = resolve_proxy(self._sideband_url)
        proxy: Proxy | None = None
        if self._proxy is not None:
            what = f"the proxy for {base} (from {ws_proxy_names(self._sideband_url)})"
            try:
                proxy = http_proxy(self._proxy, what, "sideband reaches OpenAI")
            except ValueError as exc:
                raise SettingsError(str(exc)) from None
        try:
            await self.store.open()
        except StoreUnavailable as exc:
            await self.store.close()
            raise SettingsError(f"SIDEBAND_REDIS_URL: cannot use the claim store: {exc}") from None
        except TypeError as exc:  # an option of the URL's query redis-py does not take (its words name it)
            await self.store.close()
            raise SettingsError(f"SIDEBAND_REDIS_URL: an option redis cannot take ({exc})") from None
        # built here, off the answer path, and shared by every sideband
        self._tls = self.app.tls_context() if self._sideband_url.startswith("wss://") else None
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60),
        )
        self._unshared = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, force_close=True),
        )
        secret = key.get_secret_value() if key else ""
        self._control = CallControl(self._http, base, secret, proxy, unshared=self._unshared)
        if isinstance(self.store, CallLedger):
            self._ledger = asyncio.ensure_future(self._keep_ledger(self.store))

    async def reload_routes(self) -> bool:
        """Read ``SIDEBAND_ROUTES_FILE`` again and put it in force for the calls that ring from now on
        (``SIGHUP`` under ``sideband serve``); calls already answered keep the route they were given.
        Returns whether a file was put in force.

        The file is checked as at start (its tools, every route's session as a SIP accept would send
        it). A file that fails the check (or cannot be read, or does not parse) leaves the table in
        force as it was: ``routes.reload_failed`` (error, one line), and ``False``; so does a read that
        takes longer than :data:`ROUTES_READ_TIMEOUT` (a stalled network volume: what it reads later is
        dropped). Without a route file there is nothing to reload: ``routes.reload_skipped`` (info), no
        failure. Reloads run one at a time, the file read and parsed off the event loop.
        """
        async with self._reloading:
            path, kept = self.settings.routes_file, self.routes
            if not path:
                self.log.info("routes.reload_skipped", reason="SIDEBAND_ROUTES_FILE is not set")
                return False
            try:
                table = await _in_daemon_thread(_read_routes, path, self.app.tools.names())
                table.check(self.app)  # (on the loop: it fills the app's plan cache)
            except Exception as exc:  # (a RouteError is one line; anything else, e.g. a TOML nested too deep)
                error = str(exc) if isinstance(exc, RouteError) else f"{path}: {type(exc).__name__}: {exc}"
                self.route_reloads["failed"] += 1
                self.routes_reload_ok = False
                self.log.error(
                    "routes.reload_failed",
                    error=" ".join(error.split()),
                    routes=len(kept),
                    default=kept.default is not None,
                )
                return False
            self.routes = table
            self.route_reloads["ok"] += 1
            self.routes_reload_ok = True
            self.log.info(
                "routes.reloaded",
                file=str(path),
                routes=len(table),
                default=table.default is not None,
                blocked=len(table.blocked),
                block_withheld=table.block_withheld,
            )
            return True

    def start_draining(self) -> None:
        """Refuse new calls from now on (webhooks and WebRTC get 503) and start the one drain window:
        :meth:`close` ends what is still live ``SIDEBAND_DRAIN_TIMEOUT`` seconds after this call."""
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self.settings.drain_timeout
        self.draining = True

    def _hangup_budget(self) -> float:
        """:data:`HANGUP_BUDGET`; while the server stops, what is left of the drain window and the calls'
        shutdown grace (a hangup still retrying past it is cut short: ``hangup_failed``)."""
        if self._drain_deadline is None:
            return HANGUP_BUDGET
        left = self._drain_deadline - time.monotonic() + SHUTDOWN_GRACE - 1.0
        return max(1.0, min(HANGUP_BUDGET, left))

    def request_started(self) -> None:
        """A request came in (the edge calls this, and :meth:`request_done` once it is answered)."""
        self.requests += 1
        self._no_requests.clear()

    def request_done(self) -> None:
        self.requests -= 1
        if not self.requests:
            self._no_requests.set()

    async def wait_quiet(self, hurry: asyncio.Event) -> None:
        """Wait until no call is live and no request is in flight (one may be accepting a call), or
        until ``hurry`` is set."""
        while not hurry.is_set() and (len(self.registry) or self.requests):
            # (only on what is still to come: a wait already over would make this loop spin)
            waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(hurry.wait())]
            if len(self.registry):
                waits.append(asyncio.ensure_future(self.registry.wait_idle()))
            if self.requests:
                waits.append(asyncio.ensure_future(self._no_requests.wait()))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    def end_calls(self) -> asyncio.Future[None]:
        """End the drain window now: calls still live are hung up (see :meth:`CallRegistry.drain`),
        while requests still in flight finish. Returns the future of that end (the same one each time)."""
        self.start_draining()
        if self._ending is None:
            self._drain_deadline = time.monotonic()
            self._ending = asyncio.ensure_future(self.registry.drain(0.0))
        return self._ending

    async def close(self) -> None:
        """End every call (at the end of the drain window) and release connections."""
        self.start_draining()
        assert self._drain_deadline is not None
        if self._ending is not None:
            await self._ending
        if self._answering:  # (each within its budgets: the route's, then the accept's and a hangup's)
            await asyncio.wait(list(self._answering), timeout=self._pending_ttl)
        await self.registry.drain(max(0.0, self._drain_deadline - time.monotonic()))  # (started since)
        stranded = sorted(self._stranded)
        # Calls whose hangup failed, and those whose task did not stop (calls.abandoned): may be up.
        left = sorted(self._stranded.keys() | self.registry.calls.keys())
        # One of those that ends hangup_failed later is not hung up again (the HTTP session is closed
        # by then): it is in the ledger, for another instance.
        self._left = True
        stopping = [
            *self._settling,
            *self._stranded.values(),
            *(t for t in (self._ledger, self._sweeping) if t is not None),
        ]
        for task in stopping:
            task.cancel()
        await asyncio.gather(*stopping, return_exceptions=True)
        ledger = self.store if isinstance(self.store, CallLedger) and self._ledger is not None else None
        recorded = False
        held, self._sweep_holds = self._sweep_holds, None
        if ledger is not None and held is not None:
            # A sweep cut short: the dead instance it held is let go of (none of its calls dropped), for
            # another instance to sweep at once, not once the hold has run out. Best effort, within the
            # store's timeout: else the hold runs out all the same.
            with contextlib.suppress(StoreUnavailable):
                await ledger.swept(self.instance_id, held, ())
        if ledger is not None:
            with contextlib.suppress(StoreUnavailable):  # (else its lease runs out: swept, with no call)
                if left:  # to another instance, once this one's lease has run out (they replace the rest)
                    await ledger.record(self.instance_id, left, self.settings.orphan_after)
                    recorded = True
                else:
                    await ledger.forget(self.instance_id)
        for call_id in stranded:
            self.log.warning("call.stranded", call_id=call_id, outcome="left", ledger=recorded)
        for http in (self._http, self._unshared):
            if http is not None:
                await http.close()
        await self.store.close()

    def full(self) -> bool:
        """Whether this instance has taken ``SIDEBAND_MAX_CALLS`` calls: the live ones, and those whose
        webhooks are being answered (any of them may yet be accepted)."""
        cap = self.settings.max_calls
        return cap > 0 and len(self.registry) + self._admitting >= cap

    @property
    def control(self) -> CallControl:
        """The call-control client (after :meth:`start`)."""
        if self._control is None:
            raise RuntimeError("Service.start() was not awaited")
        return self._control

    # --------------------------------------------------------------------------- SIP webhook
    async def handle_webhook(self, webhook_id: str, event: WebhookEvent, received: float) -> Reply:
        """A verified delivery: claim, decide, act. ``received`` is ``time.monotonic()``.

        The ``webhook-id`` (and, for a call, the ``call_id``) is claimed before anything else happens.
        A duplicate of a delivery that was handled gets 200 and nothing else; a duplicate that arrives
        while the first delivery is still being handled gets 409, so the sender delivers it again later
        (if the first one then fails, its claims are released and the redelivery does the work).

        The answer runs to its end even when the request is cancelled (the server stopping: requests
        still in flight a second after the drain window are): an accept cut short may have gone through,
        and would leave the call up at OpenAI with nobody attached. :meth:`close` waits for such answers
        (each within its budgets), then hangs up the calls they started. One that has sent nothing to
        OpenAI yet (its routing hook still running) sends nothing: the call rings on, for a redelivery.
        """
        answer = asyncio.ensure_future(self._handle_webhook(webhook_id, event, received))
        self._answering.add(answer)
        answer.add_done_callback(self._answered)
        try:
            return await asyncio.shield(answer)
        except asyncio.CancelledError:
            if not answer.done():
                call_id = event.data.get("call_id") if isinstance(event.data, dict) else None
                fields = {"webhook_id": webhook_id, "call_id": call_id if isinstance(call_id, str) else None}
                self.log.warning(
                    "webhook.unanswered",
                    **fields,
                    detail="the server stopped first: the answer goes on, a call it accepts is hung up",
                )
                self._cut_short.add(answer)
                answer.add_done_callback(functools.partial(self._answered_late, fields))
            raise

    def _answered(self, answer: asyncio.Task[Any]) -> None:
        self._answering.discard(answer)
        self._cut_short.discard(answer)

    def _answered_late(self, fields: dict[str, str | None], answer: asyncio.Task[Reply]) -> None:
        """The end of an answer whose request was cut short: nobody awaits it, a failure is logged here,
        with the webhook's ``fields`` (its id and call id)."""
        if answer.cancelled():
            return
        exc = answer.exception()
        if isinstance(exc, StoreUnavailable):
            self.log.warning("store.unavailable", error=str(exc), **fields)
        elif exc is not None:
            self.log.error("webhook.failed", exc_info=exc, **fields)

    async def _handle_webhook(self, webhook_id: str, event: WebhookEvent, received: float) -> Reply:
        data = call_data(event) if event.type == "realtime.call.incoming" else None
        store, ttl = self.store, self.settings.dedup_ttl
        wkey = f"webhook:{webhook_id}"
        fields: dict[str, Any] = {"webhook_id": webhook_id, "type": event.type}
        if data is not None:
            fields["call_id"] = data.call_id
            if data.call_id in self.registry:  # live here (its claims may have gone unsettled)
                self.counters["webhook_duplicate"] += 1
                self.log.info("webhook.duplicate", **fields)
                return Reply(200, {"status": "duplicate"})
        if not await store.claim(wkey, self._pending_ttl):
            return await self._duplicate(wkey, fields)
        if data is None:
            await store.settle(wkey, ttl)
            self.counters["webhook_ignored"] += 1
            self.log.info("webhook.ignored", **fields)
            return Reply(200, {"status": "ignored"})
        ckey = f"call:{data.call_id}"
        try:
            claimed = await store.claim(ckey, self._pending_ttl)
        except StoreUnavailable:
            with contextlib.suppress(StoreUnavailable):
                await store.release(wkey)  # best effort: else it expires on its own
            raise
        if not claimed:
            await store.release(wkey)  # this delivery did nothing: a redelivery must not look handled
            return await self._duplicate(ckey, fields)
        reply: Reply | None = None
        store_down = False  # the answer path itself found the store down (the edge logs that)
        tokens = structlog.contextvars.bind_contextvars(call_id=data.call_id)
        try:
            reply = await self._incoming(webhook_id, data, event, received)
        except _RunElsewhere as exc:  # (settled below: the claims it found free are held again)
            self.counters["webhook_duplicate"] += 1
            self.log.info("webhook.duplicate", **fields, running_on=exc.owner)
            reply = Reply(200, {"status": "duplicate"})
        except StoreUnavailable:
            store_down = True
            raise
        finally:
            structlog.contextvars.reset_contextvars(**tokens)
            done = reply is not None and reply.status < 500
            try:
                if done:
                    await store.settle(ckey, ttl)
                    await store.settle(wkey, ttl)
                else:  # failed (or crashed): let a redelivery try again
                    await store.release(ckey)
                    await store.release(wkey)
            except StoreUnavailable as exc:
                if not store_down:  # (one line per outage met: the edge logs the one raised on)
                    self.log.warning(
                        "store.unavailable", error=str(exc), call_id=data.call_id, webhook_id=webhook_id
                    )
                # A failure's pending claims expire on their own. The work done must not be done again
                # once they have: a later delivery would answer the call twice.
                if done:
                    self._settle_later(ckey, wkey, call_id=data.call_id)
        return reply

    # ------------------------------------------------------------------------ orphaned calls
    async def _keep_ledger(self, ledger: CallLedger) -> None:
        """Record this instance's live calls in the shared store as calls start, and at least every
        :data:`LEDGER_TICK` (each record renews its lease, see :func:`ledger_lease`); look for the
        calls of instances whose lease ran out, but only once this instance's own records have gone
        through for a whole lease: after a store outage, every live instance has had the time to renew
        its lease first."""
        lease = ledger_lease(self.settings)
        loop = asyncio.get_running_loop()
        since: float | None = None  # since when records go through without a break
        failing: type[Exception] | None = None  # (a failure is logged as it starts, not at every record)
        while True:
            self._launched.clear()
            next_at = loop.time() + LEDGER_TICK  # (from this record's start: a slow one delays no lease)
            live = set(self.registry.calls) | self._stranded.keys()  # (a stranded call may still be up)
            try:
                await ledger.record(self.instance_id, live, lease)  # (all of them: see CallLedger.record)
            except StoreUnavailable as exc:
                if failing is not StoreUnavailable:
                    self.log.warning("store.unavailable", error=str(exc), ledger=self.instance_id)
                since, failing = None, StoreUnavailable
            except Exception as exc:  # (a bug of ours: the loop must go on, or the others hang up our calls)
                if failing is not Exception:
                    self._ledger_failed(exc)
                since, failing = None, Exception
            else:
                failing = None
                now = loop.time()
                since = now if since is None else since
                sweep_done = self._sweeping is None or self._sweeping.done()
                if now - since >= lease and sweep_done and not self.draining:  # (one it could not finish)
                    self._sweeping = asyncio.ensure_future(self._sweep(ledger))
            with contextlib.suppress(TimeoutError):  # (not wait_for: on 3.11 it may swallow a cancel)
                async with asyncio.timeout_at(next_at):
                    await self._launched.wait()

    def _ledger_failed(self, exc: Exception) -> None:
        """``ledger.failed``: the exception's type and frames, not its text (the store's own, or an app's
        ledger's, may quote what it was given)."""
        self.log.error(
            "ledger.failed", ledger=self.instance_id, **failure_fields(exc, message=False, full=False)
        )

    async def _sweep(self, ledger: CallLedger) -> None:
        """Hang up the calls of instances whose lease ran out (nobody runs their tools), one instance
        after another, then drop them from the ledger (and each such instance, unless it came back
        meanwhile). Each instance is taken from the ledger as its turn comes, for as long as hanging up
        its calls :data:`ORPHANS_AT_ONCE` at a time may take (:data:`HANGUP_BUDGET` and
        :data:`SWEEP_MARGIN` per batch): another instance sweeps none of them meanwhile."""
        limit = asyncio.Semaphore(ORPHANS_AT_ONCE)
        taken: set[str] = set()
        while not self.draining:  # (a draining instance takes no more: its close would cut it short)
            try:
                found = await ledger.orphans(
                    self.instance_id, HANGUP_BUDGET + SWEEP_MARGIN, at_once=ORPHANS_AT_ONCE
                )
            except StoreUnavailable:
                return
            except Exception as exc:  # (a bug of ours)
                self._ledger_failed(exc)
                return
            for owner, calls in found.items():
                self._sweep_holds = owner  # (let go of at close if the sweep is cut short)
                await asyncio.gather(*(self._hang_up_orphan(owner, call_id, limit) for call_id in calls))
                with contextlib.suppress(StoreUnavailable):  # (else the owner's calls are found again)
                    await ledger.swept(self.instance_id, owner, calls)
                self._sweep_holds = None
            if found.keys() <= taken:  # (none left, or one taken before: what it recorded since, next time)
                return
            taken |= found.keys()

    async def _hang_up_orphan(self, owner: str, call_id: str, limit: asyncio.Semaphore) -> None:
        async with limit:
            try:
                await self._retrying(
                    lambda t: self.control.hangup(call_id, timeout=t), budget=self._hangup_budget()
                )
            except CallGone:  # (it ended meanwhile)
                self.log.info("call.orphaned", call_id=call_id, owner=owner, outcome="gone")
            except UpstreamError as exc:
                self.log.error(
                    "call.orphaned", call_id=call_id, owner=owner, outcome="hangup_failed", error=str(exc)
                )
                self._strand(call_id)  # (now in this instance's ledger: known if it goes too)
            else:
                self.log.warning("call.orphaned", call_id=call_id, owner=owner, outcome="hung_up")

    def _settle_later(self, *keys: str, call_id: str) -> None:
        """Settle ``keys``, which the store failed to settle, once it answers again (until it does or
        the service closes): their pending claims would run out, and the work they guard be done again."""

        async def settle() -> None:
            for key in keys:
                await self.store.settle(key, self.settings.dedup_ttl)

        self._store_later(settle, call_id, "store.settled")

    async def _release_mark(self, call_id: str) -> None:
        """Give back ``call_id``'s ``accept_uncertain:`` mark: its accept did not go through (refused, or
        the call gone while ringing). Best effort: a store that fails leaves it to be released once it
        answers again, and the answer goes on (the caller must not be left ringing for it)."""
        key = _uncertain_key(call_id)
        try:
            await self.store.release(key)
        except StoreUnavailable as exc:
            self.log.warning("store.unavailable", error=str(exc), call_id=call_id)
            self._store_later(functools.partial(self.store.release, key), call_id, "store.released")

    def _store_later(
        self, command: Callable[[], Awaitable[None]], call_id: str, done: str | None
    ) -> asyncio.Task[None] | None:
        """Run ``command``, which the store failed, once it answers again (tried after
        :data:`SETTLE_RETRY` seconds, the wait doubling up to :data:`SETTLE_RETRY_MAX`), until it goes
        through or the service closes; then log ``done`` (if any). Once the service has closed, nothing
        is tried again (a pending claim runs out on its own)."""
        if self._left:
            return None
        task = asyncio.ensure_future(self._until_stored(command, call_id, done))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def _until_stored(
        self, command: Callable[[], Awaitable[None]], call_id: str, done: str | None
    ) -> None:
        delay, tries = SETTLE_RETRY, 0
        while True:
            await asyncio.sleep(delay)
            tries += 1
            try:
                await command()
            except StoreUnavailable:
                delay = min(delay * 2, SETTLE_RETRY_MAX)
                continue
            if done is not None:
                self.log.info(done, call_id=call_id, tries=tries)
            return

    async def _duplicate(self, key: str, fields: dict[str, Any]) -> Reply:
        if await self.store.settled(key):
            self.counters["webhook_duplicate"] += 1
            self.log.info("webhook.duplicate", **fields)
            return Reply(200, {"status": "duplicate"})
        self.counters["webhook_in_progress"] += 1
        self.log.info("webhook.in_progress", **fields)
        return Reply(409, {"status": "in_progress"}, {"Retry-After": "2"})

    async def _incoming(
        self, webhook_id: str, data: CallIncomingData, event: WebhookEvent, received: float
    ) -> Reply:
        call = IncomingCall.from_sip(
            data.call_id,
            (SipHeader(h.name, h.value) for h in data.sip_headers),
            data.sip_media_security,
            event.data,
        )
        route = self.routes.match(call.to_number)
        if route is not None:
            call = dataclasses.replace(call, route=route)
        self.log.info(
            "call.incoming",
            webhook_id=webhook_id,
            from_number=clip(call.from_number),  # (as the caller's SIP address has it: untrusted)
            to_number=clip(call.to_number),
            media_security=clip(call.media_security),
        )
        refusal = self.routes.blocks(call)
        if refusal is not None:  # the route file's [blocked] callers: before everything else
            self.counters["blocked"] += 1
            self.log.info("call.blocked", status_code=refusal.status_code, withheld=call.caller_withheld)
            return await self._answer(call, received, refusal)
        if self.full():  # before the routing hook: the caller hears busy at once
            self.counters["busy"] += 1
            self.log.warning("call.busy", live=len(self.registry), max_calls=self.settings.max_calls)
            return await self._answer(call, received, Reject(self.settings.busy_status))
        self._admitting += 1
        try:
            return await self._answer(call, received)
        finally:
            self._admitting -= 1  # (a call it accepted is in the registry by now)

    async def _retrying(
        self,
        attempt: Callable[[float], Awaitable[None]],
        on_retry: Callable[[int, UpstreamError], None] | None = None,
        *,
        budget: float | None = None,
        once: bool = False,
    ) -> UpstreamError | None:
        """A call-control verb under ``budget`` (default: the accept budget): retried on 5xx/timeouts,
        never on 404. Each attempt gets ``SIDEBAND_ACCEPT_TIMEOUT``.

        ``once``: a verb that must not be carried out twice (a REFER reaches the carrier each time). An
        attempt that may have been carried out (unanswered, or a gateway's 502/504) is not tried again,
        so its one attempt gets the whole budget; only failures that did nothing (no connection, another
        5xx, 408, 409, 429) are tried again.

        Returns None when OpenAI said the verb was done; else the failure that leaves it likely done but
        unconfirmed: the unanswered attempt's (``once``), or the 404/410 of an attempt after one that may
        have been carried out (the call is gone most likely because of it). Raises :class:`CallGone` when
        no attempt may have been carried out, :class:`UpstreamError` when the verb failed."""
        settings = self.settings
        budget = settings.accept_budget if budget is None else budget
        timeout = settings.accept_attempt_timeout
        if once:  # (within the budget still: the claims' pending time counts on it)
            timeout = budget
        unanswered = False

        async def tracked(seconds: float) -> None:
            nonlocal unanswered
            try:
                await attempt(seconds)
            except CallGone:
                raise
            except UpstreamError as exc:
                unanswered = unanswered or exc.maybe_carried_out
                raise

        try:
            await with_retries(tracked, budget=budget, attempt_timeout=timeout, on_retry=on_retry, once=once)
        except CallGone as exc:
            if not unanswered:
                raise
            return exc
        except UpstreamError as exc:
            if not (once and exc.maybe_carried_out):
                raise
            return exc
        return None

    async def _decide(self, call: IncomingCall) -> Decision:
        if not self.app.routes_calls:  # the route table's decision or the app's config: nothing to time
            return await self.app.decide(call)
        # The hook runs as a task of its own, so that one that overruns is left behind at the budget
        # even when it ignores its cancellation (the caller is ringing); its late decision is dropped.
        # Only its own time counts: not another call's blocking code holding the loop after it decided.
        run = HookRun()  # (a sync hook may wait for a thread: then it never overran)
        decision = Stepwise(self.app.decide(call, started=run), log_blocked(self.log, hook="on_incoming"))
        budget = self.settings.route_budget
        try:
            return await within_budget(decision, budget, run)
        except HookTimeout as exc:
            self.log.error("call.route_failed", error="timeout", budget_s=budget, started=exc.started)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError) and not own_cancellation(exc):
                raise  # the server is stopping: not the hook's doing
            own = isinstance(exc, DecisionError)  # our message: no data of the hook's in it
            logged = self.settings.log_tool_arguments
            self.log.error("call.route_failed", **failure_fields(exc, message=own or logged, full=logged))
        self.counters["route_failed"] += 1
        return Reject(self.settings.route_failure_status)

    async def _answer(self, call: IncomingCall, received: float, decision: Decision | None = None) -> Reply:
        if decision is None:
            decision = await self._decide(call)
        plan: CallPlan | None = None
        if isinstance(decision, Accept):
            try:
                plan = self.app.plan(decision)
                if self._sip_checked.get(id(plan)) is not plan:  # (plans are cached and immutable)
                    validate_accept_payload(plan.session, sip=True)
                    if len(self._sip_checked) >= 256:
                        self._sip_checked.clear()
                    self._sip_checked[id(plan)] = plan
            except (SessionConfigError, ValueError, TypeError) as exc:  # e.g. Accept(session={"voice": …})
                self.counters["config_invalid"] += 1
                self.log.error("call.config_invalid", error=str(exc))
                plan, decision = None, Reject(self.settings.route_failure_status)
        self.log.info(
            "call.decided",
            decision=type(decision).__name__.lower(),
            status_code=getattr(decision, "status_code", None),
            target=getattr(decision, "target_uri", None),
        )
        if asyncio.current_task() in self._cut_short:
            # The server stopped before the webhook was answered, and nothing was sent to OpenAI yet: the
            # call rings on, for OpenAI's redelivery to another instance (the claims are released).
            self.log.info("call.left_ringing", detail="the server stopped before the call was answered")
            return _retry_later()
        call_id, control = call.call_id, self.control
        # An accept attempt went unanswered (or a gateway gave up on it): it may have gone through. And an
        # earlier delivery's accept of the call may have (its mark is held).
        uncertain = inherited = False

        def accept_retry(attempt: int, exc: UpstreamError) -> None:
            nonlocal uncertain
            uncertain = uncertain or exc.maybe_carried_out
            self.log.warning("call.accept_retry", attempt=attempt, status=exc.status, error=str(exc))

        try:
            if plan is not None:
                # Marked before the first attempt: should this instance die after an accept went through
                # but before it answered, the redelivery (on any instance) that finds the call no longer
                # ringing attaches instead of taking it for gone. Held already: an earlier delivery's
                # accept may have gone through.
                marker = _uncertain_key(call_id)
                inherited = not await self.store.claim(marker, _UNCERTAIN_TTL)

                async def accept(timeout: float) -> None:
                    try:
                        await control.accept(call_id, plan.session, timeout=timeout)
                    except CallGone:
                        raise
                    except UpstreamError as exc:
                        if (uncertain or inherited) and exc.maybe_done_already:
                            # Refused after an attempt that may have gone through (this delivery's, or an
                            # earlier one's): most likely because it did. Attaching tells.
                            raise CallGone(str(exc), exc.status, exc.body) from None
                        raise

                try:
                    gone = await self._retrying(accept, on_retry=accept_retry)
                except CallGone as exc:
                    if not uncertain and not inherited:
                        await self._release_mark(call_id)  # gone while ringing: nothing to remember
                        raise
                    gone = exc
                if gone is not None:
                    if inherited:
                        # An earlier delivery's accept went through, and its instance runs the call (its
                        # claims ran out unsettled): not a second time.
                        await self._not_run_elsewhere(call_id)
                    # Not ringing any more: maybe because an unanswered attempt (of this delivery or an
                    # earlier one) accepted it. Attaching tells (a call that is really gone refuses the
                    # sideband and the runtime ends).
                    self.log.warning("call.accept_uncertain", status=gone.status)
                else:
                    latency = time.monotonic() - received
                    self.accept_seconds.observe(latency)
                    self.log.info("call.accepted", latency_ms=round(latency * 1000, 2))
                self.counters["accepted"] += 1
                ctx = call.context()
                if isinstance(decision, Accept):  # (a plan is an accept's)
                    ctx.state.update(decision.state)
                self.launch(ctx, plan)
                return Reply(200, {"status": "accepted"})
            # A reject or refer that may have been carried out unanswered is taken as done: a later attempt
            # that finds the call gone finds it gone because of it most likely, and a REFER is not sent
            # again (each reaches the carrier). Unless an earlier delivery's accept may have answered the
            # call: then the one that is gone may be the ringing call, and the call up (hung up below).
            if isinstance(decision, Reject):
                unsure = await self._retrying(
                    lambda t: control.reject(call_id, decision.status_code, timeout=t)
                )
                if isinstance(unsure, CallGone) and await self._accept_may_have_gone_through(call_id):
                    return await self._hang_up_uncertain(call_id)
                self.counters["rejected"] += 1
                self.log.info("call.rejected", status_code=decision.status_code, uncertain=unsure is not None)
                return Reply(200, {"status": "rejected"})
            assert isinstance(decision, Refer)
            unsure = await self._retrying(
                lambda t: control.refer(call_id, decision.target_uri, timeout=t), once=True
            )
            if unsure is not None:
                # It may have reached the carrier: not sent again. If it did not, the call rings on until
                # OpenAI gives up on it.
                self.log.warning("call.refer_uncertain", status=unsure.status, error=str(unsure))
            self.counters["referred"] += 1
            self.log.info("call.referred", target=decision.target_uri, uncertain=unsure is not None)
            return Reply(200, {"status": "referred"})
        except CallGone:
            if plan is None and await self._accept_may_have_gone_through(call_id):
                # An earlier delivery's unanswered accept may have answered the call this one rejects
                # or refers: hang it up rather than leave it answered with nothing behind it.
                return await self._hang_up_uncertain(call_id)
            self.counters["call_gone"] += 1
            self.log.info("call.gone")
            return Reply(200, {"status": "call_gone"})
        except UpstreamError as exc:
            self.counters["answer_failed"] += 1
            self.log.error(
                "call.accept_failed" if plan else "call.answer_failed", status=exc.status, error=str(exc)
            )
            if plan is not None and not (uncertain or inherited or exc.maybe_carried_out):
                # Every attempt was answered, and refused: the call was not accepted. (Otherwise the mark
                # stays: the redelivery that finds the call no longer ringing must attach.)
                await self._release_mark(call_id)
            if exc.retryable:
                return _retry_later()
            if isinstance(decision, Reject):
                return Reply(200, {"status": "failed", "error": f"upstream answered {exc.status}"})
            return await self._reject_instead(call_id, exc)

    async def _accept_may_have_gone_through(self, call_id: str) -> bool:
        """Whether an earlier delivery's accept of ``call_id`` may have gone through (it holds the mark)."""
        key = _uncertain_key(call_id)
        if await self.store.claim(key, 1.0):
            with contextlib.suppress(StoreUnavailable):  # (else it runs out in a second)
                await self.store.release(key)
            return False
        return True

    async def _not_run_elsewhere(self, call_id: str) -> None:
        """Raise :class:`_RunElsewhere` when a live instance runs ``call_id``, as the shared ledger has
        it: a redelivery that reached this instance once the claims of the one that answered it ran out
        (the store failed to settle them), or a stranded call being hung up."""
        # (optional to a ledger: one of the app's own without it is a ledger all the same)
        running: Callable[[str], Awaitable[str | None]] | None = getattr(self.store, "running", None)
        if isinstance(self.store, CallLedger) and running is not None:
            owner = await running(call_id)
            if owner is not None:
                raise _RunElsewhere(owner)

    async def _hang_up_uncertain(self, call_id: str) -> Reply:
        await self._not_run_elsewhere(call_id)  # (a call up, with someone behind it)
        self.log.warning("call.accept_uncertain", status=404, action="hangup")
        try:
            await self._retrying(lambda t: self.control.hangup(call_id, timeout=t))
        except CallGone:
            self.counters["call_gone"] += 1
            self.log.info("call.gone")
            return Reply(200, {"status": "call_gone"})
        except UpstreamError as exc:
            self.counters["answer_failed"] += 1
            self.log.error("call.answer_failed", status=exc.status, error=str(exc))
            return _retry_later()
        self.counters["hung_up"] += 1
        self.log.info("call.hung_up", target=None)
        return Reply(200, {"status": "hung_up"})

    async def _reject_instead(self, call_id: str, refused: UpstreamError) -> Reply:
        """An accept or refer refused with a 4xx would be refused again: reject the call with
        ``SIDEBAND_ROUTE_FAILURE_STATUS`` rather than leave the caller ringing."""
        status_code = self.settings.route_failure_status
        gone = False
        try:
            unsure = await self._retrying(lambda t: self.control.reject(call_id, status_code, timeout=t))
        except CallGone as exc:
            unsure, gone = exc, True
        except UpstreamError as exc:
            self.log.error("call.answer_failed", status=exc.status, error=str(exc))
            if exc.retryable:  # the caller still rings: a redelivery tries again
                return _retry_later()
            return Reply(200, {"status": "failed", "error": f"upstream answered {refused.status}"})
        # Not ringing (gone, or gone after an attempt that may have rejected it): maybe because an accept
        # that went unanswered answered it. Hang it up rather than leave it answered with nothing behind it.
        if isinstance(unsure, CallGone) and await self._accept_may_have_gone_through(call_id):
            return await self._hang_up_uncertain(call_id)
        if gone:
            self.counters["call_gone"] += 1
            self.log.info("call.gone")
            return Reply(200, {"status": "call_gone"})
        self.counters["rejected"] += 1
        self.log.info(
            "call.rejected",
            status_code=status_code,
            instead_of_status=refused.status,
            uncertain=unsure is not None,
        )
        return Reply(200, {"status": "rejected", "error": f"upstream answered {refused.status}"})

    # ------------------------------------------------------------------------------- calls
    def _machine_config(self, plan: CallPlan) -> MachineConfig:
        """The per-call policy for ``plan`` (built once per plan: plans are cached by the app)."""
        cached = self._configs.get(id(plan))
        if cached is not None and cached[0] is plan:
            return cached[1]
        settings, app, tools = self.settings, self.app, self.app.tools
        config = MachineConfig(
            session=plan.session,
            greeting=plan.greeting,
            # (every tool of the app's: code may offer the call others than the plan's, update_session)
            filler_after={t.name: tools.filler_after_for(t) for t in tools},
            quiet=frozenset(t.name for t in tools if not t.respond),
            max_call_duration=plan.max_call_duration or settings.max_call_duration,
            max_idle_duration=plan.max_idle_duration or settings.max_idle_duration,
            filler_instructions=app.filler_instructions,
            goodbye_instructions=app.goodbye_instructions,
            idle_prompts=app.idle_prompts,
            idle_prompt_instructions=app.idle_prompt_instructions,
            guardrail_note=app.guardrail_note,
            max_tool_calls=app.max_tool_calls,
            max_identical_calls=app.max_identical_calls,
        )
        if len(self._configs) >= 256:
            self._configs.pop(next(iter(self._configs)))
        self._configs[id(plan)] = (plan, config)  # the plan is kept alive, so its id stays unique
        return config

    def launch(self, ctx: CallContext, plan: CallPlan, **log_fields: Any) -> CallRuntime:
        """Start the call runtime (sideband attach happens in its own task)."""
        app, settings = self.app, self.settings
        tools = plan.tools
        # The tools code may offer the call later (update_session): the app's, but a REFER off a phone call.
        if ctx.source != "sip":
            catalog = plan.tools  # (a browser's plan: all the app's tools but the transfer)
        else:
            catalog = plan.catalog if plan.catalog is not None else plan.tools
        config = self._machine_config(plan)
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else ""
        call_id, control = ctx.call_id, self.control

        url, proxy, tls, compression = self._sideband_url, self._proxy, self._tls, settings.ws_compression
        machine = CallMachine(config)

        async def connect() -> Any:
            return await connect_sideband(url, call_id, key, compression=compression, proxy=proxy, tls=tls)

        async def verb(name: str, target: str | None) -> bool:
            if name != "refer" or target is None:
                # A hangup that fails leaves the call up: it is tried for longer.
                await self._retrying(
                    lambda t: control.hangup(call_id, timeout=t), budget=self._hangup_budget()
                )
                return False
            # A failed refer falls back to a hangup at once (the caller waits in silence meanwhile).
            unsure = await self._retrying(lambda t: control.refer(call_id, target, timeout=t), once=True)
            if unsure is None:
                return False
            # Unanswered: it may have reached the carrier, and is not sent again. The caller must not stay
            # on a call nobody controls: unless the call has ended meanwhile (the transfer went through),
            # it is hung up, and a hangup that finds it gone says the transfer went through.
            unanswered = {"status": unsure.status, "error": str(unsure)}
            outcome = "ended"
            if machine.closed is None:
                try:
                    await self._retrying(lambda t: control.hangup(call_id, timeout=t))
                except CallGone:
                    outcome = "transferred"
                except UpstreamError:
                    self.log.warning("call.refer_uncertain", outcome="hangup_failed", **unanswered)
                    raise  # (the call ends as transfer_failed, hung up by its own fallback)
                else:  # (found gone only after a hangup attempt of its own went unanswered: hung up too)
                    # The call was still up: the transfer did not go through, or was cut short.
                    self.log.warning("call.refer_uncertain", outcome="hung_up", **unanswered)
                    raise UpstreamError(f"{unsure} (the call was still up: hung up)", unsure.status)
            self.log.warning("call.refer_uncertain", outcome=outcome, **unanswered)
            return True  # the call has ended: nothing to wait for

        runtime = CallRuntime(
            machine=machine,
            ctx=ctx,
            tools=tools,
            catalog=catalog,
            connect=connect,
            verb=verb,
            hooks=app.hooks(),
            transfer_targets=plan.transfer_targets if ctx.source == "sip" else None,  # (a REFER: phone calls)
            reattach_attempts=settings.reattach_attempts,
            log_tool_arguments=settings.log_tool_arguments,
            log_transcripts=settings.log_transcripts,
            log_fields=log_fields,
            stats=self.registry.tools,
            usage=self.registry.usage,
            turn_seconds=self.registry.turn_seconds,
            guardrail_trips=self.registry.guardrail_trips,
        )
        self.registry.start(runtime).add_done_callback(functools.partial(self._ended, runtime))
        self._launched.set()  # (the ledger records it now: an instance dying just after leaves it known)
        return runtime

    def _ended(self, runtime: CallRuntime, _task: asyncio.Task[str]) -> None:
        """A call's end: one whose hangup failed may still be up, and is hung up again later. Its task
        may have been cancelled (a stop cut the hangup short): the summary says how it ended."""
        if runtime.summary.reason == "hangup_failed":
            self._strand(runtime.ctx.call_id)

    def _strand(self, call_id: str) -> None:
        """Hang ``call_id`` up again later (or leave it in the ledger at close): it may still be up."""
        if call_id not in self._stranded and not self._left:
            self._stranded[call_id] = asyncio.ensure_future(self._hang_up_later(call_id))
            self._launched.set()  # (the ledger records it now)

    async def _hang_up_later(self, call_id: str) -> None:
        loop = asyncio.get_running_loop()
        delay, until = STRANDED_RETRY, loop.time() + STRANDED_FOR
        try:
            while loop.time() < until:
                await asyncio.sleep(delay)
                try:
                    await self._retrying(
                        lambda t: self.control.hangup(call_id, timeout=t), budget=self._hangup_budget()
                    )
                except CallGone:
                    self.log.info("call.stranded", call_id=call_id, outcome="gone")
                    return
                except UpstreamError as exc:
                    self.log.debug("call.stranded", call_id=call_id, outcome="retrying", error=str(exc))
                    delay = min(delay * 2, STRANDED_RETRY_MAX)
                else:
                    self.log.warning("call.stranded", call_id=call_id, outcome="hung_up")
                    return
            self.log.error("call.stranded", call_id=call_id, outcome="given_up", tried_for_s=STRANDED_FOR)
        finally:
            self._stranded.pop(call_id, None)

    # ------------------------------------------------------------------------------ WebRTC
    def _browser_accept(self) -> Accept:
        """The decision a browser's call is answered with: all the app's tools but the transfer."""
        app, transfer = self.app, self.app.transfer_tool
        return Accept(
            tools=None if transfer is None else tuple(n for n in app.tools.names() if n != transfer)
        )

    def browser_plan(self) -> CallPlan:
        """The app's session for a browser's call: all its tools but the transfer (a REFER needs a phone
        call), validated as it is sent (:class:`SessionConfigError` otherwise)."""
        try:
            plan = self.app.plan(self._browser_accept())
        except SessionConfigError:
            raise
        except (ValueError, TypeError) as exc:  # (the app's config changed since the start, say)
            raise SessionConfigError(" ".join(str(exc).split())) from None
        validate_accept_payload(plan.session, sip=False)
        return plan

    async def rtc_relay(self, sdp: str) -> tuple[str, str]:
        """Unified interface: relay the browser's offer, attach to the new call. Returns (call_id, answer).

        The relay runs to its end even when the request is cancelled (the server stopping, as for a
        webhook's answer): the offer may have created the call at OpenAI already, which is then attached
        and hung up at :meth:`close`, not left up with nobody on it."""
        plan = self.browser_plan()
        self._admitting += 1  # (from now: a browser checked before the relay's task runs finds no room)
        relay = asyncio.ensure_future(self._rtc_relay(sdp, plan))
        self._answering.add(relay)
        relay.add_done_callback(self._answered)
        try:
            return await asyncio.shield(relay)
        except asyncio.CancelledError:
            if not relay.done():
                self.log.warning(
                    "rtc.unanswered",
                    detail="the server stopped first: the relay goes on, a call it creates is hung up",
                )
                relay.add_done_callback(self._relayed_late)
            raise

    def _relayed_late(self, relay: asyncio.Task[tuple[str, str]]) -> None:
        """The end of a relay whose request was cut short: nobody awaits it, a failure is logged here."""
        if relay.cancelled():
            return
        exc = relay.exception()
        if isinstance(exc, UpstreamError):
            created = {"call_id": exc.call_id} if exc.call_id else {}  # (created, then hung up)
            self.log.error("rtc.relay_failed", status=exc.status, error=str(exc), **created)
        elif exc is not None:
            self.log.error("rtc.relay_failed", exc_info=exc)

    async def _rtc_relay(self, sdp: str, plan: CallPlan) -> tuple[str, str]:
        """:meth:`rtc_relay`'s work, in a task of its own; it is counted in ``_admitting`` already."""
        try:
            try:
                call_id, answer = await self.control.create_call(sdp, plan.session)
            except UpstreamError as exc:
                if exc.call_id is not None and exc.call_up:
                    self._strand(exc.call_id)  # (created with nobody on it, its hangup failed: again later)
                raise
            with structlog.contextvars.bound_contextvars(call_id=call_id):
                try:
                    await self.store.settle(f"call:{call_id}", self.settings.dedup_ttl)  # a new call: ours
                except StoreUnavailable as exc:  # the call exists now: serve it all the same
                    self.log.warning("store.unavailable", error=str(exc))
                    self._settle_later(f"call:{call_id}", call_id=call_id)
                self.log.info("call.webrtc_created")
                self.launch(CallContext(call_id, "webrtc"), plan)
        finally:
            self._admitting -= 1  # (a call it created is in the registry by now)
        return call_id, answer

    async def rtc_session(self) -> dict[str, Any]:
        """Mint an ephemeral key for a browser-first call, with a handoff ticket."""
        if self.tickets is None:
            raise RuntimeError("no ticket key configured")
        plan = self.browser_plan()
        secret = await self.control.client_secret(plan.session, self.settings.rtc_key_ttl)
        ticket, info = self.tickets.issue()
        self.log.info("rtc.session_minted", ticket_expires_at=info.expires_at)
        return {
            "client_secret": secret["value"],
            "expires_at": secret.get("expires_at"),
            "calls_url": self.control.calls_url,
            "ticket": ticket,
            "ticket_expires_at": info.expires_at,
        }

    def _handoff_refused(self, status: int, reason: str, call_id: str | None = None) -> Reply:
        """Refuse a handoff: logged (``rtc.handoff_refused``) and counted, so a stuck browser shows."""
        self.refused["rtc.handoff_refused", status] += 1
        self.log.warning(
            "rtc.handoff_refused", status=status, reason=reason, **({"call_id": call_id} if call_id else {})
        )
        return Reply(status, {"error": reason})

    async def rtc_handoff(self, call_id: Any, ticket: Any, wait: float = 5.0) -> Reply:
        """Attach to a browser-started call, if the browser holds a valid, unused ticket."""
        if self.tickets is None:
            return self._handoff_refused(503, "handoff not configured")
        if rtc_call_id(call_id) is None:
            return self._handoff_refused(400, "call_id must look like rtc_…")
        try:
            info = self.tickets.verify(ticket if isinstance(ticket, str) else "")
        except TicketError as exc:
            return self._handoff_refused(403, str(exc), call_id)
        # A spent ticket is remembered for the longest life a ticket has, and an hour more: not for its
        # remaining wall-clock life alone, which a clock stepped back (or another instance's clock running
        # behind) would stretch past the claim, so that it could be spent twice. Nor for this instance's
        # longest life alone: one with a longer SIDEBAND_RTC_KEY_TTL (mid-rollout) may have signed it.
        longest = max(self.settings.rtc_key_ttl + HANDOFF_GRACE, self.tickets.remaining(info))
        ttl = longest + NONCE_MARGIN
        with structlog.contextvars.bound_contextvars(call_id=call_id):
            try:  # (before any claim: a session that cannot be sent spends no ticket, holds no call)
                plan = self.browser_plan()
            except SessionConfigError as exc:
                self.log.error("rtc.config_invalid", call_id=call_id, error=str(exc))
                return Reply(500, {"error": "session config invalid"})
            # Claims to launch run to their end even when the request is cancelled (the server stopping,
            # as for a webhook's answer): cut short between them, the ticket would be spent and the call
            # left claimed, running with nobody attached. :meth:`close` waits for it, then hangs it up.
            taking = asyncio.ensure_future(self._rtc_take(call_id, info.nonce, ttl, plan))
            self._answering.add(taking)
            taking.add_done_callback(self._answered)
            try:
                taken = await asyncio.shield(taking)
            except asyncio.CancelledError:
                if not taking.done():
                    self.log.warning(
                        "rtc.unanswered",
                        detail="the server stopped first: the handoff goes on, its call is hung up",
                    )
                    taking.add_done_callback(self._handed_off_late)
                raise
            if isinstance(taken, Reply):
                return taken
            runtime = taken
            attached = asyncio.ensure_future(runtime.attached.wait())
            ended = asyncio.ensure_future(runtime.wait_closed())
            try:
                await asyncio.wait({attached, ended}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                attached.cancel()
                ended.cancel()
                await asyncio.gather(attached, ended, return_exceptions=True)
            if runtime.attached.is_set():
                return Reply(200, {"status": "attached", "call_id": call_id})
            reason = runtime.summary.reason  # set once the runtime has ended
            if reason == "call_not_found":
                return Reply(404, {"error": "call not found"})
            if reason:  # refused or unreachable for good: the call was hung up
                return Reply(502, {"error": "could not attach", "reason": reason})
            return Reply(202, {"status": "attaching", "call_id": call_id})

    async def _give_back_ticket(self, nonce: str, call_id: str) -> None:
        """Give back a handoff's ticket, which attached nothing: once the store answers again if it fails
        now (else the browser's retry would find it spent for as long as a ticket lives)."""
        key = f"ticket:{nonce}"
        try:
            await self.store.release(key)
        except StoreUnavailable as exc:
            self.log.warning("store.unavailable", error=str(exc), call_id=call_id)
            later = self._store_later(functools.partial(self.store.release, key), call_id, "store.released")
            if later is not None:
                self._giving_back[nonce] = later
                later.add_done_callback(functools.partial(self._given_back, nonce))

    def _given_back(self, nonce: str, later: asyncio.Task[None]) -> None:
        if self._giving_back.get(nonce) is later:
            del self._giving_back[nonce]

    async def _rtc_take(self, call_id: str, nonce: str, ttl: float, plan: CallPlan) -> CallRuntime | Reply:
        """:meth:`rtc_handoff`'s claims (the ticket's, then the call's) and its launch, in a task of its
        own: the call's runtime, or the refusal.

        The ticket is claimed first: a spent one is refused before it can hold the call's claim, which a
        valid ticket for the same call would otherwise find taken. A ticket whose call turns out taken is
        given back (it attached nothing)."""
        # (live here: its claim may have run out, left pending by a store that failed to settle it)
        if call_id in self.registry:
            return self._handoff_refused(409, "call already attached", call_id)  # (the ticket stays unused)
        giving_back = self._giving_back.get(nonce)
        if giving_back is not None:
            # The browser's retry, with a ticket this instance is to give back once the store answers (its
            # handoff met the store down): given back now (this store's own hold only: one another
            # instance took meanwhile stays), then claimed as any. A store still down keeps it to give back.
            await self.store.release(f"ticket:{nonce}")
            giving_back.cancel()
        if not await self.store.claim(f"ticket:{nonce}", ttl):
            if await self.store.settled(f"call:{call_id}"):
                # (its handoff sent again, its answer lost: the call attached, here or on another instance)
                return self._handoff_refused(409, "call already attached", call_id)
            return self._handoff_refused(403, "ticket already used", call_id)
        try:
            free = call_id not in self.registry and await self.store.claim(
                f"call:{call_id}", self._pending_ttl
            )
        except BaseException:
            await self._give_back_ticket(nonce, call_id)
            raise
        if not free:
            await self._give_back_ticket(nonce, call_id)  # it attached nothing: the browser's still
            return self._handoff_refused(409, "call already attached", call_id)
        try:
            await self.store.settle(f"call:{call_id}", self.settings.dedup_ttl)
        except StoreUnavailable as exc:  # call and ticket are ours: serve the call all the same
            self.log.warning("store.unavailable", error=str(exc))
            self._settle_later(f"call:{call_id}", call_id=call_id)
        runtime = self.launch(CallContext(call_id, "webrtc"), plan)
        self.log.info("rtc.handoff")
        return runtime

    def _handed_off_late(self, taking: asyncio.Task[CallRuntime | Reply]) -> None:
        """The end of a handoff whose request was cut short: nobody awaits it, a failure is logged here."""
        if taking.cancelled():
            return
        exc = taking.exception()
        if isinstance(exc, StoreUnavailable):  # (its claims released, or never taken: the call unserved)
            self.log.warning("store.unavailable", error=str(exc))
        elif exc is not None:
            self.log.error("rtc.handoff_failed", exc_info=exc)


def _read_routes(path: Path | str, tool_names: Iterable[str]) -> RouteTable:
    """:meth:`RouteTable.load` in a daemon thread of its own, waited for up to :data:`ROUTES_READ_TIMEOUT`
    (at start and at each reload): a read that hangs (a FIFO, a stalled network volume) raises
    :class:`RouteError` then, and is left behind (what it reads later is dropped); it holds up neither
    the caller nor the process's exit.

    Ctrl-C ends the wait at once: where the service is built in a task (``sideband serve``'s
    ``create_app``), the task's cancellation meanwhile (asyncio's answer to SIGINT: the loop cannot run
    while this waits) is raised (:class:`asyncio.CancelledError`); elsewhere SIGINT's
    ``KeyboardInterrupt`` interrupts the wait itself. A cancellation asked for before (a Ctrl-C as the
    start began) is raised at once, the file not read."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # (no event loop runs here)
        task = None
    cancels = task.cancelling() if task is not None else 0
    if cancels:
        raise asyncio.CancelledError
    deadline = time.monotonic() + ROUTES_READ_TIMEOUT
    done = threading.Event()
    outcome: list[RouteTable | BaseException] = []

    def run() -> None:
        try:
            outcome.append(RouteTable.load(path, tool_names))
        except BaseException as exc:
            outcome.append(exc)
        done.set()

    threading.Thread(target=run, name="sideband-routes", daemon=True).start()
    while not done.wait(min(_CANCEL_LOOKS, max(0.0, deadline - time.monotonic()))):
        if task is not None and task.cancelling() > cancels:
            raise asyncio.CancelledError
        if time.monotonic() >= deadline:
            raise RouteError(f"{path}: timed out reading it ({ROUTES_READ_TIMEOUT:g} s)")
    [result] = outcome
    if isinstance(result, BaseException):
        raise result
    return result


async def _in_daemon_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` in a daemon thread of its own: a read that hangs (a route file on a stalled network
    volume) must not hold up the process's exit, as a thread of the loop's default executor would."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[_T] = loop.create_future()

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # (the loop closed meanwhile)
            loop.call_soon_threadsafe(_settle, done, result, error)

    threading.Thread(target=run, name="sideband-routes", daemon=True).start()
    return await done


def _settle(done: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if done.done():  # (given up on: cancelled)
        return
    if error is None:
        done.set_result(result)
    else:
        done.set_exception(error)
