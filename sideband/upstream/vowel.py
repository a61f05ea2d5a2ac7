"""vowel self-hosted engine: the core's token mint (REST) and the engine's realtime socket.

Only this module knows the vowel URLs and what their HTTP statuses mean. A token is a bearer secret: it
never appears in a ``repr``, a log line or an exception message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import ssl
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
from websockets.exceptions import InvalidMessage, InvalidStatus
from websockets.proxy import Proxy

from sideband import jsonio
from sideband.upstream._ws import (
    MAX_MESSAGE,
    PushConnection,
    http_proxy,
    open_socket,
    resolve_proxy,
    ws_proxy_names,
    ws_url,
)
from sideband.upstream.openai import (
    UNTIMED,
    UpstreamError,
    error_body,
    proxy_route,
    refused_tunnel,
    retry_after,
    why,
)

__all__ = [
    "EngineRefused",
    "MintFailed",
    "MintRefused",
    "Token",
    "VowelCore",
    "connect_engine",
    "core_proxy",
    "engine_socket_url",
    "parse_mint_answer",
    "token_claims",
    "trusted_session_request",
]

TRUSTED_SCOPE = "mint_trusted_session"


class MintFailed(UpstreamError):
    """The core answered the mint with an error status other than 401/403 (``status``), honouring its
    ``Retry-After`` (``retry_after``). Only a 429 or a 5xx is worth another attempt: any other 4xx is
    the request's own fault, and a redirect is not followed."""

    @property
    def retryable(self) -> bool:
        """429 or 5xx."""
        status = self.status
        return status is not None and (status == 429 or status >= 500)


class MintRefused(UpstreamError):
    """The core refused to mint (401 bad key, 403 missing scope or another refusal the core's message
    names). ``reason`` is a short machine name."""

    def __init__(self, message: str, status: int, reason: str, body: str = "") -> None:
        super().__init__(message, status, body)
        self.reason = reason


class EngineRefused(UpstreamError):
    """The engine refused the token at the handshake (401, or the TCP connection closed unanswered)."""

    reason = "token_rejected"


@dataclass(frozen=True, slots=True)
class Token:
    """A minted engine token. ``value`` is secret: left out of ``repr``."""

    value: str = field(repr=False)
    expires_at: float | None
    """Epoch seconds (``None`` when the core did not say)."""
    session_id: str | None = None
    """The session the token is for: the mint answer's, else the token's ``sub`` claim."""
    max_call_duration: float | None = None
    """Seconds: the token's ``maxCallDurationMs`` claim (what the engine enforces), else the mint
    answer's; ``None`` when neither says (the engine's default applies)."""
    max_idle_duration: float | None = None
    """Seconds: the token's ``maxIdleDurationMs`` claim, else the mint answer's (as above)."""

    def expires_in(self, now: float | None = None) -> float | None:
        """Seconds left (negative once expired)."""
        if self.expires_at is None:
            return None
        return self.expires_at - (time.time() if now is None else now)


def trusted_session_request(
    *,
    service_id: str,
    provider: str,
    tools: Sequence[Mapping[str, Any]],
    model: str | None = None,
    voice: str | None = None,
) -> dict[str, Any]:
    """The body of ``POST {core}/v1/realtime/sessions`` for a trusted-server session."""
    config: dict[str, Any] = {"serviceId": service_id, "provider": provider}
    voice_config = {k: v for k, v in (("model", model), ("voice", voice)) if v}
    if voice_config:
        config["voiceConfig"] = voice_config
    config["serverTools"] = [dict(t) for t in tools]
    return {"connectionType": "trusted_server", "config": config}


