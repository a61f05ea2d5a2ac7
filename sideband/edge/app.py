"""aiohttp app factory: webhook, WebRTC, health, readiness and metrics routes."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from pydantic import ValidationError
from structlog.typing import FilteringBoundLogger

from sideband import jsonio
from sideband.app import HookTimeout, Sideband
from sideband.blocking import log_blocked
from sideband.edge.verify import VerificationError, Verifier
from sideband.logs import failure_fields
from sideband.metrics import label
from sideband.service import Reply, Service, WebhookEvent, rtc_call_id
from sideband.session import SessionConfigError
from sideband.settings import Settings, SettingsError
from sideband.stores import ClaimStore, StoreUnavailable
from sideband.tools import own_cancellation
from sideband.upstream.openai import UpstreamError

__all__ = ["SERVICE", "create_app"]

SERVICE = web.AppKey("sideband.service", Service)
_VERIFIER = web.AppKey("sideband.verifier", Verifier)
_MAX_SDP = 64 * 1024

log = structlog.get_logger(component="sideband.edge")
_LOG = web.AppKey("sideband.log", FilteringBoundLogger)
"""The same logger, bound once per app: a module-level proxy builds a logger on every call (the hot path
uses this one)."""
_LOG_IDS = web.RequestKey("sideband.log_ids", dict[str, str])
"""The ids (``webhook_id``, ``call_id``) the error middleware's lines about a request carry."""


