"""``sideband check --online``: OpenAI's own word on the key, every session config and its models."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sideband import Sideband
from sideband.cli import check
from sideband.preflight import OPENAI, _common
from sideband.routing import RouteError
from sideband.session import SessionConfig, SessionConfigError
from sideband.settings import SettingsError
from sideband.testing import Simulator
from sideband.upstream.openai import UpstreamError
from tests.conftest import make_app, settings_for
from tests.test_cli import ROOT, SECRET, clean_env

MISSING_SCOPE = "You have insufficient permissions for this operation. Missing scopes: api.realtime.write."


async def run_check(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sideband.cli",
        "check",
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:  # (timed out, or the test was cancelled: nothing is left running)
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def check_env(sim: Simulator, routes: Path) -> dict[str, str]:
    return clean_env(
        OPENAI_API_KEY=sim.api_key,
        OPENAI_WEBHOOK_SECRET=sim.webhook_secret,
        OPENAI_BASE_URL=sim.base_url,
        SIDEBAND_ROUTES_FILE=str(routes),
    )


def asked(sim: Simulator, method: str, prefix: str) -> list[Any]:
    return [r for r in sim.requests if r.method == method and r.path.startswith(prefix)]


ROUTES = """
[default]
instructions = "The front desk."
[routes."+18005551212"]
voice = "cedar"
[routes."+18005551213"]
instructions = "The front desk."
[routes."+18005551214"]
session = { model = "gpt-realtime-mini" }
[routes."+18005551215"]
reject = 486
"""


async def test_online_check_has_openai_take_every_session_the_server_can_send(
    simulator: Simulator, tmp_path: Path
) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text(ROUTES)
    code, out, err = await run_check("--online", env=check_env(simulator, routes))  # the bundled order desk
    assert code == 0, err
    assert out.splitlines() == [
        "app sideband: 3 tool(s): transfer_call, end_call, lookup_order",
        f"routes: 4 number(s) and a default from {routes}",
        "claims: in memory (one instance)",
        # the app's, the default's, +…12's voice, +…14's model (+…13 is the default's, +…15 rejects)
        f"openai: {simulator.base_url} accepted the key and 4 session config(s)",
        "models: gpt-realtime, gpt-4o-mini-transcribe, gpt-realtime-mini available",
        "routing hook: the sessions it builds at ring time are not checked",
        "sideband: ready to serve",
    ]
    mints = [r.json for r in asked(simulator, "POST", "/v1/realtime/client_secrets")]
    assert [m["expires_after"] for m in mints] == [{"anchor": "created_at", "seconds": 10}] * 4
    sessions = sorted((m["session"]["model"], m["session"]["audio"]["output"]["voice"]) for m in mints)
    assert sessions == [
        ("gpt-realtime", "cedar"),
        ("gpt-realtime", "marin"),
        ("gpt-realtime", "marin"),
        ("gpt-realtime-mini", "marin"),
    ]
    assert all(m["session"]["type"] == "realtime" and m["session"]["tools"] for m in mints)
    looked_up = sorted(r.path for r in asked(simulator, "GET", "/v1/models/"))
    assert looked_up == [
        "/v1/models/gpt-4o-mini-transcribe",
        "/v1/models/gpt-realtime",
        "/v1/models/gpt-realtime-mini",
    ]
    assert not simulator.calls  # it starts nothing


async def test_a_voice_openai_does_not_have_passes_offline_and_is_named_online(
    simulator: Simulator, tmp_path: Path
) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text('[routes."+18005551212"]\nvoice = "juniper"\n')
    env = check_env(simulator, routes)
    code, out, err = await run_check(env=env)
    assert code == 0, err  # offline: a voice sideband does not know of may be a new one of OpenAI's
    code, out, err = await run_check("--online", env=env)
    assert code == 2 and out == ""
    assert err == (
        f"sideband: SIDEBAND_ROUTES_FILE: {routes}: routes.+18005551212: OpenAI refused its session (400: "
        "Invalid value: 'juniper'. Supported values are: 'alloy', 'ash', 'ballad', 'coral', 'echo', 'sage', "
        "'shimmer', 'verse', 'marin', and 'cedar'.)\n"
    )
    # one close to a built-in voice is its misspelling, refused offline
    routes.write_text('[routes."+18005551212"]\nvoice = "marine"\n')
    code, out, err = await run_check(env=env)
    assert code == 2 and "unknown voice 'marine' (did you mean 'marin'?)" in err, err


async def check_online(sim: Simulator, app: Sideband | None = None, **settings: Any) -> list[str]:
    return await check(settings_for(sim, **settings), app or make_app(), online=True)


async def refusal(
    error: type[Exception], sim: Simulator, app: Sideband | None = None, **settings: Any
) -> str:
    """The one line of the ``error`` that :func:`check_online` raises."""
    with pytest.raises(error) as raised:
        await check_online(sim, app, **settings)
    return str(raised.value)


@asynccontextmanager
async def serving(web_app: web.Application) -> AsyncIterator[str]:
    """``web_app`` on a loopback port, as an OpenAI base URL."""
    server = TestServer(web_app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/v1"))
    finally:
        await server.close()


async def test_a_key_openai_refuses_is_named(simulator: Simulator) -> None:
    line = await refusal(SettingsError, simulator, openai_api_key="sk-not-the-key")
    assert line.startswith(
        "OPENAI_API_KEY: OpenAI refused the key (401: Incorrect API key provided: sk-****-key."
    )


async def test_a_project_with_no_credit_left_is_named_not_retried(simulator: Simulator) -> None:
    simulator.account = "no_credit"
    line = await refusal(SettingsError, simulator)
    assert line == (
        "OPENAI_API_KEY: the key's project has no credit left (429: You exceeded your current quota, please "
        "check your plan and billing details. For more information on this error, read the docs: "
        "https://platform.openai.com/docs/guides/error-codes/api-errors.): check its plan and billing"
    )


async def test_a_region_openai_does_not_serve_is_named_not_blamed_on_the_key(simulator: Simulator) -> None:
    simulator.account = "region_refused"
    line = await refusal(SettingsError, simulator)
    assert line == (
        f"OpenAI at {simulator.base_url} does not serve the country or region this server's requests come "
        "from (403: Country, region, or territory not supported): check the host's network or proxy"
    )


async def test_a_base_url_without_its_version_is_named(simulator: Simulator) -> None:
    base = simulator.base_url.removesuffix("/v1")
    line = await refusal(SettingsError, simulator, openai_base_url=base)
    assert line == (
        f"OPENAI_BASE_URL: {base} is not the API's base (404: Invalid URL (POST /realtime/client_secrets)) "
        "(OpenAI's is https://api.openai.com/v1)"
    )


async def test_a_base_url_nobody_answers_is_named(simulator: Simulator) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        base = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"  # bound, not listening: refused
        line = await refusal(SettingsError, simulator, openai_base_url=base)
    assert line.startswith(
        f"OPENAI_BASE_URL: {base} could not be reached (POST /realtime/client_secrets failed: "
    )


async def test_a_model_the_key_may_not_use_is_named_with_the_config_that_names_it(
    simulator: Simulator, tmp_path: Path
) -> None:
    simulator.models.discard("gpt-realtime")
    line = await refusal(SessionConfigError, simulator)
    assert line == (
        "the app's session config: model gpt-realtime (404: The model `gpt-realtime` does not exist or you "
        "do not have access to it.)"
    )
    simulator.models.add("gpt-realtime")
    routes = tmp_path / "routes.toml"
    routes.write_text('[routes."+18005551212"]\nsession = { model = "gpt-realtime-preview" }\n')
    line = await refusal(RouteError, simulator, routes_file=routes)
    assert line == (
        f"{routes}: routes.+18005551212: model gpt-realtime-preview (404: The model `gpt-realtime-preview` "
        "does not exist or you do not have access to it.)"
    )


async def test_an_app_on_the_newest_realtime_model_passes_online(simulator: Simulator) -> None:
    lines = await check_online(simulator, make_app(model="gpt-realtime-2.1"))
    assert "models: gpt-realtime-2.1, gpt-4o-mini-transcribe available" in lines
    looked_up = {r.path for r in asked(simulator, "GET", "/v1/models/")}
    assert "/v1/models/gpt-realtime-2.1" in looked_up


async def test_a_key_that_may_not_read_models_passes_with_them_unchecked(simulator: Simulator) -> None:
    simulator.key_reads_models = False  # a restricted key: Realtime only
    lines = await check_online(simulator)
    assert lines[-2:] == [
        f"openai: {simulator.base_url} accepted the key and 2 session config(s)",  # phones' and browsers'
        "models: gpt-realtime, gpt-4o-mini-transcribe not checked (the key may not read models)",
    ]


async def test_a_custom_voice_goes_out_as_openai_takes_it(simulator: Simulator, tmp_path: Path) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text('[routes."+18005551212"]\nvoice = "voice_1234"\n')
    lines = await check_online(simulator, routes_file=routes)
    assert f"openai: {simulator.base_url} accepted the key and 3 session config(s)" in lines
    voices = [
        r.json["session"]["audio"]["output"]["voice"] for r in asked(simulator, "POST", "/v1/realtime/c")
    ]
    # the app's and the browsers', the route's
    assert sorted(voices, key=str) == ["marin", "marin", {"id": "voice_1234"}]


@pytest.fixture
async def stand_in(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """An OpenAI stand-in answering every request with ``(status, message)``."""
    status, message = request.param

    async def answer(_: web.Request) -> web.Response:
        error = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
        return web.json_response(error, status=status)

    web_app = web.Application()
    web_app.router.add_route("*", "/{tail:.*}", answer)
    async with serving(web_app) as base:
        yield base


@pytest.mark.parametrize(
    ("stand_in", "expected"),
    [
        (
            (403, MISSING_SCOPE),
            f"OPENAI_API_KEY: the key lacks a permission sideband needs (403: {MISSING_SCOPE})",
        ),
        (
            (403, "Not allowed."),
            "OPENAI_API_KEY: the key may not start Realtime sessions (403: Not allowed.)",
        ),
        ((503, "The engine is currently overloaded."), "could not answer (503: The engine is currently "),
        ((429, "Rate limit reached."), "could not answer (429: Rate limit reached.): try again"),
        (
            (401, MISSING_SCOPE),
            f"OPENAI_API_KEY: the key lacks a permission sideband needs (401: {MISSING_SCOPE})",
        ),
        ((404, "Not Found"), "has no Realtime API (404: Not Found) (OpenAI's is https://api.openai.com/v1)"),
        ((200, "Welcome"), "does not answer as OpenAI's API (client_secrets answered without a value)"),
        ((301, "Moved"), "answered 301, a redirect: sideband follows none (set the URL it leads to)"),
        ((413, "Too large"), "answered the check with an error (413: Too large)"),
    ],
    indirect=["stand_in"],
)
async def test_what_stops_every_request_is_one_line(
    simulator: Simulator, stand_in: str, expected: str
) -> None:
    line = await refusal(SettingsError, simulator, openai_base_url=stand_in)
    assert expected in line, line


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (501, "does not answer as OpenAI's API (501) (OpenAI's is https://api.openai.com/v1)"),
        (500, "does not answer as OpenAI's API (500) (OpenAI's is https://api.openai.com/v1)"),
        (502, "could not answer (502): try again"),  # (a gateway's page: OpenAI behind it not answering)
    ],
)
async def test_a_server_error_that_is_not_openais_names_the_base_url(status: int, expected: str) -> None:
    """``OPENAI_BASE_URL`` at a server that is not OpenAI's API (a plain web server answers a POST 501,
    with a page of its own): the base URL is named, not "try again"."""

    async def answer(_: web.Request) -> web.Response:
        return web.Response(
            status=status, text="<html><body>Unsupported method</body></html>", content_type="text/html"
        )

    web_app = web.Application()
    web_app.router.add_route("*", "/{tail:.*}", answer)
    async with serving(web_app) as base:
        env = clean_env(OPENAI_API_KEY="sk-test", OPENAI_WEBHOOK_SECRET=SECRET, OPENAI_BASE_URL=base)
        code, out, err = await run_check("--online", env=env)
    assert code == 2 and out == "", err
    assert err.startswith(
        f"sideband: OPENAI_BASE_URL: {base} " if status != 502 else f"sideband: OpenAI at {base} "
    )
    assert err.count("\n") == 1 and expected in err, err


def test_a_cdn_page_from_openais_own_address_is_openai_not_answering() -> None:
    """A 5xx page from OpenAI's own address (its CDN's, as OpenAI is down) is no wrong base URL."""
    with pytest.raises(SettingsError) as raised:
        _common(UpstreamError("POST /realtime/client_secrets: 522", 522, "<html>…</html>"), OPENAI)
    assert str(raised.value) == f"OpenAI at {OPENAI} could not answer (522): try again"


@pytest.mark.parametrize(
    "base",
    [
        "https://eu.api.openai.com/v1",
        "https://us.api.openai.com/v1",
        "https://au.api.openai.com/v1",
        "https://in.api.openai.com/v1",
        "https://jp.api.openai.com/v1",
        "https://EU.API.OpenAI.com:443/v1",
    ],
)
@pytest.mark.parametrize("status", [500, 520, 522, 524])
def test_a_bare_error_from_a_regional_openai_address_is_openai_not_answering(base: str, status: int) -> None:
    """OpenAI's regional addresses (data residency) are OpenAI's own: a bare 500 or a CDN's 52x page from
    one is OpenAI not answering, not a wrong base URL steering the user to the global one."""
    with pytest.raises(SettingsError) as raised:
        _common(UpstreamError(f"POST /realtime/client_secrets: {status}", status, "<html>…</html>"), base)
    assert str(raised.value) == f"OpenAI at {base} could not answer ({status}): try again"


@pytest.mark.parametrize(
    "base",
    [
        "https://api.openai.com.example.net/v1",
        "https://notapi.openai.com/v1",
        "https://api.openai.com:8443/v1",
    ],
)
def test_a_bare_error_from_an_address_merely_like_openais_names_the_base_url(base: str) -> None:
    with pytest.raises(SettingsError) as raised:
        _common(UpstreamError("POST /realtime/client_secrets: 522", 522, "<html>…</html>"), base)
    assert str(raised.value) == (
        f"OPENAI_BASE_URL: {base} does not answer as OpenAI's API (522) (OpenAI's is {OPENAI})"
    )


def no_access(model: str) -> dict[str, Any]:
    """OpenAI's answer to a project that may not use ``model`` (403, not 404)."""
    message = f"Project `proj_x` does not have access to model `{model}`"
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }


