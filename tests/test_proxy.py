"""A host that reaches OpenAI only through an HTTP proxy: call control and the sideband both go through it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from urllib.parse import urlsplit

import aiohttp
import pytest

from sideband import Refer, Sideband
from sideband.settings import SettingsError
from sideband.testing import Script, Simulator, caller_hangs_up, run_app, wait_for_greeting

from .conftest import capture_logs, settings_for


class ForwardProxy:
    """A minimal HTTP forward proxy: ``CONNECT`` tunnels and absolute-form requests, both piped through
    as bytes once the first request is read. Records each connection's first request line and its
    ``Proxy-Authorization``."""

    def __init__(self, hosts: dict[str, str] | None = None) -> None:
        self.hosts = hosts or {}  # names the proxy resolves (OpenAI's, in a test, is the loopback simulator)
        self.seen: list[tuple[str, str, str | None]] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            method, target, version = request_line.split(" ")
            headers = dict(line.split(": ", 1) for line in header_lines if line)
            auth = next((v for k, v in headers.items() if k.lower() == "proxy-authorization"), None)
            self.seen.append((method, target, auth))
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                up_reader, up_writer = await asyncio.open_connection(self.hosts.get(host, host), int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                url = urlsplit(target)
                assert url.hostname is not None and url.port is not None
                up_reader, up_writer = await asyncio.open_connection(
                    self.hosts.get(url.hostname, url.hostname), url.port
                )
                path = url.path + (f"?{url.query}" if url.query else "")
                kept = [line for line in header_lines if line and not line.lower().startswith("proxy-")]
                head_lines = [f"{method} {path} {version}", *kept, "", ""]
                up_writer.write("\r\n".join(head_lines).encode("latin-1"))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            writer.close()
            return
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.close()


def behind_proxy(sim: Simulator) -> str:
    """The simulator's base URL under a name only the proxy resolves (a loopback URL is never proxied)."""
    return sim.base_url.replace("127.0.0.1", OPENAI_HOST)


OPENAI_HOST = "openai.test"
PROXIED_OPENAI = f"https://{OPENAI_HOST}/v1"  # (reached through the proxy only)


