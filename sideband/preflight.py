"""``sideband check --online``: what OpenAI itself says of the key, the session configs and the models
before a rollout, by requests that start nothing (a client secret of the shortest life, a model lookup)."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from sideband.routing import RouteError
from sideband.session import Accept, SessionConfigError
from sideband.settings import SettingsError
from sideband.upstream.openai import (
    QUOTA_SPENT,
    REGION_REFUSED,
    UpstreamError,
    error_code,
    error_message,
    wrong_url,
)

if TYPE_CHECKING:
    from sideband.service import Service

__all__ = ["check_openai"]

APP_SESSION = "the app's session config"
BROWSER_SESSION = "the session config of browsers' calls"
PROBE_TTL = 10
"""Seconds the probe's client secret lives: the shortest OpenAI allows. Nobody is given it."""
OPENAI = "https://api.openai.com/v1"
GATEWAY_ERRORS = (502, 503, 504)
"""What a gateway or proxy in front of OpenAI answers, in a page of its own, when OpenAI does not."""
CONCURRENCY = 8
"""Requests in flight at once (a route file may hold hundreds of numbers)."""


async def check_openai(service: Service) -> list[str]:
    """Ask OpenAI, with the server's key, base URL and proxy, to take every session config the server
    can send (the app's, each accepting route's, and the browsers' when :meth:`~sideband.Sideband.
    authorize_browser` opened the WebRTC doors) and to name the models they use. Sessions a routing hook
    builds at ring time are not known here.

    Returns a line each for what was found. Raises, with one line naming what to fix:
    :class:`~sideband.settings.SettingsError` for the key (401, 403, a project with no credit left), the
    base URL (``Invalid URL``, no Realtime API there, a redirect, an answer that is not OpenAI's, a
    server error that is not OpenAI's, unreachable), a region OpenAI does not serve, or OpenAI not
    answering (429, 5xx);
    :class:`~sideband.routing.RouteError` for a route's session OpenAI refuses (400, or a model the
    project may not use: ``model_not_found``), :class:`~sideband.session.SessionConfigError` for the
    app's own.
    """
    sessions = _sessions(service)
    models: dict[str, str] = {}  # each model, with the first config that names it
    for where, session in sessions:
        for name in _models(session):
            models.setdefault(name, where)
    control, limit = service.control, asyncio.Semaphore(CONCURRENCY)

    async def one(request: Awaitable[Any]) -> None:
        async with limit:
            await request

    minted = await asyncio.gather(
        *(one(control.client_secret(s, PROBE_TTL)) for _, s in sessions), return_exceptions=True
    )
    looked_up = await asyncio.gather(*(one(control.model(name)) for name in models), return_exceptions=True)
    outcomes = [*minted, *looked_up]
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, UpstreamError):
            raise outcome
    base = service.settings.openai_base_url
    # What stops every request first: the key, the URL, the service. (A key restricted to Realtime may
    # not read models: its lookups' refusals are no fault.)
    for outcome in [*minted, *(m for m in looked_up if not _missing_scope(m))]:
        if isinstance(outcome, UpstreamError):
            _common(outcome, base)
    # A 403 for every config, naming no model, is the key's; for some only, or naming a model the
    # project may not use (403 model_not_found), the configs'.
    keys_fault = all(isinstance(m, UpstreamError) and m.status == 403 and not _of_model(m) for m in minted)
    for (where, _), outcome in zip(sessions, minted, strict=True):
        if not isinstance(outcome, UpstreamError):
            continue
        if _of_model(outcome) or outcome.status in (400, 422) or (outcome.status == 403 and not keys_fault):
            _refused(service, where, f"OpenAI refused its session{_said(outcome)}")
        if outcome.status == 403:
            raise SettingsError(f"OPENAI_API_KEY: the key may not start Realtime sessions{_said(outcome)}")
        if outcome.status in (404, 405):  # (OpenAI's API has this endpoint: something else answered)
            raise SettingsError(
                f"OPENAI_BASE_URL: {base} has no Realtime API{_said(outcome)} (OpenAI's is {OPENAI})"
            )
        raise SettingsError(f"OpenAI at {base} answered the check with an error{_said(outcome)}")
    unread: list[str] = []
    for (name, where), outcome in zip(models.items(), looked_up, strict=True):
        if isinstance(outcome, UpstreamError):
            if not _missing_scope(outcome) and (outcome.status != 403 or _of_model(outcome)):
                _refused(service, where, f"model {name}{_said(outcome)}")
            unread.append(name)
    lines = [f"openai: {base} accepted the key and {len(sessions)} session config(s)"]
    available = [name for name in models if name not in unread]
    if available:
        lines.append(f"models: {', '.join(available)} available")
    if unread:
        lines.append(f"models: {', '.join(unread)} not checked (the key may not read models)")
    if service.app.routes_calls:
        lines.append("routing hook: the sessions it builds at ring time are not checked")
    return lines


