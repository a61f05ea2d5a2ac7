"""sideband — business logic beside live voice-AI calls.

Verified OpenAI SIP webhooks, call-scoped sideband WebSockets, tools run exactly once, WebRTC doors,
and trusted-server sessions, behind one small API::

    from sideband import Sideband, CallContext

    app = Sideband(instructions="You are the order desk.", voice="marin")

    @app.tool
    async def lookup_order(order_id: str, ctx: CallContext) -> dict: ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sideband.app import IncomingCall, Sideband
    from sideband.context import CallContext, SipHeader
    from sideband.runtime.driver import CallSummary, EndReason, ToolOutcome, ToolRecord, TranscriptRole
    from sideband.session import Accept, DecisionError, Refer, Reject, SessionConfig, SessionConfigError
    from sideband.settings import Settings, SettingsError, load_settings
    from sideband.tools import ToolError, ToolResult, TransferNotAllowed
    from sideband.usage import Usage

    __version__: str

__all__ = [
    "Accept",
    "CallContext",
    "CallSummary",
    "DecisionError",
    "EndReason",
    "IncomingCall",
    "Refer",
    "Reject",
    "SessionConfig",
    "SessionConfigError",
    "Settings",
    "SettingsError",
    "Sideband",
    "SipHeader",
    "ToolError",
    "ToolOutcome",
    "ToolRecord",
    "ToolResult",
    "TranscriptRole",
    "TransferNotAllowed",
    "Usage",
    "load_settings",
]

_HOMES = {
    **dict.fromkeys(("IncomingCall", "Sideband"), "sideband.app"),
    **dict.fromkeys(("CallContext", "SipHeader"), "sideband.context"),
    **dict.fromkeys(
        ("CallSummary", "EndReason", "ToolOutcome", "ToolRecord", "TranscriptRole"), "sideband.runtime.driver"
    ),
    **dict.fromkeys(
        ("Accept", "DecisionError", "Refer", "Reject", "SessionConfig", "SessionConfigError"),
        "sideband.session",
    ),
    **dict.fromkeys(("Settings", "SettingsError", "load_settings"), "sideband.settings"),
    **dict.fromkeys(("ToolError", "ToolResult", "TransferNotAllowed"), "sideband.tools"),
    "Usage": "sideband.usage",
}
"""The module each exported name comes from."""

if not TYPE_CHECKING:  # (type checkers read the imports above, and so still catch a misspelt name)

    def __getattr__(name: str) -> Any:
        """Each name is imported on first use (PEP 562): loading the pytest plugin, which lives in this
        package, imports no app, server or HTTP client into a test run that uses none."""
        home = _HOMES.get(name)
        if home is not None:
            return getattr(importlib.import_module(home), name)
        if name == "__version__":
            return _version()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _version() -> str:
    """The version as installed: pyproject.toml is the one place it is written."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sideband")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, "__version__"})