def _epoch(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = _finite(value)
        if seconds is None:
            return None
        return seconds / 1000 if seconds > 1e11 else seconds  # milliseconds if implausibly large
    if isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            return _epoch(float(text))
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return None
        if parsed.tzinfo is None:
            return None
        return parsed.timestamp()
    return None


def _finite(value: int | float) -> float | None:
    """``value`` as a float, or ``None`` when no float holds it (an integer past 1e308, infinity, NaN)."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _seconds_from_ms(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= sys.float_info.max:
        return float(value) / 1000
    return None


def token_claims(value: str) -> dict[str, Any]:
    """The claims of an engine token, ``ek_`` + a JWT (``<header>.<payload>.<signature>``, base64url),
    read without checking the signature (the engine's secret signs it; the engine checks it). Any other
    shape, or a payload that is not a base64url JSON object, gives ``{}``."""
    if not value.startswith("ek_"):
        return {}
    parts = value[3:].split(".")
    if len(parts) != 3 or not parts[1] or len(parts[1]) > 16384:
        return {}
    payload = parts[1].rstrip("=")
    try:
        raw = base64.b64decode(payload + "=" * (-len(payload) % 4), altchars=b"-_", validate=True)
        claims = jsonio.loads(raw)
    except (binascii.Error, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


def parse_mint_answer(data: Any, now: float | None = None) -> Token:
    """Read a mint answer from the core or the engine: ``token`` or ``client_secret.value`` (or ``value``),
    and ``expiresAt`` (ISO-8601) / ``expires_at`` (epoch) / ``client_secret.expires_at`` / ``expires_in``.

    The token's own claims (:func:`token_claims`) give the session limits, ``maxCallDurationMs`` and
    ``maxIdleDurationMs``: the engine enforces those. Limits in the answer (at its top level or in
    ``claims``) count only where the token carries none. The token's ``exp`` is the expiry when the answer
    states none, and its ``sub`` the session id when the answer names none.

    Raises :class:`UpstreamError` when no token is in it (the message never contains the answer).
    """
    if not isinstance(data, dict):
        raise UpstreamError("vowel mint answer is not a JSON object", 200)
    secret = data.get("client_secret")
    secret = secret if isinstance(secret, dict) else {}
    value = next(
        (v for v in (data.get("token"), secret.get("value"), data.get("value")) if isinstance(v, str) and v),
        None,
    )
    if value is None:
        raise UpstreamError("vowel mint answer has no token (expected token or client_secret.value)", 200)
    now = time.time() if now is None else now
    claimed = token_claims(value)
    expires_at = next(
        (
            e
            for e in (
                _epoch(data.get("expiresAt")),
                _epoch(data.get("expires_at")),
                _epoch(secret.get("expires_at")),
            )
            if e is not None
        ),
        None,
    )
    if expires_at is None:
        expires_in = data.get("expires_in", data.get("expiresIn"))
        seconds = _finite(expires_in) if isinstance(expires_in, int | float) else None
        if seconds is not None and not isinstance(expires_in, bool):
            expires_at = now + seconds
    if expires_at is None:
        expires_at = _epoch(claimed.get("exp"))
    session = data.get("session")
    session_id = next(
        (
            s
            for s in (
                data.get("sessionId"),
                data.get("session_id"),
                session.get("id") if isinstance(session, dict) else None,
                claimed.get("sub"),
            )
            if isinstance(s, str) and s
        ),
        None,
    )
    stated: dict[str, Any] = data["claims"] if isinstance(data.get("claims"), dict) else data
    return Token(
        value,
        expires_at,
        session_id,
        _limit(claimed, stated, "maxCallDurationMs"),
        _limit(claimed, stated, "maxIdleDurationMs"),
    )


def _limit(claimed: Mapping[str, Any], stated: Mapping[str, Any], name: str) -> float | None:
    """A session limit in seconds: the token's claim, else the mint answer's."""
    seconds = _seconds_from_ms(claimed.get(name))
    return seconds if seconds is not None else _seconds_from_ms(stated.get(name))


def _error_message(text: str) -> str:
    try:
        body = jsonio.loads(text)
    except ValueError:
        return ""
    message: Any = None
    if isinstance(body, dict):
        message = body.get("message")
        if message is None and isinstance(body.get("error"), dict):
            message = body["error"].get("message")
        elif message is None and isinstance(body.get("error"), str):
            message = body["error"]
    if not isinstance(message, str):
        return ""
    message = " ".join(message.split())
    return str(message) if len(message) <= 200 else message[:200] + "…"


MINT_ANSWER = 1024 * 1024
"""At most this many bytes of a mint answer are read: a token and its times take a few kilobytes, and a
larger answer is refused rather than read whole."""


async def _mint_answer(resp: aiohttp.ClientResponse, into: bytearray) -> None:
    """Read the body of a mint answer into ``into``; raises :class:`UpstreamError` (not retryable) once it
    is larger than :data:`MINT_ANSWER`, without reading the rest."""
    size = resp.content_length
    if size is None or size <= MINT_ANSWER:
        while len(into) <= MINT_ANSWER:
            chunk = await resp.content.read(MINT_ANSWER + 1 - len(into))
            if not chunk:
                return
            into += chunk
    raise UpstreamError(
        f"vowel core answered the mint request with more than {MINT_ANSWER // 1024} KiB: "
        "no mint answer is that large",
        resp.status,
    )


def core_proxy(core_url: str) -> Proxy | None:
    """The proxy for requests to the vowel core at ``core_url``: the one websockets picks for a socket to
    that host, as the engine's socket gets (``HTTPS_PROXY``, ``NO_PROXY``…; none for a loopback host, see
    :func:`~sideband.upstream._ws.resolve_proxy`). Raises :class:`ValueError` for one that is malformed
    or not an HTTP proxy; its message names the variables, never the proxy's credentials."""
    url = ws_url(core_url)
    found = resolve_proxy(url)
    if found is None:
        return None
    what = f"the proxy for the vowel core (from {ws_proxy_names(url)})"
    return http_proxy(found, what, "the mint goes")


class VowelCore:
    """The vowel core's mint endpoint, with an API key that carries ``mint_trusted_session``.

    ``proxy``: the HTTP(S) proxy for the mint (see :func:`core_proxy`; its credentials become
    ``Proxy-Authorization``), ``None`` for a direct connection."""

    def __init__(
        self, http: aiohttp.ClientSession, core_url: str, api_key: str, proxy: Proxy | None = None
    ) -> None:
        self._http = http
        self._url = core_url.rstrip("/") + "/v1/realtime/sessions"
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._via, auth = proxy_route(proxy, self._url)
        self._headers.update(auth)

    async def mint(
        self, body: Mapping[str, Any], *, timeout: float = 10.0, clock: Callable[[], float] = time.time
    ) -> Token:
        """Mint a token for one session, in one attempt (:func:`~sideband.upstream.openai.with_retries`
        tries again when the error is :attr:`~UpstreamError.retryable`). Raises :class:`MintRefused` on
        401/403, :class:`MintFailed` on another error status, and :class:`UpstreamError` when the core
        could not be reached, did not answer within ``timeout`` seconds (both retryable) or answered no
        token (not retryable: an answer that is not JSON, or larger than :data:`MINT_ANSWER`, included).
        The body goes out as strict JSON (a NaN or an infinity as ``null``)."""
        data = jsonio.dumps(dict(body))  # always valid JSON (a NaN or an infinity is written as null)
        try:
            async with (
                asyncio.timeout(timeout),
                # (a redirect is not followed: it would repeat the POST as a GET, the API key with it)
                self._http.post(
                    self._url,
                    data=data,
                    headers=self._headers,
                    timeout=UNTIMED,
                    allow_redirects=False,
                    **self._via,
                ) as resp,
            ):
                status = resp.status
                raw = bytearray()
                if status >= 300:  # (a body cut short or stalled must not lose the status)
                    await error_body(resp, raw)
                else:
                    await _mint_answer(resp, raw)
                location = resp.headers.get("Location")
                wait = retry_after(resp.headers.get("Retry-After"))
        except TimeoutError:
            raise UpstreamError(f"vowel core did not answer the mint request within {timeout:g} s") from None
        except (
            aiohttp.ClientHttpProxyError
        ) as exc:  # (the proxy refused the tunnel: nothing reached the core)
            names = ws_proxy_names(ws_url(self._url))
            raise refused_tunnel(
                "vowel core mint", exc.status, exc.message, names, to="the vowel core"
            ) from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"vowel core unreachable: {why(exc)}") from None
        text = raw.decode("utf-8", "replace")
        detail = _error_message(text)
        suffix = f" (core said: {detail})" if detail else ""
        if status == 401:
            raise MintRefused("vowel core refused the API key (401)", 401, "mint_unauthorized", text)
        if status == 403:
            # (a 403 is the missing scope unless the core says it is about something else)
            why_not = (
                f"the API key lacks the {TRUSTED_SCOPE} scope{suffix}"
                if not detail or "scope" in detail.lower()
                else f"core said: {detail}"
            )
            raise MintRefused(
                f"vowel core refused to mint a trusted-server token (403): {why_not}",
                403,
                "mint_forbidden",
                text,
            )
        if 300 <= status < 400 and location:
            raise MintFailed(
                f"vowel core answered {status} to the mint request, redirecting to {location}: "
                "redirects are not followed; SIDEBAND_VOWEL_CORE_URL must name the core's own address",
                status,
                text,
            )
        if status >= 300:
            raise MintFailed(
                f"vowel core answered {status} to the mint request{suffix}", status, text, retry_after=wait
            )
        try:  # (a body that is not UTF-8 is no JSON either)
            data = jsonio.loads(raw.decode("utf-8"))
        except ValueError:
            raise UpstreamError("vowel core answered the mint request with non-JSON", status) from None
        return parse_mint_answer(data, clock())


