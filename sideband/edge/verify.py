"""Standard Webhooks verification of the raw body, with every malformed input a clean error."""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from standardwebhooks import Webhook

__all__ = ["VerificationError", "Verifier"]

_ENTRIES = re.compile(r",?\s+")
"""Between two entries of a signature list: a space, or a comma and a space (lines a proxy merged)."""


class VerificationError(Exception):
    """The delivery is not authentic or not well formed. ``status`` is the HTTP answer (400/401)."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Verifier:
    """Checks ``webhook-id``/``webhook-timestamp``/``webhook-signature`` over the raw bytes.

    The HMAC is computed by the ``standardwebhooks`` package; header parsing, the time window (with an
    injectable clock) and error classes are ours: a missing or malformed id or timestamp is a 400, a
    signature list without a valid match (garbled entries are skipped, not fatal) a 401, never an
    exception.
    """

    def __init__(self, secret: str, tolerance: float = 300.0, clock: Callable[[], float] = time.time) -> None:
        self._hook = Webhook(secret)
        self._tolerance = tolerance
        self._clock = clock

    def verify(self, body: bytes, headers: Mapping[str, str]) -> str:
        """Return the webhook id of an authentic delivery, else raise :class:`VerificationError`."""
        msg_id = headers.get("webhook-id", "")
        stamp = headers.get("webhook-timestamp", "")
        signatures = headers.get("webhook-signature", "")
        if not msg_id or not stamp or not signatures:
            raise VerificationError("missing webhook-id, webhook-timestamp or webhook-signature header")
        if len(msg_id) > 256 or len(signatures) > 4096:
            raise VerificationError("oversized webhook header")
        try:
            msg_id.encode("utf-8")
        except UnicodeEncodeError:
            raise VerificationError("malformed webhook-id header") from None
        if not stamp.isascii() or not stamp.isdigit() or len(stamp) > 12:
            raise VerificationError("webhook-timestamp is not a whole number of seconds")
        ts = int(stamp)
        now = self._clock()
        if ts < now - self._tolerance:
            raise VerificationError("webhook-timestamp too old", 401)
        if ts > now + self._tolerance:
            raise VerificationError("webhook-timestamp too new", 401)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise VerificationError("body is not UTF-8") from None
        expected = self._hook.sign(msg_id, datetime.fromtimestamp(ts, tz=UTC), text)
        expected_raw = base64.b64decode(expected.split(",", 1)[1])
        # Space-separated; a proxy that merged repeated header lines joined them with ", " (RFC 9110).
        for entry in _ENTRIES.split(signatures):
            version, sep, value = entry.partition(",")
            if version != "v1" or not sep or not value or "," in value:
                continue  # malformed or other versions: never an exception, just not a match
            try:
                candidate = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                continue
            if hmac.compare_digest(expected_raw, candidate):
                return msg_id
        raise VerificationError("no matching signature", 401)