def _sessions(service: Service) -> list[tuple[str, dict[str, Any]]]:
    """Every distinct session body the server can send, each with the first place it comes from."""
    app, table = service.app, service.routes
    found = [(APP_SESSION, app.plan(Accept()).session)]
    found += [(where, app.plan(decision).session) for where, decision in table.accepting()]
    if app.browsers_allowed:
        found.append((BROWSER_SESSION, service.browser_plan().session))
    seen: set[str] = set()
    distinct = []
    for where, session in found:
        key = json.dumps(session, sort_keys=True)
        if key not in seen:
            seen.add(key)
            distinct.append((where, session))
    return distinct


def _models(session: dict[str, Any]) -> list[str]:
    """The models a session body names: the realtime model and the input transcription's."""
    names = [session.get("model")]
    audio = session.get("audio")
    audio_in = audio.get("input") if isinstance(audio, dict) else None
    transcription = audio_in.get("transcription") if isinstance(audio_in, dict) else None
    if isinstance(transcription, dict):
        names.append(transcription.get("model"))
    return [name for name in names if isinstance(name, str) and name]


def _of_model(exc: UpstreamError) -> bool:
    """Whether a refusal is of a model (``model_not_found``: one the project may not use), not of the
    key or its scopes."""
    return error_code(exc.body) == "model_not_found"


def _missing_scope(outcome: object) -> bool:
    """Whether a refusal is of a restricted key without the scope the request needs (``Missing scopes:
    …``, answered 401 or 403)."""
    if not isinstance(outcome, UpstreamError) or outcome.status not in (401, 403):
        return False
    return "Missing scopes" in (error_message(outcome.body) or "")


def _said(exc: UpstreamError) -> str:
    """`` (status: OpenAI's message)``, or `` (what went wrong)`` without an answer."""
    if exc.status is None:
        return f" ({exc})"
    message = error_message(exc.body)
    return f" ({exc.status}: {message})" if message else f" ({exc.status})"


def _common(exc: UpstreamError, base: str) -> None:
    """Raise for what would fail every request alike, whichever it came from."""
    status = exc.status
    if status is None:
        raise SettingsError(f"OPENAI_BASE_URL: {base} could not be reached{_said(exc)}")
    if exc.unsent:  # a proxy that opened no tunnel answered (407, 403…): its words name it and its variables
        raise SettingsError(str(exc))
    if _missing_scope(exc):
        raise SettingsError(f"OPENAI_API_KEY: the key lacks a permission sideband needs{_said(exc)}")
    if status == 401:
        raise SettingsError(f"OPENAI_API_KEY: OpenAI refused the key{_said(exc)}")
    code = error_code(exc.body)
    if status == 429 and code == QUOTA_SPENT:
        raise SettingsError(
            f"OPENAI_API_KEY: the key's project has no credit left{_said(exc)}: check its plan and billing"
        )
    if status == 403 and code == REGION_REFUSED:
        raise SettingsError(
            f"OpenAI at {base} does not serve the country or region this server's requests come from"
            f"{_said(exc)}: check the host's network or proxy"
        )
    if wrong_url(status, exc.body):
        raise SettingsError(
            f"OPENAI_BASE_URL: {base} is not the API's base{_said(exc)} (OpenAI's is {OPENAI})"
        )
    if status < 300:  # (a 200 that is no answer of OpenAI's: a web page, say)
        raise SettingsError(f"OPENAI_BASE_URL: {base} does not answer as OpenAI's API ({exc})")
    if status < 400:
        raise SettingsError(
            f"OPENAI_BASE_URL: {base} answered {status}, a redirect: sideband follows none (set the URL it "
            "leads to)"
        )
    if (
        status >= 500
        and error_message(exc.body) is None
        and status not in GATEWAY_ERRORS
        and not _openais(base)
    ):
        # (a server there that is not OpenAI's API: a plain web server's 501 to a POST, say; a gateway's
        # 502-504, and anything from OpenAI's own addresses, its CDN's 52x pages, are OpenAI not answering)
        raise SettingsError(
            f"OPENAI_BASE_URL: {base} does not answer as OpenAI's API{_said(exc)} (OpenAI's is {OPENAI})"
        )
    if exc.retryable:
        raise SettingsError(f"OpenAI at {base} could not answer{_said(exc)}: try again")


def _openais(base: str) -> bool:
    """Whether ``base`` is one of OpenAI's own addresses: api.openai.com or a regional one of its
    (eu.api.openai.com…), on the HTTPS port."""
    parts = urllib.parse.urlsplit(base)
    try:
        port = parts.port
    except ValueError:
        return False
    host = (parts.hostname or "").rstrip(".")
    return port in (None, 443) and (host == "api.openai.com" or host.endswith(".api.openai.com"))


def _refused(service: Service, where: str, problem: str) -> None:
    """Raise for a config OpenAI refused: a route's is the route file's error, else the app's."""
    if where in (APP_SESSION, BROWSER_SESSION):
        raise SessionConfigError(f"{where}: {problem}")
    source = service.routes.source
    raise RouteError(f"{source}: {where}: {problem}" if source else f"{where}: {problem}")
