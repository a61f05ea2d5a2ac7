"""One client TLS context per process for every wss:// connection (building one loads the CA store)."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest

import sideband.upstream._ws as ws_module
from sideband import Sideband
from sideband.context import CallContext
from sideband.service import Service
from sideband.settings import Settings
from sideband.upstream.openai import CallGone


async def test_open_socket_passes_the_shared_context_for_wss_only(monkeypatch: pytest.MonkeyPatch) -> None:
    direct: list[tuple[Any, ...]] = []
    proxied: list[dict[str, Any]] = []

    async def fake_create_connection(factory: Any, host: str, port: int, **kwargs: Any) -> Any:
        direct.append((host, port, kwargs))
        raise OSError("no network in this test")

    async def fake_connect(url: str, **kwargs: Any) -> Any:
        proxied.append(kwargs)
        raise OSError("no network in this test")

    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", fake_create_connection)
    monkeypatch.setattr(ws_module, "connect", fake_connect)
    tls = ws_module.client_tls()
    for proxy in (None, "http://proxy.example:3128"):
        for url in ("wss://api.example.com/v1/realtime", "ws://127.0.0.1:9/v1/realtime"):
            with pytest.raises(OSError):
                await ws_module.open_socket(
                    url, "sk-test", compression=False, open_timeout=1, max_size=1024, proxy=proxy, tls=tls
                )
    # Direct: the shared context, checked against the URL's host; none for ws://.
    assert direct == [
        ("api.example.com", 443, {"ssl": tls, "server_hostname": "api.example.com"}),
        ("127.0.0.1", 9, {}),
    ]
    # Through a proxy (websockets' connect): the same context, and none for ws:// (websockets refuses it).
    assert proxied[0]["ssl"] is tls and proxied[0]["proxy"] == "http://proxy.example:3128"
    assert "ssl" not in proxied[1]
    assert tls.verify_mode is ssl.CERT_REQUIRED and tls.check_hostname


async def test_every_sideband_of_a_server_uses_the_apps_one_context(monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[Any] = []

    async def fake_connect_sideband(url: str, call_id: str, key: str, **kwargs: Any) -> Any:
        used.append((url, kwargs.get("tls")))
        raise CallGone(f"call {call_id} not found", 404)

    monkeypatch.setattr("sideband.service.connect_sideband", fake_connect_sideband)
    app = Sideband()
    settings = Settings(
        openai_api_key="sk-test",
        openai_webhook_secret="whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        openai_base_url="https://api.example.com/v1",
    )
    service = Service(settings, app)
    await service.start()
    try:
        for i in range(3):
            service.launch(CallContext(f"rtc_{i}"), app.plan())
        await asyncio.wait_for(service.registry.wait_idle(), 10)
    finally:
        await service.close()
    assert [u for u, _ in used] == ["wss://api.example.com/v1/realtime"] * 3
    contexts = {id(t) for _, t in used}
    assert len(contexts) == 1 and used[0][1] is app.tls_context()
    assert isinstance(used[0][1], ssl.SSLContext)


async def test_engine_sessions_share_the_apps_context_for_wss_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from sideband.settings import load_settings
    from sideband.upstream.vowel import EngineRefused, Token
    from sideband.vowel.session import EngineSession

    used: list[Any] = []

    async def fake_connect_engine(url: str, token: Any, **kwargs: Any) -> Any:
        used.append(kwargs.get("tls"))
        raise EngineRefused("refused in this test")

    monkeypatch.setattr("sideband.vowel.session.connect_engine", fake_connect_engine)
    app = Sideband()
    values = {
        "vowel_core_url": "https://core.example.com",
        "vowel_api_key": "vk-test",
        "vowel_service_id": "svc",
    }
    token = Token(value="tok", session_id=None, expires_at=None)
    for engine in ("https://engine.example.com", "wss://engine.example.com", "http://127.0.0.1:9"):
        settings = load_settings({**values, "vowel_engine_url": engine}, environ={})
        with pytest.raises(EngineRefused):
            await EngineSession(settings, app)._connect(token)
    assert used[0] is used[1] is app.tls_context()
    assert used[2] is None  # a plain ws:// engine needs none (and builds none)
