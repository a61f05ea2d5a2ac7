"""Shared fixtures: the simulator (from sideband.testing's pytest plugin) plus our server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from sideband import CallContext, Sideband, ToolError
from sideband.edge import SERVICE, create_app
from sideband.service import Service
from sideband.settings import Settings, load_settings
from sideband.testing import Simulator, WebhookSender


def make_app(**kw: Any) -> Sideband:
    """A small app with tools that cover the interesting outcomes."""
    app = Sideband(
        instructions="You are a test desk.",
        voice="marin",
        transfer_targets={"human": "tel:+14155550123"},
        **kw,
    )
    app.enable_end_call()
    app.enable_transfer()

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


@dataclass
class Stack:
    """Simulator + our server + a signed webhook sender pointed at it."""

    sim: Simulator
    app: Sideband
    settings: Settings
    server: TestServer
    sender: WebhookSender

    @property
    def service(self) -> Service:
        return self.server.app[SERVICE]

    @property
    def webhook_url(self) -> str:
        return str(self.server.make_url("/webhooks/openai"))

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait for a condition the test cannot get an event for (polls the loop, bounded)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.005)


def settings_for(sim: Simulator, **overrides: Any) -> Settings:
    base = {
        "openai_api_key": sim.api_key,
        "openai_webhook_secret": sim.webhook_secret,
        "openai_base_url": sim.base_url,
        "max_idle_duration": 30.0,
        "accept_budget": 1.5,
        "accept_attempt_timeout": 0.5,
        "drain_timeout": 1.0,
        "reattach_attempts": 2,
    }
    base.update(overrides)
    return load_settings(base, environ={})


@pytest.fixture
def app() -> Sideband:
    return make_app()


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {}


@pytest_asyncio.fixture
async def stack(
    simulator: Simulator, app: Sideband, settings_overrides: dict[str, Any]
) -> AsyncIterator[Stack]:
    settings = settings_for(simulator, **settings_overrides)
    server = TestServer(create_app(settings, app), host="127.0.0.1")
    await server.start_server()
    try:
        yield Stack(
            simulator,
            app,
            settings,
            server,
            simulator.webhook_sender(str(server.make_url("/webhooks/openai"))),
        )
    finally:
        await server.close()
