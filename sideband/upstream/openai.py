"""OpenAI Realtime call control (REST, one shared aiohttp session) and the sideband connector."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import os
import random
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
from websockets.exceptions import InvalidProxyStatus, InvalidStatus
from websockets.proxy import Proxy

from sideband import jsonio
from sideband.upstream._ws import MAX_MESSAGE, PushConnection, open_socket, ws_url

__all__ = ["CallControl", "CallGone", "SidebandRefused", "UpstreamError", "connect_sideband"]

T = TypeVar("T")


# aiohttp's own request timer swallows a cancellation that lands as it fires (its context is entered
# twice per request, and each exit takes back one cancel request): a shutdown cutting a hangup short
# would see the hangup try again. Requests run untimed by aiohttp, under ``asyncio.timeout``.
UNTIMED = aiohttp.ClientTimeout()

_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)\S*@")  # up to the last @: a password may hold @ or /


def why(exc: BaseException) -> str:
    """``Type: message`` on one line (the errno text of an OSError, aiohttp's "Cannot connect to host…"):
    what an operator needs to tell "too many open files" from "connection refused"."""
    text = _USERINFO.sub(r"\1", " ".join(str(exc).split()))  # never a proxy's user:password@
    # aiohttp keeps the socket's OSError aside (and uvloop words it "Connect call failed"): its errno says
    # (a resolver's negative codes are no errno: its own text says it)
    err = getattr(exc, "os_error", None) if not isinstance(exc, OSError) else exc
    errno = err.errno if isinstance(err, OSError) and not isinstance(err, socket.gaierror) else None
    if errno is not None and errno > 0 and os.strerror(errno) not in text:
        text += f" ({os.strerror(errno)})"
    why = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return why if len(why) <= 300 else why[:299] + "…"


QUOTA_SPENT = "insufficient_quota"
"""The code of OpenAI's 429 to every request of a project with no credit left (not a rate limit)."""
REGION_REFUSED = "unsupported_country_region_territory"
"""The code of OpenAI's 403 to requests from a country or region it does not serve."""


def hint(status: int, body: str) -> str:
    """For a refusal no retry mends, what the operator should check, to follow an error's status: the
    key (401, 403), the project's credit (429 ``insufficient_quota``), where requests come from (403
    ``unsupported_country_region_territory``), the base URL (404 ``Invalid URL``). Else OpenAI's own
    ``error.message`` (which voice, model or field it refused), or ``""`` for a body without one."""
    if status == 403 and error_code(body) == REGION_REFUSED:
        return (
            ": OpenAI does not serve the country or region this server's requests come from (check the "
            "host's network or proxy)"
        )
    if status == 429 and error_code(body) == QUOTA_SPENT:
        return ": the OpenAI project of OPENAI_API_KEY has no credit left (check its plan and billing)"
    if status == 401:
        return ": OpenAI refused the API key (check OPENAI_API_KEY)"
    if status == 403:
        return (
            ": the API key may not do this (check OPENAI_API_KEY: a key of another project or organization?)"
        )
    misdirected = wrong_url(status, body)
    if misdirected:
        return misdirected
    message = error_message(body)
    return f": {message}" if message else ""


def _error_field(body: str, name: str) -> str | None:
    """``error.<name>`` of an OpenAI error body (``{"error": {"message", "code", …}}``) if it is a string.
    Any other body (not JSON, nested too deeply for the parser, another shape) has none."""
    try:
        value = jsonio.loads(body)["error"][name]
    except (ValueError, TypeError, KeyError):
        return None
    return value if isinstance(value, str) else None


def error_code(body: str) -> str | None:
    """The ``error.code`` of an OpenAI error body (``model_not_found``…), else ``None``."""
    return _error_field(body, "code")


def error_message(body: str) -> str | None:
    """The ``error.message`` of an OpenAI error body (``{"error": {"message": …}}``) on one line, at most
    300 characters; ``None`` for any other body (a proxy's page, an empty one)."""
    message = _error_field(body, "message")
    if message is None or not message.strip():
        return None
    message = " ".join(message.split())
    return message if len(message) <= 300 else message[:299] + "…"


def wrong_url(status: int, body: str) -> str:
    """For a 404 whose body is OpenAI's answer to a path it does not serve (``Invalid URL (POST /…)``),
    what the operator should check: the base URL is wrong, the call is not gone. Else ``""``."""
    if status != 404 or "Invalid URL" not in body:
        return ""
    message = error_message(body)
    if message is None or not message.startswith("Invalid URL"):
        return ""
    return f": {message[:200]} (check OPENAI_BASE_URL: OpenAI's is https://api.openai.com/v1)"


def proxy_names(url: str) -> str:
    """The variables that name the proxy for ``url`` (OpenAI's base or sideband URL), for a message."""
    if url.startswith(("https://", "wss://")):
        return "WSS_PROXY or HTTPS_PROXY"
    return "WS_PROXY, HTTPS_PROXY or HTTP_PROXY"


def proxy_hint(status: int, names: str, *, to: str = "OpenAI") -> str:
    """For a proxy's refusal no retry mends (407: its credentials, 403: its rules), what the operator
    should check, ``names`` the variables that name it (:func:`proxy_names`). Else ``""``."""
    if status == 407:
        return f": the proxy refused its credentials (check the user:password of its URL: {names})"
    if status == 403:
        return f": the proxy does not let this host reach {to} (check its rules, or the proxy URL: {names})"
    return ""


def proxy_route(proxy: Proxy | None, url: str) -> tuple[dict[str, Any], dict[str, str]]:
    """How aiohttp's requests to ``url`` go through ``proxy`` (``None``: directly): the keyword arguments
    of each request (``proxy``, and its credentials as ``proxy_headers``, on the ``CONNECT`` only, for a
    URL reached over TLS: ``https://``, or ``wss://``, which aiohttp sends alike), and the headers each
    request carries itself (the credentials, for a plain-HTTP URL: such a request goes to the proxy
    itself, which reads them off it). Never the credentials inside a tunnel. Raises :class:`ValueError`
    for a proxy that cannot carry HTTP requests (SOCKS)."""
    if proxy is None:
        return {}, {}
    if proxy.scheme not in ("http", "https"):
        raise ValueError(f"a {proxy.scheme} proxy cannot carry HTTP requests")
    host = f"[{proxy.host}]" if ":" in proxy.host else proxy.host
    via: dict[str, Any] = {"proxy": f"{proxy.scheme}://{host}:{proxy.port}"}
    if proxy.user_info is None:
        return via, {}
    auth = {"Proxy-Authorization": aiohttp.encode_basic_auth(*proxy.user_info)}
    if url.startswith(("https://", "wss://")):
        via["proxy_headers"] = auth
        return via, {}
    return via, auth


def refused_tunnel(what: str, status: int, reason: str, names: str, *, to: str = "OpenAI") -> UpstreamError:
    """The error for a proxy that answered the ``CONNECT`` to ``to`` with ``status``: nothing reached it
    (``unsent``); its 407 or 403 is not tried again (:attr:`UpstreamError.retryable`)."""
    message = f"{what} failed: the proxy did not open the tunnel to {to}: {status}"
    if reason := " ".join(reason.split())[:100]:
        message += f" {reason}"
    return UpstreamError(message + proxy_hint(status, names, to=to), status, unsent=True)


ERROR_BODY = 64 * 1024
"""At most this much of an error's body is read (its message, a proxy's page)."""
ERROR_BODY_WAIT = 1.0
"""Seconds an error's body is waited for once its status is in (within the attempt's own time)."""
DROP_BUDGET = 3.0
"""Seconds spent hanging up a WebRTC call created whose SDP answer was lost."""


async def error_body(resp: aiohttp.ClientResponse, into: bytearray) -> None:
    """Read the body of an error answer into ``into``: at most :data:`ERROR_BODY`, for at most
    :data:`ERROR_BODY_WAIT` seconds. A body cut short or stalled keeps what came of it: the status is
    what counts, and must not be lost with it."""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with asyncio.timeout(ERROR_BODY_WAIT):
            while len(into) < ERROR_BODY:
                chunk = await resp.content.read(ERROR_BODY - len(into))
                if not chunk:
                    break
                into += chunk


def created_call_id(location: str) -> str | None:
    """The call id at the end of a created call's ``Location`` (``/v1/realtime/calls/rtc_…``, a query
    no part of it), or ``None`` for one without (or one no URL parser reads)."""
    try:
        path = urlsplit(location).path
    except ValueError:  # (``http://[gw/…``)
        return None
    call_id = path.rstrip("/").rsplit("/", 1)[-1]
    return call_id if call_id.startswith("rtc_") else None


class _Sending:
    """How far one request got, as its session's trace (:func:`trace_sending`) reports it: ``sent`` once
    its headers are handed to a connection made (any proxy tunnel opened, any TLS handshake done). Until
    then nothing reached OpenAI: a failure then (a resolver, a connection, a handshake or a proxy that
    stalls) left nothing that could be carried out."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False

    @property
    def unsent_note(self) -> str:
        """What a failure's message adds when the request never left."""
        return "" if self.sent else " (before the request was sent)"


class _SendingTrace(aiohttp.TraceConfig):
    """The trace that tells a :class:`_Sending` its request left."""


async def _headers_sent(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestHeadersSentParams
) -> None:
    sending = context.trace_request_ctx
    if isinstance(sending, _Sending):
        sending.sent = True


def trace_sending(session: aiohttp.ClientSession) -> None:
    """Have ``session`` tell each request's :class:`_Sending` (its ``trace_request_ctx``) when it leaves
    (once per session: a no-op on one that does already)."""
    configs = session.trace_configs
    if any(isinstance(config, _SendingTrace) for config in configs):
        return
    config = _SendingTrace()
    config.on_request_headers_sent.append(_headers_sent)
    config.freeze()
    configs.append(config)


class UpstreamError(Exception):
    """OpenAI answered with an error status (``status``) or could not be reached (``status`` None).
    ``retry_after``: the seconds its ``Retry-After`` header asked to wait, if it sent one. ``unsent``: the
    request never left (no connection could be made to OpenAI or the proxy; the name lookup, connection,
    TLS handshake or proxy tunnel stalled past the attempt's time; or the proxy refused to open the
    tunnel to OpenAI: ``status`` is then the proxy's, 407 for its credentials, 403 for its policy, 502 or
    503 when it could not reach OpenAI). An error status is kept even when its body is then cut short or
    stalls (``body`` holds what came). ``call_id``: the call a relayed offer created before its answer
    was lost (the call then hung up, as the message says; ``call_up``: that hangup failed, and the call
    may be up still)."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        body: str = "",
        *,
        retry_after: float | None = None,
        unsent: bool = False,
        call_id: str | None = None,
        call_up: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body[:500]
        self.retry_after = retry_after
        self.unsent = unsent
        self.call_id = call_id
        self.call_up = call_up

    @property
    def retryable(self) -> bool:
        """Worth another attempt: no answer, 408, 409, 429 (but a project with no credit left) or 5xx (a
        proxy's refusal of the tunnel as well: its 407 or 403 is no more worth another attempt)."""
        status = self.status
        if status == 429:
            return error_code(self.body) != QUOTA_SPENT
        return status is None or status in (408, 409) or status >= 500

    @property
    def maybe_carried_out(self) -> bool:
        """The attempt may have been carried out all the same: it went unanswered (sent, or maybe sent,
        but no answer came), or a gateway in front of OpenAI gave up on it (502, 504) after passing it on.
        Never one that was not sent (:attr:`unsent`)."""
        return not self.unsent and (self.status is None or self.status in (502, 504))

    @property
    def offer_refused(self) -> bool:
        """A WebRTC offer relayed to ``/realtime/calls`` was refused for what it is (400, 413, 415, 422):
        the browser's to know, not the server's fault. (Not a proxy's refusal of the tunnel.)"""
        return not self.unsent and self.status in (400, 413, 415, 422)

    @property
    def maybe_done_already(self) -> bool:
        """A call verb refused the way it may be when an earlier attempt of it went through (400, 409,
        412, 422; PROTOCOL does not say which): after an unanswered attempt, the call is not ringing any
        more most likely because it was accepted. (Not a proxy's refusal of the tunnel.)"""
        return not self.unsent and self.status in (400, 409, 412, 422)


class CallGone(UpstreamError):
    """The call no longer exists (404/410): stop, never retry."""


class SidebandRefused(UpstreamError):
    """The sideband handshake was refused with a status other than 404/410."""


class CallControl:
    """accept / reject / refer / hangup, WebRTC call creation and client secrets.

    ``proxy``: the HTTP(S) proxy for every request (parsed by :func:`websockets.proxy.parse_proxy`, as
    for the sideband WebSockets; its credentials become ``Proxy-Authorization``); ``None`` for a direct
    connection.

    ``unshared``: the session for the requests never sent twice (a REFER, a WebRTC call's creation), whose
    connector should open a connection for each (``force_close``): on a pooled connection the server
    closes, idle, as the request goes out, the request is lost unanswered, and could not be sent again.
    ``http`` by default.
    """

    def __init__(
        self,
        http: aiohttp.ClientSession,
        base_url: str,
        api_key: str,
        proxy: Proxy | None = None,
        *,
        unshared: aiohttp.ClientSession | None = None,
    ) -> None:
        self._http = http
        self._unshared = http if unshared is None else unshared
        for session in {id(http): http, id(self._unshared): self._unshared}.values():
            trace_sending(session)
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        self._proxy_names = proxy_names(self._base)
        self._via, auth = proxy_route(proxy, self._base)
        self._headers.update(auth)
        self._json_headers.update(auth)

    def _hint(self, status: int, body: str) -> str:
        """:func:`hint`, and for a 407 (only ever a proxy's) the proxy setting to check."""
        return proxy_hint(407, self._proxy_names) if status == 407 else hint(status, body)

    async def _post(
        self,
        path: str,
        body: dict[str, Any] | None,
        timeout: float,
        call_id: str | None = None,
        *,
        method: str = "POST",
        once: bool = False,
    ) -> str:
        taken = False
        sending = _Sending()
        refused: int | None = None  # an error status, once it is in: losing its body must not lose it
        wait: float | None = None
        error = bytearray()
        try:
            async with (
                asyncio.timeout(timeout),
                (self._unshared if once else self._http).request(
                    method,
                    self._base + path,
                    data=None if body is None else jsonio.dumps(body),
                    headers=self._headers if body is None else self._json_headers,
                    timeout=UNTIMED,
                    allow_redirects=False,
                    trace_request_ctx=sending,
                    **self._via,
                ) as resp,
            ):
                if resp.status < 300 and call_id is not None:
                    # The verb was taken; its body says nothing more. Losing the body (cut, stalled) must
                    # not make it look undone: an accept tried again could be refused, the call rejected.
                    taken = True
                    with contextlib.suppress(aiohttp.ClientError):
                        await resp.read()
                    return ""
                if resp.status < 300:
                    return (await resp.read()).decode("utf-8", "replace")
                refused = resp.status
                wait = retry_after(resp.headers.get("Retry-After"))
                await error_body(resp, error)
        except TimeoutError:
            if taken:
                return ""
            if refused is None:
                message = f"{method} {path} timed out after {timeout:g} s"
                raise UpstreamError(message + sending.unsent_note, unsent=not sending.sent) from None
        except aiohttp.ClientConnectorError as exc:  # (no connection: the request never left)
            raise UpstreamError(f"{method} {path} failed: {why(exc)}", unsent=True) from None
        except aiohttp.ClientHttpProxyError as exc:  # (the proxy refused the tunnel: the same)
            raise refused_tunnel(f"{method} {path}", exc.status, exc.message, self._proxy_names) from None
        except aiohttp.ClientError as exc:
            if refused is None:
                message = f"{method} {path} failed: {why(exc)}"
                raise UpstreamError(message + sending.unsent_note, unsent=not sending.sent) from None
        text = error.decode("utf-8", "replace")  # a proxy's error page may be binary
        misdirected = wrong_url(refused, text)
        if refused in (404, 410) and call_id is not None and not misdirected:
            raise CallGone(f"call {call_id} not found", refused, text)
        raise UpstreamError(
            f"{method} {path} answered {refused}{self._hint(refused, text)}", refused, text, retry_after=wait
        )

    @property
    def calls_url(self) -> str:
        """Where a browser creates a WebRTC call (``POST`` its SDP offer, with an ephemeral key)."""
        return self._base + "/realtime/calls"

    def _call_path(self, call_id: str, verb: str) -> str:
        return f"/realtime/calls/{quote(call_id, safe='')}/{verb}"

    async def accept(self, call_id: str, session: dict[str, Any], *, timeout: float = 2.0) -> None:
        """Answer a ringing SIP call with ``session`` (already validated)."""
        await self._post(self._call_path(call_id, "accept"), session, timeout, call_id)

    async def reject(self, call_id: str, status_code: int = 603, *, timeout: float = 2.0) -> None:
        """Refuse a ringing call with a SIP status."""
        await self._post(self._call_path(call_id, "reject"), {"status_code": status_code}, timeout, call_id)

    async def refer(self, call_id: str, target_uri: str, *, timeout: float = 5.0) -> None:
        """Transfer the call (SIP REFER) to ``tel:…`` or ``sip:…``."""
        body = {"target_uri": target_uri}
        await self._post(self._call_path(call_id, "refer"), body, timeout, call_id, once=True)

    async def hangup(self, call_id: str, *, timeout: float = 5.0) -> None:
        """End the call (SIP or WebRTC)."""
        await self._post(self._call_path(call_id, "hangup"), None, timeout, call_id)

    async def create_call(
        self, sdp: str, session: dict[str, Any], *, timeout: float = 10.0
    ) -> tuple[str, str]:
        """Relay a browser's SDP offer (unified interface). Returns ``(call_id, sdp_answer)``.

        Never retried: a retry could create a second call. A call created whose SDP answer is then lost
        (cut short, or late) is hung up (best effort, :data:`DROP_BUDGET` seconds): no browser can join it,
        and nobody would control it; the error raised names it and says how its hangup went.
        """
        form = aiohttp.FormData()
        form.add_field("sdp", sdp, content_type="application/sdp")
        form.add_field("session", jsonio.dumps(session).decode(), content_type="application/json")
        sending = _Sending()
        refused: int | None = None
        error = bytearray()
        call_id: str | None = None  # the call created, once its Location is in
        lost = ""  # how its SDP answer was lost
        wait: float | None = None  # what a refusal's Retry-After asks
        try:
            async with (
                asyncio.timeout(timeout),
                self._unshared.post(
                    self._base + "/realtime/calls",
                    data=form,
                    headers=self._headers,
                    timeout=UNTIMED,
                    allow_redirects=False,
                    trace_request_ctx=sending,
                    **self._via,
                ) as resp,
            ):
                if resp.status == 201:
                    location = resp.headers.get("Location", "")
                    call_id = created_call_id(location)
                    if call_id is None:
                        message = f"POST /realtime/calls gave no call id in Location ({location[:200]!r})"
                        raise UpstreamError(message, 201)
                    return call_id, (await resp.read()).decode("utf-8", "replace")
                refused = resp.status
                wait = retry_after(resp.headers.get("Retry-After"))
                await error_body(resp, error)
        except TimeoutError:
            lost = f"timed out after {timeout:g} s"
            if refused is None and call_id is None:
                message = "POST /realtime/calls " + lost + sending.unsent_note
                raise UpstreamError(message, unsent=not sending.sent) from None
        except aiohttp.ClientHttpProxyError as exc:
            raise refused_tunnel("POST /realtime/calls", exc.status, exc.message, self._proxy_names) from None
        except aiohttp.ClientError as exc:
            lost = why(exc)
            if refused is None and call_id is None:
                unsent = isinstance(exc, aiohttp.ClientConnectorError) or not sending.sent
                raise UpstreamError(f"POST /realtime/calls failed: {lost}", unsent=unsent) from None
        if call_id is not None:
            raise await self._drop_created(call_id, lost)
        assert refused is not None  # (every other way out has returned or raised)
        text = error.decode("utf-8", "replace")
        raise UpstreamError(
            f"POST /realtime/calls answered {refused}{self._hint(refused, text)}",
            refused,
            text,
            retry_after=wait,
        )

    async def _drop_created(self, call_id: str, lost: str) -> UpstreamError:
        """Hang up ``call_id``, created but its SDP answer ``lost``: the error to raise says how it went."""
        message = f"POST /realtime/calls created call {call_id}, its SDP answer lost ({lost}): "
        up = False
        try:
            await with_retries(
                lambda seconds: self.hangup(call_id, timeout=seconds),
                budget=DROP_BUDGET,
                attempt_timeout=DROP_BUDGET / 2,
            )
        except CallGone:
            message += "it is gone"
        except UpstreamError as exc:
            message += f"its hangup failed ({exc}): it may be up still"
            up = True
        else:
            message += "hung up"
        return UpstreamError(message, call_id=call_id, call_up=up)

    async def client_secret(
        self, session: dict[str, Any], ttl: int, *, timeout: float = 5.0
    ) -> dict[str, Any]:
        """Mint an ephemeral key for a browser (``value``, ``expires_at``, ``session``)."""
        body = {"expires_after": {"anchor": "created_at", "seconds": ttl}, "session": session}
        text = await self._post("/realtime/client_secrets", body, timeout)
        try:
            data = jsonio.loads(text)
        except ValueError:  # e.g. a proxy's error page answered with 200
            raise UpstreamError("client_secrets answered 200 with a body that is not JSON", 200) from None
        if not isinstance(data, dict) or not isinstance(data.get("value"), str):
            raise UpstreamError("client_secrets answered without a value", 200)
        return data

    async def model(self, name: str, *, timeout: float = 5.0) -> None:
        """Whether the key may use the model ``name`` (``GET /models/{name}``): returns if it may, raises
        :class:`UpstreamError` otherwise (404: no such model, or not for this key)."""
        await self._post(f"/models/{quote(name, safe='')}", None, timeout, method="GET")


async def with_retries(
    attempt: Callable[[float], Awaitable[T]],
    *,
    budget: float,
    attempt_timeout: float,
    on_retry: Callable[[int, UpstreamError], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    once: bool = False,
) -> T:
    """Run ``attempt(timeout)`` until it succeeds, a non-retryable error occurs, or ``budget`` seconds
    are spent. Backoff 50 ms doubling with jitter; each attempt's timeout is clipped to what is left.

    ``once``: what the attempt asks must not be carried out twice (a REFER reaches the carrier each time):
    an attempt that may have been carried out (:attr:`UpstreamError.maybe_carried_out`) is not tried
    again; its error is raised."""
    deadline = clock() + budget
    delay = 0.05
    tries = 0
    last = False  # the next attempt is the last one (a Retry-After asked for more than the budget)
    task = asyncio.current_task()
    baseline = task.cancelling() if task is not None else 0
    while True:
        tries += 1
        left = deadline - clock()
        try:
            return await attempt(min(attempt_timeout, max(left, 0.05)))
        except CallGone:
            raise
        except UpstreamError as exc:
            if task is not None and task.cancelling() > baseline:
                # Cancelled meanwhile, and a library turned it into a failure (aiohttp's happy eyeballs
                # reaping its losing connection attempts can absorb a cancel): no retry, the cancel stands.
                raise asyncio.CancelledError from None
            left = deadline - clock()
            if not exc.retryable or last or (once and exc.maybe_carried_out):
                raise
            wait = delay * (0.5 + random.random() / 2)
            if exc.retry_after:  # as long as the server asks; past the budget, one last try at its end
                keep = max(min(attempt_timeout, left / 2), _LAST_TRY)  # (time enough to be answered)
                if exc.retry_after < left - keep:
                    wait = max(wait, exc.retry_after)
                else:
                    wait, last = max(left - keep, 0.0), True
            if left <= wait:
                raise
            if on_retry is not None:
                on_retry(tries, exc)
            await asyncio.sleep(wait)
            delay = min(delay * 2, 1.0)


# When a Retry-After asks for more than the budget has left, the last attempt keeps half of what is left
# (at most an attempt's timeout, at least this many seconds).
_LAST_TRY = 0.25


def retry_after(value: str | None, *, now: Callable[[], float] = time.time) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delay-seconds or an HTTP date), at most an hour;
    None when there is none or it cannot be read."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - now()
    return min(max(seconds, 0.0), 3600.0)


def sideband_url(base_url: str) -> str:
    """The sideband WebSocket URL derived from the REST base (``https→wss``, ``http→ws``) + ``/realtime``."""
    return ws_url(base_url) + "/realtime"


async def connect_sideband(
    url: str,
    call_id: str,
    api_key: str,
    *,
    compression: bool = False,
    open_timeout: float = 5.0,
    proxy: str | None = None,
    tls: ssl.SSLContext | None = None,
) -> PushConnection:
    """Open the call-scoped WebSocket: Bearer key, no ``OpenAI-Beta`` header.

    ``proxy``: an explicit proxy URL (see :func:`~sideband.upstream._ws.resolve_proxy`), or ``None``.
    ``tls``: the shared client TLS context for ``wss://`` (see :func:`~sideband.upstream._ws.client_tls`).

    Raises :class:`CallGone` on 404/410, :class:`SidebandRefused` on another refusal and
    :class:`UpstreamError` when the server cannot be reached.
    """
    try:
        return await open_socket(
            f"{url}?call_id={quote(call_id, safe='')}",
            api_key,
            compression=compression,
            open_timeout=open_timeout,
            max_size=MAX_MESSAGE,
            proxy=proxy,
            tls=tls,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        body = exc.response.body.decode("utf-8", "replace") if exc.response.body else ""
        misdirected = wrong_url(status, body)
        if status in (404, 410) and not misdirected:
            raise CallGone(f"sideband refused: call {call_id} not found", status, body) from None
        wait = retry_after(exc.response.headers.get("Retry-After"))
        message = f"sideband refused with {status}{hint(status, body)}"
        raise SidebandRefused(message, status, body, retry_after=wait) from None
    except InvalidProxyStatus as exc:  # (the proxy refused the tunnel: nothing reached OpenAI)
        response = exc.response
        names = proxy_names(url)
        raise refused_tunnel(
            "sideband connect", response.status_code, response.reason_phrase, names
        ) from None
    except (OSError, TimeoutError) as exc:
        raise UpstreamError(f"sideband connect failed: {why(exc)}") from None
    except Exception as exc:  # websockets raises InvalidHandshake/InvalidMessage subclasses too
        raise UpstreamError(f"sideband connect failed: {why(exc)}") from None
