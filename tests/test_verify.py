"""Tests for sideband.edge.verify: Standard Webhooks signatures, the time window, malformed headers."""

import base64
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from sideband.edge.verify import VerificationError, Verifier

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).resolve().parent / "data" / "webhooks.json").read_text(encoding="utf-8")
)["vectors"]

SECRET = "whsec_" + base64.b64encode(b"sideband test secret, 32 bytes!!").decode()
NOW = 1_750_000_000
BODY = b'{"type": "realtime.call.incoming", "data": {"call_id": "rtc_123"}}'


def sign(body: bytes | str, *, msg_id: str = "wh_1", ts: int = NOW, secret: str = SECRET) -> dict[str, str]:
    """Headers for ``body`` signed with the reference library."""
    text = body.decode() if isinstance(body, bytes) else body
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(ts, tz=UTC), text)
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": signature}


def verifier(now: float = NOW, tolerance: float = 300.0, secret: str = SECRET) -> Verifier:
    return Verifier(secret, tolerance=tolerance, clock=lambda: now)


def refused(v: Verifier, body: bytes, headers: dict[str, str]) -> VerificationError:
    with pytest.raises(VerificationError) as info:
        v.verify(body, headers)
    assert info.value.status in (400, 401)
    assert info.value.reason
    return info.value


# -- published vectors --------------------------------------------------------------------------------


def _headers(vector: dict[str, Any], signature: str) -> dict[str, str]:
    return {
        "webhook-id": vector["id"],
        "webhook-timestamp": str(vector["timestamp"]),
        "webhook-signature": signature,
    }


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_valid(vector: dict[str, Any]) -> None:
    v = verifier(now=vector["timestamp"], secret=vector["secret"])
    assert v.verify(vector["payload"].encode(), _headers(vector, vector["signature"])) == vector["id"]


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_negative(vector: dict[str, Any]) -> None:
    v = verifier(now=vector["timestamp"], secret=vector["secret"])
    err = refused(v, vector["payload"].encode(), _headers(vector, vector["negative"]))
    assert err.status == 401


@pytest.mark.parametrize(
    "vector",
    [v for v in VECTORS if "multi_signature_valid" in v],
    ids=[v["name"] for v in VECTORS if "multi_signature_valid" in v],
)
def test_vector_multi_signature(vector: dict[str, Any]) -> None:
    v = verifier(now=vector["timestamp"], secret=vector["secret"])
    headers = _headers(vector, vector["multi_signature_valid"])
    assert v.verify(vector["payload"].encode(), headers) == vector["id"]


