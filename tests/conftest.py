"""Shared fixtures: the simulator (from sideband.testing's pytest plugin) plus our server on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import pytest
import pytest_asyncio
import structlog
import uvloop
from structlog.testing import LogCapture

from sideband import CallContext, Sideband, ToolError
from sideband.runtime.machine import MachineConfig
from sideband.service import Service
from sideband.settings import Settings
from sideband.testing import Harness, SimCall, Simulator, run_app
from sideband.testing.harness import harness_settings


def make_app(*, browsers: bool = True, **kw: Any) -> Sideband:
    """A small app with tools that cover the interesting outcomes (``browsers``: with the WebRTC doors
    open to anyone; without, a test opens them with an ``authorize_browser`` hook of its own)."""
    app = Sideband(
        instructions="You are a test desk.",
        voice="marin",
        transfer_targets={"human": "tel:+14155550123"},
        **kw,
    )
    app.enable_end_call()
    app.enable_transfer()
    if browsers:
        app.authorize_browser(lambda request: True)  # the WebRTC doors, open to the tests

    @app.tool
    async def lookup_order(order_id: str, ctx: CallContext) -> dict[str, Any]:
        """Look up an order."""
        ctx.state["looked_up"] = order_id
        return {"order_id": order_id, "status": "shipped"}

    @app.tool
    async def broken(ctx: CallContext) -> str:
        """Always fails."""
        raise RuntimeError("secret database password in message")

    @app.tool
    def refuse(reason: str) -> str:
        """A sync tool that refuses with a model-visible message."""
        raise ToolError(f"cannot do that: {reason}")

    return app


Stack = Harness


TEST_SETTINGS: dict[str, Any] = {
    "max_idle_duration": 30.0,
    "accept_budget": 1.5,
    "accept_attempt_timeout": 0.5,
    "reattach_attempts": 2,
}


def transfer_window(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Make the calls the service starts wait ``seconds`` (45 by default) after a refer's 200 for the
    server to end them before taking the transfer as failed (``MachineConfig.transfer_confirm``)."""
    made = Service._machine_config

    def config(service: Service, plan: Any) -> MachineConfig:
        return dataclasses.replace(made(service, plan), transfer_confirm=seconds)

    monkeypatch.setattr(Service, "_machine_config", config)


def settings_for(sim: Simulator, **overrides: Any) -> Settings:
    return harness_settings(sim, **{**TEST_SETTINGS, **overrides})


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every test runs on uvloop, the event loop `sideband serve` runs on."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def app(request: pytest.FixtureRequest) -> Sideband:
    """:func:`make_app`'s app; a test may give its options: ``@pytest.mark.parametrize("app",
    [{"browsers": False}], indirect=True)``."""
    return make_app(**getattr(request, "param", {}))


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {}


@pytest_asyncio.fixture
async def stack(
    simulator: Simulator, app: Sideband, settings_overrides: dict[str, Any]
) -> AsyncIterator[Stack]:
    async with run_app(app, simulator, **{**TEST_SETTINGS, **settings_overrides}) as harness:
        yield harness


@contextmanager
def capture_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Every log entry at any level (whatever another test left configured), restored afterwards.

    The processor list is changed in place, as :func:`structlog.testing.capture_logs` does, so loggers
    bound before (a service binds its loggers once) report to the capture too."""
    old = structlog.get_config()
    processors = old["processors"]
    saved = list(processors)
    capture = LogCapture()
    processors[:] = [capture]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(0),
        cache_logger_on_first_use=False,
    )
    try:
        yield capture.entries
    finally:
        processors[:] = saved
        structlog.configure(**{**old, "processors": processors})


def untagged(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` without the tag sideband puts in a ``response.create`` (its ``response.metadata``, which
    must name the create's own ``event_id``); any other event as it is."""
    if event.get("type") != "response.create" or "metadata" not in (event.get("response") or {}):
        return event
    response = dict(event["response"])
    assert response.pop("metadata") == {"sideband": event["event_id"]}
    if response:
        return {**event, "response": response}
    return {k: v for k, v in event.items() if k != "response"}


def asked(request: dict[str, Any] | None) -> dict[str, Any] | None:
    """A simulated response's ``request`` (the ``response`` object of the create it answered) without the
    tag sideband puts in it."""
    if request is None:
        return None
    return {k: v for k, v in request.items() if k != "metadata"}


def heard_at_verb(sim: Simulator, call: SimCall, verb: str = "hangup") -> asyncio.Task[list[str]]:
    """A task whose result is what the caller had heard to its end when the call's ``verb`` request
    reached the simulator: the ids of the responses whose ``output_audio_buffer.stopped`` was out by
    then, in order. Start it before the call can end; cancel it if the test stops early."""
    path = f"/v1/realtime/calls/{call.call_id}/{verb}"

    async def watch() -> list[str]:
        await sim.wait_for(lambda s: any(r.path == path for r in s.requests), timeout=10, what=verb)
        return [e["response_id"] for e in call.sent if e["type"] == "output_audio_buffer.stopped"]

    return asyncio.create_task(watch())
