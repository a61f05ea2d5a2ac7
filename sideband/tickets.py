"""Short-lived, single-use, signed handoff tickets for browser-started WebRTC calls."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Ticket", "TicketError", "TicketSigner"]

LONGEST_LIFE = 86_400.0
"""A ticket valid longer than this from now is refused as malformed: no instance signs one (their life
is at most ``SIDEBAND_RTC_KEY_TTL``'s 7,200 s and a grace), and its single use must be remembered that
long."""


class TicketError(Exception):
    """The ticket is forged, malformed or expired."""


@dataclass(frozen=True, slots=True)
class Ticket:
    """A verified ticket: its single-use ``nonce`` and its expiry (epoch seconds)."""

    nonce: str
    expires_at: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TicketSigner:
    """``v1.<payload>.<mac>`` tickets: HMAC-SHA256 over the payload with a server-side key."""

    def __init__(self, key: bytes, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self._ttl = ttl
        self._clock = clock

    def issue(self) -> tuple[str, Ticket]:
        """A new ticket string and what it stands for."""
        ticket = Ticket(secrets.token_urlsafe(18), round(self._clock() + self._ttl, 3))
        payload = _b64(
            json.dumps({"n": ticket.nonce, "e": ticket.expires_at}, separators=(",", ":")).encode()
        )
        return f"v1.{payload}.{self._mac(payload)}", ticket

    def verify(self, text: str) -> Ticket:
        """The ticket behind ``text``; raises :class:`TicketError` if forged, garbled or expired."""
        if not isinstance(text, str) or len(text) > 512 or not text.isascii():
            raise TicketError("malformed ticket")
        version, _, rest = text.partition(".")
        payload, _, mac = rest.partition(".")
        if version != "v1" or not payload or not mac:
            raise TicketError("malformed ticket")
        if not hmac.compare_digest(self._mac(payload), mac):
            raise TicketError("bad ticket signature")
        try:
            data = json.loads(_unb64(payload))
            ticket = Ticket(str(data["n"]), float(data["e"]))
        except (ValueError, KeyError, TypeError):
            raise TicketError("malformed ticket") from None
        now = self._clock()
        if not math.isfinite(ticket.expires_at) or ticket.expires_at - now > LONGEST_LIFE:
            raise TicketError("malformed ticket")
        if ticket.expires_at < now:
            raise TicketError("ticket expired")
        return ticket

    def remaining(self, ticket: Ticket) -> float:
        """Seconds ``ticket`` stays valid from now (0 once expired), by this signer's clock."""
        return max(0.0, ticket.expires_at - self._clock())

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())
