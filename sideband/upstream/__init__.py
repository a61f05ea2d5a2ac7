"""Upstream: the only room that knows URLs and HTTP status codes."""

from sideband.upstream.openai import (
    CallControl,
    CallGone,
    SidebandRefused,
    UpstreamError,
    connect_sideband,
)

__all__ = ["CallControl", "CallGone", "SidebandRefused", "UpstreamError", "connect_sideband"]
