"""A webhook sender that signs and retries like OpenAI's (Standard Webhooks).

OpenAI POSTs each event with ``webhook-id`` (the same on every retry of that event), ``webhook-timestamp``
(this attempt) and ``webhook-signature`` (``v1,<base64 HMAC-SHA256>`` over ``"{id}.{timestamp}.{body}"``,
keyed with the base64-decoded secret after its ``whsec_`` prefix). Any non-2xx answer (3xx included), a
timeout or a connection error is retried with exponential backoff.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sideband.upstream.openai import UNTIMED

__all__ = ["OPENAI_WEBHOOK_USER_AGENT", "DeliveryResult", "WebhookSender", "decode_secret", "sign_webhook"]

OPENAI_WEBHOOK_USER_AGENT = "OpenAI/1.0 (+https://platform.openai.com/docs/webhooks)"
"""The ``user-agent`` OpenAI's webhook deliveries carry."""

_SECRET_PREFIX = "whsec_"  # noqa: S105 - a format prefix, not a secret


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: base64-decode what follows the ``whsec_`` prefix."""
    raw = secret.removeprefix(_SECRET_PREFIX)
    key = base64.b64decode(raw + "=" * (-len(raw) % 4))
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def sign_webhook(key: bytes, body: bytes, webhook_id: str, timestamp: int | str) -> str:
    """The ``webhook-signature`` value (``v1,<base64>``) for ``body`` sent with that id and timestamp."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


@dataclass(slots=True)
class DeliveryResult:
    """What happened to one webhook delivery, attempt by attempt.

    ``attempts`` holds one entry per POST: the HTTP status, or ``None`` for a timeout/connection error (the
    matching entry of ``errors`` says which). ``bodies`` holds each answer's body (``None`` if none).
    ``endpoint_disabled`` is set when the receiver answered ``410 Gone``: a Standard Webhooks sender
    disables the endpoint then and delivers nothing more to it.
    """

    webhook_id: str
    body: bytes
    attempts: list[int | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    bodies: list[bytes | None] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)
    endpoint_disabled: bool = False

    @property
    def status(self) -> int | None:
        """The status of the last attempt (``None`` if it got no answer or nothing was sent)."""
        return self.attempts[-1] if self.attempts else None

    @property
    def ok(self) -> bool:
        """Whether the last attempt was answered with a 2xx."""
        status = self.status
        return status is not None and 200 <= status < 300


class WebhookSender:
    """Signs and POSTs webhook events to one URL, retrying like OpenAI.

    It owns an ``aiohttp.ClientSession`` (created on first use) unless one is passed in; call :meth:`close`
    (or use ``async with``). ``Simulator.webhook_sender`` closes the senders it made when it closes.
    """

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        user_agent: str = OPENAI_WEBHOOK_USER_AGENT,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = url
        self.secret = secret
        self.user_agent = user_agent
        self._key = decode_secret(secret)
        self._session = session
        self._owns_session = session is None
        self._closed = False

    async def __aenter__(self) -> WebhookSender:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session this sender owns (idempotent)."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("WebhookSender is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def sign(self, body: bytes, webhook_id: str, timestamp: int | str) -> dict[str, str]:
        """The full header set OpenAI would send with ``body`` (copy and alter it to forge deliveries)."""
        return {
            "content-type": "application/json",
            "user-agent": self.user_agent,
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign_webhook(self._key, body, webhook_id, timestamp),
        }

    @staticmethod
    def encode(event: Mapping[str, Any]) -> bytes:
        """Serialize an event the way it goes on the wire."""
        return json.dumps(dict(event)).encode()

    async def post_raw(
        self,
        body: bytes,
        headers: Mapping[str, str],
        *,
        timeout: float = 5.0,
    ) -> tuple[int, bytes]:
        """POST ``body`` with exactly ``headers`` once (no signing, no retry); return (status, body)."""
        async with (
            asyncio.timeout(timeout),  # (aiohttp's own timer can lose a cancellation landing as it fires)
            self._client().post(
                self.url, data=body, headers=dict(headers), timeout=UNTIMED, allow_redirects=False
            ) as response,
        ):
            return response.status, await response.read()

    async def deliver(
        self,
        event: Mapping[str, Any] | bytes,
        *,
        webhook_id: str | None = None,
        timestamp: int | None = None,
        max_attempts: int = 3,
        backoff: float = 0.05,
        timeout: float = 5.0,
    ) -> DeliveryResult:
        """Sign and POST ``event`` until a 2xx or ``max_attempts`` attempts.

        Every attempt carries the same ``webhook-id`` (``wh_…`` generated when not given) and a fresh
        ``webhook-timestamp`` (or ``timestamp`` on every attempt when given, to test clock skew). Retries
        follow non-2xx answers (3xx included), timeouts (``timeout`` seconds per attempt) and connection
        errors, after ``backoff * 2**n`` seconds. A ``410 Gone`` stops the delivery at once and sets
        :attr:`DeliveryResult.endpoint_disabled`, as Standard Webhooks senders disable the endpoint.
        """
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        body = event if isinstance(event, bytes) else self.encode(event)
        wid = webhook_id if webhook_id is not None else "wh_" + secrets.token_hex(16)
        result = DeliveryResult(webhook_id=wid, body=body)
        last = 0
        task = asyncio.current_task()
        baseline = task.cancelling() if task is not None else 0
        for attempt in range(max_attempts):
            if attempt:
                await asyncio.sleep(backoff * (2 ** (attempt - 1)))
            # Each attempt is signed anew with its own timestamp, later than the one before,
            # even when the retries come within one second.
            ts = timestamp if timestamp is not None else max(int(time.time()), last + 1)
            last = ts
            result.timestamps.append(ts)
            try:
                status, answer = await self.post_raw(body, self.sign(body, wid, ts), timeout=timeout)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                if task is not None and task.cancelling() > baseline:
                    raise asyncio.CancelledError from None  # (a cancel some library turned into this)
                result.attempts.append(None)
                result.errors.append(f"{type(exc).__name__}: {exc}".rstrip(": "))
                result.bodies.append(None)
                continue
            result.attempts.append(status)
            result.errors.append(None)
            result.bodies.append(answer)
            if 200 <= status < 300:
                break
            if status == 410:
                result.endpoint_disabled = True
                break
        return result
