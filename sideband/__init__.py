"""sideband — business logic beside live voice-AI calls.

Verified OpenAI SIP webhooks, call-scoped sideband WebSockets, tools run exactly once, WebRTC doors,
and trusted-server sessions, behind one small API::

    from sideband import Sideband, CallContext

    app = Sideband(instructions="You are the order desk.", voice="marin")

    @app.tool
    async def lookup_order(order_id: str, ctx: CallContext) -> dict: ...
"""

from importlib.metadata import PackageNotFoundError, version

from sideband.app import IncomingCall, Sideband
from sideband.context import CallContext, SipHeader
from sideband.runtime.driver import CallSummary, EndReason, ToolOutcome, ToolRecord, TranscriptRole
from sideband.session import Accept, DecisionError, Refer, Reject, SessionConfig, SessionConfigError
from sideband.settings import Settings, SettingsError, load_settings
from sideband.tools import ToolError, ToolResult, TransferNotAllowed
from sideband.usage import Usage

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

try:
    __version__ = version("sideband")  # as installed: pyproject.toml is the one place it is written
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"
