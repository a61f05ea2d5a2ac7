"""Tests for sideband.tickets: signed, expiring WebRTC handoff tickets."""

import base64
import hashlib
import hmac
import json

import pytest

from sideband.tickets import Ticket, TicketError, TicketSigner

KEY = b"k" * 32


class FakeClock:
    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(payload: str, key: bytes = KEY) -> str:
    """A ticket string with a correct MAC over an arbitrary payload (what only the key holder can make)."""
    mac = b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    return f"v1.{payload}.{mac}"


def make(ttl: float = 120.0) -> tuple[TicketSigner, FakeClock]:
    clock = FakeClock()
    return TicketSigner(KEY, ttl, clock), clock


def test_round_trip() -> None:
    signer, clock = make()
    text, ticket = signer.issue()
    assert isinstance(ticket, Ticket)
    assert text.startswith("v1.")
    assert text.count(".") == 2
    assert ticket.expires_at == pytest.approx(clock.now + 120.0)
    assert signer.verify(text) == ticket


def test_tickets_are_unique() -> None:
    signer, _ = make()
    issued = [signer.issue() for _ in range(50)]
    assert len({t.nonce for _, t in issued}) == 50
    assert len({s for s, _ in issued}) == 50


def test_ticket_is_url_safe_and_short() -> None:
    signer, _ = make()
    text, _ = signer.issue()
    assert len(text) <= 512
    assert all(c.isalnum() or c in "-_." for c in text)


def test_another_signer_with_same_key_accepts() -> None:
    signer, clock = make()
    text, ticket = signer.issue()
    assert TicketSigner(KEY, 5, clock).verify(text) == ticket


def test_valid_until_expiry_then_expired() -> None:
    signer, clock = make(ttl=60)
    text, ticket = signer.issue()
    clock.now += 60
    assert signer.verify(text) == ticket
    clock.now += 0.01
    with pytest.raises(TicketError, match="expired"):
        signer.verify(text)


def test_expired_long_ago() -> None:
    signer, clock = make()
    text, _ = signer.issue()
    clock.now += 86_400
    with pytest.raises(TicketError):
        signer.verify(text)


def test_other_key_rejects() -> None:
    signer, clock = make()
    text, _ = signer.issue()
    with pytest.raises(TicketError):
        TicketSigner(b"another key", 120, clock).verify(text)


def test_forged_mac() -> None:
    signer, _ = make()
    text, _ = signer.issue()
    head, mac = text.rsplit(".", 1)
    flipped = ("A" if mac[0] != "A" else "B") + mac[1:]
    with pytest.raises(TicketError):
        signer.verify(f"{head}.{flipped}")


def test_tampered_payload_rejected() -> None:
    signer, clock = make()
    text, ticket = signer.issue()
    _, _, mac = text.split(".")
    # a plausible payload (ten minutes more), so that only the signature can refuse it
    later = b64(json.dumps({"n": ticket.nonce, "e": clock.now + 600}, separators=(",", ":")).encode())
    with pytest.raises(TicketError, match="signature"):
        signer.verify(f"v1.{later}.{mac}")


def test_a_well_signed_ticket_over_512_characters_is_malformed() -> None:
    signer, clock = make()
    padded = b64(json.dumps({"n": "n" * 600, "e": clock.now + 60}, separators=(",", ":")).encode())
    text = f"v1.{padded}.{signer._mac(padded)}"
    assert len(text) > 512
    with pytest.raises(TicketError, match="malformed"):
        signer.verify(text)


def test_other_version_rejected() -> None:
    signer, _ = make()
    text, _ = signer.issue()
    with pytest.raises(TicketError, match="malformed"):
        signer.verify("v2" + text[2:])


@pytest.mark.parametrize(
    "text",
    [
        "",
        "v1",
        "v1.",
        "v1..",
        "nodots",
        "v1.payload",
        "v1.payload.",
        "v1..mac",
        "...",
        "v1.!!!.???",
        "v1.a.b.c",
        "v1.é.abc",
        "x" * 100_000,
        "v1." + "A" * 1000 + ".mac",
    ],
)
def test_garbled_strings(text: str) -> None:
    signer, _ = make()
    with pytest.raises(TicketError):
        signer.verify(text)


@pytest.mark.parametrize("value", [None, 123, b"v1.a.b", ["v1"], {"t": 1}])
def test_non_string_inputs(value: object) -> None:
    signer, _ = make()
    with pytest.raises(TicketError):
        signer.verify(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "payload",
    [
        "!!!",  # not base64
        "A",  # impossible base64 length
        b64(b"not json"),
        b64(b"\xff\xfe\x00"),  # not UTF-8
        b64(b"[1, 2]"),  # JSON but not an object
        b64(b'"string"'),
        b64(b"null"),
        b64(b"{}"),  # missing fields
        b64(b'{"n": "abc"}'),
        b64(b'{"e": 1}'),
        b64(b'{"n": "abc", "e": "soon"}'),
        b64(b'{"n": "abc", "e": [1]}'),
    ],
)
def test_well_signed_but_malformed_payload(payload: str) -> None:
    signer, _ = make()
    with pytest.raises(TicketError):
        signer.verify(forge(payload))


def test_well_signed_hand_made_payload_verifies() -> None:
    signer, clock = make()
    payload = b64(json.dumps({"n": "nonce-1", "e": clock.now + 5}).encode())
    assert signer.verify(forge(payload)) == Ticket("nonce-1", clock.now + 5)


@pytest.mark.parametrize("text", ["v1.abc.é", "v1.abc.\udcff", "v1.\udcff.abc"])
def test_non_ascii_garbage(text: str) -> None:
    signer, _ = make()
    with pytest.raises(TicketError):
        signer.verify(text)


@pytest.mark.parametrize("life", ["Infinity", "NaN", "1e308", str(86_400 + 1)])
def test_a_well_signed_ticket_valid_too_long_is_refused(life: str) -> None:
    """Its single use could not be remembered as long as it lives (a store TTL of that size overflows)."""
    signer, clock = make()
    expires = life if life.isalpha() else repr(clock.now + float(life))
    with pytest.raises(TicketError, match="malformed"):
        signer.verify(forge(b64(('{"n": "nonce-1", "e": ' + expires + "}").encode())))
    day = b64(json.dumps({"n": "nonce-1", "e": clock.now + 86_400}).encode())
    assert signer.verify(forge(day)).expires_at == clock.now + 86_400
