"""A static route table: dialed number → overrides or a refusal, loaded once from TOML at start.

```toml
[default]                      # optional: calls to numbers not listed below
instructions = "You are the front desk."

[routes."+18005551212"]
instructions = "You are the billing desk."
voice = "cedar"
greeting = "Greet the caller as the billing desk."
tools = ["lookup_order", "transfer_call"]
max_call_seconds = 900
max_idle_seconds = 60

[routes."+18005550000"]
reject = 486                   # SIP status

[routes."+18005559999"]
refer = "tel:+14155550123"     # send elsewhere without answering
```
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sideband.app import parse_number
from sideband.session import Accept, Decision, Refer, Reject

__all__ = ["RouteError", "RouteTable"]


class RouteError(ValueError):
    """The route file is unreadable or invalid; ``str()`` is one line naming the place."""


class _Route(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    instructions: str | None = None
    voice: str | None = None
    greeting: str | None = None
    tools: list[str] | None = None
    max_call_seconds: float | None = Field(default=None, gt=0)
    max_idle_seconds: float | None = Field(default=None, gt=0)
    session: dict[str, Any] = Field(default_factory=dict)
    reject: int | None = Field(default=None, ge=400, le=699)
    refer: str | None = None

    @model_validator(mode="after")
    def _one_outcome(self) -> _Route:
        if self.reject is not None and self.refer is not None:
            raise ValueError("a route may reject or refer, not both")
        if self.refer is not None and not self.refer.startswith(("tel:", "sip:", "sips:")):
            raise ValueError("refer must be a tel: or sip: URI")
        return self

    def decision(self) -> Decision:
        if self.reject is not None:
            return Reject(self.reject)
        if self.refer is not None:
            return Refer(self.refer)
        return Accept(
            instructions=self.instructions,
            voice=self.voice,
            greeting=self.greeting,
            tools=tuple(self.tools) if self.tools is not None else None,
            session=dict(self.session),
            max_call_duration=self.max_call_seconds,
            max_idle_duration=self.max_idle_seconds,
        )


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: _Route | None = None
    routes: dict[str, _Route] = Field(default_factory=dict)


class RouteTable:
    """Decisions per dialed number, resolved before the call rings (a dict lookup on the answer path)."""

    def __init__(self, routes: Mapping[str, Decision], default: Decision | None = None) -> None:
        self._routes = dict(routes)
        self.default = default

    def __len__(self) -> int:
        return len(self._routes)

    def match(self, dialed: str | None) -> Decision | None:
        """The decision for a dialed number (E.164 or as parsed), else the default (or ``None``)."""
        if dialed is not None:
            found = self._routes.get(dialed)
            if found is not None:
                return found
        return self.default

    @classmethod
    def load(cls, path: Path | str, tool_names: Iterable[str] = ()) -> RouteTable:
        """Read and validate a TOML route file; unknown tool names are errors."""
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise RouteError(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise RouteError(f"{path}: {exc}") from None
        return cls.from_dict(raw, tool_names, source=str(path))

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any], tool_names: Iterable[str] = (), source: str = "routes"
    ) -> RouteTable:
        """Build from already-parsed data (same rules as :meth:`load`)."""
        try:
            parsed = _File.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise RouteError(f"{source}: {where}: {err['msg']}") from None
        known = set(tool_names)
        routes: dict[str, Decision] = {}
        entries = [("default", parsed.default)] if parsed.default else []
        entries += list(parsed.routes.items())
        for number, route in entries:
            unknown = sorted(set(route.tools or ()) - known) if known else []
            if unknown:
                raise RouteError(f"{source}: routes.{number}.tools: unknown tool {', '.join(unknown)}")
            if number == "default" and route is parsed.default:
                continue
            key = parse_number(f"tel:{number}") or number
            routes[key] = route.decision()
        default = parsed.default.decision() if parsed.default else None
        return cls(routes, default)