@pytest.fixture
async def project_without_mini() -> AsyncIterator[str]:
    """An OpenAI stand-in whose project may not use gpt-realtime-mini: a mint naming it and its lookup get
    403 ``model_not_found``; anything else is taken."""

    async def mint(request: web.Request) -> web.Response:
        model = (await request.json())["session"].get("model")
        if model == "gpt-realtime-mini":
            return web.json_response(no_access(model), status=403)
        if model == "gpt-realtime-typo":
            message = f"The model `{model}` does not exist or you do not have access to it."
            error = {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            }
            return web.json_response({"error": error}, status=404)
        return web.json_response({"value": "ek_x", "expires_at": 0, "session": {}})

    async def model(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name == "gpt-realtime-mini":
            return web.json_response(no_access(name), status=403)
        return web.json_response({"id": name, "object": "model", "created": 0, "owned_by": "system"})

    web_app = web.Application()
    web_app.router.add_post("/v1/realtime/client_secrets", mint)
    web_app.router.add_get("/v1/models/{name}", model)
    async with serving(web_app) as base:
        yield base


async def test_a_model_the_project_may_not_use_is_the_routes_fault_not_the_keys(
    simulator: Simulator, project_without_mini: str, tmp_path: Path
) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text('[routes."+18005551212"]\nsession = { model = "gpt-realtime-mini" }\n')
    line = await refusal(RouteError, simulator, openai_base_url=project_without_mini, routes_file=routes)
    assert line == (
        f"{routes}: routes.+18005551212: OpenAI refused its session (403: Project `proj_x` does not have "
        "access to model `gpt-realtime-mini`)"
    )
    # a model that does not exist, refused by the mint (404): that route's too, not the base URL's
    routes.write_text('[routes."+18005551212"]\nsession = { model = "gpt-realtime-typo" }\n')
    line = await refusal(RouteError, simulator, openai_base_url=project_without_mini, routes_file=routes)
    assert line == (
        f"{routes}: routes.+18005551212: OpenAI refused its session (404: The model `gpt-realtime-typo` "
        "does not exist or you do not have access to it.)"
    )


async def test_a_model_lookup_refused_for_the_model_is_no_missing_scope(
    simulator: Simulator, project_without_mini: str
) -> None:
    # (a transcription model the stand-in's mints do not look at: only its lookup refuses it)
    app = make_app(session=SessionConfig(transcription_model="gpt-realtime-mini"))
    line = await refusal(SessionConfigError, simulator, app, openai_base_url=project_without_mini)
    assert line == (
        "the app's session config: model gpt-realtime-mini (403: Project `proj_x` does not have access to "
        "model `gpt-realtime-mini`)"
    )