def _json(status: int, body: dict[str, object], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=jsonio.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def _reply(reply: Reply) -> web.Response:
    return _json(reply.status, reply.body, reply.headers)


def _refuse(service: Service, status: int, error: str, *, event: str = "webhook.rejected") -> web.Response:
    log.warning(event, status=status, reason=error)
    service.refused[event, status] += 1
    return _json(status, {"error": error})


BODY_TIMEOUT = 10.0
"""Seconds a request body may take to arrive: a client trickling bytes must not hold a socket forever."""


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The whole body (decoded by aiohttp: ``gzip``, ``deflate``…), at most ``limit`` bytes, within
    :data:`BODY_TIMEOUT`."""
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    # The body an authorize_browser hook read already (``await request.json()``): aiohttp keeps it for
    # ``read()``, and the stream has nothing left.
    read = request._read_bytes
    if read is not None:
        if len(read) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(read))
        return read
    content = request.content
    if content.is_eof() and content.exception() is None:  # all of it came with the headers: no waiting
        data = content.read_nowait()
        if len(data) > limit:  # (decoded: a small gzip body may inflate past the limit)
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(data))
        return data
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            async for chunk in request.content.iter_chunked(65536):
                body += chunk
                if len(body) > limit:
                    raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
    except (RequestPayloadError, HttpProcessingError):  # e.g. a body that is not the gzip it claims
        raise _BadBody from None
    except ConnectionError:  # the client went away before sending all of it
        raise _ClientGone from None
    except TimeoutError:
        raise _SlowBody from None
    return bytes(body)


async def _body(
    request: web.Request, service: Service, limit: int, *, event: str = "webhook.rejected"
) -> bytes | web.Response:
    """The request's body (see :func:`_read_body`), or the answer that refuses it."""
    try:
        return await _read_body(request, limit)
    except (web.HTTPRequestEntityTooLarge, _BadBody) as exc:
        return await _unread(request, service, exc, limit, event)


async def _unread(
    request: web.Request,
    service: Service,
    exc: web.HTTPRequestEntityTooLarge | _BadBody,
    limit: int,
    event: str,
) -> web.Response:
    """The answer to a body that could not be read (:func:`_read_body`'s errors, over ``limit`` bytes)."""
    route = event.partition(".")[0]
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return _refuse(service, 413, f"body over {limit} bytes", event=event)
    if isinstance(exc, _ClientGone):  # a sender timing out, a proxy giving up: it sends again
        log.info(f"{route}.abandoned", reason="client disconnected before the body was read")
        return _json(400, {"error": "incomplete body"})
    if isinstance(exc, _SlowBody):
        refusal = _refuse(service, 408, f"body not received within {BODY_TIMEOUT:g} s", event=event)
        return await _closing(request, refusal, route)
    refusal = _refuse(service, 400, "body does not match its content or transfer encoding", event=event)
    return await _closing(request, refusal, route)


async def _closing(request: web.Request, response: web.Response, route: str) -> web.Response:
    """Send ``response``, then close the connection without reading the rest of the body: aiohttp would
    go on reading it (up to 10 s more of a trickle), and a body that failed to decode fails there again
    and is logged as an unhandled error with a traceback, for any client that cares to send one.

    A client already gone (it gave up after sending such a body) gets nothing: ``{route}.abandoned``."""
    response.force_close()  # Connection: close
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:  # (aiohttp's "Cannot write to closing transport")
        log.info(f"{route}.abandoned", reason="client disconnected before the answer was sent")
    request.protocol.force_close()
    return response


class _BadBody(ValueError):
    """The request body could not be read as sent (bad transfer or content encoding)."""


class _ClientGone(_BadBody):
    """The client disconnected before its body was read: nobody will read the answer either."""


class _SlowBody(_BadBody):
    """The body did not arrive within :data:`BODY_TIMEOUT`."""


def _signature_headers(request: web.Request) -> dict[str, str]:
    """The three Standard Webhooks headers; repeated ``webhook-signature`` lines are joined (a proxy may
    split the space-separated list), other repeats keep their first value."""
    headers = request.headers
    out = {name: headers[name] for name in ("webhook-id", "webhook-timestamp") if name in headers}
    signatures = headers.getall("webhook-signature", ())
    if signatures:
        out["webhook-signature"] = " ".join(signatures)
    return out


def _webhook_event(body: bytes) -> WebhookEvent:
    """The event in a verified body. pydantic's parser refuses what Python's reads (a lone surrogate
    escaped in a caller's SIP header, say): such a body is read by :mod:`sideband.jsonio` instead."""
    try:
        return WebhookEvent.model_validate_json(body)
    except ValidationError:
        return WebhookEvent.model_validate(jsonio.loads(body))


async def webhook(request: web.Request) -> web.Response:
    """``POST /webhooks/openai`` — verify, claim, decide, answer (see README for every status)."""
    received = time.monotonic()
    service = request.app[SERVICE]
    if service.draining:
        service.refused["webhook.draining", 503] += 1
        log.info("webhook.draining")  # (OpenAI delivers it again, to another instance)
        return _json(503, {"error": "draining"}, {"Retry-After": "1"})
    if _media_type(request) != "application/json":
        return _refuse(service, 415, "content-type must be application/json")
    body = await _body(request, service, service.settings.webhook_max_body)
    if isinstance(body, web.Response):
        return body
    try:
        webhook_id = request.app[_VERIFIER].verify(body, _signature_headers(request))
    except VerificationError as exc:
        return _refuse(service, exc.status, exc.reason)
    try:
        event = _webhook_event(body)
    except (ValidationError, ValueError):
        return _refuse(service, 400, "body is not a JSON webhook event")
    fields = {"webhook_id": webhook_id, "type": event.type, "event_id": event.id}
    call_id = event.data.get("call_id") if isinstance(event.data, dict) else None
    if isinstance(call_id, str) and event.type == "realtime.call.incoming":
        fields["call_id"] = call_id
    request.app[_LOG].info("webhook.received", **fields)
    request[_LOG_IDS] = {k: v for k, v in fields.items() if k in ("webhook_id", "call_id")}
    try:
        reply = await service.handle_webhook(webhook_id, event, received)
    except ValidationError:
        return _refuse(service, 400, "realtime.call.incoming without a usable data.call_id")
    return _reply(reply)


def _media_type(request: web.Request) -> str:
    """The request's media type, lower-cased, without parameters. Not ``request.content_type``: aiohttp
    parses each value it has not cached (the last 56) with the email package, whose header registry makes
    new classes for every header it parses, cyclic garbage; and the sender chooses the parameters."""
    media = request.headers.get("Content-Type", "").partition(";")[0]
    return media.strip().lower() or "application/octet-stream"


async def rtc_calls(request: web.Request) -> web.Response:
    """``POST /rtc/calls`` — the browser's SDP offer in, SDP answer out; the sideband attaches itself."""
    service = request.app[SERVICE]
    refused = await _browser_gate(request, service)
    if refused is not None:
        return refused
    if _media_type(request) != "application/sdp":  # (not a type another site may POST without asking)
        return _refuse(service, 415, "content-type must be application/sdp", event="rtc.rejected")
    raw = await _body(request, service, _MAX_SDP, event="rtc.rejected")
    if isinstance(raw, web.Response):
        return raw
    try:
        sdp = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _refuse(service, 400, "SDP offer is not readable UTF-8", event="rtc.rejected")
    if not sdp.startswith("v=0"):
        return _refuse(service, 400, "body is not an SDP offer", event="rtc.rejected")
    busy = _busy(service)
    if busy is not None:
        return busy
    try:
        call_id, answer = await service.rtc_relay(sdp)
    except SessionConfigError as exc:
        log.error("rtc.config_invalid", error=str(exc))
        return _json(500, {"error": "session config invalid"})
    except UpstreamError as exc:
        created = {"call_id": exc.call_id} if exc.call_id else {}  # (created, then hung up)
        log.error("rtc.relay_failed", status=exc.status, error=str(exc), **created)
        if exc.offer_refused and exc.status is not None:  # about the offer itself: the browser's to know
            return _json(exc.status, {"error": "upstream refused the offer"})
        # Anything else is the server's (its key refused, OpenAI down, a 201 without a call id)
        return _upstream_failed(exc, "upstream unavailable" if exc.status is None else "upstream error")
    return web.Response(
        status=201, text=answer, content_type="application/sdp", headers={"Location": f"/rtc/calls/{call_id}"}
    )


async def rtc_sessions(request: web.Request) -> web.Response:
    """``POST /rtc/sessions`` — ephemeral key + single-use handoff ticket for a browser-first call."""
    service = request.app[SERVICE]
    refused = await _browser_gate(request, service)
    if refused is not None:
        return refused
    if _media_type(request) != "application/json":
        return _refuse(service, 415, "content-type must be application/json", event="rtc.rejected")
    busy = _busy(service)
    if busy is not None:
        return busy
    try:
        body = await service.rtc_session()
    except SessionConfigError as exc:
        log.error("rtc.config_invalid", error=str(exc))
        return _json(500, {"error": "session config invalid"})
    except UpstreamError as exc:
        log.error("rtc.mint_failed", status=exc.status, error=str(exc))
        return _upstream_failed(exc, "could not mint a client secret")
    return _json(200, body, {"Cache-Control": "no-store"})


def _upstream_failed(exc: UpstreamError, error: str) -> web.Response:
    """A browser's request OpenAI failed: ``503`` with a ``Retry-After`` (OpenAI's, else 1 s; 60 s at
    most) when a later attempt may well succeed and this one did nothing (a rate limit's 429, a 5xx but
    a gateway's 502/504, no connection made): the browser may try again. Otherwise ``502`` with
    ``error`` (the server's key refused, the project out of credit, an answer that went missing)."""
    if exc.retryable and not exc.maybe_carried_out:
        wait = min(60, max(1, math.ceil(exc.retry_after or 1)))
        busy = "upstream busy" if exc.status == 429 else "upstream unavailable"
        return _json(503, {"error": busy}, {"Retry-After": str(wait)})
    return _json(502, {"error": error})


async def rtc_handoff(request: web.Request) -> web.Response:
    """``POST /rtc/handoff`` ``{call_id, ticket}`` — attach to a browser-started call."""
    service = request.app[SERVICE]
    # (served while draining: its call is up at OpenAI already, and gets the rest of the window, as a
    # call a webhook in flight accepts does)
    refused = await _browser_gate(request, service, draining_refused=False)
    if refused is not None:
        return refused
    if _media_type(request) != "application/json":
        return _refuse(service, 415, "content-type must be application/json", event="rtc.rejected")
    raw = await _body(request, service, 8192, event="rtc.rejected")
    if isinstance(raw, web.Response):
        return raw
    try:
        data = jsonio.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _refuse(service, 400, "body must be JSON {call_id, ticket}", event="rtc.rejected")
    if not isinstance(data, dict):
        return _refuse(service, 400, "body must be JSON {call_id, ticket}", event="rtc.rejected")
    call_id = rtc_call_id(data.get("call_id"))
    if call_id is not None:
        request[_LOG_IDS] = {"call_id": call_id}
    return _reply(await service.rtc_handoff(data.get("call_id"), data.get("ticket")))


async def _browser_gate(
    request: web.Request, service: Service, *, draining_refused: bool = True
) -> web.Response | None:
    """The refusal for a WebRTC request, or ``None`` to serve it: closed without the app's
    ``authorize_browser`` hook (404), refused by it (403), or draining (503, for a new call). A body
    the hook could not read (not JSON, not the encoding it claims, too large, not all sent within
    :data:`BODY_TIMEOUT`) is refused as a route refuses it (400, 413, 408)."""
    if not service.app.browsers_allowed:
        service.refused["rtc.closed", 404] += 1
        return _json(404, {"error": "not found"})
    if not request.content.is_eof():
        # A body still coming is read first, under the routes' deadline for a body: the hook's time is
        # for its decision, and a body sent too slowly is the sender's doing (408), not a failing hook.
        body = await _body(request, service, _max_body(service.settings), event="rtc.rejected")
        if isinstance(body, web.Response):
            return body
        request._read_bytes = body  # (what the hook's ``await request.json()`` and the route read)
    try:
        allowed = await service.app.authorize(request, report=log_blocked(log, hook="authorize_browser"))
    except HookTimeout as exc:
        log.error("rtc.authorize_failed", error="timeout", budget_s=exc.budget, started=exc.started)
        service.refused["rtc.authorize_failed", 503] += 1
        return _json(503, {"error": "authorization unavailable"})
    except BaseException as exc:  # its backend (a session store…) failed; a SystemExit is a failure too
        unread = _unread_by_hook(request, exc)
        if unread is not None:  # (the sender's doing, as often as it likes: not the hook's failure)
            return await _unread(request, service, unread, _max_body(service.settings), "rtc.rejected")
        if isinstance(exc, web.HTTPException) and 300 <= exc.status < 500:
            # Its own answer (aiohttp-security's ``check_authorized`` raises 401; a login check may
            # redirect): given as it is, headers and all.
            log.warning("rtc.unauthorized", status=exc.status, reason=exc.reason)
            service.refused["rtc.unauthorized", exc.status] += 1
            raise
        if isinstance(exc, asyncio.CancelledError) and not own_cancellation(exc):
            raise
        if _body_not_json(request, exc):  # (the sender's doing, as often as it likes: not an error)
            return _refuse(service, 400, "body is not JSON", event="rtc.rejected")
        logged = service.settings.log_tool_arguments
        log.error("rtc.authorize_failed", **failure_fields(exc, message=logged, full=logged))
        service.refused["rtc.authorize_failed", 503] += 1
        return _json(503, {"error": "authorization unavailable"})
    if not allowed:
        return _refuse(service, 403, "not authorized", event="rtc.unauthorized")
    if service.draining and draining_refused:
        service.refused["rtc.draining", 503] += 1
        log.info("rtc.draining", path=request.path)
        return _json(503, {"error": "draining"})
    return None


def _unread_by_hook(
    request: web.Request, exc: BaseException
) -> web.HTTPRequestEntityTooLarge | _BadBody | None:
    """What an ``authorize_browser`` hook's ``await request.json()`` (or ``read()``, ``text()``…) of the
    request's body failed on, as :func:`_read_body` would have: a body over the app's
    ``client_max_size``, one that does not match its encoding, a client gone before sending all of it.
    ``None`` for any other failure (the hook's own)."""
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return exc
    if not isinstance(exc, Exception) or exc is not request.content.exception():  # (not the body's)
        return None
    if isinstance(exc, ConnectionError):
        return _ClientGone()
    if isinstance(exc, RequestPayloadError | HttpProcessingError):
        return _BadBody()
    return None


def _max_body(settings: Settings) -> int:
    """The largest body aiohttp reads for a handler (``client_max_size``): the largest a route takes."""
    return max(settings.webhook_max_body, _MAX_SDP)


def _body_not_json(request: web.Request, exc: BaseException) -> bool:
    """Whether an ``authorize_browser`` hook failed on ``await request.json()`` of a JSON request whose
    body is not JSON: the request's fault, not the hook's. The body is read as aiohttp's ``json()``
    reads it (its declared charset, Python's parser and its limits); a hook whose backend answered
    something that is not JSON, about a body that is, still failed."""
    body = request._read_bytes
    if not isinstance(exc, ValueError | RecursionError | LookupError) or body is None:
        return False
    if _media_type(request) != "application/json":
        return False
    try:
        json.loads(body.decode(request.charset or "utf-8"))
    except (ValueError, RecursionError, LookupError):  # (UnicodeDecodeError, a charset unknown)
        return True
    return False


def _busy(service: Service) -> web.Response | None:
    """``503`` for a browser's new call while this instance has ``SIDEBAND_MAX_CALLS`` calls (a handoff
    is served all the same: its call was started with a key minted while there was room)."""
    if not service.full():
        return None
    service.refused["rtc.busy", 503] += 1
    log.warning("rtc.busy", live=len(service.registry), max_calls=service.settings.max_calls)
    return _json(503, {"error": "busy"}, {"Retry-After": "5"})


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz`` — the process is alive."""
    return _json(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz`` — 200 while taking calls, 503 while draining.

    A full instance (``SIDEBAND_MAX_CALLS``) stays ready, saying ``"full": true``: taken out of a load
    balancer, its webhooks would find no instance when all are full, and callers would ring out
    instead of hearing busy at once. A claim store outage does not count either: the store is shared,
    so every instance would go unready at once, while handoffs of live calls are still served."""
    service = request.app[SERVICE]
    body = {"calls": len(service.registry), "full": service.full()}
    if service.draining:
        return _json(503, {"status": "draining", **body})
    return _json(200, {"status": "ready", **body})


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics`` — Prometheus text: live calls and outcome counters."""
    service = request.app[SERVICE]
    lines = [
        "# TYPE sideband_calls_live gauge",
        f"sideband_calls_live {len(service.registry)}",
        "# TYPE sideband_requests_in_flight gauge",  # (this one included)
        f"sideband_requests_in_flight {service.requests}",
        "# TYPE sideband_events_total counter",
    ]
    lines += [f'sideband_events_total{{outcome="{k}"}} {v}' for k, v in sorted(service.counters.items())]
    lines.append("# TYPE sideband_calls_ended_total counter")
    ended = sorted(service.registry.ended.items())  # (the end reasons, and "app" for an app's own)
    lines += [f'sideband_calls_ended_total{{reason="{label(k)}"}} {v}' for k, v in ended]
    lines.append("# TYPE sideband_requests_refused_total counter")
    refused = sorted(service.refused.items())
    lines += [f'sideband_requests_refused_total{{event="{e}",status="{c}"}} {v}' for (e, c), v in refused]
    lines += service.accept_seconds.lines("sideband_accept_seconds")
    lines += service.registry.tools.lines()
    lines += service.registry.usage.lines()
    lines += service.registry.turn_seconds.lines("sideband_turn_seconds")
    lines.append("# TYPE sideband_guardrail_trips_total counter")
    trips = sorted(service.registry.guardrail_trips.items())  # (names from app code: escaped)
    lines += [f'sideband_guardrail_trips_total{{guardrail="{label(k)}"}} {v}' for k, v in trips]
    lines.append("# TYPE sideband_route_reloads_total counter")
    lines += [
        f'sideband_route_reloads_total{{outcome="{k}"}} {v}' for k, v in sorted(service.route_reloads.items())
    ]
    lines.append("# TYPE sideband_routes_last_reload_successful gauge")
    lines.append(f"sideband_routes_last_reload_successful {int(service.routes_reload_ok)}")
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    service = request.app[SERVICE]
    service.request_started()  # (a shutdown lets requests in flight finish: one may be accepting a call)
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except StoreUnavailable as exc:  # the sender tries again later (perhaps on another instance)
        log.warning("store.unavailable", path=request.path, error=str(exc), **request.get(_LOG_IDS, {}))
        service.refused["store.unavailable", 503] += 1
        return _json(503, {"error": "claim store unavailable"}, {"Retry-After": "1"})
    except Exception:
        log.exception("http.internal_error", path=request.path, **request.get(_LOG_IDS, {}))
        return _json(500, {"error": "internal error"})
    finally:
        service.request_done()


def create_app(
    settings: Settings,
    app: Sideband,
    *,
    store: ClaimStore | None = None,
    service: Service | None = None,
) -> web.Application:
    """The aiohttp application serving ``app`` with ``settings`` (see README for the routes).

    Configure structlog first (``sideband serve`` does): the app binds its loggers once, here."""
    if settings.openai_webhook_secret is None:
        raise SettingsError("OPENAI_WEBHOOK_SECRET is not set")
    web_app = web.Application(
        middlewares=[_errors],
        client_max_size=_max_body(settings),
        # Idle keep-alive connections close after 75 s: longer than load balancers' usual 60 s (so they
        # never reuse one being closed), far shorter than aiohttp's hour. A request answered without its
        # body being read (a refusal, a 404) closes its connection at once: aiohttp would otherwise read
        # (and decompress, on the event loop) the rest for 10 s more, and a small gzip body can inflate
        # to gigabytes. At most 64 header lines (aiohttp allows 128 of 8 KiB each, held per connection).
        handler_args={"keepalive_timeout": 75.0, "lingering_time": 0.0, "max_headers": 64},
    )
    svc = service or Service(settings, app, store=store)
    web_app[SERVICE] = svc
    web_app[_LOG] = log.bind()
    web_app[_VERIFIER] = Verifier(
        settings.openai_webhook_secret.get_secret_value(), settings.webhook_tolerance
    )

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await svc.start()
        yield
        await svc.close()

    web_app.cleanup_ctx.append(lifecycle)
    web_app.router.add_post("/webhooks/openai", webhook)
    web_app.router.add_post("/rtc/calls", rtc_calls)
    web_app.router.add_post("/rtc/sessions", rtc_sessions)
    web_app.router.add_post("/rtc/handoff", rtc_handoff)
    web_app.router.add_get("/healthz", healthz)
    web_app.router.add_get("/readyz", readyz)
    web_app.router.add_get("/metrics", metrics)
    return web_app
