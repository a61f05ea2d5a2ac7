"""Small WebSocket helpers shared by the OpenAI and vowel connectors."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidProxy, InvalidStatus
from websockets.extensions.permessage_deflate import enable_client_permessage_deflate
from websockets.frames import Frame, Opcode
from websockets.protocol import CLOSED, OPEN, Event
from websockets.proxy import Proxy, get_proxy, parse_proxy
from websockets.uri import parse_uri

__all__ = [
    "MAX_MESSAGE",
    "PushConnection",
    "client_tls",
    "open_socket",
    "quiet_logger",
    "resolve_proxy",
    "ws_url",
]

_DATA = frozenset({Opcode.TEXT, Opcode.BINARY, Opcode.CONT})

MAX_MESSAGE = 64 * 1024 * 1024
"""The largest message a sideband takes (bytes): the server echoes whole conversation items (an image a
caller's app added, a long document) in its events. A larger one closes the socket (1009), and the call
re-attaches."""


def ws_url(http_url: str) -> str:
    """The WebSocket form of a base URL: ``https→wss``, ``http→ws``; trailing slashes dropped."""
    base = http_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :]
    if base.startswith("http://"):
        return "ws://" + base[len("http://") :]
    return base


class _NoDebugLogger(logging.LoggerAdapter[logging.Logger]):
    """websockets dumps request headers (bearer keys and tokens) at DEBUG level: never do that."""

    def isEnabledFor(self, level: int) -> bool:
        return level > logging.DEBUG and self.logger.isEnabledFor(level)


@functools.cache
def quiet_logger(name: str = "websockets.client") -> logging.LoggerAdapter[logging.Logger]:
    """A websockets logger that never emits DEBUG lines (they would carry the Authorization header)."""
    return _NoDebugLogger(logging.getLogger(name), {})


def client_tls() -> ssl.SSLContext:
    """A client TLS context with the system's CA certificates and hostname checks: build one per
    process (it takes tens of milliseconds) and share it between connections."""
    return ssl.create_default_context()


def resolve_proxy(url: str) -> str | None:
    """The proxy for WebSocket connections to ``url`` (``HTTPS_PROXY``/``NO_PROXY``… as websockets reads
    them), resolved once: websockets would read the whole environment again on every connect. None for a
    loopback host (``localhost``, ``127.0.0.0/8``, ``::1``), as Go's HTTP client does: a proxy elsewhere
    cannot reach it (the simulator of ``sideband demo``, a local engine)."""
    uri = parse_uri(url)
    host = uri.host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return None
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return None
    return get_proxy(uri)


def ws_proxy_names(url: str) -> str:
    """The variables that may name the proxy for the WebSocket URL ``url``, in the order websockets reads
    them (for a message)."""
    if url.startswith("wss://"):
        return "WSS_PROXY, SOCKS_PROXY or HTTPS_PROXY"
    return "WS_PROXY, SOCKS_PROXY, HTTPS_PROXY or HTTP_PROXY"


def http_proxy(found: str, what: str, carried: str) -> Proxy:
    """``found``, the proxy URL :func:`resolve_proxy` picked, parsed; ``what`` names it in messages (``the
    proxy for … (from …)``), ``carried`` what goes through HTTP proxies only. Raises :class:`ValueError`
    for one that is malformed or not an HTTP proxy, whose message never quotes its credentials."""
    try:
        proxy = parse_proxy(found)
    except InvalidProxy as exc:  # its text would quote the URL, credentials and all
        raise ValueError(f"{what} is not valid: {exc.msg}") from None
    except ValueError:  # (urllib's words quote the part it could not read: a password, say)
        raise ValueError(
            f"{what} is not valid: it cannot be read (a password holding / ? # @ [ or ] must be "
            "percent-encoded, and the port must be a number)"
        ) from None
    if proxy.scheme not in ("http", "https"):
        raise ValueError(f"{what} is a {proxy.scheme} proxy: {carried} through HTTP proxies only")
    return proxy


class PushConnection(ClientConnection):
    """A client connection that hands each message to a callback the moment it is parsed.

    websockets' ``recv()`` path queues every message and wakes a reader task for each one. A call driver
    that decodes and dispatches events synchronously needs neither: with :meth:`start`, every data
    message (text or binary, as ``bytes``; fragments joined) goes to ``on_message`` from the transport's
    ``data_received``, and ``on_close`` runs once the connection is lost (at the latest when the close
    timeout is up after the server's close frame, if the server leaves the TCP connection open).
    Messages that arrive before :meth:`start` (between the handshake and the driver's first read) are
    held and delivered first.
    Control frames (ping, pong, close) keep websockets' own handling; ``send``, ``ping`` and ``close``
    work as usual. Pass the class as ``create_connection`` to :func:`websockets.asyncio.client.connect`.
    """

    # Slots: more keys in the inherited instance dict would make it resize (1.5 KiB per call).
    __slots__ = ("_closer", "_held", "_on_close", "_on_message", "_parts")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # websockets gives every connection two deques, 760 bytes each (a 64-slot block up front): the
        # flow-control waiters, which it only appends to, removes from and iterates (a list does as
        # well), and the queue of recv() (see connection_made), which a push connection never reads.
        self.drain_waiters = []  # type: ignore[assignment]
        self._on_message: Callable[[bytes], None] | None = None
        self._on_close: Callable[[], None] | None = None
        self._held: list[bytes] | None = []  # None once stopped: later messages are dropped
        self._parts: list[bytes] | None = None  # a fragmented message being joined
        self._closer: asyncio.TimerHandle | None = None  # aborts a peer slow to close after its close frame

    def start(self, on_message: Callable[[bytes], None], on_close: Callable[[], None]) -> None:
        """Deliver the held messages, then every later one, to ``on_message``; ``on_close`` when lost.

        ``on_close`` runs at once if the connection was lost already. Exceptions from the callbacks are
        the caller's to handle: they would otherwise surface in the event loop's exception handler.
        """
        held, self._held = self._held or [], []
        self._on_message, self._on_close = on_message, on_close
        for data in held:
            on_message(data)
        if self.protocol.state is CLOSED:
            on_close()

    def stop(self) -> None:
        """Detach the callbacks; messages that arrive later are dropped."""
        self._on_message = self._on_close = None
        self._held = None

    def send_now(self, frames: Sequence[bytes]) -> bool:
        """Write ``frames`` (UTF-8 JSON, as text frames) at once, in one socket write, if the connection is
        open and its write buffer is not full; return False, having written nothing, otherwise (``send``
        then waits for the buffer, or raises :exc:`~websockets.exceptions.ConnectionClosed`).

        The same frames as ``send(frame, text=True)`` for each, without its per-frame context manager and
        without one system call per frame."""
        protocol, transport = self.protocol, self.transport
        if protocol.state is not OPEN or self.paused or transport.is_closing():
            return False
        for frame in frames:
            protocol.send_text(frame)
        transport.writelines(protocol.data_to_send())
        return True

    def process_event(self, event: Event) -> None:
        if self.response is None or not isinstance(event, Frame) or event.opcode not in _DATA:
            super().process_event(event)  # the handshake response and control frames
            return
        payload = event.data
        data = payload if isinstance(payload, bytes) else bytes(payload)
        if isinstance(payload, bytearray):
            # websockets' parser keeps its last frame until the next one arrives: while a call idles,
            # often the whole session echo (KiBs per call). Its copy is ``data``; the frame keeps nothing.
            payload.clear()
        if event.opcode is Opcode.CONT:
            if self._parts is None:  # websockets fails the connection on a stray continuation
                return
            self._parts.append(data)
            if not event.fin:
                return
            data, self._parts = b"".join(self._parts), None
        elif not event.fin:
            self._parts = [data]
            return
        if self._on_message is not None:
            self._on_message(data)
        elif self._held is not None:
            self._held.append(data)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.close_deadline is not None and self._closer is None:
            self._close_by_deadline()

    def _close_by_deadline(self) -> None:
        """A close is under way from what was received: the server's close frame (ours answered it), or
        a frame we could not read (our close, 1002/1007/1009, went out). websockets now waits for the
        server to close the TCP connection, checking its close timeout only when something is sent, and
        a push connection sends nothing. A server that never closes it (OpenAI's close is not always
        followed by one) would hold the call until the next keepalive ping; the connection is aborted
        at the close deadline instead, and ``on_close`` runs."""
        deadline = self.close_deadline
        if deadline is None or self.protocol.state is CLOSED:
            return
        self._closer = self.loop.call_at(deadline, self.transport.abort)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.recv_messages.frames.queue = []  # type: ignore[assignment]  # never read (see __init__)

    async def handshake_fast(self, headers: dict[str, str]) -> None:
        """The opening handshake with ``headers`` added to the request, on the connection that
        ``loop.create_connection`` just opened: websockets' own request and response handling (key, checks,
        extensions), without the waiting machinery of :meth:`handshake`. Raises what it raises."""
        protocol = self.protocol
        self.request = request = protocol.connect()
        request.headers.update(headers)
        protocol.send_request(request)
        self.transport.writelines(protocol.data_to_send())
        await self.response_rcvd  # also done when the connection is lost first (see connection_lost)
        if protocol.handshake_exc is not None:  # (its references are dropped in connection_lost)
            raise protocol.handshake_exc

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._closer is not None:
            self._closer.cancel()
            self._closer = None
        parser_exc = self.protocol.parser_exc
        if parser_exc is not None:
            # websockets keeps the parser's exception (an abnormal close's EOFError, a frame too big)
            # for ConnectionClosed's __cause__; its traceback holds the parser's frame, which holds the
            # protocol: a cycle. The exception itself is all the cause needs.
            parser_exc.__traceback__ = None
        # A handshake that failed (timed out, refused, a bad upgrade; ours or websockets' connect()) keeps
        # its error on the protocol and the response, with the frames it was raised through: cycles. The
        # connection is lost, and the exception itself (no traceback) is all anyone reads now.
        if self.response is not None:
            self.response._exception = None
        failed: BaseException | None = self.protocol.handshake_exc
        for _ in range(8):  # the error, and those it came from
            if failed is None:
                break
            failed.__traceback__ = None
            failed = failed.__cause__ or failed.__context__
        if not self.response_rcvd.done():  # lost during the handshake: handshake_exc says why
            self.response_rcvd.set_result(None)
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


async def open_socket(
    url: str,
    bearer: str,
    *,
    compression: bool,
    open_timeout: float,
    max_size: int,
    proxy: str | None,
    tls: ssl.SSLContext | None = None,
) -> PushConnection:
    """Open a :class:`PushConnection` with a Bearer credential, the settings both upstreams share, and
    no keepalive task (keepalive is the call driver's: a timer, not a task per connection).

    ``tls``: the client TLS context for ``wss://`` URLs, shared by the process's connections. Without
    one, every connection builds its own (tens of milliseconds of CA loading on the event loop, and
    most of a MiB kept per connection).

    Raises what :func:`websockets.asyncio.client.connect` raises; the callers map it to their errors.
    """
    ws: ClientConnection | None = None
    if proxy is None:
        ws = await _open_direct(
            url, bearer, compression=compression, open_timeout=open_timeout, max_size=max_size, tls=tls
        )
    if ws is None:  # through a proxy, or redirected: websockets' connect() knows the way
        ws = await _open_connect(
            url,
            bearer,
            compression=compression,
            open_timeout=open_timeout,
            max_size=max_size,
            proxy=proxy,
            tls=tls,
        )
    assert isinstance(ws, PushConnection)
    # Drop what a live connection no longer needs from the opening handshake: the request (headers, the
    # Authorization among them) and the response's headers (over a KiB per call from a real server). The
    # response object stays: websockets reads ``response is None`` as "handshake pending".
    ws.request = None
    if ws.response is not None:
        ws.response.headers.clear()
    return ws


async def _open_direct(
    url: str,
    bearer: str,
    *,
    compression: bool,
    open_timeout: float,
    max_size: int,
    tls: ssl.SSLContext | None,
) -> PushConnection | None:
    """A direct connection: ``loop.create_connection`` and websockets' Sans-I/O handshake, about 0.15 ms
    of CPU less per connection than :func:`websockets.asyncio.client.connect`, the same requests and
    checks. None when the server redirects (websockets' ``connect()`` follows redirects, with its
    rules on credentials and TLS)."""
    uri = parse_uri(url)
    connection = PushConnection(
        ClientProtocol(
            uri,
            extensions=enable_client_permessage_deflate(None) if compression else None,
            max_size=max_size,
            logger=quiet_logger(),
        ),
        ping_interval=None,
        close_timeout=2.0,
    )
    loop = asyncio.get_running_loop()
    secure: dict[str, Any] = (
        {"ssl": tls if tls is not None else True, "server_hostname": uri.host} if uri.secure else {}
    )
    try:
        async with asyncio.timeout(open_timeout):
            await loop.create_connection(lambda: connection, uri.host, uri.port, **secure)
            try:
                await connection.handshake_fast(
                    {"Authorization": f"Bearer {bearer}", "User-Agent": "sideband"}
                )
            except BaseException:
                connection.transport.abort()
                raise
    except TimeoutError as exc:
        raise TimeoutError("timed out during opening handshake") from exc
    except InvalidStatus as exc:
        if 300 <= exc.response.status_code < 400 and "Location" in exc.response.headers:
            return None
        raise
    return connection


async def _open_connect(
    url: str,
    bearer: str,
    *,
    compression: bool,
    open_timeout: float,
    max_size: int,
    proxy: str | None,
    tls: ssl.SSLContext | None,
) -> ClientConnection:
    extra: dict[str, Any] = {}
    if tls is not None and url.startswith("wss://"):  # websockets refuses ssl= for ws://
        extra["ssl"] = tls
    return await connect(
        url,
        additional_headers={"Authorization": f"Bearer {bearer}"},
        compression="deflate" if compression else None,
        open_timeout=open_timeout,
        max_size=max_size,
        user_agent_header="sideband",
        ping_interval=None,
        close_timeout=2.0,
        logger=quiet_logger(),
        proxy=proxy,
        create_connection=PushConnection,
        **extra,
    )