def engine_socket_url(engine_url: str) -> str:
    """``{engine}/v1/realtime`` as a WebSocket URL (``https→wss``, ``http→ws``)."""
    return ws_url(engine_url) + "/v1/realtime"


async def connect_engine(
    engine_url: str,
    token: Token,
    *,
    open_timeout: float = 10.0,
    tls: ssl.SSLContext | None = None,
) -> PushConnection:
    """Open ``{engine}/v1/realtime`` with ``Authorization: Bearer <token>`` (``tls``: the shared client
    TLS context for ``wss://``).

    Raises :class:`EngineRefused` for a refused token (HTTP 401/403 at the handshake, or the TCP
    connection closing with no HTTP answer) and :class:`UpstreamError` when the engine cannot be reached.
    """
    try:
        return await open_socket(
            engine_socket_url(engine_url),
            token.value,
            compression=False,
            open_timeout=open_timeout,
            max_size=MAX_MESSAGE,
            proxy=resolve_proxy(engine_socket_url(engine_url)),
            tls=tls,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status in (401, 403):
            raise EngineRefused(
                f"vowel engine refused the token ({status} at the handshake): expired or invalid", status
            ) from None
        raise UpstreamError(f"vowel engine refused the connection with {status}", status) from None
    except InvalidMessage as exc:
        if not isinstance(exc.__cause__, EOFError):
            # An answer came that is not one websockets reads (an HTTP/1.0 status line from a proxy's
            # error page, a compressed body): the engine or a gateway before it failed, not the token.
            raise UpstreamError(
                f"vowel engine gave an unreadable handshake answer: {why(exc.__cause__ or exc)}"
            ) from None
        raise EngineRefused(
            "vowel engine closed the connection during the handshake with no HTTP answer: "
            "token refused (expired or invalid)"
        ) from None
    except (OSError, TimeoutError) as exc:
        raise UpstreamError(f"vowel engine unreachable: {why(exc)}") from None
    except Exception as exc:  # other InvalidHandshake subclasses
        raise UpstreamError(f"vowel engine handshake failed: {why(exc)}") from None