async def test_call_control_and_the_sideband_go_through_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = ForwardProxy({OPENAI_HOST: "127.0.0.1"})
    await proxy.start()
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "WS_PROXY", "ws_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://svc:s3cret@127.0.0.1:{proxy.port}")
    expected_auth = "Basic " + base64.b64encode(b"svc:s3cret").decode()
    try:
        async with Simulator() as sim, run_app(Sideband(), sim, openai_base_url=behind_proxy(sim)) as harness:
            call = sim.create_call(Script([wait_for_greeting("Hello"), caller_hangs_up()]))
            result = await harness.sender.deliver(sim.incoming_event(call))
            assert result.status == 200
            await call.wait_done(timeout=10)
    finally:
        await proxy.close()
    host = f"{OPENAI_HOST}:{urlsplit(sim.base_url).port}"
    accept = f"http://{host}/v1/realtime/calls/{call.call_id}/accept"
    assert ("POST", accept, expected_auth) in proxy.seen  # call control, credentials as a header
    assert ("CONNECT", host, expected_auth) in proxy.seen  # the sideband, tunnelled
    assert call.sideband_connects == 1


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("SOCKS_PROXY", "socks5h://user:s3cret@127.0.0.1:1080", "is a socks5h proxy"),
        ("HTTP_PROXY", "http://user@127.0.0.1:3128", "is not valid: username provided without password"),
        ("HTTP_PROXY", "http://user:s3cret@127.0.0.1:3128/path", "is not valid: path is meaningless"),
        ("HTTP_PROXY", "http://user:s3cret", "is not valid: it cannot be read"),
        ("HTTP_PROXY", "http://user:a[s3cret]b@127.0.0.1:3128", "is not valid: it cannot be read"),
        ("HTTP_PROXY", "http://user:ab/s3cret@127.0.0.1:3128", "is not valid: path is meaningless"),
    ],
)
async def test_a_proxy_call_control_or_the_sideband_cannot_use_stops_the_start(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "WS_PROXY", "ws_proxy", "SOCKS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    async with Simulator() as sim:
        with pytest.raises(SettingsError) as info:
            async with run_app(Sideband(), sim, openai_base_url=behind_proxy(sim)):
                pass
    message = str(info.value)
    assert says in message and "(from WS_PROXY, SOCKS_PROXY, HTTPS_PROXY or HTTP_PROXY)" in message
    assert "s3cret" not in message


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
async def test_a_loopback_openai_is_never_reached_through_a_proxy(
    monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    """The simulator ``sideband demo`` runs (or a local engine) on loopback: a proxy set for the host's
    outbound traffic could not reach it, so it is not used (as Go's HTTP client does)."""
    from sideband.upstream._ws import resolve_proxy

    for name in ("NO_PROXY", "no_proxy", "WS_PROXY", "ws_proxy", "WSS_PROXY", "wss_proxy", "SOCKS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert resolve_proxy(f"ws://{host}:8000/v1/realtime") is None
    assert resolve_proxy(f"wss://{host}/v1/realtime") is None
    assert resolve_proxy("wss://api.openai.com/v1/realtime") == "http://127.0.0.1:9"
    assert resolve_proxy("ws://127.example.com/v1/realtime") == "http://127.0.0.1:9"  # a name, not an address
    if host != "127.0.0.1":
        return
    async with Simulator() as sim, run_app(Sideband(), sim) as harness:
        call = sim.create_call(Script([wait_for_greeting("Hello"), caller_hangs_up()]))
        assert (await harness.sender.deliver(sim.incoming_event(call))).status == 200
        await call.wait_done(timeout=10)
    assert call.sideband_connects == 1


@pytest.mark.parametrize("base", ["https://api.openai.com/v1", "wss://api.openai.com/v1"])
async def test_proxy_credentials_go_on_the_connect_only_for_an_https_base(base: str) -> None:
    from typing import Any

    from sideband.upstream.openai import CallControl

    sent: list[dict[str, Any]] = []

    class Response:
        status = 200

        async def read(self) -> bytes:
            return b"{}"

    class Session:
        def __init__(self) -> None:
            self.trace_configs: list[Any] = []

        def request(self, method: str, url: str, **kwargs: Any) -> Any:
            sent.append({"url": url, **kwargs})
            response = Response()

            class Context:
                async def __aenter__(self) -> Response:
                    return response

                async def __aexit__(self, *exc: object) -> None:
                    return None

            return Context()

    from websockets.proxy import parse_proxy

    proxy = parse_proxy("http://u:p@proxy.internal:3128")
    control = CallControl(Session(), base, "sk-test", proxy)  # type: ignore[arg-type]
    await control.accept("rtc_1", {"type": "realtime"})
    await control.hangup("rtc_1")
    for request in sent:
        assert request["proxy"] == "http://proxy.internal:3128"
        assert request["proxy_headers"] == {
            "Proxy-Authorization": "Basic " + base64.b64encode(b"u:p").decode()
        }
        assert "Proxy-Authorization" not in request["headers"]  # never inside the tunnel, to OpenAI


class RefusingProxy:
    """An HTTP proxy that opens no tunnel: it answers each ``CONNECT`` with ``status``, or 407 to one
    without the ``Proxy-Authorization`` it asks for (``auth``). Records each request line and its
    ``Proxy-Authorization``."""

    def __init__(self, status: int, reason: str, *, auth: str | None = None) -> None:
        self.status, self.reason, self.auth = status, reason, auth
        self.seen: list[tuple[str, str, str | None]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RefusingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            method, target, _ = request_line.split(" ")
            headers = dict(line.split(": ", 1) for line in header_lines if line)
            auth = next((v for k, v in headers.items() if k.lower() == "proxy-authorization"), None)
            self.seen.append((method, target, auth))
            status, reason = (self.status, self.reason)
            if self.auth is not None and auth != self.auth:
                status, reason = 407, "Proxy Authentication Required"
            writer.write(
                f'HTTP/1.1 {status} {reason}\r\nProxy-Authenticate: Basic realm="proxy"\r\n'
                "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
        writer.close()


def _proxied(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """``url`` is the proxy for OpenAI (and nothing exempts it)."""
    for name in (
        "NO_PROXY",
        "no_proxy",
        "WSS_PROXY",
        "wss_proxy",
        "SOCKS_PROXY",
        "socks_proxy",
        "https_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", url)


@pytest.mark.parametrize(
    ("status", "reason", "retryable", "says"),
    [
        (
            407,
            "Proxy Authentication Required",
            False,
            "check the user:password of its URL: WSS_PROXY or HTTPS_PROXY",
        ),
        (403, "Forbidden", False, "check its rules"),
        (502, "Bad Gateway", True, ""),
        (503, "Service Unavailable", True, ""),
    ],
)
async def test_a_tunnel_the_proxy_refuses_sent_nothing_to_openai(
    status: int, reason: str, retryable: bool, says: str
) -> None:
    """A proxy that will not open the tunnel (its credentials, its rules, OpenAI out of its reach) let
    nothing through: no verb may have been carried out (a REFER is tried again), and what no retry mends
    (407, 403) is not tried again and names the proxy setting to check."""
    from websockets.proxy import parse_proxy

    from sideband.upstream.openai import CallControl, UpstreamError, connect_sideband

    async with RefusingProxy(status, reason) as proxy, aiohttp.ClientSession() as http:
        proxy_url = f"http://svc:s3cret@127.0.0.1:{proxy.port}"
        control = CallControl(http, PROXIED_OPENAI, "sk-test", parse_proxy(proxy_url))
        with pytest.raises(UpstreamError) as refer:
            await control.refer("rtc_1", "tel:+14155550123", timeout=5)
        with pytest.raises(UpstreamError) as created:
            await control.create_call("v=0", {"type": "realtime"}, timeout=5)
        with pytest.raises(UpstreamError) as attached:
            await connect_sideband(f"wss://{OPENAI_HOST}/v1/realtime", "rtc_1", "sk-test", proxy=proxy_url)
    assert [method for method, _, _ in proxy.seen] == ["CONNECT"] * 3
    for error in (refer.value, created.value, attached.value):
        assert error.unsent and not error.maybe_carried_out and error.retryable is retryable
        assert error.status == status and not error.offer_refused and not error.maybe_done_already
        message = str(error)
        assert f"the proxy did not open the tunnel to OpenAI: {status} {reason}" in message
        assert says in message and "s3cret" not in message


async def test_a_tunnel_the_proxy_never_opens_sent_nothing_to_openai() -> None:
    """A proxy that takes the ``CONNECT`` and never answers it: the attempt times out with nothing sent to
    OpenAI (a REFER is tried again), not as one that went unanswered and may have been carried out."""
    from websockets.proxy import parse_proxy

    from sideband.upstream.openai import CallControl, UpstreamError

    heads: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            await reader.read()  # never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    proxy_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with aiohttp.ClientSession() as http:
            control = CallControl(http, PROXIED_OPENAI, "sk-test", parse_proxy(proxy_url))
            with pytest.raises(UpstreamError) as refer:
                await control.refer("rtc_1", "tel:+14155550123", timeout=0.3)
            with pytest.raises(UpstreamError) as created:
                await control.create_call("v=0", {"type": "realtime"}, timeout=0.3)
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()
    assert [head.split(b" ", 1)[0] for head in heads] == [b"CONNECT"] * 2
    for error in (refer.value, created.value):
        assert error.unsent and not error.maybe_carried_out and error.retryable and error.status is None
        assert "timed out" in str(error) and "before the request was sent" in str(error)


async def test_a_refer_the_proxy_would_not_tunnel_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy could not reach OpenAI (502): the REFER went nowhere, so it is tried again for the budget
    (not taken as maybe handed to the carrier), and the webhook is answered for a redelivery."""
    async with RefusingProxy(502, "Bad Gateway") as proxy:
        _proxied(monkeypatch, f"http://127.0.0.1:{proxy.port}")
        app = Sideband()
        app.on_incoming(lambda call: Refer("tel:+14155550123"))
        async with (
            Simulator() as sim,
            run_app(app, sim, openai_base_url=PROXIED_OPENAI, accept_budget=1.0) as harness,
        ):
            call = sim.create_call(Script([]))
            with capture_logs() as logs:
                result = await harness.sender.deliver(sim.incoming_event(call), max_attempts=1)
    assert result.status == 503
    assert len(proxy.seen) > 1 and all(method == "CONNECT" for method, _, _ in proxy.seen)
    events = [e["event"] for e in logs]
    assert "call.refer_uncertain" not in events and "call.referred" not in events
    assert "call.answer_failed" in events


async def test_an_accept_the_proxy_refuses_credentials_for_is_not_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The proxy refused its credentials (407): no retry mends that, so the accept is not tried again, nor
    taken as maybe carried out (the call was never answered: nothing is kept for a redelivery to attach
    to); the error line names the proxy setting."""
    async with RefusingProxy(407, "Proxy Authentication Required") as proxy:
        _proxied(monkeypatch, f"http://svc:wrong@127.0.0.1:{proxy.port}")
        async with Simulator() as sim, run_app(Sideband(), sim, openai_base_url=PROXIED_OPENAI) as harness:
            call = sim.create_call(Script([]))
            with capture_logs() as logs:
                result = await harness.sender.deliver(sim.incoming_event(call), max_attempts=1)
            assert await harness.service.store.claim(f"accept_uncertain:{call.call_id}", 1.0)  # nothing kept
    assert result.status == 200
    assert [target for _, target, _ in proxy.seen] == ["openai.test:443", "openai.test:443"]  # accept, reject
    (failed,) = [e for e in logs if e["event"] == "call.accept_failed"]
    assert failed["status"] == 407 and "WSS_PROXY or HTTPS_PROXY" in failed["error"]
    assert "wrong" not in failed["error"]
    assert not [e for e in logs if e["event"] in ("call.accept_retry", "call.accept_uncertain")]


async def test_proxy_credentials_go_on_the_connect_for_a_wss_base() -> None:
    """A ``wss://`` OPENAI_BASE_URL is reached over TLS as an ``https://`` one: through a proxy, its
    credentials go on the ``CONNECT``, never inside the tunnel to OpenAI."""
    from websockets.proxy import parse_proxy

    from sideband.upstream.openai import CallControl, UpstreamError

    expected = "Basic " + base64.b64encode(b"svc:s3cret").decode()
    async with RefusingProxy(502, "Bad Gateway", auth=expected) as proxy, aiohttp.ClientSession() as http:
        proxy_url = f"http://svc:s3cret@127.0.0.1:{proxy.port}"
        control = CallControl(http, "wss://openai.test/v1", "sk-test", parse_proxy(proxy_url))
        with pytest.raises(UpstreamError):  # (the proxy opens no tunnel)
            await control.hangup("rtc_1", timeout=5)
    assert proxy.seen == [("CONNECT", "openai.test:443", expected)]


async def test_a_407_to_a_plain_http_request_names_the_proxy_setting() -> None:
    """For a plain-``http`` base the proxy answers the request itself: its 407 (never OpenAI's) is not
    tried again and names the proxy variables to check."""
    from websockets.proxy import parse_proxy

    from sideband.upstream.openai import CallControl, UpstreamError

    async with RefusingProxy(407, "Proxy Authentication Required") as proxy, aiohttp.ClientSession() as http:
        proxy_url = f"http://svc:wrong@127.0.0.1:{proxy.port}"
        control = CallControl(http, f"http://{OPENAI_HOST}/v1", "sk-test", parse_proxy(proxy_url))
        with pytest.raises(UpstreamError) as refused:
            await control.hangup("rtc_1", timeout=5)
    assert [(method, target) for method, target, _ in proxy.seen] == [
        ("POST", f"http://{OPENAI_HOST}/v1/realtime/calls/rtc_1/hangup")
    ]
    assert refused.value.status == 407 and not refused.value.retryable
    assert "check the user:password of its URL: WS_PROXY, HTTPS_PROXY or HTTP_PROXY" in str(refused.value)


VOWEL_HOST = "vowel.test"


async def test_an_engine_sessions_mint_and_socket_both_go_through_the_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host that reaches its vowel stack only through a proxy: the core's mint takes the proxy the
    engine's socket takes (the same variables), credentials as ``Proxy-Authorization``."""
    from sideband.settings import load_settings
    from sideband.testing.vowel import VowelSimulator, when
    from sideband.vowel import EngineSession

    proxy = ForwardProxy({VOWEL_HOST: "127.0.0.1"})
    await proxy.start()
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "WS_PROXY", "ws_proxy", "SOCKS_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://svc:s3cret@127.0.0.1:{proxy.port}")
    expected_auth = "Basic " + base64.b64encode(b"svc:s3cret").decode()
    try:
        async with VowelSimulator() as vowel:
            vowel.script([when("hello", reply="Hi there.")])
            values = {
                **vowel.settings_values(),
                "vowel_core_url": vowel.core_url.replace("127.0.0.1", VOWEL_HOST),
                "vowel_engine_url": vowel.engine_url.replace("127.0.0.1", VOWEL_HOST),
            }
            settings = load_settings(values, environ={})
            async with EngineSession.open(settings, Sideband(), mint_budget=2) as session:
                assert (await session.say("hello")).text == "Hi there."
    finally:
        await proxy.close()
    host = f"{VOWEL_HOST}:{vowel.port}"
    assert ("POST", f"http://{host}/core/v1/realtime/sessions", expected_auth) in proxy.seen  # the mint
    assert ("CONNECT", host, expected_auth) in proxy.seen  # the engine's socket, tunnelled
    assert [m.status for m in vowel.mints] == [200]


async def test_a_proxy_the_mint_cannot_use_fails_the_engine_session_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sideband.settings import load_settings
    from sideband.testing.vowel import VowelSimulator
    from sideband.vowel import EngineError, EngineSession

    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "WS_PROXY", "ws_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SOCKS_PROXY", "socks5h://user:s3cret@127.0.0.1:1080")
    async with VowelSimulator() as vowel:
        values = {**vowel.settings_values(), "vowel_core_url": f"http://{VOWEL_HOST}:{vowel.port}/core"}
        with pytest.raises(EngineError) as info:
            async with EngineSession.open(load_settings(values, environ={}), Sideband()):
                pass
    assert info.value.reason == "not_configured"
    message = str(info.value)
    assert (
        "is a socks5h proxy" in message
        and "(from WS_PROXY, SOCKS_PROXY, HTTPS_PROXY or HTTP_PROXY)" in message
    )
    assert "s3cret" not in message and vowel.mints == []


@pytest.mark.parametrize("core_url", ["https://vowel.test/core", "wss://vowel.test/core"])
async def test_a_mint_through_a_proxy_sends_its_credentials_on_the_connect(core_url: str) -> None:
    """The vowel core at an ``https://`` or ``wss://`` URL is reached over TLS: through a proxy, its
    credentials go on the ``CONNECT``, never inside the tunnel to the core."""
    from websockets.proxy import parse_proxy

    from sideband.upstream.openai import UpstreamError
    from sideband.upstream.vowel import VowelCore

    expected = "Basic " + base64.b64encode(b"svc:s3cret").decode()
    async with RefusingProxy(502, "Bad Gateway", auth=expected) as proxy, aiohttp.ClientSession() as http:
        core = VowelCore(http, core_url, "vk-test", parse_proxy(f"http://svc:s3cret@127.0.0.1:{proxy.port}"))
        with pytest.raises(UpstreamError) as refused:  # (the proxy opens no tunnel)
            await core.mint({"model": "m"}, timeout=5)
    assert proxy.seen == [("CONNECT", "vowel.test:443", expected)]
    assert refused.value.retryable and refused.value.unsent  # (its 502: the core out of its reach)


@pytest.mark.parametrize(("status", "reason"), [(407, "Proxy Authentication Required"), (403, "Forbidden")])
async def test_a_mint_the_proxy_refuses_is_not_tried_again_and_names_the_proxy(
    monkeypatch: pytest.MonkeyPatch, status: int, reason: str
) -> None:
    """A proxy that will not open the tunnel to the vowel core for its credentials or its rules: nothing
    reached the core, no retry mends it, and the error names the proxy variables (not the password)."""
    from sideband.upstream.openai import UpstreamError
    from sideband.upstream.vowel import VowelCore, core_proxy

    async with RefusingProxy(status, reason) as proxy, aiohttp.ClientSession() as http:
        _proxied(monkeypatch, f"http://svc:wrong@127.0.0.1:{proxy.port}")
        core_url = "https://vowel.test/core"
        core = VowelCore(http, core_url, "vk-test", core_proxy(core_url))
        with pytest.raises(UpstreamError) as refused:
            await core.mint({"model": "m"}, timeout=5)
    error = refused.value
    assert (error.status, error.retryable, error.unsent) == (status, False, True)
    assert "the proxy did not open the tunnel to the vowel core" in str(error)
    assert "WSS_PROXY, SOCKS_PROXY or HTTPS_PROXY" in str(error) and "wrong" not in str(error)


@pytest.mark.parametrize(("status", "reason"), [(407, "Proxy Authentication Required"), (403, "Forbidden")])
async def test_check_online_names_the_proxy_that_refused_the_tunnel(
    monkeypatch: pytest.MonkeyPatch, status: int, reason: str
) -> None:
    """``sideband check --online`` through a proxy that opens no tunnel blames the proxy and names its
    variables, neither the key (a 403 for every config) nor OpenAI."""
    from sideband.cli import check

    async with RefusingProxy(status, reason) as proxy:
        _proxied(monkeypatch, f"http://svc:s3cret@127.0.0.1:{proxy.port}")
        async with Simulator() as sim:
            with pytest.raises(SettingsError) as refused:
                await check(settings_for(sim, openai_base_url=PROXIED_OPENAI), Sideband(), online=True)
    message = str(refused.value)
    assert f"the proxy did not open the tunnel to OpenAI: {status} {reason}" in message
    assert "HTTPS_PROXY" in message and "s3cret" not in message
    assert "OPENAI_API_KEY" not in message and "answered the check" not in message
    assert proxy.seen and all(method == "CONNECT" for method, _, _ in proxy.seen)