def test_vectors_present() -> None:
    assert len(VECTORS) >= 2
    assert any("multi_signature_valid" in v for v in VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_outside_window_is_refused(vector: dict[str, Any]) -> None:
    v = verifier(now=vector["timestamp"] + 10_000, secret=vector["secret"])
    assert refused(v, vector["payload"].encode(), _headers(vector, vector["signature"])).status == 401


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_with_other_secret_is_refused(vector: dict[str, Any]) -> None:
    v = verifier(now=vector["timestamp"])
    assert refused(v, vector["payload"].encode(), _headers(vector, vector["signature"])).status == 401


# -- fresh signatures ---------------------------------------------------------------------------------


def test_fresh_signature_verifies() -> None:
    assert verifier().verify(BODY, sign(BODY, msg_id="wh_abc")) == "wh_abc"


def test_secret_without_prefix_verifies_same_signatures() -> None:
    v = Verifier(SECRET.removeprefix("whsec_"), clock=lambda: NOW)
    assert v.verify(BODY, sign(BODY)) == "wh_1"


@pytest.mark.parametrize("offset", [-300, -299, 0, 299, 300])
def test_inside_tolerance(offset: int) -> None:
    headers = sign(BODY, ts=NOW + offset)
    assert verifier().verify(BODY, headers) == "wh_1"


@pytest.mark.parametrize("offset", [-301, 301, -86_400, 86_400])
def test_outside_tolerance(offset: int) -> None:
    err = refused(verifier(), BODY, sign(BODY, ts=NOW + offset))
    assert err.status == 401
    assert ("old" in err.reason) == (offset < 0)
    assert ("new" in err.reason) == (offset > 0)


def test_custom_tolerance() -> None:
    v = verifier(tolerance=10)
    assert v.verify(BODY, sign(BODY, ts=NOW - 10)) == "wh_1"
    assert refused(v, BODY, sign(BODY, ts=NOW - 11)).status == 401


def test_clock_is_read_per_call() -> None:
    now = [float(NOW)]
    v = Verifier(SECRET, clock=lambda: now[0])
    headers = sign(BODY)
    assert v.verify(BODY, headers) == "wh_1"
    now[0] += 301
    assert refused(v, BODY, headers).status == 401


@pytest.mark.parametrize("header", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header(header: str) -> None:
    headers = sign(BODY)
    del headers[header]
    assert refused(verifier(), BODY, headers).status == 400


@pytest.mark.parametrize("header", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_empty_header(header: str) -> None:
    headers = sign(BODY)
    headers[header] = ""
    assert refused(verifier(), BODY, headers).status == 400


def test_no_headers_at_all() -> None:
    assert refused(verifier(), BODY, {}).status == 400


@pytest.mark.parametrize(
    "signature",
    [
        "v1",
        "v1,",
        ",",
        "v1,a,b",
        "v1,!!!notbase64",
        "v1,abc",  # bad padding
        "v2,xxx",
        "v1a,AAAA",
        " ",
        "   v1,   ",
        "v1,é",
        "v1,\udcff",
        "\x00",
        "v1," + "A" * 4000,
        "v1,AAAA " * 500,  # very long: oversized header
        "v1," + "A" * 10_000,
    ],
)
def test_garbled_signature_is_a_clean_refusal(signature: str) -> None:
    headers = sign(BODY)
    headers["webhook-signature"] = signature
    error = refused(verifier(), BODY, headers)
    if len(signature) > 4096:  # read no further
        assert (error.status, error.reason) == (400, "oversized webhook header")


def test_right_signature_under_other_version_tag_is_refused() -> None:
    headers = sign(BODY)
    headers["webhook-signature"] = "v2," + headers["webhook-signature"].split(",", 1)[1]
    assert refused(verifier(), BODY, headers).status == 401


def test_valid_signature_last_of_several() -> None:
    headers = sign(BODY)
    good = headers["webhook-signature"]
    headers["webhook-signature"] = f"v1,AAAA v2,xxx v1,!!! v1,a,b {good}"
    assert verifier().verify(BODY, headers) == "wh_1"


@pytest.mark.parametrize("joint", [", ", ",  ", ",\t"])
def test_signature_lines_a_proxy_merged_with_commas_still_verify(joint: str) -> None:
    """Repeated ``webhook-signature`` lines a proxy merged into one (RFC 9110 joins them with ", "):
    each entry but the last then ends with a comma, and the right one may be any of them."""
    headers = sign(BODY)
    good = headers["webhook-signature"]
    headers["webhook-signature"] = joint.join([good, "v1,AAAA"])
    assert verifier().verify(BODY, headers) == "wh_1"
    headers["webhook-signature"] = joint.join(["v1,AAAA", good, "v1,BBBB"])
    assert verifier().verify(BODY, headers) == "wh_1"


def test_valid_signature_first_of_several() -> None:
    headers = sign(BODY)
    headers["webhook-signature"] += " v1,AAAA v1,garbage"
    assert verifier().verify(BODY, headers) == "wh_1"


def test_several_signatures_none_valid() -> None:
    headers = sign(BODY)
    other = sign(BODY, secret="whsec_" + base64.b64encode(b"x" * 32).decode())["webhook-signature"]
    headers["webhook-signature"] = f"{other} v1,AAAA"
    assert refused(verifier(), BODY, headers).status == 401


def test_a_delivery_signed_during_a_secret_rotation_verifies_with_either_secret() -> None:
    """While an old secret is kept active, each delivery carries one signature per secret: instances
    still holding the old one and those with the new one both take it (README, Deploy)."""
    new = "whsec_" + base64.b64encode(b"the rotated secret, 32 bytes!!!!").decode()
    headers = sign(BODY)
    headers["webhook-signature"] += " " + sign(BODY, secret=new)["webhook-signature"]
    assert verifier(secret=SECRET).verify(BODY, headers) == "wh_1"
    assert verifier(secret=new).verify(BODY, headers) == "wh_1"
    third = "whsec_" + base64.b64encode(b"y" * 32).decode()
    assert refused(verifier(secret=third), BODY, headers).status == 401


@pytest.mark.parametrize("noise", ["!", "\n", "*", "-"])
def test_a_right_signature_with_characters_outside_base64_is_not_a_match(noise: str) -> None:
    headers = sign(BODY)
    value = headers["webhook-signature"].split(",", 1)[1]
    headers["webhook-signature"] = "v1," + value[:10] + noise + value[10:]
    err = refused(verifier(), BODY, headers)
    assert (err.status, err.reason) == (401, "no matching signature")


def test_truncated_signature_is_refused() -> None:
    headers = sign(BODY)
    headers["webhook-signature"] = headers["webhook-signature"][:-6]
    assert refused(verifier(), BODY, headers).status == 401


ARABIC_INDIC_NOW = "\u0661\u0667\u0665" + "\u0660" * 7  # NOW in Arabic-Indic digits: str.isdigit() is True


@pytest.mark.parametrize(
    "stamp",
    [
        "abc",
        "1.5e9",
        "-5",
        "",
        " 1750000000",
        "1750000000.0",
        "+1750000000",
        "0x1a",
        ARABIC_INDIC_NOW,
        "9" * 40,
        "000" + str(NOW),  # 13 characters, though the number is inside the window
    ],
)
def test_malformed_timestamp(stamp: str) -> None:
    headers = sign(BODY)
    headers["webhook-timestamp"] = stamp
    assert refused(verifier(), BODY, headers).status == 400


def test_non_utf8_body_with_valid_headers() -> None:
    body = b'{"x": "\xff\xfe"}'
    headers = sign(BODY)  # timestamp and id fine; body can't even be decoded
    assert refused(verifier(), body, headers).status == 400


def test_utf8_body_round_trip() -> None:
    body = '{"caller": "Zoë 📞"}'.encode()
    assert verifier().verify(body, sign(body)) == "wh_1"


@pytest.mark.parametrize("position", [0, len(BODY) // 2, len(BODY) - 1])
def test_body_altered_by_one_byte(position: int) -> None:
    headers = sign(BODY)
    altered = bytearray(BODY)
    altered[position] = ord("X") if altered[position] != ord("X") else ord("Y")
    assert refused(verifier(), bytes(altered), headers).status == 401


def test_body_with_trailing_newline_is_refused() -> None:
    assert refused(verifier(), BODY + b"\n", sign(BODY)).status == 401


def test_other_webhook_id_is_refused() -> None:
    headers = sign(BODY, msg_id="wh_1")
    headers["webhook-id"] = "wh_2"
    assert refused(verifier(), BODY, headers).status == 401


def test_other_timestamp_in_window_is_refused() -> None:
    headers = sign(BODY)
    headers["webhook-timestamp"] = str(NOW + 1)
    assert refused(verifier(), BODY, headers).status == 401


def test_oversized_webhook_id() -> None:
    headers = sign(BODY, msg_id="w" * 1000)
    assert refused(verifier(), BODY, headers).status == 400


def test_a_webhook_id_of_256_characters_verifies_and_one_of_257_is_refused() -> None:
    longest = "w" * 256
    assert verifier().verify(BODY, sign(BODY, msg_id=longest)) == longest
    err = refused(verifier(), BODY, sign(BODY, msg_id=longest + "w"))
    assert (err.status, err.reason) == (400, "oversized webhook header")


def test_webhook_id_with_undecodable_bytes_is_a_clean_refusal() -> None:
    headers = sign(BODY)
    headers["webhook-id"] = "wh_\udcff"
    refused(verifier(), BODY, headers)


def test_non_ascii_webhook_id_is_verified_like_any_other() -> None:
    assert verifier().verify(BODY, sign(BODY, msg_id="wh_é")) == "wh_é"


def test_error_defaults() -> None:
    err = VerificationError("nope")
    assert (err.reason, err.status, str(err)) == ("nope", 400, "nope")
