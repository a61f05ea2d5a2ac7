"""The call context handed to tools and hooks."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["NO_ACTIONS", "CallActions", "CallContext", "SipHeader"]


@dataclass(frozen=True, slots=True)
class SipHeader:
    """One SIP header from the INVITE, in order. **Untrusted**: the caller controls it."""

    name: str
    value: str


class CallActions(Protocol):
    """What a tool or hook may ask of the live call (implemented by the call driver)."""

    def hangup(self, reason: str = ...) -> Awaitable[None]: ...
    def transfer(self, target: str) -> Awaitable[None]: ...
    def say(self, instructions: str) -> None: ...
    def update_session(self, **fields: Any) -> None: ...


class _NoActions:
    """Actions for a context with no live call behind it (unit tests, dry runs)."""

    async def hangup(self, reason: str = "hangup") -> None:
        raise RuntimeError("no live call behind this context")

    async def transfer(self, target: str) -> None:
        raise RuntimeError("no live call behind this context")

    def say(self, instructions: str) -> None:
        raise RuntimeError("no live call behind this context")

    def update_session(self, **fields: Any) -> None:
        raise RuntimeError("no live call behind this context")


NO_ACTIONS: CallActions = _NoActions()
"""Actions for a context with no live call behind it (stateless, shared)."""


@dataclass(slots=True)
class CallContext:
    """Everything a tool knows about the call it serves.

    ``from_number`` and ``to_number`` are parsed from the SIP ``From``/``To`` headers (E.164 where
    possible). Like ``sip_headers`` they come from the caller's side of the call and are **untrusted**:
    use them to personalise, never to authorise.
    """

    call_id: str
    source: str = "sip"  # "sip", "webrtc" or "vowel"
    from_number: str | None = None
    to_number: str | None = None
    sip_headers: tuple[SipHeader, ...] = ()
    state: dict[str, Any] = field(default_factory=dict)
    actions: CallActions = NO_ACTIONS

    def header(self, name: str) -> str | None:
        """First value of the SIP header ``name`` (case-insensitive), untrusted."""
        lname = name.lower()
        for h in self.sip_headers:
            if h.name.lower() == lname:
                return h.value
        return None

    async def hangup(self, reason: str = "hangup") -> None:
        """End the call once in-flight tool outputs and the model's last words are out."""
        await self.actions.hangup(reason)

    async def transfer(self, target: str) -> None:
        """Transfer (SIP REFER) to ``target``, which must be in the app's allow-list."""
        await self.actions.transfer(target)

    def say(self, instructions: str) -> None:
        """Ask the model to speak now, following ``instructions``."""
        self.actions.say(instructions)

    def update_session(self, **fields: Any) -> None:
        """Send a ``session.update`` with these fields (``type`` is added)."""
        self.actions.update_session(**fields)
