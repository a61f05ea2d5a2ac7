"""Small WebSocket helpers shared by the OpenAI and vowel connectors."""

from __future__ import annotations

import logging

from websockets.asyncio.client import ClientConnection
from websockets.proxy import get_proxy
from websockets.uri import parse_uri

__all__ = ["quiet_logger", "resolve_proxy", "slim", "ws_url"]


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


def quiet_logger(name: str = "websockets.client") -> logging.LoggerAdapter[logging.Logger]:
    """A websockets logger that never emits DEBUG lines (they would carry the Authorization header)."""
    return _NoDebugLogger(logging.getLogger(name), {})


def resolve_proxy(url: str) -> str | None:
    """The proxy for WebSocket connections to ``url`` (``HTTPS_PROXY``/``NO_PROXY``… as websockets reads
    them), resolved once: websockets would read the whole environment again on every connect."""
    return get_proxy(parse_uri(url))


def slim(ws: ClientConnection) -> ClientConnection:
    """Drop the opening handshake request (headers, our Authorization among them) that a live connection
    no longer needs. The response must stay: websockets reads ``response is None`` as "handshake
    pending"."""
    ws.request = None
    return ws
